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
//! The results directory is the agent's: [`Outcomes`] never writes through a link
//! planted there, and holds outcomes back while the directory is swapped.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;
use serde_json::Value;
use tracing::{info, warn};

use crate::clock::timestamp;
use crate::lifecycle::{Decision, State};
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
}
