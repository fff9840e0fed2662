//! Review rules end to end, through the real `airlock` binary and its CLI: a quorum of
//! distinct approvers, one rejection rejects, and reviews that outlive their deadline
//! expire (they never pass) and stop holding their run back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use serde_json::{Value, json};
use support::{QUORUM_POLICY, Sandbox, insert_customer, intent};

fn delete(id: &str, run: &str, customer: i64) -> Value {
    intent(
        id,
        run,
        json!({"op": "delete", "table": "customers", "key": {"id": customer}}),
    )
}

fn with_customers(sb: &Sandbox) {
    rusqlite::Connection::open(sb.target())
        .unwrap()
        .execute_batch(
            "INSERT INTO customers (id, name) VALUES (1, 'Ada'), (2, 'Grace'), (3, 'Lin');",
        )
        .unwrap();
}

/// Runs an `airlock` subcommand; returns (success, stdout, stderr).
fn cli(sb: &Sandbox, args: &[&str]) -> (bool, String, String) {
    let out = sb.cli(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The records of `run`'s exported log, in order.
fn records(sb: &Sandbox, run: &str) -> Vec<Value> {
    let out = sb.dir.path().join(format!("{run}.jsonl"));
    let (ok, _, stderr) = cli(
        sb,
        &["export", "--run", run, "--out", out.to_str().unwrap()],
    );
    assert!(ok, "export: {stderr}");
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|line| line["type"] == "record")
        .collect()
}

fn ids(rows: Vec<Vec<Value>>) -> Vec<i64> {
    rows.iter().map(|row| row[0].as_i64().unwrap()).collect()
}

#[test]
fn a_quorum_needs_distinct_approvers_and_one_rejection_rejects() {
    let mut sb = Sandbox::new();
    with_customers(&sb);
    sb.use_policy("quorum.rego", QUORUM_POLICY);
    sb.start();

    sb.submit_json(&delete("q-1", "run-q", 1));
    let outcome = sb.outcome_in("q-1", "awaiting_review");
    assert_eq!(outcome["review"]["approvals_needed"], 2, "{outcome:#}");
    assert_eq!(outcome["review"]["approved_by"], json!([]), "{outcome:#}");

    // One of two: still waiting, and the agent sees who approved.
    let (ok, stdout, stderr) = cli(&sb, &["approve", "q-1", "--as", "alice"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("awaiting_review (1 of 2 approvals)"),
        "{stdout}"
    );
    let outcome = sb.outcome_where("q-1", |o| o["review"]["approved_by"] == json!(["alice"]));
    assert_eq!(outcome["state"], "awaiting_review", "{outcome:#}");
    assert_eq!(outcome["final"], false);

    // The same reviewer twice does not make a quorum.
    let (ok, _, stderr) = cli(&sb, &["approve", "q-1", "--as", "alice"]);
    assert!(!ok);
    assert!(stderr.contains("distinct reviewers"), "{stderr}");

    // A second approver does: approved, then applied.
    let (ok, stdout, stderr) = cli(&sb, &["approve", "q-1", "--as", "bob"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("approved (2 of 2 approvals)"), "{stdout}");
    let outcome = sb.outcome_in("q-1", "applied");
    assert_eq!(
        outcome["review"]["approved_by"],
        json!(["alice", "bob"]),
        "{outcome:#}"
    );
    assert_eq!(
        ids(sb.rows("SELECT id FROM customers ORDER BY id")),
        vec![2, 3]
    );
    let log = records(&sb, "run-q");
    let votes: Vec<(&str, &str)> = log
        .iter()
        .filter(|r| matches!(r["event"].as_str(), Some("approval" | "approved")))
        .map(|r| {
            (
                r["event"].as_str().unwrap(),
                r["data"]["by"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(votes, vec![("approval", "alice"), ("approved", "bob")]);
    let events: Vec<&str> = log.iter().filter_map(|r| r["event"].as_str()).collect();
    assert_eq!(
        events,
        ["received", "decided", "approval", "approved", "applied"]
    );

    // One approval, then one rejection: rejected, and the agent is told why.
    sb.submit_json(&delete("q-2", "run-r", 2));
    sb.outcome_in("q-2", "awaiting_review");
    let (ok, _, stderr) = cli(&sb, &["approve", "q-2", "--as", "alice"]);
    assert!(ok, "{stderr}");
    let (ok, stdout, stderr) = cli(
        &sb,
        &[
            "reject",
            "q-2",
            "--as",
            "bob",
            "--reason",
            "customer 2 is still active",
        ],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("rejected"), "{stdout}");
    let outcome = sb.outcome_in("q-2", "rejected");
    assert_eq!(outcome["final"], true, "{outcome:#}");
    assert_eq!(outcome["review"]["rejected_by"], "bob", "{outcome:#}");
    assert!(
        outcome["reasons"]
            .as_array()
            .unwrap()
            .contains(&json!("rejected by bob: customer 2 is still active")),
        "{outcome:#}"
    );
    // Nothing more can be decided, and nothing was written.
    let (ok, _, stderr) = cli(&sb, &["approve", "q-2", "--as", "carol"]);
    assert!(!ok);
    assert!(stderr.contains("not awaiting review"), "{stderr}");
    assert_eq!(
        ids(sb.rows("SELECT id FROM customers ORDER BY id")),
        vec![2, 3]
    );
    assert!(sb.stop().success());
}

#[test]
fn a_review_past_its_deadline_expires_and_releases_its_run() {
    let mut sb = Sandbox::new();
    with_customers(&sb);
    sb.env.push(("AIRLOCK_REVIEW__TTL_SECS".into(), "1".into()));
    sb.start();

    sb.submit_json(&delete("e-1", "run-e", 1));
    // Queued (in whatever state by now) before the next intent of its run arrives.
    sb.outcome_where("e-1", |o| o["state"] != "queued");
    sb.submit_json(&insert_customer("e-2", "run-e", 10, "Kay"));

    let outcome = sb.outcome_in("e-1", "expired");
    assert_eq!(outcome["final"], true, "{outcome:#}");
    let deadline = outcome["review"]["expires_at"].as_str().unwrap();
    let said = outcome["reasons"].to_string();
    assert!(
        said.contains(&format!("the review expired at {deadline}")),
        "{outcome:#}"
    );
    assert!(said.contains("0 of 1"), "{outcome:#}");

    // The later intent of the run applies once the review has expired, not before.
    sb.outcome_in("e-2", "applied");
    assert_eq!(
        ids(sb.rows("SELECT id FROM customers ORDER BY id")),
        vec![1, 2, 3, 10],
        "the expired delete wrote nothing"
    );
    let log = records(&sb, "run-e");
    let events: Vec<(&str, &str)> = log
        .iter()
        .map(|r| (r["intent"].as_str().unwrap(), r["event"].as_str().unwrap()))
        .collect();
    let at = |wanted: (&str, &str)| {
        events
            .iter()
            .position(|e| *e == wanted)
            .unwrap_or_else(|| panic!("{wanted:?} not in {events:?}"))
    };
    assert!(at(("e-1", "decided")) < at(("e-1", "expired")));
    assert!(
        at(("e-1", "expired")) < at(("e-2", "applied")),
        "{events:?}"
    );
    let decided = &log[at(("e-1", "decided"))];
    assert_eq!(decided["data"]["state"], "awaiting_review", "{decided:#}");

    // Too late to approve, with a message that says why.
    let (ok, _, stderr) = cli(&sb, &["approve", "e-1", "--as", "alice"]);
    assert!(!ok);
    assert!(
        stderr.contains("intent e-1 is expired, not awaiting review"),
        "{stderr}"
    );
    assert!(sb.stop().success());
}
