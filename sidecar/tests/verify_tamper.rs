//! The auditor's verifier against tampered exports: a realistic two-run export is
//! built with a real key, verified clean, then altered in every way DESIGN
//! invariant 6 names; each alteration must be reported, naming the line.
// The builder and helpers below are test code outside `#[test]` functions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use airlock::seal::{self, CHECKPOINT_PAYLOAD_TYPE, Envelope, INTENT_PAYLOAD_TYPE, Sealer};
use airlock::verify::{ExpectedHead, Mode, Options, Report, verify, verify_export};
use base64::Engine as _;
use serde_json::{Value, json};

/// Writes run-log exports exactly in the documented format (compact JSON, sorted
/// keys), keeping each run's head so records chain.
struct Log {
    sealer: Sealer,
    lines: Vec<Vec<u8>>,
    heads: BTreeMap<String, (u64, String)>,
    digests: BTreeMap<String, String>,
    marks: BTreeMap<&'static str, usize>,
    at: i64,
}

impl Log {
    fn new() -> Self {
        Self {
            sealer: Sealer::generate().unwrap(),
            lines: Vec::new(),
            heads: BTreeMap::new(),
            digests: BTreeMap::new(),
            marks: BTreeMap::new(),
            at: 1_760_000_000_000,
        }
    }

    /// The 0-based index of a marked line.
    fn idx(&self, mark: &str) -> usize {
        self.marks[mark]
    }

    /// The 1-based line number of a marked line.
    fn line(&self, mark: &str) -> usize {
        self.idx(mark) + 1
    }

    fn mark(&mut self, mark: &'static str) {
        self.marks.insert(mark, self.lines.len() - 1);
    }

    fn head(&self, run: &str) -> (u64, String) {
        self.heads[run].clone()
    }

    /// Appends `bytes` as a record of `run` (they must be that run's next record).
    fn push_record(&mut self, run: &str, bytes: Vec<u8>) {
        let seq = self.heads.get(run).map_or(1, |(seq, _)| seq + 1);
        self.heads
            .insert(run.to_owned(), (seq, seal::digest(&bytes)));
        self.lines.push(bytes);
    }

    fn record_bytes(
        &mut self,
        run: &str,
        intent: Option<&str>,
        event: &str,
        data: Value,
    ) -> Vec<u8> {
        self.at += 7;
        let (seq, prev) = match self.heads.get(run) {
            Some((seq, digest)) => (seq + 1, json!(digest)),
            None => (1, Value::Null),
        };
        serde_json::to_vec(&json!({
            "at": self.at, "data": data, "event": event, "intent": intent,
            "prev": prev, "run": run, "seq": seq, "type": "record",
        }))
        .unwrap()
    }

    fn record(&mut self, run: &str, intent: Option<&str>, event: &str, data: Value) {
        let bytes = self.record_bytes(run, intent, event, data);
        self.push_record(run, bytes);
    }

    fn intent_payload(id: &str, run: &str) -> Vec<u8> {
        // Not canonical on purpose: the agent's exact bytes are what is sealed.
        format!(
            "{{\"id\": \"{id}\", \"run\": \"{run}\", \"target\": \"main\",\n \"ops\": [{{\"op\": \"insert\", \"table\": \"t\", \"values\": {{\"n\": 1}}}}], \"reason\": \"test\"}}"
        )
        .into_bytes()
    }

    fn intent_line(envelope: &Envelope, id: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "type": "intent", "id": id, "envelope": serde_json::to_value(envelope).unwrap(),
        }))
        .unwrap()
    }

    /// An intent line and its `received` record, for an intent with these bytes.
    fn receive_bytes(&mut self, run: &str, id: &str, payload: Vec<u8>) {
        let digest = seal::digest(&payload);
        let envelope = self.sealer.seal(INTENT_PAYLOAD_TYPE, payload);
        self.lines.push(Self::intent_line(&envelope, id));
        self.digests.insert(id.to_owned(), digest.clone());
        let keyid = self.sealer.keyid().to_owned();
        self.record(
            run,
            Some(id),
            "received",
            json!({ "digest": digest, "file": format!("{id}.json"), "keyid": keyid, "target": "main" }),
        );
    }

    fn receive(&mut self, run: &str, id: &str) {
        self.receive_bytes(run, id, Self::intent_payload(id, run));
    }

    fn decide(&mut self, run: &str, id: &str, verdict: &str, approvals: Option<u32>, state: &str) {
        let mut decision = json!({
            "decision_id": format!("d-{id}"), "policy": "sha256:00",
            "reasons": ["within limits"], "verdict": verdict,
        });
        if let Some(n) = approvals {
            decision["approvals"] = json!(n);
        }
        self.record(
            run,
            Some(id),
            "decided",
            json!({ "decision": decision, "state": state }),
        );
    }

    fn approve(&mut self, run: &str, id: &str, by: &str, approvals: u32, needed: u32) {
        let event = if approvals >= needed {
            "approved"
        } else {
            "approval"
        };
        let digest = self.digests[id].clone();
        self.record(
            run,
            Some(id),
            event,
            json!({ "approvals": approvals, "by": by, "comment": null, "digest": digest, "needed": needed }),
        );
    }

    fn applied(&mut self, run: &str, id: &str) {
        self.record(
            run,
            Some(id),
            "applied",
            json!({ "already": false, "ops": 1, "target": "main" }),
        );
    }

    fn checkpoint_line(
        sealer: &Sealer,
        run: &str,
        seq: u64,
        head: &str,
        payload_type: &str,
    ) -> Vec<u8> {
        let payload = serde_json::to_vec(&json!({
            "at": 1_760_000_999_000_i64, "head": head, "run": run, "seq": seq, "type": "checkpoint",
        }))
        .unwrap();
        let envelope = sealer.seal(payload_type, payload);
        serde_json::to_vec(
            &json!({ "type": "checkpoint", "envelope": serde_json::to_value(&envelope).unwrap() }),
        )
        .unwrap()
    }

    fn checkpoint(&mut self, run: &str) {
        let (seq, head) = self.head(run);
        let line = Self::checkpoint_line(&self.sealer, run, seq, &head, CHECKPOINT_PAYLOAD_TYPE);
        self.lines.push(line);
    }
}

/// Two interleaved runs: allowed and applied, reviewed by two approvers and
/// applied, denied, rejected, failed, undone, a refused file; checkpoints in the
/// middle and at the end of each run.
fn scenario() -> Log {
    let mut log = Log::new();
    log.receive("run-a", "a-1");
    log.mark("a1");
    log.receive("run-b", "b-1");
    log.decide("run-a", "a-1", "allow", None, "approved");
    log.mark("a2");
    log.applied("run-a", "a-1");
    log.mark("a3");
    log.decide("run-b", "b-1", "review", Some(1), "awaiting_review");
    log.receive("run-a", "a-2");
    log.mark("a4");
    log.decide("run-a", "a-2", "review", Some(2), "awaiting_review");
    log.mark("a5");
    log.checkpoint("run-a");
    log.mark("cp_a5");
    log.record(
        "run-b",
        Some("b-1"),
        "rejected",
        json!({ "by": "carol", "digest": log.digests["b-1"], "reason": "no" }),
    );
    log.approve("run-a", "a-2", "alice", 1, 2);
    log.mark("a6");
    log.approve("run-a", "a-2", "bob", 2, 2);
    log.mark("a7");
    log.receive("run-b", "b-2");
    log.decide("run-b", "b-2", "allow", None, "approved");
    log.record(
        "run-b",
        Some("b-2"),
        "failed",
        json!({ "error": { "message": "no such table" } }),
    );
    log.applied("run-a", "a-2");
    log.mark("a8");
    log.record(
        "run-a",
        None,
        "invalid",
        json!({ "digest": "sha256:11", "file": "bad.json", "id": null, "kind": "unparsable", "problems": ["not JSON"] }),
    );
    log.checkpoint("run-b");
    log.receive("run-a", "a-3");
    log.decide("run-a", "a-3", "deny", None, "denied");
    log.mark("a11");
    log.checkpoint("run-a");
    log.mark("cp_a11");
    log.receive("run-b", "b-3");
    log.decide("run-b", "b-3", "allow", None, "approved");
    log.applied("run-b", "b-3");
    log.record("run-b", Some("b-3"), "undone", json!({}));
    log.checkpoint("run-b");
    log
}

fn check(lines: &[Vec<u8>], log: &Log, mode: Mode) -> Report {
    check_with(
        lines,
        log,
        Options {
            mode,
            expected_heads: Vec::new(),
        },
    )
}

fn check_with(lines: &[Vec<u8>], log: &Log, options: Options) -> Report {
    verify(
        lines.iter().map(Vec::as_slice),
        log.sealer.verifier(),
        &options,
    )
}

/// Asserts a failure at 1-based `line` whose message contains every needle.
#[track_caller]
fn assert_failure(report: &Report, line: usize, needles: &[&str]) {
    assert!(!report.ok(), "verified:\n{report}");
    assert!(
        report
            .all_failures()
            .any(|f| f.line == Some(line) && needles.iter().all(|n| f.message.contains(n))),
        "no failure at line {line} containing {needles:?}; failures:\n{:#?}",
        report.all_failures().collect::<Vec<_>>()
    );
}

/// Replaces the first `from` in `line` by `to` (same length).
fn alter(line: &mut Vec<u8>, from: &str, to: &str) {
    assert_eq!(from.len(), to.len());
    let text = String::from_utf8(line.clone()).unwrap();
    assert!(text.contains(from), "{from:?} not in {text}");
    *line = text.replacen(from, to, 1).into_bytes();
}

/// What an attacker without the key can do after editing: renumber and rehash the
/// run's records so the chain is whole again.
fn rechain(lines: &mut [Vec<u8>], run: &str) {
    let mut head: Option<String> = None;
    let mut seq = 0;
    for line in lines.iter_mut() {
        let Ok(mut value) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        if value["type"] != "record" || value["run"] != run {
            continue;
        }
        seq += 1;
        value["seq"] = json!(seq);
        value["prev"] = json!(head);
        *line = serde_json::to_vec(&value).unwrap();
        head = Some(seal::digest(line));
    }
}

#[test]
fn clean_export_verifies() {
    let log = scenario();
    for mode in [Mode::Export, Mode::Live] {
        let report = check(&log.lines, &log, mode);
        assert!(report.ok(), "{report}\n{report:#?}");
        assert_eq!(report.all_warnings().count(), 0, "{report:#?}");
        let a = &report.runs["run-a"];
        assert_eq!((a.records, a.intents, a.checkpoints), (11, 3, 2));
        assert_eq!(a.sealed_through, Some(11));
        assert_eq!(a.head, Some(log.head("run-a")));
        let b = &report.runs["run-b"];
        assert_eq!((b.records, b.intents, b.checkpoints), (10, 3, 2));
        assert_eq!(
            report.to_string(),
            "run-a: OK, 11 records, 3 intents, sealed through seq 11\n\
             run-b: OK, 10 records, 3 intents, sealed through seq 10"
        );
    }
    // The same bytes as one export, with and without a final newline.
    let mut export = log.lines.join(&b'\n');
    let report = verify_export(&export, log.sealer.verifier(), &Options::default());
    assert!(report.ok(), "{report}");
    export.push(b'\n');
    let report = verify_export(&export, log.sealer.verifier(), &Options::default());
    assert!(report.ok(), "{report}");
    // Another key verifies nothing.
    let other = Sealer::generate().unwrap();
    let report = verify(
        log.lines.iter().map(Vec::as_slice),
        other.verifier(),
        &Options::default(),
    );
    assert!(!report.ok());
}

#[test]
fn altered_record_breaks_the_next_prev() {
    let log = scenario();
    let mut lines = log.lines.clone();
    alter(&mut lines[log.idx("a2")], "within", "wiThin");
    let report = check(&lines, &log, Mode::Export);
    let altered = format!("(line {})", log.line("a2"));
    assert_failure(
        &report,
        log.line("a3"),
        &["prev does not match the digest of seq 2", &altered],
    );
    assert!(report.runs["run-b"].ok(), "run-b is untouched: {report}");
    assert!(
        report.to_string().starts_with(&format!(
            "run-a: FAILED at line {} (seq 3): prev",
            log.line("a3")
        )),
        "{report}"
    );
    // The chain is not checked past the break: one finding, not a cascade.
    assert_eq!(report.runs["run-a"].failures.len(), 1, "{report:#?}");
}

#[test]
fn altered_record_rechained_is_caught_by_the_checkpoint() {
    let log = scenario();
    let mut lines = log.lines.clone();
    alter(&mut lines[log.idx("a2")], "within", "WITHIN");
    rechain(&mut lines, "run-a");
    let report = check(&lines, &log, Mode::Export);
    assert_failure(
        &report,
        log.line("cp_a5"),
        &["checkpoint head", "seq 5", "altered"],
    );
}

#[test]
fn altered_last_record_breaks_the_checkpoint_head() {
    let log = scenario();
    let mut lines = log.lines.clone();
    alter(&mut lines[log.idx("a11")], "within", "WITHIN");
    let report = check(&lines, &log, Mode::Export);
    let record = format!("(line {})", log.line("a11"));
    assert_failure(
        &report,
        log.line("cp_a11"),
        &["checkpoint head", "seq 11", &record],
    );
}

fn reencode_intent(line: &mut Vec<u8>, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_slice(line).unwrap();
    edit(&mut value);
    *line = serde_json::to_vec(&value).unwrap();
}

#[test]
fn altered_intent_payload_fails_its_signature() {
    let log = scenario();
    let mut lines = log.lines.clone();
    let intent_line = log.idx("a4") - 1;
    reencode_intent(&mut lines[intent_line], |value| {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut payload = b64
            .decode(value["envelope"]["payload"].as_str().unwrap())
            .unwrap();
        let at = payload.iter().position(|&b| b == b'1').unwrap();
        payload[at] = b'9';
        value["envelope"]["payload"] = json!(b64.encode(payload));
    });
    let report = check(&lines, &log, Mode::Export);
    assert_failure(&report, intent_line + 1, &["intent a-2", "does not verify"]);
}

#[test]
fn intent_payload_must_hash_to_the_received_digest() {
    // Validly signed, but other bytes than the ones the record names.
    let log = scenario();
    let mut lines = log.lines.clone();
    let intent_line = log.idx("a4") - 1;
    let mut bytes = Log::intent_payload("a-2", "run-a");
    bytes.push(b' ');
    let other = log.sealer.seal(INTENT_PAYLOAD_TYPE, bytes);
    lines[intent_line] = Log::intent_line(&other, "a-2");
    let report = check(&lines, &log, Mode::Export);
    assert_failure(&report, intent_line + 1, &["payload digest", "data.digest"]);
}

#[test]
fn intent_payload_must_name_the_records_intent_and_run() {
    let mut log = Log::new();
    log.receive_bytes("run-a", "a-1", Log::intent_payload("a-other", "run-a"));
    log.receive_bytes("run-a", "a-2", Log::intent_payload("a-2", "run-z"));
    log.checkpoint("run-a");
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(&report, 1, &["signed payload has id \"a-other\""]);
    assert_failure(&report, 3, &["belongs to run \"run-z\""]);
    assert_eq!(report.all_failures().count(), 2, "{report:#?}");
}

#[test]
fn intent_envelope_must_be_an_intent_signed_by_the_key() {
    let log = scenario();
    let intent_line = log.idx("a4") - 1;
    let payload = Log::intent_payload("a-2", "run-a");
    // Right key, checkpoint payload type.
    let mut lines = log.lines.clone();
    lines[intent_line] = Log::intent_line(
        &log.sealer.seal(CHECKPOINT_PAYLOAD_TYPE, payload.clone()),
        "a-2",
    );
    let report = check(&lines, &log, Mode::Export);
    assert_failure(&report, intent_line + 1, &["payloadType"]);
    // Right type, another key.
    let other = Sealer::generate().unwrap();
    lines[intent_line] = Log::intent_line(&other.seal(INTENT_PAYLOAD_TYPE, payload), "a-2");
    let report = check(&lines, &log, Mode::Export);
    assert_failure(
        &report,
        intent_line + 1,
        &["does not verify", other.keyid()],
    );
}

#[test]
fn dropped_record_is_detected() {
    let log = scenario();
    let mut lines = log.lines.clone();
    lines.remove(log.idx("a3"));
    let report = check(&lines, &log, Mode::Export);
    // Seq 4's line moved up by one.
    assert_failure(
        &report,
        log.line("a4") - 1,
        &["seq 4 follows seq 2", "expected seq 3"],
    );

    // Dropped and renumbered: the checkpoint names a record the run has not reached.
    rechain(&mut lines, "run-a");
    let report = check(&lines, &log, Mode::Export);
    assert_failure(
        &report,
        log.line("cp_a5") - 1,
        &["covers seq 5", "only reached seq 4"],
    );

    // Dropping a run's first record.
    let mut lines = log.lines.clone();
    lines.remove(log.idx("a1"));
    let report = check(&lines, &log, Mode::Export);
    assert_failure(&report, log.line("a2") - 1, &["first record has seq 2"]);
}

#[test]
fn first_record_must_have_null_prev() {
    let mut log = Log::new();
    let bytes = log.record_bytes("run-a", None, "invalid", json!({}));
    let bytes = String::from_utf8(bytes)
        .unwrap()
        .replacen("\"prev\":null", "\"prev\":\"sha256:00\"", 1)
        .into_bytes();
    log.push_record("run-a", bytes);
    log.checkpoint("run-a");
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(&report, 1, &["prev must be null"]);
}

#[test]
fn swapped_records_are_detected() {
    let log = scenario();
    let mut lines = log.lines.clone();
    assert_eq!(log.idx("a7"), log.idx("a6") + 1);
    lines.swap(log.idx("a6"), log.idx("a7"));
    let report = check(&lines, &log, Mode::Export);
    assert_failure(&report, log.line("a6"), &["seq 7 follows seq 5"]);
}

#[test]
fn inserted_record_is_detected() {
    let log = scenario();
    // A replayed copy of an earlier record.
    let mut lines = log.lines.clone();
    lines.insert(log.idx("a7") + 1, log.lines[log.idx("a6")].clone());
    let report = check(&lines, &log, Mode::Export);
    assert_failure(&report, log.line("a7") + 1, &["seq 6 follows seq 7"]);

    // A forged approval, chained and renumbered: only the checkpoint can tell.
    let mut lines = log.lines.clone();
    let mut forged = lines[log.idx("a6")].clone();
    alter(&mut forged, "alice", "malic");
    lines.insert(log.idx("a6") + 1, forged);
    rechain(&mut lines, "run-a");
    let report = check(&lines, &log, Mode::Export);
    assert_failure(
        &report,
        log.line("cp_a11") + 1,
        &["checkpoint head", "seq 11"],
    );
}

#[test]
fn record_after_the_last_checkpoint_is_unsealed() {
    let mut log = scenario();
    log.record("run-a", Some("a-2"), "undone", json!({}));
    let appended = log.lines.len();
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(
        &report,
        appended,
        &["seq 12..=12", "not sealed", "checkpoint"],
    );
    assert!(report.runs["run-b"].ok());

    let report = check(&log.lines, &log, Mode::Live);
    assert!(report.ok(), "{report}");
    let warnings: Vec<_> = report.all_warnings().collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].line, Some(appended));
    assert!(
        warnings[0].message.contains("not sealed yet"),
        "{}",
        warnings[0].message
    );
    assert!(
        report
            .to_string()
            .contains("run-a: OK, 12 records, 3 intents, sealed through seq 11; warning:"),
        "{report}"
    );
}

#[test]
fn checkpoint_by_another_key_or_of_another_type_fails() {
    let mut log = scenario();
    let other = Sealer::generate().unwrap();
    let (seq, head) = log.head("run-a");
    log.lines.push(Log::checkpoint_line(
        &other,
        "run-a",
        seq,
        &head,
        CHECKPOINT_PAYLOAD_TYPE,
    ));
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(
        &report,
        log.lines.len(),
        &["checkpoint does not verify", other.keyid()],
    );

    // Another key relabelled with ours.
    let mut log = scenario();
    let (seq, head) = log.head("run-a");
    let mut forged = Log::checkpoint_line(&other, "run-a", seq, &head, CHECKPOINT_PAYLOAD_TYPE);
    alter(&mut forged, other.keyid(), log.sealer.keyid());
    log.lines.push(forged);
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(
        &report,
        log.lines.len(),
        &["checkpoint does not verify", "altered, truncated"],
    );

    // Our key, but sealed as an intent.
    let mut log = scenario();
    let (seq, head) = log.head("run-a");
    log.lines.push(Log::checkpoint_line(
        &log.sealer,
        "run-a",
        seq,
        &head,
        INTENT_PAYLOAD_TYPE,
    ));
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(
        &report,
        log.lines.len(),
        &["checkpoint does not verify", "payloadType"],
    );
}

#[test]
fn checkpoint_must_cover_a_record_already_seen() {
    let mut log = scenario();
    let (_, head) = log.head("run-a");
    log.lines.push(Log::checkpoint_line(
        &log.sealer,
        "run-a",
        12,
        &head,
        CHECKPOINT_PAYLOAD_TYPE,
    ));
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(
        &report,
        log.lines.len(),
        &["covers seq 12", "only reached seq 11"],
    );
}

#[test]
fn cut_line_is_reported_by_number() {
    let log = scenario();
    let cut = log.idx("a4");
    // Split in two lines.
    let mut lines = log.lines.clone();
    let whole = lines[cut].clone();
    let (first, second) = whole.split_at(whole.len() / 2);
    lines.splice(cut..=cut, [first.to_vec(), second.to_vec()]);
    let report = check(&lines, &log, Mode::Export);
    assert_failure(&report, cut + 1, &["not valid JSON", "cut or corrupted"]);
    assert_failure(&report, cut + 2, &["not valid JSON"]);
    assert!(
        report
            .to_string()
            .contains(&format!("export: FAILED at line {}", cut + 1)),
        "{report}"
    );
    // Truncated: the chain breaks at the next record of the run.
    let mut lines = log.lines.clone();
    lines[cut].truncate(whole.len() / 2);
    let report = check(&lines, &log, Mode::Export);
    assert_failure(&report, cut + 1, &["not valid JSON"]);
    assert_failure(&report, log.line("a5"), &["seq 5 follows seq 3"]);
}

#[test]
fn removed_final_checkpoint_leaves_records_unsealed() {
    let log = scenario();
    let mut lines = log.lines.clone();
    lines.remove(log.idx("cp_a11"));
    let report = check(&lines, &log, Mode::Export);
    assert_failure(
        &report,
        log.line("a6"),
        &["records seq 6..=11", "last checkpoint (seq 5)"],
    );
    assert_eq!(report.runs["run-a"].sealed_through, Some(5));
    // Live: the sidecar may simply not have sealed them yet.
    let report = check(&lines, &log, Mode::Live);
    assert!(report.ok(), "{report}");
    assert_eq!(report.all_warnings().count(), 1);

    // Without any checkpoint at all.
    lines.remove(log.idx("cp_a5"));
    let report = check(&lines, &log, Mode::Export);
    assert_failure(
        &report,
        log.line("a1"),
        &["no checkpoint seals any of the run's 11 records"],
    );
    assert!(report.to_string().contains("run-b: OK"), "{report}");
}

#[test]
fn illegal_lifecycles_fail() {
    // Applied without a decision.
    let mut log = Log::new();
    log.receive("run-x", "x-1");
    log.applied("run-x", "x-1");
    log.checkpoint("run-x");
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(
        &report,
        3,
        &["`applied` is not a legal step for intent x-1", "queued"],
    );

    // Denied, then applied anyway.
    let mut log = Log::new();
    log.receive("run-x", "x-1");
    log.decide("run-x", "x-1", "deny", None, "denied");
    log.applied("run-x", "x-1");
    log.checkpoint("run-x");
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(&report, 4, &["`applied` is not a legal step", "denied"]);

    // Applied, expired and undone at the wrong moments; rejected then approved.
    let mut log = Log::new();
    log.receive("run-x", "x-1");
    log.record("run-x", Some("x-1"), "applied", json!({})); // line 3
    log.record("run-x", Some("x-1"), "expired", json!({})); // line 4
    log.record("run-x", Some("x-1"), "undone", json!({})); // line 5
    log.decide("run-x", "x-1", "review", Some(1), "awaiting_review");
    log.record(
        "run-x",
        Some("x-1"),
        "rejected",
        json!({ "by": "carol", "digest": log.digests["x-1"], "reason": "no" }),
    );
    log.approve("run-x", "x-1", "alice", 1, 1); // line 8
    log.checkpoint("run-x");
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(&report, 3, &["`applied` is not a legal step"]);
    assert_failure(&report, 4, &["`expired` is not a legal step"]);
    assert_failure(&report, 5, &["`undone` is not a legal step"]);
    assert_failure(&report, 8, &["`approved` is not a legal step", "rejected"]);
    assert_eq!(report.all_failures().count(), 4, "{report:#?}");

    // Failed from queued is an intent whose names did not resolve (before policy);
    // failed after a denial is not a legal step.
    let mut log = Log::new();
    log.receive("run-x", "x-1");
    log.record(
        "run-x",
        Some("x-1"),
        "failed",
        json!({ "error": {"stage": "resolve"} }),
    );
    log.receive("run-x", "x-2");
    log.decide("run-x", "x-2", "deny", None, "denied");
    log.record("run-x", Some("x-2"), "failed", json!({ "error": "e" })); // line 7
    log.checkpoint("run-x");
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(&report, 7, &["`failed` is not a legal step", "denied"]);
    assert_eq!(report.all_failures().count(), 1, "{report:#?}");
}

#[test]
fn decided_state_must_follow_from_the_verdict() {
    let mut log = Log::new();
    log.receive("run-x", "x-1");
    log.decide("run-x", "x-1", "allow", None, "awaiting_review");
    log.receive("run-x", "x-2");
    log.decide("run-x", "x-2", "maybe", None, "approved");
    log.checkpoint("run-x");
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(
        &report,
        3,
        &[
            "\"awaiting_review\"",
            "verdict allow leads from queued to approved",
        ],
    );
    assert_failure(&report, 6, &["data.decision.verdict"]);
}

#[test]
fn reviews_are_bound_to_the_digest_distinct_and_counted() {
    let mut log = Log::new();
    log.receive("run-x", "x-1");
    log.decide("run-x", "x-1", "review", Some(3), "awaiting_review");
    log.record(
        "run-x",
        Some("x-1"),
        "approval",
        json!({ "approvals": 1, "by": "alice", "comment": null, "digest": "sha256:00", "needed": 3 }),
    ); // line 4
    log.approve("run-x", "x-1", "alice", 2, 3); // line 5: same approver again
    log.approve("run-x", "x-1", "bob", 3, 3); // line 6: approved with 2 distinct of 3
    log.receive("run-x", "x-2");
    log.decide("run-x", "x-2", "review", None, "awaiting_review");
    log.record(
        "run-x",
        Some("x-2"),
        "rejected",
        json!({ "by": "carol", "reason": "no" }),
    ); // line 10
    log.checkpoint("run-x");
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(
        &report,
        4,
        &["names digest sha256:00", "bound to the exact bytes"],
    );
    assert_failure(&report, 5, &["alice approved intent x-1 twice"]);
    assert_failure(&report, 6, &["after 2 distinct approvals", "needs 3"]);
    assert_failure(&report, 10, &["names digest (none)"]);
    assert_eq!(report.all_failures().count(), 4, "{report:#?}");
}

#[test]
fn events_must_belong_to_a_received_intent_of_the_run() {
    let mut log = Log::new();
    log.receive("run-x", "x-1");
    log.record("run-x", Some("ghost"), "expired", json!({})); // line 3
    log.receive("run-x", "x-1"); // lines 4-5: received twice
    log.receive("run-y", "y-1");
    log.record("run-y", Some("x-1"), "expired", json!({})); // line 8
    log.record("run-y", None, "expired", json!({})); // line 9
    log.record("run-y", Some("y-1"), "invalid", json!({})); // line 10
    log.record("run-y", Some("y-1"), "exploded", json!({})); // line 11
    log.checkpoint("run-x");
    log.checkpoint("run-y");
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(&report, 3, &["intent ghost, which was never received"]);
    assert_failure(&report, 5, &["intent x-1 received twice (first at line 2"]);
    assert_failure(&report, 8, &["received in run run-x (line 2)"]);
    assert_failure(&report, 9, &["intent null"]);
    assert_failure(&report, 10, &["invalid record must have intent null"]);
    assert_failure(&report, 11, &["unknown event \"exploded\""]);
    assert_eq!(report.all_failures().count(), 6, "{report:#?}");
}

#[test]
fn missing_or_misplaced_intent_line_fails() {
    let log = scenario();
    let intent_line = log.idx("a4") - 1;
    let mut lines = log.lines.clone();
    let removed = lines.remove(intent_line);
    let report = check(&lines, &log, Mode::Export);
    assert_failure(
        &report,
        intent_line + 1,
        &["intent a-2 has no intent line", "self-contained"],
    );

    // Moved before a checkpoint: orphaned there, missing where it belongs.
    lines.insert(log.idx("cp_a5") - 1, removed);
    let report = check(&lines, &log, Mode::Export);
    assert_failure(
        &report,
        log.idx("cp_a5"),
        &["intent line for a-2 is not immediately followed"],
    );
    assert_failure(&report, log.idx("a4"), &["intent a-2 has no intent line"]);

    // At the very end.
    let mut lines = log.lines.clone();
    lines.push(log.lines[intent_line].clone());
    let report = check(&lines, &log, Mode::Export);
    assert_failure(&report, lines.len(), &["not immediately followed"]);
}

#[test]
fn expected_heads_catch_an_export_cut_back_to_an_earlier_checkpoint() {
    let log = scenario();
    let (seq, digest) = log.head("run-a");
    let published = |run: &str, seq: u64, digest: &str| -> ExpectedHead {
        format!("{run}:{seq}:{digest}").parse().unwrap()
    };
    let with = |heads: Vec<ExpectedHead>| Options {
        mode: Mode::Export,
        expected_heads: heads,
    };

    // The full log contains the published heads.
    let mid = seal::digest(&log.lines[log.idx("a5")]);
    let report = check_with(
        &log.lines,
        &log,
        with(vec![
            published("run-a", seq, &digest),
            published("run-a", 5, &mid),
        ]),
    );
    assert!(report.ok(), "{report}");

    // A head that does not match.
    let report = check_with(&log.lines, &log, with(vec![published("run-a", 5, &digest)]));
    assert_failure(
        &report,
        log.line("a5"),
        &["record seq 5 has digest", "rewritten"],
    );

    // Cut back: run-a's lines after its first checkpoint removed. Every check
    // passes (it is a valid, shorter log) until a published head is given.
    let cut: Vec<Vec<u8>> = log
        .lines
        .iter()
        .enumerate()
        .filter(|&(i, line)| {
            let value: Value = serde_json::from_slice(line).unwrap();
            let run_a = value["run"] == "run-a"
                || value["id"].as_str().is_some_and(|id| id.starts_with("a-"))
                || i == log.idx("cp_a11");
            !(run_a && i > log.idx("cp_a5"))
        })
        .map(|(_, line)| line.clone())
        .collect();
    let report = check(&cut, &log, Mode::Export);
    assert!(report.ok(), "{report}");
    assert_eq!(report.runs["run-a"].sealed_through, Some(5));
    assert_eq!(report.runs["run-b"].sealed_through, Some(10));
    let report = check_with(&cut, &log, with(vec![published("run-a", seq, &digest)]));
    assert!(!report.ok());
    let failure = report.all_failures().next().unwrap();
    assert_eq!(failure.line, None);
    assert!(
        failure
            .message
            .contains("ends at seq 5; records were cut off the end"),
        "{failure}"
    );

    // A head for a run the log does not have.
    let report = check_with(
        &log.lines,
        &log,
        with(vec![published("run-zzz", 1, &digest)]),
    );
    assert!(
        report
            .all_failures()
            .any(|f| f.message.contains("run run-zzz is not in the log")),
        "{report}"
    );
}

#[test]
fn lines_must_be_known_json_objects_in_canonical_form() {
    let log = scenario();
    let mut lines = log.lines.clone();
    lines.insert(2, b"{\"type\":\"comment\"}".to_vec());
    lines.insert(2, b"[1,2]".to_vec());
    lines.insert(2, Vec::new());
    let report = check(&lines, &log, Mode::Export);
    assert_failure(&report, 3, &["line is empty"]);
    assert_failure(&report, 4, &["no string \"type\""]);
    assert_failure(&report, 5, &["unknown line type \"comment\""]);
    assert_eq!(report.all_failures().count(), 3, "{report:#?}");

    // A record with a duplicate key, or not compact, chained correctly.
    let mut log = Log::new();
    let bytes = log.record_bytes("run-a", None, "invalid", json!({}));
    let doubled =
        String::from_utf8(bytes)
            .unwrap()
            .replacen("{\"at\":", "{\"event\":\"invalid\",\"at\":", 1);
    log.push_record("run-a", doubled.into_bytes());
    let bytes = log.record_bytes("run-a", None, "invalid", json!({}));
    let spaced = String::from_utf8(bytes).unwrap().replacen(",", ", ", 1);
    log.push_record("run-a", spaced.into_bytes());
    log.checkpoint("run-a");
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(&report, 1, &["not compact JSON with sorted, unique keys"]);
    assert_failure(&report, 2, &["not compact JSON"]);
    assert_eq!(report.all_failures().count(), 2, "{report:#?}");

    // A record missing a field, or with an unknown one.
    let mut log = Log::new();
    let bytes = log.record_bytes("run-a", None, "invalid", json!({}));
    let no_seq = String::from_utf8(bytes)
        .unwrap()
        .replacen(",\"seq\":1", "", 1);
    log.lines.push(no_seq.into_bytes());
    let report = check(&log.lines, &log, Mode::Export);
    assert_failure(&report, 1, &["record is malformed", "seq"]);
    assert!(report.runs["run-a"].failures.len() == 1, "{report:#?}");
}

#[test]
fn checkpoint_payload_must_be_a_checkpoint() {
    let mut log = scenario();
    let (seq, head) = log.head("run-a");
    for (payload, needle) in [
        (
            json!({ "at": 1, "head": head, "run": "run-a", "seq": seq, "type": "record" }),
            "has type \"record\"",
        ),
        (
            json!({ "at": 1, "extra": 1, "head": head, "run": "run-a", "seq": seq, "type": "checkpoint" }),
            "checkpoint payload is not {at, head, run, seq, type}",
        ),
    ] {
        let envelope = log.sealer.seal(
            CHECKPOINT_PAYLOAD_TYPE,
            serde_json::to_vec(&payload).unwrap(),
        );
        log.lines.push(
            serde_json::to_vec(&json!({ "type": "checkpoint", "envelope": envelope })).unwrap(),
        );
        let report = check(&log.lines, &log, Mode::Export);
        assert_failure(&report, log.lines.len(), &[needle]);
        log.lines.pop();
    }
}

#[test]
fn malformed_intent_and_checkpoint_lines_fail() {
    let log = scenario();
    let mut lines = log.lines.clone();
    let base = lines.len();
    lines.push(br#"{"type":"intent"}"#.to_vec());
    lines.push(br#"{"type":"intent","id":"q-1"}"#.to_vec());
    lines.push(br#"{"type":"intent","id":"q-2","envelope":{"payload":"!"}}"#.to_vec());
    lines.push(br#"{"type":"checkpoint"}"#.to_vec());
    lines.push(br#"{"type":"checkpoint","envelope":[]}"#.to_vec());
    let report = check(&lines, &log, Mode::Export);
    assert_failure(&report, base + 1, &["intent line has no string \"id\""]);
    assert_failure(
        &report,
        base + 2,
        &["intent line for q-1 has no \"envelope\""],
    );
    assert_failure(
        &report,
        base + 2,
        &["intent line for q-1 is not immediately followed"],
    );
    assert_failure(
        &report,
        base + 3,
        &["intent line for q-2: envelope is not a DSSE envelope"],
    );
    assert_failure(&report, base + 4, &["checkpoint line has no \"envelope\""]);
    assert_failure(
        &report,
        base + 5,
        &["checkpoint envelope is not a DSSE envelope"],
    );
    assert!(report.runs.values().all(|run| run.ok()), "{report}");
}

/// The complete example of `docs/log-format.md` §3.4, as a test vector: the
/// documentation's lines verify under the documented key and key id.
#[test]
fn documented_example_verifies() {
    const PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----\n\
        MCowBQYDK2VwAyEA6kpsY+KcUgq+9VB7Ey7F+ZVHdq6+vnuSQh7qaRRG0iw=\n\
        -----END PUBLIC KEY-----\n";
    const EXPORT: &str = r#"{"envelope":{"payload":"eyJpZCI6ICJhLTEiLCAicnVuIjogInJ1bi1hIiwgInRhcmdldCI6ICJtYWluIiwgIm9wcyI6IFt7Im9wIjogImluc2VydCIsICJ0YWJsZSI6ICJub3RlcyIsICJ2YWx1ZXMiOiB7ImJvZHkiOiAiaGkifX1dLCAicmVhc29uIjogImRlbW8ifQo=","payloadType":"application/vnd.airlock.intent.v1+json","signatures":[{"keyid":"sha256:324be2dea8bc44461b0233e51fa48902ed6b1cc671e7739af2551e0bfe68f54e","sig":"/QyaxkvBy+oUiz9EjZ2UXQAzFXr4qFqCSXqDyjUei6ycPZtgXjSydPsI0w1eaHd3ebqtDmOgKtZAt609J6zdAg=="}]},"id":"a-1","type":"intent"}
{"at":1760000000007,"data":{"digest":"sha256:9ccb831f5401a19fa5eae6105fa457d29a5a7f3822778249c81c03c73987b2dd","file":"a-1.json","keyid":"sha256:324be2dea8bc44461b0233e51fa48902ed6b1cc671e7739af2551e0bfe68f54e","target":"main"},"event":"received","intent":"a-1","prev":null,"run":"run-a","seq":1,"type":"record"}
{"at":1760000000014,"data":{"decision":{"decision_id":"d-a-1","policy":"sha256:00","reasons":["within limits"],"verdict":"allow"},"state":"approved"},"event":"decided","intent":"a-1","prev":"sha256:32c7eb66f5f798f1413b6ff2d52456e3908af1341db118ba45a8b6f746aa8eb6","run":"run-a","seq":2,"type":"record"}
{"envelope":{"payload":"eyJhdCI6MTc2MDAwMDk5OTAwMCwiaGVhZCI6InNoYTI1NjowZTU3ZTQ2OWM0OGVkMTg0MjRiNDUyOGMxMzM5ZjFlMGE5ZDBkZTdjNDU2NGVkNDM4MzNmNmEyZTM2MDgwNTI5IiwicnVuIjoicnVuLWEiLCJzZXEiOjIsInR5cGUiOiJjaGVja3BvaW50In0=","payloadType":"application/vnd.airlock.checkpoint.v1+json","signatures":[{"keyid":"sha256:324be2dea8bc44461b0233e51fa48902ed6b1cc671e7739af2551e0bfe68f54e","sig":"QHLzQWP4+ZQSLLkpZbwSsAtYymu8px1/+Z/wOm7GoMUTnkJJmvQk6kWmMw/qNBOY3H5SK9oLCm1zRnHdRxJYAw=="}]},"type":"checkpoint"}
"#;
    let key = airlock::seal::Verifier::from_pem(PUBLIC_KEY).unwrap();
    assert_eq!(
        key.keyid(),
        "sha256:324be2dea8bc44461b0233e51fa48902ed6b1cc671e7739af2551e0bfe68f54e"
    );
    assert_eq!(key, *Sealer::from_seed(&[7; 32]).verifier());
    let head: ExpectedHead =
        "run-a:2:sha256:0e57e469c48ed18424b4528c1339f1e0a9d0de7c4564ed43833f6a2e36080529"
            .parse()
            .unwrap();
    let options = Options {
        mode: Mode::Export,
        expected_heads: vec![head],
    };
    let report = verify_export(EXPORT.as_bytes(), &key, &options);
    assert!(report.ok(), "{report}");
    assert_eq!(
        report.to_string(),
        "run-a: OK, 2 records, 1 intent, sealed through seq 2"
    );
    // And the documentation is what the verifier reads.
    let doc = include_str!("../../docs/log-format.md");
    for line in EXPORT.lines() {
        assert!(doc.contains(line), "docs/log-format.md lacks {line}");
    }
}
