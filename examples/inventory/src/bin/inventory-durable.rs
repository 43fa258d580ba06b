//! # inventory-durable: one region on RocksDB that survives `kill -9`
//!
//! What it teaches: exactly-once processing across crashes in the embedded runtime. The
//! region's traffic (`--records` events of the load generator, seed `--seed`) comes from
//! a replayable source (`GeneratorIngress`): after a crash the runtime resumes it at the
//! offset its RocksDB state says was accepted, and its durable inbox, timers and egress
//! log carry the rest over. Egress records are appended to files under `--dir` with
//! their record ids (a record handed over again after a crash has the same id).
//!
//! Run it, kill it at any moment, run it again with the same arguments: when the source
//! is exhausted and every timer has fired, it checks the region's invariants (state from
//! RocksDB, egress from the files, deduplicated by id) and prints `invariant check:
//! PASS` (exit 0) or what broke (exit 1). `tests/durable.rs` does exactly that with
//! SIGKILLs at random moments.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use inventory::check::{Snapshot, check, print_verdict};
use inventory::generator::{Event, Generator, LoadConfig};
use inventory::region::{local_object_store, states};
use inventory::*;
use statefun_runtime::egress::{DeadLetter, DeadLetterSink, Egress, EgressRecord, Error as EgressError};
use statefun_runtime::ingress::{
    Error as IngressError, Ingress, IngressRecord, IngressSink, RouteError, Routed, Router,
};
use statefun_runtime::state::RocksDbBackend;
use statefun_runtime::{GeneratorIngress, Runtime, RuntimeConfig};
use statefun_sdk::{Address, TypedValue, ValueType};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "One retail region on RocksDB, fed by a replayable source: kill it and run it again")]
struct Args {
    /// State, images and egress files.
    #[arg(long)]
    dir: PathBuf,
    /// Generated traffic events (after the product range).
    #[arg(long, default_value_t = 20_000)]
    records: usize,
    /// Workload seed: the same on every run over one directory.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Runtime partitions: the same on every run over one directory.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
}

/// The header naming the function type an event is for.
const FUNCTION_HEADER: &str = "function";

/// Routes an event to its function type (from the header), the key as the id.
struct EventRouter;

impl Router for EventRouter {
    fn route(&self, r: &IngressRecord) -> Result<Routed, RouteError> {
        let function = r
            .headers
            .iter()
            .find(|(k, _)| k == FUNCTION_HEADER)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| RouteError("record has no function header".into()))?;
        let (target, value_type) = if function == INTAKE.as_str().as_bytes() {
            (INTAKE, WarehouseUpdate::TYPE_NAME)
        } else if function == CART.as_str().as_bytes() {
            (CART, PosEvent::TYPE_NAME)
        } else {
            return Err(RouteError(format!(
                "no route to {}",
                String::from_utf8_lossy(&function)
            )));
        };
        let key = r.key.as_ref().ok_or_else(|| RouteError("record has no key".into()))?;
        let id = std::str::from_utf8(key).map_err(|_| RouteError("key is not UTF-8".into()))?;
        let address = Address::new(target, id).map_err(|e| RouteError(e.to_string()))?;
        let value = r.value.clone().unwrap_or_default();
        Ok(Routed::new(address, TypedValue::from_bytes(value_type, value)))
    }
}

fn record(e: &Event) -> IngressRecord {
    IngressRecord {
        key: Some(Bytes::copy_from_slice(e.target.id().as_bytes())),
        value: e.value.bytes().cloned(),
        headers: vec![(
            FUNCTION_HEADER.to_owned(),
            Bytes::copy_from_slice(e.target.type_name().as_str().as_bytes()),
        )],
        ..Default::default()
    }
}

/// A source that says when it has delivered its last record.
struct Tracked {
    inner: GeneratorIngress,
    done: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Ingress for Tracked {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn run(self: Box<Self>, sink: IngressSink, shutdown: CancellationToken) -> Result<(), IngressError> {
        let done = Arc::clone(&self.done);
        Box::new(self.inner).run(sink, shutdown).await?;
        done.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Appends each record to a file as `<id> <json>` with one unbuffered write: what the
/// kernel has survives a SIGKILL of this process.
struct FileEgress(Mutex<std::fs::File>);

impl FileEgress {
    fn open(path: &Path) -> anyhow::Result<FileEgress> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(FileEgress(Mutex::new(f)))
    }
}

impl Egress for FileEgress {
    fn send(&self, r: EgressRecord) -> Result<(), EgressError> {
        let id = r.id.map(|i| i.to_string()).unwrap_or_default();
        let json = String::from_utf8_lossy(r.message.bytes().map(|b| b.as_ref()).unwrap_or_default()).into_owned();
        let line = format!("{id} {json}\n");
        let mut f = self.0.lock().expect("egress file lock");
        f.write_all(line.as_bytes())
            .map_err(|e| EgressError::Rejected(format!("cannot append to the egress file: {e}")))
    }
}

/// Counts dead letters in a file, one line each.
struct FileDeadLetters(FileEgress);

impl DeadLetterSink for FileDeadLetters {
    fn send(&self, d: DeadLetter) {
        let line = format!("{}\n", d.reason);
        let _ = self
            .0
            .0
            .lock()
            .expect("dead letter file lock")
            .write_all(line.as_bytes());
    }
}

/// The records of an egress file, each id once.
fn read_egress<T: ValueType>(path: &Path) -> anyhow::Result<Vec<T>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut by_id = BTreeMap::new();
    for line in text.lines() {
        let (id, json) = line.split_once(' ').context("malformed egress line")?;
        by_id.entry(id.to_owned()).or_insert_with(|| json.to_owned());
    }
    by_id
        .values()
        .map(|j| T::decode(j.as_bytes()).context("undecodable egress record"))
        .collect()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    let store = local_object_store(&args.dir.join("objects"))?;

    // The whole traffic, the same on every run: the source replays it from any offset.
    let mut load = LoadConfig::new("north", args.seed);
    load.bad_ratio = 0.02;
    load.validate().map_err(|e| anyhow::anyhow!("invalid load: {e}"))?;
    let mut generator = Generator::new(load);
    let mut events = generator.setup(store.as_ref()).await?;
    events.extend((0..args.records).map(|_| generator.next_event()));
    events.extend(generator.drain());
    let ledger = generator.ledger();
    let records: Arc<Vec<IngressRecord>> = Arc::new(events.iter().map(record).collect());

    let egress = |name: &str| FileEgress::open(&args.dir.join(format!("{name}.egress")));
    let app = AppConfig {
        abandon_after: Duration::from_millis(500),
        window: Duration::from_millis(500),
        ..AppConfig::new("north")
    };
    let exhausted = Arc::new(AtomicBool::new(false));
    let source = Tracked {
        inner: {
            let records = Arc::clone(&records);
            GeneratorIngress::new("retail", args.seed, records.len() as u64, move |_, offset| {
                records[offset as usize].clone()
            })
        },
        done: Arc::clone(&exhausted),
    };
    let runtime = Runtime::builder()
        .config(RuntimeConfig {
            partitions: args.partitions,
            ..Default::default()
        })
        .module(module(app, Arc::clone(&store))?)
        .state_backend(RocksDbBackend::open(args.dir.join("state"), Default::default())?)
        .ingress(source, EventRouter)
        .egress(ORDERS, egress("orders")?)
        .egress(SKU_WINDOWS, egress("windows")?)
        .egress(ALERTS, egress("alerts")?)
        .egress(REJECTED, egress("rejected")?)
        .dead_letters(FileDeadLetters(egress("dead-letters")?))
        .build()?;
    let handle = runtime.handle();
    let stop = CancellationToken::new();
    let running = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));

    // Done when the source has delivered its last record, nothing is in flight and no
    // timer is pending.
    loop {
        handle.wait_idle().await;
        let pending: usize = handle.stats().await?.iter().map(|p| p.pending_delayed).sum();
        if pending == 0 && exhausted.load(Ordering::SeqCst) && handle.outstanding() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snapshot = Snapshot {
        stock: states(&handle, &INVENTORY, &ledger.skus, &STOCK).await?,
        baskets: states(&handle, &CART, &ledger.baskets, &BASKET).await?,
        accounts: states(&handle, &LOYALTY, &ledger.customers, &ACCOUNT).await?,
        orders: read_egress(&args.dir.join("orders.egress"))?,
        windows: read_egress(&args.dir.join("windows.egress"))?,
        rejected: read_egress(&args.dir.join("rejected.egress"))?,
        dead_letters: std::fs::read_to_string(args.dir.join("dead-letters.egress"))
            .unwrap_or_default()
            .lines()
            .count(),
        ledger,
    };
    stop.cancel();
    running.await??;
    let failures = check(&snapshot);
    println!(
        "{} events, {} orders, {} windows, {} rejected",
        records.len(),
        snapshot.orders.len(),
        snapshot.windows.len(),
        snapshot.rejected.len()
    );
    if !print_verdict(&failures) {
        std::process::exit(1);
    }
    Ok(())
}
