//! LoRA (low-rank adaptation) of dense layers and convolutions, as PEFT defines it for
//! `nn.Linear` and `nn.Conv2d`: a frozen weight `W` plus `scale * B A`, with `A` `[rank, in]`
//! (Kaiming-uniform) and `B` `[out, rank]` (zero, so a fresh adapter changes nothing). For a
//! convolution `A` is a conv `[rank, in, k, k]` with the layer's kernel, stride and padding
//! and `B` a 1x1 conv `[out, rank, 1, 1]`. The tensors are named like PEFT/diffusers:
//! `<module>.lora_A.weight` and `<module>.lora_B.weight`.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor};
use candle_nn::init::{FanInOut, Init, NonLinearity, NormalOrUniform};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// PEFT's `kaiming_uniform_(a=sqrt(5))` of `lora_A`: gain `sqrt(2 / (1 + 5))`, so values are
/// uniform in `±1/sqrt(in)`.
const LORA_A_INIT: Init = Init::Kaiming {
    dist: NormalOrUniform::Uniform,
    fan: FanInOut::FanIn,
    non_linearity: NonLinearity::ExplicitGain(0.577_350_269_189_625_8),
};

const A_SUFFIX: &str = ".lora_A.weight";
const B_SUFFIX: &str = ".lora_B.weight";

/// Errors of reading a LoRA config or merging adapters into weights.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("invalid LoRA config: {0}")]
    Config(String),
    #[error("LoRA tensor {name}: the name must end in `{A_SUFFIX}` or `{B_SUFFIX}`")]
    Name { name: String },
    #[error("LoRA tensor {present} has no partner {missing}")]
    Unpaired { present: String, missing: String },
    #[error("LoRA adapter {adapter} has no base weight {base}")]
    MissingBase { adapter: String, base: String },
    #[error("LoRA adapter {module}: {message}")]
    Shape { module: String, message: String },
    #[error("merging LoRA adapter {module}: {source}")]
    Candle {
        module: String,
        source: candle_core::Error,
    },
}

/// LoRA settings. `rank` 0 turns LoRA off; `alpha` defaults to `rank` (scale 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawLoraConfig")]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLoraConfig {
    rank: usize,
    #[serde(default)]
    alpha: Option<f64>,
}

impl TryFrom<RawLoraConfig> for LoraConfig {
    type Error = LoraError;

    fn try_from(raw: RawLoraConfig) -> Result<Self, LoraError> {
        let alpha = raw.alpha.unwrap_or(raw.rank as f64);
        if !alpha.is_finite() {
            return Err(LoraError::Config(format!("alpha {alpha} is not finite")));
        }
        Ok(Self {
            rank: raw.rank,
            alpha,
        })
    }
}

impl LoraConfig {
    /// Rank `rank` with `alpha = rank`.
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            alpha: rank as f64,
        }
    }

    pub fn enabled(&self) -> bool {
        self.rank > 0
    }

    /// `alpha / rank`, the factor of `B A` (0 when LoRA is off).
    pub fn scale(&self) -> f64 {
        if self.rank == 0 {
            0.0
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// The trainable low-rank part of one adapted dense layer or convolution.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl LoraAdapter {
    /// Creates (or reuses) `lora_A.weight` and `lora_B.weight` under `vb`, which points at
    /// the adapted module. Fails for rank 0.
    pub fn new(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        cfg: &LoraConfig,
    ) -> candle_core::Result<Self> {
        if !cfg.enabled() {
            candle_core::bail!("{}: a LoRA adapter needs a rank above 0", vb.prefix());
        }
        let a = vb
            .pp("lora_A")
            .get_with_hints((cfg.rank, in_dim), "weight", LORA_A_INIT)?;
        let b =
            vb.pp("lora_B")
                .get_with_hints((out_dim, cfg.rank), "weight", candle_nn::init::ZERO)?;
        Ok(Self {
            a,
            b,
            scale: cfg.scale(),
        })
    }

    /// The adapter of a `kernel`x`kernel` convolution from `in_ch` to `out_ch` channels:
    /// `lora_A.weight` `[rank, in_ch, kernel, kernel]` (Kaiming-uniform over the fan-in
    /// `in_ch * kernel^2`, as PEFT's) and `lora_B.weight` `[out_ch, rank, 1, 1]` (zero).
    pub fn new_conv(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        cfg: &LoraConfig,
    ) -> candle_core::Result<Self> {
        if !cfg.enabled() {
            candle_core::bail!("{}: a LoRA adapter needs a rank above 0", vb.prefix());
        }
        let a = vb.pp("lora_A").get_with_hints(
            (cfg.rank, in_ch, kernel, kernel),
            "weight",
            LORA_A_INIT,
        )?;
        let b = vb.pp("lora_B").get_with_hints(
            (out_ch, cfg.rank, 1, 1),
            "weight",
            candle_nn::init::ZERO,
        )?;
        Ok(Self {
            a,
            b,
            scale: cfg.scale(),
        })
    }

    /// `lora_A.weight`, `[rank, in]` (`[rank, in, k, k]` for a convolution).
    pub fn a(&self) -> &Tensor {
        &self.a
    }

    /// `lora_B.weight`, `[out, rank]` (`[out, rank, 1, 1]` for a convolution).
    pub fn b(&self) -> &Tensor {
        &self.b
    }

    /// `scale * (x A^T) B^T` for `x` `[rows, in]`, in `x`'s dtype. The scale is applied to
    /// the narrow `[rows, rank]` product, the cheapest place.
    pub fn delta(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let a = self.a.to_dtype(x.dtype())?;
        let b = self.b.to_dtype(x.dtype())?;
        (x.matmul(&a.t()?)? * self.scale)?.matmul(&b.t()?)
    }

    /// `scale * convB(convA(x))` for a convolution adapter and `x` `[B, in, H, W]`, with `A`
    /// run at the adapted layer's `padding` and `stride`. The scale is applied to the narrow
    /// rank-channel map.
    pub fn conv_delta(
        &self,
        x: &Tensor,
        padding: usize,
        stride: usize,
    ) -> candle_core::Result<Tensor> {
        let a = self.a.to_dtype(x.dtype())?;
        let b = self.b.to_dtype(x.dtype())?;
        (x.conv2d(&a, padding, stride, 1, 1)? * self.scale)?.conv2d(&b, 0, 1, 1, 1)
    }
}

/// Folds adapters into their base weights: for every `<m>.lora_A.weight` / `<m>.lora_B.weight`
/// pair, `<m>.weight` becomes `W + scale * B A` (in f32 for half-precision weights, then
/// back to `W`'s dtype); for a convolution, `B` `[out, rank]` times `A` `[rank, in * k * k]`
/// reshaped to `W`'s `[out, in, k, k]`. Every other base tensor is returned as it is. The result is a plain
/// state dict that a model without adapters loads.
pub fn merge(
    base: &HashMap<String, Tensor>,
    adapters: &HashMap<String, Tensor>,
    cfg: &LoraConfig,
) -> Result<HashMap<String, Tensor>, LoraError> {
    // Sorted so that the first error reported does not depend on hash order.
    let mut pairs: BTreeMap<&str, (Option<&Tensor>, Option<&Tensor>)> = BTreeMap::new();
    for (name, t) in adapters {
        if let Some(module) = name.strip_suffix(A_SUFFIX) {
            pairs.entry(module).or_default().0 = Some(t);
        } else if let Some(module) = name.strip_suffix(B_SUFFIX) {
            pairs.entry(module).or_default().1 = Some(t);
        } else {
            return Err(LoraError::Name { name: name.clone() });
        }
    }
    let mut merged = base.clone();
    for (module, pair) in pairs {
        let (a, b) = match pair {
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) => return Err(unpaired(module, A_SUFFIX, B_SUFFIX)),
            (None, _) => return Err(unpaired(module, B_SUFFIX, A_SUFFIX)),
        };
        let key = format!("{module}.weight");
        let w = base.get(&key).ok_or_else(|| LoraError::MissingBase {
            adapter: format!("{module}{A_SUFFIX}"),
            base: key.clone(),
        })?;
        check_shapes(module, w, a, b, cfg.rank)?;
        let folded = fold(w, a, b, cfg.scale()).map_err(|source| LoraError::Candle {
            module: module.to_string(),
            source,
        })?;
        merged.insert(key, folded);
    }
    Ok(merged)
}

fn unpaired(module: &str, present: &str, missing: &str) -> LoraError {
    LoraError::Unpaired {
        present: format!("{module}{present}"),
        missing: format!("{module}{missing}"),
    }
}

fn check_shapes(
    module: &str,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    rank: usize,
) -> Result<(), LoraError> {
    let ranks_fit = |ra: &usize, rb: &usize| ra == rb && *ra == rank && rank > 0;
    let (fits, expected) = match (w.dims(), a.dims(), b.dims()) {
        ([out, inp], [ra, ia], [ob, rb]) => (
            ia == inp && ob == out && ranks_fit(ra, rb),
            format!("[out, in], [{rank}, in] and [out, {rank}]"),
        ),
        ([out, inp, kh, kw], [ra, ia, ah, aw], [ob, rb, bh, bw]) => (
            ia == inp
                && (ah, aw) == (kh, kw)
                && ob == out
                && (bh, bw) == (&1, &1)
                && ranks_fit(ra, rb),
            format!("[out, in, kh, kw], [{rank}, in, kh, kw] and [out, {rank}, 1, 1]"),
        ),
        _ => (
            false,
            "a 2D (linear) or 4D (convolution) weight with adapters of the same rank".to_string(),
        ),
    };
    if fits {
        return Ok(());
    }
    Err(LoraError::Shape {
        module: module.to_string(),
        message: format!(
            "weight {:?}, lora_A {:?} and lora_B {:?} do not fit: expected {expected} for \
             rank {rank}",
            w.dims(),
            a.dims(),
            b.dims()
        ),
    })
}

fn fold(w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let dtype = match w.dtype() {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    };
    // A convolution's factors flatten to `[out, rank]` and `[rank, in * k * k]`; a linear
    // layer's already are matrices.
    let b = b.to_dtype(dtype)?.flatten_from(1)?;
    let a = a.to_dtype(dtype)?.flatten_from(1)?;
    let delta = (b.matmul(&a)? * scale)?.reshape(w.dims())?;
    Ok((w.to_dtype(dtype)? + delta)?.to_dtype(w.dtype())?.detach())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Linear;
    use candle_core::{Device, Module, Var};
    use candle_nn::VarMap;

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    /// A frozen (plain-tensor) `layer` of 16 -> 6 with bias, the same layer with a LoRA of
    /// `cfg`, and the map that holds the adapter's variables.
    fn adapted_layer(cfg: &LoraConfig) -> candle_core::Result<(Linear, Linear, VarMap)> {
        let dev = Device::Cpu;
        let frozen = VarMap::new();
        let base = Linear::new(
            crate::nn::random_var_builder(&frozen, 3, DType::F32, &dev).pp("layer"),
            16,
            6,
        )?;
        let plain: HashMap<String, Tensor> = crate::train::named_vars(&frozen)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        let mut layer = Linear::new(
            VarBuilder::from_tensors(plain, DType::F32, &dev).pp("layer"),
            16,
            6,
        )?;
        assert_eq!(
            layer.weight().to_vec2::<f32>()?,
            base.weight().to_vec2::<f32>()?
        );
        let frozen_layer = layer.clone();
        let map = VarMap::new();
        layer.attach_lora(
            crate::nn::seeded_var_builder(&map, 5, DType::F32, &dev).pp("layer"),
            cfg,
        )?;
        Ok((frozen_layer, layer, map))
    }

    fn var(map: &VarMap, name: &str) -> Var {
        map.data().lock().unwrap().get(name).expect(name).clone()
    }

    #[test]
    fn alpha_defaults_to_rank_and_sets_the_scale() {
        let cfg: LoraConfig = serde_json::from_str(r#"{"rank": 8}"#).unwrap();
        assert_eq!(cfg, LoraConfig::new(8));
        assert_eq!(cfg.scale(), 1.0);
        let cfg: LoraConfig = serde_json::from_str(r#"{"rank": 4, "alpha": 2}"#).unwrap();
        assert_eq!((cfg.alpha, cfg.scale()), (2.0, 0.5));
        let back: LoraConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        let off: LoraConfig = serde_json::from_str(r#"{"rank": 0}"#).unwrap();
        assert!(!off.enabled() && off.scale() == 0.0);
        assert_eq!(off, LoraConfig::default());
        let err = serde_json::from_str::<LoraConfig>(r#"{"rank": 4, "alpah": 2}"#).unwrap_err();
        assert!(err.to_string().contains("alpah"), "{err}");
    }

    #[test]
    fn a_fresh_adapter_is_kaiming_uniform_a_and_zero_b_and_changes_nothing(
    ) -> candle_core::Result<()> {
        let cfg = LoraConfig::new(4);
        let (frozen, layer, map) = adapted_layer(&cfg)?;
        let names: Vec<String> = crate::train::named_vars(&map)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["layer.lora_A.weight", "layer.lora_B.weight"]);
        let lora = layer.lora().expect("attached").clone();
        assert_eq!(lora.a().dims(), &[4, 16]);
        assert_eq!(lora.b().dims(), &[6, 4]);
        // PEFT's bound for kaiming_uniform_(a=sqrt(5)) is 1/sqrt(fan_in) = 0.25.
        let a = max_abs(lora.a());
        assert!(a <= 0.25 && a > 0.2, "max |A| = {a}");
        assert_eq!(max_abs(lora.b()), 0.0);

        let x = Tensor::randn(0f32, 1.0, (2, 3, 16), &Device::Cpu)?;
        let adapted = layer.forward(&x)?;
        assert!(frozen.lora().is_none());
        assert_eq!(max_abs(&(adapted - frozen.forward(&x)?)?), 0.0);
        // Rank 0 attaches nothing and creates no variable.
        let mut off = frozen.clone();
        off.attach_lora(
            VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu).pp("off"),
            &LoraConfig::default(),
        )?;
        assert!(off.lora().is_none());
        assert_eq!(map.all_vars().len(), 2);
        Ok(())
    }

    #[test]
    fn the_adapted_layer_equals_its_merged_weight_and_trains_only_a_and_b(
    ) -> candle_core::Result<()> {
        let cfg = LoraConfig {
            rank: 3,
            alpha: 6.0,
        };
        let (_, layer, map) = adapted_layer(&cfg)?;
        let b = var(&map, "layer.lora_B.weight");
        b.set(&Tensor::randn(0f32, 0.5, (6, 3), &Device::Cpu)?)?;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 16), &Device::Cpu)?;
        let y = layer.forward(&x)?;

        let base = HashMap::from([
            ("layer.weight".to_string(), layer.weight().clone()),
            (
                "layer.bias".to_string(),
                layer.bias().expect("bias").clone(),
            ),
        ]);
        let adapters = crate::train::named_vars(&map)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        let merged = merge(&base, &adapters, &cfg).expect("fits");
        let delta = (&merged["layer.weight"] - layer.weight())?;
        assert!(max_abs(&delta) > 1e-2, "the adapter must change the weight");
        let plain = Linear::new(
            VarBuilder::from_tensors(merged, DType::F32, &Device::Cpu).pp("layer"),
            16,
            6,
        )?;
        let diff = max_abs(&(&y - plain.forward(&x)?)?);
        assert!(diff < 1e-5, "adapted vs merged: {diff}");

        let grads = (y * Tensor::randn(0f32, 1.0, (2, 3, 6), &Device::Cpu)?)?
            .sum_all()?
            .backward()?;
        for name in ["layer.lora_A.weight", "layer.lora_B.weight"] {
            let g = grads.get(var(&map, name).as_tensor()).expect(name);
            assert!(max_abs(g) > 0.0, "{name}");
        }
        assert!(!layer.weight().is_variable());
        assert!(grads.get(layer.weight()).is_none());
        Ok(())
    }

    #[test]
    fn merge_names_the_adapter_that_does_not_fit() {
        let dev = Device::Cpu;
        let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
        let cfg = LoraConfig::new(2);
        let base = HashMap::from([("m.weight".to_string(), t(&[6, 4]))]);
        let ok = |a: &[usize], b: &[usize]| {
            HashMap::from([
                ("m.lora_A.weight".to_string(), t(a)),
                ("m.lora_B.weight".to_string(), t(b)),
            ])
        };
        let err = |adapters: HashMap<String, Tensor>, cfg: &LoraConfig| {
            merge(&base, &adapters, cfg).unwrap_err().to_string()
        };
        assert!(merge(&base, &ok(&[2, 4], &[6, 2]), &cfg).is_ok());
        let merged = merge(&base, &HashMap::new(), &cfg).unwrap();
        assert_eq!(merged.keys().collect::<Vec<_>>(), ["m.weight"]);

        let mut misnamed = ok(&[2, 4], &[6, 2]);
        misnamed.insert("m.lora_down.weight".into(), t(&[2, 4]));
        let e = err(misnamed, &cfg);
        assert!(e.contains("m.lora_down.weight"), "{e}");

        let mut lone = ok(&[2, 4], &[6, 2]);
        lone.remove("m.lora_B.weight");
        let e = err(lone, &cfg);
        assert!(
            e.contains("m.lora_A.weight") && e.contains("m.lora_B.weight"),
            "{e}"
        );

        let elsewhere = HashMap::from([
            ("n.lora_A.weight".to_string(), t(&[2, 4])),
            ("n.lora_B.weight".to_string(), t(&[6, 2])),
        ]);
        let e = err(elsewhere, &cfg);
        assert!(
            e.contains("n.lora_A.weight") && e.contains("n.weight"),
            "{e}"
        );

        for (a, b, c) in [
            (&[2, 5][..], &[6, 2][..], cfg),
            (&[2, 4], &[5, 2], cfg),
            (&[2, 4], &[6, 3], cfg),
            (&[2, 4], &[6, 2], LoraConfig::new(3)),
        ] {
            let e = err(ok(a, b), &c);
            assert!(e.contains("LoRA adapter m:") && e.contains("[6, 4]"), "{e}");
        }

        // A 3x3 convolution: A has the kernel, B is 1x1.
        let base = HashMap::from([("m.weight".to_string(), t(&[6, 4, 3, 3]))]);
        let merge_conv = |a: &[usize], b: &[usize]| merge(&base, &ok(a, b), &cfg);
        let merged = merge_conv(&[2, 4, 3, 3], &[6, 2, 1, 1]).expect("fits");
        assert_eq!(merged["m.weight"].dims(), &[6, 4, 3, 3]);
        for (a, b) in [
            (&[2, 4, 1, 1][..], &[6, 2, 1, 1][..]),
            (&[2, 5, 3, 3], &[6, 2, 1, 1]),
            (&[2, 4, 3, 3], &[6, 2, 3, 3]),
            (&[2, 4, 3, 3], &[6, 3, 1, 1]),
            (&[2, 4], &[6, 2]),
        ] {
            let e = merge_conv(a, b).unwrap_err().to_string();
            assert!(
                e.contains("LoRA adapter m:") && e.contains("[6, 4, 3, 3]"),
                "{e}"
            );
        }
    }
}
