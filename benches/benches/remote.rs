//! Remote invocations per second of the trivial counter (read-modify-write of one
//! `u64`) through the whole runtime, with the function embedded, served over HTTP
//! (StateFun's request-reply protocol) and over gRPC by the SDK's `RemoteServer` on
//! 127.0.0.1, all in the same run. The server runs on its own 1-thread tokio runtime
//! (its own thread; the machine has 2 cores, so runtime and server share them).
//!
//! Batching decides the cost: each request carries every message that queued for its
//! address while the previous request was in flight. So each transport is measured with
//! 20 000 messages over 64 addresses (large batches, ~300 messages per request at
//! steady state) and over 4096 addresses (small batches).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use statefun_benches::{COUNTER, module};
use statefun_remote::{GrpcTransport, HttpTransport, RemoteOptions};
use statefun_runtime::{Runtime, RuntimeConfig};
use statefun_sdk::remote::RemoteServer;
use statefun_sdk::{Address, FunctionSpec, Module, StatefulFunction, TypedValue};
use tokio_util::sync::CancellationToken;

const MESSAGES: u64 = 20_000;

/// Serves the counter on 127.0.0.1 from a thread of its own; returns the port.
fn serve() -> u16 {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = std_listener.local_addr().unwrap().port();
    std_listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            RemoteServer::new(module())
                .serve(listener, std::future::pending())
                .await
                .unwrap();
        });
    });
    port
}

fn bench(c: &mut Criterion) {
    let port = serve();
    let mut group = c.benchmark_group("remote");
    group.throughput(Throughput::Elements(MESSAGES));
    group.measurement_time(Duration::from_secs(6));
    group.sample_size(10);
    let one = TypedValue::of(&1u64).unwrap();
    let options = RemoteOptions::default();
    let http = HttpTransport::new(options.clone()).unwrap();
    // The gRPC channel's connection task runs on a runtime that lives for the bench.
    let channel_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let grpc = {
        let _in = channel_rt.enter();
        GrpcTransport::new(&format!("http://127.0.0.1:{port}"), options).unwrap()
    };
    let variants: [(&str, Option<Arc<dyn StatefulFunction>>); 3] = [
        ("embedded", None),
        (
            "http",
            Some(Arc::new(
                http.function(&format!("http://127.0.0.1:{port}/statefun")).unwrap(),
            )),
        ),
        ("grpc", Some(Arc::new(grpc.function()))),
    ];
    for (name, remote) in variants {
        for addresses in [64usize, 4096] {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let functions = match &remote {
                None => module(),
                // Declares no state: the handshake registers it on first use.
                Some(f) => Module::builder()
                    .with_shared_function(FunctionSpec::new(COUNTER), Arc::clone(f))
                    .build()
                    .unwrap(),
            };
            let runtime = Runtime::builder()
                .config(RuntimeConfig {
                    partitions: 2,
                    ..Default::default()
                })
                .module(functions)
                .build()
                .unwrap();
            let handle = runtime.handle();
            let stop = CancellationToken::new();
            let running = rt.spawn(runtime.run(stop.clone().cancelled_owned()));
            let addrs: Vec<Address> = (0..addresses)
                .map(|i| Address::new(COUNTER, format!("k{i}")).unwrap())
                .collect();
            group.bench_function(format!("{name}/addresses={addresses}"), |b| {
                b.iter_custom(|iters| {
                    let handle = handle.clone();
                    let addrs = addrs.clone();
                    let one = one.clone();
                    rt.block_on(async move {
                        let start = Instant::now();
                        for _ in 0..iters {
                            for i in 0..MESSAGES as usize {
                                handle.send(addrs[i % addrs.len()].clone(), one.clone()).await.unwrap();
                            }
                        }
                        handle.wait_idle().await;
                        start.elapsed()
                    })
                })
            });
            // Every message was counted: nothing failed or was parked.
            let parked = rt.block_on(handle.parked()).unwrap();
            assert!(parked.is_empty(), "{name}: {parked:?}");
            stop.cancel();
            let report = rt.block_on(running).unwrap().unwrap();
            assert_eq!(report.partitions.iter().map(|p| p.failures).sum::<u64>(), 0, "{name}");
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
