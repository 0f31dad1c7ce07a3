//! A 3x3 "same" convolution as one GEMM over an im2col matrix, and the im2col matrix of a
//! video convolution ([`FrameKernel`], [`frames_im2col`]; the Wan VAE's causal conv3d).
//! Channels-first, the f32 CPU path is [`super::direct_conv`], which needs no im2col matrix.
//!
//! candle 0.11's CPU conv2d is correct but its backward (a naive transposed convolution) made
//! a training step with two small 32x32 convs 3x slower than the whole DiT. Here im2col is one
//! pass (a kernel with a col2im backward on the CPU, nine shifted views elsewhere) and the
//! rest is a matrix multiply; the weight layout is conv2d's `[out, in, 3, 3]`.
//!
//! Images can be channels-first (`[N, C, H, W]`, what conv2d takes) or channels-last
//! (`[N, H, W, C]`). The GEMM's output rows are pixels, so channels-last needs no transpose,
//! and its pixels are already the tokens of the layer norms and attention around the conv.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

/// Where the channels of an image tensor sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channels {
    /// `[N, C, H, W]`.
    First,
    /// `[N, H, W, C]`.
    Last,
}

/// `(n, c, h, w)` of an image tensor.
type Dims = (usize, usize, usize, usize);

impl Channels {
    /// `(n, c, h, w)` from a shape's four dimensions in this layout.
    fn order(self, (a, b, c, d): Dims) -> Dims {
        match self {
            Channels::First => (a, b, c, d),
            Channels::Last => (a, d, b, c),
        }
    }

    fn dims(self, x: &Tensor) -> Result<Dims> {
        Ok(self.order(x.dims4()?))
    }

    /// Offset of pixel (0, 0) of channel `ci` of image `ni`, and the step between pixels.
    fn plane(self, (_, c, h, w): Dims, ni: usize, ci: usize) -> (usize, usize) {
        match self {
            Channels::First => ((ni * c + ci) * h * w, 1),
            Channels::Last => (ni * h * w * c + ci, c),
        }
    }
}

/// Calls `f(index in the im2col matrix, index in the input)` for every in-bounds tap of a
/// zero-padded 3x3 neighbourhood; the padding taps stay zero.
fn for_each_tap(layout: Channels, dims: Dims, mut f: impl FnMut(usize, usize)) {
    let (n, c, h, w) = dims;
    for row in 0..n * h * w {
        let (ni, y, xx) = (row / (h * w), (row / w) % h, row % w);
        for ci in 0..c {
            let (plane, step) = layout.plane(dims, ni, ci);
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
                        plane + ((yy - 1) * w + xs - 1) * step,
                    );
                }
            }
        }
    }
}

/// An image -> `[N*H*W, C*9]`: each row holds a pixel's zero-padded 3x3 neighbourhood of
/// every channel, ordered (channel, ky, kx) like a conv2d weight.
struct Im2Col3x3(Channels);

impl CustomOp1 for Im2Col3x3 {
    fn name(&self) -> &'static str {
        "fewstep-im2col-3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = self.0.order(l.shape().dims4()?);
        let (n, c, h, w) = dims;
        let x = super::fused::slice(s, l, self.name())?;
        let mut out = vec![0f32; n * h * w * c * 9];
        for_each_tap(self.0, dims, |col, src| out[col] = x[src]);
        Ok((CpuStorage::F32(out), Shape::from((n * h * w, c * 9))))
    }

    /// col2im: every input pixel sums the gradients of the nine rows that read it.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dims = self.0.dims(arg)?;
        let dx = super::fused::with_data(grad, |g| {
            let mut dx = vec![0f32; arg.elem_count()];
            for_each_tap(self.0, dims, |col, src| dx[src] += g[col]);
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// The im2col matrix of `x` from nine shifted views (any device and dtype).
fn im2col_composed(x: &Tensor, layout: Channels) -> Result<Tensor> {
    let (n, c, h, w) = layout.dims(x)?;
    let (hd, wd) = match layout {
        Channels::First => (2, 3),
        Channels::Last => (1, 2),
    };
    let xp = x.pad_with_zeros(hd, 1, 1)?.pad_with_zeros(wd, 1, 1)?;
    let mut taps = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            taps.push(xp.narrow(hd, dy, h)?.narrow(wd, dx, w)?);
        }
    }
    // Rows of (c, ky, kx) per pixel, matching the weight's layout.
    let cols = match layout {
        // [N, C, 9, H, W] -> [N, H, W, C, 9].
        Channels::First => Tensor::stack(&taps, 2)?.permute((0, 3, 4, 1, 2))?,
        // [N, H, W, C, 9].
        Channels::Last => Tensor::stack(&taps, 4)?,
    };
    cols.contiguous()?.reshape((n * h * w, c * 9))
}

fn im2col(x: &Tensor, layout: Channels) -> Result<Tensor> {
    let kernel = super::fused::fused_enabled()
        && x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32;
    if kernel {
        x.contiguous()?.apply_op1(Im2Col3x3(layout))
    } else {
        im2col_composed(x, layout)
    }
}

/// A `(kt, k, k)` convolution kernel over videos `[B, T, C, H, W]`: consecutive output frames
/// start `t_stride` input frames apart, the spatial sides step `stride` pixels and are
/// zero-padded by `pad` on each side. No temporal padding (callers put the past frames in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameKernel {
    pub kt: usize,
    pub k: usize,
    pub t_stride: usize,
    pub stride: usize,
    pub pad: usize,
}

impl FrameKernel {
    /// `(frames, height, width)` of the output for an input of `(t, h, w)`; `None` when the
    /// kernel does not fit.
    pub fn out_dims(self, t: usize, h: usize, w: usize) -> Option<(usize, usize, usize)> {
        let FrameKernel {
            kt,
            k,
            t_stride,
            stride,
            pad,
        } = self;
        if t < kt || h + 2 * pad < k || w + 2 * pad < k || t_stride == 0 || stride == 0 {
            return None;
        }
        Some((
            (t - kt) / t_stride + 1,
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        ))
    }

    /// Rows of the im2col matrix: `C * kt * k * k`.
    pub fn taps(self, c: usize) -> usize {
        c * self.kt * self.k * self.k
    }

    /// Walks the im2col matrix of output frames `frames` (of the `B * T'` frames of all
    /// videos, in order) row by row in memory order, calling `f(Some(input index), len)`
    /// for a run of `len` entries that read input pixels `stride` apart and `f(None, len)`
    /// for `len` entries of zero padding.
    fn for_each_segment(
        self,
        (b, t, c, h, w): Dims5,
        frames: Range<usize>,
        mut f: impl FnMut(Option<usize>, usize),
    ) {
        let FrameKernel {
            kt,
            k,
            t_stride,
            stride,
            pad,
        } = self;
        let Some((t_out, ho, wo)) = self.out_dims(t, h, w) else {
            return;
        };
        debug_assert!(frames.end <= b * t_out);
        for ci in 0..c {
            for j in 0..kt {
                for ky in 0..k {
                    for kx in 0..k {
                        // Output columns whose input column `xo * stride + kx - pad` is inside.
                        let x0 = pad.saturating_sub(kx).div_ceil(stride).min(wo);
                        let x1 = (w + pad).saturating_sub(kx).div_ceil(stride).clamp(x0, wo);
                        for n in frames.clone() {
                            let (bi, i) = (n / t_out, n % t_out);
                            let plane = ((bi * t + i * t_stride + j) * c + ci) * h * w;
                            for yo in 0..ho {
                                let yi = (yo * stride + ky).checked_sub(pad).filter(|&y| y < h);
                                match yi {
                                    Some(yi) if x1 > x0 => {
                                        if x0 > 0 {
                                            f(None, x0);
                                        }
                                        f(Some(plane + yi * w + x0 * stride + kx - pad), x1 - x0);
                                        if x1 < wo {
                                            f(None, wo - x1);
                                        }
                                    }
                                    _ => f(None, wo),
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `(b, t, c, h, w)` of a video tensor.
type Dims5 = (usize, usize, usize, usize, usize);

/// Videos `[B, T, C, H, W]` -> `[C * kt * k * k, frames * H' * W']` for a range of the
/// `B * T'` output frames: a column per output pixel holding its zero-padded neighbourhood,
/// rows ordered (channel, frame tap, ky, kx) like a conv3d weight `[out, C, kt, k, k]`
/// flattened, so that `weight [out, K] x cols` is the convolution of those frames. Rows are
/// the long side: the matrix is written in order, in runs along image rows.
struct Im2ColFrames {
    kernel: FrameKernel,
    frames: Range<usize>,
}

impl CustomOp1 for Im2ColFrames {
    fn name(&self) -> &'static str {
        "fewstep-im2col-frames"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims5()?;
        let (b, t, c, h, w) = dims;
        let Some((t_out, ho, wo)) = self.kernel.out_dims(t, h, w) else {
            candle_core::bail!("{}: kernel {:?} over {:?}", self.name(), self.kernel, dims);
        };
        if self.frames.start > self.frames.end || self.frames.end > b * t_out {
            candle_core::bail!("{}: frames {:?} of {}", self.name(), self.frames, b * t_out);
        }
        let x = super::fused::slice(s, l, self.name())?;
        let rows = self.kernel.taps(c);
        let cols = self.frames.len() * ho * wo;
        let step = self.kernel.stride;
        // Every entry is written once, in order: no zero-filled buffer first.
        let mut out = Vec::with_capacity(rows * cols);
        self.kernel
            .for_each_segment(dims, self.frames.clone(), |src, len| match src {
                None => out.resize(out.len() + len, 0f32),
                Some(src) if step == 1 => out.extend_from_slice(&x[src..src + len]),
                Some(src) => out.extend((0..len).map(|i| x[src + i * step])),
            });
        debug_assert_eq!(out.len(), rows * cols);
        Ok((CpuStorage::F32(out), Shape::from((rows, cols))))
    }

    /// col2im: every input pixel sums the gradients of the matrix entries that read it.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dims = arg.dims5()?;
        let step = self.kernel.stride;
        let dx = super::fused::with_data(grad, |g| {
            let mut dx = vec![0f32; arg.elem_count()];
            let mut at = 0;
            self.kernel
                .for_each_segment(dims, self.frames.clone(), |src, len| {
                    if let Some(src) = src {
                        for (i, g) in g[at..at + len].iter().enumerate() {
                            dx[src + i * step] += g;
                        }
                    }
                    at += len;
                });
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// The im2col matrix of output frames `frames` of videos `x` `[B, T, C, H, W]` for `kernel`
/// (see [`Im2ColFrames`]); CPU f32 only, with a col2im backward.
pub fn frames_im2col(x: &Tensor, kernel: FrameKernel, frames: Range<usize>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Im2ColFrames { kernel, frames })
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

    /// `[N, H, W, C]` -> `[N, H, W, out]`, zero padding of 1: the channels-last convolution.
    pub fn forward_channels_last(&self, x: &Tensor) -> Result<Tensor> {
        let (n, h, w, _) = x.dims4()?;
        let cols = im2col(x, Channels::Last)?;
        super::add_bias(&cols.matmul(&self.weight.t()?)?, &self.bias)?.reshape((
            n,
            h,
            w,
            self.out_ch,
        ))
    }
}

impl Module for Conv3x3 {
    /// `[N, C, H, W]` -> `[N, out, H, W]`, zero padding of 1.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        if super::fused::use_kernel(&[x, &self.weight]) {
            let weight = self.weight.reshape((self.out_ch, c, 3, 3))?;
            let y = super::direct_conv::conv3x3(x, &weight)?;
            return y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?);
        }
        let cols = im2col(x, Channels::First)?;
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
        let fused = im2col(x.as_tensor(), Channels::First)?;
        let composed = im2col_composed(x.as_tensor(), Channels::First)?;
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

    /// Channels-last gives the channels-first result, transposed, with the same gradients.
    #[test]
    fn channels_last_matches_channels_first_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 7, DType::F32, &dev);
        let conv = Conv3x3::new(vb, 6, 5, candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 6, 7, 5), &dev)?)?;
        let dy = Tensor::randn(0f32, 1., (3, 5, 7, 5), &dev)?;
        let first = conv.forward(&x)?;
        let last_in = x.permute((0, 2, 3, 1))?;
        for fused in [true, false] {
            crate::nn::fused::set_fused(fused);
            let last = conv.forward_channels_last(&last_in)?;
            crate::nn::fused::set_fused(true);
            let last = last.permute((0, 3, 1, 2))?;
            let d = (&last - &first)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "fused {fused}: output differs by {d}");
            let g_first = (&first * &dy)?.sum_all()?.backward()?;
            let g_last = (&last * &dy)?.sum_all()?.backward()?;
            let vars = crate::train::named_vars(&map);
            let params = vars.iter().map(|(n, v)| (n.as_str(), v.as_tensor()));
            for (name, v) in params.chain([("input", x.as_tensor())]) {
                let (a, b) = (g_first.get(v).unwrap(), g_last.get(v).unwrap());
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-4, "fused {fused}: {name} gradient differs by {d}");
            }
        }
        Ok(())
    }
}
