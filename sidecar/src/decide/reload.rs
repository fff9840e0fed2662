//! An embedded policy that follows its files: when they change, the new policy is
//! compiled and swapped in; when the new one does not load, the last good one keeps
//! deciding and the reason is logged once.
//!
//! Change detection is a poll, at most every `reload_every`, of the files' *contents*
//! (their identity, a SHA-256 over names and bytes), not of their mtimes: an edit that
//! keeps the size and the mtime, or a ConfigMap update that swaps a symlink, is still
//! seen, and a policy directory is a few kilobytes, so reading it once a second costs
//! nothing measurable. Polling needs no watcher thread and cannot miss an event; the
//! caller (the pipeline, every step) drives it with [`ReloadingPolicy::refresh`].
//!
//! A policy is swapped whole: an evaluation uses one compiled policy from start to
//! end, and every decision names the identity of the one that made it.

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::embedded::Sources;
use super::{Decision, EmbeddedPolicy, PolicyError, PolicySource};

/// An [`EmbeddedPolicy`] reloaded when its files change.
#[derive(Debug)]
pub struct ReloadingPolicy {
    source: PolicySource,
    reload_every: Duration,
    current: RwLock<Arc<EmbeddedPolicy>>,
    watch: Mutex<Watch>,
}

/// What the poller remembers between checks.
#[derive(Debug)]
struct Watch {
    checked_at: Instant,
    /// The identity (or the load error) of the last policy that failed, so a broken
    /// file is reported once, not at every poll.
    last_failure: Option<String>,
}

/// What one [`ReloadingPolicy::refresh`] found.
#[derive(Debug)]
pub enum Reload {
    /// Not checked: the last check was less than the reload interval ago (or the
    /// policy is the built-in one, which never changes).
    NotDue,
    /// The files are those of the policy in use.
    Unchanged,
    /// A new policy was compiled and is now in use.
    Reloaded {
        /// The identity of the policy replaced.
        from: String,
        /// The identity of the policy now deciding.
        to: String,
    },
    /// The files changed but do not load; the policy in use stays. `repeated` is true
    /// when this same failure was already reported (and logged).
    Failed { error: PolicyError, repeated: bool },
}

impl ReloadingPolicy {
    /// Loads the policy; a policy that does not load is an error here (at start-up,
    /// there is no last good policy to keep).
    pub fn load(source: PolicySource, reload_every: Duration) -> Result<Self, PolicyError> {
        let policy = EmbeddedPolicy::load(source.clone())?;
        Ok(Self {
            source,
            reload_every,
            current: RwLock::new(Arc::new(policy)),
            watch: Mutex::new(Watch {
                checked_at: Instant::now(),
                last_failure: None,
            }),
        })
    }

    /// The policy deciding now.
    pub fn current(&self) -> Arc<EmbeddedPolicy> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Evaluates with the policy deciding now (see [`EmbeddedPolicy::evaluate`]).
    pub fn evaluate(&self, input: &serde_json::Value) -> Result<Decision, PolicyError> {
        self.current().evaluate(input)
    }

    /// Checks the files if the reload interval has passed since the last check, and
    /// swaps in the new policy if they changed and load. Logs reloads and failures.
    pub fn refresh(&self) -> Reload {
        {
            let mut watch = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
            if self.source == PolicySource::Default
                || watch.checked_at.elapsed() < self.reload_every
            {
                return Reload::NotDue;
            }
            watch.checked_at = Instant::now();
        }
        self.reload_now()
    }

    /// Checks the files now, whatever the interval.
    pub fn reload_now(&self) -> Reload {
        let outcome = self.try_reload();
        let mut watch = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
        watch.checked_at = Instant::now();
        match outcome {
            Ok(None) => {
                watch.last_failure = None;
                Reload::Unchanged
            }
            Ok(Some((from, to))) => {
                watch.last_failure = None;
                info!(message = "policy reloaded", from = %from, to = %to);
                Reload::Reloaded { from, to }
            }
            Err((key, error)) => {
                let repeated = watch.last_failure.as_deref() == Some(key.as_str());
                if !repeated {
                    warn!(
                        message = "policy files changed but do not load; the last good policy keeps deciding",
                        keeping = %self.current().identity(),
                        %error,
                    );
                    watch.last_failure = Some(key);
                }
                Reload::Failed { error, repeated }
            }
        }
    }

    /// Reads the sources; compiles and swaps them in if their identity is new.
    /// Errors carry a key identifying the failure (to report it once).
    fn try_reload(&self) -> Result<Option<(String, String)>, (String, PolicyError)> {
        let sources = Sources::of(&self.source).map_err(|e| (e.to_string(), e))?;
        let identity = sources.identity();
        let current = self.current();
        if identity == current.identity() {
            return Ok(None);
        }
        let policy = EmbeddedPolicy::compile(sources).map_err(|e| (identity, e))?;
        let to = policy.identity().to_owned();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(policy);
        Ok(Some((current.identity().to_owned(), to)))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use serde_json::json;

    use super::*;
    use crate::lifecycle::Verdict;

    fn input() -> serde_json::Value {
        json!({"version": 1, "ops": [{"index": 0, "kind": "insert", "table": "t",
               "schema": null, "name": "t", "columns": []}]})
    }

    #[test]
    fn follows_changes_and_keeps_the_last_good_policy() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.rego");
        fs::write(&file, "package airlock.authz\n\nallow := true\n").unwrap();
        let policy =
            ReloadingPolicy::load(PolicySource::Path(dir.path().to_owned()), Duration::ZERO)
                .unwrap();
        let first = policy.current().identity().to_owned();
        assert_eq!(policy.evaluate(&input()).unwrap().verdict, Verdict::Allow);
        assert!(matches!(policy.refresh(), Reload::Unchanged));

        // Same length, so an mtime+size poll with coarse clocks could miss it.
        fs::write(&file, "package airlock.authz\n\nallow := false\n").unwrap();
        match policy.refresh() {
            Reload::Reloaded { from, to } => {
                assert_eq!(from, first);
                assert_eq!(to, policy.current().identity());
            }
            other => panic!("expected a reload, got {other:?}"),
        }
        let decision = policy.evaluate(&input()).unwrap();
        assert_eq!(decision.verdict, Verdict::Deny);
        assert_eq!(decision.policy, policy.current().identity());
        let good = decision.policy;

        // A broken edit: reported once, the last good policy keeps deciding.
        fs::write(&file, "package airlock.authz\n\nallow if {\n").unwrap();
        match policy.refresh() {
            Reload::Failed { error, repeated } => {
                assert!(!repeated);
                assert!(matches!(error, PolicyError::Compile { ref file, .. } if file == "p.rego"));
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        assert!(matches!(
            policy.refresh(),
            Reload::Failed { repeated: true, .. }
        ));
        assert_eq!(policy.evaluate(&input()).unwrap().policy, good);

        // Fixed again: picked up.
        fs::write(&file, "package airlock.authz\n\nallow := true\n").unwrap();
        assert!(matches!(policy.refresh(), Reload::Reloaded { .. }));
        assert_eq!(policy.current().identity(), first);
        assert_eq!(policy.evaluate(&input()).unwrap().verdict, Verdict::Allow);

        // The directory disappears: a load failure, the policy stays.
        drop(dir);
        assert!(matches!(
            policy.refresh(),
            Reload::Failed {
                error: PolicyError::Load { .. },
                ..
            }
        ));
        assert_eq!(policy.current().identity(), first);
    }

    #[test]
    fn checks_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("p.rego"), "package airlock.authz\n").unwrap();
        let policy = ReloadingPolicy::load(
            PolicySource::Path(dir.path().to_owned()),
            Duration::from_secs(3600),
        )
        .unwrap();
        fs::write(
            dir.path().join("q.rego"),
            "package airlock.authz\n\nallow := true\n",
        )
        .unwrap();
        assert!(matches!(policy.refresh(), Reload::NotDue));
        assert!(matches!(policy.reload_now(), Reload::Reloaded { .. }));

        let builtin = ReloadingPolicy::load(PolicySource::Default, Duration::ZERO).unwrap();
        assert!(matches!(builtin.refresh(), Reload::NotDue));
    }
}
