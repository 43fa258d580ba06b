//! # statefun-runtime
//!
//! The runtime for [`statefun_sdk`] functions: it routes every message to the partition
//! that owns its target address, runs at most one invocation batch per address at a
//! time (later messages queue in the address's FIFO mailbox and go in the next batch),
//! applies the effects the function returned in one place, and keeps going when a
//! function fails: after retries with backoff, only the failing address is parked and
//! its messages go to the dead-letter sink.
//!
//! ## Embedding it
//!
//! ```
//! use statefun_runtime::prelude::*;
//! use statefun_sdk::prelude::*;
//!
//! const COUNTER: TypeName = TypeName::from_static("example/counter");
//! const COUNT: ValueSpec<i64> = ValueSpec::named("count");
//! const TOTALS: TypeName = TypeName::from_static("example/totals");
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! let module = Module::builder()
//!     .with_fn(FunctionSpec::new(COUNTER).with_state(COUNT), |ctx, msg| {
//!         let n = ctx.storage().get(&COUNT)?.unwrap_or(0) + msg.decode::<i64>()?;
//!         ctx.storage().set(&COUNT, &n)?;
//!         ctx.send_egress(TOTALS, &n)?;
//!         Ok(())
//!     })
//!     .build()?;
//!
//! let totals = CollectingEgress::new();
//! let runtime = Runtime::builder()
//!     .config(RuntimeConfig { partitions: 4, ..Default::default() })
//!     .module(module)
//!     .egress(TOTALS, totals.clone())
//!     .build()?;
//! let handle = runtime.handle();
//! let stop = tokio_util::sync::CancellationToken::new();
//! let running = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
//!
//! let alice = Address::new(COUNTER, "alice")?;
//! handle.send_value(alice.clone(), &2i64).await?;
//! handle.send_value(alice.clone(), &3i64).await?;
//! handle.wait_idle().await;
//! assert_eq!(handle.state(&alice, &COUNT).await?, Some(5));
//!
//! stop.cancel();
//! let report = running.await??;
//! assert_eq!(report.invocations(), 2);
//! assert_eq!(totals.records().len(), 2);
//! # Ok(())
//! # }
//! ```
//!
//! ## The boundaries
//!
//! The core meets the world through a few traits, each with an in-memory implementation
//! shipped here: [`state::StateBackend`] ([`MemoryBackend`]), [`ingress::Ingress`]
//! ([`MemoryIngress`], [`VecIngress`]) with a [`ingress::Router`] ([`KeyRouter`] or any
//! closure), [`egress::Egress`] ([`CollectingEgress`], [`ChannelEgress`]) and
//! [`egress::DeadLetterSink`] ([`CollectingDeadLetters`], [`LoggingDeadLetters`]).
//!
//! See `docs/architecture.md` for the design and `docs/guarantees.md` for what is
//! promised.

// The module layers, bottom up (`docs/architecture.md`, "Module layers"; checked by
// `scripts/check-layers.sh`): a module imports only from its own layer's lower
// neighbours or from layers below it.
//
// 0. plain data: configuration, ids, metric names, the envelope, records, statistics
pub mod config;
mod envelope;
pub mod metrics;
pub mod partitioner;
pub mod records;
mod stats;
// 1. state, timers and the egress sinks
pub mod egress;
pub mod state;
#[cfg(feature = "test-util")]
pub mod testkit;
mod timers;
// 2. the errors users see, and the shared context
mod errors;
mod shared;
// 3. the partition and the ingress
pub mod ingress;
mod partition;
// 4. the runtime: builder, run loop, handle
mod runtime;

pub use config::{RetryConfig, RuntimeConfig};
pub use egress::{
    ChannelEgress, CollectingDeadLetters, CollectingEgress, DeadLetter, DeadLetterReason, EgressRecord,
    LoggingDeadLetters,
};
pub use errors::{Error, QueryError, SendError};
pub use ingress::{
    GeneratorIngress, IngressRecord, IngressSink, KeyRouter, MemoryIngress, MemoryIngressSender, MessageRouter, Routed,
    SourcePosition, VecIngress, decode_message,
};
pub use partitioner::{PartitionId, partition_for};
pub use runtime::{Runtime, RuntimeBuilder, RuntimeHandle};
pub use state::MemoryBackend;
pub use stats::{PartitionStats, RunReport};

/// The types an embedding program needs, in one import.
pub mod prelude {
    pub use crate::{
        CollectingDeadLetters, CollectingEgress, IngressRecord, KeyRouter, MemoryBackend, MemoryIngress, Runtime,
        RuntimeConfig, RuntimeHandle, VecIngress,
    };
}

/// The README's tour, compiled and run as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeTour;
