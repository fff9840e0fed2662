//! The review API against its own OpenAPI document, property-based: Schemathesis
//! (PyPI, installed by `.ci/run`) reads `/v1/openapi.json` from a running Airlock and
//! sends it generated requests, valid and not, with and without credentials, and
//! checks every answer against the document (status codes, headers, bodies) and that
//! nothing answers 5xx. Generation is deterministic (a fixed seed), so a failure
//! repeats.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use std::process::Command;

use serde_json::json;
use support::{Sandbox, insert_customer, intent};

/// The Schemathesis `.ci/run` installs.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";

#[test]
fn schemathesis_finds_the_api_as_documented() {
    let mut sb = Sandbox::new();
    sb.start();
    // Data in several states for the generated requests to meet.
    sb.submit_json(&insert_customer("insert-1", "run-a", 1, "Ada"));
    sb.outcome_in("insert-1", "applied");
    let delete = intent(
        "delete-1",
        "run-a",
        json!({"op": "delete", "table": "customers", "key": {"id": 1}}),
    );
    sb.submit_json(&delete);
    sb.outcome_in("delete-1", "awaiting_review");
    let url = sb.review_url();
    let token = sb.token("fuzz", "admin");

    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis.toml");
    let out = Command::new("schemathesis")
        .args(["--config-file", config])
        .args(["run", &format!("{url}/v1/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--max-examples", "100", "--seed", "20261129"])
        .arg("--generation-deterministic")
        .args(["--request-timeout", "10", "--workers", "1", "--no-color"])
        // The event stream never ends by design; tests/review_http.rs covers it.
        .args(["--exclude-path", "/v1/events"])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .output();
    let out = match out {
        Ok(out) => out,
        Err(error) => panic!(
            "cannot run schemathesis ({error}); install it: \
             python3 -m pip install {SCHEMATHESIS} (see .ci/run)"
        ),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found answers that do not match openapi.json:\n{stdout}\n{}\nlog tail:\n{}",
        String::from_utf8_lossy(&out.stderr),
        {
            let log = sb.log();
            log[log.len().saturating_sub(3000)..].to_owned()
        }
    );
    assert!(stdout.contains("passed"), "{stdout}");
    // Airlock is still up and the run log still verifies.
    let health = support::http::Client::new(&url).get("/healthz");
    assert_eq!(health.status, 200);
    assert!(sb.stop().success());
    let verified = sb.cli(&[
        "verify",
        "--public-key",
        &sb.state().join("signing.key.pub").display().to_string(),
    ]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
}
