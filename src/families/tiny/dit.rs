//! The tiny family's denoiser: a video DiT in which an image is a one-frame video.
//!
//! Tokens are `patch x patch` pixel patches of every frame. Each block runs spatial
//! self-attention within a frame, temporal self-attention across frames at the same spatial
//! position (or, with `temporal = "clip"`, across every token of the clip, or both with
//! `"frames+clip"`; skipped for images), cross-attention to the prompt tokens, and an MLP; the
//! timestep and the pooled prompt modulate the blocks through adaLN-Zero. Two video options
//! tie a frame's computation to its clip time: `frame_time` and `frame_words` (a conditioning
//! vector per frame, its slope in clip time read from the pooled prompt or from the words) and
//! `motion_coords` (positions that move with a velocity read from the prompt's words).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::cond::CondEmbedding;
use super::config::{TemporalAttention, TinyConfig, REFINER_FEATURES};
use super::text::TextCond;
use crate::nn::embed::{moving_pos_embedding, video_pos_embedding};
use crate::nn::{
    gated_residual, layer_norm, layer_norm_modulate, silu, Attention, Conv3x3, CrossAttention,
    Linear,
};

const EPS: f64 = 1e-6;

/// The output scale of `motion_coords`' velocity map. Adam moves each weight by about the
/// learning rate per step, so a translation's 3 tokens per clip would take 7,500 steps of one
/// sign at lr 4e-4; scaled by 16, about 500 (a per-layer rate in the parametrisation).
const VELOCITY_SCALE: f64 = 16.0;

/// The output scale of `frame_words`' slope map, for the same reason at the scale of a
/// conditioning vector (O(1) per dimension).
const FRAME_WORDS_SCALE: f64 = 4.0;

#[derive(Debug, Clone)]
struct Block {
    ada: Linear,
    spatial: Attention,
    temporal: Attention,
    /// The clip-wide branch of `temporal = "frames+clip"`.
    clip: Option<Attention>,
    cross: CrossAttention,
    /// `local_modulation`: the cross-attention output's per-token shift and scale of the MLP
    /// input.
    local: Option<Linear>,
    fc1: Linear,
    fc2: Linear,
}

/// A full-resolution conv head: `conv(silu(conv([x_t, features])))` added to the patch
/// head's velocity. A 4x4 patch decoded by one linear map renders edges as blocky blobs; a
/// 3x3 conv over the noisy input and per-pixel features can draw them sharp at ~10% of the
/// DiT's cost. Its output conv starts at zero, so it can be added to a trained DiT.
#[derive(Debug, Clone)]
struct Refiner {
    features: Linear,
    conv1: Conv3x3,
    conv2: Conv3x3,
}

impl Refiner {
    fn new(vb: VarBuilder, cfg: &TinyConfig) -> Result<Self> {
        let (c, r, rf) = (cfg.channels, cfg.refiner, REFINER_FEATURES);
        let kaiming = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        Ok(Self {
            features: Linear::new(vb.pp("features"), cfg.dim, rf * cfg.patch * cfg.patch)?,
            conv1: Conv3x3::new(vb.pp("conv1"), c + rf, r, kaiming)?,
            conv2: Conv3x3::new(vb.pp("conv2"), r, c, candle_nn::init::ZERO)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Dit {
    cfg: TinyConfig,
    patch_in: Linear,
    cond: CondEmbedding,
    blocks: Vec<Block>,
    final_ada: Linear,
    patch_out: Linear,
    refiner: Option<Refiner>,
    /// `W` of `frame_time`: the per-frame conditioning's slope in clip time.
    frame_time: Option<Linear>,
    /// `motion_coords`: the prompt's velocity, `[columns, rows]` of tokens per clip, as a sum
    /// of one learnt velocity per word (a linear map of [`TextCond::words`]). Read from the
    /// pooled prompt instead, it did not learn in the shipped teacher: after the encoder
    /// "moving left" and "moving right" pool to nearly the same vector, and 2,000 steps left
    /// both at +0.3 px per clip.
    motion: Option<Linear>,
    /// `frame_words`: each word's slope of the conditioning in clip time, `[vocab] -> [D]`.
    frame_words: Option<Linear>,
    /// `self_condition`: an earlier x0 estimate's patches into the tokens, zero-initialised.
    self_cond: Option<Linear>,
    /// `contrast_input`: [`contrast_map`]'s patches into the tokens, zero-initialised.
    contrast: Option<Linear>,
}

/// `contrast_input`'s map of `x` (`[B, F, C, H, W]` -> `[B, F, 1, H, W]`): each pixel's
/// distance from its frame's mean colour, `sqrt(|x - mean| ^ 2 + eps)`. Adding a colour to a
/// frame or negating it leaves the map as it was, so a shape reads alike on any background.
pub fn contrast_map(x: &Tensor) -> Result<Tensor> {
    let mean = x.mean_keepdim(4)?.mean_keepdim(3)?;
    (x.broadcast_sub(&mean)?.sqr()?.sum_keepdim(2)? + EPS)?.sqrt()
}

/// Each frame's clip time minus 1/2 (0 for an image): where a motion is relative to the
/// middle of its clip.
fn clip_offsets(frames: usize) -> Vec<f32> {
    (0..frames)
        .map(|k| crate::world::frame_time(k, frames) - 0.5)
        .collect()
}

/// `[B, F, C, H, W]` -> `[B, F*N, C*p*p]`: the DiT's tokens, row-major within each frame,
/// each holding its `p x p` pixels channel by channel.
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, f, c, h, w) = x.dims5()?;
    let (gh, gw) = (h / p, w / p);
    x.reshape((b * f, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b, f * gh * gw, c * p * p))
}

/// `[B, F*N, D]` as `[rows, F*N*B/rows, D]`: one row per conditioning vector (a sample, or a
/// frame of one with `frame_time`).
fn per_cond(x: &Tensor, rows: usize) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    x.reshape((rows, b * t / rows, d))
}

impl Dit {
    pub fn new(vb: VarBuilder, cfg: &TinyConfig) -> Result<Self> {
        let d = cfg.dim;
        let pd = cfg.patch * cfg.patch * cfg.channels;
        let blocks = (0..cfg.depth)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                Ok(Block {
                    ada: Linear::zeros(vb.pp("ada"), d, 6 * d)?,
                    spatial: Attention::new(vb.pp("spatial"), d, cfg.heads, false)?,
                    temporal: Attention::new(vb.pp("temporal"), d, cfg.heads, true)?,
                    clip: match cfg.temporal {
                        TemporalAttention::FramesAndClip => {
                            Some(Attention::new(vb.pp("clip"), d, cfg.heads, true)?)
                        }
                        _ => None,
                    },
                    cross: CrossAttention::new(vb.pp("cross"), d, cfg.text_dim, cfg.heads)?,
                    local: if cfg.local_modulation {
                        Some(Linear::zeros(vb.pp("local"), d, 2 * d)?)
                    } else {
                        None
                    },
                    fc1: Linear::new(vb.pp("fc1"), d, cfg.mlp_ratio * d)?,
                    fc2: Linear::new(vb.pp("fc2"), cfg.mlp_ratio * d, d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_in: Linear::new(vb.pp("patch_in"), pd, d)?,
            cond: CondEmbedding::new(&vb, cfg.text_dim, d)?,
            blocks,
            final_ada: Linear::zeros(vb.pp("final_ada"), d, 2 * d)?,
            patch_out: Linear::zeros(vb.pp("patch_out"), d, pd)?,
            refiner: if cfg.refiner > 0 {
                Some(Refiner::new(vb.pp("refiner"), cfg)?)
            } else {
                None
            },
            frame_time: if cfg.frame_time {
                Some(Linear::zeros(vb.pp("frame_time"), d, d)?)
            } else {
                None
            },
            motion: if cfg.motion_coords {
                Some(Linear::zeros(vb.pp("motion"), cfg.vocab_size, 2)?)
            } else {
                None
            },
            frame_words: if cfg.frame_words {
                Some(Linear::zeros(vb.pp("frame_words"), cfg.vocab_size, d)?)
            } else {
                None
            },
            self_cond: if cfg.self_condition {
                Some(Linear::zeros(vb.pp("self_cond"), pd, d)?)
            } else {
                None
            },
            contrast: if cfg.contrast_input {
                Some(Linear::zeros(vb.pp("contrast"), cfg.patch * cfg.patch, d)?)
            } else {
                None
            },
        })
    }

    /// The conditioning vectors, `[B, D]`, or `[B*F, D]` (frame-major within a sample) when
    /// each frame of a video has its own: `c + (s_k - 1/2) slope` at clip time `s_k`, where the
    /// slope is `W c` (`frame_time`) plus the prompt's word slopes (`frame_words`).
    fn frame_conditioning(&self, cond: Tensor, frames: usize, text: &TextCond) -> Result<Tensor> {
        if frames < 2 {
            return Ok(cond);
        }
        let from_time = self
            .frame_time
            .as_ref()
            .map(|w| w.forward(&cond))
            .transpose()?;
        let from_words = self
            .frame_words
            .as_ref()
            .map(|g| g.forward(&text.words.to_dtype(cond.dtype())?)? * FRAME_WORDS_SCALE)
            .transpose()?;
        let slope = match (from_time, from_words) {
            (Some(a), Some(b)) => (a + b)?,
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return Ok(cond),
        };
        let (b, d) = cond.dims2()?;
        let s = Tensor::from_vec(clip_offsets(frames), (1, frames, 1), cond.device())?
            .to_dtype(cond.dtype())?;
        slope
            .unsqueeze(1)?
            .broadcast_mul(&s)?
            .broadcast_add(&cond.unsqueeze(1)?)?
            .reshape((b * frames, d))
    }

    fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        patchify(x, self.cfg.patch)
    }

    /// `[B, F*N, C*p*p]` -> `[B, F, C, H, W]`.
    fn unpatchify(&self, x: &Tensor, f: usize, h: usize, w: usize) -> Result<Tensor> {
        let (b, _, cpp) = x.dims3()?;
        let p = self.cfg.patch;
        let c = cpp / (p * p);
        let (gh, gw) = (h / p, w / p);
        x.reshape((b * f, gh, gw, c, p, p))?
            .permute((0, 3, 1, 4, 2, 5))?
            .contiguous()?
            .reshape((b, f, c, h, w))
    }

    /// The flow velocity (see [`super::TinyNet::forward`]), also returning the tokens after the
    /// middle block (`[B, F*N, D]`) when `features` is set: what a discriminator head reads.
    /// `self_cond` is an earlier x0 estimate shaped like `x` (zeros when `None`); a model
    /// without `self_condition` ignores it.
    pub fn forward_with_features(
        &self,
        x: &Tensor,
        self_cond: Option<&Tensor>,
        t: &[f32],
        text: &TextCond,
        features: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, f, _c, h, w) = x.dims5()?;
        let device = x.device();
        let d = self.cfg.dim;
        let p = self.cfg.patch;
        let n = (h / p) * (w / p);

        let velocity = if f > 1 {
            self.clip_velocity(text)?
        } else {
            None
        };
        let pos = match velocity {
            Some(vel) => {
                let vel = vel.to_dtype(candle_core::DType::F32)?;
                moving_pos_embedding(&clip_offsets(f), h / p, w / p, d, &vel)?
                    .to_dtype(x.dtype())?
            }
            None => video_pos_embedding(f, h / p, w / p, d, device)?.to_dtype(x.dtype())?,
        };
        let mut tok = self
            .patch_in
            .forward(&self.patchify(x)?)?
            .broadcast_add(&pos)?;
        if let Some(map) = &self.self_cond {
            tok = match (self_cond, map.bias()) {
                (Some(s), _) => (tok + map.forward(&self.patchify(s)?)?)?,
                // Zeros through the map leave its bias alone: no product over zeros.
                (None, Some(bias)) => tok.broadcast_add(bias)?,
                (None, None) => tok,
            };
        }
        if let Some(map) = &self.contrast {
            tok = (tok + map.forward(&self.patchify(&contrast_map(x)?)?)?)?;
        }

        let cond = self.frame_conditioning(self.cond.forward(t, text)?, f, text)?;
        let rows = cond.dim(0)?;
        let cross_bias = text.head_bias(self.cfg.heads)?;

        let mut mid = None;
        for (i, blk) in self.blocks.iter().enumerate() {
            if features && i == self.blocks.len() / 2 {
                mid = Some(tok.clone());
            }
            let m = blk.ada.forward(&cond)?.chunk(6, 1)?;
            // Spatial attention within each frame.
            let hmod = layer_norm_modulate(&per_cond(&tok, rows)?, &m[0], &m[1], EPS)?;
            let hs = blk
                .spatial
                .forward(&hmod.reshape((b * f, n, d))?, None)?
                .reshape((rows, b * f * n / rows, d))?;
            tok = gated_residual(&per_cond(&tok, rows)?, &m[2], &hs)?.reshape((b, f * n, d))?;
            // Temporal attention: across frames at each spatial position, or over the clip.
            if f > 1 {
                let normed = layer_norm(&tok, EPS)?;
                let ht = match self.cfg.temporal {
                    TemporalAttention::Clip => blk.temporal.forward(&normed, None)?,
                    _ => blk.temporal.forward_across_frames(&normed, f)?,
                };
                tok = (tok + ht)?;
                if let Some(clip) = &blk.clip {
                    tok = (&tok + clip.forward(&normed, None)?)?;
                }
            }
            // Cross-attention to the prompt.
            let hc = blk
                .cross
                .forward(&layer_norm(&tok, EPS)?, &text.tokens, Some(&cross_bias))?;
            tok = (tok + &hc)?;
            // MLP.
            let tok_c = per_cond(&tok, rows)?;
            let mut hm = layer_norm_modulate(&tok_c, &m[3], &m[4], EPS)?;
            if let Some(local) = &blk.local {
                let sl = local.forward(&hc)?.chunk(2, 2)?;
                let normed = layer_norm(&tok, EPS)?;
                let extra = ((normed * &sl[1])? + &sl[0])?;
                let extra = extra.reshape(hm.shape())?;
                hm = (hm + extra)?;
            }
            let hm = blk.fc2.forward(&blk.fc1.forward_silu(&hm)?)?;
            tok = gated_residual(&tok_c, &m[5], &hm)?.reshape((b, f * n, d))?;
        }

        let fm = self.final_ada.forward(&cond)?.chunk(2, 1)?;
        let out = layer_norm_modulate(&per_cond(&tok, rows)?, &fm[0], &fm[1], EPS)?.reshape((
            b,
            f * n,
            d,
        ))?;
        let v = self.unpatchify(&self.patch_out.forward(&out)?, f, h, w)?;
        let v = match &self.refiner {
            Some(r) => {
                let feats = self.unpatchify(&r.features.forward(&out)?, f, h, w)?;
                let c = self.cfg.channels;
                let inp =
                    Tensor::cat(&[x, &feats], 2)?.reshape((b * f, c + REFINER_FEATURES, h, w))?;
                let dv = r.conv2.forward(&silu(&r.conv1.forward(&inp)?)?)?;
                (v + dv.reshape((b, f, c, h, w))?)?
            }
            None => v,
        };
        Ok((v, mid))
    }

    pub fn dim(&self) -> usize {
        self.cfg.dim
    }

    /// `motion_coords`' velocity for each prompt, `[B, 2]` (columns and rows of tokens per
    /// clip); `None` without the option.
    pub fn clip_velocity(&self, text: &TextCond) -> Result<Option<Tensor>> {
        self.motion
            .as_ref()
            .map(|m| m.forward(&text.words)? * VELOCITY_SCALE)
            .transpose()
    }
}
