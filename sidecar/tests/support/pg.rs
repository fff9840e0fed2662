//! Test support for the PostgreSQL target: a fresh database per test on the real
//! server, queries that answer JSON, waiting on conditions with a deadline, and a
//! TCP proxy between Airlock and the server that can cut connections on command.
//!
//! The server is `DATABASE_URL`, or `postgres://postgres@127.0.0.1:5432/postgres`.
//! It must be running: CI starts one, and a missing server fails the tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::NoTls;

/// How long any awaited condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The server the tests use.
pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = split_query(url);
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| i + authority_start);
    format!("{}/{database}{query}", &base[..path_start])
}

/// `url` with `param` (`key=value`) added to its query.
pub fn with_param(url: &str, param: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{param}")
}

/// `url` pointing at `addr` instead of its host and port.
pub fn with_address(url: &str, addr: SocketAddr) -> String {
    let (base, query) = split_query(url);
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| i + authority_start);
    let authority = &base[authority_start..path_start];
    let user = authority
        .rfind('@')
        .map_or(String::new(), |i| authority[..=i].to_owned());
    format!(
        "{}{user}{addr}{}{query}",
        &base[..authority_start],
        &base[path_start..]
    )
}

fn split_query(url: &str) -> (&str, String) {
    match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    }
}

/// The server's address, from the URL (`host:port`, default port 5432).
pub async fn server_addr() -> SocketAddr {
    let url = server_url();
    let (base, _) = split_query(&url);
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let rest = &base[authority_start..];
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    tokio::net::lookup_host(&host_port)
        .await
        .expect("resolve the server's address")
        .next()
        .expect("the server's host has an address")
}

/// Connects with tokio-postgres directly (no pool, no TLS), for test set-up and
/// checks.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test server ({e}); is it running?"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database created for one test, dropped (with its connections) when this is.
pub struct TestDb {
    /// The database's name.
    pub name: String,
    /// A URL for it, with the server URL's options.
    pub url: String,
    /// A connection to it for set-up and checks.
    pub client: tokio_postgres::Client,
}

impl TestDb {
    /// Creates a uniquely named database and runs `schema` in it.
    pub async fn create(schema: &str) -> TestDb {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "airlock_test_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(&server_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create the test database");
        let url = with_database(&server_url(), &name);
        let client = connect(&url).await;
        client.batch_execute(schema).await.expect("test schema");
        TestDb { name, url, client }
    }

    /// Rows of a query, each as a JSON object keyed by column.
    pub async fn rows(&self, sql: &str) -> Vec<Value> {
        let wrapped = format!("SELECT coalesce(json_agg(x), '[]')::text FROM ({sql}) AS x");
        let row = self
            .client
            .query_one(&wrapped, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let text: String = row.get(0);
        match serde_json::from_str(&text).expect("json_agg is JSON") {
            Value::Array(rows) => rows,
            other => panic!("not an array: {other}"),
        }
    }

    /// The one value of a one-row, one-column query, as JSON.
    pub async fn value(&self, sql: &str) -> Value {
        let rows = self.rows(sql).await;
        assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
        rows[0]
            .as_object()
            .and_then(|o| o.values().next().cloned())
            .expect("one column")
    }

    /// Terminates the backends Airlock opened to this database (application name
    /// `airlock`), answering how many.
    pub async fn terminate_airlock_backends(&self) -> i64 {
        let row = self
            .client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'airlock' AND pid <> pg_backend_pid()",
                &[&self.name],
            )
            .await
            .expect("terminate backends");
        row.get(0)
    }

    /// Waits until a backend of Airlock's is waiting for a lock in this database.
    pub async fn wait_for_airlock_blocked(&self) {
        let (client, name) = (&self.client, &self.name);
        eventually("an Airlock backend waiting on a lock", || async move {
            let row = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                     AND application_name = 'airlock' AND wait_event_type = 'Lock'",
                    &[name],
                )
                .await
                .ok()?;
            (row.get::<_, i64>(0) > 0).then_some(())
        })
        .await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime; do the async work on a thread of
        // its own.
        let name = self.name.clone();
        let handle = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                if let Ok((client, connection)) =
                    tokio_postgres::connect(&server_url(), NoTls).await
                {
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await;
                }
            });
        });
        let _ = handle.join();
    }
}

/// Polls `f` until it answers `Some`, or panics naming `what` after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(value) = f().await {
            return value;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A TCP proxy on 127.0.0.1 in front of the server, whose connections the test can
/// cut: all at once, after a number of bytes sent to the server, or when a byte
/// pattern (say `COMMIT`) goes by. Only for unencrypted connections
/// (`sslmode=disable`), since patterns must be visible.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    upstream: SocketAddr,
    /// Bumped to cut every open connection.
    generation: tokio::sync::watch::Sender<u64>,
    fault: Mutex<Option<Fault>>,
    /// Bytes sent to the server so far, over every connection.
    sent: AtomicU64,
    /// Connections cut by a fault (not by `cut_all`).
    cuts: AtomicU64,
    /// While set, the server looks stopped: new connections are closed at once.
    down: AtomicBool,
}

#[derive(Clone, Debug)]
enum Fault {
    /// Forward this many more bytes to the server, then cut that connection.
    AfterBytes(u64),
    /// When a chunk going to the server contains the pattern, forward it (or not),
    /// then cut that connection.
    OnPattern { pattern: Vec<u8>, forward: bool },
}

impl Proxy {
    /// Starts a proxy to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (generation, _) = tokio::sync::watch::channel(0);
        let state = Arc::new(ProxyState {
            upstream,
            generation,
            fault: Mutex::new(None),
            sent: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            down: AtomicBool::new(false),
        });
        let accept_state = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = Arc::clone(&accept_state);
                tokio::spawn(async move {
                    serve(client, state).await;
                });
            }
        });
        Proxy { addr, state, task }
    }

    /// Makes the server look stopped: every open connection is cut and new ones
    /// are closed as soon as they are accepted, until [`Proxy::bring_up`].
    pub fn take_down(&self) {
        self.state.down.store(true, Ordering::SeqCst);
        self.cut_all();
    }

    /// Ends [`Proxy::take_down`]: new connections reach the server again.
    pub fn bring_up(&self) {
        self.state.down.store(false, Ordering::SeqCst);
    }

    /// Closes every connection open now (new ones are accepted as usual).
    pub fn cut_all(&self) {
        self.state.generation.send_modify(|g| *g += 1);
    }

    /// Cuts the connection that carries the `bytes`th byte sent to the server from
    /// now on, right after forwarding it (0: the next chunk is not forwarded).
    pub fn cut_after(&self, bytes: u64) {
        *self.state.fault.lock().expect("fault") = Some(Fault::AfterBytes(bytes));
    }

    /// Cuts the connection whose next chunk to the server contains `pattern`,
    /// after forwarding that chunk when `forward`, else dropping it.
    pub fn cut_on(&self, pattern: &[u8], forward: bool) {
        *self.state.fault.lock().expect("fault") = Some(Fault::OnPattern {
            pattern: pattern.to_vec(),
            forward,
        });
    }

    /// Removes an armed fault that has not fired.
    pub fn disarm(&self) {
        *self.state.fault.lock().expect("fault") = None;
    }

    /// Connections cut by a fault so far.
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }

    /// Bytes sent to the server so far.
    pub fn sent(&self) -> u64 {
        self.state.sent.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut_all();
    }
}

/// Forwards one connection until either side closes, a fault fires, or every
/// connection is cut.
async fn serve(client: TcpStream, state: Arc<ProxyState>) {
    if state.down.load(Ordering::SeqCst) {
        return;
    }
    let mut cut = state.generation.subscribe();
    let Ok(upstream) = TcpStream::connect(state.upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let to_server = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let (forward, then_cut) = state.decide(&buf[..n]);
            if upstream_write.write_all(&buf[..forward]).await.is_err() {
                return;
            }
            state.sent.fetch_add(forward as u64, Ordering::SeqCst);
            if then_cut {
                // Data first, then FIN: the server reads what was forwarded.
                let _ = upstream_write.flush().await;
                let _ = upstream_write.shutdown().await;
                state.cuts.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    };
    let to_client = async {
        let _ = tokio::io::copy(&mut upstream_read, &mut client_write).await;
    };
    tokio::select! {
        () = to_server => {}
        () = to_client => {}
        _ = cut.changed() => {}
    }
    // Dropping every half closes both sockets.
}

impl ProxyState {
    /// How many bytes of `chunk` to forward, and whether to cut afterwards.
    fn decide(&self, chunk: &[u8]) -> (usize, bool) {
        let mut fault = self.fault.lock().expect("fault");
        match fault.clone() {
            None => (chunk.len(), false),
            Some(Fault::AfterBytes(left)) => {
                let n = chunk.len() as u64;
                if n < left {
                    *fault = Some(Fault::AfterBytes(left - n));
                    (chunk.len(), false)
                } else {
                    *fault = None;
                    (usize::try_from(left).unwrap_or(chunk.len()), true)
                }
            }
            Some(Fault::OnPattern { pattern, forward }) => {
                let found = chunk
                    .windows(pattern.len().max(1))
                    .any(|window| window == pattern.as_slice());
                if !found {
                    return (chunk.len(), false);
                }
                *fault = None;
                (if forward { chunk.len() } else { 0 }, true)
            }
        }
    }
}
