//! What the contract suite needs from a target under test: a fresh database with
//! the same tables and rows on each ([`Fixture::setup`]), the [`Target`] on it, a
//! way to run SQL on it and read rows back as JSON objects keyed by column, and
//! the few facts where the databases honestly differ (how a row without a primary
//! key is identified, the code and wording of a constraint violation). Plus the
//! intent-building helpers every module of this binary uses.

use std::path::PathBuf;
use std::sync::Arc;

use airlock::apply::sql::Dialect;
use airlock::apply::{ApplyError, ApplyMeta, Generated, Target, UndoImage, open};
use airlock_intent::{Intent, Op};
use rusqlite::Connection;
use rusqlite::types::ValueRef;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::pg::TestDb;

/// The constraints the suite breaks, each declared alike on both targets.
#[derive(Clone, Copy, Debug)]
pub enum Constraint {
    /// `customers.email` is UNIQUE.
    Unique,
    /// `customers.name` is NOT NULL.
    NotNull,
    /// `orders.customer_id` references `customers(id)`.
    ForeignKey,
    /// `orders.total_cents >= 0`.
    Check,
}

/// A fresh database with the suite's tables, and a target called `default` on it.
pub trait Fixture: Sized {
    /// The target's SQL dialect (its ledger and version tables).
    const DIALECT: Dialect;
    /// The code of a failed upsert whose `on` columns have no unique constraint.
    const UPSERT_WITHOUT_UNIQUE: &'static str;

    /// Creates the database, its tables and rows: customers 1 (Ada, gold) and 2
    /// (Grace, no tier); orders 7 and 8 (Ada's, open) and 9 (Grace's, paid); the
    /// tables `events` (no primary key) and `tags`; the view `open_orders`.
    async fn setup() -> Self;

    /// The target on the database.
    fn target(&self) -> &Arc<dyn Target>;

    /// Another target on the same database: a restarted sidecar.
    fn reopen(&self) -> Arc<dyn Target>;

    /// Rows of a query, each as a JSON object keyed by column, read over a
    /// connection of the test's own.
    async fn rows(&self, sql: &str) -> Vec<Value>;

    /// Runs statements (DDL) over the test's own connection.
    async fn execute(&self, sql: &str);

    /// Everything in every table, the ledger's intent ids included, to compare
    /// before and after a failure.
    async fn snapshot(&self) -> Vec<Value>;

    /// The undo key of the first row inserted into `events` (no primary key).
    fn first_event_key() -> Value;

    /// A table named with its schema, a row to insert into it, and that row's key.
    fn qualified() -> (&'static str, Value, Value);

    /// The code of a violation of `constraint`, and a word the message names.
    fn constraint(constraint: Constraint) -> (&'static str, &'static str);

    /// The one value of a one-row, one-column query.
    async fn value(&self, sql: &str) -> Value {
        let rows = self.rows(sql).await;
        assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
        rows[0]
            .as_object()
            .and_then(|o| o.values().next().cloned())
            .expect("one column")
    }

    /// The ledger's intent ids, in order.
    async fn ledger_ids(&self) -> Vec<Value> {
        let sql = format!(
            "SELECT intent_id FROM {} ORDER BY intent_id",
            Self::DIALECT.ledger_table()
        );
        self.rows(&sql)
            .await
            .into_iter()
            .map(|r| r["intent_id"].clone())
            .collect()
    }
}

// ---- SQLite ------------------------------------------------------------------------

const SQLITE_SCHEMA: &str = "
    CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT UNIQUE, tier TEXT);
    CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                        total_cents INTEGER NOT NULL CHECK (total_cents >= 0), status TEXT NOT NULL);
    CREATE TABLE events(message TEXT);
    CREATE TABLE notes(body);
    CREATE TABLE tags(name TEXT PRIMARY KEY, uses INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
    CREATE VIEW open_orders AS SELECT * FROM orders WHERE status = 'open';
    INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com', 'gold'),
                                 (2, 'Grace', 'grace@example.com', NULL);
    INSERT INTO orders VALUES (7, 1, 1500, 'open'), (8, 1, 2500, 'open'), (9, 2, 900, 'paid');
";

/// An SQLite database file in a directory of its own.
pub struct Sqlite {
    _dir: TempDir,
    pub path: PathBuf,
    pub target: Arc<dyn Target>,
}

impl Sqlite {
    /// The target's URL: an absolute path, `sqlite:///tmp/.../target.db`.
    pub fn url(&self) -> String {
        format!("sqlite://{}", self.path.display())
    }

    /// Rows of a query over a connection of the test's own.
    pub fn rows_now(&self, sql: &str) -> Vec<Value> {
        let conn = Connection::open(&self.path).unwrap();
        let mut stmt = conn.prepare(sql).unwrap();
        let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        stmt.query_map([], |row| {
            Ok(Value::Object(
                names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        let value = match row.get_ref(i).unwrap() {
                            ValueRef::Null => Value::Null,
                            ValueRef::Integer(n) => json!(n),
                            ValueRef::Real(f) => json!(f),
                            ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
                            ValueRef::Blob(_) => json!("<blob>"),
                        };
                        (name.clone(), value)
                    })
                    .collect(),
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }
}

impl Fixture for Sqlite {
    const DIALECT: Dialect = Dialect::Sqlite;
    const UPSERT_WITHOUT_UNIQUE: &'static str = "SQLITE_ERROR";

    async fn setup() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("target.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(SQLITE_SCHEMA)
            .unwrap();
        let url = format!("sqlite://{}", path.display());
        assert!(url.starts_with("sqlite:///"), "{url}");
        let target = open("default", &url).unwrap();
        Sqlite {
            _dir: dir,
            path,
            target,
        }
    }

    fn target(&self) -> &Arc<dyn Target> {
        &self.target
    }

    fn reopen(&self) -> Arc<dyn Target> {
        open("default", &self.url()).unwrap()
    }

    async fn rows(&self, sql: &str) -> Vec<Value> {
        self.rows_now(sql)
    }

    async fn execute(&self, sql: &str) {
        Connection::open(&self.path)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }

    async fn snapshot(&self) -> Vec<Value> {
        [
            "SELECT * FROM customers ORDER BY id",
            "SELECT * FROM orders ORDER BY id",
            "SELECT rowid, * FROM events ORDER BY rowid",
            "SELECT rowid, * FROM notes ORDER BY rowid",
            "SELECT * FROM tags ORDER BY name",
            "SELECT intent_id FROM airlock_ledger ORDER BY intent_id",
        ]
        .into_iter()
        .flat_map(|sql| self.rows_now(sql))
        .collect()
    }

    fn first_event_key() -> Value {
        json!({"rowid": 1})
    }

    fn qualified() -> (&'static str, Value, Value) {
        // WITHOUT ROWID: found again by the primary key in the values.
        (
            "main.tags",
            json!({"name": "sql", "uses": 2}),
            json!({"name": "sql"}),
        )
    }

    fn constraint(constraint: Constraint) -> (&'static str, &'static str) {
        match constraint {
            Constraint::Unique => ("SQLITE_CONSTRAINT_UNIQUE", "customers.email"),
            Constraint::NotNull => ("SQLITE_CONSTRAINT_NOTNULL", "customers.name"),
            Constraint::ForeignKey => ("SQLITE_CONSTRAINT_FOREIGNKEY", "FOREIGN KEY"),
            Constraint::Check => ("SQLITE_CONSTRAINT_CHECK", "total_cents"),
        }
    }
}

// ---- PostgreSQL --------------------------------------------------------------------

pub const PG_SCHEMA: &str = "
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

/// A fresh PostgreSQL database on the local server, dropped with this.
pub struct Postgres {
    pub db: TestDb,
    pub target: Arc<dyn Target>,
}

impl Fixture for Postgres {
    const DIALECT: Dialect = Dialect::Postgres;
    const UPSERT_WITHOUT_UNIQUE: &'static str = "42P10";

    async fn setup() -> Self {
        let db = TestDb::create(PG_SCHEMA).await;
        let target = open("default", &db.url).unwrap();
        Postgres { db, target }
    }

    fn target(&self) -> &Arc<dyn Target> {
        &self.target
    }

    fn reopen(&self) -> Arc<dyn Target> {
        open("default", &self.db.url).unwrap()
    }

    async fn rows(&self, sql: &str) -> Vec<Value> {
        self.db.rows(sql).await
    }

    async fn execute(&self, sql: &str) {
        self.db.client.batch_execute(sql).await.unwrap();
    }

    async fn snapshot(&self) -> Vec<Value> {
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
            all.extend(self.db.rows(sql).await);
        }
        all
    }

    fn first_event_key() -> Value {
        json!({"ctid": "(0,1)"})
    }

    fn qualified() -> (&'static str, Value, Value) {
        (
            "sales.regions",
            json!({"code": "eu", "name": "Europe"}),
            json!({"code": "eu"}),
        )
    }

    fn constraint(constraint: Constraint) -> (&'static str, &'static str) {
        match constraint {
            Constraint::Unique => ("23505", "customers_email_key"),
            Constraint::NotNull => ("23502", "\"name\""),
            Constraint::ForeignKey => ("23503", "orders_customer_id_fkey"),
            Constraint::Check => ("23514", "orders_total_cents_check"),
        }
    }
}

// ---- Intents -----------------------------------------------------------------------

pub fn intent(id: &str, ops: Value) -> Intent {
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
pub fn unchecked(id: &str, op: Op) -> Intent {
    let mut i = intent(
        id,
        json!([{"op": "insert", "table": "events", "values": {"message": "x"}}]),
    );
    i.ops = vec![op];
    i
}

pub fn row(value: Value) -> serde_json::Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

pub fn obj(image: &serde_json::Map<String, Value>) -> Value {
    Value::Object(image.clone())
}

/// The digest of an intent's bytes, as the queue would compute it.
pub fn meta(intent: &Intent) -> ApplyMeta {
    let bytes = serde_json::to_vec(intent).unwrap();
    ApplyMeta::new(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
}

/// The metadata of a replay of `intent` whose first apply recorded `images` (its
/// undo images, as JSON): the recorded generated values ride along.
pub fn replay_meta(intent: &Intent, images: Value) -> ApplyMeta {
    let images: Vec<UndoImage> = serde_json::from_value(images).unwrap();
    let mut meta = meta(intent);
    meta.replay = Some(Generated::recorded(intent, &images));
    meta
}

/// Each intent with its metadata, as a chain.
pub fn chain(intents: &[Intent]) -> Vec<(Intent, ApplyMeta)> {
    intents.iter().map(|i| (i.clone(), meta(i))).collect()
}

/// Five intents where each depends on the ones before it.
pub fn five_in_order() -> Vec<Intent> {
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

/// Applies an intent that must fail, and checks it changed nothing: no row, no
/// ledger row. Answers its error.
pub async fn apply_err<F: Fixture>(db: &F, intent: &Intent, meta: &ApplyMeta) -> ApplyError {
    // The first apply creates a PostgreSQL ledger, so take the snapshot after one exists.
    db.target().ledger_entry("-").await.unwrap();
    let before = db.snapshot().await;
    let err = db.target().apply(intent, meta).await.unwrap_err();
    assert_eq!(
        db.snapshot().await,
        before,
        "a failed intent changed data: {err}"
    );
    assert!(
        db.target()
            .ledger_entry(intent.id.as_str())
            .await
            .unwrap()
            .is_none(),
        "a failed intent left a ledger row"
    );
    err
}
