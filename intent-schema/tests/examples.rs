//! The example intents are the contract's test cases: each valid one passes the
//! validator and deserialises into `Intent`; each invalid one fails with the
//! pointer and message that `examples/invalid/expected.json` gives for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;

use airlock_intent::{Intent, Limits, OpKind, Validator};
use serde_json::Value;

#[test]
fn valid_examples_pass_and_deserialise() {
    let validator = Validator::new(Limits::default());
    let examples = support::examples("valid");
    assert!(
        examples.len() >= 8,
        "only {} valid examples",
        examples.len()
    );
    let mut ids = BTreeSet::new();
    for (name, bytes) in &examples {
        let intent = validator
            .validate(bytes)
            .unwrap_or_else(|invalid| panic!("{name}: {invalid}"));
        // The validator's Intent is the one plain deserialisation gives.
        let plain: Intent = serde_json::from_slice(bytes).unwrap();
        assert_eq!(intent, plain, "{name}");
        assert_eq!(intent.version, 1, "{name}");
        assert_eq!(intent.run.as_str(), "example-run", "{name}");
        assert!(
            ids.insert(intent.id.clone()),
            "{name}: id {} reused",
            intent.id
        );
    }
}

#[test]
fn valid_examples_cover_every_kind_of_op_and_field() {
    let validator = Validator::new(Limits::default());
    let intents: Vec<Intent> = support::examples("valid")
        .iter()
        .map(|(_, bytes)| validator.validate(bytes).unwrap())
        .collect();
    let ops = || intents.iter().flat_map(|intent| &intent.ops);
    for kind in [
        OpKind::Insert,
        OpKind::Update,
        OpKind::Delete,
        OpKind::Upsert,
    ] {
        assert!(
            ops().any(|op| op.kind() == kind),
            "no {} example",
            kind.as_str()
        );
    }
    let has_expect = |kind: OpKind| {
        ops().any(|op| {
            op.kind() == kind
                && matches!(
                    op,
                    airlock_intent::Op::Update {
                        expect: Some(_),
                        ..
                    } | airlock_intent::Op::Delete {
                        expect: Some(_),
                        ..
                    }
                )
        })
    };
    assert!(has_expect(OpKind::Update), "no update with expect");
    assert!(has_expect(OpKind::Delete), "no delete with expect");
    assert!(
        intents.iter().any(|intent| intent.ops.len() > 1),
        "no multi-op example"
    );
    assert!(
        ops().any(|op| op.table().schema().is_some()),
        "no schema.table example"
    );
    assert!(
        intents
            .iter()
            .any(|i| i.provenance.model.is_none() && i.provenance.traceparent.is_none()),
        "no minimal provenance example"
    );
    assert!(
        intents.iter().any(|i| {
            let p = &i.provenance;
            p.model.is_some()
                && p.model_parameters.is_some()
                && p.prompt_digest.is_some()
                && p.tool_call_id.is_some()
                && p.traceparent.is_some()
        }),
        "no full provenance example"
    );
}

#[test]
fn invalid_examples_fail_where_expected() {
    let validator = Validator::new(Limits::default());
    let expected: serde_json::Map<String, Value> = serde_json::from_slice(
        &std::fs::read(support::examples_dir("invalid").join("expected.json")).unwrap(),
    )
    .unwrap();
    let examples = support::examples("invalid");
    let names: BTreeSet<&str> = examples.iter().map(|(name, _)| name.as_str()).collect();
    let listed: BTreeSet<&str> = expected.keys().map(String::as_str).collect();
    assert_eq!(
        names, listed,
        "expected.json must list exactly the invalid examples"
    );

    for (name, bytes) in &examples {
        let invalid = match validator.validate(bytes) {
            Ok(intent) => panic!("{name} was accepted: {intent:?}"),
            Err(invalid) => invalid,
        };
        let want = &expected[name];
        let first = &invalid.problems[0];
        assert_eq!(
            first.pointer,
            want["pointer"].as_str().unwrap(),
            "{name}: {invalid}"
        );
        let fragment = want["message"].as_str().unwrap();
        assert!(
            first.message.contains(fragment),
            "{name}: {:?} does not contain {fragment:?}",
            first.message
        );
        // The plain types refuse every invalid example too, except those only the
        // validator's strict parse can catch: serde_json keeps the last of duplicate
        // keys, and its recursion limit (128) is above our depth limit. Reserved
        // table names are the validator's gate too (the sidecar refuses them again
        // when it resolves names against the target).
        let parse_level = ["duplicate-key.json", "too-deep.json", "system-catalog.json"];
        let types_accept = serde_json::from_slice::<Intent>(bytes).is_ok();
        assert_eq!(types_accept, parse_level.contains(&name.as_str()), "{name}");
    }
}

#[test]
fn invalid_intents_are_routed_by_their_valid_id_and_run() {
    let validator = Validator::new(Limits::default());
    let read = |name: &str| {
        let bytes = std::fs::read(support::examples_dir("invalid").join(name)).unwrap();
        validator.validate(&bytes).unwrap_err()
    };
    let missing_reason = read("missing-reason.json");
    assert_eq!(missing_reason.id.as_deref(), Some("missing-reason"));
    assert_eq!(missing_reason.run.as_deref(), Some("example-run"));
    // The strict parse failed, but id and run are unambiguous.
    let duplicate = read("duplicate-key.json");
    assert_eq!(duplicate.id.as_deref(), Some("duplicate-key"));
    // A path-traversal id is never handed back to be used as a file name.
    let bad_id = read("bad-id.json");
    assert_eq!(bad_id.id, None);
    assert_eq!(bad_id.run.as_deref(), Some("example-run"));
    let not_json = read("not-json.json");
    assert_eq!((not_json.id, not_json.run), (None, None));
}

#[test]
fn every_error_is_reported_sorted_by_pointer() {
    let validator = Validator::new(Limits::default());
    let document = serde_json::json!({
        "version": 3,
        "id": ".hidden",
        "run": "example-run",
        "ops": [
            { "op": "insert", "table": "customers", "values": { "name": "Ada" }, "extra": 1 },
            { "op": "update", "table": "1orders", "key": {}, "set": { "bad column": 1 } },
            { "op": "delete" },
            { "op": "upsert", "table": "customers", "values": { "id": 1 }, "on": [] },
            { "table": "orders" },
            "not an op",
            { "op": "insert", "table": "a.b.c", "values": { "x": 1 } },
            { "op": "insert", "table": "a.b", "values": { "x": 1 } },
            { "op": "insert", "table": "a.b", "values": { "x": 1 } },
            { "op": "insert", "table": "a.b", "values": { "x": 1 } },
            { "op": "insert", "table": "x", "values": 7 }
        ],
        "reason": "",
        "provenance": { "agent": "", "model": 4, "traceparent": "00-00" },
        "surprise": true
    });
    let invalid = validator
        .validate(document.to_string().as_bytes())
        .unwrap_err();
    let got: Vec<(&str, &str)> = invalid
        .problems
        .iter()
        .map(|p| (p.pointer.as_str(), p.message.as_str()))
        .collect();
    let expected_pointers = [
        "/id",
        "/ops/0/extra",
        "/ops/1/key",
        "/ops/1/set/bad column",
        "/ops/1/table",
        "/ops/2",
        "/ops/2",
        "/ops/3/on",
        "/ops/4",
        "/ops/5",
        "/ops/6/table",
        "/ops/10/values",
        "/provenance/agent",
        "/provenance/model",
        "/provenance/traceparent",
        "/reason",
        "/surprise",
        "/version",
    ];
    assert_eq!(
        got.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        expected_pointers,
        "{got:#?}"
    );
    // Each problem is reported once, even when two parts of the schema catch it.
    assert_eq!(got.iter().filter(|(p, _)| *p == "/ops/0/extra").count(), 1);
    assert!(got.contains(&("/ops/2", "delete op is missing required property \"table\"")));
    assert!(got.contains(&("/ops/2", "delete op is missing required property \"key\"")));
    assert!(got.contains(&("/ops/4", "op 4 is missing required property \"op\"")));
    assert!(got.contains(&("/ops/5", "op 5 must be an object, found a string")));
    assert!(got.contains(&("/ops/3/on", "on must not be empty")));
    assert!(got.contains(&("/provenance/agent", "agent must not be empty")));
    assert!(got.contains(&(
        "/provenance/model",
        "model must be a string, found a number"
    )));
    assert!(got.contains(&("/ops/10/values", "values must be an object, found a number")));
    // No generic "is not valid under any of the schemas" message.
    assert!(got.iter().all(|(_, m)| !m.contains("any of")), "{got:#?}");
}

#[test]
fn display_lists_every_problem() {
    let validator = Validator::new(Limits::default());
    let bytes = std::fs::read(support::examples_dir("invalid").join("wrong-version.json")).unwrap();
    let invalid = validator.validate(&bytes).unwrap_err();
    assert_eq!(
        invalid.to_string(),
        "invalid intent wrong-version: /version: version must be 1, found 2"
    );
    let json = serde_json::to_value(&invalid).unwrap();
    assert_eq!(json["problems"][0]["pointer"], "/version");
}
