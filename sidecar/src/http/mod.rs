//! The review endpoint: a JSON API under `/v1` and the web page at `/`, for human
//! approvers (docs/review-api.md has the rules; `GET /v1/openapi.json` the shapes).
//!
//! It runs inside `airlock run` on the daemon's tokio runtime, with a queue
//! connection of its own. Everything that decides goes through [`crate::review`] and
//! [`crate::undo`], the same code the CLI calls; this module adds authentication
//! ([`auth`]), HTTP and the page. Connections are served one hyper HTTP/1.1
//! connection per task, over plain TCP or, with `tls_cert` and `tls_key`, TLS
//! through the system OpenSSL (tokio-native-tls).
//!
//! The agent shares the pod's network, so nothing here trusts the caller: every
//! `/v1` route but the OpenAPI document and sign-in needs a reviewer token, and the
//! page's static files carry no data. Nor can it starve approvers of connections: at
//! most [`MAX_CONNECTIONS`] are served, and when they are all taken the one that has
//! gone longest without a reviewer's request in flight is closed to make room
//! ([`connections`]); a connection must finish its TLS handshake and send each
//! request head within [`HEAD_TIMEOUT`] (a total deadline, so trickling bytes does
//! not extend it).

pub mod api;
pub mod auth;
pub mod connections;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use crate::apply::Target;
use crate::config::Config;
use crate::queue::{CheckpointPolicy, Queue, QueueError};
use crate::seal::Sealer;

/// The web page's files, compiled into the binary (no front-end build step).
pub mod web {
    pub const INDEX_HTML: &str = include_str!("web/index.html");
    pub const APP_JS: &str = include_str!("web/app.js");
    pub const APP_CSS: &str = include_str!("web/app.css");
}

/// The OpenAPI 3.1 document of `/v1`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// How often the queue is looked at for changes to push to watching pages.
const CHANGE_POLL: Duration = Duration::from_millis(250);
/// Longest a TLS handshake may take, and longest a request head may take to arrive
/// once the connection is ready for it: after the handshake, and after each response
/// on a kept-alive connection (hyper's header read timeout, one deadline for the
/// whole head however slowly its bytes trickle in). Clients send their request as
/// soon as they connect, so this is far more than any of them needs; it is what
/// bounds idle and trickling connections when the endpoint is not full.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest request body accepted (decisions and sign-ins are small).
const MAX_BODY: usize = 64 * 1024;
/// Connections served at once, so a neighbour opening sockets can never take the
/// rest of Airlock's file descriptors. A connection over the limit is given the slot
/// of the one that has gone longest without a reviewer's request in flight
/// ([`connections`]); it is closed only when every slot serves a reviewer. Under a
/// flood, a connection keeps its slot for as long as this many others take to
/// arrive, which must outlast an approver's TLS handshake: 1,024 does with room to
/// spare (256 and 512 did not; docs/review-api.md has the measurements).
pub const MAX_CONNECTIONS: usize = 1024;
/// File descriptors kept for the rest of Airlock (state and target databases, the
/// intent directory, logs, webhooks) when sizing the endpoint under the process's
/// open-file limit.
const FD_RESERVE: u64 = 256;
/// Connections the kernel may hold for the endpoint before it accepts them (capped
/// by `net.core.somaxconn`, 4096 by default since Linux 5.4). Larger than the
/// number of sockets a hoarder holds at once, so it cannot fill the queue and leave
/// an approver's connection waiting for the kernel to retry it.
const LISTEN_BACKLOG: u32 = 4096;
/// Connections accepted in a row before the accept loop lets the new ones read
/// their first request head: far fewer than the connection limit, so a burst of
/// accepts never closes, to make room, a connection that has not yet been able to
/// show it carries a reviewer's request.
const ACCEPT_BURST: usize = 32;
/// Failed sign-ins held waiting at once; past that they are answered at once.
const MAX_PENALISED: usize = 64;

/// The page may load only its own files and talk only to this endpoint.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; \
    form-action 'self'";

/// Why the endpoint could not start.
///
/// Each message includes its cause, so no variant also gives it as `source()`: an
/// error-chain printer (anyhow's `{:#}`) would show it twice.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("review.listen {listen:?}: {error}")]
    Bind {
        listen: String,
        error: std::io::Error,
    },
    #[error("review TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// The endpoint's shared state.
pub struct Shared {
    queue: Arc<Mutex<Queue>>,
    state_dir: PathBuf,
    sealer: Arc<Sealer>,
    checkpoints: CheckpointPolicy,
    targets: BTreeMap<String, Arc<dyn Target>>,
    auth: auth::Auth,
    wake: Box<dyn Fn() + Send + Sync>,
    changes: watch::Receiver<i64>,
    stop: watch::Receiver<bool>,
    tls: bool,
    /// `scheme://host[:port]` of `review.public_url`, an origin the page may have.
    public_origin: Option<String>,
    max_rows: u64,
    previews: api::Previews,
    undo_lock: tokio::sync::Mutex<()>,
    penalty: Semaphore,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("state_dir", &self.state_dir)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Tells the pipeline to look at the queue now (a decision was made).
    fn wake(&self) {
        (self.wake)();
    }

    /// A queue connection of its own, sealing what it writes.
    fn open_queue(&self) -> Result<Queue, QueueError> {
        Ok(Queue::open(&self.state_dir)?.with_sealer(self.sealer.clone(), self.checkpoints))
    }
}

/// What the daemon hands the endpoint.
pub struct Parts {
    pub sealer: Arc<Sealer>,
    pub checkpoints: CheckpointPolicy,
    pub targets: BTreeMap<String, Arc<dyn Target>>,
    /// Wakes the pipeline.
    pub wake: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts").finish_non_exhaustive()
    }
}

/// The routes, for serving and for tests.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/app.js", get(script))
        .route("/app.css", get(style))
        .route("/healthz", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route(
            "/v1/session",
            get(api::whoami).post(api::sign_in).delete(api::sign_out),
        )
        .route("/v1/intents", get(api::list_intents))
        .route("/v1/intents/{id}", get(api::intent))
        .route("/v1/intents/{id}/approve", post(api::approve))
        .route("/v1/intents/{id}/reject", post(api::reject))
        .route("/v1/runs", get(api::runs))
        .route("/v1/runs/{run}", get(api::run))
        .route("/v1/runs/{run}/undo", post(api::undo_run))
        .route("/v1/events", get(api::events))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let fixed = [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in fixed {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    response
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn page() -> Response {
    file("text/html; charset=utf-8", web::INDEX_HTML)
}

async fn script() -> Response {
    file("text/javascript; charset=utf-8", web::APP_JS)
}

async fn style() -> Response {
    file("text/css; charset=utf-8", web::APP_CSS)
}

async fn openapi() -> Response {
    file("application/json", OPENAPI)
}

async fn health() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// The review endpoint's listening socket (and its TLS set-up), bound before
/// anything else starts: an address that is taken, or a certificate that does not
/// load, stops `airlock run` before it has created a file, and `airlock run --check`
/// tries both without starting.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
    acceptor: Option<tokio_native_tls::TlsAcceptor>,
    url: String,
}

impl Listener {
    /// Binds the address `config.review.listen` names, with TLS when
    /// `review.tls_cert` and `review.tls_key` are set; `None` when it is `off`.
    pub async fn bind(config: &Config) -> Result<Option<Self>, EndpointError> {
        let listen = config.review.listen.trim();
        if listen.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let acceptor = tls_acceptor(config)?;
        let bind_error = |error| EndpointError::Bind {
            listen: listen.to_owned(),
            error,
        };
        let listener = bind(listen).await.map_err(bind_error)?;
        let address = listener.local_addr().map_err(bind_error)?;
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        Ok(Some(Self {
            listener,
            acceptor,
            url: format!("{scheme}://{address}"),
        }))
    }

    /// The URL the endpoint answers on, `http(s)://host:port` (the port the system
    /// picked when `listen` asked for port 0).
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// A running endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// The URL it answers on (`http(s)://host:port`).
    pub url: String,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    watcher_stop: Arc<AtomicBool>,
    file: PathBuf,
}

impl Endpoint {
    /// Starts the endpoint `config.review` describes on `listener` (bound by
    /// [`Listener::bind`]), or returns `None` when there is none (`off`).
    pub async fn start(
        config: &Config,
        parts: Parts,
        listener: Option<Listener>,
    ) -> Result<Option<Self>, EndpointError> {
        let Some(Listener {
            listener,
            acceptor,
            url,
        }) = listener
        else {
            info!(
                message = "review endpoint off (review.listen = \"off\"); decide with airlock approve/reject"
            );
            return Ok(None);
        };

        let queue =
            Queue::open(&config.state)?.with_sealer(parts.sealer.clone(), parts.checkpoints);
        let (stop_tx, stop_rx) = watch::channel(false);
        let watcher_stop = Arc::new(AtomicBool::new(false));
        let changes = watch_changes(Queue::open(&config.state)?, watcher_stop.clone());
        let tokens = config.tokens_path();
        let auth = auth::Auth::new(
            tokens.clone(),
            Duration::from_secs(config.review.session_ttl_secs.max(60)),
        );
        if auth.tokens().is_empty() {
            warn!(
                message = "no reviewer tokens yet: nobody can use the review endpoint; add one with `airlock token add`",
                file = %tokens.display()
            );
        }
        let state = AppState(Arc::new(Shared {
            queue: Arc::new(Mutex::new(queue)),
            state_dir: config.state.clone(),
            sealer: parts.sealer,
            checkpoints: parts.checkpoints,
            targets: parts.targets,
            auth,
            wake: parts.wake,
            changes,
            stop: stop_rx.clone(),
            tls: acceptor.is_some(),
            public_origin: config.review.public_url.as_deref().and_then(origin_of),
            max_rows: config.apply.max_rows,
            previews: api::Previews::default(),
            undo_lock: tokio::sync::Mutex::new(()),
            penalty: Semaphore::new(MAX_PENALISED),
        }));
        let app = router(state.clone());
        let limit = connection_limit();
        let server = tokio::spawn(accept_loop(listener, acceptor, app, state, limit, stop_rx));

        let file = config.endpoint_file();
        write_atomically(&file, &format!("{url}\n")).map_err(|error| EndpointError::Write {
            path: file.clone(),
            error,
        })?;
        info!(message = "review endpoint listening", url = %url, tokens = %tokens.display());
        Ok(Some(Self {
            url,
            stop: stop_tx,
            server,
            watcher_stop,
            file,
        }))
    }

    /// Stops taking requests, ends event streams and lets requests in flight
    /// finish, up to `deadline`.
    pub async fn stop(self, deadline: tokio::time::Instant) {
        let _ = self.stop.send(true);
        self.watcher_stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.file);
        if tokio::time::timeout_at(deadline, self.server)
            .await
            .is_err()
        {
            warn!(
                message = "review endpoint requests still running at the end of the grace period"
            );
        }
    }
}

/// How many connections the endpoint may serve: [`MAX_CONNECTIONS`], raising the
/// process's soft open-file limit (toward its hard limit) to fit them beside
/// [`FD_RESERVE`], or fewer if the hard limit is lower.
fn connection_limit() -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let wanted = MAX_CONNECTIONS as u64 + FD_RESERVE;
    let limit = getrlimit(Resource::Nofile);
    if let Some(current) = limit.current
        && current < wanted
    {
        let raised = Rlimit {
            current: Some(limit.maximum.map_or(wanted, |max| max.min(wanted))),
            maximum: limit.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            warn!(message = "cannot raise the open-file limit", %error);
        }
    }
    let Some(current) = getrlimit(Resource::Nofile).current else {
        return MAX_CONNECTIONS;
    };
    let fits = usize::try_from(current.saturating_sub(FD_RESERVE)).unwrap_or(MAX_CONNECTIONS);
    let limit = fits.clamp(16, MAX_CONNECTIONS);
    if limit < MAX_CONNECTIONS {
        warn!(
            message = "the open-file limit leaves the review endpoint fewer connections; raise `ulimit -n`",
            open_files = current,
            connections = limit,
            wanted = MAX_CONNECTIONS
        );
    }
    limit
}

/// Listens on `listen` (`host:port`, the first address it resolves to that binds)
/// with a [`LISTEN_BACKLOG`] queue.
async fn bind(listen: &str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for address in tokio::net::lookup_host(listen).await? {
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        };
        let bound = socket.and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(address)?;
            socket.listen(LISTEN_BACKLOG)
        });
        match bound {
            Ok(listener) => return Ok(listener),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address to listen on")
    }))
}

fn tls_acceptor(config: &Config) -> Result<Option<tokio_native_tls::TlsAcceptor>, EndpointError> {
    let (cert, key) = match (&config.review.tls_cert, &config.review.tls_key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        _ => {
            return Err(EndpointError::Tls(
                "set both review.tls_cert and review.tls_key, or neither".into(),
            ));
        }
    };
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| EndpointError::Tls(format!("{}: {e}", path.display())))
    };
    let identity = native_tls::Identity::from_pkcs8(&read(cert)?, &read(key)?).map_err(|e| {
        EndpointError::Tls(format!(
            "{} and {}: {e} (the key must be PKCS#8 PEM, `BEGIN PRIVATE KEY`)",
            cert.display(),
            key.display()
        ))
    })?;
    let acceptor = native_tls::TlsAcceptor::builder(identity)
        .min_protocol_version(Some(native_tls::Protocol::Tlsv12))
        .build()
        .map_err(|e| EndpointError::Tls(e.to_string()))?;
    Ok(Some(acceptor.into()))
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_native_tls::TlsAcceptor>,
    app: Router,
    state: AppState,
    limit: usize,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    let mut slots = connections::Slots::default();
    // Connections closed to make room since the endpoint last had a free slot.
    let mut evicted: Option<u64> = None;
    let mut burst = 0;
    loop {
        burst += 1;
        if burst >= ACCEPT_BURST {
            burst = 0;
            tokio::task::yield_now().await;
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(message = "review endpoint cannot accept a connection", %error);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Forget finished connections, then make room if the endpoint is full.
        while let Some(ended) = connections.try_join_next_with_id() {
            slots.remove(match ended {
                Ok((id, ())) => id,
                Err(error) => error.id(),
            });
        }
        if slots.len() < limit {
            if let Some(count) = evicted.take() {
                info!(
                    message = "review endpoint below its connection limit again",
                    limit,
                    closed_to_make_room = count
                );
            }
        } else if slots.evict() {
            let count = evicted.get_or_insert_with(|| {
                warn!(
                    message = "review endpoint at its connection limit; closing the connections idle longest to make room",
                    limit
                );
                0
            });
            *count += 1;
        } else {
            warn!(
                message = "review endpoint at its connection limit with every connection serving a reviewer; closing the new one",
                limit,
                %peer
            );
            drop(stream);
            continue;
        }
        let slot = connections::Slot::new();
        let task = {
            let (app, state, slot, stop, tls) = (
                app.clone(),
                state.clone(),
                slot.clone(),
                stop.clone(),
                tls.clone(),
            );
            connections.spawn(async move {
                match tls {
                    None => serve(stream, app, state, slot, stop).await,
                    Some(tls) => {
                        // No TLS state (tens of KiB) for a connection until it says
                        // something: a hoard of silent ones costs only their sockets.
                        let handshake = async {
                            stream.readable().await?;
                            tls.accept(stream).await.map_err(std::io::Error::other)
                        };
                        match tokio::time::timeout(HEAD_TIMEOUT, handshake).await {
                            Ok(Ok(stream)) => serve(stream, app, state, slot, stop).await,
                            Ok(Err(error)) => {
                                debug!(message = "TLS handshake failed", %peer, %error)
                            }
                            Err(_) => debug!(message = "TLS handshake timed out", %peer),
                        }
                    }
                }
            })
        };
        slots.insert(slot, task);
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Serves one connection, keeping `slot` told whether a reviewer's request is in
/// flight.
async fn serve<S>(
    stream: S,
    app: Router,
    state: AppState,
    slot: Arc<connections::Slot>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let app = hyper_util::service::TowerToHyperService::new(app);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let reviewer = state
            .auth
            .vouches_for(request.headers(), api::SESSION_COOKIE);
        let serving = slot.serving(reviewer);
        let response = app.call(request);
        async move {
            let response = response.await?;
            // The request is in flight until hyper has sent the whole body (an event
            // stream's included) and drops it.
            Ok::<_, Infallible>(response.map(|body| {
                Body::new(body.map_frame(move |frame| {
                    let _in_flight = &serving;
                    frame
                }))
            }))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                debug!(message = "review connection ended with an error", %error);
            }
        }
        () = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// The origin (`scheme://authority`) of a URL.
fn origin_of(url: &str) -> Option<String> {
    let uri: axum::http::Uri = url.parse().ok()?;
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}

/// Completes once the endpoint is told to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Polls the queue for changes (from this process or the CLI) on a thread of its
/// own and publishes a marker that grows with each.
fn watch_changes(queue: Queue, stop: Arc<AtomicBool>) -> watch::Receiver<i64> {
    let first = queue.change_marker().unwrap_or(0);
    let (tx, rx) = watch::channel(first);
    let spawned = std::thread::Builder::new()
        .name("airlock-review-watch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) && !tx.is_closed() {
                std::thread::sleep(CHANGE_POLL);
                match queue.change_marker() {
                    Ok(marker) => {
                        tx.send_if_modified(|current| {
                            let changed = *current != marker;
                            *current = marker;
                            changed
                        });
                    }
                    Err(error) => debug!(message = "cannot poll the queue for changes", %error),
                }
            }
        });
    if let Err(error) = spawned {
        warn!(message = "cannot start the change watcher; pages will not update live", %error);
    }
    rx
}

/// The endpoint file is in the state directory: mode 0600 like every file there.
fn write_atomically(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    crate::state::write_private(path, text.as_bytes())
}
