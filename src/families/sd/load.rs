//! Loading a Stable Diffusion model from its diffusers directory (and single UNet file).

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;

use super::layout::SdLayout;
use super::manifest::SdSource;
use super::{SdModel, SdOptions};
use crate::manifest::{LoadedModel, Manifest, ManifestError};

pub fn load_dir(
    manifest: &Manifest,
    sd: &SdSource,
    root: &Path,
    unet_file: Option<&Path>,
    device: &Device,
) -> Result<LoadedModel, ManifestError> {
    let name = &manifest.name;
    let model_err = |message: String| ManifestError::Model {
        name: name.clone(),
        message,
    };
    let (dtype, vae_dtype) = (sd.dtype, sd.vae_dtype());
    if let Some(why) = crate::families::sd::manifest::device_refuses(dtype, vae_dtype, device) {
        return Err(model_err(why));
    }
    let sd_err = |error: super::layout::LoadError| ManifestError::Load {
        name: name.clone(),
        error: Box::new(error),
    };
    let layout = SdLayout::open(root, unet_file).map_err(sd_err)?;
    let (version, weights_bytes) = weights_hash(&layout)?;
    let opts = SdOptions {
        dtype: dtype.dtype(),
        vae_dtype: vae_dtype.dtype(),
        student_timesteps: manifest.sampling.timesteps.clone(),
    };
    let model = SdModel::load(&layout, &opts, device).map_err(sd_err)?;
    let m = model.size_multiple();
    for &[w, h] in &manifest.serving.sizes {
        if !w.is_multiple_of(m) || !h.is_multiple_of(m) {
            return Err(model_err(format!(
                "serving size {w}x{h} is not a multiple of {m} (the VAE's factor times the \
                 UNet's downsampling)"
            )));
        }
    }
    Ok(LoadedModel {
        manifest: manifest.clone(),
        version,
        trained: true,
        model: Arc::new(model),
        weights_bytes,
    })
}

/// The content hash and total size of every weights file of an sd model (UNet, VAE, text
/// encoders).
fn weights_hash(layout: &SdLayout) -> Result<(String, u64), ManifestError> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut bytes = 0u64;
    let components = [&layout.unet, &layout.vae, &layout.text_encoder]
        .into_iter()
        .chain(layout.text_encoder_2.as_ref());
    for path in components.flat_map(|c| &c.weights) {
        let werr = |e: std::io::Error| ManifestError::Weights {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        // Streamed, so multi-GB files need no extra memory.
        let mut file = std::fs::File::open(path).map_err(werr)?;
        bytes += std::io::copy(&mut file, &mut hasher).map_err(werr)?;
    }
    let hex = crate::util::hex(&hasher.finalize());
    Ok((hex[..16].to_string(), bytes))
}
