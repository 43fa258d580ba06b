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

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use statefun_sdk::Address;

use crate::partitioner::PartitionId;

#[cfg(feature = "rocksdb")]
pub mod checkpoint;
pub mod keys;
#[cfg(feature = "rocksdb")]
pub mod rocksdb;
#[cfg(feature = "rocksdb")]
pub use self::rocksdb::{RocksDbBackend, RocksDbOptions};

/// Why a state backend operation failed. Backends say whether a retry can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A transient failure (I/O hiccup, busy resource): the operation may succeed later.
    #[error("state backend temporarily unavailable: {0}")]
    Transient(String),
    /// A permanent failure (corruption, full disk, bad format): operator action needed.
    #[error("state backend failed: {0}")]
    Permanent(String),
}

/// A stored state value with its expiry deadline (milliseconds on the runtime clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredValue {
    /// The encoded value.
    pub value: Bytes,
    /// When it expires, if it does.
    pub expires_at_ms: Option<u64>,
}

/// One write: set (`Some`) or delete (`None`) the value `name` of `address`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOp {
    /// The address.
    pub address: Address,
    /// The declared state name.
    pub name: Arc<str>,
    /// The new value, or `None` to delete.
    pub value: Option<StoredValue>,
}

/// State changes and progress markers, applied atomically: after a crash either all of
/// them are visible or none is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// The operations, applied in order.
    pub ops: Vec<WriteOp>,
    /// Progress markers: `(source, position consumed up to)`, stored with the state they
    /// produced so recovery restarts from exactly there.
    pub progress: Vec<(String, u64)>,
}

impl WriteBatch {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.progress.is_empty()
    }
}

/// The state of one partition, owned by that partition's task.
pub trait PartitionStore: Send + 'static {
    /// Reads one value.
    fn get(&self, address: &Address, name: &str) -> Result<Option<StoredValue>, Error>;
    /// Applies a batch atomically.
    fn write(&mut self, batch: WriteBatch) -> Result<(), Error>;
    /// The last position stored for `source` in this partition.
    fn progress(&self, source: &str) -> Result<Option<u64>, Error>;
}

/// A checkpoint that was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Increasing checkpoint id.
    pub id: u64,
    /// Where it is.
    pub path: std::path::PathBuf,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// Opens partition stores.
pub trait StateBackend: Send + Sync + 'static {
    /// Opens the store of `partition`. Called once per partition when the runtime starts.
    fn open_partition(&self, partition: PartitionId) -> Result<Box<dyn PartitionStore>, Error>;

    /// Takes a checkpoint if the backend supports them (`Ok(None)` otherwise). Blocking:
    /// the runtime calls it from `spawn_blocking`.
    fn checkpoint(&self) -> Result<Option<CheckpointInfo>, Error> {
        Ok(None)
    }
}

/// In-memory state: fast, shipped for tests, benchmarks and the embedded default. State
/// is lost when the runtime stops.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend;

impl MemoryBackend {
    /// A new in-memory backend.
    pub fn new() -> MemoryBackend {
        MemoryBackend
    }
}

impl StateBackend for MemoryBackend {
    fn open_partition(&self, _partition: PartitionId) -> Result<Box<dyn PartitionStore>, Error> {
        Ok(Box::new(MemoryStore::default()))
    }
}

/// One partition's in-memory state: address -> (state name -> value).
#[derive(Debug, Default)]
pub struct MemoryStore {
    values: HashMap<Address, Vec<(Arc<str>, StoredValue)>, ahash::RandomState>,
    progress: HashMap<String, u64>,
}

impl PartitionStore for MemoryStore {
    fn get(&self, address: &Address, name: &str) -> Result<Option<StoredValue>, Error> {
        Ok(self
            .values
            .get(address)
            .and_then(|vs| vs.iter().find(|(n, _)| &**n == name))
            .map(|(_, v)| v.clone()))
    }

    fn write(&mut self, batch: WriteBatch) -> Result<(), Error> {
        for op in batch.ops {
            match op.value {
                Some(v) => {
                    let vs = self.values.entry(op.address).or_default();
                    match vs.iter_mut().find(|(n, _)| *n == op.name) {
                        Some(slot) => slot.1 = v,
                        None => vs.push((op.name, v)),
                    }
                }
                None => {
                    if let Some(vs) = self.values.get_mut(&op.address) {
                        vs.retain(|(n, _)| *n != op.name);
                        if vs.is_empty() {
                            self.values.remove(&op.address);
                        }
                    }
                }
            }
        }
        self.progress.extend(batch.progress);
        Ok(())
    }

    fn progress(&self, source: &str) -> Result<Option<u64>, Error> {
        Ok(self.progress.get(source).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use statefun_sdk::TypeName;

    fn addr(id: &str) -> Address {
        Address::new(TypeName::from_static("t/f"), id).unwrap()
    }

    fn put(a: &Address, name: &str, v: &'static [u8]) -> WriteOp {
        WriteOp {
            address: a.clone(),
            name: Arc::from(name),
            value: Some(StoredValue {
                value: Bytes::from_static(v),
                expires_at_ms: None,
            }),
        }
    }

    #[test]
    fn memory_store_puts_overwrites_and_deletes_per_name() {
        let mut s = MemoryBackend::new().open_partition(PartitionId(0)).unwrap();
        let a = addr("a");
        s.write(WriteBatch {
            ops: vec![put(&a, "x", b"1"), put(&a, "y", b"2"), put(&a, "x", b"3")],
            progress: vec![],
        })
        .unwrap();
        assert_eq!(s.get(&a, "x").unwrap().unwrap().value, Bytes::from_static(b"3"));
        assert_eq!(s.get(&a, "y").unwrap().unwrap().value, Bytes::from_static(b"2"));
        assert_eq!(s.get(&addr("b"), "x").unwrap(), None);
        s.write(WriteBatch {
            ops: vec![WriteOp {
                address: a.clone(),
                name: Arc::from("x"),
                value: None,
            }],
            progress: vec![],
        })
        .unwrap();
        assert_eq!(s.get(&a, "x").unwrap(), None);
        assert!(s.get(&a, "y").unwrap().is_some());
    }
}
