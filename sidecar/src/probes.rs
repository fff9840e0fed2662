//! The metrics and health listener (`[telemetry] metrics_listen`): `GET /metrics`
//! (Prometheus, OpenMetrics text), `GET /healthz` (the daemon's loops are alive) and
//! `GET /readyz` (the state is writable, the policy loaded or reachable, every
//! target reachable), on a listener of their own, independent of the review
//! endpoint.
//!
//! It is served by hyper directly, not by the review endpoint's axum router, so
//! that the SQLite-only build (`--no-default-features`, without axum) serves it too:
//! three fixed routes need no router. Nothing here is behind a token: the answers
//! hold counts, states and configured target names, never intents; bind it where
//! only the scraper and the kubelet reach it (the default address is loopback).
//!
//! A probe storm cannot load the targets: readiness is checked by one probe at a
//! time and its answer reused for [`READY_CACHE`], each check bounded by
//! [`CHECK_TIMEOUT`]; at most [`MAX_CONNECTIONS`] connections are served at once,
//! each for at most [`CONNECTION_TIMEOUT`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{info, warn};

use crate::apply::Target;
use crate::clock::now_ms;
use crate::config::Config;
use crate::decide::{Policy, PolicyError};
use crate::lifecycle::State;
use crate::metrics::{self, Loop};
use crate::queue::Queue;

/// How long one readiness check (the state, the policy, one target) may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a readiness answer is reused.
pub const READY_CACHE: Duration = Duration::from_secs(2);
/// How many connections are served at once; more wait for a slot.
pub const MAX_CONNECTIONS: usize = 16;
/// How long one connection may stay open.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// A loop whose heartbeat is older than this is taken for stuck (`/healthz` 503),
/// unless the intake rescan interval is longer (then three of those).
pub const STALE_HEARTBEAT: Duration = Duration::from_secs(60);

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `metrics_listen` is not `host:port`.
    #[error("telemetry.metrics_listen = {listen:?}: not a host:port address ({problem})")]
    Address { listen: String, problem: String },
    /// The address could not be bound.
    #[error("telemetry.metrics_listen = {listen:?}: cannot listen: {error}")]
    Bind {
        listen: String,
        error: std::io::Error,
    },
    /// The probes' queue connection could not be opened.
    #[error("metrics listener: {0}")]
    Queue(#[from] crate::queue::QueueError),
    /// The endpoint file could not be written.
    #[error("cannot write {path}: {error}")]
    Write {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

/// The bound metrics listener, before it serves.
#[derive(Debug)]
pub struct MetricsListener {
    listener: TcpListener,
    /// Where it listens, as `http://host:port`.
    pub url: String,
}

impl MetricsListener {
    /// Binds `[telemetry] metrics_listen`, or answers `None` when it is `off`.
    pub async fn bind(config: &Config) -> Result<Option<Self>, ProbeError> {
        let listen = config.telemetry.metrics_listen.trim();
        if listen.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let addr: SocketAddr =
            listen
                .parse()
                .map_err(|e: std::net::AddrParseError| ProbeError::Address {
                    listen: listen.to_owned(),
                    problem: e.to_string(),
                })?;
        let bind_error = |error| ProbeError::Bind {
            listen: listen.to_owned(),
            error,
        };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        Ok(Some(Self {
            listener,
            url: format!("http://{local}"),
        }))
    }
}

/// What the probes look at.
#[derive(Debug)]
pub struct Parts {
    /// The daemon's state directory (a queue connection of the probes' own).
    pub state: std::path::PathBuf,
    pub policy: Arc<Policy>,
    pub targets: BTreeMap<String, Arc<dyn Target>>,
    /// How long a heartbeat may be old before its loop counts as stuck.
    pub stale: Duration,
}

/// The running listener.
#[derive(Debug)]
pub struct Probes {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    file: std::path::PathBuf,
}

impl Probes {
    /// Serves `listener` until [`Probes::stop`], and writes its URL to
    /// `<state>/metrics-endpoint` (useful with port 0).
    pub fn start(listener: MetricsListener, parts: Parts) -> Result<Self, ProbeError> {
        let queue = Queue::open(&parts.state)?;
        let file = parts.state.join("metrics-endpoint");
        crate::state::write_private(&file, format!("{}\n", listener.url).as_bytes()).map_err(
            |error| ProbeError::Write {
                path: file.clone(),
                error,
            },
        )?;
        let shared = Arc::new(Shared {
            queue: Arc::new(Mutex::new(queue)),
            parts,
            ready: tokio::sync::Mutex::new(None),
        });
        let (stop, mut stopped) = watch::channel(false);
        info!(message = "metrics and health listening", url = %listener.url);
        let task = tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
            loop {
                let permit = tokio::select! {
                    _ = stopped.changed() => return,
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                };
                let stream = tokio::select! {
                    _ = stopped.changed() => return,
                    accepted = listener.listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(error) => {
                            warn!(message = "metrics listener cannot accept", %error);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(shared.answer(request).await) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service);
                    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
                    drop(permit);
                });
            }
        });
        Ok(Self { stop, task, file })
    }

    /// Stops accepting; connections in flight end on their own timeout.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.file);
    }
}

/// One readiness answer and when it was made.
type Cached = Option<(Instant, bool, Value)>;

#[derive(Debug)]
struct Shared {
    queue: Arc<Mutex<Queue>>,
    parts: Parts,
    /// The last readiness answer; its lock also makes one probe check at a time.
    ready: tokio::sync::Mutex<Cached>,
}

impl Shared {
    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        match request.uri().path() {
            "/metrics" => self.metrics().await,
            "/healthz" => self.health(),
            "/readyz" => self.readiness().await,
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz, /readyz\n",
            ),
        }
    }

    async fn metrics(&self) -> Response<Full<Bytes>> {
        let metrics = metrics::global();
        let queue = self.queue.clone();
        let levels = tokio::task::spawn_blocking(move || match queue.lock() {
            Ok(queue) => queue.levels(),
            Err(poisoned) => poisoned.into_inner().levels(),
        })
        .await;
        match levels {
            Ok(Ok(levels)) => {
                for state in [State::Queued, State::AwaitingReview, State::Approved] {
                    let count = levels
                        .depth
                        .iter()
                        .find(|(s, _)| *s == state)
                        .map_or(0, |(_, n)| *n);
                    metrics.set_queue_depth(state, count);
                }
                let age = levels
                    .oldest_review
                    .map_or(0.0, |at| (now_ms() - at).max(0) as f64 / 1_000.0);
                metrics.set_review_oldest_age(age);
                metrics.set_checkpoint_lag(levels.checkpoint_lag);
            }
            Ok(Err(error)) => warn!(message = "metrics: cannot read the queue's levels", %error),
            Err(error) => warn!(message = "metrics: cannot read the queue's levels", %error),
        }
        for (name, target) in &self.parts.targets {
            if let Some(in_use) = target.pool_in_use() {
                metrics.set_pool_in_use(name, i64::try_from(in_use).unwrap_or(i64::MAX));
            }
        }
        match metrics.encode() {
            Ok(body) => {
                let mut response = Response::new(Full::new(Bytes::from(body)));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n",
            ),
        }
    }

    fn health(&self) -> Response<Full<Bytes>> {
        let now = now_ms();
        let stale = i64::try_from(self.parts.stale.as_millis()).unwrap_or(i64::MAX);
        let mut healthy = true;
        let mut loops = serde_json::Map::new();
        for which in Loop::ALL {
            let last = metrics::global().last_heartbeat(which);
            let age = now - last;
            let alive = last > 0 && age <= stale;
            healthy &= alive;
            loops.insert(
                which.as_str().to_owned(),
                json!({ "alive": alive, "heartbeat_age_ms": if last > 0 { Some(age) } else { None } }),
            );
        }
        let status = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(status, &json!({ "healthy": healthy, "loops": loops }))
    }

    async fn readiness(&self) -> Response<Full<Bytes>> {
        let mut cached = self.ready.lock().await;
        let fresh = cached
            .as_ref()
            .is_some_and(|(at, _, _)| at.elapsed() < READY_CACHE);
        if !fresh {
            let (ready, checks) = self.check_readiness().await;
            *cached = Some((Instant::now(), ready, checks));
        }
        let (ready, checks) = match cached.as_ref() {
            Some((_, ready, checks)) => (*ready, checks.clone()),
            None => (false, Value::Null),
        };
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(status, &json!({ "ready": ready, "checks": checks }))
    }

    /// Checks the state, the policy and every target, each within [`CHECK_TIMEOUT`].
    async fn check_readiness(&self) -> (bool, Value) {
        let mut checks = serde_json::Map::new();
        let mut ready = true;
        let mut note = |name: String, result: Result<String, String>| {
            ready &= result.is_ok();
            let value = match result {
                Ok(found) => json!({ "ready": true, "found": found }),
                Err(problem) => json!({ "ready": false, "problem": problem }),
            };
            checks.insert(name, value);
        };

        let queue = self.queue.clone();
        let state = tokio::task::spawn_blocking(move || match queue.lock() {
            Ok(mut queue) => queue.writable(),
            Err(poisoned) => poisoned.into_inner().writable(),
        });
        note(
            "state".into(),
            match tokio::time::timeout(CHECK_TIMEOUT, state).await {
                Ok(Ok(Ok(()))) => Ok("writable".into()),
                Ok(Ok(Err(error))) => Err(format!("the queue cannot be written: {error}")),
                Ok(Err(error)) => Err(format!("the check failed: {error}")),
                Err(_) => Err(format!("the queue stayed locked for {CHECK_TIMEOUT:?}")),
            },
        );

        let policy = match self.parts.policy.as_ref() {
            Policy::Embedded(embedded) => Ok(format!("loaded, {}", embedded.current().identity())),
            Policy::Remote(remote) => {
                let input = json!({});
                let asked = remote.evaluate(&input);
                match tokio::time::timeout(CHECK_TIMEOUT, asked).await {
                    // Any decision (or a malformed one) means the server answered.
                    Ok(Err(error @ PolicyError::Unavailable { .. })) => Err(error.to_string()),
                    Ok(_) => Ok(format!("{} answered", remote.url())),
                    Err(_) => Err(format!(
                        "{} did not answer within {CHECK_TIMEOUT:?}",
                        remote.url()
                    )),
                }
            }
        };
        note("policy".into(), policy);

        let asks = self.parts.targets.iter().map(|(name, target)| async move {
            let found = match tokio::time::timeout(CHECK_TIMEOUT, target.server()).await {
                Ok(Ok(Some(_))) => Ok("reachable".to_owned()),
                Ok(Ok(None)) => Ok("local file".to_owned()),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
            (format!("target {name}"), found)
        });
        for (name, found) in futures_util::future::join_all(asks).await {
            note(name, found);
        }
        (ready, Value::Object(checks))
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
