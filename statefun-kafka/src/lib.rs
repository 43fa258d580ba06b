//! Kafka for statefun-rs: an ingress that consumes topics, the Kafka changelog that
//! commits state and egress in one transaction per interval (Kafka mode), an egress
//! that produces to a topic, and a dead-letter sink (rdkafka).
//!
//! Why it exists: Kafka is the production transport the runtime is built for (issue 4).
//! What it promises today:
//! * [`KafkaCluster`] (cluster mode): instances of one application share the runtime's
//!   partitions through a consumer group; messages to partitions on other instances
//!   travel through an internal topic inside the same transactions as state and
//!   egress; KIP-447 fencing with `send_offsets_to_transaction`. See the `cluster`
//!   module docs and `docs/guarantees.md`, "Cluster mode". Its crash paths are proven on
//!   Apache Kafka (`docs/kafka.md`).
//! * [`KafkaChangelog`], under `statefun_runtime::state::ChangelogBackend`: every
//!   commit interval, one Kafka transaction holds the latest value of every changed key
//!   (compacted changelog topic) and the egress records; RocksDB follows after the
//!   commit and is restored from the changelog. Exactly-once for `read_committed`
//!   readers, also across crashes (`docs/guarantees.md`, "Kafka mode").
//! * [`KafkaIngress`] consumes with a consumer group and never commits an offset past
//!   what the runtime has durably accepted: with a durable state backend it commits
//!   [`IngressSink::acknowledged_offset`] + 1, so after a crash the group resumes at or
//!   before the first record not yet in an inbox, and the runtime's partitions skip the
//!   records they already accepted. Processing is exactly-once for one instance. With a
//!   volatile backend it commits what it has delivered.
//! * [`KafkaEgress`] produces each egress record with the record id in a header
//!   (`statefun-egress-id`), so a consumer can drop the records handed over twice after
//!   a crash: at-least-once with an id. For exactly-once egress, commit it with the
//!   [`KafkaChangelog`] instead.
//! * [`KafkaDeadLetters`] produces every dead letter to a topic, with headers naming
//!   the reason and, for ingress records, the source topic, partition and offset.
//! * [`ChangelogSnapshot`] reads an application's committed state from its changelog
//!   topic (`read_committed`), whichever instances own it: for inspection and checks.
//! * [`RecordRouter`] hands the whole record to the function as a [`KafkaRecord`]
//!   message (key, value, headers, timestamp, topic, partition, offset), with the key
//!   as the function id. `statefun_runtime::KeyRouter` passes only the value.
//!
//! On a production Kafka, every client the runtime creates takes the user's librdkafka
//! properties (`KafkaClusterConfig::client_properties`, `KafkaChangelogConfig::properties`,
//! and the `properties` of the other components): TLS, SASL, `client.id`, tuning.
//! Properties the runtime owns are refused with the reason ([`reserved_property`]); a
//! login the brokers refuse or an untrusted certificate fails the start within about a
//! second ([`Error::Connect`]), naming the listener. The runtime's own topics are created
//! replicated (min(3, brokers), `min.insync.replicas` one less) or checked (partition
//! count, cleanup policy: [`Error::Topic`]). See `docs/kafka.md`, "Production
//! configuration".

use std::sync::Arc;
use std::time::Duration;

mod client;
pub use client::reserved_property;
mod changelog;
pub use changelog::{KafkaChangelog, KafkaChangelogConfig};
mod snapshot;
mod topics;
pub use snapshot::ChangelogSnapshot;
mod cluster;
pub use cluster::{Assignment, ClusterError, ClusterReport, KafkaCluster, KafkaClusterConfig};

use bytes::Bytes;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use statefun_runtime::egress::{DeadLetter, DeadLetterSink, Egress, EgressRecord, Error as EgressError};
use statefun_runtime::ingress::{Error as IngressError, Ingress, IngressRecord, IngressSink, SourcePosition};
use statefun_sdk::protocol::egress::KafkaProducerRecord;
use tokio_util::sync::CancellationToken;

/// A Kafka record as a message to a function (what [`RecordRouter`] delivers).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KafkaRecord {
    /// Source topic.
    #[prost(string, tag = "1")]
    pub topic: String,
    /// Source partition.
    #[prost(int32, tag = "2")]
    pub partition: i32,
    /// Offset in the partition.
    #[prost(int64, tag = "3")]
    pub offset: i64,
    /// The record key.
    #[prost(bytes = "bytes", optional, tag = "4")]
    pub key: Option<Bytes>,
    /// The record value.
    #[prost(bytes = "bytes", optional, tag = "5")]
    pub value: Option<Bytes>,
    /// The record timestamp, milliseconds since the Unix epoch.
    #[prost(int64, optional, tag = "6")]
    pub timestamp_ms: Option<i64>,
    /// The headers, in order.
    #[prost(message, repeated, tag = "7")]
    pub headers: Vec<KafkaHeader>,
}
statefun_sdk::protobuf_type!(KafkaRecord, "io.statefun-rs.kafka/record");

impl KafkaRecord {
    /// The value of the first header named `key`.
    pub fn header(&self, key: &str) -> Option<&Bytes> {
        self.headers.iter().find(|h| h.key == key).map(|h| &h.value)
    }
}

/// One record header.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KafkaHeader {
    /// Header name.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Header value.
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

/// Routes a record to `target` with id = the record key (UTF-8, not empty), and the
/// whole record as a [`KafkaRecord`] message. A record without a usable key is
/// refused (and dead-lettered by the runtime).
#[derive(Debug, Clone)]
pub struct RecordRouter {
    target: statefun_sdk::TypeName,
}

impl RecordRouter {
    /// Routes to functions of type `target`.
    pub fn new(target: statefun_sdk::TypeName) -> RecordRouter {
        RecordRouter { target }
    }
}

impl statefun_runtime::ingress::Router for RecordRouter {
    fn route(&self, r: &IngressRecord) -> Result<statefun_runtime::Routed, statefun_runtime::ingress::RouteError> {
        use statefun_runtime::ingress::RouteError;
        let key = r.key.as_ref().ok_or_else(|| RouteError("record has no key".into()))?;
        let id = std::str::from_utf8(key).map_err(|_| RouteError("record key is not UTF-8".into()))?;
        let target = statefun_sdk::Address::new(self.target.clone(), id).map_err(|e| RouteError(e.to_string()))?;
        let position = r.position.as_ref();
        let record = KafkaRecord {
            topic: position.map(|p| p.topic.to_string()).unwrap_or_default(),
            partition: position.map_or(-1, |p| p.partition),
            offset: position.map_or(-1, |p| p.offset),
            key: r.key.clone(),
            value: r.value.clone(),
            timestamp_ms: r.timestamp_ms,
            headers: r
                .headers
                .iter()
                .map(|(k, v)| KafkaHeader {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
        };
        let message = statefun_sdk::TypedValue::of(&record).map_err(|e| RouteError(e.to_string()))?;
        Ok(statefun_runtime::Routed::new(target, message))
    }
}

/// Header carrying an egress record's id (see `EgressRecord::id`).
pub const EGRESS_ID_HEADER: &str = "statefun-egress-id";
/// Header carrying a dead letter's reason.
pub const DEAD_LETTER_REASON_HEADER: &str = "statefun-dead-letter-reason";
/// Header carrying the type name of an egress record's value.
pub const TYPE_HEADER: &str = "statefun-type";

/// Where a consumer group without committed offsets starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPosition {
    /// The earliest offset still in the topic.
    #[default]
    Earliest,
    /// Only records produced from now on.
    Latest,
}

/// Configuration of a [`KafkaIngress`].
#[derive(Clone)]
pub struct KafkaIngressConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// The consumer group.
    pub group_id: String,
    /// Topics to consume; route them with a router that looks at
    /// `IngressRecord::position`.
    pub topics: Vec<String>,
    /// Start position when the group has no committed offset.
    pub start: StartPosition,
    /// How often offsets are committed. Default 200 ms.
    pub commit_interval: Duration,
    /// Further librdkafka consumer properties (`security.protocol`, `ssl.*`, `sasl.*`,
    /// `client.id`, tuning). Those the runtime owns are refused
    /// ([`reserved_property`]): the group, the start position and offset commits are
    /// set by the fields above.
    pub properties: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaIngressConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaIngressConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("start", &self.start)
            .field("commit_interval", &self.commit_interval)
            .field("properties", &client::Redacted(&self.properties))
            .finish()
    }
}

impl KafkaIngressConfig {
    /// A config with the defaults: earliest start, commits every 200 ms.
    pub fn new(bootstrap_servers: impl Into<String>, group_id: impl Into<String>, topics: Vec<String>) -> Self {
        KafkaIngressConfig {
            bootstrap_servers: bootstrap_servers.into(),
            group_id: group_id.into(),
            topics,
            start: StartPosition::Earliest,
            commit_interval: Duration::from_millis(200),
            properties: Vec::new(),
        }
    }
}

/// Why a Kafka component could not be created or started. Whose fault it is, and
/// whether trying again can help ([`Error::is_retriable`]), depends on the variant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A Kafka call failed: the brokers are away or slow, or refused the request.
    /// Trying again later may help.
    #[error("kafka {what}: {source}")]
    Kafka {
        /// What was being done.
        what: std::borrow::Cow<'static, str>,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The configuration is refused (a property the runtime owns, an impossible
    /// replication): the message names the field and what to do. A retry cannot help.
    #[error("invalid kafka configuration: {0}")]
    Config(String),
    /// The brokers refused this client at the connection (its login, or a TLS
    /// handshake: a certificate this client does not trust). A retry with the same
    /// configuration cannot help.
    #[error("kafka: cannot connect to {bootstrap_servers}: {reason}")]
    Connect {
        /// The listener (`bootstrap.servers`).
        bootstrap_servers: String,
        /// The cause and what to check, with librdkafka's message.
        reason: String,
    },
    /// An existing topic does not fit (missing, wrong partition count or cleanup
    /// policy): the message says what to change. A retry cannot help.
    #[error("kafka topic {topic}: {problem}")]
    Topic {
        /// The topic.
        topic: String,
        /// What is wrong and what to change.
        problem: String,
    },
}

impl Error {
    /// Whether trying again later may succeed (the brokers were away or slow); a
    /// configuration, a login or a topic that does not fit needs a change first.
    pub fn is_retriable(&self) -> bool {
        matches!(self, Error::Kafka { .. })
    }
}

/// Maps a Kafka error to an [`Error`] saying what was being done.
fn kafka(what: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
    move |source| Error::Kafka {
        what: what.into(),
        source,
    }
}

/// Consumes Kafka topics into the runtime (see the crate docs for what it commits).
pub struct KafkaIngress {
    name: String,
    consumer: StreamConsumer,
    config: KafkaIngressConfig,
}

impl std::fmt::Debug for KafkaIngress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaIngress").field("name", &self.name).finish()
    }
}

impl KafkaIngress {
    /// Creates the consumer and subscribes to the topics. A property the runtime owns
    /// in `config.properties` is an [`Error::Config`].
    pub fn new(name: impl Into<String>, config: KafkaIngressConfig) -> Result<KafkaIngress, Error> {
        client::check_properties("KafkaIngressConfig::properties", &config.properties).map_err(Error::Config)?;
        let mut cc = client::client_config(&config.bootstrap_servers, &config.properties);
        cc.set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match config.start {
                    StartPosition::Earliest => "earliest",
                    StartPosition::Latest => "latest",
                },
            );
        let consumer: StreamConsumer = cc.create().map_err(kafka("cannot create consumer"))?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(kafka("cannot subscribe"))?;
        Ok(KafkaIngress {
            name: name.into(),
            consumer,
            config,
        })
    }

    /// Commits, per partition delivered so far, the offset after the last record the
    /// runtime holds durably (or after the last delivered one, for a volatile backend).
    fn commit(&self, sink: &IngressSink, delivered: &std::collections::BTreeMap<(String, i32), i64>) {
        let mut list = TopicPartitionList::new();
        for ((topic, partition), last) in delivered {
            let upto = match sink.acknowledged_offset(topic, *partition) {
                Ok(Some(o)) => o.min(*last),
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(ingress = %self.name, error = %e, "cannot read committed offsets; not committing");
                    return;
                }
            };
            if let Err(e) = list.add_partition_offset(topic, *partition, Offset::Offset(upto + 1)) {
                tracing::warn!(ingress = %self.name, error = %e, "cannot build the offset list");
                return;
            }
        }
        if list.count() > 0
            && let Err(e) = self.consumer.commit(&list, CommitMode::Async)
        {
            tracing::warn!(ingress = %self.name, error = %e, "offset commit failed; will retry");
        }
    }
}

/// The record `m` as an ingress record; `topics` interns the topic names.
fn record_of(
    m: &rdkafka::message::BorrowedMessage<'_>,
    topics: &mut std::collections::HashMap<String, Arc<str>>,
) -> IngressRecord {
    let name = m.topic();
    let topic = match topics.get(name) {
        Some(t) => Arc::clone(t),
        None => {
            let t: Arc<str> = Arc::from(name);
            topics.insert(name.to_owned(), Arc::clone(&t));
            t
        }
    };
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        h.value.map(Bytes::copy_from_slice).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    IngressRecord {
        key: m.key().map(Bytes::copy_from_slice),
        value: m.payload().map(Bytes::copy_from_slice),
        headers,
        timestamp_ms: m.timestamp().to_millis(),
        position: Some(SourcePosition {
            topic,
            partition: m.partition(),
            offset: m.offset(),
        }),
    }
}

#[async_trait::async_trait]
impl Ingress for KafkaIngress {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(self: Box<Self>, sink: IngressSink, shutdown: CancellationToken) -> Result<(), IngressError> {
        let mut delivered: std::collections::BTreeMap<(String, i32), i64> = Default::default();
        let mut topics: std::collections::HashMap<String, Arc<str>> = Default::default();
        let mut tick = tokio::time::interval(self.config.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    self.commit(&sink, &delivered);
                    continue;
                }
                m = self.consumer.recv() => m,
            };
            let m = match message {
                Ok(m) => m,
                Err(e) => {
                    // librdkafka reconnects by itself; a broker that went away shows up
                    // here and the consumer keeps trying.
                    tracing::warn!(ingress = %self.name, error = %e, "kafka consumer error");
                    continue;
                }
            };
            let record = record_of(&m, &mut topics);
            let key = (m.topic().to_owned(), m.partition());
            let offset = m.offset();
            drop(m);
            if sink.deliver(record).await.is_err() {
                break;
            }
            delivered.insert(key, offset);
        }
        self.commit(&sink, &delivered);
        Ok(())
    }
}

/// An idempotent producer (`linger.ms` 5 unless the properties say otherwise); a
/// property the runtime owns in `properties` (named `field` in the error) is refused.
fn producer(
    bootstrap_servers: &str,
    properties: &[(String, String)],
    field: &str,
) -> Result<ThreadedProducer<DefaultProducerContext>, Error> {
    use client::ConfigExt as _;
    client::check_properties(field, properties).map_err(Error::Config)?;
    let mut cc = client::client_config(bootstrap_servers, properties);
    cc.set_default("linger.ms", "5").set("enable.idempotence", "true");
    cc.create().map_err(kafka("cannot create producer"))
}

/// Produces egress records to one topic: key = the producing address's id, value = the
/// record's bytes, headers = its id and type name.
pub struct KafkaEgress {
    topic: String,
    producer: ThreadedProducer<DefaultProducerContext>,
}

impl std::fmt::Debug for KafkaEgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaEgress").field("topic", &self.topic).finish()
    }
}

impl KafkaEgress {
    /// An egress to `topic`: an idempotent producer, `linger.ms` 5. `properties` are
    /// further librdkafka producer properties (`security.protocol`, `ssl.*`, `sasl.*`,
    /// `client.id`, tuning; they override `linger.ms`); one the runtime owns
    /// ([`reserved_property`]) is an [`Error::Config`].
    pub fn new(
        bootstrap_servers: &str,
        topic: impl Into<String>,
        properties: &[(String, String)],
    ) -> Result<KafkaEgress, Error> {
        Ok(KafkaEgress {
            topic: topic.into(),
            producer: producer(bootstrap_servers, properties, "KafkaEgress properties")?,
        })
    }

    /// Waits until every record handed over so far is acknowledged (or `timeout`).
    pub fn flush(&self, timeout: Duration) -> Result<(), Error> {
        self.producer.flush(timeout).map_err(kafka("flush failed"))
    }
}

impl Egress for KafkaEgress {
    fn send(&self, record: EgressRecord) -> Result<(), EgressError> {
        self.producer
            .send(egress_record(&self.topic, &record))
            .map_err(|(e, _)| EgressError::Rejected(format!("kafka producer refused the record: {e}")))
    }
}

/// A StateFun Kafka record (written by a remote function) as a Kafka record: its topic,
/// its key (none when empty), its value; headers = the egress record's id if it has one.
fn producer_record<'a>(r: &'a KafkaProducerRecord, record: &'a EgressRecord) -> BaseRecord<'a, [u8], [u8]> {
    let mut out = BaseRecord::to(&r.topic).payload(r.value_bytes.as_ref());
    if !r.key.is_empty() {
        out = out.key(r.key.as_bytes());
    }
    if let Some(id) = record.id {
        out = out.headers(OwnedHeaders::new().insert(Header {
            key: EGRESS_ID_HEADER,
            value: Some(id.to_string().as_str()),
        }));
    }
    out
}

/// A dead letter committed in the transaction, as [`KafkaDeadLetters`] writes one: key =
/// the target's id, value = the message's bytes, headers = the reason, the target, the
/// message's type and the egress record's id.
fn dead_letter_record<'a>(
    topic: &'a str,
    letter: &'a statefun_runtime::egress::DeadLetterRecord,
    record: &'a EgressRecord,
) -> BaseRecord<'a, [u8], [u8]> {
    let mut headers = OwnedHeaders::new().insert(Header {
        key: DEAD_LETTER_REASON_HEADER,
        value: Some(letter.reason.as_str()),
    });
    if let Some(t) = &letter.target {
        headers = headers.insert(Header {
            key: "statefun-target",
            value: Some(t.as_str()),
        });
    }
    if let Some(t) = &letter.message_type {
        headers = headers.insert(Header {
            key: TYPE_HEADER,
            value: Some(t.as_str()),
        });
    }
    if let Some(id) = record.id {
        headers = headers.insert(Header {
            key: EGRESS_ID_HEADER,
            value: Some(id.to_string().as_str()),
        });
    }
    let mut r = BaseRecord::to(topic).headers(headers);
    if let Some(k) = &letter.target_id {
        r = r.key(k.as_bytes());
    }
    if let Some(v) = &letter.message {
        r = r.payload(v.as_ref());
    }
    r
}

/// An egress record as a Kafka record to `topic`: key = the producing address's id,
/// value = the record's bytes, headers = its type and its id if it has one.
fn egress_record<'a>(topic: &'a str, record: &'a EgressRecord) -> BaseRecord<'a, [u8], [u8]> {
    let id = record.id.map(|i| i.to_string());
    let mut headers = OwnedHeaders::new().insert(Header {
        key: TYPE_HEADER,
        value: Some(record.message.type_name().as_str()),
    });
    if let Some(id) = &id {
        headers = headers.insert(Header {
            key: EGRESS_ID_HEADER,
            value: Some(id.as_str()),
        });
    }
    let mut r = BaseRecord::to(topic)
        .key(record.source.id().as_bytes())
        .headers(headers);
    if let Some(v) = record.message.bytes() {
        r = r.payload(v.as_ref());
    }
    r
}

/// Produces dead letters to a topic. Value: the record's or message's bytes; key: the
/// record's key or the target id; headers: `statefun-dead-letter-reason`, and for
/// ingress records `statefun-source-topic`, `-partition`, `-offset`.
pub struct KafkaDeadLetters {
    topic: String,
    producer: ThreadedProducer<DefaultProducerContext>,
}

impl std::fmt::Debug for KafkaDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDeadLetters").field("topic", &self.topic).finish()
    }
}

impl KafkaDeadLetters {
    /// A dead-letter sink producing to `topic`.
    pub fn new(bootstrap_servers: &str, topic: impl Into<String>) -> Result<KafkaDeadLetters, Error> {
        KafkaDeadLetters::with_properties(bootstrap_servers, topic, &[])
    }

    /// A dead-letter sink producing to `topic` with further librdkafka producer
    /// properties (as [`KafkaEgress::new`] takes them: a secured cluster's
    /// `security.protocol`, `ssl.*`, `sasl.*`; one the runtime owns is an
    /// [`Error::Config`]).
    pub fn with_properties(
        bootstrap_servers: &str,
        topic: impl Into<String>,
        properties: &[(String, String)],
    ) -> Result<KafkaDeadLetters, Error> {
        Ok(KafkaDeadLetters {
            topic: topic.into(),
            producer: producer(bootstrap_servers, properties, "KafkaDeadLetters properties")?,
        })
    }

    /// Waits until every dead letter handed over so far is acknowledged.
    pub fn flush(&self, timeout: Duration) -> Result<(), Error> {
        self.producer.flush(timeout).map_err(kafka("flush failed"))
    }
}

impl DeadLetterSink for KafkaDeadLetters {
    fn send(&self, d: DeadLetter) {
        let reason = d.reason.to_string();
        let mut headers = OwnedHeaders::new().insert(Header {
            key: DEAD_LETTER_REASON_HEADER,
            value: Some(reason.as_str()),
        });
        let target = d.target.as_ref().map(|t| t.to_string());
        if let Some(t) = &target {
            headers = headers.insert(Header {
                key: "statefun-target",
                value: Some(t.as_str()),
            });
        }
        let position = d.record.as_ref().and_then(|r| r.position.clone());
        let (p, o) = position
            .as_ref()
            .map(|p| (p.partition.to_string(), p.offset.to_string()))
            .unwrap_or_default();
        if let Some(pos) = &position {
            headers = headers
                .insert(Header {
                    key: "statefun-source-topic",
                    value: Some(&*pos.topic),
                })
                .insert(Header {
                    key: "statefun-source-partition",
                    value: Some(p.as_str()),
                })
                .insert(Header {
                    key: "statefun-source-offset",
                    value: Some(o.as_str()),
                });
        }
        let key: Option<Bytes> = d
            .record
            .as_ref()
            .and_then(|r| r.key.clone())
            .or_else(|| d.target.as_ref().map(|t| Bytes::copy_from_slice(t.id().as_bytes())));
        let value: Option<Bytes> = d
            .record
            .as_ref()
            .and_then(|r| r.value.clone())
            .or_else(|| d.message.as_ref().and_then(|m| m.bytes().cloned()));
        let mut r = BaseRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
        if let Some(k) = &key {
            r = r.key(k.as_ref());
        }
        if let Some(v) = &value {
            r = r.payload(v.as_ref());
        }
        if let Err((e, _)) = self.producer.send(r) {
            tracing::error!(error = %e, reason = %reason, "cannot produce a dead letter; logged instead");
        }
    }
}
