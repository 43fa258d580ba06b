//! # inventory-node: the retail application's processes on Kafka
//!
//! What it teaches: deploying the runtime as separate processes around Kafka, the way
//! the Docker Compose example (`examples/inventory/docker`) and a production cluster
//! run it. Each subcommand is one process:
//!
//! * `instance`: one runtime instance of a region (cluster mode). Start several with
//!   different `--instance-id`s: they share the region's partitions through Kafka's
//!   consumer group, and take over each other's partitions when one stops or dies.
//!   Runs until SIGTERM or Ctrl-C.
//! * `generate`: the region's warehouses and checkout counters. Creates the topics,
//!   writes the product images to the object store, produces `--seconds` of traffic at
//!   `--rate`, and writes its ledger (what it sent) for `check`.
//! * `analytics`: the central analytics consumer. Reads every region's orders and SKU
//!   windows (`read_committed`) and prints the global view every `--every` seconds.
//! * `cart-server`: the region's cart function as a remote function in its own process
//!   (HTTP and gRPC on one port, holding no state). Start the instances with
//!   `--remote-cart http://HOST:PORT/statefun` to use it instead of the embedded cart:
//!   the same function code either way.
//! * `check`: waits until the region has processed everything and its timers have
//!   fired, reads its state from the changelog topic and its egress from the topics,
//!   and checks the business invariants against the ledger. Exit 0 = PASS, 1 = FAIL.
//!
//! Run the topology on one machine: `examples/inventory/run-kafka.sh` (see the
//! example's README).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use inventory::AppConfig;
use inventory::check::{check, print_verdict};
use inventory::generator::{Generator, Ledger, LoadConfig};
use inventory::kafka::{Feed, InstanceConfig, Topics, create_topics, follow_analytics, read_snapshot, wait_settled};
use inventory::region::local_object_store;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "The retail reference application's processes on Kafka")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, global = true, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Prefix of every topic name.
    #[arg(long, global = true, default_value = "retail")]
    topic_prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one runtime instance of a region until SIGTERM / Ctrl-C.
    Instance {
        /// The region.
        #[arg(long)]
        region: String,
        /// This instance's id: stable across its restarts, unique in the region.
        #[arg(long)]
        instance_id: String,
        /// Runtime partitions (the same on every instance and in `generate`).
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        /// Where this instance keeps its RocksDB state.
        #[arg(long)]
        state_dir: PathBuf,
        /// The object store directory with the product images (shared with `generate`).
        #[arg(long)]
        objects: PathBuf,
        /// Commit interval in milliseconds.
        #[arg(long, default_value_t = 100)]
        commit_interval_ms: u64,
        /// An open basket with no counter event for this long (milliseconds of
        /// processing time) is abandoned. Keep it above the longest outage a partition
        /// may see (a killed instance's partitions wait for the session timeout, 10 s).
        #[arg(long, default_value_t = 30_000)]
        abandon_after_ms: u64,
        /// Length of the per-SKU analytics windows, in milliseconds.
        #[arg(long, default_value_t = 2_000)]
        window_ms: u64,
        #[command(flatten)]
        cart: inventory::RemoteCartArgs,
    },
    /// Serve the region's cart function remotely (HTTP and gRPC) until SIGTERM / Ctrl-C.
    CartServer {
        /// The region whose orders the cart writes.
        #[arg(long)]
        region: String,
        /// Address to listen on (port 0 picks a free port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: std::net::SocketAddr,
        /// An open basket with no counter event for this long (milliseconds) is
        /// abandoned; the cart's timer, so it is set here, not on the instances.
        #[arg(long, default_value_t = 30_000)]
        abandon_after_ms: u64,
    },
    /// Produce a region's traffic, then write the ledger.
    Generate {
        /// The region.
        #[arg(long)]
        region: String,
        /// Runtime partitions of the region.
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        /// How long to generate traffic.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Records per second (0 = as fast as Kafka takes them).
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// SKUs.
        #[arg(long, default_value_t = 40)]
        skus: usize,
        /// Customers.
        #[arg(long, default_value_t = 300)]
        customers: usize,
        /// Share of bad records.
        #[arg(long, default_value_t = 0.01)]
        bad_ratio: f64,
        /// Random seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// The object store directory the product images are written to.
        #[arg(long)]
        objects: PathBuf,
        /// Where the ledger (JSON) is written.
        #[arg(long)]
        ledger: PathBuf,
    },
    /// Follow the central analytics topics and print the global view.
    Analytics {
        /// Seconds between two prints.
        #[arg(long, default_value_t = 5)]
        every: u64,
    },
    /// Wait until a region settled, then check its invariants.
    Check {
        /// The region.
        #[arg(long)]
        region: String,
        /// The ledger `generate` wrote.
        #[arg(long)]
        ledger: PathBuf,
        /// Fail when the region commits nothing for this long (seconds) while it still
        /// has work.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

/// Cancelled at SIGTERM or Ctrl-C.
fn shutdown_signal() -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler can be installed");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        s.cancel();
    });
    stop
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let topics = Topics::new(&args.topic_prefix);
    match args.command {
        Command::Instance {
            region,
            instance_id,
            partitions,
            state_dir,
            objects,
            commit_interval_ms,
            abandon_after_ms,
            window_ms,
            cart,
        } => {
            create_topics(&args.brokers, &topics, &region, partitions).await?;
            let config = InstanceConfig {
                brokers: args.brokers,
                topics,
                app: AppConfig {
                    abandon_after: Duration::from_millis(abandon_after_ms),
                    window: Duration::from_millis(window_ms),
                    remote_cart: cart.remote_cart(),
                    ..AppConfig::new(&region)
                },
                instance_id,
                partitions,
                state_dir,
                commit_interval: Duration::from_millis(commit_interval_ms),
            };
            let report =
                inventory::kafka::run_instance(config, local_object_store(&objects)?, shutdown_signal()).await?;
            tracing::info!(generations = report.generations, "instance stopped");
        }
        Command::CartServer {
            region,
            listen,
            abandon_after_ms,
        } => {
            let app = AppConfig {
                abandon_after: Duration::from_millis(abandon_after_ms),
                ..AppConfig::new(&region)
            };
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let at = listener.local_addr()?;
            // The one line on stdout is the address, for scripts and tests.
            println!("{at}");
            tracing::info!("cart of region {region}: HTTP POST http://{at}/statefun, gRPC http://{at}");
            let stop = shutdown_signal();
            statefun_sdk::remote::RemoteServer::new(inventory::cart_module(app)?)
                .serve(listener, stop.cancelled_owned())
                .await?;
        }
        Command::Generate {
            region,
            partitions,
            seconds,
            rate,
            skus,
            customers,
            bad_ratio,
            seed,
            objects,
            ledger,
        } => {
            create_topics(&args.brokers, &topics, &region, partitions).await?;
            let feed = Feed::new(&args.brokers, &topics, &region, partitions)?;
            let mut load = LoadConfig::new(&region, seed);
            load.skus = skus;
            load.customers = customers;
            load.bad_ratio = bad_ratio;
            load.validate().map_err(|e| anyhow::anyhow!("invalid load: {e}"))?;
            let mut generator = Generator::new(load);
            for e in generator.setup(local_object_store(&objects)?.as_ref()).await? {
                feed.send(&e).await?;
            }
            let started = Instant::now();
            let mut sent = 0u64;
            let mut shown = Instant::now();
            while started.elapsed() < Duration::from_secs(seconds) {
                feed.send(&generator.next_event()).await?;
                sent += 1;
                if rate > 0 && sent.is_multiple_of(16) {
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(ahead) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(ahead).await;
                    }
                }
                if shown.elapsed() >= Duration::from_secs(5) {
                    println!("{region}: {sent} records in {:.0} s", started.elapsed().as_secs_f64());
                    shown = Instant::now();
                }
            }
            for e in generator.drain() {
                feed.send(&e).await?;
                sent += 1;
            }
            feed.flush()?;
            let l = generator.ledger();
            std::fs::write(&ledger, serde_json::to_vec_pretty(&l)?)
                .with_context(|| format!("cannot write the ledger to {}", ledger.display()))?;
            println!(
                "{region}: {sent} records produced in {:.1} s; ledger written to {}",
                started.elapsed().as_secs_f64(),
                ledger.display()
            );
        }
        Command::Analytics { every } => {
            follow_analytics(
                &args.brokers,
                &topics,
                Duration::from_secs(every),
                shutdown_signal(),
                |view| {
                    println!("{}", view.render());
                },
            )
            .await?;
        }
        Command::Check {
            region,
            ledger,
            timeout,
        } => {
            let bytes = std::fs::read(&ledger).with_context(|| format!("cannot read {}", ledger.display()))?;
            let ledger: Ledger =
                serde_json::from_slice(&bytes).with_context(|| format!("{} is not a ledger", ledger.display()))?;
            let state = wait_settled(&args.brokers, &topics, &region, Duration::from_secs(timeout), None).await?;
            let snapshot = read_snapshot(&args.brokers, &topics, &region, &state, ledger).await?;
            let failures = check(&snapshot);
            println!(
                "region {region}: {} baskets, {} orders, {} windows, {} rejected",
                snapshot.ledger.baskets.len(),
                snapshot.orders.len(),
                snapshot.windows.len(),
                snapshot.rejected.len()
            );
            if !print_verdict(&failures) {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
