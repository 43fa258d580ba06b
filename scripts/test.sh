#!/usr/bin/env bash
# The whole test suite, as `make test` and CI (.ci/run) run it.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "formatting (cargo fmt --check)"
cargo fmt --all -- --check

step "dependency rule: statefun-sdk opens no sockets and no files"
scripts/check-sdk-deps.sh

step "Kafka-protocol test broker (scripts/broker; set STATEFUN_KAFKA_BOOTSTRAP to use your own)"
if [[ -z "${STATEFUN_KAFKA_BOOTSTRAP:-}" ]]; then
  STATEFUN_KAFKA_BOOTSTRAP="$(scripts/broker start)"
  export STATEFUN_KAFKA_BOOTSTRAP
  trap 'scripts/broker stop' EXIT
fi
echo "broker at $STATEFUN_KAFKA_BOOTSTRAP"

step "doc tests"
cargo test --locked --workspace --doc

step "unit, property and integration tests (cargo nextest)"
cargo nextest run --locked --workspace --no-fail-fast

# After the tests: clippy reuses the RocksDB library they compiled (scripts/reuse-rocksdb)
# instead of compiling its own copy.
step "lints (cargo clippy -D warnings)"
scripts/reuse-rocksdb cargo clippy --locked --workspace --all-targets -- -D warnings
