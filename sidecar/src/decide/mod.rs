//! Placeholder; filled in by its own change.
use serde::{Deserialize, Serialize};

use crate::lifecycle::Verdict;

/// The policy's answer for one intent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    pub policy: String,
    pub decision_id: Option<String>,
}

pub mod input {
    use std::collections::BTreeMap;
    pub struct InputContext<'a> {
        pub intent: &'a airlock_intent::Intent,
        pub run_counts: &'a BTreeMap<String, u64>,
        pub digest: &'a str,
        pub keyid: Option<&'a str>,
        pub file: &'a str,
        pub target: &'a str,
    }
    pub fn build(ctx: &InputContext<'_>) -> serde_json::Value {
        serde_json::json!({"intent": ctx.intent})
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Eval(String),
}

#[derive(Debug)]
pub enum PolicySource {
    Default,
    Path(std::path::PathBuf),
}

#[derive(Debug)]
pub struct EmbeddedPolicy;

impl EmbeddedPolicy {
    pub fn load(_source: PolicySource) -> Result<Self, PolicyError> {
        Ok(Self)
    }
    pub fn identity(&self) -> &str {
        "placeholder"
    }
    pub fn evaluate(&self, _input: &serde_json::Value) -> Result<Decision, PolicyError> {
        Err(PolicyError::Eval("placeholder".into()))
    }
}
