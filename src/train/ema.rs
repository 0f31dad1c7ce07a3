//! Exponential moving average of a model's weights (what gets shipped).

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};

pub struct Ema {
    pub decay: f64,
    /// Averaged value per variable name.
    pub shadow: HashMap<String, Tensor>,
}

impl Ema {
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self { decay, shadow })
    }

    /// `shadow = decay * shadow + (1 - decay) * current`; a lower effective decay early on
    /// (`(1 + step) / (10 + step)`) keeps the average from lagging behind a young model.
    pub fn update(&mut self, vars: &[(String, Var)], step: u64) -> Result<()> {
        let warm = (1.0 + step as f64) / (10.0 + step as f64);
        let d = self.decay.min(warm);
        for (name, var) in vars {
            if let Some(s) = self.shadow.get_mut(name) {
                // Detached, or each step's average would hold a graph back to the first.
                *s = ((&*s * d)? + (var.as_tensor().detach() * (1.0 - d))?)?;
            }
        }
        Ok(())
    }
}
