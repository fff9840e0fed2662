//! The review web page in a real browser: Debian's Chromium, driven by Playwright
//! (`sidecar/tests/browser/review.mjs`), against the real `airlock` binary. An
//! approver signs in, sees a pending delete whose reason is hostile HTML shown as
//! text, reads its diff, sees a second intent arrive without a reload, and approves;
//! then the row is gone from the target and the run log names the approver.
//!
//! Needs Node.js, `npm ci --prefix sidecar/tests/browser` and `apt-get install
//! chromium` (or `CHROMIUM_PATH=/path/to/chromium`); without them the test fails
//! with the command to run, it never skips.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests fail loudly by design.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Sandbox, insert_customer, intent};

/// How long the whole browser script may take (it waits on each condition for at
/// most 30 s itself; this only stops a hung browser from hanging the test).
const SCRIPT_DEADLINE: Duration = Duration::from_secs(240);

/// What the browser script needs from this machine, or a panic naming the setup
/// command that provides it.
struct Browser {
    script: PathBuf,
    chromium: PathBuf,
}

impl Browser {
    fn find() -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
        let script = dir.join("review.mjs");
        assert!(script.is_file(), "missing {}", script.display());
        let node = Command::new("node").arg("--version").output();
        assert!(
            node.as_ref().is_ok_and(|o| o.status.success()),
            "Node.js (20 or later) is needed for the browser test and `node` did not run \
             ({node:?}): install it (`apt-get install nodejs npm`), then run \
             `npm ci --prefix sidecar/tests/browser`"
        );
        assert!(
            dir.join("node_modules/playwright-core/package.json")
                .is_file(),
            "playwright-core is not installed in {}: run `npm ci --prefix sidecar/tests/browser`",
            dir.display()
        );
        // Not AIRLOCK_CHROMIUM: `airlock run` reads every AIRLOCK_* variable as
        // configuration and refuses unknown keys, and the sandbox's daemon inherits
        // this process's environment.
        assert!(
            std::env::var_os("AIRLOCK_CHROMIUM").is_none(),
            "AIRLOCK_CHROMIUM would reach the sandbox's `airlock run` as an unknown \
             configuration key: set CHROMIUM_PATH instead"
        );
        let chromium = std::env::var_os("CHROMIUM_PATH")
            .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
        assert!(
            chromium.is_file(),
            "no Chromium at {}: run `apt-get install chromium` (or set CHROMIUM_PATH to a \
             Chromium binary)",
            chromium.display()
        );
        Self { script, chromium }
    }

    /// Runs the script with `env`; its output, and whether it passed.
    fn run(&self, env: &[(&str, String)], artifacts: &Path) -> (bool, String) {
        let stdout = artifacts.join("browser.out");
        let mut child = Command::new("node")
            .arg(&self.script)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("AIRLOCK_CHROMIUM", &self.chromium)
            .env("AIRLOCK_ARTIFACTS", artifacts)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(artifacts.join("browser.err")).unwrap())
            .spawn()
            .expect("spawn node");
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if start.elapsed() > SCRIPT_DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut output = std::fs::read_to_string(&stdout).unwrap_or_default();
        output
            .push_str(&std::fs::read_to_string(artifacts.join("browser.err")).unwrap_or_default());
        match status {
            Some(status) => (status.success(), output),
            None => (
                false,
                format!("{output}\nthe browser script was killed after {SCRIPT_DEADLINE:?}"),
            ),
        }
    }
}

#[test]
fn approver_reviews_and_approves_in_the_browser() {
    let browser = Browser::find();
    let mut sb = Sandbox::new();
    sb.start();
    let url = sb.review_url();
    let token = sb.token("alice", "approver");

    // Two customers, then a delete of one: the default policy sends deletes to review.
    sb.submit_json(&insert_customer("b-ada", "browser-run", 1, "Ada"));
    sb.submit_json(&insert_customer("b-grace", "browser-run", 2, "Grace"));
    sb.outcome_in("b-ada", "applied");
    sb.outcome_in("b-grace", "applied");
    let reason = "<img src=x onerror=alert(1)> please delete";
    let mut delete = intent(
        "b-delete-ada",
        "browser-run",
        json!({"op": "delete", "table": "customers", "key": {"id": 1}}),
    );
    delete["reason"] = json!(reason);
    delete["provenance"]["agent"] = json!("<script>alert(2)</script>agent");
    delete["provenance"]["model"] = json!("\"><svg onload=alert(3)>");
    sb.submit_json(&delete);
    sb.outcome_in("b-delete-ada", "awaiting_review");

    // The second intent, written by the script while the page is open: another run,
    // so it is not held back behind the first.
    let second = intent(
        "b-delete-grace",
        "browser-run-2",
        json!({"op": "delete", "table": "customers", "key": {"id": 2}}),
    );
    let comment = "Checked with Ada: she closed her account.";

    // Screenshots of every view land here: a temporary directory kept when the test
    // fails, or BROWSER_TEST_ARTIFACTS to look at them after a passing run (not an
    // AIRLOCK_* variable, for the reason given in `Browser::find`).
    let artifacts = tempfile::Builder::new()
        .prefix("airlock-browser-")
        .tempdir()
        .unwrap();
    let shots = std::env::var_os("BROWSER_TEST_ARTIFACTS")
        .map_or_else(|| artifacts.path().to_owned(), PathBuf::from);
    std::fs::create_dir_all(&shots).unwrap();
    let env = [
        ("AIRLOCK_URL", url),
        ("AIRLOCK_TOKEN", token),
        ("AIRLOCK_REVIEWER", "alice".to_owned()),
        ("AIRLOCK_INTENT", "b-delete-ada".to_owned()),
        ("AIRLOCK_RUN", "browser-run".to_owned()),
        ("AIRLOCK_REASON", reason.to_owned()),
        (
            "AIRLOCK_EXPECT_BEFORE",
            json!({"id": 1, "name": "Ada", "email": null, "tier": "standard"}).to_string(),
        ),
        ("AIRLOCK_INTENTS_DIR", sb.intents().display().to_string()),
        ("AIRLOCK_SECOND_INTENT", second.to_string()),
        ("AIRLOCK_COMMENT", comment.to_owned()),
    ];
    let (passed, output) = browser.run(&env, &shots);
    println!("{output}");
    if !passed {
        // Keep the screenshots for whoever reads the failure.
        let _kept = artifacts.keep();
        panic!(
            "the browser script failed (screenshots and output kept in {}):\n{output}\n\
             airlock's log:\n{}",
            shots.display(),
            sb.log()
        );
    }

    // The approval reached the queue: the row is gone, the second intent waits.
    sb.outcome_in("b-delete-ada", "applied");
    assert_eq!(
        sb.rows("SELECT id, name FROM customers ORDER BY id"),
        vec![vec![json!(2), json!("Grace")]]
    );
    sb.outcome_in("b-delete-grace", "awaiting_review");

    // The run log records the approval by the token's name, with the comment.
    let export = sb.dir.path().join("browser-run.jsonl");
    let out = sb.cli(&[
        "export",
        "--run",
        "browser-run",
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|line: &Value| line["type"] == "record")
        .collect();
    let approved = records
        .iter()
        .find(|r| r["event"] == "approved" && r["intent"] == "b-delete-ada")
        .unwrap_or_else(|| panic!("no approved record in the run log: {records:#?}"));
    assert_eq!(approved["data"]["by"], "alice", "{approved:#}");
    assert_eq!(approved["data"]["comment"], comment, "{approved:#}");
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "applied" && r["intent"] == "b-delete-ada"),
        "no applied record: {records:#?}"
    );
    assert!(sb.stop().success());
}
