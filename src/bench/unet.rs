//! A diffusers-layout UNet (SD1.5- or SDXL-shaped, any weights) through a few-step denoising
//! loop at a given latent size, batch and precision: the network a served SD/SDXL student
//! spends its time in. `tools/gpu-bench.sh` and `tools/cpu-bench.sh` run the same weights and
//! inputs through diffusers, so the numbers and the outputs can be compared side by side.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::families::sd::unet::{AddedCond, UNet, UNetConfig};

/// The inputs of one batch: the initial latents and the conditioning.
pub struct UnetInputs {
    pub sample: Tensor,
    pub text: Tensor,
    pub added: Option<AddedCond>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct UnetRow {
    pub batch: usize,
    pub steps: usize,
    /// Median over the rounds of one `steps`-step denoising of `batch` latents.
    pub round_ms: f64,
    /// The same in this process's CPU time (all threads; on the CPU, what the work cost
    /// whatever share of the cores other processes left it).
    pub cpu_round_ms: f64,
    pub images_per_s: f64,
}

/// The tensors of an inputs file (a safetensors file with `sample`, `encoder_hidden_states`
/// and, for SDXL, `text_embeds` and `time_ids`, batch-first); empty without a file.
pub fn load_inputs(
    path: Option<&Path>,
    device: &Device,
) -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(match path {
        Some(path) => candle_core::safetensors::load(path, device)?,
        None => HashMap::new(),
    })
}

/// The latents and conditioning cut to `batch` rows from `loaded` (see [`load_inputs`]); or,
/// when `loaded` is empty, random ones of the config's shapes.
pub fn inputs(
    cfg: &UNetConfig,
    loaded: &HashMap<String, Tensor>,
    batch: usize,
    latent: usize,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<UnetInputs> {
    let plan = cfg.plan()?;
    let cross = plan
        .mid
        .as_ref()
        .map(|m| m.attn.cross_dim)
        .or_else(|| {
            plan.down
                .iter()
                .find_map(|d| d.attn.as_ref().map(|a| a.cross_dim))
        })
        .unwrap_or(768);
    let take = |name: &str, shape: &[usize]| -> anyhow::Result<Tensor> {
        let t = match loaded.get(name) {
            Some(t) => {
                let have = t.dim(0)?;
                anyhow::ensure!(
                    have >= batch,
                    "inputs: {name} has {have} rows, batch {batch} needs more"
                );
                t.narrow(0, 0, batch)?
            }
            None if !loaded.is_empty() => anyhow::bail!("inputs: no tensor {name:?}"),
            None => Tensor::randn(0f32, 1.0, shape, device)?,
        };
        Ok(t.to_dtype(dtype)?)
    };
    let sample = take("sample", &[batch, cfg.in_channels, latent, latent])?;
    let text = take("encoder_hidden_states", &[batch, 77, cross])?;
    let added = if let Some((time_dim, proj_dim)) = plan.text_time {
        // The pooled text is what the projection takes besides the six embedded time ids.
        let pooled = proj_dim.saturating_sub(6 * time_dim);
        let text_embeds = take("text_embeds", &[batch, pooled])?;
        // Random time ids would be meaningless; SDXL's are (original size, crop, target size).
        let px = (latent * 8) as f32;
        let time_ids = match loaded.get("time_ids") {
            Some(_) => take("time_ids", &[batch, 6])?,
            None => Tensor::new(&[px, px, 0.0, 0.0, px, px], device)?
                .unsqueeze(0)?
                .repeat((batch, 1))?
                .to_dtype(dtype)?,
        };
        Some(AddedCond {
            text_embeds,
            time_ids,
        })
    } else {
        None
    };
    Ok(UnetInputs {
        sample,
        text,
        added,
    })
}

/// One few-step denoising: `steps` UNet evaluations at evenly spaced timesteps from 999 down,
/// each followed by the Euler-style update a flow/epsilon student makes (its cost is noise
/// next to the UNet's). Returns the final latents.
pub fn denoise(unet: &UNet, x: &UnetInputs, steps: usize) -> candle_core::Result<Tensor> {
    let mut sample = x.sample.clone();
    let batch = sample.dim(0)?;
    for i in 0..steps {
        let t = 999.0 * (1.0 - i as f64 / steps as f64);
        let timesteps = Tensor::full(t as f32, batch, sample.device())?;
        let pred = unet.forward(&sample, &timesteps, &x.text, x.added.as_ref())?;
        sample = (sample - (pred * (1.0 / steps as f64))?)?;
    }
    Ok(sample)
}

/// The UNet in `dir` (`config.json` and its safetensors) at each batch: one warm-up
/// denoising, then the median of `reps` timed ones (the device is synchronised around each).
#[allow(clippy::too_many_arguments)]
pub fn bench_unet(
    dir: &Path,
    loaded: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
    latent: usize,
    batches: &[usize],
    steps: usize,
    reps: usize,
) -> anyhow::Result<(UNet, Vec<UnetRow>)> {
    let cfg = UNetConfig::from_file(&dir.join("config.json"))?;
    let unet = UNet::load(dir, &cfg, dtype, device)?;
    let mut rows = Vec::new();
    for &batch in batches {
        let x = inputs(&cfg, loaded, batch, latent, dtype, device)?;
        let (wall, cpu) = super::model::median_wall_and_cpu(reps.max(1), || {
            denoise(&unet, &x, steps)?;
            device.synchronize()
        })?;
        rows.push(UnetRow {
            batch,
            steps,
            round_ms: 1e3 * wall,
            cpu_round_ms: 1e3 * cpu,
            images_per_s: batch as f64 / wall,
        });
    }
    Ok((unet, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNET: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sd/sdxl-tiny/unet"
    );

    #[test]
    fn times_each_batch_and_denoises_to_finite_latents() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let (unet, rows) = bench_unet(
            Path::new(UNET),
            &HashMap::new(),
            DType::F32,
            &dev,
            8,
            &[1, 2],
            2,
            1,
        )?;
        assert_eq!(rows.iter().map(|r| r.batch).collect::<Vec<_>>(), [1, 2]);
        assert!(rows
            .iter()
            .all(|r| r.images_per_s > 0.0 && r.cpu_round_ms > 0.0 && r.steps == 2));
        let x = inputs(unet.config(), &HashMap::new(), 2, 8, DType::F32, &dev)?;
        let out = denoise(&unet, &x, 2)?;
        assert_eq!(out.dims(), x.sample.dims());
        let moved = (&out - &x.sample)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(moved.is_finite() && moved > 0.0, "{moved}");
        Ok(())
    }

    #[test]
    fn an_inputs_file_short_of_rows_or_tensors_is_refused() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let cfg = UNetConfig::from_file(&Path::new(UNET).join("config.json"))?;
        let file = std::env::temp_dir().join(format!(
            "fewstep-unet-inputs-{}.safetensors",
            std::process::id()
        ));
        let sample = Tensor::zeros((1, cfg.in_channels, 8, 8), DType::F32, &dev)?;
        candle_core::safetensors::save(&HashMap::from([("sample".to_string(), sample)]), &file)?;
        let loaded = load_inputs(Some(&file), &dev)?;
        let short = inputs(&cfg, &loaded, 2, 8, DType::F32, &dev).err().unwrap();
        assert!(short.to_string().contains("has 1 rows"), "{short}");
        let missing = inputs(&cfg, &loaded, 1, 8, DType::F32, &dev).err().unwrap();
        assert!(
            missing.to_string().contains("encoder_hidden_states"),
            "{missing}"
        );
        Ok(())
    }
}
