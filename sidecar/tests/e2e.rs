//! End to end: the real `airlock` binary on a temporary directory, with the default
//! policy and a SQLite target. Each test submits intent files as an agent would and
//! checks the outcome files the agent reads and the rows in the target.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use serde_json::json;
use support::{Sandbox, insert_customer, intent};

#[test]
fn valid_intent_is_applied_once() {
    let mut sb = Sandbox::new();
    sb.start();
    sb.submit_json(&insert_customer("c-1", "run-a", 1, "Ada"));
    let outcome = sb.outcome_in("c-1", "applied");
    assert_eq!(outcome["final"], true);
    assert_eq!(outcome["run"], "run-a");
    assert_eq!(outcome["decision"]["verdict"], "allow");
    assert!(outcome["digest"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(
        sb.rows("SELECT id, name FROM customers"),
        vec![vec![json!(1), json!("Ada")]]
    );
    assert_eq!(
        sb.rows("SELECT intent_id, run FROM airlock_ledger"),
        vec![vec![json!("c-1"), json!("run-a")]]
    );
    // The intent file is gone from the agent's directory; only results remain.
    let left: Vec<_> = std::fs::read_dir(sb.intents())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, vec!["results".to_owned()]);
    assert!(sb.stop().success());
}

#[test]
fn invalid_files_get_outcomes_naming_the_problem() {
    let mut sb = Sandbox::new();
    sb.start();
    // Not JSON at all: the outcome is named after the file.
    sb.submit("garbage.json", b"{ this is not json");
    // Valid JSON, schema violations: outcome under the id, with pointers.
    let mut bad_table = insert_customer("bad-table", "run-a", 1, "x");
    bad_table["ops"][0]["table"] = json!("customers; DROP TABLE customers");
    sb.submit_json(&bad_table);
    let mut no_reason = insert_customer("no-reason", "run-a", 2, "y");
    no_reason.as_object_mut().unwrap().remove("reason");
    sb.submit_json(&no_reason);
    let unknown_target = {
        let mut i = insert_customer("elsewhere", "run-a", 3, "z");
        i["target"] = json!("warehouse");
        i
    };
    sb.submit_json(&unknown_target);
    // A symbolic link is refused, and what it points to is left alone.
    let outside = sb.dir.path().join("outside.json");
    std::fs::write(
        &outside,
        serde_json::to_vec(&insert_customer("linked", "run-a", 4, "l")).unwrap(),
    )
    .unwrap();
    std::os::unix::fs::symlink(&outside, sb.intents().join("linked.json")).unwrap();

    let garbage = sb.outcome_in("garbage", "invalid");
    assert_eq!(garbage["final"], true);
    assert_eq!(garbage["file"], "garbage.json");
    assert!(garbage["id"].is_null());
    assert!(!garbage["problems"].as_array().unwrap().is_empty());

    let table = sb.outcome_in("bad-table", "invalid");
    let pointers: Vec<&str> = table["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pointer"].as_str().unwrap())
        .collect();
    assert!(pointers.contains(&"/ops/0/table"), "{table:#}");

    let reason = sb.outcome_in("no-reason", "invalid");
    let text = reason["problems"].to_string();
    assert!(text.contains("reason"), "{reason:#}");

    let target = sb.outcome_in("elsewhere", "invalid");
    assert_eq!(target["problems"][0]["pointer"], "/target");
    assert!(
        target["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("warehouse")
    );

    let linked = sb.outcome_in("linked", "invalid");
    assert!(
        linked["reasons"].to_string().contains("symbolic link"),
        "{linked:#}"
    );
    assert!(outside.exists());

    assert!(sb.rows("SELECT * FROM customers").is_empty());
    assert!(sb.stop().success());
}

#[test]
fn duplicates_are_no_ops_and_conflicts_are_refused() {
    let mut sb = Sandbox::new();
    sb.start();
    let original = insert_customer("dup-1", "run-a", 1, "Ada");
    sb.submit_json(&original);
    sb.outcome_in("dup-1", "applied");
    // The same bytes again, under another file name: nothing changes.
    sb.submit("again.json", &serde_json::to_vec_pretty(&original).unwrap());
    eventually_gone(&sb, "again.json");
    // The same id with other content: refused as a conflict, with an outcome of its
    // own beside the original's (`<id>.conflict-<digest16>.json`).
    let conflicting = insert_customer("dup-1", "run-a", 2, "Mallory");
    let bytes = serde_json::to_vec(&conflicting).unwrap();
    sb.submit("conflict.json", &bytes);
    let digest = airlock::seal::digest(&bytes);
    let outcome = sb.outcome_in(&format!("dup-1.conflict-{}", &digest[7..23]), "invalid");
    assert_eq!(outcome["problems"][0]["pointer"], "/id");
    assert!(
        outcome["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("already names a different intent")
    );
    assert_eq!(
        sb.rows("SELECT id, name FROM customers"),
        vec![vec![json!(1), json!("Ada")]]
    );
    assert_eq!(
        sb.rows("SELECT COUNT(*) FROM airlock_ledger"),
        vec![vec![json!(1)]]
    );
    // The original is still applied, in the queue and in its outcome.
    assert_eq!(
        sb.outcome_in("dup-1", "applied")["digest"],
        outcome_digest(&original)
    );
    let status = sb.cli(&["status", "--json"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("\"state\":\"applied\""), "{text}");
    assert!(sb.stop().success());
}

fn outcome_digest(intent: &serde_json::Value) -> String {
    airlock::seal::digest(&serde_json::to_vec_pretty(intent).unwrap())
}

fn eventually_gone(sb: &Sandbox, name: &str) {
    let path = sb.intents().join(name);
    support::eventually(&format!("{name} to be taken"), || {
        (!support::path_exists(&path)).then_some(())
    });
}

#[test]
fn denied_intent_never_writes() {
    let mut sb = Sandbox::new();
    sb.start();
    sb.submit_json(&intent(
        "erase-1",
        "run-a",
        json!({"op": "delete", "table": "audit_log", "key": {"id": 1}}),
    ));
    let outcome = sb.outcome_in("erase-1", "denied");
    assert_eq!(outcome["final"], true);
    assert!(
        outcome["reasons"].to_string().contains("audit_log"),
        "{outcome:#}"
    );
    assert_eq!(
        sb.rows("SELECT COUNT(*) FROM audit_log"),
        vec![vec![json!(1)]]
    );
    assert!(sb.stop().success());
}

#[test]
fn reviewed_then_approved_applies_and_holds_back_its_run() {
    let mut sb = Sandbox::new();
    sb.start();
    sb.submit_json(&insert_customer("c-1", "run-r", 1, "Ada"));
    sb.outcome_in("c-1", "applied");
    sb.submit_json(&intent(
        "del-1",
        "run-r",
        json!({"op": "delete", "table": "customers", "key": {"id": 1}}),
    ));
    let waiting = sb.outcome_in("del-1", "awaiting_review");
    assert_eq!(waiting["final"], false);
    assert_eq!(waiting["review"]["approvals_needed"], 1);
    // A later intent of the same run waits behind the review...
    sb.submit_json(&insert_customer("c-2", "run-r", 2, "Grace"));
    let held = sb.outcome_in("c-2", "approved");
    assert_eq!(held["final"], false);
    // ...while another run goes ahead.
    sb.submit_json(&insert_customer("c-3", "run-other", 3, "Edsger"));
    sb.outcome_in("c-3", "applied");
    assert_eq!(
        sb.rows("SELECT id FROM customers ORDER BY id"),
        vec![vec![json!(1)], vec![json!(3)]]
    );

    // An approval naming other bytes is refused.
    let wrong = sb.cli(&["approve", "del-1", "--as", "alice", "--digest", "sha256:00"]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("digest"));

    let digest = waiting["digest"].as_str().unwrap();
    let ok = sb.cli(&["approve", "del-1", "--as", "alice", "--digest", digest]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let applied = sb.outcome_in("del-1", "applied");
    assert_eq!(applied["review"]["approved_by"], json!(["alice"]));
    sb.outcome_in("c-2", "applied");
    assert_eq!(
        sb.rows("SELECT id FROM customers ORDER BY id"),
        vec![vec![json!(2)], vec![json!(3)]]
    );
    assert!(sb.stop().success());
}

#[test]
fn reviewed_then_rejected_never_writes() {
    let mut sb = Sandbox::new();
    sb.start();
    sb.submit_json(&insert_customer("c-1", "run-x", 1, "Ada"));
    sb.outcome_in("c-1", "applied");
    sb.submit_json(&intent(
        "del-1",
        "run-x",
        json!({"op": "delete", "table": "customers", "key": {"id": 1}}),
    ));
    sb.outcome_in("del-1", "awaiting_review");
    let no_reason = sb.cli(&["reject", "del-1", "--as", "bob", "--reason", " "]);
    assert!(!no_reason.status.success());
    let ok = sb.cli(&[
        "reject",
        "del-1",
        "--as",
        "bob",
        "--reason",
        "customers are never deleted",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let outcome = sb.outcome_in("del-1", "rejected");
    assert_eq!(outcome["final"], true);
    assert!(
        outcome["reasons"]
            .to_string()
            .contains("customers are never deleted")
    );
    assert_eq!(outcome["review"]["rejected_by"], "bob");
    assert_eq!(
        sb.rows("SELECT COUNT(*) FROM customers"),
        vec![vec![json!(1)]]
    );
    // A decided intent cannot be decided again.
    let again = sb.cli(&["approve", "del-1", "--as", "carol"]);
    assert!(!again.status.success());
    assert!(sb.stop().success());
}

#[test]
fn failed_apply_reports_the_database_error() {
    let mut sb = Sandbox::new();
    sb.start();
    // customer_id is NOT NULL: the insert fails in the target, permanently.
    sb.submit_json(&intent(
        "bad-order",
        "run-f",
        json!({"op": "insert", "table": "orders", "values": {"id": 1, "total_cents": 5, "status": "placed"}}),
    ));
    let outcome = sb.outcome_in("bad-order", "failed");
    assert_eq!(outcome["final"], true);
    assert_eq!(outcome["error"]["stage"], "apply");
    assert!(
        outcome["error"]["message"]
            .as_str()
            .unwrap()
            .contains("customer_id"),
        "{outcome:#}"
    );
    assert!(sb.rows("SELECT * FROM orders").is_empty());
    assert!(sb.stop().success());
}

#[test]
fn files_present_before_start_are_taken_and_restart_keeps_state() {
    let mut sb = Sandbox::new();
    sb.submit_json(&insert_customer("early", "run-s", 1, "Ada"));
    sb.start();
    sb.outcome_in("early", "applied");
    sb.submit_json(&intent(
        "del-early",
        "run-s",
        json!({"op": "delete", "table": "customers", "key": {"id": 1}}),
    ));
    sb.outcome_in("del-early", "awaiting_review");
    assert!(sb.stop().success());
    // Approve while Airlock is down; it applies after the restart.
    let ok = sb.cli(&["approve", "del-early", "--as", "alice"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    sb.start();
    sb.outcome_in("del-early", "applied");
    assert!(sb.rows("SELECT * FROM customers").is_empty());
    assert!(sb.stop().success());
}
