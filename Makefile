# The project's commands. `make demo` and `make test` are the two set-up commands of
# the README: each installs what it needs on a fresh machine first (scripts/setup.sh).
#
# Builds go to a persistent target directory outside the clone, so CI runs and later
# sessions reuse compiled dependencies. Override with CARGO_TARGET_DIR=...

CARGO_TARGET_DIR ?= $(HOME)/.cache/statefun-rs/target
export CARGO_TARGET_DIR

.PHONY: demo test bench setup fmt

## Run the retail reference application in-process (embedded default) and check its invariants.
demo: setup
	cargo run --release --locked -p inventory --bin inventory-demo -- $(DEMO_ARGS)

## Run the whole test suite (formatting, lints, dependency rules, unit/property/integration/doc tests).
test: setup
	scripts/test.sh

## Run the criterion benchmarks (numbers in docs/performance.md).
bench: setup
	cargo bench --locked -p statefun-benches

setup:
	scripts/setup.sh

fmt:
	cargo fmt --all
