//! Verify: the auditor's check of an exported run log (DESIGN invariant 6).
//!
//! [`verify`] takes the lines of an export (JSON Lines: record, intent and
//! checkpoint lines, one run or several interleaved; the format is specified in
//! `docs/log-format.md`), the sidecar's public key and [`Options`], and returns a
//! [`Report`]. It is pure: no files, no SQLite, no clock. The `airlock verify`
//! command reads the export (or the queue) and calls it.
//!
//! What it establishes, per run:
//! - **The chain is whole.** `seq` starts at 1 and grows by one; each `prev` is the
//!   SHA-256 of the exact bytes of the run's previous record. A dropped, swapped,
//!   inserted, reordered or altered record breaks the chain at the next record, or
//!   (for the last record) at the checkpoint that covers it.
//! - **Checkpoints are the sidecar's.** Each verifies under the given key with the
//!   checkpoint payload type, names a record already seen, and its `head` is that
//!   record's digest. The highest such record is what the run is *sealed through*.
//! - **Intents are the agent's exact bytes.** Each `received` record is preceded by
//!   its intent line, whose envelope verifies under the key with the intent payload
//!   type, whose payload hashes to the record's `data.digest` and names the record's
//!   intent id and run.
//! - **Every intent followed the lifecycle** ([`State::next`]), approvals named the
//!   intent's digest and came from distinct approvers, and quorum claims agree with
//!   the decision. Approvals an approval `voided` (another preview) and all
//!   approvals before a `rows_changed` record no longer count.
//! - **Nothing is unsealed** ([`Mode::Export`]: a failure; [`Mode::Live`]: a
//!   warning, as the sidecar seals in batches).
//! - **Published heads are in the log** ([`ExpectedHead`]).
//!
//! What it cannot establish alone: an export cut back to an earlier checkpoint (with
//! the later records and checkpoints of a run removed) is a valid, shorter log. Only
//! a head published elsewhere (an [`ExpectedHead`]) catches that.
//!
//! Findings are collected rather than stopping at the first. After a run's chain
//! breaks, the rest of that run is counted but not checked: everything after the
//! break is unauthenticated, and checking it would only add noise.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::lifecycle::{Event, State, Verdict};
use crate::log::{self, CheckpointPayload, EventName, RecordLine};
use crate::seal::{CHECKPOINT_PAYLOAD_TYPE, Envelope, INTENT_PAYLOAD_TYPE, Verifier, digest};

/// Whether the log is a finished export or the live log of a running sidecar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// An export: every run ends with a checkpoint, so unsealed records are failures.
    #[default]
    Export,
    /// A running sidecar's log: it seals in batches, so records after the last
    /// checkpoint are only warnings.
    Live,
}

/// A run head published outside the log (in a ticket, a transparency log, an
/// earlier audit): the log must contain record `seq` of `run` with this digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedHead {
    /// The run id.
    pub run: String,
    /// The record's sequence number (1-based).
    pub seq: u64,
    /// The record's digest, `sha256:` and 64 lowercase hex digits.
    pub digest: String,
}

impl FromStr for ExpectedHead {
    type Err = VerifyError;

    /// Parses `RUN:SEQ:sha256:HEX`. Run ids may contain `:`, so SEQ and the digest
    /// are taken from the right.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |problem: &str| VerifyError::ExpectedHead {
            text: text.to_owned(),
            problem: problem.to_owned(),
        };
        let (rest, hex) = text.rsplit_once(':').ok_or_else(|| bad("it has no ':'"))?;
        let (rest, algorithm) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("the digest must be sha256:HEX"))?;
        if algorithm != "sha256" {
            return Err(bad("the digest must be sha256:HEX"));
        }
        let (run, seq) = rest.rsplit_once(':').ok_or_else(|| bad("SEQ is missing"))?;
        if run.is_empty() {
            return Err(bad("the run id is empty"));
        }
        let seq: u64 = seq
            .parse()
            .map_err(|_| bad("SEQ is not a positive integer"))?;
        if seq == 0 {
            return Err(bad("SEQ starts at 1"));
        }
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("HEX must be 64 hexadecimal digits"));
        }
        Ok(Self {
            run: run.to_owned(),
            seq,
            digest: format!("sha256:{}", hex.to_ascii_lowercase()),
        })
    }
}

impl fmt::Display for ExpectedHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.run, self.seq, self.digest)
    }
}

/// Why an argument to verification could not be used.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// An expected head is not `RUN:SEQ:sha256:HEX`.
    #[error("expected head {text:?} is not RUN:SEQ:sha256:HEX: {problem}")]
    ExpectedHead {
        /// The text given.
        text: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// How to verify.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Export (unsealed records fail) or live (they warn).
    pub mode: Mode,
    /// Heads published elsewhere that the log must contain.
    pub expected_heads: Vec<ExpectedHead>,
}

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The 1-based line of the export it is about; `None` for findings about the
    /// log as a whole (an expected head beyond the end of a run).
    pub line: Option<usize>,
    /// The run it is about, when known.
    pub run: Option<String>,
    /// The record sequence number it is about, when known.
    pub seq: Option<u64>,
    /// What is wrong, in words that name the line, field or record involved.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}")?,
            None => f.write_str("end of log")?,
        }
        match (&self.run, self.seq) {
            (Some(run), Some(seq)) => write!(f, " ({run} seq {seq})")?,
            (Some(run), None) => write!(f, " ({run})")?,
            (None, Some(seq)) => write!(f, " (seq {seq})")?,
            (None, None) => {}
        }
        write!(f, ": {}", self.message)
    }
}

/// What verification found about one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Record lines of the run (including any after a chain break).
    pub records: u64,
    /// Intents received in the run.
    pub intents: u64,
    /// Checkpoints that verified.
    pub checkpoints: u64,
    /// The last record of the intact chain: sequence number and digest.
    pub head: Option<(u64, String)>,
    /// The highest record a valid checkpoint vouches for.
    pub sealed_through: Option<u64>,
    /// Failures: the run's log cannot be trusted as it stands.
    pub failures: Vec<Finding>,
    /// Warnings: nothing is wrong, but not everything is vouched for.
    pub warnings: Vec<Finding>,
}

impl RunReport {
    /// Whether the run has no failures (warnings are allowed).
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The result of [`verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Per run, by run id.
    pub runs: BTreeMap<String, RunReport>,
    /// Failures not tied to a run (an unparsable line, an unknown line type, an
    /// intent line not followed by its record, an expected head for a missing run).
    pub failures: Vec<Finding>,
}

impl Report {
    /// Whether the whole log verified: no failure anywhere (warnings are allowed).
    pub fn ok(&self) -> bool {
        self.failures.is_empty() && self.runs.values().all(RunReport::ok)
    }

    /// Every failure: those not tied to a run first, then each run's in run order.
    pub fn all_failures(&self) -> impl Iterator<Item = &Finding> {
        self.failures
            .iter()
            .chain(self.runs.values().flat_map(|run| run.failures.iter()))
    }

    /// Every warning, in run order.
    pub fn all_warnings(&self) -> impl Iterator<Item = &Finding> {
        self.runs.values().flat_map(|run| run.warnings.iter())
    }
}

/// One line per run (`run-a: OK, 12 records, 3 intents, sealed through seq 12`, or
/// `run-b: FAILED at line 7 (seq 4): ...` with the first failure), then one line per
/// failure not tied to a run. The full list is in [`Report::all_failures`].
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut newline = |f: &mut fmt::Formatter<'_>| {
            if first {
                first = false;
                Ok(())
            } else {
                f.write_str("\n")
            }
        };
        for (name, run) in &self.runs {
            newline(f)?;
            write!(f, "{name}: ")?;
            if let Some(failure) = run.failures.first() {
                f.write_str("FAILED")?;
                if let Some(line) = failure.line {
                    write!(f, " at line {line}")?;
                }
                if let Some(seq) = failure.seq {
                    write!(f, " (seq {seq})")?;
                }
                write!(f, ": {}", failure.message)?;
                let more = run.failures.len() - 1;
                if more > 0 {
                    write!(f, " (and {more} more {})", plural(more as u64, "failure"))?;
                }
                continue;
            }
            write!(
                f,
                "OK, {} {}, {} {}, ",
                run.records,
                plural(run.records, "record"),
                run.intents,
                plural(run.intents, "intent"),
            )?;
            match run.sealed_through {
                Some(seq) => write!(f, "sealed through seq {seq}")?,
                None => f.write_str("not sealed")?,
            }
            if let Some(warning) = run.warnings.first() {
                write!(f, "; warning: {}", warning.message)?;
            }
        }
        for failure in &self.failures {
            newline(f)?;
            write!(f, "export: FAILED at {failure}")?;
        }
        if first {
            f.write_str("empty log: no records")?;
        }
        Ok(())
    }
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

/// Verifies an export given as a whole: `export` is split on `\n` (a final newline
/// ends the last line; it does not start an empty one) and passed to [`verify`].
pub fn verify_export(export: &[u8], key: &Verifier, options: &Options) -> Report {
    let export = export.strip_suffix(b"\n").unwrap_or(export);
    if export.is_empty() {
        return verify(std::iter::empty::<&[u8]>(), key, options);
    }
    verify(export.split(|&b| b == b'\n'), key, options)
}

/// Verifies the lines of an export (each without its `\n`; one trailing `\n` is
/// ignored) under `key`. Line numbers in the report count from 1 in the order given.
///
/// Lines are consumed one at a time and only a digest and line number are kept per
/// record, so a caller may stream a large export (e.g. from `BufRead::split`).
pub fn verify(
    lines: impl IntoIterator<Item = impl AsRef<[u8]>>,
    key: &Verifier,
    options: &Options,
) -> Report {
    let mut verification = Verification {
        key,
        runs: BTreeMap::new(),
        intents: BTreeMap::new(),
        pending: None,
        failures: Vec::new(),
    };
    for (index, bytes) in lines.into_iter().enumerate() {
        let bytes = bytes.as_ref();
        let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        verification.line(index + 1, bytes);
    }
    verification.finish(options)
}

/// An intent line waiting for its `received` record (the next line).
struct IntentLine {
    line: usize,
    id: String,
    /// `None` when the envelope could not be parsed (already reported).
    envelope: Option<Envelope>,
}

/// What is known about one intent, by id.
struct IntentTrack {
    run: String,
    /// Line of its `received` record.
    line: usize,
    state: State,
    /// `data.digest` of its `received` record: the SHA-256 of the intent bytes.
    digest: String,
    /// Distinct approvals the decision asks for.
    needed: u64,
    approvers: BTreeSet<String>,
}

#[derive(Default)]
struct RunState {
    report: RunReport,
    /// `chain[seq - 1]`: the digest and line of each record of the intact chain.
    chain: Vec<([u8; 32], usize)>,
    /// Set at the first chain break; the rest of the run is counted, not checked.
    broken: bool,
}

impl RunState {
    fn fail(&mut self, run: &str, line: usize, seq: Option<u64>, message: String) {
        self.report.failures.push(Finding {
            line: Some(line),
            run: Some(run.to_owned()),
            seq,
            message,
        });
    }
}

fn digest_string(raw: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(raw))
}

struct Verification<'k> {
    key: &'k Verifier,
    runs: BTreeMap<String, RunState>,
    intents: BTreeMap<String, IntentTrack>,
    pending: Option<IntentLine>,
    failures: Vec<Finding>,
}

impl Verification<'_> {
    fn fail(&mut self, line: Option<usize>, message: String) {
        self.failures.push(Finding {
            line,
            run: None,
            seq: None,
            message,
        });
    }

    /// Reports an intent line that was not followed by its `received` record.
    fn orphan(&mut self, pending: IntentLine) {
        self.fail(
            Some(pending.line),
            format!(
                "intent line for {} is not immediately followed by its received record",
                pending.id
            ),
        );
    }

    fn flush_pending(&mut self) {
        if let Some(pending) = self.pending.take() {
            self.orphan(pending);
        }
    }

    fn line(&mut self, line: usize, bytes: &[u8]) {
        if bytes.is_empty() {
            self.flush_pending();
            self.fail(Some(line), "line is empty".to_owned());
            return;
        }
        let value: Value = match serde_json::from_slice(bytes) {
            Ok(value) => value,
            Err(e) => {
                self.flush_pending();
                self.fail(
                    Some(line),
                    format!("line is not valid JSON ({e}): it was cut or corrupted"),
                );
                return;
            }
        };
        match value.get("type").and_then(Value::as_str) {
            Some(log::RECORD) => self.record(line, bytes, value),
            Some(log::INTENT) => {
                self.flush_pending();
                self.intent_line(line, value);
            }
            Some(log::CHECKPOINT) => {
                self.flush_pending();
                self.checkpoint(line, value);
            }
            Some(other) => {
                self.flush_pending();
                self.fail(
                    Some(line),
                    format!("unknown line type {other:?} (expected record, intent or checkpoint)"),
                );
            }
            None => {
                self.flush_pending();
                self.fail(
                    Some(line),
                    "line has no string \"type\" (expected record, intent or checkpoint)"
                        .to_owned(),
                );
            }
        }
    }

    fn intent_line(&mut self, line: usize, mut value: Value) {
        let Some(id) = value.get("id").and_then(Value::as_str).map(str::to_owned) else {
            self.fail(Some(line), "intent line has no string \"id\"".to_owned());
            return;
        };
        let envelope = match value.get_mut("envelope").map(Value::take) {
            None => {
                self.fail(
                    Some(line),
                    format!("intent line for {id} has no \"envelope\""),
                );
                None
            }
            Some(envelope) => match serde_json::from_value::<Envelope>(envelope) {
                Ok(envelope) => Some(envelope),
                Err(e) => {
                    self.fail(
                        Some(line),
                        format!("intent line for {id}: envelope is not a DSSE envelope: {e}"),
                    );
                    None
                }
            },
        };
        self.pending = Some(IntentLine { line, id, envelope });
    }

    fn checkpoint(&mut self, line: usize, mut value: Value) {
        let envelope = match value.get_mut("envelope").map(Value::take) {
            None => {
                self.fail(Some(line), "checkpoint line has no \"envelope\"".to_owned());
                return;
            }
            Some(envelope) => match serde_json::from_value::<Envelope>(envelope) {
                Ok(envelope) => envelope,
                Err(e) => {
                    self.fail(
                        Some(line),
                        format!("checkpoint envelope is not a DSSE envelope: {e}"),
                    );
                    return;
                }
            },
        };
        // The claims are read before the signature is checked only to know which
        // run to report under; nothing is trusted until the signature verifies.
        let verified = self.key.verify_as(&envelope, CHECKPOINT_PAYLOAD_TYPE);
        let claims: CheckpointPayload = match serde_json::from_slice(&envelope.payload) {
            Ok(claims) => claims,
            Err(e) => {
                let signature = match &verified {
                    Ok(_) => String::new(),
                    Err(e) => format!("; its signature does not verify either: {e}"),
                };
                self.fail(
                    Some(line),
                    format!(
                        "checkpoint payload is not {{at, head, run, seq, type}}: {e}{signature}"
                    ),
                );
                return;
            }
        };
        let run = claims.run.as_str();
        let state = self.runs.entry(claims.run.clone()).or_default();
        if state.broken {
            return;
        }
        let seq = Some(claims.seq);
        if let Err(e) = verified {
            state.fail(
                run,
                line,
                seq,
                format!(
                    "checkpoint does not verify under key {}: {e}",
                    self.key.keyid()
                ),
            );
            return;
        }
        if claims.kind != log::CHECKPOINT {
            state.fail(
                run,
                line,
                seq,
                format!(
                    "checkpoint payload has type {:?}, not \"checkpoint\"",
                    claims.kind
                ),
            );
            return;
        }
        let reached = state.chain.len() as u64;
        let Some(&(head, head_line)) = claims
            .seq
            .checked_sub(1)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| state.chain.get(i))
        else {
            state.fail(
                run,
                line,
                seq,
                format!(
                    "checkpoint covers seq {}, but the run has only reached seq {reached} \
                     here (a checkpoint follows the record it covers)",
                    claims.seq
                ),
            );
            return;
        };
        let head = digest_string(&head);
        if claims.head != head {
            state.fail(
                run,
                line,
                seq,
                format!(
                    "checkpoint head {} does not match the digest of seq {} (line {head_line}), \
                     {head}: that record was altered after it was sealed",
                    claims.head, claims.seq
                ),
            );
            return;
        }
        state.report.checkpoints += 1;
        state.report.sealed_through = state.report.sealed_through.max(seq);
    }

    fn record(&mut self, line: usize, bytes: &[u8], value: Value) {
        let pending = self.pending.take();
        let record: RecordLine = match RecordLine::deserialize(&value) {
            Ok(record) => record,
            Err(e) => {
                if let Some(pending) = pending {
                    self.orphan(pending);
                }
                let message = format!("record is malformed: {e}");
                match value.get("run").and_then(Value::as_str) {
                    Some(run) => {
                        let state = self.runs.entry(run.to_owned()).or_default();
                        state.report.records += 1;
                        if !state.broken {
                            state.fail(run, line, None, message);
                            state.broken = true;
                        }
                    }
                    None => self.fail(Some(line), message),
                }
                return;
            }
        };
        let run = record.run.as_str();
        let seq = Some(record.seq);
        let state = self.runs.entry(record.run.clone()).or_default();
        state.report.records += 1;
        if state.broken {
            return;
        }

        // The chain.
        let expected = state.chain.len() as u64 + 1;
        if record.seq != expected {
            let message = if expected == 1 {
                format!(
                    "the run's first record has seq {}, not 1: its earlier records are missing",
                    record.seq
                )
            } else {
                let previous = state.chain.len();
                let previous_line = state.chain.last().map_or(0, |&(_, line)| line);
                format!(
                    "seq {} follows seq {previous} (line {previous_line}), expected seq {expected}: \
                     records were dropped, inserted or reordered",
                    record.seq
                )
            };
            state.fail(run, line, seq, message);
            state.broken = true;
            return;
        }
        let expected_prev = state.chain.last().map(|(d, _)| digest_string(d));
        if record.prev != expected_prev {
            let message = match (state.chain.last(), &record.prev) {
                (Some(&(_, previous_line)), _) => format!(
                    "prev does not match the digest of seq {} (line {previous_line}): that record \
                     was altered, or records were dropped, inserted or reordered",
                    expected - 1
                ),
                (None, _) => "prev must be null in a run's first record".to_owned(),
            };
            state.fail(run, line, seq, message);
            state.broken = true;
            return;
        }
        let raw: [u8; 32] = Sha256::digest(bytes).into();
        state.chain.push((raw, line));
        state.report.head = Some((record.seq, digest_string(&raw)));

        // Records are written as compact JSON with sorted keys; anything else (in
        // particular a duplicate key, which parsers resolve differently) was not
        // written by Airlock and could be read two ways.
        if serde_json::to_vec(&value).ok().as_deref() != Some(bytes) {
            state.fail(
                run,
                line,
                seq,
                "record is not compact JSON with sorted, unique keys, as Airlock writes it"
                    .to_owned(),
            );
        }

        let mut findings = Vec::new();
        let received = self.event(line, &record, pending, &mut findings);
        let state = self.runs.entry(record.run.clone()).or_default();
        if received {
            state.report.intents += 1;
        }
        for (line, message) in findings {
            state.fail(run, line, seq, message);
        }
    }

    /// Checks one record's event against its intent's lifecycle. Returns whether
    /// it received a new intent; pushes `(line, message)` failures for the run.
    fn event(
        &mut self,
        line: usize,
        record: &RecordLine,
        pending: Option<IntentLine>,
        findings: &mut Vec<(usize, String)>,
    ) -> bool {
        let pending = match pending {
            Some(p)
                if record.event() == Ok(EventName::Received)
                    && record.intent.as_deref() == Some(p.id.as_str()) =>
            {
                Some(p)
            }
            Some(p) => {
                self.orphan(p);
                None
            }
            None => None,
        };
        let name = record.event.as_str();
        let event = record.event();
        if event == Ok(EventName::Invalid) {
            if record.intent.is_some() {
                findings.push((line, "an invalid record must have intent null".to_owned()));
            }
            return false;
        }
        let Some(id) = record.intent.as_deref() else {
            findings.push((
                line,
                format!("`{name}` record has intent null; only `invalid` records may"),
            ));
            return false;
        };
        if event == Ok(EventName::Received) {
            return self.received(line, record, id, pending, findings);
        }
        let Some(track) = self.intents.get_mut(id) else {
            findings.push((
                line,
                format!("`{name}` for intent {id}, which was never received in this log"),
            ));
            return false;
        };
        if track.run != record.run {
            findings.push((
                line,
                format!(
                    "`{name}` for intent {id}, which was received in run {} (line {})",
                    track.run, track.line
                ),
            ));
            return false;
        }
        let data = &record.data;
        let from = track.state;
        let next = match event {
            // Answered above.
            Ok(EventName::Invalid | EventName::Received) => return false,
            Ok(EventName::Decided) => {
                let Some(verdict) = decided_verdict(data) else {
                    findings.push((
                        line,
                        "`decided` data.decision.verdict is missing or not allow, deny or review"
                            .to_owned(),
                    ));
                    return false;
                };
                let next = from.next(&Event::Decided(verdict));
                if let Ok(next) = next {
                    let claimed = data.get("state").and_then(Value::as_str);
                    if claimed != Some(next.as_str()) {
                        findings.push((
                            line,
                            format!(
                                "`decided` says the intent is now {}, but verdict {} leads \
                                 from {from} to {next}",
                                claimed.map_or_else(
                                    || "(no data.state)".to_owned(),
                                    |s| format!("{s:?}")
                                ),
                                verdict_name(verdict),
                            ),
                        ));
                    }
                }
                if let Verdict::Review { approvals } = verdict {
                    track.needed = u64::from(approvals.max(1));
                }
                next
            }
            Ok(EventName::Approval | EventName::Approved) => {
                check_review_digest(name, data, track, line, findings);
                let quorum_met = event == Ok(EventName::Approved);
                // Approvals of another preview than this one's no longer count.
                for voided in data
                    .get("voided")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    track.approvers.remove(voided);
                }
                match data.get("by").and_then(Value::as_str) {
                    None => findings.push((line, format!("`{name}` has no string data.by"))),
                    Some(by) => {
                        if !track.approvers.insert(by.to_owned()) {
                            findings.push((
                                line,
                                format!(
                                    "{by} approved intent {id} twice; approvals must come \
                                     from distinct approvers"
                                ),
                            ));
                        }
                    }
                }
                let count = track.approvers.len() as u64;
                if quorum_met && count < track.needed && from == State::AwaitingReview {
                    findings.push((
                        line,
                        format!(
                            "`approved` after {count} distinct {}, but the decision needs {}",
                            plural(count, "approval"),
                            track.needed
                        ),
                    ));
                }
                from.next(&Event::Approval { quorum_met })
            }
            Ok(EventName::Rejected) => {
                check_review_digest(name, data, track, line, findings);
                from.next(&Event::Rejection)
            }
            Ok(EventName::Expired) => from.next(&Event::Expiry),
            Ok(EventName::Applied) => from.next(&Event::ApplySucceeded),
            // From `queued`: its names did not resolve in the target, before policy.
            Ok(EventName::Failed) if from == State::Queued => from.next(&Event::Unresolvable),
            Ok(EventName::Failed) => from.next(&Event::ApplyFailed { permanent: true }),
            Ok(EventName::Undone) => from.next(&Event::Undo),
            Ok(EventName::RowsChanged) => {
                // Back to review: every approval so far is void.
                track.approvers.clear();
                from.next(&Event::RowsChanged)
            }
            Err(unknown) => {
                findings.push((line, unknown.to_string()));
                return false;
            }
        };
        match next {
            Ok(next) => track.state = next,
            Err(e) => findings.push((
                line,
                format!("`{name}` is not a legal step for intent {id}: {e}"),
            )),
        }
        false
    }

    /// A `received` record: a new intent, checked against its intent line.
    fn received(
        &mut self,
        line: usize,
        record: &RecordLine,
        id: &str,
        pending: Option<IntentLine>,
        findings: &mut Vec<(usize, String)>,
    ) -> bool {
        let Some(claimed) = record.data.get("digest").and_then(Value::as_str) else {
            findings.push((line, "`received` has no string data.digest".to_owned()));
            return false;
        };
        if let Some(first) = self.intents.get(id) {
            findings.push((
                line,
                format!(
                    "intent {id} received twice (first at line {}, run {})",
                    first.line, first.run
                ),
            ));
            return false;
        }
        self.intents.insert(
            id.to_owned(),
            IntentTrack {
                run: record.run.clone(),
                line,
                state: State::Queued,
                digest: claimed.to_owned(),
                needed: 1,
                approvers: BTreeSet::new(),
            },
        );
        let Some(pending) = pending else {
            findings.push((
                line,
                format!(
                    "intent {id} has no intent line right before its received record: \
                     the export is not self-contained, or the line was dropped"
                ),
            ));
            return true;
        };
        let Some(envelope) = pending.envelope else {
            return true; // unparsable envelope, already reported
        };
        let at = pending.line;
        let payload = match self.key.verify_as(&envelope, INTENT_PAYLOAD_TYPE) {
            Ok(payload) => payload,
            Err(e) => {
                findings.push((at, format!("intent {id}: envelope does not verify: {e}")));
                return true;
            }
        };
        let actual = digest(payload);
        if actual != claimed {
            findings.push((
                at,
                format!(
                    "intent {id}: payload digest {actual} does not match data.digest {claimed} \
                     of its received record (line {line})"
                ),
            ));
        }
        match serde_json::from_slice::<Value>(payload) {
            Err(e) => findings.push((at, format!("intent {id}: payload is not JSON: {e}"))),
            Ok(intent) => {
                let payload_id = intent.get("id").and_then(Value::as_str);
                if payload_id != Some(id) {
                    findings.push((
                        at,
                        format!(
                            "intent {id}: the signed payload has id {}, not {id}",
                            payload_id.map_or_else(|| "(none)".to_owned(), |s| format!("{s:?}"))
                        ),
                    ));
                }
                if let Some(payload_run) = intent.get("run").and_then(Value::as_str)
                    && payload_run != record.run
                {
                    findings.push((
                        at,
                        format!(
                            "intent {id}: the signed payload belongs to run {payload_run:?}, \
                             but it was received in run {:?}",
                            record.run
                        ),
                    ));
                }
            }
        }
        true
    }

    fn finish(mut self, options: &Options) -> Report {
        self.flush_pending();
        for (name, state) in &mut self.runs {
            if state.broken {
                continue;
            }
            let head = state.chain.len();
            let sealed = state.report.sealed_through.unwrap_or(0);
            let Some(&(_, first_unsealed_line)) = usize::try_from(sealed)
                .ok()
                .and_then(|i| state.chain.get(i))
            else {
                continue;
            };
            let mut message = if sealed == 0 {
                format!(
                    "no checkpoint seals any of the run's {head} {}",
                    plural(head as u64, "record")
                )
            } else {
                format!(
                    "records seq {}..={head} come after the last checkpoint (seq {sealed}) \
                     and are not sealed",
                    sealed + 1
                )
            };
            let finding = |message| Finding {
                line: Some(first_unsealed_line),
                run: Some(name.clone()),
                seq: Some(sealed + 1),
                message,
            };
            match options.mode {
                Mode::Export => {
                    message.push_str(
                        " (an export ends each run with a checkpoint: it was cut, \
                         or its final checkpoint removed)",
                    );
                    state.report.failures.push(finding(message));
                }
                Mode::Live => {
                    message.push_str(" yet");
                    state.report.warnings.push(finding(message));
                }
            }
        }
        for expected in &options.expected_heads {
            let Some(state) = self.runs.get_mut(&expected.run) else {
                self.failures.push(Finding {
                    line: None,
                    run: Some(expected.run.clone()),
                    seq: Some(expected.seq),
                    message: format!(
                        "expected head {expected}: run {} is not in the log",
                        expected.run
                    ),
                });
                continue;
            };
            let found = expected
                .seq
                .checked_sub(1)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| state.chain.get(i));
            let (line, message) = match found {
                None => (
                    None,
                    format!(
                        "expected head {expected}: the run's {} chain ends at seq {}; \
                         records were cut off the end",
                        if state.broken { "intact" } else { "verified" },
                        state.chain.len()
                    ),
                ),
                Some((raw, line)) => {
                    let actual = digest_string(raw);
                    if actual == expected.digest {
                        continue;
                    }
                    (
                        Some(*line),
                        format!(
                            "expected head {expected}: record seq {} has digest {actual}; \
                             the log was rewritten after that head was published",
                            expected.seq
                        ),
                    )
                }
            };
            state.report.failures.push(Finding {
                line,
                run: Some(expected.run.clone()),
                seq: Some(expected.seq),
                message,
            });
        }
        Report {
            runs: self
                .runs
                .into_iter()
                .map(|(name, state)| (name, state.report))
                .collect(),
            failures: self.failures,
        }
    }
}

/// The verdict of a `decided` record's `data.decision`.
fn decided_verdict(data: &serde_json::Map<String, Value>) -> Option<Verdict> {
    let decision = data.get("decision")?;
    match decision.get("verdict")?.as_str()? {
        "allow" => Some(Verdict::Allow),
        "deny" => Some(Verdict::Deny),
        "review" => {
            let approvals = match decision.get("approvals") {
                None | Some(Value::Null) => 1,
                Some(n) => u32::try_from(n.as_u64()?).ok()?,
            };
            Some(Verdict::Review { approvals })
        }
        _ => None,
    }
}

fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Review { .. } => "review",
    }
}

/// A review (approval or rejection) is bound to the intent's digest (DESIGN
/// invariant 3): its `data.digest` must be the one the intent was received with.
fn check_review_digest(
    name: &str,
    data: &serde_json::Map<String, Value>,
    track: &IntentTrack,
    line: usize,
    findings: &mut Vec<(usize, String)>,
) {
    match data.get("digest").and_then(Value::as_str) {
        Some(digest) if digest == track.digest => {}
        found => findings.push((
            line,
            format!(
                "`{name}` names digest {}, but the intent was received (line {}) with {}: \
                 a review is bound to the exact bytes",
                found.unwrap_or("(none)"),
                track.line,
                track.digest
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn expected_head_parses_from_the_right() {
        let head: ExpectedHead = format!("run:with:colons:12:sha256:{HEX}").parse().unwrap();
        assert_eq!(head.run, "run:with:colons");
        assert_eq!(head.seq, 12);
        assert_eq!(head.digest, format!("sha256:{HEX}"));
        assert_eq!(head.to_string(), format!("run:with:colons:12:sha256:{HEX}"));

        let upper: ExpectedHead = format!("r:1:sha256:{}", HEX.to_uppercase())
            .parse()
            .unwrap();
        assert_eq!(upper.digest, format!("sha256:{HEX}"));

        for bad in [
            String::new(),
            "r".to_owned(),
            format!("r:1:sha1:{HEX}"),
            format!(":1:sha256:{HEX}"),
            format!("1:sha256:{HEX}"),
            format!("r:0:sha256:{HEX}"),
            format!("r:x:sha256:{HEX}"),
            format!("r:-1:sha256:{HEX}"),
            "r:1:sha256:abc".to_owned(),
            format!("r:1:sha256:{}", HEX.replace('a', "g")),
        ] {
            let err = bad.parse::<ExpectedHead>().unwrap_err();
            assert!(
                err.to_string().contains("RUN:SEQ:sha256:HEX"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn empty_input_is_an_empty_ok_report() {
        let key = crate::seal::Sealer::from_seed(&[1; 32]);
        for export in [&b""[..], b"\n"] {
            let report = verify_export(export, key.verifier(), &Options::default());
            assert!(report.ok());
            assert!(report.runs.is_empty());
            assert_eq!(report.to_string(), "empty log: no records");
        }
    }

    #[test]
    fn display_gives_one_line_per_run() {
        let mut report = Report::default();
        report.runs.insert(
            "run-a".to_owned(),
            RunReport {
                records: 12,
                intents: 3,
                checkpoints: 2,
                head: Some((12, format!("sha256:{HEX}"))),
                sealed_through: Some(12),
                ..RunReport::default()
            },
        );
        report.runs.insert(
            "run-b".to_owned(),
            RunReport {
                records: 1,
                intents: 1,
                failures: vec![
                    Finding {
                        line: Some(7),
                        run: Some("run-b".to_owned()),
                        seq: Some(4),
                        message: "prev does not match the digest of seq 3".to_owned(),
                    },
                    Finding {
                        line: Some(9),
                        run: Some("run-b".to_owned()),
                        seq: None,
                        message: "x".to_owned(),
                    },
                ],
                ..RunReport::default()
            },
        );
        report.runs.insert(
            "run-c".to_owned(),
            RunReport {
                records: 1,
                intents: 0,
                warnings: vec![Finding {
                    line: Some(3),
                    run: Some("run-c".to_owned()),
                    seq: Some(1),
                    message: "not sealed yet".to_owned(),
                }],
                ..RunReport::default()
            },
        );
        report.failures.push(Finding {
            line: Some(2),
            run: None,
            seq: None,
            message: "line is empty".to_owned(),
        });
        assert!(!report.ok());
        assert_eq!(
            report.to_string(),
            "run-a: OK, 12 records, 3 intents, sealed through seq 12\n\
             run-b: FAILED at line 7 (seq 4): prev does not match the digest of seq 3 (and 1 more failure)\n\
             run-c: OK, 1 record, 0 intents, not sealed; warning: not sealed yet\n\
             export: FAILED at line 2: line is empty"
        );
        assert_eq!(report.all_failures().count(), 3);
        assert_eq!(report.all_warnings().count(), 1);
    }
}
