//! Placeholder; filled in by its own change (interface only).
use std::sync::Arc;

use airlock_intent::Intent;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug)]
pub struct ApplyMeta {
    pub digest: String,
    pub max_rows: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpResult {
    pub index: usize,
    pub rows: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UndoImage {
    pub op: usize,
    pub table: String,
    pub key: serde_json::Map<String, serde_json::Value>,
    pub before: Option<serde_json::Map<String, serde_json::Value>>,
    pub after: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub intent_id: String,
    pub run: String,
    pub digest: String,
    pub applied_at_ms: i64,
    pub undo: Vec<UndoImage>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Applied {
    pub already: bool,
    pub ledger: LedgerEntry,
    pub ops: Vec<OpResult>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    Transient,
    Permanent,
}

#[derive(Clone, Debug, thiserror::Error, Serialize, Deserialize)]
#[error("{message}")]
pub struct ApplyError {
    pub kind: ErrorKind,
    pub op: Option<usize>,
    pub code: Option<String>,
    pub message: String,
}

#[async_trait::async_trait]
pub trait Target: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &str;
    async fn apply(&self, intent: &Intent, meta: &ApplyMeta) -> Result<Applied, ApplyError>;
    async fn ledger_entry(&self, intent_id: &str) -> Result<Option<LedgerEntry>, ApplyError>;
}

pub fn open(_name: &str, url: &str) -> Result<Arc<dyn Target>, ApplyError> {
    Err(ApplyError {
        kind: ErrorKind::Permanent,
        op: None,
        code: None,
        message: format!("unsupported {url}"),
    })
}
