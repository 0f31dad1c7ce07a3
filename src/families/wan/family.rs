//! The wan family's entry in the registry.

use std::path::Path;

use candle_core::Device;

use super::distill::WanFamily;
use super::load::load_dir;
use super::manifest::WanSource;
use crate::distill::run::{Run, RunOutput};
use crate::distill::IterStats;
use crate::families::{Capabilities, Family, Section};
use crate::manifest::{LoadedModel, Manifest, ManifestError};

/// Wan2.1 text-to-video and its students from a diffusers directory (`family = "wan"`).
pub struct Wan;

impl Family for Wan {
    fn name(&self) -> &'static str {
        "wan"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn keys(&self) -> &'static [&'static str] {
        WanSource::KEYS
    }

    fn parse(&self, text: &str) -> Result<Box<dyn Section>, String> {
        Ok(Box::new(WanSource::parse(text)?))
    }

    /// The manifest's directory (with its transformer file, if any); `weights` is a whole
    /// diffusers directory or a single transformer file used with the manifest's directory.
    fn load(
        &self,
        manifest: &Manifest,
        weights: Option<&Path>,
        device: &Device,
    ) -> Result<LoadedModel, ManifestError> {
        let wan = WanSource::of(manifest).ok_or_else(|| ManifestError::Model {
            name: manifest.name.clone(),
            message: "not a Wan manifest".into(),
        })?;
        let dir = wan.model_dir(&manifest.dir);
        match weights {
            None => load_dir(
                manifest,
                wan,
                &dir,
                wan.transformer_file(&manifest.dir).as_deref(),
                device,
            ),
            Some(w) if w.is_dir() => load_dir(manifest, wan, w, None, device),
            Some(w) => load_dir(manifest, wan, &dir, Some(w), device),
        }
    }

    fn distill(
        &self,
        run: Run<'_>,
        progress: &mut dyn FnMut(&IterStats, u64),
    ) -> anyhow::Result<RunOutput> {
        let teacher = WanFamily::from_manifest(run.teacher(), run.device())?;
        run.distill(teacher, progress)
    }
}
