//! The run log's vocabulary, pure (no I/O): what a record says, how it is encoded
//! and chained, the checkpoint payload and the lines of an export. The format is
//! specified in `docs/log-format.md`.
//!
//! The queue persists records ([`Record::encode`] gives the exact bytes it hashes
//! and stores); `verify`, `undo`, `replay` and the HTTP API read them back with the
//! same types ([`RecordLine`], [`EventName`], the data structs), so an event's name
//! is written in one place: [`EventName`].
//!
//! # Encoding
//! A record is compact JSON with members sorted byte-wise (the order
//! `serde_json::Value` keeps its maps in), so [`Record::encode`] goes through a
//! `Value`: the bytes do not depend on the order in which fields are declared here,
//! and they are the bytes earlier releases wrote (checked against a log they wrote,
//! `tests/fixtures/log-v1`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::lifecycle::{Decision, State};

/// The `type` of a record line.
pub const RECORD: &str = "record";
/// The `type` of an intent line of an export.
pub const INTENT: &str = "intent";
/// The `type` of a checkpoint line of an export, and of a checkpoint's payload.
pub const CHECKPOINT: &str = "checkpoint";

/// What a record says happened: its `event` member. Not the same vocabulary as
/// [`crate::lifecycle::Event`], the state machine's input: one record may stand for
/// two lifecycle events (`applied` is ApplyStarted then ApplySucceeded), `failed`
/// for either of two, and `invalid` for none (see `docs/log-format.md`, 3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventName {
    Received,
    Invalid,
    Decided,
    /// One approval; the quorum is not met yet.
    Approval,
    /// The approval that meets the quorum.
    Approved,
    Rejected,
    Expired,
    Applied,
    Failed,
    RowsChanged,
    Undone,
}

impl EventName {
    /// Every event, in lifecycle order.
    pub const ALL: [EventName; 11] = [
        EventName::Received,
        EventName::Invalid,
        EventName::Decided,
        EventName::Approval,
        EventName::Approved,
        EventName::Rejected,
        EventName::Expired,
        EventName::Applied,
        EventName::Failed,
        EventName::RowsChanged,
        EventName::Undone,
    ];

    /// The name as records spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventName::Received => "received",
            EventName::Invalid => "invalid",
            EventName::Decided => "decided",
            EventName::Approval => "approval",
            EventName::Approved => "approved",
            EventName::Rejected => "rejected",
            EventName::Expired => "expired",
            EventName::Applied => "applied",
            EventName::Failed => "failed",
            EventName::RowsChanged => "rows_changed",
            EventName::Undone => "undone",
        }
    }
}

impl fmt::Display for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name no record event has.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown event {0:?}")]
pub struct UnknownEvent(pub String);

impl FromStr for EventName {
    type Err = UnknownEvent;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        EventName::ALL
            .into_iter()
            .find(|event| event.as_str() == name)
            .ok_or_else(|| UnknownEvent(name.to_owned()))
    }
}

/// `received`: an intent was admitted (state `queued`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Received {
    /// Digest of the intent's exact bytes.
    pub digest: String,
    pub file: String,
    /// The key id of the sidecar key that sealed it.
    pub keyid: String,
    pub target: String,
}

/// `invalid`: a file was refused (the record's `intent` is null).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Invalid {
    /// Digest of every byte read.
    pub digest: String,
    pub file: String,
    /// The id the file claimed, when one could be read.
    pub id: Option<String>,
    /// `invalid` or `conflict`.
    pub kind: String,
    pub problems: Vec<airlock_intent::Problem>,
}

/// `decided`: the policy's answer and the state it leads to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decided {
    pub decision: Decision,
    pub state: State,
}

/// `approval` and `approved`: one reviewer's approval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// Approvals that count, this one included.
    pub approvals: u32,
    pub by: String,
    pub comment: Option<String>,
    /// The intent's digest: an approval is bound to the exact bytes.
    pub digest: String,
    pub needed: u32,
    /// Digest of the rows' before-images the approver saw.
    pub preview: String,
    /// Approvers whose approval of another preview no longer counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub voided: Vec<String>,
}

/// `rejected`: one reviewer's rejection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rejected {
    pub by: String,
    pub digest: String,
    /// What the agent sees.
    pub reason: String,
}

/// `expired`: a review outlived its deadline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Expired {
    pub deadline: Option<i64>,
}

/// `applied`: an intent's writes are committed in its target. `ops` and `undo` are
/// the target's results and undo images as `apply` encodes them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// The target's ledger already held the intent: nothing was written now.
    #[serde(default)]
    pub already: bool,
    #[serde(default)]
    pub ops: Value,
    pub target: String,
    /// The undo images, `[{op, table, key, before, after}]`.
    #[serde(default)]
    pub undo: Value,
}

/// `failed`: resolving (from `queued`) or applying failed for good.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failed {
    /// What the agent's outcome shows.
    pub error: Value,
    /// What only humans see (values read from the database).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `rows_changed`: an approved intent went back to review.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RowsChanged {
    /// The new review deadline (ms).
    pub deadline: i64,
    /// Only for humans; written as `null` when absent.
    pub detail: Option<String>,
    pub error: Value,
    pub state: State,
    /// The approvers whose approvals no longer count.
    pub voided: Vec<String>,
}

/// `undone`: an applied intent's writes were reverted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Undone {
    pub by: String,
    pub target: String,
    /// `Some(true)` with `--force`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced: Option<bool>,
    /// With `--force`: the conflicts overridden.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflicts: Option<Value>,
    /// A crash came between the target's commit and this record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_after_target: Option<bool>,
}

/// What one record says: its event and that event's data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum Entry {
    Received(Received),
    Invalid(Invalid),
    Decided(Decided),
    Approval(Approval),
    Approved(Approval),
    Rejected(Rejected),
    Expired(Expired),
    Applied(Applied),
    Failed(Failed),
    RowsChanged(RowsChanged),
    Undone(Undone),
}

impl Entry {
    /// The record's `event`.
    pub fn name(&self) -> EventName {
        match self {
            Entry::Received(_) => EventName::Received,
            Entry::Invalid(_) => EventName::Invalid,
            Entry::Decided(_) => EventName::Decided,
            Entry::Approval(_) => EventName::Approval,
            Entry::Approved(_) => EventName::Approved,
            Entry::Rejected(_) => EventName::Rejected,
            Entry::Expired(_) => EventName::Expired,
            Entry::Applied(_) => EventName::Applied,
            Entry::Failed(_) => EventName::Failed,
            Entry::RowsChanged(_) => EventName::RowsChanged,
            Entry::Undone(_) => EventName::Undone,
        }
    }
}

/// Where a new record goes in its run's chain: its `seq` and its `prev`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub seq: u64,
    pub prev: Option<String>,
}

impl Link {
    /// The link after the run's head (`seq` and digest of its last record), or the
    /// first link of a run without records.
    pub fn after(head: Option<(u64, &str)>) -> Self {
        match head {
            Some((seq, digest)) => Link {
                seq: seq + 1,
                prev: Some(digest.to_owned()),
            },
            None => Link { seq: 1, prev: None },
        }
    }
}

/// One record to write.
#[derive(Clone, Debug, PartialEq)]
pub struct Record<'a> {
    pub run: &'a str,
    pub link: Link,
    /// The intent it is about; `None` only for `invalid`.
    pub intent: Option<&'a str>,
    pub entry: &'a Entry,
    /// When, ms since the Unix epoch.
    pub at: i64,
}

impl Record<'_> {
    /// The record's exact bytes (compact JSON, members sorted) and their digest,
    /// which the next record of the run names as its `prev`.
    pub fn encode(&self) -> Result<(Vec<u8>, String), serde_json::Error> {
        let Value::Object(mut map) = serde_json::to_value(self.entry)? else {
            return Err(serde::ser::Error::custom(
                "a record entry is not a JSON object",
            ));
        };
        map.insert("at".into(), self.at.into());
        map.insert("intent".into(), self.intent.into());
        map.insert("prev".into(), self.link.prev.clone().into());
        map.insert("run".into(), self.run.into());
        map.insert("seq".into(), self.link.seq.into());
        map.insert("type".into(), RECORD.into());
        let bytes = serde_json::to_vec(&Value::Object(map))?;
        let digest = digest(&bytes);
        Ok((bytes, digest))
    }
}

/// `"sha256:"` and the lowercase hex SHA-256 of `bytes`: a record's digest.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A record line as it is read back: exactly the members of a record, with the
/// event's data as a map (readers that check data member by member, as `verify`
/// does, read it here; others take the typed [`Entry`] with [`RecordLine::entry`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordLine {
    pub at: i64,
    pub data: Map<String, Value>,
    /// The event as written; [`RecordLine::event`] names it.
    pub event: String,
    pub intent: Option<String>,
    pub prev: Option<String>,
    pub run: String,
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: String,
}

impl RecordLine {
    /// The record's event, if it is one of [`EventName`].
    pub fn event(&self) -> Result<EventName, UnknownEvent> {
        self.event.parse()
    }

    /// The event and its data, typed.
    pub fn entry(&self) -> Result<Entry, serde_json::Error> {
        serde_json::from_value(serde_json::json!({
            "event": self.event,
            "data": self.data,
        }))
    }
}

/// The payload of a checkpoint envelope: compact JSON, members sorted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointPayload {
    pub at: i64,
    /// The digest of record `seq` of `run`.
    pub head: String,
    pub run: String,
    pub seq: u64,
    /// `"checkpoint"`.
    #[serde(rename = "type")]
    pub kind: String,
}

impl CheckpointPayload {
    /// A checkpoint over record `seq` of `run`, whose digest is `head`.
    pub fn new(run: &str, seq: u64, head: &str, at: i64) -> Self {
        CheckpointPayload {
            at,
            head: head.to_owned(),
            run: run.to_owned(),
            seq,
            kind: CHECKPOINT.to_owned(),
        }
    }

    /// The bytes a checkpoint envelope signs.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&serde_json::to_value(self)?)
    }
}

/// An export line that is not a record: `{"type": "intent", "id", "envelope"}`
/// (the intent's DSSE envelope, just before its `received` record) or
/// `{"type": "checkpoint", "envelope"}` (just after the record it covers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExportLine {
    Intent { id: String, envelope: Value },
    Checkpoint { envelope: Value },
}

impl ExportLine {
    /// The line's bytes (without the `\n`), members sorted.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&serde_json::to_value(self)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Verdict;
    use serde_json::json;

    /// The two records of the example in `docs/log-format.md`, byte for byte.
    const DOC_1: &str = r#"{"at":1760000000007,"data":{"digest":"sha256:9ccb831f5401a19fa5eae6105fa457d29a5a7f3822778249c81c03c73987b2dd","file":"a-1.json","keyid":"sha256:324be2dea8bc44461b0233e51fa48902ed6b1cc671e7739af2551e0bfe68f54e","target":"main"},"event":"received","intent":"a-1","prev":null,"run":"run-a","seq":1,"type":"record"}"#;
    const DOC_2: &str = r#"{"at":1760000000014,"data":{"decision":{"decision_id":"d-a-1","policy":"sha256:00","reasons":["within limits"],"verdict":"allow"},"state":"approved"},"event":"decided","intent":"a-1","prev":"sha256:32c7eb66f5f798f1413b6ff2d52456e3908af1341db118ba45a8b6f746aa8eb6","run":"run-a","seq":2,"type":"record"}"#;

    #[test]
    fn records_encode_and_chain_as_the_format_documents() {
        let received = Entry::Received(Received {
            digest: "sha256:9ccb831f5401a19fa5eae6105fa457d29a5a7f3822778249c81c03c73987b2dd"
                .into(),
            file: "a-1.json".into(),
            keyid: "sha256:324be2dea8bc44461b0233e51fa48902ed6b1cc671e7739af2551e0bfe68f54e".into(),
            target: "main".into(),
        });
        let first = Record {
            run: "run-a",
            link: Link::after(None),
            intent: Some("a-1"),
            entry: &received,
            at: 1_760_000_000_007,
        };
        let (bytes, head) = first.encode().unwrap();
        assert_eq!(String::from_utf8(bytes).unwrap(), DOC_1);
        assert_eq!(
            head,
            "sha256:32c7eb66f5f798f1413b6ff2d52456e3908af1341db118ba45a8b6f746aa8eb6"
        );
        let decision: Decision = serde_json::from_value(json!({
            "decision_id": "d-a-1", "policy": "sha256:00",
            "reasons": ["within limits"], "verdict": "allow"
        }))
        .unwrap();
        assert_eq!(decision.verdict, Verdict::Allow);
        let decided = Entry::Decided(Decided {
            decision,
            state: State::Approved,
        });
        let second = Record {
            run: "run-a",
            link: Link::after(Some((1, &head))),
            intent: Some("a-1"),
            entry: &decided,
            at: 1_760_000_000_014,
        };
        let (bytes, head) = second.encode().unwrap();
        assert_eq!(String::from_utf8(bytes).unwrap(), DOC_2);
        assert_eq!(
            head,
            "sha256:0e57e469c48ed18424b4528c1339f1e0a9d0de7c4564ed43833f6a2e36080529"
        );
    }

    #[test]
    fn record_lines_read_back_as_the_entries_that_wrote_them() {
        for line in [DOC_1, DOC_2] {
            let record: RecordLine = serde_json::from_str(line).unwrap();
            let entry = record.entry().unwrap();
            assert_eq!(Ok(entry.name()), record.event());
            let again = Record {
                run: &record.run,
                link: Link {
                    seq: record.seq,
                    prev: record.prev.clone(),
                },
                intent: record.intent.as_deref(),
                entry: &entry,
                at: record.at,
            };
            assert_eq!(again.encode().unwrap().0, line.as_bytes());
        }
    }

    #[test]
    fn optional_members_are_written_as_earlier_releases_wrote_them() {
        let data = |entry: &Entry| serde_json::to_value(entry).unwrap()["data"].clone();
        // `failed` leaves out a missing detail; `rows_changed` writes it as null.
        let failed = Entry::Failed(Failed {
            error: json!({"message": "m"}),
            detail: None,
        });
        assert_eq!(data(&failed), json!({"error": {"message": "m"}}));
        let changed = Entry::RowsChanged(RowsChanged {
            deadline: 5,
            detail: None,
            error: json!({}),
            state: State::AwaitingReview,
            voided: vec!["alice".into()],
        });
        assert_eq!(
            data(&changed),
            json!({"deadline": 5, "detail": null, "error": {}, "state": "awaiting_review", "voided": ["alice"]})
        );
        // An approval names voided approvers only when there are some.
        let approval = Approval {
            approvals: 1,
            by: "bob".into(),
            comment: None,
            digest: "d".into(),
            needed: 2,
            preview: "p".into(),
            voided: vec![],
        };
        assert_eq!(
            data(&Entry::Approval(approval)),
            json!({"approvals": 1, "by": "bob", "comment": null, "digest": "d", "needed": 2, "preview": "p"})
        );
        let undone = Entry::Undone(Undone {
            by: "cli".into(),
            target: "main".into(),
            forced: None,
            conflicts: None,
            recorded_after_target: None,
        });
        assert_eq!(data(&undone), json!({"by": "cli", "target": "main"}));
        assert_eq!(
            data(&Entry::Expired(Expired { deadline: None })),
            json!({"deadline": null})
        );
    }

    #[test]
    fn every_event_name_parses_back_and_matches_serde() {
        for event in EventName::ALL {
            assert_eq!(event.as_str().parse::<EventName>(), Ok(event));
            assert_eq!(serde_json::to_value(event).unwrap(), json!(event.as_str()));
        }
        assert_eq!(
            "rejection".parse::<EventName>(),
            Err(UnknownEvent("rejection".into()))
        );
    }

    #[test]
    fn checkpoint_payload_and_export_lines_are_sorted_compact_json() {
        let payload = CheckpointPayload::new("run-a", 2, "sha256:0e", 1_760_000_999_000);
        assert_eq!(
            String::from_utf8(payload.encode().unwrap()).unwrap(),
            r#"{"at":1760000999000,"head":"sha256:0e","run":"run-a","seq":2,"type":"checkpoint"}"#
        );
        let line = ExportLine::Intent {
            id: "a-1".into(),
            envelope: json!({"payloadType": "t", "payload": "p"}),
        };
        assert_eq!(
            String::from_utf8(line.encode().unwrap()).unwrap(),
            r#"{"envelope":{"payload":"p","payloadType":"t"},"id":"a-1","type":"intent"}"#
        );
        let line = ExportLine::Checkpoint {
            envelope: json!({}),
        };
        assert_eq!(
            String::from_utf8(line.encode().unwrap()).unwrap(),
            r#"{"envelope":{},"type":"checkpoint"}"#
        );
    }
}
