//! Byte-exact compatibility with a real StateFun SDK: the requests below are what the
//! Python SDK's own generated classes encode, and the responses what its
//! `RequestReplyHandler` answered (apache-flink-statefun 3.3.0 from PyPI, protobuf
//! 3.20.3, run on this machine; the function and the script are in docs/protocol.md,
//! "Compatibility evidence"). Our encoder must produce the same request bytes, and our
//! decoder must read every effect of the responses; re-encoding a response gives the
//! same bytes back.

use prost::Message as _;
use statefun_protocol::egress::KafkaProducerRecord;
use statefun_protocol::reqreply::from_function::{
    self, expiration_spec::ExpireMode, persisted_value_mutation::MutationType,
};
use statefun_protocol::reqreply::{FromFunction, ToFunction, to_function};
use statefun_protocol::typed_value;
use statefun_sdk::{Address, TypeName, TypedValue, ValueType};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Call 1 of the probe: a batch of one message, no state registered yet.
const REQUEST_1: &str = "a206660a1d0a0b636f6d2e6578616d706c651207677265657465721a05616c6963651a450a1c0a0b636f6d2e6578616d706c65120a696e67726573732d666e1a017812250a18696f2e737461746566756e2e74797065732f737472696e6710011a070a05616c696365";
/// The SDK's answer: the two states it needs.
const RESPONSE_1: &str = "aa064c0a250a0a7365656e5f636f756e7412001a15696f2e737461746566756e2e74797065732f696e740a230a0770726f66696c651206080110e0a7121a10636f6d2e6578616d706c652f55736572";
/// Call 2: the same batch with both states registered and empty.
const REQUEST_2: &str = "a2067f0a1d0a0b636f6d2e6578616d706c651207677265657465721a05616c696365120c0a0a7365656e5f636f756e7412090a0770726f66696c651a450a1c0a0b636f6d2e6578616d706c65120a696e67726573732d666e1a017812250a18696f2e737461746566756e2e74797065732f737472696e6710011a070a05616c696365";
/// The SDK's answer: every effect kind.
const RESPONSE_2: &str = "a20692030a300801120a7365656e5f636f756e741a200a15696f2e737461746566756e2e74797065732f696e7410011a050d010000000a3f0801120770726f66696c651a320a10636f6d2e6578616d706c652f5573657210011a1c7b226e616d65223a2022616c696365222c20227365656e223a20317d124f0a1d0a0b636f6d2e6578616d706c6512077072696e7465721a05616c696365122e0a18696f2e737461746566756e2e74797065732f737472696e6710011a100a0e48656c6c6f20616c6963652023311a4b08d00f121d0a0b636f6d2e6578616d706c651207677265657465721a05616c6963651a200a15696f2e737461746566756e2e74797065732f696e7410011a050d070000005a05746f6b2d311a0950015a05746f6b2d3122740a0b636f6d2e6578616d706c6512036f75741a600a3e747970652e676f6f676c65617069732e636f6d2f696f2e737461746566756e2e73646b2e6567726573732e4b61666b6150726f64756365725265636f726410011a1c0a05616c6963651208686920616c6963651a096772656574696e6773";

fn address(t: &str, id: &str) -> Address {
    Address::new(TypeName::parse(t).unwrap(), id).unwrap()
}

fn request(states: &[&str]) -> ToFunction {
    let argument = TypedValue::of(&"alice".to_string()).unwrap();
    let batch = to_function::InvocationBatchRequest {
        target: Some((&address("com.example/greeter", "alice")).into()),
        state: states
            .iter()
            .map(|name| to_function::PersistedValue {
                state_name: (*name).to_owned(),
                state_value: None, // registered, no value yet
            })
            .collect(),
        invocations: vec![to_function::Invocation {
            caller: Some((&address("com.example/ingress-fn", "x")).into()),
            argument: Some((&argument).into()),
        }],
    };
    ToFunction {
        request: Some(to_function::Request::Invocation(batch)),
    }
}

#[test]
fn our_requests_are_byte_identical_to_the_python_sdks() {
    assert_eq!(request(&[]).encode_to_vec(), hex(REQUEST_1));
    assert_eq!(request(&["seen_count", "profile"]).encode_to_vec(), hex(REQUEST_2));
    assert_eq!(
        ToFunction::decode(&hex(REQUEST_2)[..]).unwrap(),
        request(&["seen_count", "profile"])
    );
}

#[test]
fn the_missing_state_specs_of_an_incomplete_context_are_read_with_their_expiry_and_type() {
    let bytes = hex(RESPONSE_1);
    let response = FromFunction::decode(&bytes[..]).unwrap();
    let Some(from_function::Response::IncompleteInvocationContext(missing)) = &response.response else {
        panic!("expected an incomplete invocation context, got {response:?}");
    };
    let specs: Vec<(&str, i32, i64, &str)> = missing
        .missing_values
        .iter()
        .map(|s| {
            let e = s.expiration_spec.unwrap_or_default();
            (
                s.state_name.as_str(),
                e.mode,
                e.expire_after_millis,
                s.type_typename.as_str(),
            )
        })
        .collect();
    assert_eq!(
        specs,
        vec![
            ("seen_count", ExpireMode::None as i32, 0, "io.statefun.types/int"),
            ("profile", ExpireMode::AfterWrite as i32, 300_000, "com.example/User"),
        ]
    );
    assert_eq!(response.encode_to_vec(), bytes, "re-encoding gives the SDK's bytes");
}

#[test]
fn every_effect_kind_of_an_invocation_result_is_read() {
    let bytes = hex(RESPONSE_2);
    let response = FromFunction::decode(&bytes[..]).unwrap();
    assert_eq!(response.encode_to_vec(), bytes, "re-encoding gives the SDK's bytes");
    let Some(from_function::Response::InvocationResult(r)) = response.response else {
        panic!("expected an invocation result");
    };

    let m = &r.state_mutations;
    assert_eq!(
        (m[0].mutation_type, m[0].state_name.as_str()),
        (MutationType::Modify as i32, "seen_count")
    );
    let seen = TypedValue::try_from(m[0].state_value.clone().unwrap()).unwrap();
    assert_eq!(
        seen.decode::<i32>().unwrap(),
        1,
        "io.statefun.types/int through the SDK's codec"
    );
    let profile = m[1].state_value.clone().unwrap();
    assert_eq!(
        (profile.typename.as_str(), &profile.value[..]),
        ("com.example/User", &br#"{"name": "alice", "seen": 1}"#[..])
    );

    let out = &r.outgoing_messages[0];
    assert_eq!(
        Address::try_from(out.target.as_ref().unwrap()).unwrap(),
        address("com.example/printer", "alice")
    );
    let greeting = TypedValue::try_from(out.argument.clone().unwrap()).unwrap();
    assert_eq!(greeting.decode::<String>().unwrap(), "Hello alice #1");

    let (send, cancel) = (&r.delayed_invocations[0], &r.delayed_invocations[1]);
    assert_eq!(
        (
            send.is_cancellation_request,
            send.delay_in_ms,
            send.cancellation_token.as_str()
        ),
        (false, 2000, "tok-1")
    );
    let seven = TypedValue::try_from(send.argument.clone().unwrap()).unwrap();
    assert_eq!(seven.decode::<i32>().unwrap(), 7);
    assert_eq!(
        (cancel.is_cancellation_request, cancel.cancellation_token.as_str()),
        (true, "tok-1")
    );

    let egress = &r.outgoing_egresses[0];
    assert_eq!(
        (egress.egress_namespace.as_str(), egress.egress_type.as_str()),
        ("com.example", "out")
    );
    let record = TypedValue::try_from(egress.argument.clone().unwrap()).unwrap();
    assert_eq!(record.type_name(), &KafkaProducerRecord::TYPE_NAME);
    let record: KafkaProducerRecord = record.decode().unwrap();
    assert_eq!(
        (record.key.as_str(), &record.value_bytes[..], record.topic.as_str()),
        ("alice", &b"hi alice"[..], "greetings")
    );
}

#[test]
fn state_values_go_out_as_the_sdk_sends_them() {
    // Call 3 of the probe sent seen_count = 1 as this PersistedValue.
    let value = to_function::PersistedValue {
        state_name: "seen_count".into(),
        state_value: Some(typed_value(
            "io.statefun.types/int",
            <i32 as ValueType>::encode(&1).unwrap(),
        )),
    };
    let expected = hex("0a0a7365656e5f636f756e7412200a15696f2e737461746566756e2e74797065732f696e7410011a050d01000000");
    assert_eq!(value.encode_to_vec(), expected);
}
