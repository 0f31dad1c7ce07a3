//! A whole Stable Diffusion model (tokenizers, text encoders, UNet, VAE, noise schedule) as
//! one [`Generator`]: prompts -> conditioning -> the family-agnostic samplers of
//! `crate::pipeline` -> VAE decode -> RGB frames.
//!
//! Conditioning per variant, as diffusers' pipelines build it: SD1.x/SD2.x take the text
//! encoder's `last_hidden_state`; SDXL concatenates both encoders' penultimate hidden states
//! on features, passes the second encoder's projected pooled output (`text_embeds`) and
//! `time_ids = [H, W, 0, 0, H, W]` (output size in pixels, no crop).

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::clip::{ClipKind, ClipTextModel};
use super::layout::{read_json, ComponentFiles, LoadError, PredictionType, SdLayout};
use super::schedule::DdpmSchedule;
use super::tokenizer::ClipTokenizer;
use super::unet::{AddedCond, UNet, UNetConfig};
use super::vae::AutoencoderKl;
use crate::pipeline::schedule::row_scale;
use crate::pipeline::{to_frames, BatchSpec, Denoiser, Generator};

/// How to load a model directory.
#[derive(Debug, Clone, PartialEq)]
pub struct SdOptions {
    /// Text encoders and UNet.
    pub dtype: DType,
    /// The VAE (SDXL's VAE overflows in f16; f32 or bf16 are safe).
    pub vae_dtype: DType,
    /// A student's own timestep list (see [`DdpmSchedule`]).
    pub student_timesteps: Option<Vec<usize>>,
}

impl Default for SdOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            vae_dtype: DType::F32,
            student_timesteps: None,
        }
    }
}

/// One tokenizer with its text encoder.
#[derive(Debug, Clone)]
struct TextTower {
    tokenizer: ClipTokenizer,
    encoder: ClipTextModel,
}

impl TextTower {
    fn load(
        tokenizer: &super::layout::TokenizerFiles,
        encoder: &ComponentFiles,
        kind: ClipKind,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        Ok(Self {
            tokenizer: ClipTokenizer::from_files(tokenizer)?,
            encoder: ClipTextModel::from_files(encoder, kind, dtype, device)?,
        })
    }

    fn forward(&self, prompts: &[&str], device: &Device) -> Result<super::clip::ClipOutput> {
        let ids = self
            .tokenizer
            .encode_batch(prompts)
            .map_err(candle_core::Error::wrap)?;
        self.encoder.forward(&ids.tensor(device)?)
    }
}

/// Encoded prompts: `[B, 77, cross_attention_dim]` and, for SDXL, the pooled `[B, P]`.
#[derive(Debug, Clone)]
pub struct SdText {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
}

impl SdText {
    fn cat(&self, other: &SdText) -> Result<SdText> {
        Ok(SdText {
            context: Tensor::cat(&[&self.context, &other.context], 0)?,
            pooled: match (&self.pooled, &other.pooled) {
                (Some(a), Some(b)) => Some(Tensor::cat(&[a, b], 0)?),
                _ => None,
            },
        })
    }
}

/// Everything the UNet is conditioned on for one batch.
#[derive(Debug, Clone)]
pub struct SdCond {
    pub cond: SdText,
    /// The negative prompts' encoding, present when CFG runs.
    pub uncond: Option<SdText>,
    /// SDXL: `[B, 6]` size conditioning.
    pub time_ids: Option<Tensor>,
}

/// A Stable Diffusion model ready to sample.
#[derive(Debug, Clone)]
pub struct SdModel {
    text: TextTower,
    /// SDXL's second encoder (`CLIPTextModelWithProjection`).
    text_2: Option<TextTower>,
    unet: UNet,
    vae: AutoencoderKl,
    schedule: DdpmSchedule,
    prediction: PredictionType,
    /// diffusers' `force_zeros_for_empty_prompt`: an empty negative prompt is all zeros.
    zero_empty_negative: bool,
    /// Image pixels per latent pixel.
    vae_factor: usize,
    /// Latent pixels per side must be a multiple of this (2 per UNet downsampling).
    unet_factor: usize,
    dtype: DType,
    vae_dtype: DType,
    device: Device,
}

impl SdModel {
    /// Opens the diffusers directory `root` (with `unet_file` replacing the UNet's weights)
    /// and loads it.
    pub fn open(
        root: &Path,
        unet_file: Option<&Path>,
        opts: &SdOptions,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        Self::load(&SdLayout::open(root, unet_file)?, opts, device)
    }

    /// Loads every component of `layout` and checks that they fit together.
    pub fn load(
        layout: &SdLayout,
        opts: &SdOptions,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        let kind = |name: &str| {
            layout
                .index
                .component(name)
                .and_then(|c| c.class.as_deref())
                .map_or(ClipKind::TextModel, ClipKind::from_class)
        };
        let text = TextTower::load(
            &layout.tokenizer,
            &layout.text_encoder,
            kind("text_encoder"),
            opts.dtype,
            device,
        )?;
        let text_2 = match (&layout.text_encoder_2, &layout.tokenizer_2) {
            (Some(enc), Some(tok)) => Some(TextTower::load(
                tok,
                enc,
                ClipKind::WithProjection,
                opts.dtype,
                device,
            )?),
            _ => None,
        };
        let unet_cfg = UNetConfig::from_file(&layout.unet.config)?;
        let unet = load_unet(&layout.unet, &unet_cfg, opts.dtype, device)?;
        let vae = AutoencoderKl::from_files(&layout.vae, opts.vae_dtype, device)?;
        let scheduler = &layout.scheduler;
        let schedule =
            DdpmSchedule::new(scheduler.alphas_cumprod(), opts.student_timesteps.clone());
        let unet_factor = 1usize
            << unet_cfg
                .plan()?
                .down
                .iter()
                .filter(|d| d.downsample)
                .count();
        let model = Self {
            zero_empty_negative: zero_empty_negative(layout)?,
            vae_factor: vae.config().downsample_factor(),
            unet_factor,
            text,
            text_2,
            unet,
            vae,
            schedule,
            prediction: scheduler.prediction_type,
            dtype: opts.dtype,
            vae_dtype: opts.vae_dtype,
            device: device.clone(),
        };
        model.check_fit(layout, opts)?;
        Ok(model)
    }

    /// The components' configs must agree (a wrong directory or UNet file shows up here, at
    /// start-up, rather than as a shape error in the first request).
    fn check_fit(&self, layout: &SdLayout, opts: &SdOptions) -> std::result::Result<(), LoadError> {
        let unet_config = &layout.unet.config;
        let cfg = self.unet.config();
        let plan = cfg.plan()?;
        let hidden = self.text.encoder.config().hidden_size;
        let context_dim = match &self.text_2 {
            Some(t2) => hidden + t2.encoder.config().hidden_size,
            None => hidden,
        };
        let cross_dims = plan
            .down
            .iter()
            .filter_map(|d| d.attn.as_ref())
            .chain(plan.mid.as_ref().map(|m| &m.attn))
            .chain(plan.up.iter().filter_map(|u| u.attn.as_ref()))
            .map(|a| a.cross_dim);
        for dim in cross_dims {
            if dim != context_dim {
                return Err(LoadError::invalid(
                    unet_config,
                    format!(
                        "cross_attention_dim {dim} does not match the text conditioning width \
                         {context_dim} (text encoders' hidden sizes)"
                    ),
                ));
            }
        }
        match (&self.text_2, plan.text_time) {
            (None, None) => {}
            (Some(t2), Some((time_dim, in_dim))) => {
                let pooled = t2.encoder.config().projection_dim;
                if pooled + 6 * time_dim != in_dim {
                    return Err(LoadError::invalid(
                        unet_config,
                        format!(
                            "projection_class_embeddings_input_dim {in_dim} != text_encoder_2 \
                             projection_dim {pooled} + 6 x addition_time_embed_dim {time_dim}"
                        ),
                    ));
                }
            }
            (Some(_), None) => {
                return Err(LoadError::unsupported(
                    unet_config,
                    "a pipeline with text_encoder_2 needs an SDXL UNet \
                     (addition_embed_type \"text_time\")",
                ))
            }
            (None, Some(_)) => {
                return Err(LoadError::invalid(
                    unet_config,
                    "an SDXL UNet (addition_embed_type \"text_time\") needs text_encoder_2",
                ))
            }
        }
        let latent = self.vae.config().latent_channels;
        if cfg.in_channels != latent || cfg.out_channels != latent {
            return Err(LoadError::invalid(
                unet_config,
                format!(
                    "in/out_channels {}/{} do not match the VAE's latent_channels {latent}",
                    cfg.in_channels, cfg.out_channels
                ),
            ));
        }
        if let Some(list) = &opts.student_timesteps {
            let t = self.schedule.train_steps();
            let descending = list.windows(2).all(|w| w[0] > w[1]);
            if list.is_empty() || !descending || list[0] >= t {
                return Err(LoadError::invalid(
                    &layout.root.join("scheduler/scheduler_config.json"),
                    format!(
                        "the student timesteps {list:?} must be strictly descending and below \
                         num_train_timesteps {t}"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn schedule(&self) -> &DdpmSchedule {
        &self.schedule
    }

    pub fn prediction(&self) -> PredictionType {
        self.prediction
    }

    pub fn unet(&self) -> &UNet {
        &self.unet
    }

    pub fn vae(&self) -> &AutoencoderKl {
        &self.vae
    }

    pub fn is_xl(&self) -> bool {
        self.text_2.is_some()
    }

    /// Output width and height must be multiples of this: the VAE's factor times the UNet's
    /// total downsampling (64 for SD1.5, SD2 and SDXL).
    pub fn size_multiple(&self) -> usize {
        self.vae_factor * self.unet_factor
    }

    /// `[C, H / f, W / f]`, the latent of a `width` x `height` image.
    pub fn latent_shape(&self, width: usize, height: usize) -> Result<[usize; 3]> {
        let m = self.size_multiple();
        if width == 0 || height == 0 || !width.is_multiple_of(m) || !height.is_multiple_of(m) {
            candle_core::bail!("size {width}x{height} is not a multiple of {m} for this model");
        }
        let c = self.vae.config().latent_channels;
        Ok([c, height / self.vae_factor, width / self.vae_factor])
    }

    /// Encodes prompts (each padded to the tokenizer's full length, so a row's encoding does
    /// not depend on the other prompts of its batch).
    pub fn encode(&self, prompts: &[&str]) -> Result<SdText> {
        let out = self.text.forward(prompts, &self.device)?;
        match &self.text_2 {
            None => Ok(SdText {
                context: out.last_hidden_state,
                pooled: None,
            }),
            Some(t2) => {
                let out2 = t2.forward(prompts, &self.device)?;
                let context = Tensor::cat(&[out.penultimate(), out2.penultimate()], 2)?;
                let pooled = out2.text_embeds.ok_or_else(|| {
                    candle_core::Error::msg("text_encoder_2 has no text_projection")
                })?;
                Ok(SdText {
                    context,
                    pooled: Some(pooled),
                })
            }
        }
    }

    /// The conditioning of a batch: the prompts, the negative prompts when `negatives` is
    /// given (CFG), and SDXL's size conditioning for a `width` x `height` output.
    pub fn condition(
        &self,
        prompts: &[&str],
        negatives: Option<&[&str]>,
        width: usize,
        height: usize,
    ) -> Result<SdCond> {
        let cond = self.encode(prompts)?;
        let uncond = match negatives {
            None => None,
            Some(neg) => Some(self.encode_negatives(neg)?),
        };
        let time_ids = if self.is_xl() {
            let (h, w) = (height as f32, width as f32);
            let row = [h, w, 0.0, 0.0, h, w];
            let data: Vec<f32> = prompts.iter().flat_map(|_| row).collect();
            Some(Tensor::from_vec(data, (prompts.len(), 6), &self.device)?)
        } else {
            None
        };
        Ok(SdCond {
            cond,
            uncond,
            time_ids,
        })
    }

    /// Negative prompts; with `force_zeros_for_empty_prompt` an empty one is all zeros (row
    /// by row, so a row does not depend on its neighbours' negatives).
    fn encode_negatives(&self, negatives: &[&str]) -> Result<SdText> {
        let enc = self.encode(negatives)?;
        if !self.zero_empty_negative || negatives.iter().all(|n| !n.trim().is_empty()) {
            return Ok(enc);
        }
        let keep: Vec<f32> = negatives
            .iter()
            .map(|n| if n.trim().is_empty() { 0.0 } else { 1.0 })
            .collect();
        let masked = |t: &Tensor| -> Result<Tensor> { t.broadcast_mul(&row_scale(&keep, t)?) };
        Ok(SdText {
            context: masked(&enc.context)?,
            pooled: enc.pooled.as_ref().map(masked).transpose()?,
        })
    }

    /// The UNet's raw output (epsilon, v or sample, per the scheduler config) in f32, at one
    /// training timestep per row.
    pub fn unet_output(
        &self,
        x: &Tensor,
        timesteps: &[usize],
        text: &SdText,
        time_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.unet_output_with(&self.unet, self.dtype, x, timesteps, text, time_ids)
    }

    /// [`Self::unet_output`] through another UNet of this architecture computing in `dtype`
    /// (a student or critic being distilled from this model).
    pub fn unet_output_with(
        &self,
        unet: &UNet,
        dtype: DType,
        x: &Tensor,
        timesteps: &[usize],
        text: &SdText,
        time_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let t: Vec<f32> = timesteps.iter().map(|&k| k as f32).collect();
        let t = Tensor::from_vec(t, timesteps.len(), &self.device)?;
        let added = match (&text.pooled, time_ids) {
            (Some(pooled), Some(ids)) => Some(AddedCond {
                text_embeds: pooled.to_dtype(dtype)?,
                time_ids: ids.to_dtype(dtype)?,
            }),
            _ => None,
        };
        let context = text.context.to_dtype(dtype)?;
        unet.forward(&x.to_dtype(dtype)?, &t, &context, added.as_ref())?
            .to_dtype(DType::F32)
    }

    /// The training timestep of each row's schedule time (the clean end is timestep 0).
    pub fn timesteps(&self, t: &[f32]) -> Vec<usize> {
        t.iter()
            .map(|&t| self.schedule.timestep(t).unwrap_or(0))
            .collect()
    }

    /// x0 from the UNet's output `out` at `x` (f32), one timestep per row.
    pub fn x0_from_output(&self, x: &Tensor, out: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (a, s): (Vec<f32>, Vec<f32>) = timesteps
            .iter()
            .map(|&k| {
                let ab = self.schedule.alpha_bar(k);
                (ab.sqrt() as f32, (1.0 - ab).sqrt() as f32)
            })
            .unzip();
        let a = row_scale(&a, x)?;
        let s = row_scale(&s, x)?;
        match self.prediction {
            PredictionType::Epsilon => (x - out.broadcast_mul(&s)?)?.broadcast_div(&a),
            PredictionType::VPrediction => x.broadcast_mul(&a)? - out.broadcast_mul(&s)?,
            PredictionType::Sample => Ok(out.clone()),
        }
    }

    /// x0 at training timesteps (one per row), with CFG when `guidance > 1` and the
    /// conditioning has negatives: `x0_u + w (x0_c - x0_u)`, which equals guiding the raw
    /// output since x0 is affine in it.
    pub fn predict_x0_at(
        &self,
        x: &Tensor,
        timesteps: &[usize],
        cond: &SdCond,
        guidance: f32,
    ) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        match (&cond.uncond, guidance > 1.0) {
            (Some(uncond), true) => {
                let (x0c, x0u) = self.x0_cond_uncond(&x, timesteps, cond, uncond)?;
                &x0u + ((x0c - &x0u)? * guidance as f64)?
            }
            _ => {
                let out = self.unet_output(&x, timesteps, &cond.cond, cond.time_ids.as_ref())?;
                self.x0_from_output(&x, &out, timesteps)
            }
        }
    }

    /// The conditional and unconditional x0 of `x` (f32) in one UNet pass over both
    /// branches (the negatives `uncond` stand in for the prompts).
    pub fn x0_cond_uncond(
        &self,
        x: &Tensor,
        timesteps: &[usize],
        cond: &SdCond,
        uncond: &SdText,
    ) -> Result<(Tensor, Tensor)> {
        let b = x.dim(0)?;
        let xx = Tensor::cat(&[x, x], 0)?;
        let tt: Vec<usize> = timesteps.iter().chain(timesteps).copied().collect();
        let ids = match &cond.time_ids {
            Some(ids) => Some(Tensor::cat(&[ids, ids], 0)?),
            None => None,
        };
        let text = cond.cond.cat(uncond)?;
        let out = self.unet_output(&xx, &tt, &text, ids.as_ref())?;
        let x0 = self.x0_from_output(&xx, &out, &tt)?;
        Ok((x0.narrow(0, 0, b)?, x0.narrow(0, b, b)?))
    }

    /// Images `[B, 3, H, W]` (nominally [-1, 1], f32, not clamped) of latents in the UNet's
    /// space, decoded in chunks of about one megapixel to bound the VAE's memory.
    pub fn decode(&self, x0: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x0.dims4()?;
        let pixels = h * w * self.vae_factor * self.vae_factor;
        let chunk = (1 << 20) / pixels.max(1);
        let chunk = chunk.clamp(1, b.max(1));
        let mut parts = Vec::with_capacity(b.div_ceil(chunk));
        for start in (0..b).step_by(chunk) {
            let z = x0.narrow(0, start, chunk.min(b - start))?;
            let z = self.vae.unscale_latents(&z)?.to_dtype(self.vae_dtype)?;
            parts.push(self.vae.decode(&z)?.to_dtype(DType::F32)?);
        }
        Tensor::cat(&parts, 0)
    }
}

impl Generator for SdModel {
    type Schedule = DdpmSchedule;

    fn schedule(&self) -> &DdpmSchedule {
        &self.schedule
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn sample_shape(&self, spec: &BatchSpec) -> Result<Vec<usize>> {
        if spec.frames != 1 {
            candle_core::bail!("Stable Diffusion models make images: frames must be 1");
        }
        Ok(self.latent_shape(spec.width, spec.height)?.to_vec())
    }

    fn condition_batch(&self, spec: &BatchSpec, cfg: bool) -> Result<SdCond> {
        let prompts: Vec<&str> = spec.prompts.iter().map(String::as_str).collect();
        let negatives: Vec<&str> = spec.negative_prompts.iter().map(String::as_str).collect();
        self.condition(
            &prompts,
            cfg.then_some(negatives.as_slice()),
            spec.width,
            spec.height,
        )
    }

    /// Latents `[B, C, h, w]` decoded to one RGB frame per row.
    fn frames(&self, x0: &Tensor) -> Result<Vec<Vec<image::RgbImage>>> {
        let images = self.decode(x0)?;
        to_frames(&images.unsqueeze(1)?)
    }
}

impl Denoiser for SdModel {
    type Cond = SdCond;

    fn select_rows(&self, cond: &SdCond, idx: &Tensor) -> Result<SdCond> {
        let rows = |t: &SdText| -> Result<SdText> {
            Ok(SdText {
                context: t.context.index_select(idx, 0)?,
                pooled: t
                    .pooled
                    .as_ref()
                    .map(|p| p.index_select(idx, 0))
                    .transpose()?,
            })
        };
        Ok(SdCond {
            cond: rows(&cond.cond)?,
            uncond: cond.uncond.as_ref().map(rows).transpose()?,
            time_ids: cond
                .time_ids
                .as_ref()
                .map(|t| t.index_select(idx, 0))
                .transpose()?,
        })
    }

    /// `t` are schedule times (see [`DdpmSchedule`]); the clean end maps to timestep 0.
    fn predict_x0(&self, x: &Tensor, t: &[f32], cond: &SdCond, guidance: f32) -> Result<Tensor> {
        self.predict_x0_at(x, &self.timesteps(t), cond, guidance)
    }
}

/// The UNet over memory-mapped weights (a multi-GB UNet is not copied into memory first).
fn load_unet(
    files: &ComponentFiles,
    cfg: &UNetConfig,
    dtype: DType,
    device: &Device,
) -> std::result::Result<UNet, LoadError> {
    // SAFETY: the files are mapped read-only and the tensors are copied out of the mapping
    // while the model is built; like every mmap-based loader this relies on nobody truncating
    // or rewriting them meanwhile.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, dtype, device) }
        .map_err(|e| files.weights_error(e))?;
    UNet::new(vb, cfg).map_err(|e| files.weights_error(e))
}

/// `force_zeros_for_empty_prompt` of `model_index.json` (diffusers' SDXL pipelines default
/// it to true; SD1.x/SD2.x pipelines have no such option).
fn zero_empty_negative(layout: &SdLayout) -> std::result::Result<bool, LoadError> {
    if !layout.is_xl() {
        return Ok(false);
    }
    let raw: serde_json::Value = read_json(&layout.root.join("model_index.json"))?;
    Ok(raw
        .get("force_zeros_for_empty_prompt")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(true))
}

#[cfg(test)]
mod tests;
