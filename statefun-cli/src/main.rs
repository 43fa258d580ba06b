//! `statefun`: runs a StateFun application from its `module.yaml` on statefun-rs.
//!
//! * `statefun run MODULE --instance-id ID`: one instance of the application's cluster
//!   on Kafka, until SIGTERM or Ctrl-C. Start several with different ids: they share the
//!   partitions (and take over each other's).
//! * `statefun check MODULE`: reads the module and prints what `run` would start, or
//!   the first error (with its line and field); exit 1 on error.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use statefun_cli::{Overrides, plan};
use statefun_kafka::{KafkaCluster, KafkaDeadLetters};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "Run a StateFun application (module.yaml) on statefun-rs", version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one instance of the application until SIGTERM / Ctrl-C.
    Run {
        /// The module file.
        module: PathBuf,
        /// This instance's id: stable across its restarts, unique in the application.
        #[arg(long)]
        instance_id: String,
        /// Where this instance keeps its RocksDB state (overrides the module's stateDir).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Kafka bootstrap servers (overrides the module's addresses).
        #[arg(long)]
        bootstrap_servers: Option<String>,
    },
    /// Read and check the module; print what `run` would start.
    Check {
        /// The module file.
        module: PathBuf,
    },
}

fn read(path: &PathBuf) -> anyhow::Result<statefun_remote::module::ModuleSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    statefun_remote::module::parse(&text).with_context(|| path.display().to_string())
}

/// Cancelled at SIGTERM or Ctrl-C.
fn shutdown_signal() -> anyhow::Result<CancellationToken> {
    let stop = CancellationToken::new();
    let s = stop.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        s.cancel();
    });
    Ok(stop)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Args::parse().command {
        Command::Check { module } => {
            let spec = read(&module)?;
            let p = plan(
                &spec,
                &Overrides {
                    instance_id: "check".into(),
                    ..Default::default()
                },
            )?;
            println!("{}: OK", module.display());
            println!(
                "application {} on {}: {} partitions, commit interval {:?}",
                p.cluster.application_id, p.cluster.bootstrap_servers, p.cluster.partitions, p.cluster.commit_interval
            );
            let keys: Vec<&str> = p.cluster.client_properties.iter().map(|(k, _)| k.as_str()).collect();
            if !keys.is_empty() {
                println!("  kafka client properties: {}", keys.join(", "));
            }
            for (topic, _) in &p.cluster.ingress {
                println!("  ingress topic {topic}");
            }
            for (id, topics) in &p.cluster.record_egresses {
                println!("  egress {id} -> {topics:?}");
            }
            let types: Vec<String> = p
                .functions
                .types()
                .map(ToString::to_string)
                .chain(p.functions.namespaces().map(|(n, _)| format!("{n}/*")))
                .collect();
            println!("  remote functions: {}", types.join(", "));
        }
        Command::Run {
            module,
            instance_id,
            state_dir,
            bootstrap_servers,
        } => {
            let spec = read(&module)?;
            let p = plan(
                &spec,
                &Overrides {
                    instance_id,
                    state_dir,
                    bootstrap_servers,
                },
            )?;
            let dead_letters = match &p.dead_letter_topic {
                Some(topic) => Some(Arc::new(KafkaDeadLetters::with_properties(
                    &p.cluster.bootstrap_servers,
                    topic,
                    &p.cluster.client_properties,
                )?)),
                None => None,
            };
            tracing::info!(
                application = %p.cluster.application_id,
                instance = %p.cluster.instance_id,
                "starting"
            );
            let functions = p.functions;
            let report = KafkaCluster::run(
                p.cluster,
                |b| {
                    let b = b.module(functions.clone());
                    match &dead_letters {
                        Some(d) => b.dead_letters(Arc::clone(d)),
                        None => b,
                    }
                },
                shutdown_signal()?,
            )
            .await?;
            tracing::info!(generations = report.generations, "stopped");
        }
    }
    Ok(())
}
