//! A 3x3 convolution with stride 1 and zero padding 1 on `[N, C, H, W]` images, with its
//! backward.
//!
//! Why: candle's CPU conv2d builds an im2col matrix nine times the input's size in fresh
//! memory; the copy and the kernel's zeroing of those pages were a third of an SD1.5 UNet
//! forward.
//!
//! - **Forward** ([`tiles`]): one product of depth `9C` per tile of a few hundred
//!   output pixels, over that tile's own im2col matrix; images smaller than a tile share one.
//! - **Backward** ([`Grid`]): nine shifted products of depth `C`, one per tap `(ky, kx)`, on
//!   one zero-padded plane per channel, `[C, H+2, W+2]`, per image. On it the tap of output
//!   pixel `p = y (W+2) + x` is the element `p + ky (W+2) + kx` (the two columns past each
//!   row's end are computed and dropped). The input gradient runs the nine products transposed
//!   and scatters into a padded buffer; the weight gradient takes each tap's view as its right
//!   operand.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::fused::{slice, use_kernel};
use super::strided_gemm::{gemm_into_par, inner_parallelism, Out};

mod tiles;

/// `x [N, C, H, W]` convolved with `weight [Co, C, 3, 3]` (stride 1, zero padding 1, no bias):
/// `[N, Co, H, W]`, the same as `x.conv2d(weight, 1, 1, 1, 1)`.
///
/// The op for f32 on the CPU with the kernels on; candle's conv2d otherwise.
pub fn conv3x3(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (_, wc, kh, kw) = weight.dims4()?;
    if (kh, kw) != (3, 3) || wc != c {
        candle_core::bail!(
            "conv3x3: weight {:?} does not fit input {:?}",
            weight.dims(),
            x.dims()
        );
    }
    if !use_kernel(&[x, weight]) {
        return x.conv2d(weight, 1, 1, 1, 1);
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, Conv3x3Op)
}

/// The sizes of one convolution and of its padded grid.
#[derive(Debug, Clone, Copy)]
struct Grid {
    n: usize,
    c: usize,
    co: usize,
    h: usize,
    w: usize,
}

impl Grid {
    /// From an image `[N, C, H, W]` and the weight `[Co, C, 3, 3]`.
    fn of_weight(x: &Shape, weight: &Shape) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        let (co, _, _, _) = weight.dims4()?;
        Ok(Self { n, c, co, h, w })
    }

    /// From an image `[N, C, H, W]` and the output gradient `[N, Co, H, W]`.
    fn of_grad(x: &Shape, grad: &Shape) -> Result<Self> {
        let (n, c, h, w) = x.dims4()?;
        let (_, co, _, _) = grad.dims4()?;
        Ok(Self { n, c, co, h, w })
    }

    /// Row length of the padded grid.
    fn wp(&self) -> usize {
        self.w + 2
    }

    /// Elements of one padded channel plane.
    fn plane(&self) -> usize {
        (self.h + 2) * self.wp()
    }

    /// Output pixels computed on the padded grid: rows of `W+2`, the last one cut at `W`, so
    /// no tap reaches past the plane.
    fn span(&self) -> usize {
        (self.h - 1) * self.wp() + self.w
    }

    /// Where tap `k` (row-major over the 3x3 kernel) starts within a plane, and within a
    /// weight row `[C, 3, 3]`.
    fn tap(&self, k: usize) -> (usize, usize) {
        ((k / 3) * self.wp() + k % 3, k)
    }

    /// Copies one image `[C, H, W]` into the interior of zero-padded `[C, H+2, W+2]`.
    fn pad(&self, src: &[f32]) -> Vec<f32> {
        let (w, wp, plane) = (self.w, self.wp(), self.plane());
        let mut out = vec![0f32; self.c * plane];
        for ci in 0..self.c {
            for y in 0..self.h {
                let s = (ci * self.h + y) * w;
                let d = ci * plane + (y + 1) * wp + 1;
                out[d..d + w].copy_from_slice(&src[s..s + w]);
            }
        }
        out
    }

    /// Lays `[Co, H, W]` on the padded grid's rows, `[Co, H, W+2]`, with zero in the two
    /// columns past each row (outputs that do not exist get no gradient).
    fn widen(&self, src: &[f32]) -> Vec<f32> {
        let (w, wp) = (self.w, self.wp());
        let mut out = vec![0f32; self.co * self.h * wp];
        for r in 0..self.co * self.h {
            out[r * wp..r * wp + w].copy_from_slice(&src[r * w..(r + 1) * w]);
        }
        out
    }
}

/// Calls `f(task, parallelism of its products)` for each of `n` tasks (images in the
/// backward, tiles in the forward): one task per thread when there are enough for the pool,
/// otherwise the tasks in turn with gemm's own threads inside each product.
fn for_tasks(n: usize, f: impl Fn(usize, Parallelism) + Sync + Send) {
    if n >= rayon::current_num_threads() {
        (0..n)
            .into_par_iter()
            .for_each(|ni| f(ni, Parallelism::None));
    } else {
        let par = inner_parallelism();
        (0..n).for_each(|ni| f(ni, par));
    }
}

struct Conv3x3Op;

impl CustomOp2 for Conv3x3Op {
    fn name(&self) -> &'static str {
        "fewstep-conv3x3"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, wt) = (slice(sx, lx, self.name())?, slice(sw, lw, self.name())?);
        let g = Grid::of_weight(lx.shape(), lw.shape())?;
        let shape = Shape::from((g.n, g.co, g.h, g.w));
        let out = tiles::forward(x, wt, g);
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached, so that a gradient never carries the forward graph (the weight's goes
        // straight to the optimizer's moments).
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2(&weight.detach(), InputGrad)?;
        let dw = x.detach().apply_op2(&grad, WeightGrad)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `(grad [N, Co, H, W], weight) -> dx [N, C, H, W]`.
struct InputGrad;

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "fewstep-conv3x3-input-grad"
    }

    fn cpu_fwd(
        &self,
        sg: &CpuStorage,
        lg: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (gr, wt) = (slice(sg, lg, self.name())?, slice(sw, lw, self.name())?);
        let (co, c, _, _) = lw.shape().dims4()?;
        let (n, _, h, w) = lg.shape().dims4()?;
        let g = Grid { n, c, co, h, w };
        let (hw, span, plane) = (h * w, g.span(), g.plane());
        let mut dx = vec![0f32; n * c * hw];
        let dst = Out(dx.as_mut_ptr());
        for_tasks(n, |ni, par| {
            let gw = g.widen(&gr[ni * co * hw..(ni + 1) * co * hw]);
            let mut padded = vec![0f32; c * plane];
            for k in 0..9 {
                let (at, wk) = g.tap(k);
                // SAFETY: dst rows are planes and one tap's view stays inside its plane (see
                // the forward); within one product no element is written twice.
                unsafe {
                    gemm_into_par(
                        (c, span, co),
                        padded.as_mut_ptr().add(at),
                        (plane, 1),
                        true,
                        wt.as_ptr().add(wk),
                        (9, c * 9),
                        gw.as_ptr(),
                        (h * g.wp(), 1),
                        1.0,
                        par,
                    );
                }
            }
            for ci in 0..c {
                for y in 0..h {
                    let s = ci * plane + (y + 1) * g.wp() + 1;
                    let d = (ni * c + ci) * hw + y * w;
                    // SAFETY: image `ni` alone writes its [C, H, W] block of `dx`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(padded.as_ptr().add(s), dst.at(d), w);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from((n, c, h, w))))
    }
}

/// `(x [N, C, H, W], grad [N, Co, H, W]) -> dweight [Co, C, 3, 3]`.
struct WeightGrad;

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "fewstep-conv3x3-weight-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gr) = (slice(sx, lx, self.name())?, slice(sg, lg, self.name())?);
        let g = Grid::of_grad(lx.shape(), lg.shape())?;
        let (n, c, co, h, w) = (g.n, g.c, g.co, g.h, g.w);
        let (hw, span) = (h * w, g.span());
        // The images share the one weight gradient, so they run in turn, each product
        // threaded inside.
        let par = inner_parallelism();
        let mut dw = vec![0f32; co * c * 9];
        for ni in 0..n {
            let padded = g.pad(&x[ni * c * hw..(ni + 1) * c * hw]);
            let gw = g.widen(&gr[ni * co * hw..(ni + 1) * co * hw]);
            for k in 0..9 {
                let (at, wk) = g.tap(k);
                // SAFETY: dst [Co, C] with strides (9C, 9) from tap k stays inside dw; the
                // rhs is tap k's view read transposed (see the forward).
                unsafe {
                    gemm_into_par(
                        (co, c, span),
                        dw.as_mut_ptr().add(wk),
                        (c * 9, 9),
                        ni > 0,
                        gw.as_ptr(),
                        (h * g.wp(), 1),
                        padded.as_ptr().add(at),
                        (1, g.plane()),
                        1.0,
                        par,
                    );
                }
            }
        }
        Ok((CpuStorage::F32(dw), Shape::from((co, c, 3, 3))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::max_diff;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Output, input gradient and weight gradient equal candle's conv2d and its autograd, on
    /// odd sizes, one-pixel images, images that share a product unevenly and a strided
    /// (transposed) input.
    #[test]
    fn matches_conv2d_and_its_gradients() {
        for (n, c, co, h, w) in [
            (2, 3, 5, 4, 6),
            (1, 8, 4, 1, 1),
            (3, 2, 7, 5, 1),
            (1, 16, 16, 9, 7),
            // Five images in tiles of three and two (200 pixels each).
            (5, 2, 3, 10, 20),
            // One image in tiles of 17, 17 and 6 rows; rows wider than a tile.
            (1, 2, 3, 40, 30),
            (2, 1, 2, 3, 600),
        ] {
            let x = Var::from_tensor(&randn(&[n, c, h, w], 1)).unwrap();
            let wt = Var::from_tensor(&randn(&[co, c, 3, 3], 2)).unwrap();
            // The op runs, not the conv2d fallback it is compared with.
            assert!(use_kernel(&[&x, &wt]));
            let probe = randn(&[n, co, h, w], 3);
            let ours = conv3x3(&x, &wt).unwrap();
            let theirs = x.conv2d(&wt, 1, 1, 1, 1).unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-5, "{:?}", (n, c, co, h, w));
            let go = (ours * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gt = (theirs * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &wt] {
                assert!(!go.get(v).unwrap().track_op(), "the gradient holds a graph");
                let d = max_diff(go.get(v).unwrap(), gt.get(v).unwrap());
                assert!(d < 1e-4, "{:?}: gradient differs by {d}", (n, c, co, h, w));
            }
        }
        let x = randn(&[2, 5, 6, 3], 4).permute((0, 3, 1, 2)).unwrap();
        let wt = randn(&[4, 3, 3, 3], 5);
        let d = max_diff(
            &conv3x3(&x, &wt).unwrap(),
            &x.conv2d(&wt, 1, 1, 1, 1).unwrap(),
        );
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn a_kernel_that_does_not_fit_is_an_error() {
        let x = randn(&[1, 3, 4, 4], 1);
        assert!(conv3x3(&x, &randn(&[2, 4, 3, 3], 2)).is_err());
        assert!(conv3x3(&x, &randn(&[2, 3, 5, 5], 2)).is_err());
    }
}
