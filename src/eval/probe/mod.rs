//! `fewstep eval --probe`: diagnostics of a tiny checkpoint that answer in minutes whether a
//! design is learning what the prompt says, before it gets hours of training.
//!
//! 1. **From-noise shape hit**: "a large <colour> <shape> on a black background" sampled from
//!    pure noise; does the largest blob of that colour have the prompted shape? The same for
//!    small shapes, run last so that the other probes draw what they drew before it existed.
//! 2. **Wrong-shape input**: a true render of shape A noised to `t0` and denoised under a
//!    prompt naming shape B: does the output follow the prompt (B) or the input (A)?
//! 3. **Word sensitivity**: the rms change of the predicted velocity when only the shape,
//!    colour or position word of the prompt changes, at a few noise levels; for the shape
//!    word, also when it reaches the model only through the pooled prompt (adaLN, global) or
//!    only through the tokens (cross-attention, local).
//! 4. **Attention mass per word**: the share of an object pixel's cross-attention that each
//!    kind of prompt word gets (averaged over heads, layers and the object's tokens).
//! 5. **Beside another object** ([`beside`]): each shape in two-object scenes, recognised in
//!    the clean render, after denoising it from a low and a middle noise level, and from noise.
//! 6. **Motion** ([`motion`]): single-object videos per motion word, from noise and from a
//!    render of the opposite motion: is the motion word drawn, and is it read at all?
//! 7. **Backgrounds** ([`backgrounds`]): each shape alone from noise on black, gray, white and
//!    an unstated background, and which background an unstated prompt gets, and how much the
//!    shape word is worth on each.
//!
//! Everything is deterministic given the seed, and scored by the world's verifier.

use candle_core::{Result, Tensor};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

mod backgrounds;
mod beside;
#[cfg(test)]
mod learnability;
mod motion;
pub use backgrounds::{BackgroundHit, PROBED_BACKGROUNDS};
pub use beside::{BesideHit, BESIDE_T0, BINDING_T};
pub use motion::{opposite, MeanPath, MotionGain, MotionHit, MOTION_T0};

use crate::families::tiny::{TextCond, TinyCond, TinyModel};
use crate::nn::attention::capture_cross_attention;
use crate::pipeline::{from_frames, to_frames};
use crate::pipeline::{sample, Denoiser, NoiseSchedule, RowNoise, SamplerKind, SamplerParams};
use crate::world::{
    self, split::HELD_OUT_PAIRS, Background, Color, ObjectSpec, Position, SceneSpec, Shape,
    SizeClass, WorldRng,
};

/// What to probe and how.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeOptions {
    /// Samples per shape for the from-noise and wrong-shape probes.
    pub samples_per_shape: usize,
    /// The sampler from pure noise (the model's own, `Sampling::params`). The wrong-shape
    /// probe runs deterministic Euler steps of the same size and guidance from `t0`.
    pub sampler: SamplerParams,
    /// Noise level the wrong-shape probe starts from.
    pub t0: f32,
    pub seed: u64,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            samples_per_shape: 24,
            sampler: SamplerParams {
                kind: SamplerKind::Euler,
                steps: 20,
                guidance: 3.0,
                guidance_interval: None,
                eta: 1.0,
            },
            t0: 0.6,
            seed: 0,
        }
    }
}

/// Hits of one shape out of `n` samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapeHit {
    pub shape: Shape,
    pub n: usize,
    /// The largest blob of the prompted colour has the prompted shape.
    pub hits: usize,
    /// The verifier passes the whole prompt (shape, colour, size, background).
    pub passes: usize,
}

/// The wrong-shape probe for one prompted shape: how often the output follows the prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WrongShape {
    /// The shape the prompt names.
    pub prompted: Shape,
    pub n: usize,
    /// Outputs whose shape is the prompted one.
    pub follows_prompt: usize,
    /// Outputs whose shape is the one of the (noised) input render.
    pub follows_input: usize,
}

/// Rms velocity change when one kind of word changes, at one noise level, and what reading
/// the shape word is worth to the loss there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sensitivity {
    pub t: f32,
    pub shape: f64,
    pub color: f64,
    pub position: f64,
    /// Mean squared error of the predicted x0 against the true render, with the true prompt.
    #[serde(default)]
    pub x0_loss: f64,
    /// The same with the shape word swapped for another shape. Its excess over `x0_loss` is
    /// how much the model uses the shape word at this noise level: a smooth learning signal
    /// long before samples change shape.
    #[serde(default)]
    pub x0_loss_wrong_shape: f64,
    /// `shape` when the swapped word reaches the model only through the pooled prompt (the
    /// adaLN path, the same for every token), the tokens keeping the true word.
    #[serde(default)]
    pub shape_pooled_only: f64,
    /// `shape` when the swapped word reaches the model only through the tokens (the
    /// cross-attention path, local to the object), the pooled prompt keeping the true word.
    /// A shape carried mostly by the pooled path is pushed onto every object of a scene.
    #[serde(default)]
    pub shape_tokens_only: f64,
}

impl Sensitivity {
    /// `x0_loss_wrong_shape / x0_loss - 1`.
    pub fn shape_gain(&self) -> f64 {
        loss_gain(self.x0_loss, self.x0_loss_wrong_shape)
    }
}

/// Mean cross-attention mass of an object token on each kind of prompt token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttentionMass {
    pub bos: f64,
    pub shape: f64,
    pub color: f64,
    pub size: f64,
    pub position: f64,
    pub background: f64,
    /// Articles and prepositions.
    pub other: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// The from-noise sampler (reports written before it was recorded were Euler).
    #[serde(default = "euler")]
    pub sampler: SamplerKind,
    pub steps: usize,
    pub guidance: f32,
    pub t0: f32,
    pub from_noise: Vec<ShapeHit>,
    /// Probe 1 for small shapes alone on black (reports written before it existed have none):
    /// a small cross is about 2 x 2 of the DiT's patches, and the eval's missed crosses are
    /// mostly drawn small.
    #[serde(default)]
    pub small_from_noise: Vec<ShapeHit>,
    pub wrong_shape: Vec<WrongShape>,
    pub sensitivity: Vec<Sensitivity>,
    pub attention: AttentionMass,
    /// Probe 5 (reports written before it existed have none).
    #[serde(default)]
    pub beside: Vec<BesideHit>,
    /// Probe 6 (empty for reports written before it existed, and for image-only models).
    #[serde(default)]
    pub motion: Vec<MotionHit>,
    /// Probe 6's x0-loss gain of the motion word, per noise level.
    #[serde(default)]
    pub motion_gain: Vec<MotionGain>,
    /// Probe 7 (reports written before it existed have none).
    #[serde(default)]
    pub backgrounds: Vec<BackgroundHit>,
}

fn euler() -> SamplerKind {
    SamplerKind::Euler
}

impl ProbeReport {
    /// Mean from-noise shape hit over the shapes (each shape weighs the same).
    pub fn shape_hit(&self) -> f64 {
        mean(self.from_noise.iter().map(|h| ratio(h.hits, h.n)))
    }

    /// Share of wrong-shape runs whose output follows the prompt.
    pub fn follows_prompt(&self) -> f64 {
        mean(
            self.wrong_shape
                .iter()
                .map(|w| ratio(w.follows_prompt, w.n)),
        )
    }

    /// A few lines for the terminal.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "from-noise shape hit {:.3} ({} {:?} steps, CFG {}):",
            self.shape_hit(),
            self.steps,
            self.sampler,
            self.guidance
        );
        for h in &self.from_noise {
            out += &format!(" {} {}/{} (pass {})", h.shape, h.hits, h.n, h.passes);
        }
        if !self.small_from_noise.is_empty() {
            out += "\nsmall shapes alone from noise:";
            for h in &self.small_from_noise {
                out += &format!(" {} {}/{} (pass {})", h.shape, h.hits, h.n, h.passes);
            }
        }
        out += &format!(
            "\nwrong-shape input from t0 = {}: follows prompt {:.3}:",
            self.t0,
            self.follows_prompt()
        );
        for w in &self.wrong_shape {
            out += &format!(
                " {} {}/{} (input {})",
                w.prompted, w.follows_prompt, w.n, w.follows_input
            );
        }
        out += "\nvelocity rms change when one word changes:";
        for s in &self.sensitivity {
            out += &format!(
                " t={}: shape {:.3} colour {:.3} position {:.3};",
                s.t, s.shape, s.color, s.position
            );
        }
        out += "\nshape word swapped through the pooled prompt only / the tokens only:";
        for s in &self.sensitivity {
            out += &format!(
                " t={}: {:.3} / {:.3};",
                s.t, s.shape_pooled_only, s.shape_tokens_only
            );
        }
        out += "\nx0 loss with the true / a wrong shape word (gain):";
        for s in &self.sensitivity {
            out += &format!(
                " t={}: {:.4} / {:.4} ({:+.1}%);",
                s.t,
                s.x0_loss,
                s.x0_loss_wrong_shape,
                100.0 * s.shape_gain()
            );
        }
        let a = &self.attention;
        out += &format!(
            "\nattention mass of object tokens: [BOS] {:.3} shape {:.3} colour {:.3} size {:.3} \
             position {:.3} background {:.3} other {:.3}",
            a.bos, a.shape, a.color, a.size, a.position, a.background, a.other
        );
        if !self.beside.is_empty() {
            out += &format!(
                "\nbeside another object, recognised in the clean render / from t0 = {:?} / \
                 from noise:",
                BESIDE_T0
            );
            for b in &self.beside {
                let levels: Vec<String> = b.from_render.iter().map(|k| k.to_string()).collect();
                let [small, large, unstated] = b.from_noise_by_size;
                out += &format!(
                    " {} {} / {} / {} of {} (small {small}, large {large}, unstated {unstated});",
                    b.shape,
                    b.clean,
                    levels.join(" / "),
                    b.from_noise,
                    b.n
                );
            }
            out += &format!("\nown shape word's share of the shape words' attention (this object / its neighbour), at t = {BINDING_T:?}:");
            for b in &self.beside {
                let levels: Vec<String> = b
                    .own_word_share
                    .iter()
                    .map(|[a, n]| format!("{a:.2} / {n:.2}"))
                    .collect();
                out += &format!(" {} {};", b.shape, levels.join(", "));
            }
        }
        if !self.backgrounds.is_empty() {
            out += "\nlarge shapes alone from noise by background (circle / square / triangle / \
                    cross; drawn black / gray / white):";
            for b in &self.backgrounds {
                let name = b
                    .background
                    .map_or("unstated".to_string(), |bg| bg.to_string());
                let [c, s, t, x] = b.hits;
                let [k, g, w] = b.drawn;
                let [rc, rs, rt, rx] = b.from_render;
                let gains: Vec<String> = b
                    .shape_word_gain
                    .iter()
                    .zip(backgrounds::WORD_GAIN_T)
                    .zip(&b.shape_word_x0_loss)
                    .map(|((g, t), l)| {
                        format!(
                            "t = {t}: {:+.0}% / {:+.0}% / {:+.0}% / {:+.0}% over {:.4} / {:.4} / \
                             {:.4} / {:.4}",
                            100.0 * g[0],
                            100.0 * g[1],
                            100.0 * g[2],
                            100.0 * g[3],
                            l[0],
                            l[1],
                            l[2],
                            l[3]
                        )
                    })
                    .collect();
                out += &format!(
                    " {name} {c} / {s} / {t} / {x} of {} each ({:.3}; drawn {k} / {g} / {w}; \
                     from a render at t0 = {}: {rc} / {rs} / {rt} / {rx}; a wrong shape word's \
                     x0 loss {});",
                    b.n,
                    b.shape_hit(),
                    self.t0,
                    gains.join(", ")
                );
            }
        }
        if !self.motion.is_empty() {
            out += &format!(
                "\nmotion, single-object videos: clean render / from noise / from the opposite \
                 motion at t0 = {MOTION_T0:?} (follows prompt, keeps input):"
            );
            for m in &self.motion {
                let levels: Vec<String> = m
                    .follows_prompt
                    .iter()
                    .zip(&m.follows_input)
                    .map(|(p, i)| format!("{p}, {i}"))
                    .collect();
                out += &format!(
                    " {} {} / {} / {} of {};",
                    m.motion,
                    m.clean,
                    m.from_noise,
                    levels.join(" / "),
                    m.n
                );
            }
            out += &format!(" from-noise motion hit {:.3}", self.motion_hit());
            out += "\nmean path along the motion word (px; log growth of the mass for growing/shrinking), \
                    clean render / x0 predicted from pure noise:";
            for m in &self.motion {
                out += &format!(
                    " {} {:.2} / {:.2};",
                    m.motion,
                    m.clean_path.along(m.motion),
                    m.noise_x0_path.along(m.motion)
                );
            }
            if self.motion.iter().any(|m| m.coords_velocity.is_some()) {
                out += "\nmotion_coords velocity (px per clip, x / y):";
                for m in &self.motion {
                    let [x, y] = m.coords_velocity.unwrap_or_default();
                    out += &format!(" {} {x:.2} / {y:.2};", m.motion);
                }
            }
            out += "\nx0 loss with the true / the opposite motion word (gain):";
            for g in &self.motion_gain {
                out += &format!(
                    " t={}: {:.4} / {:.4} ({:+.1}%);",
                    g.t,
                    g.x0_loss,
                    g.x0_loss_wrong_motion,
                    100.0 * g.gain()
                );
            }
        }
        out
    }

    /// Mean from-noise motion hit over the motion words (0 when not probed).
    pub fn motion_hit(&self) -> f64 {
        mean(self.motion.iter().map(|m| ratio(m.from_noise, m.n)))
    }
}

fn ratio(k: usize, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        k as f64 / n as f64
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

/// Noise levels of the sensitivity probe.
const SENSITIVITY_TIMES: [f32; 4] = [0.3, 0.6, 0.75, 0.9];
/// Noise level at which attention is read.
const ATTENTION_T: f32 = 0.6;
/// Rows per network call.
const CHUNK: usize = 32;

/// Runs every probe on `model`.
pub fn probe(model: &TinyModel, opts: &ProbeOptions) -> Result<ProbeReport> {
    if opts.samples_per_shape == 0 || opts.sampler.steps == 0 {
        candle_core::bail!("probe: samples_per_shape and steps must be at least 1");
    }
    if !(opts.t0 > 0.0 && opts.t0 <= 1.0) {
        candle_core::bail!("probe: t0 must be in (0, 1], got {}", opts.t0);
    }
    let mut rng = WorldRng::seed_from_u64(opts.seed);
    let from_noise = from_noise_hits(model, opts, SizeClass::Large, 0)?;
    let wrong_shape = wrong_shape_hits(model, opts, &mut rng)?;
    let (sensitivity, attention) = word_sensitivity(model, opts, &mut rng)?;
    let beside = beside::beside_hits(model, opts, &mut rng)?;
    let (motion, motion_gain) = if model.cfg.max_frames >= world::VIDEO_FRAMES {
        motion::motion_hits(model, opts, opts.samples_per_shape.div_ceil(2), &mut rng)?
    } else {
        (Vec::new(), Vec::new())
    };
    // Last, so that the probes before it draw the same renders as before it existed.
    let backgrounds =
        backgrounds::background_hits(model, opts, opts.samples_per_shape.div_ceil(2), &mut rng)?;
    let small_from_noise = from_noise_hits(model, opts, SizeClass::Small, 41_000_003)?;
    Ok(ProbeReport {
        sampler: opts.sampler.kind,
        steps: opts.sampler.steps,
        guidance: opts.sampler.guidance,
        t0: opts.t0,
        from_noise,
        small_from_noise,
        wrong_shape,
        sensitivity,
        attention,
        beside,
        motion,
        motion_gain,
        backgrounds,
    })
}

/// A colour seen with `shape` in training, the `i`-th of them (cycling).
fn train_color(shape: Shape, i: usize) -> Color {
    let ok: Vec<Color> = Color::all()
        .iter()
        .copied()
        .filter(|&c| !HELD_OUT_PAIRS.contains(&(c, shape)))
        .collect();
    ok[i % ok.len()]
}

/// "a large <colour> <shape> [position] on a black background".
fn large_on_black(shape: Shape, color: Color, position: Option<Position>) -> SceneSpec {
    alone_on_black(shape, SizeClass::Large, color, position)
}

/// "a <size> <colour> <shape> [position] on a black background".
fn alone_on_black(
    shape: Shape,
    size: SizeClass,
    color: Color,
    position: Option<Position>,
) -> SceneSpec {
    SceneSpec {
        objects: vec![ObjectSpec {
            size: Some(size),
            position,
            ..ObjectSpec::new(shape, color)
        }],
        background: Some(Background::Black),
        frames: 1,
    }
}

/// The best-fitting shape of the largest blob of `color` in the first frame, if any.
fn drawn_shape(spec: &SceneSpec, frames: &[RgbImage], color: Color) -> Option<Shape> {
    let verdict = world::verify(spec, frames);
    verdict
        .detected
        .iter()
        .filter(|d| d.frame == 0 && d.color == color)
        .max_by(|a, b| a.area.total_cmp(&b.area))
        .map(|d| d.shape)
}

fn conditioning(model: &TinyModel, prompts: &[String], guidance: f32) -> Result<TinyCond> {
    let p: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let cond = model.encode(&p)?;
    let uncond = if guidance > 1.0 {
        let empty = vec![""; p.len()];
        Some(model.encode(&empty)?)
    } else {
        None
    };
    Ok(TinyCond::new(model, cond, uncond))
}

/// `x0` noised to `t0` with `noise`, then brought back to 0 by deterministic Euler steps: the
/// share of the sampler's steps that `t0` spans, at its guidance.
fn denoise_from(
    model: &TinyModel,
    x0: &Tensor,
    noise: &Tensor,
    cond: &TinyCond,
    t0: f32,
    opts: &ProbeOptions,
) -> Result<Tensor> {
    let b = x0.dim(0)?;
    let steps = ((opts.sampler.steps as f32 * t0).round() as usize).max(1);
    let mut x = model.schedule.add_noise(x0, noise, &vec![t0; b])?;
    cond.start_chain();
    for i in 0..steps {
        let t = t0 * (1.0 - i as f32 / steps as f32);
        let next = t0 * (1.0 - (i + 1) as f32 / steps as f32);
        let x0 = model.predict_x0(&x, &vec![t; b], cond, opts.sampler.guidance)?;
        x = model.schedule.step(&x, &x0, t, next)?;
    }
    Ok(x)
}

/// 1 when the first object of `spec` is drawn with its shape (the largest blob of its colour).
fn recognised(spec: &SceneSpec, frames: &[RgbImage]) -> usize {
    let o = spec.objects[0];
    (drawn_shape(spec, frames, o.color) == Some(o.shape)) as usize
}

/// Noise seeds of `len` consecutive rows starting at row `first` of a probe.
fn chunk_seeds(seed: u64, first: usize, len: usize) -> Vec<u64> {
    (0..len).map(|i| seed ^ (first + i) as u64).collect()
}

/// One sample's `[frames, channels, height, width]`.
fn sample_shape(model: &TinyModel, frames: usize) -> [usize; 4] {
    let s = world::IMAGE_SIZE as usize;
    [frames, model.cfg.channels, s, s]
}

/// Row noise of the given seeds, shaped like `[rows, frames, 3, 32, 32]`.
fn noise_for(seeds: &[u64], model: &TinyModel, frames: usize) -> Result<Tensor> {
    let mut rows: Vec<RowNoise> = seeds.iter().map(|&s| RowNoise::new(s)).collect();
    crate::pipeline::noise::batch_noise(&mut rows, &sample_shape(model, frames), model.device())
}

/// Samples of `frames` frames drawn from the noise of `seeds` with the probe's sampler.
fn sample_from_noise(
    model: &TinyModel,
    opts: &ProbeOptions,
    cond: &TinyCond,
    seeds: &[u64],
    frames: usize,
) -> Result<Tensor> {
    let mut rows: Vec<RowNoise> = seeds.iter().map(|&s| RowNoise::new(s)).collect();
    cond.start_chain();
    sample(
        model,
        model.schedule_for_frames(frames),
        opts.sampler,
        cond,
        &mut rows,
        &sample_shape(model, frames),
        model.device(),
    )
}

/// Renders as one batch `[rows, frames, 3, 32, 32]`.
fn stack_renders(renders: &[Vec<RgbImage>], model: &TinyModel) -> Result<Tensor> {
    let x0s = renders
        .iter()
        .map(|f| from_frames(f, model.device()))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&x0s, 0)
}

/// The prompts of `specs`, encoded (without an unconditional branch).
fn encode_specs(model: &TinyModel, specs: &[SceneSpec]) -> Result<TextCond> {
    let p: Vec<String> = specs.iter().map(world::prompt).collect();
    let p: Vec<&str> = p.iter().map(String::as_str).collect();
    model.encode(&p)
}

/// `wrong / base - 1`: how much a wrong word raises a loss (0 when the base loss is 0).
fn loss_gain(base: f64, wrong: f64) -> f64 {
    if base > 0.0 {
        wrong / base - 1.0
    } else {
        0.0
    }
}

/// Each shape of `size` alone on black, sampled from noise; `first_row` offsets the noise seeds
/// (0 for the large shapes, as before sizes were probed).
fn from_noise_hits(
    model: &TinyModel,
    opts: &ProbeOptions,
    size: SizeClass,
    first_row: usize,
) -> Result<Vec<ShapeHit>> {
    let mut out = Vec::new();
    for (k, &shape) in Shape::all().iter().enumerate() {
        let specs: Vec<SceneSpec> = (0..opts.samples_per_shape)
            .map(|i| alone_on_black(shape, size, train_color(shape, i), None))
            .collect();
        let mut hit = ShapeHit {
            shape,
            n: specs.len(),
            hits: 0,
            passes: 0,
        };
        for (c, chunk) in specs.chunks(CHUNK).enumerate() {
            let prompts: Vec<String> = chunk.iter().map(world::prompt).collect();
            let cond = conditioning(model, &prompts, opts.sampler.guidance)?;
            let first = first_row + k * 1_000_003 + c * CHUNK;
            let seeds = chunk_seeds(opts.seed, first, chunk.len());
            let x0 = sample_from_noise(model, opts, &cond, &seeds, 1)?;
            for (spec, frames) in chunk.iter().zip(to_frames(&x0)?) {
                hit.hits += recognised(spec, &frames);
                hit.passes += world::verify(spec, &frames).pass as usize;
            }
        }
        out.push(hit);
    }
    Ok(out)
}

fn wrong_shape_hits(
    model: &TinyModel,
    opts: &ProbeOptions,
    rng: &mut WorldRng,
) -> Result<Vec<WrongShape>> {
    let shapes = Shape::all();
    let mut out = Vec::new();
    for (k, &prompted) in shapes.iter().enumerate() {
        // Inputs cycle through the other shapes; prompt and input share colour and place.
        let cases: Vec<(SceneSpec, SceneSpec)> = (0..opts.samples_per_shape)
            .map(|i| {
                let input_shape = shapes[(k + 1 + i % (shapes.len() - 1)) % shapes.len()];
                let color = train_color(prompted, i);
                let position = Some(Position::Center);
                (
                    large_on_black(input_shape, color, position),
                    large_on_black(prompted, color, position),
                )
            })
            .collect();
        let mut w = WrongShape {
            prompted,
            n: cases.len(),
            follows_prompt: 0,
            follows_input: 0,
        };
        for (c, chunk) in cases.chunks(CHUNK).enumerate() {
            let inputs: Vec<Vec<RgbImage>> = chunk
                .iter()
                .map(|(input, _)| world::render(input, rng))
                .collect();
            let x0 = stack_renders(&inputs, model)?;
            let seeds = chunk_seeds(
                opts.seed,
                7_000_003 + k * 1_000_003 + c * CHUNK,
                chunk.len(),
            );
            let noise = noise_for(&seeds, model, 1)?;
            let prompts: Vec<String> = chunk.iter().map(|(_, p)| world::prompt(p)).collect();
            let cond = conditioning(model, &prompts, opts.sampler.guidance)?;
            let out_x = denoise_from(model, &x0, &noise, &cond, opts.t0, opts)?;
            for ((input, spec), frames) in chunk.iter().zip(to_frames(&out_x)?) {
                let drawn = drawn_shape(spec, &frames, spec.objects[0].color);
                w.follows_prompt += (drawn == Some(prompted)) as usize;
                w.follows_input += (drawn == Some(input.objects[0].shape)) as usize;
            }
        }
        out.push(w);
    }
    Ok(out)
}

/// The kind of a prompt word, for the attention breakdown.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WordKind {
    Bos,
    Shape,
    Color,
    Size,
    Position,
    Background,
    Other,
}

fn word_kind(word: &str) -> WordKind {
    let shape = Shape::all()
        .iter()
        .any(|s| s.name() == word || s.plural() == word);
    if shape {
        WordKind::Shape
    } else if Color::all().iter().any(|c| c.name() == word) {
        WordKind::Color
    } else if SizeClass::all().iter().any(|s| s.name() == word) {
        WordKind::Size
    } else if Position::all().iter().any(|p| p.name() == word) {
        WordKind::Position
    } else if word == "background" || Background::all().iter().any(|b| b.name() == word) {
        WordKind::Background
    } else {
        WordKind::Other
    }
}

/// Sensitivity rows and the attention mass, from single large objects at named positions.
fn word_sensitivity(
    model: &TinyModel,
    opts: &ProbeOptions,
    rng: &mut WorldRng,
) -> Result<(Vec<Sensitivity>, AttentionMass)> {
    let shapes = Shape::all();
    let colors = Color::all();
    let positions = Position::all();
    let n = opts.samples_per_shape.min(CHUNK);
    let mut base = Vec::with_capacity(n);
    let mut variants: [Vec<SceneSpec>; 3] = Default::default();
    for i in 0..n {
        let shape = shapes[i % shapes.len()];
        let color = train_color(shape, i / shapes.len());
        let position = positions[rng.random_range(0..positions.len())];
        base.push(large_on_black(shape, color, Some(position)));
        let other_shape = shapes[(i + 1 + rng.random_range(0..shapes.len() - 1)) % shapes.len()];
        let other_color =
            colors[(color.index() + 1 + rng.random_range(0..colors.len() - 1)) % colors.len()];
        let other_pos =
            positions[(position.index() + 1 + rng.random_range(0..positions.len() - 1)) % 5];
        variants[0].push(large_on_black(other_shape, color, Some(position)));
        variants[1].push(large_on_black(shape, other_color, Some(position)));
        variants[2].push(large_on_black(shape, color, Some(other_pos)));
    }
    let renders: Vec<Vec<RgbImage>> = base.iter().map(|s| world::render(s, rng)).collect();
    let x0 = stack_renders(&renders, model)?;
    let seeds = chunk_seeds(opts.seed, 9_000_011, n);
    let noise = noise_for(&seeds, model, 1)?;
    let base_text = encode_specs(model, &base)?;
    let variant_text = variants
        .iter()
        .map(|v| encode_specs(model, v))
        .collect::<Result<Vec<_>>>()?;

    let mut sensitivity = Vec::new();
    let mut attention = AttentionMass::default();
    for &t in &SENSITIVITY_TIMES {
        let tt = vec![t; n];
        let xt = model.schedule.add_noise(&x0, &noise, &tt)?;
        let (v, captured) = capture_cross_attention(|| model.velocity(&xt, &tt, &base_text));
        let v = v?;
        if t == ATTENTION_T {
            attention = attention_mass(&captured, &base, &renders, model)?;
        }
        let target = (&noise - &x0)?;
        // x0 = x_t - t v, so an x0 error is t times the velocity error.
        let x0_loss = |v: &Tensor| -> Result<f64> {
            let e = (v - &target)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
            Ok(e * (t as f64).powi(2))
        };
        let rms = |vk: &Tensor| -> Result<f64> {
            Ok((vk - &v)?.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt() as f64)
        };
        let rms_change = |text: &TextCond| rms(&model.velocity(&xt, &tt, text)?);
        let wrong_shape_v = model.velocity(&xt, &tt, &variant_text[0])?;
        let wrong_shape = x0_loss(&wrong_shape_v)?;
        let rms = [
            rms(&wrong_shape_v)?,
            rms_change(&variant_text[1])?,
            rms_change(&variant_text[2])?,
        ];
        let pooled_only = TextCond {
            pooled: variant_text[0].pooled.clone(),
            ..base_text.clone()
        };
        let tokens_only = TextCond {
            pooled: base_text.pooled.clone(),
            ..variant_text[0].clone()
        };
        sensitivity.push(Sensitivity {
            t,
            shape: rms[0],
            color: rms[1],
            position: rms[2],
            x0_loss: x0_loss(&v)?,
            x0_loss_wrong_shape: wrong_shape,
            shape_pooled_only: rms_change(&pooled_only)?,
            shape_tokens_only: rms_change(&tokens_only)?,
        });
    }
    Ok((sensitivity, attention))
}

/// Averages captured cross-attention `[B, Tq, L]` over each row's object tokens (weighted by
/// the object's coverage at that layer's resolution), then sums it per word kind.
fn attention_mass(
    captured: &[Tensor],
    specs: &[SceneSpec],
    renders: &[Vec<RgbImage>],
    model: &TinyModel,
) -> Result<AttentionMass> {
    let size = world::IMAGE_SIZE as usize;
    let masks: Vec<Vec<f32>> = specs
        .iter()
        .zip(renders)
        .map(|(spec, frames)| {
            let bg = spec.background.map_or([0, 0, 0], |b| b.rgb());
            frames[0]
                .pixels()
                .map(|p| (p.0 != bg) as u8 as f32)
                .collect()
        })
        .collect();
    let kinds: Vec<Vec<WordKind>> = specs
        .iter()
        .map(|s| {
            let p = world::prompt(s);
            let mut k = vec![WordKind::Bos];
            k.extend(p.split_whitespace().map(word_kind));
            k.truncate(model.cfg.text_max_len);
            k
        })
        .collect();
    let mut sums = [0f64; 7];
    let mut layers = 0usize;
    for probs in captured {
        let (b, tq, l) = probs.dims3()?;
        let side = (tq as f64).sqrt() as usize;
        if side * side != tq || side == 0 || !size.is_multiple_of(side) || b != specs.len() {
            continue; // not one frame's square token grid
        }
        let probs = probs.to_vec3::<f32>()?;
        let cell = size / side;
        for (row, p) in probs.iter().enumerate() {
            // Object coverage of each token cell.
            let mut weights = vec![0f32; tq];
            for (i, &m) in masks[row].iter().enumerate() {
                let (x, y) = (i % size, i / size);
                weights[(y / cell) * side + x / cell] += m;
            }
            let total: f32 = weights.iter().sum();
            if total <= 0.0 {
                continue;
            }
            for (q, &w) in weights.iter().enumerate() {
                if w == 0.0 {
                    continue;
                }
                for (pos, &a) in p[q].iter().enumerate().take(l) {
                    let kind = kinds[row].get(pos).copied();
                    let slot = match kind {
                        Some(WordKind::Bos) => 0,
                        Some(WordKind::Shape) => 1,
                        Some(WordKind::Color) => 2,
                        Some(WordKind::Size) => 3,
                        Some(WordKind::Position) => 4,
                        Some(WordKind::Background) => 5,
                        Some(WordKind::Other) => 6,
                        None => continue, // padding: zero weight by construction
                    };
                    sums[slot] += (w / total * a) as f64;
                }
            }
        }
        layers += b;
    }
    let d = layers.max(1) as f64;
    Ok(AttentionMass {
        bos: sums[0] / d,
        shape: sums[1] / d,
        color: sums[2] / d,
        size: sums[3] / d,
        position: sums[4] / d,
        background: sums[5] / d,
        other: sums[6] / d,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::tiny::{TinyConfig, TinyTokenizer};
    use crate::pipeline::FlowSchedule;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn tiny_model(denoiser: &str) -> TinyModel {
        let tokenizer = TinyTokenizer::from_vocabulary(&world::vocabulary()).unwrap();
        let mut cfg = TinyConfig {
            dim: 32,
            depth: 1,
            heads: 2,
            mlp_ratio: 2,
            patch: 4,
            text_dim: 32,
            text_depth: 1,
            text_max_len: 24,
            vocab_size: tokenizer.vocab_size(),
            ..TinyConfig::default()
        };
        if denoiser == "unet" {
            cfg.denoiser = crate::families::tiny::config::DenoiserKind::Unet;
            cfg.unet_channels = vec![8, 16, 32];
        }
        let map = VarMap::new();
        let vb = crate::nn::seeded_var_builder(&map, 3, DType::F32, &Device::Cpu);
        let model = TinyModel::new(vb, &cfg, tokenizer, FlowSchedule::default()).unwrap();
        // Zero-initialised output layers would make every probe trivially 0: perturb all.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for var in map.all_vars() {
            let n = var.elem_count();
            let noise: Vec<f32> = (0..n).map(|_| rng.random_range(-0.2..0.2)).collect();
            let t = Tensor::from_vec(noise, var.shape(), &Device::Cpu).unwrap();
            var.set(&(var.as_tensor() + t).unwrap()).unwrap();
        }
        model
    }

    #[test]
    fn word_kinds_cover_the_grammar() {
        assert_eq!(word_kind("cross"), WordKind::Shape);
        assert_eq!(word_kind("triangles"), WordKind::Shape);
        assert_eq!(word_kind("orange"), WordKind::Color);
        assert_eq!(word_kind("large"), WordKind::Size);
        assert_eq!(word_kind("center"), WordKind::Position);
        assert_eq!(word_kind("gray"), WordKind::Background);
        assert_eq!(word_kind("background"), WordKind::Background);
        assert_eq!(word_kind("on"), WordKind::Other);
    }

    #[test]
    fn train_colors_avoid_held_out_pairs() {
        for &s in Shape::all() {
            for i in 0..12 {
                let spec = large_on_black(s, train_color(s, i), None);
                assert_eq!(world::split_of(&spec), world::Split::Train);
            }
        }
    }

    /// The probes run on both denoisers, count what they claim, and the attention shares are
    /// a distribution over the prompt's words (padding gets none).
    #[test]
    fn probes_run_and_attention_sums_to_one() {
        for denoiser in ["dit", "unet"] {
            let model = tiny_model(denoiser);
            let defaults = ProbeOptions::default();
            let opts = ProbeOptions {
                samples_per_shape: 3,
                sampler: SamplerParams {
                    steps: 2,
                    ..defaults.sampler
                },
                ..defaults
            };
            let r = probe(&model, &opts).unwrap();
            assert_eq!(r.from_noise.len(), 4);
            assert!(r.from_noise.iter().all(|h| h.n == 3 && h.hits <= 3));
            assert_eq!(r.small_from_noise.len(), 4);
            assert!(r.small_from_noise.iter().all(|h| h.n == 3 && h.hits <= 3));
            assert!(r
                .wrong_shape
                .iter()
                .all(|w| w.follows_prompt + w.follows_input <= w.n));
            assert_eq!(r.sensitivity.len(), SENSITIVITY_TIMES.len());
            assert_eq!(r.beside.len(), 4);
            assert!(r.beside.iter().all(|b| b.n == 3
                && b.clean <= 3
                && b.from_noise <= 3
                && b.from_render.len() == BESIDE_T0.len()
                && b.from_render.iter().all(|&k| k <= 3)
                && b.from_noise_by_size.iter().sum::<usize>() == b.from_noise));
            // Probe 7: every background, 2 samples per shape (3 halved, rounded up), each
            // sample's drawn background counted once.
            assert_eq!(r.backgrounds.len(), PROBED_BACKGROUNDS.len());
            assert!(r.backgrounds.iter().all(|b| b.n == 2
                && b.hits.iter().all(|&k| k <= 2)
                && b.drawn.iter().sum::<usize>() == 8
                && b.from_render.iter().all(|&k| k <= 2)
                && b.shape_word_gain.len() == backgrounds::WORD_GAIN_T.len()
                && b.shape_word_x0_loss.len() == backgrounds::WORD_GAIN_T.len()
                && b.shape_word_x0_loss.iter().flatten().all(|l| *l > 0.0)
                && b.shape_word_gain
                    .iter()
                    .flatten()
                    .all(|g| g.is_finite() && *g > -1.0)));
            assert!(r.summary().contains("unstated"));
            assert!(r.sensitivity.iter().all(|s| s.shape > 0.0 && s.color > 0.0));
            // The two paths each carry part of the shape word.
            assert!(r
                .sensitivity
                .iter()
                .all(|s| s.shape_pooled_only > 0.0 && s.shape_tokens_only > 0.0));
            // Probe 6: every motion word, 2 clips each (half the samples, rounded up).
            assert_eq!(r.motion.len(), crate::world::Motion::all().len());
            assert!(r.motion.iter().all(|m| m.n == 2
                && m.clean <= 2
                && m.from_noise <= 2
                && m.follows_prompt.len() == MOTION_T0.len()
                && m.follows_prompt
                    .iter()
                    .zip(&m.follows_input)
                    .all(|(p, i)| p + i <= 2)));
            // The clean paths travel as told; a random model's mean prediction is some finite
            // path of its own.
            assert!(r.motion.iter().all(|m| m.clean_path.along(m.motion) > -0.5
                && m.noise_x0_path.dx.is_finite()
                && m.noise_x0_path.log_growth.is_finite()));
            assert_eq!(r.motion_gain.len(), 2);
            assert!(r.motion_gain.iter().all(|g| g.x0_loss > 0.0
                && g.x0_loss_wrong_motion > 0.0
                && g.x0_loss != g.x0_loss_wrong_motion));
            let a = &r.attention;
            let total = a.bos + a.shape + a.color + a.size + a.position + a.background + a.other;
            assert!(
                (total - 1.0).abs() < 1e-3,
                "{denoiser}: attention sums to {total}"
            );
            assert!(!r.summary().is_empty());
        }
    }

    /// A true render denoised from a low noise level keeps its shape: the probe's scoring
    /// recognises shapes, so a model that ignored them could not score well by accident.
    #[test]
    fn drawn_shape_reads_true_renders() {
        let mut rng = WorldRng::seed_from_u64(1);
        for &s in Shape::all() {
            let spec = large_on_black(s, train_color(s, 0), Some(Position::Center));
            let frames = world::render(&spec, &mut rng);
            assert_eq!(drawn_shape(&spec, &frames, spec.objects[0].color), Some(s));
        }
    }
}
