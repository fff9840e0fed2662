//! Validation: hostile bytes in, a typed [`Intent`] or every problem found out.
//!
//! The intent directory is written by an untrusted agent, so [`Validator::validate`]
//! assumes nothing about its input and checks it in gates, cheapest first:
//!
//! 1. **Size**: more than [`Limits::max_bytes`] is rejected unread.
//! 2. **Syntax**: UTF-8 and JSON, with the line and column of the first fault.
//! 3. **Strict parse**: a duplicate key in any object is an error, because parsers
//!    disagree on which copy wins (serde_json keeps the last, others the first): an
//!    approver could be shown one value while the database receives another. Nesting
//!    deeper than [`Limits::max_depth`] is an error too, detected *while* parsing, so
//!    a hostile document 100 000 levels deep never recurses more than the limit.
//! 4. **Schema**: `intent.schema.json` (draft 2020-12), every error collected with
//!    the JSON pointer of the offending value and a message naming the field.
//! 5. **Sidecar limits**: more ops than [`Limits::max_ops`].
//! 6. **Reserved names**: an op naming a system catalog (`pg_catalog.*`,
//!    `information_schema.*`, `sqlite_*`, ...) or Airlock's own ledger is refused
//!    here, before any policy sees it (see [`reserved_table`](crate::reserved_table)).
//! 7. **Types**: deserialising into [`Intent`], which accepts exactly what the schema
//!    accepts (a failure here is a bug, reported as a problem rather than a panic).
//!
//! Problems are sorted by pointer (array indices numerically), so the output is
//! stable and the first problem is the one nearest the start of the document.

use std::cmp::Ordering;
use std::fmt;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Intent, IntentId, RunId, SCHEMA};

/// Limits applied before and during validation. The defaults suit intents written by
/// agents: far larger than a sensible intent, far smaller than what would hurt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted document, in bytes (default 1 MiB).
    pub max_bytes: usize,
    /// Deepest accepted nesting of arrays and objects (default 32). The top-level
    /// object is depth 1, so a row value inside `ops[i].values` is at depth 5. Values
    /// above 127 are capped by serde_json's own recursion limit of 128.
    pub max_depth: usize,
    /// Most ops accepted in one intent (default 100). The schema's own ceiling is
    /// 1000 (`maxItems` of `ops`); this lets a sidecar enforce less.
    pub max_ops: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            max_depth: 32,
            max_ops: 100,
        }
    }
}

/// One problem found in an intent document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// JSON pointer (RFC 6901) of the offending value; `""` is the whole document.
    /// For a missing property it is the object that lacks it; for an unknown or
    /// duplicate property, or a bad column name, it is that property.
    pub pointer: String,
    /// What is wrong, naming the field and the problem.
    pub message: String,
}

impl Problem {
    fn new(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            pointer: pointer.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pointer.is_empty() {
            write!(f, "(document): {}", self.message)
        } else {
            write!(f, "{}: {}", self.pointer, self.message)
        }
    }
}

/// Why a document is not a valid intent: every problem found (at least one).
///
/// `id` and `run` are copied from the document when it holds valid ones, so the
/// sidecar can report the outcome to the right place even though the intent as a
/// whole is rejected. They are `None` when the document is unreadable, or when the
/// value is missing, not a string, not a valid id, or given twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalid {
    /// The intent's `id`, if the document has a valid one.
    pub id: Option<String>,
    /// The intent's `run`, if the document has a valid one.
    pub run: Option<String>,
    /// Every problem found, sorted by pointer.
    pub problems: Vec<Problem>,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid intent")?;
        if let Some(id) = &self.id {
            write!(f, " {id}")?;
        }
        for (i, problem) in self.problems.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Invalid {}

/// Validates intent documents against the schema and the sidecar's [`Limits`].
///
/// Build one per sidecar and share it: the schema is compiled once, in
/// [`Validator::new`], and validation takes `&self`.
#[derive(Debug)]
pub struct Validator {
    limits: Limits,
    schema: jsonschema::Validator,
}

impl Validator {
    /// Compiles the embedded schema ([`SCHEMA`]) and keeps `limits`.
    #[expect(
        clippy::expect_used,
        reason = "SCHEMA is a compile-time constant; tests prove it parses and compiles"
    )]
    pub fn new(limits: Limits) -> Self {
        let schema: Value = serde_json::from_str(SCHEMA).expect("intent.schema.json is JSON");
        let schema = jsonschema::draft202012::options()
            .should_validate_formats(false)
            .build(&schema)
            .expect("intent.schema.json is a valid draft 2020-12 schema");
        Self { limits, schema }
    }

    /// The limits this validator enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Checks `bytes` (the exact contents of an intent file) and returns the intent,
    /// or every problem found. Never panics, whatever the input.
    pub fn validate(&self, bytes: &[u8]) -> Result<Intent, Invalid> {
        let limits = &self.limits;
        if bytes.len() > limits.max_bytes {
            return Err(invalid(
                None,
                vec![Problem::new(
                    "",
                    format!(
                        "intent is {} bytes, more than the limit of {} bytes",
                        bytes.len(),
                        limits.max_bytes
                    ),
                )],
            ));
        }
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let (line, column) = line_column(bytes, e.valid_up_to());
                return Err(invalid(
                    None,
                    vec![Problem::new(
                        "",
                        format!("not UTF-8: invalid byte at line {line} column {column}"),
                    )],
                ));
            }
        };
        let document = match parse_strict(text, limits.max_depth) {
            Ok(document) => document,
            Err(problem) => return Err(invalid(lenient_routing(text), vec![problem])),
        };

        let mut problems = Vec::new();
        if !self.schema.is_valid(&document) {
            for error in self.schema.iter_errors(&document) {
                describe(&error, &document, &mut problems);
            }
        }
        if let Some(ops) = document.get("ops").and_then(Value::as_array)
            && ops.len() > limits.max_ops
        {
            problems.push(Problem::new(
                "/ops",
                format!(
                    "ops has {} ops, more than this sidecar's maximum of {}",
                    ops.len(),
                    limits.max_ops
                ),
            ));
        }
        if problems.is_empty() {
            reserved_names(&document, &mut problems);
        }
        let routing = routing(&document);
        if !problems.is_empty() {
            return Err(invalid(Some(routing), problems));
        }
        serde_json::from_value::<Intent>(document).map_err(|e| {
            invalid(
                Some(routing),
                vec![Problem::new(
                    "",
                    format!("passes the schema but not the intent types (a bug): {e}"),
                )],
            )
        })
    }
}

/// Adds a problem for every op whose table is a system catalog or Airlock's own
/// (see [`reserved_table`](crate::reserved_table)). Runs on a document that passed
/// the schema, so every `table` is a valid table name.
fn reserved_names(document: &Value, problems: &mut Vec<Problem>) {
    let Some(ops) = document.get("ops").and_then(Value::as_array) else {
        return;
    };
    for (index, op) in ops.iter().enumerate() {
        let Some(table) = op.get("table").and_then(Value::as_str) else {
            continue;
        };
        let Ok(name) = crate::TableName::parse(table) else {
            continue;
        };
        if let Some(why) = crate::reserved_table(&name) {
            problems.push(Problem::new(
                format!("/ops/{index}/table"),
                format!(
                    "table {} is reserved: {why}; intents may not write it",
                    quoted(table)
                ),
            ));
        }
    }
}

/// Builds an [`Invalid`], putting its problems in their stable order.
fn invalid(
    routing: Option<(Option<String>, Option<String>)>,
    mut problems: Vec<Problem>,
) -> Invalid {
    problems.sort_by(|a, b| compare_pointers(&a.pointer, &b.pointer));
    problems.dedup();
    let (id, run) = routing.unwrap_or_default();
    Invalid { id, run, problems }
}

/// Orders JSON pointers segment by segment, numeric segments as numbers, so
/// `/ops/2` comes before `/ops/10`. The sort is stable: equal pointers keep the
/// order in which their problems were found.
fn compare_pointers(a: &str, b: &str) -> Ordering {
    let mut a = a.split('/');
    let mut b = b.split('/');
    loop {
        match (a.next(), b.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let order = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    (Ok(_), Err(_)) => Ordering::Less,
                    (Err(_), Ok(_)) => Ordering::Greater,
                    (Err(_), Err(_)) => x.cmp(y),
                };
                if order != Ordering::Equal {
                    return order;
                }
            }
        }
    }
}

/// 1-based line and column (in bytes) of `offset` in `bytes`.
fn line_column(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = bytes.get(..offset).unwrap_or(bytes);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |newline| newline + 1);
    (line, offset - line_start + 1)
}

// ---------------------------------------------------------------------------------
// Routing: the id and run of a document that is rejected.

/// The document's `id` and `run`, each only if it is a valid one.
fn routing(document: &Value) -> (Option<String>, Option<String>) {
    let field = |name: &str| document.get(name).and_then(Value::as_str);
    (
        field("id")
            .filter(|s| IntentId::parse(s).is_ok())
            .map(str::to_owned),
        field("run")
            .filter(|s| RunId::parse(s).is_ok())
            .map(str::to_owned),
    )
}

/// The `id` and `run` of a document the strict parse refused, read leniently. A
/// top-level `id` or `run` given twice is ambiguous and yields nothing (serde's
/// derive rejects duplicate fields); anything unparsable yields nothing.
fn lenient_routing(text: &str) -> Option<(Option<String>, Option<String>)> {
    #[derive(Deserialize)]
    struct Routing {
        id: Option<Value>,
        run: Option<Value>,
    }
    let routing: Routing = serde_json::from_str(text).ok()?;
    let valid = |value: Option<Value>, check: fn(&str) -> bool| match value {
        Some(Value::String(s)) if check(&s) => Some(s),
        _ => None,
    };
    Some((
        valid(routing.id, |s| IntentId::parse(s).is_ok()),
        valid(routing.run, |s| RunId::parse(s).is_ok()),
    ))
}

// ---------------------------------------------------------------------------------
// Strict parse: duplicate keys and depth, checked while parsing.

/// Parses `text` into a [`Value`], refusing duplicate object keys and nesting deeper
/// than `max_depth`. On failure the problem's pointer locates the fault when it is
/// one of those two; plain syntax errors are reported at the document with their
/// line and column.
fn parse_strict(text: &str, max_depth: usize) -> Result<Value, Problem> {
    let mut parse = Parse {
        max_depth,
        depth: 0,
        fault: None,
    };
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let value = StrictValue { parse: &mut parse }
        .deserialize(&mut deserializer)
        .and_then(|value| deserializer.end().map(|()| value));
    value.map_err(|error| match parse.fault.take() {
        Some(fault) => Problem::new(fault.pointer(), error.to_string()),
        None => Problem::new("", format!("not valid JSON: {error}")),
    })
}

/// State shared by the nested visitors of one strict parse.
struct Parse {
    max_depth: usize,
    /// Arrays and objects currently open.
    depth: usize,
    /// Set when the parse fails on a duplicate key or on depth.
    fault: Option<Fault>,
}

/// Where a strict-parse rule was broken. The path is built while the error unwinds
/// (innermost segment first), so a successful parse pays nothing for it.
struct Fault {
    reversed_path: Vec<String>,
}

impl Fault {
    fn pointer(&self) -> String {
        let mut pointer = String::new();
        for segment in self.reversed_path.iter().rev() {
            pointer.push('/');
            push_escaped(&mut pointer, segment);
        }
        pointer
    }
}

/// Appends `segment` escaped as RFC 6901 requires (`~` as `~0`, `/` as `~1`).
fn push_escaped(pointer: &mut String, segment: &str) {
    for c in segment.chars() {
        match c {
            '~' => pointer.push_str("~0"),
            '/' => pointer.push_str("~1"),
            c => pointer.push(c),
        }
    }
}

impl Parse {
    /// Enters an array or object, failing if that is one level too deep.
    fn enter<E: de::Error>(&mut self) -> Result<(), E> {
        self.depth += 1;
        if self.depth > self.max_depth {
            self.fault = Some(Fault {
                reversed_path: Vec::new(),
            });
            return Err(E::custom(format_args!(
                "nested deeper than the limit of {} arrays and objects",
                self.max_depth
            )));
        }
        Ok(())
    }

    /// Adds `segment` to the fault's path as an error unwinds through its parent.
    fn unwind(&mut self, segment: impl FnOnce() -> String) {
        if let Some(fault) = &mut self.fault {
            fault.reversed_path.push(segment());
        }
    }
}

/// A [`DeserializeSeed`] that builds a [`Value`] under the rules of [`Parse`].
struct StrictValue<'a> {
    parse: &'a mut Parse,
}

impl<'de> DeserializeSeed<'de> for StrictValue<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.parse.enter()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        loop {
            let item = seq.next_element_seed(StrictValue {
                parse: &mut *self.parse,
            });
            match item {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(error) => {
                    let index = items.len();
                    self.parse.unwind(|| index.to_string());
                    return Err(error);
                }
            }
        }
        self.parse.depth -= 1;
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.parse.enter()?;
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                let message = format!(
                    "duplicate key {} (parsers disagree on which copy wins, so an intent \
                     must give each key once)",
                    quoted(&key)
                );
                self.parse.fault = Some(Fault {
                    reversed_path: vec![key],
                });
                return Err(de::Error::custom(message));
            }
            match map.next_value_seed(StrictValue {
                parse: &mut *self.parse,
            }) {
                Ok(value) => {
                    object.insert(key, value);
                }
                Err(error) => {
                    self.parse.unwind(|| key);
                    return Err(error);
                }
            }
        }
        self.parse.depth -= 1;
        Ok(Value::Object(object))
    }
}

// ---------------------------------------------------------------------------------
// Schema errors, described for humans.

/// What a column name must look like (the schema's `columnName`).
const COLUMN_EXPECTED: &str =
    "a letter or underscore followed by at most 62 letters, digits or underscores";

/// The schema's patterns, each with the name of what it checks and what it expects.
const PATTERNS: &[(&str, &str, &str)] = &[
    (
        "^[A-Za-z0-9_:-][A-Za-z0-9._:-]{0,127}$",
        "an intent id",
        "1 to 128 characters from A-Z a-z 0-9 . _ : -, not starting with a dot",
    ),
    (
        "^[A-Za-z0-9._:-]{1,128}$",
        "a run id",
        "1 to 128 characters from A-Z a-z 0-9 . _ : -",
    ),
    (
        "^[A-Za-z0-9_-]{1,64}$",
        "a target name",
        "1 to 64 characters from A-Z a-z 0-9 _ -",
    ),
    (
        "^[A-Za-z_][A-Za-z0-9_]{0,62}(\\.[A-Za-z_][A-Za-z0-9_]{0,62})?$",
        "a table name",
        "name or schema.name, each part a letter or underscore followed by at most 62 \
         letters, digits or underscores",
    ),
    (
        "^[A-Za-z_][A-Za-z0-9_]{0,62}$",
        "a column name",
        COLUMN_EXPECTED,
    ),
    (
        "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        "a W3C traceparent",
        "00-<32 hex digits>-<16 hex digits>-<2 hex digits>, lowercase",
    ),
];

/// Every property some kind of op has.
const OP_PROPERTIES: &[&str] = &["op", "table", "values", "key", "set", "expect", "on"];

/// The longest rendering of an offending value in a message: hostile values can be
/// a megabyte long, and messages travel back to the agent and into logs.
const MAX_PREVIEW: usize = 80;

/// A short JSON rendering of `value` for messages.
fn preview(value: &Value) -> String {
    let text = value.to_string();
    if text.len() <= MAX_PREVIEW {
        return text;
    }
    let mut end = MAX_PREVIEW;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn quoted(s: &str) -> String {
    preview(&Value::String(s.to_owned()))
}

/// What to call the value at `pointer` in a message: the op's kind for an op
/// (`update op`), `provenance`, the field name (`table`, `on[1]`), or `intent`.
fn subject(pointer: &str, document: &Value) -> String {
    let segments: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect();
    match segments.as_slice() {
        [] => "intent".to_owned(),
        [ops, index] if ops == "ops" => {
            let kind = document
                .pointer(pointer)
                .and_then(|op| op.get("op"))
                .and_then(Value::as_str)
                .filter(|kind| ["insert", "update", "delete", "upsert"].contains(kind));
            match kind {
                Some(kind) => format!("{kind} op"),
                None => format!("op {index}"),
            }
        }
        [.., parent, index] if index.parse::<u64>().is_ok() => format!("{parent}[{index}]"),
        [.., last] => last.clone(),
    }
}

/// Appends the problem(s) that `error` stands for.
fn describe(error: &jsonschema::ValidationError<'_>, document: &Value, out: &mut Vec<Problem>) {
    let pointer = error.instance_path().as_str();
    let instance = error.instance();
    let what = subject(pointer, document);
    let message = match error.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            for property in unexpected {
                let mut at = pointer.to_owned();
                at.push('/');
                push_escaped(&mut at, property);
                let message = if what.ends_with(" op") && OP_PROPERTIES.contains(&property.as_str())
                {
                    format!(
                        "property {} is not allowed in {} {what}",
                        quoted(property),
                        article(&what)
                    )
                } else {
                    format!("unknown property {} in {what}", quoted(property))
                };
                out.push(Problem::new(at, message));
            }
            return;
        }
        ValidationErrorKind::PropertyNames { error } => {
            let name = error.instance();
            let mut at = pointer.to_owned();
            at.push('/');
            push_escaped(&mut at, name.as_str().unwrap_or_default());
            out.push(Problem::new(
                at,
                format!(
                    "{} in {what} is not a valid column name: expected {}",
                    preview(name),
                    COLUMN_EXPECTED
                ),
            ));
            return;
        }
        ValidationErrorKind::Required { property } => {
            format!("{what} is missing required property {property}")
        }
        ValidationErrorKind::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(set) => set
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            format!(
                "{what} must be {} {expected}, found {}",
                article(&expected),
                type_name(instance)
            )
        }
        ValidationErrorKind::Constant { expected_value } => {
            format!(
                "{what} must be {expected_value}, found {}",
                preview(instance)
            )
        }
        ValidationErrorKind::Enum { options } => {
            let options = match options.as_ref() {
                Value::Array(options) => options
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                other => other.to_string(),
            };
            format!(
                "{what} must be one of {options}, found {}",
                preview(instance)
            )
        }
        ValidationErrorKind::Pattern { pattern } => {
            match PATTERNS.iter().find(|(p, _, _)| p == pattern) {
                Some((_, name, expected)) => format!(
                    "{what} {} is not {name}: expected {expected}",
                    preview(instance)
                ),
                // The only other pattern is the non-blank check.
                None => format!("{what} must not be blank"),
            }
        }
        ValidationErrorKind::MinItems { limit: 1 } => format!("{what} must not be empty"),
        ValidationErrorKind::MinItems { limit } => format!(
            "{what} must have at least {limit} items, found {}",
            instance.as_array().map_or(0, Vec::len)
        ),
        ValidationErrorKind::MaxItems { limit } => format!(
            "{what} has {} items, more than the maximum of {limit}",
            instance.as_array().map_or(0, Vec::len)
        ),
        ValidationErrorKind::MinProperties { limit: 1 } => {
            format!("{what} must name at least one column")
        }
        ValidationErrorKind::MinProperties { limit } => {
            format!("{what} must name at least {limit} columns")
        }
        ValidationErrorKind::MinLength { .. } => format!("{what} must not be empty"),
        ValidationErrorKind::UniqueItems => {
            format!("{what} must not repeat a column: {}", preview(instance))
        }
        _ => format!("{what}: {error}"),
    };
    out.push(Problem::new(pointer, message));
}

fn article(noun: &str) -> &'static str {
    if noun.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_sort_numerically() {
        let mut pointers = vec!["/ops/10", "/ops/2/table", "", "/reason", "/ops/2", "/id"];
        pointers.sort_by(|a, b| compare_pointers(a, b));
        assert_eq!(
            pointers,
            ["", "/id", "/ops/2", "/ops/2/table", "/ops/10", "/reason"]
        );
    }

    #[test]
    fn line_column_counts_from_one() {
        assert_eq!(line_column(b"ab\ncd", 0), (1, 1));
        assert_eq!(line_column(b"ab\ncd", 4), (2, 2));
    }

    #[test]
    fn strict_parse_escapes_pointer_segments() {
        let problem = parse_strict(r#"{"a/b": {"~": 1, "~": 2}}"#, 8).unwrap_err();
        assert_eq!(problem.pointer, "/a~1b/~0");
        assert!(problem.message.contains("duplicate key \"~\""), "{problem}");
    }

    #[test]
    fn strict_parse_keeps_numbers_and_order_free_values() {
        let text =
            r#"{"n": -1, "u": 18446744073709551615, "f": 1.5, "s": "x", "z": null, "b": [true]}"#;
        let strict = parse_strict(text, 8).unwrap();
        let lenient: Value = serde_json::from_str(text).unwrap();
        assert_eq!(strict, lenient);
    }

    #[test]
    fn strict_parse_reports_trailing_garbage() {
        let problem = parse_strict("{} x", 8).unwrap_err();
        assert_eq!(problem.pointer, "");
        assert!(problem.message.contains("trailing characters"), "{problem}");
    }

    #[test]
    fn depth_counts_containers() {
        assert!(parse_strict("[[1]]", 2).is_ok());
        let problem = parse_strict("[[[1]]]", 2).unwrap_err();
        assert_eq!(problem.pointer, "/0/0");
        assert!(
            problem.message.contains("deeper than the limit of 2"),
            "{problem}"
        );
        assert!(parse_strict("1", 0).is_ok());
    }

    #[test]
    fn previews_are_bounded() {
        let long = Value::String("é".repeat(1000));
        assert!(preview(&long).len() <= MAX_PREVIEW + "…".len());
    }

    #[test]
    fn validator_is_shareable() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Validator>();
    }
}
