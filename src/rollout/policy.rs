//! The rollout policy: a group-sequential non-inferiority test of the canary's mean user
//! rating against the stable version's. At `min_rated` canary ratings it decides once:
//! promote when the canary is, at the stated confidence, not worse by more than the margin,
//! roll back otherwise. Before that it only rolls back, and only past a boundary that is
//! stricter the fewer ratings there are (O'Brien-Fleming's shape), so that looking after
//! every rating does not make a false rollback of an equal canary likely. Pure statistics
//! over counts, tested on synthetic rating streams.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, Normal};
use utoipa::ToSchema;

/// When the server decides a canary's fate by itself (`[rollout]` in the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutPolicy {
    /// Decide automatically; otherwise only `promote` and `rollback` by hand act.
    pub auto: bool,
    /// Canary ratings at which the policy decides (promote or roll back).
    pub min_rated: u64,
    /// Ratings each version needs before an early rollback can be considered.
    pub min_rated_to_decide: u64,
    /// One-sided confidence of both tests, in `(0.5, 1)`.
    pub confidence: f64,
    /// Non-inferiority margin on the `[0, 1]` rating scale: promote when the canary's mean
    /// rating is, at `confidence`, above the stable one's minus this.
    pub margin: f64,
    /// Roll back when the canary's device error rate exceeds the stable one's by more than
    /// this (with at least `min_rated_to_decide` canary requests).
    pub max_error_rate_increase: f64,
    /// How often the policy looks at live rollouts.
    pub check_every_s: u64,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        Self {
            auto: false,
            min_rated: 200,
            min_rated_to_decide: 30,
            confidence: 0.95,
            margin: 0.05,
            max_error_rate_increase: 0.05,
            check_every_s: 10,
        }
    }
}

impl RolloutPolicy {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.confidence > 0.5 && self.confidence < 1.0) {
            return Err(format!(
                "rollout.confidence must be in (0.5, 1), got {}",
                self.confidence
            ));
        }
        if !(0.0..=1.0).contains(&self.margin)
            || !(0.0..=1.0).contains(&self.max_error_rate_increase)
        {
            return Err(format!(
                "rollout.margin and rollout.max_error_rate_increase must be in [0, 1], got {} and {}",
                self.margin, self.max_error_rate_increase
            ));
        }
        if self.min_rated_to_decide < 2 || self.min_rated < self.min_rated_to_decide {
            return Err(format!(
                "rollout: need 2 <= min_rated_to_decide <= min_rated, got {} and {}",
                self.min_rated_to_decide, self.min_rated
            ));
        }
        if self.check_every_s == 0 {
            return Err("rollout.check_every_s must be positive".into());
        }
        Ok(())
    }

    /// The one-sided normal quantile of `confidence`.
    fn z(&self) -> f64 {
        Normal::standard().inverse_cdf(self.confidence)
    }
}

/// What one version of a rollout has shown: device runs and the users' ratings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ArmEvidence {
    pub requests: u64,
    pub errors: u64,
    pub rated: u64,
    pub rating_sum: f64,
    pub rating_sq: f64,
}

/// Ratings in `[0, 1]` are never exactly constant in the population, so a sample with no
/// spread (ten thumbs up) must not claim infinite certainty: the variance is floored at
/// this (a standard deviation of 0.1).
const MIN_VARIANCE: f64 = 0.01;

impl ArmEvidence {
    pub fn mean_rating(&self) -> Option<f64> {
        (self.rated > 0).then(|| self.rating_sum / self.rated as f64)
    }

    /// Sample variance of the ratings (floored, see [`MIN_VARIANCE`]).
    fn variance(&self) -> f64 {
        let n = self.rated as f64;
        if n < 2.0 {
            return 0.25;
        }
        let mean = self.rating_sum / n;
        ((self.rating_sq - n * mean * mean) / (n - 1.0)).max(MIN_VARIANCE)
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// The mean rating's two-sided interval at `confidence` (normal approximation).
    pub fn rating_interval(&self, confidence: f64) -> Option<[f64; 2]> {
        let mean = self.mean_rating()?;
        let z = Normal::standard().inverse_cdf(0.5 + confidence / 2.0);
        let half = z * (self.variance() / self.rated as f64).sqrt();
        Some([mean - half, mean + half])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Promote,
    Rollback,
    Wait,
}

/// The policy's reading of a rollout, with the numbers behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Verdict {
    pub action: Action,
    pub reason: String,
    /// Canary minus stable mean rating, and its one-sided bounds at the policy's confidence.
    pub difference: Option<f64>,
    pub lower_bound: Option<f64>,
    pub upper_bound: Option<f64>,
}

/// Decides a rollout from both versions' evidence.
///
/// The rating test is Welch's z on the difference of mean ratings, with the variance of each
/// mean from its own sample. At a fraction `f = n / min_rated` of the canary's ratings the
/// early rollback boundary is `z / sqrt(f)`; at `f = 1` the usual one-sided `z` decides.
pub fn decide(stable: &ArmEvidence, canary: &ArmEvidence, p: &RolloutPolicy) -> Verdict {
    let wait = |reason: String| Verdict {
        action: Action::Wait,
        reason,
        difference: None,
        lower_bound: None,
        upper_bound: None,
    };
    let extra_errors = canary.error_rate() - stable.error_rate();
    if canary.requests >= p.min_rated_to_decide && extra_errors > p.max_error_rate_increase {
        return Verdict {
            action: Action::Rollback,
            reason: format!(
                "the canary fails {:.1}% of its requests against {:.1}% for the stable version \
                 (more than {:.1} points worse)",
                100.0 * canary.error_rate(),
                100.0 * stable.error_rate(),
                100.0 * p.max_error_rate_increase
            ),
            ..wait(String::new())
        };
    }
    let (Some(mc), Some(ms)) = (canary.mean_rating(), stable.mean_rating()) else {
        return wait(format!(
            "no ratings yet ({} canary, {} stable)",
            canary.rated, stable.rated
        ));
    };
    if canary.rated < p.min_rated_to_decide || stable.rated < p.min_rated_to_decide {
        return wait(format!(
            "{} canary and {} stable ratings; each needs {} before a decision",
            canary.rated, stable.rated, p.min_rated_to_decide
        ));
    }
    let d = mc - ms;
    let se =
        (canary.variance() / canary.rated as f64 + stable.variance() / stable.rated as f64).sqrt();
    let fraction = (canary.rated as f64 / p.min_rated as f64).min(1.0);
    let z = p.z() / fraction.sqrt();
    let (lower, upper) = (d - z * se, d + z * se);
    let numbers = format!(
        "mean rating {mc:.3} (canary, n = {}) vs {ms:.3} (stable, n = {}), difference {d:+.3}, \
         bounds [{lower:+.3}, {upper:+.3}] (z = {z:.2})",
        canary.rated, stable.rated
    );
    let verdict = |action, reason: String| Verdict {
        action,
        reason,
        difference: Some(d),
        lower_bound: Some(lower),
        upper_bound: Some(upper),
    };
    if canary.rated < p.min_rated {
        if upper < 0.0 {
            verdict(Action::Rollback, format!("worse: {numbers}"))
        } else {
            verdict(
                Action::Wait,
                format!("{numbers}; decides at {} canary ratings", p.min_rated),
            )
        }
    } else if lower > -p.margin {
        verdict(
            Action::Promote,
            format!(
                "not worse by more than the margin {:.3}: {numbers}",
                p.margin
            ),
        )
    } else {
        verdict(
            Action::Rollback,
            format!(
                "not shown to be within the margin {:.3} of the stable version: {numbers}",
                p.margin
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Ratings drawn like the simulated users': a 1-5 star mapped to [0, 1] around `mean`.
    fn rate(arm: &mut ArmEvidence, rng: &mut ChaCha8Rng, mean: f64, n: usize) {
        for _ in 0..n {
            let stars = (mean * 4.0 + rng.random_range(-1.5..1.5))
                .round()
                .clamp(0.0, 4.0);
            let s = stars / 4.0;
            arm.requests += 1;
            arm.rated += 1;
            arm.rating_sum += s;
            arm.rating_sq += s * s;
        }
    }

    /// Feeds ratings 10 at a time to both arms (the canary gets `share` of them) until the
    /// policy acts; returns the action and the canary ratings it took.
    fn run(stable_mean: f64, canary_mean: f64, seed: u64) -> (Action, u64) {
        let p = RolloutPolicy::default();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut s, mut c) = (ArmEvidence::default(), ArmEvidence::default());
        for _ in 0..400 {
            rate(&mut s, &mut rng, stable_mean, 9);
            rate(&mut c, &mut rng, canary_mean, 1);
            let v = decide(&s, &c, &p);
            if v.action != Action::Wait {
                return (v.action, c.rated);
            }
        }
        (Action::Wait, c.rated)
    }

    #[test]
    fn a_better_canary_is_promoted_after_min_rated() {
        for seed in 0..5 {
            let (action, rated) = run(0.45, 0.65, seed);
            assert_eq!(action, Action::Promote, "seed {seed}");
            assert!(rated >= 200, "promoted after only {rated} ratings");
        }
    }

    #[test]
    fn an_equal_canary_is_rarely_rolled_back_early_and_mostly_promoted() {
        let (mut promoted, mut early) = (0, 0);
        for seed in 0..20 {
            let (action, rated) = run(0.5, 0.5, seed);
            promoted += usize::from(action == Action::Promote);
            early += usize::from(action == Action::Rollback && rated < 200);
        }
        // About 1 - confidence of equal canaries cross the early boundary at some look.
        assert!(early <= 2, "{early} of 20 equal canaries rolled back early");
        assert!(
            promoted >= 12,
            "only {promoted} of 20 equal canaries promoted"
        );
    }

    #[test]
    fn a_worse_canary_is_rolled_back_before_two_hundred_ratings() {
        for seed in 0..5 {
            let (action, rated) = run(0.6, 0.35, seed);
            assert_eq!(action, Action::Rollback, "seed {seed}");
            assert!(rated < 200, "rolled back only after {rated} ratings");
        }
    }

    #[test]
    fn device_errors_roll_back_and_thin_evidence_waits() {
        let p = RolloutPolicy::default();
        let stable = ArmEvidence {
            requests: 500,
            errors: 1,
            ..Default::default()
        };
        let failing = ArmEvidence {
            requests: 40,
            errors: 10,
            ..Default::default()
        };
        assert_eq!(decide(&stable, &failing, &p).action, Action::Rollback);
        let new = ArmEvidence {
            requests: 5,
            errors: 5,
            ..Default::default()
        };
        let v = decide(&stable, &new, &p);
        assert_eq!(v.action, Action::Wait, "{}", v.reason);
        assert!(v.reason.contains("no ratings"), "{}", v.reason);
    }

    #[test]
    fn the_policy_is_validated() {
        assert!(RolloutPolicy::default().validate().is_ok());
        for bad in [
            RolloutPolicy {
                confidence: 1.0,
                ..Default::default()
            },
            RolloutPolicy {
                margin: -0.1,
                ..Default::default()
            },
            RolloutPolicy {
                min_rated: 10,
                min_rated_to_decide: 30,
                ..Default::default()
            },
            RolloutPolicy {
                check_every_s: 0,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
