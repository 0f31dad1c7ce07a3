//! CLIP image preprocessing as transformers' `CLIPImageProcessor` does it, read from a
//! `preprocessor_config.json`: resize (shortest side to `size`, bicubic), center crop, rescale
//! (`x / 255`), normalize with the model's mean and std. OpenCLIP's torchvision transform is
//! the same but for the crop offset's rounding ([`CropRounding`]).
//!
//! Two paths share the resampling filter:
//! - [`ClipImageProcessor::preprocess`] on 8-bit images reproduces the reference exactly: PIL's
//!   two-pass bicubic (horizontal, then vertical) with its antialiasing support scaled by the
//!   downscale factor, its 22-bit fixed-point coefficients, and rounding and clipping to 8 bits
//!   after each pass. The reward scores with it.
//! - [`ClipImageProcessor::preprocess_tensor`] on float images is the same filter as two
//!   matrix products, without the 8-bit rounding and clipping: differentiable w.r.t. the image.
//!   It differs from the reference by at most a few 8-bit levels where the bicubic overshoots
//!   (see the tests for the measured effect).

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use image::RgbImage;
use serde_json::Value;

use super::layout::{read_json, LoadError};

/// PIL's `Resampling.BICUBIC`, the only filter CLIP checkpoints use.
const PIL_BICUBIC: u64 = 3;
/// PIL's fixed-point precision for 8-bit resampling (32 bits, 8 for the value, 2 for overflow).
const PRECISION_BITS: u32 = 22;
/// OpenAI CLIP's normalization (transformers' defaults; OpenCLIP ViT-H uses the same). Python
/// floats, which numpy rounds to f32 for the arithmetic, as [`f32s`] does.
const OPENAI_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

fn f32s(v: [f64; 3]) -> [f32; 3] {
    v.map(|x| x as f32)
}

/// The resize target: CLIP's shortest-side rule, or a fixed size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    ShortestEdge(usize),
    Exact { height: usize, width: usize },
}

/// Where a center crop starts when the excess `e` (resized minus crop size) is odd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CropRounding {
    /// `e / 2` rounded down: transformers' `center_crop`.
    #[default]
    Floor,
    /// `round(e / 2)`, halves to even: torchvision's `CenterCrop` (OpenCLIP's preprocessing),
    /// one pixel further than `Floor` when `e % 4 == 3`.
    HalfEven,
}

impl CropRounding {
    fn offset(self, excess: usize) -> usize {
        let q = excess / 2;
        match self {
            Self::HalfEven if excess % 2 == 1 && q % 2 == 1 => q + 1,
            _ => q,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    pub resize: Option<Resize>,
    /// `(height, width)` of the center crop.
    pub crop: Option<(usize, usize)>,
    pub crop_rounding: CropRounding,
    pub rescale: Option<f64>,
    pub mean_std: Option<([f32; 3], [f32; 3])>,
}

impl Default for ClipImageProcessor {
    /// transformers' `CLIPImageProcessor()` defaults (224 px, OpenAI mean/std).
    fn default() -> Self {
        Self {
            resize: Some(Resize::ShortestEdge(224)),
            crop: Some((224, 224)),
            crop_rounding: CropRounding::Floor,
            rescale: Some(1.0 / 255.0),
            mean_std: Some((f32s(OPENAI_MEAN), f32s(OPENAI_STD))),
        }
    }
}

fn flag(raw: &Value, key: &str) -> bool {
    raw.get(key).and_then(Value::as_bool).unwrap_or(true)
}

/// A `[f32; 3]` from a list of three numbers or one number.
fn triple(v: &Value) -> Option<[f32; 3]> {
    match v {
        Value::Number(n) => Some([n.as_f64()? as f32; 3]),
        Value::Array(a) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x.as_f64()? as f32;
            }
            Some(out)
        }
        _ => None,
    }
}

impl ClipImageProcessor {
    /// Reads `preprocessor_config.json`.
    pub fn load(path: &Path) -> std::result::Result<Self, LoadError> {
        let raw: Value = read_json(path)?;
        Self::from_json(path, &raw)
    }

    /// Parses a processor config read from `path` (named in errors). Legacy feature-extractor
    /// configs (`"size": 224`, `"crop_size": 224`) are read as transformers reads them.
    pub fn from_json(path: &Path, raw: &Value) -> std::result::Result<Self, LoadError> {
        let bad = |m: String| LoadError::invalid(path, m);
        for key in ["image_processor_type", "feature_extractor_type"] {
            if let Some(kind) = raw.get(key).and_then(Value::as_str) {
                if !kind.starts_with("CLIP") {
                    return Err(LoadError::unsupported(
                        path,
                        format!("{key} {kind:?} (only CLIPImageProcessor is implemented)"),
                    ));
                }
            }
        }
        let size = |v: &Value| v.as_u64().filter(|&n| n > 0).map(|n| n as usize);
        let resize = if flag(raw, "do_resize") {
            let resample = raw.get("resample").map_or(Some(PIL_BICUBIC), Value::as_u64);
            if resample != Some(PIL_BICUBIC) {
                return Err(LoadError::unsupported(
                    path,
                    format!("resample {resample:?}: only PIL bicubic (3) is implemented"),
                ));
            }
            Some(match raw.get("size") {
                None => Resize::ShortestEdge(224),
                Some(v) => match (size(v), v.get("shortest_edge").and_then(size)) {
                    (Some(n), _) | (None, Some(n)) => Resize::ShortestEdge(n),
                    _ => match (
                        v.get("height").and_then(size),
                        v.get("width").and_then(size),
                    ) {
                        (Some(height), Some(width)) => Resize::Exact { height, width },
                        _ => return Err(bad(format!("size {v} is not a size"))),
                    },
                },
            })
        } else {
            None
        };
        let crop = if flag(raw, "do_center_crop") {
            Some(match raw.get("crop_size") {
                None => (224, 224),
                Some(v) => match (size(v), v.get("height").and_then(size)) {
                    (Some(n), _) => (n, n),
                    (None, Some(h)) => match v.get("width").and_then(size) {
                        Some(w) => (h, w),
                        None => return Err(bad(format!("crop_size {v} has no width"))),
                    },
                    _ => return Err(bad(format!("crop_size {v} is not a size"))),
                },
            })
        } else {
            None
        };
        let rescale = if flag(raw, "do_rescale") {
            match raw.get("rescale_factor") {
                None => Some(1.0 / 255.0),
                Some(v) => Some(
                    v.as_f64()
                        .ok_or_else(|| bad(format!("rescale_factor {v} is not a number")))?,
                ),
            }
        } else {
            None
        };
        let mean_std = if flag(raw, "do_normalize") {
            let get = |key: &str, default: [f32; 3]| match raw.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => triple(v).ok_or_else(|| bad(format!("{key} {v} is not 3 numbers"))),
            };
            let std = get("image_std", f32s(OPENAI_STD))?;
            if std.contains(&0.0) {
                return Err(bad("image_std has a zero".into()));
            }
            Some((get("image_mean", f32s(OPENAI_MEAN))?, std))
        } else {
            None
        };
        if let (Some(Resize::ShortestEdge(s)), Some((ch, cw))) = (resize, crop) {
            // transformers would zero-pad; no CLIP checkpoint crops more than it resizes to.
            if ch > s || cw > s {
                return Err(LoadError::unsupported(
                    path,
                    format!("crop_size {ch}x{cw} is larger than the resized shortest edge {s}"),
                ));
            }
        }
        Ok(Self {
            resize,
            crop,
            crop_rounding: CropRounding::Floor,
            rescale,
            mean_std,
        })
    }

    /// `(height, width)` after the resize (transformers' `get_resize_output_image_size`).
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.resize {
            None => (height, width),
            Some(Resize::Exact { height, width }) => (height, width),
            Some(Resize::ShortestEdge(s)) => {
                let (short, long) = (height.min(width), height.max(width));
                // Python's int(s * long / short): a true division, then truncation.
                let new_long = ((s * long) as f64 / short as f64) as usize;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// `(top, left, height, width)` of the crop in a `height x width` resized image.
    fn crop_box(&self, height: usize, width: usize) -> Result<(usize, usize, usize, usize)> {
        match self.crop {
            None => Ok((0, 0, height, width)),
            Some((ch, cw)) if ch <= height && cw <= width => {
                let r = self.crop_rounding;
                Ok((r.offset(height - ch), r.offset(width - cw), ch, cw))
            }
            Some((ch, cw)) => candle_core::bail!(
                "a {height}x{width} image is smaller than the {ch}x{cw} center crop"
            ),
        }
    }

    /// `(channels, height, width)` of one preprocessed image of `height x width`.
    pub fn output_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let (h, w) = self.resized_size(height, width);
        let (_, _, ch, cw) = self.crop_box(h, w)?;
        Ok((ch, cw))
    }

    /// One 8-bit RGB image to `[3, h, w]` pixel values, exactly as `CLIPImageProcessor` makes
    /// them from the same image.
    pub fn preprocess(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let (w, h) = img.dimensions();
        let (h, w) = (h as usize, w as usize);
        if h == 0 || w == 0 {
            candle_core::bail!("an empty {h}x{w} image cannot be preprocessed");
        }
        let (rh, rw) = self.resized_size(h, w);
        let resized = resize_u8(img.as_raw(), h, w, rh, rw);
        let (top, left, ch, cw) = self.crop_box(rh, rw)?;
        let mut out = vec![0f32; 3 * ch * cw];
        for c in 0..3 {
            for y in 0..ch {
                for x in 0..cw {
                    let u = resized[((top + y) * rw + left + x) * 3 + c];
                    out[(c * ch + y) * cw + x] = self.value(u as f64, c);
                }
            }
        }
        Ok(out)
    }

    /// Rescale and normalize one value (`v` in 0..=255) as transformers does: the rescale in
    /// f64 stored as f32, the normalization in f32.
    fn value(&self, v: f64, channel: usize) -> f32 {
        let v = match self.rescale {
            Some(f) => (v * f) as f32,
            None => v as f32,
        };
        match self.mean_std {
            Some((m, s)) => (v - m[channel]) / s[channel],
            None => v,
        }
    }

    /// 8-bit images (all preprocessing to the same size) to a `[B, 3, h, w]` f32 batch.
    pub fn preprocess_batch(&self, imgs: &[RgbImage], device: &Device) -> Result<Tensor> {
        let mut data = Vec::new();
        let mut size = None;
        for img in imgs {
            let (w, h) = img.dimensions();
            let s = self.output_size(h as usize, w as usize)?;
            if *size.get_or_insert(s) != s {
                candle_core::bail!(
                    "images preprocess to different sizes ({:?} and {s:?}): set a center crop",
                    size.unwrap_or(s)
                );
            }
            data.extend(self.preprocess(img)?);
        }
        let (h, w) = size.unwrap_or((0, 0));
        Tensor::from_vec(data, (imgs.len(), 3, h, w), device)
    }

    /// Float images `[B, 3, H, W]` in `[-1, 1]` (the decoder's range) to pixel values, with
    /// the same filter as [`Self::preprocess`] but in floating point, without its 8-bit
    /// rounding and clipping: every op has a backward, so a loss on the scores reaches `x`.
    pub fn preprocess_tensor(&self, x: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 {
            candle_core::bail!("CLIP preprocessing takes RGB images, got {c} channels");
        }
        let (rh, rw) = self.resized_size(h, w);
        let (top, left, ch, cw) = self.crop_box(rh, rw)?;
        let dev = x.device();
        // [0, 1], then the value a u8 image would have had before the rescale.
        let mut y = ((x.to_dtype(DType::F32)? + 1.0)? * 127.5)?;
        if rw != w || cw != rw {
            let m = resize_matrix(w, rw, left, cw, dev)?; // [cw, W]
            y = y.broadcast_matmul(&m.t()?)?;
        }
        if rh != h || ch != rh {
            let m = resize_matrix(h, rh, top, ch, dev)?; // [ch, H]
            y = m.broadcast_matmul(&y)?;
        }
        if let Some(f) = self.rescale {
            y = (y * f)?;
        }
        if let Some((m, s)) = self.mean_std {
            let m = Tensor::new(&m, dev)?.reshape((1, 3, 1, 1))?;
            let s = Tensor::new(&s, dev)?.reshape((1, 3, 1, 1))?;
            y = y.broadcast_sub(&m)?.broadcast_div(&s)?;
        }
        Ok(y)
    }
}

fn bicubic(x: f64) -> f64 {
    // Keys' cubic convolution with a = -0.5, as PIL's.
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// PIL's filter taps for resampling `in_size` samples to `out_size`: for each output sample,
/// the first input index and the normalized weights of the inputs it reads. Downscaling
/// widens the filter by the scale factor (antialiasing).
fn taps(in_size: usize, out_size: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero, as `as` does.
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> = (first..end)
                .map(|j| bicubic((j as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            (first, w)
        })
        .collect()
}

/// PIL's 8-bit coefficients: the weights in 22-bit fixed point, rounded half away from zero.
fn fixed_point(w: &[f64]) -> Vec<i64> {
    let one = (1u32 << PRECISION_BITS) as f64;
    w.iter()
        .map(|&v| {
            if v < 0.0 {
                (-0.5 + v * one) as i64
            } else {
                (0.5 + v * one) as i64
            }
        })
        .collect()
}

/// Where a pass finds its samples in an interleaved RGB buffer: `lines` lines of samples
/// `step` bytes apart, lines `line_step` bytes apart.
#[derive(Debug, Clone, Copy)]
struct Lines {
    lines: usize,
    line_step: usize,
    step: usize,
}

/// One PIL pass: resamples every line of `src` (laid out as `from`) from `in_len` to `out_len`
/// samples into a buffer laid out as `to`, each value rounded and clipped to 8 bits.
fn resample_pass(src: &[u8], from: Lines, in_len: usize, to: Lines, out_len: usize) -> Vec<u8> {
    let taps: Vec<(usize, Vec<i64>)> = taps(in_len, out_len)
        .into_iter()
        .map(|(first, w)| (first, fixed_point(&w)))
        .collect();
    let mut dst = vec![0u8; from.lines * out_len * 3];
    for line in 0..from.lines {
        for (o, (first, k)) in taps.iter().enumerate() {
            for c in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (j, &kj) in k.iter().enumerate() {
                    acc += src[line * from.line_step + (first + j) * from.step + c] as i64 * kj;
                }
                dst[line * to.line_step + o * to.step + c] =
                    (acc >> PRECISION_BITS).clamp(0, 255) as u8;
            }
        }
    }
    dst
}

/// PIL's `Image.resize((w, h), BICUBIC)` of an RGB `[H, W, 3]` buffer: horizontal pass first,
/// each pass only when its size changes, 8-bit rounding after each.
fn resize_u8(src: &[u8], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<u8> {
    let mut img = src.to_vec();
    if out_w != w {
        let rows = |width: usize| Lines {
            lines: h,
            line_step: width * 3,
            step: 3,
        };
        img = resample_pass(&img, rows(w), w, rows(out_w), out_w);
    }
    if out_h != h {
        // Lines are columns: samples a row apart, lines a pixel apart.
        let columns = Lines {
            lines: out_w,
            line_step: 3,
            step: out_w * 3,
        };
        img = resample_pass(&img, columns, h, columns, out_h);
    }
    img
}

/// `[count, in_size]`: rows `start..start + count` of the resampling operator from `in_size`
/// to `out_size` samples (the crop is a slice of its rows).
fn resize_matrix(
    in_size: usize,
    out_size: usize,
    start: usize,
    count: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; count * in_size];
    if out_size == in_size {
        for i in 0..count {
            m[i * in_size + start + i] = 1.0;
        }
    } else {
        for (i, (first, w)) in taps(in_size, out_size)
            .into_iter()
            .skip(start)
            .take(count)
            .enumerate()
        {
            for (j, v) in w.into_iter().enumerate() {
                m[i * in_size + first + j] = v as f32;
            }
        }
    }
    Tensor::from_vec(m, (count, in_size), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::sd::testing::{fixture, max_abs_diff, Fixture};
    use candle_core::Var;

    fn raw_images(fx: &Fixture) -> Vec<RgbImage> {
        (0..2)
            .map(|i| {
                let t = fx.tensor(&format!("images.raw.{i}"));
                let (h, w, _) = t.dims3().unwrap();
                let data = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
                RgbImage::from_raw(w as u32, h as u32, data).unwrap()
            })
            .collect()
    }

    #[test]
    fn eight_bit_path_reproduces_clip_image_processor() {
        let fx = fixture("clip-tiny");
        let p = ClipImageProcessor::load(&fx.dir.join("preprocessor_config.json")).unwrap();
        assert_eq!(p.resize, Some(Resize::ShortestEdge(30)));
        let imgs = raw_images(&fx);
        // A downscaled landscape and an upscaled portrait, both cropped.
        assert_eq!(p.resized_size(45, 64), (30, 42));
        assert_eq!(p.resized_size(20, 17), (35, 30));
        let got = p.preprocess_batch(&imgs, &Device::Cpu).unwrap();
        let want = fx.tensor("pixel_values");
        let diff = max_abs_diff(&got, &want);
        eprintln!("clip-tiny pixel_values (8-bit path): max abs diff {diff:.3e}");
        assert!(diff <= 1e-6, "{diff}");
    }

    #[test]
    fn float_path_is_close_to_the_reference_and_differentiable() {
        let fx = fixture("clip-tiny");
        let p = ClipImageProcessor::load(&fx.dir.join("preprocessor_config.json")).unwrap();
        let want = fx.tensor("pixel_values");
        // One 8-bit level in normalized units, for each channel's std.
        let level = (1.0 / 255.0 / OPENAI_STD.iter().cloned().fold(f64::MAX, f64::min)) as f32;
        for (i, img) in raw_images(&fx).iter().enumerate() {
            let (w, h) = img.dimensions();
            let x = Tensor::from_vec(
                img.as_raw().clone(),
                (h as usize, w as usize, 3),
                &Device::Cpu,
            )
            .unwrap()
            .permute((2, 0, 1))
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
            let x = Var::from_tensor(&((x / 127.5).unwrap() - 1.0).unwrap()).unwrap();
            let got = p.preprocess_tensor(x.as_tensor()).unwrap();
            let w = want.narrow(0, i, 1).unwrap();
            let diff = max_abs_diff(&got, &w);
            let mean: f32 = (&got - &w)
                .unwrap()
                .abs()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            eprintln!(
                "image {i}: float path vs CLIPImageProcessor: max abs {diff:.3e} ({:.1} levels), mean abs {mean:.3e} ({:.2} levels)",
                diff / level,
                mean / level
            );
            // The difference is the 8-bit rounding of each pass and the clipping of the
            // bicubic's overshoot at the saturated block's edges.
            assert!(mean < level && diff < 32.0 * level, "{diff} {mean}");
            let grads = got.sum_all().unwrap().backward().unwrap();
            let g = grads.get(x.as_tensor()).expect("image gradient");
            let s: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(s.is_finite() && s > 0.0, "{s}");
        }
    }

    #[test]
    fn pil_taps_and_identity() {
        // Upscaling keeps the plain bicubic (support 2); weights sum to one.
        for (i, (first, w)) in taps(17, 30).iter().enumerate() {
            assert!(
                w.len() <= 5 && (w.iter().sum::<f64>() - 1.0).abs() < 1e-12,
                "{i}"
            );
            assert!(*first < 17);
        }
        // Downscaling by 1.5 widens the support to 3 (antialiasing).
        assert!(taps(45, 30).iter().any(|(_, w)| w.len() > 5));
        // Same size: no pass runs, the image is returned as it is (PIL copies it).
        let img: Vec<u8> = (0..4 * 5 * 3).map(|v| (v * 7 % 256) as u8).collect();
        assert_eq!(resize_u8(&img, 4, 5, 4, 5), img);
        // A constant image stays constant through both passes.
        let flat = vec![200u8; 9 * 7 * 3];
        assert!(resize_u8(&flat, 9, 7, 4, 13).iter().all(|&v| v == 200));
    }

    #[test]
    fn configs_legacy_forms_and_errors() {
        let path = Path::new("/m/preprocessor_config.json");
        let legacy = serde_json::json!({
            "feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224,
            "do_center_crop": true, "do_normalize": true, "do_resize": true, "resample": 3,
        });
        assert_eq!(
            ClipImageProcessor::from_json(path, &legacy).unwrap(),
            ClipImageProcessor::default()
        );
        let exact =
            serde_json::json!({"size": {"height": 32, "width": 48}, "do_center_crop": false});
        let p = ClipImageProcessor::from_json(path, &exact).unwrap();
        assert_eq!(p.output_size(10, 10).unwrap(), (32, 48));

        for (raw, needle) in [
            (serde_json::json!({"resample": 2}), "resample"),
            (
                serde_json::json!({"image_processor_type": "SiglipImageProcessor"}),
                "Siglip",
            ),
            (serde_json::json!({"image_mean": [0.5, 0.5]}), "image_mean"),
            (
                serde_json::json!({"size": {"shortest_edge": 30}, "crop_size": 64}),
                "crop_size",
            ),
        ] {
            let err = ClipImageProcessor::from_json(path, &raw)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("preprocessor_config.json") && err.contains(needle),
                "{err}"
            );
        }
        let small = RgbImage::new(4, 4);
        let p = ClipImageProcessor {
            resize: None,
            ..Default::default()
        };
        let err = p.preprocess(&small).unwrap_err().to_string();
        assert!(err.contains("smaller than the 224x224"), "{err}");
    }

    #[test]
    fn crop_offsets_round_like_transformers_or_torchvision() {
        // Python: (e // 2) and int(round(e / 2)) for e = 0..8.
        let floor: Vec<usize> = (0..8).map(|e| CropRounding::Floor.offset(e)).collect();
        let even: Vec<usize> = (0..8).map(|e| CropRounding::HalfEven.offset(e)).collect();
        assert_eq!(floor, [0, 0, 1, 1, 2, 2, 3, 3]);
        assert_eq!(even, [0, 0, 1, 2, 2, 2, 3, 4]);
        let p = ClipImageProcessor {
            resize: None,
            crop: Some((2, 2)),
            crop_rounding: CropRounding::HalfEven,
            ..Default::default()
        };
        assert_eq!(p.crop_box(5, 9).unwrap(), (2, 4, 2, 2));
    }
}
