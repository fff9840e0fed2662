//! Cost of validating one intent, next to the cost of merely parsing its bytes.
//!
//! `serde_json_parse` parses the bytes into a `serde_json::Value` (the floor: any
//! reader of the file pays it); `validate_intent` runs the whole
//! `Validator::validate` (size and UTF-8 checks, strict parse refusing duplicate keys
//! and deep nesting, JSON Schema, limits, typed deserialisation). Their ratio is the
//! price of treating the intent as hostile input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use airlock_intent::{Limits, Validator};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// A typical intent: three ops (two inserts and an update) on two tables.
const INTENT: &[u8] = include_bytes!("../../intent-schema/examples/valid/multi-op.json");

fn validate(c: &mut Criterion) {
    let validator = Validator::new(Limits::default());
    let intent = validator
        .validate(INTENT)
        .expect("the benchmark intent is valid");
    assert_eq!(intent.ops.len(), 3);

    let mut group = c.benchmark_group("validate");
    group.throughput(Throughput::Bytes(INTENT.len() as u64));
    group.bench_function("serde_json_parse", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(INTENT)).unwrap())
    });
    group.bench_function("validate_intent", |b| {
        b.iter(|| validator.validate(black_box(INTENT)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, validate);
criterion_main!(benches);
