//! The fixed train / held-out split of compositions.
//!
//! Held-out colour-shape pairs: red square, green circle, blue triangle,
//! yellow cross, orange triangle (5 of 24; every colour keeps at least 3
//! training shapes and every shape at least 4 training colours).
//! Held-out object-pair combinations, for scenes of two separately described
//! objects: a red object together with a blue one, and a circle together
//! with a cross (either order, any other attributes). A spec is
//! [`Split::HeldOut`] when it contains any of these.

use super::{Color, SceneSpec, Shape, Split};

/// Colour-shape pairs never shown in training.
pub const HELD_OUT_PAIRS: [(Color, Shape); 5] = [
    (Color::Red, Shape::Square),
    (Color::Green, Shape::Circle),
    (Color::Blue, Shape::Triangle),
    (Color::Yellow, Shape::Cross),
    (Color::Orange, Shape::Triangle),
];

/// Colours never shown together in one training scene.
pub const HELD_OUT_COLOR_COMBOS: [(Color, Color); 1] = [(Color::Red, Color::Blue)];

/// Shapes never shown together in one training scene.
pub const HELD_OUT_SHAPE_COMBOS: [(Shape, Shape); 1] = [(Shape::Circle, Shape::Cross)];

/// [`Split::HeldOut`] if the spec contains any held-out composition.
pub fn split_of(spec: &SceneSpec) -> Split {
    let pair = spec
        .objects
        .iter()
        .any(|o| HELD_OUT_PAIRS.contains(&(o.color, o.shape)));
    let mut combo = false;
    for (i, a) in spec.objects.iter().enumerate() {
        for b in &spec.objects[i + 1..] {
            combo |= HELD_OUT_COLOR_COMBOS
                .iter()
                .any(|&(x, y)| (a.color, b.color) == (x, y) || (a.color, b.color) == (y, x));
            combo |= HELD_OUT_SHAPE_COMBOS
                .iter()
                .any(|&(x, y)| (a.shape, b.shape) == (x, y) || (a.shape, b.shape) == (y, x));
        }
    }
    if pair || combo {
        Split::HeldOut
    } else {
        Split::Train
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{sample_spec, ObjectSpec, WorldRng};
    use rand::SeedableRng;
    use std::collections::HashSet;

    #[test]
    fn every_colour_and_shape_is_still_trained() {
        for c in Color::all() {
            let trained = Shape::all()
                .iter()
                .filter(|&&s| !HELD_OUT_PAIRS.contains(&(*c, s)))
                .count();
            assert!(trained >= 3, "{c}");
        }
        for s in Shape::all() {
            let trained = Color::all()
                .iter()
                .filter(|&&c| !HELD_OUT_PAIRS.contains(&(c, *s)))
                .count();
            assert!(trained >= 4, "{s}");
        }
    }

    #[test]
    fn sampling_respects_the_split() {
        let mut rng = WorldRng::seed_from_u64(11);
        let mut held_pairs = HashSet::new();
        let mut held_combos = 0;
        for i in 0..1000 {
            let video = i % 2 == 0;
            let train = sample_spec(&mut rng, Split::Train, video);
            assert_eq!(split_of(&train), Split::Train, "{train:?}");
            for o in &train.objects {
                assert!(!HELD_OUT_PAIRS.contains(&(o.color, o.shape)));
            }
            let held = sample_spec(&mut rng, Split::HeldOut, video);
            assert_eq!(split_of(&held), Split::HeldOut, "{held:?}");
            for o in &held.objects {
                if HELD_OUT_PAIRS.contains(&(o.color, o.shape)) {
                    held_pairs.insert((o.color, o.shape));
                }
            }
            let no_pair = held
                .objects
                .iter()
                .all(|o| !HELD_OUT_PAIRS.contains(&(o.color, o.shape)));
            held_combos += no_pair as usize;
        }
        assert_eq!(held_pairs.len(), HELD_OUT_PAIRS.len());
        assert!(held_combos > 50, "{held_combos}");
    }

    #[test]
    fn combos_are_order_free() {
        let a = ObjectSpec::new(Shape::Square, Color::Blue);
        let b = ObjectSpec::new(Shape::Triangle, Color::Red);
        let spec = |x, y| SceneSpec {
            objects: vec![x, y],
            background: None,
            frames: 1,
        };
        assert_eq!(split_of(&spec(a, b)), Split::HeldOut);
        assert_eq!(split_of(&spec(b, a)), Split::HeldOut);
        let c = ObjectSpec::new(Shape::Square, Color::Green);
        assert_eq!(split_of(&spec(b, c)), Split::Train);
    }
}
