//! Expiry notices: the optional message a function receives when one of its state
//! values expires (our addition over StateFun).
//!
//! Why it exists: a value that silently disappears cannot be compensated for. A basket
//! that expires still holds reservations at the inventory; with a notice, the cart
//! function gets the basket's last value and releases them. Declare it per value with
//! [`ValueSpec::notify_on_expire`](crate::ValueSpec::notify_on_expire).
//!
//! Semantics (the runtime and [`TestHarness`](crate::TestHarness) do the same):
//! * every write of the value (and, for `expire_after_call`, every invocation that
//!   refreshes it) schedules the notice for the new deadline, replacing the earlier
//!   one; deleting the value cancels it;
//! * when the deadline passes, the function is invoked at its own address with an
//!   [`Expired`] message that carries the state name and the value as it was last
//!   written. The value itself is already gone: `storage().get` returns `None`;
//! * the notice is a delayed message to self under the reserved cancellation token
//!   [`expiry_token`]`(name)`, so it is durable like any delayed message, survives
//!   restarts, and is delivered exactly once. Do not use tokens starting with
//!   [`EXPIRY_TOKEN_PREFIX`] yourself.

use bytes::Bytes;

use crate::typename::TypeName;
use crate::value::{CodecError, TypedValue, ValueType, protobuf_decode, protobuf_encode};

/// Cancellation tokens starting with this are reserved for expiry notices.
pub const EXPIRY_TOKEN_PREFIX: &str = "statefun-rs.expire/";

/// The cancellation token of the expiry notice of state `name`.
pub fn expiry_token(name: &str) -> String {
    format!("{EXPIRY_TOKEN_PREFIX}{name}")
}

/// The message delivered when a state value declared with `notify_on_expire` expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    /// The state name.
    pub state: String,
    /// The value as it was last written (typed with the spec's type name).
    pub value: TypedValue,
}

impl Expired {
    /// The notice for the expired value `last` of `spec`, as a message. (Encoding a
    /// notice cannot fail: it is a fixed protobuf message.)
    pub fn message(spec: &crate::StateSpec, last: Bytes) -> TypedValue {
        let notice = Expired {
            state: spec.name.to_string(),
            value: TypedValue::from_bytes(spec.type_name.clone(), last),
        };
        TypedValue::from_bytes(Self::TYPE_NAME, notice.encode_wire())
    }

    /// True if `message` is an expiry notice.
    pub fn is_notice(message: &TypedValue) -> bool {
        message.type_name() == &Self::TYPE_NAME
    }

    fn encode_wire(&self) -> Bytes {
        protobuf_encode(&WireExpired {
            state: self.state.clone(),
            type_name: self.value.type_name().as_str().to_owned(),
            has_value: self.value.bytes().is_some(),
            value: self.value.bytes().cloned().unwrap_or_default(),
        })
    }

    /// Decodes the expired value.
    pub fn value_as<T: ValueType>(&self) -> Result<T, CodecError> {
        self.value.decode()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
struct WireExpired {
    #[prost(string, tag = "1")]
    state: String,
    #[prost(string, tag = "2")]
    type_name: String,
    #[prost(bool, tag = "3")]
    has_value: bool,
    #[prost(bytes = "bytes", tag = "4")]
    value: Bytes,
}

impl ValueType for Expired {
    const TYPE_NAME: TypeName = TypeName::from_static("io.statefun-rs/expired");

    fn encode(&self) -> Result<Bytes, CodecError> {
        Ok(self.encode_wire())
    }

    fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let w: WireExpired = protobuf_decode(Self::TYPE_NAME, bytes)?;
        let type_name = TypeName::parse(&w.type_name).map_err(|e| CodecError::Decode {
            type_name: Self::TYPE_NAME,
            reason: e.to_string(),
        })?;
        Ok(Expired {
            state: w.state,
            value: if w.has_value {
                TypedValue::from_bytes(type_name, w.value)
            } else {
                TypedValue::absent(type_name)
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_round_trips_with_the_value_and_its_type() {
        let e = Expired {
            state: "basket".into(),
            value: TypedValue::of(&"3 apples".to_string()).unwrap(),
        };
        let back = Expired::decode(&e.encode().unwrap()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.value_as::<String>().unwrap(), "3 apples");
        assert_eq!(expiry_token("basket"), "statefun-rs.expire/basket");
    }
}
