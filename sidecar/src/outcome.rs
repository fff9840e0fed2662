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

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::decide::Decision;
use crate::lifecycle::State;
use crate::queue::{IntentRow, RefusedRow, ReviewVote};
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

/// Milliseconds since the epoch as RFC 3339 UTC.
pub fn timestamp(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

impl Outcome {
    /// The outcome of a queued intent, given its reviews.
    pub fn of_intent(row: &IntentRow, reviews: &[ReviewVote]) -> Self {
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
        if let Some(message) = row
            .error
            .as_ref()
            .and_then(|e| e.get("message"))
            .and_then(Value::as_str)
        {
            reasons.push(message.to_owned());
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
            received_at: timestamp(row.received_at),
            updated_at: timestamp(row.updated_at),
            conflict: false,
        }
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

/// Writes outcome files into one directory.
#[derive(Clone, Debug)]
pub struct Outcomes {
    dir: PathBuf,
}

impl Outcomes {
    /// Outcomes in `dir`, created if missing.
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The results directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes (or replaces) one outcome file atomically.
    pub fn write(&self, outcome: &Outcome) -> io::Result<PathBuf> {
        let name = outcome.file_name();
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut bytes = serde_json::to_vec_pretty(outcome).map_err(io::Error::other)?;
        bytes.push(b'\n');
        let result = fs::File::create(&tmp)
            .and_then(|mut file| file.write_all(&bytes))
            .and_then(|()| fs::rename(&tmp, &path));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
