//! The shared context of a running runtime: what the partitions, the ingresses and the
//! handles all reach (configuration, functions, partition queues, sinks, the backend,
//! the outstanding-message count), and the items of a partition's queues.
//!
//! Why it exists: the partitions, the ingress sinks and the runtime's handle meet here
//! without importing each other (`docs/architecture.md`, "Module layers").
//!
//! Invariant (idle detection): `outstanding` counts messages accepted but not yet
//! finished (processed, or dead-lettered). A producer of new messages adds them before
//! it subtracts what it finished, so the count reaches zero only when nothing is queued
//! or in flight anywhere. Delayed messages that are not due yet are not counted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use statefun_sdk::{Address, Module, TypeName};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::RuntimeConfig;
use crate::egress::{DeadLetterSink, Egress};
use crate::envelope::Envelope;
use crate::errors::QueryError;
use crate::metrics;
use crate::partitioner::{PartitionId, partition_for};
use crate::records::{DeadLetter, DeadLetterReason};
use crate::state::{BackendProfile, StateBackend};
use crate::stats::PartitionStats;

/// Requests answered by the partition between invocations.
pub(crate) enum Control {
    GetState {
        address: Address,
        name: String,
        reply: oneshot::Sender<Result<Option<Bytes>, QueryError>>,
    },
    Unpark {
        address: Address,
        reply: oneshot::Sender<bool>,
    },
    Parked {
        reply: oneshot::Sender<Vec<(Address, String)>>,
    },
    Stats {
        reply: oneshot::Sender<PartitionStats>,
    },
}

pub(crate) enum Inbound {
    Message(Envelope),
    Control(Control),
}

pub(crate) struct PartitionSender {
    pub(crate) ingress: mpsc::Sender<Envelope>,
    pub(crate) inbound: mpsc::UnboundedSender<Inbound>,
}

/// Milliseconds for state expiry: wall-clock at start plus tokio-clock elapsed time, so
/// it is meaningful across restarts and still follows paused time in tests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    base_wall_ms: u64,
    base: tokio::time::Instant,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock {
            base_wall_ms: wall,
            base: tokio::time::Instant::now(),
        }
    }

    pub(crate) fn now_ms(&self) -> u64 {
        self.base_wall_ms + self.base.elapsed().as_millis() as u64
    }
}

/// State shared by the partitions, the ingresses and the handles. Read-mostly.
pub(crate) struct Shared {
    pub(crate) config: RuntimeConfig,
    pub(crate) module: Module,
    /// Per partition: its queues, or `None` for a partition owned by another instance
    /// (cluster mode).
    pub(crate) partitions: Vec<Option<PartitionSender>>,
    pub(crate) egresses: HashMap<TypeName, Arc<dyn Egress>>,
    pub(crate) dead_letters: Arc<dyn DeadLetterSink>,
    pub(crate) outstanding: AtomicU64,
    pub(crate) idle: Notify,
    pub(crate) clock: Clock,
    /// Set when shutdown begins; new outside messages are refused from then on.
    pub(crate) stopping: AtomicBool,
    pub(crate) backend: Arc<dyn StateBackend>,
    /// What the backend is (durable, commit interval, owned partitions), read once.
    pub(crate) profile: BackendProfile,
    /// Random id of this run, part of every egress record id.
    pub(crate) run_id: u64,
    /// This run's incarnation: the high bits of every log sequence number.
    pub(crate) incarnation: u64,
}

/// A random 64-bit id: std's randomly keyed hasher over the time and the process id.
pub(crate) fn random_run_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

pub(crate) enum SubmitError {
    UnknownFunctionType(Box<Envelope>),
    ShuttingDown,
    /// Cluster mode: the partition that must accept the message runs elsewhere.
    NotOwned(PartitionId),
}

impl Shared {
    /// Cluster mode: the backend owns some of the partitions
    /// ([`StateBackend::owned_partitions`]); the others run on other instances.
    pub(crate) fn cluster(&self) -> bool {
        self.profile.owned_partitions.is_some()
    }

    pub(crate) fn partition_of(&self, address: &Address) -> PartitionId {
        partition_for(address.id(), self.config.partitions)
    }

    /// Counts `n` new messages as outstanding.
    pub(crate) fn begin(&self, n: usize) {
        if n > 0 {
            self.outstanding.fetch_add(n as u64, Ordering::SeqCst);
        }
    }

    /// Counts `n` messages as finished.
    pub(crate) fn finish(&self, n: usize) {
        if n == 0 {
            return;
        }
        let prev = self.outstanding.fetch_sub(n as u64, Ordering::SeqCst);
        debug_assert!(prev >= n as u64, "outstanding underflow: {prev} - {n}");
        if prev == n as u64 {
            self.idle.notify_waiters();
        }
    }

    pub(crate) fn dead_letter(&self, d: DeadLetter) {
        ::metrics::counter!(metrics::DEAD_LETTERS).increment(1);
        self.dead_letters.send(d);
    }

    /// Whether partition `p` runs on this instance.
    pub(crate) fn owns(&self, p: PartitionId) -> bool {
        self.partitions.get(p.0 as usize).is_some_and(Option::is_some)
    }

    /// The partitions that run on this instance.
    pub(crate) fn owned(&self) -> impl Iterator<Item = PartitionId> + '_ {
        (0..self.config.partitions).map(PartitionId).filter(|p| self.owns(*p))
    }

    /// Cluster mode: the runtime partition that accepts the records of source
    /// partition `partition` (and stores the progress through it).
    pub(crate) fn source_acceptor(&self, partition: i32) -> PartitionId {
        PartitionId(partition.unsigned_abs() % self.config.partitions)
    }

    /// The partition that accepts a message from outside: its target's partition; in
    /// cluster mode `acceptor` (an ingress record's source partition, so that progress
    /// through a source partition lives in one runtime partition), or the target's
    /// partition when it runs here, or else the first partition that runs here, which
    /// forwards it.
    fn acceptor(&self, target: PartitionId, acceptor: Option<PartitionId>) -> PartitionId {
        if !self.cluster() {
            return target;
        }
        match acceptor {
            Some(a) => a,
            None if self.owns(target) => target,
            None => self.owned().next().unwrap_or(target),
        }
    }

    /// Accepts a message from outside (ingress or handle), waiting for room in the
    /// queue of the accepting partition (see `acceptor`), which it returns.
    pub(crate) async fn submit(
        &self,
        env: Envelope,
        acceptor: Option<PartitionId>,
    ) -> Result<PartitionId, SubmitError> {
        if self.module.get(env.target.type_name()).is_none() {
            return Err(SubmitError::UnknownFunctionType(Box::new(env)));
        }
        // Count first, then check: with both SeqCst, either shutdown sees this message
        // in `outstanding` and drains it, or this sees `stopping` and refuses it.
        self.begin(1);
        if self.stopping.load(Ordering::SeqCst) {
            self.finish(1);
            return Err(SubmitError::ShuttingDown);
        }
        let p = self.acceptor(self.partition_of(&env.target), acceptor);
        let Some(Some(queues)) = self.partitions.get(p.0 as usize) else {
            self.finish(1);
            return Err(SubmitError::NotOwned(p));
        };
        match queues.ingress.send(env).await {
            Ok(()) => Ok(p),
            Err(mpsc::error::SendError(_)) => {
                self.finish(1);
                Err(SubmitError::ShuttingDown)
            }
        }
    }

    /// Sends an already-counted message to another partition. In cluster mode, a
    /// message for a partition that runs elsewhere is finished here: it is in the
    /// sender's write, which the commit delivers to the owner.
    pub(crate) fn send_internal(&self, p: PartitionId, env: Envelope) {
        let Some(queues) = &self.partitions[p.0 as usize] else {
            debug_assert!(env.inbox.is_some(), "a message to another instance must be in a write");
            self.finish(1);
            return;
        };
        if let Err(mpsc::error::SendError(Inbound::Message(env))) = queues.inbound.send(Inbound::Message(env)) {
            self.dead_letter(DeadLetter {
                reason: DeadLetterReason::ShuttingDown,
                caller: env.caller,
                target: Some(env.target),
                message: Some(env.message),
                record: None,
            });
            self.finish(1);
        }
    }
}
