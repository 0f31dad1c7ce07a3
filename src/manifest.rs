//! Model manifests (`models/<name>/manifest.toml`) and loading the model they describe.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::families::tiny::{TinyConfig, TinyModel, TinyTokenizer};
use crate::pipeline::{BatchResult, BatchSpec, FlowSchedule, SamplerKind, SamplerParams};

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
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] crate::families::tiny::tokenizer::TokenizerError),
    #[error("no model named {name:?} under {dir}")]
    UnknownModel { name: String, dir: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Tiny,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub family: Family,
    #[serde(default)]
    pub description: String,
    /// Weights file, relative to the manifest's directory.
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
    pub architecture: TinyConfig,
    pub sampling: Sampling,
    pub serving: Serving,
    /// For a distilled student: the model (under the same models directory) it was distilled
    /// from, which `fewstep distill` uses as the real teacher when refining it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<String>,
    /// Directory the manifest was read from (set on load).
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Manifest {
    pub fn from_file(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut m: Manifest = toml::from_str(&text).map_err(|e| ManifestError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        m.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        m.validate().map_err(|message| ManifestError::Invalid {
            path: path.display().to_string(),
            message,
        })?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), String> {
        let s = &self.sampling;
        if s.allowed_steps.is_empty() || !s.allowed_steps.contains(&s.default_steps) {
            return Err("sampling.allowed_steps must contain default_steps".into());
        }
        if self.serving.max_batch == 0 {
            return Err("serving.max_batch must be at least 1".into());
        }
        if self.serving.sizes.is_empty() || self.serving.frames.is_empty() {
            return Err("serving.sizes and serving.frames must not be empty".into());
        }
        let a = &self.architecture;
        if !a.dim.is_multiple_of(a.heads) || !a.text_dim.is_multiple_of(a.heads) {
            return Err("architecture: dim and text_dim must be multiples of heads".into());
        }
        for [w, h] in &self.serving.sizes {
            if !w.is_multiple_of(a.patch) || !h.is_multiple_of(a.patch) {
                return Err(format!("size {w}x{h} is not a multiple of the patch size"));
            }
        }
        Ok(())
    }

    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(&self.weights)
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(&self.tokenizer)
    }

    /// Reads `<models_dir>/<name>/manifest.toml`.
    pub fn find(models_dir: &Path, name: &str) -> Result<Self, ManifestError> {
        let path = models_dir.join(name).join("manifest.toml");
        if !path.is_file() {
            return Err(ManifestError::UnknownModel {
                name: name.to_string(),
                dir: models_dir.display().to_string(),
            });
        }
        Self::from_file(&path)
    }

    /// Every manifest under `models_dir`, sorted by name.
    pub fn list(models_dir: &Path) -> Result<Vec<Self>, ManifestError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(models_dir).map_err(|source| ManifestError::Read {
            path: models_dir.display().to_string(),
            source,
        })?;
        for e in entries.flatten() {
            let p = e.path().join("manifest.toml");
            if p.is_file() {
                out.push(Self::from_file(&p)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// A model resident on a device, ready to run batches.
#[derive(Clone)]
pub struct LoadedModel {
    pub manifest: Manifest,
    /// Content hash of the weights (`random-<seed>` for untrained random weights).
    pub version: String,
    pub trained: bool,
    pub model: TinyModel,
}

impl LoadedModel {
    /// Loads the manifest's weights file.
    pub fn load(manifest: &Manifest, device: &Device) -> Result<Self, ManifestError> {
        Self::load_weights(manifest, &manifest.weights_path(), device)
    }

    /// Loads `weights` (a safetensors file) into the manifest's architecture: used for the
    /// manifest's own file and for hot reloads of a new checkpoint.
    pub fn load_weights(
        manifest: &Manifest,
        weights: &Path,
        device: &Device,
    ) -> Result<Self, ManifestError> {
        if !weights.is_file() {
            return Err(ManifestError::MissingWeights {
                path: weights.display().to_string(),
            });
        }
        let werr = |message: String| ManifestError::Weights {
            path: weights.display().to_string(),
            message,
        };
        let bytes = std::fs::read(weights).map_err(|e| werr(e.to_string()))?;
        let version = crate::util::sha256_hex(&bytes)[..16].to_string();
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)
            .map_err(|e| werr(e.to_string()))?;
        let tokenizer = TinyTokenizer::from_file(&manifest.tokenizer_path())?;
        let model = TinyModel::new(vb, &manifest.architecture, tokenizer, manifest.schedule())
            .map_err(|e| werr(e.to_string()))?;
        Ok(Self {
            manifest: manifest.clone(),
            version,
            trained: true,
            model,
        })
    }

    /// Random weights (deterministic from `seed`), for tests and for serving before a model
    /// has been trained. Reported as untrained.
    pub fn random(manifest: &Manifest, seed: u64, device: &Device) -> Result<Self, ManifestError> {
        let tokenizer = TinyTokenizer::from_file(&manifest.tokenizer_path())?;
        let werr = |e: candle_core::Error| ManifestError::Weights {
            path: "<random>".into(),
            message: e.to_string(),
        };
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, seed, DType::F32, device);
        TinyModel::new(
            vb,
            &manifest.architecture,
            tokenizer.clone(),
            manifest.schedule(),
        )
        .map_err(werr)?;
        // Rebuild from plain tensors: a model over `Var`s would record a graph on every
        // forward pass, which serving never needs.
        let tensors = crate::train::named_vars(&map)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = TinyModel::new(vb, &manifest.architecture, tokenizer, manifest.schedule())
            .map_err(werr)?;
        Ok(Self {
            manifest: manifest.clone(),
            version: format!("random-{seed}"),
            trained: false,
            model,
        })
    }

    pub fn generate(
        &self,
        spec: &BatchSpec,
        steps: usize,
        guidance: f32,
    ) -> candle_core::Result<BatchResult> {
        let params = SamplerParams {
            kind: self.manifest.sampling.sampler,
            steps,
            guidance,
        };
        self.model.generate(spec, params)
    }
}

impl Manifest {
    pub fn schedule(&self) -> FlowSchedule {
        FlowSchedule {
            shift: self.sampling.shift,
        }
    }
}
