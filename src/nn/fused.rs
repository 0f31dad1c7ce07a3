//! One-pass CPU kernels, each with its backward, for the elementwise glue of a DiT block:
//! adaLN (layer norm + modulation), the gated residual, and the bias of a dense layer.
//!
//! Composed from candle ops, each of these is several full passes with an allocation apiece,
//! and the backward of every broadcast reduces its gradient with candle's strided `sum_keepdim`,
//! which a `perf` profile of `train-teacher` put at 17-19% of a training step. Here the forward
//! is one pass per row and the backward's reductions run along contiguous rows. Outputs are
//! written once, row by row, into vectors that were never zeroed (a `vec![0; n]` output costs
//! a memset pass of its own).
//!
//! Every op falls back to the composed candle ops off the CPU, for dtypes other than f32, and
//! when [`set_fused`] turned the kernels off on the calling thread (what `fewstep bench` does
//! to measure the naive composition in the same run).

use std::cell::Cell;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::fastmath;

thread_local! {
    static FUSED: Cell<bool> = const { Cell::new(true) };
}

/// Turns the fused kernels on or off for graphs built on this thread (on by default).
pub fn set_fused(on: bool) {
    FUSED.with(|f| f.set(on));
}

pub fn fused_enabled() -> bool {
    FUSED.with(Cell::get)
}

pub(crate) fn use_kernel(ts: &[&Tensor]) -> bool {
    fused_enabled()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// The f32 slice of a contiguous CPU tensor.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input only");
    };
    Ok(&data[a..b])
}

/// Reads a contiguous f32 CPU tensor's data.
pub(crate) fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("fused op: CPU tensors only");
    };
    Ok(f(slice(cpu, layout, "fused op")?))
}

fn from_vec(v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, like.shape(), like.device())
}

/// Per-row mean and reciprocal standard deviation of `x` viewed as `[rows, d]`.
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len() as f32;
    let mean = fastmath::sum(row) / d;
    let var = fastmath::sum_sq_dev(row, mean) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

// ---------------------------------------------------------------------------------------------
// Layer norm (no affine) followed by adaLN modulation.

/// `LN(x) * (1 + scale) + shift` for `x` `[B, T, D]` and `shift`, `scale` `[B, D]`.
struct LayerNormModulate {
    eps: f32,
}

impl CustomOp3 for LayerNormModulate {
    fn name(&self) -> &'static str {
        "fewstep-layer-norm-modulate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t, d) = l1.shape().dims3()?;
        let x = slice(s1, l1, self.name())?;
        let shift = slice(s2, l2, self.name())?;
        let scale = slice(s3, l3, self.name())?;
        if shift.len() != b * d || scale.len() != b * d {
            candle_core::bail!("{}: shift and scale must be [B, D]", self.name());
        }
        let mut out = Vec::with_capacity(x.len());
        for (r, xr) in x.chunks(d).enumerate() {
            let bi = r / t;
            let (mean, rstd) = row_stats(xr, self.eps);
            let sh = &shift[bi * d..(bi + 1) * d];
            let sc = &scale[bi * d..(bi + 1) * d];
            out.extend(
                xr.iter()
                    .zip(sc)
                    .zip(sh)
                    .map(|((&v, &c), &s)| (v - mean) * rstd * (1.0 + c) + s),
            );
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, t, d) = x.dims3()?;
        let (dx, dshift, dscale) = with_data(x, |x| {
            with_data(scale, |sc| {
                with_data(grad, |g| {
                    let mut dx = Vec::with_capacity(x.len());
                    let mut dshift = vec![0f32; sc.len()];
                    let mut dscale = vec![0f32; sc.len()];
                    let mut gh = vec![0f32; d];
                    let mut xhat = vec![0f32; d];
                    for (r, (xr, gr)) in x.chunks(d).zip(g.chunks(d)).enumerate() {
                        let bi = r / t;
                        let (mean, rstd) = row_stats(xr, self.eps);
                        let scr = &sc[bi * d..(bi + 1) * d];
                        for (((xh, h), (&xv, &gv)), &c) in
                            xhat.iter_mut().zip(&mut gh).zip(xr.iter().zip(gr)).zip(scr)
                        {
                            *xh = (xv - mean) * rstd;
                            *h = gv * (1.0 + c);
                        }
                        let m1 = fastmath::sum(&gh) / d as f32;
                        let m2 = fastmath::dot(&gh, &xhat) / d as f32;
                        dx.extend(
                            gh.iter()
                                .zip(&xhat)
                                .map(|(&h, &xh)| rstd * (h - m1 - xh * m2)),
                        );
                        let ds = &mut dshift[bi * d..(bi + 1) * d];
                        for j in 0..d {
                            ds[j] += gr[j];
                        }
                        let dc = &mut dscale[bi * d..(bi + 1) * d];
                        for j in 0..d {
                            dc[j] += gr[j] * xhat[j];
                        }
                    }
                    (dx, dshift, dscale)
                })
            })
        })???;
        Ok((
            Some(from_vec(dx, x)?),
            Some(from_vec(dshift, shift)?),
            Some(from_vec(dscale, scale)?),
        ))
    }
}

/// Composed reference of [`layer_norm_modulate`].
pub fn layer_norm_modulate_composed(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let n = super::norm::layer_norm_composed(x, eps)?;
    n.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// adaLN: `LN(x) * (1 + scale) + shift` with `x` `[B, T, D]`, `shift`/`scale` `[B, D]`.
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if !use_kernel(&[x, shift, scale]) {
        return layer_norm_modulate_composed(x, shift, scale, eps);
    }
    x.contiguous()?.apply_op3(
        &shift.contiguous()?,
        &scale.contiguous()?,
        LayerNormModulate { eps: eps as f32 },
    )
}

// ---------------------------------------------------------------------------------------------
// Plain layer norm (no affine).

struct LayerNorm {
    eps: f32,
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "fewstep-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = Vec::with_capacity(x.len());
        for xr in x.chunks(d) {
            let (mean, rstd) = row_stats(xr, self.eps);
            out.extend(xr.iter().map(|v| (v - mean) * rstd));
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// `dx = rstd (dy - mean(dy) - y mean(dy y))` per row, with `y` the normalized output.
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = x.dims().last().copied().unwrap_or(1).max(1);
        let dx = with_data(x, |x| {
            with_data(res, |y| {
                with_data(grad, |g| {
                    let mut dx = Vec::with_capacity(x.len());
                    for ((xr, yr), gr) in x.chunks(d).zip(y.chunks(d)).zip(g.chunks(d)) {
                        let (_, rstd) = row_stats(xr, self.eps);
                        let m1 = fastmath::sum(gr) / d as f32;
                        let m2 = fastmath::dot(gr, yr) / d as f32;
                        dx.extend(
                            gr.iter()
                                .zip(yr)
                                .map(|(&gv, &yv)| rstd * (gv - m1 - yv * m2)),
                        );
                    }
                    dx
                })
            })
        })???;
        Ok(Some(from_vec(dx, x)?))
    }
}

/// Layer norm over the last dimension without affine parameters.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    if !use_kernel(&[x]) {
        return super::norm::layer_norm_composed(x, eps);
    }
    x.contiguous()?.apply_op1(LayerNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// SiLU.

struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "fewstep-silu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        Ok((CpuStorage::F32(fastmath::silu(x)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_data(x, |x| with_data(grad, |g| fastmath::silu_backward(x, g)))??;
        Ok(Some(from_vec(dx, x)?))
    }
}

/// `x * sigmoid(x)`, with libm's `exp` replaced by the vectorized one of `fastmath`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if !use_kernel(&[x]) {
        return x.silu();
    }
    x.contiguous()?.apply_op1(Silu)
}

// ---------------------------------------------------------------------------------------------
// Gated residual.

/// `x + gate * y` for `x`, `y` `[B, T, D]` and `gate` `[B, D]`.
struct GatedResidual;

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "fewstep-gated-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t, d) = l1.shape().dims3()?;
        let x = slice(s1, l1, self.name())?;
        let gate = slice(s2, l2, self.name())?;
        let y = slice(s3, l3, self.name())?;
        if gate.len() != b * d || y.len() != x.len() {
            candle_core::bail!("{}: gate must be [B, D] and y like x", self.name());
        }
        let mut out = Vec::with_capacity(x.len());
        for (r, (xr, yr)) in x.chunks(d).zip(y.chunks(d)).enumerate() {
            let g = &gate[(r / t) * d..(r / t + 1) * d];
            out.extend(xr.iter().zip(g).zip(yr).map(|((&a, &b), &c)| a + b * c));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gate: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, t, d) = x.dims3()?;
        let (dgate, dy) = with_data(gate, |gate| {
            with_data(y, |yv| {
                with_data(grad, |g| {
                    let mut dgate = vec![0f32; gate.len()];
                    let mut dy = Vec::with_capacity(g.len());
                    for (r, (gr, yr)) in g.chunks(d).zip(yv.chunks(d)).enumerate() {
                        let bi = r / t;
                        let gt = &gate[bi * d..(bi + 1) * d];
                        dy.extend(gr.iter().zip(gt).map(|(&a, &b)| a * b));
                        let dg = &mut dgate[bi * d..(bi + 1) * d];
                        for ((s, &a), &b) in dg.iter_mut().zip(gr).zip(yr) {
                            *s += a * b;
                        }
                    }
                    (dgate, dy)
                })
            })
        })???;
        Ok((
            Some(grad.clone()),
            Some(from_vec(dgate, gate)?),
            Some(from_vec(dy, y)?),
        ))
    }
}

/// `x + gate * y` with `gate` of shape `[B, D]` broadcast over the tokens of `x`, `y` `[B, T, D]`.
pub fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    if !use_kernel(&[x, gate, y]) {
        return x + y.broadcast_mul(&gate.unsqueeze(1)?)?;
    }
    x.contiguous()?
        .apply_op3(&gate.contiguous()?, &y.contiguous()?, GatedResidual)
}

// ---------------------------------------------------------------------------------------------
// Bias of a dense layer.

/// `x + bias` for `x` `[rows, n]` and `bias` `[n]`.
struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "fewstep-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let b = slice(s2, l2, self.name())?;
        let n = b.len().max(1);
        if x.len() % n != 0 {
            candle_core::bail!("{}: bias does not divide the rows", self.name());
        }
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(n) {
            out.extend(row.iter().zip(b).map(|(v, c)| v + c));
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// The bias gradient sums the rows in order, one contiguous row at a time.
    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(sum_rows(grad, bias)?)))
    }
}

/// The gradient of a bias added to every row of `grad`'s `[rows, n]`: its rows summed in
/// order, one contiguous row at a time, shaped as `bias`.
pub(crate) fn sum_rows(grad: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let n = bias.elem_count().max(1);
    let db = with_data(grad, |g| {
        let mut acc = vec![0f32; n];
        for row in g.chunks(n) {
            for (a, v) in acc.iter_mut().zip(row) {
                *a += v;
            }
        }
        acc
    })?;
    from_vec(db, bias)
}

/// `x + bias` for `x` `[rows, n]`, `bias` `[n]`.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !use_kernel(&[x, bias]) {
        return x.broadcast_add(bias);
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::max_diff;
    use candle_core::{Device, Var};

    fn var(shape: &[usize], std: f32) -> Var {
        Var::from_tensor(&Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Runs `f` fused and composed on the same variables; compares outputs and every gradient
    /// of `sum(f(..) * w)` for a random `w`.
    fn check(vars: &[&Var], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> Result<()> {
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let fused = f(&ts)?;
        set_fused(false);
        let composed = f(&ts);
        set_fused(true);
        let composed = composed?;
        assert!(max_diff(&fused, &composed) < 1e-5, "outputs differ");
        let w = Tensor::randn(0f32, 1.0, fused.shape(), &Device::Cpu)?;
        let gf = (&fused * &w)?.sum_all()?.backward()?;
        let gc = (&composed * &w)?.sum_all()?.backward()?;
        for (i, v) in vars.iter().enumerate() {
            let (a, b) = (gf.get(v).expect("fused grad"), gc.get(v).expect("grad"));
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(scale > 0.0, "argument {i}: zero gradient");
            assert!(!a.track_op(), "argument {i}: the gradient holds a graph");
            let d = max_diff(a, b);
            assert!(
                d <= 1e-4 * scale.max(1.0),
                "argument {i}: gradient differs by {d}"
            );
        }
        Ok(())
    }

    #[test]
    fn fused_ops_match_their_composition_and_its_gradients() -> Result<()> {
        let (x, shift, scale) = (
            var(&[3, 5, 16], 2.0),
            var(&[3, 16], 0.5),
            var(&[3, 16], 0.5),
        );
        // Through a transpose, so non-contiguous inputs are covered too.
        check(&[&x, &shift, &scale], |t| {
            let xt = (t[0].transpose(0, 1)? * 1.5)?.transpose(0, 1)?;
            layer_norm_modulate(&xt, &t[1], &t[2], 1e-6)
        })?;
        check(&[&x], |t| layer_norm(&t[0], 1e-5))?;
        check(&[&x], |t| silu(&t[0]))?;
        let (gate, y) = (var(&[3, 16], 1.0), var(&[3, 5, 16], 1.0));
        check(&[&x, &gate, &y], |t| gated_residual(&t[0], &t[1], &t[2]))?;
        let (rows, bias) = (var(&[7, 16], 1.0), var(&[16], 1.0));
        check(&[&rows, &bias], |t| add_bias(&t[0], &t[1]))?;

        // The comparison above was between two different paths.
        assert!(use_kernel(&[x.as_tensor(), shift.as_tensor()]));
        Ok(())
    }
}
