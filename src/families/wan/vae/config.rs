//! diffusers' `vae/config.json` for `AutoencoderKLWan`. Wan2.1's VAE (also Wan2.2 A14B's) is
//! supported; the options Wan2.2's TI2V-5B VAE added (`is_residual`, `patch_size`, other
//! compression factors) are refused by name, as is attention outside the mid blocks.

use std::path::Path;

use serde::Deserialize;

use super::WanVaeError;

/// `AutoencoderKLWan`'s config with diffusers' defaults (Wan2.1's values). Unknown keys are
/// ignored: diffusers writes bookkeeping keys (`_class_name`, `_diffusers_version`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WanVaeConfig {
    #[serde(default = "default_base_dim")]
    pub base_dim: usize,
    /// `null` means `base_dim`.
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    #[serde(default = "default_z_dim")]
    pub z_dim: usize,
    #[serde(default = "default_dim_mult")]
    pub dim_mult: Vec<usize>,
    #[serde(default = "default_res_blocks")]
    pub num_res_blocks: usize,
    /// Attention in the encoder's down blocks at these scales: unsupported (Wan uses none).
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    /// Which encoder stages also halve the frame count (diffusers' spelling); the decoder
    /// doubles frames in the reverse order.
    #[serde(default = "default_temporal")]
    pub temperal_downsample: Vec<bool>,
    /// Training only; ignored.
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_latents_mean")]
    pub latents_mean: Vec<f64>,
    #[serde(default = "default_latents_std")]
    pub latents_std: Vec<f64>,
    /// Wan2.2's residual down/up blocks: unsupported.
    #[serde(default)]
    pub is_residual: bool,
    #[serde(default = "default_rgb")]
    pub in_channels: usize,
    #[serde(default = "default_rgb")]
    pub out_channels: usize,
    /// Wan2.2's pixel patchify: only `null` (or 1, the identity) is supported.
    #[serde(default)]
    pub patch_size: Option<usize>,
    /// Metadata the pipelines read; must agree with the structure when given.
    #[serde(default)]
    pub scale_factor_temporal: Option<usize>,
    #[serde(default)]
    pub scale_factor_spatial: Option<usize>,
}

fn default_base_dim() -> usize {
    96
}
fn default_z_dim() -> usize {
    16
}
fn default_dim_mult() -> Vec<usize> {
    vec![1, 2, 4, 4]
}
fn default_res_blocks() -> usize {
    2
}
fn default_temporal() -> Vec<bool> {
    vec![false, true, true]
}
fn default_rgb() -> usize {
    3
}
fn default_latents_mean() -> Vec<f64> {
    vec![
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
        0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ]
}
fn default_latents_std() -> Vec<f64> {
    vec![
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
        1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ]
}

/// The frame compression: two temporal stages, so one latent frame per 4 video frames
/// after the first. The encoder's 1, 4, 4, ... chunking assumes exactly this.
pub const TEMPORAL_FACTOR: usize = 4;

impl WanVaeConfig {
    /// Reads and checks `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self, WanVaeError> {
        let err = |message: String| WanVaeError::Config {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn decoder_base_dim(&self) -> usize {
        self.decoder_base_dim.unwrap_or(self.base_dim)
    }

    /// Pixels per latent pixel along each side: 2 per stage after the first.
    pub fn spatial_factor(&self) -> usize {
        1 << self.dim_mult.len().saturating_sub(1)
    }

    /// Video frames for `latent_frames` latent frames: `1 + 4 * (F - 1)` (0 for 0).
    pub fn video_frames(&self, latent_frames: usize) -> usize {
        latent_frames.saturating_sub(1) * TEMPORAL_FACTOR + usize::from(latent_frames > 0)
    }

    /// Latent frames for a video of `frames` frames, `None` off the `4k + 1` grid.
    pub fn latent_frames(&self, frames: usize) -> Option<usize> {
        (frames % TEMPORAL_FACTOR == 1).then(|| 1 + frames / TEMPORAL_FACTOR)
    }

    /// Rejects what this implementation does not do, naming the key and its value.
    pub fn validate(&self) -> Result<(), WanVaeError> {
        let refuse = |field: &'static str, value: String, reason: &str| {
            Err(WanVaeError::Unsupported {
                field,
                value,
                reason: reason.to_string(),
            })
        };
        if self.is_residual {
            return refuse(
                "is_residual",
                "true".into(),
                "Wan2.2's residual VAE blocks are not implemented; Wan2.1's VAE is",
            );
        }
        if let Some(p) = self.patch_size.filter(|&p| p != 1) {
            return refuse(
                "patch_size",
                p.to_string(),
                "Wan2.2's patchify is not implemented",
            );
        }
        if !self.attn_scales.is_empty() {
            return refuse(
                "attn_scales",
                format!("{:?}", self.attn_scales),
                "attention outside the mid blocks is not implemented (Wan uses [])",
            );
        }
        let positive = [
            ("base_dim", self.base_dim),
            ("decoder_base_dim", self.decoder_base_dim()),
            ("z_dim", self.z_dim),
            ("num_res_blocks", self.num_res_blocks),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
        ];
        if let Some((field, v)) = positive.iter().find(|(_, v)| *v == 0) {
            return refuse(field, v.to_string(), "must be positive");
        }
        if self.dim_mult.len() < 2 || self.dim_mult.contains(&0) {
            return refuse(
                "dim_mult",
                format!("{:?}", self.dim_mult),
                "needs at least two positive multipliers",
            );
        }
        let stages = self.dim_mult.len() - 1;
        let temporal = self.temperal_downsample.iter().filter(|t| **t).count();
        if self.temperal_downsample.len() != stages || temporal != 2 {
            return refuse(
                "temperal_downsample",
                format!("{:?}", self.temperal_downsample),
                &format!(
                    "needs one entry per downsampling stage ({stages}) with exactly two true \
                     (the 4x frame compression the 1, 4, 4, ... frame chunks assume)"
                ),
            );
        }
        if let Some(t) = self.scale_factor_temporal.filter(|&t| t != TEMPORAL_FACTOR) {
            return refuse(
                "scale_factor_temporal",
                t.to_string(),
                "the structure compresses frames 4x",
            );
        }
        let spatial = self.spatial_factor();
        if let Some(s) = self.scale_factor_spatial.filter(|&s| s != spatial) {
            return refuse(
                "scale_factor_spatial",
                s.to_string(),
                &format!("the structure compresses each side {spatial}x"),
            );
        }
        for (field, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if v.len() != self.z_dim || v.iter().any(|x| !x.is_finite()) {
                return refuse(
                    field,
                    format!("{} values", v.len()),
                    &format!("needs z_dim = {} finite values", self.z_dim),
                );
            }
        }
        if let Some(s) = self.latents_std.iter().find(|s| **s <= 0.0) {
            return refuse("latents_std", s.to_string(), "every std must be positive");
        }
        Ok(())
    }
}
