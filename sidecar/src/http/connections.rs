//! The review endpoint's connection slots: who keeps a connection when they are all
//! taken.
//!
//! The agent shares the pod's loopback, so it can open as many connections as it
//! likes from the same address an approver's port-forward uses; a per-address cap
//! cannot tell them apart (nor can it behind an ingress, where every approver has the
//! ingress's address). Refusing new connections at the cap would let a hoarder keep
//! approvers out for as long as it hoards. So the endpoint makes room instead: when
//! every slot is taken, it closes the connection that has gone longest
//! without a reviewer's request in flight (in the TLS handshake, waiting for a
//! request head, idle between requests, or serving a request without a valid
//! credential) and gives the new connection its slot. A fresh connection therefore
//! always gets in, and an approver who sends a request at once is served; only
//! requests that carry a current reviewer's token or session hold their connection
//! against newcomers, for as long as their response (an event stream included) is
//! being sent. The agent holds no credential, so it can hold no slot for long.
//!
//! What the agent can still do is reconnect as fast as the endpoint accepts, so
//! that each connection keeps its slot only while a limit's worth of newer ones
//! arrive. A client that sends its request head on connecting is unaffected (its
//! head is read before the accept loop takes more than a few dozen others, see
//! `ACCEPT_BURST`); a TLS handshake takes round trips, so the limit
//! ([`super::MAX_CONNECTIONS`]) is sized for a handshake to finish well within that.
//!
//! [`victim`] is the choice, a plain function; [`Slots`] keeps the live connections
//! and closes the chosen one by aborting its task (which drops its socket).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::task::{AbortHandle, Id};

/// What a connection is doing, as far as keeping it is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// In the TLS handshake, waiting for a request head, or idle between requests.
    Waiting,
    /// Serving a request without a current reviewer's credential.
    Anonymous,
    /// Serving a reviewer's request, until its whole response is sent.
    Reviewer,
}

impl Phase {
    /// Whether a connection in this phase may be closed to make room.
    pub fn evictable(self) -> bool {
        !matches!(self, Self::Reviewer)
    }
}

/// One connection's phase and since when, set by its task and read by the accept
/// loop when the endpoint is full.
#[derive(Debug)]
pub struct Slot(Mutex<(Phase, Instant)>);

impl Slot {
    /// A slot for a connection accepted now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new((Phase::Waiting, Instant::now()))))
    }

    // The state is a plain copy, whole after any panic: a poisoned lock still holds it.
    fn get(&self) -> (Phase, Instant) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, phase: Phase) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = (phase, Instant::now());
    }

    /// Marks the connection as serving a request (a reviewer's if `reviewer`); it is
    /// waiting again once the returned guard drops, with its response.
    pub fn serving(self: &Arc<Self>, reviewer: bool) -> Serving {
        self.set(if reviewer {
            Phase::Reviewer
        } else {
            Phase::Anonymous
        });
        Serving(self.clone())
    }
}

/// A request in flight on a connection; dropping it marks the connection waiting.
#[derive(Debug)]
pub struct Serving(Arc<Slot>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.set(Phase::Waiting);
    }
}

/// The connection to close to make room: of those that may be closed, the one that
/// has been in its phase longest (ties: any). `None` when every connection is
/// serving a reviewer.
pub fn victim<K>(connections: impl IntoIterator<Item = (K, Phase, Instant)>) -> Option<K> {
    connections
        .into_iter()
        .filter(|(_, phase, _)| phase.evictable())
        .min_by_key(|(_, _, since)| *since)
        .map(|(key, ..)| key)
}

/// The connections being served, by the id of the task serving each.
#[derive(Debug, Default)]
pub struct Slots {
    live: HashMap<Id, (Arc<Slot>, AbortHandle)>,
}

impl Slots {
    /// How many connections are being served.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Records the connection `task` serves.
    pub fn insert(&mut self, slot: Arc<Slot>, task: AbortHandle) {
        self.live.insert(task.id(), (slot, task));
    }

    /// Forgets a connection whose task ended.
    pub fn remove(&mut self, task: Id) {
        self.live.remove(&task);
    }

    /// Closes the connection [`victim`] picks. Returns whether there was one.
    pub fn evict(&mut self) -> bool {
        let chosen = victim(self.live.iter().map(|(id, (slot, _))| {
            let (phase, since) = slot.get();
            (*id, phase, since)
        }));
        let Some((_, task)) = chosen.and_then(|id| self.live.remove(&id)) else {
            return false;
        };
        task.abort();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_longest_waiting_connection_goes_first_and_reviewers_never() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let connections = [
            ("reviewer, oldest", Phase::Reviewer, at(0)),
            ("idle", Phase::Waiting, at(20)),
            ("anonymous request", Phase::Anonymous, at(10)),
            ("fresh", Phase::Waiting, at(30)),
        ];
        assert_eq!(victim(connections), Some("anonymous request"));
        assert_eq!(
            victim(connections[1..].iter().copied().rev()),
            Some("anonymous request")
        );
        assert_eq!(victim([connections[1], connections[3]]), Some("idle"));
        assert_eq!(victim([connections[0]]), None);
        assert_eq!(victim::<&str>([]), None);
    }

    #[test]
    fn a_request_holds_its_phase_until_its_guard_drops() {
        let slot = Slot::new();
        assert_eq!(slot.get().0, Phase::Waiting);
        let serving = slot.serving(true);
        assert_eq!(slot.get().0, Phase::Reviewer);
        drop(serving);
        assert_eq!(slot.get().0, Phase::Waiting);
        let serving = slot.serving(false);
        assert_eq!(slot.get().0, Phase::Anonymous);
        drop(serving);
        assert_eq!(slot.get().0, Phase::Waiting);
    }

    #[tokio::test]
    async fn eviction_aborts_the_chosen_task_and_spares_reviewers() {
        let mut tasks = tokio::task::JoinSet::new();
        let mut slots = Slots::default();
        let reviewer = Slot::new();
        let _serving = reviewer.serving(true);
        let idle = Slot::new();
        let reviewer_task = tasks.spawn(std::future::pending::<()>());
        let idle_task = tasks.spawn(std::future::pending::<()>());
        slots.insert(reviewer, reviewer_task.clone());
        slots.insert(idle, idle_task.clone());

        assert!(slots.evict());
        assert_eq!(slots.len(), 1);
        let ended = tasks.join_next_with_id().await.unwrap().unwrap_err();
        assert!(ended.is_cancelled() && ended.id() == idle_task.id());
        assert!(!slots.evict(), "a reviewer's connection is never closed");
        assert!(!reviewer_task.is_finished());
        slots.remove(reviewer_task.id());
        assert!(slots.is_empty());
    }
}
