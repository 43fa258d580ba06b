//! Durable mode across restarts of the runtime in one process, on real RocksDB in a
//! temp dir (the crash case, with real process kills, is `statefun-crash-test`).
//! Proves: delayed messages and their cancellations survive a restart and fire when
//! due; a message accepted but never finished (the function was stuck when the drain
//! timeout ended the run) is processed after the restart; a replayable source that is
//! restarted (resuming from its committed offset, partitions skipping what they already
//! accepted) has each record counted exactly once; an expiry notice (our addition to
//! TTL) is delivered once, with the last value, also when the deadline passes after a
//! restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use statefun_runtime::state::{RocksDbBackend, RocksDbOptions};
use statefun_runtime::testkit::{self, Running, eventually};
use statefun_runtime::{GeneratorIngress, IngressRecord, KeyRouter, RuntimeConfig, RuntimeHandle};
use statefun_sdk::prelude::*;

mod common;
use common::{COUNTER, FIRED, LAST, SEEN, TIMER, counter_module, timer_fn};

fn at(id: &str) -> Address {
    Address::new(TIMER, id).unwrap()
}

/// Starts `module` on a RocksDB backend in `dir`.
fn start(dir: &std::path::Path, module: Module, config: RuntimeConfig) -> Running {
    let backend = RocksDbBackend::open(dir, RocksDbOptions::default()).unwrap();
    testkit::runtime(module).config(config).backend(backend).start()
}

fn timer_module() -> Module {
    Module::builder()
        .with_fn(FunctionSpec::new(TIMER).with_state(FIRED).with_state(LAST), timer_fn)
        .build()
        .unwrap()
}

fn four_partitions() -> RuntimeConfig {
    RuntimeConfig {
        partitions: 4,
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn delayed_messages_and_cancellations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path(), timer_module(), four_partitions());
    r.handle.send_value(at("a"), &"arm:x".to_string()).await.unwrap();
    r.handle.send_value(at("b"), &"arm:never".to_string()).await.unwrap();
    r.handle.send_value(at("b"), &"disarm:".to_string()).await.unwrap();
    r.handle.send_value(at("d"), &"arm_other:c".to_string()).await.unwrap();
    r.handle.wait_idle().await;
    let pending: usize = r.handle.stats().await.unwrap().iter().map(|s| s.pending_delayed).sum();
    assert_eq!(pending, 2, "a's and d's timers are pending, b's was cancelled");
    r.stop().await;

    let r = start(dir.path(), timer_module(), four_partitions());
    tokio::time::sleep(Duration::from_secs(4)).await;
    r.handle.wait_idle().await;
    assert_eq!(r.handle.state(&at("c"), &FIRED).await.unwrap(), None, "not due yet");
    tokio::time::sleep(Duration::from_secs(7)).await;
    r.handle.wait_idle().await;
    assert_eq!(r.handle.state(&at("a"), &LAST).await.unwrap().as_deref(), Some("x"));
    assert_eq!(
        r.handle.state(&at("c"), &LAST).await.unwrap().as_deref(),
        Some("remote")
    );
    assert_eq!(
        r.handle.state(&at("b"), &FIRED).await.unwrap(),
        None,
        "cancelled before the restart"
    );
    r.stop().await;

    // Fired timers are gone from the log: a third start has nothing pending.
    let r = start(dir.path(), timer_module(), four_partitions());
    let pending: usize = r.handle.stats().await.unwrap().iter().map(|s| s.pending_delayed).sum();
    assert_eq!(pending, 0);
    assert_eq!(
        r.handle.state(&at("a"), &FIRED).await.unwrap(),
        Some(1),
        "fired exactly once"
    );
    r.stop().await;
}

const STUCK: TypeName = TypeName::from_static("test/stuck");

struct MaybeStuck(Arc<AtomicBool>);

#[async_trait]
impl StatefulFunction for MaybeStuck {
    async fn invoke(&self, ctx: &mut Context, _msg: Message) -> FunctionResult {
        if self.0.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let n = ctx.storage().get(&SEEN)?.unwrap_or(0) + 1;
        ctx.storage().set(&SEEN, &n)?;
        Ok(())
    }
}

fn stuck_module(stuck: bool) -> Module {
    Module::builder()
        .with_function(
            FunctionSpec::new(STUCK).with_state(SEEN),
            MaybeStuck(Arc::new(AtomicBool::new(stuck))),
        )
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_message_accepted_but_unfinished_is_processed_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = RuntimeConfig {
        partitions: 2,
        drain_timeout_ms: 100,
        ..Default::default()
    };
    let a = Address::new(STUCK, "a").unwrap();
    let r = start(dir.path(), stuck_module(true), config.clone());
    r.handle.send_value(a.clone(), &1i64).await.unwrap();
    // Accepted into the inbox within a loop turn; the function never returns.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = r.stop().await;
    assert!(!report.drained, "the run ended with the message unfinished");

    let r = start(dir.path(), stuck_module(false), config);
    assert_eq!(r.handle.outstanding(), 1, "recovered from the inbox");
    r.handle.wait_idle().await;
    assert_eq!(r.handle.state(&a, &SEEN).await.unwrap(), Some(1));
    r.stop().await;
}

const RECORD: TypeName = TypeName::from_static("test/record");

fn generator(count: u64) -> GeneratorIngress {
    GeneratorIngress::new("gen", 7, count, |seed, offset| {
        IngressRecord::new(format!("k{}", (seed + offset) % 5), offset.to_string())
    })
}

#[tokio::test]
async fn a_replayable_source_is_counted_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let total = |h: RuntimeHandle| async move {
        let mut sum = 0;
        for k in 0..5 {
            sum += h
                .state(&Address::new(COUNTER, format!("k{k}")).unwrap(), &SEEN)
                .await
                .unwrap()
                .unwrap_or(0);
        }
        sum
    };
    for (count, expected) in [(100u64, 100i64), (150, 150), (150, 150)] {
        let backend = RocksDbBackend::open(dir.path(), RocksDbOptions::default()).unwrap();
        let r = testkit::runtime(counter_module())
            .config(four_partitions())
            .backend(backend)
            .ingress(generator(count), KeyRouter::new(COUNTER, RECORD))
            .start();
        eventually(&format!("{expected} records counted"), || {
            let h = r.handle.clone();
            async move { total(h).await >= expected }
        })
        .await;
        r.handle.wait_idle().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(total(r.handle.clone()).await, expected, "each record counted once");
        r.stop().await;
    }
}

const CART: TypeName = TypeName::from_static("test/cart");
const BASKET: ValueSpec<String> = ValueSpec::named("basket")
    .expire_after_call(Duration::from_secs(10))
    .notify_on_expire();
const RELEASED: ValueSpec<String> = ValueSpec::named("released");

/// Adds items to a basket; when the basket expires, records what it held.
fn cart(ctx: &mut Context, msg: Message) -> FunctionResult {
    if msg.is::<Expired>() {
        let e: Expired = msg.decode()?;
        if ctx.storage().get(&BASKET)?.is_some() {
            return Err("the expired value must be gone when the notice arrives".into());
        }
        let before = ctx.storage().get(&RELEASED)?.unwrap_or_default();
        ctx.storage()
            .set(&RELEASED, &format!("{before}[{}]", e.value_as::<String>()?))?;
        return Ok(());
    }
    let item: String = msg.decode()?;
    if item == "clear" {
        ctx.storage().remove(&BASKET)?;
        return Ok(());
    }
    let b = ctx.storage().get(&BASKET)?.unwrap_or_default() + &item;
    ctx.storage().set(&BASKET, &b)?;
    Ok(())
}

fn cart_module() -> Module {
    Module::builder()
        .with_fn(FunctionSpec::new(CART).with_state(BASKET).with_state(RELEASED), cart)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_expiry_notice_is_delivered_once_with_the_last_value_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = Address::new(CART, "c1").unwrap();
    let r = start(dir.path(), cart_module(), four_partitions());
    r.handle.send_value(c.clone(), &"a".to_string()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    r.handle.send_value(c.clone(), &"b".to_string()).await.unwrap(); // refreshed: due at t=18
    r.handle.wait_idle().await;
    r.stop().await;

    // Deadlines are wall-clock milliseconds; the paused test clock starts again from the
    // real time at restart, so the basket expires about 18 s into the second run.
    let r = start(dir.path(), cart_module(), four_partitions());
    tokio::time::sleep(Duration::from_secs(9)).await;
    r.handle.wait_idle().await;
    assert_eq!(r.handle.state(&c, &RELEASED).await.unwrap(), None, "not expired yet");
    tokio::time::sleep(Duration::from_secs(10)).await;
    r.handle.wait_idle().await;
    assert_eq!(r.handle.state(&c, &RELEASED).await.unwrap().as_deref(), Some("[ab]"));
    assert_eq!(r.handle.state(&c, &BASKET).await.unwrap(), None);
    tokio::time::sleep(Duration::from_secs(60)).await;
    r.handle.wait_idle().await;
    assert_eq!(
        r.handle.state(&c, &RELEASED).await.unwrap().as_deref(),
        Some("[ab]"),
        "delivered exactly once"
    );
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_expiry_notice_works_on_the_in_memory_backend_and_a_delete_cancels_it() {
    let r = testkit::runtime(cart_module()).start();
    let h = &r.handle;
    let kept = Address::new(CART, "kept").unwrap();
    let cleared = Address::new(CART, "cleared").unwrap();
    h.send_value(kept.clone(), &"x".to_string()).await.unwrap();
    h.send_value(cleared.clone(), &"y".to_string()).await.unwrap();
    h.send_value(cleared.clone(), &"clear".to_string()).await.unwrap();
    h.wait_idle().await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    h.wait_idle().await;
    assert_eq!(h.state(&kept, &RELEASED).await.unwrap().as_deref(), Some("[x]"));
    assert_eq!(h.state(&cleared, &RELEASED).await.unwrap(), None, "deleted: no notice");
    let pending: usize = h.stats().await.unwrap().iter().map(|s| s.pending_delayed).sum();
    assert_eq!(pending, 0);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_message_arriving_after_the_deadline_gets_the_expiry_notice_delivered_first() {
    // The notice's timer and a message become ready in the same loop turn: the message
    // must not overwrite the expired value before its notice is delivered.
    let r = testkit::runtime(cart_module()).start();
    let h = &r.handle;
    let c = Address::new(CART, "late").unwrap();
    h.send_value(c.clone(), &"a".to_string()).await.unwrap();
    h.wait_idle().await;
    tokio::time::advance(Duration::from_millis(10_005)).await;
    h.send_value(c.clone(), &"b".to_string()).await.unwrap();
    h.wait_idle().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.wait_idle().await;
    assert_eq!(h.state(&c, &RELEASED).await.unwrap().as_deref(), Some("[a]"));
    assert_eq!(h.state(&c, &BASKET).await.unwrap().as_deref(), Some("b"));
    r.stop().await;
}

#[tokio::test]
async fn the_same_backend_value_can_serve_several_runs_without_reusing_log_keys() {
    // Runs 1 and 2 are built from clones of one open backend, and each leaves a message
    // unfinished in the inbox. If run 2 reused run 1's log keys, its message would
    // overwrite the first one's inbox entry. A third start must recover both.
    let dir = tempfile::tempdir().unwrap();
    let backend = RocksDbBackend::open(dir.path(), RocksDbOptions::default()).unwrap();
    let config = RuntimeConfig {
        partitions: 1,
        drain_timeout_ms: 100,
        ..Default::default()
    };
    for id in ["a", "b"] {
        let r = testkit::runtime(stuck_module(true))
            .config(config.clone())
            .backend(backend.clone())
            .start();
        r.handle
            .send_value(Address::new(STUCK, id).unwrap(), &1i64)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!r.stop().await.drained);
    }
    drop(backend);

    let r = start(dir.path(), stuck_module(false), config);
    assert_eq!(r.handle.outstanding(), 2, "both unfinished messages are in the inbox");
    r.handle.wait_idle().await;
    for id in ["a", "b"] {
        let seen = r.handle.state(&Address::new(STUCK, id).unwrap(), &SEEN).await.unwrap();
        assert_eq!(seen, Some(1), "{id} processed once");
    }
    r.stop().await;
}
