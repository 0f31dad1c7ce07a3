//! Model manifests and loading the model they describe.
//!
//! A manifest is found as `<models_dir>/<name>/manifest.toml`, `<models_dir>/<name>.toml`, or
//! any `*.toml` path. Every manifest has a name, `[sampling]` and `[serving]`; its `family`
//! names the [`Family`] that reads, checks and loads the rest (`crate::families`).

pub mod identity;
mod loaded;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::families::{Capabilities, Family, Section};
use crate::pipeline::{SamplerKind, SamplerParams};

pub use loaded::{check_shapes, LoadedModel};

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
    /// A family's files that do not load; the family's error names the file (and the
    /// tensor, for weights). Shown inline, not as a `source`, so a chain prints it once.
    #[error("model {name}: {error}")]
    Load {
        name: String,
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("model {name}: {message}")]
    Model { name: String, message: String },
    #[error(
        "model {name} is of the {family} family; {feature} supports only the {supported} family"
    )]
    WrongFamily {
        name: String,
        family: String,
        feature: String,
        /// The families that would do, joined.
        supported: String,
    },
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
    /// tiny family: the flow shift of videos (`shift` when absent). A video shows its layout
    /// once per frame, so its path is decided at higher noise than an image's layout; a
    /// teacher trained with the teacher config's `video_shift` samples videos with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_shift: Option<f32>,
    /// sd family, student and ancestral samplers: the student's own descending timestep list
    /// (e.g. DMD2's `[999, 749, 499, 249]`), used when a request asks for that many steps;
    /// other step counts use trailing spacing (`crate::families::sd::DdpmSchedule`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timesteps: Option<Vec<usize>>,
    /// tiny family: `[lo, hi]`, the flow times at which guidance runs; the steps outside it take
    /// the conditional prediction alone. Guidance at low noise sharpens edges past the
    /// renders' (the teacher's README, "Session 22"). Absent: every step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_interval: Option<[f64; 2]>,
    /// Ancestral sampler: the share of fresh noise per step, k-diffusion's `eta` (1, the
    /// default: Euler ancestral; 0: deterministic DDIM; see `NoiseSchedule::ancestral_step`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<f32>,
}

impl Sampling {
    /// The ancestral sampler's `eta` (1 when the manifest leaves it out).
    pub fn eta(&self) -> f32 {
        self.eta.unwrap_or(1.0)
    }

    /// This model's sampler at `steps` and `guidance`: its kind, guidance interval and `eta`.
    pub fn params(&self, steps: usize, guidance: f32) -> SamplerParams {
        SamplerParams {
            kind: self.sampler,
            steps,
            guidance,
            guidance_interval: self.guidance_interval,
            eta: self.eta(),
        }
    }

    /// `eta` only for the ancestral sampler, and a number from 0 up.
    fn check_eta(&self) -> Result<(), String> {
        let Some(eta) = self.eta else {
            return Ok(());
        };
        if self.sampler != SamplerKind::Ancestral {
            return Err("sampling.eta is for the ancestral sampler".into());
        }
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(format!("sampling.eta {eta} must be a number from 0 up"));
        }
        Ok(())
    }

    /// A student's own `timesteps` list: only for the student and ancestral samplers,
    /// strictly descending, and of a length `allowed_steps` allows (families whose schedules
    /// take such a list call this from their `Section::validate`).
    pub fn check_student_timesteps(&self) -> Result<(), String> {
        let Some(list) = &self.timesteps else {
            return Ok(());
        };
        if matches!(self.sampler, SamplerKind::Euler | SamplerKind::UniPc) {
            return Err("sampling.timesteps is for the student and ancestral samplers".into());
        }
        if list.is_empty() || list.windows(2).any(|w| w[0] <= w[1]) {
            return Err(format!(
                "sampling.timesteps {list:?} must be strictly descending"
            ));
        }
        if !self.allowed_steps.contains(&list.len()) {
            return Err(format!(
                "sampling.timesteps lists {} steps, which allowed_steps {:?} does not allow",
                list.len(),
                self.allowed_steps
            ));
        }
        Ok(())
    }
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

/// A parsed, validated manifest: the keys every manifest has, and its family's own part.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub name: String,
    pub description: String,
    family: &'static dyn Family,
    /// The family's keys; see [`Manifest::section`].
    section: Arc<dyn Section>,
    pub sampling: Sampling,
    pub serving: Serving,
    /// For a distilled student: the model (under the same models directory) it was distilled
    /// from, which `fewstep distill` uses as the real teacher when refining it.
    pub teacher: Option<String>,
    /// Directory the manifest was read from (set on load; relative paths start there).
    pub dir: PathBuf,
}

/// The keys every manifest has; the rest belong to its family.
#[derive(Deserialize)]
struct Shared {
    name: String,
    family: String,
    #[serde(default)]
    description: String,
    sampling: Sampling,
    serving: Serving,
    #[serde(default)]
    teacher: Option<String>,
}

const SHARED_KEYS: &[&str] = &[
    "name",
    "family",
    "description",
    "sampling",
    "serving",
    "teacher",
];

/// Why a top-level key that is neither shared nor the family's own is refused.
fn foreign_key(family: &dyn Family, key: &str, value: &toml::Value) -> String {
    let shown = match value {
        toml::Value::Table(_) => format!("[{key}]"),
        _ => format!("`{key}`"),
    };
    match crate::families::FAMILIES
        .iter()
        .find(|f| f.keys().contains(&key))
    {
        Some(owner) => format!(
            "{shown} belongs to family \"{owner}\" manifests, not to family \"{family}\" ones"
        ),
        None => {
            let known: Vec<String> = SHARED_KEYS
                .iter()
                .chain(family.keys())
                .map(|k| format!("`{k}`"))
                .collect();
            format!(
                "unknown field `{key}`, expected one of {}",
                known.join(", ")
            )
        }
    }
}

impl Manifest {
    /// Parses and validates a manifest's TOML text (`dir` is left empty).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let keys: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let shared: Shared = toml::from_str(text).map_err(|e| e.to_string())?;
        let family = crate::families::find(&shared.family).ok_or_else(|| {
            let known: Vec<String> = crate::families::FAMILIES
                .iter()
                .map(|f| format!("`{f}`"))
                .collect();
            format!(
                "unknown family `{}`, expected one of {}",
                shared.family,
                known.join(", ")
            )
        })?;
        if let Some((key, value)) = keys.iter().find(|(k, _)| {
            !SHARED_KEYS.contains(&k.as_str()) && !family.keys().contains(&k.as_str())
        }) {
            return Err(foreign_key(family, key, value));
        }
        let m = Manifest {
            name: shared.name,
            description: shared.description,
            family,
            section: Arc::from(family.parse(text)?),
            sampling: shared.sampling,
            serving: shared.serving,
            teacher: shared.teacher,
            dir: PathBuf::new(),
        };
        m.validate()?;
        Ok(m)
    }

    pub fn from_file(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut m = Manifest::from_toml(&text).map_err(|message| ManifestError::Invalid {
            path: path.display().to_string(),
            message,
        })?;
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
        s.check_eta()?;
        if self.serving.max_batch == 0 {
            return Err("serving.max_batch must be at least 1".into());
        }
        if self.serving.sizes.is_empty() || self.serving.frames.is_empty() {
            return Err("serving.sizes and serving.frames must not be empty".into());
        }
        self.section.validate(&self.sampling, &self.serving)
    }

    /// The keys in the order a manifest is written: the shared ones first, then the
    /// family's, then the shared tables.
    fn to_table(&self) -> Result<toml::Table, toml::ser::Error> {
        let mut t = toml::Table::new();
        t.insert("name".into(), self.name.clone().into());
        t.insert("family".into(), self.family.name().into());
        t.insert("description".into(), self.description.clone().into());
        for (key, value) in self.section.to_toml()? {
            t.insert(key.into(), value);
        }
        t.insert("sampling".into(), toml::Value::try_from(&self.sampling)?);
        t.insert("serving".into(), toml::Value::try_from(&self.serving)?);
        if let Some(teacher) = &self.teacher {
            t.insert("teacher".into(), teacher.clone().into());
        }
        Ok(t)
    }

    pub fn family(&self) -> &'static dyn Family {
        self.family
    }

    /// The family's part of the manifest as its own type `T` (`None` for another family's).
    pub fn section<T: 'static>(&self) -> Option<&T> {
        crate::families::contract::AnyEq::as_any(&*self.section).downcast_ref()
    }

    /// A manifest of the same family with another section (a student's file names, say).
    pub fn with_section(mut self, section: impl Section) -> Self {
        self.section = Arc::new(section);
        self
    }

    /// The family's architecture hash (see [`Section::architecture`]).
    pub fn architecture(&self, tensors: &[(&String, &[usize])]) -> String {
        self.section.architecture(tensors)
    }

    /// An error saying that `feature` needs a family with a capability this one lacks.
    pub fn unsupported(&self, feature: &str, has: impl Fn(Capabilities) -> bool) -> ManifestError {
        ManifestError::WrongFamily {
            name: self.name.clone(),
            family: self.family.name().into(),
            feature: feature.into(),
            supported: crate::families::names_with(has).join(" or "),
        }
    }

    /// Checks that the family has a capability `feature` needs.
    pub fn require(
        &self,
        feature: &str,
        has: impl Fn(Capabilities) -> bool,
    ) -> Result<(), ManifestError> {
        if has(self.family.capabilities()) {
            Ok(())
        } else {
            Err(self.unsupported(feature, has))
        }
    }

    /// What a reload without a checkpoint reads again (the family's weights file or
    /// directory).
    pub fn weights_path(&self) -> PathBuf {
        self.section.weights_path(&self.dir)
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
}

impl PartialEq for Manifest {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.description == other.description
            && self.family.name() == other.family.name()
            && *self.section == *other.section
            && self.sampling == other.sampling
            && self.serving == other.serving
            && self.teacher == other.teacher
            && self.dir == other.dir
    }
}

/// Written through the family (a manifest is read with [`Manifest::from_toml`]).
impl Serialize for Manifest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_table()
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}
