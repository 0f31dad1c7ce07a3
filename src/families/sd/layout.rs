//! A Stable Diffusion model directory in the diffusers layout: `model_index.json` and one folder
//! per component, with safetensors weights. A single UNet file (a DMD2 or Lightning checkpoint)
//! may replace the weights in `unet/`; its architecture still comes from `unet/config.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Everything that can go wrong reading a model directory. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: not found ({what})", path.display())]
    Missing { path: PathBuf, what: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: unsupported: {message}", path.display())]
    Unsupported { path: PathBuf, message: String },
    /// The UNet's config (its own error names the file); boxed, as it is large.
    #[error(transparent)]
    UNet(Box<super::unet::UNetError>),
    /// A missing tensor, a wrong shape or an unreadable safetensors file; candle's message
    /// names the tensor.
    #[error("{files}: {source}")]
    Weights {
        files: String,
        #[source]
        source: candle_core::Error,
    },
}

impl From<super::unet::UNetError> for LoadError {
    fn from(e: super::unet::UNetError) -> Self {
        Self::UNet(Box::new(e))
    }
}

impl LoadError {
    fn missing(path: &Path, what: impl Into<String>) -> Self {
        Self::Missing {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, message: impl Into<String>) -> Self {
        Self::Unsupported {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// candle attaches a backtrace to errors when `RUST_BACKTRACE` is set; a start-up error about a
/// tensor reads better without it.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        other => other,
    }
}

/// Reads and parses a JSON file, naming it in every error.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            LoadError::missing(path, "JSON file")
        } else {
            LoadError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// A component's `config.json` and its safetensors weights (one file, or the shards of an index).
#[derive(Debug, Clone)]
pub struct ComponentFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
}

/// Base name of the weights file: diffusers models and transformers models differ.
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model";
pub const TRANSFORMERS_WEIGHTS: &str = "model";

impl ComponentFiles {
    /// Finds `config.json` and `<stem>.safetensors` (or its fp16 variant, or a sharded index)
    /// in `dir`.
    pub fn locate(dir: &Path, stem: &str) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::missing(dir, "component directory"));
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(LoadError::missing(&config, "component config"));
        }
        Ok(Self {
            config,
            weights: locate_weights(dir, stem)?,
        })
    }

    /// The weights as a `VarBuilder` (tensors read into memory, converted to `dtype`).
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, LoadError> {
        let mut all: HashMap<String, Tensor> = HashMap::new();
        for path in &self.weights {
            let tensors =
                candle_core::safetensors::load(path, device).map_err(|e| LoadError::Weights {
                    files: path.display().to_string(),
                    source: without_backtrace(e),
                })?;
            all.extend(tensors);
        }
        Ok(VarBuilder::from_tensors(all, dtype, device))
    }

    /// Wraps an error raised while building a model from these weights (a missing tensor, a
    /// wrong shape) with the file names.
    pub fn weights_error(&self, source: candle_core::Error) -> LoadError {
        let files = self
            .weights
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        LoadError::Weights {
            files,
            source: without_backtrace(source),
        }
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

fn locate_weights(dir: &Path, stem: &str) -> Result<Vec<PathBuf>, LoadError> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(vec![path]);
        }
    }
    for name in [
        format!("{stem}.safetensors.index.json"),
        format!("{stem}.safetensors.index.fp16.json"),
    ] {
        let index_path = dir.join(name);
        if index_path.is_file() {
            let index: ShardIndex = read_json(&index_path)?;
            let shards: BTreeSet<&String> = index.weight_map.values().collect();
            let mut files = Vec::with_capacity(shards.len());
            for shard in shards {
                let path = dir.join(shard);
                if !path.is_file() {
                    return Err(LoadError::missing(
                        &path,
                        format!("shard listed in {}", index_path.display()),
                    ));
                }
                files.push(path);
            }
            return Ok(files);
        }
    }
    let bin = dir.join(format!("{stem}.bin"));
    if bin.is_file() {
        return Err(LoadError::unsupported(
            &bin,
            "PyTorch pickle weights; convert them to safetensors",
        ));
    }
    Err(LoadError::missing(
        &dir.join(format!("{stem}.safetensors")),
        "model weights",
    ))
}

/// A tokenizer folder: `tokenizer.json` (the fast tokenizer) and the optional configs.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    pub tokenizer_json: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub special_tokens_map: Option<PathBuf>,
}

impl TokenizerFiles {
    pub fn locate(dir: &Path) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::missing(dir, "tokenizer directory"));
        }
        let tokenizer_json = dir.join("tokenizer.json");
        if !tokenizer_json.is_file() {
            return Err(LoadError::missing(
                &tokenizer_json,
                "fast tokenizer file (save the tokenizer with a transformers version that writes tokenizer.json)",
            ));
        }
        let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
        Ok(Self {
            tokenizer_json,
            tokenizer_config: optional("tokenizer_config.json"),
            special_tokens_map: optional("special_tokens_map.json"),
        })
    }
}

/// How the model's output is read (diffusers' `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    #[default]
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    #[default]
    Linear,
    ScaledLinear,
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}

/// The noise schedule of `scheduler/scheduler_config.json` (DDPM, DDIM, Euler, LCM ... configs
/// all carry it). Sampler-specific fields (`timestep_spacing`, `steps_offset`, ...) are read
/// when known and otherwise ignored; defaults are diffusers' `DDPMScheduler` defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default)]
    pub beta_schedule: BetaSchedule,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    rescale_betas_zero_snr: bool,
}

impl SchedulerConfig {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let cfg: Self = read_json(path)?;
        if cfg.num_train_timesteps < 2 {
            return Err(LoadError::invalid(path, "num_train_timesteps must be >= 2"));
        }
        if let Some(b) = &cfg.trained_betas {
            if b.len() != cfg.num_train_timesteps {
                return Err(LoadError::invalid(
                    path,
                    format!(
                        "trained_betas has {} values, num_train_timesteps is {}",
                        b.len(),
                        cfg.num_train_timesteps
                    ),
                ));
            }
        }
        if cfg.rescale_betas_zero_snr {
            return Err(LoadError::unsupported(path, "rescale_betas_zero_snr: true"));
        }
        Ok(cfg)
    }

    /// `betas` as diffusers builds them: an f32 `torch.linspace` of the betas (linear) or of
    /// their square roots, then squared (scaled_linear).
    pub fn betas(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        if let Some(b) = &self.trained_betas {
            return b.iter().map(|&v| v as f32).collect();
        }
        match self.beta_schedule {
            BetaSchedule::Linear => linspace_f32(self.beta_start, self.beta_end, n),
            BetaSchedule::ScaledLinear => {
                linspace_f32(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|v| v * v)
                    .collect()
            }
        }
    }

    /// `alphas_cumprod[t] = prod_{s <= t} (1 - beta_s)`, computed as torch does on the CPU:
    /// f32 alphas, the running product accumulated in f64 (torch's CPU accumulation type for
    /// f32) and each entry rounded to f32; returned widened to f64. torch's vectorized
    /// `linspace` rounds some betas one ulp differently from its scalar formula used here, so
    /// entries can differ from diffusers' by a few f32 ulps (< 3e-7 relative on the fixtures).
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let mut acc = 1f64;
        self.betas()
            .into_iter()
            .map(|b| {
                acc *= (1f32 - b) as f64;
                acc as f32 as f64
            })
            .collect()
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` by its scalar CPU formula: the first half
/// counts up from `start`, the second half down from `end`, all in f32. (The SIMD path, which
/// torch takes for most entries, fuses some multiply-adds, so it is not reproducible here
/// across CPUs and torch versions.)
fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// One entry of `model_index.json`: `["diffusers", "UNet2DConditionModel"]`, or nulls for a
/// component the pipeline does not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentDecl {
    pub library: Option<String>,
    pub class: Option<String>,
}

/// The parsed `model_index.json`.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    pub class_name: String,
    pub components: HashMap<String, ComponentDecl>,
}

impl ModelIndex {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let raw: serde_json::Map<String, serde_json::Value> = read_json(path)?;
        let class_name = raw
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| LoadError::invalid(path, "no \"_class_name\""))?
            .to_string();
        let mut components = HashMap::new();
        for (key, value) in &raw {
            // Components are the `[library, class]` pairs; the rest are pipeline options.
            let Some([lib, class]) = value.as_array().map(|a| a.as_slice()) else {
                continue;
            };
            let as_name = |v: &serde_json::Value| v.as_str().map(str::to_string);
            if (lib.is_null() || lib.is_string()) && (class.is_null() || class.is_string()) {
                components.insert(
                    key.clone(),
                    ComponentDecl {
                        library: as_name(lib),
                        class: as_name(class),
                    },
                );
            }
        }
        Ok(Self {
            class_name,
            components,
        })
    }

    /// The declaration of `name`, if the pipeline uses that component (not `[null, null]`).
    pub fn component(&self, name: &str) -> Option<&ComponentDecl> {
        self.components.get(name).filter(|c| c.class.is_some())
    }
}

/// A validated model directory: every file the SD family needs exists.
#[derive(Debug, Clone)]
pub struct SdLayout {
    pub root: PathBuf,
    pub index: ModelIndex,
    /// `unet/config.json` with the weights of `unet/` or of the single UNet file.
    pub unet: ComponentFiles,
    pub vae: ComponentFiles,
    pub text_encoder: ComponentFiles,
    pub tokenizer: TokenizerFiles,
    /// SDXL's second encoder (`CLIPTextModelWithProjection`) and its tokenizer.
    pub text_encoder_2: Option<ComponentFiles>,
    pub tokenizer_2: Option<TokenizerFiles>,
    pub scheduler: SchedulerConfig,
}

impl SdLayout {
    /// Opens `root`; `unet_file`, when given, replaces the weights in `unet/`.
    pub fn open(root: &Path, unet_file: Option<&Path>) -> Result<Self, LoadError> {
        if !root.is_dir() {
            return Err(LoadError::missing(root, "model directory"));
        }
        let index_path = root.join("model_index.json");
        let index = ModelIndex::load(&index_path)?;
        let require = |name: &str| -> Result<PathBuf, LoadError> {
            if index.component(name).is_none() {
                return Err(LoadError::invalid(
                    &index_path,
                    format!("the pipeline declares no \"{name}\" component"),
                ));
            }
            Ok(root.join(name))
        };

        let unet_dir = require("unet")?;
        let unet = match unet_file {
            None => ComponentFiles::locate(&unet_dir, DIFFUSERS_WEIGHTS)?,
            Some(file) => single_unet(&unet_dir, file)?,
        };
        let vae = ComponentFiles::locate(&require("vae")?, DIFFUSERS_WEIGHTS)?;
        let text_encoder = ComponentFiles::locate(&require("text_encoder")?, TRANSFORMERS_WEIGHTS)?;
        let tokenizer = TokenizerFiles::locate(&require("tokenizer")?)?;
        let scheduler =
            SchedulerConfig::load(&require("scheduler")?.join("scheduler_config.json"))?;

        let (text_encoder_2, tokenizer_2) = match index.component("text_encoder_2") {
            None => (None, None),
            Some(_) => (
                Some(ComponentFiles::locate(
                    &root.join("text_encoder_2"),
                    TRANSFORMERS_WEIGHTS,
                )?),
                Some(TokenizerFiles::locate(&require("tokenizer_2")?)?),
            ),
        };

        Ok(Self {
            root: root.to_path_buf(),
            index,
            unet,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            scheduler,
        })
    }

    /// SDXL pipelines have the second text encoder.
    pub fn is_xl(&self) -> bool {
        self.text_encoder_2.is_some()
    }
}

fn single_unet(unet_dir: &Path, file: &Path) -> Result<ComponentFiles, LoadError> {
    if !file.is_file() {
        return Err(LoadError::missing(file, "single UNet weights file"));
    }
    if file.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(LoadError::unsupported(
            file,
            "the single UNet file must be .safetensors",
        ));
    }
    let config = unet_dir.join("config.json");
    if !config.is_file() {
        return Err(LoadError::missing(
            &config,
            "UNet config (needed for the single UNet file's architecture)",
        ));
    }
    Ok(ComponentFiles {
        config,
        weights: vec![file.to_path_buf()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("fewstep-sd-layout-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// A minimal SD-style directory with empty weight files (the layout does not read them).
    fn fake_model(root: &Path, xl: bool) {
        let mut index = serde_json::json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.30.0",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "safety_checker": [null, null],
            "requires_safety_checker": false,
        });
        let mut dirs = vec![
            ("unet", DIFFUSERS_WEIGHTS),
            ("vae", DIFFUSERS_WEIGHTS),
            ("text_encoder", TRANSFORMERS_WEIGHTS),
        ];
        if xl {
            index["text_encoder_2"] =
                serde_json::json!(["transformers", "CLIPTextModelWithProjection"]);
            index["tokenizer_2"] = serde_json::json!(["transformers", "CLIPTokenizer"]);
            dirs.push(("text_encoder_2", TRANSFORMERS_WEIGHTS));
        }
        write(&root.join("model_index.json"), &index.to_string());
        for (dir, stem) in dirs {
            write(&root.join(dir).join("config.json"), "{}");
            write(&root.join(dir).join(format!("{stem}.safetensors")), "");
        }
        for tok in ["tokenizer", "tokenizer_2"] {
            write(&root.join(tok).join("tokenizer.json"), "{}");
        }
        write(
            &root.join("scheduler/scheduler_config.json"),
            r#"{"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000,
                "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "prediction_type": "v_prediction", "timestep_spacing": "trailing",
                "interpolation_type": "linear", "steps_offset": 1}"#,
        );
    }

    #[test]
    fn opens_sd_and_sdxl_layouts() {
        let root = scratch("ok");
        fake_model(&root, false);
        let sd = SdLayout::open(&root, None).unwrap();
        assert!(!sd.is_xl());
        assert!(sd.index.component("safety_checker").is_none());
        assert_eq!(sd.scheduler.prediction_type, PredictionType::VPrediction);
        assert_eq!(sd.scheduler.timestep_spacing.as_deref(), Some("trailing"));
        assert_eq!(sd.scheduler.steps_offset, 1);

        let xl_root = scratch("xl");
        fake_model(&xl_root, true);
        let xl = SdLayout::open(&xl_root, None).unwrap();
        assert!(xl.is_xl());
        assert_eq!(
            xl.index
                .component("text_encoder_2")
                .unwrap()
                .class
                .as_deref(),
            Some("CLIPTextModelWithProjection")
        );

        // A single UNet file replaces unet/'s weights; its config stays.
        let single = xl_root.join("dmd2_unet.safetensors");
        write(&single, "");
        let l = SdLayout::open(&xl_root, Some(&single)).unwrap();
        assert_eq!(l.unet.weights, vec![single.clone()]);
        assert_eq!(l.unet.config, xl_root.join("unet/config.json"));
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&xl_root).unwrap();
    }

    #[test]
    fn missing_files_are_named() {
        let root = scratch("missing");
        fake_model(&root, true);
        let cases = [
            (
                "vae/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors",
            ),
            ("text_encoder_2/config.json", "text_encoder_2/config.json"),
            ("tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer.json"),
            (
                "scheduler/scheduler_config.json",
                "scheduler/scheduler_config.json",
            ),
            ("model_index.json", "model_index.json"),
        ];
        for (remove, named) in cases {
            let path = root.join(remove);
            let saved = std::fs::read(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            let err = SdLayout::open(&root, None).unwrap_err().to_string();
            assert!(err.contains(named), "{remove}: {err}");
            assert!(err.contains("not found"), "{remove}: {err}");
            std::fs::write(&path, saved).unwrap();
        }
        let err = SdLayout::open(&root, Some(&root.join("nope.safetensors")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.safetensors"), "{err}");
        // .bin-only weights get a pointed message.
        std::fs::remove_file(root.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
        write(&root.join("vae/diffusion_pytorch_model.bin"), "");
        let err = SdLayout::open(&root, None).unwrap_err().to_string();
        assert!(
            err.contains("diffusion_pytorch_model.bin") && err.contains("safetensors"),
            "{err}"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bad_scheduler_configs_are_rejected() {
        let root = scratch("sched");
        let path = root.join("scheduler_config.json");
        write(&path, r#"{"beta_schedule": "squaredcos_cap_v2"}"#);
        let err = SchedulerConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("scheduler_config.json") && err.contains("squaredcos_cap_v2"),
            "{err}"
        );
        write(&path, r#"{"prediction_type": "flow"}"#);
        assert!(SchedulerConfig::load(&path).is_err());
        // Defaults are DDPM's.
        write(&path, "{}");
        let cfg = SchedulerConfig::load(&path).unwrap();
        assert_eq!(cfg.num_train_timesteps, 1000);
        assert_eq!(cfg.beta_schedule, BetaSchedule::Linear);
        assert_eq!(cfg.prediction_type, PredictionType::Epsilon);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn fixture_layouts_open_and_alphas_cumprod_matches_the_schedulers() {
        use crate::families::sd::testing::fixture;
        for name in ["sd15-tiny", "sd2-tiny", "sdxl-tiny"] {
            let fx = fixture(name);
            let layout = SdLayout::open(&fx.dir, None).unwrap();
            assert_eq!(layout.is_xl(), name == "sdxl-tiny");
            let want: Vec<f32> = fx.tensor("pipeline.alphas_cumprod").to_vec1().unwrap();
            let got = layout.scheduler.alphas_cumprod();
            let worst = got
                .iter()
                .zip(&want)
                .map(|(&g, &w)| ((g - w as f64) / w as f64).abs())
                .fold(0f64, f64::max);
            eprintln!("{name} alphas_cumprod: max relative diff {worst:.3e}");
            assert!(worst < 5e-7, "{name}: {worst}");
        }
    }

    #[test]
    fn alphas_cumprod_matches_diffusers() {
        let cfg: SchedulerConfig = serde_json::from_str(
            r#"{"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear"}"#,
        )
        .unwrap();
        let betas = cfg.betas();
        assert!((betas[0] - 0.00085).abs() < 1e-10);
        assert!((betas[999] - 0.012).abs() < 1e-9);
        // scaled_linear is quadratic in t, not linear: the midpoint is below the mean.
        let mid = ((0.00085f64.sqrt() + 0.012f64.sqrt()) / 2.0).powi(2);
        assert!((betas[500] as f64 - mid).abs() < 2e-5, "{}", betas[500]);
        let a = cfg.alphas_cumprod();
        assert_eq!(a.len(), 1000);
        assert!(a.windows(2).all(|w| w[1] < w[0]));
        // The same schedule computed entirely in f64 agrees to f32 rounding.
        for (t, want) in [
            (0, 0.99915),
            (249, 0.675432),
            (499, 0.277670),
            (999, 0.00466010),
        ] {
            assert!((a[t] - want).abs() < 1e-5 * want, "a[{t}] = {}", a[t]);
        }
        let lin: SchedulerConfig =
            serde_json::from_str(r#"{"beta_start": 0.0001, "beta_end": 0.02}"#).unwrap();
        let b = lin.betas();
        assert!((b[1] - b[0] - (0.02 - 0.0001) / 999.0).abs() < 1e-8);
    }
}
