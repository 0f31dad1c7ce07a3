//! A model resident on a device: the manifest's family loaded and ready to run batches.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::safetensors::Load as _;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use image::RgbImage;
use safetensors::SafeTensors;

use super::identity::ModelIdentity;
use super::{Manifest, ManifestError, ModelSource, SdSource, TinySource};
use crate::families::sd::layout::SdLayout;
use crate::families::sd::{SdModel, SdOptions};
use crate::families::tiny::{TinyModel, TinyTokenizer};
use crate::pipeline::{
    generate, BatchResult, BatchSpec, Generator, SamplerParams, StepObserver, Unobserved,
};

/// The loaded network of one family.
#[derive(Clone)]
pub enum FamilyModel {
    Tiny(Box<TinyModel>),
    Sd(Box<SdModel>),
}

/// A model resident on a device, ready to run batches.
#[derive(Clone)]
pub struct LoadedModel {
    pub manifest: Manifest,
    /// Content hash of the weights (`random-<seed>` for untrained random weights).
    pub version: String,
    pub trained: bool,
    pub model: FamilyModel,
    /// Bytes of the weights serving (a reload's size limit is relative to them).
    pub weights_bytes: u64,
}

impl LoadedModel {
    /// Loads what the manifest names: the tiny weights file, or the sd diffusers directory
    /// (with its single UNet file when the manifest has one).
    pub fn load(manifest: &Manifest, device: &Device) -> Result<Self, ManifestError> {
        match &manifest.source {
            ModelSource::Tiny(_) => Self::load_weights(manifest, &manifest.weights_path(), device),
            ModelSource::Sd(sd) => {
                let unet_file = sd.unet_file(&manifest.dir);
                load_sd(
                    manifest,
                    sd,
                    &sd.model_dir(&manifest.dir),
                    unet_file.as_deref(),
                    device,
                )
            }
        }
    }

    /// Loads `weights` into the manifest's model: used for the manifest's own files and for
    /// hot reloads of a new checkpoint. Tiny: a safetensors file. Sd: a single UNet
    /// safetensors file (beside the manifest's directory), or a whole diffusers directory.
    pub fn load_weights(
        manifest: &Manifest,
        weights: &Path,
        device: &Device,
    ) -> Result<Self, ManifestError> {
        match &manifest.source {
            ModelSource::Tiny(_) => load_tiny(manifest, weights, device),
            ModelSource::Sd(sd) if weights.is_dir() => load_sd(manifest, sd, weights, None, device),
            ModelSource::Sd(sd) => load_sd(
                manifest,
                sd,
                &sd.model_dir(&manifest.dir),
                Some(weights),
                device,
            ),
        }
    }

    /// Random weights (deterministic from `seed`), for tests and for serving before a model
    /// has been trained. Reported as untrained. Tiny family only.
    pub fn random(manifest: &Manifest, seed: u64, device: &Device) -> Result<Self, ManifestError> {
        let tiny = manifest.require_tiny("serving random weights")?;
        let tokenizer = TinyTokenizer::from_file(&manifest.tokenizer_path()?)?;
        let werr = |e: candle_core::Error| ManifestError::Weights {
            path: "<random>".into(),
            message: e.to_string(),
        };
        let tensors = random_tensors(manifest, tiny, &tokenizer, seed, device).map_err(werr)?;
        let weights_bytes = tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model =
            TinyModel::new(vb, &tiny.architecture, tokenizer, manifest.schedule()).map_err(werr)?;
        Ok(Self {
            manifest: manifest.clone(),
            version: format!("random-{seed}"),
            trained: false,
            model: FamilyModel::Tiny(Box::new(model)),
            weights_bytes,
        })
    }

    /// The tiny model, for the tiny-only tools (distillation, evaluation on ShapesWorld).
    pub fn tiny(&self) -> Option<&TinyModel> {
        match &self.model {
            FamilyModel::Tiny(m) => Some(m),
            FamilyModel::Sd(_) => None,
        }
    }

    pub fn generate(
        &self,
        spec: &BatchSpec,
        steps: usize,
        guidance: f32,
    ) -> candle_core::Result<BatchResult> {
        self.generate_observed(spec, steps, guidance, &mut Unobserved)
    }

    /// [`Self::generate`] under an observer that sees every step and may drop rows; the
    /// outputs are those of the rows still live at the end, in batch order.
    pub fn generate_observed(
        &self,
        spec: &BatchSpec,
        steps: usize,
        guidance: f32,
        observer: &mut dyn StepObserver,
    ) -> candle_core::Result<BatchResult> {
        let params = SamplerParams {
            kind: self.manifest.sampling.sampler,
            steps,
            guidance,
        };
        match &self.model {
            FamilyModel::Tiny(m) => generate(m.as_ref(), spec, params, observer),
            FamilyModel::Sd(m) => generate(m.as_ref(), spec, params, observer),
        }
    }

    /// Frames of an intermediate x0 estimate (a partial image), one frame list per row.
    pub fn preview(&self, x0: &candle_core::Tensor) -> candle_core::Result<Vec<Vec<RgbImage>>> {
        match &self.model {
            FamilyModel::Tiny(m) => m.frames(x0),
            FamilyModel::Sd(m) => m.frames(x0),
        }
    }
}

fn load_tiny(
    manifest: &Manifest,
    weights: &Path,
    device: &Device,
) -> Result<LoadedModel, ManifestError> {
    let tiny = manifest.require_tiny("a tiny weights file")?;
    if !weights.is_file() {
        return Err(ManifestError::MissingWeights {
            path: weights.display().to_string(),
        });
    }
    let path = weights.display().to_string();
    let werr = |message: String| ManifestError::Weights {
        path: path.clone(),
        message,
    };
    let file = std::fs::File::open(weights).map_err(|e| werr(e.to_string()))?;
    // SAFETY: the mapping is read-only and the project replaces weights files by rename,
    // never in place, so the mapped bytes do not change while they are in use.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| werr(e.to_string()))?;
    let version = crate::util::sha256_hex(&mmap)[..16].to_string();
    let file = SafeTensors::deserialize(&mmap).map_err(|e| werr(e.to_string()))?;
    let (_, header) = SafeTensors::read_metadata(&mmap).map_err(|e| werr(e.to_string()))?;
    let tokenizer = TinyTokenizer::from_file(&manifest.tokenizer_path()?)?;
    let expected: BTreeMap<String, Vec<usize>> =
        random_tensors(manifest, tiny, &tokenizer, 0, &Device::Cpu)
            .map_err(|e| werr(e.to_string()))?
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
    if let Some(found) = header
        .metadata()
        .as_ref()
        .and_then(ModelIdentity::from_metadata)
    {
        let wanted =
            ModelIdentity::of_manifest(manifest, expected.iter().map(|(n, s)| (n, s.as_slice())));
        if let Some(message) = found.mismatch(&wanted, &manifest.name, true) {
            return Err(ManifestError::Identity {
                path: path.clone(),
                message,
            });
        }
    }
    let found: BTreeMap<String, Vec<usize>> = file
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect();
    check_shapes(&expected, &found).map_err(werr)?;
    let tensors = file
        .tensors()
        .into_iter()
        .map(|(n, v)| Ok((n, v.load(device)?)))
        .collect::<candle_core::Result<HashMap<String, Tensor>>>()
        .map_err(|e| werr(e.to_string()))?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let model = TinyModel::new(vb, &tiny.architecture, tokenizer, manifest.schedule())
        .map_err(|e| werr(e.to_string()))?;
    Ok(LoadedModel {
        manifest: manifest.clone(),
        version,
        trained: true,
        model: FamilyModel::Tiny(Box::new(model)),
        weights_bytes: mmap.len() as u64,
    })
}

/// Fresh random tensors of a tiny model, by name (deterministic from `seed`). Plain
/// tensors, not `Var`s: a model over `Var`s would record a graph on every forward pass,
/// which serving never needs.
fn random_tensors(
    manifest: &Manifest,
    tiny: &TinySource,
    tokenizer: &TinyTokenizer,
    seed: u64,
    device: &Device,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let map = VarMap::new();
    let vb = crate::nn::random_var_builder(&map, seed, DType::F32, device);
    TinyModel::new(
        vb,
        &tiny.architecture,
        tokenizer.clone(),
        manifest.schedule(),
    )?;
    Ok(crate::train::named_vars(&map)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect())
}

/// Exactly the tensors the architecture has: none missing, none extra, every shape equal.
fn check_shapes(
    expected: &BTreeMap<String, Vec<usize>>,
    found: &BTreeMap<String, Vec<usize>>,
) -> Result<(), String> {
    let missing: Vec<&str> = expected
        .keys()
        .filter(|n| !found.contains_key(*n))
        .map(String::as_str)
        .collect();
    let extra: Vec<&str> = found
        .keys()
        .filter(|n| !expected.contains_key(*n))
        .map(String::as_str)
        .collect();
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|(n, s)| {
            let f = found.get(n)?;
            (f != s).then(|| format!("{n} is {f:?}, expected {s:?}"))
        })
        .collect();
    if missing.is_empty() && extra.is_empty() && wrong.is_empty() {
        return Ok(());
    }
    let few = |v: &[&str]| v.iter().take(3).copied().collect::<Vec<_>>().join(", ");
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    Err(format!(
        "the tensors do not match the architecture: {} missing ({}), {} unexpected ({}), {} \
         of the wrong shape ({})",
        missing.len(),
        few(&missing),
        extra.len(),
        few(&extra),
        wrong.len(),
        few(&wrong)
    ))
}

fn load_sd(
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
    if device.is_cpu() && (dtype.dtype() != DType::F32 || vae_dtype.dtype() != DType::F32) {
        return Err(model_err(format!(
            "dtype {dtype} (vae {vae_dtype}) is for CUDA devices; use dtype = \"f32\" on the CPU"
        )));
    }
    let sd_err = |error| ManifestError::Sd {
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
        model: FamilyModel::Sd(Box::new(model)),
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
