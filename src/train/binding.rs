//! Word binding for the teacher: a training-only loss on the DiT's cross-attention that asks
//! each object's tokens to read their own shape word, not their neighbour's.
//!
//! Why: in a two-object scene the missed shape usually copies its neighbour's (session 28),
//! and a cross beside another object is missed 89 times in 116 (session 31), while alone and
//! large it is drawn every time. The flow loss only says which pixels were wrong, not which
//! word should have drawn them. The world knows which pixels each object covers, so it can
//! say that directly, as TokenCompose does with segmentation masks: for every token of an
//! object in a scene that names two shapes, `-log(own / named)`, where `own` is the
//! attention (averaged over heads) on the words naming its shape and `named` that on every
//! shape word. That is the attention's softmax restricted to the shape words: it says which
//! shape word to read, not how much, and leaves the colour, size and `[BOS]` shares alone. It
//! is zero for scenes naming one shape, which already draw. Like the shape head, it changes
//! no weight that ships.

use candle_core::{Device, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::world::{Shape, BACKGROUND_CLASS};

/// Keeps the logs finite where an attention weight underflows. It must stay far below any
/// weight that matters: with 1e-4 here, session 32's first runs escaped the loss by reading
/// no shape word at all (their attention mass fell from 0.13 to 0.001, and two-object scenes
/// got worse), since `(own + eps) / (named + eps)` tends to 1 as both vanish.
const EPS: f64 = 1e-30;

/// The `token_binding` key of a teacher config.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBinding {
    /// The loss's weight beside the flow-matching loss.
    pub weight: f32,
}

impl TokenBinding {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err(format!(
                "token_binding: weight must be a number > 0 (got {})",
                self.weight
            ));
        }
        Ok(())
    }
}

/// The shape a prompt word names, singular or plural.
fn shape_of(word: &str) -> Option<Shape> {
    Shape::all()
        .iter()
        .copied()
        .find(|s| s.name() == word || s.plural() == word)
}

/// Which attention weights the loss reads, for a batch of `B` rows of `F` frames.
pub struct BindingTargets {
    /// `[B, F*N, L]`: 1 where the token is a word naming the shape that covers most of the
    /// image token's patch.
    pub(crate) own: Tensor,
    /// `[B, F*N, L]`: 1 where the token is any shape word of a row naming two shapes or more.
    named: Tensor,
    /// `[B, F*N]`: the share of the patch's pixels its shape covers (0 for background
    /// patches and rows naming fewer than two shapes).
    pub(crate) weight: Tensor,
    /// The sum of `weight` (> 0).
    total: f64,
}

/// The targets of a batch whose rows hold `frames` frames of `size` pixels a side, from the
/// prompts as tokenized (`[BOS]` then one token per word, at most `max_len`) and every frame's
/// per-pixel shape classes ([`crate::world::PixelLabels`], row after row). `None` when no row
/// names two shapes.
pub fn targets(
    prompts: &[String],
    shapes: &[u8],
    frames: usize,
    size: usize,
    patch: usize,
    max_len: usize,
    device: &Device,
) -> Result<Option<BindingTargets>> {
    let (side, pixels) = (size / patch, size * size);
    let n = frames * side * side;
    if shapes.len() != prompts.len() * frames * pixels {
        candle_core::bail!(
            "binding targets: {} pixel labels for {} rows of {frames} frames of {size}x{size}",
            shapes.len(),
            prompts.len()
        );
    }
    let rows = prompts.len();
    let mut own = vec![0f32; rows * n * max_len];
    let mut named = vec![0f32; rows * n * max_len];
    let mut weight = vec![0f32; rows * n];
    let mut total = 0f64;
    for (b, prompt) in prompts.iter().enumerate() {
        // Token `i + 1` is word `i`, after `[BOS]`.
        let words: Vec<(usize, Shape)> = prompt
            .split_whitespace()
            .enumerate()
            .filter(|(i, _)| i + 1 < max_len)
            .filter_map(|(i, w)| shape_of(w).map(|s| (i + 1, s)))
            .collect();
        let mut distinct: Vec<Shape> = words.iter().map(|&(_, s)| s).collect();
        distinct.sort_by_key(|s| s.index());
        distinct.dedup();
        if distinct.len() < 2 {
            continue;
        }
        for f in 0..frames {
            let labels = &shapes[(b * frames + f) * pixels..][..pixels];
            for q in 0..side * side {
                let (gy, gx) = (q / side, q % side);
                let mut counts = [0usize; Shape::COUNT];
                for y in gy * patch..(gy + 1) * patch {
                    for x in gx * patch..(gx + 1) * patch {
                        let c = labels[y * size + x];
                        if c != BACKGROUND_CLASS && (c as usize) < Shape::COUNT {
                            counts[c as usize] += 1;
                        }
                    }
                }
                // The named shape covering most of the patch.
                let Some((shape, count)) = distinct
                    .iter()
                    .map(|s| (*s, counts[s.index()]))
                    .max_by_key(|&(_, c)| c)
                    .filter(|&(_, c)| c > 0)
                else {
                    continue;
                };
                let row = (b * n + f * side * side + q) * max_len;
                for &(token, s) in &words {
                    named[row + token] = 1.0;
                    if s == shape {
                        own[row + token] = 1.0;
                    }
                }
                let w = count as f32 / (patch * patch) as f32;
                weight[b * n + f * side * side + q] = w;
                total += w as f64;
            }
        }
    }
    if total == 0.0 {
        return Ok(None);
    }
    Ok(Some(BindingTargets {
        own: Tensor::from_vec(own, (rows, n, max_len), device)?,
        named: Tensor::from_vec(named, (rows, n, max_len), device)?,
        weight: Tensor::from_vec(weight, (rows, n), device)?,
        total,
    }))
}

/// For one captured map `a` (`[B, F*N, L]`), each image token's attention on its own shape's
/// words and on every shape word, `[B, F*N]` each.
pub(crate) fn masses(a: &Tensor, targets: &BindingTargets) -> Result<(Tensor, Tensor)> {
    if a.dims() != targets.own.dims() {
        candle_core::bail!(
            "binding: attention {:?} against targets {:?}",
            a.dims(),
            targets.own.dims()
        );
    }
    Ok((
        (a * &targets.own)?.sum(D::Minus1)?,
        (a * &targets.named)?.sum(D::Minus1)?,
    ))
}

/// The loss over every captured cross-attention map (`[B, F*N, L]`, averaged over heads),
/// averaged over the maps: the patch-weighted mean of `-log(own / named)`.
pub fn loss(maps: &[Tensor], targets: &BindingTargets) -> Result<Tensor> {
    if maps.is_empty() {
        candle_core::bail!("binding loss: no cross-attention was captured");
    }
    let mut sum: Option<Tensor> = None;
    for a in maps {
        let (own, named) = masses(a, targets)?;
        let per_token = ((named + EPS)?.log()? - (own + EPS)?.log()?)?;
        let term = (per_token * &targets.weight)?.sum_all()?;
        sum = Some(match sum {
            Some(s) => (s + term)?,
            None => term,
        });
    }
    let sum = sum.expect("maps is not empty");
    sum / (targets.total * maps.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One 8x8 frame of 4x4 patches: a cross on the left half, a circle in the top right
    /// patch, background elsewhere.
    fn two_shape_labels() -> Vec<u8> {
        let mut l = vec![BACKGROUND_CLASS; 64];
        for y in 0..8 {
            for x in 0..4 {
                l[y * 8 + x] = Shape::Cross.index() as u8;
            }
        }
        for y in 0..2 {
            for x in 4..8 {
                l[y * 8 + x] = Shape::Circle.index() as u8;
            }
        }
        l
    }

    #[test]
    fn targets_select_each_patchs_own_shape_word_in_two_shape_scenes_only() -> Result<()> {
        let dev = Device::Cpu;
        let prompts = vec![
            "a red cross and a blue circle".to_string(),
            "a red cross".to_string(),
        ];
        let mut labels = two_shape_labels();
        labels.extend(two_shape_labels());
        let t = targets(&prompts, &labels, 1, 8, 4, 8, &dev)?.expect("row 0 names two shapes");
        // Tokens: [BOS] a red cross and a blue circle -> cross at 3, circle at 7.
        let own = t.own.to_vec3::<f32>()?;
        let named = t.named.to_vec3::<f32>()?;
        let weight = t.weight.to_vec2::<f32>()?;
        // Patches (row-major 2x2): 0 and 2 cross, 1 half circle, 3 background.
        assert_eq!(weight[0], vec![1.0, 0.5, 1.0, 0.0]);
        assert_eq!(
            weight[1],
            vec![0.0; 4],
            "one shape named: no binding to learn"
        );
        assert_eq!(own[0][0][3], 1.0);
        assert_eq!(own[0][0][7], 0.0);
        assert_eq!(own[0][1][7], 1.0);
        assert_eq!(own[0][1][3], 0.0);
        assert_eq!(
            (named[0][0][3], named[0][0][7], named[0][0][2]),
            (1.0, 1.0, 0.0)
        );
        assert_eq!(t.total, 2.5);
        // Nothing to bind in a batch of one-shape prompts, or with truncated shape words.
        assert!(targets(&prompts[1..], &labels[64..], 1, 8, 4, 8, &dev)?.is_none());
        assert!(targets(&prompts[..1], &labels[..64], 1, 8, 4, 5, &dev)?.is_none());
        // Labels that do not fit the batch are refused.
        assert!(targets(&prompts, &labels[..64], 1, 8, 4, 8, &dev).is_err());
        Ok(())
    }

    #[test]
    fn the_loss_is_zero_when_bound_and_pushes_toward_the_own_word() -> Result<()> {
        let dev = Device::Cpu;
        let prompts = vec!["a red cross and a blue circle".to_string()];
        let t = targets(&prompts, &two_shape_labels(), 1, 8, 4, 8, &dev)?.unwrap();
        // Every token attends to both shape words equally, or to its own only.
        let mixed = |own_share: f32| -> Result<Tensor> {
            let mut a = vec![0f32; 4 * 8];
            for q in 0..4 {
                let (own, other) = if q == 1 { (7, 3) } else { (3, 7) };
                a[q * 8] = 0.5; // [BOS]
                a[q * 8 + own] = 0.5 * own_share;
                a[q * 8 + other] = 0.5 * (1.0 - own_share);
            }
            Tensor::from_vec(a, (1, 4, 8), &dev)
        };
        let bound = loss(&[mixed(1.0)?], &t)?.to_scalar::<f32>()?;
        let unbound = loss(&[mixed(0.5)?], &t)?.to_scalar::<f32>()?;
        assert!(bound.abs() < 1e-3, "{bound}");
        assert!((unbound - 2f32.ln()).abs() < 1e-3, "{unbound}");
        // Its gradient raises the own word's weight.
        let a = candle_core::Var::from_tensor(&mixed(0.5)?)?;
        let g = loss(&[a.as_tensor().clone()], &t)?.backward()?;
        let g = g.get(&a).unwrap().to_vec3::<f32>()?;
        assert!(g[0][0][3] < 0.0 && g[0][0][7] > 0.0, "{:?}", g[0][0]);
        // Reading less of both words does not escape it: the restricted share is what counts.
        let faint = (mixed(0.5)? * 1e-4)?;
        let faint = loss(&[faint], &t)?.to_scalar::<f32>()?;
        assert!((faint - 2f32.ln()).abs() < 1e-3, "{faint}");
        assert!(loss(&[], &t).is_err());
        Ok(())
    }
}
