//! Our fused ops against the composed candle ops they replace, forward + backward, measured
//! side by side in one run.

use candle_core::{Device, Result, Tensor, Var, D};
use serde::Serialize;

use super::model::median_secs;

#[derive(Debug, Clone, Serialize)]
pub struct OpRow {
    pub op: String,
    pub shape: Vec<usize>,
    pub composed_ms: f64,
    pub fused_ms: f64,
    /// `composed / fused`.
    pub speedup: f64,
}

/// Softmax over the last dimension of attention scores `[rows, tq, tk]`, forward + backward.
pub fn softmax(rows: usize, tq: usize, tk: usize, reps: usize, device: &Device) -> Result<OpRow> {
    let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (rows, tq, tk), device)?)?;
    let w = Tensor::randn(0f32, 1.0, (rows, tq, tk), device)?;
    let step = |fused: bool| {
        let y = if fused {
            crate::nn::softmax_last_dim(x.as_tensor())?
        } else {
            candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?
        };
        (y * &w)?.sum_all()?.backward()?;
        Ok(())
    };
    // Interleave the two so machine noise hits both alike.
    let (mut c, mut f) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        c.push(median_secs(reps, || step(false))?);
        f.push(median_secs(reps, || step(true))?);
    }
    c.sort_by(|a, b| a.total_cmp(b));
    f.sort_by(|a, b| a.total_cmp(b));
    let (composed, fused) = (c[1], f[1]);
    Ok(OpRow {
        op: "softmax (last dim), fwd + bwd".into(),
        shape: vec![rows, tq, tk],
        composed_ms: composed * 1e3,
        fused_ms: fused * 1e3,
        speedup: composed / fused,
    })
}
