//! The job system every front end goes through: submit a validated request, then wait for it,
//! watch it (progress, partial images) or cancel it. Results are kept for `job_ttl_s` within
//! `job_results_bytes`, then expire. Media encoding runs here, off the device thread.

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
use crate::store::{GenerationRecord, LogWriter, StoredOutput};

/// How long finished jobs are kept, and in how many bytes of results.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub ttl: Duration,
    pub result_bytes: usize,
    /// Frames per second of encoded videos.
    pub fps: u32,
}

impl JobsConfig {
    pub fn from_server(cfg: &crate::config::ServerConfig) -> Self {
        Self {
            ttl: Duration::from_secs(cfg.job_ttl_s),
            result_bytes: cfg.job_results_bytes,
            fps: cfg.video_fps,
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
}

struct Entry {
    cell: Arc<JobCell>,
    request: Arc<Validated>,
    seq: u64,
    created: u64,
    finished: Option<(Instant, u64)>,
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
            entries.map.insert(
                id.clone(),
                Entry {
                    cell: cell.clone(),
                    request: request.clone(),
                    seq,
                    created: crate::util::unix_ms() as u64 / 1000,
                    finished: None,
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
        tokio::spawn(async move { jobs.complete(id, request, rx, now, opts).await });
        Ok(Submitted { cell, events })
    }

    /// Waits for the job's reply from the worker, encodes its media, stores the result.
    async fn complete(
        &self,
        id: String,
        v: Arc<Validated>,
        rx: oneshot::Receiver<Result<JobOutput, EngineError>>,
        submitted: Instant,
        opts: Submit,
    ) {
        let Some(cell) = self.cell(&id) else { return };
        let reply = rx.await.unwrap_or(Err(EngineError::Draining));
        let outcome = match reply {
            Ok(out) if cell.stopped().is_none() => {
                cell.encoding_media();
                self.encode(&id, &v, out, submitted, &opts).await
            }
            Ok(_) | Err(EngineError::Cancelled) => Err(EngineError::Cancelled),
            Err(e) => Err(e),
        };
        let state = match &outcome {
            Ok(_) => JobState::Completed,
            Err(EngineError::Cancelled) => JobState::Cancelled,
            Err(_) => JobState::Failed,
        };
        {
            self.entries().settle(&id, outcome);
        }
        cell.finish(state);
        self.entries().prune(&self.inner.cfg, Instant::now());
    }

    async fn encode(
        &self,
        id: &str,
        v: &Validated,
        out: JobOutput,
        submitted: Instant,
        opts: &Submit,
    ) -> Result<Arc<JobResult>, EngineError> {
        let start = Instant::now();
        let (format, fps, video) = (v.format, self.inner.cfg.fps, v.frames > 1);
        let frames = out.outputs.clone();
        let encoded = tokio::task::spawn_blocking(move || encode_all(&frames, format, fps, video))
            .await
            .map_err(|e| EngineError::Generation(format!("encoding: {e}")))?
            .map_err(|e| EngineError::Generation(format!("encoding: {e}")))?;
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
        if let Some(log) = &self.inner.log {
            log.log(log_record(id, v, &result, opts));
        }
        Ok(Arc::new(result))
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
        Some(JobView {
            id: id.to_string(),
            created: e.created,
            finished: e.finished.map(|f| f.1),
            expires_at: e.finished.map(|f| f.1 + ttl),
            progress,
            request: e.request.clone(),
            result: e.outcome.get().and_then(|o| o.as_ref().ok().cloned()),
            error: e.outcome.get().and_then(|o| o.as_ref().err().cloned()),
        })
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
    /// batch at the next step).
    pub fn cancel(&self, id: &str) -> Result<JobView, JobError> {
        self.stop(id, Stop::Cancelled)?;
        self.view(id)
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    /// Cancels the job if it has not finished, then forgets it.
    pub fn remove(&self, id: &str) -> Result<(), JobError> {
        match self.stop(id, Stop::Cancelled) {
            Ok(()) | Err(JobError::Finished { .. }) => {}
            Err(e) => return Err(e),
        }
        self.entries().remove(id);
        Ok(())
    }

    /// Stops a job for `why`; a queued job's admission slot is released at once.
    pub fn stop(&self, id: &str, why: Stop) -> Result<(), JobError> {
        let cell = self
            .cell(id)
            .ok_or_else(|| JobError::NotFound(id.to_string()))?;
        match cell.stop(why) {
            Ok(was_queued) => {
                if was_queued {
                    self.inner.engine.release_slot();
                }
                self.entries().settle(id, Err(EngineError::Cancelled));
                cell.finish(JobState::Cancelled);
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

impl Registry {
    /// Records a job's outcome once (a cancel and the worker's reply may race).
    fn settle(&mut self, id: &str, outcome: Outcome) {
        let Some(e) = self.map.get_mut(id) else {
            return;
        };
        if e.outcome.set(outcome).is_ok() {
            let now = Instant::now();
            e.finished = Some((now, crate::util::unix_ms() as u64 / 1000));
            self.bytes += result_bytes(e);
            self.finished.push_back((now, id.to_string()));
        }
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

/// The log row of a finished job.
fn log_record(id: &str, v: &Validated, r: &JobResult, opts: &Submit) -> GenerationRecord {
    let b64 = base64::engine::general_purpose::STANDARD;
    let out = &r.output;
    GenerationRecord {
        id: id.to_string(),
        created_ms: crate::util::unix_ms(),
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
