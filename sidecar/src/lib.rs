//! Airlock: a transactional write-queue sidecar between AI agents and databases.
//!
//! An agent writes *intents* (JSON files) into a directory; Airlock validates,
//! seals and queues each one, asks a policy to allow, deny or send it to review, lets
//! humans decide reviews, applies approved writes to the target database exactly
//! once, and writes an outcome file the agent can read. See `ARCHITECTURE.md` for
//! which module may know what.
//!
//! One module per stage of the data flow: [`intake`] → (validation in
//! `airlock-intent`) → [`seal`] → [`queue`] → [`decide`] → [`review`] → [`apply`] →
//! [`outcome`]; [`lifecycle`] is the pure state machine they all follow, and
//! [`pipeline`] and [`daemon`] drive them.
//!
//! # Import order
//!
//! Imports go one way: a module may use (`crate::…`) only the modules listed before
//! it here, so pure vocabulary sits at the bottom, storage above it, the stages above
//! storage and the drivers on top. `tests/imports.rs` checks every `crate::` path
//! (and every `super::` path that leaves its module) against this list and fails on
//! a back edge; a new module must be placed in it. The `airlock` binary (`main.rs`)
//! is above them all.
//!
//! 1. vocabulary, pure: `clock`, `lifecycle` (states, verdicts, decisions), `log`
//!    (run-log records, their encoding and chaining, checkpoints, export lines),
//!    `config`, `metrics` (the Prometheus registry every stage bumps);
//! 2. storage and trust: `state`, `seal`, `verify`, `queue`;
//! 3. the target, which the pipeline asks before the policy (names, preview) and
//!    after it (apply): `apply`;
//! 4. stages: `decide`, `review`, `undo`, `replay`, `outcome`, `intake`, `webhook`;
//! 5. drivers: `pipeline`, `http`, `probes` (the metrics and health listener),
//!    `daemon`, `submit`, `demo`, `telemetry`.
//!
//! # Features
//!
//! Both on by default; `--no-default-features` builds a SQLite-only airlock without
//! the review endpoint.
//!
//! - `postgres`: the PostgreSQL target (`apply::postgres`). Without it a
//!   `postgres://` target URL is refused when the target is opened, saying so.
//! - `review`: the review endpoint (`http`) and `airlock token`. Without it
//!   `[review] listen` defaults to `"off"`, and any other value is a configuration
//!   error; reviews are decided with `airlock approve` / `airlock reject`.
#![forbid(unsafe_code)]

pub mod apply;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod decide;
pub mod demo;
#[cfg(feature = "review")]
pub mod http;
pub mod intake;
pub mod lifecycle;
pub mod log;
pub mod metrics;
pub mod outcome;
pub mod pipeline;
pub mod probes;
pub mod queue;
pub mod replay;
pub mod review;
pub mod seal;
pub mod state;
pub mod submit;
pub mod telemetry;
pub mod undo;
pub mod verify;
pub mod webhook;
