//! `airlock submit`: the agent's side of the intake protocol, done right.
//!
//! An intent must appear in the intent directory whole: written under a temporary
//! dotfile name, flushed to disk, then renamed to its final `.json` name (a rename
//! within one directory is atomic). The final name is `<id>.json`, so its outcome
//! file has the same name in the results directory.
//!
//! [`submit`] checks before it writes. Every file is read (at most
//! `limits.max_file_bytes` + 1 bytes) and validated with the daemon's own
//! [`Validator`] and limits, so a file the daemon would refuse is refused here with
//! the same problems and JSON pointers, and if any file is refused none is written:
//! an agent never has half a batch in flight because of a typo in the other half.
//! Given the operator's configuration, an intent for a target it does not configure
//! is refused too, as the daemon would.
//!
//! With `--wait` it then reads each intent's outcome file until it is final, prints
//! it and exits with a status for its state ([`EXIT_STATUSES`], [`state_status`]).
//! The results directory is the agent's, like the intent directory, so its files are
//! read without following links or waiting on FIFOs, through a size cap, and a file
//! that is missing, unparsable or about other bytes just means "not yet". Only an
//! outcome carrying this submission's digest counts: an older outcome under the
//! same id (the same id submitted earlier with other bytes) is not this intent's.
//! Airlock refuses such a conflicting submission under
//! `<id>.conflict-<digest16>.json` (see [`crate::outcome`]), which is looked for
//! too, so a conflict ends the wait instead of running into the timeout.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use airlock_intent::{Limits, Problem, Validator};
use rustix::fs::{CWD, Mode, OFlags, RenameFlags};
use rustix::io::Errno;
use serde_json::Value;

use crate::config::Config;
use crate::seal;

/// Exit status: a file is not a valid intent, so nothing was written; or, with
/// `--wait`, Airlock refused an intent that validated here (its id already names an
/// intent with other bytes, its target is not configured). `EX_DATAERR`.
pub const EXIT_INVALID: u8 = 65;

/// Exit status: an input file, or the intent directory, is missing or unreadable.
/// `EX_NOINPUT`.
pub const EXIT_NO_INPUT: u8 = 66;

/// Exit status: writing an intent (or making the intent directory) failed.
/// `EX_IOERR`.
pub const EXIT_IO: u8 = 74;

/// Exit status: `--wait` ran out of time before every outcome was final.
/// `EX_TEMPFAIL`: the intents are in flight, and may still be applied.
pub const EXIT_TIMEOUT: u8 = 75;

/// Exit status: the configuration cannot be used (as for `airlock run`). `EX_USAGE`.
pub const EXIT_CONFIG: u8 = 64;

/// Exit status: anything else, such as an outcome in a state this airlock does not
/// know (a newer daemon).
pub const EXIT_OTHER: u8 = 1;

/// Exit status: the command line cannot be parsed (what the argument parser gives).
pub const EXIT_USAGE: u8 = 2;

/// With `--wait`, the exit status of each final state. A refusal by Airlock
/// (`invalid`) is [`EXIT_INVALID`], like a refusal here.
pub const STATE_STATUSES: [(&str, u8); 7] = [
    ("applied", 0),
    ("denied", 10),
    ("rejected", 11),
    ("expired", 12),
    ("failed", 13),
    ("undone", 14),
    ("invalid", EXIT_INVALID),
];

/// Every exit status of `airlock submit` and when it is given, in order: what
/// `airlock submit --help` prints, and what the README's table says. With several
/// files the status is the highest one that applies to any of them.
pub const EXIT_STATUSES: [(u8, &str); 13] = [
    (0, "written; with --wait: applied"),
    (
        EXIT_OTHER,
        "any other error (with --wait: a final state this version does not know)",
    ),
    (
        EXIT_USAGE,
        "the command line is wrong (say --timeout without --wait)",
    ),
    (10, "--wait: denied by the policy"),
    (11, "--wait: rejected by a reviewer"),
    (12, "--wait: the review expired"),
    (13, "--wait: failed in the target"),
    (14, "--wait: applied, then undone by an operator"),
    (EXIT_CONFIG, "the configuration cannot be used"),
    (
        EXIT_INVALID,
        "a file is not a valid intent, and nothing was written; with --wait: Airlock \
         refused it (say its id names an intent with other bytes, or its target is not \
         configured)",
    ),
    (
        EXIT_NO_INPUT,
        "an input file, or the --intents directory (without --create), is missing or \
         unreadable",
    ),
    (
        EXIT_IO,
        "writing an intent (or making the intent directory) failed",
    ),
    (
        EXIT_TIMEOUT,
        "--wait: the timeout passed before every outcome was final; the intents are \
         still in flight",
    ),
];

/// The `--help` text listing [`EXIT_STATUSES`].
pub fn exit_status_help() -> String {
    let mut text = String::from(
        "Exit status (with several files, the highest that applies to any of them):\n",
    );
    for (code, when) in EXIT_STATUSES {
        text.push_str(&format!("  {code:>3}  {when}\n"));
    }
    text
}

/// The exit status for an outcome in the final state `state` ([`STATE_STATUSES`];
/// [`EXIT_OTHER`] for a state this airlock does not know).
pub fn state_status(state: &str) -> u8 {
    STATE_STATUSES
        .iter()
        .find(|(name, _)| *name == state)
        .map_or(EXIT_OTHER, |(_, status)| *status)
}

/// What to submit, where, and whether to wait.
#[derive(Clone, Debug)]
pub struct Options {
    /// The intent files, in order; `-` reads standard input.
    pub files: Vec<PathBuf>,
    /// The intent directory.
    pub intents: PathBuf,
    /// The results directory, read with [`Options::wait`].
    pub results: PathBuf,
    /// Make the intent directory (mode 0755, less the umask) if it is missing,
    /// instead of failing with [`EXIT_NO_INPUT`].
    pub create: bool,
    /// Wait up to this long for every outcome to be final.
    pub wait: Option<Duration>,
    /// The daemon's limits (`[limits]`).
    pub limits: Limits,
    /// The configured target names, when known (from the operator's configuration):
    /// an intent for another target is refused, as the daemon would. `None` checks
    /// no target name, since an agent without the configuration cannot know them.
    pub targets: Option<BTreeSet<String>>,
}

impl Options {
    /// Options from a loaded configuration: its intent and results directories,
    /// limits, and (when `config_given`, that is, the operator's configuration was
    /// loaded rather than the defaults) its targets. No waiting, no `--create`.
    pub fn from_config(files: Vec<PathBuf>, config: &Config, config_given: bool) -> Self {
        Self {
            files,
            intents: config.intents.clone(),
            results: config.results_dir(),
            create: false,
            wait: None,
            limits: config.intent_limits(),
            targets: config_given.then(|| config.targets.keys().cloned().collect()),
        }
    }
}

/// Why a submission stopped before its intents were written (or while they were).
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// An input file could not be read.
    #[error("{file}: cannot read it: {source}")]
    Read { file: String, source: io::Error },
    /// Some files are not valid intents (their problems were printed).
    #[error("nothing written: {invalid} of {total} file(s) refused ({files})")]
    Invalid {
        invalid: usize,
        total: usize,
        files: String,
    },
    /// The intent directory is missing.
    #[error(
        "--intents {}: no such directory (is the path right? give --create to make it)",
        .0.display()
    )]
    NoIntents(PathBuf),
    /// The intent directory is something else, or cannot be looked at.
    #[error("--intents {}: {why}", path.display())]
    BadIntents { path: PathBuf, why: String },
    /// The intent directory could not be made.
    #[error("--intents {}: cannot create it: {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
    /// An intent could not be written.
    #[error("{file}: cannot write it into {}: {source}", dir.display())]
    Write {
        file: String,
        dir: PathBuf,
        source: io::Error,
    },
}

impl SubmitError {
    /// The exit status for this error ([`EXIT_STATUSES`]).
    pub fn status(&self) -> u8 {
        match self {
            SubmitError::Read { .. }
            | SubmitError::NoIntents(_)
            | SubmitError::BadIntents { .. } => EXIT_NO_INPUT,
            SubmitError::Invalid { .. } => EXIT_INVALID,
            SubmitError::Create { .. } | SubmitError::Write { .. } => EXIT_IO,
        }
    }
}

/// One input, read and validated.
#[derive(Debug)]
struct Input {
    /// How the user named it (`<stdin>` for `-`).
    label: String,
    bytes: Vec<u8>,
    /// The intent's id, when it is valid.
    id: Option<String>,
    problems: Vec<Problem>,
}

/// An intent written into the intent directory, whose outcome may be awaited.
#[derive(Debug)]
struct Written {
    label: String,
    id: String,
    /// `sha256:<hex>` of its bytes, as its outcome will carry it.
    digest: String,
}

/// Submits `options.files`: reads and validates all of them, writes them all
/// atomically if every one is valid, and with [`Options::wait`] waits for their
/// outcomes. Prints the written paths (or, with `--wait`, each final outcome as one
/// line of JSON) on `out`, and problems and progress on `err`. Returns the exit
/// status ([`EXIT_STATUSES`]).
pub fn submit(
    options: &Options,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    match submit_inner(options, stdin, out, err) {
        Ok(status) => status,
        Err(error) => {
            let _ = writeln!(err, "airlock: {error}");
            error.status()
        }
    }
}

fn submit_inner(
    options: &Options,
    stdin: &mut dyn Read,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<u8, SubmitError> {
    let validator = Validator::new(options.limits.clone());
    let mut inputs = Vec::with_capacity(options.files.len());
    for file in &options.files {
        inputs.push(read_input(
            file,
            stdin,
            &validator,
            options.targets.as_ref(),
        )?);
    }
    refuse_reused_ids(&mut inputs);
    let invalid: Vec<&Input> = inputs.iter().filter(|i| !i.problems.is_empty()).collect();
    if !invalid.is_empty() {
        for input in &invalid {
            for problem in &input.problems {
                let _ = writeln!(err, "{}: {problem}", input.label);
            }
        }
        return Err(SubmitError::Invalid {
            invalid: invalid.len(),
            total: inputs.len(),
            files: invalid
                .iter()
                .map(|i| i.label.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    intent_directory(&options.intents, options.create)?;
    let mut written: Vec<Written> = Vec::new();
    for input in inputs {
        // Validated, so it has an id; the same id with the same bytes is written once.
        let Some(id) = input.id else { continue };
        let digest = seal::digest(&input.bytes);
        if written.iter().any(|w| w.id == id) {
            continue;
        }
        let path =
            write_intent(&options.intents, &id, &digest, &input.bytes).map_err(|source| {
                SubmitError::Write {
                    file: input.label.clone(),
                    dir: options.intents.clone(),
                    source,
                }
            })?;
        if options.wait.is_some() {
            let _ = writeln!(err, "{}: submitted as {}", input.label, path.display());
        } else {
            let _ = writeln!(out, "{}", path.display());
        }
        written.push(Written {
            label: input.label,
            id,
            digest,
        });
    }
    match options.wait {
        Some(timeout) => Ok(wait(&options.results, written, timeout, out, err)),
        None => Ok(0),
    }
}

/// Reads one input (a file, or standard input for `-`) through the size cap and
/// validates it as the daemon would.
fn read_input(
    file: &Path,
    stdin: &mut dyn Read,
    validator: &Validator,
    targets: Option<&BTreeSet<String>>,
) -> Result<Input, SubmitError> {
    let limit = validator.limits().max_bytes;
    let (label, read) = if file.as_os_str() == "-" {
        ("<stdin>".to_owned(), read_capped(stdin, limit, None))
    } else {
        let label = file.display().to_string();
        let read = File::open(file).and_then(|mut f| {
            let size = f.metadata().ok().filter(|m| m.is_file()).map(|m| m.len());
            read_capped(&mut f, limit, size)
        });
        (label, read)
    };
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(too_large)) => {
            return Ok(Input {
                label,
                bytes: Vec::new(),
                id: None,
                problems: vec![too_large],
            });
        }
        Err(source) => {
            return Err(SubmitError::Read {
                file: label,
                source,
            });
        }
    };
    let (id, problems) = match validator.validate(&bytes) {
        Ok(intent) => {
            let mut problems = Vec::new();
            if let Some(targets) = targets
                && !targets.contains(intent.target.as_str())
            {
                // The daemon's own words (intake).
                let known = targets.iter().cloned().collect::<Vec<_>>().join(", ");
                problems.push(Problem {
                    pointer: "/target".into(),
                    message: format!(
                        "unknown target {:?}; configured targets: {known}",
                        intent.target.as_str()
                    ),
                });
            }
            (Some(intent.id.to_string()), problems)
        }
        Err(invalid) => (invalid.id, invalid.problems),
    };
    Ok(Input {
        label,
        bytes,
        id,
        problems,
    })
}

/// Reads at most `limit + 1` bytes; more than `limit` is the problem the validator
/// gives an oversized document (`size` is the file's, when known).
fn read_capped(
    reader: &mut dyn Read,
    limit: usize,
    size: Option<u64>,
) -> io::Result<Result<Vec<u8>, Problem>> {
    let mut bytes = Vec::new();
    reader.take(limit as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() <= limit {
        return Ok(Ok(bytes));
    }
    let size = match size {
        Some(size) if size > limit as u64 => format!("{size} bytes"),
        _ => format!("over {limit} bytes"),
    };
    Ok(Err(Problem {
        pointer: String::new(),
        message: format!("intent is {size}, more than the limit of {limit} bytes"),
    }))
}

/// Refuses a file whose id an earlier file of the same submission uses with other
/// bytes: the daemon would take one and refuse the other as a conflict. The same
/// bytes twice are one intent, and are written once.
fn refuse_reused_ids(inputs: &mut [Input]) {
    for later in 1..inputs.len() {
        let (earlier, rest) = inputs.split_at_mut(later);
        let input = &mut rest[0];
        let Some(id) = input.id.as_deref().filter(|_| input.problems.is_empty()) else {
            continue;
        };
        if let Some(first) = earlier.iter().find(|e| {
            e.id.as_deref() == Some(id) && e.problems.is_empty() && e.bytes != input.bytes
        }) {
            input.problems.push(Problem {
                pointer: "/id".into(),
                message: format!(
                    "id {id:?} is also the id of {} with other bytes; an id names one intent",
                    first.label
                ),
            });
        }
    }
}

/// Checks that the intent directory exists, or makes it when `create` is set.
fn intent_directory(dir: &Path, create: bool) -> Result<(), SubmitError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(SubmitError::BadIntents {
            path: dir.to_owned(),
            why: "not a directory".into(),
        }),
        Err(error) if error.kind() == io::ErrorKind::NotFound && create => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| SubmitError::Create {
                path: dir.to_owned(),
                source,
            }),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            Err(SubmitError::NoIntents(dir.to_owned()))
        }
        Err(error) => Err(SubmitError::BadIntents {
            path: dir.to_owned(),
            why: format!("cannot look at it: {error}"),
        }),
    }
}

/// Writes one validated intent into `dir`: a new temporary dotfile, flushed, then
/// renamed to `<id>.json` without replacing a file already there (one not yet taken
/// by the daemon, which would be lost). If that name is taken it goes to
/// `<id>.<digest16>.json`; if that is taken too, the same bytes are already waiting
/// there. Returns the final path.
fn write_intent(dir: &Path, id: &str, digest: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    let tmp = write_temporary(dir, &format!("{id}.json"), bytes)?;
    let hex16 = digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .get(..16)
        .unwrap_or("");
    for name in [format!("{id}.json"), format!("{id}.{hex16}.json")] {
        let path = dir.join(&name);
        let renamed = match rustix::fs::renameat_with(CWD, &tmp, CWD, &path, RenameFlags::NOREPLACE)
        {
            // A file system without RENAME_NOREPLACE: replace, as a plain rename does.
            Err(Errno::INVAL | Errno::NOSYS) => fs::rename(&tmp, &path),
            other => other.map_err(io::Error::from),
        };
        match renamed {
            Ok(()) => {
                sync_directory(dir);
                return Ok(path);
            }
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => {
                let _ = fs::remove_file(&tmp);
                return Err(error);
            }
        }
    }
    let _ = fs::remove_file(&tmp);
    Ok(dir.join(format!("{id}.{hex16}.json")))
}

/// Writes `bytes` to a new temporary dotfile in `dir` (mode 0644, so an Airlock
/// running as another user in the agent's group can read it) and flushes it;
/// returns its path. Intake ignores dotfiles.
fn write_temporary(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    crate::state::write_temp(&dir.join(name), bytes, 0o644)
}

/// Flushes a directory's entries, so a rename into it survives a crash. Best
/// effort: some file systems refuse to sync a directory, and the intent's bytes are
/// on disk already.
fn sync_directory(dir: &Path) {
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
}

/// Writes `bytes` into `dir` atomically, named `<id>.json` when the bytes hold a
/// valid intent id, else `fallback` (given `.json` if it lacks it), without
/// validating them; returns the path. The demo uses it to submit its malformed
/// example on purpose; `airlock submit` uses [`submit`], which validates first.
pub fn submit_bytes(dir: &Path, fallback: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    let name = intent_file_name(bytes).unwrap_or_else(|| {
        let base = Path::new(fallback)
            .file_name()
            .map(|n| n.to_string_lossy().trim_start_matches('.').to_owned())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "intent".to_owned());
        if base.ends_with(".json") {
            base
        } else {
            format!("{base}.json")
        }
    });
    fs::create_dir_all(dir)?;
    let tmp = write_temporary(dir, &name, bytes)?;
    let path = dir.join(&name);
    match fs::rename(&tmp, &path) {
        Ok(()) => Ok(path),
        Err(error) => {
            let _ = fs::remove_file(&tmp);
            Err(error)
        }
    }
}

/// `<id>.json` for a document whose `id` is a valid intent id.
fn intent_file_name(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    let doc: IdOnly = serde_json::from_slice(bytes).ok()?;
    airlock_intent::IntentId::parse(&doc.id)
        .ok()
        .map(|id| format!("{id}.json"))
}

/// The largest outcome file read; Airlock's own are far smaller (a refusal lists
/// its problems, one per schema error of a document of at most a few MiB).
const MAX_OUTCOME_BYTES: u64 = 16 << 20;

/// The longest pause between two looks at the results directory.
const MAX_POLL: Duration = Duration::from_millis(200);

/// Waits until every written intent's outcome is final or `timeout` passes; prints
/// each final outcome on `out` as it comes. Returns the highest status.
fn wait(
    results: &Path,
    mut pending: Vec<Written>,
    timeout: Duration,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let deadline = Instant::now() + timeout;
    let mut status = 0;
    let mut last_seen: Vec<Option<String>> = vec![None; pending.len()];
    let mut pause = Duration::from_millis(10);
    loop {
        let mut index = 0;
        while index < pending.len() {
            let intent = &pending[index];
            match look(results, intent) {
                Look::Final(outcome) => {
                    let state = outcome["state"].as_str().unwrap_or("?").to_owned();
                    let _ = writeln!(out, "{outcome}");
                    let _ = out.flush();
                    let reasons = outcome["reasons"]
                        .as_array()
                        .map(|r| {
                            r.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join("; ")
                        })
                        .unwrap_or_default();
                    let _ = writeln!(
                        err,
                        "{}: {} {state}{}",
                        intent.label,
                        intent.id,
                        if reasons.is_empty() {
                            String::new()
                        } else {
                            format!(": {reasons}")
                        }
                    );
                    status = status.max(state_status(&state));
                    pending.remove(index);
                    last_seen.remove(index);
                }
                Look::Pending(state) => {
                    if state.is_some() {
                        last_seen[index] = state;
                    }
                    index += 1;
                }
            }
        }
        if pending.is_empty() {
            return status;
        }
        let now = Instant::now();
        if now >= deadline {
            for (intent, seen) in pending.iter().zip(&last_seen) {
                let _ = writeln!(
                    err,
                    "airlock: {}: timed out after {}s waiting for the outcome of {} in {} ({})",
                    intent.label,
                    timeout.as_secs_f64(),
                    intent.id,
                    results.display(),
                    match seen {
                        Some(state) => format!("last seen {state}"),
                        None => "no outcome seen yet".to_owned(),
                    }
                );
            }
            return status.max(EXIT_TIMEOUT);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_POLL);
    }
}

/// What one look at the results directory found for an intent.
enum Look {
    /// Its final outcome.
    Final(Value),
    /// Not final yet; the state of its outcome, if one was found.
    Pending(Option<String>),
}

/// Looks for `intent`'s outcome: a conflict refusal of its bytes, or `<id>.json`
/// carrying its digest.
fn look(results: &Path, intent: &Written) -> Look {
    let hex16 = intent
        .digest
        .strip_prefix("sha256:")
        .and_then(|hex| hex.get(..16))
        .unwrap_or("");
    let conflict = results.join(format!("{}.conflict-{hex16}.json", intent.id));
    if let Some(outcome) = read_outcome(&conflict).filter(|o| o["final"] == true) {
        return Look::Final(outcome);
    }
    match read_outcome(&results.join(format!("{}.json", intent.id))) {
        Some(outcome) if outcome["digest"] == intent.digest.as_str() => {
            if outcome["final"] == true {
                Look::Final(outcome)
            } else {
                Look::Pending(outcome["state"].as_str().map(str::to_owned))
            }
        }
        _ => Look::Pending(None),
    }
}

/// Reads an outcome file as JSON: `None` if it is missing, not a regular file,
/// larger than [`MAX_OUTCOME_BYTES`] or not JSON (for now). Opened without following
/// a link and without waiting on a FIFO: the directory is the agent's.
fn read_outcome(path: &Path) -> Option<Value> {
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let file = File::from(rustix::fs::open(path, flags, Mode::empty()).ok()?);
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_OUTCOME_BYTES).read_to_end(&mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_by_id_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = submit_bytes(dir.path(), "x.json", br#"{"id":"abc-1","other":1}"#).unwrap();
        assert_eq!(path, dir.path().join("abc-1.json"));
        let path = submit_bytes(dir.path(), "/some/where/bad", b"not json").unwrap();
        assert_eq!(path, dir.path().join("bad.json"));
        let path = submit_bytes(dir.path(), "y.json", br#"{"id":"../../etc/passwd"}"#).unwrap();
        assert_eq!(path, dir.path().join("y.json"));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().all(|n| !n.starts_with('.')));
    }

    #[test]
    fn a_waiting_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let digest = seal::digest(b"one");
        let first = write_intent(dir.path(), "a", &digest, b"one").unwrap();
        assert_eq!(first, dir.path().join("a.json"));
        let other = seal::digest(b"two");
        let second = write_intent(dir.path(), "a", &other, b"two").unwrap();
        assert_eq!(second, dir.path().join(format!("a.{}.json", &other[7..23])));
        // The same bytes again: already waiting under the digest name.
        assert_eq!(
            write_intent(dir.path(), "a", &other, b"two").unwrap(),
            second
        );
        assert_eq!(fs::read(&first).unwrap(), b"one");
        assert_eq!(fs::read(&second).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn every_state_status_is_documented_and_distinct() {
        let mut seen = BTreeSet::new();
        for (state, status) in STATE_STATUSES {
            assert!(seen.insert(status), "{state} shares status {status}");
            assert!(
                EXIT_STATUSES.iter().any(|(code, _)| *code == status),
                "{state}'s status {status} is not in EXIT_STATUSES"
            );
        }
        // Every final lifecycle state has a status of its own.
        for state in crate::lifecycle::State::ALL {
            if state.is_final() {
                assert_ne!(state_status(state.as_str()), EXIT_OTHER, "{state}");
            }
        }
        let help = exit_status_help();
        for (code, _) in EXIT_STATUSES {
            assert!(help.contains(&format!(" {code:>3}  ")), "{help}");
        }
    }
}
