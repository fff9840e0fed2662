//! `k8s/`: rendered with `kubectl kustomize`, validated strictly with
//! `kubernetes-validate` (Kubernetes 1.29, the first with native sidecars, and the
//! newest it knows), and played: each pod's containers run in the image with exactly
//! the configuration the manifests give them, on volumes laid out the way the kubelet
//! lays them out, and a policy edit made the kubelet's way is picked up.

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use crate::support::{Sandbox, eventually, insert_customer, intent};
use crate::{
    AIRLOCK_UID, Container, PODMAN, ULIMITS, image, own, podman, require_root, root, run, run_ok,
    yaml_documents,
};

const KUBECTL: &str = "kubectl 1.32 with its kustomize (https://kubernetes.io/docs/tasks/tools/); .ci/run requires it";
const VALIDATE: &str = "python3 -m pip install kubernetes-validate==1.37.0 (see .ci/run)";

/// The Kubernetes versions the manifests must validate against: the first with
/// native sidecars, and the newest the validator knows.
const VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];

/// `kubectl kustomize k8s/<dir>`.
fn render(dir: &str) -> String {
    run_ok(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(root().join("k8s").join(dir)),
        KUBECTL,
    )
}

/// `kubernetes-validate --strict` on `yaml` for `version`: the output when it fails.
fn validate(yaml: &str, version: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = run(
        Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .arg(&file),
        VALIDATE,
    );
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && !report.contains("ERROR") {
        Ok(())
    } else {
        Err(report)
    }
}

#[test]
fn every_rendered_manifest_passes_strict_validation() {
    for dir in ["base", "overlays/opa", "overlays/postgres"] {
        let yaml = render(dir);
        let kinds: Vec<String> = yaml_documents(&yaml)
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or("?").to_owned())
            .collect();
        assert!(kinds.contains(&"Deployment".to_owned()), "{dir}: {kinds:?}");
        for version in VERSIONS {
            if let Err(report) = validate(&yaml, version) {
                panic!("k8s/{dir} against Kubernetes {version}:\n{report}");
            }
        }
    }
}

#[test]
fn the_validation_fails_on_an_unknown_field() {
    let yaml = render("base");
    // A typo in the sidecar's restart policy: dropped silently without --strict.
    let broken = yaml.replacen("restartPolicy: Always", "restartPolicyy: Always", 1);
    assert_ne!(broken, yaml);
    let report = validate(&broken, VERSIONS[0]).expect_err("an unknown field must fail");
    assert!(report.contains("restartPolicyy"), "{report}");
    // And a field in the wrong place fails too: readOnly belongs to volumeMounts.
    let misplaced = yaml.replacen("readOnlyRootFilesystem: true", "readOnly: true", 1);
    assert!(validate(&misplaced, VERSIONS[0]).is_err());
}

/// The rendered documents of `k8s/<dir>`.
fn documents(dir: &str) -> Vec<Value> {
    yaml_documents(&render(dir))
}

fn find<'a>(docs: &'a [Value], kind: &str, name_prefix: &str) -> &'a Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(name_prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} {name_prefix}*"))
}

fn pod_spec(docs: &[Value]) -> &Value {
    &find(docs, "Deployment", "agent")["spec"]["template"]["spec"]
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["initContainers"]
        .as_array()
        .into_iter()
        .chain(pod["containers"].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn the_pod_is_restricted_and_the_agent_reads_results_only() {
    for dir in ["base", "overlays/opa", "overlays/postgres"] {
        let docs = documents(dir);
        let pod = pod_spec(&docs);
        let security = &pod["securityContext"];
        assert_eq!(security["runAsNonRoot"], true, "{dir}");
        assert_eq!(security["runAsUser"], AIRLOCK_UID, "{dir}");
        assert_eq!(security["fsGroup"], AIRLOCK_UID, "{dir}");
        assert_eq!(security["fsGroupChangePolicy"], "OnRootMismatch", "{dir}");
        assert_eq!(
            security["seccompProfile"]["type"], "RuntimeDefault",
            "{dir}"
        );
        assert_eq!(pod["automountServiceAccountToken"], false, "{dir}");
        let all: Vec<&Value> = pod["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(pod["containers"].as_array().unwrap())
            .collect();
        for c in &all {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{dir} {}", c["name"]);
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{dir} {}", c["name"]);
            assert_eq!(
                sc["capabilities"]["drop"],
                json!(["ALL"]),
                "{dir} {}",
                c["name"]
            );
            assert!(
                c["resources"]["limits"]["memory"].is_string(),
                "{dir} {}",
                c["name"]
            );
            assert!(
                c["resources"]["requests"]["memory"].is_string(),
                "{dir} {}",
                c["name"]
            );
        }
        // Airlock is a native sidecar with a startup probe; so is OPA where it runs.
        let airlock = container(pod, "airlock");
        assert_eq!(airlock["restartPolicy"], "Always", "{dir}");
        for (probe, path) in [
            ("startupProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ] {
            assert_eq!(airlock[probe]["httpGet"]["path"], path, "{dir} {probe}");
            assert_eq!(
                airlock[probe]["httpGet"]["port"], "metrics",
                "{dir} {probe}"
            );
        }
        // The agent: intents read-write, results read-only, nothing else of Airlock's.
        let agent = container(pod, "agent");
        let mounts: Vec<(String, String, bool)> = agent["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap().to_owned(),
                    m["subPath"].as_str().unwrap_or("").to_owned(),
                    m["readOnly"] == true,
                )
            })
            .collect();
        assert_eq!(
            mounts,
            [
                ("exchange".into(), "intents".into(), false),
                ("exchange".into(), "results".into(), true)
            ],
            "{dir}"
        );
        assert_ne!(agent["securityContext"]["runAsUser"], AIRLOCK_UID, "{dir}");
        // State is Airlock's alone.
        for c in &all {
            let has_state = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == "state");
            assert_eq!(has_state, c["name"] == "airlock", "{dir} {}", c["name"]);
        }
        // The review Service stays inside the cluster; the NetworkPolicy admits only
        // the review port.
        assert_eq!(
            find(&docs, "Service", "airlock-review")["spec"]["type"],
            "ClusterIP"
        );
        let policy = &find(&docs, "NetworkPolicy", "agent")["spec"];
        assert_eq!(
            policy["ingress"][0]["ports"],
            json!([{"protocol": "TCP", "port": 8080}])
        );
        let namespace = find(&docs, "Namespace", "airlock-example");
        assert_eq!(
            namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
            "restricted"
        );
    }
}

#[test]
fn the_copies_beside_the_manifests_match_their_sources() {
    // The policy ConfigMap carries the example policy.
    let docs = documents("base");
    let policy = &find(&docs, "ConfigMap", "airlock-policy")["data"];
    for file in ["airlock.rego", "data.json"] {
        let source = std::fs::read_to_string(root().join("examples/policies").join(file)).unwrap();
        assert_eq!(policy[file].as_str(), Some(source.as_str()), "{file}");
    }
    // The PostgreSQL overlay's role is docs/postgres-role.md's SQL, verbatim.
    let doc = std::fs::read_to_string(root().join("docs/postgres-role.md")).unwrap();
    let sql = std::fs::read_to_string(root().join("k8s/overlays/postgres/role.sql")).unwrap();
    assert_eq!(sql, doc_sql(&doc));
}

/// The ```sql blocks of a Markdown file, each followed by an empty line.
pub fn doc_sql(markdown: &str) -> String {
    let mut sql = String::new();
    let mut inside = false;
    for line in markdown.lines() {
        match (inside, line.trim_end()) {
            (false, "```sql") => inside = true,
            (true, "```") => {
                sql.push('\n');
                inside = false;
            }
            (true, line) => {
                sql.push_str(line);
                sql.push('\n');
            }
            (false, _) => {}
        }
    }
    sql
}

// ---------------------------------------------------------------------------------
// Playing a pod: volumes as the kubelet makes them, containers as podman runs them.

/// One pod's volumes on this machine, laid out as the kubelet would.
struct Pod {
    dir: tempfile::TempDir,
    spec: Value,
    /// Every ConfigMap and Secret the manifests carry, and the Secrets the test
    /// provides (name → key → bytes).
    objects: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

impl Pod {
    fn new(docs: &[Value], secrets: &[(&str, &str, Vec<u8>)]) -> Self {
        let mut objects: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
        for doc in docs {
            if doc["kind"] == "ConfigMap" || doc["kind"] == "Secret" {
                let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
                let entry = objects.entry(name).or_default();
                for (key, value) in doc["data"].as_object().into_iter().flatten() {
                    let text = value.as_str().unwrap();
                    let bytes = if doc["kind"] == "Secret" {
                        use base64::Engine;
                        base64::engine::general_purpose::STANDARD
                            .decode(text.split_whitespace().collect::<String>())
                            .unwrap()
                    } else {
                        text.as_bytes().to_vec()
                    };
                    entry.insert(key.clone(), bytes);
                }
            }
        }
        for (name, key, value) in secrets {
            objects
                .entry((*name).to_owned())
                .or_default()
                .insert((*key).to_owned(), value.clone());
        }
        let pod = Self {
            dir: tempfile::tempdir().unwrap(),
            spec: pod_spec(docs).clone(),
            objects,
        };
        own(pod.dir.path(), 0, 0, 0o755);
        for volume in pod.spec["volumes"].as_array().unwrap() {
            pod.make_volume(volume);
        }
        pod
    }

    fn volume(&self, name: &str) -> PathBuf {
        self.dir.path().join("volumes").join(name)
    }

    fn fs_group(&self) -> u32 {
        self.spec["securityContext"]["fsGroup"].as_u64().unwrap() as u32
    }

    fn make_volume(&self, volume: &Value) {
        let name = volume["name"].as_str().unwrap();
        let path = self.volume(name);
        std::fs::create_dir_all(&path).unwrap();
        let group = self.fs_group();
        if volume.get("emptyDir").is_some() {
            // 0777, then the fsGroup's ownership with setgid.
            own(&path, 0, group, 0o2777);
        } else if volume.get("persistentVolumeClaim").is_some() {
            // A fresh volume's root (root:root 0755), then the fsGroup's group-rw.
            own(&path, 0, group, 0o2775);
        } else if let Some(source) = volume.get("configMap").or_else(|| volume.get("secret")) {
            let object = source["name"]
                .as_str()
                .or_else(|| source["secretName"].as_str())
                .unwrap();
            // The API server's default mode for both kinds.
            let default = 0o644;
            let mode = source["defaultMode"].as_u64().map_or(default, |m| m as u32);
            let optional = source["optional"] == true;
            let files = match self.objects.get(object) {
                Some(files) => files.clone(),
                None if optional => BTreeMap::new(),
                None => {
                    panic!("volume {name}: no ConfigMap or Secret {object}, and it is not optional")
                }
            };
            // With an fsGroup the kubelet makes the files group-readable whatever the
            // mode says (kubernetes/kubernetes#57923), and gives them the group.
            atomic_writer(&path, &files, mode | 0o440, group);
            own(&path, 0, group, 0o2777 & !0o022 | 0o2000);
        } else {
            panic!("volume {name}: a kind this test does not lay out: {volume}");
        }
    }

    /// `podman run` arguments for container `name` of the pod, as the kubelet would
    /// start it; `--check` appended to its arguments when `check`.
    fn podman_args(&self, name: &str, image: &str, env: &[(&str, String)]) -> Vec<String> {
        let c = container(&self.spec, name);
        let pod_sc = &self.spec["securityContext"];
        let sc = &c["securityContext"];
        let uid = sc["runAsUser"]
            .as_u64()
            .or(pod_sc["runAsUser"].as_u64())
            .unwrap();
        let gid = sc["runAsGroup"]
            .as_u64()
            .or(pod_sc["runAsGroup"].as_u64())
            .unwrap();
        let mut args: Vec<String> = vec!["--user".into(), format!("{uid}:{gid}")];
        args.extend(["--group-add".into(), self.fs_group().to_string()]);
        args.extend(ULIMITS.iter().map(|s| (*s).to_owned()));
        if sc["readOnlyRootFilesystem"] == true {
            args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
        }
        if sc["capabilities"]["drop"] == json!(["ALL"]) {
            args.push("--cap-drop=ALL".into());
        }
        if sc["allowPrivilegeEscalation"] == false {
            args.push("--security-opt=no-new-privileges".into());
        }
        for mount in c["volumeMounts"].as_array().into_iter().flatten() {
            let mut host = self.volume(mount["name"].as_str().unwrap());
            if let Some(sub) = mount["subPath"].as_str() {
                host = host.join(sub);
                if !host.exists() {
                    // The kubelet makes a missing subPath with the volume root's mode.
                    std::fs::create_dir(&host).unwrap();
                    own(&host, 0, self.fs_group(), 0o777);
                }
            }
            let ro = if mount["readOnly"] == true { ":ro" } else { "" };
            args.extend([
                "-v".into(),
                format!(
                    "{}:{}{ro}",
                    host.display(),
                    mount["mountPath"].as_str().unwrap()
                ),
            ]);
        }
        for var in c["env"].as_array().into_iter().flatten() {
            let key = var["name"].as_str().unwrap();
            let value = if let Some(value) = var["value"].as_str() {
                Some(value.to_owned())
            } else if let Some(secret) = var["valueFrom"].get("secretKeyRef") {
                let found = self
                    .objects
                    .get(secret["name"].as_str().unwrap())
                    .and_then(|o| o.get(secret["key"].as_str().unwrap()))
                    .map(|v| String::from_utf8(v.clone()).unwrap());
                assert!(
                    found.is_some() || secret["optional"] == true,
                    "{name}: env {key} needs Secret {secret}"
                );
                found
            } else {
                panic!("{name}: env {key}: a source this test does not provide: {var}")
            };
            if let Some(value) = value {
                args.extend(["-e".into(), format!("{key}={value}")]);
            }
        }
        for (key, value) in env {
            args.extend(["-e".into(), format!("{key}={value}")]);
        }
        if let Some(command) = c["command"].as_array() {
            args.extend([
                "--entrypoint".into(),
                command[0].as_str().unwrap().to_owned(),
            ]);
            args.push(image.to_owned());
            args.extend(command[1..].iter().map(|a| a.as_str().unwrap().to_owned()));
        } else {
            args.push(image.to_owned());
        }
        args.extend(
            c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| a.as_str().unwrap().to_owned()),
        );
        args
    }

    /// Gives the default SQLite target (on the state volume) the sandbox's tables, as
    /// an operator using a SQLite target would: the state directory and the file,
    /// both Airlock's and private.
    fn seed_sqlite_target(&self) {
        let state = self.volume("state").join("state");
        std::fs::create_dir_all(&state).unwrap();
        let target = state.join("target.db");
        rusqlite::Connection::open(&target)
            .and_then(|db| db.execute_batch(crate::support::SCHEMA))
            .unwrap();
        own(&state, AIRLOCK_UID, AIRLOCK_UID, 0o700);
        own(&target, AIRLOCK_UID, AIRLOCK_UID, 0o600);
    }

    /// Runs the pod's regular init containers to completion, in order, as the kubelet
    /// does before it starts the sidecars.
    fn run_init(&self, image: &str, network: &str) {
        for c in self.spec["initContainers"].as_array().unwrap() {
            if c["restartPolicy"] == "Always" {
                continue;
            }
            let name = c["name"].as_str().unwrap();
            let mut args = vec![
                "run".to_owned(),
                "--rm".into(),
                format!("--network={network}"),
            ];
            args.extend(self.podman_args(name, image, &[]));
            run_ok(podman().args(&args), PODMAN);
        }
    }

    /// `airlock run --check` with the airlock container's exact configuration.
    fn check(&self, image: &str, network: &str) -> std::process::Output {
        let mut args = vec![
            "run".to_owned(),
            "--rm".into(),
            format!("--network={network}"),
        ];
        args.extend(self.podman_args("airlock", image, &[]));
        args.push("--check".into());
        run(podman().args(&args), PODMAN)
    }

    /// Starts the airlock container detached.
    fn start(&self, container: &Container, image: &str, network: &str) {
        let mut args = vec![
            "run".to_owned(),
            "--detach".into(),
            "--name".into(),
            container.name.clone(),
            format!("--network={network}"),
        ];
        args.extend(self.podman_args("airlock", image, &[]));
        run_ok(podman().args(&args), PODMAN);
    }
}

/// Writes `files` into `dir` the way the kubelet's atomic writer does: a timestamped
/// directory holding the files, `..data` linking to it, and one link per file
/// through `..data`. Returns the timestamped directory's name.
fn atomic_writer(dir: &Path, files: &BTreeMap<String, Vec<u8>>, mode: u32, group: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    static GENERATION: AtomicU32 = AtomicU32::new(0);
    let stamp = format!(
        "..2026_12_01_00_00_00.{:09}",
        GENERATION.fetch_add(1, Ordering::Relaxed)
    );
    let target = dir.join(&stamp);
    std::fs::create_dir(&target).unwrap();
    for (key, bytes) in files {
        let file = target.join(key);
        std::fs::write(&file, bytes).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&file, Some(0), Some(group)).unwrap();
    }
    own(&target, 0, group, 0o2755);
    // The swap: a new link beside the old, renamed over it (atomic).
    let tmp = dir.join("..data_tmp");
    symlink(&stamp, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for key in files.keys() {
        let link = dir.join(key);
        if link.symlink_metadata().is_err() {
            symlink(format!("..data/{key}"), &link).unwrap();
        }
    }
    stamp
}

/// A fresh signing key, as `airlock keygen` makes it for the Secret.
fn signing_key() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("airlock.key");
    let out = crate::support::airlock()
        .arg("keygen")
        .arg("--out")
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&key).unwrap()
}

/// The kubelet's probe of the airlock container, from inside its network namespace.
fn probe(container: &Container, port: u16, path: &str) -> Option<String> {
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
    );
    let out = podman()
        .args(["exec", &container.name, "bash", "-c", &script])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200")).then_some(text)
}

#[test]
fn the_base_pod_runs_as_its_manifests_describe_it() {
    require_root();
    let image = image();
    let docs = documents("base");
    let tokens = "[[token]]\nname = \"alice\"\nrole = \"approver\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n";
    let pod = Pod::new(
        &docs,
        &[
            ("airlock-signing-key", "airlock.key", signing_key()),
            (
                "airlock-review-tokens",
                "review-tokens.toml",
                tokens.as_bytes().to_vec(),
            ),
        ],
    );
    // Without the copy, Airlock refuses the Secret's group-readable key: the init
    // container is what makes the key usable.
    let refused = pod.check(&image, "none");
    assert_eq!(
        refused.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("airlock.key"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    pod.run_init(&image, "none");
    let checked = pod.check(&image, "none");
    assert!(
        checked.status.success(),
        "airlock run --check with the base's configuration:\n{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    // Started as the pod starts it: the startup probe passes, the agent's view works.
    pod.seed_sqlite_target();
    let airlock = Container::named("base-pod");
    pod.start(&airlock, &image, "none");
    let port = container(&pod.spec, "airlock")["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap() as u16;
    let answer = crate::support::eventually_explained(
        || format!("the startup probe; log:\n{}", airlock.logs()),
        || probe(&airlock, port, "/healthz"),
    );
    assert!(answer.contains("\"healthy\":true"), "{answer}");
    let ready = crate::support::eventually_explained(
        || format!("the readiness probe; log:\n{}", airlock.logs()),
        || probe(&airlock, port, "/readyz"),
    );
    assert!(ready.contains("\"ready\":true"), "{ready}");

    // The agent writes an intent into its mount, and reads the outcome from its own.
    let exchange = pod.volume("exchange");
    let intent = insert_customer("pod-1", "pod-run", 1, "Ada");
    let tmp = exchange.join("intents/.pod-1.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&intent).unwrap()).unwrap();
    std::fs::rename(&tmp, exchange.join("intents/pod-1.json")).unwrap();
    let outcome = eventually("the outcome in results", || {
        let bytes = std::fs::read(exchange.join("results/pod-1.json")).ok()?;
        let value: Value = serde_json::from_slice(&bytes).ok()?;
        (value["final"] == true).then_some(value)
    });
    assert_eq!(outcome["state"], "applied", "{outcome}");
    // The state is where the manifests say, private, on the state volume.
    use std::os::unix::fs::MetadataExt;
    let state = std::fs::metadata(pod.volume("state").join("state")).unwrap();
    assert_eq!((state.uid(), state.mode() & 0o777), (AIRLOCK_UID, 0o700));
    let logs = airlock.logs();
    assert!(
        logs.lines().any(|l| l.starts_with('{')),
        "JSON logs expected:\n{logs}"
    );

    // A clean stop: SIGTERM, exit 0.
    run_ok(
        podman().args(["stop", "--time", "20", &airlock.name]),
        PODMAN,
    );
    assert_eq!(
        airlock.inspect("{{.State.ExitCode}}"),
        "0",
        "{}",
        airlock.logs()
    );
}

/// The PostgreSQL overlay's role, made by its own role.sql in a fresh database,
/// under a name of its own (roles are cluster-wide; tests run side by side).
#[test]
fn the_postgres_overlay_runs_as_the_least_privilege_role() {
    require_root();
    let image = image();
    let docs = documents("overlays/postgres");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(crate::pg::TestDb::create(crate::support::SCHEMA));
    let role = format!("airlock_k8s_{}", std::process::id());
    let sql = std::fs::read_to_string(root().join("k8s/overlays/postgres/role.sql"))
        .unwrap()
        .replace("airlock_app", &role)
        .replace("appdb", &format!("\"{}\"", db.name));
    let (cluster, database) = sql.split_once("\n\n").unwrap();
    runtime.block_on(async {
        crate::pg::connect(&crate::pg::server_url())
            .await
            .batch_execute(cluster)
            .await
            .unwrap();
        db.client.batch_execute(database).await.unwrap();
    });
    // The overlay's Secret, pointed at this server and database (its host, database
    // and TLS mode are the placeholders an operator replaces).
    let secret = find(&docs, "Secret", "airlock-target");
    use base64::Engine;
    let url = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(
                secret["data"]["url"]
                    .as_str()
                    .unwrap()
                    .split_whitespace()
                    .collect::<String>(),
            )
            .unwrap(),
    )
    .unwrap();
    assert!(
        url.starts_with("postgres://airlock_app:change-me@"),
        "{url}"
    );
    let server = crate::pg::server_url();
    let host = server
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let local = format!(
        "postgres://{role}:change-me@{host}/{}?sslmode=disable",
        db.name
    );
    let secret_name = secret["metadata"]["name"].as_str().unwrap().to_owned();
    let mut docs = docs.clone();
    for doc in &mut docs {
        if doc["metadata"]["name"] == secret_name.as_str() {
            doc["data"]["url"] = json!(base64::engine::general_purpose::STANDARD.encode(&local));
        }
    }
    let pod = Pod::new(
        &docs,
        &[("airlock-signing-key", "airlock.key", signing_key())],
    );
    pod.run_init(&image, "none");
    let checked = pod.check(&image, "host");
    let stderr = String::from_utf8_lossy(&checked.stderr).into_owned();
    runtime.block_on(async {
        drop(db);
        let admin = crate::pg::connect(&crate::pg::server_url()).await;
        let _ = admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
            .await;
    });
    assert!(
        checked.status.success(),
        "airlock run --check as {role}:\n{stderr}"
    );
    assert!(!stderr.contains("privileged"), "{stderr}");
}

#[test]
fn the_opa_overlay_decides_through_opa_with_its_token() {
    require_root();
    let image = image();
    let docs = documents("overlays/opa");
    let pod_spec = pod_spec(&docs);
    // Airlock no longer mounts the policy; OPA does, with the token required.
    let airlock_mounts = container(pod_spec, "airlock")["volumeMounts"].to_string();
    assert!(
        !airlock_mounts.contains("/etc/airlock/policy"),
        "{airlock_mounts}"
    );
    let opa = container(pod_spec, "opa");
    assert_eq!(opa["restartPolicy"], "Always");
    let args: Vec<&str> = opa["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for flag in [
        "--authentication=token",
        "--authorization=basic",
        "--addr=127.0.0.1:8181",
        "--ignore=.*",
    ] {
        assert!(args.contains(&flag), "{args:?}");
    }

    // OPA's own evaluator serves the policy ConfigMap, on the port the overlay's
    // Airlock asks, requiring the token of the overlay's Secret.
    let token = "opa-token-for-this-test";
    let policy_dir = tempfile::tempdir().unwrap();
    for (key, value) in find(&docs, "ConfigMap", "airlock-policy")["data"]
        .as_object()
        .unwrap()
    {
        std::fs::write(policy_dir.path().join(key), value.as_str().unwrap()).unwrap();
    }
    let server = crate::compose::OpaServer::start(policy_dir.path(), 8181, Some(token));
    let pod = Pod::new(
        &docs,
        &[
            ("airlock-signing-key", "airlock.key", signing_key()),
            ("airlock-opa-token", "token", token.as_bytes().to_vec()),
        ],
    );
    pod.run_init(&image, "none");
    pod.seed_sqlite_target();
    let airlock = Container::named("opa-pod");
    pod.start(&airlock, &image, "host");
    let exchange = pod.volume("exchange");
    let intent = intent(
        "erase-1",
        "opa-run",
        json!({"op": "delete", "table": "audit_log", "key": {"id": 1}}),
    );
    std::fs::write(
        exchange.join("intents/.erase-1.tmp"),
        serde_json::to_vec(&intent).unwrap(),
    )
    .unwrap();
    std::fs::rename(
        exchange.join("intents/.erase-1.tmp"),
        exchange.join("intents/erase-1.json"),
    )
    .unwrap();
    let outcome = crate::support::eventually_explained(
        || format!("OPA's decision; log:\n{}", airlock.logs()),
        || {
            let value: Value =
                serde_json::from_slice(&std::fs::read(exchange.join("results/erase-1.json")).ok()?)
                    .ok()?;
            (value["final"] == true).then_some(value)
        },
    );
    // OPA, serving the example policy, denies writes to the audit log.
    assert_eq!(outcome["state"], "denied", "{outcome}");
    let decided = outcome["decision"]["decision_id"]
        .as_str()
        .map(str::to_owned);
    let ids = server.decision_ids();
    run_ok(
        podman().args(["stop", "--time", "20", &airlock.name]),
        PODMAN,
    );
    assert_eq!(
        airlock.inspect("{{.State.ExitCode}}"),
        "0",
        "{}",
        airlock.logs()
    );
    assert!(
        decided.as_ref().is_some_and(|id| ids.contains(id)),
        "outcome {outcome}\nOPA decisions {ids:?}\nlog:\n{}",
        airlock.logs()
    );
}

#[test]
fn a_policy_edit_made_the_kubelets_way_is_picked_up() {
    let docs = documents("base");
    let data = find(&docs, "ConfigMap", "airlock-policy")["data"]
        .as_object()
        .unwrap()
        .clone();
    let files: BTreeMap<String, Vec<u8>> = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().as_bytes().to_vec()))
        .collect();
    let mut sb = Sandbox::new();
    let policy = sb.dir.path().join("policy");
    std::fs::create_dir(&policy).unwrap();
    let gid = rustix::process::getegid().as_raw();
    let first = atomic_writer(&policy, &files, 0o644, gid);
    sb.extra_args = vec!["--policy".into(), policy.display().to_string()];
    // The reload interval the base configures.
    let config = find(&docs, "ConfigMap", "airlock-config")["data"]["airlock.toml"]
        .as_str()
        .unwrap()
        .to_owned();
    let reload_ms = config
        .lines()
        .find_map(|l| l.strip_prefix("reload_ms = "))
        .unwrap()
        .to_owned();
    sb.env.push(("AIRLOCK_POLICY__RELOAD_MS".into(), reload_ms));
    sb.start();
    sb.submit_json(&insert_customer("before-edit", "cm-run", 1, "Ada"));
    assert_eq!(
        sb.outcome_where("before-edit", |o| o["final"] == true)["state"],
        "applied"
    );

    // `kubectl edit configmap airlock-policy`: customers joins the denied tables. The
    // kubelet writes a new timestamped directory, swaps ..data, removes the old one.
    let mut edited = files.clone();
    edited.insert(
        "data.json".into(),
        br#"{"airlock": {"deny_tables": ["audit_log", "customers"]}}"#.to_vec(),
    );
    atomic_writer(&policy, &edited, 0o644, gid);
    std::fs::remove_dir_all(policy.join(&first)).unwrap();
    eventually("the policy reload", || {
        sb.log().contains("policy reloaded").then_some(())
    });

    sb.submit_json(&insert_customer("after-edit", "cm-run", 2, "Grace"));
    let outcome = sb.outcome_where("after-edit", |o| o["final"] == true);
    assert_eq!(outcome["state"], "denied", "{outcome}");
    assert!(sb.stop().success());
}
