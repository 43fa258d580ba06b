//! The application on Kafka: its topics, a region's runtime instance in cluster mode,
//! the generator's producer, the central analytics consumer, and the region's final
//! state and egress read back from Kafka for the invariant check.
//!
//! Topics (per region `R`, under the prefix `retail` ([`Topics`]), created by
//! [`create_topics`] with the admin API):
//!
//! | topic | what | written by |
//! |---|---|---|
//! | `retail.R.warehouse-updates` | [`WarehouseUpdate`], key = SKU | warehouses (the generator) |
//! | `retail.R.pos-events` | [`PosEvent`], key = basket id | checkout counters (the generator) |
//! | `retail.orders` | [`OrderSummary`] of every region | the runtime, exactly once |
//! | `retail.sku-windows` | [`SkuWindow`] of every region | the runtime, exactly once |
//! | `retail.R.alerts` | [`LowStock`] | the runtime, exactly once |
//! | `retail.R.rejected` | [`Rejected`] records | the runtime, exactly once |
//! | `retail.R.dead-letters` | what the runtime could not deliver | the runtime |
//! | `retail-R-internal`, `retail-R-changelog` | the cluster's own topics | the runtime |
//!
//! Each region is one application (`retail-R`) of any number of instances: Kafka's
//! consumer group shares the runtime partitions among them (`statefun_kafka::KafkaCluster`).
//! The ingress topics have one partition per runtime partition and the generator puts
//! each record in the partition of its address, so no record needs forwarding.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use object_store::ObjectStore;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use statefun_kafka::{ChangelogSnapshot, ClusterReport, KafkaCluster, KafkaClusterConfig, KafkaDeadLetters};
use statefun_runtime::{KeyRouter, partition_for};
use statefun_sdk::{Address, TypeName, ValueSpec, ValueType};
use tokio_util::sync::CancellationToken;

use crate::check::Snapshot;
use crate::generator::{Event, Ledger};
use crate::*;

/// The names of the application's topics, under a prefix (`retail` in production; a
/// fresh prefix per demo run or test keeps runs on one broker apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Names under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Topics {
        Topics { prefix: prefix.into() }
    }

    /// The application id of region `region` (its consumer group, and the prefix of the
    /// runtime's internal and changelog topics).
    pub fn application(&self, region: &str) -> String {
        format!("{}-{region}", self.prefix)
    }

    /// A region's topic `name` (`<prefix>.<region>.<name>`).
    pub fn region(&self, region: &str, name: &str) -> String {
        format!("{}.{region}.{name}", self.prefix)
    }

    /// The orders topic of all regions.
    pub fn orders(&self) -> String {
        format!("{}.orders", self.prefix)
    }

    /// The per-SKU windows topic of all regions.
    pub fn sku_windows(&self) -> String {
        format!("{}.sku-windows", self.prefix)
    }

    /// The changelog topic of region `region`.
    pub fn changelog(&self, region: &str) -> String {
        KafkaClusterConfig::changelog_topic_of(&self.application(region))
    }
}

impl Default for Topics {
    fn default() -> Topics {
        Topics::new("retail")
    }
}

/// How long Kafka calls may block.
const TIMEOUT: Duration = Duration::from_secs(30);

/// How many partitions `topic` has; an error if it does not exist.
fn partition_count<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> anyhow::Result<i32> {
    let md = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .with_context(|| format!("cannot read the metadata of {topic}"))?;
    match md.topics().iter().find(|t| t.name() == topic && t.error().is_none()) {
        Some(t) if !t.partitions().is_empty() => Ok(t.partitions().len() as i32),
        _ => bail!("topic {topic} does not exist"),
    }
}

/// Creates the topics of `region` (and the shared analytics topics) unless they exist.
/// The ingress topics get `partitions` partitions, one per runtime partition.
pub async fn create_topics(brokers: &str, topics: &Topics, region: &str, partitions: u32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("cannot create the Kafka admin client")?;
    let ingress = [
        topics.region(region, "warehouse-updates"),
        topics.region(region, "pos-events"),
    ];
    let others = [
        topics.orders(),
        topics.sku_windows(),
        topics.region(region, "alerts"),
        topics.region(region, "rejected"),
        topics.region(region, "dead-letters"),
    ];
    let new: Vec<NewTopic<'_>> = ingress
        .iter()
        .map(|t| NewTopic::new(t, partitions as i32, TopicReplication::Fixed(1)))
        .chain(others.iter().map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1))))
        .collect();
    let results = admin
        .create_topics(&new, &AdminOptions::new().operation_timeout(Some(TIMEOUT)))
        .await
        .context("cannot create the region's topics")?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => bail!("cannot create topic {t}: {e}"),
        }
    }
    // Topics that existed must line up with the runtime's partitions: the generator puts
    // each record in the partition of its address. A topic another process is creating
    // at the same moment (the instances and the generator start together) is
    // `TopicAlreadyExists` here before the metadata shows it: wait for it.
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    for t in &ingress {
        let deadline = Instant::now() + TIMEOUT;
        let n = loop {
            match partition_count(&consumer, t) {
                Ok(n) => break n,
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        if n != partitions as i32 {
            bail!(
                "topic {t} has {n} partitions, but region {region} runs {partitions}: use the same --partitions everywhere"
            );
        }
    }
    Ok(())
}

/// One runtime instance of a region.
#[derive(Debug, Clone)]
pub struct InstanceConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The topic names.
    pub topics: Topics,
    /// The region's functions.
    pub app: AppConfig,
    /// Stable per instance, unique in the region (fences its previous process).
    pub instance_id: String,
    /// Runtime partitions: the same on every instance of the region.
    pub partitions: u32,
    /// Where this instance keeps its RocksDB state.
    pub state_dir: std::path::PathBuf,
    /// How often state, messages and egress are committed (one Kafka transaction).
    pub commit_interval: Duration,
}

/// Runs one instance of region `config.app.region` until `stop` is cancelled: joins
/// the region's group, takes its share of the partitions, and commits state and
/// egress to Kafka. Product images are read from `store`.
pub async fn run_instance(
    config: InstanceConfig,
    store: Arc<dyn ObjectStore>,
    stop: CancellationToken,
) -> anyhow::Result<ClusterReport> {
    let region = config.app.region.clone();
    let module = module(config.app.clone(), store)?;
    let t = &config.topics;
    let dead_letters = Arc::new(KafkaDeadLetters::new(
        &config.brokers,
        t.region(&region, "dead-letters"),
    )?);
    let mut cluster = KafkaClusterConfig::new(
        &config.brokers,
        t.application(&region),
        &config.instance_id,
        config.partitions,
        &config.state_dir,
    )
    .ingress(
        t.region(&region, "warehouse-updates"),
        KeyRouter::new(INTAKE, WarehouseUpdate::TYPE_NAME),
    )
    .ingress(
        t.region(&region, "pos-events"),
        KeyRouter::new(CART, PosEvent::TYPE_NAME),
    )
    .egress(ORDERS, t.orders())
    .egress(SKU_WINDOWS, t.sku_windows())
    .egress(ALERTS, t.region(&region, "alerts"))
    .egress(REJECTED, t.region(&region, "rejected"));
    cluster.commit_interval = config.commit_interval;
    let report = KafkaCluster::run(
        cluster,
        |b| b.module(module.clone()).dead_letters(Arc::clone(&dead_letters)),
        stop,
    )
    .await
    .with_context(|| format!("instance {} of region {region} failed", config.instance_id))?;
    dead_letters.flush(TIMEOUT)?;
    Ok(report)
}

/// Counts failed deliveries of the [`Feed`].
#[derive(Default)]
struct DeliveryErrors(Mutex<(u64, Option<String>)>);

impl ClientContext for DeliveryErrors {}

impl ProducerContext for DeliveryErrors {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            let mut s = self.0.lock().expect("delivery errors lock");
            s.0 += 1;
            s.1.get_or_insert_with(|| e.to_string());
        }
    }
}

/// The generator's connection to a region: produces each [`Event`] to the ingress topic
/// of its function type, keyed by the address id, in the topic partition of the
/// address's runtime partition. Idempotent producer: a retry never duplicates a record.
pub struct Feed {
    producer: ThreadedProducer<DeliveryErrors>,
    warehouse: String,
    pos: String,
    partitions: u32,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed").field("pos", &self.pos).finish()
    }
}

impl Feed {
    /// A feed into `region`, whose runtime has `partitions` partitions.
    pub fn new(brokers: &str, topics: &Topics, region: &str, partitions: u32) -> anyhow::Result<Feed> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create_with_context(DeliveryErrors::default())
            .context("cannot create the generator's producer")?;
        Ok(Feed {
            producer,
            warehouse: topics.region(region, "warehouse-updates"),
            pos: topics.region(region, "pos-events"),
            partitions,
        })
    }

    /// Produces `e` (waits while the producer's queue is full).
    pub async fn send(&self, e: &Event) -> anyhow::Result<()> {
        let t = e.target.type_name();
        let topic = if t == &INTAKE {
            &self.warehouse
        } else if t == &CART {
            &self.pos
        } else {
            bail!("the generator made an event for {t}, which has no ingress topic");
        };
        let partition = partition_for(e.target.id(), self.partitions).0 as i32;
        let value = e.value.bytes().map(|b| b.as_ref()).unwrap_or_default();
        let mut record = BaseRecord::<str, [u8]>::to(topic)
            .partition(partition)
            .key(e.target.id())
            .payload(value);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => bail!("cannot produce to {topic}: {e}"),
            }
        }
    }

    /// Waits until every record is acknowledged; fails if any was not delivered.
    pub fn flush(&self) -> anyhow::Result<()> {
        self.producer
            .flush(TIMEOUT)
            .context("the generator's records were not acknowledged")?;
        let errors = self.producer.context().0.lock().expect("delivery errors lock");
        if errors.0 > 0 {
            bail!(
                "{} generated records were not delivered (first error: {})",
                errors.0,
                errors.1.as_deref().unwrap_or("?")
            );
        }
        Ok(())
    }
}

/// The value of every committed record of `topic` up to its current end.
pub fn read_topic(brokers: &str, topic: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .context("cannot create a consumer")?;
    let partitions = partition_count(&consumer, topic)?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in 0..partitions {
        // The high watermark (not the last stable offset): a committed transaction whose
        // markers are not written yet is waited for, not missed.
        let (low, high) = consumer.fetch_watermarks(topic, p, TIMEOUT)?;
        // An empty partition is done already (its position stays unknown: no fetch).
        ends.push(if low >= high { i64::MIN } else { high });
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut stalled = Instant::now();
    loop {
        let positions = consumer.position()?;
        let done = (0..partitions).all(|p| {
            let pos = positions
                .find_partition(topic, p)
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(-1);
            pos >= ends[p as usize]
        });
        if done {
            return Ok(out);
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(m) => {
                let m = m.with_context(|| format!("cannot read {topic}"))?;
                stalled = Instant::now();
                out.push(m.payload().unwrap_or_default().to_vec());
            }
            None if stalled.elapsed() > TIMEOUT => bail!("reading {topic} stalled for {TIMEOUT:?}"),
            None => {}
        }
    }
}

fn decode_topic<T: ValueType>(brokers: &str, topic: &str) -> anyhow::Result<Vec<T>> {
    read_topic(brokers, topic)?
        .iter()
        .map(|v| T::decode(v).with_context(|| format!("undecodable record on {topic}")))
        .collect()
}

/// Waits until region `region` has finished everything it was given: every record of
/// its ingress topics accepted, no message waiting in an inbox, no delayed message
/// pending, and no commit for a second. Returns the state it settled at. Fails when
/// the region has work left and commits nothing for `stall_timeout`. `from`, a state an
/// earlier call returned, is refreshed instead of reading the changelog again.
pub async fn wait_settled(
    brokers: &str,
    topics: &Topics,
    region: &str,
    stall_timeout: Duration,
    from: Option<ChangelogSnapshot>,
) -> anyhow::Result<ChangelogSnapshot> {
    let mut deadline = Instant::now() + stall_timeout;
    let mut previous: Option<Vec<i64>> = None;
    let mut kept = from;
    loop {
        // The first read takes the whole changelog; later ones only what was committed since.
        let read = {
            let (brokers, topics, region) = (brokers.to_owned(), topics.clone(), region.to_owned());
            let kept = kept.take();
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let snapshot = match kept {
                    Some(mut s) => {
                        s.refresh(&brokers, TIMEOUT)?;
                        s
                    }
                    None => ChangelogSnapshot::read(&brokers, &topics.changelog(&region), TIMEOUT)?,
                };
                let behind = unconsumed(&brokers, &topics, &region, &snapshot)?;
                Ok((snapshot, behind))
            })
            .await?
        };
        // A changelog that is not there yet (no instance has started) is "not settled".
        let busy = match read {
            Err(e) => format!("{e:#}"),
            Ok((snapshot, behind)) => {
                let pending = (behind, snapshot.pending_messages(), snapshot.pending_timers());
                let ends = snapshot.ends().to_vec();
                if previous.as_ref() == Some(&ends) {
                    if pending == (0, 0, 0) {
                        return Ok(snapshot);
                    }
                } else {
                    deadline = Instant::now() + stall_timeout; // it committed: progress
                }
                previous = Some(ends);
                kept = Some(snapshot);
                let (b, m, t) = pending;
                format!("{b} ingress records not accepted, {m} messages in inboxes, {t} delayed messages")
            }
        };
        if Instant::now() > deadline {
            bail!("region {region} made no progress for {stall_timeout:?}: {busy}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// How many records of the region's ingress topics its runtime has not accepted yet.
fn unconsumed(brokers: &str, topics: &Topics, region: &str, snapshot: &ChangelogSnapshot) -> anyhow::Result<i64> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let mut behind = 0;
    for t in [
        topics.region(region, "warehouse-updates"),
        topics.region(region, "pos-events"),
    ] {
        let partitions = partition_count(&consumer, &t)?;
        for p in 0..partitions {
            let (_, high) = consumer.fetch_watermarks(&t, p, TIMEOUT)?;
            let accepted = snapshot.progress(&t, p).map_or(0, |o| o as i64 + 1);
            behind += (high - accepted).max(0);
        }
    }
    Ok(behind)
}

/// Reads region `region`'s final state (from its changelog) and egress (from the
/// topics) for [`check::check`](crate::check::check); `ledger` is what its generator sent.
pub async fn read_snapshot(
    brokers: &str,
    topics: &Topics,
    region: &str,
    state: &ChangelogSnapshot,
    ledger: Ledger,
) -> anyhow::Result<Snapshot> {
    fn states<T: ValueType>(
        s: &ChangelogSnapshot,
        t: &TypeName,
        ids: &[String],
        spec: &ValueSpec<T>,
    ) -> anyhow::Result<std::collections::BTreeMap<String, T>> {
        let mut out = std::collections::BTreeMap::new();
        for id in ids {
            if let Some(v) = s.state(&Address::new(t.clone(), id)?, spec)? {
                out.insert(id.clone(), v);
            }
        }
        Ok(out)
    }
    let (stock, baskets, accounts) = (
        states(state, &INVENTORY, &ledger.skus, &STOCK)?,
        states(state, &CART, &ledger.baskets, &BASKET)?,
        states(state, &LOYALTY, &ledger.customers, &ACCOUNT)?,
    );
    let (brokers, topics, region) = (brokers.to_owned(), topics.clone(), region.to_owned());
    tokio::task::spawn_blocking(move || {
        let orders: Vec<OrderSummary> = decode_topic(&brokers, &topics.orders())?;
        let windows: Vec<SkuWindow> = decode_topic(&brokers, &topics.sku_windows())?;
        Ok(Snapshot {
            orders: orders.into_iter().filter(|o| o.region == region).collect(),
            windows: windows.into_iter().filter(|w| w.region == region).collect(),
            rejected: decode_topic(&brokers, &topics.region(&region, "rejected"))?,
            dead_letters: read_topic(&brokers, &topics.region(&region, "dead-letters"))?.len(),
            stock,
            baskets,
            accounts,
            ledger,
        })
    })
    .await?
}

/// The central analytics consumer: follows `retail.orders` and `retail.sku-windows`
/// (`read_committed`: only what the regions committed) and calls `show` with the
/// global view every `every`, until `stop` is cancelled.
pub async fn follow_analytics(
    brokers: &str,
    topics: &Topics,
    every: Duration,
    stop: CancellationToken,
    mut show: impl FnMut(&crate::analytics::GlobalView) + Send + 'static,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{}-analytics", topics.prefix))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("cannot create the analytics consumer")?;
    let orders = topics.orders();
    let windows = topics.sku_windows();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        // The view is rebuilt from the start of the topics: assign, not subscribe.
        let mut tpl = TopicPartitionList::new();
        for t in [&orders, &windows] {
            // The regions create the topics: wait for them.
            let n = loop {
                match partition_count(&consumer, t) {
                    Ok(n) => break n,
                    Err(_) if !stop.is_cancelled() => std::thread::sleep(Duration::from_secs(1)),
                    Err(e) => return Err(e),
                }
            };
            for p in 0..n {
                tpl.add_partition_offset(t, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        let mut view = crate::analytics::GlobalView::new();
        let mut shown = Instant::now();
        while !stop.is_cancelled() {
            if let Some(m) = consumer.poll(Duration::from_millis(200)) {
                let m = m?;
                let bytes = m.payload().unwrap_or_default();
                let decoded = if m.topic() == orders {
                    OrderSummary::decode(bytes).map(|o| view.add_order(&o))
                } else {
                    SkuWindow::decode(bytes).map(|w| view.add_window(&w))
                };
                if let Err(e) = decoded {
                    tracing::warn!(topic = m.topic(), offset = m.offset(), error = %e, "undecodable analytics record");
                }
            }
            if shown.elapsed() >= every {
                show(&view);
                shown = Instant::now();
            }
        }
        show(&view);
        Ok(())
    })
    .await?
}
