//! Bad input and failing functions: retries with backoff, then only the failing address
//! is parked and its messages are dead-lettered with the error, while every other
//! address keeps flowing. Also: panics, transient failures, unknown function types,
//! unknown egress ids, unroutable ingress records, unparking; and a message that fails
//! inside a batch (behind messages that succeeded) gets exactly `max_attempts`
//! attempts, with backoff, like any other, with the batch hook or without.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use statefun_runtime::config::RetryConfig;
use statefun_runtime::testkit::{self, Running};
use statefun_runtime::{
    DeadLetterReason, IngressRecord, KeyRouter, RuntimeConfig, RuntimeHandle, SendError, VecIngress,
};
use statefun_sdk::prelude::*;
use tokio::sync::Semaphore;

const FLAKY: TypeName = TypeName::from_static("test/flaky");
const COUNT: ValueSpec<i64> = ValueSpec::named("count");
const OUT: TypeName = TypeName::from_static("test/out");
const NOWHERE: TypeName = TypeName::from_static("test/nowhere");

/// ids: "bad" always fails, "panic" panics, "twice" fails its first two attempts,
/// anything else counts. Message "egress-unknown" writes to an unregistered egress;
/// "send-unknown" sends to an unregistered function type.
struct Flaky {
    twice_attempts: Arc<AtomicU32>,
}

#[async_trait]
impl StatefulFunction for Flaky {
    async fn invoke(&self, ctx: &mut Context, msg: Message) -> FunctionResult {
        let cmd: String = msg.decode()?;
        // A write that must be discarded when the invocation fails.
        let n = ctx.storage().get(&COUNT)?.unwrap_or(0) + 1;
        ctx.storage().set(&COUNT, &n)?;
        match ctx.self_address().id() {
            "bad" => return Err(std::io::Error::other(format!("cannot handle {cmd}")).into()),
            "panic" => panic!("boom on {cmd}"),
            "twice" if self.twice_attempts.fetch_add(1, Ordering::SeqCst) < 2 => return Err("transient".into()),
            _ => {}
        }
        match cmd.as_str() {
            "egress-unknown" => ctx.send_egress(NOWHERE, &1i64)?,
            "send-unknown" => ctx.send(Address::new(TypeName::from_static("test/unknown"), "x")?, &1i64)?,
            _ => ctx.send_egress(OUT, &n)?,
        }
        Ok(())
    }
}

/// Starts a [`Flaky`] function on 3 partitions (3 attempts per message) with `records`
/// in its ingress; returns its count of attempts for id "twice".
fn start(records: Vec<IngressRecord>) -> (Running, Arc<AtomicU32>) {
    let twice_attempts = Arc::new(AtomicU32::new(0));
    let module = Module::builder()
        .with_function(
            FunctionSpec::new(FLAKY).with_state(COUNT),
            Flaky {
                twice_attempts: twice_attempts.clone(),
            },
        )
        .build()
        .unwrap();
    let running = testkit::runtime(module)
        .config(RuntimeConfig {
            partitions: 3,
            retry: RetryConfig {
                max_attempts: 3,
                initial_backoff_ms: 100,
                max_backoff_ms: 1000,
            },
            ..Default::default()
        })
        .egress(OUT)
        .ingress(
            VecIngress::new("test-ingress", records),
            KeyRouter::new(FLAKY, statefun_sdk::value::builtin::STRING),
        )
        .start();
    (running, twice_attempts)
}

fn at(id: &str) -> Address {
    Address::new(FLAKY, id).unwrap()
}

async fn send(h: &RuntimeHandle, id: &str, cmd: &str) {
    h.send_value(at(id), &cmd.to_string()).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failing_address_is_parked_after_its_retries_and_others_keep_flowing() {
    let (f, _) = start(vec![]);
    send(&f.handle, "bad", "m1").await;
    send(&f.handle, "bad", "m2").await;
    for _ in 0..5 {
        send(&f.handle, "good", "x").await;
    }
    f.handle.wait_idle().await;

    assert_eq!(f.handle.state(&at("good"), &COUNT).await.unwrap(), Some(5));
    assert_eq!(f.egress.records().len(), 5, "every good message reached the egress");
    // The failing invocations' state writes were discarded.
    assert_eq!(f.handle.state(&at("bad"), &COUNT).await.unwrap(), None);

    let dead = f.dead.letters();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].target.as_ref(), Some(&at("bad")));
    assert_eq!(dead[0].message.as_ref().unwrap().decode::<String>().unwrap(), "m1");
    match &dead[0].reason {
        DeadLetterReason::FunctionFailed { error, attempts } => {
            assert_eq!(*attempts, 3);
            assert!(error.contains("cannot handle m1"), "{error}");
        }
        other => panic!("unexpected reason {other:?}"),
    }
    assert!(matches!(dead[1].reason, DeadLetterReason::AddressParked { .. }));
    assert_eq!(dead[1].message.as_ref().unwrap().decode::<String>().unwrap(), "m2");

    let parked = f.handle.parked().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].0, at("bad"));

    // Later messages to the parked address go straight to the dead letters.
    send(&f.handle, "bad", "m3").await;
    f.handle.wait_idle().await;
    assert!(matches!(
        f.dead.letters()[2].reason,
        DeadLetterReason::AddressParked { .. }
    ));
    let stats = f.handle.stats().await.unwrap();
    assert_eq!(stats.iter().map(|s| s.failures).sum::<u64>(), 3);
    assert_eq!(stats.iter().map(|s| s.parked).sum::<usize>(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_function_is_treated_as_a_failure_not_a_crash() {
    let (f, _) = start(vec![]);
    send(&f.handle, "panic", "p").await;
    send(&f.handle, "good", "x").await;
    f.handle.wait_idle().await;
    let dead = f.dead.letters();
    assert_eq!(dead.len(), 1);
    match &dead[0].reason {
        DeadLetterReason::FunctionFailed { error, .. } => assert!(error.contains("boom on p"), "{error}"),
        other => panic!("unexpected reason {other:?}"),
    }
    assert_eq!(f.handle.state(&at("good"), &COUNT).await.unwrap(), Some(1));
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_is_retried_and_applied_exactly_once() {
    let (f, twice_attempts) = start(vec![]);
    send(&f.handle, "twice", "a").await;
    send(&f.handle, "twice", "b").await;
    f.handle.wait_idle().await;
    assert!(f.dead.letters().is_empty());
    assert_eq!(twice_attempts.load(Ordering::SeqCst), 4, "2 failures, then a and b");
    assert_eq!(f.handle.state(&at("twice"), &COUNT).await.unwrap(), Some(2));
    let egress: Vec<i64> = f.egress.records().iter().map(|r| r.message.decode().unwrap()).collect();
    assert_eq!(egress, vec![1, 2]);
}

#[tokio::test(start_paused = true)]
async fn an_unparked_address_takes_messages_again() {
    let (f, _) = start(vec![]);
    send(&f.handle, "bad", "m1").await;
    f.handle.wait_idle().await;
    assert!(f.handle.unpark(&at("bad")).await.unwrap());
    assert!(
        !f.handle.unpark(&at("bad")).await.unwrap(),
        "second unpark finds nothing"
    );
    assert!(f.handle.parked().await.unwrap().is_empty());
    send(&f.handle, "bad", "m2").await;
    f.handle.wait_idle().await;
    // It was invoked again (and failed again), rather than dead-lettered as parked.
    let last = f.dead.letters().pop().unwrap();
    assert!(matches!(
        last.reason,
        DeadLetterReason::FunctionFailed { attempts: 3, .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn unknown_types_unknown_egress_and_unroutable_records_are_dead_lettered() {
    let mut no_key = IngressRecord::new("k", "v");
    no_key.key = None;
    let records = vec![
        IngressRecord::new(
            "r1",
            statefun_sdk::TypedValue::of(&"x".to_string())
                .unwrap()
                .bytes()
                .unwrap()
                .clone(),
        ),
        no_key,
        IngressRecord::new(
            "r2",
            statefun_sdk::TypedValue::of(&"x".to_string())
                .unwrap()
                .bytes()
                .unwrap()
                .clone(),
        ),
    ];
    let (f, _) = start(records);
    send(&f.handle, "e", "egress-unknown").await;
    send(&f.handle, "s", "send-unknown").await;
    let err = f
        .handle
        .send_value(Address::new(TypeName::from_static("test/unknown"), "x").unwrap(), &1i64)
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::UnknownFunctionType(_)), "{err}");
    f.handle.wait_idle().await;

    let reasons: Vec<DeadLetterReason> = f.dead.letters().into_iter().map(|d| d.reason).collect();
    assert!(
        reasons.contains(&DeadLetterReason::UnknownEgress(NOWHERE)),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&DeadLetterReason::UnknownFunctionType(TypeName::from_static(
            "test/unknown"
        ))),
        "{reasons:?}"
    );
    let unroutable = f
        .dead
        .letters()
        .into_iter()
        .find(|d| matches!(d.reason, DeadLetterReason::Unroutable { .. }))
        .expect("the keyless record is dead-lettered");
    assert_eq!(unroutable.record.unwrap().value.unwrap(), &b"v"[..]);
    // The records around the bad one were processed.
    assert_eq!(f.handle.state(&at("r1"), &COUNT).await.unwrap(), Some(1));
    assert_eq!(f.handle.state(&at("r2"), &COUNT).await.unwrap(), Some(1));
}

const BATCHY: TypeName = TypeName::from_static("test/batchy");

struct Batchy {
    gate: Arc<Semaphore>,
    bad_attempts: Arc<AtomicU32>,
    good: Arc<AtomicU32>,
    /// Whether the runtime goes through the batch hook or calls `invoke` itself.
    takes_batches: bool,
}

#[async_trait]
impl StatefulFunction for Batchy {
    async fn invoke(&self, _ctx: &mut Context, msg: Message) -> FunctionResult {
        match msg.decode::<String>()?.as_str() {
            "wait" => self.gate.acquire().await?.forget(),
            "bad" => {
                self.bad_attempts.fetch_add(1, Ordering::SeqCst);
                return Err("bad".into());
            }
            _ => {
                self.good.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    fn takes_batches(&self) -> bool {
        self.takes_batches
    }
}

#[tokio::test(start_paused = true)]
async fn a_message_failing_inside_a_batch_gets_exactly_max_attempts_through_the_batch_hook() {
    failing_inside_a_batch(true).await;
}

#[tokio::test(start_paused = true)]
async fn a_message_failing_inside_a_batch_gets_exactly_max_attempts_when_invoked_one_by_one() {
    failing_inside_a_batch(false).await;
}

/// The batch [good, bad]: `good` is re-run once as the prefix before the failure, `bad`
/// runs exactly `max_attempts` times, then it is dead-lettered.
async fn failing_inside_a_batch(takes_batches: bool) {
    let gate = Arc::new(Semaphore::new(0));
    let bad_attempts = Arc::new(AtomicU32::new(0));
    let good = Arc::new(AtomicU32::new(0));
    let module = Module::builder()
        .with_function(
            FunctionSpec::new(BATCHY),
            Batchy {
                gate: gate.clone(),
                bad_attempts: bad_attempts.clone(),
                good: good.clone(),
                takes_batches,
            },
        )
        .build()
        .unwrap();
    let r = testkit::runtime(module)
        .config(RuntimeConfig {
            partitions: 1,
            retry: RetryConfig {
                max_attempts: 2,
                initial_backoff_ms: 1000,
                max_backoff_ms: 1000,
            },
            ..Default::default()
        })
        .start();
    let h = &r.handle;
    let x = Address::new(BATCHY, "x").unwrap();
    for m in ["wait", "good", "bad"] {
        h.send_value(x.clone(), &m.to_string()).await.unwrap();
    }
    tokio::task::yield_now().await;
    gate.add_permits(1); // the next batch is [good, bad]
    h.wait_idle().await;
    assert_eq!(bad_attempts.load(Ordering::SeqCst), 2);
    // Once in the failed batch (its effects discarded), once re-run alone as the
    // batch's prefix (its effects kept): the same whichever way the batch was invoked.
    assert_eq!(good.load(Ordering::SeqCst), 2, "the message before the failure");
    let letters = r.dead.letters();
    assert_eq!(letters.len(), 1);
    assert!(matches!(
        letters[0].reason,
        DeadLetterReason::FunctionFailed { attempts: 2, .. }
    ));
}
