//! Attacks on intake: files whose size, type or name the agent changes under the
//! daemon, names intake could not claim or read, junk meant to fill the state
//! directory, and an id reused to overwrite another intent's outcome.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::{
    DEADLINE, Sandbox, eventually, eventually_explained, insert_customer, path_exists,
};

/// A file the agent keeps open, and its real size.
type Toggled = (Arc<File>, u64);

/// 1 TiB: a size no buffer may follow.
const TIB: u64 = 1 << 40;

/// Panics unless the daemon is still running.
fn assert_running(sandbox: &mut Sandbox) {
    let child = sandbox.child.as_mut().expect("started");
    let status = child.try_wait().expect("try_wait");
    assert!(
        status.is_none(),
        "the daemon exited ({status:?}); log:\n{}",
        sandbox.log()
    );
}

/// Submits one more intent and waits until it is applied: the daemon still takes
/// and applies work.
fn still_works(sandbox: &mut Sandbox, id: &str, customer: i64) {
    sandbox.submit_json(&insert_customer(id, "after", customer, id));
    sandbox.outcome_in(id, "applied");
    assert_running(sandbox);
}

/// The first 16 hex digits of the SHA-256 of `bytes`.
fn hex16(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))[..16].to_owned()
}

fn queue_db(sandbox: &Sandbox) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(sandbox.state().join("queue.db")).expect("queue.db");
    db.busy_timeout(Duration::from_secs(10)).expect("timeout");
    db
}

/// How many times the queue holds `id` (as an intent) or `file` (as a refusal).
fn times_held(db: &rusqlite::Connection, id: &str, file: &str) -> i64 {
    db.query_row(
        "SELECT (SELECT COUNT(*) FROM intents WHERE id = ?1) \
              + (SELECT COUNT(*) FROM refused WHERE file = ?2)",
        [id, file],
        |row| row.get(0),
    )
    .expect("count")
}

/// The outcome files present, by name.
fn outcomes(sandbox: &Sandbox) -> BTreeMap<String, Value> {
    fs::read_dir(sandbox.results())
        .map(|entries| {
            entries
                .filter_map(|e| {
                    let e = e.ok()?;
                    let name = e.file_name().into_string().ok()?;
                    let value = serde_json::from_slice(&fs::read(e.path()).ok()?).ok()?;
                    Some((name, value))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Entries of the intent directory other than the results directory.
fn left_in_intents(sandbox: &Sandbox) -> Vec<OsString> {
    fs::read_dir(sandbox.intents())
        .expect("intents")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n != "results")
        .collect()
}

/// Writes `bytes` to `name` the protocol's way, keeping the file open so its size
/// can be changed after intake has claimed (renamed) it.
fn submit_open(sandbox: &Sandbox, name: &str, bytes: &[u8]) -> File {
    let tmp = sandbox.intents().join(format!(".{name}.tmp"));
    let mut file = File::create(&tmp).expect("create");
    file.write_all(bytes).expect("write");
    fs::rename(&tmp, sandbox.intents().join(name)).expect("rename");
    file
}

/// Files whose size the agent toggles between their real size and 1 TiB
/// (`ftruncate` on a handle it keeps, so before, during and after the claim) for
/// 5 s, new ones arriving all the time: the daemon stays up, and each file ends
/// exactly once, as an intent or as a refusal, with one outcome.
#[test]
fn files_toggled_to_a_tebibyte_never_take_the_daemon_down() {
    let mut sandbox = Sandbox::new();
    sandbox.start();
    let stop = Arc::new(AtomicBool::new(false));
    let live: Arc<Mutex<Vec<Toggled>>> = Arc::default();
    let toggler = std::thread::spawn({
        let stop = stop.clone();
        let live = live.clone();
        move || {
            let mut toggles = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // A snapshot, so the lock is not held while toggling.
                let files = live.lock().expect("lock").clone();
                for (file, len) in &files {
                    file.set_len(TIB).expect("grow");
                    file.set_len(*len).expect("shrink");
                    toggles += 1;
                }
            }
            toggles
        }
    });
    let start = Instant::now();
    let mut submitted = 0;
    while start.elapsed() < Duration::from_secs(5) && submitted < 1000 {
        let mut names = Vec::new();
        for _ in 0..4 {
            let id = format!("t{submitted}");
            names.push(sandbox.intents().join(format!("{id}.json")));
            let bytes = serde_json::to_vec(&insert_customer(&id, "toggle", 1000 + submitted, &id))
                .expect("json");
            let len = bytes.len() as u64;
            let file = submit_open(&sandbox, &format!("{id}.json"), &bytes);
            let mut files = live.lock().expect("lock");
            files.push((Arc::new(file), len));
            // The newest 32 keep toggling; older ones are long claimed.
            let excess = files.len().saturating_sub(32);
            files.drain(..excess);
            submitted += 1;
        }
        // The next files arrive once these are claimed (their sizes still toggling).
        eventually_explained(
            || format!("the daemon to claim the files; log:\n{}", sandbox.log()),
            || names.iter().all(|n| !path_exists(n)).then_some(()),
        );
    }
    stop.store(true, Ordering::Relaxed);
    let toggles = toggler.join().expect("toggler");
    assert!(toggles > 1000, "only {toggles} toggles");
    live.lock().expect("lock").clear();
    assert_running(&mut sandbox);
    still_works(&mut sandbox, "after-toggles", 1);

    // Every file ended exactly once: one outcome (`t<i>.json` names both the intent
    // and a refusal of the file), one row in the queue, nothing left behind.
    let expected: Vec<String> = (0..submitted).map(|i| format!("t{i}")).collect();
    let found = eventually_explained(
        || {
            format!(
                "an outcome for each of {submitted} files; log:\n{}",
                sandbox.log()
            )
        },
        || {
            let found = outcomes(&sandbox);
            expected
                .iter()
                .all(|id| found.contains_key(&format!("{id}.json")))
                .then_some(found)
        },
    );
    let db = queue_db(&sandbox);
    let mut refused = 0;
    for id in &expected {
        let outcome = &found[&format!("{id}.json")];
        assert_eq!(outcome["file"], format!("{id}.json"), "{outcome}");
        if outcome["state"] == "invalid" {
            refused += 1;
        } else {
            assert_eq!(outcome["id"], id.as_str(), "{outcome}");
        }
        assert_eq!(times_held(&db, id, &format!("{id}.json")), 1, "{id}");
    }
    assert_eq!(left_in_intents(&sandbox), Vec::<OsString>::new());
    eprintln!("{submitted} files, {toggles} toggles, {refused} refused");
    assert_running(&mut sandbox);
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(status.success(), "mkfifo {}", path.display());
}

/// A FIFO dropped into the directory, and FIFOs renamed over files intake has just
/// claimed (the agent can see the claim names): opening one must not wait for a
/// writer, so intake never hangs. Each file still ends exactly once.
#[test]
fn fifos_dropped_or_swapped_in_do_not_hang_intake() {
    let mut sandbox = Sandbox::new();
    sandbox.start();
    mkfifo(&sandbox.intents().join("pipe.json"));
    let outcome = sandbox.outcome_in("pipe", "invalid");
    let reasons = outcome["reasons"].to_string();
    assert!(reasons.contains("pipe.json is a FIFO"), "{outcome}");
    still_works(&mut sandbox, "after-fifo", 1);

    // Swap FIFOs over claimed files for a while, in rounds of many files at once.
    let fifos = sandbox.dir.path().join("fifos");
    fs::create_dir(&fifos).expect("fifos dir");
    let start = Instant::now();
    let (mut submitted, mut swapped, mut made) = (0, 0, 0);
    let mut pool = Vec::new();
    while start.elapsed() < Duration::from_secs(3) && submitted < 400 {
        while pool.len() < 20 {
            let path = fifos.join(format!("f{made}"));
            mkfifo(&path);
            pool.push(path);
            made += 1;
        }
        let mut names = Vec::new();
        for _ in 0..20 {
            let id = format!("s{submitted}");
            sandbox.submit_json(&insert_customer(&id, "swap", 1000 + submitted, &id));
            names.push(format!("{id}.json"));
            submitted += 1;
        }
        // Watch the directory as fast as the agent can, and put a FIFO in the place
        // of every claim seen, until the daemon is done with this round.
        let round = Instant::now();
        loop {
            let mut busy = false;
            for entry in fs::read_dir(sandbox.intents()).expect("intents") {
                let entry = entry.expect("entry");
                let name = entry.file_name().to_string_lossy().into_owned();
                if names.contains(&name) {
                    busy = true;
                } else if name.starts_with(".airlock-claim.") {
                    busy = true;
                    // Exchange, not rename: a claim the daemon has already removed
                    // must not come back as a FIFO of the same name.
                    if let Some(fifo) = pool.pop() {
                        let exchanged = rustix::fs::renameat_with(
                            rustix::fs::CWD,
                            &fifo,
                            rustix::fs::CWD,
                            entry.path(),
                            rustix::fs::RenameFlags::EXCHANGE,
                        );
                        if exchanged.is_ok() {
                            swapped += 1;
                        } else {
                            pool.push(fifo);
                        }
                    }
                }
            }
            if !busy {
                break;
            }
            assert!(
                round.elapsed() < DEADLINE,
                "intake is stuck; log:\n{}",
                sandbox.log()
            );
        }
    }
    eprintln!("{submitted} files, {swapped} FIFOs swapped in");
    still_works(&mut sandbox, "after-swaps", 2);
    let expected: Vec<String> = (0..submitted).map(|i| format!("s{i}")).collect();
    let found = eventually("an outcome for each swapped file", || {
        let found = outcomes(&sandbox);
        expected
            .iter()
            .all(|id| found.contains_key(&format!("{id}.json")))
            .then_some(found)
    });
    let db = queue_db(&sandbox);
    for id in &expected {
        let outcome = &found[&format!("{id}.json")];
        if outcome["state"] == "invalid" {
            assert!(outcome["reasons"].to_string().contains("FIFO"), "{outcome}");
        }
        assert_eq!(times_held(&db, id, &format!("{id}.json")), 1, "{id}");
    }
    assert_running(&mut sandbox);
}

/// A 250-byte name is claimed and processed (the old claim name, prefix plus the
/// name, was too long to rename to); a refused one gets an outcome named by the
/// digest of its name. A name that is not UTF-8 is refused once: one outcome, one
/// warning, however many scans follow.
#[test]
fn long_and_non_utf8_names_are_handled_once() {
    let mut sandbox = Sandbox::new();
    sandbox.start();
    let long = |c: &str| format!("{}.json", c.repeat(245));
    let valid = serde_json::to_vec(&insert_customer("long-name", "names", 1, "long")).unwrap();
    sandbox.submit(&long("v"), &valid);
    let outcome = sandbox.outcome_in("long-name", "applied");
    assert_eq!(outcome["file"], long("v"));

    sandbox.submit(&long("j"), b"not json");
    let digest_named = format!("name-{}", hex16(long("j").as_bytes()));
    let outcome = sandbox.outcome_in(&digest_named, "invalid");
    assert_eq!(outcome["file"], long("j"));

    let raw = b"odd-\xff\xfe.json".to_vec();
    let odd = sandbox.intents().join(OsString::from_vec(raw.clone()));
    let tmp = sandbox.intents().join(".odd.tmp");
    fs::write(&tmp, &valid).expect("write");
    fs::rename(&tmp, &odd).expect("rename");
    let digest_named = format!("name-{}", hex16(&raw));
    let outcome = sandbox.outcome_in(&digest_named, "invalid");
    assert!(
        outcome["reasons"].to_string().contains("is not UTF-8"),
        "{outcome}"
    );
    assert_eq!(outcome["file"], format!("{digest_named}.json"));
    // Several scans later (each submission is found by a scan of its own), still one
    // refusal, one warning, and nothing left in the directory.
    for i in 0..3 {
        still_works(&mut sandbox, &format!("later-{i}"), 10 + i);
    }
    let log = sandbox.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && (l.contains(&digest_named) || l.contains("UTF-8")))
        .count();
    assert_eq!(warnings, 1, "log:\n{log}");
    let db = queue_db(&sandbox);
    assert_eq!(times_held(&db, "-", &format!("{digest_named}.json")), 1);
    assert_eq!(left_in_intents(&sandbox), Vec::<OsString>::new());
}

/// Total size of the files in `dir` (the queue database, its WAL, keys).
fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .expect("state dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// A sparse junk file of exactly 1 MiB (the default limit, so it is read whole)
/// that is not JSON, distinct from every other.
fn junk(sandbox: &Sandbox, name: &str) {
    let tmp = sandbox.intents().join(format!(".{name}.tmp"));
    let mut file = File::create(&tmp).expect("create");
    file.write_all(format!("junk {name}").as_bytes())
        .expect("write");
    file.set_len(1 << 20).expect("set_len");
    drop(file);
    fs::rename(&tmp, sandbox.intents().join(name)).expect("rename");
}

/// 200 junk files of 1 MiB: the state directory grows by a few MiB, not 200.
#[test]
fn junk_files_do_not_fill_the_state_directory() {
    let mut sandbox = Sandbox::new();
    sandbox.start();
    still_works(&mut sandbox, "before-junk", 1);
    let before = dir_bytes(&sandbox.state());
    for i in 0..200 {
        junk(&sandbox, &format!("junk{i}.json"));
    }
    for i in 0..200 {
        sandbox.outcome_in(&format!("junk{i}"), "invalid");
    }
    still_works(&mut sandbox, "after-junk", 2);
    let after = dir_bytes(&sandbox.state());
    let grown = after.saturating_sub(before);
    eprintln!("state grew by {grown} bytes ({before} -> {after})");
    assert!(grown < 8 << 20, "state grew by {grown} bytes");
    // Each refusal keeps the real size and the digest of every byte.
    let db = queue_db(&sandbox);
    let (rows, min_size, max_kept): (i64, i64, i64) = db
        .query_row(
            "SELECT COUNT(*), MIN(size), MAX(length(payload)) FROM refused WHERE file LIKE 'junk%'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((rows, min_size), (200, 1 << 20));
    assert!(max_kept <= 4096, "{max_kept}");
    let outcome = sandbox.outcome_in("junk7", "invalid");
    let mut bytes = b"junk junk7.json".to_vec();
    bytes.resize(1 << 20, 0);
    assert_eq!(outcome["digest"], airlock::seal::digest(&bytes));
}

/// `limits.max_refused_bytes` caps what all refusals keep together; beyond it only
/// digests are kept.
#[test]
fn refused_bytes_stop_at_the_configured_cap() {
    let mut sandbox = Sandbox::new();
    sandbox
        .env
        .push(("AIRLOCK_LIMITS__MAX_REFUSED_BYTES".into(), "10000".into()));
    sandbox.start();
    for i in 0..5 {
        junk(&sandbox, &format!("capped{i}.json"));
    }
    for i in 0..5 {
        sandbox.outcome_in(&format!("capped{i}"), "invalid");
    }
    let db = queue_db(&sandbox);
    let (kept, digests): (i64, i64) = db
        .query_row(
            "SELECT SUM(length(payload)), COUNT(DISTINCT digest) FROM refused",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((kept, digests), (2 * 4096, 5));
    assert_running(&mut sandbox);
}

/// A second file reusing an intent's id with other bytes, or an invalid file
/// carrying it, gets an outcome of its own (`<id>.conflict-<digest16>.json`); the
/// original intent's outcome is never overwritten, and the conflict's says nothing
/// of the original's content.
#[test]
fn a_conflicting_duplicate_never_overwrites_the_original_outcome() {
    let mut sandbox = Sandbox::new();
    sandbox.start();
    sandbox.submit_json(&insert_customer("dup", "dups", 1, "original-secret"));
    sandbox.outcome_in("dup", "applied");
    let original = fs::read(sandbox.results().join("dup.json")).expect("outcome");

    let other = serde_json::to_vec(&insert_customer("dup", "dups", 2, "impostor")).unwrap();
    sandbox.submit("dup-again.json", &other);
    let name = format!("dup.conflict-{}", hex16(&other));
    let conflict = sandbox.outcome_in(&name, "invalid");
    assert_eq!(conflict["id"], "dup");
    assert_eq!(conflict["file"], "dup-again.json");
    assert!(
        conflict["reasons"]
            .to_string()
            .contains("already names a different intent"),
        "{conflict}"
    );
    assert!(
        !conflict.to_string().contains("original-secret"),
        "{conflict}"
    );

    // Valid JSON with the id but an unknown target: invalid, and still beside.
    let mut invalid = insert_customer("dup", "dups", 3, "invalid");
    invalid["target"] = "nowhere".into();
    let invalid = serde_json::to_vec(&invalid).unwrap();
    sandbox.submit("dup-invalid.json", &invalid);
    let name = format!("dup.conflict-{}", hex16(&invalid));
    let refused = sandbox.outcome_in(&name, "invalid");
    assert!(refused["reasons"].to_string().contains("unknown target"));

    still_works(&mut sandbox, "after-dups", 3);
    assert_eq!(
        fs::read(sandbox.results().join("dup.json")).expect("outcome"),
        original,
        "the original's outcome changed"
    );
    assert_eq!(
        sandbox.rows("SELECT name FROM customers ORDER BY id"),
        vec![
            vec![Value::from("original-secret")],
            vec![Value::from("after-dups")]
        ]
    );
}

/// File names are the agent's text, and they reach the operator's log: a name with a
/// line break and an escape sequence must not forge a log line or repaint a terminal.
#[test]
fn a_file_name_cannot_forge_log_lines() {
    let mut sb = Sandbox::new();
    sb.start();
    let forged = "FAKE 2026-01-01T00:00:00Z  INFO intent applied id=forged";
    let name = format!("evil\n{forged}\u{1b}[2K.json");
    fs::write(sb.intents().join(&name), b"{}").unwrap();
    sb.submit_json(&insert_customer("after-evil", "r1", 1, "Ada"));
    sb.outcome_in("after-evil", "applied");
    // The refusal names the file, escaped.
    let log = eventually("the refusal in the log", || {
        let log = sb.log();
        log.lines()
            .any(|line| line.contains("evil\\nFAKE"))
            .then_some(log)
    });
    assert!(
        !log.lines().any(|line| line.starts_with("FAKE")),
        "a forged log line:\n{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "an escape sequence reached the log"
    );
    assert!(sb.stop().success());
}
