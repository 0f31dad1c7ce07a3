//! diffusers' `unet/config.json` for `UNet2DConditionModel`, and the per-block plan derived
//! from it. Only the options that SD1.x, SD2.x and SDXL (and their students) use are
//! supported; any other value is rejected with a message naming the key.

use std::path::Path;

use serde::Deserialize;

use super::UNetError;

/// A config value that diffusers accepts either once for all blocks or as a per-block list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged, expecting = "a value or a list of values, one per block")]
pub enum PerBlock<T> {
    One(T),
    List(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    /// The value of each of `n` blocks.
    fn expand(&self, n: usize, key: &str) -> Result<Vec<T>, UNetError> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::List(l) if l.len() == n => Ok(l.clone()),
            Self::List(l) => Err(unsupported(format!(
                "`{key}` lists {} values ({l:?}) for {n} blocks",
                l.len()
            ))),
        }
    }
}

/// `UNet2DConditionModel`'s config. Keys that only affect other pipelines (`sample_size`,
/// `upcast_attention`, `addition_embed_type_num_heads`, ...) are accepted and ignored;
/// unknown keys too, as diffusers writes many.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    #[serde(default = "no_per_block")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two_per_block")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "one_f64")]
    pub mid_block_scale_factor: f64,
    /// Not applied: all released SD configs train without dropout.
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// Despite its name, the number of attention heads of each block when
    /// `num_attention_heads` is unset (a naming mistake diffusers keeps for compatibility).
    #[serde(default = "eight_per_block")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    /// `"text_time"` (SDXL) adds an embedding of the pooled text and the `time_ids`.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Ignored: attention softmax always runs in f32 (see `attention.rs`).
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "one_f64")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    #[serde(default = "default_str")]
    pub attention_type: String,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

fn four() -> usize {
    4
}
fn three() -> usize {
    3
}
fn one_usize() -> usize {
    1
}
fn one_f64() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn thirty_two() -> Option<usize> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn silu() -> String {
    "silu".into()
}
fn default_str() -> String {
    "default".into()
}
fn positional() -> String {
    "positional".into()
}
fn no_per_block() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn one_per_block() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn two_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn eight_per_block() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_cross_attention_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn default_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_down_blocks() -> Vec<String> {
    ["CrossAttnDownBlock2D"; 3]
        .into_iter()
        .chain(["DownBlock2D"])
        .map(String::from)
        .collect()
}
fn default_up_blocks() -> Vec<String> {
    ["UpBlock2D"]
        .into_iter()
        .chain(["CrossAttnUpBlock2D"; 3])
        .map(String::from)
        .collect()
}
fn default_mid_block() -> Option<String> {
    Some(MID_CROSS_ATTN.into())
}

const DOWN_CROSS_ATTN: &str = "CrossAttnDownBlock2D";
const DOWN_PLAIN: &str = "DownBlock2D";
const UP_CROSS_ATTN: &str = "CrossAttnUpBlock2D";
const UP_PLAIN: &str = "UpBlock2D";
const MID_CROSS_ATTN: &str = "UNetMidBlock2DCrossAttn";

fn unsupported(message: String) -> UNetError {
    UNetError::Unsupported(message)
}

/// The cross-attention part of a block: `Transformer2DModel`s with this many layers.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnSpec {
    pub heads: usize,
    pub layers: usize,
    pub cross_dim: usize,
}

/// A down block: `layers` resnets (each followed by a transformer when `attn` is set) and
/// an optional stride-2 convolution.
#[derive(Debug, Clone, PartialEq)]
pub struct DownSpec {
    pub in_ch: usize,
    pub out_ch: usize,
    pub layers: usize,
    pub attn: Option<AttnSpec>,
    pub downsample: bool,
}

/// The middle block: resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct MidSpec {
    pub ch: usize,
    pub attn: AttnSpec,
}

/// An up block: `layers` resnets over the concatenation with a skip connection (each
/// followed by a transformer when `attn` is set) and an optional upsampler.
#[derive(Debug, Clone, PartialEq)]
pub struct UpSpec {
    pub prev_out_ch: usize,
    pub in_ch: usize,
    pub out_ch: usize,
    pub layers: usize,
    pub attn: Option<AttnSpec>,
    pub upsample: bool,
}

/// Everything `UNet::new` needs, resolved per block the way diffusers does.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetPlan {
    pub groups: usize,
    pub time_embed_dim: usize,
    /// `(addition_time_embed_dim, projection_class_embeddings_input_dim)` for `text_time`.
    pub text_time: Option<(usize, usize)>,
    pub down: Vec<DownSpec>,
    pub mid: Option<MidSpec>,
    pub up: Vec<UpSpec>,
}

impl UNetConfig {
    /// Reads and checks `unet/config.json`.
    pub fn from_file(path: &Path) -> Result<Self, UNetError> {
        let err = |message: String| UNetError::Config {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        cfg.plan().map_err(|e| err(e.to_string()))?;
        Ok(cfg)
    }

    /// Whether the UNet takes SDXL's added conditioning (`text_embeds`, `time_ids`).
    pub fn uses_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// Checks the config and resolves the per-block values.
    pub fn plan(&self) -> Result<UNetPlan, UNetError> {
        self.check_unsupported()?;
        let n = self.down_block_types.len();
        if n == 0 || self.up_block_types.len() != n || self.block_out_channels.len() != n {
            return Err(unsupported(format!(
                "`down_block_types` ({}), `up_block_types` ({}) and `block_out_channels` ({}) \
                 must have the same, non-zero length",
                n,
                self.up_block_types.len(),
                self.block_out_channels.len()
            )));
        }
        let groups = self
            .norm_num_groups
            .ok_or_else(|| unsupported("`norm_num_groups: null` (no output norm)".into()))?;
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let tlayers = self
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let cross = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        // diffusers' naming quirk: `attention_head_dim` is the head count unless
        // `num_attention_heads` is given.
        let heads = match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads")?,
            None => self.attention_head_dim.expand(n, "attention_head_dim")?,
        };
        if heads.contains(&0) {
            return Err(unsupported("zero attention heads".into()));
        }
        let ch = &self.block_out_channels;
        let attn = |i: usize| AttnSpec {
            heads: heads[i],
            layers: tlayers[i],
            cross_dim: cross[i],
        };

        let mut down = Vec::with_capacity(n);
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let has_attn = match kind.as_str() {
                DOWN_CROSS_ATTN => true,
                DOWN_PLAIN => false,
                other => {
                    return Err(unsupported(format!(
                        "down block type {other:?} (supported: {DOWN_CROSS_ATTN}, {DOWN_PLAIN})"
                    )))
                }
            };
            down.push(DownSpec {
                in_ch: if i == 0 { ch[0] } else { ch[i - 1] },
                out_ch: ch[i],
                layers: layers[i],
                attn: has_attn.then(|| attn(i)),
                downsample: i + 1 < n,
            });
        }

        let mid = match self.mid_block_type.as_deref() {
            None => None,
            Some(MID_CROSS_ATTN) => Some(MidSpec {
                ch: ch[n - 1],
                attn: attn(n - 1),
            }),
            Some(other) => {
                return Err(unsupported(format!(
                    "mid block type {other:?} (supported: {MID_CROSS_ATTN} or null)"
                )))
            }
        };

        let mut up = Vec::with_capacity(n);
        for (i, kind) in self.up_block_types.iter().enumerate() {
            let has_attn = match kind.as_str() {
                UP_CROSS_ATTN => true,
                UP_PLAIN => false,
                other => {
                    return Err(unsupported(format!(
                        "up block type {other:?} (supported: {UP_CROSS_ATTN}, {UP_PLAIN})"
                    )))
                }
            };
            // Up blocks mirror the down blocks: per-block lists are read reversed.
            let r = n - 1 - i;
            up.push(UpSpec {
                prev_out_ch: if i == 0 { ch[n - 1] } else { ch[r + 1] },
                in_ch: ch[r.saturating_sub(1)],
                out_ch: ch[r],
                layers: layers[r] + 1,
                attn: has_attn.then(|| attn(r)),
                upsample: i + 1 < n,
            });
        }

        let text_time = if self.uses_text_time() {
            let time = self.addition_time_embed_dim.ok_or_else(|| {
                unsupported(
                    "`addition_embed_type: text_time` needs `addition_time_embed_dim`".into(),
                )
            })?;
            let proj = self.projection_class_embeddings_input_dim.ok_or_else(|| {
                unsupported(
                    "`addition_embed_type: text_time` needs `projection_class_embeddings_input_dim`"
                        .into(),
                )
            })?;
            Some((time, proj))
        } else {
            None
        };

        Ok(UNetPlan {
            groups,
            time_embed_dim: self.time_embedding_dim.unwrap_or(4 * ch[0]),
            text_time,
            down,
            mid,
            up,
        })
    }

    /// Rejects the options of `UNet2DConditionModel` that this implementation lacks.
    fn check_unsupported(&self) -> Result<(), UNetError> {
        let mut bad = Vec::new();
        let mut require = |ok: bool, what: String| {
            if !ok {
                bad.push(what);
            }
        };
        let only_cross = match &self.only_cross_attention {
            PerBlock::One(v) => *v,
            PerBlock::List(l) => l.iter().any(|v| *v),
        };
        require(!only_cross, "`only_cross_attention: true`".into());
        require(
            self.mid_block_only_cross_attention != Some(true),
            "`mid_block_only_cross_attention: true`".into(),
        );
        require(
            matches!(self.act_fn.as_str(), "silu" | "swish"),
            format!("`act_fn: {:?}` (only silu)", self.act_fn),
        );
        require(
            self.resnet_time_scale_shift == "default",
            format!(
                "`resnet_time_scale_shift: {:?}`",
                self.resnet_time_scale_shift
            ),
        );
        require(
            !self.resnet_skip_time_act,
            "`resnet_skip_time_act: true`".into(),
        );
        require(
            self.resnet_out_scale_factor == 1.0,
            format!(
                "`resnet_out_scale_factor: {}`",
                self.resnet_out_scale_factor
            ),
        );
        require(
            self.time_embedding_type == "positional",
            format!("`time_embedding_type: {:?}`", self.time_embedding_type),
        );
        require(
            self.time_embedding_act_fn.is_none(),
            "`time_embedding_act_fn`".into(),
        );
        require(
            self.timestep_post_act.is_none(),
            "`timestep_post_act`".into(),
        );
        require(
            self.time_cond_proj_dim.is_none(),
            "`time_cond_proj_dim` (LCM guidance embedding)".into(),
        );
        require(
            self.class_embed_type.is_none() && self.num_class_embeds.is_none(),
            "class embeddings (`class_embed_type`, `num_class_embeds`)".into(),
        );
        require(
            !self.class_embeddings_concat,
            "`class_embeddings_concat: true`".into(),
        );
        require(
            self.encoder_hid_dim.is_none() && self.encoder_hid_dim_type.is_none(),
            "`encoder_hid_dim` projections".into(),
        );
        require(
            matches!(
                self.addition_embed_type.as_deref(),
                None | Some("text_time")
            ),
            format!(
                "`addition_embed_type: {:?}` (only text_time)",
                self.addition_embed_type
            ),
        );
        require(
            !self.dual_cross_attention,
            "`dual_cross_attention: true`".into(),
        );
        require(
            self.attention_type == "default",
            format!("`attention_type: {:?}`", self.attention_type),
        );
        require(
            self.cross_attention_norm.is_none(),
            "`cross_attention_norm`".into(),
        );
        require(
            self.reverse_transformer_layers_per_block.is_none(),
            "`reverse_transformer_layers_per_block` (asymmetric UNet)".into(),
        );
        require(
            self.conv_in_kernel % 2 == 1 && self.conv_out_kernel % 2 == 1,
            "even `conv_in_kernel` / `conv_out_kernel`".into(),
        );
        if bad.is_empty() {
            Ok(())
        } else {
            Err(unsupported(bad.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDXL: &str = r#"{
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0",
        "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
        "center_input_sample": false, "class_embed_type": null, "class_embeddings_concat": false,
        "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
        "cross_attention_norm": null,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
        "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_only_cross_attention": null,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": null,
        "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": false, "resnet_time_scale_shift": "default", "sample_size": 128,
        "time_cond_proj_dim": null, "time_embedding_act_fn": null, "time_embedding_dim": null,
        "time_embedding_type": "positional", "timestep_post_act": null,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": null, "use_linear_projection": true
    }"#;

    #[test]
    fn sdxl_config_resolves_heads_layers_and_the_text_time_embedding() {
        // Real SDXL configs have `upcast_attention: null` and other nulls.
        let cfg: UNetConfig = serde_json::from_str(SDXL).unwrap();
        let plan = cfg.plan().unwrap();
        assert_eq!(plan.text_time, Some((256, 2816)));
        assert_eq!(plan.time_embed_dim, 1280);
        assert!(plan.down[0].attn.is_none());
        let a = plan.down[2].attn.clone().unwrap();
        assert_eq!((a.heads, a.layers, a.cross_dim), (20, 10, 2048));
        assert_eq!(plan.mid.as_ref().unwrap().attn.layers, 10);
        // Up block 0 mirrors down block 2: 20 heads, 10 layers, 3 resnets.
        let u = &plan.up[0];
        assert_eq!(
            (u.prev_out_ch, u.in_ch, u.out_ch, u.layers),
            (1280, 640, 1280, 3)
        );
        assert_eq!(u.attn.as_ref().unwrap().heads, 20);
        assert_eq!((plan.up[2].in_ch, plan.up[2].out_ch), (320, 320));
        assert!(plan.up[2].attn.is_none() && !plan.up[2].upsample);
    }

    #[test]
    fn defaults_are_sd15_and_bad_values_are_named() {
        let cfg: UNetConfig = serde_json::from_str(r#"{"cross_attention_dim": 768}"#).unwrap();
        let plan = cfg.plan().unwrap();
        assert_eq!(plan.down.len(), 4);
        assert_eq!(plan.down[0].attn.as_ref().unwrap().heads, 8);
        assert!(plan.text_time.is_none());

        let cfg: UNetConfig = serde_json::from_str(
            r#"{"time_cond_proj_dim": 256, "down_block_types":
                ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#,
        )
        .unwrap();
        let err = cfg.plan().unwrap_err().to_string();
        assert!(err.contains("time_cond_proj_dim"), "{err}");
        let cfg: UNetConfig = serde_json::from_str(
            r#"{"down_block_types":
                ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#,
        )
        .unwrap();
        let err = cfg.plan().unwrap_err().to_string();
        assert!(err.contains("SimpleCrossAttnDownBlock2D"), "{err}");
        let cfg: UNetConfig = serde_json::from_str(r#"{"attention_head_dim": [8, 8]}"#).unwrap();
        let err = cfg.plan().unwrap_err().to_string();
        assert!(err.contains("attention_head_dim"), "{err}");
        let text_time_without_dims: UNetConfig =
            serde_json::from_str(r#"{"addition_embed_type": "text_time"}"#).unwrap();
        assert!(text_time_without_dims.plan().is_err());
    }

    #[test]
    fn a_bad_config_file_names_the_file() {
        let dir = std::env::temp_dir().join(format!("fewstep-unet-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, r#"{"transformer_layers_per_block": [[1, 2], [3]]}"#).unwrap();
        let err = UNetConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        let missing = UNetConfig::from_file(&dir.join("nope.json")).unwrap_err();
        assert!(missing.to_string().contains("nope.json"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
