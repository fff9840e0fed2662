//! [`Policy`]: the one thing the pipeline asks, whichever engine answers — embedded
//! Rego that follows its files, or a remote Open Policy Agent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::runtime::Handle;

use super::{
    Decision, InputContext, PolicyError, PolicySource, ReloadingPolicy, RemoteOptions,
    RemotePolicy, build_input,
};

/// The configured policy engine.
#[derive(Debug)]
pub enum Policy {
    /// Rego evaluated in-process (the built-in policy, or files that are reloaded
    /// when they change).
    Embedded(ReloadingPolicy),
    /// An Open Policy Agent asked over HTTP.
    Remote(RemotePolicy),
}

/// What to build a [`Policy`] from: the `[policy]` configuration section, which the
/// daemon (and `airlock policy eval`) turn into these options, so this stage never
/// reads the configuration itself.
#[derive(Clone, Debug)]
pub struct PolicyOptions {
    /// A `.rego` file or a directory of them, evaluated in-process and reloaded when
    /// its files change; with neither this nor `url`, the built-in policy.
    pub path: Option<PathBuf>,
    /// An Open Policy Agent Data API URL: the policy is asked remotely.
    pub url: Option<String>,
    /// A file holding a bearer token for `url`.
    pub bearer_token_file: Option<PathBuf>,
    /// How long one remote decision may take, connecting included.
    pub timeout: Duration,
    /// How long connecting to `url` may take.
    pub connect_timeout: Duration,
    /// Most remote decisions in flight at once.
    pub concurrency: usize,
    /// How often policy files (and the token file) are checked for changes.
    pub reload: Duration,
}

impl Policy {
    /// The policy `options` describe: `url` means a remote OPA, `path` embedded Rego
    /// from files, neither the built-in policy. Fails when the files do not load, the
    /// URL is unusable, or the token file cannot be read.
    pub fn new(options: &PolicyOptions) -> Result<Self, PolicyError> {
        let reload = options.reload;
        if let Some(url) = &options.url {
            return Ok(Self::Remote(RemotePolicy::new(RemoteOptions {
                url: url.clone(),
                bearer_token_file: options.bearer_token_file.clone(),
                timeout: options.timeout,
                connect_timeout: options.connect_timeout,
                concurrency: options.concurrency,
                reload,
            })?));
        }
        if let Some(file) = &options.bearer_token_file {
            return Err(PolicyError::Load {
                path: file.display().to_string(),
                message: "policy.bearer_token_file is set but policy.url is not: a token is \
                          only sent to a remote policy"
                    .to_owned(),
            });
        }
        let source = match &options.path {
            Some(path) => PolicySource::Path(path.clone()),
            None => PolicySource::Default,
        };
        Ok(Self::Embedded(ReloadingPolicy::load(source, reload)?))
    }

    /// What decides, for logs: the embedded policy's identity now, or the URL.
    pub fn identity(&self) -> String {
        match self {
            Self::Embedded(policy) => policy.current().identity().to_owned(),
            Self::Remote(policy) => policy.url().to_owned(),
        }
    }

    /// Picks up changed policy files or a rotated token, at most once per reload
    /// interval. Cheap when nothing is due; call it as often as convenient.
    pub fn refresh(&self) {
        match self {
            Self::Embedded(policy) => {
                policy.refresh();
            }
            Self::Remote(policy) => policy.refresh(),
        }
    }

    /// Decides every input document, answers in the same order. Embedded policies
    /// evaluate on the calling thread; remote ones concurrently on `runtime` (this
    /// blocks until all are answered; do not call it from inside the runtime).
    pub fn evaluate_all(
        &self,
        runtime: &Handle,
        inputs: Vec<Value>,
    ) -> Vec<Result<Decision, PolicyError>> {
        match self {
            Self::Embedded(policy) => {
                let current = policy.current();
                inputs.iter().map(|input| current.evaluate(input)).collect()
            }
            Self::Remote(policy) => policy.evaluate_all(runtime, inputs),
        }
    }

    /// Decides one input document (see [`Policy::evaluate_all`]).
    pub fn evaluate(&self, runtime: &Handle, input: Value) -> Result<Decision, PolicyError> {
        self.evaluate_all(runtime, vec![input])
            .pop()
            .unwrap_or_else(|| Err(PolicyError::Eval("no answer".to_owned())))
    }
}

/// What `airlock policy eval` shows: the input document a policy would see for an
/// intent file, and the policy's answer.
#[derive(Debug)]
pub struct Trial {
    /// The input document (version 2).
    pub input: Value,
    /// The decision, or why there is none.
    pub decision: Result<Decision, PolicyError>,
}

/// Why an intent file could not be tried against a policy.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    /// The file is not a valid intent; every problem is listed.
    #[error(transparent)]
    Invalid(#[from] airlock_intent::Invalid),
}

/// Validates the bytes of an intent file and decides it with `policy`, as the
/// pipeline would for a run with no other intents (empty `run.counts`) and an
/// unsealed envelope (`keyid` null).
pub fn try_intent(
    bytes: &[u8],
    file: &str,
    validator: &airlock_intent::Validator,
    policy: &Policy,
    runtime: &Handle,
) -> Result<Trial, TrialError> {
    let intent = validator.validate(bytes)?;
    let digest = crate::seal::digest(bytes);
    let input = build_input(&InputContext {
        intent: &intent,
        run_counts: &BTreeMap::new(),
        digest: &digest,
        keyid: None,
        file,
        target: intent.target.as_str(),
        preview: None,
        names: None,
    });
    let decision = policy.evaluate(runtime, input.clone());
    Ok(Trial { input, decision })
}
