//! Rust types mirroring `intent.schema.json`.
//!
//! Deserialising into these types is the second gate after the JSON Schema: the
//! schema reports every problem with its pointer, and these types make the checked
//! shape impossible to misuse later (identifiers are parsed once into newtypes).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Values of one row: column name to JSON value, in the order the agent wrote them.
pub type Row = serde_json::Map<String, serde_json::Value>;

/// Defines a validated string newtype: `$name` accepts what `$check` accepts.
macro_rules! checked_string {
    ($(#[$doc:meta])* $name:ident, $check:path, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Parses `s`, or says why it is not a valid value.
            pub fn parse(s: &str) -> Result<Self, String> {
                if $check(s) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(format!("{:?} is not a valid {}", s, $what))
                }
            }

            /// The value as written.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// `[A-Za-z0-9._:-]{1,128}`: the alphabet of intent and run ids (safe in file names
/// once a leading dot is excluded, which [`IntentId`] does).
fn is_key(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn is_intent_id(s: &str) -> bool {
    is_key(s) && !s.starts_with('.')
}

/// `[A-Za-z_][A-Za-z0-9_]{0,62}`: a SQL identifier that needs no case folding rules
/// to be understood, and fits PostgreSQL's 63-byte limit.
pub fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && s.len() <= 63
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_table_name(s: &str) -> bool {
    match s.split_once('.') {
        Some((schema, name)) => is_identifier(schema) && is_identifier(name),
        None => is_identifier(s),
    }
}

fn is_target_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

checked_string!(
    /// The agent's idempotency key for one intent: 1–128 of `[A-Za-z0-9._:-]`, not
    /// starting with a dot. Unique per sidecar.
    IntentId, is_intent_id, "intent id"
);
checked_string!(
    /// One agent run: 1–128 of `[A-Za-z0-9._:-]`.
    RunId, is_key, "run id"
);
checked_string!(
    /// The name of a configured target database: 1–64 of `[A-Za-z0-9_-]`.
    TargetName, is_target_name, "target name"
);
checked_string!(
    /// A column name: a plain SQL identifier (see `is_identifier`).
    Column, is_identifier, "column name"
);
checked_string!(
    /// `name` or `schema.name`, each part a plain SQL identifier.
    TableName, is_table_name, "table name"
);

impl TableName {
    /// The schema part, if the name was qualified.
    pub fn schema(&self) -> Option<&str> {
        self.0.split_once('.').map(|(schema, _)| schema)
    }

    /// The unqualified table name.
    pub fn name(&self) -> &str {
        self.0
            .split_once('.')
            .map_or(self.0.as_str(), |(_, name)| name)
    }
}

/// Why `table` names a table no intent may write, whatever the database role could
/// do: a system catalog or Airlock's own bookkeeping. `None` for an ordinary name.
///
/// Compared without regard to ASCII case, so look-alikes are refused too (Airlock
/// quotes identifiers, so in PostgreSQL `"PG_CATALOG"` would be another schema, but
/// nobody needs one). Refused:
/// - schemas `pg_*` (PostgreSQL's `pg_catalog`, `pg_toast`, `pg_temp_N`,
///   `pg_toast_temp_N`, and every name PostgreSQL reserves for the system) and
///   `information_schema`;
/// - the schema `airlock` (Airlock's ledger in a PostgreSQL target);
/// - tables `sqlite_*` in any schema (SQLite's `sqlite_schema`/`sqlite_master`,
///   `sqlite_sequence`, `sqlite_stat1`, ...);
/// - tables `airlock_ledger` and `airlock_schema` (Airlock's ledger in an SQLite
///   target).
///
/// An unqualified name the target resolves into a system schema (in PostgreSQL,
/// `pg_class` is `pg_catalog.pg_class`: `pg_catalog` is implicitly searched first) is
/// refused when the sidecar resolves names against the target's catalog.
pub fn reserved_table(table: &TableName) -> Option<&'static str> {
    let starts = |s: &str, prefix: &str| {
        s.get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    };
    if let Some(schema) = table.schema() {
        if starts(schema, "pg_") {
            return Some("schema pg_* belongs to PostgreSQL's system catalogs");
        }
        if schema.eq_ignore_ascii_case("information_schema") {
            return Some("information_schema is the SQL standard's system catalog");
        }
        if schema.eq_ignore_ascii_case("airlock") {
            return Some("schema airlock holds Airlock's own ledger");
        }
    }
    let name = table.name();
    if starts(name, "sqlite_") {
        return Some("tables sqlite_* are SQLite's internal tables");
    }
    if name.eq_ignore_ascii_case("airlock_ledger") || name.eq_ignore_ascii_case("airlock_schema") {
        return Some("it holds Airlock's own ledger");
    }
    None
}

impl Default for TargetName {
    fn default() -> Self {
        Self("default".to_owned())
    }
}

/// One intent, version 1. See `intent.schema.json` for the meaning of each field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intent {
    /// Format version; always 1 for this type.
    #[serde(deserialize_with = "wire::version")]
    pub version: u32,
    pub id: IntentId,
    pub run: RunId,
    #[serde(default)]
    pub target: TargetName,
    /// 1 to `MAX_OPS` ops, applied in order in one transaction.
    #[serde(deserialize_with = "wire::ops")]
    pub ops: Vec<Op>,
    /// Why, for the approvers: at least one character that is not whitespace.
    #[serde(deserialize_with = "wire::non_blank")]
    pub reason: String,
    pub provenance: Provenance,
}

/// One write, applied in order with the others of its intent, in one transaction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Op {
    /// Insert one row.
    Insert {
        table: TableName,
        #[serde(deserialize_with = "wire::row")]
        values: Row,
    },
    /// Set columns of the row(s) matching `key`; with `expect`, only if those
    /// columns currently hold the expected values (compare-and-set).
    Update {
        table: TableName,
        #[serde(deserialize_with = "wire::row")]
        key: Row,
        #[serde(deserialize_with = "wire::row")]
        set: Row,
        #[serde(
            default,
            deserialize_with = "wire::some_row",
            skip_serializing_if = "Option::is_none"
        )]
        expect: Option<Row>,
    },
    /// Delete the row(s) matching `key`; with `expect`, only if they hold those values.
    Delete {
        table: TableName,
        #[serde(deserialize_with = "wire::row")]
        key: Row,
        #[serde(
            default,
            deserialize_with = "wire::some_row",
            skip_serializing_if = "Option::is_none"
        )]
        expect: Option<Row>,
    },
    /// Insert one row, or update it when it conflicts on the `on` columns.
    Upsert {
        table: TableName,
        #[serde(deserialize_with = "wire::row")]
        values: Row,
        /// At least one column, none repeated.
        #[serde(deserialize_with = "wire::conflict_columns")]
        on: Vec<Column>,
    },
}

/// The kind of an [`Op`], without its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    Insert,
    Update,
    Delete,
    Upsert,
}

impl OpKind {
    /// The lowercase name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Upsert => "upsert",
        }
    }
}

impl Op {
    /// The table this op writes.
    pub fn table(&self) -> &TableName {
        match self {
            Self::Insert { table, .. }
            | Self::Update { table, .. }
            | Self::Delete { table, .. }
            | Self::Upsert { table, .. } => table,
        }
    }

    /// What kind of write this is.
    pub fn kind(&self) -> OpKind {
        match self {
            Self::Insert { .. } => OpKind::Insert,
            Self::Update { .. } => OpKind::Update,
            Self::Delete { .. } => OpKind::Delete,
            Self::Upsert { .. } => OpKind::Upsert,
        }
    }

    /// The columns whose values this op writes (empty for a delete).
    pub fn columns_written(&self) -> Vec<&str> {
        match self {
            Self::Insert { values, .. } | Self::Upsert { values, .. } => {
                values.keys().map(String::as_str).collect()
            }
            Self::Update { set, .. } => set.keys().map(String::as_str).collect(),
            Self::Delete { .. } => Vec::new(),
        }
    }

    /// Every column this op names, grouped by the member that names it (`values`,
    /// `on`, `key`, `set`, `expect`), in the order of the op's schema.
    pub fn columns_named(&self) -> Vec<(&'static str, Vec<&str>)> {
        fn names(row: &Row) -> Vec<&str> {
            row.keys().map(String::as_str).collect()
        }
        fn expected(expect: &Option<Row>) -> Vec<&str> {
            expect.as_ref().map(names).unwrap_or_default()
        }
        match self {
            Self::Insert { values, .. } => vec![("values", names(values))],
            Self::Upsert { values, on, .. } => vec![
                ("values", names(values)),
                ("on", on.iter().map(Column::as_str).collect()),
            ],
            Self::Update {
                key, set, expect, ..
            } => vec![
                ("key", names(key)),
                ("set", names(set)),
                ("expect", expected(expect)),
            ],
            Self::Delete { key, expect, .. } => {
                vec![("key", names(key)), ("expect", expected(expect))]
            }
        }
    }
}

/// Where an intent came from: which agent, which model, which prompt and tool call.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The agent's name (not empty).
    #[serde(deserialize_with = "wire::non_empty")]
    pub agent: String,
    #[serde(
        default,
        deserialize_with = "wire::some",
        skip_serializing_if = "Option::is_none"
    )]
    pub model: Option<String>,
    #[serde(
        default,
        deserialize_with = "wire::some",
        skip_serializing_if = "Option::is_none"
    )]
    pub model_parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(
        default,
        deserialize_with = "wire::some",
        skip_serializing_if = "Option::is_none"
    )]
    pub prompt_digest: Option<String>,
    #[serde(
        default,
        deserialize_with = "wire::some",
        skip_serializing_if = "Option::is_none"
    )]
    pub tool_call_id: Option<String>,
    /// A W3C Trace Context `traceparent`, to join the agent's trace.
    #[serde(
        default,
        deserialize_with = "wire::traceparent",
        skip_serializing_if = "Option::is_none"
    )]
    pub traceparent: Option<String>,
}

impl Provenance {
    /// The W3C trace id (32 lowercase hex digits) of [`Provenance::traceparent`], when
    /// W3C Trace Context calls it valid: not version `ff`, and neither the trace id
    /// nor the parent id all zeros. The shape itself is checked when the intent is
    /// read. Spans of Airlock's work on the intent belong to this trace.
    pub fn trace_id(&self) -> Option<&str> {
        let traceparent = self.traceparent.as_deref()?;
        let mut parts = traceparent.split('-');
        let (version, trace, parent) = (parts.next()?, parts.next()?, parts.next()?);
        let zero = |s: &str| s.bytes().all(|b| b == b'0');
        (is_traceparent(traceparent) && version != "ff" && !zero(trace) && !zero(parent))
            .then_some(trace)
    }
}

/// The most ops one intent may carry on the wire. A sidecar may enforce a lower
/// maximum (see `Limits::max_ops`); this is the ceiling the schema publishes.
pub const MAX_OPS: usize = 1000;

/// Whether `s` has a character that is not whitespace. `char::is_whitespace` is the
/// Unicode `White_Space` property, which is exactly the class the schema's `nonBlank`
/// pattern excludes.
pub(crate) fn is_non_blank(s: &str) -> bool {
    s.chars().any(|c| !c.is_whitespace())
}

/// `00-<32 hex>-<16 hex>-<2 hex>`, lowercase: the shape of a W3C `traceparent`.
pub(crate) fn is_traceparent(s: &str) -> bool {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b[r].iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    b.len() == 55
        && b[2] == b'-'
        && b[35] == b'-'
        && b[52] == b'-'
        && hex(0..2)
        && hex(3..35)
        && hex(36..52)
        && hex(53..55)
}

/// Field checks that make deserialisation accept exactly what `intent.schema.json`
/// accepts, so that a document read without the [`Validator`](crate::Validator)
/// (a stored payload, a test) still obeys the published contract. In particular an
/// explicit `null` is rejected where the schema wants a value, rather than read as
/// "absent".
mod wire {
    use serde::de::{Deserialize, Deserializer, Error};

    use super::{Column, MAX_OPS, Op, Row, is_identifier, is_non_blank, is_traceparent};

    /// The format version: the number 1 (JSON Schema's `const` also accepts `1.0`).
    pub(super) fn version<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let n = serde_json::Number::deserialize(d)?;
        if n.as_u64() == Some(1) || n.as_f64() == Some(1.0) {
            Ok(1)
        } else {
            Err(D::Error::custom(format!(
                "unsupported intent version {n}, expected 1"
            )))
        }
    }

    pub(super) fn ops<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Op>, D::Error> {
        let ops = Vec::<Op>::deserialize(d)?;
        match ops.len() {
            0 => Err(D::Error::custom("ops must contain at least one op")),
            n if n > MAX_OPS => Err(D::Error::custom(format!(
                "ops has {n} ops, more than the maximum of {MAX_OPS}"
            ))),
            _ => Ok(ops),
        }
    }

    pub(super) fn non_blank<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let s = String::deserialize(d)?;
        if is_non_blank(&s) {
            Ok(s)
        } else {
            Err(D::Error::custom("must not be blank"))
        }
    }

    pub(super) fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            Err(D::Error::custom("must not be empty"))
        } else {
            Ok(s)
        }
    }

    pub(super) fn row<'de, D: Deserializer<'de>>(d: D) -> Result<Row, D::Error> {
        let row = Row::deserialize(d)?;
        if row.is_empty() {
            return Err(D::Error::custom("a row must name at least one column"));
        }
        if let Some(bad) = row.keys().find(|k| !is_identifier(k)) {
            return Err(D::Error::custom(format!(
                "{bad:?} is not a valid column name"
            )));
        }
        Ok(row)
    }

    pub(super) fn some_row<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Row>, D::Error> {
        row(d).map(Some)
    }

    /// A present optional field must hold a value: `null` is not "absent".
    pub(super) fn some<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        T::deserialize(d).map(Some)
    }

    pub(super) fn traceparent<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        let s = String::deserialize(d)?;
        if is_traceparent(&s) {
            Ok(Some(s))
        } else {
            Err(D::Error::custom(format!("{s:?} is not a W3C traceparent")))
        }
    }

    pub(super) fn conflict_columns<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<Column>, D::Error> {
        let on = Vec::<Column>::deserialize(d)?;
        if on.is_empty() {
            return Err(D::Error::custom("on must name at least one column"));
        }
        for (i, c) in on.iter().enumerate() {
            if on[..i].contains(c) {
                return Err(D::Error::custom(format!("on repeats column {c}")));
            }
        }
        Ok(on)
    }
}
