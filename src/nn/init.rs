//! Deterministic parameter initialization.
//!
//! candle's `VarMap` draws initial values from the device RNG, which cannot be seeded on the
//! CPU. This backend draws each parameter from a host RNG seeded by the run seed and the
//! parameter's name, so a model built twice with the same seed has the same weights.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

struct SeededVarMap {
    map: VarMap,
    seed: u64,
    /// When > 0, zero-initialized tensors get normal noise of this std instead, so that an
    /// untrained model is not the identity (tests of the serving path need real compute).
    zero_std: f64,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a: stable across platforms and releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn sample(init: Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = shape.elem_count();
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| {
        let z: f64 = StandardNormal.sample(rng);
        (mean + std * z) as f32
    };
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => (0..n).map(|_| normal(rng, mean, stdev)).collect(),
        Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => (0..n).map(|_| normal(rng, 0.0, std)).collect(),
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    (0..n).map(|_| rng.random_range(-b..b) as f32).collect()
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.map.data().lock().expect("var map lock poisoned");
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!("shape mismatch for {name}: {:?} vs {s:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(name_seed(self.seed, name));
        let h = match h {
            Init::Const(v) if v == 0.0 && self.zero_std > 0.0 => Init::Randn {
                mean: 0.0,
                stdev: self.zero_std,
            },
            other => other,
        };
        let values = sample(h, &s, &mut rng);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self.map.data().lock().expect("var map lock poisoned");
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .expect("var map lock poisoned")
            .contains_key(name)
    }
}

/// A `VarBuilder` that creates trainable variables in `map`, initialized deterministically
/// from `seed` and each variable's name. Variables already in `map` are reused as they are.
pub fn seeded_var_builder(
    map: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    builder(map, seed, 0.0, dtype, device)
}

/// Like [`seeded_var_builder`], but zero-initialized tensors (adaLN-Zero gates, output heads)
/// get small random values too, so an untrained model computes something non-trivial.
pub fn random_var_builder(
    map: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    builder(map, seed, 0.05, dtype, device)
}

fn builder(
    map: &VarMap,
    seed: u64,
    zero_std: f64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        map: map.clone(),
        seed,
        zero_std,
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}
