//! ShapesWorld: a tiny procedural world of coloured shapes on 32x32 RGB
//! frames (images are 1 frame, videos are [`VIDEO_FRAMES`] frames).
//!
//! It makes the training data of the built-in text-to-image/video model,
//! verifies generated samples analytically against their prompt (a
//! GenEval-style pass/fail plus a soft reward score), and supplies
//! hand-made features for distribution metrics. Nothing here is learned.
//!
//! # Prompt grammar
//!
//! ```text
//! prompt     := objects [background]
//! objects    := object ["and" object]                   two distinct objects
//!             | "two" [size] colour shape-plural [motion]   a count of two
//! object     := article [size] colour shape [position] [motion]
//! article    := "a" | "an"                  ("one" or nothing is also accepted)
//! size       := "small" | "large"
//! colour     := "red" | "green" | "blue" | "yellow" | "purple" | "orange"
//! shape      := "circle" | "square" | "triangle" | "cross"   (plural: +s, crosses)
//! position   := "on the left" | "on the right" | "at the top" | "at the bottom"
//!             | "in the center"
//! motion     := "moving left" | "moving right" | "moving up" | "moving down"
//!             | "growing" | "shrinking" | "staying still"     (video only)
//! background := "on a" ("black" | "gray" | "white") "background"
//! ```
//!
//! Examples: "a small red circle on the left", "a blue square and a yellow
//! triangle", "two green squares", "a green cross moving right on a white
//! background", "a large purple triangle at the top growing". Parsing is
//! case- and whitespace-insensitive, ignores `,.;:!?`, and accepts "grey",
//! "centre"/"middle", "going left" etc., "still"/"standing still" as synonyms.
//! A prompt is a video prompt exactly when it contains a motion.
//!
//! Anything the prompt leaves out is random in [`render`] and unchecked in
//! [`verify`]. A position of a moving object names the middle of its path,
//! so a position along the axis of a translation ("on the left moving right")
//! is rejected as contradictory; so are two objects at the same position.
//!
//! # Held-out split
//!
//! [`Split::HeldOut`] specs contain at least one composition never produced
//! for [`Split::Train`] (see [`split`]): the colour-shape pairs red square,
//! green circle, blue triangle, yellow cross and orange triangle (every
//! colour and shape is still seen in training with other partners), and the
//! two-object combinations "a red and a blue object" and "a circle and a
//! cross" (in either order, any other attributes).
//!
//! # Geometry
//!
//! Every shape is axis-aligned and fills a box of half-extent R (small R=4,
//! large R=7 px, ±5% jitter); positions are anchors (8,16) left, (24,16)
//! right, (16,8) top, (16,24) bottom, (16,16) center, ±1.5 px jitter.
//! An unstated position is anywhere in the frame. Translations travel
//! 12 px over the clip; growing/shrinking scales R by 2x (0.7R to 1.4R,
//! geometric). The renderer keeps 2 px between two objects whenever the
//! stated attributes allow, and [`sample_spec`] only returns specs where they do.
//!
//! # Verifier
//!
//! [`verify`] labels pixels by palette colour over the estimated background,
//! takes connected blobs, classifies shape by template IoU, size by area,
//! position by centre (nearest anchor, within 6 px) and motion by the trend
//! of centre and size over the frames. `pass` requires every stated
//! attribute and exactly the stated number of objects (in 3/4 of video
//! frames); `score` in [0, 1] is a smooth agreement usable as a reward.

mod geometry;
mod grammar;
pub mod metrics;
mod render;
mod scene;
pub mod split;
mod verify;

use serde::{Deserialize, Serialize};

pub use grammar::{parse, prompt, vocabulary, ParseError, MAX_PROMPT_WORDS};
pub use metrics::{diversity, features, frechet_by_block, frechet_distance, FEATURE_BLOCKS};
pub use render::{render, render_labelled, PixelLabels, BACKGROUND_CLASS, BACKGROUND_COLOR_CLASS};
pub(crate) use scene::frame_time;
pub use scene::{sample_simple_spec, sample_spec, sample_spec_weighted, Tilt};
pub use split::split_of;
pub use verify::{categories, observed_motions, verify, DetectedObject, Verdict};

/// Side of every square frame, in pixels.
pub const IMAGE_SIZE: u32 = 32;
/// Number of frames of a video scene.
pub const VIDEO_FRAMES: usize = 8;
/// Upper bound on frames that [`render`] will allocate for one spec, so a
/// deserialised spec with an absurd frame count cannot exhaust memory.
pub const MAX_FRAMES: usize = 64;

macro_rules! vocab_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// How many values there are.
            pub const COUNT: usize = [$($name::$variant),+].len();

            /// Every value, in a fixed order (used for sampling and indexing).
            pub fn all() -> &'static [$name] {
                &[$($name::$variant),+]
            }

            /// Short lowercase name; the prompt word itself except for
            /// positions and motions, whose prompt text is `phrase()`.
            pub fn name(&self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }

            /// Position of this value in [`Self::all`].
            pub fn index(&self) -> usize {
                *self as usize
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

vocab_enum!(
    /// Object shapes; all axis-aligned, the triangle points up. The fourth
    /// shape is a plus-sign cross rather than a diamond: its concave arms
    /// keep it far from the circle and square in template IoU even when
    /// blurred, whereas a small blurred diamond is nearly a circle.
    Shape { Circle => "circle", Square => "square", Triangle => "triangle", Cross => "cross" }
);
vocab_enum!(
    /// Object colours: saturated and far from each other and from every
    /// background, so the verifier can label pixels by colour alone.
    Color { Red => "red", Green => "green", Blue => "blue", Yellow => "yellow", Purple => "purple", Orange => "orange" }
);
vocab_enum!(
    /// Uniform background colours.
    Background { Black => "black", Gray => "gray", White => "white" }
);
vocab_enum!(
    /// Object size class (half-extent 4 px or 7 px).
    SizeClass { Small => "small", Large => "large" }
);
vocab_enum!(
    /// Named object positions (anchors on the 32x32 frame).
    Position { Left => "left", Right => "right", Top => "top", Bottom => "bottom", Center => "center" }
);
vocab_enum!(
    /// Object motion over a video clip.
    Motion { Still => "still", Left => "left", Right => "right", Up => "up", Down => "down", Growing => "growing", Shrinking => "shrinking" }
);

impl Shape {
    /// Plural noun used in count prompts ("two red crosses").
    pub fn plural(&self) -> &'static str {
        match self {
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Cross => "crosses",
        }
    }
}

impl Color {
    /// Palette value used by the renderer and as the verifier's reference.
    pub fn rgb(&self) -> [u8; 3] {
        match self {
            Color::Red => [215, 35, 35],
            Color::Green => [30, 180, 50],
            Color::Blue => [40, 80, 230],
            Color::Yellow => [240, 225, 40],
            Color::Purple => [160, 30, 220],
            Color::Orange => [245, 130, 20],
        }
    }
}

impl Background {
    /// Fill colour of the whole frame.
    pub fn rgb(&self) -> [u8; 3] {
        match self {
            Background::Black => [0, 0, 0],
            Background::Gray => [128, 128, 128],
            Background::White => [255, 255, 255],
        }
    }
}

impl SizeClass {
    /// Nominal half-extent in pixels on a 32x32 frame.
    pub fn radius(&self) -> f32 {
        match self {
            SizeClass::Small => 4.0,
            SizeClass::Large => 7.0,
        }
    }
}

impl Position {
    /// Nominal centre (x, y) in pixels, y pointing down.
    pub fn anchor(&self) -> (f32, f32) {
        match self {
            Position::Left => (8.0, 16.0),
            Position::Right => (24.0, 16.0),
            Position::Top => (16.0, 8.0),
            Position::Bottom => (16.0, 24.0),
            Position::Center => (16.0, 16.0),
        }
    }

    /// The phrase used in prompts ("on the left", "in the center").
    pub fn phrase(&self) -> &'static str {
        match self {
            Position::Left => "on the left",
            Position::Right => "on the right",
            Position::Top => "at the top",
            Position::Bottom => "at the bottom",
            Position::Center => "in the center",
        }
    }
}

impl Motion {
    /// The phrase used in prompts ("moving left", "growing").
    pub fn phrase(&self) -> &'static str {
        match self {
            Motion::Still => "staying still",
            Motion::Left => "moving left",
            Motion::Right => "moving right",
            Motion::Up => "moving up",
            Motion::Down => "moving down",
            Motion::Growing => "growing",
            Motion::Shrinking => "shrinking",
        }
    }

    /// Unit direction of a translation (y down), zero for other motions.
    pub fn direction(&self) -> (f32, f32) {
        match self {
            Motion::Left => (-1.0, 0.0),
            Motion::Right => (1.0, 0.0),
            Motion::Up => (0.0, -1.0),
            Motion::Down => (0.0, 1.0),
            _ => (0.0, 0.0),
        }
    }

    /// True when a position and this motion contradict each other: the
    /// position lies on the translation axis (e.g. "on the left moving
    /// right"), which would push the path out of the frame.
    pub fn conflicts_with(&self, position: Position) -> bool {
        let horizontal = matches!(position, Position::Left | Position::Right);
        let vertical = matches!(position, Position::Top | Position::Bottom);
        match self {
            Motion::Left | Motion::Right => horizontal,
            Motion::Up | Motion::Down => vertical,
            _ => false,
        }
    }
}

/// One object of a scene. `None` means "the prompt does not say": the
/// renderer picks a random value and the verifier does not check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectSpec {
    pub shape: Shape,
    pub color: Color,
    pub size: Option<SizeClass>,
    pub position: Option<Position>,
    pub motion: Option<Motion>,
}

impl ObjectSpec {
    /// An object with only shape and colour stated.
    pub fn new(shape: Shape, color: Color) -> Self {
        ObjectSpec {
            shape,
            color,
            size: None,
            position: None,
            motion: None,
        }
    }
}

/// A whole scene: one or two objects, an optional background, and the
/// number of frames (1 for images, [`VIDEO_FRAMES`] for videos).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SceneSpec {
    pub objects: Vec<ObjectSpec>,
    pub background: Option<Background>,
    pub frames: usize,
}

impl SceneSpec {
    /// True for "two X" scenes: two identical objects without positions.
    pub fn is_count(&self) -> bool {
        self.objects.len() == 2
            && self.objects[0] == self.objects[1]
            && self.objects[0].position.is_none()
    }

    /// True when the spec describes a video (more than one frame).
    pub fn is_video(&self) -> bool {
        self.frames > 1
    }
}

/// Which compositions a spec may contain (see [`split`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    HeldOut,
}

/// GenEval-style categories for the per-category breakdown; a spec belongs
/// to every category that applies (see [`categories`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Exactly one object.
    SingleObject,
    /// Two separately described objects ("a X and a Y").
    TwoObjects,
    /// Objects of two different colours: colour must be bound to the right shape.
    Color,
    /// At least one object has a stated position.
    Position,
    /// "two X": exactly two identical objects.
    Count,
    /// A video with at least one stated motion.
    Motion,
}

/// Small portable RNG (SplitMix64) so fixed evaluation sets do not depend
/// on the algorithm behind `rand::rngs::StdRng`, which may change between
/// `rand` releases.
#[derive(Clone, Debug)]
pub struct WorldRng(u64);

impl rand::RngCore for WorldRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        rand::rand_core::impls::fill_bytes_via_next(self, dst)
    }
}

impl rand::SeedableRng for WorldRng {
    type Seed = [u8; 8];

    fn from_seed(seed: Self::Seed) -> Self {
        WorldRng(u64::from_le_bytes(seed))
    }

    fn seed_from_u64(state: u64) -> Self {
        WorldRng(state)
    }
}

/// A fixed evaluation set: `n` specs of `split`, deterministic in `seed`.
pub fn prompt_set(split: Split, n: usize, seed: u64, video: bool) -> Vec<SceneSpec> {
    let mut rng = <WorldRng as rand::SeedableRng>::seed_from_u64(seed);
    (0..n)
        .map(|_| sample_spec(&mut rng, split, video))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_set_is_deterministic_and_split_correct() {
        let a = prompt_set(Split::Train, 40, 7, false);
        let b = prompt_set(Split::Train, 40, 7, false);
        assert_eq!(a, b);
        assert!(a.iter().all(|s| split_of(s) == Split::Train));
        let c = prompt_set(Split::HeldOut, 40, 7, true);
        assert!(c
            .iter()
            .all(|s| split_of(s) == Split::HeldOut && s.frames == VIDEO_FRAMES));
        assert_ne!(a, prompt_set(Split::Train, 40, 8, false));
    }

    #[test]
    fn palette_is_distinct() {
        let dist = |a: [u8; 3], b: [u8; 3]| {
            a.iter()
                .zip(b)
                .map(|(&x, y)| (x as f32 - y as f32).powi(2))
                .sum::<f32>()
                .sqrt()
        };
        for (i, a) in Color::all().iter().enumerate() {
            for b in &Color::all()[i + 1..] {
                assert!(dist(a.rgb(), b.rgb()) > 95.0, "{a} vs {b}");
            }
            for bg in Background::all() {
                assert!(dist(a.rgb(), bg.rgb()) > 120.0, "{a} vs {bg}");
            }
        }
    }
}
