//! [`RuntimeBuilder`]: takes the functions, the state backend, the ingresses with their
//! routers, the egresses and the dead-letter sink, validates them and opens the state
//! of every partition into a [`Runtime`] (which `super` runs).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use statefun_sdk::{Module, TypeName};
use tokio::sync::{Notify, mpsc};

use crate::config::{ConfigError, RuntimeConfig};
use crate::egress::{DeadLetterSink, Egress, LoggingDeadLetters};
use crate::errors::Error;
use crate::ingress::{Ingress, IngressSink, Router};
use crate::partition::Partition;
use crate::partitioner::PartitionId;
use crate::shared::{Clock, PartitionSender, Shared, random_run_id};
use crate::state::{MemoryBackend, StateBackend};

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
        // What the backend is, read once (`Shared::profile` keeps it).
        let profile = self.backend.profile();
        if profile.commit_interval.is_some()
            && let Some(id) = self.egresses.keys().find(|id| !self.backend.takes_egress(id))
        {
            return Err(Error::EgressOutsideCommit(id.clone()));
        }
        self.backend.check_partitions(n).map_err(durable_err)?;
        let incarnation = self.backend.next_incarnation().map_err(durable_err)?;
        let owned = profile.owned_partitions.clone();
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
            egresses: self.egresses,
            dead_letters: self.dead_letters,
            outstanding: AtomicU64::new(0),
            idle: Notify::new(),
            clock: Clock::new(),
            stopping: AtomicBool::new(false),
            backend: Arc::clone(&self.backend),
            profile,
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
    pub(super) shared: Arc<Shared>,
    pub(super) partitions: Vec<Partition>,
    pub(super) ingresses: Vec<(Box<dyn Ingress>, IngressSink)>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("partitions", &self.partitions.len())
            .field("ingresses", &self.ingresses.len())
            .finish()
    }
}
