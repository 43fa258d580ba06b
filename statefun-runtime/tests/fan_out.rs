//! Ingress records for several function types (StateFun's ingress topics with several
//! targets, `KeyRouter::to_all`): every target gets each record once. In durable mode
//! the record is accepted once, with one inbox entry per target in the write that
//! stores the progress past it: a source that replays records already accepted (after
//! a restart) delivers none of them again, to any target. A target of an unknown type
//! is dead-lettered while the others get the record.

use std::time::Duration;

use bytes::Bytes;
use statefun_runtime::state::{RocksDbBackend, RocksDbOptions};
use statefun_runtime::testkit::{self, Running, eventually};
use statefun_runtime::{DeadLetterReason, IngressRecord, KeyRouter, RuntimeHandle, SourcePosition, VecIngress};
use statefun_sdk::prelude::*;
use statefun_sdk::value::builtin;

const A: TypeName = TypeName::from_static("fan/a");
const B: TypeName = TypeName::from_static("fan/b");
const SEEN: ValueSpec<i64> = ValueSpec::named("seen");
const KEYS: usize = 10;

fn count(ctx: &mut Context, _msg: Message) -> FunctionResult {
    let n = ctx.storage().get(&SEEN)?.unwrap_or(0) + 1;
    ctx.storage().set(&SEEN, &n)?;
    Ok(())
}

fn module() -> Module {
    Module::builder()
        .with_fn(FunctionSpec::new(A).with_state(SEEN), count)
        .with_fn(FunctionSpec::new(B).with_state(SEEN), count)
        .build()
        .unwrap()
}

/// Records `0..n` of source `src/0`, keyed `k0`..`k9`.
fn records(n: usize) -> Vec<IngressRecord> {
    (0..n)
        .map(|i| IngressRecord {
            position: Some(SourcePosition {
                topic: "src".into(),
                partition: 0,
                offset: i as i64,
            }),
            ..IngressRecord::new(Bytes::from(format!("k{}", i % KEYS)), Bytes::from(format!("v{i}")))
        })
        .collect()
}

fn start(records: Vec<IngressRecord>, targets: Vec<TypeName>, durable: Option<&std::path::Path>) -> Running {
    let router = KeyRouter::to_all(targets, builtin::STRING).unwrap();
    let mut runtime = testkit::runtime(module())
        .partitions(4)
        .ingress(VecIngress::new("src", records), router);
    if let Some(dir) = durable {
        runtime = runtime.backend(RocksDbBackend::open(dir, RocksDbOptions::default()).unwrap());
    }
    runtime.start()
}

/// Total of `t`'s per-key counts, after the source is done.
async fn total(h: &RuntimeHandle, t: &TypeName) -> i64 {
    let mut sum = 0;
    for k in 0..KEYS {
        sum += h
            .state(&Address::new(t.clone(), format!("k{k}")).unwrap(), &SEEN)
            .await
            .unwrap()
            .unwrap_or(0);
    }
    sum
}

/// Waits until every type of `t` has counted at least `expect` records.
async fn settle(h: &RuntimeHandle, t: &[TypeName], expect: i64) {
    eventually(&format!("every target counted {expect} records"), || async {
        h.wait_idle().await;
        let mut all = true;
        for t in t {
            all &= total(h, t).await >= expect;
        }
        all
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_gets_each_record_once_in_memory() {
    let r = start(records(100), vec![A, B], None);
    settle(&r.handle, &[A, B], 100).await;
    assert_eq!((total(&r.handle, &A).await, total(&r.handle, &B).await), (100, 100));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_source_delivers_no_record_twice_to_any_target_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // First run: the first 60 records.
    let r = start(records(60), vec![A, B], Some(dir.path()));
    settle(&r.handle, &[A, B], 60).await;
    assert_eq!((total(&r.handle, &A).await, total(&r.handle, &B).await), (60, 60));
    r.stop().await; // drops the handle: releases the database
    // Second run: the source starts over from offset 0 (all 100): the 60 accepted
    // before are skipped for both targets, the 40 new reach both.
    let r = start(records(100), vec![A, B], Some(dir.path()));
    settle(&r.handle, &[A, B], 100).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.handle.wait_idle().await;
    assert_eq!((total(&r.handle, &A).await, total(&r.handle, &B).await), (100, 100));
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_of_an_unknown_type_is_dead_lettered_and_the_others_get_the_record() {
    let unknown = TypeName::from_static("fan/unknown");
    // The unknown type first: the next target takes the record's place.
    let r = start(records(20), vec![unknown.clone(), A, B], None);
    settle(&r.handle, &[A, B], 20).await;
    assert_eq!((total(&r.handle, &A).await, total(&r.handle, &B).await), (20, 20));
    let dead = r.dead.letters();
    assert_eq!(dead.len(), 20);
    assert!(
        dead.iter()
            .all(|d| d.reason == DeadLetterReason::UnknownFunctionType(unknown.clone()))
    );
    r.stop().await;
}
