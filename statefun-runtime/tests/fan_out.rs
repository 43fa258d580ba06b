//! Ingress records for several function types (StateFun's ingress topics with several
//! targets, `KeyRouter::to_all`): every target gets each record once. In durable mode
//! the record is accepted once, with one inbox entry per target in the write that
//! stores the progress past it: a source that replays records already accepted (after
//! a restart) delivers none of them again, to any target. A target of an unknown type
//! is dead-lettered while the others get the record.

use std::time::Duration;

use bytes::Bytes;
use statefun_runtime::state::{RocksDbBackend, RocksDbOptions};
use statefun_runtime::{
    CollectingDeadLetters, DeadLetterReason, IngressRecord, KeyRouter, Runtime, RuntimeConfig, RuntimeHandle,
    SourcePosition, VecIngress,
};
use statefun_sdk::prelude::*;
use statefun_sdk::value::builtin;
use tokio_util::sync::CancellationToken;

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

struct Running {
    h: RuntimeHandle,
    dead: CollectingDeadLetters,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<statefun_runtime::RunReport, statefun_runtime::Error>>,
}

fn start(records: Vec<IngressRecord>, targets: Vec<TypeName>, durable: Option<&std::path::Path>) -> Running {
    let dead = CollectingDeadLetters::new();
    let router = KeyRouter::to_all(targets, builtin::STRING).unwrap();
    let mut b = Runtime::builder()
        .config(RuntimeConfig {
            partitions: 4,
            ..Default::default()
        })
        .module(module())
        .ingress(VecIngress::new("src", records), router)
        .dead_letters(dead.clone());
    if let Some(dir) = durable {
        b = b.state_backend(RocksDbBackend::open(dir, RocksDbOptions::default()).unwrap());
    }
    let runtime = b.build().unwrap();
    let h = runtime.handle();
    let stop = CancellationToken::new();
    let task = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    Running { h, dead, stop, task }
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

async fn settle(h: &RuntimeHandle, t: &[TypeName], expect: i64) {
    for _ in 0..500 {
        h.wait_idle().await;
        let mut all = true;
        for t in t {
            all &= total(h, t).await >= expect;
        }
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_gets_each_record_once_in_memory() {
    let r = start(records(100), vec![A, B], None);
    settle(&r.h, &[A, B], 100).await;
    assert_eq!((total(&r.h, &A).await, total(&r.h, &B).await), (100, 100));
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_source_delivers_no_record_twice_to_any_target_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    // First run: the first 60 records.
    let r = start(records(60), vec![A, B], Some(dir.path()));
    settle(&r.h, &[A, B], 60).await;
    assert_eq!((total(&r.h, &A).await, total(&r.h, &B).await), (60, 60));
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
    drop(r.h); // releases the database
    // Second run: the source starts over from offset 0 (all 100): the 60 accepted
    // before are skipped for both targets, the 40 new reach both.
    let r = start(records(100), vec![A, B], Some(dir.path()));
    settle(&r.h, &[A, B], 100).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.h.wait_idle().await;
    assert_eq!((total(&r.h, &A).await, total(&r.h, &B).await), (100, 100));
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_of_an_unknown_type_is_dead_lettered_and_the_others_get_the_record() {
    let unknown = TypeName::from_static("fan/unknown");
    // The unknown type first: the next target takes the record's place.
    let r = start(records(20), vec![unknown.clone(), A, B], None);
    settle(&r.h, &[A, B], 20).await;
    assert_eq!((total(&r.h, &A).await, total(&r.h, &B).await), (20, 20));
    let dead = r.dead.letters();
    assert_eq!(dead.len(), 20);
    assert!(
        dead.iter()
            .all(|d| d.reason == DeadLetterReason::UnknownFunctionType(unknown.clone()))
    );
    r.stop.cancel();
    r.task.await.unwrap().unwrap();
}
