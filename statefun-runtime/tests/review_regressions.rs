//! Regressions for defects found in review:
//! * functions that message themselves in a tight loop must not starve their partition
//!   (queries are answered, shutdown completes);
//! * a delayed message with an absurd delay must not panic the partition;
//! * a message that fails inside a batch (behind messages that succeeded) gets exactly
//!   `max_attempts` attempts, with backoff, like any other.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use statefun_runtime::config::RetryConfig;
use statefun_runtime::{CollectingDeadLetters, DeadLetterReason, Runtime, RuntimeConfig};
use statefun_sdk::prelude::*;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const LOOP: TypeName = TypeName::from_static("test/loop");
const N: ValueSpec<i64> = ValueSpec::named("n");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_messaging_function_does_not_starve_its_partition() {
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
    let runtime = Runtime::builder()
        .config(RuntimeConfig {
            partitions: 1,
            drain_timeout_ms: 200,
            ..Default::default()
        })
        .module(module)
        .build()
        .unwrap();
    let h = runtime.handle();
    let stop = CancellationToken::new();
    let running = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
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
    stop.cancel();
    let report = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("shutdown completes")
        .unwrap()
        .unwrap();
    assert!(!report.drained, "the endless loop cannot drain; the timeout bounds it");
}

#[tokio::test(start_paused = true)]
async fn an_absurd_delay_does_not_panic_the_partition() {
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
    let runtime = Runtime::builder().module(module).build().unwrap();
    let h = runtime.handle();
    let stop = CancellationToken::new();
    let running = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    let x = Address::new(LOOP, "x").unwrap();
    h.send_value(x.clone(), &0i64).await.unwrap();
    h.send_value(x.clone(), &5i64).await.unwrap();
    h.wait_idle().await;
    assert_eq!(h.state(&x, &N).await.unwrap(), Some(5), "the partition keeps working");
    let pending: usize = h.stats().await.unwrap().iter().map(|p| p.pending_delayed).sum();
    assert_eq!(pending, 1);
    stop.cancel();
    running.await.unwrap().expect("no partition died");
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
    let dead = CollectingDeadLetters::new();
    let runtime = Runtime::builder()
        .config(RuntimeConfig {
            partitions: 1,
            retry: RetryConfig {
                max_attempts: 2,
                initial_backoff_ms: 1000,
                max_backoff_ms: 1000,
            },
            ..Default::default()
        })
        .module(module)
        .dead_letters(dead.clone())
        .build()
        .unwrap();
    let h = runtime.handle();
    let stop = CancellationToken::new();
    tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
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
    let letters = dead.letters();
    assert_eq!(letters.len(), 1);
    assert!(matches!(
        letters[0].reason,
        DeadLetterReason::FunctionFailed { attempts: 2, .. }
    ));
    stop.cancel();
}
