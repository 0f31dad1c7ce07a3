//! Where training prompts come from: the world's training grammar, or a file of prompts
//! (one per line; later, the server's generation log).

use std::path::Path;

use rand::seq::IndexedRandom;
use rand::Rng;

use crate::reward::Reward;
use crate::world::{self, Split};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot read prompts from {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Invalid {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{0} holds no prompts")]
    Empty(String),
}

/// A prompt distribution for image and video iterations.
#[derive(Debug, Clone)]
pub enum PromptSource {
    /// Fresh prompts from the world's grammar, training split only (held-out compositions are
    /// never trained on).
    Grammar,
    /// A fixed list: prompts naming a motion feed video iterations, the others image
    /// iterations; when one kind is missing the other stands in.
    List {
        images: Vec<String>,
        videos: Vec<String>,
    },
}

impl PromptSource {
    /// Reads a prompt file; every line must be scorable by `reward`. Blank lines and lines
    /// starting with `#` are skipped.
    pub fn from_file(path: &Path, reward: &dyn Reward) -> Result<Self, PromptError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PromptError::Read {
            path: name.clone(),
            source,
        })?;
        let lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
        let (mut images, mut videos) = (Vec::new(), Vec::new());
        for (line, prompt) in lines {
            reward
                .check_prompt(prompt)
                .map_err(|e| PromptError::Invalid {
                    path: name.clone(),
                    line,
                    reason: e.to_string(),
                })?;
            let video = world::parse(prompt).is_ok_and(|s| s.is_video());
            if video { &mut videos } else { &mut images }.push(prompt.to_string());
        }
        if images.is_empty() && videos.is_empty() {
            return Err(PromptError::Empty(name));
        }
        Ok(Self::List { images, videos })
    }

    /// `n` prompts for an image (`video == false`) or video iteration.
    pub fn draw(&self, rng: &mut impl Rng, n: usize, video: bool) -> Vec<String> {
        match self {
            Self::Grammar => (0..n)
                .map(|_| world::prompt(&world::sample_spec(rng, Split::Train, video)))
                .collect(),
            Self::List { images, videos } => {
                let (first, other) = if video {
                    (videos, images)
                } else {
                    (images, videos)
                };
                let pool = if first.is_empty() { other } else { first };
                (0..n)
                    .map(|_| {
                        pool.choose(rng)
                            .expect("a list source is never empty")
                            .clone()
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::VerifierReward;
    use rand::SeedableRng;

    #[test]
    fn a_file_splits_by_motion_and_names_the_bad_line() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("fewstep-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let good = dir.join("good.txt");
        std::fs::write(
            &good,
            "# comment\na red circle\n\na blue square moving left\n",
        )?;
        let src = PromptSource::from_file(&good, &VerifierReward)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        assert_eq!(src.draw(&mut rng, 2, false), vec!["a red circle"; 2]);
        assert_eq!(
            src.draw(&mut rng, 1, true),
            vec!["a blue square moving left"]
        );

        let bad = dir.join("bad.txt");
        std::fs::write(&bad, "a red circle\na purple unicorn\n")?;
        let err = PromptSource::from_file(&bad, &VerifierReward).unwrap_err();
        assert!(err.to_string().contains("bad.txt:2:"), "{err}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
