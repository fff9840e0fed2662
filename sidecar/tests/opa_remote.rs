//! Remote policy decisions against a real Open Policy Agent evaluator, and against
//! servers that fail in each way a policy server can: refused connections, hangs,
//! 500s, bodies that are not JSON, wrong tokens.
//!
//! The OPA server is `tests/opa/server.py` around OPA's own Go evaluator (the PyPI
//! package `opa-golib-python-bindings`, installed by `.ci/run`). Without it these
//! tests fail, they do not skip. `AIRLOCK_TEST_PYTHON` names another interpreter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use airlock::decide::{
    Decision, EmbeddedPolicy, InputContext, PolicyError, PolicySource, RemoteOptions, RemotePolicy,
    UNDEFINED_REASON, Verdict, build_input,
};
use airlock_intent::Intent;
use serde_json::{Value, json};
use support::{DEADLINE, Sandbox, eventually};

// ---------------------------------------------------------------------------
// The real OPA server

/// `tests/opa/server.py` serving a policy directory on the loopback interface.
struct OpaServer {
    child: Child,
    /// Held open: the server exits when its standard input closes.
    _stdin: ChildStdin,
    port: u16,
    /// The server's decision log, one JSON line per decision.
    decisions: Arc<Mutex<Vec<Value>>>,
}

impl OpaServer {
    fn start(policy_dir: &Path, port: u16, token: Option<&str>) -> Self {
        let python = std::env::var("AIRLOCK_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/opa/server.py");
        let mut command = Command::new(python);
        command
            .arg(script)
            .arg(policy_dir)
            .arg("--port")
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(token) = token {
            command.arg("--token").arg(token);
        }
        let mut child = command.spawn().expect("start python3 tests/opa/server.py");
        let stdin = child.stdin.take().unwrap();
        let (lines_tx, lines_rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    return;
                }
            }
        });
        let (first, lines_rx) = match lines_rx.recv_timeout(DEADLINE) {
            Ok(line) => (line, lines_rx),
            Err(_) => {
                let _ = child.kill();
                let mut stderr = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
                panic!(
                    "the OPA test server did not start (is `opa-golib-python-bindings` \
                     installed? see .ci/run):\n{stderr}"
                );
            }
        };
        let port = first
            .strip_prefix("listening on 127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the OPA server: {first}"));
        let decisions = Arc::new(Mutex::new(Vec::new()));
        std::thread::spawn({
            let decisions = decisions.clone();
            move || collect_decisions(&lines_rx, &decisions)
        });
        Self {
            child,
            _stdin: stdin,
            port,
            decisions,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/v1/data/{path}", self.port)
    }

    fn decision_ids(&self) -> Vec<String> {
        self.decisions
            .lock()
            .unwrap()
            .iter()
            .filter_map(|d| d["decision_id"].as_str().map(str::to_owned))
            .collect()
    }
}

fn collect_decisions(lines: &Receiver<String>, into: &Mutex<Vec<Value>>) {
    for line in lines {
        if let Ok(value) = serde_json::from_str(&line) {
            into.lock().unwrap().push(value);
        }
    }
}

impl Drop for OpaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies")
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn remote(url: &str) -> RemotePolicy {
    RemotePolicy::new(RemoteOptions::new(url)).unwrap()
}

// ---------------------------------------------------------------------------
// Intents and input documents

fn intent(id: &str, ops: Value) -> Intent {
    serde_json::from_value(json!({
        "version": 1, "id": id, "run": "run-1", "ops": ops,
        "reason": "test", "provenance": {"agent": "tester"}
    }))
    .unwrap()
}

fn input_of(intent: &Intent) -> Value {
    build_input(&InputContext {
        intent,
        run_counts: &BTreeMap::from([("applied".to_owned(), 3), ("queued".to_owned(), 1)]),
        digest: &format!("sha256:{}", "0".repeat(64)),
        keyid: Some("sha256:key"),
        file: &format!("{}.json", intent.id.as_str()),
        target: intent.target.as_str(),
        preview: None,
        names: Some(&support::canonical(intent)),
    })
}

fn inserts(n: usize) -> Value {
    (0..n)
        .map(|i| json!({"op": "insert", "table": "customers", "values": {"id": i}}))
        .collect()
}

/// Intents covering every branch of the example policy, and what it must answer.
fn cases() -> Vec<(Intent, Verdict)> {
    let review = Verdict::Review { approvals: 1 };
    vec![
        (
            intent(
                "insert",
                json!([{"op": "insert", "table": "customers", "values": {"id": 1, "name": "Ada"}}]),
            ),
            Verdict::Allow,
        ),
        (
            intent(
                "update-and-upsert",
                json!([
                    {"op": "update", "table": "customers", "key": {"id": 1}, "set": {"tier": "gold"},
                     "expect": {"tier": "standard"}},
                    {"op": "upsert", "table": "tags", "values": {"k": "a", "v": 1}, "on": ["k"]}
                ]),
            ),
            Verdict::Allow,
        ),
        (
            intent(
                "qualified-insert",
                json!([{"op": "insert", "table": "crm.customers", "values": {"id": 2}}]),
            ),
            Verdict::Allow,
        ),
        (
            intent(
                "delete",
                json!([{"op": "delete", "table": "orders", "key": {"id": 100}}]),
            ),
            review,
        ),
        (
            intent(
                "two-deletes",
                json!([
                    {"op": "delete", "table": "orders", "key": {"id": 1}},
                    {"op": "insert", "table": "customers", "values": {"id": 3}},
                    {"op": "delete", "table": "crm.carts", "key": {"customer_id": 3}}
                ]),
            ),
            review,
        ),
        (
            intent(
                "audit-log",
                json!([
                    {"op": "insert", "table": "customers", "values": {"id": 4}},
                    {"op": "insert", "table": "audit_log", "values": {"note": "hi"}}
                ]),
            ),
            Verdict::Deny,
        ),
        (
            intent(
                "qualified-audit-log",
                json!([{"op": "update", "table": "archive.audit_log", "key": {"id": 1},
                        "set": {"note": "x"}}]),
            ),
            Verdict::Deny,
        ),
        (
            intent(
                "delete-audit-log",
                json!([{"op": "delete", "table": "public.audit_log", "key": {"id": 1}}]),
            ),
            Verdict::Deny,
        ),
        (intent("twenty-ops", inserts(20)), Verdict::Allow),
        (intent("many-ops", inserts(21)), review),
    ]
}

/// The parts of a decision both engines must agree on.
fn gist(decision: &Decision) -> (Verdict, Vec<String>) {
    (decision.verdict, decision.reasons.clone())
}

// ---------------------------------------------------------------------------
// Same answers embedded and through OPA

#[test]
fn example_policy_answers_the_same_embedded_and_in_opa() {
    let opa = OpaServer::start(&examples(), 0, None);
    let url = opa.url("airlock/authz");
    let embedded = EmbeddedPolicy::load(PolicySource::Path(examples())).unwrap();
    let remote = remote(&url);
    let cases = cases();
    let inputs: Vec<Value> = cases.iter().map(|(intent, _)| input_of(intent)).collect();

    let rt = runtime();
    let answers = remote.evaluate_all(rt.handle(), inputs.clone());
    assert_eq!(answers.len(), cases.len());
    let mut ids = Vec::new();
    for (((intent, expected), input), answer) in cases.iter().zip(&inputs).zip(answers) {
        let local = embedded.evaluate(input).unwrap();
        let remote = answer.unwrap_or_else(|e| panic!("{}: {e}", intent.id.as_str()));
        assert_eq!(
            local.verdict,
            *expected,
            "{}: {local:?}",
            intent.id.as_str()
        );
        assert_eq!(gist(&remote), gist(&local), "{}", intent.id.as_str());
        assert_eq!(remote.policy, url);
        ids.push(remote.decision_id.expect("OPA gives a decision id"));
    }
    // Reasons are not trivially equal: the many-reasons case has two.
    let two = embedded.evaluate(&inputs[4]).unwrap();
    assert_eq!(
        two.reasons,
        [
            "deletes from carts need human review",
            "deletes from orders need human review"
        ]
    );
    // Every decision has its own id, and it is the one in OPA's decision log.
    let logged = eventually("OPA's decision log", || {
        let logged = opa.decision_ids();
        (logged.len() == ids.len()).then_some(logged)
    });
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "{ids:?}");
    for id in &ids {
        assert!(logged.contains(id), "{id} not in {logged:?}");
    }
}

#[test]
fn approvals_and_sets_answer_the_same_embedded_and_in_opa() {
    // A policy that counts: one approval per delete, reasons from a set.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("counting.rego"),
        r#"package airlock.authz

deletes := [op | some op in input.ops; op.kind == "delete"]

default allow := false

default review := false

review if count(deletes) > 0

allow if not review

approvals := count(deletes) + 1 if review

reasons contains sprintf("delete from %s (op %d)", [op.table, op.index]) if {
	some op in deletes
}

reasons contains "run has applied intents" if input.run.counts.applied > 0
"#,
    )
    .unwrap();
    let opa = OpaServer::start(dir.path(), 0, None);
    let embedded = EmbeddedPolicy::load(PolicySource::Path(dir.path().to_owned())).unwrap();
    let remote = remote(&opa.url("airlock/authz"));
    let rt = runtime();
    let mut saw_two_approvals = false;
    for (intent, _) in cases() {
        let input = input_of(&intent);
        let local = embedded.evaluate(&input).unwrap();
        let answer = rt.block_on(remote.evaluate(&input)).unwrap();
        assert_eq!(gist(&answer), gist(&local), "{}", intent.id.as_str());
        saw_two_approvals |= local.verdict == Verdict::Review { approvals: 3 };
    }
    assert!(saw_two_approvals, "the two-deletes case needs 3 approvals");
}

#[test]
fn an_undefined_document_is_a_denial_that_keeps_its_decision_id() {
    let opa = OpaServer::start(&examples(), 0, None);
    let url = opa.url("no/such/package");
    let (intent, _) = cases().remove(0);
    let decision = runtime()
        .block_on(remote(&url).evaluate(&input_of(&intent)))
        .unwrap();
    assert_eq!(decision.verdict, Verdict::Deny);
    assert_eq!(decision.reasons, [UNDEFINED_REASON]);
    assert_eq!(decision.policy, url);
    assert!(decision.decision_id.is_some());
}

// ---------------------------------------------------------------------------
// Servers that do not answer with a decision

/// What a [`FakeServer`] does with each request.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Reads the request and never answers.
    Hang,
    /// Answers with this status and body.
    Answer(u16, &'static str),
}

/// A loopback HTTP server that misbehaves on purpose. Its thread lives as long as
/// the test process.
struct FakeServer {
    port: u16,
}

impl FakeServer {
    fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                read_request(&mut stream);
                match behaviour {
                    Behaviour::Hang => held.push(stream),
                    Behaviour::Answer(status, body) => {
                        let reply = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = stream.write_all(reply.as_bytes());
                    }
                }
            }
        });
        Self { port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/data/airlock/authz", self.port)
    }
}

/// Reads one request's head and its Content-Length body.
fn read_request(stream: &mut TcpStream) {
    let _ = stream.set_read_timeout(Some(DEADLINE));
    let mut reader = BufReader::new(stream);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
}

fn unavailable(answer: Result<Decision, PolicyError>) -> String {
    match answer {
        Err(PolicyError::Unavailable { message, .. }) => message,
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn failures_to_answer_are_unavailable_never_decisions() {
    let rt = runtime();
    let (intent, _) = cases().remove(0);
    let input = input_of(&intent);
    let ask = |policy: &RemotePolicy| rt.block_on(policy.evaluate(&input));

    let refused = remote(&format!(
        "http://127.0.0.1:{}/v1/data/airlock/authz",
        free_port()
    ));
    let message = unavailable(ask(&refused));
    assert!(message.to_lowercase().contains("connect"), "{message}");

    let error = FakeServer::start(Behaviour::Answer(
        500,
        r#"{"code": "internal_error", "message": "eval_conflict_error: complete rules must not produce multiple outputs"}"#,
    ));
    let message = unavailable(ask(&remote(&error.url())));
    assert!(message.contains("500"), "{message}");
    assert!(message.contains("eval_conflict_error"), "{message}");

    let html = FakeServer::start(Behaviour::Answer(200, "<html>proxy says hi</html>"));
    let message = unavailable(ask(&remote(&html.url())));
    assert!(message.contains("not JSON"), "{message}");

    let array = FakeServer::start(Behaviour::Answer(200, "[]"));
    let message = unavailable(ask(&remote(&array.url())));
    assert!(message.contains("not an object"), "{message}");

    let malformed = FakeServer::start(Behaviour::Answer(200, r#"{"result": {"allow": "yes"}}"#));
    match ask(&remote(&malformed.url())) {
        Err(PolicyError::Malformed(why)) => assert!(why.contains("`allow`"), "{why}"),
        other => panic!("expected Malformed, got {other:?}"),
    }

    let hang = FakeServer::start(Behaviour::Hang);
    let mut options = RemoteOptions::new(hang.url());
    options.timeout = Duration::from_millis(200);
    let message = unavailable(ask(&RemotePolicy::new(options).unwrap()));
    assert!(message.contains("no answer within 200 ms"), "{message}");
}

#[test]
fn a_batch_stops_sending_once_the_server_is_unreachable() {
    let hang = FakeServer::start(Behaviour::Hang);
    let mut options = RemoteOptions::new(hang.url());
    options.timeout = Duration::from_millis(300);
    options.concurrency = 1;
    let policy = RemotePolicy::new(options).unwrap();
    let inputs: Vec<Value> = cases().iter().map(|(i, _)| input_of(i)).collect();
    let count = inputs.len();
    let started = Instant::now();
    let answers = policy.evaluate_all(runtime().handle(), inputs);
    let messages: Vec<String> = answers.into_iter().map(unavailable).collect();
    let timed_out = messages
        .iter()
        .filter(|m| m.starts_with("no answer"))
        .count();
    let skipped = messages
        .iter()
        .filter(|m| m.starts_with("not sent"))
        .count();
    assert_eq!((timed_out, skipped), (1, count - 1), "{messages:#?}");
    // One timeout for the batch, not one per intent.
    assert!(started.elapsed() < Duration::from_millis(300) * 3);
}

#[test]
fn the_bearer_token_is_sent_and_a_refusal_is_unavailable() {
    let opa = OpaServer::start(&examples(), 0, Some("right-token"));
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let rt = runtime();
    let (intent, _) = cases().remove(0);
    let input = input_of(&intent);
    let with_token = |value: &str| {
        std::fs::write(&token, value).unwrap();
        let mut options = RemoteOptions::new(opa.url("airlock/authz"));
        options.bearer_token_file = Some(token.clone());
        RemotePolicy::new(options).unwrap()
    };

    let decision = rt
        .block_on(with_token("right-token\n").evaluate(&input))
        .unwrap();
    assert_eq!(decision.verdict, Verdict::Allow);

    let answer = rt.block_on(with_token("wrong-token").evaluate(&input));
    let shown = format!("{answer:?}");
    let message = unavailable(answer);
    assert!(message.contains("401 Unauthorized"), "{message}");
    assert!(message.contains("bearer_token_file"), "{message}");
    assert!(
        !shown.contains("wrong-token") && !shown.contains("right-token"),
        "{shown}"
    );

    let none = rt.block_on(remote(&opa.url("airlock/authz")).evaluate(&input));
    assert!(unavailable(none).contains("401"));
}

// ---------------------------------------------------------------------------
// The daemon, through the real binary

fn remote_sandbox(url: &str, env: &[(&str, &str)]) -> Sandbox {
    let mut sandbox = Sandbox::new();
    sandbox.extra_args = vec!["--policy-url".into(), url.into()];
    sandbox.env = [
        ("AIRLOCK_APPLY__MAX_BACKOFF_MS", "200"),
        ("AIRLOCK_POLICY__RELOAD_MS", "50"),
    ]
    .iter()
    .chain(env)
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    sandbox
}

fn decide_error(outcome: &Value) -> Option<String> {
    (outcome["state"] == "queued" && outcome["error"]["stage"] == "decide").then(|| {
        outcome["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    })
}

/// Waits until the intent has failed to get a decision at least twice (its retry
/// time moved): it is being retried, and has still not been applied.
fn retried_while_queued(sandbox: &Sandbox, id: &str) -> String {
    let first = sandbox.outcome_where(id, |o| decide_error(o).is_some());
    let outcome = sandbox.outcome_where(id, |o| {
        decide_error(o).is_some() && o["error"]["retry_at"] != first["error"]["retry_at"]
    });
    assert!(
        sandbox.rows("SELECT id FROM customers").is_empty(),
        "nothing may be applied without a decision"
    );
    decide_error(&outcome).unwrap()
}

#[test]
fn an_unreachable_server_holds_intents_until_it_comes_back() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/v1/data/airlock/authz");
    let mut sandbox = remote_sandbox(&url, &[]);
    sandbox.start();
    sandbox.submit_json(&support::insert_customer("c-1", "run-r", 1, "Ada"));
    let message = retried_while_queued(&sandbox, "c-1");
    assert!(message.contains("unavailable"), "{message}");
    assert!(message.contains(&url), "{message}");
    assert!(
        sandbox.log().contains("policy could not decide"),
        "{}",
        sandbox.log()
    );

    let opa = OpaServer::start(&examples(), port, None);
    let outcome = sandbox.outcome_in("c-1", "applied");
    assert_eq!(
        sandbox.rows("SELECT id, name FROM customers"),
        [[json!(1), json!("Ada")]]
    );
    let decision = &outcome["decision"];
    assert_eq!(decision["policy"], url);
    let decision_id = decision["decision_id"]
        .as_str()
        .expect("a decision id")
        .to_owned();
    assert!(opa.decision_ids().contains(&decision_id));
    assert_eq!(sandbox.stop().code(), Some(0));

    // The run log's `decided` record names the URL and OPA's decision id.
    let export = sandbox.cli(&["export", "--run", "run-r", "--out", "-"]);
    assert!(export.status.success(), "{export:?}");
    let decided: Vec<Value> = String::from_utf8(export.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|line| line["type"] == "record" && line["event"] == "decided")
        .collect();
    assert_eq!(decided.len(), 1, "{decided:?}");
    assert_eq!(decided[0]["data"]["decision"]["policy"], url);
    assert_eq!(decided[0]["data"]["decision"]["decision_id"], decision_id);
}

#[test]
fn a_hanging_server_holds_intents() {
    let hang = FakeServer::start(Behaviour::Hang);
    let mut sandbox = remote_sandbox(&hang.url(), &[("AIRLOCK_POLICY__TIMEOUT_MS", "150")]);
    sandbox.start();
    sandbox.submit_json(&support::insert_customer("c-1", "run-h", 1, "Ada"));
    let message = retried_while_queued(&sandbox, "c-1");
    assert!(message.contains("no answer within 150 ms"), "{message}");
    assert_eq!(sandbox.stop().code(), Some(0));
}

#[test]
fn a_failing_server_holds_intents() {
    let error = FakeServer::start(Behaviour::Answer(503, r#"{"message": "overloaded"}"#));
    let mut sandbox = remote_sandbox(&error.url(), &[]);
    sandbox.start();
    sandbox.submit_json(&support::insert_customer("c-1", "run-f", 1, "Ada"));
    let message = retried_while_queued(&sandbox, "c-1");
    assert!(message.contains("503"), "{message}");
}

#[test]
fn an_undefined_answer_denies_the_intent() {
    let opa = OpaServer::start(&examples(), 0, None);
    let url = opa.url("airlock/nothing");
    let mut sandbox = remote_sandbox(&url, &[]);
    sandbox.start();
    sandbox.submit_json(&support::insert_customer("c-1", "run-u", 1, "Ada"));
    let outcome = sandbox.outcome_in("c-1", "denied");
    assert_eq!(outcome["decision"]["reasons"], json!([UNDEFINED_REASON]));
    assert!(outcome["decision"]["decision_id"].is_string());
    assert!(sandbox.rows("SELECT id FROM customers").is_empty());
}

#[test]
fn a_refused_token_is_logged_without_the_token_and_a_rotated_one_is_used() {
    let opa = OpaServer::start(&examples(), 0, Some("right-token-4b1d"));
    let mut sandbox = remote_sandbox(&opa.url("airlock/authz"), &[]);
    let token = sandbox.dir.path().join("opa-token");
    std::fs::write(&token, "wrong-token-9c2e\n").unwrap();
    sandbox.env.push((
        "AIRLOCK_POLICY__BEARER_TOKEN_FILE".into(),
        token.display().to_string(),
    ));
    sandbox.start();
    sandbox.submit_json(&support::insert_customer("c-1", "run-t", 1, "Ada"));
    let message = retried_while_queued(&sandbox, "c-1");
    assert!(message.contains("401 Unauthorized"), "{message}");
    let log = sandbox.log();
    assert!(log.contains("401 Unauthorized"), "{log}");

    // The Secret is rotated: the new token is read and the intent goes through.
    std::fs::write(&token, "right-token-4b1d\n").unwrap();
    sandbox.outcome_in("c-1", "applied");
    assert_eq!(sandbox.stop().code(), Some(0));
    let log = sandbox.log();
    assert!(
        !log.contains("token-4b1d") && !log.contains("token-9c2e"),
        "{log}"
    );
}

#[test]
fn policy_eval_prints_the_input_and_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cancel.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&json!({
            "version": 1, "id": "cancel-1", "run": "run-e",
            "ops": [{"op": "delete", "table": "orders", "key": {"id": 100}}],
            "reason": "customer cancelled", "provenance": {"agent": "tester"}
        }))
        .unwrap(),
    )
    .unwrap();
    let eval = |args: &[&str]| {
        let output = support::airlock()
            .args(["policy", "eval"])
            .arg(&file)
            .args(args)
            .env_remove("AIRLOCK_CONFIG")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };

    let embedded = eval(&["--policy", examples().to_str().unwrap()]);
    assert_eq!(embedded["input"]["version"], 2);
    assert_eq!(embedded["input"]["file"], "cancel.json");
    assert_eq!(embedded["input"]["ops"][0]["kind"], "delete");
    assert_eq!(embedded["decision"]["verdict"], "review");
    assert_eq!(embedded["decision"]["approvals"], 1);
    assert!(
        embedded["decision"]["policy"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );

    let builtin = eval(&[]);
    assert_eq!(builtin["decision"], embedded["decision"]);

    let opa = OpaServer::start(&examples(), 0, None);
    let remote = eval(&["--policy-url", &opa.url("airlock/authz")]);
    assert_eq!(remote["input"], embedded["input"]);
    assert_eq!(remote["decision"]["verdict"], "review");
    assert_eq!(
        remote["decision"]["reasons"],
        embedded["decision"]["reasons"]
    );
    assert!(remote["decision"]["decision_id"].is_string());

    // An invalid intent: its problems, exit status 1, no decision.
    std::fs::write(&file, r#"{"version": 1, "id": "x", "ops": []}"#).unwrap();
    let output = support::airlock()
        .args(["policy", "eval"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/ops"), "{stderr}");
    assert!(stderr.contains("not a valid intent"), "{stderr}");
    assert!(output.stdout.is_empty());

    // A policy that cannot answer: exit status 1, the reason, no decision.
    std::fs::write(
        &file,
        serde_json::to_vec(&support::insert_customer("c-1", "r", 1, "Ada")).unwrap(),
    )
    .unwrap();
    let output = support::airlock()
        .args(["policy", "eval"])
        .arg(&file)
        .arg("--policy-url")
        .arg(format!(
            "http://127.0.0.1:{}/v1/data/airlock/authz",
            free_port()
        ))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("could not decide"));
}

#[test]
fn run_check_asks_the_server_and_fails_when_it_is_down() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/v1/data/airlock/authz");
    let sandbox = remote_sandbox(&url, &[]);
    let check = || {
        sandbox
            .run_command()
            .args(&sandbox.extra_args)
            .arg("--check")
            .output()
            .unwrap()
    };
    // Nobody listens yet: `airlock run` would start (intents would wait), but the
    // check asks for every server to answer now.
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("policy server"), "{stderr}");
    assert!(stderr.contains("unavailable"), "{stderr}");

    let _opa = OpaServer::start(&examples(), port, None);
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{url}: answered a decision request")),
        "{stdout}"
    );
}

/// The decision log (`[telemetry] decision_log`) of a sidecar asking a remote OPA
/// names OPA's decision id, so the two logs can be joined, and OPA's data path.
#[test]
fn the_decision_log_carries_opas_decision_id() {
    let opa = OpaServer::start(&examples(), 0, None);
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("decisions.jsonl");
    let log = path.display().to_string();
    let mut sandbox = remote_sandbox(
        &opa.url("airlock/authz"),
        &[("AIRLOCK_TELEMETRY__DECISION_LOG", log.as_str())],
    );
    sandbox.start();
    sandbox.submit_json(&support::insert_customer("c-1", "run-l", 1, "Ada"));
    let outcome = sandbox.outcome_in("c-1", "applied");
    let event: Value = eventually("the decision log's line", || {
        let text = std::fs::read_to_string(&path).ok()?;
        serde_json::from_str(text.lines().next()?).ok()
    });
    let decision_id = outcome["decision"]["decision_id"].as_str().unwrap();
    assert_eq!(event["decision_id"], decision_id, "{event:#}");
    assert!(opa.decision_ids().iter().any(|id| id == decision_id));
    assert_eq!(event["path"], "airlock/authz");
    assert_eq!(event["result"]["allow"], true);
    assert_eq!(event["input"]["intent"]["ops"][0]["values"], "**masked**");
}
