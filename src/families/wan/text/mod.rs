//! Wan's text conditioning, built as diffusers' `WanPipeline._get_t5_prompt_embeds` builds
//! it: the prompt cleaned, tokenized with its end-of-sequence token and cut at
//! `max_sequence_length`, encoded by umT5 at its own length, then zero-padded to
//! `max_sequence_length` rows. The transformer cross-attends to the zero rows as well (its
//! text embedder turns them into a constant), so the padded length is part of the model's
//! input, not a detail.
//!
//! The encoder is large (umt5-xxl: 5.7B parameters) and prompts repeat (the negative prompt
//! is in every CFG batch), so encodings are kept in an LRU cache keyed by the cleaned prompt.

pub mod umt5;

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use hashlink::LruCache;
use tokenizers::{Tokenizer, TruncationParams};

pub use umt5::{Umt5Config, Umt5Encoder};

use super::WanError;

/// Wan's `max_sequence_length`.
pub const DEFAULT_MAX_LEN: usize = 512;
/// Prompts whose encodings are kept (each `tokens x d_model` on the device: about 0.8 MB
/// for 100 tokens of umt5-xxl in bf16).
pub const DEFAULT_CACHE_PROMPTS: usize = 128;

/// How the prompt cache has served so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
}

struct PromptCache {
    entries: LruCache<String, Tensor>,
    hits: u64,
    misses: u64,
}

/// umT5 tokenizer + encoder + cache: prompts in, `[B, max_len, d_model]` states out.
pub struct WanTextEncoder {
    tokenizer: Tokenizer,
    encoder: Umt5Encoder,
    max_len: usize,
    cache: Option<Mutex<PromptCache>>,
}

impl std::fmt::Debug for WanTextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WanTextEncoder")
            .field("max_len", &self.max_len)
            .field("encoder", &self.encoder.config())
            .field("cache", &self.cache_stats())
            .finish()
    }
}

impl WanTextEncoder {
    /// Loads `tokenizer/` (its `tokenizer.json`) and `text_encoder/` of a diffusers Wan
    /// directory. `cache_prompts` 0 turns the cache off.
    pub fn load(
        tokenizer_dir: &Path,
        encoder_dir: &Path,
        dtype: DType,
        device: &Device,
        max_len: usize,
        cache_prompts: usize,
    ) -> Result<Self, WanError> {
        let path = tokenizer_dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| WanError::Tokenizer {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let encoder = Umt5Encoder::load(encoder_dir, dtype, device)?;
        Self::new(tokenizer, encoder, max_len, cache_prompts)
    }

    pub fn new(
        mut tokenizer: Tokenizer,
        encoder: Umt5Encoder,
        max_len: usize,
        cache_prompts: usize,
    ) -> Result<Self, WanError> {
        if max_len < 2 {
            return Err(WanError::Unsupported(format!(
                "text `max_sequence_length` {max_len}: at least 2 (a token and the end of sequence)"
            )));
        }
        // transformers' `truncation=True, max_length=max_len`: the end-of-sequence token the
        // post-processor adds counts towards the limit and is kept.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| WanError::Unsupported(format!("tokenizer truncation: {e}")))?;
        tokenizer.with_padding(None);
        let cache = (cache_prompts > 0).then(|| {
            Mutex::new(PromptCache {
                entries: LruCache::new(cache_prompts),
                hits: 0,
                misses: 0,
            })
        });
        Ok(Self {
            tokenizer,
            encoder,
            max_len,
            cache,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn encoder(&self) -> &Umt5Encoder {
        &self.encoder
    }

    /// The token ids of `prompt` after [`clean_prompt`], end-of-sequence included.
    pub fn token_ids(&self, prompt: &str) -> Result<Vec<u32>, WanError> {
        self.ids_of_clean(&clean_prompt(prompt))
    }

    /// The ids of an already cleaned prompt.
    fn ids_of_clean(&self, cleaned: &str) -> Result<Vec<u32>, WanError> {
        let enc = self
            .tokenizer
            .encode(cleaned, true)
            .map_err(|e| WanError::Tokenize {
                prompt: cleaned.to_string(),
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// `[B, max_len, d_model]` in the encoder's dtype: each prompt's states, then zeros.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor, WanError> {
        let rows = prompts
            .iter()
            .map(|p| self.encode_one(p))
            .collect::<Result<Vec<_>, _>>()?;
        let padded = rows
            .iter()
            .map(|r| self.pad(r))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&padded, 0)?)
    }

    pub fn cache_stats(&self) -> CacheStats {
        match &self.cache {
            None => CacheStats::default(),
            Some(c) => {
                let c = c.lock().unwrap_or_else(|p| p.into_inner());
                CacheStats {
                    hits: c.hits,
                    misses: c.misses,
                    entries: c.entries.len(),
                }
            }
        }
    }

    /// One prompt's `[tokens, d_model]` states, from the cache when it has them. The lock is
    /// not held while encoding: two threads may encode the same new prompt, which is only
    /// wasted work.
    fn encode_one(&self, prompt: &str) -> Result<Tensor, WanError> {
        let key = clean_prompt(prompt);
        if let Some(cache) = &self.cache {
            let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = c.entries.get(&key).cloned() {
                c.hits += 1;
                metrics::counter!("fewstep_prompt_cache_total", "result" => "hit").increment(1);
                return Ok(t);
            }
            c.misses += 1;
            metrics::counter!("fewstep_prompt_cache_total", "result" => "miss").increment(1);
        }
        let ids = self.ids_of_clean(&key)?;
        let len = ids.len();
        let ids = Tensor::from_vec(ids, (1, len), self.encoder.device())?;
        let states = self.encoder.forward(&ids)?.squeeze(0)?;
        if let Some(cache) = &self.cache {
            let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
            c.entries.insert(key, states.clone());
        }
        Ok(states)
    }

    fn pad(&self, states: &Tensor) -> candle_core::Result<Tensor> {
        let (len, dim) = states.dims2()?;
        if len >= self.max_len {
            return states.narrow(0, 0, self.max_len);
        }
        let zeros = Tensor::zeros((self.max_len - len, dim), states.dtype(), states.device())?;
        Tensor::cat(&[states, &zeros], 0)
    }
}

/// diffusers' Wan `prompt_clean` without ftfy (which repairs mojibake; a prompt typed into a
/// JSON request has none): HTML entities unescaped twice, runs of whitespace made one space,
/// the ends trimmed.
pub fn clean_prompt(prompt: &str) -> String {
    let text = unescape_html(&unescape_html(prompt));
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The entities a typed prompt carries: `&amp; &lt; &gt; &quot; &apos; &#39;`, decimal and
/// hex character references. Python's `html.unescape` knows every HTML5 name; the rest are
/// left as typed.
fn unescape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let decoded = rest.find(';').filter(|&j| j <= 10).and_then(|j| {
            let name = &rest[1..j];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => name
                    .strip_prefix("#x")
                    .or_else(|| name.strip_prefix("#X"))
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .or_else(|| name.strip_prefix('#').and_then(|d| d.parse().ok()))
                    .and_then(char::from_u32),
            };
            c.map(|c| (c, j + 1))
        });
        match decoded {
            Some((c, used)) => {
                out.push(c);
                rest = &rest[used..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests;
