//! Self-conditioning's training input (Chen et al., "Analog Bits", 2022): half the rows of a
//! batch read a detached x0 estimate from a first pass of the same model, the other half read
//! zeros, as the first sampler step and every distillation score do.

use candle_core::{Result, Tensor};
use rand::Rng;

use crate::families::tiny::{TextCond, TinyModel};

/// The share of rows that read a first-pass estimate.
const ESTIMATE_SHARE: f64 = 0.5;

/// The estimates for `x_t` at times `t` (`[B, ...]` like `x_t`): a first pass's detached x0
/// for about half the rows, drawn from `rng`, zeros for the rest; `None` when no row was drawn
/// or the model is not self-conditioned (the net then reads zeros).
pub fn training_estimate(
    model: &TinyModel,
    x_t: &Tensor,
    t: &[f32],
    text: &TextCond,
    rng: &mut impl Rng,
) -> Result<Option<Tensor>> {
    if !model.cfg.self_condition {
        return Ok(None);
    }
    let rows: Vec<u32> = (0..t.len() as u32)
        .filter(|_| rng.random_bool(ESTIMATE_SHARE))
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let idx = Tensor::new(rows.as_slice(), x_t.device())?;
    let x = x_t.index_select(&idx, 0)?.detach();
    let ts: Vec<f32> = rows.iter().map(|&r| t[r as usize]).collect();
    let v = model.net.forward(&x, &ts, &text.select(&idx)?)?.detach();
    let x0 = model.x0_from_velocity(&x, &ts, &v)?.detach();
    Ok(Some(x_t.zeros_like()?.index_add(&idx, &x0, 0)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::tiny::{TinyConfig, TinyTokenizer};
    use crate::pipeline::FlowSchedule;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// About half the rows get the first pass's x0 (exactly, from a net reading zeros), the
    /// rest zeros, and the estimate carries no gradient; a plain model gets none.
    #[test]
    fn half_the_rows_read_a_detached_first_pass() -> Result<()> {
        let dev = Device::Cpu;
        let tok = TinyTokenizer::from_vocabulary(&crate::world::vocabulary()).unwrap();
        let plain_cfg = TinyConfig::small_for_tests(tok.vocab_size());
        let cfg = TinyConfig {
            self_condition: true,
            ..plain_cfg.clone()
        };
        let map = VarMap::new();
        let vb = crate::nn::random_var_builder(&map, 5, DType::F32, &dev);
        let model = TinyModel::new(vb, &cfg, tok.clone(), FlowSchedule::default())?;
        let b = 16;
        let x = Tensor::randn(0f32, 1.0, (b, 1, 3, 32, 32), &dev)?;
        let t: Vec<f32> = (0..b).map(|i| 0.05 + 0.9 * i as f32 / b as f32).collect();
        let prompts: Vec<&str> = vec!["a red circle"; b];
        let text = model.encode(&prompts)?;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let e = training_estimate(&model, &x, &t, &text, &mut rng)?.expect("some rows");
        assert!(!e.track_op(), "the estimate must be detached");
        let v = model.net.forward(&x, &t, &text)?;
        let x0 = model.x0_from_velocity(&x, &t, &v)?;
        let mut read = 0;
        for r in 0..b {
            let row = e.get(r)?;
            let zero = row.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
            if !zero {
                let gap = (&row - x0.get(r)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(gap < 1e-5, "row {r}: {gap}");
                read += 1;
            }
        }
        assert!(
            (4..=12).contains(&read),
            "{read} of {b} rows read an estimate"
        );

        let vb = crate::nn::random_var_builder(&VarMap::new(), 5, DType::F32, &dev);
        let plain = TinyModel::new(vb, &plain_cfg, tok, FlowSchedule::default())?;
        assert!(training_estimate(&plain, &x, &t, &text, &mut rng)?.is_none());
        Ok(())
    }
}
