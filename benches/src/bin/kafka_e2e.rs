//! `kafka-e2e`: end-to-end throughput and egress visibility latency of Kafka mode, next
//! to raw librdkafka baselines on the same broker, in the same run.
//!
//! Run: `STATEFUN_KAFKA_BOOTSTRAP=127.0.0.1:19092 cargo run --release -p statefun-benches
//! --bin kafka-e2e` (with `scripts/kafka start`), or `make bench-kafka`, which starts
//! its own Apache Kafka with the JVM's default JIT.
//!
//! Each pipeline gets a warm-up of 1000 records (not measured: group joins, the first
//! commit), a burst of `E2E_RECORDS` (burst throughput: records / time from the first
//! produce to the last record visible to a read_committed consumer; sustained: the rate
//! between the 10th and the 90th percentile record becoming visible, which leaves out
//! the wait for the last commit), then `E2E_PACED` records at `E2E_RATE`/s (latency:
//! produce time, carried in the payload, to visibility). Pipelines:
//! * raw produce -> consume: one topic (measured after an unmeasured warm-up of the
//!   broker's JVM, `E2E_BROKER_WARMUP` raw passes (3) and one relay pass, and once more
//!   at the end to show the drift);
//! * runtime at-least-once: ingress topic -> `KafkaIngress` -> a function that counts
//!   per key (state read-modify-write, 1000 keys) and writes the record to an egress ->
//!   `KafkaEgress` (in-memory state, no transactions);
//! * per commit interval (`E2E_INTERVALS`, default 50, 100, 500 ms): a raw exactly-once
//!   relay (librdkafka's consume-transform-produce loop with transactions, no runtime),
//!   and Kafka mode: the same function, with one Kafka transaction per interval
//!   (changelog + egress + progress).
//!
//! Each pipeline's topics are deleted after it, so that every pipeline starts on a
//! broker holding the same data.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use statefun_kafka::{KafkaChangelog, KafkaChangelogConfig, KafkaEgress, KafkaIngress, KafkaIngressConfig};
use statefun_runtime::state::{ChangelogBackend, RocksDbBackend};
use statefun_runtime::{KeyRouter, Runtime, RuntimeBuilder, RuntimeConfig};
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

fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client")
}

async fn create_topics(bootstrap: &str, names: &[&str]) {
    let admin = admin(bootstrap);
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

/// Deletes a measured pipeline's topics, so that the next pipeline starts on a broker
/// holding as much data as this one did (the earlier stand-in broker re-saved all its
/// data every few seconds, which slowed each pipeline more than the one before).
async fn delete_topics(bootstrap: &str, names: &[&str]) {
    for r in admin(bootstrap)
        .delete_topics(names, &AdminOptions::new())
        .await
        .expect("delete topics")
    {
        r.expect("topic deleted");
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

/// Reads `n` more records; returns their visibility latencies and the times they
/// arrived (µs).
async fn consume(consumer: &StreamConsumer, n: u64) -> (Vec<u64>, Vec<u64>) {
    let mut latencies = Vec::with_capacity(n as usize);
    let mut arrivals = Vec::with_capacity(n as usize);
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
        arrivals.push(seen);
    }
    (latencies, arrivals)
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
    /// Records / time from the first produce to the last record visible.
    throughput: f64,
    /// Records / time between the 10th and the 90th percentile record becoming
    /// visible: the rate the pipeline keeps up, without its first and last commit.
    sustained: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q) as usize] as f64 / 1000.0
}

/// Warm-up, burst, then paced through `input`, read from `output`. The warm-up's
/// records (until the first one is visible, and `WARMUP` after it) are not measured:
/// they cover the readers' group joins and the pipeline's first commit, fixed costs
/// that would otherwise be a large part of a short burst.
async fn measure(bootstrap: &str, input: &str, output: &str, records: u64, paced: u64, rate: u64) -> Result {
    const WARMUP: u64 = 1000;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let consumer = reader(bootstrap, output);
    tokio::join!(produce(&producer, input, WARMUP, None), consume(&consumer, WARMUP));
    let start = now_us();
    let (_, arrivals) = tokio::join!(produce(&producer, input, records, None), consume(&consumer, records)).1;
    let at = |q: f64| arrivals[((records - 1) as f64 * q) as usize];
    let throughput = records as f64 / ((at(1.0) - start) as f64 / 1e6);
    let sustained = (records as f64 * 0.8) / ((at(0.9) - at(0.1)).max(1) as f64 / 1e6);
    let (mut latencies, _) = tokio::join!(produce(&producer, input, paced, Some(rate)), consume(&consumer, paced)).1;
    latencies.sort_unstable();
    Result {
        throughput,
        sustained,
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

/// The same runtime and function without the exactly-once commit: in-memory state, and
/// a `KafkaEgress` (idempotent, not transactional) producing each record as it comes:
/// at-least-once. Shows what the commit costs.
async fn at_least_once_mode(bootstrap: &str, records: u64, paced: u64, rate: u64) -> Result {
    let (input, output) = (unique("e2e-alo-in"), unique("e2e-alo-out"));
    create_topics(bootstrap, &[&input, &output]).await;
    let egress = KafkaEgress::new(bootstrap, &output, &[]).expect("egress");
    let builder = Runtime::builder().egress(OUT, egress);
    let result = measure_runtime(bootstrap, &input, &output, builder, records, paced, rate).await;
    delete_topics(bootstrap, &[&input, &output]).await;
    result
}

/// Runs the bench function in a runtime made from `builder`, reading `input`, while
/// [`measure`] runs.
async fn measure_runtime(
    bootstrap: &str,
    input: &str,
    output: &str,
    builder: RuntimeBuilder,
    records: u64,
    paced: u64,
    rate: u64,
) -> Result {
    let ingress = KafkaIngress::new(
        "in",
        KafkaIngressConfig::new(bootstrap, unique("e2e-group"), vec![input.to_owned()]),
    )
    .expect("ingress");
    let runtime = builder
        .config(RuntimeConfig {
            partitions: PARTITIONS,
            ..Default::default()
        })
        .module(module())
        .ingress(ingress, KeyRouter::new(FUNCTION, TypeName::from_static("bench/bytes")))
        .build()
        .expect("runtime");
    let stop = CancellationToken::new();
    let run = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    let result = measure(bootstrap, input, output, records, paced, rate).await;
    stop.cancel();
    run.await.expect("run task").expect("run");
    result
}

async fn kafka_mode(bootstrap: &str, interval_ms: u64, records: u64, paced: u64, rate: u64) -> Result {
    let (input, output, changelog_topic) = (unique("e2e-in"), unique("e2e-out"), unique("e2e-changelog"));
    create_topics(bootstrap, &[&input, &output]).await;
    let changelog = KafkaChangelog::connect(
        KafkaChangelogConfig::new(bootstrap, &changelog_topic, PARTITIONS, unique("e2e-instance")).egress(OUT, &output),
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
    let builder = Runtime::builder().state_backend(backend);
    let result = measure_runtime(bootstrap, &input, &output, builder, records, paced, rate).await;
    delete_topics(bootstrap, &[&input, &output, &changelog_topic]).await;
    result
}

/// The raw limit of an exactly-once relay, Kafka's consume-transform-produce loop with
/// no runtime: read `input` (read_committed) and, every `interval`, produce what was
/// read to `output` in one transaction together with the consumed offsets. No state,
/// no changelog, no function. Delivery reports are drained with short polls before
/// `commit_transaction`, as the runtime's changelog does. Runs until `stop` is set.
fn raw_relay(bootstrap: &str, input: &str, output: &str, interval: Duration, stop: &AtomicBool) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("e2e-relay"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("relay consumer");
    consumer.subscribe(&[input]).expect("subscribe");
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", unique("e2e-relay"))
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()
        .expect("relay producer");
    let timeout = Duration::from_secs(30);
    producer.init_transactions(timeout).expect("init_transactions");
    while !stop.load(Ordering::Relaxed) {
        producer.begin_transaction().expect("begin_transaction");
        let mut next: HashMap<i32, i64> = HashMap::new();
        let deadline = Instant::now() + interval;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(m) = consumer.poll(left.min(Duration::from_millis(10))) else {
                continue;
            };
            let m = m.expect("relay read");
            let mut record = BaseRecord::<[u8], [u8]>::to(output).payload(m.payload().unwrap_or_default());
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            while let Err((e, r)) = producer.send(record) {
                assert!(
                    matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::QueueFull)),
                    "relay produce: {e}"
                );
                producer.poll(Duration::from_millis(1));
                record = r;
            }
            producer.poll(Duration::ZERO);
            next.insert(m.partition(), m.offset() + 1);
        }
        if !next.is_empty() {
            let mut offsets = TopicPartitionList::new();
            for (p, o) in &next {
                offsets
                    .add_partition_offset(input, *p, Offset::Offset(*o))
                    .expect("offset");
            }
            let metadata = consumer.group_metadata().expect("group metadata");
            producer
                .send_offsets_to_transaction(&offsets, &metadata, timeout)
                .expect("send_offsets_to_transaction");
        }
        while producer.in_flight_count() > 0 {
            producer.poll(Duration::from_millis(1));
        }
        producer.commit_transaction(timeout).expect("commit_transaction");
    }
}

/// The raw relay (above) between two fresh topics, measured like Kafka mode.
async fn relay_mode(bootstrap: &str, interval_ms: u64, records: u64, paced: u64, rate: u64) -> Result {
    let (input, output) = (unique("e2e-relay-in"), unique("e2e-relay-out"));
    create_topics(bootstrap, &[&input, &output]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let relay = {
        let (b, i, o, s) = (bootstrap.to_owned(), input.clone(), output.clone(), Arc::clone(&stop));
        std::thread::spawn(move || raw_relay(&b, &i, &o, Duration::from_millis(interval_ms), &s))
    };
    let result = measure(bootstrap, &input, &output, records, paced, rate).await;
    stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || relay.join().expect("relay thread"))
        .await
        .expect("join");
    delete_topics(bootstrap, &[&input, &output]).await;
    result
}

/// Prints a table row: `r`, and its ratios to `raw`.
fn row(name: &str, r: &Result, raw: &Result) {
    println!(
        "| {name} | {:.0}/s | {:.2} | {:.0}/s | {:.2} | {:.1} ms | {:.1} ms |",
        r.throughput,
        r.throughput / raw.throughput,
        r.sustained,
        r.sustained / raw.sustained,
        r.p50_ms,
        r.p99_ms
    );
}

fn main() {
    let bootstrap = std::env::var("STATEFUN_KAFKA_BOOTSTRAP")
        .expect("set STATEFUN_KAFKA_BOOTSTRAP (scripts/kafka start prints the address)");
    let records = env_or("E2E_RECORDS", 200_000);
    let paced = env_or("E2E_PACED", 10_000);
    let rate = env_or("E2E_RATE", 5_000);
    let intervals: Vec<u64> = std::env::var("E2E_INTERVALS")
        .unwrap_or_else(|_| "50,100,500".into())
        .split(',')
        .map(|i| {
            i.trim()
                .parse()
                .expect("E2E_INTERVALS: commit intervals in ms, comma-separated")
        })
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    rt.block_on(async {
        println!("{records} records burst, then {paced} at {rate}/s; broker {bootstrap}");
        println!("| pipeline | burst | ratio | sustained (10th-90th percentile) | ratio | p50 | p99 |");
        println!("|---|---|---|---|---|---|---|");
        // Apache Kafka runs on a JVM: its produce, fetch and transaction paths are
        // compiled while they run. Warm them up unmeasured, or the first pipeline
        // (the raw pipe, every ratio's baseline) would run on a cold broker.
        let mut warm = raw_pipe(&bootstrap, records, paced, rate).await;
        for _ in 1..env_or("E2E_BROKER_WARMUP", 3) {
            warm = raw_pipe(&bootstrap, records, paced, rate).await;
        }
        let warm_relay = relay_mode(&bootstrap, 100, records, paced, rate).await;
        println!(
            "(broker warm-up, not measured: raw pipe {:.0}/s on its last pass, exactly-once relay {:.0}/s)",
            warm.throughput, warm_relay.throughput
        );
        let raw = raw_pipe(&bootstrap, records, paced, rate).await;
        row("raw produce -> consume", &raw, &raw);
        let r = at_least_once_mode(&bootstrap, records, paced, rate).await;
        row("runtime at-least-once (in-memory state, KafkaEgress)", &r, &raw);
        for interval in intervals.iter().copied() {
            let r = relay_mode(&bootstrap, interval, records, paced, rate).await;
            row(&format!("raw exactly-once relay, commit every {interval} ms"), &r, &raw);
            let r = kafka_mode(&bootstrap, interval, records, paced, rate).await;
            row(&format!("Kafka mode, commit every {interval} ms"), &r, &raw);
        }
        // The same baseline again: how far the broker and the machine drifted in the run.
        let again = raw_pipe(&bootstrap, records, paced, rate).await;
        row("raw produce -> consume, again at the end", &again, &raw);
    });
}

/// The raw pipe: one topic, produced and read with plain librdkafka clients.
async fn raw_pipe(bootstrap: &str, records: u64, paced: u64, rate: u64) -> Result {
    let topic = unique("e2e-raw");
    create_topics(bootstrap, &[&topic]).await;
    let m = measure(bootstrap, &topic, &topic, records, paced, rate).await;
    delete_topics(bootstrap, &[&topic]).await;
    m
}
