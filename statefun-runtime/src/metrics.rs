//! Metric names, in one place.
//!
//! Why it exists: the runtime reports through the [`metrics`](https://docs.rs/metrics)
//! facade and forces no exporter on library users: with no recorder installed, every
//! update is a no-op. Install any `metrics` recorder (e.g. a Prometheus exporter) to
//! collect them. Updates happen per invocation batch, not per state access. Install the
//! recorder before building the runtime: partitions take their counter handles at build
//! time.

/// Counter: messages processed successfully.
pub const INVOCATIONS: &str = "statefun_invocations_total";
/// Counter: failed invocation attempts (each retry counts).
pub const INVOCATION_FAILURES: &str = "statefun_invocation_failures_total";
/// Counter: messages and records sent to the dead-letter sink.
pub const DEAD_LETTERS: &str = "statefun_dead_letters_total";
/// Counter: addresses parked after exhausting their retries.
pub const ADDRESSES_PARKED: &str = "statefun_addresses_parked_total";
