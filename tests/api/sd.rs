//! Stable Diffusion models through the HTTP API: the tiny random fixtures of
//! `tests/fixtures/sd/`, named by manifest path.

use std::path::{Path, PathBuf};

use super::*;

fn fixture_manifest(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sd")
        .join(format!("{name}.toml"))
        .display()
        .to_string()
}

#[tokio::test]
async fn an_sdxl_manifest_serves_pngs_of_the_requested_size_beside_the_tiny_model() {
    let dir = models_dir("sd", |_| {});
    let mut cfg = config(&dir);
    cfg.models = vec![fixture_manifest("sdxl-tiny"), "tiny-shapes".into()];
    let s = start(cfg).await;

    // The manifest path is served under the manifest's name, and is the default model.
    let (status, models) = s.get("/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["default_model"], "sdxl-tiny");
    let sd = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "sdxl-tiny")
        .unwrap();
    assert_eq!(sd["family"], "sd");
    assert_eq!(sd["sampler"], "student");
    assert_eq!(sd["kinds"], json!(["image"]));
    assert_eq!(sd["trained"], true);

    let res = s
        .generate(json!({"prompt": "a photo of a cat", "seed": 4, "width": 64, "height": 32}))
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["model"], "sdxl-tiny");
    assert_eq!(body["steps"], 4);
    assert_eq!(body["model_version"].as_str().unwrap().len(), 16);
    let out = &body["outputs"][0];
    assert_eq!(out["media_type"], "image/png");
    let png = decode_b64(out["data"].as_str().unwrap());
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (64, 32));

    // Raw PNG; the same seed gives the same pixels.
    let raw = s
        .client
        .post(s.url("/generate"))
        .header("accept", "image/png")
        .json(&json!({"prompt": "a photo of a cat", "seed": 4, "width": 64, "height": 32}))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 200);
    assert_eq!(raw.headers()["content-type"], "image/png");
    let again = image::load_from_memory(&raw.bytes().await.unwrap()).unwrap();
    assert_eq!(again.to_rgb8(), img.to_rgb8());

    // The manifest's limits hold.
    for (body, code) in [
        (json!({"prompt": "a cat", "steps": 3}), "invalid_steps"),
        (
            json!({"prompt": "a cat", "guidance": 2.0}),
            "invalid_guidance",
        ),
        (
            json!({"prompt": "a cat", "num_frames": 8}),
            "invalid_frames",
        ),
        (
            json!({"prompt": "a cat", "width": 48, "height": 48}),
            "invalid_size",
        ),
        (json!({"prompt": "a cat", "n": 5}), "invalid_n"),
    ] {
        let res = s.generate(body.clone()).await;
        assert_eq!(res.status(), 400, "{body}");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["code"], code, "{body}");
    }

    // The tiny model still serves from the same engine.
    let res = s
        .generate(json!({"prompt": "a red circle", "model": "tiny-shapes", "steps": 1}))
        .await;
    assert_eq!(res.status(), 200);
    s.handle.shutdown().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes an sd manifest for a copy of `sdxl-tiny` under `dir`, with `sd_table` as its `[sd]`.
fn write_sd_manifest(dir: &Path, sd_table: &str) -> PathBuf {
    let text = std::fs::read_to_string(fixture_manifest("sdxl-tiny"))
        .unwrap()
        .replace("[sd]\ndir = \"sdxl-tiny\"", &format!("[sd]\n{sd_table}"));
    assert!(text.contains(sd_table));
    let path = dir.join("broken-sd.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn start_error(dir: &Path, model: &Path) -> String {
    let mut cfg = config(dir);
    cfg.models = vec![model.display().to_string()];
    match fewstep::server::spawn(cfg, std::future::pending()).await {
        Ok(_) => panic!("{} must not load", model.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn a_manifest_pointing_at_missing_files_fails_at_start_up_naming_them() {
    let dir = models_dir("sd-missing", |_| {});
    let manifest = write_sd_manifest(&dir, "dir = \"no-such-diffusers-dir\"");
    let err = start_error(&dir, &manifest).await;
    assert!(
        err.contains("sdxl-tiny")
            && err.contains(&dir.join("no-such-diffusers-dir").display().to_string())
            && err.contains("not found"),
        "{err}"
    );

    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd/sdxl-tiny");
    let manifest = write_sd_manifest(
        &dir,
        &format!(
            "dir = \"{}\"\nunet_file = \"dmd2_unet.safetensors\"",
            real.display()
        ),
    );
    let err = start_error(&dir, &manifest).await;
    assert!(
        err.contains(&dir.join("dmd2_unet.safetensors").display().to_string())
            && err.contains("single UNet weights file"),
        "{err}"
    );

    let err = start_error(&dir, &dir.join("absent.toml")).await;
    assert!(err.contains("absent.toml"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
