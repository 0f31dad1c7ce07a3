//! AdamW (decoupled weight decay) with linear warmup and global gradient-norm clipping.
//!
//! Written here rather than taken from candle-nn because resumable training needs the moment
//! buffers saved in checkpoints, and candle-nn's optimizer keeps them private.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub clip_grad_norm: f64,
    /// Optional linear decay after the constant phase; absent keeps the rate constant.
    #[serde(default)]
    pub decay: Option<LrDecay>,
}

/// Linear decay of the learning rate from `lr` at step `start` to `lr * to` at step `end`
/// (a warmup-stable-decay schedule; the decay can be added when resuming a run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrDecay {
    pub start: u64,
    pub end: u64,
    pub to: f64,
}

impl Default for AdamWConfig {
    /// The DMD2 recipe's settings (AMD.md section 3.6), with its learning rate for LoRA.
    fn default() -> Self {
        Self {
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            warmup_steps: 500,
            clip_grad_norm: 10.0,
            decay: None,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
}

pub struct AdamW {
    pub config: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Completed steps.
    pub step: u64,
}

impl AdamW {
    /// An optimizer over `vars`, in the given (name-sorted) order.
    pub fn new(mut vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let m = vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            config,
            vars,
            m,
            v,
            step: 0,
        })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The learning rate of the next step (linear warmup from 0, then the optional decay).
    pub fn current_lr(&self) -> f64 {
        let (lr, w, step) = (self.config.lr, self.config.warmup_steps, self.step);
        if w > 0 && step < w {
            return lr * (step + 1) as f64 / w as f64;
        }
        match &self.config.decay {
            Some(d) if step >= d.start => {
                let span = d.end.saturating_sub(d.start).max(1) as f64;
                let frac = ((step - d.start) as f64 / span).min(1.0);
                lr * (1.0 - frac * (1.0 - d.to))
            }
            _ => lr,
        }
    }

    /// Global L2 norm of the gradients of this optimizer's variables.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        Ok(sq.sqrt())
    }

    /// Backpropagates `loss` and applies one update.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<StepStats> {
        let grads = loss.backward()?;
        self.step_with(&grads)
    }

    /// Applies one update from precomputed gradients.
    pub fn step_with(&mut self, grads: &GradStore) -> Result<StepStats> {
        let grad_norm = self.grad_norm(grads)?;
        let clip = self.config.clip_grad_norm;
        let scale = if clip > 0.0 && grad_norm > clip && grad_norm.is_finite() {
            clip / grad_norm
        } else {
            1.0
        };
        let lr = self.current_lr();
        let c = &self.config;
        let t = (self.step + 1) as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: a gradient that still carries a graph (an op whose backward computed
            // it from tracked tensors) would chain every step's graph into the moments.
            let g = g.detach();
            let g = if scale != 1.0 { (g * scale)? } else { g };
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let theta = var.as_tensor().detach();
            let decayed = (&theta * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        self.step += 1;
        Ok(StepStats { grad_norm, lr })
    }

    /// Moment buffers by variable name, for checkpoints.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores moment buffers saved by [`AdamW::state`].
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, _)) in self.vars.iter().enumerate() {
            let get = |k: String| {
                state
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks {k}")))
            };
            self.m[i] = get(format!("m.{name}"))?;
            self.v[i] = get(format!("v.{name}"))?;
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, -2.0, 3.0], &dev)?;
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.0,
            warmup_steps: 0,
            clip_grad_norm: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg)?;
        // loss = sum(w * [1, -1, 2]) => grad = [1, -1, 2]; Adam's first step is lr * sign.
        let c = Tensor::new(&[1.0f32, -1.0, 2.0], &dev)?;
        let loss = (w.as_tensor() * &c)?.sum_all()?;
        opt.backward_step(&loss)?;
        let got = w.as_tensor().to_vec1::<f32>()?;
        for (g, want) in got.iter().zip([0.9f32, -1.9, 2.9]) {
            assert!((g - want).abs() < 1e-5, "{got:?}");
        }
        Ok(())
    }

    #[test]
    fn moments_never_hold_a_graph() -> Result<()> {
        let dev = Device::Cpu;
        // `w` is a direct operand of the matmul, so candle's backward gives it `x^T grad`,
        // a tensor still tracked through `x`.
        let (x, w) = (
            Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev)?,
            Var::new(&[[0.5f32], [-0.5]], &dev)?,
        );
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default())?;
        let grads = x.as_tensor().matmul(w.as_tensor())?.sum_all()?.backward()?;
        assert!(grads.get(w.as_tensor()).unwrap().track_op());
        opt.step_with(&grads)?;
        assert!(!opt.m[0].track_op() && !opt.v[0].track_op());
        Ok(())
    }

    #[test]
    fn clipping_reports_the_raw_norm_and_warmup_scales_lr() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[0.0f32, 0.0], &dev)?;
        let cfg = AdamWConfig {
            lr: 1.0,
            warmup_steps: 4,
            clip_grad_norm: 1.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg)?;
        let loss = (w.as_tensor() * &Tensor::new(&[3.0f32, 4.0], &dev)?)?.sum_all()?;
        let stats = opt.backward_step(&loss)?;
        assert!((stats.grad_norm - 5.0).abs() < 1e-5);
        assert!((stats.lr - 0.25).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn decay_is_linear_between_its_steps() -> Result<()> {
        let w = Var::new(&[0.0f32], &Device::Cpu)?;
        let cfg = AdamWConfig {
            lr: 1.0,
            warmup_steps: 0,
            decay: Some(LrDecay {
                start: 10,
                end: 20,
                to: 0.1,
            }),
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), w)], cfg)?;
        for (step, want) in [(5, 1.0), (10, 1.0), (15, 0.55), (20, 0.1), (99, 0.1)] {
            opt.step = step;
            assert!((opt.current_lr() - want).abs() < 1e-12, "step {step}");
        }
        Ok(())
    }
}
