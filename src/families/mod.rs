//! Model families: architecture, weight loading and conversion of native outputs to x0.

pub mod sd;
pub mod tiny;
pub mod wan;
