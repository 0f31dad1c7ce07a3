//! `fewstep bench`: measurements printed as ratios taken in one run.

pub mod http;
pub mod model;
pub mod ops;
pub mod samplers;
pub mod unet;
pub mod wan;
