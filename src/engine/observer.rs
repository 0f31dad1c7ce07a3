//! The worker's view of a running batch: reports each job's step, sends partial images, and
//! takes cancelled jobs' rows out of the batch between steps.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;

use super::job::{eta, JobCell};
use super::Job;
use crate::manifest::LoadedModel;
use crate::pipeline::StepObserver;

pub(super) struct BatchObserver<'a> {
    model: &'a LoadedModel,
    cells: Vec<Arc<JobCell>>,
    /// `(first row, rows)` of each job in the batch.
    spans: Vec<(usize, usize)>,
    partial_steps: Vec<Vec<usize>>,
    left: Vec<bool>,
    started: Instant,
    /// `fewstep_denoise_steps_total`: denoising steps the device ran, by model.
    device_steps: metrics::Counter,
}

impl<'a> BatchObserver<'a> {
    pub fn new(jobs: &[Job], model: &'a LoadedModel) -> Self {
        let mut spans = Vec::with_capacity(jobs.len());
        let mut row = 0;
        for j in jobs {
            spans.push((row, j.rows()));
            row += j.rows();
        }
        Self {
            model,
            cells: jobs.iter().map(|j| j.cell.clone()).collect(),
            spans,
            partial_steps: jobs.iter().map(|j| j.cell.partial_steps()).collect(),
            left: vec![false; jobs.len()],
            started: Instant::now(),
            device_steps: metrics::counter!(
                "fewstep_denoise_steps_total", "model" => model.manifest.name.clone()
            ),
        }
    }

    /// Which jobs left the batch (by their index in it).
    pub fn left(&self) -> Vec<bool> {
        self.left.clone()
    }

    /// The intermediate frames of job `j`'s rows, found among the `live` rows of `x0`.
    fn preview(
        &self,
        j: usize,
        live: &[usize],
        x0: &Tensor,
    ) -> candle_core::Result<Vec<Vec<image::RgbImage>>> {
        let (first, rows) = self.spans[j];
        let pos = live
            .iter()
            .position(|&r| r == first)
            .ok_or_else(|| candle_core::Error::Msg("the job's rows are not live".into()))?;
        // A job's rows are contiguous and stay so when other rows leave.
        self.model.preview(&x0.narrow(0, pos, rows)?)
    }
}

impl StepObserver for BatchObserver<'_> {
    fn on_step(
        &mut self,
        step: usize,
        steps: usize,
        live: &[usize],
        x0: Option<&Tensor>,
    ) -> Vec<usize> {
        if step == 0 {
            self.started = Instant::now();
        } else {
            self.device_steps.increment(1);
        }
        let eta_s = eta(self.started, step, steps);
        let mut dropped = Vec::new();
        for j in 0..self.cells.len() {
            if self.left[j] {
                continue;
            }
            let (first, rows) = self.spans[j];
            if !self.cells[j].step(step, eta_s) {
                self.left[j] = true;
                dropped.extend(first..first + rows);
                continue;
            }
            if let (Some(x0), Some(index)) =
                (x0, self.partial_steps[j].iter().position(|&s| s == step))
            {
                match self.preview(j, live, x0) {
                    Ok(frames) => self.cells[j].partial(step, index, frames),
                    Err(e) => tracing::warn!(error = %e, "partial image failed"),
                }
            }
        }
        dropped
    }
}
