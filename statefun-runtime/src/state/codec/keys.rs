//! The on-disk key layout: a documented, versioned byte codec.
//!
//! Why it exists: durable backends store every partition's data in one keyspace, and
//! scans per partition and per address must never see a neighbour's keys. Every key
//! starts with the format version and a kind byte, then the partition, then
//! length-prefixed components:
//!
//! ```text
//! state value:  [version=1][kind=0x01][partition u32 BE]
//!               [type len u16 BE][type bytes][id len u32 BE][id bytes][name len u8][name bytes]
//! progress:     [version=1][kind=0x02][partition u32 BE][source len u16 BE][source bytes]
//! inbox:        [version=1][kind=0x03][receiver partition u32 BE][sender partition u32 BE][seq u64 BE]
//! timer:        [version=1][kind=0x04][owner partition u32 BE][due_ms u64 BE][seq u64 BE]
//! egress log:   [version=1][kind=0x05][partition u32 BE][seq u64 BE]
//! ```
//!
//! Meta keys start with `0x00` (never a format version), so no scan of versioned keys
//! sees them: `0x00 "format"` (the key format version a database was written with),
//! `0x00 "incarnation"` (the last incarnation handed out), `0x00 "incarnation/"
//! [partition u32 BE]` (a changelogged partition's), `0x00 "partitions"` (the
//! partition count, u32 BE), `0x00 "changelog/"[partition u32 BE]` (the changelog
//! position a partition's data is at, i64 BE).
//!
//! Inbox, timer and egress-log keys are fixed-size after the kind byte, and their big-endian
//! integers make byte order equal numeric order: an inbox is read per sender in sequence
//! order, timers in due order, the egress log in production order.
//!
//! Invariants, checked by property tests:
//! * `decode(encode(k)) == k` for every key;
//! * a key of one address never starts with the encoded prefix of another address or
//!   partition (length prefixes make the prefixes self-delimiting);
//! * byte order equals tuple order, where integers compare numerically and strings
//!   compare by `(length, bytes)`. Scans rely only on grouping (all keys of a
//!   partition, of an address, are contiguous), which this order gives.
//!
//! Kind bytes are never reused: a retired kind keeps its number reserved. A key with an
//! unknown version or kind is an error ([`KeyError`]), never silently skipped.

use statefun_sdk::{Address, TypeName};

use crate::partitioner::PartitionId;
use crate::state::backend::{Error, LogKind};

/// The current key format version.
pub const FORMAT_VERSION: u8 = 1;
/// Kind byte: a state value.
pub const KIND_STATE: u8 = 0x01;
/// Kind byte: the progress marker of a source.
pub const KIND_PROGRESS: u8 = 0x02;
/// Kind byte: a message accepted by a partition and not yet processed.
pub const KIND_INBOX: u8 = 0x03;
/// Kind byte: a pending delayed message, owned by the sender's partition.
pub const KIND_TIMER: u8 = 0x04;
/// Kind byte: an egress record produced and not yet handed to its sink.
pub const KIND_EGRESS: u8 = 0x05;

/// Whether `key` is an inbox, timer or egress-log key. Those are written once: their
/// sequence numbers are never reused, so a key deleted is never put again.
pub(crate) fn is_log_key(key: &[u8]) -> bool {
    matches!(key, [FORMAT_VERSION, KIND_INBOX | KIND_TIMER | KIND_EGRESS, ..])
}

pub use crate::records::LogKey;

impl LogKey {
    /// The kind byte of this entry.
    pub(crate) fn kind(&self) -> u8 {
        match self {
            LogKey::Inbox { .. } => KIND_INBOX,
            LogKey::Timer { .. } => KIND_TIMER,
            LogKey::Egress { .. } => KIND_EGRESS,
        }
    }
}

/// Why bytes are not a valid key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Written by a newer (or unknown) format version.
    #[error("key format version {found} is not supported (this build reads version {FORMAT_VERSION})")]
    UnknownVersion {
        /// The version byte found.
        found: u8,
    },
    /// A kind byte this build does not know.
    #[error("unknown key kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The key ends early or has trailing bytes.
    #[error("malformed key: {0}")]
    Malformed(&'static str),
    /// A component is longer than its length prefix can say.
    #[error("{what} is {len} bytes long; the key format allows at most {max}")]
    TooLong {
        /// Which component.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// A decoded key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// A state value of an address.
    State {
        /// Owning partition.
        partition: PartitionId,
        /// The address.
        address: Address,
        /// The state name.
        name: String,
    },
    /// How far a partition has consumed a source.
    Progress {
        /// Owning partition.
        partition: PartitionId,
        /// The source's name.
        source: String,
    },
    /// A durable log entry (inbox, timer, egress) of a partition.
    Log {
        /// Owning partition.
        partition: PartitionId,
        /// The entry.
        key: LogKey,
    },
}

fn header(kind: u8, partition: PartitionId, capacity: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + capacity);
    k.push(FORMAT_VERSION);
    k.push(kind);
    k.extend_from_slice(&partition.0.to_be_bytes());
    k
}

/// The prefix shared by every key of `kind` in `partition`.
pub fn partition_prefix(kind: u8, partition: PartitionId) -> Vec<u8> {
    header(kind, partition, 0)
}

/// The prefix shared by every state value of `address` in `partition`.
pub(crate) fn address_prefix(partition: PartitionId, address: &Address) -> Vec<u8> {
    let t = address.type_name().as_str().as_bytes();
    let id = address.id().as_bytes();
    let mut k = header(KIND_STATE, partition, 2 + t.len() + 4 + id.len() + 32);
    // TypeName::MAX_LEN (1024) fits u16.
    k.extend_from_slice(&(t.len() as u16).to_be_bytes());
    k.extend_from_slice(t);
    k.extend_from_slice(&(id.len() as u32).to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// The key of state value `name` of `address`. State names are at most 255 bytes
/// (enforced by `StateSpec`).
pub fn state_key(partition: PartitionId, address: &Address, name: &str) -> Vec<u8> {
    let mut k = address_prefix(partition, address);
    debug_assert!(name.len() <= 255, "state names are at most 255 bytes");
    k.push(name.len() as u8);
    k.extend_from_slice(name.as_bytes());
    k
}

/// The key of the progress marker of `source` in `partition`; source names are at most
/// 65535 bytes.
pub(crate) fn progress_key(partition: PartitionId, source: &str) -> Result<Vec<u8>, KeyError> {
    let s = source.as_bytes();
    let len = u16::try_from(s.len()).map_err(|_| KeyError::TooLong {
        what: "source name",
        len: s.len(),
        max: u16::MAX as usize,
    })?;
    let mut k = header(KIND_PROGRESS, partition, 2 + s.len());
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(s);
    Ok(k)
}

/// The key of log entry `key` of `partition`.
pub(crate) fn log_key(partition: PartitionId, key: LogKey) -> Vec<u8> {
    let mut k = header(key.kind(), partition, 16);
    match key {
        LogKey::Inbox { sender, seq } => {
            k.extend_from_slice(&sender.0.to_be_bytes());
            k.extend_from_slice(&seq.to_be_bytes());
        }
        LogKey::Timer { due_ms, seq } => {
            k.extend_from_slice(&due_ms.to_be_bytes());
            k.extend_from_slice(&seq.to_be_bytes());
        }
        LogKey::Egress { seq } => k.extend_from_slice(&seq.to_be_bytes()),
    }
    k
}

/// The kind byte of the entries of log `kind`.
pub(crate) fn log_kind_byte(kind: LogKind) -> u8 {
    match kind {
        LogKind::Inbox => KIND_INBOX,
        LogKind::Timers => KIND_TIMER,
        LogKind::Egress => KIND_EGRESS,
    }
}

/// Decodes the key of a log entry scanned from `partition`'s log in the database at
/// `path` (named in the error).
pub(crate) fn decode_log_key(key: &[u8], partition: PartitionId, path: &std::path::Path) -> Result<LogKey, Error> {
    match decode(key) {
        Ok(Key::Log { key, .. }) => Ok(key),
        Ok(other) => Err(Error::Permanent(format!(
            "unexpected key {other:?} in the log of partition {partition} in RocksDB at {}",
            path.display()
        ))),
        Err(e) => Err(Error::Permanent(format!(
            "corrupt log key in partition {partition} in RocksDB at {}: {e}; restore a checkpoint \
             (see docs/operations.md)",
            path.display()
        ))),
    }
}

/// Meta key: the key format version the database was written with.
pub(crate) const META_FORMAT_KEY: &[u8] = b"\x00format";
/// Meta key: the last incarnation handed out
/// ([`StateBackend::next_incarnation`](crate::state::StateBackend::next_incarnation)).
pub(crate) const META_INCARNATION_KEY: &[u8] = b"\x00incarnation";
/// Meta key: the partition count the database was written with.
pub(crate) const META_PARTITIONS_KEY: &[u8] = b"\x00partitions";
const META_CHANGELOG_PREFIX: &[u8] = b"\x00changelog/";

/// The meta key holding the changelog position a partition's data is at.
pub(crate) fn changelog_position_key(partition: PartitionId) -> Vec<u8> {
    let mut k = META_CHANGELOG_PREFIX.to_vec();
    k.extend_from_slice(&partition.0.to_be_bytes());
    k
}

/// The meta key of one partition's incarnation counter in a changelogged backend
/// ([`StateBackend::next_incarnation`](crate::state::StateBackend::next_incarnation)):
/// partitions move between instances with their changelog, so each carries the highest
/// incarnation that wrote its logs.
pub(crate) fn partition_incarnation_key(partition: PartitionId) -> Vec<u8> {
    let mut k = META_INCARNATION_KEY.to_vec();
    k.push(b'/');
    k.extend_from_slice(&partition.0.to_be_bytes());
    k
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], KeyError> {
        if self.0.len() < n {
            return Err(KeyError::Malformed("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, KeyError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, KeyError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, KeyError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, KeyError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn str(&mut self, n: usize) -> Result<&'a str, KeyError> {
        std::str::from_utf8(self.take(n)?).map_err(|_| KeyError::Malformed("component is not UTF-8"))
    }
}

/// Decodes a key.
pub fn decode(bytes: &[u8]) -> Result<Key, KeyError> {
    let mut r = Reader(bytes);
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(KeyError::UnknownVersion { found: version });
    }
    let kind = r.u8()?;
    let partition = PartitionId(r.u32()?);
    let key = match kind {
        KIND_STATE => {
            let tl = r.u16()? as usize;
            let t = TypeName::parse(r.str(tl)?).map_err(|_| KeyError::Malformed("invalid type name"))?;
            let il = r.u32()? as usize;
            let address = Address::new(t, r.str(il)?).map_err(|_| KeyError::Malformed("empty address id"))?;
            let nl = r.u8()? as usize;
            let name = r.str(nl)?.to_owned();
            Key::State {
                partition,
                address,
                name,
            }
        }
        KIND_PROGRESS => {
            let sl = r.u16()? as usize;
            Key::Progress {
                partition,
                source: r.str(sl)?.to_owned(),
            }
        }
        KIND_INBOX => Key::Log {
            partition,
            key: LogKey::Inbox {
                sender: PartitionId(r.u32()?),
                seq: r.u64()?,
            },
        },
        KIND_TIMER => Key::Log {
            partition,
            key: LogKey::Timer {
                due_ms: r.u64()?,
                seq: r.u64()?,
            },
        },
        KIND_EGRESS => Key::Log {
            partition,
            key: LogKey::Egress { seq: r.u64()? },
        },
        other => return Err(KeyError::UnknownKind(other)),
    };
    if !r.0.is_empty() {
        return Err(KeyError::Malformed("trailing bytes"));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cmp::Ordering;

    fn address() -> impl Strategy<Value = Address> {
        ("[a-z]{1,3}(\\.[a-z]{1,3})?", "[a-z]{1,3}", "\\PC{1,6}")
            .prop_map(|(ns, n, id)| Address::new(TypeName::parse(&format!("{ns}/{n}")).unwrap(), id).unwrap())
    }

    fn log_key_strategy() -> impl Strategy<Value = LogKey> {
        prop_oneof![
            (0u32..3, any::<u64>()).prop_map(|(s, seq)| LogKey::Inbox {
                sender: PartitionId(s),
                seq
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(due_ms, seq)| LogKey::Timer { due_ms, seq }),
            any::<u64>().prop_map(|seq| LogKey::Egress { seq }),
        ]
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z_][a-z0-9_]{0,8}"
    }

    /// Strings ordered by (length, bytes): the order the length-prefixed encoding gives.
    fn lcmp(a: &str, b: &str) -> Ordering {
        (a.len(), a.as_bytes()).cmp(&(b.len(), b.as_bytes()))
    }

    fn tuple_cmp(a: &(u32, Address, String), b: &(u32, Address, String)) -> Ordering {
        a.0.cmp(&b.0)
            .then_with(|| lcmp(a.1.type_name().as_str(), b.1.type_name().as_str()))
            .then_with(|| lcmp(a.1.id(), b.1.id()))
            .then_with(|| lcmp(&a.2, &b.2))
    }

    proptest! {
        #[test]
        fn state_keys_round_trip(p in any::<u32>(), a in address(), n in name()) {
            let k = state_key(PartitionId(p), &a, &n);
            prop_assert_eq!(decode(&k).unwrap(), Key::State { partition: PartitionId(p), address: a, name: n });
        }

        #[test]
        fn progress_keys_round_trip(p in any::<u32>(), s in "\\PC{0,20}") {
            let k = progress_key(PartitionId(p), &s).unwrap();
            prop_assert_eq!(decode(&k).unwrap(), Key::Progress { partition: PartitionId(p), source: s });
        }

        #[test]
        fn log_keys_round_trip_and_sort_like_their_fields(
            p in 0u32..4,
            x in log_key_strategy(),
            y in log_key_strategy(),
        ) {
            let kx = log_key(PartitionId(p), x);
            prop_assert_eq!(decode(&kx).unwrap(), Key::Log { partition: PartitionId(p), key: x });
            let ky = log_key(PartitionId(p), y);
            // Same kind: byte order is field order (the derived Ord); different kinds
            // never share a prefix.
            if x.kind() == y.kind() {
                prop_assert_eq!(kx.cmp(&ky), x.cmp(&y));
            } else {
                prop_assert!(!kx.starts_with(&partition_prefix(y.kind(), PartitionId(p))));
            }
        }

        #[test]
        fn byte_order_is_tuple_order(
            x in (0u32..4, address(), name()),
            y in (0u32..4, address(), name()),
        ) {
            let kx = state_key(PartitionId(x.0), &x.1, &x.2);
            let ky = state_key(PartitionId(y.0), &y.1, &y.2);
            prop_assert_eq!(kx.cmp(&ky), tuple_cmp(&x, &y));
        }

        #[test]
        fn prefixes_never_capture_other_addresses_or_partitions(
            x in (0u32..3, address(), name()),
            y in (0u32..3, address()),
        ) {
            let k = state_key(PartitionId(x.0), &x.1, &x.2);
            let same_addr = x.0 == y.0 && x.1 == y.1;
            prop_assert_eq!(k.starts_with(&address_prefix(PartitionId(y.0), &y.1)), same_addr);
            prop_assert_eq!(k.starts_with(&partition_prefix(KIND_STATE, PartitionId(y.0))), x.0 == y.0);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn an_over_long_source_name_is_an_error_not_a_corrupt_key() {
        let long = "s".repeat(u16::MAX as usize + 1);
        assert!(matches!(
            progress_key(PartitionId(0), &long),
            Err(KeyError::TooLong { .. })
        ));
        assert!(progress_key(PartitionId(0), &long[1..]).is_ok());
    }

    #[test]
    fn unknown_versions_and_kinds_are_errors() {
        let a = Address::new(TypeName::from_static("t/f"), "x").unwrap();
        let mut k = state_key(PartitionId(0), &a, "s");
        k[0] = 2;
        assert_eq!(decode(&k), Err(KeyError::UnknownVersion { found: 2 }));
        k[0] = FORMAT_VERSION;
        k[1] = 0x7f;
        assert_eq!(decode(&k), Err(KeyError::UnknownKind(0x7f)));
        let k = state_key(PartitionId(0), &a, "s");
        assert!(matches!(decode(&k[..k.len() - 1]), Err(KeyError::Malformed(_))));
    }
}
