//! What both targets share besides [`sql`](super::sql): the rules and errors of
//! applying an intent that do not depend on the database. The ledger hit (an id
//! already applied answers `already`, or is refused with another digest), the new
//! ledger entry with its review check, the ledger's stored form of undo images,
//! the recording of one op's images, the checks an op must pass before it runs,
//! the errors an update or delete reports, and the comparison that finds undo
//! conflicts. No driver and no I/O (the clock aside, for `applied_at_ms`): each
//! target module calls these with what it read inside its own transaction, so both
//! answer the same words for the same problem.

use crate::clock::now_ms;

use airlock_intent::{Column, Intent, Row, TableName};
use serde_json::Value;

use super::{
    Applied, ApplyError, ApplyMeta, Image, LedgerEntry, UndoConflict, UndoImage, UndoReport,
    check_columns, codes, rows_digest, show,
};

/// Whether the row found now still holds the after-image of `image`. Columns the
/// after-image does not name (added to the table since) are not compared.
fn holds_after(image: &UndoImage, found: Option<&Image>) -> bool {
    match (&image.after, found) {
        (None, None) => true,
        (Some(after), Some(found)) => after.iter().all(|(c, v)| found.get(c) == Some(v)),
        _ => false,
    }
}

/// Parses the table name of an undo image.
pub(crate) fn image_table(image: &UndoImage) -> Result<TableName, ApplyError> {
    TableName::parse(&image.table).map_err(|e| {
        ApplyError::permanent(format!("undo image of op {}: {e}", image.op))
            .with_code(codes::LEDGER)
    })
}

impl UndoReport {
    /// Notes a conflict when the row `found` at `image`'s key (`None`: no row) no
    /// longer holds the after-image intent `intent_id` left there.
    pub(crate) fn compare(&mut self, intent_id: &str, image: &UndoImage, found: Option<&Image>) {
        if holds_after(image, found) {
            return;
        }
        self.conflicts.push(UndoConflict {
            intent_id: intent_id.to_owned(),
            op: image.op,
            table: image.table.clone(),
            key: image.key.clone(),
            expected: image.after.clone(),
            found: found.cloned(),
        });
    }

    /// Whether the undo transaction may commit once every image is reverted: not
    /// with conflicts unless `force` (then nothing counts as undone).
    pub(crate) fn may_commit(&mut self, force: bool) -> bool {
        if !self.conflicts.is_empty() && !force {
            self.undone.clear();
            return false;
        }
        true
    }
}

/// Prefixes an error met while undoing `image` of intent `intent_id` with where.
pub(crate) fn undoing<'a>(
    intent_id: &'a str,
    image: &'a UndoImage,
    table: &'a TableName,
) -> impl Fn(ApplyError) -> ApplyError + 'a {
    move |e| {
        e.context(&format!(
            "undoing intent {intent_id:?} op {} on {table} key {}",
            image.op,
            show(&image.key)
        ))
    }
}

/// The refusal to undo an intent this target's ledger does not hold.
pub(crate) fn not_in_ledger(intent_id: &str) -> ApplyError {
    ApplyError::permanent(format!(
        "intent {intent_id:?} is not in this target's ledger: it was not applied here"
    ))
    .with_code(codes::LEDGER)
}

/// Fails with [`codes::ROWS_CHANGED`] when `meta` binds reviewed rows and the
/// before-images just captured (`undo`) are not those rows. Called inside the
/// transaction, before the ledger row: the error rolls everything back.
fn check_reviewed(meta: &ApplyMeta, undo: &[UndoImage]) -> Result<(), ApplyError> {
    let Some(reviewed) = &meta.reviewed else {
        return Ok(());
    };
    let found = rows_digest(undo);
    if &found == reviewed {
        return Ok(());
    }
    Err(ApplyError::permanent(
        "rows changed since review: the rows this intent touches are not the rows its \
         reviewers saw in the preview they approved; nothing was written, and it needs \
         a new review",
    )
    .with_code(codes::ROWS_CHANGED)
    .with_detail(format!(
        "approved preview {reviewed}, rows now hash to {found}"
    )))
}

/// The answer for `intent_id` when the ledger already holds `entry` for it (read
/// inside the apply's transaction): [`Applied::already`], writing nothing, or a
/// refusal when the stored digest is not `meta`'s (same id, different bytes).
pub(crate) fn ledger_hit(
    intent_id: &str,
    entry: LedgerEntry,
    meta: &ApplyMeta,
) -> Result<Applied, ApplyError> {
    if entry.digest != meta.digest {
        return Err(ApplyError::permanent(format!(
            "intent {intent_id:?} was already applied with digest {}, and this one has \
             digest {}: same id, different bytes",
            entry.digest, meta.digest
        ))
        .with_code(codes::DIGEST_MISMATCH));
    }
    Ok(Applied {
        already: true,
        ledger: entry,
        ops: Vec::new(),
    })
}

/// The ledger row of `intent` once its ops ran and recorded `undo`, stamped now.
/// Fails with [`codes::ROWS_CHANGED`] when reviewers approved other rows
/// ([`ApplyMeta::reviewed`]): called inside the transaction, before the ledger row
/// is written, so the error rolls everything back.
pub(crate) fn new_entry(
    intent: &Intent,
    meta: &ApplyMeta,
    undo: Vec<UndoImage>,
) -> Result<LedgerEntry, ApplyError> {
    let entry = LedgerEntry {
        intent_id: intent.id.as_str().to_owned(),
        run: intent.run.as_str().to_owned(),
        digest: meta.digest.clone(),
        applied_at_ms: now_ms(),
        undo,
    };
    check_reviewed(meta, &entry.undo)?;
    Ok(entry)
}

impl LedgerEntry {
    /// A ledger row as both targets store it: the undo images are JSON text.
    pub(crate) fn from_stored(
        intent_id: String,
        run: String,
        digest: String,
        applied_at_ms: i64,
        undo: &str,
    ) -> Result<Self, ApplyError> {
        let undo = serde_json::from_str(undo).map_err(|e| {
            ApplyError::permanent(format!(
                "the ledger row of intent {intent_id:?} has unreadable undo images: {e}"
            ))
            .with_code(codes::LEDGER)
        })?;
        Ok(Self {
            intent_id,
            run,
            digest,
            applied_at_ms,
            undo,
        })
    }

    /// The undo images as the ledger stores them (JSON text).
    pub(crate) fn stored_undo(&self) -> Result<String, ApplyError> {
        serde_json::to_string(&self.undo).map_err(|e| {
            ApplyError::permanent(format!("cannot encode undo images: {e}"))
                .with_code(codes::LEDGER)
        })
    }
}

/// The undo images one op records as it writes rows, into its intent's list.
pub(crate) struct OpImages<'a> {
    op: usize,
    undo: &'a mut Vec<UndoImage>,
}

impl<'a> OpImages<'a> {
    /// The images of op `op` (its index in `ops`), appended to `undo`.
    pub(crate) fn new(op: usize, undo: &'a mut Vec<UndoImage>) -> Self {
        Self { op, undo }
    }

    /// Records one row the op wrote: its key as the op left it, and the row before
    /// (`None`: inserted) and after (`None`: deleted).
    pub(crate) fn record(
        &mut self,
        table: &TableName,
        key: Image,
        before: Option<Image>,
        after: Option<Image>,
    ) {
        self.undo.push(UndoImage {
            op: self.op,
            table: table.to_string(),
            key,
            before,
            after,
        });
    }
}

/// A table's catalog entry, as a target read it inside its transaction.
pub(crate) trait Columns {
    /// All the table's columns, as stored, in declaration order.
    fn columns(&self) -> &[String];

    /// Fails unless every name is a column of the table ([`check_columns`]).
    fn check<'n>(
        &self,
        table: &TableName,
        part: &str,
        names: impl IntoIterator<Item = &'n str>,
    ) -> Result<(), ApplyError> {
        check_columns(self.columns(), table, part, names)
    }
}

/// Refuses an upsert whose `on` is empty or names a column `values` does not give.
pub(crate) fn check_upsert(values: &Row, on: &[Column]) -> Result<(), ApplyError> {
    if on.is_empty() {
        return Err(bad_op(
            "on is empty: an upsert needs the columns of a unique constraint",
        ));
    }
    if let Some(missing) = on.iter().find(|c| !values.contains_key(c.as_str())) {
        return Err(bad_op(format!(
            "on names column {:?}, which is not in values",
            missing.as_str()
        )));
    }
    Ok(())
}

/// The recorded generated values a replayed insert or upsert writes besides the
/// op's own `values` ([`Generated`](super::Generated)): those of `generated` whose
/// column the op does not name and the table can take (`writable`: a column of
/// the table that the database does not compute). Empty outside a replay
/// (`generated` is `None`).
pub(crate) fn generated_values<'g>(
    generated: Option<&'g Image>,
    values: &Row,
    writable: impl Fn(&str) -> bool,
) -> Vec<(&'g str, &'g Value)> {
    generated
        .into_iter()
        .flatten()
        .filter(|(column, _)| !values.contains_key(column.as_str()) && writable(column))
        .map(|(column, value)| (column.as_str(), value))
        .collect()
}

/// Refuses an update with an empty key or an empty set.
pub(crate) fn check_update(key: &Row, set: &Row) -> Result<(), ApplyError> {
    if key.is_empty() {
        return Err(bad_op(
            "key is empty: an update must name the row it changes",
        ));
    }
    if set.is_empty() {
        return Err(bad_op("set is empty: the update would change nothing"));
    }
    Ok(())
}

/// Refuses a delete with an empty key.
pub(crate) fn check_delete(key: &Row) -> Result<(), ApplyError> {
    if key.is_empty() {
        return Err(bad_op(
            "key is empty: a delete must name the row it removes",
        ));
    }
    Ok(())
}

/// An op malformed for this target ([`codes::BAD_OP`]).
pub(crate) fn bad_op(message: impl Into<String>) -> ApplyError {
    ApplyError::permanent(message).with_code(codes::BAD_OP)
}

/// An upsert whose `on` columns matched more than one row.
pub(crate) fn on_not_unique(on: &[&str]) -> ApplyError {
    bad_op(format!(
        "on {} matches more than one row: those columns are not a unique key",
        show(&on)
    ))
}

/// An update's or delete's key that matched no row.
pub(crate) fn no_row(key: &Row) -> ApplyError {
    ApplyError::permanent(format!("key {} matched no row", show(key))).with_code(codes::NO_ROW)
}

/// An update's or delete's key that matched more rows than `max_rows`.
pub(crate) fn too_many_rows(key: &Row, max_rows: u64) -> ApplyError {
    ApplyError::permanent(format!(
        "key {} matched more than {max_rows} row(s), the most one op may change (max_rows)",
        show(key)
    ))
    .with_code(codes::TOO_MANY_ROWS)
}

/// An undo image's key that matches more than one row now.
pub(crate) fn key_not_unique(key: &Image) -> ApplyError {
    ApplyError::permanent(format!("key {} matches more than one row", show(key)))
        .with_code(codes::TOO_MANY_ROWS)
}

/// A failed `expect`: the agent learns which columns differ, never what the row
/// holds (it may not read them); the values `found` are detail for humans, next to
/// the `expected` ones.
pub(crate) fn expect_failed(
    key: &Row,
    differ: &[&str],
    found: &Image,
    expected: &Image,
) -> ApplyError {
    ApplyError::permanent(format!(
        "expect did not hold: key {} matched a row, but its column(s) {} differ from expect",
        show(key),
        show(&differ)
    ))
    .with_code(codes::EXPECT_FAILED)
    .with_detail(format!(
        "the row has {}, expect was {}",
        show(found),
        show(expected)
    ))
}

/// The names of a row's columns (an op's `values`, `key`, `set` or `expect`).
pub(crate) fn keys(row: &Row) -> impl Iterator<Item = &str> {
    row.keys().map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(after: Option<serde_json::Value>) -> UndoImage {
        UndoImage {
            op: 1,
            table: "orders".to_owned(),
            key: json!({"id": 7}).as_object().cloned().unwrap_or_default(),
            before: None,
            after: after.and_then(|a| a.as_object().cloned()),
        }
    }

    fn row(value: serde_json::Value) -> Row {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn a_ledger_hit_is_already_unless_the_digest_differs() {
        let entry = LedgerEntry {
            intent_id: "i-1".to_owned(),
            run: "r".to_owned(),
            digest: "sha256:aa".to_owned(),
            applied_at_ms: 1,
            undo: Vec::new(),
        };
        let applied = ledger_hit("i-1", entry.clone(), &ApplyMeta::new("sha256:aa")).unwrap();
        assert!(applied.already && applied.ops.is_empty());
        assert_eq!(applied.ledger, entry);
        let err = ledger_hit("i-1", entry, &ApplyMeta::new("sha256:bb")).unwrap_err();
        assert_eq!(err.code.as_deref(), Some(codes::DIGEST_MISMATCH));
        assert!(err.message.contains("same id, different bytes"), "{err}");
    }

    #[test]
    fn undo_conflicts_are_rows_that_left_their_after_image() {
        let mut report = UndoReport::default();
        let written = image(Some(json!({"id": 7, "status": "paid"})));
        // A column added since is not compared.
        let now = row(json!({"id": 7, "status": "paid", "note": null}));
        report.compare("i-1", &written, Some(&now));
        assert!(report.conflicts.is_empty());
        let changed = row(json!({"id": 7, "status": "refunded"}));
        report.compare("i-1", &written, Some(&changed));
        report.compare("i-1", &written, None);
        // A deleted row that is still gone holds; one that came back does not.
        report.compare("i-2", &image(None), None);
        report.compare("i-2", &image(None), Some(&changed));
        let found: Vec<_> = report.conflicts.iter().map(|c| c.found.is_some()).collect();
        assert_eq!(found, [true, false, true]);
        assert_eq!(report.conflicts[0].expected, written.after);
        report.undone.push("i-1".to_owned());
        assert!(report.clone().may_commit(true));
        assert!(!report.may_commit(false));
        assert!(report.undone.is_empty());
    }

    #[test]
    fn malformed_ops_are_bad_ops_naming_the_problem() {
        let values = row(json!({"name": "x"}));
        let on = |c: &str| vec![serde_json::from_value::<Column>(json!(c)).unwrap()];
        assert!(check_upsert(&values, &on("name")).is_ok());
        let err = check_upsert(&values, &on("email")).unwrap_err();
        assert_eq!(err.code.as_deref(), Some(codes::BAD_OP));
        assert!(err.message.contains("\"email\""), "{err}");
        assert!(check_upsert(&values, &[]).is_err());
        assert!(check_update(&row(json!({})), &values).is_err());
        assert!(check_update(&values, &row(json!({}))).is_err());
        assert!(check_delete(&row(json!({}))).is_err());
    }

    #[test]
    fn a_failed_expect_names_columns_and_keeps_values_for_humans() {
        let key = row(json!({"id": 7}));
        let found = row(json!({"status": "open"}));
        let expected = row(json!({"status": "paid"}));
        let err = expect_failed(&key, &["status"], &found, &expected);
        assert_eq!(
            err.message,
            r#"expect did not hold: key {"id":7} matched a row, but its column(s) ["status"] differ from expect"#
        );
        assert!(!err.message.contains("open"));
        assert_eq!(
            err.detail.as_deref(),
            Some(r#"the row has {"status":"open"}, expect was {"status":"paid"}"#)
        );
    }
}
