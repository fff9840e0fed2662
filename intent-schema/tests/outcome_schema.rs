//! The published outcome schema: a valid draft 2020-12 schema, every field
//! documented, every object closed, its examples valid and its rules able to refuse;
//! and the trace id an outcome takes from an intent's `traceparent`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use airlock_intent::{Intent, OUTCOME_SCHEMA};
use serde_json::{Value, json};

fn schema() -> Value {
    serde_json::from_str(OUTCOME_SCHEMA).expect("OUTCOME_SCHEMA parses as JSON")
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft202012::new(&schema()).unwrap()
}

#[test]
fn schema_is_valid_draft_2020_12() {
    let schema = schema();
    jsonschema::draft202012::meta::validate(&schema)
        .unwrap_or_else(|e| panic!("not a valid draft 2020-12 schema: {e}"));
    assert_eq!(schema["$id"], "https://airlock.dev/schemas/outcome/v1.json");
    assert!(schema["title"].is_string());
    assert!(schema["description"].is_string());
    validator();
}

/// Calls `f` on every subschema that documents a shape (the document, its
/// properties, its definitions and their items), with its JSON pointer. The
/// conditions under `allOf` and `dependentSchemas` only relate fields already
/// documented, and are not walked.
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
            "items" => walk(value, &format!("{pointer}/{keyword}"), f),
            _ => {}
        }
    }
}

#[test]
fn every_property_has_a_description_and_every_object_is_closed() {
    let mut missing = Vec::new();
    let mut open = Vec::new();
    walk(&schema(), "", &mut |pointer, object| {
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
            if object.get("additionalProperties") != Some(&Value::Bool(false)) {
                open.push(pointer.to_owned());
            }
        }
    });
    assert!(
        missing.is_empty(),
        "properties without a description: {missing:?}"
    );
    assert!(
        open.is_empty(),
        "objects open to unknown properties: {open:?}"
    );
}

#[test]
fn schema_examples_are_valid_outcomes() {
    let schema = schema();
    let validator = validator();
    let examples = schema["examples"].as_array().unwrap();
    let states: Vec<&str> = examples
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "awaiting_review",
            "approved",
            "applied",
            "failed",
            "invalid"
        ]
    );
    for example in examples {
        let errors: Vec<String> = validator
            .iter_errors(example)
            .map(|e| format!("{}: {e}", e.instance_path().as_str()))
            .collect();
        assert!(errors.is_empty(), "{example:#}: {errors:?}");
    }
}

/// The rules between fields refuse what Airlock must never write.
#[test]
fn schema_rules_refuse_inconsistent_outcomes() {
    let validator = validator();
    let examples = schema()["examples"].as_array().unwrap().clone();
    let (review, waiting, applied, failed, invalid) = (
        &examples[0],
        &examples[1],
        &examples[2],
        &examples[3],
        &examples[4],
    );
    let refused = |base: &Value, change: &dyn Fn(&mut Value)| {
        let mut outcome = base.clone();
        change(&mut outcome);
        assert!(!validator.is_valid(&outcome), "accepted {outcome:#}");
    };
    refused(review, &|o| o["final"] = json!(true));
    refused(applied, &|o| o["final"] = json!(false));
    refused(review, &|o| {
        o.as_object_mut().unwrap().remove("review");
    });
    refused(waiting, &|o| o["state"] = json!("queued"));
    refused(applied, &|o| o["state"] = json!("approved"));
    refused(failed, &|o| {
        o.as_object_mut().unwrap().remove("retry");
    });
    refused(applied, &|o| o["retry"] = failed["retry"].clone());
    refused(invalid, &|o| {
        o.as_object_mut().unwrap().remove("problems");
    });
    refused(applied, &|o| o["surprise"] = json!(1));
    refused(applied, &|o| o["applied"]["ops"][0]["values"] = json!({}));
    refused(review, &|o| {
        o["trace_id"] = json!("4BF92F3577B34DA6A3CE929D0E0E4736")
    });
}

fn provenance(traceparent: &str) -> Intent {
    let mut document = support::base_intent();
    document["provenance"]["traceparent"] = json!(traceparent);
    serde_json::from_value(document).unwrap()
}

#[test]
fn the_trace_id_is_that_of_a_valid_traceparent_only() {
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let valid = provenance(&format!("00-{trace}-00f067aa0ba902b7-01"));
    assert_eq!(valid.provenance.trace_id(), Some(trace));
    for invalid in [
        format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
        format!("00-{trace}-{}-01", "0".repeat(16)),
        format!("ff-{trace}-00f067aa0ba902b7-01"),
    ] {
        assert_eq!(
            provenance(&invalid).provenance.trace_id(),
            None,
            "{invalid}"
        );
    }
    let none: Intent = serde_json::from_value(support::base_intent()).unwrap();
    assert_eq!(none.provenance.trace_id(), None);
}
