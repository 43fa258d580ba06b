//! Dispatch semantics: one invocation batch in flight per address, later messages
//! batched behind it, other addresses running concurrently, and ingress backpressure
//! when a partition's buffer is full.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use statefun_runtime::{Runtime, RuntimeConfig, RuntimeHandle};
use statefun_sdk::prelude::*;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const GATED: TypeName = TypeName::from_static("test/gated");
const SEEN: ValueSpec<i64> = ValueSpec::named("seen");

/// Blocks each "wait" message until the test adds a permit; tracks concurrency per
/// address id "a".
struct Gated {
    gate: Arc<Semaphore>,
    in_flight_a: Arc<AtomicUsize>,
    max_in_flight_a: Arc<AtomicUsize>,
}

#[async_trait]
impl StatefulFunction for Gated {
    async fn invoke(&self, ctx: &mut Context, msg: Message) -> FunctionResult {
        let is_a = ctx.self_address().id() == "a";
        if is_a {
            let now = self.in_flight_a.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight_a.fetch_max(now, Ordering::SeqCst);
        }
        if msg.decode::<String>()? == "wait" {
            self.gate.acquire().await?.forget();
        }
        let n = ctx.storage().get(&SEEN)?.unwrap_or(0) + 1;
        ctx.storage().set(&SEEN, &n)?;
        if is_a {
            self.in_flight_a.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

struct Fixture {
    handle: RuntimeHandle,
    gate: Arc<Semaphore>,
    max_in_flight_a: Arc<AtomicUsize>,
    stop: CancellationToken,
    running: tokio::task::JoinHandle<Result<statefun_runtime::RunReport, statefun_runtime::Error>>,
}

fn start(config: RuntimeConfig) -> Fixture {
    let gate = Arc::new(Semaphore::new(0));
    let max_in_flight_a = Arc::new(AtomicUsize::new(0));
    let module = Module::builder()
        .with_function(
            FunctionSpec::new(GATED).with_state(SEEN),
            Gated {
                gate: gate.clone(),
                in_flight_a: Arc::new(AtomicUsize::new(0)),
                max_in_flight_a: max_in_flight_a.clone(),
            },
        )
        .build()
        .unwrap();
    let runtime = Runtime::builder().config(config).module(module).build().unwrap();
    let handle = runtime.handle();
    let stop = CancellationToken::new();
    let running = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    Fixture {
        handle,
        gate,
        max_in_flight_a,
        stop,
        running,
    }
}

fn at(id: &str) -> Address {
    Address::new(GATED, id).unwrap()
}

async fn send(h: &RuntimeHandle, id: &str, what: &str) {
    h.send_value(at(id), &what.to_string()).await.unwrap();
}

/// Polls `cond` (yielding to the runtime in between) until it holds; bounded.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..2000 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("condition never held: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arriving_during_an_invocation_are_batched_into_the_next_one() {
    let f = start(RuntimeConfig {
        partitions: 2,
        ..Default::default()
    });
    send(&f.handle, "a", "wait").await;
    for _ in 0..5 {
        send(&f.handle, "a", "go").await;
    }
    // While "a" is blocked, another address on any partition is served.
    send(&f.handle, "b", "go").await;
    eventually("b processed while a is blocked", || async {
        f.handle.state(&at("b"), &SEEN).await.unwrap() == Some(1)
    })
    .await;
    assert_eq!(f.handle.state(&at("a"), &SEEN).await.unwrap(), None);

    f.gate.add_permits(1);
    f.handle.wait_idle().await;
    assert_eq!(f.handle.state(&at("a"), &SEEN).await.unwrap(), Some(6));
    assert_eq!(
        f.max_in_flight_a.load(Ordering::SeqCst),
        1,
        "one invocation at a time per address"
    );

    f.stop.cancel();
    let report = f.running.await.unwrap().unwrap();
    assert_eq!(report.invocations(), 7);
    // a: one batch for "wait", one batch for the five queued behind it; b: one batch.
    assert_eq!(report.partitions.iter().map(|p| p.batches).sum::<u64>(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_never_exceed_max_batch_size() {
    let f = start(RuntimeConfig {
        partitions: 1,
        max_batch_size: 2,
        ..Default::default()
    });
    send(&f.handle, "a", "wait").await;
    for _ in 0..5 {
        send(&f.handle, "a", "go").await;
    }
    f.gate.add_permits(1);
    f.handle.wait_idle().await;
    f.stop.cancel();
    let report = f.running.await.unwrap().unwrap();
    assert_eq!(report.invocations(), 6);
    // 1 ("wait") + ceil(5 / 2) = 4 batches.
    assert_eq!(report.partitions[0].batches, 4);
}

#[tokio::test(start_paused = true)]
async fn an_address_with_a_full_backlog_pauses_its_partitions_ingress_until_it_drains() {
    let f = start(RuntimeConfig {
        partitions: 1,
        max_queued_per_address: 3,
        ingress_queue_capacity: 1,
        ..Default::default()
    });
    send(&f.handle, "a", "wait").await;
    for _ in 0..3 {
        send(&f.handle, "a", "go").await;
    }
    eventually("a's batch is in flight with 3 queued behind it", || async {
        f.handle.stats().await.unwrap()[0].buffered == 4
    })
    .await;
    // The partition's buffer (10 000 by default) is far from full, but a's backlog is:
    // one more record fits in the ingress queue, the next one (for any address) waits.
    send(&f.handle, "b", "go").await;
    let go = "go".to_string();
    let blocked = f.handle.send_value(at("c"), &go);
    tokio::pin!(blocked);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut blocked)
            .await
            .is_err(),
        "send should wait while an address's backlog is full"
    );
    assert_eq!(
        f.handle.state(&at("b"), &SEEN).await.unwrap(),
        None,
        "b was not taken in"
    );
    f.gate.add_permits(1);
    blocked.await.unwrap();
    f.handle.wait_idle().await;
    assert_eq!(f.handle.state(&at("a"), &SEEN).await.unwrap(), Some(4));
    assert_eq!(f.handle.state(&at("b"), &SEEN).await.unwrap(), Some(1));
    assert_eq!(f.handle.state(&at("c"), &SEEN).await.unwrap(), Some(1));
    f.stop.cancel();
    f.running.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_full_partition_stops_taking_ingress_until_it_drains() {
    let f = start(RuntimeConfig {
        partitions: 1,
        max_buffered_per_partition: 4,
        ingress_queue_capacity: 1,
        ..Default::default()
    });
    for _ in 0..4 {
        send(&f.handle, "a", "wait").await;
    }
    eventually("partition holds 4 messages", || async {
        f.handle.stats().await.unwrap()[0].buffered == 4
    })
    .await;
    // One more fits in the ingress queue; the next send must wait.
    send(&f.handle, "a", "go").await;
    let go = "go".to_string();
    let blocked = f.handle.send_value(at("a"), &go);
    tokio::pin!(blocked);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut blocked)
            .await
            .is_err(),
        "send should wait while the partition is full"
    );
    assert_eq!(f.handle.stats().await.unwrap()[0].buffered, 4, "buffer stays bounded");

    f.gate.add_permits(4);
    blocked.await.unwrap();
    f.handle.wait_idle().await;
    assert_eq!(f.handle.state(&at("a"), &SEEN).await.unwrap(), Some(6));
    f.stop.cancel();
    f.running.await.unwrap().unwrap();
}
