//! What distillation needs of a model family, so that one DMD2/AMD loop trains the built-in
//! tiny family and Stable Diffusion alike, through the code each family serves with.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::families::Section;
use crate::manifest::identity::ModelIdentity;
use crate::manifest::Manifest;
use crate::nn::LoraConfig;
use crate::pipeline::NoiseSchedule;
use crate::train::named_vars;

/// A trainable copy of a family's denoiser (the student or the critic) and its variables,
/// sorted by name.
pub struct Trainable<N> {
    pub net: N,
    pub vars: Vec<(String, Var)>,
}

/// The frozen teacher of a family and how to build, run and export trainable denoisers.
///
/// Samples live in the family's own space (the tiny family's pixels, SD's latents) and are
/// shaped `[B, ...]`; times are schedule times in `[0, 1]` (1 = pure noise), one per row.
pub trait DistillFamily {
    /// A trainable denoiser.
    type Net;
    /// Encoded prompts together with their empty negatives (for the teacher's CFG).
    type Cond;

    fn device(&self) -> &Device;

    /// The schedule of samples of `frames` frames (a family may give videos their own).
    fn schedule(&self, frames: usize) -> &dyn NoiseSchedule;

    /// Whether the family makes videos (else video iterations are skipped).
    fn makes_video(&self) -> bool;

    /// The shape of `batch` samples: images, or videos when `video`.
    fn sample_shape(&self, batch: usize, video: bool) -> Vec<usize>;

    /// Encodes `prompts` and as many empty negatives.
    fn condition(&self, prompts: &[&str]) -> Result<Self::Cond>;

    /// The frozen teacher's x0 estimates, conditional and unconditional, in one pass.
    fn teacher_x0(&self, x: &Tensor, t: &[f32], cond: &Self::Cond) -> Result<(Tensor, Tensor)>;

    /// A trainable denoiser's conditional x0 estimate, under the teacher's encoding of the
    /// prompts (what the critic, a copy of the teacher, reads).
    fn x0(&self, net: &Self::Net, x: &Tensor, t: &[f32], cond: &Self::Cond) -> Result<Tensor>;

    /// The student's conditional x0 estimate. A family whose served student keeps prompt
    /// encoders of its own (see [`Self::student_weights`]) conditions it on them here.
    fn student_x0(
        &self,
        net: &Self::Net,
        x: &Tensor,
        t: &[f32],
        cond: &Self::Cond,
    ) -> Result<Tensor> {
        self.x0(net, x, t, cond)
    }

    /// The family's own per-sample denoising loss `[B]` of `net` on `x0` noised with `noise`
    /// to times `t` (what the critic minimises), and the GAN features of that pass when
    /// `features` is set.
    fn denoising_loss(
        &self,
        net: &Self::Net,
        x0: &Tensor,
        noise: &Tensor,
        t: &[f32],
        cond: &Self::Cond,
        features: bool,
    ) -> Result<(Tensor, Option<Tensor>)>;

    /// `[B, F, 3, H, W]` RGB in `[-1, 1]` of samples, for the reward (no gradient).
    fn pixels(&self, x0: &Tensor) -> Result<Tensor>;

    /// A trainable denoiser starting from `init` (the family's weight names; see
    /// [`Self::export`]): every weight a variable, or with `lora` the weights frozen and
    /// LoRA adapters (drawn from `seed`) the variables.
    fn trainable(
        &self,
        init: &HashMap<String, Tensor>,
        seed: u64,
        lora: Option<&LoraConfig>,
    ) -> anyhow::Result<Trainable<Self::Net>>;

    /// The variables a trainable denoiser starts from when it copies the teacher.
    fn teacher_weights(&self) -> &HashMap<String, Tensor>;

    /// The variables a served `student` of `teacher` continues from (its own weights). The
    /// family also adopts whatever else of the student's own it reads and ships, so that a
    /// student outlives a change of its teacher (the tiny family: its text encoder).
    fn student_weights(
        &mut self,
        student: &Manifest,
        teacher: &Manifest,
    ) -> anyhow::Result<HashMap<String, Tensor>>;

    /// Writes a student's servable `weights` (see [`Self::export`]) under `dir` and returns
    /// `manifest` (the teacher's, renamed and resampled for the student) naming them, with
    /// its `dir` set.
    fn write_student(
        &self,
        manifest: Manifest,
        teacher: &Manifest,
        dir: &Path,
        weights: &HashMap<String, Tensor>,
    ) -> anyhow::Result<Manifest>;

    /// The servable weights of a student that started from `init` and whose variables now
    /// hold `tensors` (by variable name): the variables themselves, or with `lora` the
    /// adapters merged into their weights.
    fn export(
        &self,
        init: &HashMap<String, Tensor>,
        tensors: &HashMap<String, Tensor>,
        lora: Option<&LoraConfig>,
    ) -> anyhow::Result<HashMap<String, Tensor>> {
        match lora.filter(|l| l.enabled()) {
            None => Ok(tensors.clone()),
            Some(lora) => Ok(crate::nn::lora::merge(init, tensors, lora)?),
        }
    }

    /// The GAN term's support: the feature width of [`Self::denoising_loss`]'s features and
    /// real samples for prompts (`None` when the family has no real data to compare with).
    fn gan(&self) -> Option<&dyn GanSupport<Self::Net, Self::Cond>> {
        None
    }
}

/// The GAN term of DMD2 needs features of noised samples and real samples to compare with.
pub trait GanSupport<N, C> {
    fn feature_dim(&self) -> usize;

    /// Features of `net` at `x_t` (with the graph, for the generator's adversarial term).
    fn features(&self, net: &N, x_t: &Tensor, t: &[f32], cond: &C) -> Result<Tensor>;

    /// Real samples of `prompts`, shaped like the family's samples with `frames` frames.
    fn real_batch(
        &self,
        prompts: &[String],
        frames: usize,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> anyhow::Result<Tensor>;
}

/// Saves a student's `weights` as `dir/file` with the identity its manifest gives them (which
/// names the teacher), and returns that manifest with `section` (naming the file) and `dir`.
pub fn save_student(
    manifest: Manifest,
    section: impl Section,
    dir: &Path,
    file: &Path,
    weights: &HashMap<String, Tensor>,
) -> anyhow::Result<Manifest> {
    let mut manifest = manifest.with_section(section);
    let identity =
        ModelIdentity::of_manifest(&manifest, weights.iter().map(|(n, t)| (n, t.dims())));
    crate::train::checkpoint::save_weights_atomic(weights, &identity, &dir.join(file))?;
    manifest.dir = dir.to_path_buf();
    Ok(manifest)
}

/// A trainable denoiser that `build` makes from `init` (the family's weight names): every
/// weight a variable, or with `lora` the weights frozen as plain tensors and the adapters
/// that `attach` puts on them (drawn from `seed`; it returns how many layers it adapted) the
/// only variables. What [`DistillFamily::trainable`] does for a family with LoRA targets.
pub fn trainable_from<N>(
    init: &HashMap<String, Tensor>,
    seed: u64,
    lora: Option<&LoraConfig>,
    device: &Device,
    build: impl Fn(VarBuilder) -> Result<N>,
    attach: impl FnOnce(&mut N, VarBuilder, &LoraConfig) -> Result<usize>,
) -> anyhow::Result<Trainable<N>> {
    let Some(lora) = lora.filter(|l| l.enabled()) else {
        let map = var_map_from(init, |_| true, device)?;
        let net = build(crate::nn::seeded_var_builder(
            &map,
            seed,
            DType::F32,
            device,
        ))?;
        let vars = named_vars(&map);
        check_init(init, &vars, |_| true)?;
        return Ok(Trainable { net, vars });
    };
    let mut net = build(VarBuilder::from_tensors(init.clone(), DType::F32, device))?;
    let map = VarMap::new();
    let vb = crate::nn::seeded_var_builder(&map, seed, DType::F32, device);
    let layers = attach(&mut net, vb, lora)?;
    anyhow::ensure!(layers > 0, "this denoiser has no layer that LoRA adapts");
    Ok(Trainable {
        net,
        vars: named_vars(&map),
    })
}

/// A var map whose variables start as `init` (as f32 on `device`), so that building a model
/// over it finds them instead of drawing new ones.
pub fn var_map_from(
    init: &HashMap<String, Tensor>,
    filter: impl Fn(&str) -> bool,
    device: &Device,
) -> Result<VarMap> {
    let map = VarMap::new();
    {
        let mut data = map.data().lock().expect("var map lock poisoned");
        for (name, t) in init.iter().filter(|(n, _)| filter(n)) {
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?;
            data.insert(name.clone(), var);
        }
    }
    Ok(map)
}

/// Checks that a model built over [`var_map_from`] used exactly the tensors of `init` that
/// `filter` selects: a variable it had to draw afresh, or an initial tensor it never asked
/// for, means the weights do not belong to this architecture.
pub fn check_init(
    init: &HashMap<String, Tensor>,
    vars: &[(String, Var)],
    filter: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let lacking: Vec<&str> = vars
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| filter(n) && !init.contains_key(*n))
        .collect();
    anyhow::ensure!(
        lacking.is_empty(),
        "the initial weights lack {}",
        lacking.join(", ")
    );
    let used: std::collections::HashSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
    let mut unused: Vec<&str> = init
        .keys()
        .map(String::as_str)
        .filter(|n| filter(n) && !used.contains(n))
        .collect();
    unused.sort_unstable();
    anyhow::ensure!(
        unused.is_empty(),
        "the initial weights hold tensors the model does not use: {}",
        unused.join(", ")
    );
    Ok(())
}
