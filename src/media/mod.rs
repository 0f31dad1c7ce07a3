//! Media encoding: still images as PNG, JPEG or WebP; videos as animated GIF, APNG or H.264
//! in MP4.

pub mod mp4;

use std::io::Cursor;

use image::{ImageFormat, RgbImage};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("{format} cannot hold {frames} frames")]
    NotAnimated { format: &'static str, frames: usize },
    #[error("nothing to encode")]
    Empty,
    #[error("encoding failed: {0}")]
    Encode(String),
}

fn enc(e: impl std::fmt::Display) -> MediaError {
    MediaError::Encode(e.to_string())
}

/// Output formats a client can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
    Gif,
    Apng,
    Mp4,
}

impl OutputFormat {
    pub fn media_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
            Self::Gif => "image/gif",
            Self::Apng => "image/apng",
            Self::Mp4 => "video/mp4",
        }
    }

    pub fn is_animated(self) -> bool {
        matches!(self, Self::Gif | Self::Apng | Self::Mp4)
    }

    /// The format a media type in an `Accept` header names, if any.
    pub fn from_media_type(mt: &str) -> Option<Self> {
        match mt.trim().to_ascii_lowercase().as_str() {
            "image/png" => Some(Self::Png),
            "image/jpeg" | "image/jpg" => Some(Self::Jpeg),
            "image/webp" => Some(Self::Webp),
            "image/gif" => Some(Self::Gif),
            "image/apng" | "image/vnd.mozilla.apng" => Some(Self::Apng),
            "video/mp4" => Some(Self::Mp4),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
            Self::Gif => "gif",
            Self::Apng => "apng",
            Self::Mp4 => "mp4",
        }
    }
}

/// Encodes `frames` (one frame = a still image). `fps` sets the frame delay of animations.
pub fn encode(frames: &[RgbImage], format: OutputFormat, fps: u32) -> Result<Vec<u8>, MediaError> {
    let first = frames.first().ok_or(MediaError::Empty)?;
    match format {
        OutputFormat::Gif => encode_gif(frames, fps),
        OutputFormat::Apng => encode_apng(frames, fps),
        OutputFormat::Mp4 => mp4::encode(frames, fps),
        still if frames.len() > 1 => Err(MediaError::NotAnimated {
            format: still.name(),
            frames: frames.len(),
        }),
        OutputFormat::Png => write(first, ImageFormat::Png),
        OutputFormat::Jpeg => write(first, ImageFormat::Jpeg),
        OutputFormat::Webp => write(first, ImageFormat::WebP),
    }
}

fn write(img: &RgbImage, format: ImageFormat) -> Result<Vec<u8>, MediaError> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).map_err(enc)?;
    Ok(out.into_inner())
}

fn encode_gif(frames: &[RgbImage], fps: u32) -> Result<Vec<u8>, MediaError> {
    let (w, h) = frames[0].dimensions();
    let (w, h) = (
        u16::try_from(w).map_err(enc)?,
        u16::try_from(h).map_err(enc)?,
    );
    let mut out = Vec::new();
    {
        let mut encoder = gif::Encoder::new(&mut out, w, h, &[]).map_err(enc)?;
        encoder.set_repeat(gif::Repeat::Infinite).map_err(enc)?;
        let delay = (100 / fps.max(1)).max(2) as u16; // hundredths of a second
        for f in frames {
            let mut frame = gif::Frame::from_rgb_speed(w, h, f.as_raw(), 10);
            frame.delay = delay;
            encoder.write_frame(&frame).map_err(enc)?;
        }
    }
    Ok(out)
}

fn encode_apng(frames: &[RgbImage], fps: u32) -> Result<Vec<u8>, MediaError> {
    let (w, h) = frames[0].dimensions();
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_animated(frames.len() as u32, 0).map_err(enc)?;
        encoder.set_frame_delay(1, fps.max(1) as u16).map_err(enc)?;
        let mut writer = encoder.write_header().map_err(enc)?;
        for f in frames {
            writer.write_image_data(f.as_raw()).map_err(enc)?;
        }
        writer.finish().map_err(enc)?;
    }
    Ok(out)
}

/// Decodes media written by [`encode`] back to RGB frames (every frame of a GIF; the first
/// of an APNG), e.g. kept outputs in the generation log.
pub fn decode(bytes: &[u8], media_type: &str) -> Result<Vec<RgbImage>, MediaError> {
    let dec = |e: image::ImageError| MediaError::Encode(format!("decoding {media_type}: {e}"));
    if media_type == "video/mp4" {
        return mp4::decode(bytes);
    }
    if media_type == "image/gif" {
        use image::AnimationDecoder;
        let frames = image::codecs::gif::GifDecoder::new(Cursor::new(bytes))
            .map_err(dec)?
            .into_frames()
            .collect_frames()
            .map_err(dec)?;
        return Ok(frames
            .into_iter()
            .map(|f| image::DynamicImage::ImageRgba8(f.into_buffer()).to_rgb8())
            .collect());
    }
    Ok(vec![image::load_from_memory(bytes).map_err(dec)?.to_rgb8()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(n: usize) -> Vec<RgbImage> {
        (0..n)
            .map(|i| {
                RgbImage::from_fn(32, 32, |x, y| {
                    image::Rgb([x as u8 * 8, y as u8 * 8, i as u8 * 30])
                })
            })
            .collect()
    }

    #[test]
    fn stills_decode_back_to_the_same_size() {
        for f in [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp] {
            let bytes = encode(&frames(1), f, 8).unwrap();
            let img = image::load_from_memory(&bytes).unwrap();
            assert_eq!((img.width(), img.height()), (32, 32), "{f:?}");
        }
    }

    #[test]
    fn png_is_lossless() {
        let src = frames(1);
        let bytes = encode(&src, OutputFormat::Png, 8).unwrap();
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(img, src[0]);
    }

    #[test]
    fn animations_keep_every_frame() {
        use image::AnimationDecoder;
        let bytes = encode(&frames(8), OutputFormat::Gif, 8).unwrap();
        let dec = image::codecs::gif::GifDecoder::new(Cursor::new(&bytes)).unwrap();
        assert_eq!(dec.into_frames().count(), 8);

        let bytes = encode(&frames(8), OutputFormat::Apng, 8).unwrap();
        let dec = png::Decoder::new(Cursor::new(bytes));
        let reader = dec.read_info().unwrap();
        assert_eq!(reader.info().animation_control.unwrap().num_frames, 8);
    }

    #[test]
    fn a_still_format_refuses_a_video() {
        assert!(matches!(
            encode(&frames(8), OutputFormat::Png, 8),
            Err(MediaError::NotAnimated { .. })
        ));
    }
}
