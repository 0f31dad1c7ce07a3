//! Normalization composed of differentiable ops (candle's fused layer norm has no backward).

use candle_core::{Result, Tensor, D};

/// Layer norm over the last dimension without affine parameters (DiT blocks modulate instead),
/// composed of candle ops: the reference for (and the fallback of) `super::fused::layer_norm`.
pub fn layer_norm_composed(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}
