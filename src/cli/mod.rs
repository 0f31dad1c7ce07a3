//! Command-line interface: one subcommand per user-facing task.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::ServerConfig;

mod bench;
pub use bench::BenchArgs;

#[derive(Debug, Parser)]
#[command(
    name = "fewstep",
    version,
    about = "Serve and distill few-step diffusion models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the configured models over HTTP.
    Serve(ServeArgs),
    /// Generate one image or video to a file, through the same engine as the server.
    Generate(GenerateArgs),
    /// Print the OpenAPI document.
    Openapi,
    /// List the models under the models directory.
    Models(ModelsArgs),
    /// Distill a few-step student from a teacher (DMD2 or AMD), or refine a served student.
    Distill(DistillArgs),
    /// Train the built-in tiny-shapes teacher on ShapesWorld.
    TrainTeacher(TrainTeacherArgs),
    /// Measure the denoiser and the server on this machine.
    Bench(BenchArgs),
    /// Score a model on fixed ShapesWorld prompt sets (GenEval-style pass rates, FD, diversity).
    Eval(EvalArgs),
    /// Plot numeric fields of a metrics.jsonl log against step.
    Plot(PlotArgs),
    /// Print ShapesWorld prompts of a split (what the simulated users of load-tests/ ask).
    Prompts(PromptsArgs),
    /// Score media against prompts with the ShapesWorld verifier (JSON lines in and out).
    Verify(VerifyArgs),
}

/// Flags shared by `serve` and `generate`; each overrides the config file and environment.
#[derive(Debug, clap::Args, Default)]
pub struct ServerFlags {
    /// TOML config file (keys as in `ServerConfig`; `FEWSTEP_*` variables override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Directory holding `<model>/manifest.toml` or `<model>.toml`.
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Models to load (comma-separated): names under the models directory or manifest paths
    /// (`*.toml`); the first is the default.
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    /// Serve random weights where a model's weights file is missing (development, tests).
    #[arg(long)]
    pub allow_random_weights: bool,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (`HOST:PORT`; port 0 picks a free port). Default 127.0.0.1:8080.
    #[arg(long)]
    pub addr: Option<String>,
    #[command(flatten)]
    pub server: ServerFlags,
    /// Jobs that may wait before new requests get 429.
    #[arg(long)]
    pub queue_capacity: Option<usize>,
    /// Bearer API keys (comma-separated); none = open.
    #[arg(long, value_delimiter = ',')]
    pub api_keys: Option<Vec<String>>,
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// What to draw.
    pub prompt: String,
    /// Output file; the extension picks the format (png, jpg, webp, gif, apng).
    #[arg(short, long, default_value = "out.png")]
    pub out: PathBuf,
    /// The model to use (a name or manifest path; default: the first configured model).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub steps: Option<u32>,
    #[arg(long)]
    pub guidance: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Frames (1 = image).
    #[arg(long, default_value_t = 1)]
    pub frames: u32,
    #[command(flatten)]
    pub server: ServerFlags,
}

#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    #[arg(long, default_value = "models", env = "FEWSTEP_MODELS_DIR")]
    pub models_dir: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct TrainTeacherArgs {
    /// Run directory: checkpoint, weights, tokenizer, metrics.jsonl, loss.png.
    #[arg(long, default_value = "runs/teacher")]
    pub out: PathBuf,
    /// Continue from `<out>/checkpoint.safetensors`.
    #[arg(long)]
    pub resume: bool,
    /// JSON file with a full `TeacherConfig` (see `--print-config`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the default config as JSON and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Warm-start a new run from these weights (e.g. a shipped teacher); parameters the file
    /// lacks, such as a newly added refiner, keep their initialization.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    #[arg(long)]
    pub iterations: Option<u64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, clap::Args)]
pub struct DistillArgs {
    /// Model to start from: a teacher, or a served student whose manifest names its teacher.
    #[arg(long, default_value = "tiny-shapes-teacher")]
    pub model: String,
    #[arg(long, default_value = "models", env = "FEWSTEP_MODELS_DIR")]
    pub models_dir: PathBuf,
    #[arg(long, value_enum)]
    pub method: Option<crate::distill::Method>,
    /// Steps of the student's sampler.
    #[arg(long)]
    pub student_steps: Option<usize>,
    /// Training iterations.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Run directory: checkpoint, metrics.jsonl, plots, eval, and the student as a model
    /// directory `<out>/<name>/`.
    #[arg(long)]
    pub out: PathBuf,
    /// Prompt file, one per line (default: the world's training grammar).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Continue from `<out>/checkpoint.safetensors`.
    #[arg(long)]
    pub resume: bool,
    /// TOML file with `DistillConfig` keys (see `--print-config`); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    #[arg(long)]
    pub seed: Option<u64>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Image prompts per split in the final eval (0 skips the eval).
    #[arg(long, default_value_t = 64)]
    pub eval_prompts: usize,
    /// Video prompts per split in the final eval.
    #[arg(long, default_value_t = 16)]
    pub eval_video_prompts: usize,
    /// Prompts per split and modality in the eval's diversity set (4 samples each).
    #[arg(long, default_value_t = 8)]
    pub eval_diversity_prompts: usize,
    /// Train on a server's generation log (`sqlite://PATH` or `postgres://...`): its prompts,
    /// oversampling low-rated ones, and a reward fitted to its feedback.
    #[arg(long)]
    pub from_log: Option<String>,
    /// With --from-log: only generations since this time (RFC 3339, e.g. 2026-11-27T08:00:00Z,
    /// or Unix milliseconds).
    #[arg(long, requires = "from_log")]
    pub since: Option<String>,
    /// With --from-log: rated outputs needed to fit the `logged` reward head.
    #[arg(long, default_value_t = 32, requires = "from_log")]
    pub min_feedback: usize,
    /// With --from-log: extra weight of a prompt rated 0 (`1 + x * (1 - mean score)`).
    #[arg(long, default_value_t = 2.0, requires = "from_log")]
    pub oversample: f64,
    /// Reload the student into this running server when training ends (its admin route).
    #[arg(long)]
    pub publish: Option<String>,
    /// Admin token for --publish.
    #[arg(long, env = "FEWSTEP_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// With --publish: serve the student as a canary to this share of new generations (in
    /// (0, 1]) until promoted or rolled back, instead of to all traffic at once.
    #[arg(long, requires = "publish")]
    pub canary: Option<f64>,
}

/// Unix milliseconds from RFC 3339 (UTC `Z` or an offset) or a plain integer.
fn parse_since(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| {
            format!("--since {s:?}: use RFC 3339 (2026-11-27T08:00:00Z) or Unix ms")
        })?;
    Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[arg(long, default_value = "tiny-shapes")]
    pub model: String,
    #[arg(long, default_value = "models", env = "FEWSTEP_MODELS_DIR")]
    pub models_dir: PathBuf,
    /// Safetensors weights to evaluate instead of the manifest's file (e.g. a run's EMA).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Evaluate random weights when the manifest's weights file is missing.
    #[arg(long)]
    pub allow_random_weights: bool,
    /// Sampler steps (default: the manifest's default_steps).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance weight (default: the manifest's default_guidance); above 1 runs CFG.
    #[arg(long)]
    pub cfg: Option<f32>,
    /// Output directory (default: runs/eval/<model>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Image prompts per split.
    #[arg(long, default_value_t = 96)]
    pub image_prompts: usize,
    /// Video prompts per split.
    #[arg(long, default_value_t = 32)]
    pub video_prompts: usize,
    #[arg(long, default_value_t = 1)]
    pub samples_per_prompt: usize,
    /// Prompts per split and modality in the diversity set (4 samples each; 0 skips it, which
    /// makes a quick check of a checkpoint about twice as fast).
    #[arg(long, default_value_t = 8)]
    pub diversity_prompts: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Run the quick diagnostics instead of the full eval (minutes, not an hour): the
    /// from-noise shape hit per shape, the wrong-shape-input hit, the velocity change per
    /// prompt word, the attention mass per word, shapes beside another object, and (for video
    /// models) whether motion words are drawn and read. Writes `probe.json`.
    #[arg(long)]
    pub probe: bool,
    /// Samples per shape for `--probe` (half as many clips per motion word).
    #[arg(long, default_value_t = 24)]
    pub probe_samples: usize,
    /// Noise level the wrong-shape probe starts from.
    #[arg(long, default_value_t = 0.6)]
    pub probe_t0: f32,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SplitArg {
    Train,
    HeldOut,
}

#[derive(Debug, clap::Args)]
pub struct PromptsArgs {
    #[arg(long, value_enum, default_value = "train")]
    pub split: SplitArg,
    #[arg(long, default_value_t = 20)]
    pub n: usize,
    /// Video prompts (with motions) instead of image prompts.
    #[arg(long)]
    pub video: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// JSON lines `{"prompt", "media_type", "data" (base64)}` or `{"prompt", "path"}`; `-`
    /// reads stdin. Prints one `{"prompt", "pass", "score", "failures"}` (or `{"error"}`) per
    /// line.
    #[arg(long, default_value = "-")]
    pub jsonl: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// A metrics.jsonl log (one JSON object with a `step` per line).
    #[arg(long)]
    pub metrics: PathBuf,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// Fields to plot (comma-separated); default: every numeric field.
    #[arg(long, value_delimiter = ',')]
    pub fields: Vec<String>,
}

/// Writes `text` to stdout; a reader that closed the pipe early (`fewstep openapi | head`) ends
/// the command quietly instead of panicking as `println!` does.
fn print_piped(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    init_tracing();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Generate(args) => generate(args),
        Command::Openapi => print_piped(&crate::api::openapi::spec_json()),
        Command::Models(args) => models(args),
        Command::TrainTeacher(args) => train_teacher(args),
        Command::Distill(args) => distill(args),
        Command::Bench(args) => bench::bench(args),
        Command::Eval(args) => eval(args),
        Command::Prompts(args) => {
            let split = match args.split {
                SplitArg::Train => crate::world::Split::Train,
                SplitArg::HeldOut => crate::world::Split::HeldOut,
            };
            for spec in crate::world::prompt_set(split, args.n, args.seed, args.video) {
                println!("{}", crate::world::prompt(&spec));
            }
            Ok(())
        }
        Command::Verify(args) => verify(args),
        Command::Plot(args) => {
            let fields: Vec<&str> = args.fields.iter().map(String::as_str).collect();
            crate::eval::plot_jsonl(&args.metrics, &args.out, &fields)
        }
    }
}

fn eval(args: EvalArgs) -> anyhow::Result<()> {
    let device = crate::config::parse_device(&args.device)?;
    let model = crate::eval::load_model(
        &args.models_dir,
        &args.model,
        args.weights.as_deref(),
        args.allow_random_weights,
        &device,
    )?;
    let out = args
        .out
        .unwrap_or_else(|| PathBuf::from("runs/eval").join(&args.model));
    if args.probe {
        let tiny = model
            .family_model::<crate::families::tiny::TinyModel>()
            .context("--probe needs a tiny-family model (it probes ShapesWorld prompts)")?;
        let s = &model.manifest.sampling;
        let opts = crate::eval::probe::ProbeOptions {
            samples_per_shape: args.probe_samples,
            sampler: s.params(
                args.steps.unwrap_or(s.default_steps),
                args.cfg.unwrap_or(s.default_guidance),
            ),
            t0: args.probe_t0,
            seed: args.seed,
        };
        let report = crate::eval::probe::probe(tiny, &opts)?;
        std::fs::create_dir_all(&out)?;
        let path = out.join("probe.json");
        crate::util::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
        println!("{}", report.summary());
        println!("wrote {}", path.display());
        return Ok(());
    }
    let opts = crate::eval::EvalOptions {
        steps: args.steps,
        guidance: args.cfg,
        image_prompts: args.image_prompts,
        video_prompts: args.video_prompts,
        samples_per_prompt: args.samples_per_prompt,
        diversity_prompts: args.diversity_prompts,
        seed: args.seed,
        out_dir: Some(out.clone()),
        ..Default::default()
    };
    let report = crate::eval::evaluate(&model, &opts)?;
    println!("{}", report.markdown());
    println!("wrote {}", out.display());
    Ok(())
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    use base64::Engine as _;
    use std::io::{BufRead, Write};
    let input: Box<dyn BufRead> = if args.jsonl.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(&args.jsonl)
                .with_context(|| format!("opening {}", args.jsonl.display()))?,
        ))
    };
    let one = |line: &str| -> anyhow::Result<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let prompt = v["prompt"].as_str().context("missing \"prompt\"")?;
        let bytes = match (v["data"].as_str(), v["path"].as_str()) {
            (Some(d), _) => base64::engine::general_purpose::STANDARD.decode(d)?,
            (None, Some(p)) => std::fs::read(p).with_context(|| format!("reading {p}"))?,
            (None, None) => anyhow::bail!("need \"data\" (base64) or \"path\""),
        };
        let media_type = v["media_type"].as_str().unwrap_or("image/png");
        let frames = crate::media::decode(&bytes, media_type)?;
        let verdict = crate::reward::VerifierReward::verdict(prompt, &frames)?;
        Ok(serde_json::json!({
            "prompt": prompt,
            "pass": verdict.pass,
            "score": verdict.score,
            "failures": verdict.failures,
        }))
    };
    let mut out = std::io::stdout().lock();
    for line in input.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let row = one(&line).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }));
        writeln!(out, "{row}")?;
    }
    Ok(())
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn server_config(flags: &ServerFlags, extra: serde_json::Value) -> anyhow::Result<ServerConfig> {
    let mut overrides = serde_json::Map::new();
    if let Some(d) = &flags.models_dir {
        overrides.insert("models_dir".into(), serde_json::json!(d));
    }
    if let Some(m) = &flags.models {
        overrides.insert("models".into(), serde_json::json!(m));
    }
    if flags.allow_random_weights {
        overrides.insert("allow_random_weights".into(), true.into());
    }
    if let serde_json::Value::Object(extra) = extra {
        overrides.extend(extra);
    }
    Ok(ServerConfig::load(
        flags.config.as_deref(),
        serde_json::Value::Object(overrides),
    )?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut extra = serde_json::Map::new();
    if let Some(a) = args.addr {
        extra.insert("addr".into(), a.into());
    }
    if let Some(q) = args.queue_capacity {
        extra.insert("queue_capacity".into(), q.into());
    }
    if let Some(k) = args.api_keys {
        extra.insert("api_keys".into(), serde_json::json!(k));
    }
    let config = server_config(&args.server, serde_json::Value::Object(extra))?;
    crate::alloc::set_freed_pages(crate::alloc::FreedPages::from_ms(
        config.return_free_memory_ms,
    ));
    runtime()?.block_on(async move {
        let handle = crate::server::spawn(config, crate::server::termination_signal()).await?;
        handle.wait().await
    })
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    // Only the model asked for is loaded.
    let only = match &args.model {
        Some(m) => serde_json::json!({ "models": [m] }),
        None => serde_json::json!({}),
    };
    let config = server_config(&args.server, only)?;
    let ext = args
        .out
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("png")
        .to_ascii_lowercase();
    let format = match ext.as_str() {
        "png" => crate::media::OutputFormat::Png,
        "jpg" | "jpeg" => crate::media::OutputFormat::Jpeg,
        "webp" => crate::media::OutputFormat::Webp,
        "gif" => crate::media::OutputFormat::Gif,
        "apng" => crate::media::OutputFormat::Apng,
        "mp4" => crate::media::OutputFormat::Mp4,
        other => anyhow::bail!("unsupported output extension .{other}"),
    };
    let device = config.device()?;
    let models = crate::server::load_models(&config, &device)?;
    let name = models[0].manifest.name.clone();
    let engine = crate::engine::Engine::start(models, 1, device);
    let card = engine
        .card(&name)
        .with_context(|| format!("model {name} is not loaded"))?;
    let req = crate::engine::GenerationRequest {
        prompt: args.prompt,
        n: Some(1),
        num_frames: Some(args.frames),
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        output_format: Some(format),
        ..Default::default()
    };
    let v = crate::engine::validate(req, &card, &config)
        .map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
    let jobs = crate::engine::Jobs::new(
        engine.clone(),
        crate::engine::JobsConfig::from_server(&config),
        None,
    );
    let result = runtime()?.block_on(async {
        let cell = jobs.submit(v.clone(), Default::default())?.cell;
        jobs.wait(&cell.id).await
    })?;
    crate::util::write_atomic(&args.out, &result.encoded[0])?;
    engine.shutdown(std::time::Duration::from_secs(5));
    tracing::info!(
        out = %args.out.display(), seed = v.seed(), version = %result.output.model_version,
        steps = v.steps, "wrote output"
    );
    Ok(())
}

fn models(args: ModelsArgs) -> anyhow::Result<()> {
    let list = crate::manifest::Manifest::list(&args.models_dir)?;
    println!(
        "{:<24} {:<6} {:<8} {:<7} {:<10} weights",
        "model", "family", "sampler", "steps", "frames"
    );
    for m in list {
        let weights = m.weights_path();
        let state = if weights.exists() {
            "present"
        } else {
            "MISSING"
        };
        println!(
            "{:<24} {:<6} {:<8} {:<7} {:<10} {} ({state})",
            m.name,
            m.family().to_string(),
            format!("{:?}", m.sampling.sampler).to_lowercase(),
            m.sampling.default_steps,
            format!("{:?}", m.serving.frames),
            weights.display()
        );
    }
    Ok(())
}

fn train_teacher(args: TrainTeacherArgs) -> anyhow::Result<()> {
    use crate::train::teacher::{train_teacher, TeacherConfig};
    if args.print_config {
        println!(
            "{}",
            serde_json::to_string_pretty(&TeacherConfig::default())?
        );
        return Ok(());
    }
    let mut config = match &args.config {
        Some(p) => serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => TeacherConfig::default(),
    };
    if let Some(i) = args.iterations {
        config.iterations = i;
    }
    if let Some(s) = args.seed {
        config.seed = s;
    }
    config
        .validate()
        .map_err(anyhow::Error::msg)
        .context("checking the teacher configuration")?;
    let device = crate::config::parse_device(&args.device)?;
    let bar = progress_bar(config.iterations)?;
    let init = args.init_from.as_deref();
    let weights = train_teacher(
        &config,
        &args.out,
        args.resume,
        init,
        &device,
        |step, loss| {
            bar.set_position(step);
            bar.set_message(format!("loss {loss:.4}"));
        },
    )?;
    bar.finish();
    println!("weights: {}", weights.display());
    Ok(())
}

/// The training commands' progress bar: elapsed, bar, count, ETA and a live message.
fn progress_bar(len: u64) -> anyhow::Result<indicatif::ProgressBar> {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} ({eta} left) {msg}",
        )?
        .progress_chars("=> "),
    );
    Ok(bar)
}

fn distill(args: DistillArgs) -> anyhow::Result<()> {
    use crate::distill::{load_config, run, DistillConfig, RunOptions};
    let mut config = match &args.config {
        Some(p) => load_config(p)?,
        None => DistillConfig::default(),
    };
    if let Some(m) = args.method {
        config.method = m;
    }
    if let Some(n) = args.student_steps {
        config.student_steps = n;
    }
    if let Some(n) = args.steps {
        config.iterations = n;
    }
    if let Some(s) = args.seed {
        config.seed = s;
    }
    if args.print_config {
        print!("{}", toml::to_string(&config)?);
        return Ok(());
    }
    let device = crate::config::parse_device(&args.device)?;
    let eval = (args.eval_prompts > 0).then(|| crate::eval::EvalOptions {
        image_prompts: args.eval_prompts,
        video_prompts: args.eval_video_prompts,
        diversity_prompts: args.eval_diversity_prompts,
        ..Default::default()
    });
    let from_log = match &args.from_log {
        Some(url) => Some(crate::distill::run::LogSource {
            url: url.clone(),
            since_ms: args
                .since
                .as_deref()
                .map(parse_since)
                .transpose()?
                .unwrap_or(0),
            min_feedback: args.min_feedback,
            oversample: args.oversample,
        }),
        None => None,
    };
    if let Some(share) = args.canary {
        anyhow::ensure!(
            share > 0.0 && share <= 1.0,
            "--canary must be a share of traffic in (0, 1], got {share}"
        );
    }
    let publish = match (&args.publish, &args.admin_token) {
        (Some(url), Some(token)) => Some(crate::distill::run::Publish {
            url: url.clone(),
            admin_token: token.clone(),
            canary: args.canary,
        }),
        (Some(_), None) => anyhow::bail!("--publish needs --admin-token or FEWSTEP_ADMIN_TOKEN"),
        (None, _) => None,
    };
    let opts = RunOptions {
        from_log,
        publish,
        models_dir: args.models_dir,
        model: args.model,
        out: args.out.clone(),
        prompts: args.prompts,
        resume: args.resume,
        config,
        eval,
    };
    let bar = progress_bar(opts.config.iterations)?;
    let mut last_gen = None;
    let out = run(&opts, &device, |s, _| {
        bar.set_position(s.iteration);
        if let Some(g) = &s.generator {
            last_gen = Some(g.loss);
        }
        bar.set_message(format!(
            "reward {:.3}  critic {:.4}  generator {}",
            s.reward_mean,
            s.critic_loss,
            last_gen.map_or("-".into(), |l| format!("{l:.4}"))
        ));
    })?;
    bar.finish();
    if let Some(report) = &out.report {
        println!("{}", report.markdown());
    }
    println!(
        "student: {} (serve it with --models-dir {} --models {})",
        out.student_dir.display(),
        args.out.display(),
        out.manifest.name
    );
    Ok(())
}
