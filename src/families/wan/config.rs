//! diffusers' `transformer/config.json` for `WanTransformer3DModel`. The text-to-video
//! options are supported; the image-conditioning ones (I2V, FLF2V) are rejected by name.

use std::path::Path;

use serde::Deserialize;

use super::WanError;

/// `WanTransformer3DModel`'s config, with diffusers' defaults. Unknown keys are ignored, as
/// diffusers writes bookkeeping keys (`_class_name`, `_diffusers_version`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct WanTransformerConfig {
    /// `(t, h, w)` patch of the 3D patch embedding.
    #[serde(default = "default_patch")]
    pub patch_size: Vec<usize>,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// `null` means `in_channels`, as in diffusers.
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "default_text_dim")]
    pub text_dim: usize,
    #[serde(default = "default_freq_dim")]
    pub freq_dim: usize,
    #[serde(default = "default_ffn_dim")]
    pub ffn_dim: usize,
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    #[serde(default = "yes")]
    pub cross_attn_norm: bool,
    #[serde(default = "default_qk_norm")]
    pub qk_norm: Option<String>,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// I2V's CLIP image embedding width: unsupported.
    #[serde(default)]
    pub image_dim: Option<usize>,
    /// I2V's added key/value projections: unsupported.
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
    /// FLF2V's image position embedding: unsupported.
    #[serde(default)]
    pub pos_embed_seq_len: Option<usize>,
    /// The longest axis (in patches) the rotary tables cover.
    #[serde(default = "default_rope_len")]
    pub rope_max_seq_len: usize,
}

fn default_patch() -> Vec<usize> {
    vec![1, 2, 2]
}
fn default_heads() -> usize {
    40
}
fn default_head_dim() -> usize {
    128
}
fn default_channels() -> usize {
    16
}
fn default_text_dim() -> usize {
    4096
}
fn default_freq_dim() -> usize {
    256
}
fn default_ffn_dim() -> usize {
    13824
}
fn default_layers() -> usize {
    40
}
fn yes() -> bool {
    true
}
fn default_qk_norm() -> Option<String> {
    Some("rms_norm_across_heads".into())
}
fn default_eps() -> f64 {
    1e-6
}
fn default_rope_len() -> usize {
    1024
}

/// Reads a component's `config.json` and checks it with `validate`; every error names the
/// file.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    validate: impl Fn(&T) -> Result<(), WanError>,
) -> Result<T, WanError> {
    let err = |message: String| WanError::Config {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let cfg: T = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    validate(&cfg).map_err(|e| err(e.to_string()))?;
    Ok(cfg)
}

impl WanTransformerConfig {
    /// Reads and checks `transformer/config.json`.
    pub fn from_file(path: &Path) -> Result<Self, WanError> {
        read_config(path, Self::validate)
    }

    /// The model width, `heads * head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// `(t, h, w)`; call after [`Self::validate`].
    pub fn patch(&self) -> (usize, usize, usize) {
        match self.patch_size.as_slice() {
            [t, h, w] => (*t, *h, *w),
            _ => (1, 1, 1),
        }
    }

    /// Rejects what this implementation does not do, naming the key.
    pub fn validate(&self) -> Result<(), WanError> {
        let bad = |m: String| Err(WanError::Unsupported(m));
        if self.patch_size.len() != 3 || self.patch_size.contains(&0) {
            return bad(format!(
                "`patch_size` must be three positive sizes (t, h, w), got {:?}",
                self.patch_size
            ));
        }
        let zero = [
            ("num_attention_heads", self.num_attention_heads),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels()),
            ("text_dim", self.text_dim),
            ("ffn_dim", self.ffn_dim),
            ("rope_max_seq_len", self.rope_max_seq_len),
        ];
        if let Some((key, _)) = zero.iter().find(|(_, v)| *v == 0) {
            return bad(format!("`{key}` must be positive"));
        }
        // The rotary embedding rotates pairs, split over (t, h, w) in even-sized parts.
        if self.attention_head_dim < 6 || self.attention_head_dim % 2 == 1 {
            return bad(format!(
                "`attention_head_dim` {} must be even and at least 6 (3D rotary pairs)",
                self.attention_head_dim
            ));
        }
        if self.freq_dim == 0 || self.freq_dim % 2 == 1 {
            return bad(format!("`freq_dim` {} must be even", self.freq_dim));
        }
        if self.qk_norm.as_deref() != Some("rms_norm_across_heads") {
            return bad(format!(
                "`qk_norm` {:?} (only \"rms_norm_across_heads\", Wan's, is supported)",
                self.qk_norm
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("`eps` {} must be positive", self.eps));
        }
        let image = [
            ("image_dim", self.image_dim),
            ("added_kv_proj_dim", self.added_kv_proj_dim),
            ("pos_embed_seq_len", self.pos_embed_seq_len),
        ];
        if let Some((key, Some(v))) = image.iter().find(|(_, v)| v.is_some()) {
            return bad(format!(
                "`{key}: {v}` (image conditioning, I2V/FLF2V; only text-to-video is supported)"
            ));
        }
        Ok(())
    }
}
