//! The PostgreSQL target against the real local server, one fresh database per
//! test: what each op writes, the undo images, typed values, the checks that fail
//! an intent, atomicity, exactly-once, connection faults (a TCP proxy that cuts
//! connections, backends terminated by the server) and concurrent applies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/pg.rs"]
mod pg;

use std::sync::Arc;

use airlock::apply::{
    Applied, ApplyError, ApplyMeta, ErrorKind, PostgresTarget, Target, codes, open,
};
use airlock_intent::{Intent, Op, TableName};
use pg::{Proxy, TestDb};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const SCHEMA: &str = "
    CREATE TABLE customers(id SERIAL PRIMARY KEY, name TEXT NOT NULL, email TEXT UNIQUE, tier TEXT);
    CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                        total_cents INTEGER NOT NULL CHECK (total_cents >= 0), status TEXT NOT NULL);
    CREATE TABLE events(message TEXT);
    CREATE TABLE tags(name TEXT PRIMARY KEY, uses INTEGER NOT NULL DEFAULT 0);
    CREATE VIEW open_orders AS SELECT * FROM orders WHERE status = 'open';
    CREATE SCHEMA sales;
    CREATE TABLE sales.regions(code TEXT PRIMARY KEY, name TEXT NOT NULL);
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
    CREATE TABLE typed(
        id uuid PRIMARY KEY, i2 smallint, i4 integer, i8 bigint, num numeric(10,2),
        f4 real, f8 double precision, ok boolean, t text, vc varchar(5), d date,
        ts timestamp, tz timestamptz, j json, jb jsonb, b bytea, ints integer[],
        texts text[], m mood);
    INSERT INTO customers(name, email, tier) VALUES ('Ada', 'ada@example.com', 'gold'),
                                                    ('Grace', 'grace@example.com', NULL);
    INSERT INTO orders VALUES (7, 1, 1500, 'open'), (8, 1, 2500, 'open'), (9, 2, 900, 'paid');
";

const UUID: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";

struct Db {
    db: TestDb,
    target: Arc<dyn Target>,
}

async fn setup() -> Db {
    let db = TestDb::create(SCHEMA).await;
    let target = open("default", &db.url).unwrap();
    Db { db, target }
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

/// An intent built directly in Rust, bypassing the checks deserialisation makes.
fn unchecked(id: &str, op: Op) -> Intent {
    let mut i = intent(
        id,
        json!([{"op": "insert", "table": "events", "values": {"message": "x"}}]),
    );
    i.ops = vec![op];
    i
}

fn row(value: Value) -> serde_json::Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

fn meta(intent: &Intent) -> ApplyMeta {
    let bytes = serde_json::to_vec(intent).unwrap();
    ApplyMeta::new(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
}

fn obj(image: &serde_json::Map<String, Value>) -> Value {
    Value::Object(image.clone())
}

/// Everything in every table, to compare before and after a failure.
async fn snapshot(db: &TestDb) -> Vec<Value> {
    let mut all = Vec::new();
    for sql in [
        "SELECT * FROM customers ORDER BY id",
        "SELECT * FROM orders ORDER BY id",
        "SELECT * FROM events ORDER BY message",
        "SELECT * FROM tags ORDER BY name",
        "SELECT * FROM sales.regions ORDER BY code",
        "SELECT * FROM typed ORDER BY id",
        "SELECT intent_id FROM airlock.ledger ORDER BY intent_id",
    ] {
        all.extend(db.rows(sql).await);
    }
    all
}

async fn apply_err(db: &Db, intent: &Intent, meta: &ApplyMeta) -> ApplyError {
    // The first apply creates the ledger, so take the snapshot after one exists.
    db.target.ledger_entry("-").await.unwrap();
    let before = snapshot(&db.db).await;
    let err = db.target.apply(intent, meta).await.unwrap_err();
    assert_eq!(
        snapshot(&db.db).await,
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

/// Applies until it succeeds, asserting every failure on the way is transient.
/// Answers the success and the failures.
async fn apply_until_ok(
    target: &dyn Target,
    intent: &Intent,
    meta: &ApplyMeta,
) -> (Applied, Vec<ApplyError>) {
    let mut failures = Vec::new();
    for _ in 0..20 {
        match target.apply(intent, meta).await {
            Ok(applied) => return (applied, failures),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Transient, "{e}");
                failures.push(e);
            }
        }
    }
    panic!("still failing after 20 attempts: {failures:?}");
}

#[tokio::test]
async fn insert_writes_the_row_and_records_an_after_image() {
    let db = setup().await;
    let i = intent(
        "i-insert",
        json!([{"op": "insert", "table": "customers",
                "values": {"name": "Linus", "email": "linus@example.com"}}]),
    );
    let m = meta(&i);
    let applied = db.target.apply(&i, &m).await.unwrap();
    assert!(!applied.already);
    assert_eq!((applied.ops[0].index, applied.ops[0].rows), (0, 1));
    assert_eq!(
        db.db.rows("SELECT * FROM customers WHERE id = 3").await,
        vec![json!({"id": 3, "name": "Linus", "email": "linus@example.com", "tier": null})]
    );
    let undo = &applied.ledger.undo;
    assert_eq!(undo.len(), 1);
    assert_eq!((undo[0].op, undo[0].table.as_str()), (0, "customers"));
    assert_eq!(obj(&undo[0].key), json!({"id": 3}));
    assert_eq!(undo[0].before, None);
    assert_eq!(
        undo[0].after.as_ref().map(obj),
        Some(json!({"id": 3, "name": "Linus", "email": "linus@example.com", "tier": null}))
    );
    assert_eq!(applied.ledger.intent_id, "i-insert");
    assert_eq!(applied.ledger.run, "run-1");
    assert_eq!(applied.ledger.digest, m.digest);
    assert!(applied.ledger.applied_at_ms > 1_600_000_000_000);
    // The ledger row is in the target's own schema, readable back as the same entry.
    assert_eq!(
        db.db
            .rows("SELECT intent_id, run, digest FROM airlock.ledger")
            .await,
        vec![json!({"intent_id": "i-insert", "run": "run-1", "digest": m.digest})]
    );
    assert_eq!(
        db.db
            .rows("SELECT component, version FROM airlock.schema_version")
            .await,
        vec![json!({"component": "ledger", "version": airlock::apply::sql::LEDGER_VERSION})]
    );
    let stored = db.target.ledger_entry("i-insert").await.unwrap().unwrap();
    assert_eq!(stored, applied.ledger);
}

#[tokio::test]
async fn rows_without_a_primary_key_are_keyed_by_ctid_and_schemas_are_honoured() {
    let db = setup().await;
    let i = intent(
        "i-event",
        json!([
            {"op": "insert", "table": "events", "values": {"message": "hello"}},
            {"op": "insert", "table": "sales.regions", "values": {"code": "eu", "name": "Europe"}},
        ]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    let image = &applied.ledger.undo[0];
    assert_eq!(obj(&image.key), json!({"ctid": "(0,1)"}));
    assert_eq!(
        image.after.as_ref().map(obj),
        Some(json!({"message": "hello"}))
    );
    let image = &applied.ledger.undo[1];
    assert_eq!(image.table, "sales.regions");
    assert_eq!(obj(&image.key), json!({"code": "eu"}));
    assert_eq!(
        db.db.rows("SELECT * FROM sales.regions").await,
        vec![json!({"code": "eu", "name": "Europe"})]
    );
}

/// One row with a value of every supported type, as an intent writes it.
fn typed_values() -> Value {
    json!({
        "id": UUID, "i2": -7, "i4": 2_000_000_000, "i8": 9_007_199_254_740_993_i64,
        "num": "12.34", "f4": 1.5, "f8": 2.25, "ok": true, "t": "plain text", "vc": "short",
        "d": "2024-02-29", "ts": "2024-01-01T10:00:00", "tz": "2024-01-01T10:00:00Z",
        "j": {"a": [1, "x"]}, "jb": {"b": null, "c": 1.5}, "b": "\\x0102ff",
        "ints": [1, 2, 3], "texts": ["a", "b c", "\"q\""], "m": "happy"
    })
}

#[tokio::test]
async fn every_type_round_trips() {
    let db = setup().await;
    let null_id = "00000000-0000-0000-0000-000000000001";
    let i = intent(
        "i-types",
        json!([
            {"op": "insert", "table": "typed", "values": typed_values()},
            {"op": "insert", "table": "typed", "values": {
                "id": null_id, "i2": null, "i4": null, "i8": null, "num": null, "f4": null,
                "f8": null, "ok": null, "t": null, "vc": null, "d": null, "ts": null,
                "tz": null, "j": null, "jb": null, "b": null, "ints": null, "texts": null,
                "m": null}},
        ]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    // PostgreSQL holds the values with their types.
    let checks = db
        .db
        .rows(&format!(
            "SELECT id = '{UUID}'::uuid AS id, i2 = -7 AS i2, i4 = 2000000000 AS i4,
                    i8 = 9007199254740993 AS i8, num = 12.34 AS num, f4 = 1.5 AS f4,
                    f8 = 2.25 AS f8, ok AS ok, t = 'plain text' AS t, vc = 'short' AS vc,
                    d = DATE '2024-02-29' AS d, ts = TIMESTAMP '2024-01-01 10:00:00' AS ts,
                    tz = TIMESTAMPTZ '2024-01-01 10:00:00+00' AS tz,
                    j::jsonb = '{{\"a\": [1, \"x\"]}}'::jsonb AS j,
                    jb = '{{\"b\": null, \"c\": 1.5}}'::jsonb AS jb,
                    b = '\\x0102ff'::bytea AS b, ints = ARRAY[1, 2, 3] AS ints,
                    texts = ARRAY['a', 'b c', '\"q\"'] AS texts, m = 'happy'::mood AS m
             FROM typed WHERE id = '{UUID}'"
        ))
        .await;
    let all_true: serde_json::Map<String, Value> = typed_values()
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (k.clone(), Value::Bool(true)))
        .collect();
    assert_eq!(checks, vec![Value::Object(all_true)]);
    let nulls = db
        .db
        .value(&format!(
            "SELECT num_nulls(i2, i4, i8, num, f4, f8, ok, t, vc, d, ts, tz, j, jb, b, ints,
                              texts, m) FROM typed WHERE id = '{null_id}'"
        ))
        .await;
    assert_eq!(nulls, json!(18));

    // The after-image is the row as PostgreSQL renders it in JSON.
    let after = applied.ledger.undo[0].after.clone().unwrap();
    assert_eq!(obj(&applied.ledger.undo[0].key), json!({"id": UUID}));
    assert_eq!(after["num"], json!(12.34));
    assert_eq!(after["b"], json!("\\x0102ff"));
    assert_eq!(after["ints"], json!([1, 2, 3]));
    assert_eq!(after["i8"], json!(9_007_199_254_740_993_i64));
    assert_eq!(after["jb"], json!({"b": null, "c": 1.5}));
    assert_eq!(after["m"], json!("happy"));
    assert!(
        after["tz"].as_str().unwrap().starts_with("2024-01-01T"),
        "{after:?}"
    );

    // Undo and replay feed images back as values: the row comes back identical.
    let before = db.db.rows("SELECT * FROM typed ORDER BY id").await;
    let i = intent(
        "i-types-again",
        json!([{"op": "upsert", "table": "typed", "on": ["id"], "values": Value::Object(after.clone())}]),
    );
    let again = db.target.apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(db.db.rows("SELECT * FROM typed ORDER BY id").await, before);
    assert_eq!(again.ledger.undo[0].before, Some(after.clone()));
    assert_eq!(again.ledger.undo[0].after, Some(after));
}

#[tokio::test]
async fn typed_keys_and_expects_compare_as_their_types() {
    let db = setup().await;
    let i = intent(
        "i-typed",
        json!([{"op": "insert", "table": "typed", "values": typed_values()}]),
    );
    db.target.apply(&i, &meta(&i)).await.unwrap();
    // "12.340" equals 12.34 as numeric; the json column compares as jsonb (key order
    // and spacing aside); the date compares as a date.
    let i = intent(
        "i-typed-cas",
        json!([{"op": "update", "table": "typed", "key": {"id": UUID.to_uppercase()},
                "set": {"num": 99.5, "m": "ok"},
                "expect": {"num": "12.340", "j": {"a": [1, "x"]}, "d": "2024-02-29",
                           "ok": true, "ints": [1, 2, 3]}}]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(applied.ops[0].rows, 1);
    assert_eq!(
        db.db.rows("SELECT num, m::text FROM typed").await,
        vec![json!({"num": 99.50, "m": "ok"})]
    );

    let i = intent(
        "i-typed-stale",
        json!([{"op": "delete", "table": "typed", "key": {"id": UUID},
                "expect": {"num": "99.50", "m": "happy", "d": "2024-02-29"}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::EXPECT_FAILED), "{err}");
    let text = err.to_string();
    assert!(text.contains(r#"column(s) ["m"] differ"#), "{text}");
    assert!(
        !text.contains("\"d\""),
        "only differing columns are named: {text}"
    );
    // What the row holds is for humans only, never in the message.
    assert!(!text.contains(r#""ok""#), "{text}");
    let detail = err.detail.as_deref().unwrap_or_default();
    assert!(detail.contains(r#"{"m":"ok"}"#), "{detail}");
}

#[tokio::test]
async fn a_value_that_does_not_convert_names_op_column_and_type() {
    let db = setup().await;
    let cases = [
        ("i4", json!("abc"), "integer", "22P02"),
        ("i4", json!(1.5), "integer", "22P02"),
        ("i2", json!(100_000), "smallint", "22003"),
        ("i4", json!(u64::MAX), "integer", "22003"),
        ("num", json!(123_456_789.5), "numeric(10,2)", "22003"),
        ("ok", json!("maybe"), "boolean", "22P02"),
        ("d", json!("2024-02-30"), "date", "22008"),
        (
            "tz",
            json!("not a time"),
            "timestamp with time zone",
            "22007",
        ),
        ("id", json!("not-a-uuid"), "uuid", "22P02"),
        ("m", json!("angry"), "mood", "22P02"),
        ("b", json!("\\xzz"), "bytea", "22023"),
        ("ints", json!(["a"]), "integer[]", "22P02"),
        ("vc", json!("too long"), "character varying(5)", "22001"),
        ("t", json!("nul \u{0} byte"), "text", "22P05"),
    ];
    for (n, (column, value, type_name, code)) in cases.into_iter().enumerate() {
        let mut values = row(json!({"id": format!("00000000-0000-0000-0000-{n:012}")}));
        values.insert(column.to_owned(), value.clone());
        let i = intent(
            &format!("i-bad-{n}"),
            json!([
                {"op": "insert", "table": "events", "values": {"message": "first"}},
                {"op": "insert", "table": "typed", "values": Value::Object(values)},
            ]),
        );
        let err = apply_err(&db, &i, &meta(&i)).await;
        let text = err.to_string();
        assert_eq!(err.kind, ErrorKind::Permanent, "{text}");
        assert_eq!(err.op, Some(1), "{text}");
        assert_eq!(err.code.as_deref(), Some(code), "{column} {value}: {text}");
        let expected = format!(
            "op 1 (insert typed): values: column \"{column}\" of type {type_name} cannot take"
        );
        assert!(text.starts_with(&expected), "{text}\nwanted: {expected}");
    }
    // In a key, a set or an expect, the part is named.
    let i = intent(
        "i-bad-key",
        json!([{"op": "update", "table": "typed", "key": {"id": "nope"}, "set": {"t": "x"}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert!(
        err.to_string().starts_with(
            "op 0 (update typed): key: column \"id\" of type uuid cannot take \"nope\""
        ),
        "{err}"
    );
    let i = intent(
        "i-bad-set",
        json!([
            {"op": "insert", "table": "typed", "values": {"id": UUID}},
            {"op": "update", "table": "typed", "key": {"id": UUID}, "set": {"d": "someday"}},
        ]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert!(
        err.to_string()
            .starts_with("op 1 (update typed): set: column \"d\" of type date cannot take"),
        "{err}"
    );
}

#[tokio::test]
async fn update_with_expect_that_holds_records_before_and_after() {
    let db = setup().await;
    let i = intent(
        "i-update",
        json!([{"op": "update", "table": "orders", "key": {"id": 7},
                "set": {"status": "paid"}, "expect": {"status": "open"}}]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(applied.ops[0].rows, 1);
    assert_eq!(
        db.db.rows("SELECT status FROM orders WHERE id = 7").await,
        vec![json!({"status": "paid"})]
    );
    let image = &applied.ledger.undo[0];
    assert_eq!(obj(&image.key), json!({"id": 7}));
    assert_eq!(
        image.before.as_ref().map(obj),
        Some(json!({"id": 7, "customer_id": 1, "total_cents": 1500, "status": "open"}))
    );
    assert_eq!(
        image.after.as_ref().map(obj),
        Some(json!({"id": 7, "customer_id": 1, "total_cents": 1500, "status": "paid"}))
    );
}

#[tokio::test]
async fn update_with_expect_that_does_not_hold_fails_and_says_which_columns_differ() {
    let db = setup().await;
    let i = intent(
        "i-stale",
        json!([{"op": "update", "table": "orders", "key": {"id": 7},
                "set": {"status": "shipped"},
                "expect": {"status": "paid", "total_cents": 1500}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.code.as_deref(), Some(codes::EXPECT_FAILED));
    assert_eq!(err.op, Some(0));
    assert_eq!(
        err.to_string(),
        r#"op 0 (update orders): expect did not hold: key {"id":7} matched a row, but its column(s) ["status"] differ from expect"#
    );
    assert_eq!(
        err.detail.as_deref(),
        Some(r#"the row has {"status":"open"}, expect was {"status":"paid"}"#)
    );
}

#[tokio::test]
async fn update_changing_the_primary_key_records_where_the_row_is_now() {
    let db = setup().await;
    let i = intent(
        "i-rekey",
        json!([{"op": "update", "table": "orders", "key": {"id": 9}, "set": {"id": 90}}]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    let image = &applied.ledger.undo[0];
    assert_eq!(obj(&image.key), json!({"id": 90}));
    assert_eq!(image.before.as_ref().unwrap()["id"], json!(9));
    assert_eq!(image.after.as_ref().unwrap()["id"], json!(90));
}

#[tokio::test]
async fn a_null_in_the_key_matches_null() {
    let db = setup().await;
    let i = intent(
        "i-null",
        json!([{"op": "update", "table": "customers", "key": {"tier": null},
                "set": {"tier": "silver"}}]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(obj(&applied.ledger.undo[0].key), json!({"id": 2}));
    assert_eq!(
        db.db
            .rows("SELECT id, tier FROM customers ORDER BY id")
            .await,
        vec![
            json!({"id": 1, "tier": "gold"}),
            json!({"id": 2, "tier": "silver"})
        ]
    );
}

#[tokio::test]
async fn a_key_matching_no_row_fails_the_intent() {
    let db = setup().await;
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
    let db = setup().await;
    let ops = json!([{"op": "update", "table": "orders", "key": {"customer_id": 1},
                      "set": {"status": "cancelled"}}]);
    let i = intent("i-many", ops.clone());
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::TOO_MANY_ROWS));
    assert!(err.to_string().contains("more than 1 row"), "{err}");

    let i = intent("i-many-ok", ops);
    let mut m = meta(&i);
    m.max_rows = 2;
    let applied = db.target.apply(&i, &m).await.unwrap();
    assert_eq!(applied.ops[0].rows, 2);
    let mut keys: Vec<i64> = applied
        .ledger
        .undo
        .iter()
        .map(|u| u.key["id"].as_i64().unwrap())
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, vec![7, 8]);
    assert_eq!(
        db.db
            .value("SELECT count(*) FROM orders WHERE status = 'cancelled'")
            .await,
        json!(2)
    );
}

#[tokio::test]
async fn delete_with_expect() {
    let db = setup().await;
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
    assert!(
        db.db
            .rows("SELECT * FROM orders WHERE id = 9")
            .await
            .is_empty()
    );
    let image = &applied.ledger.undo[0];
    assert_eq!(obj(&image.key), json!({"id": 9}));
    assert_eq!(
        image.before.as_ref().map(obj),
        Some(json!({"id": 9, "customer_id": 2, "total_cents": 900, "status": "paid"}))
    );
    assert_eq!(image.after, None);
}

#[tokio::test]
async fn upsert_inserts_updates_or_does_nothing() {
    let db = setup().await;
    let i = intent(
        "i-upsert",
        json!([
            // Conflicts on email: updates Ada.
            {"op": "upsert", "table": "customers", "on": ["email"],
             "values": {"email": "ada@example.com", "name": "Ada L.", "tier": "platinum"}},
            // No conflict: inserts.
            {"op": "upsert", "table": "customers", "on": ["email"],
             "values": {"email": "alan@example.com", "name": "Alan"}},
            {"op": "upsert", "table": "tags", "on": ["name"], "values": {"name": "rust"}},
            // Only conflict columns: DO NOTHING.
            {"op": "upsert", "table": "tags", "on": ["name"], "values": {"name": "rust"}},
        ]),
    );
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    let counts: Vec<u64> = applied.ops.iter().map(|o| o.rows).collect();
    assert_eq!(counts, vec![1, 1, 1, 0]);
    let undo = &applied.ledger.undo;
    // The first upsert's conflicting insert drew a serial number too: Alan's id is
    // whatever the sequence gave, and the image says which.
    let alan = undo[1].key["id"].as_i64().unwrap();
    assert!(alan > 2, "{alan}");
    assert_eq!(
        db.db
            .rows("SELECT id, name, email, tier FROM customers ORDER BY id")
            .await,
        vec![
            json!({"id": 1, "name": "Ada L.", "email": "ada@example.com", "tier": "platinum"}),
            json!({"id": 2, "name": "Grace", "email": "grace@example.com", "tier": null}),
            json!({"id": alan, "name": "Alan", "email": "alan@example.com", "tier": null}),
        ]
    );
    assert_eq!(undo.len(), 4);
    assert_eq!(obj(&undo[0].key), json!({"id": 1}));
    assert_eq!(undo[0].before.as_ref().unwrap()["name"], json!("Ada"));
    assert_eq!(undo[0].after.as_ref().unwrap()["name"], json!("Ada L."));
    assert_eq!(undo[1].before, None);
    assert_eq!(obj(&undo[2].key), json!({"name": "rust"}));
    assert_eq!(
        undo[2].after.as_ref().map(obj),
        Some(json!({"name": "rust", "uses": 0}))
    );
    assert_eq!(undo[3].op, 3);
    assert!(undo[3].before.is_some());
    assert_eq!(undo[3].before, undo[3].after);

    // `on` columns without a unique constraint: PostgreSQL refuses.
    let i = intent(
        "i-upsert-no-index",
        json!([{"op": "upsert", "table": "customers", "on": ["tier"],
                "values": {"tier": "x", "name": "N"}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some("42P10"), "{err}");
}

#[tokio::test]
async fn constraint_violations_carry_their_sqlstate_and_leave_nothing_written() {
    let db = setup().await;
    let cases = [
        // Unique: the second op collides with Ada's email.
        (
            json!({"op": "insert", "table": "customers",
                   "values": {"name": "Impostor", "email": "ada@example.com"}}),
            "23505",
            "customers_email_key",
        ),
        (
            json!({"op": "insert", "table": "customers", "values": {"email": "x@example.com"}}),
            "23502",
            "\"name\"",
        ),
        (
            json!({"op": "insert", "table": "orders",
                   "values": {"id": 1, "customer_id": 42, "total_cents": 1, "status": "open"}}),
            "23503",
            "orders_customer_id_fkey",
        ),
        (
            json!({"op": "update", "table": "orders", "key": {"id": 7},
                   "set": {"total_cents": -1}}),
            "23514",
            "orders_total_cents_check",
        ),
    ];
    for (n, (op, code, named)) in cases.into_iter().enumerate() {
        let i = intent(
            &format!("i-constraint-{n}"),
            json!([
                {"op": "insert", "table": "customers",
                 "values": {"name": "Linus", "email": "linus@example.com"}},
                op,
            ]),
        );
        let err = apply_err(&db, &i, &meta(&i)).await;
        assert_eq!(err.kind, ErrorKind::Permanent, "{err}");
        assert_eq!(err.op, Some(1), "{err}");
        assert_eq!(err.code.as_deref(), Some(code), "{err}");
        assert!(err.to_string().contains(named), "{err}");
    }
    assert!(
        db.db
            .rows("SELECT * FROM customers WHERE name = 'Linus'")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn unknown_tables_and_columns_are_named() {
    let db = setup().await;
    let i = intent(
        "i-no-table",
        json!([{"op": "insert", "table": "invoices", "values": {"id": 1}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::UNKNOWN_TABLE));
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
    assert!(
        err.to_string()
            .starts_with("op 1 (update customers): set names column \"nmae\""),
        "{err}"
    );

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
    assert!(err.to_string().contains("is a view"), "{err}");
}

#[tokio::test]
async fn malformed_ops_and_airlocks_own_schema_are_refused() {
    let db = setup().await;
    for (id, key, set) in [
        ("i-empty-key", json!({}), json!({"status": "x"})),
        ("i-empty-set", json!({"id": 7}), json!({})),
    ] {
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
            "i-ledger",
            json!({"op": "insert", "table": "airlock.ledger",
                   "values": {"intent_id": "forged", "run": "r", "digest": "d",
                              "applied_at_ms": 0, "undo": []}}),
            codes::RESERVED_TABLE,
        ),
        (
            "i-version",
            json!({"op": "update", "table": "AIRLOCK.schema_version",
                   "key": {"component": "ledger"}, "set": {"version": 0}}),
            codes::RESERVED_TABLE,
        ),
    ] {
        let i = intent(id, json!([op]));
        let err = apply_err(&db, &i, &meta(&i)).await;
        assert_eq!(err.code.as_deref(), Some(code), "{id}: {err}");
        assert_eq!(err.kind, ErrorKind::Permanent, "{id}");
    }
    // Reached through search_path, the ledger is still Airlock's.
    let target = open(
        "default",
        &pg::with_param(&db.db.url, "options=-csearch_path%3Dairlock"),
    )
    .unwrap();
    let i = intent(
        "i-ledger-path",
        json!([{"op": "delete", "table": "ledger", "key": {"intent_id": "x"}}]),
    );
    let err = target.apply(&i, &meta(&i)).await.unwrap_err();
    assert_eq!(err.code.as_deref(), Some(codes::RESERVED_TABLE), "{err}");
}

#[tokio::test]
async fn hostile_values_are_stored_verbatim_and_hostile_columns_refused() {
    let db = setup().await;
    let evil = "x'); DROP TABLE customers; --";
    let i = intent(
        "i-evil",
        json!([{"op": "insert", "table": "customers", "values": {"name": evil}},
               {"op": "insert", "table": "events", "values": {"message": "$1 \\ \" ' ::text"}}]),
    );
    db.target.apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(
        db.db.rows("SELECT name FROM customers WHERE id = 3").await,
        vec![json!({"name": evil})]
    );
    assert_eq!(
        db.db.rows("SELECT message FROM events").await,
        vec![json!({"message": "$1 \\ \" ' ::text"})]
    );
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
        db.db.value("SELECT count(*) FROM customers").await,
        json!(3)
    );
}

#[tokio::test]
async fn applying_the_same_intent_twice_writes_once() {
    let db = setup().await;
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
    assert_eq!(db.db.value("SELECT count(*) FROM events").await, json!(1));

    // A new target (a restarted sidecar) sees the same ledger.
    let reopened = open("default", &db.db.url).unwrap();
    assert!(reopened.apply(&i, &m).await.unwrap().already);
    assert_eq!(db.db.value("SELECT count(*) FROM events").await, json!(1));
}

#[tokio::test]
async fn the_same_id_with_different_bytes_is_refused() {
    let db = setup().await;
    let i = intent(
        "i-dup",
        json!([{"op": "insert", "table": "events", "values": {"message": "one"}}]),
    );
    db.target.apply(&i, &meta(&i)).await.unwrap();
    let other = intent(
        "i-dup",
        json!([{"op": "insert", "table": "events", "values": {"message": "two"}}]),
    );
    let before = snapshot(&db.db).await;
    let err = db.target.apply(&other, &meta(&other)).await.unwrap_err();
    assert_eq!(snapshot(&db.db).await, before);
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.code.as_deref(), Some(codes::DIGEST_MISMATCH));
    assert!(
        err.to_string().contains("same id, different bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn an_intent_for_another_target_is_refused() {
    let db = setup().await;
    let mut i = intent(
        "i-elsewhere",
        json!([{"op": "insert", "table": "events", "values": {"message": "x"}}]),
    );
    i.target = airlock_intent::TargetName::parse("warehouse").unwrap();
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::WRONG_TARGET), "{err}");
}

#[tokio::test]
async fn a_ledger_from_a_newer_airlock_makes_intents_wait() {
    let db = setup().await;
    db.target.ledger_entry("-").await.unwrap();
    db.db
        .client
        .batch_execute("UPDATE airlock.schema_version SET version = 99")
        .await
        .unwrap();
    let fresh = open("default", &db.db.url).unwrap();
    let i = intent(
        "i-newer",
        json!([{"op": "insert", "table": "events", "values": {"message": "x"}}]),
    );
    let err = fresh.apply(&i, &meta(&i)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    assert_eq!(err.code.as_deref(), Some(codes::LEDGER), "{err}");
    assert!(err.to_string().contains("version 99"), "{err}");
}

#[tokio::test]
async fn a_database_that_is_down_is_transient_and_the_url_stays_secret() {
    // A port where nothing listens: bind one, then free it.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("postgres://airlock:hunter2@127.0.0.1:{port}/app?connect_timeout=2");
    let target = open("default", &url).unwrap();
    let i = intent(
        "i-down",
        json!([{"op": "insert", "table": "events", "values": {"message": "x"}}]),
    );
    let err = target.apply(&i, &meta(&i)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{target:?}").contains("hunter2"));
    let err = target.ledger_entry("i-down").await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");

    let err = open("default", "postgres://a:hunter2@h/db?sslmode=maybe").unwrap_err();
    assert_eq!(err.code.as_deref(), Some(codes::UNSUPPORTED_URL));
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[tokio::test]
async fn tls_is_used_when_required_and_verified_when_asked() {
    let db = setup().await;
    let ssl = db.db.value("SELECT current_setting('ssl')").await;
    let target = open("default", &pg::with_param(&db.db.url, "sslmode=require")).unwrap();
    let i = intent(
        "i-tls",
        json!([{"op": "insert", "table": "events", "values": {"message": "x"}}]),
    );
    if ssl == json!("on") {
        target.apply(&i, &meta(&i)).await.unwrap();
        assert_eq!(
            db.db
                .value(&format!(
                    "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a \
                     USING (pid) WHERE a.datname = '{}' AND a.application_name = 'airlock'",
                    db.db.name
                ))
                .await,
            json!(true)
        );
        // The server's certificate is not one the system trusts for 127.0.0.1.
        let verified = open(
            "default",
            &pg::with_param(&db.db.url, "sslmode=verify-full"),
        )
        .unwrap();
        let err = verified.apply(&i, &meta(&i)).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    } else {
        let err = target.apply(&i, &meta(&i)).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    }
}

#[tokio::test]
async fn pool_size_comes_from_the_url() {
    let target = PostgresTarget::open("t", "postgres://h/db?pool_size=3").unwrap();
    assert_eq!(target.pool_size(), 3);
    let target = PostgresTarget::open("t", "postgres://h/db").unwrap();
    assert_eq!(
        target.pool_size(),
        airlock::apply::postgres::DEFAULT_POOL_SIZE
    );
}

// ---- Faults -----------------------------------------------------------------------

/// A target that reaches the test database through a fault proxy.
/// The proxy cut the connection at every offset up to `limit` (the bytes one apply,
/// or chain, sends), and at least one cut fell between the COMMIT reaching the
/// server and its answer arriving (`ambiguous` applies answered `already` later).
fn assert_cuts_landed(proxy: &Proxy, offsets: &[u64], limit: u64, ambiguous: usize) {
    let within = offsets.iter().filter(|&&n| n <= limit).count() as u64;
    assert!(
        proxy.cuts() >= within,
        "{} cuts, {within} offsets",
        proxy.cuts()
    );
    assert!(
        ambiguous > 0,
        "no cut landed between COMMIT reaching the server and its answer"
    );
}

async fn through_proxy(db: &TestDb, pool_size: usize) -> (Proxy, Arc<dyn Target>) {
    let proxy = Proxy::start(pg::server_addr().await).await;
    let url = pg::with_address(&db.url, proxy.addr);
    let url = pg::with_param(&url, "sslmode=disable");
    let url = pg::with_param(&url, &format!("pool_size={pool_size}"));
    let target = open("default", &url).unwrap();
    (proxy, target)
}

/// An intent that inserts an event and then marks order 7 paid.
fn two_step(id: &str) -> Intent {
    intent(
        id,
        json!([
            {"op": "insert", "table": "events", "values": {"message": id}},
            {"op": "update", "table": "orders", "key": {"id": 7}, "set": {"status": "paid"}},
        ]),
    )
}

async fn events_named(db: &TestDb, message: &str) -> Value {
    db.value(&format!(
        "SELECT count(*) FROM events WHERE message = '{message}'"
    ))
    .await
}

#[tokio::test]
async fn a_connection_cut_mid_transaction_is_transient_and_the_retry_applies_once() {
    let db = setup().await;
    let (proxy, target) = through_proxy(&db.db, 2).await;
    // Warm up: the ledger exists and the connection is pooled.
    target.ledger_entry("-").await.unwrap();

    // Hold order 7, so the intent stops after its first statement, mid-transaction.
    let mut holder = pg::connect(&db.db.url).await;
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("SELECT * FROM orders WHERE id = 7 FOR UPDATE")
        .await
        .unwrap();
    let i = two_step("i-cut");
    let m = meta(&i);
    let task = {
        let (target, i, m) = (Arc::clone(&target), i.clone(), m.clone());
        tokio::spawn(async move { target.apply(&i, &m).await })
    };
    db.db.wait_for_airlock_blocked().await;
    proxy.cut_all();
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    hold.rollback().await.unwrap();

    let (applied, _) = apply_until_ok(&*target, &i, &m).await;
    assert!(!applied.already);
    assert_eq!(events_named(&db.db, "i-cut").await, json!(1));
    assert_eq!(
        db.db.value("SELECT status FROM orders WHERE id = 7").await,
        json!("paid")
    );
    assert!(target.apply(&i, &m).await.unwrap().already);
    assert_eq!(events_named(&db.db, "i-cut").await, json!(1));
}

#[tokio::test]
async fn a_commit_lost_in_flight_is_transient_and_the_ledger_makes_the_retry_a_no_op() {
    let db = setup().await;
    let (proxy, target) = through_proxy(&db.db, 1).await;
    target.ledger_entry("-").await.unwrap();

    // COMMIT reaches the server, the answer never comes back: it did commit.
    let i = two_step("i-ambiguous");
    let m = meta(&i);
    proxy.cut_on(b"COMMIT", true);
    let err = target.apply(&i, &m).await.unwrap_err();
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    assert!(
        err.to_string().contains("may or may not be applied"),
        "{err}"
    );
    // The retry waits on the intent's lock until the server has finished the old
    // transaction, then finds its ledger row.
    let (applied, _) = apply_until_ok(&*target, &i, &m).await;
    assert!(applied.already, "the retry must find the committed intent");
    assert_eq!(events_named(&db.db, "i-ambiguous").await, json!(1));

    // COMMIT never reaches the server: nothing committed, the retry applies.
    let i = two_step("i-lost");
    let m = meta(&i);
    proxy.cut_on(b"COMMIT", false);
    let err = target.apply(&i, &m).await.unwrap_err();
    assert_eq!(proxy.cuts(), 2);
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    let (applied, _) = apply_until_ok(&*target, &i, &m).await;
    assert!(!applied.already);
    assert_eq!(events_named(&db.db, "i-lost").await, json!(1));
}

#[tokio::test]
async fn cutting_the_connection_at_every_byte_never_applies_twice_or_loses_an_intent() {
    let db = setup().await;
    let (proxy, target) = through_proxy(&db.db, 1).await;
    target.ledger_entry("-").await.unwrap();
    // How many bytes one apply sends on a warm connection (statements prepared).
    let mut per_apply = 0;
    // Probe ids are as long as the sweep's, and tags are keyed by name (not by
    // ctid, whose text grows), so every apply sends as many bytes.
    for probe in ["p-cut-00001", "p-cut-00002"] {
        let start = proxy.sent();
        let i = intent(
            probe,
            json!([{"op": "insert", "table": "tags", "values": {"name": probe}}]),
        );
        target.apply(&i, &meta(&i)).await.unwrap();
        per_apply = proxy.sent() - start;
    }
    assert!(per_apply > 100, "{per_apply}");
    // Every 4th byte, and every byte of the end (ledger row, COMMIT) and past it,
    // where a cut can land between COMMIT reaching the server and its answer
    // reaching Airlock.
    let offsets: Vec<u64> = (0..per_apply.saturating_sub(64))
        .step_by(4)
        .chain(per_apply.saturating_sub(64)..=per_apply + 32)
        .collect();
    let mut ambiguous = 0;
    for &n in &offsets {
        let id = format!("i-cut-{n:05}");
        let i = intent(
            &id,
            json!([{"op": "insert", "table": "tags", "values": {"name": id}}]),
        );
        let m = meta(&i);
        proxy.cut_after(n);
        let first = target.apply(&i, &m).await;
        proxy.disarm();
        match first {
            Ok(applied) => assert!(!applied.already, "{id}"),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Transient, "{id}: {e}");
                let (applied, _) = apply_until_ok(&*target, &i, &m).await;
                if applied.already {
                    ambiguous += 1;
                }
            }
        }
        let count = format!("SELECT count(*) FROM tags WHERE name = '{id}'");
        assert_eq!(db.db.value(&count).await, json!(1), "{id}");
    }
    // Every offset within the apply cut it (a few past it may too: the driver's
    // prepared-statement names grow longer as it numbers more of them).
    assert_cuts_landed(&proxy, &offsets, per_apply, ambiguous);
    assert_eq!(
        db.db
            .value("SELECT count(*) FROM airlock.ledger WHERE intent_id LIKE 'i-cut-%'")
            .await,
        json!(offsets.len())
    );
}

#[tokio::test]
async fn a_backend_terminated_mid_transaction_is_transient_and_the_retry_applies_once() {
    let db = setup().await;
    target_warm(&db).await;
    let mut holder = pg::connect(&db.db.url).await;
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("SELECT * FROM orders WHERE id = 7 FOR UPDATE")
        .await
        .unwrap();
    let i = two_step("i-terminated");
    let m = meta(&i);
    let task = {
        let (target, i, m) = (Arc::clone(&db.target), i.clone(), m.clone());
        tokio::spawn(async move { target.apply(&i, &m).await })
    };
    db.db.wait_for_airlock_blocked().await;
    assert!(db.db.terminate_airlock_backends().await >= 1);
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    hold.rollback().await.unwrap();

    let (applied, _) = apply_until_ok(&*db.target, &i, &m).await;
    assert!(!applied.already);
    assert_eq!(events_named(&db.db, "i-terminated").await, json!(1));
    assert!(db.target.apply(&i, &m).await.unwrap().already);
    assert_eq!(events_named(&db.db, "i-terminated").await, json!(1));

    // Idle pooled connections terminated between intents: the next apply may meet
    // one, and fails transiently at worst; the retry applies once.
    assert!(db.db.terminate_airlock_backends().await >= 1);
    let i = two_step("i-after-terminate");
    let m = meta(&i);
    apply_until_ok(&*db.target, &i, &m).await;
    assert_eq!(events_named(&db.db, "i-after-terminate").await, json!(1));
}

async fn target_warm(db: &Db) {
    db.target.ledger_entry("-").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_through_the_pool_each_apply_once() {
    let db = setup().await;
    let target = open("default", &pg::with_param(&db.db.url, "pool_size=4")).unwrap();
    let mut tasks = Vec::new();
    for task in 0..8 {
        let target = Arc::clone(&target);
        tasks.push(tokio::spawn(async move {
            for n in 0..20 {
                let i = intent(
                    &format!("i-{task}-{n}"),
                    json!([{"op": "upsert", "table": "tags", "on": ["name"],
                            "values": {"name": format!("tag-{task}-{n}"), "uses": n}}]),
                );
                let applied = target.apply(&i, &meta(&i)).await.unwrap();
                assert!(!applied.already);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(db.db.value("SELECT count(*) FROM tags").await, json!(160));
    assert_eq!(
        db.db.value("SELECT count(*) FROM airlock.ledger").await,
        json!(160)
    );

    // The same intent from several tasks at once: one applies, the others find it.
    let i = two_step("i-raced");
    let m = meta(&i);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (target, i, m) = (Arc::clone(&target), i.clone(), m.clone());
        tasks.push(tokio::spawn(async move { target.apply(&i, &m).await }));
    }
    let mut fresh = 0;
    for task in tasks {
        if !task.await.unwrap().unwrap().already {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1);
    assert_eq!(events_named(&db.db, "i-raced").await, json!(1));
}

#[tokio::test]
async fn preview_reports_rows_and_images_and_writes_nothing() {
    let db = setup().await;
    let i = intent(
        "p-1",
        json!([
            {"op": "update", "table": "customers", "key": {"id": 1}, "set": {"tier": "silver"}},
            {"op": "insert", "table": "orders",
             "values": {"id": 10, "customer_id": 2, "total_cents": 100, "status": "open"}},
            {"op": "delete", "table": "orders", "key": {"id": 9}}
        ]),
    );
    // The first apply creates the ledger, so take the snapshot after one exists.
    db.target.ledger_entry("-").await.unwrap();
    let before = snapshot(&db.db).await;
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
    assert_eq!(update.before.as_ref().unwrap()["tier"], json!("gold"));
    assert_eq!(update.after.as_ref().unwrap()["tier"], json!("silver"));
    assert!(preview.ops[1].images[0].before.is_none());
    assert!(preview.ops[2].images[0].after.is_none());
    // Nothing written: neither the rows nor the ledger (part of the snapshot).
    assert_eq!(snapshot(&db.db).await, before);
    assert!(db.target.ledger_entry("p-1").await.unwrap().is_none());

    // The images are those a real apply records.
    let applied = db.target.apply(&i, &meta(&i)).await.unwrap();
    let images: Vec<_> = preview.ops.into_iter().flat_map(|op| op.images).collect();
    assert_eq!(applied.ledger.undo, images);
    let again = db.target.preview(&i, &meta(&i)).await.unwrap();
    assert!(again.already);
    assert!(again.ops.is_empty());
}

#[tokio::test]
async fn preview_of_a_failing_intent_is_its_error_and_writes_nothing() {
    let db = setup().await;
    let i = intent(
        "p-2",
        json!([
            {"op": "update", "table": "customers", "key": {"id": 1}, "set": {"tier": "silver"}},
            {"op": "insert", "table": "orders",
             "values": {"id": 11, "customer_id": 1, "total_cents": -5, "status": "open"}}
        ]),
    );
    db.target.ledger_entry("-").await.unwrap();
    let before = snapshot(&db.db).await;
    let err = db.target.preview(&i, &meta(&i)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.op, Some(1));
    assert_eq!(err.code.as_deref(), Some("23514"), "{err}");
    assert_eq!(snapshot(&db.db).await, before);
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
            json!([{"op": "insert", "table": "customers", "values": {"id": 30, "name": "Edsger"}}]),
        ),
        intent(
            "c-2",
            json!([{"op": "insert", "table": "orders",
                    "values": {"id": 10, "customer_id": 30, "total_cents": 100, "status": "open"}}]),
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

async fn ledger_ids(db: &TestDb) -> Vec<Value> {
    db.rows("SELECT intent_id FROM airlock.ledger ORDER BY intent_id")
        .await
        .into_iter()
        .map(|r| r["intent_id"].clone())
        .collect()
}

/// Applies `chain` as the pipeline does until every intent is applied: the `Ok`s
/// of an answer are done, the intents from its first error on are tried again.
/// Every error on the way must be transient, and no `Ok` may follow an error.
/// Answers each intent's final result and the errors met.
async fn apply_chain_until_ok(
    target: &dyn Target,
    chain: &[(Intent, ApplyMeta)],
) -> (Vec<Applied>, Vec<ApplyError>) {
    let mut done = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..50 {
        if done.len() == chain.len() {
            return (done, failures);
        }
        let results = target.apply_chain(&chain[done.len()..]).await;
        assert!(!results.is_empty());
        assert!(results.len() <= chain.len() - done.len());
        let mut failed = false;
        for result in results {
            match result {
                Ok(applied) => {
                    assert!(!failed, "an applied intent after a failed one");
                    done.push(applied);
                }
                Err(e) => {
                    assert_eq!(e.kind, ErrorKind::Transient, "{e}");
                    failed = true;
                    failures.push(e);
                }
            }
        }
    }
    panic!("the chain did not apply in 50 attempts: {failures:?}");
}

#[tokio::test]
async fn a_chain_applies_in_order_with_every_ledger_row() {
    let db = setup().await;
    // Note the (top-level) transaction of every ledger row written.
    db.target.ledger_entry("-").await.unwrap();
    db.db
        .client
        .batch_execute(
            "CREATE TABLE txs(tx bigint);
             CREATE FUNCTION note_tx() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO public.txs VALUES (txid_current()); RETURN NEW; END $$;
             CREATE TRIGGER note_tx AFTER INSERT ON airlock.ledger
               FOR EACH ROW EXECUTE FUNCTION note_tx();",
        )
        .await
        .unwrap();
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
    assert_eq!(
        db.db
            .value("SELECT name FROM customers WHERE id = 30")
            .await,
        json!("Edsger")
    );
    assert_eq!(
        db.db
            .value("SELECT count(*) FROM orders WHERE id = 10")
            .await,
        json!(0)
    );
    assert_eq!(events_named(&db.db, "c-4").await, json!(1));
    assert_eq!(
        ledger_ids(&db.db).await,
        vec![
            json!("c-1"),
            json!("c-2"),
            json!("c-3"),
            json!("c-4"),
            json!("c-5")
        ]
    );
    // One transaction wrote every ledger row.
    assert_eq!(
        db.db
            .rows("SELECT count(*) AS rows, count(DISTINCT tx) AS txs FROM txs")
            .await,
        vec![json!({"rows": 5, "txs": 1})]
    );
    let third = db.target.ledger_entry("c-3").await.unwrap().unwrap();
    assert_eq!(third.digest, meta(&intents[2]).digest);
    assert_eq!(third.undo.len(), 1);
    assert_eq!(
        third.undo[0].before.as_ref().unwrap()["status"],
        json!("open")
    );
    assert_eq!(
        third.undo[0].after.as_ref().unwrap()["status"],
        json!("paid")
    );
    let again = db.target.apply_chain(&chain(&intents)).await;
    assert_eq!(again.len(), 5);
    assert!(again.iter().all(|r| r.as_ref().unwrap().already));
}

#[tokio::test]
async fn a_chain_stops_at_a_failing_intent_and_commits_the_ones_before() {
    let db = setup().await;
    let mut intents = five_in_order();
    // The third intent writes an event, then breaks a CHECK constraint.
    intents[2] = intent(
        "c-3",
        json!([
            {"op": "insert", "table": "events", "values": {"message": "c-3"}},
            {"op": "update", "table": "orders", "key": {"id": 10}, "set": {"total_cents": -1}},
        ]),
    );
    let results = db.target.apply_chain(&chain(&intents)).await;
    assert_eq!(results.len(), 3, "{results:?}");
    assert!(!results[0].as_ref().unwrap().already);
    assert!(!results[1].as_ref().unwrap().already);
    let err = results[2].as_ref().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent, "{err}");
    assert_eq!(err.op, Some(1), "{err}");
    assert_eq!(err.code.as_deref(), Some("23514"), "{err}");
    assert_eq!(
        db.db
            .rows("SELECT id, total_cents, status FROM orders WHERE id = 10")
            .await,
        vec![json!({"id": 10, "total_cents": 100, "status": "open"})]
    );
    assert_eq!(events_named(&db.db, "c-3").await, json!(0));
    assert_eq!(events_named(&db.db, "c-4").await, json!(0));
    assert_eq!(ledger_ids(&db.db).await, vec![json!("c-1"), json!("c-2")]);
}

#[tokio::test]
async fn a_value_that_does_not_convert_in_a_chain_is_explained_after_the_commit() {
    let db = setup().await;
    let intents = [
        intent(
            "v-1",
            json!([{"op": "insert", "table": "events", "values": {"message": "v-1"}}]),
        ),
        intent(
            "v-2",
            json!([
                {"op": "insert", "table": "events", "values": {"message": "v-2"}},
                {"op": "insert", "table": "typed", "values": {"id": UUID, "i4": "abc"}},
            ]),
        ),
    ];
    let results = db.target.apply_chain(&chain(&intents)).await;
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(results[0].is_ok());
    let err = results[1].as_ref().unwrap_err();
    assert_eq!(err.code.as_deref(), Some("22P02"), "{err}");
    assert!(
        err.to_string()
            .starts_with("op 1 (insert typed): values: column \"i4\" of type integer cannot take"),
        "{err}"
    );
    assert_eq!(events_named(&db.db, "v-1").await, json!(1));
    assert_eq!(events_named(&db.db, "v-2").await, json!(0));
}

#[tokio::test]
async fn a_chain_answers_already_for_an_intent_in_the_ledger() {
    let db = setup().await;
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
    let results = db.target.apply_chain(&chain(&intents[2..])).await;
    let flags: Vec<bool> = results
        .iter()
        .map(|r| r.as_ref().unwrap().already)
        .collect();
    assert_eq!(flags, vec![true, false, false]);
    assert_eq!(ledger_ids(&db.db).await.len(), 5);
    assert_eq!(
        db.db
            .value("SELECT count(*) FROM customers WHERE id = 30")
            .await,
        json!(1)
    );
}

#[tokio::test]
async fn a_deferred_constraint_refused_at_commit_fails_only_its_intent() {
    let db = setup().await;
    db.db
        .client
        .batch_execute(
            "CREATE TABLE lines(id integer PRIMARY KEY, order_id integer
                 REFERENCES orders(id) DEFERRABLE INITIALLY DEFERRED)",
        )
        .await
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
    assert_eq!(err.code.as_deref(), Some("23503"), "{err}");
    assert_eq!(
        db.db.rows("SELECT id FROM lines").await,
        vec![json!({"id": 1})]
    );
    assert_eq!(ledger_ids(&db.db).await, vec![json!("l-1")]);
}

#[tokio::test]
async fn a_connection_cut_mid_chain_is_transient_for_every_intent_and_the_retries_apply_once() {
    let db = setup().await;
    let (proxy, target) = through_proxy(&db.db, 2).await;
    target.ledger_entry("-").await.unwrap();

    // Hold order 7, so the chain stops in its third intent, mid-transaction.
    let mut holder = pg::connect(&db.db.url).await;
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("SELECT * FROM orders WHERE id = 7 FOR UPDATE")
        .await
        .unwrap();
    let intents = [
        two_step_free("k-1"),
        two_step_free("k-2"),
        two_step("k-3"),
        two_step_free("k-4"),
    ];
    let links = chain(&intents);
    let task = {
        let (target, links) = (Arc::clone(&target), links.clone());
        tokio::spawn(async move { target.apply_chain(&links).await })
    };
    db.db.wait_for_airlock_blocked().await;
    proxy.cut_all();
    let results = task.await.unwrap();
    // The first two ran in the lost transaction: they are not applied, and say so.
    assert_eq!(results.len(), 3, "{results:?}");
    for result in &results {
        let err = result.as_ref().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    }
    assert!(ledger_ids(&db.db).await.is_empty());
    assert_eq!(events_named(&db.db, "k-1").await, json!(0));
    hold.rollback().await.unwrap();

    let (applied, _) = apply_chain_until_ok(&*target, &links).await;
    assert!(applied.iter().all(|a| !a.already));
    for i in &intents {
        assert_eq!(events_named(&db.db, i.id.as_str()).await, json!(1));
    }
    assert_eq!(ledger_ids(&db.db).await.len(), 4);
    let again = target.apply_chain(&links).await;
    assert!(again.iter().all(|r| r.as_ref().unwrap().already));
}

#[tokio::test]
async fn a_chain_commit_lost_in_flight_is_transient_and_the_retry_finds_the_ledger() {
    let db = setup().await;
    let (proxy, target) = through_proxy(&db.db, 1).await;
    target.ledger_entry("-").await.unwrap();

    // COMMIT reaches the server, the answer never comes back: it did commit.
    let intents = [
        two_step_free("a-1"),
        two_step_free("a-2"),
        two_step_free("a-3"),
    ];
    let links = chain(&intents);
    proxy.cut_on(b"COMMIT", true);
    let results = target.apply_chain(&links).await;
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(results.len(), 3, "{results:?}");
    for result in &results {
        let err = result.as_ref().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Transient, "{err}");
        assert!(err.to_string().contains("may or may not be"), "{err}");
    }
    // The retry waits on the intents' locks until the server has finished the old
    // transaction, then finds their ledger rows.
    let (applied, _) = apply_chain_until_ok(&*target, &links).await;
    assert!(applied.iter().all(|a| a.already), "{applied:?}");
    for i in &intents {
        assert_eq!(events_named(&db.db, i.id.as_str()).await, json!(1));
    }

    // COMMIT never reaches the server: nothing committed, the retry applies.
    let intents = [two_step_free("b-1"), two_step_free("b-2")];
    let links = chain(&intents);
    proxy.cut_on(b"COMMIT", false);
    let results = target.apply_chain(&links).await;
    assert_eq!(proxy.cuts(), 2);
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().unwrap_err().is_transient())
    );
    let (applied, _) = apply_chain_until_ok(&*target, &links).await;
    assert!(applied.iter().all(|a| !a.already));
    for i in &intents {
        assert_eq!(events_named(&db.db, i.id.as_str()).await, json!(1));
    }
    assert_eq!(ledger_ids(&db.db).await.len(), 5);
}

#[tokio::test]
async fn cutting_a_chain_at_every_few_bytes_never_applies_twice_or_loses_an_intent() {
    let db = setup().await;
    let (proxy, target) = through_proxy(&db.db, 1).await;
    target.ledger_entry("-").await.unwrap();
    // Ids of one length, tags keyed by name: every chain sends as many bytes.
    let links = |round: &str| {
        chain(
            &(1..=3)
                .map(|k| {
                    let id = format!("x-{round}-{k}");
                    intent(
                        &id,
                        json!([{"op": "insert", "table": "tags", "values": {"name": id}}]),
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    let mut per_chain = 0;
    for probe in ["p0001", "p0002"] {
        let start = proxy.sent();
        let results = target.apply_chain(&links(probe)).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        per_chain = proxy.sent() - start;
    }
    assert!(per_chain > 300, "{per_chain}");
    // Every 7th byte, and every byte of the end (COMMIT) and past it.
    let offsets: Vec<u64> = (0..per_chain.saturating_sub(48))
        .step_by(7)
        .chain(per_chain.saturating_sub(48)..=per_chain + 24)
        .collect();
    let mut ambiguous = 0;
    for &n in &offsets {
        let round = format!("{n:05}");
        let chain = links(&round);
        proxy.cut_after(n);
        let first = target.apply_chain(&chain).await;
        proxy.disarm();
        let mut failed = false;
        for result in &first {
            match result {
                Ok(applied) => assert!(!failed && !applied.already, "{round}: {first:?}"),
                Err(e) => {
                    assert_eq!(e.kind, ErrorKind::Transient, "{round}: {e}");
                    failed = true;
                }
            }
        }
        let done = first.iter().take_while(|r| r.is_ok()).count();
        let (rest, _) = apply_chain_until_ok(&*target, &chain[done..]).await;
        if rest.iter().any(|a| a.already) {
            ambiguous += 1;
        }
        for (i, _) in &chain {
            let count = format!("SELECT count(*) FROM tags WHERE name = '{}'", i.id.as_str());
            assert_eq!(db.db.value(&count).await, json!(1), "{round}");
        }
    }
    assert_cuts_landed(&proxy, &offsets, per_chain, ambiguous);
    assert_eq!(
        db.db
            .value("SELECT count(*) FROM airlock.ledger WHERE intent_id LIKE 'x-%'")
            .await,
        json!(3 * (offsets.len() + 2))
    );
}

/// An intent that inserts two events and touches no shared row.
fn two_step_free(id: &str) -> Intent {
    intent(
        id,
        json!([
            {"op": "insert", "table": "events", "values": {"message": id}},
            {"op": "insert", "table": "events", "values": {"message": format!("{id}/2")}},
        ]),
    )
}
