//! The targets against real databases: an SQLite file per test and a fresh
//! PostgreSQL database per test on the local server.
//!
//! `contract` holds the rules every target keeps, each written once and run
//! against both (`contract::sqlite::*`, `contract::postgres::*`); `sqlite_only` and
//! `postgres_only` hold what one database alone does (SQLite's locking and untyped
//! columns; PostgreSQL's types, TLS, pool, and connection faults played through a
//! TCP proxy). One test binary for all of them: the library links once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

#[path = "../support/pg.rs"]
mod pg;

mod contract;
mod fixture;
mod postgres_only;
mod sqlite_only;
