//! The runtime: builder, the run loop with graceful shutdown, and the cloneable handle.
//!
//! Why it exists: this is where the pieces are wired. [`RuntimeBuilder`] takes the
//! functions ([`Module`]), the state backend, ingresses with their routers, egresses and
//! the dead-letter sink; [`Runtime::run`] starts one task per partition and one per
//! ingress and, when `shutdown` resolves, stops the ingresses, lets every accepted
//! message finish (including the messages those produce), then stops the partitions.
//! [`RuntimeHandle`] talks to a running runtime through channels: send messages, wait
//! until idle, query state, list and unpark parked addresses, read statistics.
//!
//! Invariant (idle detection): `outstanding` counts messages accepted but not yet
//! finished (processed, or dead-lettered). A producer of new messages adds them before
//! it subtracts what it finished, so the count reaches zero only when nothing is queued
//! or in flight anywhere. Delayed messages that are not due yet are not counted.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use statefun_sdk::{Address, Module, TypeName, TypedValue, ValueSpec, ValueType};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, RuntimeConfig};
use crate::egress::{DeadLetter, DeadLetterSink, Egress, LoggingDeadLetters};
use crate::ingress::{Ingress, IngressSink, Router};
use crate::metrics;
use crate::partition::{Control, Inbound, Partition, PartitionStats};
use crate::partitioner::{PartitionId, partition_for};
use crate::state::{self, MemoryBackend, StateBackend};

/// A message on its way to an address.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    pub(crate) target: Address,
    pub(crate) caller: Option<Address>,
    pub(crate) message: TypedValue,
    /// Its key in the receiving partition's durable inbox, once it is there (durable
    /// backends only). The commit that processes the message deletes it.
    pub(crate) inbox: Option<crate::state::LogKey>,
    /// Source and offset of an ingress record (`"topic/partition"`, offset): the
    /// partition skips records at or below the progress it has stored for the source.
    pub(crate) position: Option<(Arc<str>, u64)>,
    /// More receivers of the same ingress record ([`Routed::also`](crate::Routed)): the
    /// accepting partition makes one message per receiver, all in the write that
    /// accepts the record. Empty for everything else.
    pub(crate) also: Vec<Address>,
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
    fn new() -> Clock {
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
    /// Cluster mode ([`StateBackend::owned_partitions`]).
    pub(crate) cluster: bool,
    pub(crate) egresses: HashMap<TypeName, Arc<dyn Egress>>,
    dead_letters: Arc<dyn DeadLetterSink>,
    outstanding: AtomicU64,
    idle: Notify,
    pub(crate) clock: Clock,
    /// Set when shutdown begins; new outside messages are refused from then on.
    stopping: AtomicBool,
    pub(crate) backend: Arc<dyn StateBackend>,
    /// Random id of this run, part of every egress record id.
    pub(crate) run_id: u64,
    /// This run's incarnation: the high bits of every log sequence number.
    pub(crate) incarnation: u64,
}

/// A random 64-bit id: std's randomly keyed hasher over the time and the process id.
fn random_run_id() -> u64 {
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
        if !self.cluster {
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
                reason: crate::egress::DeadLetterReason::ShuttingDown,
                caller: env.caller,
                target: Some(env.target),
                message: Some(env.message),
                record: None,
            });
            self.finish(1);
        }
    }
}

/// Why the runtime could not be built or failed while running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid (operator's fault; fix the config).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No module was given (programmer's fault).
    #[error("no functions registered: call RuntimeBuilder::module")]
    NoModule,
    /// The state backend failed to open a partition.
    #[error("cannot open state of partition {partition}: {source}")]
    State {
        /// The partition.
        partition: PartitionId,
        /// The backend's error.
        #[source]
        source: state::Error,
    },
    /// A partition task ended unexpectedly (an internal bug; please report it).
    #[error("partition task failed: {0}")]
    Internal(String),
    /// An egress sink is registered, but the state backend commits per interval
    /// ([`StateBackend::commit_interval`](state::StateBackend::commit_interval)) and
    /// does not take this egress: its records would leave before the state that
    /// produced them is committed, and a crash would produce them again under new ids.
    #[error(
        "egress {0} has a sink, but the state backend commits per interval and does not commit this egress: \
         commit it with the backend (e.g. KafkaChangelogConfig::egress) instead of registering a sink"
    )]
    EgressOutsideCommit(TypeName),
    /// The state backend could not commit (see [`StateBackend::commit`](state::StateBackend::commit)): a permanent
    /// failure during the run, or any failure of the final commit at shutdown. What was
    /// not committed is redone from the last commit when the runtime starts again.
    #[error("cannot commit state: {0}")]
    Commit(#[source] state::Error),
}

/// Why a message could not be sent through a [`RuntimeHandle`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No function is registered for the target's type.
    #[error("no function registered for type {0}")]
    UnknownFunctionType(TypeName),
    /// The runtime is stopping or stopped.
    #[error("runtime is shutting down")]
    ShuttingDown,
    /// Cluster mode: no partition runs on this instance (now), so none can accept it.
    #[error("partition {0} does not run on this instance")]
    NotOwned(PartitionId),
    /// The value could not be encoded.
    #[error(transparent)]
    Codec(#[from] statefun_sdk::CodecError),
}

/// Why a query through a [`RuntimeHandle`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The runtime is not running.
    #[error("runtime is not running")]
    NotRunning,
    /// Cluster mode: the partition asked about runs on another instance.
    #[error("partition {0} does not run on this instance")]
    NotOwned(PartitionId),
    /// The function type is unknown or does not declare this state.
    #[error("state {name:?} is not declared by {function}")]
    Undeclared {
        /// The function type.
        function: TypeName,
        /// The state name.
        name: String,
    },
    /// The state backend failed.
    #[error(transparent)]
    State(#[from] state::Error),
    /// The stored value does not decode as the requested type.
    #[error(transparent)]
    Codec(#[from] statefun_sdk::CodecError),
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Final statistics of each partition.
    pub partitions: Vec<PartitionStats>,
    /// Errors the ingresses stopped with.
    pub ingress_errors: Vec<String>,
    /// False if the drain timeout expired with messages still outstanding.
    pub drained: bool,
}

impl RunReport {
    /// Invocations over all partitions.
    pub fn invocations(&self) -> u64 {
        self.partitions.iter().map(|p| p.invocations).sum()
    }
}

/// Builds a [`Runtime`].
pub struct RuntimeBuilder {
    config: RuntimeConfig,
    module: Option<Module>,
    backend: Arc<dyn StateBackend>,
    ingresses: Vec<(Box<dyn Ingress>, Arc<dyn Router>)>,
    egresses: HashMap<TypeName, Arc<dyn Egress>>,
    dead_letters: Arc<dyn DeadLetterSink>,
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("config", &self.config)
            .field("ingresses", &self.ingresses.len())
            .field("egresses", &self.egresses.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for RuntimeBuilder {
    fn default() -> Self {
        RuntimeBuilder {
            config: RuntimeConfig::default(),
            module: None,
            backend: Arc::new(MemoryBackend::new()),
            ingresses: Vec::new(),
            egresses: HashMap::new(),
            dead_letters: Arc::new(LoggingDeadLetters),
        }
    }
}

impl RuntimeBuilder {
    /// Uses `config` (default: [`RuntimeConfig::default`]).
    pub fn config(mut self, config: RuntimeConfig) -> Self {
        self.config = config;
        self
    }

    /// The functions to run (required).
    pub fn module(mut self, module: Module) -> Self {
        self.module = Some(module);
        self
    }

    /// Where state lives (default: [`MemoryBackend`]).
    pub fn state_backend(mut self, backend: impl StateBackend) -> Self {
        self.backend = Arc::new(backend);
        self
    }

    /// Adds an ingress whose records `router` routes.
    pub fn ingress(mut self, ingress: impl Ingress, router: impl Router) -> Self {
        self.ingresses.push((Box::new(ingress), Arc::new(router)));
        self
    }

    /// Registers `egress` under the id functions use in `send_egress`.
    pub fn egress(mut self, id: TypeName, egress: impl Egress) -> Self {
        self.egresses.insert(id, Arc::new(egress));
        self
    }

    /// Where undeliverable messages go (default: [`LoggingDeadLetters`]).
    pub fn dead_letters(mut self, sink: impl DeadLetterSink) -> Self {
        self.dead_letters = Arc::new(sink);
        self
    }

    /// Validates the configuration and opens the state of every partition.
    pub fn build(self) -> Result<Runtime, Error> {
        self.config.validate()?;
        let module = self.module.ok_or(Error::NoModule)?;
        let n = self.config.partitions;
        let durable_err = |source| Error::State {
            partition: PartitionId(0),
            source,
        };
        if self.backend.commit_interval().is_some()
            && let Some(id) = self.egresses.keys().find(|id| !self.backend.takes_egress(id))
        {
            return Err(Error::EgressOutsideCommit(id.clone()));
        }
        self.backend.check_partitions(n).map_err(durable_err)?;
        let incarnation = self.backend.next_incarnation().map_err(durable_err)?;
        let owned = self.backend.owned_partitions();
        if let Some(p) = owned.iter().flatten().find(|p| p.0 >= n) {
            return Err(Error::Config(ConfigError {
                field: "partitions",
                reason: format!("the state backend owns partition {p}, but the runtime has {n} partitions"),
            }));
        }
        let mut senders = Vec::with_capacity(n as usize);
        let mut receivers = Vec::with_capacity(n as usize);
        for p in 0..n {
            if owned.as_ref().is_some_and(|o| !o.contains(&PartitionId(p))) {
                senders.push(None);
                continue;
            }
            let store = self
                .backend
                .open_partition(PartitionId(p))
                .map_err(|source| Error::State {
                    partition: PartitionId(p),
                    source,
                })?;
            let (itx, irx) = mpsc::channel(self.config.ingress_queue_capacity);
            let (btx, brx) = mpsc::unbounded_channel();
            senders.push(Some(PartitionSender {
                ingress: itx,
                inbound: btx,
            }));
            receivers.push((PartitionId(p), store, irx, brx));
        }
        let shared = Arc::new(Shared {
            config: self.config,
            module,
            partitions: senders,
            cluster: owned.is_some(),
            egresses: self.egresses,
            dead_letters: self.dead_letters,
            outstanding: AtomicU64::new(0),
            idle: Notify::new(),
            clock: Clock::new(),
            stopping: AtomicBool::new(false),
            backend: Arc::clone(&self.backend),
            run_id: random_run_id(),
            incarnation,
        });
        let mut partitions = Vec::with_capacity(n as usize);
        for (id, store, irx, brx) in receivers {
            let mut p = Partition::new(id, Arc::clone(&shared), store, irx, brx);
            // Messages left in a durable inbox are outstanding work from the start.
            let recovered = p.recover().map_err(|source| Error::State { partition: id, source })?;
            shared.begin(recovered);
            partitions.push(p);
        }
        let ingresses = self
            .ingresses
            .into_iter()
            .map(|(ingress, router)| {
                let sink = IngressSink::new(Arc::from(ingress.name()), router, Arc::clone(&shared));
                (ingress, sink)
            })
            .collect();
        Ok(Runtime {
            shared,
            partitions,
            ingresses,
        })
    }
}

/// A built runtime, ready to [`run`](Runtime::run).
pub struct Runtime {
    shared: Arc<Shared>,
    partitions: Vec<Partition>,
    ingresses: Vec<(Box<dyn Ingress>, IngressSink)>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("partitions", &self.partitions.len())
            .field("ingresses", &self.ingresses.len())
            .finish()
    }
}

impl Runtime {
    /// Starts building a runtime.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    /// A handle to the runtime; valid before, during and after `run`.
    pub fn handle(&self) -> RuntimeHandle {
        RuntimeHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Runs until `shutdown` resolves, then shuts down gracefully: ingresses stop, every
    /// accepted message finishes (bounded by `drain_timeout_ms`), partitions stop.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<RunReport, Error> {
        let stop_partitions = CancellationToken::new();
        let stop_ingress = CancellationToken::new();
        let mut partitions = JoinSet::new();
        for p in self.partitions {
            partitions.spawn(p.run(stop_partitions.clone()));
        }
        let mut ingresses = JoinSet::new();
        for (ingress, sink) in self.ingresses {
            let name = ingress.name().to_owned();
            let stop = stop_ingress.clone();
            ingresses.spawn(async move { (name, ingress.run(sink, stop).await) });
        }
        let mut checkpointer = None;
        if self.shared.config.checkpoint_interval_ms > 0 {
            let handle = RuntimeHandle {
                shared: Arc::clone(&self.shared),
            };
            let stop = stop_partitions.clone();
            let every = Duration::from_millis(self.shared.config.checkpoint_interval_ms);
            checkpointer = Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => match handle.checkpoint().await {
                            Ok(None) => return, // the backend does not take checkpoints
                            Ok(Some(c)) => tracing::info!(id = c.id, path = %c.path.display(), "checkpoint taken"),
                            Err(e) => tracing::error!(error = %e, "periodic checkpoint failed"),
                        },
                    }
                }
            }));
        }
        // Commits of a backend whose writes become durable per interval. A transient
        // failure is retried at the next tick (nothing is lost: the writes stay
        // pending); a permanent one (a fenced producer, a broken disk) stops the run.
        let mut committer = JoinSet::new();
        if let Some(every) = self.shared.backend.commit_interval() {
            let backend = Arc::clone(&self.shared.backend);
            let stop = stop_partitions.clone();
            committer.spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tick.tick() => {}
                    }
                    match commit(Arc::clone(&backend)).await {
                        Ok(()) => {}
                        Err(Error::Commit(e @ state::Error::Transient(_))) => {
                            tracing::warn!(error = %e, "commit failed; retrying at the next interval");
                        }
                        Err(e) => return Err(e),
                    }
                }
            });
        }
        tracing::info!(
            partitions = self.shared.config.partitions,
            functions = self.shared.module.len(),
            "runtime started"
        );

        let mut ingress_errors = Vec::new();
        let mut failure = None;
        let mut commit_failure = None;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(res) = committer.join_next() => {
                    commit_failure = Some(match res {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => Error::Internal("committer returned before shutdown".to_owned()),
                        Err(e) => Error::Internal(format!("commit task panicked: {e}")),
                    });
                    break;
                }
                Some(res) = partitions.join_next() => {
                    failure = Some(match res {
                        Ok(_) => "partition task returned before shutdown".to_owned(),
                        Err(e) => e.to_string(),
                    });
                    break;
                }
                Some(res) = ingresses.join_next() => match res {
                    Ok((_, Ok(()))) => {}
                    Ok((name, Err(e))) => {
                        tracing::error!(ingress = %name, error = %e, "ingress stopped with an error");
                        ingress_errors.push(e.to_string());
                    }
                    Err(e) => ingress_errors.push(format!("ingress task panicked: {e}")),
                },
            }
        }

        tracing::info!("runtime shutting down: stopping ingresses");
        stop_ingress.cancel();
        let drain = Duration::from_millis(self.shared.config.drain_timeout_ms);
        let stopped = tokio::time::timeout(drain, async {
            let mut errors = Vec::new();
            while let Some(res) = ingresses.join_next().await {
                match res {
                    Ok((_, Ok(()))) => {}
                    Ok((_, Err(e))) => errors.push(e.to_string()),
                    Err(e) => errors.push(format!("ingress task panicked: {e}")),
                }
            }
            errors
        })
        .await;
        match stopped {
            Ok(errors) => ingress_errors.extend(errors),
            Err(_) => {
                ingresses.abort_all();
                ingress_errors.push("an ingress did not stop within the drain timeout and was aborted".to_owned());
            }
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        let handle = RuntimeHandle {
            shared: Arc::clone(&self.shared),
        };
        let drained = failure.is_none()
            && commit_failure.is_none()
            && tokio::time::timeout(drain, handle.wait_idle()).await.is_ok();
        if !drained {
            tracing::warn!(
                outstanding = handle.outstanding(),
                "drain timeout: stopping with messages outstanding"
            );
        }
        stop_partitions.cancel();
        // The checkpointer holds the backend: when `run` returns, only the caller's
        // handles keep the state open.
        if let Some(c) = checkpointer {
            let _ = c.await;
        }
        let mut stats = Vec::new();
        while let Some(res) = partitions.join_next().await {
            match res {
                Ok(s) => stats.push(s),
                Err(e) => failure = failure.or(Some(e.to_string())),
            }
        }
        if let Some(f) = failure {
            return Err(Error::Internal(f));
        }
        // Let a commit in flight finish (the committer returns at its next turn, the
        // partitions having stopped) rather than abort it: aborting would leave its
        // blocking commit running after `run` returns, racing the final commit and
        // whatever the caller does next with the backend.
        while let Some(res) = committer.join_next().await {
            if let Ok(Err(e)) = res
                && commit_failure.is_none()
            {
                commit_failure = Some(e);
            }
        }
        if let Some(e) = commit_failure {
            return Err(e);
        }
        if self.shared.backend.commit_interval().is_some() {
            // The partitions have stopped: commit what they wrote last.
            commit(Arc::clone(&self.shared.backend)).await?;
        }
        stats.sort_by_key(|s| s.partition);
        tracing::info!("runtime stopped");
        Ok(RunReport {
            partitions: stats,
            ingress_errors,
            drained,
        })
    }
}

/// Runs one [`StateBackend::commit`](state::StateBackend::commit) off the async threads.
async fn commit(backend: Arc<dyn state::StateBackend>) -> Result<(), Error> {
    match tokio::task::spawn_blocking(move || backend.commit()).await {
        Ok(result) => result.map_err(Error::Commit),
        Err(e) => Err(Error::Internal(format!("commit task panicked: {e}"))),
    }
}

/// A cheap, cloneable handle to a runtime.
#[derive(Clone)]
pub struct RuntimeHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

impl RuntimeHandle {
    /// Sends a message to `target` from outside any function, waiting for room in the
    /// owning partition's ingress queue.
    pub async fn send(&self, target: Address, message: TypedValue) -> Result<(), SendError> {
        let env = Envelope {
            target,
            caller: None,
            message,
            inbox: None,
            position: None,
            also: Vec::new(),
        };
        match self.shared.submit(env, None).await {
            Ok(_) => Ok(()),
            Err(SubmitError::UnknownFunctionType(env)) => {
                Err(SendError::UnknownFunctionType(env.target.type_name().clone()))
            }
            Err(SubmitError::ShuttingDown) => Err(SendError::ShuttingDown),
            Err(SubmitError::NotOwned(p)) => Err(SendError::NotOwned(p)),
        }
    }

    /// Encodes `value` and sends it.
    pub async fn send_value<T: ValueType>(&self, target: Address, value: &T) -> Result<(), SendError> {
        self.send(target, TypedValue::of(value)?).await
    }

    /// Messages accepted but not yet finished.
    pub fn outstanding(&self) -> u64 {
        self.shared.outstanding.load(Ordering::SeqCst)
    }

    /// Waits until no message is queued or in flight anywhere (delayed messages that are
    /// not yet due do not count).
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.outstanding() == 0 {
                return;
            }
            notified.await;
        }
    }

    async fn control<R>(
        &self,
        p: PartitionId,
        make: impl FnOnce(oneshot::Sender<R>) -> Control,
    ) -> Result<R, QueryError> {
        let (tx, rx) = oneshot::channel();
        self.shared.partitions[p.0 as usize]
            .as_ref()
            .ok_or(QueryError::NotOwned(p))?
            .inbound
            .send(Inbound::Control(make(tx)))
            .map_err(|_| QueryError::NotRunning)?;
        rx.await.map_err(|_| QueryError::NotRunning)
    }

    /// Reads the current value of `spec` at `address` (a state query; expired values
    /// read as `None`). Answered by the owning partition between invocations.
    pub async fn state<T: ValueType>(&self, address: &Address, spec: &ValueSpec<T>) -> Result<Option<T>, QueryError> {
        let bytes = self.state_raw(address, spec.name()).await?;
        match bytes {
            None => Ok(None),
            Some(b) => Ok(Some(T::decode(&b)?)),
        }
    }

    /// Reads the raw bytes of state `name` at `address`: a state the function type
    /// declares, or one a remote function registered through the state handshake on the
    /// address's partition.
    pub async fn state_raw(&self, address: &Address, name: &str) -> Result<Option<Bytes>, QueryError> {
        let p = self.shared.partition_of(address);
        let address = address.clone();
        let name = name.to_owned();
        self.control(p, |reply| Control::GetState { address, name, reply })
            .await?
    }

    /// Parked addresses with the error that parked them (in cluster mode: in the
    /// partitions that run on this instance).
    pub async fn parked(&self) -> Result<Vec<(Address, String)>, QueryError> {
        let mut all = Vec::new();
        for p in self.shared.owned().collect::<Vec<_>>() {
            all.extend(self.control(p, |reply| Control::Parked { reply }).await?);
        }
        all.sort();
        Ok(all)
    }

    /// Unparks `address` so it takes messages again; false if it was not parked.
    /// Dead-lettered messages are not replayed automatically: re-send them if wanted.
    pub async fn unpark(&self, address: &Address) -> Result<bool, QueryError> {
        let p = self.shared.partition_of(address);
        let address = address.clone();
        self.control(p, |reply| Control::Unpark { address, reply }).await
    }

    /// Takes a checkpoint of the state now (off the async threads). `Ok(None)` if the
    /// state backend does not take checkpoints.
    pub async fn checkpoint(&self) -> Result<Option<state::CheckpointInfo>, QueryError> {
        let backend = Arc::clone(&self.shared.backend);
        tokio::task::spawn_blocking(move || backend.checkpoint())
            .await
            .map_err(|_| QueryError::NotRunning)?
            .map_err(QueryError::State)
    }

    /// Statistics of every partition (in cluster mode: that runs on this instance).
    pub async fn stats(&self) -> Result<Vec<PartitionStats>, QueryError> {
        let mut all = Vec::new();
        for p in self.shared.owned().collect::<Vec<_>>() {
            all.push(self.control(p, |reply| Control::Stats { reply }).await?);
        }
        Ok(all)
    }
}
