#!/usr/bin/env bash
# The whole test suite, as `make test` and CI (.ci/run) run it.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "formatting (cargo fmt --check)"
cargo fmt --all -- --check

step "dependency rule: statefun-sdk opens no sockets and no files"
scripts/check-sdk-deps.sh

step "module structure: no import loop between files, statefun-runtime's layers (scripts/check-layers.py)"
python3 scripts/check-layers.py

step "the example cluster's docker compose file (scripts/validate-compose: Docker Compose's own check, no engine needed)"
scripts/validate-compose

step "test broker: Apache Kafka (scripts/kafka; set STATEFUN_KAFKA_BOOTSTRAP to use your own)"
if [[ -z "${STATEFUN_KAFKA_BOOTSTRAP:-}" ]]; then
  STATEFUN_KAFKA_BOOTSTRAP="$(scripts/kafka start)"
  export STATEFUN_KAFKA_BOOTSTRAP
  trap 'scripts/kafka stop' EXIT
fi
echo "broker at $STATEFUN_KAFKA_BOOTSTRAP"

step "StateFun Python SDK for the compatibility tests (scripts/statefun-python; set STATEFUN_PYTHON to use your own)"
if [[ -z "${STATEFUN_PYTHON:-}" ]]; then
  STATEFUN_PYTHON="$(scripts/statefun-python path)"
  export STATEFUN_PYTHON
fi
echo "python at $STATEFUN_PYTHON"

# Every build below links the one optimized RocksDB library (scripts/reuse-rocksdb), which
# `make demo` and `make bench` link too: RocksDB's C++ (~20 min on 2 cores) is compiled
# once per machine, on the first of these commands.
step "doc tests"
scripts/reuse-rocksdb cargo test --locked --workspace --doc

step "unit, property and integration tests (cargo nextest)"
scripts/reuse-rocksdb cargo nextest run --locked --workspace --no-fail-fast

step "lints (cargo clippy -D warnings)"
scripts/reuse-rocksdb cargo clippy --locked --workspace --all-targets -- -D warnings
