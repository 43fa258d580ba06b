//! A [`WriteBatch`] as raw key-value changes: what a durable backend writes and what a
//! changelog carries.
//!
//! Why it exists: the RocksDB backend applies these changes to its database, the
//! changelogged backend stages them for its changelog, and `statefun-kafka` produces
//! and restores them; all three must produce the same bytes for the same write.

use bytes::Bytes;

use super::keys;
use super::values::encode_value;
use crate::partitioner::PartitionId;
use crate::state::backend::{Error, WriteBatch};

/// One raw key-value change of the database: what a [`WriteBatch`] becomes on disk, and
/// what a changelog carries (see [`crate::state::changelog`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawOp {
    /// The encoded key ([`keys`] layout, or a meta key starting with `0x00`).
    pub key: Bytes,
    /// The encoded value, or `None` to delete the key.
    pub value: Option<Bytes>,
}

/// Encodes `batch`, written by `partition`, as the raw changes it makes, in order: its
/// state values, then its progress markers, then its log entries. Its egress records are
/// not part of it (a backend that takes them commits them itself).
pub(crate) fn encode_batch(partition: PartitionId, batch: &WriteBatch) -> Result<Vec<RawOp>, Error> {
    let mut out = Vec::with_capacity(batch.ops.len() + batch.progress.len() + batch.log.len());
    for op in &batch.ops {
        out.push(RawOp {
            key: keys::state_key(partition, &op.address, &op.name).into(),
            value: op.value.as_ref().map(|v| encode_value(v).into()),
        });
    }
    for (source, position) in &batch.progress {
        let key = keys::progress_key(partition, source).map_err(|e| Error::Permanent(e.to_string()))?;
        out.push(RawOp {
            key: key.into(),
            value: Some(Bytes::copy_from_slice(&position.to_be_bytes())),
        });
    }
    for op in &batch.log {
        out.push(RawOp {
            key: keys::log_key(op.partition, op.key).into(),
            value: op.value.clone(),
        });
    }
    Ok(out)
}
