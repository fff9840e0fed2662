//! The hostile agent: each attack of the threat model (`docs/threat-model.md`),
//! played against the real `airlock` binary. The agent controls every byte of the
//! intent and results directories and can open connections on loopback; each test
//! checks that nothing outside the results directory, the target's catalog and the
//! policy changed, and that the daemon is still running.
//!
//! One module per class of attack, one test binary for all of them (each binary
//! links the library once).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

#[path = "../support/pg.rs"]
mod pg;
#[path = "../support/mod.rs"]
mod support;

mod approval;
mod files;
mod intake;
mod names;
mod review_port;
