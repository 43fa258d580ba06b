//! Control requests, answered by the partition between invocations: a state query,
//! parked addresses, unpark, statistics.

use super::Partition;
use crate::errors::QueryError;
use crate::shared::Control;
use crate::stats::PartitionStats;

impl Partition {
    pub(super) fn snapshot_stats(&self) -> PartitionStats {
        PartitionStats {
            parked: self.parked.len(),
            active_addresses: self.mailboxes.active(),
            buffered: self.mailboxes.buffered(),
            pending_delayed: self.timers.pending_delayed(),
            ..self.stats.clone()
        }
    }

    pub(super) fn on_control(&mut self, c: Control) {
        match c {
            Control::GetState { address, name, reply } => {
                // Declared states and those the handshake registered on this partition.
                let declared = self
                    .functions
                    .get(address.type_name())
                    .and_then(|f| f.states.iter().find(|s| *s.name == *name).map(|s| s.name.clone()));
                let Some(name) = declared else {
                    let function = address.type_name().clone();
                    let _ = reply.send(Err(QueryError::Undeclared { function, name }));
                    return;
                };
                let now = self.shared.clock.now_ms();
                let r = self
                    .store
                    .get(&address, &name)
                    .map(|v| v.filter(|v| v.expires_at_ms.is_none_or(|t| t > now)).map(|v| v.value))
                    .map_err(QueryError::from);
                let _ = reply.send(r);
            }
            Control::Unpark { address, reply } => {
                let was = self.parked.remove(&address).is_some();
                if was {
                    tracing::info!(address = %address, "address unparked");
                }
                let _ = reply.send(was);
            }
            Control::Parked { reply } => {
                let _ = reply.send(self.parked.iter().map(|(a, e)| (a.clone(), e.clone())).collect());
            }
            Control::Stats { reply } => {
                let _ = reply.send(self.snapshot_stats());
            }
        }
    }
}
