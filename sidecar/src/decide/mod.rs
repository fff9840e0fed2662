//! The decide stage: asks a policy whether an intent may be applied.
//!
//! The parts, the first two pure:
//! - `input` builds the policy input document (version 2) from an intent and its context;
//! - `result` turns the policy's result document v1 into a [`Verdict`] and reasons;
//! - `embedded` evaluates Rego in-process with `regorus` ([`EmbeddedPolicy`]), and
//!   `reload` swaps in a new one when the files change ([`ReloadingPolicy`]);
//! - `remote` asks an Open Policy Agent over its REST Data API ([`RemotePolicy`]);
//! - `policy` is what the pipeline calls, whichever engine answers ([`Policy`]);
//! - `decision_log` writes one line per decision in the shape of OPA's decision log
//!   events, the agent's values masked ([`DecisionLog`]).
//!
//! The policy is evaluated at `data.airlock.authz`, the whole package document, so
//! the same policy runs unchanged in OPA (`POST /v1/data/airlock/authz`). Policy
//! authors' documentation is `examples/policies/README.md`, and the input document's
//! JSON Schema is `examples/policies/input.schema.json`.
//!
//! Fail closed (DESIGN invariant 4): every [`PolicyError`] means "no decision"; the
//! caller keeps the intent queued and tries again later. Only a well-formed answer
//! becomes a [`Decision`], and an undefined answer is a deny.

mod decision_log;
mod embedded;
mod input;
mod policy;
mod reload;
mod remote;
mod result;

pub use self::decision_log::{
    DecisionLog, DecisionLogError, EMBEDDED_PATH, Entry, MASK, Sink, mask_values, new_decision_id,
    policy_path,
};
pub use self::embedded::{EmbeddedPolicy, PolicySource, RULE, RegoTest, run_rego_tests};
pub use self::input::{INPUT_VERSION, InputContext, build_input, preview_json};
pub use self::policy::{Policy, PolicyOptions, Trial, TrialError, try_intent};
pub use self::reload::{Reload, ReloadingPolicy};
pub use self::remote::{MAX_ANSWER_BYTES, RemoteOptions, RemotePolicy};
pub use self::result::{DENY_REASON, REVIEW_REASON, Ruling, UNDEFINED_REASON, read_result};
pub use crate::lifecycle::{Decision, Verdict};

// `Decision` lives in `lifecycle`, next to `Verdict`, so that the queue and the
// outcomes can hold one without importing this stage; reading a policy's answer into
// one is this stage's job, hence the impl here.
impl Decision {
    /// Reads a policy's result document (`None` when undefined) into a decision by
    /// the policy `policy`. Malformed documents are errors: see [`read_result`].
    pub fn from_result(
        document: Option<serde_json::Value>,
        policy: &str,
        decision_id: Option<String>,
    ) -> Result<Self, PolicyError> {
        let Ruling { verdict, reasons } = read_result(document)?;
        Ok(Self {
            verdict,
            reasons,
            policy: policy.to_owned(),
            decision_id,
        })
    }
}

/// Why a policy could not be loaded or could not decide. Every variant means the
/// intent stays queued.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A policy file or directory could not be read.
    #[error("cannot load policy from {path}: {message}")]
    Load { path: String, message: String },
    /// A policy file does not parse or compile; `message` has the line and column.
    #[error("policy file {file} does not compile: {message}")]
    Compile { file: String, message: String },
    /// The policy failed while evaluating (a runtime error in Rego).
    #[error("policy evaluation failed: {0}")]
    Eval(String),
    /// The policy answered, but not with a result document v1.
    #[error("policy answer is malformed: {0}")]
    Malformed(String),
    /// A remote policy could not be asked or did not answer with a decision:
    /// unreachable, too slow, a status other than 2xx, or a body that is not JSON.
    #[error("policy server {url} is unavailable: {message}")]
    Unavailable { url: String, message: String },
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn decision_wire_form_round_trips() {
        let decision = Decision::from_result(
            Some(json!({"review": true, "approvals": 2, "reasons": ["delete"]})),
            "sha256:ab",
            Some("d-1".to_owned()),
        )
        .unwrap();
        let wire = serde_json::to_value(&decision).unwrap();
        assert_eq!(
            wire,
            json!({"verdict": "review", "approvals": 2, "reasons": ["delete"],
                   "policy": "sha256:ab", "decision_id": "d-1"})
        );
        assert_eq!(serde_json::from_value::<Decision>(wire).unwrap(), decision);

        let allow = Decision::from_result(Some(json!({"allow": true})), "sha256:ab", None).unwrap();
        let wire = serde_json::to_value(&allow).unwrap();
        assert_eq!(wire["verdict"], "allow");
        assert_eq!(serde_json::from_value::<Decision>(wire).unwrap(), allow);
    }

    #[test]
    fn malformed_results_are_errors() {
        let err = Decision::from_result(Some(json!({"allow": "yes"})), "sha256:ab", None);
        assert!(matches!(err, Err(PolicyError::Malformed(_))));
    }
}
