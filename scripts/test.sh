#!/usr/bin/env bash
# The whole test suite, as `make test` and CI (.ci/run) run it.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "formatting (cargo fmt --check)"
cargo fmt --all -- --check

step "dependency rule: statefun-sdk opens no sockets and no files"
scripts/check-sdk-deps.sh

step "the example cluster's docker compose file (scripts/validate-compose: Docker Compose's own check, no engine needed)"
scripts/validate-compose

step "Kafka-protocol test broker (scripts/broker; set STATEFUN_KAFKA_BOOTSTRAP to use your own)"
if [[ -z "${STATEFUN_KAFKA_BOOTSTRAP:-}" ]]; then
  STATEFUN_KAFKA_BOOTSTRAP="$(scripts/broker start)"
  export STATEFUN_KAFKA_BOOTSTRAP
  trap 'scripts/broker stop' EXIT
fi
echo "broker at $STATEFUN_KAFKA_BOOTSTRAP"

step "StateFun Python SDK for the compatibility tests (scripts/statefun-python; set STATEFUN_PYTHON to use your own)"
if [[ -z "${STATEFUN_PYTHON:-}" ]]; then
  STATEFUN_PYTHON="$(scripts/statefun-python path)"
  export STATEFUN_PYTHON
fi
echo "python at $STATEFUN_PYTHON"

# Every build below links the RocksDB library this target directory compiled before, if
# there is one (scripts/reuse-rocksdb): a change of a feature of a shared dependency
# (e.g. libc's) would otherwise recompile RocksDB's C++ (~20 min on 2 cores). On a fresh
# machine the first build compiles it from source.
step "doc tests"
scripts/reuse-rocksdb cargo test --locked --workspace --doc

step "unit, property and integration tests (cargo nextest)"
scripts/reuse-rocksdb cargo nextest run --locked --workspace --no-fail-fast

step "lints (cargo clippy -D warnings)"
scripts/reuse-rocksdb cargo clippy --locked --workspace --all-targets -- -D warnings
