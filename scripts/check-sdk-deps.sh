#!/usr/bin/env bash
# statefun-sdk must not depend (transitively, in its default features) on any crate
# that does I/O: no Kafka client, no RocksDB, no gRPC/HTTP server, no tokio runtime.
# (TiKV keeps the same rule for engine_traits.) Fails listing the offenders.
set -euo pipefail
cd "$(dirname "$0")/.."
FORBIDDEN='^(rdkafka|rdkafka-sys|rocksdb|librocksdb-sys|tonic|hyper|axum|tokio|mio|socket2|reqwest|object_store)$'
deps=$(cargo tree --locked -p statefun-sdk -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u)
bad=$(printf '%s\n' "$deps" | grep -E "$FORBIDDEN" || true)
if [ -n "$bad" ]; then
  echo "statefun-sdk depends on I/O crates it must not use:" >&2
  printf '  %s\n' $bad >&2
  exit 1
fi
echo "statefun-sdk normal dependencies: $(printf '%s\n' "$deps" | wc -l) crates, none of them I/O crates"
