//! The policy decision stage: building the input document, and evaluating the
//! default embedded Rego policy on it. Read `evaluate / build_input` from one run to
//! see what the policy costs relative to preparing its input.
#![allow(clippy::expect_used)] // Fixtures: a failure here means the bench itself is broken.

use std::collections::BTreeMap;
use std::hint::black_box;

use airlock::decide::{EmbeddedPolicy, InputContext, PolicySource, Verdict, build_input};
use airlock_intent::Intent;
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

/// A typical intent: three inserts of a few columns each.
fn typical_intent() -> Intent {
    let ops: Vec<_> = (0..3)
        .map(|i| {
            json!({"op": "insert", "table": "crm.customers", "values": {
                "id": 1000 + i, "name": format!("customer {i}"),
                "email": format!("c{i}@example.com"), "tier": 2
            }})
        })
        .collect();
    serde_json::from_value(json!({
        "version": 1,
        "id": "intent-0001",
        "run": "run-42",
        "target": "default",
        "ops": ops,
        "reason": "import new customers from the signup form",
        "provenance": {"agent": "crm-agent", "model": "model-x",
                       "tool_call_id": "call_123",
                       "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    }))
    .expect("the bench intent is valid")
}

fn policy(c: &mut Criterion) {
    let intent = typical_intent();
    let counts = BTreeMap::from([("applied".to_owned(), 12), ("queued".to_owned(), 1)]);
    let digest = format!("sha256:{}", "ab".repeat(32));
    let ctx = InputContext {
        intent: &intent,
        run_counts: &counts,
        digest: &digest,
        keyid: Some("airlock-key-1"),
        file: "intent-0001.json",
        target: "default",
        preview: None,
        names: None,
    };
    let policy = EmbeddedPolicy::load(PolicySource::Default).expect("the default policy loads");
    let input = build_input(&ctx);
    let decision = policy.evaluate(&input).expect("the default policy decides");
    assert_eq!(decision.verdict, Verdict::Allow);

    let mut group = c.benchmark_group("policy");
    group.bench_function("build_input", |b| b.iter(|| build_input(black_box(&ctx))));
    group.bench_function("evaluate", |b| {
        b.iter(|| policy.evaluate(black_box(&input)))
    });
    group.finish();
}

criterion_group!(benches, policy);
criterion_main!(benches);
