//! The umT5 text path against transformers (`tests/fixtures/wan/umt5-tiny.*`, written by
//! `tools/parity/umt5_fixture.py`), the prompt cache, prompt cleaning and clear errors.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::umt5::relative_position_bucket;
use super::*;
use crate::families::sd::testing::{assert_close, assert_mentions, max_abs};

const NAME: &str = "umt5-tiny";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan")
}

/// The reference tensors and JSON. Panics when absent: a parity test must not pass
/// vacuously.
fn reference() -> (std::collections::HashMap<String, Tensor>, Value) {
    let st = root().join(format!("{NAME}.reference.safetensors"));
    let js = root().join(format!("{NAME}.reference.json"));
    assert!(
        st.is_file() && js.is_file(),
        "parity fixture {NAME} missing: run tools/parity/umt5_fixture.py"
    );
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu).expect("reference");
    let json = serde_json::from_str(&std::fs::read_to_string(js).unwrap()).unwrap();
    (tensors, json)
}

fn load(max_len: usize, cache: usize) -> WanTextEncoder {
    let dir = root().join("wan-tiny-t2v");
    WanTextEncoder::load(
        &dir.join("tokenizer"),
        &dir.join("text_encoder"),
        DType::F32,
        &Device::Cpu,
        max_len,
        cache,
    )
    .expect("tiny umT5")
}

fn prompts(json: &Value) -> Vec<String> {
    json["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn umt5_tiny_prompt_embeddings_match_transformers() {
    let (r, json) = reference();
    let max_len = json["max_sequence_length"].as_u64().unwrap() as usize;
    let enc = load(max_len, 8);
    let prompts = prompts(&json);
    let want_ids: Vec<Vec<i64>> = r["umt5.input_ids"].to_vec2().unwrap();
    let lens: Vec<i64> = r["umt5.seq_lens"].to_vec1().unwrap();
    assert!(
        lens.iter().any(|&l| l as usize == max_len) && lens.contains(&1),
        "the fixture must hold a cut prompt and the empty one"
    );
    for (i, p) in prompts.iter().enumerate() {
        let ids: Vec<i64> = enc
            .token_ids(p)
            .unwrap()
            .iter()
            .map(|&x| x as i64)
            .collect();
        assert_eq!(ids, want_ids[i][..lens[i] as usize], "ids of {p:?}");
    }
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let got = enc.encode(&refs).unwrap();
    assert_close(
        &format!("{NAME} prompt_embeds"),
        &got,
        &r["umt5.prompt_embeds"],
    );
    // The rows after each prompt's length are exactly zero, as the pipeline pads.
    for (i, &l) in lens
        .iter()
        .enumerate()
        .filter(|(_, &l)| (l as usize) < max_len)
    {
        let tail = got
            .get(i)
            .unwrap()
            .narrow(0, l as usize, max_len - l as usize);
        assert_eq!(max_abs(&tail.unwrap()), 0.0, "row {i} padding");
    }
}

#[test]
fn relative_position_buckets_match_transformers_for_umt5_xxl() {
    let (_, json) = reference();
    let b = &json["xxl_buckets"];
    let first = b["first_offset"].as_i64().unwrap();
    let (n, d) = (
        b["num_buckets"].as_u64().unwrap() as usize,
        b["max_distance"].as_u64().unwrap() as usize,
    );
    let want = b["buckets"].as_array().unwrap();
    assert!(want.len() > 1000);
    for (i, w) in want.iter().enumerate() {
        let offset = first + i as i64;
        assert_eq!(
            relative_position_bucket(offset, n, d) as u64,
            w.as_u64().unwrap(),
            "offset {offset}"
        );
    }
}

#[test]
fn the_prompt_cache_serves_repeats_bit_identically_and_evicts_the_least_recent() {
    let enc = load(16, 2);
    let first = enc.encode(&["a red cat"]).unwrap();
    enc.encode(&["a blue dog"]).unwrap();
    // Cleaning makes these the same key.
    let again = enc.encode(&["  a   red cat "]).unwrap();
    assert_eq!(
        (first - &again)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    enc.encode(&["the city"]).unwrap(); // evicts "a blue dog", the least recent
    enc.encode(&["a red cat"]).unwrap();
    enc.encode(&["a blue dog"]).unwrap();
    assert_eq!(
        enc.cache_stats(),
        CacheStats {
            hits: 2,
            misses: 4,
            entries: 2
        }
    );
    let off = load(16, 0);
    off.encode(&["a red cat", "a red cat"]).unwrap();
    assert_eq!(off.cache_stats(), CacheStats::default());
}

#[test]
fn prompts_are_cleaned_as_the_pipeline_cleans_them() {
    assert_eq!(clean_prompt("  a\tred \n\n cat  "), "a red cat");
    assert_eq!(clean_prompt("cats &amp; dogs"), "cats & dogs");
    // Unescaped twice, as diffusers does.
    assert_eq!(clean_prompt("a &amp;lt; b"), "a < b");
    assert_eq!(clean_prompt("&#233;t&#xE9; &quot;x&quot;"), "été \"x\"");
    // Not entities: left as typed, never a panic.
    for s in [
        "a & b",
        "&",
        "&;",
        "&#xZZ;",
        "&#99999999999;",
        "&unknown; é",
    ] {
        assert_eq!(
            clean_prompt(s),
            s.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
}

#[test]
fn bad_configs_and_ids_get_clear_errors() {
    let cfg = |extra: &str| {
        let text = format!(
            r#"{{"vocab_size": 8, "d_model": 4, "d_kv": 2, "d_ff": 4, "num_layers": 1,
                 "num_heads": 2 {extra}}}"#
        );
        let c: Umt5Config = serde_json::from_str(&text).unwrap();
        c.validate().map_err(|e| e.to_string())
    };
    assert!(cfg("").is_ok());
    assert_mentions(
        &cfg(r#", "model_type": "t5""#).unwrap_err(),
        &["model_type", "t5"],
    );
    assert_mentions(
        &cfg(r#", "feed_forward_proj": "gated-swish""#).unwrap_err(),
        &["feed_forward_proj", "gated-swish"],
    );
    assert_mentions(
        &cfg(r#", "relative_attention_num_buckets": 2"#).unwrap_err(),
        &["2 buckets"],
    );

    let enc = load(16, 0);
    let vocab = enc.encoder().config().vocab_size as u32;
    let ids = Tensor::new(&[[1u32, vocab]], &Device::Cpu).unwrap();
    let err = enc.encoder().forward(&ids).unwrap_err().to_string();
    assert_mentions(&err, &["token id", "vocabulary"]);

    let missing = root().join("no-such-model");
    let err = WanTextEncoder::load(
        &missing.join("tokenizer"),
        &missing.join("text_encoder"),
        DType::F32,
        &Device::Cpu,
        16,
        0,
    )
    .unwrap_err()
    .to_string();
    assert_mentions(&err, &["no-such-model", "tokenizer"]);
    let err = WanTextEncoder::load(
        &root().join("wan-tiny-t2v/tokenizer"),
        &root().join("wan-tiny-t2v/text_encoder"),
        DType::F32,
        &Device::Cpu,
        1,
        0,
    )
    .unwrap_err()
    .to_string();
    assert_mentions(&err, &["max_sequence_length", "1"]);
}

#[test]
fn bf16_keeps_wo_and_the_residual_in_f32_and_stays_near_f32() {
    let (_, json) = reference();
    let prompts = prompts(&json);
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let dir = root().join("wan-tiny-t2v");
    let half = WanTextEncoder::load(
        &dir.join("tokenizer"),
        &dir.join("text_encoder"),
        DType::BF16,
        &Device::Cpu,
        16,
        0,
    )
    .expect("bf16 umT5");
    let got = half.encode(&refs).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    let want = load(16, 0).encode(&refs).unwrap();
    crate::families::sd::testing::assert_near_f32("umt5-tiny bf16", &got, &want, 0.05);
}
