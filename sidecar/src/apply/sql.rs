//! SQL text for applying ops: pure string building, no database driver.
//!
//! Every identifier is double-quoted (a `"` inside is doubled), so even a name the
//! schema would have refused cannot escape its quotes. Every value is a bound
//! parameter, never spliced into the text.
//!
//! Two families of statements live here:
//! - The generic builders ([`insert`], [`update`], ...) bind one parameter per value;
//!   the parameter type `P` is the driver's own value type, and this module only
//!   needs to know whether a value is NULL, because a NULL in a key or `expect` must
//!   compare null-safely to match a NULL column. The SQLite target uses them.
//! - [`pg`] builds PostgreSQL statements that bind each *part* of an op (`values`,
//!   `key`, `set`, `expect`) as one JSON parameter and let the server convert it to
//!   the table's row type with `json_populate_record`, so every value reaches its
//!   column with the column's own type (see the module's docs for why).
//!
//! The ledger's statements, the one place where both targets run the same SQL with
//! small differences, are methods of [`Dialect`].

use std::fmt::Write as _;

use airlock_intent::TableName;

/// The SQL dialect of a target database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// SQLite 3.35 or newer (for `ON CONFLICT ... DO UPDATE` and `pragma_table_list`).
    Sqlite,
    /// PostgreSQL 12 or newer (`to_regclass(text)`, `INSERT ... AS` with `ON
    /// CONFLICT`, `json_populate_record` into array and composite columns,
    /// `pg_attribute.attgenerated`); tested on 15.
    Postgres,
}

/// Name of the ledger table in an SQLite target.
pub const LEDGER_TABLE: &str = "airlock_ledger";
/// Name of the table recording the version of Airlock's tables in an SQLite target.
pub const SCHEMA_TABLE: &str = "airlock_schema";
/// The schema holding Airlock's own tables in a PostgreSQL target. Intents may not
/// write it.
pub const PG_SCHEMA: &str = "airlock";
/// Creates Airlock's schema in a PostgreSQL target. Migrations skip it when the
/// schema exists, because PostgreSQL checks `CREATE` on the database even for `IF NOT
/// EXISTS`: a least-privilege role can then own a schema an administrator created
/// for it (see `docs/postgres-role.md`).
pub const PG_CREATE_SCHEMA: &str = "CREATE SCHEMA IF NOT EXISTS airlock";
/// The ledger table in a PostgreSQL target.
pub const PG_LEDGER_TABLE: &str = "airlock.ledger";
/// The table recording the version of Airlock's tables in a PostgreSQL target.
pub const PG_VERSION_TABLE: &str = "airlock.schema_version";
/// Opens the savepoint one intent of a chain runs under (both dialects). Chains
/// release it after each intent, so the name is never nested.
pub const SAVEPOINT: &str = "SAVEPOINT airlock_intent";

/// Keeps the writes of the intent run under [`SAVEPOINT`] in the transaction.
pub const RELEASE_SAVEPOINT: &str = "RELEASE SAVEPOINT airlock_intent";

/// Undoes the writes (ledger row included) of the intent run under [`SAVEPOINT`],
/// keeping those before it, and releases the savepoint.
pub const ROLLBACK_TO_SAVEPOINT: &str =
    "ROLLBACK TO SAVEPOINT airlock_intent; RELEASE SAVEPOINT airlock_intent";

/// Version of the ledger table this code reads and writes. Bump it, and add a
/// migration, whenever the ledger's columns change.
pub const LEDGER_VERSION: i64 = 2;

impl Dialect {
    /// The placeholder of the `n`th parameter, counting from 1.
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Self::Sqlite => format!("?{n}"),
            Self::Postgres => format!("${n}"),
        }
    }

    /// The operator that compares equal when both sides are NULL.
    fn null_safe_eq(self) -> &'static str {
        match self {
            Self::Sqlite => "IS",
            Self::Postgres => "IS NOT DISTINCT FROM",
        }
    }

    /// The ledger table, as SQL text (already safe to splice).
    pub fn ledger_table(self) -> &'static str {
        match self {
            Self::Sqlite => LEDGER_TABLE,
            Self::Postgres => PG_LEDGER_TABLE,
        }
    }

    /// The table recording the version of Airlock's tables, as SQL text.
    pub fn version_table(self) -> &'static str {
        match self {
            Self::Sqlite => SCHEMA_TABLE,
            Self::Postgres => PG_VERSION_TABLE,
        }
    }

    /// Statements creating the ledger and the version table in a database that has
    /// neither, and recording [`LEDGER_VERSION`]. (Both targets migrate step by
    /// step instead: [`Dialect::version_ddl`], then [`Dialect::migrations`] past the
    /// recorded version, then [`Dialect::set_ledger_version`]; on a fresh database
    /// the result is the same.)
    pub fn ledger_ddl(self) -> Vec<String> {
        let mut statements = self.version_ddl();
        statements.extend(self.migrations().into_iter().flat_map(|(_, step)| step));
        statements.push(format!(
            "INSERT INTO {} (component, version) VALUES ('ledger', {LEDGER_VERSION}) \
             ON CONFLICT (component) DO NOTHING",
            self.version_table()
        ));
        statements
    }

    /// Statements creating Airlock's schema (PostgreSQL) and its version table if
    /// missing.
    pub fn version_ddl(self) -> Vec<String> {
        let int64 = self.int64();
        let mut statements = Vec::new();
        if self == Self::Postgres {
            statements.push(PG_CREATE_SCHEMA.to_owned());
        }
        statements.push(format!(
            "CREATE TABLE IF NOT EXISTS {} (\
             component TEXT PRIMARY KEY, version {int64} NOT NULL)",
            self.version_table()
        ));
        statements
    }

    /// The ledger's migrations: (version, statements), in version order. Applying
    /// every step whose version is above the recorded one brings a ledger to
    /// [`LEDGER_VERSION`].
    pub fn migrations(self) -> Vec<(i64, Vec<String>)> {
        let undo = match self {
            Self::Sqlite => "TEXT",
            Self::Postgres => "JSONB",
        };
        vec![
            (
                1,
                // `undo` holds the JSON array of undo images.
                vec![format!(
                    "CREATE TABLE IF NOT EXISTS {} (\
                     intent_id TEXT PRIMARY KEY, \
                     run TEXT NOT NULL, \
                     digest TEXT NOT NULL, \
                     applied_at_ms {} NOT NULL, \
                     undo {undo} NOT NULL)",
                    self.ledger_table(),
                    self.int64()
                )],
            ),
            (
                2,
                // When the intent was undone (ms since the epoch); NULL while applied.
                vec![format!(
                    "ALTER TABLE {} ADD COLUMN undone_at_ms {}",
                    self.ledger_table(),
                    self.int64()
                )],
            ),
        ]
    }

    /// Reads when intent parameter 1 was undone: one row (NULL while applied), or
    /// none when the ledger does not hold the intent.
    pub fn ledger_undone_at(self) -> String {
        format!(
            "SELECT undone_at_ms FROM {} WHERE intent_id = {}",
            self.ledger_table(),
            self.placeholder(1)
        )
    }

    /// Marks intent parameter 1 undone at parameter 2 (ms since the epoch).
    pub fn ledger_mark_undone(self) -> String {
        format!(
            "UPDATE {} SET undone_at_ms = {} WHERE intent_id = {}",
            self.ledger_table(),
            self.placeholder(2),
            self.placeholder(1)
        )
    }

    /// Records the ledger version (parameter 1), replacing any recorded before.
    pub fn set_ledger_version(self) -> String {
        format!(
            "INSERT INTO {} (component, version) VALUES ('ledger', {}) \
             ON CONFLICT (component) DO UPDATE SET version = excluded.version",
            self.version_table(),
            self.placeholder(1)
        )
    }

    fn int64(self) -> &'static str {
        match self {
            Self::Sqlite => "INTEGER",
            Self::Postgres => "BIGINT",
        }
    }

    /// Reads the recorded ledger version (one row, one integer column).
    pub fn ledger_version(self) -> String {
        format!(
            "SELECT version FROM {} WHERE component = 'ledger'",
            self.version_table()
        )
    }

    /// Reads one ledger row by intent id (parameter 1): intent_id, run, digest,
    /// applied_at_ms, undo (as text).
    pub fn ledger_select(self) -> String {
        let undo = match self {
            Self::Sqlite => "undo",
            Self::Postgres => "undo::text",
        };
        format!(
            "SELECT intent_id, run, digest, applied_at_ms, {undo} FROM {} \
             WHERE intent_id = {}",
            self.ledger_table(),
            self.placeholder(1)
        )
    }

    /// Inserts one ledger row; parameters 1–5: intent_id, run, digest,
    /// applied_at_ms, undo (JSON text).
    pub fn ledger_insert(self) -> String {
        let undo = match self {
            Self::Sqlite => self.placeholder(5),
            // Bound as text (the driver's string type), converted by the server.
            Self::Postgres => format!("{}::text::jsonb", self.placeholder(5)),
        };
        format!(
            "INSERT INTO {} (intent_id, run, digest, applied_at_ms, undo) \
             VALUES ({}, {}, {}, {}, {undo})",
            self.ledger_table(),
            self.placeholder(1),
            self.placeholder(2),
            self.placeholder(3),
            self.placeholder(4),
        )
    }
}

/// Whether a table name is one Airlock keeps for itself in the target; intents may
/// not write these (a forged ledger row would break exactly-once).
pub fn is_reserved_table(table: &TableName) -> bool {
    let name = table.name();
    name.eq_ignore_ascii_case(LEDGER_TABLE) || name.eq_ignore_ascii_case(SCHEMA_TABLE)
}

/// Whether a schema is the one Airlock keeps for itself in a PostgreSQL target
/// (compared without regard to case, to refuse look-alikes too).
pub fn is_reserved_schema(schema: &str) -> bool {
    schema.eq_ignore_ascii_case(PG_SCHEMA)
}

/// What the SQL builder needs to know about a parameter value.
pub trait Arg {
    /// Whether the value is SQL NULL.
    fn is_null(&self) -> bool;
}

impl Arg for &serde_json::Value {
    fn is_null(&self) -> bool {
        serde_json::Value::is_null(self)
    }
}

impl Arg for serde_json::Value {
    fn is_null(&self) -> bool {
        serde_json::Value::is_null(self)
    }
}

/// SQL text and its parameters, in placeholder order.
#[derive(Clone, Debug, PartialEq)]
pub struct Statement<P> {
    pub sql: String,
    pub params: Vec<P>,
}

/// Quotes an identifier: `a"b` becomes `"a""b"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a table name, schema-qualified as `"schema"."name"` when it has a schema.
pub fn quote_table(table: &TableName) -> String {
    match table.schema() {
        Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(table.name())),
        None => quote_ident(table.name()),
    }
}

/// Accumulates SQL text and parameters, numbering placeholders as they are pushed.
struct Builder<P> {
    dialect: Dialect,
    sql: String,
    params: Vec<P>,
}

impl<P: Arg> Builder<P> {
    fn new(dialect: Dialect, sql: String) -> Self {
        Self {
            dialect,
            sql,
            params: Vec::new(),
        }
    }

    fn param(&mut self, value: P) {
        self.params.push(value);
        let placeholder = self.dialect.placeholder(self.params.len());
        self.sql.push_str(&placeholder);
    }

    /// ` WHERE "a" = ?1 AND "b" IS ?2`; nothing for an empty filter.
    fn filter<'c>(&mut self, filter: impl IntoIterator<Item = (&'c str, P)>) {
        for (i, (column, value)) in filter.into_iter().enumerate() {
            self.sql.push_str(if i == 0 { " WHERE " } else { " AND " });
            let op = if value.is_null() {
                self.dialect.null_safe_eq()
            } else {
                "="
            };
            let _ = write!(self.sql, "{} {op} ", quote_ident(column));
            self.param(value);
        }
    }

    /// `("a","b") VALUES (?1,?2)`, or ` DEFAULT VALUES` for no columns.
    fn columns_values<'c>(&mut self, values: impl IntoIterator<Item = (&'c str, P)>) {
        let (columns, values): (Vec<_>, Vec<_>) = values.into_iter().unzip();
        if columns.is_empty() {
            self.sql.push_str(" DEFAULT VALUES");
            return;
        }
        let quoted: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
        let _ = write!(self.sql, " ({}) VALUES (", quoted.join(","));
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.sql.push(',');
            }
            self.param(value);
        }
        self.sql.push(')');
    }

    fn finish(self) -> Statement<P> {
        Statement {
            sql: self.sql,
            params: self.params,
        }
    }
}

/// `INSERT INTO t ("a","b") VALUES (?1,?2)` (or `DEFAULT VALUES` with no values).
pub fn insert<'c, P: Arg>(
    dialect: Dialect,
    table: &TableName,
    values: impl IntoIterator<Item = (&'c str, P)>,
) -> Statement<P> {
    let mut b = Builder::new(dialect, format!("INSERT INTO {}", quote_table(table)));
    b.columns_values(values);
    b.finish()
}

/// `INSERT ... ON CONFLICT ("on") DO UPDATE SET "c"=excluded."c"` for every
/// column of `values` not in `on` nor in `insert_only` (values written only into
/// a new row: a replay's generated ones), or `DO NOTHING` when there is none.
pub fn upsert<'c, P: Arg>(
    dialect: Dialect,
    table: &TableName,
    values: impl IntoIterator<Item = (&'c str, P)>,
    on: &[&str],
    insert_only: &[&str],
) -> Statement<P> {
    let values: Vec<(&str, P)> = values.into_iter().collect();
    let updated: Vec<String> = values
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| !on.contains(c) && !insert_only.contains(c))
        .map(|c| format!("{0}=excluded.{0}", quote_ident(c)))
        .collect();
    let mut b = Builder::new(dialect, format!("INSERT INTO {}", quote_table(table)));
    b.columns_values(values);
    let on: Vec<String> = on.iter().map(|c| quote_ident(c)).collect();
    let _ = write!(b.sql, " ON CONFLICT ({})", on.join(","));
    if updated.is_empty() {
        b.sql.push_str(" DO NOTHING");
    } else {
        let _ = write!(b.sql, " DO UPDATE SET {}", updated.join(","));
    }
    b.finish()
}

/// `UPDATE t SET "a"=?1 WHERE "k"=?2 AND "e" IS ?3`.
pub fn update<'c, P: Arg>(
    dialect: Dialect,
    table: &TableName,
    set: impl IntoIterator<Item = (&'c str, P)>,
    filter: impl IntoIterator<Item = (&'c str, P)>,
) -> Statement<P> {
    let mut b = Builder::new(dialect, format!("UPDATE {} SET ", quote_table(table)));
    for (i, (column, value)) in set.into_iter().enumerate() {
        if i > 0 {
            b.sql.push(',');
        }
        let _ = write!(b.sql, "{}=", quote_ident(column));
        b.param(value);
    }
    b.filter(filter);
    b.finish()
}

/// `DELETE FROM t WHERE "k"=?1 AND "e" IS ?2`.
pub fn delete<'c, P: Arg>(
    dialect: Dialect,
    table: &TableName,
    filter: impl IntoIterator<Item = (&'c str, P)>,
) -> Statement<P> {
    let mut b = Builder::new(dialect, format!("DELETE FROM {}", quote_table(table)));
    b.filter(filter);
    b.finish()
}

/// `SELECT "a","b" FROM t WHERE ... LIMIT n`: reads before- and after-images.
pub fn select<'c, P: Arg>(
    dialect: Dialect,
    table: &TableName,
    columns: &[&str],
    filter: impl IntoIterator<Item = (&'c str, P)>,
    limit: Option<u64>,
) -> Statement<P> {
    let quoted: Vec<String> = columns.iter().map(|c| quote_ident(c)).collect();
    let mut b = Builder::new(
        dialect,
        format!("SELECT {} FROM {}", quoted.join(","), quote_table(table)),
    );
    b.filter(filter);
    if let Some(limit) = limit {
        // A number Airlock chose, not a value from the intent; both dialects take
        // a signed 64-bit limit.
        let _ = write!(b.sql, " LIMIT {}", limit.min(i64::MAX as u64));
    }
    b.finish()
}

/// PostgreSQL statements that bind each part of an op as one JSON parameter.
///
/// **Why `json_populate_record`.** A part (`values`, `key`, `set`, `expect`) is sent
/// as one text parameter holding its JSON object, and the statement converts it with
/// `json_populate_record(NULL::<table>, $n::text::json)` into a record of the
/// table's own row type. PostgreSQL then converts each JSON value with the column's
/// input function and type modifier, exactly as it would a literal: integers,
/// numeric, floating point, boolean, text, uuid, dates and timestamps, enums,
/// domains, bytea (from its text form, e.g. `"\\x0102"`), json/jsonb (any JSON
/// value, kept as is) and arrays (from JSON arrays, nested for more dimensions).
/// Nothing in Airlock second-guesses a type, the catalog type is never spliced into
/// SQL, and one parameter per part keeps statements few and short. Images are read
/// back with `row_to_json`, the inverse mapping, so an image fed back as `values`
/// restores the same row (what undo and replay need). The alternative, binding every
/// value as text with a cast to `format_type(...)`, needs Airlock to render JSON
/// arrays as PostgreSQL array literals and splices type names into SQL.
///
/// Statements alias the table `r`; key, expect, set and values records are `k`,
/// `e`, `s` and `v`. Every statement that returns rows returns [`pg::ROW`]'s columns:
/// the row as JSON text, its `tableoid` and its `ctid` (text), so a row read under
/// `FOR UPDATE` can be written again by its physical address.
pub mod pg {
    use std::fmt::Write as _;

    use airlock_intent::TableName;

    use super::{PG_SCHEMA, quote_ident, quote_table};

    /// What every row-returning statement returns: the row as JSON text, the
    /// `tableoid` (int8) and the `ctid` (text) of the row.
    pub const ROW: &str = "row_to_json(r.*)::text, r.tableoid::int8, r.ctid::text";

    /// One table's catalog entry, by the quoted name in parameter 1 (resolved like
    /// an SQL reference, through `search_path` when unqualified): schema, relkind,
    /// column names and their types (`format_type`) in column order, the
    /// primary-key columns in key order, the table's name as stored, and, in
    /// column order, each column's `attidentity` (`a`: `GENERATED ALWAYS AS
    /// IDENTITY`, `d`: `BY DEFAULT`, empty otherwise) and `attgenerated` (`s` for a
    /// stored generated column, empty otherwise). No row when there is no such
    /// relation.
    pub const TABLE_INFO: &str = "\
        SELECT n.nspname::text, c.relkind::text, \
          array(SELECT a.attname::text FROM pg_attribute a \
                WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                ORDER BY a.attnum), \
          array(SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
                WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                ORDER BY a.attnum), \
          array(SELECT a.attname::text \
                FROM pg_index i \
                CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
                WHERE i.indrelid = c.oid AND i.indisprimary ORDER BY k.ord), \
          c.relname::text, \
          array(SELECT a.attidentity::text FROM pg_attribute a \
                WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                ORDER BY a.attnum), \
          array(SELECT a.attgenerated::text FROM pg_attribute a \
                WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                ORDER BY a.attnum) \
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
        WHERE c.oid = to_regclass($1)";

    /// After a replay wrote recorded values into a column (parameter 2, its name
    /// as stored) of a table (parameter 1, the quoted canonical `"schema"."name"`),
    /// the largest of them being parameter 3 (a bigint, as text): advances the
    /// sequence that feeds the column (`serial`, identity) so that the next value
    /// it hands out is past parameter 3, and leaves it alone when it would
    /// already (a sequence is never moved back). No row, and nothing done, for a
    /// column no sequence feeds or a descending sequence. Needs `UPDATE` on the
    /// sequence. Like every sequence change, it is not undone if the transaction
    /// rolls back; a sequence further on is harmless.
    pub const ADVANCE_SEQUENCE: &str = "\
        SELECT setval(s.seq, $3::text::bigint, true) \
        FROM (SELECT pg_get_serial_sequence($1, $2)::regclass AS seq) AS s \
        JOIN pg_sequence AS q ON q.seqrelid = s.seq \
        WHERE q.seqincrement > 0 \
          AND $3::text::numeric >= \
              coalesce(pg_sequence_last_value(s.seq)::numeric + q.seqincrement, q.seqstart)";

    /// Arbitrary but fixed first key of Airlock's advisory locks ("airl" in ASCII);
    /// the two-key form keeps them apart from an application's one-key locks.
    pub const LOCK_CLASS: i32 = 0x6169_726c;

    /// Serialises applies of one intent id (parameter 1) until the transaction ends,
    /// so a second apply of the same intent waits and then finds the first one's
    /// ledger row instead of racing it.
    pub const LOCK_INTENT: &str = "SELECT pg_advisory_xact_lock(1634300524, hashtext($1))";

    /// The powers beyond applying that the current role holds, directly or through
    /// a role it is a member of (and so may `SET ROLE` to): one row per such role,
    /// with its name and whether it is superuser, may create roles, may create
    /// databases, bypasses row-level security, may replicate.
    pub const ROLE_PRIVILEGES: &str = "\
        SELECT r.rolname::text, r.rolname = current_user, r.rolsuper, r.rolcreaterole, \
          r.rolcreatedb, r.rolbypassrls, r.rolreplication \
        FROM pg_roles r \
        WHERE pg_has_role(current_user, r.oid, 'MEMBER') \
          AND (r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolbypassrls \
               OR r.rolreplication) \
        ORDER BY r.rolname = current_user DESC, r.rolname";

    /// The server's version and the role Airlock connects as (two texts), for
    /// `airlock run --check`.
    pub const SERVER: &str = "SELECT current_setting('server_version'), current_user::text";

    /// Serialises ledger migrations across every Airlock using the database.
    pub const LOCK_MIGRATION: &str = "SELECT pg_advisory_xact_lock(1634300524, 0)";

    /// Whether Airlock's version table exists yet (one boolean).
    pub fn version_table_exists() -> String {
        format!("SELECT to_regclass('{PG_SCHEMA}.schema_version') IS NOT NULL")
    }

    /// How a column takes part in a comparison with a record's column.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Compare<'a> {
        /// The column.
        pub column: &'a str,
        /// The JSON value is null: compare with `IS NULL`.
        pub null: bool,
        /// The column is of type `json`, which has no equality operator: compare
        /// as `jsonb`.
        pub json: bool,
    }

    fn record(table: &TableName, param: usize) -> String {
        format!(
            "json_populate_record(NULL::{}, ${param}::text::json)",
            quote_table(table)
        )
    }

    /// `r."c" = k."c"` (indexable), `r."c" IS NULL`, or the jsonb comparison.
    fn equal(sql: &mut String, c: &Compare<'_>, alias: &str) {
        let column = quote_ident(c.column);
        if c.null {
            let _ = write!(sql, "r.{column} IS NULL");
        } else if c.json {
            let _ = write!(sql, "r.{column}::jsonb = {alias}.{column}::jsonb");
        } else {
            let _ = write!(sql, "r.{column} = {alias}.{column}");
        }
    }

    /// `FROM t AS r, json_populate_record(..$1) AS k[, ..$2 AS e] WHERE ...`.
    fn from_where(table: &TableName, key: &[Compare<'_>], expect: &[Compare<'_>]) -> String {
        let mut sql = format!(
            " FROM {} AS r, {} AS k",
            quote_table(table),
            record(table, 1)
        );
        if !expect.is_empty() {
            let _ = write!(sql, ", {} AS e", record(table, 2));
        }
        let filter = key
            .iter()
            .map(|c| (c, "k"))
            .chain(expect.iter().map(|c| (c, "e")));
        for (i, (c, alias)) in filter.enumerate() {
            sql.push_str(if i == 0 { " WHERE " } else { " AND " });
            equal(&mut sql, c, alias);
        }
        sql
    }

    /// Reads (and, with `lock`, locks `FOR UPDATE`) at most `limit` rows matching
    /// the key record (parameter 1) and, when `expect` is not empty, the expect
    /// record (parameter 2). Returns [`ROW`].
    pub fn select_rows(
        table: &TableName,
        key: &[Compare<'_>],
        expect: &[Compare<'_>],
        limit: u64,
        lock: bool,
    ) -> String {
        let mut sql = format!("SELECT {ROW}{}", from_where(table, key, expect));
        // A number Airlock chose, not a value from the intent.
        let _ = write!(sql, " LIMIT {}", limit.min(i64::MAX as u64));
        if lock {
            sql.push_str(" FOR UPDATE OF r");
        }
        sql
    }

    /// Reads and locks `FOR UPDATE` the row at `ctid` (parameter 1, text), for a
    /// table without a primary key. Returns [`ROW`].
    pub fn select_by_ctid(table: &TableName) -> String {
        format!(
            "SELECT {ROW} FROM {} AS r WHERE r.ctid = $1::text::tid FOR UPDATE OF r",
            quote_table(table)
        )
    }

    /// For a row matching the key record (parameter 1): the row as JSON text, then
    /// for each `expect` column whether it holds (null-safe) against the expect
    /// record (parameter 2). Explains a failed `expect`.
    pub fn expect_holds(table: &TableName, key: &[Compare<'_>], expect: &[Compare<'_>]) -> String {
        let mut sql = String::from("SELECT row_to_json(r.*)::text");
        for c in expect {
            let column = quote_ident(c.column);
            if c.json {
                let _ = write!(
                    sql,
                    ", r.{column}::jsonb IS NOT DISTINCT FROM e.{column}::jsonb"
                );
            } else {
                let _ = write!(sql, ", r.{column} IS NOT DISTINCT FROM e.{column}");
            }
        }
        let mut from = format!(
            " FROM {} AS r, {} AS k, {} AS e",
            quote_table(table),
            record(table, 1),
            record(table, 2)
        );
        for (i, c) in key.iter().enumerate() {
            from.push_str(if i == 0 { " WHERE " } else { " AND " });
            equal(&mut from, c, "k");
        }
        sql.push_str(&from);
        sql.push_str(" LIMIT 1");
        sql
    }

    fn column_list(columns: &[&str], prefix: &str) -> String {
        columns
            .iter()
            .map(|c| format!("{prefix}{}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether an insert may write values into `GENERATED ALWAYS` identity
    /// columns: only values the database itself generated earlier, which a replay
    /// ([`Generated`](crate::apply::Generated)) or an undo putting a deleted row
    /// back writes again; an agent's values never.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Identity {
        /// The database refuses a value for such a column, as it refuses the agent.
        Refused,
        /// `OVERRIDING SYSTEM VALUE`.
        Override,
    }

    /// `INSERT INTO t AS r ("a","b") SELECT v."a",v."b" FROM <values record $1>`,
    /// or `DEFAULT VALUES` for no columns. Returns [`ROW`].
    pub fn insert(table: &TableName, columns: &[&str], identity: Identity) -> String {
        let mut sql = format!("INSERT INTO {} AS r", quote_table(table));
        insert_values(&mut sql, table, columns, identity);
        let _ = write!(sql, " RETURNING {ROW}");
        sql
    }

    fn insert_values(sql: &mut String, table: &TableName, columns: &[&str], identity: Identity) {
        if columns.is_empty() {
            sql.push_str(" DEFAULT VALUES");
        } else {
            let _ = write!(sql, " ({})", column_list(columns, ""));
            if identity == Identity::Override {
                sql.push_str(" OVERRIDING SYSTEM VALUE");
            }
            let _ = write!(
                sql,
                " SELECT {} FROM {} AS v",
                column_list(columns, "v."),
                record(table, 1)
            );
        }
    }

    /// The insert with `ON CONFLICT (on) DO UPDATE SET` every other column but
    /// those in `insert_only` (values written only into a new row: a replay's
    /// generated ones), or `DO NOTHING` when there is none. Returns [`ROW`] and
    /// whether the row was inserted (not updated): `xmax` is 0 only on a freshly
    /// inserted row version.
    pub fn upsert(
        table: &TableName,
        columns: &[&str],
        on: &[&str],
        insert_only: &[&str],
        identity: Identity,
    ) -> String {
        let mut sql = format!("INSERT INTO {} AS r", quote_table(table));
        insert_values(&mut sql, table, columns, identity);
        let _ = write!(sql, " ON CONFLICT ({})", column_list(on, ""));
        let updated: Vec<String> = columns
            .iter()
            .filter(|c| !on.contains(c) && !insert_only.contains(c))
            .map(|c| format!("{0}=excluded.{0}", quote_ident(c)))
            .collect();
        if updated.is_empty() {
            sql.push_str(" DO NOTHING");
        } else {
            let _ = write!(sql, " DO UPDATE SET {}", updated.join(","));
        }
        let _ = write!(sql, " RETURNING {ROW}, r.xmax::text = '0'");
        sql
    }

    /// Sets `columns` from the set record (parameter 1) on the one row at
    /// `tableoid` (parameter 2, text) and `ctid` (parameter 3, text). Returns [`ROW`].
    pub fn update_row(table: &TableName, columns: &[&str]) -> String {
        let set: Vec<String> = columns
            .iter()
            .map(|c| format!("{0}=s.{0}", quote_ident(c)))
            .collect();
        format!(
            "UPDATE {} AS r SET {} FROM {} AS s \
             WHERE r.tableoid = $2::text::oid AND r.ctid = $3::text::tid RETURNING {ROW}",
            quote_table(table),
            set.join(","),
            record(table, 1)
        )
    }

    /// Deletes the one row at `tableoid` (parameter 1) and `ctid` (parameter 2).
    /// Returns [`ROW`].
    pub fn delete_row(table: &TableName) -> String {
        format!(
            "DELETE FROM {} AS r WHERE r.tableoid = $1::text::oid AND r.ctid = $2::text::tid \
             RETURNING {ROW}",
            quote_table(table)
        )
    }

    /// Converts one column of a record (parameter 1) to its type, to find which
    /// value a failed statement could not convert.
    pub fn convert(table: &TableName, column: &str) -> String {
        format!(
            "SELECT v.{} IS NULL FROM {} AS v",
            quote_ident(column),
            record(table, 1)
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn table(s: &str) -> TableName {
        TableName::parse(s).unwrap()
    }

    fn pairs(v: &Value) -> Vec<(&str, &Value)> {
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect()
    }

    #[test]
    fn quoting_doubles_quotes_and_qualifies_schemas() {
        assert_eq!(quote_ident("name"), r#""name""#);
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_table(&table("orders")), r#""orders""#);
        assert_eq!(quote_table(&table("sales.orders")), r#""sales"."orders""#);
    }

    #[test]
    fn insert_binds_every_value() {
        let values = json!({"name": "Ada", "tier": null});
        let s = insert(Dialect::Sqlite, &table("customers"), pairs(&values));
        assert_eq!(
            s.sql,
            r#"INSERT INTO "customers" ("name","tier") VALUES (?1,?2)"#
        );
        assert_eq!(s.params, vec![&json!("Ada"), &Value::Null]);
        let s = insert(Dialect::Postgres, &table("s.c"), pairs(&values));
        assert_eq!(
            s.sql,
            r#"INSERT INTO "s"."c" ("name","tier") VALUES ($1,$2)"#
        );
    }

    #[test]
    fn insert_without_values_uses_defaults() {
        let s = insert(Dialect::Sqlite, &table("t"), Vec::<(&str, Value)>::new());
        assert_eq!(s.sql, r#"INSERT INTO "t" DEFAULT VALUES"#);
        assert!(s.params.is_empty());
    }

    #[test]
    fn update_numbers_set_then_filter_and_compares_null_safely() {
        // Written in sorted order so the test holds with or without `preserve_order`.
        let set = json!({"note": null, "status": "paid"});
        let filter = json!({"id": 7, "tier": null});
        let s = update(
            Dialect::Sqlite,
            &table("orders"),
            pairs(&set),
            pairs(&filter),
        );
        assert_eq!(
            s.sql,
            r#"UPDATE "orders" SET "note"=?1,"status"=?2 WHERE "id" = ?3 AND "tier" IS ?4"#
        );
        assert_eq!(
            s.params,
            vec![&Value::Null, &json!("paid"), &json!(7), &Value::Null]
        );
        let s = update(
            Dialect::Postgres,
            &table("orders"),
            pairs(&set),
            pairs(&filter),
        );
        assert_eq!(
            s.sql,
            r#"UPDATE "orders" SET "note"=$1,"status"=$2 WHERE "id" = $3 AND "tier" IS NOT DISTINCT FROM $4"#
        );
    }

    #[test]
    fn delete_filters_by_key_and_expect() {
        let s = delete(
            Dialect::Sqlite,
            &table("orders"),
            vec![("id", json!(1)), ("status", json!("open"))],
        );
        assert_eq!(
            s.sql,
            r#"DELETE FROM "orders" WHERE "id" = ?1 AND "status" = ?2"#
        );
        assert_eq!(s.params.len(), 2);
    }

    #[test]
    fn upsert_updates_non_conflict_columns() {
        let values = json!({"email": "a@x", "name": "Ada", "tier": "gold"});
        let s = upsert(
            Dialect::Sqlite,
            &table("customers"),
            pairs(&values),
            &["email"],
            &[],
        );
        assert_eq!(
            s.sql,
            r#"INSERT INTO "customers" ("email","name","tier") VALUES (?1,?2,?3) ON CONFLICT ("email") DO UPDATE SET "name"=excluded."name","tier"=excluded."tier""#
        );
        assert_eq!(s.params.len(), 3);
    }

    #[test]
    fn replayed_values_only_insert_and_only_a_replay_overrides_identity() {
        let values = json!({"email": "a@x", "id": 7, "name": "Ada"});
        let s = upsert(
            Dialect::Sqlite,
            &table("c"),
            pairs(&values),
            &["email"],
            &["id"],
        );
        assert!(
            s.sql.ends_with(r#"DO UPDATE SET "name"=excluded."name""#),
            "{}",
            s.sql
        );
        let s = pg::upsert(
            &table("c"),
            &["email", "id", "name"],
            &["email"],
            &["id"],
            pg::Identity::Override,
        );
        assert!(
            s.contains(r#"("email","id","name") OVERRIDING SYSTEM VALUE SELECT v."email""#),
            "{s}"
        );
        assert!(
            s.contains(r#"DO UPDATE SET "name"=excluded."name" RETURNING"#),
            "{s}"
        );
        let s = pg::insert(&table("c"), &["name"], pg::Identity::Refused);
        assert!(!s.contains("OVERRIDING"), "{s}");
        assert!(pg::ADVANCE_SEQUENCE.contains("pg_get_serial_sequence($1, $2)"));
    }

    #[test]
    fn upsert_with_only_conflict_columns_does_nothing() {
        let values = json!({"id": 1});
        let s = upsert(Dialect::Postgres, &table("t"), pairs(&values), &["id"], &[]);
        assert_eq!(
            s.sql,
            r#"INSERT INTO "t" ("id") VALUES ($1) ON CONFLICT ("id") DO NOTHING"#
        );
    }

    #[test]
    fn select_lists_columns_and_limits() {
        let s = select(
            Dialect::Sqlite,
            &table("main.orders"),
            &["id", "rowid"],
            vec![("id", json!(3))],
            Some(2),
        );
        assert_eq!(
            s.sql,
            r#"SELECT "id","rowid" FROM "main"."orders" WHERE "id" = ?1 LIMIT 2"#
        );
        let s = select(
            Dialect::Sqlite,
            &table("t"),
            &["a"],
            Vec::<(&str, Value)>::new(),
            None,
        );
        assert_eq!(s.sql, r#"SELECT "a" FROM "t""#);
        let s = select(
            Dialect::Sqlite,
            &table("t"),
            &["a"],
            Vec::<(&str, Value)>::new(),
            Some(u64::MAX),
        );
        assert_eq!(s.sql, r#"SELECT "a" FROM "t" LIMIT 9223372036854775807"#);
    }

    #[test]
    fn hostile_column_names_stay_inside_their_quotes() {
        // The schema forbids such names; the quoting must hold regardless.
        let evil = r#"x" = 1; DROP TABLE customers; --"#;
        let values = vec![(evil, json!("v"))];
        let s = insert(Dialect::Sqlite, &table("customers"), values.clone());
        assert_eq!(
            s.sql,
            r#"INSERT INTO "customers" ("x"" = 1; DROP TABLE customers; --") VALUES (?1)"#
        );
        let s = update(
            Dialect::Sqlite,
            &table("customers"),
            values.clone(),
            values.clone(),
        );
        assert_eq!(
            s.sql,
            r#"UPDATE "customers" SET "x"" = 1; DROP TABLE customers; --"=?1 WHERE "x"" = 1; DROP TABLE customers; --" = ?2"#
        );
        // Values never appear in the text.
        let s = insert(
            Dialect::Sqlite,
            &table("customers"),
            vec![("name", json!("x'); DROP TABLE customers; --"))],
        );
        assert!(!s.sql.contains("DROP"), "{}", s.sql);
    }

    #[test]
    fn ledger_statements_use_the_dialect() {
        assert!(Dialect::Sqlite.ledger_select().ends_with("intent_id = ?1"));
        assert!(
            Dialect::Postgres
                .ledger_insert()
                .contains("$5::text::jsonb")
        );
        assert!(
            Dialect::Postgres
                .ledger_insert()
                .contains("INSERT INTO airlock.ledger")
        );
        let ddl = Dialect::Postgres.ledger_ddl();
        assert_eq!(ddl[0], "CREATE SCHEMA IF NOT EXISTS airlock");
        assert!(
            ddl.iter().any(|s| s.contains("airlock.ledger (")),
            "{ddl:?}"
        );
        assert!(pg::LOCK_INTENT.contains(&pg::LOCK_CLASS.to_string()));
        assert!(pg::LOCK_MIGRATION.contains(&pg::LOCK_CLASS.to_string()));
        assert!(is_reserved_schema("Airlock"));
        assert!(
            Dialect::Sqlite
                .ledger_ddl()
                .iter()
                .any(|s| s.contains("CREATE TABLE IF NOT EXISTS airlock_ledger"))
        );
        assert!(is_reserved_table(&table("AIRLOCK_LEDGER")));
        assert!(is_reserved_table(&table("main.airlock_schema")));
        assert!(!is_reserved_table(&table("orders")));
    }
}
