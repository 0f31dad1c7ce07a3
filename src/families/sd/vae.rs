//! diffusers' `AutoencoderKL` (the SD / SDXL VAE) with the diffusers parameter names: the
//! encoder gives the posterior's mean and log-variance, the decoder maps latents to images.
//! Every op has a backward (conv2d, nearest upsampling by 2, zero padding, the composed group
//! norm, SiLU, the one-pass softmax), so a decoder in the loss can be differentiated.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::layers::{upsample_nearest, Conv2d, GroupNorm};
use super::layout::{read_json, ComponentFiles, LoadError, DIFFUSERS_WEIGHTS};
use crate::nn::fused_attention::attend;
use crate::nn::Linear;

/// diffusers builds every VAE norm with this epsilon (`resnet_eps`), whatever the config says.
const EPS: f64 = 1e-6;

fn d_three() -> usize {
    3
}
fn d_latent() -> usize {
    4
}
fn d_blocks() -> Vec<usize> {
    vec![64]
}
fn d_one() -> usize {
    1
}
fn d_groups() -> usize {
    32
}
fn d_act() -> String {
    "silu".into()
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

/// The VAE's `config.json` (defaults are diffusers' `AutoencoderKL` defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: usize,
    #[serde(default = "d_three")]
    pub out_channels: usize,
    #[serde(default = "d_latent")]
    pub latent_channels: usize,
    #[serde(default = "d_blocks")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    pub fn load(path: &Path) -> std::result::Result<Self, LoadError> {
        let cfg: Self = read_json(path)?;
        cfg.validate().map_err(|m| LoadError::invalid(path, m))?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.act_fn != "silu" {
            return Err(format!(
                "act_fn {:?} (only \"silu\" is supported)",
                self.act_fn
            ));
        }
        let groups = self.norm_num_groups;
        if groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| !c.is_multiple_of(groups))
        {
            return Err(format!(
                "block_out_channels {:?} are not multiples of norm_num_groups {groups}",
                self.block_out_channels
            ));
        }
        for (key, types, want) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            // An absent list means the default blocks, one per entry of block_out_channels.
            if !types.is_empty() && (types.len() != n || types.iter().any(|t| t != want)) {
                return Err(format!(
                    "{key} {types:?}: expected {n} x {want:?} (one per block_out_channels entry)"
                ));
            }
        }
        Ok(())
    }

    /// Image pixels per latent pixel along each side: 2 per block after the first.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// diffusers' `ResnetBlock2D` without a time embedding.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        let shortcut = if cin != cout {
            Some(Conv2d::same(vb.pp("conv_shortcut"), cin, cout, 1)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, cin, EPS)?,
            conv1: Conv2d::same(vb.pp("conv1"), cin, cout, 3)?,
            norm2: GroupNorm::new(vb.pp("norm2"), groups, cout, EPS)?,
            conv2: Conv2d::same(vb.pp("conv2"), cout, cout, 3)?,
            shortcut,
        })
    }
}

impl Module for ResnetBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        match &self.shortcut {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// The mid block's single-head spatial self-attention (diffusers' `Attention` with
/// `to_q`/`to_k`/`to_v`/`to_out.0`) and its residual.
#[derive(Debug, Clone)]
struct AttentionBlock {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, EPS)?,
            q: Linear::new(vb.pp("to_q"), channels, channels)?,
            k: Linear::new(vb.pp("to_k"), channels, channels)?,
            v: Linear::new(vb.pp("to_v"), channels, channels)?,
            out: Linear::new(vb.pp("to_out").pp(0), channels, channels)?,
        })
    }
}

impl Module for AttentionBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // [B, C, H, W] -> [B, HW, C]: one token per pixel.
        let tokens = self.norm.forward(x)?.flatten_from(2)?.transpose(1, 2)?;
        let q = self.q.forward(&tokens)?;
        let k = self.k.forward(&tokens)?;
        let v = self.v.forward(&tokens)?;
        let o = self.out.forward(&attend(&q, &k, &v, 1, None)?)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        x + o
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, attention, resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResnetBlock,
    attention: Option<AttentionBlock>,
    resnet1: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let attention = if cfg.mid_block_add_attention {
            Some(AttentionBlock::new(vb.pp("attentions").pp(0), channels, g)?)
        } else {
            None
        };
        Ok(Self {
            resnet0: ResnetBlock::new(vb.pp("resnets").pp(0), channels, channels, g)?,
            attention,
            resnet1: ResnetBlock::new(vb.pp("resnets").pp(1), channels, channels, g)?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnet0.forward(x)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnet1.forward(&x)
    }
}

/// How a block changes the resolution after its resnets.
#[derive(Debug, Clone, Copy)]
enum Resample {
    /// A stride-2 convolution (`downsamplers.0.conv`).
    Down,
    /// Nearest 2x upsampling and a convolution (`upsamplers.0.conv`).
    Up,
}

/// `down_blocks.i` / `up_blocks.i`: resnets, then (except for the last block) a resample.
#[derive(Debug, Clone)]
struct Block {
    resnets: Vec<ResnetBlock>,
    resample: Option<(Resample, Conv2d)>,
}

impl Block {
    fn new(
        vb: VarBuilder,
        (cin, cout): (usize, usize),
        resnets: usize,
        groups: usize,
        resample: Option<Resample>,
    ) -> Result<Self> {
        let resnets = (0..resnets)
            .map(|j| {
                let c = if j == 0 { cin } else { cout };
                ResnetBlock::new(vb.pp("resnets").pp(j), c, cout, groups)
            })
            .collect::<Result<Vec<_>>>()?;
        let resample = match resample {
            None => None,
            Some(Resample::Down) => {
                let conv = vb.pp("downsamplers").pp(0).pp("conv");
                Some((Resample::Down, Conv2d::new(conv, cout, cout, 3, 2, 0)?))
            }
            Some(Resample::Up) => {
                let conv = vb.pp("upsamplers").pp(0).pp("conv");
                Some((Resample::Up, Conv2d::same(conv, cout, cout, 3)?))
            }
        };
        Ok(Self { resnets, resample })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        match &self.resample {
            None => Ok(x),
            // diffusers pads right and bottom by one, then convolves with no padding.
            Some((Resample::Down, conv)) => {
                conv.forward(&x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)
            }
            Some((Resample::Up, conv)) => {
                // Not candle's upsample_nearest2d: its backward drops gradient contributions.
                let (_, _, h, w) = x.dims4()?;
                conv.forward(&upsample_nearest(&x, 2 * h, 2 * w)?)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<Block>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let conv_in = Conv2d::same(vb.pp("conv_in"), cfg.in_channels, ch[0], 3)?;
        let mut down = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let resample = (i + 1 < ch.len()).then_some(Resample::Down);
            let vb = vb.pp("down_blocks").pp(i);
            down.push(Block::new(
                vb,
                (cin, cout),
                cfg.layers_per_block,
                g,
                resample,
            )?);
            cin = cout;
        }
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::new(vb.pp("mid_block"), last, cfg)?,
            norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, last, EPS)?,
            conv_out: Conv2d::same(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3)?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for block in &self.down {
            x = block.forward(&x)?;
        }
        let x = self.mid.forward(&x)?;
        self.conv_out.forward(&self.norm_out.forward(&x)?.silu()?)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let conv_in = Conv2d::same(vb.pp("conv_in"), cfg.latent_channels, reversed[0], 3)?;
        let mid = MidBlock::new(vb.pp("mid_block"), reversed[0], cfg)?;
        let mut up = Vec::with_capacity(reversed.len());
        let mut cin = reversed[0];
        for (i, &cout) in reversed.iter().enumerate() {
            let resample = (i + 1 < reversed.len()).then_some(Resample::Up);
            let vb = vb.pp("up_blocks").pp(i);
            let n = cfg.layers_per_block + 1;
            up.push(Block::new(vb, (cin, cout), n, g, resample)?);
            cin = cout;
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, first, EPS)?,
            conv_out: Conv2d::same(vb.pp("conv_out"), first, cfg.out_channels, 3)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = self.mid.forward(&self.conv_in.forward(z)?)?;
        for block in &self.up {
            x = block.forward(&x)?;
        }
        self.conv_out.forward(&self.norm_out.forward(&x)?.silu()?)
    }
}

/// The encoder's diagonal Gaussian posterior (diffusers' `latent_dist`), unscaled.
#[derive(Debug, Clone)]
pub struct Posterior {
    /// `[B, latent_channels, H/f, W/f]`
    pub mean: Tensor,
    /// Same shape, clamped to `[-30, 20]` as diffusers does.
    pub logvar: Tensor,
}

impl Posterior {
    /// A draw `mean + exp(logvar / 2) * noise` (`noise` standard normal, same shape).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.logvar * 0.5)?.exp()?.mul(noise)?
    }
}

#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    cfg: VaeConfig,
}

impl AutoencoderKl {
    /// Builds the VAE from `vb` rooted at the diffusers state dict (`encoder.…`, `decoder.…`).
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let l = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::same(vb.pp("quant_conv"), 2 * l, 2 * l, 1)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::same(vb.pp("post_quant_conv"), l, l, 1)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            cfg: cfg.clone(),
        })
    }

    /// Loads a `vae/` folder (`config.json`, `diffusion_pytorch_model.safetensors`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> std::result::Result<Self, LoadError> {
        Self::from_files(
            &ComponentFiles::locate(dir, DIFFUSERS_WEIGHTS)?,
            dtype,
            device,
        )
    }

    pub fn from_files(
        files: &ComponentFiles,
        dtype: DType,
        device: &Device,
    ) -> std::result::Result<Self, LoadError> {
        let cfg = VaeConfig::load(&files.config)?;
        let vb = files.var_builder(dtype, device)?;
        // Checkpoints saved before diffusers 0.14 name the attention `query`/`key`/`value`/
        // `proj_attn`; diffusers renames them on load, this loader asks for a re-save.
        for part in ["encoder", "decoder"] {
            let old = format!("{part}.mid_block.attentions.0.query.weight");
            if vb.contains_tensor(&old) {
                return Err(LoadError::unsupported(
                    &files.weights[0],
                    format!(
                        "old attention names ({old}, key, value, proj_attn); re-save the VAE \
                         with a recent diffusers to get to_q/to_k/to_v/to_out.0"
                    ),
                ));
            }
        }
        Self::new(vb, &cfg).map_err(|e| files.weights_error(e))
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The posterior of `image` (`[B, in_channels, H, W]`, values in [-1, 1]; H and W
    /// multiples of [`VaeConfig::downsample_factor`]).
    pub fn encode(&self, image: &Tensor) -> Result<Posterior> {
        let f = self.cfg.downsample_factor();
        let (_, _, h, w) = image.dims4()?;
        if !h.is_multiple_of(f) || !w.is_multiple_of(f) {
            candle_core::bail!("image size {h}x{w} is not a multiple of the VAE's factor {f}");
        }
        let mut moments = self.encoder.forward(image)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.cfg.latent_channels;
        Ok(Posterior {
            mean: moments.narrow(1, 0, l)?,
            logvar: moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?,
        })
    }

    /// The image (`[B, out_channels, H, W]`, nominally [-1, 1], not clamped) of unscaled
    /// latents `z`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Latents in the diffusion model's space -> the VAE's: `z / scaling_factor + shift_factor`.
    pub fn unscale_latents(&self, z: &Tensor) -> Result<Tensor> {
        (z / self.cfg.scaling_factor)? + self.cfg.shift_factor.unwrap_or(0.0)
    }

    /// The VAE's latents -> the diffusion model's: `(z - shift_factor) * scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        (z - self.cfg.shift_factor.unwrap_or(0.0))? * self.cfg.scaling_factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::sd::testing::{
        assert_close, assert_every_var_has_gradient, assert_mentions, assert_near_f32,
        edited_weights, fixture, max_abs_diff,
    };
    use crate::nn::random_var_builder;
    use candle_nn::VarMap;
    use std::collections::HashMap;

    #[test]
    fn vae_matches_diffusers() {
        let dev = Device::Cpu;
        for name in ["sd15-tiny", "sd2-tiny", "sdxl-tiny"] {
            let fx = fixture(name);
            let vae = AutoencoderKl::load(&fx.dir.join("vae"), DType::F32, &dev).unwrap();
            let cfg = vae.config();
            assert_eq!(cfg.scaling_factor, fx.summary_number("vae_scaling_factor"));
            assert_eq!(
                cfg.downsample_factor() as f64,
                fx.summary_number("vae_scale")
            );
            let decoded = vae.decode(&fx.tensor("vae.latents")).unwrap();
            assert_close(
                &format!("{name} vae.decoded"),
                &decoded,
                &fx.tensor("vae.decoded"),
            );
            let post = vae.encode(&fx.tensor("vae.image")).unwrap();
            let label = format!("{name} vae.posterior_mean");
            assert_close(&label, &post.mean, &fx.tensor("vae.posterior_mean"));
            let label = format!("{name} vae.posterior_logvar");
            assert_close(&label, &post.logvar, &fx.tensor("vae.posterior_logvar"));
        }
    }

    #[test]
    fn half_precision_stays_close_to_f32() {
        let fx = fixture("sdxl-tiny");
        let latents = fx.tensor("vae.latents");
        let run = |dtype| {
            let vae = AutoencoderKl::load(&fx.dir.join("vae"), dtype, &Device::Cpu).unwrap();
            let z = latents.to_dtype(dtype).unwrap();
            vae.decode(&z).unwrap().to_dtype(DType::F32).unwrap()
        };
        let full = run(DType::F32);
        // candle's CPU conv2d has no bf16 matmul; bf16 is for the GPU.
        let half = run(DType::F16);
        assert_near_f32("F16 vae decode", &half, &full, 0.05);
    }

    fn tiny_config(attention: bool) -> VaeConfig {
        serde_json::from_value(serde_json::json!({
            "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "scaling_factor": 0.5, "shift_factor": 0.1, "mid_block_add_attention": attention,
        }))
        .unwrap()
    }

    #[test]
    fn shapes_and_scaling() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let cfg = tiny_config(false);
        assert_eq!(cfg.downsample_factor(), 2);
        let vae = AutoencoderKl::new(random_var_builder(&map, 0, DType::F32, &dev), &cfg).unwrap();
        let image = Tensor::randn(0f32, 1.0, (1, 3, 8, 12), &dev).unwrap();
        let post = vae.encode(&image).unwrap();
        assert_eq!(post.mean.dims(), &[1, 4, 4, 6]);
        assert_eq!(vae.decode(&post.mean).unwrap().dims(), &[1, 3, 8, 12]);
        assert!(vae.encode(&image.narrow(3, 0, 11).unwrap()).is_err());
        let z = vae.scale_latents(&post.mean).unwrap();
        let back = vae.unscale_latents(&z).unwrap();
        let noise = Tensor::zeros_like(&post.mean).unwrap();
        let same = post.sample(&noise).unwrap();
        assert_eq!(max_abs_diff(&same, &post.mean), 0.0);
        assert!(max_abs_diff(&back, &post.mean) < 1e-6);
    }

    #[test]
    fn every_variable_gets_a_gradient() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vae = AutoencoderKl::new(
            random_var_builder(&map, 3, DType::F32, &dev),
            &tiny_config(true),
        )
        .unwrap();
        let image = Tensor::randn(0f32, 1.0, (2, 3, 8, 8), &dev).unwrap();
        let post = vae.encode(&image).unwrap();
        let decoded = vae.decode(&post.mean).unwrap();
        let loss = (decoded.sqr().unwrap().mean_all().unwrap()
            + post.logvar.sqr().unwrap().mean_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        let vars = map.data().lock().unwrap();
        assert!(vars.len() > 60, "{} variables", vars.len());
        assert_every_var_has_gradient(&vars, &grads, "");
    }

    /// A scratch copy of the sd15 fixture's VAE with its weights edited.
    fn edited_vae(
        tag: &str,
        edit: impl FnOnce(&mut HashMap<String, Tensor>),
    ) -> std::path::PathBuf {
        let src = fixture("sd15-tiny").dir.join("vae");
        let weights = "diffusion_pytorch_model.safetensors";
        edited_weights(&src, weights, &format!("vae-{tag}"), edit)
    }

    #[test]
    fn bad_weights_name_the_file_and_the_tensor() {
        let load_err = |dir: &std::path::Path| {
            AutoencoderKl::load(dir, DType::F32, &Device::Cpu)
                .unwrap_err()
                .to_string()
        };
        let weights = "diffusion_pytorch_model.safetensors";
        let key = "decoder.up_blocks.0.resnets.1.conv2.weight";
        let dir = edited_vae("missing", |t| {
            t.remove(key).unwrap();
        });
        assert_mentions(&load_err(&dir), &[weights, key]);
        std::fs::remove_dir_all(&dir).unwrap();

        let key = "encoder.conv_in.weight";
        let dir = edited_vae("shape", |t| {
            t.insert(
                key.into(),
                Tensor::zeros((1, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
            );
        });
        assert_mentions(&load_err(&dir), &[weights, key, "shape"]);
        std::fs::remove_dir_all(&dir).unwrap();

        // Pre-0.14 attention names get a pointed message.
        let dir = edited_vae("old-names", |t| {
            let p = "encoder.mid_block.attentions.0";
            for (new, old) in [
                ("to_q", "query"),
                ("to_k", "key"),
                ("to_v", "value"),
                ("to_out.0", "proj_attn"),
            ] {
                for s in ["weight", "bias"] {
                    let v = t.remove(&format!("{p}.{new}.{s}")).unwrap();
                    t.insert(format!("{p}.{old}.{s}"), v);
                }
            }
        });
        assert_mentions(&load_err(&dir), &["query", "to_q"]);
        std::fs::remove_dir_all(&dir).unwrap();

        let dir = std::env::temp_dir().join(format!("fewstep-sd-vae-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), r#"{"act_fn": "relu"}"#).unwrap();
        std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), "").unwrap();
        assert_mentions(&load_err(&dir), &["config.json", "relu"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
