//! The tiny family's text encoder: token + position embeddings and a few pre-norm
//! transformer blocks, trained jointly with the denoiser.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::config::TinyConfig;
use super::tokenizer::TokenBatch;
use crate::nn::{layer_norm, Attention, Linear};

/// Padding keys get this bias: exp() of it is exactly 0 in f32.
const NEG_INF: f64 = -1e9;

/// Encoded prompts: per-token features, the key-padding bias for attention, and a pooled
/// vector (mean over real tokens) for the global conditioning.
#[derive(Debug, Clone)]
pub struct TextCond {
    /// `[B, L, Dt]`
    pub tokens: Tensor,
    /// `[B, 1, 1, L]`: 0 for real tokens, a large negative value for padding.
    pub key_bias: Tensor,
    /// `[B, Dt]`
    pub pooled: Tensor,
    /// `[B, vocab]`: how often each vocabulary word occurs in the prompt (a bag of words).
    /// A word's own row, untouched by the encoder's mixing: what `motion_coords` reads.
    pub words: Tensor,
}

impl TextCond {
    pub fn batch_size(&self) -> Result<usize> {
        self.tokens.dim(0)
    }

    /// Stacks two conditionings along the batch (CFG runs cond and uncond in one pass).
    pub fn cat(&self, other: &TextCond) -> Result<TextCond> {
        Ok(TextCond {
            tokens: Tensor::cat(&[&self.tokens, &other.tokens], 0)?,
            key_bias: Tensor::cat(&[&self.key_bias, &other.key_bias], 0)?,
            pooled: Tensor::cat(&[&self.pooled, &other.pooled], 0)?,
            words: Tensor::cat(&[&self.words, &other.words], 0)?,
        })
    }

    /// The rows at positions `idx` (a `u32` index tensor).
    pub fn select(&self, idx: &Tensor) -> Result<TextCond> {
        Ok(TextCond {
            tokens: self.tokens.index_select(idx, 0)?,
            key_bias: self.key_bias.index_select(idx, 0)?,
            pooled: self.pooled.index_select(idx, 0)?,
            words: self.words.index_select(idx, 0)?,
        })
    }

    /// Key bias repeated per attention head: `[B*H, 1, L]`.
    pub fn head_bias(&self, heads: usize) -> Result<Tensor> {
        head_bias(&self.key_bias, heads)
    }
}

/// `[B, 1, 1, L]` key bias -> `[B*H, 1, L]`, one copy per attention head.
fn head_bias(key_bias: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, _, _, l) = key_bias.dims4()?;
    key_bias
        .broadcast_as((b, heads, 1, l))?
        .contiguous()?
        .reshape((b * heads, 1, l))
}

#[derive(Debug, Clone)]
struct TextBlock {
    attn: Attention,
    fc1: Linear,
    fc2: Linear,
}

#[derive(Debug, Clone)]
pub struct TextEncoder {
    embed: Embedding,
    pos: Tensor,
    blocks: Vec<TextBlock>,
    /// `[x_t, x_{t-1}, ..., x_{t-k}] -> D`, added to `x_t` (`text_mix = k`).
    mix: Option<(Linear, usize)>,
    heads: usize,
    vocab: usize,
    /// The pooled prompt is the empty prompt's ([`TinyConfig::local_text`]).
    local: bool,
}

impl TextEncoder {
    pub fn new(vb: VarBuilder, cfg: &TinyConfig) -> Result<Self> {
        let d = cfg.text_dim;
        let table = vb.get_with_hints(
            (cfg.vocab_size, d),
            "embed.weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.5,
            },
        )?;
        let pos = vb.get_with_hints(
            (cfg.text_max_len, d),
            "pos",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.1,
            },
        )?;
        let blocks = (0..cfg.text_depth)
            .map(|i| {
                let vb = vb.pp(format!("blocks.{i}"));
                // Both residual branches start at zero, so a block added to a trained
                // encoder (a deeper `text_depth` warm-started with `--init-from`) starts as
                // the identity.
                Ok(TextBlock {
                    attn: Attention::new(vb.pp("attn"), d, cfg.heads, true)?,
                    fc1: Linear::new(vb.pp("fc1"), d, 2 * d)?,
                    fc2: Linear::zeros(vb.pp("fc2"), 2 * d, d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Zero-initialised, so it can be added to a trained encoder.
        let mix = match cfg.text_mix {
            0 => None,
            k => Some((Linear::zeros(vb.pp("mix"), (k + 1) * d, d)?, k)),
        };
        Ok(Self {
            embed: Embedding::new(table, d),
            pos,
            blocks,
            mix,
            heads: cfg.heads,
            vocab: cfg.vocab_size,
            local: cfg.local_text,
        })
    }

    pub fn forward(&self, tokens: &TokenBatch) -> Result<TextCond> {
        self.forward_pooling(tokens, if self.local { 1.0 } else { 0.0 })
    }

    /// [`Self::forward`] with the pooled vector `(1 - s) mean + s empty`: `s = 0` pools the
    /// prompt's own tokens, `s = 1` is the empty prompt's vector (`local_text`). Training
    /// fades `s` from 0 to 1, so that what the global path carried moves to cross-attention
    /// gradually (the teacher's `local_text_fade`).
    pub fn forward_pooling(&self, tokens: &TokenBatch, empty_share: f32) -> Result<TextCond> {
        let device = self.pos.device();
        let l = tokens.max_len;
        let b = tokens.ids.len() / l;
        let ids = Tensor::from_slice(&tokens.ids, (b, l), device)?;
        let mask = Tensor::from_slice(&tokens.mask, (b, l), device)?;
        let (x, key_bias) = self.encode(&ids, &mask)?;
        let s = f64::from(empty_share.clamp(0.0, 1.0));
        let own = || -> Result<Tensor> {
            let m = mask.unsqueeze(2)?;
            x.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)
        };
        let empty = || -> Result<Tensor> {
            // Every row starts with `[BOS]`; alone it is the empty prompt.
            let bos = ids.narrow(0, 0, 1)?.narrow(1, 0, 1)?;
            let one = Tensor::ones((1, 1), mask.dtype(), device)?;
            let (empty, _) = self.encode(&bos, &one)?;
            empty
                .reshape((1, ()))?
                .broadcast_as((b, x.dim(2)?))?
                .contiguous()
        };
        let pooled = if s == 0.0 {
            own()?
        } else if s == 1.0 {
            empty()?
        } else {
            ((own()? * (1.0 - s))? + (empty()? * s)?)?
        };
        let mut words = vec![0f32; b * self.vocab];
        for (i, (&id, &real)) in tokens.ids.iter().zip(&tokens.mask).enumerate() {
            if real > 0.0 && (id as usize) < self.vocab {
                words[(i / l) * self.vocab + id as usize] += 1.0;
            }
        }
        let words = Tensor::from_vec(words, (b, self.vocab), device)?.to_dtype(x.dtype())?;
        Ok(TextCond {
            tokens: x,
            key_bias,
            pooled,
            words,
        })
    }

    /// Token features `[B, L, D]` (final layer norm applied) and the key-padding bias of
    /// `ids` `[B, L]` under `mask` `[B, L]` (1 real, 0 padding).
    fn encode(&self, ids: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, l) = ids.dims2()?;
        // (mask - 1) is 0 for real tokens and -1 for padding.
        let key_bias = ((mask.clone() - 1.0)? * -NEG_INF)?.reshape((b, 1, 1, l))?;
        let mut x = self
            .embed
            .forward(ids)?
            .broadcast_add(&self.pos.narrow(0, 0, l)?)?;
        let head_bias = head_bias(&key_bias, self.heads)?;
        for blk in &self.blocks {
            let h = blk.attn.forward(&layer_norm(&x, 1e-5)?, Some(&head_bias))?;
            x = (x + h)?;
            let h = blk
                .fc2
                .forward(&blk.fc1.forward_silu(&layer_norm(&x, 1e-5)?)?)?;
            x = (x + h)?;
        }
        if let Some((mix, k)) = &self.mix {
            // Token t gets tokens t-1..t-k (zeros before the start); padding is only ever
            // after a prompt's tokens, so no real token mixes it in.
            let mut parts = vec![x.clone()];
            for s in 1..=*k {
                parts.push(shift_right(&x, s)?);
            }
            x = (&x + mix.forward(&Tensor::cat(&parts, 2)?)?)?;
        }
        Ok((layer_norm(&x, 1e-5)?, key_bias))
    }
}

/// `x [B, L, D]` moved `s` tokens later along L, zeros in front.
fn shift_right(x: &Tensor, s: usize) -> Result<Tensor> {
    x.pad_with_zeros(1, s, 0)?.narrow(1, 0, x.dim(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn encoder(text_mix: usize, seed: u64) -> (TextEncoder, VarMap) {
        encoder_with(text_mix, false, seed)
    }

    fn encoder_with(text_mix: usize, local_text: bool, seed: u64) -> (TextEncoder, VarMap) {
        let cfg = TinyConfig {
            text_dim: 16,
            heads: 2,
            text_depth: 1,
            text_max_len: 5,
            text_mix,
            vocab_size: 10,
            local_text,
            ..TinyConfig::default()
        };
        let map = VarMap::new();
        let vb = crate::nn::seeded_var_builder(&map, seed, DType::F32, &Device::Cpu);
        (TextEncoder::new(vb, &cfg).unwrap(), map)
    }

    /// Rows of 5 ids, id 0 being padding.
    fn token_batch(rows: &[[u32; 5]]) -> TokenBatch {
        let ids: Vec<u32> = rows.iter().flatten().copied().collect();
        let mask = ids.iter().map(|&i| f32::from(u8::from(i != 0))).collect();
        TokenBatch {
            ids,
            mask,
            max_len: 5,
        }
    }

    fn tokens(encoder: &TextEncoder, rows: &[[u32; 5]]) -> Tensor {
        encoder.forward(&token_batch(rows)).unwrap().tokens
    }

    /// The bag of words counts each real token's id once per occurrence and ignores padding.
    #[test]
    fn words_count_the_prompt_tokens_and_not_the_padding() {
        let (enc, _) = encoder(0, 3);
        let batch = TokenBatch {
            ids: vec![1, 4, 4, 2, 0, 1, 3, 0, 0, 0],
            mask: vec![1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0],
            max_len: 5,
        };
        let words = enc.forward(&batch).unwrap().words.to_vec2::<f32>().unwrap();
        let mut want = vec![vec![0f32; 10]; 2];
        (want[0][1], want[0][2], want[0][4]) = (1.0, 1.0, 2.0);
        (want[1][1], want[1][3]) = (1.0, 1.0);
        assert_eq!(words, want);
    }

    /// The mix starts as the identity (a warm start keeps the trained encoder's function);
    /// trained, it carries the word before a token into that token, and never a later one.
    #[test]
    fn text_mix_starts_as_identity_and_carries_the_preceding_words() {
        let (plain, _) = encoder(0, 7);
        let (mixed, map) = encoder(2, 7);
        let rows = [[1, 2, 3, 4, 0], [1, 5, 3, 4, 0]];
        let d = crate::nn::max_diff(&tokens(&plain, &rows), &tokens(&mixed, &rows));
        assert_eq!(d, 0.0);
        // Without blocks' attention in the way (its output starts at zero too), only the
        // mix moves features between tokens: give it weights.
        for var in map.all_vars() {
            if var.dims() == [16, 48] {
                // Not constant: a shift shared by every channel is what the final layer norm
                // removes.
                let w = Tensor::randn(0f32, 1.0, (16, 48), &Device::Cpu).unwrap();
                var.set(&w).unwrap();
            }
        }
        let out = tokens(&mixed, &rows);
        let row = |r: usize, t: usize| out.get(r).unwrap().get(t).unwrap();
        // Rows differ only at token 1: tokens 1, 2 and 3 (within two after it) change, token 0
        // before it does not, and token 4 (padding, three after) does not.
        assert_eq!(crate::nn::max_diff(&row(0, 0), &row(1, 0)), 0.0);
        for t in 1..=3 {
            assert!(
                crate::nn::max_diff(&row(0, t), &row(1, t)) > 1e-3,
                "token {t}"
            );
        }
        assert_eq!(crate::nn::max_diff(&row(0, 4), &row(1, 4)), 0.0);
    }

    /// With `local_text` every prompt's pooled vector is the empty prompt's (as a plain
    /// encoder pools it for a `[BOS]`-only row), and the tokens are the plain encoder's.
    #[test]
    fn local_text_pools_the_empty_prompt_for_every_prompt() {
        let (plain, _) = encoder_with(2, false, 11);
        let (local, _) = encoder_with(2, true, 11);
        let prompts = token_batch(&[[1, 2, 3, 4, 0], [1, 5, 0, 0, 0]]);
        let empty = token_batch(&[[1, 0, 0, 0, 0]]);
        let (p, l) = (
            plain.forward(&prompts).unwrap(),
            local.forward(&prompts).unwrap(),
        );
        assert_eq!(crate::nn::max_diff(&p.tokens, &l.tokens), 0.0);
        let want = plain.forward(&empty).unwrap().pooled;
        for row in 0..2 {
            let got = l.pooled.get(row).unwrap().unsqueeze(0).unwrap();
            assert!(crate::nn::max_diff(&got, &want) < 1e-6);
        }
        // The plain encoder's pooled vectors do depend on the prompt.
        let rows = |t: &Tensor, r: usize| t.get(r).unwrap();
        assert!(crate::nn::max_diff(&rows(&p.pooled, 0), &rows(&p.pooled, 1)) > 1e-3);
    }

    /// The fade's pooled vector runs from the plain encoder's (share 0) to `local_text`'s
    /// (share 1) along a straight line, and the tokens never change.
    #[test]
    fn pooling_fades_from_the_prompt_to_the_empty_prompt() {
        let (plain, _) = encoder_with(2, false, 13);
        let (local, _) = encoder_with(2, true, 13);
        let prompts = token_batch(&[[1, 2, 3, 4, 0], [1, 5, 0, 0, 0]]);
        let own = plain.forward(&prompts).unwrap();
        let empty = local.forward(&prompts).unwrap();
        let at = |s: f32| local.forward_pooling(&prompts, s).unwrap();
        assert_eq!(crate::nn::max_diff(&at(0.0).pooled, &own.pooled), 0.0);
        assert_eq!(crate::nn::max_diff(&at(1.0).pooled, &empty.pooled), 0.0);
        let quarter = at(0.25);
        let want = ((&own.pooled * 0.75).unwrap() + (&empty.pooled * 0.25).unwrap()).unwrap();
        assert!(crate::nn::max_diff(&quarter.pooled, &want) < 1e-6);
        assert!(crate::nn::max_diff(&quarter.pooled, &own.pooled) > 1e-3);
        assert_eq!(crate::nn::max_diff(&quarter.tokens, &own.tokens), 0.0);
    }
}
