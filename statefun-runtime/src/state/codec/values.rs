//! The value encoding of state values and of the fixed-width numbers stored beside
//! them (progress markers, incarnations, changelog positions).
//!
//! Why it exists: a state value is stored with its expiry deadline, and a durable
//! backend, a changelog and a reader of a changelog topic must agree on the bytes.
//! Layout of a state value:
//!
//! ```text
//! [value format = 1][flags: bit 0 = expires][expires_at_ms u64 BE, if flag][value bytes]
//! ```
//!
//! Numbers are 8 bytes big-endian. A value that does not decode is an error, never a
//! panic.

use bytes::Bytes;

use crate::state::backend::{Error, StoredValue};

const VALUE_FORMAT: u8 = 1;
const FLAG_EXPIRES: u8 = 0x01;

/// Encodes a stored value (layout in the module docs).
pub(crate) fn encode_value(v: &StoredValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + v.value.len());
    out.push(VALUE_FORMAT);
    match v.expires_at_ms {
        Some(t) => {
            out.push(FLAG_EXPIRES);
            out.extend_from_slice(&t.to_be_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&v.value);
    out
}

/// Decodes a stored state value (layout in the module docs); `Err` says why the bytes
/// are not one.
pub fn decode_value(b: &[u8]) -> Result<StoredValue, String> {
    match b {
        [VALUE_FORMAT, FLAG_EXPIRES, rest @ ..] if rest.len() >= 8 => {
            let (t, v) = rest.split_at(8);
            Ok(StoredValue {
                value: Bytes::copy_from_slice(v),
                expires_at_ms: Some(u64::from_be_bytes(t.try_into().expect("8 bytes"))),
            })
        }
        [VALUE_FORMAT, 0, v @ ..] => Ok(StoredValue {
            value: Bytes::copy_from_slice(v),
            expires_at_ms: None,
        }),
        [f, ..] if *f != VALUE_FORMAT => Err(format!("unknown value format {f}")),
        _ => Err("truncated value".to_owned()),
    }
}

/// The expiry deadline of an encoded state value, without decoding the rest: `None`
/// if it does not expire or is not a value of this format (a compaction filter keeps
/// what it cannot read).
pub(crate) fn expires_at(b: &[u8]) -> Option<u64> {
    match b {
        [VALUE_FORMAT, FLAG_EXPIRES, rest @ ..] => {
            rest.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)
        }
        _ => None,
    }
}

/// Decodes an 8-byte big-endian number (a progress marker, the incarnation, a changelog
/// position); `what` names it in the error.
pub(crate) fn decode_u64(v: &[u8], what: impl FnOnce() -> String) -> Result<u64, Error> {
    v.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Permanent(format!("corrupt {}", what())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn values_round_trip(v in proptest::collection::vec(any::<u8>(), 0..64), t in proptest::option::of(any::<u64>())) {
            let sv = StoredValue { value: Bytes::from(v), expires_at_ms: t };
            prop_assert_eq!(decode_value(&encode_value(&sv)).unwrap(), sv);
        }

        #[test]
        fn garbage_values_are_errors_not_panics(v in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = decode_value(&v);
        }
    }
}
