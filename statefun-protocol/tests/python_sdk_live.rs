//! Live compatibility with a real StateFun SDK: a function written with the
//! apache-flink-statefun 3.3.0 Python SDK runs as an HTTP server on 127.0.0.1
//! (`tests/python/greeter_server.py`, interpreter from STATEFUN_PYTHON, which `make test`
//! sets up with `scripts/statefun-python`). We POST requests our encoder built and read
//! the answers with our decoder, through the protocol's handshake: the first call gets
//! the missing state specs, the second (states registered, empty) every effect kind,
//! the third (the states it returned) continues from them.

use prost::Message as _;
use statefun_protocol::CONTENT_TYPE;
use statefun_protocol::reqreply::from_function::{self, persisted_value_mutation::MutationType};
use statefun_protocol::reqreply::{self, FromFunction, ToFunction, to_function};
use statefun_sdk::{Address, TypeName, TypedValue};

#[path = "python/server.rs"]
mod python;

/// The greeter's URL.
fn url(server: &python::PythonFunctions) -> String {
    format!("http://127.0.0.1:{}/statefun", server.port)
}

fn post(url: &str, request: &ToFunction) -> FromFunction {
    let mut response = ureq::post(url)
        .header("content-type", CONTENT_TYPE)
        .send(&request.encode_to_vec()[..])
        .expect("the function answers 200");
    assert_eq!(response.body().mime_type(), Some(CONTENT_TYPE));
    let bytes = response.body_mut().read_to_vec().unwrap();
    FromFunction::decode(&bytes[..]).expect("the answer decodes")
}

fn batch(states: Vec<to_function::PersistedValue>, names: &[&str]) -> ToFunction {
    let target = Address::new(TypeName::parse("com.example/greeter").unwrap(), "alice").unwrap();
    let invocations = names
        .iter()
        .map(|n| to_function::Invocation {
            caller: None,
            argument: Some((&TypedValue::of(&n.to_string()).unwrap()).into()),
        })
        .collect();
    ToFunction {
        request: Some(to_function::Request::Invocation(to_function::InvocationBatchRequest {
            target: Some((&target).into()),
            state: states,
            invocations,
        })),
    }
}

fn result(r: FromFunction) -> from_function::InvocationResponse {
    match r.response {
        Some(from_function::Response::InvocationResult(r)) => r,
        other => panic!("expected an invocation result, got {other:?}"),
    }
}

#[test]
fn a_python_sdk_function_goes_through_the_handshake_and_every_effect_with_our_messages() {
    let server = python::start(&[]);
    let url = url(&server);

    // 1. No state: the function names the states it needs.
    let r = post(&url, &batch(Vec::new(), &["alice"]));
    let Some(from_function::Response::IncompleteInvocationContext(missing)) = r.response else {
        panic!("expected the missing states, got {r:?}");
    };
    let specs: Vec<(String, String)> = missing
        .missing_values
        .iter()
        .map(|s| (s.state_name.clone(), s.type_typename.clone()))
        .collect();
    assert_eq!(
        specs,
        vec![
            ("seen_count".to_string(), "io.statefun.types/int".to_string()),
            ("profile".to_string(), "com.example/User".to_string()),
        ]
    );

    // 2. Registered and empty; a batch of two messages on one context.
    let empty = specs
        .iter()
        .map(|(name, _)| to_function::PersistedValue {
            state_name: name.clone(),
            state_value: None,
        })
        .collect();
    let r = result(post(&url, &batch(empty, &["alice", "alice"])));
    let mutations: std::collections::BTreeMap<String, reqreply::TypedValue> = r
        .state_mutations
        .iter()
        .filter(|m| m.mutation_type == MutationType::Modify as i32)
        .map(|m| (m.state_name.clone(), m.state_value.clone().unwrap()))
        .collect();
    let seen = TypedValue::try_from(mutations["seen_count"].clone()).unwrap();
    assert_eq!(seen.decode::<i32>().unwrap(), 2, "two invocations in one batch");
    assert_eq!(r.outgoing_messages.len(), 2);
    assert_eq!(
        r.delayed_invocations.len(),
        4,
        "a send and a cancellation per invocation"
    );
    assert_eq!(r.outgoing_egresses.len(), 2);

    // 3. The states it returned go back; it continues from them.
    let states = mutations
        .into_iter()
        .map(|(name, value)| to_function::PersistedValue {
            state_name: name,
            state_value: Some(value),
        })
        .collect();
    let r = result(post(&url, &batch(states, &["alice"])));
    let seen = r.state_mutations.iter().find(|m| m.state_name == "seen_count").unwrap();
    let seen = TypedValue::try_from(seen.state_value.clone().unwrap()).unwrap();
    assert_eq!(seen.decode::<i32>().unwrap(), 3);
    let greeting = TypedValue::try_from(r.outgoing_messages[0].argument.clone().unwrap()).unwrap();
    assert_eq!(greeting.decode::<String>().unwrap(), "Hello alice #3");
}
