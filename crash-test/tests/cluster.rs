//! Cluster mode against a real broker (Apache Kafka in `make test`): instances of one
//! application share the runtime's partitions through a consumer group. State and
//! egress must stay exactly-once while a third instance joins and leaves; while one of
//! two instances is SIGKILLed (a real process kill) in the middle of its work and
//! restarted; when a killed instance is not restarted and the survivors take its
//! partitions over; when a frozen instance (SIGSTOP) loses its partitions and comes back
//! as a zombie (SIGCONT); and when an instance is restarted in place. The workload and
//! the check are in `statefun_crash_test::cluster`.

use std::time::{Duration, Instant};

use rand::Rng;
use statefun_crash_test::cluster::{ClusterNames, check_exactly_once};
use statefun_crash_test::instances::{
    GroupRun, Instance, finish, kills_per_run, log_dir, steady_load, tempdir, visible,
};
use statefun_kafka::Assignment;
use tokio_util::sync::CancellationToken;

const KEYS: u64 = statefun_crash_test::instances::KEYS;
const BINARY: &str = env!("CARGO_BIN_EXE_statefun-crash-test");

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

/// Two instances with fixed partitions; one is SIGKILLed in the middle of its work and
/// restarted, several times. Its open transactions are aborted by the restart's
/// `init_transactions`, the other instance's read_committed consumer of the internal
/// topic reads on past the abort markers, and nothing is lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_instance_of_two_loses_and_duplicates_nothing() {
    let names = ClusterNames::unique(&bootstrap(), "kill-one");
    names.create_topics().await.unwrap();
    let kills = kills_per_run(3);
    let values: u64 = 300 * (10 + 6 * kills as u64);
    let (dir_a, dir_b, logs) = (tempdir(), tempdir(), log_dir());
    let mut a = Instance::spawn(BINARY, &names, "a", Some("0,2"), dir_a.path(), &logs);
    let b = Instance::spawn(BINARY, &names, "b", Some("1,3"), dir_b.path(), &logs);
    let producer = steady_load(&names, values);
    let mut rng = rand::rng();
    let mut seen = Vec::new();
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
        a.kill();
        seen.push(visible(&names).await);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..2000))).await;
        a = Instance::spawn(BINARY, &names, "a", Some("0,2"), dir_a.path(), &logs);
    }
    producer.await.unwrap();
    eprintln!("egress records visible after each kill: {seen:?}");
    // The kills hit the workload mid-run.
    assert!(
        seen.iter().filter(|n| **n < 2 * values as usize).count() >= kills.min(2),
        "the kills came after the work was done: {seen:?}"
    );
    finish(&names, values, vec![a, b]).await;
}

/// Three instances in the group under load; one is SIGKILLed and not restarted. When
/// its session times out, the survivors take its partitions (restored from the
/// changelog) and finish the work, exactly once. Prints the time from the kill to the
/// first commit of a taken-over partition, as a read_committed reader sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_take_over_a_sigkilled_instances_partitions() {
    let (run, mut instances) = GroupRun::start(BINARY, &bootstrap(), "takeover", 3, 9000).await;
    let names = run.names.clone();
    let c = instances.pop().unwrap();
    let owned = c.runs().last().cloned().unwrap();
    c.kill();
    let killed_at = Instant::now();
    let from = names.changelog_ends().unwrap();
    let first_commit = {
        let (names, owned) = (names.clone(), owned.clone());
        tokio::task::spawn_blocking(move || names.first_commit_after(&owned, &from, Duration::from_secs(90)))
    };
    let taken = first_commit
        .await
        .unwrap()
        .unwrap()
        .expect("no survivor committed a partition of the killed instance within 90 s");
    eprintln!(
        "takeover: the killed instance owned partitions {owned:?}; the first commit of one by a survivor \
         was visible {:?} after the kill (session timeout 6 s)",
        taken - killed_at
    );
    // The survivors between them now run every partition.
    let survivors: std::collections::BTreeSet<u32> = instances
        .iter()
        .filter_map(|i| i.runs().last().cloned())
        .flatten()
        .collect();
    assert_eq!(
        survivors,
        (0..statefun_crash_test::cluster::PARTITIONS).collect(),
        "the survivors do not run every partition"
    );
    run.finish(instances).await;
}

/// An instance frozen with SIGSTOP (a GC pause, a stalled VM) while its transaction is
/// open: the group moves its partitions to the others after its session timeout. Then
/// it is resumed with SIGCONT, a zombie that still believes it owns them. Its commit
/// must be refused (fenced), it must write nothing for those partitions, and it must
/// rejoin the group and go on: the work ends exactly once and the resumed instance
/// runs partitions again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_is_fenced_when_resumed_and_rejoins() {
    let (run, instances) = GroupRun::start(BINARY, &bootstrap(), "zombie", 2, 9000).await;
    let names = run.names.clone();
    let [a, b]: [Instance; 2] = instances.try_into().unwrap();
    let a_runs = a.runs().len();
    let owned = a.runs().last().cloned().unwrap();
    a.signal("STOP");
    let from = names.changelog_ends().unwrap();
    let first_commit = {
        let (names, owned) = (names.clone(), owned.clone());
        tokio::task::spawn_blocking(move || names.first_commit_after(&owned, &from, Duration::from_secs(90)))
    };
    let frozen_at = Instant::now();
    let taken = first_commit.await.unwrap().unwrap();
    assert!(
        taken.is_some(),
        "b never committed the frozen instance's partitions {owned:?}; b's log:\n{}",
        b.log_text()
    );
    eprintln!(
        "the frozen instance's partitions {owned:?} were committed by b {:?} after the freeze",
        taken.unwrap() - frozen_at
    );
    assert_eq!(
        b.runs().last().map(Vec::len),
        Some(statefun_crash_test::cluster::PARTITIONS as usize),
        "b does not run every partition while a is frozen"
    );
    let refusals_before = a.refused_commits();
    a.signal("CONT");
    // The zombie rejoins: it runs partitions again, as a new generation.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(a.runs().len() > a_runs && a.runs().last().is_some_and(|p| !p.is_empty())) {
        assert!(
            Instant::now() < deadline,
            "the resumed instance did not rejoin and run partitions; its log:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("the resumed instance rejoined with partitions {:?}", a.runs().last());
    // Its open transaction's commit was refused: by the group, which no longer knew it,
    // or by the transaction coordinator, which aborted it (`Instance::refused_commits`).
    assert!(
        a.refused_commits() > refusals_before,
        "no commit of the resumed instance was refused; its log:\n{}",
        a.log_text()
    );
    run.finish(vec![a, b]).await;
}

/// An instance SIGKILLed and restarted with the same instance id gets its partitions
/// back at once (static group membership), without waiting out the session timeout:
/// the restart's first commit of its partitions is visible well within the 6 s session
/// timeout. Prints the restart-to-first-commit time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_restarted_in_place_gets_its_partitions_back_at_once() {
    let (run, instances) = GroupRun::start(BINARY, &bootstrap(), "in-place", 2, 6000).await;
    let names = run.names.clone();
    let [a, b]: [Instance; 2] = instances.try_into().unwrap();
    let owned = a.runs().last().cloned().unwrap();
    let b_runs = b.runs().len();
    a.kill();
    let from = names.changelog_ends().unwrap();
    let restarted_at = Instant::now();
    let a = run.spawn(0);
    let taken = {
        let (names, owned) = (names.clone(), owned.clone());
        tokio::task::spawn_blocking(move || names.first_commit_after(&owned, &from, Duration::from_secs(60)))
    }
    .await
    .unwrap()
    .unwrap()
    .expect("the restarted instance's partitions saw no commit within 60 s");
    let took = taken - restarted_at;
    eprintln!("restart in place: partitions {owned:?}, first commit visible {took:?} after the restart");
    assert_eq!(
        a.owned(Duration::from_secs(10)).await,
        owned,
        "the restarted instance did not get its own partitions back"
    );
    assert_eq!(
        b.runs().len(),
        b_runs,
        "the other instance was rebalanced by the restart"
    );
    assert!(
        took < Duration::from_secs(6),
        "the restart took {took:?} to commit: longer than the session timeout"
    );
    run.finish(vec![a, b]).await;
}
