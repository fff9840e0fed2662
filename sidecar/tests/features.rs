//! The SQLite-only, no-HTTP airlock (`--no-default-features`), as an operator meets
//! it: a `postgres://` target or a review listener is refused at start with a message
//! naming the missing feature (and never the URL's credentials), `airlock token`
//! says why it cannot help, and with nothing configured the daemon starts with the
//! review endpoint off and applies intents.
//!
//! Every test here runs the real binary of a build that lacks a feature, so in the
//! default build this file holds none: run it with
//! `cargo test -p airlock --no-default-features --test features`.

#![cfg(not(all(feature = "postgres", feature = "review")))]
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use std::process::{Output, Stdio};

use support::Sandbox;

/// Exit status of a configuration airlock cannot use.
const EXIT_CONFIG: i32 = 64;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[cfg(not(feature = "postgres"))]
#[test]
fn a_postgres_target_is_refused_naming_the_feature() {
    let mut sb = Sandbox::new();
    sb.target_url = Some("postgres://airlock:secret@127.0.0.1:1/shop".to_owned());
    for check in [false, true] {
        let mut command = sb.run_command();
        // Whatever this build makes of the review endpoint, it is not the point here.
        command.env("AIRLOCK_REVIEW__LISTEN", "off");
        if check {
            command.arg("--check");
        }
        let out = command.stdin(Stdio::null()).output().unwrap();
        let text = stderr(&out);
        assert_eq!(
            out.status.code(),
            Some(EXIT_CONFIG),
            "--check {check}: {text}"
        );
        assert!(
            text.contains("built without the `postgres` feature"),
            "{text}"
        );
        assert!(text.contains("sqlite://"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }
}

#[cfg(not(feature = "review"))]
#[test]
fn a_review_listener_is_refused_naming_the_feature() {
    let sb = Sandbox::new();
    // run_command asks for a listener on a free port, as the other tests do;
    // `--check` loads the configuration as `run` does, and exits either way.
    let out = sb
        .run_command()
        .arg("--check")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{text}");
    assert!(text.contains("review.listen"), "{text}");
    assert!(text.contains("`review` feature"), "{text}");
    assert!(!sb.state().join("review-endpoint").exists());
}

#[cfg(not(feature = "review"))]
#[test]
fn token_add_says_the_build_has_no_review_endpoint() {
    let sb = Sandbox::new();
    let out = sb.cli(&["token", "add", "--name", "alice", "--role", "approver"]);
    let text = stderr(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("`review` feature"), "{text}");
    assert!(!sb.state().join("review-tokens.toml").exists());
}

#[cfg(not(feature = "review"))]
#[test]
fn with_nothing_configured_the_endpoint_is_off_and_intents_apply() {
    let mut sb = Sandbox::new();
    let log = std::fs::File::create(sb.dir.path().join("airlock.log")).unwrap();
    let mut command = sb.run_command();
    command
        .env_remove("AIRLOCK_REVIEW__LISTEN")
        .env("AIRLOCK_LOG", "info")
        .env("AIRLOCK_INTAKE__RESCAN_MS", "500")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    sb.child = Some(command.spawn().unwrap());
    sb.submit_json(&support::insert_customer("c-1", "run-a", 1, "Ada"));
    let outcome = sb.outcome_in("c-1", "applied");
    assert_eq!(outcome["final"], true);
    assert_eq!(sb.rows("SELECT id, name FROM customers").len(), 1);
    let mut child = sb.child.take().unwrap();
    support::signal(&child, "TERM");
    let status = support::eventually("airlock to exit after SIGTERM", || {
        child.try_wait().ok().flatten()
    });
    assert!(status.success(), "{}", sb.log());
    let log = sb.log();
    assert!(log.contains("airlock running"), "{log}");
    assert!(!sb.state().join("review-endpoint").exists(), "{log}");
}
