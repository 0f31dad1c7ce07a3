//! Student vs teacher: end-to-end generation speed of several models (each with its own
//! sampler, steps and guidance), measured interleaved in one run so machine noise hits all of
//! them alike.

use std::time::Instant;

use serde::Serialize;

use crate::manifest::LoadedModel;
use crate::pipeline::BatchSpec;

#[derive(Debug, Clone, Serialize)]
pub struct SamplerRow {
    pub model: String,
    pub sampler: String,
    pub steps: usize,
    pub guidance: f32,
    /// Network evaluations per sample (CFG doubles them).
    pub nfe: usize,
    pub samples_per_s: f64,
    /// Speed relative to the first model.
    pub speedup: f64,
}

/// Median samples/s of each model generating `batch` outputs of `frames` frames, over `reps`
/// rounds that visit the models in turn (after one warm-up round).
pub fn compare(
    models: &[LoadedModel],
    batch: usize,
    frames: usize,
    reps: usize,
) -> candle_core::Result<Vec<SamplerRow>> {
    let [w, h] = models
        .first()
        .map_or([32, 32], |m| m.manifest.serving.sizes[0]);
    let spec = BatchSpec {
        prompts: vec!["a large red circle on the left".into(); batch],
        negative_prompts: vec![String::new(); batch],
        seeds: (0..batch as u64).collect(),
        frames,
        width: w,
        height: h,
    };
    let mut times = vec![Vec::new(); models.len()];
    for round in 0..=reps {
        for (i, m) in models.iter().enumerate() {
            let s = &m.manifest.sampling;
            let t = Instant::now();
            m.generate(&spec, s.default_steps, s.default_guidance)?;
            if round > 0 {
                times[i].push(t.elapsed().as_secs_f64());
            }
        }
    }
    let mut rows: Vec<SamplerRow> = models
        .iter()
        .zip(&mut times)
        .map(|(m, t)| {
            t.sort_by(|a, b| a.total_cmp(b));
            let s = &m.manifest.sampling;
            SamplerRow {
                model: m.manifest.name.clone(),
                sampler: format!("{:?}", s.sampler).to_lowercase(),
                steps: s.default_steps,
                guidance: s.default_guidance,
                nfe: s.default_steps * if s.default_guidance > 1.0 { 2 } else { 1 },
                samples_per_s: batch as f64 / t[t.len() / 2],
                speedup: 0.0,
            }
        })
        .collect();
    let base = rows.first().map_or(1.0, |r| r.samples_per_s);
    for r in &mut rows {
        r.speedup = r.samples_per_s / base;
    }
    Ok(rows)
}
