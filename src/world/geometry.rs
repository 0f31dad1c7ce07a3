//! Shape geometry in normalised coordinates: every shape fills the box
//! [-1,1]^2 (u to the right, v down), so renderer and verifier share one
//! definition of each shape.

use std::sync::OnceLock;

use super::Shape;

/// Half-width of the cross arms relative to the half-extent. Thick enough
/// to survive blur at small size, thin enough to keep the corners empty.
const CROSS_ARM: f32 = 0.36;

/// Whether the normalised point (u, v) lies inside the shape.
pub(crate) fn inside(shape: Shape, u: f32, v: f32) -> bool {
    sdf(shape, u, v) <= 0.0
}

/// Approximate signed distance in normalised units (negative inside).
pub(crate) fn sdf(shape: Shape, u: f32, v: f32) -> f32 {
    let (au, av) = (u.abs(), v.abs());
    match shape {
        Shape::Circle => (u * u + v * v).sqrt() - 1.0,
        Shape::Square => au.max(av) - 1.0,
        // Apex (0,-1), base from (-1,1) to (1,1): |u| <= (v+1)/2.
        Shape::Triangle => (v - 1.0).max((2.0 * au - v - 1.0) / 5f32.sqrt()),
        Shape::Cross => {
            let bar = (au - 1.0).max(av - CROSS_ARM);
            let post = (au - CROSS_ARM).max(av - 1.0);
            bar.min(post)
        }
    }
}

/// Area and second moments of a shape in normalised units, used to fit a
/// template to a detected blob by moment matching.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Moments {
    /// Area / R^2 for a shape of half-extent R.
    pub area: f32,
    /// Mean of v (the triangle's centroid sits below its box centre).
    pub mean_v: f32,
    /// Variance of u.
    pub var_u: f32,
    /// Variance of v.
    pub var_v: f32,
}

/// Moments of every shape, computed once on a fine grid.
pub(crate) fn moments(shape: Shape) -> Moments {
    static TABLE: OnceLock<Vec<Moments>> = OnceLock::new();
    let table = TABLE.get_or_init(|| Shape::all().iter().map(|&s| compute(s)).collect());
    table[shape.index()]
}

fn compute(shape: Shape) -> Moments {
    const N: usize = 400;
    let step = 2.0 / N as f64;
    let (mut n, mut su, mut sv, mut suu, mut svv) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for i in 0..N {
        for j in 0..N {
            let u = -1.0 + (i as f64 + 0.5) * step;
            let v = -1.0 + (j as f64 + 0.5) * step;
            if inside(shape, u as f32, v as f32) {
                n += 1.0;
                su += u;
                sv += v;
                suu += u * u;
                svv += v * v;
            }
        }
    }
    let (mu, mv) = (su / n, sv / n);
    Moments {
        area: (n * step * step) as f32,
        mean_v: mv as f32,
        var_u: (suu / n - mu * mu) as f32,
        var_v: (svv / n - mv * mv) as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_match_closed_forms() {
        let c = moments(Shape::Circle);
        assert!((c.area - std::f32::consts::PI).abs() < 0.01);
        assert!((c.var_u - 0.25).abs() < 0.005);
        let s = moments(Shape::Square);
        assert!((s.area - 4.0).abs() < 0.01 && (s.var_v - 1.0 / 3.0).abs() < 0.005);
        let t = moments(Shape::Triangle);
        assert!((t.area - 2.0).abs() < 0.01);
        assert!((t.mean_v - 1.0 / 3.0).abs() < 0.005);
        assert!((t.var_u - 1.0 / 6.0).abs() < 0.005 && (t.var_v - 2.0 / 9.0).abs() < 0.005);
    }
}
