//! `fewstep distill`: builds the players from model manifests, runs DMD2/AMD with a metrics
//! log, plots and atomic checkpoints, exports the student as a servable model directory, and
//! evaluates it.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::{DistillConfig, Method};
use super::family::DistillFamily;
use super::prompts::PromptSource;
use super::trainer::{Distiller, IterStats};
use crate::eval::{EvalOptions, EvalReport};
use crate::manifest::{LoadedModel, Manifest};
use crate::pipeline::SamplerKind;

/// What to distill and where.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub models_dir: PathBuf,
    /// The model to start from: a teacher, or a served student whose manifest names its
    /// teacher (then the student continues from its current weights).
    pub model: String,
    pub out: PathBuf,
    /// Prompt file (one per line); `None` draws from the world's training grammar.
    pub prompts: Option<PathBuf>,
    pub resume: bool,
    pub config: DistillConfig,
    /// Evaluation of the exported student (`None` skips it).
    pub eval: Option<EvalOptions>,
    /// Train on the server's generation log instead of `prompts` or the grammar.
    pub from_log: Option<LogSource>,
    /// A running server whose model is reloaded with the student when training ends.
    pub publish: Option<Publish>,
}

/// `--from-log`: where the log is and which part of it to use.
#[derive(Debug, Clone)]
pub struct LogSource {
    /// `sqlite://...` or `postgres://...`, as in the server's `store_url`.
    pub url: String,
    /// Only generations at or after this Unix time (milliseconds).
    pub since_ms: i64,
    /// Rated outputs (with kept media) needed to fit the `logged` reward head.
    pub min_feedback: usize,
    /// Extra weight of a prompt rated 0 (`1 + oversample * (1 - mean score)`).
    pub oversample: f64,
}

/// `--publish`: the server to hot-swap the student into.
#[derive(Debug, Clone)]
pub struct Publish {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub admin_token: String,
    /// Publish as a canary taking this share of new generations.
    pub canary: Option<f64>,
}

/// One logged interval of `metrics.jsonl` (`step` is the iteration).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DistillLog {
    pub step: u64,
    pub generator_loss: Option<f64>,
    pub critic_loss: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub forbidden_frac: f64,
    pub repulsion_low: Option<f64>,
    pub repulsion_high: Option<f64>,
    pub h_abs: Option<f64>,
    pub lr_student: Option<f64>,
    pub lr_critic: f64,
    pub grad_norm_student: Option<f64>,
    pub grad_norm_critic: f64,
    pub gan_d_loss: Option<f64>,
    pub gan_g_loss: Option<f64>,
    pub samples_per_s: f64,
}

/// The plots written beside the log: file name and the fields in it.
const PLOTS: &[(&str, &[&str])] = &[
    (
        "losses.png",
        &["generator_loss", "critic_loss", "gan_d_loss", "gan_g_loss"],
    ),
    (
        "reward.png",
        &["reward_mean", "reward_std", "forbidden_frac"],
    ),
    (
        "repulsion.png",
        &["repulsion_low", "repulsion_high", "h_abs"],
    ),
    (
        "optim.png",
        &[
            "lr_student",
            "lr_critic",
            "grad_norm_student",
            "grad_norm_critic",
        ],
    ),
    ("speed.png", &["samples_per_s"]),
];

/// Writes the [`PLOTS`], each with the fields that have values (the GAN's only when it is on).
fn plot_metrics(log_path: &Path, dir: &Path) {
    let text = std::fs::read_to_string(log_path).unwrap_or_default();
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for (file, fields) in PLOTS {
        let present: Vec<&str> = fields
            .iter()
            .copied()
            .filter(|f| rows.iter().any(|r| r[*f].is_number()))
            .collect();
        if present.is_empty() {
            continue;
        }
        if let Err(e) = crate::eval::plot_jsonl(log_path, &dir.join(file), &present) {
            tracing::warn!(plot = file, error = %e, "could not plot");
        }
    }
}

/// Averages of the iterations since the last log line.
#[derive(Default)]
struct Window {
    stats: Vec<IterStats>,
    start: Option<Instant>,
}

fn mean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = xs.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

impl Window {
    fn push(&mut self, s: IterStats) {
        self.start.get_or_insert_with(Instant::now);
        self.stats.push(s);
    }

    fn flush(&mut self) -> DistillLog {
        let s = std::mem::take(&mut self.stats);
        let elapsed = self
            .start
            .take()
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        let wall = elapsed.max(s.iter().map(|x| x.seconds).sum::<f64>());
        let gens: Vec<_> = s.iter().filter_map(|x| x.generator.as_ref()).collect();
        let all = |f: fn(&IterStats) -> f64| mean(s.iter().map(f)).unwrap_or(0.0);
        DistillLog {
            step: s.last().map_or(0, |x| x.iteration),
            generator_loss: mean(gens.iter().map(|g| g.loss)),
            critic_loss: all(|x| x.critic_loss),
            reward_mean: all(|x| x.reward_mean),
            reward_std: all(|x| x.reward_std),
            forbidden_frac: all(|x| x.forbidden),
            repulsion_low: mean(gens.iter().filter_map(|g| g.repulsion_low)),
            repulsion_high: mean(gens.iter().filter_map(|g| g.repulsion_high)),
            h_abs: mean(gens.iter().map(|g| g.h_abs)),
            lr_student: mean(gens.iter().map(|g| g.step.lr)),
            lr_critic: all(|x| x.critic.lr),
            grad_norm_student: mean(gens.iter().map(|g| g.step.grad_norm)),
            grad_norm_critic: all(|x| x.critic.grad_norm),
            gan_d_loss: mean(s.iter().filter_map(|x| x.gan_d_loss)),
            gan_g_loss: mean(gens.iter().filter_map(|g| g.gan_g_loss)),
            samples_per_s: s.iter().map(|x| x.samples).sum::<usize>() as f64 / wall.max(1e-9),
        }
    }
}

/// Reads a TOML config over the defaults: every key left out (also inside a table such as
/// `[student_optim]`) keeps its default.
pub fn load_config(path: &Path) -> anyhow::Result<DistillConfig> {
    use figment::providers::{Format, Serialized, Toml};
    anyhow::ensure!(path.is_file(), "config file {} not found", path.display());
    figment::Figment::from(Serialized::defaults(DistillConfig::default()))
        .merge(Toml::file(path))
        .extract()
        .with_context(|| format!("parsing {}", path.display()))
}

/// Runs one async task (the store, an HTTP call) from this synchronous command.
fn block_on<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(fut)
}

/// The name a first student gets: `tiny-shapes-teacher` -> `tiny-shapes`.
fn student_name(model: &Manifest) -> String {
    match (&model.teacher, model.name.strip_suffix("-teacher")) {
        (Some(_), _) => model.name.clone(),
        (None, Some(base)) => base.to_string(),
        (None, None) => format!("{}-student", model.name),
    }
}

/// The teacher as this run's family builds it, with the student's schedule (its step times
/// and re-noising levels come from it): `student_shift` for a first student, else the
/// teacher's. A served student that is continued keeps its own, even where the teacher's
/// sampling has moved since it was distilled: otherwise a refinement would silently train and
/// ship it at other times than it was made for (and `student_shift` may not move it).
fn with_student_schedule(
    mut teacher: Manifest,
    model: &Manifest,
    student_shift: Option<f32>,
) -> anyhow::Result<Manifest> {
    let (t, own) = (&mut teacher.sampling, &model.sampling);
    if model.teacher.is_none() {
        if let Some(shift) = student_shift {
            t.shift = shift;
        }
        return Ok(teacher);
    }
    if let Some(shift) = student_shift.filter(|s| *s != own.shift) {
        anyhow::bail!(
            "{} samples images at shift {}, and student_shift {shift} would move it; \
             distill a new student from the teacher instead",
            model.name,
            own.shift
        );
    }
    t.shift = own.shift;
    t.video_shift = own.video_shift;
    t.timesteps = own.timesteps.clone();
    Ok(teacher)
}

/// The manifest of an exported student: the teacher's architecture and serving limits, the
/// few-step sampler without CFG, and a pointer back to the teacher (the family names its
/// files when it writes them).
fn student_manifest(teacher: &Manifest, name: String, cfg: &DistillConfig) -> Manifest {
    let n = cfg.student_steps;
    let mut m = teacher.clone();
    m.name = name;
    m.description = format!(
        "{n}-step {} student of {}",
        match cfg.method {
            Method::Amd => "AMD",
            Method::Dmd2 => "DMD2",
        },
        teacher.name
    );
    m.sampling.sampler = SamplerKind::Student;
    m.sampling.default_steps = n;
    m.sampling.allowed_steps = (1..=n).collect();
    m.sampling.default_guidance = 1.0;
    // A teacher's own timestep list only fits a student with as many steps (the trainer
    // uses trailing spacing otherwise, and so must the server).
    if m.sampling.timesteps.as_ref().is_some_and(|l| l.len() != n) {
        m.sampling.timesteps = None;
    }
    m.sampling.max_guidance = 1.0;
    // A student runs without CFG, so the teacher's guidance interval means nothing to it.
    m.sampling.guidance_interval = None;
    // Nor does a teacher's ancestral `eta` (the student sampler re-noises afresh).
    m.sampling.eta = None;
    m.teacher = Some(teacher.name.clone());
    m
}

/// Reads the log: the weighted prompt distribution and the `logged` reward (or its base when
/// too few outputs were rated). Writes what it used to `<out>/log-source.json`.
fn from_log(
    src: &LogSource,
    config: &DistillConfig,
    model: &str,
    dir: &Path,
    device: &Device,
) -> anyhow::Result<(Box<dyn crate::reward::Reward>, PromptSource)> {
    let (stats, rated) = block_on(async {
        let store = crate::store::Store::connect(&src.url).await?;
        let stats = store.prompt_stats(src.since_ms, Some(model)).await?;
        let rated = store.rated_outputs(src.since_ms).await?;
        anyhow::Ok((stats, rated))
    })?;
    let base = crate::reward::load(&config.reward, config.reward_path.as_deref(), device)?;
    let (reward, fit) = crate::reward::LoggedReward::fit(base, &rated, src.min_feedback);
    let (prompts, summary) = PromptSource::from_log(&stats, &reward, src.oversample)?;
    match fit.used.as_str() {
        "logged" => {
            tracing::info!(rows = fit.rows, r2 = ?fit.train_r2, "reward: a head fitted to logged feedback")
        }
        base => tracing::warn!(
            rows = fit.rows,
            needed = fit.min_rows,
            "reward: too few rated outputs with kept media; using the {base} proxy alone"
        ),
    }
    tracing::info!(
        prompts = summary.prompts,
        rated = summary.rated_prompts,
        skipped = summary.skipped,
        "prompts from the generation log"
    );
    std::fs::create_dir_all(dir)?;
    crate::util::write_atomic(
        &dir.join("log-source.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "prompts": summary,
            "reward": fit,
            "since_ms": src.since_ms,
        }))?
        .as_bytes(),
    )?;
    Ok((Box::new(reward), prompts))
}

/// Asks a running server to load the exported student (its admin reload route).
fn publish(p: &Publish, manifest: &Manifest) -> anyhow::Result<()> {
    let weights = std::fs::canonicalize(manifest.weights_path())?;
    let url = format!(
        "{}/admin/models/{}/reload",
        p.url.trim_end_matches('/'),
        manifest.name
    );
    let body: serde_json::Value = block_on(async {
        let res = reqwest::Client::new()
            .post(&url)
            .bearer_auth(&p.admin_token)
            .json(&match p.canary {
                Some(share) => serde_json::json!({ "checkpoint": weights, "canary": share }),
                None => serde_json::json!({ "checkpoint": weights }),
            })
            .send()
            .await
            .with_context(|| format!("publishing to {url}"))?;
        let status = res.status();
        let body: serde_json::Value = res.json().await.unwrap_or_default();
        anyhow::ensure!(status.is_success(), "{url} answered {status}: {body}");
        anyhow::Ok(body)
    })?;
    tracing::info!(%url, version = %body["model_version"], canary = ?p.canary, "published");
    Ok(())
}

/// What a finished run produced.
pub struct RunOutput {
    /// A model directory (`manifest.toml`, weights, tokenizer) that `serve` and `eval` load.
    pub student_dir: PathBuf,
    pub manifest: Manifest,
    pub report: Option<EvalReport>,
}

/// Runs (or resumes) a distillation; `progress` sees every iteration.
pub fn run(
    opts: &RunOptions,
    device: &Device,
    mut progress: impl FnMut(&IterStats, u64),
) -> anyhow::Result<RunOutput> {
    let mut config = opts.config.clone();
    config.validate()?;
    let model = Manifest::find(&opts.models_dir, &opts.model)?;
    let teacher_manifest = match &model.teacher {
        Some(t) => Manifest::find(&opts.models_dir, t)
            .with_context(|| format!("the teacher {t:?} of {}", model.name))?,
        None => model.clone(),
    };
    anyhow::ensure!(
        model.family() == teacher_manifest.family(),
        "{} is a {} model and its teacher {} a {} model",
        model.name,
        model.family(),
        teacher_manifest.name,
        teacher_manifest.family()
    );
    config
        .guidance
        .get_or_insert(teacher_manifest.sampling.default_guidance);
    let teacher_manifest = with_student_schedule(teacher_manifest, &model, config.student_shift)?;
    let dir = &opts.out;
    let (reward, prompts) = match &opts.from_log {
        Some(src) => from_log(src, &config, &model.name, dir, device)?,
        None => {
            let reward =
                crate::reward::load(&config.reward, config.reward_path.as_deref(), device)?;
            let prompts = match &opts.prompts {
                Some(p) => PromptSource::from_file(p, reward.as_ref())?,
                None => PromptSource::Grammar,
            };
            (reward, prompts)
        }
    };

    let checkpoint = dir.join("checkpoint.safetensors");
    if checkpoint.is_file() && !opts.resume {
        anyhow::bail!(
            "{} already holds a run; pass --resume to continue it or choose another --out",
            dir.display()
        );
    }
    let run = Run {
        settings: Settings {
            opts,
            config,
            model: &model,
            teacher: &teacher_manifest,
            checkpoint,
            device,
        },
        reward,
        prompts,
    };
    teacher_manifest.family().distill(run, &mut progress)
}

/// A distillation about to start, handed to the teacher's family (`Family::distill`), which
/// builds its [`DistillFamily`] and calls [`Run::distill`].
pub struct Run<'a> {
    settings: Settings<'a>,
    reward: Box<dyn crate::reward::Reward>,
    prompts: PromptSource,
}

impl Run<'_> {
    /// The model the student's teacher is (what the family builds its frozen teacher from).
    pub fn teacher(&self) -> &Manifest {
        self.settings.teacher
    }

    pub fn device(&self) -> &Device {
        self.settings.device
    }

    /// Trains a student of `family`'s teacher, writes it as a model directory, publishes and
    /// evaluates it.
    pub fn distill<F: DistillFamily>(
        self,
        family: F,
        progress: &mut dyn FnMut(&IterStats, u64),
    ) -> anyhow::Result<RunOutput> {
        let Run {
            settings: run,
            reward,
            prompts,
        } = self;
        // A served student continues from its own weights; a first one from the teacher's.
        let mut family = family;
        let student_init = if run.model.teacher.is_some() {
            family.student_weights(run.model, run.teacher)?
        } else {
            family.teacher_weights().clone()
        };
        let d = run.train(family, &student_init, reward, prompts, progress)?;
        let weights = d.student_weights()?;
        let manifest = run.student_manifest();
        let student_dir = run.opts.out.join(&manifest.name);
        let manifest = d
            .family()
            .write_student(manifest, run.teacher, &student_dir, &weights)?;
        run.finish(student_dir, manifest)
    }
}

/// One run's settings.
struct Settings<'a> {
    opts: &'a RunOptions,
    config: DistillConfig,
    model: &'a Manifest,
    teacher: &'a Manifest,
    checkpoint: PathBuf,
    device: &'a Device,
}

impl Settings<'_> {
    /// Builds the players, resumes, and runs the iterations with log, plots and checkpoints.
    fn train<F: DistillFamily>(
        &self,
        family: F,
        student_init: &HashMap<String, Tensor>,
        reward: Box<dyn crate::reward::Reward>,
        prompts: PromptSource,
        progress: &mut dyn FnMut(&IterStats, u64),
    ) -> anyhow::Result<Distiller<F>> {
        let (config, dir) = (&self.config, &self.opts.out);
        let mut d = Distiller::new(config.clone(), family, student_init, reward, prompts)?;
        // Only now that the players exist: a refused run leaves no directory behind.
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if self.opts.resume && self.checkpoint.is_file() {
            d.load_checkpoint(&self.checkpoint)?;
            tracing::info!(iteration = d.state.iteration, "resumed from checkpoint");
        }
        crate::util::write_atomic(
            &dir.join("config.toml"),
            toml::to_string(config)?.as_bytes(),
        )?;
        tracing::info!(
            teacher = %self.teacher.name,
            from = %self.model.name,
            method = ?config.method,
            steps = config.student_steps,
            guidance = config.guidance,
            guidance_interval = ?config.guidance_interval,
            "distilling"
        );

        let log_path = dir.join("metrics.jsonl");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut window = Window::default();
        while d.state.iteration < config.iterations {
            let stats = d.step()?;
            progress(&stats, config.iterations);
            let it = stats.iteration;
            window.push(stats);
            let last = it == config.iterations;
            if it % config.log_every == 0 || last {
                writeln!(log, "{}", serde_json::to_string(&window.flush())?)?;
                log.flush()?;
            }
            if it % config.checkpoint_every == 0 || last {
                d.save_checkpoint(&self.checkpoint)?;
            }
        }
        plot_metrics(&log_path, dir);
        Ok(d)
    }

    /// The student's manifest, named like the model so that `--models-dir <out>` serves it.
    fn student_manifest(&self) -> Manifest {
        student_manifest(self.teacher, student_name(self.model), &self.config)
    }

    /// Writes the manifest, publishes the student to a running server and evaluates it.
    fn finish(&self, student_dir: PathBuf, manifest: Manifest) -> anyhow::Result<RunOutput> {
        crate::util::write_atomic(
            &student_dir.join("manifest.toml"),
            toml::to_string(&manifest)?.as_bytes(),
        )?;
        let manifest = Manifest::from_file(&student_dir.join("manifest.toml"))?;
        if let Some(p) = &self.opts.publish {
            publish(p, &manifest)?;
        }
        let report = match &self.opts.eval {
            Some(eval) if manifest.family().capabilities().shapes_world => {
                let student = LoadedModel::load(&manifest, self.device)?;
                let eval = EvalOptions {
                    out_dir: Some(self.opts.out.join("eval")),
                    ..eval.clone()
                };
                Some(crate::eval::evaluate(&student, &eval)?)
            }
            Some(_) => {
                tracing::info!(
                    family = %manifest.family(),
                    "the ShapesWorld eval is not for this family; skipped"
                );
                None
            }
            None => None,
        };
        Ok(RunOutput {
            student_dir,
            manifest,
            report,
        })
    }
}

#[cfg(test)]
mod tests;
