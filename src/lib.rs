//! fewstep: an inference server for few-step distilled diffusion models, with the training
//! side (teacher training, DMD2 / Adaptive Matching Distillation) built on the same model code.

pub mod alloc;
pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod distill;
pub mod engine;
pub mod eval;
pub mod families;
pub mod manifest;
pub mod media;
pub mod nn;
pub mod pipeline;
pub mod reward;
pub mod rollout;
pub mod server;
pub mod store;
pub mod train;
pub mod util;
pub mod world;
