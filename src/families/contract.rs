//! What the rest of fewstep knows of a model family: reading its part of a manifest,
//! loading the model, what it can do, and distilling it. Everything else (architecture,
//! weights layout, conditioning, decode) stays inside the family's folder.

use std::any::Any;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::distill::run::{Run, RunOutput};
use crate::distill::IterStats;
use crate::manifest::{LoadedModel, Manifest, ManifestError, Sampling, Serving};

/// What a family can do beyond serving its manifest's sizes and frame counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// It draws ShapesWorld scenes, so `fewstep eval`, the probes and the verifier (as the
    /// live reward proxy of a rollout: exact and a few ms per output) apply to it.
    pub shapes_world: bool,
    /// It can serve random weights before it is trained ([`Family::random`]).
    pub random_weights: bool,
}

/// One model family, registered in [`super::FAMILIES`].
pub trait Family: Send + Sync + 'static {
    /// The manifest's `family` value.
    fn name(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// The manifest's top-level keys (and tables) that belong to this family; any other
    /// family's keys in its manifests are refused.
    fn keys(&self) -> &'static [&'static str];

    /// Reads this family's keys of a manifest's TOML `text` (the shared keys are read
    /// elsewhere). Errors read like the TOML parser's.
    fn parse(&self, text: &str) -> Result<Box<dyn Section>, String>;

    /// Loads `manifest`'s model: from its own files, or from `weights` (a reload's
    /// checkpoint) when given.
    fn load(
        &self,
        manifest: &Manifest,
        weights: Option<&Path>,
        device: &Device,
    ) -> Result<LoadedModel, ManifestError>;

    /// Random weights, deterministic from `seed` (tests, serving an untrained model).
    fn random(
        &self,
        manifest: &Manifest,
        _seed: u64,
        _device: &Device,
    ) -> Result<LoadedModel, ManifestError> {
        Err(manifest.unsupported("serving random weights", |c| c.random_weights))
    }

    /// Builds the family's teacher for `run` and distills it (see
    /// `crate::distill::family::DistillFamily`).
    fn distill(
        &self,
        run: Run<'_>,
        progress: &mut dyn FnMut(&IterStats, u64),
    ) -> anyhow::Result<RunOutput>;
}

impl fmt::Debug for dyn Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for dyn Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl PartialEq for dyn Family {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

/// A family's part of a manifest, parsed and checked.
pub trait Section: AnyEq + fmt::Debug + Send + Sync {
    /// The keys as a manifest writes them, in order.
    fn to_toml(&self) -> Result<Vec<(&'static str, toml::Value)>, toml::ser::Error>;

    /// The family's own checks of the shared settings.
    fn validate(&self, sampling: &Sampling, serving: &Serving) -> Result<(), String>;

    /// What a reload without a checkpoint reads again, for a manifest read from `dir`.
    fn weights_path(&self, dir: &Path) -> PathBuf;

    /// A hash of the architecture, recorded in every weights file the project writes;
    /// `tensors` (names and shapes) stand for it where the config is not in the manifest.
    fn architecture(&self, tensors: &[(&String, &[usize])]) -> String;
}

/// Equality and downcasting for sections behind `dyn`, for any comparable type.
pub trait AnyEq: Any {
    fn as_any(&self) -> &dyn Any;
    fn eq_any(&self, other: &dyn Any) -> bool;
}

impl<T: PartialEq + Any> AnyEq for T {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn eq_any(&self, other: &dyn Any) -> bool {
        other.downcast_ref::<T>() == Some(self)
    }
}

impl PartialEq for dyn Section {
    fn eq(&self, other: &Self) -> bool {
        AnyEq::eq_any(self, AnyEq::as_any(other))
    }
}
