//! Graceful shutdown: in-flight and queued work finishes (including messages it sends),
//! ingresses stop, new sends are refused; a drain that cannot finish is bounded by the
//! drain timeout and reported.

use std::sync::Arc;
use std::time::Duration;

use statefun_runtime::testkit::{self, Running};
use statefun_runtime::{RuntimeConfig, SendError};
use statefun_sdk::prelude::*;
use tokio::sync::Semaphore;

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

/// Starts a [`Slow`] function on 2 partitions; returns its gate, closed.
fn start(drain_timeout_ms: u64) -> (Running, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let module = Module::builder()
        .with_function(FunctionSpec::new(F).with_state(SEEN), Slow { gate: gate.clone() })
        .build()
        .unwrap();
    let running = testkit::runtime(module)
        .config(RuntimeConfig {
            partitions: 2,
            drain_timeout_ms,
            ..Default::default()
        })
        .start();
    (running, gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_and_queued_work_first() {
    let (r, gate) = start(30_000);
    let h = r.handle.clone();
    for i in 0..10 {
        h.send_value(Address::new(F, format!("a{i}")).unwrap(), &2i64)
            .await
            .unwrap();
    }
    r.signal_stop();
    // Shutdown has been requested, but the work is blocked: run() must not return.
    tokio::task::yield_now().await;
    assert!(!r.is_finished());
    gate.add_permits(1000);
    let report = r.stop().await;
    assert!(report.drained);
    assert_eq!(report.invocations(), 30, "10 messages, each forwarded twice");
    let err = h.send_value(Address::new(F, "late").unwrap(), &0i64).await.unwrap_err();
    assert!(matches!(err, SendError::ShuttingDown), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_cannot_finish_is_bounded_by_the_timeout() {
    let (r, _gate) = start(500);
    r.handle
        .send_value(Address::new(F, "stuck").unwrap(), &0i64)
        .await
        .unwrap();
    let report = tokio::time::timeout(Duration::from_secs(5), r.stop())
        .await
        .expect("run returns after the drain timeout");
    assert!(!report.drained);
    assert_eq!(report.invocations(), 0);
}
