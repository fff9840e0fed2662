//! The command line as a newcomer meets it: `schema`, `demo`, `submit`, bad config.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use support::airlock;

#[test]
fn schema_prints_the_published_schema() {
    let out = airlock().arg("schema").output().unwrap();
    assert!(out.status.success());
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    assert_eq!(out.stdout, airlock_intent::SCHEMA.as_bytes());
}

#[test]
fn demo_shows_every_kind_of_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let out = airlock()
        .args(["demo", "--dir"])
        .arg(dir.path().join("demo"))
        .env("AIRLOCK_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for state in ["applied", "awaiting_review", "denied", "invalid"] {
        assert!(
            stdout.contains(state),
            "demo output lacks {state}:\n{stdout}"
        );
    }
    // The demo says where its tables come from: Airlock creates none.
    assert!(
        stdout.contains("the demo created its tables")
            && stdout.contains("from examples/sandbox/schema.sql"),
        "{stdout}"
    );
    // The cancelled order was approved and applied; Ada is gold.
    assert!(stdout.contains("✔ cancel-order-100"), "{stdout}");
    assert!(
        stdout.contains("1 | Ada Lovelace | ada@example.com | gold"),
        "{stdout}"
    );
}

#[test]
fn bad_configuration_exits_64_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("airlock.toml");
    std::fs::write(&config, "intents = \"x\"\n[limits]\nmax_opz = 3\n").unwrap();
    let out = airlock()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_opz"), "{stderr}");
}

#[test]
fn unsupported_target_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let out = airlock()
        .current_dir(dir.path())
        .args(["run", "--target", "mysql://localhost/db"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mysql"), "{stderr}");
}

#[test]
fn submit_writes_atomically_under_the_id() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("draft.json");
    let intent = support::insert_customer("order-7", "r1", 7, "Ada");
    std::fs::write(&source, serde_json::to_vec(&intent).unwrap()).unwrap();
    let out = airlock()
        .arg("submit")
        .arg(&source)
        .arg("--create")
        .arg("--intents")
        .arg(dir.path().join("intents"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let written = dir.path().join("intents/order-7.json");
    assert_eq!(
        std::fs::read(&written).unwrap(),
        std::fs::read(&source).unwrap()
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("intents"))
            .unwrap()
            .count(),
        1
    );
}

#[test]
fn logs_to_a_file_are_plain_text_with_plain_values() {
    // The daemon's standard error is the sandbox's log file, not a terminal: no
    // colour codes, whatever `NO_COLOR` says.
    let mut sb = support::Sandbox::new();
    sb.start();
    sb.submit_json(&support::insert_customer("plain-1", "r1", 1, "Ada"));
    sb.outcome_in("plain-1", "applied");
    // A table the target lacks: logged with its code.
    sb.submit_json(&support::intent(
        "plain-2",
        "r2",
        serde_json::json!({"op": "insert", "table": "nowhere", "values": {"id": 1}}),
    ));
    sb.outcome_in("plain-2", "failed");
    // A delete goes to review: logged with the policy's reasons.
    sb.submit_json(&support::intent(
        "plain-3",
        "r3",
        serde_json::json!({"op": "delete", "table": "customers", "key": {"id": 1}}),
    ));
    sb.outcome_in("plain-3", "awaiting_review");
    assert!(sb.stop().success());
    let log = sb.log();
    assert!(log.contains("intent queued"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{log}"
    );
    // Fields print as values: never Rust's debug form of an Option or a list.
    assert!(log.contains("code=AIRLOCK_UNKNOWN_TABLE"), "{log}");
    assert!(
        log.contains("reasons=deletes from customers need human review"),
        "{log}"
    );
    assert!(log.contains("targets=default"), "{log}");
    for debug in ["Some(", "None", "[\""] {
        assert!(!log.contains(debug), "{debug} in the log:\n{log}");
    }
}

/// How many times `needle` occurs in `haystack`.
fn occurrences(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn keygen_names_the_file_it_could_not_write_and_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no/such/dir/k");
    let run = airlock()
        .arg("keygen")
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    // The public key is written first: that is the file that failed.
    let public = format!("{}.pub", out.display());
    assert!(stderr.contains(&public), "{stderr}");
    assert_eq!(
        occurrences(&stderr, "No such file or directory"),
        1,
        "{stderr}"
    );
}

#[test]
fn an_error_chain_shows_each_cause_once() {
    // A state "directory" that is a file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state");
    std::fs::write(&file, b"").unwrap();
    let out = airlock()
        .current_dir(dir.path())
        .args(["run", "--state"])
        .arg(&file)
        .env("AIRLOCK_REVIEW__LISTEN", "off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(occurrences(&stderr, "is not a directory"), 1, "{stderr}");

    // A queue database that is not one: the SQLite error, once.
    let state = dir.path().join("real-state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::write(state.join("queue.db"), vec![b'x'; 4096]).unwrap();
    let out = airlock()
        .args(["status", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("queue.db"), "{stderr}");
    assert_eq!(occurrences(&stderr, "not a database"), 1, "{stderr}");
}

/// Every path under `dir`, recursively, sorted.
fn tree(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                pending.push(path.clone());
            }
            found.push(path);
        }
    }
    found.sort();
    found
}

/// `airlock run` in `dir` with nothing configured but `env` and `args`.
fn run_in(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    airlock()
        .current_dir(dir)
        .arg("run")
        .args(args)
        .env_remove("AIRLOCK_CONFIG")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn run_check_reports_each_thing_and_creates_nothing() {
    // A first run, in an empty directory: everything will be created.
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(
        dir.path(),
        &["--check"],
        &[
            ("AIRLOCK_REVIEW__LISTEN", "127.0.0.1:0"),
            ("AIRLOCK_TELEMETRY__METRICS_LISTEN", "127.0.0.1:0"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let subjects: Vec<&str> = lines
        .iter()
        .filter_map(|line| line.split("  ").next())
        .collect();
    assert_eq!(
        subjects,
        [
            "config",
            "intents",
            "results",
            "state",
            "key",
            "target default",
            "policy",
            "review",
            "metrics",
            "airlock run would start (this check created nothing)"
        ],
        "{stdout}"
    );
    for expected in [
        "environment AIRLOCK_REVIEW__LISTEN",
        "./intents: will be created",
        "./intents/results: will be created",
        "./.airlock: will be created (mode 0700)",
        "./.airlock/signing.key: will be created",
        "sqlite ./.airlock/target.db: will be created in the state directory",
        "Airlock never runs DDL",
        "built-in (examples/policies/airlock.rego), sha256:",
        "bound, then released",
    ] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(tree(dir.path()), Vec::<std::path::PathBuf>::new());

    // An installation whose directories and target exist: found, and still nothing
    // new (the state directory is not created).
    let sb = support::Sandbox::new();
    let before = tree(sb.dir.path());
    let out = sb.run_command().arg("--check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{}: exists", sb.intents().display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("sqlite {}: exists", sb.target().display())),
        "{stdout}"
    );
    assert_eq!(tree(sb.dir.path()), before);
}

#[test]
fn run_check_names_every_problem_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let policy = elsewhere.path().join("bad.rego");
    std::fs::write(&policy, "package airlock.authz\n\nallow if {\n").unwrap();
    // An address in use: this test holds it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let out = run_in(
        dir.path(),
        &[
            "--check",
            "--results",
            "./.airlock/results",
            "--policy",
            policy.to_str().unwrap(),
        ],
        &[
            ("AIRLOCK_REVIEW__LISTEN", listen.as_str()),
            ("AIRLOCK_KEY", "/nonexistent/airlock.key"),
            // Nobody listens on port 1.
            (
                "AIRLOCK_TARGETS__ORDERS",
                "postgres://airlock:secret@127.0.0.1:1/shop",
            ),
            ("AIRLOCK_TARGETS__NOTES", "sqlite://./no/such/dir/notes.db"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stdout}\n{stderr}");
    let failed = |subject: &str, problem: &str| {
        stderr.lines().any(|line| {
            line.strip_prefix(subject)
                .is_some_and(|rest| rest.trim_start().starts_with(&format!("FAILED: {problem}")))
        })
    };
    for (subject, problem) in [
        (
            "results",
            "results directory ./.airlock/results: is inside the state directory",
        ),
        ("key", "signing key /nonexistent/airlock.key does not exist"),
        (
            "target notes",
            "target \"notes\" (./no/such/dir/notes.db): directory ./no/such/dir does not exist",
        ),
        (
            "target orders",
            "target \"orders\": connecting: error connecting to server: Connection refused",
        ),
        ("policy", "policy: policy file bad.rego does not compile"),
        (
            "review",
            &format!("review.listen \"{listen}\": Address already in use"),
        ),
    ] {
        assert!(
            failed(subject, problem),
            "no {subject}: {problem:?} in:\n{stderr}"
        );
    }
    assert!(
        stderr.ends_with(
            "airlock run would not start: 6 problems above (this check created nothing)\n"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "{stderr}");
    // What passed is on standard output.
    assert!(stdout.contains("./intents: will be created"), "{stdout}");
    assert_eq!(tree(dir.path()), Vec::<std::path::PathBuf>::new());
}

/// A way to fail: its name, the flags and the environment.
type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>);

#[test]
fn a_failed_start_creates_nothing() {
    let elsewhere = tempfile::tempdir().unwrap();
    let policy = elsewhere.path().join("bad.rego");
    std::fs::write(&policy, "package airlock.authz\n\nallow if {\n").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let cases: [Case<'_>; 3] = [
        (
            "a policy that does not compile",
            vec!["--policy", policy.to_str().unwrap()],
            vec![("AIRLOCK_REVIEW__LISTEN", "off")],
        ),
        (
            "a review address in use",
            vec![],
            vec![("AIRLOCK_REVIEW__LISTEN", listen.as_str())],
        ),
        (
            "a SQLite target in a missing directory",
            vec!["--target", "sqlite://./data/app.db"],
            vec![("AIRLOCK_REVIEW__LISTEN", "off")],
        ),
    ];
    for (case, args, env) in cases {
        let dir = tempfile::tempdir().unwrap();
        let out = run_in(dir.path(), &args, &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{case}: {stderr}");
        assert!(
            stderr.contains("airlock: cannot start: "),
            "{case}: {stderr}"
        );
        assert_eq!(
            tree(dir.path()),
            Vec::<std::path::PathBuf>::new(),
            "{case} left files behind: {stderr}"
        );
    }
}

/// `airlock status ARGS` on the sandbox's state: its standard output.
fn status_of(sb: &support::Sandbox, args: &[&str]) -> String {
    let out = sb.cli(&[&["status"], args].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn status_aligns_its_columns_and_lists_refused_files() {
    let mut sb = support::Sandbox::new();
    sb.start();
    sb.submit_json(&support::insert_customer(
        "status-applied-intent",
        "r1",
        1,
        "Ada",
    ));
    sb.outcome_in("status-applied-intent", "applied");
    // A file that is not JSON, named to repaint a terminal and break a line.
    let hostile = "evil\u{1b}[31m\nINFO forged.json";
    sb.submit(hostile, b"not json");
    support::eventually("the refused file in airlock status", || {
        (!status_of(&sb, &["--in", "invalid", "--json"]).is_empty()).then_some(())
    });
    assert!(sb.stop().success());
    let status = |args: &[&str]| status_of(&sb, args);

    let table = status(&[]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two rows:\n{table}");
    assert!(!table.contains('\u{1b}'), "{table:?}");
    assert!(
        table.contains("evil\\u{1b}[31m\\nINFO forged.json"),
        "{table}"
    );
    // Every column starts where its heading does, on every line.
    let header = lines[0];
    let starts: Vec<usize> = ["received", "id", "run", "state", "target", "file"]
        .iter()
        .map(|name| {
            header
                .match_indices(&format!("  {name}"))
                .next()
                .map(|(at, _)| header[..at].chars().count() + 2)
                .unwrap_or_else(|| panic!("no {name} heading: {header}"))
        })
        .collect();
    for line in &lines {
        let chars: Vec<char> = line.chars().collect();
        for &start in &starts {
            assert!(
                chars.get(start - 1) == Some(&' ') && chars.get(start).is_some_and(|c| *c != ' '),
                "column at {start} misaligned:\n{table}"
            );
        }
    }
    let applied = lines
        .iter()
        .find(|l| l.contains("status-applied-intent"))
        .unwrap();
    assert!(
        applied.contains(" applied ") && applied.contains(" default "),
        "{applied}"
    );
    let refused = lines.iter().find(|l| l.contains("evil")).unwrap();
    assert!(refused.contains(" invalid "), "{refused}");

    // Filters: refused files are state `invalid`.
    let invalid = status(&["--in", "invalid"]);
    assert_eq!(invalid.lines().count(), 2, "{invalid}");
    assert!(invalid.contains("evil"), "{invalid}");
    let applied = status(&["--in", "applied"]);
    assert_eq!(applied.lines().count(), 2, "{applied}");
    assert!(applied.contains("status-applied-intent"), "{applied}");
    // JSON lines: the outcome documents the agent reads, refused files included.
    let json: Vec<serde_json::Value> = status(&["--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let states: Vec<&str> = json.iter().map(|o| o["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["applied", "invalid"], "{json:?}");
    assert_eq!(json[1]["file"], hostile);
    // An unknown state names the ones there are.
    let out = sb.cli(&["status", "--in", "done"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("awaiting_review") && stderr.contains("invalid"),
        "{stderr}"
    );
}

#[test]
fn help_says_which_targets_and_every_default() {
    for command in ["run", "replay", "approve", "undo"] {
        let out = airlock().args([command, "--help"]).output().unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        // The option's own entry: the last mention (the usage line may name it).
        let target = help
            .rsplit("--target <TARGET>")
            .next()
            .filter(|_| help.contains("--target <TARGET>"))
            .unwrap_or_else(|| panic!("{command} has no --target:\n{help}"));
        assert!(
            target.contains("sqlite://PATH or postgres://USER@HOST/DB?OPTIONS"),
            "{command}:\n{help}"
        );
        // Every option that takes a value says its default, unless it is required
        // (shown in the usage line).
        let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
        let options = help.split("Options:").nth(1).unwrap();
        let mut blocks: Vec<String> = Vec::new();
        for line in options.lines() {
            if line.trim_start().starts_with('-') {
                blocks.push(line.to_owned());
            } else if let Some(block) = blocks.last_mut() {
                block.push_str(line);
            }
        }
        for block in blocks {
            let head = block
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ");
            if !head.contains('<') || usage.contains(&head) {
                continue;
            }
            assert!(
                block.contains("default"),
                "{command} {head} does not say its default:\n{help}"
            );
        }
    }
}
