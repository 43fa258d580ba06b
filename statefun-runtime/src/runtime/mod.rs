//! The runtime: builder, the run loop with graceful shutdown, and the cloneable handle.
//!
//! Why it exists: this is where the pieces are wired. [`RuntimeBuilder`] takes the
//! functions ([`Module`]), the state backend, ingresses with their routers, egresses and
//! the dead-letter sink; [`Runtime::run`] starts one task per partition and one per
//! ingress and, when `shutdown` resolves, stops the ingresses, lets every accepted
//! message finish (including the messages those produce), then stops the partitions.
//! [`RuntimeHandle`] talks to a running runtime through channels: send messages, wait
//! until idle, query state, list and unpark parked addresses, read statistics.
//!
//! Invariant (idle detection, see `crate::shared`): `outstanding` counts messages accepted but not yet
//! finished (processed, or dead-lettered). A producer of new messages adds them before
//! it subtracts what it finished, so the count reaches zero only when nothing is queued
//! or in flight anywhere. Delayed messages that are not due yet are not counted.

mod builder;
mod handle;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use builder::{Runtime, RuntimeBuilder};
pub use handle::RuntimeHandle;

use crate::errors::Error;
use crate::state;
use crate::stats::RunReport;

impl Runtime {
    /// Starts building a runtime.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    /// A handle to the runtime; valid before, during and after `run`.
    pub fn handle(&self) -> RuntimeHandle {
        RuntimeHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Runs until `shutdown` resolves, then shuts down gracefully: ingresses stop, every
    /// accepted message finishes (bounded by `drain_timeout_ms`), partitions stop.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<RunReport, Error> {
        let stop_partitions = CancellationToken::new();
        let stop_ingress = CancellationToken::new();
        let mut partitions = JoinSet::new();
        for p in self.partitions {
            partitions.spawn(p.run(stop_partitions.clone()));
        }
        let mut ingresses = JoinSet::new();
        for (ingress, sink) in self.ingresses {
            let name = ingress.name().to_owned();
            let stop = stop_ingress.clone();
            ingresses.spawn(async move { (name, ingress.run(sink, stop).await) });
        }
        let mut checkpointer = None;
        if self.shared.config.checkpoint_interval_ms > 0 {
            let handle = RuntimeHandle {
                shared: Arc::clone(&self.shared),
            };
            let stop = stop_partitions.clone();
            let every = Duration::from_millis(self.shared.config.checkpoint_interval_ms);
            checkpointer = Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => match handle.checkpoint().await {
                            Ok(None) => return, // the backend does not take checkpoints
                            Ok(Some(c)) => tracing::info!(id = c.id, path = %c.path.display(), "checkpoint taken"),
                            Err(e) => tracing::error!(error = %e, "periodic checkpoint failed"),
                        },
                    }
                }
            }));
        }
        // Commits of a backend whose writes become durable per interval. A transient
        // failure is retried at the next tick (nothing is lost: the writes stay
        // pending); a permanent one (a fenced producer, a broken disk) stops the run.
        let mut committer = JoinSet::new();
        if let Some(every) = self.shared.profile.commit_interval {
            let backend = Arc::clone(&self.shared.backend);
            let stop = stop_partitions.clone();
            committer.spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tick.tick() => {}
                    }
                    match commit(Arc::clone(&backend)).await {
                        Ok(()) => {}
                        Err(Error::Commit(e @ state::Error::Transient(_))) => {
                            tracing::warn!(error = %e, "commit failed; retrying at the next interval");
                        }
                        Err(e) => return Err(e),
                    }
                }
            });
        }
        tracing::info!(
            partitions = self.shared.config.partitions,
            functions = self.shared.module.len(),
            "runtime started"
        );

        let mut ingress_errors = Vec::new();
        let mut failure = None;
        let mut commit_failure = None;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(res) = committer.join_next() => {
                    commit_failure = Some(match res {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => Error::Internal("committer returned before shutdown".to_owned()),
                        Err(e) => Error::Internal(format!("commit task panicked: {e}")),
                    });
                    break;
                }
                Some(res) = partitions.join_next() => {
                    failure = Some(match res {
                        Ok(_) => "partition task returned before shutdown".to_owned(),
                        Err(e) => e.to_string(),
                    });
                    break;
                }
                Some(res) = ingresses.join_next() => match res {
                    Ok((_, Ok(()))) => {}
                    Ok((name, Err(e))) => {
                        tracing::error!(ingress = %name, error = %e, "ingress stopped with an error");
                        ingress_errors.push(e.to_string());
                    }
                    Err(e) => ingress_errors.push(format!("ingress task panicked: {e}")),
                },
            }
        }

        tracing::info!("runtime shutting down: stopping ingresses");
        stop_ingress.cancel();
        let drain = Duration::from_millis(self.shared.config.drain_timeout_ms);
        let stopped = tokio::time::timeout(drain, async {
            let mut errors = Vec::new();
            while let Some(res) = ingresses.join_next().await {
                match res {
                    Ok((_, Ok(()))) => {}
                    Ok((_, Err(e))) => errors.push(e.to_string()),
                    Err(e) => errors.push(format!("ingress task panicked: {e}")),
                }
            }
            errors
        })
        .await;
        match stopped {
            Ok(errors) => ingress_errors.extend(errors),
            Err(_) => {
                ingresses.abort_all();
                ingress_errors.push("an ingress did not stop within the drain timeout and was aborted".to_owned());
            }
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        let handle = RuntimeHandle {
            shared: Arc::clone(&self.shared),
        };
        let drained = failure.is_none()
            && commit_failure.is_none()
            && tokio::time::timeout(drain, handle.wait_idle()).await.is_ok();
        if !drained {
            tracing::warn!(
                outstanding = handle.outstanding(),
                "drain timeout: stopping with messages outstanding"
            );
        }
        stop_partitions.cancel();
        // The checkpointer holds the backend: when `run` returns, only the caller's
        // handles keep the state open.
        if let Some(c) = checkpointer {
            let _ = c.await;
        }
        let mut stats = Vec::new();
        while let Some(res) = partitions.join_next().await {
            match res {
                Ok(s) => stats.push(s),
                Err(e) => failure = failure.or(Some(e.to_string())),
            }
        }
        if let Some(f) = failure {
            return Err(Error::Internal(f));
        }
        // Let a commit in flight finish (the committer returns at its next turn, the
        // partitions having stopped) rather than abort it: aborting would leave its
        // blocking commit running after `run` returns, racing the final commit and
        // whatever the caller does next with the backend.
        while let Some(res) = committer.join_next().await {
            if let Ok(Err(e)) = res
                && commit_failure.is_none()
            {
                commit_failure = Some(e);
            }
        }
        if let Some(e) = commit_failure {
            return Err(e);
        }
        if self.shared.profile.commit_interval.is_some() {
            // The partitions have stopped: commit what they wrote last.
            commit(Arc::clone(&self.shared.backend)).await?;
        }
        stats.sort_by_key(|s| s.partition);
        tracing::info!("runtime stopped");
        Ok(RunReport {
            partitions: stats,
            ingress_errors,
            drained,
        })
    }
}

/// Runs one [`StateBackend::commit`](state::StateBackend::commit) off the async threads.
async fn commit(backend: Arc<dyn state::StateBackend>) -> Result<(), Error> {
    match tokio::task::spawn_blocking(move || backend.commit()).await {
        Ok(result) => result.map_err(Error::Commit),
        Err(e) => Err(Error::Internal(format!("commit task panicked: {e}"))),
    }
}
