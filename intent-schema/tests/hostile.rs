//! Hostile input: duplicate keys, deep nesting, oversized documents, and mangled
//! bytes. The validator must answer every input with a result (never a panic or a
//! stack overflow), and the schema and the types must agree on every document.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use airlock_intent::{Intent, Invalid, Limits, SCHEMA, Validator};
use serde_json::Value;

fn validator() -> Validator {
    Validator::new(Limits::default())
}

fn only_problem(invalid: &Invalid) -> (&str, &str) {
    assert_eq!(invalid.problems.len(), 1, "{invalid}");
    let problem = &invalid.problems[0];
    (problem.pointer.as_str(), problem.message.as_str())
}

// ---------------------------------------------------------------------------------
// Duplicate keys

#[test]
fn duplicate_keys_are_refused_at_every_level() {
    let cases = [
        (
            r#"{"version":1,"id":"a","id":"b","run":"r","ops":[{"op":"delete","table":"t","key":{"id":1}}],"reason":"x","provenance":{"agent":"a"}}"#,
            "/id",
        ),
        (
            r#"{"version":1,"id":"a","run":"r","ops":[{"op":"delete","op":"insert","table":"t","key":{"id":1}}],"reason":"x","provenance":{"agent":"a"}}"#,
            "/ops/0/op",
        ),
        (
            r#"{"version":1,"id":"a","run":"r","ops":[{"op":"delete","table":"t","key":{"id":1}},{"op":"delete","table":"t","key":{"id":1,"id":2}}],"reason":"x","provenance":{"agent":"a"}}"#,
            "/ops/1/key/id",
        ),
        (
            r#"{"version":1,"id":"a","run":"r","ops":[{"op":"insert","table":"t","values":{"doc":{"a":[{"b":1,"b":2}]}}}],"reason":"x","provenance":{"agent":"a"}}"#,
            "/ops/0/values/doc/a/0/b",
        ),
        (
            r#"{"version":1,"id":"a","run":"r","ops":[{"op":"delete","table":"t","key":{"id":1}}],"reason":"x","provenance":{"agent":"a","model_parameters":{"temperature":0,"temperature":1}}}"#,
            "/provenance/model_parameters/temperature",
        ),
        (
            r#"{"version":1,"id":"a","run":"r","ops":[{"op":"delete","table":"t","key":{"id":1}}],"reason":"approve me","reason":"drop everything","provenance":{"agent":"a"}}"#,
            "/reason",
        ),
    ];
    for (text, pointer) in cases {
        // serde_json alone would accept every one of these.
        assert!(serde_json::from_str::<Value>(text).is_ok());
        let invalid = validator().validate(text.as_bytes()).unwrap_err();
        let (at, message) = only_problem(&invalid);
        assert_eq!(at, pointer, "{text}");
        let key = pointer.rsplit('/').next().unwrap();
        assert!(
            message.contains(&format!("duplicate key \"{key}\"")),
            "{message}"
        );
        assert!(message.contains("line 1 column"), "{message}");
    }
}

#[test]
fn a_duplicate_id_is_not_used_for_routing() {
    let text = r#"{"version":1,"id":"a","id":"b","run":"r","ops":[],"reason":"x","provenance":{"agent":"a"}}"#;
    let invalid = validator().validate(text.as_bytes()).unwrap_err();
    assert_eq!(invalid.id, None);
}

// ---------------------------------------------------------------------------------
// Depth

/// The base intent with `levels` nested arrays as the value of one column: the
/// document's depth is 4 + `levels` (intent, ops, op, values, then the arrays).
fn nested_intent(levels: usize) -> String {
    let nested = format!("{}1{}", "[".repeat(levels), "]".repeat(levels));
    format!(
        r#"{{"version":1,"id":"deep","run":"r","ops":[{{"op":"insert","table":"t","values":{{"v":{nested}}}}}],"reason":"x","provenance":{{"agent":"a"}}}}"#
    )
}

#[test]
fn depth_exactly_at_the_limit_passes_and_one_over_fails() {
    for max_depth in [8, 32] {
        let validator = Validator::new(Limits {
            max_depth,
            ..Limits::default()
        });
        let at_limit = nested_intent(max_depth - 4);
        validator.validate(at_limit.as_bytes()).unwrap();
        let over = nested_intent(max_depth - 3);
        let invalid = validator.validate(over.as_bytes()).unwrap_err();
        let (pointer, message) = only_problem(&invalid);
        let expected = format!("/ops/0/values/v{}", "/0".repeat(max_depth - 4));
        assert_eq!(pointer, expected);
        assert!(
            message.contains(&format!("deeper than the limit of {max_depth}")),
            "{message}"
        );
        assert_eq!(invalid.id.as_deref(), Some("deep"));
    }
}

#[test]
fn a_document_100_000_levels_deep_is_refused_without_deep_recursion() {
    let levels = 100_000;
    let arrays = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
    let objects = format!("{}1{}", r#"{"a":"#.repeat(levels), "}".repeat(levels));
    let in_intent = nested_intent(levels);
    // A small stack: the checks must stop at the depth limit, not at 100 000.
    let handle = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let validator = validator();
            [arrays, objects, in_intent].map(|text| validator.validate(text.as_bytes()))
        })
        .unwrap();
    let results = handle.join().expect("no stack overflow");
    for result in results {
        let invalid = result.unwrap_err();
        let (_, message) = only_problem(&invalid);
        assert!(message.contains("deeper than the limit of 32"), "{message}");
    }
}

// ---------------------------------------------------------------------------------
// Size and op count

#[test]
fn size_limit_is_inclusive() {
    let bytes = support::examples("valid").remove(0).1;
    let exact = Validator::new(Limits {
        max_bytes: bytes.len(),
        ..Limits::default()
    });
    exact.validate(&bytes).unwrap();
    let smaller = Validator::new(Limits {
        max_bytes: bytes.len() - 1,
        ..Limits::default()
    });
    let invalid = smaller.validate(&bytes).unwrap_err();
    let (pointer, message) = only_problem(&invalid);
    assert_eq!(pointer, "");
    assert_eq!(
        message,
        format!(
            "intent is {} bytes, more than the limit of {} bytes",
            bytes.len(),
            bytes.len() - 1
        )
    );
}

#[test]
fn a_huge_document_is_refused_unread() {
    let mut bytes = vec![b'['; 2 << 20];
    bytes.extend(vec![b']'; 2 << 20]);
    let invalid = validator().validate(&bytes).unwrap_err();
    assert!(
        only_problem(&invalid)
            .1
            .contains("more than the limit of 1048576 bytes")
    );
}

#[test]
fn max_ops_is_enforced_below_the_schema_ceiling() {
    let validator = Validator::new(Limits {
        max_ops: 2,
        ..Limits::default()
    });
    assert_eq!(validator.limits().max_ops, 2);
    let bytes = std::fs::read(support::examples_dir("valid").join("multi-op.json")).unwrap();
    let invalid = validator.validate(&bytes).unwrap_err();
    assert_eq!(
        only_problem(&invalid),
        (
            "/ops",
            "ops has 3 ops, more than this sidecar's maximum of 2"
        )
    );
    Validator::new(Limits {
        max_ops: 3,
        ..Limits::default()
    })
    .validate(&bytes)
    .unwrap();
}

// ---------------------------------------------------------------------------------
// Mangled bytes

/// Every prefix of every valid example, and every example with one byte changed in
/// several ways, deterministically. Each variant is passed to `check`.
fn for_each_mangled(mut check: impl FnMut(&[u8])) -> usize {
    const REPLACEMENTS: &[u8] = b"\"\\{],0\xff";
    let mut count = 0;
    for (_, bytes) in support::examples("valid") {
        for end in 0..bytes.len() {
            check(&bytes[..end]);
            count += 1;
        }
        let mut mangled = bytes.clone();
        for i in 0..bytes.len() {
            for mask in [0x01, 0x20] {
                mangled[i] = bytes[i] ^ mask;
                check(&mangled);
                count += 1;
            }
            for &replacement in REPLACEMENTS {
                mangled[i] = replacement;
                check(&mangled);
                count += 1;
            }
            mangled[i] = bytes[i];
        }
    }
    count
}

#[test]
fn mangled_examples_never_panic() {
    let validator = validator();
    let (mut accepted, mut refused) = (0, 0);
    let count = for_each_mangled(|bytes| match validator.validate(bytes) {
        Ok(_) => accepted += 1,
        Err(invalid) => {
            assert!(!invalid.problems.is_empty());
            refused += 1;
        }
    });
    assert_eq!(accepted + refused, count);
    // Some mutations keep the document valid (a changed letter in a value) and most
    // do not: both paths were exercised.
    assert!(
        accepted > 100 && refused > 1000,
        "accepted {accepted}, refused {refused}"
    );
}

// ---------------------------------------------------------------------------------
// Schema and types agree

/// Whether the schema and the types give the same verdict on `document`.
fn verdicts(schema: &jsonschema::Validator, document: &Value) -> (bool, bool) {
    let by_schema = schema.is_valid(document);
    let by_types = serde_json::from_value::<Intent>(document.clone()).is_ok();
    (by_schema, by_types)
}

fn compiled_schema() -> jsonschema::Validator {
    jsonschema::draft202012::new(&serde_json::from_str(SCHEMA).unwrap()).unwrap()
}

#[test]
fn schema_and_types_agree_on_mangled_documents() {
    let schema = compiled_schema();
    let mut checked = 0;
    let mut valid = 0;
    for_each_mangled(|bytes| {
        let Ok(document) = serde_json::from_slice::<Value>(bytes) else {
            return;
        };
        let (by_schema, by_types) = verdicts(&schema, &document);
        assert_eq!(
            by_schema,
            by_types,
            "schema says {by_schema}, types say {by_types}: {}",
            String::from_utf8_lossy(bytes)
        );
        checked += 1;
        valid += usize::from(by_schema);
    });
    assert!(
        checked > 1000 && valid > 100,
        "checked {checked}, valid {valid}"
    );
}

#[test]
fn schema_and_types_agree_on_edge_cases() {
    let schema = compiled_schema();
    let long = |n: usize| Value::String("a".repeat(n));
    let cases: Vec<(&str, Value, bool)> = vec![
        ("/version", serde_json::json!(1.0), true),
        ("/version", serde_json::json!(2), false),
        ("/version", serde_json::json!("1"), false),
        ("/version", serde_json::json!(-1), false),
        ("/id", serde_json::json!(".hidden"), false),
        ("/id", serde_json::json!("a.b:c-d_e"), true),
        ("/id", serde_json::json!(""), false),
        ("/id", long(128), true),
        ("/id", long(129), false),
        ("/id", serde_json::json!("é"), false),
        ("/id", serde_json::json!("a\n"), false),
        ("/run", serde_json::json!(".run"), true),
        ("/run", long(129), false),
        ("/target", serde_json::json!("pg-main_2"), true),
        ("/target", serde_json::json!("a.b"), false),
        ("/target", long(65), false),
        ("/target", Value::Null, false),
        ("/reason", serde_json::json!(" \t "), false),
        ("/reason", serde_json::json!("ok\n"), true),
        ("/reason", Value::Null, false),
        ("/ops", serde_json::json!([]), false),
        ("/ops/0/table", serde_json::json!("s.t"), true),
        ("/ops/0/table", serde_json::json!("s.t.u"), false),
        ("/ops/0/table", serde_json::json!(".t"), false),
        ("/ops/0/table", serde_json::json!("t."), false),
        ("/ops/0/table", serde_json::json!("_t9"), true),
        ("/ops/0/table", serde_json::json!("9t"), false),
        ("/ops/0/table", long(63), true),
        ("/ops/0/table", long(64), false),
        ("/ops/0/table", serde_json::json!("\"t\""), false),
        ("/ops/0/values", serde_json::json!({}), false),
        ("/ops/0/values", serde_json::json!({"a b": 1}), false),
        (
            "/ops/0/values",
            serde_json::json!({"a": null, "b": [1, {"c": 2}]}),
            true,
        ),
        (
            "/ops/0/values",
            serde_json::json!({ "x".repeat(63): 1 }),
            true,
        ),
        (
            "/ops/0/values",
            serde_json::json!({ "x".repeat(64): 1 }),
            false,
        ),
        ("/ops/0/values", serde_json::json!([1]), false),
        ("/ops/0/op", serde_json::json!("INSERT"), false),
        ("/ops/0/key", serde_json::json!({"id": 1}), false),
        ("/ops/0/expect", serde_json::json!({"id": 1}), false),
        ("/provenance/agent", serde_json::json!(""), false),
        ("/provenance/agent", serde_json::json!(" "), true),
        ("/provenance/model", Value::Null, false),
        ("/provenance/model_parameters", Value::Null, false),
        ("/provenance/model_parameters", serde_json::json!({}), true),
        ("/provenance/model_parameters", serde_json::json!([]), false),
        ("/provenance/prompt_digest", serde_json::json!(7), false),
        ("/provenance/tool_call_id", Value::Null, false),
        (
            "/provenance/traceparent",
            serde_json::json!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            true,
        ),
        (
            "/provenance/traceparent",
            serde_json::json!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n"),
            false,
        ),
        (
            "/provenance/traceparent",
            serde_json::json!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1"),
            false,
        ),
        (
            "/provenance/traceparent",
            serde_json::json!("00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            false,
        ),
        (
            "/provenance/traceparent",
            serde_json::json!("0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            false,
        ),
        ("/provenance/traceparent", Value::Null, false),
        ("/provenance/extra", serde_json::json!(1), false),
        ("/extra", serde_json::json!(1), false),
    ];
    let upsert = |on: Value| {
        let mut document = support::base_intent();
        document["ops"][0] = serde_json::json!({
            "op": "upsert", "table": "t", "values": {"id": 1}, "on": on
        });
        document
    };
    let update_expect = |expect: Value| {
        let mut document = support::base_intent();
        document["ops"][0] = serde_json::json!({
            "op": "update", "table": "t", "key": {"id": 1}, "set": {"a": 1}, "expect": expect
        });
        document
    };
    let mut documents: Vec<(String, Value, bool)> = cases
        .into_iter()
        .map(|(pointer, value, valid)| {
            let mut document = support::base_intent();
            let (parent, field) = pointer.rsplit_once('/').unwrap();
            let parent = document.pointer_mut(parent).unwrap();
            match parent {
                Value::Object(object) => {
                    object.insert(field.to_owned(), value.clone());
                }
                Value::Array(array) => array[field.parse::<usize>().unwrap()] = value.clone(),
                _ => unreachable!(),
            }
            (format!("{pointer} = {value}"), document, valid)
        })
        .collect();
    documents.extend([
        (
            "on = [\"id\"]".to_owned(),
            upsert(serde_json::json!(["id"])),
            true,
        ),
        ("on = []".to_owned(), upsert(serde_json::json!([])), false),
        (
            "on = [\"id\", \"id\"]".to_owned(),
            upsert(serde_json::json!(["id", "id"])),
            false,
        ),
        (
            "on = [\"1d\"]".to_owned(),
            upsert(serde_json::json!(["1d"])),
            false,
        ),
        (
            "on = \"id\"".to_owned(),
            upsert(serde_json::json!("id")),
            false,
        ),
        (
            "expect = {}".to_owned(),
            update_expect(serde_json::json!({})),
            false,
        ),
        (
            "expect = null".to_owned(),
            update_expect(Value::Null),
            false,
        ),
        (
            "expect = {\"a\": 0}".to_owned(),
            update_expect(serde_json::json!({"a": 0})),
            true,
        ),
    ]);
    for field in ["version", "id", "run", "ops", "reason", "provenance"] {
        let mut document = support::base_intent();
        document.as_object_mut().unwrap().remove(field);
        documents.push((format!("without {field}"), document, false));
    }
    for (what, document, valid) in documents {
        let (by_schema, by_types) = verdicts(&schema, &document);
        assert_eq!((by_schema, by_types), (valid, valid), "{what}");
    }
}

/// System catalogs and Airlock's own tables are refused at validation, in every
/// spelling of case, each with the pointer of the op's table.
#[test]
fn system_catalogs_are_refused_in_every_case() {
    let validator = Validator::new(Limits::default());
    for table in [
        "pg_catalog.pg_authid",
        "PG_CATALOG.pg_class",
        "Pg_Toast.pg_toast_1255",
        "pg_temp_3.t",
        "pg_toast_temp_1.t",
        "information_schema.tables",
        "INFORMATION_SCHEMA.columns",
        "airlock.ledger",
        "AIRLOCK.schema_version",
        "sqlite_master",
        "SQLITE_MASTER",
        "main.sqlite_schema",
        "temp.sqlite_temp_master",
        "sqlite_sequence",
        "airlock_ledger",
        "main.Airlock_Schema",
    ] {
        let doc = serde_json::json!({
            "version": 1, "id": "i", "run": "r",
            "ops": [
                {"op": "insert", "table": "customers", "values": {"id": 1}},
                {"op": "delete", "table": table, "key": {"id": 1}}
            ],
            "reason": "r", "provenance": {"agent": "a"}
        });
        let invalid = validator
            .validate(doc.to_string().as_bytes())
            .expect_err(table);
        assert_eq!(invalid.problems.len(), 1, "{table}: {invalid}");
        assert_eq!(invalid.problems[0].pointer, "/ops/1/table", "{table}");
        assert!(
            invalid.problems[0].message.contains("is reserved"),
            "{table}: {invalid}"
        );
    }
    // Ordinary names that merely look alike pass.
    for table in [
        "pgx.t",
        "public.pg_stats_copy",
        "sqlitex",
        "airlock_notes",
        "airlockx.t",
    ] {
        let doc = serde_json::json!({
            "version": 1, "id": "i", "run": "r",
            "ops": [{"op": "delete", "table": table, "key": {"id": 1}}],
            "reason": "r", "provenance": {"agent": "a"}
        });
        validator
            .validate(doc.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{table}: {e}"));
    }
}
