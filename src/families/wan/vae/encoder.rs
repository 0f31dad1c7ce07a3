//! diffusers' `WanEncoder3d` (Wan2.1, non-residual): a causal conv in, residual blocks and
//! resamplers per stage, the mid block, norm, SiLU and a causal conv out to the posterior's
//! `2 * z_dim` channels. Runs one chunk of frames at a time with a [`FrameCache`].

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{ChannelNorm, MidBlock, Mode, Resample, ResidualBlock};
use super::causal_conv::{CausalConv3d, FrameCache};
use super::WanVaeConfig;

/// One entry of diffusers' flat `down_blocks` list.
#[derive(Debug, Clone)]
enum DownLayer {
    Residual(ResidualBlock),
    Resample(Resample),
}

#[derive(Debug, Clone)]
pub(super) struct Encoder {
    conv_in: CausalConv3d,
    down: Vec<DownLayer>,
    mid: MidBlock,
    norm_out: ChannelNorm,
    conv_out: CausalConv3d,
}

impl Encoder {
    pub fn new(vb: VarBuilder, cfg: &WanVaeConfig) -> Result<Self> {
        let k3 = (3, 3, 3);
        // Channels: base * [1, mult...], one stage per multiplier.
        let dims: Vec<usize> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|m| cfg.base_dim * m)
            .collect();
        let stages = cfg.dim_mult.len();
        let mut down = Vec::new();
        let layer = |i: usize| vb.pp("down_blocks").pp(i);
        for stage in 0..stages {
            let (mut cin, cout) = (dims[stage], dims[stage + 1]);
            for _ in 0..cfg.num_res_blocks {
                let block = ResidualBlock::new(layer(down.len()), cin, cout)?;
                down.push(DownLayer::Residual(block));
                cin = cout;
            }
            if stage + 1 < stages {
                let mode = if cfg.temperal_downsample[stage] {
                    Mode::Down3d
                } else {
                    Mode::Down2d
                };
                down.push(DownLayer::Resample(Resample::new(
                    layer(down.len()),
                    cout,
                    mode,
                )?));
            }
        }
        let top = dims[stages];
        Ok(Self {
            conv_in: CausalConv3d::new(vb.pp("conv_in"), cfg.in_channels, dims[0], k3, 1)?,
            down,
            mid: MidBlock::new(vb.pp("mid_block"), top)?,
            norm_out: ChannelNorm::new(vb.pp("norm_out"), top, false)?,
            conv_out: CausalConv3d::new(vb.pp("conv_out"), top, 2 * cfg.z_dim, k3, 1)?,
        })
    }

    /// One chunk of video frames `[B, T, C, H, W]` (the first frame alone, then 4 at a time)
    /// -> its latent frames `[B, T', 2 z, H/8, W/8]`, continuing from `cache`.
    pub fn forward(&self, x: &Tensor, cache: &mut FrameCache) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x, cache)?;
        for layer in &self.down {
            x = match layer {
                DownLayer::Residual(block) => block.forward(&x, cache)?,
                DownLayer::Resample(resample) => resample.forward(&x, cache)?,
            };
        }
        let x = self.mid.forward(&x, cache)?;
        let x = crate::nn::silu(&self.norm_out.forward(&x)?)?;
        self.conv_out.forward(&x, cache)
    }
}
