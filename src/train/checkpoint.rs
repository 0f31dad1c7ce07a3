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
    write_atomic(tensors, None, path)
}

/// A model's weights, with its identity in the file's `__metadata__` (checked on load, so
/// that one model's file cannot be served as another's).
pub fn save_weights_atomic(
    tensors: &HashMap<String, Tensor>,
    identity: &crate::manifest::identity::ModelIdentity,
    path: &Path,
) -> Result<()> {
    write_atomic(tensors, Some(identity.to_metadata()), path)
}

fn write_atomic(
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    safetensors::serialize_to_file(tensors.iter(), None, &tmp).map_err(candle_core::Error::wrap)?;
    if let Some(metadata) = metadata {
        add_sorted_metadata(&tmp, &metadata)?;
    }
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Puts `metadata` into a safetensors file's header with its keys sorted. (`safetensors`
/// writes a `HashMap` in its random order, so the same weights would give different bytes,
/// and a model version is the hash of those bytes.) The tensor data is copied, not loaded.
fn add_sorted_metadata(file: &Path, metadata: &HashMap<String, String>) -> Result<()> {
    use std::io::{Read, Seek, Write};
    let bad = |what: &str| candle_core::Error::Msg(format!("{}: {what}", file.display()));
    let mut src = std::fs::File::open(file)?;
    let mut len = [0u8; 8];
    src.read_exact(&mut len)?;
    let n = usize::try_from(u64::from_le_bytes(len)).map_err(|_| bad("header too large"))?;
    let mut header = vec![0u8; n];
    src.read_exact(&mut header)?;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(&e.to_string()))?;
    let sorted: std::collections::BTreeMap<&String, &String> = metadata.iter().collect();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(sorted).map_err(|e| bad(&e.to_string()))?,
    );
    let mut bytes = serde_json::to_vec(&header).map_err(|e| bad(&e.to_string()))?;
    // The data must start 8-byte aligned; safetensors pads its header with spaces.
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    let with = file.with_extension("meta.tmp");
    let mut dst = std::fs::File::create(&with)?;
    dst.write_all(&(bytes.len() as u64).to_le_bytes())?;
    dst.write_all(&bytes)?;
    src.seek(std::io::SeekFrom::Start(8 + n as u64))?;
    std::io::copy(&mut src, &mut dst)?;
    dst.flush()?;
    drop(dst);
    std::fs::rename(&with, file)?;
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

    #[test]
    fn weights_with_an_identity_are_the_same_bytes_every_time() -> Result<()> {
        let dev = Device::Cpu;
        let dir = std::env::temp_dir().join(format!("fewstep-ident-{}", std::process::id()));
        let t: HashMap<String, Tensor> = (0..5)
            .map(|i| Ok((format!("t{i}"), Tensor::new(&[i as f32, 1.], &dev)?)))
            .collect::<Result<_>>()?;
        let identity = crate::manifest::identity::ModelIdentity {
            family: "tiny".into(),
            architecture: "abc".into(),
            role: "student".into(),
            parent: "teacher".into(),
        };
        let files: Vec<Vec<u8>> = (0..4)
            .map(|i| {
                let path = dir.join(format!("{i}.safetensors"));
                save_weights_atomic(&t, &identity, &path)?;
                Ok(std::fs::read(&path)?)
            })
            .collect::<Result<_>>()?;
        assert!(
            files.windows(2).all(|w| w[0] == w[1]),
            "metadata order varies"
        );
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&files[0]).map_err(candle_core::Error::wrap)?;
        let meta = meta.metadata().clone().unwrap_or_default();
        assert_eq!(
            meta.get("fewstep.parent").map(String::as_str),
            Some("teacher")
        );
        let back = candle_core::safetensors::load_buffer(&files[0], &dev)?;
        assert_eq!(back["t3"].to_vec1::<f32>()?, vec![3., 1.]);
        std::fs::remove_dir_all(dir).ok();
        Ok(())
    }
}
