//! diffusers' `WanDecoder3d` (Wan2.1, non-residual): a causal conv in, the mid block, up
//! blocks of residual blocks and a resampler, norm, SiLU and a causal conv out to RGB. Runs
//! one latent frame at a time with a [`FrameCache`]: frame 0 gives one video frame, every
//! later one four (`Up3d` twice).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{ChannelNorm, MidBlock, Mode, Resample, ResidualBlock};
use super::causal_conv::{CausalConv3d, FrameCache};
use super::WanVaeConfig;

/// diffusers' `WanUpBlock`: `num_res_blocks + 1` residual blocks and an optional resampler
/// (`upsamplers.0`).
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
}

#[derive(Debug, Clone)]
pub(super) struct Decoder {
    conv_in: CausalConv3d,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: ChannelNorm,
    conv_out: CausalConv3d,
}

impl Decoder {
    pub fn new(vb: VarBuilder, cfg: &WanVaeConfig) -> Result<Self> {
        let k3 = (3, 3, 3);
        let base = cfg.decoder_base_dim();
        let last = cfg.dim_mult.len() - 1;
        // Channels: base * [mult[-1], reversed mult...]; each upsampler halves its block's
        // channels, so every block after the first starts from half the listed width.
        let dims: Vec<usize> = std::iter::once(cfg.dim_mult[last])
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|m| base * m)
            .collect();
        let mut up = Vec::new();
        for i in 0..=last {
            let vb = vb.pp("up_blocks").pp(i);
            let cin = if i > 0 { dims[i] / 2 } else { dims[i] };
            let cout = dims[i + 1];
            let resnets = (0..=cfg.num_res_blocks)
                .map(|j| {
                    let from = if j == 0 { cin } else { cout };
                    ResidualBlock::new(vb.pp("resnets").pp(j), from, cout)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i < last {
                // The encoder's temporal stages, in reverse.
                let mode = if cfg.temperal_downsample[last - 1 - i] {
                    Mode::Up3d
                } else {
                    Mode::Up2d
                };
                Some(Resample::new(vb.pp("upsamplers").pp(0), cout, mode)?)
            } else {
                None
            };
            up.push(UpBlock { resnets, upsampler });
        }
        let top = dims[last + 1];
        Ok(Self {
            conv_in: CausalConv3d::new(vb.pp("conv_in"), cfg.z_dim, dims[0], k3, 1)?,
            mid: MidBlock::new(vb.pp("mid_block"), dims[0])?,
            up,
            norm_out: ChannelNorm::new(vb.pp("norm_out"), top, false)?,
            conv_out: CausalConv3d::new(vb.pp("conv_out"), top, cfg.out_channels, k3, 1)?,
        })
    }

    /// One latent frame `[B, 1, z, h, w]` (after `post_quant_conv`) -> its video frames
    /// `[B, 1 or 4, C, 8h, 8w]` (unclamped), continuing from `cache`.
    pub fn forward(&self, z: &Tensor, cache: &mut FrameCache) -> Result<Tensor> {
        let x = self.conv_in.forward(z, cache)?;
        let mut x = self.mid.forward(&x, cache)?;
        for block in &self.up {
            for resnet in &block.resnets {
                x = resnet.forward(&x, cache)?;
            }
            if let Some(upsampler) = &block.upsampler {
                x = upsampler.forward(&x, cache)?;
            }
        }
        let x = crate::nn::silu(&self.norm_out.forward(&x)?)?;
        self.conv_out.forward(&x, cache)
    }
}
