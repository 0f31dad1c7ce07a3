//! diffusers' `Transformer2DModel` (continuous input) with `BasicTransformerBlock`s: the
//! spatial self- and cross-attention of the SD UNet.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::AttnSpec;
use crate::families::sd::layers::{in_f32, Geglu, GroupNorm, LayerNorm, PointwiseConv};
use crate::nn::attention::{merge_heads, split_heads};
use crate::nn::fused_attention::try_attend;
use crate::nn::{Linear, VisitLinear};

/// Score tensors above this many elements are computed in slices of heads, which bounds
/// the memory of attention over large latents (64x64 latents are 4096 tokens).
const MAX_SCORE_ELEMS: usize = 1 << 26;

/// Softmax attention over `[N, Tq, Dh]` x `[N, Tk, Dh]`. In half precision the softmax runs
/// in f32 (diffusers' `upcast_softmax`; `upcast_attention` is thereby covered too).
fn attend(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(2)? as f64).sqrt();
    let scores = (q * scale)?.matmul(&k.t()?)?;
    let probs = if !scores.device().is_cpu() && !scores.track_op() {
        // Forward-only on a GPU: candle's fused kernel already accumulates half precision in
        // f32, and skipping the upcast copies saves three passes over the largest tensor of
        // the network. It has no backward, so training keeps the path below.
        candle_nn::ops::softmax_last_dim(&scores)?
    } else {
        in_f32(&scores, crate::nn::softmax_last_dim)?
    };
    probs.matmul(v)
}

/// diffusers' `Attention` with the `AttnProcessor2_0` defaults of the SD UNet: bias-free
/// `to_q`/`to_k`/`to_v`, `to_out.0` with bias, softmax scale `1/sqrt(head_dim)`.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// `context_dim` is the key/value input width (the query width for self-attention).
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::no_bias(vb.pp("to_q"), query_dim, inner)?,
            to_k: Linear::no_bias(vb.pp("to_k"), context_dim, inner)?,
            to_v: Linear::no_bias(vb.pp("to_v"), context_dim, inner)?,
            to_out: Linear::new(vb.pp("to_out").pp("0"), inner, query_dim)?,
            heads,
        })
    }

    /// `x`: `[B, T, query_dim]`; `context`: `[B, L, context_dim]`, or `None` to attend to `x`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let context = context.unwrap_or(x);
        let (q, k, v) = (
            self.to_q.forward(x)?,
            self.to_k.forward(context)?,
            self.to_v.forward(context)?,
        );
        // f32 on the CPU: one fused op, which bounds its own memory (no slicing needed).
        if let Some(o) = try_attend(&q, &k, &v, self.heads, None)? {
            return self.to_out.forward(&o);
        }
        let q = split_heads(&q, self.heads)?;
        let k = split_heads(&k, self.heads)?;
        let v = split_heads(&v, self.heads)?;
        let (n, tk) = (q.dim(0)?, k.dim(1)?);
        let chunk = (MAX_SCORE_ELEMS / (t * tk).max(1)).clamp(1, n);
        let out = if chunk >= n {
            attend(&q, &k, &v)?
        } else {
            let parts = (0..n)
                .step_by(chunk)
                .map(|s| {
                    let len = chunk.min(n - s);
                    attend(
                        &q.narrow(0, s, len)?,
                        &k.narrow(0, s, len)?,
                        &v.narrow(0, s, len)?,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?
        };
        self.to_out.forward(&merge_heads(&out, b)?)
    }

    fn visit_linears(&mut self, prefix: &str, f: &mut VisitLinear) -> Result<()> {
        f(&format!("{prefix}.to_q"), &mut self.to_q)?;
        f(&format!("{prefix}.to_k"), &mut self.to_k)?;
        f(&format!("{prefix}.to_v"), &mut self.to_v)?;
        f(&format!("{prefix}.to_out.0"), &mut self.to_out)
    }
}

/// diffusers' `BasicTransformerBlock` as the SD UNet configures it: pre-LayerNorm
/// self-attention, cross-attention and a GEGLU feed-forward, each with a residual.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Geglu,
    ff_out: Linear,
}

impl TransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_dim: usize,
    ) -> Result<Self> {
        let ff = vb.pp("ff").pp("net");
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(vb.pp("attn2"), dim, cross_dim, heads, head_dim)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff_in: Geglu::new(ff.pp("0"), dim, 4 * dim)?,
            ff_out: Linear::new(ff.pp("2"), 4 * dim, dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn1.forward(&self.norm1.forward(x)?, None)?)?;
        let x = (&x
            + self
                .attn2
                .forward(&self.norm2.forward(&x)?, Some(context))?)?;
        let ff = self
            .ff_out
            .forward(&self.ff_in.forward(&self.norm3.forward(&x)?)?)?;
        x + ff
    }

    /// Visits the attentions' projections and the feed-forward's two layers.
    pub fn visit_linears(&mut self, prefix: &str, f: &mut VisitLinear) -> Result<()> {
        self.attn1.visit_linears(&format!("{prefix}.attn1"), f)?;
        self.attn2.visit_linears(&format!("{prefix}.attn2"), f)?;
        f(&format!("{prefix}.ff.net.0.proj"), self.ff_in.proj_mut())?;
        f(&format!("{prefix}.ff.net.2"), &mut self.ff_out)
    }
}

/// The token projections of `Transformer2DModel`: a `Linear` (`use_linear_projection`,
/// SD2/SDXL) or a 1x1 convolution (SD1), both applied to channel-last tokens.
#[derive(Debug, Clone)]
enum Projection {
    Linear(Linear),
    Conv(PointwiseConv),
}

impl Projection {
    fn new(vb: VarBuilder, linear: bool, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(if linear {
            Self::Linear(Linear::new(vb, in_dim, out_dim)?)
        } else {
            Self::Conv(PointwiseConv::new(vb, in_dim, out_dim)?)
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Linear(l) => l.forward(x),
            Self::Conv(c) => c.forward(x),
        }
    }

    /// Visits the projection when it is a `Linear` (a 1x1 convolution is not visited).
    fn visit_linears(&mut self, path: &str, f: &mut VisitLinear) -> Result<()> {
        match self {
            Self::Linear(l) => f(path, l),
            Self::Conv(_) => Ok(()),
        }
    }
}

/// diffusers' `Transformer2DModel` over `[B, C, H, W]`: group norm, projection to tokens,
/// transformer blocks, projection back and a residual.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        spec: &AttnSpec,
        groups: usize,
        linear_projection: bool,
    ) -> Result<Self> {
        // As in diffusers: head_dim = channels / heads, inner width = heads * head_dim.
        let head_dim = channels / spec.heads;
        if head_dim == 0 {
            candle_core::bail!(
                "{}: {} heads for {channels} channels",
                vb.prefix(),
                spec.heads
            );
        }
        let inner = spec.heads * head_dim;
        let blocks = (0..spec.layers)
            .map(|j| {
                let vb = vb.pp("transformer_blocks").pp(j);
                TransformerBlock::new(vb, inner, spec.heads, head_dim, spec.cross_dim)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            // diffusers fixes this norm's eps at 1e-6, whatever `norm_eps` says.
            norm: GroupNorm::new(vb.pp("norm"), groups, channels, 1e-6)?,
            proj_in: Projection::new(vb.pp("proj_in"), linear_projection, channels, inner)?,
            blocks,
            proj_out: Projection::new(vb.pp("proj_out"), linear_projection, inner, channels)?,
        })
    }

    /// `x`: `[B, C, H, W]`; `context`: `[B, L, cross_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.norm.forward(x)?.permute((0, 2, 3, 1))?;
        let mut t = self.proj_in.forward(&tokens)?.reshape((b, h * w, ()))?;
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let out = self.proj_out.forward(&t)?.reshape((b, h, w, c))?;
        out.permute((0, 3, 1, 2))? + x
    }

    /// Visits `proj_in`, every transformer block's layers and `proj_out`.
    pub fn visit_linears(&mut self, prefix: &str, f: &mut VisitLinear) -> Result<()> {
        self.proj_in
            .visit_linears(&format!("{prefix}.proj_in"), f)?;
        for (j, block) in self.blocks.iter_mut().enumerate() {
            block.visit_linears(&format!("{prefix}.transformer_blocks.{j}"), f)?;
        }
        self.proj_out
            .visit_linears(&format!("{prefix}.proj_out"), f)
    }
}
