//! Loading a tiny model: its weights file checked against the architecture (tensor names and
//! shapes, and the recorded identity when the file has one), or random weights.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::safetensors::Load as _;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use safetensors::SafeTensors;

use super::manifest::{flow_schedule, video_flow_schedule, TinySource};
use super::{TinyModel, TinyTokenizer};
use crate::manifest::identity::ModelIdentity;
use crate::manifest::{check_shapes, LoadedModel, Manifest, ManifestError};

/// Random weights (deterministic from `seed`), for tests and for serving before a model has
/// been trained. Reported as untrained.
pub fn random(
    manifest: &Manifest,
    seed: u64,
    device: &Device,
) -> Result<LoadedModel, ManifestError> {
    let tiny = TinySource::of(manifest, "serving random weights")?;
    let tokenizer = TinyTokenizer::from_file(&tiny.tokenizer_path(&manifest.dir))?;
    let werr = |e: candle_core::Error| ManifestError::Weights {
        path: "<random>".into(),
        message: e.to_string(),
    };
    let tensors = random_tensors(manifest, tiny, &tokenizer, seed, device).map_err(werr)?;
    let weights_bytes = tensors
        .values()
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum();
    let model = model_of(manifest, tiny, tokenizer, tensors, device).map_err(werr)?;
    Ok(LoadedModel {
        manifest: manifest.clone(),
        version: format!("random-{seed}"),
        trained: false,
        model: Arc::new(model),
        weights_bytes,
    })
}

pub fn load_file(
    manifest: &Manifest,
    weights: &Path,
    device: &Device,
) -> Result<LoadedModel, ManifestError> {
    let tiny = TinySource::of(manifest, "a tiny weights file")?;
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
    let tokenizer = TinyTokenizer::from_file(&tiny.tokenizer_path(&manifest.dir))?;
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
    let model =
        model_of(manifest, tiny, tokenizer, tensors, device).map_err(|e| werr(e.to_string()))?;
    Ok(LoadedModel {
        manifest: manifest.clone(),
        version,
        trained: true,
        model: Arc::new(model),
        weights_bytes: mmap.len() as u64,
    })
}

/// The servable model over `tensors` (plain tensors, checked by the caller).
fn model_of(
    manifest: &Manifest,
    tiny: &TinySource,
    tokenizer: TinyTokenizer,
    tensors: HashMap<String, Tensor>,
    device: &Device,
) -> candle_core::Result<TinyModel> {
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Ok(TinyModel::new(
        vb,
        &tiny.architecture,
        tokenizer,
        flow_schedule(&manifest.sampling),
    )?
    .with_video_schedule(video_flow_schedule(&manifest.sampling)))
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
        flow_schedule(&manifest.sampling),
    )?;
    Ok(crate::train::named_vars(&map)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{BatchSpec, Generator, SamplerKind, SamplerParams};

    /// `sampling.video_shift` reaches the sampler of videos only: with the same weights and
    /// seeds, images come out identical and videos differ.
    #[test]
    fn video_shift_samples_videos_only_with_its_schedule() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let mut plain = Manifest::find(&dir, "tiny-shapes-teacher").unwrap();
        // Whatever the shipped manifest says, images at 1 and videos at 1 or 3.
        plain.sampling.shift = 1.0;
        plain.sampling.video_shift = None;
        let mut shifted = plain.clone();
        shifted.sampling.video_shift = Some(3.0);
        let generate = |m: &Manifest, frames: usize| {
            let loaded = random(m, 7, &Device::Cpu).unwrap();
            let model = loaded.model.as_any().downcast_ref::<TinyModel>().unwrap();
            assert_eq!(model.schedule_for_frames(1).shift, m.sampling.shift);
            let video = m.sampling.video_shift.unwrap_or(m.sampling.shift);
            assert_eq!(model.schedule_for_frames(8).shift, video);
            let spec = BatchSpec {
                prompts: vec!["a red circle moving left".into()],
                negative_prompts: vec![String::new()],
                seeds: vec![5],
                frames,
                width: 32,
                height: 32,
            };
            let params = SamplerParams {
                kind: SamplerKind::Euler,
                steps: 3,
                guidance: 1.0,
                guidance_interval: None,
                eta: 1.0,
            };
            model.generate(&spec, params).unwrap().outputs
        };
        assert_eq!(generate(&plain, 1), generate(&shifted, 1));
        assert_ne!(generate(&plain, 8), generate(&shifted, 8));
    }
}
