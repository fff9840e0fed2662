//! Attacks on what failures tell the agent and on what an approval binds, played
//! against the real `airlock` binary on SQLite and on PostgreSQL.
//!
//! - **Errors never leak data the agent could not read.** The agent provokes every
//!   kind of failure on a table holding a secret column (a failed `expect`, a unique,
//!   check and foreign-key violation); the secret must appear nowhere under the
//!   results directory, while the human-facing detail stays in the run log, which
//!   the review API shows.
//! - **Approval binds what the reviewer saw.** A delete keyed by email is previewed
//!   (id 700), then the emails of 700 and 701 are swapped under it: before the
//!   approval (the approval is refused) and after it, while the intent waits behind
//!   an earlier intent of its run (the apply finds other rows, writes nothing and
//!   sends the intent back to review). Only a new approval of a new preview deletes,
//!   and then exactly the row that preview showed.

use std::path::Path;

use serde_json::{Value, json};

use crate::pg::TestDb;
use crate::support::http::Client;
use crate::support::{Sandbox, intent};

/// A value stored in the target that the agent never wrote and may never read.
const SECRET: &str = "sk_live_SECRET_4f9a27";

/// A table with a secret column and constraints the agent can trip over. Two rows
/// share the secret, so a unique violation on (email, api_key) quotes it.
const ACCOUNTS: &str = "
    CREATE TABLE accounts (
        id INTEGER PRIMARY KEY,
        email TEXT NOT NULL CHECK (email LIKE '%@%'),
        api_key TEXT NOT NULL,
        owner INTEGER REFERENCES accounts (id),
        UNIQUE (email, api_key)
    );
    INSERT INTO accounts (id, email, api_key) VALUES
        (1, 'alice@x', 'sk_live_SECRET_4f9a27'),
        (2, 'bob@x', 'sk_live_SECRET_4f9a27');
";

/// The customers of the swap attack (PostgreSQL; SQLite has the demo's table).
const PG_CUSTOMERS: &str = "
    CREATE TABLE customers (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        email TEXT UNIQUE,
        tier TEXT NOT NULL DEFAULT 'standard'
    );
";

/// The target database, for set-up and checks behind Airlock's back.
enum Db {
    Sqlite(std::path::PathBuf),
    Postgres(Box<(TestDb, tokio::runtime::Runtime)>),
}

impl Db {
    /// A sandbox on SQLite (the sandbox's own target file), with `schema` run in it.
    fn sqlite(schema: &str) -> (Sandbox, Db) {
        let sb = Sandbox::new();
        let db = Db::Sqlite(sb.target());
        db.execute(schema);
        (sb, db)
    }

    /// A sandbox on a fresh PostgreSQL database made with `schema`.
    fn postgres(schema: &str) -> (Sandbox, Db) {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let test_db = runtime.block_on(TestDb::create(schema));
        let mut sb = Sandbox::new();
        sb.target_url = Some(test_db.url.clone());
        sb.allow_privileged_role();
        (sb, Db::Postgres(Box::new((test_db, runtime))))
    }

    fn execute(&self, sql: &str) {
        match self {
            Db::Sqlite(path) => rusqlite::Connection::open(path)
                .and_then(|db| db.execute_batch(sql))
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
            Db::Postgres(pg) => {
                pg.1.block_on(pg.0.client.batch_execute(sql))
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
            }
        }
    }

    /// The ids of the customers, ascending.
    fn customer_ids(&self) -> Vec<i64> {
        match self {
            Db::Sqlite(path) => {
                let db = rusqlite::Connection::open(path).expect("open target");
                let mut stmt = db
                    .prepare("SELECT id FROM customers ORDER BY id")
                    .expect("prepare");
                stmt.query_map([], |row| row.get(0))
                    .expect("query")
                    .collect::<Result<_, _>>()
                    .expect("rows")
            }
            Db::Postgres(pg) => {
                pg.1.block_on(pg.0.rows("SELECT id FROM customers ORDER BY id"))
                    .iter()
                    .map(|row| row["id"].as_i64().expect("id"))
                    .collect()
            }
        }
    }
}

/// Every byte under `dir` (the results directory), as text.
fn everything_under(dir: &Path) -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir(dir).expect("read results").flatten() {
        let path = entry.path();
        if path.is_dir() {
            all.push_str(&everything_under(&path));
        } else {
            all.push_str(&String::from_utf8_lossy(
                &std::fs::read(&path).unwrap_or_default(),
            ));
        }
    }
    all
}

/// The `failed` record's data of intent `id`, as the review API shows it.
fn failed_record(viewer: &Client, id: &str) -> Value {
    let detail = viewer.get(&format!("/v1/intents/{id}"));
    assert_eq!(detail.status, 200, "{}", detail.text());
    let detail = detail.json();
    detail["history"]
        .as_array()
        .expect("history")
        .iter()
        .find(|r| r["event"] == "failed")
        .unwrap_or_else(|| panic!("no failed record: {detail:#}"))["data"]
        .clone()
}

fn update(id: &str, key: Value, set: Value, expect: Option<Value>) -> Value {
    let mut op = json!({"op": "update", "table": "accounts", "key": key, "set": set});
    if let Some(expect) = expect {
        op["expect"] = expect;
    }
    // One run each: a failed intent never holds back another.
    intent(id, &format!("run-{id}"), op)
}

/// The agent trips every kind of failure on the secret table; `codes` are the
/// target's codes for the unique, check and foreign-key violations.
fn errors_never_leak_stored_values(mut sb: Sandbox, codes: [&str; 3], detail_leaks: bool) {
    sb.start();
    let attacks = [
        (
            "guess-expect",
            update(
                "guess-expect",
                json!({"id": 1}),
                json!({"email": "alice2@x"}),
                Some(json!({"api_key": "sk_live_guess", "email": "alice@x"})),
            ),
            "AIRLOCK_EXPECT_FAILED",
        ),
        (
            "unique",
            update(
                "unique",
                json!({"id": 2}),
                json!({"email": "alice@x"}),
                None,
            ),
            codes[0],
        ),
        (
            "check",
            update(
                "check",
                json!({"id": 1}),
                json!({"email": "no-at-sign"}),
                None,
            ),
            codes[1],
        ),
        (
            "foreign-key",
            update("foreign-key", json!({"id": 1}), json!({"owner": 999}), None),
            codes[2],
        ),
    ];
    for (_, attack, _) in &attacks {
        sb.submit_json(attack);
    }
    let viewer = Client::new(&sb.review_url()).bearer(&sb.token("auditor", "viewer"));
    for (id, _, code) in &attacks {
        let outcome = sb.outcome_in(id, "failed");
        assert_eq!(outcome["error"]["code"], *code, "{outcome:#}");
        assert_eq!(outcome["error"]["op"], 0, "{outcome:#}");
        let text = outcome.to_string();
        assert!(!text.contains("sk_live_SECRET"), "{id} leaks: {outcome:#}");
        assert!(!text.contains("DETAIL"), "{id} leaks DETAIL: {outcome:#}");
        assert!(!text.contains("Failing row"), "{id}: {outcome:#}");
        assert!(!text.contains("is not present"), "{id}: {outcome:#}");
    }
    // The agent learns which expect columns differ, not what the row holds.
    let outcome = sb.outcome_in("guess-expect", "failed");
    let message = outcome["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("api_key") && !message.contains("\"email\""),
        "{message}"
    );

    // Humans still have the whole story: the run log, through the review API.
    let expect = failed_record(&viewer, "guess-expect");
    let detail = expect["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(SECRET), "{expect:#}");
    if detail_leaks {
        for id in ["unique", "check"] {
            let record = failed_record(&viewer, id);
            let detail = record["detail"].as_str().unwrap_or_default();
            assert!(
                detail.contains("DETAIL") && detail.contains(SECRET),
                "{id}: {record:#}"
            );
        }
        let record = failed_record(&viewer, "foreign-key");
        assert!(
            record["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("is not present"),
            "{record:#}"
        );
    }

    // Nothing the agent can read holds the secret, in any file.
    let all = everything_under(&sb.results());
    assert!(!all.is_empty());
    assert!(!all.contains("sk_live_SECRET"), "the results leak: {all}");
    assert!(sb.stop().success());
}

#[test]
fn sqlite_errors_never_leak_stored_values() {
    let (sb, _db) = Db::sqlite(ACCOUNTS);
    errors_never_leak_stored_values(
        sb,
        [
            "SQLITE_CONSTRAINT_UNIQUE",
            "SQLITE_CONSTRAINT_CHECK",
            "SQLITE_CONSTRAINT_FOREIGNKEY",
        ],
        false,
    );
}

#[test]
fn postgres_errors_never_leak_stored_values() {
    let (sb, _db) = Db::postgres(ACCOUNTS);
    errors_never_leak_stored_values(sb, ["23505", "23514", "23503"], true);
}

fn delete_by_email(id: &str, run: &str, email: &str) -> Value {
    intent(
        id,
        run,
        json!({"op": "delete", "table": "customers", "key": {"email": email}}),
    )
}

/// What the reviewer sees of intent `id`: its digest, its preview digest and the
/// ids of the rows the preview shows before.
fn look(reviewer: &Client, id: &str) -> (String, String, Vec<i64>) {
    let detail = reviewer.get(&format!("/v1/intents/{id}"));
    assert_eq!(detail.status, 200, "{}", detail.text());
    let detail = detail.json();
    let preview = &detail["preview"];
    let ids = preview["ops"]
        .as_array()
        .unwrap_or_else(|| panic!("no preview: {detail:#}"))
        .iter()
        .flat_map(|op| op["before"].as_array().cloned().unwrap_or_default())
        .filter_map(|row| row["id"].as_i64())
        .collect();
    (
        detail["digest"].as_str().unwrap().to_owned(),
        preview["digest"].as_str().unwrap().to_owned(),
        ids,
    )
}

fn approve(reviewer: &Client, id: &str, digest: &str, preview: &str) -> (u16, Value) {
    let response = reviewer.post(
        &format!("/v1/intents/{id}/approve"),
        &json!({"digest": digest, "preview_digest": preview}),
    );
    (response.status, response.json())
}

/// Swaps the emails of customers 700 and 701 (one at a time: both are unique).
const SWAP: &str = "
    UPDATE customers SET email = 'swap@x' WHERE id = 700;
    UPDATE customers SET email = 'a@x' WHERE id = 701;
    UPDATE customers SET email = 'b@x' WHERE id = 700;
";

/// Undoes [`SWAP`].
const SWAP_BACK: &str = "
    UPDATE customers SET email = 'swap@x' WHERE id = 701;
    UPDATE customers SET email = 'a@x' WHERE id = 700;
    UPDATE customers SET email = 'b@x' WHERE id = 701;
";

fn approval_binds_the_rows_the_reviewer_saw(mut sb: Sandbox, db: &Db) {
    db.execute(
        "INSERT INTO customers (id, name, email) VALUES (700, 'Ada', 'a@x'), (701, 'Bob', 'b@x'), \
         (702, 'Cy', 'c@x');",
    );
    sb.start();
    let reviewer = Client::new(&sb.review_url()).bearer(&sb.token("alice", "approver"));

    // 1. The rows change between the preview and the approval: refused.
    sb.submit_json(&delete_by_email("del-early", "run-early", "a@x"));
    sb.outcome_in("del-early", "awaiting_review");
    let (digest, seen, ids) = look(&reviewer, "del-early");
    assert_eq!(ids, [700]);
    db.execute(SWAP);
    let (status, body) = approve(&reviewer, "del-early", &digest, &seen);
    assert_eq!(status, 409, "{body:#}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("changed since the preview"),
        "{body:#}"
    );
    sb.outcome_in("del-early", "awaiting_review");
    db.execute(SWAP_BACK);
    assert_eq!(db.customer_ids(), [700, 701, 702]);

    // 2. The rows change after the approval, while the intent waits behind an
    // earlier intent of its run: the apply writes nothing and asks again.
    sb.submit_json(&intent(
        "hold",
        "run-swap",
        json!({"op": "delete", "table": "customers", "key": {"id": 702}}),
    ));
    sb.outcome_in("hold", "awaiting_review");
    sb.submit_json(&delete_by_email("del-a", "run-swap", "a@x"));
    sb.outcome_in("del-a", "awaiting_review");
    let (digest, seen, ids) = look(&reviewer, "del-a");
    assert_eq!(ids, [700], "the reviewer sees Ada, id 700");
    let (status, body) = approve(&reviewer, "del-a", &digest, &seen);
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["state"], "approved");
    // Held back by `hold` (a run applies in order): nothing is deleted yet.
    assert_eq!(db.customer_ids(), [700, 701, 702]);
    db.execute(SWAP);
    let (hold_digest, hold_seen, _) = look(&reviewer, "hold");
    let (status, body) = approve(&reviewer, "hold", &hold_digest, &hold_seen);
    assert_eq!(status, 200, "{body:#}");
    sb.outcome_in("hold", "applied");

    let outcome = sb.outcome_where("del-a", |o| {
        o["state"] == "awaiting_review" && o["error"]["code"] == "AIRLOCK_ROWS_CHANGED"
    });
    assert_eq!(outcome["final"], false, "{outcome:#}");
    assert!(
        outcome["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("rows changed since review")),
        "{outcome:#}"
    );
    assert_eq!(outcome["review"]["approved_by"], json!([]), "{outcome:#}");
    assert_eq!(
        db.customer_ids(),
        [700, 701],
        "Bob (701, now a@x) must not be deleted on an approval of Ada's row"
    );
    // The run log says what happened, and the old approval no longer counts.
    let history = reviewer.get("/v1/intents/del-a").json()["history"].clone();
    let events: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["received", "decided", "approved", "rows_changed"]);
    assert_eq!(history[3]["data"]["voided"], json!(["alice"]));
    let (status, _) = approve(&reviewer, "del-a", &digest, &seen);
    assert_eq!(status, 409, "the stale preview cannot be approved again");

    // 3. A new look, a new approval: it deletes what the new preview showed.
    let (digest, seen, ids) = look(&reviewer, "del-a");
    assert_eq!(ids, [701], "now a@x is Bob, id 701");
    let (status, body) = approve(&reviewer, "del-a", &digest, &seen);
    assert_eq!(status, 200, "{body:#}");
    let outcome = sb.outcome_in("del-a", "applied");
    assert_eq!(outcome["review"]["approved_by"], json!(["alice"]));
    assert_eq!(db.customer_ids(), [700]);

    // The log with its new record kind still verifies.
    let key = sb.state().join("signing.key.pub").display().to_string();
    let out = sb.cli(&["verify", "--public-key", &key]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(sb.stop().success());
}

#[test]
fn sqlite_approval_binds_the_rows_the_reviewer_saw() {
    let (sb, db) = Db::sqlite("");
    approval_binds_the_rows_the_reviewer_saw(sb, &db);
}

#[test]
fn postgres_approval_binds_the_rows_the_reviewer_saw() {
    let (sb, db) = Db::postgres(PG_CUSTOMERS);
    approval_binds_the_rows_the_reviewer_saw(sb, &db);
}
