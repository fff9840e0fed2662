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
use support::{QUORUM_POLICY, Sandbox, insert_customer, intent};

/// How long the whole browser script may take (it waits on each condition for at
/// most 30 s itself; this only stops a hung browser from hanging the test).
const SCRIPT_DEADLINE: Duration = Duration::from_secs(240);

/// What the browser script needs from this machine, or a panic naming the setup
/// command that provides it.
struct Browser {
    scripts: PathBuf,
    chromium: PathBuf,
}

impl Browser {
    fn find() -> Self {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
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
        Self {
            scripts: dir,
            chromium,
        }
    }

    /// Runs `script` (in sidecar/tests/browser) with `env`; whether it passed, and
    /// its output.
    fn run(&self, script: &str, env: &[(&str, String)], artifacts: &Path) -> (bool, String) {
        let stdout = artifacts.join("browser.out");
        let mut child = Command::new("node")
            .arg(self.scripts.join(script))
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

impl Browser {
    /// Runs `script` against `sb` and fails the test, with the script's output, the
    /// daemon's log and the kept screenshots, unless every check passed.
    fn check(&self, sb: &Sandbox, script: &str, env: &[(&str, String)]) {
        // The failure's screenshot lands in a temporary directory, kept when the
        // test fails. With BROWSER_TEST_ARTIFACTS=DIR (not an AIRLOCK_* variable, for
        // the reason given in `Browser::find`), DIR gets a screenshot of every view.
        let artifacts = tempfile::Builder::new()
            .prefix("airlock-browser-")
            .tempdir()
            .unwrap();
        let asked = std::env::var_os("BROWSER_TEST_ARTIFACTS");
        let shots = asked
            .clone()
            .map_or_else(|| artifacts.path().to_owned(), PathBuf::from);
        std::fs::create_dir_all(&shots).unwrap();
        let mut env = env.to_vec();
        if asked.is_some() {
            env.push(("AIRLOCK_SCREENSHOTS", "1".to_owned()));
        }
        let (passed, output) = self.run(script, &env, &shots);
        println!("{output}");
        if !passed {
            let _kept = artifacts.keep();
            panic!(
                "{script} failed (screenshots and output kept in {}):\n{output}\nairlock's log:\n{}",
                shots.display(),
                sb.log()
            );
        }
    }
}

/// The records of `run`'s exported log, in order.
fn records(sb: &Sandbox, run: &str) -> Vec<Value> {
    let export = sb.dir.path().join(format!("{run}.jsonl"));
    let out = sb.cli(&["export", "--run", run, "--out", export.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|line| line["type"] == "record")
        .collect()
}

fn delete(id: &str, run: &str, customer: i64) -> Value {
    intent(
        id,
        run,
        json!({"op": "delete", "table": "customers", "key": {"id": customer}}),
    )
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
    let mut hostile = delete("b-delete-ada", "browser-run", 1);
    hostile["reason"] = json!(reason);
    hostile["provenance"]["agent"] = json!("<script>alert(2)</script>agent");
    hostile["provenance"]["model"] = json!("\"><svg onload=alert(3)>");
    sb.submit_json(&hostile);
    sb.outcome_in("b-delete-ada", "awaiting_review");

    // The second intent, written by the script while the page is open: another run,
    // so it is not held back behind the first.
    let second = delete("b-delete-grace", "browser-run-2", 2);
    let comment = "Checked with Ada: she closed her account.";
    browser.check(
        &sb,
        "review.mjs",
        &[
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
        ],
    );

    // The approval reached the queue: the row is gone, the second intent waits.
    sb.outcome_in("b-delete-ada", "applied");
    assert_eq!(
        sb.rows("SELECT id, name FROM customers ORDER BY id"),
        vec![vec![json!(2), json!("Grace")]]
    );
    sb.outcome_in("b-delete-grace", "awaiting_review");

    // The run log records the approval by the token's name, with the comment.
    let records = records(&sb, "browser-run");
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

#[test]
fn viewers_read_and_admins_undo_and_reject_in_the_browser() {
    let browser = Browser::find();
    let mut sb = Sandbox::new();
    sb.use_policy("quorum.rego", QUORUM_POLICY);
    rusqlite::Connection::open(sb.target())
        .unwrap()
        .execute("INSERT INTO customers (id, name) VALUES (3, 'Lin')", [])
        .unwrap();
    sb.start();
    let url = sb.review_url();
    let viewer = sb.token("vera", "viewer");
    let admin = sb.token("root", "admin");

    // A run to undo, one of whose rows changes behind Airlock's back.
    sb.submit_json(&insert_customer("u-ada", "undo-run", 1, "Ada"));
    sb.submit_json(&insert_customer("u-grace", "undo-run", 2, "Grace"));
    sb.outcome_in("u-ada", "applied");
    sb.outcome_in("u-grace", "applied");
    rusqlite::Connection::open(sb.target())
        .unwrap()
        .execute("UPDATE customers SET name = 'Ada L.' WHERE id = 1", [])
        .unwrap();

    // A delete needing two approvals, which the admin has given one of already.
    sb.submit_json(&delete("p-delete-lin", "pending-run", 3));
    sb.outcome_in("p-delete-lin", "awaiting_review");
    let out = sb.cli(&["approve", "p-delete-lin", "--as", "root"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sb.outcome_where("p-delete-lin", |o| {
        o["review"]["approved_by"] == json!(["root"])
    });

    browser.check(
        &sb,
        "admin.mjs",
        &[
            ("AIRLOCK_URL", url),
            ("AIRLOCK_VIEWER", "vera".to_owned()),
            ("AIRLOCK_VIEWER_TOKEN", viewer),
            ("AIRLOCK_ADMIN", "root".to_owned()),
            ("AIRLOCK_ADMIN_TOKEN", admin),
            ("AIRLOCK_PENDING", "p-delete-lin".to_owned()),
            ("AIRLOCK_UNDO_RUN", "undo-run".to_owned()),
            (
                "AIRLOCK_UNDO_INTENTS",
                json!(["u-grace", "u-ada"]).to_string(),
            ),
        ],
    );

    // Forced undo removed both inserted rows, the changed one too; the rejected
    // delete changed nothing, and the agent reads the admin's reason.
    let rejected = sb.outcome_in("p-delete-lin", "rejected");
    assert_eq!(
        sb.rows("SELECT id, name FROM customers ORDER BY id"),
        vec![vec![json!(3), json!("Lin")]]
    );
    assert!(
        rejected.to_string().contains("Lin is still a customer."),
        "{rejected:#}"
    );
    let pending = records(&sb, "pending-run");
    let rejection = pending
        .iter()
        .find(|r| r["event"] == "rejected")
        .unwrap_or_else(|| panic!("no rejected record: {pending:#?}"));
    assert_eq!(rejection["data"]["by"], "root", "{rejection:#}");
    assert_eq!(
        rejection["data"]["reason"], "Lin is still a customer.",
        "{rejection:#}"
    );
    let records = records(&sb, "undo-run");
    for id in ["u-ada", "u-grace"] {
        let undone = records
            .iter()
            .find(|r| r["event"] == "undone" && r["intent"] == id)
            .unwrap_or_else(|| panic!("no undone record for {id}: {records:#?}"));
        assert_eq!(undone["data"]["by"], "root", "{undone:#}");
    }
    assert!(sb.stop().success());
}
