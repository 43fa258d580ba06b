//! Graceful shutdown: in-flight and queued work finishes (including messages it sends),
//! ingresses stop, new sends are refused; a drain that cannot finish is bounded by the
//! drain timeout and reported.

use std::sync::Arc;
use std::time::Duration;

use statefun_runtime::{Runtime, RuntimeConfig, SendError};
use statefun_sdk::prelude::*;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const F: TypeName = TypeName::from_static("test/slow");
const SEEN: ValueSpec<i64> = ValueSpec::named("seen");

struct Slow {
    gate: Arc<Semaphore>,
}

#[async_trait]
impl StatefulFunction for Slow {
    async fn invoke(&self, ctx: &mut Context, msg: Message) -> FunctionResult {
        let hops: i64 = msg.decode()?;
        self.gate.acquire().await?.forget();
        let n = ctx.storage().get(&SEEN)?.unwrap_or(0) + 1;
        ctx.storage().set(&SEEN, &n)?;
        if hops > 0 {
            // Forward to another address: work created during the drain also finishes.
            let next = Address::new(F, format!("{}-next", ctx.self_address().id()))?;
            ctx.send(next, &(hops - 1))?;
        }
        Ok(())
    }
}

fn build(drain_timeout_ms: u64) -> (Runtime, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let module = Module::builder()
        .with_function(FunctionSpec::new(F).with_state(SEEN), Slow { gate: gate.clone() })
        .build()
        .unwrap();
    let runtime = Runtime::builder()
        .config(RuntimeConfig {
            partitions: 2,
            drain_timeout_ms,
            ..Default::default()
        })
        .module(module)
        .build()
        .unwrap();
    (runtime, gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_and_queued_work_first() {
    let (runtime, gate) = build(30_000);
    let h = runtime.handle();
    let stop = CancellationToken::new();
    let running = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    for i in 0..10 {
        h.send_value(Address::new(F, format!("a{i}")).unwrap(), &2i64)
            .await
            .unwrap();
    }
    stop.cancel();
    // Shutdown has been requested, but the work is blocked: run() must not return.
    tokio::task::yield_now().await;
    assert!(!running.is_finished());
    gate.add_permits(1000);
    let report = running.await.unwrap().unwrap();
    assert!(report.drained);
    assert_eq!(report.invocations(), 30, "10 messages, each forwarded twice");
    let err = h.send_value(Address::new(F, "late").unwrap(), &0i64).await.unwrap_err();
    assert!(matches!(err, SendError::ShuttingDown), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_cannot_finish_is_bounded_by_the_timeout() {
    let (runtime, _gate) = build(500);
    let h = runtime.handle();
    let stop = CancellationToken::new();
    let running = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    h.send_value(Address::new(F, "stuck").unwrap(), &0i64).await.unwrap();
    stop.cancel();
    let report = tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("run returns after the drain timeout")
        .unwrap()
        .unwrap();
    assert!(!report.drained);
    assert_eq!(report.invocations(), 0);
}
