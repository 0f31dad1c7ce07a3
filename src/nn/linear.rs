//! A dense layer that folds all leading dimensions into one GEMM, with an optional LoRA
//! adapter.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::lora::{LoraAdapter, LoraConfig};

/// A callback over the dense layers of a module tree: the layer's state-dict path (e.g.
/// `down_blocks.1.attentions.0.proj_in`) and the layer.
pub type VisitLinear<'a> = dyn FnMut(&str, &mut Linear) -> Result<()> + 'a;

/// `y = x W^T + b` (`+ scale * (x A^T) B^T` with a LoRA adapter). Unlike `candle_nn::Linear`,
/// inputs of rank 3 or more are flattened to a single `[rows, in]` matrix, so the CPU runs
/// one large GEMM instead of a batch of small ones against a broadcast weight.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
}

impl Linear {
    /// A layer with the default (Kaiming-normal) weight init and zero bias.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        Self::with_init(vb, in_dim, out_dim, init)
    }

    /// A layer whose weight and bias start at zero (adaLN-Zero gates, output heads).
    pub fn zeros(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Self::with_init(vb, in_dim, out_dim, candle_nn::init::ZERO)
    }

    pub fn with_init(vb: VarBuilder, in_dim: usize, out_dim: usize, init: Init) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        let bias = vb.get_with_hints(out_dim, "bias", candle_nn::init::ZERO)?;
        Ok(Self {
            weight,
            bias: Some(bias),
            lora: None,
        })
    }

    /// A layer without bias (Kaiming-normal init), like PyTorch's `Linear(..., bias=False)`.
    pub fn no_bias(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
        Ok(Self {
            weight,
            bias: None,
            lora: None,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    /// The base weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    /// Adds (or replaces) a LoRA adapter whose tensors `lora_A.weight` and `lora_B.weight`
    /// come from `vb`, which points at this layer's path. Rank 0 leaves the layer as it is.
    pub fn attach_lora(&mut self, vb: VarBuilder, cfg: &LoraConfig) -> Result<()> {
        if cfg.enabled() {
            self.lora = Some(LoraAdapter::new(vb, self.in_dim(), self.out_dim(), cfg)?);
        }
        Ok(())
    }
}

impl Linear {
    /// `silu(self.forward(x))`, with the SiLU fused into the product where the layer has a
    /// bias and no adapter ([`super::fused_linear::linear_bias_silu`]).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        match (&self.bias, &self.lora) {
            (Some(b), None) => self.rows(x, |x2| {
                super::fused_linear::linear_bias_silu(x2, &self.weight, b)
            }),
            _ => super::fused::silu(&self.forward(x)?),
        }
    }

    /// `f` over `x` flattened to `[rows, in]`, its output given back `x`'s leading dimensions.
    fn rows(&self, x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let y = f(&x.reshape((rows, in_dim))?)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank >= 1") = self.weight.dim(0)?;
        y.reshape(out_dims)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.rows(x, |x2| {
            let y = match &self.bias {
                Some(b) => super::fused_linear::linear_bias(x2, &self.weight, b)?,
                None => x2.matmul(&self.weight.t()?)?,
            };
            match &self.lora {
                Some(lora) => y + lora.delta(x2)?,
                None => Ok(y),
            }
        })
    }
}
