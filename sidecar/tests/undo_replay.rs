//! `airlock undo` and `airlock replay` through the real binary, on SQLite and on a
//! fresh PostgreSQL database per test: a run of inserts, updates, deletes and
//! upserts is applied by a running sidecar, then undone (all of it, one intent,
//! with conflicts, forced) or replayed into a snapshot taken before the run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/pg.rs"]
mod pg;
mod support;

use std::path::PathBuf;
use std::process::Output;

use serde_json::{Value, json};
use support::{Sandbox, airlock, intent};

const PG_SCHEMA: &str = "
    CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT UNIQUE,
                           tier TEXT NOT NULL DEFAULT 'standard');
    CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                        total_cents INTEGER NOT NULL CHECK (total_cents >= 0), status TEXT NOT NULL);
";

const SEED: &str = "
    INSERT INTO customers (id, name, email, tier) VALUES (1, 'Ada', 'ada@example.com', 'standard');
    INSERT INTO customers (id, name, email, tier) VALUES (2, 'Bob', 'bob@example.com', 'standard');
    INSERT INTO orders (id, customer_id, total_cents, status) VALUES (10, 1, 500, 'open');
";

const TABLES: [&str; 2] = ["customers", "orders"];

/// The database under test: the sandbox's SQLite target, or a fresh PostgreSQL
/// database reached as target `pg`.
#[allow(clippy::large_enum_variant)] // one per test
enum Db {
    Sqlite(PathBuf),
    Pg {
        db: pg::TestDb,
        /// A connection for set-up and checks (replaced after a snapshot, which
        /// needs every connection to the database closed).
        client: tokio_postgres::Client,
        runtime: tokio::runtime::Runtime,
    },
}

impl Db {
    fn exec(&self, sql: &str) {
        match self {
            Db::Sqlite(path) => rusqlite::Connection::open(path)
                .unwrap()
                .execute_batch(sql)
                .unwrap(),
            Db::Pg {
                client, runtime, ..
            } => runtime.block_on(client.batch_execute(sql)).unwrap(),
        }
    }

    /// Every row of `table`, ordered by id, as JSON objects.
    fn table(&self, table: &str) -> Vec<Value> {
        self.table_sql(&format!("SELECT * FROM {table} ORDER BY id"))
    }

    /// The rows a query answers, as JSON objects.
    fn table_sql(&self, sql: &str) -> Vec<Value> {
        match self {
            Db::Sqlite(path) => sqlite_rows(path, sql),
            Db::Pg {
                client, runtime, ..
            } => runtime.block_on(pg_rows(client, sql)),
        }
    }

    fn snapshot(&self) -> Vec<Vec<Value>> {
        TABLES.iter().map(|t| self.table(t)).collect()
    }

    /// The name intents use for this database.
    fn target_name(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "default",
            Db::Pg { .. } => "pg",
        }
    }
}

async fn pg_rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Value> {
    let wrapped = format!("SELECT coalesce(json_agg(x), '[]')::text FROM ({sql}) AS x");
    let text: String = client.query_one(&wrapped, &[]).await.unwrap().get(0);
    match serde_json::from_str(&text).unwrap() {
        Value::Array(rows) => rows,
        other => panic!("not an array: {other}"),
    }
}

fn sqlite_rows(path: &std::path::Path, sql: &str) -> Vec<Value> {
    let db = rusqlite::Connection::open(path).unwrap();
    let mut stmt = db.prepare(sql).unwrap();
    let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
    stmt.query_map([], |row| {
        let mut object = serde_json::Map::new();
        for (i, name) in names.iter().enumerate() {
            let value = match row.get_ref(i)? {
                rusqlite::types::ValueRef::Null => Value::Null,
                rusqlite::types::ValueRef::Integer(v) => json!(v),
                rusqlite::types::ValueRef::Real(v) => json!(v),
                rusqlite::types::ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
                rusqlite::types::ValueRef::Blob(b) => json!(hex::encode(b)),
            };
            object.insert(name.clone(), value);
        }
        Ok(Value::Object(object))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sqlite,
    Postgres,
}

/// A sidecar with a seeded database; `run` applies the test run through it.
struct Fixture {
    sb: Sandbox,
    db: Db,
    /// The database before the run.
    original: Vec<Vec<Value>>,
}

impl Fixture {
    fn new(kind: Kind) -> Self {
        let mut sb = Sandbox::new();
        let db = match kind {
            Kind::Sqlite => Db::Sqlite(sb.target()),
            Kind::Postgres => {
                let runtime = tokio::runtime::Runtime::new().unwrap();
                let db = runtime.block_on(pg::TestDb::create(PG_SCHEMA));
                let client = runtime.block_on(pg::connect(&db.url));
                sb.env.push(("AIRLOCK_TARGETS__PG".into(), db.url.clone()));
                sb.allow_privileged_role();
                Db::Pg {
                    db,
                    client,
                    runtime,
                }
            }
        };
        db.exec(SEED);
        let original = db.snapshot();
        Self { sb, db, original }
    }

    fn intent(&self, id: &str, run: &str, op: Value) -> Value {
        let mut intent = intent(id, run, op);
        intent["target"] = json!(self.db.target_name());
        intent
    }

    /// Submits one intent and waits until it is applied (approving it if the
    /// policy holds it for review), so apply order is submission order.
    fn apply(&self, intent: &Value) {
        let id = intent["id"].as_str().unwrap();
        self.sb.submit_json(intent);
        let outcome = self.sb.outcome_where(id, |o| {
            o["state"] == "applied" || o["state"] == "awaiting_review" || o["state"] == "failed"
        });
        if outcome["state"] == "awaiting_review" {
            let out = self.sb.cli(&["approve", id, "--as", "alice"]);
            assert!(out.status.success(), "{}", stderr(&out));
        }
        let outcome = self
            .sb
            .outcome_where(id, |o| o["state"] == "applied" || o["state"] == "failed");
        assert_eq!(outcome["state"], "applied", "{outcome}");
    }

    /// Starts the sidecar and applies run `r1`: insert, update, delete, upsert.
    fn run(&mut self) {
        self.sb.start();
        for intent in [
            self.intent(
                "i-ins",
                "r1",
                json!({"op": "insert", "table": "customers",
                       "values": {"id": 3, "name": "Cy", "email": "cy@example.com"}}),
            ),
            self.intent(
                "i-upd",
                "r1",
                json!({"op": "update", "table": "customers", "key": {"id": 1},
                       "set": {"tier": "gold"}}),
            ),
            self.intent(
                "i-del",
                "r1",
                json!({"op": "delete", "table": "orders", "key": {"id": 10}}),
            ),
            self.intent(
                "i-ups",
                "r1",
                json!({"op": "upsert", "table": "customers", "on": ["id"],
                       "values": {"id": 2, "name": "Bobby", "email": "bob@example.com",
                                  "tier": "silver"}}),
            ),
        ] {
            self.apply(&intent);
        }
        assert_ne!(self.db.snapshot(), self.original, "the run changed nothing");
        self.sb.stop();
    }

    /// Runs `airlock <args> --state <state>` with this fixture's target.
    fn cli(&self, args: &[&str]) -> Output {
        let mut command = airlock();
        command.args(args).arg("--state").arg(self.sb.state());
        match &self.db {
            Db::Sqlite(path) => {
                command
                    .arg("--target")
                    .arg(format!("sqlite://{}", path.display()));
            }
            Db::Pg { db, .. } => {
                command.env("AIRLOCK_TARGETS__PG", &db.url);
            }
        }
        command.output().unwrap()
    }

    fn undo(&self, args: &[&str]) -> Output {
        let mut all = vec!["undo", "--run", "r1", "--as", "bob"];
        all.extend_from_slice(args);
        self.cli(&all)
    }

    fn verify(&self) {
        let key = self.sb.state().join("signing.key.pub");
        let out = airlock()
            .args(["verify", "--public-key"])
            .arg(&key)
            .arg("--state")
            .arg(self.sb.state())
            .output()
            .unwrap();
        assert!(out.status.success(), "verify failed: {}", stderr(&out));
    }

    /// The data of the run's records with this event, in order.
    fn records(&self, event: &str) -> Vec<Value> {
        let out = self.sb.cli(&["export", "--run", "r1", "--out", "-"]);
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|l| l["type"] == "record" && l["event"] == event)
            .collect()
    }

    fn state_of(&self, id: &str) -> String {
        let out = self.sb.cli(&["status", "--run", "r1", "--json"]);
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|o| o["id"] == id)
            .map(|o| o["state"].as_str().unwrap().to_owned())
            .unwrap()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One scenario at a time. Each starts a sidecar and waits for its outcomes with
/// the support module's deadline; with all of them at once on a loaded 2-core
/// machine (load average 15), a sidecar sometimes had not written its first
/// outcome (nor a log line) within that deadline. Not reproduced at lower load.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `test` on SQLite, then on PostgreSQL.
fn both(test: fn(Kind)) {
    let _serial = serial();
    test(Kind::Sqlite);
    test(Kind::Postgres);
}

fn undo_restores_the_original_rows_and_is_idempotent(kind: Kind) {
    let mut fx = Fixture::new(kind);
    fx.run();
    let out = fx.undo(&[]);
    assert!(out.status.success(), "{kind:?}: {}", stderr(&out));
    // Reverse apply order.
    let undone: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(
        undone,
        [
            "i-ups: undone",
            "i-del: undone",
            "i-upd: undone",
            "i-ins: undone"
        ],
        "{kind:?}"
    );
    assert_eq!(fx.db.snapshot(), fx.original, "{kind:?}");
    for id in ["i-ins", "i-upd", "i-del", "i-ups"] {
        assert_eq!(fx.state_of(id), "undone", "{kind:?} {id}");
    }
    let records = fx.records("undone");
    assert_eq!(records.len(), 4, "{kind:?}");
    assert_eq!(records[0]["data"]["by"], "bob");
    assert!(records[0]["data"].get("forced").is_none(), "{records:?}");
    fx.verify();

    // Again: nothing changes, and it says so.
    let again = fx.undo(&[]);
    assert!(again.status.success(), "{kind:?}: {}", stderr(&again));
    assert!(
        stdout(&again).contains("nothing to undo"),
        "{}",
        stdout(&again)
    );
    assert_eq!(fx.records("undone").len(), 4, "{kind:?}");
    assert_eq!(fx.db.snapshot(), fx.original, "{kind:?}");
}

#[test]
fn undo_restores_the_original_rows_and_is_idempotent_on_both_targets() {
    both(undo_restores_the_original_rows_and_is_idempotent);
}

fn conflicts_change_nothing_unless_forced(kind: Kind) {
    let mut fx = Fixture::new(kind);
    fx.run();
    // Someone else changes a row the run wrote, and re-creates the deleted order.
    fx.db
        .exec("UPDATE customers SET name = 'Ada Lovelace' WHERE id = 1");
    let before = fx.db.snapshot();
    let out = fx.undo(&[]);
    assert!(!out.status.success(), "{kind:?}: undo ignored a conflict");
    let err = stderr(&out);
    assert!(err.contains("customers"), "{err}");
    assert!(err.contains("Ada Lovelace"), "{err}");
    assert!(err.contains(r#"{"id":1}"#), "{err}");
    assert_eq!(
        fx.db.snapshot(),
        before,
        "{kind:?}: a refused undo changed rows"
    );
    assert!(fx.records("undone").is_empty());
    assert_eq!(fx.state_of("i-upd"), "applied");

    let out = fx.undo(&["--force"]);
    assert!(out.status.success(), "{kind:?}: {}", stderr(&out));
    assert!(stdout(&out).contains("forced:"), "{}", stdout(&out));
    assert_eq!(fx.db.snapshot(), fx.original, "{kind:?}");
    let records = fx.records("undone");
    assert_eq!(records.len(), 4);
    let upd = records.iter().find(|r| r["intent"] == "i-upd").unwrap();
    assert_eq!(upd["data"]["forced"], true, "{upd}");
    assert_eq!(upd["data"]["conflicts"][0]["found"]["name"], "Ada Lovelace");
    fx.verify();
}

#[test]
fn conflicts_change_nothing_unless_forced_on_both_targets() {
    both(conflicts_change_nothing_unless_forced);
}

fn a_single_intent_undoes_only_when_no_later_intent_wrote_its_rows(kind: Kind) {
    let mut fx = Fixture::new(kind);
    fx.sb.start();
    let first = fx.intent(
        "s-1",
        "r1",
        json!({"op": "update", "table": "customers", "key": {"id": 1}, "set": {"tier": "gold"}}),
    );
    let second = fx.intent(
        "s-2",
        "r1",
        json!({"op": "update", "table": "customers", "key": {"id": 1}, "set": {"name": "Ada L"}}),
    );
    let other = fx.intent(
        "s-3",
        "r1",
        json!({"op": "update", "table": "customers", "key": {"id": 2}, "set": {"tier": "gold"}}),
    );
    for intent in [&first, &second, &other] {
        fx.apply(intent);
    }
    fx.sb.stop();
    let before = fx.db.snapshot();
    let out = fx.undo(&["--intent", "s-1"]);
    assert!(!out.status.success(), "{kind:?}: undid under a later write");
    assert!(stderr(&out).contains("s-2"), "{}", stderr(&out));
    assert_eq!(fx.db.snapshot(), before);

    let out = fx.undo(&["--intent", "s-3"]);
    assert!(out.status.success(), "{kind:?}: {}", stderr(&out));
    let bob = &fx.db.table("customers")[1];
    assert_eq!(bob["tier"], "standard", "{kind:?}");
    assert_eq!(fx.state_of("s-3"), "undone");
    assert_eq!(fx.state_of("s-2"), "applied");

    // Once the later one is undone, the earlier one may go.
    let out = fx.undo(&["--intent", "s-2"]);
    assert!(out.status.success(), "{kind:?}: {}", stderr(&out));
    let out = fx.undo(&["--intent", "s-1"]);
    assert!(out.status.success(), "{kind:?}: {}", stderr(&out));
    assert_eq!(fx.db.snapshot(), fx.original, "{kind:?}");
    fx.verify();
}

#[test]
fn a_single_intent_undoes_only_when_no_later_intent_wrote_its_rows_on_both_targets() {
    both(a_single_intent_undoes_only_when_no_later_intent_wrote_its_rows);
}

/// A copy of a PostgreSQL database made with `CREATE DATABASE ... TEMPLATE`,
/// dropped with this.
struct PgSnapshot {
    name: String,
    url: String,
}

impl Fixture {
    /// Copies the PostgreSQL database as it is now (no connection to it may stay
    /// open meanwhile: the test's own is closed, then reopened).
    fn pg_snapshot(&mut self) -> PgSnapshot {
        let Db::Pg {
            db,
            client,
            runtime,
        } = &mut self.db
        else {
            panic!("not PostgreSQL");
        };
        let name = format!("{}_snap", db.name);
        runtime.block_on(async {
            let admin = pg::connect(&pg::server_url()).await;
            pg::eventually("a template copy of the database", || {
                let admin = &admin;
                let (orig, name) = (&db.name, &name);
                async move {
                    admin
                        .execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                             WHERE datname = $1 AND pid <> pg_backend_pid()",
                            &[orig],
                        )
                        .await
                        .ok()?;
                    admin
                        .batch_execute(&format!("CREATE DATABASE \"{name}\" TEMPLATE \"{orig}\""))
                        .await
                        .ok()
                }
            })
            .await;
        });
        *client = runtime.block_on(pg::connect(&db.url));
        PgSnapshot {
            url: pg::with_database(&db.url, &name),
            name,
        }
    }

    fn export(&self) -> PathBuf {
        let file = self.sb.dir.path().join("r1.jsonl");
        let out = self
            .sb
            .cli(&["export", "--run", "r1", "--out", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        file
    }

    fn public_key(&self) -> PathBuf {
        self.sb.state().join("signing.key.pub")
    }
}

impl Drop for PgSnapshot {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let admin = pg::connect(&pg::server_url()).await;
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

fn replay(args: &[&str]) -> Output {
    airlock().arg("replay").args(args).output().unwrap()
}

#[test]
fn postgres_replay_of_an_export_into_a_snapshot_gives_identical_tables() {
    let _serial = serial();
    let mut fx = Fixture::new(Kind::Postgres);
    let snap = fx.pg_snapshot();
    fx.run();
    let file = fx.export();
    let key = fx.public_key();
    let args = [
        "--run",
        "r1",
        "--target",
        &snap.url,
        "--check",
        file.to_str().unwrap(),
        "--public-key",
        key.to_str().unwrap(),
    ];
    let out = replay(&args);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("4 intent(s), 0 divergence(s)"),
        "{}",
        stdout(&out)
    );
    let Db::Pg { runtime, .. } = &fx.db else {
        unreachable!()
    };
    let copy = runtime.block_on(pg::connect(&snap.url));
    let copied: Vec<Vec<Value>> = TABLES
        .iter()
        .map(|t| runtime.block_on(pg_rows(&copy, &format!("SELECT * FROM {t} ORDER BY id"))))
        .collect();
    assert_eq!(copied, fx.db.snapshot());
    assert_ne!(copied, fx.original);

    // Exactly once: a second replay applies nothing.
    let again = replay(&args);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(stdout(&again).matches("already replayed").count(), 4);
    let copied_again: Vec<Vec<Value>> = TABLES
        .iter()
        .map(|t| runtime.block_on(pg_rows(&copy, &format!("SELECT * FROM {t} ORDER BY id"))))
        .collect();
    assert_eq!(copied_again, copied);
}

/// A SQLite copy of the sandbox's target as it is now.
fn sqlite_copy(fx: &Fixture) -> PathBuf {
    let copy = fx.sb.dir.path().join("snap.db");
    std::fs::copy(fx.sb.target(), &copy).unwrap();
    copy
}

#[test]
fn sqlite_replay_from_the_live_log_gives_identical_tables() {
    let _serial = serial();
    let mut fx = Fixture::new(Kind::Sqlite);
    let copy = sqlite_copy(&fx);
    fx.run();
    let url = format!("sqlite://{}", copy.display());
    let state = fx.sb.state();
    let out = replay(&[
        "--run",
        "r1",
        "--target",
        &url,
        "--check",
        "--state",
        state.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let copied: Vec<Vec<Value>> = TABLES
        .iter()
        .map(|t| sqlite_rows(&copy, &format!("SELECT * FROM {t} ORDER BY id")))
        .collect();
    assert_eq!(copied, fx.db.snapshot());
}

#[test]
fn replay_reports_divergences_and_refuses_a_tampered_log() {
    let _serial = serial();
    let mut fx = Fixture::new(Kind::Sqlite);
    let copy = sqlite_copy(&fx);
    // The copy differs from what the run saw: Ada has another name.
    rusqlite::Connection::open(&copy)
        .unwrap()
        .execute_batch("UPDATE customers SET name = 'Ada X' WHERE id = 1")
        .unwrap();
    fx.run();
    let file = fx.export();
    let key = fx.public_key();
    let url = format!("sqlite://{}", copy.display());
    let out = replay(&[
        "--run",
        "r1",
        "--target",
        &url,
        "--check",
        file.to_str().unwrap(),
        "--public-key",
        key.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "a divergence passed the check");
    let err = stderr(&out);
    assert!(err.contains("intent i-upd op 0 table customers"), "{err}");
    assert!(
        err.contains(r#"column "name": expected "Ada", found "Ada X""#),
        "{err}"
    );
    assert_eq!(err.matches("divergence:").count(), 1, "{err}");

    // A tampered export is refused before anything is applied.
    let other = fx.sb.dir.path().join("other.db");
    let tampered = fx.sb.dir.path().join("tampered.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("\"gold\""));
    std::fs::write(&tampered, text.replacen("\"gold\"", "\"bronze\"", 1)).unwrap();
    let out = replay(&[
        "--run",
        "r1",
        "--target",
        &format!("sqlite://{}", other.display()),
        tampered.to_str().unwrap(),
        "--public-key",
        key.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "a tampered log was replayed");
    assert!(stderr(&out).contains("does not verify"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
}

#[test]
fn undo_after_a_crash_between_target_and_queue_only_records() {
    let _serial = serial();
    let mut fx = Fixture::new(Kind::Sqlite);
    fx.run();
    // The target reverts and commits, then the process "dies" before the queue
    // records anything.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let url = format!("sqlite://{}", fx.sb.target().display());
    let target = airlock::apply::open("default", &url).unwrap();
    let ids: Vec<String> = ["i-ups", "i-del", "i-upd", "i-ins"]
        .map(String::from)
        .into();
    let report = runtime.block_on(target.undo(&ids, false)).unwrap();
    assert!(report.committed, "{report:?}");
    assert_eq!(report.undone, ids);
    drop(target);
    assert_eq!(fx.db.snapshot(), fx.original);
    assert_eq!(fx.state_of("i-upd"), "applied");

    let out = fx.undo(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).matches("recorded now").count(),
        4,
        "{}",
        stdout(&out)
    );
    assert_eq!(fx.db.snapshot(), fx.original);
    let records = fx.records("undone");
    assert_eq!(records.len(), 4);
    assert!(
        records
            .iter()
            .all(|r| r["data"]["recorded_after_target"] == true)
    );
    fx.verify();

    // Unknown runs and intents are named.
    let out = fx.cli(&["undo", "--run", "nope"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("run \"nope\" has no applied intents"),
        "{}",
        stderr(&out)
    );
    let out = fx.undo(&["--intent", "zzz"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("intent \"zzz\" has no applied record"),
        "{}",
        stderr(&out)
    );
}

/// The version-1 ledger, as an Airlock before undo created it.
fn v1_ledger(schema: &str, ledger: &str, version: &str, undo_type: &str) -> String {
    format!(
        "CREATE TABLE {version} (component TEXT PRIMARY KEY, version BIGINT NOT NULL);
         INSERT INTO {version} VALUES ('ledger', 1);
         CREATE TABLE {ledger} (intent_id TEXT PRIMARY KEY, run TEXT NOT NULL, digest TEXT NOT NULL,
             applied_at_ms BIGINT NOT NULL, undo {undo_type} NOT NULL);
         {schema}"
    )
}

fn one_insert(target: &str) -> (airlock_intent::Intent, airlock::apply::ApplyMeta) {
    let mut value = intent(
        "m-1",
        "rm",
        json!({"op": "insert", "table": "customers", "values": {"id": 9, "name": "Mig"}}),
    );
    value["target"] = json!(target);
    let bytes = serde_json::to_vec(&value).unwrap();
    (
        serde_json::from_slice(&bytes).unwrap(),
        airlock::apply::ApplyMeta::new(airlock::seal::digest(&bytes)),
    )
}

#[test]
fn a_version_1_ledger_migrates_and_undoes_on_both_targets() {
    let _serial = serial();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // SQLite.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(&v1_ledger(
            support::SCHEMA,
            "airlock_ledger",
            "airlock_schema",
            "TEXT",
        ))
        .unwrap();
    let url = format!("sqlite://{}", path.display());
    let target = airlock::apply::open("default", &url).unwrap();
    let (intent, meta) = one_insert("default");
    runtime.block_on(target.apply(&intent, &meta)).unwrap();
    drop(target);
    // Reopening runs no migration twice.
    let target = airlock::apply::open("default", &url).unwrap();
    let report = runtime
        .block_on(target.undo(&["m-1".to_owned()], false))
        .unwrap();
    assert_eq!(report.undone, ["m-1"]);
    let again = runtime
        .block_on(target.undo(&["m-1".to_owned()], false))
        .unwrap();
    assert_eq!(again.already, ["m-1"]);
    assert!(again.undone.is_empty());
    assert_eq!(
        sqlite_rows(&path, "SELECT version FROM airlock_schema"),
        [json!({"version": airlock::apply::sql::LEDGER_VERSION})]
    );
    assert!(sqlite_rows(&path, "SELECT * FROM customers WHERE id = 9").is_empty());

    // PostgreSQL.
    let ddl = v1_ledger(
        PG_SCHEMA,
        "airlock.ledger",
        "airlock.schema_version",
        "JSONB",
    );
    let db = runtime.block_on(pg::TestDb::create(&format!("CREATE SCHEMA airlock; {ddl}")));
    let target = airlock::apply::open("pg", &db.url).unwrap();
    let (intent, meta) = one_insert("pg");
    runtime.block_on(target.apply(&intent, &meta)).unwrap();
    let report = runtime
        .block_on(target.undo(&["m-1".to_owned()], false))
        .unwrap();
    assert_eq!(report.undone, ["m-1"]);
    let missing = runtime
        .block_on(target.undo(&["nope".to_owned()], false))
        .unwrap_err();
    assert!(
        missing.message.contains("not in this target's ledger"),
        "{missing}"
    );
    assert_eq!(
        runtime.block_on(db.rows("SELECT version FROM airlock.schema_version")),
        [json!({"version": airlock::apply::sql::LEDGER_VERSION})]
    );
    assert!(
        runtime.block_on(db.rows("SELECT undone_at_ms FROM airlock.ledger"))[0]["undone_at_ms"]
            .is_i64()
    );
    assert!(
        runtime
            .block_on(db.rows("SELECT * FROM customers"))
            .is_empty()
    );
}

/// Tables whose keys (and some other columns) the database generates: PostgreSQL
/// `serial`, identity `GENERATED ALWAYS` and `BY DEFAULT`, a time default and a
/// stored generated column; SQLite `INTEGER PRIMARY KEY`, `AUTOINCREMENT`, a time
/// default and a generated column.
fn generated_tables(kind: Kind) -> (&'static str, &'static [&'static str]) {
    match kind {
        Kind::Postgres => (
            "CREATE TABLE t_serial(id SERIAL PRIMARY KEY, name TEXT NOT NULL,
                                   at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
             CREATE TABLE t_always(id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                   name TEXT NOT NULL,
                                   len INTEGER GENERATED ALWAYS AS (length(name)) STORED);
             CREATE TABLE t_default(id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                                    name TEXT NOT NULL);",
            &["t_serial", "t_always", "t_default"],
        ),
        Kind::Sqlite => (
            "CREATE TABLE t_rowid(id INTEGER PRIMARY KEY, name TEXT NOT NULL,
                                  at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')));
             CREATE TABLE t_auto(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
                                 len INTEGER GENERATED ALWAYS AS (length(name)) STORED);",
            &["t_rowid", "t_auto"],
        ),
    }
}

/// Every row of each of `tables` in a database reached by `rows`.
fn tables_in(tables: &[&str], rows: impl Fn(&str) -> Vec<Value>) -> Vec<Vec<Value>> {
    tables
        .iter()
        .map(|t| rows(&format!("SELECT * FROM {t} ORDER BY id")))
        .collect()
}

/// Issue 12, item 6: previews roll back their inserts but not the sequence values
/// those took, so the run's rows got other keys than a fresh copy of the database
/// hands out. Replay writes the recorded generated values (keys, defaults) and
/// moves the sequences past them: the copy ends up identical, `--check` passes,
/// and the next ordinary insert there does not collide.
fn replay_with_a_serial_key_after_a_preview_is_identical(kind: Kind) {
    let mut fx = Fixture::new(kind);
    let (ddl, tables) = generated_tables(kind);
    fx.db.exec(ddl);
    fx.sb
        .env
        .push(("AIRLOCK_POLICY__PREVIEW".into(), "true".into()));
    // The database as it was before the run, and the same URL form for both.
    let (url, snap) = match kind {
        Kind::Postgres => {
            let snap = fx.pg_snapshot();
            (snap.url.clone(), Some(snap))
        }
        Kind::Sqlite => {
            let copy = sqlite_copy(&fx);
            // SQLite's previews take no rowid; another writer's row, since
            // deleted, burns an AUTOINCREMENT value in the original alone.
            fx.db
                .exec("INSERT INTO t_auto (name) VALUES ('other'); DELETE FROM t_auto;");
            (format!("sqlite://{}", copy.display()), None)
        }
    };
    fx.sb.start();
    let mut count = 0;
    for table in tables {
        for name in ["first", "second"] {
            let id = format!("g-{table}-{name}");
            let op = json!({"op": "insert", "table": table, "values": {"name": name}});
            fx.apply(&fx.intent(&id, "r1", op));
            count += 1;
        }
    }
    fx.sb.stop();
    let original = tables_in(tables, |sql| fx.db.table_sql(sql));
    let file = fx.export();
    let key = fx.public_key();
    let out = replay(&[
        "--run",
        "r1",
        "--target",
        &url,
        "--check",
        file.to_str().unwrap(),
        "--public-key",
        key.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{kind:?}: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains(&format!("check: {count} intent(s), 0 divergence(s)")),
        "{kind:?}: {}",
        stdout(&out)
    );
    let copy_rows = |sql: &str| match (&fx.db, &snap) {
        (Db::Pg { runtime, .. }, Some(snap)) => runtime.block_on(async {
            let copy = pg::connect(&snap.url).await;
            pg_rows(&copy, sql).await
        }),
        _ => sqlite_rows(std::path::Path::new(&url["sqlite://".len()..]), sql),
    };
    assert_eq!(tables_in(tables, copy_rows), original, "{kind:?}");

    // The next ordinary insert into the copy takes a key past the replayed ones.
    for (table, rows) in tables.iter().zip(&original) {
        let max = rows
            .iter()
            .map(|r| r["id"].as_i64().unwrap())
            .max()
            .unwrap();
        let next = match (&fx.db, &snap) {
            (Db::Pg { runtime, .. }, Some(snap)) => runtime.block_on(async {
                let copy = pg::connect(&snap.url).await;
                let sql = format!("INSERT INTO {table} (name) VALUES ('next') RETURNING id::int8");
                let id: i64 = copy.query_one(&sql, &[]).await.unwrap().get(0);
                vec![json!({ "id": id })]
            }),
            _ => {
                let path = &url["sqlite://".len()..];
                let db = rusqlite::Connection::open(path).unwrap();
                db.execute(&format!("INSERT INTO {table} (name) VALUES ('next')"), [])
                    .unwrap();
                vec![json!({"id": db.last_insert_rowid()})]
            }
        };
        assert_eq!(next, [json!({"id": max + 1})], "{kind:?} {table}");
    }
}

#[test]
fn replay_with_a_serial_key_after_a_preview_is_identical_on_both_targets() {
    both(replay_with_a_serial_key_after_a_preview_is_identical);
}

/// Undone intents are skipped by default (their rows were reverted), and the
/// output names them; `--include-undone` replays them too.
#[test]
fn replay_skips_undone_intents_unless_asked() {
    let _serial = serial();
    let mut fx = Fixture::new(Kind::Sqlite);
    let skipping = sqlite_copy(&fx);
    let including = fx.sb.dir.path().join("including.db");
    std::fs::copy(&skipping, &including).unwrap();
    fx.run();
    let out = fx.undo(&["--intent", "i-ins"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let state = fx.sb.state();
    let replay_into = |copy: &std::path::Path, extra: &[&str]| {
        let url = format!("sqlite://{}", copy.display());
        let mut args = vec![
            "--run",
            "r1",
            "--target",
            &url,
            "--check",
            "--state",
            state.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = replay(&args);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        stdout(&out)
    };
    let copied = |copy: &std::path::Path| tables_in(&TABLES, |sql| sqlite_rows(copy, sql));

    let out = replay_into(&skipping, &[]);
    assert!(
        out.contains("i-ins: skipped: undone in the run (--include-undone replays it)"),
        "{out}"
    );
    assert!(out.contains("check: 3 intent(s), 0 divergence(s)"), "{out}");
    assert_eq!(copied(&skipping), fx.db.snapshot());

    let out = replay_into(&including, &["--include-undone"]);
    assert!(out.contains("i-ins: applied"), "{out}");
    assert!(out.contains("check: 4 intent(s), 0 divergence(s)"), "{out}");
    let customers = &copied(&including)[0];
    assert!(customers.iter().any(|c| c["name"] == "Cy"), "{customers:?}");
    assert_ne!(copied(&including), fx.db.snapshot());
}

/// Issue 12, item 7: replay (and undo and approve, which never create a target
/// either) into a SQLite path that does not exist fails with a clear message and
/// creates nothing, neither the file nor its directory.
#[test]
fn replay_into_a_missing_sqlite_path_fails_and_creates_nothing() {
    let _serial = serial();
    let mut fx = Fixture::new(Kind::Sqlite);
    fx.run();
    fx.sb.start();
    let held = fx.intent(
        "i-held",
        "r1",
        json!({"op": "delete", "table": "customers", "key": {"id": 3}}),
    );
    fx.sb.submit_json(&held);
    fx.sb.outcome_in("i-held", "awaiting_review");
    fx.sb.stop();
    let missing = fx.sb.dir.path().join("missing").join("replay.db");
    let url = format!("sqlite://{}", missing.display());
    let state = fx.sb.state();
    let out = replay(&[
        "--run",
        "r1",
        "--target",
        &url,
        "--state",
        state.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "replayed into a missing file");
    assert!(
        stderr(&out).contains(&format!(
            "replay target {url}: no such database file (replay writes into an existing \
             database; create it from your schema first)"
        )),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    for (what, args) in [
        ("undo", vec!["undo", "--run", "r1", "--as", "bob"]),
        ("approve", vec!["approve", "i-held", "--as", "alice"]),
    ] {
        let out = airlock()
            .args(&args)
            .args(["--target", &url, "--state", state.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{what} opened a missing target");
        assert!(
            stderr(&out).contains("no such database file"),
            "{what}: {}",
            stderr(&out)
        );
    }
    assert!(
        !support::path_exists(missing.parent().unwrap()),
        "a directory was created"
    );
    assert_eq!(fx.state_of("i-held"), "awaiting_review");
    assert_eq!(fx.state_of("i-ins"), "applied");
}
