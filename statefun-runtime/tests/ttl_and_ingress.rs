//! State expiry inside the runtime (paused clock): expired values are never returned to
//! the function or to a state query, `AfterCall` values are kept alive by invocations.
//! And the channel ingress: records pushed through a `MemoryIngress` are routed by a
//! `KeyRouter` and processed; the runtime keeps running after the source ends.

use std::time::Duration;

use statefun_runtime::testkit::{self, Running, advance, eventually};
use statefun_runtime::{IngressRecord, KeyRouter, MemoryIngress, RuntimeHandle};
use statefun_sdk::prelude::*;
use statefun_sdk::value::builtin;

const F: TypeName = TypeName::from_static("test/ttl");
const W: ValueSpec<i64> = ValueSpec::named("w").expire_after_write(Duration::from_secs(10));
const C: ValueSpec<i64> = ValueSpec::named("c").expire_after_call(Duration::from_secs(10));
const SEEN: TypeName = TypeName::from_static("test/seen");

/// "set" writes both values; "look" reports on the egress what the function sees.
fn f(ctx: &mut Context, msg: Message) -> FunctionResult {
    match msg.decode::<String>()?.as_str() {
        "set" => {
            ctx.storage().set(&W, &1)?;
            ctx.storage().set(&C, &1)?;
        }
        _ => {
            let seen = format!("{:?}/{:?}", ctx.storage().get(&W)?, ctx.storage().get(&C)?);
            ctx.send_egress(SEEN, &seen)?;
        }
    }
    Ok(())
}

/// Starts `f` with its egress collected, and `ingress` routed to it by key.
fn start(ingress: Option<MemoryIngress>) -> Running {
    let module = Module::builder()
        .with_fn(FunctionSpec::new(F).with_state(W).with_state(C), f)
        .build()
        .unwrap();
    let mut runtime = testkit::runtime(module).egress(SEEN);
    if let Some(i) = ingress {
        runtime = runtime.ingress(i, KeyRouter::new(F, builtin::STRING));
    }
    runtime.start()
}

async fn cmd(h: &RuntimeHandle, c: &str) {
    h.send_value(Address::new(F, "x").unwrap(), &c.to_string())
        .await
        .unwrap();
    h.wait_idle().await;
}

#[tokio::test(start_paused = true)]
async fn expired_state_is_never_returned_and_after_call_is_refreshed_by_calls() {
    let r = start(None);
    let (h, seen) = (&r.handle, &r.egress);
    let x = Address::new(F, "x").unwrap();
    cmd(h, "set").await;
    advance(Duration::from_secs(6)).await;
    cmd(h, "look").await; // t=6: both alive; the call refreshes C to t=16
    advance(Duration::from_secs(6)).await; // t=12: W expired at t=10
    assert_eq!(h.state(&x, &W).await.unwrap(), None);
    assert_eq!(h.state(&x, &C).await.unwrap(), Some(1));
    cmd(h, "look").await; // refreshes C to t=22
    advance(Duration::from_secs(11)).await; // t=23
    assert_eq!(h.state(&x, &C).await.unwrap(), None);
    cmd(h, "look").await;
    let views: Vec<String> = seen.records().iter().map(|r| r.message.decode().unwrap()).collect();
    assert_eq!(views, vec!["Some(1)/Some(1)", "None/Some(1)", "None/None"]);
}

// Paused clock: the polling sleep in `eventually` advances virtual time only once every
// task is idle, so it costs no real time and cannot race.
#[tokio::test(start_paused = true)]
async fn records_pushed_into_a_channel_ingress_are_routed_by_key_and_processed() {
    let (ingress, tx) = MemoryIngress::channel("pos-events", 8);
    let r = start(Some(ingress));
    let (h, seen) = (&r.handle, &r.egress);
    let look = TypedValue::of(&"look".to_string()).unwrap().bytes().unwrap().clone();
    for id in ["a", "b", "c", "a"] {
        tx.send(IngressRecord::new(id.to_string(), look.clone())).await.unwrap();
    }
    drop(tx); // the source ends; the runtime keeps serving
    eventually("the four records reach the egress", || async {
        seen.records().len() == 4
    })
    .await;
    let mut sources: Vec<String> = seen.records().iter().map(|r| r.source.id().to_owned()).collect();
    sources.sort();
    assert_eq!(sources, vec!["a", "a", "b", "c"]);
    h.send_value(Address::new(F, "d").unwrap(), &"look".to_string())
        .await
        .unwrap();
    h.wait_idle().await;
    assert_eq!(seen.records().len(), 5);
}
