//! The decision log (`[telemetry] decision_log`), through the real `airlock` binary
//! with the built-in policy: one OPA-shaped event per decision, the agent's values
//! masked unless `decision_log_values = true`, the decision id the run log records,
//! and a path inside the agent's directories refused at start. (A remote OPA's
//! decision id is checked in `opa_remote.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use std::path::Path;

use serde_json::{Value, json};
use support::{Sandbox, eventually, insert_customer, intent};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The log's events, once it holds `n` lines.
fn read_events(path: &Path, n: usize) -> Vec<Value> {
    eventually(&format!("{n} lines in {}", path.display()), || {
        let text = std::fs::read_to_string(path).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        (lines.len() >= n).then(|| {
            lines
                .iter()
                .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
                .collect()
        })
    })
}

/// An allowed insert (with a traceparent), a denied write, and a delete sent to review.
fn workload(sb: &Sandbox) -> [Value; 3] {
    let mut allowed = insert_customer("ok-1", "run-d", 1, "Secret Name");
    allowed["provenance"]["traceparent"] = TRACEPARENT.into();
    sb.submit_json(&allowed);
    sb.outcome_in("ok-1", "applied");
    sb.submit_json(&intent(
        "no-1",
        "run-d",
        json!({"op": "insert", "table": "audit_log",
               "values": {"id": 7, "at": "now", "message": "Secret Message"}}),
    ));
    sb.outcome_in("no-1", "denied");
    sb.submit_json(&intent(
        "rev-1",
        "run-d",
        json!({"op": "delete", "table": "customers", "key": {"id": 4242}}),
    ));
    let review = sb.outcome_in("rev-1", "awaiting_review");
    let applied = sb.outcome_in("ok-1", "applied");
    let denied = sb.outcome_in("no-1", "denied");
    [applied, denied, review]
}

fn sandbox_logging_to(path: &Path, values: bool) -> Sandbox {
    let mut sb = Sandbox::new();
    sb.env.push((
        "AIRLOCK_TELEMETRY__DECISION_LOG".into(),
        path.display().to_string(),
    ));
    if values {
        sb.env.push((
            "AIRLOCK_TELEMETRY__DECISION_LOG_VALUES".into(),
            "true".into(),
        ));
    }
    sb
}

#[test]
fn each_decision_is_one_opa_event_with_the_values_masked() {
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("decisions.jsonl");
    let mut sb = sandbox_logging_to(&path, false);
    sb.start();
    let outcomes = workload(&sb);
    let events = read_events(&path, 3);
    assert_eq!(events.len(), 3, "{events:#?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let ids = ["ok-1", "no-1", "rev-1"];
    for ((event, id), outcome) in events.iter().zip(ids).zip(&outcomes) {
        assert_eq!(event["input"]["intent"]["id"], id, "{event:#}");
        assert_eq!(event["path"], "airlock/authz");
        assert_eq!(event["labels"]["version"], env!("CARGO_PKG_VERSION"));
        assert!(
            event["labels"]["id"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
        );
        let timestamp = event["timestamp"].as_str().unwrap();
        assert!(
            timestamp.ends_with('Z') && timestamp.split('.').nth(1).map(str::len) == Some(10),
            "RFC 3339 with nanoseconds: {timestamp}"
        );
        // The embedded engine gives no id: Airlock makes one, and records it as the
        // decision's, so the event can be matched to the run log and the outcome.
        let decision_id = event["decision_id"].as_str().unwrap();
        assert_eq!(outcome["decision"]["decision_id"], decision_id);
        assert_eq!(
            event["masked"][0],
            format!(
                "/input/intent/ops/0/{}",
                if id == "rev-1" { "key" } else { "values" }
            )
        );
    }
    let [allowed, denied, review] = &events[..] else {
        panic!("three events: {events:#?}");
    };
    assert_eq!(allowed["result"]["allow"], true);
    assert_eq!(allowed["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(allowed["span_id"], "00f067aa0ba902b7");
    assert_eq!(allowed["input"]["intent"]["ops"][0]["values"], "**masked**");
    assert_eq!(
        allowed["input"]["ops"][0]["columns"],
        json!(["id", "name"]),
        "names stay"
    );
    assert_eq!(denied["result"]["allow"], false);
    assert!(denied["result"].get("review").is_none());
    assert!(denied.get("trace_id").is_none() && denied.get("span_id").is_none());
    assert_eq!(review["result"]["review"], true);
    assert_eq!(review["result"]["approvals"], 1);
    let text = std::fs::read_to_string(&path).unwrap();
    for secret in ["Secret Name", "Secret Message", "4242"] {
        assert!(!text.contains(secret), "{secret} in the log:\n{text}");
    }
    // labels.id is the signing key's id.
    assert!(
        sb.log().contains(&format!(
            "keyid={}",
            events[0]["labels"]["id"].as_str().unwrap()
        )),
        "{}",
        sb.log()
    );
    assert_eq!(sb.stop().code(), Some(0));

    // The run log's `decided` records carry the same ids.
    let export = sb.cli(&["export", "--run", "run-d", "--out", "-"]);
    assert!(export.status.success(), "{export:?}");
    let recorded: Vec<Value> = String::from_utf8(export.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|line| line["type"] == "record" && line["event"] == "decided")
        .map(|line| line["data"]["decision"]["decision_id"].clone())
        .collect();
    let logged: Vec<Value> = events.iter().map(|e| e["decision_id"].clone()).collect();
    assert_eq!(recorded, logged);

    // A restart appends to the same file.
    sb.start();
    sb.submit_json(&insert_customer("ok-2", "run-e", 2, "Grace"));
    sb.outcome_in("ok-2", "applied");
    let events = read_events(&path, 4);
    assert_eq!(events[3]["input"]["intent"]["id"], "ok-2");
}

#[test]
fn values_are_shown_when_the_operator_asks() {
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("decisions.jsonl");
    let mut sb = sandbox_logging_to(&path, true);
    sb.start();
    workload(&sb);
    let events = read_events(&path, 3);
    assert_eq!(
        events[0]["input"]["intent"]["ops"][0]["values"],
        json!({"id": 1, "name": "Secret Name"})
    );
    assert_eq!(
        events[2]["input"]["intent"]["ops"][0]["key"],
        json!({"id": 4242})
    );
    assert!(events.iter().all(|e| e.get("masked").is_none()));
}

#[test]
fn standard_output_gets_the_events() {
    let mut sb = Sandbox::new();
    sb.env
        .push(("AIRLOCK_TELEMETRY__DECISION_LOG".into(), "-".into()));
    let out_path = sb.dir.path().join("stdout.txt");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut command = sb.run_command();
    command
        .env("AIRLOCK_INTAKE__RESCAN_MS", "500")
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(std::process::Stdio::null());
    sb.child = Some(command.spawn().unwrap());
    sb.submit_json(&insert_customer("ok-1", "run-o", 1, "Ada"));
    sb.outcome_in("ok-1", "applied");
    let events = read_events(&out_path, 1);
    assert_eq!(events.len(), 1, "standard output holds only the event");
    assert_eq!(events[0]["input"]["intent"]["id"], "ok-1");
}

#[test]
fn a_log_inside_the_agents_directories_is_refused_at_start() {
    for inside in ["intents/decisions.jsonl", "intents/results/decisions.jsonl"] {
        let mut sb = Sandbox::new();
        let path = sb.dir.path().join(inside);
        let stderr_path = sb.dir.path().join("stderr.txt");
        let child = sb
            .run_command()
            .env("AIRLOCK_TELEMETRY__DECISION_LOG", &path)
            .stdin(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        // Held by the sandbox, which kills it if it does not exit by itself.
        sb.child = Some(child);
        let status = eventually("airlock to refuse to start", || {
            sb.child.as_mut().unwrap().try_wait().unwrap()
        });
        sb.child = None;
        let stderr = std::fs::read_to_string(&stderr_path).unwrap();
        assert_eq!(status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains("telemetry.decision_log")
                && stderr.contains("which the agent controls"),
            "{stderr}"
        );
        assert!(!path.exists());
        assert!(!sb.state().exists(), "a refused start creates nothing");
    }
}

/// A log that cannot be written (`/dev/full` answers every write with "no space")
/// costs the lines, not the decisions: every intent is still decided and applied,
/// and the error is logged once, not once per line.
#[test]
fn a_failing_log_never_holds_back_a_decision() {
    let mut sb = sandbox_logging_to(Path::new("/dev/full"), false);
    sb.start();
    for n in 1..=3 {
        let id = format!("ok-{n}");
        sb.submit_json(&insert_customer(&id, &format!("run-{n}"), n, "Ada"));
        sb.outcome_in(&id, "applied");
    }
    assert_eq!(sb.rows("SELECT count(*) FROM customers"), [[json!(3)]]);
    let log = eventually("the write error in the daemon's log", || {
        let log = sb.log();
        log.contains("cannot write the decision log").then_some(log)
    });
    assert_eq!(
        log.matches("cannot write the decision log").count(),
        1,
        "{log}"
    );
}
