//! The device worker: the only code that touches device tensors.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;

use super::batcher::{decide, BucketKey, Company, Decision};
use super::canary::{in_canary, CanaryCard};
use super::job::Stop;
use super::observer::BatchObserver;
use super::{EngineError, Job, JobOutput, ModelCard, Msg, RolloutEnd, Shared};
use crate::manifest::{LoadedModel, ManifestError};
use crate::pipeline::BatchSpec;

pub(super) fn run(
    models: Vec<LoadedModel>,
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    device: Device,
) {
    let mut w = Worker {
        models: models
            .into_iter()
            .map(|m| (m.manifest.name.clone(), m))
            .collect(),
        canaries: HashMap::new(),
        pending: Vec::new(),
        open: true,
        seen: Arrivals::default(),
        shared,
        device,
    };
    loop {
        if w.pending.is_empty() {
            if !w.open {
                break;
            }
            match rx.recv() {
                Ok(msg) => w.handle(msg),
                Err(_) => break,
            }
        }
        while let Ok(msg) = rx.try_recv() {
            w.handle(msg);
        }
        drop_dead_jobs(&mut w.pending, &w.shared);
        match w.decide() {
            Decision::Idle => {}
            Decision::Wait(d) => match rx.recv_timeout(d) {
                Ok(msg) => w.handle(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => w.open = false,
            },
            Decision::Run(idx) => {
                let batch = take(&mut w.pending, idx);
                let (key, start) = (batch[0].key.clone(), Instant::now());
                let rows = batch.iter().map(Job::rows).sum();
                let ready = run_batch(batch, &w.models, &w.canaries, &w.shared)
                    .unwrap_or_else(Instant::now);
                w.seen.company.finished(&key, rows, ready);
                w.seen.last_batch = Some((key, start, ready));
            }
        }
    }
    tracing::info!("device worker stopped");
}

/// The device thread's state between messages.
struct Worker {
    models: HashMap<String, LoadedModel>,
    /// Versions on trial beside the serving one, by model.
    canaries: HashMap<String, Canary>,
    pending: Vec<Job>,
    /// False once a stop was asked for: the queue is finished without waiting.
    open: bool,
    seen: Arrivals,
    shared: Arc<Shared>,
    device: Device,
}

impl Worker {
    fn decide(&self) -> Decision {
        let serving = |k: &BucketKey| self.models.get(&k.model).map(|m| &m.manifest.serving);
        decide(
            &self.pending,
            Instant::now(),
            self.seen.last_batch.as_ref().map(|b| b.2),
            |k| serving(k).map_or(1, |s| s.max_batch),
            |k| {
                // Shutting down, nobody else is coming: run what is there without waiting.
                let ms = serving(k).map_or(0, |s| s.max_wait_ms);
                Duration::from_millis(if self.open { ms } else { 0 })
            },
            |k| {
                if self.shared.adaptive_wait.load(Ordering::Relaxed) {
                    self.seen.company.rows_to_wait_for(k, &self.pending)
                } else {
                    None
                }
            },
        )
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Job(mut job) => {
                if self.models.contains_key(&job.key.model) {
                    if let Some(c) = self.canaries.get(&job.key.model) {
                        job.key.canary = in_canary(&job.id, c.card.share);
                    }
                    self.seen.on_job(&job, &self.pending);
                    self.pending.push(job);
                } else if job.cell.expire() {
                    dequeued(&self.shared, [&job]);
                    let _ = job
                        .reply
                        .send(Err(EngineError::UnknownModel(job.key.model.clone())));
                }
            }
            Msg::Stop => self.open = false,
            Msg::Reload {
                model,
                weights,
                canary,
                reply,
            } => {
                let result = self.reload(&model, &weights, canary);
                if let Ok(card) = &result {
                    self.shared.set_card(card.clone());
                }
                let _ = reply.send(result);
            }
            Msg::EndRollout {
                model,
                promote,
                reply,
            } => {
                let result = self.end_rollout(&model, promote);
                if let Ok(end) = &result {
                    self.shared.set_card(end.card.clone());
                }
                let _ = reply.send(result);
            }
        }
    }

    /// Loads and smoke-tests new weights, then makes them the serving version or, with
    /// `canary`, serves them to that share of new jobs.
    fn reload(
        &mut self,
        name: &str,
        weights: &std::path::Path,
        canary: Option<f64>,
    ) -> Result<ModelCard, EngineError> {
        let current = self
            .models
            .get(name)
            .ok_or_else(|| EngineError::UnknownModel(name.to_string()))?;
        let fresh = load_checked(current, weights, &self.device)?;
        let now_ms = crate::util::unix_ms();
        let Some(share) = canary else {
            if self.canaries.remove(name).is_some() {
                self.shared.rollouts.end(name);
                tracing::info!(model = name, "a plain reload ended the canary rollout");
            }
            let card = ModelCard::of(&fresh, None);
            tracing::info!(model = name, version = %fresh.version, "reloaded weights");
            self.models.insert(name.to_string(), fresh);
            return Ok(card);
        };
        if fresh.version == current.version {
            return Err(EngineError::Reload(format!(
                "the canary's weights are the serving version {}",
                current.version
            )));
        }
        let c = CanaryCard {
            version: fresh.version.clone(),
            trained: fresh.trained,
            share,
            started_ms: now_ms,
            weights_bytes: fresh.weights_bytes,
        };
        self.shared
            .rollouts
            .start(name, &current.version, &fresh.version, now_ms);
        let card = ModelCard::of(current, Some(c.clone()));
        tracing::info!(model = name, version = %fresh.version, share, "canary serving");
        self.canaries.insert(
            name.to_string(),
            Canary {
                model: fresh,
                card: c,
            },
        );
        Ok(card)
    }

    fn end_rollout(&mut self, name: &str, promote: bool) -> Result<RolloutEnd, EngineError> {
        if !self.models.contains_key(name) {
            return Err(EngineError::UnknownModel(name.to_string()));
        }
        let canary = self
            .canaries
            .remove(name)
            .ok_or_else(|| EngineError::NoCanary(name.to_string()))?;
        let counts = self.shared.rollouts.end(name);
        if promote {
            self.models.insert(name.to_string(), canary.model);
        }
        let serving = &self.models[name];
        tracing::info!(model = name, promote, version = %serving.version, "rollout ended");
        Ok(RolloutEnd {
            card: ModelCard::of(serving, None),
            canary: canary.card,
            counts,
        })
    }
}

/// A new version serving a share of a model's traffic.
struct Canary {
    model: LoadedModel,
    card: CanaryCard,
}

/// What the worker has seen of arrivals, for [`Company`]: a job's company is the jobs of its
/// bucket still queued when it arrived, plus the batch of its bucket that was running then.
#[derive(Default)]
struct Arrivals {
    company: Company,
    /// The bucket of the last batch run, when it started, and when its results were ready
    /// (not when the worker came back: a client in a closed loop may already have sent its
    /// next request by then, and that request did not overlap).
    last_batch: Option<(BucketKey, Instant, Instant)>,
}

impl Arrivals {
    fn on_job(&mut self, job: &Job, pending: &[Job]) {
        let queued = pending.iter().filter(|j| j.key == job.key).count();
        let running = self.last_batch.as_ref().is_some_and(|(k, start, end)| {
            *k == job.key && (*start..=*end).contains(&job.enqueued)
        });
        self.company.arrived(&job.key, queued + running as usize);
    }
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

fn dequeued<'a>(shared: &Shared, jobs: impl IntoIterator<Item = &'a Job>) {
    let (n, cost) = jobs
        .into_iter()
        .fold((0usize, 0u64), |(n, c), j| (n + 1, c + j.cost()));
    shared.queued_cost.fetch_sub(cost, Ordering::SeqCst);
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
            dequeued(shared, [&job]);
            let _ = job.reply.send(Err(EngineError::DeadlineExceeded));
        } else {
            kept.push(job);
        }
    }
    *pending = kept;
}

/// Loads new weights for `current`'s manifest beside it and runs a smoke generation.
fn load_checked(
    current: &LoadedModel,
    weights: &std::path::Path,
    device: &Device,
) -> Result<LoadedModel, EngineError> {
    let manifest = &current.manifest;
    let fresh = LoadedModel::load_weights(manifest, weights, device).map_err(|e| match e {
        ManifestError::Identity { .. } => EngineError::ModelMismatch(e.to_string()),
        e => EngineError::Reload(e.to_string()),
    })?;
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
    Ok(fresh)
}

/// Runs one batch; returns when its first results were handed back, if any were.
fn run_batch(
    jobs: Vec<Job>,
    models: &HashMap<String, LoadedModel>,
    canaries: &HashMap<String, Canary>,
    shared: &Shared,
) -> Option<Instant> {
    // A job cancelled since the last look has already left the queue (and released its slot).
    let (jobs, gone): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| j.cell.claim());
    for j in gone {
        let _ = j.reply.send(Err(EngineError::Cancelled));
    }
    if jobs.is_empty() {
        return None;
    }
    dequeued(shared, &jobs);
    let key = jobs[0].key.clone();
    let canary = canaries.get(&key.model).filter(|_| key.canary);
    let Some(model) = canary.map(|c| &c.model).or_else(|| models.get(&key.model)) else {
        for j in jobs {
            let _ = j
                .reply
                .send(Err(EngineError::UnknownModel(key.model.clone())));
        }
        return None;
    };
    let mut ready = None;
    let mut run = |jobs: Vec<Job>| {
        let at = run_rows(jobs, model, &key, shared)?;
        ready.get_or_insert(at);
        Ok(())
    };
    split_on_failure(jobs, &mut run, &mut |j: Job, e: String| {
        metrics::counter!("fewstep_device_errors_total").increment(1);
        shared
            .rollouts
            .record_run(&key.model, &model.version, j.rows(), true);
        let _ = j.reply.send(Err(EngineError::Device(e)));
    });
    ready
}

/// Runs `items` with `run`; when a run of several fails, each half is run again (and so on),
/// so that only the items that fail on their own are handed to `fail`.
fn split_on_failure<T, E: std::fmt::Display>(
    items: Vec<T>,
    run: &mut impl FnMut(Vec<T>) -> Result<(), (Vec<T>, E)>,
    fail: &mut impl FnMut(T, String),
) {
    match run(items) {
        Ok(()) => {}
        Err((mut items, e)) if items.len() > 1 => {
            tracing::warn!(error = %e, rows = items.len(), "batch failed on the device; retrying in halves");
            metrics::counter!("fewstep_batch_splits_total").increment(1);
            let second = items.split_off(items.len() / 2);
            split_on_failure(items, run, fail);
            split_on_failure(second, run, fail);
        }
        Err((items, e)) => {
            tracing::error!(error = %e, "a job failed on the device on its own");
            for item in items {
                fail(item, e.to_string());
            }
        }
    }
}

/// Test-only fault injection: a batch with a prompt containing this fails as if the device
/// had failed (out of memory, a kernel error).
#[cfg(test)]
pub(crate) const INJECT_FAULT: &str = "__inject_device_fault__";

/// One pass of `jobs` on the device; returns when its results were ready, and the jobs when
/// it fails.
fn run_rows(
    jobs: Vec<Job>,
    model: &LoadedModel,
    key: &super::BucketKey,
    shared: &Shared,
) -> Result<Instant, (Vec<Job>, candle_core::Error)> {
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
    #[cfg(test)]
    let result = if spec.prompts.iter().any(|p| p.contains(INJECT_FAULT)) {
        Err(candle_core::Error::Msg("injected device fault".into()))
    } else {
        model.generate_observed(&spec, key.steps, key.guidance(), &mut watch)
    };
    #[cfg(not(test))]
    let result = model.generate_observed(&spec, key.steps, key.guidance(), &mut watch);
    let left = watch.left();
    shared.rate.record(jobs.len(), started.elapsed());
    let ready = Instant::now();
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
                shared
                    .rollouts
                    .record_run(&key.model, &model.version, mine.len(), false);
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
            drop(watch);
            return Err((jobs, e));
        }
    }
    Ok(ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_batch_is_retried_in_halves_until_only_the_bad_rows_fail() {
        let bad = [2, 5];
        let mut runs: Vec<Vec<u32>> = Vec::new();
        let mut failed: Vec<u32> = Vec::new();
        let mut run = |items: Vec<u32>| {
            runs.push(items.clone());
            if items.iter().any(|i| bad.contains(i)) {
                Err((items, "out of memory"))
            } else {
                Ok(())
            }
        };
        split_on_failure((0..8).collect(), &mut run, &mut |i, _| failed.push(i));
        assert_eq!(failed, vec![2, 5]);
        // 8 -> 4 + 4 -> (2 + 2) + (2 + 2) -> singles only where a bad row was.
        assert_eq!(runs[0].len(), 8);
        let ok_rows: usize = runs
            .iter()
            .filter(|r| !r.iter().any(|i| bad.contains(i)))
            .map(Vec::len)
            .sum();
        assert_eq!(
            ok_rows, 6,
            "every good row ran to completion once: {runs:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_device_fault_fails_only_its_request_and_the_worker_keeps_serving() {
        use crate::engine::{validate, GenerationRequest, Jobs, JobsConfig, Submit};
        let cpu = Device::Cpu;
        let manifest =
            crate::manifest::Manifest::find(std::path::Path::new("models"), "tiny-shapes").unwrap();
        let model = LoadedModel::random(&manifest, 0, &cpu).unwrap();
        let engine = crate::engine::Engine::start(vec![model], 16, cpu);
        let cfg = crate::config::ServerConfig::default();
        let jobs = Jobs::new(engine.clone(), JobsConfig::from_server(&cfg), None);
        let card = engine.card(&manifest.name).unwrap();
        let request = |prompt: &str| {
            let req = GenerationRequest {
                prompt: prompt.to_string(),
                seed: Some(1),
                ..Default::default()
            };
            validate(req, &card, &cfg).unwrap()
        };
        let submit = |prompt: &str| {
            jobs.submit(request(prompt), Submit::default())
                .unwrap()
                .cell
                .id
                .clone()
        };
        // Submitted together, so they share a batch that fails and is split.
        let good = submit("a red circle");
        let bad = submit(&format!("a blue square {INJECT_FAULT}"));
        let also_good = submit("a green triangle");
        assert!(jobs.wait(&good).await.is_ok());
        assert!(jobs.wait(&also_good).await.is_ok());
        match jobs.wait(&bad).await {
            Err(EngineError::Device(msg)) => assert!(msg.contains("injected"), "{msg}"),
            other => panic!("expected a device error, got {other:?}"),
        }
        let after = submit("a red circle");
        assert!(jobs.wait(&after).await.is_ok(), "the worker keeps serving");
        engine.shutdown(Duration::from_secs(5));
    }
}
