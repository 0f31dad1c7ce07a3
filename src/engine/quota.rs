//! Per-key limits from the config: a request rate (a token bucket per API key) and a number
//! of jobs in flight (queued or running). Both refuse with 429 and a `Retry-After`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// The limits of one key; 0 turns a limit off.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyLimits {
    /// Requests per second, on average.
    pub rate_per_s: f64,
    /// Requests allowed at once above the average rate.
    pub burst: u32,
    /// Jobs queued or running at once.
    pub max_in_flight: usize,
}

/// One token bucket per key.
#[derive(Debug, Default)]
pub(crate) struct RateLimiter {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// Takes a token for `key`, or says in how many seconds one will be there.
    pub(crate) fn take(&self, limits: &KeyLimits, key: &str, now: Instant) -> Result<(), u64> {
        if limits.rate_per_s <= 0.0 {
            return Ok(());
        }
        let burst = f64::from(limits.burst.max(1));
        let mut buckets = self.buckets.lock().expect("rate limiter lock poisoned");
        // Keys idle long enough to have a full bucket again are forgotten.
        if buckets.len() > 10_000 {
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * limits.rate_per_s
                    < burst
            });
        }
        let (tokens, at) = buckets.entry(key.to_string()).or_insert((burst, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * limits.rate_per_s;
        *tokens = (*tokens + refill).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / limits.rate_per_s).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_key_gets_its_burst_then_its_rate_and_keys_do_not_share() {
        let limits = KeyLimits {
            rate_per_s: 2.0,
            burst: 3,
            max_in_flight: 0,
        };
        let r = RateLimiter::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(r.take(&limits, "a", t0), Ok(()));
        }
        assert_eq!(r.take(&limits, "a", t0), Err(1));
        assert_eq!(
            r.take(&limits, "b", t0),
            Ok(()),
            "another key has its own bucket"
        );
        // Half a second later one token (2/s) has come back.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(r.take(&limits, "a", t1), Ok(()));
        assert_eq!(r.take(&limits, "a", t1), Err(1));
        assert_eq!(r.take(&KeyLimits::default(), "a", t1), Ok(()), "off");
    }
}
