//! Sinusoidal embeddings for timesteps and positions, computed on the host.

use candle_core::{Device, Result, Tensor};

/// Sinusoidal features of `positions` (any real values), `[n, dim]`, half cosines then sines.
pub fn sincos_1d(positions: &[f32], dim: usize, max_period: f32) -> Vec<f32> {
    let half = dim / 2;
    let mut out = vec![0f32; positions.len() * dim];
    for (i, &p) in positions.iter().enumerate() {
        for j in 0..half {
            let freq = (-(max_period.ln()) * j as f32 / half as f32).exp();
            let a = p * freq;
            out[i * dim + j] = a.cos();
            out[i * dim + half + j] = a.sin();
        }
    }
    out
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
