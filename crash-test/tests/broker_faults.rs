//! Broker faults under load, on Apache Kafka clusters of the tests' own (started with
//! `scripts/kafka`, whatever STATEFUN_KAFKA_BOOTSTRAP says: these tests kill and stop
//! brokers). Two cluster-mode instances run the cluster workload
//! (`statefun_crash_test::cluster`); at the end every value reached both functions
//! exactly once and every address's counts are `1..=n`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use statefun_crash_test::instances::{GroupRun, Instance, OwnKafka, visible};

const BINARY: &str = env!("CARGO_BIN_EXE_statefun-crash-test");

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka")
}

/// Three brokers; the internal topics get replication factor 3 and
/// `min.insync.replicas` 2 by default (min(3, brokers)). The broker leading most
/// changelog partitions is SIGKILLed mid-run and restarted 10 s later. The instances
/// go on, or pause and resume by themselves (their clients move to the new leaders),
/// and nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_changelog_leaders_sigkill_on_three_brokers_loses_and_duplicates_nothing() {
    let kafka = OwnKafka::start(&script(), &format!("three-{}", std::process::id()), 3, 18100).unwrap();
    let (run, instances) = GroupRun::start(BINARY, &kafka.bootstrap, "broker-kill", 2, 9000).await;
    let names = run.names.clone();
    let leaders = names.changelog_leaders().unwrap();
    let mut counts = std::collections::BTreeMap::<i32, usize>::new();
    for l in &leaders {
        *counts.entry(*l).or_default() += 1;
    }
    let victim = counts.iter().max_by_key(|(_, n)| **n).map(|(id, _)| *id).unwrap();
    let before = visible(&names).await;
    kafka.node("kill", victim).unwrap();
    eprintln!("killed broker {victim}, leader of changelog partitions {leaders:?}; {before} egress records visible");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = visible(&names).await;
    kafka.node("start", victim).unwrap();
    // The work may pause while the controller fences the dead broker and elects new
    // leaders (`broker.session.timeout.ms`, 3 s on the test clusters); what must hold is
    // that it resumes by itself and ends exactly once.
    eprintln!("broker {victim} restarted; {during} egress records visible after 10 s without it (from {before})");
    run.finish(instances).await;
}

/// One broker, stopped for 20 s under load and started again. The instances wait
/// (input stops at the pending-writes bound) and resume by themselves; nothing is lost
/// or duplicated. Prints how long after the broker's return the egress moved again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20_second_broker_outage_is_ridden_out_and_loses_and_duplicates_nothing() {
    let kafka = OwnKafka::start(&script(), &format!("outage-{}", std::process::id()), 1, 18200).unwrap();
    let (run, instances) = GroupRun::start(BINARY, &kafka.bootstrap, "outage", 2, 6000).await;
    let names = run.names.clone();
    let [a, b]: [Instance; 2] = instances.try_into().unwrap();
    kafka.node("stop", 1).unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    kafka.node("start", 1).unwrap();
    let back = Instant::now();
    let at_return = visible(&names).await;
    let deadline = back + Duration::from_secs(60);
    while visible(&names).await <= at_return {
        assert!(
            Instant::now() < deadline,
            "no egress within 60 s of the broker's return; logs:\n{}\n{}",
            a.log_text(),
            b.log_text()
        );
    }
    eprintln!("egress moved again {:?} after the broker's return", back.elapsed());
    run.finish(vec![a, b]).await;
}
