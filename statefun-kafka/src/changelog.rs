//! The Kafka changelog: state changes and egress records committed together in one
//! Kafka transaction per commit interval (the durable side of
//! [`ChangelogBackend`](statefun_runtime::state::ChangelogBackend)).
//!
//! Why it exists: it is what makes processing exactly-once end to end with Kafka. Every
//! interval, one transaction holds the latest value of every key that changed (to a
//! compacted changelog topic, one topic partition per runtime partition) and every
//! egress record produced (to the egress topics). A `read_committed` consumer sees the
//! egress of an interval together with the state it came from, or neither; RocksDB gets
//! the changes only after the commit. See `docs/guarantees.md`, "Kafka mode".
//!
//! One transactional producer serves the whole instance. A restarted instance with the
//! same `transactional.id` fences the old one (its open transaction is aborted, its
//! later commits fail), so a zombie can never commit after its successor started.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use statefun_runtime::PartitionId;
use statefun_runtime::egress::{DEAD_LETTERS, DeadLetterRecord};
use statefun_runtime::state::codec::RawOp;
use statefun_runtime::state::{Changelog, CommitUnit, Error as StateError};
use statefun_sdk::protocol::egress::KafkaProducerRecord;
use statefun_sdk::{TypeName, ValueType};

use crate::client::ConfigExt as _;
use crate::{Error, kafka, topics};

/// Configuration of a [`KafkaChangelog`].
#[derive(Clone)]
#[non_exhaustive]
pub struct KafkaChangelogConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// The changelog topic: created (compacted) with one partition per runtime
    /// partition if missing; an existing topic must have exactly that many, and
    /// `cleanup.policy=compact` (an error at [`KafkaChangelog::connect`] otherwise).
    pub topic: String,
    /// The runtime's partition count.
    pub partitions: u32,
    /// The producer's `transactional.id`: stable per instance, so a restarted instance
    /// fences its previous incarnation.
    pub transactional_id: String,
    /// Egress ids whose records are committed in the transaction, and their topics
    /// (which must exist).
    pub egress_topics: HashMap<TypeName, String>,
    /// Egress ids whose records are StateFun Kafka records (`KafkaProducerRecord`, what
    /// remote functions write): each is produced to the topic it names, with its key and
    /// value, in the transaction. The topics it may name (which must exist); a record of
    /// another type or naming another topic is refused (and dead-lettered by the
    /// runtime).
    pub record_egresses: HashMap<TypeName, BTreeSet<String>>,
    /// Where the dead letters of messages go, in the transaction (the runtime's
    /// `DEAD_LETTERS` egress): each commits with the removal of the message it replaces,
    /// so a crash neither loses nor repeats it. The topic must exist. Default: none
    /// (dead letters go to the runtime's dead-letter sink).
    pub dead_letter_topic: Option<String>,
    /// Replication factor of a created changelog topic. Default (`None`): min(3, the
    /// brokers in the cluster's metadata). An existing topic with fewer replicas is
    /// logged as a warning.
    pub replication_factor: Option<i32>,
    /// `min.insync.replicas` of a created changelog topic: how many replicas must have
    /// a write before a commit succeeds. Default (`None`): the replication factor - 1,
    /// at least 1 (with 3 replicas, one broker may be lost without losing a commit or
    /// stopping commits).
    pub min_insync_replicas: Option<i32>,
    /// Create the changelog topic if it is missing (admin API). Set it to false where
    /// topics are provisioned elsewhere (no admin rights); the topic is then only
    /// checked. Default: true.
    pub create_topic: bool,
    /// How long Kafka calls may block (init, commit, abort, restore reads). Default: 30 s.
    pub timeout: Duration,
    /// Cluster mode: the internal topic (one partition per runtime partition) that
    /// carries messages to partitions owned by other instances, in the transaction.
    /// Default: none (one instance owns every partition).
    pub internal_topic: Option<String>,
    /// The transactional producer's `transaction.timeout.ms`: how long the broker lets
    /// a transaction stay open before aborting it. A killed instance's open transaction
    /// holds back `read_committed` readers of its topics this long (unless the instance
    /// restarts first). Default: 60 s.
    pub transaction_timeout: Duration,
    /// Further librdkafka properties for every client the changelog creates (the
    /// transactional producer, the restore readers, the admin client):
    /// `security.protocol`, `ssl.*`, `sasl.*`, `client.id`, tuning such as `linger.ms`
    /// (default 1) or `message.max.bytes`. Those the runtime owns (`transactional.id`,
    /// `isolation.level`, ...) are refused at [`KafkaChangelog::connect`]
    /// ([`reserved_property`](crate::reserved_property)). Secret values are redacted in
    /// `Debug`. Default: none.
    pub properties: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaChangelogConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaChangelogConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .field("transactional_id", &self.transactional_id)
            .field("egress_topics", &self.egress_topics)
            .field("record_egresses", &self.record_egresses)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("replication_factor", &self.replication_factor)
            .field("min_insync_replicas", &self.min_insync_replicas)
            .field("create_topic", &self.create_topic)
            .field("timeout", &self.timeout)
            .field("internal_topic", &self.internal_topic)
            .field("transaction_timeout", &self.transaction_timeout)
            .field("properties", &crate::client::Redacted(&self.properties))
            .finish()
    }
}

impl KafkaChangelogConfig {
    /// The replication of a created changelog topic, as configured.
    fn replication(&self) -> topics::Replication {
        topics::Replication {
            factor: self.replication_factor,
            min_insync: self.min_insync_replicas,
        }
    }

    /// Adds the librdkafka property `key` (see `properties`).
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> KafkaChangelogConfig {
        self.properties.push((key.into(), value.into()));
        self
    }

    /// A configuration with the defaults above.
    pub fn new(
        bootstrap_servers: impl Into<String>,
        topic: impl Into<String>,
        partitions: u32,
        transactional_id: impl Into<String>,
    ) -> KafkaChangelogConfig {
        KafkaChangelogConfig {
            bootstrap_servers: bootstrap_servers.into(),
            topic: topic.into(),
            partitions,
            transactional_id: transactional_id.into(),
            egress_topics: HashMap::new(),
            record_egresses: HashMap::new(),
            dead_letter_topic: None,
            replication_factor: None,
            min_insync_replicas: None,
            create_topic: true,
            timeout: Duration::from_secs(30),
            internal_topic: None,
            transaction_timeout: Duration::from_secs(60),
            properties: Vec::new(),
        }
    }

    /// Commits the records of egress `egress` to `topic`, in the transaction.
    pub fn egress(mut self, egress: TypeName, topic: impl Into<String>) -> KafkaChangelogConfig {
        self.egress_topics.insert(egress, topic.into());
        self
    }

    /// Commits the StateFun Kafka records of egress `egress` to the topic each names,
    /// one of `topics`, in the transaction (see `record_egresses`).
    pub fn record_egress(
        mut self,
        egress: TypeName,
        topics: impl IntoIterator<Item = impl Into<String>>,
    ) -> KafkaChangelogConfig {
        self.record_egresses
            .insert(egress, topics.into_iter().map(Into::into).collect());
        self
    }
}

/// Collects what the delivery reports of one transaction say.
#[derive(Default)]
struct Deliveries {
    /// Per changelog partition, the highest offset written.
    positions: HashMap<i32, i64>,
    /// The first failed delivery, and where it went.
    error: Option<(KafkaError, String)>,
}

struct Reports {
    topic: String,
    state: Mutex<Deliveries>,
}

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut d = self.state.lock().expect("deliveries lock");
        match result {
            Ok(m) if m.topic() == self.topic => {
                let slot = d.positions.entry(m.partition()).or_insert(m.offset());
                *slot = (*slot).max(m.offset());
            }
            Ok(_) => {}
            Err((e, m)) => {
                d.error
                    .get_or_insert_with(|| (e.clone(), format!("{}/{}", m.topic(), m.partition())));
            }
        }
    }
}

/// The Kafka side of a [`ChangelogBackend`](statefun_runtime::state::ChangelogBackend)
/// (module docs).
pub struct KafkaChangelog {
    config: KafkaChangelogConfig,
    /// Shared with the thread of a bounded `send_offsets_to_transaction`
    /// ([`KafkaChangelog::send_offsets_bounded`]).
    producer: Arc<BaseProducer<Reports>>,
    /// Set when a librdkafka call did not return in time: the producer is unusable, and
    /// every later commit fails permanently (a cluster instance then restarts its
    /// clients).
    stuck: std::sync::atomic::AtomicBool,
    /// Cluster mode: the group membership that fences this instance's transactions.
    group: Mutex<Option<GroupLink>>,
    /// The producer's `message.max.bytes` (configured, else librdkafka's default).
    max_record_bytes: usize,
    /// The reader of restores, kept between them: a cluster instance restores at every
    /// change of its partitions, and creating and destroying its two clients cost about
    /// 100 ms each time. Dropped after a failed restore.
    reader: Mutex<Option<PartitionReader>>,
}

/// The offsets a commit sends with `send_offsets_to_transaction`, the group's metadata,
/// and the same offsets per partition.
type GroupOffsets = (TopicPartitionList, ConsumerGroupMetadata, HashMap<PartitionId, i64>);

/// What a cluster-mode commit sends with `send_offsets_to_transaction`.
pub(crate) struct GroupLink {
    /// The group's current metadata (member id and generation), read at every commit.
    pub(crate) metadata: Box<dyn Fn() -> Option<ConsumerGroupMetadata> + Send + Sync>,
    /// The owned internal-topic partitions and the offset to commit for each: the
    /// position after the last record its runtime partition accepted.
    pub(crate) next: HashMap<PartitionId, i64>,
}

impl std::fmt::Debug for KafkaChangelog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaChangelog")
            .field("topic", &self.config.topic)
            .field("transactional_id", &self.config.transactional_id)
            .finish()
    }
}

/// Maps a Kafka error of a transactional call: fatal errors (a fenced producer, an
/// unrecoverable state) are permanent, the rest transient.
fn state_error(what: &str, e: &KafkaError) -> StateError {
    let fatal = match e {
        KafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    };
    let msg = format!("kafka changelog: {what}: {e}");
    if fatal {
        StateError::Permanent(format!(
            "{msg}. Another instance with the same transactional id may have taken over (this one \
             is fenced), or the producer is in an unrecoverable state: restart the instance"
        ))
    } else {
        StateError::Transient(msg)
    }
}

/// A permanent error: the runtime stops and a restart settles the transaction.
fn permanent(what: &str, e: &KafkaError) -> StateError {
    StateError::Permanent(format!(
        "kafka changelog: {what}: {e}. Restart the instance: `init_transactions` settles the open \
         transaction and the state is restored from the changelog"
    ))
}

/// Delivery errors that no retry cures.
fn is_refused(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        MessageSizeTooLarge
            | InvalidMessage
            | InvalidMessageSize
            | MessageBatchTooLarge
            | InvalidRecord
            | TopicAuthorizationFailed
            | TransactionalIdAuthorizationFailed
            | ClusterAuthorizationFailed
            | UnknownTopicOrPartition
            | PolicyViolation
    )
}

impl KafkaChangelog {
    /// Checks the configuration (a property the runtime owns is an [`Error::Config`])
    /// and that the brokers accept this client (a refused login or an untrusted
    /// certificate is an [`Error::Connect`] within about a second); creates the
    /// changelog topic if it is missing (compacted, one partition per runtime
    /// partition, replicated as configured) or checks an existing one (its partition
    /// count and cleanup policy: an [`Error::Topic`] naming what to change); checks that
    /// the egress topics exist; and initializes the transactional producer, which fences
    /// and aborts the open transaction of an earlier instance with the same
    /// transactional id.
    pub async fn connect(config: KafkaChangelogConfig) -> Result<KafkaChangelog, Error> {
        crate::client::check_properties("KafkaChangelogConfig::properties", &config.properties)
            .map_err(Error::Config)?;
        config
            .replication()
            .check("KafkaChangelogConfig")
            .map_err(Error::Config)?;
        let (bootstrap, properties, timeout) = (
            config.bootstrap_servers.clone(),
            config.properties.clone(),
            config.timeout,
        );
        let cluster = tokio::task::spawn_blocking(move || crate::client::probe(&bootstrap, &properties, timeout))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        KafkaChangelog::connect_checked(config, cluster).await
    }

    /// [`KafkaChangelog::connect`] with the configuration and the connection checked.
    pub(crate) async fn connect_checked(
        config: KafkaChangelogConfig,
        cluster: crate::client::ClusterInfo,
    ) -> Result<KafkaChangelog, Error> {
        let missing = if config.create_topic {
            topics::Missing::Create {
                replication: config.replication(),
                brokers: cluster.brokers,
                owner: "KafkaChangelogConfig",
            }
        } else {
            topics::Missing::Refuse
        };
        let admin = topics::admin(&config.bootstrap_servers, &config.properties)?;
        topics::ensure(
            &admin,
            &topics::OwnTopic {
                name: &config.topic,
                what: "changelog topic",
                partitions: i32::try_from(config.partitions).unwrap_or(i32::MAX),
                cleanup_policy: "compact",
                why: "it keeps the latest value of every key; deleting old records would lose state",
            },
            &missing,
            config.timeout,
        )
        .await?;
        drop(admin);
        let mut cc = crate::client::client_config(&config.bootstrap_servers, &config.properties);
        cc.set_default("linger.ms", "1")
            // A missing egress topic is an error, not a topic created with defaults.
            .set_default("allow.auto.create.topics", "false")
            .set("transactional.id", &config.transactional_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "transaction.timeout.ms",
                config.transaction_timeout.as_millis().to_string(),
            );
        let producer: BaseProducer<Reports> = cc
            .create_with_context(Reports {
                topic: config.topic.clone(),
                state: Mutex::default(),
            })
            .map_err(kafka("cannot create the transactional producer"))?;
        let max_record_bytes = cc
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let changelog = KafkaChangelog {
            config,
            producer: Arc::new(producer),
            stuck: std::sync::atomic::AtomicBool::new(false),
            group: Mutex::new(None),
            max_record_bytes,
            reader: Mutex::new(None),
        };
        changelog.check_topics()?;
        changelog
            .producer
            .init_transactions(changelog.config.timeout)
            .map_err(kafka("cannot initialize transactions"))?;
        Ok(changelog)
    }

    /// The egress and dead-letter topics exist (the changelog topic is checked by
    /// `topics::ensure`).
    fn check_topics(&self) -> Result<(), Error> {
        for topic in self
            .config
            .egress_topics
            .values()
            .chain(self.config.record_egresses.values().flatten())
            .chain(self.config.dead_letter_topic.iter())
        {
            let md = self
                .producer
                .client()
                .fetch_metadata(Some(topic), self.config.timeout)
                .map_err(kafka("cannot read topic metadata"))?;
            let exists = md
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
            if !exists {
                return Err(Error::Topic {
                    topic: topic.clone(),
                    problem: "the egress topic does not exist; create it first".into(),
                });
            }
        }
        Ok(())
    }

    /// Cluster mode: from now on every transaction commits, with
    /// `send_offsets_to_transaction`, the internal-topic offsets of the owned partitions
    /// under the group's current metadata. The broker refuses it from a member whose
    /// generation is over (KIP-447), so an instance that lost its partitions cannot
    /// commit for them; and the next owner, reading the group's offsets with
    /// `isolation.level=read_committed`, waits until an open transaction holding them
    /// has ended before it restores the partitions.
    pub(crate) fn link_group(&self, link: Option<GroupLink>) {
        *self.group.lock().expect("group lock") = link;
    }

    /// The internal-topic offsets the linked group's last successful commit sent (or
    /// that the group had when linked), per partition: the offsets of partitions an
    /// instance keeps through a rebalance.
    pub(crate) fn linked_offsets(&self) -> HashMap<PartitionId, i64> {
        self.group
            .lock()
            .expect("group lock")
            .as_ref()
            .map(|l| l.next.clone())
            .unwrap_or_default()
    }

    /// The internal-topic offsets to commit with `unit`, per owned partition.
    /// Also returns them as a map, which becomes the link's offsets once the
    /// transaction has committed.
    fn group_offsets(&self, unit: &CommitUnit) -> Result<Option<GroupOffsets>, StateError> {
        let guard = self.group.lock().expect("group lock");
        let (Some(link), Some(topic)) = (guard.as_ref(), &self.config.internal_topic) else {
            return Ok(None);
        };
        let mut next = link.next.clone();
        for (p, n) in next.iter_mut() {
            if let Some(accepted) = unit.progress(*p, &format!("{topic}/{}", p.0)) {
                *n = i64::try_from(accepted).unwrap_or(i64::MAX - 1) + 1;
            }
        }
        let metadata = (link.metadata)()
            .ok_or_else(|| StateError::Transient("kafka changelog: no group membership yet".to_owned()))?;
        let mut tpl = TopicPartitionList::new();
        for (p, n) in &next {
            tpl.add_partition_offset(topic, p.0 as i32, Offset::Offset(*n))
                .map_err(|e| state_error("cannot build the offset list", &e))?;
        }
        Ok(Some((tpl, metadata, next)))
    }

    /// `send_offsets_to_transaction`, bounded on this side by the configured timeout.
    /// librdkafka ignores that call's timeout while it looks for the group coordinator,
    /// and blocks for good when the coordinator's broker is gone
    /// (confluentinc/librdkafka#5456 and #5511, open): seen on the three-broker test
    /// when the killed broker led the group, holding a commit and the instance's
    /// shutdown past every deadline. The call runs on a thread of its own; if it has
    /// not returned in time, the commit fails as transient and the changelog is marked
    /// stuck (module docs of `commit`). The thread ends when librdkafka returns.
    fn send_offsets_bounded(
        &self,
        offsets: TopicPartitionList,
        metadata: ConsumerGroupMetadata,
    ) -> Result<(), StateError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let producer = Arc::clone(&self.producer);
        let timeout = self.config.timeout;
        std::thread::Builder::new()
            .name("statefun-txn-offsets".into())
            .spawn(move || {
                let _ = tx.send(producer.send_offsets_to_transaction(&offsets, &metadata, timeout));
            })
            .map_err(|e| StateError::Transient(format!("kafka changelog: cannot start a thread: {e}")))?;
        // librdkafka's own timeout, and a margin for it to report.
        match rx.recv_timeout(timeout + Duration::from_secs(5)) {
            Ok(result) => result.map_err(|e| state_error("cannot add the group's offsets to the transaction", &e)),
            Err(_) => {
                self.stuck.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::error!(
                    timeout = ?timeout,
                    "send_offsets_to_transaction did not return in time (librdkafka#5456: the group \
                     coordinator is unreachable); this producer is abandoned"
                );
                Err(StateError::Transient(format!(
                    "kafka changelog: send_offsets_to_transaction did not return within {timeout:?}"
                )))
            }
        }
    }

    /// Aborts the open transaction. Its records still queued or in flight are purged
    /// first and their delivery reports served: `abort_transaction` waits for every
    /// outstanding record, and with nothing polling this producer it would time out with
    /// records remaining (seen on Apache Kafka when a rebalance made
    /// `send_offsets_to_transaction` fail mid-interval). The records are discarded with
    /// the transaction either way.
    fn abort(&self) -> Result<(), KafkaError> {
        use rdkafka::producer::PurgeConfig;
        self.producer.purge(PurgeConfig::default().queue().inflight());
        let deadline = Instant::now() + self.config.timeout;
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            self.producer.poll(Duration::from_millis(1));
        }
        self.producer.abort_transaction(self.config.timeout)
    }

    /// Queues one record, polling while the producer's queue is full.
    fn send(&self, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), StateError> {
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(permanent("the producer refused a record", &e)),
            }
        }
    }

    /// The StateFun Kafka record of a record egress, if it is one and names one of the
    /// egress's topics.
    fn kafka_record(
        &self,
        egress: &TypeName,
        message: &statefun_sdk::TypedValue,
    ) -> Result<KafkaProducerRecord, String> {
        let topics = self.config.record_egresses.get(egress).ok_or("not a record egress")?;
        let record: KafkaProducerRecord = message.decode().map_err(|e| {
            format!(
                "expected a {} (a StateFun Kafka egress record), got {}: {e}",
                KafkaProducerRecord::TYPE_NAME,
                message.type_name()
            )
        })?;
        if !topics.contains(&record.topic) {
            return Err(format!(
                "the record names topic {:?}, which is not one of the egress's topics {topics:?}",
                record.topic
            ));
        }
        self.fits("the record", record.key.len() + record.value_bytes.len())?;
        Ok(record)
    }

    /// The producer refuses a record above `message.max.bytes`, which would fail the
    /// whole commit again at every retry: what would not fit is refused before it is
    /// written (with room for the record's key, framing and headers).
    fn fits(&self, what: &str, bytes: usize) -> Result<(), String> {
        const ROOM: usize = 1024;
        let max = self.max_record_bytes;
        if bytes + ROOM > max {
            return Err(format!(
                "{what} is {bytes} bytes, more than the producer's message.max.bytes ({max}) allows"
            ));
        }
        Ok(())
    }

    /// Returns the group offsets it sent, if linked to a group.
    fn produce(&self, unit: &CommitUnit) -> Result<Option<HashMap<PartitionId, i64>>, StateError> {
        for (p, changes) in &unit.changes {
            for (key, value) in changes {
                let mut r = BaseRecord::<[u8], [u8]>::to(&self.config.topic)
                    .partition(p.0 as i32)
                    .key(key.as_ref());
                if let Some(v) = value {
                    r = r.payload(v.as_ref());
                }
                self.send(r)?;
            }
        }
        for record in &unit.egress {
            if record.egress == DEAD_LETTERS
                && let Some(topic) = &self.config.dead_letter_topic
            {
                let letter: DeadLetterRecord = record
                    .message
                    .decode()
                    .map_err(|e| StateError::Permanent(format!("a dead letter does not decode: {e}")))?;
                self.send(crate::dead_letter_record(topic, &letter, record))?;
                continue;
            }
            if self.config.record_egresses.contains_key(&record.egress) {
                // Checked before the write (`check_egress`): a record here is valid.
                let r = self
                    .kafka_record(&record.egress, &record.message)
                    .map_err(|e| StateError::Permanent(format!("egress {}: {e}", record.egress)))?;
                self.send(crate::producer_record(&r, record))?;
                continue;
            }
            let topic =
                self.config.egress_topics.get(&record.egress).ok_or_else(|| {
                    StateError::Permanent(format!("no topic configured for egress {}", record.egress))
                })?;
            self.send(crate::egress_record(topic, record))?;
        }
        if !unit.messages.is_empty() {
            let topic = self.config.internal_topic.as_deref().ok_or_else(|| {
                StateError::Permanent(
                    "kafka changelog: messages for partitions owned elsewhere, but no internal topic is configured"
                        .to_owned(),
                )
            })?;
            for (p, message) in &unit.messages {
                self.send(
                    BaseRecord::<[u8], [u8]>::to(topic)
                        .partition(p.0 as i32)
                        .payload(message.as_ref()),
                )?;
            }
        }
        let mut sent = None;
        if let Some((offsets, metadata, next)) = self.group_offsets(unit)? {
            self.send_offsets_bounded(offsets, metadata)?;
            sent = Some(next);
        }
        // Delivery reports with short polls: `commit_transaction` would flush in
        // 100 ms steps (docs/guarantees.md, "Transaction cost").
        let deadline = Instant::now() + self.config.timeout;
        while self.producer.in_flight_count() > 0 {
            if Instant::now() > deadline {
                return Err(StateError::Transient(format!(
                    "kafka changelog: records not acknowledged within {:?}",
                    self.config.timeout
                )));
            }
            self.producer.poll(Duration::from_millis(1));
        }
        match self
            .producer
            .context()
            .state
            .lock()
            .expect("deliveries lock")
            .error
            .take()
        {
            None => Ok(sent),
            // Kafka will never take these: retrying the unit would fail forever.
            Some((e @ KafkaError::MessageProduction(code), to)) if is_refused(code) => {
                Err(permanent(&format!("the broker refused a record for {to}"), &e))
            }
            Some((e, to)) => Err(StateError::Transient(format!(
                "kafka changelog: delivery to {to} failed: {e}"
            ))),
        }
    }
}

impl Changelog for KafkaChangelog {
    fn takes_egress(&self, egress: &TypeName) -> bool {
        self.config.egress_topics.contains_key(egress)
            || self.config.record_egresses.contains_key(egress)
            || (*egress == DEAD_LETTERS && self.config.dead_letter_topic.is_some())
    }

    fn check_egress(&self, egress: &TypeName, message: &statefun_sdk::TypedValue) -> Result<(), String> {
        if *egress == DEAD_LETTERS {
            // Only the runtime writes dead letters there (not through this check).
            return Err(format!("{DEAD_LETTERS} is reserved for the runtime's dead letters"));
        }
        if self.config.record_egresses.contains_key(egress) {
            self.kafka_record(egress, message)?;
            return Ok(());
        }
        self.fits("the record", message.bytes().map_or(0, |b| b.len()))
    }

    fn check_value(&self, _name: &str, value: &[u8]) -> Result<(), String> {
        self.fits("it", value.len())
    }

    /// A transient failure before `commit_transaction` aborts the transaction: nothing
    /// of the unit is visible, and the backend retries it. A failed
    /// `commit_transaction` is retried while librdkafka says it may be; an outcome that
    /// stays unknown, an abort that fails, or a fatal error is permanent: the runtime
    /// stops, and the next start (`init_transactions`, then the restore) settles it.
    /// Retrying the unit in a new transaction then could duplicate its egress.
    fn commit(&self, unit: &CommitUnit) -> Result<Vec<(PartitionId, i64)>, StateError> {
        if self.stuck.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StateError::Permanent(
                "kafka changelog: the producer is stuck in a librdkafka call (see the earlier error); \
                 its clients must be restarted"
                    .to_owned(),
            ));
        }
        *self.producer.context().state.lock().expect("deliveries lock") = Deliveries::default();
        self.producer
            .begin_transaction()
            .map_err(|e| permanent("cannot begin a transaction", &e))?;
        let sent = match self.produce(unit) {
            Ok(sent) => sent,
            // A stuck call leaves nothing to abort with: another transaction API call
            // would conflict with it. Nothing of the transaction is visible; the next
            // producer with this transactional id fences it (or the broker's
            // transaction timeout aborts it).
            Err(e) if self.stuck.load(std::sync::atomic::Ordering::SeqCst) => return Err(e),
            Err(e) => {
                if let Err(abort) = self.abort() {
                    return Err(permanent("cannot abort the failed transaction", &abort));
                }
                return Err(e);
            }
        };
        let mut attempts = 0;
        loop {
            match self.producer.commit_transaction(self.config.timeout) {
                Ok(()) => break,
                Err(KafkaError::Transaction(t)) if t.txn_requires_abort() && !t.is_fatal() => {
                    let e = state_error("the transaction was aborted", &KafkaError::Transaction(t));
                    if let Err(abort) = self.abort() {
                        return Err(permanent("cannot abort the failed transaction", &abort));
                    }
                    return Err(e);
                }
                Err(KafkaError::Transaction(t)) if t.is_retriable() && attempts < 3 => {
                    attempts += 1;
                    tracing::warn!(error = %t, attempts, "commit_transaction failed; retrying it");
                }
                Err(e) => return Err(permanent("cannot commit the transaction; its outcome is unknown", &e)),
            }
        }
        // Committed: these are now the group's offsets (what a kept partition resumes
        // with, `linked_offsets`).
        if let (Some(sent), Some(link)) = (sent, self.group.lock().expect("group lock").as_mut()) {
            for (p, n) in sent {
                if let Some(next) = link.next.get_mut(&p) {
                    *next = n;
                }
            }
        }
        let d = self.producer.context().state.lock().expect("deliveries lock");
        Ok(d.positions.iter().map(|(p, o)| (PartitionId(*p as u32), *o)).collect())
    }

    fn restore(
        &self,
        partition: PartitionId,
        after: Option<i64>,
        apply: &mut dyn FnMut(Vec<RawOp>, i64) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        // A panic in `apply` during an earlier restore leaves the lock poisoned: take the
        // reader over (its next read assigns the partition it reads anew).
        let mut cached = self.reader.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let reader = match cached.as_mut() {
            Some(r) => r,
            None => cached.insert(PartitionReader::new(
                &self.config.bootstrap_servers,
                &self.config.properties,
                format!("{}-restore", self.config.transactional_id),
                &self.config.topic,
                self.config.timeout,
            )?),
        };
        let result = self.restore_with(reader, partition, after, apply);
        if result.is_err() {
            *cached = None;
        }
        result
    }
}

impl KafkaChangelog {
    /// [`Changelog::restore`] with `reader`.
    fn restore_with(
        &self,
        reader: &mut PartitionReader,
        partition: PartitionId,
        after: Option<i64>,
        apply: &mut dyn FnMut(Vec<RawOp>, i64) -> Result<(), StateError>,
    ) -> Result<(), StateError> {
        const CHUNK: usize = 4096;
        let p = partition.0 as i32;
        let high = reader.end(p)?;
        let start = after.map_or(0, |a| a + 1);
        if start > high {
            return Err(StateError::Permanent(format!(
                "kafka changelog: RocksDB is at offset {} of {}/{p}, but the topic ends at {high}: \
                 this state was written with another changelog topic (or the topic was recreated). \
                 Point the instance at its own topic, or start from an empty state directory",
                start - 1,
                self.config.topic
            )));
        }
        let mut chunk = Vec::new();
        let mut last = None;
        reader.read(p, after, high, &mut |key, value, offset| {
            chunk.push(RawOp {
                key: Bytes::copy_from_slice(key),
                value: value.map(Bytes::copy_from_slice),
            });
            last = Some(offset);
            if chunk.len() >= CHUNK {
                apply(std::mem::take(&mut chunk), offset)?;
            }
            Ok(())
        })?;
        if let Some(last) = last
            && !chunk.is_empty()
        {
            apply(chunk, last)?;
        }
        Ok(())
    }
}

/// A reader of the changelog: the base configuration (bootstrap servers and the user's
/// properties), and the properties the reader owns.
fn client(base: &ClientConfig, group: &str, isolation: &str) -> Result<BaseConsumer, StateError> {
    base.clone()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        // A start below the log start (records deleted) must fail, not skip.
        .set("auto.offset.reset", "error")
        .create()
        .map_err(|e| state_error("cannot create the changelog reader", &e))
}

/// Called with (key, value, offset) of each record a [`PartitionReader`] reads.
pub(crate) type OnRecord<'a> = dyn FnMut(&[u8], Option<&[u8]>, i64) -> Result<(), StateError> + 'a;

/// Reads the partitions of a changelog topic, committed records only.
pub(crate) struct PartitionReader {
    /// The bootstrap servers and the user's properties.
    base: ClientConfig,
    group: String,
    topic: String,
    timeout: Duration,
    /// Asks for ends and metadata (read_uncommitted: see [`PartitionReader::end`]).
    meta: BaseConsumer,
    /// Reads the records (read_committed); made at the first read that has any, then
    /// assigned one partition at a time.
    data: Option<BaseConsumer>,
}

impl PartitionReader {
    /// A reader of `topic` with the user's `properties` (checked by the caller).
    pub(crate) fn new(
        bootstrap_servers: &str,
        properties: &[(String, String)],
        group: String,
        topic: &str,
        timeout: Duration,
    ) -> Result<PartitionReader, StateError> {
        let base = crate::client::client_config(bootstrap_servers, properties);
        let meta = client(&base, &group, "read_uncommitted")?;
        Ok(PartitionReader {
            base,
            group,
            topic: topic.to_owned(),
            timeout,
            meta,
            data: None,
        })
    }

    /// How many partitions the topic has; an error if it does not exist.
    pub(crate) fn partitions(&self) -> Result<usize, StateError> {
        let md = self
            .meta
            .fetch_metadata(Some(&self.topic), self.timeout)
            .map_err(|e| state_error("cannot read the changelog's metadata", &e))?;
        md.topics()
            .iter()
            .find(|t| t.name() == self.topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .filter(|n| *n > 0)
            .ok_or_else(|| StateError::Permanent(format!("changelog topic {} does not exist", self.topic)))
    }

    /// The end to read to: the high watermark. A read_committed client's watermark query
    /// returns the last stable offset instead, which stops short of a transaction whose
    /// commit markers are not written yet: reading only to there would silently miss a
    /// committed transaction.
    pub(crate) fn end(&self, partition: i32) -> Result<i64, StateError> {
        // This client is never polled otherwise: drop the events it collected (errors
        // of idle connections) so that they do not pile up in a reader kept for long.
        while self.meta.poll(Duration::ZERO).is_some() {}
        let (_, high) = self
            .meta
            .fetch_watermarks(&self.topic, partition, self.timeout)
            .map_err(|e| state_error("cannot read the changelog's end", &e))?;
        Ok(high)
    }

    /// Calls `on` with (key, value, offset) of every committed keyed record of
    /// `partition` after offset `after` (from the start if `None`) up to `high`.
    pub(crate) fn read(
        &mut self,
        partition: i32,
        after: Option<i64>,
        high: i64,
        on: &mut OnRecord<'_>,
    ) -> Result<(), StateError> {
        let start = after.map_or(0, |a| a + 1);
        if start >= high {
            return Ok(());
        }
        let consumer = match self.data.as_mut() {
            Some(c) => c,
            None => self.data.insert(client(&self.base, &self.group, "read_committed")?),
        };
        // A reader kept between restores collects events while idle (a broker closing
        // an idle connection): they are not about this read.
        while consumer.poll(Duration::ZERO).is_some() {}
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(
            &self.topic,
            partition,
            after.map_or(Offset::Beginning, |a| Offset::Offset(a + 1)),
        )
        .map_err(|e| state_error("cannot assign the changelog partition", &e))?;
        consumer
            .assign(&tpl)
            .map_err(|e| state_error("cannot assign the changelog partition", &e))?;
        let result = read_assigned(consumer, &self.topic, partition, start, high, self.timeout, on);
        // Stop fetching the partition (the client stays for the next read).
        let _ = consumer.assign(&TopicPartitionList::new());
        result
    }
}

/// Reads `partition`, assigned to `consumer` at `start`, up to `high` (see
/// [`PartitionReader::read`]).
fn read_assigned(
    consumer: &BaseConsumer,
    topic: &str,
    partition: i32,
    start: i64,
    high: i64,
    timeout: Duration,
    on: &mut OnRecord<'_>,
) -> Result<(), StateError> {
    let mut stalled_since = Instant::now();
    loop {
        let position = consumer
            .position()
            .ok()
            .and_then(|l| l.find_partition(topic, partition).and_then(|e| e.offset().to_raw()))
            .unwrap_or(start);
        if position >= high {
            return Ok(());
        }
        // Short polls: the read ends when the position passes the last record's
        // commit marker, which no poll returns.
        match consumer.poll(Duration::from_millis(10)) {
            Some(Ok(m)) => {
                stalled_since = Instant::now();
                if let Some(key) = m.key() {
                    on(key, m.payload(), m.offset())?;
                }
            }
            Some(Err(e)) => return Err(state_error("cannot read the changelog", &e)),
            None if stalled_since.elapsed() > timeout => {
                return Err(StateError::Transient(format!(
                    "kafka changelog: reading {topic}/{partition} stalled at offset {position} of {high} for \
                     {timeout:?} (an open transaction of another producer holds it back?)"
                )));
            }
            None => {}
        }
    }
}
