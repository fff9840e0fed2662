//! The intent: the one document an agent writes to ask Airlock for database writes.
//!
//! This crate is the only place that knows the wire format. It holds the published
//! JSON Schema (`intent.schema.json`, draft 2020-12), the Rust types that mirror it,
//! and [`Validator`], which turns hostile bytes into a typed [`Intent`] or into every
//! problem found, each with the JSON pointer of the offending value.
//!
//! It also publishes the other half of the agent's contract, the JSON Schema of the
//! outcome files Airlock writes back ([`OUTCOME_SCHEMA`]). Airlock builds outcomes
//! itself (its `outcome` module); the schema documents every field for agents, and
//! Airlock's tests check every outcome they read against it.
#![forbid(unsafe_code)]

mod types;
mod validate;

pub use types::{
    Column, Intent, IntentId, Op, OpKind, Provenance, Row, RunId, TableName, TargetName,
    reserved_table,
};
pub use validate::{Invalid, Limits, Problem, Validator};

/// The JSON Schema of intents, version 1, exactly as published.
pub const SCHEMA: &str = include_str!("../intent.schema.json");

/// The JSON Schema of outcome files, version 1, exactly as published
/// (`airlock schema --outcome` prints it).
pub const OUTCOME_SCHEMA: &str = include_str!("../outcome.schema.json");
