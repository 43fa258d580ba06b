//! A function written with StateFun's Python SDK (apache-flink-statefun 3.3.0, from
//! PyPI; `make test` installs it with `scripts/statefun-python` and sets
//! STATEFUN_PYTHON) served over HTTP on 127.0.0.1, driven by our runtime unchanged: the
//! runtime learns its states from the handshake (an int and a JSON value expiring 5 min
//! after write), ships them with every batch, routes its messages to an embedded
//! function, hands its Kafka egress records to the egress, and honours its cancellation
//! of a delayed message.

mod common;

use std::sync::Arc;
use std::time::Duration;

use statefun_remote::{HttpTransport, RemoteOptions};
use statefun_sdk::prelude::*;
use statefun_sdk::protocol::egress::KafkaProducerRecord;

const GREETER: TypeName = TypeName::from_static("com.example/greeter");
const PRINTER: TypeName = TypeName::from_static("com.example/printer");
const OUT: TypeName = TypeName::from_static("com.example/out");
const PRINTED: ValueSpec<String> = ValueSpec::named("printed");

#[path = "../../statefun-protocol/tests/python/server.rs"]
mod python;

fn printer(ctx: &mut Context, msg: Message) -> FunctionResult {
    let text: String = msg.decode()?;
    ctx.storage().set(&PRINTED, &text)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_sdk_function_runs_unchanged_against_the_runtime() {
    let server = python::start(&[]);
    let port = server.port;
    // A short call timeout, so that a failing function shows up as parked quickly.
    let http = HttpTransport::new(RemoteOptions {
        call_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .unwrap();
    let greeter: Arc<dyn StatefulFunction> =
        Arc::new(http.function(&format!("http://127.0.0.1:{port}/statefun")).unwrap());
    let r = common::start_with(vec![(GREETER, greeter)], OUT, 3, |m| {
        m.with_fn(FunctionSpec::new(PRINTER).with_state(PRINTED), printer)
    });
    let h = &r.handle;
    let at = |t: TypeName, id: &str| Address::new(t, id).unwrap();
    for name in ["alice", "bob", "alice"] {
        h.send_value(at(GREETER, name), &name.to_string()).await.unwrap();
    }
    h.wait_idle().await;

    // The states the Python function declared, as it wrote them.
    let seen = h.state_raw(&at(GREETER, "alice"), "seen_count").await.unwrap().unwrap();
    assert_eq!(<i32 as ValueType>::decode(&seen).unwrap(), 2);
    let profile = h.state_raw(&at(GREETER, "alice"), "profile").await.unwrap().unwrap();
    let profile: serde_json::Value = serde_json::from_slice(&profile).unwrap();
    assert_eq!(profile, serde_json::json!({"name": "alice", "seen": 2}));
    let bob = h.state_raw(&at(GREETER, "bob"), "seen_count").await.unwrap().unwrap();
    assert_eq!(<i32 as ValueType>::decode(&bob).unwrap(), 1);
    // Its messages reached the embedded printer, with the Python SDK's string type.
    assert_eq!(
        h.state(&at(PRINTER, "alice"), &PRINTED).await.unwrap().as_deref(),
        Some("Hello alice #2")
    );
    assert_eq!(
        h.state(&at(PRINTER, "bob"), &PRINTED).await.unwrap().as_deref(),
        Some("Hello bob #1")
    );
    // Its Kafka egress records, one per message.
    let mut records: Vec<(String, String, String)> = r
        .egress
        .records()
        .iter()
        .map(|e| {
            let k: KafkaProducerRecord = e.message.decode().unwrap();
            (k.topic, k.key, String::from_utf8(k.value_bytes.to_vec()).unwrap())
        })
        .collect();
    records.sort();
    let expected = |n: &str| ("greetings".to_string(), n.to_string(), format!("hi {n}"));
    assert_eq!(records, [expected("alice"), expected("alice"), expected("bob")]);

    // Each invocation scheduled an int to itself in 2 s and cancelled it at once: had
    // the cancellation been lost, the greeter would get an int where it reads a string
    // and fail.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    h.wait_idle().await;
    assert!(h.parked().await.unwrap().is_empty());
    assert!(r.dead.letters().is_empty());
    let report = r.stop().await;
    assert_eq!(report.partitions.iter().map(|p| p.failures).sum::<u64>(), 0);
    assert!(report.invocations() >= 6, "3 greetings, 3 prints");
}
