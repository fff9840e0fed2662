//! Undo: reverts a run's applied intents in their targets, from the undo images
//! the targets' ledgers keep, and records it in the run's log.
//!
//! What it guarantees:
//! - **All or nothing per target.** Each target reverts every selected intent of
//!   the run in one transaction ([`Target::undo`]), in reverse apply order (the
//!   order of the run's `applied` records). Before each row is reverted it must
//!   still hold its after-image; on any conflict nothing changes in that target and
//!   the conflicting rows are reported. `force` reverts anyway and the run log
//!   says so (`undone` record data `{by, forced: true, conflicts: [...]}`).
//! - **Idempotent.** The target marks each intent undone in its ledger in the same
//!   transaction. The queue records `undone` (state Undone) after the target
//!   commits; if the process dies in between, undoing again finds the ledger mark,
//!   changes nothing in the target, and only records.
//! - **One intent at a time only when safe.** Undoing one intent is refused when a
//!   later applied (and not undone) intent of its run touched the same row (same
//!   table and key): reverting it would silently undo that later write too.
//!
//! Runs touching several targets are undone target by target (in the order of
//! their first applied intent); a conflict in one target stops before the next,
//! but targets already undone stay undone (each is its own transaction).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::apply::{self, ApplyError, Target, UndoConflict, UndoImage};
use crate::log::{self, EventName};
use crate::queue::{Queue, QueueError};
use crate::seal::Envelope;

/// Why undo (or reading a run's log) failed.
///
/// Each message includes its cause, so no variant also gives it as `source()`: an
/// error-chain printer (anyhow's `{:#}`) would show it twice.
#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    /// The queue could not be read or written.
    #[error("queue: {0}")]
    Queue(QueueError),
    /// A target could not undo.
    #[error("target {target:?}: {error}")]
    Target {
        /// The target's name.
        target: String,
        /// What went wrong (boxed: errors travel in `Result`s and must stay small).
        error: Box<ApplyError>,
    },
    /// The run has no such intent, or no such target is configured.
    #[error("{0}")]
    NotFound(String),
    /// A line of the run's log is not what Airlock writes.
    #[error("run log line {line}: {problem}")]
    Log {
        /// The 1-based line.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
}

impl From<QueueError> for UndoError {
    fn from(error: QueueError) -> Self {
        Self::Queue(error)
    }
}

/// One `applied` record of a run's log.
#[derive(Clone, Debug, PartialEq)]
pub struct AppliedIntent {
    /// The intent id.
    pub id: String,
    /// The target it was applied to.
    pub target: String,
    /// The undo images the apply recorded (the rows' before- and after-images).
    pub undo: Vec<UndoImage>,
}

/// What a run's log says about its intents, read from export lines.
#[derive(Clone, Debug, Default)]
pub struct RunLog {
    /// Intent id → the payload bytes of its sealed envelope.
    pub payloads: BTreeMap<String, Vec<u8>>,
    /// The `applied` records, in log order (the apply order).
    pub applied: Vec<AppliedIntent>,
    /// Intents with an `undone` record.
    pub undone: BTreeSet<String>,
}

#[derive(Deserialize)]
struct Line {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    run: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    envelope: Option<Envelope>,
    #[serde(default)]
    intent: Option<String>,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    data: Option<Value>,
}

impl RunLog {
    /// Reads the lines of an export (records, checkpoints and intent envelopes) of
    /// run `run`; lines of other runs are skipped. Checks shapes only: verify the
    /// log first ([`crate::verify::verify`]) when it may have been tampered with.
    pub fn parse(
        lines: impl IntoIterator<Item = impl AsRef<[u8]>>,
        run: &str,
    ) -> Result<Self, UndoError> {
        let mut log = Self::default();
        for (index, bytes) in lines.into_iter().enumerate() {
            let bytes = bytes.as_ref();
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let bad = |problem: String| UndoError::Log {
                line: index + 1,
                problem,
            };
            let line: Line = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
            match line.kind.as_str() {
                log::INTENT => {
                    let (Some(id), Some(envelope)) = (line.id, line.envelope) else {
                        return Err(bad("an intent line needs id and envelope".to_owned()));
                    };
                    log.payloads.insert(id, envelope.payload);
                }
                log::RECORD if line.run.as_deref() == Some(run) => {
                    let Some(id) = line.intent else { continue };
                    match line.event.as_deref().map(str::parse::<EventName>) {
                        Some(Ok(EventName::Applied)) => {
                            let bad = |e: serde_json::Error| {
                                bad(format!("applied record of intent {id}: {e}"))
                            };
                            let data: log::Applied =
                                serde_json::from_value(line.data.unwrap_or(Value::Null))
                                    .map_err(bad)?;
                            let undo = match data.undo {
                                Value::Null => Vec::new(),
                                images => serde_json::from_value(images).map_err(bad)?,
                            };
                            log.applied.push(AppliedIntent {
                                id,
                                target: data.target,
                                undo,
                            });
                        }
                        Some(Ok(EventName::Undone)) => {
                            log.undone.insert(id);
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        Ok(log)
    }

    /// Applied intents that are not undone, in apply order.
    pub fn live(&self) -> impl Iterator<Item = &AppliedIntent> {
        self.applied.iter().filter(|a| !self.undone.contains(&a.id))
    }
}

/// What to undo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The run.
    pub run: String,
    /// Only this intent of the run (refused when a later intent touched its rows).
    pub intent: Option<String>,
    /// Revert rows that changed since they were applied (recorded as forced).
    pub force: bool,
    /// Who undoes (recorded in the run log).
    pub by: String,
}

/// A later intent that wrote a row the intent to undo also wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct LaterWrite {
    /// The later intent.
    pub intent_id: String,
    /// The table.
    pub table: String,
    /// The row's key.
    pub key: apply::Image,
}

/// What [`undo`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Every selected intent was undone already (the log records it): nothing to do.
    Nothing,
    /// `--intent` refused: later intents of the run wrote the same rows.
    Refused {
        /// The intent asked for.
        intent_id: String,
        /// The later writes in the way.
        later: Vec<LaterWrite>,
    },
    /// Rows changed since apply: nothing changed in `target`.
    Conflicts {
        /// The target where the conflicts are.
        target: String,
        /// Intents of earlier targets that were undone and recorded anyway.
        undone: Vec<String>,
        /// The conflicting rows.
        conflicts: Vec<UndoConflict>,
    },
    /// Undone and recorded.
    Undone {
        /// Intents reverted now, in the order reverted.
        reverted: Vec<String>,
        /// Intents the target had already reverted (a crash before recording): only
        /// recorded now.
        recorded_only: Vec<String>,
        /// Conflicts overridden by `force`.
        forced: Vec<UndoConflict>,
    },
}

/// Which intents to undo, in reverse apply order; or the later writes refusing a
/// single-intent undo. Pure.
pub fn plan<'l>(
    log: &'l RunLog,
    intent: Option<&str>,
) -> Result<Result<Vec<&'l AppliedIntent>, Vec<LaterWrite>>, UndoError> {
    let live: Vec<&AppliedIntent> = log.live().collect();
    let Some(intent) = intent else {
        return Ok(Ok(live.into_iter().rev().collect()));
    };
    let Some(position) = live.iter().position(|a| a.id == intent) else {
        if log.undone.contains(intent) {
            return Ok(Ok(Vec::new()));
        }
        return Err(UndoError::NotFound(format!(
            "intent {intent:?} has no applied record in this run"
        )));
    };
    let chosen = live[position];
    let mut later = Vec::new();
    for other in &live[position + 1..] {
        for image in &other.undo {
            let same = chosen
                .undo
                .iter()
                .any(|mine| mine.table == image.table && mine.key == image.key);
            let listed = later
                .iter()
                .any(|l: &LaterWrite| l.intent_id == other.id && l.key == image.key);
            if same && !listed && other.target == chosen.target {
                later.push(LaterWrite {
                    intent_id: other.id.clone(),
                    table: image.table.clone(),
                    key: image.key.clone(),
                });
            }
        }
    }
    if later.is_empty() {
        Ok(Ok(vec![chosen]))
    } else {
        Ok(Err(later))
    }
}

/// Undoes what `request` asks in the targets `open_target` gives by name, and
/// records `undone` in the queue for each intent reverted.
pub async fn undo(
    queue: &mut Queue,
    open_target: impl Fn(&str) -> Result<Arc<dyn Target>, UndoError>,
    request: &Request,
) -> Result<Outcome, UndoError> {
    let lines = queue.export_lines(Some(&request.run))?;
    let log = RunLog::parse(&lines, &request.run)?;
    if log.applied.is_empty() && log.undone.is_empty() {
        return Err(UndoError::NotFound(format!(
            "run {:?} has no applied intents",
            request.run
        )));
    }
    let selected = match plan(&log, request.intent.as_deref())? {
        Ok(selected) => selected,
        Err(later) => {
            return Ok(Outcome::Refused {
                intent_id: request.intent.clone().unwrap_or_default(),
                later,
            });
        }
    };
    if selected.is_empty() {
        return Ok(Outcome::Nothing);
    }
    // Group by target, keeping reverse apply order within each.
    let mut targets: Vec<(&str, Vec<String>)> = Vec::new();
    for intent in &selected {
        match targets.iter_mut().find(|(t, _)| *t == intent.target) {
            Some((_, ids)) => ids.push(intent.id.clone()),
            None => targets.push((&intent.target, vec![intent.id.clone()])),
        }
    }
    let mut reverted = Vec::new();
    let mut recorded_only = Vec::new();
    let mut forced = Vec::new();
    for (name, ids) in targets {
        let target = open_target(name)?;
        let report = target
            .undo(&ids, request.force)
            .await
            .map_err(|error| UndoError::Target {
                target: name.to_owned(),
                error: Box::new(error),
            })?;
        if !report.committed {
            return Ok(Outcome::Conflicts {
                target: name.to_owned(),
                undone: reverted.into_iter().chain(recorded_only).collect(),
                conflicts: report.conflicts,
            });
        }
        queue.write(|w| {
            for id in report.undone.iter().chain(&report.already) {
                let conflicts: Vec<&UndoConflict> = report
                    .conflicts
                    .iter()
                    .filter(|c| &c.intent_id == id)
                    .collect();
                let undone = log::Undone {
                    by: request.by.clone(),
                    target: name.to_owned(),
                    forced: request.force.then_some(true),
                    conflicts: if request.force {
                        Some(serde_json::to_value(&conflicts)?)
                    } else {
                        None
                    },
                    recorded_after_target: report.already.contains(id).then_some(true),
                };
                w.record_undone(id, undone)?;
            }
            Ok(())
        })?;
        reverted.extend(report.undone);
        recorded_only.extend(report.already);
        forced.extend(report.conflicts);
    }
    Ok(Outcome::Undone {
        reverted,
        recorded_only,
        forced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(table: &str, id: i64) -> UndoImage {
        let key: apply::Image = serde_json::from_value(json!({ "id": id })).unwrap();
        UndoImage {
            op: 0,
            table: table.to_owned(),
            key: key.clone(),
            before: None,
            after: Some(key),
        }
    }

    fn applied(id: &str, images: Vec<UndoImage>) -> AppliedIntent {
        AppliedIntent {
            id: id.to_owned(),
            target: "default".to_owned(),
            undo: images,
        }
    }

    #[test]
    fn plan_reverses_and_refuses_single_intents_under_later_writes() {
        let log = RunLog {
            applied: vec![
                applied("a", vec![image("t", 1)]),
                applied("b", vec![image("t", 2)]),
                applied("c", vec![image("t", 1), image("u", 2)]),
            ],
            ..RunLog::default()
        };
        let all: Vec<&str> = plan(&log, None)
            .unwrap()
            .unwrap()
            .iter()
            .map(|a| a.id.as_str())
            .collect();
        assert_eq!(all, ["c", "b", "a"]);
        let one = plan(&log, Some("b")).unwrap().unwrap();
        assert_eq!(one.len(), 1);
        let later = plan(&log, Some("a")).unwrap().unwrap_err();
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].intent_id, "c");
        assert_eq!(later[0].table, "t");
        assert!(plan(&log, Some("zzz")).is_err());

        let mut undone = log.clone();
        undone.undone.insert("c".to_owned());
        assert_eq!(plan(&undone, Some("a")).unwrap().unwrap().len(), 1);
        assert!(plan(&undone, Some("c")).unwrap().unwrap().is_empty());
    }

    #[test]
    fn run_log_reads_applied_and_undone_records_of_its_run() {
        let lines = [
            json!({"type": "record", "run": "r", "seq": 1, "intent": "a", "event": "applied",
                   "data": {"target": "default", "undo": [image("t", 1)]}}),
            json!({"type": "record", "run": "other", "seq": 1, "intent": "x", "event": "applied",
                   "data": {"target": "default", "undo": []}}),
            json!({"type": "record", "run": "r", "seq": 2, "intent": "a", "event": "undone",
                   "data": {"by": "me"}}),
        ]
        .map(|l| serde_json::to_vec(&l).unwrap());
        let log = RunLog::parse(&lines, "r").unwrap();
        assert_eq!(log.applied.len(), 1);
        assert_eq!(log.applied[0].undo, vec![image("t", 1)]);
        assert!(log.undone.contains("a"));
        assert_eq!(log.live().count(), 0);
        let err = RunLog::parse([b"{".as_slice()], "r").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
