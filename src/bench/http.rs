//! Server throughput: the bare engine (the model's batched generate, no HTTP) against the
//! real server on loopback at several client concurrencies, measured in one run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::manifest::LoadedModel;
use crate::pipeline::BatchSpec;

#[derive(Debug, Clone, Serialize)]
pub struct EngineRow {
    pub batch: usize,
    pub images_per_s: f64,
    pub batch_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRow {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub images_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_batch: f64,
}

/// Images/s of `model.generate` at batch `batch` (median of `reps` after a warm-up).
pub fn engine_throughput(
    model: &LoadedModel,
    batch: usize,
    steps: usize,
    guidance: f32,
    reps: usize,
) -> candle_core::Result<EngineRow> {
    let [w, h] = model.manifest.serving.sizes[0];
    let spec = BatchSpec {
        prompts: vec!["a small red circle on the left".into(); batch],
        negative_prompts: vec![String::new(); batch],
        seeds: (0..batch as u64).collect(),
        frames: 1,
        width: w,
        height: h,
    };
    let secs = super::model::median_secs(reps, || {
        model.generate(&spec, steps, guidance)?;
        Ok(())
    })?;
    Ok(EngineRow {
        batch,
        images_per_s: batch as f64 / secs,
        batch_ms: secs * 1e3,
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// `concurrency` clients, each sending `body` back to back, until `requests` have been sent in
/// all or `max_time` has passed (whichever comes first). Loopback targets only.
pub async fn http_load(
    base_url: &str,
    body: Value,
    concurrency: usize,
    requests: usize,
    max_time: Duration,
) -> HttpRow {
    let client = reqwest::Client::new();
    let url = format!("{base_url}/generate");
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (client, url, body, sent) = (client.clone(), url.clone(), body.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut batches = Vec::new();
            let mut errors = 0;
            let mut seed = c as u64 * 1_000_000;
            loop {
                let i = sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= requests || start.elapsed() >= max_time {
                    break;
                }
                let mut b = body.clone();
                b["seed"] = seed.into();
                seed += 1;
                let t = Instant::now();
                match client.post(&url).json(&b).send().await {
                    Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                        Ok(v) => {
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                            batches.push(v["batch_size"].as_f64().unwrap_or(0.0));
                        }
                        Err(_) => errors += 1,
                    },
                    _ => errors += 1,
                }
            }
            (lat, batches, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut batches = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, b, e)) = t.await {
            lat.extend(l);
            batches.extend(b);
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    HttpRow {
        concurrency,
        requests: lat.len(),
        errors,
        images_per_s: lat.len() as f64 / elapsed,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        mean_batch: batches.iter().sum::<f64>() / batches.len().max(1) as f64,
    }
}
