//! One job's shared state: the handle the worker updates as the job moves through the queue
//! and the denoising steps, and that every front end reads (status, events, cancel).
//!
//! Leaving the queue is a single atomic transition (claimed by the worker, cancelled by a
//! client, abandoned by a closed connection, or expired at its deadline): whoever wins it
//! releases the job's admission slot, so the queue count is exact and a cancelled job frees
//! its slot at once.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use image::RgbImage;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The name clients see (and the log's `state` column holds).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// What a running job is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Text encoding.
    Encode,
    Denoise,
    /// Latents or pixels to frames.
    Decode,
    /// Frames to PNG, GIF, MP4, ...
    EncodeMedia,
}

/// A job's progress as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub state: JobState,
    /// 1-based place in the queue while queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    /// Denoising steps done, of `steps`.
    pub step: usize,
    pub steps: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// 0-100, never decreasing; 100 only once the result is ready.
    pub percent: u8,
    /// Seconds left, from the batch's measured step times.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
}

/// What a job's subscribers hear, in order.
#[derive(Debug, Clone)]
pub enum JobEvent {
    Queued {
        position: usize,
    },
    Progress(Progress),
    /// The rows' intermediate x0 estimate after `step` (one frame list per output).
    Partial {
        step: usize,
        index: usize,
        frames: Arc<Vec<Vec<RgbImage>>>,
    },
    /// The job reached `state` (completed, failed or cancelled).
    Finished(JobState),
}

/// Who ended a queued or running job early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A client asked (`DELETE /jobs/{id}`).
    Cancelled,
    /// The synchronous client hung up.
    ClientGone,
}

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const ENDED: u8 = 2;
const CANCELLED: u8 = 3;
const GONE: u8 = 4;

/// The state one job shares between the worker and the front ends.
pub struct JobCell {
    pub id: String,
    pub steps: usize,
    /// Partial images wanted (0-3), spread over the denoising steps.
    pub partials: usize,
    phase: AtomicU8,
    progress: Mutex<Progress>,
    events: broadcast::Sender<JobEvent>,
    finished: watch::Sender<bool>,
}

impl JobCell {
    pub fn new(id: String, steps: usize, partials: usize) -> Arc<Self> {
        // Room for every step, the partials and the end, so a subscriber that keeps up never
        // misses a step.
        let (events, _) = broadcast::channel(steps + partials + 16);
        Arc::new(Self {
            id,
            steps,
            partials,
            phase: AtomicU8::new(QUEUED),
            progress: Mutex::new(Progress {
                state: JobState::Queued,
                position: None,
                step: 0,
                steps,
                stage: None,
                percent: 0,
                eta_s: None,
            }),
            events,
            finished: watch::channel(false).0,
        })
    }

    fn leave_queue(&self, to: u8) -> bool {
        self.phase
            .compare_exchange(QUEUED, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// The worker takes the job into a batch; false when it already left the queue.
    pub fn claim(&self) -> bool {
        let won = self.leave_queue(RUNNING);
        if won {
            self.update(|p| {
                p.state = JobState::InProgress;
                p.position = None;
                p.stage = Some(Stage::Encode);
            });
        }
        won
    }

    /// The worker gives up on a queued job (deadline, unknown model); false when it already
    /// left the queue.
    pub fn expire(&self) -> bool {
        self.leave_queue(ENDED)
    }

    /// Stops the job: a queued one leaves the queue at once (`Ok(true)`: the caller releases
    /// its slot), a running one leaves its batch at the next step (`Ok(false)`). `Err` with
    /// the state when it had already finished.
    pub fn stop(&self, why: Stop) -> Result<bool, JobState> {
        let to = match why {
            Stop::Cancelled => CANCELLED,
            Stop::ClientGone => GONE,
        };
        if self.leave_queue(to) {
            return Ok(true);
        }
        match self
            .phase
            .compare_exchange(RUNNING, to, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => Ok(false),
            Err(CANCELLED | GONE) => Ok(false),
            Err(_) => Err(self.snapshot().state),
        }
    }

    /// Why the job was stopped, if it was.
    pub fn stopped(&self) -> Option<Stop> {
        match self.phase.load(Ordering::SeqCst) {
            CANCELLED => Some(Stop::Cancelled),
            GONE => Some(Stop::ClientGone),
            _ => None,
        }
    }

    pub fn snapshot(&self) -> Progress {
        self.progress
            .lock()
            .expect("progress lock poisoned")
            .clone()
    }

    /// The current progress and a receiver of every later event (no event falls between).
    pub fn subscribe(&self) -> (Progress, broadcast::Receiver<JobEvent>) {
        let p = self.progress.lock().expect("progress lock poisoned");
        (p.clone(), self.events.subscribe())
    }

    /// Resolves once the job has finished (at once if it has).
    pub async fn finished(&self) {
        let mut rx = self.finished.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        let mut p = self.progress.lock().expect("progress lock poisoned");
        self.update_locked(&mut p, f);
    }

    fn update_locked(&self, p: &mut Progress, f: impl FnOnce(&mut Progress)) {
        let before = p.percent;
        f(p);
        p.percent = p.percent.max(before);
        let _ = self.events.send(JobEvent::Progress(p.clone()));
    }

    pub fn queued(&self, position: usize) {
        let mut p = self.progress.lock().expect("progress lock poisoned");
        // The worker may have taken the job already.
        if p.state == JobState::Queued {
            p.position = Some(position);
            let _ = self.events.send(JobEvent::Queued { position });
        }
    }

    /// `step` of `steps` denoising steps done; `eta_s` from the measured step times. False,
    /// with nothing reported, once the job was stopped: its rows leave the batch now. (Checked
    /// under the progress lock, so a cancel's answer names the last step reported, and the
    /// device runs at most one step after it.)
    pub fn step(&self, step: usize, eta_s: Option<f64>) -> bool {
        let steps = self.steps.max(1);
        let mut p = self.progress.lock().expect("progress lock poisoned");
        if self.stopped().is_some() {
            return false;
        }
        self.update_locked(&mut p, |p| {
            p.step = step;
            p.stage = Some(if step >= steps {
                Stage::Decode
            } else {
                Stage::Denoise
            });
            // 99 at most until the result exists.
            p.percent = (99 * step.min(steps) / steps) as u8;
            p.eta_s = eta_s;
        });
        true
    }

    pub fn encoding_media(&self) {
        self.update(|p| {
            p.stage = Some(Stage::EncodeMedia);
            p.eta_s = None;
        });
    }

    pub fn partial(&self, step: usize, index: usize, frames: Vec<Vec<RgbImage>>) {
        let _ = self.events.send(JobEvent::Partial {
            step,
            index,
            frames: Arc::new(frames),
        });
    }

    /// Records the end state (the result itself is stored by the job registry first).
    pub fn finish(&self, state: JobState) {
        // A stopped job stays stopped, so the worker still takes its rows out.
        for from in [QUEUED, RUNNING] {
            let _ = self
                .phase
                .compare_exchange(from, ENDED, Ordering::SeqCst, Ordering::SeqCst);
        }
        {
            let mut p = self.progress.lock().expect("progress lock poisoned");
            if p.state.is_finished() {
                return;
            }
            p.state = state;
            p.position = None;
            p.eta_s = None;
            p.stage = None;
            if state == JobState::Completed {
                p.step = p.steps;
                p.percent = 100;
            }
            let _ = self.events.send(JobEvent::Progress(p.clone()));
            let _ = self.events.send(JobEvent::Finished(state));
        }
        self.finished.send_replace(true);
    }

    /// The denoising steps after which a partial image is sent: `partials` of them spread
    /// evenly, never the last (that one is the final image).
    pub fn partial_steps(&self) -> Vec<usize> {
        let (p, n) = (self.partials, self.steps);
        let mut out: Vec<usize> = (1..=p)
            .map(|i| ((i * n) as f64 / (p + 1) as f64).round() as usize)
            .filter(|&s| s >= 1 && s < n)
            .collect();
        out.dedup();
        out
    }
}

/// Seconds per denoising step measured so far in a batch, and what is left.
pub fn eta(started: Instant, step: usize, steps: usize) -> Option<f64> {
    (step > 0).then(|| started.elapsed().as_secs_f64() / step as f64 * (steps - step) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_job_can_leave_the_queue_only_once() {
        let c = JobCell::new("j".into(), 4, 0);
        assert_eq!(c.stop(Stop::Cancelled), Ok(true));
        assert!(!c.claim(), "a cancelled job is never claimed");
        assert_eq!(c.stopped(), Some(Stop::Cancelled));
        let c = JobCell::new("k".into(), 4, 0);
        assert!(c.claim());
        assert_eq!(
            c.stop(Stop::Cancelled),
            Ok(false),
            "running: leaves at the next step"
        );
        c.finish(JobState::Cancelled);
        assert_eq!(
            c.stopped(),
            Some(Stop::Cancelled),
            "its rows still leave the batch"
        );
        assert_eq!(
            c.stop(Stop::Cancelled),
            Ok(false),
            "cancelling twice is harmless"
        );
        let d = JobCell::new("l".into(), 4, 0);
        assert!(d.claim());
        d.finish(JobState::Completed);
        assert_eq!(d.stop(Stop::Cancelled), Err(JobState::Completed));
    }

    #[test]
    fn progress_never_goes_back_and_reaches_100_only_when_complete() {
        let c = JobCell::new("j".into(), 4, 0);
        let (_, mut rx) = c.subscribe();
        assert!(c.claim());
        for s in 0..=4 {
            c.step(s, None);
        }
        c.encoding_media();
        c.finish(JobState::Completed);
        let mut seen = Vec::new();
        while let Ok(e) = rx.try_recv() {
            if let JobEvent::Progress(p) = e {
                seen.push(p.percent);
            }
        }
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert_eq!(seen.last(), Some(&100));
        assert!(seen[..seen.len() - 1].iter().all(|&p| p < 100), "{seen:?}");
    }

    #[test]
    fn a_stopped_job_reports_no_more_steps() {
        let c = JobCell::new("j".into(), 4, 0);
        assert!(c.claim());
        assert!(c.step(1, None));
        let (_, mut rx) = c.subscribe();
        assert_eq!(c.stop(Stop::Cancelled), Ok(false));
        assert!(!c.step(2, None), "its rows leave the batch now");
        assert_eq!(
            c.snapshot().step,
            1,
            "the cancel names the last step reported"
        );
        assert!(rx.try_recv().is_err(), "nothing reported after the cancel");
    }

    #[test]
    fn partial_steps_spread_and_skip_the_final_step() {
        assert_eq!(
            JobCell::new("a".into(), 4, 3).partial_steps(),
            vec![1, 2, 3]
        );
        assert_eq!(JobCell::new("a".into(), 4, 2).partial_steps(), vec![1, 3]);
        assert_eq!(
            JobCell::new("a".into(), 1, 3).partial_steps(),
            Vec::<usize>::new()
        );
        assert_eq!(
            JobCell::new("a".into(), 8, 0).partial_steps(),
            Vec::<usize>::new()
        );
    }
}
