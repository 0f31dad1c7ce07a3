use std::path::{Path, PathBuf};

use candle_core::Device;

use super::*;
use crate::families::sd::{SdModel, SdSource, WeightDtype};
use crate::families::tiny::{TinyModel, TinySource};
use crate::pipeline::BatchSpec;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/sd")
}

/// Writes `text` as `<tag>.toml` in a fresh scratch directory and reads it.
fn parse(tag: &str, text: &str) -> Result<Manifest, ManifestError> {
    let dir = std::env::temp_dir().join(format!("fewstep-manifest-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{tag}.toml"));
    std::fs::write(&path, text).unwrap();
    let m = Manifest::from_file(&path);
    std::fs::remove_dir_all(&dir).unwrap();
    m
}

/// An sd manifest for the sdxl fixture, with `extra` lines appended to its `[sd]` table.
fn sd_text(sd_extra: &str, sampling_extra: &str) -> String {
    format!(
        r#"name = "m"
family = "sd"

[sd]
dir = "{}"
{sd_extra}

[sampling]
sampler = "student"
default_steps = 4
allowed_steps = [1, 4]
default_guidance = 1.0
max_guidance = 1.0
{sampling_extra}

[serving]
max_batch = 2
max_wait_ms = 0
sizes = [[32, 32]]
frames = [1]
"#,
        fixtures().join("sdxl-tiny").display()
    )
}

#[test]
fn shipped_tiny_manifests_load_and_write_back_unchanged() {
    for name in ["tiny-shapes", "tiny-shapes-teacher"] {
        let path = repo().join("models").join(name).join("manifest.toml");
        let m = Manifest::from_file(&path).unwrap();
        assert_eq!(m.family().name(), "tiny");
        let tiny = m.section::<TinySource>().unwrap();
        assert_eq!(m.weights_path(), path.parent().unwrap().join(&tiny.weights));
        assert!(tiny.tokenizer_path(&m.dir).ends_with("tokenizer.json"));
        let original: toml::Table =
            toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut written: toml::Table = toml::from_str(&toml::to_string(&m).unwrap()).unwrap();
        // Serialization spells out the architecture's defaulted `refiner`.
        let arch = written["architecture"].as_table_mut().unwrap();
        if !original["architecture"]
            .as_table()
            .unwrap()
            .contains_key("refiner")
        {
            assert_eq!(arch.remove("refiner"), Some(toml::Value::Integer(0)));
        }
        assert_eq!(written, original, "{name}");
    }
}

#[test]
fn sd_fixture_manifests_parse_and_round_trip() {
    use crate::pipeline::SamplerKind::*;
    for (name, sampler) in [
        ("sdxl-tiny", Student),
        ("sd15-tiny", Euler),
        ("sd2-tiny", Ancestral),
    ] {
        let m = Manifest::find(&fixtures(), name).unwrap();
        assert_eq!(m.name, name);
        assert_eq!(m.family().name(), "sd");
        assert_eq!(m.sampling.sampler, sampler);
        assert_eq!(m.weights_path(), fixtures().join(name));
        let err = TinySource::of(&m, "fewstep distill")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(name) && err.contains("sd family") && err.contains("fewstep distill"),
            "{err}"
        );
        let mut back = Manifest::from_toml(&toml::to_string(&m).unwrap()).unwrap();
        back.dir = m.dir.clone();
        assert_eq!(back, m);
    }
}

#[test]
fn shipped_sd_manifests_parse_and_are_not_served_by_default() {
    let list = Manifest::list(&repo().join("models")).unwrap();
    let sd: Vec<&Manifest> = list.iter().filter(|m| m.family().name() == "sd").collect();
    let names: Vec<&str> = sd.iter().map(|m| m.name.as_str()).collect();
    for want in ["sd-turbo", "sdxl-turbo", "sdxl-dmd2-4step", "sd15-dmd2"] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    for default in crate::config::ServerConfig::default().models {
        assert!(!names.contains(&default.as_str()), "{default}");
    }
    let dmd2 = sd.iter().find(|m| m.name == "sdxl-dmd2-4step").unwrap();
    assert_eq!(dmd2.sampling.timesteps, Some(vec![999, 749, 499, 249]));
    let src = dmd2.section::<SdSource>().unwrap();
    assert!(src.unet_file.is_some() && src.dir_env.is_some());
    // Every tiny manifest is still listed, and the Wan teacher samples with UniPC.
    assert!(list.iter().any(|m| m.name == "tiny-shapes-teacher"));
    let wan = list.iter().find(|m| m.name == "wan2.1-t2v-1.3b").unwrap();
    assert_eq!(wan.sampling.sampler, crate::pipeline::SamplerKind::UniPc);
}

#[test]
fn find_takes_a_directory_name_a_toml_name_or_a_path() {
    let by_dir = Manifest::find(&repo().join("models"), "tiny-shapes").unwrap();
    assert_eq!(by_dir.name, "tiny-shapes");
    let path = fixtures().join("sd2-tiny.toml");
    let by_path = Manifest::find(Path::new("/nonexistent"), path.to_str().unwrap()).unwrap();
    assert_eq!(by_path.name, "sd2-tiny");
    assert_eq!(by_path.dir, fixtures());
    let err = Manifest::find(&fixtures(), "nope").unwrap_err().to_string();
    assert!(
        err.contains("nope/manifest.toml") && err.contains("nope.toml"),
        "{err}"
    );
}

#[test]
fn family_keys_do_not_mix_and_sd_limits_are_checked() {
    parse("ok", &sd_text("", "timesteps = [999, 749, 499, 249]")).unwrap();
    let cases = [
        (
            sd_text("", "").replace("family = \"sd\"", "family = \"sd\"\nweights = \"w\""),
            "`weights` belongs to family \"tiny\"",
        ),
        (
            sd_text("", "").replace("family = \"sd\"", "family = \"tiny\""),
            "[sd] belongs to family \"sd\"",
        ),
        (
            sd_text("", "").replace("[sd]", "[other]"),
            "unknown field `other`",
        ),
        (sd_text("colour = 1", ""), "unknown field `colour`"),
        (sd_text("dtype = \"f64\"", ""), "f64"),
        (
            sd_text("", "").replace("frames = [1]", "frames = [1, 8]"),
            "sd models make images",
        ),
        (sd_text("", "shift = 3.0"), "sampling.shift"),
        (sd_text("", "video_shift = 3.0"), "sampling.video_shift"),
        (
            sd_text("", "guidance_interval = [0.2, 1.0]"),
            "sampling.guidance_interval",
        ),
        (
            sd_text("", "timesteps = [249, 999]"),
            "must be strictly descending",
        ),
        (
            sd_text("", "timesteps = [999, 499]"),
            "which allowed_steps [1, 4] does not allow",
        ),
        (
            sd_text("", "timesteps = [999, 749, 499, 249]").replace("\"student\"", "\"euler\""),
            "student and ancestral samplers",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let err = parse(&format!("bad{i}"), text).unwrap_err().to_string();
        assert!(err.contains(want), "case {i}: want {want:?} in {err}");
        assert!(err.contains(&format!("bad{i}.toml")), "case {i}: {err}");
    }
    // The tiny family has no timestep list. (The shipped teacher's own `video_shift` line is
    // left out, so that the cases below can set theirs.)
    let teacher = std::fs::read_to_string(repo().join("models/tiny-shapes-teacher/manifest.toml"))
        .unwrap()
        .lines()
        .filter(|line| !line.starts_with("video_shift") && !line.starts_with("guidance_interval"))
        .collect::<Vec<_>>()
        .join("\n")
        .replacen("\nshift =", "\ntimesteps = [999]\nshift =", 1);
    let err = parse("tiny-ts", &teacher).unwrap_err().to_string();
    assert!(err.contains("sd family only"), "{err}");
    // Its shifts are positive numbers.
    for bad in [
        "video_shift = 0.0",
        "video_shift = -2.0",
        "video_shift = nan",
    ] {
        let text = teacher.replace("\ntimesteps = [999]", &format!("\n{bad}"));
        let err = parse("tiny-shift", &text).unwrap_err().to_string();
        assert!(err.contains("must be a positive number"), "{bad}: {err}");
    }
    // Its guidance interval is of flow times, low before high.
    let interval =
        |v: &str| teacher.replace("\ntimesteps = [999]", &format!("\nguidance_interval = {v}"));
    for bad in ["[0.5, 0.2]", "[-0.1, 1.0]", "[0.2, 1.5]", "[nan, 1.0]"] {
        let err = parse("tiny-interval", &interval(bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("0 <= lo < hi <= 1"), "{bad}: {err}");
    }
    let ok = parse("tiny-interval", &interval("[0.2, 1.0]")).unwrap();
    assert_eq!(ok.sampling.guidance_interval, Some([0.2, 1.0]));
    // Its `eta` belongs to the ancestral sampler and is a number from 0 up (1 when absent).
    assert_eq!(ok.sampling.eta(), 1.0);
    let eta = |sampler: &str, v: &str| {
        teacher
            .replace("\ntimesteps = [999]", &format!("\neta = {v}"))
            .replace(
                "\nsampler = \"ancestral\"",
                &format!("\nsampler = \"{sampler}\""),
            )
    };
    for (sampler, bad, want) in [
        ("euler", "0.5", "sampling.eta is for the ancestral sampler"),
        ("ancestral", "-0.5", "must be a number from 0 up"),
        ("ancestral", "nan", "must be a number from 0 up"),
    ] {
        let err = parse("tiny-eta", &eta(sampler, bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{sampler} {bad}: {err}");
    }
    let ok = parse("tiny-eta", &eta("ancestral", "0.5")).unwrap();
    assert_eq!(
        (ok.sampling.sampler, ok.sampling.eta()),
        (crate::pipeline::SamplerKind::Ancestral, 0.5)
    );
}

#[test]
fn environment_variables_override_the_directory_and_the_unet_file() {
    let src: SdSource = toml::from_str(
        r#"dir = "weights/sd"
dir_env = "CARGO_MANIFEST_DIR"
unet_file = "unet.safetensors"
unet_file_env = "FEWSTEP_TEST_SURELY_UNSET_VARIABLE""#,
    )
    .unwrap();
    let base = Path::new("/models");
    // cargo sets CARGO_MANIFEST_DIR for test runs.
    assert_eq!(src.model_dir(base), repo());
    assert_eq!(
        src.unet_file(base),
        Some(PathBuf::from("/models/unet.safetensors"))
    );
    assert_eq!(src.dtype, WeightDtype::F32);
    assert_eq!(src.vae_dtype(), WeightDtype::F32);
}

fn image_spec(width: usize, height: usize) -> BatchSpec {
    BatchSpec {
        prompts: vec!["a cat".into()],
        negative_prompts: vec![String::new()],
        seeds: vec![1],
        frames: 1,
        width,
        height,
    }
}

#[test]
fn an_sd_manifest_loads_and_generates() {
    let m = Manifest::find(&fixtures(), "sdxl-tiny").unwrap();
    let loaded = LoadedModel::load(&m, &Device::Cpu).unwrap();
    assert!(loaded.trained && loaded.family_model::<TinyModel>().is_none());
    assert!(loaded.family_model::<SdModel>().is_some());
    assert_eq!(loaded.version.len(), 16);
    let out = loaded.generate(&image_spec(64, 32), 4, 1.0).unwrap();
    assert_eq!(out.outputs[0][0].dimensions(), (64, 32));
    // A reload with a single UNet file (here the model's own weights) keeps the version.
    let unet = fixtures().join("sdxl-tiny/unet/diffusion_pytorch_model.safetensors");
    let again = LoadedModel::load_weights(&m, &unet, &Device::Cpu).unwrap();
    assert_eq!(again.version, loaded.version);
    let err = LoadedModel::random(&m, 0, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("random weights"), "{err}");
}

#[test]
fn sd_load_errors_name_what_is_wrong() {
    let load = |tag: &str, text: String| {
        let m = parse(tag, &text).unwrap();
        LoadedModel::load(&m, &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
    };
    let missing = fixtures().join("no-such-model");
    let err = load(
        "missing-dir",
        sd_text("", "").replace(
            &fixtures().join("sdxl-tiny").display().to_string(),
            &missing.display().to_string(),
        ),
    );
    assert!(
        err.contains("no-such-model") && err.contains("not found"),
        "{err}"
    );
    let err = load(
        "missing-unet",
        sd_text("unet_file = \"/nonexistent/dmd2.safetensors\"", ""),
    );
    assert!(err.contains("/nonexistent/dmd2.safetensors"), "{err}");
    let err = load("f16", sd_text("dtype = \"f16\"", ""));
    assert!(err.contains("f16") && err.contains("CUDA"), "{err}");
    let err = load(
        "size",
        sd_text("", "").replace("[[32, 32]]", "[[32, 32], [30, 32]]"),
    );
    assert!(
        err.contains("30x32") && err.contains("multiple of 4"),
        "{err}"
    );
}

#[test]
fn tiny_only_commands_refuse_sd_models_by_name() {
    let cpu = Device::Cpu;
    let err = crate::eval::load_model(&fixtures(), "sdxl-tiny", None, true, &cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("sdxl-tiny") && err.contains("fewstep eval") && err.contains("tiny family"),
        "{err}"
    );
    let loaded =
        LoadedModel::load(&Manifest::find(&fixtures(), "sd2-tiny").unwrap(), &cpu).unwrap();
    let err = crate::eval::evaluate(&loaded, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("fewstep eval"), "{err}");
}
