//! The `[sd]` table of a Stable Diffusion manifest: where the diffusers directory (and an
//! optional single UNet file) is, and the precision to run it in.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl WeightDtype {
    pub fn dtype(self) -> DType {
        match self {
            WeightDtype::F32 => DType::F32,
            WeightDtype::F16 => DType::F16,
            WeightDtype::Bf16 => DType::BF16,
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
            WeightDtype::Bf16 => "bf16",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdSource {
    /// The diffusers directory (`model_index.json`, `unet/`, `vae/`, ...), relative to the
    /// manifest's directory or absolute.
    pub dir: PathBuf,
    /// An environment variable that, when set and not empty, replaces `dir` (relative values
    /// start at the working directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir_env: Option<String>,
    /// A single UNet safetensors file (a DMD2 checkpoint, say) replacing the weights in
    /// `unet/`, relative to the manifest's directory or absolute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unet_file: Option<PathBuf>,
    /// An environment variable that, when set and not empty, replaces `unet_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unet_file_env: Option<String>,
    /// Text encoders and UNet: f32 on the CPU; f16 or bf16 on CUDA.
    #[serde(default)]
    pub dtype: WeightDtype,
    /// The VAE (default: `dtype`). SDXL's VAE overflows in f16: use f32 or bf16 for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae_dtype: Option<WeightDtype>,
}

/// The value of environment variable `name`, if set and not empty.
fn env_path(name: &Option<String>) -> Option<PathBuf> {
    let value = std::env::var_os(name.as_ref()?)?;
    (!value.is_empty()).then(|| PathBuf::from(value))
}

impl SdSource {
    /// The diffusers directory, `manifest_dir`-relative unless absolute or from `dir_env`.
    pub fn model_dir(&self, manifest_dir: &Path) -> PathBuf {
        env_path(&self.dir_env).unwrap_or_else(|| manifest_dir.join(&self.dir))
    }

    /// The single UNet file, if any.
    pub fn unet_file(&self, manifest_dir: &Path) -> Option<PathBuf> {
        env_path(&self.unet_file_env)
            .or_else(|| self.unet_file.as_ref().map(|f| manifest_dir.join(f)))
    }

    pub fn vae_dtype(&self) -> WeightDtype {
        self.vae_dtype.unwrap_or(self.dtype)
    }
}
