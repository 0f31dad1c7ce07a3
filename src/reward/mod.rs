//! Reward proxies (AMD.md section 6): frozen scorers of a decoded sample against its prompt,
//! behind one trait so that distillation does not care which one it uses.

mod logged;
mod verifier;

pub use logged::{FitReport, LoggedReward};
pub use verifier::VerifierReward;

use candle_core::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("the {reward} reward cannot score prompt {prompt:?}: {reason}")]
    Prompt {
        reward: &'static str,
        prompt: String,
        reason: String,
    },
    #[error("unknown reward {0:?} (known: verifier)")]
    Unknown(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// A frozen scorer: one value in `[0, 1]` per sample, higher is better. No gradient flows.
pub trait Reward: Send {
    fn name(&self) -> &'static str;

    /// Fails when this reward cannot score `prompt` at all (checked before training starts).
    fn check_prompt(&self, prompt: &str) -> Result<(), RewardError>;

    /// Scores `samples` (`[B, F, C, H, W]`, values in `[-1, 1]`) against their prompts.
    fn score(&self, prompts: &[String], samples: &Tensor) -> Result<Vec<f32>, RewardError>;
}

/// The reward named in a config (`verifier` for the built-in world; `logged` is fitted from
/// the generation log by `distill --from-log`).
pub fn by_name(name: &str) -> Result<Box<dyn Reward>, RewardError> {
    match name {
        "verifier" => Ok(Box::new(VerifierReward)),
        other => Err(RewardError::Unknown(other.to_string())),
    }
}
