//! SQL text for applying ops: pure string building, no database driver.
//!
//! Every identifier is double-quoted (a `"` inside is doubled), so even a name the
//! schema would have refused cannot escape its quotes. Every value is a bound
//! parameter, never spliced into the text. The parameter type `P` is the driver's
//! own value type; this module only needs to know whether a value is NULL, because
//! a NULL in a key or `expect` must compare null-safely to match a NULL column.
//!
//! All differences between the SQL of the supported databases are methods of
//! [`Dialect`].

use std::fmt::Write as _;

use airlock_intent::TableName;

/// The SQL dialect of a target database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// SQLite 3.35 or newer (for `ON CONFLICT ... DO UPDATE` and `pragma_table_list`).
    Sqlite,
    /// PostgreSQL 9.5 or newer.
    Postgres,
}

/// Name of the ledger table in every target.
pub const LEDGER_TABLE: &str = "airlock_ledger";
/// Name of the table recording the version of Airlock's tables in the target.
pub const SCHEMA_TABLE: &str = "airlock_schema";
/// Version of the ledger table this code reads and writes. Bump it, and add a
/// migration, whenever the ledger's columns change.
pub const LEDGER_VERSION: i64 = 1;

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

    /// Statements creating the ledger and the version table if missing, and
    /// recording [`LEDGER_VERSION`] if no version is recorded yet. Run them in one
    /// transaction, then check [`Dialect::ledger_version`].
    pub fn ledger_ddl(self) -> Vec<String> {
        let (int64, undo) = match self {
            Self::Sqlite => ("INTEGER", "TEXT"),
            Self::Postgres => ("BIGINT", "JSONB"),
        };
        vec![
            // Schema version 1. `undo` holds the JSON array of undo images.
            format!(
                "CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (\
                 intent_id TEXT PRIMARY KEY, \
                 run TEXT NOT NULL, \
                 digest TEXT NOT NULL, \
                 applied_at_ms {int64} NOT NULL, \
                 undo {undo} NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} (\
                 component TEXT PRIMARY KEY, version {int64} NOT NULL)"
            ),
            format!(
                "INSERT INTO {SCHEMA_TABLE} (component, version) VALUES ('ledger', {LEDGER_VERSION}) \
                 ON CONFLICT (component) DO NOTHING"
            ),
        ]
    }

    /// Reads the recorded ledger version (one row, one integer column).
    pub fn ledger_version(self) -> String {
        format!("SELECT version FROM {SCHEMA_TABLE} WHERE component = 'ledger'")
    }

    /// Reads one ledger row by intent id (parameter 1): intent_id, run, digest,
    /// applied_at_ms, undo (as text).
    pub fn ledger_select(self) -> String {
        let undo = match self {
            Self::Sqlite => "undo",
            Self::Postgres => "undo::text",
        };
        format!(
            "SELECT intent_id, run, digest, applied_at_ms, {undo} FROM {LEDGER_TABLE} \
             WHERE intent_id = {}",
            self.placeholder(1)
        )
    }

    /// Inserts one ledger row; parameters 1–5: intent_id, run, digest,
    /// applied_at_ms, undo (JSON text).
    pub fn ledger_insert(self) -> String {
        let undo = match self {
            Self::Sqlite => self.placeholder(5),
            Self::Postgres => format!("{}::jsonb", self.placeholder(5)),
        };
        format!(
            "INSERT INTO {LEDGER_TABLE} (intent_id, run, digest, applied_at_ms, undo) \
             VALUES ({}, {}, {}, {}, {undo})",
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
/// column of `values` not in `on`, or `DO NOTHING` when there is none.
pub fn upsert<'c, P: Arg>(
    dialect: Dialect,
    table: &TableName,
    values: impl IntoIterator<Item = (&'c str, P)>,
    on: &[&str],
) -> Statement<P> {
    let values: Vec<(&str, P)> = values.into_iter().collect();
    let updated: Vec<String> = values
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| !on.contains(c))
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
        );
        assert_eq!(
            s.sql,
            r#"INSERT INTO "customers" ("email","name","tier") VALUES (?1,?2,?3) ON CONFLICT ("email") DO UPDATE SET "name"=excluded."name","tier"=excluded."tier""#
        );
        assert_eq!(s.params.len(), 3);
    }

    #[test]
    fn upsert_with_only_conflict_columns_does_nothing() {
        let values = json!({"id": 1});
        let s = upsert(Dialect::Postgres, &table("t"), pairs(&values), &["id"]);
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
        assert!(Dialect::Postgres.ledger_insert().contains("$5::jsonb"));
        assert!(
            Dialect::Sqlite.ledger_ddl()[0].contains("CREATE TABLE IF NOT EXISTS airlock_ledger")
        );
        assert!(is_reserved_table(&table("AIRLOCK_LEDGER")));
        assert!(is_reserved_table(&table("main.airlock_schema")));
        assert!(!is_reserved_table(&table("orders")));
    }
}
