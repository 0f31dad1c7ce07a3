//! Wan transformer tests: parity with diffusers on `tests/fixtures/wan/` (written by
//! `tools/parity/wan_fixture.py`), gradients to every parameter, and clear errors.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;

use super::*;
use crate::families::sd::testing::{
    assert_close, assert_every_var_has_gradient, assert_mentions, assert_near_f32, max_abs_diff,
};

const NAME: &str = "wan-tiny";

fn fixture_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan")
}

/// The fixture's transformer directory and its reference tensors. Panics when absent: a
/// parity test must not pass vacuously.
fn fixture() -> (PathBuf, HashMap<String, Tensor>) {
    let dir = fixture_root().join(NAME).join("transformer");
    let reference = fixture_root().join(format!("{NAME}.reference.safetensors"));
    assert!(
        dir.is_dir() && reference.is_file(),
        "parity fixture {NAME} missing under {}: run tools/parity/wan_fixture.py",
        fixture_root().display()
    );
    let tensors = candle_core::safetensors::load(&reference, &Device::Cpu).expect("reference");
    (dir, tensors)
}

fn tiny_config() -> WanTransformerConfig {
    let (dir, _) = fixture();
    WanTransformerConfig::from_file(&dir.join("config.json")).expect("config")
}

#[test]
fn wan_tiny_transformer_matches_diffusers() {
    let (dir, r) = fixture();
    let get = |k: &str| r.get(k).unwrap_or_else(|| panic!("no {k}")).clone();
    let cfg = tiny_config();
    let dev = Device::Cpu;
    let model = WanTransformer::load(&dir, &cfg, DType::F32, &dev).expect("weights");
    let (latents, text) = (get("transformer.latents"), get("transformer.text"));
    assert!(
        latents.dim(2).unwrap() > 1,
        "the fixture must have several frames"
    );
    let mut cases = 0;
    for k in 0.. {
        let Some(t) = r.get(&format!("transformer.timesteps.{k}")) else {
            break;
        };
        let ts = t.to_vec1::<f32>().unwrap();
        assert!(ts.windows(2).all(|w| w[0] != w[1]), "rows share a timestep");
        let want = get(&format!("transformer.out.{k}"));
        let got = model.forward(&latents, t, &text).expect("forward");
        assert_close(&format!("{NAME} transformer.out.{k} t={ts:?}"), &got, &want);
        // Per-row timesteps: each row alone gives that row of the batch.
        for (i, tv) in ts.iter().enumerate() {
            let row = |x: &Tensor| x.narrow(0, i, 1).unwrap();
            let t1 = Tensor::new(&[*tv], &dev).unwrap();
            let alone = model.forward(&row(&latents), &t1, &row(&text)).unwrap();
            assert!(
                max_abs_diff(&alone, &row(&got)) < 1e-5,
                "row {i} depends on the batch"
            );
        }
        cases += 1;
    }
    assert!(cases >= 2, "fewer than 2 timestep cases");
}

#[test]
fn bf16_keeps_the_f32_modules_and_stays_near_f32() {
    let (dir, r) = fixture();
    let cfg = tiny_config();
    let dev = Device::Cpu;
    let full = WanTransformer::load(&dir, &cfg, DType::F32, &dev).expect("f32");
    let half = WanTransformer::load(&dir, &cfg, DType::BF16, &dev).expect("bf16");
    let (x, t, text) = (
        &r["transformer.latents"],
        &r["transformer.timesteps.0"],
        &r["transformer.text"],
    );
    let want = full.forward(x, t, text).expect("f32 forward");
    let bf = |v: &Tensor| v.to_dtype(DType::BF16).unwrap();
    let got = half.forward(&bf(x), t, &bf(text)).expect("bf16 forward");
    assert_eq!(got.dtype(), DType::BF16);
    assert_near_f32("wan-tiny bf16", &got, &want, 0.05);
}

#[test]
fn a_fresh_model_has_exactly_the_diffusers_state_dict() -> Result<()> {
    let (dir, _) = fixture();
    let stored = candle_core::safetensors::load(
        dir.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )?;
    let map = VarMap::new();
    let vb = crate::nn::random_var_builder(&map, 1, DType::F32, &Device::Cpu);
    WanTransformer::new(vb, &tiny_config())?;
    let vars = map.data().lock().expect("var map");
    let mut names: Vec<_> = vars.keys().cloned().collect();
    let mut want: Vec<_> = stored.keys().cloned().collect();
    names.sort();
    want.sort();
    assert_eq!(names, want);
    for (name, var) in vars.iter() {
        assert_eq!(var.dims(), stored[name].dims(), "{name}");
    }
    Ok(())
}

#[test]
fn every_parameter_receives_a_gradient() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = tiny_config();
    let map = VarMap::new();
    let vb = crate::nn::random_var_builder(&map, 7, DType::F32, &dev);
    let model = WanTransformer::new(vb, &cfg)?;
    let latents = Tensor::randn(0f32, 1.0, (2, cfg.in_channels, 3, 4, 6), &dev)?;
    let text = Tensor::randn(0f32, 1.0, (2, 5, cfg.text_dim), &dev)?;
    let t = Tensor::new(&[900f32, 120.0], &dev)?;
    let out = model.forward(&latents, &t, &text)?;
    assert_eq!(out.dims(), &[2, cfg.out_channels(), 3, 4, 6]);
    let target = Tensor::randn(0f32, 1.0, out.shape(), &dev)?;
    let loss = (out - target)?.sqr()?.mean_all()?;
    let grads = loss.backward()?;
    let vars = map.data().lock().expect("var map").clone();
    assert!(vars.len() > 40, "only {} variables", vars.len());
    assert_every_var_has_gradient(&vars, &grads, "wan.");
    Ok(())
}

#[test]
fn bad_configs_inputs_and_weights_give_clear_errors() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = tiny_config();
    let reject = |json: &str, key: &str| {
        let c: WanTransformerConfig = serde_json::from_str(json).expect("json");
        assert_mentions(&c.validate().unwrap_err().to_string(), &[key]);
    };
    reject(r#"{"image_dim": 1280}"#, "image_dim");
    reject(r#"{"added_kv_proj_dim": 5120}"#, "added_kv_proj_dim");
    reject(r#"{"qk_norm": "rms_norm"}"#, "qk_norm");
    reject(r#"{"patch_size": [1, 2]}"#, "patch_size");
    reject(r#"{"attention_head_dim": 4}"#, "attention_head_dim");

    let (dir, _) = fixture();
    let model = WanTransformer::load(&dir, &cfg, DType::F32, &dev).expect("weights");
    let t = Tensor::new(&[10f32, 20.0], &dev)?;
    let text = Tensor::zeros((2, 3, cfg.text_dim), DType::F32, &dev)?;
    let c = cfg.in_channels;
    let cases: [(&[usize], &str); 3] = [
        (&[2, c + 1, 2, 4, 4], "channels"),
        (&[2, c, 2, 3, 4], "patch"),
        (&[2, c, 2, 4], "[B, C, F, H, W]"),
    ];
    for (shape, words) in cases {
        let x = Tensor::zeros(shape, DType::F32, &dev)?;
        let err = model.forward(&x, &t, &text).unwrap_err().to_string();
        assert_mentions(&err, &[words]);
    }
    let x = Tensor::zeros((2, c, 2, 4, 4), DType::F32, &dev)?;
    let narrow_text = Tensor::zeros((2, 3, cfg.text_dim + 1), DType::F32, &dev)?;
    let err = model.forward(&x, &t, &narrow_text).unwrap_err().to_string();
    assert_mentions(&err, &["text states"]);
    let t3 = Tensor::new(&[1f32, 2.0, 3.0], &dev)?;
    let err = model.forward(&x, &t3, &text).unwrap_err().to_string();
    assert_mentions(&err, &["timesteps"]);

    // A weights file without one tensor names it.
    let scratch = std::env::temp_dir().join(format!("fewstep-wan-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let file = scratch.join("student.safetensors");
    let mut tensors =
        candle_core::safetensors::load(dir.join("diffusion_pytorch_model.safetensors"), &dev)?;
    let name = "blocks.1.attn2.norm_k.weight";
    tensors.remove(name);
    candle_core::safetensors::save(&tensors, &file)?;
    let err = WanTransformer::load(&file, &cfg, DType::F32, &dev).unwrap_err();
    assert_mentions(&err.to_string(), &[name]);
    let err = WanTransformer::load(&scratch.join("absent"), &cfg, DType::F32, &dev).unwrap_err();
    assert_mentions(&err.to_string(), &["absent"]);
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}

/// The tiny pipeline of `wan-tiny-t2v.reference.json`'s call: the model, the batch, its
/// conditioning (with the negatives), the stored initial latents and the call's settings.
struct PipelineCase {
    model: WanModel,
    spec: crate::pipeline::BatchSpec,
    cond: WanCond,
    latents: Tensor,
    reference: HashMap<String, Tensor>,
    call: serde_json::Value,
}

fn pipeline_case() -> PipelineCase {
    use crate::pipeline::Generator;
    let root = fixture_root();
    let reference = root.join("wan-tiny-t2v.reference.safetensors");
    assert!(
        reference.is_file(),
        "run tools/parity/wan_pipeline_fixture.py"
    );
    let r = candle_core::safetensors::load(&reference, &Device::Cpu).unwrap();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("wan-tiny-t2v.reference.json")).unwrap(),
    )
    .unwrap();
    let call = json["call"].clone();
    let strings = |k: &str| -> Vec<String> {
        call[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let num = |k: &str| call[k].as_f64().unwrap();
    let opts = WanOptions {
        dtype: DType::F32,
        vae_dtype: DType::F32,
        text_max_len: num("max_sequence_length") as usize,
        prompt_cache: 8,
        student_timesteps: None,
    };
    let model = WanModel::load(&root.join("wan-tiny-t2v"), None, &opts, &Device::Cpu).unwrap();
    let prompts = strings("prompts");
    let spec = crate::pipeline::BatchSpec {
        seeds: vec![0; prompts.len()],
        prompts,
        negative_prompts: strings("negative_prompts"),
        frames: num("num_frames") as usize,
        width: num("width") as usize,
        height: num("height") as usize,
    };
    let latents = r["pipeline.latents"].clone();
    assert_eq!(
        model.sample_shape(&spec).unwrap(),
        latents.dims()[1..].to_vec()
    );
    let cond = model.condition_batch(&spec, true).unwrap();
    PipelineCase {
        model,
        spec,
        cond,
        latents,
        reference: r,
        call,
    }
}

/// `wan-tiny-t2v`: a whole generation against diffusers' `WanPipeline` (written by
/// `tools/parity/wan_pipeline_fixture.py`): prompts and negative prompts through umT5, 4 Euler
/// steps with CFG from the stored noise, then the VAE.
#[test]
fn wan_tiny_t2v_generation_matches_the_diffusers_pipeline() {
    use crate::pipeline::{sample_with_noise, Generator, SamplerKind, SamplerParams};
    let PipelineCase {
        model,
        spec,
        cond,
        latents,
        reference: r,
        call,
    } = pipeline_case();
    let params = SamplerParams {
        kind: SamplerKind::Euler,
        steps: call["num_inference_steps"].as_u64().unwrap() as usize,
        guidance: call["guidance_scale"].as_f64().unwrap() as f32,
        guidance_interval: None,
        eta: 1.0,
    };
    let fin = sample_with_noise(&model, model.schedule(), params, &cond, || {
        Ok(latents.clone())
    })
    .unwrap();
    assert_close(
        "wan-tiny-t2v final latents",
        &fin,
        &r["pipeline.final_latents"],
    );
    let video = model.decode(&fin).unwrap();
    assert_close("wan-tiny-t2v video", &video, &r["pipeline.video"]);
    // And through the engine's path: frames of the requested count and size.
    let frames = model.frames(&fin).unwrap();
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0].len(), spec.frames);
    assert_eq!(
        frames[0][0].dimensions(),
        (spec.width as u32, spec.height as u32)
    );
}

/// The same pipeline sampled by `UniPCMultistepScheduler` with Wan2.1's own scheduler config
/// (`tools/parity/wan_unipc_fixture.py`): 6 steps with CFG 5 at solver orders 2 (Wan's) and 3.
/// The sigmas, the network's whole timesteps and the final latents match.
#[test]
fn wan_unipc_sampling_matches_the_diffusers_scheduler_at_orders_2_and_3() {
    use crate::pipeline::{sample_with_noise, NoiseSchedule, SamplerKind, SamplerParams};
    let case = pipeline_case();
    let root = fixture_root();
    let r = candle_core::safetensors::load(
        root.join("wan-tiny-t2v-unipc.reference.safetensors"),
        &Device::Cpu,
    )
    .expect("run tools/parity/wan_unipc_fixture.py");
    let config = std::fs::read_to_string(root.join("wan-unipc-scheduler.json")).unwrap();
    let steps = 6;
    for order in [2, 3] {
        let mut cfg: FlowSchedulerConfig = serde_json::from_str(&config).unwrap();
        assert_eq!(cfg.solver_order, 2, "Wan ships order 2");
        cfg.solver_order = order;
        let schedule = FlowMatchSchedule::from_config(&cfg).unwrap();
        let sigmas = schedule.unipc_times(steps);
        let close = |got: &[f32], key: &str, tol: f32| {
            let want = r[key].to_vec1::<f32>().unwrap();
            assert_eq!(got.len(), want.len(), "{key}");
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0.0, f32::max);
            assert!(worst <= tol, "{key}: {got:?} against {want:?}");
        };
        close(&sigmas, &format!("order{order}.sigmas"), 1e-7);
        let net: Vec<f32> = sigmas[..steps]
            .iter()
            .map(|&s| schedule.unipc_network_time(s) * 1000.0)
            .collect();
        close(&net, &format!("order{order}.timesteps"), 1e-3);

        let params = SamplerParams {
            kind: SamplerKind::UniPc,
            steps,
            guidance: case.call["guidance_scale"].as_f64().unwrap() as f32,
            guidance_interval: None,
            eta: 1.0,
        };
        let fin = sample_with_noise(&case.model, &schedule, params, &case.cond, || {
            Ok(case.latents.clone())
        })
        .unwrap();
        assert_close(
            &format!("wan-tiny-t2v UniPC order {order}"),
            &fin,
            &r[&format!("order{order}.final_latents")],
        );
    }
}

#[test]
fn wan_sizes_and_frame_counts_off_the_grid_are_refused() {
    let opts = WanOptions {
        dtype: DType::F32,
        vae_dtype: DType::F32,
        text_max_len: 16,
        prompt_cache: 0,
        student_timesteps: None,
    };
    let model = WanModel::load(
        &fixture_root().join("wan-tiny-t2v"),
        None,
        &opts,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(model.size_multiple(), 16);
    assert_eq!(model.latent_shape(9, 32, 16).unwrap(), [4, 3, 2, 4]);
    for frames in [0, 2, 4, 8] {
        let e = model.latent_shape(frames, 32, 32).unwrap_err().to_string();
        assert_mentions(&e, &["4k+1", &frames.to_string()]);
    }
    for (w, h) in [(24, 32), (32, 0), (40, 48)] {
        let e = model.latent_shape(5, w, h).unwrap_err().to_string();
        assert_mentions(&e, &["multiples of 16", &format!("{w}x{h}")]);
    }
}

#[test]
fn a_wan_directory_missing_a_component_names_it() {
    let opts = WanOptions {
        dtype: DType::F32,
        vae_dtype: DType::F32,
        text_max_len: 16,
        prompt_cache: 0,
        student_timesteps: None,
    };
    let dir = std::env::temp_dir().join(format!("fewstep-wan-missing-{}", std::process::id()));
    let src = fixture_root().join("wan-tiny-t2v");
    for part in ["transformer", "text_encoder", "tokenizer", "scheduler"] {
        let to = dir.join(part);
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(src.join(part)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
    let e = WanModel::load(&dir, None, &opts, &Device::Cpu).unwrap_err();
    assert!(matches!(e, WanError::Vae(_)), "{e:?}");
    assert_mentions(&e.to_string(), &["vae"]);
    std::fs::remove_dir_all(&dir).ok();
}
