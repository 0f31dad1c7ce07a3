//! Softmax over the last dimension in one pass, with a backward (candle's fused
//! `softmax_last_dim` has none; the composed version makes five passes and allocations).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

use super::fastmath;

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "fewstep-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::fused::slice(storage, layout, self.name())?;
        let n = layout.dims().last().copied().unwrap_or(1).max(1);
        Ok((
            CpuStorage::F32(fastmath::softmax_rows(x, n)),
            layout.shape().clone(),
        ))
    }

    /// `dx = y * (dy - sum(dy * y))` over the last dimension, one pass per row (as composed
    /// candle ops it was four passes, three of them allocating).
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let n = res.dims().last().copied().unwrap_or(1).max(1);
        let dx = super::fused::with_data(res, |y| {
            super::fused::with_data(grad_res, |g| {
                let mut dx = Vec::with_capacity(y.len());
                for (yr, gr) in y.chunks(n).zip(g.chunks(n)) {
                    let dot = fastmath::dot(yr, gr);
                    dx.extend(yr.iter().zip(gr).map(|(&yv, &gv)| yv * (gv - dot)));
                }
                dx
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// Softmax over the last dimension: the one-pass op for f32 on the CPU, the composed candle
/// ops elsewhere (both have a backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if super::fused::fused_enabled() && x.device().is_cpu() && x.dtype() == candle_core::DType::F32
    {
        x.contiguous()?.apply_op1(SoftmaxLastDim)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::max_diff;
    use candle_core::{Device, Var};

    #[test]
    fn matches_the_composed_softmax_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // Includes a masked key (-1e9), as attention with padding produces.
        let mut x = Tensor::randn(0f32, 3.0, (4, 5, 7), &dev)?;
        x = x.slice_assign(
            &[0..4, 0..5, 6..7],
            &Tensor::full(-1e9f32, (4, 5, 1), &dev)?,
        )?;
        let w = Tensor::randn(0f32, 1.0, (4, 5, 7), &dev)?;
        let (a, b) = (Var::from_tensor(&x)?, Var::from_tensor(&x)?);
        let fused = softmax_last_dim(a.as_tensor())?;
        let composed = candle_nn::ops::softmax(b.as_tensor(), D::Minus1)?;
        assert!(max_diff(&fused, &composed) < 1e-6);
        let ga = (fused * &w)?.sum_all()?.backward()?;
        let gb = (composed * &w)?.sum_all()?.backward()?;
        let (ga, gb) = (
            ga.get(a.as_tensor()).unwrap(),
            gb.get(b.as_tensor()).unwrap(),
        );
        assert!(max_diff(ga, gb) < 1e-5, "{}", max_diff(ga, gb));
        assert!(!ga.track_op(), "the gradient holds a graph");
        assert!(ga.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        // A transposed (non-contiguous) input works too.
        let t = x.transpose(1, 2)?;
        assert!(
            max_diff(
                &softmax_last_dim(&t)?,
                &candle_nn::ops::softmax(&t, D::Minus1)?
            ) < 1e-6
        );
        Ok(())
    }
}
