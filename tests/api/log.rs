//! The generation log, feedback, admin reload and queue, on SQLite and (when
//! `POSTGRES_TEST_URL` names a server, as in CI) on PostgreSQL.

use super::*;
use fewstep::families::tiny::{flow_schedule, TinyModel, TinySource, TinyTokenizer};
use fewstep::store::{FeedbackRecord, GenerationRecord, Store, StoredOutput};

/// Runs one statement on the server of `POSTGRES_TEST_URL` (its maintenance database,
/// untouched otherwise: no migrations run there).
async fn postgres_admin(base: &str, sql: &str) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(base)
        .await
        .expect("POSTGRES_TEST_URL is reachable");
    sqlx::query(sql).execute(&pool).await.unwrap();
    pool.close().await;
}

/// A fresh, empty PostgreSQL database on the server of `POSTGRES_TEST_URL`.
async fn postgres_url(tag: &str) -> Option<String> {
    let base = std::env::var("POSTGRES_TEST_URL").ok()?;
    let db = format!("fewstep_test_{tag}_{}", std::process::id());
    postgres_admin(&base, &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
    postgres_admin(&base, &format!("CREATE DATABASE {db}")).await;
    let (head, _) = base.rsplit_once('/').expect("a URL with a database name");
    Some(format!("{head}/{db}"))
}

/// Drops a database made by [`postgres_url`] (no-op for SQLite URLs).
async fn drop_database(url: &str) {
    if let (Ok(base), true) = (
        std::env::var("POSTGRES_TEST_URL"),
        url.starts_with("postgres"),
    ) {
        let db = url.rsplit_once('/').map(|(_, d)| d).unwrap_or_default();
        postgres_admin(&base, &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
    }
}

/// SQLite always; PostgreSQL when configured.
async fn store_urls(tag: &str, dir: &std::path::Path) -> Vec<String> {
    let mut urls = vec![format!("sqlite://{}/{tag}.db", dir.display())];
    match postgres_url(tag).await {
        Some(u) => urls.push(u),
        None => eprintln!("POSTGRES_TEST_URL unset: PostgreSQL part skipped"),
    }
    urls
}

fn record(id: &str, prompt: &str, created_ms: i64) -> GenerationRecord {
    GenerationRecord {
        id: id.into(),
        created_ms,
        model: "tiny-shapes".into(),
        model_version: "abc".into(),
        prompt: prompt.into(),
        negative_prompt: String::new(),
        kind: "image".into(),
        width: 32,
        height: 32,
        frames: 1,
        steps: 4,
        guidance: 1.0,
        seeds: vec![7, 8],
        batch_size: 3,
        timings: json!({"total_ms": 12.5}),
        api_key_id: Some("k1".into()),
        outputs: vec![StoredOutput {
            index: 1,
            media_type: "image/png".into(),
            data: "iVBORw0K".into(),
        }],
    }
}

fn rating(id: &str, generation: &str, index: i64, score: f64, at: i64) -> FeedbackRecord {
    FeedbackRecord {
        id: id.into(),
        generation_id: generation.into(),
        output_index: index,
        score,
        thumbs: None,
        comment: Some("ok".into()),
        created_ms: at,
    }
}

#[tokio::test]
async fn store_round_trips_on_every_database() {
    let dir = models_dir("store", |_| {});
    for url in store_urls("roundtrip", &dir).await {
        let store = Store::connect(&url).await.unwrap();
        // Connecting again re-runs the migrations as a no-op.
        let store2 = Store::connect(&url).await.unwrap();
        let a = record("g1", "a red circle", 1_000);
        store.insert_generation(&a).await.unwrap();
        store2
            .insert_generation(&record("g2", "a red circle", 2_000))
            .await
            .unwrap();
        store
            .insert_generation(&record("g3", "two blue squares", 3_000))
            .await
            .unwrap();
        assert!(store.insert_generation(&a).await.is_err(), "ids are unique");
        assert_eq!(store.generation("g1").await.unwrap().unwrap(), a, "{url}");
        assert!(store.generation("nope").await.unwrap().is_none());

        store
            .insert_feedback(&rating("f1", "g1", 1, 0.25, 10))
            .await
            .unwrap();
        store
            .insert_feedback(&rating("f2", "g2", 1, 0.75, 11))
            .await
            .unwrap();
        let fb = store.feedback_for("g1").await.unwrap();
        assert_eq!(fb, vec![rating("f1", "g1", 1, 0.25, 10)]);
        assert!(
            store
                .insert_feedback(&rating("f3", "missing", 0, 1.0, 12))
                .await
                .is_err(),
            "feedback must name a logged generation ({url})"
        );

        let stats = store.prompt_stats(0, Some("tiny-shapes")).await.unwrap();
        assert_eq!(stats.len(), 2);
        let red = stats.iter().find(|s| s.prompt == "a red circle").unwrap();
        assert_eq!((red.generations, red.ratings), (2, 2));
        assert!((red.mean_score.unwrap() - 0.5).abs() < 1e-12);
        let blue = stats
            .iter()
            .find(|s| s.prompt == "two blue squares")
            .unwrap();
        assert_eq!((blue.ratings, blue.mean_score), (0, None));
        assert_eq!(
            store.prompt_stats(2_500, None).await.unwrap().len(),
            1,
            "since filters"
        );
        let rated = store.rated_outputs(0).await.unwrap();
        assert_eq!(rated.len(), 2);
        assert_eq!(rated[0].data, "iVBORw0K");
        drop((store, store2));
        drop_database(&url).await;
    }
}

async fn post_feedback(s: &TestServer, body: Value) -> (u16, Value) {
    let r = s
        .client
        .post(s.url("/feedback"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn feedback_is_validated_and_tied_to_the_logged_generation() {
    let s = default_server("feedback").await;
    let r: Value = s
        .generate(json!({"prompt": "a red circle", "n": 2, "seed": 3, "steps": 1}))
        .await
        .json()
        .await
        .unwrap();
    let id = r["id"].as_str().unwrap().to_string();

    // Right after the response: the log row may still be in flight; feedback waits for it.
    let (code, fb) = post_feedback(&s, json!({"generation_id": id, "score": 0.7})).await;
    assert_eq!(code, 201, "{fb}");
    assert_eq!(fb["output_index"], 0);
    let (code, _) = post_feedback(
        &s,
        json!({"generation_id": id, "output_index": 1, "thumbs": "down", "comment": "blurry"}),
    )
    .await;
    assert_eq!(code, 201);

    for (body, want) in [
        (json!({"generation_id": id}), "invalid_feedback"),
        (json!({"generation_id": id, "score": 1.5}), "invalid_score"),
        (
            json!({"generation_id": id, "score": 0.5, "output_index": 2}),
            "invalid_output_index",
        ),
        (
            json!({"generation_id": id, "thumbs": "sideways"}),
            "invalid_json",
        ),
        (
            json!({"generation_id": id, "score": 0.5, "extra": 1}),
            "invalid_json",
        ),
        (
            json!({"generation_id": id, "score": 0.5, "comment": "x".repeat(2001)}),
            "comment_too_long",
        ),
    ] {
        let (code, p) = post_feedback(&s, body.clone()).await;
        assert_eq!((code, p["code"].as_str().unwrap()), (400, want), "{body}");
    }
    let (code, p) = post_feedback(&s, json!({"generation_id": "gen_nope", "score": 0.5})).await;
    assert_eq!(
        (code, p["code"].as_str().unwrap()),
        (404, "unknown_generation")
    );

    let (_, g) = s.get(&format!("/generations/{id}")).await;
    assert_eq!(g["prompt"], "a red circle");
    assert_eq!(g["seeds"], json!([3, 4]));
    assert_eq!(
        g["kept_outputs"],
        json!([0, 1]),
        "the built-in model keeps its media"
    );
    // Listed in time order; two ratings within one millisecond tie, so compare by output.
    let mut scores: Vec<(i64, f64)> = g["feedback"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["output_index"].as_i64().unwrap(),
                f["score"].as_f64().unwrap(),
            )
        })
        .collect();
    scores.sort_by_key(|&(index, _)| index);
    assert_eq!(scores, vec![(0, 0.7), (1, 0.0)]);
    assert_eq!(s.get("/generations/gen_nope").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_keeps_serving_while_its_database_fails_and_recovers() {
    let dir = models_dir("outage", |_| {});
    for url in store_urls("outage", &dir).await {
        let mut cfg = config(&dir);
        cfg.store_url = Some(url.clone());
        let s = start(cfg).await;
        let side = Store::connect(&url).await.unwrap();
        let dropped = |m: &str| metric(m, "fewstep_log_dropped_total", "db_error");
        let before = dropped(&s.metrics().await);

        // The table disappears under the running server: generations still succeed.
        side.execute("ALTER TABLE generations RENAME TO generations_away")
            .await
            .unwrap();
        let mut lost = Vec::new();
        for seed in 0..3 {
            let r = s
                .generate(json!({"prompt": "a red circle", "seed": seed, "steps": 1}))
                .await;
            assert_eq!(r.status(), 200, "{url}");
            lost.push(
                r.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while dropped(&s.metrics().await) < before + 3.0 {
            assert!(
                std::time::Instant::now() < deadline,
                "drops never counted ({url})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // It comes back: new generations are logged again.
        side.execute("ALTER TABLE generations_away RENAME TO generations")
            .await
            .unwrap();
        let r: Value = s
            .generate(json!({"prompt": "a blue square", "steps": 1}))
            .await
            .json()
            .await
            .unwrap();
        let (found, _) = s
            .get(&format!("/generations/{}", r["id"].as_str().unwrap()))
            .await;
        assert_eq!(found, 200, "{url}");
        let (gone, _) = s.get(&format!("/generations/{}", lost[0])).await;
        assert_eq!(gone, 404, "a dropped record is gone, not half-written");
        s.handle.shutdown().await.unwrap();
        drop(side);
        drop_database(&url).await;
    }
}

/// Writes random weights for the tiny-shapes architecture to `path`.
pub fn random_weights(path: &std::path::Path, seed: u64) {
    let manifest = fewstep::manifest::Manifest::from_file(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny-shapes/manifest.toml"),
    )
    .unwrap();
    let map = candle_nn::VarMap::new();
    let vb = fewstep::nn::random_var_builder(
        &map,
        seed,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    );
    let tiny = manifest.section::<TinySource>().unwrap();
    let tok = TinyTokenizer::from_file(&tiny.tokenizer_path(&manifest.dir)).unwrap();
    let schedule = flow_schedule(&manifest.sampling);
    TinyModel::new(vb, &tiny.architecture, tok, schedule).unwrap();
    map.save(path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_weights_under_load_and_refuses_bad_files() {
    let dir = models_dir("reload", |_| {});
    let mut cfg = config(&dir);
    cfg.admin_token = Some("sesame".into());
    let s = start(cfg).await;
    let admin = |path: &str| {
        s.client
            .post(s.url(path))
            .bearer_auth("sesame")
            .header("content-type", "application/json")
    };
    let version = |body: &Value| body["model_version"].as_str().unwrap().to_string();
    let good = dir.join("good.safetensors");
    random_weights(&good, 5);

    // Reload in the middle of 16 concurrent requests: every request succeeds.
    let requests: Vec<_> = (0..16)
        .map(|seed| {
            let (client, url) = (s.client.clone(), s.url("/generate"));
            let body = json!({"prompt": "a red circle", "seed": seed, "steps": 2});
            tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap() })
        })
        .collect();
    let reloaded = admin("/admin/models/tiny-shapes/reload")
        .json(&json!({"checkpoint": good}))
        .send()
        .await
        .unwrap();
    let mut responses = Vec::new();
    for r in requests {
        responses.push(r.await.unwrap());
    }
    assert_eq!(reloaded.status(), 200);
    let body: Value = reloaded.json().await.unwrap();
    assert_eq!(body["previous_version"], "random-0");
    let new_version = version(&body);
    assert_ne!(new_version, "random-0");
    let mut versions = std::collections::HashSet::new();
    for r in responses {
        assert_eq!(r.status(), 200);
        versions.insert(version(&r.json::<Value>().await.unwrap()));
    }
    assert!(
        versions
            .iter()
            .all(|v| v == "random-0" || *v == new_version),
        "{versions:?}"
    );
    let after: Value = s
        .generate(json!({"prompt": "a red circle", "steps": 2}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(version(&after), new_version);

    // A corrupt file and a missing one are refused; the new version keeps serving.
    let corrupt = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt, b"not a safetensors file").unwrap();
    for (path, code) in [
        (corrupt, "reload_refused"),
        (dir.join("missing.safetensors"), "checkpoint_unavailable"),
    ] {
        let r = admin("/admin/models/tiny-shapes/reload")
            .json(&json!({"checkpoint": path}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422);
        assert_eq!(r.json::<Value>().await.unwrap()["code"], code);
    }
    let still: Value = s
        .generate(json!({"prompt": "a red circle", "steps": 2}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(version(&still), new_version);

    // Admin auth, unknown models and the queue.
    let r = s.client.get(s.url("/admin/queue")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let q: Value = s
        .client
        .get(s.url("/admin/queue"))
        .bearer_auth("sesame")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (q["ready"].as_bool(), q["queued_jobs"].as_u64()),
        (Some(true), Some(0))
    );
    let r = admin("/admin/models/nope/reload")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let open = default_server("reload-off").await;
    let r = open
        .client
        .get(open.url("/admin/queue"))
        .bearer_auth("sesame")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "no admin token configured: admin routes are off"
    );
}

/// The refinement loop at CI size: serve a student, log requests and feedback, distill from
/// the log for a few iterations, publish, and see the new version serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distill_from_the_log_publishes_a_new_version_into_the_running_server() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let dir = std::env::temp_dir().join(format!("fewstep-test-loop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A models directory with the committed teacher and a 2-step student of it (the committed
    // student's weights: they name the teacher as their parent).
    let teacher = dir.join("models/tiny-shapes-teacher");
    std::fs::create_dir_all(&teacher).unwrap();
    for f in ["manifest.toml", "teacher.safetensors", "tokenizer.json"] {
        std::fs::copy(root.join("tiny-shapes-teacher").join(f), teacher.join(f)).unwrap();
    }
    let student = dir.join("models/tiny-shapes");
    std::fs::create_dir_all(&student).unwrap();
    let mut m: toml::Table =
        toml::from_str(&std::fs::read_to_string(teacher.join("manifest.toml")).unwrap()).unwrap();
    m.insert("name".into(), "tiny-shapes".into());
    m.insert("teacher".into(), "tiny-shapes-teacher".into());
    m.insert("architecture".into(), student_architecture());
    set(&mut m, "sampling", "sampler", "student");
    set(&mut m, "sampling", "default_steps", 2);
    set(&mut m, "sampling", "allowed_steps", vec![1, 2]);
    set(&mut m, "sampling", "default_guidance", 1.0);
    set(&mut m, "sampling", "max_guidance", 1.0);
    std::fs::write(student.join("manifest.toml"), toml::to_string(&m).unwrap()).unwrap();
    std::fs::copy(
        root.join("tiny-shapes/student.safetensors"),
        student.join("teacher.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        teacher.join("tokenizer.json"),
        student.join("tokenizer.json"),
    )
    .unwrap();

    let log_url = format!("sqlite://{}/log.db", dir.display());
    let mut cfg = config(&dir.join("models"));
    cfg.allow_random_weights = false;
    cfg.store_url = Some(log_url.clone());
    cfg.admin_token = Some("sesame".into());
    cfg.reload_dirs = vec![dir.join("run")];
    let s = start(cfg).await;
    let (_, before) = s.get("/models").await;
    let v0 = before["models"][0]["version"].as_str().unwrap().to_string();

    // Users ask for a few things and rate them.
    for (i, prompt) in [
        "a red circle",
        "two blue squares",
        "a green triangle on the left",
    ]
    .iter()
    .enumerate()
    {
        let r: Value = s
            .generate(json!({"prompt": prompt, "n": 2, "seed": i}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(r["model_version"], v0.as_str());
        let (code, _) = post_feedback(
            &s,
            json!({"generation_id": r["id"], "score": 0.2 * i as f64}),
        )
        .await;
        assert_eq!(code, 201);
    }

    let conf = dir.join("small.toml");
    std::fs::write(
        &conf,
        "prompts = 2\ngroup_size = 2\nvideo_every = 0\ngenerator_every = 1\nlog_every = 1\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fewstep"))
        .args([
            "distill",
            "--model",
            "tiny-shapes",
            "--steps",
            "2",
            "--eval-prompts",
            "0",
        ])
        .arg("--models-dir")
        .arg(dir.join("models"))
        .arg("--config")
        .arg(&conf)
        .arg("--out")
        .arg(dir.join("run"))
        .args(["--from-log", &log_url, "--min-feedback", "100"])
        .args(["--publish", &s.base, "--admin-token", "sesame"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("using the verifier proxy alone"),
        "{stderr}"
    );
    let used: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/log-source.json")).unwrap())
            .unwrap();
    assert_eq!(used["prompts"]["prompts"], 3);
    assert_eq!(used["reward"]["used"], "verifier");

    let (_, after) = s.get("/models").await;
    let v1 = after["models"][0]["version"].as_str().unwrap().to_string();
    assert_ne!(v1, v0, "the published student serves");
    let r: Value = s
        .generate(json!({"prompt": "a red circle"}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["model_version"], v1.as_str());
    s.handle.shutdown().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// `GET` on `path` until it is no longer 404 (another replica's log writer may be behind).
async fn get_once_logged(s: &TestServer, path: &str) -> (u16, Value) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = s.get(path).await;
        if status != 404 || std::time::Instant::now() >= deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Job state goes to the log: a second replica sharing it answers for the first one's jobs
/// (`GET /jobs/{id}`, its events, `DELETE`, the OpenAI video routes), and so does the first
/// once a job has left its memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_answered_from_the_log_by_any_replica() {
    use super::jobs::{png_pixels, sse, submit_async};
    let dir = models_dir("joblog", |m| {
        set(m, "serving", "keep_media", true);
        set(m, "serving", "max_batch", 1);
    });
    for url in store_urls("joblog", &dir).await {
        let mut cfg = config(&dir);
        cfg.store_url = Some(url.clone());
        cfg.job_ttl_s = 1;
        let a = std::sync::Arc::new(start(cfg.clone()).await);
        let image: Value = a
            .generate(json!({"prompt": "a red circle", "seed": 5, "steps": 2}))
            .await
            .json()
            .await
            .unwrap();
        let image_id = image["id"].as_str().unwrap().to_string();
        let video: Value = a
            .generate(
                json!({"prompt": "a red circle moving right", "num_frames": 8,
                             "steps": 1, "output_format": "mp4"}),
            )
            .await
            .json()
            .await
            .unwrap();
        let video_id = video["id"].as_str().unwrap().to_string();
        // A queued job behind a busy worker, cancelled before it ran.
        let busy = keep_worker_busy(&a);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (cancelled, _) = submit_async(&a, json!({"prompt": "a blue square", "steps": 1})).await;
        assert_eq!(
            a.delete(&format!("/jobs/{cancelled}")).await.0,
            200,
            "{url}"
        );
        assert_eq!(busy.await.unwrap(), 200);

        // Replica B shares the log, and holds none of A's jobs.
        let mut cfg_b = cfg.clone();
        cfg_b.job_ttl_s = 600;
        let b = start(cfg_b).await;
        let (status, job) = get_once_logged(&b, &format!("/jobs/{image_id}")).await;
        assert_eq!(status, 200, "{url}: {job}");
        assert_eq!(job["state"], "completed");
        assert_eq!(
            (job["step"].as_u64(), job["progress"].as_u64()),
            (Some(2), Some(100))
        );
        assert!(job.get("expires_at").is_none(), "the log keeps it: {job}");
        let result = &job["result"];
        assert_eq!(result["id"], image_id.as_str());
        assert_eq!(result["outputs"][0]["seed"], 5);
        assert_eq!(result["model_version"], image["model_version"]);
        assert_eq!(
            png_pixels(&result["outputs"][0]["data"]),
            png_pixels(&image["outputs"][0]["data"]),
            "{url}"
        );
        let (status, job) = get_once_logged(&b, &format!("/jobs/{cancelled}")).await;
        assert_eq!(status, 200, "{url}: {job}");
        assert_eq!(job["state"], "cancelled");
        assert_eq!(job["error"]["code"], "job_cancelled");
        assert_eq!(job["step"], 0);
        assert!(job.get("result").is_none());
        let (status, _) = b.get("/jobs/gen_unknown").await;
        assert_eq!(status, 404);

        // Its events: the final one at once. Cancelling it: refused, it has finished.
        let res = b
            .client
            .get(b.url(&format!("/jobs/{image_id}/events")))
            .send()
            .await
            .unwrap();
        let events = sse(res).await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].0, "completed");
        assert_eq!(events[0].1["result"]["id"], image_id.as_str());
        let (status, p) = b.delete(&format!("/jobs/{image_id}")).await;
        assert_eq!((status, p["code"].as_str()), (409, Some("job_finished")));

        // The OpenAI video routes read the log too: status, the MP4, its thumbnail; delete.
        let (status, v) = get_once_logged(&b, &format!("/v1/videos/{video_id}")).await;
        assert_eq!(status, 200, "{url}: {v}");
        assert_eq!(
            (v["status"].as_str(), v["progress"].as_u64()),
            (Some("completed"), Some(100))
        );
        let mp4 = b
            .client
            .get(b.url(&format!("/v1/videos/{video_id}/content")))
            .send()
            .await
            .unwrap();
        assert_eq!(mp4.headers()["content-type"], "video/mp4");
        let frames = fewstep::media::decode(&mp4.bytes().await.unwrap(), "video/mp4").unwrap();
        assert_eq!(frames.len(), 8);
        let thumb = b
            .client
            .get(b.url(&format!("/v1/videos/{video_id}/content?variant=thumbnail")))
            .send()
            .await
            .unwrap();
        let thumb = image::load_from_memory(&thumb.bytes().await.unwrap()).unwrap();
        assert_eq!((thumb.width(), thumb.height()), (32, 32));
        assert_eq!(b.delete(&format!("/v1/videos/{video_id}")).await.0, 200);
        assert_eq!(b.get(&format!("/v1/videos/{video_id}")).await.0, 404);

        // Replica A, once its jobs have expired from memory (ttl 1 s), answers from the log.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let (status, job) = a.get(&format!("/jobs/{image_id}")).await;
        assert_eq!(status, 200, "{url}: {job}");
        assert_eq!(job["state"], "completed");
        assert!(job.get("expires_at").is_none(), "from the log: {job}");
        b.handle.shutdown().await.unwrap();
        let a = std::sync::Arc::into_inner(a).expect("the busy client is done");
        a.handle.shutdown().await.unwrap();
        drop_database(&url).await;
    }
}
