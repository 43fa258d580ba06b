//! The value encoding of durable log entries: inbox messages, pending timers, egress
//! records.
//!
//! Why it exists: these entries must outlive the process and be read back by a later
//! build, so their encoding is explicit and versioned: one format byte (`1`), then a
//! protobuf message (fields are only ever added, never renumbered, so a newer build
//! reads older entries). A value that does not decode is a clear error naming what it
//! was, never a panic.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use statefun_sdk::{Address, TypeName, TypedValue};

use crate::envelope::Envelope;
use crate::records::EgressRecord;

const ENTRY_FORMAT: u8 = 1;

#[derive(Clone, PartialEq, prost::Message)]
struct WireAddress {
    #[prost(string, tag = "1")]
    type_name: String,
    #[prost(string, tag = "2")]
    id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WireValue {
    #[prost(string, tag = "1")]
    type_name: String,
    #[prost(bool, tag = "2")]
    has_value: bool,
    #[prost(bytes = "bytes", tag = "3")]
    value: Bytes,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WireEnvelope {
    #[prost(message, optional, tag = "1")]
    target: Option<WireAddress>,
    #[prost(message, optional, tag = "2")]
    caller: Option<WireAddress>,
    #[prost(message, optional, tag = "3")]
    message: Option<WireValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WireTimer {
    #[prost(message, optional, tag = "1")]
    sender: Option<WireAddress>,
    #[prost(string, optional, tag = "2")]
    token: Option<String>,
    #[prost(message, optional, tag = "3")]
    envelope: Option<WireEnvelope>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WireEgress {
    #[prost(string, tag = "1")]
    egress: String,
    #[prost(message, optional, tag = "2")]
    source: Option<WireAddress>,
    #[prost(message, optional, tag = "3")]
    message: Option<WireValue>,
    /// The producing run (see `EgressId::run`).
    #[prost(fixed64, tag = "4")]
    run: u64,
}

/// A pending delayed message as stored.
#[derive(Debug, Clone)]
pub(crate) struct StoredTimer {
    pub(crate) sender: Address,
    pub(crate) token: Option<String>,
    pub(crate) envelope: Envelope,
}

fn address(a: &Address) -> WireAddress {
    WireAddress {
        type_name: a.type_name().as_str().to_owned(),
        id: a.id().to_owned(),
    }
}

fn value(v: &TypedValue) -> WireValue {
    WireValue {
        type_name: v.type_name().as_str().to_owned(),
        has_value: v.bytes().is_some(),
        value: v.bytes().cloned().unwrap_or_default(),
    }
}

fn envelope(e: &Envelope) -> WireEnvelope {
    WireEnvelope {
        target: Some(address(&e.target)),
        caller: e.caller.as_ref().map(address),
        message: Some(value(&e.message)),
    }
}

fn frame(m: &impl Message) -> Bytes {
    let mut b = BytesMut::with_capacity(1 + m.encoded_len());
    b.put_u8(ENTRY_FORMAT);
    m.encode(&mut b).expect("BytesMut grows");
    b.freeze()
}

fn unframe<M: Message + Default>(what: &str, b: &[u8]) -> Result<M, String> {
    match b {
        [ENTRY_FORMAT, rest @ ..] => M::decode(rest).map_err(|e| format!("corrupt {what}: {e}")),
        [f, ..] => Err(format!("{what} has unknown format {f}")),
        [] => Err(format!("{what} is empty")),
    }
}

fn from_address(what: &str, a: Option<WireAddress>) -> Result<Address, String> {
    let a = a.ok_or_else(|| format!("{what}: address missing"))?;
    let t = TypeName::parse(&a.type_name).map_err(|e| format!("{what}: {e}"))?;
    Address::new(t, a.id).map_err(|e| format!("{what}: {e}"))
}

fn from_value(what: &str, v: Option<WireValue>) -> Result<TypedValue, String> {
    let v = v.ok_or_else(|| format!("{what}: message missing"))?;
    let t = TypeName::parse(&v.type_name).map_err(|e| format!("{what}: {e}"))?;
    Ok(if v.has_value {
        TypedValue::from_bytes(t, v.value)
    } else {
        TypedValue::absent(t)
    })
}

fn from_envelope(what: &str, e: WireEnvelope) -> Result<Envelope, String> {
    Ok(Envelope {
        target: from_address(what, e.target)?,
        caller: e.caller.map(|c| from_address(what, Some(c))).transpose()?,
        message: from_value(what, e.message)?,
        inbox: None,
        position: None,
        also: Vec::new(),
    })
}

pub(crate) fn encode_envelope(e: &Envelope) -> Bytes {
    frame(&envelope(e))
}

pub(crate) fn decode_envelope(b: &[u8]) -> Result<Envelope, String> {
    from_envelope("inbox message", unframe("inbox message", b)?)
}

pub(crate) fn encode_timer(sender: &Address, token: Option<&str>, e: &Envelope) -> Bytes {
    frame(&WireTimer {
        sender: Some(address(sender)),
        token: token.map(str::to_owned),
        envelope: Some(envelope(e)),
    })
}

pub(crate) fn decode_timer(b: &[u8]) -> Result<StoredTimer, String> {
    let t: WireTimer = unframe("timer", b)?;
    Ok(StoredTimer {
        sender: from_address("timer", t.sender)?,
        token: t.token,
        envelope: from_envelope("timer", t.envelope.ok_or("timer: envelope missing")?)?,
    })
}

pub(crate) fn encode_egress(egress: &TypeName, source: &Address, message: &TypedValue, run: u64) -> Bytes {
    frame(&WireEgress {
        egress: egress.as_str().to_owned(),
        source: Some(address(source)),
        message: Some(value(message)),
        run,
    })
}

/// The record (without its id) and the run that produced it.
pub(crate) fn decode_egress(b: &[u8]) -> Result<(EgressRecord, u64), String> {
    let e: WireEgress = unframe("egress record", b)?;
    let record = EgressRecord {
        egress: TypeName::parse(&e.egress).map_err(|e| format!("egress record: {e}"))?,
        source: from_address("egress record", e.source)?,
        message: from_value("egress record", e.message)?,
        id: None,
    };
    Ok((record, e.run))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr() -> impl Strategy<Value = Address> {
        ("[a-z]{1,4}/[a-z]{1,4}", "\\PC{1,8}")
            .prop_map(|(t, id)| Address::new(TypeName::parse(&t).unwrap(), id).unwrap())
    }

    fn typed() -> impl Strategy<Value = TypedValue> {
        (
            "[a-z]{1,4}/[a-z]{1,4}",
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
        )
            .prop_map(|(t, v)| {
                let t = TypeName::parse(&t).unwrap();
                match v {
                    Some(v) => TypedValue::from_bytes(t, v),
                    None => TypedValue::absent(t),
                }
            })
    }

    fn env() -> impl Strategy<Value = Envelope> {
        (addr(), proptest::option::of(addr()), typed()).prop_map(|(target, caller, message)| Envelope {
            target,
            caller,
            message,
            inbox: None,
            position: None,
            also: Vec::new(),
        })
    }

    fn same(a: &Envelope, b: &Envelope) -> bool {
        a.target == b.target && a.caller == b.caller && a.message == b.message
    }

    proptest! {
        #[test]
        fn envelopes_round_trip(e in env()) {
            prop_assert!(same(&decode_envelope(&encode_envelope(&e)).unwrap(), &e));
        }

        #[test]
        fn timers_round_trip(s in addr(), token in proptest::option::of("\\PC{0,8}"), e in env()) {
            let t = decode_timer(&encode_timer(&s, token.as_deref(), &e)).unwrap();
            prop_assert_eq!(&t.sender, &s);
            prop_assert_eq!(&t.token, &token);
            prop_assert!(same(&t.envelope, &e));
        }

        #[test]
        fn egress_records_round_trip(s in addr(), m in typed()) {
            let id = TypeName::from_static("io/out");
            let (r, run) = decode_egress(&encode_egress(&id, &s, &m, 77)).unwrap();
            prop_assert_eq!((r.egress, r.source, r.message, run), (id, s, m, 77));
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(b in proptest::collection::vec(any::<u8>(), 0..48)) {
            let _ = decode_envelope(&b);
            let _ = decode_timer(&b);
            let _ = decode_egress(&b);
        }
    }

    #[test]
    fn unknown_entry_formats_are_named_errors() {
        assert!(decode_envelope(&[9, 1, 2]).unwrap_err().contains("unknown format 9"));
        assert!(decode_timer(&[]).unwrap_err().contains("empty"));
    }
}
