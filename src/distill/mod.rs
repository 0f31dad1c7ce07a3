//! Distillation of few-step students: DMD2 and Adaptive Matching Distillation (AMD.md),
//! through the same model code the server runs.

pub mod config;
pub mod family;
pub mod gan;
pub mod math;
pub mod prompts;
pub mod run;
pub mod trainer;

pub use config::{AmdConfig, DistillConfig, Method};
pub use prompts::PromptSource;
pub use run::{load_config, run, RunOptions, RunOutput};
pub use trainer::{Distiller, IterStats};
