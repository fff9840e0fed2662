//! Webhook: tells humans that an intent awaits review, with a JSON `POST` to a URL
//! (`[review] webhook`), for example a Slack incoming webhook.
//!
//! The body is `{"text": "<one line for humans>", "airlock": {...}}`: `text` is what
//! Slack (and the chat tools that copy its incoming-webhook format) shows, and
//! `airlock` carries the same facts as data for other receivers:
//! `{"event": "review", "id", "run", "target", "digest", "reason", "reasons",
//! "approvals", "deadline", "url"}`, where `url` is the intent's page on the review
//! endpoint (`<public_url>/#/intent/<id>`).
//!
//! **Best effort.** A message is sent after the queue transaction that put its intent
//! in review commits, on a task of its own: the pipeline never waits for it, and an
//! intent is never held back by a webhook that fails. Each attempt may take
//! `webhook_timeout_ms`; a connection error, a timeout, a 5xx or a 429 is retried
//! twice (after 1 s, then 2 s); any other answer that is not 2xx is not retried. A
//! crash (or a stop) between the commit and the delivery loses that message, and at
//! most [`MAX_PENDING`] messages wait at once (more are dropped, with a warning): the
//! review endpoint's list of pending intents is the source of truth, the webhook only
//! a nudge.
//!
//! **Hostile text.** The intent's `reason` comes from the agent. In `airlock` it is
//! plain JSON data (at most [`JSON_REASON_CHARS`] characters). In `text` it is cut to
//! one line of at most [`TEXT_REASON_CHARS`] characters, and the whole of `text` is
//! escaped as Slack asks (`&`, `<`, `>` become `&amp;`, `&lt;`, `&gt;`), so an agent
//! cannot write links or mentions such as `<!channel>` into the message.
//!
//! **Secret URLs.** A Slack webhook URL is a credential: its path is the secret. Only
//! the URL's scheme and host are ever logged or shown by `Debug`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_tls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::{Value, json};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::clock::timestamp;
use crate::config::{check_public_url, check_webhook_url};

/// Attempts per message.
pub const ATTEMPTS: u32 = 3;
/// The pauses before the second and third attempts.
const BACKOFF: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(2)];
/// Most messages waiting for delivery at once.
pub const MAX_PENDING: usize = 1_024;
/// The longest reason shown in `text`, in characters.
pub const TEXT_REASON_CHARS: usize = 300;
/// The longest reason sent in `airlock.reason`, in characters.
pub const JSON_REASON_CHARS: usize = 4_000;
/// Most policy reasons listed in `text` (the rest are counted).
const TEXT_REASONS: usize = 5;
/// The most of a receiver's answer that is read (and thrown away).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// An intent that just entered review: what its message says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewNotice {
    pub id: String,
    pub run: String,
    pub target: String,
    /// `sha256:<hex>` of the intent's bytes: what an approval will be bound to.
    pub digest: String,
    /// The agent's reason (untrusted).
    pub reason: String,
    /// The policy's reasons for sending it to review.
    pub reasons: Vec<String>,
    /// Distinct approvals needed.
    pub approvals: u32,
    /// When the review expires, in ms since the epoch.
    pub deadline_ms: i64,
}

/// A webhook sender. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct Webhook {
    inner: Arc<Inner>,
}

struct Inner {
    uri: Uri,
    /// `scheme://host[:port]`: all of the URL that may be logged.
    origin: String,
    /// The review endpoint's address as approvers reach it, without a trailing `/`.
    base: String,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    pending: AtomicUsize,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("origin", &self.inner.origin)
            .field("base", &self.inner.base)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// The intent's page on the review endpoint: `<base>/#/intent/<id>`.
pub fn link(base: &str, id: &str) -> String {
    format!("{}/#/intent/{id}", base.trim_end_matches('/'))
}

/// Escapes text as Slack asks: `&`, `<` and `>` as HTML entities, so nothing in it
/// becomes a link, a mention or a channel-wide notification.
pub fn slack_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` on one line: control characters (newlines included) and runs of white
/// space become one space, and at most `max` characters are kept (`…` marks a cut).
pub fn one_line(text: &str, max: usize) -> String {
    let spaced: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let words = spaced.split_whitespace().collect::<Vec<_>>().join(" ");
    truncate(&words, max)
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => {
            let mut out = text[..cut].to_owned();
            out.push('…');
            out
        }
        None => text.to_owned(),
    }
}

/// The message for `notice`, whose page is `url` (see [`link`]).
pub fn message(notice: &ReviewNotice, url: &str) -> Value {
    let deadline = timestamp(notice.deadline_ms);
    let mut text = format!(
        "Airlock: intent {} (run {}, target {}) awaits review. Agent's reason: \"{}\".",
        notice.id,
        notice.run,
        notice.target,
        one_line(&notice.reason, TEXT_REASON_CHARS)
    );
    if !notice.reasons.is_empty() {
        let shown: Vec<String> = notice
            .reasons
            .iter()
            .take(TEXT_REASONS)
            .map(|r| one_line(r, TEXT_REASON_CHARS))
            .collect();
        let _ = write!(text, " Policy: {}", shown.join("; "));
        if notice.reasons.len() > TEXT_REASONS {
            let _ = write!(text, " (and {} more)", notice.reasons.len() - TEXT_REASONS);
        }
        text.push('.');
    }
    let _ = write!(
        text,
        " Needs {} approval{} before {deadline}: {url}",
        notice.approvals,
        if notice.approvals == 1 { "" } else { "s" },
    );
    json!({
        "text": slack_escape(&text),
        "airlock": {
            "event": "review",
            "id": notice.id,
            "run": notice.run,
            "target": notice.target,
            "digest": notice.digest,
            "reason": truncate(&notice.reason, JSON_REASON_CHARS),
            "reasons": notice.reasons,
            "approvals": notice.approvals,
            "deadline": deadline,
            "url": url,
        }
    })
}

/// What one delivery attempt came to.
enum Attempt {
    Delivered(StatusCode),
    /// Worth another try: no connection, no answer in time, 5xx or 429.
    Retry(String),
    /// Not worth another try: the receiver refused the message.
    Refused(String),
}

impl Webhook {
    /// A sender to `url` whose messages link to the review endpoint at `public_base`;
    /// each attempt may take `timeout`. Fails on a URL [`check_webhook_url`] or
    /// [`check_public_url`] refuses, a zero timeout, or a TLS set-up that cannot be
    /// made. Connects lazily, at the first message.
    pub fn new(url: &str, public_base: &str, timeout: Duration) -> Result<Self, String> {
        let uri = check_webhook_url(url)?;
        let base = check_public_url(public_base)?;
        if timeout.is_zero() {
            return Err("review.webhook_timeout_ms must be at least 1".to_owned());
        }
        let origin = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("http"),
            uri.authority().map_or("", |a| a.as_str())
        );
        let tls = native_tls::TlsConnector::new()
            .map_err(|e| format!("review.webhook: cannot set up TLS: {e}"))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let connector = HttpsConnector::from((http, tls.into()));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            inner: Arc::new(Inner {
                uri,
                origin,
                base,
                client,
                timeout,
                pending: AtomicUsize::new(0),
            }),
        })
    }

    /// The webhook's scheme and host: all of its URL that may be shown.
    pub fn origin(&self) -> &str {
        &self.inner.origin
    }

    /// The page of intent `id` on the review endpoint.
    pub fn link(&self, id: &str) -> String {
        link(&self.inner.base, id)
    }

    /// Sends the message for `notice` on a task of `runtime`, and returns at once.
    pub fn notify(&self, runtime: &Handle, notice: &ReviewNotice) {
        let inner = &self.inner;
        if inner.pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
            inner.pending.fetch_sub(1, Ordering::SeqCst);
            warn!(
                message = "too many webhook messages waiting; this one is dropped",
                id = %notice.id,
                endpoint = %inner.origin,
                pending = MAX_PENDING
            );
            return;
        }
        let body = match serde_json::to_vec(&message(notice, &self.link(&notice.id))) {
            Ok(body) => Bytes::from(body),
            Err(error) => {
                inner.pending.fetch_sub(1, Ordering::SeqCst);
                warn!(message = "cannot encode the webhook message", id = %notice.id, %error);
                return;
            }
        };
        let inner = inner.clone();
        let id = notice.id.clone();
        runtime.spawn(async move {
            inner.deliver(&id, body).await;
            inner.pending.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

impl Inner {
    async fn deliver(&self, id: &str, body: Bytes) {
        for attempt in 1..=ATTEMPTS {
            let outcome = match tokio::time::timeout(self.timeout, self.post(body.clone())).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    Attempt::Retry(format!("no answer within {} ms", self.timeout.as_millis()))
                }
            };
            match outcome {
                Attempt::Delivered(status) => {
                    debug!(message = "webhook message delivered", id, endpoint = %self.origin, status = status.as_u16(), attempt);
                    return;
                }
                Attempt::Refused(error) => {
                    warn!(message = "webhook refused the message; not retried", id, endpoint = %self.origin, %error, attempt);
                    return;
                }
                Attempt::Retry(error) => {
                    let pause = usize::try_from(attempt - 1)
                        .ok()
                        .and_then(|i| BACKOFF.get(i));
                    match pause {
                        Some(pause) if attempt < ATTEMPTS => {
                            debug!(message = "webhook delivery failed; retrying", id, endpoint = %self.origin, %error, attempt, retry_in_ms = pause.as_millis() as u64);
                            tokio::time::sleep(*pause).await;
                        }
                        _ => {
                            warn!(message = "webhook delivery failed; giving up (the intent still awaits review)", id, endpoint = %self.origin, %error, attempts = attempt);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// One attempt, without the time limit.
    async fn post(&self, body: Bytes) -> Attempt {
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("airlock/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body));
        let request = match request {
            Ok(request) => request,
            Err(error) => return Attempt::Refused(format!("cannot build the request: {error}")),
        };
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(error) => return Attempt::Retry(error_chain(&error)),
        };
        let status = response.status();
        // Read (a bounded part of) the answer so the connection can be reused.
        let _ = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await;
        if status.is_success() {
            Attempt::Delivered(status)
        } else if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Attempt::Retry(format!("status {}", status.as_u16()))
        } else {
            Attempt::Refused(format!("status {}", status.as_u16()))
        }
    }
}

/// An error and its sources, on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(reason: &str) -> ReviewNotice {
        ReviewNotice {
            id: "del-1".into(),
            run: "run-a".into(),
            target: "default".into(),
            digest: "sha256:00".into(),
            reason: reason.into(),
            reasons: vec!["deletes from customers need human review".into()],
            approvals: 2,
            deadline_ms: 1_790_000_000_000,
        }
    }

    #[test]
    fn links_point_at_the_intent_page() {
        assert_eq!(
            link("https://review.example/", "del-1"),
            "https://review.example/#/intent/del-1"
        );
    }

    #[test]
    fn the_message_carries_the_facts_and_escapes_the_agent() {
        let hostile = "clean up <!channel> & <https://evil.example|click>\nnow";
        let message = message(&notice(hostile), "https://review.example/#/intent/del-1");
        let text = message["text"].as_str().unwrap();
        assert!(text.contains("del-1") && text.contains("run-a"), "{text}");
        assert!(
            text.contains("deletes from customers need human review"),
            "{text}"
        );
        assert!(text.contains("Needs 2 approvals before 2026-"), "{text}");
        assert!(
            text.ends_with("https://review.example/#/intent/del-1"),
            "{text}"
        );
        assert!(
            text.contains("clean up &lt;!channel&gt; &amp; &lt;https://evil.example|click&gt; now"),
            "{text}"
        );
        assert!(!text.contains('<') && !text.contains('>') && !text.contains('\n'));
        let data = &message["airlock"];
        assert_eq!(data["event"], "review");
        assert_eq!(data["reason"], hostile);
        assert_eq!(data["approvals"], 2);
        assert_eq!(data["url"], "https://review.example/#/intent/del-1");
        assert_eq!(
            data["reasons"][0],
            "deletes from customers need human review"
        );
        assert!(data["deadline"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn long_reasons_are_cut() {
        let long = "é".repeat(TEXT_REASON_CHARS * 20);
        let message = message(&notice(&long), "https://r.example/#/intent/del-1");
        let text = message["text"].as_str().unwrap();
        assert!(text.contains(&format!("{}…", "é".repeat(TEXT_REASON_CHARS))));
        assert!(!text.contains(&"é".repeat(TEXT_REASON_CHARS + 1)));
        let reason = message["airlock"]["reason"].as_str().unwrap();
        assert_eq!(reason.chars().count(), JSON_REASON_CHARS + 1);
        assert_eq!(one_line(" a\r\n\tb  c ", 10), "a b c");
        assert_eq!(one_line("abcdef", 3), "abc…");
    }
}
