//! The decision log: one JSON line per policy decision, in the shape of Open Policy
//! Agent's decision log events, so the tools that already collect OPA's logs read
//! Airlock's too (`[telemetry] decision_log`, documented in `docs/telemetry.md`):
//!
//! ```json
//! {"decision_id": "…", "path": "airlock/authz", "input": {…}, "result": {"allow": true, "reasons": []},
//!  "timestamp": "2026-01-02T03:04:05.006007008Z", "trace_id": "…", "span_id": "…",
//!  "labels": {"id": "<keyid>", "version": "0.1.0"}, "masked": ["/input/intent/ops/0/values"]}
//! ```
//!
//! - `input` is the policy input document (version 2) the decision was made on, with
//!   the values the agent asked to write replaced by [`MASK`] unless the operator
//!   asks for them (`decision_log_values`): each op's `values`, `set`, `key` and
//!   `expect`, and the preview's `before` and `after` rows. As OPA does, `masked`
//!   lists the JSON pointers replaced ([`mask_values`]). Names (tables, columns) and
//!   the intent's reason stay: they are what a policy decides on.
//! - `result` is the policy's answer as a result document v1.
//! - `labels.id` is the signing key's id: stable across restarts, the same id the
//!   run logs' envelopes carry, so a decision can be matched to the sidecar that
//!   sealed it; `labels.version` is Airlock's version.
//! - `trace_id` and `span_id` come from the intent's `traceparent` (the agent's
//!   span), absent when it has none or an invalid one.
//!
//! Best effort and bounded: [`DecisionLog::record`] hands the line to a writer
//! thread through a bounded queue and never waits; when the queue is full (a slow
//! reader on standard output, a stalled disk) the line is dropped and a warning
//! says so. A write error is logged once, not per line. A decision is never held
//! back or failed by its log line.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use airlock_intent::Provenance;
use serde_json::{Map, Value};
use tracing::{info, warn};

use super::{Decision, Policy, RULE, Verdict};

/// What a masked value is replaced with.
pub const MASK: &str = "**masked**";

/// The policy path of the embedded engine: the package `airlock.authz`.
pub const EMBEDDED_PATH: &str = "airlock/authz";

/// Most lines waiting for the writer.
const QUEUE_LINES: usize = 1024;

/// Most bytes of lines waiting for the writer.
const QUEUE_BYTES: usize = 16 << 20;

/// How long dropping the log waits for the writer to finish the lines queued.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// The keys of an op in `input.intent.ops` that hold values the agent wants written
/// or matched.
const OP_VALUE_KEYS: [&str; 4] = ["values", "set", "key", "expect"];

/// The keys of an op in `input.preview.ops` that hold rows read from the target.
const PREVIEW_VALUE_KEYS: [&str; 2] = ["before", "after"];

/// Where the decision log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    /// Standard output (`-`).
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

impl Sink {
    /// The sink `[telemetry] decision_log` names: `-` is standard output, anything
    /// else a file path.
    pub fn parse(setting: &str) -> Self {
        if setting == "-" {
            Self::Stdout
        } else {
            Self::File(PathBuf::from(setting))
        }
    }
}

/// Why the decision log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DecisionLogError {
    /// The file could not be opened for appending.
    #[error("decision log {path}: cannot open it for appending: {error}")]
    Open { path: PathBuf, error: io::Error },
    /// The writer thread could not be started.
    #[error("decision log: cannot start its writer thread: {0}")]
    Thread(io::Error),
}

/// The decision log writer. Dropping it writes the lines still queued (waiting at
/// most a couple of seconds) and stops its thread.
#[derive(Debug)]
pub struct DecisionLog {
    sender: Option<SyncSender<String>>,
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
    queued_bytes: Arc<AtomicUsize>,
    /// Set while lines are being dropped, so the warning is logged once per episode.
    dropping: AtomicBool,
    dropped: AtomicUsize,
    values: bool,
    id: String,
}

/// What one event is made of.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    /// The policy input document the decision was made on.
    pub input: &'a Value,
    /// The decision.
    pub decision: &'a Decision,
    /// The policy path: [`EMBEDDED_PATH`], or the remote policy's data path
    /// (see [`policy_path`]).
    pub path: &'a str,
    /// The intent's provenance, whose `traceparent` gives the trace fields.
    pub provenance: &'a Provenance,
}

impl DecisionLog {
    /// Opens `sink` (a file is created mode 0600 if missing, and appended to) and
    /// starts the writer thread. `values` shows the agent's values unmasked; `id` is
    /// the sidecar's stable id for `labels.id`.
    pub fn open(sink: &Sink, values: bool, id: &str) -> Result<Self, DecisionLogError> {
        let mut out: Box<dyn Write + Send> = match sink {
            Sink::Stdout => Box::new(io::stdout()),
            Sink::File(path) => Box::new(
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|error| DecisionLogError::Open {
                        path: path.clone(),
                        error,
                    })?,
            ),
        };
        let place = match sink {
            Sink::Stdout => "standard output".to_owned(),
            Sink::File(path) => path.display().to_string(),
        };
        let (sender, receiver) = mpsc::sync_channel::<String>(QUEUE_LINES);
        let (done_tx, done) = mpsc::channel();
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::Builder::new()
            .name("airlock-decision-log".to_owned())
            .spawn({
                let queued_bytes = Arc::clone(&queued_bytes);
                move || {
                    let mut failing = false;
                    for line in receiver {
                        queued_bytes.fetch_sub(line.len(), Ordering::Relaxed);
                        let written = out
                            .write_all(line.as_bytes())
                            .and_then(|()| out.write_all(b"\n"))
                            .and_then(|()| out.flush());
                        match written {
                            Err(error) if !failing => {
                                failing = true;
                                warn!(message = "cannot write the decision log; its lines are lost until a write succeeds", log = %place, %error);
                            }
                            Ok(()) if failing => {
                                failing = false;
                                info!(message = "the decision log is written again", log = %place);
                            }
                            _ => {}
                        }
                    }
                    let _ = done_tx.send(());
                }
            })
            .map_err(DecisionLogError::Thread)?;
        Ok(Self {
            sender: Some(sender),
            done,
            thread: Some(thread),
            queued_bytes,
            dropping: AtomicBool::new(false),
            dropped: AtomicUsize::new(0),
            values,
            id: id.to_owned(),
        })
    }

    /// Queues the event for one decision, without waiting: dropped (with a warning
    /// once per episode) when the writer is behind.
    pub fn record(&self, entry: &Entry<'_>) {
        let line =
            match serde_json::to_string(&event(entry, self.values, &self.id, SystemTime::now())) {
                Ok(line) => line,
                Err(error) => {
                    warn!(message = "cannot encode a decision log event", %error);
                    return;
                }
            };
        let Some(sender) = &self.sender else {
            return;
        };
        let size = line.len();
        let full = self.queued_bytes.load(Ordering::Relaxed) + size > QUEUE_BYTES;
        let sent = if full {
            false
        } else {
            self.queued_bytes.fetch_add(size, Ordering::Relaxed);
            match sender.try_send(line) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                    false
                }
            }
        };
        if sent {
            if self.dropping.swap(false, Ordering::Relaxed) {
                let dropped = self.dropped.swap(0, Ordering::Relaxed);
                info!(message = "the decision log caught up", dropped);
            }
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            if !self.dropping.swap(true, Ordering::Relaxed) {
                warn!(
                    message = "the decision log writer is behind; decision log lines are dropped until it catches up"
                );
            }
        }
    }
}

impl Drop for DecisionLog {
    fn drop(&mut self) {
        // Closing the queue ends the writer's loop once it has written what is queued.
        drop(self.sender.take());
        if self.done.recv_timeout(FLUSH_WAIT).is_ok()
            && let Some(thread) = self.thread.take()
        {
            let _ = thread.join();
        }
    }
}

/// The policy path events name: [`EMBEDDED_PATH`] for the embedded engine (the
/// package of [`RULE`]), the data path of a remote policy's URL
/// (`http://host/v1/data/airlock/authz` → `airlock/authz`).
pub fn policy_path(policy: &Policy) -> String {
    match policy {
        Policy::Embedded(_) => {
            debug_assert_eq!(
                RULE.trim_start_matches("data.").replace('.', "/"),
                EMBEDDED_PATH
            );
            EMBEDDED_PATH.to_owned()
        }
        Policy::Remote(remote) => data_path(remote.url()),
    }
}

/// The OPA data path of a Data API URL: what follows `/v1/data/`, else the URL's
/// whole path, without surrounding slashes.
fn data_path(url: &str) -> String {
    let path = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split_once('/')
        .map_or("", |(_, path)| path);
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = path.strip_prefix("v1/data/").unwrap_or(path);
    path.trim_matches('/').to_owned()
}

/// A fresh decision id for a decision no engine gave one: a random UUID (version 4),
/// the form OPA's ids take. Falls back to one derived from the time and a counter if
/// the system has no randomness to give.
pub fn new_decision_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let count = COUNTER.fetch_add(1, Ordering::Relaxed) as u128;
        bytes = (nanos ^ (count << 96) ^ u128::from(std::process::id())).to_be_bytes();
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The event for one decision at `now` (pure apart from its arguments). `values`
/// false masks the agent's values (see [`mask_values`]).
pub fn event(entry: &Entry<'_>, values: bool, id: &str, now: SystemTime) -> Value {
    let mut input = entry.input.clone();
    let masked = if values {
        Vec::new()
    } else {
        mask_values(&mut input)
    };
    let mut labels = Map::with_capacity(2);
    labels.insert("id".into(), id.into());
    labels.insert("version".into(), env!("CARGO_PKG_VERSION").into());
    let mut doc = Map::with_capacity(10);
    if let Some(decision_id) = &entry.decision.decision_id {
        doc.insert("decision_id".into(), decision_id.as_str().into());
    }
    doc.insert("path".into(), entry.path.into());
    doc.insert("input".into(), input);
    doc.insert("result".into(), result_document(entry.decision));
    doc.insert(
        "timestamp".into(),
        humantime::format_rfc3339_nanos(now).to_string().into(),
    );
    if let Some((trace_id, span_id)) = trace_context(entry.provenance) {
        doc.insert("trace_id".into(), trace_id.into());
        doc.insert("span_id".into(), span_id.into());
    }
    doc.insert("labels".into(), Value::Object(labels));
    if !masked.is_empty() {
        doc.insert(
            "masked".into(),
            Value::Array(masked.into_iter().map(Value::from).collect()),
        );
    }
    Value::Object(doc)
}

/// Replaces, in a policy input document, every value the agent asked to write or
/// match (`intent.ops[*].values`, `set`, `key`, `expect`) and every row a preview
/// read (`preview.ops[*].before`, `after`) with [`MASK`], and returns the JSON
/// pointers replaced, event-relative (`/input/intent/ops/0/values`) as OPA lists
/// them. Keys that are absent are not listed.
pub fn mask_values(input: &mut Value) -> Vec<String> {
    let mut masked = Vec::new();
    let mut mask = |ops: Option<&mut Value>, prefix: &str, keys: &[&str]| {
        let Some(Value::Array(ops)) = ops else {
            return;
        };
        for (index, op) in ops.iter_mut().enumerate() {
            let Value::Object(op) = op else {
                continue;
            };
            for key in keys {
                if let Some(value) = op.get_mut(*key) {
                    *value = Value::from(MASK);
                    masked.push(format!("/input/{prefix}/ops/{index}/{key}"));
                }
            }
        }
    };
    mask(input.pointer_mut("/intent/ops"), "intent", &OP_VALUE_KEYS);
    mask(
        input.pointer_mut("/preview/ops"),
        "preview",
        &PREVIEW_VALUE_KEYS,
    );
    masked
}

/// The decision as a result document v1, the shape the policy answered in.
fn result_document(decision: &Decision) -> Value {
    let mut doc = Map::with_capacity(4);
    match decision.verdict {
        Verdict::Allow => {
            doc.insert("allow".into(), true.into());
        }
        Verdict::Deny => {
            doc.insert("allow".into(), false.into());
        }
        Verdict::Review { approvals } => {
            doc.insert("allow".into(), false.into());
            doc.insert("review".into(), true.into());
            doc.insert("approvals".into(), approvals.into());
        }
    }
    doc.insert(
        "reasons".into(),
        Value::Array(
            decision
                .reasons
                .iter()
                .map(|r| Value::from(r.as_str()))
                .collect(),
        ),
    );
    Value::Object(doc)
}

/// The trace id and the parent (span) id of the intent's W3C `traceparent`, when
/// it is valid (by [`Provenance::trace_id`]'s rules).
fn trace_context(provenance: &Provenance) -> Option<(&str, &str)> {
    let trace_id = provenance.trace_id()?;
    let span_id = provenance.traceparent.as_deref()?.split('-').nth(2)?;
    Some((trace_id, span_id))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn provenance(traceparent: Option<&str>) -> Provenance {
        Provenance {
            agent: "a".to_owned(),
            traceparent: traceparent.map(str::to_owned),
            ..Provenance::default()
        }
    }

    fn decision(verdict: Verdict) -> Decision {
        Decision {
            verdict,
            reasons: vec!["because".to_owned()],
            policy: "sha256:ab".to_owned(),
            decision_id: Some("d-1".to_owned()),
        }
    }

    fn input() -> Value {
        json!({
            "version": 2,
            "intent": {"id": "i-1", "reason": "fix", "ops": [
                {"op": "insert", "table": "t", "values": {"id": 1, "secret": "s"}},
                {"op": "update", "table": "t", "key": {"id": 1}, "set": {"n": 2}, "expect": {"n": 1}},
                {"op": "delete", "table": "t", "key": {"id": 3}},
            ]},
            "ops": [{"index": 0, "kind": "insert", "table": "t", "columns": ["id", "secret"]}],
            "preview": {"ops": [{"index": 0, "rows": 1, "before": [], "after": [{"id": 1, "secret": "s"}]}]},
        })
    }

    #[test]
    fn every_value_is_masked_and_listed() {
        let mut doc = input();
        let masked = mask_values(&mut doc);
        assert_eq!(
            masked,
            [
                "/input/intent/ops/0/values",
                "/input/intent/ops/1/set",
                "/input/intent/ops/1/key",
                "/input/intent/ops/1/expect",
                "/input/intent/ops/2/key",
                "/input/preview/ops/0/before",
                "/input/preview/ops/0/after",
            ]
        );
        let text = doc.to_string();
        assert!(!text.contains("\"s\""), "{text}");
        assert_eq!(doc["intent"]["ops"][1]["set"], MASK);
        assert_eq!(doc["intent"]["ops"][0]["table"], "t");
        // Names are what a policy decides on; they stay.
        assert_eq!(doc["ops"][0]["columns"], json!(["id", "secret"]));
        // Every listed pointer names a masked member of the event.
        let event = json!({"input": doc});
        for pointer in &masked {
            assert_eq!(event.pointer(pointer), Some(&json!(MASK)), "{pointer}");
        }
    }

    #[test]
    fn documents_without_ops_or_preview_mask_nothing() {
        let mut doc = json!({"version": 2, "intent": {"ops": "odd"}});
        assert!(mask_values(&mut doc).is_empty());
        assert_eq!(doc, json!({"version": 2, "intent": {"ops": "odd"}}));
    }

    #[test]
    fn the_event_has_opas_shape() {
        let input = input();
        let decision = decision(Verdict::Review { approvals: 2 });
        let provenance = provenance(Some(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ));
        let entry = Entry {
            input: &input,
            decision: &decision,
            path: EMBEDDED_PATH,
            provenance: &provenance,
        };
        let now = SystemTime::UNIX_EPOCH + Duration::new(1_767_323_045, 6_007_008);
        let event = event(&entry, false, "key-1", now);
        assert_eq!(event["decision_id"], "d-1");
        assert_eq!(event["path"], "airlock/authz");
        assert_eq!(
            event["result"],
            json!({"allow": false, "review": true, "approvals": 2, "reasons": ["because"]})
        );
        assert_eq!(event["timestamp"], "2026-01-02T03:04:05.006007008Z");
        assert_eq!(event["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(event["span_id"], "b7ad6b7169203331");
        assert_eq!(
            event["labels"],
            json!({"id": "key-1", "version": env!("CARGO_PKG_VERSION")})
        );
        assert_eq!(event["masked"].as_array().map(Vec::len), Some(7));
        assert_eq!(event["input"]["intent"]["ops"][0]["values"], MASK);

        let shown = super::event(&entry, true, "key-1", now);
        assert_eq!(shown["input"], input);
        assert!(shown.get("masked").is_none());
    }

    #[test]
    fn trace_fields_are_absent_without_a_valid_traceparent() {
        let input = input();
        let decision = decision(Verdict::Allow);
        for traceparent in [
            None,
            Some("00-00000000000000000000000000000000-b7ad6b7169203331-01"),
            Some("not a traceparent"),
        ] {
            let provenance = provenance(traceparent);
            let entry = Entry {
                input: &input,
                decision: &decision,
                path: EMBEDDED_PATH,
                provenance: &provenance,
            };
            let event = event(&entry, false, "k", SystemTime::now());
            assert!(event.get("trace_id").is_none(), "{traceparent:?}");
            assert!(event.get("span_id").is_none(), "{traceparent:?}");
            assert_eq!(
                event["result"],
                json!({"allow": true, "reasons": ["because"]})
            );
        }
    }

    #[test]
    fn data_paths_of_remote_urls() {
        assert_eq!(
            data_path("http://127.0.0.1:8181/v1/data/airlock/authz"),
            "airlock/authz"
        );
        assert_eq!(data_path("http://opa/v1/data/a/b/?pretty=true"), "a/b");
        assert_eq!(data_path("http://opa:8181/custom/path"), "custom/path");
        assert_eq!(data_path("http://opa:8181"), "");
    }

    #[test]
    fn decision_ids_are_uuids() {
        let a = new_decision_id();
        let b = new_decision_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'4');
        assert!(a.split('-').map(str::len).eq([8, 4, 4, 4, 12]));
    }

    #[test]
    fn a_file_log_appends_one_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        std::fs::write(&path, "earlier\n").unwrap();
        let input = input();
        let decision = decision(Verdict::Deny);
        let provenance = provenance(None);
        {
            let log = DecisionLog::open(&Sink::File(path.clone()), false, "k").unwrap();
            for _ in 0..3 {
                log.record(&Entry {
                    input: &input,
                    decision: &decision,
                    path: EMBEDDED_PATH,
                    provenance: &provenance,
                });
            }
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "earlier");
        for line in &lines[1..] {
            let event: Value = serde_json::from_str(line).unwrap();
            assert_eq!(event["result"]["allow"], false);
        }
    }

    #[test]
    fn a_new_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        drop(DecisionLog::open(&Sink::File(path.clone()), false, "k").unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            DecisionLog::open(&Sink::File(dir.path().join("no/such/file")), false, "k"),
            Err(DecisionLogError::Open { .. })
        ));
    }
}
