//! Delayed messages on processing time, driven by tokio's paused clock: they fire after
//! their delay and not before, cancellation by token stops them, a token reused while
//! pending replaces the earlier message, delayed messages reach other partitions, and a
//! delay too long for the clock stays pending without harming the partition.

use std::time::Duration;

use statefun_runtime::RuntimeHandle;
use statefun_runtime::testkit::{self, Running};
use statefun_sdk::prelude::*;

mod common;
use common::{FIRED, LAST, TIMER, timer_fn};

fn start() -> Running {
    let module = Module::builder()
        .with_fn(FunctionSpec::new(TIMER).with_state(FIRED).with_state(LAST), timer_fn)
        .build()
        .unwrap();
    testkit::runtime(module).partitions(4).start()
}

fn at(id: &str) -> Address {
    Address::new(TIMER, id).unwrap()
}

async fn cmd(h: &RuntimeHandle, id: &str, c: &str) {
    h.send_value(at(id), &c.to_string()).await.unwrap();
    h.wait_idle().await;
}

async fn pending(h: &RuntimeHandle) -> usize {
    h.stats().await.unwrap().iter().map(|p| p.pending_delayed).sum()
}

#[tokio::test(start_paused = true)]
async fn a_delayed_message_fires_after_its_delay_and_not_before() {
    let r = start();
    let h = &r.handle;
    cmd(h, "x", "arm:one").await;
    assert_eq!(pending(h).await, 1);
    r.advance(Duration::from_millis(9_999)).await;
    assert_eq!(h.state(&at("x"), &FIRED).await.unwrap(), None);
    r.advance(Duration::from_millis(2)).await;
    assert_eq!(h.state(&at("x"), &FIRED).await.unwrap(), Some(1));
    assert_eq!(pending(h).await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_delayed_message_never_fires() {
    let r = start();
    let h = &r.handle;
    cmd(h, "x", "arm:one").await;
    cmd(h, "x", "disarm:").await;
    assert_eq!(pending(h).await, 0);
    r.advance(Duration::from_secs(60)).await;
    assert_eq!(h.state(&at("x"), &FIRED).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn cancelling_is_scoped_to_the_sending_address() {
    let r = start();
    let h = &r.handle;
    cmd(h, "x", "arm:x").await;
    cmd(h, "y", "arm:y").await;
    cmd(h, "y", "disarm:").await;
    r.advance(Duration::from_secs(11)).await;
    assert_eq!(h.state(&at("x"), &FIRED).await.unwrap(), Some(1));
    assert_eq!(h.state(&at("y"), &FIRED).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn re_arming_a_pending_token_replaces_the_earlier_message() {
    let r = start();
    let h = &r.handle;
    cmd(h, "x", "arm:first").await;
    r.advance(Duration::from_secs(6)).await;
    cmd(h, "x", "arm:second").await; // due at t = 16
    r.advance(Duration::from_secs(5)).await; // t = 11: the first would have fired
    assert_eq!(h.state(&at("x"), &FIRED).await.unwrap(), None);
    r.advance(Duration::from_secs(6)).await; // t = 17
    assert_eq!(h.state(&at("x"), &FIRED).await.unwrap(), Some(1));
    assert_eq!(h.state(&at("x"), &LAST).await.unwrap().as_deref(), Some("second"));
}

#[tokio::test(start_paused = true)]
async fn delayed_messages_reach_addresses_on_other_partitions() {
    let r = start();
    let h = &r.handle;
    // Find an id on a different partition than "x".
    let px = statefun_runtime::partition_for("x", 4);
    let other = (0..100)
        .map(|i| format!("o{i}"))
        .find(|id| statefun_runtime::partition_for(id, 4) != px)
        .unwrap();
    cmd(h, "x", &format!("arm_other:{other}")).await;
    r.advance(Duration::from_secs(5)).await;
    assert_eq!(h.state(&at(&other), &LAST).await.unwrap().as_deref(), Some("remote"));
}

const LOOP: TypeName = TypeName::from_static("test/loop");
const N: ValueSpec<i64> = ValueSpec::named("n");

#[tokio::test(start_paused = true)]
async fn a_delay_of_duration_max_stays_pending_and_the_partition_keeps_working() {
    let module = Module::builder()
        .with_fn(FunctionSpec::new(LOOP).with_state(N), |ctx, msg| {
            let n: i64 = msg.decode()?;
            if n == 0 {
                let me = ctx.self_address().clone();
                ctx.send_after(Duration::MAX, me, &1i64)?;
            }
            ctx.storage().set(&N, &n)?;
            Ok(())
        })
        .build()
        .unwrap();
    let r = testkit::runtime(module).start();
    let h = &r.handle;
    let x = Address::new(LOOP, "x").unwrap();
    h.send_value(x.clone(), &0i64).await.unwrap();
    h.send_value(x.clone(), &5i64).await.unwrap();
    h.wait_idle().await;
    assert_eq!(h.state(&x, &N).await.unwrap(), Some(5), "the partition keeps working");
    let pending: usize = h.stats().await.unwrap().iter().map(|p| p.pending_delayed).sum();
    assert_eq!(pending, 1);
    r.stop().await; // panics if a partition died
}
