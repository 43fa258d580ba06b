//! Helpers shared by the Kafka integration tests: the broker address, unique names,
//! topic creation and a read_committed reader.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use statefun_sdk::prelude::*;

/// The state of [`counter_module`]'s function.
pub(crate) const SEEN: ValueSpec<i64> = ValueSpec::named("seen");

/// `function` counts messages per id and reports each on egress `out` as
/// "<id>:<value>:<count>".
pub(crate) fn counter_module(function: TypeName, out: TypeName) -> Module {
    Module::builder()
        .with_fn(FunctionSpec::new(function).with_state(SEEN), move |ctx, msg| {
            let n = ctx.storage().get(&SEEN)?.unwrap_or(0) + 1;
            ctx.storage().set(&SEEN, &n)?;
            let value = String::from_utf8_lossy(msg.bytes().map(|b| b.as_ref()).unwrap_or_default()).into_owned();
            ctx.send_egress(out.clone(), &format!("{}:{value}:{n}", ctx.self_address().id()))?;
            Ok(())
        })
        .build()
        .unwrap()
}

pub(crate) fn bootstrap() -> String {
    std::env::var("STATEFUN_KAFKA_BOOTSTRAP").expect(
        "STATEFUN_KAFKA_BOOTSTRAP is not set: run the suite with `make test` (it starts a broker), \
         or point it at a Kafka broker",
    )
}

pub(crate) fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

pub(crate) async fn create_topics(names: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    for r in admin.create_topics(&topics, &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
}

/// Reads `topic` with read_committed until `n` records arrived (or a timeout).
pub(crate) async fn consume(topic: &str, n: usize) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => panic!("consumer error: {e}"),
            Err(_) => break,
        }
    }
    out
}

pub(crate) fn header(m: &rdkafka::message::OwnedMessage, key: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
