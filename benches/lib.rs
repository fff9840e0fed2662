//! Shared fixtures for Airlock's benchmarks (see `benches/README.md`).
#![forbid(unsafe_code)]
