//! Every byte format of the state boundary: keys, state values, log entries and the raw
//! changes of a write.
//!
//! Why it exists: the formats are what outlives a build (a RocksDB directory, a
//! changelog topic, a checkpoint), so they live in one place, apart from the backends
//! that store them. Every backend ([`MemoryBackend`](super::MemoryBackend) keeps
//! decoded values and needs none; the RocksDB backend, the changelogged backend and
//! checkpoints) and `statefun-kafka` read and write through this module, and no backend
//! reaches into another backend's file for a format. The codec depends only on the
//! boundary's plain types (`state`'s [`StoredValue`](super::StoredValue),
//! [`WriteBatch`](super::WriteBatch), [`Error`](super::Error)) and the lower layers
//! (`records`, `envelope`, `partitioner`), never on the partition, the runtime or the
//! ingress.
//!
//! * [`keys`]: the versioned key layout (state values, progress markers, inbox, timer
//!   and egress-log entries) and the meta keys;
//! * [`values`]: state values with their expiry, and fixed-width numbers;
//! * `entries`: the log entries' values (inbox messages, timers, egress records);
//! * [`RawOp`]: a write as raw key-value changes.
//!
//! Invariants: a format changes only by a new version byte; decoding never panics on
//! arbitrary bytes (property tests in each file).

// Without the `rocksdb` feature only the formats the partition itself uses (keys of
// log entries, the entries) are live; the rest is kept compiled, not dead-code linted.
#![cfg_attr(not(feature = "rocksdb"), allow(dead_code))]

mod batch;
pub(crate) mod entries;
pub mod keys;
pub mod values;

pub use self::batch::RawOp;
#[cfg(feature = "rocksdb")]
pub(crate) use self::batch::encode_batch;
