#!/usr/bin/env bash
# The sandbox's example agent: submits each intent of examples/intents/ the way an
# agent should (`airlock submit`: a temporary dotfile, then a rename to <id>.json) and
# prints each outcome as it lands, then again whenever its state changes, until every
# intent is final or waits for a human.
#
#   AIRLOCK_INTENTS   where to submit (default /airlock/intents)
#   AIRLOCK_RESULTS   where outcomes appear (default /airlock/results)
#   AGENT_EXAMPLES    the intents to submit (default /agent/examples)
#   AGENT_TIMEOUT     seconds to wait for the outcomes (default 120)
set -euo pipefail
export AIRLOCK_INTENTS=${AIRLOCK_INTENTS:-/airlock/intents}
results=${AIRLOCK_RESULTS:-/airlock/results}
examples=${AGENT_EXAMPLES:-/agent/examples}
deadline=$((SECONDS + ${AGENT_TIMEOUT:-120}))

# The value of a top-level string member of an outcome (Airlock writes them
# pretty-printed, one member per line).
member() {
  sed -n "s/^  \"$1\": \"\\(.*\\)\",\\{0,1\\}\$/\\1/p" "$2" | head -n 1
}

declare -A shown
names=()
for intent in "$examples"/*.json; do
  written=$(airlock submit "$intent")
  name=$(basename "$written")
  names+=("$name")
  echo "agent: submitted $(basename "$intent") as $name"
  # One at a time, as a conversation would: the next intent of the run is written
  # once Airlock has taken this one (its outcome exists), so the run's order is the
  # examples' order.
  until [ -e "$results/$name" ]; do
    if ((SECONDS > deadline)); then
      echo "agent: no outcome for $name after ${AGENT_TIMEOUT:-120}s" >&2
      exit 1
    fi
    sleep 0.2
  done
done

while :; do
  waiting=0
  for name in "${names[@]}"; do
    file=$results/$name
    state=$(member state "$file")
    if [ "${shown[$name]:-}" != "$state" ]; then
      shown[$name]=$state
      echo "agent: outcome ${name%.json}: $state"
      cat "$file"
      echo
    fi
    if ! grep -q '^  "final": true' "$file" && [ "$state" != awaiting_review ]; then
      waiting=$((waiting + 1))
    fi
  done
  if ((waiting == 0)); then
    break
  fi
  if ((SECONDS > deadline)); then
    echo "agent: $waiting intent(s) still undecided after ${AGENT_TIMEOUT:-120}s" >&2
    exit 1
  fi
  sleep 0.5
done

summary=()
for name in "${names[@]}"; do
  summary+=("${name%.json}=${shown[$name]}")
done
echo "agent: done: ${summary[*]}"
for name in "${names[@]}"; do
  if [ "${shown[$name]}" = awaiting_review ]; then
    echo "agent: ${name%.json} waits for a reviewer: open http://127.0.0.1:8080 with a token from"
    echo "       docker compose -f examples/compose/compose.yaml exec airlock airlock token add --name you --role approver"
  fi
done
