//! StateFun's remote-function protocol for statefun-rs: the request-reply messages
//! (`io.statefun.sdk.reqreply`) and the egress record types (`io.statefun.sdk.egress`),
//! generated from this crate's own `.proto` files; with the `grpc` feature, also
//! statefun-rs's `RemoteFunction` gRPC service ([`grpc`]) carrying the same messages.
//!
//! Why it exists: functions written against Apache Flink StateFun's SDKs (Python, Java,
//! Go, JavaScript) speak this protocol over HTTP; the runtime's remote-function
//! transports (`statefun-remote`) and the SDK's remote server (`statefun-sdk`, feature
//! `remote`) both use these types. It depends on no other statefun crate, so that the
//! SDK can: conversions to and from the SDK's types live in `statefun_sdk::protocol`.
//! The wire contract and the compatibility notes are in `docs/protocol.md`.
//!
//! ```
//! use prost::Message as _;
//! use statefun_protocol::reqreply::{Address, ToFunction, to_function};
//!
//! let batch = to_function::InvocationBatchRequest {
//!     target: Some(Address { namespace: "example".into(), r#type: "greeter".into(), id: "alice".into() }),
//!     ..Default::default()
//! };
//! let bytes = ToFunction { request: Some(to_function::Request::Invocation(batch)) }.encode_to_vec();
//! assert_eq!(&bytes[..2], &[0xa2, 0x06], "field 100, length-delimited");
//! ```

use bytes::Bytes;

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

/// statefun-rs's gRPC service (package `statefun_rs.remote.v1`): `RemoteFunction.Invoke`
/// takes a `ToFunction` and answers a `FromFunction`.
#[cfg(feature = "grpc")]
#[allow(missing_docs, missing_debug_implementations, unreachable_pub, clippy::all)]
pub mod grpc {
    include!(concat!(env!("OUT_DIR"), "/statefun_rs.remote.v1.rs"));
}

/// The type name of a Kafka egress record written by a remote function.
pub const KAFKA_PRODUCER_RECORD_TYPE: &str = "type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord";

/// The content type of requests and responses: StateFun's runtime refuses any other.
pub const CONTENT_TYPE: &str = "application/octet-stream";

/// A `TypedValue` with a value (what a state value or a message argument is on the wire).
pub fn typed_value(typename: &str, value: Bytes) -> reqreply::TypedValue {
    reqreply::TypedValue {
        typename: typename.to_owned(),
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
