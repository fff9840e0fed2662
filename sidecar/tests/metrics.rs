//! The metrics and health listener (`[telemetry] metrics_listen`) of a real daemon:
//! `/metrics` after a known workload, read by the Prometheus project's own Python
//! parser (PyPI `prometheus-client`, its OpenMetrics parser) and checked value by
//! value; `/healthz`; and `/readyz` following a PostgreSQL target that a TCP proxy
//! takes down and brings back.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

#[path = "support/pg.rs"]
mod pg;
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Sandbox, insert_customer, intent};

/// Parses OpenMetrics text from standard input with `prometheus_client`'s strict
/// parser and prints every sample as `[name, labels, value]` in a JSON array.
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append([s.name, s.labels, s.value])
print(json.dumps(samples))
"#;

/// One HTTP answer: status and body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// `GET path` from the listener at `base` (`http://host:port`), one connection.
fn get(base: &str, path: &str) -> Answer {
    let authority = base.trim_start_matches("http://");
    let mut tcp = TcpStream::connect(authority).expect("connect to the metrics listener");
    tcp.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).expect("read the answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    Answer {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

/// Starts the sandbox's daemon with the metrics listener on a free port and
/// answers its URL once it listens.
fn start_with_metrics(sb: &mut Sandbox) -> String {
    sb.env.push((
        "AIRLOCK_TELEMETRY__METRICS_LISTEN".into(),
        "127.0.0.1:0".into(),
    ));
    sb.start();
    let file = sb.state().join("metrics-endpoint");
    support::eventually_explained(
        || format!("the metrics listener to listen; log:\n{}", sb.log()),
        || {
            let url = std::fs::read_to_string(&file).ok()?;
            let url = url.trim();
            (!url.is_empty()).then(|| url.to_owned())
        },
    )
}

/// Every sample of `/metrics`, as the Python parser read them.
fn scrape(base: &str) -> Vec<(String, Value, f64)> {
    let answer = get(base, "/metrics");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        answer
            .head
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{}",
        answer.head
    );
    let mut python = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (with prometheus-client: pip install prometheus-client==0.26.0)");
    python
        .stdin
        .take()
        .expect("stdin")
        .write_all(answer.body.as_bytes())
        .expect("write to the parser");
    let out = python.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        answer.body
    );
    let samples: Vec<(String, Value, f64)> =
        serde_json::from_slice(&out.stdout).expect("the parser's JSON");
    samples
}

/// The value of the sample `name` with exactly `labels`, failing when it is absent.
fn value(samples: &[(String, Value, f64)], name: &str, labels: Value) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| n == name && *l == labels)
        .map(|(_, _, v)| *v)
        .unwrap_or_else(|| panic!("no sample {name}{labels} in {samples:?}"))
}

#[test]
fn metrics_count_a_known_workload() {
    let mut sb = Sandbox::new();
    let base = start_with_metrics(&mut sb);
    // Five allowed inserts, one denied delete (audit_log is listed in the built-in
    // policy's data), one delete waiting for review; each in a run of its own
    // kind so that nothing holds anything back.
    for n in 1..=5 {
        sb.submit_json(&insert_customer(&format!("c-{n}"), "run-a", n, "Ada"));
        sb.outcome_in(&format!("c-{n}"), "applied");
    }
    sb.submit_json(&intent(
        "erase-1",
        "run-b",
        json!({"op": "delete", "table": "audit_log", "key": {"id": 1}}),
    ));
    sb.outcome_in("erase-1", "denied");
    sb.submit_json(&intent(
        "del-1",
        "run-c",
        json!({"op": "delete", "table": "customers", "key": {"id": 1}}),
    ));
    sb.outcome_in("del-1", "awaiting_review");

    let samples = scrape(&base);
    let none = json!({});
    assert_eq!(
        value(&samples, "airlock_intents_received_total", none.clone()),
        7.0
    );
    for (state, n) in [
        ("applied", 5.0),
        ("denied", 1.0),
        ("rejected", 0.0),
        ("expired", 0.0),
        ("failed", 0.0),
    ] {
        let labels = json!({ "state": state });
        assert_eq!(
            value(&samples, "airlock_intents_ended_total", labels),
            n,
            "{state}"
        );
    }
    for (verdict, n) in [("allow", 5.0), ("deny", 1.0), ("review", 1.0)] {
        let labels = json!({ "verdict": verdict });
        assert_eq!(
            value(&samples, "airlock_decisions_total", labels),
            n,
            "{verdict}"
        );
    }
    for (state, n) in [("queued", 0.0), ("awaiting_review", 1.0), ("approved", 0.0)] {
        let labels = json!({ "state": state });
        assert_eq!(value(&samples, "airlock_queue_depth", labels), n, "{state}");
    }
    for (stage, n) in [
        ("received_to_decided", 7.0),
        ("decided_to_applied", 5.0),
        ("received_to_final", 6.0),
    ] {
        let labels = json!({ "stage": stage });
        assert_eq!(
            value(&samples, "airlock_stage_duration_seconds_count", labels),
            n,
            "{stage}"
        );
    }
    assert_eq!(
        value(&samples, "airlock_policy_errors_total", none.clone()),
        0.0
    );
    assert_eq!(
        value(&samples, "airlock_spans_dropped_total", none.clone()),
        0.0
    );
    assert!(
        !samples
            .iter()
            .any(|(n, _, _)| n == "airlock_apply_errors_total"),
        "no apply failed: {samples:?}"
    );
    assert!(value(&samples, "airlock_review_oldest_age_seconds", none.clone()) >= 0.0);
    assert!(value(&samples, "airlock_checkpoint_lag_records", none.clone()) >= 0.0);
    // A SQLite target has no pool to report.
    assert!(
        !samples
            .iter()
            .any(|(n, _, _)| n == "airlock_target_pool_in_use"),
        "{samples:?}"
    );
    // No intent id, run or table name is a label value.
    for (name, labels, _) in &samples {
        let text = labels.to_string();
        for agent_chosen in ["c-1", "run-a", "erase-1", "customers", "audit_log"] {
            assert!(!text.contains(agent_chosen), "{name}{text}");
        }
    }

    let health = get(&base, "/healthz");
    assert_eq!(health.status, 200, "{}", health.body);
    let health: Value = serde_json::from_str(&health.body).expect("JSON");
    assert_eq!(health["loops"]["intake"]["alive"], true, "{health}");
    assert_eq!(health["loops"]["pipeline"]["alive"], true, "{health}");
    let ready = get(&base, "/readyz");
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(get(&base, "/nothing").status, 404);
    assert!(sb.stop().success());
    assert!(!support::path_exists(&sb.state().join("metrics-endpoint")));
}

#[test]
fn readyz_follows_a_postgresql_target_down_and_back() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let db = runtime.block_on(pg::TestDb::create(
        "CREATE TABLE notes (id int PRIMARY KEY);",
    ));
    let proxy = runtime.block_on(async { pg::Proxy::start(pg::server_addr().await).await });
    let mut sb = Sandbox::new();
    let url = pg::with_address(&db.url, proxy.addr);
    sb.target_url = Some(pg::with_param(&url, "sslmode=disable"));
    // The test server's role is the superuser `postgres`.
    sb.allow_privileged_role();
    let base = start_with_metrics(&mut sb);
    let readiness = |status: u16| {
        support::eventually_explained(
            || format!("/readyz to answer {status}; log:\n{}", sb.log()),
            || {
                let answer = get(&base, "/readyz");
                (answer.status == status)
                    .then(|| serde_json::from_str::<Value>(&answer.body).expect("a JSON body"))
            },
        )
    };
    let up = readiness(200);
    assert_eq!(up["ready"], true, "{up}");
    assert_eq!(up["checks"]["target default"]["ready"], true, "{up}");

    proxy.take_down();
    let down = readiness(503);
    assert_eq!(down["ready"], false, "{down}");
    assert_eq!(down["checks"]["target default"]["ready"], false, "{down}");
    assert!(
        down["checks"]["target default"]["problem"].is_string(),
        "{down}"
    );
    // Only the target is not ready; the rest still is.
    assert_eq!(down["checks"]["state"]["ready"], true, "{down}");
    assert_eq!(down["checks"]["policy"]["ready"], true, "{down}");
    // Alive all the same: the loops keep running while the target is away.
    assert_eq!(get(&base, "/healthz").status, 200);

    proxy.bring_up();
    let back = readiness(200);
    assert_eq!(back["checks"]["target default"]["ready"], true, "{back}");
    let samples = scrape(&base);
    assert_eq!(
        value(
            &samples,
            "airlock_target_pool_in_use",
            json!({"target": "default"})
        ),
        0.0
    );
    assert!(sb.stop().success());
}

#[test]
fn run_check_refuses_a_metrics_address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    let sb = Sandbox::new();
    let out = sb
        .run_command()
        .arg("--check")
        .env("AIRLOCK_TELEMETRY__METRICS_LISTEN", &addr)
        .output()
        .expect("airlock run --check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "telemetry.metrics_listen = \"{addr}\": cannot listen"
        )),
        "{text}"
    );
}
