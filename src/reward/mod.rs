//! Reward proxies (AMD.md section 6): frozen scorers of a decoded sample against its prompt,
//! behind one trait so that distillation does not care which one it uses.

mod clip_score;
mod logged;
pub mod open_clip;
mod verifier;

pub use clip_score::{ClipModelConfig, ClipScoreReward};
pub use logged::{FitReport, LoggedReward};
pub use verifier::VerifierReward;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::families::sd::layout::LoadError;

#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    #[error("the {reward} reward cannot score prompt {prompt:?}: {reason}")]
    Prompt {
        reward: &'static str,
        prompt: String,
        reason: String,
    },
    #[error("the {reward} reward cannot score these samples: {reason}")]
    Samples {
        reward: &'static str,
        reason: String,
    },
    #[error("unknown reward {0:?} (known: verifier, clip)")]
    Unknown(String),
    #[error("the {reward} reward {problem}")]
    Path {
        reward: &'static str,
        problem: &'static str,
    },
    #[error("loading the reward model: {0}")]
    Load(#[from] LoadError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// A frozen scorer: one value per sample, higher is better, on the reward's own scale (the
/// verifier's is `[0, 1]`; `clip`'s is `exp(logit_scale)` x cosine, about `[-100, 100]`):
/// distillation only uses it through group-normalized advantages. No gradient flows.
pub trait Reward: Send {
    fn name(&self) -> &'static str;

    /// Fails when this reward cannot score `prompt` at all (checked before training starts).
    fn check_prompt(&self, prompt: &str) -> Result<(), RewardError>;

    /// Scores `samples` (`[B, F, C, H, W]`, values in `[-1, 1]`) against their prompts.
    fn score(&self, prompts: &[String], samples: &Tensor) -> Result<Vec<f32>, RewardError>;
}

/// The reward named in a config (`verifier` for the built-in world; `logged` is fitted from
/// the generation log by `distill --from-log`). Rewards that need a model directory (`clip`)
/// are built by [`load`].
pub fn by_name(name: &str) -> Result<Box<dyn Reward>, RewardError> {
    load(name, None, &Device::Cpu)
}

/// The reward a config names, its model (if it has one) loaded from `path` onto `device`:
/// `verifier` (no path), or `clip` with `path` a transformers `CLIPModel` directory (PickScore)
/// or an OpenCLIP one (the laion hub repositories, HPSv2's `.pt` with its config): see
/// [`ClipScoreReward`]. It scores RGB images of any size, resized as the model expects.
pub fn load(
    name: &str,
    path: Option<&Path>,
    device: &Device,
) -> Result<Box<dyn Reward>, RewardError> {
    let path_error = |reward, problem| RewardError::Path { reward, problem };
    match (name, path) {
        ("verifier", None) => Ok(Box::new(VerifierReward)),
        ("verifier", Some(_)) => Err(path_error("verifier", "takes no model path")),
        ("clip", Some(dir)) => Ok(Box::new(ClipScoreReward::load(dir, DType::F32, device)?)),
        ("clip", None) => Err(path_error(
            "clip",
            "needs a CLIPModel or OpenCLIP directory (reward_path in the distill config)",
        )),
        (other, _) => Err(RewardError::Unknown(other.to_string())),
    }
}
