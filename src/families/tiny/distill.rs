//! The built-in tiny family as a [`DistillFamily`]: pixel-space rectified flow, so x0 is
//! `x_t - t v` and the critic's loss is the flow-matching loss on the student's samples.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

use super::manifest::{flow_schedule, video_flow_schedule, TinySource};
use super::{TextCond, TextEncoder, TinyModel, TinyNet, TinyTokenizer};
use crate::distill::family::{
    check_init, save_student, var_map_from, DistillFamily, GanSupport, Trainable,
};
use crate::distill::{gan, math};
use crate::manifest::Manifest;
use crate::nn::LoraConfig;
use crate::pipeline::NoiseSchedule;
use crate::train::named_vars;

/// The frozen tiny teacher with its full weights (the text encoder a first student ships
/// with), and the text encoder of a served student being continued when it is not the
/// teacher's: a student keeps the encoder it was distilled on, so that a teacher trained on
/// can ship without moving the features the served student reads.
pub struct TinyFamily {
    pub model: TinyModel,
    tensors: HashMap<String, Tensor>,
    student_text: Option<TextEncoder>,
}

/// Prompts and empty negatives, encoded by the teacher, and the prompts as the student's own
/// text encoder reads them (`None`: the student's encoder is the teacher's).
pub struct TinyTexts {
    pub cond: TextCond,
    pub uncond: TextCond,
    pub student: Option<TextCond>,
}

impl TinyFamily {
    /// `tensors` are the weights `model` was built from.
    pub fn new(model: TinyModel, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            model,
            tensors,
            student_text: None,
        }
    }

    /// The frozen teacher a manifest describes. Its file is read once: its tensors build the
    /// teacher, the critic and (for a first distillation) the student.
    pub fn from_manifest(teacher: &Manifest, device: &Device) -> anyhow::Result<Self> {
        let tiny = TinySource::of(teacher, "fewstep distill")?;
        let tensors = load_tensors(&teacher.weights_path(), device)?;
        let model = TinyModel::new(
            VarBuilder::from_tensors(tensors.clone(), DType::F32, device),
            &tiny.architecture,
            TinyTokenizer::from_file(&tiny.tokenizer_path(&teacher.dir))?,
            flow_schedule(&teacher.sampling),
        )?
        .with_video_schedule(video_flow_schedule(&teacher.sampling));
        Ok(Self::new(model, tensors))
    }

    /// The text encoder in a student's `weights`, unless it is the teacher's to the bit.
    fn own_text_encoder(
        &self,
        weights: &HashMap<String, Tensor>,
    ) -> anyhow::Result<Option<TextEncoder>> {
        let is_text = |n: &str| n.starts_with("text.");
        let mut same = true;
        for (name, t) in self.tensors.iter().filter(|(n, _)| is_text(n)) {
            let theirs = weights
                .get(name)
                .with_context(|| format!("the student's weights lack {name}"))?;
            same &= theirs.dims() == t.dims()
                && (theirs - t)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
        }
        if same {
            return Ok(None);
        }
        let text: HashMap<String, Tensor> = weights
            .iter()
            .filter(|(n, _)| is_text(n))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        let vb = VarBuilder::from_tensors(text, DType::F32, self.device());
        Ok(Some(TextEncoder::new(vb.pp("text"), &self.model.cfg)?))
    }

    /// Whether a weight belongs to the denoiser (what distillation trains).
    fn is_denoiser(&self) -> impl Fn(&str) -> bool {
        let prefix = format!("{}.", self.model.cfg.denoiser.prefix());
        move |name: &str| name.starts_with(&prefix)
    }
}

impl DistillFamily for TinyFamily {
    type Net = TinyNet;
    type Cond = TinyTexts;

    fn device(&self) -> &Device {
        self.model.device()
    }

    fn schedule(&self, frames: usize) -> &dyn NoiseSchedule {
        self.model.schedule_for_frames(frames)
    }

    fn makes_video(&self) -> bool {
        true
    }

    fn sample_shape(&self, batch: usize, video: bool) -> Vec<usize> {
        let frames = if video { crate::world::VIDEO_FRAMES } else { 1 };
        let c = &self.model.cfg;
        vec![batch, frames, c.channels, c.image_size, c.image_size]
    }

    fn condition(&self, prompts: &[&str]) -> Result<TinyTexts> {
        // One tokenisation for both encoders: they share the teacher's vocabulary.
        let tokens = self.model.tokens(prompts)?;
        let student = match &self.student_text {
            Some(text) => Some(text.forward(&tokens)?),
            None => None,
        };
        Ok(TinyTexts {
            cond: self.model.text.forward(&tokens)?,
            uncond: self.model.encode(&vec![""; prompts.len()])?,
            student,
        })
    }

    fn teacher_x0(&self, x: &Tensor, t: &[f32], cond: &TinyTexts) -> Result<(Tensor, Tensor)> {
        let b = x.dim(0)?;
        let both = Tensor::cat(&[x, x], 0)?;
        let tt: Vec<f32> = t.iter().chain(t).copied().collect();
        let v = self
            .model
            .velocity(&both, &tt, &cond.cond.cat(&cond.uncond)?)?;
        let x0 = self.model.x0_from_velocity(&both, &tt, &v)?;
        Ok((x0.narrow(0, 0, b)?, x0.narrow(0, b, b)?))
    }

    fn x0(&self, net: &TinyNet, x: &Tensor, t: &[f32], cond: &TinyTexts) -> Result<Tensor> {
        let v = net.forward(x, t, &cond.cond)?;
        self.model.x0_from_velocity(x, t, &v)
    }

    fn student_x0(&self, net: &TinyNet, x: &Tensor, t: &[f32], cond: &TinyTexts) -> Result<Tensor> {
        let v = net.forward(x, t, cond.student.as_ref().unwrap_or(&cond.cond))?;
        self.model.x0_from_velocity(x, t, &v)
    }

    fn denoising_loss(
        &self,
        net: &TinyNet,
        x0: &Tensor,
        noise: &Tensor,
        t: &[f32],
        cond: &TinyTexts,
        features: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let x_t = self.model.schedule.add_noise(x0, noise, t)?;
        let (v, feats) = net.forward_with_features(&x_t, t, &cond.cond, features)?;
        Ok((math::per_sample_mse(&v, &(noise - x0)?)?, feats))
    }

    fn pixels(&self, x0: &Tensor) -> Result<Tensor> {
        Ok(x0.clone())
    }

    fn trainable(
        &self,
        init: &HashMap<String, Tensor>,
        seed: u64,
        lora: Option<&LoraConfig>,
    ) -> anyhow::Result<Trainable<TinyNet>> {
        anyhow::ensure!(
            lora.is_none_or(|l| !l.enabled()),
            "LoRA is for the sd and wan families; the tiny denoiser trains every weight (remove [lora])"
        );
        let dev = self.device();
        let map = var_map_from(init, self.is_denoiser(), dev)?;
        let vb = crate::nn::seeded_var_builder(&map, seed, DType::F32, dev);
        let net = TinyNet::new(vb, &self.model.cfg)?;
        let vars = named_vars(&map);
        check_init(init, &vars, self.is_denoiser())?;
        Ok(Trainable { net, vars })
    }

    fn teacher_weights(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    /// The student's full weights, its text encoder adopted when it is not the teacher's.
    fn student_weights(
        &mut self,
        student: &Manifest,
        teacher: &Manifest,
    ) -> anyhow::Result<HashMap<String, Tensor>> {
        // The student trains as a copy of the teacher's network, on the teacher's vocabulary.
        let own = TinySource::of(student, "fewstep distill")?;
        let theirs = TinySource::of(teacher, "fewstep distill")?;
        let refuse = |what: &str| {
            anyhow::anyhow!(
                "{} has another {what} than its teacher {}; distill a new student from the \
                 teacher instead",
                student.name,
                teacher.name
            )
        };
        if own.architecture != theirs.architecture {
            return Err(refuse("architecture"));
        }
        let vocabulary = TinyTokenizer::from_file(&own.tokenizer_path(&student.dir))?.vocabulary();
        if vocabulary != self.model.tokenizer.vocabulary() {
            return Err(refuse("vocabulary"));
        }
        let weights = load_tensors(&student.weights_path(), self.device())?;
        self.student_text = self.own_text_encoder(&weights)?;
        if self.student_text.is_some() {
            tracing::info!(
                student = %student.name,
                "the student keeps its own text encoder (not its teacher's)"
            );
        }
        Ok(weights)
    }

    /// The full weights file (the teacher's text encoder included) and the teacher's
    /// tokenizer beside the manifest.
    fn write_student(
        &self,
        manifest: Manifest,
        teacher: &Manifest,
        dir: &Path,
        weights: &HashMap<String, Tensor>,
    ) -> anyhow::Result<Manifest> {
        let files = TinySource {
            weights: PathBuf::from("student.safetensors"),
            tokenizer: PathBuf::from("tokenizer.json"),
            ..TinySource::of(&manifest, "fewstep distill")?.clone()
        };
        let manifest = save_student(manifest, files.clone(), dir, &files.weights, weights)?;
        let tokenizer = TinySource::of(teacher, "fewstep distill")?.tokenizer_path(&teacher.dir);
        std::fs::copy(tokenizer, dir.join(&files.tokenizer))?;
        Ok(manifest)
    }

    fn export(
        &self,
        init: &HashMap<String, Tensor>,
        tensors: &HashMap<String, Tensor>,
        _lora: Option<&LoraConfig>,
    ) -> anyhow::Result<HashMap<String, Tensor>> {
        // Only the denoiser trains: the text encoder is the one the student started with (the
        // teacher's for a first student, its own when continued).
        let mut out = init.clone();
        out.extend(tensors.iter().map(|(n, t)| (n.clone(), t.clone())));
        Ok(out)
    }

    fn gan(&self) -> Option<&dyn GanSupport<TinyNet, TinyTexts>> {
        Some(self)
    }
}

impl GanSupport<TinyNet, TinyTexts> for TinyFamily {
    fn feature_dim(&self) -> usize {
        self.model.net.feature_dim()
    }

    fn features(&self, net: &TinyNet, x_t: &Tensor, t: &[f32], cond: &TinyTexts) -> Result<Tensor> {
        let (_, feats) = net.forward_with_features(x_t, t, &cond.cond, true)?;
        feats.ok_or_else(|| candle_core::Error::msg("the denoiser returned no features"))
    }

    fn real_batch(
        &self,
        prompts: &[String],
        frames: usize,
        rng: &mut ChaCha8Rng,
    ) -> anyhow::Result<Tensor> {
        gan::real_batch(prompts, frames, rng, self.device())
    }
}

fn load_tensors(path: &Path, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .with_context(|| format!("loading weights {}", path.display()))
}
