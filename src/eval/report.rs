//! The evaluation report: serialisable results and their markdown rendering.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::pipeline::SamplerKind;
use crate::world::{Category, Split};

/// The exact settings an evaluation ran with, so a report can be reproduced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSettings {
    pub model: String,
    /// Content hash of the weights, or `random-<seed>`.
    pub version: String,
    pub trained: bool,
    pub sampler: SamplerKind,
    pub steps: usize,
    pub guidance: f32,
    /// Network evaluations per sample: steps, twice over when CFG runs (guidance > 1).
    pub nfe_per_sample: usize,
    pub seed: u64,
    /// Image prompts per split.
    pub image_prompts: usize,
    /// Video prompts per split.
    pub video_prompts: usize,
    pub samples_per_prompt: usize,
    pub diversity_prompts: usize,
    pub diversity_samples: usize,
    pub width: usize,
    pub height: usize,
    pub video_frames: usize,
    pub max_batch: usize,
}

impl EvalSettings {
    /// One-line summary used as the title of the pictures.
    pub fn title(&self) -> String {
        format!(
            "{} ({}) | {:?} {} steps | cfg {} | seed {}",
            self.model, self.version, self.sampler, self.steps, self.guidance, self.seed
        )
        .to_lowercase()
    }
}

/// Pass rate of one GenEval-style category within a row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryRate {
    pub category: Category,
    /// Prompts of the row in this category.
    pub prompts: usize,
    /// Mean pass over those prompts; `None` when there are none.
    pub pass_rate: Option<f64>,
}

/// Metrics of one prompt group or combination of groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowReport {
    /// "in-distribution images", "held-out", "all", ...
    pub name: String,
    pub prompts: usize,
    /// Scored samples (the main sets; the diversity set only feeds `diversity`).
    pub samples: usize,
    /// Mean over prompts of the share of their samples that pass.
    pub pass_rate: Option<f64>,
    pub categories: Vec<CategoryRate>,
    /// Mean verifier soft score in [0, 1].
    pub soft_score: Option<f64>,
    /// Frechet distance of sample features to ground-truth renders of the same specs; only
    /// comparable between reports with the same prompt counts (it is biased at small n).
    pub frechet_distance: Option<f64>,
    /// The Frechet distance of each feature block alone (`world::FEATURE_BLOCKS`: colour,
    /// layout, sharpness, motion), which says where the total comes from.
    #[serde(default)]
    pub frechet_by_block: Vec<BlockDistance>,
    /// Mean pairwise pixel distance among samples of one prompt, in [0, 1].
    pub diversity: Option<f64>,
    pub nfe_per_sample: usize,
    /// Generated samples per second of generation wall clock (diversity set included).
    pub samples_per_s: Option<f64>,
}

/// The Frechet distance of one feature block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockDistance {
    pub block: String,
    pub distance: f64,
}

/// One scored sample of a main set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub split: Split,
    pub video: bool,
    pub prompt_index: usize,
    pub sample_index: usize,
    pub prompt: String,
    /// Noise seed of the sample (`None` for supplied frames).
    pub seed: Option<u64>,
    pub pass: bool,
    pub score: f32,
    /// Why the verifier failed it (empty when it passed).
    pub failures: Vec<String>,
    /// What the verifier saw in a failed sample's first frame, so a miss reads as a wrong
    /// shape, a wrong colour or a missing object (empty when it passed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seen: Vec<String>,
}

/// The whole result of `fewstep eval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub settings: EvalSettings,
    pub rows: Vec<RowReport>,
    pub samples: Vec<SampleRecord>,
}

fn category_header(c: Category) -> &'static str {
    match c {
        Category::SingleObject => "single",
        Category::TwoObjects => "two obj",
        Category::Color => "color",
        Category::Position => "position",
        Category::Count => "count",
        Category::Motion => "motion",
    }
}

fn percent(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{:.1}%", 100.0 * v))
}

fn number(x: Option<f64>, decimals: usize) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

impl EvalReport {
    /// The markdown table alone (one line per row).
    pub fn table(&self) -> String {
        let mut out = String::from("| set | prompts | overall |");
        let cats: Vec<Category> = super::CATEGORIES.to_vec();
        for &c in &cats {
            let _ = write!(out, " {} |", category_header(c));
        }
        out.push_str(" soft score | FD | diversity | NFE | samples/s |\n|---|--:|--:|");
        out.push_str(&"--:|".repeat(cats.len() + 5));
        out.push('\n');
        for r in &self.rows {
            let _ = write!(
                out,
                "| {} | {} | {} |",
                r.name,
                r.prompts,
                percent(r.pass_rate)
            );
            for &c in &cats {
                let rate = r
                    .categories
                    .iter()
                    .find(|x| x.category == c)
                    .and_then(|x| x.pass_rate);
                let _ = write!(out, " {} |", percent(rate));
            }
            let _ = writeln!(
                out,
                " {} | {} | {} | {} | {} |",
                number(r.soft_score, 3),
                number(r.frechet_distance, 3),
                number(r.diversity, 3),
                r.nfe_per_sample,
                number(r.samples_per_s, 1)
            );
        }
        out
    }

    /// The FD of each feature block alone, for the rows that have an FD (empty otherwise).
    fn block_table(&self) -> String {
        let Some(first) = self.rows.iter().find(|r| !r.frechet_by_block.is_empty()) else {
            return String::new();
        };
        let blocks: Vec<&str> = first
            .frechet_by_block
            .iter()
            .map(|b| b.block.as_str())
            .collect();
        let mut out = String::from(
            "## FD by feature block\n\nEach block of `world::features` alone: where the FD \
             comes from (the blocks do not add up to it).\n\n| set | FD |",
        );
        for b in &blocks {
            let _ = write!(out, " {b} |");
        }
        out.push_str("\n|---|--:|");
        out.push_str(&"--:|".repeat(blocks.len()));
        out.push('\n');
        for r in self.rows.iter().filter(|r| !r.frechet_by_block.is_empty()) {
            let _ = write!(out, "| {} | {} |", r.name, number(r.frechet_distance, 3));
            for b in &blocks {
                let d = r
                    .frechet_by_block
                    .iter()
                    .find(|x| x.block == *b)
                    .map(|x| x.distance);
                let _ = write!(out, " {} |", number(d, 3));
            }
            out.push('\n');
        }
        out.push('\n');
        out
    }

    /// `report.md`: the table and the settings it was measured with.
    pub fn markdown(&self) -> String {
        let s = &self.settings;
        let mut out = format!("# Evaluation of {}\n\n", s.model);
        out.push_str(&self.table());
        out.push_str(
            "\nPass rates are GenEval-style (every stated attribute must hold), averaged over \
             prompts; `-` means no prompt of that kind.\n\n",
        );
        out.push_str(&self.block_table());
        out.push_str("## Settings\n\n");
        let trained = if s.trained { "" } else { " (untrained)" };
        let lines = [
            format!("model: `{}`, weights `{}`{trained}", s.model, s.version),
            format!(
                "sampler: {:?}, {} steps, guidance {} ({} network evaluations per sample)",
                s.sampler, s.steps, s.guidance, s.nfe_per_sample
            )
            .to_lowercase(),
            format!(
                "prompts per split: {} images, {} videos ({} frames), {} sample(s) each",
                s.image_prompts, s.video_prompts, s.video_frames, s.samples_per_prompt
            ),
            format!(
                "diversity set: {} prompts x {} samples per split and modality",
                s.diversity_prompts, s.diversity_samples
            ),
            format!(
                "size {}x{}, batches of up to {}, seed {}",
                s.width, s.height, s.max_batch, s.seed
            ),
            "FD: Frechet distance of `world::features` to ground-truth renders of the same \
             specs (lower is better; compare only at equal prompt counts)"
                .to_string(),
        ];
        for l in lines {
            let _ = writeln!(out, "- {l}");
        }
        out
    }
}
