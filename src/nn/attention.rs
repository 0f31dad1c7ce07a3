//! Multi-head attention composed of differentiable ops.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::fused_attention::attend;
use super::Linear;

/// Scaled dot-product attention over `[B*H, Tq, Dh]` x `[B*H, Tk, Dh]`, with an optional
/// additive bias broadcastable to `[B*H, Tq, Tk]` (0 for visible keys, a large negative value
/// for padding). Uses the one-pass softmax with a backward (`super::softmax`).
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    sdpa_in_groups(q, k, v, bias, MAX_SCORES)
}

/// The most attention scores computed at once. candle's CUDA elementwise kernels count
/// elements in 32-bit ints, so a larger score tensor would not be computed whole (Wan2.1 at
/// 81 frames of 832x480 has 12 heads of 32,760^2); above it, [`sdpa`] takes a few heads at a
/// time, which also bounds attention's memory to this many scores.
const MAX_SCORES: usize = i32::MAX as usize;

/// [`sdpa`] over groups of `B*H` rows holding at most `max_scores` scores each (at least one
/// row per group).
fn sdpa_in_groups(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    max_scores: usize,
) -> Result<Tensor> {
    let (rows, tq, _) = q.dims3()?;
    let per_row = tq * k.dim(1)?;
    if rows * per_row <= max_scores {
        return attention_probs(q, k, bias)?.matmul(v);
    }
    let group = (max_scores / per_row.max(1)).max(1);
    let mut out = Vec::with_capacity(rows.div_ceil(group));
    for start in (0..rows).step_by(group) {
        let n = group.min(rows - start);
        // A bias with a row per head is cut with them; a broadcast one is shared.
        let b = match bias {
            Some(b) if b.rank() == 3 && b.dim(0)? == rows => Some(b.narrow(0, start, n)?),
            other => other.cloned(),
        };
        let (q, k, v) = (
            q.narrow(0, start, n)?,
            k.narrow(0, start, n)?,
            v.narrow(0, start, n)?,
        );
        out.push(attention_probs(&q, &k, b.as_ref())?.matmul(&v)?);
    }
    Tensor::cat(&out, 0)
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
        if let Some(grad) = CAPTURE.with(|c| c.borrow().as_ref().map(|c| c.grad)) {
            let (qh, kh) = (split_heads(&q, self.heads)?, split_heads(&k, self.heads)?);
            let probs = attention_probs(&qh, &kh, bias)?;
            let (bh, tq, l) = probs.dims3()?;
            let per_row = probs.reshape((b, bh / b, tq, l))?.mean(1)?;
            let per_row = if grad {
                per_row
            } else {
                per_row.detach().to_device(&candle_core::Device::Cpu)?
            };
            CAPTURE.with(|c| {
                if let Some(c) = c.borrow_mut().as_mut() {
                    c.maps.push(per_row)
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

/// What [`capture_cross_attention`] collects on this thread.
struct Capture {
    /// Keep the weights in the graph, on their device (a training loss reads them).
    grad: bool,
    maps: Vec<Tensor>,
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Capture>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` and returns, beside its result, the cross-attention weights of every
/// [`CrossAttention`] it ran on this thread, in call order: `[B, Tq, L]` each, averaged over
/// heads, on the CPU. A diagnostic hook (`fewstep eval --probe`): how much of an image
/// token's attention each prompt word gets. Outside it, forward costs nothing extra.
pub fn capture_cross_attention<R>(f: impl FnOnce() -> R) -> (R, Vec<Tensor>) {
    capture(false, f)
}

/// [`capture_cross_attention`] with the weights left in the autograd graph and on their
/// device, for a training loss on where each word is read (`train::binding`). Computing them
/// costs a second `q k^T` per cross-attention, small beside the rest (the prompt has 24 keys).
pub fn capture_cross_attention_with_grad<R>(f: impl FnOnce() -> R) -> (R, Vec<Tensor>) {
    capture(true, f)
}

fn capture<R>(grad: bool, f: impl FnOnce() -> R) -> (R, Vec<Tensor>) {
    let fresh = Capture {
        grad,
        maps: Vec::new(),
    };
    let previous = CAPTURE.with(|c| c.borrow_mut().replace(fresh));
    let out = f();
    let captured = CAPTURE.with(|c| std::mem::replace(&mut *c.borrow_mut(), previous));
    (out, captured.map(|c| c.maps).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    /// Attention a few heads at a time is attention, forward and backward, with a bias per
    /// head or shared.
    #[test]
    fn attention_in_groups_of_heads_is_attention() -> Result<()> {
        let dev = Device::Cpu;
        let q = Var::randn(0f32, 1.0, (6, 5, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (6, 7, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (6, 7, 8), &dev)?;
        let per_head = Tensor::randn(0f32, 1.0, (6, 5, 7), &dev)?;
        let shared = Tensor::randn(0f32, 1.0, (1, 7), &dev)?;
        for bias in [None, Some(&per_head), Some(&shared)] {
            let whole = sdpa_in_groups(q.as_tensor(), &k, &v, bias, usize::MAX)?;
            // 2 heads' scores (70) per group, the last group 2 of 6: and one head at a time.
            for max in [80, 1] {
                let parts = sdpa_in_groups(q.as_tensor(), &k, &v, bias, max)?;
                let diff = (&parts - &whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-6, "max {max}: {diff}");
                let g = parts.sum_all()?.backward()?;
                let gw = whole.sum_all()?.backward()?;
                let (a, b) = (g.get(&q).unwrap(), gw.get(&q).unwrap());
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "grad, max {max}: {diff}");
            }
        }
        Ok(())
    }
}
