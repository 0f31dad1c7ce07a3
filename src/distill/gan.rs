//! DMD2's optional GAN term (AMD.md section 3.5): a small head on the critic's middle-block
//! tokens tells real from generated samples at the same noise level. Off by default.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::nn::Linear;
use crate::pipeline::from_frames;
use crate::world;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GanConfig {
    pub enabled: bool,
    /// Weight of the discriminator loss in the critic's loss.
    pub d_weight: f64,
    /// Weight of the generator's adversarial term.
    pub g_weight: f64,
}

impl Default for GanConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            d_weight: 1e-2,
            g_weight: 3e-3,
        }
    }
}

/// Mean-pooled tokens -> MLP -> one logit per sample (real = positive).
#[derive(Debug, Clone)]
pub struct GanHead {
    fc1: Linear,
    fc2: Linear,
}

impl GanHead {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(vb.pp("fc1"), dim, dim)?,
            fc2: Linear::new(vb.pp("fc2"), dim, 1)?,
        })
    }

    /// `[B, T, D]` tokens -> `[B]` logits.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let pooled = tokens.mean(1)?;
        self.fc2
            .forward(&self.fc1.forward(&pooled)?.silu()?)?
            .squeeze(1)
    }
}

/// `log(1 + exp(x))`, stable for large `|x|`, from ops that all have a backward.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// Discriminator loss `softplus(D(fake)) + softplus(-D(real))`, batch mean.
pub fn discriminator_loss(fake_logits: &Tensor, real_logits: &Tensor) -> Result<Tensor> {
    softplus(fake_logits)?.mean_all()? + softplus(&real_logits.neg()?)?.mean_all()?
}

/// Generator term `softplus(-D(G))`, batch mean.
pub fn generator_loss(fake_logits: &Tensor) -> Result<Tensor> {
    softplus(&fake_logits.neg()?)?.mean_all()
}

/// Real samples for `prompts`: ShapesWorld renders with `frames` frames.
pub fn real_batch(
    prompts: &[String],
    frames: usize,
    rng: &mut impl Rng,
    device: &candle_core::Device,
) -> anyhow::Result<Tensor> {
    let xs = prompts
        .iter()
        .map(|p| {
            let mut spec = world::parse(p).map_err(|e| {
                anyhow::anyhow!(
                    "the GAN term needs real samples, and {p:?} is not a ShapesWorld prompt: {e}"
                )
            })?;
            spec.frames = frames;
            Ok(from_frames(&world::render(&spec, rng), device)?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&xs, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn softplus_is_stable_and_matches_the_formula() -> Result<()> {
        let x = Tensor::new(&[-100f32, -1.0, 0.0, 2.0, 100.0], &Device::Cpu)?;
        let y = softplus(&x)?.to_vec1::<f32>()?;
        let want = [
            0.0f32,
            0.313_261_7,
            std::f32::consts::LN_2,
            2.126_928,
            100.0,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
        // A confident, correct discriminator has a small loss; a fooled one a large loss.
        let good = discriminator_loss(
            &Tensor::new(&[-5f32], &Device::Cpu)?,
            &Tensor::new(&[5f32], &Device::Cpu)?,
        )?;
        let bad = discriminator_loss(
            &Tensor::new(&[5f32], &Device::Cpu)?,
            &Tensor::new(&[-5f32], &Device::Cpu)?,
        )?;
        assert!(good.to_scalar::<f32>()? < 0.02 && bad.to_scalar::<f32>()? > 9.0);
        Ok(())
    }
}
