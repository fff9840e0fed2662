//! Behaviour only the PostgreSQL target has, against the real local server, one
//! fresh database per test: typed values and their conversion errors, the ledger's
//! own schema and its versions, connection settings (TLS, pool size, a server that
//! is down), connection faults (a TCP proxy that cuts connections, backends
//! terminated by the server), concurrent applies through the pool, and chains
//! under those faults.

use std::sync::Arc;

use airlock::apply::{
    Applied, ApplyError, ApplyMeta, ErrorKind, PostgresTarget, Target, codes, open,
};
use airlock_intent::Intent;
use serde_json::{Value, json};

use crate::fixture::{
    Fixture, Postgres, apply_err, chain, five_in_order, intent, meta, obj, replay_meta, row,
};
use crate::pg::{self, Proxy, TestDb};

const UUID: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";

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
    let db = Postgres::setup().await;
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
    let db = Postgres::setup().await;
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
    let db = Postgres::setup().await;
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
async fn a_ledger_from_a_newer_airlock_makes_intents_wait() {
    let db = Postgres::setup().await;
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
    let db = Postgres::setup().await;
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

async fn events_named(db: &TestDb, message: &str) -> Value {
    db.value(&format!(
        "SELECT count(*) FROM events WHERE message = '{message}'"
    ))
    .await
}

#[tokio::test]
async fn a_connection_cut_mid_transaction_is_transient_and_the_retry_applies_once() {
    let db = Postgres::setup().await;
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
    let db = Postgres::setup().await;
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
    let db = Postgres::setup().await;
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
    let db = Postgres::setup().await;
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

async fn target_warm(db: &Postgres) {
    db.target.ledger_entry("-").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_through_the_pool_each_apply_once() {
    let db = Postgres::setup().await;
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
async fn a_value_that_does_not_convert_in_a_chain_is_explained_after_the_commit() {
    let db = Postgres::setup().await;
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
async fn a_connection_cut_mid_chain_is_transient_for_every_intent_and_the_retries_apply_once() {
    let db = Postgres::setup().await;
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
    let db = Postgres::setup().await;
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
    let db = Postgres::setup().await;
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

#[tokio::test]
async fn airlocks_own_schema_is_refused_through_any_spelling() {
    let db = Postgres::setup().await;
    let i = intent(
        "i-version",
        json!([{"op": "update", "table": "AIRLOCK.schema_version",
                "key": {"component": "ledger"}, "set": {"version": 0}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::RESERVED_TABLE), "{err}");
    assert_eq!(err.kind, ErrorKind::Permanent);
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
async fn a_chain_is_one_transaction() {
    let db = Postgres::setup().await;
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
    let results = db.target.apply_chain(&chain(&five_in_order())).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // One transaction wrote every ledger row.
    assert_eq!(
        db.db
            .rows("SELECT count(*) AS rows, count(DISTINCT tx) AS txs FROM txs")
            .await,
        vec![json!({"rows": 5, "txs": 1})]
    );
}

/// Only a replay writes an identity column `GENERATED ALWAYS` (`OVERRIDING SYSTEM
/// VALUE`), and only with the value the database generated the first time: an
/// agent's value for one is refused, in a replay too. The sequences of the
/// replayed columns move past the values written, never back.
#[tokio::test]
async fn only_a_replay_overrides_an_identity_column_and_its_sequence_follows() {
    let db = Postgres::setup().await;
    db.execute(
        "CREATE TABLE ids(id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                          other INTEGER GENERATED ALWAYS AS IDENTITY, name TEXT NOT NULL); \
         CREATE TABLE byd(id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, \
                          name TEXT NOT NULL)",
    )
    .await;
    // The agent names the identity column: the database refuses.
    let named = intent(
        "a-1",
        json!([{"op": "insert", "table": "ids", "values": {"id": 7, "name": "x"}}]),
    );
    let err = apply_err(&db, &named, &meta(&named)).await;
    assert_eq!(err.code.as_deref(), Some("428C9"), "{err}");
    assert_eq!(err.kind, ErrorKind::Permanent);

    // A replay writes the recorded values into both kinds of identity column.
    let replayed = intent(
        "r-1",
        json!([
            {"op": "insert", "table": "ids", "values": {"name": "r"}},
            {"op": "insert", "table": "byd", "values": {"name": "r"}},
        ]),
    );
    let recorded = json!([
        {"op": 0, "table": "ids", "key": {"id": 7}, "before": null,
         "after": {"id": 7, "other": 3, "name": "r"}},
        {"op": 1, "table": "byd", "key": {"id": 9}, "before": null,
         "after": {"id": 9, "name": "r"}},
    ]);
    db.target()
        .apply(&replayed, &replay_meta(&replayed, recorded))
        .await
        .unwrap();
    assert_eq!(
        db.rows("SELECT * FROM ids").await,
        [json!({"id": 7, "other": 3, "name": "r"})]
    );
    assert_eq!(
        db.rows("SELECT * FROM byd").await,
        [json!({"id": 9, "name": "r"})]
    );

    // A replay of an op that names an identity column itself gets no override,
    // even when the recorded values fill another one.
    let sneaky = intent(
        "r-2",
        json!([{"op": "insert", "table": "ids", "values": {"other": 100, "name": "s"}}]),
    );
    let recorded = json!([
        {"op": 0, "table": "ids", "key": {"id": 8}, "before": null,
         "after": {"id": 8, "other": 100, "name": "s"}},
    ]);
    let err = apply_err(&db, &sneaky, &replay_meta(&sneaky, recorded)).await;
    assert_eq!(err.code.as_deref(), Some("428C9"), "{err}");

    // The sequences moved past the replayed values (not back for smaller ones):
    // ordinary inserts do not collide.
    let small = intent(
        "r-3",
        json!([{"op": "insert", "table": "byd", "values": {"name": "small"}}]),
    );
    let recorded = json!([
        {"op": 0, "table": "byd", "key": {"id": 2}, "before": null,
         "after": {"id": 2, "name": "small"}},
    ]);
    db.target()
        .apply(&small, &replay_meta(&small, recorded))
        .await
        .unwrap();
    let next = intent(
        "n-1",
        json!([
            {"op": "insert", "table": "ids", "values": {"name": "n"}},
            {"op": "insert", "table": "byd", "values": {"name": "n"}},
        ]),
    );
    let applied = db.target().apply(&next, &meta(&next)).await.unwrap();
    let after: Vec<Value> = applied
        .ledger
        .undo
        .iter()
        .map(|i| i.after.as_ref().map(obj).unwrap())
        .collect();
    assert_eq!(
        after,
        [
            json!({"id": 8, "other": 4, "name": "n"}),
            json!({"id": 10, "name": "n"}),
        ]
    );
}

/// Undo restores the rows of a table with an identity column `GENERATED ALWAYS`
/// and a stored generated column: it writes neither the computed column nor, when
/// it sets a row back, the identity (which nothing could have changed), and it
/// inserts a deleted row back with its own identity value.
#[tokio::test]
async fn undo_restores_rows_with_identity_and_generated_columns() {
    let db = Postgres::setup().await;
    db.execute(
        "CREATE TABLE gen(id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                          name TEXT NOT NULL, \
                          len INTEGER GENERATED ALWAYS AS (length(name)) STORED); \
         INSERT INTO gen (name) VALUES ('one'), ('two')",
    )
    .await;
    let before = db.rows("SELECT * FROM gen ORDER BY id").await;
    let i = intent(
        "u-1",
        json!([
            {"op": "update", "table": "gen", "key": {"id": 1}, "set": {"name": "uno"}},
            {"op": "delete", "table": "gen", "key": {"id": 2}},
            {"op": "insert", "table": "gen", "values": {"name": "three"}},
        ]),
    );
    db.target().apply(&i, &meta(&i)).await.unwrap();
    let report = db.target().undo(&["u-1".to_owned()], false).await.unwrap();
    assert!(report.committed, "{report:?}");
    assert_eq!(db.rows("SELECT * FROM gen ORDER BY id").await, before);
}
