//! End to end: how fast Airlock turns intent files into committed rows, next to an
//! agent writing the same rows straight into the same kind of database.
//!
//! * `direct`: one `INSERT` per transaction into a SQLite file (WAL,
//!   `synchronous=FULL`), as an agent with write access would do. The floor.
//! * `airlock`: the same rows as intent files (written and renamed into the intent
//!   directory by one writer), through intake, validation, sealing, the queue, the
//!   embedded policy, apply and outcome files, until every outcome says `applied`.
//!
//! It prints both rates, their ratio, and the process's peak resident memory. Run:
//! `cargo bench -p airlock-benches --bench throughput` (`AIRLOCK_BENCH_N` sets the
//! number of intents, default 2000).
#![allow(clippy::unwrap_used, clippy::expect_used)] // A broken bench should stop loudly.

use std::path::Path;
use std::time::{Duration, Instant};

use airlock::config::Config;
use airlock::daemon::{self, Resources};
use airlock::lifecycle::State;
use airlock::queue::Queue;

const SCHEMA: &str =
    "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER NOT NULL);";

fn open_sqlite(path: &Path) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(path).unwrap();
    db.pragma_update(None, "journal_mode", "wal").unwrap();
    db.pragma_update(None, "synchronous", "full").unwrap();
    db.execute_batch(SCHEMA).unwrap();
    db
}

fn direct(dir: &Path, n: usize) -> Duration {
    let mut db = open_sqlite(&dir.join("direct.db"));
    let start = Instant::now();
    for i in 0..n {
        let tx = db.transaction().unwrap();
        tx.execute(
            "INSERT INTO items (id, name, qty) VALUES (?1, ?2, ?3)",
            rusqlite::params![i as i64, format!("item-{i}"), 1],
        )
        .unwrap();
        tx.commit().unwrap();
    }
    start.elapsed()
}

fn intent(i: usize, runs: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "version": 1,
        "id": format!("bench-{i}"),
        "run": format!("bench-run-{}", i % runs),
        "ops": [{"op": "insert", "table": "items", "values": {"id": i, "name": format!("item-{i}"), "qty": 1}}],
        "reason": "benchmark",
        "provenance": {"agent": "bench"}
    }))
    .unwrap()
}

fn airlock(dir: &Path, n: usize, runs: usize) -> Duration {
    let target = dir.join("target.db");
    drop(open_sqlite(&target));
    let mut config = Config::in_dir(dir, &target);
    // The review endpoint idles here; a free port keeps the bench off 8080.
    config.review.listen = "127.0.0.1:0".to_owned();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let resources = runtime.block_on(Resources::open(config.clone())).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = runtime.spawn(daemon::run(resources, async {
        let _ = stopped.await;
    }));
    let files: Vec<Vec<u8>> = (0..n).map(|i| intent(i, runs)).collect();
    let queue = Queue::open(&config.state).unwrap();
    let start = Instant::now();
    for (i, bytes) in files.iter().enumerate() {
        let tmp = config.intents.join(format!(".bench-{i}.tmp"));
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, config.intents.join(format!("bench-{i}.json"))).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let applied = queue.list(None, Some(State::Applied), n + 1).unwrap().len();
        if applied == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {applied} of {n} applied in time"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = start.elapsed();
    let _ = stop.send(());
    runtime.block_on(daemon).unwrap().unwrap();
    elapsed
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let n: usize = std::env::var("AIRLOCK_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let runs = 8;
    let dir = tempfile::tempdir().unwrap();
    let base = direct(dir.path(), n);
    let rss_base = peak_rss_kib();
    let through = airlock(dir.path(), n, runs);
    let rss = peak_rss_kib();
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "throughput/direct   {n} rows in {base:.2?}: {:.0} rows/s",
        rate(base)
    );
    println!(
        "throughput/airlock  {n} intents over {runs} runs in {through:.2?}: {:.0} intents/s",
        rate(through)
    );
    println!(
        "throughput ratio airlock/direct = {:.2} (1.0 = as fast as writing directly)",
        rate(through) / rate(base)
    );
    if let (Some(a), Some(b)) = (rss_base, rss) {
        println!(
            "peak RSS: {a} KiB after direct, {b} KiB after airlock (+{} KiB)",
            b.saturating_sub(a)
        );
    }
}
