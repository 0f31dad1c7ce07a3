//! The ShapesWorld verifier's soft score as a reward: analytic, prompt-faithful, and soft
//! enough to rank the samples of one prompt group.

use candle_core::Tensor;

use super::{Reward, RewardError};
use crate::pipeline::to_frames;
use crate::world::{self, SceneSpec};

pub struct VerifierReward;

impl VerifierReward {
    /// The verifier's full judgement of `frames` against `prompt` (a still prompt may be
    /// rendered as a video and the other way round: the generated frames are judged).
    pub fn verdict(
        prompt: &str,
        frames: &[image::RgbImage],
    ) -> Result<world::Verdict, RewardError> {
        let mut spec = Self::spec(prompt)?;
        spec.frames = frames.len();
        Ok(world::verify(&spec, frames))
    }

    fn spec(prompt: &str) -> Result<SceneSpec, RewardError> {
        world::parse(prompt).map_err(|e| RewardError::Prompt {
            reward: "verifier",
            prompt: prompt.to_string(),
            reason: e.to_string(),
        })
    }
}

impl Reward for VerifierReward {
    fn name(&self) -> &'static str {
        "verifier"
    }

    fn check_prompt(&self, prompt: &str) -> Result<(), RewardError> {
        Self::spec(prompt).map(|_| ())
    }

    fn score(&self, prompts: &[String], samples: &Tensor) -> Result<Vec<f32>, RewardError> {
        let frames = to_frames(samples)?;
        prompts
            .iter()
            .zip(&frames)
            .map(|(p, f)| Ok(Self::verdict(p, f)?.score))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::from_frames;
    use rand::SeedableRng;

    #[test]
    fn a_true_render_outscores_a_render_of_another_prompt() -> anyhow::Result<()> {
        let dev = candle_core::Device::Cpu;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let red = world::parse("a large red circle on the left")?;
        let blue = world::parse("a small blue square at the top")?;
        let x = Tensor::stack(
            &[
                from_frames(&world::render(&red, &mut rng), &dev)?,
                from_frames(&world::render(&blue, &mut rng), &dev)?,
            ],
            0,
        )?;
        let prompts = vec!["a large red circle on the left".to_string(); 2];
        let s = VerifierReward.score(&prompts, &x)?;
        assert!(s[0] > 0.9 && s[1] < 0.5, "{s:?}");
        assert!(VerifierReward.check_prompt("a purple unicorn").is_err());
        Ok(())
    }
}
