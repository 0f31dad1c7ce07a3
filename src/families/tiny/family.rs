//! The tiny family's entry in the registry.

use std::path::Path;

use candle_core::Device;

use super::distill::TinyFamily;
use super::manifest::TinySource;
use crate::distill::run::{Run, RunOutput};
use crate::distill::IterStats;
use crate::families::{Capabilities, Family, Section};
use crate::manifest::{LoadedModel, Manifest, ManifestError};

/// The built-in ShapesWorld family (`family = "tiny"`).
pub struct Tiny;

impl Family for Tiny {
    fn name(&self) -> &'static str {
        "tiny"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            shapes_world: true,
            random_weights: true,
        }
    }

    fn keys(&self) -> &'static [&'static str] {
        TinySource::KEYS
    }

    fn parse(&self, text: &str) -> Result<Box<dyn Section>, String> {
        Ok(Box::new(TinySource::parse(text)?))
    }

    /// A tiny model is one safetensors file, the manifest's or `weights`.
    fn load(
        &self,
        manifest: &Manifest,
        weights: Option<&Path>,
        device: &Device,
    ) -> Result<LoadedModel, ManifestError> {
        match weights {
            Some(w) => super::load::load_file(manifest, w, device),
            None => super::load::load_file(manifest, &manifest.weights_path(), device),
        }
    }

    fn random(
        &self,
        manifest: &Manifest,
        seed: u64,
        device: &Device,
    ) -> Result<LoadedModel, ManifestError> {
        super::load::random(manifest, seed, device)
    }

    fn distill(
        &self,
        run: Run<'_>,
        progress: &mut dyn FnMut(&IterStats, u64),
    ) -> anyhow::Result<RunOutput> {
        let teacher = TinyFamily::from_manifest(run.teacher(), run.device())?;
        run.distill(teacher, progress)
    }
}
