//! Wan2.1 text-to-video (`Wan-AI/Wan2.1-T2V-*-Diffusers`), loaded from a directory in the
//! diffusers layout: the video transformer (`transformer/`), the umT5 text path
//! (`tokenizer/`, `text_encoder/`, with a prompt cache), the video VAE (`vae/`, [`WanVae`])
//! and the flow-matching schedule with its teacher and student steps (`scheduler`), served
//! (`model`) and distilled with DMD2/AMD (`distill`). The transformer serves and trains from
//! one implementation, so its layers are built from ops with a backward (see `crate::nn`);
//! the text encoder and the VAE are frozen.

mod block;
pub mod config;
pub mod distill;
mod family;
mod load;
pub mod manifest;
pub mod model;
pub mod rope;
pub mod scheduler;
pub mod text;
pub mod transformer;
pub mod vae;

pub use config::WanTransformerConfig;
pub use distill::WanFamily;
pub use family::Wan;
pub use model::{WanCond, WanDenoiser, WanModel, WanOptions};
pub use scheduler::{FlowMatchSchedule, FlowScheduleError, FlowSchedulerConfig};
pub use text::{Umt5Encoder, WanTextEncoder};
pub use transformer::WanTransformer;
pub use vae::{WanPosterior, WanVae, WanVaeConfig, WanVaeError};

/// Errors of reading a Wan component's config or weights.
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    #[error("invalid Wan config {path}: {message}")]
    Config { path: String, message: String },
    #[error("unsupported Wan config: {0}")]
    Unsupported(String),
    #[error(
        "no Wan weights at {path}: expected a .safetensors file or a directory holding \
         diffusion_pytorch_model.safetensors (or its sharded index)"
    )]
    MissingWeights { path: String },
    #[error(transparent)]
    Schedule(#[from] FlowScheduleError),
    #[error("cannot load the Wan tokenizer {path}: {message}")]
    Tokenizer { path: String, message: String },
    #[error("cannot tokenize {prompt:?}: {message}")]
    Tokenize { prompt: String, message: String },
    #[error("Wan: {0}")]
    Compute(#[from] candle_core::Error),
    #[error(transparent)]
    Vae(#[from] WanVaeError),
    #[error("cannot load Wan weights {path}: {source}")]
    Weights {
        path: String,
        source: candle_core::Error,
    },
}

/// The diffusers weight-file lookup is shared with the UNet; its errors are re-labelled.
impl From<crate::families::sd::UNetError> for WanError {
    fn from(e: crate::families::sd::UNetError) -> Self {
        use crate::families::sd::UNetError as U;
        match e {
            U::MissingWeights { path } => Self::MissingWeights { path },
            U::Config { path, message } => Self::Config { path, message },
            other => Self::Unsupported(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests;
