//! The state backend boundary: where per-address state lives.
//!
//! Why it exists: the partition task reads an address's declared values before an
//! invocation and writes the changed ones after it; it does that through
//! [`PartitionStore`], one instance per partition, owned by the partition task (no
//! locks on the per-message path). [`StateBackend`] opens the store of a partition.
//! [`MemoryBackend`] ships for speed and for the embedded default; durable backends
//! implement the same traits.
//!
//! Invariants every backend keeps: `write` is atomic (all operations of a
//! [`WriteBatch`] become visible together, or none do); `get` returns what the last
//! successful `write` left. Expiry is decided by the caller (the partition knows the
//! clock); a backend stores and returns `expires_at_ms` as given.

mod backend;
#[cfg(feature = "rocksdb")]
pub mod changelog;
#[cfg(feature = "rocksdb")]
pub mod checkpoint;
pub mod codec;
mod memory;
#[cfg(feature = "rocksdb")]
pub mod rocksdb;

pub use self::backend::{
    Admission, BackendProfile, CheckpointInfo, Error, LogKind, LogOp, PartitionStore, StateBackend, StoredValue,
    WriteBatch, WriteOp,
};
#[cfg(feature = "rocksdb")]
pub use self::changelog::{Changelog, ChangelogBackend, CommitUnit};
pub use self::codec::RawOp;
pub(crate) use self::codec::entries;
pub use self::codec::keys;
pub use self::keys::LogKey;
pub use self::memory::{MemoryBackend, MemoryStore};
#[cfg(feature = "rocksdb")]
pub use self::rocksdb::{RocksDbBackend, RocksDbOptions};
