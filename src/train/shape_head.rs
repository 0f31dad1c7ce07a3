//! Shape supervision for the teacher: a head on the DiT's mid-network tokens that names, for
//! every pixel, the shape drawn there (or the background), and optionally its colour, trained
//! with cross-entropy beside the flow-matching loss.
//!
//! Why: the velocity loss teaches a shape only through pixel errors at its edges, which are
//! small next to colour and position errors and vanish under high noise, where the shape is
//! decided. The shape's class, given per pixel over the whole object, asks the middle of the
//! network to carry the prompt's shape word to the object's tokens at every noise level
//! (supervised representation alignment, in the spirit of REPA). Colour classes beside the
//! shapes ask the same tokens to bind each colour word to its object (session 28 found that
//! colours already bind, and the colour classes did not help; the teacher README). The head
//! is a training aid only: it is checkpointed for resuming but not shipped with the weights.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::families::tiny::dit::patchify;
use crate::nn::{layer_norm, Linear};
use crate::world::{Color, Shape, BACKGROUND_CLASS, BACKGROUND_COLOR_CLASS};

/// The parameter prefix of the head.
pub const PREFIX: &str = "aux_shape";

/// The widest hidden layer a config may ask for (a typo should not allocate gigabytes).
const MAX_HIDDEN: usize = 4096;

/// Shape classes per pixel: every shape, then the background.
const SHAPE_CLASSES: usize = Shape::COUNT + 1;

/// Colour classes per pixel: every object colour, then the background.
const COLOR_CLASSES: usize = Color::COUNT + 1;

/// The `shape_supervision` key of a teacher config.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeSupervision {
    /// The cross-entropy's weight beside the flow-matching loss.
    pub weight: f32,
    /// Rows below this noise level do not count (0: every row). The image shows the shape
    /// at low noise, so only the upper levels ask the prompt for it.
    #[serde(default)]
    pub min_t: f32,
    /// Width of the head's hidden layer (0: one linear map). A linear head asks the tokens to
    /// hold the classes in a fixed direction of the residual stream; a hidden layer (REPA's
    /// MLP projector) only asks that they be readable.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hidden: usize,
    /// Also name each pixel's colour (a second cross-entropy, added to the shapes').
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub colors: bool,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl ShapeSupervision {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.weight.is_finite()
            && self.weight > 0.0
            && (0.0..1.0).contains(&self.min_t)
            && self.hidden <= MAX_HIDDEN)
        {
            return Err(format!(
                "shape_supervision: weight must be a number > 0, min_t in [0, 1) and hidden at most {MAX_HIDDEN} (got weight {}, min_t {}, hidden {})",
                self.weight, self.min_t, self.hidden
            ));
        }
        Ok(())
    }
}

/// A batch's per-pixel targets: every frame's row-major `H x W` maps of
/// [`crate::world::PixelLabels`], frame after frame.
#[derive(Clone, Copy)]
pub struct Targets<'a> {
    pub shapes: &'a [u8],
    pub colors: &'a [u8],
}

/// `layer_norm`, then a linear map (or two around a SiLU) from a token to its patch's
/// `patch^2` pixels' class logits: shapes, then colours when asked for.
pub struct ShapeHead {
    hidden: Option<Linear>,
    proj: Linear,
    patch: usize,
    colors: bool,
}

impl ShapeHead {
    pub fn new(vb: VarBuilder, dim: usize, patch: usize, cfg: &ShapeSupervision) -> Result<Self> {
        let vb = vb.pp(PREFIX);
        let out = patch * patch * Self::classes(cfg.colors);
        Ok(Self {
            hidden: match cfg.hidden {
                0 => None,
                h => Some(Linear::new(vb.pp("hidden"), dim, h)?),
            },
            proj: Linear::new(
                vb.pp("proj"),
                if cfg.hidden == 0 { dim } else { cfg.hidden },
                out,
            )?,
            patch,
            colors: cfg.colors,
        })
    }

    /// Logits per pixel: the shape classes, then the colour classes when named.
    fn classes(colors: bool) -> usize {
        SHAPE_CLASSES + if colors { COLOR_CLASSES } else { 0 }
    }

    /// Class logits, `[pixels, classes]` in [`patch_order`].
    fn logits(&self, features: &Tensor) -> Result<Tensor> {
        let x = layer_norm(features, 1e-6)?;
        let x = match &self.hidden {
            Some(h) => crate::nn::silu(&h.forward(&x)?)?,
            None => x,
        };
        self.proj
            .forward(&x)?
            .reshape(((), Self::classes(self.colors)))
    }

    /// The mean cross-entropy over the counted rows' pixels of `features` `[B, F*N, D]`
    /// (tokens row-major within each frame of `[F, H, W]`) against `targets`; with colours,
    /// the colours' mean cross-entropy is added to the shapes'. Rows with `t < min_t` are
    /// left out; with none left the loss is 0.
    pub fn loss(
        &self,
        features: &Tensor,
        targets: Targets,
        t: &[f32],
        min_t: f32,
        (h, w): (usize, usize),
    ) -> Result<Tensor> {
        let (b, tokens, _) = features.dims3()?;
        let p = self.patch;
        let pixels = b * tokens * p * p;
        check_map("shape", targets.shapes, BACKGROUND_CLASS, pixels)?;
        if self.colors {
            check_map("colour", targets.colors, BACKGROUND_COLOR_CLASS, pixels)?;
        }
        if t.len() != b || h % p != 0 || w % p != 0 {
            candle_core::bail!(
                "shape head: {} times for {b} rows of {tokens} tokens of {p}x{p} ({h}x{w} frames)",
                t.len()
            );
        }
        let per_row = pixels / b;
        let keep: Vec<f32> = t
            .iter()
            .flat_map(|&ti| std::iter::repeat_n(f32::from(ti >= min_t), per_row))
            .collect();
        let counted = f64::from(keep.iter().sum::<f32>().max(1.0));
        let logits = self.logits(features)?;
        let keep = Tensor::from_vec(keep, pixels, logits.device())?.to_dtype(logits.dtype())?;
        let cross_entropy = |from: usize, classes: usize, map: &[u8]| -> Result<Tensor> {
            let logp = candle_nn::ops::log_softmax(&logits.narrow(1, from, classes)?, 1)?;
            let targets = patch_order(map, p, h, w, logp.device())?;
            let nll = logp.gather(&targets, 1)?.neg()?.reshape(pixels)?;
            (nll * &keep)?.sum_all()? / counted
        };
        let shapes = cross_entropy(0, SHAPE_CLASSES, targets.shapes)?;
        if self.colors {
            shapes + cross_entropy(SHAPE_CLASSES, COLOR_CLASSES, targets.colors)?
        } else {
            Ok(shapes)
        }
    }
}

/// A map must hold one class in `0..=background` per pixel.
fn check_map(what: &str, map: &[u8], background: u8, pixels: usize) -> Result<()> {
    if let Some(c) = map.iter().find(|&&c| c > background) {
        candle_core::bail!("shape head: {what} class {c} in a map (classes are 0..={background})");
    }
    if map.len() != pixels {
        candle_core::bail!(
            "shape head: {} {what} map pixels for {pixels} pixels",
            map.len()
        );
    }
    Ok(())
}

/// Row-major `H x W` maps as class targets `[pixels, 1]` in the order the DiT's tokens hold
/// their pixels ([`patchify`]): token by token, then `p x p` pixels row-major within each.
fn patch_order(maps: &[u8], p: usize, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let frames = maps.len() / (h * w);
    let maps = Tensor::from_vec(
        maps.iter().map(|&c| u32::from(c)).collect(),
        (frames, 1, 1, h, w),
        device,
    )?;
    patchify(&maps, p)?.reshape(((), 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::VarMap;

    /// The share of pixels whose argmax class among `classes` logits from `from` is right.
    fn accuracy(
        head: &ShapeHead,
        features: &Tensor,
        (from, classes): (usize, usize),
        maps: &[u8],
        (h, w): (usize, usize),
    ) -> Result<f32> {
        let logits = head
            .logits(features)?
            .narrow(1, from, classes)?
            .argmax(1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        let want = patch_order(maps, head.patch, h, w, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let right = logits.iter().zip(&want).filter(|(a, b)| a == b).count();
        Ok(right as f32 / want.len().max(1) as f32)
    }

    #[test]
    fn patch_order_walks_tokens_then_their_pixels() {
        // One 4x4 frame holding its own indices, patch 2: token (0,0) is pixels 0,1,4,5.
        let map: Vec<u8> = (0..16).collect();
        let got = patch_order(&map, 2, 4, 4, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(
            got,
            vec![0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
        );
    }

    #[test]
    fn the_loss_counts_only_rows_above_min_t_and_learns_the_classes() -> anyhow::Result<()> {
        for hidden in [0, 16] {
            for colors in [false, true] {
                loss_counts_and_learns(hidden, colors)?;
            }
        }
        Ok(())
    }

    /// Two rows of one frame, 4x4 pixels (4 tokens of 2x2): maps whose class follows the sign
    /// of feature coordinate `coord` of the pixel's token, so a linear head can learn them.
    fn learnable_map(feats: &Tensor, coord: usize, class: u8, background: u8) -> Vec<u8> {
        let signs = feats
            .narrow(2, coord, 1)
            .and_then(|f| f.flatten_all())
            .and_then(|f| f.to_vec1::<f32>())
            .unwrap();
        (0..2)
            .flat_map(|r| {
                let signs = &signs;
                (0..16).map(move |i| {
                    let token = (i / 4 / 2) * 2 + (i % 4) / 2;
                    if signs[r * 4 + token] > 0.0 {
                        class
                    } else {
                        background
                    }
                })
            })
            .collect()
    }

    fn loss_counts_and_learns(hidden: usize, colors: bool) -> anyhow::Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = crate::nn::seeded_var_builder(&map, 3, DType::F32, &dev);
        let cfg = ShapeSupervision {
            weight: 1.0,
            min_t: 0.0,
            hidden,
            colors,
        };
        let head = ShapeHead::new(vb, 8, 2, &cfg)?;
        let feats = Tensor::randn(0f32, 1.0, (2, 4, 8), &dev)?;
        let shapes = learnable_map(&feats, 0, 3, BACKGROUND_CLASS);
        let colors_map = learnable_map(&feats, 1, 4, BACKGROUND_COLOR_CLASS);
        let maps = Targets {
            shapes: &shapes,
            colors: &colors_map,
        };
        let first_maps = Targets {
            shapes: &shapes[..16],
            colors: &colors_map[..16],
        };
        let both = head.loss(&feats, maps, &[0.9, 0.9], 0.5, (4, 4))?;
        let first_row = head.loss(&feats.narrow(0, 0, 1)?, first_maps, &[0.9], 0.5, (4, 4))?;
        let upper_only = head.loss(&feats, maps, &[0.9, 0.1], 0.5, (4, 4))?;
        assert!((upper_only.to_scalar::<f32>()? - first_row.to_scalar::<f32>()?).abs() < 1e-5);
        let none = head.loss(&feats, maps, &[0.1, 0.1], 0.5, (4, 4))?;
        assert_eq!(none.to_scalar::<f32>()?, 0.0);
        // A few hundred plain gradient steps fit the classes.
        let start = both.to_scalar::<f32>()?;
        let mut opt = crate::train::AdamW::new(
            crate::train::named_vars(&map),
            crate::train::AdamWConfig {
                lr: 0.05,
                warmup_steps: 0,
                ..Default::default()
            },
        )?;
        for _ in 0..200 {
            let l = head.loss(&feats, maps, &[0.9, 0.9], 0.0, (4, 4))?;
            opt.backward_step(&l)?;
        }
        let end = head
            .loss(&feats, maps, &[0.9, 0.9], 0.0, (4, 4))?
            .to_scalar::<f32>()?;
        assert!(end < 0.2 * start, "hidden {hidden}: {start} -> {end}");
        let shape_logits = (0, SHAPE_CLASSES);
        assert_eq!(accuracy(&head, &feats, shape_logits, &shapes, (4, 4))?, 1.0);
        if colors {
            let color_logits = (SHAPE_CLASSES, COLOR_CLASSES);
            assert_eq!(
                accuracy(&head, &feats, color_logits, &colors_map, (4, 4))?,
                1.0
            );
        }
        // Bad sizes and classes are errors, not panics; the colour map is read only when
        // colours are supervised.
        assert!(head
            .loss(&feats, first_maps, &[0.9, 0.9], 0.0, (4, 4))
            .is_err());
        let mut bad = shapes.clone();
        bad[5] = BACKGROUND_CLASS + 1;
        let bad_shapes = Targets {
            shapes: &bad,
            ..maps
        };
        assert!(head
            .loss(&feats, bad_shapes, &[0.9, 0.9], 0.0, (4, 4))
            .is_err());
        let mut bad = colors_map.clone();
        bad[5] = BACKGROUND_COLOR_CLASS + 1;
        let bad_colors = Targets {
            colors: &bad,
            ..maps
        };
        assert_eq!(
            head.loss(&feats, bad_colors, &[0.9, 0.9], 0.0, (4, 4))
                .is_err(),
            colors
        );
        Ok(())
    }

    #[test]
    fn the_config_is_validated() {
        let ok = ShapeSupervision {
            weight: 0.3,
            min_t: 0.5,
            hidden: 0,
            colors: true,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            ShapeSupervision {
                weight: 0.0,
                min_t: 0.0,
                hidden: 0,
                colors: false,
            },
            ShapeSupervision {
                weight: f32::NAN,
                min_t: 0.0,
                hidden: 0,
                colors: false,
            },
            ShapeSupervision {
                weight: 1.0,
                min_t: 1.0,
                hidden: 0,
                colors: false,
            },
            ShapeSupervision {
                weight: 1.0,
                min_t: -0.1,
                hidden: 0,
                colors: false,
            },
            ShapeSupervision {
                weight: 1.0,
                min_t: 0.0,
                hidden: 1 << 20,
                colors: false,
            },
        ] {
            assert!(bad.validate().unwrap_err().starts_with("shape_supervision"));
        }
    }
}
