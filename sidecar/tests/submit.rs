//! `airlock submit` as an agent meets it: the real binary on temporary directories,
//! and for `--wait` a real `airlock run` daemon deciding and applying. Every exit
//! status `submit` documents ([`airlock::submit::EXIT_STATUSES`]) is produced here
//! at least once, and the README and `--help` are checked to list them all.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};
use support::{Sandbox, airlock, insert_customer, intent};

/// How long `--wait` may wait in tests that expect an answer: a failure then shows
/// as status 75 with the daemon's log, not as a hung test.
const WAIT: &str = "30";

/// `airlock submit` into `intents`, with none of the caller's `AIRLOCK_*` settings.
fn submit(intents: &Path) -> Command {
    let mut command = airlock();
    command
        .arg("submit")
        .arg("--intents")
        .arg(intents)
        .env_remove("AIRLOCK_CONFIG")
        .env_remove("AIRLOCK_INTENTS")
        .env_remove("AIRLOCK_RESULTS")
        .env_remove("AIRLOCK_LIMITS__MAX_OPS");
    command
}

/// Writes `intent` as a file in `dir` named `name`; returns its path.
fn draft(dir: &Path, name: &str, intent: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(intent).unwrap()).unwrap();
    path
}

/// The names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the exit status, showing the output (and the daemon's log) otherwise.
fn assert_status(out: &Output, status: i32, sb: Option<&Sandbox>) {
    assert_eq!(
        out.status.code(),
        Some(status),
        "stdout:\n{}\nstderr:\n{}\ndaemon log:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        sb.map(Sandbox::log).unwrap_or_default()
    );
}

/// The outcome documents `--wait` printed, one per line.
fn printed_outcomes(out: &Output) -> Vec<Value> {
    text(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("each stdout line is an outcome"))
        .collect()
}

fn audit_insert(id: &str) -> Value {
    intent(
        id,
        "run-s",
        json!({"op": "insert", "table": "audit_log",
               "values": {"id": 2, "at": "2026-11-29T06:00:00Z", "message": "gone"}}),
    )
}

#[test]
fn an_invalid_file_is_refused_with_the_daemons_problems_and_nothing_is_written() {
    let mut sb = Sandbox::new();
    let drafts = tempfile::tempdir().unwrap();
    let good = draft(
        drafts.path(),
        "good.json",
        &insert_customer("good-1", "r", 1, "Ada"),
    );
    let mut bad = insert_customer("bad-1", "r", 2, "Bob");
    bad["ops"][0]["table"] = json!("customers; DROP TABLE customers");
    bad.as_object_mut().unwrap().remove("reason");
    bad["surprise"] = json!(true);
    let bad_path = draft(drafts.path(), "bad.json", &bad);

    let out = submit(&sb.intents())
        .arg(&good)
        .arg(&bad_path)
        .output()
        .unwrap();
    assert_status(&out, 65, None);
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    // Not the valid file either, and no temporary file left behind.
    assert_eq!(names(&sb.intents()), Vec::<String>::new());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("nothing written") && stderr.contains("bad.json"),
        "{stderr}"
    );

    // The daemon, given the same file, refuses it with the same problems.
    sb.start();
    sb.submit("bad-1.json", &std::fs::read(&bad_path).unwrap());
    let outcome = sb.outcome_in("bad-1", "invalid");
    let problems = outcome["problems"].as_array().unwrap();
    assert!(problems.len() >= 3, "{outcome:#}");
    let label = bad_path.display().to_string();
    let printed: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with(&format!("{label}: ")))
        .collect();
    let expected: Vec<String> = problems
        .iter()
        .map(|p| {
            let problem: airlock_intent::Problem = serde_json::from_value(p.clone()).unwrap();
            format!("{label}: {problem}")
        })
        .collect();
    assert_eq!(printed, expected, "stderr:\n{stderr}");
    assert!(
        printed.iter().any(|l| l.contains(": /ops/0/table: ")),
        "{stderr}"
    );
    assert!(sb.stop().success());
}

#[test]
fn a_missing_input_file_exits_66_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let intents = dir.path().join("intents");
    std::fs::create_dir(&intents).unwrap();
    let good = draft(
        dir.path(),
        "good.json",
        &insert_customer("good-1", "r", 1, "Ada"),
    );
    let out = submit(&intents)
        .arg(&good)
        .arg(dir.path().join("nowhere.json"))
        .output()
        .unwrap();
    assert_status(&out, 66, None);
    assert!(
        text(&out.stderr).contains("nowhere.json"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(names(&intents), Vec::<String>::new());
}

#[test]
fn a_missing_intent_directory_exits_66_unless_create_makes_it() {
    let dir = tempfile::tempdir().unwrap();
    let intents = dir.path().join("shared").join("intents");
    let good = draft(
        dir.path(),
        "good.json",
        &insert_customer("good-1", "r", 1, "Ada"),
    );

    let out = submit(&intents).arg(&good).output().unwrap();
    assert_status(&out, 66, None);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--create"), "{stderr}");
    assert!(
        !dir.path().join("shared").exists(),
        "nothing is created without --create"
    );

    let out = submit(&intents)
        .arg(&good)
        .arg("--create")
        .output()
        .unwrap();
    assert_status(&out, 0, None);
    assert_eq!(
        text(&out.stdout).trim(),
        intents.join("good-1.json").display().to_string()
    );
    assert_eq!(names(&intents), vec!["good-1.json".to_owned()]);
    assert_eq!(
        std::fs::read(intents.join("good-1.json")).unwrap(),
        std::fs::read(&good).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&intents).unwrap().permissions().mode();
    assert_eq!(mode & 0o700, 0o700, "{mode:o}");
    assert_eq!(mode & 0o022, 0, "no one else may write it: {mode:o}");
}

#[test]
fn a_failed_write_exits_74_and_leaves_no_temporary_file() {
    // No file may grow past 0 bytes (RLIMIT_FSIZE, with SIGXFSZ ignored so the
    // write fails with EFBIG instead of killing the process): a write failure that
    // file modes cannot give when the tests run as root.
    let dir = tempfile::tempdir().unwrap();
    let intents = dir.path().join("intents");
    std::fs::create_dir(&intents).unwrap();
    let good = draft(
        dir.path(),
        "good.json",
        &insert_customer("good-1", "r", 1, "Ada"),
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 0; exec \"$0\" submit --intents \"$1\" \"$2\"")
        .arg(env!("CARGO_BIN_EXE_airlock"))
        .arg(&intents)
        .arg(&good)
        .env_remove("AIRLOCK_CONFIG")
        .output()
        .unwrap();
    assert_status(&out, 74, None);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot write it into"), "{stderr}");
    assert_eq!(names(&intents), Vec::<String>::new());
}

#[test]
fn standard_input_is_submitted_under_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let intents = dir.path().join("intents");
    std::fs::create_dir(&intents).unwrap();
    let bytes = serde_json::to_vec(&insert_customer("from-stdin", "r", 1, "Ada")).unwrap();
    let mut child = submit(&intents)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_status(&out, 0, None);
    assert_eq!(names(&intents), vec!["from-stdin.json".to_owned()]);
    assert_eq!(
        std::fs::read(intents.join("from-stdin.json")).unwrap(),
        bytes
    );

    // Invalid on standard input: named so in the problems.
    let mut child = submit(&intents)
        .arg("-")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"{\"id\": ").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_status(&out, 65, None);
    assert!(
        text(&out.stderr).starts_with("<stdin>: "),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(names(&intents), vec!["from-stdin.json".to_owned()]);
}

#[test]
fn the_operators_configuration_sets_the_limits_and_targets() {
    let dir = tempfile::tempdir().unwrap();
    let intents = dir.path().join("intents");
    std::fs::create_dir(&intents).unwrap();
    let mut two_ops = insert_customer("two-ops", "r", 1, "Ada");
    let second = two_ops["ops"][0].clone();
    two_ops["ops"].as_array_mut().unwrap().push(second);
    let two_ops = draft(dir.path(), "two.json", &two_ops);
    let mut elsewhere = insert_customer("elsewhere", "r", 1, "Ada");
    elsewhere["target"] = json!("warehouse");
    let elsewhere = draft(dir.path(), "elsewhere.json", &elsewhere);
    let config = dir.path().join("airlock.toml");
    std::fs::write(&config, "[limits]\nmax_ops = 1\n").unwrap();

    let out = submit(&intents)
        .arg(&two_ops)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_status(&out, 65, None);
    assert!(
        text(&out.stderr).contains(": /ops: "),
        "{}",
        text(&out.stderr)
    );
    // The same limit from the environment, as `airlock run` reads it.
    let out = submit(&intents)
        .arg(&two_ops)
        .env("AIRLOCK_LIMITS__MAX_OPS", "1")
        .output()
        .unwrap();
    assert_status(&out, 65, None);
    // A target the configuration lacks is refused as the daemon would; without the
    // configuration, the target names are not known here.
    let out = submit(&intents)
        .arg(&elsewhere)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_status(&out, 65, None);
    assert!(
        text(&out.stderr).contains(": /target: unknown target \"warehouse\""),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(names(&intents), Vec::<String>::new());
    let out = submit(&intents)
        .arg(&two_ops)
        .arg(&elsewhere)
        .output()
        .unwrap();
    assert_status(&out, 0, None);
    assert_eq!(names(&intents), vec!["elsewhere.json", "two-ops.json"]);

    // A configuration that cannot be used.
    std::fs::write(&config, "[limits]\nmax_opz = 1\n").unwrap();
    let out = submit(&intents)
        .arg(&two_ops)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_status(&out, 64, None);
    assert!(
        text(&out.stderr).contains("max_opz"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn wait_prints_the_applied_outcome_and_exits_0() {
    let mut sb = Sandbox::new();
    sb.start();
    let drafts = tempfile::tempdir().unwrap();
    let file = draft(
        drafts.path(),
        "ada.json",
        &insert_customer("wait-ok", "r", 1, "Ada"),
    );
    let out = submit(&sb.intents())
        .arg(&file)
        .args(["--wait", "--timeout", WAIT])
        .output()
        .unwrap();
    assert_status(&out, 0, Some(&sb));
    let outcomes = printed_outcomes(&out);
    assert_eq!(outcomes.len(), 1);
    assert_eq!(outcomes[0]["id"], "wait-ok");
    assert_eq!(outcomes[0]["state"], "applied");
    assert_eq!(outcomes[0]["final"], true);
    assert_eq!(
        sb.rows("SELECT id, name FROM customers"),
        vec![vec![json!(1), json!("Ada")]]
    );
    assert!(sb.stop().success());
}

#[test]
fn wait_on_several_files_exits_with_the_highest_status() {
    let mut sb = Sandbox::new();
    sb.start();
    let drafts = tempfile::tempdir().unwrap();
    let ok = draft(
        drafts.path(),
        "ok.json",
        &insert_customer("many-ok", "r1", 1, "Ada"),
    );
    let denied = draft(drafts.path(), "audit.json", &audit_insert("many-denied"));
    let out = submit(&sb.intents())
        .arg(&ok)
        .arg(&denied)
        .args(["--wait", "--timeout", WAIT])
        .output()
        .unwrap();
    assert_status(&out, 10, Some(&sb));
    let mut states: Vec<(String, String)> = printed_outcomes(&out)
        .iter()
        .map(|o| {
            (
                o["id"].as_str().unwrap().into(),
                o["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    states.sort();
    assert_eq!(
        states,
        vec![
            ("many-denied".to_owned(), "denied".to_owned()),
            ("many-ok".to_owned(), "applied".to_owned())
        ]
    );
    assert!(
        text(&out.stderr).contains("audit_log"),
        "{}",
        text(&out.stderr)
    );
    assert!(sb.stop().success());
}

#[test]
fn wait_times_out_on_a_review_with_75_then_sees_the_approval() {
    let mut sb = Sandbox::new();
    sb.start();
    let drafts = tempfile::tempdir().unwrap();
    let ada = draft(
        drafts.path(),
        "ada.json",
        &insert_customer("rev-ada", "r", 1, "Ada"),
    );
    let out = submit(&sb.intents())
        .arg(&ada)
        .args(["--wait", "--timeout", WAIT])
        .output()
        .unwrap();
    assert_status(&out, 0, Some(&sb));
    let delete = draft(
        drafts.path(),
        "delete.json",
        &intent(
            "rev-delete",
            "r",
            json!({"op": "delete", "table": "customers", "key": {"id": 1}}),
        ),
    );
    let out = submit(&sb.intents())
        .arg(&delete)
        .args(["--wait", "--timeout", "1"])
        .output()
        .unwrap();
    assert_status(&out, 75, Some(&sb));
    assert!(out.stdout.is_empty(), "only final outcomes are printed");
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        text(&out.stderr)
    );

    // Once approved, waiting on the same file again (a duplicate, which the daemon
    // ignores) finds the intent applied.
    sb.outcome_in("rev-delete", "awaiting_review");
    let approved = sb.cli(&["approve", "rev-delete"]);
    assert!(approved.status.success(), "{}", text(&approved.stderr));
    let out = submit(&sb.intents())
        .arg(&delete)
        .args(["--wait", "--timeout", WAIT])
        .output()
        .unwrap();
    assert_status(&out, 0, Some(&sb));
    assert_eq!(printed_outcomes(&out)[0]["id"], "rev-delete");
    assert!(sb.rows("SELECT id FROM customers").is_empty());
    assert!(sb.stop().success());
}

#[test]
fn wait_ends_on_refusals_by_the_daemon_with_65() {
    let mut sb = Sandbox::new();
    sb.start();
    let drafts = tempfile::tempdir().unwrap();
    // Valid here (no configuration says which targets exist); the daemon refuses it.
    let mut elsewhere = insert_customer("far-away", "r", 1, "Ada");
    elsewhere["target"] = json!("warehouse");
    let elsewhere = draft(drafts.path(), "elsewhere.json", &elsewhere);
    let out = submit(&sb.intents())
        .arg(&elsewhere)
        .args(["--wait", "--timeout", WAIT])
        .output()
        .unwrap();
    assert_status(&out, 65, Some(&sb));
    assert_eq!(printed_outcomes(&out)[0]["state"], "invalid");

    // An id already used by other bytes: refused under a conflict name, which ends
    // the wait (the id's own outcome, applied, is not this submission's).
    let first = draft(
        drafts.path(),
        "first.json",
        &insert_customer("taken", "r", 1, "Ada"),
    );
    let out = submit(&sb.intents())
        .arg(&first)
        .args(["--wait", "--timeout", WAIT])
        .output()
        .unwrap();
    assert_status(&out, 0, Some(&sb));
    let second = draft(
        drafts.path(),
        "second.json",
        &insert_customer("taken", "r", 2, "Bob"),
    );
    let out = submit(&sb.intents())
        .arg(&second)
        .args(["--wait", "--timeout", WAIT])
        .output()
        .unwrap();
    assert_status(&out, 65, Some(&sb));
    let outcome = &printed_outcomes(&out)[0];
    assert_eq!(outcome["state"], "invalid");
    assert_eq!(
        outcome["digest"],
        airlock::seal::digest(&std::fs::read(&second).unwrap())
    );
    assert_eq!(sb.rows("SELECT id FROM customers"), vec![vec![json!(1)]]);
    assert!(sb.stop().success());
}

/// Waits with `--timeout 1` on `file` (written to a fresh intent directory) after
/// placing `planted` files in its results directory, as no daemon runs.
fn wait_among(planted: &[(&str, &[u8])], file: &Path, dir: &Path) -> Output {
    let intents = dir.join("intents");
    let results = intents.join("results");
    std::fs::create_dir_all(&results).unwrap();
    for (name, bytes) in planted {
        std::fs::write(results.join(name), bytes).unwrap();
    }
    submit(&intents)
        .arg(file)
        .args(["--wait", "--timeout", "1"])
        .output()
        .unwrap()
}

#[test]
fn wait_reads_only_this_submissions_final_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let file = draft(dir.path(), "x.json", &insert_customer("x-1", "r", 1, "Ada"));
    let digest = airlock::seal::digest(&std::fs::read(&file).unwrap());
    let outcome = |digest: &str, state: &str| {
        serde_json::to_vec(&json!({"version": 1, "id": "x-1", "state": state,
                                   "final": true, "digest": digest}))
        .unwrap()
    };
    // Unparsable (another writer's half file), or the final outcome of other bytes
    // under the same id: not this intent's, so the wait runs out.
    let other = outcome("sha256:0000", "applied");
    for planted in [&b"{\"version\": 1, \"id\""[..], &other] {
        let dir = tempfile::tempdir().unwrap();
        let out = wait_among(&[("x-1.json", planted)], &file, dir.path());
        assert_status(&out, 75, None);
        assert!(out.stdout.is_empty());
    }
    // A state this airlock does not know (a newer daemon): status 1.
    let dir = tempfile::tempdir().unwrap();
    let newer = outcome(&digest, "teleported");
    let out = wait_among(&[("x-1.json", &newer)], &file, dir.path());
    assert_status(&out, 1, None);
}

#[test]
fn every_exit_status_is_documented_in_help_and_readme() {
    let out = airlock().args(["submit", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = text(&out.stdout);
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    for (code, _) in airlock::submit::EXIT_STATUSES {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{code}  "))),
            "--help lacks status {code}:\n{help}"
        );
        assert!(
            readme.contains(&format!("| `{code}` |")),
            "README.md's submit table lacks status {code}"
        );
    }
    // And `--timeout` alone is a usage error (status 2).
    let out = airlock()
        .args(["submit", "--timeout", "1", "x.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
