//! One distillation run in memory: the frozen real teacher, the student and the critic (both
//! trainable copies of the family's denoiser), their optimizers, and the DMD2/AMD iteration.

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
use super::gan::{self, GanHead};
use super::math::{self, Adaptation, RunningStats, TeacherPredictions};
use super::prompts::PromptSource;
use crate::families::tiny::{Dit, TextCond, TinyModel};
use crate::pipeline::NoiseSchedule;
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

/// A trainable denoiser, its optional GAN head, and all their variables.
struct Trainable {
    dit: Dit,
    head: Option<GanHead>,
    vars: Vec<(String, Var)>,
}

/// A trainable copy of the denoiser, each variable starting as the tensor of the same name in
/// `init` (`dit.*` names of a full model's weights), and optionally a fresh GAN head (`gan.*`,
/// seeded).
fn trainable_dit(
    teacher: &TinyModel,
    init: &HashMap<String, Tensor>,
    gan_head: bool,
    seed: u64,
) -> anyhow::Result<Trainable> {
    let map = VarMap::new();
    let vb = crate::nn::seeded_var_builder(&map, seed, DType::F32, teacher.device());
    let dit = Dit::new(vb.pp("dit"), &teacher.cfg)?;
    let head = gan_head
        .then(|| GanHead::new(vb.pp("gan"), teacher.cfg.dim))
        .transpose()?;
    let vars = named_vars(&map);
    for (name, var) in vars.iter().filter(|(n, _)| !n.starts_with("gan.")) {
        let t = init
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("initial weights lack {name}"))?;
        var.set(&t.to_dtype(DType::F32)?.to_device(teacher.device())?)
            .map_err(|e| anyhow::anyhow!("initial weight {name}: {e}"))?;
    }
    Ok(Trainable { dit, head, vars })
}

fn randn(rng: &mut ChaCha8Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(data, shape, device)
}

pub struct Distiller {
    pub config: DistillConfig,
    teacher: TinyModel,
    /// The teacher's full weights: the text encoder the student ships with.
    teacher_tensors: HashMap<String, Tensor>,
    student: Dit,
    critic: Dit,
    /// The discriminator head on the critic (when the GAN term is on).
    gan_head: Option<GanHead>,
    opt_student: AdamW,
    opt_critic: AdamW,
    ema: Ema,
    reward: Box<dyn Reward>,
    prompts: PromptSource,
    pub state: RunState,
}

impl Distiller {
    /// A fresh run: the critic starts as the teacher, the student as `student_init` (the
    /// teacher for a first distillation, the served student when refining it).
    pub fn new(
        config: DistillConfig,
        teacher: TinyModel,
        teacher_tensors: HashMap<String, Tensor>,
        student_init: &HashMap<String, Tensor>,
        reward: Box<dyn Reward>,
        prompts: PromptSource,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        if config.guidance.is_none() {
            anyhow::bail!("set the teacher's CFG scale (`guidance`) before building a run");
        }
        let student = trainable_dit(&teacher, student_init, false, 0)?;
        let critic = trainable_dit(&teacher, &teacher_tensors, config.gan.enabled, config.seed)?;
        let ema = Ema::new(&student.vars, config.ema_decay)?;
        Ok(Self {
            opt_student: AdamW::new(student.vars, config.student_optim.clone())?,
            opt_critic: AdamW::new(critic.vars, config.critic_optim.clone())?,
            ema,
            config,
            teacher,
            teacher_tensors,
            student: student.dit,
            critic: critic.dit,
            gan_head: critic.head,
            reward,
            prompts,
            state: RunState {
                iteration: 0,
                reward_stats: RunningStats::new(),
            },
        })
    }

    pub fn student_vars(&self) -> &[(String, Var)] {
        self.opt_student.vars()
    }

    pub fn critic_vars(&self) -> &[(String, Var)] {
        self.opt_critic.vars()
    }

    /// The exported student: the teacher's text encoder and the (EMA) student denoiser, as a
    /// complete weights file for the family.
    pub fn student_weights(&self) -> HashMap<String, Tensor> {
        let mut out = self.teacher_tensors.clone();
        let dit = if self.config.ema_decay > 0.0 {
            self.ema.shadow.clone()
        } else {
            tensors_of(self.student_vars())
        };
        out.extend(dit);
        out
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
        let (meta, groups): (Meta, _) = Checkpoint::load(path, &prefixes, self.teacher.device())?;
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

    /// x0 estimate of a denoiser for `x` at times `t`.
    fn x0(&self, dit: &Dit, x: &Tensor, t: &[f32], text: &TextCond) -> Result<Tensor> {
        let v = dit.forward(x, t, text)?;
        self.teacher.x0_from_velocity(x, t, &v)
    }

    /// Runs one iteration (critic always, student on every `generator_every`-th).
    pub fn step(&mut self) -> anyhow::Result<IterStats> {
        let start = Instant::now();
        let cfg = self.config.clone();
        let it = self.state.iteration;
        // A fresh RNG per iteration from (seed, iteration): a resumed run sees the same data.
        let mut rng =
            ChaCha8Rng::seed_from_u64(cfg.seed ^ (it + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let video = cfg.video_every > 0 && it % cfg.video_every == cfg.video_every - 1;
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
        let tc = &self.teacher.cfg;
        let frames = if video { crate::world::VIDEO_FRAMES } else { 1 };
        let shape = [b, frames, tc.channels, tc.image_size, tc.image_size];
        let dev = self.teacher.device().clone();
        let generator_turn = it.is_multiple_of(cfg.generator_every);

        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let text = self.teacher.encode(&refs)?;
        let uncond = self.teacher.encode(&vec![""; b])?;

        // Backward simulation: run the student without a graph to the input of step `sim`.
        let times = self.teacher.schedule.student_times(cfg.student_steps);
        let sim = rng.random_range(0..cfg.student_steps);
        let mut z = randn(&mut rng, &shape, &dev)?;
        for i in 0..sim {
            let x0 = self
                .x0(&self.student, &z, &vec![times[i]; b], &text)?
                .detach();
            let n = randn(&mut rng, &shape, &dev)?;
            z = self
                .teacher
                .schedule
                .add_noise(&x0, &n, &vec![times[i + 1]; b])?;
        }
        let x = self.x0(&self.student, &z, &vec![times[sim]; b], &text)?;
        let x = if generator_turn { x } else { x.detach() };
        let x_sg = x.detach();

        // Rewards: scored once, used by both steps (and logged for DMD2 too).
        let rewards = self.reward.score(&prompts, &x_sg)?;
        self.state
            .reward_stats
            .update(&rewards, cfg.amd.running_decay);
        let floor = cfg.amd.std_floor * self.state.reward_stats.std() as f32;
        let adv = math::group_advantages(&rewards, k, floor, cfg.amd.eps, cfg.amd.clip);
        let amd = cfg.method == Method::Amd;

        let generator = if generator_turn {
            Some(self.generator_step(&x, &x_sg, &text, &uncond, &adv, amd, &mut rng)?)
        } else {
            None
        };

        // Critic: the family's own denoising loss on the student's samples.
        let tau: Vec<f32> = (0..b).map(|_| rng.random::<f32>()).collect();
        let noise = randn(&mut rng, &shape, &dev)?;
        let x_t = self.teacher.schedule.add_noise(&x_sg, &noise, &tau)?;
        let gan_on = self.gan_head.is_some();
        let (v, fake_features) = self
            .critic
            .forward_with_features(&x_t, &tau, &text, gan_on)?;
        let per_sample = math::per_sample_mse(&v, &(&noise - &x_sg)?)?;
        let mut critic_loss = if amd {
            let w = math::rls_weights(&adv, cfg.amd.s_f);
            (per_sample * Tensor::new(w.as_slice(), &dev)?)?.mean(0)?
        } else {
            per_sample.mean(0)?
        };
        let mut gan_d_loss = None;
        if let (Some(head), Some(fake)) = (&self.gan_head, fake_features) {
            // Real renders of the same prompts, noised to the same times.
            let real = gan::real_batch(&prompts, frames, &mut rng, &dev)?;
            let real_noise = randn(&mut rng, &shape, &dev)?;
            let real_t = self.teacher.schedule.add_noise(&real, &real_noise, &tau)?;
            let (_, real_features) = self
                .critic
                .forward_with_features(&real_t, &tau, &text, true)?;
            let real_features = real_features.expect("features were asked for");
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

    #[allow(clippy::too_many_arguments)]
    fn generator_step(
        &mut self,
        x: &Tensor,
        x_sg: &Tensor,
        text: &TextCond,
        uncond: &TextCond,
        adv: &[f32],
        amd: bool,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<GeneratorStats> {
        let cfg = &self.config;
        let b = x.dim(0)?;
        let tau: Vec<f32> = (0..b)
            .map(|_| rng.random_range(cfg.tau_min..cfg.tau_max))
            .collect();
        let noise = randn(rng, x.dims(), x.device())?;
        let x_tau = self.teacher.schedule.add_noise(x_sg, &noise, &tau)?;
        // Real teacher, conditional and unconditional in one pass; critic conditional.
        let both = Tensor::cat(&[&x_tau, &x_tau], 0)?;
        let tt: Vec<f32> = tau.iter().chain(&tau).copied().collect();
        let v = self.teacher.velocity(&both, &tt, &text.cat(uncond)?)?;
        let x0 = self.teacher.x0_from_velocity(&both, &tt, &v)?;
        let (xc, xu) = (x0.narrow(0, 0, b)?, x0.narrow(0, b, b)?);
        let xf = self.x0(&self.critic, &x_tau, &tau, text)?.detach();
        let w = cfg.guidance.unwrap_or(1.0) as f64; // set in `new`
        let preds = TeacherPredictions {
            cond: &xc,
            uncond: &xu,
            fake: &xf,
        };
        let adapt = amd.then(|| Adaptation::new(cfg.amd.s, adv));
        let h = math::generator_direction(x_sg, &preds, w, adapt.as_ref())?;
        let mut loss = math::generator_loss(x, &h)?;
        let dm_loss = loss.to_scalar::<f32>()? as f64;
        let mut gan_g_loss = None;
        if let Some(head) = &self.gan_head {
            // Through the critic back to the student: noise the sample with its graph.
            let x_tau_g = self.teacher.schedule.add_noise(x, &noise, &tau)?;
            let (_, feat) = self
                .critic
                .forward_with_features(&x_tau_g, &tau, text, true)?;
            let g = gan::generator_loss(&head.forward(&feat.expect("features were asked for"))?)?;
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
mod tests {
    use super::*;
    use crate::distill::config::AmdConfig;
    use crate::families::tiny::{TinyConfig, TinyTokenizer};
    use crate::pipeline::FlowSchedule;
    use crate::reward::VerifierReward;
    use candle_nn::VarBuilder;

    fn tiny_cfg(vocab: usize) -> TinyConfig {
        TinyConfig {
            dim: 32,
            depth: 1,
            heads: 2,
            mlp_ratio: 2,
            patch: 8,
            channels: 3,
            text_dim: 32,
            text_depth: 1,
            text_max_len: 16,
            vocab_size: vocab,
            max_frames: 8,
            image_size: 32,
            refiner: 4,
        }
    }

    /// A random (but fully non-zero) teacher and its weights.
    fn teacher() -> (TinyModel, HashMap<String, Tensor>) {
        let dev = Device::Cpu;
        let tok = TinyTokenizer::from_vocabulary(&crate::world::vocabulary()).unwrap();
        let cfg = tiny_cfg(tok.vocab_size());
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 7, DType::F32, &dev);
        TinyModel::new(vb, &cfg, tok.clone(), FlowSchedule::default()).unwrap();
        let tensors = tensors_of(&named_vars(&map));
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
        let model = TinyModel::new(vb, &cfg, tok, FlowSchedule::default()).unwrap();
        (model, tensors)
    }

    fn config(method: Method, s: f32, s_f: f32) -> DistillConfig {
        DistillConfig {
            method,
            student_steps: 2,
            iterations: 4,
            prompts: 2,
            group_size: 2,
            video_every: 2,
            video_prompts: 1,
            guidance: Some(2.0),
            generator_every: 2,
            amd: AmdConfig {
                s,
                s_f,
                ..Default::default()
            },
            ema_decay: 0.9,
            seed: 11,
            ..Default::default()
        }
    }

    fn distiller(config: DistillConfig) -> Distiller {
        let (model, tensors) = teacher();
        Distiller::new(
            config,
            model,
            tensors.clone(),
            &tensors,
            Box::new(VerifierReward),
            PromptSource::Grammar,
        )
        .unwrap()
    }

    fn bits(vars: &[(String, Var)]) -> Vec<(String, Vec<u32>)> {
        vars.iter()
            .map(|(n, v)| {
                let x = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                (n.clone(), x.iter().map(|f| f.to_bits()).collect())
            })
            .collect()
    }

    fn assert_all_grads(vars: &[(String, Var)], grads: &candle_core::backprop::GradStore) {
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient"));
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{name}: non-finite gradient"
            );
            assert!(g.iter().any(|&x| x != 0.0), "{name}: all-zero gradient");
        }
    }

    #[test]
    fn every_trainable_variable_gets_a_finite_nonzero_gradient() -> anyhow::Result<()> {
        let mut cfg = config(Method::Amd, 0.5, 0.5);
        cfg.gan.enabled = true;
        let d = distiller(cfg);
        let dev = Device::Cpu;
        // A video batch, so that temporal attention is on the path too.
        let shape = [2, 8, 3, 32, 32];
        let prompts = ["a red circle moving left", "two blue squares"];
        let text = d.teacher.encode(&prompts)?;
        let uncond = d.teacher.encode(&["", ""])?;
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let z = randn(&mut rng, &shape, &dev)?;

        // Student: the real generator loss.
        let x = d.x0(&d.student, &z, &[1.0, 1.0], &text)?;
        let x_tau = d.teacher.schedule.add_noise(&x.detach(), &z, &[0.5, 0.7])?;
        let both = Tensor::cat(&[&x_tau, &x_tau], 0)?;
        let tt = [0.5, 0.7, 0.5, 0.7];
        let v = d.teacher.velocity(&both, &tt, &text.cat(&uncond)?)?;
        let x0 = d.teacher.x0_from_velocity(&both, &tt, &v)?;
        let (xc, xu) = (x0.narrow(0, 0, 2)?, x0.narrow(0, 2, 2)?);
        let xf = d.x0(&d.critic, &x_tau, &[0.5, 0.7], &text)?.detach();
        let p = TeacherPredictions {
            cond: &xc,
            uncond: &xu,
            fake: &xf,
        };
        let a = Adaptation::new(0.5, &[0.5, -0.5]);
        let h = math::generator_direction(&x.detach(), &p, 2.0, Some(&a))?;
        assert_all_grads(d.student_vars(), &math::generator_loss(&x, &h)?.backward()?);

        // Critic: its weighted denoising loss.
        let n = randn(&mut rng, &shape, &dev)?;
        let x_t = d.teacher.schedule.add_noise(&x.detach(), &n, &[0.3, 0.9])?;
        let (v, feat) = d
            .critic
            .forward_with_features(&x_t, &[0.3, 0.9], &text, true)?;
        let per = math::per_sample_mse(&v, &(&n - x.detach())?)?;
        let loss = (per * Tensor::new(&[1.5f32, 0.5], &dev)?)?.mean(0)?;
        // ... plus the GAN term, so that the discriminator head is covered too.
        let head = d.gan_head.as_ref().unwrap();
        let real = gan::real_batch(&prompts.map(String::from), 8, &mut rng, &dev)?;
        let (_, real_feat) = d
            .critic
            .forward_with_features(&real, &[0.3, 0.9], &text, true)?;
        let dl = gan::discriminator_loss(
            &head.forward(&feat.unwrap())?,
            &head.forward(&real_feat.unwrap())?,
        )?;
        assert!(d.critic_vars().iter().any(|(n, _)| n.starts_with("gan.")));
        assert_all_grads(d.critic_vars(), &(loss + dl)?.backward()?);

        // The teacher itself, as `train-teacher` trains it (text encoder included).
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 3, DType::F32, &dev);
        let tok = d.teacher.tokenizer.clone();
        let model = TinyModel::new(vb, &d.teacher.cfg, tok, FlowSchedule::default())?;
        let text = model.encode(&prompts)?;
        let v = model.velocity(&x_t, &[0.3, 0.9], &text)?;
        let loss = (v - &n)?.sqr()?.mean_all()?;
        assert_all_grads(&named_vars(&map), &loss.backward()?);
        Ok(())
    }

    #[test]
    fn a_clip_reward_scores_image_and_video_iterations() -> anyhow::Result<()> {
        // The tiny family's 32x32 RGB samples, resized to the tiny CLIP's 30 px.
        let fx = crate::families::sd::testing::fixture("clip-tiny");
        let reward = crate::reward::load("clip", Some(&fx.dir), &Device::Cpu)?;
        let (model, tensors) = teacher();
        let cfg = config(Method::Amd, 0.5, 0.5);
        let mut d = Distiller::new(
            cfg,
            model,
            tensors.clone(),
            &tensors,
            reward,
            PromptSource::Grammar,
        )?;
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let s = d.step()?;
            assert!(s.reward_mean.is_finite() && s.reward_std > 0.0, "{s:?}");
            kinds.push(s.video);
        }
        assert!(kinds.contains(&true) && kinds.contains(&false), "{kinds:?}");
        Ok(())
    }

    #[test]
    fn the_gan_term_trains_the_head_and_reports_its_losses() -> anyhow::Result<()> {
        let mut cfg = config(Method::Dmd2, 0.0, 0.0);
        cfg.gan.enabled = true;
        let mut d = distiller(cfg);
        let before = bits(d.critic_vars());
        let a = d.step()?;
        let b = d.step()?;
        let g = a.generator.expect("iteration 0 trains the student");
        assert!(g.gan_g_loss.is_some_and(f64::is_finite));
        assert!(a.gan_d_loss.is_some_and(f64::is_finite) && b.gan_d_loss.is_some());
        let after = bits(d.critic_vars());
        for ((name, x), (_, y)) in before.iter().zip(&after) {
            if name.starts_with("gan.") {
                assert_ne!(x, y, "{name} did not move");
            }
        }
        Ok(())
    }

    #[test]
    fn amd_without_adaptation_is_dmd2_bit_for_bit() -> anyhow::Result<()> {
        let mut dmd2 = distiller(config(Method::Dmd2, 0.0, 0.0));
        let mut amd0 = distiller(config(Method::Amd, 0.0, 0.0));
        let mut amd = distiller(config(Method::Amd, 0.5, 0.5));
        let mut videos = 0;
        for _ in 0..4 {
            let a = dmd2.step()?;
            let b = amd0.step()?;
            amd.step()?;
            assert_eq!(a.critic_loss.to_bits(), b.critic_loss.to_bits());
            videos += a.video as usize;
        }
        assert_eq!(videos, 2, "both image and video iterations ran");
        assert_eq!(bits(dmd2.student_vars()), bits(amd0.student_vars()));
        assert_eq!(bits(dmd2.critic_vars()), bits(amd0.critic_vars()));
        // And the adaptation does change the result (this test can fail).
        assert_ne!(bits(dmd2.student_vars()), bits(amd.student_vars()));
        assert_ne!(bits(dmd2.critic_vars()), bits(amd.critic_vars()));
        Ok(())
    }

    #[test]
    fn a_resumed_run_ends_bit_identical_to_an_uninterrupted_one() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("fewstep-distill-{}", std::process::id()));
        let ckpt = dir.join("checkpoint.safetensors");
        let mut whole = distiller(config(Method::Amd, 0.5, 0.5));
        for _ in 0..4 {
            whole.step()?;
        }
        let mut first = distiller(config(Method::Amd, 0.5, 0.5));
        for _ in 0..3 {
            first.step()?;
        }
        first.save_checkpoint(&ckpt)?;
        drop(first);
        let mut resumed = distiller(config(Method::Amd, 0.5, 0.5));
        resumed.load_checkpoint(&ckpt)?;
        assert_eq!(resumed.state.iteration, 3);
        resumed.step()?;
        assert_eq!(bits(whole.student_vars()), bits(resumed.student_vars()));
        assert_eq!(bits(whole.critic_vars()), bits(resumed.critic_vars()));
        assert_eq!(whole.state, resumed.state);
        let (we, re) = (whole.student_weights(), resumed.student_weights());
        for (name, t) in &we {
            let a = t.flatten_all()?.to_vec1::<f32>()?;
            let b = re[name].flatten_all()?.to_vec1::<f32>()?;
            assert!(a == b, "exported {name} differs");
        }
        // A checkpoint of another method is refused rather than silently mixed in.
        let mut other = distiller(config(Method::Dmd2, 0.0, 0.0));
        assert!(other.load_checkpoint(&ckpt).is_err());
        std::fs::remove_dir_all(dir).ok();
        Ok(())
    }
}
