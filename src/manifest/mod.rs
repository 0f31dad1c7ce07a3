//! Model manifests and loading the model they describe.
//!
//! A manifest is found as `<models_dir>/<name>/manifest.toml` (the tiny family keeps its
//! weights and tokenizer beside it), `<models_dir>/<name>.toml`, or any `*.toml` path. Its
//! `family` decides what else it holds: the tiny family's `weights`, `tokenizer` and
//! `[architecture]`, or the sd family's `[sd]` table naming a diffusers directory.

pub mod identity;
mod loaded;
mod sd;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::families::tiny::TinyConfig;
use crate::pipeline::{FlowSchedule, SamplerKind};

pub use loaded::{FamilyModel, LoadedModel};
pub use sd::{SdSource, WeightDtype};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid manifest {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("weights file {path} is missing; train it first or pass --allow-random-weights")]
    MissingWeights { path: String },
    #[error("cannot load weights {path}: {message}")]
    Weights { path: String, message: String },
    /// The file's recorded identity is another model's.
    #[error("weights {path} belong to another model: {message}")]
    Identity { path: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] crate::families::tiny::tokenizer::TokenizerError),
    #[error("no model named {name:?}: none of {tried} exists")]
    UnknownModel { name: String, tried: String },
    /// A Stable Diffusion directory that does not load; the error names the file (and the
    /// tensor, for weights). Shown inline, not as a `source`, so a chain prints it once.
    #[error("model {name}: {error}")]
    Sd {
        name: String,
        error: Box<crate::families::sd::layout::LoadError>,
    },
    #[error("model {name}: {message}")]
    Model { name: String, message: String },
    #[error("model {name} is of the {family} family; {feature} supports only the tiny family")]
    WrongFamily {
        name: String,
        family: Family,
        feature: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// The built-in ShapesWorld DiT (`crate::families::tiny`).
    Tiny,
    /// Stable Diffusion 1.x / 2.x / XL and their students from a diffusers directory.
    Sd,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Tiny => "tiny",
            Family::Sd => "sd",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    pub sampler: SamplerKind,
    pub default_steps: usize,
    /// Every step count a request may ask for.
    pub allowed_steps: Vec<usize>,
    pub default_guidance: f32,
    /// Guidance above 1 runs CFG; a student usually allows only 1.
    pub max_guidance: f32,
    #[serde(default = "one")]
    pub shift: f32,
    /// sd family, student and ancestral samplers: the student's own descending timestep list
    /// (e.g. DMD2's `[999, 749, 499, 249]`), used when a request asks for that many steps;
    /// other step counts use trailing spacing (`crate::families::sd::DdpmSchedule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timesteps: Option<Vec<usize>>,
}

fn one() -> f32 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serving {
    pub max_batch: usize,
    pub max_wait_ms: u64,
    /// Allowed `[width, height]` pairs.
    pub sizes: Vec<[usize; 2]>,
    /// Allowed frame counts (1 = image).
    pub frames: Vec<usize>,
    /// Keep the encoded outputs in the generation log, so feedback can be tied to pixels
    /// (cheap for small models; off by default).
    #[serde(default)]
    pub keep_media: bool,
}

/// Where the tiny family's model lives: files relative to the manifest's directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySource {
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
    pub architecture: TinyConfig,
}

/// The family-specific part of a manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Tiny(TinySource),
    Sd(SdSource),
}

/// A parsed, validated manifest. The TOML keys are those of [`ManifestFile`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ManifestFile", into = "ManifestFile")]
pub struct Manifest {
    pub name: String,
    pub description: String,
    pub source: ModelSource,
    pub sampling: Sampling,
    pub serving: Serving,
    /// For a distilled student: the model (under the same models directory) it was distilled
    /// from, which `fewstep distill` uses as the real teacher when refining it.
    pub teacher: Option<String>,
    /// Directory the manifest was read from (set on load; relative paths start there).
    pub dir: PathBuf,
}

/// The TOML layout of a manifest, every family's keys side by side (the key order is the
/// order in which a manifest is written).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    name: String,
    family: Family,
    #[serde(default)]
    description: String,
    /// tiny: weights file, relative to the manifest's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weights: Option<PathBuf>,
    /// tiny: tokenizer file, relative to the manifest's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tokenizer: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    architecture: Option<TinyConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sd: Option<SdSource>,
    sampling: Sampling,
    serving: Serving,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    teacher: Option<String>,
}

impl TryFrom<ManifestFile> for Manifest {
    type Error = String;

    fn try_from(f: ManifestFile) -> Result<Self, String> {
        let source = match f.family {
            Family::Tiny => {
                if f.sd.is_some() {
                    return Err("[sd] belongs to family \"sd\" manifests".into());
                }
                match (f.weights, f.tokenizer, f.architecture) {
                    (Some(weights), Some(tokenizer), Some(architecture)) => {
                        ModelSource::Tiny(TinySource {
                            weights,
                            tokenizer,
                            architecture,
                        })
                    }
                    _ => {
                        return Err(
                            "family \"tiny\" needs `weights`, `tokenizer` and [architecture]"
                                .into(),
                        )
                    }
                }
            }
            Family::Sd => {
                if f.weights.is_some() || f.tokenizer.is_some() || f.architecture.is_some() {
                    return Err(
                        "`weights`, `tokenizer` and [architecture] belong to family \
                                \"tiny\"; an sd manifest names its diffusers directory in [sd]"
                            .into(),
                    );
                }
                ModelSource::Sd(f.sd.ok_or("family \"sd\" needs an [sd] table with `dir`")?)
            }
        };
        let m = Manifest {
            name: f.name,
            description: f.description,
            source,
            sampling: f.sampling,
            serving: f.serving,
            teacher: f.teacher,
            dir: PathBuf::new(),
        };
        m.validate()?;
        Ok(m)
    }
}

impl From<Manifest> for ManifestFile {
    fn from(m: Manifest) -> Self {
        let family = m.family();
        let (weights, tokenizer, architecture, sd) = match m.source {
            ModelSource::Tiny(t) => (
                Some(t.weights),
                Some(t.tokenizer),
                Some(t.architecture),
                None,
            ),
            ModelSource::Sd(s) => (None, None, None, Some(s)),
        };
        ManifestFile {
            name: m.name,
            family,
            description: m.description,
            weights,
            tokenizer,
            architecture,
            sd,
            sampling: m.sampling,
            serving: m.serving,
            teacher: m.teacher,
        }
    }
}

impl Manifest {
    pub fn from_file(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let invalid = |message: String| ManifestError::Invalid {
            path: path.display().to_string(),
            message,
        };
        let file: ManifestFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let mut m = Manifest::try_from(file).map_err(invalid)?;
        m.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        let s = &self.sampling;
        if s.allowed_steps.is_empty() || !s.allowed_steps.contains(&s.default_steps) {
            return Err("sampling.allowed_steps must contain default_steps".into());
        }
        if s.allowed_steps.contains(&0) {
            return Err("sampling.allowed_steps must be at least 1".into());
        }
        if self.serving.max_batch == 0 {
            return Err("serving.max_batch must be at least 1".into());
        }
        if self.serving.sizes.is_empty() || self.serving.frames.is_empty() {
            return Err("serving.sizes and serving.frames must not be empty".into());
        }
        match &self.source {
            ModelSource::Tiny(t) => self.validate_tiny(&t.architecture),
            ModelSource::Sd(_) => self.validate_sd(),
        }
    }

    fn validate_tiny(&self, a: &TinyConfig) -> Result<(), String> {
        if self.sampling.timesteps.is_some() {
            return Err("sampling.timesteps applies to the sd family only".into());
        }
        a.validate()?;
        let m = a.size_multiple();
        for [w, h] in &self.serving.sizes {
            if !w.is_multiple_of(m) || !h.is_multiple_of(m) {
                return Err(format!(
                    "size {w}x{h} is not a multiple of {m} (the denoiser's coarsest grid)"
                ));
            }
        }
        Ok(())
    }

    /// What can be checked without the model directory; sizes against the model's grid are
    /// checked when it loads.
    fn validate_sd(&self) -> Result<(), String> {
        let s = &self.sampling;
        if self.serving.frames != [1] {
            return Err("serving.frames must be [1]: sd models make images".into());
        }
        if s.shift != 1.0 {
            return Err("sampling.shift applies to the tiny family's flow schedule only".into());
        }
        if self.serving.sizes.iter().any(|&[w, h]| w == 0 || h == 0) {
            return Err("serving.sizes must be positive".into());
        }
        if let Some(list) = &s.timesteps {
            if s.sampler == SamplerKind::Euler {
                return Err("sampling.timesteps is for the student and ancestral samplers".into());
            }
            if list.is_empty() || list.windows(2).any(|w| w[0] <= w[1]) {
                return Err(format!(
                    "sampling.timesteps {list:?} must be strictly descending"
                ));
            }
            if !s.allowed_steps.contains(&list.len()) {
                return Err(format!(
                    "sampling.timesteps lists {} steps, which allowed_steps {:?} does not allow",
                    list.len(),
                    s.allowed_steps
                ));
            }
        }
        Ok(())
    }

    pub fn family(&self) -> Family {
        match self.source {
            ModelSource::Tiny(_) => Family::Tiny,
            ModelSource::Sd(_) => Family::Sd,
        }
    }

    pub fn tiny(&self) -> Option<&TinySource> {
        match &self.source {
            ModelSource::Tiny(t) => Some(t),
            ModelSource::Sd(_) => None,
        }
    }

    /// The tiny family's part, or an error saying that `feature` needs it.
    pub fn require_tiny(&self, feature: &str) -> Result<&TinySource, ManifestError> {
        self.tiny().ok_or_else(|| ManifestError::WrongFamily {
            name: self.name.clone(),
            family: self.family(),
            feature: feature.to_string(),
        })
    }

    /// What a reload without a checkpoint reads again: the tiny weights file, or an sd
    /// model's single UNet file when it has one, else its diffusers directory.
    pub fn weights_path(&self) -> PathBuf {
        match &self.source {
            ModelSource::Tiny(t) => self.dir.join(&t.weights),
            ModelSource::Sd(s) => s
                .unet_file(&self.dir)
                .unwrap_or_else(|| s.model_dir(&self.dir)),
        }
    }

    /// The tiny family's tokenizer file.
    pub fn tokenizer_path(&self) -> Result<PathBuf, ManifestError> {
        Ok(self
            .dir
            .join(&self.require_tiny("a tiny tokenizer")?.tokenizer))
    }

    /// Resolves `name`: a `*.toml` path as given, else `<models_dir>/<name>/manifest.toml`,
    /// then `<models_dir>/<name>.toml`.
    pub fn find(models_dir: &Path, name: &str) -> Result<Self, ManifestError> {
        let candidates = if name.ends_with(".toml") {
            vec![PathBuf::from(name)]
        } else {
            vec![
                models_dir.join(name).join("manifest.toml"),
                models_dir.join(format!("{name}.toml")),
            ]
        };
        match candidates.iter().find(|p| p.is_file()) {
            Some(path) => Self::from_file(path),
            None => Err(ManifestError::UnknownModel {
                name: name.to_string(),
                tried: candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Every manifest under `models_dir` (`<dir>/manifest.toml` and `*.toml`), sorted by name.
    pub fn list(models_dir: &Path) -> Result<Vec<Self>, ManifestError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(models_dir).map_err(|source| ManifestError::Read {
            path: models_dir.display().to_string(),
            source,
        })?;
        for e in entries.flatten() {
            let path = e.path();
            let manifest = if path.is_dir() {
                path.join("manifest.toml")
            } else if path.extension().is_some_and(|x| x == "toml") {
                path
            } else {
                continue;
            };
            if manifest.is_file() {
                out.push(Self::from_file(&manifest)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The tiny family's flow schedule.
    pub fn schedule(&self) -> FlowSchedule {
        FlowSchedule {
            shift: self.sampling.shift,
        }
    }
}
