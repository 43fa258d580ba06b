//! The records that cross the runtime's edges, as plain data: what a source delivers
//! ([`IngressRecord`], [`SourcePosition`]) and where a router sends it ([`Routed`]),
//! what a function writes to an egress ([`EgressRecord`], [`EgressId`]), and what could
//! not be delivered ([`DeadLetter`], [`DeadLetterReason`], [`DeadLetterRecord`]).
//!
//! Why it exists: these values are shared by the partition, the ingress and egress
//! sinks and the state backends (which commit egress records and dead letters). Kept
//! at the bottom of the module layers, apart from the traits that consume them, so no
//! two of those import each other (`docs/architecture.md`, "Module layers").
//! They are re-exported where users know them: [`crate::egress`] and [`crate::ingress`].

use std::sync::Arc;

use bytes::Bytes;
use statefun_sdk::{Address, TypeName, TypedValue};

use crate::partitioner::PartitionId;

/// Where a record came from, for replay and for dead-letter reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePosition {
    /// Topic or source name.
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Offset within the source partition.
    pub offset: i64,
}

/// A record from an ingress, shaped like a Kafka record.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IngressRecord {
    /// The record key.
    pub key: Option<Bytes>,
    /// The record value.
    pub value: Option<Bytes>,
    /// Headers, in order.
    pub headers: Vec<(String, Bytes)>,
    /// Timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
    /// Source position, when the source has one.
    pub position: Option<SourcePosition>,
}

impl IngressRecord {
    /// A record with a key and a value.
    pub fn new(key: impl Into<Bytes>, value: impl Into<Bytes>) -> IngressRecord {
        IngressRecord {
            key: Some(key.into()),
            value: Some(value.into()),
            ..Default::default()
        }
    }
}

/// Where a router sends a record.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    /// The receiving function.
    pub target: Address,
    /// The message.
    pub message: TypedValue,
    /// The sending function, for a message between functions that travelled through a
    /// topic ([`MessageRouter`]); `None` for records from the outside.
    pub caller: Option<Address>,
    /// More receivers of the same message (StateFun's ingress topics with several
    /// targets). The record is accepted once: one message per receiver, all in the same
    /// write as the progress past the record, so a crash delivers to all or to none.
    pub also: Vec<Address>,
}

impl Routed {
    /// `message` for `target`, from outside any function.
    pub fn new(target: Address, message: TypedValue) -> Routed {
        Routed {
            target,
            message,
            caller: None,
            also: Vec::new(),
        }
    }

    /// `message` for every address of `targets` (at least one).
    pub fn to_all(targets: Vec<Address>, message: TypedValue) -> Option<Routed> {
        let mut targets = targets.into_iter();
        let mut routed = Routed::new(targets.next()?, message);
        routed.also = targets.collect();
        Some(routed)
    }
}

/// Why a record could not be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RouteError(pub String);

/// The runtime is no longer accepting records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("runtime is shutting down")]
pub struct Closed;

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
    pub partition: PartitionId,
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

/// The key of a durable log entry within its partition: inbox messages, pending timers
/// and egress records. Ordered as the entries are read back on recovery. Its encoding
/// is [`crate::state::codec::keys`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogKey {
    /// A message in the inbox, written by partition `sender` under its sequence `seq`.
    Inbox {
        /// The partition that wrote it.
        sender: PartitionId,
        /// The writer's sequence number.
        seq: u64,
    },
    /// A delayed message due at `due_ms` (runtime clock, milliseconds since the epoch).
    Timer {
        /// When it is due.
        due_ms: u64,
        /// The owner's sequence number (unique per partition).
        seq: u64,
    },
    /// An egress record, in production order.
    Egress {
        /// The producing partition's sequence number.
        seq: u64,
    },
}
