//! Cluster mode against a real broker: instances of one application share the
//! runtime's partitions through a consumer group. State and egress must stay
//! exactly-once while a third instance joins and leaves, and while one of two instances
//! is SIGKILLed (a real process kill) in the middle of its work and restarted. The
//! workload and the check are in `statefun_crash_test::cluster`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::Rng;
use statefun_crash_test::cluster::{ClusterNames, check_exactly_once};
use statefun_kafka::Assignment;
use tokio_util::sync::CancellationToken;

const KEYS: u64 = 40;

fn bootstrap() -> String {
    std::env::var("STATEFUN_KAFKA_BOOTSTRAP").expect(
        "STATEFUN_KAFKA_BOOTSTRAP is not set: run the suite with `make test` (it starts a broker), \
         or point it at a Kafka broker",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_joining_and_leaving_keep_state_and_egress_exactly_once() {
    let names = ClusterNames::unique(&bootstrap(), "join-leave");
    names.create_topics().await.unwrap();
    const VALUES: u64 = 3000;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let start = |i: usize| {
        let stop = CancellationToken::new();
        let (names, dir, token) = (names.clone(), dirs[i].path().to_path_buf(), stop.clone());
        let task = tokio::spawn(async move {
            names
                .run_instance(&format!("i{i}"), &dir, Assignment::Cooperative, token)
                .await
        });
        (stop, task)
    };
    let a = start(0);
    let b = start(1);
    names.produce(0..1000, KEYS).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c = start(2);
    names.produce(1000..2000, KEYS).await.unwrap();
    // The third instance leaves once it has run partitions: its RocksDB appears when it
    // restores them (a rebalance under the suite's load can take several seconds).
    let c_dir = dirs[2].path().to_path_buf();
    let joined = async {
        while std::fs::read_dir(&c_dir).unwrap().next().is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), joined)
        .await
        .expect("the third instance never got partitions");
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.0.cancel();
    let c_report = c.1.await.unwrap().unwrap();
    names.produce(2000..VALUES, KEYS).await.unwrap();

    let (records, repeated) = names
        .read_egress(2 * VALUES as usize, Duration::from_secs(90))
        .await
        .unwrap();
    a.0.cancel();
    b.0.cancel();
    let a_report = a.1.await.unwrap().unwrap();
    let b_report = b.1.await.unwrap().unwrap();
    check_exactly_once(&records, VALUES, KEYS).unwrap();
    assert_eq!(repeated, 0, "an egress id appears twice");
    // The third instance ran partitions, and the first two re-formed around it twice,
    // each time keeping some of their partitions (which paused while the runtime
    // restarted over the new set).
    eprintln!(
        "pauses of the kept partitions at each rebalance: first instance {:?}, second {:?}",
        a_report.pauses, b_report.pauses
    );
    assert!(
        a_report.pauses.len() + b_report.pauses.len() >= 2,
        "the first two instances did not keep partitions across both rebalances: pauses {:?} and {:?}",
        a_report.pauses,
        b_report.pauses
    );
    assert!(c_report.generations >= 1, "the third instance never ran a partition");
    assert!(
        a_report.generations + b_report.generations >= 4,
        "the first two instances did not rebalance: {} + {} runtime generations",
        a_report.generations,
        b_report.generations
    );
}

/// Starts an instance process. With `CLUSTER_LOG_DIR` set, its log (with every record its
/// ingress delivers, at trace level) is appended to `<dir>/<app>-<instance>.log`.
fn spawn_instance(names: &ClusterNames, instance: &str, partitions: &str, dir: &std::path::Path) -> Child {
    let stderr = match std::env::var_os("CLUSTER_LOG_DIR") {
        Some(logs) => {
            let path = std::path::Path::new(&logs).join(format!("{}-{instance}.log", names.app));
            Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            )
        }
        None => Stdio::inherit(),
    };
    let filter = match std::env::var_os("CLUSTER_LOG_DIR") {
        Some(_) => "warn,statefun_kafka::cluster=trace,statefun_runtime::partition=debug",
        None => "warn",
    };
    Command::new(env!("CARGO_BIN_EXE_statefun-crash-test"))
        .env("RUST_LOG", filter)
        .args(["cluster-instance", "--bootstrap", &names.bootstrap, "--app", &names.app])
        .args([
            "--ingress",
            &names.ingress,
            "--egress",
            &names.egress,
            "--instance",
            instance,
        ])
        .args(["--fixed-partitions", partitions])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// Closes the child's stdin (it commits and leaves the group) and waits for it.
fn stop_instance(mut child: Child) {
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "instance failed: {status}");
}

/// Counts the egress records visible to a read_committed reader right now.
async fn visible(names: &ClusterNames) -> usize {
    let (records, _) = names
        .read_egress(usize::MAX, Duration::from_millis(1500))
        .await
        .unwrap();
    records.len()
}

/// Skipped by `make test`, run by `make broker-check`: while an instance is killed in
/// a transaction, the other instance's read_committed consumer waits at that
/// transaction's first record; after the restart aborts it, the consumer reads on from
/// past the abort marker, and the test broker (noida-db 0.2.3) then hides every later
/// committed message of the restarted instance's producer from it (docs/kafka.md,
/// "Broker defects"). It failed 6 of 39 runs on noida-db.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the test broker hides committed records after a restart (docs/kafka.md); run with `make broker-check`"]
async fn sigkilled_instance_of_two_loses_and_duplicates_nothing() {
    let names = ClusterNames::unique(&bootstrap(), "kill-one");
    names.create_topics().await.unwrap();
    const VALUES: u64 = 9000;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = spawn_instance(&names, "a", "0,2", dir_a.path());
    let mut b = spawn_instance(&names, "b", "1,3", dir_b.path());
    let producer = {
        let names = names.clone();
        tokio::spawn(async move {
            // A steady stream, so kills land while records are being processed.
            for chunk in 0..30 {
                names.produce(chunk * 300..(chunk + 1) * 300, KEYS).await.unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let mut rng = rand::rng();
    let mut kills = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
        a.kill().unwrap();
        a.wait().unwrap();
        kills.push(visible(&names).await);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..2000))).await;
        a = spawn_instance(&names, "a", "0,2", dir_a.path());
    }
    producer.await.unwrap();
    let (mut records, mut repeated) = names
        .read_egress(2 * VALUES as usize, Duration::from_secs(60))
        .await
        .unwrap();
    if records.len() < 2 * VALUES as usize {
        // The test broker's defect (docs/kafka.md, "Broker defects"): an instance stops
        // seeing what the other one sends it through the internal topic. Restarting both
        // shows whether the work is only stuck or lost (the check below).
        eprintln!(
            "STALL in {}: {} of {} egress records; open transactions: {:?}; restarting both instances",
            names.app,
            records.len(),
            2 * VALUES,
            names.open_transactions()
        );
        stop_instance(a);
        stop_instance(b);
        a = spawn_instance(&names, "a", "0,2", dir_a.path());
        b = spawn_instance(&names, "b", "1,3", dir_b.path());
        (records, repeated) = names
            .read_egress(2 * VALUES as usize, Duration::from_secs(60))
            .await
            .unwrap();
    }
    stop_instance(a);
    stop_instance(b);
    eprintln!(
        "egress records visible after each kill: {kills:?}; at the end: {} ({repeated} with an id seen before)",
        records.len()
    );
    // The kills hit the workload mid-run.
    assert!(
        kills.iter().filter(|n| **n < 2 * VALUES as usize).count() >= 2,
        "the kills came after the work was done: {kills:?}"
    );
    if let Err(e) = check_exactly_once(&records, VALUES, KEYS) {
        let echoed: std::collections::BTreeSet<u64> = records
            .iter()
            .filter_map(|r| r.strip_prefix("e:"))
            .filter_map(|r| r.split(':').nth(1)?.parse().ok())
            .collect();
        for isolation in ["read_committed", "read_uncommitted"] {
            let sent = names.internal_echo_values(isolation).unwrap();
            let missing: Vec<(u64, Vec<(i32, i64)>)> = (0..VALUES)
                .filter(|v| !echoed.contains(v))
                .map(|v| (v, sent.get(&v).cloned().unwrap_or_default()))
                .collect();
            eprintln!(
                "{isolation}: {} echo messages in the internal topic; of the {} values never echoed, {} are in it; \
                 (value, [(partition, offset)]): {:?}",
                sent.values().map(Vec::len).sum::<usize>(),
                missing.len(),
                missing.iter().filter(|(_, at)| !at.is_empty()).count(),
                &missing[..missing.len().min(40)]
            );
        }
        panic!("{e}");
    }
    assert_eq!(repeated, 0, "an egress id appears twice");
}
