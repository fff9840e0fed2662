//! Apply: the box of `docs/design.md` that writes an approved intent to its target database.
//!
//! One intent is one target transaction: its ops run in order, the before- and
//! after-images of every row they touch are captured as [`UndoImage`]s, and a
//! [`LedgerEntry`] (intent id, run, digest, undo images) is written to the target's
//! ledger table *in the same transaction*. The ledger is what makes apply
//! exactly-once (invariant 2): applying an intent whose id the ledger already holds
//! writes nothing and answers [`Applied::already`]. Any error rolls the whole
//! transaction back, so an intent is either entirely applied (ledger row included)
//! or not at all.
//!
//! Layout: [`sql`] builds SQL text and knows nothing of any driver; each target
//! module ([`sqlite`], [`postgres`]) runs it. Only these modules speak SQL. The
//! ledger's statements differ by [`sql::Dialect`]; op statements are the generic
//! builders for SQLite and [`sql::pg`] for PostgreSQL (which lets the server convert
//! JSON values to column types). Reading the catalogue (columns, primary key) and
//! classifying driver errors are each target module's; the rules and errors that
//! do not depend on the database (the ledger hit, the new ledger entry and its
//! review check, the checks an op passes before it runs, recording undo images,
//! finding undo conflicts) are written once, in `common`, for both. The ledger is the table
//! `airlock_ledger` in an SQLite target and `airlock.ledger` in a PostgreSQL one.
//!
//! A run's consecutive intents can share one transaction ([`Target::apply_chain`]):
//! each runs exactly what [`Target::apply`] runs inside a savepoint of its own, an
//! intent that fails is rolled back to its savepoint (its writes and its ledger row
//! vanish; the intents before it stay) and ends the chain, and one commit makes the
//! rest durable. Each intent is still all-or-nothing with its ledger row, so the
//! ledger still makes every retry exactly-once; a chain only saves commits. When the
//! commit's outcome is unknown (connection lost, an I/O error), every intent of the
//! chain that is not certain is reported as a transient error, never as applied.
//!
//! Undo ([`Target::undo`]) reverts intents from their ledger rows' images in one
//! transaction per call, checking each row still holds its after-image first, and
//! marks each ledger row undone (`undone_at_ms`, ledger version 2) in that same
//! transaction, so undoing twice changes nothing.
//!
//! Names ([`Target::resolve`]): before any policy decides, every op's table and the
//! columns it names are resolved against the target's catalog, the way the database
//! itself resolves them (SQLite: case-insensitive, `temp` then `main` then attached
//! databases; PostgreSQL: `search_path`, with `pg_catalog` implicitly first), and
//! the policy is shown the canonical schema, table and columns ([`ResolvedOp`]). A
//! name that resolves into a system catalog or Airlock's own schema, or does not
//! resolve at all, is a permanent error before policy. Apply resolves the same
//! spelling again inside its own transaction, with the same rules and the same
//! checks, so what the policy saw is what is written unless the catalog itself
//! changed in between (DDL by an administrator; agents cannot run DDL).
//!
//! Roles ([`Target::check_role`]): a PostgreSQL role with more power than applying
//! needs (superuser, `CREATEROLE`, `CREATEDB`, `BYPASSRLS`, `REPLICATION`, held
//! directly or through a role it is a member of) is refused unless the operator
//! allows it (`[apply] allow_privileged_role`); see `docs/postgres-role.md`.
//!
//! Replay ([`ApplyMeta::replay`]): a replay applies an intent as above and also
//! writes, for each row an op inserted, the values the database generated the
//! first time ([`Generated`]), so its target ends up with the recorded rows
//! whatever its sequences say; only a replay overrides identity columns, and
//! PostgreSQL sequences are advanced past the values it wrote.
//!
//! Op indexes in errors and images count from 0, as in the JSON pointer `/ops/N`.
//!
//! **Errors never show the agent data it could not read.** An [`ApplyError`]'s
//! `message` is what the agent reads in its outcome: the op, the table, the columns
//! involved and the code, and values only when the agent wrote them itself. Values
//! read from the database (the row a failed `expect` found, PostgreSQL's `DETAIL`,
//! `HINT` and `WHERE` text, which quote stored rows and keys) go in `detail`, which
//! only humans see: the run log's `failed` record and the review API.
//!
//! **An approval binds the rows the reviewer saw.** A preview's [`Preview::digest`]
//! hashes the before-image of every row the intent would touch ([`rows_digest`]);
//! reviewers approve that digest, and the pipeline gives it back as
//! [`ApplyMeta::reviewed`]. Inside the apply transaction, after the ops ran and
//! before the ledger row is written, the before-images just captured are hashed
//! again; if they differ, the transaction rolls back with
//! [`codes::ROWS_CHANGED`] and nothing is written.

mod common;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sql;
pub mod sqlite;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use airlock_intent::{Intent, Op};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

#[cfg(feature = "postgres")]
pub use postgres::PostgresTarget;
pub use sqlite::SqliteTarget;

/// Column name → JSON value: one row, or the columns identifying one row.
pub type Image = serde_json::Map<String, serde_json::Value>;

/// How many rows an update or delete may touch unless configured otherwise.
pub const DEFAULT_MAX_ROWS: u64 = 1;

/// A database that approved intents are applied to.
#[async_trait]
pub trait Target: Send + Sync + fmt::Debug {
    /// The configured name of this target (an intent's `target` field).
    fn name(&self) -> &str;

    /// Applies `intent` in one transaction together with its ledger row, exactly once:
    /// if the ledger already holds the intent's id, nothing is written and the stored
    /// entry is returned with `already: true` (or an error if its digest differs).
    /// An intent whose `target` is not [`Target::name`] is refused.
    async fn apply(&self, intent: &Intent, meta: &ApplyMeta) -> Result<Applied, ApplyError>;

    /// Applies `chain` (consecutive intents of one run, in queue order) in order, as
    /// [`Target::apply`] applies each one, and stops at the first that fails: nothing
    /// overtakes an intent that failed or must be retried.
    ///
    /// The answer has one result per intent for a prefix of the chain: first the
    /// intents that are applied (durably, or [`Applied::already`]), then the errors;
    /// the intents past its end were not tried and are left as they were. Each `Ok`
    /// is certain. Normally at most one error ends the answer; when the outcome of
    /// intents already run is not certain (the connection was lost, or the commit
    /// failed without saying whether it landed), each of them is reported as a
    /// transient error (a retry finds a committed intent in the ledger and answers
    /// `already`).
    ///
    /// The default applies one intent per transaction ([`apply_each`]). Targets that
    /// can do better run the chain in one transaction with one savepoint per intent,
    /// so a chain costs one commit.
    async fn apply_chain(&self, chain: &[(Intent, ApplyMeta)]) -> Vec<Result<Applied, ApplyError>> {
        apply_each(self, chain).await
    }

    /// Runs exactly what [`Target::apply`] runs (same checks, same images) and rolls
    /// the transaction back instead of writing the ledger row and committing: the
    /// database and its ledger are left as they were. An intent the ledger already
    /// holds previews as [`Preview::already`] with no ops; one that would fail to
    /// apply returns that error.
    async fn preview(&self, intent: &Intent, meta: &ApplyMeta) -> Result<Preview, ApplyError>;

    /// The ledger row of `intent_id`, if that intent was applied to this target.
    async fn ledger_entry(&self, intent_id: &str) -> Result<Option<LedgerEntry>, ApplyError>;

    /// Reverts the intents `intent_ids` (give them in reverse apply order) in ONE
    /// transaction, from their ledger's undo images, and marks each undone in the
    /// ledger in that same transaction.
    ///
    /// Each image is checked just before it is reverted: the row at its key must
    /// still equal its after-image (a deleted row must still be absent). Intents the
    /// ledger already marks undone are skipped ([`UndoReport::already`]). On any
    /// conflict without `force`, the transaction rolls back and the report lists
    /// every conflict with `committed: false`; with `force`, the rows are set to their
    /// before-images anyway and the conflicts are reported with `committed: true`.
    /// An id the ledger does not hold is an error, and nothing changes.
    async fn undo(&self, intent_ids: &[String], force: bool) -> Result<UndoReport, ApplyError>;

    /// Resolves every op's table, and every column it names, against the target's
    /// catalog as the database would resolve them, and answers the canonical names,
    /// one [`ResolvedOp`] per op in op order. Fails (permanently, blaming the op)
    /// when a table does not exist, is not a plain table, lies in a system catalog
    /// or in Airlock's own schema, or lacks a column the op names; transiently when
    /// the database cannot be asked. Writes nothing.
    async fn resolve(&self, intent: &Intent) -> Result<Vec<ResolvedOp>, ApplyError>;

    /// Checks the database role Airlock connects as (start-up, `airlock run
    /// --check`). Answers the powers beyond applying that the role holds (empty
    /// when none), each as `ATTRIBUTE` or `ATTRIBUTE (through role R)`. With any
    /// and without `allow_privileged`, a permanent error with code
    /// [`codes::PRIVILEGED_ROLE`] saying which. A transient error means the
    /// database could not be asked now; the target then checks again on its first
    /// connection and refuses to apply until the role passes. Targets without roles
    /// (SQLite) answer empty.
    async fn check_role(&self, allow_privileged: bool) -> Result<Vec<String>, ApplyError> {
        let _ = allow_privileged;
        Ok(Vec::new())
    }

    /// The database server as `airlock run --check` reports it (for PostgreSQL its
    /// version and the role Airlock connects as), asked without writing anything;
    /// `None` for targets without a server (SQLite).
    async fn server(&self) -> Result<Option<String>, ApplyError> {
        Ok(None)
    }

    /// How many of its pooled connections are in use now (the metrics'
    /// `airlock_target_pool_in_use`); `None` for targets without a pool (SQLite).
    fn pool_in_use(&self) -> Option<usize> {
        None
    }
}

/// One op's table and columns as the target's catalog stores them: what the policy
/// decides on (DESIGN invariant 3), never the agent's spelling alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedOp {
    /// The table as the agent wrote it (`AUDIT_LOG`, `main.Audit_Log`).
    pub spelled: String,
    /// The schema the table is in (`main`, `temp` or an attached database's name in
    /// SQLite; the namespace in PostgreSQL), never empty.
    pub schema: String,
    /// The table's name as stored in the catalog.
    pub table: String,
    /// The columns the op writes (`values` of insert and upsert, `set` of update;
    /// empty for delete), as stored, in the op's order.
    pub columns: Vec<String>,
}

/// Resolves the columns of `op` against `columns` (the table's, as stored): every
/// column the op names must be one (compared exactly, as [`check_columns`] does);
/// answers the op's [`ResolvedOp`]. `schema` and `table` are the canonical names the
/// catalog gave; a system catalog or Airlock's own table is refused.
pub(crate) fn resolve_op(
    op: &Op,
    schema: &str,
    table: &str,
    columns: &[String],
) -> Result<ResolvedOp, ApplyError> {
    check_canonical(op.table(), schema, table)?;
    let spelled = op.table();
    for (part, names) in op.columns_named() {
        check_columns(columns, spelled, part, names)?;
    }
    let written = op
        .columns_written()
        .into_iter()
        .filter_map(|name| columns.iter().find(|c| *c == name).cloned())
        .collect();
    Ok(ResolvedOp {
        spelled: spelled.as_str().to_owned(),
        schema: schema.to_owned(),
        table: table.to_owned(),
        columns: written,
    })
}

/// Refuses a table that resolved (whatever its spelling) into a system catalog or
/// Airlock's own tables, by its canonical `schema.table`: the same rules the
/// validator applies to spellings ([`airlock_intent::reserved_table`]), plus names
/// that cannot even be written as an intent's table name.
pub(crate) fn check_canonical(
    spelled: &airlock_intent::TableName,
    schema: &str,
    table: &str,
) -> Result<(), ApplyError> {
    let canonical = format!("{schema}.{table}");
    let why = match airlock_intent::TableName::parse(&canonical) {
        Ok(name) => airlock_intent::reserved_table(&name),
        Err(_) => Some("its canonical name is not one an intent can write"),
    };
    match why {
        None => Ok(()),
        Some(why) => Err(ApplyError::permanent(format!(
            "table {spelled} resolves to {canonical}, which is reserved: {why}; intents \
             may not write it"
        ))
        .with_code(codes::SYSTEM_TABLE)),
    }
}

/// Applies `chain` one intent per transaction with [`Target::apply`], in order,
/// stopping after the first error: the default [`Target::apply_chain`], and what a
/// target falls back to when its chain transaction was rolled back as a whole.
pub async fn apply_each<T: Target + ?Sized>(
    target: &T,
    chain: &[(Intent, ApplyMeta)],
) -> Vec<Result<Applied, ApplyError>> {
    let mut results = Vec::with_capacity(chain.len());
    for (intent, meta) in chain {
        let result = target.apply(intent, meta).await;
        let failed = result.is_err();
        results.push(result);
        if failed {
            break;
        }
    }
    results
}

/// The answer for a chain whose transaction did not commit, or may not have (`why`
/// says what happened): the `already` results that lead it stay (they were in the
/// ledger before this transaction began, so they are certain), and every other
/// intent run in the transaction becomes a transient error, to be retried. Never
/// `applied` for writes that might not be committed; never a permanent failure
/// decided against writes that might not be committed.
pub(crate) fn uncommitted(
    results: Vec<Result<Applied, ApplyError>>,
    why: &ApplyError,
) -> Vec<Result<Applied, ApplyError>> {
    let mut leading = true;
    results
        .into_iter()
        .map(|result| match result {
            Ok(applied) if leading && applied.already => Ok(applied),
            Ok(_) => {
                leading = false;
                let mut error = why.clone().context(
                    "the chain's transaction did not commit for certain (a retry finds this \
                     intent in the ledger if it did)",
                );
                error.kind = ErrorKind::Transient;
                error.op = None;
                error.op_label = None;
                Err(error)
            }
            Err(mut error) => {
                leading = false;
                if error.kind == ErrorKind::Permanent {
                    // Decided against writes that are not committed: may differ later.
                    error = error.context(&format!(
                        "the chain's transaction did not commit ({why}); this error may not \
                         hold once the intents before it are applied"
                    ));
                    error.kind = ErrorKind::Transient;
                }
                Err(error)
            }
        })
        .collect()
}

/// Refuses an intent that names another target than `name`.
pub(crate) fn check_target(name: &str, intent: &Intent) -> Result<(), ApplyError> {
    if intent.target.as_str() == name {
        return Ok(());
    }
    Err(ApplyError::permanent(format!(
        "intent {:?} is for target {:?}, not {name:?}",
        intent.id.as_str(),
        intent.target.as_str()
    ))
    .with_code(codes::WRONG_TARGET))
}

/// What [`Target::undo`] did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UndoReport {
    /// Whether the transaction committed (false: nothing changed).
    pub committed: bool,
    /// Intents reverted now (in the order given), when committed.
    pub undone: Vec<String>,
    /// Intents the ledger already marked undone: nothing was done for them.
    pub already: Vec<String>,
    /// Rows that no longer held their after-image.
    pub conflicts: Vec<UndoConflict>,
}

/// A row that changed since the intent that wrote it: undo would lose that change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UndoConflict {
    /// The intent whose image it is.
    pub intent_id: String,
    /// Index of the op in the intent's `ops`, from 0.
    pub op: usize,
    /// The table as the intent named it.
    pub table: String,
    /// The row's key.
    pub key: Image,
    /// The after-image recorded at apply (`None`: the op deleted the row).
    pub expected: Option<Image>,
    /// The row as it is now (`None`: there is no row at the key).
    pub found: Option<Image>,
}

impl fmt::Display for UndoConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = |image: &Option<Image>| match image {
            Some(image) => show(image),
            None => "no row".to_owned(),
        };
        write!(
            f,
            "intent {} op {}: table {} key {}: expected {}, found {}",
            self.intent_id,
            self.op,
            self.table,
            show(&self.key),
            shown(&self.expected),
            shown(&self.found)
        )
    }
}

/// What the caller knows about an intent that is not in the intent itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyMeta {
    /// Digest of the intent's exact bytes, `"sha256:<hex>"`; stored in the ledger so a
    /// second intent reusing an id with different bytes is refused.
    pub digest: String,
    /// Most rows one update or delete may touch; more fails the whole intent.
    pub max_rows: u64,
    /// For an intent approved by reviewers: the [`Preview::digest`] they approved.
    /// The apply fails with [`codes::ROWS_CHANGED`] (writing nothing) unless the
    /// rows it touches still hash to it. `None`: no review binds the rows (the
    /// policy allowed the intent, or this is a preview or a replay).
    pub reviewed: Option<String>,
    /// Only for a replay ([`crate::replay`]): the values the database generated
    /// when the intent was first applied, which the replay writes again so that
    /// its target ends up with the very rows the log records, whatever its
    /// sequences and defaults would give now. `None` for every other apply: an
    /// agent's intent writes the columns it names and no others, and never
    /// overrides an identity column.
    pub replay: Option<Generated>,
}

impl ApplyMeta {
    /// Metadata for an intent with this digest and the default row limit.
    pub fn new(digest: impl Into<String>) -> Self {
        Self {
            digest: digest.into(),
            max_rows: DEFAULT_MAX_ROWS,
            reviewed: None,
            replay: None,
        }
    }
}

/// What a replay writes besides an intent's own values ([`ApplyMeta::replay`]).
///
/// For each op that inserted a row when the intent was first applied (an insert,
/// or an upsert whose undo image has no before-image), the recorded after-image
/// of that row without the columns the op names: the values the database
/// generated (serial and identity keys, defaults such as timestamps). A replayed
/// insert writes them as if the op had named them, except into columns the
/// target cannot take: columns it does not have, and columns it computes itself
/// (PostgreSQL `GENERATED ALWAYS AS (...) STORED`, SQLite generated columns),
/// which compute the same value again. A PostgreSQL identity column `GENERATED
/// ALWAYS` takes the value with `OVERRIDING SYSTEM VALUE`, unless the op itself
/// names such a column (then the database refuses it, as it refuses the agent).
/// An upsert that meets a conflicting row in the replay target updates only the
/// columns the op names, as it always does. After writing generated values into
/// a PostgreSQL column fed by a sequence (`serial`, identity), the apply
/// advances that sequence to at least the largest value written, so the next
/// ordinary insert does not collide; SQLite's rowid (and `AUTOINCREMENT`'s
/// `sqlite_sequence`) follows explicit values by itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Generated {
    /// Op index → the generated values of the row it inserted.
    ops: BTreeMap<usize, Image>,
}

impl Generated {
    /// The generated values of the rows `intent`'s ops inserted, from the undo
    /// images its first apply recorded (`images`, as the run log's `applied`
    /// record holds them). Images of other ops, of rows that existed before
    /// (`before` is set), and of rows gone after the op are ignored.
    pub fn recorded(intent: &Intent, images: &[UndoImage]) -> Self {
        let mut ops = BTreeMap::new();
        for image in images {
            let (None, Some(after)) = (&image.before, &image.after) else {
                continue;
            };
            let named = match intent.ops.get(image.op) {
                Some(op @ (Op::Insert { .. } | Op::Upsert { .. })) => op.columns_written(),
                _ => continue,
            };
            let generated: Image = after
                .iter()
                .filter(|(column, _)| !named.contains(&column.as_str()))
                .map(|(column, value)| (column.clone(), value.clone()))
                .collect();
            if !generated.is_empty() {
                ops.insert(image.op, generated);
            }
        }
        Self { ops }
    }

    /// The generated values op `index` writes besides its own, if any.
    pub fn op(&self, index: usize) -> Option<&Image> {
        self.ops.get(&index)
    }

    /// Whether no op has generated values to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// The digest of the rows an intent's ops touch, as they are before it runs: one
/// entry per undo image, in write order, with its op, table and before-image (`null`
/// for a row the op inserts). After-images are left out: they also depend on what
/// the database generates (defaults, sequences), which changes from one run to the
/// next without any row changing. `sha256:<hex>` of compact JSON with sorted keys.
pub fn rows_digest(images: &[UndoImage]) -> String {
    let rows: Vec<serde_json::Value> = images
        .iter()
        .map(|image| {
            serde_json::json!({
                "op": image.op,
                "table": image.table,
                "before": image.before,
            })
        })
        .collect();
    canonical_digest(&serde_json::json!({ "v": 1, "rows": rows }))
}

/// The digest of a preview that failed permanently, which reviewers may approve
/// too: it is never the [`rows_digest`] of any rows, so if the intent would apply
/// later after all, it goes back to review instead of writing rows nobody saw.
pub fn failed_preview_digest(error: &ApplyError) -> String {
    canonical_digest(&serde_json::json!({
        "v": 1,
        "failed": { "op": error.op, "code": error.code },
    }))
}

fn canonical_digest(value: &serde_json::Value) -> String {
    // Serialising a JSON value cannot fail; serde_json sorts object keys here
    // (no `preserve_order`), so equal values give equal bytes.
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    crate::seal::digest(&bytes)
}

/// The outcome of a successful [`Target::apply`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// The ledger already held this intent: nothing was written now, `ledger` is the
    /// stored entry and `ops` is empty.
    pub already: bool,
    /// The intent's ledger row.
    pub ledger: LedgerEntry,
    /// Rows written by each op, in op order.
    pub ops: Vec<OpResult>,
}

/// How one apply transaction ends: the only difference between apply and preview.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// Write the ledger row and commit.
    Commit,
    /// Roll back: nothing is written, the ledger row included.
    Rollback,
}

/// What applying an intent would do, from [`Target::preview`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preview {
    /// The ledger already holds this intent: applying would write nothing.
    pub already: bool,
    /// One entry per op, in op order (empty when `already`).
    pub ops: Vec<OpPreview>,
}

/// What one op would write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpPreview {
    /// Index of the op in the intent's `ops`, from 0.
    pub index: usize,
    /// Rows it would insert, update or delete.
    pub rows: u64,
    /// The before- and after-image of every row it would touch, in write order.
    pub images: Vec<UndoImage>,
}

impl Preview {
    /// The digest of the rows this preview shows before the intent ([`rows_digest`]
    /// of every image, in write order): what an approval of it binds.
    pub fn digest(&self) -> String {
        let images: Vec<UndoImage> = self
            .ops
            .iter()
            .flat_map(|op| op.images.iter().cloned())
            .collect();
        rows_digest(&images)
    }

    /// The preview of a rolled-back apply: its undo images grouped by op.
    pub(crate) fn from_applied(applied: Applied) -> Self {
        let mut images = applied.ledger.undo.into_iter().peekable();
        let ops = applied
            .ops
            .into_iter()
            .map(|op| {
                let mut mine = Vec::new();
                while let Some(image) = images.next_if(|i| i.op == op.index) {
                    mine.push(image);
                }
                OpPreview {
                    index: op.index,
                    rows: op.rows,
                    images: mine,
                }
            })
            .collect();
        Self {
            already: applied.already,
            ops,
        }
    }
}

/// How many rows one op wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpResult {
    /// Index of the op in the intent's `ops`, from 0.
    pub index: usize,
    /// Rows inserted, updated or deleted (an upsert that did nothing counts 0).
    pub rows: u64,
}

/// One row of the target's ledger: an applied intent and how to undo it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub intent_id: String,
    pub run: String,
    /// `"sha256:<hex>"` of the intent's bytes, as given in [`ApplyMeta::digest`].
    pub digest: String,
    /// When the intent was applied (taken just before the commit), in milliseconds
    /// since the Unix epoch.
    pub applied_at_ms: i64,
    /// One image per row touched, in the order the rows were written. Undo applies
    /// them in reverse.
    pub undo: Vec<UndoImage>,
}

/// The state of one row before and after one op.
///
/// Values are JSON. SQLite: integers and reals are numbers, text is a string, NULL
/// is null, and a BLOB is the object `{"$blob": "<lowercase hex>"}` (objects never
/// appear otherwise in SQLite images, so undo can turn it back into a BLOB).
/// PostgreSQL: the row's `row_to_json` (bytea as a `"\x…"` string), which the
/// target's own value conversion reads back into the same row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UndoImage {
    /// Index of the op in the intent's `ops`, from 0.
    pub op: usize,
    /// The table as the intent named it.
    pub table: String,
    /// Primary-key columns → values identifying the row as the op left it (for a
    /// delete, as it was). A table without a primary key is keyed by `rowid`
    /// (SQLite) or `ctid` (PostgreSQL).
    pub key: Image,
    /// The row before the op; `None` for an inserted row.
    pub before: Option<Image>,
    /// The row after the op; `None` for a deleted row.
    pub after: Option<Image>,
}

/// Whether retrying the same intent later may succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Busy or locked database, I/O trouble, connection loss: retry with backoff.
    Transient,
    /// The intent cannot apply as written: constraint violation, unknown table or
    /// column, failed `expect`, a key that matched nothing. Retrying will not help.
    Permanent,
}

/// Codes for the errors Airlock itself detects (database errors carry the
/// database's own code: an SQLite extended result code name or a SQLSTATE).
pub mod codes {
    /// The intent names a table the target does not have.
    pub const UNKNOWN_TABLE: &str = "AIRLOCK_UNKNOWN_TABLE";
    /// The intent names a column its table does not have.
    pub const UNKNOWN_COLUMN: &str = "AIRLOCK_UNKNOWN_COLUMN";
    /// The op writes a table Airlock keeps for itself (its ledger).
    pub const RESERVED_TABLE: &str = "AIRLOCK_RESERVED_TABLE";
    /// The op names a view or virtual table; Airlock writes plain tables only.
    pub const NOT_A_TABLE: &str = "AIRLOCK_NOT_A_TABLE";
    /// The op is malformed for this target (empty key or set, `on` not in values).
    pub const BAD_OP: &str = "AIRLOCK_BAD_OP";
    /// A value cannot be represented in the target (e.g. an integer beyond i64).
    pub const BAD_VALUE: &str = "AIRLOCK_BAD_VALUE";
    /// An update or delete key matched no row.
    pub const NO_ROW: &str = "AIRLOCK_NO_ROW";
    /// The key matched, but the `expect` values did not hold.
    pub const EXPECT_FAILED: &str = "AIRLOCK_EXPECT_FAILED";
    /// The rows the intent touches are not those its reviewers approved: it goes
    /// back to review.
    pub const ROWS_CHANGED: &str = "AIRLOCK_ROWS_CHANGED";
    /// An update or delete matched more rows than `max_rows` allows.
    pub const TOO_MANY_ROWS: &str = "AIRLOCK_TOO_MANY_ROWS";
    /// A written row could not be found again to record its after-image.
    pub const NO_ROW_IDENTITY: &str = "AIRLOCK_NO_ROW_IDENTITY";
    /// The ledger holds this intent id with a different digest.
    pub const DIGEST_MISMATCH: &str = "AIRLOCK_DIGEST_MISMATCH";
    /// The ledger table is unreadable or from a newer Airlock.
    pub const LEDGER: &str = "AIRLOCK_LEDGER";
    /// The intent names another target than the one asked to apply it.
    pub const WRONG_TARGET: &str = "AIRLOCK_WRONG_TARGET";
    /// The target URL is not one Airlock supports.
    pub const UNSUPPORTED_URL: &str = "AIRLOCK_UNSUPPORTED_URL";
    /// The SQLite database file does not exist, and the command opening it
    /// creates none ([`open_existing`](super::open_existing)).
    pub const NO_DATABASE: &str = "AIRLOCK_NO_DATABASE";
    /// The op's table resolves into a system catalog (`pg_catalog`, `pg_toast`,
    /// `information_schema`, `sqlite_*`) or Airlock's own tables.
    pub const SYSTEM_TABLE: &str = "AIRLOCK_SYSTEM_TABLE";
    /// The database role has powers beyond applying (superuser, `CREATEROLE`, ...)
    /// and `[apply] allow_privileged_role` is not set.
    pub const PRIVILEGED_ROLE: &str = "AIRLOCK_PRIVILEGED_ROLE";
}

/// Why an intent could not be applied. Nothing of it was written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.render())]
pub struct ApplyError {
    /// Whether a retry may succeed.
    pub kind: ErrorKind,
    /// The failing op's index in `ops` (from 0), when one op is to blame.
    pub op: Option<usize>,
    /// The failing op's kind and table, e.g. `update orders`.
    pub op_label: Option<String>,
    /// The database's code (SQLite extended result code name, or SQLSTATE), or one
    /// of [`codes`] for problems Airlock detected itself.
    pub code: Option<String>,
    /// What went wrong, for the agent: the op, the columns and the code, and only
    /// values the agent wrote itself.
    pub message: String,
    /// More for humans only (run log, review API, daemon log), never for the agent:
    /// values read from the database, PostgreSQL's `DETAIL`, `HINT` and `WHERE`.
    /// (Boxed: errors travel in `Result`s and must stay small.)
    pub detail: Option<Box<str>>,
}

impl ApplyError {
    /// A retry may succeed.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }

    /// A retry will not help.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permanent, message)
    }

    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            op: None,
            op_label: None,
            code: None,
            message: message.into(),
            detail: None,
        }
    }

    /// Adds text for humans only (see [`ApplyError::detail`]).
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into().into_boxed_str());
        self
    }

    /// Sets the error code.
    #[must_use]
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Blames op `index` of the intent, unless an op is blamed already.
    #[must_use]
    pub fn at_op(mut self, index: usize, op: &Op) -> Self {
        if self.op.is_none() {
            self.op = Some(index);
            self.op_label = Some(format!("{} {}", op.kind().as_str(), op.table()));
        }
        self
    }

    /// Prefixes the message with where the error happened.
    #[must_use]
    pub(crate) fn context(mut self, context: &str) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// Whether retrying may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    fn render(&self) -> String {
        match (self.op, &self.op_label) {
            (Some(op), Some(label)) => format!("op {op} ({label}): {}", self.message),
            (Some(op), None) => format!("op {op}: {}", self.message),
            (None, _) => self.message.clone(),
        }
    }
}

/// Opens the target called `name` at `url`.
///
/// Supported:
/// - `sqlite://<path>`, where the path is relative (`sqlite://target.db`,
///   `sqlite://./.airlock/target.db`) or absolute (`sqlite:///abs/path.db`). The file
///   and its parent directory are created if missing ([`open_existing`] creates
///   nothing). Opening does blocking I/O; call
///   it at start-up (or inside `spawn_blocking`).
/// - `postgres://…` or `postgresql://…` (libpq's URL form, plus `pool_size=N`; see
///   [`PostgresTarget::open`]). Nothing is connected yet, so a database that is down
///   does not stop start-up: its connection errors are transient apply errors. Needs
///   a tokio runtime when applying, not when opening. Only with the `postgres`
///   feature (a default one); without it such a URL is a permanent error saying so.
///
/// Errors never repeat the URL itself, which for server databases holds credentials.
pub fn open(name: &str, url: &str) -> Result<Arc<dyn Target>, ApplyError> {
    open_with(name, url, Create::Yes)
}

/// Opens the target called `name` at `url` as [`open`] does, but never creates a
/// database: an SQLite file that does not exist is a permanent error with code
/// [`codes::NO_DATABASE`], and nothing is created, neither the file nor its
/// directory. For the commands that work on a database that must be there already
/// (`airlock replay`, `approve`, `undo`), where a mistyped path must fail instead
/// of quietly giving an empty database. (A PostgreSQL target never creates its
/// database.)
pub fn open_existing(name: &str, url: &str) -> Result<Arc<dyn Target>, ApplyError> {
    open_with(name, url, Create::No)
}

/// Whether opening an SQLite target may create its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Create {
    Yes,
    No,
}

fn open_with(name: &str, url: &str, create: Create) -> Result<Arc<dyn Target>, ApplyError> {
    #[cfg(feature = "postgres")]
    const SUPPORTED: &str = "supported: sqlite://<path>, postgres://user@host/db";
    #[cfg(not(feature = "postgres"))]
    const SUPPORTED: &str = "supported by this build (no `postgres` feature): sqlite://<path>";
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(ApplyError::permanent(format!(
                "target {name:?}: sqlite:// URL has no path; write sqlite://<path>, e.g. \
                 sqlite://./.airlock/target.db or sqlite:///abs/path.db"
            ))
            .with_code(codes::UNSUPPORTED_URL));
        }
        return Ok(Arc::new(match create {
            Create::Yes => SqliteTarget::open(name, path)?,
            Create::No => SqliteTarget::open_existing(name, path)?,
        }));
    }
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    let message = match scheme {
        #[cfg(feature = "postgres")]
        Some(s) if s.eq_ignore_ascii_case("postgres") || s.eq_ignore_ascii_case("postgresql") => {
            return Ok(Arc::new(PostgresTarget::open(name, url)?));
        }
        #[cfg(not(feature = "postgres"))]
        Some(s) if s.eq_ignore_ascii_case("postgres") || s.eq_ignore_ascii_case("postgresql") => {
            format!(
                "target {name:?}: this airlock was built without the `postgres` feature, so \
                 it cannot open {s}:// targets; use sqlite://<path>, or build airlock with \
                 its default features"
            )
        }
        Some(s) => format!("target {name:?}: unsupported URL scheme {s:?}; {SUPPORTED}"),
        None => {
            format!("target {name:?}: the URL has no scheme (expected <scheme>://...); {SUPPORTED}")
        }
    };
    Err(ApplyError::permanent(message).with_code(codes::UNSUPPORTED_URL))
}

/// Fails unless every name is one of `columns` (the columns of `table`), naming the
/// part of the op, the column, and the table's columns; hints at a case mismatch.
pub(crate) fn check_columns<'n>(
    columns: &[String],
    table: &airlock_intent::TableName,
    part: &str,
    names: impl IntoIterator<Item = &'n str>,
) -> Result<(), ApplyError> {
    for name in names {
        if columns.iter().any(|c| c == name) {
            continue;
        }
        let hint = columns
            .iter()
            .find(|c| c.eq_ignore_ascii_case(name))
            .map(|c| format!(" (did you mean {c:?}? column names are case-sensitive)"))
            .unwrap_or_default();
        return Err(ApplyError::permanent(format!(
            "{part} names column {name:?}, which table {table} does not have{hint}; its \
             columns are {}",
            show(&columns)
        ))
        .with_code(codes::UNKNOWN_COLUMN));
    }
    Ok(())
}

/// Renders JSON for an error message, cut short so hostile values cannot flood logs.
pub(crate) fn show(value: &impl Serialize) -> String {
    const LIMIT: usize = 200;
    let text = serde_json::to_string(value).unwrap_or_else(|_| "<unprintable>".to_owned());
    if text.len() <= LIMIT {
        return text;
    }
    let mut end = LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_display_names_op_and_table() {
        let op: Op = serde_json::from_value(serde_json::json!({
            "op": "update", "table": "orders", "key": {"id": 7}, "set": {"status": "paid"}
        }))
        .unwrap();
        let err = ApplyError::permanent(r#"key {"id":7} matched no row"#)
            .with_code(codes::NO_ROW)
            .at_op(2, &op);
        assert_eq!(
            err.to_string(),
            r#"op 2 (update orders): key {"id":7} matched no row"#
        );
        // A second at_op does not re-blame.
        assert_eq!(err.clone().at_op(5, &op).op, Some(2));
    }

    #[test]
    fn show_truncates_long_values_on_char_boundaries() {
        let long = "é".repeat(500);
        let shown = show(&long);
        assert!(shown.len() < 220, "{}", shown.len());
        assert!(shown.ends_with('…'));
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn open_takes_postgres_urls_without_echoing_them() {
        // PostgreSQL opens lazily: nothing listens at db, and nothing is connected.
        let target = open("main", "postgres://user:secret@db/x").unwrap();
        assert_eq!(target.name(), "main");
        assert!(!format!("{target:?}").contains("secret"));
        let err = open("main", "postgres://user:secret@db/x?pool_size=none").unwrap_err();
        assert!(err.message.contains("pool_size"), "{err}");
        assert!(!err.message.contains("secret"), "{err}");
        assert_eq!(err.code.as_deref(), Some(codes::UNSUPPORTED_URL));
    }

    #[cfg(not(feature = "postgres"))]
    #[test]
    fn open_names_the_missing_postgres_feature_without_echoing_the_url() {
        for url in [
            "postgres://user:secret@db/x",
            "PostgreSQL://user:secret@db/x",
        ] {
            let err = open("main", url).unwrap_err();
            assert!(err.message.contains("`postgres` feature"), "{err}");
            assert!(err.message.contains("\"main\""), "{err}");
            assert!(!err.message.contains("secret"), "{err}");
            assert_eq!(err.kind, ErrorKind::Permanent);
            assert_eq!(err.code.as_deref(), Some(codes::UNSUPPORTED_URL));
        }
        let err = open("main", "mysql://h/db").unwrap_err();
        assert!(!err.message.contains("postgres://"), "{err}");
    }

    #[test]
    fn open_refuses_other_schemes_without_echoing_the_url() {
        let err = open("main", "mysql://h/db").unwrap_err();
        assert!(err.message.contains("\"mysql\""), "{err}");
        assert!(err.message.contains("sqlite://"), "{err}");
        let err = open("main", "target.db").unwrap_err();
        assert!(err.message.contains("no scheme"), "{err}");
        let err = open("main", "sqlite://").unwrap_err();
        assert!(err.message.contains("no path"), "{err}");
        assert_eq!(err.kind, ErrorKind::Permanent);
    }
}
