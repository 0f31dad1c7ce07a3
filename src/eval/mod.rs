//! `fewstep eval`: GenEval-style evaluation of a model on ShapesWorld.
//!
//! Fixed prompt sets (in-distribution [`Split::Train`] and [`Split::HeldOut`], images and
//! videos) are generated through [`LoadedModel::generate`] with deterministic seeds and scored
//! by the analytic verifier (strict pass per category and a soft score), a Frechet distance
//! against ground-truth renders of the same specs, and a per-prompt diversity. Scoring is
//! separate from generation ([`score`]) so it can be checked on known frames without a model.
//!
//! Outputs: `report.json`, `report.md`, `grid.png` (labelled image samples) and
//! `videos.gif` (labelled video samples side by side).

mod grid;
pub mod plot;
pub mod probe;
mod report;
mod text;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use image::RgbImage;
use rand::SeedableRng;

use crate::manifest::{LoadedModel, Manifest};
use crate::pipeline::BatchSpec;
use crate::world::{self, Category, SceneSpec, Split, WorldRng, IMAGE_SIZE, VIDEO_FRAMES};

pub use grid::grid_size;
pub use plot::plot_jsonl;
pub use report::{CategoryRate, EvalReport, EvalSettings, RowReport, SampleRecord};

/// Every category, in the column order of the report.
pub const CATEGORIES: [Category; 6] = [
    Category::SingleObject,
    Category::TwoObjects,
    Category::Color,
    Category::Position,
    Category::Count,
    Category::Motion,
];

/// What to evaluate and how; `None` fields take the manifest's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    /// Sampler steps (default: `sampling.default_steps`).
    pub steps: Option<usize>,
    /// CFG weight (default: `sampling.default_guidance`); above 1 runs CFG.
    pub guidance: Option<f32>,
    /// Image prompts per split.
    pub image_prompts: usize,
    /// Video prompts per split.
    pub video_prompts: usize,
    /// Samples of every prompt in the main sets.
    pub samples_per_prompt: usize,
    /// Prompts per split and modality in the separate diversity set (0 = none).
    pub diversity_prompts: usize,
    /// Samples of every diversity prompt (at least 2 when there are diversity prompts).
    pub diversity_samples: usize,
    /// Seeds the prompt sets, the sampling noise and the reference renders.
    pub seed: u64,
    /// Where to write the report and pictures; `None` writes nothing.
    pub out_dir: Option<PathBuf>,
    /// Image samples shown in `grid.png` (half in-distribution, half held-out).
    pub grid_images: usize,
    /// Video samples shown in `videos.gif` (half in-distribution, half held-out).
    pub strip_videos: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            steps: None,
            guidance: None,
            image_prompts: 96,
            video_prompts: 32,
            samples_per_prompt: 1,
            diversity_prompts: 8,
            diversity_samples: 4,
            seed: 0,
            out_dir: None,
            grid_images: 32,
            strip_videos: 8,
        }
    }
}

/// The samples of one prompt: its spec, and the seed and frames of each sample.
#[derive(Debug, Clone)]
pub struct PromptSamples {
    pub spec: SceneSpec,
    pub seeds: Vec<u64>,
    pub samples: Vec<Vec<RgbImage>>,
}

/// Everything generated for one split and modality: the scoring input.
#[derive(Debug, Clone)]
pub struct GroupSamples {
    pub split: Split,
    pub video: bool,
    /// Main set: pass rates, soft score, FD (and diversity when it has several samples).
    pub prompts: Vec<PromptSamples>,
    /// Separate small set with several samples per prompt, for diversity only.
    pub diversity: Vec<PromptSamples>,
    /// Wall clock of generation for this group (0 when the frames were supplied).
    pub generation_s: f64,
}

impl GroupSamples {
    fn label(&self) -> String {
        format!("{} {}", split_name(self.split), modality(self.video))
    }

    fn generated(&self) -> usize {
        self.prompts
            .iter()
            .chain(&self.diversity)
            .map(|p| p.samples.len())
            .sum()
    }
}

/// Rows and per-sample records computed from samples; see [`score`].
#[derive(Debug, Clone)]
pub struct Scores {
    pub rows: Vec<RowReport>,
    pub samples: Vec<SampleRecord>,
}

fn split_name(split: Split) -> &'static str {
    match split {
        Split::Train => "in-distribution",
        Split::HeldOut => "held-out",
    }
}

fn modality(video: bool) -> &'static str {
    if video {
        "videos"
    } else {
        "images"
    }
}

/// Evaluation scores ShapesWorld prompts with the world's analytic verifier.
const EVAL_FEATURE: &str = "fewstep eval (ShapesWorld prompts and verifier)";

/// Loads `name` from `models_dir`: `weights` when given, else the manifest's weights file, or
/// random weights (with a warning) when that file is missing and `allow_random` is set.
pub fn load_model(
    models_dir: &Path,
    name: &str,
    weights: Option<&Path>,
    allow_random: bool,
    device: &Device,
) -> anyhow::Result<LoadedModel> {
    let manifest = Manifest::find(models_dir, name)?;
    manifest.require(EVAL_FEATURE, |c| c.shapes_world)?;
    let model = match weights {
        Some(w) => LoadedModel::load_weights(&manifest, w, device)?,
        None if allow_random && !manifest.weights_path().is_file() => {
            tracing::warn!(
                weights = %manifest.weights_path().display(),
                "weights file missing; evaluating random weights"
            );
            LoadedModel::random(&manifest, 0, device)?
        }
        None => LoadedModel::load(&manifest, device)?,
    };
    Ok(model)
}

/// Generates the prompt sets with `model`, scores them and, when `opts.out_dir` is set,
/// writes `report.json`, `report.md`, `grid.png` and `videos.gif` there.
pub fn evaluate(model: &LoadedModel, opts: &EvalOptions) -> anyhow::Result<EvalReport> {
    model.manifest.require(EVAL_FEATURE, |c| c.shapes_world)?;
    let settings = resolve_settings(model, opts)?;
    let start = Instant::now();
    let groups = generate_groups(model, &settings)?;
    let scores = score(&groups, settings.seed, settings.nfe_per_sample);
    let report = EvalReport {
        settings,
        rows: scores.rows,
        samples: scores.samples,
    };
    tracing::info!(
        seconds = start.elapsed().as_secs_f64(),
        "evaluation finished"
    );
    if let Some(dir) = &opts.out_dir {
        write_outputs(dir, &report, &groups, opts)?;
    }
    Ok(report)
}

/// Checks the options against the model and fills in the manifest's defaults. Settings a
/// server would refuse (steps not in `allowed_steps`, guidance above `max_guidance`) only warn:
/// evaluating them is a legitimate experiment.
fn resolve_settings(model: &LoadedModel, opts: &EvalOptions) -> anyhow::Result<EvalSettings> {
    let m = &model.manifest;
    let s = &m.sampling;
    let steps = opts.steps.unwrap_or(s.default_steps);
    let guidance = opts.guidance.unwrap_or(s.default_guidance);
    anyhow::ensure!(steps >= 1, "steps must be at least 1");
    anyhow::ensure!(
        guidance.is_finite() && guidance >= 0.0,
        "guidance must be a finite number >= 0, got {guidance}"
    );
    if !s.allowed_steps.contains(&steps) {
        tracing::warn!(steps, allowed = ?s.allowed_steps, "steps outside the model's allowed_steps");
    }
    if guidance > s.max_guidance {
        tracing::warn!(
            guidance,
            max = s.max_guidance,
            "guidance above the model's max_guidance"
        );
    }
    anyhow::ensure!(
        opts.samples_per_prompt >= 1,
        "samples_per_prompt must be at least 1"
    );
    anyhow::ensure!(
        opts.diversity_prompts == 0 || opts.diversity_samples >= 2,
        "diversity needs at least 2 samples per prompt (or 0 diversity prompts)"
    );
    anyhow::ensure!(
        opts.image_prompts > 0 || opts.video_prompts > 0,
        "nothing to evaluate: both image and video prompt counts are 0"
    );
    let frames = &m.serving.frames;
    if opts.image_prompts > 0 && !frames.contains(&1) {
        anyhow::bail!(
            "model {} does not generate images (serving.frames = {frames:?}); use 0 image prompts",
            m.name
        );
    }
    if opts.video_prompts > 0 && !frames.contains(&VIDEO_FRAMES) {
        anyhow::bail!(
            "model {} does not generate {VIDEO_FRAMES}-frame videos (serving.frames = \
             {frames:?}); use 0 video prompts",
            m.name
        );
    }
    let native = [IMAGE_SIZE as usize, IMAGE_SIZE as usize];
    let [width, height] = if m.serving.sizes.contains(&native) {
        native
    } else {
        let first = *m
            .serving
            .sizes
            .first()
            .context("the manifest lists no serving.sizes")?;
        tracing::warn!(
            ?first,
            "model does not serve 32x32; the verifier will resize its samples"
        );
        first
    };
    let cfg = if guidance > 1.0 { 2 } else { 1 };
    Ok(EvalSettings {
        model: m.name.clone(),
        version: model.version.clone(),
        trained: model.trained,
        sampler: s.sampler,
        steps,
        guidance,
        nfe_per_sample: steps * cfg,
        seed: opts.seed,
        image_prompts: opts.image_prompts,
        video_prompts: opts.video_prompts,
        samples_per_prompt: opts.samples_per_prompt,
        diversity_prompts: opts.diversity_prompts,
        diversity_samples: opts.diversity_samples,
        width,
        height,
        video_frames: VIDEO_FRAMES,
        max_batch: m.serving.max_batch,
    })
}

/// SplitMix64 finaliser of `a` mixed with `b`: derives independent, reproducible seeds.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Distinct tag of a (split, modality, set) combination for seed derivation.
fn group_tag(split: Split, video: bool, diversity: bool) -> u64 {
    let s = match split {
        Split::Train => 0,
        Split::HeldOut => 1,
    };
    1 + s + 2 * video as u64 + 4 * diversity as u64
}

/// Seed of sample `j` of prompt `i`: depends only on the position, not on batching.
fn sample_seed(base: u64, tag: u64, i: usize, j: usize) -> u64 {
    mix(mix(mix(base, tag), i as u64), j as u64)
}

/// One row of a generation batch.
struct Job {
    diversity: bool,
    prompt: usize,
    prompt_text: String,
    seed: u64,
}

fn generate_groups(
    model: &LoadedModel,
    settings: &EvalSettings,
) -> anyhow::Result<Vec<GroupSamples>> {
    let mut groups = Vec::new();
    for video in [false, true] {
        let n = if video {
            settings.video_prompts
        } else {
            settings.image_prompts
        };
        if n == 0 {
            continue;
        }
        for split in [Split::Train, Split::HeldOut] {
            groups.push(generate_group(model, settings, split, video, n)?);
        }
    }
    Ok(groups)
}

fn new_prompts(specs: Vec<SceneSpec>) -> Vec<PromptSamples> {
    specs
        .into_iter()
        .map(|spec| PromptSamples {
            spec,
            seeds: Vec::new(),
            samples: Vec::new(),
        })
        .collect()
}

fn generate_group(
    model: &LoadedModel,
    settings: &EvalSettings,
    split: Split,
    video: bool,
    n: usize,
) -> anyhow::Result<GroupSamples> {
    let base = settings.seed;
    let main_tag = group_tag(split, video, false);
    let div_tag = group_tag(split, video, true);
    let mut group = GroupSamples {
        split,
        video,
        prompts: new_prompts(world::prompt_set(split, n, mix(base, main_tag), video)),
        diversity: new_prompts(world::prompt_set(
            split,
            settings.diversity_prompts,
            mix(base, div_tag),
            video,
        )),
        generation_s: 0.0,
    };
    let mut jobs = Vec::new();
    for (set, tag, per_prompt, diversity) in [
        (&group.prompts, main_tag, settings.samples_per_prompt, false),
        (&group.diversity, div_tag, settings.diversity_samples, true),
    ] {
        for (i, p) in set.iter().enumerate() {
            let prompt_text = world::prompt(&p.spec);
            for j in 0..per_prompt {
                jobs.push(Job {
                    diversity,
                    prompt: i,
                    prompt_text: prompt_text.clone(),
                    seed: sample_seed(base, tag, i, j),
                });
            }
        }
    }
    let frames = if video { VIDEO_FRAMES } else { 1 };
    let label = group.label();
    tracing::info!(group = %label, samples = jobs.len(), "generating");
    let batches = jobs.len().div_ceil(settings.max_batch.max(1));
    for (b, batch) in jobs.chunks(settings.max_batch.max(1)).enumerate() {
        let spec = BatchSpec {
            prompts: batch.iter().map(|j| j.prompt_text.clone()).collect(),
            negative_prompts: vec![String::new(); batch.len()],
            seeds: batch.iter().map(|j| j.seed).collect(),
            frames,
            width: settings.width,
            height: settings.height,
        };
        let start = Instant::now();
        let out = model
            .generate(&spec, settings.steps, settings.guidance)
            .with_context(|| format!("generating {label}"))?;
        group.generation_s += start.elapsed().as_secs_f64();
        anyhow::ensure!(
            out.outputs.len() == batch.len(),
            "model returned {} outputs for a batch of {}",
            out.outputs.len(),
            batch.len()
        );
        for (job, frames_out) in batch.iter().zip(out.outputs) {
            anyhow::ensure!(
                frames_out.len() == frames,
                "model returned {} frames, expected {frames}",
                frames_out.len()
            );
            let set = if job.diversity {
                &mut group.diversity
            } else {
                &mut group.prompts
            };
            set[job.prompt].seeds.push(job.seed);
            set[job.prompt].samples.push(frames_out);
        }
        tracing::info!(group = %label, "batch {}/{batches} done", b + 1);
    }
    Ok(group)
}

/// Per-prompt results of one group, before aggregation into rows.
struct GroupScore {
    /// (pass fraction over samples, mean soft score, categories) per main prompt.
    prompts: Vec<(f64, f64, Vec<Category>)>,
    generated_features: Vec<Vec<f32>>,
    reference_features: Vec<Vec<f32>>,
    /// Diversity of every prompt with several samples (main and diversity sets).
    diversity: Vec<f64>,
    samples: usize,
    generated: usize,
    generation_s: f64,
}

/// Scores samples against their specs; `reference_seed` seeds the ground-truth renders that
/// the Frechet distance compares with (one render per main sample). Rows: every group, then
/// the combinations (in-distribution, held-out, images, videos, all) that have at least two
/// groups in them.
pub fn score(groups: &[GroupSamples], reference_seed: u64, nfe_per_sample: usize) -> Scores {
    let mut records = Vec::new();
    let mut scored = Vec::with_capacity(groups.len());
    for (g, group) in groups.iter().enumerate() {
        let mut gs = GroupScore {
            prompts: Vec::new(),
            generated_features: Vec::new(),
            reference_features: Vec::new(),
            diversity: Vec::new(),
            samples: 0,
            generated: group.generated(),
            generation_s: group.generation_s,
        };
        for (i, p) in group.prompts.iter().enumerate() {
            let text = world::prompt(&p.spec);
            let (mut passes, mut soft) = (0usize, 0f64);
            for (j, frames) in p.samples.iter().enumerate() {
                let v = world::verify(&p.spec, frames);
                passes += v.pass as usize;
                soft += v.score as f64;
                gs.generated_features.push(world::features(frames));
                let mut rng = WorldRng::seed_from_u64(mix(
                    mix(reference_seed, 0x5EED_0000 + g as u64),
                    (i * p.samples.len() + j) as u64,
                ));
                gs.reference_features
                    .push(world::features(&world::render(&p.spec, &mut rng)));
                records.push(SampleRecord {
                    split: group.split,
                    video: group.video,
                    prompt_index: i,
                    sample_index: j,
                    prompt: text.clone(),
                    seed: p.seeds.get(j).copied(),
                    pass: v.pass,
                    score: v.score,
                    seen: if v.pass {
                        Vec::new()
                    } else {
                        v.detected
                            .iter()
                            .filter(|d| d.frame == 0)
                            .map(ToString::to_string)
                            .collect()
                    },
                    failures: v.failures,
                });
            }
            let k = p.samples.len();
            gs.samples += k;
            if k > 0 {
                gs.prompts.push((
                    passes as f64 / k as f64,
                    soft / k as f64,
                    world::categories(&p.spec),
                ));
            }
        }
        gs.diversity = group
            .prompts
            .iter()
            .chain(&group.diversity)
            .filter(|p| p.samples.len() >= 2)
            .map(|p| world::diversity(&p.samples))
            .collect();
        scored.push(gs);
    }

    let mut rows: Vec<RowReport> = groups
        .iter()
        .zip(&scored)
        .map(|(g, s)| aggregate(g.label(), &[s], nfe_per_sample))
        .collect();
    type Select = fn(&GroupSamples) -> bool;
    let combos: [(&str, Select); 5] = [
        ("in-distribution", |g| g.split == Split::Train),
        ("held-out", |g| g.split == Split::HeldOut),
        ("images", |g| !g.video),
        ("videos", |g| g.video),
        ("all", |_| true),
    ];
    for (name, select) in combos {
        let members: Vec<&GroupScore> = groups
            .iter()
            .zip(&scored)
            .filter(|(g, _)| select(g))
            .map(|(_, s)| s)
            .collect();
        if members.len() >= 2 {
            rows.push(aggregate(name.to_string(), &members, nfe_per_sample));
        }
    }
    Scores {
        rows,
        samples: records,
    }
}

fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for v in values {
        sum += v;
        n += 1;
    }
    (n > 0).then(|| sum / n as f64)
}

/// Pools per-prompt results of `members` into one row.
fn aggregate(name: String, members: &[&GroupScore], nfe_per_sample: usize) -> RowReport {
    let prompts: Vec<&(f64, f64, Vec<Category>)> =
        members.iter().flat_map(|m| &m.prompts).collect();
    let categories = CATEGORIES
        .iter()
        .map(|&c| {
            let rates: Vec<f64> = prompts
                .iter()
                .filter(|p| p.2.contains(&c))
                .map(|p| p.0)
                .collect();
            CategoryRate {
                category: c,
                prompts: rates.len(),
                pass_rate: mean(rates),
            }
        })
        .collect();
    let generated: Vec<Vec<f32>> = members
        .iter()
        .flat_map(|m| m.generated_features.iter().cloned())
        .collect();
    let reference: Vec<Vec<f32>> = members
        .iter()
        .flat_map(|m| m.reference_features.iter().cloned())
        .collect();
    // A covariance needs two samples; with fewer the distance would only reflect the ridge.
    let frechet_distance = (generated.len() >= 2)
        .then(|| world::frechet_distance(&generated, &reference))
        .filter(|d| d.is_finite());
    let frechet_by_block = match frechet_distance {
        Some(_) => world::frechet_by_block(&generated, &reference)
            .into_iter()
            .filter(|(_, d)| d.is_finite())
            .map(|(block, distance)| report::BlockDistance {
                block: block.into(),
                distance,
            })
            .collect(),
        None => Vec::new(),
    };
    let seconds: f64 = members.iter().map(|m| m.generation_s).sum();
    let made: usize = members.iter().map(|m| m.generated).sum();
    RowReport {
        name,
        prompts: prompts.len(),
        samples: members.iter().map(|m| m.samples).sum(),
        pass_rate: mean(prompts.iter().map(|p| p.0)),
        categories,
        soft_score: mean(prompts.iter().map(|p| p.1)),
        frechet_distance,
        frechet_by_block,
        diversity: mean(members.iter().flat_map(|m| m.diversity.iter().copied())),
        nfe_per_sample,
        samples_per_s: (seconds > 0.0).then(|| made as f64 / seconds),
    }
}

/// Writes the report files and pictures into `dir`.
fn write_outputs(
    dir: &Path,
    report: &EvalReport,
    groups: &[GroupSamples],
    opts: &EvalOptions,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let path = dir.join(name);
        crate::util::write_atomic(&path, bytes)
            .with_context(|| format!("writing {}", path.display()))
    };
    write("report.json", &serde_json::to_vec_pretty(report)?)?;
    write("report.md", report.markdown().as_bytes())?;
    let title = report.settings.title();
    let images = tiles(report, groups, false, opts.grid_images);
    if !images.is_empty() {
        write("grid.png", &grid::grid_png(&title, &images)?)?;
    }
    let videos = tiles(report, groups, true, opts.strip_videos);
    if !videos.is_empty() {
        write("videos.gif", &grid::video_strip_gif(&title, &videos)?)?;
    }
    tracing::info!(dir = %dir.display(), "wrote report.json, report.md and pictures");
    Ok(())
}

/// The first sample of up to `limit / 2` prompts of each split (rounded up for
/// in-distribution), with its verdict, for the pictures.
fn tiles<'a>(
    report: &'a EvalReport,
    groups: &'a [GroupSamples],
    video: bool,
    limit: usize,
) -> Vec<grid::Tile<'a>> {
    let mut out = Vec::new();
    for split in [Split::Train, Split::HeldOut] {
        let quota = match split {
            Split::Train => limit.div_ceil(2),
            Split::HeldOut => limit / 2,
        };
        let Some(group) = groups.iter().find(|g| g.split == split && g.video == video) else {
            continue;
        };
        for (i, p) in group.prompts.iter().enumerate().take(quota) {
            let (Some(frames), Some(rec)) = (
                p.samples.first(),
                report.samples.iter().find(|r| {
                    r.split == split
                        && r.video == video
                        && r.prompt_index == i
                        && r.sample_index == 0
                }),
            ) else {
                continue;
            };
            out.push(grid::Tile {
                frames,
                prompt: &rec.prompt,
                pass: rec.pass,
                score: rec.score,
                tag: split_name(split),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fewstep-eval-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn manifest() -> Manifest {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-shapes-teacher/manifest.toml");
        Manifest::from_file(&path).expect("tiny-shapes manifest")
    }

    fn in_unit(x: Option<f64>) -> bool {
        x.is_none_or(|v| (0.0..=1.0).contains(&v))
    }

    #[test]
    fn end_to_end_on_random_weights() {
        let model = LoadedModel::random(&manifest(), 0, &Device::Cpu).expect("random model");
        let dir = test_dir("e2e");
        let opts = EvalOptions {
            steps: Some(1),
            image_prompts: 3,
            video_prompts: 1,
            diversity_prompts: 1,
            diversity_samples: 2,
            out_dir: Some(dir.clone()),
            ..EvalOptions::default()
        };
        let report = evaluate(&model, &opts).expect("evaluate");
        assert_eq!(report.settings.nfe_per_sample, 2, "CFG doubles 1 step");
        assert_eq!(report.samples.len(), 2 * 3 + 2);
        let names: Vec<&str> = report.rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "in-distribution images",
                "held-out images",
                "in-distribution videos",
                "held-out videos",
                "in-distribution",
                "held-out",
                "images",
                "videos",
                "all"
            ]
        );
        for row in &report.rows {
            assert!(in_unit(row.pass_rate) && row.pass_rate.is_some(), "{row:?}");
            assert!(in_unit(row.soft_score), "{row:?}");
            assert!(row.categories.iter().all(|c| in_unit(c.pass_rate)));
            assert!(row.samples_per_s.is_some_and(|s| s > 0.0));
            assert!(row.diversity.is_some_and(|d| (0.0..=1.0).contains(&d)));
        }
        // Three image prompts give a (degenerate but finite) FD; one video prompt gives none.
        assert!(report.rows[0].frechet_distance.is_some());
        assert!(report.rows[2].frechet_distance.is_none());
        // ... and so do its blocks.
        assert_eq!(
            report.rows[0].frechet_by_block.len(),
            world::FEATURE_BLOCKS.len()
        );
        assert!(report.rows[2].frechet_by_block.is_empty());

        let json: EvalReport =
            serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("json"))
                .expect("report.json parses");
        assert_eq!(json.rows.len(), report.rows.len());
        let md = std::fs::read_to_string(dir.join("report.md")).expect("md");
        assert!(md.contains("| held-out images |"), "{md}");
        assert!(
            md.contains("| set | FD | colour | layout | sharpness | motion |"),
            "{md}"
        );
        let grid = image::open(dir.join("grid.png")).expect("grid.png decodes");
        assert_eq!((grid.width(), grid.height()), grid_size(6));
        let gif = std::fs::File::open(dir.join("videos.gif")).expect("videos.gif");
        let frames = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(gif))
            .and_then(|d| image::AnimationDecoder::into_frames(d).collect_frames())
            .expect("videos.gif decodes");
        assert_eq!(frames.len(), VIDEO_FRAMES);
        assert_eq!(frames[0].buffer().dimensions(), grid_size(2));
        std::fs::remove_dir_all(dir).ok();
    }

    /// Renders every spec `k` times: the frames a perfect model would produce.
    fn rendered(split: Split, video: bool, n: usize, k: usize, seed: u64) -> GroupSamples {
        let mut rng = WorldRng::seed_from_u64(seed);
        let prompts = world::prompt_set(split, n, seed, video)
            .into_iter()
            .map(|spec| PromptSamples {
                samples: (0..k).map(|_| world::render(&spec, &mut rng)).collect(),
                seeds: Vec::new(),
                spec,
            })
            .collect();
        GroupSamples {
            split,
            video,
            prompts,
            diversity: Vec::new(),
            generation_s: 0.0,
        }
    }

    fn noise(frames: &[RgbImage], rng: &mut WorldRng) -> Vec<RgbImage> {
        use rand::Rng;
        frames
            .iter()
            .map(|f| RgbImage::from_fn(f.width(), f.height(), |_, _| image::Rgb(rng.random())))
            .collect()
    }

    #[test]
    fn scoring_separates_ground_truth_from_noise() {
        let groups = vec![
            rendered(Split::Train, false, 24, 1, 1),
            rendered(Split::HeldOut, false, 24, 1, 2),
            rendered(Split::Train, true, 6, 2, 3),
            rendered(Split::HeldOut, true, 6, 1, 4),
        ];
        let truth = score(&groups, 7, 4);
        for row in &truth.rows {
            assert!(row.pass_rate.is_some_and(|p| p >= 0.95), "{row:?}");
            assert!(row.soft_score.is_some_and(|s| s >= 0.9), "{row:?}");
            assert!(row.samples_per_s.is_none());
            assert_eq!(row.nfe_per_sample, 4);
        }
        let all = truth.rows.last().expect("rows");
        assert_eq!(
            (all.name.as_str(), all.prompts, all.samples),
            ("all", 60, 66)
        );
        let motion = &all.categories[5];
        assert_eq!(motion.category, Category::Motion);
        assert!(motion.prompts > 0 && motion.pass_rate.is_some_and(|p| p >= 0.95));
        // Only the video group with two samples per prompt has a diversity.
        assert!(truth.rows[2].diversity.is_some() && truth.rows[0].diversity.is_none());

        let mut rng = WorldRng::seed_from_u64(5);
        let mut noisy = groups.clone();
        for g in &mut noisy {
            for p in &mut g.prompts {
                for s in &mut p.samples {
                    *s = noise(s, &mut rng);
                }
            }
        }
        let junk = score(&noisy, 7, 4);
        for (t, n) in truth.rows.iter().zip(&junk.rows) {
            assert!(n.pass_rate.is_some_and(|p| p <= 0.05), "{n:?}");
            assert!(n.soft_score < t.soft_score, "{n:?}");
        }
        // Images: 48 samples in 91 dimensions is a rough FD, but noise is far off.
        let (fd_t, fd_n) = (
            truth.rows[4].frechet_distance.expect("fd"),
            junk.rows[4].frechet_distance.expect("fd"),
        );
        assert_eq!(truth.rows[4].name, "in-distribution");
        assert!(fd_n > 10.0 * fd_t, "{fd_t} vs {fd_n}");
        // Passing samples list nothing seen; failed ones list what their first frame holds.
        assert!(truth
            .samples
            .iter()
            .filter(|s| s.pass)
            .all(|s| s.seen.is_empty()));
    }

    #[test]
    fn a_failed_sample_says_what_was_seen() {
        // A red circle scored against a prompt for a red cross: the miss names the circle.
        let drawn = world::parse("a large red circle on a black background").expect("prompt");
        let asked = world::parse("a large red cross on a black background").expect("prompt");
        let frames = world::render(&drawn, &mut WorldRng::seed_from_u64(1));
        let group = GroupSamples {
            split: Split::Train,
            video: false,
            prompts: vec![PromptSamples {
                spec: asked,
                seeds: Vec::new(),
                samples: vec![frames],
            }],
            diversity: Vec::new(),
            generation_s: 0.0,
        };
        let scores = score(&[group], 7, 1);
        let sample = &scores.samples[0];
        assert!(!sample.pass);
        assert_eq!(sample.seen.len(), 1, "{:?}", sample.seen);
        assert!(
            sample.seen[0].starts_with("red circle (shape IoU 0.9"),
            "{:?}",
            sample.seen
        );
    }

    #[test]
    fn bad_options_are_errors_not_panics() {
        let model = LoadedModel::random(&manifest(), 0, &Device::Cpu).expect("random model");
        let bad = [
            EvalOptions {
                steps: Some(0),
                ..EvalOptions::default()
            },
            EvalOptions {
                guidance: Some(f32::NAN),
                ..EvalOptions::default()
            },
            EvalOptions {
                image_prompts: 0,
                video_prompts: 0,
                ..EvalOptions::default()
            },
            EvalOptions {
                diversity_samples: 1,
                ..EvalOptions::default()
            },
        ];
        for opts in bad {
            assert!(evaluate(&model, &opts).is_err(), "{opts:?}");
        }
        let err = load_model(
            Path::new("no-such-dir"),
            "tiny-shapes",
            None,
            true,
            &Device::Cpu,
        )
        .err()
        .expect("missing models dir");
        assert!(err.to_string().contains("tiny-shapes"), "{err}");
    }
}
