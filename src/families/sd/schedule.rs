//! The discrete DDPM schedule of an SD scheduler config, seen through the family-agnostic
//! [`NoiseSchedule`]: schedule time `t` in `[0, 1]` maps to the training timestep
//! `round(t T) - 1` (`t = 1` is timestep `T - 1` = 999, `t = 0` the clean sample), so the
//! generic samplers' evenly spaced times are diffusers' "trailing" timesteps: 4 steps =
//! 999/749/499/249, 2 steps = 999/499, 3 steps = 999/666/332.

use crate::pipeline::NoiseSchedule;

/// `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise` with `a` = `alphas_cumprod`.
#[derive(Debug, Clone, PartialEq)]
pub struct DdpmSchedule {
    alphas_cumprod: Vec<f64>,
    /// A student's own descending timestep list, used when a request asks for exactly that
    /// many steps (e.g. DMD2's `[999, 749, 499, 249]`); other step counts use trailing spacing.
    student_timesteps: Option<Vec<usize>>,
}

impl DdpmSchedule {
    /// `alphas_cumprod` must be non-empty and every listed timestep inside it (the callers
    /// check the manifest's list against the scheduler config first).
    pub fn new(alphas_cumprod: Vec<f64>, student_timesteps: Option<Vec<usize>>) -> Self {
        debug_assert!(!alphas_cumprod.is_empty());
        Self {
            alphas_cumprod,
            student_timesteps,
        }
    }

    /// `T`, the number of training timesteps.
    pub fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The training timestep of schedule time `t`; `None` is the clean end (`t` below half a
    /// step).
    pub fn timestep(&self, t: f32) -> Option<usize> {
        let n = self.train_steps();
        let k = (t.clamp(0.0, 1.0) as f64 * n as f64).round() as usize;
        k.checked_sub(1)
    }

    /// The schedule time of training timestep `k` (the inverse of [`Self::timestep`]).
    pub fn time_of(&self, k: usize) -> f32 {
        ((k + 1) as f64 / self.train_steps() as f64) as f32
    }

    /// `alphas_cumprod[k]`.
    pub fn alpha_bar(&self, k: usize) -> f64 {
        self.alphas_cumprod[k.min(self.train_steps() - 1)]
    }

    /// The timesteps `n` student (or ancestral) steps visit.
    pub fn student_timesteps(&self, n: usize) -> Vec<usize> {
        self.student_times(n)
            .into_iter()
            .filter_map(|t| self.timestep(t))
            .collect()
    }
}

impl NoiseSchedule for DdpmSchedule {
    fn alpha_sigma(&self, t: f32) -> (f32, f32) {
        match self.timestep(t) {
            None => (1.0, 0.0),
            Some(k) => {
                let a = self.alpha_bar(k);
                (a.sqrt() as f32, (1.0 - a).sqrt() as f32)
            }
        }
    }

    fn student_times(&self, n: usize) -> Vec<f32> {
        match &self.student_timesteps {
            Some(list) if list.len() == n => list.iter().map(|&k| self.time_of(k)).collect(),
            _ => (0..n).map(|i| 1.0 - i as f32 / n as f32).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::sd::layout::SchedulerConfig;

    fn sd_schedule(list: Option<Vec<usize>>) -> DdpmSchedule {
        let cfg: SchedulerConfig = serde_json::from_str(
            r#"{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}"#,
        )
        .unwrap();
        DdpmSchedule::new(cfg.alphas_cumprod(), list)
    }

    #[test]
    fn times_map_to_diffusers_trailing_timesteps() {
        let s = sd_schedule(None);
        assert_eq!(s.student_timesteps(4), vec![999, 749, 499, 249]);
        assert_eq!(s.student_timesteps(1), vec![999]);
        assert_eq!(s.student_timesteps(2), vec![999, 499]);
        // np.round(np.arange(1000, 0, -1000 / 3)) - 1
        assert_eq!(s.student_timesteps(3), vec![999, 666, 332]);
        let euler: Vec<Option<usize>> = s.euler_times(4).iter().map(|&t| s.timestep(t)).collect();
        assert_eq!(
            euler,
            vec![Some(999), Some(749), Some(499), Some(249), None]
        );
        for k in [0, 1, 249, 500, 998, 999] {
            assert_eq!(s.timestep(s.time_of(k)), Some(k));
        }
        assert_eq!(s.alpha_sigma(0.0), (1.0, 0.0));
        let (a, sg) = s.alpha_sigma(1.0);
        assert!((a as f64 - s.alpha_bar(999).sqrt()).abs() < 1e-7);
        assert!(((a * a + sg * sg) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_student_list_is_used_for_its_own_step_count_only() {
        let s = sd_schedule(Some(vec![999, 874, 749, 624]));
        assert_eq!(s.student_timesteps(4), vec![999, 874, 749, 624]);
        assert_eq!(s.student_timesteps(2), vec![999, 499]);
    }
}
