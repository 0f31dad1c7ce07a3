//! The wan family's entry in the registry.

use std::path::Path;

use candle_core::Device;

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

    /// Not built yet: the step 5 (DMD2/AMD on the transformer with LoRA and a video
    /// reward). Says so rather than failing later.
    fn distill(
        &self,
        run: Run<'_>,
        _progress: &mut dyn FnMut(&IterStats, u64),
    ) -> anyhow::Result<RunOutput> {
        anyhow::bail!(
            "distilling a Wan model ({}) is not supported yet; Wan models can be served",
            run.teacher().name
        )
    }
}
