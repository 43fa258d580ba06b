//! `statefun-crash-test`: the crash-recovery soak tool.
//!
//! * `statefun-crash-test soak --kills 20 --records 50000` runs the workload once
//!   without kills, then again with N SIGKILLs at random points, and compares the two
//!   outcomes (final state, pending timers, egress deduplicated by id). Exit code 0 and
//!   `PASS` when they are equal.
//! * `statefun-crash-test work --dir D ...` is the child process the soak drives.
//! * `statefun-crash-test cluster-instance ...` runs one instance of the cluster
//!   workload (`statefun_crash_test::cluster`) until its stdin closes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};
use statefun_crash_test::{
    KafkaArgs, SoakConfig, compare, create_egress_topic, reference, with_kills, work, work_args,
};

#[derive(Parser)]
#[command(about = "Crash-recovery soak for statefun-rs: SIGKILL a RocksDB-backed workload and compare")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the workload with kills and compare it with a crash-free run.
    Soak {
        /// How many times to kill the child before letting it finish.
        #[arg(long, default_value_t = 10)]
        kills: u32,
        /// Ingress records of the workload.
        #[arg(long, default_value_t = 20_000)]
        records: u64,
        /// Workload seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Seed of the kill schedule (default: from the clock; printed).
        #[arg(long)]
        kill_seed: Option<u64>,
        /// Earliest kill, ms after the child starts.
        #[arg(long, default_value_t = 150)]
        min_kill_ms: u64,
        /// Latest kill, ms after the child starts.
        #[arg(long, default_value_t = 1500)]
        max_kill_ms: u64,
        /// Runtime partitions.
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        /// Scratch directory (default: a new temp dir, removed on success).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Kafka mode: run the killed child on a Kafka changelog at this broker (the
        /// egress must then come out exactly once, nothing removed by id).
        #[arg(long)]
        kafka: Option<String>,
    },
    /// The child: run or resume the workload in DIR until it is complete.
    Work {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        records: u64,
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        /// Kafka mode: the broker.
        #[arg(long, requires = "kafka_prefix")]
        kafka: Option<String>,
        /// Kafka mode: prefix of the topics and the transactional id.
        #[arg(long)]
        kafka_prefix: Option<String>,
    },
    /// One instance of the cluster workload; stops (committing) when stdin closes.
    ClusterInstance {
        #[arg(long)]
        bootstrap: String,
        #[arg(long)]
        app: String,
        #[arg(long)]
        ingress: String,
        #[arg(long)]
        egress: String,
        #[arg(long)]
        instance: String,
        #[arg(long)]
        dir: PathBuf,
        /// Own exactly these partitions (comma-separated) instead of joining the group.
        #[arg(long, value_delimiter = ',')]
        fixed_partitions: Option<Vec<u32>>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::ClusterInstance {
            bootstrap,
            app,
            ingress,
            egress,
            instance,
            dir,
            fixed_partitions,
        } => {
            let assignment = match fixed_partitions {
                Some(parts) => {
                    statefun_kafka::Assignment::Fixed(parts.into_iter().map(statefun_runtime::PartitionId).collect())
                }
                None => statefun_kafka::Assignment::default(),
            };
            let names = statefun_crash_test::cluster::ClusterNames {
                bootstrap,
                app,
                ingress,
                egress,
            };
            let stop = tokio_util::sync::CancellationToken::new();
            let on_eof = stop.clone();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                on_eof.cancel();
            });
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let report = rt.block_on(names.run_instance(&instance, &dir, assignment, stop))?;
            eprintln!(
                "instance {instance} stopped after {} runtime generations",
                report.generations
            );
            Ok(())
        }
        Cmd::Work {
            dir,
            seed,
            records,
            partitions,
            kafka,
            kafka_prefix,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let kafka = kafka
                .zip(kafka_prefix)
                .map(|(bootstrap, prefix)| KafkaArgs { bootstrap, prefix });
            rt.block_on(work(work_args(&dir, seed, records, partitions, kafka)))
        }
        Cmd::Soak {
            kills,
            records,
            seed,
            kill_seed,
            min_kill_ms,
            max_kill_ms,
            partitions,
            dir,
            kafka,
        } => {
            if min_kill_ms > max_kill_ms {
                bail!("--min-kill-ms must not exceed --max-kill-ms");
            }
            let kill_seed = kill_seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            });
            let temp = tempfile::tempdir()?;
            let dir = dir.unwrap_or_else(|| temp.path().to_path_buf());
            let cfg = SoakConfig {
                binary: std::env::current_exe()?,
                dir: dir.clone(),
                seed,
                records,
                partitions,
                kills,
                kill_after_ms: (min_kill_ms, max_kill_ms),
                // A restart in Kafka mode waits for the broker to abort the killed transaction.
                restart_extra_ms: if kafka.is_some() { 1000 } else { 0 },
                kill_seed,
                timeout: Duration::from_secs(600),
                kafka: kafka.map(|bootstrap| KafkaArgs {
                    bootstrap,
                    prefix: format!("soak-{kill_seed}"),
                }),
            };
            if let Some(k) = &cfg.kafka {
                tokio::runtime::Runtime::new()?.block_on(create_egress_topic(k))?;
            }
            println!(
                "seed {seed}, kill seed {kill_seed}, {records} records, {kills} kills, dir {}",
                dir.display()
            );
            let expected = reference(&cfg)?;
            let (got, kill_log) = with_kills(&cfg)?;
            for (i, k) in kill_log.iter().enumerate() {
                println!(
                    "kill {}: after {} ms, {} egress lines so far{}",
                    i + 1,
                    k.after_ms,
                    k.egress_lines,
                    if k.had_finished { " (had already finished)" } else { "" }
                );
            }
            if cfg.kafka.is_some() {
                println!("egress records with a repeated id (must be 0): {}", got.redelivered);
                if got.redelivered > 0 {
                    bail!(
                        "{} duplicated egress records on the read_committed topic",
                        got.redelivered
                    );
                }
            } else {
                println!("re-delivered egress records (removed by id): {}", got.redelivered);
            }
            compare(&expected, &got)?;
            println!("PASS: outcome after {} kills equals the crash-free run", kill_log.len());
            Ok(())
        }
    }
}
