//! # inventory-demo: the retail reference application, in-process
//!
//! What it teaches: embedding the runtime in a program (one runtime per region, RocksDB
//! state), wiring functions, egresses and dead letters, feeding it from a load
//! generator, querying state, and checking business invariants at the end.
//!
//! Run it: `make demo` (or `cargo run --release -p inventory --bin inventory-demo`).
//! Each region gets its warehouses' product range (images processed through a
//! local-filesystem object store), then `--seconds` of checkout traffic with a progress
//! bar and a live line per second. It then waits until every abandoned basket and
//! analytics window has timed out, prints the central analytics view, and checks the
//! invariants of every region (`inventory::check`): PASS, or FAIL with what broke
//! (and a non-zero exit).
//!
//! With `--brokers HOST:PORT` the same run goes through Kafka: each region is an
//! application of `--instances` runtime instances in cluster mode sharing its
//! partitions, the generator produces to the region's ingress topics, egress is
//! committed to topics exactly once, and the check reads the final state from the
//! changelog topic and the egress from the topics (`inventory::kafka`).

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use inventory::AppConfig;
use inventory::analytics::GlobalView;
use inventory::check::{check, print_verdict};
use inventory::generator::LoadConfig;
use inventory::kafka::Topics;
use inventory::region::{KafkaSettings, Region, StateKind};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "Run the retail reference application in-process and check its invariants")]
struct Args {
    /// How long to generate traffic.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Regions, each a runtime of its own.
    #[arg(long, default_value_t = 2)]
    regions: usize,
    /// Target records per second over all regions (0 = as fast as the runtimes take them).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// SKUs per region.
    #[arg(long, default_value_t = 40)]
    skus: usize,
    /// Customers per region.
    #[arg(long, default_value_t = 300)]
    customers: usize,
    /// Share of baskets walked away from.
    #[arg(long, default_value_t = 0.08)]
    abandon_ratio: f64,
    /// Share of bad records (malformed, invalid product, corrupt image, unknown SKU).
    #[arg(long, default_value_t = 0.01)]
    bad_ratio: f64,
    /// Runtime partitions per region.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Where state lives.
    #[arg(long, value_enum, default_value_t = State::Rocksdb)]
    state: State,
    /// Write each region's snapshot as JSON here (for `inventory-check`).
    #[arg(long)]
    snapshot_dir: Option<std::path::PathBuf>,
    /// Random seed of the workload.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Run on Kafka at this bootstrap address instead of in-process.
    #[arg(long)]
    brokers: Option<String>,
    /// Kafka mode: runtime instances per region (they share the region's partitions).
    #[arg(long, default_value_t = 2)]
    instances: usize,
    /// Kafka mode: prefix of the topic names (default: `retail-<unix time>`, fresh per
    /// run, so runs on one broker never see each other's records).
    #[arg(long)]
    topic_prefix: Option<String>,
    /// Kafka mode: commit interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    commit_interval_ms: u64,
    /// The cart as a remote function (one region only: a cart server serves one).
    #[command(flatten)]
    cart: inventory::RemoteCartArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum State {
    /// RocksDB in a temporary directory.
    Rocksdb,
    /// In memory.
    Memory,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    if args.regions == 0 {
        bail!("--regions must be at least 1");
    }
    if args.cart.remote_cart.is_some() && args.regions != 1 {
        bail!("--remote-cart serves one region (its orders carry the region's name): add --regions 1");
    }
    let kafka = match &args.brokers {
        None => None,
        Some(_) if args.state == State::Memory => {
            bail!("on Kafka (--brokers) the state is in RocksDB: drop --state memory")
        }
        Some(_) if args.instances == 0 => bail!("--instances must be at least 1"),
        Some(brokers) => {
            let prefix = args.topic_prefix.clone().unwrap_or_else(|| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                format!("retail-{}", now.as_secs())
            });
            Some(KafkaSettings {
                brokers: brokers.clone(),
                topics: Topics::new(prefix),
                instances: args.instances,
                commit_interval: Duration::from_millis(args.commit_interval_ms),
                settle_timeout: Duration::from_secs(60),
            })
        }
    };
    let stop = CancellationToken::new();
    let names: Vec<String> = ["north", "south", "east", "west"]
        .iter()
        .cycle()
        .take(args.regions)
        .enumerate()
        .map(|(i, n)| if i < 4 { n.to_string() } else { format!("{n}{i}") })
        .collect();
    println!(
        "statefun-rs retail demo: {} region(s), {} SKUs and {} customers each, {} partitions, {:?} state, {} s of traffic at {} records/s",
        args.regions, args.skus, args.customers, args.partitions, args.state, args.seconds, args.rate
    );
    if let Some(cart) = args.cart.remote_cart() {
        println!("cart: a remote function at {} ({:?})", cart.url, cart.transport);
    }
    if let Some(k) = &kafka {
        println!(
            "on Kafka at {}: {} instance(s) per region, topics {}, commit interval {:?}",
            k.brokers,
            k.instances,
            k.topics.region("<region>", "*"),
            k.commit_interval
        );
    }
    let setup = Instant::now();
    let dir = tempfile::tempdir()?;
    let mut regions = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let mut load = LoadConfig::new(n, args.seed.wrapping_add(i as u64));
        load.skus = args.skus;
        load.customers = args.customers;
        load.abandon_ratio = args.abandon_ratio;
        load.bad_ratio = args.bad_ratio;
        load.validate().map_err(|e| anyhow::anyhow!("invalid load: {e}"))?;
        let state = match args.state {
            State::Rocksdb => StateKind::RocksDb,
            State::Memory => StateKind::Memory,
        };
        let region_dir = dir.path().join(n);
        let app = AppConfig {
            remote_cart: args.cart.remote_cart(),
            ..AppConfig::new(n)
        };
        regions.push(match &kafka {
            None => Region::start(load, app, args.partitions, state, &region_dir, &stop).await?,
            Some(k) => Region::start_kafka(load, app, args.partitions, k.clone(), &region_dir, &stop).await?,
        });
    }
    for r in &regions {
        r.settle().await?;
    }
    println!(
        "product ranges taken in (images processed) in {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    let bar = ProgressBar::new(args.seconds);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} s  {msg}")
            .expect("a valid template"),
    );
    let started = Instant::now();
    let mut sent = 0u64;
    let mut last = (Instant::now(), 0u64);
    while started.elapsed() < Duration::from_secs(args.seconds) {
        for r in &mut regions {
            r.send_next(16).await?;
            sent += 16;
        }
        if args.rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / args.rate as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(ahead).await;
            }
        }
        if last.0.elapsed() >= Duration::from_secs(1) {
            let rate = (sent - last.1) as f64 / last.0.elapsed().as_secs_f64();
            let line: Vec<String> = regions.iter().map(Region::progress).collect();
            bar.set_position(started.elapsed().as_secs());
            bar.set_message(format!("{rate:>6.0} records/s | {}", line.join(" | ")));
            let live = format!(
                "  t={:>2}s  records/s={rate:>6.0}  {}",
                started.elapsed().as_secs(),
                line.join("  ")
            );
            if bar.is_hidden() {
                println!("{live}"); // not a terminal: no bar, plain lines
            } else {
                bar.println(live);
            }
            last = (Instant::now(), sent);
        }
    }
    for r in &mut regions {
        sent += r.drain().await? as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    println!(
        "traffic done: {sent} records in {secs:.1} s ({:.0} records/s); waiting for abandoned baskets and analytics windows to time out...",
        sent as f64 / secs
    );
    for r in &regions {
        r.settle().await?;
    }
    let settled = started.elapsed().as_secs_f64();
    println!(
        "all regions settled {settled:.1} s after the traffic started (last timers included): {:.0} records/s end to end",
        sent as f64 / settled
    );

    let mut view = GlobalView::new();
    let mut failures = Vec::new();
    let mut snapshots = Vec::new();
    for r in &regions {
        let s = r.snapshot().await?;
        s.windows.iter().for_each(|w| view.add_window(w));
        s.orders.iter().for_each(|o| view.add_order(o));
        let counts = &s.ledger.counts;
        let get = |k: &str| counts.get(k).copied().unwrap_or(0);
        println!(
            "region {}: baskets {} ({} checked out, {} cancelled, {} abandoned), counter events {} ({} duplicated, {} reordered), warehouse updates {}, bad records {} rejected by intake and {} scans of unknown SKUs, low-stock alerts {}",
            r.name,
            s.ledger.baskets.len(),
            get("basket-checkout"),
            get("basket-cancelled"),
            get("basket-abandoned"),
            get("pos-event"),
            get("pos-duplicate"),
            get("pos-reordered"),
            get("warehouse-update"),
            s.rejected.len(),
            get("unknown-sku-scan"),
            r.alerts().await?,
        );
        failures.extend(check(&s).into_iter().map(|f| format!("{}: {f}", r.name)));
        if let Some(dir) = &args.snapshot_dir {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(format!("{}.json", r.name));
            std::fs::write(&path, serde_json::to_vec_pretty(&s)?)?;
            println!(
                "  snapshot written to {} (check it with inventory-check)",
                path.display()
            );
        }
        snapshots.push(s);
    }
    stop.cancel();
    let mut invocations = 0;
    for r in regions {
        invocations += r.finish().await?;
    }
    println!();
    print!("{}", view.render());
    println!("invocations: {invocations}");
    if !print_verdict(&failures) {
        bail!("{} invariant violations", failures.len());
    }
    Ok(())
}
