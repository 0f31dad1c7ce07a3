//! UNet tests: gradients through tiny random UNets, and parity with diffusers on the
//! fixtures of `tests/fixtures/sd/` (written by `tools/parity/`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;

use super::*;
use crate::families::sd::testing::{max_abs, max_abs_diff};

/// An SDXL-shaped tiny UNet: a plain first block, text_time conditioning, linear
/// projections, several transformer layers, heads given per block.
fn tiny_sdxl_config() -> UNetConfig {
    serde_json::from_str(
        r#"{
        "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [1, 2], "transformer_layers_per_block": [1, 2],
        "cross_attention_dim": 12, "use_linear_projection": true,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 4,
        "projection_class_embeddings_input_dim": 30
    }"#,
    )
    .expect("valid config")
}

/// An SD1.5-shaped tiny UNet: 1x1-conv projections, one head count for all blocks.
fn tiny_sd15_config() -> UNetConfig {
    serde_json::from_str(
        r#"{
        "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 2, "cross_attention_dim": 12
    }"#,
    )
    .expect("valid config")
}

/// Standard normal values from a seeded RNG (candle's CPU `randn` cannot be seeded).
pub(super) fn randn(seed: u64, shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)
}

pub(super) struct Inputs {
    pub sample: Tensor,
    pub t: Tensor,
    pub context: Tensor,
    pub added: Option<AddedCond>,
}

fn inputs(cfg: &UNetConfig, dtype: DType, dev: &Device) -> Result<Inputs> {
    let added = if cfg.uses_text_time() {
        let time_ids = Tensor::new(
            &[[16f32, 16., 0., 0., 16., 16.], [8., 8., 2., 0., 8., 8.]],
            dev,
        )?;
        Some(AddedCond {
            text_embeds: randn(1, &[2, 6], dtype, dev)?,
            time_ids,
        })
    } else {
        None
    };
    Ok(Inputs {
        sample: randn(2, &[2, 4, 8, 8], dtype, dev)?,
        t: Tensor::new(&[999f32, 10.0], dev)?,
        context: randn(3, &[2, 5, 12], dtype, dev)?,
        added,
    })
}

pub(super) fn loss(unet: &UNet, x: &Inputs, weights: &Tensor) -> Result<Tensor> {
    let out = unet.forward(&x.sample, &x.t, &x.context, x.added.as_ref())?;
    (out * weights)?.sum_all()
}

/// Every variable gets a finite, non-zero gradient, and the gradient agrees with a central
/// finite difference along a random direction (in f64), which catches wrong backwards.
fn check_gradients(cfg: &UNetConfig) -> Result<()> {
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = crate::nn::seeded_var_builder(&map, 7, DType::F64, &dev);
    let unet = UNet::new(vb, cfg)?;
    let x = inputs(cfg, DType::F64, &dev)?;
    let weights = randn(4, &[2, 4, 8, 8], DType::F64, &dev)?;
    let vars = crate::train::named_vars(&map);
    assert!(vars.len() > 50, "only {} variables", vars.len());
    assert_correct_gradients(&unet, &vars, &x, &weights)
}

/// The body of [`check_gradients`] for any f64 `unet` and its trainable `vars`.
pub(super) fn assert_correct_gradients(
    unet: &UNet,
    vars: &[(String, candle_core::Var)],
    x: &Inputs,
    weights: &Tensor,
) -> Result<()> {
    let dev = Device::Cpu;
    let grads = loss(unet, x, weights)?.backward()?;
    let mut directional = 0f64;
    // The sum of |g_i . d_i|: the terms can cancel in `directional`, while the finite
    // difference's rounding error scales with the terms.
    let mut magnitude = 0f64;
    let mut directions = Vec::new();
    for (i, (name, var)) in vars.iter().enumerate() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let abs = g.abs()?.sum_all()?.to_scalar::<f64>()?;
        assert!(abs.is_finite() && abs > 0.0, "gradient of {name}: {abs}");
        let d = randn(100 + i as u64, var.dims(), DType::F64, &dev)?;
        let term = (g * &d)?.sum_all()?.to_scalar::<f64>()?;
        directional += term;
        magnitude += term.abs();
        directions.push(d);
    }
    let eps = 1e-6;
    let shifted = |sign: f64| -> Result<f64> {
        let originals = vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<Result<Vec<_>>>()?;
        for ((_, v), (d, o)) in vars.iter().zip(directions.iter().zip(&originals)) {
            v.set(&(o + (d * (sign * eps))?)?)?;
        }
        let l = loss(unet, x, weights)?.to_scalar::<f64>()?;
        for ((_, v), o) in vars.iter().zip(&originals) {
            v.set(o)?;
        }
        Ok(l)
    };
    let numeric = (shifted(1.0)? - shifted(-1.0)?) / (2.0 * eps);
    let rel = (numeric - directional).abs() / magnitude.max(1e-12);
    assert!(
        rel < 1e-5,
        "directional derivative: autograd {directional}, finite difference {numeric}, \
         relative to sum |terms| {magnitude}: {rel:e}"
    );
    Ok(())
}

#[test]
fn every_variable_of_a_tiny_sdxl_unet_gets_a_correct_gradient() -> Result<()> {
    check_gradients(&tiny_sdxl_config())
}

#[test]
fn every_variable_of_a_tiny_sd15_unet_gets_a_correct_gradient() -> Result<()> {
    check_gradients(&tiny_sd15_config())
}

#[test]
fn rows_use_their_own_timestep_and_sdxl_requires_added_conditioning() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = tiny_sdxl_config();
    let map = VarMap::new();
    let unet = UNet::new(
        crate::nn::random_var_builder(&map, 1, DType::F32, &dev),
        &cfg,
    )?;
    let x = inputs(&cfg, DType::F32, &dev)?;
    let both = unet.forward(&x.sample, &x.t, &x.context, x.added.as_ref())?;
    assert_eq!(both.dims(), &[2, 4, 8, 8]);
    // Row 1 alone at its own timestep equals row 1 of the batch.
    let row = |t: &Tensor| t.narrow(0, 1, 1);
    let added = x.added.as_ref().expect("sdxl");
    let one = AddedCond {
        text_embeds: row(&added.text_embeds)?,
        time_ids: row(&added.time_ids)?,
    };
    let single = unet.forward(&row(&x.sample)?, &row(&x.t)?, &row(&x.context)?, Some(&one))?;
    let diff = max_abs_diff(&row(&both)?, &single);
    assert!(diff < 1e-5, "{diff}");
    // A different timestep for that row changes its output.
    let t = Tensor::new(&[999f32, 500.0], &dev)?;
    let other = unet.forward(&x.sample, &t, &x.context, x.added.as_ref())?;
    let moved = max_abs_diff(&row(&both)?, &row(&other)?);
    assert!(moved > 1e-4, "{moved}");
    // Sizes that are not a multiple of the downsampling upsample to the skip's size.
    let odd = randn(5, &[1, 4, 9, 7], DType::F32, &dev)?;
    let out = unet.forward(&odd, &row(&x.t)?, &row(&x.context)?, Some(&one))?;
    assert_eq!(out.dims(), &[1, 4, 9, 7]);
    let err = unet.forward(&x.sample, &x.t, &x.context, None).unwrap_err();
    assert!(err.to_string().contains("time_ids"), "{err}");
    Ok(())
}

#[test]
fn loading_names_the_file_and_the_missing_or_misshapen_tensor() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = tiny_sd15_config();
    let map = VarMap::new();
    UNet::new(
        crate::nn::seeded_var_builder(&map, 2, DType::F32, &dev),
        &cfg,
    )?;
    let mut tensors: HashMap<String, Tensor> = crate::train::named_vars(&map)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect();
    let dir = std::env::temp_dir().join(format!("fewstep-unet-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&tensors, &file)?;
    // The directory form and the file form both load.
    UNet::load(&dir, &cfg, DType::F32, &dev).expect("loads from the directory");
    UNet::load(&file, &cfg, DType::F32, &dev).expect("loads from the file");

    let name = "mid_block.attentions.0.proj_in.weight";
    let removed = tensors.remove(name).expect("sd15 uses a conv proj_in");
    candle_core::safetensors::save(&tensors, &file)?;
    let err = UNet::load(&dir, &cfg, DType::F32, &dev)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(name) && err.contains("diffusion_pytorch_model"),
        "{err}"
    );

    tensors.insert(name.into(), removed.narrow(0, 0, 8)?);
    candle_core::safetensors::save(&tensors, &file)?;
    let err = UNet::load(&dir, &cfg, DType::F32, &dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains(name) && err.contains("shape"), "{err}");

    let err = UNet::load(&dir.join("absent"), &cfg, DType::F32, &dev).unwrap_err();
    assert!(err.to_string().contains("absent"), "{err}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd")
}

/// Runs the `unet.out.K` cases of one fixture and returns `(K, max abs diff, ref max abs)`.
fn unet_parity(name: &str) -> Vec<(usize, f32, f32)> {
    let dir = fixtures().join(name);
    let reference = fixtures().join(format!("{name}.reference.safetensors"));
    assert!(
        dir.is_dir() && reference.is_file(),
        "parity fixture {name} missing under {} (written by tools/parity/)",
        fixtures().display()
    );
    let dev = Device::Cpu;
    let cfg = UNetConfig::from_file(&dir.join("unet/config.json")).expect("config");
    let unet = UNet::load(&dir.join("unet"), &cfg, DType::F32, &dev).expect("weights");
    let r = candle_core::safetensors::load(&reference, &dev).expect("reference");
    let get = |k: &str| {
        r.get(k)
            .unwrap_or_else(|| panic!("{} lacks {k}", reference.display()))
            .clone()
    };
    let added = cfg.uses_text_time().then(|| AddedCond {
        text_embeds: get("unet.text_embeds"),
        time_ids: get("unet.time_ids"),
    });
    let (sample, context) = (get("unet.sample"), get("unet.encoder_hidden_states"));
    let mut results = Vec::new();
    for k in 0.. {
        let Some(t) = r.get(&format!("unet.timesteps.{k}")) else {
            break;
        };
        let want = get(&format!("unet.out.{k}"));
        let got = unet
            .forward(&sample, t, &context, added.as_ref())
            .expect("forward");
        let (diff, scale) = (max_abs_diff(&got, &want), max_abs(&want));
        eprintln!(
            "{name} unet.out.{k} t={:?}: max abs diff {diff:.3e}, reference max abs {scale:.3e}, \
             relative {:.3e}",
            t.to_vec1::<f32>().unwrap_or_default(),
            diff / scale
        );
        results.push((k, diff, scale));
    }
    assert!(results.len() >= 3, "{name}: fewer than 3 timestep cases");
    results
}

fn assert_parity(name: &str) {
    for (k, diff, _) in unet_parity(name) {
        assert!(diff <= 1e-4, "{name} unet.out.{k}: max abs diff {diff}");
    }
}

#[test]
fn sd15_tiny_unet_matches_diffusers() {
    assert_parity("sd15-tiny");
}

#[test]
fn sd2_tiny_unet_matches_diffusers() {
    assert_parity("sd2-tiny");
}

#[test]
fn sdxl_tiny_unet_matches_diffusers() {
    assert_parity("sdxl-tiny");
}
