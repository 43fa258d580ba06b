//! Crash injection with the retail workload on RocksDB: `inventory-durable` (one region
//! in-process, fed by a replayable source of the load generator's events) is SIGKILLed
//! three times in the middle of its traffic (a real process kill: no destructors, no
//! flush) and restarted over the same directory each time, then allowed to finish.
//! Its final state (from RocksDB) and egress (deduplicated by record id) must pass every
//! business invariant: no sale lost or counted twice, stock and reservations exact.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;

const RECORDS: &str = "12000";

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[test]
fn sigkilled_runs_of_the_retail_workload_keep_every_invariant() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_inventory-durable"))
            .args(["--dir", dir.path().to_str().unwrap(), "--records", RECORDS])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let orders = dir.path().join("orders.egress");
    let mut rng = rand::rng();
    let mut mid_run = 0;
    for kill in 0..3 {
        let mut child = run();
        // Kill once the run has produced new orders (past the product range set-up),
        // a random moment later.
        let before = lines(&orders);
        let started = Instant::now();
        while lines(&orders) == before && started.elapsed() < Duration::from_secs(120) {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap();
        child.wait().unwrap();
        let now = lines(&orders);
        eprintln!("kill {kill}: {now} order lines (before {before}), finished: {finished}");
        if !finished && now > before {
            mid_run += 1;
        }
    }
    assert!(mid_run >= 1, "no kill landed in the middle of the traffic");
    let out = run().wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("invariant check: PASS"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
