//! The SQLite target against real database files: what each op writes, the undo
//! images it records, the checks that fail an intent, atomicity and exactly-once.
#![allow(clippy::unwrap_used)] // Test helpers, not only `#[test]` functions, unwrap.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use airlock::apply::{ApplyError, ApplyMeta, ErrorKind, SqliteTarget, Target, codes, open};
use airlock_intent::{Intent, Op, TableName};
use rusqlite::Connection;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

struct Db {
    _dir: TempDir,
    path: PathBuf,
    target: Arc<dyn Target>,
}

const SCHEMA: &str = "
    CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT UNIQUE, tier TEXT);
    CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL,
                        total_cents INTEGER NOT NULL, status TEXT NOT NULL);
    CREATE TABLE events(message TEXT);
    CREATE TABLE notes(body);
    CREATE TABLE tags(name TEXT PRIMARY KEY, uses INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
    CREATE VIEW open_orders AS SELECT * FROM orders WHERE status = 'open';
    INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com', 'gold'),
                                 (2, 'Grace', 'grace@example.com', NULL);
    INSERT INTO orders VALUES (7, 1, 1500, 'open'), (8, 1, 2500, 'open'), (9, 2, 900, 'paid');
";

fn setup() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("target.db");
    Connection::open(&path)
        .unwrap()
        .execute_batch(SCHEMA)
        .unwrap();
    // An absolute path: sqlite:///tmp/.../target.db
    let url = format!("sqlite://{}", path.display());
    assert!(url.starts_with("sqlite:///"), "{url}");
    let target = open("default", &url).unwrap();
    Db {
        _dir: dir,
        path,
        target,
    }
}

fn intent(id: &str, ops: Value) -> Intent {
    serde_json::from_value(json!({
        "version": 1,
        "id": id,
        "run": "run-1",
        "ops": ops,
        "reason": "test",
        "provenance": {"agent": "test-agent"},
    }))
    .unwrap()
}

/// An intent built directly in Rust, bypassing the checks deserialisation makes, to
/// show the target refuses what the types would never let through (defence in depth).
fn unchecked(id: &str, op: Op) -> Intent {
    let mut i = intent(
        id,
        json!([{"op": "insert", "table": "orders", "values": {"id": 1}}]),
    );
    i.ops = vec![op];
    i
}

fn row(value: Value) -> serde_json::Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

/// The digest of an intent's bytes, as the queue would compute it.
fn meta(intent: &Intent) -> ApplyMeta {
    let bytes = serde_json::to_vec(intent).unwrap();
    ApplyMeta::new(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
}

/// Rows of a query, each as a JSON array, read over a separate connection.
fn rows(path: &Path, sql: &str) -> Vec<Value> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let width = stmt.column_count();
    stmt.query_map([], |row| {
        Ok(Value::Array(
            (0..width)
                .map(|i| match row.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(n) => json!(n),
                    rusqlite::types::ValueRef::Real(f) => json!(f),
                    rusqlite::types::ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
                    rusqlite::types::ValueRef::Blob(_) => json!("<blob>"),
                })
                .collect(),
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn ledger_rows(path: &Path) -> Vec<Value> {
    rows(
        path,
        "SELECT intent_id, run, digest FROM airlock_ledger ORDER BY intent_id",
    )
}

/// Everything in every table, to compare before and after a failure.
fn snapshot(path: &Path) -> Vec<Value> {
    [
        "SELECT * FROM customers ORDER BY id",
        "SELECT * FROM orders ORDER BY id",
        "SELECT rowid, * FROM events ORDER BY rowid",
        "SELECT rowid, * FROM notes ORDER BY rowid",
        "SELECT * FROM tags ORDER BY name",
    ]
    .into_iter()
    .flat_map(|sql| rows(path, sql))
    .collect()
}

async fn apply_err(db: &Db, intent: &Intent, meta: &ApplyMeta) -> ApplyError {
    let before = snapshot(&db.path);
    let err = db.target.apply(intent, meta).await.unwrap_err();
    assert_eq!(
        snapshot(&db.path),
        before,
        "a failed intent changed data: {err}"
    );
    assert!(
        db.target
            .ledger_entry(intent.id.as_str())
            .await
            .unwrap()
            .is_none(),
        "a failed intent left a ledger row"
    );
    err
}

#[tokio::test]
async fn insert_writes_the_row_and_records_an_after_image() {
    let db = setup();
    let i = intent(
        "i-insert",
        json!([{"op": "insert", "table": "customers",
                "values": {"name": "Linus", "email": "linus@example.com"}}]),
    );
    let m = meta(&i);
    let applied = db.target.apply(&i, &m).await.unwrap();
    assert!(!applied.already);
    assert_eq!(applied.ops.len(), 1);
    assert_eq!((applied.ops[0].index, applied.ops[0].rows), (0, 1));
    assert_eq!(
        rows(&db.path, "SELECT * FROM customers WHERE id = 3"),
        vec![json!([3, "Linus", "linus@example.com", null])]
    );
    let undo = &applied.ledger.undo;
    assert_eq!(undo.len(), 1);
    assert_eq!(undo[0].op, 0);
    assert_eq!(undo[0].table, "customers");
    assert_eq!(Value::Object(undo[0].key.clone()), json!({"id": 3}));
    assert_eq!(undo[0].before, None);
    assert_eq!(
        undo[0].after.clone().map(Value::Object),
        Some(json!({"id": 3, "name": "Linus", "email": "linus@example.com", "tier": null}))
    );
    assert_eq!(applied.ledger.intent_id, "i-insert");
    assert_eq!(applied.ledger.run, "run-1");
    assert_eq!(applied.ledger.digest, m.digest);
    assert!(applied.ledger.applied_at_ms > 1_600_000_000_000);
    // The ledger row is in the target, readable back as the same entry.
    assert_eq!(
        ledger_rows(&db.path),
        vec![json!(["i-insert", "run-1", m.digest])]
    );
    let stored = db.target.ledger_entry("i-insert").await.unwrap().unwrap();
    assert_eq!(stored, applied.ledger);
}

#[tokio::test]
async fn inserted_rows_are_keyed_by_rowid_without_a_primary_key() {
    let db = setup();
    let i = intent(
        "i-event",
        json!([
            {"op": "insert", "table": "events", "values": {"message": "hello"}},
            // WITHOUT ROWID: found again by the primary key in the values.
            {"op": "insert", "table": "main.tags", "values": {"name": "sql", "uses": 2}},
        ]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    let image = &applied.ledger.undo[0];
    assert_eq!(Value::Object(image.key.clone()), json!({"rowid": 1}));
    assert_eq!(
        image.after.clone().map(Value::Object),
        Some(json!({"message": "hello"}))
    );
    let image = &applied.ledger.undo[1];
    assert_eq!(image.table, "main.tags");
    assert_eq!(Value::Object(image.key.clone()), json!({"name": "sql"}));
    assert_eq!(
        image.after.clone().map(Value::Object),
        Some(json!({"name": "sql", "uses": 2}))
    );
}

#[tokio::test]
async fn json_values_map_to_sqlite_values() {
    let db = setup();
    let i = intent(
        "i-types",
        json!([
            {"op": "insert", "table": "notes", "values": {"body": true}},
            {"op": "insert", "table": "notes", "values": {"body": 2.5}},
            {"op": "insert", "table": "notes", "values": {"body": {"a": [1, "x"]}}},
            {"op": "insert", "table": "notes", "values": {"body": null}},
        ]),
    );
    db.target.apply(&i, &meta(&i)).await.unwrap();
    // `notes.body` has no type affinity, so SQLite keeps the type it was given.
    assert_eq!(
        rows(
            &db.path,
            "SELECT typeof(body), body FROM notes ORDER BY rowid"
        ),
        vec![
            json!(["integer", 1]),
            json!(["real", 2.5]),
            json!(["text", r#"{"a":[1,"x"]}"#]),
            json!(["null", null]),
        ]
    );
}

#[tokio::test]
async fn update_with_expect_that_holds_records_before_and_after() {
    let db = setup();
    let i = intent(
        "i-update",
        json!([{"op": "update", "table": "orders", "key": {"id": 7},
                "set": {"status": "paid"}, "expect": {"status": "open"}}]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(applied.ops[0].rows, 1);
    assert_eq!(
        rows(&db.path, "SELECT status FROM orders WHERE id = 7"),
        vec![json!(["paid"])]
    );
    let image = &applied.ledger.undo[0];
    assert_eq!(Value::Object(image.key.clone()), json!({"id": 7}));
    assert_eq!(
        image.before.clone().map(Value::Object),
        Some(json!({"id": 7, "customer_id": 1, "total_cents": 1500, "status": "open"}))
    );
    assert_eq!(
        image.after.clone().map(Value::Object),
        Some(json!({"id": 7, "customer_id": 1, "total_cents": 1500, "status": "paid"}))
    );
}

#[tokio::test]
async fn update_with_expect_that_does_not_hold_fails_and_says_so() {
    let db = setup();
    let i = intent(
        "i-stale",
        json!([{"op": "update", "table": "orders", "key": {"id": 7},
                "set": {"status": "shipped"}, "expect": {"status": "paid"}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.code.as_deref(), Some(codes::EXPECT_FAILED));
    assert_eq!(err.op, Some(0));
    let text = err.to_string();
    assert!(
        text.starts_with("op 0 (update orders): expect did not hold"),
        "{text}"
    );
    // The agent learns which columns differ; what the row holds is for humans.
    assert!(text.contains(r#"column(s) ["status"] differ"#), "{text}");
    assert!(!text.contains("open"), "{text}");
    let detail = err.detail.as_deref().unwrap_or_default();
    assert!(detail.contains(r#"{"status":"open"}"#), "{detail}");
}

#[tokio::test]
async fn update_changing_the_primary_key_records_where_the_row_is_now() {
    let db = setup();
    let i = intent(
        "i-rekey",
        json!([{"op": "update", "table": "customers", "key": {"id": 2}, "set": {"id": 20}}]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    let image = &applied.ledger.undo[0];
    assert_eq!(Value::Object(image.key.clone()), json!({"id": 20}));
    assert_eq!(image.before.as_ref().unwrap()["id"], json!(2));
    assert_eq!(image.after.as_ref().unwrap()["id"], json!(20));
}

#[tokio::test]
async fn a_null_in_the_key_matches_null() {
    let db = setup();
    let i = intent(
        "i-null",
        json!([{"op": "update", "table": "customers", "key": {"tier": null},
                "set": {"tier": "silver"}}]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(
        Value::Object(applied.ledger.undo[0].key.clone()),
        json!({"id": 2})
    );
    assert_eq!(
        rows(&db.path, "SELECT id, tier FROM customers ORDER BY id"),
        vec![json!([1, "gold"]), json!([2, "silver"])]
    );
}

#[tokio::test]
async fn a_key_matching_no_row_fails_the_intent() {
    let db = setup();
    let i = intent(
        "i-missing",
        json!([
            {"op": "insert", "table": "events", "values": {"message": "first"}},
            {"op": "update", "table": "orders", "key": {"id": 99}, "set": {"status": "paid"}},
        ]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(
        err.to_string(),
        r#"op 1 (update orders): key {"id":99} matched no row"#
    );
    assert_eq!(err.code.as_deref(), Some(codes::NO_ROW));
    assert!(rows(&db.path, "SELECT * FROM events").is_empty());

    // With an expect, a missing row is still "matched no row", not a failed expect.
    let i = intent(
        "i-missing-2",
        json!([{"op": "delete", "table": "orders", "key": {"id": 99},
                "expect": {"status": "open"}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::NO_ROW), "{err}");
}

#[tokio::test]
async fn a_key_matching_more_rows_than_max_rows_fails_the_intent() {
    let db = setup();
    let ops = json!([{"op": "update", "table": "orders", "key": {"customer_id": 1},
                      "set": {"status": "cancelled"}}]);
    let i = intent("i-many", ops.clone());
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::TOO_MANY_ROWS));
    assert!(err.to_string().contains("more than 1 row"), "{err}");

    // Allowed two rows, the same op applies and records both.
    let i = intent("i-many-ok", ops);
    let mut m = meta(&i);
    m.max_rows = 2;
    let applied = db.target.apply(&i, &m).await.unwrap();
    assert_eq!(applied.ops[0].rows, 2);
    let keys: Vec<Value> = applied
        .ledger
        .undo
        .iter()
        .map(|u| Value::Object(u.key.clone()))
        .collect();
    assert_eq!(keys, vec![json!({"id": 7}), json!({"id": 8})]);
}

#[tokio::test]
async fn delete_with_expect() {
    let db = setup();
    let i = intent(
        "i-delete-stale",
        json!([{"op": "delete", "table": "orders", "key": {"id": 9},
                "expect": {"status": "open"}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::EXPECT_FAILED));
    assert!(err.to_string().contains(r#"["status"]"#), "{err}");
    assert!(!err.to_string().contains("paid"), "{err}");
    let detail = err.detail.as_deref().unwrap_or_default();
    assert!(detail.contains(r#"{"status":"paid"}"#), "{detail}");

    let i = intent(
        "i-delete",
        json!([{"op": "delete", "table": "orders", "key": {"id": 9},
                "expect": {"status": "paid"}}]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(applied.ops[0].rows, 1);
    assert!(rows(&db.path, "SELECT * FROM orders WHERE id = 9").is_empty());
    let image = &applied.ledger.undo[0];
    assert_eq!(Value::Object(image.key.clone()), json!({"id": 9}));
    assert_eq!(
        image.before.clone().map(Value::Object),
        Some(json!({"id": 9, "customer_id": 2, "total_cents": 900, "status": "paid"}))
    );
    assert_eq!(image.after, None);
}

#[tokio::test]
async fn upsert_inserts_updates_or_does_nothing() {
    let db = setup();
    let i = intent(
        "i-upsert",
        json!([
            // Conflicts on email: updates Ada.
            {"op": "upsert", "table": "customers", "on": ["email"],
             "values": {"email": "ada@example.com", "name": "Ada L.", "tier": "platinum"}},
            // No conflict: inserts.
            {"op": "upsert", "table": "customers", "on": ["email"],
             "values": {"email": "alan@example.com", "name": "Alan"}},
            // A WITHOUT ROWID table, found again by its primary key: inserts.
            {"op": "upsert", "table": "tags", "on": ["name"], "values": {"name": "rust"}},
            // Only conflict columns: DO NOTHING.
            {"op": "upsert", "table": "tags", "on": ["name"], "values": {"name": "rust"}},
        ]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    let counts: Vec<u64> = applied.ops.iter().map(|o| o.rows).collect();
    assert_eq!(counts, vec![1, 1, 1, 0]);
    assert_eq!(
        rows(&db.path, "SELECT * FROM customers ORDER BY id"),
        vec![
            json!([1, "Ada L.", "ada@example.com", "platinum"]),
            json!([2, "Grace", "grace@example.com", null]),
            json!([3, "Alan", "alan@example.com", null]),
        ]
    );
    let undo = &applied.ledger.undo;
    assert_eq!(undo.len(), 4);
    assert_eq!(Value::Object(undo[0].key.clone()), json!({"id": 1}));
    assert_eq!(undo[0].before.as_ref().unwrap()["name"], json!("Ada"));
    assert_eq!(undo[0].after.as_ref().unwrap()["name"], json!("Ada L."));
    assert_eq!(Value::Object(undo[1].key.clone()), json!({"id": 3}));
    assert_eq!(undo[1].before, None);
    assert_eq!(Value::Object(undo[2].key.clone()), json!({"name": "rust"}));
    assert_eq!(
        undo[2].after.clone().map(Value::Object),
        Some(json!({"name": "rust", "uses": 0}))
    );
    assert_eq!(undo[3].op, 3);
    assert!(undo[3].before.is_some());
    assert_eq!(undo[3].before, undo[3].after);
}

#[tokio::test]
async fn a_constraint_violation_in_op_1_leaves_op_0_unwritten() {
    let db = setup();
    let i = intent(
        "i-atomic",
        json!([
            {"op": "insert", "table": "customers",
             "values": {"name": "Linus", "email": "linus@example.com"}},
            {"op": "insert", "table": "customers",
             "values": {"name": "Impostor", "email": "ada@example.com"}},
        ]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.op, Some(1));
    assert_eq!(err.code.as_deref(), Some("SQLITE_CONSTRAINT_UNIQUE"));
    assert!(err.to_string().contains("customers.email"), "{err}");
    assert!(rows(&db.path, "SELECT * FROM customers WHERE name = 'Linus'").is_empty());
    assert!(ledger_rows(&db.path).is_empty());

    // A NOT NULL violation is named too.
    let i = intent(
        "i-notnull",
        json!([{"op": "insert", "table": "customers", "values": {"email": "x@example.com"}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some("SQLITE_CONSTRAINT_NOTNULL"));
    assert!(err.to_string().contains("customers.name"), "{err}");
}

#[tokio::test]
async fn unknown_tables_and_columns_are_named() {
    let db = setup();
    let i = intent(
        "i-no-table",
        json!([{"op": "insert", "table": "invoices", "values": {"id": 1}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::UNKNOWN_TABLE));
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(
        err.to_string(),
        "op 0 (insert invoices): table invoices does not exist"
    );

    let i = intent(
        "i-no-schema",
        json!([{"op": "insert", "table": "elsewhere.customers", "values": {"name": "x"}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::UNKNOWN_TABLE), "{err}");

    let i = intent(
        "i-no-column",
        json!([
            {"op": "insert", "table": "events", "values": {"message": "ok"}},
            {"op": "update", "table": "customers", "key": {"id": 1}, "set": {"nmae": "x"}},
        ]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::UNKNOWN_COLUMN));
    assert_eq!(err.op, Some(1));
    let text = err.to_string();
    assert!(
        text.starts_with("op 1 (update customers): set names column \"nmae\""),
        "{text}"
    );
    assert!(text.contains("customers"), "{text}");

    let i = intent(
        "i-case",
        json!([{"op": "delete", "table": "customers", "key": {"ID": 1}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert!(err.to_string().contains(r#"did you mean "id"?"#), "{err}");

    let i = intent(
        "i-view",
        json!([{"op": "delete", "table": "open_orders", "key": {"id": 7}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::NOT_A_TABLE), "{err}");
}

#[tokio::test]
async fn malformed_ops_are_refused_before_writing() {
    let db = setup();
    // The types refuse an empty key or set; the target refuses them too.
    for (id, key, set) in [
        ("i-empty-key", json!({}), json!({"status": "x"})),
        ("i-empty-set", json!({"id": 7}), json!({})),
    ] {
        let wire = json!([{"op": "update", "table": "orders", "key": key, "set": set}]);
        assert!(
            serde_json::from_value::<Intent>(json!({
                "version": 1, "id": id, "run": "r", "ops": wire,
                "reason": "test", "provenance": {"agent": "a"}
            }))
            .is_err()
        );
        let op = Op::Update {
            table: TableName::parse("orders").unwrap(),
            key: row(key),
            set: row(set),
            expect: None,
        };
        let i = unchecked(id, op);
        let err = apply_err(&db, &i, &meta(&i)).await;
        assert_eq!(err.code.as_deref(), Some(codes::BAD_OP), "{id}: {err}");
    }
    for (id, op, code) in [
        (
            "i-on-missing",
            json!({"op": "upsert", "table": "customers", "values": {"name": "x"}, "on": ["email"]}),
            codes::BAD_OP,
        ),
        (
            "i-big",
            json!({"op": "insert", "table": "orders",
                   "values": {"id": 1, "customer_id": u64::MAX, "total_cents": 1, "status": "x"}}),
            codes::BAD_VALUE,
        ),
        (
            "i-ledger",
            json!({"op": "insert", "table": "airlock_ledger",
                   "values": {"intent_id": "forged", "run": "r", "digest": "d",
                              "applied_at_ms": 0, "undo": "[]"}}),
            codes::RESERVED_TABLE,
        ),
    ] {
        let i = intent(id, json!([op]));
        let err = apply_err(&db, &i, &meta(&i)).await;
        assert_eq!(err.code.as_deref(), Some(code), "{id}: {err}");
        assert_eq!(err.kind, ErrorKind::Permanent, "{id}");
    }
    assert!(ledger_rows(&db.path).is_empty());
}

#[tokio::test]
async fn hostile_values_are_stored_verbatim_and_hostile_columns_refused() {
    let db = setup();
    let evil = "x'); DROP TABLE customers; --";
    let i = intent(
        "i-evil",
        json!([{"op": "insert", "table": "customers", "values": {"name": evil}}]),
    );
    db.target.apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(
        rows(&db.path, "SELECT name FROM customers WHERE id = 3"),
        vec![json!([evil])]
    );
    // A column name the types refuse, built here without them.
    let i = unchecked(
        "i-evil-column",
        Op::Insert {
            table: TableName::parse("customers").unwrap(),
            values: row(json!({"name\") VALUES ('x'); DROP TABLE customers; --": "x"})),
        },
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::UNKNOWN_COLUMN));
    assert_eq!(
        rows(&db.path, "SELECT count(*) FROM customers"),
        vec![json!([3])]
    );
}

#[tokio::test]
async fn applying_the_same_intent_twice_writes_once() {
    let db = setup();
    let i = intent(
        "i-twice",
        json!([{"op": "insert", "table": "events", "values": {"message": "once"}}]),
    );
    let m = meta(&i);
    let first = db.target.apply(&i, &m).await.unwrap();
    let second = db.target.apply(&i, &m).await.unwrap();
    assert!(!first.already);
    assert!(second.already);
    assert!(second.ops.is_empty());
    assert_eq!(second.ledger, first.ledger);
    assert_eq!(
        rows(&db.path, "SELECT count(*) FROM events"),
        vec![json!([1])]
    );
    assert_eq!(ledger_rows(&db.path).len(), 1);

    // A fresh connection (a restarted sidecar) sees the same ledger.
    let reopened = open("default", &format!("sqlite://{}", db.path.display())).unwrap();
    let third = reopened.apply(&i, &m).await.unwrap();
    assert!(third.already);
    assert_eq!(
        rows(&db.path, "SELECT count(*) FROM events"),
        vec![json!([1])]
    );
}

#[tokio::test]
async fn the_same_id_with_different_bytes_is_refused() {
    let db = setup();
    let i = intent(
        "i-dup",
        json!([{"op": "insert", "table": "events", "values": {"message": "one"}}]),
    );
    db.target.apply(&i, &meta(&i)).await.unwrap();
    let other = intent(
        "i-dup",
        json!([{"op": "insert", "table": "events", "values": {"message": "two"}}]),
    );
    let before = snapshot(&db.path);
    let err = db.target.apply(&other, &meta(&other)).await.unwrap_err();
    assert_eq!(snapshot(&db.path), before);
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.code.as_deref(), Some(codes::DIGEST_MISMATCH));
    assert!(
        err.to_string().contains("same id, different bytes"),
        "{err}"
    );
    assert_eq!(
        rows(&db.path, "SELECT message FROM events"),
        vec![json!(["one"])]
    );
}

#[tokio::test]
async fn an_intent_for_another_target_is_refused() {
    let db = setup();
    let mut i = intent(
        "i-elsewhere",
        json!([{"op": "insert", "table": "events", "values": {"message": "x"}}]),
    );
    i.target = airlock_intent::TargetName::parse("warehouse").unwrap();
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::WRONG_TARGET), "{err}");
    assert!(err.to_string().contains("\"warehouse\""), "{err}");
}

#[tokio::test]
async fn a_locked_database_is_a_transient_error() {
    let db = setup();
    let target = SqliteTarget::open_with_busy_timeout("default", &db.path, Duration::ZERO).unwrap();
    let holder = Connection::open(&db.path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let i = intent(
        "i-busy",
        json!([{"op": "insert", "table": "events", "values": {"message": "later"}}]),
    );
    let m = meta(&i);
    let err = target.apply(&i, &m).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    assert!(
        err.code.as_deref().unwrap().starts_with("SQLITE_BUSY"),
        "{err}"
    );
    holder.execute_batch("ROLLBACK").unwrap();
    // Once the lock is gone, the retry applies.
    let applied = target.apply(&i, &m).await.unwrap();
    assert!(!applied.already);
}

#[tokio::test]
async fn open_accepts_relative_paths_and_refuses_other_schemes() {
    let dir = tempfile::tempdir().unwrap();
    // Relative to the working directory: use a path that goes through the temp dir.
    let cwd = std::env::current_dir().unwrap();
    let relative = pathdiff(dir.path(), &cwd).join("sub").join("target.db");
    let target = open("local", &format!("sqlite://{}", relative.display())).unwrap();
    assert_eq!(target.name(), "local");
    assert!(dir.path().join("sub").join("target.db").exists());

    let err = open("other", "mysql://u:pw@host/db").unwrap_err();
    assert!(err.to_string().contains("\"mysql\""), "{err}");
    assert!(!err.to_string().contains("pw"), "{err}");
    assert_eq!(err.code.as_deref(), Some(codes::UNSUPPORTED_URL));
}

/// `path` relative to `base` (both absolute), through `..` as needed.
fn pathdiff(path: &Path, base: &Path) -> PathBuf {
    let path: Vec<_> = path.components().collect();
    let base: Vec<_> = base.components().collect();
    let common = path.iter().zip(&base).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::from(".");
    for _ in common..base.len() {
        out.push("..");
    }
    for part in &path[common..] {
        out.push(part);
    }
    out
}

#[tokio::test]
async fn preview_reports_rows_and_images_and_writes_nothing() {
    let db = setup();
    let i = intent(
        "p-1",
        json!([
            {"op": "update", "table": "customers", "key": {"id": 1}, "set": {"tier": "silver"}},
            {"op": "insert", "table": "orders",
             "values": {"id": 10, "customer_id": 2, "total_cents": 100, "status": "open"}},
            {"op": "delete", "table": "orders", "key": {"id": 9}}
        ]),
    );
    let before = snapshot(&db.path);
    let preview = db.target.preview(&i, &meta(&i)).await.unwrap();
    assert!(!preview.already);
    let counts: Vec<(usize, u64, usize)> = preview
        .ops
        .iter()
        .map(|op| (op.index, op.rows, op.images.len()))
        .collect();
    assert_eq!(counts, [(0, 1, 1), (1, 1, 1), (2, 1, 1)]);
    let update = &preview.ops[0].images[0];
    assert_eq!(update.key, row(json!({"id": 1})));
    assert_eq!(
        update.before.as_ref().unwrap()["tier"],
        json!("gold"),
        "{update:?}"
    );
    assert_eq!(update.after.as_ref().unwrap()["tier"], json!("silver"));
    assert!(preview.ops[1].images[0].before.is_none());
    assert!(preview.ops[2].images[0].after.is_none());
    // Nothing written: neither the rows nor the ledger.
    assert_eq!(snapshot(&db.path), before);
    assert!(ledger_rows(&db.path).is_empty());

    // The images are those a real apply records.
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    let images: Vec<_> = preview.ops.into_iter().flat_map(|op| op.images).collect();
    assert_eq!(applied.ledger.undo, images);
    // Once applied, a preview says so and shows no ops.
    let again = db.target.preview(&i, &meta(&i)).await.unwrap();
    assert!(again.already);
    assert!(again.ops.is_empty());
}

#[tokio::test]
async fn preview_of_a_failing_intent_is_its_error_and_writes_nothing() {
    let db = setup();
    let i = intent(
        "p-2",
        json!([
            {"op": "update", "table": "customers", "key": {"id": 1}, "set": {"tier": "silver"}},
            {"op": "update", "table": "customers", "key": {"id": 99}, "set": {"tier": "x"}}
        ]),
    );
    let before = snapshot(&db.path);
    let err = db.target.preview(&i, &meta(&i)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.op, Some(1));
    assert_eq!(err.code.as_deref(), Some(codes::NO_ROW));
    assert_eq!(snapshot(&db.path), before);
    assert!(ledger_rows(&db.path).is_empty());
}

// ---- Chains: several intents of a run in one transaction ----------------------------

/// Each intent with its metadata, as a chain.
fn chain(intents: &[Intent]) -> Vec<(Intent, ApplyMeta)> {
    intents.iter().map(|i| (i.clone(), meta(i))).collect()
}

/// Five intents where each depends on the ones before it.
fn five_in_order() -> Vec<Intent> {
    vec![
        intent(
            "c-1",
            json!([{"op": "insert", "table": "customers", "values": {"id": 3, "name": "Edsger"}}]),
        ),
        intent(
            "c-2",
            json!([{"op": "insert", "table": "orders",
                    "values": {"id": 10, "customer_id": 3, "total_cents": 100, "status": "open"}}]),
        ),
        intent(
            "c-3",
            json!([{"op": "update", "table": "orders", "key": {"id": 10},
                    "expect": {"status": "open"}, "set": {"status": "paid"}}]),
        ),
        intent(
            "c-4",
            json!([{"op": "insert", "table": "events", "values": {"message": "c-4"}}]),
        ),
        intent(
            "c-5",
            json!([{"op": "delete", "table": "orders", "key": {"id": 10}, "expect": {"status": "paid"}}]),
        ),
    ]
}

#[tokio::test]
async fn a_chain_applies_in_order_with_every_ledger_row() {
    let db = setup();
    let intents = five_in_order();
    let results = db.target.apply_chain(&chain(&intents)).await;
    assert_eq!(results.len(), 5);
    for (result, i) in results.iter().zip(&intents) {
        let applied = result.as_ref().unwrap();
        assert!(!applied.already);
        assert_eq!(applied.ledger.intent_id, i.id.as_str());
        assert_eq!(applied.ops.len(), 1);
        assert_eq!(applied.ops[0].rows, 1);
    }
    // c-3 saw c-2's row and c-5 saw c-3's update: they ran in order.
    assert_eq!(
        rows(&db.path, "SELECT id, name FROM customers WHERE id = 3"),
        vec![json!([3, "Edsger"])]
    );
    assert!(rows(&db.path, "SELECT * FROM orders WHERE id = 10").is_empty());
    assert_eq!(
        rows(&db.path, "SELECT message FROM events"),
        vec![json!(["c-4"])]
    );
    let ledger = ledger_rows(&db.path);
    assert_eq!(ledger.len(), 5);
    for (row, i) in ledger.iter().zip(&intents) {
        assert_eq!(row[0], json!(i.id.as_str()));
        assert_eq!(row[2], json!(meta(i).digest));
    }
    // Each ledger row holds its own intent's images.
    let third = db.target.ledger_entry("c-3").await.unwrap().unwrap();
    assert_eq!(third.undo.len(), 1);
    assert_eq!(
        third.undo[0].before.as_ref().unwrap()["status"],
        json!("open")
    );
    assert_eq!(
        third.undo[0].after.as_ref().unwrap()["status"],
        json!("paid")
    );
    // Applying the chain again writes nothing.
    let again = db.target.apply_chain(&chain(&intents)).await;
    assert_eq!(again.len(), 5);
    assert!(again.iter().all(|r| r.as_ref().unwrap().already));
    assert_eq!(ledger_rows(&db.path).len(), 5);
}

#[tokio::test]
async fn a_chain_stops_at_a_failing_intent_and_commits_the_ones_before() {
    let db = setup();
    let mut intents = five_in_order();
    // The third intent writes an event, then fails: order 99 does not exist.
    intents[2] = intent(
        "c-3",
        json!([
            {"op": "insert", "table": "events", "values": {"message": "c-3"}},
            {"op": "update", "table": "orders", "key": {"id": 99}, "set": {"status": "paid"}},
        ]),
    );
    let results = db.target.apply_chain(&chain(&intents)).await;
    assert_eq!(results.len(), 3, "{results:?}");
    assert!(!results[0].as_ref().unwrap().already);
    assert!(!results[1].as_ref().unwrap().already);
    let err = results[2].as_ref().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent, "{err}");
    assert_eq!(err.op, Some(1), "{err}");
    assert_eq!(err.code.as_deref(), Some(codes::NO_ROW), "{err}");
    // The first two are committed; the third's event and the rest are not written.
    assert_eq!(
        rows(&db.path, "SELECT id, status FROM orders WHERE id = 10"),
        vec![json!([10, "open"])]
    );
    assert!(rows(&db.path, "SELECT * FROM events").is_empty());
    assert_eq!(
        ledger_rows(&db.path)
            .iter()
            .map(|r| r[0].clone())
            .collect::<Vec<_>>(),
        vec![json!("c-1"), json!("c-2")]
    );
    // A fresh connection sees the same: the commit is durable.
    let reopened = open("default", &format!("sqlite://{}", db.path.display())).unwrap();
    assert!(reopened.ledger_entry("c-3").await.unwrap().is_none());
    assert!(reopened.ledger_entry("c-2").await.unwrap().is_some());
}

#[tokio::test]
async fn a_chain_answers_already_for_an_intent_in_the_ledger() {
    let db = setup();
    let intents = five_in_order();
    let first = db
        .target
        .apply(&intents[0], &meta(&intents[0]))
        .await
        .unwrap();
    let results = db.target.apply_chain(&chain(&intents[..3])).await;
    assert_eq!(results.len(), 3);
    let already = results[0].as_ref().unwrap();
    assert!(already.already);
    assert!(already.ops.is_empty());
    assert_eq!(already.ledger, first.ledger);
    assert!(!results[1].as_ref().unwrap().already);
    assert!(!results[2].as_ref().unwrap().already);
    assert_eq!(
        rows(&db.path, "SELECT count(*) FROM customers WHERE id = 3"),
        vec![json!([1])]
    );
    // Already in the middle of a chain, too.
    let results = db.target.apply_chain(&chain(&intents[2..])).await;
    let flags: Vec<bool> = results
        .iter()
        .map(|r| r.as_ref().unwrap().already)
        .collect();
    assert_eq!(flags, vec![true, false, false]);
    assert_eq!(ledger_rows(&db.path).len(), 5);
}

#[tokio::test]
async fn a_trigger_rolling_back_the_whole_transaction_fails_only_its_intent() {
    let db = setup();
    Connection::open(&db.path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE guarded(x INTEGER);
             CREATE TRIGGER guard BEFORE INSERT ON guarded WHEN NEW.x < 0
             BEGIN SELECT RAISE(ROLLBACK, 'no negative x'); END;",
        )
        .unwrap();
    let insert = |id: &str, x: i64| {
        intent(
            id,
            json!([{"op": "insert", "table": "guarded", "values": {"x": x}}]),
        )
    };
    let intents = [
        insert("g-1", 1),
        insert("g-2", 2),
        insert("g-3", -3),
        insert("g-4", 4),
    ];
    let results = db.target.apply_chain(&chain(&intents)).await;
    assert_eq!(results.len(), 3, "{results:?}");
    assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
    let err = results[2].as_ref().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent, "{err}");
    assert!(err.to_string().contains("no negative x"), "{err}");
    assert_eq!(
        rows(&db.path, "SELECT x FROM guarded ORDER BY x"),
        vec![json!([1]), json!([2])]
    );
    assert_eq!(ledger_rows(&db.path).len(), 2);
}

#[tokio::test]
async fn a_deferred_foreign_key_refused_at_commit_fails_only_its_intent() {
    let db = setup();
    Connection::open(&db.path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE lines(id INTEGER PRIMARY KEY, order_id INTEGER
                 REFERENCES orders(id) DEFERRABLE INITIALLY DEFERRED);",
        )
        .unwrap();
    let line = |id: &str, line: i64, order: i64| {
        intent(
            id,
            json!([{"op": "insert", "table": "lines", "values": {"id": line, "order_id": order}}]),
        )
    };
    let intents = [line("l-1", 1, 7), line("l-2", 2, 999), line("l-3", 3, 8)];
    let results = db.target.apply_chain(&chain(&intents)).await;
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(!results[0].as_ref().unwrap().already);
    let err = results[1].as_ref().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent, "{err}");
    assert_eq!(
        err.code.as_deref(),
        Some("SQLITE_CONSTRAINT_FOREIGNKEY"),
        "{err}"
    );
    assert_eq!(rows(&db.path, "SELECT id FROM lines"), vec![json!([1])]);
    assert_eq!(ledger_rows(&db.path).len(), 1);
}

#[tokio::test]
async fn a_chain_on_a_locked_database_is_one_transient_error() {
    let db = setup();
    let target = SqliteTarget::open_with_busy_timeout("default", &db.path, Duration::ZERO).unwrap();
    let holder = Connection::open(&db.path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let intents = five_in_order();
    let results = target.apply_chain(&chain(&intents)).await;
    assert_eq!(results.len(), 1, "{results:?}");
    let err = results[0].as_ref().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    holder.execute_batch("ROLLBACK").unwrap();
    let results = target.apply_chain(&chain(&intents)).await;
    assert_eq!(results.len(), 5);
    assert!(results.iter().all(|r| !r.as_ref().unwrap().already));
}
