//! Architecture hyper-parameters of the tiny family (stored beside the weights).

use serde::{Deserialize, Serialize};

/// Per-pixel feature channels the DiT hands to the refiner (beside the noisy input).
pub const REFINER_FEATURES: usize = 8;

/// Which network denoises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DenoiserKind {
    /// A DiT on pixel patches (`dit::Dit`).
    #[default]
    Dit,
    /// A pixel-space UNet (`unet::UNet`).
    Unet,
}

impl DenoiserKind {
    fn is_dit(&self) -> bool {
        *self == DenoiserKind::Dit
    }

    /// The prefix of the denoiser's weight names.
    pub fn prefix(self) -> &'static str {
        match self {
            DenoiserKind::Dit => "dit",
            DenoiserKind::Unet => "unet",
        }
    }
}

/// What the denoiser's last layer predicts. Every caller still sees a flow velocity: an x0
/// prediction is turned into one by [`super::TinyNet`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prediction {
    /// The velocity `noise - x0` directly (rectified flow as in SD3).
    #[default]
    Velocity,
    /// The clean sample x0, from which `v = (x_t - x0) / t`. A pixel-space net then only has
    /// to draw the image, not also carry the noise of every pixel through its blocks to the
    /// output (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise").
    X0,
}

impl Prediction {
    fn is_velocity(&self) -> bool {
        *self == Prediction::Velocity
    }
}

/// Which tokens the DiT's temporal attention of a video sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemporalAttention {
    /// The same spatial position in every frame (factorised space-time attention).
    #[default]
    Frames,
    /// Every token of the clip (full space-time attention). A moving object is at another
    /// position in every frame, so a token can only find where it was by looking beyond its
    /// own position; with `frames`, the teacher ignored motion words entirely.
    Clip,
    /// Both, as two branches: the `frames` attention and a second one over the clip whose
    /// output starts at zero. A teacher trained with `frames` warm-starts into it unchanged
    /// and keeps its trained temporal weights, which switching them to `clip` disturbed.
    #[serde(rename = "frames+clip")]
    FramesAndClip,
}

impl TemporalAttention {
    fn is_frames(&self) -> bool {
        *self == TemporalAttention::Frames
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TinyConfig {
    /// The denoiser's architecture (`dit` when absent).
    #[serde(default, skip_serializing_if = "DenoiserKind::is_dit")]
    pub denoiser: DenoiserKind,
    /// Width of the DiT's token stream; for the UNet, of its timestep + prompt embedding.
    pub dim: usize,
    /// Number of DiT blocks; for the UNet, residual blocks per resolution level (each way).
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
    /// How many preceding tokens are mixed into each token's features after the text
    /// encoder's blocks (0 = none). With 2, a shape word carries the colour and size words
    /// before it, so the image tokens of one object can find their own shape word by its
    /// colour: two-object prompts otherwise swap shapes between the objects.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub text_mix: usize,
    pub vocab_size: usize,
    /// Largest frame count the model accepts (1 = image).
    pub max_frames: usize,
    /// The square image side the model was trained at.
    pub image_size: usize,
    /// Hidden channels of the full-resolution convolutional refiner on the DiT's output
    /// (0 = none, the patch-linear head alone).
    #[serde(default)]
    pub refiner: usize,
    /// UNet only: channels per resolution level, from full resolution down; each level halves
    /// the side (`[32, 64, 128]` works at 32, 16 and 8 pixels).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unet_channels: Vec<usize>,
    /// What the network outputs (`velocity` when absent).
    #[serde(default, skip_serializing_if = "Prediction::is_velocity")]
    pub prediction: Prediction,
    /// DiT only: the tokens of a video its temporal attention sees (`frames` when absent).
    /// The weights are the same either way, so a trained DiT can switch.
    #[serde(default, skip_serializing_if = "TemporalAttention::is_frames")]
    pub temporal: TemporalAttention,
    /// DiT only: each frame of a video is modulated by its own conditioning vector,
    /// `c + (s - 1/2) W c` at clip time `s` (`W` starts at zero; an image is at `s = 1/2`).
    /// A motion word moves the object by an amount linear in `s` (growing scales it
    /// log-linearly), so this lets the prompt shift what each frame draws; with one
    /// vector for every frame, the mean a model predicts from pure noise did not move at all.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub frame_time: bool,
    /// DiT only: a video's positions are embedded in coordinates that move with a velocity read
    /// from the prompt's words (one zero-initialised velocity per vocabulary word, summed over
    /// the prompt; from the pooled prompt it did not learn): frame `k` at clip time `s` sees
    /// `position - v (s - 1/2)`. What a model draws at a place in those coordinates moves by
    /// `v` over the clip, so a motion word needs only its velocity, not a word x frame x place
    /// function that no run learned (the teacher README, "Session 17").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub motion_coords: bool,
    /// DiT only: each frame's conditioning also moves with its clip time by a slope read from
    /// the prompt's words, `c + (s - 1/2) G w` (one zero-initialised slope per vocabulary word,
    /// summed over the prompt). `frame_time`'s slope reads the pooled prompt, in which the
    /// motion words are nearly alike; growing and shrinking have no velocity for
    /// `motion_coords` to carry, and a per-frame shift of what the network draws is the word x
    /// time product they need.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub frame_words: bool,
    /// The prompt reaches the blocks only through cross-attention (and the per-word tables):
    /// the pooled prompt that joins the time in every adaLN modulation is always the empty
    /// prompt's. A shape word in the pooled prompt modulates every token of the frame alike,
    /// so in a two-object scene each object is pushed toward both shapes (the probe's
    /// pooled-only sensitivity is as large as the tokens'); through cross-attention a word
    /// reaches the tokens that attend to it. With the empty prompt's vector, a warm start
    /// begins where the network already works: its guidance-dropout rows. (Switched on for
    /// 2,000 steps from a trained teacher it cost far more than it gave: the teacher README,
    /// "Session 28".)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local_text: bool,
    /// Each block's cross-attention output also modulates that token's MLP input
    /// (`+ LN(x) * scale_l + shift_l`, a zero-initialised map of the output), beside the
    /// pooled prompt's adaLN. A word read through cross-attention otherwise only adds one
    /// vector to the token; the pooled prompt scales and shifts every channel, which is what
    /// draws a shape alone, but in a two-object scene it carries both shapes to every token.
    /// Session 32 made the attention read each object's own shape word (share 1.00) and
    /// the objects drew no better; this gives what they read the pooled path's power. Zero
    /// at the start, so a trained DiT warm-starts into it unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local_modulation: bool,
    /// Self-conditioning (Chen et al., "Analog Bits"): the DiT also reads an earlier estimate
    /// of the clean sample, patch by patch through a zero-initialised map. A sampler passes
    /// its previous step's x0, so a shape decided at high noise is carried to the next step
    /// instead of re-read from a re-noised input; training feeds half the rows a detached
    /// estimate from a first pass and the rest zeros (what the first step and every
    /// distillation score see). Zero at the start, so a trained DiT warm-starts into it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub self_condition: bool,
    /// The DiT also reads, patch by patch through a zero-initialised map, each pixel's distance
    /// from its frame's mean colour. A shape on black and the same shape on white differ by a
    /// per-frame offset and a sign, and from scratch the shape word was learnt separately on
    /// each background (the teacher README, "Session 35"); this map has neither, so one
    /// reading of it serves every background.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub contrast_input: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
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
            text_max_len: crate::world::MAX_PROMPT_WORDS + 1,
            text_mix: 0,
            vocab_size: 64,
            max_frames: 8,
            image_size: 32,
            refiner: 0,
            denoiser: DenoiserKind::Dit,
            unet_channels: Vec::new(),
            prediction: Prediction::Velocity,
            temporal: TemporalAttention::Frames,
            frame_time: false,
            motion_coords: false,
            frame_words: false,
            local_text: false,
            local_modulation: false,
            self_condition: false,
            contrast_input: false,
        }
    }
}

impl TinyConfig {
    /// What sizes must be multiples of: the patch side, or the UNet's coarsest pixel.
    pub fn size_multiple(&self) -> usize {
        match self.denoiser {
            DenoiserKind::Dit => self.patch,
            DenoiserKind::Unet => 1 << self.unet_channels.len().saturating_sub(1),
        }
    }

    /// Checks the hyper-parameters build a model (a clear message instead of a shape error).
    pub fn validate(&self) -> Result<(), String> {
        if self.heads == 0 || !self.dim.is_multiple_of(self.heads) {
            return Err("architecture: dim must be a multiple of heads".into());
        }
        if !self.text_dim.is_multiple_of(self.heads) {
            return Err("architecture: text_dim must be a multiple of heads".into());
        }
        match self.denoiser {
            DenoiserKind::Dit => {
                if !self.unet_channels.is_empty() {
                    return Err("architecture: unet_channels is for denoiser = \"unet\"".into());
                }
            }
            DenoiserKind::Unet => {
                if self.unet_channels.is_empty() {
                    return Err("architecture: denoiser = \"unet\" needs unet_channels".into());
                }
                // Attention widths split into heads; positions take quarters of a width.
                if let Some(c) = self
                    .unet_channels
                    .iter()
                    .find(|&&c| c == 0 || !c.is_multiple_of(4 * self.heads))
                {
                    return Err(format!(
                        "architecture: unet_channels {c} is not a multiple of 4 x heads ({})",
                        4 * self.heads
                    ));
                }
                if self.refiner > 0 {
                    return Err("architecture: refiner is for the DiT".into());
                }
                if self.self_condition {
                    return Err("architecture: self_condition is for the DiT".into());
                }
                if self.contrast_input {
                    return Err("architecture: contrast_input is for the DiT".into());
                }
                if self.frame_time || self.motion_coords || self.frame_words {
                    return Err(
                        "architecture: frame_time, motion_coords and frame_words are for the DiT"
                            .into(),
                    );
                }
                if !self.temporal.is_frames() {
                    return Err(
                        "architecture: temporal = \"clip\" or \"frames+clip\" is for the DiT"
                            .into(),
                    );
                }
            }
        }
        if !self.image_size.is_multiple_of(self.size_multiple()) {
            return Err(format!(
                "architecture: image_size {} is not a multiple of {}",
                self.image_size,
                self.size_multiple()
            ));
        }
        Ok(())
    }

    /// Tokens per frame on the denoiser's coarsest grid (the DiT's patches).
    pub fn tokens_per_frame(&self) -> usize {
        (self.image_size / self.size_multiple()).pow(2)
    }

    /// Multiply-accumulates of one denoiser forward on one sample of `frames` frames.
    pub fn macs_per_sample(&self, frames: usize) -> u64 {
        match self.denoiser {
            DenoiserKind::Dit => self.dit_macs(frames),
            DenoiserKind::Unet => super::unet::macs_per_sample(self, frames),
        }
    }

    fn dit_macs(&self, frames: usize) -> u64 {
        let d = self.dim as u64;
        let t = (self.tokens_per_frame() * frames) as u64;
        let n = self.tokens_per_frame() as u64;
        let f = frames as u64;
        let l = self.text_max_len as u64;
        let pd = (self.patch * self.patch * self.channels) as u64;
        let mlp = (self.mlp_ratio as u64) * d;
        let spatial = 4 * t * d * d + 2 * t * n * d;
        let branch = |seen: u64| 4 * t * d * d + 2 * t * seen * d;
        let temporal = if frames > 1 {
            match self.temporal {
                TemporalAttention::Frames => branch(f),
                TemporalAttention::Clip => branch(f * n),
                TemporalAttention::FramesAndClip => branch(f) + branch(f * n),
            }
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
        // The optional input maps: an earlier estimate's patches, the contrast map's.
        let extra_inputs = u64::from(self.self_condition) * t * pd * d
            + u64::from(self.contrast_input) * t * (self.patch * self.patch) as u64 * d;
        self.depth as u64 * block + 2 * t * pd * d + extra_inputs + refiner
    }
}

#[cfg(test)]
impl TinyConfig {
    /// A DiT small enough for unit tests: one block of width 32 on 8-pixel patches.
    pub(crate) fn small_for_tests(vocab_size: usize) -> Self {
        Self {
            dim: 32,
            depth: 1,
            heads: 2,
            patch: 8,
            text_dim: 32,
            text_depth: 1,
            vocab_size,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet() -> TinyConfig {
        TinyConfig {
            denoiser: DenoiserKind::Unet,
            unet_channels: vec![32, 64, 128],
            ..TinyConfig::default()
        }
    }

    #[test]
    fn unet_configs_are_checked_with_a_message_naming_the_field() {
        assert_eq!(TinyConfig::default().validate(), Ok(()));
        assert_eq!(unet().validate(), Ok(()));
        assert_eq!(unet().size_multiple(), 4);
        let bad = |c: TinyConfig, needle: &str| {
            let err = c.validate().expect_err(needle);
            assert!(err.contains(needle), "{err}");
        };
        bad(
            TinyConfig {
                unet_channels: vec![],
                ..unet()
            },
            "needs unet_channels",
        );
        bad(
            TinyConfig {
                unet_channels: vec![32, 40],
                ..unet()
            },
            "unet_channels 40",
        );
        bad(
            TinyConfig {
                refiner: 8,
                ..unet()
            },
            "refiner",
        );
        bad(
            TinyConfig {
                image_size: 30,
                ..unet()
            },
            "image_size 30",
        );
        bad(
            TinyConfig {
                unet_channels: vec![32],
                ..TinyConfig::default()
            },
            "unet_channels is for",
        );
        bad(
            TinyConfig {
                heads: 5,
                ..TinyConfig::default()
            },
            "multiple of heads",
        );
    }

    /// Configs written before the UNet existed read as DiTs and write back without new keys.
    #[test]
    fn the_denoiser_defaults_to_the_dit_and_round_trips() {
        let json = serde_json::to_value(TinyConfig::default()).unwrap();
        assert!(json.get("denoiser").is_none() && json.get("unet_channels").is_none());
        let back: TinyConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back.denoiser, DenoiserKind::Dit);
        let u: TinyConfig = serde_json::from_value(serde_json::to_value(unet()).unwrap()).unwrap();
        assert_eq!(u, unet());
        let err = serde_json::from_str::<DenoiserKind>("\"resnet\"").unwrap_err();
        assert!(err.to_string().contains("unknown variant"), "{err}");
    }
}
