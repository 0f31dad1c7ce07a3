//! The per-sample math of DMD2 and AMD (AMD.md sections 3 and 4). Tensors are x0-space
//! `[B, ...]`; group statistics are computed on the host from `[P * K]` prompt-major rewards.

use candle_core::{Result, Tensor};

use crate::pipeline::schedule::row_scale;

/// Mean over every dimension but the first: `[B, ...]` -> `[B]`.
pub fn per_sample_mean(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(1)?.mean(1)
}

/// Broadcasts a `[B]` tensor against `like` (`[B, 1, 1, ...]`).
fn rows(v: &Tensor, like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1usize; like.rank()];
    shape[0] = v.dim(0)?;
    v.reshape(shape)
}

/// Sets NaN and infinite entries to zero (a sample whose normalizer vanished must not poison
/// the batch).
pub fn zero_non_finite(x: &Tensor) -> Result<Tensor> {
    let finite = x.abs()?.le(f32::MAX as f64)?;
    finite.where_cond(x, &x.zeros_like()?)
}

/// The three teacher predictions at the same noisy input `x_tau`, as x0 estimates.
pub struct TeacherPredictions<'a> {
    /// Real teacher, conditional.
    pub cond: &'a Tensor,
    /// Real teacher, unconditional (empty prompt).
    pub uncond: &'a Tensor,
    /// Fake teacher (critic), conditional.
    pub fake: &'a Tensor,
}

/// Dynamic Score Adaptation factors, `alpha = 1 + s a`, `beta = 1 - s a` per sample.
pub struct Adaptation {
    pub alpha: Vec<f32>,
    pub beta: Vec<f32>,
}

impl Adaptation {
    pub fn new(s: f32, advantages: &[f32]) -> Self {
        Self {
            alpha: advantages.iter().map(|a| 1.0 + s * a).collect(),
            beta: advantages.iter().map(|a| 1.0 - s * a).collect(),
        }
    }
}

/// `xcfg = xu + w (xc - xu)`, with each sample's own `w` (a guidance interval gives the
/// samples outside it `w = 1`).
pub fn cfg_target(p: &TeacherPredictions, w: &[f32]) -> Result<Tensor> {
    p.uncond + (p.cond - p.uncond)?.broadcast_mul(&row_scale(w, p.cond)?)?
}

/// The generator's update direction `H`, so that the loss is `0.5 |x - sg(x + H)|^2`.
///
/// Without adaptation this is DMD2's `-g = (xcfg - xf) / mean|x - xcfg|`. With it, AMD's
/// `H = (beta d_dm + alpha (w - 1) d_ca) / mean|x - xcfg|` (Eq. 10, 13), computed as DMD2's
/// direction plus `(beta - 1) d_dm + (alpha - 1)(w - 1) d_ca`: the same value, and exactly
/// DMD2's bits when `s = 0` (the invariant AMD.md section 4 asks for).
pub fn generator_direction(
    x: &Tensor,
    p: &TeacherPredictions,
    w: &[f32],
    adapt: Option<&Adaptation>,
) -> Result<Tensor> {
    let xcfg = cfg_target(p, w)?;
    let mut h = (&xcfg - p.fake)?;
    if let Some(a) = adapt {
        let beta_m1: Vec<f32> = a.beta.iter().map(|b| b - 1.0).collect();
        let alpha_m1: Vec<f32> = a
            .alpha
            .iter()
            .zip(w)
            .map(|(a, w)| (a - 1.0) * (w - 1.0))
            .collect();
        let beta_m1 = row_scale(&beta_m1, x)?;
        let alpha_m1 = row_scale(&alpha_m1, x)?;
        let d_dm = (p.cond - p.fake)?;
        let d_ca = (p.cond - p.uncond)?;
        h = ((h + d_dm.broadcast_mul(&beta_m1)?)? + d_ca.broadcast_mul(&alpha_m1)?)?;
    }
    let norm = per_sample_mean(&(x - &xcfg)?.abs()?)?;
    zero_non_finite(&h.broadcast_div(&rows(&norm, x)?)?)
}

/// `L_G = 0.5 mean((x - sg(x + H))^2)`: its gradient moves `x` along `H`.
pub fn generator_loss(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    let target = (x.detach() + h.detach())?;
    (x - target)?.sqr()?.mean_all()? * 0.5
}

/// Group-normalized, clipped advantages (Eq. 12): `clip((r - mean_g) / (max(std_g, floor) +
/// eps), -1, 1)` over groups of `k` consecutive samples.
pub fn group_advantages(
    rewards: &[f32],
    k: usize,
    std_floor: f32,
    eps: f32,
    clip: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(k.max(1)) {
        let n = g.len() as f32;
        let mean = g.iter().sum::<f32>() / n;
        let var = g.iter().map(|r| (r - mean).powi(2)).sum::<f32>() / n;
        let denom = var.sqrt().max(std_floor) + eps;
        out.extend(g.iter().map(|r| ((r - mean) / denom).clamp(-clip, clip)));
    }
    out
}

/// Repulsive Landscape Sharpening weights: `1 - s_f a`, renormalized to mean 1.
pub fn rls_weights(advantages: &[f32], s_f: f32) -> Vec<f32> {
    let raw: Vec<f32> = advantages.iter().map(|a| 1.0 - s_f * a).collect();
    let mean = raw.iter().sum::<f32>() / raw.len().max(1) as f32;
    raw.iter().map(|w| w / mean).collect()
}

/// Per-sample denoising loss of the critic, `[B]`, mean over each sample's elements.
pub fn per_sample_mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    per_sample_mean(&(pred - target)?.sqr()?)
}

/// Running mean and variance of the reward (an exponential average), whose std sets the floor
/// of the group std.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunningStats {
    pub mean: f64,
    pub var: f64,
    pub seen: u64,
}

impl RunningStats {
    pub fn new() -> Self {
        Self {
            mean: 0.0,
            var: 0.0,
            seen: 0,
        }
    }

    /// Folds in a batch; the first batch initializes the statistics.
    pub fn update(&mut self, xs: &[f32], decay: f64) {
        if xs.is_empty() {
            return;
        }
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        if self.seen == 0 {
            (self.mean, self.var) = (mean, var);
        } else {
            self.mean = decay * self.mean + (1.0 - decay) * mean;
            self.var = decay * self.var + (1.0 - decay) * var;
        }
        self.seen += xs.len() as u64;
    }

    pub fn std(&self) -> f64 {
        self.var.sqrt()
    }
}

impl Default for RunningStats {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, (1, v.len()), &Device::Cpu).unwrap()
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn dm_direction_matches_a_hand_computation() -> Result<()> {
        // x = [1, 2], xc = [0, 0], xu = [1, 1], xf = [2, 0], w = 3.
        // xcfg = xu + 3 (xc - xu) = [-2, -2]; mean|x - xcfg| = (3 + 4) / 2 = 3.5.
        // H = (xcfg - xf) / 3.5 = [-4, -2] / 3.5.
        let (x, xc, xu, xf) = (t(&[1., 2.]), t(&[0., 0.]), t(&[1., 1.]), t(&[2., 0.]));
        let p = TeacherPredictions {
            cond: &xc,
            uncond: &xu,
            fake: &xf,
        };
        let h = generator_direction(&x, &p, &[3.0], None)?;
        close(&h.flatten_all()?.to_vec1()?, &[-4.0 / 3.5, -2.0 / 3.5]);
        Ok(())
    }

    #[test]
    fn amd_direction_matches_eq_13_by_hand() -> Result<()> {
        // Same inputs, a = 0.5, s = 0.5: alpha = 1.25, beta = 0.75.
        // d_dm = xc - xf = [-2, 0]; d_ca = xc - xu = [-1, -1]; (w - 1) = 2.
        // H = (0.75 [-2, 0] + 1.25 * 2 [-1, -1]) / 3.5 = [-4, -2.5] / 3.5.
        let (x, xc, xu, xf) = (t(&[1., 2.]), t(&[0., 0.]), t(&[1., 1.]), t(&[2., 0.]));
        let p = TeacherPredictions {
            cond: &xc,
            uncond: &xu,
            fake: &xf,
        };
        let a = Adaptation::new(0.5, &[0.5]);
        let h = generator_direction(&x, &p, &[3.0], Some(&a))?;
        close(&h.flatten_all()?.to_vec1()?, &[-4.0 / 3.5, -2.5 / 3.5]);
        // s = 0 is DMD2, bit for bit.
        let zero = Adaptation::new(0.0, &[0.7]);
        let h0 = generator_direction(&x, &p, &[3.0], Some(&zero))?;
        let hd = generator_direction(&x, &p, &[3.0], None)?;
        assert_eq!(
            h0.flatten_all()?.to_vec1::<f32>()?,
            hd.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn each_sample_is_guided_by_its_own_scale() -> Result<()> {
        // Two samples with the inputs above; the second is outside a guidance interval
        // (w = 1), so its target is the conditional prediction alone: H = (xc - xf) / mean|x - xc|.
        let two = |v: &[f32]| Tensor::from_slice(&[v, v].concat(), (2, v.len()), &Device::Cpu);
        let (x, xc, xu, xf) = (
            two(&[1., 2.])?,
            two(&[0., 0.])?,
            two(&[1., 1.])?,
            two(&[2., 0.])?,
        );
        let p = TeacherPredictions {
            cond: &xc,
            uncond: &xu,
            fake: &xf,
        };
        let h = generator_direction(&x, &p, &[3.0, 1.0], None)?.to_vec2::<f32>()?;
        close(&h[0], &[-4.0 / 3.5, -2.0 / 3.5]);
        close(&h[1], &[-2.0 / 1.5, 0.0]);
        // With adaptation, the CFG term (w - 1) d_ca vanishes for the unguided sample.
        let a = Adaptation::new(0.5, &[0.5, 0.5]);
        let h = generator_direction(&x, &p, &[3.0, 1.0], Some(&a))?.to_vec2::<f32>()?;
        close(&h[0], &[-4.0 / 3.5, -2.5 / 3.5]);
        close(&h[1], &[0.75 * -2.0 / 1.5, 0.0]);
        Ok(())
    }

    #[test]
    fn a_vanished_normalizer_gives_a_zero_direction() -> Result<()> {
        // x == xcfg: the normalizer is 0 and 0/0 must become 0, not NaN.
        let (x, xc, xu, xf) = (t(&[1., 1.]), t(&[1., 1.]), t(&[1., 1.]), t(&[2., 0.]));
        let p = TeacherPredictions {
            cond: &xc,
            uncond: &xu,
            fake: &xf,
        };
        let h = generator_direction(&x, &p, &[2.0], None)?;
        assert_eq!(h.flatten_all()?.to_vec1::<f32>()?, vec![0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn the_generator_loss_moves_x_along_h() -> Result<()> {
        let x = Var::new(&[[1.0f32, 2.0]], &Device::Cpu)?;
        let h = t(&[0.5, -1.0]);
        let loss = generator_loss(x.as_tensor(), &h)?;
        // 0.5 * mean(H^2) = 0.5 * (0.25 + 1) / 2.
        assert!((loss.to_scalar::<f32>()? - 0.3125).abs() < 1e-6);
        let g = loss
            .backward()?
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        // d/dx = -(H) / numel.
        close(&g, &[-0.25, 0.5]);
        Ok(())
    }

    #[test]
    fn advantages_are_group_normalized_floored_and_clipped() {
        // Group 1: [0, 1] -> mean 0.5, std 0.5 -> [-1, 1].
        // Group 2: [0.5, 0.5] -> std 0 floored at 0.1 -> [0, 0].
        // Group 3: [0, 0.1, 0.2, 0.3] with floor 1 -> (r - 0.15) / 1 -> [-0.15, -0.05, 0.05, 0.15]
        let a = group_advantages(&[0.0, 1.0, 0.5, 0.5], 2, 0.1, 0.0, 1.0);
        close(&a, &[-1.0, 1.0, 0.0, 0.0]);
        let b = group_advantages(&[0.0, 0.1, 0.2, 0.3], 4, 1.0, 0.0, 1.0);
        close(&b, &[-0.15, -0.05, 0.05, 0.15]);
        // A lone outlier in a group of 4 exceeds one std and is clipped to 1.
        let c = group_advantages(&[0.0, 0.0, 0.0, 1.0], 4, 0.0, 0.0, 1.0);
        close(&c[3..], &[1.0]);
    }

    #[test]
    fn rls_weights_favour_low_reward_samples_and_average_one() {
        // 1 - 0.5 a for a = [-1, 1, 0, 0] = [1.5, 0.5, 1, 1]: mean 1 already.
        close(
            &rls_weights(&[-1.0, 1.0, 0.0, 0.0], 0.5),
            &[1.5, 0.5, 1.0, 1.0],
        );
        // a = [1, 1] -> raw [0.5, 0.5] -> renormalized [1, 1].
        close(&rls_weights(&[1.0, 1.0], 0.5), &[1.0, 1.0]);
        assert_eq!(rls_weights(&[0.3, -0.9], 0.0), vec![1.0, 1.0]);
    }

    #[test]
    fn running_stats_start_from_the_first_batch() {
        let mut s = RunningStats::new();
        s.update(&[0.0, 1.0], 0.9);
        assert!((s.mean - 0.5).abs() < 1e-12 && (s.std() - 0.5).abs() < 1e-12);
        s.update(&[1.0, 1.0], 0.9);
        assert!((s.mean - 0.55).abs() < 1e-12);
    }
}
