//! The `[wan]` table of a Wan manifest: where the diffusers directory (and an optional single
//! transformer file, a distilled student) is, the precision, and the text settings.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::families::sd::manifest::{env_path, WeightDtype};
use crate::families::Section;
use crate::manifest::identity::shapes_hash;
use crate::manifest::{Manifest, Sampling, Serving};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WanSource {
    /// The diffusers directory (`transformer/`, `text_encoder/`, `tokenizer/`, `vae/`,
    /// `scheduler/`), relative to the manifest's directory or absolute.
    pub dir: PathBuf,
    /// An environment variable that, when set and not empty, replaces `dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir_env: Option<String>,
    /// A single transformer safetensors file (a distilled student) replacing the weights in
    /// `transformer/` (whose `config.json` still describes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformer_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformer_file_env: Option<String>,
    /// Transformer and text encoder: f32 on the CPU; bf16 (or f16) on CUDA.
    #[serde(default)]
    pub dtype: WeightDtype,
    /// The VAE (default: `dtype`; the CPU has no bf16 convolution).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae_dtype: Option<WeightDtype>,
    /// Prompt tokens the transformer sees (`max_sequence_length`; Wan: 512).
    #[serde(default = "default_text_max_len")]
    pub text_max_len: usize,
    /// Prompt encodings kept on the device (0: none).
    #[serde(default = "default_prompt_cache")]
    pub prompt_cache: usize,
}

fn default_text_max_len() -> usize {
    super::text::DEFAULT_MAX_LEN
}
fn default_prompt_cache() -> usize {
    super::text::DEFAULT_CACHE_PROMPTS
}

impl WanSource {
    pub const KEYS: &'static [&'static str] = &["wan"];

    pub fn model_dir(&self, manifest_dir: &Path) -> PathBuf {
        env_path(&self.dir_env).unwrap_or_else(|| manifest_dir.join(&self.dir))
    }

    pub fn transformer_file(&self, manifest_dir: &Path) -> Option<PathBuf> {
        env_path(&self.transformer_file_env)
            .or_else(|| self.transformer_file.as_ref().map(|f| manifest_dir.join(f)))
    }

    pub fn vae_dtype(&self) -> WeightDtype {
        self.vae_dtype.unwrap_or(self.dtype)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Keys {
            wan: Option<WanSource>,
        }
        let keys: Keys = toml::from_str(text).map_err(|e| e.to_string())?;
        keys.wan
            .ok_or_else(|| "family \"wan\" needs a [wan] table with `dir`".into())
    }

    pub fn of(manifest: &Manifest) -> Option<&Self> {
        manifest.section::<Self>()
    }
}

impl Section for WanSource {
    fn to_toml(&self) -> Result<Vec<(&'static str, toml::Value)>, toml::ser::Error> {
        Ok(vec![("wan", toml::Value::try_from(self)?)])
    }

    /// What can be checked without the directory; sizes against the model's grid are
    /// checked when it loads.
    fn validate(&self, s: &Sampling, serving: &Serving) -> Result<(), String> {
        if let Some(f) = serving.frames.iter().find(|&&f| f % 4 != 1) {
            return Err(format!(
                "serving.frames {f}: Wan makes 4k+1 frames (1, 5, 9, ..., 81)"
            ));
        }
        if serving.sizes.iter().any(|&[w, h]| w == 0 || h == 0) {
            return Err("serving.sizes must be positive".into());
        }
        if s.guidance_interval.is_some() {
            return Err("sampling.guidance_interval applies to the tiny family only".into());
        }
        if s.shift != 1.0 || s.video_shift.is_some() {
            return Err(
                "sampling.shift applies to the tiny family; Wan's shift is its scheduler's \
                 flow_shift"
                    .into(),
            );
        }
        if self.text_max_len < 2 {
            return Err(format!(
                "wan.text_max_len {} must be at least 2",
                self.text_max_len
            ));
        }
        s.check_student_timesteps()
    }

    fn weights_path(&self, dir: &Path) -> PathBuf {
        self.transformer_file(dir)
            .unwrap_or_else(|| self.model_dir(dir))
    }

    fn architecture(&self, tensors: &[(&String, &[usize])]) -> String {
        shapes_hash(tensors.iter().copied())
    }
}
