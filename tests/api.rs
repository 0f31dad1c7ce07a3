//! The HTTP API against a real server on an ephemeral loopback port.

mod common;

use std::io::Cursor;
use std::time::Duration;

use common::*;
use image::AnimationDecoder;
use serde_json::{json, Value};

async fn default_server(tag: &str) -> TestServer {
    start(config(&models_dir(tag, |_| {}))).await
}

#[tokio::test]
async fn image_happy_path_returns_a_decodable_png_with_metadata() {
    let s = default_server("image").await;
    let res = s
        .generate(json!({"prompt": "a red circle", "seed": 5, "steps": 2}))
        .await;
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-generation-id"));
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["model"], "tiny-shapes");
    assert_eq!(body["model_version"], "random-0");
    assert_eq!(body["steps"], 2);
    assert!(body["id"].as_str().unwrap().starts_with("gen_"));
    let out = &body["outputs"][0];
    assert_eq!(out["seed"], 5);
    assert_eq!(out["media_type"], "image/png");
    let img = image::load_from_memory(&decode_b64(out["data"].as_str().unwrap())).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    for stage in [
        "queue_ms",
        "text_encoding_ms",
        "denoising_ms",
        "decoding_ms",
        "encoding_ms",
    ] {
        assert!(body["timings"][stage].as_f64().unwrap() >= 0.0, "{stage}");
    }
    assert!(body["timings"]["total_ms"].as_f64().unwrap() > 0.0);
    s.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn n_outputs_get_consecutive_seeds_and_differ() {
    let s = default_server("n").await;
    let res = s
        .generate(json!({"prompt": "a blue square", "seed": 10, "n": 3, "steps": 1}))
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let outs = body["outputs"].as_array().unwrap();
    assert_eq!(outs.len(), 3);
    let seeds: Vec<u64> = outs.iter().map(|o| o["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, vec![10, 11, 12]);
    assert_ne!(outs[0]["data"], outs[1]["data"]);
    assert!(body["batch_size"].as_u64().unwrap() >= 3);
    s.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn video_comes_back_as_gif_or_apng_with_every_frame() {
    let s = default_server("video").await;
    let res = s
        .generate(json!({"prompt": "a green square moving right", "num_frames": 8, "steps": 1}))
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let out = &body["outputs"][0];
    assert_eq!(out["media_type"], "image/gif");
    assert_eq!(out["num_frames"], 8);
    let bytes = decode_b64(out["data"].as_str().unwrap());
    let gif = image::codecs::gif::GifDecoder::new(Cursor::new(bytes)).unwrap();
    let frames = gif.into_frames().collect_frames().unwrap();
    assert_eq!(frames.len(), 8);
    assert_eq!(frames[0].buffer().dimensions(), (32, 32));

    let res = s
        .generate(json!({"prompt": "a red circle growing", "num_frames": 8, "steps": 1, "output_format": "apng"}))
        .await;
    let body: Value = res.json().await.unwrap();
    let bytes = decode_b64(body["outputs"][0]["data"].as_str().unwrap());
    let reader = png::Decoder::new(Cursor::new(bytes)).read_info().unwrap();
    assert_eq!(reader.info().animation_control.unwrap().num_frames, 8);
    s.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn accept_image_png_returns_raw_bytes() {
    let s = default_server("raw").await;
    let res = s
        .client
        .post(s.url("/generate"))
        .header("accept", "image/png")
        .json(&json!({"prompt": "a red circle", "seed": 3, "steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "image/png");
    assert_eq!(res.headers()["x-seed"], "3");
    let img = image::load_from_memory(&res.bytes().await.unwrap()).unwrap();
    assert_eq!(img.width(), 32);

    // Raw media holds one output only.
    let res = s
        .client
        .post(s.url("/generate"))
        .header("accept", "image/png")
        .json(&json!({"prompt": "a red circle", "n": 2, "steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 406);
    s.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn each_invalid_field_has_its_own_problem_code() {
    let s = default_server("invalid").await;
    let long = "x".repeat(501);
    let cases = [
        (json!({"prompt": ""}), 400, "empty_prompt"),
        (json!({"prompt": "   "}), 400, "empty_prompt"),
        (json!({"prompt": long}), 400, "prompt_too_long"),
        (
            json!({"prompt": "a", "negative_prompt": long}),
            400,
            "negative_prompt_too_long",
        ),
        (json!({"prompt": "a", "n": 0}), 400, "invalid_n"),
        (json!({"prompt": "a", "n": 9}), 400, "invalid_n"),
        (json!({"prompt": "a", "width": 64}), 400, "invalid_size"),
        (
            json!({"prompt": "a", "num_frames": 3}),
            400,
            "invalid_frames",
        ),
        (json!({"prompt": "a", "steps": 7}), 400, "invalid_steps"),
        (
            json!({"prompt": "a", "guidance": 11.0}),
            400,
            "invalid_guidance",
        ),
        (
            json!({"prompt": "a", "guidance": -1.0}),
            400,
            "invalid_guidance",
        ),
        (
            json!({"prompt": "a", "num_frames": 8, "output_format": "png"}),
            400,
            "invalid_output_format",
        ),
        (
            json!({"prompt": "a", "timeout_ms": 0}),
            400,
            "invalid_timeout",
        ),
        // Below the model's batching wait (10 ms) plus the least run time (10 ms): it could
        // only time out.
        (
            json!({"prompt": "a", "timeout_ms": 15}),
            400,
            "invalid_timeout",
        ),
        (
            json!({"prompt": "a", "model": "nope"}),
            400,
            "unknown_model",
        ),
        (json!({"prompt": "a", "colour": "red"}), 400, "invalid_json"),
        (json!({"n": 1}), 400, "invalid_json"),
        (json!({"prompt": "a", "n": -1}), 400, "invalid_json"),
        (
            json!({"prompt": "a", "output_format": "bmp"}),
            400,
            "invalid_json",
        ),
    ];
    for (body, status, code) in cases {
        let res = s.generate(body.clone()).await;
        assert_eq!(res.status().as_u16(), status, "{body}");
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{body}"
        );
        let p: Value = res.json().await.unwrap();
        assert_eq!(p["code"], code, "{body}: {p}");
        assert_eq!(p["status"], status);
        assert!(!p["detail"].as_str().unwrap().is_empty());
    }
    // Not JSON at all, and a body over the limit.
    let res = s
        .client
        .post(s.url("/generate"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = s
        .client
        .post(s.url("/generate"))
        .header("content-type", "application/json")
        .body(vec![b' '; 70 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["code"], "body_too_large");
    // Accept that names nothing the server produces.
    let res = s
        .client
        .post(s.url("/generate"))
        .header("accept", "text/html")
        .json(&json!({"prompt": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 406);
    s.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn api_keys_protect_everything_but_the_probes() {
    let dir = models_dir("auth", |_| {});
    let mut cfg = config(&dir);
    cfg.api_keys = vec!["sekrit".into()];
    let s = start(cfg).await;
    let res = s
        .generate(json!({"prompt": "a red circle", "steps": 1}))
        .await;
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["code"], "missing_api_key");
    let res = s
        .client
        .get(s.url("/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    for path in ["/health", "/ready", "/metrics"] {
        let res = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }
    let res = s
        .client
        .post(s.url("/generate"))
        .bearer_auth("sekrit")
        .json(&json!({"prompt": "a red circle", "steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    s.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn models_endpoint_reports_capabilities_and_untrained_weights() {
    let s = default_server("models").await;
    let body: Value = s
        .client
        .get(s.url("/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["default_model"], "tiny-shapes");
    let m = &body["models"][0];
    assert_eq!(m["id"], "tiny-shapes");
    assert_eq!(m["trained"], false);
    assert_eq!(m["kinds"], json!(["image", "video"]));
    assert_eq!(m["frames"], json!([1, 8]));
    assert_eq!(m["sizes"][0], json!({"width": 32, "height": 32}));
    assert!(m["max_batch"].as_u64().unwrap() >= 8);
    s.handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let dir = models_dir("queue", |m| set(m, "serving", "max_batch", 1));
    let mut cfg = config(&dir);
    cfg.queue_capacity = 1;
    let s = std::sync::Arc::new(start(cfg).await);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let body =
                json!({"prompt": "a red circle", "num_frames": 8, "steps": 8, "guidance": 3.0});
            let r = s.generate(body).await;
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let p: Value = r.json().await.unwrap();
            (status, retry, p)
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        let (status, retry, p) = t.await.unwrap();
        if status == 429 {
            // Derived from the measured drain rate, within its clamp.
            let secs: u64 = retry.as_deref().unwrap().parse().unwrap();
            assert!((1..=60).contains(&secs), "{secs}");
            assert_eq!(p["code"], "queue_full");
        }
        codes.push(status);
    }
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_gives_the_same_image_alone_and_inside_a_batch_of_8() {
    let dir = models_dir("invariance", |m| set(m, "serving", "max_wait_ms", 400));
    // A fixed wait: with the adaptive one, the first of the eight may run alone before the
    // others arrive, and seed 42 may be that one (seen once in CI).
    let s = std::sync::Arc::new(
        start(fewstep::config::ServerConfig {
            adaptive_wait: false,
            ..config(&dir)
        })
        .await,
    );
    let body =
        |seed: u64| json!({"prompt": "a small red circle on the left", "seed": seed, "steps": 4});
    let alone: Value = s.generate(body(42)).await.json().await.unwrap();
    assert_eq!(alone["batch_size"], 1);

    let mut tasks = Vec::new();
    for seed in [1u64, 2, 3, 42, 5, 6, 7, 8] {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.generate(body(seed)).await.json::<Value>().await.unwrap()
        }));
    }
    let mut batched = None;
    for t in tasks {
        let v = t.await.unwrap();
        if v["outputs"][0]["seed"] == 42 {
            batched = Some(v);
        }
    }
    let batched = batched.unwrap();
    assert!(
        batched["batch_size"].as_u64().unwrap() > 1,
        "{}",
        batched["batch_size"]
    );
    let a = image::load_from_memory(&decode_b64(alone["outputs"][0]["data"].as_str().unwrap()))
        .unwrap()
        .to_rgb8();
    let b = image::load_from_memory(&decode_b64(batched["outputs"][0]["data"].as_str().unwrap()))
        .unwrap()
        .to_rgb8();
    // The GEMM library picks its blocking from the matrix sizes, so a row's float result can
    // move by ~1e-6 with the batch around it (measured 2e-6 on the velocity); after 8-bit
    // rounding that may flip a rare subpixel by one level. Leaking another row's content would
    // change far more.
    let diffs: Vec<i32> = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (*x as i32 - *y as i32).abs())
        .filter(|d| *d > 0)
        .collect();
    assert!(
        diffs.iter().all(|d| *d <= 1) && diffs.len() * 200 <= a.as_raw().len(),
        "pixels differ between batch 1 and batch {}: {} subpixels, by up to {:?}",
        batched["batch_size"],
        diffs.len(),
        diffs.iter().max()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_requests_are_all_answered_in_shared_batches() {
    let dir = models_dir("concurrent", |m| set(m, "serving", "max_wait_ms", 50));
    let s = std::sync::Arc::new(start(config(&dir)).await);
    let before = s.metrics().await;
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let r = s
                .generate(json!({"prompt": "a red circle", "seed": i, "steps": 2}))
                .await;
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            (status, v["batch_size"].as_u64().unwrap_or(0))
        }));
    }
    let mut max_batch = 0;
    for t in tasks {
        let (status, batch) = t.await.unwrap();
        assert_eq!(status, 200);
        max_batch = max_batch.max(batch);
    }
    assert!(max_batch > 1);
    // The batch-size histogram saw batches larger than one.
    let after = s.metrics().await;
    let total = metric(&after, "fewstep_batch_size_count", "")
        - metric(&before, "fewstep_batch_size_count", "");
    let ones = metric(&after, "fewstep_batch_size_bucket", "le=\"1\"")
        - metric(&before, "fewstep_batch_size_bucket", "le=\"1\"");
    assert!(total > ones, "all {total} batches had one row");
    assert!(metric(&after, "fewstep_http_requests_total", "route=\"/generate\"") >= 32.0);
    assert!(after.contains("fewstep_stage_seconds_bucket{stage=\"denoising\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_left_never_reaches_the_device() {
    let dir = models_dir("disconnect", |m| set(m, "serving", "max_batch", 1));
    let s = std::sync::Arc::new(start(config(&dir)).await);
    let dropped = |t: &str| metric(t, "fewstep_jobs_dropped_total", "reason=\"client_gone\"");
    let before = dropped(&s.metrics().await);
    // Keep the worker busy, then send a request and hang up before it can run.
    let busy = keep_worker_busy(&s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let quitter = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let r = quitter
        .post(s.url("/generate"))
        .json(&json!({"prompt": "a blue square", "steps": 1}))
        .send()
        .await;
    assert!(r.is_err(), "the request should have timed out client-side");
    assert_eq!(busy.await.unwrap(), 200);
    // The worker looks at the queue again after the busy batch.
    let mut after = before;
    for _ in 0..50 {
        after = dropped(&s.metrics().await);
        if after > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(after, before + 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_is_a_504() {
    let dir = models_dir("deadline", |m| set(m, "serving", "max_batch", 1));
    let s = std::sync::Arc::new(start(config(&dir)).await);
    let busy = keep_worker_busy(&s);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let res = s
        .generate(json!({"prompt": "a red circle", "steps": 1, "timeout_ms": 20}))
        .await;
    assert_eq!(res.status(), 504);
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["code"], "deadline_exceeded");
    assert_eq!(busy.await.unwrap(), 200);
}

/// A video request that occupies the (max_batch 1) worker for a while.
fn keep_worker_busy(
    s: &std::sync::Arc<TestServer>,
) -> tokio::task::JoinHandle<reqwest::StatusCode> {
    let s = s.clone();
    tokio::spawn(async move {
        let body = json!({"prompt": "a red circle", "num_frames": 8, "steps": 8, "guidance": 3.0});
        s.generate(body).await.status()
    })
}

#[test]
fn the_committed_openapi_spec_matches_the_binary() {
    let committed = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json"),
    )
    .expect("openapi/openapi.json is committed; regenerate with `fewstep openapi`");
    assert_eq!(
        committed.trim_end(),
        fewstep::api::openapi::spec_json().trim_end(),
        "openapi/openapi.json is stale: run `cargo run -- openapi > openapi/openapi.json`"
    );
}

#[tokio::test]
async fn spec_and_docs_are_served() {
    let s = default_server("docs").await;
    let spec: Value = s
        .client
        .get(s.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["paths"]["/generate"]["post"].is_object());
    let docs = s.client.get(s.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("swagger"));
    s.handle.shutdown().await.unwrap();
}

/// The real binary: SIGTERM lets accepted requests finish, then the process exits cleanly.
#[test]
fn sigterm_drains_accepted_requests_and_exits_cleanly() {
    use std::process::Command;

    let dir = models_dir("sigterm", |_| {});
    let BinServer {
        mut child,
        addr,
        log,
    } = spawn_binary_server(&dir, &format!("sqlite://{}/log.db", dir.display()));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/generate");
        // Open three keep-alive connections first: a connection the server has not accepted
        // yet when the signal arrives is (rightly) never served.
        let warm: Vec<_> = (0..3)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move {
                    let body = json!({"prompt": "a red circle", "steps": 1});
                    client.post(url).json(&body).send().await.unwrap().status()
                })
            })
            .collect();
        for w in warm {
            assert_eq!(w.await.unwrap(), 200);
        }
        let mut tasks = Vec::new();
        for seed in 0..3u64 {
            let (client, url) = (client.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let body = json!({"prompt": "a red circle", "seed": seed, "num_frames": 8, "steps": 4, "guidance": 3.0});
                client.post(url).json(&body).send().await.map(|r| r.status().as_u16())
            }));
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 200, "an accepted request was dropped");
        }
    });
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    let log = log.join().unwrap().join("\n");
    assert!(log.contains("server stopped"), "{log}");
}

/// `fewstep distill` as a user runs it: a few CI-sized iterations on the committed teacher,
/// a refused overwrite, a resume, and an exported student that loads and generates.
#[test]
fn distill_runs_resumes_and_exports_a_servable_student() {
    use std::process::Command;

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("fewstep-test-distill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("small.toml");
    std::fs::write(
        &config,
        "prompts = 2\ngroup_size = 2\nvideo_every = 2\nvideo_prompts = 1\n\
         generator_every = 2\nlog_every = 1\ncheckpoint_every = 1\n[student_optim]\nlr = 1e-4\n",
    )
    .unwrap();
    let out = dir.join("run");
    let distill = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fewstep"))
            .args([
                "distill",
                "--model",
                "tiny-shapes-teacher",
                "--student-steps",
                "2",
            ])
            .arg("--models-dir")
            .arg(root.join("models"))
            .arg("--config")
            .arg(&config)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    let eval = [
        "--eval-prompts",
        "2",
        "--eval-video-prompts",
        "1",
        "--eval-diversity-prompts",
        "1",
    ];
    let first = distill(&[&["--steps", "2"][..], &eval].concat());
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let log = || std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(log().lines().count(), 2);
    assert!(out.join("eval/report.json").is_file());
    assert!(out.join("losses.png").is_file() && out.join("reward.png").is_file());

    // A second run into the same directory must not clobber it.
    let again = distill(&["--steps", "2", "--eval-prompts", "0"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));

    // Resume to iteration 3.
    let resumed = distill(&["--steps", "3", "--resume", "--eval-prompts", "0"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let last: Value = serde_json::from_str(log().lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 3);
    assert!(last["critic_loss"].as_f64().unwrap().is_finite());

    // The export is a model directory that loads and generates with its own sampler.
    let manifest =
        fewstep::manifest::Manifest::from_file(&out.join("tiny-shapes/manifest.toml")).unwrap();
    assert_eq!(manifest.teacher.as_deref(), Some("tiny-shapes-teacher"));
    assert_eq!(manifest.sampling.default_steps, 2);
    let model = fewstep::manifest::LoadedModel::load(&manifest, &candle_core::Device::Cpu).unwrap();
    let spec = fewstep::pipeline::BatchSpec {
        prompts: vec!["a red circle".into()],
        negative_prompts: vec![String::new()],
        seeds: vec![1],
        frames: 1,
        width: 32,
        height: 32,
    };
    let out_img = model.generate(&spec, 2, 1.0).unwrap();
    assert_eq!(out_img.outputs[0][0].dimensions(), (32, 32));

    // A bad key in the config is a clear error, not a silently ignored setting.
    std::fs::write(&config, "prompt = 2\n").unwrap();
    let bad = distill(&["--steps", "1", "--resume"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("unknown field") && err.contains("prompt"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[path = "api/log.rs"]
mod log;

#[path = "api/sd.rs"]
mod sd;

#[path = "api/wan.rs"]
mod wan;

#[path = "api/jobs.rs"]
mod jobs;

#[path = "api/openai.rs"]
mod openai;

#[path = "api/hardening.rs"]
mod hardening;

#[path = "api/reload.rs"]
mod reload;

#[path = "api/crash.rs"]
mod crash;

#[path = "api/props.rs"]
mod props;

#[path = "api/limits.rs"]
mod limits;

#[path = "api/rollout.rs"]
mod rollout;

#[path = "api/playground.rs"]
mod playground;
