//! Samplers over any [`Denoiser`]: the few-step student sampler of AMD.md section 2, the
//! ancestral sampler of SD-Turbo / SDXL-Turbo, and multi-step deterministic teacher samplers
//! with CFG (Euler/DDIM, and UniPC).

use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use super::noise::{batch_noise_of, RowNoise};
use super::unipc::UniPc;
use super::{Denoiser, NoiseSchedule};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
    /// The UniPC multistep solver (diffusers' `UniPCMultistepScheduler` with its defaults,
    /// which Wan2.1 ships), see [`super::unipc`]: deterministic like Euler, second order.
    #[serde(rename = "unipc")]
    #[value(name = "unipc")]
    UniPc,
}

/// What to run: the sampler, its number of network evaluations, the CFG scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerParams {
    pub kind: SamplerKind,
    pub steps: usize,
    pub guidance: f32,
    /// The times `[lo, hi]` at which `guidance` runs (`sampling.guidance_interval`); outside
    /// it a step takes the conditional prediction alone. `None`: every step.
    pub guidance_interval: Option<[f64; 2]>,
    /// The ancestral sampler's share of fresh noise per step (`sampling.eta`; 1: Euler
    /// ancestral, 0: DDIM), see [`NoiseSchedule::ancestral_step`]. Other samplers ignore it.
    pub eta: f32,
}

impl SamplerParams {
    /// The guidance of a step at time `t`.
    fn guidance_at(&self, t: f32) -> f32 {
        guidance_at(self.guidance, self.guidance_interval, t)
    }
}

/// The CFG scale at flow time `t`: `guidance` inside `interval` (or everywhere without one), 1
/// (the conditional prediction alone) outside it. Shared by the samplers and distillation's
/// real score, so that both read an interval the same way.
pub fn guidance_at(guidance: f32, interval: Option<[f64; 2]>, t: f32) -> f32 {
    match interval {
        Some([lo, hi]) if !(lo..=hi).contains(&f64::from(t)) => 1.0,
        _ => guidance,
    }
}

/// Checks a guidance interval (flow times with `0 <= lo < hi <= 1`); the error names `key`,
/// so the manifest and the distill config refuse a bad one in the same words.
pub fn check_guidance_interval(
    key: &str,
    interval: Option<[f64; 2]>,
) -> std::result::Result<(), String> {
    match interval {
        Some([lo, hi])
            if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo < hi && hi <= 1.0) =>
        {
            Err(format!(
                "{key} [{lo}, {hi}] must be flow times with 0 <= lo < hi <= 1"
            ))
        }
        _ => Ok(()),
    }
}

/// Watches a batch as it denoises: called once before the first step (`step` 0, no estimate)
/// and after every step with the live rows' current x0 estimate. It returns the rows (by their
/// index in the original batch) that leave the batch now, e.g. because their job was
/// cancelled; the others go on unchanged (their noise comes from their own streams).
pub trait StepObserver {
    fn on_step(
        &mut self,
        step: usize,
        steps: usize,
        live: &[usize],
        x0: Option<&Tensor>,
    ) -> Vec<usize>;
}

/// Watches nothing and drops nothing.
pub struct Unobserved;

impl StepObserver for Unobserved {
    fn on_step(&mut self, _: usize, _: usize, _: &[usize], _: Option<&Tensor>) -> Vec<usize> {
        Vec::new()
    }
}

/// What an observed batch leaves: the final samples of the rows still live (`None` when every
/// row left), and those rows' indices in the original batch.
pub struct Sampled {
    pub x: Option<Tensor>,
    pub live: Vec<usize>,
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
    device: &Device,
) -> Result<Tensor> {
    let out = sample_observed(
        model,
        schedule,
        params,
        cond,
        rows,
        sample_shape,
        device,
        &mut Unobserved,
    )?;
    out.x
        .ok_or_else(|| candle_core::Error::Msg("every row left the batch".into()))
}

/// [`sample`] under a [`StepObserver`], which sees every step and may drop rows between steps.
#[allow(clippy::too_many_arguments)]
pub fn sample_observed<M: Denoiser, S: NoiseSchedule>(
    model: &M,
    schedule: &S,
    params: SamplerParams,
    cond: &M::Cond,
    rows: &mut [RowNoise],
    sample_shape: &[usize],
    device: &Device,
    observer: &mut dyn StepObserver,
) -> Result<Sampled> {
    let mut live: Vec<usize> = (0..rows.len()).collect();
    let mut noise = |live: &[usize]| {
        let mut streams: Vec<&mut RowNoise> = Vec::with_capacity(live.len());
        for (i, r) in rows.iter_mut().enumerate() {
            if live.contains(&i) {
                streams.push(r);
            }
        }
        batch_noise_of(&mut streams, sample_shape, device)
    };
    let x = run(
        model, schedule, params, cond, &mut live, &mut noise, observer,
    )?;
    Ok(Sampled { x, live })
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
    let first = noise()?;
    let mut live: Vec<usize> = (0..first.dim(0)?).collect();
    let mut first = Some(first);
    let mut supply = |_: &[usize]| match first.take() {
        Some(t) => Ok(t),
        None => noise(),
    };
    run(
        model,
        schedule,
        params,
        cond,
        &mut live,
        &mut supply,
        &mut Unobserved,
    )?
    .ok_or_else(|| candle_core::Error::Msg("every row left the batch".into()))
}

/// The sampler loop. `noise(live)` gives fresh noise for the live rows; after each step the
/// observer may shrink `live`, and the state and conditioning shrink with it.
fn run<M: Denoiser, S: NoiseSchedule>(
    model: &M,
    schedule: &S,
    params: SamplerParams,
    cond: &M::Cond,
    live: &mut Vec<usize>,
    noise: &mut dyn FnMut(&[usize]) -> Result<Tensor>,
    observer: &mut dyn StepObserver,
) -> Result<Option<Tensor>> {
    let SamplerParams { kind, steps, .. } = params;
    let times = match kind {
        SamplerKind::Euler => schedule.euler_times(steps),
        SamplerKind::UniPc => schedule.unipc_times(steps),
        _ => schedule.student_times(steps),
    };
    let mut unipc = match kind {
        SamplerKind::UniPc => Some(UniPc::new(schedule.unipc_order(), times.clone())?),
        _ => None,
    };
    let mut x = noise(live)?;
    let mut x0 = x.clone();
    let mut narrowed: Option<M::Cond> = None;
    for i in 0..=steps {
        let dropped = observer.on_step(i, steps, live, (i > 0).then_some(&x0));
        if let Some(idx) = leave(live, &dropped, x.device())? {
            if live.is_empty() {
                return Ok(None);
            }
            x = x.index_select(&idx, 0)?;
            x0 = x0.index_select(&idx, 0)?;
            if let Some(u) = unipc.as_mut() {
                u.select_rows(&idx)?;
            }
            if i < steps {
                narrowed = Some(model.select_rows(narrowed.as_ref().unwrap_or(cond), &idx)?);
            }
        }
        if i == steps {
            break;
        }
        let c = narrowed.as_ref().unwrap_or(cond);
        let b = live.len();
        let t = times[i];
        let guidance = params.guidance_at(t);
        // Sampling never needs a graph; detaching keeps a trainable model's steps from
        // chaining every forward pass into one.
        x0 = match &mut unipc {
            Some(_) => {
                let net_t = schedule.unipc_network_time(t);
                model.predict_x0_at(&x, &vec![t; b], &vec![net_t; b], c, guidance)?
            }
            None => model.predict_x0(&x, &vec![t; b], c, guidance)?,
        }
        .detach();
        match kind {
            SamplerKind::Euler => x = schedule.step(&x, &x0, t, times[i + 1])?.detach(),
            SamplerKind::UniPc => {
                let solver = unipc.as_mut().expect("built for UniPC");
                x = solver.step(schedule, i, &x, &x0)?.detach();
            }
            _ => {
                if let Some(&next) = times.get(i + 1) {
                    let n = noise(live)?;
                    x = match kind {
                        SamplerKind::Ancestral => {
                            schedule.ancestral_step(&x, &x0, (t, next), &n, params.eta)?
                        }
                        _ => schedule.add_noise(&x0, &n, &vec![next; b])?,
                    };
                }
            }
        }
    }
    Ok(Some(match kind {
        SamplerKind::Euler | SamplerKind::UniPc => x,
        _ => x0,
    }))
}

/// Takes the `dropped` rows out of `live`; returns the positions (in the old `live`) of the
/// rows that stay, or `None` when nothing was dropped.
fn leave(live: &mut Vec<usize>, dropped: &[usize], device: &Device) -> Result<Option<Tensor>> {
    if !live.iter().any(|r| dropped.contains(r)) {
        return Ok(None);
    }
    let keep: Vec<u32> = (0..live.len())
        .filter(|&p| !dropped.contains(&live[p]))
        .map(|p| p as u32)
        .collect();
    live.retain(|r| !dropped.contains(r));
    Ok(Some(Tensor::new(keep.as_slice(), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::FlowSchedule;

    /// A row-independent toy denoiser: x0 = x / 2 + the row's conditioning value.
    struct Toy;

    impl Denoiser for Toy {
        type Cond = Tensor;

        fn predict_x0(&self, x: &Tensor, _: &[f32], cond: &Tensor, _: f32) -> Result<Tensor> {
            (x * 0.5)?.broadcast_add(cond)
        }

        fn select_rows(&self, cond: &Tensor, idx: &Tensor) -> Result<Tensor> {
            cond.index_select(idx, 0)
        }
    }

    /// Drops `row` after step `at`, and records what it saw.
    struct DropAt {
        row: usize,
        at: usize,
        seen: Vec<(usize, Vec<usize>)>,
    }

    impl StepObserver for DropAt {
        fn on_step(
            &mut self,
            step: usize,
            _: usize,
            live: &[usize],
            _: Option<&Tensor>,
        ) -> Vec<usize> {
            self.seen.push((step, live.to_vec()));
            if step == self.at {
                vec![self.row]
            } else {
                Vec::new()
            }
        }
    }

    #[test]
    fn a_row_that_leaves_between_steps_leaves_the_others_bit_identical() -> Result<()> {
        let dev = Device::Cpu;
        let cond = Tensor::new(&[[0.1f32], [0.2], [0.3]], &dev)?.reshape((3, 1, 1))?;
        for kind in [
            SamplerKind::Student,
            SamplerKind::Euler,
            SamplerKind::Ancestral,
            SamplerKind::UniPc,
        ] {
            let params = SamplerParams {
                kind,
                steps: 4,
                guidance: 1.0,
                guidance_interval: None,
                eta: 1.0,
            };
            let run = |obs: &mut dyn StepObserver| {
                let mut rows: Vec<RowNoise> = (0..3).map(|s| RowNoise::new(s as u64)).collect();
                sample_observed(
                    &Toy,
                    &FlowSchedule::default(),
                    params,
                    &cond,
                    &mut rows,
                    &[1, 2],
                    &dev,
                    obs,
                )
            };
            let all = run(&mut Unobserved)?;
            let mut obs = DropAt {
                row: 1,
                at: 2,
                seen: Vec::new(),
            };
            let some = run(&mut obs)?;
            assert_eq!(some.live, vec![0, 2]);
            let all = all.x.unwrap().to_vec3::<f32>()?;
            let some = some.x.unwrap().to_vec3::<f32>()?;
            assert_eq!(some[0], all[0], "{kind:?}");
            assert_eq!(some[1], all[2], "{kind:?}");
            // Every step is seen, from 0 (before the first) to the last.
            let steps: Vec<usize> = obs.seen.iter().map(|s| s.0).collect();
            assert_eq!(steps, vec![0, 1, 2, 3, 4]);
            assert_eq!(obs.seen[3].1, vec![0, 2], "gone from step 3 on");
        }
        Ok(())
    }

    /// Samples one `[1, 2]` row per row of `cond` (noise seeds 0, 1, ...), unobserved.
    fn sample_rows<M: Denoiser<Cond = Tensor>>(
        model: &M,
        schedule: FlowSchedule,
        params: SamplerParams,
        cond: &Tensor,
    ) -> Result<Sampled> {
        let mut rows: Vec<RowNoise> = (0..cond.dim(0)?).map(|s| RowNoise::new(s as u64)).collect();
        let device = cond.device().clone();
        sample_observed(
            model,
            &schedule,
            params,
            cond,
            &mut rows,
            &[1, 2],
            &device,
            &mut Unobserved,
        )
    }

    /// Records the time and guidance of every call.
    struct Recorder(std::cell::RefCell<Vec<(f32, f32)>>);

    impl Denoiser for Recorder {
        type Cond = Tensor;

        fn predict_x0(&self, x: &Tensor, t: &[f32], _: &Tensor, guidance: f32) -> Result<Tensor> {
            self.0.borrow_mut().push((t[0], guidance));
            x * 0.5
        }

        fn select_rows(&self, cond: &Tensor, idx: &Tensor) -> Result<Tensor> {
            cond.index_select(idx, 0)
        }
    }

    #[test]
    fn guidance_runs_only_inside_its_interval() -> Result<()> {
        let dev = Device::Cpu;
        let cond = Tensor::new(&[[0.1f32]], &dev)?.reshape((1, 1, 1))?;
        let guidances = |interval| -> Result<Vec<(f32, f32)>> {
            let model = Recorder(Default::default());
            let params = SamplerParams {
                kind: SamplerKind::Euler,
                steps: 4,
                guidance: 3.0,
                guidance_interval: interval,
                eta: 1.0,
            };
            sample_rows(&model, FlowSchedule::default(), params, &cond)?;
            Ok(model.0.into_inner())
        };
        // Euler at 4 steps visits t = 1, 0.75, 0.5, 0.25.
        let every = guidances(None)?;
        assert_eq!(
            every,
            vec![(1.0, 3.0), (0.75, 3.0), (0.5, 3.0), (0.25, 3.0)]
        );
        assert_eq!(
            guidances(Some([0.0, 1.0]))?,
            every,
            "the whole range is no change"
        );
        // Below 0.3 the conditional prediction alone; the bounds are inclusive.
        let high = guidances(Some([0.3, 1.0]))?;
        assert_eq!(high, vec![(1.0, 3.0), (0.75, 3.0), (0.5, 3.0), (0.25, 1.0)]);
        let middle = guidances(Some([0.5, 0.75]))?;
        assert_eq!(
            middle,
            vec![(1.0, 1.0), (0.75, 3.0), (0.5, 3.0), (0.25, 1.0)]
        );
        Ok(())
    }

    #[test]
    fn the_ancestral_sampler_at_eta_0_is_the_euler_sampler() -> Result<()> {
        let dev = Device::Cpu;
        let cond = Tensor::new(&[[0.1f32], [0.2]], &dev)?.reshape((2, 1, 1))?;
        let run = |kind, eta| -> Result<Vec<Vec<Vec<f32>>>> {
            let params = SamplerParams {
                kind,
                steps: 5,
                guidance: 1.0,
                guidance_interval: None,
                eta,
            };
            sample_rows(&Toy, FlowSchedule { shift: 3.0 }, params, &cond)?
                .x
                .expect("no row left")
                .to_vec3::<f32>()
        };
        let close = |a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>]| {
            let flat =
                |v: &[Vec<Vec<f32>>]| v.iter().flatten().flatten().copied().collect::<Vec<_>>();
            flat(a)
                .iter()
                .zip(flat(b))
                .all(|(x, y)| (x - y).abs() < 1e-5)
        };
        // Without fresh noise the ancestral steps are Euler's, the last landing on x0.
        let euler = run(SamplerKind::Euler, 1.0)?;
        assert!(close(&run(SamplerKind::Ancestral, 0.0)?, &euler));
        // With it they are not, and eta moves the result.
        let half = run(SamplerKind::Ancestral, 0.5)?;
        let full = run(SamplerKind::Ancestral, 1.0)?;
        assert!(!close(&half, &euler) && !close(&full, &euler) && !close(&half, &full));
        Ok(())
    }

    #[test]
    fn when_every_row_leaves_nothing_is_left() -> Result<()> {
        let dev = Device::Cpu;
        let cond = Tensor::new(&[[0.1f32]], &dev)?.reshape((1, 1, 1))?;
        let params = SamplerParams {
            kind: SamplerKind::Student,
            steps: 4,
            guidance: 1.0,
            guidance_interval: None,
            eta: 1.0,
        };
        let mut rows = vec![RowNoise::new(0)];
        let mut obs = DropAt {
            row: 0,
            at: 0,
            seen: Vec::new(),
        };
        let out = sample_observed(
            &Toy,
            &FlowSchedule::default(),
            params,
            &cond,
            &mut rows,
            &[1, 2],
            &dev,
            &mut obs,
        )?;
        assert!(out.x.is_none() && out.live.is_empty());
        assert_eq!(obs.seen.len(), 1, "no step ran");
        Ok(())
    }
}
