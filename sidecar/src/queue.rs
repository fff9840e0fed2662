//! The queue: Airlock's durable memory of every intent, in one SQLite database
//! (`<state>/queue.db`, WAL mode).
//!
//! # What is guaranteed on disk
//! - **Durable before acknowledged.** Every write goes through [`Queue::write`], one
//!   SQLite transaction committed with `synchronous=FULL`: when it returns, the change
//!   survives a crash or power loss. Intake removes an intent file only after the
//!   transaction holding its exact bytes and digest has committed (DESIGN invariant 1).
//! - **Group commits.** A [`Writer`] takes any number of changes, so intake admits a
//!   whole directory scan, and the pipeline records a batch of decisions or applies,
//!   for the cost of one commit.
//! - **One state change, one record.** Each change of an intent's state is checked by
//!   the pure state machine ([`State::next`]) and appended, in the same transaction,
//!   as a record of its run's log: a JSON statement holding the SHA-256 of the
//!   previous record of the run, so the log is a hash chain. What a record says and
//!   its exact bytes come from [`crate::log`]; the queue only persists them. Intents are stored with
//!   their DSSE envelope (the exact bytes, signed at intake).
//! - **Checkpoints.** A checkpoint is a DSSE envelope, signed with the sidecar key,
//!   over a run's head (sequence number and digest of its last record). With a key,
//!   every commit that adds records to a run checkpoints it in the same transaction
//!   when the [`CheckpointPolicy`] says it is due (by default: always), so the cost
//!   of signing grows with commits, not with state changes. A connection without the
//!   key (an operator's CLI) leaves records unsealed, and the daemon checkpoints them
//!   at its next step ([`Queue::seal_due`]).
//! - **Queue order.** `intents.seq` grows with each admission and is the order in
//!   which a run's intents apply (DESIGN invariant 7).
//! - **Idempotent admission.** An id is admitted once. The same id with the same bytes
//!   again is a no-op; with different bytes it is refused as a conflict, recorded in
//!   `refused` like every other refusal.
//! - **Bounded refusals.** The agent chooses how many files are refused and how big
//!   they are, so a refusal keeps the digest and real size of the whole file but at
//!   most its first [`REFUSED_PAYLOAD_PREFIX`] bytes, and only while the bytes kept
//!   for all refusals (`SUM(length(payload))` over `refused`, read in each
//!   transaction that refuses, so the cap holds across restarts and connections)
//!   stay within `limits.max_refused_bytes` ([`Queue::with_max_refused_bytes`]);
//!   beyond it only digests are kept. No reader needs the refused bytes: outcomes,
//!   the run log and exports name refusals by digest.
//!
//! - **Outcomes stay true.** Each change flags its intent's outcome for writing
//!   (`outcome_pending`). An approved intent's outcome also names what holds it back
//!   ([`Queue::holding_back`]), so a change of the intent that holds a run back flags,
//!   in the same transaction, the outcomes of the approved intents after it in its
//!   run. An applied intent keeps what it wrote (the `applied` column), so that
//!   writing its outcome never reads the run log.
//!
//! # What a crash can leave behind
//! Nothing half-done: each transaction is all or nothing. Outcome files for agents are
//! written after the commit and flagged `outcome_pending` until written, so a crash
//! between the two rewrites them at the next start.
//!
//! The schema is versioned with `PRAGMA user_version`; [`Queue::open`] migrates older
//! files forward and refuses newer ones.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
use serde_json::{Value, json};

use crate::clock::now_ms;
use crate::lifecycle::{Decision, Event, IllegalTransition, State, UnknownState, Verdict};
use crate::log::{self, CheckpointPayload, Entry, ExportLine, Link};
use crate::metrics::Observation;
use crate::seal::{self, Sealer};

/// The schema version this code writes.
const SCHEMA_VERSION: i64 = 3;

const MIGRATIONS: &[&str] = &[
    // Version 1.
    r#"
    CREATE TABLE intents (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        run TEXT NOT NULL,
        target TEXT NOT NULL,
        digest TEXT NOT NULL,
        payload BLOB NOT NULL,
        envelope BLOB NOT NULL,
        file TEXT NOT NULL,
        state TEXT NOT NULL,
        decision TEXT,
        approvals_needed INTEGER NOT NULL DEFAULT 0,
        review_deadline INTEGER,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before INTEGER NOT NULL DEFAULT 0,
        received_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        outcome_pending INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX intents_by_state ON intents (state, seq);
    CREATE INDEX intents_by_run ON intents (run, seq);
    CREATE INDEX intents_outcome ON intents (outcome_pending) WHERE outcome_pending = 1;

    CREATE TABLE reviews (
        intent_id TEXT NOT NULL REFERENCES intents (id),
        reviewer TEXT NOT NULL,
        verdict TEXT NOT NULL CHECK (verdict IN ('approve', 'reject')),
        digest TEXT NOT NULL,
        comment TEXT,
        at INTEGER NOT NULL,
        PRIMARY KEY (intent_id, reviewer)
    );

    CREATE TABLE refused (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        file TEXT NOT NULL,
        id TEXT,
        run TEXT,
        kind TEXT NOT NULL,
        digest TEXT NOT NULL,
        size INTEGER NOT NULL,
        payload BLOB NOT NULL,
        problems TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        outcome_pending INTEGER NOT NULL DEFAULT 1
    );
    CREATE INDEX refused_outcome ON refused (outcome_pending) WHERE outcome_pending = 1;
    CREATE INDEX refused_by_file ON refused (file, digest);

    CREATE TABLE runs (
        run TEXT PRIMARY KEY,
        head_seq INTEGER NOT NULL,
        head_digest TEXT NOT NULL,
        sealed_seq INTEGER NOT NULL DEFAULT 0,
        sealed_at INTEGER NOT NULL DEFAULT 0
    );

    CREATE TABLE checkpoints (
        run TEXT NOT NULL,
        seq INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        at INTEGER NOT NULL,
        PRIMARY KEY (run, seq)
    );

    CREATE TABLE records (
        run TEXT NOT NULL,
        seq INTEGER NOT NULL,
        intent_id TEXT,
        event TEXT NOT NULL,
        body BLOB NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (run, seq)
    );
    CREATE INDEX records_by_intent ON records (intent_id);
    "#,
    // Version 2: an approval also binds the preview its reviewer saw (the digest of
    // the rows' before-images); NULL for approvals recorded before.
    r#"
    ALTER TABLE reviews ADD COLUMN preview TEXT;
    "#,
    // Version 3: what an applied intent wrote, for its outcome (NULL for intents
    // applied before); and the two indexes that find what holds an approved intent
    // back (see `Queue::holding_back`) and the approved intents behind a change
    // (see `Writer::touch_waiting`) without reading a run's settled intents.
    r#"
    ALTER TABLE intents ADD COLUMN applied TEXT;
    CREATE INDEX intents_holding ON intents (run, seq)
        WHERE state IN ('queued', 'awaiting_review') OR (state = 'approved' AND attempts > 0);
    CREATE INDEX intents_approved ON intents (run, seq) WHERE state = 'approved';
    "#,
];

/// The condition, on a row of `intents`, of an intent that holds back the approved
/// intents after it in its run: it awaits a decision or a review, or it is approved
/// but retrying after a transient error. Exactly the `intents_holding` index's
/// condition, so SQLite uses that index.
const HOLDING: &str =
    "state IN ('queued', 'awaiting_review') OR (state = 'approved' AND attempts > 0)";

/// The clause that finds what holds back the intent at `?2` in run `?1` (see
/// [`Queue::holding_back`]).
fn holding_back_clause() -> String {
    format!("WHERE run = ?1 AND seq < ?2 AND ({HOLDING}) ORDER BY seq LIMIT 1")
}

/// Flags the outcomes of the approved intents after seq `?2` in run `?1` (see
/// `Writer::touch_waiting`); `state = 'approved'` lets SQLite use the
/// `intents_approved` index.
const TOUCH_WAITING: &str = "UPDATE intents SET outcome_pending = 1 \
     WHERE run = ?1 AND seq > ?2 AND state = 'approved' AND outcome_pending = 0";

/// The run that refusals without a readable run id are recorded under.
pub const UNATTRIBUTED_RUN: &str = "unattributed";

/// Most bytes of one refused file the queue keeps (its digest covers them all).
pub const REFUSED_PAYLOAD_PREFIX: usize = 4096;

/// The default for [`Queue::with_max_refused_bytes`]: 64 MiB, the configuration's
/// default `limits.max_refused_bytes`.
pub use crate::config::DEFAULT_MAX_REFUSED_BYTES;

/// Why a queue operation failed.
///
/// Each message includes its cause, so no variant also gives it as `source()`: an
/// error-chain printer (anyhow's `{:#}`) would show it twice.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("state directory {path}: {error}")]
    StateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("queue database {path}: {error}")]
    Open {
        path: PathBuf,
        error: rusqlite::Error,
    },
    #[error(
        "queue database {path} has schema version {found}, newer than this Airlock ({supported}); upgrade Airlock"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("queue database: {0}")]
    Sql(rusqlite::Error),
    #[error("queue holds a corrupt value: {0}")]
    Corrupt(String),
    #[error("no intent with id {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Transition(#[from] IllegalTransition),
}

impl From<rusqlite::Error> for QueueError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Sql(error)
    }
}

impl From<UnknownState> for QueueError {
    fn from(e: UnknownState) -> Self {
        QueueError::Corrupt(e.to_string())
    }
}

impl From<serde_json::Error> for QueueError {
    fn from(e: serde_json::Error) -> Self {
        QueueError::Corrupt(e.to_string())
    }
}

/// A file that validated as an intent, ready to be admitted.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// The file name the agent used (without directory).
    pub file: String,
    /// The exact bytes read.
    pub bytes: Vec<u8>,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// The DSSE envelope sealing `bytes`, as JSON.
    pub envelope: Vec<u8>,
    /// The key id that sealed it.
    pub keyid: String,
    pub intent: airlock_intent::Intent,
}

/// A file that did not become an intent, and why.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub file: String,
    /// What kind of refusal: `invalid` (schema, JSON, limits, file type) or `conflict`.
    pub kind: &'static str,
    /// The first bytes read (empty when the file was not read: too large, not a
    /// file). The queue keeps at most [`REFUSED_PAYLOAD_PREFIX`] of them, so callers
    /// need not hold more.
    pub bytes: Vec<u8>,
    /// `sha256:<hex>` of every byte read (empty when the file was not read).
    pub digest: String,
    /// The file's real size (on disk, or as read).
    pub size: u64,
    pub id: Option<String>,
    pub run: Option<String>,
    pub problems: Vec<airlock_intent::Problem>,
}

/// What admission did with an [`Arrival`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Newly queued.
    Queued,
    /// Already queued with the same bytes: nothing changed.
    Duplicate,
    /// The id was already used by different bytes: refused.
    Conflict { existing_digest: String },
}

/// One intent as the queue holds it.
#[derive(Clone, Debug)]
pub struct IntentRow {
    pub seq: i64,
    pub id: String,
    pub run: String,
    pub target: String,
    pub digest: String,
    pub payload: Vec<u8>,
    pub file: String,
    pub state: State,
    pub decision: Option<Decision>,
    pub approvals_needed: u32,
    pub review_deadline: Option<i64>,
    /// The last problem met on the way (policy unavailable, transient apply error,
    /// permanent apply error), as a JSON object.
    pub error: Option<Value>,
    pub attempts: u32,
    pub not_before: i64,
    pub received_at: i64,
    pub updated_at: i64,
    /// What the intent wrote, as its outcome shows it (set when it is applied; the
    /// queue keeps it as given, see [`Writer::record_applied`]).
    pub applied: Option<Value>,
}

impl IntentRow {
    /// Whether this intent holds back the approved intents after it in its run: it
    /// awaits a decision or a review, or it is approved but retrying after a
    /// transient error of its own. (An approved intent that is not retrying is
    /// applied before them, in the same step.)
    pub fn holds_back(&self) -> bool {
        matches!(self.state, State::Queued | State::AwaitingReview)
            || (self.state == State::Approved && self.attempts > 0)
    }

    /// The intent, parsed again from the stored bytes (validated at admission).
    pub fn intent(&self) -> Result<airlock_intent::Intent, QueueError> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            QueueError::Corrupt(format!("stored intent {} does not parse: {e}", self.id))
        })
    }
}

const INTENT_COLUMNS: &str = "seq, id, run, target, digest, payload, file, state, decision, \
     approvals_needed, review_deadline, error, attempts, not_before, received_at, updated_at, applied";

/// A row of `intents` as read, its JSON columns (state, decision, error, applied)
/// still text.
type RawIntentRow = (
    IntentRow,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn intent_row(row: &Row<'_>) -> rusqlite::Result<RawIntentRow> {
    let state: String = row.get(7)?;
    let decision: Option<String> = row.get(8)?;
    let error: Option<String> = row.get(11)?;
    let applied: Option<String> = row.get(16)?;
    Ok((
        IntentRow {
            seq: row.get(0)?,
            id: row.get(1)?,
            run: row.get(2)?,
            target: row.get(3)?,
            digest: row.get(4)?,
            payload: row.get(5)?,
            file: row.get(6)?,
            state: State::Queued,
            decision: None,
            approvals_needed: row.get(9)?,
            review_deadline: row.get(10)?,
            error: None,
            attempts: row.get(12)?,
            not_before: row.get(13)?,
            received_at: row.get(14)?,
            updated_at: row.get(15)?,
            applied: None,
        },
        state,
        decision,
        error,
        applied,
    ))
}

fn finish_row(
    (mut row, state, decision, error, applied): RawIntentRow,
) -> Result<IntentRow, QueueError> {
    row.state = state.parse()?;
    row.decision = decision.map(|d| serde_json::from_str(&d)).transpose()?;
    row.error = error.map(|e| serde_json::from_str(&e)).transpose()?;
    row.applied = applied.map(|a| serde_json::from_str(&a)).transpose()?;
    Ok(row)
}

/// A refusal as the queue holds it.
#[derive(Clone, Debug)]
pub struct RefusedRow {
    pub seq: i64,
    pub file: String,
    pub id: Option<String>,
    pub run: Option<String>,
    pub kind: String,
    pub digest: String,
    pub size: u64,
    pub problems: Vec<airlock_intent::Problem>,
    pub received_at: i64,
    /// Whether the refusal's id names an intent in the queue (a conflicting
    /// duplicate, or an invalid file reusing a queued id): its outcome must not
    /// replace that intent's.
    pub id_in_use: bool,
}

/// Which intents [`Queue::page`] lists; `None` matches any.
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter<'a> {
    pub state: Option<State>,
    pub run: Option<&'a str>,
    pub target: Option<&'a str>,
}

/// One reviewer's verdict on an intent.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReviewVote {
    pub reviewer: String,
    pub verdict: String,
    pub digest: String,
    /// For an approval: the digest of the preview (the rows' before-images) the
    /// reviewer saw and approved.
    pub preview: Option<String>,
    pub comment: Option<String>,
    pub at: i64,
}

/// One record of a run's log.
#[derive(Clone, Debug)]
pub struct Record {
    pub run: String,
    pub seq: i64,
    pub intent_id: Option<String>,
    pub event: String,
    /// The exact bytes that were hashed.
    pub body: Vec<u8>,
    /// `sha256:<hex>` of `body`.
    pub digest: String,
}

/// A run and how many of its intents are in each state.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunSummary {
    pub run: String,
    pub counts: BTreeMap<String, u64>,
    pub records: i64,
    pub head: String,
}

/// When a run's head gets a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Checkpoint once this many records are unsealed (1: every commit that adds any).
    pub every_records: u64,
    /// Checkpoint once the oldest unsealed record is this old, in ms (0: no time bound).
    pub every_ms: u64,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            every_records: 1,
            every_ms: 0,
        }
    }
}

/// The queue's levels, as [`Queue::levels`] reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Levels {
    /// Intents per state that is not final; a state with none is absent.
    pub depth: Vec<(State, i64)>,
    /// When the oldest intent awaiting review was received (ms since the epoch).
    pub oldest_review: Option<i64>,
    /// Run-log records not yet covered by a checkpoint, over all runs.
    pub checkpoint_lag: i64,
}

/// The queue database.
#[derive(Debug)]
pub struct Queue {
    conn: Connection,
    path: PathBuf,
    sealer: Option<Arc<Sealer>>,
    policy: CheckpointPolicy,
    max_refused_bytes: u64,
}

impl Queue {
    /// Opens (creating and migrating as needed) `<state_dir>/queue.db`. The state
    /// directory is created with mode 0700 and refused if others could change it, and
    /// the queue's files are 0600: they are Airlock's, not the agent's
    /// ([`crate::state`]).
    pub fn open(state_dir: &Path) -> Result<Self, QueueError> {
        create_private_dir(state_dir)?;
        let path = state_dir.join("queue.db");
        let open_err = |error| QueueError::Open {
            path: path.clone(),
            error,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "wal")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "full")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "on")
            .map_err(open_err)?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(open_err)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(QueueError::TooNew {
                path,
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            tx.execute_batch(migration).map_err(open_err)?;
            tx.pragma_update(None, "user_version", index as i64 + 1)
                .map_err(open_err)?;
        }
        tx.commit().map_err(open_err)?;
        Ok(Self {
            conn,
            path,
            sealer: None,
            policy: CheckpointPolicy::default(),
            max_refused_bytes: DEFAULT_MAX_REFUSED_BYTES,
        })
    }

    /// Caps the bytes of refused files this connection keeps in total (see the
    /// module docs); beyond the cap a refusal keeps its digest and size only.
    pub fn with_max_refused_bytes(mut self, bytes: u64) -> Self {
        self.max_refused_bytes = bytes;
        self
    }

    /// Lets this connection sign checkpoints with `sealer`, under `policy`.
    pub fn with_sealer(mut self, sealer: Arc<Sealer>, policy: CheckpointPolicy) -> Self {
        self.sealer = Some(sealer);
        self.policy = policy;
        self
    }

    /// What the metrics report as levels: intents per state that is not final,
    /// when the oldest intent awaiting review was received, and the run-log records
    /// no checkpoint covers yet.
    pub fn levels(&self) -> Result<Levels, QueueError> {
        let mut depth = Vec::new();
        let mut rows = self.conn.prepare_cached(
            "SELECT state, count(*) FROM intents \
             WHERE state IN ('queued', 'awaiting_review', 'approved') GROUP BY state",
        )?;
        let counts = rows.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get(1)?)))?;
        for count in counts {
            let (state, n): (String, i64) = count?;
            depth.push((state.parse::<State>()?, n));
        }
        let oldest_review = self
            .conn
            .prepare_cached("SELECT min(received_at) FROM intents WHERE state = 'awaiting_review'")?
            .query_row([], |row| row.get(0))?;
        let checkpoint_lag = self
            .conn
            .prepare_cached("SELECT coalesce(sum(head_seq - sealed_seq), 0) FROM runs")?
            .query_row([], |row| row.get(0))?;
        Ok(Levels {
            depth,
            oldest_review,
            checkpoint_lag,
        })
    }

    /// Whether the queue can take a write now: takes the write lock and lets it go,
    /// changing nothing (the readiness probe's state check).
    pub fn writable(&mut self) -> Result<(), QueueError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.rollback()?;
        Ok(())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one transaction and commits it durably: all of its changes, or none.
    pub fn write<T>(
        &mut self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        self.write_with(f)
    }

    /// [`Queue::write`] for a caller whose own error wraps [`QueueError`]: when `f`
    /// refuses (by rules the queue does not know, such as a review's), nothing of
    /// the transaction is kept.
    pub fn write_with<T, E: From<QueueError>>(
        &mut self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(QueueError::from)?;
        let mut writer = Writer {
            tx,
            now: now_ms(),
            touched: BTreeSet::new(),
            refused_bytes: None,
            max_refused_bytes: self.max_refused_bytes,
            seen: Vec::new(),
        };
        let value = f(&mut writer)?;
        if let Some(sealer) = &self.sealer {
            for run in std::mem::take(&mut writer.touched) {
                writer.checkpoint_if_due(&run, sealer, self.policy, false)?;
            }
        }
        writer.tx.commit().map_err(QueueError::from)?;
        // Counted once committed: a rolled-back transaction happened to no intent.
        let metrics = crate::metrics::global();
        for observation in &writer.seen {
            metrics.observe(observation);
        }
        Ok(value)
    }

    /// Checkpoints every run with unsealed records that the policy says is due (or
    /// every such run, with `force`: on a clean stop and before an export). Returns
    /// how many checkpoints were written; none without a key.
    pub fn seal_due(&mut self, force: bool) -> Result<usize, QueueError> {
        let Some(sealer) = self.sealer.clone() else {
            return Ok(0);
        };
        let policy = self.policy;
        let runs: Vec<String> = self
            .conn
            .prepare_cached("SELECT run FROM runs WHERE head_seq > sealed_seq ORDER BY run")?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        if runs.is_empty() {
            return Ok(0);
        }
        self.write(|w| {
            let mut written = 0;
            for run in &runs {
                written += usize::from(w.checkpoint_if_due(run, &sealer, policy, force)?);
            }
            Ok(written)
        })
    }

    /// The lines of the export of `run` (all runs when `None`), in order: each intent's
    /// envelope line just before its `received` record, each record as the exact bytes
    /// that were hashed, and each checkpoint just after the record it covers. The
    /// format is documented in `docs/log-format.md`.
    pub fn export_lines(&self, run: Option<&str>) -> Result<Vec<Vec<u8>>, QueueError> {
        let runs: Vec<String> = match run {
            Some(run) => vec![run.to_owned()],
            None => self
                .conn
                .prepare("SELECT run FROM runs ORDER BY run")?
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?,
        };
        let mut lines = Vec::new();
        for run in runs {
            let mut checkpoints: BTreeMap<i64, Vec<u8>> = self
                .conn
                .prepare_cached("SELECT seq, envelope FROM checkpoints WHERE run = ?1")?
                .query_map([&run], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for record in self.records(&run)? {
                if record.event == log::EventName::Received.as_str()
                    && let Some(id) = &record.intent_id
                {
                    let envelope: Vec<u8> = self
                        .conn
                        .prepare_cached("SELECT envelope FROM intents WHERE id = ?1")?
                        .query_row([id], |row| row.get(0))?;
                    let envelope: Value = serde_json::from_slice(&envelope)?;
                    lines.push(
                        ExportLine::Intent {
                            id: id.clone(),
                            envelope,
                        }
                        .encode()?,
                    );
                }
                let seq = record.seq;
                lines.push(record.body);
                if let Some(envelope) = checkpoints.remove(&seq) {
                    let envelope: Value = serde_json::from_slice(&envelope)?;
                    lines.push(ExportLine::Checkpoint { envelope }.encode()?);
                }
            }
        }
        Ok(lines)
    }

    /// One intent by id.
    pub fn intent(&self, id: &str) -> Result<Option<IntentRow>, QueueError> {
        get_intent(&self.conn, id)
    }

    /// Queued intents whose policy decision is due, oldest first.
    pub fn due_for_decision(&self, now: i64, limit: usize) -> Result<Vec<IntentRow>, QueueError> {
        self.select_intents(
            "WHERE state = 'queued' AND not_before <= ?1 ORDER BY seq LIMIT ?2",
            params![now, limit as i64],
        )
    }

    /// The intents that may apply now: for each run, its first intent that still
    /// blocks the run, when that intent is approved and not backing off. A run whose
    /// first blocking intent awaits review or a decision yields nothing (invariant 7).
    pub fn apply_heads(&self, now: i64, limit: usize) -> Result<Vec<IntentRow>, QueueError> {
        Ok(self
            .apply_chains(now, 1, limit)?
            .into_iter()
            .flatten()
            .collect())
    }

    /// For each run, the approved intents at its front, in queue order: its first
    /// blocking intent and those right after it, up to the first that is not approved
    /// (or is backing off), at most `per_run` of them and `total` in all. Applying a
    /// chain in order keeps per-run order (invariant 7) while a deep queue moves many
    /// intents per step.
    pub fn apply_chains(
        &self,
        now: i64,
        per_run: usize,
        total: usize,
    ) -> Result<Vec<Vec<IntentRow>>, QueueError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, run, state, not_before FROM intents \
             WHERE state IN ('queued', 'awaiting_review', 'approved') ORDER BY run, seq",
        )?;
        let mut rows = stmt.query([])?;
        let mut chains: Vec<Vec<i64>> = Vec::new();
        let mut current: Option<String> = None;
        let mut open = false;
        let mut taken = 0;
        while let Some(row) = rows.next()? {
            if taken >= total {
                break;
            }
            let run: String = row.get(1)?;
            if current.as_deref() != Some(run.as_str()) {
                current = Some(run);
                open = true;
                chains.push(Vec::new());
            }
            let state: String = row.get(2)?;
            let ready = state == "approved" && row.get::<_, i64>(3)? <= now;
            let chain = chains.last_mut().filter(|c| c.len() < per_run);
            match chain {
                Some(chain) if open && ready => {
                    chain.push(row.get(0)?);
                    taken += 1;
                }
                _ => open = false,
            }
        }
        drop(rows);
        chains
            .into_iter()
            .filter(|chain| !chain.is_empty())
            .map(|chain| {
                chain
                    .into_iter()
                    .map(|seq| {
                        let mut found = self.select_intents("WHERE seq = ?1", params![seq])?;
                        found.pop().ok_or_else(|| {
                            QueueError::Corrupt(format!("intent seq {seq} vanished"))
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// What holds back the approved intent `row`: the first intent of its run, queued
    /// before it, that [holds back](IntentRow::holds_back) the intents after it
    /// (it awaits a decision or a review, or it is retrying after a transient
    /// error); `None` when nothing does. That is the intent that ends its run's
    /// chain ([`Queue::apply_chains`]) before `row`. The `intents_holding` index
    /// holds only such intents, so this reads no settled intent of the run.
    pub fn holding_back(&self, row: &IntentRow) -> Result<Option<IntentRow>, QueueError> {
        let mut found = self.select_intents(&holding_back_clause(), params![row.run, row.seq])?;
        Ok(found.pop())
    }

    /// Reviews whose deadline has passed.
    pub fn overdue_reviews(&self, now: i64) -> Result<Vec<IntentRow>, QueueError> {
        self.select_intents(
            "WHERE state = 'awaiting_review' AND review_deadline <= ?1 ORDER BY seq",
            params![now],
        )
    }

    /// Intents of `run` (all runs when `None`) in `state` (any when `None`), in queue order.
    pub fn list(
        &self,
        run: Option<&str>,
        state: Option<State>,
        limit: usize,
    ) -> Result<Vec<IntentRow>, QueueError> {
        self.select_intents(
            "WHERE (?1 IS NULL OR run = ?1) AND (?2 IS NULL OR state = ?2) ORDER BY seq LIMIT ?3",
            params![run, state.map(State::as_str), limit as i64],
        )
    }

    /// One page of intents, newest first: those matching every filter given, with a
    /// queue position below `before` when given.
    pub fn page(
        &self,
        filter: &Filter<'_>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<IntentRow>, QueueError> {
        self.select_intents(
            "WHERE (?1 IS NULL OR run = ?1) AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR target = ?3) \
             AND (?4 IS NULL OR seq < ?4) ORDER BY seq DESC LIMIT ?5",
            params![
                filter.run,
                filter.state.map(State::as_str),
                filter.target,
                before,
                limit as i64
            ],
        )
    }

    /// The keyid of the key that sealed intent `id`'s envelope at intake.
    pub fn keyid(&self, id: &str) -> Result<Option<String>, QueueError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT json_extract(envelope, '$.signatures[0].keyid') FROM intents WHERE id = ?1",
            )?
            .query_row([id], |row| row.get(0))
            .optional()?
            .flatten())
    }

    /// The records about one intent, in log order.
    pub fn intent_records(&self, id: &str) -> Result<Vec<Record>, QueueError> {
        self.select_records("WHERE intent_id = ?1 ORDER BY seq", [id])
    }

    /// A number that grows whenever the queue changes (any record appended), for
    /// telling watchers to look again.
    pub fn change_marker(&self) -> Result<i64, QueueError> {
        Ok(self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(rowid), 0) FROM records")?
            .query_row([], |row| row.get(0))?)
    }

    fn select_intents(
        &self,
        clause: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<IntentRow>, QueueError> {
        let sql = format!("SELECT {INTENT_COLUMNS} FROM intents {clause}");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params, intent_row)?;
        rows.map(|row| finish_row(row?)).collect()
    }

    /// How many intents of `run` are in each state.
    pub fn run_counts(&self, run: &str) -> Result<BTreeMap<String, u64>, QueueError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state, COUNT(*) FROM intents WHERE run = ?1 GROUP BY state")?;
        let rows = stmt.query_map([run], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?.max(0) as u64,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every run, with counts by state and its log head.
    pub fn runs(&self) -> Result<Vec<RunSummary>, QueueError> {
        let mut stmt = self
            .conn
            .prepare("SELECT run, head_seq, head_digest FROM runs ORDER BY run")?;
        let heads = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get(1)?, row.get(2)?))
            })?
            .collect::<Result<Vec<(String, i64, String)>, _>>()?;
        heads
            .into_iter()
            .map(|(run, records, head)| {
                Ok(RunSummary {
                    counts: self.run_counts(&run)?,
                    run,
                    records,
                    head,
                })
            })
            .collect()
    }

    /// The reviews recorded for an intent, in the order they were cast.
    pub fn reviews(&self, id: &str) -> Result<Vec<ReviewVote>, QueueError> {
        get_reviews(&self.conn, id)
    }

    /// The preview digest the approvals of intent `id` bind (what the apply must find
    /// the rows to be), when reviewers approved it; `None` for an intent the policy
    /// allowed without review, or approved before approvals bound previews.
    pub fn review_binding(&self, id: &str) -> Result<Option<String>, QueueError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT r.preview FROM reviews r JOIN intents i ON i.id = r.intent_id \
                 WHERE r.intent_id = ?1 AND r.verdict = 'approve' AND r.digest = i.digest \
                 AND i.approvals_needed > 0 ORDER BY r.at DESC, r.rowid DESC LIMIT 1",
            )?
            .query_row([id], |row| row.get(0))
            .optional()?
            .flatten())
    }

    /// The records of one run, in order.
    pub fn records(&self, run: &str) -> Result<Vec<Record>, QueueError> {
        self.select_records("WHERE run = ?1 ORDER BY seq", [run])
    }

    /// The last `limit` records of one run, in order.
    pub fn last_records(&self, run: &str, limit: usize) -> Result<Vec<Record>, QueueError> {
        let mut records = self.select_records(
            "WHERE run = ?1 ORDER BY seq DESC LIMIT ?2",
            params![run, limit as i64],
        )?;
        records.reverse();
        Ok(records)
    }

    /// One run with its counts and log head, if it exists.
    pub fn run(&self, run: &str) -> Result<Option<RunSummary>, QueueError> {
        let head = self
            .conn
            .prepare_cached("SELECT head_seq, head_digest FROM runs WHERE run = ?1")?
            .query_row([run], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })
            .optional()?;
        let Some((records, head)) = head else {
            return Ok(None);
        };
        Ok(Some(RunSummary {
            run: run.to_owned(),
            counts: self.run_counts(run)?,
            records,
            head,
        }))
    }

    fn select_records(
        &self,
        clause: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<Record>, QueueError> {
        let sql = format!("SELECT run, seq, intent_id, event, body, digest FROM records {clause}");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params, |row| {
            Ok(Record {
                run: row.get(0)?,
                seq: row.get(1)?,
                intent_id: row.get(2)?,
                event: row.get(3)?,
                body: row.get(4)?,
                digest: row.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Intents whose outcome file is not yet written.
    pub fn pending_intent_outcomes(&self, limit: usize) -> Result<Vec<IntentRow>, QueueError> {
        self.select_intents(
            "WHERE outcome_pending = 1 ORDER BY seq LIMIT ?1",
            params![limit as i64],
        )
    }

    /// Refusals whose outcome file is not yet written.
    pub fn pending_refusal_outcomes(&self, limit: usize) -> Result<Vec<RefusedRow>, QueueError> {
        self.select_refused(
            "WHERE r.outcome_pending = 1 ORDER BY r.seq LIMIT ?1",
            params![limit as i64],
        )
    }

    /// Refused files (state `invalid`), of one run when `run` is given, oldest
    /// first.
    pub fn refused(&self, run: Option<&str>, limit: usize) -> Result<Vec<RefusedRow>, QueueError> {
        self.select_refused(
            "WHERE (?1 IS NULL OR r.run = ?1) ORDER BY r.seq LIMIT ?2",
            params![run, limit as i64],
        )
    }

    fn select_refused(
        &self,
        condition: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<RefusedRow>, QueueError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT r.seq, r.file, r.id, r.run, r.kind, r.digest, r.size, r.problems, r.received_at, \
             EXISTS (SELECT 1 FROM intents i WHERE i.id = r.id) \
             FROM refused r {condition}"
        ))?;
        let rows = stmt.query_map(params, |row| {
            Ok((
                RefusedRow {
                    seq: row.get(0)?,
                    file: row.get(1)?,
                    id: row.get(2)?,
                    run: row.get(3)?,
                    kind: row.get(4)?,
                    digest: row.get(5)?,
                    size: row.get::<_, i64>(6)?.max(0) as u64,
                    problems: Vec::new(),
                    received_at: row.get(8)?,
                    id_in_use: row.get(9)?,
                },
                row.get::<_, String>(7)?,
            ))
        })?;
        rows.map(|row| {
            let (mut refused, problems) = row?;
            refused.problems = serde_json::from_str::<Vec<ProblemRow>>(&problems)?
                .into_iter()
                .map(|p| airlock_intent::Problem {
                    pointer: p.pointer,
                    message: p.message,
                })
                .collect();
            Ok(refused)
        })
        .collect()
    }
}

#[derive(serde::Deserialize)]
struct ProblemRow {
    pointer: String,
    message: String,
}

fn get_intent(conn: &Connection, id: &str) -> Result<Option<IntentRow>, QueueError> {
    let sql = format!("SELECT {INTENT_COLUMNS} FROM intents WHERE id = ?1");
    let row = conn
        .prepare_cached(&sql)?
        .query_row([id], intent_row)
        .optional()?;
    row.map(finish_row).transpose()
}

/// Prepares the state directory (created 0700, checked: see [`crate::state`]) and
/// makes `queue.db` and any `-wal`/`-shm` of it mode 0600 before SQLite opens it
/// (SQLite gives those the database's mode).
fn get_reviews(conn: &Connection, id: &str) -> Result<Vec<ReviewVote>, QueueError> {
    let mut stmt = conn.prepare_cached(
        "SELECT reviewer, verdict, digest, comment, at, preview FROM reviews WHERE intent_id = ?1 ORDER BY at, reviewer",
    )?;
    let rows = stmt.query_map([id], |row| {
        Ok(ReviewVote {
            reviewer: row.get(0)?,
            verdict: row.get(1)?,
            digest: row.get(2)?,
            comment: row.get(3)?,
            at: row.get(4)?,
            preview: row.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn create_private_dir(dir: &Path) -> Result<(), QueueError> {
    let err = |path: &Path| {
        let path = path.to_owned();
        move |error| QueueError::StateDir { path, error }
    };
    crate::state::prepare(dir).map_err(err(dir))?;
    let db = dir.join("queue.db");
    crate::state::private_file(&db).map_err(err(&db))?;
    for suffix in ["queue.db-wal", "queue.db-shm"] {
        let path = dir.join(suffix);
        crate::state::tighten_if_present(&path).map_err(err(&path))?;
    }
    Ok(())
}

/// What a policy evaluation produced, to be recorded.
#[derive(Debug)]
pub enum DecisionOutcome<'a> {
    /// The policy decided; reviews get `review_deadline`.
    Decided {
        decision: &'a Decision,
        review_deadline: i64,
    },
    /// The policy could not decide (unavailable, malformed answer): the intent stays
    /// queued and is retried at `retry_at` (DESIGN invariant 4).
    Unavailable { message: &'a str, retry_at: i64 },
}

/// One approval as the review rules decided it ([`crate::review::tally`]), for
/// [`Writer::record_approval`] to persist.
#[derive(Clone, Copy, Debug)]
pub struct Approval<'a> {
    pub reviewer: &'a str,
    /// The digest of the preview the reviewer saw.
    pub preview: &'a str,
    pub comment: Option<&'a str>,
    /// Reviewers whose approvals are void (they saw other rows).
    pub voided: &'a [String],
    /// Approvals that count, this one included.
    pub approvals: u32,
    pub needed: u32,
    pub quorum_met: bool,
}

/// The result of one review vote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewProgress {
    pub state: State,
    pub approvals: u32,
    pub needed: u32,
}

/// Changes made inside one queue transaction (see [`Queue::write`]).
#[derive(Debug)]
pub struct Writer<'q> {
    tx: Transaction<'q>,
    now: i64,
    /// Runs that got records in this transaction.
    touched: BTreeSet<String>,
    /// Bytes kept for all refusals, once a refusal in this transaction read them.
    refused_bytes: Option<u64>,
    max_refused_bytes: u64,
    /// What to count in the metrics once the transaction commits.
    seen: Vec<Observation>,
}

impl Writer<'_> {
    /// The transaction's clock, in ms since the epoch.
    pub fn now(&self) -> i64 {
        self.now
    }

    /// Admits an intent that passed validation.
    pub fn admit(&mut self, arrival: &Arrival) -> Result<Admission, QueueError> {
        let id = arrival.intent.id.as_str();
        let existing: Option<(String, i64)> = self
            .tx
            .prepare_cached("SELECT digest, seq FROM intents WHERE id = ?1")?
            .query_row([id], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        if let Some((existing_digest, _)) = existing {
            if existing_digest == arrival.digest {
                // Re-announce the current state to the agent.
                self.tx
                    .prepare_cached("UPDATE intents SET outcome_pending = 1 WHERE id = ?1")?
                    .execute([id])?;
                return Ok(Admission::Duplicate);
            }
            let problem = airlock_intent::Problem {
                pointer: "/id".into(),
                message: format!(
                    "id {id:?} already names a different intent (digest {existing_digest}); \
                     an id is an idempotency key: give new content a new id"
                ),
            };
            let kept = arrival.bytes.len().min(REFUSED_PAYLOAD_PREFIX);
            self.refuse(&Refusal {
                file: arrival.file.clone(),
                kind: "conflict",
                bytes: arrival.bytes[..kept].to_vec(),
                digest: arrival.digest.clone(),
                size: arrival.bytes.len() as u64,
                id: Some(id.to_owned()),
                run: Some(arrival.intent.run.to_string()),
                problems: vec![problem],
            })?;
            return Ok(Admission::Conflict { existing_digest });
        }
        let intent = &arrival.intent;
        self.tx
            .prepare_cached(
                "INSERT INTO intents (id, run, target, digest, payload, envelope, file, state, received_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?8)",
            )?
            .execute(params![
                id,
                intent.run.as_str(),
                intent.target.as_str(),
                arrival.digest,
                arrival.bytes,
                arrival.envelope,
                arrival.file,
                self.now
            ])?;
        self.append_record(
            intent.run.as_str(),
            Some(id),
            &Entry::Received(log::Received {
                digest: arrival.digest.clone(),
                file: arrival.file.clone(),
                keyid: arrival.keyid.clone(),
                target: intent.target.to_string(),
            }),
        )?;
        self.seen.push(Observation::Received);
        Ok(Admission::Queued)
    }

    /// Keeps a refused file's problems, digest and size, and records the refusal in its
    /// run's log (or [`UNATTRIBUTED_RUN`] when no run could be read). Of its bytes it
    /// keeps the first [`REFUSED_PAYLOAD_PREFIX`], or none once the refusals' total
    /// would pass the connection's cap ([`Queue::with_max_refused_bytes`]).
    ///
    /// A refusal of the same file name with the same bytes is the same submission
    /// seen again (say, a crash came between the commit and the removal of the
    /// file): it is not recorded twice, only announced again.
    pub fn refuse(&mut self, refusal: &Refusal) -> Result<(), QueueError> {
        let seen = self
            .tx
            .prepare_cached(
                "UPDATE refused SET outcome_pending = 1 WHERE file = ?1 AND digest = ?2 AND kind = ?3",
            )?
            .execute(params![refusal.file, refusal.digest, refusal.kind])?;
        if seen > 0 {
            return Ok(());
        }
        let problems = serde_json::to_string(&refusal.problems)?;
        let total = match self.refused_bytes {
            Some(total) => total,
            None => {
                // `length()` of a blob reads its size, not its content.
                let total: i64 = self
                    .tx
                    .prepare_cached("SELECT COALESCE(SUM(length(payload)), 0) FROM refused")?
                    .query_row([], |row| row.get(0))?;
                total.max(0) as u64
            }
        };
        let prefix = &refusal.bytes[..refusal.bytes.len().min(REFUSED_PAYLOAD_PREFIX)];
        let kept: &[u8] = if total.saturating_add(prefix.len() as u64) <= self.max_refused_bytes {
            prefix
        } else {
            &[]
        };
        self.refused_bytes = Some(total + kept.len() as u64);
        self.tx
            .prepare_cached(
                "INSERT INTO refused (file, id, run, kind, digest, size, payload, problems, received_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                refusal.file,
                refusal.id,
                refusal.run,
                refusal.kind,
                refusal.digest,
                refusal.size.min(i64::MAX as u64) as i64,
                kept,
                problems,
                self.now
            ])?;
        let run = refusal.run.as_deref().unwrap_or(UNATTRIBUTED_RUN);
        self.append_record(
            run,
            None,
            &Entry::Invalid(log::Invalid {
                digest: refusal.digest.clone(),
                file: refusal.file.clone(),
                id: refusal.id.clone(),
                kind: refusal.kind.to_owned(),
                problems: refusal.problems.clone(),
            }),
        )
    }

    /// Records the policy's answer for a queued intent.
    pub fn record_decision(
        &mut self,
        id: &str,
        outcome: DecisionOutcome<'_>,
    ) -> Result<State, QueueError> {
        let row = self.intent(id)?;
        match outcome {
            DecisionOutcome::Decided {
                decision,
                review_deadline,
            } => {
                let next = row.state.next(&Event::Decided(decision.verdict))?;
                let (needed, deadline) = match decision.verdict {
                    Verdict::Review { approvals } => (approvals.max(1), Some(review_deadline)),
                    _ => (0, None),
                };
                self.tx
                    .prepare_cached(
                        "UPDATE intents SET state = ?2, decision = ?3, approvals_needed = ?4, \
                         review_deadline = ?5, error = NULL, attempts = 0, not_before = 0, \
                         updated_at = ?6, outcome_pending = 1 WHERE id = ?1",
                    )?
                    .execute(params![
                        id,
                        next.as_str(),
                        serde_json::to_string(decision)?,
                        needed,
                        deadline,
                        self.now
                    ])?;
                self.append_record(
                    &row.run,
                    Some(id),
                    &Entry::Decided(log::Decided {
                        decision: decision.clone(),
                        state: next,
                    }),
                )?;
                self.touch_waiting(&row)?;
                self.seen.push(Observation::Decided {
                    verdict: decision.verdict,
                    seconds: self.since(row.received_at),
                });
                self.note_end(&row, next);
                Ok(next)
            }
            DecisionOutcome::Unavailable { message, retry_at } => {
                let error = json!({ "stage": "decide", "message": message, "retry_at": retry_at });
                self.set_retry(id, &error, retry_at)?;
                Ok(row.state)
            }
        }
    }

    /// Records that a queued intent's names do not resolve in its target (state
    /// Failed, before any policy), with the error for the agent.
    pub fn record_unresolvable(&mut self, id: &str, error: Value) -> Result<State, QueueError> {
        let row = self.intent(id)?;
        let next = row.state.next(&Event::Unresolvable)?;
        self.tx
            .prepare_cached(
                "UPDATE intents SET state = ?2, error = ?3, updated_at = ?4, outcome_pending = 1 WHERE id = ?1",
            )?
            .execute(params![id, next.as_str(), serde_json::to_string(&error)?, self.now])?;
        self.append_record(
            &row.run,
            Some(id),
            &Entry::Failed(log::Failed {
                error,
                detail: None,
            }),
        )?;
        self.touch_waiting(&row)?;
        self.note_end(&row, next);
        Ok(next)
    }

    /// Records one reviewer's approval of intent `row` (read in this transaction),
    /// as the review rules decided it ([`crate::review`]): the approvals of the
    /// reviewers in `approval.voided` are deleted (they saw other rows), the vote is
    /// stored with the preview its reviewer saw, and the intent takes
    /// [`Event::Approval`], recorded as `approved` when the quorum is met, else as
    /// `approval`.
    pub fn record_approval(
        &mut self,
        row: &IntentRow,
        approval: &Approval<'_>,
    ) -> Result<ReviewProgress, QueueError> {
        let id = row.id.as_str();
        let mut void = self.tx.prepare_cached(
            "DELETE FROM reviews WHERE intent_id = ?1 AND reviewer = ?2 AND verdict = 'approve'",
        )?;
        for reviewer in approval.voided {
            void.execute([id, reviewer.as_str()])?;
        }
        drop(void);
        self.tx
            .prepare_cached(
                "INSERT INTO reviews (intent_id, reviewer, verdict, digest, comment, at, preview) \
                 VALUES (?1, ?2, 'approve', ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                id,
                approval.reviewer,
                row.digest,
                approval.comment,
                self.now,
                approval.preview
            ])?;
        let quorum_met = approval.quorum_met;
        let next = row.state.next(&Event::Approval { quorum_met })?;
        self.set_state(id, next)?;
        self.append_record(
            &row.run,
            Some(id),
            &if quorum_met {
                Entry::Approved(approval_data(approval, &row.digest))
            } else {
                Entry::Approval(approval_data(approval, &row.digest))
            },
        )?;
        if next != row.state {
            self.touch_waiting(row)?;
        }
        Ok(ReviewProgress {
            state: next,
            approvals: approval.approvals,
            needed: approval.needed,
        })
    }

    /// Records `reviewer`'s rejection of intent `row` (read in this transaction) with
    /// the `reason` the agent will see: it replaces any earlier vote of theirs, and
    /// the intent takes [`Event::Rejection`].
    pub fn record_rejection(
        &mut self,
        row: &IntentRow,
        reviewer: &str,
        reason: &str,
    ) -> Result<State, QueueError> {
        let id = row.id.as_str();
        self.tx
            .prepare_cached("DELETE FROM reviews WHERE intent_id = ?1 AND reviewer = ?2")?
            .execute([id, reviewer])?;
        self.tx
            .prepare_cached(
                "INSERT INTO reviews (intent_id, reviewer, verdict, digest, comment, at) \
                 VALUES (?1, ?2, 'reject', ?3, ?4, ?5)",
            )?
            .execute(params![id, reviewer, row.digest, reason, self.now])?;
        let next = row.state.next(&Event::Rejection)?;
        self.set_state(id, next)?;
        self.append_record(
            &row.run,
            Some(id),
            &Entry::Rejected(log::Rejected {
                by: reviewer.to_owned(),
                digest: row.digest.clone(),
                reason: reason.to_owned(),
            }),
        )?;
        self.touch_waiting(row)?;
        self.note_end(row, next);
        Ok(next)
    }

    /// Expires a review that outlived its deadline (reviews that time out never pass).
    pub fn expire(&mut self, id: &str) -> Result<State, QueueError> {
        let row = self.intent(id)?;
        let next = row.state.next(&Event::Expiry)?;
        self.set_state(id, next)?;
        self.append_record(
            &row.run,
            Some(id),
            &Entry::Expired(log::Expired {
                deadline: row.review_deadline,
            }),
        )?;
        self.touch_waiting(&row)?;
        self.note_end(&row, next);
        Ok(next)
    }

    /// Records that an intent's writes are committed in its target: `applied` for
    /// the run log, and `written`, what its outcome shows of what it wrote (the
    /// outcome module's summary; the queue keeps it as given, so that writing the
    /// outcome never reads the log).
    pub fn record_applied(
        &mut self,
        id: &str,
        applied: log::Applied,
        written: &Value,
    ) -> Result<State, QueueError> {
        let row = self.intent(id)?;
        let next = row.state.next(&Event::ApplySucceeded)?;
        self.tx
            .prepare_cached(
                "UPDATE intents SET state = ?2, error = NULL, applied = ?3, updated_at = ?4, \
                 outcome_pending = 1 WHERE id = ?1",
            )?
            .execute(params![
                id,
                next.as_str(),
                serde_json::to_string(written)?,
                self.now
            ])?;
        if let Some(decided_at) = self.let_through_at(id) {
            self.seen.push(Observation::Applied {
                seconds: self.since(decided_at),
            });
        }
        self.append_record(&row.run, Some(id), &Entry::Applied(applied))?;
        if row.holds_back() {
            self.touch_waiting(&row)?;
        }
        self.note_end(&row, next);
        Ok(next)
    }

    /// Records that an applied intent's writes were reverted in its target (state
    /// Undone); `undone` says by whom, whether forced, and any overridden conflicts.
    pub fn record_undone(&mut self, id: &str, undone: log::Undone) -> Result<State, QueueError> {
        let row = self.intent(id)?;
        let next = row.state.next(&Event::Undo)?;
        self.set_state(id, next)?;
        self.append_record(&row.run, Some(id), &Entry::Undone(undone))?;
        self.note_end(&row, next);
        Ok(next)
    }

    /// Records a permanent apply failure (terminal) with the error for the agent.
    /// `detail` (values read from the database) is for humans: it goes in the run
    /// log's record only, never in the intent's `error`, which outcomes show.
    pub fn record_failed(
        &mut self,
        id: &str,
        error: Value,
        detail: Option<&str>,
    ) -> Result<State, QueueError> {
        let row = self.intent(id)?;
        let next = row.state.next(&Event::ApplyFailed { permanent: true })?;
        self.tx
            .prepare_cached(
                "UPDATE intents SET state = ?2, error = ?3, updated_at = ?4, outcome_pending = 1 WHERE id = ?1",
            )?
            .execute(params![id, next.as_str(), serde_json::to_string(&error)?, self.now])?;
        self.append_record(
            &row.run,
            Some(id),
            &Entry::Failed(log::Failed {
                error,
                detail: detail.map(str::to_owned),
            }),
        )?;
        if row.holds_back() {
            self.touch_waiting(&row)?;
        }
        self.note_end(&row, next);
        Ok(next)
    }

    /// Sends an approved intent back to review because the rows it touches changed
    /// since its reviewers saw them: its approvals are void, it waits for a new
    /// review until `review_deadline`, and `error` (for the agent) says why. The
    /// record `rows_changed` holds the error, the human-only `detail` and who had
    /// approved.
    pub fn record_rows_changed(
        &mut self,
        id: &str,
        error: Value,
        detail: Option<&str>,
        review_deadline: i64,
    ) -> Result<State, QueueError> {
        let row = self.intent(id)?;
        let next = row.state.next(&Event::RowsChanged)?;
        let voided = self.void_approvals(id)?;
        self.tx
            .prepare_cached(
                "UPDATE intents SET state = ?2, error = ?3, review_deadline = ?4, attempts = 0, \
                 not_before = 0, updated_at = ?5, outcome_pending = 1 WHERE id = ?1",
            )?
            .execute(params![
                id,
                next.as_str(),
                serde_json::to_string(&error)?,
                review_deadline,
                self.now
            ])?;
        self.append_record(
            &row.run,
            Some(id),
            &Entry::RowsChanged(log::RowsChanged {
                deadline: review_deadline,
                detail: detail.map(str::to_owned),
                error,
                state: next,
                voided,
            }),
        )?;
        self.touch_waiting(&row)?;
        self.note_end(&row, next);
        Ok(next)
    }

    /// Deletes every approval of intent `id` and answers their reviewers, in order.
    fn void_approvals(&self, id: &str) -> Result<Vec<String>, QueueError> {
        let condition = "intent_id = ?1 AND verdict = 'approve'";
        let voided: Vec<String> = self
            .tx
            .prepare_cached(&format!(
                "SELECT reviewer FROM reviews WHERE {condition} ORDER BY at, reviewer"
            ))?
            .query_map([id], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        self.tx
            .prepare_cached(&format!("DELETE FROM reviews WHERE {condition}"))?
            .execute([id])?;
        Ok(voided)
    }

    /// Records a transient failure: the intent stays where it is until `retry_at`.
    /// An approved intent now holds back the rest of its run until it is applied,
    /// and their outcomes say so.
    pub fn record_retry(
        &mut self,
        id: &str,
        error: Value,
        retry_at: i64,
    ) -> Result<(), QueueError> {
        let row = self.intent(id)?;
        self.set_retry(id, &error, retry_at)?;
        if row.state == State::Approved {
            self.touch_waiting(&row)?;
        }
        Ok(())
    }

    /// Flags for rewriting the outcomes of the approved intents queued after `row`
    /// in its run, whose outcomes may name it as what holds them back
    /// ([`Queue::holding_back`]): called in the transaction that changes an intent
    /// that held them back or now does (its state, its review deadline, its retry
    /// time), so their outcomes never keep a stale reason. Bounded by the run's
    /// approved intents, which the `intents_approved` index finds without reading
    /// the run's settled ones.
    fn touch_waiting(&self, row: &IntentRow) -> Result<(), QueueError> {
        self.tx
            .prepare_cached(TOUCH_WAITING)?
            .execute(params![row.run, row.seq])?;
        Ok(())
    }

    /// Marks outcome files as written.
    pub fn outcomes_written(
        &mut self,
        intents: &[i64],
        refusals: &[i64],
    ) -> Result<(), QueueError> {
        let mut stmt = self
            .tx
            .prepare_cached("UPDATE intents SET outcome_pending = 0 WHERE seq = ?1")?;
        for seq in intents {
            stmt.execute([seq])?;
        }
        let mut stmt = self
            .tx
            .prepare_cached("UPDATE refused SET outcome_pending = 0 WHERE seq = ?1")?;
        for seq in refusals {
            stmt.execute([seq])?;
        }
        Ok(())
    }

    /// Intent `id` as this transaction sees it.
    pub fn intent(&self, id: &str) -> Result<IntentRow, QueueError> {
        get_intent(&self.tx, id)?.ok_or_else(|| QueueError::NotFound(id.to_owned()))
    }

    /// The reviews of intent `id` as this transaction sees them, in the order they
    /// were cast.
    pub fn reviews(&self, id: &str) -> Result<Vec<ReviewVote>, QueueError> {
        get_reviews(&self.tx, id)
    }

    fn set_state(&self, id: &str, state: State) -> Result<(), QueueError> {
        self.tx
            .prepare_cached(
                "UPDATE intents SET state = ?2, updated_at = ?3, outcome_pending = 1 WHERE id = ?1",
            )?
            .execute(params![id, state.as_str(), self.now])?;
        Ok(())
    }

    fn set_retry(&self, id: &str, error: &Value, retry_at: i64) -> Result<(), QueueError> {
        self.tx
            .prepare_cached(
                "UPDATE intents SET error = ?2, attempts = attempts + 1, not_before = ?3, \
                 updated_at = ?4, outcome_pending = 1 WHERE id = ?1",
            )?
            .execute(params![
                id,
                serde_json::to_string(error)?,
                retry_at,
                self.now
            ])?;
        Ok(())
    }

    /// Appends a record to `run`'s log, chained to the previous one.
    /// Seconds from `at` (ms since the epoch) to this transaction's clock.
    fn since(&self, at: i64) -> f64 {
        (self.now - at).max(0) as f64 / 1_000.0
    }

    /// Counts `row`'s move to `next` when it ends there (a final state reached from
    /// one that was not: undoing an applied intent ends nothing new).
    fn note_end(&mut self, row: &IntentRow, next: State) {
        if next.is_final() && !row.state.is_final() {
            self.seen.push(Observation::Ended {
                state: next,
                seconds: self.since(row.received_at),
            });
        }
    }

    /// When the decision that let intent `id` through was recorded (its last
    /// `decided` or `approved` record), in ms since the epoch; `None` when it
    /// cannot be read, since a metric must never fail an apply.
    fn let_through_at(&self, id: &str) -> Option<i64> {
        self.tx
            .prepare_cached(
                "SELECT max(json_extract(CAST(body AS TEXT), '$.at')) FROM records \
                 WHERE intent_id = ?1 AND event IN ('decided', 'approved')",
            )
            .and_then(|mut statement| statement.query_row([id], |row| row.get::<_, Option<i64>>(0)))
            .ok()
            .flatten()
    }

    fn append_record(
        &mut self,
        run: &str,
        intent_id: Option<&str>,
        entry: &Entry,
    ) -> Result<(), QueueError> {
        let head: Option<(i64, String)> = self
            .tx
            .prepare_cached("SELECT head_seq, head_digest FROM runs WHERE run = ?1")?
            .query_row([run], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        let head = match &head {
            Some((seq, digest)) => Some((
                u64::try_from(*seq)
                    .map_err(|_| QueueError::Corrupt(format!("run {run} has head seq {seq}")))?,
                digest.as_str(),
            )),
            None => None,
        };
        let link = Link::after(head);
        let seq = link.seq;
        let (body, digest) = log::Record {
            run,
            link,
            intent: intent_id,
            entry,
            at: self.now,
        }
        .encode()?;
        let event = entry.name().as_str();
        self.tx
            .prepare_cached(
                "INSERT INTO records (run, seq, intent_id, event, body, digest) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![run, seq as i64, intent_id, event, body, digest])?;
        self.tx
            .prepare_cached(
                "INSERT INTO runs (run, head_seq, head_digest) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (run) DO UPDATE SET head_seq = excluded.head_seq, head_digest = excluded.head_digest",
            )?
            .execute(params![run, seq as i64, digest])?;
        self.touched.insert(run.to_owned());
        Ok(())
    }

    /// Signs a checkpoint over `run`'s head if it has unsealed records and the policy
    /// (or `force`) says so. Returns whether one was written.
    fn checkpoint_if_due(
        &mut self,
        run: &str,
        sealer: &Sealer,
        policy: CheckpointPolicy,
        force: bool,
    ) -> Result<bool, QueueError> {
        let (head_seq, head_digest, sealed_seq, sealed_at): (i64, String, i64, i64) = self
            .tx
            .prepare_cached(
                "SELECT head_seq, head_digest, sealed_seq, sealed_at FROM runs WHERE run = ?1",
            )?
            .query_row([run], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })?;
        let unsealed = head_seq - sealed_seq;
        if unsealed <= 0 {
            return Ok(false);
        }
        let due = force
            || unsealed as u64 >= policy.every_records.max(1)
            || (policy.every_ms > 0 && self.now - sealed_at >= policy.every_ms as i64);
        if !due {
            return Ok(false);
        }
        let seq = u64::try_from(head_seq)
            .map_err(|_| QueueError::Corrupt(format!("run {run} has head seq {head_seq}")))?;
        let payload = CheckpointPayload::new(run, seq, &head_digest, self.now).encode()?;
        let envelope = sealer
            .seal(seal::CHECKPOINT_PAYLOAD_TYPE, payload)
            .to_json()
            .map_err(|e| QueueError::Corrupt(format!("cannot encode checkpoint: {e}")))?;
        self.tx
            .prepare_cached(
                "INSERT INTO checkpoints (run, seq, envelope, at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (run, seq) DO NOTHING",
            )?
            .execute(params![run, head_seq, envelope, self.now])?;
        self.tx
            .prepare_cached("UPDATE runs SET sealed_seq = ?2, sealed_at = ?3 WHERE run = ?1")?
            .execute(params![run, head_seq, self.now])?;
        Ok(true)
    }
}

/// The data of an `approval` or `approved` record of an intent with digest `digest`.
fn approval_data(approval: &Approval<'_>, digest: &str) -> log::Approval {
    log::Approval {
        approvals: approval.approvals,
        by: approval.reviewer.to_owned(),
        comment: approval.comment.map(str::to_owned),
        digest: digest.to_owned(),
        needed: approval.needed,
        preview: approval.preview.to_owned(),
        voided: approval.voided.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied_to(target: &str) -> log::Applied {
        log::Applied {
            already: false,
            ops: json!([]),
            target: target.to_owned(),
            undo: json!([]),
        }
    }

    fn arrival(id: &str, run: &str, body: &str) -> Arrival {
        let text = format!(
            r#"{{"version":1,"id":"{id}","run":"{run}","ops":[{{"op":"insert","table":"t","values":{{"a":"{body}"}}}}],"reason":"r","provenance":{{"agent":"a"}}}}"#
        );
        Arrival {
            file: format!("{id}.json"),
            digest: seal::digest(text.as_bytes()),
            envelope: b"{}".to_vec(),
            keyid: "k".into(),
            intent: serde_json::from_str(&text).unwrap(),
            bytes: text.into_bytes(),
        }
    }

    fn decision(verdict: Verdict) -> Decision {
        serde_json::from_value(json!({
            "verdict": match verdict { Verdict::Allow => "allow", Verdict::Deny => "deny", Verdict::Review { .. } => "review" },
            "approvals": match verdict { Verdict::Review { approvals } => approvals, _ => 1 },
            "reasons": ["because"],
            "policy": "sha256:00",
            "decision_id": null,
        }))
        .unwrap()
    }

    /// Records `reviewer`'s approval of the preview "p", as the review rules
    /// decided it: `approvals` of `needed`.
    fn approve(
        q: &mut Queue,
        id: &str,
        reviewer: &str,
        approvals: u32,
        needed: u32,
    ) -> ReviewProgress {
        q.write(|w| {
            let row = w.intent(id)?;
            w.record_approval(
                &row,
                &Approval {
                    reviewer,
                    preview: "p",
                    comment: None,
                    voided: &[],
                    approvals,
                    needed,
                    quorum_met: approvals >= needed,
                },
            )
        })
        .unwrap()
    }

    fn decide(q: &mut Queue, id: &str, verdict: Verdict) -> State {
        let d = decision(verdict);
        q.write(|w| {
            w.record_decision(
                id,
                DecisionOutcome::Decided {
                    decision: &d,
                    review_deadline: i64::MAX,
                },
            )
        })
        .unwrap()
    }

    #[test]
    fn admission_is_idempotent_and_refuses_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        let a = arrival("i1", "r", "x");
        assert_eq!(q.write(|w| w.admit(&a)).unwrap(), Admission::Queued);
        assert_eq!(q.write(|w| w.admit(&a)).unwrap(), Admission::Duplicate);
        let other = arrival("i1", "r", "y");
        assert!(matches!(
            q.write(|w| w.admit(&other)).unwrap(),
            Admission::Conflict { .. }
        ));
        assert_eq!(q.list(None, None, 10).unwrap().len(), 1);
        assert_eq!(q.pending_refusal_outcomes(10).unwrap().len(), 1);
        // A failed transaction leaves nothing behind.
        let b = arrival("i2", "r", "x");
        let err = q.write(|w| {
            w.admit(&b)?;
            Err::<(), _>(QueueError::Corrupt("abort".into()))
        });
        assert!(err.is_err());
        assert!(q.intent("i2").unwrap().is_none());
    }

    fn junk(file: &str, id: Option<&str>, len: usize) -> Refusal {
        let bytes = vec![b'x'; len];
        Refusal {
            file: file.into(),
            kind: "invalid",
            digest: seal::digest(&bytes),
            size: len as u64,
            bytes,
            id: id.map(str::to_owned),
            run: None,
            problems: vec![airlock_intent::Problem {
                pointer: String::new(),
                message: "not JSON".into(),
            }],
        }
    }

    /// (file, stored payload length, size) of every refusal, in order.
    fn stored(q: &Queue) -> Vec<(String, i64, i64)> {
        let mut stmt = q
            .conn
            .prepare("SELECT file, length(payload), size FROM refused ORDER BY seq")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn refusals_keep_a_prefix_within_a_total_cap_that_survives_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let cap = 3 * REFUSED_PAYLOAD_PREFIX as u64 - 1;
        let mut q = Queue::open(dir.path()).unwrap().with_max_refused_bytes(cap);
        let big = 1 << 20;
        q.write(|w| {
            w.refuse(&junk("a.json", None, big))?;
            w.refuse(&junk("b.json", None, 10))
        })
        .unwrap();
        q.write(|w| w.refuse(&junk("c.json", None, big))).unwrap();
        let prefix = REFUSED_PAYLOAD_PREFIX as i64;
        assert_eq!(
            stored(&q),
            [
                ("a.json".into(), prefix, big as i64),
                ("b.json".into(), 10, 10),
                ("c.json".into(), prefix, big as i64),
            ]
        );
        // Full: only digests now, in this connection and after a restart.
        q.write(|w| w.refuse(&junk("d.json", None, 5000))).unwrap();
        drop(q);
        let mut q = Queue::open(dir.path()).unwrap().with_max_refused_bytes(cap);
        q.write(|w| w.refuse(&junk("e.json", None, big))).unwrap();
        let rows = stored(&q);
        assert_eq!(rows[3], ("d.json".into(), 0, 5000));
        assert_eq!(rows[4], ("e.json".into(), 0, big as i64));
        // The digest still covers every byte.
        let digest: String = q
            .conn
            .query_row(
                "SELECT digest FROM refused WHERE file = 'e.json'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(digest, seal::digest(&vec![b'x'; big]));
        // A larger cap makes room again.
        drop(q);
        let mut q = Queue::open(dir.path())
            .unwrap()
            .with_max_refused_bytes(cap + 100);
        q.write(|w| w.refuse(&junk("f.json", None, 50))).unwrap();
        assert_eq!(stored(&q)[5], ("f.json".into(), 50, 50));
    }

    #[test]
    fn a_refusal_knows_when_its_id_names_a_queued_intent() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        q.write(|w| w.admit(&arrival("i1", "r", "x"))).unwrap();
        let conflict = arrival("i1", "r", "y");
        q.write(|w| {
            w.admit(&conflict)?;
            w.refuse(&junk("bad.json", Some("i1"), 10))?;
            w.refuse(&junk("other.json", Some("i2"), 10))
        })
        .unwrap();
        let rows = q.pending_refusal_outcomes(10).unwrap();
        let in_use: Vec<_> = rows
            .iter()
            .map(|r| (r.file.as_str(), r.id_in_use))
            .collect();
        assert_eq!(
            in_use,
            [("i1.json", true), ("bad.json", true), ("other.json", false)]
        );
        assert_eq!(rows[0].kind, "conflict");
        assert_eq!(rows[0].digest, conflict.digest);
    }

    #[test]
    fn a_run_applies_in_order_and_waits_for_reviews() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        for (id, run) in [("a1", "A"), ("a2", "A"), ("b1", "B")] {
            q.write(|w| w.admit(&arrival(id, run, id))).unwrap();
        }
        // Nothing applies before a decision.
        assert!(q.apply_heads(i64::MAX, 10).unwrap().is_empty());
        decide(&mut q, "a2", Verdict::Allow);
        assert!(
            q.apply_heads(i64::MAX, 10).unwrap().is_empty(),
            "a1 holds back a2"
        );
        assert_eq!(
            decide(&mut q, "a1", Verdict::Review { approvals: 2 }),
            State::AwaitingReview
        );
        decide(&mut q, "b1", Verdict::Allow);
        let heads: Vec<String> = q
            .apply_heads(i64::MAX, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(heads, vec!["b1"]);

        // Two approvals (the review rules, in `review`, decided they count).
        let first = approve(&mut q, "a1", "alice", 1, 2);
        assert_eq!(
            (first.state, first.approvals, first.needed),
            (State::AwaitingReview, 1, 2)
        );
        assert_eq!(approve(&mut q, "a1", "bob", 2, 2).state, State::Approved);
        let votes = q.reviews("a1").unwrap();
        let digest = q.intent("a1").unwrap().unwrap().digest;
        assert_eq!(votes.len(), 2);
        assert!(
            votes
                .iter()
                .all(|v| v.digest == digest && v.preview.as_deref() == Some("p"))
        );
        let heads: Vec<String> = q
            .apply_heads(i64::MAX, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(heads, vec!["a1", "b1"]);
        q.write(|w| w.record_applied("a1", applied_to("t"), &json!({})))
            .unwrap();
        let heads: Vec<String> = q
            .apply_heads(i64::MAX, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(heads, vec!["a2", "b1"]);
        // Applied is final for the lifecycle: applying again is illegal.
        assert!(
            q.write(|w| w.record_applied("a1", applied_to("t"), &json!({})))
                .is_err()
        );
    }

    #[test]
    fn chains_stop_at_the_first_intent_that_is_not_approved() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        for id in ["a1", "a2", "a3", "a4"] {
            q.write(|w| w.admit(&arrival(id, "A", id))).unwrap();
        }
        q.write(|w| w.admit(&arrival("b1", "B", "b1"))).unwrap();
        for id in ["a1", "a2", "a4", "b1"] {
            decide(&mut q, id, Verdict::Allow);
        }
        decide(&mut q, "a3", Verdict::Review { approvals: 1 });
        let ids = |chains: Vec<Vec<IntentRow>>| -> Vec<Vec<String>> {
            chains
                .into_iter()
                .map(|c| c.into_iter().map(|r| r.id).collect())
                .collect()
        };
        assert_eq!(
            ids(q.apply_chains(i64::MAX, 10, 10).unwrap()),
            vec![vec!["a1", "a2"], vec!["b1"]]
        );
        assert_eq!(
            ids(q.apply_chains(i64::MAX, 1, 10).unwrap()),
            vec![vec!["a1"], vec!["b1"]]
        );
        assert_eq!(
            ids(q.apply_chains(i64::MAX, 10, 1).unwrap()),
            vec![vec!["a1"]]
        );
        // A backing-off intent ends its chain until its retry time.
        q.write(|w| w.record_retry("a2", json!({}), 1_000)).unwrap();
        assert_eq!(
            ids(q.apply_chains(999, 10, 10).unwrap()),
            vec![vec!["a1"], vec!["b1"]]
        );
        assert_eq!(
            ids(q.apply_chains(1_000, 10, 10).unwrap()),
            vec![vec!["a1", "a2"], vec!["b1"]]
        );
    }

    /// The ids of the intents whose outcomes are flagged for writing; clears the
    /// flags, as writing them would.
    fn flagged(q: &mut Queue) -> Vec<String> {
        let rows = q.pending_intent_outcomes(100).unwrap();
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        q.write(|w| w.outcomes_written(&seqs, &[])).unwrap();
        rows.into_iter().map(|r| r.id).collect()
    }

    fn holder(q: &Queue, id: &str) -> Option<String> {
        let row = q.intent(id).unwrap().unwrap();
        q.holding_back(&row).unwrap().map(|r| r.id)
    }

    #[test]
    fn what_holds_an_approved_intent_back_and_its_changes_reach_the_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path()).unwrap();
        for (id, run) in [
            ("a1", "A"),
            ("a2", "A"),
            ("a3", "A"),
            ("a4", "A"),
            ("b1", "B"),
        ] {
            q.write(|w| w.admit(&arrival(id, run, id))).unwrap();
        }
        decide(&mut q, "a2", Verdict::Allow);
        // a1 awaits a decision: it holds a2 back.
        assert_eq!(holder(&q, "a2").as_deref(), Some("a1"));
        flagged(&mut q);
        decide(&mut q, "a1", Verdict::Review { approvals: 1 });
        decide(&mut q, "a3", Verdict::Allow);
        decide(&mut q, "b1", Verdict::Allow);
        // a1's decision rewrites a2's outcome (a1 now awaits review).
        assert_eq!(flagged(&mut q), ["a1", "a2", "a3", "b1"]);
        assert_eq!(holder(&q, "a3").as_deref(), Some("a1"));
        assert_eq!(holder(&q, "a1"), None);
        assert_eq!(holder(&q, "b1"), None);

        // Approved, a1 no longer holds anything back: it applies first, in the same
        // chain. Only its own run's approved intents after it are told.
        approve(&mut q, "a1", "alice", 1, 1);
        assert_eq!(flagged(&mut q), ["a1", "a2", "a3"]);
        assert_eq!(holder(&q, "a3"), None);
        // Retrying after a transient error, it holds them back again.
        q.write(|w| w.record_retry("a1", json!({}), 5_000)).unwrap();
        assert_eq!(flagged(&mut q), ["a1", "a2", "a3"]);
        assert_eq!(holder(&q, "a2").as_deref(), Some("a1"));
        // Applied after its retry: they are told again.
        q.write(|w| w.record_applied("a1", applied_to("t"), &json!({})))
            .unwrap();
        assert_eq!(flagged(&mut q), ["a1", "a2", "a3"]);
        assert_eq!(holder(&q, "a3"), None);
        // An intent that held nothing back changes nothing for the others.
        q.write(|w| w.record_applied("a2", applied_to("t"), &json!({})))
            .unwrap();
        assert_eq!(flagged(&mut q), ["a2"]);
        // a4 still awaits a decision; it holds back nothing before it.
        assert_eq!(holder(&q, "a3"), None);
        assert_eq!(holder(&q, "a4"), None);
    }

    /// The queries behind waiting outcomes read only the intents they are about:
    /// SQLite answers them from the partial indexes, not by reading a run's
    /// settled intents (which would make a deep run quadratic).
    #[test]
    fn the_waiting_queries_use_their_partial_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path()).unwrap();
        let plan = |sql: &str| -> String {
            let mut stmt = q
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap();
            let rows = stmt
                .query_map(params!["r", 1], |row| row.get::<_, String>(3))
                .unwrap();
            rows.collect::<Result<Vec<_>, _>>().unwrap().join("; ")
        };
        let holding = plan(&format!(
            "SELECT seq FROM intents {}",
            holding_back_clause()
        ));
        assert!(holding.contains("intents_holding"), "{holding}");
        let touch = plan(TOUCH_WAITING);
        assert!(touch.contains("intents_approved"), "{touch}");
    }

    #[test]
    fn records_chain_and_checkpoints_seal_them() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Arc::new(Sealer::generate().unwrap());
        let mut q = Queue::open(dir.path())
            .unwrap()
            .with_sealer(sealer.clone(), CheckpointPolicy::default());
        q.write(|w| w.admit(&arrival("i1", "R", "x"))).unwrap();
        decide(&mut q, "i1", Verdict::Deny);
        let records = q.records("R").unwrap();
        assert_eq!(records.len(), 2);
        let second: Value = serde_json::from_slice(&records[1].body).unwrap();
        assert_eq!(second["prev"], json!(records[0].digest));
        assert_eq!(second["seq"], 2);
        assert_eq!(records[1].digest, seal::digest(&records[1].body));
        let lines = q.export_lines(Some("R")).unwrap();
        // intent, received, checkpoint, decided, checkpoint
        let kinds: Vec<String> = lines
            .iter()
            .map(|l| {
                serde_json::from_slice::<Value>(l).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            kinds,
            ["intent", "record", "checkpoint", "record", "checkpoint"]
        );
        let last: Value = serde_json::from_slice(&lines[4]).unwrap();
        let envelope =
            seal::Envelope::from_json(&serde_json::to_vec(&last["envelope"]).unwrap()).unwrap();
        let payload = sealer
            .verifier()
            .verify_as(&envelope, seal::CHECKPOINT_PAYLOAD_TYPE)
            .unwrap();
        let payload: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(payload["head"], json!(records[1].digest));

        // Without the key (the CLI), records wait unsealed until the daemon seals them.
        let mut unkeyed = Queue::open(dir.path()).unwrap();
        unkeyed
            .write(|w| w.admit(&arrival("i2", "R", "y")))
            .unwrap();
        assert_eq!(unkeyed.seal_due(true).unwrap(), 0);
        assert_eq!(q.seal_due(false).unwrap(), 1);
        assert_eq!(q.seal_due(true).unwrap(), 0);
    }
}
