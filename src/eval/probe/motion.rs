//! 6. **Motion**: single-object videos, one per motion word. Does the verifier see the prompted
//!    motion in the clean render (the probe's ceiling), in a clip sampled from pure noise, and
//!    in a render of the *opposite* motion noised to each level of [`MOTION_T0`] and denoised
//!    under the prompt? And how much worse is the x0 prediction of a noised clip when its
//!    prompt names the opposite motion ([`MotionGain`]): a smooth signal of whether the motion
//!    word is read at all, long before sampled paths change.
//!
//! Why: videos fail the eval mostly on motion (the objects are drawn but do not move as told).
//! A path is visible at lower noise than an outline, so the wrong-motion runs start higher
//! than the wrong-shape probe's `t0`.

use candle_core::Result;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::{
    chunk_seeds, conditioning, encode_specs, euler_from, noise_for, sample_from_noise,
    stack_renders, train_color, ProbeOptions, CHUNK,
};
use crate::families::tiny::TinyModel;
use crate::pipeline::{to_frames, NoiseSchedule};
use crate::world::{
    self, Background, Motion, ObjectSpec, SceneSpec, Shape, WorldRng, VIDEO_FRAMES,
};

/// How often one motion word is drawn as that motion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MotionHit {
    pub motion: Motion,
    pub n: usize,
    /// The verifier sees the motion in the clean render.
    pub clean: usize,
    /// ... in a clip sampled from pure noise.
    pub from_noise: usize,
    /// ... in a render of the opposite motion ([`opposite`]) noised to each level of
    /// [`MOTION_T0`] and denoised under this motion's prompt: the output follows the prompt.
    pub follows_prompt: Vec<usize>,
    /// ... the output keeps the input's (opposite) motion, per level.
    pub follows_input: Vec<usize>,
}

/// Noise levels the opposite-motion renders are denoised from, and the motion word's x0-loss
/// gain is read at.
pub const MOTION_T0: [f32; 2] = [0.6, 0.9];

/// The x0 loss of noised clips under their own prompt and under the opposite motion's prompt,
/// at one noise level, over every clip of the probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MotionGain {
    pub t: f32,
    pub x0_loss: f64,
    pub x0_loss_wrong_motion: f64,
}

impl MotionGain {
    /// `x0_loss_wrong_motion / x0_loss - 1`: what reading the motion word is worth.
    pub fn gain(&self) -> f64 {
        super::loss_gain(self.x0_loss, self.x0_loss_wrong_motion)
    }
}

/// The motion whose render the wrong-motion run starts from: the reverse direction, or for
/// staying still a translation, so that every pair differs in path.
pub fn opposite(m: Motion) -> Motion {
    match m {
        Motion::Still => Motion::Right,
        Motion::Left => Motion::Right,
        Motion::Right => Motion::Left,
        Motion::Up => Motion::Down,
        Motion::Down => Motion::Up,
        Motion::Growing => Motion::Shrinking,
        Motion::Shrinking => Motion::Growing,
    }
}

/// "a <colour> <shape> <motion> on a black background": train-split pairs, shapes cycling.
fn clip(motion: Motion, i: usize) -> SceneSpec {
    let shape = Shape::all()[i % Shape::all().len()];
    SceneSpec {
        objects: vec![ObjectSpec {
            motion: Some(motion),
            ..ObjectSpec::new(shape, train_color(shape, i / Shape::all().len()))
        }],
        background: Some(Background::Black),
        frames: VIDEO_FRAMES,
    }
}

fn seen_motion(spec: &SceneSpec, frames: &[RgbImage]) -> Option<Motion> {
    world::observed_motions(spec, frames)
        .first()
        .copied()
        .flatten()
}

fn moves_as(spec: &SceneSpec, frames: &[RgbImage], motion: Motion) -> bool {
    seen_motion(spec, frames) == Some(motion)
}

/// `spec` with its object on `motion`'s path.
fn with_motion(spec: &SceneSpec, motion: Motion) -> SceneSpec {
    SceneSpec {
        objects: vec![ObjectSpec {
            motion: Some(motion),
            ..spec.objects[0]
        }],
        ..spec.clone()
    }
}

/// Runs probe 6 for every motion, `n` clips each: the hits per motion, and the x0-loss gain of
/// the motion word over all clips.
pub(super) fn motion_hits(
    model: &TinyModel,
    opts: &ProbeOptions,
    n: usize,
    rng: &mut WorldRng,
) -> Result<(Vec<MotionHit>, Vec<MotionGain>)> {
    // Videos cost 8 frames each; a quarter of a network call's rows keeps batches alike.
    let chunk_len = (CHUNK / 4).max(1);
    let mut hits = Vec::new();
    let mut gains: Vec<MotionGain> = MOTION_T0
        .iter()
        .map(|&t| MotionGain {
            t,
            x0_loss: 0.0,
            x0_loss_wrong_motion: 0.0,
        })
        .collect();
    let mut chunks = 0usize;
    for (k, &motion) in Motion::all().iter().enumerate() {
        let specs: Vec<SceneSpec> = (0..n).map(|i| clip(motion, i)).collect();
        let levels = MOTION_T0.len();
        let mut hit = MotionHit {
            motion,
            n,
            clean: 0,
            from_noise: 0,
            follows_prompt: vec![0; levels],
            follows_input: vec![0; levels],
        };
        let wrong = opposite(motion);
        for (c, chunk) in specs.chunks(chunk_len).enumerate() {
            let first = 29_000_003 + k * 1_000_003 + c * chunk_len;
            let prompts: Vec<String> = chunk.iter().map(world::prompt).collect();
            let cond = conditioning(model, &prompts, opts.guidance)?;
            let renders: Vec<Vec<RgbImage>> = chunk.iter().map(|s| world::render(s, rng)).collect();
            for (spec, frames) in chunk.iter().zip(&renders) {
                hit.clean += moves_as(spec, frames, motion) as usize;
            }

            let seeds = chunk_seeds(opts.seed, first, chunk.len());
            let sampled = sample_from_noise(model, opts, &cond, &seeds, VIDEO_FRAMES)?;
            for (spec, frames) in chunk.iter().zip(to_frames(&sampled)?) {
                hit.from_noise += moves_as(spec, &frames, motion) as usize;
            }

            // The same objects on the opposite path, noised, denoised under the prompt.
            let inputs: Vec<Vec<RgbImage>> = chunk
                .iter()
                .map(|s| world::render(&with_motion(s, wrong), rng))
                .collect();
            let x0 = stack_renders(&inputs, model)?;
            let noise = noise_for(
                &chunk_seeds(opts.seed, first + 500_000, chunk.len()),
                model,
                VIDEO_FRAMES,
            )?;
            for (level, &t0) in MOTION_T0.iter().enumerate() {
                let xt = model
                    .schedule
                    .add_noise(&x0, &noise, &vec![t0; chunk.len()])?;
                let steps = ((opts.steps as f32 * t0).round() as usize).max(1);
                let out_x = euler_from(model, xt, &cond, t0, steps, opts.guidance)?;
                for (spec, frames) in chunk.iter().zip(to_frames(&out_x)?) {
                    let seen = seen_motion(spec, &frames);
                    hit.follows_prompt[level] += (seen == Some(motion)) as usize;
                    hit.follows_input[level] += (seen == Some(wrong)) as usize;
                }
            }

            // The motion word's worth: x0 loss of the true renders under the true prompt and
            // under the opposite motion's prompt.
            let x0 = stack_renders(&renders, model)?;
            let texts = [
                encode_specs(model, chunk)?,
                encode_specs(
                    model,
                    &chunk
                        .iter()
                        .map(|s| with_motion(s, wrong))
                        .collect::<Vec<_>>(),
                )?,
            ];
            let noise = noise_for(
                &chunk_seeds(opts.seed, first + 700_000, chunk.len()),
                model,
                VIDEO_FRAMES,
            )?;
            let target = (&noise - &x0)?;
            for g in gains.iter_mut() {
                let tt = vec![g.t; chunk.len()];
                let xt = model.schedule.add_noise(&x0, &noise, &tt)?;
                let mut loss = [0f64; 2];
                for (l, text) in loss.iter_mut().zip(&texts) {
                    let v = model.velocity(&xt, &tt, text)?;
                    // x0 = x_t - t v, so an x0 error is t times the velocity error.
                    let e = (v - &target)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
                    *l = e * (g.t as f64).powi(2);
                }
                g.x0_loss += loss[0];
                g.x0_loss_wrong_motion += loss[1];
            }
            chunks += 1;
        }
        hits.push(hit);
    }
    for g in gains.iter_mut() {
        g.x0_loss /= chunks.max(1) as f64;
        g.x0_loss_wrong_motion /= chunks.max(1) as f64;
    }
    Ok((hits, gains))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::Split;
    use rand::SeedableRng;

    /// Every clip is a train-split single-object video whose clean render the verifier reads
    /// as the prompted motion, and the opposite render as the opposite motion: the probe's
    /// ceiling is the model's, not the scorer's.
    #[test]
    fn motion_clips_are_train_videos_the_verifier_reads() {
        let mut rng = WorldRng::seed_from_u64(5);
        for &m in Motion::all() {
            assert_ne!(opposite(m), m);
            let (mut clean, mut reversed) = (0, 0);
            for i in 0..8 {
                let spec = clip(m, i);
                assert_eq!(world::split_of(&spec), Split::Train);
                assert_eq!(spec.frames, VIDEO_FRAMES);
                assert!(world::prompt(&spec).contains(m.phrase()));
                clean += moves_as(&spec, &world::render(&spec, &mut rng), m) as usize;
                let rev = with_motion(&spec, opposite(m));
                reversed += moves_as(&rev, &world::render(&rev, &mut rng), opposite(m)) as usize;
            }
            assert!(
                clean >= 7,
                "{m:?}: {clean}/8 clean renders read as the motion"
            );
            assert!(reversed >= 7, "{m:?}: {reversed}/8 opposite renders read");
        }
    }
}
