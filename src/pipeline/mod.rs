//! The family-agnostic generation contract: noise schedules, per-request host noise, the
//! samplers (few-step student, multi-step teacher with CFG: Euler or UniPC) written against [`Denoiser`], and
//! the encode -> sample -> decode path every family's [`Generator`] runs through.

pub mod frames;
pub mod generate;
pub mod noise;
pub mod sampler;
pub mod schedule;
pub mod unipc;

pub use frames::{from_frames, to_frames};
pub use generate::{generate, Generator, ServedModel};
pub use noise::RowNoise;
pub use sampler::{
    sample, sample_observed, sample_with_noise, Sampled, SamplerKind, SamplerParams, StepObserver,
    Unobserved,
};
pub use schedule::{FlowSchedule, NoiseSchedule};

use candle_core::{Result, Tensor};

/// A network used as an x0-predictor (AMD.md section 1): each family converts its native
/// output (epsilon, v, velocity) to a clean-sample estimate.
pub trait Denoiser {
    /// Family-specific conditioning (encoded prompts and, for CFG, the unconditional branch).
    type Cond;

    /// Clean-sample estimate for `x` at per-row times `t` (fractions of the schedule, 1 =
    /// pure noise). `guidance > 1` applies classifier-free guidance.
    fn predict_x0(&self, x: &Tensor, t: &[f32], cond: &Self::Cond, guidance: f32)
        -> Result<Tensor>;

    /// [`Self::predict_x0`] with the network evaluated at times `net_t` while the clean
    /// sample is formed at `t` (diffusers' UniPC feeds a flow model integer timesteps but
    /// steps with the exact sigmas). Families whose network time is `t` itself keep this.
    fn predict_x0_at(
        &self,
        x: &Tensor,
        t: &[f32],
        _net_t: &[f32],
        cond: &Self::Cond,
        guidance: f32,
    ) -> Result<Tensor> {
        self.predict_x0(x, t, cond, guidance)
    }

    /// The conditioning of the rows at positions `idx` (a `u32` index tensor), for a batch
    /// that some rows left between steps.
    fn select_rows(&self, cond: &Self::Cond, idx: &Tensor) -> Result<Self::Cond>;
}

/// One lock-step batch for a model: a row per output.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSpec {
    pub prompts: Vec<String>,
    /// The unconditional branch of CFG per row ("" when the request has no negative prompt).
    pub negative_prompts: Vec<String>,
    /// Seed of each row's noise stream.
    pub seeds: Vec<u64>,
    pub frames: usize,
    pub width: usize,
    pub height: usize,
}

/// The decoded outputs of one batch (one frame list per row) and how long each stage took.
#[derive(Debug, Clone)]
pub struct BatchResult {
    pub outputs: Vec<Vec<image::RgbImage>>,
    pub text_s: f64,
    pub denoise_s: f64,
    pub decode_s: f64,
}
