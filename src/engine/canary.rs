//! Canary routing: which version of a model serves a job, and what each version of a rollout
//! has done (requests, errors, the reward proxy) since the canary started.
//!
//! The ratings users give live in the generation log; the rollout report joins them to these
//! counters by version.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

/// Whether generation `id` is served by a canary that takes `share` of the traffic.
///
/// A fixed hash of the id against the share: the choice can be recomputed from the id alone,
/// and an id inside a smaller canary stays inside any larger one, so raising the share never
/// moves a request back to the stable version.
pub fn in_canary(id: &str, share: f64) -> bool {
    unit_hash(id) < share
}

/// `id` hashed to `[0, 1)`: FNV-1a (stable across builds and platforms, which std's hasher
/// does not promise), then splitmix64's finalizer, since FNV's high bits mix short
/// inputs poorly.
fn unit_hash(id: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The version a canary serves beside the stable one, as cards and reports show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CanaryCard {
    /// Content hash of the canary's weights.
    pub version: String,
    pub trained: bool,
    /// Share of new generations it serves, in `(0, 1]`.
    pub share: f64,
    /// Unix milliseconds when it started serving.
    pub started_ms: i64,
    pub weights_bytes: u64,
}

/// What one version did during a rollout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ArmCounts {
    /// Jobs that ran on this version (completed or failed on the device).
    pub requests: u64,
    pub outputs: u64,
    /// Jobs that failed on the device on their own.
    pub errors: u64,
    /// The reward proxy over scored outputs: count, sum and sum of squares.
    pub reward_n: u64,
    pub reward_sum: f64,
    pub reward_sq: f64,
}

/// The counters of one rollout: both versions, from the moment the canary started.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutCounts {
    pub stable_version: String,
    pub canary_version: String,
    pub started_ms: i64,
    pub stable: ArmCounts,
    pub canary: ArmCounts,
}

impl RolloutCounts {
    fn arm(&mut self, version: &str) -> Option<&mut ArmCounts> {
        if version == self.canary_version {
            Some(&mut self.canary)
        } else if version == self.stable_version {
            Some(&mut self.stable)
        } else {
            None
        }
    }
}

/// The live rollouts by model, shared by the device worker (which counts runs) and the job
/// system (which scores outputs).
#[derive(Debug, Default)]
pub struct Rollouts {
    by_model: Mutex<HashMap<String, RolloutCounts>>,
}

impl Rollouts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RolloutCounts>> {
        self.by_model.lock().expect("rollouts lock poisoned")
    }

    /// Starts counting a new rollout of `model` (replacing any previous one).
    pub(crate) fn start(&self, model: &str, stable: &str, canary: &str, started_ms: i64) {
        self.lock().insert(
            model.to_string(),
            RolloutCounts {
                stable_version: stable.to_string(),
                canary_version: canary.to_string(),
                started_ms,
                stable: ArmCounts::default(),
                canary: ArmCounts::default(),
            },
        );
    }

    /// Ends the rollout of `model`, returning what it counted.
    pub(crate) fn end(&self, model: &str) -> Option<RolloutCounts> {
        self.lock().remove(model)
    }

    pub fn get(&self, model: &str) -> Option<RolloutCounts> {
        self.lock().get(model).cloned()
    }

    pub fn is_active(&self, model: &str) -> bool {
        self.lock().contains_key(model)
    }

    /// Counts a job of `outputs` outputs that ran on `version` of `model`.
    pub(crate) fn record_run(&self, model: &str, version: &str, outputs: usize, failed: bool) {
        if let Some(arm) = self.lock().get_mut(model).and_then(|r| r.arm(version)) {
            arm.requests += 1;
            arm.outputs += outputs as u64;
            arm.errors += u64::from(failed);
        }
    }

    /// Adds reward-proxy scores of outputs made by `version` of `model`.
    pub fn record_rewards(&self, model: &str, version: &str, scores: &[f32]) {
        if let Some(arm) = self.lock().get_mut(model).and_then(|r| r.arm(version)) {
            for &s in scores {
                let s = f64::from(s);
                arm.reward_n += 1;
                arm.reward_sum += s;
                arm.reward_sq += s * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        // The job system's ids: random 96-bit hex; here a fixed stream of them.
        let mut x: u64 = 0x1234_5678;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                format!("gen_{:024x}", u128::from(x) << 32 | u128::from(x >> 7))
            })
            .collect()
    }

    #[test]
    fn the_share_holds_over_two_thousand_requests() {
        let ids = ids(2000);
        for share in [0.05, 0.1, 0.25, 0.5, 0.9] {
            let hits = ids.iter().filter(|id| in_canary(id, share)).count() as f64;
            // Binomial: 4 standard deviations either side.
            let sd = (2000.0 * share * (1.0 - share)).sqrt();
            assert!(
                (hits - 2000.0 * share).abs() <= 4.0 * sd,
                "share {share}: {hits} of 2000"
            );
        }
        assert!(ids.iter().all(|id| !in_canary(id, 0.0)));
        assert!(ids.iter().all(|id| in_canary(id, 1.0)));
    }

    #[test]
    fn the_choice_is_sticky_and_monotone_in_the_share() {
        for id in ids(500) {
            assert_eq!(in_canary(&id, 0.3), in_canary(&id, 0.3), "{id}");
            if in_canary(&id, 0.1) {
                assert!(in_canary(&id, 0.3), "{id} left a growing canary");
            }
        }
        // Pinned: the hash must not change between releases (logged choices stay explicable).
        assert!((unit_hash("gen_000000000000000000000000") - 0.842_239_932).abs() < 1e-9);
    }

    #[test]
    fn counts_go_to_the_arm_of_the_version_and_stop_with_the_rollout() {
        let r = Rollouts::default();
        r.record_run("m", "a", 1, false);
        assert!(r.get("m").is_none(), "nothing counted without a rollout");
        r.start("m", "a", "b", 7);
        r.record_run("m", "a", 2, false);
        r.record_run("m", "b", 1, true);
        r.record_run("m", "old", 1, false);
        r.record_rewards("m", "b", &[0.5, 1.0]);
        let c = r.end("m").unwrap();
        assert_eq!(
            (c.stable.requests, c.stable.outputs, c.stable.errors),
            (1, 2, 0)
        );
        assert_eq!((c.canary.requests, c.canary.errors), (1, 1));
        assert_eq!((c.canary.reward_n, c.canary.reward_sum), (2, 1.5));
        assert!(!r.is_active("m"));
    }
}
