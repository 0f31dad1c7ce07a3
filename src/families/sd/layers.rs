//! Generic layers of the diffusers models (UNet, VAE, CLIP), composed from candle ops that
//! have a backward so the same code serves and trains. Parameter names follow PyTorch
//! (`weight`, `bias`), so a `VarBuilder` over a diffusers safetensors file loads them as is.
//!
//! Norms compute in f32 when the model runs in half precision, like PyTorch's autocast does,
//! because their reductions lose too much in bf16/f16.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::nn::{LoraAdapter, LoraConfig};

/// Runs `f` on `x` in f32 when `x` is half precision and casts the result back.
pub(crate) fn in_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype()),
        _ => f(x),
    }
}

/// `torch.nn.GroupNorm` with affine parameters, over `[B, C, ...]`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "group norm {}: {channels} channels are not divisible into {groups} groups",
                vb.prefix()
            );
        }
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", candle_nn::init::ONE)?,
            bias: vb.get_with_hints(channels, "bias", candle_nn::init::ZERO)?,
            groups,
            eps,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() < 2 {
            candle_core::bail!("group norm: expected [B, C, ...], got {:?}", dims);
        }
        let (b, c) = (dims[0], dims[1]);
        let g = self.groups;
        let y = in_f32(x, |x| {
            let grouped = x.reshape((b, g, ()))?;
            let mean = grouped.mean_keepdim(D::Minus1)?;
            let centered = grouped.broadcast_sub(&mean)?;
            let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
                .sqrt()?
                .recip()?;
            // Fold the per-group 1/std and the per-channel weight into one [B, C] factor, so
            // the full-size tensor is touched by a single multiply and a single add.
            let mut stat_shape = vec![b, c];
            stat_shape.extend(std::iter::repeat_n(1, dims.len() - 2));
            let mut param_shape = vec![1, c];
            param_shape.extend(std::iter::repeat_n(1, dims.len() - 2));
            let rstd = rstd.broadcast_as((b, g, c / g))?.reshape(stat_shape)?;
            let w = self
                .weight
                .to_dtype(x.dtype())?
                .reshape(param_shape.clone())?;
            let bias = self.bias.to_dtype(x.dtype())?.reshape(param_shape)?;
            centered
                .reshape(dims.as_slice())?
                .broadcast_mul(&rstd.broadcast_mul(&w)?)?
                .broadcast_add(&bias)
        })?;
        Ok(y)
    }
}

/// `torch.nn.LayerNorm` over the last dimension with affine parameters.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::init::ONE)?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::init::ZERO)?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        in_f32(x, |x| {
            crate::nn::layer_norm(x, self.eps)?
                .broadcast_mul(&self.weight.to_dtype(x.dtype())?)?
                .broadcast_add(&self.bias.to_dtype(x.dtype())?)
        })
    }
}

/// A callback over the adaptable convolutions of a module tree: the layer's state-dict path
/// (e.g. `down_blocks.0.resnets.1.conv2`) and the layer.
pub type VisitConv<'a> = dyn FnMut(&str, &mut Conv2d) -> Result<()> + 'a;

/// `torch.nn.Conv2d` (square kernel, no groups) with a bias and an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    lora: Option<LoraAdapter>,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        Ok(Self {
            weight: vb.get_with_hints((out_ch, in_ch, kernel, kernel), "weight", init)?,
            bias: vb.get_with_hints(out_ch, "bias", candle_nn::init::ZERO)?,
            stride,
            padding,
            lora: None,
        })
    }

    /// The kernel size `k` with `(k - 1) / 2` padding and stride 1: the shape is kept.
    pub fn same(vb: VarBuilder, in_ch: usize, out_ch: usize, kernel: usize) -> Result<Self> {
        Self::new(vb, in_ch, out_ch, kernel, 1, (kernel - 1) / 2)
    }

    /// The base weight `[out, in, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    /// Adds (or replaces) a LoRA adapter (PEFT's conv LoRA: `lora_A` a conv with this
    /// layer's kernel, stride and padding, `lora_B` a 1x1 conv) whose weights come from
    /// `vb`, which points at this layer's path. Rank 0 leaves the layer as it is.
    pub fn attach_lora(&mut self, vb: VarBuilder, cfg: &LoraConfig) -> Result<()> {
        if cfg.enabled() {
            let (out_ch, in_ch, kernel, _) = self.weight.dims4()?;
            self.lora = Some(LoraAdapter::new_conv(vb, in_ch, out_ch, kernel, cfg)?);
        }
        Ok(())
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = if self.weight.dim(3)? == 3 && (self.stride, self.padding) == (1, 1) {
            crate::nn::direct_conv::conv3x3(x, &self.weight)?
        } else {
            x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?
        };
        if let Some(lora) = &self.lora {
            y = (y + lora.conv_delta(x, self.padding, self.stride)?)?;
        }
        y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)
    }
}

/// A 1x1 `torch.nn.Conv2d` applied to channel-last tokens `[..., C]` as one GEMM: the same
/// function as the convolution on `[B, C, H, W]`, without im2col. Loads the conv's
/// `[out, in, 1, 1]` weight.
#[derive(Debug, Clone)]
pub struct PointwiseConv {
    weight: Tensor,
    bias: Tensor,
}

impl PointwiseConv {
    pub fn new(vb: VarBuilder, in_ch: usize, out_ch: usize) -> Result<Self> {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        Ok(Self {
            weight: vb.get_with_hints((out_ch, in_ch, 1, 1), "weight", init)?,
            bias: vb.get_with_hints(out_ch, "bias", candle_nn::init::ZERO)?,
        })
    }
}

impl Module for PointwiseConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        // Reshaped per call (a view): the weight stays the trainable variable itself.
        let w = self.weight.flatten_from(1)?;
        let y = x
            .reshape((x.elem_count() / in_dim.max(1), in_dim))?
            .matmul(&w.t()?)?
            .broadcast_add(&self.bias)?;
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = w.dim(0)?;
        y.reshape(out)
    }
}

/// diffusers' `get_timestep_embedding` (the `Timesteps` module): `[N]` values to `[N, dim]`
/// sinusoids with frequencies `exp(-ln(max_period) * j / (dim/2 - freq_shift))`, sines first
/// unless `flip_sin_to_cos`. Computed in f32 like PyTorch; an odd `dim` gets a zero column.
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let denom = half as f32 - freq_shift as f32;
    let ln_period = 10_000f32.ln();
    let freqs: Vec<f32> = (0..half)
        .map(|j| (-ln_period * j as f32 / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .flatten_all()?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let mut emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb = emb.pad_with_zeros(1, 0, 1)?;
    }
    Ok(emb)
}

/// diffusers' `TimestepEmbedding` with SiLU: `linear_2(silu(linear_1(x)))`.
#[derive(Debug, Clone)]
pub struct TimestepMlp {
    linear_1: crate::nn::Linear,
    linear_2: crate::nn::Linear,
}

impl TimestepMlp {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: crate::nn::Linear::new(vb.pp("linear_1"), in_dim, out_dim)?,
            linear_2: crate::nn::Linear::new(vb.pp("linear_2"), out_dim, out_dim)?,
        })
    }
}

impl Module for TimestepMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// diffusers' `GEGLU`: `proj` to twice the width, then `hidden * gelu(gate)` with the exact
/// (erf) gelu, the first half being `hidden`.
#[derive(Debug, Clone)]
pub struct Geglu {
    proj: crate::nn::Linear,
}

impl Geglu {
    pub fn new(vb: VarBuilder, dim_in: usize, dim_out: usize) -> Result<Self> {
        Ok(Self {
            proj: crate::nn::Linear::new(vb.pp("proj"), dim_in, 2 * dim_out)?,
        })
    }

    /// The projection (`proj`), for attaching LoRA adapters.
    pub fn proj_mut(&mut self) -> &mut crate::nn::Linear {
        &mut self.proj
    }
}

impl Module for Geglu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        let half = h.dim(D::Minus1)? / 2;
        let hidden = h.narrow(D::Minus1, 0, half)?;
        let gate = h.narrow(D::Minus1, half, half)?;
        hidden * gate.gelu_erf()?
    }
}

/// Nearest-neighbour resize of `[B, C, H, W]` to `[B, C, out_h, out_w]` with PyTorch's index
/// rule (`src = floor(dst * in / out)`). The exact 2x case is a broadcast and a reshape:
/// candle's `upsample_nearest2d` backward overwrites instead of accumulating the gradient.
pub fn upsample_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if out_h == 2 * h && out_w == 2 * w {
        return x
            .reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .reshape((b, c, out_h, out_w));
    }
    let index = |inp: usize, out: usize| -> Result<Tensor> {
        let scale = inp as f32 / out as f32;
        let ids: Vec<u32> = (0..out)
            .map(|i| ((i as f32 * scale).floor() as usize).min(inp - 1) as u32)
            .collect();
        Tensor::from_vec(ids, out, x.device())
    };
    x.index_select(&index(h, out_h)?, 2)?
        .index_select(&index(w, out_w)?, 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::sd::testing::max_abs_diff;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn group_norm_normalizes_each_group_and_applies_the_affine() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(3f32, 2.0, (2, 6, 4, 5), &dev)?;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let gn = GroupNorm::new(vb, 3, 6, 1e-5)?;
        let y = gn.forward(&x)?;
        // Fresh parameters are (1, 0): every group has mean 0 and variance 1.
        let g = y.reshape((2, 3, 40))?;
        assert!(g.mean(2)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        let var = g.sqr()?.mean(2)?;
        assert!(max_abs_diff(&var, &var.ones_like()?) < 1e-3);
        // Against a direct per-group computation with a non-trivial affine.
        let w = Tensor::new(&[1f32, 2., 3., 4., 5., 6.], &dev)?;
        let b = Tensor::new(&[0.5f32, -1., 0., 1., 2., 3.], &dev)?;
        let gn = GroupNorm {
            weight: w.clone(),
            bias: b.clone(),
            groups: 3,
            eps: 1e-5,
        };
        let expect = y
            .broadcast_mul(&w.reshape((1, 6, 1, 1))?)?
            .broadcast_add(&b.reshape((1, 6, 1, 1))?)?;
        assert!(max_abs_diff(&gn.forward(&x)?, &expect) < 1e-5);
        Ok(())
    }

    #[test]
    fn timestep_embedding_matches_the_diffusers_formula() -> Result<()> {
        let dev = Device::Cpu;
        let t = Tensor::new(&[0f32, 10.0, 999.0], &dev)?;
        let emb = timestep_embedding(&t, 8, true, 1.0)?.to_vec2::<f32>()?;
        // dim 8, shift 1: freq_j = exp(-ln(1e4) * j / 3); flip puts cos first.
        for (row, tv) in emb.iter().zip([0f32, 10.0, 999.0]) {
            for j in 0..4 {
                let f = (-(10_000f32.ln()) * j as f32 / 3.0).exp();
                assert!((row[j] - (tv * f).cos()).abs() < 1e-4);
                assert!((row[4 + j] - (tv * f).sin()).abs() < 1e-4);
            }
        }
        let odd = timestep_embedding(&t, 7, false, 0.0)?;
        assert_eq!(odd.dims(), &[3, 7]);
        assert_eq!(
            odd.narrow(1, 6, 1)?.abs()?.sum_all()?.to_scalar::<f32>()?,
            0.0
        );
        Ok(())
    }

    #[test]
    fn upsample_matches_candle_and_accumulates_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &dev)?)?;
        let up = upsample_nearest(x.as_tensor(), 8, 10)?;
        assert!(max_abs_diff(&up, &x.as_tensor().upsample_nearest2d(8, 10)?) == 0.0);
        let odd = upsample_nearest(x.as_tensor(), 7, 9)?;
        assert!(max_abs_diff(&odd, &x.as_tensor().upsample_nearest2d(7, 9)?) == 0.0);
        // x is used twice: the gradient must be the sum of both paths (4 + 1 per element).
        let loss = (up.sum_all()? + x.as_tensor().sum_all()?)?;
        let g = loss.backward()?;
        let gx = g.get(x.as_tensor()).expect("gradient of x");
        assert!(max_abs_diff(gx, &(gx.ones_like()? * 5.0)?) < 1e-6);
        Ok(())
    }

    #[test]
    fn pointwise_conv_equals_the_convolution() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 3, DType::F32, &dev);
        let conv = Conv2d::new(vb.pp("c"), 6, 5, 1, 1, 0)?;
        let pw = PointwiseConv::new(vb.pp("c"), 6, 5)?;
        let x = Tensor::randn(0f32, 1.0, (2, 6, 3, 4), &dev)?;
        let tokens = x.permute((0, 2, 3, 1))?;
        let a = pw.forward(&tokens)?.permute((0, 3, 1, 2))?;
        assert!(max_abs_diff(&a, &conv.forward(&x)?) < 1e-5);
        Ok(())
    }
}
