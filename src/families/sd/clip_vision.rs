//! The CLIP vision transformer (transformers' `CLIPVisionModel`, and the image half of
//! `CLIPModel` with its `visual_projection`), with the transformers parameter names. Patch
//! embedding as one GEMM over non-overlapping patches, a class token, learned positions, a
//! pre-LN (`pre_layrnorm`), the text tower's encoder layers without a mask, and a post-LN on
//! the class token. Every op has a backward.

use std::path::Path;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::Deserialize;

use super::clip::{parse_tower, read_tower_json, Activation, EncoderDims, EncoderLayer};
use super::layers::LayerNorm;
use super::layout::LoadError;

fn d_hidden() -> usize {
    768
}
fn d_intermediate() -> usize {
    3072
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_act() -> Activation {
    Activation::QuickGelu
}
fn d_eps() -> f64 {
    1e-5
}

/// The vision tower's config (defaults are transformers' `CLIPVisionConfig` defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// Reads a `config.json`: a `CLIPVisionConfig`, or a full `CLIPConfig` (its vision tower).
    pub fn load(path: &Path) -> std::result::Result<Self, LoadError> {
        Self::from_json(path, read_tower_json(path, "vision")?)
    }

    /// Parses and checks a vision config read from `path` (named in errors).
    pub fn from_json(path: &Path, raw: serde_json::Value) -> std::result::Result<Self, LoadError> {
        let cfg: Self = parse_tower(path, raw, Self::encoder_dims)?;
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            // transformers' stride-`patch` convolution would drop the remainder; no released
            // CLIP has one.
            return Err(LoadError::unsupported(
                path,
                format!(
                    "image_size {} is not a multiple of patch_size {}",
                    cfg.image_size, cfg.patch_size
                ),
            ));
        }
        Ok(cfg)
    }

    fn encoder_dims(&self) -> EncoderDims {
        EncoderDims {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            layers: self.num_hidden_layers,
            act: self.hidden_act,
            eps: self.layer_norm_eps,
        }
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// What the vision tower computes for a batch of pixel values.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// `num_hidden_layers + 1` tensors `[B, 1 + grid², D]`: the embeddings after
    /// `pre_layrnorm`, then each layer's output, as transformers' `hidden_states`.
    pub hidden_states: Vec<Tensor>,
    /// `[B, 1 + grid², D]`: the last layer's output (no post-LN; token 0 is the class token).
    pub last_hidden_state: Tensor,
    /// `[B, D]`: `post_layernorm` of the class token (`pooler_output`).
    pub pooled: Tensor,
    /// `[B, projection_dim]`: `visual_projection(pooled)` (with a projection only), not
    /// normalized: transformers' `get_image_features`.
    pub image_embeds: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    /// The patch convolution's kernel as a `[C * p * p, D]` GEMM operand.
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_ln: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_ln: LayerNorm,
    projection: Option<Tensor>,
    cfg: ClipVisionConfig,
}

impl ClipVisionModel {
    /// Builds the tower from `vb` rooted at the transformers state dict (`vision_model.…`);
    /// with `projection_dim`, also `visual_projection.weight` (`CLIPModel`).
    pub fn new(
        vb: VarBuilder,
        cfg: &ClipVisionConfig,
        projection_dim: Option<usize>,
    ) -> Result<Self> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let vision = vb.pp("vision_model");
        let emb = vision.pp("embeddings");
        let patch_weight = emb
            .pp("patch_embedding")
            .get_with_hints(
                (d, c, p, p),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?
            .reshape((d, c * p * p))?
            .t()?;
        let class_embedding = emb.get_with_hints(
            d,
            "class_embedding",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let positions = cfg.grid() * cfg.grid() + 1;
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (positions, d),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let eps = cfg.layer_norm_eps;
        // "layrnorm" is transformers' spelling.
        let pre_ln = LayerNorm::new(vision.pp("pre_layrnorm"), d, eps)?;
        let dims = cfg.encoder_dims();
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(vision.pp("encoder").pp("layers").pp(i), &dims))
            .collect::<Result<Vec<_>>>()?;
        let post_ln = LayerNorm::new(vision.pp("post_layernorm"), d, eps)?;
        let projection = projection_dim
            .map(|pd| {
                vb.pp("visual_projection").get_with_hints(
                    (pd, d),
                    "weight",
                    candle_nn::init::DEFAULT_KAIMING_NORMAL,
                )
            })
            .transpose()?;
        Ok(Self {
            patch_weight,
            class_embedding,
            position_embedding,
            pre_ln,
            layers,
            post_ln,
            projection,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.patch_weight.dtype()
    }

    /// `[B, C, S, S]` -> `[B, grid², C * p * p]`, each row one patch in the conv kernel's
    /// `(channel, y, x)` order, patches in raster order (the conv output's `flatten(2)`).
    fn patches(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, _, _) = pixels.dims4()?;
        let (g, p) = (self.cfg.grid(), self.cfg.patch_size);
        pixels
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, g * g, c * p * p))
    }

    /// Embeds `pixels` (`[B, C, image_size, image_size]`, already normalized).
    pub fn forward(&self, pixels: &Tensor) -> Result<ClipVisionOutput> {
        let (b, c, h, w) = pixels.dims4()?;
        let s = self.cfg.image_size;
        if (c, h, w) != (self.cfg.num_channels, s, s) {
            candle_core::bail!(
                "pixel values are [{c}, {h}, {w}] per image; the vision tower takes [{}, {s}, {s}]",
                self.cfg.num_channels
            );
        }
        let d = self.cfg.hidden_size;
        let pixels = pixels.to_dtype(self.dtype())?;
        let patches = self
            .patches(&pixels)?
            .broadcast_matmul(&self.patch_weight)?;
        let class = self.class_embedding.reshape((1, 1, d))?.repeat((b, 1, 1))?;
        let x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_ln.forward(&x)?;

        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(x.clone());
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
            hidden_states.push(x.clone());
        }
        let pooled = self.post_ln.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        let image_embeds = match &self.projection {
            Some(w) => Some(pooled.matmul(&w.t()?)?),
            None => None,
        };
        Ok(ClipVisionOutput {
            hidden_states,
            last_hidden_state: x,
            pooled,
            image_embeds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::sd::layout::{ComponentFiles, TRANSFORMERS_WEIGHTS};
    use crate::families::sd::testing::{
        assert_close, assert_every_var_has_gradient, assert_has_gradient, fixture, max_abs_diff,
    };
    use crate::nn::random_var_builder;
    use candle_core::{Device, IndexOp};
    use candle_nn::VarMap;

    fn tiny_config() -> ClipVisionConfig {
        serde_json::from_value(serde_json::json!({
            "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 12, "patch_size": 4, "hidden_act": "gelu",
        }))
        .unwrap()
    }

    #[test]
    fn vision_tower_matches_transformers() {
        let fx = fixture("clip-tiny");
        let dev = Device::Cpu;
        let files = ComponentFiles::locate(&fx.dir, TRANSFORMERS_WEIGHTS).unwrap();
        let cfg = ClipVisionConfig::load(&files.config).unwrap();
        assert_eq!((cfg.image_size, cfg.patch_size, cfg.grid()), (30, 6, 5));
        let vb = files.var_builder(DType::F32, &dev).unwrap();
        let model = ClipVisionModel::new(vb, &cfg, Some(24)).unwrap();
        let out = model.forward(&fx.tensor("pixel_values")).unwrap();
        let want = fx.tensor("vision.hidden_states");
        assert_eq!(want.dim(0).unwrap(), out.hidden_states.len());
        for (i, h) in out.hidden_states.iter().enumerate() {
            let label = format!("clip-tiny vision.hidden_states[{i}]");
            assert_close(&label, h, &want.i(i).unwrap());
        }
        let last = fx.tensor("vision.last_hidden_state");
        assert_close(
            "clip-tiny vision.last_hidden_state",
            &out.last_hidden_state,
            &last,
        );
        assert_close(
            "clip-tiny vision.pooled",
            &out.pooled,
            &fx.tensor("vision.pooled"),
        );
        let embeds = out.image_embeds.unwrap();
        assert_close(
            "clip-tiny clip.image_embeds",
            &embeds,
            &fx.tensor("clip.image_embeds"),
        );
    }

    #[test]
    fn patches_are_the_convolution_as_a_gemm() {
        // A direct stride-p convolution (candle's conv2d) against the patch GEMM.
        let map = VarMap::new();
        let dev = Device::Cpu;
        let cfg = tiny_config();
        let model = ClipVisionModel::new(random_var_builder(&map, 3, DType::F32, &dev), &cfg, None)
            .unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 12, 12), &dev).unwrap();
        let got = model
            .patches(&x)
            .unwrap()
            .broadcast_matmul(&model.patch_weight)
            .unwrap();
        let kernel = model
            .patch_weight
            .t()
            .unwrap()
            .reshape((16, 3, 4, 4))
            .unwrap();
        let conv = x.conv2d(&kernel, 0, 4, 1, 1).unwrap(); // [2, 16, 3, 3]
        let want = conv.flatten_from(2).unwrap().transpose(1, 2).unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn every_variable_and_the_pixels_get_a_gradient() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let cfg = tiny_config();
        let vb = random_var_builder(&map, 5, DType::F32, &dev);
        let model = ClipVisionModel::new(vb, &cfg, Some(8)).unwrap();
        let pixels = candle_core::Var::randn(0f32, 1.0, (2, 3, 12, 12), &dev).unwrap();
        let out = model.forward(pixels.as_tensor()).unwrap();
        // The class token alone feeds image_embeds; the other tokens reach the loss through
        // last_hidden_state.
        let loss = (out.image_embeds.unwrap().sqr().unwrap().mean_all().unwrap()
            + out.last_hidden_state.sqr().unwrap().mean_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let vars = map.data().lock().unwrap();
        assert_eq!(vars.len(), 3 + 2 + 2 * 16 + 2 + 1, "variable count");
        assert_every_var_has_gradient(&vars, &grads, "");
        assert_has_gradient(&grads, pixels.as_tensor(), "the pixels");
    }

    #[test]
    fn wrong_pixel_sizes_and_configs_are_refused() {
        let map = VarMap::new();
        let dev = Device::Cpu;
        let model = ClipVisionModel::new(
            random_var_builder(&map, 3, DType::F32, &dev),
            &tiny_config(),
            None,
        )
        .unwrap();
        let x = Tensor::zeros((1, 3, 16, 16), DType::F32, &dev).unwrap();
        let err = model.forward(&x).unwrap_err().to_string();
        assert!(err.contains("[3, 12, 12]"), "{err}");

        let path = Path::new("/models/clip/config.json");
        let raw = serde_json::json!({"image_size": 30, "patch_size": 7});
        let err = ClipVisionConfig::from_json(path, raw)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("config.json") && err.contains("patch_size"),
            "{err}"
        );
        let raw = serde_json::json!({"hidden_size": 30, "num_attention_heads": 4});
        let err = ClipVisionConfig::from_json(path, raw)
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_attention_heads"), "{err}");
    }
}
