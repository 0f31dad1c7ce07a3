//! An OpenCLIP state dict (safetensors, or a PyTorch pickle read with candle's `pickle`
//! module) checked against its config and renamed to the transformers `CLIPModel` names that
//! [`ClipScoreReward`](super::super::ClipScoreReward) loads: the fused attention input
//! projection splits into q/k/v, and the two projections, stored `[in, out]` to be
//! right-multiplied, are transposed into Linear weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::config::{OpenClipConfig, TowerCfg};
use crate::families::sd::layout::LoadError;

/// Buffers some checkpoints carry that no parameter corresponds to (the causal mask; OpenAI's
/// JIT archives' metadata): open_clip drops them too.
const IGNORED: [&str; 4] = [
    "attn_mask",
    "input_resolution",
    "context_length",
    "vocab_size",
];
/// The key under which training checkpoints (HPSv2's `.pt` among them) keep the state dict.
const STATE_DICT_KEY: &str = "state_dict";
/// The prefix `DistributedDataParallel` adds to every name.
const DDP_PREFIX: &str = "module.";

/// What becomes of one OpenCLIP tensor.
enum Target {
    Same(String),
    Transposed(String),
    /// Rows split in three (`in_proj_weight` / `in_proj_bias` -> q, k, v).
    Split([String; 3]),
}

struct Expected {
    name: String,
    shape: Vec<usize>,
    target: Target,
}

fn same(name: String, shape: &[usize], target: String) -> Expected {
    Expected {
        name,
        shape: shape.to_vec(),
        target: Target::Same(target),
    }
}

/// One `ResidualAttentionBlock` (`src`) as a transformers `CLIPEncoderLayer` (`dst`).
fn block(src: &str, dst: &str, t: &TowerCfg, out: &mut Vec<Expected>) {
    let (d, m) = (t.width, t.mlp_width);
    for (a, b) in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")] {
        for p in ["weight", "bias"] {
            out.push(same(
                format!("{src}.{a}.{p}"),
                &[d],
                format!("{dst}.{b}.{p}"),
            ));
        }
    }
    for (p, shape) in [("weight", vec![3 * d, d]), ("bias", vec![3 * d])] {
        out.push(Expected {
            name: format!("{src}.attn.in_proj_{p}"),
            shape,
            target: Target::Split(["q", "k", "v"].map(|h| format!("{dst}.self_attn.{h}_proj.{p}"))),
        });
    }
    let linears = [
        ("attn.out_proj", "self_attn.out_proj", d, d),
        ("mlp.c_fc", "mlp.fc1", m, d),
        ("mlp.c_proj", "mlp.fc2", d, m),
    ];
    for (a, b, rows, cols) in linears {
        out.push(same(
            format!("{src}.{a}.weight"),
            &[rows, cols],
            format!("{dst}.{b}.weight"),
        ));
        out.push(same(
            format!("{src}.{a}.bias"),
            &[rows],
            format!("{dst}.{b}.bias"),
        ));
    }
}

fn layer_norm(src: &str, dst: &str, d: usize, out: &mut Vec<Expected>) {
    for p in ["weight", "bias"] {
        out.push(same(format!("{src}.{p}"), &[d], format!("{dst}.{p}")));
    }
}

/// Every tensor of `open_clip.CLIP` built from `cfg`, with its shape and its `CLIPModel` name.
fn expected(cfg: &OpenClipConfig) -> Vec<Expected> {
    let mut out = Vec::new();
    let (t, v, e) = (&cfg.text, &cfg.vision, cfg.embed_dim);
    let text = "text_model";
    out.push(same(
        "token_embedding.weight".into(),
        &[cfg.vocab_size, t.width],
        format!("{text}.embeddings.token_embedding.weight"),
    ));
    out.push(same(
        "positional_embedding".into(),
        &[cfg.context_length, t.width],
        format!("{text}.embeddings.position_embedding.weight"),
    ));
    for i in 0..t.layers {
        let (src, dst) = (
            format!("transformer.resblocks.{i}"),
            format!("{text}.encoder.layers.{i}"),
        );
        block(&src, &dst, t, &mut out);
    }
    layer_norm(
        "ln_final",
        &format!("{text}.final_layer_norm"),
        t.width,
        &mut out,
    );
    out.push(Expected {
        name: "text_projection".into(),
        shape: vec![t.width, e],
        target: Target::Transposed("text_projection.weight".into()),
    });
    out.push(same("logit_scale".into(), &[], "logit_scale".into()));

    let vis = "vision_model";
    let p = cfg.patch_size;
    out.push(same(
        "visual.conv1.weight".into(),
        &[v.width, 3, p, p],
        format!("{vis}.embeddings.patch_embedding.weight"),
    ));
    out.push(same(
        "visual.class_embedding".into(),
        &[v.width],
        format!("{vis}.embeddings.class_embedding"),
    ));
    out.push(same(
        "visual.positional_embedding".into(),
        &[cfg.grid() * cfg.grid() + 1, v.width],
        format!("{vis}.embeddings.position_embedding.weight"),
    ));
    // "layrnorm" is transformers' spelling.
    layer_norm(
        "visual.ln_pre",
        &format!("{vis}.pre_layrnorm"),
        v.width,
        &mut out,
    );
    for i in 0..v.layers {
        let (src, dst) = (
            format!("visual.transformer.resblocks.{i}"),
            format!("{vis}.encoder.layers.{i}"),
        );
        block(&src, &dst, v, &mut out);
    }
    layer_norm(
        "visual.ln_post",
        &format!("{vis}.post_layernorm"),
        v.width,
        &mut out,
    );
    out.push(Expected {
        name: "visual.proj".into(),
        shape: vec![v.width, e],
        target: Target::Transposed("visual_projection.weight".into()),
    });
    out
}

fn weights_error(path: &Path, source: candle_core::Error) -> LoadError {
    LoadError::Weights {
        files: path.display().to_string(),
        source,
    }
}

/// The state dict in `path`: a safetensors file, or a PyTorch zip pickle holding either the
/// state dict itself or a checkpoint with it under `state_dict`; `module.` prefixes removed.
pub fn read(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, LoadError> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let tensors: HashMap<String, Tensor> = if is_safetensors {
        candle_core::safetensors::load(path, device).map_err(|e| weights_error(path, e))?
    } else {
        let mut all = candle_core::pickle::read_all_with_key(path, None)
            .map_err(|e| weights_error(path, e))?;
        if all.is_empty() {
            all = candle_core::pickle::read_all_with_key(path, Some(STATE_DICT_KEY)).map_err(
                |e| {
                    LoadError::invalid(
                        path,
                        format!(
                            "no tensors at the top level and no {STATE_DICT_KEY:?} entry ({e})"
                        ),
                    )
                },
            )?;
        }
        all.into_iter()
            .map(|(k, t)| t.to_device(device).map(|t| (k, t)))
            .collect::<candle_core::Result<_>>()
            .map_err(|e| weights_error(path, e))?
    };
    if tensors.is_empty() {
        return Err(LoadError::invalid(path, "holds no tensors"));
    }
    Ok(tensors
        .into_iter()
        .map(|(k, t)| match k.strip_prefix(DDP_PREFIX) {
            Some(s) => (s.to_string(), t),
            None => (k, t),
        })
        .collect())
}

/// Checks `tensors` (read from `path`) against `cfg` and renames them to `CLIPModel`'s names.
/// A missing tensor, a wrong shape or an unexpected tensor (the mark of an option this model
/// does not implement) is an error naming the file and the OpenCLIP tensor.
pub fn to_clip_model(
    mut tensors: HashMap<String, Tensor>,
    cfg: &OpenClipConfig,
    path: &Path,
) -> Result<HashMap<String, Tensor>, LoadError> {
    let mut out = HashMap::new();
    for e in expected(cfg) {
        let t = tensors.remove(&e.name).ok_or_else(|| {
            LoadError::invalid(
                path,
                format!("missing tensor {} (shape {:?})", e.name, e.shape),
            )
        })?;
        if t.dims() != e.shape.as_slice() {
            return Err(LoadError::invalid(
                path,
                format!(
                    "tensor {} has shape {:?}; open_clip_config.json makes it {:?}",
                    e.name,
                    t.dims(),
                    e.shape
                ),
            ));
        }
        let wrap = |r: candle_core::Result<Tensor>| r.map_err(|s| weights_error(path, s));
        match e.target {
            Target::Same(n) => {
                out.insert(n, t);
            }
            Target::Transposed(n) => {
                out.insert(n, wrap(t.t().and_then(|t| t.contiguous()))?);
            }
            Target::Split(names) => {
                let rows = e.shape[0] / 3;
                for (i, n) in names.into_iter().enumerate() {
                    out.insert(n, wrap(t.narrow(0, i * rows, rows))?);
                }
            }
        }
    }
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|k| !IGNORED.contains(&k.rsplit('.').next().unwrap_or(k)))
        .collect();
    if !extra.is_empty() {
        extra.sort();
        let shown: Vec<&str> = extra.iter().take(5).map(|s| s.as_str()).collect();
        return Err(LoadError::unsupported(
            path,
            format!(
                "{} tensor(s) that open_clip.CLIP with this config does not have: {}{} (an \
                 option this loader does not implement, or weights of another model)",
                extra.len(),
                shown.join(", "),
                if extra.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use serde_json::json;

    fn tiny() -> OpenClipConfig {
        // One directory per call: the tests of this module run in parallel.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fewstep-ocw-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("open_clip_config.json");
        std::fs::write(
            &path,
            json!({"embed_dim": 6,
                   "vision_cfg": {"image_size": 4, "patch_size": 2, "width": 8, "head_width": 4,
                                  "layers": 1},
                   "text_cfg": {"context_length": 5, "vocab_size": 10, "width": 4, "heads": 2,
                                "layers": 1}})
            .to_string(),
        )
        .unwrap();
        let cfg = OpenClipConfig::load(&path).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        cfg
    }

    /// A state dict of the right shapes whose every value is distinct.
    fn state(cfg: &OpenClipConfig) -> HashMap<String, Tensor> {
        let mut start = 0f32;
        expected(cfg)
            .into_iter()
            .map(|e| {
                let n: usize = e.shape.iter().product();
                let t = Tensor::arange(start, start + n as f32, &Device::Cpu)
                    .unwrap()
                    .reshape(e.shape.as_slice())
                    .unwrap();
                start += n as f32;
                (e.name, t)
            })
            .collect()
    }

    #[test]
    fn in_proj_splits_and_projections_transpose() {
        let cfg = tiny();
        let src = state(&cfg);
        let got = to_clip_model(src.clone(), &cfg, Path::new("w.bin")).unwrap();
        // text: 2 embeddings + 1 layer x 16 + final LN 2 + projection + logit_scale; vision:
        // 3 + 2 + 16 + 2 + projection.
        assert_eq!(got.len(), (2 + 16 + 2 + 1 + 1) + (3 + 2 + 16 + 2 + 1));
        let w = &src["visual.transformer.resblocks.0.attn.in_proj_weight"]; // [24, 8]
        for (i, h) in ["q", "k", "v"].iter().enumerate() {
            let name = format!("vision_model.encoder.layers.0.self_attn.{h}_proj.weight");
            let want: Vec<Vec<f32>> = w.narrow(0, 8 * i, 8).unwrap().to_vec2().unwrap();
            assert_eq!(got[&name].to_vec2::<f32>().unwrap(), want, "{name}");
        }
        let b = &src["transformer.resblocks.0.attn.in_proj_bias"]; // [12]
        let vb: Vec<f32> = got["text_model.encoder.layers.0.self_attn.v_proj.bias"]
            .to_vec1()
            .unwrap();
        assert_eq!(vb, b.narrow(0, 8, 4).unwrap().to_vec1::<f32>().unwrap());
        let proj = got["visual_projection.weight"].to_vec2::<f32>().unwrap(); // [6, 8]
        let orig = src["visual.proj"].to_vec2::<f32>().unwrap(); // [8, 6]
        assert_eq!((proj.len(), proj[0].len()), (6, 8));
        assert_eq!(proj[2][5], orig[5][2]);
        assert_eq!(
            got["text_projection.weight"].dims(),
            &[6, 4],
            "text projection transposed"
        );
        assert_eq!(got["logit_scale"].dims(), &[] as &[usize]);
    }

    #[test]
    fn missing_misshapen_and_unexpected_tensors_are_named() {
        let cfg = tiny();
        let path = Path::new("/models/x/open_clip_pytorch_model.bin");
        let err = |edit: &dyn Fn(&mut HashMap<String, Tensor>)| {
            let mut s = state(&cfg);
            edit(&mut s);
            to_clip_model(s, &cfg, path).unwrap_err().to_string()
        };
        let e = err(&|s| {
            s.remove("visual.ln_post.bias");
        });
        assert!(
            e.contains(path.to_str().unwrap()) && e.contains("missing tensor visual.ln_post.bias"),
            "{e}"
        );
        let e = err(&|s| {
            let z = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
            s.insert("transformer.resblocks.0.attn.in_proj_weight".into(), z);
        });
        assert!(
            e.contains("in_proj_weight has shape [4, 4]") && e.contains("[12, 4]"),
            "{e}"
        );
        let e = err(&|s| {
            let g = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
            s.insert(
                "visual.transformer.resblocks.0.ls_1.gamma".into(),
                g.clone(),
            );
            s.insert("attn_mask".into(), g);
        });
        assert!(
            e.contains("unsupported") && e.contains("1 tensor(s)") && e.contains("ls_1.gamma"),
            "{e}"
        );
    }
}
