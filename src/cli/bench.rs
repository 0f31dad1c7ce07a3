//! `fewstep bench`: the denoiser, the fused ops, the samplers, and the engine against the
//! HTTP server, each measured side by side in one run.

use std::path::PathBuf;

use crate::config::ServerConfig;
use crate::families::tiny::TinySource;

use super::runtime;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Model whose architecture to measure (with its weights, when its weights file exists).
    #[arg(long, default_value = "tiny-shapes")]
    pub model: String,
    #[arg(long, default_value = "models", env = "FEWSTEP_MODELS_DIR")]
    pub models_dir: PathBuf,
    /// Batch sizes for the denoiser measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    pub frames: usize,
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Also measure the bare engine and the HTTP server (loopback) side by side.
    #[arg(long)]
    pub http: bool,
    /// Skip the denoiser (forward/training/MFU) table.
    #[arg(long)]
    pub skip_denoiser: bool,
    /// Sampler steps for the engine and HTTP measurements (default: the model's).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance for the engine and HTTP measurements (default: the model's).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Client concurrencies for the HTTP measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    /// Requests per concurrency level (each level also stops after --max-seconds).
    #[arg(long, default_value_t = 256)]
    pub requests: usize,
    /// With --http: synchronous requests against asynchronous jobs (`Prefer: respond-async`,
    /// then the job's events) at this concurrency, in alternating rounds; 0 skips it.
    #[arg(long, default_value_t = 32)]
    pub sync_vs_async: usize,
    /// With --http: the cost of serving a canary at this concurrency (no canary, a canary
    /// taking all traffic, a canary taking half) in alternating rounds; 0 skips it.
    #[arg(long, default_value_t = 0)]
    pub canary_overhead: usize,
    /// With --http: freed memory kept against returned to the OS after `serve`'s default
    /// delay, at this concurrency, in alternating rounds (throughput and idle RSS); 0 skips it.
    #[arg(long, default_value_t = 0)]
    pub keep_vs_return: usize,
    #[arg(long, default_value_t = 60)]
    pub max_seconds: u64,
    /// Compare end-to-end generation speed of these models (comma-separated; each with its
    /// own sampler, steps and guidance), interleaved in one run; the first is the baseline.
    #[arg(long, value_delimiter = ',')]
    pub compare: Vec<String>,
    /// Also time the fused ops against the composed candle ops they replace.
    #[arg(long)]
    pub ops: bool,
    /// Instead of a model, time this diffusers-layout UNet directory (`config.json` and its
    /// safetensors: SD1.5- or SDXL-shaped) through a `--steps`-step denoising (default 4) at
    /// each of `--batches`. `tools/gpu-bench.sh` and `tools/cpu-bench.sh` run it against
    /// diffusers.
    #[arg(long, value_name = "DIR")]
    pub unet: Option<PathBuf>,
    /// Instead of a model, time this diffusers-layout Wan2.1 directory (`transformer/`,
    /// `vae/`, `scheduler/`; no text encoder: the text states are inputs) through a
    /// `--steps`-step generation (default 4) of `--frames` frames at `--width`x`--height`,
    /// then the VAE's decode, at each of `--batches`. `tools/wan_bench.py` runs it against
    /// diffusers.
    #[arg(long, value_name = "DIR", conflicts_with = "unet")]
    pub wan: Option<PathBuf>,
    /// With --wan: the sampler over the directory's schedule (`student`: the shifted
    /// `[1000, 750, 500, 250]` for 4 steps, re-noised between steps).
    #[arg(long, value_enum, default_value_t = crate::pipeline::SamplerKind::Student)]
    pub sampler: crate::pipeline::SamplerKind,
    /// With --wan: video width and height (multiples of 16).
    #[arg(long, default_value_t = 832)]
    pub width: usize,
    #[arg(long, default_value_t = 480)]
    pub height: usize,
    /// With --wan: the VAE's precision (default --dtype).
    #[arg(long, value_enum)]
    pub vae_dtype: Option<crate::families::sd::WeightDtype>,
    /// With --wan and no --inputs: the prompt tokens of the random text states.
    #[arg(long, default_value_t = 512)]
    pub text_len: usize,
    /// With --unet or --wan: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// With --unet or --wan: the precision of weights and activations.
    #[arg(long, value_enum, default_value_t = crate::families::sd::WeightDtype::F32)]
    pub dtype: crate::families::sd::WeightDtype,
    /// With --unet: latent height and width (128 is a 1024x1024 SDXL image).
    #[arg(long, default_value_t = 64)]
    pub latent_size: usize,
    /// A safetensors file of batch-first inputs; default random. With --unet: `sample`,
    /// `encoder_hidden_states`, and for SDXL `text_embeds`, `time_ids`; with --wan: `latents`,
    /// `prompt_embeds`, with CFG `negative_prompt_embeds`, for the student sampler
    /// `step_noise` `[B, steps - 1, ...]` (see `bench::wan::inputs`); for a tiny model's
    /// denoiser table: `x` `[B, F, C, H, W]` and `t` `[B]` (every row's prompt is
    /// `bench::model::PROMPT`).
    #[arg(long, value_name = "FILE")]
    pub inputs: Option<PathBuf>,
    /// Write outputs of the first batch size here, for a parity check against another
    /// runtime. With --unet: one UNet evaluation (`forward`, at t=999) and the whole denoising
    /// (`denoised`); with --wan: the last round's final `latents` and decoded `video`; for a
    /// tiny model: its `velocity`, the training `loss` and its `grad_norm`.
    #[arg(long, value_name = "FILE")]
    pub outputs: Option<PathBuf>,
    /// Also write the rows (of --unet or --wan, or of the denoiser table) as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// What the tiny model's measurements build on: its source, its tokenizer, and its weights
/// file if there is one (random weights otherwise).
fn tiny_parts<'m>(
    manifest: &'m crate::manifest::Manifest,
    feature: &str,
) -> anyhow::Result<(
    &'m TinySource,
    crate::families::tiny::TinyTokenizer,
    Option<PathBuf>,
)> {
    let tiny = TinySource::of(manifest, feature)?;
    let tokenizer =
        crate::families::tiny::TinyTokenizer::from_file(&tiny.tokenizer_path(&manifest.dir))?;
    let weights = Some(manifest.weights_path()).filter(|p| p.is_file());
    Ok((tiny, tokenizer, weights))
}

pub(super) fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.unet {
        return bench_unet(&args, dir);
    }
    if let Some(dir) = &args.wan {
        return bench_wan(&args, dir);
    }
    let manifest = crate::manifest::Manifest::find(&args.models_dir, &args.model)?;
    let device = candle_core::Device::Cpu;
    if !args.skip_denoiser {
        let (tiny, tokenizer, weights) = tiny_parts(
            &manifest,
            "the denoiser table of fewstep bench (pass --skip-denoiser)",
        )?;
        let loaded = crate::bench::unet::load_inputs(args.inputs.as_deref(), &device)?;
        let setup = crate::bench::model::ModelBenchSetup {
            cfg: &tiny.architecture,
            tokenizer: &tokenizer,
            weights: weights.as_deref(),
            inputs: &loaded,
        };
        if let Some(path) = &args.outputs {
            let batch = args.batches.first().copied().unwrap_or(1);
            let out = crate::bench::model::parity_outputs(&setup, batch, args.frames, &device)?;
            candle_core::safetensors::save(&out, path)?;
        }
        let rows = crate::bench::model::bench_model(
            &setup,
            &args.batches,
            args.frames,
            args.reps,
            &device,
        )?;
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
        }
        match &weights {
            Some(w) => println!("weights {}", w.display()),
            None => println!("random weights (no weights file)"),
        }
        println!(
            "denoiser {} ({} frames); naive = candle's composed ops, measured interleaved",
            args.model, args.frames
        );
        println!(
            "batch  fwd samples/s (naive)  speedup  train samples/s (naive)  speedup  \
             fwd GFLOP/s  GEMM GFLOP/s  fwd MFU"
        );
        for r in rows {
            println!(
                "{:>5}  {:>13.1} {:>9}  {:>6.2}x  {:>15.1} {:>7}  {:>6.2}x  {:>11.2}  {:>12.2}  {:>6.1}%",
                r.batch,
                r.forward_samples_per_s,
                format!("({:.1})", r.naive_forward_samples_per_s),
                r.forward_samples_per_s / r.naive_forward_samples_per_s,
                r.train_samples_per_s,
                format!("({:.1})", r.naive_train_samples_per_s),
                r.train_samples_per_s / r.naive_train_samples_per_s,
                r.forward_gflops,
                r.gemm_gflops,
                100.0 * r.forward_mfu
            );
        }
    }
    if args.http {
        bench_http(&args, &manifest)?;
    }
    if args.ops {
        // The spatial attention scores of the largest batch: [batch * heads, tokens, tokens].
        let (tiny, tokenizer, weights) = tiny_parts(&manifest, "fewstep bench --ops")?;
        let a = &tiny.architecture;
        let batch = args.batches.iter().copied().max().unwrap_or(32);
        let t = a.tokens_per_frame();
        use crate::bench::ops;
        let (d, heads, frames) = (a.dim, a.heads, a.max_frames);
        let setup = crate::bench::model::ModelBenchSetup {
            cfg: a,
            tokenizer: &tokenizer,
            weights: weights.as_deref(),
            inputs: &Default::default(),
        };
        let mut rows = vec![
            ops::softmax(batch * heads, t, t, args.reps, &device)?,
            // The model's spatial self-attention, its temporal attention across a video's
            // frames, and an SD1.5 UNet's top-level self-attention at 64x64 latents.
            ops::attention((batch, t, t), (d, heads), false, args.reps, &device)?,
            ops::attention((batch, t, t), (d, heads), true, args.reps, &device)?,
            ops::attention(
                (batch * t, frames, frames),
                (d, heads),
                true,
                args.reps,
                &device,
            )?,
            ops::attention((1, 4096, 4096), (320, 8), false, args.reps.min(3), &device)?,
            // The model's qkv projection and its MLP's down projection on every token of the
            // batch, and an SD1.5 top-level projection.
            ops::linear((batch * t, d, 3 * d), false, args.reps, &device)?,
            ops::linear((batch * t, d, 3 * d), true, args.reps, &device)?,
            ops::linear((batch * t, a.mlp_ratio * d, d), true, args.reps, &device)?,
            ops::linear((4096, 320, 320), false, args.reps.min(3), &device)?,
            // The MLP's up projection and its SiLU.
            ops::linear_silu((batch * t, d, a.mlp_ratio * d), args.reps, &device)?,
        ];
        // An SD1.5 UNet's 3x3 convolutions at 64x64 latents, level by level.
        for (c, hw) in [(320, 64), (640, 32), (1280, 16), (1280, 8)] {
            for n in [1, 4] {
                rows.push(ops::conv3x3((n, c, c, hw), args.reps.min(3), &device)?);
            }
        }
        for &b in &args.batches {
            for toggle in [
                (
                    "attention",
                    crate::nn::fused_attention::set_fused_attention as fn(bool),
                ),
                ("linear", crate::nn::fused_linear::set_fused_linear),
                ("SiLU epilogue", crate::nn::fused_linear::set_silu_epilogue),
            ] {
                rows.extend(ops::model_toggle(&setup, b, args.reps, &device, toggle)?);
            }
            rows.push(ops::served_forward(&setup, b, args.reps, &device)?);
        }
        println!(
            "\nop                               shape                 composed ms  fused ms  speedup"
        );
        for r in rows {
            println!(
                "{:<32} {:<21} {:>11.3} {:>9.3} {:>7.2}x",
                r.op,
                format!("{:?}", r.shape),
                r.composed_ms,
                r.fused_ms,
                r.speedup
            );
        }
    }
    if !args.compare.is_empty() {
        let models = args
            .compare
            .iter()
            .map(|name| {
                let m = crate::manifest::Manifest::find(&args.models_dir, name)?;
                Ok(crate::manifest::LoadedModel::load(&m, &device)?)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let batch = args.batches.iter().copied().max().unwrap_or(32);
        let rows = crate::bench::samplers::compare(&models, batch, args.frames, args.reps)?;
        println!(
            "\nmodels, batch {batch}, {} frame(s), median of {} interleaved rounds",
            args.frames, args.reps
        );
        println!(
            "{:<24} {:>8} {:>5} {:>8} {:>4} {:>10} {:>8}",
            "model", "sampler", "steps", "guidance", "NFE", "samples/s", "speedup"
        );
        for r in rows {
            println!(
                "{:<24} {:>8} {:>5} {:>8.1} {:>4} {:>10.1} {:>7.1}x",
                r.model, r.sampler, r.steps, r.guidance, r.nfe, r.samples_per_s, r.speedup
            );
        }
    }
    Ok(())
}

fn bench_unet(args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    use crate::bench::unet;
    let device = crate::config::parse_device(&args.device)?;
    let dtype = args.dtype.dtype();
    let steps = args.steps.unwrap_or(4);
    let loaded = unet::load_inputs(args.inputs.as_deref(), &device)?;
    let (model, rows) = unet::bench_unet(
        dir,
        &loaded,
        dtype,
        &device,
        args.latent_size,
        &args.batches,
        steps,
        args.reps,
    )?;
    println!(
        "UNet {} on {}, {}, latents {}x{}, {steps} steps, median of {} rounds",
        dir.display(),
        args.device,
        args.dtype,
        args.latent_size,
        args.latent_size,
        args.reps
    );
    println!("batch  round ms  CPU ms  images/s");
    for r in &rows {
        println!(
            "{:>5}  {:>8.1}  {:>6.0}  {:>8.2}",
            r.batch, r.round_ms, r.cpu_round_ms, r.images_per_s
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
    }
    if let Some(path) = &args.outputs {
        let batch = args.batches.first().copied().unwrap_or(1);
        let x = unet::inputs(
            model.config(),
            &loaded,
            batch,
            args.latent_size,
            dtype,
            &device,
        )?;
        let t = candle_core::Tensor::full(999f32, batch, &device)?;
        let forward = model.forward(&x.sample, &t, &x.text, x.added.as_ref())?;
        let denoised = unet::denoise(&model, &x, steps)?;
        let out = std::collections::HashMap::from([
            (
                "forward".to_string(),
                forward.to_dtype(candle_core::DType::F32)?,
            ),
            (
                "denoised".to_string(),
                denoised.to_dtype(candle_core::DType::F32)?,
            ),
        ]);
        candle_core::safetensors::save(&out, path)?;
    }
    Ok(())
}

fn bench_wan(args: &BenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    use crate::bench::wan;
    let device = crate::config::parse_device(&args.device)?;
    let vae_dtype = args.vae_dtype.unwrap_or(args.dtype);
    if let Some(message) =
        crate::families::sd::manifest::device_refuses(args.dtype, vae_dtype, &device)
    {
        anyhow::bail!(message);
    }
    let spec = wan::WanSpec {
        sampler: args.sampler,
        steps: args.steps.unwrap_or(4),
        guidance: args.guidance.unwrap_or(1.0),
        frames: args.frames,
        width: args.width,
        height: args.height,
        text_len: args.text_len,
    };
    let start = std::time::Instant::now();
    let parts = wan::WanParts::load(dir, args.dtype.dtype(), vae_dtype.dtype(), &device)?;
    let load_s = start.elapsed().as_secs_f64();
    let loaded = crate::bench::unet::load_inputs(args.inputs.as_deref(), &device)?;
    println!(
        "Wan {} on {}, {} (VAE {vae_dtype}), {} frames at {}x{}, {} sampler, {} steps, \
         guidance {}, loaded in {load_s:.1} s; median of {} rounds after a warm-up",
        dir.display(),
        args.device,
        args.dtype,
        spec.frames,
        spec.width,
        spec.height,
        serde_json::to_value(spec.sampler)?.as_str().unwrap_or("?"),
        spec.steps,
        spec.guidance,
        args.reps.max(1)
    );
    println!("batch  total s  transformer s/step  decode s  warm-up s");
    let mut reports = Vec::new();
    for (i, &batch) in args.batches.iter().enumerate() {
        let (report, last) = wan::bench_batch(&parts, &spec, &loaded, batch, args.reps)?;
        println!(
            "{:>5}  {:>7.3}  {:>18.3}  {:>8.3}  {:>9.2}",
            report.batch, report.total_s, report.step_s, report.decode_s, report.warmup_s
        );
        if let (0, Some(path)) = (i, &args.outputs) {
            let out = std::collections::HashMap::from([
                ("latents".to_string(), last.latents),
                (
                    "video".to_string(),
                    last.video.to_dtype(candle_core::DType::F32)?,
                ),
            ]);
            candle_core::safetensors::save(&out, path)?;
        }
        reports.push(report);
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "load_s": load_s,
            "peak_rss_mib": crate::bench::model::peak_rss_mib(),
            "rows": reports,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

fn bench_http(args: &BenchArgs, manifest: &crate::manifest::Manifest) -> anyhow::Result<()> {
    use crate::bench::http::{
        canary_overhead, distinct_weights_copy, engine_throughput, fixed_vs_adaptive,
        keep_vs_return, sync_vs_async, BareEngine,
    };
    /// Alternating rounds of each side in the sync/async comparison.
    const ROUNDS: usize = 3;
    let steps = args.steps.unwrap_or(manifest.sampling.default_steps);
    let guidance = args.guidance.unwrap_or(manifest.sampling.default_guidance);
    let config = ServerConfig {
        addr: "127.0.0.1:0".into(),
        models_dir: args.models_dir.clone(),
        models: vec![args.model.clone()],
        allow_random_weights: true,
        queue_capacity: 4096,
        ..ServerConfig::default()
    };
    let device = candle_core::Device::Cpu;
    let model = crate::server::load_models(&config, &device)?.remove(0);
    println!(
        "\nengine vs HTTP: {} (version {}{}), steps {steps}, guidance {guidance}",
        args.model,
        model.version,
        if model.trained {
            ""
        } else {
            ", UNTRAINED random weights"
        }
    );
    println!(
        "bare engine ({} frame(s) per output): batch  outputs/s  batch ms",
        args.frames
    );
    for &b in &args.batches {
        let r = engine_throughput(&model, b, args.frames, steps, guidance, args.reps)?;
        println!(
            "{:>39}  {:>9.2}  {:>8.1}",
            r.batch, r.images_per_s, r.batch_ms
        );
    }
    // The same model, kept for the rounds that alternate with HTTP (see `BareEngine`).
    let bare = BareEngine {
        model: std::sync::Arc::new(model),
        frames: args.frames,
        steps,
        guidance,
        reps: args.reps,
    };
    let rt = runtime()?;
    let [w, h] = manifest.serving.sizes[0];
    let body = serde_json::json!({"prompt": "a small red circle on the left", "steps": steps,
        "guidance": guidance, "num_frames": args.frames, "width": w, "height": h});
    let max_time = std::time::Duration::from_secs(args.max_seconds);
    let (http_rows, versus, canary, memory) = rt.block_on(async {
        let handle = crate::server::spawn(config, std::future::pending()).await?;
        let base = format!("http://{}", handle.addr);
        let mut rows = Vec::new();
        for &c in &args.concurrency {
            rows.push(
                fixed_vs_adaptive(
                    &handle.engine,
                    &bare,
                    &base,
                    body.clone(),
                    c,
                    args.requests,
                    max_time,
                    ROUNDS,
                )
                .await,
            );
        }
        let versus = if args.sync_vs_async > 0 {
            Some(
                sync_vs_async(
                    &base,
                    body.clone(),
                    args.sync_vs_async,
                    args.requests,
                    max_time,
                    ROUNDS,
                )
                .await,
            )
        } else {
            None
        };
        let canary = if args.canary_overhead > 0 && manifest.weights_path().is_file() {
            let copy = std::env::temp_dir().join(format!(
                "fewstep-bench-canary-{}.safetensors",
                std::process::id()
            ));
            distinct_weights_copy(&manifest.weights_path(), &copy)?;
            let r = canary_overhead(
                &handle.engine,
                &args.model,
                &copy,
                &base,
                body.clone(),
                args.canary_overhead,
                args.requests,
                max_time,
                ROUNDS,
            )
            .await;
            std::fs::remove_file(&copy).ok();
            Some(r?)
        } else {
            None
        };
        let memory = if args.keep_vs_return > 0 {
            let delay = ServerConfig::default().return_free_memory_ms.max(0) as u64;
            Some(
                keep_vs_return(
                    &base,
                    body.clone(),
                    args.keep_vs_return,
                    args.requests,
                    max_time,
                    ROUNDS,
                    delay,
                )
                .await,
            )
        } else {
            None
        };
        handle.shutdown().await?;
        anyhow::Ok((rows, versus, canary, memory))
    })?;
    drop(bare);
    println!(
        "HTTP, batching wait fixed ({} ms) vs adaptive, and the bare engine at a batch of the concurrency (median of {ROUNDS} alternating rounds)",
        manifest.serving.max_wait_ms
    );
    println!(
        "concurrency  wait      requests  errors  images/s  steady/s  p50 ms  p99 ms  mean batch  engine/s  HTTP (steady) / engine"
    );
    for w in &http_rows {
        let engine_rate = w.engine.as_ref().map(|e| e.images_per_s);
        for (name, r) in [("fixed", &w.fixed), ("adaptive", &w.adaptive)] {
            let (engine_col, ratio) = engine_rate.map_or(("-".into(), "-".into()), |e| {
                (
                    format!("{e:.1}"),
                    format!("{:.2}", r.steady_images_per_s / e),
                )
            });
            println!(
                "{:>11}  {name:<8}  {:>8}  {:>6}  {:>8.1}  {:>8.1}  {:>6.0}  {:>6.0}  {:>10.1}  {engine_col:>8}  {ratio}",
                w.concurrency,
                r.requests,
                r.errors,
                r.images_per_s,
                r.steady_images_per_s,
                r.p50_ms,
                r.p99_ms,
                r.mean_batch
            );
        }
        println!(
            "{:>11}  adaptive/fixed throughput {:.2}, p50 latency {:.2}",
            "",
            w.adaptive.images_per_s / w.fixed.images_per_s,
            w.adaptive.p50_ms / w.fixed.p50_ms
        );
    }
    println!("\nwhere a request's time goes, adaptive wait (mean ms per request, from the server's own timings; device: its batch's pass; hand-offs: timed by the server in no stage; outside: HTTP, JSON and the client; device busy: the share of the steady run's wall time the device computed, same requests)");
    println!(
        "concurrency  round trip  server  queue  device  encoding  hand-offs  outside  device busy"
    );
    for w in &http_rows {
        let s = &w.adaptive.stages;
        println!(
            "{:>11}  {:>10.2}  {:>6.2}  {:>5.2}  {:>6.2}  {:>8.2}  {:>9.2}  {:>7.2}  {:>11.3}",
            w.concurrency,
            s.round_trip_ms,
            s.server_ms,
            s.queue_ms,
            s.device_ms,
            s.encoding_ms,
            s.handoff_ms(),
            s.outside_ms(),
            s.device_busy(w.adaptive.steady_images_per_s)
        );
    }
    if let Some(v) = versus {
        println!(
            "\nsync vs async jobs at concurrency {} (median of {ROUNDS} alternating rounds each)",
            v.concurrency
        );
        println!("mode   requests  errors  images/s  p50 ms  p99 ms  mean batch");
        for (name, r) in [("sync", &v.sync), ("async", &v.r#async)] {
            println!(
                "{name:<5}  {:>8}  {:>6}  {:>8.1}  {:>6.0}  {:>6.0}  {:>10.1}",
                r.requests, r.errors, r.images_per_s, r.p50_ms, r.p99_ms, r.mean_batch
            );
        }
        println!(
            "async/sync throughput: {:.3} (job bookkeeping and the events stream cost {:+.1}%)",
            v.ratio,
            (1.0 - v.ratio) * 100.0
        );
    }
    if let Some(c) = canary {
        println!(
            "\ncanary serving at concurrency {} (median of {ROUNDS} alternating rounds each)",
            c.concurrency
        );
        println!(
            "canary            requests  errors  images/s  p50 ms  p99 ms  mean batch  vs none"
        );
        for (name, r) in [
            ("none", &c.plain),
            ("all traffic", &c.canary_all),
            ("half traffic", &c.canary_half),
        ] {
            println!(
                "{name:<16}  {:>8}  {:>6}  {:>8.1}  {:>6.0}  {:>6.0}  {:>10.1}  {:.3}",
                r.requests,
                r.errors,
                r.images_per_s,
                r.p50_ms,
                r.p99_ms,
                r.mean_batch,
                r.images_per_s / c.plain.images_per_s
            );
        }
    } else if args.canary_overhead > 0 {
        println!("\ncanary overhead skipped: the model's weights are not one safetensors file");
    }
    if let Some(m) = memory {
        println!(
            "\nfreed memory kept vs returned after {} ms, concurrency {} (median of {ROUNDS} alternating rounds each)",
            m.delay_ms, m.concurrency
        );
        println!("freed pages  requests  errors  images/s  p50 ms  p99 ms  RSS after idle (MB)");
        let mb = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        for (name, r, rss) in [
            ("kept", &m.keep, m.rss_keep_mb),
            ("returned", &m.returned, m.rss_returned_mb),
        ] {
            println!(
                "{name:<11}  {:>8}  {:>6}  {:>8.1}  {:>6.0}  {:>6.0}  {}",
                r.requests,
                r.errors,
                r.images_per_s,
                r.p50_ms,
                r.p99_ms,
                mb(rss)
            );
        }
        println!(
            "returned/kept throughput {:.3}",
            m.returned.images_per_s / m.keep.images_per_s
        );
    }
    Ok(())
}
