//! Denoiser speed: forward and training-step samples/s, achieved GFLOP/s from the
//! architecture's FLOP count, and the ratio to a plain GEMM of the same total size measured in
//! the same run (the MFU on this machine).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
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
    /// The same by this process's CPU time instead of wall time.
    pub forward_cpu_samples_per_s: f64,
    pub train_cpu_samples_per_s: f64,
    /// The same, with `crate::nn::fused` turned off: candle's composed ops only.
    pub naive_forward_samples_per_s: f64,
    pub naive_train_samples_per_s: f64,
    pub forward_gflops: f64,
    pub gemm_gflops: f64,
    /// Forward GFLOP/s over the GEMM's GFLOP/s.
    pub forward_mfu: f64,
}

/// Median wall time of `f` over `reps` runs after one warm-up.
pub fn median_secs(reps: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    Ok(median_wall_and_cpu(reps, f)?.0)
}

/// Median wall time and median CPU time of this process (all its threads) of `f` over `reps`
/// runs after one warm-up. On a shared machine the CPU time is what the work cost, whatever
/// share of the cores the other processes left it.
pub fn median_wall_and_cpu(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    f()?;
    let (mut wall, mut cpu) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for _ in 0..reps {
        let (t, c) = (Instant::now(), process_cpu_secs());
        f()?;
        wall.push(t.elapsed().as_secs_f64());
        cpu.push(process_cpu_secs() - c);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Ok((median(wall), median(cpu)))
}

/// CPU seconds this process has used, over all its threads.
pub fn process_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// This process's peak resident set in MiB (Linux `VmHWM`): of its own address space, unlike
/// `getrusage`'s, which carries over the parent's pages when the process was started by
/// `vfork` + `exec` (Python's `subprocess` does).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
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

/// The prompt of every row of the denoiser table (`tools/torch_bench.py` encodes the same).
pub const PROMPT: &str = "a small red circle on the left";

/// What the denoiser table runs on.
pub struct ModelBenchSetup<'a> {
    pub cfg: &'a TinyConfig,
    pub tokenizer: &'a TinyTokenizer,
    /// Weights to load (the same values another runtime is given); random ones without.
    pub weights: Option<&'a Path>,
    /// Batch-first inputs: `x` `[B, F, C, H, W]` and `t` `[B]`; random ones when empty.
    pub inputs: &'a HashMap<String, Tensor>,
}

impl ModelBenchSetup<'_> {
    /// The model in trainable variables, with the weights loaded when given.
    pub(crate) fn build(&self, device: &Device) -> Result<(VarMap, TinyModel)> {
        let mut map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 0, DType::F32, device);
        let model = TinyModel::new(
            vb,
            self.cfg,
            self.tokenizer.clone(),
            FlowSchedule::default(),
        )?;
        if let Some(path) = self.weights {
            map.load(path)?;
        }
        Ok((map, model))
    }

    /// The model as `serve` holds it: the same weights as plain tensors, not `Var`s, so a
    /// forward pass records no graph and frees each activation once it is used (PyTorch's
    /// side of `tools/torch_bench.py` runs its forward under `no_grad` alike).
    pub(crate) fn served(&self, map: &VarMap, device: &Device) -> Result<TinyModel> {
        let tensors = map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the VarMap's lock is poisoned".into()))?
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect();
        TinyModel::new(
            VarBuilder::from_tensors(tensors, DType::F32, device),
            self.cfg,
            self.tokenizer.clone(),
            FlowSchedule::default(),
        )
    }

    /// `x` and `t` for `b` rows: the first `b` of the inputs, or random latents and evenly
    /// spread times.
    pub(crate) fn rows(
        &self,
        b: usize,
        frames: usize,
        device: &Device,
    ) -> Result<(Tensor, Vec<f32>)> {
        let (Some(x), Some(t)) = (self.inputs.get("x"), self.inputs.get("t")) else {
            if !self.inputs.is_empty() {
                candle_core::bail!("inputs: need tensors x and t");
            }
            let c = self.cfg;
            let x = Tensor::randn(
                0f32,
                1.0,
                (b, frames, c.channels, c.image_size, c.image_size),
                device,
            )?;
            return Ok((x, (0..b).map(|i| (i as f32 + 0.5) / b as f32).collect()));
        };
        if x.dim(0)? < b || x.dim(1)? != frames {
            candle_core::bail!(
                "inputs: x is {:?}, batch {b} of {frames} frame(s) needs more",
                x.dims()
            );
        }
        let t = t.narrow(0, 0, b)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok((
            x.narrow(0, 0, b)?.to_dtype(DType::F32)?.to_device(device)?,
            t,
        ))
    }
}

/// One forward and one training loss of the first `batch` rows, before any update, for a
/// parity check against another runtime: `velocity` `[B, F, C, H, W]`, the MSE `loss`
/// against `x` (what the table's training step minimises) and the global `grad_norm` of all
/// weights (text encoder and denoiser) under it.
pub fn parity_outputs(
    setup: &ModelBenchSetup,
    batch: usize,
    frames: usize,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let (map, model) = setup.build(device)?;
    let (x, t) = setup.rows(batch, frames, device)?;
    let prompts = vec![PROMPT; batch];
    let v = model.velocity(&x, &t, &model.encode(&prompts)?)?;
    let loss = (&v - &x)?.sqr()?.mean_all()?;
    let opt = AdamW::new(named_vars(&map), AdamWConfig::default())?;
    let grad_norm = opt.grad_norm(&loss.backward()?)?;
    Ok(HashMap::from([
        ("velocity".to_string(), v.detach()),
        ("loss".to_string(), loss.detach().reshape(1)?),
        (
            "grad_norm".to_string(),
            Tensor::new(&[grad_norm as f32], device)?,
        ),
    ]))
}

/// One training step of the benchmark: encode the prompts, predict the velocity of `x` at
/// `t`, and take an AdamW step on its squared distance to `x`.
pub(crate) fn train_step(
    model: &TinyModel,
    opt: &mut AdamW,
    prompts: &[&str],
    x: &Tensor,
    t: &[f32],
) -> Result<()> {
    let text = model.encode(prompts)?;
    let v = model.velocity(x, t, &text)?;
    opt.backward_step(&(v - x)?.sqr()?.mean_all()?).map(drop)
}

pub fn bench_model(
    setup: &ModelBenchSetup,
    batches: &[usize],
    frames: usize,
    reps: usize,
    device: &Device,
) -> Result<Vec<ModelBenchRow>> {
    let cfg = setup.cfg;
    let (map, model) = setup.build(device)?;
    let served = setup.served(&map, device)?;
    let mut opt = AdamW::new(named_vars(&map), AdamWConfig::default())?;
    let mut rows = Vec::new();
    for &b in batches {
        let (x, t) = setup.rows(b, frames, device)?;
        let prompts = vec![PROMPT; b];
        let text = served.encode(&prompts)?;
        let fwd = |fused: bool| {
            crate::nn::fused::set_fused(fused);
            let r = median_wall_and_cpu(reps, || {
                let v = served.velocity(&x, &t, &text)?;
                device.synchronize()?;
                drop(v);
                Ok(())
            });
            crate::nn::fused::set_fused(true);
            r
        };
        let mut train = |fused: bool| {
            crate::nn::fused::set_fused(fused);
            let r = median_wall_and_cpu(reps, || train_step(&model, &mut opt, &prompts, &x, &t));
            crate::nn::fused::set_fused(true);
            r
        };
        // A GEMM with the same total work, shaped like the model's token matmuls.
        let tokens = b * frames * cfg.tokens_per_frame();
        let gemm = || gemm_gflops(tokens, cfg.dim, cfg.dim * cfg.mlp_ratio, reps, device);
        // Fused, naive and the GEMM interleaved over three rounds, so machine noise hits all
        // alike (the MFU is a ratio of two of them).
        let mut m = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        let mut gemms = Vec::new();
        for _ in 0..3 {
            m[0].push(fwd(true)?);
            gemms.push(gemm()?);
            m[1].push(fwd(false)?);
            m[2].push(train(true)?);
            m[3].push(train(false)?);
        }
        gemms.sort_by(|a, b| a.total_cmp(b));
        let gemm = gemms[1];
        // The middle round of each, by wall time and by CPU time.
        let [fwd, naive_fwd, train, naive_train] = m.map(|v| {
            let mid = |k: fn(&(f64, f64)) -> f64| {
                let mut x: Vec<f64> = v.iter().map(k).collect();
                x.sort_by(|a, b| a.total_cmp(b));
                x[1]
            };
            (mid(|p| p.0), mid(|p| p.1))
        });
        let (fwd, fwd_cpu) = fwd;
        let (train, train_cpu) = train;
        let (naive_fwd, naive_train) = (naive_fwd.0, naive_train.0);
        let flops = 2.0 * cfg.macs_per_sample(frames) as f64 * b as f64;
        let fwd_gflops = flops / fwd / 1e9;
        rows.push(ModelBenchRow {
            batch: b,
            frames,
            forward_samples_per_s: b as f64 / fwd,
            train_samples_per_s: b as f64 / train,
            forward_cpu_samples_per_s: b as f64 / fwd_cpu,
            train_cpu_samples_per_s: b as f64 / train_cpu,
            naive_forward_samples_per_s: b as f64 / naive_fwd,
            naive_train_samples_per_s: b as f64 / naive_train,
            forward_gflops: fwd_gflops,
            gemm_gflops: gemm,
            forward_mfu: fwd_gflops / gemm,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> (TinyConfig, TinyTokenizer) {
        let tok = TinyTokenizer::from_vocabulary(&crate::world::vocabulary()).unwrap();
        let cfg = TinyConfig {
            refiner: 8,
            ..TinyConfig::small_for_tests(tok.vocab_size())
        };
        (cfg, tok)
    }

    /// The CPU clock only moves forward, and a timed matmul costs some of it.
    #[test]
    fn process_cpu_time_counts_the_work() {
        let start = process_cpu_secs();
        let (wall, cpu) = median_wall_and_cpu(1, || {
            let x = Tensor::randn(0f32, 1.0, (256, 256), &Device::Cpu)?;
            x.matmul(&x)?.sum_all()?.to_scalar::<f32>().map(drop)
        })
        .unwrap();
        assert!(cpu > 0.0 && wall > 0.0, "{cpu} {wall}");
        assert!(process_cpu_secs() - start >= cpu);
    }

    /// The table's forward runs the served model: the same values as the trained one, with no
    /// graph recorded.
    #[test]
    fn the_forward_measured_is_the_served_models() -> Result<()> {
        let dev = Device::Cpu;
        let (cfg, tok) = small();
        let empty = HashMap::new();
        let setup = ModelBenchSetup {
            cfg: &cfg,
            tokenizer: &tok,
            weights: None,
            inputs: &empty,
        };
        let (map, model) = setup.build(&dev)?;
        let served = setup.served(&map, &dev)?;
        let (x, t) = setup.rows(2, 1, &dev)?;
        let trained = model.velocity(&x, &t, &model.encode(&[PROMPT; 2])?)?;
        let v = served.velocity(&x, &t, &served.encode(&[PROMPT; 2])?)?;
        assert!(trained.track_op() && !v.track_op());
        let diff = (&trained - &v)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    /// The parity outputs are those of the weights file as served (loaded read-only), on the
    /// given inputs; the table runs on the same setup; an inputs file short of rows is refused.
    #[test]
    fn parity_outputs_use_the_weights_and_inputs_given() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let (cfg, tok) = small();
        let dir = std::env::temp_dir().join(format!("fewstep-bench-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let weights = dir.join("w.safetensors");
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 7, DType::F32, &dev);
        TinyModel::new(vb, &cfg, tok.clone(), FlowSchedule::default())?;
        map.save(&weights)?;
        let x = Tensor::randn(0f32, 1.0, (2, 1, 3, 32, 32), &dev)?;
        let t = Tensor::new(&[0.25f32, 0.75], &dev)?;
        let inputs = HashMap::from([("x".to_string(), x.clone()), ("t".to_string(), t)]);
        let setup = ModelBenchSetup {
            cfg: &cfg,
            tokenizer: &tok,
            weights: Some(&weights),
            inputs: &inputs,
        };
        let out = parity_outputs(&setup, 2, 1, &dev)?;

        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &dev)?
        };
        let served = TinyModel::new(vb, &cfg, tok.clone(), FlowSchedule::default())?;
        let v = served.velocity(&x, &[0.25, 0.75], &served.encode(&[PROMPT; 2])?)?;
        let diff = (&out["velocity"] - &v)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let loss = (&v - &x)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        assert!((out["loss"].to_vec1::<f32>()?[0] - loss).abs() < 1e-5);
        assert!(out["grad_norm"].to_vec1::<f32>()?[0] > 0.0);

        let rows = bench_model(&setup, &[1, 2], 1, 1, &dev)?;
        assert!(rows
            .iter()
            .all(|r| r.forward_samples_per_s > 0.0 && r.train_cpu_samples_per_s > 0.0));
        let short = bench_model(&setup, &[3], 1, 1, &dev).unwrap_err();
        assert!(short.to_string().contains("batch 3"), "{short}");
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
