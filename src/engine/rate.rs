//! The measured drain rate of the queue, so that a 429's `Retry-After` says how long the
//! queue really takes to drain rather than a constant.

use std::sync::Mutex;
use std::time::Duration;

/// Weight of the newest batch in the moving average.
const ALPHA: f64 = 0.3;
/// `Retry-After` bounds, in seconds.
const MIN_RETRY_S: u64 = 1;
const MAX_RETRY_S: u64 = 60;

/// An exponentially weighted moving average of jobs completed per second of device time.
#[derive(Debug, Default)]
pub(crate) struct DrainRate(Mutex<Option<f64>>);

impl DrainRate {
    /// Records a batch of `jobs` that took `took`.
    pub(crate) fn record(&self, jobs: usize, took: Duration) {
        let secs = took.as_secs_f64();
        if jobs == 0 || secs <= 0.0 {
            return;
        }
        let rate = jobs as f64 / secs;
        let mut avg = self.0.lock().expect("drain rate lock poisoned");
        *avg = Some(match *avg {
            Some(a) => ALPHA * rate + (1.0 - ALPHA) * a,
            None => rate,
        });
    }

    /// Jobs per second, once a batch has been measured.
    pub(crate) fn jobs_per_s(&self) -> Option<f64> {
        *self.0.lock().expect("drain rate lock poisoned")
    }

    /// Seconds until `queued` jobs have drained at the measured rate, in [1, 60].
    pub(crate) fn retry_after_s(&self, queued: usize) -> u64 {
        let Some(rate) = self.jobs_per_s().filter(|r| *r > 0.0) else {
            return MIN_RETRY_S;
        };
        let secs = (queued as f64 / rate).ceil();
        (secs as u64).clamp(MIN_RETRY_S, MAX_RETRY_S)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_queue_over_rate_clamped() {
        let r = DrainRate::default();
        assert_eq!(r.retry_after_s(100), 1, "nothing measured yet");
        // 2 jobs in 1 s: 2 jobs/s, so 9 queued jobs take 4.5 s.
        r.record(2, Duration::from_secs(1));
        assert_eq!(r.retry_after_s(9), 5);
        assert_eq!(r.retry_after_s(0), 1);
        assert_eq!(r.retry_after_s(1000), 60);
        // A slower batch pulls the average down: 0.3 * 0.5 + 0.7 * 2 = 1.55 jobs/s.
        r.record(1, Duration::from_secs(2));
        assert!((r.jobs_per_s().unwrap() - 1.55).abs() < 1e-9);
        assert_eq!(r.retry_after_s(9), 6);
    }
}
