//! Test support: the parity fixtures under `tests/fixtures/sd/` (see `tools/parity/`) and the
//! comparison every parity test uses.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// f32 parity tolerance (max abs difference) for every compared tensor.
pub const TOLERANCE: f32 = 1e-4;

pub struct Fixture {
    pub name: String,
    /// The model directory in the diffusers layout.
    pub dir: PathBuf,
    tensors: HashMap<String, Tensor>,
    json: serde_json::Value,
}

/// Loads fixture `name`. Panics when it is absent: a parity test must not pass vacuously.
pub fn fixture(name: &str) -> Fixture {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd");
    let dir = root.join(name);
    let reference = root.join(format!("{name}.reference.safetensors"));
    let json_path = root.join(format!("{name}.reference.json"));
    assert!(
        dir.is_dir() && reference.is_file(),
        "parity fixture {name} is missing under {}: generate it with tools/parity/",
        root.display()
    );
    let tensors = candle_core::safetensors::load(&reference, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", reference.display()));
    let json = std::fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    Fixture {
        name: name.to_string(),
        dir,
        tensors,
        json,
    }
}

impl Fixture {
    pub fn tensor(&self, key: &str) -> Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture {} has no tensor {key}", self.name))
            .clone()
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// A number of the JSON's `model_summary` (e.g. `vae_scaling_factor`).
    pub fn summary_number(&self, key: &str) -> f64 {
        self.json["model_summary"][key]
            .as_f64()
            .unwrap_or_else(|| panic!("fixture {}: no model_summary.{key}", self.name))
    }

    /// The batch's prompts, as recorded in `<name>.reference.json`.
    pub fn prompts(&self) -> Vec<String> {
        self.json
            .get("prompts")
            .and_then(|p| p.as_array())
            .unwrap_or_else(|| panic!("fixture {}: no \"prompts\" in the JSON", self.name))
            .iter()
            .map(|p| p.as_str().expect("prompt string").to_string())
            .collect()
    }
}

/// Asserts `got` equals `want` within [`TOLERANCE`]; prints the max abs difference and its
/// ratio to the reference's max abs value. Returns the difference.
pub fn assert_close(label: &str, got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{label}: shape");
    let got = got.to_dtype(DType::F32).unwrap();
    let want = want.to_dtype(DType::F32).unwrap();
    let diff: f32 = (&got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let scale: f32 = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    eprintln!(
        "{label}: max abs diff {diff:.3e} (reference max abs {scale:.3e}, ratio {:.3e})",
        diff / scale.max(f32::MIN_POSITIVE)
    );
    assert!(
        diff.is_finite() && diff <= TOLERANCE,
        "{label}: max abs diff {diff:e}"
    );
    diff
}
