//! The policy result document, version 1, and how it becomes a [`Verdict`]. Pure.
//!
//! A policy answers with one JSON object (for Rego, the document of package
//! `airlock.authz`; for OPA, `result` of `POST /v1/data/airlock/authz`):
//!
//! ```json
//! {"allow": false, "review": true, "reasons": ["deletes need a human"], "approvals": 1}
//! ```
//!
//! Every key is optional; other keys (helper rules of the package) are ignored.
//! Anything that does not fit this shape is [`PolicyError::Malformed`]: the caller
//! keeps the intent queued and retries, so a broken policy never lets a write through
//! (DESIGN invariant 4, fail closed). An undefined result (no such package, or a
//! package with no rules that evaluated) is a deny, as OPA's `default allow := false`
//! idiom would make it.

use serde_json::Value;

use super::PolicyError;
use crate::lifecycle::Verdict;

/// The reason given when the policy produced no document at all.
pub const UNDEFINED_REASON: &str = "policy undefined";
/// The reason given for a deny whose document lists no reasons.
pub const DENY_REASON: &str = "not allowed by policy";
/// The reason given for a review whose document lists no reasons.
pub const REVIEW_REASON: &str = "review required by policy";

/// A verdict and the reasons the policy gave for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruling {
    /// Allow, deny, or review with a number of approvals.
    pub verdict: Verdict,
    /// Why, in the policy's words (never empty for deny and review).
    pub reasons: Vec<String>,
}

/// Reads a result document (`None` when the policy's answer was undefined).
///
/// Returns [`PolicyError::Malformed`] naming the offending key when the document is
/// not an object, a key has the wrong type, `approvals` is not an integer of at
/// least 1, or `allow` and `review` are both true.
pub fn read_result(document: Option<Value>) -> Result<Ruling, PolicyError> {
    let Some(document) = document else {
        return Ok(Ruling {
            verdict: Verdict::Deny,
            reasons: vec![UNDEFINED_REASON.to_owned()],
        });
    };
    let Value::Object(mut object) = document else {
        return Err(PolicyError::Malformed(format!(
            "the result document must be an object, got {}",
            describe(&document)
        )));
    };
    let allow = flag(object.get("allow"), "allow")?;
    let review = flag(object.get("review"), "review")?;
    let approvals = approvals(object.get("approvals"))?;
    let mut reasons = reasons(object.remove("reasons"))?;
    if allow && review {
        return Err(PolicyError::Malformed(
            "`allow` and `review` are both true; a policy must pick one".to_owned(),
        ));
    }
    let verdict = if review {
        if reasons.is_empty() {
            reasons.push(REVIEW_REASON.to_owned());
        }
        Verdict::Review { approvals }
    } else if allow {
        Verdict::Allow
    } else {
        if reasons.is_empty() {
            reasons.push(DENY_REASON.to_owned());
        }
        Verdict::Deny
    };
    Ok(Ruling { verdict, reasons })
}

/// `allow` or `review`: absent means false; anything but a boolean is malformed.
fn flag(value: Option<&Value>, key: &str) -> Result<bool, PolicyError> {
    match value {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(PolicyError::Malformed(format!(
            "`{key}` must be a boolean, got {}",
            describe(other)
        ))),
    }
}

/// `approvals`: absent means 1; otherwise an integer from 1 to `u32::MAX`. A float
/// with no fractional part (`2.0`) counts as an integer, since Rego arithmetic can
/// produce one.
fn approvals(value: Option<&Value>) -> Result<u32, PolicyError> {
    let Some(value) = value else {
        return Ok(1);
    };
    let integer = match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= f64::from(u32::MAX))
                .map(|f| f as u64)
        }),
        _ => None,
    };
    match integer.and_then(|n| u32::try_from(n).ok()) {
        Some(n) if n >= 1 => Ok(n),
        _ => Err(PolicyError::Malformed(format!(
            "`approvals` must be an integer of at least 1, got {}",
            describe(value)
        ))),
    }
}

/// `reasons`: absent means none; otherwise an array of strings.
fn reasons(value: Option<Value>) -> Result<Vec<String>, PolicyError> {
    let items = match value {
        None => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(PolicyError::Malformed(format!(
                "`reasons` must be an array of strings, got {}",
                describe(&other)
            )));
        }
    };
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| match item {
            Value::String(s) => Ok(s),
            other => Err(PolicyError::Malformed(format!(
                "`reasons[{index}]` must be a string, got {}",
                describe(&other)
            ))),
        })
        .collect()
}

/// A short description of a JSON value for error messages: its type, and the value
/// itself when it is small.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) if s.len() <= 40 => format!("string {s:?}"),
        Value::String(_) => "a long string".to_owned(),
        Value::Array(a) => format!("an array of {} items", a.len()),
        Value::Object(_) => "an object".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ok(document: Value) -> Ruling {
        read_result(Some(document)).unwrap()
    }

    fn malformed(document: Value) -> String {
        match read_result(Some(document)) {
            Err(PolicyError::Malformed(why)) => why,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn undefined_is_a_deny() {
        let ruling = read_result(None).unwrap();
        assert_eq!(ruling.verdict, Verdict::Deny);
        assert_eq!(ruling.reasons, vec![UNDEFINED_REASON]);
    }

    #[test]
    fn allow() {
        let ruling = ok(json!({"allow": true}));
        assert_eq!(ruling.verdict, Verdict::Allow);
        assert!(ruling.reasons.is_empty());
        let ruling = ok(json!({"allow": true, "review": false, "reasons": ["fine"]}));
        assert_eq!(ruling.verdict, Verdict::Allow);
        assert_eq!(ruling.reasons, vec!["fine"]);
    }

    #[test]
    fn review_with_default_and_explicit_approvals() {
        let ruling = ok(json!({"review": true, "reasons": ["delete"]}));
        assert_eq!(ruling.verdict, Verdict::Review { approvals: 1 });
        assert_eq!(ruling.reasons, vec!["delete"]);
        let ruling = ok(json!({"review": true, "allow": false, "approvals": 3}));
        assert_eq!(ruling.verdict, Verdict::Review { approvals: 3 });
        assert_eq!(ruling.reasons, vec![REVIEW_REASON]);
        // Rego arithmetic may yield an integral float.
        let ruling = ok(json!({"review": true, "approvals": 2.0}));
        assert_eq!(ruling.verdict, Verdict::Review { approvals: 2 });
    }

    #[test]
    fn neither_is_a_deny() {
        let ruling = ok(json!({}));
        assert_eq!(ruling.verdict, Verdict::Deny);
        assert_eq!(ruling.reasons, vec![DENY_REASON]);
        let ruling = ok(json!({"allow": false, "reasons": ["table audit_log is read-only"]}));
        assert_eq!(ruling.verdict, Verdict::Deny);
        assert_eq!(ruling.reasons, vec!["table audit_log is read-only"]);
    }

    #[test]
    fn unknown_keys_are_ignored() {
        // Helper rules of the package show up in its document.
        let ruling = ok(json!({"allow": true, "deletes": 0, "writes_denied_table": false}));
        assert_eq!(ruling.verdict, Verdict::Allow);
    }

    #[test]
    fn allow_and_review_together_is_malformed() {
        let why = malformed(json!({"allow": true, "review": true}));
        assert!(why.contains("both true"), "{why}");
    }

    #[test]
    fn wrong_types_are_malformed() {
        let why = malformed(json!({"allow": "yes"}));
        assert!(why.contains("`allow`") && why.contains("\"yes\""), "{why}");
        let why = malformed(json!({"review": 1}));
        assert!(why.contains("`review`"), "{why}");
        let why = malformed(json!({"allow": null}));
        assert!(why.contains("`allow`") && why.contains("null"), "{why}");
        let why = malformed(json!({"allow": false, "reasons": "no"}));
        assert!(why.contains("`reasons`"), "{why}");
        let why = malformed(json!({"reasons": ["a", 2]}));
        assert!(why.contains("`reasons[1]`"), "{why}");
    }

    #[test]
    fn bad_approvals_are_malformed() {
        for bad in [
            json!(0),
            json!(-1),
            json!(1.5),
            json!("2"),
            json!(null),
            json!(u64::from(u32::MAX) + 1),
        ] {
            let why = malformed(json!({"review": true, "approvals": bad}));
            assert!(why.contains("`approvals`"), "{why}");
        }
        // Even when the verdict does not use it, a bad value means a broken policy.
        let why = malformed(json!({"allow": true, "approvals": 0}));
        assert!(why.contains("`approvals`"), "{why}");
    }

    #[test]
    fn non_objects_are_malformed() {
        for bad in [
            json!(true),
            json!([]),
            json!("allow"),
            json!(null),
            json!(1),
        ] {
            let why = malformed(bad);
            assert!(why.contains("must be an object"), "{why}");
        }
    }
}
