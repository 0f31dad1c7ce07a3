//! Rasteriser: 4x4 supersampled coverage per pixel, alpha-blended over a
//! flat background, so edges are smooth like a (good) generated image.

use image::{Rgb, RgbImage};
use rand::Rng;

use super::geometry::inside;
use super::scene::{frame_time, render_layout, Layout};
use super::{Color, SceneSpec, Shape, IMAGE_SIZE, MAX_FRAMES};

/// Supersamples per pixel axis.
const SUPERSAMPLE: usize = 4;

/// Renders `spec.frames` frames (capped at [`MAX_FRAMES`]) of
/// [`IMAGE_SIZE`]^2, filling every unspecified attribute from `rng`.
/// Deterministic given the rng state.
pub fn render(spec: &SceneSpec, rng: &mut impl Rng) -> Vec<RgbImage> {
    let layout = render_layout(spec, rng);
    let n = spec.frames.min(MAX_FRAMES);
    (0..n).map(|i| draw(&layout, frame_time(i, n))).collect()
}

/// The pixels `[start, end)` along one axis that an object centred at `c` with half-extent
/// `r` can touch, with a pixel's margin, clipped to the frame.
fn pixel_span(c: f32, r: f32, size: usize) -> (usize, usize) {
    let start = (c - r - 1.0).floor().max(0.0) as usize;
    let end = ((c + r + 1.0).ceil().max(0.0) as usize).min(size);
    (start, end)
}

/// The shape class of a pixel that no object covers in [`render_labelled`]'s maps; shapes
/// are their [`Shape::index`].
pub const BACKGROUND_CLASS: u8 = Shape::COUNT as u8;

/// The colour class of a pixel that no object covers; colours are their [`Color::index`].
pub const BACKGROUND_COLOR_CLASS: u8 = Color::COUNT as u8;

/// One frame's per-pixel labels (row-major): what the topmost object covering the pixel's
/// centre is, or the background classes where none does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PixelLabels {
    /// [`Shape::index`], or [`BACKGROUND_CLASS`].
    pub shape: Vec<u8>,
    /// [`Color::index`], or [`BACKGROUND_COLOR_CLASS`].
    pub color: Vec<u8>,
}

/// [`render`], also returning each frame's [`PixelLabels`]. It draws from `rng` exactly as
/// [`render`] does, so the frames are the same.
pub fn render_labelled(spec: &SceneSpec, rng: &mut impl Rng) -> (Vec<RgbImage>, Vec<PixelLabels>) {
    let layout = render_layout(spec, rng);
    let n = spec.frames.min(MAX_FRAMES);
    (0..n)
        .map(|i| {
            let t = frame_time(i, n);
            (draw(&layout, t), label(&layout, t))
        })
        .unzip()
}

/// Which object covers each pixel's centre at clip time `t` (later objects on top, as drawn).
fn label(layout: &Layout, t: f32) -> PixelLabels {
    let size = IMAGE_SIZE as usize;
    let mut labels = PixelLabels {
        shape: vec![BACKGROUND_CLASS; size * size],
        color: vec![BACKGROUND_COLOR_CLASS; size * size],
    };
    for o in &layout.objects {
        let (cx, cy, r) = o.at(t);
        if r <= 0.0 {
            continue;
        }
        // Only the object's box can hold its pixel centres.
        let (x0, x1) = pixel_span(cx, r, size);
        let (y0, y1) = pixel_span(cy, r, size);
        for py in y0..y1 {
            for px in x0..x1 {
                let u = (px as f32 + 0.5 - cx) / r;
                let v = (py as f32 + 0.5 - cy) / r;
                if inside(o.shape, u, v) {
                    labels.shape[py * size + px] = o.shape.index() as u8;
                    labels.color[py * size + px] = o.color.index() as u8;
                }
            }
        }
    }
    labels
}

/// Draws one frame of a layout at clip time `t`.
pub(crate) fn draw(layout: &Layout, t: f32) -> RgbImage {
    let size = IMAGE_SIZE as usize;
    let bg = layout.background.rgb().map(f32::from);
    let mut buf = vec![bg; size * size];
    for o in &layout.objects {
        let (cx, cy, r) = o.at(t);
        if r <= 0.0 {
            continue;
        }
        let color = o.color.rgb().map(f32::from);
        let (x0, x1) = pixel_span(cx, r, size);
        let (y0, y1) = pixel_span(cy, r, size);
        for py in y0..y1 {
            for px in x0..x1 {
                let mut hits = 0;
                for sy in 0..SUPERSAMPLE {
                    let v = (py as f32 + (sy as f32 + 0.5) / SUPERSAMPLE as f32 - cy) / r;
                    for sx in 0..SUPERSAMPLE {
                        let u = (px as f32 + (sx as f32 + 0.5) / SUPERSAMPLE as f32 - cx) / r;
                        hits += inside(o.shape, u, v) as usize;
                    }
                }
                if hits > 0 {
                    let a = hits as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32;
                    let p = &mut buf[py * size + px];
                    for c in 0..3 {
                        p[c] = p[c] * (1.0 - a) + color[c] * a;
                    }
                }
            }
        }
    }
    RgbImage::from_fn(IMAGE_SIZE, IMAGE_SIZE, |x, y| {
        let p = buf[y as usize * size + x as usize];
        Rgb(p.map(|c| c.round().clamp(0.0, 255.0) as u8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{parse, WorldRng};
    use rand::SeedableRng;

    #[test]
    fn deterministic_and_antialiased() {
        let spec = parse("a large red circle on a black background").expect("prompt");
        let a = render(&spec, &mut WorldRng::seed_from_u64(5));
        let b = render(&spec, &mut WorldRng::seed_from_u64(5));
        assert_eq!(a, b);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].dimensions(), (32, 32));
        // Edge pixels are blends of red and black, not just the two.
        let blended = a[0]
            .pixels()
            .filter(|p| p.0[0] > 10 && p.0[0] < 200)
            .count();
        assert!(blended >= 8, "{blended}");
    }

    #[test]
    fn labelled_frames_match_render_and_mark_each_shape_where_it_is_drawn() {
        for (prompt, seed) in [
            ("a large red cross on a gray background", 7),
            (
                "a small blue triangle on the left and a green circle on the right",
                8,
            ),
            ("two yellow squares moving up", 9),
        ] {
            let spec = parse(prompt).expect("prompt");
            let plain = render(&spec, &mut WorldRng::seed_from_u64(seed));
            let (frames, labels) = render_labelled(&spec, &mut WorldRng::seed_from_u64(seed));
            assert_eq!(frames, plain, "{prompt}");
            assert_eq!(labels.len(), frames.len());
            for (frame, labels) in frames.iter().zip(&labels) {
                let bg = frame.get_pixel(0, 0).0;
                for (i, (&shape, &color)) in labels.shape.iter().zip(&labels.color).enumerate() {
                    let p = frame.get_pixel(i as u32 % 32, i as u32 / 32).0;
                    let far = p.iter().zip(bg).map(|(a, b)| a.abs_diff(b)).max().unwrap();
                    // A labelled pixel's centre is covered, so at least 1/4 of its samples
                    // are: it differs from the background; an unlabelled one is mostly bare.
                    if shape == BACKGROUND_CLASS {
                        assert_eq!(color, BACKGROUND_COLOR_CLASS, "{prompt}: pixel {i}");
                        assert!(far < 200, "{prompt}: pixel {i} unlabelled but drawn");
                    } else {
                        assert!(far > 20, "{prompt}: pixel {i} labelled but bare");
                        // The labelled colour is the one drawn there (the nearest of the
                        // palette to the pixel, once the pixel is mostly covered).
                        if far > 100 {
                            let nearest = Color::all()
                                .iter()
                                .min_by_key(|c| {
                                    c.rgb()
                                        .iter()
                                        .zip(p)
                                        .map(|(&a, b)| u32::from(a.abs_diff(b)).pow(2))
                                        .sum::<u32>()
                                })
                                .unwrap();
                            assert_eq!(nearest.index() as u8, color, "{prompt}: pixel {i}");
                        }
                    }
                }
            }
            let classes = |pick: fn(&PixelLabels) -> &Vec<u8>| -> std::collections::BTreeSet<u8> {
                labels.iter().flat_map(pick).copied().collect()
            };
            let want_shapes = spec
                .objects
                .iter()
                .map(|o| o.shape.index() as u8)
                .chain([BACKGROUND_CLASS])
                .collect();
            assert_eq!(classes(|l| &l.shape), want_shapes, "{prompt}");
            let want_colors = spec
                .objects
                .iter()
                .map(|o| o.color.index() as u8)
                .chain([BACKGROUND_COLOR_CLASS])
                .collect::<std::collections::BTreeSet<u8>>();
            assert_eq!(classes(|l| &l.color), want_colors, "{prompt}");
        }
    }

    #[test]
    fn video_moves() {
        let spec = parse("a small blue square moving right").expect("prompt");
        let frames = render(&spec, &mut WorldRng::seed_from_u64(6));
        assert_eq!(frames.len(), 8);
        let mean_x = |img: &RgbImage| {
            let (mut s, mut n) = (0.0, 0.0);
            for (x, _, p) in img.enumerate_pixels() {
                if p.0[2] > 150 && p.0[0] < 100 {
                    s += x as f32;
                    n += 1.0;
                }
            }
            s / n
        };
        let travel = mean_x(&frames[7]) - mean_x(&frames[0]);
        assert!((travel - 12.0).abs() < 1.5, "{travel}");
    }
}
