//! Multi-head attention as one CPU op, with a backward that recomputes the probabilities.
//!
//! Composed from candle ops, attention copies q, k and v into a `[B*H, T, Dh]` layout, builds
//! the whole `[B*H, Tq, Tk]` score tensor (zeroed by the matmul, then scaled, biased and
//! soft-maxed, a pass and an allocation each), multiplies it by v and copies the heads back:
//! the split/merge copies, the softmax and the memsets were a fifth of the tiny DiT's forward,
//! and an SD1.5 forward at 64x64 latents builds 0.5 GB of scores per top-level attention.
//!
//! Here q, k and v are read in place in the projections' `[B, T, H*Dh]` layout (any row stride,
//! so the narrow views of a fused QKV projection need no copy), the scores of one block of
//! queries live in a cache-sized scratch buffer, and the output is written in the merged
//! layout. Batch-heads run in parallel on rayon's pool (candle's matmuls use the same one).
//! The backward recomputes each block's probabilities from q and k, as flash attention does,
//! instead of keeping the score tensor alive between the passes.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::fastmath;
use super::strided_gemm::{gemm_into, Out};

/// Scores per block: 64K floats (256 KiB) keeps a block's scores in L2 next to its k and v.
const BLOCK_SCORES: usize = 1 << 19;

/// Rows of queries per block for `tk` keys, and no more than there are queries (the scratch
/// is allocated per task: a short sequence must not pay for a long one's block).
fn block_rows(tq: usize, tk: usize) -> usize {
    (BLOCK_SCORES / tk.max(1)).clamp(64, 512).min(tq.max(1))
}

/// Where `[B, T, H*Dh]` rows live in a storage: element `(b, t, c)` is at
/// `offset + b * batch + t * row + c`.
#[derive(Debug, Clone, Copy)]
struct Rows {
    offset: usize,
    batch: usize,
    row: usize,
}

impl Rows {
    /// The rows of a 3-D layout whose last dimension is contiguous.
    fn of(l: &Layout, op: &str) -> Result<Self> {
        let (b, t, _) = l.shape().dims3()?;
        let s = l.stride();
        if s[2] != 1 {
            candle_core::bail!("{op}: the last dimension must be contiguous");
        }
        // Size-1 dimensions may carry any stride; they are never stepped over.
        Ok(Self {
            offset: l.start_offset(),
            batch: if b == 1 { 0 } else { s[0] },
            row: if t == 1 { 0 } else { s[1] },
        })
    }

    fn contiguous(t: usize, width: usize) -> Self {
        Self {
            offset: 0,
            batch: t * width,
            row: width,
        }
    }

    /// The first element of head `h` (of width `dh`) of batch `b`, row 0.
    fn head(&self, b: usize, h: usize, dh: usize) -> usize {
        self.offset + b * self.batch + h * dh
    }
}

/// The additive bias, broadcast to `[B*H, Tq, Tk]` from `[1 | B*H, 1 | Tq, Tk]`.
#[derive(Debug, Clone)]
struct Bias {
    data: Vec<f32>,
    per_head: bool,
    per_query: bool,
}

impl Bias {
    /// The bias row of query `r` of batch-head `bh`.
    fn row(&self, bh: usize, r: usize, tq: usize, tk: usize) -> &[f32] {
        let bh = if self.per_head { bh } else { 0 };
        let r = if self.per_query { r } else { 0 };
        let start = (bh * if self.per_query { tq } else { 1 } + r) * tk;
        &self.data[start..start + tk]
    }
}

/// The sizes of one attention.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    tq: usize,
    tk: usize,
    dh: usize,
    scale: f32,
}

impl Dims {
    fn width(&self) -> usize {
        self.heads * self.dh
    }
}

/// The probabilities of queries `r0..r0 + m` of batch-head `(bi, hi)` over every key, into
/// `p` (`m x tk`).
#[allow(clippy::too_many_arguments)]
fn block_probs(
    d: &Dims,
    (bi, hi): (usize, usize),
    (r0, m): (usize, usize),
    q: &[f32],
    qr: Rows,
    k: &[f32],
    kr: Rows,
    bias: Option<&Bias>,
    p: &mut [f32],
) {
    let qs = qr.head(bi, hi, d.dh) + r0 * qr.row;
    let ks = kr.head(bi, hi, d.dh);
    assert!(qs + (m - 1) * qr.row + d.dh <= q.len() && ks + (d.tk - 1) * kr.row + d.dh <= k.len());
    assert!(p.len() >= m * d.tk);
    // SAFETY: the asserts above bound every q and k element read; p holds m x tk.
    unsafe {
        gemm_into(
            (m, d.tk, d.dh),
            p.as_mut_ptr(),
            (d.tk, 1),
            false,
            q.as_ptr().add(qs),
            (qr.row, 1),
            k.as_ptr().add(ks),
            (1, kr.row),
            d.scale,
        );
    }
    let p = &mut p[..m * d.tk];
    if let Some(bias) = bias {
        for (i, row) in p.chunks_mut(d.tk).enumerate() {
            let b = bias.row(bi * d.heads + hi, r0 + i, d.tq, d.tk);
            row.iter_mut().zip(b).for_each(|(s, b)| *s += b);
        }
    }
    fastmath::softmax_rows_inplace(p, d.tk);
}

thread_local! {
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Turns the fused attention alone on or off for graphs built on this thread (on by default;
/// [`super::fused::set_fused`] turns it off with the other kernels). `fewstep bench --ops` uses it
/// to time a model with and without it, everything else equal.
pub fn set_fused_attention(on: bool) {
    ENABLED.with(|e| e.set(on));
}

#[cfg(test)]
thread_local! {
    /// Forward runs of the op on this thread: lets tests see which path `attend` took.
    static RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

struct FusedAttention {
    heads: usize,
    bias: Option<Bias>,
}

impl FusedAttention {
    fn dims(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> Result<Dims> {
        let (b, tq, w) = lq.shape().dims3()?;
        let (bk, tk, wk) = lk.shape().dims3()?;
        if lk.shape() != lv.shape() || bk != b || wk != w || w % self.heads != 0 || tk == 0 {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?}, v {:?} do not fit {} heads",
                lq.shape(),
                lk.shape(),
                lv.shape(),
                self.heads
            );
        }
        let dh = w / self.heads;
        Ok(Dims {
            b,
            heads: self.heads,
            tq,
            tk,
            dh,
            scale: 1.0 / (dh as f32).sqrt(),
        })
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fewstep-fused-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[cfg(test)]
        RUNS.with(|r| r.set(r.get() + 1));
        let d = self.dims(lq, lk, lv)?;
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (sq, sk, sv) else {
            candle_core::bail!("{}: f32 only", self.name());
        };
        let (qr, kr, vr) = (
            Rows::of(lq, self.name())?,
            Rows::of(lk, self.name())?,
            Rows::of(lv, self.name())?,
        );
        let width = d.width();
        let vs_max = vr.head(d.b - 1, d.heads - 1, d.dh) + (d.tk - 1) * vr.row + d.dh;
        if vs_max > v.len() {
            candle_core::bail!("{}: v is shorter than its layout", self.name());
        }
        let mut out = vec![0f32; d.b * d.tq * width];
        let dst = Out(out.as_mut_ptr());
        let rows = block_rows(d.tq, d.tk);
        (0..d.b * d.heads).into_par_iter().for_each_init(
            || vec![0f32; rows * d.tk],
            |p, bh| {
                let (bi, hi) = (bh / d.heads, bh % d.heads);
                for r0 in (0..d.tq).step_by(rows) {
                    let m = rows.min(d.tq - r0);
                    block_probs(&d, (bi, hi), (r0, m), q, qr, k, kr, self.bias.as_ref(), p);
                    let o = (bi * d.tq + r0) * width + hi * d.dh;
                    // SAFETY: this task alone writes rows r0..r0+m, columns of head hi, of
                    // batch bi (inside `out`); v's reach was checked before the loop.
                    unsafe {
                        gemm_into(
                            (m, d.dh, d.tk),
                            dst.at(o),
                            (width, 1),
                            false,
                            p.as_ptr(),
                            (d.tk, 1),
                            v.as_ptr().add(vr.head(bi, hi, d.dh)),
                            (vr.row, 1),
                            1.0,
                        );
                    }
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((d.b, d.tq, width))))
    }

    /// With `P = softmax(S)`, `S = scale q k^T + bias` and `O = P v`, per batch-head and block
    /// of queries: `dv += P^T dO`, `dP = dO v^T`, `dS = P (dP - rowsum(dO * O))`,
    /// `dq = scale dS k`, `dk += scale dS^T q`. No gradient flows to the bias (a mask).
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let d = self.dims(q.layout(), k.layout(), v.layout())?;
        let width = d.width();
        let (qr, kr) = (Rows::contiguous(d.tq, width), Rows::contiguous(d.tk, width));
        let mut dq = vec![0f32; q.elem_count()];
        let mut dk = vec![0f32; k.elem_count()];
        let mut dv = vec![0f32; v.elem_count()];
        let (pq, pk, pv) = (
            Out(dq.as_mut_ptr()),
            Out(dk.as_mut_ptr()),
            Out(dv.as_mut_ptr()),
        );
        let rows = block_rows(d.tq, d.tk);
        let grad_res = grad_res.contiguous()?;
        let (q_shape, k_shape, dev) = (q.shape().clone(), k.shape().clone(), q.device().clone());
        let tensors = [&q, &k, &v, res, &grad_res];
        let guards = tensors.map(|t| t.storage_and_layout());
        let data = |i: usize| -> Result<&[f32]> {
            let (storage, layout) = &guards[i];
            let candle_core::Storage::Cpu(cpu) = &**storage else {
                candle_core::bail!("fused attention: CPU tensors only");
            };
            super::fused::slice(cpu, layout, "fused attention backward")
        };
        let (q, k, v, o, g) = (data(0)?, data(1)?, data(2)?, data(3)?, data(4)?);
        (0..d.b * d.heads).into_par_iter().for_each_init(
            || (vec![0f32; rows * d.tk], vec![0f32; rows * d.tk]),
            |(p, dp), bh| {
                let (bi, hi) = (bh / d.heads, bh % d.heads);
                let kv0 = kr.head(bi, hi, d.dh);
                for r0 in (0..d.tq).step_by(rows) {
                    let m = rows.min(d.tq - r0);
                    block_probs(&d, (bi, hi), (r0, m), q, qr, k, kr, self.bias.as_ref(), p);
                    let q0 = qr.head(bi, hi, d.dh) + r0 * width;
                    let first = r0 == 0;
                    // SAFETY: all operands are contiguous [B, T, width]
                    // buffers indexed inside their batch-head; this task
                    // alone writes dq's rows r0..r0+m and dk's and dv's
                    // rows of head hi in batch bi.
                    unsafe {
                        gemm_into(
                            (d.tk, d.dh, m),
                            pv.at(kv0),
                            (width, 1),
                            !first,
                            p.as_ptr(),
                            (1, d.tk),
                            g.as_ptr().add(q0),
                            (width, 1),
                            1.0,
                        );
                        gemm_into(
                            (m, d.tk, d.dh),
                            dp.as_mut_ptr(),
                            (d.tk, 1),
                            false,
                            g.as_ptr().add(q0),
                            (width, 1),
                            v.as_ptr().add(kv0),
                            (1, width),
                            1.0,
                        );
                    }
                    for i in 0..m {
                        let row = q0 + i * width;
                        let di = fastmath::dot(&g[row..row + d.dh], &o[row..row + d.dh]);
                        let pr = &p[i * d.tk..(i + 1) * d.tk];
                        let dr = &mut dp[i * d.tk..(i + 1) * d.tk];
                        dr.iter_mut()
                            .zip(pr)
                            .for_each(|(x, &pv)| *x = pv * (*x - di));
                    }
                    unsafe {
                        gemm_into(
                            (m, d.dh, d.tk),
                            pq.at(q0),
                            (width, 1),
                            false,
                            dp.as_ptr(),
                            (d.tk, 1),
                            k.as_ptr().add(kv0),
                            (width, 1),
                            d.scale,
                        );
                        gemm_into(
                            (d.tk, d.dh, m),
                            pk.at(kv0),
                            (width, 1),
                            !first,
                            dp.as_ptr(),
                            (1, d.tk),
                            q.as_ptr().add(q0),
                            (width, 1),
                            d.scale,
                        );
                    }
                }
            },
        );

        Ok((
            Some(Tensor::from_vec(dq, q_shape, &dev)?),
            Some(Tensor::from_vec(dk, k_shape.clone(), &dev)?),
            Some(Tensor::from_vec(dv, k_shape, &dev)?),
        ))
    }
}

/// Multi-head scaled dot-product attention of `q` `[B, Tq, H*Dh]` over `k` and `v`
/// `[B, Tk, H*Dh]`, heads side by side in the last dimension, giving `[B, Tq, H*Dh]`; `bias` is
/// an additive constant (a mask: no gradient reaches it) broadcastable to `[B*H, Tq, Tk]`
/// (`[Tq, Tk]` is taken as `[1, Tq, Tk]`).
///
/// The fused op for f32 on the CPU with the kernels on; [`super::attention::sdpa`] between
/// [`super::attention::split_heads`] and [`super::attention::merge_heads`] otherwise, and for a
/// bias that is a variable or of a shape the op does not take.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    match try_attend(q, k, v, heads, bias)? {
        Some(o) => Ok(o),
        None => composed(q, k, v, heads, bias),
    }
}

/// [`attend`]'s fused op, or `None` where it does not apply (for callers with their own
/// composed path, such as the SD UNet's sliced, upcast attention).
pub fn try_attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if !ENABLED.with(std::cell::Cell::get)
        || !super::fused::use_kernel(&[q, k, v])
        || bias.is_some_and(|b| b.dtype() != q.dtype())
    {
        return Ok(None);
    }
    let Some(bias) = kernel_bias(q, k, heads, bias)? else {
        return Ok(None);
    };
    let op = FusedAttention { heads, bias };
    let (q, k, v) = (
        last_dim_contiguous(q)?,
        last_dim_contiguous(k)?,
        last_dim_contiguous(v)?,
    );
    q.apply_op3(&k, &v, op).map(Some)
}

/// The composed reference of [`attend`].
pub fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    use super::attention::{merge_heads, sdpa, split_heads};
    let b = q.dim(0)?;
    let o = sdpa(
        &split_heads(q, heads)?,
        &split_heads(k, heads)?,
        &split_heads(v, heads)?,
        bias,
    )?;
    merge_heads(&o, b)
}

fn last_dim_contiguous(t: &Tensor) -> Result<Tensor> {
    if t.rank() == 3 && t.stride()[2] == 1 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// `Some(bias for the op)` when the op can take `bias` (`Some(None)` without one), `None` when
/// attention must be composed: a bias that wants a gradient, or of another shape.
fn kernel_bias(
    q: &Tensor,
    k: &Tensor,
    heads: usize,
    bias: Option<&Tensor>,
) -> Result<Option<Option<Bias>>> {
    let Some(bias) = bias else {
        return Ok(Some(None));
    };
    let (bh, bq, bk) = match *bias.dims() {
        [bq, bk] => (1, bq, bk),
        [bh, bq, bk] => (bh, bq, bk),
        _ => return Ok(None),
    };
    if bias.track_op() {
        return Ok(None);
    }
    let (b, tq, _) = q.dims3()?;
    let tk = k.dim(1)?;
    if !(bh == 1 || bh == b * heads) || !(bq == 1 || bq == tq) || bk != tk {
        return Ok(None);
    }
    let data = super::fused::with_data(bias, <[f32]>::to_vec)?;
    Ok(Some(Some(Bias {
        data,
        per_head: bh != 1,
        per_query: bq != 1,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::max_diff;
    use candle_core::{Device, Var, D};

    /// Runs attention both ways on the same variables and compares the output and the
    /// gradients of q, k and v (weighted by a random `w` so every element matters).
    fn check(b: usize, tq: usize, tk: usize, heads: usize, dh: usize, bias: Option<&Tensor>) {
        let dev = Device::Cpu;
        let w = heads * dh;
        // q is a narrow view of a wider projection, as a fused QKV projection gives.
        let qkv = Tensor::randn(0f32, 1.5, (b, tq, 3 * w), &dev).unwrap();
        let kv = Tensor::randn(0f32, 1.5, (b, tk, 2 * w), &dev).unwrap();
        let g = Tensor::randn(0f32, 1.0, (b, tq, w), &dev).unwrap();
        let run = |fused: bool| {
            let (a, c) = (
                Var::from_tensor(&qkv).unwrap(),
                Var::from_tensor(&kv).unwrap(),
            );
            let q = a.narrow(D::Minus1, w, w).unwrap();
            let k = c.narrow(D::Minus1, 0, w).unwrap();
            let v = c.narrow(D::Minus1, w, w).unwrap();
            let o = if fused {
                let before = RUNS.with(|r| r.get());
                let o = attend(&q, &k, &v, heads, bias).unwrap();
                assert_eq!(RUNS.with(|r| r.get()), before + 1, "the fused op ran");
                o
            } else {
                composed(&q, &k, &v, heads, bias).unwrap()
            };
            let grads = (&o * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let ga = grads.get(a.as_tensor()).unwrap().clone();
            let gc = grads.get(c.as_tensor()).unwrap().clone();
            assert!(!ga.track_op() && !gc.track_op(), "a gradient holds a graph");
            (o, ga, gc)
        };
        let (o1, ga1, gc1) = run(true);
        let (o2, ga2, gc2) = run(false);
        let label = format!("b {b} tq {tq} tk {tk} heads {heads} dh {dh}");
        assert!(
            max_diff(&o1, &o2) < 1e-5,
            "{label}: out {}",
            max_diff(&o1, &o2)
        );
        assert!(
            max_diff(&ga1, &ga2) < 1e-4,
            "{label}: dq {}",
            max_diff(&ga1, &ga2)
        );
        assert!(
            max_diff(&gc1, &gc2) < 1e-4,
            "{label}: dkv {}",
            max_diff(&gc1, &gc2)
        );
        // Not trivially equal: the gradients are there and large.
        assert!(
            ga1.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 1e-2
        );
        assert!(
            gc1.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 1e-2
        );
    }

    #[test]
    fn matches_composed_attention_and_its_gradients() {
        // Self-attention, and more queries than one block holds (dk, dv accumulate over blocks).
        check(2, 5, 5, 3, 4, None);
        check(1, 300, 70, 2, 8, None);
        check(3, 1, 8, 4, 32, None);
    }

    #[test]
    fn takes_key_padding_and_causal_biases_as_the_composed_op_does() {
        let dev = Device::Cpu;
        let (b, heads, tq, tk) = (2, 3, 6, 7);
        // Key padding, per batch-head: the last two keys of batch 1 masked.
        let mut pad = vec![0f32; b * heads * tk];
        for h in 0..heads {
            for j in 5..7 {
                pad[(heads + h) * tk + j] = -1e9;
            }
        }
        let pad = Tensor::from_vec(pad, (b * heads, 1, tk), &dev).unwrap();
        check(b, tq, tk, heads, 4, Some(&pad));
        // A causal mask shared by every batch-head.
        let causal: Vec<f32> = (0..tq * tk)
            .map(|i| if i % tk > i / tk { -1e9 } else { 0.0 })
            .collect();
        let causal = Tensor::from_vec(causal, (1, tq, tk), &dev).unwrap();
        check(b, tq, tk, heads, 4, Some(&causal));
    }

    #[test]
    fn a_learned_bias_or_other_devices_fall_back_to_the_composed_op() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 3, 4), &dev).unwrap();
        let learned =
            Var::from_tensor(&Tensor::zeros((2, 3, 3), candle_core::DType::F32, &dev).unwrap())
                .unwrap();
        let before = RUNS.with(|r| r.get());
        let o = attend(&q, &q, &q, 2, Some(learned.as_tensor())).unwrap();
        assert_eq!(RUNS.with(|r| r.get()), before, "composed");
        let grads = o.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(learned.as_tensor()).is_some(),
            "the bias keeps its gradient"
        );
        super::super::fused::set_fused(false);
        let composed_path = attend(&q, &q, &q, 2, None);
        super::super::fused::set_fused(true);
        assert_eq!(
            RUNS.with(|r| r.get()),
            before,
            "composed with the kernels off"
        );
        let fused_path = attend(&q, &q, &q, 2, None).unwrap();
        assert!(max_diff(&composed_path.unwrap(), &fused_path) < 1e-6);
    }
}
