//! One region run in-process: a runtime with the application's functions, its
//! egresses collected in memory, a local-filesystem object store for the product
//! images, and the region's load generator. The demo and the end-to-end tests use it;
//! production embeds the runtime the same way with Kafka ingress and egress instead.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use object_store::local::LocalFileSystem;
use statefun_runtime::state::RocksDbBackend;
use statefun_runtime::{CollectingDeadLetters, CollectingEgress, RunReport, Runtime, RuntimeConfig, RuntimeHandle};
use statefun_sdk::{Address, TypeName, ValueSpec, ValueType};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::check::Snapshot;
use crate::generator::{Generator, LoadConfig};
use crate::*;

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
    /// The runtime's handle.
    pub handle: RuntimeHandle,
    /// `retail/orders`.
    pub orders: CollectingEgress,
    /// `retail/sku-windows`.
    pub windows: CollectingEgress,
    /// `retail/alerts`.
    pub alerts: CollectingEgress,
    /// `retail/rejected`.
    pub rejected: CollectingEgress,
    /// The runtime's dead letters.
    pub dead: CollectingDeadLetters,
    /// The region's traffic.
    pub generator: Generator,
    running: JoinHandle<Result<RunReport, statefun_runtime::Error>>,
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
        let images = dir.join("objects");
        std::fs::create_dir_all(&images)?;
        let store: Arc<dyn object_store::ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(&images)?);
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
        let name = load.region.clone();
        let mut generator = Generator::new(load);
        for e in generator.setup(store.as_ref()).await? {
            handle.send(e.target, e.value).await?;
        }
        Ok(Region {
            name,
            handle,
            orders,
            windows,
            alerts,
            rejected,
            dead,
            generator,
            running,
        })
    }

    /// Generates and sends `n` records.
    pub async fn send_next(&mut self, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let e = self.generator.next_event();
            self.handle.send(e.target, e.value).await?;
        }
        Ok(())
    }

    /// Sends what the generator still holds back; returns how many.
    pub async fn drain(&mut self) -> anyhow::Result<usize> {
        let events = self.generator.drain();
        let n = events.len();
        for e in events {
            self.handle.send(e.target, e.value).await?;
        }
        Ok(n)
    }

    /// Waits until the runtime is idle with no delayed message pending: every abandoned
    /// basket released and every analytics window flushed.
    pub async fn settle(&self) -> anyhow::Result<()> {
        loop {
            self.handle.wait_idle().await;
            let pending: usize = self.handle.stats().await?.iter().map(|p| p.pending_delayed).sum();
            if pending == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads the region's state and egress for [`check::check`](crate::check::check).
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let ledger = self.generator.ledger();
        let h = &self.handle;
        Ok(Snapshot {
            stock: states(h, &INVENTORY, &ledger.skus, &STOCK).await?,
            baskets: states(h, &CART, &ledger.baskets, &BASKET).await?,
            accounts: states(h, &LOYALTY, &ledger.customers, &ACCOUNT).await?,
            orders: decode_all(&self.orders)?,
            windows: decode_all(&self.windows)?,
            rejected: decode_all(&self.rejected)?,
            dead_letters: self.dead.letters().len(),
            ledger,
        })
    }

    /// Waits for the runtime to stop (after `stop` was cancelled).
    pub async fn finish(self) -> anyhow::Result<RunReport> {
        Ok(self.running.await??)
    }
}

async fn states<T: ValueType>(
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
