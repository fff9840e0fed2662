//! The daemon: wires intake, the pipeline and their timers together, and stops them
//! cleanly.
//!
//! Two threads do the work, each with its own queue connection: intake (scans on
//! every file-system hint, on a timer and at start) and the pipeline (decide, apply,
//! outcomes). SQLite and the SQLite target are blocking, so plain threads are the
//! honest shape; async targets run on the tokio runtime through its handle.
//!
//! Shutdown (SIGTERM, SIGINT): intake stops first, so no new file is taken; the
//! pipeline finishes the step in flight (each apply is one target transaction that
//! either commits or not), writes pending outcomes and stops. If that takes longer
//! than the grace period the daemon exits anyway: anything unfinished is still in
//! the queue, and the ledger makes a repeated apply a no-op.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use notify::Watcher;
use tracing::{error, info, warn};

use crate::apply::{self, Target};
use crate::config::{self, Config};
use crate::decide::{Policy, PolicyOptions};
#[cfg(feature = "review")]
use crate::http::{self, Endpoint};
use crate::intake::Intake;
use crate::outcome::Outcomes;
use crate::pipeline::Pipeline;
use crate::queue::{CheckpointPolicy, Queue};
use crate::seal::Sealer;

/// How often the pipeline looks at the queue when nothing woke it: reviews decided by
/// another process (`airlock approve`), retries whose backoff ended, expiring reviews.
const TICK: Duration = Duration::from_millis(200);

/// Why the daemon could not start.
///
/// Each message includes its cause, so no variant also gives it as `source()`: an
/// error-chain printer (anyhow's `{:#}`) would show it twice.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create directory {path}: {error}")]
    Dir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("state directory {path}: {error}")]
    State {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("results directory {path}: {error}")]
    Results {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("target {name}: {message}")]
    Target { name: String, message: String },
    #[error("policy: {0}")]
    Policy(String),
    #[error(transparent)]
    Key(#[from] crate::seal::SealError),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    #[cfg(feature = "review")]
    #[error(transparent)]
    Endpoint(#[from] crate::http::EndpointError),
}

enum Message {
    Wake,
    Stop,
}

/// Everything the daemon runs, built from the configuration before anything starts.
#[derive(Debug)]
pub struct Resources {
    pub config: Config,
    pub policy: Arc<Policy>,
    pub targets: BTreeMap<String, Arc<dyn Target>>,
    pub sealer: Arc<Sealer>,
    /// The results directory, opened and checked.
    pub outcomes: Outcomes,
}

impl Resources {
    /// Opens targets, loads the policy and creates directories. Fails before anything
    /// runs, with a message naming what is wrong.
    pub fn open(config: Config) -> Result<Self, StartError> {
        // The state directory first: the results directory is checked against it.
        crate::state::prepare(&config.state).map_err(|error| StartError::State {
            path: config.state.clone(),
            error,
        })?;
        std::fs::create_dir_all(&config.intents).map_err(|error| StartError::Dir {
            path: config.intents.clone(),
            error,
        })?;
        let results = config.results_dir();
        let outcomes = Outcomes::open(results.clone(), &config.state).map_err(|error| {
            StartError::Results {
                path: results,
                error,
            }
        })?;
        Queue::open(&config.state)?;
        // SQLite targets kept in the state directory (the default one) are private
        // like every other file there: created 0600 before SQLite opens them.
        for url in config.targets.values() {
            let Some(path) = crate::state::sqlite_path(url) else {
                continue;
            };
            if in_state_dir(&path, &config.state) {
                crate::state::private_file(&path).map_err(|error| StartError::State {
                    path: path.clone(),
                    error,
                })?;
            }
        }
        let mut targets = BTreeMap::new();
        for (name, url) in &config.targets {
            let target = apply::open(name, url).map_err(|e| StartError::Target {
                name: name.clone(),
                message: e.to_string(),
            })?;
            targets.insert(name.clone(), target);
        }
        let policy = Policy::new(&policy_options(&config.policy))
            .map_err(|e| StartError::Policy(e.to_string()))?;
        let sealer = load_key(&config)?;
        Ok(Self {
            config,
            policy: Arc::new(policy),
            targets,
            sealer: Arc::new(sealer),
            outcomes,
        })
    }
}

/// The options the `[policy]` configuration section gives the decide stage.
pub fn policy_options(config: &config::Policy) -> PolicyOptions {
    PolicyOptions {
        path: config.path.clone(),
        url: config.url.clone(),
        bearer_token_file: config.bearer_token_file.clone(),
        timeout: Duration::from_millis(config.timeout_ms),
        connect_timeout: Duration::from_millis(config.connect_timeout_ms),
        concurrency: config.concurrency,
        reload: Duration::from_millis(config.reload_ms),
    }
}

/// Whether the file `path` would be created directly in the state directory `state`.
fn in_state_dir(path: &std::path::Path, state: &std::path::Path) -> bool {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => std::path::Path::new("."),
    };
    match (parent.canonicalize(), state.canonicalize()) {
        (Ok(parent), Ok(state)) => parent == state,
        _ => false,
    }
}

/// Checks every target's database role ([`Target::check_role`]): one with powers
/// beyond applying stops start-up unless `[apply] allow_privileged_role` is set. A
/// target that cannot be reached now is not a reason to refuse (it may come up
/// later); it checks its role on its first connection and applies nothing until
/// the role passes. With `reachable` (`airlock run --check`), it is refused too.
pub async fn check_targets(
    config: &Config,
    targets: &BTreeMap<String, Arc<dyn Target>>,
    reachable: bool,
) -> Result<(), StartError> {
    let allow = config.apply.allow_privileged_role;
    for (name, target) in targets {
        match target.check_role(allow).await {
            Ok(found) if !found.is_empty() => {
                warn!(message = "the target's database role has powers beyond applying; allowed by [apply] allow_privileged_role", target = %name, privileges = %found.join(", "));
            }
            Ok(_) => {}
            Err(error) if error.is_transient() && !reachable => {
                warn!(message = "cannot check the target's database role now; it is checked on the first connection", target = %name, %error);
            }
            Err(error) => {
                return Err(StartError::Target {
                    name: name.clone(),
                    message: error.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Loads the configured signing key, refusing a missing or exposed one; without a
/// configured key, uses (and on first start creates) `<state>/signing.key`.
pub fn load_key(config: &Config) -> Result<Sealer, StartError> {
    let path = config.key_path();
    if config.key.is_some() {
        return Ok(Sealer::load(&path)?);
    }
    let (sealer, created) = Sealer::load_or_create(&path)?;
    if created {
        info!(
            message = "created a new signing key; verify logs with its public key",
            key = %path.display(),
            public_key = %crate::seal::public_key_path(&path).display(),
            keyid = %sealer.keyid(),
        );
    }
    Ok(sealer)
}

/// The queue's checkpoint policy from the configuration.
pub fn checkpoint_policy(config: &Config) -> CheckpointPolicy {
    CheckpointPolicy {
        every_records: config.log.checkpoint_records,
        every_ms: config.log.checkpoint_ms,
    }
}

/// Runs the daemon until `shutdown` completes, then drains and returns.
pub async fn run(
    resources: Resources,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let Resources {
        config,
        policy,
        targets,
        sealer,
        outcomes,
    } = resources;
    check_targets(&config, &targets, false).await?;
    let checkpoints = checkpoint_policy(&config);
    let validator = airlock_intent::Validator::new(config.intent_limits());
    let intake = Intake::new(
        config.intents.clone(),
        validator,
        targets.keys().cloned().collect::<BTreeSet<_>>(),
        Queue::open(&config.state)?
            .with_sealer(sealer.clone(), checkpoints)
            .with_max_refused_bytes(config.limits.max_refused_bytes),
        sealer.clone(),
    );
    let (intake_tx, intake_rx) = mpsc::channel();
    let (pipeline_tx, pipeline_rx) = mpsc::channel();
    #[cfg(feature = "review")]
    let endpoint = Endpoint::start(
        &config,
        http::Parts {
            sealer: sealer.clone(),
            checkpoints,
            targets: targets.clone(),
            wake: Box::new({
                let tx = pipeline_tx.clone();
                move || {
                    let _ = tx.send(Message::Wake);
                }
            }),
        },
    )
    .await?;
    // Built without the `review` feature: no endpoint (config::Review::listen is
    // "off", the only value such a build takes).
    #[cfg(feature = "review")]
    let review_url = endpoint.as_ref().map(|e| e.url.clone());
    #[cfg(not(feature = "review"))]
    let review_url: Option<String> = None;
    let pipeline = Pipeline::new(
        &config,
        Queue::open(&config.state)?.with_sealer(sealer.clone(), checkpoints),
        policy.clone(),
        targets,
        outcomes,
        tokio::runtime::Handle::current(),
    );
    let pipeline = match config.review.webhook.as_deref() {
        Some(url) => {
            // Links point at the public address, else at where the endpoint listens.
            let base = match (&config.review.public_url, &review_url) {
                (Some(public), _) => public.clone(),
                (None, Some(url)) => url.clone(),
                (None, None) => {
                    warn!(
                        message = "review.webhook is set but the review endpoint is off and review.public_url is unset: message links point nowhere useful"
                    );
                    format!("http://{}", config.review.listen)
                }
            };
            let timeout = Duration::from_millis(config.review.webhook_timeout_ms);
            match crate::webhook::Webhook::new(url, &base, timeout) {
                Ok(webhook) => {
                    info!(message = "reviews are announced to a webhook", endpoint = %webhook.origin());
                    pipeline.with_webhook(webhook)
                }
                Err(error) => {
                    error!(message = "webhook disabled: its configuration is invalid", %error);
                    pipeline
                }
            }
        }
        None => pipeline,
    };

    let watcher = watch(&config, intake_tx.clone());
    let rescan = Duration::from_millis(config.intake.rescan_ms.max(10));
    let intake_thread = spawn("airlock-intake", {
        let pipeline_tx = pipeline_tx.clone();
        move || intake_loop(intake, intake_rx, rescan, pipeline_tx)
    });
    let pipeline_thread = spawn("airlock-pipeline", move || {
        pipeline_loop(pipeline, pipeline_rx)
    });
    info!(
        message = "airlock running",
        intents = %config.intents.display(),
        results = %config.results_dir().display(),
        state = %config.state.display(),
        targets = %config.targets.keys().map(String::as_str).collect::<Vec<_>>().join(","),
        policy = %policy.identity(),
        keyid = %sealer.keyid(),
        review = review_url.as_deref().unwrap_or("off"),
    );

    shutdown.await;
    info!(
        message = "stopping: no new intents are taken",
        grace_ms = config.shutdown.grace_ms
    );
    drop(watcher);
    let grace = Duration::from_millis(config.shutdown.grace_ms);
    let deadline = tokio::time::Instant::now() + grace;
    // Reviewers first: no decision may land while the rest drains.
    #[cfg(feature = "review")]
    if let Some(endpoint) = endpoint {
        endpoint.stop(deadline).await;
    }
    let _ = intake_tx.send(Message::Stop);
    join(intake_thread, deadline).await;
    let _ = pipeline_tx.send(Message::Stop);
    join(pipeline_thread, deadline).await;
    info!(message = "airlock stopped");
    Ok(())
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Option<JoinHandle<()>> {
    match std::thread::Builder::new().name(name.to_owned()).spawn(f) {
        Ok(handle) => Some(handle),
        Err(error) => {
            error!(message = "cannot start thread", name, %error);
            None
        }
    }
}

async fn join(handle: Option<JoinHandle<()>>, deadline: tokio::time::Instant) {
    let Some(handle) = handle else { return };
    let name = handle.thread().name().unwrap_or("worker").to_owned();
    let joined = tokio::task::spawn_blocking(move || handle.join());
    match tokio::time::timeout_at(deadline, joined).await {
        Ok(Ok(Ok(()))) => {}
        Ok(_) => error!(message = "worker thread panicked", name),
        Err(_) => warn!(
            message = "grace period over; leaving work for the next start (the ledger prevents double applies)",
            name
        ),
    }
}

/// Forwards file-system events on the intent directory as scan hints. Events are
/// hints only; without a watcher, periodic rescans still find everything.
fn watch(config: &Config, tx: Sender<Message>) -> Option<notify::RecommendedWatcher> {
    let result = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.as_ref().is_ok_and(is_hint) {
            let _ = tx.send(Message::Wake);
        }
    })
    .and_then(|mut watcher| {
        watcher.watch(&config.intents, notify::RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    match result {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            warn!(
                message = "cannot watch the intent directory; relying on periodic rescans",
                %error,
                rescan_ms = config.intake.rescan_ms
            );
            None
        }
    }
}

/// Whether a file-system event may mean a new intent. Access events are not: intake's
/// own scan opens the directory, and waking on that would scan again, forever.
fn is_hint(event: &notify::Event) -> bool {
    !matches!(event.kind, notify::EventKind::Access(_))
}

fn intake_loop(
    mut intake: Intake,
    rx: Receiver<Message>,
    rescan: Duration,
    pipeline: Sender<Message>,
) {
    loop {
        match intake.scan() {
            Ok(report) if report.changed() => {
                let _ = pipeline.send(Message::Wake);
            }
            Ok(_) => {}
            Err(error) => error!(message = "intake scan failed; retrying", %error),
        }
        // Wait for a hint or the rescan timer, then coalesce queued hints.
        match rx.recv_timeout(rescan) {
            Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Message::Wake) | Err(RecvTimeoutError::Timeout) => {}
        }
        for message in rx.try_iter() {
            if let Message::Stop = message {
                return;
            }
        }
    }
}

fn pipeline_loop(mut pipeline: Pipeline, rx: Receiver<Message>) {
    let mut failures = 0u32;
    loop {
        let progressed = match pipeline.step() {
            Ok(report) => {
                failures = 0;
                report.progressed()
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                error!(message = "pipeline step failed; retrying", %error, failures);
                false
            }
        };
        let wait = if progressed {
            Duration::ZERO
        } else {
            TICK.saturating_mul(failures.clamp(1, 25))
        };
        match rx.recv_timeout(wait) {
            Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Ok(Message::Wake) | Err(RecvTimeoutError::Timeout) => {}
        }
        if rx.try_iter().any(|m| matches!(m, Message::Stop)) {
            break;
        }
    }
    // Tell the agent where everything stands, seal every run's head, then stop.
    if let Err(error) = pipeline.flush_outcomes() {
        error!(message = "cannot write the last outcomes", %error);
    }
    match pipeline.seal_all() {
        Ok(n) => info!(message = "run logs sealed", checkpoints = n),
        Err(error) => error!(message = "cannot seal the run logs", %error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RemoveKind};

    #[test]
    fn only_changes_are_hints() {
        let event = |kind| notify::Event::new(kind);
        // Intake's own scan opens and reads the directory: no hint, or it would loop.
        assert!(!is_hint(&event(EventKind::Access(AccessKind::Open(
            AccessMode::Any
        )))));
        assert!(!is_hint(&event(EventKind::Access(AccessKind::Close(
            AccessMode::Read
        )))));
        assert!(is_hint(&event(EventKind::Create(CreateKind::File))));
        assert!(is_hint(&event(EventKind::Modify(ModifyKind::Any))));
        assert!(is_hint(&event(EventKind::Remove(RemoveKind::File))));
        assert!(is_hint(&event(EventKind::Any)));
    }

    #[test]
    fn scanning_the_directory_gives_no_hint() {
        // Real inotify events for what a scan does (list the directory, read a
        // file), then a marker file: inotify keeps order, so every event before the
        // marker's came from the reads, and none of them may be a hint.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.json"), b"{}").unwrap();
        let (tx, rx) = mpsc::channel();
        let mut watcher =
            match notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
                if let Ok(event) = e {
                    let _ = tx.send(event);
                }
            }) {
                Ok(watcher) => watcher,
                Err(_) => return, // No inotify here: rescans alone drive intake.
            };
        watcher
            .watch(dir.path(), notify::RecursiveMode::NonRecursive)
            .unwrap();
        for _ in 0..3 {
            let _ = std::fs::read_dir(dir.path()).unwrap().count();
            let _ = std::fs::read(dir.path().join("a.json")).unwrap();
        }
        let marker = dir.path().join("marker");
        std::fs::write(&marker, b"").unwrap();
        let mut before = Vec::new();
        loop {
            let event = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the marker's event");
            if event.paths.contains(&marker) {
                assert!(is_hint(&event), "a new file is a hint: {event:?}");
                break;
            }
            before.push(event);
        }
        assert!(!before.is_empty(), "inotify reports reads as access events");
        let hints: Vec<_> = before.iter().filter(|e| is_hint(e)).collect();
        assert!(hints.is_empty(), "reads would wake intake: {hints:?}");
    }
}
