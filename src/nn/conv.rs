//! A 3x3 "same" convolution as one GEMM over shifted copies of the input (im2col from
//! differentiable ops).
//!
//! candle 0.11's CPU conv2d is correct but its backward (a naive transposed convolution) made
//! a training step with two small 32x32 convs 3x slower than the whole DiT. Padding, nine
//! narrowed views and one matrix multiply have fast backwards, so this is the form the tiny
//! family trains with; the weight layout is conv2d's `[out, in, 3, 3]`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

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
        let (n, c, h, w) = x.dims4()?;
        let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        let mut taps = Vec::with_capacity(9);
        for dy in 0..3 {
            for dx in 0..3 {
                taps.push(xp.narrow(2, dy, h)?.narrow(3, dx, w)?);
            }
        }
        // [N, C, 9, H, W] -> rows of (c, ky, kx) per pixel, matching the weight's layout.
        let cols = Tensor::stack(&taps, 2)?
            .permute((0, 3, 4, 1, 2))?
            .contiguous()?
            .reshape((n * h * w, c * 9))?;
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
