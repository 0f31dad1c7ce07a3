//! The admin reload against hostile or mistaken paths and another model's weights.

use super::*;

/// A models directory with copies of the committed student and teacher.
fn committed_models(tag: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let dir = std::env::temp_dir().join(format!("fewstep-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (model, weights) in [
        ("tiny-shapes", "student.safetensors"),
        ("tiny-shapes-teacher", "teacher.safetensors"),
    ] {
        std::fs::create_dir_all(dir.join(model)).unwrap();
        for f in ["manifest.toml", weights, "tokenizer.json"] {
            std::fs::copy(root.join(model).join(f), dir.join(model).join(f)).unwrap();
        }
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_students_reload_refuses_the_teachers_weights_and_unsafe_paths() {
    let dir = committed_models("reload-identity");
    let mut cfg = config(&dir);
    cfg.models = vec!["tiny-shapes".into(), "tiny-shapes-teacher".into()];
    cfg.allow_random_weights = false;
    cfg.admin_token = Some("sesame".into());
    let s = start(cfg).await;
    let reload = |model: &str, checkpoint: &std::path::Path| {
        s.client
            .post(s.url(&format!("/admin/models/{model}/reload")))
            .bearer_auth("sesame")
            .json(&json!({ "checkpoint": checkpoint }))
            .send()
    };
    let answer = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        let p: Value = r.json().await.unwrap();
        (
            status,
            p["code"].as_str().unwrap_or_default().to_string(),
            p,
        )
    };
    let (_, models) = s.get("/v1/models").await;
    let student_version = models["models"][0]["version"].clone();

    // The teacher's weights as teacher training writes them: with the teacher's identity.
    let teacher_dir = dir.join("tiny-shapes-teacher");
    let tensors = candle_core::safetensors::load(
        teacher_dir.join("teacher.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let manifest =
        fewstep::manifest::Manifest::from_file(&teacher_dir.join("manifest.toml")).unwrap();
    let tiny = manifest.section::<fewstep::families::tiny::TinySource>();
    let identity = fewstep::families::tiny::teacher_identity(&tiny.unwrap().architecture);
    let teacher_file = teacher_dir.join("trained.safetensors");
    fewstep::train::checkpoint::save_weights_atomic(&tensors, &identity, &teacher_file).unwrap();

    let (status, code, p) = answer(reload("tiny-shapes", &teacher_file).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (422, "model_mismatch"), "{p}");
    assert!(p["detail"].as_str().unwrap().contains("teacher"), "{p}");
    // The teacher itself takes it.
    let (status, _, p) = answer(reload("tiny-shapes-teacher", &teacher_file).await.unwrap()).await;
    assert_eq!(status, 200, "{p}");

    // Names and shapes are checked exactly: one tensor too many is refused.
    let mut extra = tensors.clone();
    extra.insert(
        "stowaway".into(),
        candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let extra_file = dir.join("extra.safetensors");
    fewstep::train::checkpoint::save_tensors_atomic(&extra, &extra_file).unwrap();
    let (status, code, p) = answer(reload("tiny-shapes", &extra_file).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (422, "reload_refused"), "{p}");
    assert!(p["detail"].as_str().unwrap().contains("stowaway"), "{p}");

    // Outside the allowed directories, through a symlink, or missing: one answer.
    let outside = std::env::temp_dir().join(format!("fewstep-outside-{}.st", std::process::id()));
    std::fs::copy(teacher_dir.join("teacher.safetensors"), &outside).unwrap();
    let link = dir.join("link.safetensors");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let mut details = Vec::new();
    for path in [outside.clone(), link, dir.join("missing.safetensors")] {
        let (status, code, p) = answer(reload("tiny-shapes", &path).await.unwrap()).await;
        assert_eq!(
            (status, code.as_str()),
            (422, "checkpoint_unavailable"),
            "{path:?}: {p}"
        );
        let detail = p["detail"].as_str().unwrap();
        details.push(detail.replace(&path.display().to_string(), "PATH"));
    }
    details.dedup();
    assert_eq!(details.len(), 1, "{details:?}");

    // A file far larger than the serving weights is refused before it is read (sparse, so
    // it costs no disk).
    let big = dir.join("big.safetensors");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let (status, code, p) = answer(reload("tiny-shapes", &big).await.unwrap()).await;
    assert_eq!(
        (status, code.as_str()),
        (422, "checkpoint_too_large"),
        "{p}"
    );

    // Through all of it the student kept its weights.
    let (_, models) = s.get("/v1/models").await;
    assert_eq!(models["models"][0]["version"], student_version);
    s.handle.shutdown().await.unwrap();
    std::fs::remove_file(outside).ok();
    std::fs::remove_dir_all(dir).ok();
}
