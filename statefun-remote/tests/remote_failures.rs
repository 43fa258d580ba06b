//! Remote functions that fail, against a real HTTP server on 127.0.0.1 (port 0) whose
//! behaviour depends on the target id: one never answers (timeout, retried, then the
//! address is parked and its message dead-lettered), one answers 503 twice and then
//! properly (retried by the transport, no failure reaches the runtime), one answers
//! bytes that are not a `FromFunction`, one streams an answer above the size limit
//! (without a `Content-Length`), one changes a state it never registered, and a
//! second function type points at a closed port (connection refused). Meanwhile other
//! addresses and types keep flowing; nothing panics.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::start;
use prost::Message as _;
use statefun_remote::{HttpTransport, RemoteOptions};
use statefun_runtime::DeadLetterReason;
use statefun_runtime::testkit::eventually;
use statefun_sdk::StatefulFunction;
use statefun_sdk::prelude::*;
use statefun_sdk::protocol::reqreply::{FromFunction, ToFunction, from_function, to_function};
use statefun_sdk::protocol::{CONTENT_TYPE, serve_request};

const F: TypeName = TypeName::from_static("test/remote");
const ELSEWHERE: TypeName = TypeName::from_static("test/elsewhere");
const OUT: TypeName = TypeName::from_static("test/out");
const COUNT: ValueSpec<i64> = ValueSpec::named("count");

fn count(ctx: &mut Context, _msg: Message) -> FunctionResult {
    let n = ctx.storage().get(&COUNT)?.unwrap_or(0) + 1;
    ctx.storage().set(&COUNT, &n)?;
    Ok(())
}

#[derive(Clone)]
struct Behaviour {
    module: Arc<Module>,
    /// Requests seen per target id.
    seen: Arc<Mutex<HashMap<String, u32>>>,
}

fn octets(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], bytes).into_response()
}

async fn function(axum::extract::State(b): axum::extract::State<Behaviour>, body: Bytes) -> Response {
    let request = ToFunction::decode(body).unwrap();
    let Some(to_function::Request::Invocation(batch)) = &request.request else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let id = batch.target.as_ref().unwrap().id.clone();
    let n = {
        let mut seen = b.seen.lock().unwrap();
        let n = seen.entry(id.clone()).or_default();
        *n += 1;
        *n
    };
    match id.as_str() {
        "silent" => std::future::pending().await,
        "flaky" if n <= 2 => (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response(),
        "garbage" => octets(vec![0xff, 0xff, 0xff]),
        // Larger than the transport's limit, streamed without a Content-Length.
        "huge" => {
            let chunks = (0..64).map(|_| Ok::<_, std::convert::Infallible>(Bytes::from(vec![0u8; 1024])));
            let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
            ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
        }
        "rogue" => octets(
            FromFunction {
                response: Some(from_function::Response::InvocationResult(
                    from_function::InvocationResponse {
                        state_mutations: vec![from_function::PersistedValueMutation {
                            mutation_type: from_function::persisted_value_mutation::MutationType::Modify as i32,
                            state_name: "never_registered".into(),
                            state_value: Some(statefun_protocol::typed_value("io.statefun.types/long", Bytes::new())),
                        }],
                        ..Default::default()
                    },
                )),
            }
            .encode_to_vec(),
        ),
        _ => octets(serve_request(&b.module, request).await.unwrap().encode_to_vec()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_remote_calls_park_only_their_address_and_dead_letter_its_message_with_the_error() {
    let behaviour = Behaviour {
        module: Arc::new(
            Module::builder()
                .with_fn(FunctionSpec::new(F).with_state(COUNT), count)
                .build()
                .unwrap(),
        ),
        seen: Arc::default(),
    };
    let app = axum::Router::new()
        .fallback(axum::routing::post(function))
        .with_state(behaviour.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    // A port nothing listens on: bound, then closed.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);

    let http = HttpTransport::new(RemoteOptions {
        call_timeout: Duration::from_millis(400),
        initial_backoff: Duration::from_millis(5),
        max_response_bytes: 16 * 1024,
        ..Default::default()
    })
    .unwrap();
    let remote: Arc<dyn StatefulFunction> = Arc::new(http.function(&format!("http://127.0.0.1:{port}/f")).unwrap());
    let elsewhere: Arc<dyn StatefulFunction> =
        Arc::new(http.function(&format!("http://127.0.0.1:{closed_port}/f")).unwrap());
    let r = start(vec![(F, remote), (ELSEWHERE, elsewhere)], OUT, 2);
    let h = &r.handle;
    let at = |id: &str| Address::new(F, id).unwrap();

    for id in ["silent", "garbage", "rogue", "flaky", "huge"] {
        h.send_value(at(id), &1i64).await.unwrap();
    }
    h.send_value(Address::new(ELSEWHERE, "x").unwrap(), &1i64)
        .await
        .unwrap();
    // While "silent" hangs, other addresses of the same type are served.
    h.send_value(at("ok"), &1i64).await.unwrap();
    eventually("ok is served while silent hangs", || async {
        h.state_raw(&at("ok"), "count").await.ok().flatten().is_some()
    })
    .await;
    assert!(h.parked().await.unwrap().iter().all(|(a, _)| a != &at("silent")));
    h.wait_idle().await;

    let parked: HashMap<String, String> = h
        .parked()
        .await
        .unwrap()
        .into_iter()
        .map(|(a, e)| (a.to_string(), e))
        .collect();
    let expect = [
        ("test/remote/silent", "no answer within the call timeout of 400 ms"),
        ("test/remote/garbage", "the answer is not a FromFunction"),
        (
            "test/remote/rogue",
            r#"state_mutations[0]: state "never_registered" is not declared"#,
        ),
        ("test/elsewhere/x", "error sending request"),
        ("test/remote/huge", "the answer is larger than 16384 bytes"),
    ];
    for (address, error) in expect {
        let got = parked
            .get(address)
            .unwrap_or_else(|| panic!("{address} is not parked: {parked:?}"));
        assert!(got.contains(error), "{address}: {got:?} should contain {error:?}");
    }
    assert_eq!(parked.len(), 5, "{parked:?}");
    // Each parked address's message is in the dead-letter sink with the error.
    let dead = r.dead.letters();
    assert_eq!(dead.len(), 5);
    for d in &dead {
        let target = d.target.as_ref().unwrap().to_string();
        let DeadLetterReason::FunctionFailed { error, attempts } = &d.reason else {
            panic!("{target}: {:?}", d.reason);
        };
        assert_eq!(*attempts, 2, "{target}: the runtime's attempts");
        assert_eq!(error, &parked[&target]);
        assert_eq!(d.message.as_ref().unwrap().decode::<i64>().unwrap(), 1);
    }
    // The transport retried the timeouts and the 503s; it did not retry the garbage.
    let seen = behaviour.seen.lock().unwrap().clone();
    assert_eq!(seen["garbage"], 2, "one request per runtime attempt");
    assert_eq!(seen["flaky"], 2 + 2, "two 503s, then the handshake and the batch");
    assert_eq!(
        h.state_raw(&at("flaky"), "count")
            .await
            .unwrap()
            .map(|b| <i64 as ValueType>::decode(&b).unwrap()),
        Some(1)
    );
    // The error text names the attempts and the URL.
    assert!(parked["test/remote/silent"].contains(&format!("http://127.0.0.1:{port}/f")));

    // Two failed attempts for each parked address, none for the others.
    let report = r.stop().await;
    assert_eq!(report.partitions.iter().map(|p| p.failures).sum::<u64>(), 10);
}
