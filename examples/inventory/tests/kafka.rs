//! The application on Apache Kafka (`make test` starts the test broker with
//! `scripts/kafka start` and sets STATEFUN_KAFKA_BOOTSTRAP; any other Kafka works too): a
//! region of two runtime instances in cluster mode, fed through its ingress topics by the
//! load generator, with egress committed to topics. The final state is read back from the
//! changelog topic and the egress from the topics (`read_committed`), and every business
//! invariant must hold.
//!
//! The SIGKILL run (`inventory-node` processes, instances killed and restarted in the
//! middle of the traffic) is the crash-injection proof with this workload.
//! `STATEFUN_SOAK_KILLS=N` turns it into a soak of N kills (default 3, the run in
//! `make test`); `STATEFUN_SOAK_SEED` repeats a printed kill schedule.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use inventory::AppConfig;
use inventory::check::check;
use inventory::generator::LoadConfig;
use inventory::kafka::Topics;
use inventory::region::{KafkaSettings, Region};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
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

/// An `inventory-node` process; its output (the log, then an error) is appended to `log`.
fn node(brokers: &str, prefix: &str, log: &Path, args: &[&str]) -> Child {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("the process log can be opened");
    Command::new(env!("CARGO_BIN_EXE_inventory-node"))
        .args(["--brokers", brokers, "--topic-prefix", prefix])
        .args(args)
        .env("RUST_LOG", "info")
        // An error exit prints its chain of causes without a backtrace (panics keep theirs).
        .env("RUST_LIB_BACKTRACE", "0")
        .stdout(log.try_clone().expect("the process log can be shared"))
        .stderr(log)
        .spawn()
        .expect("inventory-node starts")
}

/// Instance `id` of region north, over its own state directory in `dir` (the same one
/// after every restart); its log is `dir/instance-<id>.log`.
fn instance(brokers: &str, prefix: &str, id: &str, dir: &Path) -> Child {
    let state = dir.join(format!("state-{id}"));
    let objects = dir.join("objects");
    node(
        brokers,
        prefix,
        &dir.join(format!("instance-{id}.log")),
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

/// The last `n` lines of the log file `path`.
fn tail(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Fails if an instance process has exited (only the test may end them), with its log.
fn assert_running(instances: &mut [Child], ids: &[&str], dir: &Path) {
    for (i, id) in instances.iter_mut().zip(ids) {
        if let Some(status) = i.try_wait().unwrap() {
            let log = tail(&dir.join(format!("instance-{id}.log")), 60);
            panic!("instance {id} exited by itself ({status}); its log ends:\n{log}");
        }
    }
}

/// How many SIGKILLs the SIGKILL run injects: `STATEFUN_SOAK_KILLS`, default 3.
fn soak_kills() -> u32 {
    match std::env::var("STATEFUN_SOAK_KILLS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or_else(|| panic!("STATEFUN_SOAK_KILLS={v}: expected a number of kills above 0")),
        Err(_) => 3,
    }
}

/// The SIGKILL run's waits before each kill: 3 to 7 s each, drawn from `seed`
/// (`STATEFUN_SOAK_SEED`, else the clock; printed, so a failing schedule can be run again).
/// Varying them lands the kills in different phases: traffic, a restore, a rebalance.
fn kill_schedule(kills: u32) -> (u64, Vec<Duration>) {
    let seed = match std::env::var("STATEFUN_SOAK_SEED") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("STATEFUN_SOAK_SEED={v}: expected a number")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let waits = (0..kills)
        .map(|_| Duration::from_millis(rng.random_range(3_000..=7_000)))
        .collect();
    (seed, waits)
}

/// Proves that SIGKILLs of runtime instances in the middle of the retail traffic lose
/// and duplicate nothing, on Apache Kafka: two `inventory-node instance` processes share
/// the region's partitions through the consumer group while the generator produces;
/// every 3 to 7 s one of them (a, b, a, ...) is SIGKILLed (no commit, no leaving the group,
/// its transaction left open) and restarted at once over its own state directory, with
/// the same instance id (the transactional id that fences its previous process).
/// `inventory-node check` then waits until the region settled and must pass every
/// invariant against the generator's ledger: stock, reservations, baskets and loyalty
/// accounts (state read from the changelog) and orders, SKU windows and rejections
/// (egress read with `read_committed`) each count every generated event exactly once,
/// and nothing is dead-lettered.
#[test]
fn sigkilled_instances_lose_and_duplicate_nothing_of_the_retail_workload() {
    let kills = soak_kills();
    let (seed, waits) = kill_schedule(kills);
    eprintln!("{kills} kills, waits {waits:?} (STATEFUN_SOAK_SEED={seed})");
    let brokers = bootstrap();
    let prefix = unique_prefix("inventory-kill");
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("north.json");
    let objects = dir.path().join("objects");
    let started = Instant::now();
    let ids = ["a", "b"];
    let mut instances = ids.map(|id| instance(&brokers, &prefix, id, dir.path()));
    // The traffic goes on for 5 s after the last kill.
    let seconds = (waits.iter().sum::<Duration>().as_secs() + 5).to_string();
    let mut generator = node(
        &brokers,
        &prefix,
        &dir.path().join("generate.log"),
        &[
            "generate",
            "--region",
            "north",
            "--seconds",
            &seconds,
            "--rate",
            "500",
            "--objects",
            objects.to_str().unwrap(),
            "--ledger",
            ledger.to_str().unwrap(),
        ],
    );
    for (k, wait) in waits.iter().enumerate() {
        std::thread::sleep(*wait);
        if let Some(status) = generator.try_wait().unwrap() {
            let log = tail(&dir.path().join("generate.log"), 60);
            panic!(
                "the generator ended ({status}) before kill {}; its log ends:\n{log}",
                k + 1
            );
        }
        assert_running(&mut instances, &ids, dir.path());
        let victim = k % ids.len();
        let i = &mut instances[victim];
        i.kill().unwrap(); // SIGKILL
        i.wait().unwrap();
        *i = instance(&brokers, &prefix, ids[victim], dir.path());
        eprintln!(
            "kill {}/{kills}: instance {} at {:.1} s",
            k + 1,
            ids[victim],
            started.elapsed().as_secs_f64()
        );
    }
    assert!(generator.wait().unwrap().success(), "the generator failed");
    let traffic_done = started.elapsed();
    assert_running(&mut instances, &ids, dir.path());
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
        .args(["--ledger", ledger.to_str().unwrap(), "--timeout", "90"])
        .output()
        .unwrap();
    for i in &mut instances {
        i.kill().unwrap();
        i.wait().unwrap();
    }
    let out = String::from_utf8_lossy(&check.stdout);
    eprintln!(
        "{kills} kills; traffic ended at {:.1} s, the check at {:.1} s:\n{out}",
        traffic_done.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if !(check.status.success() && out.contains("invariant check: PASS")) {
        let logs: String = ids
            .iter()
            .map(|id| {
                let log = tail(&dir.path().join(format!("instance-{id}.log")), 40);
                format!("--- instance {id}, last lines:\n{log}\n")
            })
            .collect();
        let kept = dir.keep();
        panic!(
            "the check failed:\n{out}\n{}\n{logs}state and logs kept in {}",
            String::from_utf8_lossy(&check.stderr),
            kept.display()
        );
    }
}
