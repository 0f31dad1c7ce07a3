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
