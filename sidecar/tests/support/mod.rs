//! Test support: a real `airlock` process on a temporary directory, and helpers to
//! wait for conditions with deadlines (never sleeps as synchronisation).
#![allow(dead_code)]

pub mod http;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long any condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `f` until it returns `Some`, or panics with `what` after [`DEADLINE`].
pub fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    eventually_explained(|| what.to_owned(), f)
}

/// Like [`eventually`], with the failure message built when the deadline passes (so
/// it can include, say, the daemon's log at that moment).
pub fn eventually_explained<T>(what: impl Fn() -> String, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {}",
            what()
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The `airlock` binary under test.
pub fn airlock() -> Command {
    Command::new(env!("CARGO_BIN_EXE_airlock"))
}

/// The demo's target tables.
pub const SCHEMA: &str = include_str!("../../../examples/sandbox/schema.sql");

/// A temporary Airlock installation: intent, results and state directories, a SQLite
/// target with the demo tables, and (once started) a running daemon.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The default target's URL; the sandbox's SQLite file when `None`.
    pub target_url: Option<String>,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sandbox = Self {
            dir,
            child: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            target_url: None,
        };
        std::fs::create_dir_all(sandbox.intents()).expect("intents dir");
        rusqlite::Connection::open(sandbox.target())
            .and_then(|db| db.execute_batch(SCHEMA))
            .expect("target schema");
        sandbox
    }

    pub fn intents(&self) -> PathBuf {
        self.dir.path().join("intents")
    }

    pub fn results(&self) -> PathBuf {
        self.intents().join("results")
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn target(&self) -> PathBuf {
        self.dir.path().join("target.db")
    }

    /// Starts `airlock run` on the sandbox.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        // A killed daemon leaves its endpoint file behind; the new one writes it anew
        // once it is up (see `stop`).
        let _ = std::fs::remove_file(self.state().join("review-endpoint"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("airlock.log"))
            .expect("log file");
        let mut command = self.run_command();
        command
            .args(&self.extra_args)
            .env("AIRLOCK_LOG", "debug")
            .env("AIRLOCK_INTAKE__RESCAN_MS", "500")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(command.spawn().expect("spawn airlock"));
    }

    /// `airlock run` on this sandbox's directories and target, with its environment;
    /// the review endpoint on a free port of its own (tests run side by side).
    pub fn run_command(&self) -> Command {
        let mut command = airlock();
        command
            .arg("run")
            .arg("--intents")
            .arg(self.intents())
            .arg("--state")
            .arg(self.state())
            .arg("--target")
            .arg(self.target_url())
            .env("AIRLOCK_REVIEW__LISTEN", "127.0.0.1:0")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }

    /// Sends SIGTERM once the daemon is up (a signal that arrives while the process
    /// is still being exec'd kills it before it can install its handlers) and waits
    /// for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("not running");
        let endpoint = self.state().join("review-endpoint");
        let listens = !self
            .env
            .iter()
            .any(|(k, v)| k == "AIRLOCK_REVIEW__LISTEN" && v == "off");
        if listens {
            eventually_explained(
                || {
                    format!(
                        "airlock to start before it is stopped; log:\n{}",
                        self.log_tail()
                    )
                },
                || {
                    (path_exists(&endpoint) || matches!(child.try_wait(), Ok(Some(_))))
                        .then_some(())
                },
            );
        }
        signal(&child, "TERM");
        eventually("airlock to exit after SIGTERM", || {
            child.try_wait().ok().flatten()
        })
    }

    /// Kills the process outright (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Makes the daemon decide with `rego` (written to `<sandbox>/policies/<file>`)
    /// instead of the built-in policy. Call before `start`.
    pub fn use_policy(&mut self, file: &str, rego: &str) {
        let policies = self.dir.path().join("policies");
        std::fs::create_dir_all(&policies).expect("policies dir");
        std::fs::write(policies.join(file), rego).expect("policy file");
        self.extra_args = vec!["--policy".into(), policies.display().to_string()];
    }

    /// The running daemon's review endpoint, `http(s)://127.0.0.1:<port>`, once it
    /// listens.
    pub fn review_url(&self) -> String {
        let file = self.state().join("review-endpoint");
        eventually_explained(
            || format!("the review endpoint to listen; log:\n{}", self.log()),
            || {
                let url = std::fs::read_to_string(&file).ok()?;
                let url = url.trim();
                (!url.is_empty()).then(|| url.to_owned())
            },
        )
    }

    /// A new reviewer token named `name` with `role`, added to the sandbox's tokens
    /// file with `airlock token add`.
    pub fn token(&self, name: &str, role: &str) -> String {
        let out = self.cli(&["token", "add", "--name", name, "--role", role]);
        assert!(
            out.status.success(),
            "airlock token add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8 token")
            .lines()
            .next()
            .expect("a token line")
            .trim()
            .to_owned()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("airlock.log")).unwrap_or_default()
    }

    /// Writes an intent file the way the protocol says (temporary name, rename).
    pub fn submit(&self, name: &str, bytes: &[u8]) {
        let tmp = self.intents().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).expect("write intent");
        std::fs::rename(&tmp, self.intents().join(name)).expect("rename intent");
    }

    /// Submits an intent given as JSON, named `<id>.json`.
    pub fn submit_json(&self, intent: &Value) {
        let id = intent["id"].as_str().expect("id");
        self.submit(
            &format!("{id}.json"),
            &serde_json::to_vec_pretty(intent).expect("json"),
        );
    }

    /// The outcome file `name` (without `.json`), once it satisfies `accept`; checked
    /// against the published outcome schema ([`check_outcome`]).
    pub fn outcome_where(&self, name: &str, accept: impl Fn(&Value) -> bool) -> Value {
        let path = self.results().join(format!("{name}.json"));
        let explain = || {
            let found = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("({e})"));
            format!(
                "outcome {name}; the file holds:\n{found}\nlog:\n{}",
                self.log_tail()
            )
        };
        let outcome = eventually_explained(explain, || {
            let bytes = std::fs::read(&path).ok()?;
            let value: Value = serde_json::from_slice(&bytes).ok()?;
            accept(&value).then_some(value)
        });
        check_outcome(&outcome);
        outcome
    }

    /// The outcome once it is in `state`.
    pub fn outcome_in(&self, name: &str, state: &str) -> Value {
        self.outcome_where(name, |o| o["state"] == state)
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let start = log.len().saturating_sub(4000);
        log.get(start..).unwrap_or("").to_owned()
    }

    /// Runs an `airlock` subcommand against this sandbox's state, with the daemon's
    /// targets and settings (`airlock approve` previews the intent on its target).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        airlock()
            .args(args)
            .arg("--state")
            .arg(self.state())
            .env("AIRLOCK_TARGET", self.target_url())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run airlock")
    }

    /// Rows of a query on the target, as JSON arrays.
    pub fn rows(&self, sql: &str) -> Vec<Vec<Value>> {
        let db = rusqlite::Connection::open(self.target()).expect("open target");
        let mut stmt = db.prepare(sql).expect("prepare");
        let n = stmt.column_count();
        stmt.query_map([], |row| {
            (0..n)
                .map(|i| {
                    Ok(match row.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => Value::Null,
                        rusqlite::types::ValueRef::Integer(v) => json!(v),
                        rusqlite::types::ValueRef::Real(v) => json!(v),
                        rusqlite::types::ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
                        rusqlite::types::ValueRef::Blob(b) => json!(b.len()),
                    })
                })
                .collect()
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} failed");
}

/// Fails unless `outcome` matches the published outcome schema
/// (`intent-schema/outcome.schema.json`), listing every violation with its pointer.
/// [`Sandbox::outcome_where`] checks every outcome it returns; call this on
/// outcome files read another way.
pub fn check_outcome(outcome: &Value) {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    let validator = VALIDATOR.get_or_init(|| {
        let schema: Value =
            serde_json::from_str(airlock_intent::OUTCOME_SCHEMA).expect("outcome schema is JSON");
        jsonschema::draft202012::new(&schema).expect("outcome schema compiles")
    });
    let errors: Vec<String> = validator
        .iter_errors(outcome)
        .map(|e| format!("{}: {e}", e.instance_path().as_str()))
        .collect();
    assert!(
        errors.is_empty(),
        "the outcome does not match outcome.schema.json: {errors:#?}\n{outcome:#}"
    );
}

/// A valid intent with one op.
pub fn intent(id: &str, run: &str, op: Value) -> Value {
    json!({
        "version": 1,
        "id": id,
        "run": run,
        "ops": [op],
        "reason": format!("test {id}"),
        "provenance": {"agent": "test-agent", "model": "test-model"}
    })
}

pub fn insert_customer(id: &str, run: &str, customer: i64, name: &str) -> Value {
    intent(
        id,
        run,
        json!({"op": "insert", "table": "customers", "values": {"id": customer, "name": name}}),
    )
}

pub fn path_exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// Deletes need two distinct approvers; everything else is allowed.
pub const QUORUM_POLICY: &str = r#"package airlock.authz

default allow := false

default review := false

approvals := 2

review if {
	some op in input.ops
	op.kind == "delete"
}

allow if not review

reasons := ["deletes need two approvers"] if review
"#;

impl Sandbox {
    /// The default target's URL, as `start` gives it to the daemon.
    pub fn target_url(&self) -> String {
        self.target_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.target().display()))
    }
}

/// Raises this test process's soft open-file limit to at least `needed` (up to the
/// hard limit), for tests that hold many sockets; fails if the hard limit is lower.
pub fn raise_open_file_limit(needed: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|current| current >= needed) {
        return;
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised).expect("raise RLIMIT_NOFILE to its hard limit");
    let now = getrlimit(Resource::Nofile).current;
    assert!(
        now.is_none_or(|n| n >= needed),
        "this test needs {needed} open files; the hard limit allows {now:?}"
    );
}

impl Sandbox {
    /// Lets the daemon apply as a privileged PostgreSQL role. The test server's role
    /// is the superuser `postgres`, which Airlock refuses by default; a test using it
    /// says so, as an operator would with `[apply] allow_privileged_role = true`.
    /// (`hostile_agent::names` runs Airlock under the least-privilege role instead.)
    pub fn allow_privileged_role(&mut self) {
        self.env
            .push(("AIRLOCK_APPLY__ALLOW_PRIVILEGED_ROLE".into(), "true".into()));
    }
}

/// The names a target would resolve for `intent` (as PostgreSQL folds an unquoted
/// name: lowercase, `public` when unqualified), as the daemon gives the policy.
pub fn canonical(intent: &airlock_intent::Intent) -> Vec<airlock::apply::ResolvedOp> {
    intent
        .ops
        .iter()
        .map(|op| airlock::apply::ResolvedOp {
            spelled: op.table().as_str().to_owned(),
            schema: op.table().schema().unwrap_or("public").to_ascii_lowercase(),
            table: op.table().name().to_ascii_lowercase(),
            columns: op
                .columns_written()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        })
        .collect()
}

impl Sandbox {
    /// Serves the review endpoint over HTTPS with a fresh self-signed certificate
    /// for localhost and 127.0.0.1 (made by `openssl`); returns the certificate's
    /// PEM, for a client to trust.
    pub fn serve_tls(&mut self) -> Vec<u8> {
        let dir = self.dir.path().to_owned();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec"])
            .args(["-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        for (name, path) in [("TLS_CERT", &cert), ("TLS_KEY", &key)] {
            self.env.push((
                format!("AIRLOCK_REVIEW__{name}"),
                path.display().to_string(),
            ));
        }
        std::fs::read(&cert).expect("certificate")
    }
}
