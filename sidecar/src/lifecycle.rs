//! The intent lifecycle: a pure state machine, no I/O.
//!
//! ```text
//! received ─▶ invalid (terminal; reason returned to the agent)
//!    │
//!    ▼
//! queued ─▶ denied (terminal); failed when its names do not resolve
//!    │  ╲
//!    │   ▶ awaiting_review ─▶ rejected | expired (terminal)
//!    ▼          │
//! approved ◀────┘
//!    │
//!    ├──▶ applied ─▶ undone
//!    │
//!    ├──▶ failed (terminal for permanent errors; transient errors stay approved
//!    │            and retry)
//!    │
//!    └──▶ awaiting_review (rows changed since review; its approvals void)
//! ```
//!
//! There is no `applying` state: an intent's target transaction (its writes and
//! its ledger row) is one commit, and the queue records its result after it, so an
//! intent in flight is `approved` on disk. After a crash in between, the target's
//! ledger says whether it committed ([`Event::ApplySucceeded`] from `approved`).
//!
//! An approval binds the rows the reviewers saw in the preview (DESIGN invariant
//! 3): when the apply finds the rows it touches changed since, the intent takes
//! [`Event::RowsChanged`] back to `awaiting_review` instead of failing.
//!
//! Adapters (intake, queue, policy, targets, review) never set a state directly:
//! they feed an [`Event`] to [`State::next`], which returns the next state or an
//! [`IllegalTransition`]. Files that never became an intent (unparsable, invalid,
//! conflicting) are refused at intake and never enter this machine.
//!
//! The policy's [`Verdict`] and [`Decision`] live here too: plain values the queue
//! stores, the decide stage makes and outcomes show, at the bottom of the import
//! order (see the crate docs).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where an intent is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Durably queued, waiting for a policy decision.
    Queued,
    /// The policy denied it (terminal).
    Denied,
    /// The policy asked for human review; waiting for approvers.
    AwaitingReview,
    /// An approver rejected it (terminal).
    Rejected,
    /// Its review timed out (terminal).
    Expired,
    /// Allowed by policy or approved by reviewers; waiting to apply (or being
    /// applied: its target transaction is in flight).
    Approved,
    /// Its writes are committed in the target (with its ledger row).
    Applied,
    /// The target refused it for good (terminal).
    Failed,
    /// Its writes were reverted from the undo images.
    Undone,
}

impl State {
    /// Every state, in lifecycle order.
    pub const ALL: [State; 9] = [
        State::Queued,
        State::AwaitingReview,
        State::Approved,
        State::Applied,
        State::Denied,
        State::Rejected,
        State::Expired,
        State::Failed,
        State::Undone,
    ];

    /// The state's name on the wire and on disk.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Denied => "denied",
            State::AwaitingReview => "awaiting_review",
            State::Rejected => "rejected",
            State::Expired => "expired",
            State::Approved => "approved",
            State::Applied => "applied",
            State::Failed => "failed",
            State::Undone => "undone",
        }
    }

    /// Whether no further event can move the intent on its own (undo of an applied
    /// intent is an operator action, so `applied` counts as final for the agent).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            State::Denied
                | State::Rejected
                | State::Expired
                | State::Applied
                | State::Failed
                | State::Undone
        )
    }

    /// Whether an intent in this state holds back the later intents of its run
    /// (DESIGN invariant 7): it may still be applied, so nothing after it may go first.
    pub fn blocks_run(self) -> bool {
        matches!(
            self,
            State::Queued | State::AwaitingReview | State::Approved
        )
    }

    /// The state `event` leads to, or why it cannot happen.
    pub fn next(self, event: &Event) -> Result<State, IllegalTransition> {
        use State::*;
        let next = match (self, event) {
            (Queued, Event::Decided(Verdict::Allow)) => Approved,
            (Queued, Event::Decided(Verdict::Deny)) => Denied,
            (Queued, Event::Decided(Verdict::Review { .. })) => AwaitingReview,
            // Its names do not resolve in the target: it fails before any policy.
            (Queued, Event::Unresolvable) => Failed,
            (AwaitingReview, Event::Approval { quorum_met: false }) => AwaitingReview,
            (AwaitingReview, Event::Approval { quorum_met: true }) => Approved,
            (AwaitingReview, Event::Rejection) => Rejected,
            (AwaitingReview, Event::Expiry) => Expired,
            // The target committed it (or its ledger already holds it).
            (Approved, Event::ApplySucceeded) => Applied,
            (Approved, Event::ApplyFailed { permanent: true }) => Failed,
            // A transient failure: it stays approved and is retried.
            (Approved, Event::ApplyFailed { permanent: false }) => Approved,
            // The rows changed since the reviewers saw them: review again.
            (Approved, Event::RowsChanged) => AwaitingReview,
            (Applied, Event::Undo) => Undone,
            (from, event) => {
                return Err(IllegalTransition {
                    from,
                    event: event.name(),
                });
            }
        };
        Ok(next)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for State {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// A state name that is not one of [`State::ALL`] (a corrupt or newer queue).
#[derive(Debug, thiserror::Error)]
#[error("unknown intent state {0:?}")]
pub struct UnknownState(pub String);

/// The policy's verdict on an intent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    /// Human review, needing this many distinct approvers.
    Review {
        approvals: u32,
    },
}

/// The policy's answer for one intent: its [`Verdict`] and why. On the wire the
/// verdict is flattened in: `{"verdict": "review", "approvals": 1, "reasons": [...],
/// "policy": "sha256:…", "decision_id": null}`. The `decide` stage makes decisions
/// (`Decision::from_result` reads a policy's result document); the queue stores
/// them and outcomes show them, so the type lives here, below all three.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Allow, deny, or review with the number of approvals needed.
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Why, in the policy's words; never empty for deny and review.
    pub reasons: Vec<String>,
    /// Which policy decided: for embedded Rego, `sha256:<hex>` over the policy's files
    /// (see `decide::EmbeddedPolicy::identity`), so a decision can be traced to exact
    /// sources; for a remote OPA, the URL asked.
    pub policy: String,
    /// The decision id a remote engine (OPA's decision log) gave; with Airlock's own
    /// decision log on (`[telemetry] decision_log`), a fresh one when the engine gave
    /// none, so every logged decision can be found in the run log.
    pub decision_id: Option<String>,
}

/// Something that happens to an intent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The policy decided.
    Decided(Verdict),
    /// Its tables or columns do not resolve in the target's catalog (missing, not
    /// a table, a system catalog): nothing for a policy to decide on.
    Unresolvable,
    /// One approver approved; `quorum_met` once enough distinct approvers have.
    Approval { quorum_met: bool },
    /// An approver rejected (one rejection rejects).
    Rejection,
    /// The review outlived its time to live.
    Expiry,
    /// Its target transaction committed (or the ledger shows it already had).
    ApplySucceeded,
    /// Its target transaction failed; after a transient failure it stays `approved`.
    ApplyFailed { permanent: bool },
    /// Its writes were reverted.
    Undo,
    /// At apply, the rows it touches were not those its reviewers approved.
    RowsChanged,
}

impl Event {
    /// A short name for messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Decided(_) => "decided",
            Event::Unresolvable => "unresolvable",
            Event::Approval { .. } => "approval",
            Event::Rejection => "rejection",
            Event::Expiry => "expiry",
            Event::ApplySucceeded => "apply_succeeded",
            Event::ApplyFailed { .. } => "apply_failed",
            Event::Undo => "undo",
            Event::RowsChanged => "rows_changed",
        }
    }
}

/// An event that cannot happen in the given state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("intent in state {from} cannot take event {event}")]
pub struct IllegalTransition {
    pub from: State,
    pub event: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn happy_paths() {
        let allowed = State::Queued.next(&Event::Decided(Verdict::Allow)).unwrap();
        assert_eq!(allowed, State::Approved);
        assert_eq!(
            allowed
                .next(&Event::ApplyFailed { permanent: false })
                .unwrap(),
            State::Approved,
            "a transient failure retries"
        );
        assert_eq!(
            allowed.next(&Event::ApplySucceeded).unwrap(),
            State::Applied
        );
        assert_eq!(
            State::Queued
                .next(&Event::Decided(Verdict::Review { approvals: 2 }))
                .unwrap(),
            State::AwaitingReview
        );
        assert_eq!(
            State::AwaitingReview
                .next(&Event::Approval { quorum_met: false })
                .unwrap(),
            State::AwaitingReview
        );
        assert_eq!(
            State::AwaitingReview
                .next(&Event::Approval { quorum_met: true })
                .unwrap(),
            State::Approved
        );
    }

    #[test]
    fn final_states_take_no_lifecycle_events() {
        for state in State::ALL.into_iter().filter(|s| s.is_final()) {
            for event in [
                Event::Decided(Verdict::Allow),
                Event::Unresolvable,
                Event::Approval { quorum_met: true },
                Event::Rejection,
                Event::Expiry,
                Event::ApplySucceeded,
                Event::ApplyFailed { permanent: true },
                Event::ApplyFailed { permanent: false },
                Event::RowsChanged,
            ] {
                assert!(state.next(&event).is_err(), "{state} took {event:?}");
            }
        }
    }

    #[test]
    fn no_write_without_a_decision() {
        // Only `approved` may finish an apply, one way or the other.
        for state in State::ALL {
            for event in [
                Event::ApplySucceeded,
                Event::ApplyFailed { permanent: true },
                Event::ApplyFailed { permanent: false },
            ] {
                let can = state.next(&event).is_ok();
                assert_eq!(can, state == State::Approved, "{state} took {event:?}");
            }
        }
    }

    #[test]
    fn changed_rows_send_an_approved_intent_back_to_review() {
        for state in State::ALL {
            let next = state.next(&Event::RowsChanged);
            if state == State::Approved {
                assert_eq!(next.unwrap(), State::AwaitingReview, "{state}");
            } else {
                assert!(next.is_err(), "{state} took rows_changed");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for state in State::ALL {
            assert_eq!(state.as_str().parse::<State>().unwrap(), state);
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
        assert!("bogus".parse::<State>().is_err());
        // No state the queue never writes (issue 11): an intent in flight is approved.
        assert!("applying".parse::<State>().is_err());
    }
}
