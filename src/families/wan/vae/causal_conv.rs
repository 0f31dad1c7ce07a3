//! Wan's causal 3D convolution and the feature cache that lets the VAE run a few frames at a
//! time.
//!
//! Activations inside the VAE are laid out `[B, T, C, H, W]` (frames before channels), so a
//! frame range is a `narrow` on dim 1 and the frames of a batch flatten into conv2d's
//! `[B*T, C, H, W]` without a permute.
//!
//! candle 0.11 has no conv3d. On the CPU in f32 a `(kt, k, k)` kernel is an im2col of the
//! output frames of all videos, every temporal tap stacked on the rows (`nn::conv`'s
//! [`FrameKernel`]), and a GEMM: one per cache-sized group of frames, not one per frame and
//! tap as candle's conv2d does, so a batch costs no more calls than one video. Elsewhere, or
//! when that matrix would be too large (see [`MAX_IM2COL_BYTES`]), it is the sum over its `kt`
//! temporal taps of one conv2d each, run on all output frames at once (the frames shifted by
//! the tap, flattened into the batch): candle's conv2d (on CUDA an im2col plus a cuBLAS GEMM;
//! fewstep does not enable candle's `cudnn` feature), with an im2col buffer of a conv2d's
//! size.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::conv::{frames_im2col, FrameKernel};

/// What one cached layer remembers between chunks of frames.
#[derive(Debug, Default)]
pub(super) struct Slot {
    /// Whether a chunk went through the layer already (the resamplers treat the first
    /// frame of a video on its own).
    pub started: bool,
    /// The last input frames the layer needs as its past (`kt - 1` for a causal conv,
    /// fewer right after the start), `[B, t, C, H, W]`.
    pub past: Option<Tensor>,
}

/// The per-call state of a chunked encode or decode: one [`Slot`] per cached layer, in the
/// order the layers run. Made fresh for every call, so nothing leaks between videos.
#[derive(Debug, Default)]
pub(super) struct FrameCache {
    slots: Vec<Slot>,
    cursor: usize,
}

impl FrameCache {
    /// Starts the next chunk: the layers take their slots from the first one again.
    pub fn begin_chunk(&mut self) {
        self.cursor = 0;
    }

    /// The next layer's slot (made on the first chunk).
    pub fn next_slot(&mut self) -> &mut Slot {
        if self.cursor == self.slots.len() {
            self.slots.push(Slot::default());
        }
        self.cursor += 1;
        &mut self.slots[self.cursor - 1]
    }
}

/// Copies `x`'s last `n` frames (of `[B, T, ...]`) into their own storage, so that the cache
/// does not keep the whole chunk alive.
pub(super) fn last_frames(x: &Tensor, n: usize) -> Result<Tensor> {
    let t = x.dim(1)?;
    let n = n.min(t);
    x.narrow(1, t - n, n)?.force_contiguous()
}

/// The largest im2col matrix [`CausalConv3d`] builds at once: the frames of a batch go
/// through it a few at a time, so that each matrix is still in cache when the GEMM reads it
/// (and, under mimalloc, reuses freed pages instead of faulting in fresh ones). A single
/// frame larger than this (the real model's full-size frames) takes the per-tap conv2d
/// path, which never builds the whole matrix.
const MAX_IM2COL_BYTES: usize = 2 << 20;

/// diffusers' `WanCausalConv3d`: a 3D convolution with the kernel's temporal extent padded
/// on the past side only (zeros before the first frame), the spatial sides symmetrically.
#[derive(Debug, Clone)]
pub(super) struct CausalConv3d {
    /// `[out, in, kt, k, k]`.
    weight: Tensor,
    bias: Tensor,
    /// Temporal and (square) spatial kernel size.
    kt: usize,
    k: usize,
    /// Spatial zero padding on each side.
    pad: usize,
    /// Spatial stride.
    stride: usize,
}

impl CausalConv3d {
    /// Loads `weight` `[out, in, kt, kh, kw]` (`kh == kw`) and `bias` `[out]` from `vb`;
    /// `padding` is the spatial padding (the temporal one is always the causal `kt - 1`,
    /// except for [`Self::valid`], which pads nothing).
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        (kt, kh, kw): (usize, usize, usize),
        padding: usize,
    ) -> Result<Self> {
        if kh != kw {
            candle_core::bail!("Wan VAE: a {kh}x{kw} kernel (only square ones are supported)");
        }
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let weight = vb.get_with_hints((cout, cin, kt, kh, kw), "weight", init)?;
        Self::from_weight(vb, weight, padding, 1)
    }

    /// A 2D conv (`weight` `[out, in, k, k]`) run on every frame: a 3D conv with one temporal
    /// tap.
    pub fn spatial(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let weight = vb.get_with_hints((cout, cin, k, k), "weight", init)?;
        Self::from_weight(vb, weight.unsqueeze(2)?, padding, stride)
    }

    fn from_weight(vb: VarBuilder, weight: Tensor, pad: usize, stride: usize) -> Result<Self> {
        let (cout, _, kt, k, _) = weight.dims5()?;
        Ok(Self {
            weight,
            bias: vb.get_with_hints(cout, "bias", candle_nn::init::ZERO)?,
            kt,
            k,
            pad,
            stride,
        })
    }

    fn kernel(&self, t_stride: usize) -> FrameKernel {
        FrameKernel {
            kt: self.kt,
            k: self.k,
            t_stride,
            stride: self.stride,
            pad: self.pad,
        }
    }

    /// The convolution without temporal padding: `x` `[B, Tin, C, H, W]` (which already
    /// holds the past frames it needs) -> `[B, (Tin - kt) / t_stride + 1, out, H', W']`.
    ///
    /// On the CPU in f32 this is one im2col over all frames of all videos and one GEMM: the
    /// tiny VAE's convs are too small for per-frame work to amortise (candle's conv2d runs
    /// a GEMM per frame and per 512 pixels, so its cost grew with the batch). Elsewhere it
    /// is one conv2d per temporal tap (candle's conv2d), summed.
    pub fn valid(&self, x: &Tensor, t_stride: usize) -> Result<Tensor> {
        self.valid_within(x, t_stride, MAX_IM2COL_BYTES)
    }

    /// [`Self::valid`] with im2col matrices of at most `max_bytes`.
    fn valid_within(&self, x: &Tensor, t_stride: usize, max_bytes: usize) -> Result<Tensor> {
        let (b, t_in, c, h, w) = x.dims5()?;
        let kernel = self.kernel(t_stride);
        let Some((t_out, ho, wo)) = kernel.out_dims(t_in, h, w) else {
            candle_core::bail!(
                "Wan VAE: a ({}, {k}, {k}) kernel with temporal stride {t_stride} over \
                 {t_in} frames of {h}x{w}",
                self.kt,
                k = self.k
            );
        };
        let frame_bytes = kernel.taps(c) * ho * wo * x.dtype().size_in_bytes();
        let gemm = crate::nn::fused::fused_enabled()
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && frame_bytes <= max_bytes;
        if !gemm {
            return self.per_tap(x, t_stride, t_out);
        }
        // `weight [out, K] x im2col [K, pixels]`, a group of output frames at a time.
        let o = self.weight.dim(0)?;
        let weight = self.weight.reshape((o, ()))?;
        let frames = b * t_out;
        let group = (max_bytes / frame_bytes).clamp(1, frames);
        let parts = (0..frames)
            .step_by(group)
            .map(|n| weight.matmul(&frames_im2col(x, kernel, n..frames.min(n + group))?))
            .collect::<Result<Vec<_>>>()?;
        let y = Tensor::cat(&parts, 1)?;
        // The bias add writes the channels-first layout in the same pass.
        y.reshape((o, b, t_out, ho, wo))?
            .permute((1, 2, 0, 3, 4))?
            .broadcast_add(&self.bias.reshape((1, 1, o, 1, 1))?)
    }

    /// [`Self::valid`] as a conv2d per temporal tap over the frames it reads, summed.
    fn per_tap(&self, x: &Tensor, t_stride: usize, t_out: usize) -> Result<Tensor> {
        let (b, _, c, h, w) = x.dims5()?;
        let mut sum: Option<Tensor> = None;
        for j in 0..self.kt {
            // The input frame of output frame i for tap j is j + t_stride * i.
            let frames = if t_stride == 1 {
                x.narrow(1, j, t_out)?
            } else {
                let picked = (0..t_out)
                    .map(|i| x.narrow(1, j + t_stride * i, 1))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&picked, 1)?
            };
            let tap = self.weight.narrow(2, j, 1)?.squeeze(2)?.contiguous()?;
            let y =
                frames
                    .reshape((b * t_out, c, h, w))?
                    .conv2d(&tap, self.pad, self.stride, 1, 1)?;
            sum = Some(match sum {
                Some(s) => (s + y)?,
                None => y,
            });
        }
        let Some(y) = sum else {
            candle_core::bail!("Wan VAE: a convolution without taps");
        };
        let y = y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
        let (_, o, ho, wo) = y.dims4()?;
        y.reshape((b, t_out, o, ho, wo))
    }

    /// The causal convolution of a chunk `x` `[B, T, C, H, W]` -> `[B, T, out, H, W]`,
    /// continuing from the frames in `past` (zeros before the first chunk) and leaving this
    /// chunk's last `kt - 1` input frames there for the next one.
    pub fn causal(&self, x: &Tensor, past: &mut Option<Tensor>) -> Result<Tensor> {
        let keep = self.kt - 1;
        if keep == 0 {
            return self.valid(x, 1);
        }
        let seq = match past.take() {
            Some(p) => Tensor::cat(&[&p, x], 1)?,
            None => x.clone(),
        };
        let (b, have, c, h, w) = seq.dims5()?;
        let t = x.dim(1)?;
        // Zeros for the past frames that do not exist (before the video's first frame).
        let missing = keep.saturating_sub(have - t);
        *past = Some(last_frames(&seq, keep)?);
        let padded = if missing > 0 {
            let zeros = Tensor::zeros((b, missing, c, h, w), seq.dtype(), seq.device())?;
            Tensor::cat(&[&zeros, &seq], 1)?
        } else {
            seq
        };
        self.valid(&padded, 1)
    }

    /// [`Self::causal`] with its past kept in the next slot of `cache`.
    pub fn forward(&self, x: &Tensor, cache: &mut FrameCache) -> Result<Tensor> {
        let slot = cache.next_slot();
        slot.started = true;
        self.causal(x, &mut slot.past)
    }

    /// A pointwise (1x1x1) conv: no past needed, no slot used.
    pub fn pointwise(&self, x: &Tensor) -> Result<Tensor> {
        self.valid(x, 1)
    }
}

/// `[B, C, T, H, W]` (diffusers' video layout) <-> `[B, T, C, H, W]` (ours): the same swap
/// both ways.
pub(super) fn swap_time_and_channels(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 1, 3, 4))?.contiguous()
}

/// f32 for half precision (the norms' statistics), the dtype itself otherwise.
pub(super) fn wide(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// The conv run in chunks of 1, 4, 2 frames with the cache equals one causal conv over
    /// the whole clip, and that equals a plain conv over the clip with two zero frames in
    /// front (the definition).
    #[test]
    fn chunked_causal_conv_equals_the_whole_clip() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 3, DType::F32, &dev);
        let conv = CausalConv3d::new(vb, 3, 5, (3, 3, 3), 1)?;
        let x = Tensor::randn(0f32, 1.0, (2, 7, 3, 4, 6), &dev)?;
        let whole = conv.causal(&x, &mut None)?;
        let zeros = Tensor::zeros((2, 2, 3, 4, 6), DType::F32, &dev)?;
        let reference = conv.valid(&Tensor::cat(&[&zeros, &x], 1)?, 1)?;
        let mut cache = FrameCache::default();
        let mut parts = Vec::new();
        for (start, len) in [(0, 1), (1, 4), (5, 2)] {
            cache.begin_chunk();
            parts.push(conv.forward(&x.narrow(1, start, len)?, &mut cache)?);
        }
        let chunked = Tensor::cat(&parts, 1)?;
        for (what, y) in [("whole", &whole), ("chunked", &chunked)] {
            let d = (y - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "{what} differs by {d}");
        }
        Ok(())
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// The im2col + GEMM path (all frames at once or a few at a time) gives the per-tap conv2d
    /// path's output and gradients for every kernel shape the VAE uses: 3x3x3, the
    /// resamplers' temporal (3, 1, 1) with stride 1 and 2, pointwise, and the 2D convs with
    /// spatial stride 1 and 2.
    #[test]
    fn the_gemm_path_matches_conv2d_per_tap_with_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let cases = [
            ((3, 3, 3), 1, 1, 1, (2, 4, 3, 5, 7)),
            ((3, 1, 1), 1, 0, 1, (2, 3, 4, 3, 5)),
            ((3, 1, 1), 2, 0, 1, (2, 5, 4, 3, 5)),
            ((1, 1, 1), 1, 0, 1, (3, 2, 5, 4, 4)),
            ((1, 3, 3), 1, 1, 1, (2, 2, 3, 6, 5)),
            // Odd sizes: candle's conv2d backward (the reference) needs `(H - k) % 2 == 0`.
            ((1, 3, 3), 1, 0, 2, (2, 2, 3, 7, 9)),
        ];
        for (seed, (kernel, t_stride, pad, stride, dims)) in cases.into_iter().enumerate() {
            let map = VarMap::new();
            let vb = crate::nn::random_var_builder(&map, seed as u64, DType::F32, &dev);
            let (cin, cout) = (dims.2, 6);
            let mut conv = CausalConv3d::new(vb, cin, cout, kernel, pad)?;
            conv.stride = stride;
            let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, dims, &dev)?)?;
            let reference = conv.per_tap(x.as_tensor(), t_stride, {
                let k = conv.kernel(t_stride);
                k.out_dims(dims.1, dims.3, dims.4).unwrap().0
            })?;
            let dy = reference.randn_like(0.0, 1.0)?;
            let g_ref = (&reference * &dy)?.sum_all()?.backward()?;
            let vars = crate::train::named_vars(&map);
            // All frames at once, one at a time, and three at a time (a last group of fewer).
            let k = conv.kernel(t_stride);
            let (_, h, w) = k.out_dims(dims.1, dims.3, dims.4).unwrap();
            let frame_bytes = k.taps(cin) * h * w * 4;
            for max_bytes in [usize::MAX, frame_bytes, 3 * frame_bytes] {
                let ours = conv.valid_within(x.as_tensor(), t_stride, max_bytes)?;
                assert_eq!(ours.dims(), reference.dims());
                let d = max_diff(&ours, &reference)?;
                assert!(
                    d < 1e-5,
                    "{kernel:?} t_stride {t_stride} stride {stride}: {d}"
                );
                let g = (&ours * &dy)?.sum_all()?.backward()?;
                let params = vars.iter().map(|(n, v)| (n.as_str(), v.as_tensor()));
                for (name, v) in params.chain([("input", x.as_tensor())]) {
                    let (a, r) = (g.get(v).unwrap(), g_ref.get(v).unwrap());
                    assert!(r.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
                    let d = max_diff(a, r)?;
                    assert!(d < 1e-4, "{kernel:?}: {name} gradient differs by {d}");
                }
            }
        }
        Ok(())
    }

    /// A video's output does not depend on the rest of its batch, to the bit: the same seed
    /// must give the same video whatever it is batched with.
    #[test]
    fn a_video_gets_the_same_bits_alone_and_in_a_batch() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 9, DType::F32, &dev);
        let conv = CausalConv3d::new(vb, 8, 8, (3, 3, 3), 1)?;
        let batch = Tensor::randn(0f32, 1.0, (4, 6, 8, 32, 48), &dev)?;
        let alone = conv.valid(&batch.narrow(0, 2, 1)?, 1)?;
        let inside = conv.valid(&batch, 1)?.narrow(0, 2, 1)?;
        let (a, b) = (
            alone.flatten_all()?.to_vec1::<f32>()?,
            inside.flatten_all()?.to_vec1::<f32>()?,
        );
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        Ok(())
    }

    /// Too large for one matrix, the conv falls back to conv2d per tap with the same result.
    #[test]
    fn a_video_too_large_for_one_matrix_goes_tap_by_tap() -> Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 4, DType::F32, &dev);
        let conv = CausalConv3d::new(vb, 3, 4, (3, 3, 3), 1)?;
        let x = Tensor::randn(0f32, 1.0, (2, 4, 3, 5, 6), &dev)?;
        let whole = conv.valid(&x, 1)?;
        let tapped = conv.valid_within(&x, 1, 1)?;
        let reference = conv.per_tap(&x, 1, 2)?;
        assert_eq!(
            tapped.flatten_all()?.to_vec1::<f32>()?,
            reference.flatten_all()?.to_vec1::<f32>()?
        );
        assert!(max_diff(&whole, &reference)? < 1e-5);
        Ok(())
    }
}
