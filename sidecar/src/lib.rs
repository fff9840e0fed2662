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
#![forbid(unsafe_code)]

pub mod apply;
pub mod config;
pub mod daemon;
pub mod decide;
pub mod demo;
pub mod http;
pub mod intake;
pub mod lifecycle;
pub mod outcome;
pub mod pipeline;
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
