//! The tiny family's convolutional denoiser: a pixel-space video UNet in which an image is a
//! one-frame video.
//!
//! Why a UNet beside the DiT: a DiT on 4x4 patches learned colours, counts and layouts but
//! drew shapes as rounded blobs, even after 8x more training on a GPU. 3x3 convolutions work
//! at full resolution, where edges and corners are; attention is only where it is cheap
//! (16x16 and coarser), which is where layout and prompt binding happen. Trained on one CPU
//! thread it reached the DiT's loss in fewer steps but not better samples (see
//! `models/tiny-shapes-teacher/README.md`), so the shipped teacher is still the DiT.
//!
//! Everything runs channels-last, `[B, F, H, W, C]`: a conv sees `[B*F, H, W, C]`, a layer norm
//! `[B, F*H*W, C]` (so the timestep + prompt modulation is per sample) and attention its
//! tokens, all without a copy. Per level: residual blocks (adaLN-modulated layer norm, SiLU,
//! 3x3 conv, twice); below full resolution, an attention block (spatial self-attention at the
//! coarsest level, temporal self-attention across frames, cross-attention to the prompt, with
//! fixed sin-cos positions on the queries). Resolution halves by a learned 2x2 space-to-depth
//! projection and doubles by its transpose; the decoder concatenates the encoder's output of
//! the same level.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::cond::CondEmbedding;
use super::config::TinyConfig;
use super::text::TextCond;
use crate::nn::embed::video_pos_embedding;
use crate::nn::{
    layer_norm, layer_norm_modulate, silu, Attention, Conv3x3, CrossAttention, Linear,
};

const EPS: f64 = 1e-6;

/// A channels-last activation with its frame count: `[B, F, H, W, C]`.
#[derive(Clone)]
struct Frames {
    x: Tensor,
}

impl Frames {
    fn dims(&self) -> Result<(usize, usize, usize, usize, usize)> {
        self.x.dims5()
    }

    /// `[B, F*H*W, C]`: the tokens of a sample.
    fn tokens(&self) -> Result<Tensor> {
        let (b, f, h, w, c) = self.dims()?;
        self.x.reshape((b, f * h * w, c))
    }

    /// `[B*F, H, W, C]`: the images of the batch.
    fn images(&self) -> Result<Tensor> {
        let (b, f, h, w, c) = self.dims()?;
        self.x.reshape((b * f, h, w, c))
    }

    /// `x` (any shape with this batch, frame count and grid) as frames of its own width.
    fn with(&self, x: Tensor) -> Result<Self> {
        let (b, f, h, w, _) = self.dims()?;
        let c = x.elem_count() / (b * f * h * w);
        Ok(Self {
            x: x.reshape((b, f, h, w, c))?,
        })
    }
}

/// `x + conv2(silu(LN(conv1(silu(adaLN(x))))))`, with a 1x1 projection on the skip path when
/// the width changes. `conv2` starts at zero, so a fresh block is the identity.
#[derive(Debug, Clone)]
struct ResBlock {
    ada: Linear,
    conv1: Conv3x3,
    conv2: Conv3x3,
    skip: Option<Linear>,
}

impl ResBlock {
    fn new(vb: VarBuilder, cond_dim: usize, cin: usize, cout: usize) -> Result<Self> {
        let kaiming = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        Ok(Self {
            ada: Linear::zeros(vb.pp("ada"), cond_dim, 2 * cin)?,
            conv1: Conv3x3::new(vb.pp("conv1"), cin, cout, kaiming)?,
            conv2: Conv3x3::new(vb.pp("conv2"), cout, cout, candle_nn::init::ZERO)?,
            skip: if cin != cout {
                Some(Linear::no_bias(vb.pp("skip"), cin, cout)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Frames, cond: &Tensor) -> Result<Frames> {
        let m = self.ada.forward(cond)?.chunk(2, 1)?;
        let h = silu(&layer_norm_modulate(&x.tokens()?, &m[0], &m[1], EPS)?)?;
        let h = x.with(h)?.images()?;
        let h = x.with(self.conv1.forward_channels_last(&h)?)?;
        let h = silu(&layer_norm(&h.tokens()?, EPS)?)?;
        let h = self.conv2.forward_channels_last(&x.with(h)?.images()?)?;
        let skip = match &self.skip {
            Some(s) => s.forward(&x.x)?,
            None => x.x.clone(),
        };
        x.with((skip.reshape(h.shape())? + h)?)
    }
}

/// Attention at one level: spatial (coarsest level only), temporal (videos), cross (prompt).
/// Every output projection starts at zero.
#[derive(Debug, Clone)]
struct AttnBlock {
    spatial: Option<Attention>,
    temporal: Attention,
    cross: CrossAttention,
}

impl AttnBlock {
    fn new(vb: VarBuilder, cfg: &TinyConfig, ch: usize, spatial: bool) -> Result<Self> {
        Ok(Self {
            spatial: if spatial {
                Some(Attention::new(vb.pp("spatial"), ch, cfg.heads, true)?)
            } else {
                None
            },
            temporal: Attention::new(vb.pp("temporal"), ch, cfg.heads, true)?,
            cross: CrossAttention::new(vb.pp("cross"), ch, cfg.text_dim, cfg.heads)?,
        })
    }

    fn forward(&self, x: &Frames, text: &TextCond, cross_bias: &Tensor) -> Result<Frames> {
        let (b, f, h, w, c) = x.dims()?;
        let n = h * w;
        let pos = video_pos_embedding(f, h, w, c, x.x.device())?.to_dtype(x.x.dtype())?;
        let query = |tok: &Tensor| layer_norm(tok, EPS)?.broadcast_add(&pos);
        let mut tok = x.tokens()?;
        if let Some(spatial) = &self.spatial {
            let hs = spatial
                .forward(&query(&tok)?.reshape((b * f, n, c))?, None)?
                .reshape((b, f * n, c))?;
            tok = (tok + hs)?;
        }
        if f > 1 {
            let ht = self.temporal.forward_across_frames(&query(&tok)?, f)?;
            tok = (tok + ht)?;
        }
        let hc = self
            .cross
            .forward(&query(&tok)?, &text.tokens, Some(cross_bias))?;
        x.with((tok + hc)?)
    }
}

/// One resolution level: residual blocks, then attention where the level has it.
#[derive(Debug, Clone)]
struct Level {
    blocks: Vec<ResBlock>,
    attn: Option<AttnBlock>,
}

impl Level {
    fn forward(
        &self,
        mut x: Frames,
        cond: &Tensor,
        text: &TextCond,
        cross_bias: &Tensor,
    ) -> Result<Frames> {
        for blk in &self.blocks {
            x = blk.forward(&x, cond)?;
        }
        match &self.attn {
            Some(a) => a.forward(&x, text, cross_bias),
            None => Ok(x),
        }
    }
}

/// `[B, F, H, W, C]` -> `[B, F, H/2, W/2, 4C]`: each 2x2 block of pixels into one.
fn space_to_depth(x: &Tensor) -> Result<Tensor> {
    let (b, f, h, w, c) = x.dims5()?;
    x.reshape((b * f, h / 2, 2, w / 2, 2 * c))?
        .transpose(2, 3)?
        .contiguous()?
        .reshape((b, f, h / 2, w / 2, 4 * c))
}

/// `[B, F, H, W, 4C]` -> `[B, F, 2H, 2W, C]`, the inverse of [`space_to_depth`].
fn depth_to_space(x: &Tensor) -> Result<Tensor> {
    let (b, f, h, w, c4) = x.dims5()?;
    x.reshape((b * f, h, w, 2, c4 / 2))?
        .transpose(2, 3)?
        .contiguous()?
        .reshape((b, f, 2 * h, 2 * w, c4 / 4))
}

#[derive(Debug, Clone)]
pub struct UNet {
    cfg: TinyConfig,
    cond: CondEmbedding,
    conv_in: Conv3x3,
    down: Vec<Level>,
    /// `down_proj[i]`: level `i` -> `i + 1` (2x2 space-to-depth, then a linear map).
    down_proj: Vec<Linear>,
    mid: Level,
    mid_out: ResBlock,
    up: Vec<Level>,
    /// `up_proj[i]`: level `i + 1` -> `i` (a linear map, then depth-to-space).
    up_proj: Vec<Linear>,
    final_ada: Linear,
    conv_out: Conv3x3,
}

impl UNet {
    pub fn new(vb: VarBuilder, cfg: &TinyConfig) -> Result<Self> {
        let ch = &cfg.unet_channels;
        let levels = ch.len();
        if levels == 0 {
            candle_core::bail!("a UNet needs unet_channels");
        }
        let d = cfg.dim;
        let last = ch[levels - 1];
        let attn = |vb: VarBuilder, i: usize| -> Result<Option<AttnBlock>> {
            if i == 0 {
                Ok(None)
            } else {
                AttnBlock::new(vb.pp("attn"), cfg, ch[i], i == levels - 1).map(Some)
            }
        };
        let mut down = Vec::with_capacity(levels);
        let mut up = Vec::with_capacity(levels);
        for (i, &c) in ch.iter().enumerate() {
            let vb_down = vb.pp(format!("down.{i}"));
            let blocks = (0..cfg.depth)
                .map(|j| ResBlock::new(vb_down.pp(format!("blocks.{j}")), d, c, c))
                .collect::<Result<Vec<_>>>()?;
            down.push(Level {
                blocks,
                attn: attn(vb_down, i)?,
            });
            // The decoder's first block takes the skip concatenated to its input.
            let vb_up = vb.pp(format!("up.{i}"));
            let blocks = (0..cfg.depth.max(1))
                .map(|j| {
                    let cin = if j == 0 { 2 * c } else { c };
                    ResBlock::new(vb_up.pp(format!("blocks.{j}")), d, cin, c)
                })
                .collect::<Result<Vec<_>>>()?;
            up.push(Level {
                blocks,
                attn: attn(vb_up, i)?,
            });
        }
        let down_proj = (0..levels - 1)
            .map(|i| Linear::new(vb.pp(format!("down_proj.{i}")), 4 * ch[i], ch[i + 1]))
            .collect::<Result<Vec<_>>>()?;
        let up_proj = (0..levels - 1)
            .map(|i| Linear::new(vb.pp(format!("up_proj.{i}")), ch[i + 1], 4 * ch[i]))
            .collect::<Result<Vec<_>>>()?;
        let kaiming = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        Ok(Self {
            cfg: cfg.clone(),
            cond: CondEmbedding::new(&vb, cfg.text_dim, d)?,
            conv_in: Conv3x3::new(vb.pp("conv_in"), cfg.channels, ch[0], kaiming)?,
            down,
            down_proj,
            mid: Level {
                blocks: vec![ResBlock::new(vb.pp("mid.blocks.0"), d, last, last)?],
                attn: Some(AttnBlock::new(vb.pp("mid.attn"), cfg, last, true)?),
            },
            mid_out: ResBlock::new(vb.pp("mid_out"), d, last, last)?,
            up,
            up_proj,
            final_ada: Linear::zeros(vb.pp("final_ada"), d, 2 * ch[0])?,
            conv_out: Conv3x3::new(
                vb.pp("conv_out"),
                ch[0],
                cfg.channels,
                candle_nn::init::ZERO,
            )?,
        })
    }

    /// Width of the features [`Self::forward_with_features`] returns.
    pub fn feature_dim(&self) -> usize {
        *self.cfg.unet_channels.last().unwrap_or(&0)
    }

    /// Flow-matching velocity `eps - x0` for `x` `[B, F, C, H, W]` at times `t` (`[B]`, in
    /// `[0, 1]`, 1 = pure noise) under the prompt conditioning `text`; with `features`, also
    /// the coarsest level's tokens after the middle block (`[B, F*N, C]`, what a
    /// discriminator head reads).
    pub fn forward_with_features(
        &self,
        x: &Tensor,
        t: &[f32],
        text: &TextCond,
        features: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, f, c, h, w) = x.dims5()?;
        let cond = self.cond.forward(t, text)?;
        let cross_bias = text.head_bias(self.cfg.heads)?;

        let input = Frames {
            x: x.permute((0, 1, 3, 4, 2))?.contiguous()?,
        };
        let mut hcur = input.with(self.conv_in.forward_channels_last(&input.images()?)?)?;
        let mut skips = Vec::with_capacity(self.down.len());
        for (i, level) in self.down.iter().enumerate() {
            hcur = level.forward(hcur, &cond, text, &cross_bias)?;
            skips.push(hcur.clone());
            if let Some(proj) = self.down_proj.get(i) {
                hcur = Frames {
                    x: proj.forward(&space_to_depth(&hcur.x)?)?,
                };
            }
        }
        hcur = self.mid.forward(hcur, &cond, text, &cross_bias)?;
        let mid = if features { Some(hcur.tokens()?) } else { None };
        hcur = self.mid_out.forward(&hcur, &cond)?;
        for (i, level) in self.up.iter().enumerate().rev() {
            let skip = &skips[i].x;
            hcur = Frames {
                x: Tensor::cat(&[&hcur.x, skip], 4)?,
            };
            hcur = level.forward(hcur, &cond, text, &cross_bias)?;
            if i > 0 {
                hcur = Frames {
                    x: depth_to_space(&self.up_proj[i - 1].forward(&hcur.x)?)?,
                };
            }
        }
        let m = self.final_ada.forward(&cond)?.chunk(2, 1)?;
        let out = silu(&layer_norm_modulate(&hcur.tokens()?, &m[0], &m[1], EPS)?)?;
        let v = self
            .conv_out
            .forward_channels_last(&hcur.with(out)?.images()?)?
            .reshape((b, f, h, w, c))?
            .permute((0, 1, 4, 2, 3))?
            .contiguous()?;
        Ok((v, mid))
    }
}

/// Multiply-accumulates of one forward on one sample of `frames` frames (convolutions, 1x1
/// projections and attention; norms and activations are not counted).
pub fn macs_per_sample(cfg: &TinyConfig, frames: usize) -> u64 {
    let ch: Vec<u64> = cfg.unet_channels.iter().map(|&c| c as u64).collect();
    let levels = ch.len();
    let f = frames as u64;
    let l = cfg.text_max_len as u64;
    let td = cfg.text_dim as u64;
    let conv = |px: u64, cin: u64, cout: u64| px * 9 * cin * cout;
    let res = |px: u64, cin: u64, cout: u64| {
        conv(px, cin, cout) + conv(px, cout, cout) + if cin != cout { px * cin * cout } else { 0 }
    };
    let attn = |px: u64, c: u64, spatial: bool| {
        let t = px * f;
        let sp = if spatial {
            4 * t * c * c + 2 * t * px * c
        } else {
            0
        };
        let tm = if frames > 1 {
            4 * t * c * c + 2 * t * f * c
        } else {
            0
        };
        let cross = 2 * t * c * c + 2 * l * td * c + 2 * t * l * c;
        sp + tm + cross
    };
    let side = cfg.image_size as u64;
    let mut macs = conv(side * side, cfg.channels as u64, ch[0]) * f;
    for (i, &c) in ch.iter().enumerate() {
        let px = (side >> i) * (side >> i);
        let depth = cfg.depth as u64;
        let down = depth * res(px, c, c) * f;
        let up = (res(px, 2 * c, c) + depth.saturating_sub(1) * res(px, c, c)) * f;
        let a = if i > 0 {
            2 * attn(px, c, i == levels - 1)
        } else {
            0
        };
        let proj = if i + 1 < levels {
            2 * (px / 4) * 4 * c * ch[i + 1] * f
        } else {
            2 * res(px, c, c) * f + attn(px, c, true)
        };
        macs += down + up + a + proj;
    }
    macs + conv(side * side, ch[0], cfg.channels as u64) * f
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn space_to_depth_and_back_is_the_identity() -> Result<()> {
        let x =
            Tensor::arange(0f32, 2. * 3. * 4. * 6. * 5., &Device::Cpu)?.reshape((2, 3, 4, 6, 5))?;
        let y = space_to_depth(&x)?;
        assert_eq!(y.dims(), &[2, 3, 2, 3, 20]);
        // The first output pixel holds the input's top-left 2x2 block, row by row.
        let first: Vec<f32> = y.get(0)?.get(0)?.get(0)?.get(0)?.to_vec1()?;
        let block: Vec<f32> = [(0, 0), (0, 1), (1, 0), (1, 1)]
            .iter()
            .flat_map(|&(r, c)| {
                x.get(0)
                    .and_then(|x| x.get(0))
                    .and_then(|x| x.get(r))
                    .and_then(|x| x.get(c))
                    .and_then(|x| x.to_vec1::<f32>())
                    .unwrap()
            })
            .collect();
        assert_eq!(first, block);
        let back = depth_to_space(&y)?;
        assert_eq!(
            back.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    /// Encodes rows of 4 token ids (0 = padding).
    fn encode(text: &super::super::TextEncoder, rows: &[[u32; 4]]) -> Result<TextCond> {
        let ids: Vec<u32> = rows.iter().flatten().copied().collect();
        let mask = ids
            .iter()
            .map(|&i| if i == 0 { 0.0 } else { 1.0 })
            .collect();
        text.forward(&super::super::tokenizer::TokenBatch {
            ids,
            mask,
            max_len: 4,
        })
    }

    fn tiny_unet_config() -> TinyConfig {
        TinyConfig {
            denoiser: super::super::config::DenoiserKind::Unet,
            dim: 32,
            depth: 1,
            heads: 2,
            text_dim: 32,
            text_depth: 1,
            vocab_size: 43,
            unet_channels: vec![8, 16, 16],
            image_size: 16,
            ..TinyConfig::default()
        }
    }

    /// With `conv2`/`conv_out` at zero a fresh UNet predicts zero; with every weight random
    /// the velocity depends on the prompt and on the other frames, and a sample's result does
    /// not depend on its batch.
    #[test]
    fn output_has_the_input_shape_and_depends_on_prompt_and_frames() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny_unet_config();
        let x = Tensor::randn(0f32, 1., (2, 4, 3, 16, 16), &dev)?;
        let build = |zero_std_random: bool| -> Result<(UNet, TextCond, TextCond)> {
            let map = VarMap::new();
            let vb = if zero_std_random {
                crate::nn::random_var_builder(&map, 3, DType::F32, &dev)
            } else {
                crate::nn::seeded_var_builder(&map, 3, DType::F32, &dev)
            };
            let text = super::super::TextEncoder::new(vb.pp("text"), &cfg)?;
            let net = UNet::new(vb.pp("unet"), &cfg)?;
            let cond = encode(&text, &[[2, 5, 7, 0], [2, 9, 11, 12]])?;
            let second = encode(&text, &[[2, 9, 11, 12]])?;
            Ok((net, cond, second))
        };
        let (net, cond, _) = build(false)?;
        let v = net.forward_with_features(&x, &[0.3, 0.7], &cond, false)?.0;
        assert_eq!(v.dims(), x.dims());
        assert_eq!(v.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);

        let (net, cond, second) = build(true)?;
        let (v, feats) = net.forward_with_features(&x, &[0.3, 0.7], &cond, true)?;
        assert_eq!(feats.unwrap().dims(), &[2, 4 * 16, 16]);
        let same_x = Tensor::cat(&[&x.get(0)?.unsqueeze(0)?, &x.get(0)?.unsqueeze(0)?], 0)?;
        let v2 = net
            .forward_with_features(&same_x, &[0.3, 0.3], &cond, false)?
            .0;
        let diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(
            diff(&v2.get(0)?, &v2.get(1)?)? > 1e-3,
            "prompt has no effect"
        );
        assert!(diff(&v.get(0)?, &v2.get(0)?)? < 1e-5, "batch changed a row");
        // Frames see each other through temporal attention.
        let mut frames = x.get(0)?.unsqueeze(0)?;
        let v_all = net
            .forward_with_features(&frames, &[0.3], &second, false)?
            .0;
        frames = frames.slice_assign(
            &[0..1, 3..4, 0..3, 0..16, 0..16],
            &Tensor::zeros((1, 1, 3, 16, 16), DType::F32, &dev)?,
        )?;
        let v_changed = net
            .forward_with_features(&frames, &[0.3], &second, false)?
            .0;
        assert!(
            diff(&v_all.narrow(1, 0, 1)?, &v_changed.narrow(1, 0, 1)?)? > 1e-4,
            "frame 0 ignores frame 3"
        );
        Ok(())
    }

    #[test]
    fn every_variable_gets_a_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = tiny_unet_config();
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 4, DType::F32, &dev);
        let text = super::super::TextEncoder::new(vb.pp("text"), &cfg)?;
        let net = UNet::new(vb.pp("unet"), &cfg)?;
        let cond = encode(&text, &[[2, 5, 7, 0]])?;
        let x = Tensor::randn(0f32, 1., (1, 2, 3, 16, 16), &dev)?;
        let v = net.forward_with_features(&x, &[0.5], &cond, false)?.0;
        let grads = v.sqr()?.sum_all()?.backward()?;
        for (name, var) in crate::train::named_vars(&map) {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            assert!(
                g.abs()?.max_all()?.to_scalar::<f32>()? > 0.0,
                "{name}: zero gradient"
            );
        }
        Ok(())
    }
}
