//! The Wan VAE's building blocks, shared by the encoder and the decoder: the channel RMS norm,
//! the causal residual block, the mid block's per-frame attention and the resamplers. All
//! take and return `[B, T, C, H, W]` (see `causal_conv`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::causal_conv::{last_frames, wide, CausalConv3d, FrameCache};
use crate::families::sd::layers::{upsample_nearest, PointwiseConv};
use crate::nn::fused_attention::attend;

/// `F.normalize`'s floor on the norm.
const NORM_EPS: f64 = 1e-12;

/// diffusers' `WanRMS_norm` (channel-first, no bias): each pixel's channel vector divided by
/// its L2 norm (not its RMS) and scaled by `sqrt(C) * gamma`; the same thing as an RMS norm
/// with eps folded differently. Statistics in f32 for half precision, as diffusers does.
#[derive(Debug, Clone)]
pub(super) struct ChannelNorm {
    /// `[C, 1, 1]`, broadcast over `H, W` (stored `[C, 1, 1, 1]` or `[C, 1, 1]`).
    gamma: Tensor,
    scale: f64,
}

impl ChannelNorm {
    /// `images`: the attention's 2D variant, whose gamma is stored `[C, 1, 1]`.
    pub fn new(vb: VarBuilder, channels: usize, images: bool) -> Result<Self> {
        let init = candle_nn::Init::Const(1.0);
        let gamma = if images {
            vb.get_with_hints((channels, 1, 1), "gamma", init)?
        } else {
            vb.get_with_hints((channels, 1, 1, 1), "gamma", init)?
        };
        Ok(Self {
            gamma: gamma.reshape((channels, 1, 1))?,
            scale: (channels as f64).sqrt(),
        })
    }

    /// Normalizes over dim `rank - 3` (the C of `[..., C, H, W]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let c_dim = x.rank().saturating_sub(3);
        let xf = x.to_dtype(wide(dtype))?;
        let norm = xf.sqr()?.sum_keepdim(c_dim)?.sqrt()?.maximum(NORM_EPS)?;
        let unit = xf.broadcast_div(&norm)?.to_dtype(dtype)?;
        unit.broadcast_mul(&(&self.gamma * self.scale)?.to_dtype(dtype)?)
    }
}

/// diffusers' `WanResidualBlock`: norm, SiLU, causal conv, twice, plus a (1x1x1 conv)
/// shortcut. Dropout is the identity at inference.
#[derive(Debug, Clone)]
pub(super) struct ResidualBlock {
    norm1: ChannelNorm,
    conv1: CausalConv3d,
    norm2: ChannelNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    pub fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        let k3 = (3, 3, 3);
        let shortcut = if cin != cout {
            Some(CausalConv3d::new(
                vb.pp("conv_shortcut"),
                cin,
                cout,
                (1, 1, 1),
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: ChannelNorm::new(vb.pp("norm1"), cin, false)?,
            conv1: CausalConv3d::new(vb.pp("conv1"), cin, cout, k3, 1)?,
            norm2: ChannelNorm::new(vb.pp("norm2"), cout, false)?,
            conv2: CausalConv3d::new(vb.pp("conv2"), cout, cout, k3, 1)?,
            shortcut,
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FrameCache) -> Result<Tensor> {
        let h = match &self.shortcut {
            Some(conv) => conv.pointwise(x)?,
            None => x.clone(),
        };
        let y = crate::nn::silu(&self.norm1.forward(x)?)?;
        let y = self.conv1.forward(&y, cache)?;
        let y = crate::nn::silu(&self.norm2.forward(&y)?)?;
        self.conv2.forward(&y, cache)? + h
    }
}

/// diffusers' `WanAttentionBlock`: single-head self-attention among the pixels of each frame
/// (frames never see each other, so it needs no cache), with a residual.
#[derive(Debug, Clone)]
pub(super) struct AttentionBlock {
    norm: ChannelNorm,
    to_qkv: PointwiseConv,
    proj: PointwiseConv,
}

impl AttentionBlock {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            norm: ChannelNorm::new(vb.pp("norm"), dim, true)?,
            to_qkv: PointwiseConv::new(vb.pp("to_qkv"), dim, 3 * dim)?,
            proj: PointwiseConv::new(vb.pp("proj"), dim, dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c, h, w) = x.dims5()?;
        // One sequence of H*W pixel tokens `[C]` per frame.
        let tokens = self
            .norm
            .forward(&x.reshape((b * t, c, h * w))?.unsqueeze(3)?)?
            .squeeze(3)?
            .transpose(1, 2)?;
        let qkv = self.to_qkv.forward(&tokens)?;
        let part = |i: usize| qkv.narrow(2, i * c, c);
        let o = attend(&part(0)?, &part(1)?, &part(2)?, 1, None)?;
        let o = self.proj.forward(&o)?.transpose(1, 2)?;
        x + o.reshape((b, t, c, h, w))?
    }
}

/// diffusers' `WanMidBlock` with one attention layer: resnet, attention, resnet.
#[derive(Debug, Clone)]
pub(super) struct MidBlock {
    resnet0: ResidualBlock,
    attention: AttentionBlock,
    resnet1: ResidualBlock,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            resnet0: ResidualBlock::new(vb.pp("resnets").pp(0), dim, dim)?,
            attention: AttentionBlock::new(vb.pp("attentions").pp(0), dim)?,
            resnet1: ResidualBlock::new(vb.pp("resnets").pp(1), dim, dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FrameCache) -> Result<Tensor> {
        let x = self.resnet0.forward(x, cache)?;
        let x = self.attention.forward(&x)?;
        self.resnet1.forward(&x, cache)
    }
}

/// Which of diffusers' `WanResample` modes a layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Nearest x2, then a 3x3 conv to half the channels.
    Up2d,
    /// [`Mode::Up2d`] after doubling the frames (all but a video's first) with a causal
    /// temporal conv to twice the channels.
    Up3d,
    /// Zero pad right and bottom, 3x3 conv with stride 2.
    Down2d,
    /// [`Mode::Down2d`], then a stride-2 temporal conv over each frame pair and the frame
    /// before it (a video's first frame passes through alone).
    Down3d,
}

/// diffusers' `WanResample` (every mode but the identity).
#[derive(Debug, Clone)]
pub(super) struct Resample {
    mode: Mode,
    /// `resample.1`, the 2D conv after the upsampling or padding, run on every frame.
    conv: CausalConv3d,
    /// `time_conv`, kernel `(3, 1, 1)`.
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    pub fn new(vb: VarBuilder, dim: usize, mode: Mode) -> Result<Self> {
        let conv_vb = vb.pp("resample").pp(1);
        // Upsampling halves the channels in the spatial conv, after the temporal one made
        // two frames' worth; downsampling keeps them.
        let (conv, time_out) = match mode {
            Mode::Up2d | Mode::Up3d => {
                let conv = CausalConv3d::spatial(conv_vb, dim, dim / 2, 3, 1, 1)?;
                (conv, 2 * dim)
            }
            Mode::Down2d | Mode::Down3d => {
                (CausalConv3d::spatial(conv_vb, dim, dim, 3, 2, 0)?, dim)
            }
        };
        let time_conv = match mode {
            Mode::Up3d | Mode::Down3d => Some(CausalConv3d::new(
                vb.pp("time_conv"),
                dim,
                time_out,
                (3, 1, 1),
                0,
            )?),
            Mode::Up2d | Mode::Down2d => None,
        };
        Ok(Self {
            mode,
            conv,
            time_conv,
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FrameCache) -> Result<Tensor> {
        let x = match (self.mode, &self.time_conv) {
            (Mode::Up3d, Some(time_conv)) => {
                let slot = cache.next_slot();
                if slot.started {
                    // Frames after a video's first: a causal conv over them (the first frame
                    // is not their past) gives two frames' channels per frame.
                    let y = time_conv.causal(x, &mut slot.past)?;
                    let (b, t, c2, h, w) = y.dims5()?;
                    y.reshape((b, t * 2, c2 / 2, h, w))?
                } else {
                    slot.started = true;
                    x.clone()
                }
            }
            _ => x.clone(),
        };
        let (b, t, c, h, w) = x.dims5()?;
        let y = match self.mode {
            Mode::Up2d | Mode::Up3d => upsample_nearest(
                &x.reshape((b * t, c, h, w))?,
                2 * h,
                2 * w,
            )?
            .reshape((b, t, c, 2 * h, 2 * w))?,
            Mode::Down2d | Mode::Down3d => x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(4, 0, 1)?,
        };
        let y = self.conv.valid(&y, 1)?;
        match (self.mode, &self.time_conv) {
            (Mode::Down3d, Some(time_conv)) => {
                let slot = cache.next_slot();
                if !slot.started {
                    slot.started = true;
                    slot.past = Some(last_frames(&y, 1)?);
                    return Ok(y);
                }
                let Some(prev) = slot.past.replace(last_frames(&y, 1)?) else {
                    candle_core::bail!("Wan VAE: temporal downsampling lost its previous frame");
                };
                time_conv.valid(&Tensor::cat(&[&prev, &y], 1)?, 2)
            }
            _ => Ok(y),
        }
    }
}
