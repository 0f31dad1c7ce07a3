//! The tiny family's word-level tokenizer, built with `tokenizers` from the world's vocabulary.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::models::wordlevel::WordLevel;
use tokenizers::normalizers::Lowercase;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::Tokenizer;

pub const PAD: &str = "[PAD]";
pub const UNK: &str = "[UNK]";
pub const BOS: &str = "[BOS]";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error("tokenizer file {path}: {message}")]
    File { path: String, message: String },
}

fn err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Tokenizers(e.to_string())
}

/// Token ids of one batch of prompts, padded to a fixed length.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// `[B * max_len]` ids, row-major.
    pub ids: Vec<u32>,
    /// `[B * max_len]`, 1.0 for real tokens, 0.0 for padding.
    pub mask: Vec<f32>,
    pub max_len: usize,
}

#[derive(Clone)]
pub struct TinyTokenizer {
    inner: Tokenizer,
    pad: u32,
    bos: u32,
}

impl TinyTokenizer {
    /// A tokenizer over `words` (lower-cased), with `[PAD]`, `[UNK]`, `[BOS]` first.
    pub fn from_vocabulary(words: &[&str]) -> Result<Self, TokenizerError> {
        let mut vocab: HashMap<String, u32> = HashMap::new();
        for special in [PAD, UNK, BOS] {
            let id = vocab.len() as u32;
            vocab.insert(special.to_string(), id);
        }
        for w in words {
            let w = w.to_lowercase();
            if !vocab.contains_key(&w) {
                let id = vocab.len() as u32;
                vocab.insert(w, id);
            }
        }
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token(UNK.to_string())
            .build()
            .map_err(err)?;
        let mut inner = Tokenizer::new(model);
        inner.with_normalizer(Some(Lowercase)).map_err(err)?;
        inner.with_pre_tokenizer(Some(Whitespace {}));
        Self::from_tokenizer(inner)
    }

    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(path).map_err(|e| TokenizerError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_tokenizer(inner)
    }

    fn from_tokenizer(inner: Tokenizer) -> Result<Self, TokenizerError> {
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| TokenizerError::Tokenizers(format!("vocabulary lacks {t}")))
        };
        Ok(Self {
            pad: id(PAD)?,
            bos: id(BOS)?,
            inner,
        })
    }

    /// Every token and its id (what a text encoder's embedding rows are indexed by).
    pub fn vocabulary(&self) -> HashMap<String, u32> {
        self.inner.get_vocab(true)
    }

    /// Writes the tokenizer as `tokenizer.json` (atomically).
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        let json = self.inner.to_string(true).map_err(err)?;
        crate::util::write_atomic(path, json.as_bytes()).map_err(|e| TokenizerError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `[BOS]` + the prompt's words, truncated and padded to `max_len`. Always at least one
    /// real token, so the empty prompt (the unconditional branch of CFG) is well defined.
    pub fn encode_batch(
        &self,
        prompts: &[&str],
        max_len: usize,
    ) -> Result<TokenBatch, TokenizerError> {
        let mut ids = Vec::with_capacity(prompts.len() * max_len);
        let mut mask = Vec::with_capacity(prompts.len() * max_len);
        for p in prompts {
            let enc = self.inner.encode(*p, false).map_err(err)?;
            let mut row = vec![self.bos];
            row.extend(enc.get_ids().iter().take(max_len.saturating_sub(1)));
            let n = row.len();
            row.resize(max_len, self.pad);
            ids.extend(row);
            mask.extend((0..max_len).map(|i| if i < n { 1.0 } else { 0.0 }));
        }
        Ok(TokenBatch { ids, mask, max_len })
    }
}
