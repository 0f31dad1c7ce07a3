//! A model resident on a device: the manifest's family loaded and ready to run batches.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use image::RgbImage;

use super::{Manifest, ManifestError};
use crate::pipeline::{BatchResult, BatchSpec, ServedModel, StepObserver, Unobserved};

/// A model resident on a device, ready to run batches.
#[derive(Clone)]
pub struct LoadedModel {
    pub manifest: Manifest,
    /// Content hash of the weights (`random-<seed>` for untrained random weights).
    pub version: String,
    pub trained: bool,
    /// The family's model (see [`Self::family_model`] for its own type).
    pub model: Arc<dyn ServedModel>,
    /// Bytes of the weights serving (a reload's size limit is relative to them).
    pub weights_bytes: u64,
}

impl LoadedModel {
    /// Loads what the manifest names (the family's weights file or directory).
    pub fn load(manifest: &Manifest, device: &Device) -> Result<Self, ManifestError> {
        manifest.family().load(manifest, None, device)
    }

    /// Loads `weights` into the manifest's model: used for hot reloads of a new checkpoint
    /// (what a file or directory may hold is the family's to say).
    pub fn load_weights(
        manifest: &Manifest,
        weights: &Path,
        device: &Device,
    ) -> Result<Self, ManifestError> {
        manifest.family().load(manifest, Some(weights), device)
    }

    /// Random weights (deterministic from `seed`), for tests and for serving before a model
    /// has been trained. Reported as untrained. Only families that can.
    pub fn random(manifest: &Manifest, seed: u64, device: &Device) -> Result<Self, ManifestError> {
        manifest.family().random(manifest, seed, device)
    }

    /// The family's own model type, for the tools that need its internals.
    pub fn family_model<T: 'static>(&self) -> Option<&T> {
        self.model.as_any().downcast_ref()
    }

    pub fn generate(
        &self,
        spec: &BatchSpec,
        steps: usize,
        guidance: f32,
    ) -> candle_core::Result<BatchResult> {
        self.generate_observed(spec, steps, guidance, &mut Unobserved)
    }

    /// [`Self::generate`] under an observer that sees every step and may drop rows; the
    /// outputs are those of the rows still live at the end, in batch order.
    pub fn generate_observed(
        &self,
        spec: &BatchSpec,
        steps: usize,
        guidance: f32,
        observer: &mut dyn StepObserver,
    ) -> candle_core::Result<BatchResult> {
        let params = self.manifest.sampling.params(steps, guidance);
        self.model.generate_observed(spec, params, observer)
    }

    /// Frames of an intermediate x0 estimate (a partial image), one frame list per row.
    pub fn preview(&self, x0: &candle_core::Tensor) -> candle_core::Result<Vec<Vec<RgbImage>>> {
        self.model.preview(x0)
    }
}

/// Exactly the tensors the architecture has: none missing, none extra, every shape equal.
pub fn check_shapes(
    expected: &BTreeMap<String, Vec<usize>>,
    found: &BTreeMap<String, Vec<usize>>,
) -> Result<(), String> {
    let missing: Vec<&str> = expected
        .keys()
        .filter(|n| !found.contains_key(*n))
        .map(String::as_str)
        .collect();
    let extra: Vec<&str> = found
        .keys()
        .filter(|n| !expected.contains_key(*n))
        .map(String::as_str)
        .collect();
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|(n, s)| {
            let f = found.get(n)?;
            (f != s).then(|| format!("{n} is {f:?}, expected {s:?}"))
        })
        .collect();
    if missing.is_empty() && extra.is_empty() && wrong.is_empty() {
        return Ok(());
    }
    let few = |v: &[&str]| v.iter().take(3).copied().collect::<Vec<_>>().join(", ");
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    Err(format!(
        "the tensors do not match the architecture: {} missing ({}), {} unexpected ({}), {} \
         of the wrong shape ({})",
        missing.len(),
        few(&missing),
        extra.len(),
        few(&extra),
        wrong.len(),
        few(&wrong)
    ))
}
