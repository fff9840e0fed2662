//! Crash safety (DESIGN invariants 1, 2 and 6): the real binary is killed with
//! SIGKILL at seeded random moments while intents stream in and reviews are
//! approved, and restarted each time. At the end every intent is accounted for
//! exactly once, the target holds exactly what the applied intents imply, and the
//! run logs verify.
//!
//! The seed is printed; rerun a failure with `CRASH_TEST_SEED=<seed>`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

#[path = "support/pg.rs"]
mod pg;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Sandbox, intent};

/// A small deterministic generator (xorshift64*), so a seed replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the workload should leave in `customers`, by id.
type Expected = BTreeMap<i64, String>;

/// The workload: files to submit (name, bytes), the rows they imply, and the names
/// of the files that are invalid on purpose.
struct Workload {
    files: Vec<(String, Vec<u8>)>,
    expected: Expected,
    invalid: BTreeSet<String>,
}

/// Three runs of inserts, renames and (reviewed) deletes, plus some invalid files.
fn workload() -> Workload {
    let mut files = Vec::new();
    let mut expected = Expected::new();
    let mut invalid = BTreeSet::new();
    for run in 0..3i64 {
        let run_id = format!("crash-run-{run}");
        for k in 0..40i64 {
            let id = run * 1000 + k;
            let name = format!("intent-{run}-{k}");
            let doc = match k % 10 {
                // Rename the row inserted just before.
                3 | 7 => {
                    let target = id - 1;
                    let new_name = format!("renamed-{target}");
                    expected.insert(target, new_name.clone());
                    intent(
                        &name,
                        &run_id,
                        json!({"op": "update", "table": "customers", "key": {"id": target}, "set": {"name": new_name}}),
                    )
                }
                // Delete the row inserted just before (goes to review).
                9 => {
                    let target = id - 1;
                    expected.remove(&target);
                    intent(
                        &name,
                        &run_id,
                        json!({"op": "delete", "table": "customers", "key": {"id": target}}),
                    )
                }
                _ => {
                    expected.insert(id, format!("customer-{id}"));
                    intent(
                        &name,
                        &run_id,
                        json!({"op": "insert", "table": "customers", "values": {"id": id, "name": format!("customer-{id}")}}),
                    )
                }
            };
            files.push((format!("{name}.json"), serde_json::to_vec(&doc).unwrap()));
            if k % 13 == 5 {
                let bad = format!("broken-{run}-{k}");
                invalid.insert(bad.clone());
                files.push((format!("{bad}.json"), b"{\"version\": 1, \"id\": ".to_vec()));
            }
        }
    }
    Workload {
        files,
        expected,
        invalid,
    }
}

fn outcomes(sb: &Sandbox) -> BTreeMap<String, Value> {
    let mut all = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(sb.results()) else {
        return all;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if let Ok(value) =
            serde_json::from_slice::<Value>(&std::fs::read(entry.path()).unwrap_or_default())
        {
            all.insert(name.trim_end_matches(".json").to_owned(), value);
        }
    }
    all
}

fn approve_waiting(sb: &Sandbox) {
    for (name, outcome) in outcomes(sb) {
        if outcome["state"] == "awaiting_review" {
            // It may have been approved already (the outcome file lags); that is fine.
            let _ = sb.cli(&["approve", &name, "--as", "crash-reviewer"]);
        }
    }
}

/// Where the workload's rows land, and how to read them back.
enum Target {
    Sqlite,
    Postgres(Box<(pg::TestDb, tokio::runtime::Runtime)>),
}

impl Target {
    fn rows(&self, sb: &Sandbox) -> Expected {
        match self {
            Target::Sqlite => sb
                .rows("SELECT id, name FROM customers")
                .into_iter()
                .map(|r| (r[0].as_i64().unwrap(), r[1].as_str().unwrap().to_owned()))
                .collect(),
            Target::Postgres(pg) => {
                pg.1.block_on(pg.0.rows("SELECT id, name FROM customers"))
                    .into_iter()
                    .map(|r| {
                        (
                            r["id"].as_i64().unwrap(),
                            r["name"].as_str().unwrap().to_owned(),
                        )
                    })
                    .collect()
            }
        }
    }

    fn ledger_rows(&self, sb: &Sandbox) -> u64 {
        match self {
            Target::Sqlite => sb.rows("SELECT COUNT(*) FROM airlock_ledger")[0][0]
                .as_u64()
                .unwrap(),
            Target::Postgres(pg) => {
                pg.1.block_on(pg.0.value("SELECT count(*) AS n FROM airlock.ledger"))
                    .as_u64()
                    .unwrap()
            }
        }
    }
}

#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    crash_test(Target::Sqlite);
}

/// The same with a PostgreSQL target: exactly once across crashes rests on the ledger
/// row committing with the intent's writes in PostgreSQL.
#[test]
fn sigkill_at_random_moments_with_a_postgres_target() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let schema = support::SCHEMA.replace("INSERT OR IGNORE", "INSERT");
    let db = rt.block_on(pg::TestDb::create(&schema));
    crash_test(Target::Postgres(Box::new((db, rt))));
}

fn crash_test(target: Target) {
    let seed = std::env::var("CRASH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    println!("crash test seed: {seed} (rerun with CRASH_TEST_SEED={seed})");
    let mut rng = Rng(seed);
    let Workload {
        files,
        expected,
        invalid,
    } = workload();
    let mut sb = Sandbox::new();
    if let Target::Postgres(pg) = &target {
        sb.target_url = Some(pg.0.url.clone());
        // The test server's role is the superuser `postgres`.
        sb.allow_privileged_role();
    }
    let mut next = 0;
    let kills = 24;
    for _ in 0..kills {
        sb.start();
        let chunk = rng.below(14) as usize;
        for (name, bytes) in files.iter().skip(next).take(chunk) {
            sb.submit(name, bytes);
        }
        next = (next + chunk).min(files.len());
        approve_waiting(&sb);
        // A random moment: sometimes at once (mid start-up), mostly mid-stream.
        std::thread::sleep(Duration::from_millis(rng.below(250)));
        sb.kill();
    }
    sb.start();
    for (name, bytes) in files.iter().skip(next) {
        sb.submit(name, bytes);
    }
    let total = files.len();
    let explain = || {
        let all = outcomes(&sb);
        let pending: Vec<String> = all
            .iter()
            .filter(|(_, o)| o["final"] != true)
            .map(|(name, o)| format!("{name}: {} {}", o["state"], o["reasons"]))
            .collect();
        let missing: Vec<&String> = files
            .iter()
            .map(|(name, _)| name)
            .filter(|name| !all.contains_key(name.trim_end_matches(".json")))
            .collect();
        format!(
            "every intent to reach a final state; {} outcomes of {total}; not final: {pending:?}; missing: {missing:?}; log tail: {}; intent dir: {:?}",
            all.len(),
            {
                let log = sb.log();
                log[log.len().saturating_sub(3000)..].to_owned()
            },
            std::fs::read_dir(sb.intents())
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                .unwrap_or_default()
        )
    };
    support::eventually_explained(explain, || {
        approve_waiting(&sb);
        let all = outcomes(&sb);
        (all.len() == total && all.values().all(|o| o["final"] == true)).then_some(())
    });
    let status = sb.stop();
    assert!(
        status.success(),
        "clean stop after the crashes: {status}\n{}",
        {
            let log = sb.log();
            log[log.len().saturating_sub(3000)..].to_owned()
        }
    );

    // Every intent exactly once, in the state the workload implies.
    let all = outcomes(&sb);
    for (name, outcome) in &all {
        let want = if invalid.contains(name) {
            "invalid"
        } else {
            "applied"
        };
        assert_eq!(outcome["state"], want, "{name}: {outcome:#}");
    }
    let status = sb.cli(&["status", "--json"]);
    assert!(status.status.success());
    // Refused files are listed too, as state `invalid`.
    let (refused, listed): (Vec<Value>, Vec<Value>) = String::from_utf8_lossy(&status.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .partition(|o| o["state"] == "invalid");
    let refused: BTreeSet<&str> = refused
        .iter()
        .map(|o| o["file"].as_str().unwrap().trim_end_matches(".json"))
        .collect();
    assert_eq!(refused, invalid.iter().map(String::as_str).collect());
    let ids: BTreeSet<&str> = listed.iter().map(|o| o["id"].as_str().unwrap()).collect();
    assert_eq!(listed.len(), ids.len(), "an id is queued twice");
    assert_eq!(ids.len(), total - invalid.len());
    assert!(listed.iter().all(|o| o["state"] == "applied"));

    // The target holds exactly what the applied intents imply, each applied once.
    assert_eq!(target.rows(&sb), expected);
    assert_eq!(target.ledger_rows(&sb), (total - invalid.len()) as u64);
    // No intent file is left behind in the agent's directory.
    let left: Vec<String> = std::fs::read_dir(sb.intents())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "results")
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // The history verifies with only the public key.
    let verify = support::airlock()
        .args(["verify", "--public-key"])
        .arg(sb.state().join("signing.key.pub"))
        .arg("--state")
        .arg(sb.state())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(report.contains("crash-run-0"), "{report}");
}
