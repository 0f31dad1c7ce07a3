//! One batch from prompts to frames, the same for every family: encode the prompts, sample
//! from each row's own noise, decode, and time each stage.

use std::any::Any;
use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use image::RgbImage;

use super::{
    sample_observed, BatchResult, BatchSpec, Denoiser, NoiseSchedule, RowNoise, SamplerParams,
    StepObserver,
};

/// What a family supplies to run batches: its denoiser, schedule, text conditioning, sample
/// shape and decode.
pub trait Generator: Denoiser {
    type Schedule: NoiseSchedule;

    fn schedule(&self) -> &Self::Schedule;

    /// The schedule `spec`'s batch is sampled with (a family may give videos their own).
    fn schedule_for(&self, _spec: &BatchSpec) -> &Self::Schedule {
        self.schedule()
    }

    fn device(&self) -> &Device;

    /// The shape of one row's sample for `spec` (checked before any work is done).
    fn sample_shape(&self, spec: &BatchSpec) -> Result<Vec<usize>>;

    /// The conditioning of `spec`'s prompts, with the negatives encoded when `cfg` is set.
    fn condition_batch(&self, spec: &BatchSpec, cfg: bool) -> Result<Self::Cond>;

    /// Clean samples `[B, ...]` as RGB frames, one list per row.
    fn frames(&self, x0: &Tensor) -> Result<Vec<Vec<RgbImage>>>;

    /// [`generate`] with nobody watching.
    fn generate(&self, spec: &BatchSpec, params: SamplerParams) -> Result<BatchResult>
    where
        Self: Sized,
    {
        generate(self, spec, params, &mut super::Unobserved)
    }
}

/// Runs a whole batch under an observer that sees each step and may drop rows; the outputs
/// are those of the rows still live at the end, in batch order.
pub fn generate<G: Generator>(
    model: &G,
    spec: &BatchSpec,
    params: SamplerParams,
    observer: &mut dyn StepObserver,
) -> Result<BatchResult> {
    let shape = model.sample_shape(spec)?;
    let start = Instant::now();
    let cond = model.condition_batch(spec, params.guidance > 1.0)?;
    let text_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut rows: Vec<RowNoise> = spec.seeds.iter().map(|&s| RowNoise::new(s)).collect();
    let sampled = sample_observed(
        model,
        model.schedule_for(spec),
        params,
        &cond,
        &mut rows,
        &shape,
        model.device(),
        observer,
    )?;
    let denoise_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let outputs = match &sampled.x {
        Some(x0) => model.frames(x0)?,
        None => Vec::new(),
    };
    Ok(BatchResult {
        outputs,
        text_s,
        denoise_s,
        decode_s: start.elapsed().as_secs_f64(),
    })
}

/// A [`Generator`] behind a pointer, so that the engine holds models of any family alike.
pub trait ServedModel: Send + Sync {
    /// [`generate`] on this model.
    fn generate_observed(
        &self,
        spec: &BatchSpec,
        params: SamplerParams,
        observer: &mut dyn StepObserver,
    ) -> Result<BatchResult>;

    /// Frames of an intermediate x0 estimate (a partial image), one frame list per row.
    fn preview(&self, x0: &Tensor) -> Result<Vec<Vec<RgbImage>>>;

    /// The family's own model, for the tools that need its internals (the tiny probes).
    fn as_any(&self) -> &dyn Any;
}

impl<G: Generator + Send + Sync + 'static> ServedModel for G {
    fn generate_observed(
        &self,
        spec: &BatchSpec,
        params: SamplerParams,
        observer: &mut dyn StepObserver,
    ) -> Result<BatchResult> {
        generate(self, spec, params, observer)
    }

    fn preview(&self, x0: &Tensor) -> Result<Vec<Vec<RgbImage>>> {
        self.frames(x0)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
