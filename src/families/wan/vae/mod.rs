//! diffusers' `AutoencoderKLWan`, the Wan2.1 video VAE, loaded from `vae/` in the diffusers
//! layout (parameter names are diffusers' state-dict names).
//!
//! Both directions run the way diffusers does, a few frames at a time with a causal feature
//! cache: decode one latent frame per step (1 video frame for the first, 4 for each later
//! one), encode the first video frame alone and then groups of 4. Each causal conv keeps only
//! its last two input frames between steps, so activation memory is bounded by one latent
//! frame's worth, whatever the video length. The cache lives in the call, so every call
//! starts fresh.
//!
//! Latents come in two spaces. The VAE's own ("raw") latents are what [`WanVae::decode_raw`]
//! takes and [`WanVae::encode_raw`] gives; the transformer works on normalised ones,
//! `(raw - latents_mean) / latents_std` per channel ([`WanVae::normalize_latents`],
//! [`WanVae::denormalize_latents`]). [`WanVae::decode`] and [`WanVae::encode`] take and give
//! normalised latents.
//!
//! Tensors: videos `[B, C, T, H, W]` in `[-1, 1]`, latents `[B, z_dim, F, H/8, W/8]`, with
//! `T = 1 + 4 (F - 1)`. On the CPU use f32 or f16 (candle has no bf16 conv2d there).
//!
//! Unlike diffusers, `encode` refuses a frame count off the `4k + 1` grid (diffusers drops
//! the trailing frames silently) and a height or width that is not a multiple of 8 (the
//! decoder could not give it back). Spatial tiling is not implemented.

mod blocks;
mod causal_conv;
pub mod config;
mod decoder;
mod encoder;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use self::causal_conv::{swap_time_and_channels, CausalConv3d, FrameCache};
use self::config::TEMPORAL_FACTOR;
use self::decoder::Decoder;
use self::encoder::Encoder;
use crate::families::sd::unet::weight_files;
pub use config::WanVaeConfig;

/// Errors of loading or running the Wan VAE.
#[derive(Debug, thiserror::Error)]
pub enum WanVaeError {
    #[error("invalid Wan VAE config {path}: {message}")]
    Config { path: String, message: String },
    #[error("unsupported Wan VAE config `{field}: {value}`: {reason}")]
    Unsupported {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "no Wan VAE weights at {path}: expected a directory holding config.json and \
         diffusion_pytorch_model.safetensors (or its sharded index)"
    )]
    MissingWeights { path: String },
    #[error("cannot load Wan VAE weights {path}: {source}")]
    Weights {
        path: String,
        source: candle_core::Error,
    },
    /// A tensor the VAE cannot take (shape, channels, frame count).
    #[error("Wan VAE: {0}")]
    Input(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, WanVaeError>;

/// The encoder's diagonal Gaussian over raw latents (diffusers' `latent_dist`).
#[derive(Debug, Clone)]
pub struct WanPosterior {
    /// `[B, z_dim, F, h, w]`.
    pub mean: Tensor,
    /// Clamped to `[-30, 20]` as diffusers does.
    pub logvar: Tensor,
}

/// The Wan video VAE.
#[derive(Debug, Clone)]
pub struct WanVae {
    cfg: WanVaeConfig,
    dtype: DType,
    encoder: Encoder,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    decoder: Decoder,
    /// `latents_mean` and `latents_std` as `[1, z, 1, 1, 1]` f32.
    latents_mean: Tensor,
    latents_std: Tensor,
}

impl WanVae {
    /// Builds the model from `vb` (a diffusers state dict, or fresh variables).
    pub fn new(vb: VarBuilder, cfg: &WanVaeConfig) -> Result<Self> {
        cfg.validate()?;
        let z = cfg.z_dim;
        let stat = |v: &[f64]| -> Result<Tensor> {
            let v: Vec<f32> = v.iter().map(|x| *x as f32).collect();
            Ok(Tensor::from_vec(v, (1, z, 1, 1, 1), vb.device())?)
        };
        Ok(Self {
            dtype: vb.dtype(),
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            quant_conv: CausalConv3d::new(vb.pp("quant_conv"), 2 * z, 2 * z, (1, 1, 1), 0)?,
            post_quant_conv: CausalConv3d::new(vb.pp("post_quant_conv"), z, z, (1, 1, 1), 0)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            latents_mean: stat(&cfg.latents_mean)?,
            latents_std: stat(&cfg.latents_std)?,
            cfg: cfg.clone(),
        })
    }

    /// Loads `dir/config.json` and the weights beside it. A missing tensor or a wrong shape
    /// names the tensor.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = WanVaeConfig::from_file(&dir.join("config.json"))?;
        let files = weight_files(dir).map_err(|_| WanVaeError::MissingWeights {
            path: dir.display().to_string(),
        })?;
        let shown = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let werr = |source| WanVaeError::Weights {
            path: shown.clone(),
            source,
        };
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on
        // them not being truncated or rewritten while the model is built (tensors are copied
        // out of the mapping when read).
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(werr)?;
        Self::new(vb, &cfg).map_err(|e| match e {
            WanVaeError::Tensor(source) => werr(source),
            other => other,
        })
    }

    pub fn config(&self) -> &WanVaeConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Normalised latents (the transformer's) -> raw latents: `latents / (1 / std) + mean`,
    /// WanPipeline's arithmetic before `vae.decode`, in the latents' dtype.
    pub fn denormalize_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let (mean, inv_std) = self.stats(latents)?;
        Ok(latents.broadcast_div(&inv_std)?.broadcast_add(&mean)?)
    }

    /// Raw latents (the encoder's mean) -> normalised: `(z - mean) * (1 / std)`.
    pub fn normalize_latents(&self, z: &Tensor) -> Result<Tensor> {
        let (mean, inv_std) = self.stats(z)?;
        Ok(z.broadcast_sub(&mean)?.broadcast_mul(&inv_std)?)
    }

    /// `latents_mean` and `1 / latents_std` in `x`'s dtype, after checking `x`'s channels.
    fn stats(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check_latents(x)?;
        let dtype = x.dtype();
        let inv_std = self.latents_std.to_dtype(dtype)?.recip()?;
        Ok((self.latents_mean.to_dtype(dtype)?, inv_std))
    }

    /// Normalised latents `[B, z_dim, F, h, w]` -> video `[B, out_channels, 1 + 4 (F - 1),
    /// 8h, 8w]` in `[-1, 1]`, in the VAE's dtype: [`Self::denormalize_latents`] then
    /// [`Self::decode_raw`].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let latents = latents.to_dtype(self.dtype)?;
        self.decode_raw(&self.denormalize_latents(&latents)?)
    }

    /// diffusers' `AutoencoderKLWan.decode(z).sample`: raw latents to a video clamped to
    /// `[-1, 1]`, one latent frame at a time.
    pub fn decode_raw(&self, z: &Tensor) -> Result<Tensor> {
        let (_, _, frames, _, _) = self.check_latents(z)?;
        let z = swap_time_and_channels(&z.to_dtype(self.dtype)?)?;
        let mut cache = FrameCache::default();
        let mut out = Vec::with_capacity(frames);
        for i in 0..frames {
            cache.begin_chunk();
            let frame = self.post_quant_conv.pointwise(&z.narrow(1, i, 1)?)?;
            out.push(self.decoder.forward(&frame, &mut cache)?);
        }
        let video = swap_time_and_channels(&Tensor::cat(&out, 1)?)?;
        Ok(video.clamp(-1.0, 1.0)?)
    }

    /// Video `[B, in_channels, 1 + 4k, H, W]` (H, W multiples of 8) -> normalised latents
    /// `[B, z_dim, 1 + k, H/8, W/8]`: the posterior's mean, normalised. What distillation
    /// uses as real latents.
    pub fn encode(&self, video: &Tensor) -> Result<Tensor> {
        self.normalize_latents(&self.encode_raw(video)?.mean)
    }

    /// diffusers' `AutoencoderKLWan.encode(video).latent_dist`: the first frame alone, then
    /// groups of 4, through the encoder with its cache.
    pub fn encode_raw(&self, video: &Tensor) -> Result<WanPosterior> {
        let frames = self.check_video(video)?;
        let x = swap_time_and_channels(&video.to_dtype(self.dtype)?)?;
        let mut cache = FrameCache::default();
        let mut out = Vec::new();
        let mut start = 0;
        while start < frames {
            let len = if start == 0 { 1 } else { TEMPORAL_FACTOR };
            cache.begin_chunk();
            let h = self
                .encoder
                .forward(&x.narrow(1, start, len)?, &mut cache)?;
            out.push(self.quant_conv.pointwise(&h)?);
            start += len;
        }
        let h = swap_time_and_channels(&Tensor::cat(&out, 1)?)?;
        let z = self.cfg.z_dim;
        Ok(WanPosterior {
            mean: h.narrow(1, 0, z)?,
            logvar: h.narrow(1, z, z)?.clamp(-30.0, 20.0)?,
        })
    }

    /// Checks latents `[B, z_dim, F, h, w]`; returns the dims.
    fn check_latents(&self, z: &Tensor) -> Result<(usize, usize, usize, usize, usize)> {
        let Ok(dims) = z.dims5() else {
            return Err(WanVaeError::Input(format!(
                "latents must be [B, C, F, H, W], got {:?}",
                z.dims()
            )));
        };
        let (b, c, f, h, w) = dims;
        if c != self.cfg.z_dim {
            return Err(WanVaeError::Input(format!(
                "latents have {c} channels, the VAE's z_dim is {}",
                self.cfg.z_dim
            )));
        }
        if b == 0 || f == 0 || h == 0 || w == 0 {
            return Err(WanVaeError::Input(format!("empty latents {:?}", z.dims())));
        }
        Ok(dims)
    }

    /// Checks a video `[B, in_channels, 1 + 4k, H, W]`; returns its frame count.
    fn check_video(&self, video: &Tensor) -> Result<usize> {
        let Ok((b, c, t, h, w)) = video.dims5() else {
            return Err(WanVaeError::Input(format!(
                "a video must be [B, C, T, H, W], got {:?}",
                video.dims()
            )));
        };
        if c != self.cfg.in_channels {
            return Err(WanVaeError::Input(format!(
                "the video has {c} channels, the VAE takes {}",
                self.cfg.in_channels
            )));
        }
        if b == 0 {
            return Err(WanVaeError::Input("an empty batch of videos".into()));
        }
        if self.cfg.latent_frames(t).is_none() {
            return Err(WanVaeError::Input(format!(
                "a video of {t} frames is off the 4k + 1 grid (1, 5, 9, ...): the encoder \
                 takes the first frame alone, then groups of 4"
            )));
        }
        let s = self.cfg.spatial_factor();
        if h == 0 || w == 0 || h % s != 0 || w % s != 0 {
            return Err(WanVaeError::Input(format!(
                "a {h}x{w} video: height and width must be positive multiples of {s}"
            )));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests;
