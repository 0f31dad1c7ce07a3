//! The CLIP text encoder of Stable Diffusion (transformers' `CLIPTextModel` and, for SDXL's
//! second encoder, `CLIPTextModelWithProjection`), with the transformers parameter names.
//! Pre-LN transformer layers under a causal mask; every op has a backward, so it can be
//! fine-tuned as well as served. The layers are shared with the vision tower (`clip_vision`).

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::layers::LayerNorm;
use super::layout::{read_json, ComponentFiles, LoadError, TRANSFORMERS_WEIGHTS};
use crate::nn::fused_attention::attend;
use crate::nn::Linear;

/// Masked keys get this bias: `exp` of it is exactly 0 in f32 (it becomes -inf in f16, which
/// is fine since the diagonal is always visible).
const MASKED: f32 = -1e9;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP, SD1.x).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP, SD2.x and SDXL).
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
        }
    }
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_intermediate() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    8
}
fn d_positions() -> usize {
    77
}
fn d_act() -> Activation {
    Activation::QuickGelu
}
fn d_eps() -> f64 {
    1e-5
}
fn d_eos() -> u32 {
    49407
}

/// The text encoder's `config.json` (defaults are transformers' `CLIPTextConfig` defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_hidden")]
    pub projection_dim: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
}

impl ClipTextConfig {
    /// Reads `config.json`; a full `CLIPConfig` is accepted too (its text tower's config is
    /// used, see [`tower_config`]).
    pub fn load(path: &Path) -> std::result::Result<Self, LoadError> {
        Self::from_json(path, read_tower_json(path, "text")?)
    }

    /// Parses and checks a text config read from `path` (named in errors).
    pub fn from_json(path: &Path, raw: serde_json::Value) -> std::result::Result<Self, LoadError> {
        parse_tower(path, raw, Self::encoder_dims)
    }

    pub(super) fn encoder_dims(&self) -> EncoderDims {
        EncoderDims {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            layers: self.num_hidden_layers,
            act: self.hidden_act,
            eps: self.layer_norm_eps,
        }
    }
}

/// One tower's config inside a full `CLIPConfig` (`tower` is `text` or `vision`). As
/// transformers does, a legacy `<tower>_config_dict` replaces `<tower>_config` when present.
pub fn tower_config(raw: &serde_json::Value, tower: &str) -> Option<serde_json::Value> {
    [format!("{tower}_config_dict"), format!("{tower}_config")]
        .iter()
        .find_map(|k| raw.get(k).filter(|t| t.is_object()).cloned())
}

/// Reads a tower's config from `path`: the file itself, or its `tower` part when the file is
/// a full `CLIPConfig`.
pub(super) fn read_tower_json(
    path: &Path,
    tower: &str,
) -> std::result::Result<serde_json::Value, LoadError> {
    let raw: serde_json::Value = read_json(path)?;
    Ok(tower_config(&raw, tower).unwrap_or(raw))
}

/// Parses a tower's config read from `path` (named in errors) and checks its encoder shape.
pub(super) fn parse_tower<T: DeserializeOwned>(
    path: &Path,
    raw: serde_json::Value,
    encoder_dims: impl FnOnce(&T) -> EncoderDims,
) -> std::result::Result<T, LoadError> {
    let cfg: T = serde_json::from_value(raw).map_err(|source| LoadError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    encoder_dims(&cfg).check(path)?;
    Ok(cfg)
}

/// The shape of a tower's pre-LN encoder layers (the text and vision towers share them).
#[derive(Debug, Clone, Copy)]
pub(super) struct EncoderDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub act: Activation,
    pub eps: f64,
}

impl EncoderDims {
    /// Rejects configs that cannot build (checked at load, naming the config file).
    pub fn check(&self, path: &Path) -> std::result::Result<(), LoadError> {
        if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            return Err(LoadError::invalid(
                path,
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden, self.heads
                ),
            ));
        }
        if self.layers == 0 {
            return Err(LoadError::invalid(path, "num_hidden_layers is 0"));
        }
        Ok(())
    }
}

/// Whether the model has transformers' `text_projection` (`CLIPTextModelWithProjection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipKind {
    TextModel,
    WithProjection,
}

impl ClipKind {
    /// The kind named by a `model_index.json` class (`CLIPTextModelWithProjection` or not).
    pub fn from_class(class: &str) -> Self {
        if class == "CLIPTextModelWithProjection" {
            Self::WithProjection
        } else {
            Self::TextModel
        }
    }
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            q: Linear::new(vb.pp("q_proj"), dim, dim)?,
            k: Linear::new(vb.pp("k_proj"), dim, dim)?,
            v: Linear::new(vb.pp("v_proj"), dim, dim)?,
            out: Linear::new(vb.pp("out_proj"), dim, dim)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(x)?, self.v.forward(x)?);
        self.out.forward(&attend(&q, &k, &v, self.heads, mask)?)
    }
}

/// transformers' `CLIPEncoderLayer`: pre-LN self-attention and MLP, each with a residual.
#[derive(Debug, Clone)]
pub(super) struct EncoderLayer {
    ln1: LayerNorm,
    attn: SelfAttention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    pub(super) fn new(vb: VarBuilder, dims: &EncoderDims) -> Result<Self> {
        let (d, eps) = (dims.hidden, dims.eps);
        Ok(Self {
            ln1: LayerNorm::new(vb.pp("layer_norm1"), d, eps)?,
            attn: SelfAttention::new(vb.pp("self_attn"), d, dims.heads)?,
            ln2: LayerNorm::new(vb.pp("layer_norm2"), d, eps)?,
            fc1: Linear::new(vb.pp("mlp").pp("fc1"), d, dims.intermediate)?,
            fc2: Linear::new(vb.pp("mlp").pp("fc2"), dims.intermediate, d)?,
            act: dims.act,
        })
    }

    /// `mask`: an additive bias over keys (the text tower's causal mask; none for vision).
    pub(super) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        let h = self.act.apply(&self.fc1.forward(&self.ln2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

/// What the encoder computes for a batch of ids.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// `num_hidden_layers + 1` tensors `[B, T, D]`: the embeddings, then each layer's output
    /// (the last one before the final layer norm), as transformers' `hidden_states`.
    pub hidden_states: Vec<Tensor>,
    /// `[B, T, D]`, after the final layer norm.
    pub last_hidden_state: Tensor,
    /// `[B, D]`: `last_hidden_state` at each row's EOS token (`pooler_output`).
    pub pooled: Tensor,
    /// `[B, projection_dim]`: the projected pooled output (`CLIPTextModelWithProjection` only).
    pub text_embeds: Option<Tensor>,
}

impl ClipOutput {
    /// `hidden_states[-2]`, the conditioning SDXL takes from both of its encoders.
    pub fn penultimate(&self) -> &Tensor {
        &self.hidden_states[self.hidden_states.len() - 2]
    }
}

#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_ln: LayerNorm,
    projection: Option<Tensor>,
    cfg: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the model from `vb` rooted at the transformers state dict (`text_model.…`).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig, kind: ClipKind) -> Result<Self> {
        let d = cfg.hidden_size;
        let text = vb.pp("text_model");
        let emb = text.pp("embeddings");
        // A `[rows, d]` table, initialised like transformers' (normal with `stdev`).
        let table = |name: &str, rows: usize, stdev: f64| {
            let init = Init::Randn { mean: 0.0, stdev };
            emb.pp(name).get_with_hints((rows, d), "weight", init)
        };
        let token_embedding = table("token_embedding", cfg.vocab_size, 0.02)?;
        let position_embedding = table("position_embedding", cfg.max_position_embeddings, 0.01)?;
        let dims = cfg.encoder_dims();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(text.pp("encoder").pp("layers").pp(i), &dims))
            .collect::<Result<Vec<_>>>()?;
        let final_ln = LayerNorm::new(text.pp("final_layer_norm"), d, cfg.layer_norm_eps)?;
        let projection = match kind {
            ClipKind::TextModel => None,
            ClipKind::WithProjection => Some(vb.pp("text_projection").get_with_hints(
                (cfg.projection_dim, d),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?),
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_ln,
            projection,
            cfg: cfg.clone(),
        })
    }

    /// Loads a `text_encoder/` folder (`config.json`, `model.safetensors`).
    pub fn load(
        dir: &Path,
        kind: ClipKind,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        Self::from_files(
            &ComponentFiles::locate(dir, TRANSFORMERS_WEIGHTS)?,
            kind,
            dtype,
            device,
        )
    }

    pub fn from_files(
        files: &ComponentFiles,
        kind: ClipKind,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        let cfg = ClipTextConfig::load(&files.config)?;
        let vb = files.var_builder(dtype, device)?;
        Self::new(vb, &cfg, kind).map_err(|e| files.weights_error(e))
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// `[T, T]` additive causal mask: token `i` sees tokens `0..=i`.
    fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { MASKED } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
    }

    /// Each row's pooling position, transformers' rule: with the legacy `eos_token_id == 2`
    /// configs, the largest id (EOS is the last vocabulary entry); otherwise the first
    /// `eos_token_id` (position 0 if the row has none, as `argmax` of all zeros gives).
    fn eos_positions(&self, ids: &[Vec<i64>]) -> Vec<usize> {
        let eos = self.cfg.eos_token_id as i64;
        ids.iter()
            .map(|row| {
                if self.cfg.eos_token_id == 2 {
                    // torch's argmax returns the first maximum.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&v| v == max).unwrap_or(0)
                } else {
                    row.iter().position(|&v| v == eos).unwrap_or(0)
                }
            })
            .collect()
    }

    /// Encodes `ids` (`[B, T]`, any integer dtype, `T <= max_position_embeddings`).
    pub fn forward(&self, ids: &Tensor) -> Result<ClipOutput> {
        let (b, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "{t} tokens exceed max_position_embeddings {}",
                self.cfg.max_position_embeddings
            );
        }
        let d = self.cfg.hidden_size;
        let device = self.token_embedding.device();
        let dtype = self.token_embedding.dtype();
        let tokens = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?;
        let positions = self.position_embedding.narrow(0, 0, t)?;
        let mut x = tokens.broadcast_add(&positions)?;
        let mask = Self::causal_mask(t, dtype, device)?;

        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(&x, Some(&mask))?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_ln.forward(&x)?;

        let rows: Vec<Vec<i64>> = ids.to_dtype(DType::I64)?.to_vec2()?;
        let flat: Vec<u32> = self
            .eos_positions(&rows)
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * t + p) as u32)
            .collect();
        let flat = Tensor::from_vec(flat, b, device)?;
        let pooled = last_hidden_state
            .reshape((b * t, d))?
            .index_select(&flat, 0)?;
        let text_embeds = match &self.projection {
            Some(w) => Some(pooled.matmul(&w.t()?)?),
            None => None,
        };
        Ok(ClipOutput {
            hidden_states,
            last_hidden_state,
            pooled,
            text_embeds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::sd::testing::{
        assert_close, assert_every_var_has_gradient, assert_mentions, assert_near_f32,
        edited_weights, fixture, Fixture,
    };
    use crate::nn::random_var_builder;
    use candle_nn::VarMap;
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn check_encoder(fx: &Fixture, dir: &str, prefix: &str, kind: ClipKind) {
        let dev = Device::Cpu;
        let model = ClipTextModel::load(&fx.dir.join(dir), kind, DType::F32, &dev).unwrap();
        let ids = fx.tensor(&format!("{prefix}.input_ids"));
        let out = model.forward(&ids).unwrap();
        let label = |what: &str| format!("{} {prefix}.{what}", fx.name);
        let want = fx.tensor(&format!("{prefix}.hidden_states"));
        assert_eq!(
            want.dim(0).unwrap(),
            out.hidden_states.len(),
            "hidden state count"
        );
        for (i, h) in out.hidden_states.iter().enumerate() {
            let w = want.get(i).unwrap();
            assert_close(&label(&format!("hidden_states[{i}]")), h, &w);
        }
        let want_last = fx.tensor(&format!("{prefix}.last_hidden_state"));
        assert_close(
            &label("last_hidden_state"),
            &out.last_hidden_state,
            &want_last,
        );
        let pooled_key = format!("{prefix}.pooled");
        if fx.has(&pooled_key) {
            assert_close(&label("pooled"), &out.pooled, &fx.tensor(&pooled_key));
        }
        let embeds_key = format!("{prefix}.text_embeds");
        if kind == ClipKind::WithProjection {
            let got = out.text_embeds.as_ref().expect("projection output");
            assert_close(&label("text_embeds"), got, &fx.tensor(&embeds_key));
        }
    }

    #[test]
    fn text_encoders_match_transformers() {
        for name in ["sd15-tiny", "sd2-tiny", "sdxl-tiny"] {
            let fx = fixture(name);
            check_encoder(&fx, "text_encoder", "text", ClipKind::TextModel);
            if name == "sdxl-tiny" {
                check_encoder(&fx, "text_encoder_2", "text2", ClipKind::WithProjection);
            }
        }
    }

    #[test]
    fn half_precision_stays_close_to_f32() {
        let fx = fixture("sdxl-tiny");
        let dir = fx.dir.join("text_encoder_2");
        let ids = fx.tensor("text2.input_ids");
        let run = |dtype| {
            let m =
                ClipTextModel::load(&dir, ClipKind::WithProjection, dtype, &Device::Cpu).unwrap();
            let out = m.forward(&ids).unwrap();
            out.text_embeds.unwrap().to_dtype(DType::F32).unwrap()
        };
        let full = run(DType::F32);
        for dtype in [DType::BF16, DType::F16] {
            assert_near_f32(&format!("{dtype:?} text_embeds"), &run(dtype), &full, 0.05);
        }
    }

    fn tiny_config(act: &str, eos: u32) -> ClipTextConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "projection_dim": 8,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 10,
            "hidden_act": act, "eos_token_id": eos,
        }))
        .unwrap()
    }

    #[test]
    fn pooling_follows_the_transformers_eos_rule() {
        let map = VarMap::new();
        let vb = random_var_builder(&map, 0, DType::F32, &Device::Cpu);
        let legacy =
            ClipTextModel::new(vb, &tiny_config("quick_gelu", 2), ClipKind::TextModel).unwrap();
        // Legacy rule: position of the (first) largest id, whatever eos_token_id says.
        let rows = vec![vec![38, 5, 39, 39, 39], vec![38, 39, 2, 2, 2]];
        assert_eq!(legacy.eos_positions(&rows), vec![2, 1]);
        let mut real = legacy.clone();
        real.cfg.eos_token_id = 7;
        let rows = vec![
            vec![38, 5, 7, 0, 0],
            vec![38, 7, 39, 7, 7],
            vec![38, 5, 6, 0, 0],
        ];
        assert_eq!(real.eos_positions(&rows), vec![2, 1, 0]);
    }

    #[test]
    fn every_variable_gets_a_gradient() {
        let dev = Device::Cpu;
        for act in ["quick_gelu", "gelu", "gelu_new"] {
            let map = VarMap::new();
            let vb = random_var_builder(&map, 1, DType::F32, &dev);
            let cfg = tiny_config(act, 39);
            let model = ClipTextModel::new(vb, &cfg, ClipKind::WithProjection).unwrap();
            let ids =
                Tensor::new(&[[38u32, 4, 9, 39, 0, 0], [38, 12, 3, 17, 39, 0]], &dev).unwrap();
            let out = model.forward(&ids).unwrap();
            let loss = (out.last_hidden_state.sqr().unwrap().mean_all().unwrap()
                + out.text_embeds.unwrap().sqr().unwrap().mean_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            let vars = map.data().lock().unwrap();
            assert!(vars.len() >= 2 + 2 * 12 + 3, "{} variables", vars.len());
            assert_every_var_has_gradient(&vars, &grads, &format!("{act}: "));
        }
    }

    /// A scratch copy of the sd15 fixture's text encoder with one tensor replaced.
    fn edited_encoder(tag: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
        let src = fixture("sd15-tiny").dir.join("text_encoder");
        edited_weights(&src, "model.safetensors", &format!("clip-{tag}"), edit)
    }

    #[test]
    fn bad_weights_name_the_file_and_the_tensor() {
        let load_err = |dir: &Path, kind| {
            ClipTextModel::load(dir, kind, DType::F32, &Device::Cpu)
                .unwrap_err()
                .to_string()
        };
        let key = "text_model.encoder.layers.1.mlp.fc1.weight";
        let dir = edited_encoder("missing", |t| {
            t.remove(key).unwrap();
        });
        assert_mentions(
            &load_err(&dir, ClipKind::TextModel),
            &["model.safetensors", key],
        );
        std::fs::remove_dir_all(&dir).unwrap();

        let key = "text_model.final_layer_norm.bias";
        let dir = edited_encoder("shape", |t| {
            t.insert(
                key.into(),
                Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
            );
        });
        let err = load_err(&dir, ClipKind::TextModel);
        assert_mentions(&err, &["model.safetensors", key, "shape"]);
        std::fs::remove_dir_all(&dir).unwrap();

        // The projection model needs text_projection.weight, which a CLIPTextModel lacks.
        let fx = fixture("sd15-tiny");
        let err = load_err(&fx.dir.join("text_encoder"), ClipKind::WithProjection);
        assert_mentions(&err, &["text_projection.weight"]);

        let err = load_err(&fx.dir.join("nope"), ClipKind::TextModel);
        assert_mentions(&err, &["nope", "not found"]);
    }
}
