//! `x W^T + b` as one op: the output rows start as copies of the bias and one GEMM accumulates
//! the product onto them.
//!
//! Why: composed, the product is written to fresh memory and a second op reads it back and
//! writes a biased copy to more fresh memory. In the tiny teacher's sampling that bias pass
//! alone was 3.7% of `perf`'s samples; here the bias costs one row copy per output row.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::fastmath;
use super::fused::{slice, sum_rows, use_kernel};
use super::strided_gemm::{gemm_into_par, inner_parallelism};

/// `x [rows, in] W^T + b` with `w [out, in]`, `b [out]`: `[rows, out]`, the same as
/// `add_bias(&x.matmul(&w.t()?)?, b)`.
///
/// The op for f32 on the CPU with the kernels on; the composition otherwise.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_shapes(x, w, b)?;
    if !use_kernel(&[x, w, b]) || !ENABLED.with(|e| e.get()) {
        return composed(x, w, b);
    }
    apply(x, w, b, LinearBias { silu: false })
}

/// `silu(x W^T + b)`, the same as [`super::fused::silu`] of [`linear_bias`].
///
/// Where no operand records a graph (serving), the SiLU runs in place on the product's own
/// buffer right after the GEMM: no second output is allocated and written, and no second op
/// reads the product back. A graph needs the product before the SiLU for the backward, so
/// there the two fused ops run one after the other.
pub fn linear_bias_silu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let tracked = x.track_op() || w.track_op() || b.track_op();
    let on = ENABLED.with(|e| e.get()) && EPILOGUE.with(|e| e.get());
    if tracked || !use_kernel(&[x, w, b]) || !on {
        return super::fused::silu(&linear_bias(x, w, b)?);
    }
    check_shapes(x, w, b)?;
    apply(x, w, b, LinearBias { silu: true })
}

/// `x [rows, in]`, `w [out, in]` and `b [out]`, or an error naming all three.
fn check_shapes(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<()> {
    let (_, in_dim) = x.dims2()?;
    let (out_dim, w_in) = w.dims2()?;
    if w_in != in_dim || b.dims() != [out_dim] {
        candle_core::bail!(
            "linear_bias: weight {:?} and bias {:?} do not fit input {:?}",
            w.dims(),
            b.dims(),
            x.dims()
        );
    }
    Ok(())
}

fn apply(x: &Tensor, w: &Tensor, b: &Tensor, op: LinearBias) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

thread_local! {
    static ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
    static EPILOGUE: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Turns the SiLU epilogue of [`linear_bias_silu`] on or off for graphs built on this thread
/// (on by default); off, the fused linear and the fused SiLU run one after the other.
/// `fewstep bench --ops` times the model both ways.
pub fn set_silu_epilogue(on: bool) {
    EPILOGUE.with(|e| e.set(on));
}

/// Turns the fused linear alone on or off for graphs built on this thread (on by default;
/// [`super::fused::set_fused`] turns it off with the other kernels). `fewstep bench --ops` uses
/// it to time a model with and without it, everything else equal.
pub fn set_fused_linear(on: bool) {
    ENABLED.with(|e| e.set(on));
}

/// The composition the op replaces (and falls back to): the product, then the bias.
pub fn composed(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    super::add_bias(&x.matmul(&w.t()?)?, b)
}

/// The op; `silu` applies the SiLU in place after the product (untracked operands only).
struct LinearBias {
    silu: bool,
}

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "fewstep-linear-bias"
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
        let (x, w, b) = (
            slice(s1, l1, self.name())?,
            slice(s2, l2, self.name())?,
            slice(s3, l3, self.name())?,
        );
        let (rows, k) = l1.shape().dims2()?;
        let n = b.len();
        let mut out = Vec::with_capacity(rows * n);
        for _ in 0..rows {
            out.extend_from_slice(b);
        }
        if rows > 0 && n > 0 && k > 0 {
            // SAFETY: `out` is [rows, n], `x` [rows, k] and `w` [n, k], all contiguous, so
            // the strides below stay inside them; `out` is this op's own buffer. The right
            // operand is W^T: element (kk, j) is w[j * k + kk].
            unsafe {
                gemm_into_par(
                    (rows, n, k),
                    out.as_mut_ptr(),
                    (n, 1),
                    true,
                    x.as_ptr(),
                    (k, 1),
                    w.as_ptr(),
                    (1, k),
                    1.0,
                    inner_parallelism(),
                );
            }
        }
        if self.silu {
            fastmath::silu_inplace(&mut out);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    /// The products of candle's matmul backward, and the bias gradient as `add_bias`'s. The
    /// operands are detached: `w` is a variable, so its gradient goes straight to the
    /// optimizer, and a gradient computed from the tracked `x` would carry the whole forward
    /// graph into Adam's moments, step after step (candle's composed matmul reaches the
    /// variable through a transpose node, whose backward detaches).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.silu {
            // Unreachable: `linear_bias_silu` runs this op only on untracked operands.
            candle_core::bail!("fewstep-linear-bias: the SiLU epilogue keeps no pre-activation");
        }
        let dx = grad.matmul(&w.detach())?;
        let dw = grad.t()?.matmul(&x.detach())?;
        let db = sum_rows(grad, b)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::fused::{set_fused, use_kernel};
    use crate::nn::max_diff;
    use candle_core::{Device, Var};

    /// Trainable `x [37, 24]`, `w [19, 24]` and `b [19]`.
    fn operands(dev: &Device) -> Result<(Var, Var, Var)> {
        let var = |shape: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, dev)?);
        Ok((var(&[37, 24])?, var(&[19, 24])?, var(&[19])?))
    }

    #[test]
    fn linear_bias_matches_matmul_plus_bias_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (x, w, b) = operands(&dev)?;
        // Through a transpose, so a non-contiguous input is covered too.
        let run = || -> Result<Tensor> {
            let xt = x.as_tensor().t()?.contiguous()?.t()?;
            linear_bias(&xt, w.as_tensor(), b.as_tensor())
        };
        let fused = run()?;
        set_fused(false);
        let composed = run();
        set_fused(true);
        let composed = composed?;
        assert!(use_kernel(&[x.as_tensor(), w.as_tensor(), b.as_tensor()]));
        assert!(max_diff(&fused, &composed) < 1e-5, "outputs differ");

        let g = Tensor::randn(0f32, 1.0, fused.shape(), &dev)?;
        let gf = (&fused * &g)?.sum_all()?.backward()?;
        let gc = (&composed * &g)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let (a, c) = (gf.get(v).expect("fused grad"), gc.get(v).expect("grad"));
            assert_eq!(a.dims(), c.dims(), "{name}");
            assert!(max_diff(a, c) < 1e-4, "{name}: gradient differs");
            assert!(!a.track_op(), "{name}: the gradient holds a graph");
        }

        // A weight that does not fit is an error, not a panic.
        assert!(linear_bias(x.as_tensor(), &w.as_tensor().t()?, b.as_tensor()).is_err());
        Ok(())
    }

    #[test]
    fn the_silu_epilogue_matches_silu_of_the_linear_and_keeps_the_graph_where_one_is_needed(
    ) -> Result<()> {
        let dev = Device::Cpu;
        let (x, w, b) = operands(&dev)?;
        let composed =
            crate::nn::fused::silu(&composed(x.as_tensor(), w.as_tensor(), b.as_tensor())?)?;

        // Untracked operands (serving): the epilogue, with no graph.
        let (xd, wd, bd) = (
            x.as_tensor().detach(),
            w.as_tensor().detach(),
            b.as_tensor().detach(),
        );
        let served = linear_bias_silu(&xd, &wd, &bd)?;
        assert!(!served.track_op());
        assert!(max_diff(&served, &composed) < 1e-5, "epilogue differs");

        // Tracked operands (training): the same values, and gradients that match.
        let trained = linear_bias_silu(x.as_tensor(), w.as_tensor(), b.as_tensor())?;
        assert!(max_diff(&trained, &composed) < 1e-5, "tracked path differs");
        let g = Tensor::randn(0f32, 1.0, trained.shape(), &dev)?;
        let gt = (&trained * &g)?.sum_all()?.backward()?;
        let gc = (&composed * &g)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let (a, c) = (gt.get(v).expect("grad"), gc.get(v).expect("grad"));
            assert!(max_diff(a, c) < 1e-4, "{name}: gradient differs");
        }

        // A weight that does not fit is an error, not a panic.
        assert!(linear_bias_silu(&xd, &wd.t()?, &bd).is_err());
        Ok(())
    }
}
