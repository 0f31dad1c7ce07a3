//! The engine: admission into a bounded queue, bucketing by generation shape, and one worker
//! thread per device that owns the models and runs lock-step batches.
//!
//! Handlers never touch device tensors: they submit a [`Job`] and await its reply. The worker
//! picks the bucket whose oldest job has waited longest (so no bucket starves), waits up to
//! the model's `max_wait_ms` for company when recent arrivals of that bucket overlapped (a
//! lone closed-loop client runs at once) and only until the bucket holds the rows of its last
//! batch plus those queued while it ran, and runs up to `max_batch` rows in one pass.

mod batcher;
mod canary;
pub mod job;
pub mod jobs;
mod observer;
pub mod quota;
mod rate;
pub mod validation;
mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use candle_core::Device;
use image::RgbImage;
use tokio::sync::oneshot;

use crate::manifest::{LoadedModel, Manifest};

pub use batcher::BucketKey;
pub use canary::{in_canary, ArmCounts, CanaryCard, RolloutCounts, Rollouts};
pub use job::{JobCell, JobEvent, JobState, Progress, Stage, Stop};
pub use jobs::{JobError, JobResult, JobView, Jobs, JobsConfig, Submit, Submitted};
pub use validation::{validate, GenerationRequest, Validated, ValidationError};

/// Why a job did not produce its result (logged with the job, hence serde).
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum EngineError {
    #[error("the queue is full ({capacity} requests waiting); retry in {retry_after_s} s")]
    QueueFull { capacity: usize, retry_after_s: u64 },
    #[error("this API key sends requests faster than its limit; retry in {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    #[error("this API key has {limit} jobs in flight, its limit; retry in {retry_after_s} s")]
    TooManyInFlight { limit: usize, retry_after_s: u64 },
    #[error(
        "the queue's work budget is spent ({queued_cost} of {budget} units of pixels x frames x \
         steps x n queued, this request needs {cost}); retry in {retry_after_s} s"
    )]
    CostBudgetFull {
        cost: u64,
        queued_cost: u64,
        budget: u64,
        retry_after_s: u64,
    },
    #[error("the server is not ready yet")]
    NotReady,
    #[error("the server is shutting down")]
    Draining,
    #[error("no model named {0:?} is loaded")]
    UnknownModel(String),
    #[error("the request's deadline passed before it could run")]
    DeadlineExceeded,
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("reload refused: {0}")]
    Reload(String),
    #[error("the job was cancelled")]
    Cancelled,
    /// The device failed on this job even alone (its batch was retried in halves first).
    #[error("the device failed on this request: {0}")]
    Device(String),
    /// The weights' recorded identity (family, architecture, role, parent) is another model's.
    #[error("reload refused: {0}")]
    ModelMismatch(String),
    /// Promote or roll back with no canary serving.
    #[error("model {0:?} has no canary version serving")]
    NoCanary(String),
}

/// What a loaded model can do, as the API validates and reports it.
#[derive(Debug, Clone)]
pub struct ModelCard {
    pub manifest: Manifest,
    pub version: String,
    pub trained: bool,
    /// Unix seconds when this version was loaded.
    pub created: u64,
    /// Size of the serving weights, which bounds what a reload may read.
    pub weights_bytes: u64,
    /// A new version serving a share of the traffic beside this one, if any.
    pub canary: Option<CanaryCard>,
}

impl ModelCard {
    /// The card of a model just loaded (or swapped in), with its canary if one serves.
    pub(crate) fn of(m: &LoadedModel, canary: Option<CanaryCard>) -> Self {
        Self {
            manifest: m.manifest.clone(),
            version: m.version.clone(),
            trained: m.trained,
            created: crate::util::unix_ms() as u64 / 1000,
            weights_bytes: m.weights_bytes,
            canary,
        }
    }
}

/// A rollout that ended (promoted or rolled back): the model as it now serves, the canary
/// that left, and what both versions did meanwhile.
#[derive(Debug, Clone)]
pub struct RolloutEnd {
    pub card: ModelCard,
    pub canary: CanaryCard,
    pub counts: Option<RolloutCounts>,
}

/// One request: `seeds.len()` outputs of one prompt.
pub struct Job {
    pub id: String,
    pub key: BucketKey,
    pub prompt: String,
    pub negative_prompt: String,
    pub seeds: Vec<u64>,
    pub enqueued: Instant,
    pub deadline: Instant,
    /// Progress, partial images and cancel, shared with the front ends.
    pub cell: Arc<JobCell>,
    pub reply: oneshot::Sender<Result<JobOutput, EngineError>>,
}

impl Job {
    pub fn rows(&self) -> usize {
        self.seeds.len()
    }

    /// What the job costs the queue: pixels x frames x steps x outputs.
    pub fn cost(&self) -> u64 {
        work_cost(
            self.key.width,
            self.key.height,
            self.key.frames,
            self.key.steps,
            self.rows(),
        )
    }
}

/// Pixels x frames x steps x outputs: the unit of the queue's cost budget.
pub fn work_cost(width: usize, height: usize, frames: usize, steps: usize, n: usize) -> u64 {
    [width, height, frames, steps, n]
        .iter()
        .fold(1u64, |acc, &x| acc.saturating_mul(x as u64))
}

/// The result of one job, with the stage timings of the batch it ran in.
#[derive(Debug, Clone)]
pub struct JobOutput {
    pub outputs: Vec<Vec<RgbImage>>,
    pub model_version: String,
    /// Rows in the batch this job ran in (across all its jobs).
    pub batch_size: usize,
    pub queue_s: f64,
    pub text_s: f64,
    pub denoise_s: f64,
    pub decode_s: f64,
}

/// A snapshot of the queue for `/admin/queue` and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueueSnapshot {
    pub queued_jobs: usize,
    pub capacity: usize,
    pub ready: bool,
    pub draining: bool,
}

pub(crate) struct Shared {
    queued: AtomicUsize,
    /// The summed [`Job::cost`] of the queued jobs, and its limit.
    queued_cost: AtomicU64,
    cost_budget: AtomicU64,
    /// Wait for company only when it is expected (see `batcher::Company`).
    adaptive_wait: AtomicBool,
    capacity: usize,
    ready: AtomicBool,
    draining: AtomicBool,
    cards: RwLock<BTreeMap<String, ModelCard>>,
    /// Jobs completed per second, for `Retry-After`.
    rate: rate::DrainRate,
    /// What each version of a live canary rollout has done.
    rollouts: Rollouts,
}

impl Shared {
    fn set_card(&self, card: ModelCard) {
        let mut cards = self.cards.write().expect("cards lock poisoned");
        cards.insert(card.manifest.name.clone(), card);
    }
}

pub(crate) enum Msg {
    Job(Job),
    Reload {
        model: String,
        weights: std::path::PathBuf,
        /// Serve the new weights to this share of traffic beside the current version.
        canary: Option<f64>,
        reply: oneshot::Sender<Result<ModelCard, EngineError>>,
    },
    /// End a model's rollout: the canary becomes the only version (`promote`) or leaves.
    EndRollout {
        model: String,
        promote: bool,
        reply: oneshot::Sender<Result<RolloutEnd, EngineError>>,
    },
    /// Finish the accepted jobs, then exit.
    Stop,
}

/// A cloneable handle to the engine. The worker stops when the last handle is dropped, after
/// finishing every job it has accepted.
#[derive(Clone)]
pub struct Engine {
    tx: std::sync::mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    worker: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Engine {
    /// Starts the worker thread and loads `models` on it; the engine reports ready once all
    /// are loaded.
    pub fn start(models: Vec<LoadedModel>, queue_capacity: usize, device: Device) -> Self {
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            queued_cost: AtomicU64::new(0),
            cost_budget: AtomicU64::new(u64::MAX),
            adaptive_wait: AtomicBool::new(true),
            capacity: queue_capacity,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            cards: RwLock::new(BTreeMap::new()),
            rate: rate::DrainRate::default(),
            rollouts: Rollouts::default(),
        });
        for m in &models {
            shared.set_card(ModelCard::of(m, None));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let worker_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("fewstep-device-0".into())
            .spawn(move || worker::run(models, rx, worker_shared, device))
            .expect("spawning the device worker");
        shared.ready.store(true, Ordering::SeqCst);
        Self {
            tx,
            shared,
            worker: Arc::new(Mutex::new(Some(handle))),
        }
    }

    /// Queues a job. Fails at once when the queue is full, the engine is not ready or it is
    /// draining; never blocks.
    pub(crate) fn submit(&self, job: Job) -> Result<(), EngineError> {
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(EngineError::Draining);
        }
        if !self.shared.ready.load(Ordering::SeqCst) {
            return Err(EngineError::NotReady);
        }
        let cap = self.shared.capacity;
        let admitted = self
            .shared
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < cap).then_some(q + 1)
            });
        if let Err(queued) = admitted {
            return Err(EngineError::QueueFull {
                capacity: cap,
                retry_after_s: self.shared.rate.retry_after_s(queued),
            });
        }
        // The work budget: a job alone in the queue always fits (validation bounds it).
        let cost = job.cost();
        let budget = self.shared.cost_budget.load(Ordering::SeqCst);
        let admitted =
            self.shared
                .queued_cost
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                    (c == 0 || c.saturating_add(cost) <= budget).then_some(c.saturating_add(cost))
                });
        if let Err(queued_cost) = admitted {
            let queued = self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::CostBudgetFull {
                cost,
                queued_cost,
                budget,
                retry_after_s: self.shared.rate.retry_after_s(queued),
            });
        }
        metrics::gauge!("fewstep_queue_depth").increment(1.0);
        self.tx.send(Msg::Job(job)).map_err(|_| {
            self.release_slot(cost);
            EngineError::Draining
        })
    }

    /// Seconds for `queued` jobs to drain at the measured rate (for `Retry-After`).
    pub fn retry_after_s(&self, queued: usize) -> u64 {
        self.shared.rate.retry_after_s(queued)
    }

    /// Limits the summed cost (pixels x frames x steps x n) of the queued jobs.
    pub fn set_cost_budget(&self, budget: u64) {
        self.shared
            .cost_budget
            .store(budget.max(1), Ordering::SeqCst);
    }

    /// Whether a lone job runs at once when no company is expected (`true`, the default) or
    /// always waits its model's `max_wait_ms`.
    pub fn set_adaptive_wait(&self, adaptive: bool) {
        self.shared.adaptive_wait.store(adaptive, Ordering::SeqCst);
    }

    /// Loads `weights` for `model` beside the serving copy and validates it with a smoke
    /// generation. Without `canary` it replaces the serving version (and ends any rollout)
    /// between batches; with `canary = Some(share)` it serves that share of new generations
    /// beside it until promoted or rolled back. The old version keeps serving on error.
    pub async fn reload(
        &self,
        model: &str,
        weights: std::path::PathBuf,
        canary: Option<f64>,
    ) -> Result<ModelCard, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Reload {
                model: model.to_string(),
                weights,
                canary,
                reply,
            })
            .map_err(|_| EngineError::Draining)?;
        rx.await.map_err(|_| EngineError::Draining)?
    }

    /// Makes the canary of `model` its only version (jobs already routed to it stay on it).
    pub async fn promote(&self, model: &str) -> Result<RolloutEnd, EngineError> {
        self.end_rollout(model, true).await
    }

    /// Drops the canary of `model`; its queued jobs run on the stable version.
    pub async fn rollback(&self, model: &str) -> Result<RolloutEnd, EngineError> {
        self.end_rollout(model, false).await
    }

    async fn end_rollout(&self, model: &str, promote: bool) -> Result<RolloutEnd, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::EndRollout {
                model: model.to_string(),
                promote,
                reply,
            })
            .map_err(|_| EngineError::Draining)?;
        rx.await.map_err(|_| EngineError::Draining)?
    }

    /// What both versions of `model`'s live rollout have done, if one is live.
    pub fn rollout_counts(&self, model: &str) -> Option<RolloutCounts> {
        self.shared.rollouts.get(model)
    }

    /// Whether `model` has a live rollout (so its outputs are worth scoring).
    pub fn rollout_active(&self, model: &str) -> bool {
        self.shared.rollouts.is_active(model)
    }

    /// Adds reward-proxy scores of outputs that `version` of `model` made.
    pub fn record_rewards(&self, model: &str, version: &str, scores: &[f32]) {
        self.shared.rollouts.record_rewards(model, version, scores);
    }

    /// Gives back the admission slot of a job (of `cost`) that left the queue without running.
    pub(crate) fn release_slot(&self, cost: u64) {
        self.shared.queued_cost.fetch_sub(cost, Ordering::SeqCst);
        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!("fewstep_queue_depth").decrement(1.0);
    }

    pub fn card(&self, model: &str) -> Option<ModelCard> {
        self.shared
            .cards
            .read()
            .expect("cards lock poisoned")
            .get(model)
            .cloned()
    }

    pub fn cards(&self) -> Vec<ModelCard> {
        self.shared
            .cards
            .read()
            .expect("cards lock poisoned")
            .values()
            .cloned()
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::SeqCst) && !self.shared.draining.load(Ordering::SeqCst)
    }

    /// Stops admitting new jobs; accepted ones still run.
    pub fn start_draining(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    pub fn snapshot(&self) -> QueueSnapshot {
        QueueSnapshot {
            queued_jobs: self.shared.queued.load(Ordering::SeqCst),
            capacity: self.shared.capacity,
            ready: self.shared.ready.load(Ordering::SeqCst),
            draining: self.shared.draining.load(Ordering::SeqCst),
        }
    }

    /// Stops admitting, lets the worker finish the accepted jobs, and waits up to `timeout`
    /// for it to exit. Returns whether it did.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        self.start_draining();
        let _ = self.tx.send(Msg::Stop);
        let handle = self.worker.lock().expect("worker lock poisoned").take();
        let Some(handle) = handle else { return true };
        let deadline = Instant::now() + timeout;
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        handle.join().is_ok()
    }
}
