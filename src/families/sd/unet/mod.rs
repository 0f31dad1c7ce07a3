//! diffusers' `UNet2DConditionModel` for SD1.x, SD2.x and SDXL, with per-row timesteps and
//! SDXL's `text_time` added conditioning. Parameter names are diffusers' state-dict names,
//! so `diffusion_pytorch_model.safetensors` loads directly; every op has a backward, so the
//! same model trains.

mod attention;
mod blocks;
pub mod config;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use self::blocks::{BlockCtx, DownBlock, MidBlock, UpBlock};
pub use self::config::{UNetConfig, UNetPlan};
use crate::families::sd::layers::{timestep_embedding, Conv2d, GroupNorm, TimestepMlp, VisitConv};
use crate::nn::{LoraConfig, VisitLinear};

/// Errors of reading a UNet's config or weights.
#[derive(Debug, thiserror::Error)]
pub enum UNetError {
    #[error("invalid UNet config {path}: {message}")]
    Config { path: String, message: String },
    #[error("unsupported UNet config: {0}")]
    Unsupported(String),
    #[error(
        "no UNet weights at {path}: expected a .safetensors file or a directory holding \
         diffusion_pytorch_model.safetensors (or its sharded index)"
    )]
    MissingWeights { path: String },
    #[error("cannot load UNet weights {path}: {source}")]
    Weights {
        path: String,
        source: candle_core::Error,
    },
}

/// SDXL's added conditioning (`added_cond_kwargs`).
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// Pooled, projected text embedding of the second text encoder, `[B, P]`.
    pub text_embeds: Tensor,
    /// `[B, 6]`: original size, crop top-left and target size, in pixels.
    pub time_ids: Tensor,
}

/// `add_time_proj` + `add_embedding` of `addition_embed_type: text_time`.
#[derive(Debug, Clone)]
struct TextTimeEmbedding {
    time_dim: usize,
    in_dim: usize,
    mlp: TimestepMlp,
}

/// The conditional UNet.
#[derive(Debug, Clone)]
pub struct UNet {
    cfg: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepMlp,
    add_embedding: Option<TextTimeEmbedding>,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet {
    /// Builds the UNet from `vb` (a diffusers state dict, or fresh trainable variables).
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let plan = cfg.plan().map_err(candle_core::Error::wrap)?;
        let ch0 = cfg.block_out_channels[0];
        let ctx = BlockCtx {
            groups: plan.groups,
            eps: cfg.norm_eps,
            temb_dim: plan.time_embed_dim,
            linear_projection: cfg.use_linear_projection,
            downsample_padding: cfg.downsample_padding,
        };
        let add_embedding = match plan.text_time {
            Some((time_dim, in_dim)) => Some(TextTimeEmbedding {
                time_dim,
                in_dim,
                mlp: TimestepMlp::new(vb.pp("add_embedding"), in_dim, plan.time_embed_dim)?,
            }),
            None => None,
        };
        let down = plan
            .down
            .iter()
            .enumerate()
            .map(|(i, spec)| DownBlock::new(vb.pp("down_blocks").pp(i), &ctx, spec))
            .collect::<Result<Vec<_>>>()?;
        let mid = match &plan.mid {
            Some(spec) => Some(MidBlock::new(
                vb.pp("mid_block"),
                &ctx,
                spec,
                cfg.mid_block_scale_factor,
            )?),
            None => None,
        };
        let up = plan
            .up
            .iter()
            .enumerate()
            .map(|(i, spec)| UpBlock::new(vb.pp("up_blocks").pp(i), &ctx, spec))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            conv_in: Conv2d::same(vb.pp("conv_in"), cfg.in_channels, ch0, cfg.conv_in_kernel)?,
            time_embedding: TimestepMlp::new(vb.pp("time_embedding"), ch0, plan.time_embed_dim)?,
            add_embedding,
            down,
            mid,
            up,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), plan.groups, ch0, cfg.norm_eps)?,
            conv_out: Conv2d::same(
                vb.pp("conv_out"),
                ch0,
                cfg.out_channels,
                cfg.conv_out_kernel,
            )?,
        })
    }

    /// Loads the UNet from a diffusers `unet/` directory or a single safetensors file (a
    /// DMD2 checkpoint, say). A missing tensor or a wrong shape names the file and the tensor.
    pub fn load(
        path: &Path,
        cfg: &UNetConfig,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, UNetError> {
        cfg.plan()?;
        let files = weight_files(path)?;
        let shown = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let werr = |source| UNetError::Weights {
            path: shown.clone(),
            source,
        };
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on
        // them not being truncated or rewritten while the model is being built (tensors are
        // copied out of the mapping when read).
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(werr)?;
        Self::new(vb, cfg).map_err(werr)
    }

    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// Whether `forward` needs [`AddedCond`] (SDXL).
    pub fn needs_added_cond(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// The prediction for `sample` `[B, C, H, W]` at `timesteps` `[B]` (one per row, any real
    /// values on the 0..1000 scale), given text states `[B, L, cross_attention_dim]` and, for
    /// SDXL, the added conditioning.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let (b, c, _, _) = sample.dims4()?;
        let dtype = sample.dtype();
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "UNet: sample has {c} channels, the model takes {}",
                self.cfg.in_channels
            );
        }
        let timesteps = match timesteps.dims() {
            [n] if *n == b => timesteps.clone(),
            [] | [1] => timesteps.reshape(1)?.broadcast_as(b)?,
            other => candle_core::bail!("UNet: timesteps of shape {other:?} for a batch of {b}"),
        };
        let sample = if self.cfg.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };

        let ch0 = self.cfg.block_out_channels[0];
        let t_emb = timestep_embedding(
            &timesteps,
            ch0,
            self.cfg.flip_sin_to_cos,
            self.cfg.freq_shift,
        )?;
        let mut emb = self.time_embedding.forward(&t_emb.to_dtype(dtype)?)?;
        if let Some(add) = &self.add_embedding {
            let Some(added) = added else {
                candle_core::bail!("UNet: this SDXL-style UNet needs text_embeds and time_ids");
            };
            emb = (emb + self.added_embedding(add, added, b, dtype)?)?;
        }
        // Every resnet applies SiLU to the embedding before projecting it.
        let temb_act = emb.silu()?;
        let context = encoder_hidden_states.to_dtype(dtype)?;

        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down {
            let (out, states) = block.forward(&h, &temb_act, &context)?;
            h = out;
            skips.extend(states);
        }
        if let Some(mid) = &self.mid {
            h = mid.forward(&h, &temb_act, &context)?;
        }
        for block in &self.up {
            let n = block.skips();
            if skips.len() < n {
                candle_core::bail!("UNet: up block needs {n} skip states, {} left", skips.len());
            }
            let own = skips.split_off(skips.len() - n);
            let size = match skips.last() {
                Some(next) => Some((next.dim(2)?, next.dim(3)?)),
                None => None,
            };
            h = block.forward(&h, &own, &temb_act, &context, size)?;
        }
        let h = self.conv_norm_out.forward(&h)?.silu()?;
        self.conv_out.forward(&h)
    }

    /// Visits the dense layers of the down, mid and up blocks with their state-dict paths:
    /// attention `to_q`/`to_k`/`to_v`/`to_out.0`, feed-forward `ff.net.0.proj`/`ff.net.2`,
    /// linear `proj_in`/`proj_out` and the resnets' `time_emb_proj`, the layers that PEFT
    /// LoRAs of SD UNets adapt. The time and added embeddings' MLPs are not visited.
    pub fn visit_linears(&mut self, f: &mut VisitLinear) -> Result<()> {
        for (i, block) in self.down.iter_mut().enumerate() {
            block.visit_linears(&format!("down_blocks.{i}"), f)?;
        }
        if let Some(mid) = &mut self.mid {
            mid.visit_linears("mid_block", f)?;
        }
        for (i, block) in self.up.iter_mut().enumerate() {
            block.visit_linears(&format!("up_blocks.{i}"), f)?;
        }
        Ok(())
    }

    /// Visits the convolutions of the down, mid and up blocks with their state-dict paths:
    /// the resnets' `conv1`, `conv2` and `conv_shortcut` and the `downsamplers.0.conv` /
    /// `upsamplers.0.conv`, the convolutions DMD2's LoRA adapts. `conv_in` and `conv_out`
    /// are not visited (PEFT LoRAs of SD UNets leave them alone), nor are the 1x1
    /// `proj_in`/`proj_out` of non-linear-projection transformers.
    pub fn visit_convs(&mut self, f: &mut VisitConv) -> Result<()> {
        for (i, block) in self.down.iter_mut().enumerate() {
            block.visit_convs(&format!("down_blocks.{i}"), f)?;
        }
        if let Some(mid) = &mut self.mid {
            mid.visit_convs("mid_block", f)?;
        }
        for (i, block) in self.up.iter_mut().enumerate() {
            block.visit_convs(&format!("up_blocks.{i}"), f)?;
        }
        Ok(())
    }

    /// Attaches a LoRA adapter to every layer [`UNet::visit_linears`] and
    /// [`UNet::visit_convs`] visit and returns how many. `vb` is rooted at the UNet (a `VarMap`-backed builder, so the adapters are the
    /// trainable variables): the adapter of `<path>` is `<path>.lora_A.weight` and
    /// `<path>.lora_B.weight`, PEFT's names. Rank 0 attaches nothing.
    pub fn attach_lora(&mut self, vb: VarBuilder, cfg: &LoraConfig) -> Result<usize> {
        if !cfg.enabled() {
            return Ok(0);
        }
        let mut count = 0;
        self.visit_linears(&mut |path, linear| {
            linear.attach_lora(vb.pp(path), cfg)?;
            count += 1;
            Ok(())
        })?;
        self.visit_convs(&mut |path, conv| {
            conv.attach_lora(vb.pp(path), cfg)?;
            count += 1;
            Ok(())
        })?;
        Ok(count)
    }

    /// `add_embedding(concat(text_embeds, add_time_proj(time_ids)))`.
    fn added_embedding(
        &self,
        add: &TextTimeEmbedding,
        added: &AddedCond,
        b: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        let (tb, p) = added.text_embeds.dims2()?;
        let (ib, ids) = added.time_ids.dims2()?;
        if tb != b || ib != b || p + ids * add.time_dim != add.in_dim {
            candle_core::bail!(
                "UNet: text_embeds {:?} and time_ids {:?} for a batch of {b}: expected \
                 P + n_ids * {} = {}",
                added.text_embeds.dims(),
                added.time_ids.dims(),
                add.time_dim,
                add.in_dim
            );
        }
        let time = timestep_embedding(
            &added.time_ids,
            add.time_dim,
            self.cfg.flip_sin_to_cos,
            self.cfg.freq_shift,
        )?
        .reshape((b, ids * add.time_dim))?;
        let x = Tensor::cat(
            &[added.text_embeds.to_dtype(dtype)?, time.to_dtype(dtype)?],
            1,
        )?;
        add.mlp.forward(&x)
    }
}

/// The safetensors files of a UNet (or another diffusers model, e.g. Wan's transformer): the
/// file itself, or in a directory the single file, the shards of its index, or the fp16
/// variant.
pub(crate) fn weight_files(path: &Path) -> std::result::Result<Vec<PathBuf>, UNetError> {
    let missing = || UNetError::MissingWeights {
        path: path.display().to_string(),
    };
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(missing());
    }
    let single = path.join("diffusion_pytorch_model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = path.join("diffusion_pytorch_model.safetensors.index.json");
    if index.is_file() {
        let cfg_err = |message: String| UNetError::Config {
            path: index.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(&index).map_err(|e| cfg_err(e.to_string()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| cfg_err(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| cfg_err("no `weight_map` object".into()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for shard in map.values() {
            let name = shard
                .as_str()
                .ok_or_else(|| cfg_err(format!("shard name {shard} is not a string")))?;
            let file = path.join(name);
            if !files.contains(&file) {
                files.push(file);
            }
        }
        if let Some(absent) = files.iter().find(|f| !f.is_file()) {
            return Err(UNetError::MissingWeights {
                path: absent.display().to_string(),
            });
        }
        return Ok(files);
    }
    let half = path.join("diffusion_pytorch_model.fp16.safetensors");
    if half.is_file() {
        return Ok(vec![half]);
    }
    Err(missing())
}

#[cfg(test)]
mod lora_tests;
#[cfg(test)]
mod tests;
