//! The UniPC multistep solver (Zhao et al., 2023) as diffusers' `UniPCMultistepScheduler`
//! runs it with its defaults, which Wan2.1 ships: data prediction (`predict_x0`), the `bh2`
//! variant, `lower_order_final`, the corrector on every step. Each step first corrects the
//! current sample with the new x0 estimate (UniC), then predicts the next one from the last
//! `order` estimates (UniP), in log-SNR `lambda = ln(alpha / sigma)`.
//!
//! It works on any [`NoiseSchedule`] (its `alpha_sigma`), over the times of
//! [`NoiseSchedule::unipc_times`]; the coefficients are computed in f64.

use candle_core::{Result, Tensor};

use super::NoiseSchedule;

/// The solver's state across one sampling run.
pub struct UniPc {
    /// The solver order (diffusers' `solver_order`; Wan: 2).
    order: usize,
    times: Vec<f32>,
    /// The x0 estimates of the last `order` steps, oldest first.
    outputs: Vec<Tensor>,
    /// The sample the last predictor started from (what the next corrector corrects).
    last_sample: Option<Tensor>,
    /// Steps taken, capped at `order` (the warm-up: step `i` uses at most `i + 1` estimates).
    lower_order_nums: usize,
    /// The order of the last predictor, which the next corrector uses.
    this_order: usize,
}

impl UniPc {
    /// A solver of `order` 1 to 3 over `times` (`steps + 1` points, the last 0).
    pub fn new(order: usize, times: Vec<f32>) -> Result<Self> {
        if !(1..=3).contains(&order) {
            candle_core::bail!("UniPC solver order {order} is not in 1..=3");
        }
        Ok(Self {
            order,
            times,
            outputs: Vec::new(),
            last_sample: None,
            lower_order_nums: 0,
            this_order: 1,
        })
    }

    /// Step `i`: `x` is the sample at `times[i]` and `x0` the model's estimate there. Returns
    /// the sample at `times[i + 1]` (the last step's is the final sample).
    pub fn step(
        &mut self,
        schedule: &dyn NoiseSchedule,
        i: usize,
        x: &Tensor,
        x0: &Tensor,
    ) -> Result<Tensor> {
        let steps = self.times.len() - 1;
        let lambda = |t: f32| {
            let (a, s) = schedule.alpha_sigma(t);
            (a as f64).ln() - (s as f64).ln()
        };
        let x = match (&self.last_sample, i) {
            (Some(last), 1..) => self.correct(schedule, &lambda, i, last, x0)?,
            _ => x.clone(),
        };
        if self.outputs.len() == self.order {
            self.outputs.remove(0);
        }
        self.outputs.push(x0.clone());
        self.this_order = self.order.min(steps - i).min(self.lower_order_nums + 1);
        self.last_sample = Some(x.clone());
        let next = self.predict(schedule, &lambda, i, &x)?;
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
        Ok(next)
    }

    /// Keeps the rows at positions `idx` of every tensor the solver holds.
    pub fn select_rows(&mut self, idx: &Tensor) -> Result<()> {
        for t in self.outputs.iter_mut().chain(self.last_sample.as_mut()) {
            *t = t.index_select(idx, 0)?;
        }
        Ok(())
    }

    /// UniP: `x` at `times[i]` to `times[i + 1]` with the estimates so far.
    fn predict(
        &self,
        schedule: &dyn NoiseSchedule,
        lambda: &dyn Fn(f32) -> f64,
        i: usize,
        x: &Tensor,
    ) -> Result<Tensor> {
        let order = self.this_order;
        let (t, s0) = (self.times[i + 1], self.times[i]);
        // Earlier estimates, newest first, at times[i - 1], times[i - 2], ...
        let earlier: Vec<(f32, &Tensor)> = (1..order)
            .map(|k| (self.times[i - k], &self.outputs[self.outputs.len() - 1 - k]))
            .collect();
        let c = Coefficients::new(lambda, t, s0, &earlier, order);
        let rhos = match earlier.len() {
            0 => Vec::new(),
            // diffusers fixes the second-order predictor's weight at 1/2.
            1 => vec![0.5],
            n => solve(&c.r, &c.b, n)?,
        };
        let m0 = self.outputs.last().expect("an estimate was pushed");
        let res = weighted_differences(&c.d1s, &rhos, m0)?;
        self.update(schedule, &c, t, s0, x, m0, res)
    }

    /// UniC: corrects `x` (at `times[i]`, predicted from `last` at `times[i - 1]`) with the
    /// new estimate `x0` at `times[i]`.
    fn correct(
        &self,
        schedule: &dyn NoiseSchedule,
        lambda: &dyn Fn(f32) -> f64,
        i: usize,
        last: &Tensor,
        x0: &Tensor,
    ) -> Result<Tensor> {
        let order = self.this_order;
        let (t, s0) = (self.times[i], self.times[i - 1]);
        let earlier: Vec<(f32, &Tensor)> = (1..order)
            .map(|k| {
                (
                    self.times[i - 1 - k],
                    &self.outputs[self.outputs.len() - 1 - k],
                )
            })
            .collect();
        let c = Coefficients::new(lambda, t, s0, &earlier, order);
        let rhos = match order {
            1 => vec![0.5],
            n => solve(&c.r, &c.b, n)?,
        };
        let m0 = self
            .outputs
            .last()
            .expect("the previous step pushed an estimate");
        let (last_rho, rest) = rhos.split_last().expect("at least one weight");
        let mut res = (x0 - m0)? * *last_rho;
        if let Some(earlier) = weighted_differences(&c.d1s, rest, m0)? {
            res = res? + earlier;
        }
        self.update(schedule, &c, t, s0, last, m0, Some(res?))
    }

    /// `sigma_t / sigma_s0 x - alpha_t (e^-h - 1) m0 - alpha_t B(h) res`, where `bh2`'s
    /// `B(h)` is that same `e^-h - 1`.
    #[allow(clippy::too_many_arguments)]
    fn update(
        &self,
        schedule: &dyn NoiseSchedule,
        c: &Coefficients,
        t: f32,
        s0: f32,
        x: &Tensor,
        m0: &Tensor,
        res: Option<Tensor>,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = schedule.alpha_sigma(t);
        let (_, sigma_s0) = schedule.alpha_sigma(s0);
        let (alpha_t, ratio) = (alpha_t as f64, sigma_t as f64 / sigma_s0 as f64);
        let base = ((x * ratio)? - (m0 * (alpha_t * c.h_phi_1))?)?;
        match res {
            Some(res) => base - (res * (alpha_t * c.h_phi_1))?,
            None => Ok(base),
        }
    }
}

/// `sum_k rhos[k] D1s[k]`, or `None` without earlier estimates.
fn weighted_differences(
    d1s: &[(f64, &Tensor)],
    rhos: &[f64],
    m0: &Tensor,
) -> Result<Option<Tensor>> {
    let mut acc: Option<Tensor> = None;
    for (&(rk, m), &rho) in d1s.iter().zip(rhos) {
        // D1 = (m_k - m0) / r_k.
        let term = ((m - m0)? * (rho / rk))?;
        acc = Some(match acc {
            Some(a) => (a + term)?,
            None => term,
        });
    }
    Ok(acc)
}

/// The scalars of one UniP or UniC update (diffusers' `multistep_uni_*_bh_update`).
struct Coefficients<'a> {
    /// `e^{-h} - 1` (`h_phi_1` with `hh = -h`), which is also `bh2`'s `B(h)`.
    h_phi_1: f64,
    /// `R[p][k] = r_k^p` for `p < order`, the last `r` being 1.
    r: Vec<Vec<f64>>,
    b: Vec<f64>,
    /// `(r_k, m_k)` of the earlier estimates.
    d1s: Vec<(f64, &'a Tensor)>,
}

impl<'a> Coefficients<'a> {
    fn new(
        lambda: &dyn Fn(f32) -> f64,
        t: f32,
        s0: f32,
        earlier: &[(f32, &'a Tensor)],
        order: usize,
    ) -> Self {
        let (lambda_t, lambda_s0) = (lambda(t), lambda(s0));
        let h = lambda_t - lambda_s0;
        let d1s: Vec<(f64, &Tensor)> = earlier
            .iter()
            .map(|&(si, m)| ((lambda(si) - lambda_s0) / h, m))
            .collect();
        let mut rks: Vec<f64> = d1s.iter().map(|&(r, _)| r).collect();
        rks.push(1.0);
        let hh = -h;
        // bh2: B(h) = e^{-h} - 1 = h_phi_1.
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let (mut r, mut b) = (Vec::new(), Vec::new());
        for p in 1..=order {
            r.push(rks.iter().map(|rk| rk.powi(p as i32 - 1)).collect());
            b.push(h_phi_k * factorial / h_phi_1);
            factorial *= (p + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Self { h_phi_1, r, b, d1s }
    }
}

/// Solves the leading `n x n` block of `r` against `b` (Gaussian elimination with partial
/// pivoting; `n` is at most 3).
fn solve(r: &[Vec<f64>], b: &[f64], n: usize) -> Result<Vec<f64>> {
    let mut a: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row = r[i][..n].to_vec();
            row.push(b[i]);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))
            .expect("a non-empty range");
        if a[pivot][col].abs() < 1e-12 || !a[pivot][col].is_finite() {
            candle_core::bail!("UniPC: a singular order-{n} system (repeated times?)");
        }
        a.swap(col, pivot);
        let (top, rest) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for row in rest.iter_mut().take(n - col - 1) {
            let f = row[col] / pivot_row[col];
            for (v, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *v -= f * p;
            }
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let tail: f64 = (i + 1..n).map(|k| a[i][k] * x[k]).sum();
        x[i] = (a[i][n] - tail) / a[i][i];
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose x0 estimate never changes is followed exactly: every order lands on
    /// it, on the rectified-flow grid whose first time had to move below 1.
    #[test]
    fn a_constant_estimate_is_where_every_order_lands() -> Result<()> {
        use crate::pipeline::FlowSchedule;
        let dev = candle_core::Device::Cpu;
        let schedule = FlowSchedule::default();
        let times = schedule.unipc_times(5);
        assert!(times[0] < 1.0 && times[0] > 0.9999, "{times:?}");
        assert_eq!(*times.last().unwrap(), 0.0);
        let target = Tensor::new(&[0.25f32, -1.5, 3.0], &dev)?;
        for order in 1..=3 {
            let mut solver = UniPc::new(order, times.clone())?;
            let mut x = Tensor::new(&[1.0f32, 0.5, -2.0], &dev)?;
            for i in 0..5 {
                x = solver.step(&schedule, i, &x, &target)?;
            }
            let diff: f32 = (x - &target)?.abs()?.max(0)?.to_scalar()?;
            assert!(diff < 1e-5, "order {order}: {diff}");
        }
        assert!(UniPc::new(4, times).is_err());
        Ok(())
    }

    #[test]
    fn the_small_solver_inverts_what_it_is_given() {
        let r = vec![
            vec![1.0, 1.0, 1.0],
            vec![-0.5, 2.0, 1.0],
            vec![0.25, 4.0, 1.0],
        ];
        let want = [0.3, -1.2, 2.5];
        let b: Vec<f64> = r
            .iter()
            .map(|row| row.iter().zip(&want).map(|(a, x)| a * x).sum())
            .collect();
        let got = solve(&r, &b, 3).unwrap();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        assert!(solve(&[vec![0.0]], &[1.0], 1).is_err());
    }
}
