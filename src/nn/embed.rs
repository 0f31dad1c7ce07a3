//! Sinusoidal embeddings for timesteps and positions, computed on the host.

use candle_core::{Device, Result, Tensor};

/// Sinusoidal features of `positions` (any real values), `[n, dim]`, half cosines then sines.
pub fn sincos_1d(positions: &[f32], dim: usize, max_period: f32) -> Vec<f32> {
    let half = dim / 2;
    let freqs = frequencies(half, max_period);
    let mut out = vec![0f32; positions.len() * dim];
    for (i, &p) in positions.iter().enumerate() {
        for (j, &freq) in freqs.iter().enumerate() {
            let a = p * freq;
            out[i * dim + j] = a.cos();
            out[i * dim + half + j] = a.sin();
        }
    }
    out
}

/// The `half` frequencies of [`sincos_1d`]: geometric from 1 down towards `1 / max_period`.
fn frequencies(half: usize, max_period: f32) -> Vec<f32> {
    (0..half)
        .map(|j| (-(max_period.ln()) * j as f32 / half as f32).exp())
        .collect()
}

/// Timestep embedding of `t` in `[0, 1]` (scaled to 0..1000 like DDPM-style embeddings).
pub fn timestep_embedding(t: &[f32], dim: usize, device: &Device) -> Result<Tensor> {
    let scaled: Vec<f32> = t.iter().map(|v| v * 1000.0).collect();
    Tensor::from_vec(sincos_1d(&scaled, dim, 10_000.0), (t.len(), dim), device)
}

/// Fixed position embedding for `frames x rows x cols` tokens: the first half of the channels
/// encodes the 2-D position (rows, cols), the second half the frame index.
pub fn video_pos_embedding(
    frames: usize,
    rows: usize,
    cols: usize,
    dim: usize,
    device: &Device,
) -> Result<Tensor> {
    let quarter = dim / 4;
    let half = dim / 2;
    let row_emb = sincos_1d(
        &(0..rows).map(|r| r as f32).collect::<Vec<_>>(),
        quarter,
        100.0,
    );
    let col_emb = sincos_1d(
        &(0..cols).map(|c| c as f32).collect::<Vec<_>>(),
        quarter,
        100.0,
    );
    let frame_emb = sincos_1d(
        &(0..frames).map(|f| f as f32).collect::<Vec<_>>(),
        dim - half,
        100.0,
    );
    let mut out = Vec::with_capacity(frames * rows * cols * dim);
    for f in 0..frames {
        for r in 0..rows {
            for c in 0..cols {
                out.extend_from_slice(&row_emb[r * quarter..(r + 1) * quarter]);
                out.extend_from_slice(&col_emb[c * quarter..(c + 1) * quarter]);
                out.extend_from_slice(&frame_emb[f * (dim - half)..(f + 1) * (dim - half)]);
            }
        }
    }
    Tensor::from_vec(out, (frames * rows * cols, dim), device)
}

/// [`video_pos_embedding`] in coordinates that move: frame `k` of sample `b` is embedded at
/// `(row - vel[b].1 * s[k], col - vel[b].0 * s[k])`, so a pattern fixed in these coordinates
/// moves by `vel * s` across the frames. `vel`: `[B, 2]` (columns, rows per unit of `s`), a
/// tensor, so that gradients reach it; `s`: each frame's clip time. `[B, F*R*C, dim]`; equal to
/// [`video_pos_embedding`] (up to f32 rounding) when `vel` is zero.
pub fn moving_pos_embedding(
    s: &[f32],
    rows: usize,
    cols: usize,
    dim: usize,
    vel: &Tensor,
) -> Result<Tensor> {
    let device = vel.device();
    let (b, _) = vel.dims2()?;
    let frames = s.len();
    let (quarter, half) = (dim / 4, dim / 2);
    let freqs = Tensor::from_vec(frequencies(quarter / 2, 100.0), (1, 1, quarter / 2), device)?;
    let s = Tensor::from_vec(s.to_vec(), (1, frames), device)?;
    // One axis: `[B, F*R*C, quarter]` of cos then sin at `grid - v * s`.
    let axis = |grid: Vec<f32>, v: Tensor| -> Result<Tensor> {
        let grid = Tensor::from_vec(grid, (1, frames, rows * cols), device)?;
        let shift = v.reshape((b, 1))?.broadcast_mul(&s)?.unsqueeze(2)?;
        let pos = grid
            .broadcast_sub(&shift)?
            .reshape((b, frames * rows * cols, 1))?;
        let angle = pos.broadcast_mul(&freqs)?;
        Tensor::cat(&[angle.cos()?, angle.sin()?], 2)
    };
    let per_frame = |f: &dyn Fn(usize, usize) -> f32| -> Vec<f32> {
        (0..frames)
            .flat_map(|_| (0..rows * cols).map(|i| f(i / cols, i % cols)))
            .collect()
    };
    let row = axis(per_frame(&|r, _| r as f32), vel.narrow(1, 1, 1)?)?;
    let col = axis(per_frame(&|_, c| c as f32), vel.narrow(1, 0, 1)?)?;
    let frame = sincos_1d(
        &(0..frames).map(|f| f as f32).collect::<Vec<_>>(),
        dim - half,
        100.0,
    );
    let frame: Vec<f32> = (0..frames)
        .flat_map(|f| {
            let e = &frame[f * (dim - half)..(f + 1) * (dim - half)];
            std::iter::repeat_n(e, rows * cols).flatten().copied()
        })
        .collect();
    let frame = Tensor::from_vec(frame, (1, frames * rows * cols, dim - half), device)?
        .broadcast_as((b, frames * rows * cols, dim - half))?;
    Tensor::cat(&[row, col, frame], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At zero velocity the moving embedding is the fixed one; at velocity `(1, -2)` (columns,
    /// rows per unit clip time) frame `s = 1` embeds at `(row - 2, col + 1)` what frame `s = 0`
    /// embeds at `(row, col)` (a pattern moves by the velocity), and the frame channels stay the
    /// frame's.
    #[test]
    fn moving_positions_shift_with_the_velocity() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, cols, dim) = (6, 5, 32);
        let fixed = video_pos_embedding(3, rows, cols, dim, &dev)?;
        let still = Tensor::zeros((2, 2), candle_core::DType::F32, &dev)?;
        let at_rest = moving_pos_embedding(&[0.0, 1.0, 2.0], rows, cols, dim, &still)?;
        let gap = (at_rest.get(1)? - &fixed)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(gap < 1e-5, "{gap}");

        let vel = Tensor::new(&[[1f32, -2.0]], &dev)?;
        let e = moving_pos_embedding(&[0.0, 1.0], rows, cols, dim, &vel)?
            .get(0)?
            .to_vec2::<f32>()?;
        let token = |f: usize, r: usize, c: usize| &e[(f * rows + r) * cols + c];
        let half = dim / 2;
        for (r, c) in [(2, 1), (3, 3), (5, 0)] {
            let (a, b) = (token(0, r, c), token(1, r - 2, c + 1));
            for j in 0..half {
                assert!((a[j] - b[j]).abs() < 1e-5, "({r}, {c}) channel {j}");
            }
            // The frame channels: frame 1's, not frame 0's.
            assert_eq!(&b[half..], &token(1, 0, 0)[half..]);
            assert_ne!(&a[half..], &b[half..]);
        }
        Ok(())
    }
}
