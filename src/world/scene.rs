//! Random scene specs, and layouts: the concrete sizes, paths and
//! background a spec is rendered with. Shared by the renderer and by
//! [`sample_spec`], which only returns specs that can be laid out cleanly.

use rand::Rng;

use super::{
    split_of, Background, Color, Motion, ObjectSpec, Position, SceneSpec, Shape, SizeClass, Split,
    IMAGE_SIZE, MAX_FRAMES, VIDEO_FRAMES,
};

/// Distance a translating object covers over a clip, in pixels.
pub(crate) const TRAVEL: f32 = 12.0;
/// Scale at the small end of growing/shrinking; the large end is twice it.
pub(crate) const GROW_MIN: f32 = 0.7;
/// Smallest gap between the boxes of two objects, so their colour blobs
/// never touch (two same-coloured objects must stay two components).
pub(crate) const GAP: f32 = 2.0;
/// Relative jitter of the half-extent.
const SIZE_JITTER: f32 = 0.05;
/// Jitter of a named position, in pixels per axis.
const POS_JITTER: f32 = 1.5;
/// Random layouts the renderer tries before keeping the least crowded one.
const LAYOUT_TRIES: usize = 400;
/// Layouts [`sample_spec`] tries; fewer than the renderer, so any spec it
/// returns is laid out cleanly by the renderer with very high probability.
const FEASIBILITY_TRIES: usize = 40;

/// One object with every attribute decided.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Placed {
    pub shape: Shape,
    pub color: Color,
    /// Nominal half-extent before motion scaling.
    pub radius: f32,
    pub motion: Motion,
    /// Centre of the path (the only centre for non-translating objects).
    pub mean: (f32, f32),
}

impl Placed {
    /// Centre and half-extent at clip time `t` in [0, 1].
    pub fn at(&self, t: f32) -> (f32, f32, f32) {
        let scale = match self.motion {
            Motion::Growing => GROW_MIN * 2f32.powf(t),
            Motion::Shrinking => GROW_MIN * 2f32.powf(1.0 - t),
            _ => 1.0,
        };
        let (dx, dy) = self.motion.direction();
        let s = TRAVEL * (t - 0.5);
        (
            self.mean.0 + dx * s,
            self.mean.1 + dy * s,
            self.radius * scale,
        )
    }
}

/// Clip time of frame `i` of `frames`; a single frame shows mid-clip.
pub(crate) fn frame_time(i: usize, frames: usize) -> f32 {
    if frames <= 1 {
        0.5
    } else {
        i as f32 / (frames - 1) as f32
    }
}

/// A fully decided scene.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub background: Background,
    pub objects: Vec<Placed>,
    /// Smallest box gap between two objects over all frames (infinite for
    /// one object); below [`GAP`] the objects crowd or overlap.
    pub min_gap: f32,
}

fn pick<T: Copy>(rng: &mut impl Rng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// `items[i]` with probability `weights[i] / sum(weights)`.
fn pick_weighted<T: Copy>(rng: &mut impl Rng, items: &[T], weights: &[f64]) -> T {
    let total: f64 = weights.iter().sum();
    let mut x = rng.random::<f64>() * total;
    for (item, w) in items.iter().zip(weights) {
        if x < *w {
            return *item;
        }
        x -= w;
    }
    items[items.len() - 1]
}

/// Decides every unspecified attribute at random; with two objects it
/// retries up to `tries` times to keep a [`GAP`] between them in all frames.
pub(crate) fn layout(spec: &SceneSpec, rng: &mut impl Rng, tries: usize) -> Layout {
    let background = match spec.background {
        Some(bg) => bg,
        None => pick(rng, Background::all()),
    };
    let frames = spec.frames.clamp(1, MAX_FRAMES);
    // Retrying only pays for the two-object scenes of the grammar.
    let tries = if spec.objects.len() == 2 { tries } else { 1 };
    let mut best: Option<Layout> = None;
    for _ in 0..tries.max(1) {
        let objects: Vec<Placed> = spec.objects.iter().map(|o| place(o, frames, rng)).collect();
        let min_gap = min_gap(&objects, frames);
        if best.as_ref().is_none_or(|b| min_gap > b.min_gap) {
            best = Some(Layout {
                background,
                objects,
                min_gap,
            });
        }
        if min_gap >= GAP {
            break;
        }
    }
    best.unwrap_or(Layout {
        background,
        objects: Vec::new(),
        min_gap: f32::INFINITY,
    })
}

/// The layout the renderer uses.
pub(crate) fn render_layout(spec: &SceneSpec, rng: &mut impl Rng) -> Layout {
    layout(spec, rng, LAYOUT_TRIES)
}

fn place(o: &ObjectSpec, frames: usize, rng: &mut impl Rng) -> Placed {
    let size = match o.size {
        Some(s) => s,
        None => pick(rng, SizeClass::all()),
    };
    let radius = size.radius() * (1.0 + rng.random_range(-SIZE_JITTER..=SIZE_JITTER));
    let motion = match o.motion {
        Some(m) => m,
        None if frames > 1 => {
            let allowed: Vec<Motion> = Motion::all()
                .iter()
                .copied()
                .filter(|m| o.position.is_none_or(|p| !m.conflicts_with(p)))
                .collect();
            pick(rng, &allowed)
        }
        None => Motion::Still,
    };
    let extent = match motion {
        Motion::Growing | Motion::Shrinking => radius * 2.0 * GROW_MIN,
        _ => radius,
    };
    let (dx, dy) = motion.direction();
    let size = IMAGE_SIZE as f32;
    let lo_x = extent + 0.5 + dx.abs() * TRAVEL / 2.0;
    let lo_y = extent + 0.5 + dy.abs() * TRAVEL / 2.0;
    let mean = match o.position {
        Some(p) => {
            let (ax, ay) = p.anchor();
            let jx = rng.random_range(-POS_JITTER..=POS_JITTER);
            let jy = rng.random_range(-POS_JITTER..=POS_JITTER);
            (
                clamp_or_mid(ax + jx, lo_x, size - lo_x),
                clamp_or_mid(ay + jy, lo_y, size - lo_y),
            )
        }
        None => (
            uniform_or_mid(rng, lo_x, size - lo_x),
            uniform_or_mid(rng, lo_y, size - lo_y),
        ),
    };
    Placed {
        shape: o.shape,
        color: o.color,
        radius,
        motion,
        mean,
    }
}

fn clamp_or_mid(v: f32, lo: f32, hi: f32) -> f32 {
    if lo > hi {
        IMAGE_SIZE as f32 / 2.0
    } else {
        v.clamp(lo, hi)
    }
}

fn uniform_or_mid(rng: &mut impl Rng, lo: f32, hi: f32) -> f32 {
    if lo >= hi {
        IMAGE_SIZE as f32 / 2.0
    } else {
        rng.random_range(lo..hi)
    }
}

/// Smallest Chebyshev gap between object boxes over all frames.
fn min_gap(objects: &[Placed], frames: usize) -> f32 {
    let mut gap = f32::INFINITY;
    for i in 0..frames {
        let t = frame_time(i, frames);
        let boxes: Vec<(f32, f32, f32)> = objects.iter().map(|o| o.at(t)).collect();
        for (k, a) in boxes.iter().enumerate() {
            for b in &boxes[k + 1..] {
                let g = (a.0 - b.0).abs().max((a.1 - b.1).abs()) - (a.2 + b.2);
                gap = gap.min(g);
            }
        }
    }
    gap
}

/// A random spec of `split`: single objects (45%, each of size, position
/// and background stated half the time), two distinct objects (35%,
/// sometimes at opposite positions), or "two X" counts (20%). Video specs
/// give every single/count object a motion and each of two distinct objects
/// one with probability 0.85 (at least one). Only specs that can be laid
/// out without crowding are returned.
pub fn sample_spec(rng: &mut impl Rng, split: Split, video: bool) -> SceneSpec {
    sample_spec_weighted(rng, split, video, Tilt::default())
}

/// How a training mix tilts the world's draws. The default is the world's own mix, and gives
/// exactly [`sample_spec`]'s draws.
///
/// Why: a teacher sees each prompt's own scenes either way, so a tilt only moves training
/// effort towards what it draws worst; the eval keeps the world's mix.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tilt {
    /// Relative weights of circle, square, triangle and cross for every object.
    pub shapes: Option<[f64; 4]>,
    /// Relative weights of the scene kinds: one object, two distinct objects, "two X"
    /// (the world's own mix is 0.45 / 0.35 / 0.2).
    pub kinds: Option<[f64; 3]>,
    /// Relative weights of black, gray and white for every scene's background, stated in
    /// the prompt or not (uniform when absent).
    pub backgrounds: Option<[f64; 3]>,
}

impl Tilt {
    /// `spec` as a training scene of this tilt: what to render (its background drawn by
    /// the weights) and what to caption (that background named only where `spec` named
    /// one). Without background weights both are `spec`.
    pub fn backdrop(&self, spec: SceneSpec, rng: &mut impl Rng) -> (SceneSpec, SceneSpec) {
        let Some(weights) = self.backgrounds else {
            return (spec.clone(), spec);
        };
        let stated = spec.background.is_some();
        let drawn = SceneSpec {
            background: Some(pick_weighted(rng, Background::all(), &weights)),
            ..spec
        };
        let caption = if stated {
            drawn.clone()
        } else {
            SceneSpec {
                background: None,
                ..drawn.clone()
            }
        };
        (drawn, caption)
    }

    /// Upper bounds of a uniform draw for "one object" and "two distinct objects".
    fn kind_thresholds(&self) -> (f32, f32) {
        match self.kinds {
            Some([a, b, c]) => {
                let total = a + b + c;
                ((a / total) as f32, ((a + b) / total) as f32)
            }
            None => (0.45, 0.8),
        }
    }
}

/// [`sample_spec`] with the shapes and scene kinds drawn as `tilt` says.
pub fn sample_spec_weighted(
    rng: &mut impl Rng,
    split: Split,
    video: bool,
    tilt: Tilt,
) -> SceneSpec {
    for _ in 0..10_000 {
        let spec = sample_any(rng, video, tilt);
        if split_of(&spec) == split && layout(&spec, rng, FEASIBILITY_TRIES).min_gap >= GAP {
            return spec;
        }
    }
    // Unreachable in practice: both splits are accepted often. Still return
    // a valid spec of the right split rather than loop forever.
    let shape = match split {
        Split::Train => Shape::Circle,
        Split::HeldOut => Shape::Square,
    };
    let mut o = ObjectSpec::new(shape, Color::Red);
    o.motion = video.then_some(Motion::Still);
    SceneSpec {
        objects: vec![o],
        background: None,
        frames: if video { VIDEO_FRAMES } else { 1 },
    }
}

/// A random *simple* spec of `split`: one large object on a black background, its position
/// stated half the time (the scenes `eval --probe` draws). Shape is the hardest thing in the
/// world to learn, and here nothing else competes for it: a teacher's curriculum mixes these
/// into its early image batches.
///
/// `shape_weights` (circle, square, triangle, cross; need not sum to 1) tilts the shape mix
/// towards the shapes a model draws worst; `None` keeps it uniform.
pub fn sample_simple_spec(
    rng: &mut impl Rng,
    split: Split,
    shape_weights: Option<&[f64; 4]>,
) -> SceneSpec {
    loop {
        let mut o = random_object(rng, 0.0, 0.5, None);
        o.size = Some(SizeClass::Large);
        if let Some(w) = shape_weights {
            o.shape = pick_weighted(rng, Shape::all(), w);
        }
        let spec = SceneSpec {
            objects: vec![o],
            background: Some(Background::Black),
            frames: 1,
        };
        if split_of(&spec) == split {
            return spec;
        }
    }
}

fn random_object(
    rng: &mut impl Rng,
    p_size: f64,
    p_position: f64,
    shape_weights: Option<&[f64; 4]>,
) -> ObjectSpec {
    ObjectSpec {
        shape: match shape_weights {
            Some(w) => pick_weighted(rng, Shape::all(), w),
            None => pick(rng, Shape::all()),
        },
        color: pick(rng, Color::all()),
        size: rng.random_bool(p_size).then(|| pick(rng, SizeClass::all())),
        position: rng
            .random_bool(p_position)
            .then(|| pick(rng, Position::all())),
        motion: None,
    }
}

fn sample_any(rng: &mut impl Rng, video: bool, tilt: Tilt) -> SceneSpec {
    let shape_weights = tilt.shapes.as_ref();
    let (single, distinct) = tilt.kind_thresholds();
    let background = rng.random_bool(0.5).then(|| pick(rng, Background::all()));
    let kind: f32 = rng.random();
    let mut objects = if kind < single {
        let mut o = random_object(rng, 0.5, 0.5, shape_weights);
        if video {
            o.motion = Some(pick(rng, Motion::all()));
        }
        vec![o]
    } else if kind < distinct {
        let mut a = random_object(rng, 0.35, 0.0, shape_weights);
        let mut b = random_object(rng, 0.35, 0.0, shape_weights);
        while (a.shape, a.color) == (b.shape, b.color) {
            b = random_object(rng, 0.35, 0.0, shape_weights);
        }
        let layout: f32 = rng.random();
        if layout < 0.3 {
            let (p, q) = if rng.random_bool(0.5) {
                (Position::Left, Position::Right)
            } else {
                (Position::Top, Position::Bottom)
            };
            let swap = rng.random_bool(0.5);
            a.position = Some(if swap { q } else { p });
            b.position = Some(if swap { p } else { q });
        } else if layout < 0.45 {
            a.position = Some(pick(rng, Position::all()));
        }
        if video {
            for o in [&mut a, &mut b] {
                if rng.random_bool(0.85) {
                    o.motion = Some(pick(rng, Motion::all()));
                }
            }
            if a.motion.is_none() && b.motion.is_none() {
                a.motion = Some(pick(rng, Motion::all()));
            }
        }
        if rng.random_bool(0.5) {
            std::mem::swap(&mut a, &mut b);
        }
        vec![a, b]
    } else {
        let mut o = random_object(rng, 0.4, 0.0, shape_weights);
        if video {
            o.motion = Some(pick(rng, Motion::all()));
        }
        vec![o, o]
    };
    for o in &mut objects {
        if let (Some(p), Some(m)) = (o.position, o.motion) {
            if m.conflicts_with(p) {
                o.position = None;
            }
        }
    }
    SceneSpec {
        objects,
        background,
        frames: if video { VIDEO_FRAMES } else { 1 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{categories, Category, WorldRng};
    use rand::SeedableRng;
    use std::collections::HashSet;

    #[test]
    fn samples_cover_every_category_and_attribute() {
        let mut rng = WorldRng::seed_from_u64(3);
        let mut cats = HashSet::new();
        let (mut none_size, mut some_size, mut bg_none) = (0, 0, 0);
        for i in 0..600 {
            let spec = sample_spec(&mut rng, Split::Train, i % 2 == 0);
            cats.extend(categories(&spec));
            for o in &spec.objects {
                if o.size.is_some() {
                    some_size += 1
                } else {
                    none_size += 1
                }
            }
            bg_none += spec.background.is_none() as usize;
            if spec.frames > 1 {
                assert!(spec.objects.iter().any(|o| o.motion.is_some()));
            } else {
                assert!(spec.objects.iter().all(|o| o.motion.is_none()));
            }
        }
        assert_eq!(cats.len(), 6, "{cats:?}");
        assert!(cats.contains(&Category::Count));
        assert!(none_size > 100 && some_size > 100 && bg_none > 100);
    }

    #[test]
    fn layouts_stay_in_frame_and_apart() {
        let mut rng = WorldRng::seed_from_u64(4);
        for i in 0..300 {
            let spec = sample_spec(&mut rng, Split::Train, i % 2 == 1);
            let l = render_layout(&spec, &mut rng);
            assert!(l.min_gap >= GAP, "{spec:?}");
            for k in 0..spec.frames {
                for o in &l.objects {
                    let (x, y, r) = o.at(frame_time(k, spec.frames));
                    assert!(x - r >= 0.0 && x + r <= 32.0 && y - r >= 0.0 && y + r <= 32.0);
                }
            }
        }
    }
}
