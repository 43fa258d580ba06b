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

use statefun_sdk::{Address, TypeName, TypedValue};
use tokio::sync::mpsc;

use crate::ingress::IngressRecord;

/// A record a function wrote to an egress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRecord {
    /// The egress id.
    pub egress: TypeName,
    /// The function that wrote it.
    pub source: Address,
    /// The record.
    pub message: TypedValue,
    /// With a durable state backend: the record's id in the egress log. A record handed
    /// to its sink again after a crash (the sink took it, the process died before the
    /// log entry was deleted) has the same id, so a sink that keeps ids delivers each
    /// record exactly once. `None` with a volatile backend.
    pub id: Option<EgressId>,
}

/// The id of an egress record, unique across restarts and checkpoint restores: the
/// run that produced it (a random id drawn each time a runtime is built), the producing
/// partition, and its sequence number in that partition's egress log. A record handed
/// over again after a crash keeps the id it was produced with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EgressId {
    /// Random id of the producing run.
    pub run: u64,
    /// The producing partition.
    pub partition: crate::PartitionId,
    /// Its sequence number in that partition's egress log.
    pub seq: u64,
}

impl std::fmt::Display for EgressId {
    /// `{run:016x}-{partition}-{seq:x}`. Written by hand into a stack buffer: a Kafka
    /// changelog formats one per egress record in its commit, and `write!` with padding
    /// cost more than the rest of the record's header.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        /// Appends `value` in base `base` (at most 16) with `width` digits.
        fn push(buf: &mut [u8], n: &mut usize, mut value: u64, base: u64, width: usize) {
            for i in (0..width).rev() {
                buf[*n + i] = b"0123456789abcdef"[(value % base) as usize];
                value /= base;
            }
            *n += width;
        }
        let width = |value: u64, base: u64| (value.checked_ilog(base).unwrap_or(0) + 1) as usize;
        let mut buf = [0u8; 16 + 1 + 10 + 1 + 16];
        let mut n = 0;
        push(&mut buf, &mut n, self.run, 16, 16);
        buf[n] = b'-';
        n += 1;
        let partition = u64::from(self.partition.0);
        push(&mut buf, &mut n, partition, 10, width(partition, 10));
        buf[n] = b'-';
        n += 1;
        push(&mut buf, &mut n, self.seq, 16, width(self.seq, 16));
        f.write_str(std::str::from_utf8(&buf[..n]).expect("ASCII"))
    }
}

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

/// Why a message or record was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The function kept failing; the address is now parked.
    #[error("function failed {attempts} time(s), address parked: {error}")]
    FunctionFailed {
        /// The last error (or panic message).
        error: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The target address was parked earlier and takes no messages until unparked.
    #[error("address is parked: {error}")]
    AddressParked {
        /// The error that parked it.
        error: String,
    },
    /// No function is registered for the target type.
    #[error("no function registered for type {0}")]
    UnknownFunctionType(TypeName),
    /// An ingress router could not route the record.
    #[error("ingress {ingress}: cannot route record: {error}")]
    Unroutable {
        /// The ingress name.
        ingress: String,
        /// What the router said.
        error: String,
    },
    /// A function wrote to an egress id that is not registered.
    #[error("no egress registered as {0}")]
    UnknownEgress(TypeName),
    /// An egress refused the record.
    #[error("egress {egress} refused the record: {error}")]
    EgressFailed {
        /// The egress id.
        egress: TypeName,
        /// What it said.
        error: String,
    },
    /// The runtime was stopping and the message's partition no longer runs.
    #[error("runtime shutting down")]
    ShuttingDown,
}

/// Something the runtime could not deliver, with everything needed to replay it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Why.
    pub reason: DeadLetterReason,
    /// The intended receiver, when known.
    pub target: Option<Address>,
    /// The sender, when it was a function.
    pub caller: Option<Address>,
    /// The message, when it got as far as being one.
    pub message: Option<TypedValue>,
    /// The ingress record, when routing failed.
    pub record: Option<IngressRecord>,
}

/// The egress id under which a backend that commits per interval may take dead letters
/// into its commits ([`StateBackend::takes_egress`](crate::state::StateBackend::takes_egress)):
/// a message's dead letter then commits in the same write as the removal of the
/// message from its inbox, so it is neither lost nor repeated by a crash. Dead letters
/// of ingress records that cannot be routed still go to the sink.
pub const DEAD_LETTERS: TypeName = TypeName::from_static("statefun-rs/dead-letters");

/// A dead letter as the value of a [`DEAD_LETTERS`] egress record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeadLetterRecord {
    /// Why (the [`DeadLetterReason`] as text).
    #[prost(string, tag = "1")]
    pub reason: String,
    /// The intended receiver, `type/id`.
    #[prost(string, optional, tag = "2")]
    pub target: Option<String>,
    /// Its id alone (the Kafka record key of a dead letter).
    #[prost(string, optional, tag = "3")]
    pub target_id: Option<String>,
    /// The sender, `type/id`.
    #[prost(string, optional, tag = "4")]
    pub caller: Option<String>,
    /// The message's type name.
    #[prost(string, optional, tag = "5")]
    pub message_type: Option<String>,
    /// The message's bytes.
    #[prost(bytes = "bytes", optional, tag = "6")]
    pub message: Option<bytes::Bytes>,
}
statefun_sdk::protobuf_type!(DeadLetterRecord, "statefun-rs/dead-letter");

impl DeadLetterRecord {
    /// The record of a dead letter (an ingress record's fields are not kept).
    pub fn of(d: &DeadLetter) -> DeadLetterRecord {
        DeadLetterRecord {
            reason: d.reason.to_string(),
            target: d.target.as_ref().map(ToString::to_string),
            target_id: d.target.as_ref().map(|t| t.id().to_owned()),
            caller: d.caller.as_ref().map(ToString::to_string),
            message_type: d.message.as_ref().map(|m| m.type_name().as_str().to_owned()),
            message: d.message.as_ref().and_then(|m| m.bytes().cloned()),
        }
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
    use crate::PartitionId;
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
