//! The job system every front end goes through: submit a validated request, then wait for it,
//! watch it (progress, partial images) or cancel it. Results are kept for `job_ttl_s` within
//! `job_results_bytes`, then expire. Media encoding runs here, off the device thread.
//!
//! Every finished job is also written to the generation log (when there is one), with its
//! generation when it completed, so [`Jobs::find`] can answer for a job this process no
//! longer holds: one another replica ran, or one that expired here.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rand::Rng;
use tokio::sync::{broadcast, oneshot};

use super::job::{JobCell, JobEvent, JobState, Progress, Stop};
use super::{BucketKey, Engine, EngineError, Job, JobOutput, Validated};
use crate::media::{self, OutputFormat};
use crate::store::{GenerationRecord, JobRecord, LogEntry, LogWriter, StoreError, StoredOutput};

/// How long finished jobs are kept, and in how many bytes of results.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub ttl: Duration,
    pub result_bytes: usize,
    /// Frames per second of encoded videos.
    pub fps: u32,
    /// Per-API-key rate and in-flight limits.
    pub key_limits: super::quota::KeyLimits,
}

impl JobsConfig {
    pub fn from_server(cfg: &crate::config::ServerConfig) -> Self {
        Self {
            ttl: Duration::from_secs(cfg.job_ttl_s),
            result_bytes: cfg.job_results_bytes,
            fps: cfg.video_fps,
            key_limits: super::quota::KeyLimits {
                rate_per_s: cfg.key_rate_per_s,
                burst: cfg.key_burst,
                max_in_flight: cfg.key_max_in_flight,
            },
        }
    }
}

/// Per-submission options beyond the validated request.
#[derive(Debug, Clone, Default)]
pub struct Submit {
    /// Partial images to send while denoising (0-3).
    pub partials: usize,
    /// A hash prefix of the caller's API key (logged, never the key).
    pub owner: Option<String>,
    /// Keep the encoded outputs in the generation log.
    pub keep_media: bool,
}

/// A job just queued, with a receiver of all its events.
pub struct Submitted {
    pub cell: Arc<JobCell>,
    pub events: broadcast::Receiver<JobEvent>,
}

/// A finished job's encoded outputs and timings.
#[derive(Debug)]
pub struct JobResult {
    pub output: JobOutput,
    /// One encoded file per output, in the request's format.
    pub encoded: Vec<Vec<u8>>,
    /// A PNG of each video's first frame (empty for images).
    pub thumbnails: Vec<Vec<u8>>,
    pub encoding_s: f64,
    pub total_s: f64,
}

impl JobResult {
    fn bytes(&self) -> usize {
        self.encoded
            .iter()
            .chain(&self.thumbnails)
            .map(Vec::len)
            .sum()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    #[error("no job {0:?} (unknown, or its result expired)")]
    NotFound(String),
    #[error("job {id} has already {state:?}")]
    Finished { id: String, state: JobState },
    /// The generation log could not be read (or held a row this version cannot read).
    #[error("the job log is unavailable: {0}")]
    Log(String),
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "job log lookup failed");
        Self::Log(e.to_string())
    }
}

/// What a front end shows of a job.
#[derive(Debug, Clone)]
pub struct JobView {
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub finished: Option<u64>,
    /// Unix seconds after which the result is gone.
    pub expires_at: Option<u64>,
    pub progress: Progress,
    pub request: Arc<Validated>,
    pub result: Option<Arc<JobResult>>,
    pub error: Option<EngineError>,
    /// The owner id of the API key that submitted it (`None` without keys).
    pub owner: Option<String>,
}

struct Entry {
    cell: Arc<JobCell>,
    request: Arc<Validated>,
    seq: u64,
    /// Unix milliseconds.
    created_ms: i64,
    /// When it finished, and in Unix milliseconds.
    finished: Option<(Instant, i64)>,
    opts: Submit,
    /// Shared with waiters, so a result evicted at once still reaches its caller.
    outcome: Arc<OnceLock<Outcome>>,
}

type Outcome = Result<Arc<JobResult>, EngineError>;

struct Inner {
    engine: Engine,
    cfg: JobsConfig,
    log: Option<LogWriter>,
    entries: Mutex<Registry>,
    seq: AtomicU64,
    rates: super::quota::RateLimiter,
}

/// The job registry; cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

fn new_id() -> String {
    let v: u128 = rand::rng().random();
    format!("gen_{:024x}", v >> 32)
}

impl Jobs {
    pub fn new(engine: Engine, cfg: JobsConfig, log: Option<LogWriter>) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                cfg,
                log,
                entries: Mutex::new(Registry::default()),
                seq: AtomicU64::new(0),
                rates: super::quota::RateLimiter::default(),
            }),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.entries.lock().expect("jobs lock poisoned")
    }

    /// Queues `v`; fails at once when the engine cannot take it (queue full, draining).
    /// Needs a tokio runtime: the job's completion runs as a task.
    pub fn submit(&self, v: Validated, opts: Submit) -> Result<Submitted, EngineError> {
        let id = new_id();
        let cell = JobCell::new(id.clone(), v.steps, opts.partials.min(3));
        // Subscribed before the worker can see the job, so no event is missed.
        let (_, events) = cell.subscribe();
        let request = Arc::new(v);
        let seq = self.inner.seq.fetch_add(1, Ordering::SeqCst);
        {
            let mut entries = self.entries();
            entries.prune(&self.inner.cfg, Instant::now());
            if let Some(owner) = &opts.owner {
                self.check_key_limits(&entries, owner)?;
            }
            entries.map.insert(
                id.clone(),
                Entry {
                    cell: cell.clone(),
                    request: request.clone(),
                    seq,
                    created_ms: crate::util::unix_ms(),
                    finished: None,
                    opts,
                    outcome: Arc::default(),
                },
            );
        }
        let (reply, rx) = oneshot::channel();
        let now = Instant::now();
        let job = Job {
            id: id.clone(),
            key: BucketKey {
                model: request.model.clone(),
                width: request.width,
                height: request.height,
                frames: request.frames,
                steps: request.steps,
                guidance_bits: request.guidance.to_bits(),
                canary: false,
            },
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            seeds: request.seeds.clone(),
            enqueued: now,
            deadline: now + request.timeout,
            cell: cell.clone(),
            reply,
        };
        if let Err(e) = self.inner.engine.submit(job) {
            self.entries().map.remove(&id);
            return Err(e);
        }
        if let Some(p) = self.position(&id) {
            cell.queued(p);
        }
        let jobs = self.clone();
        tokio::spawn(async move { jobs.complete(id, request, rx, now).await });
        Ok(Submitted { cell, events })
    }

    /// The per-key limits: `owner`'s request rate and its jobs in flight.
    fn check_key_limits(&self, entries: &Registry, owner: &str) -> Result<(), EngineError> {
        let limits = &self.inner.cfg.key_limits;
        if limits.max_in_flight > 0 {
            let in_flight = entries
                .map
                .values()
                .filter(|e| e.finished.is_none() && e.opts.owner.as_deref() == Some(owner))
                .count();
            if in_flight >= limits.max_in_flight {
                let snapshot = self.inner.engine.snapshot();
                return Err(EngineError::TooManyInFlight {
                    limit: limits.max_in_flight,
                    retry_after_s: self.inner.engine.retry_after_s(snapshot.queued_jobs),
                });
            }
        }
        self.inner
            .rates
            .take(limits, owner, Instant::now())
            .map_err(|retry_after_s| EngineError::RateLimited { retry_after_s })
    }

    /// Waits for the job's reply from the worker, encodes its media, stores the result.
    async fn complete(
        &self,
        id: String,
        v: Arc<Validated>,
        rx: oneshot::Receiver<Result<JobOutput, EngineError>>,
        submitted: Instant,
    ) {
        let Some(cell) = self.cell(&id) else { return };
        let reply = rx.await.unwrap_or(Err(EngineError::Draining));
        let outcome = match reply {
            Ok(out) if cell.stopped().is_none() => {
                cell.encoding_media();
                self.encode(&v, out, submitted).await
            }
            Ok(_) | Err(EngineError::Cancelled) => Err(EngineError::Cancelled),
            Err(e) => Err(e),
        };
        self.finish(&cell, outcome);
        self.entries().prune(&self.inner.cfg, Instant::now());
    }

    /// Records a job's outcome once (a cancel and the worker's reply may race), tells its
    /// subscribers, and hands it to the log.
    fn finish(&self, cell: &JobCell, outcome: Outcome) {
        let state = match &outcome {
            Ok(_) => JobState::Completed,
            Err(EngineError::Cancelled) => JobState::Cancelled,
            Err(_) => JobState::Failed,
        };
        let Some(settled) = self.entries().settle(&cell.id, outcome) else {
            return;
        };
        cell.finish(state);
        if let Some(log) = &self.inner.log {
            log.log(log_entry(&cell.id, &settled, &cell.snapshot()));
        }
    }

    async fn encode(
        &self,
        v: &Validated,
        out: JobOutput,
        submitted: Instant,
    ) -> Result<Arc<JobResult>, EngineError> {
        let start = Instant::now();
        let (format, fps, video) = (v.format, self.inner.cfg.fps, v.frames > 1);
        let frames = out.outputs.clone();
        // During a rollout, the reward proxy scores every output of both versions.
        let proxy = self.reward_proxy(&v.model).then(|| v.prompt.clone());
        let (encoded, rewards) = tokio::task::spawn_blocking(move || {
            let rewards = proxy.map(|prompt| proxy_scores(&prompt, &frames));
            encode_all(&frames, format, fps, video).map(|e| (e, rewards))
        })
        .await
        .map_err(|e| EngineError::Generation(format!("encoding: {e}")))?
        .map_err(|e| EngineError::Generation(format!("encoding: {e}")))?;
        if let Some(scores) = rewards {
            self.inner
                .engine
                .record_rewards(&v.model, &out.model_version, &scores);
        }
        let encoding_s = start.elapsed().as_secs_f64();
        let total_s = submitted.elapsed().as_secs_f64();
        metrics::histogram!("fewstep_stage_seconds", "stage" => "encoding").record(encoding_s);
        metrics::histogram!("fewstep_stage_seconds", "stage" => "queue").record(out.queue_s);
        metrics::histogram!("fewstep_stage_seconds", "stage" => "total").record(total_s);
        metrics::counter!("fewstep_outputs_generated_total", "kind" => v.kind())
            .increment(v.n as u64);
        let result = JobResult {
            output: JobOutput {
                // The frames live on in the encoded media only.
                outputs: Vec::new(),
                ..out
            },
            encoded: encoded.0,
            thumbnails: encoded.1,
            encoding_s,
            total_s,
        };
        Ok(Arc::new(result))
    }

    /// Whether `model`'s outputs get a reward-proxy score now: during a rollout, for a
    /// ShapesWorld family, whose verifier is exact and cheap (a few ms per 32x32 output).
    fn reward_proxy(&self, model: &str) -> bool {
        let engine = &self.inner.engine;
        engine.rollout_active(model)
            && engine
                .card(model)
                .is_some_and(|c| c.manifest.family().capabilities().shapes_world)
    }

    fn cell(&self, id: &str) -> Option<Arc<JobCell>> {
        self.entries().map.get(id).map(|e| e.cell.clone())
    }

    /// The job's shared state, for subscribing to its events.
    pub fn get(&self, id: &str) -> Option<Arc<JobCell>> {
        let mut entries = self.entries();
        entries.prune(&self.inner.cfg, Instant::now());
        entries.map.get(id).map(|e| e.cell.clone())
    }

    /// 1-based place among the queued jobs (in arrival order), while queued.
    fn position(&self, id: &str) -> Option<usize> {
        self.entries().position(id)
    }

    pub fn view(&self, id: &str) -> Option<JobView> {
        let mut entries = self.entries();
        entries.prune(&self.inner.cfg, Instant::now());
        let position = entries.position(id);
        let e = entries.map.get(id)?;
        let mut progress = e.cell.snapshot();
        progress.position = position;
        let ttl = self.inner.cfg.ttl.as_secs();
        let finished = e.finished.map(|f| f.1 as u64 / 1000);
        Some(JobView {
            id: id.to_string(),
            created: e.created_ms as u64 / 1000,
            finished,
            expires_at: finished.map(|f| f + ttl),
            progress,
            request: e.request.clone(),
            result: e.outcome.get().and_then(|o| o.as_ref().ok().cloned()),
            error: e.outcome.get().and_then(|o| o.as_ref().err().cloned()),
            owner: e.opts.owner.clone(),
        })
    }

    /// The job as this process holds it or, failing that, as the generation log has it (run
    /// by another replica, or expired here). `None` when neither knows it.
    pub async fn find(&self, id: &str) -> Result<Option<JobView>, JobError> {
        if let Some(v) = self.view(id) {
            return Ok(Some(v));
        }
        let Some(log) = &self.inner.log else {
            return Ok(None);
        };
        // A job of this process may have finished a moment ago, its row still on its way.
        log.settle(id, LOG_SETTLE).await;
        let Some(job) = log.store.job(id).await? else {
            return Ok(None);
        };
        let generation = if job.state == JobState::Completed.as_str() {
            log.store.generation(id).await?
        } else {
            None
        };
        Ok(Some(logged_view(job, generation, self.inner.cfg.fps)?))
    }

    /// Every job kept, newest first.
    pub fn list(&self) -> Vec<JobView> {
        let ids: Vec<(u64, String)> = {
            let mut entries = self.entries();
            entries.prune(&self.inner.cfg, Instant::now());
            entries
                .map
                .iter()
                .map(|(id, e)| (e.seq, id.clone()))
                .collect()
        };
        let mut views: Vec<(u64, JobView)> = ids
            .into_iter()
            .filter_map(|(seq, id)| self.view(&id).map(|v| (seq, v)))
            .collect();
        views.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        views.into_iter().map(|(_, v)| v).collect()
    }

    /// Waits until the job has finished and returns its result.
    pub async fn wait(&self, id: &str) -> Result<Arc<JobResult>, EngineError> {
        let (cell, outcome) = {
            let entries = self.entries();
            let e = entries.map.get(id).ok_or(EngineError::Cancelled)?;
            (e.cell.clone(), e.outcome.clone())
        };
        cell.finished().await;
        outcome
            .get()
            .cloned()
            .unwrap_or(Err(EngineError::Cancelled))
    }

    /// Cancels a queued job (it leaves the queue now) or a running one (its rows leave the
    /// batch at the next step). A job that only the log knows has finished, so cancelling it
    /// is refused as for any finished job.
    pub async fn cancel(&self, id: &str) -> Result<JobView, JobError> {
        match self.stop(id, Stop::Cancelled) {
            Ok(()) => self
                .view(id)
                .ok_or_else(|| JobError::NotFound(id.to_string())),
            Err(JobError::NotFound(_)) => match self.find(id).await? {
                Some(v) => Err(JobError::Finished {
                    id: id.to_string(),
                    state: v.progress.state,
                }),
                None => Err(JobError::NotFound(id.to_string())),
            },
            Err(e) => Err(e),
        }
    }

    /// Cancels the job if it has not finished, then forgets it, here and in the log (its
    /// generation stays logged).
    pub async fn remove(&self, id: &str) -> Result<(), JobError> {
        let here = match self.stop(id, Stop::Cancelled) {
            Ok(()) | Err(JobError::Finished { .. }) => true,
            Err(JobError::NotFound(_)) => false,
            Err(e) => return Err(e),
        };
        self.entries().remove(id);
        let logged = match &self.inner.log {
            Some(log) => {
                log.settle(id, LOG_SETTLE).await;
                log.store.delete_job(id).await?
            }
            None => false,
        };
        if here || logged {
            Ok(())
        } else {
            Err(JobError::NotFound(id.to_string()))
        }
    }

    /// Stops a job for `why`; a queued job's admission slot is released at once.
    pub fn stop(&self, id: &str, why: Stop) -> Result<(), JobError> {
        let cell = self
            .cell(id)
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        match cell.stop(why) {
            Ok(was_queued) => {
                if was_queued {
                    let cost = self.entries().map.get(id).map_or(0, |e| e.request.cost());
                    self.inner.engine.release_slot(cost);
                }
                self.finish(&cell, Err(EngineError::Cancelled));
                Ok(())
            }
            Err(state) => Err(JobError::Finished {
                id: id.to_string(),
                state,
            }),
        }
    }
}

/// The kept jobs, and the finished ones in the order they finished (for expiry).
#[derive(Default)]
struct Registry {
    map: HashMap<String, Entry>,
    finished: VecDeque<(Instant, String)>,
    /// Bytes of the results in `map`.
    bytes: usize,
}

fn result_bytes(e: &Entry) -> usize {
    match e.outcome.get() {
        Some(Ok(r)) => r.bytes(),
        _ => 0,
    }
}

/// What the log needs of a job that just finished.
struct Settled {
    request: Arc<Validated>,
    created_ms: i64,
    finished_ms: i64,
    opts: Submit,
    outcome: Outcome,
}

impl Registry {
    /// Records a job's outcome once (a cancel and the worker's reply may race); `None` when
    /// it was recorded before (or the job is gone).
    fn settle(&mut self, id: &str, outcome: Outcome) -> Option<Settled> {
        let e = self.map.get_mut(id)?;
        e.outcome.set(outcome).ok()?;
        let (now, now_ms) = (Instant::now(), crate::util::unix_ms());
        e.finished = Some((now, now_ms));
        let settled = Settled {
            request: e.request.clone(),
            created_ms: e.created_ms,
            finished_ms: now_ms,
            opts: e.opts.clone(),
            outcome: e.outcome.get()?.clone(),
        };
        self.bytes += result_bytes(e);
        self.finished.push_back((now, id.to_string()));
        Some(settled)
    }

    fn remove(&mut self, id: &str) {
        if let Some(e) = self.map.remove(id) {
            self.bytes -= result_bytes(&e);
        }
    }

    /// 1-based place among the queued jobs (in arrival order), while queued.
    fn position(&self, id: &str) -> Option<usize> {
        let me = self.map.get(id)?;
        if me.cell.snapshot().state != JobState::Queued {
            return None;
        }
        let ahead = self
            .map
            .values()
            .filter(|e| e.seq < me.seq && e.cell.snapshot().state == JobState::Queued)
            .count();
        Some(ahead + 1)
    }

    /// Forgets finished jobs older than the TTL, then the oldest finished ones while their
    /// results exceed the byte budget. Only looks at what expires.
    fn prune(&mut self, cfg: &JobsConfig, now: Instant) {
        while let Some((at, id)) = self.finished.front() {
            let expired = now.saturating_duration_since(*at) >= cfg.ttl;
            if !expired && self.bytes <= cfg.result_bytes {
                break;
            }
            let id = id.clone();
            self.finished.pop_front();
            self.remove(&id);
        }
    }
}

/// Encoded files, one per output.
type Files = Vec<Vec<u8>>;

/// Encodes every output (and, for videos, a PNG thumbnail of its first frame).
/// The verifier's soft score of each output against `prompt`; none when the prompt is not
/// in the world's grammar (users may type anything).
fn proxy_scores(prompt: &str, outputs: &[Vec<image::RgbImage>]) -> Vec<f32> {
    outputs
        .iter()
        .filter_map(|frames| crate::reward::VerifierReward::verdict(prompt, frames).ok())
        .map(|v| v.score)
        .collect()
}

fn encode_all(
    outputs: &[Vec<image::RgbImage>],
    format: OutputFormat,
    fps: u32,
    video: bool,
) -> Result<(Files, Files), media::MediaError> {
    let encoded = outputs
        .iter()
        .map(|f| media::encode(f, format, fps))
        .collect::<Result<Vec<_>, _>>()?;
    let thumbnails = if video {
        outputs
            .iter()
            .map(|f| media::encode(&f[..1], OutputFormat::Png, fps))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    Ok((encoded, thumbnails))
}

/// How long a lookup waits for this process's own log row of a job that just finished.
const LOG_SETTLE: Duration = Duration::from_secs(2);

/// The log rows of a finished job: its state and, when it completed, its generation.
fn log_entry(id: &str, s: &Settled, progress: &Progress) -> LogEntry {
    let v = &s.request;
    let state = progress.state;
    LogEntry {
        job: JobRecord {
            id: id.to_string(),
            model: v.model.clone(),
            state: state.as_str().to_string(),
            created_ms: s.created_ms,
            finished_ms: s.finished_ms,
            request: serde_json::to_value(v.as_ref()).unwrap_or_default(),
            progress: serde_json::to_value(progress).unwrap_or_default(),
            error: s
                .outcome
                .as_ref()
                .err()
                .and_then(|e| serde_json::to_value(e).ok()),
            api_key_id: s.opts.owner.clone(),
        },
        generation: s
            .outcome
            .as_ref()
            .ok()
            .map(|r| generation_record(id, s.finished_ms, v, r, &s.opts)),
    }
}

/// A job as the log has it, in the shape of a live one (no expiry: the log keeps it). A
/// completed job has its result when its model keeps media (`keep_media`); a video's
/// thumbnail is made again from its first frame.
fn logged_view(
    job: JobRecord,
    generation: Option<GenerationRecord>,
    fps: u32,
) -> Result<JobView, StoreError> {
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Corrupt(format!("job {}: {what}: {e}", job.id))
    };
    let request: Validated =
        serde_json::from_value(job.request.clone()).map_err(|e| corrupt("request", &e))?;
    let progress: Progress =
        serde_json::from_value(job.progress.clone()).map_err(|e| corrupt("progress", &e))?;
    let error: Option<EngineError> = job
        .error
        .clone()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| corrupt("error", &e))?;
    let result = match generation.filter(|g| !g.outputs.is_empty()) {
        Some(g) => Some(Arc::new(
            logged_result(&g, request.frames > 1, fps).map_err(|e| corrupt("outputs", &e))?,
        )),
        None => None,
    };
    Ok(JobView {
        owner: job.api_key_id,
        id: job.id,
        created: job.created_ms as u64 / 1000,
        finished: Some(job.finished_ms as u64 / 1000),
        expires_at: None,
        progress,
        request: Arc::new(request),
        result,
        error,
    })
}

/// A completed job's result from its logged generation and kept outputs.
fn logged_result(g: &GenerationRecord, video: bool, fps: u32) -> Result<JobResult, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let encoded = g
        .outputs
        .iter()
        .map(|o| b64.decode(&o.data).map_err(|e| e.to_string()))
        .collect::<Result<Files, _>>()?;
    let thumbnails = if video {
        g.outputs
            .iter()
            .zip(&encoded)
            .map(|(o, bytes)| {
                let frames = media::decode(bytes, &o.media_type).map_err(|e| e.to_string())?;
                media::encode(&frames[..1.min(frames.len())], OutputFormat::Png, fps)
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<Files, _>>()?
    } else {
        Vec::new()
    };
    let ms = |k: &str| g.timings[k].as_f64().unwrap_or(0.0) / 1e3;
    Ok(JobResult {
        output: JobOutput {
            outputs: Vec::new(),
            model_version: g.model_version.clone(),
            batch_size: g.batch_size as usize,
            queue_s: ms("queue_ms"),
            text_s: ms("text_encoding_ms"),
            denoise_s: ms("denoising_ms"),
            decode_s: ms("decoding_ms"),
        },
        encoded,
        thumbnails,
        encoding_s: ms("encoding_ms"),
        total_s: ms("total_ms"),
    })
}

/// The generation row of a completed job.
fn generation_record(
    id: &str,
    created_ms: i64,
    v: &Validated,
    r: &JobResult,
    opts: &Submit,
) -> GenerationRecord {
    let b64 = base64::engine::general_purpose::STANDARD;
    let out = &r.output;
    GenerationRecord {
        id: id.to_string(),
        created_ms,
        model: v.model.clone(),
        model_version: out.model_version.clone(),
        prompt: v.prompt.clone(),
        negative_prompt: v.negative_prompt.clone(),
        kind: v.kind().into(),
        width: v.width as i64,
        height: v.height as i64,
        frames: v.frames as i64,
        steps: v.steps as i64,
        guidance: v.guidance as f64,
        seeds: v.seeds.clone(),
        batch_size: out.batch_size as i64,
        timings: serde_json::json!({
            "queue_ms": out.queue_s * 1e3,
            "text_encoding_ms": out.text_s * 1e3,
            "denoising_ms": out.denoise_s * 1e3,
            "decoding_ms": out.decode_s * 1e3,
            "encoding_ms": r.encoding_s * 1e3,
            "total_ms": r.total_s * 1e3,
        }),
        api_key_id: opts.owner.clone(),
        outputs: if opts.keep_media {
            r.encoded
                .iter()
                .enumerate()
                .map(|(i, bytes)| StoredOutput {
                    index: i as i64,
                    media_type: v.format.media_type().to_string(),
                    data: b64.encode(bytes),
                })
                .collect()
        } else {
            Vec::new()
        },
    }
}
