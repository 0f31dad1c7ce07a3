//! Loading a Wan model from its diffusers directory (and single transformer file).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use super::manifest::WanSource;
use super::{WanModel, WanOptions};
use crate::manifest::{LoadedModel, Manifest, ManifestError};

pub fn load_dir(
    manifest: &Manifest,
    wan: &WanSource,
    root: &Path,
    transformer_file: Option<&Path>,
    device: &Device,
) -> Result<LoadedModel, ManifestError> {
    let name = &manifest.name;
    let model_err = |message: String| ManifestError::Model {
        name: name.clone(),
        message,
    };
    let opts = options(manifest, wan, device)?;
    let model =
        WanModel::load(root, transformer_file, &opts, device).map_err(|e| ManifestError::Load {
            name: name.clone(),
            error: Box::new(e),
        })?;
    let m = model.size_multiple();
    for &[w, h] in &manifest.serving.sizes {
        if !w.is_multiple_of(m) || !h.is_multiple_of(m) {
            return Err(model_err(format!(
                "serving size {w}x{h} is not a multiple of {m} (the VAE's factor times the \
                 transformer's patch)"
            )));
        }
    }
    let (version, weights_bytes) = weights_hash(root, transformer_file)?;
    Ok(LoadedModel {
        manifest: manifest.clone(),
        version,
        trained: true,
        model: Arc::new(model),
        weights_bytes,
    })
}

/// How the manifest's `[wan]` table and sampling say to load the directory, or why this
/// device cannot run its precision.
pub fn options(
    manifest: &Manifest,
    wan: &WanSource,
    device: &Device,
) -> Result<WanOptions, ManifestError> {
    let (dtype, vae_dtype) = (wan.dtype, wan.vae_dtype());
    if let Some(message) = crate::families::sd::manifest::device_refuses(dtype, vae_dtype, device) {
        return Err(ManifestError::Model {
            name: manifest.name.clone(),
            message,
        });
    }
    Ok(WanOptions {
        dtype: dtype.dtype(),
        vae_dtype: vae_dtype.dtype(),
        text_max_len: wan.text_max_len,
        prompt_cache: wan.prompt_cache,
        student_timesteps: manifest
            .sampling
            .timesteps
            .as_ref()
            .map(|l| l.iter().map(|&t| t as f64).collect()),
    })
}

/// The version: a content hash of the transformer's and the VAE's weights, and the text
/// encoder's file names and sizes (umt5-xxl is 11 GB of frozen weights; reading it at every
/// start would cost more than it tells). Returns the hash and the bytes of all three.
fn weights_hash(
    root: &Path,
    transformer_file: Option<&Path>,
) -> Result<(String, u64), ManifestError> {
    use sha2::Digest;
    let files = |dir: PathBuf| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        v.sort();
        v
    };
    let hashed = match transformer_file {
        Some(f) => vec![f.to_path_buf()],
        None => files(root.join("transformer")),
    }
    .into_iter()
    .chain(files(root.join("vae")));
    let mut hasher = sha2::Sha256::new();
    let mut bytes = 0u64;
    for path in hashed {
        let werr = |e: std::io::Error| ManifestError::Weights {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let mut file = std::fs::File::open(&path).map_err(werr)?;
        bytes += std::io::copy(&mut file, &mut hasher).map_err(werr)?;
    }
    for path in files(root.join("text_encoder")) {
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        hasher.update(format!("{name}:{len}\n").as_bytes());
        bytes += len;
    }
    let hex = crate::util::hex(&hasher.finalize());
    Ok((hex[..16].to_string(), bytes))
}
