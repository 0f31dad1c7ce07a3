//! Rasteriser: 4x4 supersampled coverage per pixel, alpha-blended over a
//! flat background, so edges are smooth like a (good) generated image.

use image::{Rgb, RgbImage};
use rand::Rng;

use super::geometry::inside;
use super::scene::{frame_time, render_layout, Layout};
use super::{SceneSpec, IMAGE_SIZE, MAX_FRAMES};

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
        let x0 = (cx - r - 1.0).floor().max(0.0) as usize;
        let y0 = (cy - r - 1.0).floor().max(0.0) as usize;
        let x1 = ((cx + r + 1.0).ceil().max(0.0) as usize).min(size);
        let y1 = ((cy + r + 1.0).ceil().max(0.0) as usize).min(size);
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
