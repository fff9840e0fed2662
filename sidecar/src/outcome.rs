//! Outcomes: what the agent reads back, one JSON file per intent in the results
//! directory (`<intents>/results` by default).
//!
//! The file is `<id>.json` for an intent whose id could be read, and is named after
//! the submitted file otherwise (an unparsable `foo.json` gets `foo.json`). It is
//! rewritten at each state change, always atomically (a temporary file renamed over
//! the old one), so a reader never sees a partial document. `final: true` means the
//! state will not change on its own.
//!
//! A refused file never takes another intent's outcome: when its id already names
//! an intent in the queue (a conflicting duplicate: same id, other bytes), its
//! outcome is `<id>.conflict-<digest16>.json`, `<digest16>` being the first 16 hex
//! digits of the refused bytes' SHA-256. A refused file without a usable id whose
//! name cannot serve as an outcome name (not UTF-8, longer than
//! [`MAX_PLAIN_NAME`] bytes, or a claim left by a crash, which starts with a dot)
//! gets `name-<hex16>.json`, the first 16 hex digits of the SHA-256 of the raw name
//! bytes; its `file` field says the same.
//!
//! Outcome files are a view of the queue, not a record: the queue flags each change
//! until its file is written, so a crash in between rewrites it at the next start.
//!
//! The document is published as `intent-schema/outcome.schema.json`
//! ([`airlock_intent::OUTCOME_SCHEMA`], `airlock schema --outcome`), which every
//! field here must match. Besides the state, it tells the agent:
//! - **what an approved intent waits for** ([`WaitingFor`]): the earlier intent of
//!   its run that holds it back ([`Queue::holding_back`](crate::queue::Queue::holding_back)).
//!   The queue flags the waiting outcomes whenever that intent changes, so the
//!   reason is rewritten rather than left stale;
//! - **what an applied intent wrote** ([`Written`]): rows and primary keys per op,
//!   from the target's undo images (never other column values), kept on the
//!   intent's row when it is applied, so no outcome reads the run log;
//! - **whether to try again** ([`Retry`]) for every final state that is not a
//!   success: which id to use (an id that entered the queue is spent) and what
//!   must change;
//! - the **trace id** of the intent's `provenance.traceparent`.
//!
//! The results directory is the agent's: [`Outcomes`] never writes through a link
//! planted there, and holds outcomes back while the directory is swapped.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

use crate::apply::{Applied, Image, codes};
use crate::clock::timestamp;
use crate::lifecycle::{Decision, State};
use crate::queue::{IntentRow, Queue, QueueError, RefusedRow, ReviewVote};
use crate::seal;

/// The longest submitted file name an outcome is named after; longer names get a
/// digest name, which leaves room for the writer's temporary names within the file
/// system's 255 bytes.
pub const MAX_PLAIN_NAME: usize = 200;

/// The outcome document, version 1.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub version: u32,
    /// The intent id, when one could be read.
    pub id: Option<String>,
    pub run: Option<String>,
    /// The file the agent submitted.
    pub file: String,
    /// `invalid` for a refused file, otherwise the intent's lifecycle state.
    pub state: String,
    /// Whether the state is final for the agent.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// `sha256:<hex>` of the exact bytes submitted.
    pub digest: String,
    /// Why the intent is where it is, in words (policy reasons, reviewer comments,
    /// errors).
    pub reasons: Vec<String>,
    /// For refused files: every problem found, with its JSON pointer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<airlock_intent::Problem>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewStatus>,
    /// The last error met (policy unavailable, apply failure), with details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// For an approved intent: the earlier intent of its run that holds it back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<WaitingFor>,
    /// For an applied (or since undone) intent: what it wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied: Option<Written>,
    /// For a final state that is not a success: whether and how to try again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// The W3C trace id of the intent's `provenance.traceparent`, when it has a
    /// valid one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    pub received_at: String,
    pub updated_at: String,
    /// A refused file whose id names another intent in the queue: its outcome goes
    /// beside that intent's, never over it (see [`Outcome::file_name`]).
    #[serde(skip)]
    pub conflict: bool,
}

/// Where a review stands.
#[derive(Clone, Debug, Serialize)]
pub struct ReviewStatus {
    pub approvals_needed: u32,
    pub approved_by: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_by: Option<String>,
    /// The review's deadline, while it is awaited and once it has passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// The earlier intent of its run that an approved intent waits for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WaitingFor {
    pub id: String,
    /// Queued, awaiting review, or approved and retrying after a transient error.
    pub state: State,
    /// Its review's deadline, while it awaits review.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// When it is tried again, while it is approved and retrying.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<String>,
}

/// What an applied intent wrote: per op, the rows and the primary key of each row,
/// taken from the target's undo images. Only keys: the other columns' values may be
/// ones the agent is not allowed to read. Bounded without a cap of its own: an op
/// writes at most `apply.max_rows` rows (an insert or an upsert one), and an intent
/// has at most `limits.max_ops` ops.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Written {
    /// When the target committed the intent (its ledger row's time).
    pub at: String,
    /// One entry per op, in op order.
    pub ops: Vec<OpWritten>,
}

/// What one op wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpWritten {
    /// The op's index in the intent's `ops`, from 0.
    pub index: usize,
    /// Rows inserted, updated or deleted.
    pub rows: u64,
    /// The primary key (or `rowid`/`ctid` for a table without one) of each row
    /// written, in the order written: the generated key of an inserted row.
    pub keys: Vec<Image>,
}

impl Written {
    /// What `applied` wrote for the intent `row`. An intent the ledger already held
    /// (applied by an earlier attempt, before a crash) comes back with no op
    /// results, only the ledger's undo images: its rows are counted from those, one
    /// entry for each of its ops, so its keys are still reported.
    pub fn of(applied: &Applied, row: &IntentRow) -> Self {
        let undo = &applied.ledger.undo;
        // Only an intent the ledger held needs its op count; its stored bytes parsed
        // when it was applied, and should they not, the images still count the ops
        // up to the last one that wrote a row.
        let op_count = || {
            row.intent().map_or_else(
                |_| undo.iter().map(|image| image.op + 1).max().unwrap_or(0),
                |intent| intent.ops.len(),
            )
        };
        let keys = |index: usize| -> Vec<Image> {
            undo.iter()
                .filter(|image| image.op == index)
                .map(|image| image.key.clone())
                .collect()
        };
        let ops = if applied.already {
            (0..op_count())
                .map(|index| {
                    let keys = keys(index);
                    OpWritten {
                        index,
                        rows: keys.len() as u64,
                        keys,
                    }
                })
                .collect()
        } else {
            applied
                .ops
                .iter()
                .map(|op| OpWritten {
                    index: op.index,
                    rows: op.rows,
                    keys: keys(op.index),
                })
                .collect()
        };
        Self {
            at: timestamp(applied.ledger.applied_at_ms),
            ops,
        }
    }
}

/// Whether and how an intent (or a refused file) that ended without being applied
/// can be tried again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Retry {
    /// A new attempt needs another id: this one entered the queue (an id is an
    /// idempotency key: the same bytes again change nothing, other bytes are
    /// refused as a conflict), or it already names another intent.
    pub new_id: bool,
    /// Submitting the same writes again could succeed with no change to the
    /// intent, the policy or the target (only after an expired review).
    pub may_help: bool,
    /// What to do, in words.
    pub advice: String,
}

impl Retry {
    /// The advice for a final intent that was not applied; `None` for any other.
    fn of_intent(
        row: &IntentRow,
        intent: Option<&airlock_intent::Intent>,
        reviews: &[ReviewVote],
    ) -> Option<Self> {
        let id = &row.id;
        let spent = format!(
            "the id {id} is spent (submitting its bytes again changes nothing, other bytes under it are refused)"
        );
        let (may_help, advice) = match row.state {
            State::Denied => (
                false,
                format!(
                    "the policy denied this intent (see reasons) and will deny it again: change \
                     the intent, or have the policy changed, then submit under a new id; {spent}"
                ),
            ),
            State::Rejected => {
                let by = reviews
                    .iter()
                    .find(|r| r.verdict == "reject")
                    .map_or_else(|| "a reviewer".to_owned(), |r| r.reviewer.clone());
                (
                    false,
                    format!(
                        "{by} rejected this intent (see reasons): change what they objected to, \
                         then submit a new intent under a new id; {spent}"
                    ),
                )
            }
            State::Expired => (
                true,
                format!(
                    "nobody decided its review in time, and nothing refused its writes: submit \
                     the same writes again under a new id to ask for a new review; {spent}"
                ),
            ),
            State::Failed => (false, format!("{}; {spent}", failure_advice(row, intent))),
            _ => return None,
        };
        Some(Self {
            new_id: true,
            may_help,
            advice,
        })
    }

    /// The advice for a file refused at intake.
    fn of_refusal(row: &RefusedRow) -> Self {
        let (new_id, advice) = match row.id.as_deref() {
            Some(id) if row.kind == "conflict" => (
                true,
                format!(
                    "the id {id} already names another intent, so these bytes were refused: to \
                     make these writes as well, submit them under a new id (submitting that \
                     intent's own bytes again changes nothing)"
                ),
            ),
            Some(id) if row.id_in_use => (
                true,
                format!(
                    "fix the problems listed, then submit under a new id: {id} already names an \
                     intent in the queue"
                ),
            ),
            Some(id) => (
                false,
                format!(
                    "fix the problems listed and submit the file again: it never entered the \
                     queue, so its id {id} is still free"
                ),
            ),
            None => (
                false,
                "fix the problems listed and submit the file again: it never entered the queue"
                    .to_owned(),
            ),
        };
        Self {
            new_id,
            may_help: false,
            advice,
        }
    }
}

/// What to change after a permanent failure, from its error's code (and the table
/// the failing op names, as the agent wrote it).
fn failure_advice(row: &IntentRow, intent: Option<&airlock_intent::Intent>) -> String {
    let error = row.error.as_ref();
    let code = error
        .and_then(|e| e.get("code"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let op = error
        .and_then(|e| e.get("op"))
        .and_then(Value::as_u64)
        .and_then(|op| usize::try_from(op).ok());
    let table = op
        .zip(intent)
        .and_then(|(op, intent)| intent.ops.get(op))
        .map(|op| op.table().to_string());
    let the_op = op.map_or_else(|| "an op".to_owned(), |op| format!("op {op}"));
    let target = &row.target;
    match code {
        codes::UNKNOWN_TABLE => format!(
            "table {} does not exist in target {target:?}: name a table it has (or have the \
             table created), then submit under a new id",
            table.as_deref().unwrap_or("it names")
        ),
        codes::UNKNOWN_COLUMN => format!(
            "{the_op} names a column its table does not have (see error): fix the column names, \
             then submit under a new id"
        ),
        codes::SYSTEM_TABLE | codes::RESERVED_TABLE | codes::NOT_A_TABLE => format!(
            "{the_op} names a table Airlock does not write (see error): write a plain table of \
             your own, then submit under a new id"
        ),
        codes::NO_ROW => format!(
            "no row matches the key of {the_op}: check the key (read the row again), then \
             submit under a new id"
        ),
        codes::EXPECT_FAILED => format!(
            "the row {the_op} touches no longer holds the values it expects: read it again, \
             decide anew, and submit a new intent under a new id"
        ),
        codes::TOO_MANY_ROWS => format!(
            "the key of {the_op} matches more rows than one op may touch (apply.max_rows): \
             narrow the key, or split the op, then submit under a new id"
        ),
        codes::DIGEST_MISMATCH => "the target already applied another intent under this id: \
                                   submit under a new id"
            .to_owned(),
        _ => {
            let code = if code.is_empty() {
                String::new()
            } else {
                format!(" ({code})")
            };
            format!(
                "the target refused {the_op} for good{code} and would refuse it again: fix the \
                 cause the error names (a constraint, a value's type, a missing row, an unknown \
                 target), then submit under a new id"
            )
        }
    }
}

impl Outcome {
    /// The outcome of a queued intent, given its reviews. An approved intent's
    /// outcome also says what it waits for: see [`Outcome::waiting_for`].
    pub fn of_intent(row: &IntentRow, reviews: &[ReviewVote]) -> Self {
        // Validated at admission; a row that does not parse again only loses the
        // trace id and the failing op's table in the advice.
        let intent = row.intent().ok();
        let mut reasons = Vec::new();
        if let Some(decision) = &row.decision {
            reasons.extend(decision.reasons.iter().cloned());
        }
        let rejection = reviews.iter().find(|r| r.verdict == "reject");
        match row.state {
            State::Rejected => {
                if let Some(r) = rejection {
                    reasons.push(format!(
                        "rejected by {}: {}",
                        r.reviewer,
                        r.comment.as_deref().unwrap_or("no reason given")
                    ));
                }
            }
            State::Expired => {
                let approvals = reviews
                    .iter()
                    .filter(|r| r.verdict == "approve" && r.digest == row.digest)
                    .count();
                let at = row.review_deadline.map_or_else(String::new, |deadline| {
                    format!(" at {}", timestamp(deadline))
                });
                reasons.push(format!(
                    "the review expired{at} before enough approvals ({approvals} of {} given); \
                     it can no longer be approved: submit a new intent to try again",
                    row.approvals_needed.max(1)
                ));
            }
            _ => {}
        }
        if let Some(error) = &row.error
            && let Some(message) = error.get("message").and_then(Value::as_str)
        {
            let code = error.get("code").and_then(Value::as_str);
            if error.get("stage").and_then(Value::as_str) == Some("resolve")
                && code == Some(codes::UNKNOWN_TABLE)
            {
                reasons.push(format!("{message} in target {:?}", row.target));
            } else {
                reasons.push(message.to_owned());
            }
            if !row.state.is_final()
                && let Some(at) = error.get("retry_at").and_then(Value::as_i64)
            {
                reasons.push(format!("Airlock tries again at {}", timestamp(at)));
            }
        }
        let review = (row.approvals_needed > 0).then(|| ReviewStatus {
            approvals_needed: row.approvals_needed,
            approved_by: reviews
                .iter()
                .filter(|r| r.verdict == "approve" && r.digest == row.digest)
                .map(|r| r.reviewer.clone())
                .collect(),
            rejected_by: rejection.map(|r| r.reviewer.clone()),
            expires_at: row
                .review_deadline
                .filter(|_| matches!(row.state, State::AwaitingReview | State::Expired))
                .map(timestamp),
        });
        Self {
            version: 1,
            id: Some(row.id.clone()),
            run: Some(row.run.clone()),
            file: row.file.clone(),
            state: row.state.as_str().to_owned(),
            is_final: row.state.is_final(),
            digest: row.digest.clone(),
            reasons,
            problems: Vec::new(),
            decision: row.decision.clone(),
            review,
            error: row.error.clone(),
            waiting_for: None,
            applied: row
                .applied
                .as_ref()
                .and_then(|written| Written::deserialize(written).ok()),
            retry: Retry::of_intent(row, intent.as_ref(), reviews),
            trace_id: intent
                .as_ref()
                .and_then(|i| i.provenance.trace_id())
                .map(str::to_owned),
            received_at: timestamp(row.received_at),
            updated_at: timestamp(row.updated_at),
            conflict: false,
        }
    }

    /// Says what this approved intent waits for: `blocker`, the earlier
    /// intent of its run that holds it back (from
    /// [`Queue::holding_back`](crate::queue::Queue::holding_back)), as a field and
    /// as a reason in words. Outcomes in other states are left as they are.
    #[must_use]
    pub fn waiting_for(mut self, blocker: &IntentRow) -> Self {
        if self.state != State::Approved.as_str() {
            return self;
        }
        let expires_at = blocker
            .review_deadline
            .filter(|_| blocker.state == State::AwaitingReview)
            .map(timestamp);
        let retry_at = (blocker.state == State::Approved).then(|| timestamp(blocker.not_before));
        let which = match (&expires_at, &retry_at) {
            (Some(at), _) => format!("awaits review until {at}"),
            (None, Some(at)) => {
                format!("met a transient error and is tried again at {at}")
            }
            (None, None) if blocker.state == State::AwaitingReview => "awaits review".to_owned(),
            (None, None) => "awaits a policy decision".to_owned(),
        };
        self.reasons.push(format!(
            "waits for intent {} of run {}, which {which}: the intents of a run apply in the \
             order they were queued",
            blocker.id, blocker.run
        ));
        self.waiting_for = Some(WaitingFor {
            id: blocker.id.clone(),
            state: blocker.state,
            expires_at,
            retry_at,
        });
        self
    }

    /// The outcome of a queued intent as the queue knows it now: with its reviews
    /// and, for an approved intent, what holds it back (the queue flags this
    /// outcome again whenever that changes). What the pipeline writes and what
    /// `airlock status --json` prints.
    pub fn of_queued(queue: &Queue, row: &IntentRow) -> Result<Self, QueueError> {
        let reviews = if row.approvals_needed > 0 {
            queue.reviews(&row.id)?
        } else {
            Vec::new()
        };
        let mut outcome = Self::of_intent(row, &reviews);
        if row.state == State::Approved
            && let Some(blocker) = queue.holding_back(row)?
        {
            outcome = outcome.waiting_for(&blocker);
        }
        Ok(outcome)
    }

    /// The outcome of a refused file.
    pub fn of_refusal(row: &RefusedRow) -> Self {
        Self {
            version: 1,
            id: row.id.clone(),
            run: row.run.clone(),
            file: row.file.clone(),
            state: "invalid".into(),
            is_final: true,
            digest: row.digest.clone(),
            reasons: row
                .problems
                .iter()
                .map(|p| {
                    if p.pointer.is_empty() {
                        p.message.clone()
                    } else {
                        format!("{}: {}", p.pointer, p.message)
                    }
                })
                .collect(),
            problems: row.problems.clone(),
            decision: None,
            review: None,
            error: None,
            waiting_for: None,
            applied: None,
            retry: Some(Retry::of_refusal(row)),
            trace_id: None,
            received_at: timestamp(row.received_at),
            updated_at: timestamp(row.received_at),
            conflict: row.id_in_use || row.kind == "conflict",
        }
    }

    /// The outcome file's name: `<id>.json`; `<id>.conflict-<digest16>.json` for a
    /// refused file whose id names another intent; the submitted file's name when no
    /// valid id could be read, or `name-<hex16>.json` when that name is not a plain
    /// one (see the module docs).
    pub fn file_name(&self) -> String {
        match self
            .id
            .as_deref()
            .filter(|id| airlock_intent::IntentId::parse(id).is_ok())
        {
            Some(id) if self.conflict => {
                let hex = self.digest.strip_prefix("sha256:").unwrap_or("");
                match hex.get(..16) {
                    Some(digest16) => format!("{id}.conflict-{digest16}.json"),
                    // Not read, so no digest: the file's name tells it apart instead.
                    None => format!("{id}.conflict-{}.json", hex16(self.file.as_bytes())),
                }
            }
            Some(id) => format!("{id}.json"),
            None if is_plain_name(&self.file) => self.file.clone(),
            None => digest_name(self.file.as_bytes()),
        }
    }
}

/// The outcome name of a file whose name cannot serve: `name-<hex16>.json`, from
/// the SHA-256 of the raw name bytes.
pub fn digest_name(raw: &[u8]) -> String {
    format!("name-{}.json", hex16(raw))
}

fn hex16(bytes: &[u8]) -> String {
    let digest = seal::digest(bytes);
    let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
    hex.chars().take(16).collect()
}

/// A name intake could have taken as an intent's own (`*.json`, no leading dot),
/// short enough to name an outcome.
fn is_plain_name(name: &str) -> bool {
    name.len() <= MAX_PLAIN_NAME
        && name.ends_with(".json")
        && !name.starts_with('.')
        && !name.contains(['/', '\0'])
}

/// Writes outcome files into the results directory, which belongs to the agent.
///
/// # Never through a link
/// The agent controls every entry of the results directory, and can replace the
/// directory itself, so nothing is written by path:
/// - The directory is opened once, as a handle (`O_DIRECTORY|O_NOFOLLOW`); a results
///   directory that is a symbolic link, lies inside the state directory, or contains
///   it, is refused at start ([`Outcomes::open`]).
/// - Each file is written into a new temporary file created through that handle with
///   `O_CREAT|O_EXCL|O_NOFOLLOW` and an unpredictable name, then renamed over
///   `<name>.json` within the same handle (`renameat`). A link planted under the
///   final name is replaced, never followed.
/// - Before each write the path is checked to still be the directory the handle
///   holds (same device and inode, not a link).
///
/// # When the directory is swapped
/// If the path stops being that directory (it became a link, to the state directory
/// or anywhere else, or another directory, or disappeared), nothing is written
/// through it. A warning is logged once, and writes fail with an error for which
/// [`Outcomes::is_held`] is true: the queue keeps each outcome flagged until it is
/// written, so nothing is lost. Each later write tries to open the path afresh, with
/// the same checks as at start (a missing directory is created again); once the path
/// is a real directory outside the state directory, the held outcomes are written
/// there. The pipeline retries on its timer, so a swapped directory (or a
/// `results -> .` loop) costs one `lstat` per held outcome per tick, never a spin.
///
/// An outcome whose name is taken by a directory the agent made is written once that
/// directory is empty (it is removed); while it is not, the outcome is skipped with a
/// warning and reported as written, so the agent's own directory cannot keep the
/// queue's flag set for ever. The next change of the intent's state tries again.
#[derive(Debug)]
pub struct Outcomes {
    path: PathBuf,
    state: PathBuf,
    dir: Mutex<Dir>,
}

/// The results directory as last seen.
#[derive(Debug)]
enum Dir {
    /// Open, with the identity it had when opened.
    Open { handle: fs::File, id: FileId },
    /// Unusable; `warned` once the operator has been told.
    Held { warned: bool },
}

/// A file's identity: device and inode.
type FileId = (u64, u64);

/// The marker inside the error of a write held back because the results directory
/// is unusable (see [`Outcomes::is_held`]).
#[derive(Debug, thiserror::Error)]
#[error("results directory {0}: {1}; the outcome is held in the queue until it is usable")]
struct Held(String, String);

/// Deepest directory nesting walked when checking where a directory lies.
const MAX_DEPTH: usize = 4_096;

impl Outcomes {
    /// Opens the results directory `dir`, creating it if missing (without following a
    /// link planted in its place). Refuses a results directory that is a symbolic
    /// link, or that lies inside the state directory `state` or contains it: the
    /// agent reads and writes the results directory, and must not reach Airlock's
    /// state through it. The state directory must exist.
    pub fn open(dir: PathBuf, state: &Path) -> io::Result<Self> {
        let handle = open_checked(&dir, state)?;
        Ok(Self {
            path: dir,
            state: state.to_owned(),
            dir: Mutex::new(handle),
        })
    }

    /// The results directory.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// Whether `error` (from [`Outcomes::write`]) means the outcome is held back
    /// because the results directory is unusable. It has been logged once already.
    pub fn is_held(error: &io::Error) -> bool {
        error.get_ref().is_some_and(|inner| inner.is::<Held>())
    }

    /// Writes (or replaces) one outcome file atomically. See [`Outcomes`] for what
    /// happens when the results directory has been swapped.
    pub fn write(&self, outcome: &Outcome) -> io::Result<PathBuf> {
        let name = outcome.file_name();
        if name.is_empty() || name.starts_with('.') || name.contains('/') || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} cannot name an outcome file"),
            ));
        }
        let mut bytes = serde_json::to_vec_pretty(outcome).map_err(io::Error::other)?;
        bytes.push(b'\n');
        let mut dir = self.dir.lock().unwrap_or_else(PoisonError::into_inner);
        let handle = self.usable(&mut dir)?;
        write_in(handle, &name, &bytes)?;
        Ok(self.path.join(name))
    }

    /// The handle to write through, after checking the path still leads to it;
    /// reopens a held directory when its path is usable again.
    fn usable<'d>(&self, dir: &'d mut Dir) -> io::Result<&'d fs::File> {
        if let Dir::Open { id, .. } = dir {
            let now = fs::symlink_metadata(&self.path);
            let same = now
                .as_ref()
                .is_ok_and(|m| m.file_type().is_dir() && (m.dev(), m.ino()) == *id);
            if !same {
                *dir = Dir::Held { warned: false };
            }
        }
        if let Dir::Held { warned } = dir {
            match open_checked(&self.path, &self.state) {
                Ok(opened) => {
                    info!(
                        message = "results directory usable again; writing the outcomes held in the queue",
                        dir = %self.path.display()
                    );
                    *dir = opened;
                }
                Err(error) => {
                    if !*warned {
                        warn!(
                            message = "results directory is unusable (replaced by a link, moved or refused); \
                                       outcome files are held in the queue until it is a real directory again",
                            dir = %self.path.display(),
                            %error
                        );
                        *warned = true;
                    }
                    return Err(io::Error::other(Held(
                        self.path.display().to_string(),
                        error.to_string(),
                    )));
                }
            }
        }
        match dir {
            Dir::Open { handle, .. } => Ok(handle),
            Dir::Held { .. } => Err(io::Error::other(Held(
                self.path.display().to_string(),
                "not open".into(),
            ))),
        }
    }
}

/// Opens `path` as the results directory (see [`Outcomes::open`]).
fn open_checked(path: &Path, state: &Path) -> io::Result<Dir> {
    use rustix::fs::{CWD, Mode, OFlags};
    match fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent)?;
            }
            // `mkdir` never follows a link planted at `path`: it fails instead.
            match fs::create_dir(path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(error),
            }
        }
        Err(error) => return Err(error),
    }
    let refuse = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Err(refuse(
            "is a symbolic link; Airlock writes outcome files only into a real directory \
             (configure the directory the link leads to)"
                .into(),
        ));
    }
    if !meta.is_dir() {
        return Err(refuse("is not a directory".into()));
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let handle = match rustix::fs::openat(CWD, path, flags, Mode::empty()) {
        Ok(fd) => fs::File::from(fd),
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
            return Err(refuse("was replaced by a link while opening it".into()));
        }
        Err(error) => return Err(error.into()),
    };
    let id = identity(&handle)?;
    // Checked on the directory opened, wherever the links in its path led.
    let state_dir = fs::File::open(state)?;
    let state_id = identity(&state_dir)?;
    if within(&handle, state_id)? {
        return Err(refuse(format!(
            "is inside the state directory {} (or is it); the agent reads and writes the \
             results directory, so it must lie outside Airlock's state",
            state.display()
        )));
    }
    if within(&state_dir, id)? {
        return Err(refuse(format!(
            "contains the state directory {}; the agent reads and writes the results \
             directory, so it must not hold Airlock's state",
            state.display()
        )));
    }
    Ok(Dir::Open { handle, id })
}

fn identity(file: &fs::File) -> io::Result<FileId> {
    let meta = file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

/// Whether the directory `dir` is `ancestor` or lies below it, found by walking `..`
/// from the open directory (so links on the way there do not matter).
fn within(dir: &fs::File, ancestor: FileId) -> io::Result<bool> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let mut current = rustix::fs::openat(dir, ".", flags, Mode::empty()).map(fs::File::from)?;
    let mut id = identity(&current)?;
    for _ in 0..MAX_DEPTH {
        if id == ancestor {
            return Ok(true);
        }
        let parent =
            rustix::fs::openat(&current, "..", flags, Mode::empty()).map(fs::File::from)?;
        let parent_id = identity(&parent)?;
        if parent_id == id {
            return Ok(false); // The root is its own parent.
        }
        current = parent;
        id = parent_id;
    }
    Err(io::Error::other("the directory is nested too deeply"))
}

/// Writes `bytes` as `name` in the open directory `dir`: a new temporary file with
/// an unpredictable name, renamed over `name`.
fn write_in(dir: &fs::File, name: &str, bytes: &[u8]) -> io::Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut attempt = 0;
    let (tmp, file) = loop {
        let tmp = format!(".airlock-outcome.{}.tmp", crate::state::random_hex()?);
        // The agent reads outcome files; it never needs to write them.
        match rustix::fs::openat(dir, tmp.as_str(), flags, Mode::from_raw_mode(0o644)) {
            Ok(fd) => break (tmp, fs::File::from(fd)),
            Err(rustix::io::Errno::EXIST) if attempt < 3 => attempt += 1,
            Err(error) => return Err(error.into()),
        }
    };
    let mut file = file;
    if let Err(error) = file.write_all(bytes) {
        let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
        return Err(error);
    }
    drop(file);
    let Err(error) = rustix::fs::renameat(dir, tmp.as_str(), dir, name) else {
        return Ok(());
    };
    // A directory under the name (the agent made it): remove it if it is empty,
    // else skip this outcome rather than retry it for ever.
    let is_dir = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir());
    let retried = if is_dir {
        let _ = rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR);
        rustix::fs::renameat(dir, tmp.as_str(), dir, name).map_err(io::Error::from)
    } else {
        Err(error.into())
    };
    let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
    match retried {
        Ok(()) => Ok(()),
        Err(_) if is_dir => {
            warn!(
                message = "an outcome file's name is taken by a directory in the results directory; \
                           this outcome is skipped (the next change of state tries again)",
                file = name
            );
            Ok(())
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn outcome(id: &str) -> Outcome {
        Outcome {
            version: 1,
            id: Some(id.into()),
            run: Some("r".into()),
            file: format!("{id}.json"),
            state: "applied".into(),
            is_final: true,
            digest: "sha256:00".into(),
            reasons: Vec::new(),
            problems: Vec::new(),
            decision: None,
            review: None,
            error: None,
            waiting_for: None,
            applied: None,
            retry: None,
            trace_id: None,
            received_at: timestamp(0),
            updated_at: timestamp(0),
            conflict: false,
        }
    }

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        let results = dir.path().join("results");
        (dir, state, results)
    }

    #[test]
    fn a_link_under_the_final_name_is_replaced_not_followed() {
        let (dir, state, results) = setup();
        let outcomes = Outcomes::open(results.clone(), &state).unwrap();
        let victim = state.join("queue.db");
        fs::write(&victim, b"queue").unwrap();
        symlink(&victim, results.join("i1.json")).unwrap();
        outcomes.write(&outcome("i1")).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"queue");
        assert!(
            fs::symlink_metadata(results.join("i1.json"))
                .unwrap()
                .is_file()
        );
        // Only the outcome is left: no temporary file.
        assert_eq!(fs::read_dir(&results).unwrap().count(), 1);
        drop(dir);
    }

    #[test]
    fn start_refuses_links_and_the_state_directory() {
        let (dir, state, results) = setup();
        symlink(&state, &results).unwrap();
        let err = Outcomes::open(results.clone(), &state)
            .unwrap_err()
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        fs::remove_file(&results).unwrap();

        let inside = state.join("results");
        let err = Outcomes::open(inside.clone(), &state)
            .unwrap_err()
            .to_string();
        assert!(err.contains("inside the state directory"), "{err}");
        let err = Outcomes::open(state.clone(), &state)
            .unwrap_err()
            .to_string();
        assert!(err.contains("inside the state directory"), "{err}");
        // Through a link higher up the path: checked where it really is.
        symlink(&state, dir.path().join("via")).unwrap();
        let err = Outcomes::open(dir.path().join("via/results"), &state)
            .unwrap_err()
            .to_string();
        assert!(err.contains("inside the state directory"), "{err}");
        let err = Outcomes::open(dir.path().to_owned(), &state)
            .unwrap_err()
            .to_string();
        assert!(err.contains("contains the state directory"), "{err}");
        // A link planted where the directory is to be created is not followed.
        symlink(dir.path().join("elsewhere"), &results).unwrap();
        assert!(Outcomes::open(results.clone(), &state).is_err());
        assert!(!dir.path().join("elsewhere").exists());
    }

    #[test]
    fn a_swapped_directory_holds_outcomes_until_it_is_real_again() {
        let (dir, state, results) = setup();
        let outcomes = Outcomes::open(results.clone(), &state).unwrap();
        outcomes.write(&outcome("i1")).unwrap();
        fs::rename(&results, dir.path().join("old")).unwrap();
        symlink(&state, &results).unwrap();
        let err = outcomes.write(&outcome("i2")).unwrap_err();
        assert!(Outcomes::is_held(&err), "{err}");
        assert_eq!(fs::read_dir(&state).unwrap().count(), 0);
        // A link to its own parent (`results -> .`): held too.
        fs::remove_file(&results).unwrap();
        symlink(".", &results).unwrap();
        assert!(Outcomes::is_held(
            &outcomes.write(&outcome("i2")).unwrap_err()
        ));
        // A real directory again: written there.
        fs::remove_file(&results).unwrap();
        outcomes.write(&outcome("i2")).unwrap();
        assert!(results.join("i2.json").is_file());
        assert!(!dir.path().join("old/i2.json").exists());
    }

    #[test]
    fn a_directory_under_the_name_does_not_wedge() {
        let (_dir, state, results) = setup();
        let outcomes = Outcomes::open(results.clone(), &state).unwrap();
        fs::create_dir(results.join("i1.json")).unwrap();
        outcomes.write(&outcome("i1")).unwrap();
        assert!(results.join("i1.json").is_file());
        fs::remove_file(results.join("i1.json")).unwrap();
        fs::create_dir_all(results.join("i1.json/full")).unwrap();
        outcomes.write(&outcome("i1")).unwrap();
        assert!(results.join("i1.json/full").is_dir());
        assert_eq!(fs::read_dir(&results).unwrap().count(), 1);
    }

    fn refused(file: &str, id: Option<&str>, kind: &str, id_in_use: bool) -> Outcome {
        Outcome::of_refusal(&RefusedRow {
            seq: 1,
            file: file.into(),
            id: id.map(str::to_owned),
            run: None,
            kind: kind.into(),
            digest: "sha256:0123456789abcdef0123".into(),
            size: 3,
            problems: Vec::new(),
            received_at: 0,
            id_in_use,
        })
    }

    #[test]
    fn refused_files_never_take_another_intents_outcome_name() {
        assert_eq!(
            refused("x.json", Some("a"), "invalid", false).file_name(),
            "a.json"
        );
        assert_eq!(
            refused("x.json", Some("a"), "conflict", true).file_name(),
            "a.conflict-0123456789abcdef.json"
        );
        assert_eq!(
            refused("x.json", Some("a"), "invalid", true).file_name(),
            "a.conflict-0123456789abcdef.json"
        );
        // No usable id: the file's own name, when it can serve.
        assert_eq!(
            refused("x.json", None, "invalid", false).file_name(),
            "x.json"
        );
        assert_eq!(
            refused("x.json", Some("../up"), "invalid", false).file_name(),
            "x.json"
        );
        let hex = |name: &str| seal::digest(name.as_bytes())[7..23].to_owned();
        let long = format!("{}.json", "l".repeat(MAX_PLAIN_NAME));
        assert_eq!(
            refused(&long, None, "invalid", false).file_name(),
            format!("name-{}.json", hex(&long))
        );
        assert_eq!(
            refused(".airlock-claim.1-2", None, "invalid", false).file_name(),
            format!("name-{}.json", hex(".airlock-claim.1-2"))
        );
        assert_eq!(digest_name(b"\xff.json").len(), "name-.json".len() + 16);
    }

    fn check_schema(outcome: &Outcome) {
        let schema: Value = serde_json::from_str(airlock_intent::OUTCOME_SCHEMA).unwrap();
        let validator = jsonschema::draft202012::new(&schema).unwrap();
        let document = serde_json::to_value(outcome).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&document)
            .map(|e| format!("{}: {e}", e.instance_path().as_str()))
            .collect();
        assert!(errors.is_empty(), "{errors:?}\n{document:#}");
    }

    fn row(id: &str, state: State) -> IntentRow {
        let payload = serde_json::json!({
            "version": 1, "id": id, "run": "r",
            "ops": [{"op": "insert", "table": "sales.orders", "values": {"total": 5}}],
            "reason": "test",
            "provenance": {"agent": "a", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
        });
        IntentRow {
            seq: 7,
            id: id.into(),
            run: "r".into(),
            target: "default".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            payload: serde_json::to_vec(&payload).unwrap(),
            file: format!("{id}.json"),
            state,
            decision: None,
            approvals_needed: 0,
            review_deadline: None,
            error: None,
            attempts: 0,
            not_before: 0,
            received_at: 1_000,
            updated_at: 2_000,
            applied: None,
        }
    }

    fn applied(already: bool) -> Applied {
        use crate::apply::{LedgerEntry, OpResult, UndoImage};
        let key = |id: i64| serde_json::json!({"id": id}).as_object().unwrap().clone();
        let image = |op: usize, id: i64| UndoImage {
            op,
            table: "t".into(),
            key: key(id),
            before: None,
            after: Some(key(id)),
        };
        Applied {
            already,
            ledger: LedgerEntry {
                intent_id: "i".into(),
                run: "r".into(),
                digest: "sha256:00".into(),
                applied_at_ms: 3_000,
                undo: vec![image(0, 41), image(2, 42), image(2, 43)],
            },
            ops: if already {
                Vec::new()
            } else {
                (0..3)
                    .map(|index| OpResult {
                        index,
                        rows: [1, 0, 2][index],
                    })
                    .collect()
            },
        }
    }

    #[test]
    fn written_keys_come_from_the_undo_images_even_when_the_ledger_already_held_them() {
        let mut intent = row("i", State::Approved);
        let mut document: Value = serde_json::from_slice(&intent.payload).unwrap();
        let op = document["ops"][0].clone();
        document["ops"] = Value::Array(vec![op; 3]);
        intent.payload = serde_json::to_vec(&document).unwrap();
        let fresh = Written::of(&applied(false), &intent);
        // Applied by an earlier attempt (say, before a crash): no op results, but the
        // ledger's images still give every key, and the intent its op count.
        let again = Written::of(&applied(true), &intent);
        assert_eq!(fresh, again);
        let keys: Vec<(usize, u64, String)> = fresh
            .ops
            .iter()
            .map(|op| (op.index, op.rows, serde_json::to_string(&op.keys).unwrap()))
            .collect();
        assert_eq!(
            keys,
            [
                (0, 1, r#"[{"id":41}]"#.to_owned()),
                (1, 0, "[]".to_owned()),
                (2, 2, r#"[{"id":42},{"id":43}]"#.to_owned()),
            ]
        );
        assert_eq!(fresh.at, timestamp(3_000));
        let mut done = row("i", State::Applied);
        done.applied = Some(serde_json::to_value(&fresh).unwrap());
        let outcome = Outcome::of_intent(&done, &[]);
        assert_eq!(outcome.applied, Some(fresh));
        assert_eq!(outcome.retry, None);
        check_schema(&outcome);
    }

    #[test]
    fn an_approved_intent_names_what_holds_it_back() {
        let waiting = Outcome::of_intent(&row("w", State::Approved), &[]);
        let mut review = row("rv", State::AwaitingReview);
        review.review_deadline = Some(9_000);
        let outcome = waiting.clone().waiting_for(&review);
        let holder = outcome.waiting_for.clone().unwrap();
        assert_eq!(
            (
                holder.id.as_str(),
                holder.state,
                holder.expires_at,
                holder.retry_at
            ),
            ("rv", State::AwaitingReview, Some(timestamp(9_000)), None)
        );
        check_schema(&outcome);

        let mut retrying = row("rt", State::Approved);
        retrying.attempts = 2;
        retrying.not_before = 8_000;
        let outcome = waiting.clone().waiting_for(&retrying);
        assert_eq!(
            outcome.waiting_for.as_ref().unwrap().retry_at,
            Some(timestamp(8_000))
        );
        let last = outcome.reasons.last().unwrap();
        assert!(
            last.contains(
                "which met a transient error and is tried again at 1970-01-01T00:00:08.000Z"
            ),
            "{last}"
        );
        check_schema(&outcome);

        let queued = waiting.clone().waiting_for(&row("q", State::Queued));
        assert!(
            queued
                .reasons
                .last()
                .unwrap()
                .contains("awaits a policy decision")
        );
        check_schema(&queued);
        // Only an approved intent waits this way.
        let applied = Outcome::of_intent(&row("x", State::Applied), &[]).waiting_for(&review);
        assert_eq!(applied.waiting_for, None);
    }

    /// Every state an intent can be in gives an outcome the published schema
    /// accepts, with retry advice exactly for the final failures.
    #[test]
    fn outcomes_of_every_state_match_the_published_schema() {
        for state in State::ALL {
            let mut row = row("s", state);
            if matches!(
                state,
                State::AwaitingReview | State::Rejected | State::Expired
            ) {
                row.approvals_needed = 1;
                row.review_deadline = Some(5_000);
            }
            if state == State::Failed {
                row.error = Some(serde_json::json!({
                    "stage": "resolve", "kind": "permanent", "op": 0,
                    "code": codes::UNKNOWN_TABLE, "retry_at": null,
                    "message": "op 0 (insert sales.orders): table sales.orders does not exist",
                }));
            }
            if state == State::Approved {
                row.attempts = 1;
                row.error = Some(serde_json::json!({
                    "stage": "apply", "kind": "transient", "op": null, "code": "SQLITE_BUSY",
                    "message": "database is locked", "retry_at": 4_000,
                }));
            }
            let outcome = Outcome::of_intent(&row, &[]);
            check_schema(&outcome);
            assert_eq!(
                outcome.retry.is_some(),
                matches!(
                    state,
                    State::Denied | State::Rejected | State::Expired | State::Failed
                ),
                "{state}"
            );
            assert_eq!(
                outcome.trace_id.as_deref(),
                Some("4bf92f3577b34da6a3ce929d0e0e4736")
            );
            if state == State::Failed {
                assert_eq!(
                    outcome.reasons,
                    [
                        "op 0 (insert sales.orders): table sales.orders does not exist in target \"default\""
                    ]
                );
                let advice = &outcome.retry.as_ref().unwrap().advice;
                assert!(
                    advice.starts_with("table sales.orders does not exist in target \"default\""),
                    "{advice}"
                );
                assert!(advice.contains("the id s is spent"), "{advice}");
            }
            if state == State::Approved {
                assert!(
                    outcome
                        .reasons
                        .contains(&"Airlock tries again at 1970-01-01T00:00:04.000Z".to_owned()),
                    "{:?}",
                    outcome.reasons
                );
            }
        }
        for (id, kind, in_use) in [
            (None, "invalid", false),
            (Some("a"), "invalid", false),
            (Some("a"), "invalid", true),
            (Some("a"), "conflict", true),
        ] {
            let mut outcome = refused("x.json", id, kind, in_use);
            outcome.digest = format!("sha256:{}", "cd".repeat(32));
            outcome.problems = vec![airlock_intent::Problem {
                pointer: "/reason".into(),
                message: "missing".into(),
            }];
            check_schema(&outcome);
        }
    }

    #[test]
    fn a_refused_file_is_told_whether_its_id_is_still_free() {
        let advice = |id, kind, in_use| {
            let retry = refused("x.json", id, kind, in_use).retry.unwrap();
            (retry.new_id, retry.may_help, retry.advice)
        };
        let (new_id, may_help, text) = advice(Some("a"), "invalid", false);
        assert!(!new_id && !may_help);
        assert!(text.contains("its id a is still free"), "{text}");
        let (new_id, _, text) = advice(Some("a"), "invalid", true);
        assert!(new_id);
        assert!(
            text.contains("a already names an intent in the queue"),
            "{text}"
        );
        let (new_id, _, text) = advice(Some("a"), "conflict", true);
        assert!(new_id);
        assert!(text.contains("already names another intent"), "{text}");
        let (new_id, _, text) = advice(None, "invalid", false);
        assert!(!new_id);
        assert!(text.contains("never entered the queue"), "{text}");
    }
}
