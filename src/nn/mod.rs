//! Layers shared by the model families, built only from candle ops that have a backward.
//!
//! candle 0.11's fused `softmax_last_dim`, fused `layer_norm`, `rms_norm` and the rotary custom
//! ops silently drop gradients, so nothing here uses them: every module in this folder can be
//! trained by `train-teacher` and `distill` as well as served.

pub mod attention;
pub mod conv;
pub mod embed;
pub mod init;
pub mod linear;
pub mod norm;
pub mod softmax;

pub use attention::{Attention, CrossAttention};
pub use conv::Conv3x3;
pub use embed::{sincos_1d, timestep_embedding};
pub use init::{random_var_builder, seeded_var_builder};
pub use linear::Linear;
pub use norm::layer_norm;
pub use softmax::softmax_last_dim;

use candle_core::{Result, Tensor};

/// `x * (1 + scale) + shift` with `shift`, `scale` of shape `[B, D]` broadcast over tokens.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let shift = shift.unsqueeze(1)?;
    let scale = (scale.unsqueeze(1)? + 1.0)?;
    x.broadcast_mul(&scale)?.broadcast_add(&shift)
}

/// `x + gate * y` with `gate` of shape `[B, D]` broadcast over tokens.
pub fn gated_residual(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    x + y.broadcast_mul(&gate.unsqueeze(1)?)?
}
