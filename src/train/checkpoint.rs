//! Atomic, single-file checkpoints: every tensor of a training run (weights, EMA, optimizer
//! moments) plus a JSON metadata blob, in one safetensors file written through a rename.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;

const META_KEY: &str = "__meta_json__";

pub struct Checkpoint;

impl Checkpoint {
    /// Saves `groups` (prefix, tensors by name) and `meta` to `path` atomically: the file is
    /// either the previous checkpoint or the new one, never a mix.
    pub fn save<M: Serialize>(
        path: &Path,
        meta: &M,
        groups: &[(&str, &HashMap<String, Tensor>)],
    ) -> Result<()> {
        let mut all: HashMap<String, Tensor> = HashMap::new();
        for (prefix, tensors) in groups {
            for (name, t) in tensors.iter() {
                all.insert(format!("{prefix}{name}"), t.clone());
            }
        }
        let json = serde_json::to_vec(meta).map_err(candle_core::Error::wrap)?;
        let n = json.len();
        all.insert(META_KEY.into(), Tensor::from_vec(json, n, &Device::Cpu)?);
        save_tensors_atomic(&all, path)
    }

    /// Loads a checkpoint: its metadata and, per prefix, the tensors that carry it (prefix
    /// stripped).
    pub fn load<M: DeserializeOwned>(
        path: &Path,
        prefixes: &[&str],
        device: &Device,
    ) -> Result<(M, Vec<HashMap<String, Tensor>>)> {
        let mut all = candle_core::safetensors::load(path, device)?;
        let meta = all.remove(META_KEY).ok_or_else(|| {
            candle_core::Error::Msg(format!("{} has no metadata", path.display()))
        })?;
        let meta: M = serde_json::from_slice(&meta.to_dtype(DType::U8)?.to_vec1::<u8>()?)
            .map_err(candle_core::Error::wrap)?;
        let mut out = vec![HashMap::new(); prefixes.len()];
        for (name, t) in all {
            if let Some((i, p)) = prefixes
                .iter()
                .enumerate()
                .find(|(_, p)| name.starts_with(*p))
            {
                out[i].insert(name[p.len()..].to_string(), t);
            }
        }
        Ok((meta, out))
    }
}

/// `candle_core::safetensors::save` through a temporary file, fsync and rename.
pub fn save_tensors_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_groups_and_metadata() -> Result<()> {
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("fewstep-ckpt-{}", std::process::id()));
        let path = dir.join("c.safetensors");
        let a: HashMap<String, Tensor> =
            [("w".to_string(), Tensor::new(&[1f32, 2.], &dev)?)].into();
        let b: HashMap<String, Tensor> =
            [("w".to_string(), Tensor::new(&[3f32, 4.], &dev)?)].into();
        Checkpoint::save(
            &path,
            &serde_json::json!({"step": 7}),
            &[("p.", &a), ("e.", &b)],
        )?;
        let (meta, groups): (serde_json::Value, _) = Checkpoint::load(&path, &["p.", "e."], &dev)?;
        assert_eq!(meta["step"], 7);
        assert_eq!(groups[1]["w"].to_vec1::<f32>()?, vec![3., 4.]);
        std::fs::remove_dir_all(dir).ok();
        Ok(())
    }
}
