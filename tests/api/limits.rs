//! Ownership per API key, OpenAI-shaped fallbacks under `/v1`, the seed range, feedback with
//! both score and thumbs, per-key quotas and the queue's cost budget.

use serde_json::{json, Value};

use super::common::{config, models_dir, set, start, TestServer};

async fn call(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = s.client.request(method, s.url(path)).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_keys_generations_feedback_and_jobs_are_not_found_but_the_admin_sees_them() {
    let dir = models_dir("ownership", |_| {});
    let mut cfg = config(&dir);
    cfg.api_keys = vec!["key-a".into(), "key-b".into()];
    cfg.admin_token = Some("sesame".into());
    let s = start(cfg).await;
    use reqwest::Method;
    let body = json!({"prompt": "a red circle", "steps": 1, "seed": 3});
    let (status, made) = call(&s, Method::POST, "/generate", "key-a", Some(body)).await;
    assert_eq!(status, 200, "{made}");
    let id = made["id"].as_str().unwrap().to_string();
    for path in [format!("/generations/{id}"), format!("/jobs/{id}")] {
        assert_eq!(
            call(&s, Method::GET, &path, "key-a", None).await.0,
            200,
            "{path}"
        );
        let (status, p) = call(&s, Method::GET, &path, "key-b", None).await;
        assert_eq!(status, 404, "{path}: {p}");
        assert_eq!(
            call(&s, Method::GET, &path, "sesame", None).await.0,
            200,
            "{path}"
        );
    }
    let rating = json!({"generation_id": id, "score": 0.5});
    let (status, p) = call(&s, Method::POST, "/feedback", "key-b", Some(rating.clone())).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (404, Some("unknown_generation"))
    );
    let (status, _) = call(&s, Method::DELETE, &format!("/jobs/{id}"), "key-b", None).await;
    assert_eq!(status, 404);
    // Both a score and thumbs: the spec allows it, so the server takes it.
    let both = json!({"generation_id": id, "score": 0.75, "thumbs": "up"});
    let (status, fb) = call(&s, Method::POST, "/feedback", "key-a", Some(both)).await;
    assert_eq!(status, 201, "{fb}");
    assert_eq!(
        (fb["score"].as_f64(), fb["thumbs"].as_str()),
        (Some(0.75), Some("up"))
    );

    // A video job of key A is invisible to key B in /v1/videos too.
    let video = json!({"prompt": "a red circle moving left", "seconds": "1"});
    let (status, v) = call(&s, Method::POST, "/v1/videos", "key-a", Some(video)).await;
    assert_eq!(status, 200, "{v}");
    let vid = v["id"].as_str().unwrap().to_string();
    let (status, e) = call(&s, Method::GET, &format!("/v1/videos/{vid}"), "key-b", None).await;
    assert_eq!(status, 404, "{e}");
    assert!(e["error"].is_object(), "OpenAI's shape: {e}");
    let (_, list) = call(&s, Method::GET, "/v1/videos", "key-b", None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(0), "{list}");
    let (_, list) = call(&s, Method::GET, "/v1/videos", "key-a", None).await;
    assert_eq!(list["data"].as_array().map(Vec::len), Some(1), "{list}");
    s.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn fallbacks_under_v1_keep_openais_error_shape() {
    let s = start(config(&models_dir("v1-fallbacks", |_| {}))).await;
    let (status, e) = s.get("/v1/nope").await;
    assert_eq!(status, 404);
    assert!(e["error"]["message"].is_string(), "{e}");
    let (status, e) = s.delete("/v1/models").await;
    assert_eq!(status, 405);
    assert!(e["error"]["message"].is_string(), "{e}");
    let res = s
        .client
        .post(s.url("/v1/images/generations"))
        .header("content-type", "text/plain")
        .body(r#"{"prompt": "a red circle"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 415);
    let e: Value = res.json().await.unwrap();
    assert!(e["error"]["message"].is_string(), "{e}");
    s.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn seeds_beyond_int64_are_refused_not_wrapped() {
    let s = start(config(&models_dir("seed-range", |_| {}))).await;
    let max = i64::MAX as u64;
    for (seed, n, ok) in [(max, 1, true), (max, 2, false), (u64::MAX, 1, false)] {
        let res = s
            .generate(json!({"prompt": "a red circle", "steps": 1, "seed": seed, "n": n}))
            .await;
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        if ok {
            assert_eq!(status, 200, "{seed}: {body}");
            assert_eq!(body["outputs"][0]["seed"].as_u64(), Some(seed));
        } else {
            assert_eq!(
                (status, body["code"].as_str()),
                (400, Some("invalid_seed")),
                "{seed}"
            );
        }
    }
    s.handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_rate_and_in_flight_limits_answer_429_with_retry_after() {
    let dir = models_dir("key-limits", |m| set(m, "serving", "max_batch", 1));
    let mut cfg = config(&dir);
    cfg.api_keys = vec!["key-a".into(), "key-b".into()];
    cfg.key_rate_per_s = 0.5;
    cfg.key_burst = 2;
    let s = start(cfg).await;
    let body = json!({"prompt": "a red circle", "steps": 1});
    let send = |key: &'static str| {
        s.client
            .post(s.url("/generate"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    assert_eq!(send("key-a").await.unwrap().status(), 200);
    assert_eq!(send("key-a").await.unwrap().status(), 200);
    let res = send("key-a").await.unwrap();
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["code"], "rate_limited");
    assert_eq!(
        send("key-b").await.unwrap().status(),
        200,
        "keys do not share"
    );
    s.handle.shutdown().await.unwrap();

    let mut cfg = config(&dir);
    cfg.api_keys = vec!["key-a".into()];
    cfg.key_max_in_flight = 1;
    let s = start(cfg).await;
    let slow = json!({"prompt": "a red circle", "num_frames": 8, "steps": 50, "guidance": 3.0});
    let first = s
        .client
        .post(s.url("/generate"))
        .bearer_auth("key-a")
        .header("prefer", "respond-async")
        .json(&slow)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 202);
    let res = s
        .client
        .post(s.url("/generate"))
        .bearer_auth("key-a")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["code"], "too_many_in_flight");
    s.handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_bounded_by_work_not_by_count() {
    let dir = models_dir("cost-budget", |m| set(m, "serving", "max_batch", 1));
    let mut cfg = config(&dir);
    // Room for one 8-frame, 50-step video (32 x 32 x 8 x 50 = 409 600) and a little more.
    cfg.queue_cost_budget = 500_000;
    cfg.queue_capacity = 64;
    let s = start(cfg).await;
    let video = json!({"prompt": "a red circle", "num_frames": 8, "steps": 50, "guidance": 3.0});
    let submit = |body: &Value| {
        s.client
            .post(s.url("/generate"))
            .header("prefer", "respond-async")
            .json(body)
            .send()
    };
    // The first runs at once (out of the queue), the second waits, the third does not fit.
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        let res = submit(&video).await.unwrap();
        statuses.push(res.status().as_u16());
        last = Some(res);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let res = last.unwrap();
    if res.status() == 429 {
        assert!(res.headers().contains_key("retry-after"));
        let p: Value = res.json().await.unwrap();
        assert_eq!(p["code"], "queue_full", "{p}");
    }
    // A small image still fits beside the queued video: count alone would not tell them apart.
    let small = json!({"prompt": "a red circle", "steps": 1});
    assert_eq!(submit(&small).await.unwrap().status(), 202);
    s.handle.shutdown().await.unwrap();
}
