//! The `[sd]` table of a Stable Diffusion manifest (the sd family's part of it): where the diffusers directory (and an
//! optional single UNet file) is, and the precision to run it in.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::families::Section;
use crate::manifest::identity::shapes_hash;
use crate::manifest::{Manifest, Sampling, Serving};

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

/// Why `dtype` (model) and `vae` cannot run on `device`: the CPU runs f32 only (candle has
/// no bf16 convolution there, and half precision would only be slower).
pub(crate) fn device_refuses(
    dtype: WeightDtype,
    vae: WeightDtype,
    device: &candle_core::Device,
) -> Option<String> {
    (device.is_cpu() && (dtype.dtype() != DType::F32 || vae.dtype() != DType::F32)).then(|| {
        format!("dtype {dtype} (vae {vae}) is for CUDA devices; use dtype = \"f32\" on the CPU")
    })
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
pub(crate) fn env_path(name: &Option<String>) -> Option<PathBuf> {
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

    pub const KEYS: &'static [&'static str] = &["sd"];

    pub fn parse(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Keys {
            sd: Option<SdSource>,
        }
        let keys: Keys = toml::from_str(text).map_err(|e| e.to_string())?;
        keys.sd
            .ok_or_else(|| "family \"sd\" needs an [sd] table with `dir`".into())
    }

    /// The sd part of `manifest`.
    pub fn of(manifest: &Manifest) -> anyhow::Result<&Self> {
        manifest
            .section::<Self>()
            .ok_or_else(|| anyhow::anyhow!("{} is not a Stable Diffusion manifest", manifest.name))
    }
}

impl Section for SdSource {
    fn to_toml(&self) -> Result<Vec<(&'static str, toml::Value)>, toml::ser::Error> {
        Ok(vec![("sd", toml::Value::try_from(self)?)])
    }

    /// What can be checked without the model directory; sizes against the model's grid are
    /// checked when it loads.
    fn validate(&self, s: &Sampling, serving: &Serving) -> Result<(), String> {
        if serving.frames != [1] {
            return Err("serving.frames must be [1]: sd models make images".into());
        }
        if s.shift != 1.0 || s.video_shift.is_some() || s.guidance_interval.is_some() {
            return Err(
                "sampling.shift, sampling.video_shift and sampling.guidance_interval apply to \
                 the tiny family's flow schedule only"
                    .into(),
            );
        }
        if serving.sizes.iter().any(|&[w, h]| w == 0 || h == 0) {
            return Err("serving.sizes must be positive".into());
        }
        s.check_student_timesteps()
    }

    /// The single UNet file when there is one, else the diffusers directory.
    fn weights_path(&self, dir: &Path) -> PathBuf {
        self.unet_file(dir).unwrap_or_else(|| self.model_dir(dir))
    }

    /// The config lives outside the weights file: the UNet's tensor names and shapes.
    fn architecture(&self, tensors: &[(&String, &[usize])]) -> String {
        shapes_hash(tensors.iter().copied())
    }
}
