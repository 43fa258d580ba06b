# The project's commands. `make demo` and `make test` are the two set-up commands of
# the README: each installs what it needs on a fresh machine first (scripts/setup.sh).
#
# Builds go to a persistent target directory outside the clone, so CI runs and later
# sessions reuse compiled dependencies. Override with CARGO_TARGET_DIR=...

CARGO_TARGET_DIR ?= $(HOME)/.cache/statefun-rs/target
export CARGO_TARGET_DIR

.PHONY: demo test bench bench-kafka soak broker-check setup fmt prune

## Run the retail reference application in-process (embedded default) and check its invariants.
demo: setup
	scripts/reuse-rocksdb cargo run --release --locked -p inventory --bin inventory-demo -- $(DEMO_ARGS)

## Run the whole test suite (formatting, lints, dependency rules, unit/property/integration/doc tests).
test: setup
	scripts/test.sh

## Run the criterion benchmarks (numbers in docs/performance.md).
bench: setup
	cargo bench --locked -p statefun-benches

## End-to-end Kafka benchmark: Kafka mode vs a raw librdkafka pipe on the test broker (after `make bench`,
## whose optimized RocksDB it reuses).
bench-kafka: setup
	scripts/bench-kafka

## Crash soak: SIGKILL a RocksDB-backed workload KILLS times and compare with a crash-free run.
KILLS ?= 20
RECORDS ?= 50000
soak: setup
	scripts/reuse-rocksdb cargo run --locked -p statefun-crash-test -- soak --kills $(KILLS) --records $(RECORDS)

## Tests that need Apache Kafka's transaction semantics (skipped by `make test`: the test broker has a
## defect, docs/kafka.md): the broker conformance check and the Kafka/cluster SIGKILL tests. RUNS=N repeats;
## STATEFUN_KAFKA_BOOTSTRAP=host:port runs them against another broker.
broker-check: setup
	scripts/broker-check

## Free disk in the target directory: incremental caches and executables unused for MINUTES (60).
prune:
	scripts/prune-target

setup:
	scripts/setup.sh

fmt:
	cargo fmt --all
