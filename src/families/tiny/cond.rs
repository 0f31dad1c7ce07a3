//! The global conditioning vector of both tiny denoisers: an MLP of the timestep's sin-cos
//! embedding plus a projection of the pooled prompt, through SiLU. Every modulation (adaLN)
//! reads it.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::text::TextCond;
use crate::nn::{timestep_embedding, Linear};

#[derive(Debug, Clone)]
pub struct CondEmbedding {
    t_fc1: Linear,
    t_fc2: Linear,
    text_proj: Linear,
}

impl CondEmbedding {
    /// Weights `t_fc1`, `t_fc2` and `text_proj` directly under `vb`.
    pub fn new(vb: &VarBuilder, text_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            t_fc1: Linear::new(vb.pp("t_fc1"), dim, dim)?,
            t_fc2: Linear::new(vb.pp("t_fc2"), dim, dim)?,
            text_proj: Linear::new(vb.pp("text_proj"), text_dim, dim)?,
        })
    }

    /// `[B, dim]` for times `t` (`[B]`, in `[0, 1]`) and the prompts' pooled features.
    pub fn forward(&self, t: &[f32], text: &TextCond) -> Result<Tensor> {
        let pooled = &text.pooled;
        let temb = timestep_embedding(t, self.t_fc1.in_dim(), pooled.device())?
            .to_dtype(pooled.dtype())?;
        let temb = self.t_fc2.forward(&self.t_fc1.forward(&temb)?.silu()?)?;
        (temb + self.text_proj.forward(pooled)?)?.silu()
    }
}
