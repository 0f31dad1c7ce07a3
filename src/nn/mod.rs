//! Layers shared by the model families, built only from ops that have a backward (candle ops
//! and our own one-pass kernels in `fused` and `softmax`).
//!
//! candle 0.11's fused `softmax_last_dim`, fused `layer_norm`, `rms_norm` and the rotary custom
//! ops silently drop gradients, so nothing here uses them: every module in this folder can be
//! trained by `train-teacher` and `distill` as well as served.

pub mod attention;
pub mod conv;
pub mod direct_conv;
pub mod embed;
pub mod fastmath;
pub mod fused;
pub mod fused_attention;
pub mod fused_linear;
pub mod init;
pub mod linear;
pub mod lora;
pub mod norm;
pub mod softmax;
pub(crate) mod strided_gemm;

pub use attention::{Attention, CrossAttention};
pub use conv::Conv3x3;
pub use embed::{sincos_1d, timestep_embedding};
pub use fused::{add_bias, gated_residual, layer_norm, layer_norm_modulate, silu};
pub use init::{random_var_builder, seeded_var_builder};
pub use linear::{Linear, VisitLinear};
pub use lora::{LoraAdapter, LoraConfig, LoraError};
pub use softmax::softmax_last_dim;

/// The largest absolute difference of two tensors of one shape (tests of ops against their
/// reference compositions).
#[cfg(test)]
pub(crate) fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .unwrap()
}
