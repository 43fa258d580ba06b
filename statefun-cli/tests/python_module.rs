//! A StateFun application moved as it is: a function written with StateFun's Python
//! SDK (apache-flink-statefun 3.3.0, served over HTTP on 127.0.0.1), a StateFun
//! `module.yaml` (an HTTP endpoint for `com.example/*`, a Kafka ingress and an
//! exactly-once Kafka egress) plus our runtime document, run by `statefun run` as a
//! separate process against the test broker. Records produced with a plain Kafka client
//! come out as the Python function's Kafka egress records, each exactly once for a
//! read_committed consumer; SIGTERM stops the instance cleanly.
//!
//! Needs STATEFUN_KAFKA_BOOTSTRAP and STATEFUN_PYTHON (`make test` sets both).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use statefun_sdk::ValueType;

#[path = "../../statefun-protocol/tests/python/server.rs"]
mod python;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the suite with `make test`"))
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

async fn read_committed(topic: &str, n: usize, bootstrap: &str) -> Vec<(String, String)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => out.push((
                String::from_utf8(m.key().unwrap_or_default().to_vec()).unwrap(),
                String::from_utf8(m.payload().unwrap_or_default().to_vec()).unwrap(),
            )),
            Ok(Err(e)) => panic!("consumer error: {e}"),
            Err(_) => break,
        }
    }
    // Anything more would be a duplicate: wait a little for it.
    if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
        panic!("an extra record arrived: {:?}", m.key().map(String::from_utf8_lossy));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefun_python_application_runs_from_its_module_yaml_with_exactly_once_egress() {
    let bootstrap = env("STATEFUN_KAFKA_BOOTSTRAP");
    let (names, greetings, app) = (unique("names"), unique("greetings"), unique("greeter-app"));
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let topics = [
        NewTopic::new(&names, 2, TopicReplication::Fixed(1)),
        NewTopic::new(&greetings, 1, TopicReplication::Fixed(1)),
    ];
    for r in admin.create_topics(&topics, &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
    // The ingress's valueType is StateFun's string type: the record values are its
    // encoding, as a StateFun producer writes them.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for name in ["alice", "bob", "alice"] {
        let value = name.to_string().encode().unwrap();
        producer
            .send(
                FutureRecord::to(&names).key(name).payload(&value[..]),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    let functions = python::start(&[("GREETINGS_TOPIC", &greetings)]);
    let port = functions.port;
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("module.yaml");
    std::fs::write(
        &module,
        format!(
            "\
kind: io.statefun.endpoints.v2/http
spec:
  functions: com.example/*
  urlPathTemplate: http://127.0.0.1:{port}/statefun
  transport:
    call: 10s
---
kind: io.statefun.kafka.v1/ingress
spec:
  id: com.example/names
  address: {bootstrap}
  consumerGroupId: {app}
  startupPosition:
    type: earliest
  topics:
    - topic: {names}
      valueType: io.statefun.types/string
      targets:
        - com.example/greeter
---
kind: io.statefun.kafka.v1/egress
spec:
  id: com.example/out
  address: {bootstrap}
  deliverySemantic:
    type: exactly-once
    transactionTimeout: 15min
---
kind: io.statefun-rs.v1/runtime
spec:
  partitions: 2
  commitInterval: 50ms
  egressTopics:
    com.example/out: [{greetings}]
"
        ),
    )
    .unwrap();

    let check = Command::new(env!("CARGO_BIN_EXE_statefun"))
        .arg("check")
        .arg(&module)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stdout).contains("remote functions: com.example/*"));

    let instance = Killed(
        Command::new(env!("CARGO_BIN_EXE_statefun"))
            .arg("run")
            .arg(&module)
            .args(["--instance-id", "a", "--state-dir"])
            .arg(dir.path().join("state"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let records = read_committed(&greetings, 3, &bootstrap).await;
    let mut counts = BTreeMap::new();
    for r in records {
        *counts.entry(r).or_insert(0) += 1;
    }
    let expected = BTreeMap::from([
        (("alice".to_string(), "hi alice".to_string()), 2),
        (("bob".to_string(), "hi bob".to_string()), 1),
    ]);
    assert_eq!(counts, expected);

    // SIGTERM: the instance finishes its commit and exits 0.
    let mut instance = instance;
    let pid = instance.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = instance.0.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn check_refuses_a_bad_module_naming_the_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("module.yaml");
    std::fs::write(
        &module,
        "kind: io.statefun.endpoints.v2/http\nspec:\n  functions: a/b\n  urlPathTemplate: http://x/\n  maxNumBatchRequest: 5\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_statefun"))
        .arg("check")
        .arg(&module)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("module.yaml line 5: spec: unknown field `maxNumBatchRequest`"),
        "{err}"
    );
}
