//! `airlock demo`: Airlock on its embedded defaults in a fresh directory, fed the
//! shipped example intents, printing each outcome as the agent would read it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::config::Config;
use crate::daemon::{self, Resources};
use crate::queue::Queue;
use crate::{review, submit};

/// The example intents, in the order the demo submits them.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "01-add-customer.json",
        include_str!("../../examples/intents/01-add-customer.json"),
    ),
    (
        "02-place-order.json",
        include_str!("../../examples/intents/02-place-order.json"),
    ),
    (
        "03-upgrade-tier.json",
        include_str!("../../examples/intents/03-upgrade-tier.json"),
    ),
    (
        "04-cancel-order.json",
        include_str!("../../examples/intents/04-cancel-order.json"),
    ),
    (
        "05-erase-audit-log.json",
        include_str!("../../examples/intents/05-erase-audit-log.json"),
    ),
    (
        "06-injection-attempt.json",
        include_str!("../../examples/intents/06-injection-attempt.json"),
    ),
];

/// The demo target's tables.
pub const SANDBOX_SCHEMA: &str = include_str!("../../examples/sandbox/schema.sql");

const REVIEWER: &str = "demo-reviewer";

/// Runs the demo in `dir` (a new temporary directory when `None`).
pub async fn run(dir: Option<PathBuf>) -> Result<()> {
    let dir = match dir {
        Some(dir) => dir,
        None => std::env::temp_dir().join(format!("airlock-demo-{}", std::process::id())),
    };
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!(
            "{} is not empty; give the demo a new directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join("target.db");
    rusqlite::Connection::open(&target)
        .and_then(|db| db.execute_batch(SANDBOX_SCHEMA))
        .with_context(|| format!("creating the demo database {}", target.display()))?;

    let mut config = Config::in_dir(&dir, &target);
    // The demo decides its reviews itself; `airlock run` serves the review endpoint.
    config.review.listen = "off".to_owned();
    let results = config.results_dir();
    println!("Airlock demo in {}", dir.display());
    println!("  agent writes intents to  {}", config.intents.display());
    println!("  agent reads outcomes in  {}", results.display());
    println!(
        "  target database          {} (SQLite; the demo created its tables",
        target.display()
    );
    println!(
        "                           from examples/sandbox/schema.sql: Airlock never runs DDL)"
    );
    println!("  policy                   the built-in default (examples/policies/airlock.rego)");

    let resources = Resources::open(config.clone()).await?;
    println!(
        "  signing key              {} (created; keyid {})\n",
        config.key_path().display(),
        resources.sealer.keyid()
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(daemon::run(resources, async {
        let _ = stop_rx.await;
    }));

    for (name, text) in EXAMPLES {
        let path = submit::submit_bytes(&config.intents, name, text.as_bytes())?;
        println!("submitted {name} -> {}", path.display());
    }
    println!();

    let mut queue = Queue::open(&config.state)?;
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut approved = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let outcomes = read_outcomes(&results)?;
        for (file, outcome) in &outcomes {
            let state = outcome["state"].as_str().unwrap_or("?").to_owned();
            if seen.get(file) != Some(&state) {
                print_outcome(outcome);
                seen.insert(file.clone(), state);
            }
        }
        let waiting: Vec<&serde_json::Value> = outcomes
            .values()
            .filter(|o| o["state"] == "awaiting_review")
            .collect();
        if !approved && let Some(outcome) = waiting.first() {
            let id = outcome["id"].as_str().unwrap_or_default().to_owned();
            let digest = outcome["digest"].as_str().map(str::to_owned);
            println!(
                "\n  {id} waits for a human. Approving it as {REVIEWER}, as this would:\n    airlock approve {id} --state {} --target sqlite://{} --as {REVIEWER}\n",
                config.state.display(),
                target.display()
            );
            // As a reviewer would: look at the rows it touches, and approve them.
            let row = queue
                .intent(&id)?
                .with_context(|| format!("intent {id} is not in the queue"))?;
            let name = row.target.clone();
            let url = config
                .targets
                .get(&name)
                .with_context(|| format!("no target named {name:?}"))?;
            let shown = review::show(
                crate::apply::open(&name, url)?.as_ref(),
                &row,
                config.apply.max_rows,
            )
            .await?;
            review::approve(
                &mut queue,
                &id,
                REVIEWER,
                digest.as_deref(),
                &shown.digest,
                &shown.digest,
                Some("demo"),
            )?;
            approved = true;
        }
        let done =
            outcomes.len() == EXAMPLES.len() && outcomes.values().all(|o| o["final"] == true);
        if done {
            break;
        }
        if Instant::now() > deadline {
            bail!("the demo did not finish within a minute; see the log above");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let _ = stop_tx.send(());
    daemon.await.context("daemon task")??;
    print_tables(&target)?;
    println!("\nEverything above is on disk in {}:", dir.display());
    println!(
        "  cat {}/*.json                 # what the agent reads",
        results.display()
    );
    println!(
        "  airlock status --state {}     # the queue",
        config.state.display()
    );
    println!(
        "  airlock verify --public-key {}.pub --state {}   # the signed run log",
        config.key_path().display(),
        config.state.display()
    );
    println!(
        "Run Airlock for real with `airlock run` (see README.md). To review risky writes in a"
    );
    println!(
        "browser: `airlock token add --name you --role approver`, then `airlock run` and open"
    );
    println!("http://127.0.0.1:8080 and sign in with the token it printed.");
    Ok(())
}

fn read_outcomes(dir: &Path) -> Result<BTreeMap<String, serde_json::Value>> {
    let mut outcomes = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let bytes = std::fs::read(entry.path())?;
        if let Ok(value) = serde_json::from_slice(&bytes) {
            outcomes.insert(name, value);
        }
    }
    Ok(outcomes)
}

fn print_outcome(outcome: &serde_json::Value) {
    let state = outcome["state"].as_str().unwrap_or("?");
    let mark = match state {
        "applied" => "✔",
        "denied" | "rejected" | "expired" | "failed" | "invalid" => "✘",
        _ => "…",
    };
    let name = outcome["id"]
        .as_str()
        .or(outcome["file"].as_str())
        .unwrap_or("?");
    println!("{mark} {name:<20} {state}");
    if let Some(reasons) = outcome["reasons"].as_array() {
        for reason in reasons.iter().filter_map(|r| r.as_str()) {
            println!("      {reason}");
        }
    }
}

fn print_tables(target: &Path) -> Result<()> {
    let db = rusqlite::Connection::open(target)?;
    for table in ["customers", "orders", "audit_log"] {
        println!("\n{table}:");
        let mut stmt = db.prepare(&format!("SELECT * FROM \"{table}\" ORDER BY 1"))?;
        let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        println!("  {}", columns.join(" | "));
        let mut rows = stmt.query([])?;
        let mut any = false;
        while let Some(row) = rows.next()? {
            any = true;
            let cells = (0..columns.len())
                .map(|i| match row.get_ref(i) {
                    Ok(rusqlite::types::ValueRef::Null) => "NULL".to_owned(),
                    Ok(rusqlite::types::ValueRef::Integer(n)) => n.to_string(),
                    Ok(rusqlite::types::ValueRef::Real(f)) => f.to_string(),
                    Ok(rusqlite::types::ValueRef::Text(t)) => {
                        String::from_utf8_lossy(t).into_owned()
                    }
                    Ok(rusqlite::types::ValueRef::Blob(b)) => format!("<{} bytes>", b.len()),
                    Err(_) => "?".to_owned(),
                })
                .collect::<Vec<_>>();
            println!("  {}", cells.join(" | "));
        }
        if !any {
            println!("  (no rows)");
        }
    }
    Ok(())
}
