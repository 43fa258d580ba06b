//! Dispatch semantics: one invocation batch in flight per address, later messages
//! batched behind it, other addresses running concurrently, ingress backpressure when
//! a partition's buffer is full, and a function messaging itself in a tight loop does
//! not starve its partition (queries are answered, shutdown completes).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use statefun_runtime::testkit::{self, Running, eventually};
use statefun_runtime::{RuntimeConfig, RuntimeHandle};
use statefun_sdk::prelude::*;
use tokio::sync::Semaphore;

const GATED: TypeName = TypeName::from_static("test/gated");
const SEEN: ValueSpec<i64> = ValueSpec::named("seen");

/// Blocks each "wait" message until the test adds a permit; tracks concurrency per
/// address id "a". Clones share the gate and the counters.
#[derive(Clone)]
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

/// Starts `config`'s runtime with a [`Gated`] function; returns a clone of it to hold the
/// gate and read the counters.
fn start(config: RuntimeConfig) -> (Running, Gated) {
    let gated = Gated {
        gate: Arc::new(Semaphore::new(0)),
        in_flight_a: Arc::default(),
        max_in_flight_a: Arc::default(),
    };
    let module = Module::builder()
        .with_function(FunctionSpec::new(GATED).with_state(SEEN), gated.clone())
        .build()
        .unwrap();
    (testkit::runtime(module).config(config).start(), gated)
}

fn at(id: &str) -> Address {
    Address::new(GATED, id).unwrap()
}

async fn send(h: &RuntimeHandle, id: &str, what: &str) {
    h.send_value(at(id), &what.to_string()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arriving_during_an_invocation_are_batched_into_the_next_one() {
    let (r, gated) = start(RuntimeConfig {
        partitions: 2,
        ..Default::default()
    });
    send(&r.handle, "a", "wait").await;
    for _ in 0..5 {
        send(&r.handle, "a", "go").await;
    }
    // While "a" is blocked, another address on any partition is served.
    send(&r.handle, "b", "go").await;
    eventually("b processed while a is blocked", || async {
        r.handle.state(&at("b"), &SEEN).await.unwrap() == Some(1)
    })
    .await;
    assert_eq!(r.handle.state(&at("a"), &SEEN).await.unwrap(), None);

    gated.gate.add_permits(1);
    r.handle.wait_idle().await;
    assert_eq!(r.handle.state(&at("a"), &SEEN).await.unwrap(), Some(6));
    assert_eq!(
        gated.max_in_flight_a.load(Ordering::SeqCst),
        1,
        "one invocation at a time per address"
    );

    let report = r.stop().await;
    assert_eq!(report.invocations(), 7);
    // a: one batch for "wait", one batch for the five queued behind it; b: one batch.
    assert_eq!(report.partitions.iter().map(|p| p.batches).sum::<u64>(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_never_exceed_max_batch_size() {
    let (r, gated) = start(RuntimeConfig {
        partitions: 1,
        max_batch_size: 2,
        ..Default::default()
    });
    send(&r.handle, "a", "wait").await;
    for _ in 0..5 {
        send(&r.handle, "a", "go").await;
    }
    gated.gate.add_permits(1);
    r.handle.wait_idle().await;
    let report = r.stop().await;
    assert_eq!(report.invocations(), 6);
    // 1 ("wait") + ceil(5 / 2) = 4 batches.
    assert_eq!(report.partitions[0].batches, 4);
}

#[tokio::test(start_paused = true)]
async fn an_address_with_a_full_backlog_pauses_its_partitions_ingress_until_it_drains() {
    let (r, gated) = start(RuntimeConfig {
        partitions: 1,
        max_queued_per_address: 3,
        ingress_queue_capacity: 1,
        ..Default::default()
    });
    send(&r.handle, "a", "wait").await;
    for _ in 0..3 {
        send(&r.handle, "a", "go").await;
    }
    eventually("a's batch is in flight with 3 queued behind it", || async {
        r.handle.stats().await.unwrap()[0].buffered == 4
    })
    .await;
    // The partition's buffer (10 000 by default) is far from full, but a's backlog is:
    // one more record fits in the ingress queue, the next one (for any address) waits.
    send(&r.handle, "b", "go").await;
    let go = "go".to_string();
    let h = r.handle.clone(); // the pinned send below lives until the end of the test
    let blocked = h.send_value(at("c"), &go);
    tokio::pin!(blocked);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut blocked)
            .await
            .is_err(),
        "send should wait while an address's backlog is full"
    );
    assert_eq!(
        r.handle.state(&at("b"), &SEEN).await.unwrap(),
        None,
        "b was not taken in"
    );
    gated.gate.add_permits(1);
    blocked.await.unwrap();
    r.handle.wait_idle().await;
    assert_eq!(r.handle.state(&at("a"), &SEEN).await.unwrap(), Some(4));
    assert_eq!(r.handle.state(&at("b"), &SEEN).await.unwrap(), Some(1));
    assert_eq!(r.handle.state(&at("c"), &SEEN).await.unwrap(), Some(1));
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_full_partition_stops_taking_ingress_until_it_drains() {
    let (r, gated) = start(RuntimeConfig {
        partitions: 1,
        max_buffered_per_partition: 4,
        ingress_queue_capacity: 1,
        ..Default::default()
    });
    for _ in 0..4 {
        send(&r.handle, "a", "wait").await;
    }
    eventually("partition holds 4 messages", || async {
        r.handle.stats().await.unwrap()[0].buffered == 4
    })
    .await;
    // One more fits in the ingress queue; the next send must wait.
    send(&r.handle, "a", "go").await;
    let go = "go".to_string();
    let h = r.handle.clone(); // the pinned send below lives until the end of the test
    let blocked = h.send_value(at("a"), &go);
    tokio::pin!(blocked);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut blocked)
            .await
            .is_err(),
        "send should wait while the partition is full"
    );
    assert_eq!(r.handle.stats().await.unwrap()[0].buffered, 4, "buffer stays bounded");

    gated.gate.add_permits(4);
    blocked.await.unwrap();
    r.handle.wait_idle().await;
    assert_eq!(r.handle.state(&at("a"), &SEEN).await.unwrap(), Some(6));
    r.stop().await;
}

const LOOP: TypeName = TypeName::from_static("test/loop");
const N: ValueSpec<i64> = ValueSpec::named("n");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_messaging_itself_endlessly_leaves_its_partition_answering_queries_and_stopping() {
    let module = Module::builder()
        .with_fn(FunctionSpec::new(LOOP).with_state(N), |ctx, msg| {
            let left: i64 = msg.decode()?;
            ctx.storage().set(&N, &left)?;
            if left > 0 {
                let me = ctx.self_address().clone();
                ctx.send(me, &(left - 1))?;
            }
            Ok(())
        })
        .build()
        .unwrap();
    let r = testkit::runtime(module)
        .config(RuntimeConfig {
            partitions: 1,
            drain_timeout_ms: 200,
            ..Default::default()
        })
        .start();
    let h = &r.handle;
    h.send_value(Address::new(LOOP, "x").unwrap(), &i64::MAX).await.unwrap();
    // The partition is busy forever, yet it answers queries, and the loop keeps going
    // between two answers.
    let invocations = || async {
        tokio::time::timeout(Duration::from_secs(10), h.stats())
            .await
            .expect("stats answered while the loop runs")
            .unwrap()[0]
            .invocations
    };
    let first = invocations().await;
    let mut later = first;
    for _ in 0..10_000 {
        later = invocations().await;
        if later > first {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(later > first, "the loop progressed between queries: {first} -> {later}");
    let report = tokio::time::timeout(Duration::from_secs(10), r.stop())
        .await
        .expect("shutdown completes");
    assert!(!report.drained, "the endless loop cannot drain; the timeout bounds it");
}
