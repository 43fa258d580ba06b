//! The crash-recovery proof in the test suite: the workload on RocksDB is SIGKILLed at
//! several random points (a real process kill: no destructors, no flush) and restarted
//! each time, then allowed to finish; its final state, pending timers and egress
//! (deduplicated by record id) must equal a crash-free run with the same seed. No lost
//! and no duplicated effects. The kill schedule's seed is printed so a failure can be
//! replayed with `statefun-crash-test soak --kill-seed S`.

use std::time::Duration;

use statefun_crash_test::{SoakConfig, compare, reference, with_kills};

#[test]
fn sigkilled_runs_end_in_the_same_state_as_a_crash_free_run() {
    let dir = tempfile::tempdir().unwrap();
    let kill_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill seed {kill_seed}");
    let cfg = SoakConfig {
        binary: env!("CARGO_BIN_EXE_statefun-crash-test").into(),
        dir: dir.path().to_path_buf(),
        seed: 42,
        records: 12_000,
        partitions: 4,
        kills: 5,
        kill_after_ms: (150, 1200),
        kill_seed,
        timeout: Duration::from_secs(120),
    };
    let expected = reference(&cfg).unwrap();
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
    compare(&expected, &got).unwrap();
}

#[test]
fn the_comparison_detects_a_lost_and_a_duplicated_effect() {
    // The check the kill test relies on must be able to fail.
    use statefun_crash_test::{FinalState, Outcome};
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
