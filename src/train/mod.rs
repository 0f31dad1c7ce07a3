//! Training machinery shared by `train-teacher` and `distill`: AdamW with warmup and
//! gradient clipping, EMA weights, and atomic, resumable checkpoints.

pub mod binding;
pub mod checkpoint;
pub mod edge_weight;
pub mod ema;
pub mod optim;
pub mod self_condition;
pub mod shape_head;

pub mod teacher;

pub use checkpoint::Checkpoint;
pub use ema::Ema;
pub use optim::{AdamW, AdamWConfig, LrDecay, StepStats};

/// The current values of `vars` by name, detached from any graph (what checkpoints save).
pub fn tensors_of(
    vars: &[(String, candle_core::Var)],
) -> std::collections::HashMap<String, candle_core::Tensor> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect()
}

/// Named trainable variables of `map`, sorted by name (the order optimizers and checkpoints
/// use).
pub fn named_vars(map: &candle_nn::VarMap) -> Vec<(String, candle_core::Var)> {
    let data = map.data().lock().expect("var map lock poisoned");
    let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
