//! Wan's 3D rotary position embedding, as diffusers' `WanRotaryPosEmbed` computes it.
//!
//! A head's `head_dim / 2` channel pairs are split over the three axes: `head_dim / 6` pairs
//! each for height and width, the rest for time. Each axis part is a 1D RoPE of its own width
//! (`get_1d_rotary_pos_embed(2 * pairs, ...)`), so pair `j` of an axis part turns by
//! `pos * theta^(-2j / (2 * pairs))`. A pair `(x[2i], x[2i+1])` is one complex number,
//! multiplied by `cos + i sin` (interleaved, not rotate-half).
//!
//! The angles are computed in f64 on the host, like diffusers; applying them uses candle ops
//! with a backward (candle's rotary custom ops have none).

use candle_core::{DType, Device, Result, Tensor};

/// diffusers' default base.
pub const THETA: f64 = 10_000.0;

/// Pairs given to `(t, h, w)` for a head of `head_dim` channels.
pub fn axis_pairs(head_dim: usize) -> [usize; 3] {
    let hw = head_dim / 6;
    [head_dim / 2 - 2 * hw, hw, hw]
}

/// `cos` and `sin` tables `[F * H * W, head_dim / 2]` for a grid of `(F, H, W)` patches,
/// frame-major like the token sequence, in `dtype`.
pub fn rope_tables(
    head_dim: usize,
    grid: (usize, usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let pairs = axis_pairs(head_dim);
    let freqs: Vec<Vec<f64>> = pairs
        .iter()
        .map(|&n| {
            let width = (2 * n) as f64;
            (0..n)
                .map(|j| 1.0 / THETA.powf((2 * j) as f64 / width))
                .collect()
        })
        .collect();
    let (f, h, w) = grid;
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(f * h * w * half);
    let mut sin = Vec::with_capacity(f * h * w * half);
    for t in 0..f {
        for y in 0..h {
            for x in 0..w {
                for (axis, pos) in [t, y, x].into_iter().enumerate() {
                    for fr in &freqs[axis] {
                        let angle = pos as f64 * fr;
                        cos.push(angle.cos());
                        sin.push(angle.sin());
                    }
                }
            }
        }
    }
    let shape = (f * h * w, half);
    let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Rotates `x` `[N, L, D]` (heads folded into `N`) by the tables `[L, D / 2]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (n, l, d) = x.dims3()?;
    let pairs = x.reshape((n, l, d / 2, 2))?;
    let (re, im) = (pairs.narrow(3, 0, 1)?, pairs.narrow(3, 1, 1)?);
    let cos = cos.reshape((1, l, d / 2, 1))?;
    let sin = sin.reshape((1, l, d / 2, 1))?;
    let out_re = (re.broadcast_mul(&cos)? - im.broadcast_mul(&sin)?)?;
    let out_im = (re.broadcast_mul(&sin)? + im.broadcast_mul(&cos)?)?;
    Tensor::cat(&[out_re, out_im], 3)?.reshape((n, l, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_cover_the_head_like_diffusers() {
        // Wan2.1-1.3B: head_dim 128 -> t 44, h 42, w 42 channels.
        assert_eq!(axis_pairs(128), [22, 21, 21]);
        assert_eq!(axis_pairs(16), [4, 2, 2]);
        assert_eq!(axis_pairs(6), [1, 1, 1]);
    }

    #[test]
    fn rotation_is_the_complex_product_of_each_pair() -> Result<()> {
        let dev = Device::Cpu;
        let (cos, sin) = rope_tables(12, (2, 3, 2), DType::F64, &dev)?;
        assert_eq!(cos.dims(), &[12, 6]);
        // Token (t=1, y=2, x=1) is index 1*6 + 2*2 + 1 = 11; t has 2 pairs, h and w 2 each.
        let angles: [f64; 6] = [1.0, 1.0 / 100.0, 2.0, 2.0 / 100.0, 1.0, 1.0 / 100.0];
        let c = cos.get(11)?.to_vec1::<f64>()?;
        let s = sin.get(11)?.to_vec1::<f64>()?;
        for (j, a) in angles.iter().enumerate() {
            assert!((c[j] - a.cos()).abs() < 1e-12 && (s[j] - a.sin()).abs() < 1e-12);
        }
        let x = Tensor::arange(0f64, 12.0 * 12.0, &dev)?.reshape((1, 12, 12))?;
        let y = apply_rope(&x, &cos, &sin)?
            .get(0)?
            .get(11)?
            .to_vec1::<f64>()?;
        let xv = x.get(0)?.get(11)?.to_vec1::<f64>()?;
        for j in 0..6 {
            let (re, im) = (xv[2 * j], xv[2 * j + 1]);
            assert!((y[2 * j] - (re * c[j] - im * s[j])).abs() < 1e-9);
            assert!((y[2 * j + 1] - (re * s[j] + im * c[j])).abs() < 1e-9);
        }
        Ok(())
    }
}
