//! A remote Open Policy Agent, asked over its REST Data API.
//!
//! `POST <url>` (e.g. `http://127.0.0.1:8181/v1/data/airlock/authz`) with
//! `{"input": <input document v2>}`; OPA answers `{"result": <result document v1>,
//! "decision_id": "…"}`, with no `result` key when the document is undefined and a
//! `decision_id` only when its decision log is on. The decision names the URL as its
//! policy and carries the `decision_id`, so an audit can find OPA's own log entry.
//!
//! Fail closed (DESIGN invariant 4): a refused connection, a timeout, a status other
//! than 2xx (401 included: a wrong token is the operator's to fix, never a deny), or
//! a body that is not a JSON object is [`PolicyError::Unavailable`]; the intent stays
//! queued and is retried. An undefined result is a deny with reason
//! [`super::UNDEFINED_REASON`].
//!
//! Bounded: connecting takes at most `connect_timeout`, a whole request at most
//! `timeout`, at most `concurrency` requests are in flight, and an answer is read up
//! to [`MAX_ANSWER_BYTES`]. In a batch ([`RemotePolicy::evaluate_all`]), once one
//! request cannot reach the server (connect error or timeout), the requests not yet
//! sent fail at once with the same error: a dead server costs one timeout per batch,
//! not one per intent.
//!
//! Plain HTTP only: OPA normally runs beside Airlock on the loopback interface;
//! elsewhere, put a TLS-terminating proxy in front. Credentials never go in the URL
//! (refused), only in a bearer token read from a file, re-read every
//! `reload` so a rotated Secret is picked up, and never logged.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use serde_json::Value;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tracing::warn;

use super::{Decision, PolicyError};

/// The largest answer read from the server.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// How to reach a remote policy.
#[derive(Clone, Debug)]
pub struct RemoteOptions {
    /// The Data API URL of the policy's package, `http://host:port/v1/data/...`.
    pub url: String,
    /// A file holding a bearer token sent as `Authorization: Bearer <token>`.
    pub bearer_token_file: Option<PathBuf>,
    /// The longest one decision may take, connecting included.
    pub timeout: Duration,
    /// The longest connecting may take.
    pub connect_timeout: Duration,
    /// Most requests in flight at once (at least 1).
    pub concurrency: usize,
    /// How often the token file is re-read.
    pub reload: Duration,
}

impl RemoteOptions {
    /// Options for `url` with the defaults of the `[policy]` configuration section.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            bearer_token_file: None,
            timeout: Duration::from_millis(2_000),
            connect_timeout: Duration::from_millis(500),
            concurrency: 16,
            reload: Duration::from_millis(1_000),
        }
    }
}

/// A client for one OPA Data API URL. Cheap to clone; clones share the connection
/// pool and the concurrency limit.
#[derive(Clone, Debug)]
pub struct RemotePolicy {
    inner: Arc<Remote>,
}

#[derive(Debug)]
struct Remote {
    uri: Uri,
    url: String,
    client: Client<HttpConnector, Full<Bytes>>,
    permits: Semaphore,
    timeout: Duration,
    token: Option<TokenFile>,
}

/// The bearer token and where it comes from. The value is only ever put in a
/// sensitive header; `Debug` does not show it.
struct TokenFile {
    path: PathBuf,
    reload: Duration,
    value: RwLock<HeaderValue>,
    read_at: Mutex<Instant>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("path", &self.path)
            .field("value", &"<redacted>")
            .finish()
    }
}

/// The request body, serialised without copying the input.
#[derive(Serialize)]
struct Query<'a> {
    input: &'a Value,
}

/// Why a batch stopped sending: the first transport failure.
type Tripped = OnceLock<String>;

impl RemotePolicy {
    /// Checks the URL and reads the token file. Connects lazily, at the first request.
    pub fn new(options: RemoteOptions) -> Result<Self, PolicyError> {
        let bad_url = |message: String| PolicyError::Load {
            path: options.url.clone(),
            message,
        };
        let uri: Uri = options
            .url
            .parse()
            .map_err(|e| bad_url(format!("not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad_url(
                    "https is not supported: run OPA beside Airlock over plain HTTP on the loopback \
                     interface, or put a TLS-terminating proxy in front of it"
                        .to_owned(),
                ));
            }
            _ => return Err(bad_url("the URL must start with http://".to_owned())),
        }
        let Some(authority) = uri.authority() else {
            return Err(bad_url("the URL has no host".to_owned()));
        };
        if authority.as_str().contains('@') {
            // Only the URL is recorded as the policy's identity and logged; a secret
            // in it would end up in both.
            return Err(PolicyError::Load {
                path: "policy.url".to_owned(),
                message: "credentials in the URL are not allowed: use policy.bearer_token_file"
                    .to_owned(),
            });
        }
        let token = match &options.bearer_token_file {
            Some(path) => Some(TokenFile {
                value: RwLock::new(read_token(path)?),
                path: path.clone(),
                reload: options.reload,
                read_at: Mutex::new(Instant::now()),
            }),
            None => None,
        };
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(options.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            inner: Arc::new(Remote {
                url: uri.to_string(),
                uri,
                client,
                permits: Semaphore::new(options.concurrency.clamp(1, Semaphore::MAX_PERMITS)),
                timeout: options.timeout,
                token,
            }),
        })
    }

    /// The URL asked: the identity every decision of this policy names.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Re-reads the token file if `reload` has passed since it was last read. A file
    /// that cannot be read keeps the previous token (and is logged).
    pub fn refresh(&self) {
        let Some(token) = &self.inner.token else {
            return;
        };
        {
            let mut read_at = token.read_at.lock().unwrap_or_else(PoisonError::into_inner);
            if read_at.elapsed() < token.reload {
                return;
            }
            *read_at = Instant::now();
        }
        match read_token(&token.path) {
            Ok(value) => *token.value.write().unwrap_or_else(PoisonError::into_inner) = value,
            Err(error) => warn!(
                message = "cannot re-read the policy bearer token; keeping the previous one",
                %error
            ),
        }
    }

    /// Asks for one decision.
    pub async fn evaluate(&self, input: &Value) -> Result<Decision, PolicyError> {
        self.inner.evaluate(input, None).await
    }

    /// Asks for a batch of decisions at once (at most `concurrency` in flight), on
    /// `runtime`, blocking the calling thread until all are answered. Answers are in
    /// the order of `inputs`. Must not be called from inside the runtime.
    pub fn evaluate_all(
        &self,
        runtime: &Handle,
        inputs: Vec<Value>,
    ) -> Vec<Result<Decision, PolicyError>> {
        let count = inputs.len();
        let tripped = Arc::new(Tripped::new());
        let mut answers: Vec<Option<Result<Decision, PolicyError>>> =
            (0..count).map(|_| None).collect();
        runtime.block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for (index, input) in inputs.into_iter().enumerate() {
                let remote = self.inner.clone();
                let tripped = tripped.clone();
                tasks.spawn(async move { (index, remote.evaluate(&input, Some(&tripped)).await) });
            }
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((index, answer)) => {
                        if let Some(slot) = answers.get_mut(index) {
                            *slot = Some(answer);
                        }
                    }
                    Err(error) => warn!(message = "policy request task failed", %error),
                }
            }
        });
        answers
            .into_iter()
            .map(|answer| {
                answer.unwrap_or_else(|| {
                    Err(PolicyError::Eval(
                        "the policy request was lost (its task failed)".to_owned(),
                    ))
                })
            })
            .collect()
    }
}

impl Remote {
    fn unavailable(&self, message: impl Into<String>) -> PolicyError {
        PolicyError::Unavailable {
            url: self.url.clone(),
            message: message.into(),
        }
    }

    async fn evaluate(
        &self,
        input: &Value,
        tripped: Option<&Tripped>,
    ) -> Result<Decision, PolicyError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| self.unavailable("the client is shutting down"))?;
        if let Some(first) = tripped.and_then(OnceLock::get) {
            return Err(self.unavailable(format!("not sent, another request failed: {first}")));
        }
        let result = tokio::time::timeout(self.timeout, self.exchange(input)).await;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure::Transport(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        };
        match outcome {
            Ok(decision) => Ok(decision),
            Err(Failure::Transport(message)) => {
                if let Some(tripped) = tripped {
                    let _ = tripped.set(message.clone());
                }
                Err(self.unavailable(message))
            }
            Err(Failure::Answer(message)) => Err(self.unavailable(message)),
            Err(Failure::Policy(error)) => Err(error),
        }
    }

    /// One request and its answer, without the time limit.
    async fn exchange(&self, input: &Value) -> Result<Decision, Failure> {
        let body = serde_json::to_vec(&Query { input })
            .map_err(|e| Failure::Policy(PolicyError::Eval(format!("input document: {e}"))))?;
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json");
        if let Some(token) = &self.token {
            let value = token
                .value
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            request = request.header(AUTHORIZATION, value);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failure::Policy(PolicyError::Eval(format!("request: {e}"))))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| Failure::Transport(error_chain(&e)))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| Failure::Answer(format!("reading the answer: {}", error_chain(&*e))))?
            .to_bytes();
        if !status.is_success() {
            return Err(Failure::Answer(status_message(status, &bytes)));
        }
        let answer: Value = serde_json::from_slice(&bytes).map_err(|e| {
            Failure::Answer(format!(
                "answered {status} with a body that is not JSON: {e}"
            ))
        })?;
        let Value::Object(mut answer) = answer else {
            return Err(Failure::Answer(format!(
                "answered {status} with JSON that is not an object"
            )));
        };
        let decision_id = match answer.remove("decision_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(id),
            Some(other) => Some(other.to_string()),
        };
        Decision::from_result(answer.remove("result"), &self.url, decision_id)
            .map_err(Failure::Policy)
    }
}

/// How one exchange failed.
enum Failure {
    /// The server could not be reached or did not answer in time.
    Transport(String),
    /// The server answered, but not with a decision (status, body).
    Answer(String),
    /// The policy's answer is malformed, or the request could not be built.
    Policy(PolicyError),
}

/// `answered 500 Internal Server Error: <OPA's message>`, with a hint for 401/403.
fn status_message(status: StatusCode, body: &[u8]) -> String {
    // OPA's errors are {"code": "...", "message": "..."}.
    let detail = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let detail: String = detail.trim().chars().take(200).collect();
    let hint = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            " (the server refused the credentials: check policy.bearer_token_file)"
        }
        _ => "",
    };
    if detail.is_empty() {
        format!("answered {status}{hint}")
    } else {
        format!("answered {status}{hint}: {detail}")
    }
}

/// An error and its sources on one line: hyper's top-level messages ("client error
/// (Connect)") say little without them.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(next) = source {
        let text = next.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = next.source();
    }
    parts.join(": ")
}

/// Reads a bearer token file: its contents without surrounding whitespace.
fn read_token(path: &std::path::Path) -> Result<HeaderValue, PolicyError> {
    let load = |message: String| PolicyError::Load {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| load(format!("bearer token: {e}")))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(load("the bearer token file is empty".to_owned()));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        load("the bearer token holds characters not allowed in an HTTP header".to_owned())
    })?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let err = |url: &str| {
            RemotePolicy::new(RemoteOptions::new(url))
                .unwrap_err()
                .to_string()
        };
        assert!(err("https://opa:8181/v1/data/airlock/authz").contains("https"));
        assert!(err("ftp://opa/v1").contains("http://"));
        assert!(err("not a url").contains("not a URL") || err("not a url").contains("http://"));
        let secret = err("http://user:hunter2@opa:8181/v1/data/airlock/authz");
        assert!(secret.contains("credentials"), "{secret}");
        assert!(!secret.contains("hunter2"), "{secret}");
        let ok = RemotePolicy::new(RemoteOptions::new(
            "http://127.0.0.1:8181/v1/data/airlock/authz",
        ))
        .unwrap();
        assert_eq!(ok.url(), "http://127.0.0.1:8181/v1/data/airlock/authz");
    }

    #[test]
    fn token_files_are_read_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret-token\n").unwrap();
        let mut options = RemoteOptions::new("http://127.0.0.1:8181/v1/data/airlock/authz");
        options.bearer_token_file = Some(path.clone());
        let policy = RemotePolicy::new(options.clone()).unwrap();
        let shown = format!("{policy:?}");
        assert!(!shown.contains("s3cret"), "{shown}");

        std::fs::write(&path, "  \n").unwrap();
        let err = RemotePolicy::new(options.clone()).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = RemotePolicy::new(options).unwrap_err().to_string();
        assert!(err.contains("bearer token"), "{err}");
    }

    #[test]
    fn status_messages_carry_opa_errors_and_hints() {
        let body = br#"{"code": "unauthorized", "message": "missing authentication"}"#;
        let message = status_message(StatusCode::UNAUTHORIZED, body);
        assert!(message.contains("401 Unauthorized"), "{message}");
        assert!(message.contains("bearer_token_file"), "{message}");
        assert!(message.ends_with("missing authentication"), "{message}");
        let message = status_message(StatusCode::BAD_GATEWAY, b"");
        assert_eq!(message, "answered 502 Bad Gateway");
    }
}
