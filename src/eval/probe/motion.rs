//! 6. **Motion**: single-object videos, one per motion word. Does the verifier see the prompted
//!    motion in the clean render (the probe's ceiling), in a clip sampled from pure noise, and
//!    in a render of the *opposite* motion noised to each level of [`MOTION_T0`] and denoised
//!    under the prompt? And how much worse is the x0 prediction of a noised clip when its
//!    prompt names the opposite motion ([`MotionGain`]): a smooth signal of whether the motion
//!    word is read at all, long before sampled paths change. And the path of the x0 the model
//!    predicts from pure noise ([`MeanPath`]): the mean of every clip the prompt allows, which
//!    still moves as the word says (a path's centre is uniform over where it fits, so frame k's
//!    expected centre is shifted by the word's offset at k) even though it is a blur.
//!
//! Why: videos fail the eval mostly on motion (the objects are drawn but do not move as told).
//! A path is visible at lower noise than an outline, so the wrong-motion runs start higher
//! than the wrong-shape probe's `t0`.

use candle_core::{Result, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::{
    chunk_seeds, conditioning, denoise_from, encode_specs, noise_for, sample_from_noise,
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
    /// The clean renders' mean path: what the word asks for, measured as below.
    #[serde(default)]
    pub clean_path: MeanPath,
    /// The mean path of the x0 predicted at t = 1 (pure noise) under the prompt.
    #[serde(default)]
    pub noise_x0_path: MeanPath,
    /// With `motion_coords`: the mean velocity the prompts give the clip's coordinates, px per
    /// clip `[x, y]` (a translation's clean path is 12 px). Shows whether the map that reads
    /// it learns, before the predicted path moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coords_velocity: Option<[f64; 2]>,
}

/// Where a clip's brightness goes from its first frame to its last: the centroid's
/// displacement in px and the log ratio of its spread (rms distance from the centroid). It reads
/// blurs as well as sharp objects, so it shows a word being read in the model's mean prediction
/// long before sampled clips move.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MeanPath {
    pub dx: f64,
    pub dy: f64,
    /// Half the log ratio of the last frame's mass to the first's: the log of the linear
    /// scale for one clip (ln 2 for growing). Unlike the spread of the mass, which it replaced,
    /// it survives averaging over places: what a model predicts from pure noise for objects
    /// at random places is such an average, whose spread barely changes as they grow.
    pub log_growth: f64,
}

impl MeanPath {
    /// How far the path goes the way `motion` says: px along a translation's direction, the
    /// log growth for growing (negated for shrinking), and minus the distance travelled for
    /// staying still (0 at best).
    pub fn along(&self, motion: Motion) -> f64 {
        let (ux, uy) = motion.direction();
        match motion {
            Motion::Still => -self.dx.hypot(self.dy),
            Motion::Growing => self.log_growth,
            Motion::Shrinking => -self.log_growth,
            _ => self.dx * ux as f64 + self.dy * uy as f64,
        }
    }

    /// The mean path of a `[F, C, H, W]` clip in [-1, 1] on a black background: brightness
    /// above black is the mass.
    pub(super) fn of_clip(clip: &Tensor) -> Result<Self> {
        let (f, _c, h, w) = clip.dims4()?;
        let mass = ((clip + 1.0)? * 0.5)?.clamp(0f32, 1f32)?.sum(1)?;
        let mass = mass.flatten_all()?.to_vec1::<f32>()?;
        let frame = |k: usize| -> (f64, f64, f64) {
            let m = &mass[k * h * w..(k + 1) * h * w];
            let total: f64 = m.iter().map(|&v| v as f64).sum::<f64>().max(1e-9);
            let (mut cx, mut cy) = (0f64, 0f64);
            for (i, &v) in m.iter().enumerate() {
                cx += (i % w) as f64 * v as f64;
                cy += (i / w) as f64 * v as f64;
            }
            (cx / total, cy / total, total)
        };
        let (first, last) = (frame(0), frame(f - 1));
        Ok(Self {
            dx: last.0 - first.0,
            dy: last.1 - first.1,
            log_growth: 0.5 * (last.2 / first.2).ln(),
        })
    }

    /// The mean path over the clips of a `[B, F, C, H, W]` batch, added to `self` with weight
    /// 1 / `n`.
    fn accumulate(&mut self, clips: &Tensor, n: usize) -> Result<()> {
        for b in 0..clips.dim(0)? {
            let p = Self::of_clip(&clips.get(b)?)?;
            self.dx += p.dx / n as f64;
            self.dy += p.dy / n as f64;
            self.log_growth += p.log_growth / n as f64;
        }
        Ok(())
    }
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
pub(super) fn clip(motion: Motion, i: usize) -> SceneSpec {
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
            clean_path: MeanPath::default(),
            noise_x0_path: MeanPath::default(),
            coords_velocity: None,
        };
        let wrong = opposite(motion);
        for (c, chunk) in specs.chunks(chunk_len).enumerate() {
            let first = 29_000_003 + k * 1_000_003 + c * chunk_len;
            let prompts: Vec<String> = chunk.iter().map(world::prompt).collect();
            let cond = conditioning(model, &prompts, opts.sampler.guidance)?;
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
                let out_x = denoise_from(model, &x0, &noise, &cond, t0, opts)?;
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

            // The mean paths: of the clean renders, and of the x0 predicted from pure noise.
            hit.clean_path.accumulate(&x0, n)?;
            let t1 = vec![1.0; chunk.len()];
            let v = model.velocity(&noise, &t1, &texts[0])?;
            hit.noise_x0_path.accumulate(&(&noise - v)?, n)?;
            if let Some(vel) = model.net.clip_velocity(&texts[0], model.cfg.patch)? {
                let sum = vel.sum(0)?.to_vec1::<f32>()?;
                let acc = hit.coords_velocity.get_or_insert([0.0; 2]);
                acc[0] += sum[0] as f64 / n as f64;
                acc[1] += sum[1] as f64 / n as f64;
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

    /// The mean path of clean clips reads each word as the world draws it: a translation
    /// travels `TRAVEL` (12 px) in its direction, growing doubles the size (4x the mass: a log
    /// growth of ln 2), staying still goes nowhere; and a blur shifted frame by frame reads like
    /// the object it blurs.
    #[test]
    fn mean_path_reads_what_the_word_asks() -> Result<()> {
        let mut rng = WorldRng::seed_from_u64(9);
        let path_of = |spec: &SceneSpec, rng: &mut WorldRng| -> Result<MeanPath> {
            let frames = world::render(spec, rng);
            MeanPath::of_clip(&crate::pipeline::from_frames(
                &frames,
                &candle_core::Device::Cpu,
            )?)
        };
        for &m in Motion::all() {
            let p = path_of(&clip(m, 1), &mut rng)?;
            let along = p.along(m);
            match m {
                Motion::Still => assert!(along > -0.5, "{m:?}: {p:?}"),
                Motion::Growing | Motion::Shrinking => {
                    assert!((along - 2f64.ln()).abs() < 0.15, "{m:?}: {p:?}")
                }
                _ => assert!((along - 12.0).abs() < 1.0, "{m:?}: {p:?}"),
            }
            // Off its own axis a translation does not move.
            let (ux, uy) = m.direction();
            assert!(
                (p.dx * uy as f64 - p.dy * ux as f64).abs() < 0.5,
                "{m:?}: {p:?}"
            );
        }
        // A blurred object: the same path.
        let spec = clip(Motion::Right, 2);
        let sharp = crate::pipeline::from_frames(
            &world::render(&spec, &mut rng),
            &candle_core::Device::Cpu,
        )?;
        let blur = sharp
            .avg_pool2d_with_stride(3, 1)?
            .pad_with_same(2, 1, 1)?
            .pad_with_same(3, 1, 1)?;
        let along = MeanPath::of_clip(&blur)?.along(Motion::Right);
        assert!((along - 12.0).abs() < 1.0, "blurred: {along}");
        Ok(())
    }
}
