//! Property tests: the prompt grammar and the tokenizer never panic on any string, and no
//! request body posted to `/generate` gets a 5xx. Case counts are kept CI-sized.

use proptest::prelude::*;

use super::*;

/// Arbitrary text, and text made of the grammar's own words (which reaches deeper into it).
fn prompt_text() -> impl Strategy<Value = String> {
    let words: Vec<String> = fewstep::world::vocabulary()
        .into_iter()
        .chain(["one", "the", "and", ",", "."])
        .map(String::from)
        .collect();
    prop_oneof![
        any::<String>(),
        "\\PC{0,200}",
        proptest::collection::vec(proptest::sample::select(words), 0..80).prop_map(|w| w.join(" ")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_grammar_never_panics(text in prompt_text()) {
        let _ = fewstep::world::parse(&text);
    }

    #[test]
    fn the_tokenizer_never_panics(text in prompt_text(), max_len in 0usize..40) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/tiny-shapes/tokenizer.json");
        let tok = fewstep::families::tiny::TinyTokenizer::from_file(&path).unwrap();
        if let Ok(batch) = tok.encode_batch(&[text.as_str(), ""], max_len) {
            prop_assert_eq!(batch.ids.len(), 2 * max_len);
        }
    }
}

/// Any JSON value, with the edges that trip parsers and range checks.
fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0u64..70).prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,30}".prop_map(Value::from),
        Just(json!("a red circle")),
        Just(json!(["x", 1])),
        Just(json!({"a": 1})),
    ]
}

const FIELDS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "n",
    "width",
    "height",
    "num_frames",
    "steps",
    "guidance",
    "seed",
    "output_format",
    "timeout_ms",
    "model",
    "unknown",
];

fn request_body() -> impl Strategy<Value = Value> {
    proptest::collection::vec((proptest::sample::select(FIELDS), json_value()), 0..8).prop_map(
        |fields| {
            let mut body = serde_json::Map::new();
            body.insert("prompt".into(), json!("a red circle"));
            for (k, v) in fields {
                body.insert(k.to_string(), v);
            }
            Value::Object(body)
        },
    )
}

#[test]
fn no_request_body_gets_a_5xx() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Images only and few steps, so that the valid cases stay cheap.
    let dir = models_dir("props", |m| {
        set(m, "serving", "frames", vec![1]);
        set(m, "sampling", "allowed_steps", vec![1, 2]);
        set(m, "sampling", "default_steps", 1);
    });
    let s = rt.block_on(start(config(&dir)));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(96));
    runner
        .run(&request_body(), |body| {
            let (status, problem) = rt.block_on(async {
                let r = s.generate(body.clone()).await;
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap_or_default())
            });
            // A deadline the request itself set may pass on a slow machine: that 504 is the
            // answer it asked for, not a server fault.
            let own_deadline = status == 504
                && problem["code"] == "deadline_exceeded"
                && body["timeout_ms"].is_u64();
            prop_assert!(status < 500 || own_deadline, "{body} -> {status} {problem}");
            Ok(())
        })
        .unwrap();
    rt.block_on(s.handle.shutdown()).unwrap();
}

fn any_request() -> impl Strategy<Value = fewstep::engine::GenerationRequest> {
    let small = prop_oneof![
        Just(None),
        (0u32..100).prop_map(Some),
        any::<u32>().prop_map(Some)
    ];
    (
        prompt_text(),
        proptest::option::of(prompt_text()),
        (small.clone(), small.clone(), small.clone()),
        (small.clone(), small),
        proptest::option::of(any::<f32>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(
                prompt,
                negative_prompt,
                (n, width, height),
                (num_frames, steps),
                guidance,
                seed,
                timeout_ms,
            )| {
                fewstep::engine::GenerationRequest {
                    prompt,
                    negative_prompt,
                    n,
                    width,
                    height,
                    num_frames,
                    steps,
                    guidance,
                    seed,
                    output_format: None,
                    timeout_ms,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Validation answers every request with a value or a typed error, never a panic, and
    /// what it accepts keeps every seed in range.
    #[test]
    fn validation_never_panics(req in any_request()) {
        let manifest = fewstep::manifest::Manifest::find(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
            "tiny-shapes-teacher",
        )
        .unwrap();
        let card = fewstep::engine::ModelCard {
            manifest,
            version: "v".into(),
            trained: false,
            created: 0,
            weights_bytes: 0,
            canary: None,
        };
        let cfg = fewstep::config::ServerConfig::default();
        if let Ok(v) = fewstep::engine::validate(req, &card, &cfg) {
            prop_assert!(v.seeds.iter().all(|&s| s <= i64::MAX as u64));
            prop_assert_eq!(v.seeds.len(), v.n);
        }
    }
}
