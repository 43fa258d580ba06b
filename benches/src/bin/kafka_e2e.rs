//! `kafka-e2e`: end-to-end throughput and egress visibility latency of Kafka mode, next
//! to a raw librdkafka produce -> consume pipe on the same broker, in the same run.
//!
//! Run: `STATEFUN_KAFKA_BOOTSTRAP=127.0.0.1:39092 cargo run --release -p statefun-benches
//! --bin kafka-e2e` (with `scripts/broker start`), or `make bench-kafka`.
//!
//! Each pipeline gets a burst of `RECORDS` (throughput: records / time from the first
//! produce to the last record visible to a read_committed consumer), then `PACED`
//! records at `RATE`/s (latency: produce time, carried in the payload, to visibility).
//! Kafka mode: ingress topic -> KafkaIngress -> a function that counts per key (state
//! read-modify-write) and writes the record to an egress -> one Kafka transaction per
//! commit interval (changelog + egress) -> egress topic. Intervals: 50, 100, 500 ms.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use statefun_kafka::{KafkaChangelog, KafkaChangelogConfig, KafkaIngress, KafkaIngressConfig};
use statefun_runtime::state::{ChangelogBackend, RocksDbBackend};
use statefun_runtime::{KeyRouter, Runtime, RuntimeConfig};
use statefun_sdk::prelude::*;
use tokio_util::sync::CancellationToken;

const FUNCTION: TypeName = TypeName::from_static("bench/echo");
const OUT: TypeName = TypeName::from_static("bench/out");
const COUNT: ValueSpec<i64> = ValueSpec::named("count");
const PARTITIONS: u32 = 4;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), now_us())
}

async fn create_topics(bootstrap: &str, names: &[&str]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, PARTITIONS as i32, TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .expect("create topics")
    {
        r.expect("topic created");
    }
}

/// Produces `n` records (payload: produce time in µs, padded to 64 bytes), at `rate`
/// per second if given, else as fast as the producer takes them.
async fn produce(producer: &FutureProducer, topic: &str, n: u64, rate: Option<u64>) {
    let start = tokio::time::Instant::now();
    let mut pending = Vec::with_capacity(1024);
    for i in 0..n {
        if let Some(rate) = rate {
            tokio::time::sleep_until(start + Duration::from_micros(i * 1_000_000 / rate)).await;
        }
        let mut payload = now_us().to_be_bytes().to_vec();
        payload.resize(64, b'.');
        let key = format!("k{}", i % 1000);
        let record = FutureRecord::to(topic).key(&key).payload(&payload);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).expect("enqueue"));
        if pending.len() >= 1024 {
            for d in pending.drain(..) {
                d.await.expect("delivery").map_err(|(e, _)| e).expect("delivered");
            }
        }
    }
    for d in pending {
        d.await.expect("delivery").map_err(|(e, _)| e).expect("delivered");
    }
}

/// Reads `n` more records; returns their visibility latencies (µs) and the time the
/// last one arrived.
async fn consume(consumer: &StreamConsumer, n: u64) -> (Vec<u64>, u64) {
    let mut latencies = Vec::with_capacity(n as usize);
    let mut last = 0;
    while (latencies.len() as u64) < n {
        let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .expect("records within 60 s")
            .expect("consumer");
        let seen = now_us();
        let sent = m
            .payload()
            .and_then(|p| p.get(..8))
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            .expect("timestamped payload");
        latencies.push(seen.saturating_sub(sent));
        last = seen;
    }
    (latencies, last)
}

fn reader(bootstrap: &str, topic: &str) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("e2e-reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    c
}

struct Result {
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q) as usize] as f64 / 1000.0
}

/// Burst then paced through `input`, read from `output`.
async fn measure(bootstrap: &str, input: &str, output: &str, records: u64, paced: u64, rate: u64) -> Result {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let consumer = reader(bootstrap, output);
    let start = now_us();
    let (_, last) = tokio::join!(produce(&producer, input, records, None), consume(&consumer, records)).1;
    let throughput = records as f64 / ((last - start) as f64 / 1e6);
    let (mut latencies, _) = tokio::join!(produce(&producer, input, paced, Some(rate)), consume(&consumer, paced)).1;
    latencies.sort_unstable();
    Result {
        throughput,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
    }
}

fn module() -> Module {
    Module::builder()
        .with_fn(FunctionSpec::new(FUNCTION).with_state(COUNT), |ctx, msg| {
            let n = ctx.storage().get(&COUNT)?.unwrap_or(0) + 1;
            ctx.storage().set(&COUNT, &n)?;
            ctx.send_egress_message(OUT, msg);
            Ok(())
        })
        .build()
        .expect("module")
}

async fn kafka_mode(bootstrap: &str, interval_ms: u64, records: u64, paced: u64, rate: u64) -> Result {
    let (input, output) = (unique("e2e-in"), unique("e2e-out"));
    create_topics(bootstrap, &[&input, &output]).await;
    let changelog = KafkaChangelog::connect(
        KafkaChangelogConfig::new(bootstrap, unique("e2e-changelog"), PARTITIONS, unique("e2e-instance"))
            .egress(OUT, &output),
    )
    .await
    .expect("changelog");
    let dir = tempfile::tempdir().expect("temp dir");
    let rocks = RocksDbBackend::open(dir.path(), Default::default()).expect("rocksdb");
    let (backend, _) = ChangelogBackend::open(
        rocks,
        Arc::new(changelog),
        PARTITIONS,
        Duration::from_millis(interval_ms),
    )
    .expect("backend");
    let ingress = KafkaIngress::new(
        "in",
        KafkaIngressConfig::new(bootstrap, unique("e2e-group"), vec![input.clone()]),
    )
    .expect("ingress");
    let runtime = Runtime::builder()
        .config(RuntimeConfig {
            partitions: PARTITIONS,
            ..Default::default()
        })
        .module(module())
        .state_backend(backend)
        .ingress(ingress, KeyRouter::new(FUNCTION, TypeName::from_static("bench/bytes")))
        .build()
        .expect("runtime");
    let stop = CancellationToken::new();
    let run = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    let result = measure(bootstrap, &input, &output, records, paced, rate).await;
    stop.cancel();
    run.await.expect("run task").expect("run");
    result
}

fn main() {
    let bootstrap = std::env::var("STATEFUN_KAFKA_BOOTSTRAP")
        .expect("set STATEFUN_KAFKA_BOOTSTRAP (scripts/broker start prints the address)");
    let records = env_or("E2E_RECORDS", 50_000);
    let paced = env_or("E2E_PACED", 10_000);
    let rate = env_or("E2E_RATE", 5_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    rt.block_on(async {
        println!("{records} records burst, then {paced} at {rate}/s; broker {bootstrap}");
        let raw_topic = unique("e2e-raw");
        create_topics(&bootstrap, &[&raw_topic]).await;
        let raw = measure(&bootstrap, &raw_topic, &raw_topic, records, paced, rate).await;
        println!(
            "| raw produce -> consume | {:.0}/s | 1.00 | {:.1} ms | {:.1} ms |",
            raw.throughput, raw.p50_ms, raw.p99_ms
        );
        for interval in [50, 100, 500] {
            let r = kafka_mode(&bootstrap, interval, records, paced, rate).await;
            println!(
                "| Kafka mode, commit every {interval} ms | {:.0}/s | {:.2} | {:.1} ms | {:.1} ms |",
                r.throughput,
                r.throughput / raw.throughput,
                r.p50_ms,
                r.p99_ms
            );
        }
    });
}
