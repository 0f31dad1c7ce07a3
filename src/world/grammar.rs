//! Prompt text <-> [`SceneSpec`]: a deterministic English realisation and
//! its inverse, a tolerant recursive-descent parser over lowercase words.

use super::{
    Background, Color, Motion, ObjectSpec, Position, SceneSpec, Shape, SizeClass, VIDEO_FRAMES,
};

/// Why a prompt could not be parsed. Prompts come from users, so every
/// problem is reported, never panicked on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty prompt")]
    Empty,
    #[error("unknown word '{0}'")]
    UnknownWord(String),
    #[error("unexpected word '{word}', expected {expected}")]
    Unexpected {
        word: String,
        expected: &'static str,
    },
    #[error("prompt ends too early, expected {0}")]
    UnexpectedEnd(&'static str),
    #[error("'{0}' is said twice for one object")]
    Repeated(&'static str),
    #[error("at most two objects are supported")]
    TooManyObjects,
    #[error("the {0} needs a colour")]
    MissingColor(&'static str),
    #[error("contradictory prompt: {0}")]
    Conflict(String),
}

/// Longest prompt accepted, in words; real prompts have at most [`MAX_PROMPT_WORDS`].
const MAX_WORDS: usize = 64;

/// Most words [`prompt`] can emit: two objects with size, position and motion, plus a
/// background ("a small red circle on the left moving left and ... on a white background").
/// Images (no motion) stop at 19. A text encoder needs this many tokens after `[BOS]` to see
/// every prompt whole.
pub const MAX_PROMPT_WORDS: usize = 23;

/// The English prompt for a spec; [`parse`] inverts it.
pub fn prompt(spec: &SceneSpec) -> String {
    let mut out = String::new();
    if spec.is_count() {
        let o = &spec.objects[0];
        out.push_str("two");
        if let Some(size) = o.size {
            out.push(' ');
            out.push_str(size.name());
        }
        out.push(' ');
        out.push_str(o.color.name());
        out.push(' ');
        out.push_str(o.shape.plural());
        if let Some(m) = o.motion {
            out.push(' ');
            out.push_str(m.phrase());
        }
    } else {
        for (i, o) in spec.objects.iter().enumerate() {
            if i > 0 {
                out.push_str(" and ");
            }
            out.push_str(&object_phrase(o));
        }
    }
    if let Some(bg) = spec.background {
        out.push_str(" on a ");
        out.push_str(bg.name());
        out.push_str(" background");
    }
    out
}

fn object_phrase(o: &ObjectSpec) -> String {
    let mut words: Vec<&str> = Vec::with_capacity(8);
    if let Some(size) = o.size {
        words.push(size.name());
    }
    words.push(o.color.name());
    words.push(o.shape.name());
    let article = if starts_with_vowel(words[0]) {
        "an"
    } else {
        "a"
    };
    words.insert(0, article);
    if let Some(p) = o.position {
        words.push(p.phrase());
    }
    if let Some(m) = o.motion {
        words.push(m.phrase());
    }
    words.join(" ")
}

fn starts_with_vowel(word: &str) -> bool {
    matches!(word.chars().next(), Some('a' | 'e' | 'i' | 'o' | 'u'))
}

/// Every word [`prompt`] can emit, sorted (for a word-level tokenizer).
pub fn vocabulary() -> Vec<&'static str> {
    let mut words: Vec<&'static str> = vec!["a", "an", "two", "and", "on", "background"];
    words.extend(SizeClass::all().iter().map(|s| s.name()));
    words.extend(Color::all().iter().map(|c| c.name()));
    for s in Shape::all() {
        words.push(s.name());
        words.push(s.plural());
    }
    words.extend(Background::all().iter().map(|b| b.name()));
    for p in Position::all() {
        words.extend(p.phrase().split(' '));
    }
    for m in Motion::all() {
        words.extend(m.phrase().split(' '));
    }
    words.sort_unstable();
    words.dedup();
    words
}

/// Words accepted on input beyond [`vocabulary`].
const SYNONYMS: &[&str] = &[
    "one", "grey", "centre", "middle", "going", "standing", "with", "at", "in", "the",
];

fn known(word: &str) -> bool {
    SYNONYMS.contains(&word) || vocabulary().contains(&word)
}

/// Parses a prompt produced by [`prompt`] (or a close paraphrase of one).
/// `frames` is [`VIDEO_FRAMES`] when any motion is named, else 1.
pub fn parse(prompt: &str) -> Result<SceneSpec, ParseError> {
    let lowered = prompt.to_lowercase();
    let words: Vec<&str> = lowered
        .split(|c: char| c.is_whitespace() || ",.;:!?".contains(c))
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        return Err(ParseError::Empty);
    }
    if let Some(w) = words.iter().find(|w| !known(w)) {
        return Err(ParseError::UnknownWord((*w).to_string()));
    }
    if words.len() > MAX_WORDS {
        return Err(ParseError::Conflict(format!(
            "prompt has {} words, at most {MAX_WORDS} are accepted",
            words.len()
        )));
    }
    let mut p = Parser { words, at: 0 };
    let objects = p.objects()?;
    let background = p.background()?;
    if let Some(w) = p.peek() {
        return Err(if w == "and" {
            ParseError::TooManyObjects
        } else {
            p.unexpected("the end of the prompt")
        });
    }
    check_conflicts(&objects)?;
    let video = objects.iter().any(|o| o.motion.is_some());
    Ok(SceneSpec {
        objects,
        background,
        frames: if video { VIDEO_FRAMES } else { 1 },
    })
}

fn check_conflicts(objects: &[ObjectSpec]) -> Result<(), ParseError> {
    for o in objects {
        if let (Some(p), Some(m)) = (o.position, o.motion) {
            if m.conflicts_with(p) {
                return Err(ParseError::Conflict(format!(
                    "an object {} cannot be {} (a moving object's position is the middle of its path)",
                    p.phrase(),
                    m.phrase()
                )));
            }
        }
    }
    if let [a, b] = objects {
        if let (Some(pa), Some(pb)) = (a.position, b.position) {
            if pa == pb {
                return Err(ParseError::Conflict(format!(
                    "both objects are {}",
                    pa.phrase()
                )));
            }
        }
    }
    Ok(())
}

struct Parser<'a> {
    words: Vec<&'a str>,
    at: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&'a str> {
        self.words.get(self.at).copied()
    }

    fn peek_at(&self, offset: usize) -> Option<&'a str> {
        self.words.get(self.at + offset).copied()
    }

    fn bump(&mut self) -> Option<&'a str> {
        let w = self.peek();
        if w.is_some() {
            self.at += 1;
        }
        w
    }

    fn unexpected(&self, expected: &'static str) -> ParseError {
        match self.peek() {
            Some(w) => ParseError::Unexpected {
                word: w.to_string(),
                expected,
            },
            None => ParseError::UnexpectedEnd(expected),
        }
    }

    fn objects(&mut self) -> Result<Vec<ObjectSpec>, ParseError> {
        if self.peek() == Some("two") {
            self.bump();
            let o = self.object(true)?;
            if let Some(p) = o.position {
                return Err(ParseError::Conflict(format!(
                    "two objects cannot both be {}",
                    p.phrase()
                )));
            }
            return Ok(vec![o, o]);
        }
        let first = self.object(false)?;
        let mut objects = vec![first];
        if self.peek() == Some("and") {
            self.bump();
            if self.peek() == Some("two") {
                return Err(ParseError::TooManyObjects);
            }
            objects.push(self.object(false)?);
        }
        Ok(objects)
    }

    /// `[article] {size|colour} shape {position|motion}`; plural after "two".
    fn object(&mut self, plural: bool) -> Result<ObjectSpec, ParseError> {
        if !plural && matches!(self.peek(), Some("a" | "an" | "one")) {
            self.bump();
        }
        let mut size = None;
        let mut color = None;
        let shape = loop {
            let Some(w) = self.peek() else {
                return Err(ParseError::UnexpectedEnd("a shape"));
            };
            if let Some(s) = SizeClass::all().iter().find(|s| s.name() == w) {
                if size.replace(*s).is_some() {
                    return Err(ParseError::Repeated("size"));
                }
            } else if let Some(c) = Color::all().iter().find(|c| c.name() == w) {
                if color.replace(*c).is_some() {
                    return Err(ParseError::Repeated("colour"));
                }
            } else if let Some(s) = Shape::all()
                .iter()
                .find(|s| (if plural { s.plural() } else { s.name() }) == w)
            {
                break *s;
            } else if Shape::all()
                .iter()
                .any(|s| (if plural { s.name() } else { s.plural() }) == w)
            {
                return Err(self.unexpected(if plural {
                    "a plural shape after 'two' (e.g. 'circles')"
                } else {
                    "a singular shape (use 'two' for a count)"
                }));
            } else if background_of(w).is_some() {
                return Err(self.unexpected(
                    "an object colour (red, green, blue, yellow, purple, orange); black, gray and white are backgrounds",
                ));
            } else {
                return Err(self.unexpected("a size, colour or shape"));
            }
            self.bump();
        };
        self.bump();
        let Some(color) = color else {
            return Err(ParseError::MissingColor(shape.name()));
        };
        let mut o = ObjectSpec {
            shape,
            color,
            size,
            position: None,
            motion: None,
        };
        loop {
            if let Some(p) = self.position()? {
                if o.position.replace(p).is_some() {
                    return Err(ParseError::Repeated("position"));
                }
            } else if let Some(m) = self.motion()? {
                if o.motion.replace(m).is_some() {
                    return Err(ParseError::Repeated("motion"));
                }
            } else {
                break;
            }
        }
        Ok(o)
    }

    /// `(on|at|in) the (left|right|top|bottom|center|centre|middle)`; leaves
    /// "on a ... background" alone.
    fn position(&mut self) -> Result<Option<Position>, ParseError> {
        if !matches!(self.peek(), Some("on" | "at" | "in")) || self.peek_at(1) != Some("the") {
            return Ok(None);
        }
        self.at += 2;
        let p = match self.peek() {
            Some("left") => Position::Left,
            Some("right") => Position::Right,
            Some("top") => Position::Top,
            Some("bottom") => Position::Bottom,
            Some("center" | "centre" | "middle") => Position::Center,
            _ => return Err(self.unexpected("left, right, top, bottom or center")),
        };
        self.bump();
        Ok(Some(p))
    }

    fn motion(&mut self) -> Result<Option<Motion>, ParseError> {
        let m = match self.peek() {
            Some("moving" | "going") => {
                self.bump();
                match self.peek() {
                    Some("left") => Motion::Left,
                    Some("right") => Motion::Right,
                    Some("up") => Motion::Up,
                    Some("down") => Motion::Down,
                    _ => return Err(self.unexpected("left, right, up or down")),
                }
            }
            Some("growing") => Motion::Growing,
            Some("shrinking") => Motion::Shrinking,
            Some("still") => Motion::Still,
            Some("staying" | "standing") => {
                self.bump();
                if self.peek() != Some("still") {
                    return Err(self.unexpected("'still'"));
                }
                Motion::Still
            }
            _ => return Ok(None),
        };
        self.bump();
        Ok(Some(m))
    }

    /// `(on|with) [a|an] (black|gray|grey|white) background`.
    fn background(&mut self) -> Result<Option<Background>, ParseError> {
        if !matches!(self.peek(), Some("on" | "with")) {
            return Ok(None);
        }
        self.bump();
        if matches!(self.peek(), Some("a" | "an")) {
            self.bump();
        }
        let Some(bg) = self.peek().and_then(background_of) else {
            return Err(self.unexpected("a background colour (black, gray or white)"));
        };
        self.bump();
        if self.peek() != Some("background") {
            return Err(self.unexpected("'background'"));
        }
        self.bump();
        Ok(Some(bg))
    }
}

fn background_of(word: &str) -> Option<Background> {
    match word {
        "black" => Some(Background::Black),
        "gray" | "grey" => Some(Background::Gray),
        "white" => Some(Background::White),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{sample_spec, Split, WorldRng};
    use rand::SeedableRng;

    #[test]
    fn examples_render_as_documented() {
        let mut o = ObjectSpec::new(Shape::Circle, Color::Red);
        o.size = Some(SizeClass::Small);
        o.position = Some(Position::Left);
        let spec = SceneSpec {
            objects: vec![o],
            background: None,
            frames: 1,
        };
        assert_eq!(prompt(&spec), "a small red circle on the left");
        let two = SceneSpec {
            objects: vec![ObjectSpec::new(Shape::Square, Color::Green); 2],
            background: None,
            frames: 1,
        };
        assert_eq!(prompt(&two), "two green squares");
        let mut m = ObjectSpec::new(Shape::Cross, Color::Orange);
        m.motion = Some(Motion::Right);
        let video = SceneSpec {
            objects: vec![m],
            background: Some(Background::White),
            frames: VIDEO_FRAMES,
        };
        assert_eq!(
            prompt(&video),
            "an orange cross moving right on a white background"
        );
    }

    /// The longest spec the grammar allows has exactly [`MAX_PROMPT_WORDS`] words, and no
    /// sampled training or held-out spec, image or video, has more.
    #[test]
    fn max_prompt_words_bounds_every_prompt() {
        let words = |s: &SceneSpec| prompt(s).split_whitespace().count();
        let full = |shape, color, position| ObjectSpec {
            size: Some(SizeClass::Small),
            position: Some(position),
            motion: Some(Motion::Still),
            ..ObjectSpec::new(shape, color)
        };
        let longest = SceneSpec {
            objects: vec![
                full(Shape::Circle, Color::Red, Position::Left),
                full(Shape::Square, Color::Blue, Position::Right),
            ],
            background: Some(Background::White),
            frames: VIDEO_FRAMES,
        };
        assert_eq!(words(&longest), MAX_PROMPT_WORDS, "{}", prompt(&longest));
        let mut rng = WorldRng::seed_from_u64(11);
        let mut seen = [0usize; 2];
        for split in [Split::Train, Split::HeldOut] {
            for video in [false, true] {
                for _ in 0..5000 {
                    let spec = sample_spec(&mut rng, split, video);
                    let n = words(&spec);
                    assert!(n <= MAX_PROMPT_WORDS, "{n} words: {}", prompt(&spec));
                    seen[video as usize] = seen[video as usize].max(n);
                }
            }
        }
        assert!(seen[0] <= 19 && seen[1] > 19, "longest sampled: {seen:?}");
    }

    #[test]
    fn round_trip_over_sampled_specs() {
        let mut rng = WorldRng::seed_from_u64(1);
        for i in 0..2000 {
            let split = if i % 3 == 0 {
                Split::HeldOut
            } else {
                Split::Train
            };
            let spec = sample_spec(&mut rng, split, i % 2 == 0);
            let text = prompt(&spec);
            assert_eq!(parse(&text).as_ref(), Ok(&spec), "{text}");
            for w in text.split(' ') {
                assert!(vocabulary().contains(&w), "{w} missing from vocabulary");
            }
        }
    }

    #[test]
    fn tolerant_input() {
        let spec = parse("  A   Red CIRCLE. ").expect("simple prompt");
        assert_eq!(
            spec.objects,
            vec![ObjectSpec::new(Shape::Circle, Color::Red)]
        );
        assert_eq!(spec.frames, 1);
        assert_eq!(parse("red circle"), parse("one red circle"));
        assert_eq!(
            parse("a green cross going right on grey background"),
            parse("a green cross moving right on a gray background")
        );
        let v = parse("two large yellow triangles standing still").expect("count");
        assert!(v.is_count() && v.frames == VIDEO_FRAMES);
        let p =
            parse("a blue square in the middle, and a red circle at the top").expect("two objects");
        assert_eq!(p.objects[0].position, Some(Position::Center));
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(parse("   "), Err(ParseError::Empty));
        assert_eq!(
            parse("a red hexagon"),
            Err(ParseError::UnknownWord("hexagon".into()))
        );
        let e = parse("a white circle").expect_err("white is a background");
        assert!(e.to_string().contains("'white'"), "{e}");
        assert!(matches!(parse("a red"), Err(ParseError::UnexpectedEnd(_))));
        assert_eq!(parse("a circle"), Err(ParseError::MissingColor("circle")));
        assert_eq!(
            parse("a red circle and a blue square and a green cross"),
            Err(ParseError::TooManyObjects)
        );
        assert!(matches!(
            parse("a red circle on the left moving right"),
            Err(ParseError::Conflict(_))
        ));
        assert!(matches!(
            parse("a red circle on the left and a blue square on the left"),
            Err(ParseError::Conflict(_))
        ));
        assert!(matches!(
            parse("a red red circle"),
            Err(ParseError::Repeated(_))
        ));
        assert!(matches!(
            parse("two red circle"),
            Err(ParseError::Unexpected { .. })
        ));
        assert!(matches!(
            parse("a red circle on a blue background"),
            Err(ParseError::Unexpected { .. })
        ));
        assert!(parse(&"a red circle ".repeat(100)).is_err());
    }
}
