#!/usr/bin/env bash
# The Docker Compose topology (examples/inventory/docker) as plain processes on this
# machine: Apache Kafka (a single-node cluster of its own, `scripts/kafka start --name
# inventory`, stopped at the end; or your Kafka with BROKERS=host:port), two runtime
# instances of region north, the load generator, the central analytics consumer, and
# the invariant check at the end. Exit status 0 = the check passed.
#
#   examples/inventory/run-kafka.sh                 # 30 s of traffic at 1000 records/s
#   SECONDS_OF_TRAFFIC=60 RATE=2000 examples/inventory/run-kafka.sh
#   BROKERS=localhost:9092 examples/inventory/run-kafka.sh   # your own Kafka
#
# Logs and state go to a temporary directory (printed at the start, kept on failure).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/statefun-rs/target}"
scripts/setup.sh
scripts/reuse-rocksdb cargo build --release --locked -p inventory --bin inventory-node
node="$CARGO_TARGET_DIR/release/inventory-node"

if [[ -z "${BROKERS:-}" ]]; then
  BROKERS="$(scripts/kafka start --name inventory)"
  stop_broker=1
fi
work="$(mktemp -d)"
prefix="retail-$(date +%s)"
echo "broker $BROKERS, topics $prefix.*, logs and state in $work"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ -n "${stop_broker:-}" ]]; then scripts/kafka stop --name inventory; fi
}
trap cleanup EXIT

common=(--brokers "$BROKERS" --topic-prefix "$prefix")
for id in a b; do
  "$node" "${common[@]}" instance --region north --instance-id "$id" \
    --state-dir "$work/state-$id" --objects "$work/objects" >"$work/instance-$id.log" 2>&1 &
  pids+=($!)
done
"$node" "${common[@]}" analytics --every 5 >"$work/analytics.log" 2>&1 &
pids+=($!)

"$node" "${common[@]}" generate --region north --seconds "${SECONDS_OF_TRAFFIC:-30}" --rate "${RATE:-1000}" \
  --objects "$work/objects" --ledger "$work/north.json"
if "$node" "${common[@]}" check --region north --ledger "$work/north.json"; then
  echo "central analytics view (last print of the analytics consumer):"
  tac "$work/analytics.log" | sed -n '1,/^central analytics/p' | tac
  rm -rf "$work"
else
  echo "FAIL: logs and state kept in $work" >&2
  exit 1
fi
