//! The device worker: the only code that touches device tensors.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;

use super::batcher::{decide, Decision};
use super::job::Stop;
use super::observer::BatchObserver;
use super::{EngineError, Job, JobOutput, ModelCard, Msg, Shared};
use crate::manifest::LoadedModel;
use crate::pipeline::BatchSpec;

pub(super) fn run(
    models: Vec<LoadedModel>,
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    device: Device,
) {
    let mut models: HashMap<String, LoadedModel> = models
        .into_iter()
        .map(|m| (m.manifest.name.clone(), m))
        .collect();
    let mut pending: Vec<Job> = Vec::new();
    let mut open = true;
    loop {
        if pending.is_empty() {
            if !open {
                break;
            }
            match rx.recv() {
                Ok(msg) => handle(msg, &mut open, &mut pending, &mut models, &shared, &device),
                Err(_) => break,
            }
        }
        while let Ok(msg) = rx.try_recv() {
            handle(msg, &mut open, &mut pending, &mut models, &shared, &device);
        }
        drop_dead_jobs(&mut pending, &shared);
        let decision = decide(
            &pending,
            Instant::now(),
            |k| {
                models
                    .get(&k.model)
                    .map_or(1, |m| m.manifest.serving.max_batch)
            },
            |k| {
                // Shutting down, nobody else is coming: run what is there without waiting.
                let ms = models
                    .get(&k.model)
                    .map_or(0, |m| m.manifest.serving.max_wait_ms);
                Duration::from_millis(if open { ms } else { 0 })
            },
        );
        match decision {
            Decision::Idle => {}
            Decision::Wait(d) => match rx.recv_timeout(d) {
                Ok(msg) => handle(msg, &mut open, &mut pending, &mut models, &shared, &device),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            },
            Decision::Run(idx) => run_batch(take(&mut pending, idx), &models, &shared),
        }
    }
    tracing::info!("device worker stopped");
}

fn take(pending: &mut Vec<Job>, mut idx: Vec<usize>) -> Vec<Job> {
    idx.sort_unstable();
    let mut out = Vec::with_capacity(idx.len());
    for i in idx.into_iter().rev() {
        out.push(pending.swap_remove(i));
    }
    out.sort_by_key(|j| j.enqueued);
    out
}

fn dequeued(shared: &Shared, n: usize) {
    shared.queued.fetch_sub(n, Ordering::SeqCst);
    metrics::gauge!("fewstep_queue_depth").decrement(n as f64);
}

/// Drops jobs that were cancelled or whose client went away (their slot is already free) and
/// fails those whose deadline passed, before they cost device time.
fn drop_dead_jobs(pending: &mut Vec<Job>, shared: &Shared) {
    let now = Instant::now();
    let mut kept = Vec::with_capacity(pending.len());
    for job in pending.drain(..) {
        if let Some(why) = job.cell.stopped() {
            let reason = match why {
                Stop::Cancelled => "cancelled",
                Stop::ClientGone => "client_gone",
            };
            metrics::counter!("fewstep_jobs_dropped_total", "reason" => reason).increment(1);
            tracing::debug!(id = %job.id, reason, "dropped before running");
            let _ = job.reply.send(Err(EngineError::Cancelled));
        } else if now >= job.deadline && job.cell.expire() {
            metrics::counter!("fewstep_jobs_dropped_total", "reason" => "deadline").increment(1);
            dequeued(shared, 1);
            let _ = job.reply.send(Err(EngineError::DeadlineExceeded));
        } else {
            kept.push(job);
        }
    }
    *pending = kept;
}

fn handle(
    msg: Msg,
    open: &mut bool,
    pending: &mut Vec<Job>,
    models: &mut HashMap<String, LoadedModel>,
    shared: &Shared,
    device: &Device,
) {
    match msg {
        Msg::Job(job) => {
            if models.contains_key(&job.key.model) {
                pending.push(job);
            } else if job.cell.expire() {
                dequeued(shared, 1);
                let _ = job
                    .reply
                    .send(Err(EngineError::UnknownModel(job.key.model.clone())));
            }
        }
        Msg::Stop => *open = false,
        Msg::Reload {
            model,
            weights,
            reply,
        } => {
            let result = reload(&model, &weights, models, device);
            if let Ok(card) = &result {
                shared.set_card(card.clone());
            }
            let _ = reply.send(result);
        }
    }
}

/// Loads new weights beside the serving copy, runs a smoke generation, then swaps.
fn reload(
    name: &str,
    weights: &std::path::Path,
    models: &mut HashMap<String, LoadedModel>,
    device: &Device,
) -> Result<ModelCard, EngineError> {
    let current = models
        .get(name)
        .ok_or_else(|| EngineError::UnknownModel(name.to_string()))?;
    let manifest = current.manifest.clone();
    let fresh = LoadedModel::load_weights(&manifest, weights, device)
        .map_err(|e| EngineError::Reload(e.to_string()))?;
    let [w, h] = manifest.serving.sizes[0];
    let smoke = BatchSpec {
        prompts: vec!["a red circle".into()],
        negative_prompts: vec![String::new()],
        seeds: vec![0],
        frames: 1,
        width: w,
        height: h,
    };
    let out = fresh
        .generate(
            &smoke,
            manifest.sampling.default_steps,
            manifest.sampling.default_guidance,
        )
        .map_err(|e| EngineError::Reload(format!("smoke generation failed: {e}")))?;
    if out.outputs.len() != 1 {
        return Err(EngineError::Reload(
            "smoke generation returned no image".into(),
        ));
    }
    let card = ModelCard {
        manifest,
        version: fresh.version.clone(),
        trained: fresh.trained,
        created: crate::util::unix_ms() as u64 / 1000,
    };
    tracing::info!(model = name, version = %fresh.version, "reloaded weights");
    models.insert(name.to_string(), fresh);
    Ok(card)
}

fn run_batch(jobs: Vec<Job>, models: &HashMap<String, LoadedModel>, shared: &Shared) {
    // A job cancelled since the last look has already left the queue (and released its slot).
    let (jobs, gone): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| j.cell.claim());
    for j in gone {
        let _ = j.reply.send(Err(EngineError::Cancelled));
    }
    if jobs.is_empty() {
        return;
    }
    dequeued(shared, jobs.len());
    let key = jobs[0].key.clone();
    let Some(model) = models.get(&key.model) else {
        for j in jobs {
            let _ = j
                .reply
                .send(Err(EngineError::UnknownModel(key.model.clone())));
        }
        return;
    };
    let started = Instant::now();
    let mut spec = BatchSpec {
        prompts: Vec::new(),
        negative_prompts: Vec::new(),
        seeds: Vec::new(),
        frames: key.frames,
        width: key.width,
        height: key.height,
    };
    for j in &jobs {
        for &s in &j.seeds {
            spec.prompts.push(j.prompt.clone());
            spec.negative_prompts.push(j.negative_prompt.clone());
            spec.seeds.push(s);
        }
    }
    let rows = spec.seeds.len();
    metrics::histogram!("fewstep_batch_size").record(rows as f64);
    let mut watch = BatchObserver::new(&jobs, model);
    let result = model.generate_observed(&spec, key.steps, key.guidance(), &mut watch);
    let left = watch.left();
    match result {
        Ok(out) => {
            metrics::histogram!("fewstep_stage_seconds", "stage" => "text_encoding")
                .record(out.text_s);
            metrics::histogram!("fewstep_stage_seconds", "stage" => "denoising")
                .record(out.denoise_s);
            metrics::histogram!("fewstep_stage_seconds", "stage" => "decoding")
                .record(out.decode_s);
            let mut outputs = out.outputs.into_iter();
            for (i, j) in jobs.into_iter().enumerate() {
                if left[i] {
                    metrics::counter!("fewstep_jobs_dropped_total", "reason" => "cancelled_running")
                        .increment(1);
                    let _ = j.reply.send(Err(EngineError::Cancelled));
                    continue;
                }
                let mine: Vec<_> = outputs.by_ref().take(j.rows()).collect();
                let _ = j.reply.send(Ok(JobOutput {
                    outputs: mine,
                    model_version: model.version.clone(),
                    batch_size: rows,
                    queue_s: started.saturating_duration_since(j.enqueued).as_secs_f64(),
                    text_s: out.text_s,
                    denoise_s: out.denoise_s,
                    decode_s: out.decode_s,
                }));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "batch failed");
            for j in jobs {
                let _ = j.reply.send(Err(EngineError::Generation(e.to_string())));
            }
        }
    }
}
