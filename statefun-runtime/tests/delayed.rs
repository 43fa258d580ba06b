//! Delayed messages on processing time, driven by tokio's paused clock: they fire after
//! their delay and not before, cancellation by token stops them, a token reused while
//! pending replaces the earlier message, and delayed messages reach other partitions.

use std::time::Duration;

use statefun_runtime::{Runtime, RuntimeConfig, RuntimeHandle};
use statefun_sdk::prelude::*;
use tokio_util::sync::CancellationToken;

mod common;
use common::{FIRED, LAST, TIMER, timer_fn};

fn start() -> (RuntimeHandle, CancellationToken) {
    let module = Module::builder()
        .with_fn(FunctionSpec::new(TIMER).with_state(FIRED).with_state(LAST), timer_fn)
        .build()
        .unwrap();
    let runtime = Runtime::builder()
        .config(RuntimeConfig {
            partitions: 4,
            ..Default::default()
        })
        .module(module)
        .build()
        .unwrap();
    let handle = runtime.handle();
    let stop = CancellationToken::new();
    tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    (handle, stop)
}

fn at(id: &str) -> Address {
    Address::new(TIMER, id).unwrap()
}

async fn cmd(h: &RuntimeHandle, id: &str, c: &str) {
    h.send_value(at(id), &c.to_string()).await.unwrap();
    h.wait_idle().await;
}

/// Moves the paused clock forward and lets the partitions run what became due.
async fn advance(h: &RuntimeHandle, by: Duration) {
    tokio::time::advance(by).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    h.wait_idle().await;
}

async fn pending(h: &RuntimeHandle) -> usize {
    h.stats().await.unwrap().iter().map(|p| p.pending_delayed).sum()
}

#[tokio::test(start_paused = true)]
async fn a_delayed_message_fires_after_its_delay_and_not_before() {
    let (h, _stop) = start();
    cmd(&h, "x", "arm:one").await;
    assert_eq!(pending(&h).await, 1);
    advance(&h, Duration::from_millis(9_999)).await;
    assert_eq!(h.state(&at("x"), &FIRED).await.unwrap(), None);
    advance(&h, Duration::from_millis(2)).await;
    assert_eq!(h.state(&at("x"), &FIRED).await.unwrap(), Some(1));
    assert_eq!(pending(&h).await, 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_delayed_message_never_fires() {
    let (h, _stop) = start();
    cmd(&h, "x", "arm:one").await;
    cmd(&h, "x", "disarm:").await;
    assert_eq!(pending(&h).await, 0);
    advance(&h, Duration::from_secs(60)).await;
    assert_eq!(h.state(&at("x"), &FIRED).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn cancelling_is_scoped_to_the_sending_address() {
    let (h, _stop) = start();
    cmd(&h, "x", "arm:x").await;
    cmd(&h, "y", "arm:y").await;
    cmd(&h, "y", "disarm:").await;
    advance(&h, Duration::from_secs(11)).await;
    assert_eq!(h.state(&at("x"), &FIRED).await.unwrap(), Some(1));
    assert_eq!(h.state(&at("y"), &FIRED).await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn re_arming_a_pending_token_replaces_the_earlier_message() {
    let (h, _stop) = start();
    cmd(&h, "x", "arm:first").await;
    advance(&h, Duration::from_secs(6)).await;
    cmd(&h, "x", "arm:second").await; // due at t = 16
    advance(&h, Duration::from_secs(5)).await; // t = 11: the first would have fired
    assert_eq!(h.state(&at("x"), &FIRED).await.unwrap(), None);
    advance(&h, Duration::from_secs(6)).await; // t = 17
    assert_eq!(h.state(&at("x"), &FIRED).await.unwrap(), Some(1));
    assert_eq!(h.state(&at("x"), &LAST).await.unwrap().as_deref(), Some("second"));
}

#[tokio::test(start_paused = true)]
async fn delayed_messages_reach_addresses_on_other_partitions() {
    let (h, _stop) = start();
    // Find an id on a different partition than "x".
    let px = statefun_runtime::partition_for("x", 4);
    let other = (0..100)
        .map(|i| format!("o{i}"))
        .find(|id| statefun_runtime::partition_for(id, 4) != px)
        .unwrap();
    cmd(&h, "x", &format!("arm_other:{other}")).await;
    advance(&h, Duration::from_secs(5)).await;
    assert_eq!(h.state(&at(&other), &LAST).await.unwrap().as_deref(), Some("remote"));
}
