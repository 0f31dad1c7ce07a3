//! 5. **Beside another object**: each shape in a two-object image scene (the scenes that fail
//!    most in the eval), at each size. Is it recognised in the clean render, after denoising
//!    that render from a low and a middle noise level under its own prompt, and when sampled
//!    from pure noise?
//!
//! Why: a shape lost from the low level is a rendering problem (too few pixels or too little
//! resolution in the denoiser); one kept from the low level but lost from noise is a decision
//! made wrong at high noise. The two call for different levers.
//!
//! It also reads the binding in the cross-attention: of the attention that each object's
//! tokens pay to the two shape words, the share on their own (1: bound, 1/2: blind).

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    chunk_seeds, conditioning, denoise_from, noise_for, recognised, sample_from_noise,
    stack_renders, train_color, CHUNK,
};
use crate::families::tiny::TinyModel;
use crate::nn::attention::capture_cross_attention;
use crate::pipeline::{to_frames, NoiseSchedule};
use crate::train::binding;
use crate::world::{self, Color, ObjectSpec, SceneSpec, Shape, SizeClass, Split, WorldRng};

/// Noise levels the clean render is denoised from.
pub const BESIDE_T0: [f32; 2] = [0.3, 0.6];

/// Noise levels at which the binding is read from the clean render's noised copy.
pub const BINDING_T: [f32; 2] = [0.6, 0.9];

/// How often one shape is recognised beside a second object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BesideHit {
    pub shape: Shape,
    pub n: usize,
    /// Recognised in the clean render: the verifier's own ceiling.
    pub clean: usize,
    /// Recognised after denoising the render from each level of [`BESIDE_T0`].
    pub from_render: Vec<usize>,
    /// Recognised when the scene is sampled from pure noise.
    pub from_noise: usize,
    /// `from_noise` split by the object's stated size: small, large, unstated (the scenes
    /// cycle through them, so each holds a third of `n`).
    #[serde(default)]
    pub from_noise_by_size: [usize; 3],
    /// At each level of [`BINDING_T`], the share of the shape words' attention that goes to
    /// the object's own shape word, over the probed object's tokens and over its neighbour's
    /// (averaged over heads, layers and tokens, weighted by coverage).
    #[serde(default)]
    pub own_word_share: Vec<[f64; 2]>,
}

/// The sizes the scenes cycle through, in [`BesideHit::from_noise_by_size`]'s order.
const SIZES: [Option<SizeClass>; 3] = [Some(SizeClass::Small), Some(SizeClass::Large), None];

/// Two-object scenes of the train split with `shape` as the first object: sizes cycle through
/// small, large and unstated, the second object's shape through the others that may appear
/// beside it in training, and the colours differ so that each blob is attributed to its object.
fn scenes(shape: Shape, n: usize) -> Vec<SceneSpec> {
    let (shapes, colors) = (Shape::all(), Color::all());
    let k = shapes.iter().position(|&s| s == shape).unwrap_or(0);
    let single = |a: ObjectSpec| SceneSpec {
        objects: vec![a],
        background: None,
        frames: 1,
    };
    (0..n)
        .map(|i| {
            let a = ObjectSpec {
                size: SIZES[i % SIZES.len()],
                ..ObjectSpec::new(shape, train_color(shape, i))
            };
            // The first second object, cycling from the i-th, that keeps the scene in the
            // train split.
            (0..(shapes.len() - 1) * colors.len())
                .map(|j| {
                    let other = shapes[(k + 1 + (i + j) % (shapes.len() - 1)) % shapes.len()];
                    let color = colors[(i + j / (shapes.len() - 1)) % colors.len()];
                    SceneSpec {
                        objects: vec![a, ObjectSpec::new(other, color)],
                        ..single(a)
                    }
                })
                .find(|s| s.objects[1].color != a.color && world::split_of(s) == Split::Train)
                .unwrap_or_else(|| single(a))
        })
        .collect()
}

/// Runs probe 5 for every shape.
pub(super) fn beside_hits(
    model: &TinyModel,
    opts: &super::ProbeOptions,
    rng: &mut WorldRng,
) -> Result<Vec<BesideHit>> {
    let mut out = Vec::new();
    for (k, &shape) in Shape::all().iter().enumerate() {
        let specs = scenes(shape, opts.samples_per_shape);
        let mut hit = BesideHit {
            shape,
            n: specs.len(),
            clean: 0,
            from_render: vec![0; BESIDE_T0.len()],
            from_noise: 0,
            from_noise_by_size: [0; 3],
            own_word_share: Vec::new(),
        };
        let mut shares = [[(0f64, 0f64); 2]; BINDING_T.len()];
        for (c, chunk) in specs.chunks(CHUNK).enumerate() {
            let first = 13_000_003 + k * 1_000_003 + c * CHUNK;
            let prompts: Vec<String> = chunk.iter().map(world::prompt).collect();
            let cond = conditioning(model, &prompts, opts.sampler.guidance)?;
            let (renders, labels): (Vec<_>, Vec<_>) =
                chunk.iter().map(|s| world::render_labelled(s, rng)).unzip();
            for (spec, frames) in chunk.iter().zip(&renders) {
                hit.clean += recognised(spec, frames);
            }
            let x0 = stack_renders(&renders, model)?;
            let noise = noise_for(&chunk_seeds(opts.seed, first, chunk.len()), model, 1)?;
            let pixel_shapes: Vec<u8> = labels
                .iter()
                .flatten()
                .flat_map(|l| l.shape.iter().copied())
                .collect();
            let targets = binding::targets(
                &prompts,
                &pixel_shapes,
                1,
                world::IMAGE_SIZE as usize,
                model.cfg.patch,
                model.cfg.text_max_len,
                &candle_core::Device::Cpu,
            )?;
            if let Some(targets) = targets {
                let text = model.encode(&prompts.iter().map(String::as_str).collect::<Vec<_>>())?;
                let probed: Vec<usize> = chunk
                    .iter()
                    .zip(&prompts)
                    .map(|(s, p)| word_token(p, s.objects[0].shape))
                    .collect();
                for (level, &t) in BINDING_T.iter().enumerate() {
                    let tt = vec![t; chunk.len()];
                    let xt = model.schedule.add_noise(&x0, &noise, &tt)?;
                    let (v, maps) = capture_cross_attention(|| model.velocity(&xt, &tt, &text));
                    v?;
                    let sums = own_shares(&maps, &targets, &probed)?;
                    for (acc, (num, den)) in shares[level].iter_mut().zip(sums) {
                        acc.0 += num;
                        acc.1 += den;
                    }
                }
            }
            for (level, &t0) in BESIDE_T0.iter().enumerate() {
                let out_x = denoise_from(model, &x0, &noise, &cond, t0, opts)?;
                for (spec, frames) in chunk.iter().zip(to_frames(&out_x)?) {
                    hit.from_render[level] += recognised(spec, &frames);
                }
            }
            let seeds = chunk_seeds(opts.seed, first + 500_000, chunk.len());
            let sampled = sample_from_noise(model, opts, &cond, &seeds, 1)?;
            for (spec, frames) in chunk.iter().zip(to_frames(&sampled)?) {
                let r = recognised(spec, &frames);
                hit.from_noise += r;
                let size = SIZES.iter().position(|&z| z == spec.objects[0].size);
                hit.from_noise_by_size[size.unwrap_or(2)] += r;
            }
        }
        hit.own_word_share = shares
            .iter()
            .map(|s| s.map(|(num, den)| if den > 0.0 { num / den } else { 0.0 }))
            .collect();
        out.push(hit);
    }
    Ok(out)
}

/// The token of the first word naming `shape` (`[BOS]` is token 0).
fn word_token(prompt: &str, shape: Shape) -> usize {
    prompt
        .split_whitespace()
        .position(|w| w == shape.name())
        .map_or(0, |i| i + 1)
}

/// Over every captured map, the coverage-weighted sums of `own / named` and of the coverage,
/// for the tokens of the object whose shape word is at `probed[b]` and for the others.
fn own_shares(
    maps: &[Tensor],
    targets: &binding::BindingTargets,
    probed: &[usize],
) -> Result<[(f64, f64); 2]> {
    let weight = targets.weight.to_vec2::<f32>()?;
    let own_v = targets.own.to_vec3::<f32>()?;
    let mut out = [(0f64, 0f64); 2];
    for a in maps {
        if a.dims() != targets.own.dims() {
            continue; // not this scene's token grid
        }
        let (own, named) = binding::masses(a, targets)?;
        let share = ((own + 1e-30)? / (named + 1e-30)?)?.to_vec2::<f32>()?;
        for (b, row) in share.iter().enumerate() {
            for (q, &s) in row.iter().enumerate() {
                let w = weight[b][q] as f64;
                let k = if own_v[b][q][probed[b]] > 0.0 { 0 } else { 1 };
                out[k].0 += w * s as f64;
                out[k].1 += w;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every scene is a two-object train-split scene whose first object is the probed shape,
    /// with distinct colours, and the verifier recognises nearly all of them in clean renders:
    /// the probe's ceiling is the model's, not the scorer's.
    #[test]
    fn beside_scenes_are_two_distinct_objects_the_verifier_reads() {
        let mut rng = <WorldRng as rand::SeedableRng>::seed_from_u64(2);
        for &shape in Shape::all() {
            let specs = scenes(shape, 24);
            let mut clean = 0;
            for s in &specs {
                assert_eq!(s.objects.len(), 2, "{}", world::prompt(s));
                assert_eq!(s.objects[0].shape, shape);
                assert_ne!(s.objects[0].color, s.objects[1].color);
                assert_ne!(s.objects[0].shape, s.objects[1].shape);
                assert_eq!(world::split_of(s), Split::Train);
                clean += recognised(s, &world::render(s, &mut rng));
            }
            assert!(clean >= 22, "{shape}: {clean}/24 clean renders recognised");
        }
    }
}
