//! StateFun's remote-function protocol for statefun-rs: the request-reply messages
//! (`io.statefun.sdk.reqreply`) and the egress record types (`io.statefun.sdk.egress`),
//! generated from this crate's own `.proto` files, plus conversions to and from the
//! SDK's [`Address`] and [`TypedValue`]; and StateFun's module format ([`module`]:
//! `module.yaml` endpoints, Kafka ingresses and egresses).
//!
//! Why it exists: functions written against Apache Flink StateFun's SDKs (Python, Java,
//! Go, JavaScript) speak this protocol over HTTP; the runtime's remote-function
//! transport and the SDK's remote server both use these types. The wire contract and
//! the compatibility notes are in `docs/protocol.md`. The built-in primitive types
//! (`io.statefun.types/int`, ...) are encoded by the SDK (`statefun_sdk::value::builtin`).
//!
//! ```
//! use prost::Message as _;
//! use statefun_protocol::reqreply::{ToFunction, to_function};
//!
//! let target = statefun_sdk::Address::new(statefun_sdk::TypeName::parse("example/greeter").unwrap(), "alice").unwrap();
//! let batch = to_function::InvocationBatchRequest {
//!     target: Some((&target).into()),
//!     ..Default::default()
//! };
//! let bytes = ToFunction { request: Some(to_function::Request::Invocation(batch)) }.encode_to_vec();
//! assert_eq!(&bytes[..2], &[0xa2, 0x06], "field 100, length-delimited");
//! ```

use bytes::Bytes;
use statefun_sdk::{Address, TypeName, TypedValue};

pub mod module;

/// The request-reply messages (package `io.statefun.sdk.reqreply`).
#[allow(missing_docs, clippy::all)]
pub mod reqreply {
    include!(concat!(env!("OUT_DIR"), "/io.statefun.sdk.reqreply.rs"));
}

/// Egress records of remote functions (package `io.statefun.sdk.egress`).
#[allow(missing_docs, clippy::all)]
pub mod egress {
    include!(concat!(env!("OUT_DIR"), "/io.statefun.sdk.egress.rs"));
}

statefun_sdk::protobuf_type!(
    egress::KafkaProducerRecord,
    "type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord"
);

/// The content type of requests and responses: StateFun's runtime refuses any other.
pub const CONTENT_TYPE: &str = "application/octet-stream";

/// A protocol value that does not make an SDK value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    /// A type name is not `namespace/name`.
    #[error("invalid type name {0:?}: expected <namespace>/<name>")]
    TypeName(String),
    /// An address has an empty id or an invalid type.
    #[error("invalid address {namespace}/{kind} id {id:?}")]
    Address {
        /// Namespace.
        namespace: String,
        /// Type.
        kind: String,
        /// Id.
        id: String,
    },
    /// A required field is missing.
    #[error("{0} is missing")]
    Missing(&'static str),
}

impl From<&Address> for reqreply::Address {
    fn from(a: &Address) -> Self {
        reqreply::Address {
            namespace: a.type_name().namespace().to_owned(),
            r#type: a.type_name().name().to_owned(),
            id: a.id().to_owned(),
        }
    }
}

impl TryFrom<&reqreply::Address> for Address {
    type Error = ConversionError;

    fn try_from(a: &reqreply::Address) -> Result<Address, ConversionError> {
        let invalid = || ConversionError::Address {
            namespace: a.namespace.clone(),
            kind: a.r#type.clone(),
            id: a.id.clone(),
        };
        let t = TypeName::from_parts(&a.namespace, &a.r#type).map_err(|_| invalid())?;
        Address::new(t, &a.id).map_err(|_| invalid())
    }
}

impl From<&TypedValue> for reqreply::TypedValue {
    fn from(v: &TypedValue) -> Self {
        reqreply::TypedValue {
            typename: v.type_name().as_str().to_owned(),
            has_value: v.bytes().is_some(),
            value: v.bytes().cloned().unwrap_or_default(),
        }
    }
}

impl TryFrom<reqreply::TypedValue> for TypedValue {
    type Error = ConversionError;

    fn try_from(v: reqreply::TypedValue) -> Result<TypedValue, ConversionError> {
        let t = TypeName::parse(&v.typename).map_err(|_| ConversionError::TypeName(v.typename.clone()))?;
        Ok(if v.has_value {
            TypedValue::from_bytes(t, v.value)
        } else {
            TypedValue::absent(t)
        })
    }
}

/// A `TypedValue` with a value (what a state value or a message argument is on the wire).
pub fn typed_value(typename: &TypeName, value: Bytes) -> reqreply::TypedValue {
    reqreply::TypedValue {
        typename: typename.as_str().to_owned(),
        has_value: true,
        value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use reqreply::from_function::{self, persisted_value_mutation::MutationType};

    #[test]
    fn addresses_and_values_round_trip_through_the_protocol_types() {
        let a = Address::new(TypeName::parse("example/greeter").unwrap(), "alice").unwrap();
        let p = reqreply::Address::from(&a);
        assert_eq!(
            (p.namespace.as_str(), p.r#type.as_str(), p.id.as_str()),
            ("example", "greeter", "alice")
        );
        assert_eq!(Address::try_from(&p).unwrap(), a);
        let empty_id = reqreply::Address { id: String::new(), ..p };
        assert!(matches!(
            Address::try_from(&empty_id),
            Err(ConversionError::Address { .. })
        ));

        let v = TypedValue::from_bytes(
            TypeName::parse("io.statefun.types/int").unwrap(),
            vec![0x0d, 1, 0, 0, 0],
        );
        assert_eq!(TypedValue::try_from(reqreply::TypedValue::from(&v)).unwrap(), v);
        // has_value tells an empty value from none.
        let empty = TypedValue::from_bytes(TypeName::parse("example/empty").unwrap(), Vec::new());
        let wire = reqreply::TypedValue::from(&empty);
        assert!(wire.has_value);
        assert_eq!(TypedValue::try_from(wire).unwrap().bytes().map(|b| b.len()), Some(0));
        let none = TypedValue::absent(TypeName::parse("example/empty").unwrap());
        assert_eq!(
            TypedValue::try_from(reqreply::TypedValue::from(&none)).unwrap().bytes(),
            None
        );
        let bad = reqreply::TypedValue {
            typename: "no-slash".into(),
            ..Default::default()
        };
        assert_eq!(
            TypedValue::try_from(bad),
            Err(ConversionError::TypeName("no-slash".into()))
        );
    }

    #[test]
    fn a_delete_mutation_carries_no_type_field_and_an_empty_response_decodes_as_no_effects() {
        // DELETE is the enum's zero: proto3 writes no field 1 for it.
        let delete = from_function::PersistedValueMutation {
            mutation_type: MutationType::Delete as i32,
            state_name: "seen".into(),
            state_value: None,
        };
        assert_eq!(delete.encode_to_vec(), [0x12, 4, b's', b'e', b'e', b'n']);
        let empty = reqreply::FromFunction::decode(&[][..]).unwrap();
        assert!(empty.response.is_none());
    }
}
