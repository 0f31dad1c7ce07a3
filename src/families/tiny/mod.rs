//! The built-in tiny family: word-level tokenizer, small text encoder and a video denoiser (a
//! DiT or a UNet) trained with rectified flow in pixel space (32x32 RGB, images are one-frame
//! videos).

pub mod cond;
pub mod config;
pub mod distill;
pub mod dit;
mod family;
mod load;
pub mod manifest;
pub mod text;
pub mod tokenizer;
pub mod unet;

use candle_core::{Device, Result, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use std::sync::Mutex;

pub use config::{DenoiserKind, Prediction, TemporalAttention, TinyConfig};
pub use distill::TinyFamily;
pub use dit::Dit;
pub use family::Tiny;
pub use manifest::{flow_schedule, teacher_identity, TinySource};
pub use text::{TextCond, TextEncoder};
pub use tokenizer::{TinyTokenizer, TokenBatch};
pub use unet::UNet;

use crate::pipeline::{to_frames, BatchSpec, Denoiser, FlowSchedule, Generator};

/// Below this time an x0 prediction's velocity `(x_t - x0) / t` divides by this instead, so
/// the velocity (and the loss) stays bounded next to the clean end.
const X0_PREDICTION_MIN_T: f32 = 0.05;

/// The denoiser the architecture names, with its weights under `dit.` or `unet.`.
#[derive(Debug, Clone)]
pub struct TinyNet {
    body: NetBody,
    prediction: Prediction,
}

#[derive(Debug, Clone)]
enum NetBody {
    Dit(Box<Dit>),
    UNet(Box<UNet>),
}

impl TinyNet {
    pub fn new(vb: VarBuilder, cfg: &TinyConfig) -> Result<Self> {
        let vb = vb.pp(cfg.denoiser.prefix());
        let body = match cfg.denoiser {
            DenoiserKind::Dit => NetBody::Dit(Box::new(Dit::new(vb, cfg)?)),
            DenoiserKind::Unet => NetBody::UNet(Box::new(UNet::new(vb, cfg)?)),
        };
        Ok(Self {
            body,
            prediction: cfg.prediction,
        })
    }

    /// Flow-matching velocity `eps - x0` for `x` `[B, F, C, H, W]` at times `t` (`[B]`, in
    /// `[0, 1]`, 1 = pure noise) under the prompt conditioning `text`.
    pub fn forward(&self, x: &Tensor, t: &[f32], text: &TextCond) -> Result<Tensor> {
        Ok(self.forward_with_features(x, t, text, false)?.0)
    }

    /// [`Self::forward`] reading `self_cond`, an earlier x0 estimate shaped like `x`
    /// ([`TinyConfig::self_condition`]; zeros when `None`, ignored by a model without it).
    pub fn forward_self_conditioned(
        &self,
        x: &Tensor,
        self_cond: Option<&Tensor>,
        t: &[f32],
        text: &TextCond,
        features: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (out, feats) = match &self.body {
            NetBody::Dit(n) => n.forward_with_features(x, self_cond, t, text, features)?,
            NetBody::UNet(n) => n.forward_with_features(x, t, text, features)?,
        };
        let v = match self.prediction {
            Prediction::Velocity => out,
            Prediction::X0 => {
                let inv: Vec<f32> = t.iter().map(|t| 1.0 / t.max(X0_PREDICTION_MIN_T)).collect();
                (x - out)?.broadcast_mul(&crate::pipeline::schedule::row_scale(&inv, x)?)?
            }
        };
        Ok((v, feats))
    }

    /// [`Self::forward`], also returning mid-network tokens `[B, T, feature_dim]` when
    /// `features` is set: what a discriminator head reads.
    pub fn forward_with_features(
        &self,
        x: &Tensor,
        t: &[f32],
        text: &TextCond,
        features: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.forward_self_conditioned(x, None, t, text, features)
    }

    /// The velocity `motion_coords` reads from each prompt, in px per clip `[B, 2]` (x, y);
    /// `None` for a denoiser without it.
    pub fn clip_velocity(&self, text: &TextCond, patch: usize) -> Result<Option<Tensor>> {
        match &self.body {
            NetBody::Dit(n) => n
                .clip_velocity(text)?
                .map(|v| v.to_dtype(candle_core::DType::F32)? * patch as f64)
                .transpose(),
            NetBody::UNet(_) => Ok(None),
        }
    }

    /// Width of the tokens [`Self::forward_with_features`] returns.
    pub fn feature_dim(&self) -> usize {
        match &self.body {
            NetBody::Dit(n) => n.dim(),
            NetBody::UNet(n) => n.feature_dim(),
        }
    }
}

/// Conditioning for one batch: the prompts and, when CFG is on, the negative prompts.
pub struct TinyCond {
    pub cond: TextCond,
    pub uncond: Option<TextCond>,
    /// A self-conditioned model's last x0 estimate for these rows, which the next
    /// [`Denoiser::predict_x0`] reads and replaces: one chain of sampler steps per
    /// conditioning. `None` for a model without `self_condition` and for conditionings
    /// scored at unrelated points (distillation), which read zeros.
    pub self_cond: Option<Mutex<Option<Tensor>>>,
}

impl TinyCond {
    /// Prompts (and negatives) for one sampling chain of `model`.
    pub fn new(model: &TinyModel, cond: TextCond, uncond: Option<TextCond>) -> Self {
        Self {
            cond,
            uncond,
            self_cond: model.cfg.self_condition.then(|| Mutex::new(None)),
        }
    }

    /// Forgets the last estimate, so that the next step starts a new chain (a conditioning
    /// reused for another sampling run).
    pub fn start_chain(&self) {
        if let Some(state) = &self.self_cond {
            *state.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// The estimate the next step reads (`None`: zeros).
    fn estimate(&self) -> Option<Tensor> {
        let state = self.self_cond.as_ref()?;
        state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Keeps `x0` (detached) for the chain's next step.
    fn remember(&self, x0: &Tensor) {
        if let Some(state) = &self.self_cond {
            *state.lock().unwrap_or_else(|e| e.into_inner()) = Some(x0.detach());
        }
    }
}

/// Text encoder + denoiser + tokenizer: everything needed to go from prompts to pixels.
#[derive(Clone)]
pub struct TinyModel {
    pub cfg: TinyConfig,
    pub tokenizer: TinyTokenizer,
    pub text: TextEncoder,
    pub net: TinyNet,
    /// The schedule of images, and of videos unless `video_schedule` differs.
    pub schedule: FlowSchedule,
    /// The schedule of videos (`sampling.video_shift`).
    pub video_schedule: FlowSchedule,
    device: Device,
}

impl TinyModel {
    /// Builds the model from `vb` (weights from a file, or fresh trainable variables).
    pub fn new(
        vb: VarBuilder,
        cfg: &TinyConfig,
        tokenizer: TinyTokenizer,
        schedule: FlowSchedule,
    ) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            text: TextEncoder::new(vb.pp("text"), cfg)?,
            net: TinyNet::new(vb.clone(), cfg)?,
            tokenizer,
            schedule,
            video_schedule: schedule,
            device: vb.device().clone(),
        })
    }

    /// The same model sampling videos with `schedule`.
    pub fn with_video_schedule(self, schedule: FlowSchedule) -> Self {
        Self {
            video_schedule: schedule,
            ..self
        }
    }

    /// The schedule samples of `frames` frames are drawn with.
    pub fn schedule_for_frames(&self, frames: usize) -> &FlowSchedule {
        if frames > 1 {
            &self.video_schedule
        } else {
            &self.schedule
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Encodes prompts (always padded to the full text length, so a row's result does not
    /// depend on the other prompts of its batch).
    pub fn encode(&self, prompts: &[&str]) -> Result<TextCond> {
        self.text.forward(&self.tokens(prompts)?)
    }

    /// [`Self::encode`] with the pooled vector faded toward the empty prompt's by
    /// `empty_share` ([`TextEncoder::forward_pooling`]).
    pub fn encode_pooling(&self, prompts: &[&str], empty_share: f32) -> Result<TextCond> {
        self.text
            .forward_pooling(&self.tokens(prompts)?, empty_share)
    }

    /// The token ids every text encoder of this architecture reads, padded to the full length.
    pub fn tokens(&self, prompts: &[&str]) -> Result<TokenBatch> {
        self.tokenizer
            .encode_batch(prompts, self.cfg.text_max_len)
            .map_err(candle_core::Error::wrap)
    }

    /// Flow velocity for `x` `[B, F, C, H, W]`.
    pub fn velocity(&self, x: &Tensor, t: &[f32], text: &TextCond) -> Result<Tensor> {
        self.net.forward(x, t, text)
    }

    /// `x0 = x_t - t v` for rectified flow.
    pub fn x0_from_velocity(&self, x: &Tensor, t: &[f32], v: &Tensor) -> Result<Tensor> {
        let t = crate::pipeline::schedule::row_scale(t, x)?;
        x - v.broadcast_mul(&t)?
    }
}

impl Generator for TinyModel {
    type Schedule = FlowSchedule;

    fn schedule(&self) -> &FlowSchedule {
        &self.schedule
    }

    fn schedule_for(&self, spec: &BatchSpec) -> &FlowSchedule {
        self.schedule_for_frames(spec.frames)
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn sample_shape(&self, spec: &BatchSpec) -> Result<Vec<usize>> {
        Ok(vec![
            spec.frames,
            self.cfg.channels,
            spec.height,
            spec.width,
        ])
    }

    fn condition_batch(&self, spec: &BatchSpec, cfg: bool) -> Result<TinyCond> {
        let prompts: Vec<&str> = spec.prompts.iter().map(String::as_str).collect();
        let cond = self.encode(&prompts)?;
        let uncond = if cfg {
            let neg: Vec<&str> = spec.negative_prompts.iter().map(String::as_str).collect();
            Some(self.encode(&neg)?)
        } else {
            None
        };
        Ok(TinyCond::new(self, cond, uncond))
    }

    fn frames(&self, x0: &Tensor) -> Result<Vec<Vec<RgbImage>>> {
        to_frames(x0)
    }
}

impl Denoiser for TinyModel {
    type Cond = TinyCond;

    fn select_rows(&self, cond: &TinyCond, idx: &Tensor) -> Result<TinyCond> {
        let estimate = cond
            .estimate()
            .map(|e| e.index_select(idx, 0))
            .transpose()?;
        Ok(TinyCond {
            cond: cond.cond.select(idx)?,
            uncond: cond.uncond.as_ref().map(|u| u.select(idx)).transpose()?,
            self_cond: cond.self_cond.as_ref().map(|_| Mutex::new(estimate)),
        })
    }

    fn predict_x0(&self, x: &Tensor, t: &[f32], cond: &TinyCond, guidance: f32) -> Result<Tensor> {
        let estimate = cond.estimate();
        let x0 = match (&cond.uncond, guidance > 1.0) {
            (Some(uncond), true) => {
                // One pass over [cond; uncond], then v = vu + w (vc - vu); both branches read
                // the guided estimate of the step before.
                let b = x.dim(0)?;
                let xx = Tensor::cat(&[x, x], 0)?;
                let ee = estimate.map(|e| Tensor::cat(&[&e, &e], 0)).transpose()?;
                let tt: Vec<f32> = t.iter().chain(t.iter()).copied().collect();
                let both = cond.cond.cat(uncond)?;
                let (v, _) =
                    self.net
                        .forward_self_conditioned(&xx, ee.as_ref(), &tt, &both, false)?;
                let vc = v.narrow(0, 0, b)?;
                let vu = v.narrow(0, b, b)?;
                let v = (&vu + ((vc - &vu)? * guidance as f64)?)?;
                self.x0_from_velocity(x, t, &v)?
            }
            _ => {
                let (v, _) = self.net.forward_self_conditioned(
                    x,
                    estimate.as_ref(),
                    t,
                    &cond.cond,
                    false,
                )?;
                self.x0_from_velocity(x, t, &v)?
            }
        };
        cond.remember(&x0);
        Ok(x0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarMap;

    /// An x0-predicting net is the same body read differently: `x_t - t v` gives back exactly
    /// what a velocity-predicting net with the same weights outputs, for the DiT and the UNet.
    #[test]
    fn x0_prediction_turns_the_body_output_into_a_velocity() -> Result<()> {
        let dev = Device::Cpu;
        let tok = TinyTokenizer::from_vocabulary(&crate::world::vocabulary()).unwrap();
        let dit = TinyConfig::small_for_tests(tok.vocab_size());
        let unet = TinyConfig {
            denoiser: DenoiserKind::Unet,
            unet_channels: vec![8, 16, 16],
            depth: 1,
            ..dit.clone()
        };
        for cfg in [dit, unet] {
            let map = VarMap::new();
            let vb = crate::nn::random_var_builder(&map, 3, DType::F32, &dev);
            let velocity = TinyModel::new(vb.clone(), &cfg, tok.clone(), FlowSchedule::default())?;
            let x0_cfg = TinyConfig {
                prediction: Prediction::X0,
                ..cfg.clone()
            };
            let x0_net = TinyModel::new(vb, &x0_cfg, tok.clone(), FlowSchedule::default())?;
            let x = Tensor::randn(0f32, 1.0, (2, 1, 3, 32, 32), &dev)?;
            let t = [0.3f32, 0.9];
            let text = velocity.encode(&["a red circle", "two blue crosses"])?;
            let body = velocity.velocity(&x, &t, &text)?;
            let v = x0_net.velocity(&x, &t, &text)?;
            let x0 = x0_net.x0_from_velocity(&x, &t, &v)?;
            let diff = (x0 - &body)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-4,
                "{:?}: x0 differs from the body by {diff}",
                cfg.denoiser
            );
            let moved = (v - &body)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(moved > 1e-2, "the velocity is not derived from x0");
        }
        Ok(())
    }

    /// The largest velocity difference of two models on the same random `frames`-frame input.
    fn velocity_gap(a: &TinyModel, b: &TinyModel, frames: usize) -> Result<f32> {
        let text = a.encode(&["a red circle moving left", "two blue crosses"])?;
        let x = Tensor::randn(0f32, 1.0, (2, frames, 3, 32, 32), &Device::Cpu)?;
        let va = a.velocity(&x, &[0.4, 0.8], &text)?;
        let vb = b.velocity(&x, &[0.4, 0.8], &text)?;
        gap(&va, &vb)
    }

    /// The largest elementwise difference of two tensors.
    fn gap(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// The tokenizer, the small test config, and that config with one more manifest line (as
    /// a manifest's `[architecture]` would read it).
    fn test_config_and(line: &str) -> (TinyTokenizer, TinyConfig, TinyConfig) {
        let tok = TinyTokenizer::from_vocabulary(&crate::world::vocabulary()).unwrap();
        let base = TinyConfig::small_for_tests(tok.vocab_size());
        let toml = format!("{}{line}\n", toml::to_string(&base).unwrap());
        let with = toml::from_str(&toml).unwrap();
        (tok, base, with)
    }

    /// A model of `base` with random (non-trivial) weights, and one of `with` on the same
    /// weights plus its own new ones at their true initialization (zero outputs), as a warm
    /// start would make it. The UNet must refuse `with`'s key (`key` in its error).
    fn plain_and_variant(
        base: &TinyConfig,
        with: &TinyConfig,
        key: &str,
        tok: TinyTokenizer,
        seed: u64,
    ) -> Result<(VarMap, TinyModel, TinyModel)> {
        let unet = TinyConfig {
            denoiser: DenoiserKind::Unet,
            unet_channels: vec![8, 16, 16],
            ..with.clone()
        };
        assert!(unet.validate().unwrap_err().contains(key));
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, seed, DType::F32, &dev);
        let plain = TinyModel::new(vb, base, tok.clone(), FlowSchedule::default())?;
        let vb = crate::nn::seeded_var_builder(&map, seed, DType::F32, &dev);
        let variant = TinyModel::new(vb, with, tok, FlowSchedule::default())?;
        Ok((map, plain, variant))
    }

    /// Sets every variable of `map` whose name contains `pattern` to `value(var)`; returns how
    /// many it set.
    fn set_vars(
        map: &VarMap,
        pattern: &str,
        value: impl Fn(&candle_core::Var) -> Result<Tensor>,
    ) -> Result<usize> {
        let data = map.data().lock().unwrap();
        let mut n = 0;
        for (_, var) in data.iter().filter(|(name, _)| name.contains(pattern)) {
            var.set(&value(var)?)?;
            n += 1;
        }
        Ok(n)
    }

    /// `frame_time` and `frame_words` start as the plain model (their slopes are zero), and
    /// once trained they change each frame by its clip time: with the frames kept apart
    /// (temporal attention off), the middle frame of three (clip time 1/2) is the plain
    /// model's (up to f32 rounding), the first and last are not, and images never change.
    #[test]
    fn frame_time_and_frame_words_condition_each_frame_by_its_clip_time() -> Result<()> {
        for (key, seed) in [("frame_time", 7), ("frame_words", 13)] {
            per_frame_conditioning(key, seed)?;
        }
        Ok(())
    }

    fn per_frame_conditioning(key: &str, seed: u64) -> Result<()> {
        let dev = Device::Cpu;
        let (tok, plain_cfg, timed_cfg) = test_config_and(&format!("{key} = true"));
        assert_ne!(plain_cfg, timed_cfg, "{key}");
        let (map, plain, timed) = plain_and_variant(&plain_cfg, &timed_cfg, key, tok, seed)?;
        // Per-frame rows regroup the same sums: equal up to f32 rounding.
        let init_gap = velocity_gap(&plain, &timed, 4)?;
        assert!(
            init_gap < 1e-5,
            "{key}: a zero slope changes nothing: {init_gap}"
        );

        set_vars(&map, ".temporal.out.", |v| v.zeros_like())?;
        let set = set_vars(&map, &format!("{key}."), |v| {
            Tensor::randn(0f32, 0.5, v.shape(), &dev)
        })?;
        assert_eq!(set, 2, "{key}: one weight and bias");
        assert_eq!(
            velocity_gap(&plain, &timed, 1)?,
            0.0,
            "{key}: images must not change"
        );
        let text = plain.encode(&["a red circle moving left", "a blue cross growing"])?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 3, 32, 32), &dev)?;
        let a = plain.velocity(&x, &[0.4, 0.8], &text)?;
        let b = timed.velocity(&x, &[0.4, 0.8], &text)?;
        let gap = |k: usize| -> Result<f32> {
            (a.narrow(1, k, 1)? - b.narrow(1, k, 1)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()
        };
        assert!(
            gap(1)? < 1e-5,
            "{key}: clip time 1/2 is the plain conditioning: {}",
            gap(1)?
        );
        assert!(
            gap(0)? > 1e-3 && gap(2)? > 1e-3,
            "{key}: {} {}",
            gap(0)?,
            gap(2)?
        );
        Ok(())
    }

    /// A self-conditioned model's sampler carries each step's x0 to the next: the first step
    /// reads zeros, the next reads the first's estimate, rows that leave keep their own, and a
    /// new chain starts from zeros again. A model without the option keeps no state.
    #[test]
    fn self_conditioning_carries_each_steps_estimate_to_the_next() -> Result<()> {
        let dev = Device::Cpu;
        let (tok, plain_cfg, sc_cfg) = test_config_and("self_condition = true");
        let (map, plain, sc) = plain_and_variant(&plain_cfg, &sc_cfg, "self_condition", tok, 17)?;
        let set = set_vars(&map, "self_cond.", |v| {
            Tensor::randn(0f32, 0.5, v.shape(), &dev)
        })?;
        assert_eq!(set, 2, "one weight and bias");
        let text = sc.encode(&["a red circle", "a blue cross", "two green squares"])?;
        let x = Tensor::randn(0f32, 1.0, (3, 1, 3, 32, 32), &dev)?;
        let t = [0.9f32; 3];
        let reading = |x: &Tensor, t: &[f32], text: &TextCond, e: Option<&Tensor>| {
            let (v, _) = sc.net.forward_self_conditioned(x, e, t, text, false)?;
            sc.x0_from_velocity(x, t, &v)
        };
        let chain = TinyCond::new(&sc, text.clone(), None);
        let first = sc.predict_x0(&x, &t, &chain, 1.0)?;
        assert_eq!(gap(&first, &reading(&x, &t, &text, None)?)?, 0.0);
        let second = sc.predict_x0(&x, &t, &chain, 1.0)?;
        assert!(gap(&second, &reading(&x, &t, &text, Some(&first))?)? < 1e-6);
        assert!(gap(&second, &first)? > 1e-3, "the estimate must be read");

        let idx = Tensor::new(&[0u32, 2], &dev)?;
        let kept = sc.select_rows(&chain, &idx)?;
        let (x2, text2) = (x.index_select(&idx, 0)?, text.select(&idx)?);
        let third = sc.predict_x0(&x2, &t[..2], &kept, 1.0)?;
        let own = second.index_select(&idx, 0)?;
        assert!(gap(&third, &reading(&x2, &t[..2], &text2, Some(&own))?)? < 1e-6);

        chain.start_chain();
        assert_eq!(gap(&sc.predict_x0(&x, &t, &chain, 1.0)?, &first)?, 0.0);
        assert!(TinyCond::new(&plain, text, None).self_cond.is_none());
        Ok(())
    }

    /// `contrast_input` starts as the plain model, is refused by the UNet, and once trained
    /// reads its map; the map is blind to a colour added to a frame and to the frame's
    /// negation (a shape on black and on white), not to what is drawn.
    #[test]
    fn contrast_input_reads_a_map_blind_to_background_and_sign() -> Result<()> {
        let dev = Device::Cpu;
        let (tok, plain_cfg, cfg) = test_config_and("contrast_input = true");
        let (map, plain, variant) = plain_and_variant(&plain_cfg, &cfg, "contrast_input", tok, 19)?;
        assert_eq!(velocity_gap(&plain, &variant, 1)?, 0.0);
        let set = set_vars(&map, "contrast.", |v| {
            Tensor::randn(0f32, 0.5, v.shape(), &dev)
        })?;
        assert_eq!(set, 2, "one weight and bias");
        assert!(
            velocity_gap(&plain, &variant, 1)? > 1e-3,
            "the map must be read"
        );

        let x = Tensor::randn(0f32, 1.0, (2, 3, 3, 32, 32), &dev)?;
        let m = dit::contrast_map(&x)?;
        assert_eq!(m.dims(), [2, 3, 1, 32, 32]);
        let colour = Tensor::randn(0f32, 1.0, (2, 3, 3, 1, 1), &dev)?;
        assert!(gap(&dit::contrast_map(&x.broadcast_add(&colour)?)?, &m)? < 1e-4);
        assert!(gap(&dit::contrast_map(&x.neg()?)?, &m)? < 1e-6);
        let other = Tensor::randn(0f32, 1.0, (2, 3, 3, 32, 32), &dev)?;
        assert!(gap(&dit::contrast_map(&other)?, &m)? > 0.1);
        Ok(())
    }

    /// `motion_coords` starts as the plain model (zero velocity), is refused by the UNet, and
    /// a video's loss sends gradient to the velocity map through the moving positions (what a
    /// fixed embedding computed on the host could not).
    #[test]
    fn motion_coords_start_still_and_learn_a_velocity() -> Result<()> {
        let dev = Device::Cpu;
        let (tok, plain_cfg, moving_cfg) = test_config_and("motion_coords = true");
        let (map, plain, moving) =
            plain_and_variant(&plain_cfg, &moving_cfg, "motion_coords", tok, 11)?;
        assert_eq!(
            velocity_gap(&plain, &moving, 1)?,
            0.0,
            "images must not change"
        );
        let gap = velocity_gap(&plain, &moving, 4)?;
        assert!(gap < 1e-5, "zero velocity is the fixed embedding: {gap}");

        let text = moving.encode(&["a red circle moving left", "a blue cross moving up"])?;
        let x = Tensor::randn(0f32, 1.0, (2, 4, 3, 32, 32), &dev)?;
        let loss = moving.velocity(&x, &[0.7, 0.9], &text)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        let data = map.data().lock().unwrap();
        let w = data.get("dit.motion.weight").expect("the velocity map");
        let g = grads
            .get(w.as_tensor())
            .expect("a gradient for the velocity map");
        assert!(g.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    /// `temporal = "clip"` reads from a manifest's `[architecture]` (absent means `frames`),
    /// leaves images exactly as they were, changes what a video sees with the same weights,
    /// costs more per video, and is refused for the UNet.
    #[test]
    fn clip_temporal_attention_changes_videos_only() -> Result<()> {
        let dev = Device::Cpu;
        let tok = TinyTokenizer::from_vocabulary(&crate::world::vocabulary()).unwrap();
        let frames_cfg = TinyConfig::small_for_tests(tok.vocab_size());
        let mut table: toml::Table =
            toml::from_str(&toml::to_string(&frames_cfg).unwrap()).unwrap();
        assert!(
            !table.contains_key("temporal"),
            "the default is not written out"
        );
        table.insert("temporal".into(), "clip".into());
        let clip_cfg: TinyConfig = table.try_into().unwrap();
        assert_eq!(clip_cfg.temporal, TemporalAttention::Clip);
        assert!(clip_cfg.macs_per_sample(8) > frames_cfg.macs_per_sample(8));
        assert_eq!(clip_cfg.macs_per_sample(1), frames_cfg.macs_per_sample(1));
        let unet = TinyConfig {
            denoiser: DenoiserKind::Unet,
            unet_channels: vec![8, 16, 16],
            ..clip_cfg.clone()
        };
        assert!(unet.validate().unwrap_err().contains("temporal"));

        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 3, DType::F32, &dev);
        let by_frames = TinyModel::new(
            vb.clone(),
            &frames_cfg,
            tok.clone(),
            FlowSchedule::default(),
        )?;
        let by_clip = TinyModel::new(vb, &clip_cfg, tok.clone(), FlowSchedule::default())?;
        let max_diff = |frames: usize| velocity_gap(&by_frames, &by_clip, frames);
        assert_eq!(max_diff(1)?, 0.0, "images must not change");
        assert!(max_diff(4)? > 1e-3, "videos must see the whole clip");
        Ok(())
    }

    /// `temporal = "frames+clip"` adds a clip-wide branch whose output starts at zero: with the
    /// same trained weights the model is exactly the `frames` model (a warm start changes
    /// nothing), and once that branch has weights it changes videos only.
    #[test]
    fn frames_and_clip_branch_starts_as_the_frames_model() -> Result<()> {
        let dev = Device::Cpu;
        let (tok, frames_cfg, both_cfg) = test_config_and("temporal = \"frames+clip\"");
        assert_eq!(both_cfg.temporal, TemporalAttention::FramesAndClip);
        assert!(both_cfg.macs_per_sample(8) > frames_cfg.macs_per_sample(8));
        assert_eq!(both_cfg.macs_per_sample(1), frames_cfg.macs_per_sample(1));

        let map = VarMap::new();
        // The `frames` model's weights, non-trivial; then the branch's own (zero-out) init on
        // the same map, which reuses every shared weight.
        let vb = crate::nn::random_var_builder(&map, 5, DType::F32, &dev);
        let by_frames = TinyModel::new(vb, &frames_cfg, tok.clone(), FlowSchedule::default())?;
        let vb = crate::nn::seeded_var_builder(&map, 5, DType::F32, &dev);
        let by_both = TinyModel::new(vb, &both_cfg, tok, FlowSchedule::default())?;
        let max_diff = |frames: usize| velocity_gap(&by_frames, &by_both, frames);
        assert_eq!(max_diff(4)?, 0.0, "a fresh clip branch adds exactly zero");
        let set = set_vars(&map, ".clip.out.", |v| {
            Tensor::randn(0f32, 0.1, v.shape(), &dev)
        })?;
        assert_eq!(set, 2 * frames_cfg.depth, "one weight and bias per block");
        assert_eq!(max_diff(1)?, 0.0, "images must not change");
        assert!(max_diff(4)? > 1e-3, "videos must see the clip branch");
        Ok(())
    }
}
