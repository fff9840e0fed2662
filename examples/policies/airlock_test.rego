# Tests for airlock.rego. Run with `opa test examples/policies` or through Airlock
# (`cargo test -p airlock --test rego_policies`). Every rule named test_* must be true.
package airlock.authz_test

import data.airlock.authz

# One entry of input.ops for a table of schema main, spelled as its canonical name.
op(index, kind, table) := {
	"index": index,
	"kind": kind,
	"schema": "main",
	"table": table,
	"columns": [],
	"spelled": table,
}

# An input document with just the ops (the default policy reads nothing else).
with_ops(ops) := {"version": 2, "ops": ops}

inserts(n) := with_ops([op(i, "insert", "customers") | some i in numbers.range(0, n - 1)])

test_insert_is_allowed if {
	authz.allow with input as with_ops([op(0, "insert", "customers")])
	not authz.review with input as with_ops([op(0, "insert", "customers")])
}

test_update_and_upsert_are_allowed if {
	authz.allow with input as with_ops([op(0, "update", "customers"), op(1, "upsert", "tags")])
}

test_delete_needs_one_review if {
	x := with_ops([op(0, "insert", "orders"), op(1, "delete", "orders")])
	authz.review with input as x
	not authz.allow with input as x
	authz.approvals == 1
	authz.reasons == {"deletes from orders need human review"} with input as x
}

test_deny_table_is_denied_with_its_name if {
	x := with_ops([op(0, "insert", "customers"), op(1, "insert", "audit_log")])
	authz.deny with input as x
	not authz.allow with input as x
	not authz.review with input as x
	reasons := authz.reasons with input as x
	some reason in reasons
	contains(reason, "audit_log")
}

test_deny_table_matches_qualified_names if {
	x := with_ops([{
		"index": 0, "kind": "update", "schema": "archive", "table": "audit_log",
		"columns": ["note"], "spelled": "archive.audit_log",
	}])
	authz.deny with input as x
	not authz.allow with input as x
	authz.deny with input as x with data.airlock.deny_tables as ["archive.audit_log"]
	authz.allow with input as x with data.airlock.deny_tables as ["public.audit_log"]
}

# The policy reads the canonical name; however the agent spelled it does not matter.
test_deny_table_ignores_the_spelling if {
	every spelled in ["AUDIT_LOG", "Audit_Log", "main.AUDIT_LOG", "MAIN.audit_log"] {
		x := with_ops([{
			"index": 0, "kind": "update", "schema": "main", "table": "audit_log",
			"columns": ["message"], "spelled": spelled,
		}])
		authz.deny with input as x
		not authz.allow with input as x
	}
}

test_deny_beats_review if {
	x := with_ops([op(0, "delete", "audit_log")])
	authz.deny with input as x
	not authz.review with input as x
	count(authz.reasons) == 1 with input as x
}

test_deny_tables_come_from_data if {
	x := with_ops([op(0, "insert", "customers")])
	authz.deny with input as x with data.airlock.deny_tables as ["customers"]
	authz.allow with input as x with data.airlock.deny_tables as []
}

test_twenty_ops_are_allowed if {
	authz.allow with input as inserts(20)
}

test_more_than_twenty_ops_need_review if {
	authz.review with input as inserts(21)
	not authz.allow with input as inserts(21)
	reasons := authz.reasons with input as inserts(21)
	some reason in reasons
	contains(reason, "21 ops")
}

test_unknown_op_kind_is_denied if {
	x := with_ops([op(0, "truncate", "customers")])
	authz.deny with input as x
	not authz.allow with input as x
	not authz.review with input as x
}

# --- gold customers (rows from the preview) ----------------------------------------

# An input with one op on customers and the preview of its rows.
previewed(kind, before, after) := {
	"version": 2,
	"ops": [op(0, kind, "customers")],
	"preview": {"ops": [{"index": 0, "rows": count(before), "before": before, "after": after}]},
}

gold := {"id": 7, "name": "Ada", "tier": "gold"}

standard := {"id": 8, "name": "Bob", "tier": "standard"}

test_update_of_a_gold_customer_needs_review if {
	x := previewed("update", [gold], [object.union(gold, {"name": "Ada L."})])
	authz.review with input as x
	not authz.allow with input as x
	authz.reasons == {"op 0 (update) changes gold customer 7"} with input as x
}

test_upsert_that_updates_a_gold_customer_needs_review if {
	x := previewed("upsert", [gold], [object.union(gold, {"tier": "standard"})])
	authz.review with input as x
	not authz.allow with input as x
	authz.reasons == {"op 0 (upsert) changes gold customer 7"} with input as x
}

test_upsert_that_inserts_is_allowed if {
	x := previewed("upsert", [], [gold])
	authz.allow with input as x
	not authz.review with input as x
}

test_update_of_a_standard_customer_is_allowed if {
	x := previewed("update", [standard], [object.union(standard, {"tier": "gold"})])
	authz.allow with input as x
}

test_gold_rows_of_other_tables_are_not_customers if {
	x := {
		"version": 2,
		"ops": [op(0, "update", "partners")],
		"preview": {"ops": [{"index": 0, "rows": 1, "before": [gold], "after": [gold]}]},
	}
	authz.allow with input as x
}

test_without_a_preview_the_gold_rule_is_silent if {
	authz.allow with input as with_ops([op(0, "upsert", "customers")])
}
