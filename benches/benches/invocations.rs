//! Invocations per second of a trivial stateful function (read-modify-write of one
//! `ValueSpec<u64>`, in-memory state) through the whole runtime: handle -> partition
//! ingress queue -> mailbox -> invocation -> effects applied -> state written. Measured
//! for 1, 2, 4 and 8 partitions on a 2-worker tokio runtime, next to the same function
//! called directly (context built, function invoked, effects collected, value written to
//! a HashMap) in the same run: the ceiling for one core with no runtime around it. And
//! the same through the runtime on RocksDB in durable mode (state, inbox entries and
//! progress written per commit; exactly-once across crashes), 1 and 8 partitions.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use statefun_benches::{COUNT, COUNTER, counter, module};
use statefun_runtime::state::{RocksDbBackend, RocksDbOptions};
use statefun_runtime::{Runtime, RuntimeConfig};
use statefun_sdk::bytes::Bytes;
use statefun_sdk::{Address, Context, StateSpec, TypedValue, ValueType};
use tokio_util::sync::CancellationToken;

/// Messages per measured batch, spread over this many addresses.
const MESSAGES: u64 = 20_000;
const ADDRESSES: usize = 4096;

fn addresses() -> Vec<Address> {
    (0..ADDRESSES)
        .map(|i| Address::new(COUNTER, format!("k{i}")).unwrap())
        .collect()
}

fn through_runtime(c: &mut Criterion) {
    run_group(c, "invocations/runtime", &[1, 2, 4, 8], false);
}

fn through_runtime_durable(c: &mut Criterion) {
    run_group(c, "invocations/runtime-rocksdb-durable", &[1, 8], true);
}

fn run_group(c: &mut Criterion, name: &str, partition_counts: &[u32], durable: bool) {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(MESSAGES));
    group.measurement_time(Duration::from_secs(8));
    group.sample_size(20);
    let one = TypedValue::of(&1u64).unwrap();
    let addrs = addresses();
    for &partitions in partition_counts {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut builder = Runtime::builder()
            .config(RuntimeConfig {
                partitions,
                ..Default::default()
            })
            .module(module());
        if durable {
            builder = builder.state_backend(RocksDbBackend::open(dir.path(), RocksDbOptions::default()).unwrap());
        }
        let runtime = builder.build().unwrap();
        let handle = runtime.handle();
        let stop = CancellationToken::new();
        let running = rt.spawn(runtime.run(stop.clone().cancelled_owned()));
        group.bench_function(format!("partitions={partitions}"), |b| {
            b.iter_custom(|iters| {
                let handle = handle.clone();
                let addrs = addrs.clone();
                let one = one.clone();
                rt.block_on(async move {
                    let start = Instant::now();
                    for _ in 0..iters {
                        for i in 0..MESSAGES as usize {
                            handle.send(addrs[i % ADDRESSES].clone(), one.clone()).await.unwrap();
                        }
                    }
                    handle.wait_idle().await;
                    start.elapsed()
                })
            })
        });
        stop.cancel();
        rt.block_on(running).unwrap().unwrap();
    }
    group.finish();
}

fn direct_call(c: &mut Criterion) {
    let mut group = c.benchmark_group("invocations/direct-call-baseline");
    group.throughput(Throughput::Elements(MESSAGES));
    let states: Arc<[StateSpec]> = vec![COUNT.to_state_spec()].into();
    let one = TypedValue::of(&1u64).unwrap();
    let addrs = addresses();
    let mut store: HashMap<Address, Bytes> = HashMap::new();
    group.bench_function("same function, no runtime", |b| {
        b.iter(|| {
            for i in 0..MESSAGES as usize {
                let a = &addrs[i % ADDRESSES];
                let mut ctx = Context::new(a.clone(), Arc::clone(&states), vec![store.get(a).cloned()]);
                counter(&mut ctx, one.clone()).unwrap();
                let effects = ctx.into_effects();
                for m in effects.state {
                    if let Some(v) = m.value {
                        store.insert(a.clone(), v);
                    }
                }
            }
            black_box(&store);
        })
    });
    group.finish();
    // The function really counted (when the bench ran: a filter such as
    // `--bench invocations/runtime` skips it, and then nothing was stored).
    let total: u64 = store.values().map(|v| u64::decode(v).unwrap()).sum();
    assert!(total > 0 || store.is_empty());
}

criterion_group!(benches, direct_call, through_runtime, through_runtime_durable);
criterion_main!(benches);
