//! Distribution metrics on hand-made features (no learned network): a
//! Frechet distance between feature sets, and per-prompt diversity.
//!
//! Feature vector ([`FEATURE_DIM`] = 91 values, same length for images and
//! videos; image statistics are averaged over frames):
//! - `0..27`   colour histogram: share of pixels in each of 3x3x3 RGB bins;
//! - `27..75`  mean colour (RGB in 0..=1) of each cell of a 4x4 grid, x0.25;
//! - `75..83`  histogram of luminance gradient magnitudes (8 bins), x8;
//! - `83`      edge density (share of gradients above 0.1), x8;
//! - `84`      mean gradient magnitude, x16;
//! - `85`      high-frequency energy: mean |L - 3x3 box blur of L|, x32;
//! - `86..91`  temporal (0 for a single frame): mean and max absolute
//!   difference of consecutive frames and absolute difference of first and
//!   last frame (x4), and the shift (x, y, in frame widths) of the
//!   saturation-weighted centroid from first to last frame.
//!
//! The weights (`BLOCK_WEIGHTS`) give the blocks comparable spread, so
//! the Frechet distance reacts to blur and noise, not only to colour.

use image::RgbImage;

/// Length of [`features`].
pub const FEATURE_DIM: usize = 91;
/// Fixed weight of each spatial block, chosen so every block has a
/// comparable spread on ShapesWorld renders; otherwise the 4x4 colour grid
/// (background colour) would swamp the edge statistics that reveal blur.
const BLOCK_WEIGHTS: [(std::ops::Range<usize>, f32); 6] = [
    (0..27, 1.0),
    (27..75, 0.25),
    (75..83, 8.0),
    (83..84, 8.0),
    (84..85, 16.0),
    (85..86, 32.0),
];
/// Ridge added to both covariances so near-singular ones stay stable.
const RIDGE: f64 = 1e-6;
/// Upper edges of the gradient-magnitude histogram bins.
const GRAD_BINS: [f32; 7] = [0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.65];

fn luminance(img: &RgbImage) -> (usize, usize, Vec<f32>) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let l = img
        .pixels()
        .map(|p| (0.299 * p.0[0] as f32 + 0.587 * p.0[1] as f32 + 0.114 * p.0[2] as f32) / 255.0)
        .collect();
    (w, h, l)
}

/// Spatial statistics of one frame (the first 86 features).
fn frame_features(img: &RgbImage) -> Vec<f32> {
    let mut f = vec![0f32; 86];
    let (w, h, l) = luminance(img);
    let n = (w * h).max(1) as f32;
    for (x, y, p) in img.enumerate_pixels() {
        let q = |c: u8| (c as usize * 3 / 256).min(2);
        f[q(p.0[0]) * 9 + q(p.0[1]) * 3 + q(p.0[2])] += 1.0 / n;
        let cell = (y as usize * 4 / h.max(1)).min(3) * 4 + (x as usize * 4 / w.max(1)).min(3);
        for c in 0..3 {
            f[27 + cell * 3 + c] += p.0[c] as f32 / 255.0 * 16.0 / n;
        }
    }
    let at = |x: usize, y: usize| l[y * w + x];
    for y in 0..h {
        for x in 0..w {
            let gx = at((x + 1).min(w - 1), y) - at(x.saturating_sub(1), y);
            let gy = at(x, (y + 1).min(h - 1)) - at(x, y.saturating_sub(1));
            let g = 0.5 * (gx * gx + gy * gy).sqrt();
            let bin = GRAD_BINS.iter().position(|&e| g < e).unwrap_or(7);
            f[75 + bin] += 1.0 / n;
            f[83] += (g > 0.1) as u8 as f32 / n;
            f[84] += g / n;
            let (mut s, mut k) = (0.0, 0.0);
            for yy in y.saturating_sub(1)..(y + 2).min(h) {
                for xx in x.saturating_sub(1)..(x + 2).min(w) {
                    s += at(xx, yy);
                    k += 1.0;
                }
            }
            f[85] += (at(x, y) - s / k).abs() / n;
        }
    }
    f
}

fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f32 {
    let (w, h) = (a.width().min(b.width()), a.height().min(b.height()));
    let mut s = 0u64;
    for y in 0..h {
        for x in 0..w {
            let (p, q) = (a.get_pixel(x, y).0, b.get_pixel(x, y).0);
            s += (0..3).map(|c| p[c].abs_diff(q[c]) as u64).sum::<u64>();
        }
    }
    s as f32 / (255.0 * 3.0 * (w * h).max(1) as f32)
}

/// Saturation-weighted centroid (in frame widths): where the objects are.
fn salient_centroid(img: &RgbImage) -> (f32, f32) {
    let (mut sx, mut sy, mut sw) = (0f32, 0f32, 1e-6f32);
    for (x, y, p) in img.enumerate_pixels() {
        let s = (p.0.iter().max().unwrap_or(&0) - p.0.iter().min().unwrap_or(&0)) as f32 / 255.0;
        sx += s * x as f32;
        sy += s * y as f32;
        sw += s;
    }
    let w = img.width().max(1) as f32;
    (sx / sw / w, sy / sw / img.height().max(1) as f32)
}

/// The fixed feature vector of a frame sequence (see the module docs).
pub fn features(frames: &[RgbImage]) -> Vec<f32> {
    let mut f = vec![0f32; FEATURE_DIM];
    if frames.is_empty() {
        return f;
    }
    for img in frames {
        for (acc, v) in f.iter_mut().zip(frame_features(img)) {
            *acc += v / frames.len() as f32;
        }
    }
    for (range, w) in BLOCK_WEIGHTS {
        for v in &mut f[range] {
            *v *= w;
        }
    }
    if frames.len() >= 2 {
        let diffs: Vec<f32> = frames
            .windows(2)
            .map(|p| mean_abs_diff(&p[0], &p[1]))
            .collect();
        f[86] = 4.0 * diffs.iter().sum::<f32>() / diffs.len() as f32;
        f[87] = 4.0 * diffs.iter().copied().fold(0.0, f32::max);
        let (first, last) = (&frames[0], &frames[frames.len() - 1]);
        f[88] = 4.0 * mean_abs_diff(first, last);
        let (a, b) = (salient_centroid(first), salient_centroid(last));
        f[89] = b.0 - a.0;
        f[90] = b.1 - a.1;
    }
    f
}

fn mean_cov(x: &[Vec<f32>], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = x.len() as f64;
    let mut mean = vec![0f64; d];
    for row in x {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64 / n;
        }
    }
    let mut cov = vec![0f64; d * d];
    let denom = (x.len().max(2) - 1) as f64;
    for row in x {
        let c: Vec<f64> = row.iter().zip(&mean).map(|(&v, m)| v as f64 - m).collect();
        for i in 0..d {
            for j in i..d {
                cov[i * d + j] += c[i] * c[j] / denom;
            }
        }
    }
    for i in 0..d {
        for j in 0..i {
            cov[i * d + j] = cov[j * d + i];
        }
        cov[i * d + i] += RIDGE;
    }
    (mean, cov)
}

/// Eigen-decomposition of a symmetric `n`x`n` matrix by cyclic Jacobi
/// rotations: returns eigenvalues and eigenvectors (columns of V).
fn sym_eigen(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..60 {
        let mut off = 0.0;
        for p in 0..n {
            for q in p + 1..n {
                off += a[p * n + q] * a[p * n + q];
            }
        }
        if off <= 1e-24 * norm {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

/// Symmetric positive semi-definite square root.
fn sqrtm_psd(a: &[f64], n: usize) -> Vec<f64> {
    let (w, v) = sym_eigen(a.to_vec(), n);
    let s: Vec<f64> = w.iter().map(|&x| x.max(0.0).sqrt()).collect();
    let mut out = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = (0..n).map(|k| v[i * n + k] * s[k] * v[j * n + k]).sum();
        }
    }
    out
}

fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0f64; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            for j in 0..n {
                out[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    out
}

/// Frechet distance between Gaussians fitted to two feature sets:
/// |mu1-mu2|^2 + Tr S1 + Tr S2 - 2 Tr sqrt(sqrt(S1) S2 sqrt(S1)).
/// Returns NaN when a set is empty or the vectors differ in length.
pub fn frechet_distance(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let Some(d) = a.first().map(Vec::len) else {
        return f64::NAN;
    };
    if d == 0 || b.is_empty() || a.iter().chain(b).any(|v| v.len() != d) {
        return f64::NAN;
    }
    let (m1, s1) = mean_cov(a, d);
    let (m2, s2) = mean_cov(b, d);
    let mean_term: f64 = m1.iter().zip(&m2).map(|(x, y)| (x - y).powi(2)).sum();
    let trace = |s: &[f64]| (0..d).map(|i| s[i * d + i]).sum::<f64>();
    let r1 = sqrtm_psd(&s1, d);
    let mut m = matmul(&matmul(&r1, &s2, d), &r1, d);
    for i in 0..d {
        for j in 0..i {
            let avg = 0.5 * (m[i * d + j] + m[j * d + i]);
            m[i * d + j] = avg;
            m[j * d + i] = avg;
        }
    }
    let (w, _) = sym_eigen(m, d);
    let tr_sqrt: f64 = w.iter().map(|&x| x.max(0.0).sqrt()).sum();
    (mean_term + trace(&s1) + trace(&s2) - 2.0 * tr_sqrt).max(0.0)
}

/// The feature blocks that [`frechet_by_block`] measures one at a time (see the module docs):
/// colours, where they are, how sharp the frames are, and how they change over time.
pub const FEATURE_BLOCKS: [(&str, std::ops::Range<usize>); 4] = [
    ("colour", 0..27),
    ("layout", 27..75),
    ("sharpness", 75..86),
    ("motion", 86..91),
];

/// The Frechet distance of each block of [`FEATURE_BLOCKS`] alone: where a change in the
/// total comes from. The parts do not add up to the total (it also counts the covariance
/// between blocks); a block that is constant in both sets (motion, for images) gives about 0.
pub fn frechet_by_block(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<(&'static str, f64)> {
    let cut = |set: &[Vec<f32>], r: &std::ops::Range<usize>| -> Vec<Vec<f32>> {
        set.iter()
            .map(|v| v.get(r.clone()).unwrap_or_default().to_vec())
            .collect()
    };
    FEATURE_BLOCKS
        .iter()
        .map(|(name, r)| (*name, frechet_distance(&cut(a, r), &cut(b, r))))
        .collect()
}

/// Mean pairwise distance among samples of one prompt: the mean absolute
/// pixel difference in [0, 1], averaged over frames and over all pairs.
/// 0 for fewer than two samples.
pub fn diversity(samples: &[Vec<RgbImage>]) -> f64 {
    let mut total = 0f64;
    let mut pairs = 0usize;
    for (i, a) in samples.iter().enumerate() {
        for b in &samples[i + 1..] {
            let n = a.len().min(b.len());
            if n == 0 {
                continue;
            }
            let d: f32 = a.iter().zip(b).map(|(x, y)| mean_abs_diff(x, y)).sum();
            total += (d / n as f32) as f64;
            pairs += 1;
        }
    }
    if pairs == 0 {
        0.0
    } else {
        total / pairs as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{parse, render, sample_spec, Split, WorldRng};
    use image::Rgb;
    use rand::{Rng, SeedableRng};

    #[test]
    fn jacobi_square_root() {
        let n = 3;
        let a = vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0];
        let r = sqrtm_psd(&a, n);
        let back = matmul(&r, &r, n);
        for (x, y) in a.iter().zip(&back) {
            assert!((x - y).abs() < 1e-9, "{x} {y}");
        }
        let (w, _) = sym_eigen(vec![2.0, 0.0, 0.0, 5.0], 2);
        assert!((w.iter().sum::<f64>() - 7.0).abs() < 1e-12);
    }

    #[test]
    fn frechet_of_gaussians() {
        // Shifted means only: distance is the squared shift.
        let mut rng = WorldRng::seed_from_u64(2);
        let mut set = |shift: f32| -> Vec<Vec<f32>> {
            (0..2000)
                .map(|_| (0..3).map(|_| rng.random::<f32>() + shift).collect())
                .collect()
        };
        let (a, b) = (set(0.0), set(0.5));
        let fd = frechet_distance(&a, &b);
        assert!((fd - 0.75).abs() < 0.05, "{fd}");
        assert!(frechet_distance(&a, &[]).is_nan());
    }

    fn blur(frames: &[RgbImage], sigma: f32) -> Vec<RgbImage> {
        frames
            .iter()
            .map(|f| image::imageops::blur(f, sigma))
            .collect()
    }

    fn noise(frames: &[RgbImage], std: f32, rng: &mut WorldRng) -> Vec<RgbImage> {
        frames
            .iter()
            .map(|f| {
                let mut out = f.clone();
                for p in out.pixels_mut() {
                    for c in 0..3 {
                        // Box-Muller normal sample.
                        let (u1, u2): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
                        let z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                        p.0[c] = (p.0[c] as f32 + z * std * 255.0).round().clamp(0.0, 255.0) as u8;
                    }
                }
                out
            })
            .collect()
    }

    #[test]
    fn frechet_grows_with_blur_and_noise() {
        let mut rng = WorldRng::seed_from_u64(21);
        let real = |rng: &mut WorldRng| -> Vec<Vec<RgbImage>> {
            (0..400)
                .map(|_| {
                    let spec = sample_spec(rng, Split::Train, false);
                    render(&spec, rng)
                })
                .collect()
        };
        let a = real(&mut rng);
        let b = real(&mut rng);
        let fa: Vec<Vec<f32>> = a.iter().map(|f| features(f)).collect();
        let fd = |set: &[Vec<RgbImage>]| {
            let fb: Vec<Vec<f32>> = set.iter().map(|f| features(f)).collect();
            frechet_distance(&fa, &fb)
        };
        let base = fd(&b);
        let blurred: Vec<f64> = [0.6, 1.2, 2.0]
            .iter()
            .map(|&s| fd(&b.iter().map(|f| blur(f, s)).collect::<Vec<_>>()))
            .collect();
        let noisy: Vec<f64> = [0.03, 0.08, 0.2]
            .iter()
            .map(|&s| fd(&b.iter().map(|f| noise(f, s, &mut rng)).collect::<Vec<_>>()))
            .collect();
        println!("FD real/real {base:.4}, blur {blurred:.4?}, noise {noisy:.4?}");
        // Measured: 0.019 real/real; blur 0.27 / 1.24 / 2.98; noise 4.6 / 39 / 69.
        assert!(base < 0.05, "{base}");
        assert!(base < blurred[0] && blurred[0] < blurred[1] && blurred[1] < blurred[2]);
        assert!(base < noisy[0] && noisy[0] < noisy[1] && noisy[1] < noisy[2]);
        assert!(blurred[0] > 5.0 * base && noisy[0] > 5.0 * base);
        // Blur lives in the sharpness block: it moves that block most, and colour least.
        let blocks = |set: &[Vec<RgbImage>]| {
            let fb: Vec<Vec<f32>> = set.iter().map(|f| features(f)).collect();
            frechet_by_block(&fa, &fb)
        };
        let blurred = blocks(&b.iter().map(|f| blur(f, 1.2)).collect::<Vec<_>>());
        let names: Vec<&str> = blurred.iter().map(|b| b.0).collect();
        assert_eq!(names, ["colour", "layout", "sharpness", "motion"]);
        let worst = blurred.iter().max_by(|x, y| x.1.total_cmp(&y.1)).unwrap();
        assert_eq!(worst.0, "sharpness", "{blurred:?}");
        assert!(blurred[3].1 < 1e-3, "images have no motion: {blurred:?}");
        for (block, real) in blocks(&b) {
            assert!(real < 0.05, "{block}: {real}");
        }
    }

    #[test]
    fn diversity_reflects_unspecified_attributes() {
        let loose = parse("a red circle").expect("prompt");
        let mut rng = WorldRng::seed_from_u64(8);
        let samples: Vec<Vec<RgbImage>> = (0..8).map(|_| render(&loose, &mut rng)).collect();
        let d = diversity(&samples);
        assert!(d > 0.05, "{d}");
        let full = parse("a large red circle in the center on a black background").expect("prompt");
        let same: Vec<Vec<RgbImage>> = (0..4)
            .map(|_| render(&full, &mut WorldRng::seed_from_u64(9)))
            .collect();
        assert_eq!(diversity(&same), 0.0);
        let one = vec![vec![RgbImage::from_pixel(32, 32, Rgb([0, 0, 0]))]];
        assert_eq!(diversity(&one), 0.0);
    }

    #[test]
    fn video_features_see_motion() {
        let mut rng = WorldRng::seed_from_u64(10);
        let right = features(&render(
            &parse("a large red square moving right").expect("p"),
            &mut rng,
        ));
        let still = features(&render(
            &parse("a large red square staying still").expect("p"),
            &mut rng,
        ));
        assert_eq!(right.len(), FEATURE_DIM);
        assert!(
            right[89] > 0.2 && still[89].abs() < 0.05,
            "{} {}",
            right[89],
            still[89]
        );
        assert!(right[86] > still[86]);
        let image = features(&render(&parse("a red square").expect("p"), &mut rng));
        assert_eq!(image.len(), FEATURE_DIM);
        assert!(image[86..].iter().all(|&v| v == 0.0));
    }
}
