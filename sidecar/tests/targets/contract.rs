//! The contract every [`Target`](airlock::apply::Target) keeps, one test body per
//! rule, run against each target by [`contract!`]: what each op writes and the undo
//! images it records, the checks that fail an intent (writing nothing), atomicity,
//! exactly-once through the ledger, preview, and chains of intents in one
//! transaction. Where the databases differ honestly (a constraint's code, how a row
//! without a primary key is identified), the [`Fixture`] says how.

use airlock::apply::sql::Dialect;
use airlock::apply::{ErrorKind, codes};
use airlock_intent::{Op, TableName};
use serde_json::{Value, json};

use crate::fixture::{
    Constraint, Fixture, apply_err, chain, five_in_order, intent, meta, obj, replay_meta, row,
    unchecked,
};

/// Instantiates each named contract test once per target: `contract::sqlite::NAME`
/// and `contract::postgres::NAME`.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name::<crate::fixture::Sqlite>().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name::<crate::fixture::Postgres>().await;
                }
            )*
        }
    };
}

contract!(
    insert_writes_the_row_and_records_an_after_image,
    rows_without_a_primary_key_are_keyed_by_row_identity_and_schemas_are_honoured,
    update_with_expect_that_holds_records_before_and_after,
    update_with_expect_that_does_not_hold_fails_and_says_which_columns_differ,
    update_changing_the_primary_key_records_where_the_row_is_now,
    a_null_in_the_key_matches_null,
    a_key_matching_no_row_fails_the_intent,
    a_key_matching_more_rows_than_max_rows_fails_the_intent,
    delete_with_expect,
    upsert_inserts_updates_or_does_nothing,
    constraint_violations_carry_their_code_and_leave_nothing_written,
    unknown_tables_and_columns_are_named,
    malformed_ops_and_the_ledger_are_refused_before_writing,
    hostile_values_are_stored_verbatim_and_hostile_columns_refused,
    applying_the_same_intent_twice_writes_once,
    the_same_id_with_different_bytes_is_refused,
    an_intent_for_another_target_is_refused,
    preview_reports_rows_and_images_and_writes_nothing,
    preview_of_a_failing_intent_is_its_error_and_writes_nothing,
    a_chain_applies_in_order_with_every_ledger_row,
    a_chain_stops_at_a_failing_intent_and_commits_the_ones_before,
    a_chain_answers_already_for_an_intent_in_the_ledger,
    a_deferred_foreign_key_refused_at_commit_fails_only_its_intent,
    a_replay_writes_the_values_the_database_generated_the_first_time,
);

async fn insert_writes_the_row_and_records_an_after_image<F: Fixture>() {
    let db = F::setup().await;
    let i = intent(
        "i-insert",
        json!([{"op": "insert", "table": "customers",
                "values": {"name": "Linus", "email": "linus@example.com"}}]),
    );
    let m = meta(&i);
    let applied = db.target().apply(&i, &m).await.unwrap();
    assert!(!applied.already);
    assert_eq!(applied.ops.len(), 1);
    assert_eq!((applied.ops[0].index, applied.ops[0].rows), (0, 1));
    assert_eq!(
        db.rows("SELECT * FROM customers WHERE id = 3").await,
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
    // The ledger row is in the target, in Airlock's own table, at the current
    // version, readable back as the same entry.
    let ledger = format!(
        "SELECT intent_id, run, digest FROM {}",
        F::DIALECT.ledger_table()
    );
    assert_eq!(
        db.rows(&ledger).await,
        vec![json!({"intent_id": "i-insert", "run": "run-1", "digest": m.digest})]
    );
    let version = format!(
        "SELECT component, version FROM {}",
        F::DIALECT.version_table()
    );
    assert_eq!(
        db.rows(&version).await,
        vec![json!({"component": "ledger", "version": airlock::apply::sql::LEDGER_VERSION})]
    );
    let stored = db.target().ledger_entry("i-insert").await.unwrap().unwrap();
    assert_eq!(stored, applied.ledger);
}

async fn rows_without_a_primary_key_are_keyed_by_row_identity_and_schemas_are_honoured<
    F: Fixture,
>() {
    let db = F::setup().await;
    let (table, values, key) = F::qualified();
    let i = intent(
        "i-event",
        json!([
            {"op": "insert", "table": "events", "values": {"message": "hello"}},
            {"op": "insert", "table": table, "values": values},
        ]),
    );
    let applied = db.target().apply(&i, &meta(&i)).await.unwrap();
    let image = &applied.ledger.undo[0];
    assert_eq!(obj(&image.key), F::first_event_key());
    assert_eq!(
        image.after.as_ref().map(obj),
        Some(json!({"message": "hello"}))
    );
    let image = &applied.ledger.undo[1];
    assert_eq!(image.table, table);
    assert_eq!(obj(&image.key), key);
    assert_eq!(image.after.as_ref().map(obj), Some(values.clone()));
    assert_eq!(
        db.rows(&format!("SELECT * FROM {table}")).await,
        vec![values]
    );
}

async fn update_with_expect_that_holds_records_before_and_after<F: Fixture>() {
    let db = F::setup().await;
    let i = intent(
        "i-update",
        json!([{"op": "update", "table": "orders", "key": {"id": 7},
                "set": {"status": "paid"}, "expect": {"status": "open"}}]),
    );
    let applied = db.target().apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(applied.ops[0].rows, 1);
    assert_eq!(
        db.rows("SELECT status FROM orders WHERE id = 7").await,
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

async fn update_with_expect_that_does_not_hold_fails_and_says_which_columns_differ<F: Fixture>() {
    let db = F::setup().await;
    let i = intent(
        "i-stale",
        json!([{"op": "update", "table": "orders", "key": {"id": 7},
                "set": {"status": "shipped"}, "expect": {"status": "paid"}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.code.as_deref(), Some(codes::EXPECT_FAILED));
    assert_eq!(err.op, Some(0));
    // The agent learns which columns differ; what the row holds is for humans.
    assert_eq!(
        err.to_string(),
        r#"op 0 (update orders): expect did not hold: key {"id":7} matched a row, but its column(s) ["status"] differ from expect"#
    );
    assert!(!err.to_string().contains("open"), "{err}");
    assert_eq!(
        err.detail.as_deref(),
        Some(r#"the row has {"status":"open"}, expect was {"status":"paid"}"#)
    );

    // A column of expect that holds is not named.
    let i = intent(
        "i-stale-2",
        json!([{"op": "update", "table": "orders", "key": {"id": 7},
                "set": {"status": "shipped"},
                "expect": {"status": "paid", "total_cents": 1500}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::EXPECT_FAILED));
    assert!(
        err.to_string()
            .ends_with(r#"but its column(s) ["status"] differ from expect"#),
        "{err}"
    );
    let detail = err.detail.as_deref().unwrap_or_default();
    assert!(detail.contains(r#""status":"open""#), "{detail}");
}

async fn update_changing_the_primary_key_records_where_the_row_is_now<F: Fixture>() {
    let db = F::setup().await;
    let i = intent(
        "i-rekey",
        json!([{"op": "update", "table": "orders", "key": {"id": 9}, "set": {"id": 90}}]),
    );
    let applied = db.target().apply(&i, &meta(&i)).await.unwrap();
    let image = &applied.ledger.undo[0];
    assert_eq!(obj(&image.key), json!({"id": 90}));
    assert_eq!(image.before.as_ref().unwrap()["id"], json!(9));
    assert_eq!(image.after.as_ref().unwrap()["id"], json!(90));
}

async fn a_null_in_the_key_matches_null<F: Fixture>() {
    let db = F::setup().await;
    let i = intent(
        "i-null",
        json!([{"op": "update", "table": "customers", "key": {"tier": null},
                "set": {"tier": "silver"}}]),
    );
    let applied = db.target().apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(obj(&applied.ledger.undo[0].key), json!({"id": 2}));
    assert_eq!(
        db.rows("SELECT id, tier FROM customers ORDER BY id").await,
        vec![
            json!({"id": 1, "tier": "gold"}),
            json!({"id": 2, "tier": "silver"})
        ]
    );
}

async fn a_key_matching_no_row_fails_the_intent<F: Fixture>() {
    let db = F::setup().await;
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
    assert!(db.rows("SELECT * FROM events").await.is_empty());

    // With an expect, a missing row is still "matched no row", not a failed expect.
    let i = intent(
        "i-missing-2",
        json!([{"op": "delete", "table": "orders", "key": {"id": 99},
                "expect": {"status": "open"}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::NO_ROW), "{err}");
}

async fn a_key_matching_more_rows_than_max_rows_fails_the_intent<F: Fixture>() {
    let db = F::setup().await;
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
    let applied = db.target().apply(&i, &m).await.unwrap();
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
        db.value("SELECT count(*) FROM orders WHERE status = 'cancelled'")
            .await,
        json!(2)
    );
}

async fn delete_with_expect<F: Fixture>() {
    let db = F::setup().await;
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
    let applied = db.target().apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(applied.ops[0].rows, 1);
    assert!(
        db.rows("SELECT * FROM orders WHERE id = 9")
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

async fn upsert_inserts_updates_or_does_nothing<F: Fixture>() {
    let db = F::setup().await;
    let i = intent(
        "i-upsert",
        json!([
            // Conflicts on email: updates Ada.
            {"op": "upsert", "table": "customers", "on": ["email"],
             "values": {"email": "ada@example.com", "name": "Ada L.", "tier": "platinum"}},
            // No conflict: inserts.
            {"op": "upsert", "table": "customers", "on": ["email"],
             "values": {"email": "alan@example.com", "name": "Alan"}},
            // (An SQLite WITHOUT ROWID table, found again by its primary key.)
            {"op": "upsert", "table": "tags", "on": ["name"], "values": {"name": "rust"}},
            // Only conflict columns: DO NOTHING.
            {"op": "upsert", "table": "tags", "on": ["name"], "values": {"name": "rust"}},
        ]),
    );
    let applied = db.target().apply(&i, &meta(&i)).await.unwrap();
    let counts: Vec<u64> = applied.ops.iter().map(|o| o.rows).collect();
    assert_eq!(counts, vec![1, 1, 1, 0]);
    let undo = &applied.ledger.undo;
    // On PostgreSQL the first upsert's conflicting insert drew a serial number too:
    // Alan's id is whatever the database gave, and the image says which.
    let alan = undo[1].key["id"].as_i64().unwrap();
    assert!(alan > 2, "{alan}");
    assert_eq!(
        db.rows("SELECT id, name, email, tier FROM customers ORDER BY id")
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

    // `on` columns without a unique constraint: the database refuses.
    let i = intent(
        "i-upsert-no-index",
        json!([{"op": "upsert", "table": "customers", "on": ["tier"],
                "values": {"tier": "x", "name": "N"}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(F::UPSERT_WITHOUT_UNIQUE), "{err}");
}

async fn constraint_violations_carry_their_code_and_leave_nothing_written<F: Fixture>() {
    let db = F::setup().await;
    let cases = [
        // The second op collides with Ada's email.
        (
            json!({"op": "insert", "table": "customers",
                   "values": {"name": "Impostor", "email": "ada@example.com"}}),
            Constraint::Unique,
        ),
        (
            json!({"op": "insert", "table": "customers", "values": {"email": "x@example.com"}}),
            Constraint::NotNull,
        ),
        (
            json!({"op": "insert", "table": "orders",
                   "values": {"id": 1, "customer_id": 42, "total_cents": 1, "status": "open"}}),
            Constraint::ForeignKey,
        ),
        (
            json!({"op": "update", "table": "orders", "key": {"id": 7},
                   "set": {"total_cents": -1}}),
            Constraint::Check,
        ),
    ];
    for (n, (op, constraint)) in cases.into_iter().enumerate() {
        let (code, named) = F::constraint(constraint);
        let i = intent(
            &format!("i-constraint-{n}"),
            json!([
                {"op": "insert", "table": "customers",
                 "values": {"name": "Linus", "email": "linus@example.com"}},
                op,
            ]),
        );
        let err = apply_err(&db, &i, &meta(&i)).await;
        assert_eq!(err.kind, ErrorKind::Permanent, "{constraint:?}: {err}");
        assert_eq!(err.op, Some(1), "{constraint:?}: {err}");
        assert_eq!(err.code.as_deref(), Some(code), "{constraint:?}: {err}");
        assert!(err.to_string().contains(named), "{constraint:?}: {err}");
    }
    assert!(
        db.rows("SELECT * FROM customers WHERE name = 'Linus'")
            .await
            .is_empty()
    );
    assert!(db.ledger_ids().await.is_empty());
}

async fn unknown_tables_and_columns_are_named<F: Fixture>() {
    let db = F::setup().await;
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
    assert!(err.to_string().contains("is a view"), "{err}");
}

async fn malformed_ops_and_the_ledger_are_refused_before_writing<F: Fixture>() {
    let db = F::setup().await;
    // The types refuse an empty key or set; the target refuses them too.
    for (id, key, set) in [
        ("i-empty-key", json!({}), json!({"status": "x"})),
        ("i-empty-set", json!({"id": 7}), json!({})),
    ] {
        let wire = json!([{"op": "update", "table": "orders", "key": key, "set": set}]);
        assert!(
            serde_json::from_value::<airlock_intent::Intent>(json!({
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
            "i-ledger",
            json!({"op": "insert", "table": F::DIALECT.ledger_table(),
                   "values": {"intent_id": "forged", "run": "r", "digest": "d",
                              "applied_at_ms": 0, "undo": []}}),
            codes::RESERVED_TABLE,
        ),
    ] {
        let i = intent(id, json!([op]));
        let err = apply_err(&db, &i, &meta(&i)).await;
        assert_eq!(err.code.as_deref(), Some(code), "{id}: {err}");
        assert_eq!(err.kind, ErrorKind::Permanent, "{id}");
    }
    assert!(db.ledger_ids().await.is_empty());
}

async fn hostile_values_are_stored_verbatim_and_hostile_columns_refused<F: Fixture>() {
    let db = F::setup().await;
    let evil = "x'); DROP TABLE customers; --";
    let i = intent(
        "i-evil",
        json!([{"op": "insert", "table": "customers", "values": {"name": evil}},
               {"op": "insert", "table": "events", "values": {"message": "$1 \\ \" ' ::text"}}]),
    );
    db.target().apply(&i, &meta(&i)).await.unwrap();
    assert_eq!(
        db.rows("SELECT name FROM customers WHERE id = 3").await,
        vec![json!({"name": evil})]
    );
    assert_eq!(
        db.rows("SELECT message FROM events").await,
        vec![json!({"message": "$1 \\ \" ' ::text"})]
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
    assert_eq!(db.value("SELECT count(*) FROM customers").await, json!(3));
}

async fn applying_the_same_intent_twice_writes_once<F: Fixture>() {
    let db = F::setup().await;
    let i = intent(
        "i-twice",
        json!([{"op": "insert", "table": "events", "values": {"message": "once"}}]),
    );
    let m = meta(&i);
    let first = db.target().apply(&i, &m).await.unwrap();
    let second = db.target().apply(&i, &m).await.unwrap();
    assert!(!first.already);
    assert!(second.already);
    assert!(second.ops.is_empty());
    assert_eq!(second.ledger, first.ledger);
    assert_eq!(db.value("SELECT count(*) FROM events").await, json!(1));
    assert_eq!(db.ledger_ids().await.len(), 1);

    // A new target (a restarted sidecar) sees the same ledger.
    let reopened = db.reopen();
    let third = reopened.apply(&i, &m).await.unwrap();
    assert!(third.already);
    assert_eq!(db.value("SELECT count(*) FROM events").await, json!(1));
}

async fn the_same_id_with_different_bytes_is_refused<F: Fixture>() {
    let db = F::setup().await;
    let i = intent(
        "i-dup",
        json!([{"op": "insert", "table": "events", "values": {"message": "one"}}]),
    );
    db.target().apply(&i, &meta(&i)).await.unwrap();
    let other = intent(
        "i-dup",
        json!([{"op": "insert", "table": "events", "values": {"message": "two"}}]),
    );
    let before = db.snapshot().await;
    let err = db.target().apply(&other, &meta(&other)).await.unwrap_err();
    assert_eq!(db.snapshot().await, before);
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert_eq!(err.code.as_deref(), Some(codes::DIGEST_MISMATCH));
    assert!(
        err.to_string().contains("same id, different bytes"),
        "{err}"
    );
    assert_eq!(
        db.rows("SELECT message FROM events").await,
        vec![json!({"message": "one"})]
    );
}

async fn an_intent_for_another_target_is_refused<F: Fixture>() {
    let db = F::setup().await;
    let mut i = intent(
        "i-elsewhere",
        json!([{"op": "insert", "table": "events", "values": {"message": "x"}}]),
    );
    i.target = airlock_intent::TargetName::parse("warehouse").unwrap();
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::WRONG_TARGET), "{err}");
    assert!(err.to_string().contains("\"warehouse\""), "{err}");
}

async fn preview_reports_rows_and_images_and_writes_nothing<F: Fixture>() {
    let db = F::setup().await;
    let i = intent(
        "p-1",
        json!([
            {"op": "update", "table": "customers", "key": {"id": 1}, "set": {"tier": "silver"}},
            {"op": "insert", "table": "orders",
             "values": {"id": 10, "customer_id": 2, "total_cents": 100, "status": "open"}},
            {"op": "delete", "table": "orders", "key": {"id": 9}}
        ]),
    );
    // The first apply creates a PostgreSQL ledger, so take the snapshot after one exists.
    db.target().ledger_entry("-").await.unwrap();
    let before = db.snapshot().await;
    let preview = db.target().preview(&i, &meta(&i)).await.unwrap();
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
    // Nothing written: neither the rows nor the ledger (part of the snapshot).
    assert_eq!(db.snapshot().await, before);
    assert!(db.ledger_ids().await.is_empty());
    assert!(db.target().ledger_entry("p-1").await.unwrap().is_none());

    // The images are those a real apply records.
    let applied = db.target().apply(&i, &meta(&i)).await.unwrap();
    let images: Vec<_> = preview.ops.into_iter().flat_map(|op| op.images).collect();
    assert_eq!(applied.ledger.undo, images);
    // Once applied, a preview says so and shows no ops.
    let again = db.target().preview(&i, &meta(&i)).await.unwrap();
    assert!(again.already);
    assert!(again.ops.is_empty());
}

async fn preview_of_a_failing_intent_is_its_error_and_writes_nothing<F: Fixture>() {
    let db = F::setup().await;
    let (check, _) = F::constraint(Constraint::Check);
    let failing = [
        // Its key matches nothing.
        (
            json!({"op": "update", "table": "customers", "key": {"id": 99}, "set": {"tier": "x"}}),
            codes::NO_ROW,
        ),
        // It breaks a CHECK constraint.
        (
            json!({"op": "insert", "table": "orders",
                   "values": {"id": 11, "customer_id": 1, "total_cents": -5, "status": "open"}}),
            check,
        ),
    ];
    db.target().ledger_entry("-").await.unwrap();
    for (n, (op, code)) in failing.into_iter().enumerate() {
        let i = intent(
            &format!("p-{n}"),
            json!([
                {"op": "update", "table": "customers", "key": {"id": 1}, "set": {"tier": "silver"}},
                op
            ]),
        );
        let before = db.snapshot().await;
        let err = db.target().preview(&i, &meta(&i)).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Permanent);
        assert_eq!(err.op, Some(1));
        assert_eq!(err.code.as_deref(), Some(code), "{err}");
        assert_eq!(db.snapshot().await, before);
        assert!(db.ledger_ids().await.is_empty());
    }
}

async fn a_chain_applies_in_order_with_every_ledger_row<F: Fixture>() {
    let db = F::setup().await;
    let intents = five_in_order();
    let results = db.target().apply_chain(&chain(&intents)).await;
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
        db.rows("SELECT id, name FROM customers WHERE id = 30")
            .await,
        vec![json!({"id": 30, "name": "Edsger"})]
    );
    assert!(
        db.rows("SELECT * FROM orders WHERE id = 10")
            .await
            .is_empty()
    );
    assert_eq!(
        db.rows("SELECT message FROM events").await,
        vec![json!({"message": "c-4"})]
    );
    let ids: Vec<Value> = intents.iter().map(|i| json!(i.id.as_str())).collect();
    assert_eq!(db.ledger_ids().await, ids);
    // Each ledger row holds its own intent's digest and images.
    for i in &intents {
        let entry = db.target().ledger_entry(i.id.as_str()).await.unwrap();
        assert_eq!(entry.unwrap().digest, meta(i).digest);
    }
    let third = db.target().ledger_entry("c-3").await.unwrap().unwrap();
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
    let again = db.target().apply_chain(&chain(&intents)).await;
    assert_eq!(again.len(), 5);
    assert!(again.iter().all(|r| r.as_ref().unwrap().already));
    assert_eq!(db.ledger_ids().await.len(), 5);
}

async fn a_chain_stops_at_a_failing_intent_and_commits_the_ones_before<F: Fixture>() {
    let (check, _) = F::constraint(Constraint::Check);
    // The third intent writes an event, then fails: order 99 does not exist, or
    // order 10 would break a CHECK constraint.
    for (failing, code) in [
        (
            json!({"op": "update", "table": "orders", "key": {"id": 99}, "set": {"status": "paid"}}),
            codes::NO_ROW,
        ),
        (
            json!({"op": "update", "table": "orders", "key": {"id": 10}, "set": {"total_cents": -1}}),
            check,
        ),
    ] {
        let db = F::setup().await;
        let mut intents = five_in_order();
        intents[2] = intent(
            "c-3",
            json!([
                {"op": "insert", "table": "events", "values": {"message": "c-3"}},
                failing,
            ]),
        );
        let results = db.target().apply_chain(&chain(&intents)).await;
        assert_eq!(results.len(), 3, "{results:?}");
        assert!(!results[0].as_ref().unwrap().already);
        assert!(!results[1].as_ref().unwrap().already);
        let err = results[2].as_ref().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Permanent, "{err}");
        assert_eq!(err.op, Some(1), "{err}");
        assert_eq!(err.code.as_deref(), Some(code), "{err}");
        // The first two are committed; the third's event and the rest are not written.
        assert_eq!(
            db.rows("SELECT id, total_cents, status FROM orders WHERE id = 10")
                .await,
            vec![json!({"id": 10, "total_cents": 100, "status": "open"})]
        );
        assert!(db.rows("SELECT * FROM events").await.is_empty());
        assert_eq!(db.ledger_ids().await, vec![json!("c-1"), json!("c-2")]);
        // A new target (a fresh connection) sees the same: the commit is durable.
        let reopened = db.reopen();
        assert!(reopened.ledger_entry("c-3").await.unwrap().is_none());
        assert!(reopened.ledger_entry("c-2").await.unwrap().is_some());
    }
}

async fn a_chain_answers_already_for_an_intent_in_the_ledger<F: Fixture>() {
    let db = F::setup().await;
    let intents = five_in_order();
    let first = db
        .target()
        .apply(&intents[0], &meta(&intents[0]))
        .await
        .unwrap();
    let results = db.target().apply_chain(&chain(&intents[..3])).await;
    assert_eq!(results.len(), 3);
    let already = results[0].as_ref().unwrap();
    assert!(already.already);
    assert!(already.ops.is_empty());
    assert_eq!(already.ledger, first.ledger);
    assert!(!results[1].as_ref().unwrap().already);
    assert!(!results[2].as_ref().unwrap().already);
    assert_eq!(
        db.value("SELECT count(*) FROM customers WHERE id = 30")
            .await,
        json!(1)
    );
    // Already in the middle of a chain, too.
    let results = db.target().apply_chain(&chain(&intents[2..])).await;
    let flags: Vec<bool> = results
        .iter()
        .map(|r| r.as_ref().unwrap().already)
        .collect();
    assert_eq!(flags, vec![true, false, false]);
    assert_eq!(db.ledger_ids().await.len(), 5);
}

async fn a_deferred_foreign_key_refused_at_commit_fails_only_its_intent<F: Fixture>() {
    let db = F::setup().await;
    db.execute(
        "CREATE TABLE lines(id INTEGER PRIMARY KEY, order_id INTEGER
             REFERENCES orders(id) DEFERRABLE INITIALLY DEFERRED)",
    )
    .await;
    let line = |id: &str, line: i64, order: i64| {
        intent(
            id,
            json!([{"op": "insert", "table": "lines", "values": {"id": line, "order_id": order}}]),
        )
    };
    let intents = [line("l-1", 1, 7), line("l-2", 2, 999), line("l-3", 3, 8)];
    let results = db.target().apply_chain(&chain(&intents)).await;
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(!results[0].as_ref().unwrap().already);
    let err = results[1].as_ref().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent, "{err}");
    let (code, _) = F::constraint(Constraint::ForeignKey);
    assert_eq!(err.code.as_deref(), Some(code), "{err}");
    assert_eq!(
        db.rows("SELECT id FROM lines").await,
        vec![json!({"id": 1})]
    );
    assert_eq!(db.ledger_ids().await, vec![json!("l-1")]);
}

/// A replay ([`ApplyMeta::replay`](airlock::apply::ApplyMeta)) writes the values
/// the first apply recorded for the columns an insert did not name (the key the
/// database generated, defaults), but not into columns the table lacks or
/// computes itself, and not over a conflicting row an upsert updates; the next
/// ordinary insert gets a key past the replayed ones.
async fn a_replay_writes_the_values_the_database_generated_the_first_time<F: Fixture>() {
    let db = F::setup().await;
    let key = match F::DIALECT {
        Dialect::Sqlite => "id INTEGER PRIMARY KEY",
        Dialect::Postgres => "id SERIAL PRIMARY KEY",
    };
    db.execute(&format!(
        "CREATE TABLE gen({key}, name TEXT NOT NULL, \
         len INTEGER GENERATED ALWAYS AS (length(name)) STORED)"
    ))
    .await;
    let insert = intent(
        "r-1",
        json!([
            {"op": "insert", "table": "customers", "values": {"name": "Linus"}},
            {"op": "insert", "table": "gen", "values": {"name": "abc"}},
        ]),
    );
    // What the original database gave: ids 40 and 5, a tier, and a column this
    // database does not have; `len` is wrong on purpose: it is computed, not written.
    let recorded = json!([
        {"op": 0, "table": "customers", "key": {"id": 40}, "before": null,
         "after": {"id": 40, "name": "Linus", "email": null, "tier": "silver", "gone": 1}},
        {"op": 1, "table": "gen", "key": {"id": 5}, "before": null,
         "after": {"id": 5, "name": "abc", "len": 99}},
    ]);
    let applied = db
        .target()
        .apply(&insert, &replay_meta(&insert, recorded))
        .await
        .unwrap();
    let after: Vec<Value> = applied
        .ledger
        .undo
        .iter()
        .map(|image| image.after.as_ref().map(obj).unwrap())
        .collect();
    let linus = json!({"id": 40, "name": "Linus", "email": null, "tier": "silver"});
    assert_eq!(after[0], linus);
    assert_eq!(
        db.rows("SELECT * FROM customers WHERE id = 40").await,
        [linus]
    );
    assert_eq!(
        db.rows("SELECT id, name, len FROM gen").await,
        [json!({"id": 5, "name": "abc", "len": 3})]
    );
    // The ledger holds the intent's own digest.
    assert_eq!(applied.ledger.digest, meta(&insert).digest);

    // An upsert that inserted writes its generated values too; one that meets a
    // conflicting row here updates what it names and keeps that row's own key.
    let upserts = intent(
        "r-2",
        json!([
            {"op": "upsert", "table": "customers", "on": ["email"],
             "values": {"email": "ken@example.com", "name": "Ken"}},
            {"op": "upsert", "table": "customers", "on": ["email"],
             "values": {"email": "ada@example.com", "name": "Ada L"}},
        ]),
    );
    let recorded = json!([
        {"op": 0, "table": "customers", "key": {"id": 50}, "before": null,
         "after": {"id": 50, "name": "Ken", "email": "ken@example.com", "tier": "gold"}},
        {"op": 1, "table": "customers", "key": {"id": 60}, "before": null,
         "after": {"id": 60, "name": "Ada L", "email": "ada@example.com", "tier": null}},
    ]);
    db.target()
        .apply(&upserts, &replay_meta(&upserts, recorded))
        .await
        .unwrap();
    assert_eq!(
        db.rows("SELECT * FROM customers WHERE id IN (1, 50, 60) ORDER BY id")
            .await,
        [
            json!({"id": 1, "name": "Ada L", "email": "ada@example.com", "tier": "gold"}),
            json!({"id": 50, "name": "Ken", "email": "ken@example.com", "tier": "gold"}),
        ]
    );

    // Ordinary inserts write only what they name, past the replayed keys.
    let next = intent(
        "n-1",
        json!([
            {"op": "insert", "table": "customers", "values": {"name": "Next"}},
            {"op": "insert", "table": "gen", "values": {"name": "next"}},
        ]),
    );
    let applied = db.target().apply(&next, &meta(&next)).await.unwrap();
    let keys: Vec<Value> = applied.ledger.undo.iter().map(|i| obj(&i.key)).collect();
    assert_eq!(keys, [json!({"id": 51}), json!({"id": 6})]);
    assert_eq!(
        db.rows("SELECT tier FROM customers WHERE id = 51").await,
        [json!({"tier": null})]
    );
}
