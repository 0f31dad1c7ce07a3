//! Hostile and careless clients: slow and idle connections, the connection limit, content
//! types, problem+json on every error, and draining.

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

/// Reads until the server closes the connection; `None` if it is still open after `within`.
async fn closed_within(conn: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    match tokio::time::timeout(within, conn.read_to_end(&mut got)).await {
        Ok(_) => Some(got),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_while_requests_go_on() {
    let mut cfg = config(&models_dir("slow-clients", |_| {}));
    cfg.header_read_timeout_ms = 500;
    let s = start(cfg).await;
    let addr = s.handle.addr;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // A header line every 200 ms: each arrives well within the timeout, the whole never.
    let dribbler = tokio::spawn(async move {
        let conn = TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = conn.into_split();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await;
            for i in 0..100 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if wr
                    .write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut sink))
            .await
            .is_ok();
        writer.abort();
        closed
    });
    // A keep-alive connection that finished a request and then goes quiet.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();

    // Normal requests are served all the while.
    for _ in 0..5 {
        assert_eq!(s.get("/health").await.0, 200);
    }
    let res = s
        .generate(json!({"prompt": "a red circle", "steps": 1}))
        .await;
    assert_eq!(res.status(), 200);

    for (i, conn) in idle.iter_mut().enumerate() {
        let got = closed_within(conn, Duration::from_secs(5)).await;
        assert!(got.is_some(), "idle connection {i} is still open");
    }
    assert!(
        dribbler.await.unwrap(),
        "the half-sent request is still open"
    );
    let answer = closed_within(&mut kept, Duration::from_secs(5))
        .await
        .expect("the idle keep-alive connection is still open");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    s.handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_until_one_closes() {
    let mut cfg = config(&models_dir("conn-limit", |_| {}));
    cfg.max_connections = 2;
    cfg.header_read_timeout_ms = 1000;
    let s = start(cfg).await;
    let _a = TcpStream::connect(s.handle.addr).await.unwrap();
    let _b = TcpStream::connect(s.handle.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    // Served, but only once the server has closed one of the two idle connections.
    assert_eq!(s.get("/health").await.0, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "served after {:?} while both slots were taken",
        t.elapsed()
    );
    s.handle.shutdown().await.unwrap();
}

async fn problem(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    assert_eq!(
        res.headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("application/problem+json"),
        "status {status}"
    );
    (status, res.json().await.unwrap())
}

#[tokio::test]
async fn wrong_content_types_unknown_routes_and_big_headers_get_problems() {
    let dir = models_dir("content-types", |_| {});
    let mut cfg = config(&dir);
    cfg.admin_token = Some("sesame".into());
    let s = start(cfg).await;
    let body = r#"{"prompt": "a red circle", "steps": 1}"#;
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut req = s.client.post(s.url("/generate")).body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let (status, p) = problem(req.send().await.unwrap()).await;
        assert_eq!(
            (status, p["code"].as_str()),
            (415, Some("unsupported_media_type")),
            "{ct:?}"
        );
    }
    let res = s
        .client
        .post(s.url("/generate"))
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let (status, p) = problem(s.client.get(s.url("/nope")).send().await.unwrap()).await;
    assert_eq!((status, p["code"].as_str()), (404, Some("not_found")));
    let res = s.client.delete(s.url("/generate")).send().await.unwrap();
    let (status, p) = problem(res).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let res = s
        .client
        .get(s.url("/health"))
        .header("x-big", "x".repeat(20 * 1024))
        .send()
        .await
        .unwrap();
    let (status, p) = problem(res).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (431, Some("headers_too_large"))
    );

    // The reload route: a wrong type and a body that is not a reload request.
    let reload = || {
        s.client
            .post(s.url("/admin/models/tiny-shapes/reload"))
            .bearer_auth("sesame")
    };
    let res = reload()
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, p) = problem(res).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    for bad in [json!({"checkpoint": 5}), json!({"path": "x"})] {
        let (status, p) = problem(reload().json(&bad).send().await.unwrap()).await;
        assert_eq!(
            (status, p["code"].as_str()),
            (400, Some("invalid_json")),
            "{bad}"
        );
    }
    s.handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_auth_scheme_is_case_insensitive() {
    let mut cfg = config(&models_dir("auth-scheme", |_| {}));
    cfg.api_keys = vec!["k1".into()];
    let s = start(cfg).await;
    let cases = [
        ("Bearer k1", 200),
        ("bearer k1", 200),
        ("BEARER k1", 200),
        ("Basic k1", 401),
        ("bearer", 401),
        ("bearerk1", 401),
    ];
    for (header, expected) in cases {
        let res = s
            .client
            .get(s.url("/v1/models"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), expected, "{header}");
    }
    s.handle.shutdown().await.unwrap();
}

/// A request that keeps the (max_batch 1) worker busy for a while.
fn slow_request(base: &str, steps: u32) -> tokio::task::JoinHandle<reqwest::Result<(u16, String)>> {
    let url = format!("{base}/generate");
    tokio::spawn(async move {
        let body =
            json!({"prompt": "a red circle", "num_frames": 8, "steps": steps, "guidance": 3.0});
        let r = reqwest::Client::new().post(url).json(&body).send().await?;
        let status = r.status().as_u16();
        Ok((status, r.text().await?))
    })
}

/// `GET path` on a fresh connection (no pooled one kept from before the drain).
async fn fresh_get(base: &str, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .send()
        .await
        .expect("the server refused a connection while draining");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_draining_health_answers_ready_says_draining_and_accepted_work_finishes() {
    let dir = models_dir("drain", |m| set(m, "serving", "max_batch", 1));
    let s = start(config(&dir)).await;
    let base = s.base.clone();
    let mut handle = s.handle;
    let accepted: Vec<_> = (0..2).map(|_| slow_request(&base, 8)).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    handle.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;

    assert_eq!(fresh_get(&base, "/health").await.0, 200);
    let (status, p) = fresh_get(&base, "/ready").await;
    assert_eq!((status, p["code"].as_str()), (503, Some("draining")));
    let r = reqwest::Client::new()
        .post(format!("{base}/generate"))
        .json(&json!({"prompt": "a red circle", "steps": 1}))
        .send()
        .await
        .unwrap();
    let (status, p) = problem(r).await;
    assert_eq!((status, p["code"].as_str()), (503, Some("draining")));

    for a in accepted {
        assert_eq!(
            a.await.unwrap().unwrap().0,
            200,
            "an accepted request was dropped"
        );
    }
    handle.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_open_at_the_drain_deadline_get_503_not_a_cut_connection() {
    let dir = models_dir("drain-deadline", |m| set(m, "serving", "max_batch", 1));
    let mut cfg = config(&dir);
    cfg.shutdown_timeout_s = 1;
    let s = start(cfg).await;
    let base = s.base.clone();
    let mut handle = s.handle;
    // Far more work than fits in the one second the drain may take.
    let accepted: Vec<_> = (0..4).map(|_| slow_request(&base, 50)).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    handle.begin_shutdown();
    let mut statuses = Vec::new();
    for a in accepted {
        let (status, body) = a
            .await
            .unwrap()
            .expect("the connection was cut instead of answered");
        if status == 503 {
            let p: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(p["code"], "draining");
        } else {
            assert_eq!(status, 200, "{body}");
        }
        statuses.push(status);
    }
    assert!(statuses.contains(&503), "{statuses:?}");
    handle.wait().await.unwrap();
}
