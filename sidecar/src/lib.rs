//! Airlock sidecar.
#![forbid(unsafe_code)]

pub mod apply;
pub mod decide;
pub mod lifecycle;
pub mod seal;
