//! diffusers' `WanTransformer3DModel` (text-to-video): 3D patch embedding, time and text
//! conditioning, [`WanBlock`]s, the modulated output norm and unpatchify. Parameter names are
//! diffusers' state-dict names, so `transformer/diffusion_pytorch_model.safetensors` loads as
//! is; every op has a backward, so the same model trains.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::block::{normal, wide, wide_vb, BlockDims, WanBlock};
use super::rope::rope_tables;
use super::{WanError, WanTransformerConfig};
use crate::families::sd::layers::{timestep_embedding, TimestepMlp};
use crate::families::sd::unet::weight_files;
use crate::nn::{layer_norm_modulate, Linear, VisitLinear};

/// `Conv3d(kernel = stride = patch)` as one GEMM over the flattened patches.
#[derive(Debug, Clone)]
struct PatchEmbed {
    /// `[D, C, pt, ph, pw]`, the conv weight as stored.
    weight: Tensor,
    bias: Tensor,
}

impl PatchEmbed {
    fn new(vb: VarBuilder, cfg: &WanTransformerConfig) -> Result<Self> {
        let (pt, ph, pw) = cfg.patch();
        let shape = (cfg.inner_dim(), cfg.in_channels, pt, ph, pw);
        let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        Ok(Self {
            weight: vb.get_with_hints(shape, "weight", init)?,
            bias: vb.get_with_hints(cfg.inner_dim(), "bias", candle_nn::init::ZERO)?,
        })
    }

    /// `[B, C, F, H, W]` -> tokens `[B, F'*H'*W', D]`, frame-major like diffusers' flatten.
    fn forward(&self, x: &Tensor, (pt, ph, pw): (usize, usize, usize)) -> Result<Tensor> {
        let (b, c, f, h, w) = x.dims5()?;
        let (gf, gh, gw) = (f / pt, h / ph, w / pw);
        let patches = x
            .reshape(vec![b, c, gf, pt, gh, ph, gw, pw])?
            .permute([0, 2, 4, 6, 1, 3, 5, 7])?
            .reshape((b, gf * gh * gw, c * pt * ph * pw))?;
        // Flattened per call (a view), so the gradient reaches the stored weight.
        let w2 = self.weight.flatten_from(1)?;
        patches
            .broadcast_matmul(&w2.t()?)?
            .broadcast_add(&self.bias)
    }
}

/// `PixArtAlphaTextProjection(act_fn="gelu_tanh")`: `linear_2(gelu_tanh(linear_1(x)))`.
#[derive(Debug, Clone)]
struct TextProjection {
    linear_1: Linear,
    linear_2: Linear,
}

impl TextProjection {
    fn new(vb: VarBuilder, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_dim, dim)?,
            linear_2: Linear::new(vb.pp("linear_2"), dim, dim)?,
        })
    }
}

impl Module for TextProjection {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.gelu()?)
    }
}

/// The Wan video transformer.
#[derive(Debug, Clone)]
pub struct WanTransformer {
    cfg: WanTransformerConfig,
    patch_embedding: PatchEmbed,
    /// `condition_embedder.time_embedder`, kept in f32 for half-precision models.
    time_embedder: TimestepMlp,
    time_proj: Linear,
    text_embedder: TextProjection,
    blocks: Vec<WanBlock>,
    proj_out: Linear,
    /// `[1, 2, D]`: the output norm's shift and scale rows.
    scale_shift_table: Tensor,
}

impl WanTransformer {
    /// Builds the model from `vb` (a diffusers state dict, or fresh trainable variables).
    pub fn new(vb: VarBuilder, cfg: &WanTransformerConfig) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::wrap)?;
        let dim = cfg.inner_dim();
        let (pt, ph, pw) = cfg.patch();
        let cond = vb.pp("condition_embedder");
        let dims = BlockDims {
            dim,
            ffn_dim: cfg.ffn_dim,
            heads: cfg.num_attention_heads,
            eps: cfg.eps,
            cross_attn_norm: cfg.cross_attn_norm,
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| WanBlock::new(vb.pp("blocks").pp(i), &dims))
            .collect::<Result<Vec<_>>>()?;
        let table = wide_vb(&vb).get_with_hints((1, 2, dim), "scale_shift_table", normal(dim))?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embedding: PatchEmbed::new(vb.pp("patch_embedding"), cfg)?,
            time_embedder: TimestepMlp::new(wide_vb(&cond).pp("time_embedder"), cfg.freq_dim, dim)?,
            time_proj: Linear::new(cond.pp("time_proj"), dim, 6 * dim)?,
            text_embedder: TextProjection::new(cond.pp("text_embedder"), cfg.text_dim, dim)?,
            blocks,
            proj_out: Linear::new(vb.pp("proj_out"), dim, cfg.out_channels() * pt * ph * pw)?,
            scale_shift_table: table,
        })
    }

    /// Loads the model from a diffusers `transformer/` directory or a single safetensors
    /// file (a distilled student, say). A missing tensor or a wrong shape names the tensor.
    pub fn load(
        path: &Path,
        cfg: &WanTransformerConfig,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, WanError> {
        cfg.validate()?;
        let files = weight_files(path).map_err(WanError::from)?;
        let shown = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let werr = |source| WanError::Weights {
            path: shown.clone(),
            source,
        };
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on
        // them not being truncated or rewritten while the model is built (tensors are copied
        // out of the mapping when read).
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(werr)?;
        Self::new(vb, cfg).map_err(werr)
    }

    pub fn config(&self) -> &WanTransformerConfig {
        &self.cfg
    }

    /// The prediction (flow velocity) for `latents` `[B, C, F, H, W]` at `timesteps` `[B]`
    /// (one per row, on the 0..1000 scale; a scalar or `[1]` is shared by all rows), given
    /// text states `[B, L, text_dim]`. Returns `[B, out_channels, F, H, W]`.
    pub fn forward(&self, latents: &Tensor, timesteps: &Tensor, text: &Tensor) -> Result<Tensor> {
        let (b, grid) = self.check_inputs(latents, text)?;
        let timesteps = match timesteps.dims() {
            [n] if *n == b => timesteps.clone(),
            [] | [1] => timesteps.reshape(1)?.broadcast_as(b)?,
            other => candle_core::bail!("Wan: timesteps of shape {other:?} for a batch of {b}"),
        };
        let dtype = latents.dtype();
        let dim = self.cfg.inner_dim();
        let rope = rope_tables(
            self.cfg.attention_head_dim,
            grid,
            wide(dtype),
            latents.device(),
        )?;

        let mut x = self.patch_embedding.forward(latents, self.cfg.patch())?;

        // Sinusoids in f32 (diffusers' `Timesteps`), the MLP in its own (f32) dtype.
        let t_freq = timestep_embedding(&timesteps, self.cfg.freq_dim, true, 0.0)?;
        let t_freq = t_freq.to_dtype(wide(dtype))?;
        let temb = self.time_embedder.forward(&t_freq)?.to_dtype(dtype)?;
        let temb6 = self
            .time_proj
            .forward(&crate::nn::silu(&temb)?)?
            .reshape((b, 6, dim))?;
        let context = self.text_embedder.forward(text)?;

        for block in &self.blocks {
            x = block.forward(&x, &context, &temb6, &rope)?;
        }

        let table = &self.scale_shift_table;
        let temb_w = temb.to_dtype(table.dtype())?;
        let shift = table.get(0)?.get(0)?.broadcast_add(&temb_w)?;
        let scale = table.get(0)?.get(1)?.broadcast_add(&temb_w)?;
        let xw = x.to_dtype(table.dtype())?;
        let x = layer_norm_modulate(&xw, &shift, &scale, self.cfg.eps)?.to_dtype(dtype)?;
        let x = self.proj_out.forward(&x)?;
        self.unpatchify(&x, b, grid)
    }

    /// Checks shapes against the config; returns the batch and the patch grid.
    fn check_inputs(
        &self,
        latents: &Tensor,
        text: &Tensor,
    ) -> Result<(usize, (usize, usize, usize))> {
        let Ok((b, c, f, h, w)) = latents.dims5() else {
            candle_core::bail!(
                "Wan: latents must be [B, C, F, H, W], got {:?}",
                latents.dims()
            );
        };
        let cfg = &self.cfg;
        if c != cfg.in_channels {
            candle_core::bail!(
                "Wan: latents have {c} channels, the model takes {}",
                cfg.in_channels
            );
        }
        let (pt, ph, pw) = cfg.patch();
        if f % pt != 0 || h % ph != 0 || w % pw != 0 || f == 0 || h == 0 || w == 0 {
            candle_core::bail!(
                "Wan: latent size {f}x{h}x{w} (frames x height x width) is not a positive \
                 multiple of the patch {pt}x{ph}x{pw}"
            );
        }
        let grid = (f / pt, h / ph, w / pw);
        let longest = grid.0.max(grid.1).max(grid.2);
        if longest > cfg.rope_max_seq_len {
            candle_core::bail!(
                "Wan: a patch grid of {grid:?} exceeds rope_max_seq_len {}",
                cfg.rope_max_seq_len
            );
        }
        match text.dims() {
            [tb, l, d] if *tb == b && *l > 0 && *d == cfg.text_dim => Ok((b, grid)),
            other => candle_core::bail!(
                "Wan: text states must be [{b}, L, {}], got {other:?}",
                cfg.text_dim
            ),
        }
    }

    /// `[B, F'*H'*W', pt*ph*pw*C]` -> `[B, C, F, H, W]`, diffusers' channel-last patch order.
    fn unpatchify(
        &self,
        x: &Tensor,
        b: usize,
        (gf, gh, gw): (usize, usize, usize),
    ) -> Result<Tensor> {
        let (pt, ph, pw) = self.cfg.patch();
        let c = self.cfg.out_channels();
        x.reshape(vec![b, gf, gh, gw, pt, ph, pw, c])?
            .permute([0, 7, 1, 4, 2, 5, 3, 6])?
            .reshape((b, c, gf * pt, gh * ph, gw * pw))
    }

    /// Attaches LoRA adapters (variables from `vb`, under each layer's state-dict path) to
    /// every layer [`Self::visit_linears`] visits; returns how many.
    pub fn attach_lora(&mut self, vb: VarBuilder, cfg: &crate::nn::LoraConfig) -> Result<usize> {
        let mut count = 0;
        self.visit_linears(&mut |path, linear| {
            linear.attach_lora(vb.pp(path), cfg)?;
            count += 1;
            Ok(())
        })?;
        Ok(count)
    }

    /// Visits every block's attention and feed-forward layers with their state-dict paths
    /// (`blocks.{i}.attn1.to_q`, ..., `blocks.{i}.ffn.net.2`).
    pub fn visit_linears(&mut self, f: &mut VisitLinear) -> Result<()> {
        for (i, block) in self.blocks.iter_mut().enumerate() {
            block.visit_linears(&format!("blocks.{i}"), f)?;
        }
        Ok(())
    }
}
