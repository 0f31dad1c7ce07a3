//! Which model a weights file belongs to, kept in its safetensors `__metadata__`, and the
//! checks an admin reload makes before a file is read: the path is confined to configured
//! directories and the size is bounded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::Manifest;

const FAMILY: &str = "fewstep.family";
const ARCHITECTURE: &str = "fewstep.architecture";
const ROLE: &str = "fewstep.role";
const PARENT: &str = "fewstep.parent";

/// A file larger than this many times the serving weights is refused before it is read.
pub const MAX_GROWTH: u64 = 4;
/// Room for a larger safetensors header than the serving file's.
const HEADER_SLACK: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A model trained directly (or any model that names no teacher).
    Teacher,
    /// A model distilled from its `parent`.
    Student,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Teacher => "teacher",
            Role::Student => "student",
        }
    }
}

/// The identity written into every weights file the project writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIdentity {
    pub family: String,
    /// A hash of the architecture (the tiny family's `[architecture]`; for the sd family,
    /// of the UNet's tensor names and shapes, since its config lives outside the file).
    pub architecture: String,
    pub role: String,
    /// The teacher a student was distilled from; empty for a teacher.
    pub parent: String,
}

impl ModelIdentity {
    /// The weights of a teacher of `family` trained with the architecture hashed as
    /// `architecture`.
    pub fn teacher(family: &str, architecture: String) -> Self {
        Self {
            family: family.into(),
            architecture,
            role: Role::Teacher.as_str().into(),
            parent: String::new(),
        }
    }

    /// The identity of `manifest`'s weights; `tensors` stand for the architecture of
    /// families whose config is not in the manifest.
    pub fn of_manifest<'a>(
        manifest: &Manifest,
        tensors: impl IntoIterator<Item = (&'a String, &'a [usize])>,
    ) -> Self {
        let tensors: Vec<(&String, &[usize])> = tensors.into_iter().collect();
        let architecture = manifest.architecture(&tensors);
        let role = if manifest.teacher.is_some() {
            Role::Student
        } else {
            Role::Teacher
        };
        Self {
            family: manifest.family().to_string(),
            architecture,
            role: role.as_str().into(),
            parent: manifest.teacher.clone().unwrap_or_default(),
        }
    }

    pub fn to_metadata(&self) -> HashMap<String, String> {
        [
            (FAMILY, &self.family),
            (ARCHITECTURE, &self.architecture),
            (ROLE, &self.role),
            (PARENT, &self.parent),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
    }

    /// The identity in a file's metadata; `None` for files written without one (such as the
    /// committed weights), which are judged by their tensor names and shapes alone.
    pub fn from_metadata(meta: &HashMap<String, String>) -> Option<Self> {
        let get = |k: &str| meta.get(k).cloned();
        Some(Self {
            family: get(FAMILY)?,
            architecture: get(ARCHITECTURE)?,
            role: get(ROLE)?,
            parent: get(PARENT).unwrap_or_default(),
        })
    }

    /// Why a file with identity `self` cannot serve as `model` (which expects `expected`).
    pub fn mismatch(
        &self,
        expected: &Self,
        model: &str,
        check_architecture: bool,
    ) -> Option<String> {
        if self.family != expected.family {
            return Some(format!(
                "the file holds a {} model's weights; {model} is of the {} family",
                self.family, expected.family
            ));
        }
        if check_architecture && self.architecture != expected.architecture {
            return Some(format!(
                "the file's architecture ({}) is not {model}'s ({})",
                self.architecture, expected.architecture
            ));
        }
        if self.role != expected.role || self.parent != expected.parent {
            return Some(format!(
                "the file holds the weights of a {}{}; {model} is a {}{}",
                self.role,
                of_parent(&self.parent),
                expected.role,
                of_parent(&expected.parent),
            ));
        }
        None
    }
}

fn of_parent(parent: &str) -> String {
    if parent.is_empty() {
        String::new()
    } else {
        format!(" of {parent}")
    }
}

/// The architecture hash of families whose config lives outside the weights file: the
/// file's tensor names and shapes.
pub fn shapes_hash<'a>(tensors: impl IntoIterator<Item = (&'a String, &'a [usize])>) -> String {
    let mut lines: Vec<String> = tensors
        .into_iter()
        .map(|(name, shape)| format!("{name}:{shape:?}"))
        .collect();
    lines.sort();
    crate::util::sha256_hex(lines.join("\n").as_bytes())[..16].to_string()
}

/// Why a requested checkpoint was refused before anything was read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckpointError {
    /// One answer for missing, unreadable and outside the allowed directories, so that the
    /// route tells nothing about files it may not read.
    #[error("checkpoint {0:?} is not found or not allowed")]
    Unavailable(String),
    #[error(
        "checkpoint {path:?} has {size} bytes; the serving weights have {current}, and files \
         over {MAX_GROWTH}x that are refused"
    )]
    TooLarge {
        path: String,
        size: u64,
        current: u64,
    },
}

/// Resolves `requested` (symlinks included) and accepts it only inside one of `allowed`
/// and, for a file, at most [`MAX_GROWTH`] times `current_bytes`.
pub fn resolve_checkpoint(
    requested: &Path,
    allowed: &[PathBuf],
    current_bytes: u64,
) -> Result<PathBuf, CheckpointError> {
    let unavailable = || CheckpointError::Unavailable(requested.display().to_string());
    let real = std::fs::canonicalize(requested).map_err(|_| unavailable())?;
    let inside = allowed
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .any(|d| real.starts_with(d));
    if !inside {
        return Err(unavailable());
    }
    let meta = std::fs::metadata(&real).map_err(|_| unavailable())?;
    if meta.is_file() {
        // Readable at all? An unreadable file gets the same answer as a missing one.
        std::fs::File::open(&real).map_err(|_| unavailable())?;
        let limit = current_bytes.saturating_mul(MAX_GROWTH) + HEADER_SLACK;
        if meta.len() > limit {
            return Err(CheckpointError::TooLarge {
                path: requested.display().to_string(),
                size: meta.len(),
                current: current_bytes,
            });
        }
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fewstep-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("allowed")).unwrap();
        d
    }

    #[test]
    fn checkpoints_outside_the_allowed_dirs_and_missing_ones_get_one_answer() {
        let d = scratch("confine");
        let allowed = vec![d.join("allowed")];
        std::fs::write(d.join("allowed/ok.safetensors"), b"12345678").unwrap();
        std::fs::write(d.join("outside.safetensors"), b"12345678").unwrap();
        assert!(resolve_checkpoint(&d.join("allowed/ok.safetensors"), &allowed, 8).is_ok());
        // Through `..` and through a symlink: both resolve outside.
        let dotdot = d.join("allowed/../outside.safetensors");
        #[cfg(unix)]
        std::os::unix::fs::symlink(d.join("outside.safetensors"), d.join("allowed/link")).unwrap();
        let missing = d.join("allowed/missing.safetensors");
        let mut answers = Vec::new();
        for p in [dotdot, d.join("allowed/link"), missing] {
            let e = resolve_checkpoint(&p, &allowed, 8).unwrap_err();
            assert!(matches!(e, CheckpointError::Unavailable(_)), "{p:?}: {e}");
            answers.push(e.to_string().replace(&p.display().to_string(), "P"));
        }
        answers.dedup();
        assert_eq!(answers.len(), 1, "{answers:?}");
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn a_file_much_larger_than_the_serving_weights_is_refused_unread() {
        let d = scratch("size");
        let big = d.join("allowed/big.safetensors");
        // Sparse: no disk is spent, and nothing is read.
        std::fs::File::create(&big)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let e = resolve_checkpoint(&big, &[d.join("allowed")], 8 << 20).unwrap_err();
        assert!(matches!(e, CheckpointError::TooLarge { .. }), "{e}");
        assert!(resolve_checkpoint(&big, &[d.join("allowed")], 300 << 20).is_ok());
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn identity_round_trips_and_a_teacher_is_not_a_student() {
        let teacher = ModelIdentity::teacher("tiny", "abc".into());
        assert_eq!(
            ModelIdentity::from_metadata(&teacher.to_metadata()),
            Some(teacher.clone())
        );
        assert_eq!(ModelIdentity::from_metadata(&HashMap::new()), None);
        let student = ModelIdentity {
            role: "student".into(),
            parent: "t".into(),
            ..teacher.clone()
        };
        let why = teacher.mismatch(&student, "s", true).unwrap();
        assert!(
            why.contains("teacher") && why.contains("student of t"),
            "{why}"
        );
        assert_eq!(student.mismatch(&student, "s", true), None);
    }
}
