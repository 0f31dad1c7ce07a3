//! Samples as pictures: `[B, F, 3, H, W]` tensors in `[-1, 1]` to 8-bit RGB frames and back,
//! shared by every family's decode, the rewards and the trainers' real batches.

use candle_core::{DType, Device, Result, Tensor};
use image::RgbImage;

/// `[B, F, 3, H, W]` in `[-1, 1]` -> per row, `F` RGB frames.
pub fn to_frames(x: &Tensor) -> Result<Vec<Vec<RgbImage>>> {
    let (b, f, c, h, w) = x.dims5()?;
    if c != 3 {
        candle_core::bail!("expected 3 channels, got {c}");
    }
    let px = ((x.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .permute((0, 1, 3, 4, 2))?
        .contiguous()?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let frame = h * w * 3;
    Ok((0..b)
        .map(|i| {
            (0..f)
                .map(|j| {
                    let off = (i * f + j) * frame;
                    RgbImage::from_raw(w as u32, h as u32, px[off..off + frame].to_vec())
                        .expect("buffer has exactly one frame")
                })
                .collect()
        })
        .collect())
}

/// Frames (`[-1, 1]` scaled) of one sample as a `[F, 3, H, W]` tensor: the inverse of
/// [`to_frames`], used to build training batches from the world's renders.
pub fn from_frames(frames: &[RgbImage], device: &Device) -> Result<Tensor> {
    let (w, h) = frames[0].dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut data = Vec::with_capacity(frames.len() * 3 * h * w);
    for fr in frames {
        let raw = fr.as_raw();
        for c in 0..3 {
            for i in 0..h * w {
                data.push(raw[i * 3 + c] as f32 / 127.5 - 1.0);
            }
        }
    }
    Tensor::from_vec(data, (frames.len(), 3, h, w), device)
}
