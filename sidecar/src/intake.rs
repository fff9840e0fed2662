//! Intake: takes intent files out of the agent's directory and into the queue.
//!
//! The agent's protocol: write the intent to a temporary name (a dotfile, or any name
//! not ending in `.json`), then rename it to `<something>.json` in the intent
//! directory. `airlock submit` does exactly that.
//!
//! File-system events are hints, not truth: every hint, a periodic timer and start-up
//! all trigger the same full scan, so a missed or coalesced event costs latency,
//! never an intent.
//!
//! Everything in the directory is hostile input (DESIGN invariant 5). A scan takes
//! only names ending in `.json` directly in the directory, skips dotfiles and
//! directories, refuses symbolic links and other non-regular files, refuses files
//! over the size limit without reading them, and hands the rest to the validator.
//!
//! Nothing is lost (DESIGN invariant 1): a candidate is first *claimed*, renamed to a
//! unique hidden name (`.airlock-claim.<unique>.<name>`), so an agent that reuses a
//! file name can never have its new file mistaken for, or deleted with, the old one.
//! The claimed file is removed only after the queue transaction holding its bytes
//! has committed. A crash leaves a claimed file behind, and the next scan takes it
//! up like any other; admission is idempotent, so one that was already committed is
//! a no-op.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use airlock_intent::{Problem, Validator};
use tracing::{debug, info, warn};

use crate::queue::{Admission, Arrival, Queue, QueueError, Refusal};
use crate::seal::{self, Sealer};

/// The prefix of claimed files.
const CLAIM_PREFIX: &str = ".airlock-claim.";

/// Most files admitted in one queue transaction.
const BATCH: usize = 256;

/// Why a scan failed (the directory itself, or the queue; single bad files never
/// fail a scan: they are refused).
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("cannot read intent directory {path}: {source}")]
    ReadDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// What one scan did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub queued: usize,
    pub duplicates: usize,
    pub refused: usize,
}

impl ScanReport {
    /// Whether the scan changed the queue.
    pub fn changed(&self) -> bool {
        self.queued + self.duplicates + self.refused > 0
    }
}

/// The intake stage: one intent directory, its validator, and a queue connection.
#[derive(Debug)]
pub struct Intake {
    dir: PathBuf,
    validator: Validator,
    targets: BTreeSet<String>,
    queue: Queue,
    sealer: Arc<Sealer>,
    /// Non-regular entries already refused, which cannot be removed (directories):
    /// remembered by inode so they are reported once, not at every scan.
    reported: HashSet<(u64, u64)>,
}

/// A file taken for processing.
#[derive(Debug)]
struct Candidate {
    /// The name the agent gave it.
    name: String,
    /// Where it is now (claimed, or still under its own name for non-regular files).
    path: PathBuf,
    mtime: SystemTime,
}

enum Read2 {
    Arrival(Box<Arrival>),
    Refusal(Refusal),
}

impl Intake {
    /// An intake over `dir`, admitting intents for the given target names and
    /// sealing each with `sealer`.
    pub fn new(
        dir: PathBuf,
        validator: Validator,
        targets: BTreeSet<String>,
        queue: Queue,
        sealer: Arc<Sealer>,
    ) -> Self {
        Self {
            dir,
            validator,
            targets,
            queue,
            sealer,
            reported: HashSet::new(),
        }
    }

    /// The intent directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Scans the directory once and admits everything found, in batches.
    pub fn scan(&mut self) -> Result<ScanReport, IntakeError> {
        let mut report = ScanReport::default();
        let (mut candidates, refusals) = self.list()?;
        if !refusals.is_empty() {
            self.commit(
                refusals
                    .into_iter()
                    .map(|(r, path)| (Read2::Refusal(r), path))
                    .collect(),
                &mut report,
            )?;
        }
        // Oldest first: queue order is the order the agent wrote its files.
        candidates.sort_by(|a, b| a.mtime.cmp(&b.mtime).then_with(|| a.name.cmp(&b.name)));
        for chunk in candidates.chunks(BATCH) {
            let mut batch = Vec::with_capacity(chunk.len());
            for candidate in chunk {
                let Some(path) = claim(&self.dir, candidate) else {
                    continue;
                };
                let read = self.read(&candidate.name, &path);
                batch.push((read, Some(path)));
            }
            self.commit(batch, &mut report)?;
        }
        Ok(report)
    }

    /// Lists candidates; refuses what must be refused without reading it.
    #[allow(clippy::type_complexity)]
    fn list(&mut self) -> Result<(Vec<Candidate>, Vec<(Refusal, Option<PathBuf>)>), IntakeError> {
        let read_dir = fs::read_dir(&self.dir).map_err(|source| IntakeError::ReadDir {
            path: self.dir.clone(),
            source,
        })?;
        let mut candidates = Vec::new();
        let mut refusals = Vec::new();
        for entry in read_dir {
            let entry = entry.map_err(|source| IntakeError::ReadDir {
                path: self.dir.clone(),
                source,
            })?;
            let Ok(file_name) = entry.file_name().into_string() else {
                warn!(message = "skipping a file whose name is not UTF-8", name = ?entry.file_name());
                continue;
            };
            let name = match file_name.strip_prefix(CLAIM_PREFIX) {
                // `.airlock-claim.<unique>.<name>`: left by a crash; take it up.
                Some(rest) => match rest.split_once('.') {
                    Some((_, name)) if name.ends_with(".json") => name.to_owned(),
                    _ => continue,
                },
                None if file_name.starts_with('.') || !file_name.ends_with(".json") => continue,
                None => file_name.clone(),
            };
            // `DirEntry::metadata` does not follow symbolic links.
            let Ok(meta) = entry.metadata() else {
                continue; // Gone since the listing.
            };
            let path = entry.path();
            let kind = meta.file_type();
            if kind.is_file() {
                candidates.push(Candidate {
                    name,
                    path,
                    mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
                continue;
            }
            let what = if kind.is_symlink() {
                "a symbolic link"
            } else if kind.is_dir() {
                "a directory"
            } else {
                "not a regular file"
            };
            // A link can be removed safely (the link, not what it points to); other
            // kinds are left in place and reported once.
            let removable = kind.is_symlink();
            if !removable && !self.reported.insert((meta.dev(), meta.ino())) {
                continue;
            }
            let refusal = refusal(
                &name,
                Vec::new(),
                String::new(),
                0,
                format!(
                    "{name} is {what}; intents must be regular files (write, then rename into place)"
                ),
            );
            refusals.push((refusal, removable.then_some(path)));
        }
        Ok((candidates, refusals))
    }

    /// Reads and validates one claimed file.
    fn read(&self, name: &str, path: &Path) -> Read2 {
        let limit = self.validator.limits().max_bytes;
        let bytes = match read_regular(path, limit) {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(problem)) => {
                return Read2::Refusal(refusal(name, Vec::new(), String::new(), 0, problem));
            }
            Err(error) => {
                return Read2::Refusal(refusal(
                    name,
                    Vec::new(),
                    String::new(),
                    0,
                    format!("cannot read {name}: {error}"),
                ));
            }
        };
        let digest = seal::digest(&bytes);
        match self.validator.validate(&bytes) {
            Ok(intent) if !self.targets.contains(intent.target.as_str()) => {
                let known = self.targets.iter().cloned().collect::<Vec<_>>().join(", ");
                Read2::Refusal(Refusal {
                    file: name.to_owned(),
                    kind: "invalid",
                    size: bytes.len() as u64,
                    id: Some(intent.id.to_string()),
                    run: Some(intent.run.to_string()),
                    problems: vec![Problem {
                        pointer: "/target".into(),
                        message: format!(
                            "unknown target {:?}; configured targets: {known}",
                            intent.target.as_str()
                        ),
                    }],
                    bytes,
                    digest,
                })
            }
            Ok(intent) => match self
                .sealer
                .seal(seal::INTENT_PAYLOAD_TYPE, bytes.clone())
                .to_json()
            {
                Ok(envelope) => Read2::Arrival(Box::new(Arrival {
                    file: name.to_owned(),
                    bytes,
                    digest,
                    envelope,
                    keyid: self.sealer.keyid().to_owned(),
                    intent,
                })),
                Err(error) => Read2::Refusal(refusal(
                    name,
                    bytes,
                    digest,
                    0,
                    format!("cannot seal {name}: {error}"),
                )),
            },
            Err(invalid) => Read2::Refusal(Refusal {
                file: name.to_owned(),
                kind: "invalid",
                size: bytes.len() as u64,
                id: invalid.id,
                run: invalid.run,
                problems: invalid.problems,
                bytes,
                digest,
            }),
        }
    }

    /// Commits a batch, then removes the files it holds.
    fn commit(
        &mut self,
        batch: Vec<(Read2, Option<PathBuf>)>,
        report: &mut ScanReport,
    ) -> Result<(), IntakeError> {
        if batch.is_empty() {
            return Ok(());
        }
        let admissions = self.queue.write(|w| {
            batch
                .iter()
                .map(|(read, _)| match read {
                    Read2::Arrival(arrival) => w.admit(arrival).map(Some),
                    Read2::Refusal(refusal) => w.refuse(refusal).map(|()| None),
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        // Durable now: the files may go.
        for ((read, path), admission) in batch.iter().zip(admissions) {
            match (read, admission) {
                (Read2::Arrival(a), Some(Admission::Queued)) => {
                    report.queued += 1;
                    info!(message = "intent queued", id = %a.intent.id, run = %a.intent.run, file = %a.file, digest = %a.digest);
                }
                (Read2::Arrival(a), Some(Admission::Duplicate)) => {
                    report.duplicates += 1;
                    info!(message = "duplicate intent ignored", id = %a.intent.id, file = %a.file);
                }
                (Read2::Arrival(a), Some(Admission::Conflict { existing_digest })) => {
                    report.refused += 1;
                    warn!(message = "intent refused: id already used by other bytes", id = %a.intent.id, file = %a.file, digest = %a.digest, %existing_digest);
                }
                (Read2::Refusal(r), _) => {
                    report.refused += 1;
                    let first = r.problems.first().map(|p| p.message.as_str()).unwrap_or("");
                    warn!(message = "intent file refused", file = %r.file, problems = r.problems.len(), first);
                }
                (Read2::Arrival(_), None) => report.refused += 1,
            }
            if let Some(path) = path
                && let Err(error) = fs::remove_file(path)
                && error.kind() != io::ErrorKind::NotFound
            {
                warn!(message = "cannot remove admitted file", path = %path.display(), %error);
            }
        }
        debug!(message = "batch committed", size = batch.len());
        Ok(())
    }
}

fn refusal(name: &str, bytes: Vec<u8>, digest: String, size: u64, message: String) -> Refusal {
    Refusal {
        file: name.to_owned(),
        kind: "invalid",
        size: size.max(bytes.len() as u64),
        bytes,
        digest,
        id: None,
        run: None,
        problems: vec![Problem {
            pointer: String::new(),
            message,
        }],
    }
}

/// Renames a candidate to a unique claim name. `None` if it vanished.
fn claim(dir: &Path, candidate: &Candidate) -> Option<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let already_claimed = candidate
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(CLAIM_PREFIX));
    if already_claimed {
        return Some(candidate.path.clone());
    }
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let unique = format!(
        "{nanos:x}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let claimed = dir.join(format!("{CLAIM_PREFIX}{unique}.{}", candidate.name));
    match fs::rename(&candidate.path, &claimed) {
        Ok(()) => Some(claimed),
        Err(error) if error.kind() == io::ErrorKind::NotFound => None,
        Err(error) => {
            warn!(message = "cannot claim intent file", path = %candidate.path.display(), %error);
            None
        }
    }
}

/// Reads a file that must be a regular file of at most `limit` bytes. The outer
/// error is an I/O failure; the inner one a refusal message.
fn read_regular(path: &Path, limit: usize) -> io::Result<Result<Vec<u8>, String>> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let before = fs::symlink_metadata(path)?;
    if !before.file_type().is_file() {
        return Ok(Err(format!("{name} is not a regular file")));
    }
    if before.len() > limit as u64 {
        return Ok(Err(format!(
            "file is {} bytes, over the limit of {limit} bytes",
            before.len()
        )));
    }
    let file = File::open(path)?;
    let opened = file.metadata()?;
    // The name may have been swapped between the check and the open.
    if !opened.file_type().is_file() || opened.ino() != before.ino() || opened.dev() != before.dev()
    {
        return Ok(Err(format!("{name} changed while it was being read")));
    }
    let mut bytes = Vec::with_capacity(opened.len() as usize);
    file.take(limit as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Ok(Err(format!("file is over the limit of {limit} bytes")));
    }
    Ok(Ok(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intake(dir: &Path, state: &Path) -> Intake {
        Intake::new(
            dir.to_owned(),
            Validator::new(airlock_intent::Limits::default()),
            BTreeSet::from(["default".to_owned()]),
            Queue::open(state).unwrap(),
            Arc::new(Sealer::generate().unwrap()),
        )
    }

    fn intent(id: &str) -> String {
        format!(
            r#"{{"version":1,"id":"{id}","run":"r1","ops":[{{"op":"insert","table":"t","values":{{"a":1}}}}],"reason":"test","provenance":{{"agent":"test"}}}}"#
        )
    }

    #[test]
    fn takes_json_files_and_skips_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("intents");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("a.json"), intent("a")).unwrap();
        fs::write(dir.join(".hidden.json"), intent("h")).unwrap();
        fs::write(dir.join("b.json.tmp"), intent("b")).unwrap();
        fs::create_dir(dir.join("results")).unwrap();
        let mut intake = intake(&dir, &tmp.path().join("state"));
        let report = intake.scan().unwrap();
        assert_eq!(report.queued, 1);
        assert!(!dir.join("a.json").exists());
        assert!(dir.join(".hidden.json").exists());
        assert!(dir.join("b.json.tmp").exists());
        assert!(intake.scan().unwrap() == ScanReport::default());
    }

    #[test]
    fn refuses_links_and_large_files_and_keeps_claims() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("intents");
        fs::create_dir(&dir).unwrap();
        let outside = tmp.path().join("secret.json");
        fs::write(&outside, intent("s")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link.json")).unwrap();
        fs::write(dir.join("big.json"), vec![b' '; 2 << 20]).unwrap();
        fs::create_dir(dir.join("dir.json")).unwrap();
        // A claim left behind by a crash is taken up.
        fs::write(dir.join(".airlock-claim.1-2-3.c.json"), intent("c")).unwrap();
        let mut intake = intake(&dir, &tmp.path().join("state"));
        let report = intake.scan().unwrap();
        assert_eq!(report.queued, 1, "{report:?}");
        assert_eq!(report.refused, 3, "{report:?}");
        assert!(outside.exists(), "the link's target is untouched");
        assert!(!dir.join("link.json").exists());
        assert!(!dir.join("big.json").exists());
        // The directory stays and is not reported twice.
        assert_eq!(intake.scan().unwrap(), ScanReport::default());
        let refused = intake.queue.pending_refusal_outcomes(10).unwrap();
        let files: BTreeSet<_> = refused.iter().map(|r| r.file.as_str()).collect();
        assert_eq!(files, BTreeSet::from(["big.json", "dir.json", "link.json"]));
        assert!(intake.queue.intent("c").unwrap().is_some());
    }
}
