//! Canary rollouts of refined students: an admin reload with `canary` serves new weights to a
//! share of traffic; the versions are compared on live traffic (requests, device errors,
//! users' ratings, the reward proxy); the canary is promoted or rolled back by hand or by
//! the [`policy`]. Every step goes to the log (`rollout_decisions`), the metrics and the
//! tracing output.

pub mod policy;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::engine::{ArmCounts, CanaryCard, Engine, EngineError, ModelCard, RolloutEnd};
use crate::store::{LogWriter, RatingStats, RolloutDecision, StoreError};
pub use policy::{decide, Action, ArmEvidence, RolloutPolicy, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("canary must be a share of traffic in (0, 1], got {0}")]
    InvalidShare(f64),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One version's side of a rollout report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ArmReport {
    pub version: String,
    /// Jobs run on this version since the canary started.
    pub requests: u64,
    pub outputs: u64,
    /// Jobs that failed on the device, and their share of `requests`.
    pub errors: u64,
    pub error_rate: f64,
    /// Users' ratings (`[0, 1]`) of this version's outputs since the canary started.
    pub rated: u64,
    pub mean_rating: Option<f64>,
    /// Two-sided interval of the mean rating at the policy's confidence.
    pub rating_interval: Option<[f64; 2]>,
    /// The reward proxy's mean (the ShapesWorld verifier for the built-in family) and over
    /// how many outputs.
    pub reward_mean: Option<f64>,
    pub reward_n: u64,
}

/// A model's rollout: both versions side by side, what the policy reads from them, and the
/// recent decisions.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutReport {
    pub model: String,
    pub stable: ArmReport,
    /// The canary, while one serves.
    pub canary: Option<ArmReport>,
    /// Its share of new generations.
    pub share: Option<f64>,
    /// Unix milliseconds when it started.
    pub started_ms: Option<i64>,
    pub policy: RolloutPolicy,
    /// What the policy would do now (`None` without a canary).
    pub verdict: Option<Verdict>,
    /// The newest decisions first (up to 20).
    pub decisions: Vec<DecisionView>,
}

/// One logged rollout step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DecisionView {
    /// `start`, `promote`, `rollback` or `superseded`.
    pub action: String,
    /// `policy` or `admin`.
    pub decided_by: String,
    pub created_ms: i64,
    pub stable_version: String,
    pub canary_version: String,
    pub share: f64,
    pub reason: String,
    /// Both versions' numbers when it was decided.
    #[schema(value_type = Object)]
    pub stats: serde_json::Value,
}

impl From<RolloutDecision> for DecisionView {
    fn from(d: RolloutDecision) -> Self {
        Self {
            action: d.action,
            decided_by: d.decided_by,
            created_ms: d.created_ms,
            stable_version: d.stable_version,
            canary_version: d.canary_version,
            share: d.share,
            reason: d.reason,
            stats: d.stats,
        }
    }
}

/// A rollout's numbers as the policy reads them.
struct Evidence {
    stable: ArmReport,
    canary: Option<ArmReport>,
    verdict: Option<Verdict>,
    card: Option<CanaryCard>,
}

/// Who decided a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    Policy,
    Admin,
}

impl DecidedBy {
    fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Policy => "policy",
            DecidedBy::Admin => "admin",
        }
    }
}

/// Decisions this process keeps for servers without a generation log.
const KEPT_DECISIONS: usize = 100;

/// Starts, reports on and ends rollouts; cheap to clone.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    log: Option<LogWriter>,
    policy: RolloutPolicy,
    recent: Mutex<VecDeque<RolloutDecision>>,
}

impl Controller {
    pub fn new(engine: Engine, log: Option<LogWriter>, policy: RolloutPolicy) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                log,
                policy,
                recent: Mutex::new(VecDeque::new()),
            }),
        }
    }

    pub fn policy(&self) -> &RolloutPolicy {
        &self.inner.policy
    }

    /// Loads `weights` for `model`: as its new serving version, or with `canary` as a canary
    /// taking that share of new generations. A canary (or plain reload) over a live canary
    /// supersedes it.
    pub async fn load(
        &self,
        model: &str,
        weights: PathBuf,
        canary: Option<f64>,
    ) -> Result<ModelCard, RolloutError> {
        if let Some(share) = canary {
            if !(share > 0.0 && share <= 1.0) {
                return Err(RolloutError::InvalidShare(share));
            }
        }
        let engine = &self.inner.engine;
        let before = engine.card(model);
        let counts = engine.rollout_counts(model);
        let card = engine.reload(model, weights, canary).await?;
        if let Some(old) = before.as_ref().and_then(|c| c.canary.clone()) {
            let stable = before.as_ref().map_or("", |c| c.version.as_str());
            let stats = serde_json::to_value(&counts).unwrap_or_default();
            let reason = format!(
                "replaced by a new {}",
                if canary.is_some() {
                    "canary"
                } else {
                    "serving version"
                }
            );
            self.record(
                model,
                "superseded",
                DecidedBy::Admin,
                stable,
                &old,
                reason,
                stats,
            )
            .await;
        }
        if let Some(c) = &card.canary {
            let reason = format!("canary at {:.1}% of new generations", 100.0 * c.share);
            self.record(
                model,
                "start",
                DecidedBy::Admin,
                &card.version,
                c,
                reason,
                serde_json::Value::Null,
            )
            .await;
        }
        Ok(card)
    }

    /// Ends `model`'s rollout: promotes the canary or rolls it back.
    pub async fn end(
        &self,
        model: &str,
        promote: bool,
        by: DecidedBy,
        reason: String,
    ) -> Result<(RolloutEnd, DecisionView), RolloutError> {
        // The evidence as it stood when decided, before the engine forgets the counts. A log
        // that cannot be read must not block a rollback: the decision then keeps no numbers.
        let stats = match self.evidence(model).await {
            Ok(e) => serde_json::json!({ "stable": e.stable, "canary": e.canary }),
            Err(RolloutError::Engine(e)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(error = %e, model, "rollout evidence unavailable");
                serde_json::Value::Null
            }
        };
        let engine = &self.inner.engine;
        let stable = engine.card(model).map(|c| c.version).unwrap_or_default();
        let end = if promote {
            engine.promote(model).await?
        } else {
            engine.rollback(model).await?
        };
        let stable = stable.as_str();
        let action = if promote { "promote" } else { "rollback" };
        let d = self
            .record(model, action, by, stable, &end.canary, reason, stats)
            .await;
        Ok((end, d.into()))
    }

    /// Both versions' evidence, what the policy reads from it, and the recent decisions.
    pub async fn report(&self, model: &str) -> Result<RolloutReport, RolloutError> {
        let e = self.evidence(model).await?;
        Ok(RolloutReport {
            model: model.to_string(),
            stable: e.stable,
            canary: e.canary,
            share: e.card.as_ref().map(|c| c.share),
            started_ms: e.card.as_ref().map(|c| c.started_ms),
            policy: self.inner.policy.clone(),
            verdict: e.verdict,
            decisions: self.decisions(model, 20).await?,
        })
    }

    /// Both versions' numbers and the policy's reading of them (what decisions need; the
    /// report adds the decision history).
    async fn evidence(&self, model: &str) -> Result<Evidence, RolloutError> {
        let engine = &self.inner.engine;
        let card = engine
            .card(model)
            .ok_or_else(|| EngineError::UnknownModel(model.to_string()))?;
        let counts = engine.rollout_counts(model);
        let ratings = match (&self.inner.log, &card.canary) {
            (Some(log), Some(c)) => log.store.rating_stats(model, c.started_ms).await?,
            _ => Vec::new(),
        };
        let rated = |version: &str| {
            ratings
                .iter()
                .find(|r| r.version == version)
                .cloned()
                .unwrap_or_default()
        };
        let confidence = self.inner.policy.confidence;
        let stable_counts = counts.as_ref().map(|c| c.stable).unwrap_or_default();
        let stable_ev = evidence(&stable_counts, &rated(&card.version));
        let stable = arm_report(&card.version, &stable_counts, &stable_ev, confidence);
        let mut verdict = None;
        let canary = card.canary.as_ref().map(|c| {
            let counts = counts.as_ref().map(|c| c.canary).unwrap_or_default();
            let ev = evidence(&counts, &rated(&c.version));
            verdict = Some(decide(&stable_ev, &ev, &self.inner.policy));
            arm_report(&c.version, &counts, &ev, confidence)
        });
        Ok(Evidence {
            stable,
            canary,
            verdict,
            card: card.canary,
        })
    }

    /// The newest `limit` decisions about `model`: from the log when there is one.
    async fn decisions(
        &self,
        model: &str,
        limit: usize,
    ) -> Result<Vec<DecisionView>, RolloutError> {
        let decisions = match &self.inner.log {
            Some(log) => log.store.rollout_decisions(model, limit as i64).await?,
            None => self
                .recent()
                .iter()
                .rev()
                .filter(|d| d.model == model)
                .take(limit)
                .cloned()
                .collect(),
        };
        Ok(decisions.into_iter().map(DecisionView::from).collect())
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, VecDeque<RolloutDecision>> {
        self.inner
            .recent
            .lock()
            .expect("rollout decisions lock poisoned")
    }

    /// Logs a step: tracing, metrics, this process's memory and the generation log.
    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        model: &str,
        action: &str,
        by: DecidedBy,
        stable_version: &str,
        canary: &CanaryCard,
        reason: String,
        stats: serde_json::Value,
    ) -> RolloutDecision {
        tracing::info!(model, action, decided_by = by.as_str(), stable = stable_version, canary = %canary.version, %reason, "rollout");
        metrics::counter!("fewstep_rollout_decisions_total", "model" => model.to_string(), "action" => action.to_string(), "decided_by" => by.as_str())
            .increment(1);
        let d = RolloutDecision {
            id: decision_id(),
            model: model.to_string(),
            created_ms: crate::util::unix_ms(),
            action: action.to_string(),
            decided_by: by.as_str().to_string(),
            stable_version: stable_version.to_string(),
            canary_version: canary.version.clone(),
            share: canary.share,
            reason,
            stats,
        };
        {
            let mut recent = self.recent();
            recent.push_back(d.clone());
            while recent.len() > KEPT_DECISIONS {
                recent.pop_front();
            }
        }
        if let Some(log) = &self.inner.log {
            // A decision already took effect; failing to log it must not undo it.
            if let Err(e) = log.store.insert_rollout_decision(&d).await {
                tracing::error!(error = %e, model, action, "could not log a rollout decision");
            }
        }
        d
    }

    /// Runs the policy over every live rollout every `check_every_s`, acting on its
    /// promotions and rollbacks. Returns at once when the policy is not automatic.
    pub fn spawn_policy(&self) -> Option<tokio::task::JoinHandle<()>> {
        if !self.inner.policy.auto {
            return None;
        }
        let this = self.clone();
        let every = Duration::from_secs(self.inner.policy.check_every_s);
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                this.apply_policy().await;
            }
        }))
    }

    /// One pass of the policy over the live rollouts.
    pub async fn apply_policy(&self) {
        let models: Vec<String> = self
            .inner
            .engine
            .cards()
            .into_iter()
            .filter(|c| c.canary.is_some())
            .map(|c| c.manifest.name)
            .collect();
        for model in models {
            let verdict = match self.evidence(&model).await {
                Ok(e) => e.verdict,
                Err(e) => {
                    tracing::warn!(error = %e, %model, "rollout policy could not read the evidence");
                    continue;
                }
            };
            let Some(v) = verdict else { continue };
            let promote = match v.action {
                Action::Wait => continue,
                Action::Promote => true,
                Action::Rollback => false,
            };
            if let Err(e) = self.end(&model, promote, DecidedBy::Policy, v.reason).await {
                tracing::warn!(error = %e, %model, "rollout policy could not act");
            }
        }
    }
}

fn decision_id() -> String {
    use rand::Rng;
    let v: u128 = rand::rng().random();
    format!("rd_{:024x}", v >> 32)
}

/// What the policy reads from one version's counters and ratings.
fn evidence(c: &ArmCounts, r: &RatingStats) -> ArmEvidence {
    ArmEvidence {
        requests: c.requests,
        errors: c.errors,
        rated: r.n.max(0) as u64,
        rating_sum: r.sum,
        rating_sq: r.sum_sq,
    }
}

fn arm_report(version: &str, c: &ArmCounts, e: &ArmEvidence, confidence: f64) -> ArmReport {
    ArmReport {
        version: version.to_string(),
        requests: c.requests,
        outputs: c.outputs,
        errors: c.errors,
        error_rate: e.error_rate(),
        rated: e.rated,
        mean_rating: e.mean_rating(),
        rating_interval: e.rating_interval(confidence),
        reward_mean: (c.reward_n > 0).then(|| c.reward_sum / c.reward_n as f64),
        reward_n: c.reward_n,
    }
}
