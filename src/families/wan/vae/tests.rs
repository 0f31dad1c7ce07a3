//! Wan VAE tests: parity with diffusers' `AutoencoderKLWan` on `tests/fixtures/wan/wan-tiny-t2v/vae`
//! (written by `tools/parity/wan_vae_fixture.py`), causality of the chunked passes, and
//! clear errors.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use super::*;
use crate::families::sd::testing::{assert_mentions, assert_near_f32, max_abs, max_abs_diff};

const NAME: &str = "wan-tiny-vae";
/// Max abs difference allowed, relative to the reference's max abs value.
const RELATIVE_TOLERANCE: f32 = 1e-4;

fn fixture_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan")
}

/// The VAE directory and the reference tensors. Panics when absent: a parity test must not
/// pass vacuously.
fn fixture() -> (PathBuf, HashMap<String, Tensor>) {
    let dir = fixture_root().join("wan-tiny-t2v/vae");
    let reference = fixture_root().join(format!("{NAME}.reference.safetensors"));
    assert!(
        dir.is_dir() && reference.is_file(),
        "parity fixture {NAME} missing under {}: run tools/parity/wan_vae_fixture.py",
        fixture_root().display()
    );
    let tensors = candle_core::safetensors::load(&reference, &Device::Cpu).expect("reference");
    (dir, tensors)
}

fn tiny_vae(dtype: DType) -> WanVae {
    let (dir, _) = fixture();
    WanVae::load(&dir, dtype, &Device::Cpu).expect("tiny VAE")
}

fn get(r: &HashMap<String, Tensor>, key: &str) -> Tensor {
    r.get(key)
        .unwrap_or_else(|| panic!("no {key} in the reference"))
        .clone()
}

/// Asserts `got` matches `want` within [`RELATIVE_TOLERANCE`] of `want`'s max abs value.
fn assert_parity(label: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{label}: shape");
    let diff = max_abs_diff(got, want);
    let scale = max_abs(want);
    eprintln!(
        "{label}: max abs diff {diff:.3e}, output scale (max abs) {scale:.3e}, ratio {:.3e}",
        diff / scale
    );
    assert!(
        diff.is_finite() && scale > 0.0 && diff <= RELATIVE_TOLERANCE * scale,
        "{label}: max abs diff {diff:e} against output scale {scale:e} (allowed {RELATIVE_TOLERANCE:e} \
         of the scale)"
    );
}

fn frames(x: &Tensor, start: usize, len: usize) -> Tensor {
    x.narrow(2, start, len).expect("frames")
}

#[test]
fn wan_tiny_vae_decode_matches_diffusers() {
    let (_, r) = fixture();
    let vae = tiny_vae(DType::F32);
    let latents = get(&r, "vae.decode.latents");
    assert_eq!(
        latents.dim(2).unwrap(),
        3,
        "the fixture must have 3 latent frames"
    );
    let video = vae.decode(&latents).expect("decode");
    assert_eq!(video.dims(), &[2, 3, 9, 24, 40]);
    assert_parity("wan-tiny-vae decode", &video, &get(&r, "vae.decode.video"));
}

#[test]
fn wan_tiny_vae_encode_matches_diffusers() {
    let (_, r) = fixture();
    let vae = tiny_vae(DType::F32);
    let video = get(&r, "vae.encode.video");
    assert_eq!(
        video.dim(2).unwrap(),
        9,
        "the fixture must have chunks 1, 4, 4"
    );
    let posterior = vae.encode_raw(&video).expect("encode");
    assert_parity(
        "wan-tiny-vae encode mean",
        &posterior.mean,
        &get(&r, "vae.encode.mean"),
    );
    assert_parity(
        "wan-tiny-vae encode logvar",
        &posterior.logvar,
        &get(&r, "vae.encode.logvar"),
    );
    let latents = vae.encode(&video).expect("encode");
    assert_parity(
        "wan-tiny-vae encode normalised",
        &latents,
        &get(&r, "vae.encode.latents"),
    );
    // The two helpers are inverses.
    let back = vae.denormalize_latents(&latents).unwrap();
    assert!(max_abs_diff(&back, &posterior.mean) < 1e-6);
}

/// The chunked passes are causal: a prefix of the input gives the same prefix of the output,
/// which only holds if each chunk continues from the cache of the ones before. And the cache
/// is per call: decoding again gives the same bits.
#[test]
fn chunked_passes_are_causal_and_start_fresh_each_call() {
    let (_, r) = fixture();
    let vae = tiny_vae(DType::F32);
    let latents = get(&r, "vae.decode.latents");
    let full = vae.decode(&latents).unwrap();
    for f in [1, 2] {
        let part = vae.decode(&frames(&latents, 0, f)).unwrap();
        let t = 1 + 4 * (f - 1);
        assert_eq!(part.dim(2).unwrap(), t);
        let d = max_abs_diff(&part, &frames(&full, 0, t));
        assert!(d < 1e-6, "decoding {f} latent frames differs by {d}");
    }
    let again = vae.decode(&latents).unwrap();
    assert_eq!(max_abs_diff(&again, &full), 0.0, "a second decode differs");

    let video = get(&r, "vae.encode.video");
    let full = vae.encode_raw(&video).unwrap().mean;
    let part = vae.encode_raw(&frames(&video, 0, 5)).unwrap().mean;
    let d = max_abs_diff(&part, &frames(&full, 0, 2));
    assert!(d < 1e-6, "encoding 5 frames differs by {d}");
}

#[test]
fn half_precision_stays_close_to_f32() {
    let (_, r) = fixture();
    let latents = get(&r, "vae.decode.latents");
    let full = tiny_vae(DType::F32).decode(&latents).unwrap();
    // candle's CPU conv2d has no bf16; bf16 is for the GPU.
    let half = tiny_vae(DType::F16).decode(&latents).unwrap();
    assert_eq!(half.dtype(), DType::F16);
    assert_near_f32("wan-tiny-vae f16 decode", &half, &full, 0.05);
}

#[test]
fn a_fresh_model_has_exactly_the_diffusers_state_dict() {
    let (dir, _) = fixture();
    let dev = Device::Cpu;
    let stored =
        candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &dev)
            .unwrap();
    let cfg = WanVaeConfig::from_file(&dir.join("config.json")).unwrap();
    let map = VarMap::new();
    WanVae::new(
        crate::nn::random_var_builder(&map, 1, DType::F32, &dev),
        &cfg,
    )
    .unwrap();
    let vars = map.data().lock().expect("var map");
    let mut names: Vec<_> = vars.keys().cloned().collect();
    let mut want: Vec<_> = stored.keys().cloned().collect();
    names.sort();
    want.sort();
    assert_eq!(names, want);
    for (name, var) in vars.iter() {
        assert_eq!(var.dims(), stored[name].dims(), "{name}");
    }
}

#[test]
fn bad_inputs_give_clear_errors() {
    let vae = tiny_vae(DType::F32);
    let dev = Device::Cpu;
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
    let input_error = |e: WanVaeError, words: &[&str]| {
        assert!(matches!(e, WanVaeError::Input(_)), "{e:?}");
        assert_mentions(&e.to_string(), words);
    };
    input_error(
        vae.decode(&zeros(&[1, 5, 2, 3, 3])).unwrap_err(),
        &["5 channels", "z_dim is 4"],
    );
    input_error(
        vae.decode(&zeros(&[1, 4, 3, 3])).unwrap_err(),
        &["[B, C, F, H, W]"],
    );
    input_error(
        vae.decode(&zeros(&[1, 4, 0, 3, 3])).unwrap_err(),
        &["empty"],
    );
    for t in [2, 4, 8, 10] {
        input_error(
            vae.encode(&zeros(&[1, 3, t, 16, 16])).unwrap_err(),
            &[&format!("{t} frames"), "4k + 1"],
        );
    }
    input_error(
        vae.encode(&zeros(&[1, 4, 5, 16, 16])).unwrap_err(),
        &["4 channels", "takes 3"],
    );
    input_error(
        vae.encode(&zeros(&[1, 3, 5, 12, 16])).unwrap_err(),
        &["12x16", "multiples of 8"],
    );
    input_error(
        vae.encode_raw(&zeros(&[3, 5, 16, 16])).unwrap_err(),
        &["[B, C, T, H, W]"],
    );
    input_error(
        vae.normalize_latents(&zeros(&[1, 3, 1, 2, 2])).unwrap_err(),
        &["3 channels"],
    );
}

#[test]
fn unsupported_configs_are_refused_by_name() {
    let refuse = |json: &str, field: &str, value: &str| {
        let cfg: WanVaeConfig = serde_json::from_str(json).expect("json");
        let e = cfg.validate().unwrap_err();
        assert!(
            matches!(&e, WanVaeError::Unsupported { field: f, .. } if *f == field),
            "{e:?}"
        );
        assert_mentions(&e.to_string(), &[field, value]);
    };
    // Wan2.2 TI2V-5B's VAE.
    refuse(
        r#"{"is_residual": true, "patch_size": 2}"#,
        "is_residual",
        "true",
    );
    refuse(r#"{"patch_size": 2}"#, "patch_size", "2");
    refuse(r#"{"attn_scales": [0.5]}"#, "attn_scales", "0.5");
    refuse(
        r#"{"temperal_downsample": [false, false, true]}"#,
        "temperal_downsample",
        "[false, false, true]",
    );
    refuse(
        r#"{"temperal_downsample": [true, true]}"#,
        "temperal_downsample",
        "[true, true]",
    );
    refuse(
        r#"{"scale_factor_spatial": 16}"#,
        "scale_factor_spatial",
        "16",
    );
    refuse(
        r#"{"scale_factor_temporal": 8}"#,
        "scale_factor_temporal",
        "8",
    );
    refuse(r#"{"z_dim": 4}"#, "latents_mean", "16 values");
    refuse(r#"{"num_res_blocks": 0}"#, "num_res_blocks", "0");
    refuse(r#"{"dim_mult": [1]}"#, "dim_mult", "[1]");
    // diffusers' defaults are Wan2.1's VAE, which is supported.
    let wan21: WanVaeConfig = serde_json::from_str("{}").unwrap();
    wan21.validate().expect("Wan2.1 defaults");
    assert_eq!(wan21.spatial_factor(), 8);
    assert_eq!(wan21.video_frames(21), 81);
    assert_eq!(wan21.latent_frames(81), Some(21));
    assert_eq!(wan21.latent_frames(80), None);
}

#[test]
fn missing_weights_are_named() {
    let (dir, _) = fixture();
    let dev = Device::Cpu;
    let scratch = std::env::temp_dir().join(format!("fewstep-wan-vae-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::copy(dir.join("config.json"), scratch.join("config.json")).unwrap();
    let err = WanVae::load(&scratch, DType::F32, &dev).unwrap_err();
    assert!(matches!(err, WanVaeError::MissingWeights { .. }), "{err:?}");
    let weights = "diffusion_pytorch_model.safetensors";
    let mut tensors = candle_core::safetensors::load(dir.join(weights), &dev).unwrap();
    let name = "decoder.up_blocks.1.upsamplers.0.time_conv.weight";
    assert!(tensors.remove(name).is_some());
    candle_core::safetensors::save(&tensors, scratch.join(weights)).unwrap();
    let err = WanVae::load(&scratch, DType::F32, &dev).unwrap_err();
    assert_mentions(&err.to_string(), &[name]);
    std::fs::remove_dir_all(&scratch).unwrap();
}
