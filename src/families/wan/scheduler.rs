//! Wan2.1's flow-matching schedule: `x_sigma = (1 - sigma) x0 + sigma noise`, a network that
//! predicts the velocity `v = noise - x0`, and timesteps `sigma * num_train_timesteps`.
//!
//! The Wan transformer is trained with its sigmas bent towards the noisy end by the
//! scheduler's `flow_shift` (3.0 for 480p, 5.0 for 720p): `s' = shift s / (1 + (shift - 1) s)`.
//! Two samplers use it:
//!
//! - the multi-step **teacher** ([`FlowMatchSchedule::teacher_sigmas`]): the sigmas of
//!   diffusers' `FlowMatchEulerDiscreteScheduler` (`shift` = `flow_shift`), stepped by
//!   [`euler_step`], `x_next = x + (sigma_next - sigma) v`;
//! - the few-step **student** ([`FlowMatchSchedule::student_sigmas`]): a list of timesteps such
//!   as `[1000, 750, 500, 250]`, each taken through the shift (`shift(k / T)`, the warp that
//!   CausVid and Self-Forcing apply to their denoising step lists). DMD-style students predict
//!   `x0 = x - sigma v` and re-noise it to the next sigma with fresh noise
//!   ([`student_step`]); [`euler_step`] over the same sigmas is the deterministic variant.
//!
//! The teacher may also run diffusers' default for Wan, `UniPCMultistepScheduler`
//! ([`FlowMatchSchedule::unipc_sigmas`], see `crate::pipeline::unipc`).
//!
//! Through [`NoiseSchedule`] (schedule time = sigma) the generic samplers run all three: their
//! `Euler` kind walks [`FlowMatchSchedule::teacher_sigmas`], `UniPc` the UniPC sigmas and their
//! `Student` kind the student sigmas, with the network's velocity turned into x0 by [`x0_from_velocity`].

use candle_core::{Result as TensorResult, Tensor};
use serde::Deserialize;

use crate::pipeline::NoiseSchedule;

/// A schedule's parameters or a sampling request that cannot be honoured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FlowScheduleError {
    #[error("the flow shift must be a finite number above 0, got {0}")]
    Shift(f64),
    #[error("num_train_timesteps must be at least 1")]
    NoTrainTimesteps,
    #[error("a sampler needs at least one step")]
    NoSteps,
    #[error("the student timestep list is empty")]
    EmptyStudentList,
    #[error("student timestep {timestep} is outside (0, {train_steps}]")]
    StudentTimestep { timestep: f64, train_steps: usize },
    #[error("student timesteps must be strictly decreasing, got {0:?}")]
    StudentOrder(Vec<f64>),
    #[error("scheduler option `{0}` changes the sigmas and is not supported")]
    Option(&'static str),
    #[error("UniPC option `{0}` is not supported (only diffusers' defaults, which Wan uses)")]
    UniPcOption(&'static str),
}

/// The parts of diffusers' `scheduler/scheduler_config.json` the schedule needs. Wan ships a
/// `UniPCMultistepScheduler` config, which names the shift `flow_shift`; a
/// `FlowMatchEulerDiscreteScheduler` config names it `shift`. Other keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FlowSchedulerConfig {
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default)]
    pub flow_shift: Option<f64>,
    #[serde(default)]
    pub shift: Option<f64>,
    /// Options that would change the sigmas; refused when set rather than ignored.
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    /// UniPC's settings (`UniPCMultistepScheduler`, what Wan ships); only the defaults, which
    /// Wan uses, are supported.
    #[serde(default = "default_solver_order")]
    pub solver_order: usize,
    #[serde(default = "default_true")]
    pub predict_x0: bool,
    #[serde(default = "default_solver_type")]
    pub solver_type: String,
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    #[serde(default)]
    pub disable_corrector: Vec<usize>,
    #[serde(default = "default_final_sigmas")]
    pub final_sigmas_type: String,
}

fn default_solver_order() -> usize {
    2
}
fn default_true() -> bool {
    true
}
fn default_solver_type() -> String {
    "bh2".into()
}
fn default_final_sigmas() -> String {
    "zero".into()
}

fn default_train_steps() -> usize {
    1000
}

impl FlowSchedulerConfig {
    /// `flow_shift`, else `shift`, else 1 (no shift), as the two diffusers schedulers default.
    pub fn effective_shift(&self) -> f64 {
        self.flow_shift.or(self.shift).unwrap_or(1.0)
    }
}

/// The shifted flow-matching schedule, with an optional student timestep list.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchSchedule {
    shift: f64,
    train_steps: usize,
    /// Used by [`NoiseSchedule::student_times`] when a request asks for exactly this many
    /// steps; other step counts use evenly spaced timesteps.
    student_timesteps: Option<Vec<f64>>,
    /// The UniPC sampler's order (the scheduler config's `solver_order`).
    solver_order: usize,
}

impl FlowMatchSchedule {
    pub fn new(shift: f64, num_train_timesteps: usize) -> Result<Self, FlowScheduleError> {
        if !(shift.is_finite() && shift > 0.0) {
            return Err(FlowScheduleError::Shift(shift));
        }
        if num_train_timesteps == 0 {
            return Err(FlowScheduleError::NoTrainTimesteps);
        }
        Ok(Self {
            shift,
            train_steps: num_train_timesteps,
            student_timesteps: None,
            solver_order: 2,
        })
    }

    pub fn from_config(cfg: &FlowSchedulerConfig) -> Result<Self, FlowScheduleError> {
        for (name, set) in [
            ("use_dynamic_shifting", cfg.use_dynamic_shifting),
            ("use_karras_sigmas", cfg.use_karras_sigmas),
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
            ("invert_sigmas", cfg.invert_sigmas),
            ("shift_terminal", cfg.shift_terminal.is_some()),
        ] {
            if set {
                return Err(FlowScheduleError::Option(name));
            }
        }
        for (name, set) in [
            ("solver_order", !(1..=3).contains(&cfg.solver_order)),
            ("predict_x0", !cfg.predict_x0),
            ("solver_type", cfg.solver_type != "bh2"),
            ("lower_order_final", !cfg.lower_order_final),
            ("disable_corrector", !cfg.disable_corrector.is_empty()),
            ("final_sigmas_type", cfg.final_sigmas_type != "zero"),
        ] {
            if set {
                return Err(FlowScheduleError::UniPcOption(name));
            }
        }
        let mut schedule = Self::new(cfg.effective_shift(), cfg.num_train_timesteps)?;
        schedule.solver_order = cfg.solver_order;
        Ok(schedule)
    }

    /// Sets the student's own timestep list (e.g. `[1000, 750, 500, 250]`), checked as
    /// [`Self::student_sigmas`] checks it.
    pub fn with_student_timesteps(mut self, list: &[f64]) -> Result<Self, FlowScheduleError> {
        self.student_sigmas(list)?;
        self.student_timesteps = Some(list.to_vec());
        Ok(self)
    }

    pub fn shift(&self) -> f64 {
        self.shift
    }

    /// `T`, the number of training timesteps.
    pub fn train_steps(&self) -> usize {
        self.train_steps
    }

    /// `shift s / (1 + (shift - 1) s)`: keeps 0 and 1, and for a shift above 1 moves every
    /// other sigma up.
    pub fn shifted(&self, sigma: f64) -> f64 {
        self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)
    }

    /// The network's timestep input for a sigma.
    pub fn timestep(&self, sigma: f64) -> f64 {
        sigma * self.train_steps as f64
    }

    /// The teacher's `steps + 1` sigmas, from 1 down to a final 0, as diffusers'
    /// `FlowMatchEulerDiscreteScheduler::set_timesteps` makes them: evenly spaced between 1
    /// and its smallest training sigma, then shifted. That smallest sigma, `shift(1 / T)`, is
    /// already shifted, so the last step lands at `shift(shift(1 / T))` (0.0089 for shift 3)
    /// rather than at `shift(1 / T)`; the teacher was sampled that way, so it is kept.
    pub fn teacher_sigmas(&self, steps: usize) -> Result<Vec<f64>, FlowScheduleError> {
        if steps == 0 {
            return Err(FlowScheduleError::NoSteps);
        }
        let (hi, lo) = (1.0, self.shifted(1.0 / self.train_steps as f64));
        let mut sigmas: Vec<f64> = (0..steps)
            .map(|i| {
                // One step is diffusers' linspace(hi, lo, 1) = [hi].
                let u = if steps == 1 {
                    hi
                } else {
                    hi + (lo - hi) * i as f64 / (steps - 1) as f64
                };
                self.shifted(u)
            })
            .collect();
        sigmas.push(0.0);
        Ok(sigmas)
    }

    /// The UniPC sampler's `steps + 1` sigmas, as `UniPCMultistepScheduler::set_timesteps`
    /// makes them with `use_flow_sigmas`: `steps` points evenly spaced from 1 down to `1 / T`
    /// (exclusive of the last), shifted, the first moved 1e-6 below 1 (its log-SNR would be
    /// infinite), then a final 0.
    pub fn unipc_sigmas(&self, steps: usize) -> Result<Vec<f64>, FlowScheduleError> {
        if steps == 0 {
            return Err(FlowScheduleError::NoSteps);
        }
        let lo = 1.0 / self.train_steps as f64;
        let mut sigmas: Vec<f64> = (0..steps)
            .map(|i| self.shifted(1.0 + (lo - 1.0) * i as f64 / steps as f64))
            .collect();
        if (sigmas[0] - 1.0).abs() < 1e-6 {
            sigmas[0] -= 1e-6;
        }
        sigmas.push(0.0);
        Ok(sigmas)
    }

    /// The sigmas of a student's timesteps, `shift(k / T)` each: `[1000, 750, 500, 250]` at
    /// shift 5 gives 1, 0.9375, 0.8333, 0.625. The list must be non-empty, strictly
    /// decreasing and inside `(0, T]`.
    pub fn student_sigmas(&self, timesteps: &[f64]) -> Result<Vec<f64>, FlowScheduleError> {
        if timesteps.is_empty() {
            return Err(FlowScheduleError::EmptyStudentList);
        }
        let t_max = self.train_steps as f64;
        if let Some(&bad) = timesteps.iter().find(|&&k| !(k > 0.0 && k <= t_max)) {
            return Err(FlowScheduleError::StudentTimestep {
                timestep: bad,
                train_steps: self.train_steps,
            });
        }
        if timesteps.windows(2).any(|w| w[1] >= w[0]) {
            return Err(FlowScheduleError::StudentOrder(timesteps.to_vec()));
        }
        Ok(timesteps.iter().map(|&k| self.shifted(k / t_max)).collect())
    }
}

impl NoiseSchedule for FlowMatchSchedule {
    fn alpha_sigma(&self, t: f32) -> (f32, f32) {
        (1.0 - t, t)
    }

    fn warp(&self, u: f32) -> f32 {
        self.shifted(u as f64) as f32
    }

    /// The student's own list for its step count; otherwise `n` evenly spaced timesteps from
    /// `T` (the default: 4 steps are `[1000, 750, 500, 250]` through the shift).
    fn student_times(&self, n: usize) -> Vec<f32> {
        match &self.student_timesteps {
            Some(list) if list.len() == n => self
                .student_sigmas(list)
                .unwrap_or_default()
                .into_iter()
                .map(|s| s as f32)
                .collect(),
            _ => (0..n)
                .map(|i| self.warp(1.0 - i as f32 / n as f32))
                .collect(),
        }
    }

    /// [`Self::teacher_sigmas`]; empty for 0 steps (the sampler then takes none).
    fn euler_times(&self, n: usize) -> Vec<f32> {
        self.teacher_sigmas(n)
            .unwrap_or_default()
            .into_iter()
            .map(|s| s as f32)
            .collect()
    }

    /// [`Self::unipc_sigmas`], in f32 as diffusers keeps them.
    fn unipc_times(&self, n: usize) -> Vec<f32> {
        self.unipc_sigmas(n)
            .unwrap_or_default()
            .into_iter()
            .map(|s| s as f32)
            .collect()
    }

    /// diffusers' UniPC hands the network `int64(sigma * T)`, a whole timestep.
    fn unipc_network_time(&self, t: f32) -> f32 {
        let steps = self.train_steps as f64;
        ((t as f64 * steps).floor() / steps) as f32
    }

    fn unipc_order(&self) -> usize {
        self.solver_order
    }
}

/// `x - sigma v`: the clean sample a velocity prediction implies.
pub fn x0_from_velocity(x: &Tensor, v: &Tensor, sigma: f64) -> TensorResult<Tensor> {
    x - (v * sigma)?
}

/// [`x0_from_velocity`] with one sigma per batch row.
pub fn x0_from_velocity_rows(x: &Tensor, v: &Tensor, sigmas: &[f32]) -> TensorResult<Tensor> {
    x - v.broadcast_mul(&crate::pipeline::schedule::row_scale(sigmas, v)?)?
}

/// One deterministic Euler step of the flow ODE, `x + (sigma_next - sigma) v`: diffusers'
/// `FlowMatchEulerDiscreteScheduler::step`.
pub fn euler_step(x: &Tensor, v: &Tensor, sigma: f64, sigma_next: f64) -> TensorResult<Tensor> {
    x + (v * (sigma_next - sigma))?
}

/// One DMD-style student step: predict `x0 = x - sigma v`, then re-noise it to `sigma_next`
/// with fresh `noise`, `(1 - sigma_next) x0 + sigma_next noise`. At `sigma_next` = 0 this is
/// the final x0.
pub fn student_step(
    x: &Tensor,
    v: &Tensor,
    sigma: f64,
    sigma_next: f64,
    noise: &Tensor,
) -> TensorResult<Tensor> {
    let x0 = x0_from_velocity(x, v, sigma)?;
    (x0 * (1.0 - sigma_next))? + (noise * sigma_next)?
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use candle_core::Device;
    use serde_json::Value;

    use super::*;

    /// `tests/fixtures/wan/flow-match.reference.json`, written with diffusers by
    /// `tools/parity/wan_fixture.py`. Panics when absent: a parity test must not pass
    /// vacuously.
    fn reference() -> Value {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/wan/flow-match.reference.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}: run tools/parity/wan_fixture.py", path.display()));
        serde_json::from_str(&text).expect("fixture JSON")
    }

    fn floats(v: &Value) -> Vec<f64> {
        v.as_array()
            .expect("array")
            .iter()
            .map(|x| x.as_f64().expect("number"))
            .collect()
    }

    fn matrix(v: &Value) -> Vec<Vec<f64>> {
        v.as_array().expect("rows").iter().map(floats).collect()
    }

    /// The largest `|got - want| / max(|want|, 1e-3)`: relative, with a floor so that the
    /// terminal sigma 0 is compared absolutely.
    fn max_rel(got: &[f64], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len(), "lengths");
        got.iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs() / w.abs().max(1e-3))
            .fold(0.0, f64::max)
    }

    #[test]
    fn wan_teacher_schedule_matches_diffusers() {
        let r = reference();
        let train = r["num_train_timesteps"].as_u64().expect("T") as usize;
        let cases = r["cases"].as_array().expect("cases");
        assert_eq!(cases.len(), 4, "shifts 3 and 5 at 4 and 50 steps");
        for c in cases {
            let shift = c["shift"].as_f64().expect("shift");
            let steps = c["steps"].as_u64().expect("steps") as usize;
            let s = FlowMatchSchedule::new(shift, train).unwrap();
            let sigmas = s.teacher_sigmas(steps).unwrap();
            let timesteps: Vec<f64> = sigmas[..steps].iter().map(|&x| s.timestep(x)).collect();
            let (ds, dt) = (
                max_rel(&sigmas, &floats(&c["sigmas"])),
                max_rel(&timesteps, &floats(&c["timesteps"])),
            );
            eprintln!(
                "shift {shift}, {steps} steps: max rel diff sigmas {ds:.2e}, timesteps {dt:.2e}"
            );
            // diffusers stores f32: the difference is its rounding.
            assert!(
                ds < 1e-6 && dt < 1e-6,
                "shift {shift}, {steps} steps: {ds} {dt}"
            );
            // The trait's f32 times are the same sigmas.
            let times: Vec<f64> = s.euler_times(steps).iter().map(|&t| t as f64).collect();
            assert!(max_rel(&times, &sigmas) < 1e-6);
        }
    }

    #[test]
    fn wan_euler_steps_match_diffusers() -> TensorResult<()> {
        let r = reference();
        let e = &r["euler"];
        let shift = e["shift"].as_f64().expect("shift");
        let steps = e["steps"].as_u64().expect("steps") as usize;
        let s = FlowMatchSchedule::new(shift, 1000).unwrap();
        let sigmas = s.teacher_sigmas(steps).unwrap();
        let dev = Device::Cpu;
        let to_tensor = |m: Vec<Vec<f64>>| -> TensorResult<Tensor> {
            let shape = (m.len(), m[0].len());
            let flat: Vec<f32> = m.concat().iter().map(|&x| x as f32).collect();
            Tensor::from_vec(flat, shape, &dev)
        };
        let mut x = to_tensor(matrix(&e["sample"]))?;
        let v0 = to_tensor(matrix(&e["velocity"]))?;
        let want = e["samples"].as_array().expect("samples");
        assert_eq!(want.len(), steps);
        for (k, w) in want.iter().enumerate() {
            // Step k's velocity is the base one rolled by k along the last axis.
            let n = v0.dim(1)?;
            let r = k % n;
            let v = Tensor::cat(&[v0.narrow(1, n - r, r)?, v0.narrow(1, 0, n - r)?], 1)?;
            // The generic sampler's x0 form of the step must agree with the velocity form.
            let x0 = x0_from_velocity(&x, &v, sigmas[k])?;
            let via_x0 = s.step(&x, &x0, sigmas[k] as f32, sigmas[k + 1] as f32)?;
            x = euler_step(&x, &v, sigmas[k], sigmas[k + 1])?;
            let got: Vec<f64> = x
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|&g| g as f64)
                .collect();
            let want: Vec<f64> = matrix(w).concat();
            let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
            eprintln!("euler step {k}: max abs diff {diff:.2e} (scale {scale:.2e})");
            assert!(diff <= 1e-6 * scale, "step {k}: {diff} (scale {scale})");
            let gap = (via_x0 - &x)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(gap < 1e-5, "step {k}: x0 form differs by {gap}");
        }
        Ok(())
    }

    #[test]
    fn wan_student_timesteps_go_through_the_shift() {
        let s = FlowMatchSchedule::new(5.0, 1000).unwrap();
        let got = s.student_sigmas(&[1000.0, 750.0, 500.0, 250.0]).unwrap();
        let want = [1.0, 15.0 / 16.0, 5.0 / 6.0, 0.625];
        assert!(max_rel(&got, &want) < 1e-12, "{got:?}");
        // Without a list, n steps are the evenly spaced timesteps through the same shift.
        let times: Vec<f64> = s.student_times(4).iter().map(|&t| t as f64).collect();
        assert!(max_rel(&times, &want) < 1e-6, "{times:?}");
        // A student's own list is used for its step count only.
        let own = s
            .clone()
            .with_student_timesteps(&[1000.0, 757.0, 522.0])
            .unwrap();
        let three = own.student_times(3);
        assert!((three[1] as f64 - s.shifted(0.757)).abs() < 1e-6);
        assert_eq!(own.student_times(4), s.student_times(4));
        // Shift 1 is the plain list.
        let plain = FlowMatchSchedule::new(1.0, 1000).unwrap();
        assert_eq!(
            plain.student_sigmas(&[1000.0, 500.0]).unwrap(),
            vec![1.0, 0.5]
        );
    }

    #[test]
    fn wan_student_step_renoises_the_predicted_x0() -> TensorResult<()> {
        let dev = Device::Cpu;
        let s = FlowMatchSchedule::new(3.0, 1000).unwrap();
        let x0 = Tensor::new(&[[0.5f32, -0.25, 1.5]], &dev)?;
        let noise = Tensor::new(&[[1.0f32, 2.0, -0.5]], &dev)?;
        let fresh = Tensor::new(&[[-0.3f32, 0.8, 0.1]], &dev)?;
        let sigma = s.shifted(0.75);
        let x = s.add_noise(&x0, &noise, &[sigma as f32])?;
        // The exact velocity of this sample.
        let v = (&noise - &x0)?;
        let sigma_next = s.shifted(0.5);
        let got = student_step(&x, &v, sigma, sigma_next, &fresh)?;
        let want = s.add_noise(&x0, &fresh, &[sigma_next as f32])?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        // The last step (sigma_next = 0) returns x0; so does an exact Euler step to 0.
        let last = student_step(&x, &v, sigma, 0.0, &fresh)?;
        let end = euler_step(&x, &v, sigma, 0.0)?;
        for t in [last, end] {
            let diff = (t - &x0)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{diff}");
        }
        Ok(())
    }

    #[test]
    fn wan_schedule_rejects_bad_input() {
        use FlowScheduleError as E;
        for shift in [0.0, -3.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                FlowMatchSchedule::new(shift, 1000),
                Err(E::Shift(_))
            ));
        }
        assert_eq!(FlowMatchSchedule::new(3.0, 0), Err(E::NoTrainTimesteps));
        let s = FlowMatchSchedule::new(3.0, 1000).unwrap();
        assert_eq!(s.teacher_sigmas(0), Err(E::NoSteps));
        assert!(s.euler_times(0).is_empty());
        assert_eq!(s.student_sigmas(&[]), Err(E::EmptyStudentList));
        for bad in [[1001.0, 500.0], [1000.0, 0.0], [1000.0, f64::NAN]] {
            assert!(matches!(
                s.student_sigmas(&bad),
                Err(E::StudentTimestep { .. })
            ));
        }
        assert!(matches!(
            s.student_sigmas(&[500.0, 750.0]),
            Err(E::StudentOrder(_))
        ));
        assert!(s.clone().with_student_timesteps(&[750.0, 750.0]).is_err());
        // One step is diffusers' single sigma 1, then 0.
        assert_eq!(s.teacher_sigmas(1).unwrap(), vec![1.0, 0.0]);
        let msg = FlowMatchSchedule::new(-1.0, 1000).unwrap_err().to_string();
        assert!(msg.contains("shift") && msg.contains("-1"), "{msg}");
    }

    #[test]
    fn wan_scheduler_config_reads_either_shift_name() {
        let unipc: FlowSchedulerConfig = serde_json::from_str(
            r#"{"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0,
                "num_train_timesteps": 1000, "use_flow_sigmas": true}"#,
        )
        .unwrap();
        assert_eq!(FlowMatchSchedule::from_config(&unipc).unwrap().shift(), 3.0);
        let euler: FlowSchedulerConfig = serde_json::from_str(r#"{"shift": 5.0}"#).unwrap();
        let s = FlowMatchSchedule::from_config(&euler).unwrap();
        assert_eq!((s.shift(), s.train_steps()), (5.0, 1000));
        let bare: FlowSchedulerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(bare.effective_shift(), 1.0);
        // Options that change the sigmas are refused by name, not ignored.
        for key in ["use_dynamic_shifting", "use_karras_sigmas", "invert_sigmas"] {
            let cfg: FlowSchedulerConfig =
                serde_json::from_str(&format!(r#"{{"shift": 3.0, "{key}": true}}"#)).unwrap();
            let e = FlowMatchSchedule::from_config(&cfg)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
        }
        let cfg: FlowSchedulerConfig =
            serde_json::from_str(r#"{"shift": 3.0, "shift_terminal": 0.1}"#).unwrap();
        assert!(FlowMatchSchedule::from_config(&cfg).is_err());
    }
}
