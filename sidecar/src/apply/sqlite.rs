//! The SQLite target: applies intents to an SQLite database file.
//!
//! What it guarantees on disk:
//! - **One transaction per intent.** `BEGIN IMMEDIATE` takes the write lock before
//!   anything is read, so the images captured and the rows written are the same
//!   rows, and no other writer interleaves. Any error (and any panic) rolls back:
//!   there are never partial writes.
//! - **A chain is one transaction.** [`Target::apply_chain`] runs a run's
//!   consecutive intents under one `BEGIN IMMEDIATE`, each inside
//!   `SAVEPOINT airlock_intent` running exactly what apply runs; a failing intent
//!   is rolled back to its savepoint (its writes and ledger row vanish, earlier
//!   intents stay), the chain stops there, and one COMMIT (one fsync) makes the rest
//!   durable. If SQLite rolled the whole transaction back because of one intent
//!   (`RAISE(ROLLBACK)`, `ON CONFLICT ROLLBACK`, I/O errors) or refused the COMMIT
//!   (a deferred foreign key), nothing of the chain was written and it is applied
//!   again one transaction per intent, so the intent to blame fails alone. A COMMIT
//!   that fails otherwise (busy, I/O) may or may not be on disk: every intent of the
//!   chain is then a transient error, and the retry finds the committed ones in the
//!   ledger.
//! - **Exactly once.** The ledger row (`airlock_ledger`) is inserted in that same
//!   transaction, after the ops. An intent id already in the ledger is not applied
//!   again; the stored entry is returned instead. If the caller's future is dropped
//!   mid-apply, the blocking work still runs to its end, so the ledger, not the
//!   caller, is the truth about whether the intent committed.
//! - **Durable on return.** The database runs in WAL mode with `synchronous=FULL`,
//!   so a successful return means the commit is on disk and the queue may mark the
//!   intent applied.
//! - **Undo is one transaction too.** [`Target::undo`] checks and reverts every
//!   image of the intents given, and marks their ledger rows undone, under one
//!   `BEGIN IMMEDIATE`; a conflict without `force` rolls all of it back.
//! - **The ledger migrates itself.** `airlock_schema` records the ledger's version;
//!   opening applies the migrations past it, step by step, in one transaction.
//! - **Foreign keys enforced.** `foreign_keys=ON` on Airlock's connection, whatever
//!   other connections to the file do.
//!
//! Checks before writing: the table exists and is a plain table (not a view, not
//! Airlock's own), every column the op names exists (names are case-sensitive,
//! as in PostgreSQL), keys and sets are not empty, and every value is representable.
//! The database checks the rest (constraints, types) and its errors carry SQLite's
//! extended result code name.
//!
//! Values: JSON null → NULL, booleans → 0/1, integers → INTEGER (beyond i64 is an
//! error), other numbers → REAL, strings → TEXT, arrays and objects → their JSON
//! text. Images read back INTEGER and REAL as numbers, TEXT as strings (invalid
//! UTF-8 replaced), NULL as null, and BLOB as `{"$blob": "<hex>"}`.
//!
//! One connection, behind a mutex; work runs on tokio's blocking pool. SQLite has a
//! single writer anyway, so more connections would only wait on each other.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use airlock_intent::{Column, Intent, Op, Row, TableName};
use async_trait::async_trait;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, TransactionBehavior, ffi, params_from_iter,
};
use serde_json::Value;

use super::common::{
    Columns, OpImages, check_delete, check_update, check_upsert, expect_failed, generated_values,
    image_table, key_not_unique, keys, ledger_hit, new_entry, no_row, not_in_ledger, on_not_unique,
    too_many_rows, undoing,
};
use super::sql::{self, Arg, Dialect, Statement};
use super::{
    Applied, ApplyError, ApplyMeta, ErrorKind, Finish, Image, LedgerEntry, OpResult, Preview,
    ResolvedOp, Target, UndoImage, UndoReport, check_canonical, check_target, codes, resolve_op,
    uncommitted,
};
use crate::clock::now_ms;

const DIALECT: Dialect = Dialect::Sqlite;

/// How long a statement waits by default for another connection's lock before
/// failing with `SQLITE_BUSY` (a transient error).
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// An SQLite database that intents are applied to.
#[derive(Debug)]
pub struct SqliteTarget {
    name: String,
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

impl SqliteTarget {
    /// Opens (creating if missing) the database at `path`, configures the
    /// connection, and creates the ledger if missing. Blocking.
    pub fn open(name: &str, path: impl AsRef<Path>) -> Result<Self, ApplyError> {
        Self::open_with_busy_timeout(name, path, BUSY_TIMEOUT)
    }

    /// [`SqliteTarget::open`], waiting at most `busy_timeout` for another
    /// connection's lock before a write fails with a transient `SQLITE_BUSY`.
    pub fn open_with_busy_timeout(
        name: &str,
        path: impl AsRef<Path>,
        busy_timeout: Duration,
    ) -> Result<Self, ApplyError> {
        let path = path.as_ref();
        let context = |e: ApplyError| e.context(&format!("target {name:?} ({})", path.display()));
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                ApplyError::permanent(format!(
                    "target {name:?}: cannot create directory {}: {e}",
                    parent.display()
                ))
            })?;
        }
        let conn = Connection::open(path).map_err(|e| context(db_error(e)))?;
        Self::prepare(name, path, conn, busy_timeout)
    }

    /// Opens the database at `path` as [`SqliteTarget::open`] does, but only if the
    /// file exists: a missing one is an error with code [`codes::NO_DATABASE`], and
    /// neither it nor its directory is created (no `SQLITE_OPEN_CREATE`, and the
    /// path is never read as a URI, whose `mode=rwc` could create it). Blocking.
    pub fn open_existing(name: &str, path: impl AsRef<Path>) -> Result<Self, ApplyError> {
        let path = path.as_ref();
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| {
            if path.symlink_metadata().is_err() {
                ApplyError::permanent(format!(
                    "target {name:?}: no such database file {} (this command works on an \
                     existing database and creates none)",
                    path.display()
                ))
                .with_code(codes::NO_DATABASE)
            } else {
                db_error(e).context(&format!("target {name:?} ({})", path.display()))
            }
        })?;
        Self::prepare(name, path, conn, BUSY_TIMEOUT)
    }

    /// Configures a connection just opened and creates or migrates the ledger.
    fn prepare(
        name: &str,
        path: &Path,
        mut conn: Connection,
        busy_timeout: Duration,
    ) -> Result<Self, ApplyError> {
        let context = |e: ApplyError| e.context(&format!("target {name:?} ({})", path.display()));
        configure(&conn, busy_timeout).map_err(context)?;
        init_ledger(&mut conn).map_err(context)?;
        Ok(Self {
            name: name.to_owned(),
            path: path.to_owned(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, ApplyError> + Send + 'static,
    ) -> Result<T, ApplyError> {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || f(&mut lock(&conn)))
            .await
            .map_err(|e| {
                ApplyError::transient(format!(
                    "target {:?}: the database task did not finish: {e}",
                    self.name
                ))
            })?
    }
}

#[async_trait]
impl Target for SqliteTarget {
    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(&self, intent: &Intent, meta: &ApplyMeta) -> Result<Applied, ApplyError> {
        let intent = intent.clone();
        let meta = meta.clone();
        let name = self.name.clone();
        self.with_conn(move |conn| apply_intent(conn, &name, &intent, &meta, Finish::Commit))
            .await
    }

    async fn apply_chain(&self, chain: &[(Intent, ApplyMeta)]) -> Vec<Result<Applied, ApplyError>> {
        let chain = chain.to_vec();
        let name = self.name.clone();
        self.with_conn(move |conn| Ok(apply_chain(conn, &name, &chain)))
            .await
            // The task did not finish (it panicked, and its transaction rolled
            // back): nothing is certain; the first intent waits for a retry.
            .unwrap_or_else(|error| vec![Err(error)])
    }

    async fn preview(&self, intent: &Intent, meta: &ApplyMeta) -> Result<Preview, ApplyError> {
        let intent = intent.clone();
        let meta = meta.clone();
        let name = self.name.clone();
        self.with_conn(move |conn| apply_intent(conn, &name, &intent, &meta, Finish::Rollback))
            .await
            .map(Preview::from_applied)
    }

    async fn ledger_entry(&self, intent_id: &str) -> Result<Option<LedgerEntry>, ApplyError> {
        let intent_id = intent_id.to_owned();
        self.with_conn(move |conn| read_ledger(conn, &intent_id))
            .await
    }

    async fn undo(&self, intent_ids: &[String], force: bool) -> Result<UndoReport, ApplyError> {
        let intent_ids = intent_ids.to_vec();
        self.with_conn(move |conn| undo_intents(conn, &intent_ids, force))
            .await
    }

    async fn resolve(&self, intent: &Intent) -> Result<Vec<ResolvedOp>, ApplyError> {
        let intent = intent.clone();
        let name = self.name.clone();
        self.with_conn(move |conn| resolve_names(conn, &name, &intent))
            .await
    }
}

/// Resolves every op's names with the same catalog look-up apply makes
/// ([`table_info`]), outside any write transaction.
fn resolve_names(
    conn: &Connection,
    name: &str,
    intent: &Intent,
) -> Result<Vec<ResolvedOp>, ApplyError> {
    check_target(name, intent)?;
    let mut tables: HashMap<TableName, TableInfo> = HashMap::new();
    let mut resolved = Vec::with_capacity(intent.ops.len());
    for (index, op) in intent.ops.iter().enumerate() {
        let info = match tables.entry(op.table().clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                e.insert(table_info(conn, op.table()).map_err(|e| e.at_op(index, op))?)
            }
        };
        let names = resolve_op(op, &info.schema, &info.name, &info.columns)
            .map_err(|e| e.at_op(index, op))?;
        resolved.push(names);
    }
    Ok(resolved)
}

/// Locks the connection. A panic while it was held has already unwound through the
/// transaction guard (which rolls back); roll back again in case it had not.
fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    conn.lock().unwrap_or_else(|poisoned| {
        conn.clear_poison();
        let guard = poisoned.into_inner();
        if !guard.is_autocommit() {
            let _ = guard.execute_batch("ROLLBACK");
        }
        guard
    })
}

fn configure(conn: &Connection, busy_timeout: Duration) -> Result<(), ApplyError> {
    conn.busy_timeout(busy_timeout).map_err(db_error)?;
    // Answers the mode in effect; an in-memory database stays "memory", which is fine.
    let _mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
        .map_err(db_error)?;
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        .map_err(db_error)
}

/// Creates the ledger if missing, migrates it step by step from the recorded
/// version, and checks its version is one this code knows.
fn init_ledger(conn: &mut Connection) -> Result<(), ApplyError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_error)?;
    for statement in DIALECT.version_ddl() {
        tx.execute(&statement, []).map_err(db_error)?;
    }
    let recorded: i64 = tx
        .query_row(&DIALECT.ledger_version(), [], |row| row.get(0))
        .optional()
        .map_err(db_error)?
        .unwrap_or(0);
    if recorded < sql::LEDGER_VERSION {
        for (step, statements) in DIALECT.migrations() {
            if step <= recorded {
                continue;
            }
            for statement in statements {
                tx.execute(&statement, [])
                    .map_err(|e| db_error(e).context(&format!("migrating to version {step}")))?;
            }
        }
        tx.execute(&DIALECT.set_ledger_version(), [sql::LEDGER_VERSION])
            .map_err(db_error)?;
    }
    let version: i64 = tx
        .query_row(&DIALECT.ledger_version(), [], |row| row.get(0))
        .map_err(db_error)?;
    if version != sql::LEDGER_VERSION {
        return Err(ApplyError::permanent(format!(
            "the ledger in this database has schema version {version}; this Airlock \
             knows version {}",
            sql::LEDGER_VERSION
        ))
        .with_code(codes::LEDGER));
    }
    tx.commit().map_err(db_error)
}

fn read_ledger(conn: &Connection, intent_id: &str) -> Result<Option<LedgerEntry>, ApplyError> {
    let row = conn
        .query_row(&DIALECT.ledger_select(), [intent_id], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, String>(4)?,
            ))
        })
        .optional()
        .map_err(|e| db_error(e).context("reading the ledger"))?;
    let Some((intent_id, run, digest, applied_at_ms, undo)) = row else {
        return Ok(None);
    };
    LedgerEntry::from_stored(intent_id, run, digest, applied_at_ms, &undo).map(Some)
}

fn write_ledger(conn: &Connection, entry: &LedgerEntry) -> Result<(), ApplyError> {
    let undo = entry.stored_undo()?;
    conn.execute(
        &DIALECT.ledger_insert(),
        rusqlite::params![
            entry.intent_id,
            entry.run,
            entry.digest,
            entry.applied_at_ms,
            undo
        ],
    )
    .map_err(|e| db_error(e).context("writing the ledger row"))?;
    Ok(())
}

/// One apply (or preview, with [`Finish::Rollback`]) in a transaction of its own.
fn apply_intent(
    conn: &mut Connection,
    name: &str,
    intent: &Intent,
    meta: &ApplyMeta,
    finish: Finish,
) -> Result<Applied, ApplyError> {
    check_target(name, intent)?;
    // Dropping `tx` without commit rolls back: every `?` below undoes everything.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| db_error(e).context("beginning the transaction"))?;
    let applied = run_intent(&tx, intent, meta, finish)?;
    match finish {
        // Nothing was written for an intent already in the ledger.
        Finish::Commit if applied.already => {}
        Finish::Commit => tx.commit().map_err(|e| db_error(e).context("committing"))?,
        Finish::Rollback => tx
            .rollback()
            .map_err(|e| db_error(e).context("rolling the preview back"))?,
    }
    Ok(applied)
}

/// How a chain's transaction ended.
enum ChainEnd {
    /// The results are final (see [`Target::apply_chain`]).
    Done(Vec<Result<Applied, ApplyError>>),
    /// SQLite rolled the whole transaction back because of one intent (a trigger's
    /// `RAISE(ROLLBACK)`, an `ON CONFLICT ROLLBACK` clause, an I/O error), or the
    /// commit was refused (a deferred foreign key): nothing of the chain is written,
    /// and the chain must be applied again one intent per transaction so the intent
    /// to blame fails alone instead of failing the chain at every retry.
    RolledBack,
}

/// Applies a chain in one transaction, one savepoint per intent (see
/// [`Target::apply_chain`]); falls back to one transaction per intent when SQLite
/// rolled the chain's transaction back as a whole.
fn apply_chain(
    conn: &mut Connection,
    name: &str,
    chain: &[(Intent, ApplyMeta)],
) -> Vec<Result<Applied, ApplyError>> {
    if let ChainEnd::Done(results) = chain_transaction(conn, name, chain) {
        return results;
    }
    let mut results = Vec::with_capacity(chain.len());
    for (intent, meta) in chain {
        let result = apply_intent(conn, name, intent, meta, Finish::Commit);
        let failed = result.is_err();
        results.push(result);
        if failed {
            break;
        }
    }
    results
}

fn chain_transaction(conn: &mut Connection, name: &str, chain: &[(Intent, ApplyMeta)]) -> ChainEnd {
    // Dropping `tx` without commit rolls back (unless SQLite already did).
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            return ChainEnd::Done(vec![Err(db_error(e).context("beginning the transaction"))]);
        }
    };
    let mut results = Vec::with_capacity(chain.len());
    for (intent, meta) in chain {
        // Defensive: a SAVEPOINT outside a transaction would begin one of its own,
        // which its RELEASE would commit.
        if tx.is_autocommit() {
            return ChainEnd::RolledBack;
        }
        if let Err(error) = check_target(name, intent) {
            results.push(Err(error));
            break;
        }
        if let Err(e) = tx.execute_batch(sql::SAVEPOINT) {
            let why = db_error(e).context("opening the intent's savepoint");
            results.push(Err(why.clone()));
            return ChainEnd::Done(uncommitted(results, &why));
        }
        match run_intent(&tx, intent, meta, Finish::Commit) {
            Ok(applied) => {
                results.push(Ok(applied));
                if let Err(e) = tx.execute_batch(sql::RELEASE_SAVEPOINT) {
                    let why = db_error(e).context("releasing the intent's savepoint");
                    return ChainEnd::Done(uncommitted(results, &why));
                }
            }
            Err(error) => {
                // The intent's error may have ended the whole transaction.
                if tx.is_autocommit() {
                    return ChainEnd::RolledBack;
                }
                if let Err(e) = tx.execute_batch(sql::ROLLBACK_TO_SAVEPOINT) {
                    if tx.is_autocommit() {
                        return ChainEnd::RolledBack;
                    }
                    let why = db_error(e).context("rolling the failed intent back");
                    results.push(Err(error));
                    return ChainEnd::Done(uncommitted(results, &why));
                }
                results.push(Err(error));
                break;
            }
        }
    }
    // A failed COMMIT drops `tx`, which rolls back what SQLite left open.
    match tx.commit().map_err(db_error) {
        Ok(()) => ChainEnd::Done(results),
        // Refused (a deferred foreign key): nothing was written.
        Err(error) if error.kind == ErrorKind::Permanent => ChainEnd::RolledBack,
        // Busy or I/O trouble: treat the commit as possibly on disk.
        Err(error) => ChainEnd::Done(uncommitted(results, &error.context("committing the chain"))),
    }
}

/// The body of one apply (or preview), inside a transaction the caller owns and
/// ends: the ledger look-up, the checks, the ops with their images, and with
/// [`Finish::Commit`] the ledger row. An intent already in the ledger writes nothing.
fn run_intent(
    tx: &Connection,
    intent: &Intent,
    meta: &ApplyMeta,
    finish: Finish,
) -> Result<Applied, ApplyError> {
    if let Some(entry) = read_ledger(tx, intent.id.as_str())? {
        return ledger_hit(intent.id.as_str(), entry, meta);
    }
    let mut tables: HashMap<TableName, TableInfo> = HashMap::new();
    let mut undo = Vec::new();
    let mut ops = Vec::with_capacity(intent.ops.len());
    for (index, op) in intent.ops.iter().enumerate() {
        let info = match tables.entry(op.table().clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                e.insert(table_info(tx, op.table()).map_err(|e| e.at_op(index, op))?)
            }
        };
        let mut step = Step {
            conn: tx,
            info,
            max_rows: meta.max_rows,
            generated: meta.replay.as_ref().and_then(|g| g.op(index)),
            images: OpImages::new(index, &mut undo),
        };
        let rows = step.apply(op).map_err(|e| e.at_op(index, op))?;
        ops.push(OpResult { index, rows });
    }
    let entry = new_entry(intent, meta, undo)?;
    if finish == Finish::Commit {
        write_ledger(tx, &entry)?;
    }
    Ok(Applied {
        already: false,
        ledger: entry,
        ops,
    })
}

/// The whole of one undo, inside one transaction (see [`Target::undo`]).
fn undo_intents(
    conn: &mut Connection,
    intent_ids: &[String],
    force: bool,
) -> Result<UndoReport, ApplyError> {
    // Dropping `tx` without commit rolls back: every `?` below undoes everything.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| db_error(e).context("beginning the undo transaction"))?;
    let mut report = UndoReport::default();
    let mut tables: HashMap<TableName, TableInfo> = HashMap::new();
    let now = now_ms();
    for id in intent_ids {
        let undone_at: Option<Option<i64>> = tx
            .query_row(&DIALECT.ledger_undone_at(), [id], |row| row.get(0))
            .optional()
            .map_err(|e| db_error(e).context("reading the ledger"))?;
        match undone_at {
            None => return Err(not_in_ledger(id)),
            Some(Some(_)) => {
                report.already.push(id.clone());
                continue;
            }
            Some(None) => {}
        }
        let entry = read_ledger(&tx, id)?.ok_or_else(|| not_in_ledger(id))?;
        for image in entry.undo.iter().rev() {
            let table = image_table(image)?;
            let info = match tables.entry(table.clone()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(table_info(&tx, &table)?),
            };
            let context = undoing(id, image, &table);
            let found = current_row(&tx, &table, info, &image.key).map_err(&context)?;
            report.compare(id, image, found.as_ref());
            // Revert even after a conflict: later checks then see what an undo
            // would leave, and without `force` the transaction is rolled back.
            revert(&tx, &table, info, image, found.is_some()).map_err(context)?;
        }
        tx.execute(&DIALECT.ledger_mark_undone(), rusqlite::params![id, now])
            .map_err(|e| db_error(e).context("marking the ledger row undone"))?;
        report.undone.push(id.clone());
    }
    if !report.may_commit(force) {
        return Ok(report);
    }
    tx.commit()
        .map_err(|e| db_error(e).context("committing the undo"))?;
    report.committed = true;
    Ok(report)
}

/// The row at `key` now (its image), or `None` when there is none.
fn current_row(
    conn: &Connection,
    table: &TableName,
    info: &TableInfo,
    key: &Image,
) -> Result<Option<Image>, ApplyError> {
    let key_args = bind_image(key)?;
    let stmt = sql::select(
        DIALECT,
        table,
        &info.select_list(),
        refs(&key_args),
        Some(2),
    );
    let rows = query(conn, &stmt)?;
    if rows.len() > 1 {
        return Err(key_not_unique(key));
    }
    Ok(rows.first().map(|row| info.image(row).1))
}

/// Sets the row at the image's key to its before-image: deletes it when there was
/// none, updates it when it exists, inserts it (with its key) when it does not.
fn revert(
    conn: &Connection,
    table: &TableName,
    info: &TableInfo,
    image: &UndoImage,
    exists: bool,
) -> Result<(), ApplyError> {
    let key_args = bind_image(&image.key)?;
    match &image.before {
        None if exists => {
            execute(conn, &sql::delete(DIALECT, table, refs(&key_args)))?;
        }
        None => {}
        Some(before) => {
            info.check(table, "before-image", before.keys().map(String::as_str))?;
            let before_args = bind_image(before)?;
            if exists {
                let stmt = sql::update(DIALECT, table, refs(&before_args), refs(&key_args));
                execute(conn, &stmt)?;
            } else {
                // A rowid key is not a column of the image: insert it too.
                let extra = key_args.iter().filter(|(c, _)| !before.contains_key(*c));
                let values: Vec<(&str, &SqlValue)> = refs(&before_args)
                    .chain(extra.map(|(c, v)| (*c, v)))
                    .collect();
                execute(conn, &sql::insert(DIALECT, table, values))?;
            }
        }
    }
    Ok(())
}

/// Converts an image back to SQLite values ([`image_value`]).
fn bind_image(image: &Image) -> Result<Vec<(&str, SqlValue)>, ApplyError> {
    image
        .iter()
        .map(|(column, value)| Ok((column.as_str(), image_value(column, value)?)))
        .collect()
}

/// Converts one value of an image back to an SQLite value: `{"$blob": "<hex>"}`
/// is a BLOB, the rest as [`to_sql`] converts intent values.
fn image_value(column: &str, value: &Value) -> Result<SqlValue, ApplyError> {
    let blob = value
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.get("$blob"))
        .and_then(Value::as_str);
    match blob {
        Some(hex_text) => Ok(SqlValue::Blob(hex::decode(hex_text).map_err(|e| {
            ApplyError::permanent(format!(
                "image: column {column:?} holds a BLOB that is not hex: {e}"
            ))
            .with_code(codes::LEDGER)
        })?)),
        None => to_sql("image", column, value),
    }
}

/// What Airlock needs to know about one table, read once per intent.
#[derive(Debug)]
struct TableInfo {
    /// The database holding the table (`main`, `temp` or an attached one's name).
    schema: String,
    /// The table's name as the catalog stores it (SQLite matches names without
    /// regard to ASCII case).
    name: String,
    /// All columns, in declaration order.
    columns: Vec<String>,
    /// Primary-key columns, in key order; empty when none is declared.
    pk: Vec<String>,
    /// The name to select the rowid by (`rowid`, or an alias a column does not
    /// shadow); `None` for a `WITHOUT ROWID` table.
    rowid: Option<&'static str>,
}

fn table_info(conn: &Connection, table: &TableName) -> Result<TableInfo, ApplyError> {
    if sql::is_reserved_table(table) {
        return Err(ApplyError::permanent(format!(
            "table {table} belongs to Airlock (its ledger); intents cannot write it"
        ))
        .with_code(codes::RESERVED_TABLE));
    }
    let found = table_list(conn, table.name())
        .map_err(|e| db_error(e).context("reading the table list"))?;
    // SQLite resolves an unqualified name in temp, then main, then attached databases.
    let entry = match table.schema() {
        Some(schema) => found.iter().find(|f| f.0.eq_ignore_ascii_case(schema)),
        None => found
            .iter()
            .find(|f| f.0 == "temp")
            .or_else(|| found.iter().find(|f| f.0 == "main"))
            .or_else(|| found.first()),
    };
    let Some((schema, stored_name, kind, without_rowid)) = entry else {
        return Err(
            ApplyError::permanent(format!("table {table} does not exist"))
                .with_code(codes::UNKNOWN_TABLE),
        );
    };
    if kind != "table" {
        return Err(ApplyError::permanent(format!(
            "{table} is a {kind}, not a table; Airlock writes plain tables only"
        ))
        .with_code(codes::NOT_A_TABLE));
    }
    check_canonical(table, schema, stored_name)?;
    let mut columns_pk = table_columns(conn, table.name(), schema)
        .map_err(|e| db_error(e).context("reading the table's columns"))?;
    let columns: Vec<String> = columns_pk.iter().map(|(name, _)| name.clone()).collect();
    columns_pk.retain(|(_, pk)| *pk > 0);
    columns_pk.sort_by_key(|(_, pk)| *pk);
    let pk: Vec<String> = columns_pk.into_iter().map(|(name, _)| name).collect();
    let rowid = if *without_rowid {
        None
    } else {
        ["rowid", "_rowid_", "oid"]
            .into_iter()
            .find(|alias| !columns.iter().any(|c| c.eq_ignore_ascii_case(alias)))
    };
    if pk.is_empty() && rowid.is_none() {
        return Err(ApplyError::permanent(format!(
            "table {table} has no primary key, and columns named rowid, _rowid_ and oid \
             hide its rowid: Airlock cannot identify its rows for undo"
        ))
        .with_code(codes::NO_ROW_IDENTITY));
    }
    Ok(TableInfo {
        schema: schema.clone(),
        name: stored_name.clone(),
        columns,
        pk,
        rowid,
    })
}

/// The databases holding a table of this name (matched as SQLite matches names,
/// without regard to ASCII case): (schema, name as stored, type, without rowid).
type TableListEntry = (String, String, String, bool);

fn table_list(conn: &Connection, name: &str) -> rusqlite::Result<Vec<TableListEntry>> {
    let mut stmt =
        conn.prepare_cached("SELECT schema, name, type, wr FROM pragma_table_list(?1)")?;
    let rows = stmt.query_map([name], |row| {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
    })?;
    rows.collect()
}

/// A table's columns in declaration order, with their position in the primary key
/// (0 when not in it).
fn table_columns(
    conn: &Connection,
    name: &str,
    schema: &str,
) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut stmt =
        conn.prepare_cached("SELECT name, pk FROM pragma_table_info(?1, ?2) ORDER BY cid")?;
    let rows = stmt.query_map([name, schema], |row| Ok((row.get(0)?, row.get(1)?)))?;
    rows.collect()
}

impl TableInfo {
    /// The columns that identify a row: the primary key, else the rowid.
    fn key_columns(&self) -> Vec<&str> {
        if self.pk.is_empty() {
            self.rowid.into_iter().collect()
        } else {
            self.pk.iter().map(String::as_str).collect()
        }
    }

    /// What images select: every column, then the rowid when it is the key.
    fn select_list(&self) -> Vec<&str> {
        let mut list: Vec<&str> = self.columns.iter().map(String::as_str).collect();
        if self.pk.is_empty() {
            list.extend(self.rowid);
        }
        list
    }

    /// Splits a row read with [`TableInfo::select_list`] into its key and its image.
    fn image(&self, row: &[SqlValue]) -> (Image, Image) {
        let mut image = Image::new();
        for (column, value) in self.columns.iter().zip(row) {
            image.insert(column.clone(), to_json(value));
        }
        let mut key = Image::new();
        for column in self.key_columns() {
            let value = self.value_of(row, column).map_or(Value::Null, to_json);
            key.insert(column.to_owned(), value);
        }
        (key, image)
    }

    /// The value of `column` (or the rowid) in a row read with the select list.
    fn value_of<'r>(&self, row: &'r [SqlValue], column: &str) -> Option<&'r SqlValue> {
        match self.columns.iter().position(|c| c == column) {
            Some(i) => row.get(i),
            None if self.rowid == Some(column) && self.pk.is_empty() => row.get(self.columns.len()),
            None => None,
        }
    }
}

impl Columns for TableInfo {
    fn columns(&self) -> &[String] {
        &self.columns
    }
}

/// One op being applied, with what it needs from the intent's transaction.
struct Step<'a> {
    conn: &'a Connection,
    info: &'a TableInfo,
    max_rows: u64,
    /// A replay's recorded generated values for this op ([`ApplyMeta::replay`]).
    generated: Option<&'a Image>,
    images: OpImages<'a>,
}

impl<'a> Step<'a> {
    /// Applies one op; answers the number of rows it wrote.
    fn apply(&mut self, op: &Op) -> Result<u64, ApplyError> {
        match op {
            Op::Insert { table, values } => self.insert(table, values),
            Op::Upsert { table, values, on } => self.upsert(table, values, on),
            Op::Update {
                table,
                key,
                set,
                expect,
            } => self.update(table, key, set, expect.as_ref()),
            Op::Delete { table, key, expect } => self.delete(table, key, expect.as_ref()),
        }
    }

    /// The recorded values a replay writes besides the op's `values` (none
    /// outside a replay; see [`Generated`](super::Generated)), as SQLite values:
    /// those of the table's columns the op does not name. The table's generated
    /// columns are not among them (`pragma_table_info` leaves them out), so they
    /// compute again.
    fn generated(&self, values: &Row) -> Result<Vec<(&'a str, SqlValue)>, ApplyError> {
        let info = self.info;
        generated_values(self.generated, values, |c| {
            info.columns.iter().any(|k| k == c)
        })
        .into_iter()
        .map(|(column, value)| Ok((column, image_value(column, value)?)))
        .collect()
    }

    fn insert(&mut self, table: &TableName, values: &Row) -> Result<u64, ApplyError> {
        self.info.check(table, "values", keys(values))?;
        let generated = self.generated(values)?;
        let mut values = bind("values", values)?;
        values.extend(generated);
        let rows = execute(self.conn, &sql::insert(DIALECT, table, refs(&values)))?;
        let (key, after) = self.find_written(table, &values, None)?;
        self.images.record(table, key, None, Some(after));
        Ok(rows)
    }

    fn upsert(
        &mut self,
        table: &TableName,
        values: &Row,
        on: &[Column],
    ) -> Result<u64, ApplyError> {
        self.info.check(table, "values", keys(values))?;
        self.info
            .check(table, "on", on.iter().map(Column::as_str))?;
        check_upsert(values, on)?;
        let generated = self.generated(values)?;
        // Written only if the row is inserted: a conflicting row keeps its own.
        let insert_only: Vec<&str> = generated.iter().map(|(c, _)| *c).collect();
        let mut values = bind("values", values)?;
        values.extend(generated);
        let on: Vec<&str> = on.iter().map(Column::as_str).collect();
        let on_filter: Vec<(&str, &SqlValue)> =
            refs(&values).filter(|(c, _)| on.contains(c)).collect();
        // A NULL never conflicts, so then the upsert can only insert.
        let before = if on_filter.iter().any(|(_, v)| v.is_null()) {
            Vec::new()
        } else {
            self.read(table, on_filter, Some(2))?
        };
        let stmt = sql::upsert(DIALECT, table, refs(&values), &on, &insert_only);
        let rows = execute(self.conn, &stmt)?;
        if before.len() > 1 {
            return Err(on_not_unique(&on));
        }
        let before = before.first().map(|row| self.info.image(row).1);
        let (key, after) = self.find_written(table, &values, Some(&on))?;
        self.images.record(table, key, before, Some(after));
        Ok(rows)
    }

    fn update(
        &mut self,
        table: &TableName,
        key: &Row,
        set: &Row,
        expect: Option<&Row>,
    ) -> Result<u64, ApplyError> {
        let empty = Row::new();
        let expect = expect.unwrap_or(&empty);
        self.info.check(table, "key", keys(key))?;
        self.info.check(table, "set", keys(set))?;
        self.info.check(table, "expect", keys(expect))?;
        check_update(key, set)?;
        let key_args = bind("key", key)?;
        let set_args = bind("set", set)?;
        let expect_args = bind("expect", expect)?;
        let filter = || refs(&key_args).chain(refs(&expect_args));
        let before = self.matched(table, key, &key_args, expect, filter())?;
        let rows = execute(
            self.conn,
            &sql::update(DIALECT, table, refs(&set_args), filter()),
        )?;
        self.check_rows(rows, key)?;
        for row in &before {
            let (old_key, before_image) = self.info.image(row);
            // Where the row is now: its key columns, with those the op set replaced.
            let mut now = Vec::new();
            for column in self.info.key_columns() {
                let value = set_args
                    .iter()
                    .find(|(c, _)| *c == column)
                    .map(|(_, v)| v)
                    .or_else(|| self.info.value_of(row, column));
                now.push((column, value.unwrap_or(&SqlValue::Null)));
            }
            let after = self.read(table, now, Some(1))?;
            let (key, after_image) = match after.first() {
                Some(row) => {
                    let (key, image) = self.info.image(row);
                    (key, Some(image))
                }
                // A trigger removed it; the image says so.
                None => (old_key, None),
            };
            self.images
                .record(table, key, Some(before_image), after_image);
        }
        Ok(rows)
    }

    fn delete(
        &mut self,
        table: &TableName,
        key: &Row,
        expect: Option<&Row>,
    ) -> Result<u64, ApplyError> {
        let empty = Row::new();
        let expect = expect.unwrap_or(&empty);
        self.info.check(table, "key", keys(key))?;
        self.info.check(table, "expect", keys(expect))?;
        check_delete(key)?;
        let key_args = bind("key", key)?;
        let expect_args = bind("expect", expect)?;
        let filter = || refs(&key_args).chain(refs(&expect_args));
        let before = self.matched(table, key, &key_args, expect, filter())?;
        let rows = execute(self.conn, &sql::delete(DIALECT, table, filter()))?;
        self.check_rows(rows, key)?;
        for row in &before {
            let (key, image) = self.info.image(row);
            self.images.record(table, key, Some(image), None);
        }
        Ok(rows)
    }

    /// Reads the rows an update or delete will touch (its before-images), failing
    /// when there are none or more than `max_rows`, and saying why.
    fn matched<'f>(
        &self,
        table: &TableName,
        key: &Row,
        key_args: &[(&str, SqlValue)],
        expect: &Row,
        filter: impl IntoIterator<Item = (&'f str, &'f SqlValue)>,
    ) -> Result<Vec<Vec<SqlValue>>, ApplyError> {
        let before = self.read(table, filter, Some(self.max_rows.saturating_add(1)))?;
        if before.is_empty() {
            if !expect.is_empty() {
                let columns: Vec<&str> = keys(expect).collect();
                let stmt = sql::select(DIALECT, table, &columns, refs(key_args), Some(1));
                if let Some(row) = query(self.conn, &stmt)?.first() {
                    let found: Image = columns
                        .iter()
                        .zip(row)
                        .map(|(c, v)| ((*c).to_owned(), to_json(v)))
                        .collect();
                    // Which columns differ, each compared as the filter compares it.
                    let expect_args = bind("expect", expect)?;
                    let mut differ = Vec::new();
                    for (column, value) in &expect_args {
                        let one = refs(key_args).chain([(*column, value)]);
                        let stmt = sql::select(DIALECT, table, &[*column], one, Some(1));
                        if query(self.conn, &stmt)?.is_empty() {
                            differ.push(*column);
                        }
                    }
                    return Err(expect_failed(key, &differ, &found, expect));
                }
            }
            return Err(no_row(key));
        }
        if before.len() as u64 > self.max_rows {
            return Err(too_many_rows(key, self.max_rows));
        }
        Ok(before)
    }

    /// Defensive: the write itself must not exceed the limit either.
    fn check_rows(&self, rows: u64, key: &Row) -> Result<(), ApplyError> {
        if rows > self.max_rows {
            return Err(too_many_rows(key, self.max_rows));
        }
        Ok(())
    }

    /// Finds the row an insert or upsert just wrote, for its after-image: by the
    /// `on` columns of an upsert, else by the rowid SQLite just assigned, else by
    /// the primary key given in the values.
    fn find_written(
        &self,
        table: &TableName,
        values: &[(&str, SqlValue)],
        on: Option<&[&str]>,
    ) -> Result<(Image, Image), ApplyError> {
        let non_null = |columns: &[&str]| -> Option<Vec<(String, SqlValue)>> {
            columns
                .iter()
                .map(|c| {
                    values
                        .iter()
                        .find(|(v, _)| v == c)
                        .filter(|(_, v)| !v.is_null())
                        .map(|(c, v)| ((*c).to_owned(), v.clone()))
                })
                .collect()
        };
        let pk: Vec<&str> = self.info.pk.iter().map(String::as_str).collect();
        let filter = on
            .and_then(&non_null)
            .or_else(|| {
                self.info.rowid.map(|alias| {
                    vec![(
                        alias.to_owned(),
                        SqlValue::Integer(self.conn.last_insert_rowid()),
                    )]
                })
            })
            .or_else(|| (!pk.is_empty()).then(|| non_null(&pk)).flatten());
        let Some(filter) = filter else {
            return Err(ApplyError::permanent(
                "cannot find the written row again: the table has no rowid and values \
                 do not give its whole primary key",
            )
            .with_code(codes::NO_ROW_IDENTITY));
        };
        let rows = self.read(table, filter.iter().map(|(c, v)| (c.as_str(), v)), Some(1))?;
        let Some(row) = rows.first() else {
            return Err(ApplyError::permanent(
                "the written row is gone (removed by a trigger?); cannot record its image",
            )
            .with_code(codes::NO_ROW_IDENTITY));
        };
        Ok(self.info.image(row))
    }

    /// Reads rows of `table` (all columns, plus the rowid when it is the key).
    fn read<'f>(
        &self,
        table: &TableName,
        filter: impl IntoIterator<Item = (&'f str, &'f SqlValue)>,
        limit: Option<u64>,
    ) -> Result<Vec<Vec<SqlValue>>, ApplyError> {
        let stmt = sql::select(DIALECT, table, &self.info.select_list(), filter, limit);
        query(self.conn, &stmt)
    }
}

fn refs<'a>(
    args: &'a [(&'a str, SqlValue)],
) -> impl Iterator<Item = (&'a str, &'a SqlValue)> + Clone {
    args.iter().map(|(c, v)| (*c, v))
}

impl Arg for &SqlValue {
    fn is_null(&self) -> bool {
        matches!(self, SqlValue::Null)
    }
}

/// Converts the JSON values of one part of an op (`values`, `key`, ...) to SQLite's.
fn bind<'r>(part: &str, row: &'r Row) -> Result<Vec<(&'r str, SqlValue)>, ApplyError> {
    row.iter()
        .map(|(column, value)| Ok((column.as_str(), to_sql(part, column, value)?)))
        .collect()
}

fn to_sql(part: &str, column: &str, value: &Value) -> Result<SqlValue, ApplyError> {
    Ok(match value {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                SqlValue::Integer(i)
            } else if n.is_u64() {
                return Err(ApplyError::permanent(format!(
                    "{part}: value {n} of column {column:?} is beyond SQLite's 64-bit integer \
                     range"
                ))
                .with_code(codes::BAD_VALUE));
            } else {
                match n.as_f64() {
                    Some(f) => SqlValue::Real(f),
                    None => {
                        return Err(ApplyError::permanent(format!(
                            "{part}: value {n} of column {column:?} is not a representable number"
                        ))
                        .with_code(codes::BAD_VALUE));
                    }
                }
            }
        }
        Value::String(s) => SqlValue::Text(s.clone()),
        Value::Array(_) | Value::Object(_) => SqlValue::Text(value.to_string()),
    })
}

fn to_json(value: &SqlValue) -> Value {
    match value {
        SqlValue::Null => Value::Null,
        SqlValue::Integer(i) => Value::from(*i),
        SqlValue::Real(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        SqlValue::Text(s) => Value::String(s.clone()),
        SqlValue::Blob(b) => serde_json::json!({ "$blob": hex::encode(b) }),
    }
}

fn owned(value: ValueRef<'_>) -> SqlValue {
    match value {
        ValueRef::Null => SqlValue::Null,
        ValueRef::Integer(i) => SqlValue::Integer(i),
        ValueRef::Real(f) => SqlValue::Real(f),
        ValueRef::Text(t) => SqlValue::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
    }
}

fn execute(conn: &Connection, stmt: &Statement<&SqlValue>) -> Result<u64, ApplyError> {
    let mut prepared = conn.prepare_cached(&stmt.sql).map_err(db_error)?;
    let rows = prepared
        .execute(params_from_iter(stmt.params.iter()))
        .map_err(db_error)?;
    Ok(rows as u64)
}

fn query(conn: &Connection, stmt: &Statement<&SqlValue>) -> Result<Vec<Vec<SqlValue>>, ApplyError> {
    query_rows(conn, stmt).map_err(|e| db_error(e).context("reading rows"))
}

fn query_rows(
    conn: &Connection,
    stmt: &Statement<&SqlValue>,
) -> rusqlite::Result<Vec<Vec<SqlValue>>> {
    let mut prepared = conn.prepare_cached(&stmt.sql)?;
    let width = prepared.column_count();
    let rows = prepared.query_map(params_from_iter(stmt.params.iter()), |row| {
        (0..width).map(|i| row.get_ref(i).map(owned)).collect()
    })?;
    rows.collect()
}

/// Classifies an SQLite error: lock contention and I/O trouble are transient;
/// everything else (constraints, types, SQL errors) is permanent.
fn db_error(e: rusqlite::Error) -> ApplyError {
    match e {
        rusqlite::Error::SqliteFailure(err, message) => {
            let kind = match err.code {
                ffi::ErrorCode::DatabaseBusy
                | ffi::ErrorCode::DatabaseLocked
                | ffi::ErrorCode::SystemIoFailure
                | ffi::ErrorCode::DiskFull
                | ffi::ErrorCode::OutOfMemory
                | ffi::ErrorCode::FileLockingProtocolFailed
                | ffi::ErrorCode::SchemaChanged
                | ffi::ErrorCode::OperationInterrupted => ErrorKind::Transient,
                _ => ErrorKind::Permanent,
            };
            let message = message.unwrap_or_else(|| err.to_string());
            ApplyError::new(kind, message).with_code(code_name(err.extended_code))
        }
        other => ApplyError::permanent(other.to_string()),
    }
}

macro_rules! code_names {
    ($code:expr; $($name:ident),* $(,)?) => {
        match $code {
            $(ffi::$name => Some(stringify!($name)),)*
            _ => None,
        }
    };
}

/// The name of an SQLite (extended) result code, e.g. `SQLITE_CONSTRAINT_UNIQUE`.
fn code_name(code: i32) -> String {
    let extended = code_names!(code;
        SQLITE_CONSTRAINT_CHECK, SQLITE_CONSTRAINT_COMMITHOOK, SQLITE_CONSTRAINT_FOREIGNKEY,
        SQLITE_CONSTRAINT_FUNCTION, SQLITE_CONSTRAINT_NOTNULL, SQLITE_CONSTRAINT_PRIMARYKEY,
        SQLITE_CONSTRAINT_TRIGGER, SQLITE_CONSTRAINT_UNIQUE, SQLITE_CONSTRAINT_VTAB,
        SQLITE_CONSTRAINT_ROWID, SQLITE_CONSTRAINT_PINNED, SQLITE_CONSTRAINT_DATATYPE,
        SQLITE_BUSY_RECOVERY, SQLITE_BUSY_SNAPSHOT, SQLITE_BUSY_TIMEOUT,
        SQLITE_LOCKED_SHAREDCACHE, SQLITE_LOCKED_VTAB,
        SQLITE_IOERR_READ, SQLITE_IOERR_SHORT_READ, SQLITE_IOERR_WRITE, SQLITE_IOERR_FSYNC,
        SQLITE_IOERR_DIR_FSYNC, SQLITE_IOERR_TRUNCATE, SQLITE_IOERR_FSTAT, SQLITE_IOERR_LOCK,
        SQLITE_IOERR_NOMEM, SQLITE_IOERR_SHMLOCK, SQLITE_IOERR_CORRUPTFS,
        SQLITE_READONLY_RECOVERY, SQLITE_READONLY_CANTLOCK, SQLITE_READONLY_ROLLBACK,
        SQLITE_READONLY_DBMOVED, SQLITE_READONLY_DIRECTORY,
        SQLITE_CANTOPEN_ISDIR, SQLITE_CANTOPEN_FULLPATH, SQLITE_CANTOPEN_NOTEMPDIR,
        SQLITE_CORRUPT_INDEX, SQLITE_ABORT_ROLLBACK, SQLITE_ERROR_RETRY,
    );
    let primary = code_names!(code & 0xff;
        SQLITE_ERROR, SQLITE_INTERNAL, SQLITE_PERM, SQLITE_ABORT, SQLITE_BUSY, SQLITE_LOCKED,
        SQLITE_NOMEM, SQLITE_READONLY, SQLITE_INTERRUPT, SQLITE_IOERR, SQLITE_CORRUPT,
        SQLITE_NOTFOUND, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_PROTOCOL, SQLITE_SCHEMA,
        SQLITE_TOOBIG, SQLITE_CONSTRAINT, SQLITE_MISMATCH, SQLITE_MISUSE, SQLITE_NOLFS,
        SQLITE_AUTH, SQLITE_RANGE, SQLITE_NOTADB,
    );
    match (extended, primary) {
        (Some(name), _) => name.to_owned(),
        (None, Some(name)) if code == code & 0xff => name.to_owned(),
        // An extended code this table does not list: keep the number.
        (None, Some(name)) => format!("{name}({code})"),
        (None, None) => format!("SQLITE({code})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_cover_extended_and_primary_codes() {
        assert_eq!(
            code_name(ffi::SQLITE_CONSTRAINT_UNIQUE),
            "SQLITE_CONSTRAINT_UNIQUE"
        );
        assert_eq!(code_name(ffi::SQLITE_BUSY), "SQLITE_BUSY");
        assert_eq!(
            code_name(ffi::SQLITE_IOERR_SHMMAP),
            format!("SQLITE_IOERR({})", ffi::SQLITE_IOERR_SHMMAP)
        );
        assert_eq!(code_name(0xff), "SQLITE(255)");
    }

    #[test]
    fn json_values_convert_both_ways() {
        let v = |j: Value| to_sql("values", "c", &j);
        assert_eq!(v(Value::Null).unwrap(), SqlValue::Null);
        assert_eq!(v(Value::Bool(true)).unwrap(), SqlValue::Integer(1));
        assert_eq!(v(serde_json::json!(-3)).unwrap(), SqlValue::Integer(-3));
        assert_eq!(v(serde_json::json!(1.5)).unwrap(), SqlValue::Real(1.5));
        assert_eq!(
            v(serde_json::json!({"a": [1]})).unwrap(),
            SqlValue::Text(r#"{"a":[1]}"#.to_owned())
        );
        let err = v(serde_json::json!(u64::MAX)).unwrap_err();
        assert!(err.message.contains("\"c\""), "{err}");
        assert_eq!(err.code.as_deref(), Some(codes::BAD_VALUE));

        assert_eq!(
            to_json(&SqlValue::Blob(vec![0xde, 0xad])),
            serde_json::json!({"$blob": "dead"})
        );
        assert_eq!(to_json(&SqlValue::Real(2.5)), serde_json::json!(2.5));
    }

    #[test]
    fn busy_is_transient_and_constraints_are_permanent() {
        let busy = rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_BUSY), None);
        assert_eq!(db_error(busy).kind, ErrorKind::Transient);
        let unique = rusqlite::Error::SqliteFailure(
            ffi::Error::new(ffi::SQLITE_CONSTRAINT_UNIQUE),
            Some("UNIQUE constraint failed: t.a".to_owned()),
        );
        let err = db_error(unique);
        assert_eq!(err.kind, ErrorKind::Permanent);
        assert_eq!(err.code.as_deref(), Some("SQLITE_CONSTRAINT_UNIQUE"));
        assert_eq!(err.message, "UNIQUE constraint failed: t.a");
    }
}
