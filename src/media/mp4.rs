//! H.264 in MP4: OpenH264 (built from its bundled source) encodes the frames, the `mp4` crate
//! muxes them. The encoder writes Annex B (start-code delimited NAL units); MP4 wants the
//! SPS and PPS in the track's `avcC` box and every sample as length-prefixed NAL units.

use std::io::Cursor;

use image::RgbImage;
use openh264::encoder::{Encoder, EncoderConfig, FrameRate};
use openh264::formats::{RgbSliceU8, YUVBuffer, YUVSource};
use openh264::OpenH264API;

use super::MediaError;

const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
const NAL_IDR: u8 = 5;

fn err(e: impl std::fmt::Display) -> MediaError {
    MediaError::Encode(format!("mp4: {e}"))
}

/// The NAL units of an Annex B stream, without their start codes.
fn nal_units(stream: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= stream.len() {
        if stream[i] == 0 && stream[i + 1] == 0 && stream[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    starts
        .iter()
        .enumerate()
        .map(|(k, &s)| {
            let mut end = starts.get(k + 1).map_or(stream.len(), |&n| n - 3);
            // A four-byte start code leaves one more zero before the next unit.
            while end > s && stream[end - 1] == 0 && k + 1 < starts.len() {
                end -= 1;
            }
            &stream[s..end]
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// Encodes `frames` (even width and height) as an H.264 MP4 at `fps`.
pub fn encode(frames: &[RgbImage], fps: u32) -> Result<Vec<u8>, MediaError> {
    let first = frames.first().ok_or(MediaError::Empty)?;
    let (w, h) = first.dimensions();
    if w % 2 != 0 || h % 2 != 0 {
        return Err(err(format!("H.264 needs even dimensions, got {w}x{h}")));
    }
    let config = EncoderConfig::new()
        .max_frame_rate(FrameRate::from_hz(fps.max(1) as f32))
        // Every frame must reach the file.
        .skip_frames(false);
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config).map_err(err)?;
    let (mut sps, mut pps) = (None, None);
    let mut samples: Vec<(Vec<u8>, bool)> = Vec::with_capacity(frames.len());
    for f in frames {
        let yuv =
            YUVBuffer::from_rgb8_source(RgbSliceU8::new(f.as_raw(), (w as usize, h as usize)));
        let stream = encoder.encode(&yuv).map_err(err)?.to_vec();
        let mut sample = Vec::new();
        let mut sync = false;
        for nal in nal_units(&stream) {
            match nal[0] & 0x1f {
                NAL_SPS => sps = Some(nal.to_vec()),
                NAL_PPS => pps = Some(nal.to_vec()),
                kind => {
                    sync |= kind == NAL_IDR;
                    sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    sample.extend_from_slice(nal);
                }
            }
        }
        samples.push((sample, sync));
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err(err("the encoder wrote no SPS/PPS"));
    };
    mux(&samples, sps, pps, w as u16, h as u16, fps.max(1))
}

fn mux(
    samples: &[(Vec<u8>, bool)],
    sps: Vec<u8>,
    pps: Vec<u8>,
    width: u16,
    height: u16,
    fps: u32,
) -> Result<Vec<u8>, MediaError> {
    let brand = |s: &str| s.parse::<mp4::FourCC>().map_err(err);
    let config = mp4::Mp4Config {
        major_brand: brand("isom")?,
        minor_version: 512,
        compatible_brands: vec![
            brand("isom")?,
            brand("iso2")?,
            brand("avc1")?,
            brand("mp41")?,
        ],
        timescale: 1000,
    };
    let mut writer = mp4::Mp4Writer::write_start(Cursor::new(Vec::new()), &config).map_err(err)?;
    writer
        .add_track(&mp4::TrackConfig {
            track_type: mp4::TrackType::Video,
            timescale: fps * 1000,
            language: "und".into(),
            media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
                width,
                height,
                seq_param_set: sps,
                pic_param_set: pps,
            }),
        })
        .map_err(err)?;
    for (i, (bytes, sync)) in samples.iter().enumerate() {
        let sample = mp4::Mp4Sample {
            start_time: i as u64 * 1000,
            duration: 1000,
            rendering_offset: 0,
            is_sync: *sync,
            bytes: bytes::Bytes::copy_from_slice(bytes),
        };
        writer.write_sample(1, &sample).map_err(err)?;
    }
    writer.write_end().map_err(err)?;
    Ok(writer.into_writer().into_inner())
}

/// Decodes an MP4 written by [`encode`] back to RGB frames (OpenH264's decoder).
pub fn decode(bytes: &[u8]) -> Result<Vec<RgbImage>, MediaError> {
    use openh264::decoder::Decoder;
    let mut reader =
        mp4::Mp4Reader::read_header(Cursor::new(bytes), bytes.len() as u64).map_err(err)?;
    let (&track_id, track) = reader
        .tracks()
        .iter()
        .next()
        .ok_or_else(|| err("no track"))?;
    let avc = &track
        .trak
        .mdia
        .minf
        .stbl
        .stsd
        .avc1
        .as_ref()
        .ok_or_else(|| err("not an H.264 track"))?
        .avcc;
    let mut annex_b = Vec::new();
    for ps in avc
        .sequence_parameter_sets
        .iter()
        .chain(&avc.picture_parameter_sets)
    {
        annex_b.extend_from_slice(&[0, 0, 0, 1]);
        annex_b.extend_from_slice(&ps.bytes);
    }
    let count = reader.sample_count(track_id).map_err(err)?;
    let mut decoder = Decoder::new().map_err(err)?;
    let mut frames = Vec::new();
    let push = |yuv: &openh264::decoder::DecodedYUV<'_>| {
        let (w, h) = yuv.dimensions();
        let mut rgb = vec![0u8; w * h * 3];
        yuv.write_rgb8(&mut rgb);
        RgbImage::from_raw(w as u32, h as u32, rgb)
    };
    for id in 1..=count {
        let Some(sample) = reader.read_sample(track_id, id).map_err(err)? else {
            continue;
        };
        let mut packet = std::mem::take(&mut annex_b);
        let mut rest = &sample.bytes[..];
        while rest.len() >= 4 {
            let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let nal = rest.get(4..4 + n).ok_or_else(|| err("truncated sample"))?;
            packet.extend_from_slice(&[0, 0, 0, 1]);
            packet.extend_from_slice(nal);
            rest = &rest[4 + n..];
        }
        if let Some(yuv) = decoder.decode(&packet).map_err(err)? {
            frames.extend(push(&yuv));
        }
    }
    for yuv in decoder.flush_remaining().map_err(err)? {
        frames.extend(push(&yuv));
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_survives_a_round_trip_close_to_its_colours() {
        let frames: Vec<RgbImage> = (0..8)
            .map(|i| RgbImage::from_pixel(32, 32, image::Rgb([200, 40, (i * 30) as u8])))
            .collect();
        let bytes = encode(&frames, 8).unwrap();
        assert_eq!(&bytes[4..8], b"ftyp");
        let back = decode(&bytes).unwrap();
        assert_eq!(back.len(), 8);
        assert_eq!(back[0].dimensions(), (32, 32));
        for (a, b) in frames.iter().zip(&back) {
            let p = b.get_pixel(16, 16).0;
            let q = a.get_pixel(16, 16).0;
            for c in 0..3 {
                assert!((p[c] as i32 - q[c] as i32).abs() <= 12, "{p:?} vs {q:?}");
            }
        }
    }

    #[test]
    fn odd_sizes_are_refused() {
        let frames = vec![RgbImage::new(31, 32)];
        assert!(encode(&frames, 8).is_err());
    }
}
