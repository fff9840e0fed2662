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
    /// A column name: a plain SQL identifier (see [`is_identifier`]).
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
        self.0.split_once('.').map_or(self.0.as_str(), |(_, name)| name)
    }
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
    pub version: u32,
    pub id: IntentId,
    pub run: RunId,
    #[serde(default)]
    pub target: TargetName,
    pub ops: Vec<Op>,
    pub reason: String,
    pub provenance: Provenance,
}

/// One write, applied in order with the others of its intent, in one transaction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Op {
    /// Insert one row.
    Insert { table: TableName, values: Row },
    /// Set columns of the row(s) matching `key`; with `expect`, only if those
    /// columns currently hold the expected values (compare-and-set).
    Update {
        table: TableName,
        key: Row,
        set: Row,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect: Option<Row>,
    },
    /// Delete the row(s) matching `key`; with `expect`, only if they hold those values.
    Delete {
        table: TableName,
        key: Row,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect: Option<Row>,
    },
    /// Insert one row, or update it when it conflicts on the `on` columns.
    Upsert {
        table: TableName,
        values: Row,
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
}

/// Where an intent came from: which agent, which model, which prompt and tool call.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The agent's name.
    pub agent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_parameters: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A W3C Trace Context `traceparent`, to join the agent's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}
