//! The UNet's convolutional blocks: `ResnetBlock2D`, `Downsample2D`, `Upsample2D` and the
//! down, mid and up blocks that combine them with spatial transformers.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::SpatialTransformer;
use super::config::{DownSpec, MidSpec, UpSpec};
use crate::families::sd::layers::{upsample_nearest, Conv2d, GroupNorm, VisitConv};
use crate::nn::{Linear, VisitLinear};

/// Settings shared by every block of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct BlockCtx {
    pub groups: usize,
    pub eps: f64,
    pub temb_dim: usize,
    pub linear_projection: bool,
    pub downsample_padding: usize,
}

/// diffusers' `ResnetBlock2D` (`time_embedding_norm: default`): two norm-SiLU-conv stages,
/// the projected time embedding added in between, a 1x1 shortcut when the width changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale: f64,
}

impl ResnetBlock {
    pub fn new(vb: VarBuilder, ctx: &BlockCtx, in_ch: usize, out_ch: usize) -> Result<Self> {
        let shortcut = if in_ch != out_ch {
            Some(Conv2d::new(vb.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), ctx.groups, in_ch, ctx.eps)?,
            conv1: Conv2d::same(vb.pp("conv1"), in_ch, out_ch, 3)?,
            time_emb_proj: Linear::new(vb.pp("time_emb_proj"), ctx.temb_dim, out_ch)?,
            norm2: GroupNorm::new(vb.pp("norm2"), ctx.groups, out_ch, ctx.eps)?,
            conv2: Conv2d::same(vb.pp("conv2"), out_ch, out_ch, 3)?,
            shortcut,
            output_scale: 1.0,
        })
    }

    /// `temb_act` is `silu(temb)`, `[B, temb_dim]`: every resnet activates the same
    /// embedding, so the UNet does it once.
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let t = self
            .time_emb_proj
            .forward(temb_act)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let skip = match &self.shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale
        }
    }

    /// Visits `time_emb_proj`, the resnet's one dense layer.
    pub fn visit_linears(&mut self, prefix: &str, f: &mut VisitLinear) -> Result<()> {
        f(&format!("{prefix}.time_emb_proj"), &mut self.time_emb_proj)
    }

    /// Visits `conv1`, `conv2` and `conv_shortcut` (when the width changes).
    pub fn visit_convs(&mut self, prefix: &str, f: &mut VisitConv) -> Result<()> {
        f(&format!("{prefix}.conv1"), &mut self.conv1)?;
        f(&format!("{prefix}.conv2"), &mut self.conv2)?;
        match &mut self.shortcut {
            Some(conv) => f(&format!("{prefix}.conv_shortcut"), conv),
            None => Ok(()),
        }
    }
}

/// A stride-2 3x3 convolution (`downsamplers.0.conv`). Padding 0 pads right and bottom by
/// one first, as diffusers does.
#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
    pad_right: bool,
}

impl Downsample {
    fn new(vb: VarBuilder, ch: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(
                vb.pp("downsamplers").pp("0").pp("conv"),
                ch,
                ch,
                3,
                2,
                padding,
            )?,
            pad_right: padding == 0,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_right {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour upsampling to the skip connection's size, then a 3x3 convolution
/// (`upsamplers.0.conv`).
#[derive(Debug, Clone)]
struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    fn new(vb: VarBuilder, ch: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::same(vb.pp("upsamplers").pp("0").pp("conv"), ch, ch, 3)?,
        })
    }

    /// `size` is the next skip connection's `(H, W)`: 2x unless the latent's size is not a
    /// multiple of the UNet's total downsampling (diffusers' `upsample_size`).
    fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&upsample_nearest(x, oh, ow)?)
    }
}

fn transformers(
    vb: &VarBuilder,
    ctx: &BlockCtx,
    ch: usize,
    spec: Option<&super::config::AttnSpec>,
    count: usize,
) -> Result<Vec<SpatialTransformer>> {
    let Some(spec) = spec else {
        return Ok(Vec::new());
    };
    (0..count)
        .map(|i| {
            let vb = vb.pp("attentions").pp(i);
            SpatialTransformer::new(vb, ch, spec, ctx.groups, ctx.linear_projection)
        })
        .collect()
}

/// Visits the convolutions of a block's resnets and its down- or upsampler (`sampler`).
fn visit_block_convs(
    prefix: &str,
    resnets: &mut [ResnetBlock],
    sampler: Option<(&str, &mut Conv2d)>,
    f: &mut VisitConv,
) -> Result<()> {
    for (i, resnet) in resnets.iter_mut().enumerate() {
        resnet.visit_convs(&format!("{prefix}.resnets.{i}"), f)?;
    }
    match sampler {
        Some((name, conv)) => f(&format!("{prefix}.{name}.0.conv"), conv),
        None => Ok(()),
    }
}

/// Visits the dense layers of a block's resnets and transformers.
fn visit_block(
    prefix: &str,
    resnets: &mut [ResnetBlock],
    attentions: &mut [SpatialTransformer],
    f: &mut VisitLinear,
) -> Result<()> {
    for (i, resnet) in resnets.iter_mut().enumerate() {
        resnet.visit_linears(&format!("{prefix}.resnets.{i}"), f)?;
    }
    for (i, attn) in attentions.iter_mut().enumerate() {
        attn.visit_linears(&format!("{prefix}.attentions.{i}"), f)?;
    }
    Ok(())
}

/// `CrossAttnDownBlock2D` (with transformers) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsample: Option<Downsample>,
}

impl DownBlock {
    pub fn new(vb: VarBuilder, ctx: &BlockCtx, spec: &DownSpec) -> Result<Self> {
        let resnets = (0..spec.layers)
            .map(|i| {
                let in_ch = if i == 0 { spec.in_ch } else { spec.out_ch };
                ResnetBlock::new(vb.pp("resnets").pp(i), ctx, in_ch, spec.out_ch)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = transformers(&vb, ctx, spec.out_ch, spec.attn.as_ref(), spec.layers)?;
        let downsample = if spec.downsample {
            Some(Downsample::new(vb, spec.out_ch, ctx.downsample_padding)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsample,
        })
    }

    /// Returns the block's output and the states it passes to the up path.
    pub fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb_act)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
            states.push(h.clone());
        }
        if let Some(down) = &self.downsample {
            h = down.forward(&h)?;
            states.push(h.clone());
        }
        Ok((h, states))
    }

    pub fn visit_linears(&mut self, prefix: &str, f: &mut VisitLinear) -> Result<()> {
        visit_block(prefix, &mut self.resnets, &mut self.attentions, f)
    }

    pub fn visit_convs(&mut self, prefix: &str, f: &mut VisitConv) -> Result<()> {
        let sampler = self
            .downsample
            .as_mut()
            .map(|d| ("downsamplers", &mut d.conv));
        visit_block_convs(prefix, &mut self.resnets, sampler, f)
    }
}

/// `UNetMidBlock2DCrossAttn` with one layer: resnet, transformer, resnet.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, ctx: &BlockCtx, spec: &MidSpec, scale: f64) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| {
                let mut r = ResnetBlock::new(vb.pp("resnets").pp(i), ctx, spec.ch, spec.ch)?;
                r.output_scale = scale;
                Ok(r)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = transformers(&vb, ctx, spec.ch, Some(&spec.attn), 1)?;
        Ok(Self {
            resnets,
            attentions,
        })
    }

    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, temb_act)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, context)?;
            h = resnet.forward(&h, temb_act)?;
        }
        Ok(h)
    }

    pub fn visit_linears(&mut self, prefix: &str, f: &mut VisitLinear) -> Result<()> {
        visit_block(prefix, &mut self.resnets, &mut self.attentions, f)
    }

    pub fn visit_convs(&mut self, prefix: &str, f: &mut VisitConv) -> Result<()> {
        visit_block_convs(prefix, &mut self.resnets, None, f)
    }
}

/// `CrossAttnUpBlock2D` (with transformers) or `UpBlock2D` (without).
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsample: Option<Upsample>,
}

impl UpBlock {
    pub fn new(vb: VarBuilder, ctx: &BlockCtx, spec: &UpSpec) -> Result<Self> {
        let resnets = (0..spec.layers)
            .map(|i| {
                // The last resnet takes the skip from the previous down block's input width.
                let skip = if i + 1 == spec.layers {
                    spec.in_ch
                } else {
                    spec.out_ch
                };
                let prev = if i == 0 {
                    spec.prev_out_ch
                } else {
                    spec.out_ch
                };
                ResnetBlock::new(vb.pp("resnets").pp(i), ctx, prev + skip, spec.out_ch)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = transformers(&vb, ctx, spec.out_ch, spec.attn.as_ref(), spec.layers)?;
        let upsample = if spec.upsample {
            Some(Upsample::new(vb, spec.out_ch)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsample,
        })
    }

    /// How many skip states the block consumes.
    pub fn skips(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are this block's skip states in the order the down path produced them (the
    /// last one is used first); `size` is the spatial size to upsample to.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb_act: &Tensor,
        context: &Tensor,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            h = Tensor::cat(&[&h, skip], 1)?;
            h = resnet.forward(&h, temb_act)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
        }
        match &self.upsample {
            Some(up) => up.forward(&h, size),
            None => Ok(h),
        }
    }

    pub fn visit_linears(&mut self, prefix: &str, f: &mut VisitLinear) -> Result<()> {
        visit_block(prefix, &mut self.resnets, &mut self.attentions, f)
    }

    pub fn visit_convs(&mut self, prefix: &str, f: &mut VisitConv) -> Result<()> {
        let sampler = self.upsample.as_mut().map(|u| ("upsamplers", &mut u.conv));
        visit_block_convs(prefix, &mut self.resnets, sampler, f)
    }
}
