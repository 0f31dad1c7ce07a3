//! The tiny family's part of a manifest: the weights and tokenizer files beside it and the
//! `[architecture]`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::TinyConfig;
use crate::families::{Family, Section};
use crate::manifest::identity::ModelIdentity;
use crate::manifest::{Manifest, ManifestError, Sampling, Serving};
use crate::pipeline::FlowSchedule;

/// Where the tiny family's model lives: files relative to the manifest's directory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TinySource {
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
    pub architecture: TinyConfig,
}

/// The keys as a manifest may hold them (checked for presence by [`TinySource::parse`]).
#[derive(Deserialize)]
struct Keys {
    weights: Option<PathBuf>,
    tokenizer: Option<PathBuf>,
    architecture: Option<TinyConfig>,
}

impl TinySource {
    pub const KEYS: &'static [&'static str] = &["weights", "tokenizer", "architecture"];

    pub fn parse(text: &str) -> Result<Self, String> {
        let keys: Keys = toml::from_str(text).map_err(|e| e.to_string())?;
        match (keys.weights, keys.tokenizer, keys.architecture) {
            (Some(weights), Some(tokenizer), Some(architecture)) => Ok(Self {
                weights,
                tokenizer,
                architecture,
            }),
            _ => Err("family \"tiny\" needs `weights`, `tokenizer` and [architecture]".into()),
        }
    }

    /// The tiny part of `manifest`, or an error saying that `feature` needs it.
    pub fn of<'m>(manifest: &'m Manifest, feature: &str) -> Result<&'m Self, ManifestError> {
        manifest
            .section::<Self>()
            .ok_or_else(|| ManifestError::WrongFamily {
                name: manifest.name.clone(),
                family: manifest.family().to_string(),
                feature: feature.to_string(),
                supported: super::Tiny.name().into(),
            })
    }

    /// The tokenizer file of a manifest read from `dir`.
    pub fn tokenizer_path(&self, dir: &Path) -> PathBuf {
        dir.join(&self.tokenizer)
    }
}

impl Section for TinySource {
    fn to_toml(&self) -> Result<Vec<(&'static str, toml::Value)>, toml::ser::Error> {
        Ok(vec![
            ("weights", toml::Value::try_from(&self.weights)?),
            ("tokenizer", toml::Value::try_from(&self.tokenizer)?),
            ("architecture", toml::Value::try_from(&self.architecture)?),
        ])
    }

    fn validate(&self, sampling: &Sampling, serving: &Serving) -> Result<(), String> {
        if sampling.timesteps.is_some() {
            return Err("sampling.timesteps applies to the sd family only".into());
        }
        for (key, shift) in [
            ("shift", Some(sampling.shift)),
            ("video_shift", sampling.video_shift),
        ] {
            if let Some(s) = shift.filter(|s| !(s.is_finite() && *s > 0.0)) {
                return Err(format!("sampling.{key} {s} must be a positive number"));
            }
        }
        crate::pipeline::sampler::check_guidance_interval(
            "sampling.guidance_interval",
            sampling.guidance_interval,
        )?;
        let a = &self.architecture;
        a.validate()?;
        let m = a.size_multiple();
        for [w, h] in &serving.sizes {
            if !w.is_multiple_of(m) || !h.is_multiple_of(m) {
                return Err(format!(
                    "size {w}x{h} is not a multiple of {m} (the denoiser's coarsest grid)"
                ));
            }
        }
        Ok(())
    }

    fn weights_path(&self, dir: &Path) -> PathBuf {
        dir.join(&self.weights)
    }

    fn architecture(&self, _tensors: &[(&String, &[usize])]) -> String {
        architecture_hash(&self.architecture)
    }
}

/// The rectified-flow schedule of a tiny manifest (`sampling.shift`).
pub fn flow_schedule(sampling: &Sampling) -> FlowSchedule {
    FlowSchedule {
        shift: sampling.shift,
    }
}

/// The schedule of its videos (`sampling.video_shift`, else `sampling.shift`).
pub fn video_flow_schedule(sampling: &Sampling) -> FlowSchedule {
    FlowSchedule {
        shift: sampling.video_shift.unwrap_or(sampling.shift),
    }
}

fn architecture_hash(a: &TinyConfig) -> String {
    let json = serde_json::to_vec(a).expect("a TinyConfig serializes");
    crate::util::sha256_hex(&json)[..16].to_string()
}

/// The identity of a tiny teacher trained with `architecture`.
pub fn teacher_identity(architecture: &TinyConfig) -> ModelIdentity {
    ModelIdentity::teacher(super::Tiny.name(), architecture_hash(architecture))
}
