//! The published schema itself: a valid draft 2020-12 schema, documented, closed,
//! and in agreement with its own examples and with the Rust types.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use airlock_intent::{Intent, Limits, SCHEMA, Validator};
use serde_json::Value;

fn schema() -> Value {
    serde_json::from_str(SCHEMA).expect("SCHEMA parses as JSON")
}

#[test]
fn schema_is_valid_draft_2020_12() {
    let schema = schema();
    jsonschema::draft202012::meta::validate(&schema)
        .unwrap_or_else(|e| panic!("not a valid draft 2020-12 schema: {e}"));
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_eq!(schema["$id"], "https://airlock.dev/schemas/intent/v1.json");
    assert!(schema["title"].is_string());
    assert!(schema["description"].is_string());
    // It compiles with no network access (no remote $refs).
    jsonschema::draft202012::new(&schema).unwrap();
}

/// Calls `f` on every subschema (object) of `schema`, with its JSON pointer.
fn walk(schema: &Value, pointer: &str, f: &mut dyn FnMut(&str, &serde_json::Map<String, Value>)) {
    let Value::Object(object) = schema else {
        return;
    };
    f(pointer, object);
    for (keyword, value) in object {
        match keyword.as_str() {
            "properties" | "$defs" => {
                for (name, sub) in value.as_object().unwrap() {
                    walk(sub, &format!("{pointer}/{keyword}/{name}"), f);
                }
            }
            "allOf" | "anyOf" | "oneOf" => {
                for (i, sub) in value.as_array().unwrap().iter().enumerate() {
                    walk(sub, &format!("{pointer}/{keyword}/{i}"), f);
                }
            }
            "items" | "propertyNames" | "if" | "then" | "else" | "not" => {
                walk(value, &format!("{pointer}/{keyword}"), f);
            }
            _ => {}
        }
    }
}

#[test]
fn every_property_has_a_description() {
    let mut missing = Vec::new();
    walk(&schema(), "", &mut |pointer, object| {
        if pointer.ends_with("/if") {
            return; // `if` only tests the op's kind.
        }
        if let Some(properties) = object.get("properties").and_then(Value::as_object) {
            for (name, property) in properties {
                if property
                    .get("description")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    missing.push(format!("{pointer}/properties/{name}"));
                }
            }
        }
    });
    assert!(
        missing.is_empty(),
        "properties without a description: {missing:?}"
    );
}

#[test]
fn every_object_with_properties_is_closed() {
    let mut open = Vec::new();
    walk(&schema(), "", &mut |pointer, object| {
        if pointer.ends_with("/if") {
            return;
        }
        if object.contains_key("properties")
            && object.get("additionalProperties") != Some(&Value::Bool(false))
        {
            open.push(pointer.to_owned());
        }
    });
    assert!(
        open.is_empty(),
        "objects open to unknown properties: {open:?}"
    );
}

#[test]
fn schema_examples_are_valid_intents() {
    let schema = schema();
    let validator = Validator::new(Limits::default());
    let examples = schema["examples"].as_array().unwrap();
    assert!(!examples.is_empty());
    for example in examples {
        let intent = validator.validate(example.to_string().as_bytes()).unwrap();
        assert_eq!(
            serde_json::from_value::<Intent>(example.clone()).unwrap(),
            intent
        );
    }
}

#[test]
fn target_defaults_to_default() {
    let schema = schema();
    assert_eq!(schema["properties"]["target"]["default"], "default");
    let mut document = support::base_intent();
    document.as_object_mut().unwrap().remove("target");
    let intent = Validator::new(Limits::default())
        .validate(document.to_string().as_bytes())
        .unwrap();
    assert_eq!(intent.target.as_str(), "default");
}

#[test]
fn ops_ceiling_is_1000_in_schema_and_types() {
    assert_eq!(schema()["properties"]["ops"]["maxItems"], 1000);
    let validator = Validator::new(Limits {
        max_ops: 1000,
        ..Limits::default()
    });
    let with_ops = |n: usize| {
        let mut document = support::base_intent();
        let op = document["ops"][0].clone();
        document["ops"] = Value::Array(vec![op; n]);
        document
    };
    assert!(
        validator
            .validate(with_ops(1000).to_string().as_bytes())
            .is_ok()
    );
    let invalid = validator
        .validate(with_ops(1001).to_string().as_bytes())
        .unwrap_err();
    assert_eq!(invalid.problems.len(), 2, "{invalid}"); // the schema's ceiling and the sidecar's
    assert!(invalid.problems.iter().all(|p| p.pointer == "/ops"));
    assert!(serde_json::from_value::<Intent>(with_ops(1000)).is_ok());
    assert!(serde_json::from_value::<Intent>(with_ops(1001)).is_err());
}

/// The schema's `nonBlank` pattern lists the whitespace characters explicitly; this
/// proves the list is exactly Rust's `char::is_whitespace` (Unicode `White_Space`),
/// which is what the types check, over every Unicode scalar value.
#[test]
fn non_blank_pattern_is_exactly_unicode_white_space() {
    let full = schema();
    let non_blank = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": "#/$defs/nonBlank",
        "$defs": full["$defs"].clone(),
    });
    let non_blank = jsonschema::draft202012::new(&non_blank).unwrap();
    let mut disagree = Vec::new();
    let mut buffer = [0u8; 4];
    for c in (0..=0x10FFFF).filter_map(char::from_u32) {
        let text = Value::String(c.encode_utf8(&mut buffer).to_owned());
        if non_blank.is_valid(&text) == c.is_whitespace() {
            disagree.push(format!("U+{:04X}", c as u32));
        }
    }
    assert!(
        disagree.is_empty(),
        "schema and char::is_whitespace disagree on {disagree:?}"
    );
    // And the full path agrees for a reason made only of whitespace (and of BOMs,
    // which ECMAScript's \s would call whitespace but Unicode does not).
    let validator = Validator::new(Limits::default());
    for (reason, valid) in [
        (" \u{a0}\u{2028}\u{3000}\u{85}", false),
        ("\u{feff}", true),
        (" x ", true),
    ] {
        let mut document = support::base_intent();
        document["reason"] = Value::String(reason.to_owned());
        let bytes = document.to_string();
        assert_eq!(
            validator.validate(bytes.as_bytes()).is_ok(),
            valid,
            "{reason:?}"
        );
        assert_eq!(
            serde_json::from_str::<Intent>(&bytes).is_ok(),
            valid,
            "{reason:?}"
        );
    }
}
