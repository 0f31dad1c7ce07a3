//! One distillation run in memory: the frozen real teacher, the student and the critic (both
//! trainable copies of the family's denoiser), their optimizers, and the DMD2/AMD iteration,
//! written once for every [`DistillFamily`].

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::config::{DistillConfig, Method};
use super::family::DistillFamily;
use super::gan::{self, GanHead};
use super::math::{self, Adaptation, RunningStats, TeacherPredictions};
use super::prompts::PromptSource;
use crate::pipeline::sampler::guidance_at;
use crate::reward::Reward;
use crate::train::{named_vars, tensors_of, AdamW, Checkpoint, Ema, StepStats};

/// What one iteration did (the generator part only on generator iterations).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IterStats {
    pub iteration: u64,
    pub video: bool,
    /// Backward-simulation depth: the student step whose input was trained on.
    pub sim_step: usize,
    pub samples: usize,
    pub critic_loss: f64,
    pub critic: StepStats,
    /// Discriminator loss of the GAN term (when on).
    pub gan_d_loss: Option<f64>,
    pub generator: Option<GeneratorStats>,
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Share of samples with advantage below `amd.forbidden_below`.
    pub forbidden: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratorStats {
    pub loss: f64,
    pub step: StepStats,
    /// Mean `|H|`, the size of the update direction.
    pub h_abs: f64,
    /// Mean `|xf - x|` over samples with negative / non-negative advantage (repulsion).
    pub repulsion_low: Option<f64>,
    pub repulsion_high: Option<f64>,
    /// The generator's adversarial term (when the GAN term is on).
    pub gan_g_loss: Option<f64>,
}

/// The resumable state beyond the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Completed iterations.
    pub iteration: u64,
    pub reward_stats: RunningStats,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    state: RunState,
    student_steps_taken: u64,
    critic_steps_taken: u64,
    config: DistillConfig,
}

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(data, shape, device)
}

/// One DMD2/AMD run over a model family `F` (see [`DistillFamily`]).
pub struct Distiller<F: DistillFamily> {
    pub config: DistillConfig,
    family: F,
    /// The weights the student started from (what LoRA adapters are merged into).
    student_init: HashMap<String, Tensor>,
    student: F::Net,
    critic: F::Net,
    /// The discriminator head on the critic (when the GAN term is on).
    gan_head: Option<GanHead>,
    opt_student: AdamW,
    opt_critic: AdamW,
    ema: Ema,
    reward: Box<dyn Reward>,
    prompts: PromptSource,
    pub state: RunState,
}

impl<F: DistillFamily> Distiller<F> {
    /// A fresh run: the critic starts as the teacher, the student as `student_init` (the
    /// teacher's weights for a first distillation, the served student's when refining it).
    pub fn new(
        config: DistillConfig,
        family: F,
        student_init: &HashMap<String, Tensor>,
        reward: Box<dyn Reward>,
        prompts: PromptSource,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        if config.guidance.is_none() {
            anyhow::bail!("set the teacher's CFG scale (`guidance`) before building a run");
        }
        let lora = config.lora.as_ref();
        let student = family.trainable(student_init, 0, lora)?;
        let mut critic = family.trainable(family.teacher_weights(), config.seed, lora)?;
        let gan_head = if config.gan.enabled {
            let gan = family.gan().ok_or_else(|| {
                anyhow::anyhow!(
                    "the GAN term compares with real samples, which this model family cannot \
                     render; set gan.enabled = false"
                )
            })?;
            let map = VarMap::new();
            let vb = crate::nn::seeded_var_builder(&map, config.seed, DType::F32, family.device());
            let head = GanHead::new(vb.pp("gan"), gan.feature_dim())?;
            critic.vars.extend(named_vars(&map));
            critic.vars.sort_by(|a, b| a.0.cmp(&b.0));
            Some(head)
        } else {
            None
        };
        let ema = Ema::new(&student.vars, config.ema_decay)?;
        Ok(Self {
            opt_student: AdamW::new(student.vars, config.student_optim.clone())?,
            opt_critic: AdamW::new(critic.vars, config.critic_optim.clone())?,
            ema,
            config,
            family,
            student_init: student_init.clone(),
            student: student.net,
            critic: critic.net,
            gan_head,
            reward,
            prompts,
            state: RunState {
                iteration: 0,
                reward_stats: RunningStats::new(),
            },
        })
    }

    pub fn family(&self) -> &F {
        &self.family
    }

    pub fn student_vars(&self) -> &[(String, Var)] {
        self.opt_student.vars()
    }

    pub fn critic_vars(&self) -> &[(String, Var)] {
        self.opt_critic.vars()
    }

    /// The exported student: the family's servable weights with the (EMA) student in them.
    pub fn student_weights(&self) -> anyhow::Result<HashMap<String, Tensor>> {
        let student = if self.config.ema_decay > 0.0 {
            self.ema.shadow.clone()
        } else {
            tensors_of(self.student_vars())
        };
        self.family
            .export(&self.student_init, &student, self.config.lora.as_ref())
    }

    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let meta = Meta {
            state: self.state.clone(),
            student_steps_taken: self.opt_student.step,
            critic_steps_taken: self.opt_critic.step,
            config: self.config.clone(),
        };
        Checkpoint::save(
            path,
            &meta,
            &[
                ("student.", &tensors_of(self.student_vars())),
                ("student_opt.", &self.opt_student.state()),
                ("critic.", &tensors_of(self.critic_vars())),
                ("critic_opt.", &self.opt_critic.state()),
                ("ema.", &self.ema.shadow),
            ],
        )
    }

    /// Restores a checkpoint written by [`Self::save_checkpoint`] of a run with the same
    /// architecture (the current config is kept, so a run can be extended).
    pub fn load_checkpoint(&mut self, path: &Path) -> anyhow::Result<()> {
        let prefixes = ["student.", "student_opt.", "critic.", "critic_opt.", "ema."];
        let (meta, groups): (Meta, _) = Checkpoint::load(path, &prefixes, self.family.device())?;
        let (a, b) = (&meta.config, &self.config);
        if (a.method, a.student_steps, a.seed) != (b.method, b.student_steps, b.seed) {
            anyhow::bail!(
                "{} is a {:?} run of a {}-step student with seed {}; this run asks for {:?}, {} steps, seed {}",
                path.display(), a.method, a.student_steps, a.seed, b.method, b.student_steps, b.seed
            );
        }
        for (vars, tensors) in [
            (self.opt_student.vars(), &groups[0]),
            (self.opt_critic.vars(), &groups[2]),
        ] {
            for (name, var) in vars {
                let t = tensors
                    .get(name)
                    .ok_or_else(|| anyhow::anyhow!("{} lacks {name}", path.display()))?;
                var.set(t)?;
            }
        }
        self.opt_student
            .load_state(&groups[1], meta.student_steps_taken)?;
        self.opt_critic
            .load_state(&groups[3], meta.critic_steps_taken)?;
        self.ema.shadow = groups[4].clone();
        self.state = meta.state;
        Ok(())
    }

    /// Runs one iteration (critic always, student on every `generator_every`-th).
    pub fn step(&mut self) -> anyhow::Result<IterStats> {
        let start = Instant::now();
        let cfg = self.config.clone();
        let it = self.state.iteration;
        // A fresh RNG per iteration from (seed, iteration): a resumed run sees the same data.
        let mut rng =
            ChaCha8Rng::seed_from_u64(cfg.seed ^ (it + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let video = self.family.makes_video()
            && cfg.video_every > 0
            && it % cfg.video_every == cfg.video_every - 1;
        let n_prompts = if video {
            cfg.video_prompts
        } else {
            cfg.prompts
        };
        let k = cfg.group_size;
        let prompts: Vec<String> = self
            .prompts
            .draw(&mut rng, n_prompts, video)
            .into_iter()
            .flat_map(|p| std::iter::repeat_n(p, k))
            .collect();
        let b = prompts.len();
        let shape = self.family.sample_shape(b, video);
        let frames = if video { crate::world::VIDEO_FRAMES } else { 1 };
        let dev = self.family.device().clone();
        let generator_turn = it.is_multiple_of(cfg.generator_every);

        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let cond = self.family.condition(&refs)?;

        // Backward simulation: run the student without a graph to the input of step `sim`.
        let schedule = self.family.schedule(frames);
        let times = schedule.student_times(cfg.student_steps);
        let sim = rng.random_range(0..cfg.student_steps);
        let mut z = randn(&mut rng, &shape, &dev)?;
        for i in 0..sim {
            let x0 = self
                .family
                .student_x0(&self.student, &z, &vec![times[i]; b], &cond)?
                .detach();
            let n = randn(&mut rng, &shape, &dev)?;
            z = schedule.add_noise(&x0, &n, &vec![times[i + 1]; b])?;
        }
        let x = self
            .family
            .student_x0(&self.student, &z, &vec![times[sim]; b], &cond)?;
        let x = if generator_turn { x } else { x.detach() };
        let x_sg = x.detach();

        // Rewards: scored once, used by both steps (and logged for DMD2 too).
        let rewards = self.reward.score(&prompts, &self.family.pixels(&x_sg)?)?;
        self.state
            .reward_stats
            .update(&rewards, cfg.amd.running_decay);
        let floor = cfg.amd.std_floor * self.state.reward_stats.std() as f32;
        let adv = math::group_advantages(&rewards, k, floor, cfg.amd.eps, cfg.amd.clip);
        let amd = cfg.method == Method::Amd;

        let generator = if generator_turn {
            Some(self.generator_step(&x, &x_sg, &cond, &adv, frames, &mut rng)?)
        } else {
            None
        };

        // Critic: the family's own denoising loss on the student's samples, at times drawn
        // as the teacher was trained (through the schedule's warp: Wan's flow shift; the
        // identity for tiny and sd).
        let schedule = self.family.schedule(frames);
        let tau: Vec<f32> = (0..b).map(|_| schedule.warp(rng.random::<f32>())).collect();
        let noise = randn(&mut rng, &shape, &dev)?;
        let gan_on = self.gan_head.is_some();
        let (per_sample, fake_features) =
            self.family
                .denoising_loss(&self.critic, &x_sg, &noise, &tau, &cond, gan_on)?;
        let mut critic_loss = if amd {
            let w = math::rls_weights(&adv, cfg.amd.s_f);
            (per_sample * Tensor::new(w.as_slice(), &dev)?)?.mean(0)?
        } else {
            per_sample.mean(0)?
        };
        let mut gan_d_loss = None;
        if let (Some(head), Some(fake), Some(gan)) =
            (&self.gan_head, fake_features, self.family.gan())
        {
            // Real samples of the same prompts, noised to the same times.
            let real = gan.real_batch(&prompts, frames, &mut rng)?;
            let real_noise = randn(&mut rng, &shape, &dev)?;
            let real_t = self
                .family
                .schedule(frames)
                .add_noise(&real, &real_noise, &tau)?;
            let real_features = gan.features(&self.critic, &real_t, &tau, &cond)?;
            let d = gan::discriminator_loss(&head.forward(&fake)?, &head.forward(&real_features)?)?;
            gan_d_loss = Some(d.to_scalar::<f32>()? as f64);
            critic_loss = (critic_loss + (d * cfg.gan.d_weight)?)?;
        }
        let critic = self.opt_critic.backward_step(&critic_loss)?;

        self.state.iteration += 1;
        let mean = rewards.iter().sum::<f32>() as f64 / b as f64;
        let var = rewards
            .iter()
            .map(|&r| (r as f64 - mean).powi(2))
            .sum::<f64>()
            / b as f64;
        Ok(IterStats {
            iteration: self.state.iteration,
            video,
            sim_step: sim,
            samples: b,
            critic_loss: critic_loss.to_scalar::<f32>()? as f64,
            critic,
            gan_d_loss,
            generator,
            reward_mean: mean,
            reward_std: var.sqrt(),
            forbidden: adv.iter().filter(|&&a| a < cfg.amd.forbidden_below).count() as f64
                / b as f64,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    fn generator_step(
        &mut self,
        x: &Tensor,
        x_sg: &Tensor,
        cond: &F::Cond,
        adv: &[f32],
        frames: usize,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<GeneratorStats> {
        let cfg = &self.config;
        let amd = cfg.method == Method::Amd;
        let b = x.dim(0)?;
        let schedule = self.family.schedule(frames);
        let tau: Vec<f32> = (0..b)
            .map(|_| schedule.warp(rng.random_range(cfg.tau_min..cfg.tau_max)))
            .collect();
        let noise = randn(rng, x.dims(), x.device())?;
        let x_tau = schedule.add_noise(x_sg, &noise, &tau)?;
        // Real teacher, conditional and unconditional in one pass; critic conditional.
        let (xc, xu) = self.family.teacher_x0(&x_tau, &tau, cond)?;
        let xf = self.family.x0(&self.critic, &x_tau, &tau, cond)?.detach();
        let guidance = cfg.guidance.unwrap_or(1.0); // set in `new`
        let w: Vec<f32> = tau
            .iter()
            .map(|&t| guidance_at(guidance, cfg.guidance_interval, t))
            .collect();
        let preds = TeacherPredictions {
            cond: &xc,
            uncond: &xu,
            fake: &xf,
        };
        let adapt = amd.then(|| Adaptation::new(cfg.amd.s, adv));
        let h = math::generator_direction(x_sg, &preds, &w, adapt.as_ref())?;
        let mut loss = math::generator_loss(x, &h)?;
        let dm_loss = loss.to_scalar::<f32>()? as f64;
        let mut gan_g_loss = None;
        if let (Some(head), Some(gan)) = (&self.gan_head, self.family.gan()) {
            // Through the critic back to the student: noise the sample with its graph.
            let x_tau_g = schedule.add_noise(x, &noise, &tau)?;
            let feat = gan.features(&self.critic, &x_tau_g, &tau, cond)?;
            let g = gan::generator_loss(&head.forward(&feat)?)?;
            gan_g_loss = Some(g.to_scalar::<f32>()? as f64);
            loss = (loss + (g * cfg.gan.g_weight)?)?;
        }
        let step = self.opt_student.backward_step(&loss)?;
        self.ema
            .update(self.opt_student.vars(), self.opt_student.step)?;

        let repulsion = math::per_sample_mean(&(&xf - x_sg)?.abs()?)?.to_vec1::<f32>()?;
        let mean_where = |low: bool| {
            let v: Vec<f64> = repulsion
                .iter()
                .zip(adv)
                .filter(|(_, &a)| (a < 0.0) == low)
                .map(|(&r, _)| r as f64)
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        Ok(GeneratorStats {
            loss: dm_loss,
            step,
            h_abs: h.abs()?.mean_all()?.to_scalar::<f32>()? as f64,
            repulsion_low: mean_where(true),
            repulsion_high: mean_where(false),
            gan_g_loss,
        })
    }
}

#[cfg(test)]
mod tests;
