//! Where training prompts come from: the world's training grammar, or a file of prompts
//! (one per line; later, the server's generation log).

use std::path::Path;

use rand::Rng;
use rand_distr::weighted::WeightedIndex;
use rand_distr::Distribution;

use crate::reward::Reward;
use crate::store::PromptStats;
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

/// Prompts with sampling weights.
#[derive(Debug, Clone, Default)]
pub struct Weighted {
    pub prompts: Vec<String>,
    pub weights: Vec<f64>,
}

impl Weighted {
    fn push(&mut self, prompt: String, weight: f64) {
        self.prompts.push(prompt);
        self.weights.push(weight);
    }

    fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }
}

/// What `distill --from-log` took from the log.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LogSummary {
    pub prompts: usize,
    pub rated_prompts: usize,
    /// Logged prompts the reward cannot score (left out).
    pub skipped: usize,
    pub generations: i64,
}

/// A prompt distribution for image and video iterations.
#[derive(Debug, Clone)]
pub enum PromptSource {
    /// Fresh prompts from the world's grammar, training split only (held-out compositions are
    /// never trained on).
    Grammar,
    /// A weighted list: prompts naming a motion feed video iterations, the others image
    /// iterations; when one kind is missing the other stands in.
    List { images: Weighted, videos: Weighted },
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
        let (mut images, mut videos) = (Weighted::default(), Weighted::default());
        for (line, prompt) in lines {
            reward
                .check_prompt(prompt)
                .map_err(|e| PromptError::Invalid {
                    path: name.clone(),
                    line,
                    reason: e.to_string(),
                })?;
            let video = world::parse(prompt).is_ok_and(|s| s.is_video());
            if video { &mut videos } else { &mut images }.push(prompt.to_string(), 1.0);
        }
        if images.is_empty() && videos.is_empty() {
            return Err(PromptError::Empty(name));
        }
        Ok(Self::List { images, videos })
    }

    /// The logged prompt distribution: each prompt weighted by its traffic, and rated prompts
    /// by `1 + oversample * (1 - mean score)` on top, so prompts users rated low (where the
    /// student likely sits in a Forbidden Zone) are trained on more often.
    pub fn from_log(
        stats: &[PromptStats],
        reward: &dyn Reward,
        oversample: f64,
    ) -> Result<(Self, LogSummary), PromptError> {
        let (mut images, mut videos) = (Weighted::default(), Weighted::default());
        let mut summary = LogSummary {
            prompts: 0,
            rated_prompts: 0,
            skipped: 0,
            generations: 0,
        };
        for s in stats {
            if reward.check_prompt(&s.prompt).is_err() {
                summary.skipped += 1;
                continue;
            }
            let boost = s
                .mean_score
                .map_or(1.0, |m| 1.0 + oversample * (1.0 - m).clamp(0.0, 1.0));
            let weight = s.generations.max(1) as f64 * boost;
            let video = s.kind == "video";
            if video { &mut videos } else { &mut images }.push(s.prompt.clone(), weight);
            summary.prompts += 1;
            summary.rated_prompts += s.mean_score.is_some() as usize;
            summary.generations += s.generations;
        }
        if images.is_empty() && videos.is_empty() {
            return Err(PromptError::Empty("the generation log".into()));
        }
        Ok((Self::List { images, videos }, summary))
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
                match WeightedIndex::new(&pool.weights) {
                    Ok(index) => (0..n)
                        .map(|_| pool.prompts[index.sample(rng)].clone())
                        .collect(),
                    // Unreachable for lists built here (never empty, weights >= 1).
                    Err(_) => Vec::new(),
                }
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

    #[test]
    fn low_rated_log_prompts_are_oversampled() {
        let stat = |p: &str, n, mean: Option<f64>| PromptStats {
            prompt: p.into(),
            kind: "image".into(),
            generations: n,
            ratings: mean.is_some() as i64,
            mean_score: mean,
        };
        let stats = [
            stat("a red circle", 10, Some(1.0)),
            stat("a blue square", 10, Some(0.0)),
            stat("a purple unicorn", 50, None),
        ];
        let (src, summary) = PromptSource::from_log(&stats, &VerifierReward, 2.0).unwrap();
        assert_eq!(
            (summary.prompts, summary.skipped, summary.rated_prompts),
            (2, 1, 2)
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let drawn = src.draw(&mut rng, 4000, false);
        let blue = drawn.iter().filter(|p| *p == "a blue square").count() as f64 / 4000.0;
        // Weights 10 * (1 + 2 * 1) = 30 vs 10: three quarters blue.
        assert!((blue - 0.75).abs() < 0.03, "{blue}");
    }
}
