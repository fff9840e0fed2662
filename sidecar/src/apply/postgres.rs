//! The PostgreSQL target: applies intents to a PostgreSQL database through a small
//! pool of tokio-postgres connections.
//!
//! What it guarantees in the database:
//! - **One transaction per intent.** Every op, and the ledger row, run in one
//!   `READ COMMITTED` transaction (or in one savepoint of a chain's, below). Rows an
//!   update or delete touches are first read `FOR UPDATE` (their before-images),
//!   then written by their physical address (`tableoid`, `ctid`), so the images
//!   and the writes are the same row versions whatever other sessions do. Any error
//!   rolls the transaction back: there are never partial writes.
//! - **A chain is one transaction.** [`Target::apply_chain`] runs a run's
//!   consecutive intents in one transaction (at most 64 intents each), each
//!   under `SAVEPOINT airlock_intent` running exactly what apply runs; a failing
//!   intent is rolled back to its savepoint and ends the chain, and one COMMIT makes
//!   the rest durable. If the connection is lost, the rollback to the savepoint
//!   fails, or the COMMIT gets no answer, every intent of the chain not already in
//!   the ledger before it is a transient error (the retry waits on the intent locks
//!   the old transaction holds until the server has finished it, then finds the
//!   ledger rows of a commit that landed). If the server refuses the COMMIT (a
//!   deferred constraint), nothing was written and the chain is applied again one
//!   transaction per intent, so the intent to blame fails alone.
//! - **Exactly once.** The ledger (`airlock.ledger`, one row per applied intent with
//!   its undo images) is written in that same transaction. Before reading it, the
//!   transaction takes an advisory lock on the intent id, so a concurrent apply of
//!   the same intent (another task, another sidecar) waits, then finds the ledger
//!   row and answers `already`. An intent already in the ledger writes nothing; with
//!   another digest it is refused.
//! - **Undo is one transaction too.** [`Target::undo`] takes each intent's advisory
//!   lock and its ledger row `FOR UPDATE`, reads every row to revert `FOR UPDATE`,
//!   checks it still holds its after-image, writes its before-image back by
//!   `tableoid`/`ctid` (or inserts it), and marks the ledger row undone, all in one
//!   transaction; a conflict without `force` rolls all of it back.
//! - **Ambiguous commits are retryable.** If the connection is lost while COMMIT is
//!   in flight, nobody knows whether it landed: the error is transient, and the
//!   retry either applies the intent or finds it in the ledger.
//! - **The ledger migrates itself.** `airlock.schema_version` records its version;
//!   the first apply (per process) creates or migrates the `airlock` schema under an
//!   advisory lock, and skips all DDL when the version is current (so a role without
//!   `CREATE` works once a DBA has run Airlock's DDL). A ledger from a newer Airlock
//!   is a transient error: intents wait for an upgrade rather than fail. Intents may
//!   not write the `airlock` schema.
//!
//! Values: each part of an op (`values`, `key`, `set`, `expect`) is one JSON
//! parameter that PostgreSQL converts to the table's row type with
//! `json_populate_record` (see [`sql::pg`] for why), so every JSON value reaches its
//! column with the column's type: numbers and numeric strings for integer, numeric
//! and floating-point columns, booleans, strings for text, uuid, date, time and
//! timestamp(tz), enum and other types with a text form, any JSON for json/jsonb,
//! JSON arrays for array columns, null for NULL. **bytea** takes PostgreSQL's text
//! form: write hex as `"\\x0102ff"` (the JSON for `\x0102ff`); images render bytea
//! the same way. Numbers go through `f64` unless they are integers, so give
//! `numeric` values beyond 15 significant digits as strings (`"12345678901234567.89"`).
//! A value that does not convert fails the intent, naming the op, the column and
//! its type. Images are `row_to_json` of the row: keys are column names, values as
//! PostgreSQL renders them in JSON.
//!
//! Rows are identified in undo images by their primary key; a table without one is
//! keyed by `{"ctid": "(page,item)"}`, the address of the row version the op left
//! (valid until the row is next updated or the table rewritten; undo must compare
//! the after-image before trusting it).
//!
//! The catalog (columns, their types, the primary key) is read inside each intent's
//! transaction, once per table, so DDL between intents is always seen; that read is
//! pipelined with the ledger look-up and costs no extra round trip.
//!
//! Connections: opened lazily, so [`PostgresTarget::open`] is synchronous and a
//! database that is down does not stop Airlock from starting; connection errors are
//! transient apply errors. See [`PostgresTarget::open`] for the URL's options.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use airlock_intent::{Column, Intent, Op, Row, TableName};
use async_trait::async_trait;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
    Transaction,
};
use serde_json::Value;
use tokio_postgres::error::{Severity, SqlState};
use tokio_postgres::types::{ToSql, Type};

use super::common::{
    Columns, OpImages, check_delete, check_update, check_upsert, expect_failed, generated_values,
    image_table, key_not_unique, keys, ledger_hit, new_entry, no_row, not_in_ledger, on_not_unique,
    too_many_rows, undoing,
};
use super::sql::{self, Dialect, pg};
use super::{
    Applied, ApplyError, ApplyMeta, ErrorKind, Finish, Image, LedgerEntry, OpResult, Preview,
    ResolvedOp, Target, UndoImage, UndoReport, apply_each, check_canonical, check_target, codes,
    resolve_op, show, uncommitted,
};
use crate::clock::now_ms;

const DIALECT: Dialect = Dialect::Postgres;

/// Connections in the pool unless the URL says `pool_size=N`.
pub const DEFAULT_POOL_SIZE: usize = 8;

/// How long opening one connection may take unless the URL sets `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A PostgreSQL database that intents are applied to.
pub struct PostgresTarget {
    name: String,
    pool: Pool,
    pool_size: usize,
    tls: TlsMode,
    /// The ledger is known to exist at [`sql::LEDGER_VERSION`].
    ledger_ready: AtomicBool,
    /// Held while creating or migrating the ledger, so one task does it.
    ledger_init: tokio::sync::Mutex<()>,
    /// Whether the role must still be checked before applying ([`ROLE_UNCHECKED`],
    /// [`ROLE_REQUIRED`], [`ROLE_PASSED`]); see [`Target::check_role`].
    role: AtomicU8,
}

/// Nobody asked for a role check (a library user, a CLI tool).
const ROLE_UNCHECKED: u8 = 0;
/// The daemon asked for a check that has not passed yet: every new connection
/// checks the role, and a privileged one applies nothing.
const ROLE_REQUIRED: u8 = 1;
/// The role was checked and holds no powers beyond applying (or they are allowed).
const ROLE_PASSED: u8 = 2;

impl fmt::Debug for PostgresTarget {
    // Never the URL or the connection config: they may hold credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresTarget")
            .field("name", &self.name)
            .field("pool_size", &self.pool_size)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// How connections use TLS, from the URL's `sslmode` (libpq's meanings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// `disable`: never.
    Disable,
    /// `prefer` (the default) or `require`: TLS when the server offers it (always,
    /// for `require`), without checking the server's certificate, as libpq does.
    /// It protects against eavesdropping, not against an impostor.
    Unverified,
    /// `verify-ca`, or `require` with `sslrootcert`: the certificate must chain to a
    /// trusted root (the system's, or `sslrootcert`); the host name is not checked.
    VerifyCa,
    /// `verify-full`: the chain and the host name are checked.
    VerifyFull,
}

/// A `postgres://` URL taken apart: what tokio-postgres parses, and Airlock's own
/// options.
struct Settings {
    config: tokio_postgres::Config,
    pool_size: usize,
    tls: TlsMode,
    root_cert: Option<String>,
}

impl PostgresTarget {
    /// Prepares the target called `name` for the database at `url`
    /// (`postgres://` or `postgresql://`, libpq's URL form). Connects nothing yet:
    /// the first apply opens the first connection and creates the ledger.
    ///
    /// Besides tokio-postgres' options (`sslmode`, `connect_timeout`,
    /// `application_name`, `options`, `keepalives*`, `target_session_attrs`, ...), the
    /// URL's query may hold:
    /// - `pool_size=N`: at most N connections (default [`DEFAULT_POOL_SIZE`]);
    /// - `sslmode=verify-ca|verify-full` besides `disable|prefer|require` (see
    ///   [`TlsMode`]) and `sslrootcert=PATH` (a PEM file of trusted roots, read now).
    ///
    /// Defaults Airlock sets when the URL does not: `application_name=airlock`,
    /// `connect_timeout=10`, and TCP keepalives after 30 s idle, every 10 s, 3 probes,
    /// so a dead server is noticed within about a minute.
    ///
    /// Errors never repeat the URL, which may hold a password.
    pub fn open(name: &str, url: &str) -> Result<Self, ApplyError> {
        let settings = parse_url(url).map_err(|message| {
            ApplyError::permanent(format!("target {name:?}: {message}"))
                .with_code(codes::UNSUPPORTED_URL)
        })?;
        let connect_timeout = settings
            .config
            .get_connect_timeout()
            .copied()
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match settings.tls {
            TlsMode::Disable => {
                Manager::from_config(settings.config, tokio_postgres::NoTls, manager_config)
            }
            mode => {
                let connector =
                    tls_connector(mode, settings.root_cert.as_deref()).map_err(|message| {
                        ApplyError::permanent(format!("target {name:?}: {message}"))
                            .with_code(codes::UNSUPPORTED_URL)
                    })?;
                Manager::from_config(
                    settings.config,
                    postgres_native_tls::MakeTlsConnector::new(connector),
                    manager_config,
                )
            }
        };
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(connect_timeout))
            .recycle_timeout(Some(connect_timeout))
            .build()
            .map_err(|e| {
                ApplyError::permanent(format!("target {name:?}: cannot build the pool: {e}"))
            })?;
        Ok(Self {
            name: name.to_owned(),
            pool,
            pool_size: settings.pool_size,
            tls: settings.tls,
            ledger_ready: AtomicBool::new(false),
            ledger_init: tokio::sync::Mutex::new(()),
            role: AtomicU8::new(ROLE_UNCHECKED),
        })
    }

    /// The most connections this target opens.
    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// How connections use TLS.
    pub fn tls_mode(&self) -> TlsMode {
        self.tls
    }

    /// A pooled connection, with the ledger known to be ready.
    async fn client(&self) -> Result<Object, ApplyError> {
        let client =
            self.pool.get().await.map_err(|e| {
                pool_error(e).context(&format!("target {:?}: connecting", self.name))
            })?;
        if self.role.load(Ordering::Acquire) == ROLE_REQUIRED {
            let found = role_privileges(&client).await?;
            if !found.is_empty() {
                // The operator must fix the role (or allow it); intents wait.
                let mut error = privileged(&self.name, &found);
                error.kind = ErrorKind::Transient;
                return Err(error);
            }
            self.role.store(ROLE_PASSED, Ordering::Release);
        }
        if !self.ledger_ready.load(Ordering::Acquire) {
            let _init = self.ledger_init.lock().await;
            if !self.ledger_ready.load(Ordering::Acquire) {
                let mut client = client;
                migrate(&mut client)
                    .await
                    .map_err(|e| e.context("preparing the ledger (schema airlock)"))?;
                self.ledger_ready.store(true, Ordering::Release);
                return Ok(client);
            }
        }
        Ok(client)
    }

    /// Notes that the ledger seems gone (dropped behind Airlock's back), so the
    /// next apply recreates it, and says so.
    fn ledger_missing(&self, e: ApplyError) -> ApplyError {
        // Errors of an op (a table dropped mid-intent) are the op's, not the ledger's.
        if e.op.is_none() && matches!(e.code.as_deref(), Some("42P01" | "3F000")) {
            self.ledger_ready.store(false, Ordering::Release);
            let mut e = e.context("the ledger table is missing; the next attempt recreates it");
            e.kind = ErrorKind::Transient;
            return e.with_code(codes::LEDGER);
        }
        e
    }
}

impl PostgresTarget {
    /// Apply or preview of one intent, in a transaction of its own.
    async fn apply_one(
        &self,
        intent: &Intent,
        meta: &ApplyMeta,
        finish: Finish,
    ) -> Result<Applied, ApplyError> {
        check_target(&self.name, intent)?;
        let mut client = self.client().await?;
        match apply_intent(&mut client, intent, meta, finish).await {
            Ok(applied) => Ok(applied),
            Err(failure) => Err(self.report(&client, failure).await),
        }
    }

    /// The error to report for a failure, once its transaction has ended: for a
    /// value PostgreSQL could not convert, explained on the same connection
    /// outside any transaction; a missing ledger noted.
    async fn report(&self, client: &Object, failure: Failure<'_>) -> ApplyError {
        match failure {
            Failure {
                error,
                diagnose: Some(diagnosis),
            } => diagnosis.explain(client, error).await,
            Failure { error, .. } => self.ledger_missing(error),
        }
    }

    /// At most [`SUBTRANSACTIONS`] intents of a chain in one transaction.
    async fn apply_part(&self, part: &[(Intent, ApplyMeta)]) -> Vec<Result<Applied, ApplyError>> {
        let mut client = match self.client().await {
            Ok(client) => client,
            Err(error) => return vec![Err(error)],
        };
        match chain_transaction(&mut client, &self.name, part).await {
            ChainEnd::Done(mut results, failure) => {
                if let Some(failure) = failure {
                    results.push(Err(self.report(&client, failure).await));
                }
                results
            }
            ChainEnd::Uncommitted(results, why) => uncommitted(results, &self.ledger_missing(why)),
            ChainEnd::RolledBack => {
                drop(client);
                apply_each(self, part).await
            }
        }
    }
}

#[async_trait]
impl Target for PostgresTarget {
    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(&self, intent: &Intent, meta: &ApplyMeta) -> Result<Applied, ApplyError> {
        self.apply_one(intent, meta, Finish::Commit).await
    }

    async fn apply_chain(&self, chain: &[(Intent, ApplyMeta)]) -> Vec<Result<Applied, ApplyError>> {
        let mut results = Vec::with_capacity(chain.len());
        for part in chain.chunks(SUBTRANSACTIONS) {
            let part_results = self.apply_part(part).await;
            let complete =
                part_results.len() == part.len() && part_results.iter().all(Result::is_ok);
            results.extend(part_results);
            if !complete {
                break;
            }
        }
        results
    }

    async fn preview(&self, intent: &Intent, meta: &ApplyMeta) -> Result<Preview, ApplyError> {
        self.apply_one(intent, meta, Finish::Rollback)
            .await
            .map(Preview::from_applied)
    }

    async fn ledger_entry(&self, intent_id: &str) -> Result<Option<LedgerEntry>, ApplyError> {
        let client = self.client().await?;
        read_ledger(&client, intent_id)
            .await
            .map_err(|e| self.ledger_missing(e))
    }

    async fn undo(&self, intent_ids: &[String], force: bool) -> Result<UndoReport, ApplyError> {
        let mut client = self.client().await?;
        undo_intents(&mut client, intent_ids, force)
            .await
            .map_err(|e| self.ledger_missing(e))
    }

    async fn resolve(&self, intent: &Intent) -> Result<Vec<ResolvedOp>, ApplyError> {
        check_target(&self.name, intent)?;
        let mut client = self.client().await?;
        // The same catalog look-up apply makes ([`table_info`]), in a read-only
        // transaction on a pooled connection, so with the same search_path.
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(|e| pg_error(&e).context("beginning the name look-up"))?;
        let mut tables: HashMap<&TableName, TableInfo> = HashMap::new();
        let mut resolved = Vec::with_capacity(intent.ops.len());
        for (index, op) in intent.ops.iter().enumerate() {
            let info = match tables.get(op.table()) {
                Some(info) => info.clone(),
                None => {
                    let info = table_info(&tx, op.table())
                        .await
                        .map_err(|e| e.at_op(index, op))?;
                    tables.insert(op.table(), info.clone());
                    info
                }
            };
            let names = resolve_op(op, &info.schema, &info.name, &info.columns)
                .map_err(|e| e.at_op(index, op))?;
            resolved.push(names);
        }
        tx.rollback()
            .await
            .map_err(|e| pg_error(&e).context("ending the name look-up"))?;
        Ok(resolved)
    }

    async fn check_role(&self, allow_privileged: bool) -> Result<Vec<String>, ApplyError> {
        if !allow_privileged {
            // Until the check passes, the first connection checks again.
            let _ = self.role.compare_exchange(
                ROLE_UNCHECKED,
                ROLE_REQUIRED,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        let client =
            self.pool.get().await.map_err(|e| {
                pool_error(e).context(&format!("target {:?}: connecting", self.name))
            })?;
        let found = role_privileges(&client).await?;
        if !found.is_empty() && !allow_privileged {
            return Err(privileged(&self.name, &found));
        }
        if !allow_privileged {
            self.role.store(ROLE_PASSED, Ordering::Release);
        }
        Ok(found)
    }

    fn pool_in_use(&self) -> Option<usize> {
        let status = self.pool.status();
        Some(status.size.saturating_sub(status.available))
    }

    async fn server(&self) -> Result<Option<String>, ApplyError> {
        // A pooled connection without the ledger set-up `client` would run.
        let client =
            self.pool.get().await.map_err(|e| {
                pool_error(e).context(&format!("target {:?}: connecting", self.name))
            })?;
        let context = |e: tokio_postgres::Error| pg_error(&e).context("reading the server version");
        let row = client.query_one(pg::SERVER, &[]).await.map_err(context)?;
        let version: String = row.try_get(0).map_err(context)?;
        let role: String = row.try_get(1).map_err(context)?;
        Ok(Some(format!("PostgreSQL {version}, role {role}")))
    }
}

/// The powers beyond applying that the connection's role holds ([`pg::ROLE_PRIVILEGES`]),
/// as `SUPERUSER` or `CREATEDB (through role admins)`.
async fn role_privileges(client: &Object) -> Result<Vec<String>, ApplyError> {
    let context = |e: tokio_postgres::Error| pg_error(&e).context("reading the role's attributes");
    let rows = client
        .query(pg::ROLE_PRIVILEGES, &[])
        .await
        .map_err(context)?;
    let mut found = Vec::new();
    for row in &rows {
        let role: String = row.try_get(0).map_err(context)?;
        let own: bool = row.try_get(1).map_err(context)?;
        for (column, attribute) in [
            (2, "SUPERUSER"),
            (3, "CREATEROLE"),
            (4, "CREATEDB"),
            (5, "BYPASSRLS"),
            (6, "REPLICATION"),
        ] {
            if row.try_get::<_, bool>(column).map_err(context)? {
                found.push(if own {
                    attribute.to_owned()
                } else {
                    format!("{attribute} (through role {role})")
                });
            }
        }
    }
    Ok(found)
}

/// The refusal of a role with powers beyond applying.
fn privileged(name: &str, found: &[String]) -> ApplyError {
    ApplyError::permanent(format!(
        "target {name:?}: the database role Airlock connects as has {}; an agent's \
         writes must not run with more power than they need. Connect as a \
         least-privilege role (see docs/postgres-role.md), or set [apply] \
         allow_privileged_role = true (AIRLOCK_APPLY__ALLOW_PRIVILEGED_ROLE=true) to \
         accept the risk",
        found.join(", ")
    ))
    .with_code(codes::PRIVILEGED_ROLE)
}

/// The whole of one undo, inside one transaction (see [`Target::undo`]).
async fn undo_intents(
    client: &mut Object,
    intent_ids: &[String],
    force: bool,
) -> Result<UndoReport, ApplyError> {
    // Dropping `tx` without commit rolls back: every `?` below undoes everything.
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg_error(&e).context("beginning the undo transaction"))?;
    let mut report = UndoReport::default();
    let mut tables: HashMap<TableName, TableInfo> = HashMap::new();
    let now = now_ms();
    for id in intent_ids {
        let id_param: [(&(dyn ToSql + Sync), Type); 1] = [(id, Type::TEXT)];
        // Serialise with a concurrent apply or undo of the same intent.
        tx.query_typed(pg::LOCK_INTENT, &id_param)
            .await
            .map_err(|e| pg_error(&e).context("locking the intent id"))?;
        let row = tx
            .query_typed(
                &format!("{} FOR UPDATE", DIALECT.ledger_undone_at()),
                &id_param,
            )
            .await
            .map_err(|e| pg_error(&e).context("reading the ledger"))?;
        let Some(row) = row.first() else {
            return Err(not_in_ledger(id));
        };
        let undone_at: Option<i64> = row
            .try_get(0)
            .map_err(|e| pg_error(&e).context("reading the ledger"))?;
        if undone_at.is_some() {
            report.already.push(id.clone());
            continue;
        }
        let entry = read_ledger(&tx, id)
            .await?
            .ok_or_else(|| not_in_ledger(id))?;
        for image in entry.undo.iter().rev() {
            let table = image_table(image)?;
            if !tables.contains_key(&table) {
                let info = table_info(&tx, &table).await?;
                tables.insert(table.clone(), info);
            }
            let Some(info) = tables.get(&table) else {
                continue;
            };
            let context = undoing(id, image, &table);
            let found = current_row(&tx, &table, info, &image.key)
                .await
                .map_err(&context)?;
            report.compare(id, image, found.as_ref().map(|f| &f.image));
            // Revert even after a conflict: later checks then see what an undo
            // would leave, and without `force` the transaction is rolled back.
            revert(&tx, &table, info, image, found.as_ref())
                .await
                .map_err(context)?;
        }
        let params: [(&(dyn ToSql + Sync), Type); 2] = [(id, Type::TEXT), (&now, Type::INT8)];
        tx.query_typed(&DIALECT.ledger_mark_undone(), &params)
            .await
            .map_err(|e| pg_error(&e).context("marking the ledger row undone"))?;
        report.undone.push(id.clone());
    }
    if !report.may_commit(force) {
        return Ok(report);
    }
    tx.commit()
        .await
        .map_err(|e| pg_error(&e).context("committing the undo"))?;
    report.committed = true;
    Ok(report)
}

async fn query_text(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&str],
) -> Result<Vec<tokio_postgres::Row>, ApplyError> {
    let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
        .iter()
        .map(|p| (p as &(dyn ToSql + Sync), Type::TEXT))
        .collect();
    tx.query_typed(sql, &typed).await.map_err(|e| pg_error(&e))
}

/// The row at `key` now, locked, or `None` when there is none.
async fn current_row(
    tx: &Transaction<'_>,
    table: &TableName,
    info: &TableInfo,
    key: &Image,
) -> Result<Option<Fetched>, ApplyError> {
    let rows = if info.pk.is_empty() {
        let ctid = key.get("ctid").and_then(Value::as_str).ok_or_else(|| {
            ApplyError::permanent(format!(
                "table {table} has no primary key and the image's key {} has no ctid",
                show(key)
            ))
            .with_code(codes::NO_ROW_IDENTITY)
        })?;
        query_text(tx, &pg::select_by_ctid(table), &[ctid]).await?
    } else {
        info.check(table, "key", key.keys().map(String::as_str))?;
        let compare = info.compare(key);
        let sql = pg::select_rows(table, &compare, &[], 2, true);
        query_text(tx, &sql, &[&to_json(key)]).await?
    };
    if rows.len() > 1 {
        return Err(key_not_unique(key));
    }
    rows.first().map(fetched).transpose()
}

/// Sets the row at the image's key to its before-image: deletes it when there was
/// none, updates it when it exists, inserts it when it does not. Stored generated
/// columns are never written (they compute), identity columns `GENERATED ALWAYS`
/// are not set on a row that exists (nothing can have changed them), and a row
/// inserted back keeps its own identity value (`OVERRIDING SYSTEM VALUE`).
async fn revert(
    tx: &Transaction<'_>,
    table: &TableName,
    info: &TableInfo,
    image: &UndoImage,
    found: Option<&Fetched>,
) -> Result<(), ApplyError> {
    let computed = |c: &&str| info.computed.iter().any(|k| k == c);
    let always = |c: &&str| info.identity_always.iter().any(|k| k == c);
    match (&image.before, found) {
        (None, None) => {}
        (None, Some(row)) => {
            let tableoid = row.tableoid.to_string();
            query_text(tx, &pg::delete_row(table), &[&tableoid, &row.ctid]).await?;
        }
        (Some(before), Some(row)) => {
            let columns: Vec<&str> = keys(before)
                .filter(|c| !computed(c) && !always(c))
                .collect();
            if columns.is_empty() {
                return Ok(());
            }
            let tableoid = row.tableoid.to_string();
            let sql = pg::update_row(table, &columns);
            query_text(tx, &sql, &[&to_json(before), &tableoid, &row.ctid]).await?;
        }
        (Some(before), None) => {
            let columns: Vec<&str> = keys(before).filter(|c| !computed(c)).collect();
            let identity = if columns.iter().any(always) {
                pg::Identity::Override
            } else {
                pg::Identity::Refused
            };
            let sql = pg::insert(table, &columns, identity);
            query_text(tx, &sql, &[&to_json(before)]).await?;
        }
    }
    Ok(())
}

/// Creates or migrates Airlock's schema and ledger in one transaction, under an
/// advisory lock shared by every Airlock using this database.
async fn migrate(client: &mut Object) -> Result<(), ApplyError> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg_error(&e).context("beginning the migration"))?;
    tx.batch_execute(pg::LOCK_MIGRATION)
        .await
        .map_err(|e| pg_error(&e))?;
    let exists: bool = tx
        .query_one(&pg::version_table_exists(), &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| pg_error(&e))?;
    let mut version = 0;
    if exists {
        let row = tx
            .query_opt(&DIALECT.ledger_version(), &[])
            .await
            .map_err(|e| pg_error(&e))?;
        if let Some(row) = row {
            version = row.try_get::<_, i64>(0).map_err(|e| pg_error(&e))?;
        }
    }
    if version > sql::LEDGER_VERSION {
        // A newer Airlock owns this ledger: wait for an upgrade, do not fail intents.
        return Err(ApplyError::transient(format!(
            "the ledger has schema version {version}; this Airlock knows version {}",
            sql::LEDGER_VERSION
        ))
        .with_code(codes::LEDGER));
    }
    if version == sql::LEDGER_VERSION {
        return Ok(());
    }
    let schema_exists: bool = tx
        .query_one(
            &format!("SELECT to_regnamespace('{}') IS NOT NULL", sql::PG_SCHEMA),
            &[],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| pg_error(&e))?;
    for statement in DIALECT.version_ddl() {
        if schema_exists && statement == sql::PG_CREATE_SCHEMA {
            continue;
        }
        tx.batch_execute(&statement)
            .await
            .map_err(|e| pg_error(&e))?;
    }
    for (step, statements) in DIALECT.migrations() {
        if step <= version {
            continue;
        }
        for statement in statements {
            tx.batch_execute(&statement)
                .await
                .map_err(|e| pg_error(&e).context(&format!("migrating to version {step}")))?;
        }
    }
    tx.execute(&DIALECT.set_ledger_version(), &[&sql::LEDGER_VERSION])
        .await
        .map_err(|e| pg_error(&e))?;
    tx.commit()
        .await
        .map_err(|e| pg_error(&e).context("committing the migration"))
}

async fn read_ledger<C: GenericClient + Sync>(
    client: &C,
    intent_id: &str,
) -> Result<Option<LedgerEntry>, ApplyError> {
    let context = |e: tokio_postgres::Error| pg_error(&e).context("reading the ledger");
    let statement = client
        .prepare_cached(&DIALECT.ledger_select())
        .await
        .map_err(context)?;
    let row = client
        .query_opt(&statement, &[&intent_id])
        .await
        .map_err(context)?;
    row.map(|row| ledger_entry(&row)).transpose()
}

fn ledger_entry(row: &tokio_postgres::Row) -> Result<LedgerEntry, ApplyError> {
    let get = |e: tokio_postgres::Error| pg_error(&e).context("reading the ledger");
    let undo: String = row.try_get(4).map_err(get)?;
    LedgerEntry::from_stored(
        row.try_get(0).map_err(get)?,
        row.try_get(1).map_err(get)?,
        row.try_get(2).map_err(get)?,
        row.try_get(3).map_err(get)?,
        &undo,
    )
}

/// Why an apply failed, and, for a value PostgreSQL could not convert, what to try
/// again outside the (aborted) transaction to name the column.
struct Failure<'i> {
    error: ApplyError,
    diagnose: Option<Box<Diagnosis<'i>>>,
}

impl From<ApplyError> for Failure<'_> {
    fn from(error: ApplyError) -> Self {
        Self {
            error,
            diagnose: None,
        }
    }
}

impl Failure<'_> {
    fn at_op(mut self, index: usize, op: &Op) -> Self {
        self.error = self.error.at_op(index, op);
        self
    }
}

/// The parts of the failing op whose values PostgreSQL converted.
struct Diagnosis<'i> {
    table: &'i TableName,
    /// Column name → type, from the catalog.
    types: HashMap<String, String>,
    parts: Vec<(&'static str, &'i Row)>,
}

impl Diagnosis<'_> {
    /// Converts each value of the failing op on its own, and names the first that
    /// fails the same way; keeps `error` as it is if none does.
    async fn explain(self, client: &Object, error: ApplyError) -> ApplyError {
        for (part, row) in &self.parts {
            for (column, value) in row.iter().filter(|(_, v)| !v.is_null()) {
                let mut single = Row::new();
                single.insert(column.clone(), value.clone());
                let json = Value::Object(single).to_string();
                let sql = pg::convert(self.table, column);
                let Err(e) = client.query_typed(&sql, &[(&json, Type::TEXT)]).await else {
                    continue;
                };
                let found = pg_error(&e);
                if !is_conversion(&found) {
                    continue;
                }
                let type_name = self.types.get(column).map_or("?", String::as_str);
                let message = format!(
                    "{part}: column {column:?} of type {type_name} cannot take {}: {}",
                    show(value),
                    found.message
                );
                return ApplyError {
                    message,
                    code: found.code,
                    ..error
                };
            }
        }
        error
    }
}

/// Whether an error is PostgreSQL failing to convert a value (data exceptions,
/// datatype mismatch).
fn is_conversion(e: &ApplyError) -> bool {
    e.code
        .as_deref()
        .is_some_and(|c| c.starts_with("22") || c == "42804")
}

/// One apply (or preview, with [`Finish::Rollback`]) in a transaction of its own;
/// dropping the transaction on any error rolls it back.
async fn apply_intent<'i>(
    client: &mut Object,
    intent: &'i Intent,
    meta: &ApplyMeta,
    finish: Finish,
) -> Result<Applied, Failure<'i>> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg_error(&e).context("beginning the transaction"))?;
    let applied = run_intent(&tx, intent, meta, finish, None).await?;
    match finish {
        // Nothing was written for an intent already in the ledger.
        Finish::Commit if applied.already => {}
        Finish::Commit => tx.commit().await.map_err(|e| commit_error(&e))?,
        Finish::Rollback => tx
            .rollback()
            .await
            .map_err(|e| pg_error(&e).context("rolling the preview back"))?,
    }
    Ok(applied)
}

/// Why the COMMIT of `intent`'s (or a chain's) transaction failed. Without an
/// answer from the server, nobody knows whether it landed: the error is transient
/// and says so.
fn commit_error(e: &tokio_postgres::Error) -> ApplyError {
    let mut error = pg_error(e).context("committing");
    if error.code.is_none() {
        error = error.context(
            "the connection was lost while committing: the intent may or may not be \
             applied; retrying finds it in the ledger if it was",
        );
    }
    error
}

/// Whether the server refused a COMMIT with an ERROR, which means the transaction
/// was rolled back (a deferred constraint, a serialization failure). A FATAL, a
/// lost connection, or "statement completion unknown" (CockroachDB's ambiguous
/// commit) leave the outcome unknown.
fn commit_refused(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        db.parsed_severity() == Some(Severity::Error)
            && *db.code() != SqlState::T_R_STATEMENT_COMPLETION_UNKNOWN
    })
}

/// How many intents share one transaction at most. Each intent's savepoint is a
/// subtransaction with its own id once it writes; PostgreSQL caches 64 per backend
/// (`PGPROC_MAX_CACHED_SUBXIDS`), and beyond that every other session's snapshot
/// checks get slower (a "suboverflowed" transaction).
const SUBTRANSACTIONS: usize = 64;

/// How a chain's transaction ended.
enum ChainEnd<'i> {
    /// Committed: the results are final, followed by the failure that stopped the
    /// chain, if any (explained only now that the transaction is over).
    Done(Vec<Result<Applied, ApplyError>>, Option<Failure<'i>>),
    /// Not committed, or maybe not (the error says why): the results are not final.
    Uncommitted(Vec<Result<Applied, ApplyError>>, ApplyError),
    /// The server refused the COMMIT: nothing of the chain is written. It is applied
    /// again one intent per transaction, so the intent to blame (a deferred
    /// constraint it broke) fails alone instead of failing the chain at every retry.
    RolledBack,
}

/// Applies a chain in one transaction, one savepoint per intent (see
/// [`Target::apply_chain`]). Each intent's `SAVEPOINT` is sent in the same round
/// trip as its intent lock and ledger look-up, and released in the next one's.
async fn chain_transaction<'i>(
    client: &mut Object,
    name: &str,
    chain: &'i [(Intent, ApplyMeta)],
) -> ChainEnd<'i> {
    // Dropping `tx` without commit rolls back.
    let tx = match client.transaction().await {
        Ok(tx) => tx,
        Err(e) => {
            let error = pg_error(&e).context("beginning the transaction");
            return ChainEnd::Done(Vec::new(), Some(error.into()));
        }
    };
    let mut results = Vec::with_capacity(chain.len());
    let mut failure = None;
    let mut release = false;
    let savepoint = format!("{}; {}", sql::RELEASE_SAVEPOINT, sql::SAVEPOINT);
    for (intent, meta) in chain {
        if let Err(error) = check_target(name, intent) {
            failure = Some(Failure::from(error));
            break;
        }
        let prelude = if release { &savepoint } else { sql::SAVEPOINT };
        match run_intent(&tx, intent, meta, Finish::Commit, Some(prelude)).await {
            Ok(applied) => {
                results.push(Ok(applied));
                release = true;
            }
            Err(error) => {
                // Its writes and its ledger row vanish; the intents before it stay.
                if let Err(e) = tx.batch_execute(sql::ROLLBACK_TO_SAVEPOINT).await {
                    results.push(Err(error.error));
                    let why = pg_error(&e).context("rolling the failed intent back");
                    return ChainEnd::Uncommitted(results, why);
                }
                failure = Some(error);
                break;
            }
        }
    }
    match tx.commit().await {
        Ok(()) => ChainEnd::Done(results, failure),
        Err(e) if commit_refused(&e) => ChainEnd::RolledBack,
        Err(e) => {
            if let Some(failure) = failure {
                results.push(Err(failure.error));
            }
            ChainEnd::Uncommitted(results, commit_error(&e))
        }
    }
}

/// The body of one apply (or preview), inside a transaction the caller owns and
/// ends: the intent lock, the ledger look-up, the checks, the ops with their
/// images, and with [`Finish::Commit`] the ledger row. An intent already in the
/// ledger writes nothing. `prelude` (a chain's savepoint) is sent first, in the
/// same round trip.
async fn run_intent<'i>(
    tx: &Transaction<'_>,
    intent: &'i Intent,
    meta: &ApplyMeta,
    finish: Finish,
    prelude: Option<&str>,
) -> Result<Applied, Failure<'i>> {
    let id = intent.id.as_str();
    // One round trip: the prelude, the intent's lock, then the ledger look-up (each
    // sent when first polled, so in this order, and run by the server in order: the
    // look-up's snapshot is taken after the lock is held), and every table's catalog
    // entry.
    let mut tables: Vec<&TableName> = Vec::new();
    for op in &intent.ops {
        if !tables.contains(&op.table()) {
            tables.push(op.table());
        }
    }
    let prelude = async {
        match prelude {
            Some(sql) => tx.batch_execute(sql).await,
            None => Ok(()),
        }
    };
    let id_param: [(&(dyn ToSql + Sync), Type); 1] = [(&id, Type::TEXT)];
    let lock = tx.query_typed(pg::LOCK_INTENT, &id_param);
    let ledger_sql = DIALECT.ledger_select();
    let ledger = tx.query_typed(&ledger_sql, &id_param);
    let catalog = futures_util::future::join_all(tables.iter().map(|t| table_info(tx, t)));
    let (prelude, lock, ledger, catalog) =
        futures_util::future::join4(prelude, lock, ledger, catalog).await;
    prelude.map_err(|e| pg_error(&e).context("opening the intent's savepoint"))?;
    lock.map_err(|e| pg_error(&e).context("locking the intent id"))?;
    let ledger = ledger.map_err(|e| pg_error(&e).context("reading the ledger"))?;
    if let Some(row) = ledger.first() {
        return Ok(ledger_hit(id, ledger_entry(row)?, meta)?);
    }
    let catalog: HashMap<&TableName, Result<TableInfo, ApplyError>> =
        tables.into_iter().zip(catalog).collect();

    let mut undo = Vec::new();
    let mut ops = Vec::with_capacity(intent.ops.len());
    let mut sequences = BTreeMap::new();
    for (index, op) in intent.ops.iter().enumerate() {
        let info = match catalog.get(op.table()) {
            Some(Ok(info)) => info,
            Some(Err(e)) => return Err(Failure::from(e.clone()).at_op(index, op)),
            None => {
                return Err(
                    Failure::from(ApplyError::permanent("table not looked up")).at_op(index, op)
                );
            }
        };
        let mut step = Step {
            tx,
            info,
            max_rows: meta.max_rows,
            generated: meta.replay.as_ref().and_then(|g| g.op(index)),
            sequences: &mut sequences,
            images: OpImages::new(index, &mut undo),
        };
        let rows = step.apply(op).await.map_err(|f| f.at_op(index, op))?;
        ops.push(OpResult { index, rows });
    }
    let entry = new_entry(intent, meta, undo)?;
    if finish == Finish::Commit {
        // Not for a preview: a sequence change is not rolled back.
        advance_sequences(tx, &sequences).await?;
        write_ledger(tx, &entry).await?;
    }
    Ok(Applied {
        already: false,
        ledger: entry,
        ops,
    })
}

/// Sequence-fed columns a replay wrote generated values into: (the table's quoted
/// canonical name, the column) → the largest value written.
type Sequences = BTreeMap<(String, String), i64>;

/// Advances the sequence of each column a replay wrote generated values into past
/// the largest of them ([`pg::ADVANCE_SEQUENCE`]), so the replay target's next
/// ordinary insert does not collide with a replayed row.
async fn advance_sequences(tx: &Transaction<'_>, sequences: &Sequences) -> Result<(), ApplyError> {
    for ((table, column), max) in sequences {
        let max = max.to_string();
        query_text(tx, pg::ADVANCE_SEQUENCE, &[table, column, &max])
            .await
            .map_err(|e| {
                e.context(&format!(
                    "advancing the sequence of column {column:?} of {table} past the \
                     replayed value {max}"
                ))
            })?;
    }
    Ok(())
}

async fn write_ledger(tx: &Transaction<'_>, entry: &LedgerEntry) -> Result<(), ApplyError> {
    let undo = entry.stored_undo()?;
    let context = |e: tokio_postgres::Error| {
        let error = pg_error(&e);
        if error.code.as_deref() == Some("23505") {
            // Only a concurrent apply of the same id that bypassed the intent lock
            // gets here; the retry finds its ledger row.
            let mut error = error.context(
                "another transaction applied this intent id concurrently; retrying finds \
                 its ledger row",
            );
            error.kind = ErrorKind::Transient;
            return error;
        }
        error.context("writing the ledger row")
    };
    let statement = tx
        .prepare_cached(&DIALECT.ledger_insert())
        .await
        .map_err(context)?;
    tx.execute(
        &statement,
        &[
            &entry.intent_id,
            &entry.run,
            &entry.digest,
            &entry.applied_at_ms,
            &undo,
        ],
    )
    .await
    .map_err(context)?;
    Ok(())
}

/// What Airlock needs to know about one table, read once per intent.
#[derive(Clone, Debug)]
struct TableInfo {
    /// The schema the name resolved into.
    schema: String,
    /// The table's name as the catalog stores it.
    name: String,
    /// All columns, in declaration order.
    columns: Vec<String>,
    /// Column name → type as `format_type` renders it.
    types: HashMap<String, String>,
    /// Primary-key columns, in key order; empty when none is declared.
    pk: Vec<String>,
    /// Identity columns `GENERATED ALWAYS`: only a replay may write them.
    identity_always: Vec<String>,
    /// Stored generated columns (`GENERATED ALWAYS AS (...) STORED`): nobody
    /// writes them; they compute.
    computed: Vec<String>,
}

/// Reads a table's catalog entry and checks Airlock may write it.
async fn table_info(tx: &Transaction<'_>, table: &TableName) -> Result<TableInfo, ApplyError> {
    if table.schema().is_some_and(sql::is_reserved_schema) {
        return Err(reserved(table));
    }
    let context = |e: tokio_postgres::Error| pg_error(&e).context("reading the catalog");
    let statement = tx.prepare_cached(pg::TABLE_INFO).await.map_err(context)?;
    let quoted = sql::quote_table(table);
    let row = tx
        .query_opt(&statement, &[&quoted])
        .await
        .map_err(context)?;
    let Some(row) = row else {
        return Err(
            ApplyError::permanent(format!("table {table} does not exist"))
                .with_code(codes::UNKNOWN_TABLE),
        );
    };
    let schema: String = row.try_get(0).map_err(context)?;
    let kind: String = row.try_get(1).map_err(context)?;
    let columns: Vec<String> = row.try_get(2).map_err(context)?;
    let types: Vec<String> = row.try_get(3).map_err(context)?;
    let pk: Vec<String> = row.try_get(4).map_err(context)?;
    let name: String = row.try_get(5).map_err(context)?;
    let identity: Vec<String> = row.try_get(6).map_err(context)?;
    let generated: Vec<String> = row.try_get(7).map_err(context)?;
    let flagged = |flags: Vec<String>, flag: &str| -> Vec<String> {
        columns
            .iter()
            .zip(flags)
            .filter(|(_, f)| f == flag)
            .map(|(c, _)| c.clone())
            .collect()
    };
    let identity_always = flagged(identity, "a");
    let computed = flagged(generated, "s");
    if sql::is_reserved_schema(&schema) {
        return Err(reserved(table));
    }
    // An unqualified `pg_class` is `pg_catalog.pg_class`: refused by where it is.
    check_canonical(table, &schema, &name)?;
    if kind != "r" && kind != "p" {
        let what = match kind.as_str() {
            "v" => "view",
            "m" => "materialized view",
            "f" => "foreign table",
            "S" => "sequence",
            "i" | "I" => "index",
            "c" => "composite type",
            _ => "relation other than a table",
        };
        return Err(ApplyError::permanent(format!(
            "{table} is a {what}, not a table; Airlock writes plain tables only"
        ))
        .with_code(codes::NOT_A_TABLE));
    }
    let types = columns.iter().cloned().zip(types).collect();
    Ok(TableInfo {
        schema,
        name,
        columns,
        types,
        pk,
        identity_always,
        computed,
    })
}

fn reserved(table: &TableName) -> ApplyError {
    ApplyError::permanent(format!(
        "table {table} is in schema {}, which belongs to Airlock (its ledger); intents \
         cannot write it",
        sql::PG_SCHEMA
    ))
    .with_code(codes::RESERVED_TABLE)
}

impl Columns for TableInfo {
    fn columns(&self) -> &[String] {
        &self.columns
    }
}

impl TableInfo {
    /// The table's canonical name, quoted: `"schema"."name"`.
    fn qualified(&self) -> String {
        format!(
            "{}.{}",
            sql::quote_ident(&self.schema),
            sql::quote_ident(&self.name)
        )
    }

    /// Whether an insert of `values` and a replay's `generated` values overrides
    /// `GENERATED ALWAYS` identity columns: only when the generated values name
    /// one and the op's own values name none (an agent's value for one is refused
    /// by the database, in a replay too).
    fn identity(&self, values: &Row, generated: &Row) -> pg::Identity {
        let always = |row: &Row| row.keys().any(|c| self.identity_always.contains(c));
        if always(generated) && !always(values) {
            pg::Identity::Override
        } else {
            pg::Identity::Refused
        }
    }

    /// How each column of a key or `expect` compares.
    fn compare<'r>(&self, row: &'r Row) -> Vec<pg::Compare<'r>> {
        row.iter()
            .map(|(column, value)| pg::Compare {
                column,
                null: value.is_null(),
                json: self.types.get(column).is_some_and(|t| t == "json"),
            })
            .collect()
    }

    /// The columns that identify a row in undo images: the primary key, else
    /// `ctid`.
    fn key(&self, row: &Fetched) -> Image {
        let mut key = Image::new();
        if self.pk.is_empty() {
            key.insert("ctid".to_owned(), Value::String(row.ctid.clone()));
        } else {
            for column in &self.pk {
                let value = row.image.get(column).cloned().unwrap_or(Value::Null);
                key.insert(column.clone(), value);
            }
        }
        key
    }
}

/// A row as a statement returned it ([`pg::ROW`]).
#[derive(Clone, Debug)]
struct Fetched {
    image: Image,
    tableoid: i64,
    ctid: String,
}

fn fetched(row: &tokio_postgres::Row) -> Result<Fetched, ApplyError> {
    let get = |e: tokio_postgres::Error| pg_error(&e).context("reading a written row");
    let json: String = row.try_get(0).map_err(get)?;
    let image = serde_json::from_str(&json).map_err(|e| {
        ApplyError::permanent(format!("PostgreSQL returned a row that is not JSON: {e}"))
    })?;
    Ok(Fetched {
        image,
        tableoid: row.try_get(1).map_err(get)?,
        ctid: row.try_get(2).map_err(get)?,
    })
}

/// One op being applied, with what it needs from the intent's transaction.
struct Step<'a, 't> {
    tx: &'a Transaction<'t>,
    info: &'a TableInfo,
    max_rows: u64,
    /// A replay's recorded generated values for this op ([`ApplyMeta::replay`]).
    generated: Option<&'a Image>,
    /// Where to note the sequence-fed columns this op wrote generated values into.
    sequences: &'a mut Sequences,
    images: OpImages<'a>,
}

impl<'i> Step<'_, '_> {
    /// Applies one op; answers the number of rows it wrote.
    async fn apply(&mut self, op: &'i Op) -> Result<u64, Failure<'i>> {
        match op {
            Op::Insert { table, values } => self.insert(table, values).await,
            Op::Upsert { table, values, on } => self.upsert(table, values, on).await,
            Op::Update {
                table,
                key,
                set,
                expect,
            } => self.update(table, key, set, expect.as_ref()).await,
            Op::Delete { table, key, expect } => self.delete(table, key, expect.as_ref()).await,
        }
    }

    /// Runs one statement; `parts` are the op's parts among its parameters, for
    /// naming the column of a value PostgreSQL cannot convert.
    async fn run(
        &self,
        table: &'i TableName,
        sql: &str,
        params: &[&str],
        parts: &[(&'static str, &'i Row)],
    ) -> Result<Vec<tokio_postgres::Row>, Failure<'i>> {
        let typed: Vec<(&(dyn ToSql + Sync), Type)> = params
            .iter()
            .map(|p| (p as &(dyn ToSql + Sync), Type::TEXT))
            .collect();
        self.tx.query_typed(sql, &typed).await.map_err(|e| {
            let error = pg_error(&e);
            let diagnose = (is_conversion(&error) && !parts.is_empty()).then(|| {
                Box::new(Diagnosis {
                    table,
                    types: self.info.types.clone(),
                    parts: parts.to_vec(),
                })
            });
            Failure { error, diagnose }
        })
    }

    /// The recorded values a replay writes besides the op's `values` (none
    /// outside a replay; see [`Generated`](super::Generated)): those of the
    /// table's columns the op does not name, except stored generated columns,
    /// which compute again.
    fn generated(&self, values: &Row) -> Row {
        let info = self.info;
        let writable =
            |c: &str| info.columns.iter().any(|k| k == c) && !info.computed.iter().any(|k| k == c);
        generated_values(self.generated, values, writable)
            .into_iter()
            .map(|(column, value)| (column.to_owned(), value.clone()))
            .collect()
    }

    /// Notes the largest integer written into each column of `generated` (the
    /// sequence of any such column is advanced past it before the ledger row).
    fn note_sequences(&mut self, generated: &Row) {
        for (column, value) in generated {
            let Some(value) = value.as_i64() else {
                continue;
            };
            let max = self
                .sequences
                .entry((self.info.qualified(), column.clone()))
                .or_insert(value);
            *max = (*max).max(value);
        }
    }

    async fn insert(&mut self, table: &'i TableName, values: &'i Row) -> Result<u64, Failure<'i>> {
        self.info.check(table, "values", keys(values))?;
        let generated = self.generated(values);
        let columns: Vec<&str> = keys(values).chain(keys(&generated)).collect();
        let json = to_json_with(values, &generated);
        let identity = self.info.identity(values, &generated);
        let rows = self
            .run(
                table,
                &pg::insert(table, &columns, identity),
                &[&json],
                &[("values", values)],
            )
            .await?;
        for row in &rows {
            let after = fetched(row)?;
            self.images
                .record(table, self.info.key(&after), None, Some(after.image));
        }
        if !rows.is_empty() {
            self.note_sequences(&generated);
        }
        Ok(rows.len() as u64)
    }

    async fn upsert(
        &mut self,
        table: &'i TableName,
        values: &'i Row,
        on: &'i [Column],
    ) -> Result<u64, Failure<'i>> {
        self.info.check(table, "values", keys(values))?;
        self.info
            .check(table, "on", on.iter().map(Column::as_str))?;
        check_upsert(values, on)?;
        let generated = self.generated(values);
        // Written only if the row is inserted: a conflicting row keeps its own.
        let insert_only: Vec<&str> = keys(&generated).collect();
        let columns: Vec<&str> = keys(values).chain(keys(&generated)).collect();
        let identity = self.info.identity(values, &generated);
        let on: Vec<&str> = on.iter().map(Column::as_str).collect();
        let json = to_json_with(values, &generated);
        let parts = [("values", values)];
        // The row the upsert would conflict with, locked; a NULL never conflicts.
        let on_compare: Vec<pg::Compare<'_>> = self
            .info
            .compare(values)
            .into_iter()
            .filter(|c| on.contains(&c.column))
            .collect();
        let can_conflict = !on_compare.iter().any(|c| c.null);
        let read_conflict = |lock: bool| pg::select_rows(table, &on_compare, &[], 2, lock);
        let before = if can_conflict {
            let rows = self
                .run(table, &read_conflict(true), &[&json], &parts)
                .await?;
            if rows.len() > 1 {
                return Err(on_not_unique(&on).into());
            }
            rows.first().map(fetched).transpose()?
        } else {
            None
        };
        let upsert = pg::upsert(table, &columns, &on, &insert_only, identity);
        let rows = self.run(table, &upsert, &[&json], &parts).await?;
        let Some(row) = rows.first() else {
            // DO NOTHING on a conflict (or a trigger skipped the insert).
            if let Some(before) = before {
                self.images.record(
                    table,
                    self.info.key(&before),
                    Some(before.image.clone()),
                    Some(before.image),
                );
            } else if can_conflict
                && !self
                    .run(table, &read_conflict(false), &[&json], &parts)
                    .await?
                    .is_empty()
            {
                return Err(concurrent(&on).into());
            }
            return Ok(0);
        };
        let after = fetched(row)?;
        let inserted: bool = row
            .try_get(3)
            .map_err(|e| pg_error(&e).context("reading the upsert's result"))?;
        if before.is_none() && !inserted {
            return Err(concurrent(&on).into());
        }
        if inserted {
            self.note_sequences(&generated);
        }
        self.images.record(
            table,
            self.info.key(&after),
            before.map(|b| b.image),
            Some(after.image),
        );
        Ok(1)
    }

    async fn update(
        &mut self,
        table: &'i TableName,
        key: &'i Row,
        set: &'i Row,
        expect: Option<&'i Row>,
    ) -> Result<u64, Failure<'i>> {
        self.info.check(table, "key", keys(key))?;
        self.info.check(table, "set", keys(set))?;
        if let Some(expect) = expect {
            self.info.check(table, "expect", keys(expect))?;
        }
        check_update(key, set)?;
        let before = self.matched(table, key, expect).await?;
        let columns: Vec<&str> = keys(set).collect();
        let sql = pg::update_row(table, &columns);
        let json = to_json(set);
        let mut rows = 0;
        for row in before {
            let tableoid = row.tableoid.to_string();
            let written = self
                .run(table, &sql, &[&json, &tableoid, &row.ctid], &[("set", set)])
                .await?;
            rows += written.len() as u64;
            match written.first() {
                Some(after) => {
                    let after = fetched(after)?;
                    self.images.record(
                        table,
                        self.info.key(&after),
                        Some(row.image),
                        Some(after.image),
                    );
                }
                // A trigger skipped it; the image says so.
                None => self
                    .images
                    .record(table, self.info.key(&row), Some(row.image), None),
            }
        }
        Ok(rows)
    }

    async fn delete(
        &mut self,
        table: &'i TableName,
        key: &'i Row,
        expect: Option<&'i Row>,
    ) -> Result<u64, Failure<'i>> {
        self.info.check(table, "key", keys(key))?;
        if let Some(expect) = expect {
            self.info.check(table, "expect", keys(expect))?;
        }
        check_delete(key)?;
        let before = self.matched(table, key, expect).await?;
        let sql = pg::delete_row(table);
        let mut rows = 0;
        for row in before {
            let tableoid = row.tableoid.to_string();
            let deleted = self.run(table, &sql, &[&tableoid, &row.ctid], &[]).await?;
            rows += deleted.len() as u64;
            if !deleted.is_empty() {
                self.images
                    .record(table, self.info.key(&row), Some(row.image), None);
            }
        }
        Ok(rows)
    }

    /// Reads and locks the rows an update or delete will touch (their
    /// before-images), failing when there are none or more than `max_rows`, and
    /// saying why.
    async fn matched(
        &self,
        table: &'i TableName,
        key: &'i Row,
        expect: Option<&'i Row>,
    ) -> Result<Vec<Fetched>, Failure<'i>> {
        let empty = Row::new();
        let expect_row = expect.unwrap_or(&empty);
        let key_compare = self.info.compare(key);
        let expect_compare = self.info.compare(expect_row);
        let key_json = to_json(key);
        let expect_json = to_json(expect_row);
        let mut parts = vec![("key", key)];
        let mut params = vec![key_json.as_str()];
        if let Some(expect) = expect.filter(|e| !e.is_empty()) {
            parts.push(("expect", expect));
            params.push(&expect_json);
        }
        let limit = self.max_rows.saturating_add(1);
        let sql = pg::select_rows(table, &key_compare, &expect_compare, limit, true);
        let rows = self.run(table, &sql, &params, &parts).await?;
        if rows.is_empty() {
            if let Some(expect) = expect.filter(|e| !e.is_empty()) {
                let sql = pg::expect_holds(table, &key_compare, &expect_compare);
                let found = self
                    .run(table, &sql, &[&key_json, &expect_json], &parts)
                    .await?;
                if let Some(row) = found.first() {
                    return Err(expect_not_held(row, key, expect, &expect_compare).into());
                }
            }
            return Err(no_row(key).into());
        }
        if rows.len() as u64 > self.max_rows {
            return Err(too_many_rows(key, self.max_rows).into());
        }
        rows.iter()
            .map(|r| fetched(r).map_err(Failure::from))
            .collect()
    }
}

/// Names the `expect` columns that did not hold, with the values the row has.
fn expect_not_held(
    row: &tokio_postgres::Row,
    key: &Row,
    expect: &Row,
    compare: &[pg::Compare<'_>],
) -> ApplyError {
    let image: Image = row
        .try_get::<_, String>(0)
        .ok()
        .and_then(|json| serde_json::from_str(&json).ok())
        .unwrap_or_default();
    let mut found = Image::new();
    let mut wanted = Image::new();
    for (i, c) in compare.iter().enumerate() {
        let holds: Option<bool> = row.try_get(i + 1).ok();
        if holds != Some(true) {
            let column = c.column.to_owned();
            found.insert(
                column.clone(),
                image.get(c.column).cloned().unwrap_or(Value::Null),
            );
            wanted.insert(column, expect.get(c.column).cloned().unwrap_or(Value::Null));
        }
    }
    let differ: Vec<&str> = keys(&found).collect();
    expect_failed(key, &differ, &found, &wanted)
}

fn concurrent(on: &[&str]) -> ApplyError {
    ApplyError::transient(format!(
        "another transaction inserted a row conflicting on {} while this upsert ran; \
         retrying sees it",
        show(&on)
    ))
    .with_code("40001")
}

fn to_json(row: &Row) -> String {
    // Serialising a map of JSON values cannot fail.
    serde_json::to_string(row).unwrap_or_else(|_| "{}".to_owned())
}

/// The JSON of an op's `values` together with a replay's generated values.
fn to_json_with(values: &Row, generated: &Row) -> String {
    if generated.is_empty() {
        return to_json(values);
    }
    let mut all = values.clone();
    all.extend(generated.iter().map(|(c, v)| (c.clone(), v.clone())));
    to_json(&all)
}

/// Classifies a tokio-postgres error: the SQLSTATE decides for server errors; a
/// lost connection, I/O, TLS or a timeout is transient; a driver-side encoding or
/// decoding problem is permanent.
fn pg_error(e: &tokio_postgres::Error) -> ApplyError {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        // DETAIL, HINT and WHERE quote stored rows and keys ("Key (email)=(…) already
        // exists", "Failing row contains (…)"): for humans only, never the agent.
        let detail: Vec<String> = [
            db.detail().map(|d| format!("DETAIL: {d}")),
            db.hint().map(|h| format!("HINT: {h}")),
            db.where_().map(|w| format!("WHERE: {w}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        let error = ApplyError::new(sqlstate_kind(code), db.message()).with_code(code);
        return if detail.is_empty() {
            error
        } else {
            error.with_detail(detail.join("; "))
        };
    }
    // "error connecting to server" says little without its cause ("Connection
    // refused"), which names no host or credential.
    let message = match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    };
    let driver_bug = [
        "error serializing",
        "error deserializing",
        "invalid column",
        "unexpected column count",
        "expected ",
    ]
    .iter()
    .any(|prefix| message.starts_with(prefix));
    if driver_bug && !e.is_closed() {
        ApplyError::permanent(message)
    } else {
        ApplyError::transient(message)
    }
}

/// Whether a retry may help, by SQLSTATE.
pub fn sqlstate_kind(code: &str) -> ErrorKind {
    const TRANSIENT: &[&str] = &[
        "40001", // serialization_failure
        "40P01", // deadlock_detected
        "40003", // statement_completion_unknown
        "55P03", // lock_not_available
        "55006", // object_in_use
        "57014", // query_canceled (statement_timeout, cancel)
        "57P01", // admin_shutdown
        "57P02", // crash_shutdown
        "57P03", // cannot_connect_now
        "57P05", // idle_session_timeout
        "25006", // read_only_sql_transaction (a standby, mid-failover)
        "3D000", // invalid_catalog_name: the database is not there (yet)
        "58000", // system_error
        "58030", // io_error
    ];
    // 08: connection exceptions; 53: insufficient resources (disk full, out of
    // memory, too many connections); 28: authorization (configuration, fixable
    // without touching the intent).
    const TRANSIENT_CLASSES: &[&str] = &["08", "53", "28"];
    if TRANSIENT.contains(&code) || TRANSIENT_CLASSES.iter().any(|c| code.starts_with(c)) {
        ErrorKind::Transient
    } else {
        ErrorKind::Permanent
    }
}

fn pool_error(e: PoolError) -> ApplyError {
    match e {
        PoolError::Backend(e) => pg_error(&e),
        PoolError::Timeout(t) => ApplyError::transient(format!("timed out ({t:?})")),
        other => ApplyError::transient(other.to_string()),
    }
}

/// Takes the URL apart. Messages never contain the URL.
fn parse_url(url: &str) -> Result<Settings, String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut pool_size = DEFAULT_POOL_SIZE;
    let mut sslmode: Option<String> = None;
    let mut root_cert = None;
    let mut passed = Vec::new();
    let mut given = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        given.push(key.to_owned());
        match key {
            "pool_size" => {
                pool_size = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        format!("pool_size must be a number from 1 to 1000, not {value:?}")
                    })?;
            }
            "sslmode" => sslmode = Some(value.to_owned()),
            "sslrootcert" => root_cert = Some(percent_decode(value)),
            _ => passed.push(pair),
        }
    }
    let tls = match sslmode.as_deref() {
        None | Some("prefer") => TlsMode::Unverified,
        Some("disable") => TlsMode::Disable,
        Some("require") if root_cert.is_some() => TlsMode::VerifyCa,
        Some("require") => TlsMode::Unverified,
        Some("verify-ca") => TlsMode::VerifyCa,
        Some("verify-full") => TlsMode::VerifyFull,
        Some(other) => {
            return Err(format!(
                "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            ));
        }
    };
    let mut rebuilt = base.to_owned();
    let driver_mode = match sslmode.as_deref() {
        None => None,
        Some("verify-ca" | "verify-full") => Some("require"),
        Some(mode) => Some(mode),
    };
    let driver_pairs: Vec<String> = passed
        .iter()
        .map(|p| (*p).to_owned())
        .chain(driver_mode.map(|m| format!("sslmode={m}")))
        .collect();
    if !driver_pairs.is_empty() {
        rebuilt.push('?');
        rebuilt.push_str(&driver_pairs.join("&"));
    }
    let mut config: tokio_postgres::Config = rebuilt
        .parse()
        .map_err(|e| format!("cannot use the PostgreSQL URL: {e}"))?;
    let has = |key: &str| given.iter().any(|g| g == key);
    if !has("application_name") {
        config.application_name("airlock");
    }
    if !has("connect_timeout") {
        config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    if !has("keepalives_idle") {
        config.keepalives_idle(Duration::from_secs(30));
    }
    if !has("keepalives_interval") {
        config.keepalives_interval(Duration::from_secs(10));
    }
    if !has("keepalives_retries") {
        config.keepalives_retries(3);
    }
    Ok(Settings {
        config,
        pool_size,
        tls,
        root_cert,
    })
}

/// `%XX` escapes decoded (for a path in a URL query); anything else kept.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The TLS connector for a mode other than [`TlsMode::Disable`].
fn tls_connector(
    mode: TlsMode,
    root_cert: Option<&str>,
) -> Result<native_tls::TlsConnector, String> {
    let mut builder = native_tls::TlsConnector::builder();
    match mode {
        TlsMode::Disable | TlsMode::Unverified => {
            builder
                .danger_accept_invalid_certs(true)
                .danger_accept_invalid_hostnames(true);
        }
        TlsMode::VerifyCa => {
            builder.danger_accept_invalid_hostnames(true);
        }
        TlsMode::VerifyFull => {}
    }
    if let Some(path) = root_cert {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read sslrootcert {path:?}: {e}"))?;
        let cert = native_tls::Certificate::from_pem(&pem)
            .map_err(|e| format!("sslrootcert {path:?} is not a PEM certificate: {e}"))?;
        builder.add_root_certificate(cert);
    }
    builder
        .build()
        .map_err(|e| format!("cannot set up TLS: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_classified() {
        for code in [
            "40001", "40P01", "57P01", "57P02", "57P03", "53300", "08006", "08001", "28P01",
        ] {
            assert_eq!(sqlstate_kind(code), ErrorKind::Transient, "{code}");
        }
        for code in [
            "23505", "23503", "23502", "23514", "22P02", "22003", "42P01", "42703", "42501",
            "40002", "XX000",
        ] {
            assert_eq!(sqlstate_kind(code), ErrorKind::Permanent, "{code}");
        }
    }

    #[test]
    fn urls_are_taken_apart_without_echoing_them() {
        let s = parse_url("postgres://u:pw@db.example:5433/app?pool_size=3&sslmode=verify-full")
            .unwrap();
        assert_eq!(s.pool_size, 3);
        assert_eq!(s.tls, TlsMode::VerifyFull);
        assert_eq!(
            s.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(s.config.get_dbname(), Some("app"));
        assert_eq!(s.config.get_application_name(), Some("airlock"));
        assert_eq!(
            s.config.get_connect_timeout(),
            Some(&DEFAULT_CONNECT_TIMEOUT)
        );

        let s = parse_url("postgresql://h/db?application_name=x&connect_timeout=2").unwrap();
        assert_eq!(s.pool_size, DEFAULT_POOL_SIZE);
        assert_eq!(s.tls, TlsMode::Unverified);
        assert_eq!(s.config.get_application_name(), Some("x"));
        assert_eq!(
            s.config.get_connect_timeout(),
            Some(&Duration::from_secs(2))
        );

        let s = parse_url("postgres://h/db?sslmode=require&sslrootcert=%2Ftmp%2Fca.pem").unwrap();
        assert_eq!(s.tls, TlsMode::VerifyCa);
        assert_eq!(s.root_cert.as_deref(), Some("/tmp/ca.pem"));
        assert_eq!(
            parse_url("postgres://h/db?sslmode=disable").unwrap().tls,
            TlsMode::Disable
        );

        for bad in [
            "postgres://u:secret@h/db?pool_size=0",
            "postgres://u:secret@h/db?pool_size=x",
            "postgres://u:secret@h/db?sslmode=sometimes",
            "postgres://u:secret@h/db?frobnicate=1",
            "postgres://u:secret@h:notaport/db",
        ] {
            let Err(message) = parse_url(bad) else {
                panic!("{bad} parsed");
            };
            assert!(!message.contains("secret"), "{message}");
        }
    }

    #[test]
    fn percent_decoding_keeps_what_is_not_an_escape() {
        assert_eq!(percent_decode("%2Fa%20b%zz%"), "/a b%zz%");
    }
}
