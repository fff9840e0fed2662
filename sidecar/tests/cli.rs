//! The command line as a newcomer meets it: `schema`, `demo`, `submit`, bad config.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use support::airlock;

#[test]
fn schema_prints_the_published_schema() {
    let out = airlock().arg("schema").output().unwrap();
    assert!(out.status.success());
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_eq!(out.stdout, airlock_intent::SCHEMA.as_bytes());
}

#[test]
fn demo_shows_every_kind_of_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let out = airlock()
        .args(["demo", "--dir"])
        .arg(dir.path().join("demo"))
        .env("AIRLOCK_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for state in ["applied", "awaiting_review", "denied", "invalid"] {
        assert!(
            stdout.contains(state),
            "demo output lacks {state}:\n{stdout}"
        );
    }
    // The cancelled order was approved and applied; Ada is gold.
    assert!(stdout.contains("✔ cancel-order-100"), "{stdout}");
    assert!(
        stdout.contains("1 | Ada Lovelace | ada@example.com | gold"),
        "{stdout}"
    );
}

#[test]
fn bad_configuration_exits_64_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("airlock.toml");
    std::fs::write(&config, "intents = \"x\"\n[limits]\nmax_opz = 3\n").unwrap();
    let out = airlock()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_opz"), "{stderr}");
}

#[test]
fn unsupported_target_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let out = airlock()
        .current_dir(dir.path())
        .args(["run", "--target", "mysql://localhost/db"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mysql"), "{stderr}");
}

#[test]
fn submit_writes_atomically_under_the_id() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("draft.json");
    std::fs::write(&source, br#"{"id":"order-7","version":1}"#).unwrap();
    let out = airlock()
        .arg("submit")
        .arg(&source)
        .arg("--intents")
        .arg(dir.path().join("intents"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let written = dir.path().join("intents/order-7.json");
    assert_eq!(
        std::fs::read(&written).unwrap(),
        std::fs::read(&source).unwrap()
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("intents"))
            .unwrap()
            .count(),
        1
    );
}

#[test]
fn logs_to_a_file_are_plain_text_with_plain_values() {
    // The daemon's standard error is the sandbox's log file, not a terminal: no
    // colour codes, whatever `NO_COLOR` says.
    let mut sb = support::Sandbox::new();
    sb.start();
    sb.submit_json(&support::insert_customer("plain-1", "r1", 1, "Ada"));
    sb.outcome_in("plain-1", "applied");
    // A table the target lacks: logged with its code.
    sb.submit_json(&support::intent(
        "plain-2",
        "r2",
        serde_json::json!({"op": "insert", "table": "nowhere", "values": {"id": 1}}),
    ));
    sb.outcome_in("plain-2", "failed");
    // A delete goes to review: logged with the policy's reasons.
    sb.submit_json(&support::intent(
        "plain-3",
        "r3",
        serde_json::json!({"op": "delete", "table": "customers", "key": {"id": 1}}),
    ));
    sb.outcome_in("plain-3", "awaiting_review");
    assert!(sb.stop().success());
    let log = sb.log();
    assert!(log.contains("intent queued"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{log}"
    );
    // Fields print as values: never Rust's debug form of an Option or a list.
    assert!(log.contains("code=AIRLOCK_UNKNOWN_TABLE"), "{log}");
    assert!(
        log.contains("reasons=deletes from customers need human review"),
        "{log}"
    );
    assert!(log.contains("targets=default"), "{log}");
    for debug in ["Some(", "None", "[\""] {
        assert!(!log.contains(debug), "{debug} in the log:\n{log}");
    }
}

/// How many times `needle` occurs in `haystack`.
fn occurrences(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn keygen_names_the_file_it_could_not_write_and_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no/such/dir/k");
    let run = airlock()
        .arg("keygen")
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    // The public key is written first: that is the file that failed.
    let public = format!("{}.pub", out.display());
    assert!(stderr.contains(&public), "{stderr}");
    assert_eq!(
        occurrences(&stderr, "No such file or directory"),
        1,
        "{stderr}"
    );
}

#[test]
fn an_error_chain_shows_each_cause_once() {
    // A state "directory" that is a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state");
    std::fs::write(&file, b"").unwrap();
    let out = airlock()
        .current_dir(dir.path())
        .args(["run", "--state"])
        .arg(&file)
        .env("AIRLOCK_REVIEW__LISTEN", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(occurrences(&stderr, "is not a directory"), 1, "{stderr}");

    // A queue database that is not one: the SQLite error, once.
    let state = dir.path().join("real-state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::write(state.join("queue.db"), vec![b'x'; 4096]).unwrap();
    let out = airlock()
        .args(["status", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("queue.db"), "{stderr}");
    assert_eq!(occurrences(&stderr, "not a database"), 1, "{stderr}");
}
