//! Prometheus metrics: one process-wide registry and the handles every stage bumps.
//!
//! The stages count what happens as it happens (an intent received, a decision, an
//! apply error), through [`global`], so no constructor has to carry a handle; the
//! queue counts state changes only once their transaction commits. What is a level
//! rather than an event (queue depth, the oldest review's age, checkpoint lag,
//! target connections in use) is set by the metrics listener (`probes`) from the
//! queue and the targets just before each scrape, so it is never stale.
//!
//! Names follow Prometheus conventions: the `airlock_` prefix, base units
//! (`_seconds`), `_total` on counters (the encoder adds it). No label takes a value
//! the agent chooses freely: states and verdicts are fixed sets, target names come
//! from the configuration, and apply error codes are database codes (SQLSTATEs,
//! SQLite result code names, Airlock's own `AIRLOCK_*` codes) of a fixed shape, at
//! most [`MAX_ERROR_CODES`] distinct ones, anything else counted as `other`.
//!
//! The text is OpenMetrics 1.0 (`application/openmetrics-text`), which Prometheus
//! scrapes natively.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::lifecycle::{State, Verdict};

/// Most distinct apply error codes labelled; later new codes count as `other`.
pub const MAX_ERROR_CODES: usize = 64;

/// Bucket bounds of the stage latency histograms, in seconds: from a fast allow
/// (milliseconds) to a review that waited a day.
const STAGE_BUCKETS: [f64; 18] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3_600.0, 14_400.0, 86_400.0,
];

/// A label set of one label.
type Label = [(&'static str, String); 1];

/// A histogram family keyed by one label, its buckets fixed.
type Histograms = Family<Label, Histogram, fn() -> Histogram>;

fn stage_histogram() -> Histogram {
    Histogram::new(STAGE_BUCKETS)
}

/// The stages whose latency is measured (`airlock_stage_duration_seconds{stage}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// From admission to the policy's verdict.
    ReceivedToDecided,
    /// From the decision that let it through (allow, or the approval that met the
    /// quorum) to its commit in the target.
    DecidedToApplied,
    /// From admission to a final state.
    ReceivedToFinal,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::ReceivedToDecided => "received_to_decided",
            Stage::DecidedToApplied => "decided_to_applied",
            Stage::ReceivedToFinal => "received_to_final",
        }
    }
}

/// The daemon's loops, which each beat a heartbeat (`/healthz`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loop {
    /// The intake thread (scans the intent directory).
    Intake,
    /// The pipeline thread (decides, applies, writes outcomes).
    Pipeline,
}

impl Loop {
    /// Every loop.
    pub const ALL: [Loop; 2] = [Loop::Intake, Loop::Pipeline];

    /// Its name in `/healthz` answers.
    pub fn as_str(self) -> &'static str {
        match self {
            Loop::Intake => "intake",
            Loop::Pipeline => "pipeline",
        }
    }
}

/// Something the queue saw happen in a committed transaction.
#[derive(Clone, Debug, PartialEq)]
pub enum Observation {
    /// An intent was admitted.
    Received,
    /// The policy decided an intent `seconds` after it was received.
    Decided { verdict: Verdict, seconds: f64 },
    /// An intent reached a final state `seconds` after it was received.
    Ended { state: State, seconds: f64 },
    /// An intent was applied `seconds` after the decision that let it through.
    Applied { seconds: f64 },
}

/// The registry and every metric's handle. Cheap to bump from any thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    received: Counter,
    ended: Family<Label, Counter>,
    decisions: Family<Label, Counter>,
    apply_errors: Family<Label, Counter>,
    error_codes: Mutex<BTreeSet<String>>,
    policy_errors: Counter,
    spans_dropped: Counter,
    queue_depth: Family<Label, Gauge>,
    review_oldest_age: Gauge<f64, AtomicU64>,
    checkpoint_lag: Gauge,
    pool_in_use: Family<Label, Gauge>,
    stages: Histograms,
    heartbeats: [AtomicI64; 2],
}

/// The process's metrics, created on first use.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered (tests; the daemon uses
    /// [`global`]).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("airlock");
        let received = Counter::default();
        registry.register(
            "intents_received",
            "Intents admitted to the queue",
            received.clone(),
        );
        let ended = Family::<Label, Counter>::default();
        registry.register(
            "intents_ended",
            "Intents that reached a final state, by that state",
            ended.clone(),
        );
        let decisions = Family::<Label, Counter>::default();
        registry.register(
            "decisions",
            "Policy decisions, by verdict (allow, deny, review)",
            decisions.clone(),
        );
        let apply_errors = Family::<Label, Counter>::default();
        registry.register(
            "apply_errors",
            "Failed target transactions, transient or permanent, by database or Airlock \
             error code (none when the error had no code, other past the label limit)",
            apply_errors.clone(),
        );
        let policy_errors = Counter::default();
        registry.register(
            "policy_errors",
            "Times the policy could not decide (unreachable, timed out, bad answer)",
            policy_errors.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "spans_dropped",
            "Trace spans dropped instead of exported",
            spans_dropped.clone(),
        );
        let queue_depth = Family::<Label, Gauge>::default();
        registry.register(
            "queue_depth",
            "Intents not yet final, by state (queued, awaiting_review, approved)",
            queue_depth.clone(),
        );
        let review_oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "review_oldest_age",
            "Age of the oldest intent awaiting review, since it was received (0 when none)",
            Unit::Seconds,
            review_oldest_age.clone(),
        );
        let checkpoint_lag = Gauge::default();
        registry.register(
            "checkpoint_lag_records",
            "Run-log records not yet covered by a signed checkpoint, over all runs",
            checkpoint_lag.clone(),
        );
        let pool_in_use = Family::<Label, Gauge>::default();
        registry.register(
            "target_pool_in_use",
            "Database connections in use, by configured target (server targets only)",
            pool_in_use.clone(),
        );
        let stages: Histograms = Family::new_with_constructor(stage_histogram);
        registry.register_with_unit(
            "stage_duration",
            "Time between two points of an intent's life, by stage",
            Unit::Seconds,
            stages.clone(),
        );
        // Every fixed label value shows from the start, at 0, so that a rate or an
        // alert over it has a series before the first event.
        for verdict in ["allow", "deny", "review"] {
            let _ = decisions.get_or_create(&label("verdict", verdict));
        }
        for state in State::ALL
            .into_iter()
            .filter(|s| s.is_final() && *s != State::Undone)
        {
            let _ = ended.get_or_create(&label("state", state.as_str()));
        }
        for stage in [
            Stage::ReceivedToDecided,
            Stage::DecidedToApplied,
            Stage::ReceivedToFinal,
        ] {
            let _ = stages.get_or_create(&label("stage", stage.as_str()));
        }
        Self {
            registry,
            received,
            ended,
            decisions,
            apply_errors,
            error_codes: Mutex::new(BTreeSet::new()),
            policy_errors,
            spans_dropped,
            queue_depth,
            review_oldest_age,
            checkpoint_lag,
            pool_in_use,
            stages,
            heartbeats: [AtomicI64::new(0), AtomicI64::new(0)],
        }
    }

    /// Counts what a committed queue transaction did.
    pub fn observe(&self, observation: &Observation) {
        match observation {
            Observation::Received => {
                self.received.inc();
            }
            Observation::Decided { verdict, seconds } => {
                let verdict = match verdict {
                    Verdict::Allow => "allow",
                    Verdict::Deny => "deny",
                    Verdict::Review { .. } => "review",
                };
                self.decisions
                    .get_or_create(&label("verdict", verdict))
                    .inc();
                self.stage(Stage::ReceivedToDecided, *seconds);
            }
            Observation::Ended { state, seconds } => {
                self.ended
                    .get_or_create(&label("state", state.as_str()))
                    .inc();
                self.stage(Stage::ReceivedToFinal, *seconds);
            }
            Observation::Applied { seconds } => self.stage(Stage::DecidedToApplied, *seconds),
        }
    }

    fn stage(&self, stage: Stage, seconds: f64) {
        self.stages
            .get_or_create(&label("stage", stage.as_str()))
            .observe(seconds.max(0.0));
    }

    /// Counts a failed target transaction with its error code, if any.
    pub fn apply_error(&self, code: Option<&str>) {
        let code = match code {
            None => "none".to_owned(),
            Some(code) if !is_code(code) => "other".to_owned(),
            Some(code) => {
                let mut seen = match self.error_codes.lock() {
                    Ok(seen) => seen,
                    Err(poisoned) => poisoned.into_inner(),
                };
                if seen.contains(code) || seen.len() < MAX_ERROR_CODES {
                    seen.insert(code.to_owned());
                    code.to_owned()
                } else {
                    "other".to_owned()
                }
            }
        };
        self.apply_errors.get_or_create(&label("code", &code)).inc();
    }

    /// Counts a policy that could not decide.
    pub fn policy_error(&self) {
        self.policy_errors.inc();
    }

    /// The `airlock_spans_dropped_total` counter, for the trace exporter to bump.
    pub fn spans_dropped(&self) -> Counter {
        self.spans_dropped.clone()
    }

    /// Sets how many intents are in `state` (one of the states that are not final).
    pub fn set_queue_depth(&self, state: State, count: i64) {
        self.queue_depth
            .get_or_create(&label("state", state.as_str()))
            .set(count);
    }

    /// Sets the age of the oldest intent awaiting review.
    pub fn set_review_oldest_age(&self, seconds: f64) {
        self.review_oldest_age.set(seconds.max(0.0));
    }

    /// Sets how many run-log records no checkpoint covers yet.
    pub fn set_checkpoint_lag(&self, records: i64) {
        self.checkpoint_lag.set(records);
    }

    /// Sets how many of `target`'s pooled connections are in use.
    pub fn set_pool_in_use(&self, target: &str, connections: i64) {
        self.pool_in_use
            .get_or_create(&label("target", target))
            .set(connections);
    }

    /// Notes that `which` loop is alive at `now_ms`.
    pub fn heartbeat(&self, which: Loop, now_ms: i64) {
        self.heartbeats[which as usize].store(now_ms, Ordering::Relaxed);
    }

    /// When `which` loop last beat, in ms since the epoch (0: never).
    pub fn last_heartbeat(&self, which: Loop) -> i64 {
        self.heartbeats[which as usize].load(Ordering::Relaxed)
    }

    /// The OpenMetrics text of every metric, ending in `# EOF`.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

fn label(key: &'static str, value: &str) -> Label {
    [(key, value.to_owned())]
}

/// Whether `code` has the shape of a code the targets report: a five-character
/// SQLSTATE (`23505`), or an upper-case name (`SQLITE_CONSTRAINT_UNIQUE`,
/// `AIRLOCK_ROWS_CHANGED`) of at most 48 characters.
fn is_code(code: &str) -> bool {
    let sqlstate = code.len() == 5
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    let name = (1..=48).contains(&code.len())
        && code
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    sqlstate || name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_stages_show_in_the_text() {
        let metrics = Metrics::new();
        metrics.observe(&Observation::Received);
        metrics.observe(&Observation::Decided {
            verdict: Verdict::Review { approvals: 2 },
            seconds: 0.2,
        });
        metrics.observe(&Observation::Ended {
            state: State::Denied,
            seconds: 1.0,
        });
        metrics.spans_dropped().inc_by(3);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("airlock_intents_received_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("airlock_decisions_total{verdict=\"review\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("airlock_intents_ended_total{state=\"denied\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("airlock_spans_dropped_total 3\n"), "{text}");
        assert!(
            text.contains(
                "airlock_stage_duration_seconds_count{stage=\"received_to_decided\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn error_codes_are_bounded() {
        let metrics = Metrics::new();
        metrics.apply_error(Some("23505"));
        metrics.apply_error(Some("drop table\n"));
        metrics.apply_error(None);
        for n in 0..MAX_ERROR_CODES + 5 {
            metrics.apply_error(Some(&format!("CODE_{n}")));
        }
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("airlock_apply_errors_total{code=\"23505\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("airlock_apply_errors_total{code=\"none\"} 1\n"),
            "{text}"
        );
        // One malformed code and the 6 past the limit (23505 took one place).
        assert!(
            text.contains("airlock_apply_errors_total{code=\"other\"} 7\n"),
            "{text}"
        );
        assert!(!text.contains("drop table"), "{text}");
    }
}
