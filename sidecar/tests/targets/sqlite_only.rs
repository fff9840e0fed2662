//! Behaviour only the SQLite target has, against real database files: how JSON
//! values land in columns without a type, a database locked by another connection,
//! relative paths in the URL, and a trigger that rolls the whole transaction back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock::apply::{ErrorKind, SqliteTarget, Target, codes, open};
use rusqlite::Connection;
use serde_json::json;

use crate::fixture::{Fixture, Sqlite, apply_err, chain, five_in_order, intent, meta, replay_meta};

#[tokio::test]
async fn json_values_map_to_sqlite_values() {
    let db = Sqlite::setup().await;
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
        db.rows_now("SELECT typeof(body) AS type, body FROM notes ORDER BY rowid"),
        vec![
            json!({"type": "integer", "body": 1}),
            json!({"type": "real", "body": 2.5}),
            json!({"type": "text", "body": r#"{"a":[1,"x"]}"#}),
            json!({"type": "null", "body": null}),
        ]
    );
}

#[tokio::test]
async fn an_integer_beyond_i64_is_a_bad_value() {
    let db = Sqlite::setup().await;
    let i = intent(
        "i-big",
        json!([{"op": "insert", "table": "orders",
                "values": {"id": 1, "customer_id": u64::MAX, "total_cents": 1, "status": "x"}}]),
    );
    let err = apply_err(&db, &i, &meta(&i)).await;
    assert_eq!(err.code.as_deref(), Some(codes::BAD_VALUE), "{err}");
    assert_eq!(err.kind, ErrorKind::Permanent);
    assert!(err.to_string().contains("\"customer_id\""), "{err}");
}

#[tokio::test]
async fn a_locked_database_is_a_transient_error() {
    let db = Sqlite::setup().await;
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
async fn a_trigger_rolling_back_the_whole_transaction_fails_only_its_intent() {
    let db = Sqlite::setup().await;
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
        db.rows_now("SELECT x FROM guarded ORDER BY x"),
        vec![json!({"x": 1}), json!({"x": 2})]
    );
    assert_eq!(db.ledger_ids().await.len(), 2);
}

#[tokio::test]
async fn a_chain_on_a_locked_database_is_one_transient_error() {
    let db = Sqlite::setup().await;
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

/// `open_existing` (replay, approve, undo) never creates a database: a missing
/// file is an error naming it, and neither it nor its directory appears. An
/// existing one opens as with `open`.
#[tokio::test]
async fn open_existing_creates_no_file_and_no_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no").join("such.db");
    for path in [missing.clone(), dir.path().join("such.db")] {
        let url = format!("sqlite://{}", path.display());
        let err = airlock::apply::open_existing("default", &url).unwrap_err();
        assert_eq!(err.code.as_deref(), Some(codes::NO_DATABASE), "{err}");
        assert_eq!(err.kind, ErrorKind::Permanent);
        assert!(err.message.contains("no such database file"), "{err}");
        assert!(err.message.contains(&path.display().to_string()), "{err}");
    }
    // Not even through a URI that asks SQLite to create the file.
    let uri = format!(
        "sqlite://file:{}?mode=rwc",
        dir.path().join("u.db").display()
    );
    assert!(airlock::apply::open_existing("default", &uri).is_err());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    let db = Sqlite::setup().await;
    let target = airlock::apply::open_existing("default", &db.url()).unwrap();
    let i = intent(
        "i-1",
        json!([{"op": "insert", "table": "events", "values": {"message": "m"}}]),
    );
    target.apply(&i, &meta(&i)).await.unwrap();
}

/// A replay's explicit key moves an `AUTOINCREMENT` table's `sqlite_sequence` on
/// by itself, so the next ordinary insert takes the key after it.
#[tokio::test]
async fn a_replayed_key_moves_autoincrement_on() {
    let db = Sqlite::setup().await;
    db.execute("CREATE TABLE auto(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL)")
        .await;
    let replayed = intent(
        "r-1",
        json!([{"op": "insert", "table": "auto", "values": {"name": "r"}}]),
    );
    let recorded = json!([
        {"op": 0, "table": "auto", "key": {"id": 12}, "before": null,
         "after": {"id": 12, "name": "r"}},
    ]);
    db.target
        .apply(&replayed, &replay_meta(&replayed, recorded))
        .await
        .unwrap();
    assert_eq!(
        db.rows_now("SELECT seq FROM sqlite_sequence WHERE name = 'auto'"),
        [json!({"seq": 12})]
    );
    db.execute("DELETE FROM auto").await;
    let next = intent(
        "n-1",
        json!([{"op": "insert", "table": "auto", "values": {"name": "n"}}]),
    );
    let applied = db.target.apply(&next, &meta(&next)).await.unwrap();
    assert_eq!(
        applied.ledger.undo[0].key,
        json!({"id": 13}).as_object().cloned().unwrap()
    );
}
