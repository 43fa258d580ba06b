//! The one test kit for tests that run a [`Runtime`] (feature `test-util`).
//!
//! Integration tests of the runtime and of the crates built on it all need the same
//! fixture: build a runtime from a module (with a partition count, maybe a state
//! backend, an ingress, egress records collected in memory), spawn it, drive it through
//! its [`RuntimeHandle`], then stop it and look at its [`RunReport`]. Each test file
//! used to write its own copy of that, and of a bounded polling loop; this module is
//! the single copy. It uses only the runtime's public API.
//!
//! ```
//! use statefun_runtime::testkit;
//! use statefun_sdk::prelude::*;
//!
//! const COUNTER: TypeName = TypeName::from_static("example/counter");
//! const COUNT: ValueSpec<i64> = ValueSpec::named("count");
//! const TOTALS: TypeName = TypeName::from_static("example/totals");
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let module = Module::builder()
//!     .with_fn(FunctionSpec::new(COUNTER).with_state(COUNT), |ctx, msg| {
//!         let n = ctx.storage().get(&COUNT)?.unwrap_or(0) + msg.decode::<i64>()?;
//!         ctx.storage().set(&COUNT, &n)?;
//!         ctx.send_egress(TOTALS, &n)?;
//!         Ok(())
//!     })
//!     .build()
//!     .unwrap();
//! let running = testkit::runtime(module).partitions(2).egress(TOTALS).start();
//! let alice = Address::new(COUNTER, "alice").unwrap();
//! running.handle.send_value(alice.clone(), &2i64).await.unwrap();
//! testkit::eventually("alice's total reaches the egress", || async {
//!     running.egress.records().len() == 1
//! })
//! .await;
//! let report = running.stop().await;
//! assert_eq!(report.invocations(), 1);
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use statefun_sdk::{Module, TypeName};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::egress::{CollectingDeadLetters, CollectingEgress};
use crate::ingress::{Ingress, Router};
use crate::state::StateBackend;
use crate::{Error, RunReport, Runtime, RuntimeBuilder, RuntimeConfig, RuntimeHandle};

/// How long [`eventually`] polls before it gives up (on tokio's clock: virtual time
/// under a paused clock).
pub const EVENTUALLY_WITHIN: Duration = Duration::from_secs(30);

/// How long [`eventually`] sleeps between two polls.
const POLL_EVERY: Duration = Duration::from_millis(5);

/// Starts describing a test runtime that runs `module`: [`RuntimeConfig::default`], the
/// in-memory state backend, no ingress, no egress, dead letters collected.
pub fn runtime(module: Module) -> TestRuntime {
    TestRuntime {
        builder: Runtime::builder().module(module),
        config: RuntimeConfig::default(),
        egress: CollectingEgress::new(),
        dead: CollectingDeadLetters::new(),
    }
}

/// A runtime for a test, not started yet: made by [`runtime`], started by
/// [`TestRuntime::start`].
#[derive(Debug)]
pub struct TestRuntime {
    builder: RuntimeBuilder,
    config: RuntimeConfig,
    egress: CollectingEgress,
    dead: CollectingDeadLetters,
}

impl TestRuntime {
    /// Replaces the whole configuration, partition count included.
    pub fn config(mut self, config: RuntimeConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the number of partitions (and keeps the rest of the configuration).
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.config.partitions = partitions;
        self
    }

    /// Keeps state in `backend` instead of memory.
    pub fn backend(mut self, backend: impl StateBackend) -> Self {
        self.builder = self.builder.state_backend(backend);
        self
    }

    /// Adds an ingress whose records `router` routes.
    pub fn ingress(mut self, ingress: impl Ingress, router: impl Router) -> Self {
        self.builder = self.builder.ingress(ingress, router);
        self
    }

    /// Registers egress `id`; its records are collected in [`Running::egress`] (one
    /// collector for every id registered here).
    pub fn egress(mut self, id: TypeName) -> Self {
        self.builder = self.builder.egress(id, self.egress.clone());
        self
    }

    /// Builds the runtime and spawns its run on the current tokio runtime.
    ///
    /// # Panics
    ///
    /// If the runtime does not build (a test of the builder's errors uses
    /// [`Runtime::builder`] itself), or outside a tokio runtime.
    pub fn start(self) -> Running {
        let runtime = self
            .builder
            .config(self.config)
            .dead_letters(self.dead.clone())
            .build()
            .unwrap_or_else(|e| panic!("the test runtime does not build: {e}"));
        let handle = runtime.handle();
        let stop = CancellationToken::new();
        let task = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
        Running {
            handle,
            egress: self.egress,
            dead: self.dead,
            stop_on_drop: stop.clone().drop_guard(),
            stop,
            task,
        }
    }
}

/// A started test runtime. Dropping it signals shutdown without waiting for it; call
/// [`Running::stop`] for the report.
#[derive(Debug)]
pub struct Running {
    /// The runtime's handle: send messages, query state, wait until idle.
    pub handle: RuntimeHandle,
    /// The records of the egresses registered with [`TestRuntime::egress`].
    pub egress: CollectingEgress,
    /// The dead letters.
    pub dead: CollectingDeadLetters,
    stop: CancellationToken,
    stop_on_drop: DropGuard,
    task: JoinHandle<Result<RunReport, Error>>,
}

impl Running {
    /// Signals shutdown and returns at once; [`Running::stop`] waits for it.
    pub fn signal_stop(&self) {
        self.stop.cancel();
    }

    /// Whether the run has returned.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Signals shutdown, waits for the run to return and gives its report. Drops the
    /// handle, so that a durable backend can be opened again afterwards.
    ///
    /// # Panics
    ///
    /// If the run failed or panicked.
    pub async fn stop(self) -> RunReport {
        self.stop.cancel();
        let report = self
            .task
            .await
            .unwrap_or_else(|e| panic!("the runtime's task failed: {e}"))
            .unwrap_or_else(|e| panic!("the runtime's run failed: {e}"));
        drop(self.stop_on_drop);
        drop(self.handle);
        report
    }

    /// [`advance`]s tokio's paused clock by `by`, then waits until the runtime is idle:
    /// what became due (delayed messages, expiries) has been processed.
    pub async fn advance(&self, by: Duration) {
        advance(by).await;
        self.handle.wait_idle().await;
    }
}

/// Polls `condition` until it holds, sleeping a few milliseconds between polls (which
/// lets the runtime's tasks run, and advances a paused clock).
///
/// # Panics
///
/// With `what` if it does not hold within [`EVENTUALLY_WITHIN`].
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + EVENTUALLY_WITHIN;
    loop {
        if condition().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("condition never held within {EVENTUALLY_WITHIN:?}: {what}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Advances tokio's paused clock by `by` and yields a few times, so that the tasks
/// whose timers became due (a partition's delayed messages and expiries) run before
/// this returns.
///
/// # Panics
///
/// If the clock is not paused (`#[tokio::test(start_paused = true)]`, or
/// [`tokio::time::pause`]).
pub async fn advance(by: Duration) {
    tokio::time::advance(by).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}
