//! Bucketing and batch selection: pure logic over queued jobs, tested without a model.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::Job;

/// Requests that can share a lock-step batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub model: String,
    pub width: usize,
    pub height: usize,
    /// 1 = image, more = video.
    pub frames: usize,
    pub steps: usize,
    /// `f32::to_bits` of the guidance scale (exact match, hashable).
    pub guidance_bits: u32,
    /// Served by the model's canary version (set by the worker on arrival; a canary that is
    /// gone by the time the batch runs leaves its jobs to the stable version).
    pub canary: bool,
}

impl BucketKey {
    pub fn guidance(&self) -> f32 {
        f32::from_bits(self.guidance_bits)
    }
}

/// What the worker should do next with its pending jobs.
#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Nothing pending.
    Idle,
    /// Run the jobs at these indices (of the pending list) as one batch.
    Run(Vec<usize>),
    /// The oldest bucket is not full yet: wait at most this long for company.
    Wait(Duration),
}

/// Whether a bucket has company coming, and how much: how many of its jobs were already in
/// the system (queued, or in the batch being run) when each new job arrived, averaged over
/// recent arrivals; and the rows of its last batch.
///
/// Why not an arrival rate: with one client in a closed loop the next request only comes
/// after this one is answered, so waiting for it is pure latency, yet its arrival rate
/// looks the same as that of a few clients who do overlap. Overlap is what a wait can use.
///
/// Why the rows of the last batch: eight clients in a closed loop send their next requests
/// together once their batch is answered. Waiting for `max_batch` (32) rows that cannot come
/// would idle the device for the whole `max_wait` on every cycle; waiting for the eight that
/// were just answered starts the batch as soon as they are back. Jobs that arrived while that
/// batch ran are a second group, so they add to what is waited for: two groups of 16 merge into
/// one batch of 32 instead of alternating as two half batches.
#[derive(Debug, Default)]
pub struct Company {
    overlap: HashMap<BucketKey, f64>,
    /// When the bucket's last batch had its results, and its rows.
    last: HashMap<BucketKey, (Instant, usize)>,
}

impl Company {
    /// Weight of the newest arrival in the running average.
    const ALPHA: f64 = 0.25;
    /// Average overlap from which waiting pays: about every other arrival finds another job.
    const WAIT_FROM: f64 = 0.5;

    /// Records a job of `key` that found `others` jobs of its bucket in the system.
    pub fn arrived(&mut self, key: &BucketKey, others: usize) {
        let x = others.min(8) as f64;
        self.overlap
            .entry(key.clone())
            .and_modify(|m| *m += Self::ALPHA * (x - *m))
            .or_insert(x);
    }

    /// Records that a batch of `key` with `rows` rows had its results at `ready`.
    pub fn finished(&mut self, key: &BucketKey, rows: usize, ready: Instant) {
        self.last.insert(key.clone(), (ready, rows));
    }

    /// True when recent arrivals of `key` overlapped other jobs often enough that waiting
    /// for company is likely to fill the batch. A bucket never seen has none.
    pub fn expected(&self, key: &BucketKey) -> bool {
        self.overlap.get(key).is_some_and(|&m| m >= Self::WAIT_FROM)
    }

    /// How many rows of `key` are worth waiting for, given the `pending` jobs: 1 (run at once)
    /// when no company is expected; else the rows of its last batch (their clients may come
    /// back) plus those of its jobs that were already queued when that batch finished; `None`
    /// (wait for `max_batch`) for a bucket with company but no batch yet.
    pub fn rows_to_wait_for(&self, key: &BucketKey, pending: &[Job]) -> Option<usize> {
        if !self.expected(key) {
            return Some(1);
        }
        let &(ready, rows) = self.last.get(key)?;
        let earlier: usize = pending
            .iter()
            .filter(|j| &j.key == key && j.enqueued < ready)
            .map(Job::rows)
            .sum();
        Some(rows + earlier)
    }
}

/// Picks the bucket of the oldest pending job; runs it when it has `max_batch` rows, or the
/// rows `company` says are worth waiting for (`None`: `max_batch`), or when its oldest job has
/// waited `max_wait` since it arrived or since the device came free at `idle_since`, whichever
/// is later (time spent behind a running batch was not spent waiting for company: two groups
/// of a closed loop that took turns could never merge otherwise); else says how long to wait.
/// Jobs are taken in arrival order while their rows fit in `max_batch` (a job never exceeds
/// `max_batch` rows: the API validates `n`).
pub fn decide(
    pending: &[Job],
    now: Instant,
    idle_since: Option<Instant>,
    max_batch: impl Fn(&BucketKey) -> usize,
    max_wait: impl Fn(&BucketKey) -> Duration,
    company: impl Fn(&BucketKey) -> Option<usize>,
) -> Decision {
    let Some(oldest) = pending.iter().min_by_key(|j| j.enqueued) else {
        return Decision::Idle;
    };
    let key = &oldest.key;
    let cap = max_batch(key).max(1);
    let mut chosen = Vec::new();
    let mut rows = 0;
    let mut order: Vec<usize> = (0..pending.len())
        .filter(|&i| &pending[i].key == key)
        .collect();
    order.sort_by_key(|&i| pending[i].enqueued);
    let bucket_rows: usize = order.iter().map(|&i| pending[i].rows()).sum();
    for i in order {
        let r = pending[i].rows();
        if rows + r > cap {
            if chosen.is_empty() {
                // A job larger than the batch still runs, alone.
                chosen.push(i);
            }
            break;
        }
        rows += r;
        chosen.push(i);
    }
    let since = idle_since.map_or(oldest.enqueued, |t| t.max(oldest.enqueued));
    let waited = now.saturating_duration_since(since);
    let wait = max_wait(key);
    let enough = company(key).map_or(cap, |n| n.clamp(1, cap));
    if bucket_rows >= enough || waited >= wait {
        Decision::Run(chosen)
    } else {
        Decision::Wait(wait - waited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn key(model: &str, frames: usize) -> BucketKey {
        BucketKey {
            model: model.into(),
            width: 32,
            height: 32,
            frames,
            steps: 4,
            guidance_bits: 1f32.to_bits(),
            canary: false,
        }
    }

    fn job(k: BucketKey, rows: usize, at: Instant) -> Job {
        let (reply, _rx) = oneshot::channel();
        Job {
            id: "t".into(),
            key: k,
            prompt: "p".into(),
            negative_prompt: String::new(),
            seeds: (0..rows as u64).collect(),
            enqueued: at,
            deadline: at + Duration::from_secs(60),
            cell: crate::engine::JobCell::new("t".into(), 4, 0),
            reply,
        }
    }

    #[test]
    fn oldest_bucket_goes_first_and_batches_fill_in_arrival_order() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let pending = vec![
            job(key("m", 8), 1, t0 + ms(5)),
            job(key("m", 1), 2, t0),
            job(key("m", 1), 3, t0 + ms(1)),
            job(key("m", 1), 4, t0 + ms(2)),
        ];
        let d = decide(&pending, t0 + ms(100), None, |_| 6, |_| ms(10), |_| None);
        assert_eq!(d, Decision::Run(vec![1, 2]));
    }

    #[test]
    fn a_young_partial_bucket_waits_for_company() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let pending = vec![job(key("m", 1), 1, t0)];
        assert_eq!(
            decide(&pending, t0 + ms(3), None, |_| 8, |_| ms(10), |_| None),
            Decision::Wait(ms(7))
        );
        assert_eq!(
            decide(&pending, t0 + ms(10), None, |_| 8, |_| ms(10), |_| None),
            Decision::Run(vec![0])
        );
    }

    #[test]
    fn a_full_bucket_runs_without_waiting() {
        let t0 = Instant::now();
        let pending: Vec<Job> = (0..4).map(|_| job(key("m", 1), 2, t0)).collect();
        let d = decide(
            &pending,
            t0,
            None,
            |_| 8,
            |_| Duration::from_secs(1),
            |_| None,
        );
        assert_eq!(d, Decision::Run(vec![0, 1, 2, 3]));
    }

    #[test]
    fn a_lone_job_without_company_in_sight_runs_at_once() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let pending = vec![job(key("m", 1), 1, t0)];
        let mut company = Company::default();
        // Never seen: no wait.
        let d = decide(
            &pending,
            t0,
            None,
            |_| 8,
            |_| ms(10),
            |k| company.rows_to_wait_for(k, &pending),
        );
        assert_eq!(d, Decision::Run(vec![0]));
        // A closed loop of one client: every job finds the system empty.
        for _ in 0..20 {
            company.arrived(&key("m", 1), 0);
        }
        assert!(!company.expected(&key("m", 1)));
        // Concurrent clients: arrivals find others queued or running, so the bucket waits...
        for _ in 0..6 {
            company.arrived(&key("m", 1), 3);
        }
        assert!(company.expected(&key("m", 1)));
        let d = decide(
            &pending,
            t0 + ms(3),
            None,
            |_| 8,
            |_| ms(10),
            |k| company.rows_to_wait_for(k, &pending),
        );
        assert_eq!(d, Decision::Wait(ms(7)));
        // ... per bucket: another bucket has no company of its own.
        assert!(!company.expected(&key("m", 8)));
        // When the load goes away, the waits stop again within a few arrivals.
        for _ in 0..8 {
            company.arrived(&key("m", 1), 0);
        }
        assert!(!company.expected(&key("m", 1)));
    }

    #[test]
    fn a_closed_loop_group_runs_once_it_is_back_and_two_groups_merge() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let k = key("m", 1);
        let mut company = Company::default();
        for _ in 0..8 {
            company.arrived(&k, 4);
        }
        let at = |i: u64| t0 + ms(i);
        let decide_at = |pending: &[Job], now, company: &Company| {
            decide(
                pending,
                now,
                company.last.get(&k).map(|l| l.0),
                |_| 32,
                |_| ms(10),
                |k| company.rows_to_wait_for(k, pending),
            )
        };
        // Company expected, no batch seen yet: wait for a full batch (32) as before.
        let back: Vec<Job> = (0..8).map(|i| job(k.clone(), 1, at(100 + i))).collect();
        assert_eq!(decide_at(&back, at(108), &company), Decision::Wait(ms(2)));
        // Eight clients in a closed loop: their batch of 8 finished at 100 ms, so once the
        // eight are back they run, without waiting for 32...
        company.finished(&k, 8, at(100));
        assert_eq!(
            decide_at(&back, at(108), &company),
            Decision::Run((0..8).collect())
        );
        // ... while 7 of them still wait for the eighth.
        assert_eq!(
            decide_at(&back[..7], at(108), &company),
            Decision::Wait(ms(2))
        );
        // Two groups of 16 in a loop: one ran while the other queued. The queued 16 wait for
        // the 16 just answered, and the batch is 32, not 16.
        company.finished(&k, 16, at(100));
        let mut both: Vec<Job> = (0..16).map(|i| job(k.clone(), 1, at(50 + i))).collect();
        assert_eq!(decide_at(&both, at(101), &company), Decision::Wait(ms(9)));
        assert_eq!(decide_at(&both, at(104), &company), Decision::Wait(ms(6)));
        both.extend((0..16).map(|i| job(k.clone(), 1, at(101 + i / 4))));
        assert_eq!(
            decide_at(&both, at(105), &company),
            Decision::Run((0..32).collect())
        );
        // Without overlap (one client), nothing is waited for, whatever ran before.
        for _ in 0..20 {
            company.arrived(&k, 0);
        }
        assert_eq!(company.rows_to_wait_for(&k, &back), Some(1));
    }

    #[test]
    fn nothing_pending_is_idle() {
        let d = decide(
            &[],
            Instant::now(),
            None,
            |_| 8,
            |_| Duration::ZERO,
            |_| None,
        );
        assert_eq!(d, Decision::Idle);
    }
}
