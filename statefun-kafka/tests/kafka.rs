//! Kafka ingress, egress and dead-letter topic against a real Kafka-protocol broker
//! (`make test` starts Apache Kafka, `scripts/kafka`; any Kafka works: set
//! STATEFUN_KAFKA_BOOTSTRAP). Topics and groups get unique names and are created with
//! the admin API, so runs never see each other's data.
//! Proves: records produced by a plain Kafka client reach the functions (key as id,
//! value, headers, timestamp) and every one of them comes out on the egress topic
//! exactly once by record id; with `RecordRouter` the function gets the whole record
//! (key, headers, timestamp, position); bad records (null key) go to the dead-letter topic with
//! headers naming the source topic, partition and offset, while the good ones flow;
//! the consumer group's committed offsets never pass what the runtime holds durably.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use statefun_kafka::{
    EGRESS_ID_HEADER, KafkaDeadLetters, KafkaEgress, KafkaIngress, KafkaIngressConfig, KafkaRecord, RecordRouter,
};
use statefun_runtime::state::{RocksDbBackend, RocksDbOptions};
use statefun_runtime::{KeyRouter, Runtime, RuntimeConfig};
use statefun_sdk::prelude::*;
use tokio_util::sync::CancellationToken;

mod common;
use common::{SEEN, bootstrap, consume, counter_module, create_topics, header, unique};

const COUNTER: TypeName = TypeName::from_static("kafka-test/counter");
const RAW: TypeName = TypeName::from_static("kafka-test/raw");
const OUT: TypeName = TypeName::from_static("kafka-test/out");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_flow_from_an_input_topic_to_the_egress_topic_and_bad_ones_to_the_dead_letter_topic() {
    let (input, output, dlq) = (unique("in"), unique("out"), unique("dlq"));
    create_topics(&[&input, &output, &dlq], 3).await;

    // 120 good records with keys k0..k9, and 3 with no key.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let mut bad_offsets = HashSet::new();
    for i in 0..123u32 {
        let value = format!("v{i}");
        let headers = OwnedHeaders::new().insert(Header {
            key: "origin",
            value: Some("test"),
        });
        let key = format!("k{}", i % 10);
        let record = if i % 41 == 40 {
            FutureRecord::<str, str>::to(&input).payload(&value).headers(headers)
        } else {
            FutureRecord::<str, str>::to(&input)
                .key(&key)
                .payload(&value)
                .headers(headers)
        };
        let delivery = producer
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
        let (partition, offset) = (delivery.partition, delivery.offset);
        if i % 41 == 40 {
            bad_offsets.insert((partition, offset));
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let group = unique("group");
    let egress = KafkaEgress::new(&bootstrap(), &output, &[]).unwrap();
    let dead = KafkaDeadLetters::new(&bootstrap(), &dlq).unwrap();
    let runtime = Runtime::builder()
        .config(RuntimeConfig {
            partitions: 4,
            ..Default::default()
        })
        .module(counter_module(COUNTER, OUT))
        .state_backend(RocksDbBackend::open(dir.path(), RocksDbOptions::default()).unwrap())
        .ingress(
            KafkaIngress::new(
                "orders",
                KafkaIngressConfig::new(bootstrap(), &group, vec![input.clone()]),
            )
            .unwrap(),
            KeyRouter::new(COUNTER, RAW),
        )
        .egress(OUT, egress)
        .dead_letters(dead)
        .build()
        .unwrap();
    let h = runtime.handle();
    let stop = CancellationToken::new();
    let task = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));

    let out = consume(&output, 120).await;
    assert_eq!(out.len(), 120, "every good record came out");
    let mut by_id: BTreeMap<String, String> = BTreeMap::new();
    for m in &out {
        let id = header(m, EGRESS_ID_HEADER).expect("egress records carry their id");
        let value: String = TypedValue::from_bytes(
            <String as ValueType>::TYPE_NAME,
            m.payload().map(|p| p.to_vec()).unwrap_or_default(),
        )
        .decode()
        .unwrap();
        assert!(by_id.insert(id, value).is_none(), "no id twice");
    }
    let values: HashSet<&String> = by_id.values().collect();
    assert_eq!(values.len(), 120, "each record once");
    assert!(
        values.contains(&"k3:v3:1".to_string()),
        "k3's first record, counted once"
    );
    for k in 0..10 {
        let a = Address::new(COUNTER, format!("k{k}")).unwrap();
        assert_eq!(
            h.state(&a, &SEEN).await.unwrap(),
            Some(12),
            "k{k} counted its 12 records"
        );
    }

    let dead_letters = consume(&dlq, 3).await;
    assert_eq!(dead_letters.len(), 3);
    for m in &dead_letters {
        assert_eq!(header(m, "statefun-source-topic").as_deref(), Some(input.as_str()));
        let p: i32 = header(m, "statefun-source-partition").unwrap().parse().unwrap();
        let o: i64 = header(m, "statefun-source-offset").unwrap().parse().unwrap();
        assert!(bad_offsets.contains(&(p, o)), "names the bad record's position");
        assert!(header(m, "statefun-dead-letter-reason").unwrap().contains("no key"));
    }

    // Offsets: committed for the group, never past what the runtime holds.
    stop.cancel();
    task.await.unwrap().unwrap();
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(&input, p);
    }
    let committed = reader.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    let total: i64 = committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => 0,
        })
        .sum();
    assert!(total > 0 && total <= 123, "committed offsets sum to {total}");
}

const META: ValueSpec<String> = ValueSpec::named("meta");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_headers_timestamp_and_position_reach_the_function() {
    let input = unique("meta-in");
    create_topics(&[&input], 1).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let headers = OwnedHeaders::new().insert(Header {
        key: "store",
        value: Some("berlin-7"),
    });
    // A recent timestamp: an old one may fall outside the broker's retention.
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 5_000;
    producer
        .send(
            FutureRecord::<str, str>::to(&input)
                .key("basket-1")
                .payload("scan")
                .timestamp(ts)
                .headers(headers),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    let module = Module::builder()
        .with_fn(FunctionSpec::new(COUNTER).with_state(META), |ctx, msg| {
            let r: KafkaRecord = msg.decode()?;
            let store = r.header("store").map(|v| String::from_utf8_lossy(v).into_owned());
            let meta = format!(
                "{}|{:?}|{:?}|{}|{}|{}",
                ctx.self_address().id(),
                store,
                r.timestamp_ms,
                r.partition,
                r.offset,
                String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
            );
            ctx.storage().set(&META, &meta)?;
            Ok(())
        })
        .build()
        .unwrap();
    let dead = statefun_runtime::CollectingDeadLetters::new();
    let runtime = Runtime::builder()
        .module(module)
        .dead_letters(dead.clone())
        .ingress(
            KafkaIngress::new(
                "meta",
                KafkaIngressConfig::new(bootstrap(), unique("g"), vec![input.clone()]),
            )
            .unwrap(),
            RecordRouter::new(COUNTER),
        )
        .build()
        .unwrap();
    let h = runtime.handle();
    let stop = CancellationToken::new();
    let task = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    let a = Address::new(COUNTER, "basket-1").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let meta = loop {
        if let Some(m) = h.state(&a, &META).await.unwrap() {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the record never arrived; dead letters: {:?}",
            dead.letters()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(meta, format!("basket-1|Some(\"berlin-7\")|Some({ts})|0|0|scan"));
    stop.cancel();
    task.await.unwrap().unwrap();
}
