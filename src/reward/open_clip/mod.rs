//! OpenCLIP checkpoints for the `clip` reward, loaded directly (no conversion step): the laion
//! hub repositories (`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` and the like) and HPSv2
//! (`HPS_v2.1_compressed.pt`, an OpenCLIP ViT-H-14 fine-tune).
//!
//! The directory holds:
//! - `open_clip_config.json`: the hub form `{"model_cfg": {...}, "preprocess_cfg": {...}}`, or
//!   a bare model config (for HPSv2, a copy of open_clip's `model_configs/ViT-H-14.json`);
//! - the weights: one checkpoint of any name (`*.safetensors`, or a PyTorch pickle `*.pt`,
//!   `*.pth`, `*.bin` whose state dict may sit under `"state_dict"` with `module.` names), else
//!   the hub's `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`; transformers'
//!   own `model*.safetensors` / `pytorch_model*.bin` are not candidates;
//! - CLIP's BPE tokenizer as `tokenizer.json` (with `tokenizer_config.json` and
//!   `special_tokens_map.json`), which the laion repositories ship; for HPSv2 copy those of
//!   `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`.
//!
//! The model is `open_clip.CLIP` with a ViT image tower: the config maps onto a transformers
//! `CLIPModel` config and the tensors onto its names ([`weights`]), so the scorer is
//! [`ClipScoreReward`] itself. What differs from the `CLIPModel` path is OpenCLIP's own: ids
//! padded with 0 to the config's `context_length` (BOS, at most `context_length - 2` tokens,
//! EOT), text pooled at the largest id (EOT), and torchvision's preprocessing (its center crop
//! rounds the offset half to even where transformers floors it). open_clip's tokenizer also
//! runs `ftfy.fix_text` and HTML unescaping, which `tokenizer.json` does not: prompts with
//! mojibake or HTML entities may tokenize differently.

mod config;
mod weights;

pub use config::{OpenClipConfig, PreprocessCfg, TowerCfg};

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::ClipScoreReward;
use crate::families::sd::layout::LoadError;
use crate::families::sd::tokenizer::ClipTokenizer;

/// The config file that marks a directory as OpenCLIP's.
pub const CONFIG: &str = "open_clip_config.json";
/// The laion hub repositories' weights, safetensors first.
const HUB_WEIGHTS: [&str; 2] = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"];
const WEIGHT_EXTENSIONS: [&str; 4] = ["safetensors", "pt", "pth", "bin"];
/// OpenCLIP pads token ids with 0 (whatever `pad_token` the tokenizer files name).
const PAD_ID: u32 = 0;

/// Whether `dir` holds an OpenCLIP model (its config file).
pub fn is_open_clip_dir(dir: &Path) -> bool {
    dir.join(CONFIG).is_file()
}

/// transformers' `CLIPModel` weights, which a laion repository holds beside OpenCLIP's.
fn is_transformers_weights(name: &str) -> bool {
    name.starts_with("model.") || name.starts_with("model-") || name.starts_with("pytorch_model")
}

/// The one weights file of an OpenCLIP directory (see the module docs for the rule).
fn locate_weights(dir: &Path) -> Result<PathBuf, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut own = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| LoadError::Io {
                path: dir.to_path_buf(),
                source,
            })?
            .path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if path.is_file()
            && WEIGHT_EXTENSIONS.contains(&ext)
            && !HUB_WEIGHTS.contains(&name)
            && !is_transformers_weights(name)
        {
            own.push(path);
        }
    }
    own.sort();
    match own.len() {
        1 => return Ok(own.remove(0)),
        0 => {}
        _ => {
            let names: Vec<String> = own.iter().map(|p| p.display().to_string()).collect();
            return Err(LoadError::invalid(
                dir,
                format!(
                    "holds several OpenCLIP checkpoints ({}): keep one",
                    names.join(", ")
                ),
            ));
        }
    }
    HUB_WEIGHTS
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| LoadError::Missing {
            path: dir.join(HUB_WEIGHTS[0]),
            what: "OpenCLIP weights (open_clip_model.safetensors, \
                   open_clip_pytorch_model.bin, or one .safetensors/.pt/.pth/.bin checkpoint)"
                .into(),
        })
}

/// Loads an OpenCLIP directory as a CLIP-score reward; every error names the file (and the
/// option or tensor).
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<ClipScoreReward, LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::Missing {
            path: dir.to_path_buf(),
            what: "OpenCLIP model directory".into(),
        });
    }
    let config = dir.join(CONFIG);
    let cfg = OpenClipConfig::load(&config)?;
    let tokenizer = ClipTokenizer::load(dir)?
        .with_pad_id(PAD_ID)
        .with_max_len(cfg.context_length);
    let eos = tokenizer.eos_id() as usize;
    if eos >= cfg.vocab_size {
        return Err(LoadError::invalid(
            &dir.join("tokenizer.json"),
            format!(
                "EOT id {eos} is outside the model's vocab_size {} ({})",
                cfg.vocab_size,
                config.display()
            ),
        ));
    }
    let path = locate_weights(dir)?;
    let tensors = weights::to_clip_model(weights::read(&path, device)?, &cfg, &path)?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    ClipScoreReward::new(
        vb,
        &cfg.clip_model_config(),
        tokenizer,
        cfg.image_processor(),
        dir,
    )
    .map_err(|source| LoadError::Weights {
        files: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests;
