//! A diffusers-layout Wan2.1 directory (`transformer/`, `vae/`, `scheduler/`) through one
//! text-to-video generation on precomputed text states: the sampler the server runs over the
//! Wan family's transformer and schedule ([`WanDenoiser`]), then the VAE's decode, each
//! transformer step and the decode timed apart. The text states are an input, so the bench
//! needs no umT5-XXL; `tools/wan_bench.py` runs the same weights and inputs through
//! diffusers' `WanTransformer3DModel` and `AutoencoderKLWan`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use serde::Serialize;

use crate::families::wan::model::latent_shape;
use crate::families::wan::{WanCond, WanDenoiser, WanOptions, WanVae};
use crate::pipeline::{sample_with_noise, Denoiser, SamplerKind, SamplerParams};

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WanSpec {
    pub sampler: SamplerKind,
    pub steps: usize,
    /// Above 1: classifier-free guidance against `negative_prompt_embeds`.
    pub guidance: f32,
    pub frames: usize,
    pub width: usize,
    pub height: usize,
    /// Prompt tokens of random text states (Wan pads every prompt to 512).
    pub text_len: usize,
}

impl WanSpec {
    /// The student sampler re-noises between steps: one fresh noise per step but the last.
    fn fresh_noises(&self) -> usize {
        match self.sampler {
            SamplerKind::Student | SamplerKind::Ancestral => self.steps.saturating_sub(1),
            SamplerKind::Euler | SamplerKind::UniPc => 0,
        }
    }

    fn cfg(&self) -> bool {
        self.guidance > 1.0
    }
}

/// The transformer and schedule, and the VAE, of a diffusers Wan directory.
pub struct WanParts {
    pub denoiser: WanDenoiser,
    pub vae: WanVae,
}

impl WanParts {
    /// Loads `dir/transformer`, `dir/scheduler` and `dir/vae`; nothing of the text path.
    pub fn load(
        dir: &Path,
        dtype: DType,
        vae_dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let opts = WanOptions {
            dtype,
            vae_dtype,
            text_max_len: 0,
            prompt_cache: 0,
            student_timesteps: None,
        };
        let denoiser = WanDenoiser::load(dir, None, &opts, device)?;
        let vae = WanVae::load(&dir.join("vae"), vae_dtype, device)?;
        denoiser.check_vae(&vae)?;
        Ok(Self { denoiser, vae })
    }

    /// `[z, latent frames, h, w]` of one row.
    pub fn latent_shape(&self, spec: &WanSpec) -> Result<[usize; 4]> {
        latent_shape(
            &self.denoiser,
            &self.vae,
            spec.frames,
            spec.width,
            spec.height,
        )
    }
}

/// One batch's inputs, on the device: the initial noise (normalised latents, f32, as
/// `WanPipeline` keeps them), the student's fresh noise for each later step, and the text
/// states in the transformer's dtype.
pub struct WanInputs {
    pub latents: Tensor,
    pub step_noise: Vec<Tensor>,
    pub cond: WanCond,
}

/// The tensors of a safetensors inputs file, batch-first: `latents` `[B, z, F, h, w]`,
/// `prompt_embeds` `[B, L, text_dim]`, with CFG `negative_prompt_embeds` of the same shape,
/// and for the student sampler `step_noise` `[B, steps - 1, z, F, h, w]`. When `loaded` is
/// empty, random ones of the spec's shapes.
pub fn inputs(
    parts: &WanParts,
    spec: &WanSpec,
    loaded: &HashMap<String, Tensor>,
    batch: usize,
    device: &Device,
) -> anyhow::Result<WanInputs> {
    let latent = parts.latent_shape(spec)?;
    let text_dim = parts.denoiser.transformer().config().text_dim;
    let dtype = parts.denoiser.dtype();
    let take = |name: &str, shape: &[usize]| -> anyhow::Result<Tensor> {
        match loaded.get(name) {
            Some(t) => {
                let have = t.dim(0)?;
                anyhow::ensure!(
                    have >= batch,
                    "inputs: {name} has {have} rows, batch {batch} needs more"
                );
                let t = t.narrow(0, 0, batch)?;
                // The text length is the caller's; every other dim is fixed by the spec.
                let fixed = if name.ends_with("prompt_embeds") {
                    vec![batch, t.dim(1)?, text_dim]
                } else {
                    shape.to_vec()
                };
                anyhow::ensure!(
                    t.dims() == fixed.as_slice(),
                    "inputs: {name} is {:?}, this spec needs {fixed:?}",
                    t.dims()
                );
                Ok(t.to_device(device)?)
            }
            None if !loaded.is_empty() => anyhow::bail!("inputs: no tensor {name:?}"),
            None => Ok(Tensor::randn(0f32, 1.0, shape, device)?),
        }
    };
    let with_batch = |rest: &[usize]| [&[batch], rest].concat();
    let latents = take("latents", &with_batch(&latent))?.to_dtype(DType::F32)?;
    let text_shape = [batch, spec.text_len, text_dim];
    let cond = take("prompt_embeds", &text_shape)?.to_dtype(dtype)?;
    let uncond = spec
        .cfg()
        .then(|| take("negative_prompt_embeds", &text_shape))
        .transpose()?
        .map(|t| t.to_dtype(dtype))
        .transpose()?;
    let fresh = spec.fresh_noises();
    let step_noise = if fresh > 0 {
        let all = take(
            "step_noise",
            &with_batch(&[&[fresh], latent.as_slice()].concat()),
        )?;
        anyhow::ensure!(
            all.dim(1)? >= fresh,
            "inputs: step_noise has {} steps' noise, {} steps need {fresh}",
            all.dim(1)?,
            spec.steps
        );
        (0..fresh)
            .map(|k| all.get_on_dim(1, k)?.to_dtype(DType::F32))
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    Ok(WanInputs {
        latents,
        step_noise,
        cond: WanCond { cond, uncond },
    })
}

/// One timed generation.
#[derive(Debug, Clone, Serialize)]
pub struct WanRound {
    /// Sampling and decode, from the initial noise on the device to the decoded video.
    pub total_s: f64,
    /// Each transformer evaluation (one per step; with CFG both branches in one batch).
    pub step_s: Vec<f64>,
    pub decode_s: f64,
}

/// A batch's timings over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct WanReport {
    pub batch: usize,
    #[serde(flatten)]
    pub spec: WanSpec,
    pub latent: [usize; 4],
    /// One transformer step and the decode of one latent frame, untimed in the rounds: the
    /// kernels' first loads.
    pub warmup_s: f64,
    pub rounds: Vec<WanRound>,
    /// Medians over the rounds (`step_s` over every step of every round).
    pub total_s: f64,
    pub step_s: f64,
    pub decode_s: f64,
}

/// The denoiser with each x0 prediction timed, the device synchronised on both sides of it.
struct Timed<'a> {
    inner: &'a WanDenoiser,
    device: &'a Device,
    steps: RefCell<Vec<f64>>,
}

impl Timed<'_> {
    fn time(&self, f: impl FnOnce() -> Result<Tensor>) -> Result<Tensor> {
        self.device.synchronize()?;
        let start = Instant::now();
        let out = f()?;
        self.device.synchronize()?;
        self.steps.borrow_mut().push(start.elapsed().as_secs_f64());
        Ok(out)
    }
}

impl Denoiser for Timed<'_> {
    type Cond = WanCond;

    fn predict_x0(&self, x: &Tensor, t: &[f32], cond: &WanCond, guidance: f32) -> Result<Tensor> {
        self.time(|| self.inner.predict_x0(x, t, cond, guidance))
    }

    fn predict_x0_at(
        &self,
        x: &Tensor,
        t: &[f32],
        net_t: &[f32],
        cond: &WanCond,
        guidance: f32,
    ) -> Result<Tensor> {
        self.time(|| self.inner.predict_x0_at(x, t, net_t, cond, guidance))
    }

    fn select_rows(&self, cond: &WanCond, idx: &Tensor) -> Result<WanCond> {
        self.inner.select_rows(cond, idx)
    }
}

/// What one generation leaves: the final latents (f32) and the decoded video `[B, 3, T, H,
/// W]` in `[-1, 1]`, with its timings.
pub struct Generated {
    pub latents: Tensor,
    pub video: Tensor,
    pub round: WanRound,
}

/// The sampler the server runs (`crate::pipeline`'s, over `spec.sampler`), fed `x`'s noise,
/// then the VAE's decode.
pub fn generate(parts: &WanParts, x: &WanInputs, spec: &WanSpec) -> Result<Generated> {
    let device = parts.denoiser.device();
    let timed = Timed {
        inner: &parts.denoiser,
        device,
        steps: RefCell::new(Vec::with_capacity(spec.steps)),
    };
    let params = SamplerParams {
        kind: spec.sampler,
        steps: spec.steps,
        guidance: spec.guidance,
        guidance_interval: None,
        eta: 1.0,
    };
    let mut supplied = std::iter::once(&x.latents).chain(&x.step_noise);
    device.synchronize()?;
    let start = Instant::now();
    let latents = sample_with_noise(&timed, parts.denoiser.schedule(), params, &x.cond, || {
        supplied
            .next()
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("inputs: too little step noise".into()))
    })?;
    device.synchronize()?;
    let decode_start = Instant::now();
    let video = parts
        .vae
        .decode(&latents)
        .map_err(candle_core::Error::wrap)?;
    device.synchronize()?;
    let end = Instant::now();
    Ok(Generated {
        latents,
        video,
        round: WanRound {
            total_s: (end - start).as_secs_f64(),
            step_s: timed.steps.into_inner(),
            decode_s: (end - decode_start).as_secs_f64(),
        },
    })
}

/// Loads each kernel once: one transformer evaluation at the first step's time and the
/// decode of the first latent frame. Returns its seconds.
pub fn warm_up(parts: &WanParts, x: &WanInputs, spec: &WanSpec) -> Result<f64> {
    let device = parts.denoiser.device();
    let start = Instant::now();
    let b = x.latents.dim(0)?;
    let x0 = parts
        .denoiser
        .predict_x0(&x.latents, &vec![1.0; b], &x.cond, spec.guidance)?;
    parts
        .vae
        .decode(&x0.narrow(2, 0, 1)?)
        .map_err(candle_core::Error::wrap)?;
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A warm-up, then `reps` (at least one) timed generations of `batch` rows. Returns the report
/// and the last generation.
pub fn bench_batch(
    parts: &WanParts,
    spec: &WanSpec,
    loaded: &HashMap<String, Tensor>,
    batch: usize,
    reps: usize,
) -> anyhow::Result<(WanReport, Generated)> {
    let device = parts.denoiser.device();
    let x = inputs(parts, spec, loaded, batch, device)?;
    let warmup_s = warm_up(parts, &x, spec)?;
    let mut last = generate(parts, &x, spec)?;
    let mut rounds = vec![last.round.clone()];
    for _ in 1..reps {
        last = generate(parts, &x, spec)?;
        rounds.push(last.round.clone());
    }
    let report = WanReport {
        batch,
        spec: *spec,
        latent: parts.latent_shape(spec)?,
        warmup_s,
        total_s: median(rounds.iter().map(|r| r.total_s).collect()),
        step_s: median(rounds.iter().flat_map(|r| r.step_s.clone()).collect()),
        decode_s: median(rounds.iter().map(|r| r.decode_s).collect()),
        rounds,
    };
    Ok((report, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/wan/wan-tiny-t2v"
    );

    fn spec(sampler: SamplerKind, guidance: f32) -> WanSpec {
        WanSpec {
            sampler,
            steps: 2,
            guidance,
            frames: 5,
            width: 32,
            height: 32,
            text_len: 4,
        }
    }

    #[test]
    fn wan_bench_times_every_step_and_decodes_the_video() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let parts = WanParts::load(Path::new(DIR), DType::F32, DType::F32, &dev)?;
        for (sampler, guidance) in [(SamplerKind::Student, 1.0), (SamplerKind::UniPc, 3.0)] {
            let s = spec(sampler, guidance);
            let (report, last) = bench_batch(&parts, &s, &HashMap::new(), 1, 2)?;
            assert_eq!(report.rounds.len(), 2);
            assert!(report.rounds.iter().all(|r| r.step_s.len() == 2
                && r.step_s.iter().all(|&t| t > 0.0)
                && r.decode_s > 0.0
                && r.total_s >= r.decode_s + r.step_s.iter().sum::<f64>()));
            assert_eq!(report.latent, [4, 2, 4, 4]);
            assert_eq!(last.latents.dims(), [1, 4, 2, 4, 4]);
            assert_eq!(last.video.dims(), [1, 3, 5, 32, 32]);
            let max = last.video.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(max > 0.0 && max <= 1.0, "{max}");
        }
        Ok(())
    }

    /// The bench is the server's generation: its output from an inputs file is what the
    /// sampler gives for the same noise, and a file that lacks a tensor is refused by name.
    #[test]
    fn wan_bench_inputs_file_drives_the_generation() -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let parts = WanParts::load(Path::new(DIR), DType::F32, DType::F32, &dev)?;
        let s = spec(SamplerKind::Student, 1.0);
        let random = inputs(&parts, &s, &HashMap::new(), 2, &dev)?;
        let file = HashMap::from([
            ("latents".to_string(), random.latents.clone()),
            ("prompt_embeds".to_string(), random.cond.cond.clone()),
            (
                "step_noise".to_string(),
                Tensor::stack(&random.step_noise, 1)?,
            ),
        ]);
        let a = generate(&parts, &inputs(&parts, &s, &file, 2, &dev)?, &s)?;
        let b = generate(&parts, &random, &s)?;
        let diff = (a.video - b.video)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        // One row of the file is the first row of the batch.
        let one = generate(&parts, &inputs(&parts, &s, &file, 1, &dev)?, &s)?;
        let row = (one.latents - a.latents.narrow(0, 0, 1)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(row < 1e-5, "{row}");
        let short = inputs(&parts, &s, &file, 3, &dev).err().unwrap();
        assert!(short.to_string().contains("has 2 rows"), "{short}");
        let cfg = spec(SamplerKind::Student, 2.0);
        let missing = inputs(&parts, &cfg, &file, 1, &dev).err().unwrap();
        assert!(
            missing.to_string().contains("negative_prompt_embeds"),
            "{missing}"
        );
        let other = WanSpec { width: 48, ..s };
        let wrong = inputs(&parts, &other, &file, 1, &dev).err().unwrap();
        assert!(wrong.to_string().contains("latents is"), "{wrong}");
        Ok(())
    }
}
