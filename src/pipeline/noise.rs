//! Per-request noise drawn on the host, so that a seed gives the same output whatever else
//! shares its batch (candle cannot seed the CPU device RNG, and a shared device RNG would tie
//! a request's noise to its position in the batch).

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// The noise stream of one output row.
#[derive(Debug, Clone)]
pub struct RowNoise {
    rng: ChaCha8Rng,
}

impl RowNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next `n` standard-normal values of this row's stream.
    pub fn draw(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect()
    }
}

/// One fresh noise tensor of shape `[rows.len(), sample_shape...]`, each row from its stream.
pub fn batch_noise(
    rows: &mut [RowNoise],
    sample_shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let mut streams: Vec<&mut RowNoise> = rows.iter_mut().collect();
    batch_noise_of(&mut streams, sample_shape, device)
}

/// [`batch_noise`] over some of a batch's streams (the rows still in it).
pub fn batch_noise_of(
    rows: &mut [&mut RowNoise],
    sample_shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let per_row: usize = sample_shape.iter().product();
    let mut data = Vec::with_capacity(rows.len() * per_row);
    for r in rows.iter_mut() {
        data.extend(r.draw(per_row));
    }
    let mut shape = vec![rows.len()];
    shape.extend_from_slice(sample_shape);
    Tensor::from_vec(data, shape, device)
}
