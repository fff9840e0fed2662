//! Replay: applies a run's applied intents, from its (verified) log, to another
//! database, and optionally checks that every row came out as recorded.
//!
//! - **The sealed bytes, in apply order.** The intents are the exact payload
//!   bytes of the sealed envelopes in the log, applied in the order of the run's
//!   `applied` records through the ordinary [`Target::apply`], each in its own
//!   transaction. The replay target gets its own ledger, holding each intent's
//!   digest (of those sealed bytes), so replaying twice applies nothing the
//!   second time. Every intent goes to the one database given, whatever target
//!   name it was for.
//! - **The generated values as recorded.** Each insert (and each upsert that
//!   inserted) also writes the values the database generated for its row the
//!   first time (serial and identity keys, defaults), read from the undo images
//!   of its `applied` record ([`Generated`]), and PostgreSQL sequences are
//!   advanced past them. Sequences do not roll back: a preview, or an insert that
//!   failed, burned values in the original database, so without this a replay into
//!   a snapshot would hand out other keys than the run got. With it, the replay
//!   target's rows are the recorded ones whatever its sequences say. Columns the
//!   database computes (generated columns) are not written; they compute again.
//! - **Undone intents are skipped** by default: they were reverted, so a snapshot
//!   of the original after the run does not hold their rows. They are listed in
//!   [`Outcome::intents`] as [`Step::SkippedUndone`]. With
//!   [`Options::include_undone`] they are applied too (as they were applied;
//!   their undo is not replayed).
//! - **Into an existing database only.** The target is opened with
//!   [`apply::open_existing`]: a SQLite path that does not exist is an error
//!   ([`ReplayError::NoDatabase`]) and no file is created.
//!
//! Verify the log first ([`crate::verify::verify`]); this module only checks its
//! shape.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::apply::{self, ApplyError, ApplyMeta, Generated, Image, Target, UndoImage, codes};
use crate::undo::{RunLog, UndoError};

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The log could not be read.
    #[error(transparent)]
    Log(#[from] UndoError),
    /// The log has an `applied` record for an intent whose envelope it lacks, or
    /// whose payload is not an intent.
    #[error("intent {id}: {problem}")]
    Intent {
        /// The intent id.
        id: String,
        /// What is wrong.
        problem: String,
    },
    /// The replay target is an SQLite file that does not exist: replay writes into
    /// an existing database (created from the schema, a snapshot), and creates
    /// none.
    #[error(
        "replay target {url}: no such database file (replay writes into an existing \
         database; create it from your schema first)"
    )]
    NoDatabase {
        /// The target's URL (a `sqlite://` one, so it holds no credentials).
        url: String,
    },
    /// The replay target refused an intent (nothing of that intent was written;
    /// intents before it stay applied).
    #[error("intent {id}: {error}")]
    Apply {
        /// The intent id.
        id: String,
        /// Why.
        error: ApplyError,
    },
}

/// One applied intent of the run, and what the replay did with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replayed {
    /// The intent id.
    pub id: String,
    /// What the replay did.
    pub step: Step,
}

/// What the replay did with one applied intent of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Applied to the replay target now.
    Applied,
    /// The replay target's ledger already held it (an earlier replay): nothing
    /// written.
    AlreadyReplayed,
    /// The run's log records it undone, and undone intents were not asked for
    /// ([`Options::include_undone`]): not applied.
    SkippedUndone,
}

/// How to replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Compare every row written with the after-image recorded at the original
    /// apply ([`Outcome::divergences`]).
    pub check: bool,
    /// Apply the intents the log records as undone too (skipped by default).
    pub include_undone: bool,
}

/// A row that came out differently in the replay target than recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct Divergence {
    /// The intent.
    pub intent_id: String,
    /// Index of the op in the intent's `ops`, from 0.
    pub op: usize,
    /// The table.
    pub table: String,
    /// The row's key as recorded.
    pub key: Image,
    /// The differing column; `None` when the whole row differs (present in one,
    /// absent in the other, or a different number of rows written).
    pub column: Option<String>,
    /// The recorded value (or row).
    pub expected: Value,
    /// The value (or row) the replay produced.
    pub found: Value,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = serde_json::to_string(&self.key).unwrap_or_default();
        write!(
            f,
            "intent {} op {} table {} key {}",
            self.intent_id, self.op, self.table, key
        )?;
        if let Some(column) = &self.column {
            write!(f, " column {column:?}")?;
        }
        write!(f, ": expected {}, found {}", self.expected, self.found)
    }
}

/// What [`replay`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// The run's applied intents, in apply order, each with what the replay did.
    pub intents: Vec<Replayed>,
    /// Differences from the recorded after-images (only with `check`).
    pub divergences: Vec<Divergence>,
}

/// Applies the applied intents of `run`, read from export `lines`, to the existing
/// database at `url` (see the module's docs); with [`Options::check`], compares
/// the rows written with the recorded images.
pub async fn replay(
    lines: &[Vec<u8>],
    run: &str,
    url: &str,
    options: &Options,
) -> Result<Outcome, ReplayError> {
    let log = RunLog::parse(lines, run)?;
    let mut targets: BTreeMap<String, Arc<dyn Target>> = BTreeMap::new();
    let mut outcome = Outcome::default();
    for recorded in &log.applied {
        let id = &recorded.id;
        if log.undone.contains(id) && !options.include_undone {
            outcome.intents.push(Replayed {
                id: id.clone(),
                step: Step::SkippedUndone,
            });
            continue;
        }
        let bad = |problem: String| ReplayError::Intent {
            id: id.clone(),
            problem,
        };
        let payload = log
            .payloads
            .get(id)
            .ok_or_else(|| bad("the log has no envelope for it".to_owned()))?;
        let intent: airlock_intent::Intent = serde_json::from_slice(payload)
            .map_err(|e| bad(format!("the envelope's payload is not an intent: {e}")))?;
        let name = intent.target.as_str().to_owned();
        let target = match targets.get(&name) {
            Some(target) => Arc::clone(target),
            None => {
                let target = apply::open_existing(&name, url).map_err(|error| {
                    if error.code.as_deref() == Some(codes::NO_DATABASE) {
                        ReplayError::NoDatabase {
                            url: url.to_owned(),
                        }
                    } else {
                        ReplayError::Apply {
                            id: id.clone(),
                            error,
                        }
                    }
                })?;
                targets.insert(name, Arc::clone(&target));
                target
            }
        };
        let meta = ApplyMeta {
            // The sealed bytes' digest, as in the original ledger.
            digest: crate::seal::digest(payload),
            // The recorded apply already passed the limit it was configured with.
            max_rows: u64::MAX,
            // Replay re-applies what was applied; no review binds other rows.
            reviewed: None,
            replay: Some(Generated::recorded(&intent, &recorded.undo)),
        };
        let applied = target
            .apply(&intent, &meta)
            .await
            .map_err(|error| ReplayError::Apply {
                id: id.clone(),
                error,
            })?;
        if options.check {
            outcome
                .divergences
                .extend(compare(id, &recorded.undo, &applied.ledger.undo));
        }
        outcome.intents.push(Replayed {
            id: id.clone(),
            step: if applied.already {
                Step::AlreadyReplayed
            } else {
                Step::Applied
            },
        });
    }
    Ok(outcome)
}

/// The differences between recorded and replayed after-images, image by image.
/// Pure.
pub fn compare(intent_id: &str, recorded: &[UndoImage], replayed: &[UndoImage]) -> Vec<Divergence> {
    let mut found = Vec::new();
    let row = |image: Option<&Image>| image.map_or(Value::Null, |i| Value::Object(i.clone()));
    for (index, expected) in recorded.iter().enumerate() {
        let divergence =
            |column: Option<String>, expected_value: Value, found_value: Value| Divergence {
                intent_id: intent_id.to_owned(),
                op: expected.op,
                table: expected.table.clone(),
                key: expected.key.clone(),
                column,
                expected: expected_value,
                found: found_value,
            };
        let Some(actual) = replayed.get(index) else {
            found.push(divergence(
                None,
                row(expected.after.as_ref()),
                Value::String("no row written".to_owned()),
            ));
            continue;
        };
        match (&expected.after, &actual.after) {
            (Some(want), Some(got)) => {
                for (column, value) in want {
                    let got_value = got.get(column).cloned().unwrap_or(Value::Null);
                    if &got_value != value {
                        found.push(divergence(Some(column.clone()), value.clone(), got_value));
                    }
                }
            }
            (None, None) => {}
            (want, got) => found.push(divergence(None, row(want.as_ref()), row(got.as_ref()))),
        }
    }
    for extra in replayed.iter().skip(recorded.len()) {
        found.push(Divergence {
            intent_id: intent_id.to_owned(),
            op: extra.op,
            table: extra.table.clone(),
            key: extra.key.clone(),
            column: None,
            expected: Value::String("no row written".to_owned()),
            found: row(extra.after.as_ref()),
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(after: Value) -> UndoImage {
        UndoImage {
            op: 1,
            table: "t".to_owned(),
            key: serde_json::from_value(json!({"id": 1})).unwrap(),
            before: None,
            after: after.as_object().cloned(),
        }
    }

    #[test]
    fn compare_names_each_differing_column() {
        let recorded = [image(json!({"id": 1, "a": 2, "b": "x"}))];
        assert!(compare("i", &recorded, &recorded).is_empty());
        let replayed = [image(json!({"id": 1, "a": 3, "b": "x"}))];
        let found = compare("i", &recorded, &replayed);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].column.as_deref(), Some("a"));
        assert_eq!(found[0].expected, json!(2));
        assert_eq!(found[0].found, json!(3));
        assert!(
            found[0].to_string().contains("column \"a\""),
            "{}",
            found[0]
        );
        let deleted = [image(Value::Null)];
        assert_eq!(compare("i", &recorded, &deleted)[0].column, None);
        assert_eq!(compare("i", &recorded, &[]).len(), 1);
        assert_eq!(compare("i", &[], &recorded).len(), 1);
    }
}
