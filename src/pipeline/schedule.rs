//! Noise schedules as `x_t = alpha(t) x0 + sigma(t) noise`, with `t` in `[0, 1]`.

use candle_core::{Result, Tensor};

pub trait NoiseSchedule {
    /// `(alpha, sigma)` at time `t`.
    fn alpha_sigma(&self, t: f32) -> (f32, f32);

    /// The time actually used for a nominal step position `u` in `[0, 1]` (e.g. a flow shift).
    fn warp(&self, u: f32) -> f32 {
        u
    }

    /// Few-step student times: `n` evenly spaced nominal times from 1 down, e.g. 4 steps =
    /// 1, 0.75, 0.5, 0.25 (999/749/499/249 for a 1000-step DDPM), then warped.
    fn student_times(&self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| self.warp(1.0 - i as f32 / n as f32))
            .collect()
    }

    /// Teacher times for `n` Euler/DDIM steps: `n + 1` points from 1 to 0.
    fn euler_times(&self, n: usize) -> Vec<f32> {
        (0..=n)
            .map(|i| self.warp(1.0 - i as f32 / n as f32))
            .collect()
    }

    /// Times for `n` UniPC steps: `n + 1` points from 1 to 0 (the Euler grid, its first point
    /// moved just below 1 where the signal vanishes there, so that the log-SNR is finite).
    fn unipc_times(&self, n: usize) -> Vec<f32> {
        let mut times = self.euler_times(n);
        if let Some(first) = times.first_mut() {
            if self.alpha_sigma(*first).0 <= 0.0 {
                *first -= 1e-6;
            }
        }
        times
    }

    /// The time the network is evaluated at for the UniPC time `t` (the schedule's own
    /// rounding of it, if any); the sampler still uses `t` itself.
    fn unipc_network_time(&self, t: f32) -> f32 {
        t
    }

    /// The UniPC solver's order.
    fn unipc_order(&self) -> usize {
        2
    }

    /// `alpha(t) x0 + sigma(t) noise` with one `t` per batch row.
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &[f32]) -> Result<Tensor> {
        let (a, s): (Vec<f32>, Vec<f32>) = t.iter().map(|&t| self.alpha_sigma(t)).unzip();
        let a = row_scale(&a, x0)?;
        let s = row_scale(&s, x0)?;
        x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?
    }

    /// One deterministic DDIM/Euler step from `x_t` to `t_next` given the x0 estimate.
    fn step(&self, x_t: &Tensor, x0: &Tensor, t: f32, t_next: f32) -> Result<Tensor> {
        let (a, s) = self.alpha_sigma(t);
        let (an, sn) = self.alpha_sigma(t_next);
        if s <= 0.0 {
            return Ok(x0.clone());
        }
        // eps_hat = (x_t - a x0) / s; x_next = an x0 + sn eps_hat.
        let eps = ((x_t - (x0 * a as f64)?)? / s as f64)?;
        (x0 * an as f64)? + (eps * sn as f64)?
    }

    /// One Euler ancestral step from `x_t` to `t_next`. In the variance-exploding view
    /// (`sigma = s / a`) it adds `sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 -
    /// sigma_next^2) / sigma^2))` of fresh `noise` and keeps `sigma_down = sqrt(sigma_next^2 -
    /// sigma_up^2)` of the predicted noise: k-diffusion's `get_ancestral_step`, and at `eta = 1`
    /// diffusers' `EulerAncestralDiscreteScheduler`. Back in this schedule's scale that is
    /// `an x0 + sn (kept eps_hat + fresh noise)` with `fresh = min(1, eta sqrt(1 - r^2))`,
    /// `kept = sqrt(1 - fresh^2)` and `r = sigma_next / sigma`: DDIM at `eta = 0`, the
    /// student's fresh re-noising once `eta sqrt(1 - r^2)` reaches 1.
    fn ancestral_step(
        &self,
        x_t: &Tensor,
        x0: &Tensor,
        (t, t_next): (f32, f32),
        noise: &Tensor,
        eta: f32,
    ) -> Result<Tensor> {
        let (a, s) = self.alpha_sigma(t);
        let (an, sn) = self.alpha_sigma(t_next);
        if s <= 0.0 || an <= 0.0 {
            return Ok(x0.clone());
        }
        let r = ((a as f64 * sn as f64) / (s as f64 * an as f64)).clamp(0.0, 1.0);
        let fresh = (f64::from(eta) * (1.0 - r * r).sqrt()).min(1.0);
        let kept = (1.0 - fresh * fresh).sqrt();
        let eps = ((x_t - (x0 * a as f64)?)? / s as f64)?;
        let kept = (eps * (sn as f64 * kept))?;
        let fresh = (noise * (sn as f64 * fresh))?;
        ((x0 * an as f64)? + kept)? + fresh
    }
}

/// A `[B, 1, 1, ...]` tensor of per-row factors shaped to broadcast against `like`.
pub fn row_scale(values: &[f32], like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1usize; like.rank()];
    shape[0] = values.len();
    Tensor::from_slice(values, shape, like.device())?.to_dtype(like.dtype())
}

/// Rectified flow: `x_t = (1 - t) x0 + t noise`; the network predicts `v = noise - x0`.
/// `shift` > 1 spends more steps at high noise (SD3/Wan style): `t' = s t / (1 + (s - 1) t)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowSchedule {
    pub shift: f32,
}

impl Default for FlowSchedule {
    fn default() -> Self {
        Self { shift: 1.0 }
    }
}

impl NoiseSchedule for FlowSchedule {
    fn alpha_sigma(&self, t: f32) -> (f32, f32) {
        (1.0 - t, t)
    }

    fn warp(&self, u: f32) -> f32 {
        self.shift * u / (1.0 + (self.shift - 1.0) * u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn student_times_match_the_ddpm_convention() {
        let s = FlowSchedule::default();
        assert_eq!(s.student_times(4), vec![1.0, 0.75, 0.5, 0.25]);
        assert_eq!(s.student_times(1), vec![1.0]);
        assert_eq!(s.euler_times(2), vec![1.0, 0.5, 0.0]);
    }

    #[test]
    fn shift_keeps_endpoints_and_moves_midpoints_up() {
        let s = FlowSchedule { shift: 3.0 };
        assert_eq!(s.warp(0.0), 0.0);
        assert!((s.warp(1.0) - 1.0).abs() < 1e-6);
        assert!(s.warp(0.5) > 0.5);
    }

    #[test]
    fn the_ancestral_step_matches_the_variance_exploding_form() -> Result<()> {
        // k-diffusion's `get_ancestral_step` + Euler step on x_ve = x / a with sigma = s / a
        // (at eta = 1 diffusers' EulerAncestralDiscreteScheduler).
        let s = FlowSchedule::default();
        let dev = candle_core::Device::Cpu;
        let (t, tn) = (0.9f32, 0.4f32);
        let x0 = Tensor::new(&[[0.5f32, -0.25, 1.5]], &dev)?;
        let xt = Tensor::new(&[[0.1f32, 2.0, -1.0]], &dev)?;
        let z = Tensor::new(&[[0.3f32, -0.7, 1.1]], &dev)?;
        let max_diff =
            |a: Tensor, b: Tensor| -> Result<f32> { (a - b)?.abs()?.max_all()?.to_scalar::<f32>() };
        let (a, sg) = s.alpha_sigma(t);
        let (an, sn) = s.alpha_sigma(tn);
        let (sig, sig_n) = ((sg / a) as f64, (sn / an) as f64);
        for eta in [1.0f32, 0.5, 0.0] {
            let got = s.ancestral_step(&xt, &x0, (t, tn), &z, eta)?;
            let up = (eta as f64
                * (sig_n * sig_n * (sig * sig - sig_n * sig_n) / (sig * sig)).sqrt())
            .min(sig_n);
            let down = (sig_n * sig_n - up * up).sqrt();
            let x_ve = (&xt / a as f64)?;
            let d = ((&x_ve - &x0)? / sig)?;
            let next_ve = ((x_ve + (d * (down - sig))?)? + (&z * up)?)?;
            let want = (next_ve * an as f64)?;
            let diff = max_diff(got, want)?;
            assert!(diff < 1e-5, "eta {eta}: {diff}");
        }
        // eta = 0 is the deterministic DDIM step; a large eta re-noises x0 afresh, as the
        // student sampler does.
        let ddim = s.step(&xt, &x0, t, tn)?;
        assert!(max_diff(s.ancestral_step(&xt, &x0, (t, tn), &z, 0.0)?, ddim)? < 1e-6);
        let fresh = s.add_noise(&x0, &z, &[tn])?;
        assert!(max_diff(s.ancestral_step(&xt, &x0, (t, tn), &z, 10.0)?, fresh)? < 1e-6);
        // Landing on t = 0 returns x0; the step's noise has the target time's sigma.
        let end = s.ancestral_step(&xt, &x0, (t, 0.0), &z, 1.0)?;
        assert_eq!(end.to_vec2::<f32>()?, x0.to_vec2::<f32>()?);
        Ok(())
    }

    #[test]
    fn an_exact_x0_makes_the_step_land_on_the_target_time() -> Result<()> {
        let s = FlowSchedule::default();
        let dev = candle_core::Device::Cpu;
        let x0 = Tensor::new(&[[0.5f32, -0.25]], &dev)?;
        let n = Tensor::new(&[[1.0f32, 2.0]], &dev)?;
        let xt = s.add_noise(&x0, &n, &[0.8])?;
        let next = s.step(&xt, &x0, 0.8, 0.3)?;
        let want = s.add_noise(&x0, &n, &[0.3])?;
        let diff = (next - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
