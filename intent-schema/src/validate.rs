//! Placeholder: replaced by the validation work.
use serde::Serialize;

use crate::Intent;

/// Limits applied before and during validation.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_depth: usize,
    pub max_ops: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_bytes: 1 << 20, max_depth: 32, max_ops: 100 }
    }
}

/// One problem found in an intent document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub pointer: String,
    pub message: String,
}

/// Why a document is not a valid intent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub id: Option<String>,
    pub run: Option<String>,
    pub problems: Vec<Problem>,
}

/// Validates intent documents.
#[derive(Debug)]
pub struct Validator {
    limits: Limits,
}

impl Validator {
    pub fn new(limits: Limits) -> Self {
        Self { limits }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn validate(&self, bytes: &[u8]) -> Result<Intent, Invalid> {
        serde_json::from_slice(bytes).map_err(|e| Invalid {
            id: None,
            run: None,
            problems: vec![Problem { pointer: String::new(), message: e.to_string() }],
        })
    }
}
