//! [`MemoryBackend`]: state in memory, the embedded default.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use statefun_sdk::Address;

use super::backend::{Admission, Error, LogKind, PartitionStore, StateBackend, StoredValue, WriteBatch};
use crate::partitioner::PartitionId;
use crate::records::LogKey;

type SharedLogs = Arc<Mutex<HashMap<PartitionId, BTreeMap<LogKey, Bytes>>>>;

/// In-memory state: fast, shipped for tests, benchmarks and the embedded default. State
/// is lost when the runtime stops. The logs (written to another partition's inbox, so
/// shared behind a lock) exist for the conformance suite; the runtime does not write
/// them to a volatile backend.
#[derive(Debug, Clone, Default)]
pub struct MemoryBackend {
    logs: SharedLogs,
}

impl MemoryBackend {
    /// A new in-memory backend.
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }
}

/// Takes every value and record, and input at any time.
impl Admission for MemoryBackend {}

impl StateBackend for MemoryBackend {
    fn open_partition(&self, partition: PartitionId) -> Result<Box<dyn PartitionStore>, Error> {
        Ok(Box::new(MemoryStore {
            partition,
            values: HashMap::default(),
            progress: HashMap::new(),
            logs: Arc::clone(&self.logs),
        }))
    }
}

/// One partition's in-memory state: address -> (state name -> value).
#[derive(Debug)]
pub struct MemoryStore {
    partition: PartitionId,
    values: HashMap<Address, Vec<(Arc<str>, StoredValue)>, ahash::RandomState>,
    progress: HashMap<String, u64>,
    logs: SharedLogs,
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
        batch.check_egress_taken(|_| false)?;
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
        if !batch.log.is_empty() {
            let mut logs = self.logs.lock().expect("log lock");
            for op in batch.log {
                let log = logs.entry(op.partition).or_default();
                match op.value {
                    Some(v) => {
                        log.insert(op.key, v);
                    }
                    None => {
                        log.remove(&op.key);
                    }
                }
            }
        }
        Ok(())
    }

    fn progress(&self, source: &str) -> Result<Option<u64>, Error> {
        Ok(self.progress.get(source).copied())
    }

    fn log(&self, kind: LogKind) -> Result<Vec<(LogKey, Bytes)>, Error> {
        let logs = self.logs.lock().expect("log lock");
        Ok(logs
            .get(&self.partition)
            .map(|l| {
                l.iter()
                    .filter(|(k, _)| kind.matches(k))
                    .map(|(k, v)| (*k, v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::state::*;
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
            ..Default::default()
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
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.get(&a, "x").unwrap(), None);
        assert!(s.get(&a, "y").unwrap().is_some());
    }

    #[test]
    fn a_memory_backend_profiles_as_volatile_and_admits_everything() {
        let b = MemoryBackend::new();
        assert_eq!(b.profile(), BackendProfile::default());
        let dynamic: Arc<dyn StateBackend> = Arc::new(b);
        let out = TypeName::from_static("io/out");
        assert!(Admission::accepts_input(&*dynamic));
        assert!(!Admission::takes_egress(&*dynamic, &out));
        assert_eq!(Admission::check_value(&*dynamic, "s", b"v"), Ok(()));
        assert_eq!(
            Admission::check_egress(&*dynamic, &out, &statefun_sdk::TypedValue::absent(out.clone())),
            Ok(())
        );
    }

    #[cfg(feature = "rocksdb")]
    #[test]
    fn durable_backends_profile_as_what_they_are() {
        use std::time::Duration;

        /// A changelog that commits nothing and takes only `io/taken`.
        struct Nothing;
        impl Changelog for Nothing {
            fn takes_egress(&self, egress: &TypeName) -> bool {
                egress.as_str() == "io/taken"
            }
            fn check_value(&self, _name: &str, value: &[u8]) -> Result<(), String> {
                if value.len() > 4 {
                    Err("too long".to_owned())
                } else {
                    Ok(())
                }
            }
            fn commit(&self, _unit: &CommitUnit) -> Result<Vec<(PartitionId, i64)>, Error> {
                Ok(Vec::new())
            }
            fn restore(
                &self,
                _partition: PartitionId,
                _after: Option<i64>,
                _apply: &mut dyn FnMut(Vec<RawOp>, i64) -> Result<(), Error>,
            ) -> Result<(), Error> {
                Ok(())
            }
        }

        let dir = tempfile::tempdir().unwrap();
        let rocks = RocksDbBackend::open(dir.path().join("db"), RocksDbOptions::default()).unwrap();
        assert_eq!(
            rocks.profile(),
            BackendProfile {
                durable: true,
                commit_interval: None,
                owned_partitions: None,
            }
        );
        let interval = Duration::from_millis(50);
        let (all, _) = ChangelogBackend::open(rocks.clone(), Arc::new(Nothing), 2, interval).unwrap();
        assert_eq!(
            all.profile(),
            BackendProfile {
                durable: true,
                commit_interval: Some(interval),
                owned_partitions: None,
            }
        );
        let (owned, _) = ChangelogBackend::open_owned(
            rocks,
            Arc::new(Nothing),
            [PartitionId(3), PartitionId(1), PartitionId(3)],
            interval,
        )
        .unwrap();
        assert_eq!(
            owned.profile().owned_partitions,
            Some(vec![PartitionId(1), PartitionId(3)])
        );
        // Admission forwards to the backend's answers.
        assert!(Admission::takes_egress(&owned, &TypeName::from_static("io/taken")));
        assert!(!Admission::takes_egress(&owned, &TypeName::from_static("io/other")));
        assert_eq!(Admission::check_value(&owned, "s", b"1234"), Ok(()));
        assert!(Admission::check_value(&owned, "s", b"12345").is_err());
    }
}
