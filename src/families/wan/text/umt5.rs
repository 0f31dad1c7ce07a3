//! umT5's encoder (transformers' `UMT5EncoderModel`, `google/umt5-xxl` in Wan2.1), with the
//! transformers parameter names.
//!
//! Why not candle-transformers' T5: T5 computes the relative position bias in layer 0 and
//! reuses it in every later layer, and candle's `T5EncoderModel` loads a bias table for
//! layer 0 only. umT5 gives every layer its own table, so with umT5 weights that encoder
//! would silently drop 23 of the 24 tables. The rest is T5: RMS norms without mean or bias,
//! unscaled attention scores, a gated-GELU feed-forward.
//!
//! The encoder is frozen in every Wan recipe (only the transformer is distilled), so it uses
//! candle's fused softmax, which has no backward.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use crate::families::wan::block::{wide, RmsNorm};
use crate::families::wan::WanError;
use crate::nn::attention::{merge_heads, split_heads};
use crate::nn::Linear;

/// transformers' `UMT5Config`, the keys an encoder needs. Unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Umt5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` in umT5: `gelu_new(x W0) * (x W1)`.
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "gated-gelu".into()
}

/// The feed-forward's activation and whether it is gated, from `feed_forward_proj` as
/// transformers parses it (`gated-gelu` means the tanh approximation, `gelu_new`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FeedForwardKind {
    gated: bool,
    act: Act,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    GeluTanh,
    Relu,
    Silu,
}

impl Umt5Config {
    pub fn from_file(path: &Path) -> std::result::Result<Self, WanError> {
        crate::families::wan::config::read_config(path, Self::validate)
    }

    pub fn validate(&self) -> std::result::Result<(), WanError> {
        let bad = |m: String| Err(WanError::Unsupported(m));
        match self.model_type.as_deref() {
            None | Some("umt5") => {}
            Some(other) => {
                return bad(format!(
                    "text encoder `model_type` {other:?}: only \"umt5\" (every layer its own \
                     relative position bias) is supported"
                ))
            }
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            (
                "relative_attention_num_buckets",
                self.relative_attention_num_buckets,
            ),
        ] {
            if v == 0 {
                return bad(format!("text encoder `{name}` is 0"));
            }
        }
        // Bidirectional buckets: half per direction, half of those exact.
        if self.relative_attention_num_buckets < 4
            || self.relative_attention_max_distance <= self.relative_attention_num_buckets / 4
        {
            return bad(format!(
                "text encoder relative attention: {} buckets up to distance {} leave no \
                 logarithmic range",
                self.relative_attention_num_buckets, self.relative_attention_max_distance
            ));
        }
        self.feed_forward().map(|_| ())
    }

    fn feed_forward(&self) -> std::result::Result<FeedForwardKind, WanError> {
        let (gated, act) = match self.feed_forward_proj.strip_prefix("gated-") {
            Some(a) => (true, a),
            None => (false, self.feed_forward_proj.as_str()),
        };
        let act = match act {
            // transformers turns `gated-gelu` into `gelu_new`, the tanh approximation.
            "gelu" if gated => Act::GeluTanh,
            "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
            "relu" => Act::Relu,
            "silu" => Act::Silu,
            _ => {
                return Err(WanError::Unsupported(format!(
                    "text encoder `feed_forward_proj` {:?} (supported: [gated-]gelu, gelu_new, \
                     relu, silu)",
                    self.feed_forward_proj
                )))
            }
        };
        Ok(FeedForwardKind { gated, act })
    }
}

/// The bucket of a key at `offset` (key position minus query position) in bidirectional
/// relative attention: `buckets / 2` per direction, the first half of them exact offsets,
/// the rest logarithmic up to `max_distance`. The logarithm is taken in f32 as transformers
/// does: some offsets land exactly on a bucket boundary, where f64 would round differently.
pub fn relative_position_bucket(offset: i64, buckets: usize, max_distance: usize) -> u32 {
    let half = (buckets / 2) as i64;
    let base = if offset > 0 { half } else { 0 };
    let n = offset.abs();
    let max_exact = half / 2;
    if n < max_exact {
        return (base + n) as u32;
    }
    let log_ratio = (n as f32 / max_exact as f32).ln()
        / ((max_distance as f64 / max_exact as f64).ln() as f32)
        * (half - max_exact) as f32;
    (base + (max_exact + log_ratio as i64).min(half - 1)) as u32
}

/// The `[L, L]` bucket indices of a sequence of `len` tokens, row = query.
fn bucket_matrix(len: usize, cfg: &Umt5Config, device: &Device) -> Result<Tensor> {
    let (b, d) = (
        cfg.relative_attention_num_buckets,
        cfg.relative_attention_max_distance,
    );
    let idx: Vec<u32> = (0..len as i64)
        .flat_map(|q| (0..len as i64).map(move |k| relative_position_bucket(k - q, b, d)))
        .collect();
    Tensor::from_vec(idx, len * len, device)
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// `[buckets, heads]`: this layer's own table (umT5).
    bias: Embedding,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, cfg: &Umt5Config) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let table = vb.pp("relative_attention_bias").get(
            (cfg.relative_attention_num_buckets, cfg.num_heads),
            "weight",
        )?;
        Ok(Self {
            q: Linear::no_bias(vb.pp("q"), cfg.d_model, inner)?,
            k: Linear::no_bias(vb.pp("k"), cfg.d_model, inner)?,
            v: Linear::no_bias(vb.pp("v"), cfg.d_model, inner)?,
            o: Linear::no_bias(vb.pp("o"), inner, cfg.d_model)?,
            bias: Embedding::new(table, cfg.num_heads),
            heads: cfg.num_heads,
        })
    }

    /// `x` `[B, L, d]`; `buckets` `[L*L]`. Scores are not scaled by `1/sqrt(d_kv)` (T5 folds
    /// that into the initialisation) and the softmax runs in f32.
    fn forward(&self, x: &Tensor, buckets: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let h = self.heads;
        let q = split_heads(&self.q.forward(x)?, h)?;
        let k = split_heads(&self.k.forward(x)?, h)?;
        let v = split_heads(&self.v.forward(x)?, h)?;
        let position = self
            .bias
            .forward(buckets)?
            .reshape((l, l, h))?
            .permute((2, 0, 1))?
            .to_dtype(DType::F32)?;
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let scores = scores
            .reshape((b, h, l, l))?
            .broadcast_add(&position.unsqueeze(0)?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?
            .to_dtype(v.dtype())?
            .reshape((b * h, l, l))?;
        self.o.forward(&merge_heads(&probs.matmul(&v)?, b)?)
    }
}

#[derive(Debug, Clone)]
struct FeedForward {
    wi_0: Linear,
    wi_1: Option<Linear>,
    /// Kept in f32, as transformers keeps `wo` (`_keep_in_fp32_modules`).
    wo: Linear,
    kind: FeedForwardKind,
}

impl FeedForward {
    fn new(vb: VarBuilder, cfg: &Umt5Config, kind: FeedForwardKind) -> Result<Self> {
        let (d, ff) = (cfg.d_model, cfg.d_ff);
        let (wi_0, wi_1) = if kind.gated {
            (
                Linear::no_bias(vb.pp("wi_0"), d, ff)?,
                Some(Linear::no_bias(vb.pp("wi_1"), d, ff)?),
            )
        } else {
            (Linear::no_bias(vb.pp("wi"), d, ff)?, None)
        };
        let wide_dtype = wide(vb.dtype());
        let wide_vb = vb.set_dtype(wide_dtype);
        Ok(Self {
            wi_0,
            wi_1,
            wo: Linear::no_bias(wide_vb.pp("wo"), ff, d)?,
            kind,
        })
    }

    /// Returns the update in f32 (or f64), the residual stream's dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.wi_0.forward(x)?;
        let a = match self.kind.act {
            Act::GeluTanh => a.gelu()?,
            Act::Relu => a.relu()?,
            Act::Silu => a.silu()?,
        };
        let h = match &self.wi_1 {
            Some(w) => (a * w.forward(x)?)?,
            None => a,
        };
        self.wo.forward(&h.to_dtype(wide(h.dtype()))?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &Umt5Config, kind: FeedForwardKind) -> Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        let (sa, ff) = (vb.pp("layer.0"), vb.pp("layer.1"));
        Ok(Self {
            attn_norm: RmsNorm::new(sa.pp("layer_norm"), cfg.d_model, eps)?,
            attn: SelfAttention::new(sa.pp("SelfAttention"), cfg)?,
            ff_norm: RmsNorm::new(ff.pp("layer_norm"), cfg.d_model, eps)?,
            ff: FeedForward::new(ff.pp("DenseReluDense"), cfg, kind)?,
        })
    }

    /// `h` is the residual stream in the wide dtype; sublayers run in the model's `dtype`.
    /// (transformers' stream is f32 too from the first feed-forward on, as `wo` is f32.)
    fn forward(&self, h: &Tensor, buckets: &Tensor, dtype: DType) -> Result<Tensor> {
        let x = self.attn_norm.forward(h)?.to_dtype(dtype)?;
        let h = (h + self.attn.forward(&x, buckets)?.to_dtype(h.dtype())?)?;
        let x = self.ff_norm.forward(&h)?.to_dtype(dtype)?;
        h + self.ff.forward(&x)?
    }
}

/// The encoder: token embeddings, `num_layers` blocks, a final RMS norm.
#[derive(Debug, Clone)]
pub struct Umt5Encoder {
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    cfg: Umt5Config,
    dtype: DType,
}

impl Umt5Encoder {
    pub fn new(vb: VarBuilder, cfg: &Umt5Config) -> Result<Self> {
        let kind = cfg
            .feed_forward()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        // `shared` is the name transformers saves; `encoder.embed_tokens` is tied to it.
        let table = if vb.contains_tensor("shared.weight") {
            vb.pp("shared")
                .get((cfg.vocab_size, cfg.d_model), "weight")?
        } else {
            vb.pp("encoder.embed_tokens")
                .get((cfg.vocab_size, cfg.d_model), "weight")?
        };
        let enc = vb.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(enc.pp(format!("block.{i}")), cfg, kind))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed: Embedding::new(table, cfg.d_model),
            blocks,
            final_norm: RmsNorm::new(
                enc.pp("final_layer_norm"),
                cfg.d_model,
                cfg.layer_norm_epsilon,
            )?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Loads a transformers `text_encoder/` directory (`config.json` and `model.safetensors`
    /// or its sharded index).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> std::result::Result<Self, WanError> {
        use crate::families::sd::layout::{ComponentFiles, TRANSFORMERS_WEIGHTS};
        let files =
            ComponentFiles::locate(dir, TRANSFORMERS_WEIGHTS).map_err(|e| WanError::Config {
                path: dir.display().to_string(),
                message: e.to_string(),
            })?;
        let cfg = Umt5Config::from_file(&files.config)?;
        let werr = |source| WanError::Weights {
            path: files
                .weights
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            source,
        };
        // SAFETY: mapped read-only; the tensors are copied out when read (see
        // `WanTransformer::load`).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, dtype, device) }
            .map_err(werr)?;
        Self::new(vb, &cfg).map_err(werr)
    }

    pub fn config(&self) -> &Umt5Config {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.embed.embeddings().device()
    }

    /// Encoder states `[B, L, d_model]` (in the model's dtype) of token ids `[B, L]`, every
    /// token real (no padding mask: the text encoder encodes each prompt at its own length).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, l) = ids.dims2()?;
        if l == 0 {
            candle_core::bail!("umT5: an empty token sequence");
        }
        let max_id = ids.to_dtype(DType::U32)?.max_all()?.to_scalar::<u32>()? as usize;
        if max_id >= self.cfg.vocab_size {
            candle_core::bail!(
                "umT5: token id {max_id} is outside the vocabulary of {}",
                self.cfg.vocab_size
            );
        }
        let buckets = bucket_matrix(l, &self.cfg, ids.device())?;
        let mut h = self.embed.forward(ids)?.to_dtype(wide(self.dtype))?;
        for block in &self.blocks {
            h = block.forward(&h, &buckets, self.dtype)?;
        }
        self.final_norm.forward(&h)?.to_dtype(self.dtype)
    }
}
