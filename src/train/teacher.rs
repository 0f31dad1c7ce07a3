//! `fewstep train-teacher`: flow-matching training of the tiny family on ShapesWorld.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::binding::TokenBinding;
use super::shape_head::{ShapeHead, ShapeSupervision, Targets};
use super::{named_vars, tensors_of, AdamW, AdamWConfig, Checkpoint, Ema};
use crate::families::tiny::{TinyConfig, TinyModel, TinyTokenizer};
use crate::nn::attention::capture_cross_attention_with_grad;
use crate::pipeline::from_frames;
use crate::pipeline::{FlowSchedule, NoiseSchedule};
use crate::world::{self, Split};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherConfig {
    pub architecture: TinyConfig,
    pub optim: AdamWConfig,
    pub iterations: u64,
    pub image_batch: usize,
    pub video_batch: usize,
    /// Probability of training a row on the empty prompt (for CFG).
    pub cfg_dropout: f64,
    /// How the per-row velocity error is weighted over noise levels.
    #[serde(default, skip_serializing_if = "LossWeighting::is_velocity")]
    pub loss_weighting: LossWeighting,
    /// Extra weight on the pixels near an edge of the clean frame (none when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_weighting: Option<EdgeWeighting>,
    /// A cross-entropy on every pixel's shape, read from the DiT's mid-network tokens by a
    /// training-only head ([`super::shape_head`]); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape_supervision: Option<ShapeSupervision>,
    /// A loss on the DiT's cross-attention asking each object's tokens to read their own
    /// shape word, not their neighbour's ([`super::binding`]); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_binding: Option<TokenBinding>,
    /// Simple scenes (one large object on black, or on `background_weights`' backgrounds
    /// when set) mixed into the image batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curriculum: Option<Curriculum>,
    /// Relative weights of circle, square, triangle and cross for every object of every
    /// training scene, images and videos (uniform when absent). The curriculum's own weights
    /// still set the simple scenes' mix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape_weights: Option<[f64; 4]>,
    /// Relative weights of the scene kinds (one object, two distinct objects, "two X") in
    /// every training scene, images and videos (the world's own 0.45 / 0.35 / 0.2 when
    /// absent). Two-object scenes are where shapes fail most: the shape word must be bound
    /// to its own object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scene_kinds: Option<[f64; 3]>,
    /// Relative weights of black, gray and white backgrounds in every training scene, stated
    /// in the prompt or not (uniform when absent). Shapes fail most on gray: phase 16 missed
    /// the cross in 30 of 33 gray-background prompts and 8 of 27 black ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background_weights: Option<[f64; 3]>,
    /// The same for the video rows alone (`scene_kinds` when absent). `motion_coords` gives a
    /// clip one velocity, which fits single objects and "two X" (one motion) but not two
    /// distinct objects moving apart, so a run that teaches motion wants more of the former.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_scene_kinds: Option<[f64; 3]>,
    /// Flow shift of the video rows' noise levels, `t' = s t / (1 + (s - 1) t)` on the
    /// logit-normal draw (1 = none). Eight frames show one layout eight times, so a video's
    /// path is visible at noise levels where an image's layout is not; its direction is
    /// decided above t = 0.9, where the unshifted draw trains 1.4% of the time (SD3's
    /// resolution-dependent shift, Wan's `sample_shift`). The manifest's `[sampling]
    /// video_shift` samples with a shift of its own: phase 14 trains at 10 and samples at 3,
    /// because at 10 the last of 20 Euler steps spans t = 0.34 to 0 and the video FD rose 60%.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub video_shift: f32,
    /// The same flow shift for the image rows (1 = none). A shape, and which object gets it,
    /// is decided at high noise, which the unshifted draw trains least; the manifest samples
    /// images at `shift` 3 (README, "Session 22"), and SD3 trains at the shift it samples at.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub image_shift: f32,
    /// Name prefixes of the only parameters that train (all of them when absent); the rest
    /// keep their warm-start values. With only video-only parts (`dit.frame_words`,
    /// `dit.motion`, `dit.blocks.N.temporal`), images are unchanged by construction, which a
    /// run that teaches video words wants: a restart at full learning rate with few images
    /// per step costs image pass rate (README, "Session 19").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_only: Option<Vec<String>>,
    /// With `local_text`, the pooled prompt fades from the prompt's own to the empty prompt's
    /// over these steps instead of switching at once (none when absent). Switched at once from
    /// a trained teacher, `local_text` lost 23 points that 2,000 steps did not win back
    /// (README, "Session 28"): what the global path carried has to move to cross-attention.
    /// Faded over 1,500 steps from phase 16, it cost as much (README, "Session 30").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_text_fade: Option<LocalTextFade>,
    pub ema_decay: f64,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub log_every: u64,
}

/// The share of each image batch drawn by [`world::sample_simple_spec`]: `share` until step
/// `hold`, then falling linearly to 0 at step `until`.
///
/// Why: in the full world an object's shape only lowers the loss once its position, size and
/// colour are settled, so shape is learnt last and slowest; scenes that hold one large object
/// make shape the main thing left to learn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Curriculum {
    pub share: f64,
    pub hold: u64,
    pub until: u64,
    /// Relative weights of circle, square, triangle and cross in the simple scenes: more of the
    /// shapes the model draws worst (crosses). Uniform when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape_weights: Option<[f64; 4]>,
}

impl Curriculum {
    /// The simple share at `step`.
    pub fn share_at(&self, step: u64) -> f64 {
        if step <= self.hold {
            self.share
        } else if step >= self.until {
            0.0
        } else {
            self.share * (self.until - step) as f64 / (self.until - self.hold) as f64
        }
    }
}

/// The empty prompt's share of the pooled prompt: 0 until step `start`, rising linearly to 1
/// at step `end`, and 1 from then on (where the model is the `local_text` it is saved as).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTextFade {
    pub start: u64,
    pub end: u64,
}

impl LocalTextFade {
    /// The empty prompt's share at `step`.
    pub fn share_at(&self, step: u64) -> f32 {
        if step <= self.start {
            0.0
        } else if step >= self.end {
            1.0
        } else {
            (step - self.start) as f32 / (self.end - self.start) as f32
        }
    }
}

impl Default for TeacherConfig {
    fn default() -> Self {
        Self {
            architecture: TinyConfig::default(),
            optim: AdamWConfig {
                lr: 1e-3,
                warmup_steps: 200,
                clip_grad_norm: 1.0,
                weight_decay: 0.01,
                ..Default::default()
            },
            iterations: 4000,
            image_batch: 48,
            video_batch: 4,
            cfg_dropout: 0.1,
            loss_weighting: LossWeighting::Velocity,
            edge_weighting: None,
            shape_supervision: None,
            token_binding: None,
            curriculum: None,
            shape_weights: None,
            scene_kinds: None,
            background_weights: None,
            video_scene_kinds: None,
            video_shift: 1.0,
            image_shift: 1.0,
            train_only: None,
            local_text_fade: None,
            ema_decay: 0.999,
            seed: 0,
            checkpoint_every: 100,
            log_every: 10,
        }
    }
}

fn one() -> f32 {
    1.0
}

fn is_one(x: &f32) -> bool {
    *x == 1.0
}

fn is_zero_f64(x: &f64) -> bool {
    *x == 0.0
}

/// The weight of a row's squared velocity error as a function of its noise level `t`.
///
/// `v = noise - x0` and `x0 = x_t - t v`, so an error `e` in `v` is an error `t e` in `x0`:
/// the plain velocity loss weighs x0 errors by `1 / t^2`, which favours the nearly clean end
/// (texture) over the noisy end where layout and shape are decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossWeighting {
    /// `|v - v*|^2`, uniform in velocity (rectified flow as in SD3).
    #[default]
    Velocity,
    /// `t^2 |v - v*|^2 = |x0 - x0*|^2`, uniform in the clean-sample estimate. Rescaled by the
    /// batch's mean `t^2` so the loss keeps the velocity loss's scale (and learning rate).
    X0,
}

/// Pixel weights `1 + strength` within `radius` pixels of a colour edge of the target, 1
/// elsewhere, scaled to mean 1 ([`super::edge_weight::edge_weights`]): the loss of a shape's
/// outline (a cross's notches) against the plain background that fills most of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeWeighting {
    pub strength: f32,
    #[serde(default = "one_pixel")]
    pub radius: usize,
}

fn one_pixel() -> usize {
    1
}

impl LossWeighting {
    fn is_velocity(&self) -> bool {
        *self == LossWeighting::Velocity
    }

    /// Per-row weights with mean 1.
    fn weights(self, t: &[f32]) -> Vec<f32> {
        match self {
            LossWeighting::Velocity => vec![1.0; t.len()],
            LossWeighting::X0 => {
                let w: Vec<f32> = t.iter().map(|t| t * t).collect();
                let mean = w.iter().sum::<f32>() / w.len().max(1) as f32;
                w.iter().map(|x| x / mean.max(1e-12)).collect()
            }
        }
    }
}

impl TeacherConfig {
    /// Checks the architecture builds and that training will see every prompt whole: a text
    /// length shorter than the grammar's longest prompt silently cuts two-object prompts (the
    /// first teachers used 16 tokens and lost the tail of 15% of their image prompts).
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.architecture.validate()?;
        let need = world::MAX_PROMPT_WORDS + 1;
        if self.architecture.text_max_len < need {
            return Err(format!(
                "architecture: text_max_len is {}, but prompts have up to {} words plus [BOS]; \
                 set it to at least {need}",
                self.architecture.text_max_len,
                world::MAX_PROMPT_WORDS
            ));
        }
        if self.image_batch == 0 {
            return Err("image_batch must be at least 1".into());
        }
        for (key, shift) in [
            ("image_shift", self.image_shift),
            ("video_shift", self.video_shift),
        ] {
            if !(shift.is_finite() && shift > 0.0) {
                return Err(format!("{key} {shift} must be a positive number"));
            }
        }
        if let Some(e) = self.edge_weighting {
            if !(e.strength.is_finite() && e.strength >= 0.0) || e.radius > 4 {
                return Err(format!(
                    "edge_weighting: strength must be a number >= 0 and radius at most 4 (got strength {}, radius {})",
                    e.strength, e.radius
                ));
            }
        }
        if let Some(s) = self.shape_supervision {
            s.validate()?;
            if self.architecture.denoiser != crate::families::tiny::DenoiserKind::Dit {
                return Err(
                    "shape_supervision: needs the DiT denoiser (it reads its tokens)".into(),
                );
            }
        }
        if let Some(b) = self.token_binding {
            b.validate()?;
            if self.architecture.denoiser != crate::families::tiny::DenoiserKind::Dit {
                return Err(
                    "token_binding: needs the DiT denoiser (it reads its patch tokens' attention)"
                        .into(),
                );
            }
        }
        check_weights("shape_weights", self.shape_weights)?;
        check_weights("scene_kinds", self.scene_kinds)?;
        check_weights("background_weights", self.background_weights)?;
        check_weights("video_scene_kinds", self.video_scene_kinds)?;
        if self.train_only.as_ref().is_some_and(Vec::is_empty) {
            return Err("train_only is empty: it would train nothing (leave it out to train every parameter)".into());
        }
        if let Some(f) = self.local_text_fade {
            if !self.architecture.local_text {
                return Err("local_text_fade: needs `local_text = true` in the architecture (the fade ends there)".into());
            }
            if f.start >= f.end || f.end > self.iterations {
                return Err(format!(
                    "local_text_fade: needs start < end <= iterations (got start {}, end {}, iterations {})",
                    f.start, f.end, self.iterations
                ));
            }
        }
        if let Some(c) = &self.curriculum {
            check_weights("curriculum: shape_weights", c.shape_weights)?;
            if !(0.0..=1.0).contains(&c.share) || c.hold > c.until {
                return Err(format!(
                    "curriculum: share must be in [0, 1] and hold <= until (got share {}, hold {}, until {})",
                    c.share, c.hold, c.until
                ));
            }
        }
        Ok(())
    }
}

/// The parameters the optimizer steps: those named by a prefix of `train_only`, or all. A
/// prefix that names none is an error (a typo would otherwise freeze the whole model).
fn trained_vars(
    vars: &[(String, Var)],
    train_only: Option<&[String]>,
) -> anyhow::Result<Vec<(String, Var)>> {
    let Some(prefixes) = train_only else {
        return Ok(vars.to_vec());
    };
    if let Some(p) = prefixes
        .iter()
        .find(|p| !vars.iter().any(|(name, _)| name.starts_with(p.as_str())))
    {
        anyhow::bail!("train_only: no parameter of this architecture starts with {p:?}");
    }
    Ok(vars
        .iter()
        .filter(|(name, _)| prefixes.iter().any(|p| name.starts_with(p.as_str())))
        .cloned()
        .collect())
}

fn check_weights<const N: usize>(
    name: &str,
    w: Option<[f64; N]>,
) -> std::result::Result<(), String> {
    match w {
        Some(w) if w.iter().any(|x| !x.is_finite() || *x < 0.0) || w.iter().sum::<f64>() <= 0.0 => {
            Err(format!(
                "{name} must be finite, >= 0 and not all 0 (got {w:?})"
            ))
        }
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    step: u64,
    config: TeacherConfig,
}

/// One logged training interval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TeacherLog {
    pub step: u64,
    pub loss: f64,
    pub image_loss: f64,
    pub video_loss: f64,
    /// The shape head's cross-entropy, images and videos by frames (0 without it).
    #[serde(default)]
    pub shape_loss: f64,
    /// The binding loss, images and videos by frames (0 without it).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub binding_loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub samples_per_s: f64,
}

/// A training batch: clean samples, prompts (some dropped to ""), of one frame count.
pub struct WorldBatch {
    pub x0: Tensor,
    pub prompts: Vec<String>,
    /// Every frame's per-pixel shape classes ([`world::render_labelled`]), row after row.
    pub shapes: Vec<u8>,
    /// Every frame's per-pixel colour classes, as `shapes`.
    pub colors: Vec<u8>,
}

/// What a training batch draws from the world; the default is the grammar's own mix.
#[derive(Debug, Clone, Copy, Default)]
pub struct SceneMix {
    /// The share of image scenes that are simple scenes ([`world::sample_simple_spec`]).
    pub simple_share: f64,
    /// The shape weights of the simple scenes.
    pub simple_shapes: Option<[f64; 4]>,
    /// How every other scene is drawn ([`world::sample_spec_weighted`]).
    pub tilt: world::Tilt,
}

/// Renders `n` training scenes of `frames` frames (1 or `world::VIDEO_FRAMES`) drawn as `mix`
/// says (simple scenes only among images).
pub fn world_batch(
    rng: &mut ChaCha8Rng,
    n: usize,
    video: bool,
    mix: SceneMix,
    cfg_dropout: f64,
    device: &Device,
) -> Result<WorldBatch> {
    let mut xs = Vec::with_capacity(n);
    let mut prompts = Vec::with_capacity(n);
    let mut shapes = Vec::new();
    let mut colors = Vec::new();
    for _ in 0..n {
        let spec = if !video && mix.simple_share > 0.0 && rng.random::<f64>() < mix.simple_share {
            world::sample_simple_spec(rng, Split::Train, mix.simple_shapes.as_ref())
        } else {
            world::sample_spec_weighted(rng, Split::Train, video, mix.tilt)
        };
        let (drawn, caption) = mix.tilt.backdrop(spec, rng);
        let (frames, labels) = world::render_labelled(&drawn, rng);
        xs.push(from_frames(&frames, device)?);
        for l in labels {
            shapes.extend(l.shape);
            colors.extend(l.color);
        }
        let drop = rng.random::<f64>() < cfg_dropout;
        prompts.push(if drop {
            String::new()
        } else {
            world::prompt(&caption)
        });
    }
    Ok(WorldBatch {
        x0: Tensor::stack(&xs, 0)?,
        prompts,
        shapes,
        colors,
    })
}

/// `n` logit-normal noise levels, flow-shifted by `shift` (1 = none).
fn draw_times(n: usize, shift: f32, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let warp = FlowSchedule { shift };
    (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(rng);
            warp.warp(1.0 / (1.0 + (-z).exp()))
        })
        .collect()
}

/// How a batch's loss is computed, beside the model and the batch.
#[derive(Clone, Copy)]
pub struct LossTerms<'a> {
    pub weighting: LossWeighting,
    pub edges: Option<EdgeWeighting>,
    /// The shape head and its settings, when shapes are supervised.
    pub shapes: Option<(&'a ShapeHead, ShapeSupervision)>,
    pub binding: Option<TokenBinding>,
    pub shift: f32,
    /// The empty prompt's share of the pooled prompt while `local_text` fades in; the
    /// model's own pooling when `None`.
    pub empty_share: Option<f32>,
}

/// A batch's losses: flow matching, the shape head's cross-entropy and the binding loss when
/// asked for (the binding loss is also absent from a batch naming no two shapes).
pub struct BatchLoss {
    pub flow: Tensor,
    pub shape: Option<Tensor>,
    pub binding: Option<Tensor>,
}

impl BatchLoss {
    /// What the optimizer minimises: `flow + weight * shape + weight * binding`.
    pub fn total(&self, terms: &LossTerms) -> Result<Tensor> {
        let mut total = self.flow.clone();
        if let (Some(s), Some((_, cfg))) = (&self.shape, terms.shapes) {
            total = (total + (s * f64::from(cfg.weight))?)?;
        }
        if let (Some(b), Some(cfg)) = (&self.binding, terms.binding) {
            total = (total + (b * f64::from(cfg.weight))?)?;
        }
        Ok(total)
    }
}

/// Flow-matching loss `mean w(t) e(x0) |v(x_t, t) - (noise - x0)|^2` with logit-normal `t`,
/// flow-shifted by `shift`; `e` is 1 or the edge weighting's pixel weights. With a shape head,
/// also its cross-entropy on the same forward pass's mid-network tokens.
pub fn flow_matching_loss(
    model: &TinyModel,
    batch: &WorldBatch,
    terms: LossTerms,
    rng: &mut ChaCha8Rng,
) -> Result<BatchLoss> {
    let LossTerms {
        weighting,
        edges,
        shapes,
        binding,
        shift,
        empty_share,
    } = terms;
    let b = batch.x0.dim(0)?;
    let t = draw_times(b, shift, rng);
    let n = batch.x0.elem_count();
    let noise: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    let noise = Tensor::from_vec(noise, batch.x0.shape(), batch.x0.device())?;
    let tt = crate::pipeline::schedule::row_scale(&t, &batch.x0)?;
    let xt = (batch.x0.broadcast_mul(&(1.0 - &tt)?)? + noise.broadcast_mul(&tt)?)?;
    let prompts: Vec<&str> = batch.prompts.iter().map(String::as_str).collect();
    let text = match empty_share {
        Some(s) => model.encode_pooling(&prompts, s)?,
        None => model.encode(&prompts)?,
    };
    let estimate = super::self_condition::training_estimate(model, &xt, &t, &text, rng)?;
    let forward = || {
        model
            .net
            .forward_self_conditioned(&xt, estimate.as_ref(), &t, &text, shapes.is_some())
    };
    let ((v, features), maps) = if binding.is_some() {
        let (out, maps) = capture_cross_attention_with_grad(forward);
        (out?, maps)
    } else {
        (forward()?, Vec::new())
    };
    let (_, frames, _, size, _) = batch.x0.dims5()?;
    let binding = match binding {
        Some(_) => super::binding::targets(
            &batch.prompts,
            &batch.shapes,
            frames,
            size,
            model.cfg.patch,
            model.cfg.text_max_len,
            batch.x0.device(),
        )?
        .map(|targets| super::binding::loss(&maps, &targets))
        .transpose()?,
        None => None,
    };
    let shape = match (shapes, features) {
        (Some((head, cfg)), Some(f)) => {
            let (_, _, _, h, w) = batch.x0.dims5()?;
            let targets = Targets {
                shapes: &batch.shapes,
                colors: &batch.colors,
            };
            Some(head.loss(&f, targets, &t, cfg.min_t, (h, w))?)
        }
        _ => None,
    };
    let mut err = (v - (noise - &batch.x0)?)?.sqr()?;
    if let Some(e) = edges {
        let w = super::edge_weight::edge_weights(&batch.x0, e.strength, e.radius)?;
        err = err.broadcast_mul(&w)?;
    }
    let flow = match weighting {
        LossWeighting::Velocity => err.mean_all()?,
        w => {
            let w = crate::pipeline::schedule::row_scale(&w.weights(&t), &err)?;
            err.broadcast_mul(&w)?.mean_all()?
        }
    };
    Ok(BatchLoss {
        flow,
        shape,
        binding,
    })
}

/// Mixed into the run's seed for the shape head's initialisation, so that adding the head
/// leaves the model's own initialisation as it was.
const SHAPE_HEAD_SEED: u64 = 0x5_4A9E;

/// Where a run keeps its files.
pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    pub fn weights(&self) -> PathBuf {
        self.dir.join("teacher.safetensors")
    }
    pub fn tokenizer(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
}

/// Trains (or resumes) a teacher in `out`; calls `progress` after every step with the step
/// number and the last loss. Returns the final EMA weights' path.
///
/// `init_from` warm-starts a fresh run from trained weights: every tensor of that file must
/// exist in the model with the same shape, or grown in a way that keeps the parent's function
/// (a longer prompt, wider DiT MLPs), and parameters it lacks (a newly added head, appended
/// blocks) keep their initialization. It is ignored when the run resumes from its own checkpoint.
pub fn train_teacher(
    config: &TeacherConfig,
    out: &Path,
    resume: bool,
    init_from: Option<&Path>,
    device: &Device,
    mut progress: impl FnMut(u64, f64),
) -> anyhow::Result<PathBuf> {
    let paths = RunPaths {
        dir: out.to_path_buf(),
    };
    std::fs::create_dir_all(out)?;
    let tokenizer = TinyTokenizer::from_vocabulary(&world::vocabulary())?;
    let mut arch = config.architecture.clone();
    arch.vocab_size = tokenizer.vocab_size();
    tokenizer.save(&paths.tokenizer())?;

    let map = VarMap::new();
    let vb = crate::nn::seeded_var_builder(&map, config.seed, DType::F32, device);
    let model = TinyModel::new(vb, &arch, tokenizer, FlowSchedule::default())?;
    let vars = named_vars(&map);
    // The shape head lives in a map of its own: checkpointed and trained, never averaged
    // into or shipped with the weights.
    let head_map = VarMap::new();
    let head = config
        .shape_supervision
        .map(|s| {
            let vb = crate::nn::seeded_var_builder(
                &head_map,
                config.seed ^ SHAPE_HEAD_SEED,
                DType::F32,
                device,
            );
            ShapeHead::new(vb, model.net.feature_dim(), arch.patch, &s).map(|h| (h, s))
        })
        .transpose()?;
    let head_vars = named_vars(&head_map);
    let all_vars: Vec<(String, Var)> = vars.iter().chain(&head_vars).cloned().collect();
    let resuming = resume && paths.checkpoint().is_file();
    if let (Some(path), false) = (init_from, resuming) {
        let (loaded, fresh) = warm_start(&vars, path, device)?;
        tracing::info!(loaded, fresh, from = %path.display(), "warm start");
    }
    let mut opt = AdamW::new(
        trained_vars(&vars, config.train_only.as_deref())?
            .into_iter()
            .chain(head_vars.iter().cloned())
            .collect(),
        config.optim.clone(),
    )?;
    let mut ema = Ema::new(&vars, config.ema_decay)?;

    if resuming {
        let (meta, groups): (Meta, _) =
            Checkpoint::load(&paths.checkpoint(), &["param.", "ema.", "opt."], device)?;
        for (name, var) in &all_vars {
            let t = groups[0]
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("checkpoint lacks {name}"))?;
            var.set(t)?;
        }
        ema.shadow = groups[1].clone();
        opt.load_state(&groups[2], meta.step)?;
        tracing::info!(step = meta.step, "resumed from checkpoint");
    }

    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.log())?;
    let mut window = Instant::now();
    let mut acc = Window::default();
    while opt.step < config.iterations {
        let step = opt.step;
        // A fresh RNG per step, derived from (seed, step): a resumed run sees the same data.
        let mut rng =
            ChaCha8Rng::seed_from_u64(config.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let simple = config.curriculum.map_or(0.0, |c| c.share_at(step));
        let mix = SceneMix {
            simple_share: simple,
            simple_shapes: config.curriculum.and_then(|c| c.shape_weights),
            tilt: world::Tilt {
                shapes: config.shape_weights,
                kinds: config.scene_kinds,
                backgrounds: config.background_weights,
            },
        };
        let ib = world_batch(
            &mut rng,
            config.image_batch,
            false,
            mix,
            config.cfg_dropout,
            device,
        )?;
        let terms = LossTerms {
            weighting: config.loss_weighting,
            edges: config.edge_weighting,
            shapes: head.as_ref().map(|(h, s)| (h, *s)),
            binding: config.token_binding,
            shift: config.image_shift,
            empty_share: config.local_text_fade.map(|f| f.share_at(step)),
        };
        let li = flow_matching_loss(&model, &ib, terms, &mut rng)?;
        // Frames per step of each kind: the weights of the image and video losses.
        let ni = config.image_batch as f64;
        let nv = (config.video_batch * world::VIDEO_FRAMES) as f64;
        let (loss, lv) = if config.video_batch > 0 {
            let vbt = world_batch(
                &mut rng,
                config.video_batch,
                true,
                SceneMix {
                    simple_share: 0.0,
                    tilt: world::Tilt {
                        kinds: config.video_scene_kinds.or(config.scene_kinds),
                        ..mix.tilt
                    },
                    ..mix
                },
                config.cfg_dropout,
                device,
            )?;
            let video_terms = LossTerms {
                shift: config.video_shift,
                ..terms
            };
            let lv = flow_matching_loss(&model, &vbt, video_terms, &mut rng)?;
            // Each loss is a mean over its own pixels; weigh them by frames so that a video
            // frame counts as much as an image.
            let by_frames = |a: &Tensor, b: &Tensor| ((a * ni)? + (b * nv)?)? / (ni + nv);
            let loss = by_frames(&li.total(&terms)?, &lv.total(&video_terms)?)?;
            let shape = match (&li.shape, &lv.shape) {
                (Some(a), Some(b)) => Some(by_frames(a, b)?),
                _ => None,
            };
            (loss, Some((lv.flow, shape, lv.binding)))
        } else {
            (li.total(&terms)?, None)
        };
        let stats = opt.backward_step(&loss)?;
        ema.update(opt.vars(), opt.step)?;
        let l = loss.to_scalar::<f32>()? as f64;
        let scalar = |t: Option<&Tensor>| -> Result<f64> {
            Ok(t.map(|t| t.to_scalar::<f32>()).transpose()?.unwrap_or(0.0) as f64)
        };
        let shape = match &lv {
            Some((_, s, _)) => s.as_ref(),
            None => li.shape.as_ref(),
        };
        // The binding loss by frames, over the batches that named two shapes.
        let (mut binding, mut binding_frames) = (0.0, 0.0);
        let video_binding = lv.as_ref().and_then(|(_, _, b)| b.as_ref());
        for (b, frames) in [(li.binding.as_ref(), ni), (video_binding, nv)] {
            if let Some(b) = b {
                binding += scalar(Some(b))? * frames;
                binding_frames += frames;
            }
        }
        acc.add(
            l,
            scalar(Some(&li.flow))?,
            scalar(lv.as_ref().map(|(v, _, _)| v))?,
            scalar(shape)?,
            if binding_frames > 0.0 {
                binding / binding_frames
            } else {
                0.0
            },
            stats.grad_norm,
        );
        progress(opt.step, l);

        if opt.step % config.log_every == 0 || opt.step == config.iterations {
            let entry = acc.entry(
                opt.step,
                stats.lr,
                (config.image_batch + config.video_batch) as f64,
                window.elapsed().as_secs_f64(),
            );
            writeln!(log, "{}", serde_json::to_string(&entry)?)?;
            acc = Window::default();
            window = Instant::now();
        }
        if opt.step % config.checkpoint_every == 0 || opt.step == config.iterations {
            save(&paths, config, &opt, &ema, &all_vars)?;
        }
    }
    Ok(paths.weights())
}

/// The sums of one logging window.
#[derive(Default)]
struct Window {
    loss: f64,
    image: f64,
    video: f64,
    shape: f64,
    binding: f64,
    grad_norm: f64,
    steps: u64,
}

impl Window {
    fn add(&mut self, loss: f64, image: f64, video: f64, shape: f64, binding: f64, grad_norm: f64) {
        self.loss += loss;
        self.image += image;
        self.video += video;
        self.shape += shape;
        self.binding += binding;
        self.grad_norm += grad_norm;
        self.steps += 1;
    }

    fn entry(&self, step: u64, lr: f64, samples_per_step: f64, seconds: f64) -> TeacherLog {
        let k = self.steps as f64;
        TeacherLog {
            step,
            loss: self.loss / k,
            image_loss: self.image / k,
            video_loss: self.video / k,
            shape_loss: self.shape / k,
            binding_loss: self.binding / k,
            grad_norm: self.grad_norm / k,
            lr,
            samples_per_s: k * samples_per_step / seconds,
        }
    }
}

/// Copies the tensors of `path` into `vars`; returns (loaded, left at init) counts.
fn warm_start(
    vars: &[(String, Var)],
    path: &Path,
    device: &Device,
) -> anyhow::Result<(usize, usize)> {
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    for name in tensors.keys() {
        if !vars.iter().any(|(n, _)| n == name) {
            anyhow::bail!("{} holds {name}, which the model lacks", path.display());
        }
    }
    let mut loaded = 0;
    for (name, var) in vars {
        if let Some(t) = tensors.get(name) {
            let t = t.to_dtype(var.dtype())?;
            if t.dims() == var.dims() {
                var.set(&t)?;
            } else if let Some(grown) = longer_text_positions(name, &t, var.as_tensor())? {
                var.set(&grown)?;
            } else if let Some(grown) = wider_mlp(name, &t, var.as_tensor())? {
                var.set(&grown)?;
            } else {
                anyhow::bail!(
                    "{}: {name} has shape {:?}, the model wants {:?}",
                    path.display(),
                    t.dims(),
                    var.dims()
                );
            }
            loaded += 1;
        }
    }
    Ok((loaded, vars.len() - loaded))
}

/// A DiT block's MLP of a smaller `mlp_ratio`, widened to this model's: the trained hidden
/// units are kept, the new ones keep their `fc1` initialization and read out through `fc2`
/// columns of zero, so the grown model computes its parent's function and every new unit
/// still gets a gradient (unlike appended blocks, whose zero gates left them shut).
fn wider_mlp(name: &str, old: &Tensor, init: &Tensor) -> Result<Option<Tensor>> {
    if !name.starts_with("dit.blocks.") {
        return Ok(None);
    }
    // The hidden axis: fc1's rows (and its bias), or fc2's columns, which start at zero.
    let (axis, zero_tail) = match (name.rsplit_once(".fc"), old.rank()) {
        (Some((_, "1.weight")), 2) | (Some((_, "1.bias")), 1) => (0, false),
        (Some((_, "2.weight")), 2) => (1, true),
        _ => return Ok(None),
    };
    extended(old, init, axis, zero_tail)
}

/// The text encoder's position table of a shorter prompt length, extended to this model's:
/// the trained rows are kept and the new tail keeps its initialization (teachers trained
/// before prompts fitted the grammar had 16 positions; the grammar needs 24).
fn longer_text_positions(name: &str, old: &Tensor, init: &Tensor) -> Result<Option<Tensor>> {
    if !name.ends_with("text.pos") || old.rank() != 2 {
        return Ok(None);
    }
    extended(old, init, 0, false)
}

/// `old` followed along `axis` by the rest of `init` (zeros with `zero_tail`), when the two
/// agree on every other axis and `init` is longer on this one; `None` otherwise.
fn extended(old: &Tensor, init: &Tensor, axis: usize, zero_tail: bool) -> Result<Option<Tensor>> {
    let (o, n) = (old.dims(), init.dims());
    let others_agree = o.len() == n.len() && (0..o.len()).all(|a| a == axis || o[a] == n[a]);
    if !others_agree || o[axis] >= n[axis] {
        return Ok(None);
    }
    let tail = init.narrow(axis, o[axis], n[axis] - o[axis])?;
    let tail = if zero_tail { tail.zeros_like()? } else { tail };
    Ok(Some(Tensor::cat(&[old, &tail], axis)?))
}

fn save(
    paths: &RunPaths,
    config: &TeacherConfig,
    opt: &AdamW,
    ema: &Ema,
    vars: &[(String, Var)],
) -> anyhow::Result<()> {
    let meta = Meta {
        step: opt.step,
        config: config.clone(),
    };
    let params = tensors_of(vars);
    let state = opt.state();
    Checkpoint::save(
        &paths.checkpoint(),
        &meta,
        &[("param.", &params), ("ema.", &ema.shadow), ("opt.", &state)],
    )?;
    let identity = crate::families::tiny::teacher_identity(&config.architecture);
    super::checkpoint::save_weights_atomic(&ema.shadow, &identity, &paths.weights())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vocab: usize, refiner: usize) -> TinyConfig {
        TinyConfig {
            dim: 32,
            depth: 1,
            heads: 2,
            mlp_ratio: 2,
            patch: 8,
            text_dim: 32,
            text_depth: 1,
            vocab_size: vocab,
            refiner,
            ..TinyConfig::default()
        }
    }

    fn model(vb: candle_nn::VarBuilder, refiner: usize) -> Result<TinyModel> {
        let tok = TinyTokenizer::from_vocabulary(&world::vocabulary()).unwrap();
        let c = cfg(tok.vocab_size(), refiner);
        TinyModel::new(vb, &c, tok, FlowSchedule::default())
    }

    /// Random weights of `arch` (seed 1), saved to `file`: a "trained" model to warm-start from.
    fn save_random_weights(
        arch: &TinyConfig,
        file: &Path,
    ) -> anyhow::Result<std::collections::HashMap<String, Tensor>> {
        let map = VarMap::new();
        TinyModel::new(
            crate::nn::random_var_builder(&map, 1, DType::F32, &Device::Cpu),
            arch,
            TinyTokenizer::from_vocabulary(&world::vocabulary())?,
            FlowSchedule::default(),
        )?;
        let tensors = tensors_of(&named_vars(&map));
        candle_core::safetensors::save(&tensors, file)?;
        Ok(tensors)
    }

    #[test]
    fn a_warm_started_refiner_reproduces_the_trained_dit_then_learns() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("fewstep-warm-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("trained.safetensors");

        // A "trained" DiT without a refiner (every weight non-zero).
        let old_map = VarMap::new();
        let old = model(
            crate::nn::random_var_builder(&old_map, 1, DType::F32, &dev),
            0,
        )?;
        let old_tensors = tensors_of(&named_vars(&old_map));
        candle_core::safetensors::save(&old_tensors, &file)?;

        // The same DiT with a fresh refiner, warm-started from it.
        let map = VarMap::new();
        let new = model(crate::nn::seeded_var_builder(&map, 2, DType::F32, &dev), 4)?;
        let vars = named_vars(&map);
        let (loaded, fresh) = warm_start(&vars, &file, &dev)?;
        assert_eq!(loaded, old_tensors.len());
        assert_eq!(fresh, 6, "features, conv1 and conv2 weights and biases");

        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let x: Vec<f32> = (0..2 * 3 * 32 * 32)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let x = Tensor::from_vec(x, (2, 1, 3, 32, 32), &dev)?;
        let text = old.encode(&["a red circle", ""])?;
        let v_old = old.velocity(&x, &[0.3, 0.8], &text)?;
        let v_new = new.velocity(&x, &[0.3, 0.8], &new.encode(&["a red circle", ""])?)?;
        let diff = (&v_old - &v_new)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "warm start changed the output by {diff}");

        // The refiner is on the path: once its output conv is non-zero, the output moves.
        let (_, conv2) = vars
            .iter()
            .find(|(n, _)| n == "dit.refiner.conv2.weight")
            .unwrap();
        conv2.set(&conv2.ones_like()?)?;
        let v_moved = new.velocity(&x, &[0.3, 0.8], &new.encode(&["a red circle", ""])?)?;
        let moved = (&v_old - &v_moved)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            moved > 1e-2,
            "the refiner did not change the output ({moved})"
        );

        // A file that does not fit the model is refused.
        let mut bad = old_tensors.clone();
        bad.insert("dit.unknown".into(), Tensor::zeros(3, DType::F32, &dev)?);
        candle_core::safetensors::save(&bad, &file)?;
        let err = warm_start(&vars, &file, &dev).unwrap_err().to_string();
        assert!(err.contains("dit.unknown"), "{err}");
        let mut bad = old_tensors;
        bad.insert(
            "dit.patch_in.bias".into(),
            Tensor::zeros(3, DType::F32, &dev)?,
        );
        candle_core::safetensors::save(&bad, &file)?;
        let err = warm_start(&vars, &file, &dev).unwrap_err().to_string();
        assert!(
            err.contains("dit.patch_in.bias") && err.contains("shape"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// A DiT grown by blocks appended after the trained ones starts as its parent: every
    /// branch of a fresh block is gated by a zero-initialised adaLN or output projection. So a
    /// teacher can gain depth without losing what it learned.
    #[test]
    fn a_dit_grown_by_appended_blocks_reproduces_its_parent() -> anyhow::Result<()> {
        grown_dit_reproduces_its_parent("depth", |c| TinyConfig {
            depth: c.depth + 2,
            ..c.clone()
        })
    }

    /// A DiT whose blocks' MLPs are widened starts as its parent too: the new hidden units read
    /// out through zero columns of `fc2`.
    #[test]
    fn a_dit_grown_by_wider_mlps_reproduces_its_parent() -> anyhow::Result<()> {
        grown_dit_reproduces_its_parent("mlp", |c| TinyConfig {
            mlp_ratio: c.mlp_ratio * 2,
            ..c.clone()
        })
    }

    /// A DiT given local modulation starts as its parent: the new maps are zero.
    #[test]
    fn a_dit_given_local_modulation_reproduces_its_parent() -> anyhow::Result<()> {
        grown_dit_reproduces_its_parent("local", |c| TinyConfig {
            local_modulation: true,
            ..c.clone()
        })
    }

    /// A DiT given self-conditioning starts as its parent, whatever estimate it reads: the new
    /// map is zero.
    #[test]
    fn a_dit_given_self_condition_reproduces_its_parent() -> anyhow::Result<()> {
        grown_dit_reproduces_its_parent("self-cond", |c| TinyConfig {
            self_condition: true,
            ..c.clone()
        })
    }

    /// Warm-starts the DiT that `grow` makes of a random parent and checks that both give the
    /// same velocity for images and videos.
    fn grown_dit_reproduces_its_parent(
        what: &str,
        grow: impl Fn(&TinyConfig) -> TinyConfig,
    ) -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("fewstep-grow-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("parent.safetensors");
        let tok = || TinyTokenizer::from_vocabulary(&world::vocabulary());
        let parent_cfg = TinyConfig {
            refiner: 4,
            frame_words: true,
            motion_coords: true,
            ..cfg(tok()?.vocab_size(), 4)
        };
        let old_map = VarMap::new();
        let parent = TinyModel::new(
            crate::nn::random_var_builder(&old_map, 1, DType::F32, &dev),
            &parent_cfg,
            tok()?,
            FlowSchedule::default(),
        )?;
        candle_core::safetensors::save(&tensors_of(&named_vars(&old_map)), &file)?;

        let grown_cfg = grow(&parent_cfg);
        let map = VarMap::new();
        let grown = TinyModel::new(
            crate::nn::seeded_var_builder(&map, 2, DType::F32, &dev),
            &grown_cfg,
            tok()?,
            FlowSchedule::default(),
        )?;
        let vars = named_vars(&map);
        let (loaded, fresh) = warm_start(&vars, &file, &dev)?;
        assert_eq!(
            loaded,
            named_vars(&old_map).len(),
            "{what}: every parent tensor is used"
        );
        assert_eq!(
            fresh > 0,
            grown_cfg.depth > parent_cfg.depth
                || grown_cfg.local_modulation
                || grown_cfg.self_condition,
            "{what}: only appended blocks, local modulations and self-conditioning are fresh"
        );

        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for frames in [1, 4] {
            let x: Vec<f32> = (0..2 * frames * 3 * 32 * 32)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            let x = Tensor::from_vec(x, (2, frames, 3, 32, 32), &dev)?;
            let prompts = ["a red circle moving left", ""];
            let v_parent = parent.velocity(&x, &[0.3, 0.8], &parent.encode(&prompts)?)?;
            let grown_text = grown.encode(&prompts)?;
            let v_grown = grown.velocity(&x, &[0.3, 0.8], &grown_text)?;
            let estimate = (&x * 0.5)?;
            let (v_read, _) = grown.net.forward_self_conditioned(
                &x,
                Some(&estimate),
                &[0.3, 0.8],
                &grown_text,
                false,
            )?;
            let read_diff = (&v_grown - &v_read)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                read_diff < 1e-5,
                "{what}: a fresh model reads no estimate, moved by {read_diff}"
            );
            let diff = (&v_parent - &v_grown)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(
                diff < 1e-5,
                "{what}, {frames} frames: growth changed the output by {diff}"
            );
        }
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn shape_supervision_adds_a_head_that_resumes_but_does_not_ship() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let tok = TinyTokenizer::from_vocabulary(&world::vocabulary()).unwrap();
        let arch = cfg(tok.vocab_size(), 0);
        // The key parses, validates, and is left out of configs without it.
        let text = serde_json::to_string(&TeacherConfig::default())?;
        assert!(!text.contains("shape_supervision"));
        let with: TeacherConfig = serde_json::from_str(&text.replacen(
            '{',
            "{\"shape_supervision\":{\"weight\":0.5,\"min_t\":0.4,\"hidden\":64,\"colors\":true},",
            1,
        ))?;
        assert_eq!(
            with.shape_supervision,
            Some(ShapeSupervision {
                weight: 0.5,
                min_t: 0.4,
                hidden: 64,
                colors: true,
            })
        );
        let unet = TeacherConfig {
            architecture: TinyConfig {
                denoiser: crate::families::tiny::DenoiserKind::Unet,
                unet_channels: vec![32, 64],
                ..with.architecture.clone()
            },
            ..with.clone()
        };
        assert!(unet.validate().unwrap_err().contains("DiT"));

        // On a real batch the head leaves the flow loss as it was and adds its cross-entropy,
        // near ln 5 for a fresh head.
        let map = VarMap::new();
        let model = model(crate::nn::seeded_var_builder(&map, 1, DType::F32, &dev), 0)?;
        let head_map = VarMap::new();
        let sup = ShapeSupervision {
            weight: 0.5,
            min_t: 0.0,
            hidden: 0,
            colors: false,
        };
        let head = ShapeHead::new(
            crate::nn::seeded_var_builder(&head_map, 2, DType::F32, &dev),
            model.net.feature_dim(),
            arch.patch,
            &sup,
        )?;
        let batch = world_batch(
            &mut ChaCha8Rng::seed_from_u64(3),
            3,
            false,
            SceneMix::default(),
            0.0,
            &dev,
        )?;
        assert_eq!(batch.shapes.len(), 3 * 32 * 32);
        assert_eq!(batch.colors.len(), 3 * 32 * 32);
        let terms = |shapes| LossTerms {
            weighting: LossWeighting::Velocity,
            edges: None,
            shapes,
            binding: None,
            shift: 1.0,
            empty_share: None,
        };
        let loss =
            |t: LossTerms| flow_matching_loss(&model, &batch, t, &mut ChaCha8Rng::seed_from_u64(4));
        let plain = loss(terms(None))?;
        let both = loss(terms(Some((&head, sup))))?;
        assert!(plain.shape.is_none());
        assert_eq!(
            plain.flow.to_scalar::<f32>()?,
            both.flow.to_scalar::<f32>()?
        );
        let ce = both
            .shape
            .as_ref()
            .expect("shape loss")
            .to_scalar::<f32>()?;
        assert!((ce - 5f32.ln()).abs() < 1.0, "{ce}");
        let total = both.total(&terms(Some((&head, sup))))?.to_scalar::<f32>()?;
        assert!((total - plain.flow.to_scalar::<f32>()? - 0.5 * ce).abs() < 1e-5);

        // Trained three steps straight, or two then resumed for one: the same weights, so
        // the head (and its optimizer state) came back from the checkpoint. It is never in
        // the shipped weights. The head names colours too, so their part resumes as well.
        let dir = std::env::temp_dir().join(format!("fewstep-shape-head-{}", std::process::id()));
        let mut config = TeacherConfig {
            architecture: arch,
            iterations: 3,
            image_batch: 2,
            video_batch: 1,
            checkpoint_every: 1,
            log_every: 1,
            shape_supervision: Some(ShapeSupervision {
                weight: 1.0,
                min_t: 0.0,
                hidden: 16,
                colors: true,
            }),
            ..TeacherConfig::default()
        };
        config.optim.warmup_steps = 0;
        let straight = train_teacher(&config, &dir.join("straight"), false, None, &dev, |_, _| {})?;
        config.iterations = 2;
        train_teacher(&config, &dir.join("resumed"), false, None, &dev, |_, _| {})?;
        config.iterations = 3;
        let resumed = train_teacher(&config, &dir.join("resumed"), true, None, &dev, |_, _| {})?;
        let (a, b) = (
            candle_core::safetensors::load(&straight, &dev)?,
            candle_core::safetensors::load(&resumed, &dev)?,
        );
        assert!(
            !a.is_empty()
                && a.keys()
                    .all(|k| !k.starts_with(super::super::shape_head::PREFIX))
        );
        for (name, t) in &a {
            let diff = (t - &b[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{name}");
        }
        let ckpt =
            candle_core::safetensors::load(dir.join("straight/checkpoint.safetensors"), &dev)?;
        assert!(ckpt.keys().any(|k| k.starts_with("param.aux_shape")));
        let log = std::fs::read_to_string(dir.join("straight/metrics.jsonl"))?;
        let last: TeacherLog = serde_json::from_str(log.lines().last().unwrap())?;
        assert!(last.shape_loss > 0.1, "{}", last.shape_loss);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// `train_only` steps the named parameters and leaves every other one at its warm start;
    /// a prefix that names nothing is refused before any step.
    /// The binding loss is read from two-object batches beside an unchanged flow loss, and
    /// its gradient binds: a few steps on it alone raise each object's share of attention on
    /// its own shape word.
    #[test]
    fn token_binding_leaves_the_flow_loss_and_its_gradient_binds() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let model = model(crate::nn::seeded_var_builder(&map, 1, DType::F32, &dev), 0)?;
        let two_objects = SceneMix {
            tilt: world::Tilt {
                kinds: Some([0.0, 1.0, 0.0]),
                ..world::Tilt::default()
            },
            ..SceneMix::default()
        };
        let batch = world_batch(
            &mut ChaCha8Rng::seed_from_u64(3),
            8,
            false,
            two_objects,
            0.0,
            &dev,
        )?;
        let binding = TokenBinding { weight: 0.5 };
        let terms = |binding| LossTerms {
            weighting: LossWeighting::Velocity,
            edges: None,
            shapes: None,
            binding,
            shift: 1.0,
            empty_share: None,
        };
        let loss =
            |t: LossTerms| flow_matching_loss(&model, &batch, t, &mut ChaCha8Rng::seed_from_u64(4));
        let plain = loss(terms(None))?;
        let with = loss(terms(Some(binding)))?;
        assert!(plain.binding.is_none());
        assert_eq!(
            plain.flow.to_scalar::<f32>()?,
            with.flow.to_scalar::<f32>()?
        );
        let first = with
            .binding
            .as_ref()
            .expect("binding loss")
            .to_scalar::<f32>()?;
        // A fresh model does not bind (a bound one is near 0).
        assert!(first.is_finite() && first > 0.3, "{first}");
        let total = with.total(&terms(Some(binding)))?.to_scalar::<f32>()?;
        assert!((total - plain.flow.to_scalar::<f32>()? - 0.5 * first).abs() < 1e-5);
        // One-object batches have nothing to bind.
        let one = SceneMix {
            tilt: world::Tilt {
                kinds: Some([1.0, 0.0, 0.0]),
                ..world::Tilt::default()
            },
            ..SceneMix::default()
        };
        let single = world_batch(&mut ChaCha8Rng::seed_from_u64(3), 4, false, one, 0.0, &dev)?;
        let lone = flow_matching_loss(
            &model,
            &single,
            terms(Some(binding)),
            &mut ChaCha8Rng::seed_from_u64(4),
        )?;
        assert!(lone.binding.is_none());

        let mut opt = AdamW::new(
            named_vars(&map),
            AdamWConfig {
                lr: 1e-2,
                warmup_steps: 0,
                ..AdamWConfig::default()
            },
        )?;
        for _ in 0..20 {
            let l = loss(terms(Some(binding)))?;
            opt.backward_step(l.binding.as_ref().unwrap())?;
        }
        let last = loss(terms(Some(binding)))?
            .binding
            .unwrap()
            .to_scalar::<f32>()?;
        assert!(last < 0.5 * first, "binding loss {first} -> {last}");
        Ok(())
    }

    #[test]
    fn train_only_freezes_every_other_parameter() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("fewstep-train-only-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let init = dir.join("init.safetensors");
        let tok = TinyTokenizer::from_vocabulary(&world::vocabulary()).unwrap();
        let arch = TinyConfig {
            motion_coords: true,
            ..cfg(tok.vocab_size(), 0)
        };
        let start = save_random_weights(&arch, &init)?;
        let prefixes = ["dit.blocks.0.temporal", "dit.motion"];
        let mut config = TeacherConfig {
            architecture: arch,
            iterations: 2,
            image_batch: 2,
            video_batch: 1,
            ema_decay: 0.0,
            train_only: Some(prefixes.iter().map(|p| p.to_string()).collect()),
            ..TeacherConfig::default()
        };
        config.optim.warmup_steps = 0;
        let out = dir.join("run");
        let weights = train_teacher(&config, &out, false, Some(&init), &dev, |_, _| {})?;
        let trained = candle_core::safetensors::load(&weights, &dev)?;
        let mut moved = Vec::new();
        for (name, t) in &start {
            let diff = (&trained[name] - t)?.abs()?.max_all()?.to_scalar::<f32>()?;
            if prefixes.iter().any(|p| name.starts_with(p)) {
                if diff > 0.0 {
                    moved.push(name.clone());
                }
            } else {
                assert_eq!(diff, 0.0, "{name} is frozen but moved by {diff}");
            }
        }
        assert!(
            moved.iter().any(|n| n.starts_with("dit.motion")),
            "{moved:?}"
        );
        assert!(moved.iter().any(|n| n.contains("temporal")), "{moved:?}");

        config.train_only = Some(Vec::new());
        assert!(config.validate().unwrap_err().contains("train_only"));
        config.train_only = Some(vec!["dit.no_such_part".into()]);
        let err = train_teacher(
            &config,
            &dir.join("bad"),
            false,
            Some(&init),
            &dev,
            |_, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("dit.no_such_part"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_warm_start_extends_a_shorter_prompt_length() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("fewstep-warm-len-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let file = dir.join("short.safetensors");
        let tok = TinyTokenizer::from_vocabulary(&world::vocabulary()).unwrap();
        let short = TinyConfig {
            text_max_len: 16,
            ..cfg(tok.vocab_size(), 0)
        };
        let old = save_random_weights(&short, &file)?;

        let map = VarMap::new();
        model(crate::nn::seeded_var_builder(&map, 2, DType::F32, &dev), 0)?;
        let vars = named_vars(&map);
        let (loaded, fresh) = warm_start(&vars, &file, &dev)?;
        assert_eq!((loaded, fresh), (vars.len(), 0));
        let new = map.data().lock().unwrap()["text.pos"].as_tensor().clone();
        let old = &old["text.pos"];
        assert_eq!(new.dims(), &[cfg(0, 0).text_max_len, 32]);
        let same = (new.narrow(0, 0, 16)? - old)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(same, 0.0, "the trained rows are kept");
        // Any other shape change is still refused.
        let longer = TinyConfig {
            text_max_len: 40,
            ..cfg(tok.vocab_size(), 0)
        };
        save_random_weights(&longer, &file)?;
        let err = warm_start(&vars, &file, &dev).unwrap_err().to_string();
        assert!(err.contains("text.pos"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn x0_weighting_is_t_squared_with_mean_one() {
        let t = [0.1f32, 0.5, 0.9];
        let w = LossWeighting::X0.weights(&t);
        let mean = w.iter().sum::<f32>() / 3.0;
        assert!((mean - 1.0).abs() < 1e-6);
        assert!((w[2] / w[0] - 81.0).abs() < 1e-3, "{w:?}");
        assert_eq!(LossWeighting::Velocity.weights(&t), vec![1.0; 3]);
        // Old configs have no key and read as the velocity loss; it is not written back.
        let cfg = TeacherConfig::default();
        let text = serde_json::to_string(&cfg).unwrap();
        assert!(!text.contains("loss_weighting"));
        let x0: TeacherConfig =
            serde_json::from_str(&text.replacen('{', "{\"loss_weighting\":\"x0\",", 1)).unwrap();
        assert_eq!(x0.loss_weighting, LossWeighting::X0);
    }

    #[test]
    fn edge_weighting_is_optional_validated_and_weighs_the_loss() {
        let cfg = TeacherConfig::default();
        let text = serde_json::to_string(&cfg).unwrap();
        assert!(!text.contains("edge_weighting"));
        let with = |json: &str| {
            serde_json::from_str::<TeacherConfig>(&text.replacen('{', json, 1)).unwrap()
        };
        let e = with("{\"edge_weighting\":{\"strength\":3},");
        assert_eq!(
            e.edge_weighting,
            Some(EdgeWeighting {
                strength: 3.0,
                radius: 1
            })
        );
        assert!(e.validate().is_ok());
        for bad in [
            "{\"edge_weighting\":{\"strength\":-1},",
            "{\"edge_weighting\":{\"strength\":1,\"radius\":9},",
        ] {
            assert!(with(bad)
                .validate()
                .unwrap_err()
                .starts_with("edge_weighting"));
        }

        // On a real batch the weighted loss differs from the plain one (and both are finite).
        let map = VarMap::new();
        let vb = crate::nn::seeded_var_builder(&map, 1, DType::F32, &Device::Cpu);
        let model = model(vb, 0).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let batch =
            world_batch(&mut rng, 4, false, SceneMix::default(), 0.0, &Device::Cpu).unwrap();
        let loss = |edges| {
            let mut rng = ChaCha8Rng::seed_from_u64(4);
            let terms = LossTerms {
                weighting: LossWeighting::Velocity,
                edges,
                shapes: None,
                binding: None,
                shift: 1.0,
                empty_share: None,
            };
            flow_matching_loss(&model, &batch, terms, &mut rng)
                .unwrap()
                .flow
                .to_scalar::<f32>()
                .unwrap()
        };
        let (plain, weighted) = (loss(None), loss(e.edge_weighting));
        assert!(plain.is_finite() && weighted.is_finite());
        assert!(
            (plain - weighted).abs() > 1e-4 * plain,
            "{plain} vs {weighted}"
        );
    }

    #[test]
    fn local_text_fade_rises_from_zero_to_one_and_is_validated() {
        let f = LocalTextFade {
            start: 100,
            end: 300,
        };
        assert_eq!(f.share_at(0), 0.0);
        assert_eq!(f.share_at(100), 0.0);
        assert!((f.share_at(150) - 0.25).abs() < 1e-6);
        assert_eq!(f.share_at(300), 1.0);
        assert_eq!(f.share_at(10_000), 1.0);
        let mut cfg = TeacherConfig {
            local_text_fade: Some(f),
            ..TeacherConfig::default()
        };
        // The fade ends in a `local_text` model: without it the weights would be saved as
        // the wrong architecture.
        assert!(cfg.validate().unwrap_err().contains("local_text = true"));
        cfg.architecture.local_text = true;
        assert!(cfg.validate().is_ok());
        for (start, end) in [(300, 300), (300, 100), (0, cfg.iterations + 1)] {
            cfg.local_text_fade = Some(LocalTextFade { start, end });
            assert!(cfg.validate().unwrap_err().contains("start < end"));
        }
        let json = r#"{"start": 0, "end": 10, "steps": 3}"#;
        assert!(serde_json::from_str::<LocalTextFade>(json).is_err());
    }

    #[test]
    fn curriculum_holds_then_falls_to_zero_and_is_validated() {
        let c = Curriculum {
            share: 0.8,
            hold: 100,
            until: 300,
            shape_weights: None,
        };
        assert_eq!(c.share_at(0), 0.8);
        assert_eq!(c.share_at(100), 0.8);
        assert!((c.share_at(200) - 0.4).abs() < 1e-12);
        assert_eq!(c.share_at(300), 0.0);
        assert_eq!(c.share_at(10_000), 0.0);
        let mut cfg = TeacherConfig {
            curriculum: Some(c),
            ..TeacherConfig::default()
        };
        assert!(cfg.validate().is_ok());
        cfg.curriculum = Some(Curriculum { share: 1.5, ..c });
        assert!(cfg.validate().unwrap_err().contains("share"));
        cfg.curriculum = Some(Curriculum { hold: 400, ..c });
        assert!(cfg.validate().unwrap_err().contains("hold"));
        for bad in [[0.0; 4], [1.0, 1.0, -1.0, 1.0], [1.0, f64::NAN, 1.0, 1.0]] {
            cfg.curriculum = Some(Curriculum {
                shape_weights: Some(bad),
                ..c
            });
            assert!(cfg.validate().unwrap_err().contains("shape_weights"));
            let scene_wide = TeacherConfig {
                shape_weights: Some(bad),
                ..TeacherConfig::default()
            };
            assert!(scene_wide
                .validate()
                .unwrap_err()
                .starts_with("shape_weights"));
        }
        for bad in [[0.0; 3], [1.0, -1.0, 1.0], [1.0, f64::INFINITY, 1.0]] {
            let kinds = [
                (
                    "scene_kinds",
                    TeacherConfig {
                        scene_kinds: Some(bad),
                        ..TeacherConfig::default()
                    },
                ),
                (
                    "video_scene_kinds",
                    TeacherConfig {
                        video_scene_kinds: Some(bad),
                        ..TeacherConfig::default()
                    },
                ),
            ];
            for (name, cfg) in kinds {
                assert!(cfg.validate().unwrap_err().starts_with(name), "{name}");
            }
        }
    }

    /// Simple scenes are on black unless `background_weights` is set; then they are drawn
    /// on its backgrounds and say so (the early curriculum taught crosses on black only).
    #[test]
    fn background_weights_reach_the_simple_scenes() {
        let count = |backgrounds| {
            let mix = SceneMix {
                simple_share: 1.0,
                simple_shapes: None,
                tilt: world::Tilt {
                    backgrounds,
                    ..world::Tilt::default()
                },
            };
            let mut rng = ChaCha8Rng::seed_from_u64(6);
            let b = world_batch(&mut rng, 300, false, mix, 0.0, &Device::Cpu).unwrap();
            let mut counts = [0usize; 3];
            for (p, x) in b.prompts.iter().zip(b.x0.chunk(300, 0).unwrap()) {
                let bg = world::parse(p).unwrap().background.unwrap();
                let i = world::Background::all()
                    .iter()
                    .position(|b| *b == bg)
                    .unwrap();
                counts[i] += 1;
                // Most of a simple scene's pixels are background: the caption names what
                // was drawn.
                let red = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let want = f32::from(bg.rgb()[0]) / 127.5 - 1.0;
                let on_bg = red[..32 * 32].iter().filter(|v| (*v - want).abs() < 1e-3);
                assert!(on_bg.count() > 32 * 32 / 2, "{p}");
            }
            counts
        };
        assert_eq!(count(None), [300, 0, 0]);
        let tilted = count(Some([1.0, 2.0, 1.0]));
        assert!(
            tilted[1] > tilted[0] + 40 && tilted[1] > tilted[2] + 40,
            "{tilted:?}"
        );
        assert!(tilted[0] > 40 && tilted[2] > 40, "{tilted:?}");
    }

    #[test]
    fn shape_weights_tilt_the_simple_scenes() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let w = [1.0, 0.0, 1.0, 2.0];
        let mix = SceneMix {
            simple_share: 1.0,
            simple_shapes: Some(w),
            tilt: world::Tilt::default(),
        };
        let b = world_batch(&mut rng, 400, false, mix, 0.0, &Device::Cpu).unwrap();
        let mut counts = [0usize; 4];
        for p in &b.prompts {
            let shape = world::parse(p).unwrap().objects[0].shape;
            let i = world::Shape::all()
                .iter()
                .position(|s| *s == shape)
                .unwrap();
            counts[i] += 1;
        }
        // Expected 100 / 0 / 100 / 200 (before the split filter, which is shape-blind enough
        // to keep the proportions within a few standard deviations).
        assert_eq!(counts[1], 0, "{counts:?}");
        assert!(
            counts[3] > counts[0] + 50 && counts[3] > counts[2] + 50,
            "{counts:?}"
        );
        assert!(counts[0] > 50 && counts[2] > 50, "{counts:?}");
    }

    #[test]
    fn scene_shape_weights_tilt_every_object_of_images_and_videos() {
        // Squares weighted out, crosses 3x: no square in any scene, crosses the most common.
        let w = [1.0, 0.0, 1.0, 3.0];
        let mix = SceneMix {
            tilt: world::Tilt {
                shapes: Some(w),
                ..Default::default()
            },
            ..Default::default()
        };
        for video in [false, true] {
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let b = world_batch(&mut rng, 150, video, mix, 0.0, &Device::Cpu).unwrap();
            let mut counts = [0usize; 4];
            let mut two = 0;
            for p in &b.prompts {
                let spec = world::parse(p).unwrap();
                two += usize::from(spec.objects.len() == 2);
                for o in &spec.objects {
                    let i = world::Shape::all().iter().position(|s| *s == o.shape);
                    counts[i.unwrap()] += 1;
                }
            }
            assert_eq!(counts[1], 0, "video {video}: {counts:?}");
            assert!(
                counts[3] > counts[0] + counts[2],
                "video {video}: {counts:?}"
            );
            // Still the grammar's scenes, not simple ones: two-object scenes remain.
            assert!(two > 30, "video {video}: {two} two-object scenes");
        }
    }

    #[test]
    fn background_weights_set_what_is_drawn_and_only_stated_backgrounds_are_named() {
        // Gray only: every frame is drawn on gray; a prompt names gray or no background.
        let mix = SceneMix {
            tilt: world::Tilt {
                backgrounds: Some([0.0, 1.0, 0.0]),
                ..Default::default()
            },
            ..Default::default()
        };
        for video in [false, true] {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let b = world_batch(&mut rng, 60, video, mix, 0.0, &Device::Cpu).unwrap();
            // The corner pixel of every frame (objects keep clear of the corners at least
            // somewhere in a frame; gray is 128, i.e. 0.004 in [-1, 1]).
            let corner = b.x0.narrow(3, 0, 1).unwrap().narrow(4, 0, 1).unwrap();
            let corners = corner.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let gray = corners.iter().filter(|v| v.abs() < 0.05).count();
            assert!(
                gray * 10 >= corners.len() * 9,
                "video {video}: {gray} of {}",
                corners.len()
            );
            let (mut named, mut unnamed) = (0, 0);
            for p in &b.prompts {
                match world::parse(p).unwrap().background {
                    Some(bg) => {
                        assert_eq!(bg, world::Background::Gray, "{p}");
                        named += 1
                    }
                    None => unnamed += 1,
                }
            }
            assert!(
                named > 10 && unnamed > 10,
                "video {video}: {named} named, {unnamed} not"
            );
        }
        let bad = TeacherConfig {
            background_weights: Some([0.0, 0.0, 0.0]),
            ..TeacherConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .starts_with("background_weights"));
    }

    #[test]
    fn scene_kinds_tilt_how_many_objects_every_scene_holds() {
        let count = |kinds: [f64; 3], video: bool| {
            let mix = SceneMix {
                tilt: world::Tilt {
                    kinds: Some(kinds),
                    ..Default::default()
                },
                ..Default::default()
            };
            let mut rng = ChaCha8Rng::seed_from_u64(12);
            let b = world_batch(&mut rng, 120, video, mix, 0.0, &Device::Cpu).unwrap();
            let mut by_kind = [0usize; 3];
            for p in &b.prompts {
                let o = world::parse(p).unwrap().objects;
                by_kind[match o.len() {
                    1 => 0,
                    _ if o[0] != o[1] => 1,
                    _ => 2,
                }] += 1;
            }
            by_kind
        };
        for video in [false, true] {
            assert_eq!(count([0.0, 1.0, 0.0], video), [0, 120, 0], "video {video}");
            assert_eq!(count([1.0, 0.0, 0.0], video), [120, 0, 0], "video {video}");
            let mixed = count([1.0, 6.0, 1.0], video);
            assert!(mixed[1] > 70 && mixed[0] > 0 && mixed[2] > 0, "{mixed:?}");
        }
    }

    #[test]
    fn simple_share_draws_single_large_objects_on_black() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mix = SceneMix {
            simple_share: 1.0,
            ..Default::default()
        };
        let all = world_batch(&mut rng, 64, false, mix, 0.0, &Device::Cpu).unwrap();
        for p in &all.prompts {
            let spec = world::parse(p).unwrap();
            assert_eq!(spec.objects.len(), 1, "{p}");
            assert_eq!(spec.objects[0].size, Some(world::SizeClass::Large), "{p}");
            assert_eq!(spec.background, Some(world::Background::Black), "{p}");
            assert_eq!(world::split_of(&spec), Split::Train, "{p}");
        }
        // Without a share, the stream of the grammar's mix is unchanged (resumed runs match).
        let a = world_batch(
            &mut ChaCha8Rng::seed_from_u64(4),
            8,
            false,
            SceneMix::default(),
            0.1,
            &Device::Cpu,
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let specs: Vec<_> = (0..8)
            .map(|_| {
                let s = world::sample_spec(&mut rng, Split::Train, false);
                let _ = world::render(&s, &mut rng);
                let drop = rng.random::<f64>() < 0.1;
                if drop {
                    String::new()
                } else {
                    world::prompt(&s)
                }
            })
            .collect();
        assert_eq!(a.prompts, specs);
    }

    /// The committed training configurations still parse and describe buildable models, so
    /// the README's commands run as written.
    #[test]
    fn committed_teacher_configs_parse_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-shapes-teacher");
        let mut seen = 0;
        // The shipped runs' configs, and every candidate's in `candidates-*/`.
        let files = std::fs::read_dir(&dir).unwrap().flat_map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            match (path.is_dir(), name.starts_with("candidates-")) {
                (true, true) => std::fs::read_dir(&path)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.to_string_lossy().ends_with("config.json"))
                    .collect(),
                (false, _) if name.starts_with("teacher") && name.ends_with("config.json") => {
                    vec![path]
                }
                _ => Vec::new(),
            }
        });
        for path in files {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            let cfg: TeacherConfig =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            // Runs before the prompt-length fix (16 tokens) stay as records of what ran;
            // `train-teacher` would refuse them now.
            if cfg.architecture.text_max_len < world::MAX_PROMPT_WORDS + 1 {
                cfg.architecture.validate()
            } else {
                cfg.validate()
            }
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            seen += 1;
        }
        assert!(seen >= 30, "found {seen} configs in {}", dir.display());
    }

    /// The video shift moves the noise levels up as SD3's shift does (median 0.5 -> 0.75 at
    /// shift 3) and is 1, no shift, in configs written before it existed.
    #[test]
    fn video_shift_draws_higher_noise_levels() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let stats = |shift: f32, rng: &mut ChaCha8Rng| {
            let mut t = draw_times(20_000, shift, rng);
            t.sort_by(f32::total_cmp);
            let high = t.iter().filter(|&&x| x > 0.9).count() as f32 / t.len() as f32;
            (t[t.len() / 2], high)
        };
        let (median, high) = stats(1.0, &mut rng);
        assert!((median - 0.5).abs() < 0.02, "median {median}");
        assert!(high < 0.03, "{high} above 0.9 unshifted");
        let (median, high3) = stats(3.0, &mut rng);
        assert!((median - 0.75).abs() < 0.02, "median {median}");
        assert!(
            high3 > 4.0 * high,
            "{high3} above 0.9 at shift 3, {high} at 1"
        );

        let json = serde_json::to_value(TeacherConfig::default()).unwrap();
        for key in ["video_shift", "image_shift"] {
            assert!(
                json.get(key).is_none(),
                "the default {key} is not written out"
            );
        }
        let old: TeacherConfig = serde_json::from_value(json).unwrap();
        assert_eq!((old.video_shift, old.image_shift), (1.0, 1.0));
        for bad in [0.0, -2.0, f32::NAN] {
            let c = TeacherConfig {
                image_shift: bad,
                ..TeacherConfig::default()
            };
            assert!(c.validate().unwrap_err().contains("image_shift"), "{bad}");
        }
    }
}
