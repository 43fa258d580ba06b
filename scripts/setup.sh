#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh machine; idempotent and quiet
# when everything is present. Called by `make demo` and `make test`.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  log "cargo is not installed; install a Rust toolchain (rustup) first"
  exit 1
fi

# System packages the build needs (C toolchain for crates that compile C code).
# libclang-dev: bindgen for librocksdb-sys. zlib1g-dev, libssl-dev: librdkafka (TLS, SASL/SCRAM). python3, python3-venv:
# the StateFun Python SDK's virtualenv. openjdk-17-jre-headless, maven: the test broker,
# Apache Kafka, run from its Maven artifacts (scripts/kafka).
APT_PACKAGES=(make gcc g++ pkg-config libclang-dev zlib1g-dev libssl-dev python3 python3-venv)
command -v java >/dev/null 2>&1 || APT_PACKAGES+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || APT_PACKAGES+=(maven)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]} with apt-get"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# rustfmt and clippy are part of the test command.
for comp in rustfmt clippy; do
  if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
    log "adding rustup component $comp"
    rustup component add "$comp"
  fi
done

# cargo-nextest runs the test suite; install it from crates.io if it is missing.
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest (one-time, a few minutes)"
  cargo install --locked cargo-nextest
fi

# The test broker (Apache Kafka, pinned, fetched with Maven); quick when already installed.
"$(dirname "$0")/kafka" install

# The StateFun Python SDK (pinned, in a virtualenv) for the remote-function
# compatibility tests.
"$(dirname "$0")/statefun-python" install
