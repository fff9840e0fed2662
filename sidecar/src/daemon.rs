//! The daemon: checks what it needs, wires intake, the pipeline and their timers
//! together, and stops them cleanly.
//!
//! Start-up has two phases. [`Preflight`] checks everything that can fail without
//! leaving a trace (the directories' rules, the signing key, each target, the policy,
//! the review listener) and creates nothing; only when every check passes does
//! [`Resources::create`] create the directories, the queue, the key and the SQLite
//! targets. So a start that fails on its configuration leaves the disk as it was,
//! and `airlock run --check` is the first phase alone, printed.
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
use std::io::{self, ErrorKind, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use notify::Watcher;
use tracing::{error, info, warn};

use crate::apply::{self, ApplyError, Target};
use crate::clock::now_ms;
use crate::config::{self, Config};
use crate::decide::{DecisionLog, Policy, PolicyOptions, Sink};
#[cfg(feature = "review")]
use crate::http::{self, Endpoint, Listener};
use crate::intake::Intake;
use crate::metrics::Loop;
use crate::outcome::Outcomes;
use crate::pipeline::Pipeline;
use crate::probes::{MetricsListener, Probes};
use crate::queue::{CheckpointPolicy, Queue};
use crate::seal::{SealError, Sealer};

/// How often the pipeline looks at the queue when nothing woke it: reviews decided by
/// another process (`airlock approve`), retries whose backoff ended, expiring reviews.
const TICK: Duration = Duration::from_millis(200);

/// The first bytes of every SQLite database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Why the daemon could not start.
///
/// Each message includes its cause, so no variant also gives it as `source()`: an
/// error-chain printer (anyhow's `{:#}`) would show it twice.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The intent directory is unusable.
    #[error("intent directory {path}: {problem}")]
    Intents { path: PathBuf, problem: String },
    /// A directory could not be created.
    #[error("cannot create directory {path}: {error}")]
    Dir { path: PathBuf, error: io::Error },
    /// The state directory is unusable (see [`crate::state`]).
    #[error("state directory {path}: {problem}")]
    State { path: PathBuf, problem: String },
    /// The results directory is unusable (see [`crate::outcome::Outcomes`]).
    #[error("results directory {path}: {problem}")]
    Results { path: PathBuf, problem: String },
    /// A target cannot be used; the message names it (never its URL).
    #[error("{message}")]
    Target { name: String, message: String },
    /// The policy cannot decide.
    #[error("policy: {0}")]
    Policy(String),
    /// The decision log (`[telemetry] decision_log`) cannot be written where it is
    /// configured.
    #[error("telemetry.decision_log {path}: {problem}")]
    DecisionLog { path: String, problem: String },
    #[error(transparent)]
    Key(#[from] SealError),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
    #[cfg(feature = "review")]
    #[error(transparent)]
    Endpoint(#[from] crate::http::EndpointError),
    /// The metrics listener cannot start.
    #[error(transparent)]
    Probes(#[from] crate::probes::ProbeError),
}

impl StartError {
    /// A target's error, naming the target once (its own messages usually do).
    fn target(name: &str, error: &ApplyError) -> Self {
        let text = error.to_string();
        let message = if text.contains(&format!("target {name:?}")) {
            text
        } else {
            format!("target {name:?}: {text}")
        };
        Self::Target {
            name: name.to_owned(),
            message,
        }
    }
}

enum Message {
    Wake,
    Stop,
}

/// How thoroughly [`Preflight::run`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Before `airlock run` starts: a database server that cannot be reached now is
    /// no reason to refuse (its intents wait for it), and the review listener is kept
    /// for the endpoint.
    Start,
    /// `airlock run --check`: every server must answer now (each PostgreSQL target,
    /// a remote policy), and the review listener is released at once.
    Check,
}

/// One thing start-up checked.
#[derive(Debug)]
pub struct Finding {
    /// What was checked: `config`, `intents`, `state`, `target default`, ...
    pub subject: String,
    /// What was found (`exists`, `will be created`, ...), or why Airlock cannot
    /// start.
    pub result: Result<String, StartError>,
}

/// What start-up checks before it creates any file or directory, one [`Finding`]
/// per thing in the order `airlock run --check` prints them, and what the checks
/// prepared on the way (the compiled policy, the server targets, the key if it
/// exists, the bound review listener).
#[derive(Debug)]
pub struct Preflight {
    /// What was checked and found.
    pub findings: Vec<Finding>,
    policy: Option<Policy>,
    /// Targets opened without side effects (servers); SQLite targets are opened by
    /// [`Resources::create`], since opening one creates its file.
    servers: BTreeMap<String, Arc<dyn Target>>,
    sealer: Option<Sealer>,
    #[cfg(feature = "review")]
    listener: Option<Listener>,
    metrics: Option<MetricsListener>,
}

impl Preflight {
    /// Checks the configuration's directories, key, targets, policy and review
    /// listener, creating nothing.
    pub async fn run(config: &Config, mode: Mode) -> Self {
        let mut preflight = Self {
            findings: Vec::new(),
            policy: None,
            servers: BTreeMap::new(),
            sealer: None,
            #[cfg(feature = "review")]
            listener: None,
            metrics: None,
        };
        preflight.note("config", Ok(config.origin.to_string()));
        preflight.note("intents", check_intents(&config.intents));
        let results = config.results_dir();
        preflight.note("results", check_results(&results, &config.state));
        let state = check_state(&config.state);
        let state_usable = state.is_ok();
        preflight.note("state", state);
        let key = preflight.check_key(config, state_usable);
        preflight.note("key", key);
        for (name, url) in &config.targets {
            let found = preflight.check_target(config, name, url, mode).await;
            preflight.note(&format!("target {name}"), found);
        }
        let policy = preflight.check_policy(config, mode).await;
        preflight.note("policy", policy);
        let review = preflight.check_listener(config, mode).await;
        preflight.note("review", review);
        let metrics = preflight.check_metrics(config, mode).await;
        preflight.note("metrics", metrics);
        if let Some(setting) = &config.telemetry.decision_log {
            preflight.note("decision log", check_decision_log(setting, config));
        }
        preflight
    }

    /// Whether every check passed: `airlock run` would start.
    pub fn ok(&self) -> bool {
        self.findings.iter().all(|f| f.result.is_ok())
    }

    /// Why Airlock cannot start, in the order found.
    pub fn problems(&self) -> impl Iterator<Item = &StartError> {
        self.findings.iter().filter_map(|f| f.result.as_ref().err())
    }

    fn note(&mut self, subject: &str, result: Result<String, StartError>) {
        self.findings.push(Finding {
            subject: subject.to_owned(),
            result,
        });
    }

    /// The configured key must load; the default one may not exist yet.
    fn check_key(&mut self, config: &Config, state_usable: bool) -> Result<String, StartError> {
        let path = config.key_path();
        if config.key.is_none() && !state_usable {
            return Ok(format!(
                "{}: not checked (the state directory is unusable)",
                path.display()
            ));
        }
        match Sealer::load(&path) {
            Ok(sealer) => {
                let found = format!("{}: keyid {}", path.display(), sealer.keyid());
                self.sealer = Some(sealer);
                Ok(found)
            }
            Err(SealError::KeyMissing { .. }) if config.key.is_none() => Ok(format!(
                "{}: will be created (its public key beside it, .pub)",
                path.display()
            )),
            Err(error) => Err(error.into()),
        }
    }

    /// A SQLite target's file and directory, or a server target's connection and
    /// role (opening a server target connects nothing, so it is kept).
    async fn check_target(
        &mut self,
        config: &Config,
        name: &str,
        url: &str,
        mode: Mode,
    ) -> Result<String, StartError> {
        if let Some(path) = crate::state::sqlite_path(url) {
            return check_sqlite(name, &path, &config.state);
        }
        let target = apply::open(name, url).map_err(|e| StartError::target(name, &e))?;
        let allow = config.apply.allow_privileged_role;
        let privileges = match target.check_role(allow).await {
            Ok(found) => found,
            Err(error) if error.is_transient() && mode == Mode::Start => {
                warn!(message = "cannot check the target's database role now; it is checked on the first connection", target = %name, %error);
                self.servers.insert(name.to_owned(), target);
                return Ok(format!(
                    "not reachable now ({error}); its intents wait, and its role is checked on the first connection"
                ));
            }
            Err(error) => return Err(StartError::target(name, &error)),
        };
        let role = if privileges.is_empty() {
            "a role without powers beyond applying".to_owned()
        } else {
            if mode == Mode::Start {
                warn!(message = "the target's database role has powers beyond applying; allowed by [apply] allow_privileged_role", target = %name, privileges = %privileges.join(", "));
            }
            format!(
                "a privileged role ({}), allowed by [apply] allow_privileged_role",
                privileges.join(", ")
            )
        };
        let found = match mode {
            Mode::Start => role,
            Mode::Check => match target.server().await {
                Ok(Some(server)) => format!("{server}: {role}"),
                Ok(None) => role,
                Err(error) => return Err(StartError::target(name, &error)),
            },
        };
        self.servers.insert(name.to_owned(), target);
        Ok(found)
    }

    /// Compiles an embedded policy; asks a remote one for a decision when checking.
    async fn check_policy(&mut self, config: &Config, mode: Mode) -> Result<String, StartError> {
        let policy = Policy::new(&policy_options(&config.policy))
            .map_err(|e| StartError::Policy(e.to_string()))?;
        let found = match &policy {
            Policy::Embedded(embedded) => {
                let current = embedded.current();
                match &config.policy.path {
                    Some(path) => format!(
                        "{}: {} compiled, {}",
                        path.display(),
                        current.files().join(", "),
                        current.identity()
                    ),
                    None => format!(
                        "built-in (examples/policies/airlock.rego), {}",
                        current.identity()
                    ),
                }
            }
            Policy::Remote(remote) => match mode {
                Mode::Start => format!("{} (asked at each decision)", remote.url()),
                // Any decision (or a malformed one) means the server answered; only
                // an unavailable server stops the check.
                Mode::Check => match remote.evaluate(&serde_json::json!({})).await {
                    Err(error @ crate::decide::PolicyError::Unavailable { .. }) => {
                        return Err(StartError::Policy(error.to_string()));
                    }
                    _ => format!("{}: answered a decision request", remote.url()),
                },
            },
        };
        self.policy = Some(policy);
        Ok(found)
    }

    /// Binds the review listener: kept for the endpoint, or released at once when
    /// only checking.
    #[cfg(feature = "review")]
    async fn check_listener(&mut self, config: &Config, mode: Mode) -> Result<String, StartError> {
        let Some(listener) = Listener::bind(config).await? else {
            return Ok("off (review.listen = \"off\"): decide with airlock approve/reject".into());
        };
        let url = listener.url().to_owned();
        match mode {
            Mode::Start => {
                self.listener = Some(listener);
                Ok(format!("{url}: bound"))
            }
            Mode::Check => Ok(format!("{url}: bound, then released")),
        }
    }

    /// Binds the metrics listener: kept to serve, or released at once when only
    /// checking.
    async fn check_metrics(&mut self, config: &Config, mode: Mode) -> Result<String, StartError> {
        let Some(listener) = MetricsListener::bind(config).await? else {
            return Ok("off (telemetry.metrics_listen = \"off\")".into());
        };
        let found = match mode {
            Mode::Start => format!("{}: bound", listener.url),
            Mode::Check => format!("{}: bound, then released", listener.url),
        };
        if mode == Mode::Start {
            self.metrics = Some(listener);
        }
        Ok(found)
    }

    /// No review endpoint in this build ([`config::Config::check`] refuses any
    /// `review.listen` but `off`).
    #[cfg(not(feature = "review"))]
    async fn check_listener(
        &mut self,
        _config: &Config,
        _mode: Mode,
    ) -> Result<String, StartError> {
        Ok("off (this airlock was built without the `review` feature)".into())
    }
}

/// The intent directory: a directory, or one to create.
fn check_intents(path: &Path) -> Result<String, StartError> {
    let problem = |problem: String| StartError::Intents {
        path: path.to_owned(),
        problem,
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(format!("{}: exists", path.display())),
        Ok(_) => Err(problem("is not a directory".into())),
        Err(error) if error.kind() == ErrorKind::NotFound => {
            planned(path).map_err(|e| problem(format!("cannot be created: {e}")))?;
            Ok(format!("{}: will be created", path.display()))
        }
        Err(error) => Err(problem(error.to_string())),
    }
}

/// The results directory, by the rules [`Outcomes::open`] enforces once it exists:
/// a real directory (no link), neither inside the state directory nor holding it.
fn check_results(path: &Path, state: &Path) -> Result<String, StartError> {
    let problem = |problem: String| StartError::Results {
        path: path.to_owned(),
        problem,
    };
    let exists = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(problem(
                "is a symbolic link; Airlock writes outcome files only into a real directory \
                 (configure the directory the link leads to)"
                    .into(),
            ));
        }
        Ok(meta) if !meta.is_dir() => return Err(problem("is not a directory".into())),
        Ok(_) => true,
        Err(error) if error.kind() == ErrorKind::NotFound => false,
        Err(error) => return Err(problem(error.to_string())),
    };
    let results = planned(path).map_err(|e| problem(format!("cannot be created: {e}")))?;
    // A state directory that cannot be created is the state check's to report.
    if let Ok(state_dir) = planned(state) {
        if results.starts_with(&state_dir) {
            return Err(problem(format!(
                "is inside the state directory {} (or is it); the agent reads and writes the \
                 results directory, so it must lie outside Airlock's state",
                state.display()
            )));
        }
        if state_dir.starts_with(&results) {
            return Err(problem(format!(
                "contains the state directory {}; the agent reads and writes the results \
                 directory, so it must not hold Airlock's state",
                state.display()
            )));
        }
    }
    Ok(if exists {
        format!("{}: exists", path.display())
    } else {
        format!("{}: will be created", path.display())
    })
}

/// The decision log's place: standard output, or a file (existing or to create in
/// an existing directory) outside the intent and results directories, which the
/// agent controls: there it could replace the file with a link to one of Airlock's
/// own, or read every decision on every agent's intents.
fn check_decision_log(setting: &str, config: &Config) -> Result<String, StartError> {
    let Sink::File(path) = Sink::parse(setting) else {
        return Ok("standard output".to_owned());
    };
    let problem = |problem: String| StartError::DecisionLog {
        path: path.display().to_string(),
        problem,
    };
    let resolved = planned(&path).map_err(|e| problem(e.to_string()))?;
    for (what, dir) in [
        ("intent", config.intents.clone()),
        ("results", config.results_dir()),
    ] {
        if let Ok(dir_resolved) = planned(&dir)
            && resolved.starts_with(&dir_resolved)
        {
            return Err(problem(format!(
                "lies inside the {what} directory {}, which the agent controls; give a path outside it",
                dir.display()
            )));
        }
    }
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => Err(problem("is a directory".into())),
        Ok(_) => Ok(format!("{}: exists, appended to", path.display())),
        Err(error) if error.kind() == ErrorKind::NotFound => {
            let parent = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            match std::fs::metadata(parent) {
                Ok(meta) if meta.is_dir() => {
                    Ok(format!("{}: will be created (mode 0600)", path.display()))
                }
                _ => Err(problem(format!(
                    "directory {} does not exist; create it first",
                    parent.display()
                ))),
            }
        }
        Err(error) => Err(problem(error.to_string())),
    }
}

/// The state directory, by [`crate::state::check`]'s rules, or one to create.
fn check_state(path: &Path) -> Result<String, StartError> {
    let problem = |problem: String| StartError::State {
        path: path.to_owned(),
        problem,
    };
    match std::fs::metadata(path) {
        Ok(meta) => {
            crate::state::check(path).map_err(|e| problem(e.to_string()))?;
            Ok(format!(
                "{}: exists, mode {:04o}, yours",
                path.display(),
                meta.mode() & 0o7777
            ))
        }
        Err(error) if error.kind() == ErrorKind::NotFound => {
            planned(path).map_err(|e| problem(format!("cannot be created: {e}")))?;
            Ok(format!("{}: will be created (mode 0700)", path.display()))
        }
        Err(error) => Err(problem(error.to_string())),
    }
}

/// A SQLite target's file: a database (or an empty file) that exists, or one that
/// will be created in a directory that exists or is the state directory. Read
/// without SQLite, which could leave `-wal` and `-shm` files behind.
fn check_sqlite(name: &str, path: &Path, state: &Path) -> Result<String, StartError> {
    let problem = |problem: String| StartError::Target {
        name: name.to_owned(),
        message: format!("target {name:?} ({}): {problem}", path.display()),
    };
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err(problem("is not a regular file".into())),
        Ok(meta) if meta.len() == 0 => Ok(format!(
            "sqlite {}: exists, empty (create its tables before intents name them)",
            path.display()
        )),
        Ok(_) => {
            let mut header = Vec::with_capacity(SQLITE_HEADER.len());
            std::fs::File::open(path)
                .and_then(|file| {
                    file.take(SQLITE_HEADER.len() as u64)
                        .read_to_end(&mut header)
                })
                .map_err(|e| problem(format!("cannot be read: {e}")))?;
            if header != SQLITE_HEADER {
                return Err(problem("is not a SQLite database".into()));
            }
            Ok(format!("sqlite {}: exists", path.display()))
        }
        Err(error) if error.kind() == ErrorKind::NotFound => {
            let parent = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            let in_state = matches!(
                (planned(parent), planned(state)),
                (Ok(parent), Ok(state)) if parent == state
            );
            let where_ = match std::fs::metadata(parent) {
                _ if in_state => "in the state directory",
                Ok(meta) if meta.is_dir() => "in an existing directory",
                Ok(_) => return Err(problem(format!("{} is not a directory", parent.display()))),
                Err(_) => {
                    return Err(problem(format!(
                        "directory {} does not exist; create it, or give a path in an \
                         existing directory (Airlock creates no directory but its own state \
                         directory)",
                        parent.display()
                    )));
                }
            };
            Ok(format!(
                "sqlite {}: will be created {where_}, with no tables (create them before \
                 intents name them: Airlock never runs DDL)",
                path.display()
            ))
        }
        Err(error) => Err(problem(error.to_string())),
    }
}

/// Where `path` will be once it is created: its longest existing prefix resolved
/// (links followed), the rest appended (`..` taking a component off). Fails when a
/// prefix exists but is not a directory, or cannot be looked at.
fn planned(path: &Path) -> io::Result<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()?.join(path)
    };
    let components: Vec<Component<'_>> = absolute.components().collect();
    for split in (1..=components.len()).rev() {
        let prefix: PathBuf = components[..split].iter().collect();
        match prefix.canonicalize() {
            Ok(mut resolved) => {
                for component in &components[split..] {
                    match component {
                        Component::ParentDir => {
                            resolved.pop();
                        }
                        Component::Normal(part) => resolved.push(part),
                        _ => {}
                    }
                }
                return Ok(resolved);
            }
            Err(error) if error.kind() == ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    Ok(absolute)
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
    /// The review endpoint's bound listener (`None` when it is off).
    #[cfg(feature = "review")]
    pub listener: Option<Listener>,
    /// The metrics listener, bound (`None` when it is off).
    pub metrics: Option<MetricsListener>,
}

impl Resources {
    /// Checks everything ([`Preflight`]), then creates directories, the queue, the
    /// key and SQLite targets. Fails with the first problem found, before anything
    /// was created when a check finds it.
    pub async fn open(config: Config) -> Result<Self, StartError> {
        let preflight = Preflight::run(&config, Mode::Start).await;
        Self::create(config, preflight)
    }

    /// Creates what `preflight` found missing (the state directory first: the
    /// results directory is checked against it) and opens the SQLite targets, with
    /// what the checks prepared. Fails with the first problem `preflight` found, if
    /// any, before creating anything.
    pub fn create(config: Config, preflight: Preflight) -> Result<Self, StartError> {
        let Preflight {
            findings,
            policy,
            mut servers,
            sealer,
            #[cfg(feature = "review")]
            listener,
            metrics,
        } = preflight;
        if let Some(problem) = findings.into_iter().find_map(|f| f.result.err()) {
            return Err(problem);
        }
        let policy = match policy {
            Some(policy) => policy,
            None => Policy::new(&policy_options(&config.policy))
                .map_err(|e| StartError::Policy(e.to_string()))?,
        };
        crate::state::prepare(&config.state).map_err(|e| StartError::State {
            path: config.state.clone(),
            problem: e.to_string(),
        })?;
        Queue::open(&config.state)?;
        let sealer = match sealer {
            Some(sealer) => sealer,
            None => load_key(&config)?,
        };
        std::fs::create_dir_all(&config.intents).map_err(|error| StartError::Dir {
            path: config.intents.clone(),
            error,
        })?;
        let results = config.results_dir();
        let outcomes =
            Outcomes::open(results.clone(), &config.state).map_err(|e| StartError::Results {
                path: results,
                problem: e.to_string(),
            })?;
        let mut targets = BTreeMap::new();
        for (name, url) in &config.targets {
            if let Some(target) = servers.remove(name) {
                targets.insert(name.clone(), target);
                continue;
            }
            // SQLite targets kept in the state directory (the default one) are
            // private like every other file there: created 0600 before SQLite
            // opens them.
            if let Some(path) = crate::state::sqlite_path(url)
                && in_state_dir(&path, &config.state)
            {
                crate::state::private_file(&path).map_err(|e| StartError::State {
                    path: path.clone(),
                    problem: e.to_string(),
                })?;
            }
            let target = apply::open(name, url).map_err(|e| StartError::target(name, &e))?;
            targets.insert(name.clone(), target);
        }
        Ok(Self {
            config,
            policy: Arc::new(policy),
            targets,
            sealer: Arc::new(sealer),
            outcomes,
            #[cfg(feature = "review")]
            listener,
            metrics,
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
fn in_state_dir(path: &Path, state: &Path) -> bool {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    match (parent.canonicalize(), state.canonicalize()) {
        (Ok(parent), Ok(state)) => parent == state,
        _ => false,
    }
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
        #[cfg(feature = "review")]
        listener,
        metrics,
    } = resources;
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
        listener,
    )
    .await?;
    // Built without the `review` feature: no endpoint (config::Review::listen is
    // "off", the only value such a build takes).
    #[cfg(feature = "review")]
    let review_url = endpoint.as_ref().map(|e| e.url.clone());
    #[cfg(not(feature = "review"))]
    let review_url: Option<String> = None;
    let probes = match metrics {
        Some(listener) => Some(Probes::start(
            listener,
            crate::probes::Parts {
                state: config.state.clone(),
                policy: policy.clone(),
                targets: targets.clone(),
                stale: crate::probes::STALE_HEARTBEAT.max(Duration::from_millis(
                    config.intake.rescan_ms.saturating_mul(3),
                )),
            },
        )?),
        None => None,
    };
    let pipeline = Pipeline::new(
        &config,
        Queue::open(&config.state)?.with_sealer(sealer.clone(), checkpoints),
        policy.clone(),
        targets,
        outcomes,
        tokio::runtime::Handle::current(),
    );
    let pipeline = match &config.telemetry.decision_log {
        Some(setting) => {
            let log = DecisionLog::open(
                &Sink::parse(setting),
                config.telemetry.decision_log_values,
                sealer.keyid(),
            )
            .map_err(|e| StartError::DecisionLog {
                path: setting.clone(),
                problem: match e {
                    crate::decide::DecisionLogError::Open { error, .. } => {
                        format!("cannot open it for appending: {error}")
                    }
                    other => other.to_string(),
                },
            })?;
            info!(message = "decisions are logged", decision_log = %setting, values = config.telemetry.decision_log_values);
            pipeline.with_decision_log(log)
        }
        None => pipeline,
    };
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
    if let Some(probes) = probes {
        probes.stop().await;
    }
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
        crate::metrics::global().heartbeat(Loop::Intake, now_ms());
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
        crate::metrics::global().heartbeat(Loop::Pipeline, now_ms());
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
    fn planned_paths_follow_existing_links_and_append_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("state")).unwrap();
        std::os::unix::fs::symlink(real.join("state"), real.join("link")).unwrap();
        // Through the link, then parts that do not exist yet.
        assert_eq!(
            planned(&real.join("link/new/../results")).unwrap(),
            real.join("state/results")
        );
        // A prefix that is a file cannot hold anything.
        std::fs::write(real.join("file"), b"").unwrap();
        assert!(planned(&real.join("file/sub")).is_err());
        // The results directory is refused inside the state directory, by link too.
        let error = check_results(&real.join("link/results"), &real.join("state"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("inside the state directory"), "{error}");
        let error = check_results(&real, &real.join("state/x"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("contains the state directory"), "{error}");
    }

    #[test]
    fn a_sqlite_target_must_be_a_database_or_creatable() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let check = |path: &Path| check_sqlite("t", path, &state);
        let found = check(&state.join("target.db")).unwrap();
        assert!(
            found.contains("will be created in the state directory"),
            "{found}"
        );
        let found = check(&dir.path().join("new.db")).unwrap();
        assert!(
            found.contains("will be created in an existing directory"),
            "{found}"
        );
        let error = check(&dir.path().join("missing/new.db")).unwrap_err();
        assert!(error.to_string().contains("does not exist"), "{error}");
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, b"not a database").unwrap();
        let error = check(&text).unwrap_err();
        assert!(
            error.to_string().contains("is not a SQLite database"),
            "{error}"
        );
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        assert!(check(&empty).unwrap().contains("exists, empty"));
        let db = dir.path().join("real.db");
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            .unwrap();
        assert!(check(&db).unwrap().ends_with(": exists"));
        // Nothing was created by the checks.
        assert!(!state.exists() && !dir.path().join("new.db").exists());
    }

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
