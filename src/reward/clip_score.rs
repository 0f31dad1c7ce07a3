//! The `clip` reward: a CLIP score from a model directory in either of two forms, told apart by
//! their file names:
//! - a transformers `CLIPModel` directory (`config.json`), the form in which PickScore
//!   (`yuvalkirstain/PickScore_v1`) is published: `config.json`, `model.safetensors` (or
//!   shards), the tokenizer (`tokenizer.json` with its configs) and `preprocessor_config.json`.
//!   PickScore's model repository has no processor files: put those of the laion
//!   CLIP-ViT-H-14 repository (which PickScore is loaded with) beside its weights.
//! - an OpenCLIP directory (`open_clip_config.json`), loaded by [`super::open_clip`]: the
//!   laion hub repositories as published, and HPSv2's `.pt` checkpoint with a model config
//!   and the tokenizer files beside it. A directory with both configs (the laion repositories
//!   ship both) loads as OpenCLIP.
//!
//! Score of an image `I` and a prompt `P`, as PickScore computes it (and transformers'
//! `CLIPModel.logits_per_image`):
//!
//! `score = exp(logit_scale) * <u, v>`, `u = f_I / |f_I|`, `v = f_T / |f_T|`,
//!
//! with `f_I = visual_projection(post_layernorm(class token))` and `f_T =
//! text_projection(final_layer_norm(text)[eos])`. HPSv2 reports `<u, v>` alone, i.e. this score
//! divided by `exp(logit_scale)` (100 for these models); distillation uses group-normalized
//! advantages, so the constant factor does not change training.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::{open_clip, Reward, RewardError};
use crate::families::sd::clip::{tower_config, ClipKind, ClipTextConfig, ClipTextModel};
use crate::families::sd::clip_image::ClipImageProcessor;
use crate::families::sd::clip_vision::{ClipVisionConfig, ClipVisionModel};
use crate::families::sd::layout::{read_json, ComponentFiles, LoadError, TRANSFORMERS_WEIGHTS};
use crate::families::sd::tokenizer::{ClipTokenizer, TokenizeError};
use crate::pipeline::to_frames;

const NAME: &str = "clip";
/// transformers' `CLIPConfig` default `projection_dim`.
const DEFAULT_PROJECTION: usize = 512;
/// Images per vision-tower call (bounds activation memory for ViT-H on large batches).
const IMAGE_CHUNK: usize = 32;

/// A `CLIPModel` config: both towers and the shared projection width.
#[derive(Debug, Clone)]
pub struct ClipModelConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: usize,
}

impl ClipModelConfig {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let raw: serde_json::Value = read_json(path)?;
        let (Some(text), Some(vision)) = (tower_config(&raw, "text"), tower_config(&raw, "vision"))
        else {
            return Err(LoadError::invalid(
                path,
                "not a CLIPModel config (it needs text_config and vision_config; a text encoder \
                 alone cannot score images)",
            ));
        };
        let projection_dim = match raw.get("projection_dim") {
            None => DEFAULT_PROJECTION,
            Some(v) => v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                LoadError::invalid(path, format!("projection_dim {v} is not a size"))
            })? as usize,
        };
        let mut text = ClipTextConfig::from_json(path, text)?;
        // CLIPModel projects both towers to the top-level width, whatever text_config says.
        text.projection_dim = projection_dim;
        Ok(Self {
            text,
            vision: ClipVisionConfig::from_json(path, vision)?,
            projection_dim,
        })
    }
}

pub struct ClipScoreReward {
    text: ClipTextModel,
    vision: ClipVisionModel,
    /// The learned temperature, before `exp` (shape `[]`).
    logit_scale: Tensor,
    tokenizer: ClipTokenizer,
    processor: ClipImageProcessor,
    device: Device,
    dir: PathBuf,
}

impl ClipScoreReward {
    /// Loads a `CLIPModel` or an OpenCLIP directory (see the module docs); every error names
    /// the file (and the tensor).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self, LoadError> {
        if open_clip::is_open_clip_dir(dir) {
            return open_clip::load(dir, dtype, device);
        }
        if dir.is_dir() && !dir.join("config.json").is_file() {
            return Err(LoadError::Missing {
                path: dir.join("config.json"),
                what: format!(
                    "model config: config.json (a transformers CLIPModel) or {} (OpenCLIP; \
                     for HPSv2, a copy of open_clip's model_configs/ViT-H-14.json)",
                    open_clip::CONFIG
                ),
            });
        }
        let files = ComponentFiles::locate(dir, TRANSFORMERS_WEIGHTS)?;
        let cfg = ClipModelConfig::load(&files.config)?;
        let tokenizer = ClipTokenizer::load(dir)?;
        let processor = ClipImageProcessor::load(&dir.join("preprocessor_config.json"))?;
        let vb = files.var_builder(dtype, device)?;
        Self::new(vb, &cfg, tokenizer, processor, dir).map_err(|e| files.weights_error(e))
    }

    /// Builds the model from `vb` rooted at the `CLIPModel` state dict.
    pub fn new(
        vb: VarBuilder,
        cfg: &ClipModelConfig,
        tokenizer: ClipTokenizer,
        processor: ClipImageProcessor,
        dir: &Path,
    ) -> candle_core::Result<Self> {
        let text = ClipTextModel::new(vb.clone(), &cfg.text, ClipKind::WithProjection)?;
        let vision = ClipVisionModel::new(vb.clone(), &cfg.vision, Some(cfg.projection_dim))?;
        // CLIP's initial temperature, ln(1 / 0.07).
        let logit_scale = vb.get_with_hints((), "logit_scale", Init::Const(2.6592))?;
        Ok(Self {
            text,
            vision,
            logit_scale,
            tokenizer,
            processor,
            device: vb.device().clone(),
            dir: dir.to_path_buf(),
        })
    }

    pub fn processor(&self) -> &ClipImageProcessor {
        &self.processor
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// `[N, projection_dim]` text features of `prompts`, not normalized (transformers'
    /// `get_text_features`, OpenCLIP's `encode_text`). Each distinct prompt is encoded once:
    /// a distillation batch repeats each prompt `K` times.
    pub fn text_features(&self, prompts: &[&str]) -> Result<Tensor, RewardError> {
        let mut unique: Vec<&str> = Vec::new();
        let mut index: HashMap<&str, u32> = HashMap::new();
        let rows: Vec<u32> = prompts
            .iter()
            .map(|&p| {
                *index.entry(p).or_insert_with(|| {
                    unique.push(p);
                    unique.len() as u32 - 1
                })
            })
            .collect();
        let ids = self
            .tokenizer
            .encode_batch(&unique)
            .map_err(prompt_error)?
            .tensor(&self.device)?;
        let embeds = self
            .text
            .forward(&ids)?
            .text_embeds
            .expect("built with its projection");
        let rows = Tensor::new(rows.as_slice(), &self.device)?;
        Ok(embeds.index_select(&rows, 0)?)
    }

    /// `[N, projection_dim]` image features of preprocessed pixel values, not normalized
    /// (`get_image_features`, OpenCLIP's `encode_image`).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor, RewardError> {
        let n = pixel_values.dim(0)?;
        let mut parts = Vec::new();
        for start in (0..n).step_by(IMAGE_CHUNK) {
            let chunk = pixel_values.narrow(0, start, IMAGE_CHUNK.min(n - start))?;
            let out = self.vision.forward(&chunk)?;
            parts.push(out.image_embeds.expect("built with its projection"));
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    fn scale(&self) -> candle_core::Result<Tensor> {
        self.logit_scale.to_dtype(DType::F32)?.exp()
    }

    /// `[N, M]`: the score of every image (`[N, 3, S, S]` pixel values) with every prompt,
    /// transformers' `logits_per_image`.
    pub fn logits(&self, pixel_values: &Tensor, prompts: &[&str]) -> Result<Tensor, RewardError> {
        let u = unit(&self.image_features(pixel_values)?)?;
        let v = unit(&self.text_features(prompts)?)?;
        Ok(u.matmul(&v.t()?)?.broadcast_mul(&self.scale()?)?)
    }

    /// `[N]`: the score of image `i` with prompt `i`.
    pub fn pair_scores(
        &self,
        pixel_values: &Tensor,
        prompts: &[&str],
    ) -> Result<Tensor, RewardError> {
        let n = pixel_values.dim(0)?;
        if prompts.len() != n {
            return Err(self.bad_samples(format!("{n} images for {} prompts", prompts.len())));
        }
        let u = unit(&self.image_features(pixel_values)?)?;
        let v = unit(&self.text_features(prompts)?)?;
        Ok((u * v)?.sum(1)?.broadcast_mul(&self.scale()?)?)
    }

    /// `[B]` scores of float images (`[B, 3, H, W]` in `[-1, 1]`) with a gradient w.r.t. the
    /// images and the model: the float preprocessing path (no 8-bit rounding; see
    /// `clip_image`), for reward-gradient methods. [`Reward::score`] uses the exact path.
    pub fn differentiable_scores(
        &self,
        prompts: &[&str],
        images: &Tensor,
    ) -> Result<Tensor, RewardError> {
        let pixels = self
            .processor
            .preprocess_tensor(&images.to_device(&self.device)?)?;
        self.pair_scores(&pixels, prompts)
    }

    fn bad_samples(&self, reason: String) -> RewardError {
        RewardError::Samples {
            reward: NAME,
            reason: format!("{reason} (model {})", self.dir.display()),
        }
    }
}

fn prompt_error(e: TokenizeError) -> RewardError {
    let TokenizeError::Encode { prompt, message } = e;
    RewardError::Prompt {
        reward: NAME,
        prompt,
        reason: message,
    }
}

/// Rows scaled to unit L2 norm, as transformers does (no epsilon), in f32.
fn unit(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

impl Reward for ClipScoreReward {
    fn name(&self) -> &'static str {
        NAME
    }

    fn check_prompt(&self, prompt: &str) -> Result<(), RewardError> {
        self.tokenizer
            .encode(prompt)
            .map(|_| ())
            .map_err(prompt_error)
    }

    /// Each frame is quantized to 8 bits (as a saved PNG would be), preprocessed exactly as
    /// `CLIPImageProcessor` does and scored against its sample's prompt; a video's score is the
    /// mean over its frames.
    fn score(&self, prompts: &[String], samples: &Tensor) -> Result<Vec<f32>, RewardError> {
        let (b, f, c, _, _) = samples.dims5()?;
        if b == 0 {
            return Ok(Vec::new());
        }
        if c != 3 {
            return Err(self.bad_samples(format!("CLIP scores RGB images, got {c} channels")));
        }
        if prompts.len() != b {
            return Err(self.bad_samples(format!("{b} samples for {} prompts", prompts.len())));
        }
        let frames: Vec<image::RgbImage> = to_frames(samples)?.into_iter().flatten().collect();
        let pixels = self.processor.preprocess_batch(&frames, &self.device)?;
        let per_frame: Vec<&str> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.as_str(), f))
            .collect();
        let scores = self.pair_scores(&pixels, &per_frame)?.reshape((b, f))?;
        Ok(scores.mean(1)?.to_vec1::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::sd::testing::{
        assert_close, assert_every_var_has_gradient, assert_has_gradient, fixture, Fixture,
    };
    use crate::nn::random_var_builder;
    use candle_core::{IndexOp, Var};
    use candle_nn::VarMap;

    fn load(fx: &Fixture) -> ClipScoreReward {
        ClipScoreReward::load(&fx.dir, DType::F32, &Device::Cpu).unwrap()
    }

    /// Raw fixture image `i` as a `[1, 3, H, W]` tensor in `[-1, 1]` (exact: `to_frames`
    /// rounds it back to the same bytes).
    fn raw_sample(fx: &Fixture, i: usize) -> Tensor {
        let t = fx
            .tensor(&format!("images.raw.{i}"))
            .to_dtype(DType::F32)
            .unwrap();
        ((t.permute((2, 0, 1)).unwrap() / 127.5).unwrap() - 1.0)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    }

    #[test]
    fn logits_match_transformers() {
        let fx = fixture("clip-tiny");
        let r = load(&fx);
        let prompts = fx.prompts();
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let want = fx.tensor("clip.logits_per_image");
        let got = r.logits(&fx.tensor("pixel_values"), &refs).unwrap();
        assert_close("clip-tiny clip.logits_per_image", &got, &want);
        let ids = r
            .tokenizer
            .encode_batch(&refs)
            .unwrap()
            .tensor(&Device::Cpu)
            .unwrap();
        let text = r.text.forward(&ids).unwrap().text_embeds.unwrap();
        assert_close(
            "clip-tiny clip.text_embeds",
            &text,
            &fx.tensor("clip.text_embeds"),
        );

        // The reward from the raw 8-bit images: every (image, prompt) pair, matching and not,
        // scores as the reference's logits_per_image (random weights: no pair is "right").
        for i in 0..2 {
            let sample = raw_sample(&fx, i).unsqueeze(0).unwrap(); // [1, 1, 3, H, W]
            for (j, p) in prompts.iter().enumerate() {
                let s = r.score(std::slice::from_ref(p), &sample).unwrap()[0];
                let w: f32 = want.i((i, j)).unwrap().to_scalar().unwrap();
                eprintln!("score(image {i}, prompt {j}) = {s:.6} (reference {w:.6})");
                assert!((s - w).abs() <= 1e-4, "{s} vs {w}");
            }
        }
        // The float (differentiable) path on the same images: its effect on the scores.
        for (i, prompt) in refs.iter().enumerate() {
            let s: f32 = r
                .differentiable_scores(&[prompt], &raw_sample(&fx, i))
                .unwrap()
                .i(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            let w: f32 = want.i((i, i)).unwrap().to_scalar().unwrap();
            eprintln!("float path: score(image {i}, prompt {i}) = {s:.5}, exact {w:.5}");
            assert!((s - w).abs() < 0.5, "{s} vs {w}");
        }
    }

    #[test]
    fn a_video_scores_the_mean_of_its_frames_and_batches_agree() {
        let fx = fixture("clip-tiny");
        let r = load(&fx);
        let a = raw_sample(&fx, 0);
        // A second frame of the same size: the first with its channels rotated.
        let b = Tensor::cat(&[a.i((.., 1..3)).unwrap(), a.i((.., 0..1)).unwrap()], 1).unwrap();
        let p = vec![fx.prompts()[1].clone()];
        let one = |x: &Tensor| r.score(&p, &x.unsqueeze(0).unwrap()).unwrap()[0];
        let (sa, sb) = (one(&a), one(&b));
        let video = Tensor::stack(&[&a.squeeze(0).unwrap(), &b.squeeze(0).unwrap()], 0)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let sv = r.score(&p, &video).unwrap()[0];
        assert!((sv - (sa + sb) / 2.0).abs() < 1e-5, "{sv} vs {sa} {sb}");
        // Two samples with a repeated prompt in one batch score as they do alone.
        let batch = Tensor::cat(&[&a, &b], 0).unwrap().unsqueeze(1).unwrap();
        let both = r.score(&[p[0].clone(), p[0].clone()], &batch).unwrap();
        assert!(
            (both[0] - sa).abs() < 1e-5 && (both[1] - sb).abs() < 1e-5,
            "{both:?}"
        );
        assert!(
            (sa - sb).abs() > 1e-3,
            "the frames should score differently"
        );

        let grey = Tensor::zeros((1, 1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let err = r.score(&p, &grey).unwrap_err().to_string();
        assert!(err.contains("RGB") && err.contains("clip-tiny"), "{err}");
    }

    #[test]
    fn every_variable_and_the_image_get_a_gradient() {
        let fx = fixture("clip-tiny");
        let dev = Device::Cpu;
        let cfg = ClipModelConfig::load(&fx.dir.join("config.json")).unwrap();
        assert_eq!((cfg.projection_dim, cfg.text.projection_dim), (24, 24));
        let map = VarMap::new();
        let vb = random_var_builder(&map, 7, DType::F32, &dev);
        let tok = ClipTokenizer::load(&fx.dir).unwrap();
        let proc = ClipImageProcessor::load(&fx.dir.join("preprocessor_config.json")).unwrap();
        let r = ClipScoreReward::new(vb, &cfg, tok, proc, &fx.dir).unwrap();
        let images =
            Var::from_tensor(&Tensor::rand(-1f32, 1.0, (2, 3, 32, 32), &dev).unwrap()).unwrap();
        let scores = r
            .differentiable_scores(&["a cat", "the moon"], images.as_tensor())
            .unwrap();
        let grads = scores.sum_all().unwrap().backward().unwrap();
        let vars = map.data().lock().unwrap();
        // text: 2 embeddings + 2 layers x 16 + final LN 2 + projection; vision: 3 + 2 + 2 x 16
        // + 2 + projection; logit_scale.
        assert_eq!(vars.len(), (2 + 32 + 2 + 1) + (3 + 2 + 32 + 2 + 1) + 1);
        // The token embedding only gets rows for the prompts' ids; the sum is positive.
        assert_every_var_has_gradient(&vars, &grads, "");
        assert_has_gradient(&grads, images.as_tensor(), "the image");
    }

    /// A scratch copy of the fixture directory, edited by `edit` (which gets its path).
    fn edited(tag: &str, edit: impl FnOnce(&Path)) -> PathBuf {
        let src = fixture("clip-tiny").dir;
        let dir = std::env::temp_dir().join(format!("fewstep-clip-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        edit(&dir);
        dir
    }

    fn load_err(dir: &Path) -> String {
        match ClipScoreReward::load(dir, DType::F32, &Device::Cpu) {
            Ok(_) => panic!("{} loaded", dir.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_or_missing_files_are_named() {
        type Edit = Box<dyn FnOnce(&Path)>;
        let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
            (
                "noproc",
                Box::new(|d| std::fs::remove_file(d.join("preprocessor_config.json")).unwrap()),
                vec!["preprocessor_config.json", "not found"],
            ),
            (
                "notok",
                Box::new(|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap()),
                vec!["tokenizer.json", "not found"],
            ),
            (
                "noweights",
                Box::new(|d| std::fs::remove_file(d.join("model.safetensors")).unwrap()),
                vec!["model.safetensors", "not found"],
            ),
            (
                "textonly",
                Box::new(|d| {
                    let p = d.join("config.json");
                    let raw: serde_json::Value =
                        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                    std::fs::write(&p, raw["text_config"].to_string()).unwrap();
                }),
                vec!["config.json", "not a CLIPModel config"],
            ),
            (
                "badjson",
                Box::new(|d| std::fs::write(d.join("preprocessor_config.json"), "{").unwrap()),
                vec!["preprocessor_config.json", "invalid JSON"],
            ),
            (
                "noproj",
                Box::new(|d| {
                    let p = d.join("model.safetensors");
                    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
                    t.remove("visual_projection.weight").unwrap();
                    candle_core::safetensors::save(&t, &p).unwrap();
                }),
                vec!["model.safetensors", "visual_projection.weight"],
            ),
            (
                "badshape",
                Box::new(|d| {
                    let p = d.join("model.safetensors");
                    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
                    let z = Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap();
                    t.insert("vision_model.embeddings.class_embedding".into(), z);
                    candle_core::safetensors::save(&t, &p).unwrap();
                }),
                vec!["model.safetensors", "class_embedding", "shape"],
            ),
        ];
        for (tag, edit, needles) in cases {
            let dir = edited(tag, edit);
            let err = load_err(&dir);
            eprintln!("{tag}: {err}");
            for n in needles {
                assert!(err.contains(n), "{tag}: {err:?} lacks {n:?}");
            }
            std::fs::remove_dir_all(&dir).unwrap();
        }
        let err = load_err(Path::new("/nonexistent/clip"));
        assert!(
            err.contains("/nonexistent/clip") && err.contains("not found"),
            "{err}"
        );
    }
}
