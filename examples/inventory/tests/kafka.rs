//! The application on a real Kafka-protocol broker (`make test` starts one and sets
//! STATEFUN_KAFKA_BOOTSTRAP): a region of two runtime instances in cluster mode, fed
//! through its ingress topics by the load generator, with egress committed to topics.
//! The final state is read back from the changelog topic and the egress from the topics
//! (`read_committed`), and every business invariant must hold.
//!
//! The SIGKILL run (`inventory-node` processes, one instance killed and restarted in
//! the middle of the traffic) is the crash-injection proof with this workload. It needs
//! Apache Kafka's transaction semantics, so it is `#[ignore]`d and runs in
//! `make broker-check` (docs/kafka.md, "Broker defects").

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use inventory::AppConfig;
use inventory::check::check;
use inventory::generator::LoadConfig;
use inventory::kafka::Topics;
use inventory::region::{KafkaSettings, Region};
use tokio_util::sync::CancellationToken;

fn bootstrap() -> String {
    std::env::var("STATEFUN_KAFKA_BOOTSTRAP").expect(
        "STATEFUN_KAFKA_BOOTSTRAP is not set: run the suite with `make test` (it starts a broker), \
         or point it at a Kafka broker",
    )
}

fn unique_prefix(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{what}-{}-{nanos}", std::process::id())
}

fn assert_invariants(s: &inventory::check::Snapshot) {
    let count = |k: &str| s.ledger.counts.get(k).copied().unwrap_or(0);
    // The traffic exercised what the invariants are about.
    assert!(s.orders.len() > 30, "{} orders", s.orders.len());
    assert!(count("basket-abandoned") > 0 && count("pos-duplicate") > 0 && count("pos-reordered") > 0);
    assert!(s.ledger.bad_records > 0 && !s.rejected.is_empty());
    assert!(!s.windows.is_empty() && !s.accounts.is_empty());
    let violations = check(s);
    assert!(
        violations.is_empty(),
        "{} violations: {:?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_of_two_instances_on_kafka_keeps_every_invariant() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let mut load = LoadConfig::new("north", 5);
    load.skus = 20;
    load.customers = 60;
    load.bad_ratio = 0.02;
    // Abandonment runs on processing time: keep it above a rebalance's pause.
    let app = AppConfig {
        abandon_after: Duration::from_secs(3),
        window: Duration::from_millis(500),
        ..AppConfig::new("north")
    };
    let settings = KafkaSettings {
        brokers: bootstrap(),
        topics: Topics::new(unique_prefix("inventory")),
        instances: 2,
        commit_interval: Duration::from_millis(100),
        settle_timeout: Duration::from_secs(120),
    };
    let mut region = Region::start_kafka(load, app, 4, settings, dir.path(), &stop)
        .await
        .unwrap();
    for _ in 0..30 {
        region.send_next(100).await.unwrap();
    }
    region.drain().await.unwrap();
    let s = region.snapshot().await.unwrap();
    stop.cancel();
    let invocations = region.finish().await.unwrap();
    assert!(invocations > 3000, "{invocations} invocations");
    assert_invariants(&s);
}

/// An `inventory-node` process.
fn node(brokers: &str, prefix: &str, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_inventory-node"))
        .args(["--brokers", brokers, "--topic-prefix", prefix])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("inventory-node starts")
}

fn instance(brokers: &str, prefix: &str, id: &str, dir: &Path) -> Child {
    let state = dir.join(format!("state-{id}"));
    let objects = dir.join("objects");
    node(
        brokers,
        prefix,
        &[
            "instance",
            "--region",
            "north",
            "--instance-id",
            id,
            "--state-dir",
            state.to_str().unwrap(),
            "--objects",
            objects.to_str().unwrap(),
        ],
    )
}

#[test]
#[ignore = "needs Apache Kafka's transaction semantics: run with `make broker-check` (docs/kafka.md)"]
fn sigkilled_instances_lose_and_duplicate_nothing_of_the_retail_workload() {
    let brokers = bootstrap();
    let prefix = unique_prefix("inventory-kill");
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("north.json");
    let mut a = instance(&brokers, &prefix, "a", dir.path());
    let mut b = instance(&brokers, &prefix, "b", dir.path());
    let objects = dir.path().join("objects");
    let mut generator = node(
        &brokers,
        &prefix,
        &[
            "generate",
            "--region",
            "north",
            "--seconds",
            "20",
            "--rate",
            "500",
            "--objects",
            objects.to_str().unwrap(),
            "--ledger",
            ledger.to_str().unwrap(),
        ],
    );
    // Kill instance a three times during the traffic (SIGKILL: no commit, no goodbye),
    // restarting it each time from its own state directory.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(5));
        a.kill().unwrap();
        a.wait().unwrap();
        a = instance(&brokers, &prefix, "a", dir.path());
    }
    assert!(generator.wait().unwrap().success(), "the generator failed");
    let check = Command::new(env!("CARGO_BIN_EXE_inventory-node"))
        .args([
            "--brokers",
            &brokers,
            "--topic-prefix",
            &prefix,
            "check",
            "--region",
            "north",
        ])
        .args(["--ledger", ledger.to_str().unwrap(), "--timeout", "180"])
        .output()
        .unwrap();
    for c in [&mut a, &mut b] {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && out.contains("invariant check: PASS"),
        "{out}\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
}
