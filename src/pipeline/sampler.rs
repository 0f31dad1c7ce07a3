//! Samplers over any [`Denoiser`]: the few-step student sampler of AMD.md section 2, the
//! ancestral sampler of SD-Turbo / SDXL-Turbo, and a multi-step deterministic (Euler/DDIM)
//! teacher sampler with CFG.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::noise::{batch_noise, RowNoise};
use super::{Denoiser, NoiseSchedule};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// Predict x0, re-noise it with fresh noise to the next time, repeat (distilled students).
    Student,
    /// Deterministic Euler/DDIM steps from 1 to 0 (teachers, usually with CFG).
    Euler,
    /// Euler ancestral steps over the student times (diffusers' `EulerAncestralDiscreteScheduler`
    /// with trailing spacing, which SD-Turbo and SDXL-Turbo ship): part of the predicted noise
    /// is kept and part is fresh, see [`NoiseSchedule::ancestral_step`].
    Ancestral,
}

/// What to run: the sampler, its number of network evaluations, the CFG scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerParams {
    pub kind: SamplerKind,
    pub steps: usize,
    pub guidance: f32,
}

/// Runs the sampler from pure noise for `rows` outputs of `sample_shape` and returns the final
/// x0 estimate, `[rows, sample_shape...]`. Every noise tensor comes from the rows' own streams.
pub fn sample<M: Denoiser, S: NoiseSchedule>(
    model: &M,
    schedule: &S,
    params: SamplerParams,
    cond: &M::Cond,
    rows: &mut [RowNoise],
    sample_shape: &[usize],
    device: &candle_core::Device,
) -> Result<Tensor> {
    sample_with_noise(model, schedule, params, cond, || {
        batch_noise(rows, sample_shape, device)
    })
}

/// [`sample`] with the noise supplied by `noise`: its first tensor is the starting point, each
/// later one is the fresh noise of a student or ancestral step (parity tests feed fixed noise).
pub fn sample_with_noise<M: Denoiser, S: NoiseSchedule>(
    model: &M,
    schedule: &S,
    params: SamplerParams,
    cond: &M::Cond,
    mut noise: impl FnMut() -> Result<Tensor>,
) -> Result<Tensor> {
    let mut x = noise()?;
    let b = x.dim(0)?;
    let SamplerParams {
        kind,
        steps,
        guidance,
    } = params;
    match kind {
        SamplerKind::Student | SamplerKind::Ancestral => {
            let times = schedule.student_times(steps);
            let mut x0 = x.clone();
            for (i, &t) in times.iter().enumerate() {
                // Sampling never needs a graph; detaching keeps a trainable model's steps from
                // chaining every forward pass into one.
                x0 = model.predict_x0(&x, &vec![t; b], cond, guidance)?.detach();
                if let Some(&next) = times.get(i + 1) {
                    let n = noise()?;
                    x = match kind {
                        SamplerKind::Ancestral => schedule.ancestral_step(&x, &x0, t, next, &n)?,
                        _ => schedule.add_noise(&x0, &n, &vec![next; b])?,
                    };
                }
            }
            Ok(x0)
        }
        SamplerKind::Euler => {
            let times = schedule.euler_times(steps);
            for w in times.windows(2) {
                let x0 = model.predict_x0(&x, &vec![w[0]; b], cond, guidance)?;
                x = schedule.step(&x, &x0.detach(), w[0], w[1])?.detach();
            }
            Ok(x)
        }
    }
}
