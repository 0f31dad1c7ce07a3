//! Wan through the HTTP API: the tiny random pipeline of `tests/fixtures/wan/wan-tiny-t2v`
//! (umT5, transformer, VAE; parity-tested against diffusers in the library), named by manifest
//! path and served as a 4-step student.

use std::path::Path;

use super::*;

fn fixture_manifest() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/wan/wan-tiny-t2v.toml")
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wan_manifest_serves_mp4_on_its_4k_plus_1_frame_grid_and_refuses_other_counts() {
    let dir = models_dir("wan", |_| {});
    let mut cfg = config(&dir);
    cfg.models = vec![fixture_manifest()];
    let s = start(cfg).await;

    let (status, models) = s.get("/models").await;
    assert_eq!(status, 200);
    let wan = &models["models"][0];
    assert_eq!(wan["id"], "wan-tiny-t2v");
    assert_eq!(wan["family"], "wan");
    assert_eq!(wan["kinds"], json!(["image", "video"]));

    let body = json!({"prompt": "a red cat walks on the beach", "num_frames": 5, "width": 48,
                      "height": 32, "seed": 3, "output_format": "mp4"});
    let res = s.generate(body.clone()).await;
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["steps"], 4);
    let out = &v["outputs"][0];
    assert_eq!(out["media_type"], "video/mp4");
    let frames =
        fewstep::media::decode(&decode_b64(out["data"].as_str().unwrap()), "video/mp4").unwrap();
    assert_eq!(frames.len(), 5);
    assert_eq!(frames[0].dimensions(), (48, 32));
    // An image is the 1-frame clip.
    let res = s
        .generate(json!({"prompt": "a blue dog", "width": 32, "height": 32, "seed": 1}))
        .await;
    assert_eq!(res.status(), 200);

    for (body, code) in [
        (
            json!({"prompt": "a cat", "num_frames": 8}),
            "invalid_frames",
        ),
        (
            json!({"prompt": "a cat", "num_frames": 4}),
            "invalid_frames",
        ),
        (
            json!({"prompt": "a cat", "width": 40, "height": 32}),
            "invalid_size",
        ),
        (json!({"prompt": "a cat", "steps": 3}), "invalid_steps"),
    ] {
        let res = s.generate(body.clone()).await;
        assert_eq!(res.status(), 400, "{body}");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["code"], code, "{body}");
    }

    // OpenAI's video API: 1 second at 8 fps is the 9-frame clip (both ends included).
    let res = s
        .client
        .post(s.url("/v1/videos"))
        .json(&json!({"prompt": "a red cat", "seconds": "1", "size": "48x32", "seed": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["seconds"], "1");
    let id = v["id"].as_str().unwrap().to_string();
    loop {
        let (_, v) = s.get(&format!("/v1/videos/{id}")).await;
        if v["status"] == "completed" {
            break;
        }
        assert_ne!(v["status"], "failed", "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = s
        .client
        .get(s.url(&format!("/v1/videos/{id}/content")))
        .send()
        .await
        .unwrap();
    let frames = fewstep::media::decode(&r.bytes().await.unwrap(), "video/mp4").unwrap();
    assert_eq!(frames.len(), 9);
    s.handle.shutdown().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs `fewstep distill` with `args` (a tiny LoRA AMD run of 2 iterations: a 1-frame clip,
/// then a 5-frame video, scored by the tiny CLIP fixture).
fn distill_wan(models: &Path, out: &Path, model: &str, args: &[&str]) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let conf = out.with_extension("toml");
    std::fs::write(
        &conf,
        format!(
            "iterations = 2\nprompts = 1\ngroup_size = 2\nvideo_every = 2\nvideo_prompts = 1\n\
             generator_every = 1\nlog_every = 1\nreward = \"clip\"\nreward_path = {:?}\n\
             [lora]\nrank = 4\n",
            fixtures.join("sd/clip-tiny").display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args(["distill", "--model", model, "--student-steps", "2"])
        .arg("--models-dir")
        .arg(models)
        .arg("--config")
        .arg(&conf)
        .arg("--out")
        .arg(out)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Wan's refinement loop: distill a LoRA student of the tiny teacher, serve it, continue it,
/// and hot-swap the continuation into the running server, which then answers with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distilled_wan_student_serves_and_a_continued_one_hot_swaps_in() {
    let dir = std::env::temp_dir().join(format!("fewstep-test-wan-loop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan");
    let mut teacher: toml::Table =
        toml::from_str(&std::fs::read_to_string(fixtures.join("wan-tiny-teacher.toml")).unwrap())
            .unwrap();
    let abs = fixtures.join("wan-tiny-t2v").display().to_string();
    set(&mut teacher, "wan", "dir", abs);
    std::fs::write(
        models.join("wan-tiny-teacher.toml"),
        toml::to_string(&teacher).unwrap(),
    )
    .unwrap();
    // The first student lands in the models directory (`models/wan-tiny/`).
    let first = tokio::task::spawn_blocking({
        let models = models.clone();
        move || distill_wan(&models, &models, "wan-tiny-teacher", &[])
    });
    first.await.unwrap();

    let mut cfg = config(&models);
    cfg.allow_random_weights = false;
    cfg.models = vec!["wan-tiny".into()];
    cfg.admin_token = Some("sesame".into());
    cfg.reload_dirs = vec![dir.join("run")];
    let s = start(cfg).await;
    let clip = |seed: u64| {
        json!({"model": "wan-tiny", "prompt": "a red cat walks", "num_frames": 5, "width": 32,
               "height": 32, "seed": seed, "output_format": "mp4"})
    };
    let v0: Value = s.generate(clip(1)).await.json().await.unwrap();
    assert_eq!(v0["steps"], 2, "the student's own step count");
    let before = v0["model_version"].as_str().unwrap().to_string();

    let second = tokio::task::spawn_blocking({
        let (models, run, base) = (models.clone(), dir.join("run"), s.base.clone());
        move || {
            distill_wan(
                &models,
                &run,
                "wan-tiny",
                &["--publish", &base, "--admin-token", "sesame"],
            )
        }
    });
    second.await.unwrap();
    let v1: Value = s.generate(clip(1)).await.json().await.unwrap();
    let after = v1["model_version"].as_str().unwrap();
    assert_ne!(after, before, "the continued student serves");
    let frames = fewstep::media::decode(
        &decode_b64(v1["outputs"][0]["data"].as_str().unwrap()),
        "video/mp4",
    )
    .unwrap();
    assert_eq!(frames.len(), 5);
    assert_ne!(
        v1["outputs"][0]["data"], v0["outputs"][0]["data"],
        "the same seed draws another clip"
    );
    s.handle.shutdown().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
