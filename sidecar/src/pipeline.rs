//! The pipeline: moves queued intents forward — expire, decide, apply — and tells the
//! agent each outcome. One [`Pipeline::step`] does one pass of every stage (expire
//! overdue reviews, decide, apply, write pending outcome files, then sign the
//! checkpoints that are due), batching each stage's queue writes into one commit. The
//! daemon calls it when intake admits something or the review endpoint records a
//! review or an undo, again at once while steps make progress, and otherwise on a timer (which
//! picks up reviews decided by the CLI, retries whose backoff ended, and deadlines).
//!
//! Order and safety:
//! - Only approved intents are applied, and only those at the front of their run
//!   ([`Queue::apply_chains`]): for each run, its first still-pending intent and the
//!   approved ones right after it, up to the first that is not approved or is
//!   backing off (at most 64 per run). A run's intents apply in queue order, and one
//!   awaiting review holds back the rest of its run (DESIGN invariants 3 and 7).
//! - Runs apply concurrently; one run's chain goes to its target in one transaction
//!   (a savepoint per intent, see [`Target::apply_chain`]) and stops at its first
//!   error, so nothing overtakes an intent that has to be retried.
//! - An intent's writes and its ledger row commit together in the target before the
//!   queue marks it applied. After a crash in between, applying again finds the
//!   ledger row and only marks it (invariant 2).
//! - A policy that cannot answer leaves the intent queued, retried with backoff
//!   (invariant 4); a transient target error retries the same way.
//! - The policy decides on the names the database will use (invariant 3): before
//!   the decision, every op's table and columns are resolved against the target's
//!   catalog ([`Target::resolve`]) and the policy input carries the canonical
//!   schema, table and columns. An intent whose names do not resolve (no such table
//!   or column, a view, a system catalog reached through `search_path`) fails
//!   before policy, with the target's explanation in its outcome (error stage
//!   `resolve`); a transient error while resolving is no decision: the intent
//!   waits and is retried, never decided on unresolved names.
//! - With `[policy] preview`, each intent is first run against its target in a
//!   transaction that is rolled back, and the policy sees what it would write. A
//!   transient preview error is no decision (the intent waits, as above); a permanent
//!   one is shown to the policy as `preview.error`.
//! - An intent approved by reviewers is applied with the preview digest they
//!   approved ([`ApplyMeta::reviewed`]). If the rows it touches changed since, the
//!   target rolls it back ([`codes::ROWS_CHANGED`]) and it goes back to
//!   `awaiting_review` with a new deadline, its approvals void; its outcome says
//!   "rows changed since review". Intents the policy allowed bind no rows.
//! - Errors reach the agent's outcome without their `detail` (values read from the
//!   database); the detail goes in the run log's record and the daemon's log.
//! - With a [`Webhook`], an intent the policy sends to review is announced once,
//!   after the commit that records the decision, on a task that the pipeline never
//!   waits for (best effort: see [`crate::webhook`]).
//! - With a [`DecisionLog`], every decision the queue recorded gets one event, after
//!   the commit, handed to the log's writer thread without waiting (best effort:
//!   see `decide::decision_log`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::runtime::Handle;
use tracing::{info, warn};

use airlock_intent::Intent;

use crate::apply::{Applied, ApplyError, ApplyMeta, ErrorKind, ResolvedOp, Target, codes};
use crate::clock::now_ms;
use crate::config::Config;
use crate::decide::{
    DecisionLog, Entry, InputContext, Policy, build_input, new_decision_id, policy_path,
    preview_json,
};
use crate::lifecycle::{State, Verdict};
use crate::log;
use crate::outcome::{Outcome, Outcomes, Written};
use crate::queue::{DecisionOutcome, IntentRow, Queue, QueueError};
use crate::webhook::{ReviewNotice, Webhook};

/// Most intents one stage takes in one step.
const BATCH: usize = 256;

/// What applying one intent needs, or why it cannot be applied at all.
type Job = Result<(Arc<dyn Target>, Intent, ApplyMeta), ApplyError>;

/// Most intents of one run applied in one step.
const CHAIN: usize = 64;

/// The pipeline's resources.
#[derive(Debug)]
pub struct Pipeline {
    queue: Queue,
    policy: Arc<Policy>,
    targets: BTreeMap<String, Arc<dyn Target>>,
    outcomes: Outcomes,
    runtime: Handle,
    review_ttl: Duration,
    max_rows: u64,
    max_backoff_ms: u64,
    preview: bool,
    webhook: Option<Webhook>,
    /// The decision log and the policy path its events name.
    decision_log: Option<(DecisionLog, String)>,
}

/// What one step did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepReport {
    pub expired: usize,
    pub decided: usize,
    pub applied: usize,
    pub failed: usize,
    /// Approved intents sent back to review: their rows changed since review.
    pub reviewed_again: usize,
    pub retried: usize,
    pub outcomes: usize,
}

impl StepReport {
    /// Whether the step moved any intent (another step may find more to do).
    pub fn progressed(&self) -> bool {
        self.expired + self.decided + self.applied + self.failed + self.reviewed_again > 0
    }
}

impl Pipeline {
    /// A pipeline over its own queue connection.
    pub fn new(
        config: &Config,
        queue: Queue,
        policy: Arc<Policy>,
        targets: BTreeMap<String, Arc<dyn Target>>,
        outcomes: Outcomes,
        runtime: Handle,
    ) -> Self {
        Self {
            queue,
            policy,
            targets,
            outcomes,
            runtime,
            review_ttl: config.review_ttl(),
            max_rows: config.apply.max_rows,
            max_backoff_ms: config.apply.max_backoff_ms,
            preview: config.policy.preview,
            webhook: None,
            decision_log: None,
        }
    }

    /// Writes one line per decision to `log` (`[telemetry] decision_log`). Every
    /// decision then carries a decision id, the engine's or a fresh one, which the
    /// run log records too, so a log line and a run-log record can be matched.
    pub fn with_decision_log(mut self, log: DecisionLog) -> Self {
        let path = policy_path(&self.policy);
        self.decision_log = Some((log, path));
        self
    }

    /// Announces every intent that enters review to `webhook`.
    pub fn with_webhook(mut self, webhook: Webhook) -> Self {
        self.webhook = Some(webhook);
        self
    }

    /// One pass of every stage.
    pub fn step(&mut self) -> Result<StepReport, QueueError> {
        let mut report = StepReport::default();
        self.expire(&mut report)?;
        self.decide(&mut report)?;
        self.apply(&mut report)?;
        self.write_outcomes(&mut report)?;
        // Records written by other connections without the key (the CLI), or held
        // back by a checkpoint policy with a time bound.
        self.queue.seal_due(false)?;
        Ok(report)
    }

    /// Checkpoints every run with unsealed records (on a clean stop).
    pub fn seal_all(&mut self) -> Result<usize, QueueError> {
        self.queue.seal_due(true)
    }

    /// Writes every pending outcome file.
    pub fn flush_outcomes(&mut self) -> Result<usize, QueueError> {
        let mut report = StepReport::default();
        self.write_outcomes(&mut report)?;
        Ok(report.outcomes)
    }

    /// The pipeline's queue connection.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    fn expire(&mut self, report: &mut StepReport) -> Result<(), QueueError> {
        let overdue = self.queue.overdue_reviews(now_ms())?;
        if overdue.is_empty() {
            return Ok(());
        }
        self.queue.write(|w| {
            for row in &overdue {
                w.expire(&row.id)?;
                info!(message = "review expired", id = %row.id, run = %row.run);
            }
            Ok(())
        })?;
        report.expired += overdue.len();
        Ok(())
    }

    fn decide(&mut self, report: &mut StepReport) -> Result<(), QueueError> {
        // Changed policy files are picked up (and broken ones reported) even while
        // nothing waits for a decision.
        self.policy.refresh();
        let now = now_ms();
        let due = self.queue.due_for_decision(now, BATCH)?;
        if due.is_empty() {
            return Ok(());
        }
        let mut intents = Vec::with_capacity(due.len());
        for row in &due {
            intents.push(row.intent()?);
        }
        let names = self.resolve(&due, &intents);
        let previews = self.previews(&due, &intents);
        let mut inputs = Vec::with_capacity(due.len());
        let mut evaluated = Vec::with_capacity(due.len());
        let mut counts: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (index, (row, intent)) in due.iter().zip(&intents).enumerate() {
            // Never decided on names that did not resolve.
            let Ok(names) = &names[index] else {
                continue;
            };
            let preview = match &previews[index] {
                Some(Ok(preview)) => Some(preview),
                // A transient preview error is no decision: the intent waits.
                Some(Err(_)) => continue,
                None => None,
            };
            if !counts.contains_key(&row.run) {
                counts.insert(row.run.clone(), self.queue.run_counts(&row.run)?);
            }
            let Some(run_counts) = counts.get(&row.run) else {
                continue;
            };
            let keyid = self.queue.keyid(&row.id)?;
            let input = build_input(&InputContext {
                intent,
                run_counts,
                digest: &row.digest,
                keyid: keyid.as_deref(),
                file: &row.file,
                target: &row.target,
                preview,
                names: Some(names),
            });
            inputs.push(input);
            evaluated.push(index);
        }
        // A remote policy answers the batch concurrently; any error is no decision.
        let mut answers: Vec<Result<_, String>> = previews
            .iter()
            .zip(&names)
            .map(|(preview, names)| match (names, preview) {
                (Err(error), _) => Err(format!("the names could not be resolved: {error}")),
                (_, Some(Err(message))) => Err(message.clone()),
                _ => Err("not evaluated".to_owned()),
            })
            .collect();
        // Kept for the decision log only when there is one.
        let logged_inputs = self.decision_log.as_ref().map(|_| inputs.clone());
        let evaluations = self.policy.evaluate_all(&self.runtime, inputs);
        for (&index, answer) in evaluated.iter().zip(evaluations) {
            answers[index] = answer.map_err(|e| e.to_string());
            if self.decision_log.is_some()
                && let Ok(decision) = &mut answers[index]
                && decision.decision_id.is_none()
            {
                decision.decision_id = Some(new_decision_id());
            }
        }
        let now = now_ms();
        let deadline = now + i64::try_from(self.review_ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let max_backoff = self.max_backoff_ms;
        let announce = self.webhook.is_some();
        let mut reviews = Vec::new();
        let mut unresolvable = 0;
        self.queue.write(|w| {
            for (((row, answer), intent), names) in
                due.iter().zip(&answers).zip(&intents).zip(&names)
            {
                if let Err(error) = names
                    && error.kind == ErrorKind::Permanent
                {
                    warn!(message = "intent names do not resolve in its target; it fails before policy", id = %row.id, run = %row.run, %error, code = error.code.as_deref().map(tracing::field::display));
                    let mut detail = error_json(error, None);
                    detail["stage"] = "resolve".into();
                    w.record_unresolvable(&row.id, detail)?;
                    unresolvable += 1;
                    continue;
                }
                match answer {
                    Ok(decision) => {
                        let state = w.record_decision(
                            &row.id,
                            DecisionOutcome::Decided {
                                decision,
                                review_deadline: deadline,
                            },
                        )?;
                        info!(message = "intent decided", id = %row.id, run = %row.run, %state, reasons = (!decision.reasons.is_empty()).then(|| tracing::field::display(decision.reasons.join("; "))));
                        if announce && state == State::AwaitingReview {
                            let approvals = match decision.verdict {
                                Verdict::Review { approvals } => approvals.max(1),
                                _ => 1,
                            };
                            reviews.push(ReviewNotice {
                                id: row.id.clone(),
                                run: row.run.clone(),
                                target: row.target.clone(),
                                digest: row.digest.clone(),
                                reason: intent.reason.clone(),
                                reasons: decision.reasons.clone(),
                                approvals,
                                deadline_ms: deadline,
                            });
                        }
                    }
                    Err(message) => {
                        let retry_at = now + backoff_ms(row.attempts, max_backoff, &row.id);
                        warn!(message = "policy could not decide; the intent waits", id = %row.id, error = %message, attempts = row.attempts + 1);
                        crate::metrics::global().policy_error();
                        w.record_decision(
                            &row.id,
                            DecisionOutcome::Unavailable {
                                message: &format!("policy could not decide: {message}"),
                                retry_at,
                            },
                        )?;
                    }
                }
            }
            Ok(())
        })?;
        report.decided += answers.iter().filter(|a| a.is_ok()).count();
        report.failed += unresolvable;
        // Only decisions the queue recorded are logged.
        if let (Some((log, path)), Some(inputs)) = (&self.decision_log, &logged_inputs) {
            for (&index, input) in evaluated.iter().zip(inputs) {
                if let Ok(decision) = &answers[index] {
                    log.record(&Entry {
                        input,
                        decision,
                        path,
                        provenance: &intents[index].provenance,
                    });
                }
            }
        }
        // Only now that the decisions are committed: a message never announces a
        // review the queue does not hold.
        if let Some(webhook) = &self.webhook {
            for notice in &reviews {
                webhook.notify(&self.runtime, notice);
            }
        }
        Ok(())
    }

    /// Each intent's names resolved against its target ([`Target::resolve`]), asked
    /// concurrently. An intent for a target that is not configured cannot resolve
    /// (a permanent error).
    fn resolve(
        &self,
        due: &[IntentRow],
        intents: &[Intent],
    ) -> Vec<Result<Vec<ResolvedOp>, ApplyError>> {
        let asks = due.iter().zip(intents).map(|(row, intent)| {
            let target = self.targets.get(&row.target).cloned();
            async move {
                match target {
                    Some(target) => target.resolve(intent).await,
                    None => Err(ApplyError::permanent(format!(
                        "no target named {:?} is configured",
                        intent.target.as_str()
                    ))),
                }
            }
        });
        self.runtime.block_on(futures_util::future::join_all(asks))
    }

    /// With `[policy] preview`, each intent's preview (`preview_json`) from its target,
    /// asked concurrently; `Err` holds a transient error's message (the intent is not
    /// decided now). Without it, `None` for every intent.
    fn previews(
        &self,
        due: &[IntentRow],
        intents: &[Intent],
    ) -> Vec<Option<Result<Value, String>>> {
        if !self.preview {
            return vec![None; due.len()];
        }
        let asks = due.iter().zip(intents).map(|(row, intent)| {
            let target = self.targets.get(&row.target).cloned();
            let meta = ApplyMeta {
                digest: row.digest.clone(),
                max_rows: self.max_rows,
                reviewed: None,
                replay: None,
            };
            async move {
                let result = match target {
                    Some(target) => target.preview(intent, &meta).await,
                    None => Err(ApplyError::permanent(format!(
                        "no target named {:?} is configured",
                        intent.target.as_str()
                    ))),
                };
                match result {
                    Ok(preview) => Some(Ok(preview_json(Ok(&preview)))),
                    Err(error) if error.is_transient() => {
                        Some(Err(format!("the preview failed: {error}")))
                    }
                    Err(error) => Some(Ok(preview_json(Err(&error)))),
                }
            }
        });
        self.runtime.block_on(futures_util::future::join_all(asks))
    }

    /// Applies, for every run, the approved intents at its front: runs concurrently,
    /// each run's chain in queue order, in one target transaction per target (one
    /// savepoint per intent). A chain stops at its first error, so nothing overtakes
    /// an intent that has to be retried. Every result is then recorded in one queue
    /// commit.
    fn apply(&mut self, report: &mut StepReport) -> Result<(), QueueError> {
        let chains = self.queue.apply_chains(now_ms(), CHAIN, BATCH)?;
        if chains.is_empty() {
            return Ok(());
        }
        let jobs: Vec<Vec<_>> = chains
            .iter()
            .map(|chain| chain.iter().map(|row| self.prepare(row)).collect())
            .collect();
        let chain_results = self.runtime.block_on(async move {
            let handles: Vec<_> = jobs
                .into_iter()
                .map(|chain| tokio::spawn(apply_chain(chain)))
                .collect();
            let mut results = Vec::with_capacity(handles.len());
            for handle in handles {
                results.push(handle.await.unwrap_or_else(|error| {
                    // A bug in a target, not a verdict on the intent: retry later.
                    vec![Err(ApplyError::transient(format!(
                        "apply task failed: {error}"
                    )))]
                }));
            }
            results
        });
        let mut heads = Vec::new();
        let mut results = Vec::new();
        for (chain, chain_results) in chains.into_iter().zip(chain_results) {
            for (row, result) in chain.into_iter().zip(chain_results) {
                heads.push(row);
                results.push(result);
            }
        }
        let metrics = crate::metrics::global();
        for error in results.iter().filter_map(|r| r.as_ref().err()) {
            metrics.apply_error(error.code.as_deref());
        }
        let now = now_ms();
        let max_backoff = self.max_backoff_ms;
        let deadline = now + i64::try_from(self.review_ttl.as_millis()).unwrap_or(i64::MAX / 2);
        self.queue.write(|w| {
            for (row, result) in heads.iter().zip(results) {
                match result {
                    Ok(applied) => {
                        let record = log::Applied {
                            already: applied.already,
                            ops: serde_json::to_value(&applied.ops)?,
                            target: row.target.clone(),
                            undo: serde_json::to_value(&applied.ledger.undo)?,
                        };
                        // What the agent's outcome shows of it.
                        let written = serde_json::to_value(Written::of(&applied, row))?;
                        w.record_applied(&row.id, record, &written)?;
                        report.applied += 1;
                        info!(message = "intent applied", id = %row.id, run = %row.run, target = %row.target, already = applied.already);
                    }
                    Err(error)
                        if error.kind == ErrorKind::Permanent
                            && error.code.as_deref() == Some(codes::ROWS_CHANGED) =>
                    {
                        warn!(message = "rows changed since review; the intent goes back to review", id = %row.id, run = %row.run, detail = error.detail.as_deref().map(tracing::field::display));
                        w.record_rows_changed(
                            &row.id,
                            error_json(&error, None),
                            error.detail.as_deref(),
                            deadline,
                        )?;
                        report.reviewed_again += 1;
                    }
                    Err(error) if error.kind == ErrorKind::Permanent => {
                        warn!(message = "intent failed", id = %row.id, run = %row.run, error = %error, code = error.code.as_deref().map(tracing::field::display), detail = error.detail.as_deref().map(tracing::field::display));
                        w.record_failed(&row.id, error_json(&error, None), error.detail.as_deref())?;
                        report.failed += 1;
                    }
                    Err(error) => {
                        let retry_at = now + backoff_ms(row.attempts, max_backoff, &row.id);
                        warn!(message = "transient apply error; will retry", id = %row.id, error = %error, detail = error.detail.as_deref().map(tracing::field::display), attempts = row.attempts + 1);
                        w.record_retry(&row.id, error_json(&error, Some(retry_at)), retry_at)?;
                        report.retried += 1;
                    }
                }
            }
            Ok(())
        })
    }

    /// What applying one intent needs, or why it cannot be applied at all.
    fn prepare(&self, row: &IntentRow) -> Job {
        let target = self
            .targets
            .get(&row.target)
            .ok_or_else(|| ApplyError::permanent(format!("unknown target {:?}", row.target)))?;
        let intent = row
            .intent()
            .map_err(|e| ApplyError::permanent(e.to_string()))?;
        // The rows the reviewers saw, for an intent they approved; an intent the
        // policy allowed had no review (no query on the common path).
        let reviewed = if row.approvals_needed > 0 {
            self.queue
                .review_binding(&row.id)
                .map_err(|e| ApplyError::transient(format!("reading the intent's review: {e}")))?
        } else {
            None
        };
        let meta = ApplyMeta {
            digest: row.digest.clone(),
            max_rows: self.max_rows,
            reviewed,
            replay: None,
        };
        Ok((target.clone(), intent, meta))
    }

    fn write_outcomes(&mut self, report: &mut StepReport) -> Result<(), QueueError> {
        loop {
            let intents = self.queue.pending_intent_outcomes(BATCH)?;
            let refusals = self.queue.pending_refusal_outcomes(BATCH)?;
            if intents.is_empty() && refusals.is_empty() {
                return Ok(());
            }
            let mut written_intents = Vec::with_capacity(intents.len());
            for row in &intents {
                let outcome = Outcome::of_queued(&self.queue, row)?;
                if self.write(&outcome) {
                    written_intents.push(row.seq);
                }
            }
            let mut written_refusals = Vec::with_capacity(refusals.len());
            for row in &refusals {
                if self.write(&Outcome::of_refusal(row)) {
                    written_refusals.push(row.seq);
                }
            }
            let progress = written_intents.len() + written_refusals.len();
            self.queue
                .write(|w| w.outcomes_written(&written_intents, &written_refusals))?;
            report.outcomes += progress;
            if progress == 0 {
                // The results directory is failing; the flags stay set and the next
                // step tries again.
                return Ok(());
            }
        }
    }

    fn write(&self, outcome: &Outcome) -> bool {
        match self.outcomes.write(outcome) {
            Ok(_) => true,
            // Held while the results directory is unusable: logged once by `Outcomes`.
            Err(error) if Outcomes::is_held(&error) => false,
            Err(error) => {
                warn!(message = "cannot write outcome file", dir = %self.outcomes.dir().display(), file = %outcome.file_name(), %error);
                false
            }
        }
    }
}

/// Applies one run's chain in order, stopping after the first error (its result is
/// the last one returned; the intents after it are left for a later step).
/// Consecutive intents for the same target go to [`Target::apply_chain`] together,
/// which applies them in one target transaction; a run that mixes targets is split
/// where the target changes. A target's answer that ends in an error (or covers
/// fewer intents than it was given) ends the chain: when a chain's transaction may
/// not have committed, every intent it held is a transient error, and all of them
/// are recorded.
async fn apply_chain(chain: Vec<Job>) -> Vec<Result<Applied, ApplyError>> {
    let mut results = Vec::with_capacity(chain.len());
    let mut jobs = chain.into_iter().peekable();
    while let Some(job) = jobs.next() {
        let (target, intent, meta) = match job {
            Ok(job) => job,
            Err(error) => {
                results.push(Err(error));
                break;
            }
        };
        let mut group = vec![(intent, meta)];
        while let Some(Ok((_, intent, meta))) =
            jobs.next_if(|job| matches!(job, Ok((next, _, _)) if next.name() == target.name()))
        {
            group.push((intent, meta));
        }
        let group_results = target.apply_chain(&group).await;
        let complete =
            group_results.len() == group.len() && group_results.iter().all(Result::is_ok);
        results.extend(group_results);
        if !complete {
            break;
        }
    }
    results
}

/// The error as the intent's row keeps it, which the agent's outcome shows: the
/// message only, never the [`ApplyError::detail`].
fn error_json(error: &ApplyError, retry_at: Option<i64>) -> Value {
    json!({
        "stage": "apply",
        "kind": match error.kind { ErrorKind::Permanent => "permanent", ErrorKind::Transient => "transient" },
        "op": error.op,
        "code": error.code,
        "message": error.to_string(),
        "retry_at": retry_at,
    })
}

/// Exponential backoff from 100 ms, capped, with ±25% jitter derived from the id and
/// attempt (deterministic per intent, spread across intents).
pub fn backoff_ms(attempts: u32, max_ms: u64, id: &str) -> i64 {
    let base = 100u64
        .saturating_mul(1u64 << attempts.min(20))
        .min(max_ms.max(1));
    let seed = id.bytes().fold(
        u64::from(attempts).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3),
    );
    let jitter = (seed % 51) as i64 - 25; // -25..=25 percent
    let ms = base as i64 + base as i64 * jitter / 100;
    ms.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::SqliteTarget;

    fn job(target: &Arc<dyn Target>, id: &str, table: &str) -> Job {
        let intent: Intent = serde_json::from_value(json!({
            "version": 1, "id": id, "run": "r", "target": target.name(),
            "ops": [{"op": "insert", "table": table, "values": {"id": id}}],
            "reason": "test", "provenance": {"agent": "test"},
        }))
        .unwrap();
        Ok((
            Arc::clone(target),
            intent,
            ApplyMeta::new(format!("sha256:{id}")),
        ))
    }

    #[tokio::test]
    async fn a_chain_is_split_where_its_target_changes_and_stops_at_the_first_error() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| -> Arc<dyn Target> {
            let target = SqliteTarget::open(name, dir.path().join(format!("{name}.db"))).unwrap();
            let conn = rusqlite::Connection::open(target.path()).unwrap();
            conn.execute_batch("CREATE TABLE t(id TEXT PRIMARY KEY)")
                .unwrap();
            Arc::new(target)
        };
        let (a, b) = (open("a"), open("b"));
        let results = apply_chain(vec![
            job(&a, "1", "t"),
            job(&a, "2", "t"),
            job(&b, "3", "t"),
            job(&a, "4", "t"),
        ])
        .await;
        let ids: Vec<&str> = results
            .iter()
            .map(|r| r.as_ref().unwrap().ledger.intent_id.as_str())
            .collect();
        assert_eq!(ids, ["1", "2", "3", "4"]);
        assert!(b.ledger_entry("3").await.unwrap().is_some());
        assert!(a.ledger_entry("4").await.unwrap().is_some());

        // A failure in one group ends the chain: later groups are not tried.
        let results = apply_chain(vec![
            job(&a, "5", "t"),
            job(&a, "6", "missing"),
            job(&b, "7", "t"),
        ])
        .await;
        assert_eq!(results.len(), 2);
        assert!(results[0].is_ok());
        assert_eq!(results[1].as_ref().unwrap_err().kind, ErrorKind::Permanent);
        assert!(b.ledger_entry("7").await.unwrap().is_none());

        // So does a job that cannot be prepared.
        let results = apply_chain(vec![
            job(&b, "8", "t"),
            Err(ApplyError::permanent("unknown target")),
            job(&b, "9", "t"),
        ])
        .await;
        assert_eq!(results.len(), 2);
        assert!(results[1].is_err());
        assert!(b.ledger_entry("9").await.unwrap().is_none());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let a = backoff_ms(0, 30_000, "x");
        let b = backoff_ms(3, 30_000, "x");
        assert!((75..=125).contains(&a), "{a}");
        assert!((600..=1000).contains(&b), "{b}");
        assert!(backoff_ms(40, 30_000, "x") <= 37_500);
        assert!(backoff_ms(40, 30_000, "x") >= 22_500);
    }
}
