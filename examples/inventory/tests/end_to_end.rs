//! The whole application in-process, fed by the load generator (duplicates, reordered
//! counter events, abandoned baskets, bad records, images through a real
//! local-filesystem object store): every business invariant holds at the end, on
//! RocksDB state and on the in-memory default.

use std::time::Duration;

use inventory::AppConfig;
use inventory::check::check;
use inventory::generator::LoadConfig;
use inventory::region::{Region, StateKind};
use tokio_util::sync::CancellationToken;

async fn run_region(state: StateKind, records: usize) {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let mut load = LoadConfig::new("north", 11);
    load.bad_ratio = 0.02;
    let app = AppConfig {
        abandon_after: Duration::from_millis(300),
        window: Duration::from_millis(400),
        ..AppConfig::new("north")
    };
    let mut region = Region::start(load, app, 4, state, dir.path(), &stop).await.unwrap();
    for _ in 0..records / 100 {
        region.send_next(100).await.unwrap();
    }
    region.drain().await.unwrap();
    region.settle().await.unwrap();
    let s = region.snapshot().await.unwrap();
    stop.cancel();
    region.finish().await.unwrap();

    // The traffic exercised what the invariants are about.
    let count = |k: &str| s.ledger.counts.get(k).copied().unwrap_or(0);
    assert!(s.orders.len() > 100, "{} orders", s.orders.len());
    assert!(count("basket-abandoned") > 0 && count("basket-cancelled") > 0);
    assert!(count("pos-duplicate") > 0 && count("pos-reordered") > 0);
    assert!(s.ledger.bad_records > 0 && count("unknown-sku-scan") > 0);
    assert!(!s.windows.is_empty() && !s.accounts.is_empty());
    let violations = check(&s);
    assert!(
        violations.is_empty(),
        "{} violations: {:?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invariants_hold_after_generated_traffic_on_rocksdb() {
    run_region(StateKind::RocksDb, 8_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invariants_hold_after_generated_traffic_in_memory() {
    run_region(StateKind::Memory, 8_000).await;
}
