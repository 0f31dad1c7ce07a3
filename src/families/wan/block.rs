//! One `WanTransformerBlock`: modulated self-attention with 3D RoPE, cross-attention to the
//! text, and a modulated GELU-tanh feed-forward. State-dict names are diffusers'.
//!
//! diffusers keeps the modulation table and the norms in f32 (`_keep_in_fp32_modules`) and
//! adds the gated residuals in f32; so do we when the model runs in half precision.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::rope::apply_rope;
use crate::families::sd::layers::LayerNorm;
use crate::nn::attention::{merge_heads, sdpa, split_heads};
use crate::nn::{gated_residual, layer_norm_modulate, Linear, VisitLinear};

/// RMS norm over the whole projection (all heads at once, `qk_norm="rms_norm_across_heads"`),
/// composed of candle ops (candle's fused `rms_norm` has no backward).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::init::ONE)?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(wide(dtype))?;
        let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        xf.broadcast_div(&rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight.to_dtype(dtype)?)
    }
}

/// f32 for half precision, the dtype itself otherwise.
pub(super) fn wide(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// `vb` loading in f32 when the model is half precision (diffusers' fp32 modules).
pub(super) fn wide_vb<'a>(vb: &VarBuilder<'a>) -> VarBuilder<'a> {
    vb.clone().set_dtype(wide(vb.dtype()))
}

/// `WanAttention` without image conditioning: q/k/v projections, RMS-normalised q and k,
/// RoPE on self-attention, and `to_out.0`.
#[derive(Debug, Clone)]
pub struct WanAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    heads: usize,
}

impl WanAttention {
    pub fn new(vb: VarBuilder, dim: usize, heads: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), dim, dim)?,
            to_k: Linear::new(vb.pp("to_k"), dim, dim)?,
            to_v: Linear::new(vb.pp("to_v"), dim, dim)?,
            to_out: Linear::new(vb.pp("to_out.0"), dim, dim)?,
            norm_q: RmsNorm::new(vb.pp("norm_q"), dim, eps)?,
            norm_k: RmsNorm::new(vb.pp("norm_k"), dim, eps)?,
            heads,
        })
    }

    /// `x` `[B, T, D]` attends to `context` `[B, L, D]` (itself when `None`); `rope` is the
    /// `(cos, sin)` pair of [`super::rope::rope_tables`] for self-attention.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        rope: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        let ctx = context.unwrap_or(x);
        let q = self.norm_q.forward(&self.to_q.forward(x)?)?;
        let k = self.norm_k.forward(&self.to_k.forward(ctx)?)?;
        let mut q = split_heads(&q, self.heads)?;
        let mut k = split_heads(&k, self.heads)?;
        let v = split_heads(&self.to_v.forward(ctx)?, self.heads)?;
        if let Some((cos, sin)) = rope {
            // The tables are f32 for half-precision models (diffusers rotates in f64).
            let rotate =
                |x: &Tensor| apply_rope(&x.to_dtype(cos.dtype())?, cos, sin)?.to_dtype(x.dtype());
            q = rotate(&q)?;
            k = rotate(&k)?;
        }
        let o = sdpa(&q, &k, &v, None)?;
        self.to_out.forward(&merge_heads(&o, b)?)
    }

    fn visit_linears(&mut self, prefix: &str, f: &mut VisitLinear) -> Result<()> {
        f(&format!("{prefix}.to_q"), &mut self.to_q)?;
        f(&format!("{prefix}.to_k"), &mut self.to_k)?;
        f(&format!("{prefix}.to_v"), &mut self.to_v)?;
        f(&format!("{prefix}.to_out.0"), &mut self.to_out)
    }
}

/// diffusers' `FeedForward(activation_fn="gelu-approximate")`: `net.0.proj`, tanh GELU,
/// `net.2`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            proj_in: Linear::new(vb.pp("net.0.proj"), dim, inner)?,
            proj_out: Linear::new(vb.pp("net.2"), inner, dim)?,
        })
    }

    fn visit_linears(&mut self, prefix: &str, f: &mut VisitLinear) -> Result<()> {
        f(&format!("{prefix}.net.0.proj"), &mut self.proj_in)?;
        f(&format!("{prefix}.net.2"), &mut self.proj_out)
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation, PyTorch's `approximate="tanh"`.
        self.proj_out.forward(&self.proj_in.forward(x)?.gelu()?)
    }
}

/// The six modulation rows of a block, each `[B, D]` in f32 (or f64).
struct Modulation {
    shift_msa: Tensor,
    scale_msa: Tensor,
    gate_msa: Tensor,
    c_shift: Tensor,
    c_scale: Tensor,
    c_gate: Tensor,
}

/// `WanTransformerBlock`.
#[derive(Debug, Clone)]
pub struct WanBlock {
    attn1: WanAttention,
    attn2: WanAttention,
    norm2: Option<LayerNorm>,
    ffn: FeedForward,
    /// `[1, 6, D]`, kept in f32 for half-precision models.
    scale_shift_table: Tensor,
    eps: f64,
}

/// Block hyper-parameters.
pub struct BlockDims {
    pub dim: usize,
    pub ffn_dim: usize,
    pub heads: usize,
    pub eps: f64,
    pub cross_attn_norm: bool,
}

impl WanBlock {
    pub fn new(vb: VarBuilder, d: &BlockDims) -> Result<Self> {
        let norm2 = if d.cross_attn_norm {
            Some(LayerNorm::new(wide_vb(&vb).pp("norm2"), d.dim, d.eps)?)
        } else {
            None
        };
        let table =
            wide_vb(&vb).get_with_hints((1, 6, d.dim), "scale_shift_table", normal(d.dim))?;
        Ok(Self {
            attn1: WanAttention::new(vb.pp("attn1"), d.dim, d.heads, d.eps)?,
            attn2: WanAttention::new(vb.pp("attn2"), d.dim, d.heads, d.eps)?,
            norm2,
            ffn: FeedForward::new(vb.pp("ffn"), d.dim, d.ffn_dim)?,
            scale_shift_table: table,
            eps: d.eps,
        })
    }

    /// `temb6`: the time projection `[B, 6, D]`; `context`: projected text `[B, L, D]`.
    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        temb6: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let m = self.modulation(temb6)?;
        let xw = x.to_dtype(m.shift_msa.dtype())?;

        let h = layer_norm_modulate(&xw, &m.shift_msa, &m.scale_msa, self.eps)?.to_dtype(dtype)?;
        let attn = self.attn1.forward(&h, None, Some(rope))?;
        let x = gated_residual(&xw, &m.gate_msa, &attn.to_dtype(xw.dtype())?)?.to_dtype(dtype)?;

        let h = match &self.norm2 {
            Some(norm) => norm.forward(&x)?,
            None => x.clone(),
        };
        let x = (&x + self.attn2.forward(&h, Some(context), None)?)?;

        let xw = x.to_dtype(m.shift_msa.dtype())?;
        let h = layer_norm_modulate(&xw, &m.c_shift, &m.c_scale, self.eps)?.to_dtype(dtype)?;
        let ff = self.ffn.forward(&h)?.to_dtype(xw.dtype())?;
        gated_residual(&xw, &m.c_gate, &ff)?.to_dtype(dtype)
    }

    fn modulation(&self, temb6: &Tensor) -> Result<Modulation> {
        let table = &self.scale_shift_table;
        let mods = table.broadcast_add(&temb6.to_dtype(table.dtype())?)?;
        let row = |i: usize| mods.narrow(1, i, 1)?.squeeze(1);
        Ok(Modulation {
            shift_msa: row(0)?,
            scale_msa: row(1)?,
            gate_msa: row(2)?,
            c_shift: row(3)?,
            c_scale: row(4)?,
            c_gate: row(5)?,
        })
    }

    /// Visits `attn1`, `attn2` and `ffn` layers, the targets of video DMD LoRA recipes.
    pub fn visit_linears(&mut self, prefix: &str, f: &mut VisitLinear) -> Result<()> {
        self.attn1.visit_linears(&format!("{prefix}.attn1"), f)?;
        self.attn2.visit_linears(&format!("{prefix}.attn2"), f)?;
        self.ffn.visit_linears(&format!("{prefix}.ffn"), f)
    }
}

/// diffusers' init of a modulation table, `randn / sqrt(dim)`, for fresh models.
pub(super) fn normal(dim: usize) -> candle_nn::Init {
    candle_nn::Init::Randn {
        mean: 0.0,
        stdev: 1.0 / (dim as f64).sqrt(),
    }
}
