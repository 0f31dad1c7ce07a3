//! The `logged` reward: a ridge-regression head fitted to the scores users sent to
//! `POST /feedback`, over a base proxy's score and the world's fixed image features. With too
//! few rated outputs it is the base proxy alone (and says so).

use base64::Engine as _;
use candle_core::Tensor;
use nalgebra::{DMatrix, DVector};
use serde::Serialize;

use super::{Reward, RewardError};
use crate::pipeline::to_frames;
use crate::store::RatedOutput;
use crate::world;

/// Ridge strength on standardized features (relative to the number of rows).
const RIDGE: f64 = 1.0;

/// What was fitted, for the run's record.
#[derive(Debug, Clone, Serialize)]
pub struct FitReport {
    /// `logged` when a head was fitted, else the base proxy's name.
    pub used: String,
    pub rows: usize,
    pub min_rows: usize,
    /// Rated outputs that could not be used (media not kept or not decodable, prompt not
    /// scorable by the base).
    pub skipped: usize,
    /// R^2 of the head on its own training rows (`None` without a head).
    pub train_r2: Option<f64>,
}

struct Head {
    mean: Vec<f64>,
    std: Vec<f64>,
    weights: Vec<f64>,
    intercept: f64,
}

pub struct LoggedReward {
    base: Box<dyn Reward>,
    head: Option<Head>,
}

/// The base score followed by the world's features of the frames.
fn featurize(
    base: &dyn Reward,
    prompt: &str,
    frames: &[image::RgbImage],
) -> Result<Vec<f64>, RewardError> {
    let x = crate::pipeline::from_frames(frames, &candle_core::Device::Cpu)?;
    let s = base.score(&[prompt.to_string()], &x.unsqueeze(0)?)?[0] as f64;
    Ok(std::iter::once(s)
        .chain(world::features(frames).into_iter().map(f64::from))
        .collect())
}

impl LoggedReward {
    /// Fits the head when at least `min_rows` rated outputs are usable.
    pub fn fit(base: Box<dyn Reward>, rated: &[RatedOutput], min_rows: usize) -> (Self, FitReport) {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for r in rated {
            let row = b64
                .decode(&r.data)
                .ok()
                .and_then(|bytes| crate::media::decode(&bytes, &r.media_type).ok())
                .and_then(|frames| featurize(base.as_ref(), &r.prompt, &frames).ok());
            if let Some(x) = row {
                xs.push(x);
                ys.push(r.score);
            }
        }
        let mut report = FitReport {
            used: base.name().to_string(),
            rows: xs.len(),
            min_rows,
            skipped: rated.len() - xs.len(),
            train_r2: None,
        };
        if xs.len() < min_rows.max(2) {
            return (Self { base, head: None }, report);
        }
        let (n, d) = (xs.len(), xs[0].len());
        let mean: Vec<f64> = (0..d)
            .map(|j| xs.iter().map(|x| x[j]).sum::<f64>() / n as f64)
            .collect();
        let std: Vec<f64> = (0..d)
            .map(|j| {
                let v = xs.iter().map(|x| (x[j] - mean[j]).powi(2)).sum::<f64>() / n as f64;
                if v > 1e-12 {
                    v.sqrt()
                } else {
                    1.0
                }
            })
            .collect();
        let x = DMatrix::from_fn(n, d, |i, j| (xs[i][j] - mean[j]) / std[j]);
        let y_mean = ys.iter().sum::<f64>() / n as f64;
        let y = DVector::from_iterator(n, ys.iter().map(|v| v - y_mean));
        let gram = x.transpose() * &x + DMatrix::identity(d, d) * (RIDGE * n as f64);
        let Some(w) = gram.cholesky().map(|c| c.solve(&(x.transpose() * &y))) else {
            return (Self { base, head: None }, report);
        };
        let pred = &x * &w;
        let ss_res: f64 = pred
            .iter()
            .zip(y.iter())
            .map(|(p, t)| (p - t).powi(2))
            .sum();
        let ss_tot: f64 = y.iter().map(|t| t * t).sum();
        report.used = "logged".into();
        report.train_r2 = Some(if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else {
            0.0
        });
        let head = Head {
            mean,
            std,
            weights: w.iter().copied().collect(),
            intercept: y_mean,
        };
        (
            Self {
                base,
                head: Some(head),
            },
            report,
        )
    }
}

impl Reward for LoggedReward {
    fn name(&self) -> &'static str {
        if self.head.is_some() {
            "logged"
        } else {
            self.base.name()
        }
    }

    fn check_prompt(&self, prompt: &str) -> Result<(), RewardError> {
        self.base.check_prompt(prompt)
    }

    fn score(&self, prompts: &[String], samples: &Tensor) -> Result<Vec<f32>, RewardError> {
        let Some(h) = &self.head else {
            return self.base.score(prompts, samples);
        };
        let base = self.base.score(prompts, samples)?;
        let frames = to_frames(samples)?;
        Ok(base
            .iter()
            .zip(&frames)
            .map(|(&s, f)| {
                let x =
                    std::iter::once(s as f64).chain(world::features(f).into_iter().map(f64::from));
                let z: f64 = x
                    .enumerate()
                    .map(|(j, v)| h.weights[j] * (v - h.mean[j]) / h.std[j])
                    .sum();
                (h.intercept + z).clamp(0.0, 1.0) as f32
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::VerifierReward;
    use rand::SeedableRng;

    fn png(frames: &[image::RgbImage]) -> String {
        let bytes = crate::media::encode(frames, crate::media::OutputFormat::Png, 8).unwrap();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn the_head_learns_user_scores_and_falls_back_when_rows_are_few() -> anyhow::Result<()> {
        // Users here like large objects, whatever the prompt says: a preference the verifier
        // alone does not have.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut rated = Vec::new();
        for i in 0..40 {
            let large = i % 2 == 0;
            let prompt = format!("a {} red circle", if large { "large" } else { "small" });
            let spec = world::parse(&prompt)?;
            rated.push(RatedOutput {
                prompt: "a red circle".into(),
                media_type: "image/png".into(),
                data: png(&world::render(&spec, &mut rng)),
                score: if large { 0.9 } else { 0.2 },
            });
        }
        let (few, report) = LoggedReward::fit(Box::new(VerifierReward), &rated[..5], 10);
        assert_eq!((report.used.as_str(), few.name()), ("verifier", "verifier"));

        let (logged, report) = LoggedReward::fit(Box::new(VerifierReward), &rated, 10);
        assert_eq!((report.used.as_str(), report.rows), ("logged", 40));
        assert!(report.train_r2.unwrap() > 0.5, "{report:?}");
        let dev = candle_core::Device::Cpu;
        let big = crate::pipeline::from_frames(
            &world::render(&world::parse("a large red circle")?, &mut rng),
            &dev,
        )?;
        let small = crate::pipeline::from_frames(
            &world::render(&world::parse("a small red circle")?, &mut rng),
            &dev,
        )?;
        let x = Tensor::stack(&[big, small], 0)?;
        let s = logged.score(&["a red circle".into(), "a red circle".into()], &x)?;
        assert!(s[0] > s[1] + 0.3, "{s:?}");
        Ok(())
    }
}
