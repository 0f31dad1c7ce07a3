//! Every knob of a distillation run, with the defaults of AMD.md (sections 3 and 4).

use serde::{Deserialize, Serialize};

use super::gan::GanConfig;
use crate::train::AdamWConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// DMD2: distribution matching with a CFG real teacher and a trained critic.
    Dmd2,
    /// Adaptive Matching Distillation: DMD2 + reward-aware Dynamic Score Adaptation and
    /// Repulsive Landscape Sharpening.
    Amd,
}

/// The AMD-only choices; each `[free]` item of AMD.md section 4 is a key here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmdConfig {
    /// Dynamic Score Adaptation strength `s` (`alpha = 1 + s a`, `beta = 1 - s a`), in [0, 1).
    pub s: f32,
    /// Repulsive Landscape Sharpening strength `s_f` (critic weights `1 - s_f a`).
    pub s_f: f32,
    /// `eps` in the group normalization.
    pub eps: f32,
    /// Floor on the group std, as a fraction of the reward's running std.
    pub std_floor: f32,
    /// Advantages are clipped to `[-clip, clip]`.
    pub clip: f32,
    /// Decay of the running reward statistics behind the floor.
    pub running_decay: f64,
    /// Advantage below which a sample counts as "in the forbidden zone" in the logs.
    pub forbidden_below: f32,
}

impl Default for AmdConfig {
    fn default() -> Self {
        Self {
            s: 0.5,
            s_f: 0.5,
            eps: 1e-6,
            std_floor: 0.05,
            clip: 1.0,
            running_decay: 0.99,
            forbidden_below: -0.5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    pub method: Method,
    /// The student's number of steps (its timestep list is the schedule's `student_times`).
    pub student_steps: usize,
    /// Training iterations (each trains the critic; every `generator_every`-th the student).
    pub iterations: u64,
    /// Distinct prompts per image iteration (`P`); the batch is `P * group_size`.
    pub prompts: usize,
    /// Samples per prompt (`K`, at least 2 for AMD). DMD2 uses the same layout so that the
    /// two methods see identical batches.
    pub group_size: usize,
    /// Every `video_every`-th iteration is a video iteration (0: images only).
    pub video_every: u64,
    /// Distinct prompts per video iteration.
    pub video_prompts: usize,
    /// CFG scale `w` of the real teacher; `None` takes the teacher's default guidance.
    pub guidance: Option<f32>,
    /// The flow times `[lo, hi]` at which the real teacher's score is guided; outside them it
    /// is the conditional prediction alone, as a teacher with `sampling.guidance_interval`
    /// samples. Absent: every time.
    pub guidance_interval: Option<[f64; 2]>,
    /// Two-time-scale update rule: the student steps every `generator_every`-th iteration.
    pub generator_every: u64,
    /// The flow shift of the student's image schedule (its step times and re-noising levels);
    /// `None` takes the teacher's `sampling.shift`. A teacher may sample better at a shift its
    /// few-step students do not (the tiny teacher: 3 against 1, `models/tiny-shapes/DISTILL.md`).
    /// Videos keep the teacher's `video_shift`; a continued student keeps its own schedule.
    pub student_shift: Option<f32>,
    /// Range of the generator's re-noising time `tau` (fractions of the schedule, before its
    /// warp: a flow shift such as Wan's moves them toward noise).
    pub tau_min: f32,
    pub tau_max: f32,
    pub student_optim: AdamWConfig,
    pub critic_optim: AdamWConfig,
    /// EMA of the student's weights (what is exported); 0 exports the raw weights.
    pub ema_decay: f64,
    pub amd: AmdConfig,
    /// DMD2's optional GAN term on the critic (off by default; needs renderable prompts).
    pub gan: GanConfig,
    /// Train LoRA adapters (`[lora] rank = 64`, optional `alpha`, default `rank`) on the
    /// student's and the critic's frozen denoisers instead of every weight (the sd family's
    /// UNets; the wan family's attention and feed-forward layers). Not for the tiny family.
    pub lora: Option<crate::nn::LoraConfig>,
    /// Reward proxy: `verifier` for the built-in world, or `clip` (a CLIP score, e.g.
    /// PickScore; families with RGB image outputs) with `reward_path`.
    pub reward: String,
    /// The reward's model directory (`clip`: a transformers `CLIPModel` directory such as
    /// PickScore's, or an OpenCLIP one such as HPSv2's; see `reward::ClipScoreReward`).
    pub reward_path: Option<std::path::PathBuf>,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub log_every: u64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        // Full-model rates for the tiny family (DMD2's 5e-7 is for a 2.6B-parameter UNet).
        let optim = AdamWConfig {
            lr: 5e-5,
            warmup_steps: 20,
            ..Default::default()
        };
        Self {
            method: Method::Amd,
            student_steps: 4,
            iterations: 1000,
            prompts: 8,
            group_size: 4,
            video_every: 4,
            video_prompts: 2,
            guidance: None,
            guidance_interval: None,
            generator_every: 5,
            student_shift: None,
            tau_min: 0.02,
            tau_max: 0.98,
            student_optim: optim.clone(),
            critic_optim: optim,
            ema_decay: 0.95,
            amd: AmdConfig::default(),
            gan: GanConfig::default(),
            lora: None,
            reward: "verifier".into(),
            reward_path: None,
            seed: 0,
            checkpoint_every: 50,
            log_every: 10,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid distill config: {0}")]
pub struct ConfigError(pub String);

impl DistillConfig {
    /// Rejects settings that cannot train (checked before anything is loaded).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError(m.to_string()));
        if self.student_steps == 0 {
            return bad("student_steps must be at least 1");
        }
        if self.prompts == 0 || self.group_size == 0 {
            return bad("prompts and group_size must be at least 1");
        }
        if self.method == Method::Amd && self.group_size < 2 {
            return bad("AMD needs group_size >= 2 (advantages are relative to a prompt group)");
        }
        if self.video_every > 0 && self.video_prompts == 0 {
            return bad("video_prompts must be at least 1 when video_every > 0");
        }
        if self.generator_every == 0 {
            return bad("generator_every must be at least 1");
        }
        if !(0.0..1.0).contains(&self.amd.s) {
            return bad("amd.s must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.amd.s_f) {
            return bad("amd.s_f must be in [0, 1) (weights 1 - s_f a stay positive)");
        }
        if let Some(shift) = self.student_shift.filter(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(ConfigError(format!(
                "student_shift {shift} must be a positive number"
            )));
        }
        crate::pipeline::sampler::check_guidance_interval(
            "guidance_interval",
            self.guidance_interval,
        )
        .map_err(ConfigError)?;
        if !(0.0 <= self.tau_min && self.tau_min < self.tau_max && self.tau_max <= 1.0) {
            return bad("need 0 <= tau_min < tau_max <= 1");
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return bad("ema_decay must be in [0, 1)");
        }
        if self.checkpoint_every == 0 || self.log_every == 0 {
            return bad("checkpoint_every and log_every must be at least 1");
        }
        match (self.reward.as_str(), &self.reward_path) {
            ("clip", None) => {
                return bad("reward \"clip\" needs reward_path (a CLIP or OpenCLIP directory)")
            }
            ("clip", Some(_)) | (_, None) => {}
            (_, Some(_)) => return bad("reward_path is only read by reward \"clip\""),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_student_shift_must_be_positive() {
        let cfg: DistillConfig = toml::from_str("student_shift = 1.0\n").unwrap();
        assert_eq!(cfg.student_shift, Some(1.0));
        cfg.validate().unwrap();
        for bad in ["0.0", "-3.0", "nan", "inf"] {
            let cfg: DistillConfig = toml::from_str(&format!("student_shift = {bad}\n")).unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("student_shift"), "{bad}: {err}");
        }
        // Left out, it is absent from a written config too (old runs resume unchanged).
        let text = toml::to_string(&DistillConfig::default()).unwrap();
        assert!(!text.contains("student_shift"), "{text}");
    }

    #[test]
    fn a_guidance_interval_must_be_flow_times_in_order() {
        let cfg: DistillConfig = toml::from_str("guidance_interval = [0.2, 1.0]\n").unwrap();
        assert_eq!(cfg.guidance_interval, Some([0.2, 1.0]));
        cfg.validate().unwrap();
        for bad in [
            "[0.5, 0.2]",
            "[0.3, 0.3]",
            "[-0.1, 1.0]",
            "[0.0, 1.5]",
            "[nan, 1.0]",
        ] {
            let text = format!("guidance_interval = {bad}\n");
            let cfg: DistillConfig = toml::from_str(&text).unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("guidance_interval"), "{bad}: {err}");
        }
        let text = toml::to_string(&DistillConfig::default()).unwrap();
        assert!(!text.contains("guidance_interval"), "{text}");
    }

    #[test]
    fn the_clip_reward_is_chosen_with_its_path() {
        let cfg: DistillConfig =
            toml::from_str("reward = \"clip\"\nreward_path = \"/models/PickScore_v1\"\n").unwrap();
        assert_eq!(cfg.reward, "clip");
        assert_eq!(
            cfg.reward_path.as_deref(),
            Some(std::path::Path::new("/models/PickScore_v1"))
        );
        cfg.validate().unwrap();

        let no_path: DistillConfig = toml::from_str("reward = \"clip\"\n").unwrap();
        let err = no_path.validate().unwrap_err().to_string();
        assert!(err.contains("reward_path"), "{err}");
        let stray: DistillConfig = toml::from_str("reward_path = \"/m\"\n").unwrap();
        let err = stray.validate().unwrap_err().to_string();
        assert!(err.contains("only read by reward \"clip\""), "{err}");
        DistillConfig::default().validate().unwrap();
    }
}
