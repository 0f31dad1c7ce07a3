//! Bucketing and batch selection: pure logic over queued jobs, tested without a model.

use std::collections::{HashMap, VecDeque};
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
    /// Run the jobs at these indices (of the pending list) as one batch; the bucket held
    /// `bucket_rows` rows when it was chosen.
    Run {
        jobs: Vec<usize>,
        bucket_rows: usize,
    },
    /// The oldest bucket is not full yet: wait at most this long for company.
    Wait(Duration),
}

/// Whether a bucket has company coming, and how much: how many of its jobs were already in
/// the system (queued, or in the batch being run) when each new job arrived, averaged over
/// recent arrivals; and how many rows its recent batches gathered.
///
/// Why not an arrival rate: with one client in a closed loop the next request only comes
/// after this one is answered, so waiting for it is pure latency, yet its arrival rate
/// looks the same as that of a few clients who do overlap. Overlap is what a wait can use.
///
/// Why the group size: eight clients in a closed loop send their next requests together once
/// their batch is answered. Waiting for a batch of `max_batch` (32) rows that cannot come would
/// idle the device for the whole `max_wait` on every cycle; waiting for the eight that came
/// last time starts the batch as soon as they are back.
#[derive(Debug, Default)]
pub struct Company {
    overlap: HashMap<BucketKey, f64>,
    groups: HashMap<BucketKey, VecDeque<usize>>,
}

impl Company {
    /// Weight of the newest arrival in the running average.
    const ALPHA: f64 = 0.25;
    /// Average overlap from which waiting pays: about every other arrival finds another job.
    const WAIT_FROM: f64 = 0.5;
    /// Batches whose group sizes are remembered: a group that shrinks (a client left) costs
    /// at most this many full waits before the smaller size is expected.
    const GROUPS: usize = 8;

    /// Records a job of `key` that found `others` jobs of its bucket in the system.
    pub fn arrived(&mut self, key: &BucketKey, others: usize) {
        let x = others.min(8) as f64;
        self.overlap
            .entry(key.clone())
            .and_modify(|m| *m += Self::ALPHA * (x - *m))
            .or_insert(x);
    }

    /// Records that a batch of `key` ran while its bucket held `rows` rows (those that did not
    /// fit included: they were company too).
    pub fn ran(&mut self, key: &BucketKey, rows: usize) {
        let g = self.groups.entry(key.clone()).or_default();
        if g.len() == Self::GROUPS {
            g.pop_front();
        }
        g.push_back(rows);
    }

    /// True when recent arrivals of `key` overlapped other jobs often enough that waiting
    /// for company is likely to fill the batch. A bucket never seen has none.
    pub fn expected(&self, key: &BucketKey) -> bool {
        self.overlap.get(key).is_some_and(|&m| m >= Self::WAIT_FROM)
    }

    /// How many rows of `key` are worth waiting for: 1 (run at once) when no company is
    /// expected, the largest recent group when one is, and `None` (up to `max_batch`) for a
    /// bucket with company but no batch yet. The largest, not the last: a batch cut short by
    /// `max_wait` must not teach the next ones to run shorter still.
    pub fn rows_to_wait_for(&self, key: &BucketKey) -> Option<usize> {
        if !self.expected(key) {
            return Some(1);
        }
        self.groups.get(key).and_then(|g| g.iter().copied().max())
    }
}

/// Picks the bucket of the oldest pending job; runs it when it has `max_batch` rows, or the
/// rows `company` says are worth waiting for (`None`: `max_batch`), or when its oldest job has
/// waited `max_wait`; else says how long to wait. Jobs are taken in arrival order while their
/// rows fit in `max_batch` (a job never exceeds `max_batch` rows: the API validates `n`).
/// The bucket's rows at the time are returned with the batch, for [`Company::ran`].
pub fn decide(
    pending: &[Job],
    now: Instant,
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
    let waited = now.saturating_duration_since(oldest.enqueued);
    let wait = max_wait(key);
    let enough = company(key).map_or(cap, |n| n.clamp(1, cap));
    if bucket_rows >= enough || waited >= wait {
        Decision::Run {
            jobs: chosen,
            bucket_rows,
        }
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

    fn run(jobs: Vec<usize>, bucket_rows: usize) -> Decision {
        Decision::Run { jobs, bucket_rows }
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
        let d = decide(&pending, t0 + ms(100), |_| 6, |_| ms(10), |_| None);
        assert_eq!(d, run(vec![1, 2], 9));
    }

    #[test]
    fn a_young_partial_bucket_waits_for_company() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let pending = vec![job(key("m", 1), 1, t0)];
        assert_eq!(
            decide(&pending, t0 + ms(3), |_| 8, |_| ms(10), |_| None),
            Decision::Wait(ms(7))
        );
        assert_eq!(
            decide(&pending, t0 + ms(10), |_| 8, |_| ms(10), |_| None),
            run(vec![0], 1)
        );
    }

    #[test]
    fn a_full_bucket_runs_without_waiting() {
        let t0 = Instant::now();
        let pending: Vec<Job> = (0..4).map(|_| job(key("m", 1), 2, t0)).collect();
        let d = decide(&pending, t0, |_| 8, |_| Duration::from_secs(1), |_| None);
        assert_eq!(d, run(vec![0, 1, 2, 3], 8));
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
            |_| 8,
            |_| ms(10),
            |k| company.rows_to_wait_for(k),
        );
        assert_eq!(d, run(vec![0], 1));
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
            |_| 8,
            |_| ms(10),
            |k| company.rows_to_wait_for(k),
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
    fn a_closed_loop_group_runs_once_it_is_back_without_waiting_for_a_full_batch() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let k = key("m", 1);
        let mut company = Company::default();
        for _ in 0..8 {
            company.arrived(&k, 4);
        }
        // Company expected, no batch seen yet: wait for a full batch (32) as before.
        let eight: Vec<Job> = (0..8).map(|i| job(k.clone(), 1, t0 + ms(i))).collect();
        let decide_at = |pending: &[Job], at, company: &Company| {
            decide(
                pending,
                at,
                |_| 32,
                |_| ms(10),
                |k| company.rows_to_wait_for(k),
            )
        };
        assert_eq!(
            decide_at(&eight, t0 + ms(8), &company),
            Decision::Wait(ms(2))
        );
        // Eight clients in a closed loop: their batch held 8 rows, so the next 8 run at once...
        company.ran(&k, 8);
        assert_eq!(
            decide_at(&eight, t0 + ms(8), &company),
            run((0..8).collect(), 8)
        );
        // ... while 7 of them still wait for the eighth.
        assert_eq!(
            decide_at(&eight[..7], t0 + ms(8), &company),
            Decision::Wait(ms(2))
        );
        // A batch cut short by the wait does not lower what the next ones wait for.
        company.ran(&k, 5);
        assert_eq!(company.rows_to_wait_for(&k), Some(8));
        // A client that left for good costs a few full waits, then the group is 7.
        for _ in 0..Company::GROUPS {
            company.ran(&k, 7);
        }
        assert_eq!(
            decide_at(&eight[..7], t0 + ms(8), &company),
            run((0..7).collect(), 7)
        );
        // Without overlap (one client), nothing is waited for, whatever the groups were.
        for _ in 0..20 {
            company.arrived(&k, 0);
        }
        assert_eq!(company.rows_to_wait_for(&k), Some(1));
    }

    #[test]
    fn nothing_pending_is_idle() {
        let d = decide(&[], Instant::now(), |_| 8, |_| Duration::ZERO, |_| None);
        assert_eq!(d, Decision::Idle);
    }
}
