//! A changelogged RocksDB backend: writes become durable in a [`Changelog`] (a Kafka
//! transaction, in `statefun-kafka`) per commit interval, and reach RocksDB only after
//! that commit, in one batch with the changelog position they bring each partition to.
//!
//! Why it exists: with state on one machine's disk, an instance's partitions cannot
//! move to another instance, and egress records cannot be committed together with the
//! state that produced them. Here the changelog is the source of truth and RocksDB a
//! materialized copy that is always at a committed point (or behind it): a crash
//! anywhere leaves RocksDB at an earlier commit, and opening the backend replays the
//! changelog's tail from the stored position (or the whole changelog into an empty
//! directory). See `docs/guarantees.md`, "Kafka mode".
//!
//! How: every [`WriteBatch`] of a partition is encoded to raw key changes
//! ([`RawOp`]s, [`codec`](super::codec)) and put into an in-memory overlay, under one lock, so a batch is
//! never split between two commits (its inbox puts may touch other partitions). Reads
//! see the overlay first, then RocksDB. Egress records of the egress ids the changelog
//! [takes](Changelog::takes_egress) are not written anywhere: they go into the commit
//! unit and are produced in the same transaction. [`StateBackend::commit`] seals the
//! overlay into a [`CommitUnit`] (the latest value per key), hands it to
//! [`Changelog::commit`], then applies it to RocksDB. A failed commit keeps the unit;
//! the next commit merges the newer writes into it and tries again, so nothing written
//! is lost and readers never see a value go back.
//!
//! A source may acknowledge only what is committed:
//! [`StateBackend::committed_progress`] reads RocksDB, not the overlay.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use statefun_sdk::{Address, TypeName};

use super::backend::{
    Admission, CheckpointInfo, Error, LogKind, LogOp, PartitionStore, StateBackend, StoredValue, WriteBatch,
};
use super::codec::keys::{self, decode_log_key, log_kind_byte, partition_incarnation_key};
use super::codec::values::{decode_u64, decode_value};
use super::codec::{RawOp, encode_batch, entries};
use super::rocksdb::RocksDbBackend;
use crate::partitioner::PartitionId;
use crate::records::LogKey;
use crate::records::{EgressId, EgressRecord};

/// Raw changes of one partition: the latest value per key (`None`: deleted), in no
/// particular order. A hash map: every write of a partition goes through it twice (into
/// the overlay, and removed again when an inbox entry is done within the interval), and
/// B-tree comparisons of the long common key prefixes were the largest single cost of
/// Kafka mode's write path.
pub type Changes = HashMap<Bytes, Option<Bytes>, ahash::RandomState>;

/// What one commit makes durable, atomically.
#[derive(Debug, Clone, Default)]
pub struct CommitUnit {
    /// Per partition, the latest value of every key changed since the last commit.
    pub changes: BTreeMap<PartitionId, Changes>,
    /// Egress records produced since the last commit, in production order per
    /// partition. Each has its [`EgressId`].
    pub egress: Vec<EgressRecord>,
    /// Cluster mode: messages to partitions this instance does not own, in the order
    /// they were sent, each with its receiving partition. The changelog delivers them
    /// to the owner (the internal topic) in the same transaction. The bytes decode with
    /// [`decode_message`](crate::ingress::decode_message).
    pub messages: Vec<(PartitionId, Bytes)>,
}

impl CommitUnit {
    /// True when there is nothing to commit.
    pub fn is_empty(&self) -> bool {
        self.changes.values().all(HashMap::is_empty) && self.egress.is_empty() && self.messages.is_empty()
    }

    /// Adds `later`'s changes and egress on top of this unit's.
    fn merge(&mut self, later: CommitUnit) {
        for (p, changes) in later.changes {
            self.changes.entry(p).or_default().extend(changes);
        }
        self.egress.extend(later.egress);
        self.messages.extend(later.messages);
    }

    /// The progress through `source` that this unit stores for `partition`, if it
    /// changes it.
    pub fn progress(&self, partition: PartitionId, source: &str) -> Option<u64> {
        let key = keys::progress_key(partition, source).ok()?;
        let value = self.get(partition, &key)?.as_ref()?;
        decode_u64(value, String::new).ok()
    }

    fn get(&self, partition: PartitionId, key: &[u8]) -> Option<&Option<Bytes>> {
        self.changes.get(&partition)?.get(key)
    }
}

/// Where a [`ChangelogBackend`] makes its writes durable.
pub trait Changelog: Send + Sync + 'static {
    /// Whether records of egress `egress` are committed by this changelog (produced in
    /// the same transaction as the state changes) instead of handed to the runtime's
    /// egress sinks.
    fn takes_egress(&self, egress: &TypeName) -> bool;

    /// Whether this changelog can commit `message` for egress `egress` (see
    /// [`StateBackend::check_egress`](super::StateBackend::check_egress)). Default: yes.
    fn check_egress(&self, _egress: &TypeName, _message: &statefun_sdk::TypedValue) -> Result<(), String> {
        Ok(())
    }

    /// Whether this changelog can commit a state value of `value.len()` bytes (see
    /// [`StateBackend::check_value`](super::StateBackend::check_value)). Default: yes.
    fn check_value(&self, _name: &str, _value: &[u8]) -> Result<(), String> {
        Ok(())
    }

    /// Makes `unit` durable, atomically: after `Ok` every change and egress record of
    /// it is committed; after `Err` none is (the backend keeps the unit and retries it,
    /// merged with later changes). Returns, per partition with changes, the changelog
    /// position of its last change. Blocking.
    fn commit(&self, unit: &CommitUnit) -> Result<Vec<(PartitionId, i64)>, Error>;

    /// Reads the committed changes of `partition` after position `after` (from the
    /// start if `None`) up to the end, in order, calling `apply` with chunks of them and
    /// the position of each chunk's last change. Blocking.
    fn restore(
        &self,
        partition: PartitionId,
        after: Option<i64>,
        apply: &mut dyn FnMut(Vec<RawOp>, i64) -> Result<(), Error>,
    ) -> Result<(), Error>;
}

/// Default bound on pending writes: 256 MiB.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 256 << 20;

struct Overlay {
    /// Writes since the last seal.
    current: CommitUnit,
    /// The sealed unit being committed (or that failed to commit); empty when idle.
    committing: Arc<CommitUnit>,
}

struct Inner {
    rocks: RocksDbBackend,
    changelog: Arc<dyn Changelog>,
    interval: Duration,
    /// The partitions restored here: all, or the owned ones.
    partitions: Vec<PartitionId>,
    /// Cluster mode: the partitions this instance owns (sorted).
    owned: Option<Vec<PartitionId>>,
    overlay: Mutex<Overlay>,
    /// One commit at a time.
    commit_lock: Mutex<()>,
    /// Bytes staged since the last seal (keys, values, egress records, messages).
    staged_bytes: AtomicUsize,
    /// Bytes of the sealed unit that has not committed yet.
    committing_bytes: AtomicUsize,
    /// Above this many pending bytes (staged plus committing), the partitions take no
    /// more input (`StateBackend::accepts_input`).
    max_pending_bytes: AtomicUsize,
}

/// RocksDB state made durable through a [`Changelog`] (module docs). Clones share the
/// database, the overlay and the changelog.
#[derive(Clone)]
pub struct ChangelogBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ChangelogBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangelogBackend")
            .field("rocks", &self.inner.rocks)
            .field("interval", &self.inner.interval)
            .finish()
    }
}

/// How far [`ChangelogBackend::open`] caught up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// Changes applied from the changelog, over all partitions.
    pub changes: u64,
}

impl ChangelogBackend {
    /// Brings `rocks` up to the end of `changelog` for partitions `0..partitions`
    /// (replaying each partition's tail after its stored position, or everything into
    /// an empty database), and returns the backend. `interval` is how often the runtime
    /// commits ([`StateBackend::commit_interval`]).
    pub fn open(
        rocks: RocksDbBackend,
        changelog: Arc<dyn Changelog>,
        partitions: u32,
        interval: Duration,
    ) -> Result<(ChangelogBackend, Restored), Error> {
        Self::restore_and_open(
            rocks,
            changelog,
            (0..partitions).map(PartitionId).collect(),
            None,
            interval,
        )
    }

    /// Cluster mode ([`StateBackend::owned_partitions`]): like [`ChangelogBackend::open`]
    /// for the partitions in `owned` only. The data RocksDB holds for other partitions
    /// stays as it is: if one of them is owned here again later, only the changelog
    /// written since is replayed.
    pub fn open_owned(
        rocks: RocksDbBackend,
        changelog: Arc<dyn Changelog>,
        owned: impl IntoIterator<Item = PartitionId>,
        interval: Duration,
    ) -> Result<(ChangelogBackend, Restored), Error> {
        let mut owned: Vec<PartitionId> = owned.into_iter().collect();
        owned.sort();
        owned.dedup();
        Self::restore_and_open(rocks, changelog, owned.clone(), Some(owned), interval)
    }

    fn restore_and_open(
        rocks: RocksDbBackend,
        changelog: Arc<dyn Changelog>,
        restore: Vec<PartitionId>,
        owned: Option<Vec<PartitionId>>,
        interval: Duration,
    ) -> Result<(ChangelogBackend, Restored), Error> {
        let mut restored = Restored::default();
        for &p in &restore {
            let after = rocks.changelog_position(p)?;
            let mut applied = 0u64;
            changelog.restore(p, after, &mut |ops, position| {
                applied += ops.len() as u64;
                rocks.apply_raw(&ops, &[(p, position)])
            })?;
            restored.changes += applied;
        }
        let backend = ChangelogBackend {
            inner: Arc::new(Inner {
                rocks,
                changelog,
                interval,
                partitions: restore,
                owned,
                overlay: Mutex::new(Overlay {
                    current: CommitUnit::default(),
                    committing: Arc::default(),
                }),
                commit_lock: Mutex::new(()),
                staged_bytes: AtomicUsize::new(0),
                committing_bytes: AtomicUsize::new(0),
                max_pending_bytes: AtomicUsize::new(DEFAULT_MAX_PENDING_BYTES),
            }),
        };
        Ok((backend, restored))
    }

    /// Sets the bound on pending writes (default [`DEFAULT_MAX_PENDING_BYTES`]): while
    /// more bytes than this wait for a commit (a broker that is away keeps them
    /// pending), the partitions take no input; messages between functions still flow.
    pub fn set_max_pending_bytes(&self, bytes: usize) {
        self.inner.max_pending_bytes.store(bytes.max(1), Ordering::Relaxed);
    }

    /// Bytes written and not committed yet (staged and committing).
    pub fn pending_bytes(&self) -> usize {
        self.inner.staged_bytes.load(Ordering::Relaxed) + self.inner.committing_bytes.load(Ordering::Relaxed)
    }

    fn owns(&self, partition: PartitionId) -> bool {
        self.inner
            .owned
            .as_ref()
            .is_none_or(|o| o.binary_search(&partition).is_ok())
    }

    /// Reads `key` of `partition` as the runtime sees it: the overlay, then RocksDB.
    fn read(&self, partition: PartitionId, key: &[u8]) -> Result<Option<Bytes>, Error> {
        {
            let o = self.inner.overlay.lock().expect("overlay lock");
            if let Some(v) = o
                .current
                .get(partition, key)
                .or_else(|| o.committing.get(partition, key))
            {
                return Ok(v.clone());
            }
        }
        self.inner.rocks.get_raw(key)
    }

    /// Adds one write to the pending writes. A log entry put and deleted before the
    /// next seal (a message processed, a timer fired or cancelled, within one
    /// interval) is dropped: its key is unique (a sequence number), so it never
    /// reached the changelog or RocksDB, and neither needs to hear of it.
    fn stage(&self, unit: CommitUnit) {
        let bytes = unit
            .changes
            .values()
            .flat_map(|c| c.iter())
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()))
            .chain(unit.egress.iter().map(|e| e.message.bytes().map_or(0, |b| b.len())))
            .chain(unit.messages.iter().map(|(_, m)| m.len()))
            .sum::<usize>();
        let mut o = self.inner.overlay.lock().expect("overlay lock");
        self.inner.staged_bytes.fetch_add(bytes, Ordering::Relaxed);
        for (p, changes) in unit.changes {
            let current = o.current.changes.entry(p).or_default();
            for (key, value) in changes {
                if value.is_none() && keys::is_log_key(&key) && matches!(current.get(&key), Some(Some(_))) {
                    current.remove(&key);
                } else {
                    current.insert(key, value);
                }
            }
        }
        o.current.egress.extend(unit.egress);
        o.current.messages.extend(unit.messages);
    }
}

/// The changelog's answers, and input stops while too much waits for a commit.
impl Admission for ChangelogBackend {
    fn takes_egress(&self, egress: &TypeName) -> bool {
        self.inner.changelog.takes_egress(egress)
    }

    fn check_egress(&self, egress: &TypeName, message: &statefun_sdk::TypedValue) -> Result<(), String> {
        self.inner.changelog.check_egress(egress, message)
    }

    fn check_value(&self, name: &str, value: &[u8]) -> Result<(), String> {
        self.inner.changelog.check_value(name, value)
    }

    fn accepts_input(&self) -> bool {
        self.pending_bytes() < self.inner.max_pending_bytes.load(Ordering::Relaxed)
    }
}

impl StateBackend for ChangelogBackend {
    fn open_partition(&self, partition: PartitionId) -> Result<Box<dyn PartitionStore>, Error> {
        Ok(Box::new(StagedStore {
            partition,
            backend: self.clone(),
        }))
    }

    /// A checkpoint of RocksDB: committed data with the changelog positions it is at.
    fn checkpoint(&self) -> Result<Option<CheckpointInfo>, Error> {
        self.inner.rocks.checkpoint()
    }

    fn durable(&self) -> bool {
        true
    }

    /// One more than the highest incarnation any owned partition was written by, stored
    /// in each of them and committed before it is returned: a partition restored on
    /// another instance never reuses a log sequence number.
    fn next_incarnation(&self) -> Result<u64, Error> {
        let mut last = 0;
        for &p in &self.inner.partitions {
            let key = partition_incarnation_key(p);
            if let Some(v) = self.read(p, &key)? {
                last = last.max(decode_u64(&v, || format!("incarnation marker of partition {p}"))?);
            }
        }
        let next = last + 1;
        let mut unit = CommitUnit::default();
        for &p in &self.inner.partitions {
            unit.changes.entry(p).or_default().insert(
                partition_incarnation_key(p).into(),
                Some(Bytes::copy_from_slice(&next.to_be_bytes())),
            );
        }
        self.stage(unit);
        self.commit()?;
        Ok(next)
    }

    fn check_partitions(&self, partitions: u32) -> Result<(), Error> {
        self.inner.rocks.check_partitions(partitions)
    }

    /// Read from RocksDB only: what is committed (module docs).
    fn committed_progress(&self, partition: PartitionId, source: &str) -> Result<Option<u64>, Error> {
        self.inner.rocks.open_partition(partition)?.progress(source)
    }

    fn owned_partitions(&self) -> Option<Vec<PartitionId>> {
        self.inner.owned.clone()
    }

    fn commit_interval(&self) -> Option<Duration> {
        Some(self.inner.interval)
    }

    fn commit(&self) -> Result<(), Error> {
        let _one = self.inner.commit_lock.lock().expect("commit lock");
        let unit = {
            let mut o = self.inner.overlay.lock().expect("overlay lock");
            let current = std::mem::take(&mut o.current);
            let sealed = self.inner.staged_bytes.swap(0, Ordering::Relaxed);
            self.inner.committing_bytes.fetch_add(sealed, Ordering::Relaxed);
            if o.committing.is_empty() {
                if current.is_empty() {
                    // What was staged cancelled out (entries put and deleted within
                    // the interval): nothing is pending.
                    self.inner.committing_bytes.store(0, Ordering::Relaxed);
                    return Ok(());
                }
                o.committing = Arc::new(current);
            } else {
                let mut merged = CommitUnit::clone(&o.committing);
                merged.merge(current);
                o.committing = Arc::new(merged);
            }
            Arc::clone(&o.committing)
        };
        let positions = self.inner.changelog.commit(&unit)?;
        let ops: Vec<RawOp> = unit
            .changes
            .values()
            .flat_map(|c| {
                c.iter().map(|(k, v)| RawOp {
                    key: k.clone(),
                    value: v.clone(),
                })
            })
            .collect();
        let applied = self.inner.rocks.apply_raw(&ops, &positions);
        let mut o = self.inner.overlay.lock().expect("overlay lock");
        // Committed to the changelog: no longer pending, whatever RocksDB says.
        self.inner.committing_bytes.store(0, Ordering::Relaxed);
        o.committing = match applied {
            Ok(()) => Arc::default(),
            // Committed: the egress records must not be produced again. The changes
            // stay readable and are committed again (same values) with the next unit.
            Err(_) => Arc::new(CommitUnit {
                changes: unit.changes.clone(),
                ..CommitUnit::default()
            }),
        };
        applied
    }
}

/// One partition's view: the overlay over the committed data.
struct StagedStore {
    partition: PartitionId,
    backend: ChangelogBackend,
}

impl StagedStore {
    /// The egress record a log put carries, if the changelog takes its egress id.
    /// Entries that do not decode as egress records are stored like any log entry:
    /// the store keeps log values opaque.
    fn taken_egress(&self, op: &LogOp) -> Option<EgressRecord> {
        let (LogKey::Egress { seq }, Some(value)) = (op.key, &op.value) else {
            return None;
        };
        let (mut record, run) = entries::decode_egress(value).ok()?;
        if !self.backend.inner.changelog.takes_egress(&record.egress) {
            return None;
        }
        record.id = Some(EgressId {
            run,
            partition: op.partition,
            seq,
        });
        Some(record)
    }
}

impl PartitionStore for StagedStore {
    fn get(&self, address: &Address, name: &str) -> Result<Option<StoredValue>, Error> {
        let key = keys::state_key(self.partition, address, name);
        match self.backend.read(self.partition, &key)? {
            None => Ok(None),
            Some(v) => decode_value(&v)
                .map(Some)
                .map_err(|e| Error::Permanent(format!("corrupt value of {address} state {name:?}: {e}"))),
        }
    }

    fn write(&mut self, mut batch: WriteBatch) -> Result<(), Error> {
        batch.check_egress_taken(|e| self.backend.inner.changelog.takes_egress(e))?;
        let mut unit = CommitUnit {
            egress: std::mem::take(&mut batch.egress),
            ..CommitUnit::default()
        };
        let log = std::mem::take(&mut batch.log);
        let own = unit.changes.entry(self.partition).or_default();
        for op in encode_batch(self.partition, &batch)? {
            own.insert(op.key, op.value);
        }
        // Log entries may belong to another partition (a message into its inbox).
        for op in log {
            if !self.backend.owns(op.partition) {
                // Cluster mode: a message for a partition owned elsewhere travels in
                // the commit, to its owner.
                match (op.key, op.value) {
                    (LogKey::Inbox { .. }, Some(message)) => unit.messages.push((op.partition, message)),
                    (key, _) => {
                        return Err(Error::Permanent(format!(
                            "partition {} wrote {key:?} of partition {}, which this instance does not own",
                            self.partition, op.partition
                        )));
                    }
                }
                continue;
            }
            match self.taken_egress(&op) {
                Some(record) => unit.egress.push(record),
                None => {
                    let key = keys::log_key(op.partition, op.key).into();
                    unit.changes.entry(op.partition).or_default().insert(key, op.value);
                }
            }
        }
        self.backend.stage(unit);
        Ok(())
    }

    fn progress(&self, source: &str) -> Result<Option<u64>, Error> {
        let key = keys::progress_key(self.partition, source).map_err(|e| Error::Permanent(e.to_string()))?;
        match self.backend.read(self.partition, &key)? {
            None => Ok(None),
            Some(v) => decode_u64(&v, || format!("progress marker of {source:?}")).map(Some),
        }
    }

    fn log(&self, kind: LogKind) -> Result<Vec<(LogKey, Bytes)>, Error> {
        // No commit may move data from the overlay into RocksDB between the scan and
        // the overlay read below.
        let _no_commit = self.backend.inner.commit_lock.lock().expect("commit lock");
        let prefix = keys::partition_prefix(log_kind_byte(kind), self.partition);
        let path = self.backend.inner.rocks.path();
        let mut entries: HashMap<LogKey, Bytes> = HashMap::new();
        for (key, value) in self.backend.inner.rocks.scan_raw(&prefix)? {
            entries.insert(decode_log_key(&key, self.partition, path)?, value);
        }
        let o = self.backend.inner.overlay.lock().expect("overlay lock");
        for layer in [&*o.committing, &o.current] {
            if let Some(changes) = layer.changes.get(&self.partition) {
                for (key, value) in changes.iter().filter(|(k, _)| k.starts_with(&prefix)) {
                    let k = decode_log_key(key, self.partition, path)?;
                    match value {
                        Some(v) => entries.insert(k, v.clone()),
                        None => entries.remove(&k),
                    };
                }
            }
        }
        let mut out: Vec<_> = entries.into_iter().collect();
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }
}
