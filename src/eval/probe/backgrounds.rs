//! 7. **Backgrounds**: each shape alone and large, sampled from noise on each background and
//!    with none stated. Is the shape drawn, and which background does an unstated prompt get?
//!    And is a true render kept when denoised from the probe's `t0` under its own prompt?
//!    A shape lost from there is drawn wrong at middle noise, not decided wrong at high noise.
//!    And how much worse is the x0 predicted from that render's noisy copy when the prompt
//!    names another shape? Where that gain is small, the network does not read the shape word.
//!
//! Why: probe 1 samples on black only, and phase 16 drew crosses there (23 of 24) while the
//! eval missed the cross in 30 of 33 gray-background prompts. Unstated backgrounds are half
//! of the eval's prompts, so which background the model picks for them decides them too.

use candle_core::{Result, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::{
    chunk_seeds, conditioning, denoise_from, encode_specs, noise_for, recognised,
    sample_from_noise, stack_renders, train_color, CHUNK,
};
use crate::families::tiny::{TextCond, TinyModel};
use crate::pipeline::schedule::NoiseSchedule;
use crate::pipeline::to_frames;
use crate::world::{self, Background, ObjectSpec, SceneSpec, Shape, SizeClass, WorldRng};

/// The backgrounds probed, in [`BackgroundHit`]'s order: each stated, then unstated.
pub const PROBED_BACKGROUNDS: [Option<Background>; 4] = [
    Some(Background::Black),
    Some(Background::Gray),
    Some(Background::White),
    None,
];

/// Noise levels at which probe 7 reads what the shape word is worth: where the shape is
/// decided (0.9) and where a true cross on gray is lost (0.6).
pub const WORD_GAIN_T: [f32; 2] = [0.6, 0.9];

/// From-noise shape hits on one background (`None`: the prompt names none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackgroundHit {
    pub background: Option<Background>,
    /// Samples per shape.
    pub n: usize,
    /// Recognised shapes, in [`Shape::all`]'s order.
    pub hits: [usize; 4],
    /// The backgrounds drawn (black, gray, white), read from the frame's border.
    pub drawn: [usize; 3],
    /// Recognised shapes after denoising a true render (on the stated background, or a
    /// random one when unstated) from the probe's `t0`, in [`Shape::all`]'s order.
    #[serde(default)]
    pub from_render: [usize; 4],
    /// Per [`WORD_GAIN_T`] level and shape: how much the x0 predicted from a true render's
    /// noisy copy gets worse when the prompt names another shape (`wrong / right - 1` of the
    /// summed squared errors, one conditional pass each, no guidance).
    #[serde(default)]
    pub shape_word_gain: Vec<[f64; 4]>,
    /// The right word's x0 error under it, per [`WORD_GAIN_T`] level and shape (mean squared,
    /// per value in [-1, 1] units): a gain over a large error says less than over a small one.
    #[serde(default)]
    pub shape_word_x0_loss: Vec<[f64; 4]>,
}

impl BackgroundHit {
    /// Share of samples whose shape was recognised.
    pub fn shape_hit(&self) -> f64 {
        super::ratio(self.hits.iter().sum(), 4 * self.n)
    }
}

/// "a large <colour> <shape> [on a <background> background]".
fn scene(shape: Shape, i: usize, background: Option<Background>) -> SceneSpec {
    SceneSpec {
        objects: vec![ObjectSpec {
            size: Some(SizeClass::Large),
            ..ObjectSpec::new(shape, train_color(shape, i))
        }],
        background,
        frames: 1,
    }
}

/// The probed background nearest to the median colour of the frame's border pixels.
fn drawn_background(frame: &RgbImage) -> Background {
    let (w, h) = frame.dimensions();
    let mut border: Vec<u32> = frame
        .enumerate_pixels()
        .filter(|(x, y, _)| *x == 0 || *y == 0 || *x + 1 == w || *y + 1 == h)
        .map(|(_, _, p)| p.0.iter().map(|&c| c as u32).sum())
        .collect();
    border.sort_unstable();
    let median = border[border.len() / 2] as f32;
    *Background::all()
        .iter()
        .min_by(|a, b| {
            let d =
                |bg: &Background| (bg.rgb().iter().map(|&c| c as f32).sum::<f32>() - median).abs();
            d(a).total_cmp(&d(b))
        })
        .expect("three backgrounds")
}

/// Runs probe 7 with `n` samples per shape and background.
pub(super) fn background_hits(
    model: &TinyModel,
    opts: &super::ProbeOptions,
    n: usize,
    rng: &mut WorldRng,
) -> Result<Vec<BackgroundHit>> {
    let mut out = Vec::new();
    for (b, &background) in PROBED_BACKGROUNDS.iter().enumerate() {
        let mut hit = BackgroundHit {
            background,
            n,
            hits: [0; 4],
            drawn: [0; 3],
            from_render: [0; 4],
            shape_word_gain: Vec::new(),
            shape_word_x0_loss: Vec::new(),
        };
        // Summed squared velocity errors (right word, wrong word) per level and shape.
        let mut errors = [[(0f64, 0f64); 4]; WORD_GAIN_T.len()];
        let specs: Vec<(usize, SceneSpec)> = Shape::all()
            .iter()
            .enumerate()
            .flat_map(|(k, &shape)| (0..n).map(move |i| (k, scene(shape, i, background))))
            .collect();
        for (c, chunk) in specs.chunks(CHUNK).enumerate() {
            let prompts: Vec<String> = chunk.iter().map(|(_, s)| world::prompt(s)).collect();
            let cond = conditioning(model, &prompts, opts.sampler.guidance)?;
            let first = 29_000_003 + b * 1_000_003 + c * CHUNK;
            let seeds = chunk_seeds(opts.seed, first, chunk.len());
            let x0 = sample_from_noise(model, opts, &cond, &seeds, 1)?;
            for ((k, spec), frames) in chunk.iter().zip(to_frames(&x0)?) {
                hit.hits[*k] += recognised(spec, &frames);
                let drawn = drawn_background(&frames[0]);
                let i = Background::all().iter().position(|&bg| bg == drawn);
                hit.drawn[i.unwrap_or(0)] += 1;
            }
            let renders: Vec<_> = chunk.iter().map(|(_, s)| world::render(s, rng)).collect();
            let x0 = stack_renders(&renders, model)?;
            let noise = noise_for(
                &chunk_seeds(opts.seed, first + 500_000, chunk.len()),
                model,
                1,
            )?;
            let out_x = denoise_from(model, &x0, &noise, &cond, opts.t0, opts)?;
            for ((k, spec), frames) in chunk.iter().zip(to_frames(&out_x)?) {
                hit.from_render[*k] += recognised(spec, &frames);
            }
            word_errors(model, chunk, &cond.cond, &x0, &noise, &mut errors)?;
        }
        hit.shape_word_gain = errors
            .iter()
            .map(|level| level.map(|(right, wrong)| super::loss_gain(right, wrong)))
            .collect();
        // x0 = x_t - t v, so an x0 error is t times the velocity error.
        let values = (n * model.cfg.channels * (world::IMAGE_SIZE as usize).pow(2)) as f64;
        hit.shape_word_x0_loss = errors
            .iter()
            .zip(WORD_GAIN_T)
            .map(|(level, t)| level.map(|(right, _)| right * f64::from(t * t) / values))
            .collect();
        out.push(hit);
    }
    Ok(out)
}

/// The wrong shape word for row `i` of shape `k`: the other three shapes in turn.
fn other_shape(k: usize, i: usize) -> Shape {
    let shapes = Shape::all();
    shapes[(k + 1 + i % (shapes.len() - 1)) % shapes.len()]
}

/// Adds each row's squared velocity error at every [`WORD_GAIN_T`] level, under its own prompt
/// and under one naming another shape (rotated through the other three), to its shape's sums.
/// `right` is the chunk's own prompts, already encoded for sampling.
fn word_errors(
    model: &TinyModel,
    chunk: &[(usize, SceneSpec)],
    right: &TextCond,
    x0: &Tensor,
    noise: &Tensor,
    errors: &mut [[(f64, f64); 4]; WORD_GAIN_T.len()],
) -> Result<()> {
    let wrong: Vec<SceneSpec> = chunk
        .iter()
        .enumerate()
        .map(|(i, (k, s))| {
            let mut s = s.clone();
            s.objects[0].shape = other_shape(*k, i);
            s
        })
        .collect();
    let wrong = encode_specs(model, &wrong)?;
    let target = (noise - x0)?;
    for (level, &t) in errors.iter_mut().zip(&WORD_GAIN_T) {
        let tt = vec![t; chunk.len()];
        let xt = model.schedule.add_noise(x0, noise, &tt)?;
        let row_errors = |text| -> Result<Vec<f32>> {
            (model.velocity(&xt, &tt, text)? - &target)?
                .sqr()?
                .flatten_from(1)?
                .sum(1)?
                .to_vec1()
        };
        let (r, w) = (row_errors(right)?, row_errors(&wrong)?);
        for (((k, _), r), w) in chunk.iter().zip(r).zip(w) {
            level[*k].0 += f64::from(r);
            level[*k].1 += f64::from(w);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::drawn_shape;
    use super::*;
    use rand::SeedableRng;

    /// True renders: the border reads as the stated background, and the verifier recognises
    /// the shape on every background (the probe's ceiling is the model's).
    #[test]
    fn true_renders_read_their_background_and_shape() {
        let mut rng = world::WorldRng::seed_from_u64(4);
        for &bg in Background::all() {
            for (i, &shape) in Shape::all().iter().enumerate() {
                let spec = scene(shape, i, Some(bg));
                let frames = world::render(&spec, &mut rng);
                assert_eq!(drawn_background(&frames[0]), bg, "{}", world::prompt(&spec));
                let color = spec.objects[0].color;
                assert_eq!(
                    drawn_shape(&spec, &frames, color),
                    Some(shape),
                    "{}",
                    world::prompt(&spec)
                );
            }
        }
        assert!(world::prompt(&scene(Shape::Cross, 0, None)).ends_with("cross"));
    }

    #[test]
    fn the_wrong_shape_word_is_each_other_shape_in_turn() {
        for (k, &shape) in Shape::all().iter().enumerate() {
            let others: std::collections::HashSet<Shape> =
                (0..3).map(|i| other_shape(k, i)).collect();
            assert_eq!(others.len(), 3, "{shape}");
            assert!(!others.contains(&shape), "{shape}");
        }
    }
}
