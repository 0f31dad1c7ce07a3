//! The sd family's entry in the registry.

use std::path::Path;

use candle_core::Device;

use super::distill::SdFamily;
use super::load::load_dir;
use super::manifest::SdSource;
use crate::distill::run::{Run, RunOutput};
use crate::distill::IterStats;
use crate::families::{Capabilities, Family, Section};
use crate::manifest::{LoadedModel, Manifest, ManifestError};

/// Stable Diffusion 1.x / 2.x / XL and their students from a diffusers directory
/// (`family = "sd"`).
pub struct Sd;

impl Family for Sd {
    fn name(&self) -> &'static str {
        "sd"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn keys(&self) -> &'static [&'static str] {
        SdSource::KEYS
    }

    fn parse(&self, text: &str) -> Result<Box<dyn Section>, String> {
        Ok(Box::new(SdSource::parse(text)?))
    }

    /// The diffusers directory with the manifest's single UNet file, if any; `weights` is
    /// either a whole diffusers directory or a single UNet file used with the manifest's
    /// directory.
    fn load(
        &self,
        manifest: &Manifest,
        weights: Option<&Path>,
        device: &Device,
    ) -> Result<LoadedModel, ManifestError> {
        let sd = manifest
            .section::<SdSource>()
            .ok_or_else(|| ManifestError::Model {
                name: manifest.name.clone(),
                message: "not a Stable Diffusion manifest".into(),
            })?;
        let model_dir = sd.model_dir(&manifest.dir);
        match weights {
            None => load_dir(
                manifest,
                sd,
                &model_dir,
                sd.unet_file(&manifest.dir).as_deref(),
                device,
            ),
            Some(w) if w.is_dir() => load_dir(manifest, sd, w, None, device),
            Some(w) => load_dir(manifest, sd, &model_dir, Some(w), device),
        }
    }

    fn distill(
        &self,
        run: Run<'_>,
        progress: &mut dyn FnMut(&IterStats, u64),
    ) -> anyhow::Result<RunOutput> {
        let teacher = SdFamily::from_manifest(run.teacher(), run.device())?;
        run.distill(teacher, progress)
    }
}
