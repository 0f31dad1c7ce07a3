//! Wan's causal 3D convolution and the feature cache that lets the VAE run a few frames at a
//! time.
//!
//! Activations inside the VAE are laid out `[B, T, C, H, W]` (frames before channels), so a
//! frame range is a `narrow` on dim 1 and the frames of a batch flatten into conv2d's
//! `[B*T, C, H, W]` without a permute.
//!
//! candle 0.11 has no conv3d. A `(kt, kh, kw)` kernel is computed as the sum over its `kt`
//! temporal taps of one conv2d each, run on all output frames at once (the frames shifted by
//! the tap, flattened into the batch). That is conv2d's own im2col + GEMM, so it runs on any
//! device (cuDNN or candle's kernels on CUDA); summing the taps instead of stacking them on
//! the channels keeps the im2col buffer at a conv2d's size (9 C per pixel rather than 27 C:
//! ~1.4 GB instead of ~4 GB f32 per 480x832 frame of the last decoder stage).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

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

/// diffusers' `WanCausalConv3d`: a 3D convolution with the kernel's temporal extent padded
/// on the past side only (zeros before the first frame), the spatial sides symmetrically.
#[derive(Debug, Clone)]
pub(super) struct CausalConv3d {
    /// Per temporal tap, the conv2d kernel `[out, in, kh, kw]`.
    taps: Vec<Tensor>,
    bias: Tensor,
    /// Spatial zero padding on each side.
    pad: usize,
}

impl CausalConv3d {
    /// Loads `weight` `[out, in, kt, kh, kw]` and `bias` `[out]` from `vb`; `padding` is the
    /// spatial padding (the temporal one is always the causal `kt - 1`, except for
    /// [`Self::strided`], which pads nothing).
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        (kt, kh, kw): (usize, usize, usize),
        padding: usize,
    ) -> Result<Self> {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let weight = vb.get_with_hints((cout, cin, kt, kh, kw), "weight", init)?;
        let taps = (0..kt)
            .map(|j| weight.narrow(2, j, 1)?.squeeze(2)?.contiguous())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            taps,
            bias: vb.get_with_hints(cout, "bias", candle_nn::init::ZERO)?,
            pad: padding,
        })
    }

    fn kt(&self) -> usize {
        self.taps.len()
    }

    /// The convolution without temporal padding: `x` `[B, Tin, C, H, W]` (which already
    /// holds the past frames it needs) -> `[B, (Tin - kt) / stride + 1, out, H', W']`.
    pub fn valid(&self, x: &Tensor, stride: usize) -> Result<Tensor> {
        let (b, t_in, c, h, w) = x.dims5()?;
        let kt = self.kt();
        if t_in < kt || stride == 0 {
            candle_core::bail!("Wan VAE: a {kt}-frame kernel over {t_in} frames");
        }
        let t_out = (t_in - kt) / stride + 1;
        let mut sum: Option<Tensor> = None;
        for (j, tap) in self.taps.iter().enumerate() {
            // The input frame of output frame i for tap j is j + stride * i.
            let frames = if stride == 1 {
                x.narrow(1, j, t_out)?
            } else {
                let picked = (0..t_out)
                    .map(|i| x.narrow(1, j + stride * i, 1))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&picked, 1)?
            };
            let y = frames
                .reshape((b * t_out, c, h, w))?
                .conv2d(tap, self.pad, 1, 1, 1)?;
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
        let keep = self.kt() - 1;
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
}
