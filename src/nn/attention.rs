//! Multi-head attention composed of differentiable ops.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::fused_attention::attend;
use super::Linear;

/// Scaled dot-product attention over `[B*H, Tq, Dh]` x `[B*H, Tk, Dh]`, with an optional
/// additive bias broadcastable to `[B*H, Tq, Tk]` (0 for visible keys, a large negative value
/// for padding). Uses the one-pass softmax with a backward (`super::softmax`).
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    attention_probs(q, k, bias)?.matmul(v)
}

/// `[B, T, H*Dh]` -> `[B*H, T, Dh]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    x.reshape((b, t, heads, d / heads))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * heads, t, d / heads))
}

/// `[B*H, T, Dh]` -> `[B, T, H*Dh]`, the inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor, batch: usize) -> Result<Tensor> {
    let (bh, t, dh) = x.dims3()?;
    let heads = bh / batch;
    x.reshape((batch, heads, t, dh))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((batch, t, heads * dh))
}

/// Self-attention with a fused QKV projection.
#[derive(Debug, Clone)]
pub struct Attention {
    qkv: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    /// `zero_out` starts the output projection at zero, so a freshly added branch is the
    /// identity on its residual stream.
    pub fn new(vb: VarBuilder, dim: usize, heads: usize, zero_out: bool) -> Result<Self> {
        let qkv = Linear::new(vb.pp("qkv"), dim, 3 * dim)?;
        let out = if zero_out {
            Linear::zeros(vb.pp("out"), dim, dim)?
        } else {
            Linear::new(vb.pp("out"), dim, dim)?
        };
        Ok(Self { qkv, out, heads })
    }

    /// `x`: `[B, T, D]`; `bias`: additive key bias broadcastable to `[B*H, T, T]`.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let qkv = self.qkv.forward(x)?;
        let part = |i: usize| qkv.narrow(D::Minus1, i * d, d);
        let o = attend(&part(0)?, &part(1)?, &part(2)?, self.heads, bias)?;
        self.out.forward(&o)
    }
}

impl Attention {
    /// Self-attention across the `frames` frames of `x` (`[B, F*N, D]`, frame-major) at each
    /// of the `N` positions of a frame: what lets a video's frames see each other.
    pub fn forward_across_frames(&self, x: &Tensor, frames: usize) -> Result<Tensor> {
        let (b, fnn, d) = x.dims3()?;
        let n = fnn / frames;
        let across = x
            .reshape((b, frames, n, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * n, frames, d))?;
        self.forward(&across, None)?
            .reshape((b, n, frames, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, fnn, d))
    }
}

/// Attention from image tokens to text tokens.
#[derive(Debug, Clone)]
pub struct CrossAttention {
    q: Linear,
    kv: Linear,
    out: Linear,
    heads: usize,
}

impl CrossAttention {
    pub fn new(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            q: Linear::new(vb.pp("q"), dim, dim)?,
            kv: Linear::new(vb.pp("kv"), context_dim, 2 * dim)?,
            out: Linear::zeros(vb.pp("out"), dim, dim)?,
            heads,
        })
    }

    /// `x`: `[B, T, D]`, `context`: `[B, L, Dc]`, `bias`: `[B*H, 1, L]` key-padding bias.
    pub fn forward(&self, x: &Tensor, context: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (b, _t, d) = x.dims3()?;
        let q = self.q.forward(x)?;
        let kv = self.kv.forward(context)?;
        let k = kv.narrow(D::Minus1, 0, d)?;
        let v = kv.narrow(D::Minus1, d, d)?;
        if CAPTURE.with(|c| c.borrow().is_some()) {
            let (qh, kh) = (split_heads(&q, self.heads)?, split_heads(&k, self.heads)?);
            let probs = attention_probs(&qh, &kh, bias)?.detach();
            let (bh, tq, l) = probs.dims3()?;
            let per_row = probs
                .reshape((b, bh / b, tq, l))?
                .mean(1)?
                .to_device(&candle_core::Device::Cpu)?;
            CAPTURE.with(|c| {
                if let Some(v) = c.borrow_mut().as_mut() {
                    v.push(per_row)
                }
            });
        }
        self.out.forward(&attend(&q, &k, &v, self.heads, bias)?)
    }
}

/// `softmax(q k^T / sqrt(d) + bias)`, the weights [`sdpa`] applies.
fn attention_probs(q: &Tensor, k: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(b) = bias {
        scores = scores.broadcast_add(b)?;
    }
    super::softmax_last_dim(&scores)
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Vec<Tensor>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` and returns, beside its result, the cross-attention weights of every
/// [`CrossAttention`] it ran on this thread, in call order: `[B, Tq, L]` each, averaged over
/// heads, on the CPU. A diagnostic hook (`fewstep eval --probe`): how much of an image
/// token's attention each prompt word gets. Outside it, forward costs nothing extra.
pub fn capture_cross_attention<R>(f: impl FnOnce() -> R) -> (R, Vec<Tensor>) {
    let previous = CAPTURE.with(|c| c.borrow_mut().replace(Vec::new()));
    let out = f();
    let captured = CAPTURE.with(|c| std::mem::replace(&mut *c.borrow_mut(), previous));
    (out, captured.unwrap_or_default())
}
