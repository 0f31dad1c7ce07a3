//! Our fused ops against the composed candle ops they replace, forward + backward, measured
//! side by side in one run.

use candle_core::{Device, Result, Tensor, Var, D};
use serde::Serialize;

use super::model::median_secs;

#[derive(Debug, Clone, Serialize)]
pub struct OpRow {
    pub op: String,
    pub shape: Vec<usize>,
    pub composed_ms: f64,
    pub fused_ms: f64,
    /// `composed / fused`.
    pub speedup: f64,
}

/// Softmax over the last dimension of attention scores `[rows, tq, tk]`, forward + backward.
pub fn softmax(rows: usize, tq: usize, tk: usize, reps: usize, device: &Device) -> Result<OpRow> {
    let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (rows, tq, tk), device)?)?;
    let w = Tensor::randn(0f32, 1.0, (rows, tq, tk), device)?;
    let step = |fused: bool| {
        let y = if fused {
            crate::nn::softmax_last_dim(x.as_tensor())?
        } else {
            candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?
        };
        (y * &w)?.sum_all()?.backward()?;
        Ok(())
    };
    let (composed, fused) = interleaved(reps, step)?;
    Ok(OpRow {
        op: "softmax (last dim), fwd + bwd".into(),
        shape: vec![rows, tq, tk],
        composed_ms: composed * 1e3,
        fused_ms: fused * 1e3,
        speedup: composed / fused,
    })
}

/// Multi-head attention of `[batch, tq, width]` queries over `tk` keys and values: the fused op
/// ([`crate::nn::fused_attention::attend`]) against the composition it replaced (split heads,
/// scores, the one-pass softmax, merge heads). Forward only, or forward + backward.
pub fn attention(
    (batch, tq, tk): (usize, usize, usize),
    (width, heads): (usize, usize),
    backward: bool,
    reps: usize,
    device: &Device,
) -> Result<OpRow> {
    use crate::nn::fused_attention::{attend, composed};
    let var = |t: usize| -> Result<Var> {
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, t, width), device)?)
    };
    let (q, k, v) = (var(tq)?, var(tk)?, var(tk)?);
    let w = Tensor::randn(0f32, 1.0, (batch, tq, width), device)?;
    let step = |fused: bool| {
        let run = if fused { attend } else { composed };
        let (q, k, v) = if backward {
            (
                q.as_tensor().clone(),
                k.as_tensor().clone(),
                v.as_tensor().clone(),
            )
        } else {
            (
                q.as_detached_tensor(),
                k.as_detached_tensor(),
                v.as_detached_tensor(),
            )
        };
        let o = run(&q, &k, &v, heads, None)?;
        if backward {
            (o * &w)?.sum_all()?.backward()?;
        }
        Ok(())
    };
    let (composed, fused) = interleaved(reps, step)?;
    Ok(OpRow {
        op: format!(
            "attention, {heads} heads, {}",
            if backward { "fwd + bwd" } else { "fwd" }
        ),
        shape: vec![batch, tq, tk, width],
        composed_ms: composed * 1e3,
        fused_ms: fused * 1e3,
        speedup: composed / fused,
    })
}

/// A linear layer with bias on `[rows, in]` inputs: the fused op
/// ([`crate::nn::fused_linear::linear_bias`]) against the product followed by the bias add.
/// Forward only, or forward + backward.
pub fn linear(
    (rows, in_dim, out_dim): (usize, usize, usize),
    backward: bool,
    reps: usize,
    device: &Device,
) -> Result<OpRow> {
    use crate::nn::fused_linear::{composed, linear_bias};
    let var = |shape: (usize, usize)| Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, device)?);
    let (x, w) = (var((rows, in_dim))?, var((out_dim, in_dim))?);
    let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, out_dim, device)?)?;
    let g = Tensor::randn(0f32, 1.0, (rows, out_dim), device)?;
    let step = |fused: bool| {
        let run = if fused { linear_bias } else { composed };
        let [x, w, b] = [&x, &w, &b].map(|v| {
            if backward {
                v.as_tensor().clone()
            } else {
                v.as_detached_tensor()
            }
        });
        let y = run(&x, &w, &b)?;
        if backward {
            (y * &g)?.sum_all()?.backward()?;
        }
        Ok(())
    };
    let (composed, fused) = interleaved(reps, step)?;
    Ok(OpRow {
        op: format!(
            "linear + bias, {}",
            if backward { "fwd + bwd" } else { "fwd" }
        ),
        shape: vec![rows, in_dim, out_dim],
        composed_ms: composed * 1e3,
        fused_ms: fused * 1e3,
        speedup: composed / fused,
    })
}

/// A linear layer with bias followed by a SiLU, forward on untracked operands (serving): the
/// SiLU in place on the product ([`crate::nn::fused_linear::linear_bias_silu`]) against the
/// fused linear, then the fused SiLU.
pub fn linear_silu(
    (rows, in_dim, out_dim): (usize, usize, usize),
    reps: usize,
    device: &Device,
) -> Result<OpRow> {
    use crate::nn::fused_linear::{linear_bias, linear_bias_silu};
    let x = Tensor::randn(0f32, 1.0, (rows, in_dim), device)?;
    let w = Tensor::randn(0f32, 1.0, (out_dim, in_dim), device)?;
    let b = Tensor::randn(0f32, 1.0, out_dim, device)?;
    let (composed, fused) = interleaved(reps, |fused| {
        if fused {
            linear_bias_silu(&x, &w, &b).map(drop)
        } else {
            crate::nn::fused::silu(&linear_bias(&x, &w, &b)?).map(drop)
        }
    })?;
    Ok(OpRow {
        op: "linear + bias + SiLU, fwd".into(),
        shape: vec![rows, in_dim, out_dim],
        composed_ms: composed * 1e3,
        fused_ms: fused * 1e3,
        speedup: composed / fused,
    })
}

/// The whole model's forward at `batch` on the weights as `serve` holds them (plain tensors)
/// against the same weights as trainable `Var`s, whose forward records a graph and keeps every
/// activation alive until the output is dropped.
pub fn served_forward(
    setup: &super::model::ModelBenchSetup,
    batch: usize,
    reps: usize,
    device: &Device,
) -> Result<OpRow> {
    let (map, model) = setup.build(device)?;
    let served = setup.served(&map, device)?;
    let (x, t) = setup.rows(batch, 1, device)?;
    let prompts = vec![super::model::PROMPT; batch];
    let text = served.encode(&prompts)?;
    let (c, f) = interleaved(reps, |plain| {
        let m = if plain { &served } else { &model };
        m.velocity(&x, &t, &text).map(drop)
    })?;
    Ok(OpRow {
        op: "model forward, served weights (not Vars)".into(),
        shape: vec![batch],
        composed_ms: c * 1e3,
        fused_ms: f * 1e3,
        speedup: c / f,
    })
}

/// A 3x3 convolution (stride 1, padding 1) of `[n, c, hw, hw]` images to `co` channels, forward:
/// ours ([`crate::nn::direct_conv::conv3x3`]) against candle's im2col `conv2d`.
pub fn conv3x3(
    (n, c, co, hw): (usize, usize, usize, usize),
    reps: usize,
    device: &Device,
) -> Result<OpRow> {
    let x = Tensor::randn(0f32, 1.0, (n, c, hw, hw), device)?;
    let w = Tensor::randn(0f32, 0.05, (co, c, 3, 3), device)?;
    let (composed, fused) = interleaved(reps, |fused| {
        let y = if fused {
            crate::nn::direct_conv::conv3x3(&x, &w)
        } else {
            x.conv2d(&w, 1, 1, 1, 1)
        };
        y.map(drop)
    })?;
    Ok(OpRow {
        op: "conv 3x3, fwd".into(),
        shape: vec![n, c, co, hw],
        composed_ms: composed * 1e3,
        fused_ms: fused * 1e3,
        speedup: composed / fused,
    })
}

/// The median seconds of `step(false)` (composed) and `step(true)` (fused) over three
/// interleaved rounds of `reps` runs each, so that machine noise hits both alike.
fn interleaved(reps: usize, mut step: impl FnMut(bool) -> Result<()>) -> Result<(f64, f64)> {
    let (mut c, mut f) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        c.push(median_secs(reps, || step(false))?);
        f.push(median_secs(reps, || step(true))?);
    }
    c.sort_by(|a, b| a.total_cmp(b));
    f.sort_by(|a, b| a.total_cmp(b));
    Ok((c[1], f[1]))
}

/// The whole model at `batch` with one fused op (`what`, switched by `toggle`) against the
/// composition it replaced, every other kernel on: a forward (of the served model), and a
/// training step (forward, backward, AdamW).
pub fn model_toggle(
    setup: &super::model::ModelBenchSetup,
    batch: usize,
    reps: usize,
    device: &Device,
    (what, toggle): (&str, fn(bool)),
) -> Result<[OpRow; 2]> {
    let (map, model) = setup.build(device)?;
    let served = setup.served(&map, device)?;
    let mut opt = crate::train::AdamW::new(
        crate::train::named_vars(&map),
        crate::train::AdamWConfig::default(),
    )?;
    let (x, t) = setup.rows(batch, 1, device)?;
    let prompts = vec![super::model::PROMPT; batch];
    let text = served.encode(&prompts)?;
    let (fc, ff) = interleaved(reps, |fused| {
        toggle(fused);
        let r = served.velocity(&x, &t, &text).map(drop);
        toggle(true);
        r
    })?;
    let (tc, tf) = interleaved(reps, |fused| {
        toggle(fused);
        let r = super::model::train_step(&model, &mut opt, &prompts, &x, &t);
        toggle(true);
        r
    })?;
    let row = |step: &str, c: f64, f: f64| OpRow {
        op: format!("model {step}, {what}"),
        shape: vec![batch],
        composed_ms: c * 1e3,
        fused_ms: f * 1e3,
        speedup: c / f,
    };
    Ok([row("forward", fc, ff), row("train step", tc, tf)])
}
