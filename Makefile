# The project's commands. `make demo` and `make test` are the two set-up commands of
# the README: each installs what it needs on a fresh machine first (scripts/setup.sh).
#
# Builds go to a persistent target directory outside the clone, so CI runs and later
# sessions reuse compiled dependencies. Override with CARGO_TARGET_DIR=...

CARGO_TARGET_DIR ?= $(HOME)/.cache/statefun-rs/target
export CARGO_TARGET_DIR

.PHONY: demo test bench bench-kafka soak soak-kafka setup fmt prune

## Run the retail reference application in-process (embedded default) and check its invariants.
demo: setup
	scripts/reuse-rocksdb cargo run --release --locked -p inventory --bin inventory-demo -- $(DEMO_ARGS)

## Run the whole test suite (formatting, lints, dependency rules, unit/property/integration/doc tests).
test: setup
	scripts/test.sh

## Run the criterion benchmarks (numbers in docs/performance.md).
bench: setup
	scripts/reuse-rocksdb cargo bench --locked -p statefun-benches

## End-to-end Kafka benchmark: Kafka mode vs a raw librdkafka pipe and a raw exactly-once relay, on Apache
## Kafka (scripts/kafka starts its own broker; STATEFUN_KAFKA_BOOTSTRAP=host:port uses another).
bench-kafka: setup
	scripts/bench-kafka

## Crash soak: SIGKILL a RocksDB-backed workload KILLS times and compare with a crash-free run.
KILLS ?= 20
RECORDS ?= 50000
soak: setup
	scripts/reuse-rocksdb cargo run --locked -p statefun-crash-test -- soak --kills $(KILLS) --records $(RECORDS)

## SIGKILL soak on Apache Kafka: the Kafka-mode, cluster and retail SIGKILL tests with KAFKA_KILLS kills each
## (`make test` runs them with 3 to 5).
KAFKA_KILLS ?= 12
soak-kafka: setup
	STATEFUN_SOAK_KILLS=$(KAFKA_KILLS) scripts/soak-kafka

## Free disk in the target directory: incremental caches and executables unused for MINUTES (60).
prune:
	scripts/prune-target

setup:
	scripts/setup.sh

fmt:
	cargo fmt --all
