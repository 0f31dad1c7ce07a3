//! Architecture hyper-parameters of the tiny family (stored beside the weights).

use serde::{Deserialize, Serialize};

/// Per-pixel feature channels the DiT hands to the refiner (beside the noisy input).
pub const REFINER_FEATURES: usize = 8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TinyConfig {
    /// Width of the DiT's token stream.
    pub dim: usize,
    /// Number of DiT blocks.
    pub depth: usize,
    pub heads: usize,
    /// Hidden width of each MLP as a multiple of `dim`.
    pub mlp_ratio: usize,
    /// Side of the square pixel patches that become tokens.
    pub patch: usize,
    pub channels: usize,
    /// Width and depth of the text encoder.
    pub text_dim: usize,
    pub text_depth: usize,
    /// Tokens per prompt, including the leading `[BOS]` (longer prompts are truncated).
    pub text_max_len: usize,
    pub vocab_size: usize,
    /// Largest frame count the model accepts (1 = image).
    pub max_frames: usize,
    /// The square image side the model was trained at.
    pub image_size: usize,
    /// Hidden channels of the full-resolution convolutional refiner on the DiT's output
    /// (0 = none, the patch-linear head alone).
    #[serde(default)]
    pub refiner: usize,
}

impl Default for TinyConfig {
    fn default() -> Self {
        Self {
            dim: 128,
            depth: 6,
            heads: 4,
            mlp_ratio: 3,
            patch: 4,
            channels: 3,
            text_dim: 128,
            text_depth: 2,
            text_max_len: 16,
            vocab_size: 64,
            max_frames: 8,
            image_size: 32,
            refiner: 0,
        }
    }
}

impl TinyConfig {
    /// Parameters of the denoiser and text encoder together (for reports and FLOP counts).
    pub fn tokens_per_frame(&self) -> usize {
        (self.image_size / self.patch).pow(2)
    }

    /// Multiply-accumulates of one denoiser forward on one sample of `frames` frames.
    pub fn macs_per_sample(&self, frames: usize) -> u64 {
        let d = self.dim as u64;
        let t = (self.tokens_per_frame() * frames) as u64;
        let n = self.tokens_per_frame() as u64;
        let f = frames as u64;
        let l = self.text_max_len as u64;
        let pd = (self.patch * self.patch * self.channels) as u64;
        let mlp = (self.mlp_ratio as u64) * d;
        let spatial = 4 * t * d * d + 2 * t * n * d;
        let temporal = if frames > 1 {
            4 * t * d * d + 2 * t * f * d
        } else {
            0
        };
        let cross = 2 * t * d * d + 2 * l * d * d + 2 * t * l * d;
        let ffn = 2 * t * d * mlp;
        let ada = 6 * d * d;
        let block = spatial + temporal + cross + ffn + ada;
        let pixels = (self.image_size * self.image_size * frames) as u64;
        let (r, rf) = (self.refiner as u64, REFINER_FEATURES as u64);
        let refiner = if r > 0 {
            t * d * rf * (self.patch * self.patch) as u64
                + 9 * pixels * (self.channels as u64 + rf) * r
                + 9 * pixels * r * self.channels as u64
        } else {
            0
        };
        self.depth as u64 * block + 2 * t * pd * d + refiner
    }
}
