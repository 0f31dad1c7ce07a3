//! Normalization composed of differentiable ops (candle's fused layer norm has no backward).

use candle_core::{Result, Tensor, D};

/// Layer norm over the last dimension without affine parameters (DiT blocks modulate instead).
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}
