//! Attacks on the files Airlock writes: links planted in the results directory, the
//! results directory swapped for a link (to the state directory, to the policy
//! directory, to itself), and a state directory others could change. Each test
//! plays the attack against the real binary and checks that nothing outside the
//! results directory changed, that the daemon still runs and processes intents, and
//! that held outcomes arrive once the results directory is real again.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::{self, Sandbox, eventually, eventually_explained, insert_customer};

/// Allows everything, so every intent applies without review.
const ALLOW_ALL: &str = "package airlock.authz\n\nallow := true\n";

/// The warning the daemon logs (once) when it holds outcomes back.
const HELD: &str = "results directory is unusable";

/// Files whose bytes the daemon legitimately changes: the queue, the targets, the
/// log, the endpoint address, and the agent's own directories.
fn changes_legitimately(sandbox: &Sandbox, path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    path.starts_with(sandbox.intents())
        || path.starts_with(sandbox.dir.path().join("results.old"))
        || name.starts_with("queue.db")
        || name.starts_with("target.db")
        || name == "airlock.log"
        || name == "review-endpoint"
}

/// Every other file under the sandbox, by path, with its bytes; links as their
/// target.
fn snapshot(sandbox: &Sandbox) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                walk(&path, out);
            }
            out.push(path);
        }
    }
    let mut paths = Vec::new();
    walk(sandbox.dir.path(), &mut paths);
    paths
        .into_iter()
        .filter(|p| !changes_legitimately(sandbox, p))
        .filter_map(|path| {
            let meta = std::fs::symlink_metadata(&path).ok()?;
            let bytes = if meta.file_type().is_symlink() {
                std::fs::read_link(&path)
                    .ok()?
                    .into_os_string()
                    .into_encoded_bytes()
            } else if meta.is_file() {
                std::fs::read(&path).ok()?
            } else {
                b"(directory)".to_vec()
            };
            Some((path, bytes))
        })
        .collect()
}

/// The SQLite files are still SQLite databases, not outcome documents.
fn assert_databases_intact(sandbox: &Sandbox) {
    for db in [sandbox.state().join("queue.db"), sandbox.target()] {
        let bytes = std::fs::read(&db).unwrap();
        assert!(
            bytes.starts_with(b"SQLite format 3\0"),
            "{} was overwritten: {:?}",
            db.display(),
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        );
        let db =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        let check: String = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
}

fn assert_running(sandbox: &mut Sandbox) {
    let child = sandbox.child.as_mut().expect("started");
    if let Some(status) = child.try_wait().unwrap() {
        panic!("the daemon exited ({status}); log:\n{}", sandbox.log());
    }
}

/// A sandbox deciding with [`ALLOW_ALL`] from `<sandbox>/policies`, running, with
/// one intent applied (so the results directory is open and written).
fn running_sandbox() -> Sandbox {
    let mut sandbox = Sandbox::new();
    sandbox.use_policy("allow.rego", ALLOW_ALL);
    sandbox.start();
    sandbox.submit_json(&insert_customer("first", "r1", 1, "Ada"));
    sandbox.outcome_in("first", "applied");
    sandbox
}

fn applied(sandbox: &Sandbox, customer: i64) {
    eventually_explained(
        || format!("customer {customer} to be applied; log:\n{}", sandbox.log()),
        || {
            (!sandbox
                .rows(&format!("SELECT id FROM customers WHERE id = {customer}"))
                .is_empty())
            .then_some(())
        },
    );
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn planted_temporary_links_are_not_followed() {
    let mut sandbox = running_sandbox();
    let pid = sandbox.child.as_ref().unwrap().id();
    let results = sandbox.results();
    let victims = [
        sandbox.state().join("queue.db"),
        sandbox.target(),
        sandbox.dir.path().join("policies/allow.rego"),
        sandbox.state().join("signing.key"),
    ];
    // Every temporary name the agent can guess (the old `.<name>.<pid>.tmp`, and
    // variants), and the final name, lead to Airlock's files.
    for (i, id) in ["second", "third", "fourth", "fifth"].iter().enumerate() {
        let victim = &victims[i];
        for name in [
            format!(".{id}.json.{pid}.tmp"),
            format!(".{id}.json.tmp"),
            format!("{id}.json.tmp"),
        ] {
            symlink(victim, results.join(name)).unwrap();
        }
    }
    symlink(&victims[2], results.join("second.json")).unwrap();
    let before = snapshot(&sandbox);

    for (i, id) in ["second", "third", "fourth", "fifth"].iter().enumerate() {
        sandbox.submit_json(&insert_customer(id, "r1", 2 + i as i64, "Eve"));
    }
    for id in ["second", "third", "fourth", "fifth"] {
        sandbox.outcome_in(id, "applied");
        let meta = std::fs::symlink_metadata(results.join(format!("{id}.json"))).unwrap();
        assert!(meta.is_file(), "{id}.json is a regular file");
    }
    let after = snapshot(&sandbox);
    // The planted links are where the agent left them, and lead where they led.
    assert_eq!(
        before.keys().filter(|p| !p.starts_with(&results)).count(),
        after.keys().filter(|p| !p.starts_with(&results)).count()
    );
    for (path, bytes) in &before {
        if path.starts_with(&results) && path.ends_with("second.json") {
            continue; // The link under the final name was replaced, as it should be.
        }
        assert_eq!(after.get(path), Some(bytes), "{} changed", path.display());
    }
    assert_databases_intact(&sandbox);
    assert_running(&mut sandbox);
}

/// The results directory is swapped for a link to `to` while the daemon runs:
/// nothing is written there, intents are still applied, and the held outcome is
/// written once the results directory is a real directory again.
fn swap_results_for_link(sandbox: &mut Sandbox, to: &Path, id: &str) {
    let results = sandbox.results();
    std::fs::rename(&results, sandbox.dir.path().join("results.old")).unwrap();
    symlink(to, &results).unwrap();
    let before = snapshot(sandbox);
    let listed = |dir: &Path| {
        // SQLite's `-wal` and `-shm` come and go with connections (this test's too).
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.ends_with("-wal") && !n.ends_with("-shm"))
            .collect();
        names.sort();
        names
    };
    let entries = listed(to);

    sandbox.submit_json(&insert_customer(id, "r1", 7, "Mallory"));
    applied(sandbox, 7);
    eventually_explained(
        || format!("the daemon to hold outcomes back; log:\n{}", sandbox.log()),
        || sandbox.log().contains(HELD).then_some(()),
    );
    // Another intent: still applied, and the warning is not repeated per write.
    sandbox.submit_json(&insert_customer(&format!("{id}-2"), "r1", 8, "Trudy"));
    applied(sandbox, 8);
    assert_eq!(
        count(&sandbox.log(), HELD),
        1,
        "one warning, not one per write"
    );

    assert_eq!(
        listed(to),
        entries,
        "{} gained or lost entries",
        to.display()
    );
    assert_eq!(
        snapshot(sandbox),
        before,
        "files outside the results changed"
    );
    assert_databases_intact(sandbox);
    assert_running(sandbox);

    // A real directory again: the held outcomes arrive.
    std::fs::remove_file(&results).unwrap();
    recreate_results(&results);
    sandbox.outcome_in(id, "applied");
    sandbox.outcome_in(&format!("{id}-2"), "applied");
    assert_eq!(listed(to), entries, "log:\n{}", sandbox.log());
    assert_running(sandbox);
}

#[test]
fn results_swapped_for_a_link_to_the_state_directory() {
    let mut sandbox = running_sandbox();
    let state = sandbox.state();
    swap_results_for_link(&mut sandbox, &state, "into-state");
}

#[test]
fn results_swapped_for_a_link_to_the_policy_directory() {
    let mut sandbox = running_sandbox();
    let policies = sandbox.dir.path().join("policies");
    // `data.json` in a policy directory is policy data: the agent would write it.
    swap_results_for_link(&mut sandbox, &policies, "data");
}

#[test]
fn results_link_to_its_own_directory_does_not_loop() {
    let mut sandbox = running_sandbox();
    let results = sandbox.results();
    std::fs::rename(&results, sandbox.dir.path().join("results.old")).unwrap();
    // results -> . : the intent directory, which intake reads.
    symlink(".", &results).unwrap();
    let before = snapshot(&sandbox);

    sandbox.submit_json(&insert_customer("looped", "r1", 9, "Oscar"));
    applied(&sandbox, 9);
    eventually_explained(
        || format!("the daemon to hold outcomes back; log:\n{}", sandbox.log()),
        || sandbox.log().contains(HELD).then_some(()),
    );
    sandbox.submit_json(&insert_customer("looped-2", "r1", 10, "Peggy"));
    applied(&sandbox, 10);
    // Intake has taken both intents: an outcome written through the loop would be
    // back in the intent directory as a new (refused) intent, and so on.
    eventually("the intent directory to hold only results", || {
        let names: Vec<_> = std::fs::read_dir(sandbox.intents())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        (names == ["results"]).then_some(())
    });
    let queue = rusqlite::Connection::open(sandbox.state().join("queue.db")).unwrap();
    let refused: i64 = queue
        .query_row("SELECT count(*) FROM refused", [], |r| r.get(0))
        .unwrap();
    assert_eq!(refused, 0, "an outcome came back as an intent");
    assert_eq!(
        count(&sandbox.log(), HELD),
        1,
        "one warning, not one per write"
    );
    assert_eq!(snapshot(&sandbox), before);
    assert_databases_intact(&sandbox);
    assert_running(&mut sandbox);

    std::fs::remove_file(&results).unwrap();
    recreate_results(&results);
    sandbox.outcome_in("looped", "applied");
    sandbox.outcome_in("looped-2", "applied");
    assert_running(&mut sandbox);
}

#[test]
fn a_directory_under_an_outcome_name_does_not_wedge_the_daemon() {
    let mut sandbox = running_sandbox();
    let blocked = sandbox.results().join("blocked.json");
    std::fs::create_dir_all(blocked.join("full")).unwrap();
    // An empty directory under the name is replaced by the outcome.
    std::fs::create_dir(sandbox.results().join("emptied.json")).unwrap();
    sandbox.submit_json(&insert_customer("blocked", "r1", 11, "Wendy"));
    sandbox.submit_json(&insert_customer("emptied", "r1", 13, "Wanda"));
    applied(&sandbox, 11);
    sandbox.outcome_in("emptied", "applied");
    // Later outcomes still arrive: the blocked one did not hold the pipeline.
    sandbox.submit_json(&insert_customer("after", "r1", 12, "Walter"));
    sandbox.outcome_in("after", "applied");
    assert!(
        blocked.join("full").is_dir(),
        "the agent's directory is left alone"
    );
    assert_running(&mut sandbox);
}

/// Runs `airlock run` on the sandbox with `extra` arguments and returns its output;
/// fails if it is still running at the deadline (it should refuse to start).
fn run_refused(sandbox: &Sandbox, extra: &[&str]) -> Output {
    let mut child = sandbox
        .run_command()
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + support::DEADLINE;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "airlock run did not refuse to start:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn assert_refused(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "stderr:\n{stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
}

#[test]
fn start_refuses_a_results_directory_in_the_state_or_a_link() {
    let sandbox = Sandbox::new();
    let state = sandbox.state().display().to_string();
    let out = run_refused(&sandbox, &["--results", &format!("{state}/results")]);
    assert_refused(&out, "inside the state directory");
    let out = run_refused(&sandbox, &["--results", &state]);
    assert_refused(&out, "inside the state directory");
    let out = run_refused(
        &sandbox,
        &["--results", &sandbox.dir.path().display().to_string()],
    );
    assert_refused(&out, "contains the state directory");

    // A link in the agent's directory, to the state or anywhere else.
    symlink(sandbox.state(), sandbox.results()).unwrap();
    let out = run_refused(&sandbox, &[]);
    assert_refused(&out, "symbolic link");
    std::fs::remove_file(sandbox.results()).unwrap();
    let elsewhere = sandbox.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    symlink(&elsewhere, sandbox.results()).unwrap();
    let out = run_refused(&sandbox, &[]);
    assert_refused(&out, "symbolic link");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    // A dangling link where the directory would be created is not followed.
    std::fs::remove_file(sandbox.results()).unwrap();
    symlink(sandbox.dir.path().join("made"), sandbox.results()).unwrap();
    let out = run_refused(&sandbox, &[]);
    assert_refused(&out, "symbolic link");
    assert!(!support::path_exists(&sandbox.dir.path().join("made")));
}

#[test]
fn an_open_or_foreign_state_directory_is_refused() {
    let sandbox = Sandbox::new();
    std::fs::create_dir(sandbox.state()).unwrap();
    std::fs::set_permissions(sandbox.state(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run_refused(&sandbox, &[]);
    assert_refused(&out, "writable by group or others (mode 0777)");
    assert!(
        !support::path_exists(&sandbox.state().join("queue.db")),
        "nothing created in a refused state directory"
    );
    // Every command that opens the state directory refuses it.
    let out = sandbox.cli(&["token", "add", "--name", "a", "--role", "viewer"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("writable by group or others"));
    assert!(!support::path_exists(
        &sandbox.state().join("review-tokens.toml")
    ));

    std::fs::set_permissions(sandbox.state(), std::fs::Permissions::from_mode(0o770)).unwrap();
    let out = run_refused(&sandbox, &[]);
    assert_refused(&out, "(mode 0770)");

    // Owned by another user: only root can set that up.
    if rustix::process::geteuid().is_root() {
        std::fs::set_permissions(sandbox.state(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(sandbox.state(), Some(65_534), None).unwrap();
        let out = run_refused(&sandbox, &[]);
        assert_refused(&out, "is owned by uid 65534");
    }
}

/// `sh -c 'umask 000; exec airlock …'`: the modes must not come from the umask.
fn airlock_without_umask() -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("umask 000; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_airlock"));
    command
}

#[test]
fn every_state_file_is_private_whichever_command_creates_it() {
    let mut sandbox = Sandbox::new();
    let state = sandbox.state();
    // `token add` before the first `run` creates the state directory.
    let out = airlock_without_umask()
        .args([
            "token", "add", "--name", "alice", "--role", "approver", "--state",
        ])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The default target kept in the state directory.
    let target = state.join("target.db");
    let log = std::fs::File::create(sandbox.dir.path().join("airlock.log")).unwrap();
    let child = airlock_without_umask()
        .arg("run")
        .arg("--intents")
        .arg(sandbox.intents())
        .arg("--state")
        .arg(&state)
        .arg("--target")
        .arg(format!("sqlite://{}", target.display()))
        .env("AIRLOCK_LOG", "debug")
        .env("AIRLOCK_INTAKE__RESCAN_MS", "500")
        .env("AIRLOCK_REVIEW__LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    sandbox.child = Some(child);
    sandbox.review_url();
    // An intent goes through the queue (its table is missing in this target, so it
    // cannot apply; what matters is that the queue and its WAL were written).
    sandbox.submit_json(&insert_customer("mode", "r1", 1, "Ada"));
    sandbox.outcome_where("mode", |_| true);

    let mode = |path: &Path| std::fs::symlink_metadata(path).unwrap().mode() & 0o7777;
    assert_eq!(mode(&state), 0o700, "the state directory");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&state).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(mode(&path), 0o600, "{name} is mode {:04o}", mode(&path));
        names.push(name);
    }
    for expected in [
        "queue.db",
        "queue.db-wal",
        "queue.db-shm",
        "signing.key",
        "signing.key.pub",
        "review-tokens.toml",
        "review-endpoint",
        "target.db",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    assert_running(&mut sandbox);
}

/// Makes `results` a real directory again after a swap. The daemon may get there
/// first: it re-creates a missing results directory on its next held write.
fn recreate_results(results: &std::path::Path) {
    match std::fs::create_dir(results) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(results).unwrap();
            assert!(meta.is_dir(), "{} is not a directory", results.display());
        }
        Err(error) => panic!("cannot create {}: {error}", results.display()),
    }
}
