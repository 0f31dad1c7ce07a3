//! A 3x3 "same" convolution as one GEMM over an im2col matrix.
//!
//! candle 0.11's CPU conv2d is correct but its backward (a naive transposed convolution) made
//! a training step with two small 32x32 convs 3x slower than the whole DiT. Here im2col is one
//! pass (a kernel with a col2im backward on the CPU, nine shifted views elsewhere) and the
//! rest is a matrix multiply; the weight layout is conv2d's `[out, in, 3, 3]`.

use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

/// Calls `f(index in the im2col matrix, index in the input)` for every in-bounds tap of a
/// zero-padded 3x3 neighbourhood; the padding taps stay zero.
fn for_each_tap(n: usize, c: usize, h: usize, w: usize, mut f: impl FnMut(usize, usize)) {
    for row in 0..n * h * w {
        let (ni, y, xx) = (row / (h * w), (row / w) % h, row % w);
        for ci in 0..c {
            let plane = (ni * c + ci) * h * w;
            for ky in 0..3 {
                let yy = y + ky;
                if yy == 0 || yy > h {
                    continue;
                }
                for kx in 0..3 {
                    let xs = xx + kx;
                    if xs == 0 || xs > w {
                        continue;
                    }
                    f(
                        row * c * 9 + ci * 9 + ky * 3 + kx,
                        plane + (yy - 1) * w + xs - 1,
                    );
                }
            }
        }
    }
}

/// `[N, C, H, W]` -> `[N*H*W, C*9]`: each row holds a pixel's zero-padded 3x3 neighbourhood
/// of every channel, ordered (channel, ky, kx) like a conv2d weight.
struct Im2Col3x3;

impl CustomOp1 for Im2Col3x3 {
    fn name(&self) -> &'static str {
        "fewstep-im2col-3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let x = super::fused::slice(s, l, self.name())?;
        let mut out = vec![0f32; n * h * w * c * 9];
        for_each_tap(n, c, h, w, |col, src| out[col] = x[src]);
        Ok((CpuStorage::F32(out), Shape::from((n * h * w, c * 9))))
    }

    /// col2im: every input pixel sums the gradients of the nine rows that read it.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let dx = super::fused::with_data(grad, |g| {
            let mut dx = vec![0f32; n * c * h * w];
            for_each_tap(n, c, h, w, |col, src| dx[src] += g[col]);
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// The im2col matrix of `x` from nine shifted views (any device and dtype).
fn im2col_composed(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let mut taps = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            taps.push(xp.narrow(2, dy, h)?.narrow(3, dx, w)?);
        }
    }
    // [N, C, 9, H, W] -> rows of (c, ky, kx) per pixel, matching the weight's layout.
    Tensor::stack(&taps, 2)?
        .permute((0, 3, 4, 1, 2))?
        .contiguous()?
        .reshape((n * h * w, c * 9))
}

fn im2col(x: &Tensor) -> Result<Tensor> {
    let kernel = super::fused::fused_enabled()
        && x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32;
    if kernel {
        x.contiguous()?.apply_op1(Im2Col3x3)
    } else {
        im2col_composed(x)
    }
}

#[derive(Debug, Clone)]
pub struct Conv3x3 {
    /// `[out, in * 9]`: conv2d's weight with the kernel flattened.
    weight: Tensor,
    bias: Tensor,
    out_ch: usize,
}

impl Conv3x3 {
    pub fn new(vb: VarBuilder, in_ch: usize, out_ch: usize, init: Init) -> Result<Self> {
        let weight = vb.get_with_hints((out_ch, in_ch, 3, 3), "weight", init)?;
        let bias = vb.get_with_hints(out_ch, "bias", candle_nn::init::ZERO)?;
        Ok(Self {
            weight: weight.reshape((out_ch, in_ch * 9))?,
            bias,
            out_ch,
        })
    }
}

impl Module for Conv3x3 {
    /// `[N, C, H, W]` -> `[N, out, H, W]`, zero padding of 1.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, _, h, w) = x.dims4()?;
        let cols = im2col(x)?;
        cols.matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?
            .reshape((n, h, w, self.out_ch))?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn im2col_kernel_matches_the_shifted_views_and_their_gradient() -> Result<()> {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 5, 4), &Device::Cpu)?)?;
        let fused = im2col(x.as_tensor())?;
        let composed = im2col_composed(x.as_tensor())?;
        assert_eq!(fused.to_vec2::<f32>()?, composed.to_vec2::<f32>()?);
        let w = Tensor::randn(0f32, 1., fused.shape(), &Device::Cpu)?;
        let gf = (&fused * &w)?.sum_all()?.backward()?;
        let gc = (&composed * &w)?.sum_all()?.backward()?;
        let d = (gf.get(&x).unwrap() - gc.get(&x).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "col2im differs by {d}");
        Ok(())
    }

    /// A row's result must not depend on the rest of its batch (im2col is per pixel).
    #[test]
    fn a_sample_gets_the_same_bits_alone_and_in_a_batch() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 5, DType::F32, &dev);
        let conv = Conv3x3::new(vb, 11, 32, candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let batch = Tensor::randn(0f32, 1., (8, 11, 32, 32), &dev)?;
        let alone = conv.forward(&batch.narrow(0, 3, 1)?)?;
        let inside = conv.forward(&batch)?.narrow(0, 3, 1)?;
        let (a, b) = (
            alone.flatten_all()?.to_vec1::<f32>()?,
            inside.flatten_all()?.to_vec1::<f32>()?,
        );
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        Ok(())
    }

    #[test]
    fn matches_candle_conv2d_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 5, DType::F32, &dev);
        let conv = Conv3x3::new(vb, 5, 7, candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let vars = crate::train::named_vars(&map);
        let get = |name: &str| vars.iter().find(|(n, _)| n == name).unwrap().1.clone();
        let (w, b) = (get("weight"), get("bias"));
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 5, 6, 9), &dev)?)?;
        let dy = Tensor::randn(0f32, 1., (2, 7, 6, 9), &dev)?;

        let ours = conv.forward(&x)?;
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let reference =
            candle_nn::Conv2d::new(w.as_tensor().clone(), Some(b.as_tensor().clone()), cfg)
                .forward(&x)?;
        let close = |a: &Tensor, b: &Tensor, what: &str| -> Result<()> {
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-4, "{what}: max abs difference {d}");
            Ok(())
        };
        close(&ours, &reference, "output")?;

        let g_ours = (&ours * &dy)?.sum_all()?.backward()?;
        let g_ref = (&reference * &dy)?.sum_all()?.backward()?;
        for (name, v) in [("input", &x), ("weight", &w), ("bias", &b)] {
            let (a, r) = (g_ours.get(v).unwrap(), g_ref.get(v).unwrap());
            assert!(r.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
            close(a, r, name)?;
        }
        Ok(())
    }
}
