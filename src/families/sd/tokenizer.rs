//! CLIP tokenizers read from a diffusers `tokenizer/` folder, producing ids exactly as
//! transformers' `CLIPTokenizer(padding="max_length", truncation=True)` does: BOS, at most
//! `model_max_length - 2` text tokens, EOS, then the pad token up to `model_max_length`.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;
use tokenizers::Tokenizer;

use super::layout::{read_json, LoadError, TokenizerFiles};

/// CLIP's defaults, used when neither `special_tokens_map.json` nor `tokenizer_config.json`
/// names a token (transformers' `CLIPTokenizer.__init__` defaults).
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const DEFAULT_PAD: &str = "<|endoftext|>";
/// Length used when `tokenizer_config.json` has no usable `model_max_length` (CLIP's 77).
const DEFAULT_MAX_LEN: usize = 77;

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("tokenizing {prompt:?}: {message}")]
    Encode { prompt: String, message: String },
}

/// Token ids for a batch of prompts, each exactly `max_len` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIds {
    /// `[batch * max_len]`, row-major.
    pub ids: Vec<u32>,
    pub batch: usize,
    pub max_len: usize,
}

impl TokenIds {
    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.max_len..(i + 1) * self.max_len]
    }

    /// `[batch, max_len]` u32 ids.
    pub fn tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.ids, (self.batch, self.max_len), device)
    }
}

#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("max_len", &self.max_len)
            .finish()
    }
}

/// A special token in the JSON configs: a plain string or an `AddedToken` object.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads the tokenizer folder `dir` (`tokenizer.json` and the optional configs).
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        Self::from_files(&TokenizerFiles::locate(dir)?)
    }

    pub fn from_files(files: &TokenizerFiles) -> Result<Self, LoadError> {
        let path = &files.tokenizer_json;
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| LoadError::invalid(path, format!("cannot load tokenizer: {e}")))?;
        // Padding and truncation are done here, to transformers' rules.
        inner
            .with_truncation(None)
            .map_err(|e| LoadError::invalid(path, e.to_string()))?;
        inner.with_padding(None);

        let read = |p: &Option<std::path::PathBuf>| -> Result<Value, LoadError> {
            match p {
                Some(p) => read_json(p),
                None => Ok(Value::Null),
            }
        };
        let config = read(&files.tokenizer_config)?;
        let special = read(&files.special_tokens_map)?;
        // transformers lets special_tokens_map.json override tokenizer_config.json.
        let special_token = |key: &str, default: &str| {
            special
                .get(key)
                .and_then(token_content)
                .or_else(|| config.get(key).and_then(token_content))
                .unwrap_or_else(|| default.to_string())
        };
        let id_of = |key: &str, default: &str| -> Result<u32, LoadError> {
            let token = special_token(key, default);
            inner.token_to_id(&token).ok_or_else(|| {
                LoadError::invalid(path, format!("{key} {token:?} is not in the vocabulary"))
            })
        };
        let bos = id_of("bos_token", DEFAULT_BOS)?;
        let eos = id_of("eos_token", DEFAULT_EOS)?;
        let pad = id_of("pad_token", DEFAULT_PAD)?;

        // Unset, transformers stores a huge sentinel (1e30); CLIP's real limit is 77.
        let max_len = config
            .get("model_max_length")
            .and_then(Value::as_f64)
            .filter(|&m| (3.0..=1e6).contains(&m))
            .map_or(DEFAULT_MAX_LEN, |m| m as usize);
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            max_len,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The same tokenizer padding with `pad` (OpenCLIP pads with id 0 whatever the tokenizer
    /// files name; with a causal text tower the padding never reaches the pooled EOS).
    pub fn with_pad_id(mut self, pad: u32) -> Self {
        self.pad = pad;
        self
    }

    /// The same tokenizer producing `max_len` ids per prompt (at least 2: BOS and EOS), e.g.
    /// an OpenCLIP model's `context_length`.
    pub fn with_max_len(mut self, max_len: usize) -> Self {
        self.max_len = max_len.max(2);
        self
    }

    /// Ids of one prompt: `[BOS, text..., EOS, PAD...]`, truncated so that EOS stays last.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>, TokenizeError> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| TokenizeError::Encode {
                prompt: prompt.to_string(),
                message: e.to_string(),
            })?;
        let text = enc.get_ids();
        let keep = text.len().min(self.max_len - 2);
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&text[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }

    pub fn encode_batch(&self, prompts: &[&str]) -> Result<TokenIds, TokenizeError> {
        let mut ids = Vec::with_capacity(prompts.len() * self.max_len);
        for p in prompts {
            ids.extend(self.encode(p)?);
        }
        Ok(TokenIds {
            ids,
            batch: prompts.len(),
            max_len: self.max_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::sd::testing::{fixture, Fixture};

    fn check(fx: &Fixture, tok_dir: &str, key: &str) {
        let tok = ClipTokenizer::load(&fx.dir.join(tok_dir)).unwrap();
        let want = fx.tensor(key).to_dtype(candle_core::DType::I64).unwrap();
        let want: Vec<Vec<i64>> = want.to_vec2().unwrap();
        let prompts = fx.prompts();
        assert_eq!(prompts.len(), want.len(), "{}: prompt count", fx.name);
        let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let got = tok.encode_batch(&prompts).unwrap();
        assert_eq!(got.max_len, 77);
        for (i, w) in want.iter().enumerate() {
            let g: Vec<i64> = got.row(i).iter().map(|&v| v as i64).collect();
            assert_eq!(&g, w, "{} {key} row {i} ({:?})", fx.name, prompts[i]);
        }
        eprintln!("{} {key}: {} rows identical", fx.name, want.len());
    }

    #[test]
    fn ids_match_transformers_for_every_fixture() {
        for name in ["sd15-tiny", "sd2-tiny", "sdxl-tiny"] {
            let fx = fixture(name);
            check(&fx, "tokenizer", "text.input_ids");
            if name == "sdxl-tiny" {
                check(&fx, "tokenizer_2", "text2.input_ids");
            }
        }
    }

    #[test]
    fn long_prompts_keep_eos_last_and_short_ones_are_padded() {
        let fx = fixture("sd2-tiny");
        let tok = ClipTokenizer::load(&fx.dir.join("tokenizer")).unwrap();
        let long = "a photo of a cat ".repeat(60);
        let ids = tok.encode(&long).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[76], tok.eos_id());
        assert!(!ids[1..76].contains(&tok.pad_id()));
        let short = tok.encode("").unwrap();
        assert_eq!(short[1], tok.eos_id());
        assert!(short[2..].iter().all(|&i| i == tok.pad_id()));
    }

    #[test]
    fn a_missing_tokenizer_file_is_named() {
        let dir = std::env::temp_dir().join(format!("fewstep-sd-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = ClipTokenizer::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("not found"),
            "{err}"
        );
        std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
        let err = ClipTokenizer::load(&dir).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
