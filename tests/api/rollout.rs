//! Canary rollouts over HTTP: the split by generation id, promote and rollback under load,
//! the report, and the policy acting on real ratings.

use super::log::random_weights;
use super::*;
use fewstep::engine::in_canary;

struct Admin<'a> {
    s: &'a TestServer,
}

impl Admin<'_> {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .s
            .client
            .post(self.s.url(path))
            .bearer_auth("sesame")
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn report(&self) -> Value {
        let r = self
            .s
            .client
            .get(self.s.url("/admin/models/tiny-shapes/rollout"))
            .bearer_auth("sesame")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }
}

async fn generate(s: &TestServer, seed: u64) -> Value {
    let r = s
        .generate(json!({"prompt": "a red circle", "seed": seed, "steps": 1}))
        .await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// `n` requests sent at once, to be awaited after an admin action.
fn concurrent(
    s: &TestServer,
    prompt: &str,
    n: u64,
) -> Vec<tokio::task::JoinHandle<reqwest::Response>> {
    (0..n)
        .map(|seed| {
            let (client, url) = (s.client.clone(), s.url("/generate"));
            let body = json!({"prompt": prompt, "seed": seed, "steps": 1});
            tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap() })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_takes_its_share_by_id_and_is_promoted_or_rolled_back_under_load() {
    let dir = models_dir("rollout", |_| {});
    let mut cfg = config(&dir);
    cfg.admin_token = Some("sesame".into());
    let s = start(cfg).await;
    let admin = Admin { s: &s };
    let weights = dir.join("canary.safetensors");
    random_weights(&weights, 7);

    // Nothing to promote or roll back yet; a share outside (0, 1] is refused.
    for action in ["promote", "rollback"] {
        let (status, p) = admin
            .post(&format!("/admin/models/tiny-shapes/{action}"), json!({}))
            .await;
        assert_eq!((status, p["code"].as_str()), (409, Some("no_canary")));
    }
    for bad in [0.0, -0.5, 1.5] {
        let (status, p) = admin
            .post(
                "/admin/models/tiny-shapes/reload",
                json!({"checkpoint": weights, "canary": bad}),
            )
            .await;
        assert_eq!((status, p["code"].as_str()), (400, Some("invalid_canary")));
    }
    assert!(admin.report().await["canary"].is_null());

    let (status, started) = admin
        .post(
            "/admin/models/tiny-shapes/reload",
            json!({"checkpoint": weights, "canary": 0.5}),
        )
        .await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["canary_share"], 0.5);
    let (stable, canary) = (
        started["previous_version"].as_str().unwrap().to_string(),
        started["model_version"].as_str().unwrap().to_string(),
    );
    assert_ne!(stable, canary);

    // Every response's version is the one its id hashes to.
    let mut on_canary = 0;
    for seed in 0..40 {
        let g = generate(&s, seed).await;
        let id = g["id"].as_str().unwrap();
        let expected = if in_canary(id, 0.5) { &canary } else { &stable };
        assert_eq!(g["model_version"].as_str().unwrap(), expected, "{id}");
        on_canary += usize::from(g["model_version"] == canary.as_str());
    }
    assert!(
        (8..=32).contains(&on_canary),
        "{on_canary} of 40 on a 50% canary"
    );
    let report = admin.report().await;
    assert_eq!(report["share"], 0.5);
    assert_eq!(
        report["stable"]["requests"].as_u64().unwrap()
            + report["canary"]["requests"].as_u64().unwrap(),
        40
    );
    assert_eq!(
        report["canary"]["requests"].as_u64().unwrap(),
        on_canary as u64
    );
    // The reward proxy scored every output of both versions.
    assert_eq!(
        report["canary"]["reward_n"].as_u64().unwrap(),
        on_canary as u64
    );
    assert!(report["canary"]["reward_mean"].as_f64().is_some());
    assert_eq!(report["verdict"]["action"], "wait");
    assert_eq!(report["decisions"][0]["action"], "start");

    // Promote in the middle of 16 concurrent requests: none fails, and afterwards only the
    // promoted version serves.
    let requests = concurrent(&s, "a blue square", 16);
    let (status, promoted) = admin
        .post("/admin/models/tiny-shapes/promote", json!({}))
        .await;
    assert_eq!(status, 200, "{promoted}");
    assert_eq!(promoted["model_version"], canary.as_str());
    assert_eq!(promoted["decision"]["decided_by"], "admin");
    for r in requests {
        let r = r.await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert!(v["model_version"] == stable.as_str() || v["model_version"] == canary.as_str());
    }
    for seed in 0..8 {
        assert_eq!(generate(&s, seed).await["model_version"], canary.as_str());
    }

    // A second canary (the first weights again), rolled back under load.
    let old = dir.join("old.safetensors");
    random_weights(&old, 8);
    let (status, second) = admin
        .post(
            "/admin/models/tiny-shapes/reload",
            json!({"checkpoint": old, "canary": 0.9}),
        )
        .await;
    assert_eq!(status, 200, "{second}");
    let requests = concurrent(&s, "a green cross", 16);
    let (status, rolled) = admin
        .post("/admin/models/tiny-shapes/rollback", json!({}))
        .await;
    assert_eq!(status, 200, "{rolled}");
    assert_eq!(rolled["model_version"], canary.as_str());
    for r in requests {
        assert_eq!(r.await.unwrap().status(), 200);
    }
    for seed in 0..8 {
        assert_eq!(generate(&s, seed).await["model_version"], canary.as_str());
    }
    let report = admin.report().await;
    assert!(report["canary"].is_null());
    let actions: Vec<&str> = report["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["rollback", "start", "promote", "start"]);
    s.handle.shutdown().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_rolls_back_a_canary_users_rate_worse() {
    let dir = models_dir("rollout-policy", |_| {});
    let mut cfg = config(&dir);
    cfg.admin_token = Some("sesame".into());
    cfg.rollout.auto = true;
    cfg.rollout.min_rated_to_decide = 8;
    // Far above what the test rates, so the rollback is the early "worse" one.
    cfg.rollout.min_rated = 60;
    cfg.rollout.check_every_s = 1;
    let s = start(cfg).await;
    let admin = Admin { s: &s };
    let weights = dir.join("bad.safetensors");
    random_weights(&weights, 9);
    let (status, started) = admin
        .post(
            "/admin/models/tiny-shapes/reload",
            json!({"checkpoint": weights, "canary": 0.5}),
        )
        .await;
    assert_eq!(status, 200, "{started}");
    let canary = started["model_version"].as_str().unwrap().to_string();

    // Users like the stable version's outputs and dislike the canary's.
    // Until both have 10 ratings, or the policy (looking every second) has already acted.
    let (mut rated_canary, mut rated_stable) = (0, 0);
    for seed in 0..400u64 {
        if rated_canary >= 10 && rated_stable >= 10 {
            break;
        }
        if seed % 10 == 9 && admin.report().await["canary"].is_null() {
            break;
        }
        let g = generate(&s, seed).await;
        let bad = g["model_version"] == canary.as_str();
        let score = if bad {
            0.1 + 0.05 * (seed % 3) as f64
        } else {
            0.8 + 0.05 * (seed % 3) as f64
        };
        let r = s
            .client
            .post(s.url("/feedback"))
            .json(&json!({"generation_id": g["id"], "score": score}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        if bad {
            rated_canary += 1;
        } else {
            rated_stable += 1;
        }
    }
    // The policy looks every second (slow machines: up to 30 s).
    let mut report = admin.report().await;
    for _ in 0..150 {
        if report["canary"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        report = admin.report().await;
    }
    assert!(report["canary"].is_null(), "not rolled back: {report}");
    let d = &report["decisions"][0];
    assert_eq!(
        (d["action"].as_str(), d["decided_by"].as_str()),
        (Some("rollback"), Some("policy"))
    );
    assert!(d["reason"].as_str().unwrap().starts_with("worse"), "{d}");
    assert!(d["stats"]["canary"]["rated"].as_u64().unwrap() >= 8, "{d}");
    assert_ne!(generate(&s, 1).await["model_version"], canary.as_str());
    // The policy's one decision, in the metrics.
    let metrics = s.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "fewstep_rollout_decisions_total",
            r#"decided_by="policy""#
        ),
        1.0
    );
    s.handle.shutdown().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
