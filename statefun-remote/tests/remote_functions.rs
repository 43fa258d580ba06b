//! A Rust function hosted by the SDK's `RemoteServer` (a real HTTP and gRPC server on
//! 127.0.0.1, port 0) and driven by the runtime through `RemoteFunction`, over both
//! transports: the state handshake with an expiring spec, state round-tripping across
//! calls, every effect kind, and batching while a request is in flight.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::start_with;
use statefun_remote::{GrpcTransport, HttpTransport, RemoteOptions};
use statefun_runtime::testkit::{Running, eventually};
use statefun_sdk::prelude::*;
use statefun_sdk::remote::RemoteServer;
use statefun_sdk::{BatchError, Invocation, StatefulFunction};
use tokio::sync::Semaphore;

const CART: TypeName = TypeName::from_static("test/cart");
const AUDIT: TypeName = TypeName::from_static("test/audit");
const OUT: TypeName = TypeName::from_static("test/out");
const ITEMS: ValueSpec<i64> = ValueSpec::named("items");
/// The tick's delay and the note's expiry: long enough that a slow or loaded machine
/// finishes the steps the test expects to come first (a replacing "add", a state read)
/// well within them.
const TICK_DELAY: Duration = Duration::from_secs(1);
const NOTE_EXPIRY: Duration = Duration::from_secs(1);
const NOTE: ValueSpec<String> = ValueSpec::named("note").expire_after_write(NOTE_EXPIRY);
const AUDITED: ValueSpec<i64> = ValueSpec::named("audited");

/// The hosted function. "add:N" adds N items, notes the message, tells the audit
/// function the new count, writes an egress record and schedules a "tick" to itself in
/// [`TICK_DELAY`] under token "t" (replacing the previous one); "cancel" cancels the tick; "tick"
/// writes "tick" to the egress; "wait" blocks until the test adds a permit. Records the
/// address id and the messages of every batch it runs.
#[derive(Clone)]
struct Cart {
    gate: Arc<Semaphore>,
    batches: Arc<Mutex<Vec<SeenBatch>>>,
}

/// The address id and the messages of one batch.
type SeenBatch = (String, Vec<String>);

impl Cart {
    async fn one(&self, ctx: &mut Context, msg: &Message) -> FunctionResult {
        let text: String = msg.decode()?;
        let me = ctx.self_address().clone();
        if let Some(n) = text.strip_prefix("add:") {
            let items = ctx.storage().get(&ITEMS)?.unwrap_or(0) + n.parse::<i64>()?;
            ctx.storage().set(&ITEMS, &items)?;
            ctx.storage().set(&NOTE, &text)?;
            ctx.send(Address::new(AUDIT, me.id())?, &items)?;
            ctx.send_egress(OUT, &format!("{}={items}", me.id()))?;
            ctx.send_after_with_token(TICK_DELAY, me, &"tick".to_string(), "t")?;
        } else if text == "cancel" {
            ctx.cancel_delayed("t");
        } else if text == "tick" {
            ctx.send_egress(OUT, &format!("{} tick", me.id()))?;
        } else if text == "wait" {
            self.gate.acquire().await?.forget();
        } else {
            return Err(format!("unknown command {text:?}").into());
        }
        Ok(())
    }
}

#[async_trait]
impl StatefulFunction for Cart {
    async fn invoke(&self, ctx: &mut Context, msg: Message) -> FunctionResult {
        self.one(ctx, &msg).await
    }

    async fn invoke_batch(&self, ctx: &mut Context, batch: &[Invocation]) -> Result<(), BatchError> {
        let texts = batch
            .iter()
            .map(|i| i.message.decode::<String>().unwrap_or_default())
            .collect();
        self.batches
            .lock()
            .unwrap()
            .push((ctx.self_address().id().to_owned(), texts));
        for (index, inv) in batch.iter().enumerate() {
            ctx.set_caller(inv.caller.clone());
            self.one(ctx, &inv.message)
                .await
                .map_err(|error| BatchError::Failed { index, error })?;
        }
        Ok(())
    }
}

/// Counts what the cart reports (embedded in the runtime).
fn audit(ctx: &mut Context, msg: Message) -> FunctionResult {
    let n: i64 = msg.decode()?;
    assert_eq!(
        ctx.caller().map(|c| c.type_name()),
        Some(&CART),
        "the caller is the cart"
    );
    ctx.storage().set(&AUDITED, &n)?;
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum Via {
    Http,
    Grpc,
}

struct Setup {
    running: Running,
    cart: Cart,
    _server: tokio_util::sync::DropGuard,
}

/// Serves the cart (declaring its states) on 127.0.0.1:0 and starts a runtime that
/// reaches it `via` a transport, with no state declared on the runtime's side.
async fn setup(via: Via) -> Setup {
    let cart = Cart {
        gate: Arc::new(Semaphore::new(0)),
        batches: Arc::default(),
    };
    let hosted = Module::builder()
        .with_function(FunctionSpec::new(CART).with_state(ITEMS).with_state(NOTE), cart.clone())
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(RemoteServer::new(hosted).serve(listener, stop.clone().cancelled_owned()));
    let options = RemoteOptions::default();
    let remote: Arc<dyn StatefulFunction> = match via {
        Via::Http => Arc::new(
            HttpTransport::new(options)
                .unwrap()
                .function(&format!("http://127.0.0.1:{port}/statefun/cart"))
                .unwrap(),
        ),
        Via::Grpc => Arc::new(
            GrpcTransport::new(&format!("http://127.0.0.1:{port}"), options)
                .unwrap()
                .function(),
        ),
    };
    let running = start_with(vec![(CART, remote)], OUT, 3, |m| {
        m.with_fn(FunctionSpec::new(AUDIT).with_state(AUDITED), audit)
    });
    Setup {
        running,
        cart,
        _server: stop.drop_guard(),
    }
}

fn egress_texts(r: &Running) -> Vec<String> {
    r.egress
        .records()
        .iter()
        .map(|e| e.message.decode::<String>().unwrap())
        .collect()
}

async fn state_handshake_effects_and_expiry(via: Via) {
    let s = setup(via).await;
    let h = &s.running.handle;
    let a = Address::new(CART, "a").unwrap();
    h.send_value(a.clone(), &"add:2".to_string()).await.unwrap();
    h.wait_idle().await;
    // The handshake registered both states with their types; the value came back.
    assert_eq!(h.state(&a, &ITEMS).await.unwrap(), Some(2), "{via:?}");
    assert_eq!(h.state(&a, &NOTE).await.unwrap().as_deref(), Some("add:2"));
    // The next call carries the state: the count continues. "add:3" and "cancel" go in
    // one batch (both arrive while a "wait" request is in flight), so the tick is
    // scheduled and cancelled by the same commit (a tick that fired before its cancel
    // arrived would be delivered, as it should be).
    h.send_value(a.clone(), &"wait".to_string()).await.unwrap();
    eventually("the wait batch is running", || async {
        s.cart.batches.lock().unwrap().last().map(|(_, m)| m.clone()) == Some(vec!["wait".to_string()])
    })
    .await;
    h.send_value(a.clone(), &"add:3".to_string()).await.unwrap();
    h.send_value(a.clone(), &"cancel".to_string()).await.unwrap();
    // A state query travels the partition's queue behind the two messages: once it is
    // answered, both wait in a's mailbox.
    assert_eq!(h.state(&a, &ITEMS).await.unwrap(), Some(2));
    s.cart.gate.add_permits(1);
    h.wait_idle().await;
    let batches = s.cart.batches.lock().unwrap().clone();
    assert_eq!(
        batches.last().map(|(_, m)| m.clone()),
        Some(vec!["add:3".to_string(), "cancel".to_string()]),
        "{via:?}: {batches:?}"
    );
    assert_eq!(h.state(&a, &ITEMS).await.unwrap(), Some(5));
    // Messages reached the embedded audit function, egress records the sink.
    let audited = Address::new(AUDIT, "a").unwrap();
    assert_eq!(h.state(&audited, &AUDITED).await.unwrap(), Some(5));
    assert_eq!(egress_texts(&s.running), ["a=2", "a=5"]);
    // The tick was cancelled: none arrives. A new one is scheduled and arrives.
    tokio::time::sleep(TICK_DELAY + Duration::from_millis(300)).await;
    assert_eq!(egress_texts(&s.running), ["a=2", "a=5"]);
    h.send_value(a.clone(), &"add:1".to_string()).await.unwrap();
    eventually("the delayed tick arrives", || async {
        egress_texts(&s.running).last().map(String::as_str) == Some("a tick")
    })
    .await;
    // The spec's expiry was registered: the note expires NOTE_EXPIRY after its write
    // (when "add:1" ran, TICK_DELAY before the tick), the count does not.
    tokio::time::sleep(NOTE_EXPIRY).await;
    assert_eq!(h.state(&a, &NOTE).await.unwrap(), None);
    assert_eq!(h.state(&a, &ITEMS).await.unwrap(), Some(6));
    let report = s.running.stop().await;
    assert_eq!(report.partitions.iter().map(|p| p.failures).sum::<u64>(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_state_round_trips_every_effect_applies_and_registered_expiry_holds() {
    state_handshake_effects_and_expiry(Via::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_state_round_trips_every_effect_applies_and_registered_expiry_holds() {
    state_handshake_effects_and_expiry(Via::Grpc).await;
}

async fn batching_while_in_flight(via: Via) {
    let s = setup(via).await;
    let h = &s.running.handle;
    let a = Address::new(CART, "a").unwrap();
    h.send_value(a.clone(), &"wait".to_string()).await.unwrap();
    eventually("the first batch is running", || async {
        s.cart.batches.lock().unwrap().len() == 1
    })
    .await;
    for _ in 0..5 {
        h.send_value(a.clone(), &"add:1".to_string()).await.unwrap();
    }
    // Another address is served while "a" waits.
    let b = Address::new(CART, "b").unwrap();
    h.send_value(b.clone(), &"add:7".to_string()).await.unwrap();
    eventually("b is served while a's request is in flight", || async {
        h.state(&b, &ITEMS).await.unwrap() == Some(7)
    })
    .await;
    s.cart.gate.add_permits(1);
    h.wait_idle().await;
    assert_eq!(h.state(&a, &ITEMS).await.unwrap(), Some(5));
    // a: the "wait" alone, then the five that queued behind it in one request (the
    // delayed ticks the adds schedule come later, on their own).
    let of_a: Vec<Vec<String>> = s
        .cart
        .batches
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, texts)| id == "a" && !texts.iter().any(|t| t == "tick"))
        .map(|(_, texts)| texts.clone())
        .collect();
    assert_eq!(
        of_a,
        [vec!["wait".to_string()], vec!["add:1".to_string(); 5]],
        "{via:?}"
    );
    s.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_messages_arriving_during_a_request_go_in_the_next_batch() {
    batching_while_in_flight(Via::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_messages_arriving_during_a_request_go_in_the_next_batch() {
    batching_while_in_flight(Via::Grpc).await;
}

async fn a_failing_function_parks_its_address_without_transport_retries(via: Via) {
    let s = setup(via).await;
    let h = &s.running.handle;
    let bad = Address::new(CART, "bad").unwrap();
    let started = std::time::Instant::now();
    h.send_value(bad.clone(), &"no such command".to_string()).await.unwrap();
    h.wait_idle().await;
    // The server answers a function's error with a status the transport does not
    // retry (the call timeout is 2 min): the runtime's 3 attempts park it at once.
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    let parked = h.parked().await.unwrap();
    assert_eq!(parked.len(), 1, "{via:?}: {parked:?}");
    assert!(
        parked[0].1.contains(r#"unknown command "no such command""#),
        "{}",
        parked[0].1
    );
    assert!(parked[0].1.contains("after 1 attempt(s)"), "{}", parked[0].1);
    assert_eq!(s.running.dead.letters().len(), 1);
    s.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_failing_function_parks_its_address_after_the_runtimes_attempts() {
    a_failing_function_parks_its_address_without_transport_retries(Via::Http).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_a_failing_function_parks_its_address_after_the_runtimes_attempts() {
    a_failing_function_parks_its_address_without_transport_retries(Via::Grpc).await;
}
