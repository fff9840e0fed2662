//! The shipped Rego policies and the embedded engine, end to end: real regorus,
//! real policy files on disk, intents built from the real intent types.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test helpers: a panic is a failed test.

mod support;

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
    let names = support::canonical(intent);
    let input = build_input(&InputContext {
        intent,
        run_counts: &counts,
        digest: "sha256:0000",
        keyid: Some("key-1"),
        file: "intent-1.json",
        target: "default",
        preview: None,
        names: Some(&names),
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
        preview: None,
        names: None,
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

/// The input document's published JSON Schema, with the intent schema it refers to.
fn input_schema_validator() -> jsonschema::Validator {
    let intent_schema: serde_json::Value = serde_json::from_str(airlock_intent::SCHEMA).unwrap();
    let input_schema: serde_json::Value =
        serde_json::from_slice(&fs::read(examples().join("input.schema.json")).unwrap()).unwrap();
    let registry = jsonschema::Registry::new()
        .add("https://airlock.dev/schemas/intent/v1.json", intent_schema)
        .unwrap()
        .prepare()
        .unwrap();
    jsonschema::draft202012::options()
        .should_validate_formats(false)
        .with_registry(&registry)
        .build(&input_schema)
        .unwrap()
}

#[test]
fn built_input_documents_match_the_published_schema() {
    let validator = input_schema_validator();
    let full: Intent = serde_json::from_value(json!({
        "version": 1,
        "id": "every-field",
        "run": "run-7",
        "target": "crm",
        "ops": [
            {"op": "insert", "table": "crm.customers", "values": {"id": 1, "name": "Ada"}},
            {"op": "update", "table": "customers", "key": {"id": 1},
             "set": {"name": "Ada L"}, "expect": {"name": "Ada"}},
            {"op": "delete", "table": "orders", "key": {"id": 9}, "expect": {"state": "open"}},
            {"op": "upsert", "table": "public.tags", "values": {"k": "a", "v": [1, 2]}, "on": ["k"]}
        ],
        "reason": "customer asked",
        "provenance": {
            "agent": "support-bot", "model": "m-1", "model_parameters": {"temperature": 0.2},
            "prompt_digest": "sha256:00", "tool_call_id": "call_1",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        }
    }))
    .unwrap();
    let minimal = intent(json!([{"op": "delete", "table": "t", "key": {"id": 1}}]));
    let digest = format!("sha256:{}", "ab".repeat(32));
    let every_state: BTreeMap<String, u64> = airlock::lifecycle::State::ALL
        .iter()
        .map(|state| (state.as_str().to_owned(), 1))
        .collect();
    for (intent, counts, keyid) in [
        (&full, every_state, Some("sha256:key")),
        (&minimal, BTreeMap::new(), None),
    ] {
        let would_apply = json!({"ops": [
            {"index": 0, "rows": 1, "before": [], "after": [{"id": 1, "name": "Ada"}]},
            {"index": 1, "rows": 1, "before": [{"id": 1, "name": "Ada"}],
             "after": [{"id": 1, "name": "Ada L"}]}
        ]});
        let would_fail = json!({"error": {"op": 2, "code": "AIRLOCK_NO_ROW",
                                          "message": "key {\"id\":9} matched no row"}});
        let no_op = json!({"error": {"op": null, "code": null, "message": "busy"}});
        for preview in [None, Some(&would_apply), Some(&would_fail), Some(&no_op)] {
            let input = build_input(&InputContext {
                intent,
                run_counts: &counts,
                digest: &digest,
                keyid,
                file: "f.json",
                target: intent.target.as_str(),
                preview,
                names: Some(&support::canonical(intent)),
            });
            let problems: Vec<String> = validator
                .iter_errors(&input)
                .map(|e| format!("{}: {e}", e.instance_path()))
                .collect();
            assert!(problems.is_empty(), "{problems:#?}\n{input:#}");
        }
    }

    // The schema can fail: a document with an unknown op kind, an extra key or an
    // unknown state does not match it.
    let base = build_input(&InputContext {
        intent: &minimal,
        run_counts: &BTreeMap::new(),
        digest: &digest,
        keyid: None,
        file: "f.json",
        target: "default",
        preview: None,
        names: None,
    });
    let mut bad_kind = base.clone();
    bad_kind["ops"][0]["kind"] = json!("truncate");
    let mut extra = base.clone();
    extra["preview"] = json!([]);
    let mut bad_state = base.clone();
    bad_state["run"]["counts"] = json!({"pending": 1});
    let mut bad_digest = base.clone();
    bad_digest["envelope"]["digest"] = json!("md5:00");
    let mut bad_preview = base.clone();
    bad_preview["preview"] = json!({"ops": [{"index": 0, "rows": -1, "before": [], "after": []}]});
    let mut both = base.clone();
    both["preview"] = json!({"ops": [], "error": {"op": null, "code": null, "message": "x"}});
    for bad in [bad_kind, extra, bad_state, bad_digest, bad_preview, both] {
        assert!(!validator.is_valid(&bad), "{bad:#}");
    }
}

#[test]
fn the_daemon_follows_policy_edits_and_keeps_the_last_good_policy() {
    let policy = tempfile::tempdir().unwrap();
    let file = policy.path().join("policy.rego");
    fs::write(&file, "package airlock.authz\n\nallow := true\n").unwrap();
    let mut sandbox = support::Sandbox::new();
    sandbox.extra_args = vec!["--policy".into(), policy.path().display().to_string()];
    sandbox.env = vec![("AIRLOCK_POLICY__RELOAD_MS".into(), "50".into())];
    sandbox.start();
    sandbox.submit_json(&support::insert_customer("c-1", "run-1", 1, "Ada"));
    let first = sandbox.outcome_in("c-1", "applied");
    let allowing = first["decision"]["policy"].as_str().unwrap().to_owned();

    // An edit that denies everything is picked up without a restart.
    fs::write(
        &file,
        "package airlock.authz\n\nallow := false\n\nreasons := [\"frozen\"]\n",
    )
    .unwrap();
    support::eventually("the policy reload in the log", || {
        sandbox.log().contains("policy reloaded").then_some(())
    });
    sandbox.submit_json(&support::insert_customer("c-2", "run-2", 2, "Bo"));
    let denied = sandbox.outcome_in("c-2", "denied");
    let denying = denied["decision"]["policy"].as_str().unwrap().to_owned();
    assert_ne!(denying, allowing);
    assert_eq!(denied["decision"]["reasons"], json!(["frozen"]));

    // A broken edit is reported, and the last good policy keeps deciding.
    fs::write(&file, "package airlock.authz\n\nallow if {\n").unwrap();
    support::eventually("the compile error in the log", || {
        let log = sandbox.log();
        (log.contains("do not load") && log.contains("policy.rego")).then_some(())
    });
    sandbox.submit_json(&support::insert_customer("c-3", "run-3", 3, "Cy"));
    let still = sandbox.outcome_in("c-3", "denied");
    assert_eq!(still["decision"]["policy"], denying.as_str());
    assert_eq!(sandbox.stop().code(), Some(0));
}
