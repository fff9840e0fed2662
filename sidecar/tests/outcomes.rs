//! What the agent is told: the real `airlock` binary writes outcome files that say
//! what an approved intent waits for, what an applied one wrote (the keys the
//! database generated included, on SQLite and PostgreSQL), whether and how a final
//! failure can be retried, and the intent's trace id. Every outcome these tests read
//! is checked against the published `outcome.schema.json` (by
//! `Sandbox::outcome_where`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

#[path = "support/pg.rs"]
mod pg;
mod support;

use serde_json::{Value, json};
use support::{Sandbox, airlock, insert_customer, intent};

fn delete_customer(id: &str, run: &str, customer: i64) -> Value {
    intent(
        id,
        run,
        json!({"op": "delete", "table": "customers", "key": {"id": customer}}),
    )
}

/// Runs `airlock ARGS` on the sandbox's state and fails unless it succeeds.
fn cli_ok(sb: &Sandbox, args: &[&str]) {
    let out = sb.cli(args);
    assert!(
        out.status.success(),
        "airlock {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The outcome's reasons, one a line.
fn reasons(outcome: &Value) -> String {
    outcome["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Issue 12, item 1: an approved intent held back by an earlier intent of its run
/// says which, in what state and until when; when that intent changes, the
/// outcome is rewritten (the waiting intent's own state does not change), and once
/// nothing holds it back, it applies and says nothing of waiting.
#[test]
fn an_approved_intent_says_what_it_waits_for_until_it_applies() {
    let mut sb = Sandbox::new();
    sb.start();
    for (id, customer, name) in [("c-1", 1, "Ada"), ("c-2", 2, "Grace")] {
        sb.submit_json(&insert_customer(id, "run-w", customer, name));
        sb.outcome_in(id, "applied");
    }
    // Deletes need review (the built-in policy); the insert behind them is allowed.
    sb.submit_json(&delete_customer("del-1", "run-w", 1));
    let first = sb.outcome_in("del-1", "awaiting_review");
    sb.submit_json(&delete_customer("del-2", "run-w", 2));
    let second = sb.outcome_in("del-2", "awaiting_review");
    assert!(second.get("waiting_for").is_none(), "{second:#}");
    sb.submit_json(&insert_customer("c-3", "run-w", 3, "Edsger"));

    let held = sb.outcome_in("c-3", "approved");
    let expires = first["review"]["expires_at"].as_str().unwrap();
    assert_eq!(
        held["waiting_for"],
        json!({"id": "del-1", "state": "awaiting_review", "expires_at": expires}),
        "{held:#}"
    );
    assert!(
        reasons(&held).contains(&format!(
            "waits for intent del-1 of run run-w, which awaits review until {expires}"
        )),
        "{held:#}"
    );

    // del-1 is approved and applied: c-3 now waits for del-2, still approved.
    cli_ok(
        &sb,
        &[
            "approve",
            "del-1",
            "--as",
            "alice",
            "--digest",
            first["digest"].as_str().unwrap(),
        ],
    );
    sb.outcome_in("del-1", "applied");
    let held = sb.outcome_where("c-3", |o| o["waiting_for"]["id"] == "del-2");
    assert_eq!(held["state"], "approved");
    assert_eq!(
        held["waiting_for"]["expires_at"],
        second["review"]["expires_at"]
    );
    assert!(!reasons(&held).contains("del-1"), "{held:#}");

    // del-2 is rejected (final): nothing holds c-3 back any more.
    cli_ok(
        &sb,
        &["reject", "del-2", "--as", "bob", "--reason", "keep Grace"],
    );
    let applied = sb.outcome_in("c-3", "applied");
    assert!(applied.get("waiting_for").is_none(), "{applied:#}");
    assert!(!reasons(&applied).contains("waits for"), "{applied:#}");
    assert_eq!(
        applied["applied"]["ops"],
        json!([{"index": 0, "rows": 1, "keys": [{"id": 3}]}])
    );
    assert_eq!(
        sb.rows("SELECT id FROM customers ORDER BY id"),
        vec![vec![json!(2)], vec![json!(3)]]
    );
    assert!(sb.stop().success());
}

/// Issue 12, item 2 on SQLite: per op, the rows written and the primary key of
/// each, including the key the database generated, a key the agent never named
/// (an update by email), and the rowid of a table without a primary key.
#[test]
fn an_applied_intent_names_the_keys_it_wrote_on_sqlite() {
    let mut sb = Sandbox::new();
    rusqlite::Connection::open(sb.target())
        .and_then(|db| db.execute_batch("CREATE TABLE notes (body TEXT NOT NULL)"))
        .unwrap();
    sb.start();
    let mut welcome = intent(
        "welcome-lin",
        "run-k",
        json!({"op": "insert", "table": "customers", "values": {"name": "Lin", "email": "lin@example.com"}}),
    );
    welcome["ops"].as_array_mut().unwrap().extend([
        json!({"op": "update", "table": "customers", "key": {"email": "lin@example.com"}, "set": {"tier": "gold"}}),
        json!({"op": "insert", "table": "notes", "values": {"body": "Lin joined"}}),
        json!({"op": "insert", "table": "notes", "values": {"body": "Lin is gold"}}),
    ]);
    sb.submit_json(&welcome);
    let outcome = sb.outcome_in("welcome-lin", "applied");
    let generated =
        sb.rows("SELECT id FROM customers WHERE email = 'lin@example.com'")[0][0].clone();
    assert!(generated.is_i64(), "{generated}");
    assert_eq!(
        outcome["applied"]["ops"],
        json!([
            {"index": 0, "rows": 1, "keys": [{"id": generated}]},
            {"index": 1, "rows": 1, "keys": [{"id": generated}]},
            {"index": 2, "rows": 1, "keys": [{"rowid": 1}]},
            {"index": 3, "rows": 1, "keys": [{"rowid": 2}]},
        ]),
        "{outcome:#}"
    );
    // Keys only: no other column's value reaches the agent this way.
    let applied = outcome["applied"].to_string();
    assert!(!applied.contains("Lin"), "{applied}");
    assert!(outcome["applied"]["at"].is_string());
    assert!(sb.stop().success());
}

/// Issue 12, item 2 on PostgreSQL: a serial key and an identity key come back
/// through `RETURNING`.
#[test]
fn an_applied_intent_names_the_keys_it_wrote_on_postgres() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = runtime.block_on(pg::TestDb::create(
        "CREATE TABLE tickets (id serial PRIMARY KEY, title text NOT NULL); \
         CREATE TABLE tags (label text NOT NULL, n bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY); \
         INSERT INTO tickets (title) VALUES ('first');",
    ));
    let mut sb = Sandbox::new();
    sb.target_url = Some(db.url.clone());
    // The test server's role is the superuser `postgres`.
    sb.allow_privileged_role();
    sb.start();
    let mut open = intent(
        "open-ticket",
        "run-pg",
        json!({"op": "insert", "table": "tickets", "values": {"title": "printer on fire"}}),
    );
    open["ops"]
        .as_array_mut()
        .unwrap()
        .push(json!({"op": "insert", "table": "public.tags", "values": {"label": "urgent"}}));
    sb.submit_json(&open);
    let outcome = sb.outcome_in("open-ticket", "applied");
    let ticket =
        runtime.block_on(db.value("SELECT id FROM tickets WHERE title = 'printer on fire'"));
    let tag = runtime.block_on(db.value("SELECT n FROM tags"));
    assert_eq!(ticket, json!(2));
    assert_eq!(
        outcome["applied"]["ops"],
        json!([
            {"index": 0, "rows": 1, "keys": [{"id": ticket}]},
            {"index": 1, "rows": 1, "keys": [{"n": tag}]},
        ]),
        "{outcome:#}"
    );
    assert!(sb.stop().success());
}

/// Issue 12, item 3: every final failure says whether a retry can help, which id
/// it needs, and what to change. The advice is checked by acting on it: an
/// invalid file's id is free (the fixed file applies under it), a spent id stays
/// spent (its bytes again change nothing).
#[test]
fn final_failures_say_whether_and_how_to_retry() {
    let mut sb = Sandbox::new();
    sb.start();

    // Denied: the policy will deny it again.
    sb.submit_json(&intent(
        "erase-1",
        "run-r",
        json!({"op": "delete", "table": "audit_log", "key": {"id": 1}}),
    ));
    let denied = sb.outcome_in("erase-1", "denied");
    assert_eq!(denied["retry"]["new_id"], true);
    assert_eq!(denied["retry"]["may_help"], false);
    let advice = denied["retry"]["advice"].as_str().unwrap();
    assert!(advice.contains("will deny it again"), "{advice}");
    assert!(advice.contains("the id erase-1 is spent"), "{advice}");

    // Invalid: it never entered the queue, so its id is free...
    let mut fixed = insert_customer("fix-me", "run-r", 5, "Barbara");
    let mut broken = fixed.clone();
    broken.as_object_mut().unwrap().remove("reason");
    sb.submit_json(&broken);
    let invalid = sb.outcome_in("fix-me", "invalid");
    assert_eq!(invalid["retry"]["new_id"], false);
    assert_eq!(invalid["retry"]["may_help"], false);
    let advice = invalid["retry"]["advice"].as_str().unwrap();
    assert!(advice.contains("its id fix-me is still free"), "{advice}");
    // ...as the fixed file shows, applied under the same id.
    sb.submit_json(&fixed);
    sb.outcome_in("fix-me", "applied");
    // Other bytes under that id now are a conflict, which needs a new id.
    fixed["reason"] = json!("again, differently");
    let bytes = serde_json::to_vec(&fixed).unwrap();
    sb.submit("fix-me-again.json", &bytes);
    let digest = airlock::seal::digest(&bytes);
    let conflict = sb.outcome_in(&format!("fix-me.conflict-{}", &digest[7..23]), "invalid");
    assert_eq!(conflict["retry"]["new_id"], true);
    assert!(
        conflict["retry"]["advice"]
            .as_str()
            .unwrap()
            .contains("under a new id"),
        "{conflict:#}"
    );

    // Failed in the target (customer_id is NOT NULL): the same writes fail again.
    let bad_order = intent(
        "bad-order",
        "run-r",
        json!({"op": "insert", "table": "orders", "values": {"id": 1, "total_cents": 5, "status": "placed"}}),
    );
    sb.submit_json(&bad_order);
    let failed = sb.outcome_in("bad-order", "failed");
    assert_eq!(failed["retry"]["new_id"], true);
    assert_eq!(failed["retry"]["may_help"], false);
    let advice = failed["retry"]["advice"].as_str().unwrap();
    assert!(advice.contains("refused op 0 for good"), "{advice}");
    assert!(
        advice.contains(failed["error"]["code"].as_str().unwrap()),
        "{advice}"
    );
    assert!(advice.contains("the id bad-order is spent"), "{advice}");
    // Spent: submitting its bytes again changes nothing (the outcome is rewritten).
    sb.submit(
        "bad-order-again.json",
        &serde_json::to_vec_pretty(&bad_order).unwrap(),
    );
    support::eventually("the resubmitted file to be taken", || {
        (!support::path_exists(&sb.intents().join("bad-order-again.json"))).then_some(())
    });
    let again = sb.outcome_in("bad-order", "failed");
    assert_eq!(again["updated_at"], failed["updated_at"]);
    assert!(sb.rows("SELECT * FROM orders").is_empty());

    // Rejected by a person.
    sb.submit_json(&insert_customer("c-9", "run-x", 9, "Alan"));
    sb.outcome_in("c-9", "applied");
    sb.submit_json(&delete_customer("del-9", "run-x", 9));
    sb.outcome_in("del-9", "awaiting_review");
    cli_ok(
        &sb,
        &["reject", "del-9", "--as", "bob", "--reason", "Alan stays"],
    );
    let rejected = sb.outcome_in("del-9", "rejected");
    assert_eq!(rejected["retry"]["new_id"], true);
    assert_eq!(rejected["retry"]["may_help"], false);
    let advice = rejected["retry"]["advice"].as_str().unwrap();
    assert!(advice.starts_with("bob rejected this intent"), "{advice}");

    // Applied and still waiting intents carry no advice (the schema says so too).
    assert!(sb.outcome_in("c-9", "applied").get("retry").is_none());
    assert!(sb.stop().success());
}

/// Issue 12, item 3 for an expired review: nobody refused the writes, so the
/// same writes under a new id may well succeed.
#[test]
fn an_expired_review_may_be_asked_again() {
    let mut sb = Sandbox::new();
    sb.env.push(("AIRLOCK_REVIEW__TTL_SECS".into(), "1".into()));
    sb.start();
    sb.submit_json(&delete_customer("del-late", "run-e", 1));
    let expired = sb.outcome_in("del-late", "expired");
    assert_eq!(
        expired["retry"],
        json!({
            "new_id": true,
            "may_help": true,
            "advice": expired["retry"]["advice"].clone(),
        })
    );
    let advice = expired["retry"]["advice"].as_str().unwrap();
    assert!(
        advice.contains("submit the same writes again under a new id"),
        "{advice}"
    );
    assert!(sb.stop().success());
}

/// Issue 12, item 8: `airlock run` on a target that has none of the tables an
/// intent names. The outcome says the table (as the agent wrote it, schema and
/// all) does not exist in that target, and that the id is spent.
#[test]
fn a_missing_table_fails_with_its_name_its_target_and_a_spent_id() {
    let mut sb = Sandbox::new();
    let empty = sb.dir.path().join("empty.db");
    sb.target_url = Some(format!("sqlite://{}", empty.display()));
    sb.start();
    sb.submit_json(&insert_customer("lost-1", "run-m", 1, "Ada"));
    sb.submit_json(&intent(
        "lost-2",
        "run-m",
        json!({"op": "insert", "table": "main.Orders", "values": {"id": 1}}),
    ));
    for (id, table) in [("lost-1", "customers"), ("lost-2", "main.Orders")] {
        let failed = sb.outcome_in(id, "failed");
        assert_eq!(failed["error"]["stage"], "resolve");
        assert_eq!(failed["error"]["code"], "AIRLOCK_UNKNOWN_TABLE");
        let says = format!("table {table} does not exist in target \"default\"");
        assert!(reasons(&failed).contains(&says), "{failed:#}");
        assert!(
            failed.get("decision").is_none(),
            "decided before policy: {failed:#}"
        );
        assert_eq!(failed["retry"]["new_id"], true);
        assert_eq!(failed["retry"]["may_help"], false);
        let advice = failed["retry"]["advice"].as_str().unwrap();
        assert!(advice.starts_with(&says), "{advice}");
        assert!(
            advice.contains(&format!("the id {id} is spent")),
            "{advice}"
        );
    }
    assert!(sb.stop().success());
}

/// Issue 12, item 4: the outcome carries the trace id of a valid traceparent, and
/// none for a traceparent W3C calls invalid (an all-zero trace id).
#[test]
fn the_outcome_carries_the_intents_trace_id() {
    let mut sb = Sandbox::new();
    sb.start();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut traced = insert_customer("traced", "run-t", 1, "Ada");
    traced["provenance"]["traceparent"] = json!(format!("00-{trace}-00f067aa0ba902b7-01"));
    sb.submit_json(&traced);
    let mut zero = insert_customer("zero-trace", "run-t", 2, "Grace");
    zero["provenance"]["traceparent"] = json!(format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)));
    sb.submit_json(&zero);
    assert_eq!(sb.outcome_in("traced", "applied")["trace_id"], trace);
    assert!(
        sb.outcome_in("zero-trace", "applied")
            .get("trace_id")
            .is_none()
    );
    assert!(sb.stop().success());
}

#[test]
fn schema_outcome_prints_the_published_outcome_schema() {
    let out = airlock().args(["schema", "--outcome"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, airlock_intent::OUTCOME_SCHEMA.as_bytes());
    let schema: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(schema["$id"], "https://airlock.dev/schemas/outcome/v1.json");
}
