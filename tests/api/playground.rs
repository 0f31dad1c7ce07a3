//! The playground page and its assets: public even when API keys are on, with a strict
//! Content-Security-Policy, and revalidated by ETag.

use super::common::{config, models_dir, start};

#[tokio::test]
async fn the_playground_is_served_with_its_assets_and_a_csp() {
    let dir = models_dir("playground", |_| {});
    let mut cfg = config(&dir);
    cfg.api_keys = vec!["sekrit".into()];
    let s = start(cfg).await;

    for path in ["/", "/playground"] {
        let res = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let h = res.headers();
        assert_eq!(h["content-type"], "text/html; charset=utf-8", "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'self'"), "{csp}");
        assert!(csp.contains("script-src 'self'"), "{csp}");
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("http"),
            "{csp}"
        );
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["cache-control"], "no-cache");
        let html = res.text().await.unwrap();
        assert!(html.contains(r#"<script type="module" src="playground/app.js">"#));
        assert!(html.contains(r#"href="playground/style.css""#));
    }

    for (file, content_type, marker) in [
        ("app.js", "text/javascript; charset=utf-8", "jobEvents"),
        (
            "api.js",
            "text/javascript; charset=utf-8",
            "text/event-stream",
        ),
        ("style.css", "text/css; charset=utf-8", ":focus-visible"),
        ("icon.svg", "image/svg+xml", "<svg"),
    ] {
        let res = s
            .client
            .get(s.url(&format!("/playground/{file}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{file}");
        assert_eq!(res.headers()["content-type"], content_type, "{file}");
        let etag = res.headers()["etag"].clone();
        assert!(res.text().await.unwrap().contains(marker), "{file}");
        // A browser that has it revalidates for a 304 with no body.
        let again = s
            .client
            .get(s.url(&format!("/playground/{file}")))
            .header("if-none-match", etag.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{file}");
        assert_eq!(again.headers()["etag"], etag);
        assert!(again.bytes().await.unwrap().is_empty());
    }

    let res = s
        .client
        .get(s.url("/playground/missing.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    // The page is public; the API it calls still wants the key.
    let res = s.client.get(s.url("/models")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    s.handle.shutdown().await.unwrap();
}
