//! LoRA on the UNet, on the tiny parity fixtures: adapters sit on the layers PEFT adapts,
//! under PEFT's names, start as a no-op, train (and only they do), and merge into a plain
//! UNet that computes the adapted output.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::tests::{assert_correct_gradients, loss, randn, Inputs};
use super::*;
use crate::families::sd::testing::{fixture, max_abs, max_abs_diff, Fixture};
use crate::nn::{lora, LoraConfig};

const FIXTURES: [&str; 2] = ["sd15-tiny", "sdxl-tiny"];

fn weights_file(fx: &Fixture) -> PathBuf {
    fx.dir.join("unet/diffusion_pytorch_model.safetensors")
}

/// The fixture's UNet (frozen: plain tensors), a copy with LoRA adapters of `cfg` whose
/// variables are in the returned map, and the number of adapted layers.
fn adapted(fx: &Fixture, cfg: &LoraConfig, dtype: DType) -> Result<(UNet, UNet, VarMap, usize)> {
    let dev = Device::Cpu;
    let ucfg = UNetConfig::from_file(&fx.dir.join("unet/config.json")).expect("config");
    let base = UNet::load(&fx.dir.join("unet"), &ucfg, dtype, &dev).expect("weights");
    let mut unet = base.clone();
    let map = VarMap::new();
    let n = unet.attach_lora(crate::nn::seeded_var_builder(&map, 11, dtype, &dev), cfg)?;
    Ok((base, unet, map, n))
}

/// Random non-zero `lora_B` weights, so that the adapters change the output.
fn randomize_b(map: &VarMap, dtype: DType) -> Result<()> {
    for (i, (name, var)) in crate::train::named_vars(map).into_iter().enumerate() {
        if name.ends_with(".lora_B.weight") {
            var.set(&(randn(50 + i as u64, var.dims(), dtype, &Device::Cpu)? * 0.1)?)?;
        }
    }
    Ok(())
}

/// The fixture's recorded UNet inputs (first timestep case) in `dtype`.
fn fixture_inputs(fx: &Fixture, unet: &UNet, dtype: DType) -> Result<Inputs> {
    let added = unet.needs_added_cond().then(|| AddedCond {
        text_embeds: fx.tensor("unet.text_embeds"),
        time_ids: fx.tensor("unet.time_ids"),
    });
    Ok(Inputs {
        sample: fx.tensor("unet.sample").to_dtype(dtype)?,
        t: fx.tensor("unet.timesteps.0"),
        context: fx.tensor("unet.encoder_hidden_states").to_dtype(dtype)?,
        added,
    })
}

fn forward(unet: &UNet, x: &Inputs) -> Result<Tensor> {
    unet.forward(&x.sample, &x.t, &x.context, x.added.as_ref())
}

#[test]
fn a_fresh_lora_leaves_the_unet_output_bit_identical() -> Result<()> {
    for name in FIXTURES {
        let fx = fixture(name);
        let (base, unet, _, n) = adapted(&fx, &LoraConfig::new(4), DType::F32)?;
        assert!(n > 0, "{name}: nothing adapted");
        let x = fixture_inputs(&fx, &base, DType::F32)?;
        let diff = max_abs_diff(&forward(&base, &x)?, &forward(&unet, &x)?);
        assert_eq!(diff, 0.0, "{name}");
    }
    Ok(())
}

#[test]
fn lora_adapts_the_attention_feed_forward_projection_time_and_resnet_convolution_layers(
) -> Result<()> {
    // Dense layers. sd15-tiny: 12 resnets (2 + 2 down, 2 mid, 3 + 3 up) and 6 transformers
    // (2 down, 1 mid, 3 up) of one block with 4 + 4 attention and 2 feed-forward layers; its
    // projections are 1x1 convolutions: 12 + 6 * 10 = 72. sdxl-tiny: the same 12 resnets and
    // 6 transformers, of two blocks each, with linear proj_in/proj_out: 12 + 6 * (2 * 10 + 2)
    // = 144.
    // Convolutions, the same in both (two down blocks of two resnets, the first widening
    // the channels at the second block; two up blocks of three): conv1 + conv2 of the 12
    // resnets, conv_shortcut of the widening down resnet and of the 6 up resnets (their
    // input is concatenated with a skip), one downsampler and one upsampler:
    // 24 + 7 + 2 = 33. Total: 105 and 177.
    let cases = [
        (
            "sd15-tiny",
            105,
            "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
        ),
        (
            "sdxl-tiny",
            177,
            "up_blocks.0.attentions.2.transformer_blocks.1.ff.net.0.proj",
        ),
    ];
    for (name, expected, example) in cases {
        let fx = fixture(name);
        let (_, _, map, n) = adapted(&fx, &LoraConfig::new(2), DType::F32)?;
        assert_eq!(n, expected, "{name}");
        let vars = crate::train::named_vars(&map);
        assert_eq!(vars.len(), 2 * n, "{name}");
        // Every adapter sits on a weight of the diffusers state dict, in the shape PEFT gives.
        let base = candle_core::safetensors::load(weights_file(&fx), &Device::Cpu)?;
        for (var_name, var) in &vars {
            let (module, is_a) = match var_name.strip_suffix(".lora_A.weight") {
                Some(m) => (m, true),
                None => (
                    var_name.strip_suffix(".lora_B.weight").expect(var_name),
                    false,
                ),
            };
            let w = base
                .get(&format!("{module}.weight"))
                .unwrap_or_else(|| panic!("{name}: {var_name} has no base weight"));
            let want = match (w.dims(), is_a) {
                (&[_, inp], true) => vec![2, inp],
                (&[out, _], false) => vec![out, 2],
                (&[_, inp, k, _], true) => vec![2, inp, k, k],
                (&[out, _, _, _], false) => vec![out, 2, 1, 1],
                (other, _) => panic!("{name}: {module} has a weight of shape {other:?}"),
            };
            assert_eq!(var.dims(), want, "{name}: {var_name}");
            if is_a {
                // PEFT's Kaiming-uniform bound 1/sqrt(fan_in), fan_in = in (* k * k).
                let bound = 1.0 / (var.elem_count() as f32 / 2.0).sqrt();
                let a = max_abs(var.as_tensor());
                assert!(a <= bound && a > 0.5 * bound, "{name}: {var_name} max {a}");
            }
        }
        let has = |m: &str| vars.iter().any(|(v, _)| v == &format!("{m}.lora_A.weight"));
        for module in [
            example,
            "mid_block.resnets.1.time_emb_proj",
            "mid_block.resnets.0.conv1",
            "up_blocks.1.resnets.2.conv2",
            "down_blocks.1.resnets.0.conv_shortcut",
            "up_blocks.0.resnets.2.conv_shortcut",
            "down_blocks.0.downsamplers.0.conv",
            "up_blocks.0.upsamplers.0.conv",
        ] {
            assert!(has(module), "{name}: no adapter on {module}");
        }
        for module in [
            "conv_in",
            "conv_out",
            "down_blocks.0.resnets.0.conv_shortcut",
        ] {
            assert!(!has(module), "{name}: {module} must not be adapted");
        }
        let linear_proj = has("mid_block.attentions.0.proj_in");
        assert_eq!(linear_proj, name == "sdxl-tiny", "{name}: proj_in");

        let (_, _, off_map, off) = adapted(&fx, &LoraConfig::default(), DType::F32)?;
        assert_eq!((off, off_map.all_vars().len()), (0, 0), "{name}: rank 0");
    }
    Ok(())
}

#[test]
fn every_lora_variable_gets_a_correct_gradient_and_the_base_stays_frozen() -> Result<()> {
    for name in FIXTURES {
        let fx = fixture(name);
        let cfg = LoraConfig {
            rank: 2,
            alpha: 3.0,
        };
        let (_, mut unet, map, _) = adapted(&fx, &cfg, DType::F64)?;
        randomize_b(&map, DType::F64)?;
        let x = fixture_inputs(&fx, &unet, DType::F64)?;
        let weights = randn(9, x.sample.dims(), DType::F64, &Device::Cpu)?;
        // Every variable (only adapters) gets a finite, non-zero gradient that matches a
        // finite difference.
        assert_correct_gradients(&unet, &crate::train::named_vars(&map), &x, &weights)?;

        let grads = loss(&unet, &x, &weights)?.backward()?;
        let mut frozen = 0;
        unet.visit_linears(&mut |path, linear| {
            for t in [Some(linear.weight()), linear.bias()].into_iter().flatten() {
                assert!(!t.is_variable(), "{name}: {path} is a variable");
                assert!(grads.get(t).is_none(), "{name}: {path} got a gradient");
                frozen += 1;
            }
            Ok(())
        })?;
        // candle's conv2d backward fills a kernel gradient whether or not the kernel is a
        // variable, so a frozen convolution is one whose weights are plain tensors.
        unet.visit_convs(&mut |path, conv| {
            for t in [conv.weight(), conv.bias()] {
                assert!(!t.is_variable(), "{name}: {path} is a variable");
                frozen += 1;
            }
            Ok(())
        })?;
        assert!(frozen > 0, "{name}");
    }
    Ok(())
}

#[test]
fn merged_weights_give_a_plain_unet_the_adapted_output() -> Result<()> {
    let dev = Device::Cpu;
    for name in FIXTURES {
        let fx = fixture(name);
        let cfg = LoraConfig {
            rank: 4,
            alpha: 8.0,
        };
        let (base_unet, unet, map, _) = adapted(&fx, &cfg, DType::F32)?;
        randomize_b(&map, DType::F32)?;
        let x = fixture_inputs(&fx, &unet, DType::F32)?;
        let want = forward(&unet, &x)?;
        let moved = max_abs_diff(&want, &forward(&base_unet, &x)?);
        assert!(
            moved > 1e-3,
            "{name}: the adapters barely move the output ({moved})"
        );

        let base = candle_core::safetensors::load(weights_file(&fx), &dev)?;
        let adapters: HashMap<String, Tensor> = crate::train::named_vars(&map)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        let merged = lora::merge(&base, &adapters, &cfg).expect("adapters fit");
        let vb = VarBuilder::from_tensors(merged, DType::F32, &dev);
        let plain = UNet::new(vb, unet.config())?;
        let diff = max_abs_diff(&forward(&plain, &x)?, &want);
        eprintln!(
            "{name}: merged vs adapted max abs diff {diff:.3e} (output max abs {:.3e}, \
             LoRA moved it by {moved:.3e})",
            max_abs(&want)
        );
        assert!(diff <= 1e-5, "{name}: merged vs adapted {diff}");
    }
    Ok(())
}
