//! Configuration: one TOML file, overridable by `AIRLOCK_*` environment variables and
//! then by command-line flags. Parsed once, before anything starts.
//!
//! Every key is optional: with nothing configured Airlock watches `./intents`, keeps
//! its state in `./.airlock`, applies to `sqlite://./.airlock/target.db` and decides
//! with the default policy compiled into the binary. Unknown keys are errors, so a
//! typo never silently falls back to a default.
//!
//! Environment variables name a key path with `__` between levels, after the
//! `AIRLOCK_` prefix: `AIRLOCK_INTENTS=/shared/intents` sets `intents`,
//! `AIRLOCK_LIMITS__MAX_OPS=20` sets `limits.max_ops`, and `AIRLOCK_TARGET` is a
//! shorthand for `targets.default`. Values are read as TOML when they parse as a
//! number or boolean, and as strings otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Uri;
use serde::Deserialize;

/// The default `limits.max_refused_bytes`: 64 MiB (also the queue's default, see
/// `Queue::with_max_refused_bytes`).
pub const DEFAULT_MAX_REFUSED_BYTES: u64 = 64 << 20;

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The directory agents write intents into.
    pub intents: PathBuf,
    /// Where outcome files for agents go; defaults to `<intents>/results`.
    pub results: Option<PathBuf>,
    /// Airlock's private state (queue, keys); the agent must not see it.
    pub state: PathBuf,
    /// Which policy decides: embedded Rego (`path`, or the built-in policy) or a
    /// remote Open Policy Agent (`url`).
    pub policy: Policy,
    /// The Ed25519 signing key (PKCS#8 PEM, mode 0600), for example a Kubernetes
    /// Secret mount. When absent, `<state>/signing.key` is used, and created on first
    /// start.
    pub key: Option<PathBuf>,
    /// Target databases by name; intents choose one with `target` (default `default`).
    pub targets: BTreeMap<String, String>,
    /// Limits on what an agent may submit.
    pub limits: Limits,
    /// Intake timing.
    pub intake: Intake,
    /// Human review.
    pub review: Review,
    /// Applying to targets.
    pub apply: Apply,
    /// Shutdown behaviour.
    pub shutdown: Shutdown,
    /// The run logs.
    pub log: Log,
    /// What Airlock tells operators' tools about its work: metrics and health,
    /// and the decision log.
    pub telemetry: Telemetry,
    /// Where this configuration came from (not a key): what `airlock run --check`
    /// says it read.
    #[serde(skip)]
    pub origin: Origin,
}

/// Where a configuration came from: the file, the environment variables read as
/// keys, and the command-line flags that overrode them.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    /// The configuration file read, if any.
    pub file: Option<PathBuf>,
    /// The `AIRLOCK_*` variables read as configuration keys, sorted.
    pub env: Vec<String>,
    /// The command-line flags that set keys (`--state`, `--target`, ...), for the
    /// binary to fill in.
    pub flags: Vec<String>,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(file) = &self.file {
            parts.push(format!("file {}", file.display()));
        }
        if !self.env.is_empty() {
            parts.push(format!("environment {}", self.env.join(", ")));
        }
        if !self.flags.is_empty() {
            parts.push(format!("flags {}", self.flags.join(", ")));
        }
        if parts.is_empty() {
            f.write_str("no file, variables or flags: the defaults")
        } else {
            write!(f, "{}; the defaults for the rest", parts.join("; "))
        }
    }
}

/// The policy that decides. With neither `path` nor `url`, the default policy
/// compiled into the binary decides.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// A `.rego` file or a directory of them (with an optional `data.json`),
    /// evaluated in-process and reloaded when its files change.
    pub path: Option<PathBuf>,
    /// An Open Policy Agent Data API URL, e.g.
    /// `http://127.0.0.1:8181/v1/data/airlock/authz` (plain HTTP; no credentials in
    /// the URL).
    pub url: Option<String>,
    /// A file holding a bearer token for `url` (e.g. a mounted Secret); re-read
    /// every `reload_ms`.
    pub bearer_token_file: Option<PathBuf>,
    /// How long one remote decision may take, connection included, in ms.
    pub timeout_ms: u64,
    /// How long connecting to `url` may take, in ms.
    pub connect_timeout_ms: u64,
    /// Most remote decisions in flight at once.
    pub concurrency: usize,
    /// How often policy files (and the token file) are checked for changes, in ms.
    pub reload_ms: u64,
    /// Show policies what each intent would write (the input's `preview`), from a run
    /// of the intent in a target transaction that is rolled back.
    pub preview: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            path: None,
            url: None,
            bearer_token_file: None,
            timeout_ms: 2_000,
            connect_timeout_ms: 500,
            concurrency: 16,
            reload_ms: 1_000,
            preview: false,
        }
    }
}

/// The run logs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// Sign a checkpoint once a run has this many unsealed records (1: with every
    /// queue commit that adds records).
    pub checkpoint_records: u64,
    /// Also sign one once unsealed records are this old, in ms (0: no time bound).
    pub checkpoint_ms: u64,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            checkpoint_records: 1,
            checkpoint_ms: 0,
        }
    }
}

/// Telemetry for operators' tools (`[telemetry]`). Everything is off unless
/// configured.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// Where `/metrics`, `/healthz` and `/readyz` are served, `host:port`, on their
    /// own listener; `"off"` (the default) serves none.
    pub metrics_listen: String,
    /// Where to write one JSON line per policy decision, in the shape of Open
    /// Policy Agent's decision log events: a file path (appended to, created mode
    /// 0600) or `-` for standard output. Off when unset. See `docs/telemetry.md`.
    pub decision_log: Option<String>,
    /// Show the values the agent asked to write (`values`, `set`, `key`, `expect`,
    /// the preview's rows) in the decision log; masked unless true.
    pub decision_log_values: bool,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            metrics_listen: "off".to_owned(),
            decision_log: None,
            decision_log_values: false,
        }
    }
}

/// Limits on agent input (DESIGN invariant 5).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest intent file accepted, in bytes.
    pub max_file_bytes: usize,
    /// Deepest JSON nesting accepted.
    pub max_depth: usize,
    /// Most ops in one intent.
    pub max_ops: usize,
    /// Most bytes of refused files kept in the queue, in total (each refusal keeps at
    /// most its first 4 KiB); beyond it a refusal keeps only its digest and size.
    pub max_refused_bytes: u64,
}

/// Intake timing.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Intake {
    /// Rescan the intent directory this often even without file events, in ms.
    pub rescan_ms: u64,
}

/// Human review.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Review {
    /// How long an intent may wait for review before it expires, in seconds.
    pub ttl_secs: u64,
    /// Where the review endpoint (HTTP API and web page) listens, `host:port`;
    /// `"off"` disables it. Port 0 picks a free port (written to
    /// `<state>/review-endpoint`). [`DEFAULT_LISTEN`] unless set; an airlock built
    /// without the `review` feature takes only `"off"`.
    pub listen: String,
    /// The reviewer tokens file (names, roles, SHA-256 hashes); defaults to
    /// `<state>/review-tokens.toml`.
    pub tokens: Option<PathBuf>,
    /// A PEM certificate chain: with `tls_key`, the endpoint serves HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// The PEM (PKCS#8) private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The endpoint's address as approvers reach it (links in webhook messages);
    /// defaults to the listening address.
    pub public_url: Option<String>,
    /// A URL to POST a JSON message to (Slack-compatible `text`) whenever an intent
    /// enters review.
    pub webhook: Option<String>,
    /// How long one webhook delivery may take, in ms.
    pub webhook_timeout_ms: u64,
    /// How long a web sign-in lasts, in seconds.
    pub session_ttl_secs: u64,
}

/// Applying to targets.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Apply {
    /// Most rows one update or delete may touch before the intent fails.
    pub max_rows: u64,
    /// Longest backoff between retries of a transient failure, in ms.
    pub max_backoff_ms: u64,
    /// Whether Airlock may apply as a PostgreSQL role with powers beyond applying
    /// (superuser, `CREATEROLE`, `CREATEDB`, `BYPASSRLS`, `REPLICATION`, directly or
    /// through membership). Default false: such a role stops start-up (and
    /// `airlock run --check`) with the reason; see `docs/postgres-role.md`.
    pub allow_privileged_role: bool,
}

/// Shutdown behaviour.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// How long in-flight work may take to finish after SIGTERM, in ms.
    pub grace_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        let state = PathBuf::from("./.airlock");
        Self {
            intents: PathBuf::from("./intents"),
            results: None,
            targets: BTreeMap::from([(
                "default".to_owned(),
                "sqlite://./.airlock/target.db".to_owned(),
            )]),
            state,
            policy: Policy::default(),
            key: None,
            limits: Limits::default(),
            intake: Intake::default(),
            review: Review::default(),
            apply: Apply::default(),
            shutdown: Shutdown::default(),
            log: Log::default(),
            telemetry: Telemetry::default(),
            origin: Origin::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        let intent = airlock_intent::Limits::default();
        Self {
            max_file_bytes: intent.max_bytes,
            max_depth: intent.max_depth,
            max_ops: intent.max_ops,
            max_refused_bytes: DEFAULT_MAX_REFUSED_BYTES,
        }
    }
}

impl Default for Intake {
    fn default() -> Self {
        Self { rescan_ms: 2_000 }
    }
}

/// Where the review endpoint listens unless configured: `"off"` in an airlock built
/// without the `review` feature, which has no endpoint.
#[cfg(feature = "review")]
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where the review endpoint listens unless configured: `"off"` in an airlock built
/// without the `review` feature, which has no endpoint.
#[cfg(not(feature = "review"))]
pub const DEFAULT_LISTEN: &str = "off";

impl Default for Review {
    fn default() -> Self {
        Self {
            ttl_secs: 3_600,
            listen: DEFAULT_LISTEN.to_owned(),
            tokens: None,
            tls_cert: None,
            tls_key: None,
            public_url: None,
            webhook: None,
            webhook_timeout_ms: 5_000,
            session_ttl_secs: 8 * 3_600,
        }
    }
}

impl Default for Apply {
    fn default() -> Self {
        Self {
            max_rows: 1,
            max_backoff_ms: 30_000,
            allow_privileged_role: false,
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self { grace_ms: 10_000 }
    }
}

/// Why the configuration could not be loaded.
///
/// Each message includes its cause, so no variant also gives it as `source()`: an
/// error-chain printer (anyhow's `{:#}`) would show it twice.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration from the environment: {0}")]
    Env(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the configuration: `file` (if any), then the given environment variables
    /// (pass `std::env::vars()`), over the defaults.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (mut table, origin) = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                    path: path.to_owned(),
                    error,
                })?;
                let table = text
                    .parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?;
                (table, Some(path.to_owned()))
            }
            None => (toml::Table::new(), None),
        };
        let mut from_env = Vec::new();
        for (name, value) in env {
            let Some(key) = name.strip_prefix("AIRLOCK_") else {
                continue;
            };
            // Variables read by other parts (logging, the command line's `--config`)
            // are not configuration keys.
            if matches!(key, "LOG" | "LOG_FORMAT" | "CONFIG") {
                continue;
            }
            let path: Vec<String> = if key == "TARGET" {
                vec!["targets".to_owned(), "default".to_owned()]
            } else {
                key.split("__").map(str::to_ascii_lowercase).collect()
            };
            set_path(&mut table, &path, scalar(&value)).map_err(ConfigError::Env)?;
            from_env.push(name);
        }
        let mut config: Config = table.try_into().map_err(|e: toml::de::Error| {
            let message = e.message().to_owned();
            match origin.clone() {
                Some(path) if from_env.is_empty() => ConfigError::Parse { path, message },
                _ if from_env.is_empty() => ConfigError::Invalid(message),
                _ => ConfigError::Invalid(format!(
                    "{message} (environment variables read as configuration: {})",
                    from_env.join(", ")
                )),
            }
        })?;
        from_env.sort();
        config.origin = Origin {
            file: origin,
            env: from_env,
            flags: Vec::new(),
        };
        config.check()?;
        Ok(config)
    }

    /// Checks what serde cannot: relations between values.
    pub fn check(&self) -> Result<(), ConfigError> {
        if !self.targets.contains_key("default") && self.targets.is_empty() {
            return Err(ConfigError::Invalid(
                "no targets configured: set targets.default".into(),
            ));
        }
        for name in self.targets.keys() {
            airlock_intent::TargetName::parse(name).map_err(ConfigError::Invalid)?;
        }
        if self.limits.max_ops == 0 || self.limits.max_depth < 4 || self.limits.max_file_bytes == 0
        {
            return Err(ConfigError::Invalid(
                "limits must allow at least one op, depth 4 and one byte".into(),
            ));
        }
        let policy = &self.policy;
        if policy.path.is_some() && policy.url.is_some() {
            return Err(ConfigError::Invalid(
                "policy.path and policy.url are both set: choose the embedded policy or a remote one".into(),
            ));
        }
        if policy.timeout_ms == 0 || policy.connect_timeout_ms == 0 || policy.concurrency == 0 {
            return Err(ConfigError::Invalid(
                "policy.timeout_ms, policy.connect_timeout_ms and policy.concurrency must be at least 1".into(),
            ));
        }
        let review = &self.review;
        if let Some(url) = &review.webhook {
            check_webhook_url(url).map_err(ConfigError::Invalid)?;
            if review.webhook_timeout_ms == 0 {
                return Err(ConfigError::Invalid(
                    "review.webhook_timeout_ms must be at least 1".into(),
                ));
            }
        }
        if let Some(url) = &review.public_url {
            check_public_url(url).map_err(ConfigError::Invalid)?;
        }
        if !cfg!(feature = "review") && !review.listen.trim().eq_ignore_ascii_case("off") {
            return Err(ConfigError::Invalid(format!(
                "review.listen = {:?}: this airlock was built without the `review` feature, \
                 so it has no review endpoint; set review.listen = \"off\" (the default in \
                 such a build) and decide reviews with airlock approve/reject, or build \
                 airlock with its default features",
                review.listen
            )));
        }
        if review.tls_cert.is_some() != review.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "set both review.tls_cert and review.tls_key, or neither".into(),
            ));
        }
        if review.ttl_secs == 0 {
            return Err(ConfigError::Invalid(
                "review.ttl_secs must be at least 1".into(),
            ));
        }
        if self
            .telemetry
            .decision_log
            .as_deref()
            .is_some_and(|path| path.trim().is_empty())
        {
            return Err(ConfigError::Invalid(
                "telemetry.decision_log is empty: give a file path, or \"-\" for standard output"
                    .into(),
            ));
        }
        if self.apply.max_rows == 0 {
            return Err(ConfigError::Invalid(
                "apply.max_rows must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The results directory, defaulting to `<intents>/results`.
    pub fn results_dir(&self) -> PathBuf {
        self.results
            .clone()
            .unwrap_or_else(|| self.intents.join("results"))
    }

    /// The intent limits as the validator takes them.
    pub fn intent_limits(&self) -> airlock_intent::Limits {
        airlock_intent::Limits {
            max_bytes: self.limits.max_file_bytes,
            max_depth: self.limits.max_depth,
            max_ops: self.limits.max_ops,
        }
    }

    /// The signing key's path: configured, or `<state>/signing.key`.
    pub fn key_path(&self) -> PathBuf {
        self.key
            .clone()
            .unwrap_or_else(|| self.state.join("signing.key"))
    }

    /// A self-contained installation in `dir`: intents in `dir/intents`, state in
    /// `dir/state`, and the SQLite database `target` as the default target. The demo
    /// and the benchmarks run on it.
    pub fn in_dir(dir: &Path, target: &Path) -> Self {
        Self {
            intents: dir.join("intents"),
            state: dir.join("state"),
            targets: BTreeMap::from([(
                "default".to_owned(),
                format!("sqlite://{}", target.display()),
            )]),
            ..Self::default()
        }
    }

    /// The review time to live.
    pub fn review_ttl(&self) -> Duration {
        Duration::from_secs(self.review.ttl_secs)
    }

    /// The reviewer tokens file: configured, or `<state>/review-tokens.toml`.
    pub fn tokens_path(&self) -> PathBuf {
        self.review
            .tokens
            .clone()
            .unwrap_or_else(|| self.state.join("review-tokens.toml"))
    }

    /// Where the running daemon writes its review endpoint's URL.
    pub fn endpoint_file(&self) -> PathBuf {
        self.state.join("review-endpoint")
    }
}

/// Reads an environment value as a TOML scalar when it is one, else as a string.
fn scalar(value: &str) -> toml::Value {
    if let Ok(n) = value.parse::<i64>() {
        return toml::Value::Integer(n);
    }
    match value {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(value.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("empty key".into());
    };
    let mut current = table;
    for part in parents {
        let entry = current
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("{} is not a table", path.join(".")))?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

/// Checks a webhook URL: `http` or `https`, with a host, and no credentials before
/// the host. Returns the parsed URI. Error messages never repeat the URL (it may be
/// a secret).
pub fn check_webhook_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("review.webhook is not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("review.webhook must start with http:// or https://".to_owned());
    }
    match uri.authority() {
        Some(authority) if authority.as_str().contains('@') => Err(
            "review.webhook must not hold credentials before its host (user:password@)".to_owned(),
        ),
        Some(authority) if !authority.host().is_empty() => Ok(uri),
        _ => Err("review.webhook has no host".to_owned()),
    }
}

/// Checks the review endpoint's public address (links in messages point at it):
/// `http` or `https`, with a host, a path at most, no query or fragment. Returns it
/// without a trailing `/`.
pub fn check_public_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim_end_matches('/');
    if url.contains('#') {
        return Err(format!(
            "review.public_url {url:?} must not have a fragment"
        ));
    }
    let uri: Uri = trimmed
        .parse()
        .map_err(|e| format!("review.public_url {url:?} is not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!(
            "review.public_url {url:?} must start with http:// or https://"
        ));
    }
    if uri.authority().is_none_or(|a| a.host().is_empty()) {
        return Err(format!("review.public_url {url:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("review.public_url {url:?} must not have a query"));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_repeating_them() {
        assert!(check_webhook_url("https://hooks.slack.com/services/T0/B0/secret").is_ok());
        assert!(check_webhook_url("http://127.0.0.1:9/hook").is_ok());
        for bad in [
            "ftp://example.com/x",
            "hooks.slack.com/services/T0/B0/secret",
            "https://user:secret@example.com/x",
            "not a url secret",
            "",
        ] {
            let error = check_webhook_url(bad).unwrap_err();
            assert!(!error.contains("secret"), "{error}");
        }
        assert_eq!(
            check_public_url("https://review.example/").unwrap(),
            "https://review.example"
        );
        assert_eq!(
            check_public_url("https://example.com/airlock/").unwrap(),
            "https://example.com/airlock"
        );
        assert!(check_public_url("review.example").is_err());
        assert!(check_public_url("https://review.example/?a=b").is_err());
        assert!(check_public_url("https://review.example/#/x").is_err());
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_need_nothing() {
        let config = Config::load(None, env(&[])).unwrap();
        assert_eq!(config.intents, PathBuf::from("./intents"));
        assert_eq!(config.results_dir(), PathBuf::from("./intents/results"));
        assert_eq!(config.targets["default"], "sqlite://./.airlock/target.db");
    }

    #[test]
    fn the_decision_log_is_off_by_default_and_never_an_empty_path() {
        let config = Config::load(None, env(&[])).unwrap();
        assert_eq!(config.telemetry.decision_log, None);
        assert!(!config.telemetry.decision_log_values);
        let config = Config::load(
            None,
            env(&[
                ("AIRLOCK_TELEMETRY__DECISION_LOG", "-"),
                ("AIRLOCK_TELEMETRY__DECISION_LOG_VALUES", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(config.telemetry.decision_log.as_deref(), Some("-"));
        assert!(config.telemetry.decision_log_values);
        let error = Config::load(None, env(&[("AIRLOCK_TELEMETRY__DECISION_LOG", " ")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("telemetry.decision_log"), "{error}");
    }

    #[cfg(feature = "review")]
    #[test]
    fn the_review_endpoint_listens_by_default() {
        let config = Config::load(None, env(&[])).unwrap();
        assert_eq!(config.review.listen, "127.0.0.1:8080");
    }

    #[cfg(not(feature = "review"))]
    #[test]
    fn without_the_review_feature_a_listener_is_refused_and_off_is_the_default() {
        let config = Config::load(None, env(&[])).unwrap();
        assert_eq!(config.review.listen, "off");
        assert!(Config::load(None, env(&[("AIRLOCK_REVIEW__LISTEN", "OFF")])).is_ok());
        let error = Config::load(None, env(&[("AIRLOCK_REVIEW__LISTEN", "127.0.0.1:0")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("review.listen"), "{error}");
        assert!(error.contains("`review` feature"), "{error}");
    }

    #[test]
    fn file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.toml");
        std::fs::write(
            &path,
            "intents = \"/in\"\n[limits]\nmax_ops = 5\n[targets]\nother = \"sqlite://o.db\"\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&path),
            env(&[
                ("AIRLOCK_LIMITS__MAX_OPS", "7"),
                ("AIRLOCK_TARGET", "sqlite://t.db"),
                ("AIRLOCK_LOG", "debug"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(config.intents, PathBuf::from("/in"));
        assert_eq!(config.limits.max_ops, 7);
        assert_eq!(config.targets["default"], "sqlite://t.db");
        assert_eq!(config.targets["other"], "sqlite://o.db");
    }

    #[test]
    fn the_metrics_listener_is_off_unless_set() {
        let config = Config::load(None, env(&[])).unwrap();
        assert_eq!(config.telemetry.metrics_listen, "off");
        let config = Config::load(
            None,
            env(&[("AIRLOCK_TELEMETRY__METRICS_LISTEN", "127.0.0.1:9464")]),
        )
        .unwrap();
        assert_eq!(config.telemetry.metrics_listen, "127.0.0.1:9464");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.toml");
        std::fs::write(&path, "[limits]\nmax_opz = 5\n").unwrap();
        let err = Config::load(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(err.contains("max_opz"), "{err}");
        assert!(err.contains("airlock.toml"), "{err}");
        let err = Config::load(None, env(&[("AIRLOCK_INTENTZ", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("intentz"), "{err}");
        assert!(err.contains("AIRLOCK_INTENTZ"), "{err}");
        // `AIRLOCK_CONFIG` names the file (`--config`); it is not a key.
        assert!(Config::load(None, env(&[("AIRLOCK_CONFIG", "/x.toml")])).is_ok());
    }

    #[test]
    fn policy_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.toml");
        std::fs::write(
            &path,
            "[policy]\nurl = \"http://127.0.0.1:8181/v1/data/airlock/authz\"\ntimeout_ms = 50\n",
        )
        .unwrap();
        let config =
            Config::load(Some(&path), env(&[("AIRLOCK_POLICY__CONCURRENCY", "3")])).unwrap();
        assert_eq!(
            config.policy.url.as_deref(),
            Some("http://127.0.0.1:8181/v1/data/airlock/authz")
        );
        assert_eq!(config.policy.timeout_ms, 50);
        assert_eq!(config.policy.concurrency, 3);
        assert_eq!(config.policy.reload_ms, 1_000);
        assert!(config.policy.path.is_none());

        let err = Config::load(Some(&path), env(&[("AIRLOCK_POLICY__PATH", "./policies")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy.path and policy.url"), "{err}");
        let config = Config::load(
            None,
            env(&[("AIRLOCK_APPLY__ALLOW_PRIVILEGED_ROLE", "true")]),
        )
        .unwrap();
        assert!(config.apply.allow_privileged_role);
        assert!(!Config::default().apply.allow_privileged_role);
        let config = Config::load(None, env(&[("AIRLOCK_POLICY__PREVIEW", "true")])).unwrap();
        assert!(config.policy.preview);
    }

    #[test]
    fn bad_values_are_errors() {
        let err = Config::load(None, env(&[("AIRLOCK_APPLY__MAX_ROWS", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_rows"), "{err}");
        let err = Config::load(None, env(&[("AIRLOCK_LIMITS__MAX_OPS", "many")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid type"), "{err}");
    }
}
