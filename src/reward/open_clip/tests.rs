//! Parity with open_clip on `tests/fixtures/sd/openclip-tiny` (the laion hub layout, pickled
//! weights) and `openclip-tiny-hps` (HPSv2's layout: bare config, f16 `.pt` with
//! `state_dict` / `module.`), made by `tools/parity/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use image::RgbImage;

use super::*;
use crate::families::sd::testing::{assert_close, assert_mentions, fixture, Fixture};
use crate::reward::Reward;

const MAIN: &str = "openclip-tiny";
const HPS: &str = "openclip-tiny-hps";

fn fixtures_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd")
}

fn load_dir(dir: &Path) -> ClipScoreReward {
    ClipScoreReward::load(dir, DType::F32, &Device::Cpu).unwrap()
}

fn raw_image(fx: &Fixture, i: usize) -> RgbImage {
    let t = fx.tensor(&format!("images.raw.{i}"));
    let (h, w, _) = t.dims3().unwrap();
    let data = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    RgbImage::from_raw(w as u32, h as u32, data).unwrap()
}

/// Raw image `i` as one sample `[1, 1, 3, H, W]` in `[-1, 1]` (exact: the reward's 8-bit
/// quantization gives back the same bytes).
fn raw_sample(fx: &Fixture, i: usize) -> Tensor {
    let t = fx.tensor(&format!("images.raw.{i}"));
    let t = t.to_dtype(DType::F32).unwrap().permute((2, 0, 1)).unwrap();
    ((t / 127.5).unwrap() - 1.0)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Compares one directory with the reference tensors under `prefix` (`""` or `"hps."`).
fn check_parity(fx: &Fixture, dir: &Path, prefix: &str) {
    let r = load_dir(dir);
    let key = |k: &str| format!("{prefix}{k}");
    let label = |k: &str| format!("{} {}", dir.file_name().unwrap().to_string_lossy(), key(k));
    let prompts = fx.prompts();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();

    // torchvision's preprocessing (its center crop offsets included) from the raw bytes.
    let raws: Vec<RgbImage> = (0..2).map(|i| raw_image(fx, i)).collect();
    let pixels = r.processor().preprocess_batch(&raws, &Device::Cpu).unwrap();
    let want_pixels = fx.tensor(&key("pixel_values"));
    assert_close(&label("pixel_values"), &pixels, &want_pixels);

    let img = r.image_features(&want_pixels).unwrap();
    assert_close(
        &label("image_features"),
        &img,
        &fx.tensor(&key("image_features")),
    );
    let txt = r.text_features(&refs).unwrap();
    assert_close(
        &label("text_features"),
        &txt,
        &fx.tensor(&key("text_features")),
    );
    let want = fx.tensor(&key("logits_per_image"));
    let logits = r.logits(&want_pixels, &refs).unwrap();
    assert_close(&label("logits_per_image"), &logits, &want);

    // The reward end to end, from the 8-bit samples: every (image, prompt) pair.
    let mut worst = 0f32;
    for i in 0..2 {
        for (j, p) in prompts.iter().enumerate() {
            let s = r
                .score(std::slice::from_ref(p), &raw_sample(fx, i))
                .unwrap()[0];
            let w: f32 = want.i((i, j)).unwrap().to_scalar().unwrap();
            worst = worst.max((s - w).abs());
        }
    }
    eprintln!(
        "{}: max abs diff {worst:.3e}",
        label("score (Reward::score)")
    );
    assert!(worst <= 1e-4, "{worst}");

    // The float (differentiable) path: no 8-bit rounding after each resize pass.
    let sample = raw_sample(fx, 0).squeeze(0).unwrap();
    let s: f32 = r
        .differentiable_scores(&refs[..1], &sample)
        .unwrap()
        .i(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let w: f32 = want.i((0, 0)).unwrap().to_scalar().unwrap();
    eprintln!("{}: float path {s:.5}, exact {w:.5}", label("score"));
    assert!((s - w).abs() < 0.5, "{s} vs {w}");
}

#[test]
fn hub_directory_matches_open_clip() {
    let fx = fixture(MAIN);
    check_parity(&fx, &fx.dir, "");
}

#[test]
fn hps_checkpoint_matches_open_clip() {
    let fx = fixture(MAIN);
    check_parity(&fx, &fixtures_root().join(HPS), "hps.");
}

#[test]
fn token_ids_match_open_clip() {
    let fx = fixture(MAIN);
    let r = load_dir(&fx.dir);
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_root().join(format!("{MAIN}.reference.json"))).unwrap(),
    )
    .unwrap();
    let probes: Vec<String> = serde_json::from_value(json["probe_prompts"].clone()).unwrap();
    for (texts, key) in [
        (fx.prompts(), "text.input_ids"),
        (probes, "tokenizer.probe_ids"),
    ] {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let got = r.tokenizer().encode_batch(&refs).unwrap();
        let want: Vec<Vec<i64>> = fx.tensor(key).to_vec2().unwrap();
        assert_eq!(got.batch, want.len());
        for (i, w) in want.iter().enumerate() {
            let g: Vec<i64> = got.row(i).iter().map(|&v| v as i64).collect();
            assert_eq!(&g, w, "{key} row {i} ({:?})", refs[i]);
        }
        eprintln!("{key}: {} rows identical to open_clip's", want.len());
    }
    assert_eq!(r.tokenizer().pad_id(), 0);
}

#[test]
fn the_clip_reward_loads_either_form_by_name() {
    let fx = fixture(MAIN);
    let clip = fixture("clip-tiny");
    let cases = [
        (fx.dir.clone(), &fx, "logits_per_image"),
        (fixtures_root().join(HPS), &fx, "hps.logits_per_image"),
        (clip.dir.clone(), &clip, "clip.logits_per_image"),
    ];
    for (dir, f, key) in cases {
        let reward = crate::reward::load("clip", Some(&dir), &Device::Cpu).unwrap();
        assert_eq!(reward.name(), "clip");
        let prompts = f.prompts();
        reward.check_prompt(&prompts[1]).unwrap();
        let samples = Tensor::cat(&[raw_sample(f, 1), raw_sample(f, 1)], 0).unwrap();
        let got = reward.score(&prompts, &samples).unwrap();
        let want: Vec<f32> = f.tensor(key).i(1).unwrap().to_vec1().unwrap();
        eprintln!("{}: scores {got:?}, reference {want:?}", dir.display());
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-4,
                "{}: {got:?} vs {want:?}",
                dir.display()
            );
        }
    }
}

/// A scratch copy of fixture directory `name`, edited by `edit` (which gets its path).
fn scratch(name: &str, tag: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let src = fixtures_root().join(name);
    let dir = std::env::temp_dir().join(format!("fewstep-oc-{tag}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    edit(&dir);
    dir
}

/// Replaces the pickled weights of `dir` with `open_clip_model.safetensors`, edited.
fn to_safetensors(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let bin = dir.join("open_clip_pytorch_model.bin");
    let mut t: HashMap<String, Tensor> = candle_core::pickle::read_all(&bin)
        .unwrap()
        .into_iter()
        .collect();
    edit(&mut t);
    candle_core::safetensors::save(&t, dir.join("open_clip_model.safetensors")).unwrap();
    std::fs::remove_file(bin).unwrap();
}

#[test]
fn safetensors_weights_beside_a_transformers_model_load_the_same() {
    let fx = fixture(MAIN);
    // A laion repository holds both forms; the OpenCLIP one is loaded (clip-tiny's weights,
    // put beside as the transformers form, would score differently).
    let dir = scratch(MAIN, "st", |d| {
        to_safetensors(d, |_| {});
        let clip = fixture("clip-tiny").dir;
        for f in [
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
        ] {
            std::fs::copy(clip.join(f), d.join(f)).unwrap();
        }
    });
    let r = load_dir(&dir);
    let prompts = fx.prompts();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let logits = r.logits(&fx.tensor("pixel_values"), &refs).unwrap();
    assert_close(
        "safetensors logits_per_image",
        &logits,
        &fx.tensor("logits_per_image"),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn load_err(dir: &Path) -> String {
    match ClipScoreReward::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(d: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = d.join(CONFIG);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn bad_directories_name_the_file_and_the_problem() {
    type Edit = Box<dyn FnOnce(&Path)>;
    let rm = |f: &'static str| -> Edit {
        Box::new(move |d: &Path| std::fs::remove_file(d.join(f)).unwrap())
    };
    let cases: Vec<(&str, &str, Edit, Vec<&str>)> = vec![
        (
            MAIN,
            "noconfig",
            rm(CONFIG),
            vec!["config.json", CONFIG, "not found"],
        ),
        (
            MAIN,
            "noweights",
            rm("open_clip_pytorch_model.bin"),
            vec!["open_clip_model.safetensors", "not found"],
        ),
        (
            MAIN,
            "notok",
            rm("tokenizer.json"),
            vec!["tokenizer.json", "not found"],
        ),
        (
            MAIN,
            "notensor",
            Box::new(|d| to_safetensors(d, |t| drop(t.remove("visual.proj")))),
            vec!["open_clip_model.safetensors", "missing tensor visual.proj"],
        ),
        (
            MAIN,
            "shape",
            Box::new(|d| {
                to_safetensors(d, |t| {
                    let z = Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap();
                    t.insert("visual.positional_embedding".into(), z);
                })
            }),
            vec![
                "open_clip_model.safetensors",
                "visual.positional_embedding has shape [3, 3]",
                "[26, 40]",
            ],
        ),
        (
            MAIN,
            "layerscale",
            Box::new(|d| {
                to_safetensors(d, |t| {
                    let g = Tensor::ones(32, DType::F32, &Device::Cpu).unwrap();
                    t.insert("transformer.resblocks.0.ls_1.gamma".into(), g);
                })
            }),
            vec!["open_clip_model.safetensors", "ls_1.gamma", "unsupported"],
        ),
        (
            MAIN,
            "attnpool",
            Box::new(|d| {
                edit_config(d, |v| {
                    v["model_cfg"]["vision_cfg"]["attentional_pool"] = true.into()
                })
            }),
            vec![
                CONFIG,
                "unsupported",
                "vision_cfg.attentional_pool",
                "attentional pooler",
            ],
        ),
        (
            MAIN,
            "timm",
            Box::new(|d| {
                edit_config(d, |v| {
                    v["model_cfg"]["vision_cfg"]["timm_model_name"] = "vit_base_patch16_224".into()
                })
            }),
            vec![CONFIG, "timm"],
        ),
        (
            MAIN,
            "vocab",
            Box::new(|d| edit_config(d, |v| v["model_cfg"]["text_cfg"]["vocab_size"] = 100.into())),
            vec!["tokenizer.json", "EOT id 538", "vocab_size 100"],
        ),
        (
            HPS,
            "twockpt",
            Box::new(|d| std::fs::write(d.join("HPS_v2.pt"), b"x").unwrap()),
            vec![
                "several OpenCLIP checkpoints",
                "HPS_v2.pt",
                "HPS_v2-tiny_compressed.pt",
            ],
        ),
        (
            HPS,
            "badpickle",
            Box::new(|d| {
                std::fs::write(d.join("HPS_v2-tiny_compressed.pt"), b"not a zip").unwrap()
            }),
            vec!["HPS_v2-tiny_compressed.pt"],
        ),
        (
            HPS,
            "badjson",
            Box::new(|d| std::fs::write(d.join(CONFIG), "{").unwrap()),
            vec![CONFIG, "invalid JSON"],
        ),
    ];
    for (name, tag, edit, needles) in cases {
        let dir = scratch(name, tag, edit);
        let err = load_err(&dir);
        eprintln!("{tag}: {err}");
        assert_mentions(&err, &needles);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
