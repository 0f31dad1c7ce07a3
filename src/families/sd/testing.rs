//! Test support: the parity fixtures under `tests/fixtures/sd/` (see `tools/parity/`) and the
//! comparison every parity test uses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

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

/// The largest absolute value of `t`, in f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .and_then(|t| t.abs()?.max_all()?.to_scalar())
        .unwrap()
}

/// The largest absolute difference of two same-shaped tensors, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())
}

/// Asserts `got` equals `want` within [`TOLERANCE`]; prints the max abs difference and its
/// ratio to the reference's max abs value. Returns the difference.
pub fn assert_close(label: &str, got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{label}: shape");
    let diff = max_abs_diff(got, want);
    let scale = max_abs(want);
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

/// Asserts a reduced-precision result `got` is within `fraction` of the f32 result `full`'s
/// max abs value, and prints both figures.
pub fn assert_near_f32(label: &str, got: &Tensor, full: &Tensor, fraction: f32) {
    let diff = max_abs_diff(got, full);
    let scale = max_abs(full);
    eprintln!("{label}: max abs diff {diff:.3e} (scale {scale:.3e})");
    assert!(diff < fraction * scale, "{label}: {diff}");
}

/// Asserts `t` got a finite, non-zero gradient in `grads`.
pub fn assert_has_gradient(grads: &GradStore, t: &Tensor, label: &str) {
    let g = grads
        .get(t)
        .unwrap_or_else(|| panic!("no gradient for {label}"));
    let s: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(s.is_finite() && s > 0.0, "gradient of {label} is {s}");
}

/// [`assert_has_gradient`] for every variable of a `VarMap`'s data.
pub fn assert_every_var_has_gradient(vars: &HashMap<String, Var>, grads: &GradStore, what: &str) {
    for (name, var) in vars {
        assert_has_gradient(grads, var.as_tensor(), &format!("{what}{name}"));
    }
}

/// Asserts the error message `err` mentions every one of `parts`.
pub fn assert_mentions(err: &str, parts: &[&str]) {
    assert!(parts.iter().all(|p| err.contains(p)), "{err}");
}

/// A scratch copy of model folder `src` (its `config.json` and `weights`, a safetensors file
/// name) with the weights edited by `edit`; `tag` keeps concurrent tests apart.
pub fn edited_weights(
    src: &Path,
    weights: &str,
    tag: &str,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fewstep-sd-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut tensors = candle_core::safetensors::load(src.join(weights), &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join(weights)).unwrap();
    dir
}
