//! The auditor's view through the real binary: keys, export, verify, and tampering
//! with an export on disk.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use serde_json::json;
use support::{Sandbox, airlock, insert_customer, intent};

fn verify(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = airlock().arg("verify").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn export_verifies_and_tampering_is_caught() {
    let mut sb = Sandbox::new();
    sb.start();
    sb.submit_json(&insert_customer("a-1", "audit-run", 1, "Ada"));
    sb.outcome_in("a-1", "applied");
    sb.submit_json(&intent(
        "a-2",
        "audit-run",
        json!({"op": "delete", "table": "customers", "key": {"id": 1}}),
    ));
    sb.outcome_in("a-2", "awaiting_review");
    assert!(
        sb.cli(&["approve", "a-2", "--as", "alice"])
            .status
            .success()
    );
    sb.outcome_in("a-2", "applied");
    sb.submit("junk.json", b"[1, 2");
    sb.outcome_in("junk", "invalid");
    assert!(sb.stop().success());

    let public = sb.state().join("signing.key.pub");
    // After a clean stop every run is sealed: the live log verifies without warnings.
    let (ok, stdout, stderr) = verify(&[
        "--public-key".as_ref(),
        public.as_os_str(),
        "--state".as_ref(),
        sb.state().as_os_str(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("audit-run: OK"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");

    let export = sb.dir.path().join("audit-run.jsonl");
    let out = sb.cli(&[
        "export",
        "--run",
        "audit-run",
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, stdout, _) = verify(&[
        "--public-key".as_ref(),
        public.as_os_str(),
        export.as_os_str(),
    ]);
    assert!(ok, "{stdout}");
    assert!(stdout.contains("audit-run: OK"), "{stdout}");

    // The head published by `airlock runs --json` is accepted as an expected head.
    let runs = sb.cli(&["runs", "--json"]);
    let run = String::from_utf8_lossy(&runs.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["run"] == "audit-run")
        .unwrap();
    let head = format!(
        "audit-run:{}:{}",
        run["records"],
        run["head"].as_str().unwrap()
    );
    let (ok, stdout, _) = verify(&[
        "--public-key".as_ref(),
        public.as_os_str(),
        export.as_os_str(),
        "--expect-head".as_ref(),
        head.as_ref(),
    ]);
    assert!(ok, "{stdout}");

    // One byte changed inside a record: caught, and the report names a line.
    let text = std::fs::read_to_string(&export).unwrap();
    let tampered = text.replacen("\"by\":\"alice\"", "\"by\":\"mallo\"", 1);
    assert_ne!(tampered, text);
    let bad = sb.dir.path().join("tampered.jsonl");
    std::fs::write(&bad, tampered).unwrap();
    let (ok, stdout, _) = verify(&["--public-key".as_ref(), public.as_os_str(), bad.as_os_str()]);
    assert!(!ok);
    assert!(stdout.contains("audit-run: FAILED at line"), "{stdout}");

    // A key that is not the sidecar's verifies nothing.
    let other = sb.dir.path().join("other.key");
    assert!(
        airlock()
            .arg("keygen")
            .arg("--out")
            .arg(&other)
            .status()
            .unwrap()
            .success()
    );
    let other_pub = sb.dir.path().join("other.key.pub");
    let (ok, stdout, _) = verify(&[
        "--public-key".as_ref(),
        other_pub.as_os_str(),
        export.as_os_str(),
    ]);
    assert!(!ok, "{stdout}");
}

#[test]
fn configured_key_must_exist_and_be_private() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("airlock.key");
    let run = |key: &std::path::Path| {
        airlock()
            .current_dir(dir.path())
            .arg("run")
            .env("AIRLOCK_KEY", key)
            .env("AIRLOCK_REVIEW__LISTEN", "127.0.0.1:0")
            .output()
            .unwrap()
    };
    let missing = run(&key);
    assert_eq!(missing.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("airlock keygen --out"), "{stderr}");

    assert!(
        airlock()
            .arg("keygen")
            .arg("--out")
            .arg(&key)
            .status()
            .unwrap()
            .success()
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let exposed = run(&key);
    assert_eq!(exposed.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&exposed.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
    // keygen never overwrites a key.
    let again = airlock()
        .arg("keygen")
        .arg("--out")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!again.status.success());
}

/// A run log written by the release before the typed run log (`log`), checked in:
/// see `tests/fixtures/log-v1/generate.sh`. It holds every record event.
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/log-v1");

#[test]
fn an_export_written_by_an_earlier_release_still_verifies() {
    let dir = std::path::Path::new(FIXTURE);
    let export = std::fs::read_to_string(dir.join("export.jsonl")).unwrap();
    for event in [
        "received",
        "invalid",
        "decided",
        "approval",
        "approved",
        "rejected",
        "expired",
        "applied",
        "failed",
        "rows_changed",
        "undone",
    ] {
        assert!(
            export.contains(&format!("\"event\":\"{event}\"")),
            "the fixture has no {event} record"
        );
    }
    let (ok, stdout, stderr) = verify(&[
        "--public-key".as_ref(),
        dir.join("signing.key.pub").as_os_str(),
        dir.join("export.jsonl").as_os_str(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(stdout.matches(": OK,").count(), 5, "{stdout}");
}

#[test]
fn a_queue_written_by_an_earlier_release_still_loads_verifies_and_exports() {
    let dir = std::path::Path::new(FIXTURE);
    let state = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("queue.db"), state.path().join("queue.db")).unwrap();
    let (ok, stdout, stderr) = verify(&[
        "--public-key".as_ref(),
        dir.join("signing.key.pub").as_os_str(),
        "--state".as_ref(),
        state.path().as_os_str(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(stdout.matches(": OK,").count(), 5, "{stdout}");
    // Loaded by this release, the queue exports the very lines it exported then.
    let queue = airlock::queue::Queue::open(state.path()).unwrap();
    let mut exported = Vec::new();
    for line in queue.export_lines(None).unwrap() {
        exported.extend_from_slice(&line);
        exported.push(b'\n');
    }
    let expected = std::fs::read(dir.join("export.jsonl")).unwrap();
    assert!(
        exported == expected,
        "the export differs from the fixture's:\n{}",
        String::from_utf8_lossy(&exported)
    );
}

#[test]
fn every_record_an_earlier_release_wrote_reads_back_typed_and_encodes_to_its_bytes() {
    use airlock::log::{Link, Record, RecordLine};
    let export =
        std::fs::read_to_string(std::path::Path::new(FIXTURE).join("export.jsonl")).unwrap();
    let mut records = 0;
    for line in export.lines() {
        let Ok(record) = serde_json::from_str::<RecordLine>(line) else {
            continue;
        };
        records += 1;
        let entry = record
            .entry()
            .unwrap_or_else(|e| panic!("{line}: not a typed entry: {e}"));
        assert_eq!(Ok(entry.name()), record.event(), "{line}");
        let (bytes, _) = Record {
            run: &record.run,
            link: Link {
                seq: record.seq,
                prev: record.prev.clone(),
            },
            intent: record.intent.as_deref(),
            entry: &entry,
            at: record.at,
        }
        .encode()
        .unwrap();
        assert_eq!(String::from_utf8(bytes).unwrap(), line);
    }
    assert_eq!(records, 33);
}
