//! Attacks on names: the agent spells a denied table another way (case, schema
//! qualification, `search_path`), names a system catalog or Airlock's own ledger, or
//! a table that does not exist; and the database role Airlock connects as.
//!
//! Invariants played here (DESIGN invariants 3 and 5): the policy decides on the
//! names the database will resolve, never on the agent's spelling; system catalogs
//! are unreachable whatever the role could do; a name that does not resolve fails
//! before any policy, with a clear outcome; and Airlock runs fully (apply, preview,
//! undo) as the least-privilege role of `docs/postgres-role.md`, while refusing a
//! privileged one unless told otherwise.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::pg::{self, TestDb};
use crate::support::{Sandbox, intent};

/// An update of the sandbox's one `audit_log` row through `table`.
fn rewrite_audit_log(id: &str, table: &str) -> Value {
    intent(
        id,
        "run-names",
        json!({"op": "update", "table": table, "key": {"id": 1},
               "set": {"message": "nothing happened here"}}),
    )
}

/// The outcome of `id` once final.
fn final_outcome(sb: &Sandbox, id: &str) -> Value {
    sb.outcome_where(id, |o| o["final"] == true)
}

/// Asserts `outcome` failed before any policy was asked, because its names did not
/// resolve, with `code` and a message holding `fragment`.
fn failed_before_policy(outcome: &Value, code: &str, fragment: &str) {
    assert_eq!(outcome["state"], "failed", "{outcome:#}");
    assert_eq!(outcome["decision"], Value::Null, "{outcome:#}");
    assert_eq!(outcome["error"]["stage"], "resolve", "{outcome:#}");
    assert_eq!(outcome["error"]["code"], code, "{outcome:#}");
    let message = outcome["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(fragment),
        "{fragment:?} not in {outcome:#}"
    );
}

/// Asserts `outcome` was refused at validation, naming the op's table.
fn refused_at_validation(outcome: &Value) {
    assert_eq!(outcome["state"], "invalid", "{outcome:#}");
    assert_eq!(
        outcome["problems"][0]["pointer"], "/ops/0/table",
        "{outcome:#}"
    );
    let message = outcome["problems"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("is reserved"), "{outcome:#}");
}

/// On SQLite, every spelling that reaches `audit_log` is denied by the example
/// policy's rule on `audit_log`: the policy sees the canonical name.
#[test]
fn sqlite_every_spelling_of_a_denied_table_is_denied() {
    let mut sb = Sandbox::new();
    sb.start();
    let spellings = [
        "audit_log",
        "AUDIT_LOG",
        "Audit_Log",
        "main.AUDIT_LOG",
        "MAIN.audit_log",
        "Main.Audit_Log",
    ];
    for (i, table) in spellings.iter().enumerate() {
        sb.submit_json(&rewrite_audit_log(&format!("spell-{i}"), table));
    }
    for (i, table) in spellings.iter().enumerate() {
        let outcome = final_outcome(&sb, &format!("spell-{i}"));
        assert_eq!(outcome["state"], "denied", "{table}: {outcome:#}");
        let reasons = outcome["reasons"].to_string();
        assert!(reasons.contains("main.audit_log"), "{table}: {reasons}");
    }
    assert_eq!(
        sb.rows("SELECT message FROM audit_log"),
        [[json!("sandbox created")]]
    );
    // The daemon is still up and applies an ordinary write.
    sb.submit_json(&crate::support::insert_customer(
        "ok-1",
        "run-names",
        7,
        "Ada",
    ));
    sb.outcome_in("ok-1", "applied");
    assert!(sb.stop().success());
}

/// SQLite's catalog and Airlock's ledger are refused at validation in every case;
/// a table that does not exist, or a column the table lacks, fails before policy.
#[test]
fn sqlite_catalogs_and_missing_names_never_reach_the_policy() {
    let mut sb = Sandbox::new();
    // A policy that allows everything: only Airlock itself stands in the way.
    sb.use_policy(
        "allow.rego",
        "package airlock.authz\n\ndefault allow := true\n",
    );
    sb.start();
    // Once it listens, the daemon has opened the target (and created its ledger).
    sb.review_url();
    let schema_before = sb.rows("SELECT type, name, sql FROM sqlite_schema ORDER BY name");
    let catalogs = [
        "sqlite_master",
        "SQLITE_MASTER",
        "main.sqlite_schema",
        "sqlite_sequence",
        "airlock_ledger",
        "main.AIRLOCK_SCHEMA",
    ];
    for (i, table) in catalogs.iter().enumerate() {
        sb.submit_json(&intent(
            &format!("catalog-{i}"),
            "run-catalog",
            json!({"op": "update", "table": table, "key": {"name": "customers"},
                   "set": {"sql": "CREATE TABLE customers(x)"}}),
        ));
    }
    for i in 0..catalogs.len() {
        refused_at_validation(&sb.outcome_in(&format!("catalog-{i}"), "invalid"));
    }
    sb.submit_json(&intent(
        "missing-table",
        "run-missing",
        json!({"op": "insert", "table": "no_such_table", "values": {"id": 1}}),
    ));
    failed_before_policy(
        &final_outcome(&sb, "missing-table"),
        "AIRLOCK_UNKNOWN_TABLE",
        "does not exist",
    );
    sb.submit_json(&intent(
        "missing-column",
        "run-missing-column",
        json!({"op": "update", "table": "customers", "key": {"id": 1},
               "set": {"is_admin": 1}}),
    ));
    failed_before_policy(
        &final_outcome(&sb, "missing-column"),
        "AIRLOCK_UNKNOWN_COLUMN",
        "is_admin",
    );
    assert_eq!(
        sb.rows("SELECT type, name, sql FROM sqlite_schema ORDER BY name"),
        schema_before
    );
    // No decision was ever recorded for them: the policy was never asked.
    let log = sb.log();
    for id in ["missing-table", "missing-column"] {
        assert!(
            !log.lines()
                .any(|l| l.contains("intent decided") && l.contains(id)),
            "{id} was decided:\n{log}"
        );
    }
    assert!(sb.stop().success());
}

// ---------------------------------------------------------------------------------
// PostgreSQL

/// The sandbox's tables, in PostgreSQL.
const PG_SCHEMA: &str = "
CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT UNIQUE,
    tier TEXT NOT NULL DEFAULT 'standard'
);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers (id),
    total_cents INTEGER NOT NULL CHECK (total_cents >= 0),
    status TEXT NOT NULL
);
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    message TEXT NOT NULL
);
INSERT INTO audit_log (id, at, message) VALUES (1, '2026-11-01T00:00:00Z', 'sandbox created');
";

/// The role documentation whose SQL the tests run.
const ROLE_DOC: &str = include_str!("../../../docs/postgres-role.md");

/// The ```sql blocks of `docs/postgres-role.md`, in order.
fn doc_sql_blocks() -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in ROLE_DOC.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sql") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), line) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

/// A role made by the documentation's SQL in one test database, dropped (after the
/// database, whose schema it owns) when this is.
struct DocRole {
    name: String,
    runtime: tokio::runtime::Runtime,
    /// Declared before the role is dropped: the database goes first.
    db: Option<TestDb>,
}

impl DocRole {
    fn create() -> DocRole {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "airlock_app_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let db = runtime.block_on(TestDb::create(PG_SCHEMA));
        let blocks = doc_sql_blocks();
        assert_eq!(blocks.len(), 2, "docs/postgres-role.md has two SQL blocks");
        let cluster = blocks[0].replace("airlock_app", &name);
        let database = blocks[1]
            .replace("airlock_app", &name)
            .replace("appdb", &format!("\"{}\"", db.name));
        runtime.block_on(async {
            let admin = pg::connect(&pg::server_url()).await;
            admin
                .batch_execute(&cluster)
                .await
                .expect("the cluster block");
            db.client
                .batch_execute(&database)
                .await
                .expect("the database block");
        });
        DocRole {
            name,
            runtime,
            db: Some(db),
        }
    }

    fn db(&self) -> &TestDb {
        self.db.as_ref().unwrap()
    }

    /// A URL connecting to the test database as the role.
    fn url(&self) -> String {
        let addr = self.runtime.block_on(pg::server_addr());
        format!(
            "postgres://{}:change-me@{addr}/{}",
            self.name,
            self.db().name
        )
    }

    fn rows(&self, sql: &str) -> Vec<Value> {
        self.runtime.block_on(self.db().rows(sql))
    }
}

impl Drop for DocRole {
    fn drop(&mut self) {
        drop(self.db.take());
        let name = self.name.clone();
        self.runtime.block_on(async move {
            if let Ok((client, connection)) =
                tokio_postgres::connect(&pg::server_url(), tokio_postgres::NoTls).await
            {
                tokio::spawn(connection);
                let _ = client
                    .batch_execute(&format!("DROP ROLE IF EXISTS \"{name}\""))
                    .await;
            }
        });
    }
}

/// On PostgreSQL, as the documented least-privilege role: every spelling the
/// database resolves to `public.audit_log` is denied by the example policy; a
/// quoted spelling PostgreSQL does not fold (`AUDIT_LOG`) is no table at all and
/// fails before policy; system catalogs never reach the policy, not even
/// `pg_class` found through `search_path`; and apply, preview and undo work.
#[test]
fn postgres_least_privilege_role_names_and_full_run() {
    let role = DocRole::create();
    let mut sb = Sandbox::new();
    sb.target_url = Some(role.url());
    sb.env
        .push(("AIRLOCK_POLICY__PREVIEW".into(), "true".into()));
    // The role passes the check, without any override.
    let check = sb.cli_run_check();
    assert!(check.status.success(), "{check:?}");
    sb.start();

    for (i, table) in ["audit_log", "public.audit_log"].iter().enumerate() {
        sb.submit_json(&rewrite_audit_log(&format!("pg-spell-{i}"), table));
    }
    for i in 0..2 {
        let outcome = final_outcome(&sb, &format!("pg-spell-{i}"));
        assert_eq!(outcome["state"], "denied", "{outcome:#}");
        assert!(outcome["reasons"].to_string().contains("public.audit_log"));
    }
    // Airlock quotes identifiers, so PostgreSQL does not fold these: no such table.
    for (i, table) in ["AUDIT_LOG", "Audit_Log", "PUBLIC.audit_log"]
        .iter()
        .enumerate()
    {
        sb.submit_json(&rewrite_audit_log(&format!("pg-quoted-{i}"), table));
        failed_before_policy(
            &final_outcome(&sb, &format!("pg-quoted-{i}")),
            "AIRLOCK_UNKNOWN_TABLE",
            "does not exist",
        );
    }
    // Catalogs: refused at validation when named, at resolution when found through
    // search_path (pg_catalog is implicitly searched first).
    for (i, table) in [
        "pg_catalog.pg_authid",
        "information_schema.tables",
        "airlock.ledger",
        "PG_TOAST.pg_toast_1255",
    ]
    .iter()
    .enumerate()
    {
        sb.submit_json(&intent(
            &format!("pg-catalog-{i}"),
            "run-pg-catalog",
            json!({"op": "update", "table": table, "key": {"rolname": "x"},
                   "set": {"rolsuper": true}}),
        ));
        refused_at_validation(&sb.outcome_in(&format!("pg-catalog-{i}"), "invalid"));
    }
    sb.submit_json(&intent(
        "pg-class",
        "run-pg-class",
        json!({"op": "update", "table": "pg_class", "key": {"relname": "customers"},
               "set": {"relname": "hijacked"}}),
    ));
    failed_before_policy(
        &final_outcome(&sb, "pg-class"),
        "AIRLOCK_SYSTEM_TABLE",
        "pg_catalog.pg_class",
    );
    assert_eq!(
        role.rows("SELECT message FROM audit_log"),
        [json!({"message": "sandbox created"})]
    );
    assert_eq!(
        role.rows("SELECT count(*) AS n FROM pg_class WHERE relname = 'hijacked'"),
        [json!({"n": 0})]
    );

    // The full path under the least-privilege role: preview (the policy input's
    // preview), apply, then undo from the CLI.
    sb.submit_json(&intent(
        "pg-apply",
        "run-pg-apply",
        json!({"op": "insert", "table": "customers",
               "values": {"id": 42, "name": "Ada"}}),
    ));
    let applied = sb.outcome_in("pg-apply", "applied");
    assert_eq!(applied["decision"]["verdict"], "allow", "{applied:#}");
    assert_eq!(
        role.rows("SELECT name FROM customers WHERE id = 42"),
        [json!({"name": "Ada"})]
    );
    assert!(
        sb.log().contains("pg-apply"),
        "the daemon logged nothing of the intent"
    );
    let undo = sb.cli(&[
        "undo",
        "--run",
        "run-pg-apply",
        "--target",
        &role.url(),
        "--as",
        "tester",
    ]);
    assert!(undo.status.success(), "{undo:?}");
    sb.outcome_in("pg-apply", "undone");
    assert_eq!(
        role.rows("SELECT count(*) AS n FROM customers WHERE id = 42"),
        [json!({"n": 0})]
    );
    assert!(sb.stop().success());
}

/// A superuser role stops start-up (and `run --check`) with the reason, unless
/// `allow_privileged_role` is set.
#[test]
fn postgres_superuser_role_is_refused_unless_allowed() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::create(PG_SCHEMA));
    let mut sb = Sandbox::new();
    // The test server's role, `postgres`, is a superuser.
    sb.target_url = Some(db.url.clone());

    let check = sb.cli_run_check();
    assert_eq!(check.status.code(), Some(64), "{check:?}");
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(stderr.contains("SUPERUSER"), "{stderr}");
    assert!(stderr.contains("allow_privileged_role"), "{stderr}");
    assert!(!stderr.contains(&db.url), "the URL leaked: {stderr}");

    // The daemon refuses to start the same way, and takes no intent.
    sb.submit_json(&crate::support::insert_customer("su-1", "run-su", 1, "Ada"));
    sb.start();
    let status = crate::support::eventually("airlock to refuse to start", || {
        sb.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    });
    sb.child = None;
    assert_eq!(status.code(), Some(64), "log:\n{}", sb.log());
    assert!(sb.log().contains("SUPERUSER"), "{}", sb.log());
    assert!(crate::support::path_exists(&sb.intents().join("su-1.json")));

    // Allowed on purpose: it starts and applies.
    sb.allow_privileged_role();
    let check = sb.cli_run_check();
    assert!(check.status.success(), "{check:?}");
    sb.start();
    sb.outcome_in("su-1", "applied");
    assert!(sb.stop().success());
}

trait RunCheck {
    /// `airlock run --check` with the sandbox's directories, target and environment.
    fn cli_run_check(&self) -> std::process::Output;
}

impl RunCheck for Sandbox {
    fn cli_run_check(&self) -> std::process::Output {
        self.run_command()
            .arg("--check")
            .output()
            .expect("run airlock run --check")
    }
}
