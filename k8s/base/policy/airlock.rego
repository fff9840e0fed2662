# Airlock's default policy: what an agent may write without a human.
#
# Airlock evaluates the whole document of this package (`data.airlock.authz`, the
# same path OPA serves at /v1/data/airlock/authz) once per intent, with the policy
# input document v2 as `input` (see README.md). Each input.ops entry names its
# table as the target database resolves it (`schema`, `table`, `columns` as stored
# in the catalog), never only as the agent spelled it (`spelled`), so rules compare
# canonical names. It reads four keys and ignores the rest, so helper rules may
# live here freely:
#
#   allow     (bool)      apply without review
#   review    (bool)      hold for human approval; never true together with allow
#   reasons   ([string])  why; shown to approvers and returned to the agent
#   approvals (int >= 1)  distinct approvers a review needs
#
# Neither allow nor review means deny. Precedence here: deny > review > allow.
# A malformed answer (say `allow := "yes"`) keeps the intent queued: Airlock fails
# closed, it never guesses.
package airlock.authz

# Tables no agent may write, listed in data.json under airlock.deny_tables.
# An entry matches a table by its canonical name, unqualified ("audit_log" matches
# it in every schema) or qualified ("public.audit_log"). Canonical names are what
# the database stores, so the agent's spelling (AUDIT_LOG, main.Audit_Log, an
# unqualified name found through search_path) does not matter.
default deny_tables := []

deny_tables := data.airlock.deny_tables

# Intents with more ops than this go to review (override in data.json with
# airlock.max_ops).
default max_ops := 20

max_ops := data.airlock.max_ops

# Op kinds that need no human on their own.
writable_kinds := {"insert", "update", "upsert"}

# Every op kind this policy knows about; anything else is denied, so a future op
# kind is never allowed by accident.
known_kinds := writable_kinds | {"delete"}

default allow := false

default review := false

# One human approval is enough for what this policy sends to review.
approvals := 1

# --- deny ---------------------------------------------------------------------

deny if count(deny_reasons) > 0

deny_reasons contains msg if {
	some op in input.ops
	denied_table(op)
	msg := sprintf("table %s.%s is listed in data.airlock.deny_tables: agents may not write it", [op.schema, op.table])
}

denied_table(op) if op.table in deny_tables

denied_table(op) if sprintf("%s.%s", [op.schema, op.table]) in deny_tables

deny_reasons contains msg if {
	some op in input.ops
	not op.kind in known_kinds
	msg := sprintf("op %d has kind %q, which this policy does not know", [op.index, op.kind])
}

# --- review -------------------------------------------------------------------

review if {
	not deny
	count(review_reasons) > 0
}

review_reasons contains msg if {
	some op in input.ops
	op.kind == "delete"
	msg := sprintf("deletes from %s need human review", [op.table])
}

# Gold customers are changed by humans only. With previews on (`[policy] preview =
# true`), any op that would change an existing gold customer's row goes to review:
# an update, a delete, and an upsert that would update instead of insert (its
# `before` is the row it would overwrite). Inserts have no before-image. Without
# previews `input.preview` is absent and this rule never fires.
review_reasons contains msg if {
	some op in input.preview.ops
	input.ops[op.index].table == "customers"
	some row in op.before
	row.tier == "gold"
	msg := sprintf("op %d (%s) changes gold customer %v", [op.index, input.ops[op.index].kind, row.id])
}

review_reasons contains msg if {
	count(input.ops) > max_ops
	msg := sprintf("intent has %d ops, more than %d; large intents need human review", [count(input.ops), max_ops])
}

# --- allow --------------------------------------------------------------------

allow if {
	not deny
	not review
	every op in input.ops {
		op.kind in writable_kinds
	}
}

# --- reasons ------------------------------------------------------------------

# Only the reasons for the verdict given: a denied intent is not also told it
# would have needed review.
reasons := deny_reasons if deny

reasons := review_reasons if review
