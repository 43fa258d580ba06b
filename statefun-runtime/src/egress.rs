//! Where effects leave the runtime: egress sinks and the dead-letter sink.
//!
//! Why it exists: functions name an egress by [`TypeName`]; the runtime maps each id to
//! an [`Egress`] registered on the builder. Anything the runtime cannot deliver (a record
//! no router accepts, a message to an unknown function type or to a parked address, a
//! message whose function keeps failing, a record for an unknown egress) goes to the
//! [`DeadLetterSink`] with the reason, the target and the payload, so nothing is
//! silently dropped. Shipped: [`CollectingEgress`], [`ChannelEgress`],
//! [`CollectingDeadLetters`] and [`LoggingDeadLetters`] (the default).

use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

pub use crate::records::{DEAD_LETTERS, DeadLetter, DeadLetterReason, DeadLetterRecord, EgressId, EgressRecord};

/// Why an egress refused a record.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The egress is closed (its consumer went away).
    #[error("egress closed")]
    Closed,
    /// The egress rejected the record (too large, wrong type, ...).
    #[error("egress rejected the record: {0}")]
    Rejected(String),
}

/// A destination for egress records.
pub trait Egress: Send + Sync + 'static {
    /// Accepts one record. Must not block: queue it and return.
    fn send(&self, record: EgressRecord) -> Result<(), Error>;
}

/// Collects egress records in memory (tests, demos).
#[derive(Debug, Clone, Default)]
pub struct CollectingEgress {
    records: Arc<Mutex<Vec<EgressRecord>>>,
}

impl CollectingEgress {
    /// A new, empty collector. Clones share the records.
    pub fn new() -> CollectingEgress {
        CollectingEgress::default()
    }

    /// A copy of the records so far.
    pub fn records(&self) -> Vec<EgressRecord> {
        self.records.lock().expect("egress lock").clone()
    }

    /// Takes the records so far.
    pub fn take(&self) -> Vec<EgressRecord> {
        std::mem::take(&mut *self.records.lock().expect("egress lock"))
    }
}

impl Egress for CollectingEgress {
    fn send(&self, record: EgressRecord) -> Result<(), Error> {
        self.records.lock().expect("egress lock").push(record);
        Ok(())
    }
}

/// Streams egress records into a channel.
#[derive(Debug, Clone)]
pub struct ChannelEgress {
    tx: mpsc::UnboundedSender<EgressRecord>,
}

impl ChannelEgress {
    /// A new egress and the receiver of its records.
    pub fn new() -> (ChannelEgress, mpsc::UnboundedReceiver<EgressRecord>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ChannelEgress { tx }, rx)
    }
}

impl Egress for ChannelEgress {
    fn send(&self, record: EgressRecord) -> Result<(), Error> {
        self.tx.send(record).map_err(|_| Error::Closed)
    }
}

/// Receives dead letters.
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Accepts one dead letter. Must not block.
    fn send(&self, dead_letter: DeadLetter);
}

/// A shared sink: one sink (one producer) for every runtime an instance builds.
impl<T: DeadLetterSink + ?Sized> DeadLetterSink for Arc<T> {
    fn send(&self, dead_letter: DeadLetter) {
        (**self).send(dead_letter)
    }
}

/// Logs dead letters at WARN level (the default sink).
#[derive(Debug, Clone, Default)]
pub struct LoggingDeadLetters;

impl DeadLetterSink for LoggingDeadLetters {
    fn send(&self, d: DeadLetter) {
        tracing::warn!(
            reason = %d.reason,
            target = ?d.target.as_ref().map(ToString::to_string),
            caller = ?d.caller.as_ref().map(ToString::to_string),
            "dead letter"
        );
    }
}

/// Collects dead letters in memory (tests, demos).
#[derive(Debug, Clone, Default)]
pub struct CollectingDeadLetters {
    letters: Arc<Mutex<Vec<DeadLetter>>>,
}

impl CollectingDeadLetters {
    /// A new, empty collector. Clones share the letters.
    pub fn new() -> CollectingDeadLetters {
        CollectingDeadLetters::default()
    }

    /// A copy of the letters so far.
    pub fn letters(&self) -> Vec<DeadLetter> {
        self.letters.lock().expect("dead letter lock").clone()
    }
}

impl DeadLetterSink for CollectingDeadLetters {
    fn send(&self, d: DeadLetter) {
        self.letters.lock().expect("dead letter lock").push(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partitioner::PartitionId;
    use proptest::prelude::*;

    proptest! {
        /// The hand-written `Display` is the documented format, for every id.
        #[test]
        fn egress_id_display_is_run_partition_seq(run: u64, partition: u32, seq: u64) {
            let id = EgressId { run, partition: PartitionId(partition), seq };
            prop_assert_eq!(id.to_string(), format!("{run:016x}-{partition}-{seq:x}"));
        }
    }

    #[test]
    fn egress_id_display_edges() {
        let id = |run, partition, seq| EgressId {
            run,
            partition: PartitionId(partition),
            seq,
        };
        assert_eq!(id(0, 0, 0).to_string(), "0000000000000000-0-0");
        assert_eq!(
            id(u64::MAX, u32::MAX, u64::MAX).to_string(),
            "ffffffffffffffff-4294967295-ffffffffffffffff"
        );
        assert_eq!(id(0xab, 10, 0x10).to_string(), "00000000000000ab-10-10");
    }
}
