//! Per-pixel loss weights that stress the pixels where a shape is decided: those near an edge
//! of the clean frame.
//!
//! On a 32x32 frame a cross differs from a square only in its four corner notches (about 2.5
//! pixels a side for a small one). A loss averaged over every pixel gives them a few percent
//! of its weight, the uniform background most of it. Raising the weight of a band around every
//! colour edge of the target puts the outline, and with it the shape, back in the objective.

use candle_core::{Result, Tensor};

/// A colour step this large (in the [-1, 1] pixel scale, any channel) between 4-neighbours is
/// an edge. Renders are blurred by at most about 1.6 pixels, so a step between an object and
/// its background still shows as several steps above this along the outline.
const STEP: f32 = 0.1;

/// Weights for `x0` (`[B, F, C, H, W]`), shaped `[B, F, 1, H, W]`: `1 + strength` on pixels
/// within `radius` (Chebyshev distance) of an edge, 1 elsewhere, then scaled to mean 1 so that
/// the loss keeps its scale (and the learning rate its meaning).
pub fn edge_weights(x0: &Tensor, strength: f32, radius: usize) -> Result<Tensor> {
    let (b, f, c, h, w) = x0.dims5()?;
    let data: Vec<f32> = x0.flatten_all()?.to_vec1()?;
    let mut weights = Vec::with_capacity(b * f * h * w);
    for frame in data.chunks_exact(c * h * w) {
        let edge = dilate(&edges(frame, c, h, w), h, w, radius);
        weights.extend(edge.iter().map(|&e| if e { 1.0 + strength } else { 1.0 }));
    }
    let mean = weights.iter().sum::<f32>() / weights.len().max(1) as f32;
    for x in &mut weights {
        *x /= mean;
    }
    Tensor::from_vec(weights, (b, f, 1, h, w), x0.device())
}

/// Pixels with a colour step to their right or lower neighbour (both pixels of the pair).
fn edges(frame: &[f32], c: usize, h: usize, w: usize) -> Vec<bool> {
    let step = |a: usize, b: usize| {
        (0..c).any(|k| (frame[k * h * w + a] - frame[k * h * w + b]).abs() > STEP)
    };
    let mut edge = vec![false; h * w];
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            for j in [(x + 1 < w).then_some(i + 1), (y + 1 < h).then_some(i + w)]
                .into_iter()
                .flatten()
            {
                if step(i, j) {
                    edge[i] = true;
                    edge[j] = true;
                }
            }
        }
    }
    edge
}

/// `mask` grown by `radius` pixels in every direction (a square structuring element).
fn dilate(mask: &[bool], h: usize, w: usize, radius: usize) -> Vec<bool> {
    let mut out = vec![false; h * w];
    for y in 0..h {
        for x in 0..w {
            if !mask[y * w + x] {
                continue;
            }
            for yy in y.saturating_sub(radius)..(y + radius + 1).min(h) {
                for xx in x.saturating_sub(radius)..(x + radius + 1).min(w) {
                    out[yy * w + xx] = true;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One 1-channel 8x8 frame: a 2x2 bright block at rows 3-4, columns 3-4 on a dark field.
    fn block() -> Tensor {
        let mut v = vec![-1f32; 64];
        for (y, x) in [(3, 3), (3, 4), (4, 3), (4, 4)] {
            v[y * 8 + x] = 1.0;
        }
        Tensor::from_vec(v, (1, 1, 1, 8, 8), &Device::Cpu).unwrap()
    }

    fn mask(w: &Tensor) -> Vec<bool> {
        let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let lo = v.iter().cloned().fold(f32::INFINITY, f32::min);
        v.iter().map(|&x| x > lo * 1.01).collect()
    }

    #[test]
    fn the_band_covers_both_sides_of_an_outline_and_nothing_else() {
        let w = edge_weights(&block(), 4.0, 0).unwrap();
        let m = mask(&w);
        // Radius 0: the block itself and its 4-neighbours outside it (8 pixels), not the
        // diagonal corners and not the far field.
        let expected: Vec<(usize, usize)> = vec![
            (2, 3),
            (2, 4),
            (3, 2),
            (3, 3),
            (3, 4),
            (3, 5),
            (4, 2),
            (4, 3),
            (4, 4),
            (4, 5),
            (5, 3),
            (5, 4),
        ];
        for y in 0..8 {
            for x in 0..8 {
                assert_eq!(m[y * 8 + x], expected.contains(&(y, x)), "pixel ({y}, {x})");
            }
        }
        let grown = mask(&edge_weights(&block(), 4.0, 1).unwrap());
        assert!(grown[2 * 8 + 2] && grown[8 + 3] && !grown[0]);
    }

    #[test]
    fn weights_have_mean_one_and_the_stated_ratio() {
        let w = edge_weights(&block(), 4.0, 1).unwrap();
        let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean - 1.0).abs() < 1e-5);
        let (lo, hi) = v
            .iter()
            .fold((f32::INFINITY, 0f32), |(l, h), &x| (l.min(x), h.max(x)));
        assert!((hi / lo - 5.0).abs() < 1e-4, "edge / field = {}", hi / lo);
    }

    #[test]
    fn a_flat_frame_is_weighted_uniformly() {
        let flat = Tensor::zeros((2, 1, 3, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let v: Vec<f32> = edge_weights(&flat, 4.0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(v.iter().all(|&x| (x - 1.0).abs() < 1e-6));
    }
}
