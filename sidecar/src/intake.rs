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
//! Everything in the directory is hostile input (DESIGN invariant 5), and the agent
//! can change any of it at any instant. A scan takes only names ending in `.json`
//! directly in the directory and skips dotfiles. Directories are refused once (they
//! are left in place and remembered by device and inode, for as long as they stay).
//! Everything else is claimed (below) and then opened with `O_NOFOLLOW|O_NONBLOCK`:
//! a symbolic link fails to open, a FIFO opens without waiting for a writer, and the
//! type and size are checked on the open handle (`fstat`), not on the name, so a
//! swap after the listing changes nothing. Only a regular file is read, and at most
//! `limits.max_file_bytes + 1` bytes of it, into a buffer that grows as bytes
//! arrive: a file whose size the agent toggles (say with `ftruncate` to 1 TiB and
//! back) is at worst refused as too large, and no allocation follows its metadata.
//! A batch is committed after `BATCH` files or `BATCH_BYTES` bytes read,
//! whichever comes first, and a refusal holds only the first bytes the queue keeps
//! ([`REFUSED_PAYLOAD_PREFIX`]).
//!
//! Nothing is lost (DESIGN invariant 1): a candidate is first *claimed*, renamed to a
//! unique hidden name of its own, `.airlock-claim.<n>.<name>` (`<n>` in lowercase
//! hex and dashes; the rename never replaces an existing file), so an agent that
//! reuses a file name can never have its new file mistaken for, or deleted with, the
//! old one. When the original name is too long to fit in a claim name (255 bytes in
//! all) the claim is just `.airlock-claim.<n>`, so any name the file system allows
//! can be claimed. The claimed file is removed only after the queue transaction
//! holding its bytes (or its refusal) has committed.
//!
//! A crash leaves a claimed file behind, and the next scan takes it up like any
//! other, under the original name the claim name keeps; admission and refusal are
//! idempotent, so one already committed is only announced again. A short claim has
//! lost its original name (one over about 215 bytes), so it is recorded under the
//! claim name: an intent keeps its id, and so its outcome file `<id>.json`, and its
//! first admission's row if it was already committed; a refused one gets an outcome
//! named by the digest of the claim name (see [`crate::outcome`]), and if its first
//! refusal had committed, it is recorded a second time.
//!
//! A name that is not UTF-8, or an entry that cannot be claimed, is refused once
//! (one refusal, one warning): the first is claimed and refused without being read,
//! under the label `name-<hex16>.json` (the SHA-256 of the raw name bytes), and its
//! claim removed; the second is remembered by device and inode, like a directory.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use airlock_intent::{Problem, Validator};
use rustix::fs::{CWD, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use tracing::{debug, info, warn};

use crate::outcome::digest_name;
use crate::queue::{Admission, Arrival, Queue, QueueError, REFUSED_PAYLOAD_PREFIX, Refusal};
use crate::seal::{self, Sealer};

/// The prefix of claimed files.
const CLAIM_PREFIX: &str = ".airlock-claim.";

/// The longest file name (Linux's `NAME_MAX`, in bytes).
const NAME_MAX: usize = 255;

/// Most files admitted in one queue transaction.
const BATCH: usize = 256;

/// Most bytes read into one batch before it is committed (one file may pass it by
/// up to `limits.max_file_bytes`).
const BATCH_BYTES: usize = 32 << 20;

/// Why a scan failed (the directory itself, or the queue; single bad files never
/// fail a scan: they are refused). The directory's message includes its cause, which
/// is therefore not also its `source()` (a chain printer would show it twice).
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("cannot read intent directory {path}: {error}")]
    ReadDir { path: PathBuf, error: io::Error },
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
    /// Entries already refused that stay in the directory (directories, entries that
    /// cannot be claimed): remembered by device and inode so they are reported once,
    /// not at every scan. Forgotten once they leave the directory, so the set never
    /// outgrows it.
    reported: HashSet<(u64, u64)>,
}

/// A directory entry taken for processing.
#[derive(Debug)]
struct Candidate {
    /// The name the agent gave it, or `name-<hex16>.json` when that is not UTF-8.
    name: String,
    /// Whether the name is UTF-8 (if not, the file is refused without being read).
    utf8: bool,
    /// Whether it is a claim left behind by a crash (already claimed).
    leftover: bool,
    /// The name the agent gave, as raw bytes (the claim name for a leftover claim
    /// that could not keep it).
    raw: std::ffi::OsString,
    path: PathBuf,
    mtime: SystemTime,
    /// Device and inode at listing time.
    key: (u64, u64),
    /// The size at listing time (for refusals of files that are not read).
    size: u64,
}

enum Read2 {
    Arrival(Box<Arrival>),
    Refusal(Refusal),
}

impl Read2 {
    /// Bytes held in memory.
    fn held(&self) -> usize {
        match self {
            Read2::Arrival(a) => a.bytes.len() + a.envelope.len(),
            Read2::Refusal(r) => r.bytes.len(),
        }
    }
}

/// Where a claim attempt left a candidate.
enum Claim {
    Claimed(PathBuf),
    /// Gone since the listing (the agent took it back).
    Gone,
    Failed(io::Error),
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
                    .map(|r| (Read2::Refusal(r), None))
                    .collect(),
                &mut report,
            )?;
        }
        // Oldest first: queue order is the order the agent wrote its files.
        candidates.sort_by(|a, b| a.mtime.cmp(&b.mtime).then_with(|| a.name.cmp(&b.name)));
        let mut batch = Vec::new();
        let mut held = 0;
        for candidate in &candidates {
            let (read, path) = match claim(&self.dir, candidate) {
                Claim::Claimed(path) => {
                    let read = if candidate.utf8 {
                        self.read(&candidate.name, &path)
                    } else {
                        Read2::Refusal(unread(
                            &candidate.name,
                            candidate.size,
                            format!(
                                "the file name {:?} is not UTF-8; name intent files `<id>.json`",
                                candidate.raw
                            ),
                        ))
                    };
                    (read, Some(path))
                }
                Claim::Gone => continue,
                Claim::Failed(error) => {
                    // Left in place: refused once, then ignored while it stays.
                    self.reported.insert(candidate.key);
                    let refused = unread(
                        &candidate.name,
                        candidate.size,
                        format!(
                            "{} cannot be taken from the intent directory ({error}); it is left in place and ignored",
                            candidate.name
                        ),
                    );
                    (Read2::Refusal(refused), None)
                }
            };
            held += read.held();
            batch.push((read, path));
            if batch.len() >= BATCH || held >= BATCH_BYTES {
                self.commit(std::mem::take(&mut batch), &mut report)?;
                held = 0;
            }
        }
        self.commit(batch, &mut report)?;
        Ok(report)
    }

    /// Lists candidates; refuses directories (once) without claiming them.
    fn list(&mut self) -> Result<(Vec<Candidate>, Vec<Refusal>), IntakeError> {
        let read_dir = fs::read_dir(&self.dir).map_err(|error| IntakeError::ReadDir {
            path: self.dir.clone(),
            error,
        })?;
        let mut candidates = Vec::new();
        let mut refusals = Vec::new();
        let mut present = HashSet::new();
        for entry in read_dir {
            let entry = entry.map_err(|error| IntakeError::ReadDir {
                path: self.dir.clone(),
                error,
            })?;
            let file_name = entry.file_name();
            let leftover = parse_claim(file_name.as_bytes());
            // The name the agent gave: kept in a claim name when it fitted.
            let raw = match leftover {
                Some(Some(original)) => original,
                Some(None) => file_name.as_bytes(),
                None if file_name.as_bytes().starts_with(b".")
                    || !file_name.as_bytes().ends_with(b".json") =>
                {
                    continue;
                }
                None => file_name.as_bytes(),
            };
            // `DirEntry::metadata` does not follow symbolic links.
            let Ok(meta) = entry.metadata() else {
                continue; // Gone since the listing.
            };
            let key = (meta.dev(), meta.ino());
            present.insert(key);
            let (name, utf8) = match std::str::from_utf8(raw) {
                Ok(name) => (name.to_owned(), true),
                Err(_) => (digest_name(raw), false),
            };
            if meta.file_type().is_dir() {
                if self.reported.insert(key) {
                    refusals.push(unread(&name, 0, format!(
                            "{name} is a directory; intents must be regular files (write, then rename into place)"
                        ),
                    ));
                }
                continue;
            }
            if self.reported.contains(&key) {
                continue; // Could not be claimed, and already refused.
            }
            candidates.push(Candidate {
                name,
                utf8,
                leftover: leftover.is_some(),
                raw: OsStr::from_bytes(raw).to_owned(),
                path: entry.path(),
                mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                key,
                size: meta.len(),
            });
        }
        self.reported.retain(|key| present.contains(key));
        Ok((candidates, refusals))
    }

    /// Reads and validates one claimed file.
    fn read(&self, name: &str, path: &Path) -> Read2 {
        let limit = self.validator.limits().max_bytes;
        let bytes = match read_regular(path, limit) {
            Ok(bytes) => bytes,
            Err(Unread { size, message }) => {
                return Read2::Refusal(unread(name, size, format!("{name} {message}")));
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
                    bytes: kept(bytes),
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
                Err(error) => {
                    let size = bytes.len() as u64;
                    Read2::Refusal(refusal(
                        name,
                        kept(bytes),
                        digest,
                        size,
                        format!("cannot seal {name}: {error}"),
                    ))
                }
            },
            Err(invalid) => Read2::Refusal(Refusal {
                file: name.to_owned(),
                kind: "invalid",
                size: bytes.len() as u64,
                id: invalid.id,
                run: invalid.run,
                problems: invalid.problems,
                bytes: kept(bytes),
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

/// The part of a refused file's bytes the queue keeps.
fn kept(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.truncate(REFUSED_PAYLOAD_PREFIX);
    bytes.shrink_to_fit();
    bytes
}

/// A refusal of a file whose bytes were never read (they stay unknown: no digest).
fn unread(name: &str, size: u64, message: String) -> Refusal {
    refusal(name, Vec::new(), String::new(), size, message)
}

/// A refusal with one problem about the whole file.
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

/// Parses a claim name this intake makes: `None` if `name` is not one; otherwise
/// the original name it keeps (`.airlock-claim.<n>.<name>`), if any.
fn parse_claim(name: &[u8]) -> Option<Option<&[u8]>> {
    let rest = name.strip_prefix(CLAIM_PREFIX.as_bytes())?;
    let end = rest.iter().position(|&b| b == b'.').unwrap_or(rest.len());
    let (unique, original) = rest.split_at(end);
    let unique_ok = !unique.is_empty()
        && unique
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b'-'));
    match original.strip_prefix(b".") {
        _ if !unique_ok => None,
        None => Some(None),
        // Only a name intake would have claimed.
        Some(original) if !original.starts_with(b".") && original.ends_with(b".json") => {
            Some(Some(original))
        }
        Some(_) => None,
    }
}

/// Renames a candidate to a new claim name, never replacing an existing file.
fn claim(dir: &Path, candidate: &Candidate) -> Claim {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    if candidate.leftover {
        return Claim::Claimed(candidate.path.clone());
    }
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    // An existing name (planted by the agent) is skipped, a few times at most.
    for _ in 0..4 {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let unique = format!(
            "{nanos:x}-{:x}-{:x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut claimed = std::ffi::OsString::from(format!("{CLAIM_PREFIX}{unique}"));
        // The original name goes along when it fits, so a crash does not lose it.
        if claimed.len() + 1 + candidate.raw.len() <= NAME_MAX {
            claimed.push(".");
            claimed.push(&candidate.raw);
        }
        let claimed = dir.join(claimed);
        let renamed = match rustix::fs::renameat_with(
            CWD,
            &candidate.path,
            CWD,
            &claimed,
            RenameFlags::NOREPLACE,
        ) {
            // A file system without RENAME_NOREPLACE: the name is unique enough.
            Err(Errno::INVAL | Errno::NOSYS) => fs::rename(&candidate.path, &claimed),
            other => other.map_err(io::Error::from),
        };
        match renamed {
            Ok(()) => return Claim::Claimed(claimed),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Claim::Gone,
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => last = error,
            Err(error) => return Claim::Failed(error),
        }
    }
    Claim::Failed(last)
}

/// Why a claimed file was not read: its size as far as known, and the problem (a
/// phrase following the file's name).
#[derive(Debug)]
struct Unread {
    size: u64,
    message: String,
}

/// Reads a claimed file that must be a regular file of at most `limit` bytes.
///
/// The type and size are checked on the open handle; the open itself neither
/// follows a symbolic link nor waits for a FIFO's writer. At most `limit + 1` bytes
/// are read, into a buffer that grows with them: the agent may change the file's
/// size at any instant.
fn read_regular(path: &Path, limit: usize) -> Result<Vec<u8>, Unread> {
    let unread = |size, message: String| Unread { size, message };
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::LOOP) => {
            return Err(unread(
                0,
                "is a symbolic link; intents must be regular files (write, then rename into place)"
                    .into(),
            ));
        }
        Err(Errno::NXIO) => {
            return Err(unread(
                0,
                "is a socket; intents must be regular files (write, then rename into place)".into(),
            ));
        }
        Err(error) => {
            return Err(unread(
                0,
                format!("cannot be opened: {}", io::Error::from(error)),
            ));
        }
    };
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|error| unread(0, format!("cannot be read: {error}")))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_block_device() || kind.is_char_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(unread(
            0,
            format!("is {what}; intents must be regular files (write, then rename into place)"),
        ));
    }
    if meta.len() > limit as u64 {
        return Err(unread(
            meta.len(),
            format!("is {} bytes, over the limit of {limit} bytes", meta.len()),
        ));
    }
    let mut bytes = Vec::new();
    (&file)
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| unread(meta.len(), format!("cannot be read: {error}")))?;
    if bytes.len() > limit {
        return Err(unread(
            bytes.len() as u64,
            format!("is over the limit of {limit} bytes"),
        ));
    }
    Ok(bytes)
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
        // Claims left behind by a crash are taken up, under their original name when
        // the claim name kept it.
        fs::write(dir.join(".airlock-claim.1-2-3"), intent("c")).unwrap();
        fs::write(dir.join(".airlock-claim.1-2-4.d.json"), intent("d")).unwrap();
        fs::write(dir.join(".airlock-claim.1-2-5.bad.json"), "{").unwrap();
        // Not claim names: ignored like any dotfile.
        fs::write(dir.join(".airlock-claim.xyz"), intent("x")).unwrap();
        fs::write(dir.join(".airlock-claim.1-2-6..e.json"), intent("e")).unwrap();
        let mut intake = intake(&dir, &tmp.path().join("state"));
        let report = intake.scan().unwrap();
        assert_eq!(report.queued, 2, "{report:?}");
        assert_eq!(report.refused, 4, "{report:?}");
        assert!(outside.exists(), "the link's target is untouched");
        assert!(!dir.join("link.json").exists());
        assert!(!dir.join("big.json").exists());
        // The directory stays and is not reported twice.
        assert_eq!(intake.scan().unwrap(), ScanReport::default());
        let refused = intake.queue.pending_refusal_outcomes(10).unwrap();
        let files: BTreeSet<_> = refused.iter().map(|r| r.file.as_str()).collect();
        assert_eq!(
            files,
            BTreeSet::from(["bad.json", "big.json", "dir.json", "link.json"])
        );
        assert_eq!(
            intake.queue.intent("c").unwrap().unwrap().file,
            ".airlock-claim.1-2-3"
        );
        assert_eq!(intake.queue.intent("d").unwrap().unwrap().file, "d.json");
        assert!(dir.join(".airlock-claim.xyz").exists());
    }

    #[test]
    fn fifos_and_odd_names_are_refused_once_and_long_names_are_claimed() {
        use std::os::unix::ffi::OsStringExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("intents");
        fs::create_dir(&dir).unwrap();
        rustix::fs::mknodat(
            CWD,
            dir.join("fifo.json"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let odd = std::ffi::OsString::from_vec(b"odd-\xff.json".to_vec());
        fs::write(dir.join(&odd), intent("odd")).unwrap();
        let long_id = "l".repeat(128);
        let long_name = format!("{}.json", "n".repeat(245));
        fs::write(dir.join(&long_name), intent(&long_id)).unwrap();
        let mut intake = intake(&dir, &tmp.path().join("state"));
        let report = intake.scan().unwrap();
        assert_eq!((report.queued, report.refused), (1, 2), "{report:?}");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "every file taken");
        assert_eq!(intake.scan().unwrap(), ScanReport::default());
        let refused = intake.queue.pending_refusal_outcomes(10).unwrap();
        let files: BTreeSet<_> = refused.iter().map(|r| r.file.clone()).collect();
        assert_eq!(
            files,
            BTreeSet::from(["fifo.json".to_owned(), digest_name(odd.as_bytes())])
        );
        let row = intake.queue.intent(&long_id).unwrap().unwrap();
        assert_eq!(row.file, long_name);
    }

    #[test]
    fn reading_is_capped_whatever_the_metadata_says() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let file = File::create(&path).unwrap();
        file.set_len(1 << 40).unwrap();
        let unread = read_regular(&path, 1024).unwrap_err();
        assert_eq!(unread.size, 1 << 40);
        file.set_len(10).unwrap();
        assert_eq!(read_regular(&path, 1024).unwrap(), vec![0; 10]);
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(
            read_regular(&link, 1024)
                .unwrap_err()
                .message
                .contains("symbolic link")
        );
    }
}
