//! One region with its load generator, run by the demo and the end-to-end tests:
//! * in-process ([`Region::start`]): a runtime with the application's functions and its
//!   egresses collected in memory; the generator sends through the runtime's handle.
//! * on Kafka ([`Region::start_kafka`]): instances of the region's application in
//!   cluster mode (`crate::kafka`), fed through the ingress topics; the final state is
//!   read from the changelog topic and the egress from the egress topics.
//!
//! Product images live in a local-filesystem object store under the region's directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use object_store::local::LocalFileSystem;
use statefun_runtime::state::RocksDbBackend;
use statefun_runtime::{CollectingDeadLetters, CollectingEgress, RunReport, Runtime, RuntimeConfig, RuntimeHandle};
use statefun_sdk::{Address, TypeName, ValueSpec, ValueType};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::check::Snapshot;
use crate::generator::{Event, Generator, LoadConfig};
use crate::kafka::{
    Feed, InstanceConfig, Topics, create_topics, read_snapshot, read_topic, run_instance, wait_settled,
};
use crate::*;
use statefun_kafka::{ChangelogSnapshot, ClusterReport};

/// Where a region keeps its function state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    /// RocksDB under the region's directory.
    RocksDb,
    /// In memory (the runtime's embedded default).
    Memory,
}

/// A running region.
#[derive(Debug)]
pub struct Region {
    /// Its name.
    pub name: String,
    /// The region's traffic.
    pub generator: Generator,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    InProcess {
        handle: RuntimeHandle,
        orders: CollectingEgress,
        windows: CollectingEgress,
        alerts: CollectingEgress,
        rejected: CollectingEgress,
        dead: CollectingDeadLetters,
        running: JoinHandle<Result<RunReport, statefun_runtime::Error>>,
    },
    Kafka {
        settings: KafkaSettings,
        feed: Feed,
        instances: Vec<JoinHandle<anyhow::Result<ClusterReport>>>,
        /// The state the region last settled at: the next wait refreshes it.
        settled: Mutex<Option<Box<ChangelogSnapshot>>>,
    },
}

/// How a region runs on Kafka ([`Region::start_kafka`]).
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The topic names.
    pub topics: Topics,
    /// Runtime instances of the region (in this process, each with its own state).
    pub instances: usize,
    /// Commit interval of the instances.
    pub commit_interval: Duration,
    /// How long [`Region::settle`] waits for a region that commits nothing while it has
    /// work left.
    pub settle_timeout: Duration,
}

impl Region {
    /// Starts region `load.region` with `partitions`, state and images under `dir`, and
    /// feeds it the initial product range (images written to the object store first).
    /// The runtime stops when `stop` is cancelled.
    pub async fn start(
        load: LoadConfig,
        app: AppConfig,
        partitions: u32,
        state: StateKind,
        dir: &Path,
        stop: &CancellationToken,
    ) -> anyhow::Result<Region> {
        let store = local_object_store(&dir.join("objects"))?;
        let (orders, windows, alerts, rejected) = (
            CollectingEgress::new(),
            CollectingEgress::new(),
            CollectingEgress::new(),
            CollectingEgress::new(),
        );
        let dead = CollectingDeadLetters::new();
        let mut builder = Runtime::builder()
            .config(RuntimeConfig {
                partitions,
                ..Default::default()
            })
            .module(module(app, Arc::clone(&store))?)
            .egress(ORDERS, orders.clone())
            .egress(SKU_WINDOWS, windows.clone())
            .egress(ALERTS, alerts.clone())
            .egress(REJECTED, rejected.clone())
            .dead_letters(dead.clone());
        if state == StateKind::RocksDb {
            let backend = RocksDbBackend::open(dir.join("state"), Default::default())
                .context("opening the region's RocksDB state")?;
            builder = builder.state_backend(backend);
        }
        let runtime = builder.build()?;
        let handle = runtime.handle();
        let running = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
        let mode = Mode::InProcess {
            handle,
            orders,
            windows,
            alerts,
            rejected,
            dead,
            running,
        };
        Region::with_range(load, mode, store.as_ref()).await
    }

    /// A region in `mode` that has been sent its product range (images into `store`).
    async fn with_range(load: LoadConfig, mode: Mode, store: &dyn object_store::ObjectStore) -> anyhow::Result<Region> {
        let mut region = Region {
            name: load.region.clone(),
            generator: Generator::new(load),
            mode,
        };
        for e in region.generator.setup(store).await? {
            region.send(e).await?;
        }
        Ok(region)
    }

    /// Starts region `load.region` on Kafka: creates its topics, starts
    /// `settings.instances` instances of its application in this process (state under
    /// `dir`), and produces the initial product range to its ingress topics. The
    /// instances stop when `stop` is cancelled.
    pub async fn start_kafka(
        load: LoadConfig,
        app: AppConfig,
        partitions: u32,
        settings: KafkaSettings,
        dir: &Path,
        stop: &CancellationToken,
    ) -> anyhow::Result<Region> {
        let store = local_object_store(&dir.join("objects"))?;
        let name = load.region.clone();
        create_topics(&settings.brokers, &settings.topics, &name, partitions).await?;
        let instances = (0..settings.instances)
            .map(|i| {
                let config = InstanceConfig {
                    brokers: settings.brokers.clone(),
                    topics: settings.topics.clone(),
                    app: app.clone(),
                    instance_id: format!("i{i}"),
                    partitions,
                    state_dir: dir.join(format!("state-{i}")),
                    commit_interval: settings.commit_interval,
                };
                tokio::spawn(run_instance(config, Arc::clone(&store), stop.clone()))
            })
            .collect();
        let feed = Feed::new(&settings.brokers, &settings.topics, &name, partitions)?;
        let mode = Mode::Kafka {
            settings,
            feed,
            instances,
            settled: Mutex::new(None),
        };
        Region::with_range(load, mode, store.as_ref()).await
    }

    async fn send(&self, e: Event) -> anyhow::Result<()> {
        match &self.mode {
            Mode::InProcess { handle, .. } => handle.send(e.target, e.value).await?,
            Mode::Kafka { feed, .. } => feed.send(&e).await?,
        }
        Ok(())
    }

    /// Generates and sends `n` records.
    pub async fn send_next(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let e = self.generator.next_event();
            self.send(e).await?;
        }
        Ok(())
    }

    /// Sends what the generator still holds back; returns how many.
    pub async fn drain(&mut self) -> anyhow::Result<usize> {
        let events = self.generator.drain();
        let n = events.len();
        for e in events {
            self.send(e).await?;
        }
        Ok(n)
    }

    /// What the region has done so far, for a live status line.
    pub fn progress(&self) -> String {
        match &self.mode {
            Mode::InProcess { orders, rejected, .. } => format!(
                "{}: {} orders, {} rejected",
                self.name,
                orders.records().len(),
                rejected.records().len()
            ),
            Mode::Kafka { instances, .. } => {
                let running = instances.iter().filter(|i| !i.is_finished()).count();
                format!("{}: {running} instance(s) running", self.name)
            }
        }
    }

    /// Waits until the region has done everything it was sent: every record processed,
    /// every abandoned basket released and every analytics window flushed.
    pub async fn settle(&self) -> anyhow::Result<()> {
        match &self.mode {
            Mode::InProcess { handle, .. } => loop {
                handle.wait_idle().await;
                let pending: usize = handle.stats().await?.iter().map(|p| p.pending_delayed).sum();
                if pending == 0 {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            },
            Mode::Kafka {
                settings,
                feed,
                settled,
                ..
            } => settle_on_kafka(&self.name, settings, feed, settled).await.map(drop),
        }
    }

    /// Reads the region's state and egress for [`check::check`](crate::check::check)
    /// (on Kafka, once the region has settled).
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let ledger = self.generator.ledger();
        match &self.mode {
            Mode::InProcess {
                handle: h,
                orders,
                windows,
                rejected,
                dead,
                ..
            } => Ok(Snapshot {
                stock: states(h, &INVENTORY, &ledger.skus, &STOCK).await?,
                baskets: states(h, &CART, &ledger.baskets, &BASKET).await?,
                accounts: states(h, &LOYALTY, &ledger.customers, &ACCOUNT).await?,
                orders: decode_all(orders)?,
                windows: decode_all(windows)?,
                rejected: decode_all(rejected)?,
                dead_letters: dead.letters().len(),
                ledger,
            }),
            Mode::Kafka {
                settings,
                feed,
                settled,
                ..
            } => {
                let state = settle_on_kafka(&self.name, settings, feed, settled).await?;
                read_snapshot(&settings.brokers, &settings.topics, &self.name, &state, ledger).await
            }
        }
    }

    /// How many low-stock alerts the region raised.
    pub async fn alerts(&self) -> anyhow::Result<usize> {
        match &self.mode {
            Mode::InProcess { alerts, .. } => Ok(alerts.records().len()),
            Mode::Kafka { settings, .. } => {
                let (b, t) = (settings.brokers.clone(), settings.topics.region(&self.name, "alerts"));
                Ok(tokio::task::spawn_blocking(move || read_topic(&b, &t)).await??.len())
            }
        }
    }

    /// Waits for the region's runtimes to stop (after `stop` was cancelled); returns
    /// how many invocations they ran.
    pub async fn finish(self) -> anyhow::Result<u64> {
        match self.mode {
            Mode::InProcess { running, .. } => Ok(running.await??.invocations()),
            Mode::Kafka { instances, .. } => {
                let mut invocations = 0;
                for i in instances {
                    invocations += i.await??.runs.iter().map(RunReport::invocations).sum::<u64>();
                }
                Ok(invocations)
            }
        }
    }
}

/// Flushes the generator's records and waits until region `name` settled on Kafka;
/// returns its state then, and keeps it in `settled` for the next wait to refresh.
async fn settle_on_kafka(
    name: &str,
    settings: &KafkaSettings,
    feed: &Feed,
    settled: &Mutex<Option<Box<ChangelogSnapshot>>>,
) -> anyhow::Result<ChangelogSnapshot> {
    feed.flush()?;
    let from = settled.lock().expect("settled lock").take().map(|s| *s);
    let state = wait_settled(&settings.brokers, &settings.topics, name, settings.settle_timeout, from).await?;
    *settled.lock().expect("settled lock") = Some(Box::new(state.clone()));
    Ok(state)
}

/// A local-filesystem object store rooted at `dir` (created if missing): where the demo
/// and the example deployment keep product images and their renditions.
pub fn local_object_store(dir: &Path) -> anyhow::Result<Arc<dyn object_store::ObjectStore>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(Arc::new(LocalFileSystem::new_with_prefix(dir)?))
}

/// The values of `spec` at the functions `t`/`ids` that have one, read through the
/// runtime's state queries.
pub async fn states<T: ValueType>(
    h: &RuntimeHandle,
    t: &TypeName,
    ids: &[String],
    spec: &ValueSpec<T>,
) -> anyhow::Result<BTreeMap<String, T>> {
    let mut out = BTreeMap::new();
    for id in ids {
        if let Some(v) = h.state(&Address::new(t.clone(), id)?, spec).await? {
            out.insert(id.clone(), v);
        }
    }
    Ok(out)
}

fn decode_all<T: ValueType>(e: &CollectingEgress) -> anyhow::Result<Vec<T>> {
    Ok(e.records()
        .iter()
        .map(|r| r.message.decode())
        .collect::<Result<_, _>>()?)
}
