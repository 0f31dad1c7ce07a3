//! Stable Diffusion families (SD1.5, SD2, SDXL and their few-step students) loaded from a
//! local directory in the diffusers layout. One implementation serves and trains, so every
//! layer here is built from ops with a backward (see `crate::nn`).

pub mod clip;
pub mod clip_image;
pub mod clip_vision;
pub mod distill;
mod family;
pub mod layers;
pub mod layout;
mod load;
pub mod manifest;
pub mod model;
pub mod schedule;
pub mod tokenizer;
pub mod unet;
pub mod vae;

#[cfg(test)]
pub(crate) mod testing;

pub use distill::{read_unet_weights, SdFamily};
pub use family::Sd;
pub use manifest::{SdSource, WeightDtype};
pub use model::{SdCond, SdModel, SdOptions, SdText};
pub use schedule::DdpmSchedule;
pub use unet::{AddedCond, UNet, UNetConfig, UNetError};
