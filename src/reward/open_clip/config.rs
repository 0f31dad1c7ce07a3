//! An OpenCLIP model config (`open_clip_config.json`) read into the transformers `CLIPModel`
//! config that [`ClipScoreReward`](super::super::ClipScoreReward) builds from, and OpenCLIP's
//! inference preprocessing as a [`ClipImageProcessor`].
//!
//! Only the plain `open_clip.CLIP` (a ViT image tower with a class token and the built-in text
//! transformer) maps onto `CLIPModel`; every option that changes the computation otherwise is
//! refused by name, and so is any key this reader does not know.

use std::path::Path;

use serde_json::{Map, Value};

use crate::families::sd::clip::{Activation, ClipTextConfig};
use crate::families::sd::clip_image::{ClipImageProcessor, CropRounding, Resize};
use crate::families::sd::clip_vision::ClipVisionConfig;
use crate::families::sd::layout::{read_json, LoadError};
use crate::reward::ClipModelConfig;

/// OpenAI's normalization, open_clip's `PreprocessCfg` default (Python floats, which torch
/// rounds to f32).
const OPENAI_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// `torch.nn.LayerNorm`'s default epsilon, which open_clip's towers keep.
const LN_EPS: f64 = 1e-5;
/// In transformers' CLIP configs, `eos_token_id` 2 selects pooling at the largest id, which is
/// OpenCLIP's `pool_type = "argmax"` (EOT is the last vocabulary entry).
const ARGMAX_POOLING: u32 = 2;

/// One transformer tower's shape, with OpenCLIP's names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TowerCfg {
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    /// `int(width * mlp_ratio)`, as open_clip sizes the MLP.
    pub mlp_width: usize,
    pub eps: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OpenClipConfig {
    pub embed_dim: usize,
    pub act: Activation,
    pub text: TowerCfg,
    pub context_length: usize,
    pub vocab_size: usize,
    pub vision: TowerCfg,
    pub image_size: usize,
    pub patch_size: usize,
    pub preprocess: PreprocessCfg,
}

/// OpenCLIP's inference transform: resize, center crop, `ToTensor`, normalize.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessCfg {
    /// `shortest` (resize the short side, crop the centre) or `squash` (resize to the square).
    pub squash: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// A JSON object being read, named `section` in errors about file `path`. Each read key is
/// recorded so that [`Section::finish`] can refuse the unknown ones.
struct Section<'a> {
    path: &'a Path,
    section: &'a str,
    obj: &'a Map<String, Value>,
    seen: Vec<&'static str>,
}

impl<'a> Section<'a> {
    fn new(path: &'a Path, section: &'a str, v: &'a Value) -> Result<Self, LoadError> {
        let obj = v
            .as_object()
            .ok_or_else(|| LoadError::invalid(path, format!("{section} is not an object")))?;
        Ok(Self {
            path,
            section,
            obj,
            seen: Vec::new(),
        })
    }

    /// The value of `key` unless it is absent or null.
    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.push(key);
        self.peek(key)
    }

    /// [`Section::get`] without marking `key` read.
    fn peek(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn invalid(&self, key: &str, what: impl std::fmt::Display) -> LoadError {
        LoadError::invalid(self.path, format!("{}.{key} {what}", self.section))
    }

    fn size(&mut self, key: &'static str, default: usize) -> Result<usize, LoadError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| self.invalid(key, format!("= {v} is not a size"))),
        }
    }

    /// A size that may also be written `[n, n]` (open_clip's `to_2tuple`).
    fn square(&mut self, key: &'static str, default: usize) -> Result<usize, LoadError> {
        let Some(v @ Value::Array(a)) = self.peek(key) else {
            return self.size(key, default);
        };
        self.seen.push(key);
        let n = a[..]
            .first()
            .and_then(Value::as_u64)
            .filter(|&n| n > 0 && a.len() == 2 && a[1].as_u64() == Some(n));
        n.map(|n| n as usize).ok_or_else(|| {
            LoadError::unsupported(
                self.path,
                format!("{}.{key} = {v}: only square sizes", self.section),
            )
        })
    }

    fn number(&mut self, key: &'static str, default: f64) -> Result<f64, LoadError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| self.invalid(key, format!("= {v} is not a positive number"))),
        }
    }

    fn flag(&mut self, key: &'static str) -> Result<bool, LoadError> {
        match self.get(key) {
            None => Ok(false),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.invalid(key, format!("= {v} is not true or false"))),
        }
    }

    /// Refuses `key` unless it is absent, null or `default`: `what` names the feature.
    fn only_default(
        &mut self,
        key: &'static str,
        default: Value,
        what: &str,
    ) -> Result<(), LoadError> {
        match self.get(key) {
            Some(v) if *v != default => Err(LoadError::unsupported(
                self.path,
                format!("{}.{key} = {v} ({what})", self.section),
            )),
            _ => Ok(()),
        }
    }

    /// Keys read by open_clip only with an option refused above, or only in training.
    fn ignore(&mut self, keys: &[&'static str]) {
        self.seen.extend_from_slice(keys);
    }

    /// `norm_kwargs`: only a LayerNorm `eps` maps onto this model.
    fn layer_norm_eps(&mut self) -> Result<f64, LoadError> {
        let Some(v) = self.get("norm_kwargs") else {
            return Ok(LN_EPS);
        };
        let obj = v.as_object().filter(|o| o.keys().all(|k| k == "eps"));
        match obj {
            Some(o) => match o.get("eps") {
                None => Ok(LN_EPS),
                Some(e) => e
                    .as_f64()
                    .filter(|&e| e > 0.0)
                    .ok_or_else(|| self.invalid("norm_kwargs", format!("eps {e} is not positive"))),
            },
            None => Err(LoadError::unsupported(
                self.path,
                format!(
                    "{}.norm_kwargs = {v} (only a LayerNorm eps is supported)",
                    self.section
                ),
            )),
        }
    }

    fn finish(self) -> Result<(), LoadError> {
        match self.obj.keys().find(|k| !self.seen.contains(&k.as_str())) {
            Some(k) => Err(LoadError::unsupported(
                self.path,
                format!(
                    "unknown option {}.{k} (this reader knows open_clip 2.x CLIP configs)",
                    self.section
                ),
            )),
            None => Ok(()),
        }
    }
}

/// A tower's `layers`, `width`, `heads` and MLP from its section.
fn tower(s: &mut Section, width: usize, heads: usize, eps: f64) -> Result<TowerCfg, LoadError> {
    let layers = s.size("layers", 12)?;
    let ratio = s.number("mlp_ratio", 4.0)?;
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(s.invalid(
            "width",
            format!("{width} is not a multiple of {heads} heads"),
        ));
    }
    Ok(TowerCfg {
        width,
        heads,
        layers,
        // Python's int(): truncation.
        mlp_width: (width as f64 * ratio) as usize,
        eps,
    })
}

fn text_cfg(path: &Path, v: &Value) -> Result<(TowerCfg, usize, usize), LoadError> {
    let mut s = Section::new(path, "text_cfg", v)?;
    s.only_default("hf_model_name", Value::Null, "a Hugging Face text tower")?;
    s.only_default("hf_tokenizer_name", Value::Null, "a non-CLIP tokenizer")?;
    s.only_default("ls_init_value", Value::Null, "layer scale")?;
    s.only_default("embed_cls", false.into(), "a CoCa class token")?;
    s.only_default(
        "no_causal_mask",
        false.into(),
        "a text tower without causal mask",
    )?;
    s.only_default(
        "final_ln_after_pool",
        false.into(),
        "LayerNorm after pooling",
    )?;
    s.only_default("pool_type", "argmax".into(), "pooling other than at EOT")?;
    s.only_default("proj_bias", false.into(), "a text projection with bias")?;
    s.only_default("act_kwargs", Value::Null, "activation arguments")?;
    if let Some(k) = s.get("tokenizer_kwargs") {
        if k.as_object().is_some_and(|o| !o.is_empty()) {
            return Err(LoadError::unsupported(
                path,
                format!("text_cfg.tokenizer_kwargs = {k} (a tokenizer other than CLIP's)"),
            ));
        }
    }
    // pad_id only reaches the model with embed_cls; the hf_* options only with hf_model_name.
    s.ignore(&[
        "pad_id",
        "output_tokens",
        "hf_model_pretrained",
        "hf_proj_type",
        "hf_pooler_type",
    ]);
    let context_length = s.size("context_length", 77)?;
    if context_length < 3 {
        return Err(s.invalid("context_length", "is below 3 (BOS, a token, EOT)"));
    }
    let vocab_size = s.size("vocab_size", 49408)?;
    let width = s.size("width", 512)?;
    let heads = s.size("heads", 8)?;
    let eps = s.layer_norm_eps()?;
    let t = tower(&mut s, width, heads, eps)?;
    s.finish()?;
    Ok((t, context_length, vocab_size))
}

fn vision_cfg(path: &Path, v: &Value) -> Result<(TowerCfg, usize, usize), LoadError> {
    let mut s = Section::new(path, "vision_cfg", v)?;
    s.only_default("timm_model_name", Value::Null, "a timm image tower")?;
    if let Some(l) = s.peek("layers").filter(|l| l.is_array()) {
        return Err(LoadError::unsupported(
            path,
            format!("vision_cfg.layers = {l} (a ResNet image tower)"),
        ));
    }
    s.only_default("ls_init_value", Value::Null, "layer scale")?;
    s.only_default("attentional_pool", false.into(), "an attentional pooler")?;
    s.only_default(
        "no_ln_pre",
        false.into(),
        "no LayerNorm before the transformer",
    )?;
    s.only_default(
        "pos_embed_type",
        "learnable".into(),
        "fixed position embeddings",
    )?;
    s.only_default(
        "final_ln_after_pool",
        false.into(),
        "LayerNorm after pooling",
    )?;
    s.only_default(
        "pool_type",
        "tok".into(),
        "pooling other than the class token",
    )?;
    s.only_default("global_average_pool", false.into(), "average pooling")?;
    s.only_default("input_patchnorm", false.into(), "patch LayerNorm")?;
    s.only_default("act_kwargs", Value::Null, "activation arguments")?;
    s.ignore(&[
        "patch_dropout",
        "output_tokens",
        "attn_pooler_queries",
        "attn_pooler_heads",
        "timm_model_pretrained",
        "timm_pool",
        "timm_proj",
        "timm_proj_bias",
        "timm_drop",
        "timm_drop_path",
    ]);
    let image_size = s.square("image_size", 224)?;
    let patch_size = s.square("patch_size", 16)?;
    if !image_size.is_multiple_of(patch_size) {
        // open_clip's stride-patch convolution would drop the remainder; no release has one.
        return Err(LoadError::unsupported(
            path,
            format!(
                "vision_cfg.image_size {image_size} is not a multiple of patch_size {patch_size}"
            ),
        ));
    }
    let width = s.size("width", 768)?;
    let head_width = s.size("head_width", 64)?;
    let eps = s.layer_norm_eps()?;
    let t = tower(&mut s, width, width / head_width, eps)?;
    s.finish()?;
    Ok((t, image_size, patch_size))
}

fn preprocess_cfg(path: &Path, v: Option<&Value>, size: usize) -> Result<PreprocessCfg, LoadError> {
    let mut cfg = PreprocessCfg {
        squash: false,
        mean: OPENAI_MEAN.map(|x| x as f32),
        std: OPENAI_STD.map(|x| x as f32),
    };
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(cfg);
    };
    // open_clip drops keys its PreprocessCfg lacks, so unknown ones are ignored here too.
    let mut s = Section::new(path, "preprocess_cfg", v)?;
    let unsupported = |what: String| LoadError::unsupported(path, format!("preprocess_cfg.{what}"));
    if let Some(n) = s.get("size") {
        let square = match n {
            Value::Array(a) if a.len() == 2 && a[0] == a[1] => a[0].as_u64(),
            other => other.as_u64(),
        };
        if square != Some(size as u64) {
            return Err(unsupported(format!(
                "size = {n}: the vision tower takes {size} x {size}"
            )));
        }
    }
    s.only_default("mode", "RGB".into(), "only RGB")?;
    match s.get("interpolation").and_then(Value::as_str) {
        // "random" only randomizes training; inference is bicubic.
        None | Some("bicubic") | Some("random") => {}
        Some(other) => {
            return Err(unsupported(format!(
                "interpolation = {other:?} (only bicubic)"
            )))
        }
    }
    match s.get("resize_mode").and_then(Value::as_str) {
        None | Some("shortest") => {}
        Some("squash") => cfg.squash = true,
        Some(other) => {
            return Err(unsupported(format!(
                "resize_mode = {other:?} (shortest and squash are supported)"
            )))
        }
    }
    let triple = |key: &str, v: &Value| -> Result<[f32; 3], LoadError> {
        let bad =
            || LoadError::invalid(path, format!("preprocess_cfg.{key} = {v} is not 3 numbers"));
        match v {
            Value::Number(n) => Ok([n.as_f64().ok_or_else(bad)? as f32; 3]),
            Value::Array(a) if a.len() == 3 => {
                let mut out = [0f32; 3];
                for (o, x) in out.iter_mut().zip(a) {
                    *o = x.as_f64().ok_or_else(bad)? as f32;
                }
                Ok(out)
            }
            _ => Err(bad()),
        }
    };
    if let Some(m) = s.get("mean") {
        cfg.mean = triple("mean", m)?;
    }
    if let Some(sd) = s.get("std") {
        cfg.std = triple("std", sd)?;
        if cfg.std.contains(&0.0) {
            return Err(LoadError::invalid(path, "preprocess_cfg.std has a zero"));
        }
    }
    Ok(cfg)
}

impl OpenClipConfig {
    /// Reads `open_clip_config.json`: the hub form `{"model_cfg": ..., "preprocess_cfg": ...}`
    /// or a bare model config (open_clip's `model_configs/<name>.json`).
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let raw: Value = read_json(path)?;
        let (model, preprocess) = match raw.get("model_cfg") {
            Some(m) => (m, raw.get("preprocess_cfg")),
            None if raw.get("embed_dim").is_some() => (&raw, None),
            None => {
                return Err(LoadError::invalid(
                    path,
                    "neither an OpenCLIP hub config (model_cfg) nor a model config (embed_dim)",
                ))
            }
        };
        let mut s = Section::new(path, "model_cfg", model)?;
        s.only_default("custom_text", false.into(), "a CustomTextCLIP text tower")?;
        s.only_default("multimodal_cfg", Value::Null, "a CoCa decoder")?;
        s.only_default("init_logit_bias", Value::Null, "a SigLIP logit bias")?;
        // The checkpoint holds logit_scale; precision is this loader's dtype.
        s.ignore(&["init_logit_scale", "cast_dtype", "output_dict"]);
        let embed_dim = s.size("embed_dim", 512)?;
        let act = if s.flag("quick_gelu")? {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        };
        let vision_raw = s
            .get("vision_cfg")
            .ok_or_else(|| LoadError::invalid(path, "model_cfg has no vision_cfg"))?;
        let text_raw = s
            .get("text_cfg")
            .ok_or_else(|| LoadError::invalid(path, "model_cfg has no text_cfg"))?;
        s.finish()?;
        let (vision, image_size, patch_size) = vision_cfg(path, vision_raw)?;
        let (text, context_length, vocab_size) = text_cfg(path, text_raw)?;
        Ok(Self {
            embed_dim,
            act,
            text,
            context_length,
            vocab_size,
            vision,
            image_size,
            patch_size,
            preprocess: preprocess_cfg(path, preprocess, image_size)?,
        })
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// The same model as a transformers `CLIPModel` config.
    pub fn clip_model_config(&self) -> ClipModelConfig {
        let (t, v) = (&self.text, &self.vision);
        ClipModelConfig {
            text: ClipTextConfig {
                vocab_size: self.vocab_size,
                hidden_size: t.width,
                intermediate_size: t.mlp_width,
                projection_dim: self.embed_dim,
                num_hidden_layers: t.layers,
                num_attention_heads: t.heads,
                max_position_embeddings: self.context_length,
                hidden_act: self.act,
                layer_norm_eps: t.eps,
                eos_token_id: ARGMAX_POOLING,
            },
            vision: ClipVisionConfig {
                hidden_size: v.width,
                intermediate_size: v.mlp_width,
                num_hidden_layers: v.layers,
                num_attention_heads: v.heads,
                num_channels: 3,
                image_size: self.image_size,
                patch_size: self.patch_size,
                hidden_act: self.act,
                layer_norm_eps: v.eps,
            },
            projection_dim: self.embed_dim,
        }
    }

    /// open_clip's inference transform (torchvision on a PIL image): bicubic resize, center
    /// crop with torchvision's rounding, `x / 255`, normalize.
    pub fn image_processor(&self) -> ClipImageProcessor {
        let s = self.image_size;
        let p = &self.preprocess;
        ClipImageProcessor {
            resize: Some(if p.squash {
                Resize::Exact {
                    height: s,
                    width: s,
                }
            } else {
                Resize::ShortestEdge(s)
            }),
            crop: (!p.squash).then_some((s, s)),
            crop_rounding: CropRounding::HalfEven,
            rescale: Some(1.0 / 255.0),
            mean_std: Some((p.mean, p.std)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<OpenClipConfig, String> {
        let dir = std::env::temp_dir().join(format!("fewstep-occfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("open_clip_config-{}.json", rand::random::<u64>()));
        std::fs::write(&path, v.to_string()).unwrap();
        let r = OpenClipConfig::load(&path).map_err(|e| e.to_string());
        std::fs::remove_file(&path).unwrap();
        r
    }

    fn vit_h() -> Value {
        // open_clip's model_configs/ViT-H-14.json.
        json!({
            "embed_dim": 1024,
            "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                           "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                         "layers": 24}
        })
    }

    #[test]
    fn vit_h_maps_onto_clip_model_in_both_forms() {
        let bare = parse(vit_h()).unwrap();
        let hub = parse(json!({"model_cfg": vit_h(), "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711]}}))
        .unwrap();
        assert_eq!(bare, hub);
        let c = bare.clip_model_config();
        assert_eq!(c.projection_dim, 1024);
        assert_eq!(
            (c.vision.hidden_size, c.vision.num_attention_heads),
            (1280, 16)
        );
        assert_eq!(
            (c.vision.intermediate_size, c.vision.num_hidden_layers),
            (5120, 32)
        );
        assert_eq!((c.vision.image_size, c.vision.patch_size), (224, 14));
        assert_eq!((c.text.hidden_size, c.text.num_attention_heads), (1024, 16));
        assert_eq!(
            (c.text.intermediate_size, c.text.projection_dim),
            (4096, 1024)
        );
        assert_eq!(c.text.max_position_embeddings, 77);
        assert_eq!(c.text.eos_token_id, ARGMAX_POOLING);
        assert_eq!(c.text.hidden_act, Activation::Gelu);
        assert_eq!(c.vision.hidden_act, Activation::Gelu);
        let p = bare.image_processor();
        assert_eq!(p.resize, Some(Resize::ShortestEdge(224)));
        assert_eq!(
            (p.crop, p.crop_rounding),
            (Some((224, 224)), CropRounding::HalfEven)
        );
        assert_eq!(p.mean_std, ClipImageProcessor::default().mean_std);
    }

    #[test]
    fn options_that_map_are_read() {
        let mut v = vit_h();
        v["quick_gelu"] = true.into();
        // ViT-bigG-14's ratio: int(1664 * 4.9231) = 8192.
        v["vision_cfg"]["width"] = 1664.into();
        v["vision_cfg"]["head_width"] = 104.into();
        v["vision_cfg"]["mlp_ratio"] = 4.9231.into();
        v["vision_cfg"]["image_size"] = json!([224, 224]);
        v["vision_cfg"]["patch_dropout"] = 0.5.into();
        v["text_cfg"]["norm_kwargs"] = json!({"eps": 1e-6});
        let c = parse(json!({"model_cfg": v, "preprocess_cfg": {
            "mean": 0.5, "std": [0.5, 0.5, 0.5], "resize_mode": "squash",
            "interpolation": "bicubic", "fill_color": 0, "size": 224}}))
        .unwrap();
        let m = c.clip_model_config();
        assert_eq!(m.vision.intermediate_size, 8192);
        assert_eq!(m.vision.num_attention_heads, 16);
        assert_eq!(m.text.hidden_act, Activation::QuickGelu);
        assert_eq!(m.vision.hidden_act, Activation::QuickGelu);
        assert_eq!(
            (m.text.layer_norm_eps, m.vision.layer_norm_eps),
            (1e-6, 1e-5)
        );
        let p = c.image_processor();
        assert_eq!(
            (p.resize, p.crop),
            (
                Some(Resize::Exact {
                    height: 224,
                    width: 224
                }),
                None
            )
        );
        assert_eq!(p.mean_std, Some(([0.5; 3], [0.5; 3])));
    }

    #[test]
    fn unsupported_options_are_refused_by_name() {
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "/vision_cfg/timm_model_name",
                json!("vit_base"),
                "timm image tower",
            ),
            ("/vision_cfg/layers", json!([3, 4, 6, 3]), "ResNet"),
            (
                "/vision_cfg/attentional_pool",
                json!(true),
                "attentional pooler",
            ),
            ("/vision_cfg/ls_init_value", json!(1e-5), "layer scale"),
            ("/vision_cfg/pool_type", json!("avg"), "class token"),
            ("/vision_cfg/image_size", json!([224, 256]), "square"),
            (
                "/vision_cfg/patch_size",
                json!(15),
                "multiple of patch_size",
            ),
            (
                "/vision_cfg/norm_kwargs",
                json!({"elementwise_affine": false}),
                "eps",
            ),
            (
                "/text_cfg/hf_model_name",
                json!("xlm-roberta-large"),
                "Hugging Face text",
            ),
            ("/text_cfg/ls_init_value", json!(1e-5), "layer scale"),
            ("/text_cfg/pool_type", json!("last"), "EOT"),
            ("/text_cfg/proj_bias", json!(true), "bias"),
            (
                "/text_cfg/tokenizer_kwargs",
                json!({"clean": "canonicalize"}),
                "tokenizer",
            ),
            ("/text_cfg/embed_cls", json!(true), "CoCa"),
            (
                "/text_cfg/rope",
                json!(true),
                "unknown option text_cfg.rope",
            ),
            ("/custom_text", json!(true), "CustomTextCLIP"),
            ("/init_logit_bias", json!(-10), "SigLIP"),
            ("/multimodal_cfg", json!({"width": 512}), "CoCa"),
        ];
        for (pointer, value, needle) in cases {
            let mut v = vit_h();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let obj = if parent.is_empty() {
                &mut v
            } else {
                v.pointer_mut(parent).unwrap()
            };
            obj[key] = value;
            let err = parse(v).unwrap_err();
            let option = pointer.trim_start_matches('/').replace('/', ".");
            let option = option.trim_start_matches("text_cfg.");
            let option = option.trim_start_matches("vision_cfg.");
            assert!(
                err.contains("open_clip_config") && err.contains(needle) && err.contains(option),
                "{pointer}: {err}"
            );
        }
        for (pre, needle) in [
            (json!({"resize_mode": "longest"}), "resize_mode"),
            (json!({"interpolation": "bilinear"}), "bicubic"),
            (json!({"size": 336}), "takes 224"),
            (json!({"std": [0.5, 0.0, 0.5]}), "zero"),
            (json!({"mean": "imagenet"}), "3 numbers"),
        ] {
            let err = parse(json!({"model_cfg": vit_h(), "preprocess_cfg": pre})).unwrap_err();
            assert!(
                err.contains("preprocess_cfg") && err.contains(needle),
                "{err}"
            );
        }
        let err = parse(json!({"vision_cfg": {}})).unwrap_err();
        assert!(err.contains("neither an OpenCLIP hub config"), "{err}");
        let err = parse(json!({"embed_dim": 8, "text_cfg": {}})).unwrap_err();
        assert!(err.contains("no vision_cfg"), "{err}");
    }
}
