//! Previews end to end: the real `airlock` binary with `[policy] preview = true` and a
//! policy that reads `input.preview` — an update of a "gold" customer goes to review,
//! other updates apply, and an intent that would fail is denied before it is tried.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use serde_json::json;
use support::{Sandbox, intent};

const POLICY: &str = r#"package airlock.authz

default allow := false

default review := false

approvals := 1

gold_reasons contains msg if {
	some op in input.preview.ops
	some row in op.before
	row.tier == "gold"
	msg := sprintf("op %d changes gold customer %v", [op.index, row.id])
}

failure_reasons contains msg if {
	msg := sprintf("the intent would fail: %s", [input.preview.error.message])
}

review if count(gold_reasons) > 0

allow if {
	count(gold_reasons) == 0
	count(failure_reasons) == 0
}

reasons := gold_reasons if review

reasons := failure_reasons if count(failure_reasons) > 0
"#;

fn set_tier(id: &str, run: &str, customer: i64, tier: &str) -> serde_json::Value {
    intent(
        id,
        run,
        json!({"op": "update", "table": "customers", "key": {"id": customer},
               "set": {"tier": tier}}),
    )
}

#[test]
fn a_policy_reading_the_preview_reviews_gold_customers_and_denies_failures() {
    let mut sb = Sandbox::new();
    rusqlite::Connection::open(sb.target())
        .unwrap()
        .execute_batch(
            "INSERT INTO customers (id, name, tier) VALUES (1, 'Ada', 'gold'), \
             (2, 'Grace', 'standard');",
        )
        .unwrap();
    sb.use_policy("preview.rego", POLICY);
    sb.env = vec![("AIRLOCK_POLICY__PREVIEW".into(), "true".into())];
    sb.start();

    sb.submit_json(&set_tier("gold-1", "run-a", 1, "platinum"));
    sb.submit_json(&set_tier("plain-1", "run-b", 2, "silver"));
    sb.submit_json(&set_tier("missing-1", "run-c", 99, "silver"));

    let gold = sb.outcome_in("gold-1", "awaiting_review");
    assert_eq!(gold["decision"]["verdict"], "review", "{gold:#}");
    assert!(
        gold["reasons"]
            .as_array()
            .unwrap()
            .contains(&json!("op 0 changes gold customer 1")),
        "{gold:#}"
    );
    let plain = sb.outcome_in("plain-1", "applied");
    assert_eq!(plain["decision"]["verdict"], "allow", "{plain:#}");
    let missing = sb.outcome_in("missing-1", "denied");
    let reasons = missing["reasons"].to_string();
    assert!(reasons.contains("the intent would fail"), "{missing:#}");
    assert!(reasons.contains("matched no row"), "{missing:#}");

    // The previews wrote nothing: only the allowed update is in the target.
    assert_eq!(
        sb.rows("SELECT id, tier FROM customers ORDER BY id"),
        vec![
            vec![json!(1), json!("gold")],
            vec![json!(2), json!("silver")]
        ]
    );
    assert_eq!(
        sb.rows("SELECT intent_id FROM airlock_ledger"),
        vec![vec![json!("plain-1")]]
    );
    assert!(sb.stop().success());
}

#[test]
fn the_policy_sees_which_key_sealed_the_intent() {
    let mut sb = Sandbox::new();
    sb.use_policy(
        "keyid.rego",
        "package airlock.authz\n\nallow := true\n\nreasons := [sprintf(\"sealed by %v\", [input.envelope.keyid])]\n",
    );
    sb.start();
    sb.submit_json(&set_tier("k-1", "run-k", 1, "gold"));
    let outcome = sb.outcome_where("k-1", |o| o["decision"].is_object());
    // The key that sealed it, as its `received` record names it.
    let export = sb.cli(&["export", "--run", "run-k", "--out", "-"]);
    let received = String::from_utf8(export.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|r| r["event"] == "received")
        .expect("a received record");
    let keyid = received["data"]["keyid"].as_str().unwrap().to_owned();
    assert!(keyid.starts_with("sha256:"), "{keyid}");
    assert_eq!(
        outcome["decision"]["reasons"],
        json!([format!("sealed by {keyid}")]),
        "{outcome:#}"
    );
}
