//! The DMD2/AMD loop on the tiny family and on the Stable Diffusion fixtures.
use super::*;
use crate::distill::config::AmdConfig;
use crate::distill::family::DistillFamily;
use crate::families::tiny::TinyFamily;
use crate::families::tiny::{DenoiserKind, TinyConfig, TinyModel, TinyTokenizer};
use crate::pipeline::FlowSchedule;
use crate::reward::VerifierReward;
use candle_nn::VarBuilder;

fn tiny_cfg(vocab: usize) -> TinyConfig {
    TinyConfig {
        dim: 32,
        depth: 1,
        heads: 2,
        mlp_ratio: 2,
        patch: 8,
        channels: 3,
        text_dim: 32,
        text_depth: 1,
        text_max_len: 16,
        vocab_size: vocab,
        max_frames: 8,
        image_size: 32,
        refiner: 4,
        ..TinyConfig::default()
    }
}

/// The same with the UNet denoiser.
fn unet_cfg(vocab: usize) -> TinyConfig {
    TinyConfig {
        denoiser: DenoiserKind::Unet,
        unet_channels: vec![8, 16, 16],
        refiner: 0,
        ..tiny_cfg(vocab)
    }
}

/// A random (but fully non-zero) teacher and its weights.
fn teacher() -> (TinyModel, HashMap<String, Tensor>) {
    teacher_of(tiny_cfg)
}

fn teacher_of(cfg: fn(usize) -> TinyConfig) -> (TinyModel, HashMap<String, Tensor>) {
    let dev = Device::Cpu;
    let tok = TinyTokenizer::from_vocabulary(&crate::world::vocabulary()).unwrap();
    let cfg = cfg(tok.vocab_size());
    let map = VarMap::new();
    let vb = crate::nn::random_var_builder(&map, 7, DType::F32, &dev);
    TinyModel::new(vb, &cfg, tok.clone(), FlowSchedule::default()).unwrap();
    let tensors = tensors_of(&named_vars(&map));
    let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    let model = TinyModel::new(vb, &cfg, tok, FlowSchedule::default()).unwrap();
    (model, tensors)
}

fn config(method: Method, s: f32, s_f: f32) -> DistillConfig {
    DistillConfig {
        method,
        student_steps: 2,
        iterations: 4,
        prompts: 2,
        group_size: 2,
        video_every: 2,
        video_prompts: 1,
        guidance: Some(2.0),
        generator_every: 2,
        amd: AmdConfig {
            s,
            s_f,
            ..Default::default()
        },
        ema_decay: 0.9,
        seed: 11,
        ..Default::default()
    }
}

fn distiller(config: DistillConfig) -> Distiller<TinyFamily> {
    distiller_of(config, tiny_cfg)
}

fn distiller_of(config: DistillConfig, cfg: fn(usize) -> TinyConfig) -> Distiller<TinyFamily> {
    let (model, tensors) = teacher_of(cfg);
    Distiller::new(
        config,
        TinyFamily::new(model, tensors.clone()),
        &tensors,
        Box::new(VerifierReward),
        PromptSource::Grammar,
    )
    .unwrap()
}

fn bits(vars: &[(String, Var)]) -> Vec<(String, Vec<u32>)> {
    vars.iter()
        .map(|(n, v)| {
            let x = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n.clone(), x.iter().map(|f| f.to_bits()).collect())
        })
        .collect()
}

fn assert_all_grads(vars: &[(String, Var)], grads: &candle_core::backprop::GradStore) {
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            g.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(g.iter().any(|&x| x != 0.0), "{name}: all-zero gradient");
    }
}

/// The generator loss reaches every student variable, and the critic's loss (with the GAN
/// term when it is on) every critic variable, with finite non-zero gradients. Returns a
/// sample the student made, for further checks.
fn assert_every_variable_learns<F: DistillFamily>(
    d: &Distiller<F>,
    prompts: &[&str],
    video: bool,
) -> anyhow::Result<Tensor> {
    let f = d.family();
    let dev = f.device().clone();
    let shape = f.sample_shape(prompts.len(), video);
    let cond = f.condition(prompts)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let z = randn(&mut rng, &shape, &dev)?;

    // Student: the real generator loss.
    let x = f.student_x0(&d.student, &z, &[1.0, 1.0], &cond)?;
    let x_tau = f.schedule(1).add_noise(&x.detach(), &z, &[0.5, 0.7])?;
    let (xc, xu) = f.teacher_x0(&x_tau, &[0.5, 0.7], &cond)?;
    let xf = f.x0(&d.critic, &x_tau, &[0.5, 0.7], &cond)?.detach();
    let p = TeacherPredictions {
        cond: &xc,
        uncond: &xu,
        fake: &xf,
    };
    let a = Adaptation::new(0.5, &[0.5, -0.5]);
    let h = math::generator_direction(&x.detach(), &p, &[2.0, 2.0], Some(&a))?;
    assert_all_grads(d.student_vars(), &math::generator_loss(&x, &h)?.backward()?);

    // Critic: its weighted denoising loss ...
    let n = randn(&mut rng, &shape, &dev)?;
    let gan_on = d.gan_head.is_some();
    let t = [0.3, 0.9];
    let (per, feat) = f.denoising_loss(&d.critic, &x.detach(), &n, &t, &cond, gan_on)?;
    let mut loss = (per * Tensor::new(&[1.5f32, 0.5], &dev)?)?.mean(0)?;
    // ... plus the GAN term, so that the discriminator head is covered too.
    if let (Some(head), Some(gan)) = (&d.gan_head, f.gan()) {
        let owned: Vec<String> = prompts.iter().map(|p| p.to_string()).collect();
        let frames = if video { crate::world::VIDEO_FRAMES } else { 1 };
        let real = gan.real_batch(&owned, frames, &mut rng)?;
        let real_feat = gan.features(&d.critic, &real, &t, &cond)?;
        let fake = feat.expect("features were asked for");
        let dl = gan::discriminator_loss(&head.forward(&fake)?, &head.forward(&real_feat)?)?;
        assert!(d.critic_vars().iter().any(|(n, _)| n.starts_with("gan.")));
        loss = (loss + dl)?;
    }
    assert_all_grads(d.critic_vars(), &loss.backward()?);
    Ok(x.detach())
}

#[test]
fn every_trainable_variable_gets_a_finite_nonzero_gradient() -> anyhow::Result<()> {
    every_variable_learns_with(tiny_cfg)
}

#[test]
fn every_variable_of_a_unet_student_critic_and_teacher_learns() -> anyhow::Result<()> {
    every_variable_learns_with(unet_cfg)
}

fn every_variable_learns_with(arch: fn(usize) -> TinyConfig) -> anyhow::Result<()> {
    let mut cfg = config(Method::Amd, 0.5, 0.5);
    cfg.gan.enabled = true;
    let d = distiller_of(cfg, arch);
    // A video batch, so that temporal attention is on the path too.
    let prompts = ["a red circle moving left", "two blue squares"];
    let x = assert_every_variable_learns(&d, &prompts, true)?;

    // The teacher itself, as `train-teacher` trains it (text encoder included).
    let f = d.family();
    let dev = Device::Cpu;
    let map = VarMap::new();
    let vb = crate::nn::random_var_builder(&map, 3, DType::F32, &dev);
    let tok = f.model.tokenizer.clone();
    let model = TinyModel::new(vb, &f.model.cfg, tok, FlowSchedule::default())?;
    let text = model.encode(&prompts)?;
    let n = x.randn_like(0.0, 1.0)?;
    let x_t = f.schedule(1).add_noise(&x, &n, &[0.3, 0.9])?;
    let v = model.velocity(&x_t, &[0.3, 0.9], &text)?;
    let loss = (v - &n)?.sqr()?.mean_all()?;
    assert_all_grads(&named_vars(&map), &loss.backward()?);
    Ok(())
}

#[test]
fn a_clip_reward_scores_image_and_video_iterations() -> anyhow::Result<()> {
    // The tiny family's 32x32 RGB samples, resized to the tiny CLIP's 30 px.
    let fx = crate::families::sd::testing::fixture("clip-tiny");
    let reward = crate::reward::load("clip", Some(&fx.dir), &Device::Cpu)?;
    let (model, tensors) = teacher();
    let cfg = config(Method::Amd, 0.5, 0.5);
    let mut d = Distiller::new(
        cfg,
        TinyFamily::new(model, tensors.clone()),
        &tensors,
        reward,
        PromptSource::Grammar,
    )?;
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let s = d.step()?;
        assert!(s.reward_mean.is_finite() && s.reward_std > 0.0, "{s:?}");
        kinds.push(s.video);
    }
    assert!(kinds.contains(&true) && kinds.contains(&false), "{kinds:?}");
    Ok(())
}

#[test]
fn the_gan_term_trains_the_head_and_reports_its_losses() -> anyhow::Result<()> {
    let mut cfg = config(Method::Dmd2, 0.0, 0.0);
    cfg.gan.enabled = true;
    let mut d = distiller(cfg);
    let before = bits(d.critic_vars());
    let a = d.step()?;
    let b = d.step()?;
    let g = a.generator.expect("iteration 0 trains the student");
    assert!(g.gan_g_loss.is_some_and(f64::is_finite));
    assert!(a.gan_d_loss.is_some_and(f64::is_finite) && b.gan_d_loss.is_some());
    let after = bits(d.critic_vars());
    for ((name, x), (_, y)) in before.iter().zip(&after) {
        if name.starts_with("gan.") {
            assert_ne!(x, y, "{name} did not move");
        }
    }
    Ok(())
}

#[test]
fn amd_without_adaptation_is_dmd2_bit_for_bit() -> anyhow::Result<()> {
    let mut dmd2 = distiller(config(Method::Dmd2, 0.0, 0.0));
    let mut amd0 = distiller(config(Method::Amd, 0.0, 0.0));
    let mut amd = distiller(config(Method::Amd, 0.5, 0.5));
    let mut videos = 0;
    for _ in 0..4 {
        let a = dmd2.step()?;
        let b = amd0.step()?;
        amd.step()?;
        assert_eq!(a.critic_loss.to_bits(), b.critic_loss.to_bits());
        videos += a.video as usize;
    }
    assert_eq!(videos, 2, "both image and video iterations ran");
    assert_eq!(bits(dmd2.student_vars()), bits(amd0.student_vars()));
    assert_eq!(bits(dmd2.critic_vars()), bits(amd0.critic_vars()));
    // And the adaptation does change the result (this test can fail).
    assert_ne!(bits(dmd2.student_vars()), bits(amd.student_vars()));
    assert_ne!(bits(dmd2.critic_vars()), bits(amd.critic_vars()));
    Ok(())
}

#[test]
fn a_resumed_run_ends_bit_identical_to_an_uninterrupted_one() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("fewstep-distill-{}", std::process::id()));
    let ckpt = dir.join("checkpoint.safetensors");
    let mut whole = distiller(config(Method::Amd, 0.5, 0.5));
    for _ in 0..4 {
        whole.step()?;
    }
    let mut first = distiller(config(Method::Amd, 0.5, 0.5));
    for _ in 0..3 {
        first.step()?;
    }
    first.save_checkpoint(&ckpt)?;
    drop(first);
    let mut resumed = distiller(config(Method::Amd, 0.5, 0.5));
    resumed.load_checkpoint(&ckpt)?;
    assert_eq!(resumed.state.iteration, 3);
    resumed.step()?;
    assert_eq!(bits(whole.student_vars()), bits(resumed.student_vars()));
    assert_eq!(bits(whole.critic_vars()), bits(resumed.critic_vars()));
    assert_eq!(whole.state, resumed.state);
    let (we, re) = (whole.student_weights()?, resumed.student_weights()?);
    for (name, t) in &we {
        let a = t.flatten_all()?.to_vec1::<f32>()?;
        let b = re[name].flatten_all()?.to_vec1::<f32>()?;
        assert!(a == b, "exported {name} differs");
    }
    // A checkpoint of another method is refused rather than silently mixed in.
    let mut other = distiller(config(Method::Dmd2, 0.0, 0.0));
    assert!(other.load_checkpoint(&ckpt).is_err());
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

mod sd {
    //! The same loop on the tiny random SD1.5 and SDXL fixtures.

    use super::*;
    use crate::families::sd::SdFamily;
    use crate::manifest::Manifest;

    fn sd_family(name: &str) -> SdFamily {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd");
        let manifest = Manifest::from_file(&root.join(format!("{name}.toml"))).unwrap();
        SdFamily::from_manifest(&manifest, &Device::Cpu).unwrap()
    }

    pub(super) fn sd_config() -> DistillConfig {
        let fx = crate::families::sd::testing::fixture("clip-tiny");
        DistillConfig {
            student_steps: 2,
            iterations: 2,
            prompts: 1,
            group_size: 2,
            guidance: Some(3.0),
            generator_every: 1,
            reward: "clip".into(),
            reward_path: Some(fx.dir),
            ..config(Method::Amd, 0.5, 0.5)
        }
    }

    fn sd_distiller(name: &str, cfg: DistillConfig) -> Distiller<SdFamily> {
        let family = sd_family(name);
        let init = family.teacher_weights().clone();
        let reward = crate::reward::load("clip", cfg.reward_path.as_deref(), &Device::Cpu).unwrap();
        Distiller::new(cfg, family, &init, reward, PromptSource::Grammar).unwrap()
    }

    #[test]
    fn every_unet_variable_of_student_and_critic_learns_on_sd15_and_sdxl() -> anyhow::Result<()> {
        for name in ["sd15-tiny", "sdxl-tiny"] {
            let d = sd_distiller(name, sd_config());
            let n_unet = d.family().teacher_weights().len();
            assert_eq!(d.student_vars().len(), n_unet, "{name}: full fine-tuning");
            assert_eq!(d.critic_vars().len(), n_unet, "{name}");
            let x = assert_every_variable_learns(&d, &["a red circle", "a cat"], false)?;
            assert_eq!(x.dims(), &[2, 4, 16, 16], "{name}: latents of 32x32 images");
        }
        Ok(())
    }

    #[test]
    fn one_amd_iteration_moves_the_sd_student_and_critic() -> anyhow::Result<()> {
        for name in ["sd15-tiny", "sdxl-tiny"] {
            let mut d = sd_distiller(name, sd_config());
            let (s0, c0) = (bits(d.student_vars()), bits(d.critic_vars()));
            let stats = d.step()?;
            assert!(!stats.video, "{name}: SD makes images only");
            let g = stats
                .generator
                .as_ref()
                .expect("iteration 0 trains the student");
            assert!(
                g.loss.is_finite() && stats.critic_loss.is_finite(),
                "{stats:?}"
            );
            assert!(
                stats.reward_std > 0.0,
                "{name}: the CLIP reward told samples apart"
            );
            let moved = |a: &[(String, Vec<u32>)], b: &[(String, Vec<u32>)]| {
                a.iter().zip(b).filter(|(x, y)| x.1 != y.1).count()
            };
            assert_eq!(
                moved(&s0, &bits(d.student_vars())),
                s0.len(),
                "{name}: student"
            );
            assert_eq!(
                moved(&c0, &bits(d.critic_vars())),
                c0.len(),
                "{name}: critic"
            );
        }
        Ok(())
    }

    #[test]
    fn with_lora_only_adapters_train_and_every_one_gets_a_gradient() -> anyhow::Result<()> {
        for name in ["sd15-tiny", "sdxl-tiny"] {
            let mut cfg = sd_config();
            cfg.lora = Some(crate::nn::LoraConfig::new(4));
            let mut d = sd_distiller(name, cfg);
            for vars in [d.student_vars(), d.critic_vars()] {
                assert!(vars
                    .iter()
                    .all(|(n, _)| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight")));
            }
            // B starts at zero, so A's gradient does too; after one step both have one.
            d.step()?;
            assert_every_variable_learns(&d, &["a red circle", "a cat"], false)?;
        }
        Ok(())
    }

    #[test]
    fn the_gan_term_is_refused_for_sd() {
        let mut cfg = sd_config();
        cfg.gan.enabled = true;
        let family = sd_family("sd15-tiny");
        let init = family.teacher_weights().clone();
        let err = Distiller::new(
            cfg,
            family,
            &init,
            Box::new(VerifierReward),
            PromptSource::Grammar,
        )
        .err()
        .expect("refused");
        assert!(err.to_string().contains("gan.enabled = false"), "{err}");
    }
}

mod wan {
    //! The same loop on the tiny random Wan2.1 fixture: 1-frame clips and 5-frame videos.

    use super::*;
    use crate::families::wan::WanFamily;
    use crate::manifest::Manifest;

    fn wan_family() -> WanFamily {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let manifest = Manifest::from_file(&root.join("wan/wan-tiny-teacher.toml")).unwrap();
        WanFamily::from_manifest(&manifest, &Device::Cpu).unwrap()
    }

    fn wan_config(method: Method) -> DistillConfig {
        DistillConfig {
            method,
            video_every: 2,
            video_prompts: 1,
            ..super::sd::sd_config()
        }
    }

    fn wan_distiller(cfg: DistillConfig) -> Distiller<WanFamily> {
        let family = wan_family();
        let init = family.teacher_weights().clone();
        let reward = crate::reward::load("clip", cfg.reward_path.as_deref(), &Device::Cpu).unwrap();
        Distiller::new(cfg, family, &init, reward, PromptSource::Grammar).unwrap()
    }

    #[test]
    fn every_transformer_variable_of_student_and_critic_learns_on_clips_and_videos(
    ) -> anyhow::Result<()> {
        let d = wan_distiller(wan_config(Method::Amd));
        let n = d.family().teacher_weights().len();
        assert_eq!(d.student_vars().len(), n, "full fine-tuning");
        assert_eq!(d.critic_vars().len(), n);
        let prompts = ["a red cat walks", "a blue dog"];
        let x = assert_every_variable_learns(&d, &prompts, false)?;
        assert_eq!(x.dims(), &[2, 4, 1, 4, 4], "1-frame latents of 32x32");
        let x = assert_every_variable_learns(&d, &prompts, true)?;
        assert_eq!(x.dims(), &[2, 4, 2, 4, 4], "5 frames are 2 latent frames");
        let pixels = d.family().pixels(&x)?;
        assert_eq!(pixels.dims(), &[2, 5, 3, 32, 32], "frames for the reward");
        Ok(())
    }

    #[test]
    fn dmd2_and_amd_iterations_move_every_wan_weight_on_clips_and_videos() -> anyhow::Result<()> {
        for method in [Method::Dmd2, Method::Amd] {
            let mut d = wan_distiller(wan_config(method));
            for video in [false, true] {
                let (s0, c0) = (bits(d.student_vars()), bits(d.critic_vars()));
                let stats = d.step()?;
                assert_eq!(stats.video, video, "{method:?}: video_every = 2");
                let g = stats.generator.as_ref().expect("generator_every = 1");
                assert!(g.loss.is_finite() && stats.critic_loss.is_finite());
                assert!(stats.reward_std > 0.0, "CLIP told the clips apart");
                let moved = |a: &[(String, Vec<u32>)], b: &[(String, Vec<u32>)]| {
                    a.iter().zip(b).filter(|(x, y)| x.1 != y.1).count()
                };
                assert_eq!(moved(&s0, &bits(d.student_vars())), s0.len(), "{method:?}");
                assert_eq!(moved(&c0, &bits(d.critic_vars())), c0.len(), "{method:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn wan_lora_adapts_attention_and_feed_forward_and_every_adapter_learns() -> anyhow::Result<()> {
        let mut cfg = wan_config(Method::Amd);
        cfg.lora = Some(crate::nn::LoraConfig::new(4));
        let mut d = wan_distiller(cfg);
        let names: Vec<&str> = d.student_vars().iter().map(|(n, _)| n.as_str()).collect();
        assert!(names
            .iter()
            .all(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight")));
        // 2 blocks x (2 attentions x 4 projections + 2 feed-forward layers) x (A, B).
        assert_eq!(names.len(), 2 * 10 * 2, "{names:?}");
        for layer in [
            "attn1.to_q",
            "attn2.to_out.0",
            "ffn.net.0.proj",
            "ffn.net.2",
        ] {
            let a = format!("blocks.1.{layer}.lora_A.weight");
            assert!(names.contains(&a.as_str()), "{a} in {names:?}");
        }
        // B starts at zero, so A's gradient does too; after one step both have one.
        d.step()?;
        assert_every_variable_learns(&d, &["a red cat", "a dog"], true)?;
        Ok(())
    }
}
