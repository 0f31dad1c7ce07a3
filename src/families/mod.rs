//! Model families, one folder each behind the [`Family`] contract: architecture, weight
//! loading and checks, native output -> x0, distillation. Adding a family is adding its
//! folder and one line to [`FAMILIES`].

pub mod contract;
pub mod sd;
pub mod tiny;
pub mod wan;

pub use contract::{Capabilities, Family, Section};

/// Every family a manifest may name.
pub static FAMILIES: &[&dyn Family] = &[&tiny::Tiny, &sd::Sd, &wan::Wan];

/// The family a manifest's `family` value names.
pub fn find(name: &str) -> Option<&'static dyn Family> {
    FAMILIES.iter().copied().find(|f| f.name() == name)
}

/// The names of the families with a capability, for an error that says which would do.
pub fn names_with(has: impl Fn(Capabilities) -> bool) -> Vec<&'static str> {
    FAMILIES
        .iter()
        .filter(|f| has(f.capabilities()))
        .map(|f| f.name())
        .collect()
}
