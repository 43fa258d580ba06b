//! [`RuntimeHandle`]: talks to a running runtime through channels: send messages, wait
//! until idle, query state, list and unpark parked addresses, read statistics.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use statefun_sdk::{Address, TypedValue, ValueSpec, ValueType};
use tokio::sync::oneshot;

use crate::envelope::Envelope;
use crate::errors::{QueryError, SendError};
use crate::partitioner::PartitionId;
use crate::shared::{Control, Inbound, Shared, SubmitError};
use crate::state;
use crate::stats::PartitionStats;

/// A cheap, cloneable handle to a runtime.
#[derive(Clone)]
pub struct RuntimeHandle {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for RuntimeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeHandle")
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

impl RuntimeHandle {
    /// Sends a message to `target` from outside any function, waiting for room in the
    /// owning partition's ingress queue.
    pub async fn send(&self, target: Address, message: TypedValue) -> Result<(), SendError> {
        let env = Envelope {
            target,
            caller: None,
            message,
            inbox: None,
            position: None,
            also: Vec::new(),
        };
        match self.shared.submit(env, None).await {
            Ok(_) => Ok(()),
            Err(SubmitError::UnknownFunctionType(env)) => {
                Err(SendError::UnknownFunctionType(env.target.type_name().clone()))
            }
            Err(SubmitError::ShuttingDown) => Err(SendError::ShuttingDown),
            Err(SubmitError::NotOwned(p)) => Err(SendError::NotOwned(p)),
        }
    }

    /// Encodes `value` and sends it.
    pub async fn send_value<T: ValueType>(&self, target: Address, value: &T) -> Result<(), SendError> {
        self.send(target, TypedValue::of(value)?).await
    }

    /// Messages accepted but not yet finished.
    pub fn outstanding(&self) -> u64 {
        self.shared.outstanding.load(Ordering::SeqCst)
    }

    /// Waits until no message is queued or in flight anywhere (delayed messages that are
    /// not yet due do not count).
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.outstanding() == 0 {
                return;
            }
            notified.await;
        }
    }

    async fn control<R>(
        &self,
        p: PartitionId,
        make: impl FnOnce(oneshot::Sender<R>) -> Control,
    ) -> Result<R, QueryError> {
        let (tx, rx) = oneshot::channel();
        self.shared.partitions[p.0 as usize]
            .as_ref()
            .ok_or(QueryError::NotOwned(p))?
            .inbound
            .send(Inbound::Control(make(tx)))
            .map_err(|_| QueryError::NotRunning)?;
        rx.await.map_err(|_| QueryError::NotRunning)
    }

    /// Reads the current value of `spec` at `address` (a state query; expired values
    /// read as `None`). Answered by the owning partition between invocations.
    pub async fn state<T: ValueType>(&self, address: &Address, spec: &ValueSpec<T>) -> Result<Option<T>, QueryError> {
        let bytes = self.state_raw(address, spec.name()).await?;
        match bytes {
            None => Ok(None),
            Some(b) => Ok(Some(T::decode(&b)?)),
        }
    }

    /// Reads the raw bytes of state `name` at `address`: a state the function type
    /// declares, or one a remote function registered through the state handshake on the
    /// address's partition.
    pub async fn state_raw(&self, address: &Address, name: &str) -> Result<Option<Bytes>, QueryError> {
        let p = self.shared.partition_of(address);
        let address = address.clone();
        let name = name.to_owned();
        self.control(p, |reply| Control::GetState { address, name, reply })
            .await?
    }

    /// Parked addresses with the error that parked them (in cluster mode: in the
    /// partitions that run on this instance).
    pub async fn parked(&self) -> Result<Vec<(Address, String)>, QueryError> {
        let mut all = Vec::new();
        for p in self.shared.owned().collect::<Vec<_>>() {
            all.extend(self.control(p, |reply| Control::Parked { reply }).await?);
        }
        all.sort();
        Ok(all)
    }

    /// Unparks `address` so it takes messages again; false if it was not parked.
    /// Dead-lettered messages are not replayed automatically: re-send them if wanted.
    pub async fn unpark(&self, address: &Address) -> Result<bool, QueryError> {
        let p = self.shared.partition_of(address);
        let address = address.clone();
        self.control(p, |reply| Control::Unpark { address, reply }).await
    }

    /// Takes a checkpoint of the state now (off the async threads). `Ok(None)` if the
    /// state backend does not take checkpoints.
    pub async fn checkpoint(&self) -> Result<Option<state::CheckpointInfo>, QueryError> {
        let backend = Arc::clone(&self.shared.backend);
        tokio::task::spawn_blocking(move || backend.checkpoint())
            .await
            .map_err(|_| QueryError::NotRunning)?
            .map_err(QueryError::State)
    }

    /// Statistics of every partition (in cluster mode: that runs on this instance).
    pub async fn stats(&self) -> Result<Vec<PartitionStats>, QueryError> {
        let mut all = Vec::new();
        for p in self.shared.owned().collect::<Vec<_>>() {
            all.push(self.control(p, |reply| Control::Stats { reply }).await?);
        }
        Ok(all)
    }
}
