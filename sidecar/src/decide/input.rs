//! The policy input document, version 2: what a policy sees about one intent. Pure.
//!
//! ```json
//! {
//!   "version": 2,
//!   "intent": { ...the intent exactly as the types serialise it... },
//!   "run": {"id": "run-7", "counts": {"applied": 3, "awaiting_review": 1}},
//!   "envelope": {"digest": "sha256:…", "keyid": "…"},
//!   "file": "0001-add-customer.json",
//!   "target": "default",
//!   "ops": [{"index": 0, "kind": "insert", "schema": "crm", "table": "customers",
//!            "columns": ["id", "name"], "spelled": "CRM.Customers"}]
//! }
//! ```
//!
//! `ops` is a flattened view of `intent.ops` so policies need not know each op's
//! shape, and it holds the names **the database will use** (DESIGN invariant 3):
//! `schema`, `table` and `columns` (the columns the op writes, empty for a delete)
//! as the target's catalog stores them, resolved before the decision
//! ([`crate::apply::Target::resolve`]); `spelled` is the table as the agent wrote
//! it. So a rule on `audit_log` holds for `AUDIT_LOG`, `main.Audit_Log` or an
//! unqualified name found through PostgreSQL's `search_path` alike. Version 1 showed
//! the spelling only, which SQLite's case-insensitive names let an agent bypass.
//! `examples/policies/README.md` documents every field for policy authors; changing
//! the shape means a new `version`.
//!
//! Without resolved names ([`InputContext::names`] is `None`: `airlock policy eval`
//! with no target to ask) each op shows its spelling in their place, `schema` null
//! when unqualified; the daemon never decides on such a document.
//!
//! This runs once per intent on the hot path, so the document is built directly as a
//! [`serde_json::Value`], never through a string. The intent's fields are
//! destructured exhaustively, so adding a field to the intent types fails to compile
//! here until the policy input says what to do with it.

use std::collections::BTreeMap;

use airlock_intent::{Intent, Op, Provenance};
use serde_json::{Map, Value};

use crate::apply::{ApplyError, Preview, ResolvedOp};

/// The version of the input document built by [`build_input`].
pub const INPUT_VERSION: u64 = 2;

/// Everything the input document is built from.
#[derive(Clone, Copy, Debug)]
pub struct InputContext<'a> {
    /// The intent being decided.
    pub intent: &'a Intent,
    /// How many intents of this run are in each state, by state name.
    pub run_counts: &'a BTreeMap<String, u64>,
    /// `sha256:<hex>` of the exact bytes the agent wrote.
    pub digest: &'a str,
    /// The key id of the envelope's signature, if it has one.
    pub keyid: Option<&'a str>,
    /// The name of the file the intent arrived in.
    pub file: &'a str,
    /// The target database the intent will be applied to.
    pub target: &'a str,
    /// The `preview` member (see [`preview_json`]), present only when the
    /// configuration asks for previews (`[policy] preview = true`).
    pub preview: Option<&'a Value>,
    /// Each op's names resolved against the target's catalog, one per op in order
    /// (see [`crate::apply::Target::resolve`]). The daemon always gives them; `None`
    /// shows the agent's spelling instead (a tool without a target to ask).
    pub names: Option<&'a [ResolvedOp]>,
}

/// Builds the input document, version 2, for one intent.
pub fn build_input(ctx: &InputContext<'_>) -> Value {
    let intent = ctx.intent;
    let counts: Map<String, Value> = ctx
        .run_counts
        .iter()
        .map(|(state, n)| (state.clone(), Value::from(*n)))
        .collect();
    let ops: Vec<Value> = intent
        .ops
        .iter()
        .enumerate()
        .map(|(index, op)| op_summary(index, op, ctx.names.and_then(|n| n.get(index))))
        .collect();

    let mut run = Map::with_capacity(2);
    run.insert("id".into(), intent.run.as_str().into());
    run.insert("counts".into(), Value::Object(counts));

    let mut envelope = Map::with_capacity(2);
    envelope.insert("digest".into(), ctx.digest.into());
    envelope.insert("keyid".into(), ctx.keyid.map_or(Value::Null, Value::from));

    let mut doc = Map::with_capacity(7);
    doc.insert("version".into(), INPUT_VERSION.into());
    doc.insert("intent".into(), intent_json(intent));
    doc.insert("run".into(), Value::Object(run));
    doc.insert("envelope".into(), Value::Object(envelope));
    doc.insert("file".into(), ctx.file.into());
    doc.insert("target".into(), ctx.target.into());
    doc.insert("ops".into(), Value::Array(ops));
    if let Some(preview) = ctx.preview {
        doc.insert("preview".into(), preview.clone());
    }
    Value::Object(doc)
}

/// The input's `preview` member: what applying the intent would do, from a
/// rolled-back apply. `{"ops": [{"index", "rows", "before": [...], "after": [...]}]}`,
/// where `before` and `after` list the rows each op would touch as they were and as
/// they would be (an inserted row has no before, a deleted row no after); or, when
/// applying would fail, `{"error": {"op", "code", "message"}}` (`op` and `code` may
/// be null).
pub fn preview_json(preview: Result<&Preview, &ApplyError>) -> Value {
    match preview {
        Ok(preview) => {
            let ops = preview
                .ops
                .iter()
                .map(|op| {
                    let before: Vec<Value> = op
                        .images
                        .iter()
                        .filter_map(|i| i.before.clone().map(Value::Object))
                        .collect();
                    let after: Vec<Value> = op
                        .images
                        .iter()
                        .filter_map(|i| i.after.clone().map(Value::Object))
                        .collect();
                    let mut doc = Map::with_capacity(4);
                    doc.insert("index".into(), op.index.into());
                    doc.insert("rows".into(), op.rows.into());
                    doc.insert("before".into(), Value::Array(before));
                    doc.insert("after".into(), Value::Array(after));
                    Value::Object(doc)
                })
                .collect();
            let mut doc = Map::with_capacity(1);
            doc.insert("ops".into(), Value::Array(ops));
            Value::Object(doc)
        }
        Err(error) => {
            let mut detail = Map::with_capacity(3);
            detail.insert("op".into(), error.op.map_or(Value::Null, Value::from));
            detail.insert(
                "code".into(),
                error.code.as_deref().map_or(Value::Null, Value::from),
            );
            detail.insert("message".into(), error.message.clone().into());
            let mut doc = Map::with_capacity(1);
            doc.insert("error".into(), Value::Object(detail));
            Value::Object(doc)
        }
    }
}

/// One entry of the flattened `ops` view: the canonical names when resolved, else
/// the spelling.
fn op_summary(index: usize, op: &Op, names: Option<&ResolvedOp>) -> Value {
    let spelled = op.table();
    let (schema, table, columns) = match names {
        Some(names) => (
            Value::from(names.schema.as_str()),
            Value::from(names.table.as_str()),
            names
                .columns
                .iter()
                .map(|c| Value::from(c.as_str()))
                .collect(),
        ),
        None => (
            spelled.schema().map_or(Value::Null, Value::from),
            Value::from(spelled.name()),
            op.columns_written().into_iter().map(Value::from).collect(),
        ),
    };
    let mut summary = Map::with_capacity(6);
    summary.insert("index".into(), index.into());
    summary.insert("kind".into(), op.kind().as_str().into());
    summary.insert("schema".into(), schema);
    summary.insert("table".into(), table);
    summary.insert("columns".into(), Value::Array(columns));
    summary.insert("spelled".into(), spelled.as_str().into());
    Value::Object(summary)
}

/// The intent as JSON, identical to what its `Serialize` impl produces (a test holds
/// the two together).
fn intent_json(intent: &Intent) -> Value {
    let Intent {
        version,
        id,
        run,
        target,
        ops,
        reason,
        provenance,
    } = intent;
    let mut doc = Map::with_capacity(7);
    doc.insert("version".into(), (*version).into());
    doc.insert("id".into(), id.as_str().into());
    doc.insert("run".into(), run.as_str().into());
    doc.insert("target".into(), target.as_str().into());
    doc.insert(
        "ops".into(),
        Value::Array(ops.iter().map(op_json).collect()),
    );
    doc.insert("reason".into(), reason.as_str().into());
    doc.insert("provenance".into(), provenance_json(provenance));
    Value::Object(doc)
}

fn op_json(op: &Op) -> Value {
    let mut doc = Map::with_capacity(5);
    doc.insert("op".into(), op.kind().as_str().into());
    match op {
        Op::Insert { table, values } => {
            doc.insert("table".into(), table.as_str().into());
            doc.insert("values".into(), Value::Object(values.clone()));
        }
        Op::Update {
            table,
            key,
            set,
            expect,
        } => {
            doc.insert("table".into(), table.as_str().into());
            doc.insert("key".into(), Value::Object(key.clone()));
            doc.insert("set".into(), Value::Object(set.clone()));
            if let Some(expect) = expect {
                doc.insert("expect".into(), Value::Object(expect.clone()));
            }
        }
        Op::Delete { table, key, expect } => {
            doc.insert("table".into(), table.as_str().into());
            doc.insert("key".into(), Value::Object(key.clone()));
            if let Some(expect) = expect {
                doc.insert("expect".into(), Value::Object(expect.clone()));
            }
        }
        Op::Upsert { table, values, on } => {
            doc.insert("table".into(), table.as_str().into());
            doc.insert("values".into(), Value::Object(values.clone()));
            let on = on.iter().map(|c| Value::from(c.as_str())).collect();
            doc.insert("on".into(), Value::Array(on));
        }
    }
    Value::Object(doc)
}

fn provenance_json(provenance: &Provenance) -> Value {
    let Provenance {
        agent,
        model,
        model_parameters,
        prompt_digest,
        tool_call_id,
        traceparent,
    } = provenance;
    let mut doc = Map::with_capacity(6);
    doc.insert("agent".into(), agent.as_str().into());
    let optional = [
        ("model", model),
        ("prompt_digest", prompt_digest),
        ("tool_call_id", tool_call_id),
        ("traceparent", traceparent),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            doc.insert(key.into(), value.as_str().into());
        }
    }
    if let Some(parameters) = model_parameters {
        doc.insert("model_parameters".into(), Value::Object(parameters.clone()));
    }
    Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn intent(value: Value) -> Intent {
        serde_json::from_value(value).unwrap()
    }

    fn every_field() -> Intent {
        intent(json!({
            "version": 1,
            "id": "i-1",
            "run": "run-7",
            "target": "crm",
            "ops": [
                {"op": "insert", "table": "crm.customers", "values": {"id": 1, "name": "Ada"}},
                {"op": "update", "table": "customers", "key": {"id": 1},
                 "set": {"name": "Ada L", "tier": 2}, "expect": {"name": "Ada"}},
                {"op": "update", "table": "customers", "key": {"id": 2}, "set": {"x": null}},
                {"op": "delete", "table": "orders", "key": {"id": 9}, "expect": {"state": "open"}},
                {"op": "delete", "table": "orders", "key": {"id": 10}},
                {"op": "upsert", "table": "public.tags", "values": {"k": "a", "v": [1, 2]},
                 "on": ["k"]}
            ],
            "reason": "customer asked",
            "provenance": {
                "agent": "support-bot",
                "model": "m-1",
                "model_parameters": {"temperature": 0.2},
                "prompt_digest": "sha256:00",
                "tool_call_id": "call_1",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            }
        }))
    }

    fn build(intent: &Intent, counts: &BTreeMap<String, u64>, keyid: Option<&str>) -> Value {
        build_input(&InputContext {
            intent,
            run_counts: counts,
            digest: "sha256:abcd",
            keyid,
            file: "0001.json",
            target: "crm",
            preview: None,
            names: None,
        })
    }

    #[test]
    fn intent_matches_its_serde_form() {
        let full = every_field();
        let minimal = intent(json!({
            "version": 1, "id": "i-2", "run": "r",
            "ops": [{"op": "delete", "table": "t", "key": {"id": 1}}],
            "reason": "r", "provenance": {"agent": "a"}
        }));
        for intent in [full, minimal] {
            let doc = build(&intent, &BTreeMap::new(), None);
            assert_eq!(doc["intent"], serde_json::to_value(&intent).unwrap());
        }
    }

    #[test]
    fn document_shape() {
        let intent = every_field();
        let counts = BTreeMap::from([("applied".to_owned(), 3), ("queued".to_owned(), 1)]);
        let doc = build(&intent, &counts, Some("key-1"));
        assert_eq!(doc["version"], 2);
        assert_eq!(
            doc["run"],
            json!({"id": "run-7", "counts": {"applied": 3, "queued": 1}})
        );
        assert_eq!(
            doc["envelope"],
            json!({"digest": "sha256:abcd", "keyid": "key-1"})
        );
        assert_eq!(doc["file"], "0001.json");
        assert_eq!(doc["target"], "crm");
        // Without resolved names: the spelling.
        assert_eq!(
            doc["ops"],
            json!([
                {"index": 0, "kind": "insert", "schema": "crm", "table": "customers",
                 "columns": ["id", "name"], "spelled": "crm.customers"},
                {"index": 1, "kind": "update", "schema": null, "table": "customers",
                 "columns": ["name", "tier"], "spelled": "customers"},
                {"index": 2, "kind": "update", "schema": null, "table": "customers",
                 "columns": ["x"], "spelled": "customers"},
                {"index": 3, "kind": "delete", "schema": null, "table": "orders",
                 "columns": [], "spelled": "orders"},
                {"index": 4, "kind": "delete", "schema": null, "table": "orders",
                 "columns": [], "spelled": "orders"},
                {"index": 5, "kind": "upsert", "schema": "public", "table": "tags",
                 "columns": ["k", "v"], "spelled": "public.tags"}
            ])
        );
        let mut keys: Vec<&str> = doc
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "envelope", "file", "intent", "ops", "run", "target", "version"
            ]
        );
    }

    #[test]
    fn resolved_names_replace_the_spelling() {
        let intent = intent(json!({
            "version": 1, "id": "i-3", "run": "r",
            "ops": [
                {"op": "update", "table": "main.AUDIT_LOG", "key": {"id": 1},
                 "set": {"message": "x"}},
                {"op": "delete", "table": "Audit_Log", "key": {"id": 1}}
            ],
            "reason": "r", "provenance": {"agent": "a"}
        }));
        let resolved = |spelled: &str, columns: &[&str]| ResolvedOp {
            spelled: spelled.to_owned(),
            schema: "main".to_owned(),
            table: "audit_log".to_owned(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
        };
        let names = [
            resolved("main.AUDIT_LOG", &["message"]),
            resolved("Audit_Log", &[]),
        ];
        let doc = build_input(&InputContext {
            intent: &intent,
            run_counts: &BTreeMap::new(),
            digest: "sha256:abcd",
            keyid: None,
            file: "f.json",
            target: "default",
            preview: None,
            names: Some(&names),
        });
        assert_eq!(
            doc["ops"],
            json!([
                {"index": 0, "kind": "update", "schema": "main", "table": "audit_log",
                 "columns": ["message"], "spelled": "main.AUDIT_LOG"},
                {"index": 1, "kind": "delete", "schema": "main", "table": "audit_log",
                 "columns": [], "spelled": "Audit_Log"}
            ])
        );
        // The intent itself is still exactly what the agent wrote.
        assert_eq!(doc["intent"]["ops"][0]["table"], "main.AUDIT_LOG");
    }

    #[test]
    fn preview_is_present_only_when_given() {
        use crate::apply::{OpPreview, UndoImage, codes};
        let intent = every_field();
        let counts = BTreeMap::new();
        let row = |tier: &str| json!({"id": 1, "tier": tier}).as_object().unwrap().clone();
        let preview = Preview {
            already: false,
            ops: vec![OpPreview {
                index: 1,
                rows: 1,
                images: vec![UndoImage {
                    op: 1,
                    table: "customers".into(),
                    key: json!({"id": 1}).as_object().unwrap().clone(),
                    before: Some(row("gold")),
                    after: Some(row("silver")),
                }],
            }],
        };
        let shown = preview_json(Ok(&preview));
        assert_eq!(
            shown,
            json!({"ops": [{"index": 1, "rows": 1,
                "before": [{"id": 1, "tier": "gold"}], "after": [{"id": 1, "tier": "silver"}]}]})
        );
        let doc = build_input(&InputContext {
            intent: &intent,
            run_counts: &counts,
            digest: "sha256:abcd",
            keyid: None,
            file: "0001.json",
            target: "crm",
            preview: Some(&shown),
            names: None,
        });
        assert_eq!(doc["preview"], shown);
        assert!(build(&intent, &counts, None).get("preview").is_none());

        let error = ApplyError::permanent("key matched no row").with_code(codes::NO_ROW);
        assert_eq!(
            preview_json(Err(&error)),
            json!({"error": {"op": null, "code": "AIRLOCK_NO_ROW",
                "message": "key matched no row"}})
        );
    }

    #[test]
    fn missing_keyid_is_null() {
        let doc = build(&every_field(), &BTreeMap::new(), None);
        assert_eq!(doc["envelope"]["keyid"], Value::Null);
        assert_eq!(doc["run"]["counts"], json!({}));
    }

    #[test]
    fn the_published_schema_names_exactly_the_stored_states() {
        // A state the queue never writes must not be promised to policy authors.
        let schema: Value =
            serde_json::from_str(include_str!("../../../examples/policies/input.schema.json"))
                .unwrap();
        let names = &schema["properties"]["run"]["properties"]["counts"]["propertyNames"]["enum"];
        let stored: Vec<&str> = crate::lifecycle::State::ALL
            .iter()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(names, &json!(stored));
    }
}
