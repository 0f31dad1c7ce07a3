//! The OpenAI-compatible routes under `/v1`, in the shapes openai-python parses.

use std::sync::Arc;

use super::jobs::sse;
use super::*;

async fn post(s: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let r = s.client.post(s.url(path)).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test]
async fn images_generate_returns_n_b64_images_of_the_size_asked() {
    let s = default_server("oai-images").await;
    let (status, body) = post(
        &s,
        "/v1/images/generations",
        json!({"prompt": "a red circle", "n": 2, "size": "32x32", "response_format": "b64_json",
               "quality": "low", "background": "opaque", "user": "u1"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["created"].as_u64().unwrap() > 0);
    assert_eq!(body["size"], "32x32");
    assert_eq!(body["output_format"], "png");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for d in data {
        let img = image::load_from_memory(&decode_b64(d["b64_json"].as_str().unwrap())).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32));
    }
    assert_ne!(data[0]["b64_json"], data[1]["b64_json"]);

    let (status, body) = post(
        &s,
        "/v1/images/generations",
        json!({"prompt": "a red circle", "output_format": "jpeg", "size": "auto"}),
    )
    .await;
    assert_eq!(status, 200);
    let bytes = decode_b64(body["data"][0]["b64_json"].as_str().unwrap());
    assert_eq!(
        image::guess_format(&bytes).unwrap(),
        image::ImageFormat::Jpeg
    );
    s.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn v1_errors_take_openais_shape_and_name_the_field() {
    let s = default_server("oai-errors").await;
    let cases = [
        (
            json!({"prompt": "a", "response_format": "url"}),
            "response_format",
        ),
        (json!({"prompt": "a", "size": "64x64"}), "size"),
        (json!({"prompt": "a", "size": "big"}), "size"),
        (json!({"prompt": "a", "n": 99}), "n"),
        (
            json!({"prompt": "a", "background": "transparent"}),
            "background",
        ),
        (json!({"prompt": "a", "quality": "ultra"}), "quality"),
        (
            json!({"prompt": "a", "partial_images": 4}),
            "partial_images",
        ),
        (
            json!({"prompt": "a", "output_format": "gif"}),
            "output_format",
        ),
        (json!({"prompt": "a", "model": "nope"}), "model"),
        (json!({"prompt": ""}), "prompt"),
    ];
    for (body, param) in cases {
        let (status, e) = post(&s, "/v1/images/generations", body.clone()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
        assert!(!e["error"]["message"].as_str().unwrap().is_empty());
        assert!(e["error"]["code"].is_string());
    }
    let (status, e) = s.get("/v1/models/nope").await;
    assert_eq!(status, 404);
    assert_eq!(e["error"]["type"], "not_found_error");
    s.handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_openais_rate_limit_error() {
    let dir = models_dir("oai-queue", |m| set(m, "serving", "max_batch", 1));
    let mut cfg = config(&dir);
    cfg.queue_capacity = 1;
    let s = Arc::new(start(cfg).await);
    let busy = keep_worker_busy(&s);
    // Let the busy request take the worker first; a video sent before it would take the one
    // queue slot and the busy request itself would get the 429.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut limited = None;
    for _ in 0..20 {
        let r = s
            .client
            .post(s.url("/v1/videos"))
            .json(&json!({"prompt": "a red circle", "seconds": "1"}))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            limited = Some((
                r.headers()["retry-after"].clone(),
                r.json::<Value>().await.unwrap(),
            ));
            break;
        }
    }
    let (retry, e) = limited.expect("the queue filled up");
    assert_eq!(retry, "1");
    assert_eq!(e["error"]["type"], "rate_limit_error");
    assert_eq!(e["error"]["code"], "queue_full");
    assert_eq!(busy.await.unwrap(), 200);
}

#[tokio::test]
async fn models_list_in_openais_shape_with_capabilities_beside() {
    let s = default_server("oai-models").await;
    let (status, list) = s.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(list["object"], "list");
    let m = &list["data"][0];
    assert_eq!(m["id"], "tiny-shapes");
    assert_eq!(m["object"], "model");
    assert_eq!(m["owned_by"], "fewstep");
    assert!(m["created"].as_u64().unwrap() > 0);
    assert_eq!(m["frames"], json!([1, 8]));
    let raw = s
        .client
        .get(s.url("/v1/models/tiny-shapes"))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 200);
    let text = raw.text().await.unwrap();
    // Every key once: parsers differ on which of two `id`s they keep.
    assert_eq!(text.matches("\"id\":").count(), 1, "{text}");
    let one: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(one["id"], "tiny-shapes");
    // The native list keeps its shape.
    let (_, native) = s.get("/models").await;
    assert_eq!(native["default_model"], "tiny-shapes");
    s.handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sends_partial_images_then_the_completed_image() {
    let s = default_server("oai-stream").await;
    let res = s
        .client
        .post(s.url("/v1/images/generations"))
        .json(&json!({"prompt": "a red circle", "stream": true, "partial_images": 2, "seed": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = sse(res).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    // The test model's default is 20 Euler steps: partials after steps 7 and 13.
    assert_eq!(
        names,
        vec![
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    for (i, (name, d)) in events.iter().enumerate() {
        assert_eq!(d["type"], name.as_str());
        assert_eq!(d["size"], "32x32");
        assert_eq!(d["output_format"], "png");
        let img = image::load_from_memory(&decode_b64(d["b64_json"].as_str().unwrap())).unwrap();
        assert_eq!(img.width(), 32);
        if i < 2 {
            assert_eq!(d["partial_image_index"], i);
        } else {
            assert!(d["usage"]["total_tokens"].is_u64());
        }
    }
    // The partials are earlier estimates, not the final image.
    assert_ne!(events[0].1["b64_json"], events[2].1["b64_json"]);
    // The completed image is the one the same seed gives without streaming.
    let (_, plain) = post(
        &s,
        "/v1/images/generations",
        json!({"prompt": "a red circle", "seed": 4}),
    )
    .await;
    assert_eq!(plain["data"][0]["b64_json"], events[2].1["b64_json"]);
    s.handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_job_is_created_polled_downloaded_as_mp4_and_deleted() {
    let s = default_server("oai-videos").await;
    let (status, v) = post(
        &s,
        "/v1/videos",
        json!({"prompt": "a red circle moving right", "seconds": "1", "size": "32x32", "seed": 3}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "video");
    assert_eq!(v["seconds"], "1");
    assert_eq!(v["size"], "32x32");
    let id = v["id"].as_str().unwrap().to_string();
    let mut last = 0;
    let done = loop {
        let (status, v) = s.get(&format!("/v1/videos/{id}")).await;
        assert_eq!(status, 200);
        let p = v["progress"].as_u64().unwrap();
        assert!(p >= last, "progress went back: {last} -> {p}");
        last = p;
        if v["status"] == "completed" {
            break v;
        }
        assert!(
            ["queued", "in_progress"].contains(&v["status"].as_str().unwrap()),
            "{v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(done["progress"], 100);
    assert!(done["completed_at"].as_u64().is_some());

    let r = s
        .client
        .get(s.url(&format!("/v1/videos/{id}/content")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "video/mp4");
    let frames = fewstep::media::decode(&r.bytes().await.unwrap(), "video/mp4").unwrap();
    assert_eq!(frames.len(), 8, "1 second at 8 fps");
    let r = s
        .client
        .get(s.url(&format!("/v1/videos/{id}/content?variant=thumbnail")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/png");
    let thumb = image::load_from_memory(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(thumb.width(), 32);

    let (_, list) = s.get("/v1/videos").await;
    assert_eq!(list["object"], "list");
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["id"] == id.as_str()));

    let (status, e) = post(&s, "/v1/videos", json!({"prompt": "a", "seconds": "3"})).await;
    assert_eq!(status, 400);
    assert_eq!(e["error"]["param"], "seconds");

    let r = s
        .client
        .delete(s.url(&format!("/v1/videos/{id}")))
        .send()
        .await
        .unwrap();
    let gone: Value = r.json().await.unwrap();
    assert_eq!(
        gone,
        json!({"id": id, "object": "video.deleted", "deleted": true})
    );
    let (status, _) = s.get(&format!("/v1/videos/{id}")).await;
    assert_eq!(status, 404);
    s.handle.shutdown().await.unwrap();
}
