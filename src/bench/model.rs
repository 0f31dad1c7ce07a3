//! Denoiser speed: forward and training-step samples/s, achieved GFLOP/s from the
//! architecture's FLOP count, and the ratio to a plain GEMM of the same total size measured in
//! the same run (the MFU on this machine).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use serde::Serialize;

use crate::families::tiny::{TinyConfig, TinyModel, TinyTokenizer};
use crate::pipeline::FlowSchedule;
use crate::train::{named_vars, AdamW, AdamWConfig};

#[derive(Debug, Clone, Serialize)]
pub struct ModelBenchRow {
    pub batch: usize,
    pub frames: usize,
    pub forward_samples_per_s: f64,
    pub train_samples_per_s: f64,
    /// The same, with `crate::nn::fused` turned off: candle's composed ops only.
    pub naive_forward_samples_per_s: f64,
    pub naive_train_samples_per_s: f64,
    pub forward_gflops: f64,
    pub gemm_gflops: f64,
    /// Forward GFLOP/s over the GEMM's GFLOP/s.
    pub forward_mfu: f64,
}

/// Median wall time of `f` over `reps` runs after one warm-up.
pub fn median_secs(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// GFLOP/s of a `[m, k] x [k, n]` f32 matmul.
pub fn gemm_gflops(m: usize, k: usize, n: usize, reps: usize, device: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (m, k), device)?;
    let b = Tensor::randn(0f32, 1.0, (k, n), device)?;
    let secs = median_secs(reps, || {
        let c = a.matmul(&b)?;
        device.synchronize()?;
        drop(c);
        Ok(())
    })?;
    Ok(2.0 * (m * k * n) as f64 / secs / 1e9)
}

pub fn bench_model(
    cfg: &TinyConfig,
    tokenizer: &TinyTokenizer,
    batches: &[usize],
    frames: usize,
    reps: usize,
    device: &Device,
) -> Result<Vec<ModelBenchRow>> {
    let map = VarMap::new();
    let vb = crate::nn::random_var_builder(&map, 0, DType::F32, device);
    let model = TinyModel::new(vb, cfg, tokenizer.clone(), FlowSchedule::default())?;
    let mut opt = AdamW::new(named_vars(&map), AdamWConfig::default())?;
    let mut rows = Vec::new();
    for &b in batches {
        let x = Tensor::randn(
            0f32,
            1.0,
            (b, frames, cfg.channels, cfg.image_size, cfg.image_size),
            device,
        )?;
        let t: Vec<f32> = (0..b).map(|i| (i as f32 + 0.5) / b as f32).collect();
        let prompts = vec!["a small red circle on the left"; b];
        let text = model.encode(&prompts)?;
        let fwd = |fused: bool| {
            crate::nn::fused::set_fused(fused);
            let r = median_secs(reps, || {
                let v = model.velocity(&x, &t, &text)?;
                device.synchronize()?;
                drop(v);
                Ok(())
            });
            crate::nn::fused::set_fused(true);
            r
        };
        let mut train = |fused: bool| {
            crate::nn::fused::set_fused(fused);
            let r = median_secs(reps, || {
                let text = model.encode(&prompts)?;
                let v = model.velocity(&x, &t, &text)?;
                let loss = (v - &x)?.sqr()?.mean_all()?;
                opt.backward_step(&loss)?;
                Ok(())
            });
            crate::nn::fused::set_fused(true);
            r
        };
        // Fused and naive interleaved over three rounds, so machine noise hits both alike.
        let mut m = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..3 {
            m[0].push(fwd(true)?);
            m[1].push(fwd(false)?);
            m[2].push(train(true)?);
            m[3].push(train(false)?);
        }
        let [fwd, naive_fwd, train, naive_train] = m.map(|mut v| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[1]
        });
        let flops = 2.0 * cfg.macs_per_sample(frames) as f64 * b as f64;
        // A GEMM with the same total work, shaped like the model's token matmuls.
        let tokens = b * frames * cfg.tokens_per_frame();
        let gemm = gemm_gflops(tokens, cfg.dim, cfg.dim * cfg.mlp_ratio, reps, device)?;
        let fwd_gflops = flops / fwd / 1e9;
        rows.push(ModelBenchRow {
            batch: b,
            frames,
            forward_samples_per_s: b as f64 / fwd,
            train_samples_per_s: b as f64 / train,
            naive_forward_samples_per_s: b as f64 / naive_fwd,
            naive_train_samples_per_s: b as f64 / naive_train,
            forward_gflops: fwd_gflops,
            gemm_gflops: gemm,
            forward_mfu: fwd_gflops / gemm,
        });
    }
    Ok(rows)
}
