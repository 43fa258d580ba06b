//! The crash-recovery proof in the test suite: the workload on RocksDB is SIGKILLed at
//! several random points (a real process kill: no destructors, no flush) and restarted
//! each time, then allowed to finish; its final state, pending timers and egress
//! (deduplicated by record id) must equal a crash-free run with the same seed. No lost
//! and no duplicated effects. The kill schedule's seed is printed so a failure can be
//! replayed with `statefun-crash-test soak --kill-seed S`. The same in Kafka mode
//! (`--kafka`, on Apache Kafka in `make test`), where the egress must be exactly once
//! without removing anything. `STATEFUN_SOAK_KILLS` sets the number of kills (5;
//! `make soak-kafka` runs 12).

use std::time::Duration;

use statefun_crash_test::{KafkaArgs, Outcome, SoakConfig, compare, create_egress_topic, reference, with_kills};

/// Runs the reference and the killed run and compares them; returns the killed run's
/// outcome. Each kill lands at a random point between 30 and 90 % of the time the
/// crash-free run took (its speed depends on the machine and the build; the start-up,
/// longer in Kafka mode, comes first), plus a restart's extra wait in Kafka mode after
/// the first kill, so that kills hit the work in progress.
fn soak(kafka: Option<KafkaArgs>, records: u64) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let kill_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill seed {kill_seed}");
    let mut cfg = SoakConfig {
        binary: env!("CARGO_BIN_EXE_statefun-crash-test").into(),
        dir: dir.path().to_path_buf(),
        seed: 42,
        records,
        partitions: 4,
        // `make soak-kafka` runs more (STATEFUN_SOAK_KILLS).
        kills: std::env::var("STATEFUN_SOAK_KILLS")
            .ok()
            .and_then(|k| k.parse().ok())
            .unwrap_or(5),
        kill_after_ms: (0, 0),
        // A restart in Kafka mode first waits for the broker to abort the killed
        // producer's open transaction (`init_transactions`).
        restart_extra_ms: if kafka.is_some() { 1000 } else { 0 },
        kill_seed,
        timeout: Duration::from_secs(120),
        kafka,
    };
    let started = std::time::Instant::now();
    let expected = reference(&cfg).unwrap();
    let took = started.elapsed().as_millis() as u64;
    cfg.kill_after_ms = ((took * 3 / 10).max(50), (took * 9 / 10).max(300));
    eprintln!(
        "the crash-free run took {took} ms; kills after {:?} ms",
        cfg.kill_after_ms
    );
    assert!(expected.state.pending_delayed > 0, "the workload leaves holds pending");
    assert!(!expected.egress.is_empty());
    let (got, kills) = with_kills(&cfg).unwrap();
    for k in &kills {
        eprintln!("{k:?}");
    }
    // At least one kill must land in the middle of the work: after some egress was
    // written and before all of it was.
    let total: usize = expected.egress.values().sum();
    let mid_run = kills
        .iter()
        .filter(|k| !k.had_finished && k.egress_lines > 0 && k.egress_lines < total)
        .count();
    assert!(mid_run >= 1, "no kill hit the workload mid-run: {kills:?}");
    eprintln!(
        "egress: expected {total} records, got {} after removing {} with a repeated id",
        got.egress.values().sum::<usize>(),
        got.redelivered
    );
    compare(&expected, &got).unwrap();
    got
}

#[test]
fn sigkilled_runs_end_in_the_same_state_as_a_crash_free_run() {
    soak(None, 40_000);
}

/// Kafka mode: the killed child commits state and egress in Kafka transactions; a kill
/// lands between commits (pending writes lost), inside a commit (open transaction), or
/// between a commit and its RocksDB write. Its egress topic, read with read_committed, must hold every record
/// of the crash-free run exactly once, with nothing removed by id.
#[test]
fn sigkilled_kafka_mode_runs_commit_state_and_egress_exactly_once() {
    let bootstrap = std::env::var("STATEFUN_KAFKA_BOOTSTRAP").expect(
        "STATEFUN_KAFKA_BOOTSTRAP is not set: run the suite with `make test` (it starts a broker), \
         or point it at a Kafka broker",
    );
    let kafka = KafkaArgs {
        bootstrap,
        prefix: format!(
            "kill-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ),
    };
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(create_egress_topic(&kafka))
        .unwrap();
    let got = soak(Some(kafka), 40_000);
    assert_eq!(
        got.redelivered, 0,
        "an egress record id appeared twice on the read_committed topic"
    );
}

#[test]
fn the_comparison_detects_a_lost_and_a_duplicated_effect() {
    // The check the kill test relies on must be able to fail.
    use statefun_crash_test::FinalState;
    let base = Outcome {
        state: FinalState {
            accounts: [("a0".to_owned(), [5, 1, 0, 0])].into(),
            pending_delayed: 1,
        },
        egress: [("deposit 0 a0 5".to_owned(), 1)].into(),
        redelivered: 0,
    };
    let mut lost = base.clone();
    lost.egress.clear();
    assert!(compare(&base, &lost).is_err());
    let mut doubled = base.clone();
    doubled.state.accounts.insert("a0".into(), [10, 2, 0, 0]);
    assert!(compare(&base, &doubled).is_err());
    let mut timer = base.clone();
    timer.state.pending_delayed = 0;
    assert!(compare(&base, &timer).is_err());
    assert!(compare(&base, &base.clone()).is_ok());
}
