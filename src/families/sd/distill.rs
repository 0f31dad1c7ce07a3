//! Stable Diffusion as a [`DistillFamily`]: the student and the critic are trainable copies of
//! the teacher's UNet in latent space, the teacher's text encoders and VAE stay frozen, and
//! the critic learns with the scheduler's own parametrisation (epsilon, v or sample).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::layout::PredictionType;
use super::manifest::SdSource;
use super::{SdCond, SdModel, UNet};
use crate::distill::family::{save_student, trainable_from, DistillFamily, Trainable};
use crate::distill::math;
use crate::manifest::{LoadedModel, Manifest};
use crate::nn::LoraConfig;
use crate::pipeline::NoiseSchedule;

/// The file name of an exported student's UNet.
pub const STUDENT_UNET: &str = "unet.safetensors";

/// The frozen SD teacher, its UNet's weights, and the resolution samples are drawn at.
pub struct SdFamily {
    pub model: SdModel,
    unet_weights: HashMap<String, Tensor>,
    width: usize,
    height: usize,
    latent: [usize; 3],
}

/// The weights of a UNet: a diffusers `unet/` directory (sharded or not) or a single
/// safetensors file, as f32 on `device`.
pub fn read_unet_weights(path: &Path, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    let files = if path.is_dir() {
        let layout = crate::families::sd::layout::ComponentFiles::locate(
            path,
            crate::families::sd::layout::DIFFUSERS_WEIGHTS,
        )?;
        layout.weights
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = HashMap::new();
    for f in &files {
        let part = candle_core::safetensors::load(f, device)
            .with_context(|| format!("loading UNet weights {}", f.display()))?;
        for (name, t) in part {
            out.insert(name, t.to_dtype(DType::F32)?);
        }
    }
    Ok(out)
}

impl SdFamily {
    /// `unet_weights` are the teacher UNet's tensors; samples are `width` x `height` images.
    pub fn new(
        model: SdModel,
        unet_weights: HashMap<String, Tensor>,
        width: usize,
        height: usize,
    ) -> anyhow::Result<Self> {
        let latent = model.latent_shape(width, height)?;
        Ok(Self {
            model,
            unet_weights,
            width,
            height,
            latent,
        })
    }

    /// The frozen teacher a manifest describes, sampling at its first serving size.
    pub fn from_manifest(manifest: &Manifest, device: &Device) -> anyhow::Result<Self> {
        let sd = SdSource::of(manifest)?;
        let loaded = LoadedModel::load(manifest, device)?;
        let Some(model) = loaded.family_model::<SdModel>() else {
            anyhow::bail!("{} did not load as a Stable Diffusion model", manifest.name);
        };
        let unet = sd
            .unet_file(&manifest.dir)
            .unwrap_or_else(|| sd.model_dir(&manifest.dir).join("unet"));
        let weights = read_unet_weights(&unet, device)?;
        let &[width, height] = manifest.serving.sizes.first().ok_or_else(|| {
            anyhow::anyhow!("{} lists no serving sizes to distill at", manifest.name)
        })?;
        Self::new(model.clone(), weights, width, height)
    }

    fn output(&self, net: &UNet, x: &Tensor, t: &[f32], cond: &SdCond) -> Result<Tensor> {
        let timesteps = self.model.timesteps(t);
        self.model.unet_output_with(
            net,
            DType::F32,
            x,
            &timesteps,
            &cond.cond,
            cond.time_ids.as_ref(),
        )
    }
}

impl DistillFamily for SdFamily {
    type Net = UNet;
    type Cond = SdCond;

    fn device(&self) -> &Device {
        self.model.device()
    }

    fn schedule(&self, _frames: usize) -> &dyn NoiseSchedule {
        self.model.schedule()
    }

    fn makes_video(&self) -> bool {
        false
    }

    fn sample_shape(&self, batch: usize, _video: bool) -> Vec<usize> {
        let [c, h, w] = self.latent;
        vec![batch, c, h, w]
    }

    fn condition(&self, prompts: &[&str]) -> Result<SdCond> {
        let negatives = vec![""; prompts.len()];
        self.model
            .condition(prompts, Some(&negatives), self.width, self.height)
    }

    fn teacher_x0(&self, x: &Tensor, t: &[f32], cond: &SdCond) -> Result<(Tensor, Tensor)> {
        let uncond = cond
            .uncond
            .as_ref()
            .ok_or_else(|| candle_core::Error::msg("distillation needs the negatives encoded"))?;
        self.model
            .x0_cond_uncond(x, &self.model.timesteps(t), cond, uncond)
    }

    fn x0(&self, net: &UNet, x: &Tensor, t: &[f32], cond: &SdCond) -> Result<Tensor> {
        let out = self.output(net, x, t, cond)?;
        self.model.x0_from_output(x, &out, &self.model.timesteps(t))
    }

    fn denoising_loss(
        &self,
        net: &UNet,
        x0: &Tensor,
        noise: &Tensor,
        t: &[f32],
        cond: &SdCond,
        features: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if features {
            candle_core::bail!("the sd family has no GAN features");
        }
        let schedule = self.model.schedule();
        let x_t = schedule.add_noise(x0, noise, t)?;
        let out = self.output(net, &x_t, t, cond)?;
        // The target the UNet was trained on: x_t = a x0 + s noise, v = a noise - s x0.
        let target = match self.model.prediction() {
            PredictionType::Epsilon => noise.clone(),
            PredictionType::Sample => x0.clone(),
            PredictionType::VPrediction => {
                let (a, s): (Vec<f32>, Vec<f32>) =
                    t.iter().map(|&t| schedule.alpha_sigma(t)).unzip();
                let a = crate::pipeline::schedule::row_scale(&a, x0)?;
                let s = crate::pipeline::schedule::row_scale(&s, x0)?;
                (noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?
            }
        };
        Ok((math::per_sample_mse(&out, &target)?, None))
    }

    fn pixels(&self, x0: &Tensor) -> Result<Tensor> {
        self.model.decode(x0)?.unsqueeze(1)
    }

    fn trainable(
        &self,
        init: &HashMap<String, Tensor>,
        seed: u64,
        lora: Option<&LoraConfig>,
    ) -> anyhow::Result<Trainable<UNet>> {
        let cfg = self.model.unet().config();
        let build = |vb: VarBuilder| UNet::new(vb, cfg);
        trainable_from(init, seed, lora, self.device(), build, UNet::attach_lora)
    }

    fn teacher_weights(&self) -> &HashMap<String, Tensor> {
        &self.unet_weights
    }

    fn student_weights(
        &mut self,
        student: &Manifest,
        _teacher: &Manifest,
    ) -> anyhow::Result<HashMap<String, Tensor>> {
        read_unet_weights(&student.weights_path(), self.device())
    }

    /// The UNet as one safetensors file beside a manifest that points at the teacher's
    /// diffusers directory for everything else.
    fn write_student(
        &self,
        manifest: Manifest,
        teacher: &Manifest,
        dir: &Path,
        weights: &HashMap<String, Tensor>,
    ) -> anyhow::Result<Manifest> {
        let mut sd = SdSource::of(&manifest)?.clone();
        let teacher_dir = sd.model_dir(&teacher.dir);
        sd.dir = std::fs::canonicalize(&teacher_dir)
            .with_context(|| format!("resolving {}", teacher_dir.display()))?;
        sd.dir_env = None;
        sd.unet_file = Some(PathBuf::from(STUDENT_UNET));
        sd.unet_file_env = None;
        save_student(manifest, sd, dir, Path::new(STUDENT_UNET), weights)
    }
}
