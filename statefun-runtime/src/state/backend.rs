//! The state boundary: what a backend is ([`StateBackend`], read once as a
//! [`BackendProfile`]), what the partition asks before it writes ([`Admission`]), one
//! partition's store ([`PartitionStore`]) and the plain values that cross it (a
//! [`WriteBatch`] of [`WriteOp`]s and [`LogOp`]s, [`StoredValue`], [`Error`]).
//!
//! Why it exists: the backends (`memory`, `rocksdb`, `changelog`), the codec and the
//! partition all meet here; in a file of its own (re-exported by `state`), none of them
//! imports another, and `state`'s module file only wires them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use statefun_sdk::Address;

use crate::partitioner::PartitionId;
use crate::records::LogKey;

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

/// Put (`Some`) or delete (`None`) a durable log entry: a message in an inbox, a pending
/// timer, an egress record. `partition` may be another partition than the writer's:
/// a message to another partition is put into the receiver's inbox in the sender's
/// commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogOp {
    /// The partition whose log holds the entry.
    pub partition: PartitionId,
    /// The entry.
    pub key: LogKey,
    /// The encoded entry, or `None` to delete it.
    pub value: Option<Bytes>,
}

impl LogOp {
    /// Put `value` as entry `key` of `partition`'s log.
    pub fn put(partition: PartitionId, key: LogKey, value: Bytes) -> LogOp {
        LogOp {
            partition,
            key,
            value: Some(value),
        }
    }

    /// Delete entry `key` of `partition`'s log.
    pub fn delete(partition: PartitionId, key: LogKey) -> LogOp {
        LogOp {
            partition,
            key,
            value: None,
        }
    }
}

/// State changes, progress markers and log entries, applied atomically: after a crash
/// either all of them are visible or none is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// The operations, applied in order.
    pub ops: Vec<WriteOp>,
    /// Progress markers: `(source, position consumed up to)`, stored with the state they
    /// produced so recovery restarts from exactly there.
    pub progress: Vec<(String, u64)>,
    /// Log entries put or deleted, applied in order.
    pub log: Vec<LogOp>,
    /// Egress records the backend commits with this write, each with its id: only for
    /// egress ids the backend [takes](StateBackend::takes_egress) (a changelog backend,
    /// which produces them in its commit; they need no egress log entry). A backend
    /// that takes no egress refuses a write that carries some.
    pub egress: Vec<crate::egress::EgressRecord>,
}

impl WriteBatch {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.progress.is_empty() && self.log.is_empty() && self.egress.is_empty()
    }

    /// An error if the write carries a record of an egress id that `takes` (what the
    /// backend [takes](StateBackend::takes_egress)) refuses.
    pub(crate) fn check_egress_taken(&self, takes: impl Fn(&statefun_sdk::TypeName) -> bool) -> Result<(), Error> {
        match self.egress.iter().find(|r| !takes(&r.egress)) {
            None => Ok(()),
            Some(r) => Err(Error::Permanent(format!(
                "a write carries records of egress {}, which this state backend does not take",
                r.egress
            ))),
        }
    }
}

/// Which durable log of a partition to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// Messages accepted and not yet processed.
    Inbox,
    /// Pending delayed messages.
    Timers,
    /// Egress records not yet handed to their sink.
    Egress,
}

impl LogKind {
    pub(super) fn matches(self, key: &LogKey) -> bool {
        matches!(
            (self, key),
            (LogKind::Inbox, LogKey::Inbox { .. })
                | (LogKind::Timers, LogKey::Timer { .. })
                | (LogKind::Egress, LogKey::Egress { .. })
        )
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
    /// Every entry of one of this partition's logs, in key order. Read on recovery.
    fn log(&self, kind: LogKind) -> Result<Vec<(LogKey, Bytes)>, Error>;
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

/// What a backend is, read once as one value: whether its state outlives the process,
/// how often it wants its writes committed, and which partitions run here. Built from
/// [`StateBackend::durable`], [`StateBackend::commit_interval`] and
/// [`StateBackend::owned_partitions`] by [`StateBackend::profile`]; the default is a
/// volatile backend with no commits that runs every partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendProfile {
    /// [`StateBackend::durable`].
    pub durable: bool,
    /// [`StateBackend::commit_interval`].
    pub commit_interval: Option<Duration>,
    /// [`StateBackend::owned_partitions`].
    pub owned_partitions: Option<Vec<PartitionId>>,
}

/// What the partition asks a backend before it writes: whether to take input at all,
/// and whether each new state value and each egress record of an invocation can be
/// committed. A `false` or an `Err` here turns into back-pressure, a failed (retried)
/// invocation or a dead letter, instead of a write the backend would refuse.
///
/// A supertrait of [`StateBackend`]: a backend that takes everything (the defaults)
/// implements it with an empty `impl Admission for MyBackend {}`. The partition's commit
/// planner reads a backend only through it.
pub trait Admission: Send + Sync {
    /// Whether the backend commits the records of egress `egress` itself, with the
    /// state changes that produced them (a durable backend whose writes are logged as
    /// egress entries; see [`changelog`](crate::state::changelog)). The runtime then does not hand them to an
    /// egress sink. Default: false.
    fn takes_egress(&self, _egress: &statefun_sdk::TypeName) -> bool {
        false
    }

    /// Whether the backend would commit this record of egress `egress` (one it
    /// [takes](Admission::takes_egress)); `Err` says why not, and the runtime
    /// dead-letters the record instead of writing it. Called before the batch's write.
    /// Default: every record is fine.
    fn check_egress(
        &self,
        _egress: &statefun_sdk::TypeName,
        _message: &statefun_sdk::TypedValue,
    ) -> Result<(), String> {
        Ok(())
    }

    /// Whether the backend can store this new value of state `name`; `Err` says why not,
    /// and the invocation fails (retried, then its address parked) instead of the
    /// write. Called before the batch's write. Default: every value is fine.
    fn check_value(&self, _name: &str, _value: &[u8]) -> Result<(), String> {
        Ok(())
    }

    /// Whether the partitions may take more input now. A backend whose writes wait for
    /// a commit says no while too much is pending (a broker that is away); the runtime
    /// then stops taking ingress records, checking again every 20 ms, while messages
    /// between functions keep flowing. Default: always.
    fn accepts_input(&self) -> bool {
        true
    }
}

/// Opens partition stores.
pub trait StateBackend: Admission + Send + Sync + 'static {
    /// Opens the store of `partition`. Called once per partition when the runtime starts.
    fn open_partition(&self, partition: PartitionId) -> Result<Box<dyn PartitionStore>, Error>;

    /// Takes a checkpoint if the backend supports them (`Ok(None)` otherwise). Blocking:
    /// the runtime calls it from `spawn_blocking`.
    fn checkpoint(&self) -> Result<Option<CheckpointInfo>, Error> {
        Ok(None)
    }

    /// Whether the state outlives the process. Only then does the runtime write its
    /// inboxes, timers and egress log through the backend (exactly-once across crashes);
    /// for a volatile backend that work would buy nothing. Default: false.
    fn durable(&self) -> bool {
        false
    }

    /// A number that grows with every call, durably: the runtime takes one per build
    /// and builds its log sequence numbers on it, so entries written by a later run
    /// sort after (and never collide with) entries left by an earlier one, also when
    /// the same backend value is used for several runs. Default: 0 (volatile
    /// backends, whose logs do not outlive the run).
    fn next_incarnation(&self) -> Result<u64, Error> {
        Ok(0)
    }

    /// Checks that the stored state was written with `partitions` partitions (and
    /// records the count if nothing was stored yet). A durable backend must refuse a
    /// different count: the inboxes and timers on disk are keyed by partition.
    /// Default: accepts any count.
    fn check_partitions(&self, _partitions: u32) -> Result<(), Error> {
        Ok(())
    }

    /// The last position stored for `source` in `partition` that is durable: what a
    /// source may acknowledge upstream. Default: what the partition's store returns
    /// (every write is durable when it returns).
    fn committed_progress(&self, partition: PartitionId, source: &str) -> Result<Option<u64>, Error> {
        self.open_partition(partition)?.progress(source)
    }

    /// How often the runtime calls [`StateBackend::commit`]: `Some` for a backend whose
    /// writes become durable only when committed. Default: `None`.
    fn commit_interval(&self) -> Option<std::time::Duration> {
        None
    }

    /// The partitions that run on this instance when the partitions are spread over
    /// several instances (Kafka's cluster mode, `statefun-kafka`): `Some` switches the
    /// runtime to cluster mode. Only these partitions get a task and a store; messages
    /// to the others leave through the backend's commit
    /// ([`changelog::CommitUnit::messages`]), and an ingress record is accepted by the
    /// partition numbered like its source partition (modulo the partition count), so
    /// that the progress through one source partition lives in one runtime partition
    /// and moves with it. Default: `None`, every partition runs here.
    fn owned_partitions(&self) -> Option<Vec<PartitionId>> {
        None
    }

    /// Makes every write so far durable (blocking). Called every
    /// [`StateBackend::commit_interval`] and once more when the runtime stops. An error
    /// loses nothing: the writes stay pending and the next call tries again. Default:
    /// nothing to do.
    fn commit(&self) -> Result<(), Error> {
        Ok(())
    }

    /// What this backend is ([`BackendProfile`]), read once from
    /// [`StateBackend::durable`], [`StateBackend::commit_interval`] and
    /// [`StateBackend::owned_partitions`].
    fn profile(&self) -> BackendProfile {
        BackendProfile {
            durable: self.durable(),
            commit_interval: self.commit_interval(),
            owned_partitions: self.owned_partitions(),
        }
    }
}
