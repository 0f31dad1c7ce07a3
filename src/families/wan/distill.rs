//! Wan as a [`DistillFamily`]: the student and the critic are trainable copies of the
//! teacher's transformer in latent space (whole, or frozen with LoRA adapters on the attention
//! and feed-forward layers, the targets of the video DMD recipes); umT5 and the VAE stay
//! frozen. The critic learns the flow-matching velocity the teacher was trained on.
//!
//! Image iterations train 1-frame clips and video iterations the manifest's longest clip, at
//! its first serving size, as Wan itself was trained on images and videos.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::manifest::WanSource;
use super::scheduler::x0_from_velocity_rows;
use super::{WanCond, WanModel, WanTransformer};
use crate::distill::family::{save_student, trainable_from, DistillFamily, Trainable};
use crate::distill::math;
use crate::families::sd::read_unet_weights;
use crate::manifest::Manifest;
use crate::nn::LoraConfig;
use crate::pipeline::NoiseSchedule;

/// The file name of an exported student's transformer.
pub const STUDENT_TRANSFORMER: &str = "transformer.safetensors";

/// The frozen Wan teacher, its transformer's weights, and the latent shapes of the clips
/// distillation draws.
pub struct WanFamily {
    model: WanModel,
    transformer_weights: HashMap<String, Tensor>,
    /// `[z, latent frames, h, w]` of a 1-frame clip and of the longest served clip.
    image_latent: [usize; 4],
    video_latent: Option<[usize; 4]>,
}

/// A Wan transformer's weights: a diffusers `transformer/` directory (or a whole Wan
/// directory, whose `transformer/` is read) or a single safetensors file, as f32.
fn read_transformer_weights(
    path: &Path,
    device: &Device,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let path = match path.join("transformer") {
        sub if path.is_dir() && sub.is_dir() => sub,
        _ => path.to_path_buf(),
    };
    // The diffusers component lookup (sharded or not) is the one the UNet uses.
    read_unet_weights(&path, device)
}

impl WanFamily {
    /// The frozen teacher a manifest describes, drawing clips at its first serving size.
    pub fn from_manifest(manifest: &Manifest, device: &Device) -> anyhow::Result<Self> {
        let wan = WanSource::of(manifest)
            .ok_or_else(|| anyhow::anyhow!("{} is not a Wan manifest", manifest.name))?;
        let root = wan.model_dir(&manifest.dir);
        let file = wan.transformer_file(&manifest.dir);
        let opts = super::load::options(manifest, wan, device)?;
        let model = WanModel::load(&root, file.as_deref(), &opts, device)
            .with_context(|| format!("loading {}", manifest.name))?;
        let transformer = file.unwrap_or_else(|| root.join("transformer"));
        let weights = read_transformer_weights(&transformer, device)?;
        let &[width, height] = manifest.serving.sizes.first().ok_or_else(|| {
            anyhow::anyhow!("{} lists no serving sizes to distill at", manifest.name)
        })?;
        let longest = manifest.serving.frames.iter().copied().max().unwrap_or(1);
        Self::new(model, weights, width, height, longest)
    }

    /// `transformer_weights` are the teacher transformer's tensors; clips are `width` x
    /// `height`, videos `frames` long (1: images only).
    pub fn new(
        model: WanModel,
        transformer_weights: HashMap<String, Tensor>,
        width: usize,
        height: usize,
        frames: usize,
    ) -> anyhow::Result<Self> {
        let image_latent = model.latent_shape(1, width, height)?;
        let video_latent = (frames > 1)
            .then(|| model.latent_shape(frames, width, height))
            .transpose()?;
        Ok(Self {
            model,
            transformer_weights,
            image_latent,
            video_latent,
        })
    }

    pub fn model(&self) -> &WanModel {
        &self.model
    }

    /// `x - sigma v` of a trainable transformer (f32), conditional on the prompts.
    fn net_x0(&self, net: &WanTransformer, x: &Tensor, t: &[f32], text: &Tensor) -> Result<Tensor> {
        let v = self
            .model
            .denoiser()
            .velocity_with(net, DType::F32, x, t, text)?;
        x0_from_velocity_rows(x, &v, t)
    }
}

impl DistillFamily for WanFamily {
    type Net = WanTransformer;
    type Cond = WanCond;

    fn device(&self) -> &Device {
        crate::pipeline::Generator::device(&self.model)
    }

    fn schedule(&self, _frames: usize) -> &dyn NoiseSchedule {
        crate::pipeline::Generator::schedule(&self.model)
    }

    fn makes_video(&self) -> bool {
        self.video_latent.is_some()
    }

    fn sample_shape(&self, batch: usize, video: bool) -> Vec<usize> {
        let latent = match (video, self.video_latent) {
            (true, Some(v)) => v,
            _ => self.image_latent,
        };
        std::iter::once(batch).chain(latent).collect()
    }

    fn condition(&self, prompts: &[&str]) -> Result<WanCond> {
        let encode = |p: &[&str]| {
            self.model
                .text_encoder()
                .encode(p)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        };
        Ok(WanCond {
            cond: encode(prompts)?,
            uncond: Some(encode(&vec![""; prompts.len()])?),
        })
    }

    fn teacher_x0(&self, x: &Tensor, t: &[f32], cond: &WanCond) -> Result<(Tensor, Tensor)> {
        let uncond = cond
            .uncond
            .as_ref()
            .ok_or_else(|| candle_core::Error::msg("distillation needs the negatives encoded"))?;
        self.model
            .denoiser()
            .x0_cond_uncond(x, t, &cond.cond, uncond)
    }

    fn x0(&self, net: &WanTransformer, x: &Tensor, t: &[f32], cond: &WanCond) -> Result<Tensor> {
        self.net_x0(net, x, t, &cond.cond)
    }

    /// The flow-matching loss Wan was trained with: the velocity `noise - x0` at
    /// `x_t = (1 - t) x0 + t noise`.
    fn denoising_loss(
        &self,
        net: &WanTransformer,
        x0: &Tensor,
        noise: &Tensor,
        t: &[f32],
        cond: &WanCond,
        features: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if features {
            candle_core::bail!("the wan family has no GAN features");
        }
        let x_t = crate::pipeline::Generator::schedule(&self.model).add_noise(x0, noise, t)?;
        let v = self
            .model
            .denoiser()
            .velocity_with(net, DType::F32, &x_t, t, &cond.cond)?;
        Ok((math::per_sample_mse(&v, &(noise - x0)?)?, None))
    }

    /// Decoded clips `[B, F, 3, H, W]`: a video reward (CLIP) scores each frame and averages.
    fn pixels(&self, x0: &Tensor) -> Result<Tensor> {
        self.model
            .decode(x0)?
            .permute((0, 2, 1, 3, 4))?
            .to_dtype(DType::F32)
    }

    fn trainable(
        &self,
        init: &HashMap<String, Tensor>,
        seed: u64,
        lora: Option<&LoraConfig>,
    ) -> anyhow::Result<Trainable<WanTransformer>> {
        let cfg = self.model.transformer().config();
        let build = |vb: VarBuilder| WanTransformer::new(vb, cfg);
        let attach = WanTransformer::attach_lora;
        trainable_from(init, seed, lora, self.device(), build, attach)
    }

    fn teacher_weights(&self) -> &HashMap<String, Tensor> {
        &self.transformer_weights
    }

    fn student_weights(
        &mut self,
        student: &Manifest,
        _teacher: &Manifest,
    ) -> anyhow::Result<HashMap<String, Tensor>> {
        read_transformer_weights(&student.weights_path(), self.device())
    }

    /// The transformer as one safetensors file beside a manifest that points at the teacher's
    /// diffusers directory for everything else.
    fn write_student(
        &self,
        manifest: Manifest,
        teacher: &Manifest,
        dir: &Path,
        weights: &HashMap<String, Tensor>,
    ) -> anyhow::Result<Manifest> {
        let mut wan = WanSource::of(&manifest)
            .ok_or_else(|| anyhow::anyhow!("{} is not a Wan manifest", manifest.name))?
            .clone();
        let teacher_dir = wan.model_dir(&teacher.dir);
        wan.dir = std::fs::canonicalize(&teacher_dir)
            .with_context(|| format!("resolving {}", teacher_dir.display()))?;
        wan.dir_env = None;
        wan.transformer_file = Some(PathBuf::from(STUDENT_TRANSFORMER));
        wan.transformer_file_env = None;
        save_student(manifest, wan, dir, Path::new(STUDENT_TRANSFORMER), weights)
    }
}
