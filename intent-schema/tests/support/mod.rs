//! Helpers shared by the integration tests: loading the example intents.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// `intent-schema/examples/<kind>`.
pub fn examples_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(kind)
}

/// Every `*.json` file of `examples/<kind>` except `expected.json`, as (file name,
/// bytes), sorted by name.
pub fn examples(kind: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(examples_dir(kind))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .filter(|path| path.file_name().is_some_and(|n| n != "expected.json"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// The valid examples, parsed.
pub fn valid_documents() -> Vec<(String, serde_json::Value)> {
    examples("valid")
        .into_iter()
        .map(|(name, bytes)| (name, serde_json::from_slice(&bytes).unwrap()))
        .collect()
}

/// A small valid intent to mutate in tests.
pub fn base_intent() -> serde_json::Value {
    serde_json::json!({
        "version": 1,
        "id": "base",
        "run": "example-run",
        "ops": [
            { "op": "insert", "table": "customers", "values": { "name": "Ada" } }
        ],
        "reason": "A test.",
        "provenance": { "agent": "test-agent" }
    })
}
