//! `fewstep distill` end to end on the tiny random Stable Diffusion fixtures: train, export,
//! resume, and serve the student; and what a tiny run refuses.

use super::*;
use crate::families::sd::read_unet_weights;
use crate::pipeline::BatchSpec;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd")
}

fn options(model: &str, out: &Path, lora: Option<crate::nn::LoraConfig>) -> RunOptions {
    let config = DistillConfig {
        student_steps: 2,
        iterations: 2,
        prompts: 1,
        group_size: 2,
        generator_every: 1,
        reward: "clip".into(),
        reward_path: Some(fixtures().join("clip-tiny")),
        lora,
        ..Default::default()
    };
    RunOptions {
        models_dir: fixtures(),
        model: model.into(),
        out: out.to_path_buf(),
        prompts: None,
        resume: false,
        config,
        eval: Some(EvalOptions::default()),
        from_log: None,
        publish: None,
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fewstep-sd-distill-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    dir
}

/// One output (its frames) of a loaded model at its default steps and guidance, 32x32.
fn generate(
    model: &LoadedModel,
    prompt: &str,
    seed: u64,
    frames: usize,
) -> anyhow::Result<Vec<image::RgbImage>> {
    let spec = BatchSpec {
        prompts: vec![prompt.into()],
        negative_prompts: vec![String::new()],
        seeds: vec![seed],
        frames,
        width: 32,
        height: 32,
    };
    let sampling = &model.manifest.sampling;
    let mut out = model
        .generate(&spec, sampling.default_steps, sampling.default_guidance)?
        .outputs;
    Ok(out.remove(0))
}

/// One 32x32 image of a loaded SD model.
fn generate_image(model: &LoadedModel) -> anyhow::Result<image::RgbImage> {
    Ok(generate(model, "a red circle", 7, 1)?.remove(0))
}

#[test]
fn an_sd15_student_distills_exports_resumes_and_serves() -> anyhow::Result<()> {
    let dir = temp_dir("sd15");
    let opts = options("sd15-tiny", &dir, None);
    let mut seen = Vec::new();
    let out = run(&opts, &Device::Cpu, |s, _| seen.push(s.iteration))?;
    assert_eq!(seen, vec![1, 2]);
    assert!(
        out.report.is_none(),
        "the ShapesWorld eval is skipped for SD"
    );

    // The student: a UNet file beside a manifest that points at the teacher's directory.
    let m = &out.manifest;
    assert_eq!(m.name, "sd15-tiny-student");
    assert_eq!(m.teacher.as_deref(), Some("sd15-tiny"));
    assert_eq!(m.sampling.sampler, SamplerKind::Student);
    assert_eq!(m.sampling.default_steps, 2);
    let teacher = Manifest::find(&fixtures(), "sd15-tiny")?;
    let teacher_unet = read_unet_weights(&fixtures().join("sd15-tiny/unet"), &Device::Cpu)?;
    let student_unet = read_unet_weights(&m.weights_path(), &Device::Cpu)?;
    assert_eq!(student_unet.len(), teacher_unet.len());
    let moved = student_unet
        .iter()
        .filter(|(n, t)| {
            let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = teacher_unet[*n]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            a != b
        })
        .count();
    assert_eq!(moved, teacher_unet.len(), "every student weight trained");

    // It serves: a 2-step image that differs from the teacher's 2-step image.
    let student = LoadedModel::load(m, &Device::Cpu)?;
    let mut as_student = teacher.clone();
    as_student.sampling = m.sampling.clone();
    let teacher_as_student = LoadedModel::load(&as_student, &Device::Cpu)?;
    let (a, b) = (
        generate_image(&student)?,
        generate_image(&teacher_as_student)?,
    );
    assert_eq!(a.dimensions(), (32, 32));
    assert_ne!(a.as_raw(), b.as_raw());

    // A finished run is not overwritten; --resume extends it.
    assert!(run(&opts, &Device::Cpu, |_, _| {}).is_err());
    let mut more = opts.clone();
    more.resume = true;
    more.config.iterations = 3;
    let mut seen = Vec::new();
    run(&more, &Device::Cpu, |s, _| seen.push(s.iteration))?;
    assert_eq!(seen, vec![3]);
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

#[test]
fn an_sdxl_lora_student_trains_adapters_and_exports_merged_weights() -> anyhow::Result<()> {
    let dir = temp_dir("sdxl-lora");
    let lora = crate::nn::LoraConfig::new(4);
    let opts = options("sdxl-tiny", &dir, Some(lora));
    let out = run(&opts, &Device::Cpu, |_, _| {})?;

    // Only the adapters trained; the checkpoint holds them and no base weight.
    let ckpt = candle_core::safetensors::load(dir.join("checkpoint.safetensors"), &Device::Cpu)?;
    let student: Vec<&String> = ckpt.keys().filter(|k| k.starts_with("student.")).collect();
    assert!(!student.is_empty());
    assert!(
        student
            .iter()
            .all(|k| k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight")),
        "{student:?}"
    );

    // The export is a plain UNet with the adapters merged: adapted weights moved, the rest
    // (convolutions, norms) are the teacher's.
    let teacher_unet = read_unet_weights(&fixtures().join("sdxl-tiny/unet"), &Device::Cpu)?;
    let exported = read_unet_weights(&out.manifest.weights_path(), &Device::Cpu)?;
    assert_eq!(exported.len(), teacher_unet.len());
    let same = |n: &str| -> anyhow::Result<bool> {
        let a = exported[n].flatten_all()?.to_vec1::<f32>()?;
        let b = teacher_unet[n].flatten_all()?.to_vec1::<f32>()?;
        Ok(a == b)
    };
    assert!(same("conv_in.weight")?);
    let q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight";
    assert!(!same(q)?, "{q} carries the merged adapter");
    generate_image(&LoadedModel::load(&out.manifest, &Device::Cpu)?)?;

    // LoRA is refused for the tiny family, with a clear error, before anything is written.
    let tiny = RunOptions {
        models_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"),
        model: "tiny-shapes-teacher".into(),
        out: temp_dir("tiny-lora"),
        ..options("unused", &dir, Some(lora))
    };
    let mut tiny = tiny;
    tiny.config.reward = "verifier".into();
    tiny.config.reward_path = None;
    let err = run(&tiny, &Device::Cpu, |_, _| {}).err().expect("refused");
    assert!(
        err.to_string()
            .contains("LoRA is for the sd and wan families"),
        "{err}"
    );
    assert!(!tiny.out.exists(), "a refused run leaves nothing behind");
    std::fs::remove_dir_all(dir).ok();
    std::fs::remove_dir_all(&tiny.out).ok();
    Ok(())
}

/// Continued distillation trains the student as a copy of its teacher's network: a student
/// whose architecture differs (e.g. a DiT student of a UNet teacher) is refused by name,
/// before anything is written.
#[test]
fn a_continued_student_keeps_its_own_schedule() -> anyhow::Result<()> {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    let student = Manifest::find(&models, "tiny-shapes")?;
    let mut teacher = Manifest::find(&models, "tiny-shapes-teacher")?;
    // The teacher's images move to another schedule after the student was distilled.
    teacher.sampling.shift = student.sampling.shift + 2.0;
    teacher.sampling.video_shift = Some(7.0);
    teacher.sampling.guidance_interval = Some([0.2, 1.0]);
    let kept = with_student_schedule(teacher.clone(), &student, None)?;
    assert_eq!(kept.sampling.shift, student.sampling.shift);
    assert_eq!(kept.sampling.video_shift, student.sampling.video_shift);
    assert_eq!(
        kept.name, teacher.name,
        "only the schedule is the student's"
    );
    assert_eq!(
        kept.sampling.default_guidance,
        teacher.sampling.default_guidance
    );
    // So the refined student's manifest keeps it too.
    let cfg = DistillConfig::default();
    let refined = student_manifest(&kept, student.name.clone(), &cfg);
    assert_eq!(refined.sampling.shift, student.sampling.shift);
    assert_eq!(
        refined.sampling.guidance_interval, None,
        "a student has no CFG"
    );
    // Naming its own shift is fine; another one is refused, with both in the message.
    let same = Some(student.sampling.shift);
    assert!(with_student_schedule(teacher.clone(), &student, same).is_ok());
    let err = with_student_schedule(teacher.clone(), &student, Some(5.0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("student_shift 5") && err.contains("new student"),
        "{err}"
    );

    // A first distillation takes the teacher's schedule, or `student_shift` for its images.
    let fresh = with_student_schedule(teacher.clone(), &teacher, None)?;
    assert_eq!(fresh.sampling.shift, teacher.sampling.shift);
    assert_eq!(fresh.sampling.video_shift, Some(7.0));
    let set = with_student_schedule(teacher.clone(), &teacher, Some(1.0))?;
    assert_eq!(set.sampling.shift, 1.0);
    assert_eq!(
        set.sampling.video_shift,
        Some(7.0),
        "videos keep the teacher's"
    );
    assert_eq!(student_manifest(&set, "s".into(), &cfg).sampling.shift, 1.0);
    Ok(())
}

#[test]
fn a_tiny_student_of_another_architecture_than_its_teacher_is_refused() -> anyhow::Result<()> {
    let models = temp_dir("arch-models");
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-shapes-teacher");
    let teacher = models.join("tiny-shapes-teacher");
    std::fs::create_dir_all(&teacher)?;
    for f in ["manifest.toml", "teacher.safetensors", "tokenizer.json"] {
        std::fs::copy(shipped.join(f), teacher.join(f))?;
    }
    let mut m: toml::Table =
        toml::from_str(&std::fs::read_to_string(teacher.join("manifest.toml"))?)?;
    m.insert("name".into(), "tiny-shapes".into());
    m.insert("teacher".into(), "tiny-shapes-teacher".into());
    let arch = m["architecture"].as_table().cloned().unwrap_or_default();
    let depth = arch["depth"].as_integer().unwrap_or(1);
    let mut arch = arch;
    arch.insert("depth".into(), (depth + 1).into());
    m.insert("architecture".into(), arch.into());
    let student = models.join("tiny-shapes");
    std::fs::create_dir_all(&student)?;
    std::fs::write(student.join("manifest.toml"), toml::to_string(&m)?)?;
    std::fs::copy(
        shipped.join("tokenizer.json"),
        student.join("tokenizer.json"),
    )?;

    let mut opts = RunOptions {
        models_dir: models.clone(),
        model: "tiny-shapes".into(),
        out: temp_dir("arch-run"),
        ..options("unused", &models, None)
    };
    opts.config.reward = "verifier".into();
    opts.config.reward_path = None;
    let err = run(&opts, &Device::Cpu, |_, _| {}).err().expect("refused");
    assert!(
        err.to_string()
            .contains("tiny-shapes has another architecture than its teacher tiny-shapes-teacher"),
        "{err}"
    );
    assert!(!opts.out.exists(), "a refused run leaves nothing behind");
    std::fs::remove_dir_all(models).ok();
    Ok(())
}

/// A continued tiny student keeps the text encoder it was distilled on, so that its teacher
/// can train on (and its encoder move) without moving what the served student reads: the run
/// conditions the student on its own encoder, and exports that encoder. A student that reads
/// its teacher's encoder needs no second one; one of another vocabulary is refused.
#[test]
fn a_continued_tiny_student_keeps_its_own_text_encoder() -> anyhow::Result<()> {
    use crate::distill::family::DistillFamily;
    use crate::families::tiny::TinyFamily;
    let dev = Device::Cpu;
    let models = temp_dir("own-text-models");
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
    for (name, files) in [
        (
            "tiny-shapes-teacher",
            ["manifest.toml", "teacher.safetensors", "tokenizer.json"],
        ),
        (
            "tiny-shapes",
            ["manifest.toml", "student.safetensors", "tokenizer.json"],
        ),
    ] {
        std::fs::create_dir_all(models.join(name))?;
        for f in files {
            std::fs::copy(shipped.join(name).join(f), models.join(name).join(f))?;
        }
    }
    let teacher = Manifest::find(&models, "tiny-shapes-teacher")?;
    let student = Manifest::find(&models, "tiny-shapes")?;
    let prompts = ["a red circle and a blue cross"];

    // A student distilled from this teacher reads the teacher's encoder: no second one.
    let teacher_weights = candle_core::safetensors::load(teacher.weights_path(), &dev)?;
    let names: Vec<String> = teacher_weights
        .keys()
        .filter(|n| n.starts_with("text."))
        .cloned()
        .collect();
    let shipped_student = candle_core::safetensors::load(student.weights_path(), &dev)?;
    let mut same = shipped_student.clone();
    same.extend(
        names
            .iter()
            .map(|n| (n.clone(), teacher_weights[n].clone())),
    );
    candle_core::safetensors::save(&same, student.weights_path())?;
    let mut family = TinyFamily::from_manifest(&teacher, &dev)?;
    family.student_weights(&student, &teacher)?;
    assert!(family.condition(&prompts)?.student.is_none());

    // The teacher trains on: its text encoder moves away from the student's.
    let mut moved = teacher_weights.clone();
    for n in &names {
        moved.insert(n.clone(), (&teacher_weights[n] * 1.5)?);
    }
    candle_core::safetensors::save(&moved, teacher.weights_path())?;
    candle_core::safetensors::save(&shipped_student, student.weights_path())?;
    let mut family = TinyFamily::from_manifest(&teacher, &dev)?;
    let init = family.student_weights(&student, &teacher)?;
    let texts = family.condition(&prompts)?;
    let own = texts.student.as_ref().expect("the student's own encoding");
    let tokens = family
        .model
        .tokenizer
        .encode_batch(&prompts, family.model.cfg.text_max_len)?;
    let vb = candle_nn::VarBuilder::from_tensors(init.clone(), candle_core::DType::F32, &dev);
    let served = crate::families::tiny::TextEncoder::new(vb.pp("text"), &family.model.cfg)?;
    let max_diff = |a: &Tensor, b: &Tensor| -> anyhow::Result<f32> {
        Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
    };
    assert_eq!(
        max_diff(&own.pooled, &served.forward(&tokens)?.pooled)?,
        0.0
    );
    assert!(max_diff(&own.pooled, &texts.cond.pooled)? > 1e-3);
    // The student's x0 reads its own encoding, the critic's the teacher's.
    let net = family.trainable(&init, 0, None)?.net;
    let x = Tensor::randn(0f32, 1.0, family.sample_shape(1, false), &dev)?;
    let (xs, xc) = (
        family.student_x0(&net, &x, &[0.9], &texts)?,
        family.x0(&net, &x, &[0.9], &texts)?,
    );
    assert!(max_diff(&xs, &xc)? > 1e-4);

    // A run continues the student and exports its own encoder, not the teacher's.
    let mut opts = RunOptions {
        models_dir: models.clone(),
        model: "tiny-shapes".into(),
        out: temp_dir("own-text-run"),
        eval: None,
        ..options("unused", &models, None)
    };
    opts.config.reward = "verifier".into();
    opts.config.reward_path = None;
    opts.config.iterations = 1;
    let out = run(&opts, &dev, |_, _| {})?;
    let exported = candle_core::safetensors::load(out.manifest.weights_path(), &dev)?;
    for n in &names {
        assert_eq!(
            max_diff(&exported[n], &init[n])?,
            0.0,
            "{n} is the student's own"
        );
    }

    // A student of another vocabulary is refused by name.
    let path = models.join("tiny-shapes/tokenizer.json");
    let json = std::fs::read_to_string(&path)?.replace("\"circle\"", "\"disc\"");
    std::fs::write(&path, json)?;
    let err = family.student_weights(&student, &teacher).unwrap_err();
    assert!(
        err.to_string()
            .contains("tiny-shapes has another vocabulary than its teacher"),
        "{err}"
    );
    std::fs::remove_dir_all(models).ok();
    std::fs::remove_dir_all(&opts.out).ok();
    Ok(())
}

const WAN_PROMPT: &str = "a red cat walks on the beach";

#[test]
fn a_wan_lora_student_distills_exports_serves_reloads_and_continues() -> anyhow::Result<()> {
    use crate::families::wan::manifest::WanSource;
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wan");
    // A models directory: the teacher (pointing at the fixture) and, once trained, its student.
    let models = temp_dir("wan-models");
    std::fs::create_dir_all(&models)?;
    let mut m: toml::Table = toml::from_str(&std::fs::read_to_string(
        fixtures.join("wan-tiny-teacher.toml"),
    )?)?;
    let wan = m.get_mut("wan").and_then(|w| w.as_table_mut()).unwrap();
    let dir = fixtures.join("wan-tiny-t2v").display().to_string();
    wan.insert("dir".into(), dir.into());
    std::fs::write(models.join("wan-tiny-teacher.toml"), toml::to_string(&m)?)?;

    let mut opts = RunOptions {
        models_dir: models.clone(),
        model: "wan-tiny-teacher".into(),
        out: models.clone(),
        ..options("unused", &models, Some(crate::nn::LoraConfig::new(4)))
    };
    opts.config.video_every = 2;
    opts.config.video_prompts = 1;
    let mut seen = Vec::new();
    let out = run(&opts, &Device::Cpu, |s, _| {
        seen.push((s.iteration, s.video))
    })?;
    assert_eq!(seen, vec![(1, false), (2, true)], "a clip, then a video");
    assert!(out.report.is_none(), "the ShapesWorld eval is not for Wan");

    // The student: one transformer file beside a manifest that names the teacher's directory.
    let m = &out.manifest;
    assert_eq!(m.name, "wan-tiny");
    assert_eq!(m.teacher.as_deref(), Some("wan-tiny-teacher"));
    assert_eq!(m.sampling.sampler, SamplerKind::Student);
    assert_eq!(m.sampling.default_steps, 2);
    assert_eq!(m.sampling.default_guidance, 1.0);
    let wan = WanSource::of(m).unwrap();
    assert_eq!(
        wan.transformer_file.as_deref(),
        Some(Path::new("transformer.safetensors"))
    );
    // LoRA merged into the exported weights: adapted layers moved, the rest is the teacher's.
    let teacher_tf = read_unet_weights(&fixtures.join("wan-tiny-t2v/transformer"), &Device::Cpu)?;
    let student_tf = read_unet_weights(&m.weights_path(), &Device::Cpu)?;
    assert_eq!(student_tf.len(), teacher_tf.len());
    let same = |n: &str| -> anyhow::Result<bool> {
        let a = student_tf[n].flatten_all()?.to_vec1::<f32>()?;
        let b = teacher_tf[n].flatten_all()?.to_vec1::<f32>()?;
        Ok(a == b)
    };
    assert!(same("patch_embedding.weight")?);
    for adapted in ["blocks.0.attn1.to_q.weight", "blocks.1.ffn.net.2.weight"] {
        assert!(!same(adapted)?, "{adapted} carries the merged adapter");
    }

    // It serves a 5-frame clip, unlike the teacher run as a 2-step student, and a reload of
    // its file (what the server's hot swap loads) is the same model.
    let student = LoadedModel::load(m, &Device::Cpu)?;
    let clip = generate(&student, WAN_PROMPT, 5, 5)?;
    assert_eq!(clip.len(), 5);
    assert_eq!(clip[0].dimensions(), (32, 32));
    let teacher = Manifest::find(&models, "wan-tiny-teacher")?;
    let mut as_student = teacher.clone();
    as_student.sampling = m.sampling.clone();
    let plain = generate(
        &LoadedModel::load(&as_student, &Device::Cpu)?,
        WAN_PROMPT,
        5,
        5,
    )?;
    assert_ne!(clip[0].as_raw(), plain[0].as_raw());
    let reloaded = LoadedModel::load_weights(&teacher, &m.weights_path(), &Device::Cpu)?;
    assert_eq!(reloaded.version, student.version);

    // The served student continues from its own weights against its teacher.
    let more = RunOptions {
        model: "wan-tiny".into(),
        out: temp_dir("wan-continue"),
        ..opts.clone()
    };
    let next = run(&more, &Device::Cpu, |_, _| {})?;
    assert_eq!(next.manifest.name, "wan-tiny");
    assert_eq!(next.manifest.teacher.as_deref(), Some("wan-tiny-teacher"));
    let next_tf = read_unet_weights(&next.manifest.weights_path(), &Device::Cpu)?;
    assert_ne!(
        next_tf["blocks.0.attn1.to_q.weight"]
            .flatten_all()?
            .to_vec1::<f32>()?,
        student_tf["blocks.0.attn1.to_q.weight"]
            .flatten_all()?
            .to_vec1::<f32>()?
    );
    std::fs::remove_dir_all(models).ok();
    std::fs::remove_dir_all(&more.out).ok();
    Ok(())
}
