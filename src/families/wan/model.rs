//! A Wan2.1 text-to-video model assembled from a diffusers directory, as the engine runs it:
//! diffusers' `WanPipeline.__call__` in the shared [`Generator`] stages (1. check the size
//! and frame count, 2. encode the prompts, 3. sample latents from each row's noise, 4. decode).

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use image::RgbImage;

use super::scheduler::x0_from_velocity_rows;
use super::{
    FlowMatchSchedule, FlowSchedulerConfig, WanError, WanTextEncoder, WanTransformer,
    WanTransformerConfig, WanVae,
};
use crate::pipeline::{to_frames, BatchSpec, Denoiser, Generator};

/// How to load a Wan directory.
#[derive(Debug, Clone, PartialEq)]
pub struct WanOptions {
    /// Transformer and text encoder.
    pub dtype: DType,
    pub vae_dtype: DType,
    /// The prompt length the transformer sees (Wan's `max_sequence_length`, 512).
    pub text_max_len: usize,
    /// Prompt encodings kept (0: none).
    pub prompt_cache: usize,
    /// A distilled student's timestep list (e.g. `[1000, 750, 500, 250]`).
    pub student_timesteps: Option<Vec<f64>>,
}

/// The text states of a batch, and of its negative prompts when CFG runs.
#[derive(Debug, Clone)]
pub struct WanCond {
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
}

#[derive(Debug)]
pub struct WanModel {
    denoiser: WanDenoiser,
    text: WanTextEncoder,
    vae: WanVae,
}

/// The part of a Wan model the samplers step through: the transformer and the schedule. A
/// [`WanModel`] adds the text encoder and the VAE; `fewstep bench --wan` runs one alone on
/// precomputed text states, so that it needs no umT5-XXL.
#[derive(Debug)]
pub struct WanDenoiser {
    transformer: WanTransformer,
    schedule: FlowMatchSchedule,
    device: Device,
    /// What the transformer computes in.
    dtype: DType,
}

impl WanModel {
    /// Loads a diffusers Wan directory (`transformer/`, `text_encoder/`, `tokenizer/`, `vae/`,
    /// `scheduler/`); `transformer_file` replaces the transformer's weights (a distilled
    /// student) under `transformer/config.json`.
    pub fn load(
        root: &Path,
        transformer_file: Option<&Path>,
        opts: &WanOptions,
        device: &Device,
    ) -> std::result::Result<Self, WanError> {
        let denoiser = WanDenoiser::load(root, transformer_file, opts, device)?;
        let text = WanTextEncoder::load(
            &root.join("tokenizer"),
            &root.join("text_encoder"),
            opts.dtype,
            device,
            opts.text_max_len,
            opts.prompt_cache,
        )?;
        let vae = WanVae::load(&root.join("vae"), opts.vae_dtype, device)?;
        Self::assemble(denoiser, text, vae)
    }

    /// Checks that the parts fit each other.
    pub fn assemble(
        denoiser: WanDenoiser,
        text: WanTextEncoder,
        vae: WanVae,
    ) -> std::result::Result<Self, WanError> {
        denoiser.check_vae(&vae)?;
        let t = denoiser.transformer.config();
        let text_dim = text.encoder().config().d_model;
        if t.text_dim != text_dim {
            return Err(WanError::Unsupported(format!(
                "the transformer's text_dim {} is not the text encoder's d_model {text_dim}",
                t.text_dim
            )));
        }
        Ok(Self {
            denoiser,
            text,
            vae,
        })
    }

    pub fn text_encoder(&self) -> &WanTextEncoder {
        &self.text
    }

    pub fn denoiser(&self) -> &WanDenoiser {
        &self.denoiser
    }

    pub fn vae(&self) -> &WanVae {
        &self.vae
    }

    /// Widths and heights must be multiples of this: the VAE's factor times the patch.
    pub fn size_multiple(&self) -> usize {
        size_multiple(&self.denoiser, &self.vae)
    }

    /// `[z_dim, latent frames, h, w]` for `frames` video frames of `width x height`, or why
    /// that is off the model's grid.
    pub fn latent_shape(&self, frames: usize, width: usize, height: usize) -> Result<[usize; 4]> {
        latent_shape(&self.denoiser, &self.vae, frames, width, height)
    }

    pub fn transformer(&self) -> &WanTransformer {
        &self.denoiser.transformer
    }
}

/// [`WanModel::size_multiple`] of a denoiser and a VAE.
pub fn size_multiple(denoiser: &WanDenoiser, vae: &WanVae) -> usize {
    let p = denoiser.transformer.config().patch();
    vae.config().spatial_factor() * p.1.max(p.2)
}

/// [`WanModel::latent_shape`] of a denoiser and a VAE.
pub fn latent_shape(
    denoiser: &WanDenoiser,
    vae: &WanVae,
    frames: usize,
    width: usize,
    height: usize,
) -> Result<[usize; 4]> {
    let cfg = vae.config();
    let Some(lf) = cfg.latent_frames(frames) else {
        candle_core::bail!("Wan makes 4k+1 frames (1, 5, 9, ..., 81), got {frames}");
    };
    let m = size_multiple(denoiser, vae);
    if width == 0 || height == 0 || !width.is_multiple_of(m) || !height.is_multiple_of(m) {
        candle_core::bail!("Wan sizes are multiples of {m}, got {width}x{height}");
    }
    let f = cfg.spatial_factor();
    Ok([cfg.z_dim, lf, height / f, width / f])
}

impl WanDenoiser {
    /// The transformer (`transformer_file`, else `root/transformer/`) and the schedule
    /// (`root/scheduler/`, with the options' student timesteps) of a diffusers Wan directory.
    pub fn load(
        root: &Path,
        transformer_file: Option<&Path>,
        opts: &WanOptions,
        device: &Device,
    ) -> std::result::Result<Self, WanError> {
        let tdir = root.join("transformer");
        let tcfg = WanTransformerConfig::from_file(&tdir.join("config.json"))?;
        let transformer =
            WanTransformer::load(transformer_file.unwrap_or(&tdir), &tcfg, opts.dtype, device)?;
        let scfg: FlowSchedulerConfig = super::config::read_config(
            &root.join("scheduler").join("scheduler_config.json"),
            |_| Ok(()),
        )?;
        let mut schedule = FlowMatchSchedule::from_config(&scfg)?;
        if let Some(list) = &opts.student_timesteps {
            schedule = schedule.with_student_timesteps(list)?;
        }
        Ok(Self::new(transformer, schedule, opts.dtype, device))
    }

    /// `dtype` is what `transformer` computes in (its weights' precision).
    pub fn new(
        transformer: WanTransformer,
        schedule: FlowMatchSchedule,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            transformer,
            schedule,
            device: device.clone(),
            dtype,
        }
    }

    /// Whether `vae`'s latents are the ones this transformer takes and makes.
    pub fn check_vae(&self, vae: &WanVae) -> std::result::Result<(), WanError> {
        let (t, z) = (self.transformer.config(), vae.config().z_dim);
        if t.in_channels != z || t.out_channels() != z {
            return Err(WanError::Unsupported(format!(
                "the transformer takes {} and makes {} latent channels, the VAE has {z}",
                t.in_channels,
                t.out_channels()
            )));
        }
        Ok(())
    }

    pub fn transformer(&self) -> &WanTransformer {
        &self.transformer
    }

    pub fn schedule(&self) -> &FlowMatchSchedule {
        &self.schedule
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// What the transformer computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The transformer's velocity for latents `x` `[B, z, F, h, w]` at per-row sigmas.
    fn velocity(&self, x: &Tensor, sigmas: &[f32], text: &Tensor) -> Result<Tensor> {
        self.velocity_with(&self.transformer, self.dtype, x, sigmas, text)
    }

    /// [`Self::velocity`] of another transformer of this model's config (a trainable
    /// student or critic) that computes in `dtype`; the result has `x`'s dtype.
    pub fn velocity_with(
        &self,
        net: &WanTransformer,
        dtype: DType,
        x: &Tensor,
        sigmas: &[f32],
        text: &Tensor,
    ) -> Result<Tensor> {
        let t = self.schedule.train_steps() as f32;
        let timesteps: Vec<f32> = sigmas.iter().map(|s| s * t).collect();
        let timesteps = Tensor::new(timesteps, &self.device)?;
        net.forward(&x.to_dtype(dtype)?, &timesteps, &text.to_dtype(dtype)?)?
            .to_dtype(x.dtype())
    }

    /// The frozen transformer's conditional and unconditional x0 of `x` at per-row sigmas,
    /// both branches in one pass (the negatives stand in for the prompts).
    pub fn x0_cond_uncond(
        &self,
        x: &Tensor,
        sigmas: &[f32],
        cond: &Tensor,
        uncond: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let b = x.dim(0)?;
        let xx = Tensor::cat(&[x, x], 0)?;
        let ss = [sigmas, sigmas].concat();
        let v = self.velocity(&xx, &ss, &Tensor::cat(&[cond, uncond], 0)?)?;
        let x0 = x0_from_velocity_rows(&xx, &v, &ss)?;
        Ok((x0.narrow(0, 0, b)?, x0.narrow(0, b, b)?))
    }

    /// The velocity at per-row sigmas `t`, guided by the negatives when `guidance > 1`
    /// (`v_u + g (v_c - v_u)`, both halves in one batch).
    fn guided_velocity(
        &self,
        x: &Tensor,
        t: &[f32],
        cond: &WanCond,
        guidance: f32,
    ) -> Result<Tensor> {
        match (&cond.uncond, guidance > 1.0) {
            (Some(uncond), true) => {
                let b = x.dim(0)?;
                let both = self.velocity(
                    &Tensor::cat(&[x, x], 0)?,
                    &[t, t].concat(),
                    &Tensor::cat(&[uncond, &cond.cond], 0)?,
                )?;
                let (vu, vc) = (both.narrow(0, 0, b)?, both.narrow(0, b, b)?);
                &vu + ((vc - &vu)? * guidance as f64)?
            }
            _ => self.velocity(x, t, &cond.cond),
        }
    }
}

impl Denoiser for WanDenoiser {
    type Cond = WanCond;

    /// `t` are sigmas. With `guidance > 1` the negative prompts' velocity is moved away
    /// from, `v_u + g (v_c - v_u)` as `WanPipeline` does, both halves in one batch.
    fn predict_x0(&self, x: &Tensor, t: &[f32], cond: &WanCond, guidance: f32) -> Result<Tensor> {
        self.predict_x0_at(x, t, t, cond, guidance)
    }

    /// The network sees `net_t` (whole timesteps, as diffusers' UniPC gives them), the x0
    /// is formed at the exact sigmas `t`.
    fn predict_x0_at(
        &self,
        x: &Tensor,
        t: &[f32],
        net_t: &[f32],
        cond: &WanCond,
        guidance: f32,
    ) -> Result<Tensor> {
        let v = self.guided_velocity(x, net_t, cond, guidance)?;
        x0_from_velocity_rows(x, &v, t)
    }

    fn select_rows(&self, cond: &WanCond, idx: &Tensor) -> Result<WanCond> {
        Ok(WanCond {
            cond: cond.cond.index_select(idx, 0)?,
            uncond: cond
                .uncond
                .as_ref()
                .map(|u| u.index_select(idx, 0))
                .transpose()?,
        })
    }
}

impl Denoiser for WanModel {
    type Cond = WanCond;

    fn predict_x0(&self, x: &Tensor, t: &[f32], cond: &WanCond, guidance: f32) -> Result<Tensor> {
        self.denoiser.predict_x0(x, t, cond, guidance)
    }

    fn predict_x0_at(
        &self,
        x: &Tensor,
        t: &[f32],
        net_t: &[f32],
        cond: &WanCond,
        guidance: f32,
    ) -> Result<Tensor> {
        self.denoiser.predict_x0_at(x, t, net_t, cond, guidance)
    }

    fn select_rows(&self, cond: &WanCond, idx: &Tensor) -> Result<WanCond> {
        self.denoiser.select_rows(cond, idx)
    }
}

impl Generator for WanModel {
    type Schedule = FlowMatchSchedule;

    fn schedule(&self) -> &FlowMatchSchedule {
        &self.denoiser.schedule
    }

    fn device(&self) -> &Device {
        &self.denoiser.device
    }

    fn sample_shape(&self, spec: &BatchSpec) -> Result<Vec<usize>> {
        Ok(self
            .latent_shape(spec.frames, spec.width, spec.height)?
            .to_vec())
    }

    fn condition_batch(&self, spec: &BatchSpec, cfg: bool) -> Result<WanCond> {
        let enc = |p: &[String]| -> Result<Tensor> {
            let p: Vec<&str> = p.iter().map(String::as_str).collect();
            self.text
                .encode(&p)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        };
        Ok(WanCond {
            cond: enc(&spec.prompts)?,
            uncond: cfg.then(|| enc(&spec.negative_prompts)).transpose()?,
        })
    }

    /// Normalised latents decoded by the VAE, one frame list per row.
    fn frames(&self, x0: &Tensor) -> Result<Vec<Vec<RgbImage>>> {
        let video = self.decode(x0)?;
        to_frames(&video.permute((0, 2, 1, 3, 4))?.to_dtype(DType::F32)?)
    }
}

impl WanModel {
    /// Normalised latents `[B, z, F, h, w]` -> video `[B, 3, frames, H, W]` in `[-1, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.vae
            .decode(latents)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
