#!/usr/bin/env bash
# The sandbox's example agent: submits each intent of examples/intents/ the way an
# agent should (`airlock submit`: checked, then a temporary dotfile renamed to <id>.json;
# one it refuses is written anyway, to show that Airlock refuses it too) and
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
  status=0
  written=$(airlock submit "$intent") || status=$?
  if ((status == 65)); then
    # `airlock submit` checks an intent before writing it and refused this one. An
    # agent need not use it, so show that Airlock refuses it too: write it the
    # plain way (a dotfile, then a rename), named after its id.
    id=$(sed -n 's/^  "id": "\([A-Za-z0-9._:-]*\)",\{0,1\}$/\1/p' "$intent" | head -n 1)
    echo "agent: airlock submit refused $(basename "$intent"); writing it anyway, as a careless agent could"
    written=$AIRLOCK_INTENTS/${id:-$(basename "$intent" .json)}.json
    cp "$intent" "$AIRLOCK_INTENTS/.agent.tmp"
    mv "$AIRLOCK_INTENTS/.agent.tmp" "$written"
  elif ((status != 0)); then
    exit "$status"
  fi
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
