//! The shipped Rego policies and the embedded engine, end to end: real regorus,
//! real policy files on disk, intents built from the real intent types.
#![allow(clippy::unwrap_used)] // Test helpers: a panic is a failed test.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use airlock::decide::{
    EmbeddedPolicy, InputContext, PolicyError, PolicySource, UNDEFINED_REASON, Verdict,
    build_input, run_rego_tests,
};
use airlock_intent::Intent;
use serde_json::json;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")
}

fn intent(ops: serde_json::Value) -> Intent {
    serde_json::from_value(json!({
        "version": 1,
        "id": "intent-1",
        "run": "run-1",
        "ops": ops,
        "reason": "test",
        "provenance": {"agent": "tester"}
    }))
    .unwrap()
}

fn decide(policy: &EmbeddedPolicy, intent: &Intent) -> airlock::decide::Decision {
    let counts = BTreeMap::from([("applied".to_owned(), 2)]);
    let input = build_input(&InputContext {
        intent,
        run_counts: &counts,
        digest: "sha256:0000",
        keyid: Some("key-1"),
        file: "intent-1.json",
        target: "default",
    });
    policy.evaluate(&input).unwrap()
}

/// Writes `files` into a fresh directory.
fn policy_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn load(dir: &Path) -> Result<EmbeddedPolicy, PolicyError> {
    EmbeddedPolicy::load(PolicySource::Path(dir.to_owned()))
}

#[test]
fn shipped_rego_tests_pass() {
    let tests = run_rego_tests(&examples()).unwrap();
    assert!(
        tests.len() >= 5,
        "only {} tests found: {tests:?}",
        tests.len()
    );
    let failed: Vec<_> = tests.iter().filter(|t| !t.passed).collect();
    assert!(failed.is_empty(), "failing Rego tests: {failed:#?}");
    assert!(
        tests
            .iter()
            .any(|t| t.name == "data.airlock.authz_test.test_delete_needs_one_review")
    );
}

#[test]
fn failing_rego_tests_are_reported() {
    let dir = policy_dir(&[
        ("p.rego", "package p\n\nx := 1\n"),
        (
            "p_test.rego",
            "package p_test\n\nimport data.p\n\ntest_good if p.x == 1\n\ntest_bad if p.x == 2\n\n\
             test_value := 3\n\nnot_a_test if false\n",
        ),
    ]);
    let tests = run_rego_tests(dir.path()).unwrap();
    let summary: Vec<(&str, bool)> = tests.iter().map(|t| (t.name.as_str(), t.passed)).collect();
    assert_eq!(
        summary,
        [
            ("data.p_test.test_bad", false),
            ("data.p_test.test_good", true),
            ("data.p_test.test_value", false),
        ]
    );
    assert_eq!(tests[0].failure.as_deref(), Some("undefined"));
    assert_eq!(tests[2].failure.as_deref(), Some("evaluated to 3"));
}

#[test]
fn default_policy_on_concrete_intents() {
    let policy = EmbeddedPolicy::load(PolicySource::Default).unwrap();

    let insert = intent(json!([
        {"op": "insert", "table": "customers", "values": {"id": 1, "name": "Ada"}},
        {"op": "update", "table": "crm.customers", "key": {"id": 2}, "set": {"name": "Bo"}},
        {"op": "upsert", "table": "tags", "values": {"k": "a"}, "on": ["k"]}
    ]));
    let decision = decide(&policy, &insert);
    assert_eq!(decision.verdict, Verdict::Allow, "{decision:?}");
    assert_eq!(decision.policy, policy.identity());
    assert_eq!(decision.decision_id, None);

    let delete = intent(json!([
        {"op": "insert", "table": "orders", "values": {"id": 1}},
        {"op": "delete", "table": "orders", "key": {"id": 9}}
    ]));
    let decision = decide(&policy, &delete);
    assert_eq!(decision.verdict, Verdict::Review { approvals: 1 });
    assert_eq!(decision.reasons, ["deletes from orders need human review"]);

    let audit = intent(json!([
        {"op": "insert", "table": "customers", "values": {"id": 1}},
        {"op": "insert", "table": "public.audit_log", "values": {"note": "hi"}}
    ]));
    let decision = decide(&policy, &audit);
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.reasons.len(), 1, "{:?}", decision.reasons);
    assert!(decision.reasons[0].contains("public.audit_log"));

    let many: Vec<_> = (0..21)
        .map(|i| json!({"op": "insert", "table": "t", "values": {"id": i}}))
        .collect();
    let decision = decide(&policy, &intent(json!(many)));
    assert_eq!(decision.verdict, Verdict::Review { approvals: 1 });
    assert!(
        decision.reasons[0].contains("21 ops"),
        "{:?}",
        decision.reasons
    );
}

#[test]
fn examples_directory_is_the_default_policy() {
    // The directory loader skips airlock_test.rego, so it loads exactly the files
    // compiled into the binary and must agree on the identity.
    let from_disk = load(&examples()).unwrap();
    let builtin = EmbeddedPolicy::load(PolicySource::Default).unwrap();
    assert_eq!(from_disk.files(), ["airlock.rego", "data.json"]);
    assert_eq!(from_disk.identity(), builtin.identity());
}

#[test]
fn a_single_rego_file_loads() {
    let dir = policy_dir(&[("only.rego", "package airlock.authz\n\nallow := true\n")]);
    let policy = EmbeddedPolicy::load(PolicySource::Path(dir.path().join("only.rego"))).unwrap();
    assert_eq!(policy.files(), ["only.rego"]);
    let decision = decide(
        &policy,
        &intent(json!([{"op": "insert", "table": "t", "values": {"a": 1}}])),
    );
    assert_eq!(decision.verdict, Verdict::Allow);
}

#[test]
fn syntax_error_names_file_and_line() {
    let dir = policy_dir(&[
        ("a.rego", "package airlock.authz\n\nallow := true\n"),
        (
            "b.rego",
            "package airlock.authz\n\nreview if {\n  input.ops[_].kind ==\n}\n",
        ),
    ]);
    match load(dir.path()) {
        Err(PolicyError::Compile { file, message }) => {
            assert_eq!(file, "b.rego");
            assert!(message.contains("b.rego:5:"), "{message}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn compile_error_after_parsing_names_the_file() {
    // Parses, but `x` is unsafe: caught when the policy is compiled at load time.
    let dir = policy_dir(&[
        ("a.rego", "package airlock.authz\n\nallow := true\n"),
        // Sorts after a.rego and its name ends in "a.rego": must not be confused.
        (
            "data.rego",
            "package airlock.authz\n\nreview if {\n  x > 1\n}\n",
        ),
    ]);
    match load(dir.path()) {
        Err(PolicyError::Compile { file, message }) => {
            assert_eq!(file, "data.rego", "{message}");
            assert!(message.contains("data.rego:4:"), "{message}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn a_malformed_answer_fails_closed() {
    let dir = policy_dir(&[("p.rego", "package airlock.authz\n\nallow := \"yes\"\n")]);
    let policy = load(dir.path()).unwrap();
    let input = build_input(&InputContext {
        intent: &intent(json!([{"op": "insert", "table": "t", "values": {"a": 1}}])),
        run_counts: &BTreeMap::new(),
        digest: "sha256:00",
        keyid: None,
        file: "f.json",
        target: "default",
    });
    match policy.evaluate(&input) {
        Err(PolicyError::Malformed(why)) => assert!(why.contains("`allow`"), "{why}"),
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn an_undefined_package_is_a_deny() {
    let dir = policy_dir(&[("p.rego", "package something.else\n\nallow := true\n")]);
    let policy = load(dir.path()).unwrap();
    let decision = decide(
        &policy,
        &intent(json!([{"op": "insert", "table": "t", "values": {"a": 1}}])),
    );
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.reasons, [UNDEFINED_REASON]);
}

#[test]
fn identity_follows_every_file() {
    let rego = "package airlock.authz\n\nallow := true\n";
    let dir = policy_dir(&[("p.rego", rego), ("data.json", "{}")]);
    let first = load(dir.path()).unwrap().identity().to_owned();
    assert_eq!(
        load(dir.path()).unwrap().identity(),
        first,
        "not deterministic"
    );

    fs::write(dir.path().join("p.rego"), format!("{rego}# comment\n")).unwrap();
    let edited = load(dir.path()).unwrap().identity().to_owned();
    assert_ne!(edited, first);

    fs::write(dir.path().join("data.json"), r#"{"airlock": {}}"#).unwrap();
    let data_edited = load(dir.path()).unwrap().identity().to_owned();
    assert_ne!(data_edited, edited);

    fs::write(dir.path().join("q.rego"), "package other\n").unwrap();
    let added = load(dir.path()).unwrap().identity().to_owned();
    assert_ne!(added, data_edited);

    // Tests are not part of the policy: adding one changes nothing.
    fs::write(dir.path().join("q_test.rego"), "package other_test\n").unwrap();
    assert_eq!(load(dir.path()).unwrap().identity(), added);
}

#[test]
fn bad_data_and_empty_directories_fail_to_load() {
    let dir = policy_dir(&[("p.rego", "package airlock.authz\n"), ("data.json", "{")]);
    assert!(
        matches!(load(dir.path()), Err(PolicyError::Load { ref message, .. }) if message.contains("invalid JSON")),
    );
    let dir = policy_dir(&[("p.rego", "package airlock.authz\n"), ("data.json", "[]")]);
    assert!(matches!(load(dir.path()), Err(PolicyError::Load { .. })));
    let dir = policy_dir(&[("data.json", "{}")]);
    assert!(matches!(load(dir.path()), Err(PolicyError::Load { .. })));
    let missing = dir.path().join("nope");
    assert!(matches!(load(&missing), Err(PolicyError::Load { .. })));
}
