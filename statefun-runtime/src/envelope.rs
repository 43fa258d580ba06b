//! The message envelope: a message on its way to an address, with what the runtime
//! keeps beside it (its inbox key in durable mode, its source position, its other
//! receivers).
//!
//! Why it exists: every layer above moves envelopes (ingress accepts them, partitions
//! queue and invoke them, timers hold them, state logs encode them); as plain data at
//! the bottom of the module layers it imports none of those
//! (`docs/architecture.md`, "Module layers").

use std::sync::Arc;

use statefun_sdk::{Address, TypedValue};

use crate::records::LogKey;

/// A message on its way to an address.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    pub(crate) target: Address,
    pub(crate) caller: Option<Address>,
    pub(crate) message: TypedValue,
    /// Its key in the receiving partition's durable inbox, once it is there (durable
    /// backends only). The commit that processes the message deletes it.
    pub(crate) inbox: Option<LogKey>,
    /// Source and offset of an ingress record (`"topic/partition"`, offset): the
    /// partition skips records at or below the progress it has stored for the source.
    pub(crate) position: Option<(Arc<str>, u64)>,
    /// More receivers of the same ingress record ([`Routed::also`](crate::Routed)): the
    /// accepting partition makes one message per receiver, all in the write that
    /// accepts the record. Empty for everything else.
    pub(crate) also: Vec<Address>,
}
