//! Cluster mode: the runtime's partitions spread over several instances, assigned by a
//! Kafka consumer group, exactly once across instances (KIP-447 fencing).
//!
//! Why it exists: one instance is bounded by one machine. Here every instance of an
//! application runs [`KafkaCluster::run`] with the same `application_id`; Kafka's group
//! protocol is the distributed engine, there is no cluster protocol of our own:
//! * **Ownership.** A member of group `application_id` subscribes to the internal topic
//!   `<application_id>-internal` (one partition per runtime partition; eager `range`
//!   assignment with static membership by default, see [`Assignment`]). The internal-topic partitions it is assigned are the runtime
//!   partitions it runs. The member never reads records; it only holds the assignment.
//! * **On assignment** the instance stops its runtime (committing the open interval),
//!   reads the group's offsets of the new partitions with `isolation.level=read_committed`
//!   (which waits until a transaction of the previous owner that holds them has ended;
//!   partitions it kept use the offsets its last successful commit sent), restores the
//!   partitions (local RocksDB, then the changelog tail; or the whole changelog) and
//!   starts a runtime over everything it owns.
//! * **On revocation** (inside the group's rebalance callback, before the partitions can
//!   go to anyone else) it stops the runtime, which commits the open interval, and only
//!   then lets the rebalance continue.
//! * **Messages** for a partition owned elsewhere go, in the sender's transaction, to
//!   the internal topic's partition; its owner reads it (read_committed) as an ingress
//!   whose progress is stored with the state, so each is accepted exactly once.
//! * **Ingress topics** are read by the owner of runtime partition
//!   `source partition % partitions`, which accepts the records and stores the progress
//!   through them; records for addresses owned elsewhere are forwarded as messages.
//! * **Fencing.** Each transaction also commits the internal-topic offsets of the owned
//!   partitions with the group's metadata (`send_offsets_to_transaction`). The broker
//!   refuses it from a member whose generation is over, so an instance that lost its
//!   partitions (a zombie) cannot commit for them. A restarted instance with the same
//!   `instance_id` (transactional id) also fences its previous process.
//! * **Start.** The configuration is checked first (properties the runtime owns,
//!   replication; `ClusterError::Config`), then the connection: a login the brokers
//!   refuse or a certificate the client does not trust fails the start within about a
//!   second, naming the listener. The internal and changelog topics are created
//!   (replication factor min(3, brokers), `min.insync.replicas` one less, unless
//!   configured) or, when they exist, checked: partition count and cleanup policy
//!   (`delete` and `compact`). Every client gets the user's `client_properties`.
//! * **Static membership** (default): the member's `group.instance.id` is
//!   `<application_id>-<instance_id>`, so an instance restarted after a crash gets its
//!   partitions back without a rebalance. Such a member never leaves the group by
//!   itself: the partitions of an instance stopped for good move after
//!   `session_timeout` (`KafkaClusterConfig::static_membership`).
//!
//! A rebalance restarts the instance's runtime over its new partition set: partitions it
//! keeps continue from local RocksDB with an empty changelog tail, after a pause that
//! [`ClusterReport::pauses`] records (about 0.5 s on Apache Kafka). Only instances
//! whose set changes restart. Kafka Streams moves single tasks instead; doing the same
//! here (starting and stopping partition tasks in a running runtime) is future work.
//! See `docs/kafka.md`, "Cluster mode".
//!
//! Status: proven on Apache Kafka (`crash-test/tests/cluster.rs`, `broker_faults.rs`):
//! instances joining and leaving, SIGKILLs with and without restart, a frozen zombie,
//! restart in place, a broker lost or away; state and egress stay exactly-once.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, Message};
use statefun_runtime::ingress::{
    Error as IngressError, Ingress, IngressRecord, IngressSink, RouteError, Routed, Router,
};
use statefun_runtime::state::{ChangelogBackend, RocksDbBackend, RocksDbOptions};
use statefun_runtime::{MessageRouter, PartitionId, RunReport, Runtime, RuntimeBuilder, RuntimeConfig};
use statefun_sdk::TypeName;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::changelog::GroupLink;
use crate::client::ConfigExt as _;
use crate::{KafkaChangelog, KafkaChangelogConfig, StartPosition};

/// Configuration of one instance of a cluster ([`KafkaCluster::run`]).
#[derive(Clone)]
#[non_exhaustive]
pub struct KafkaClusterConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// The application: the consumer group, and the prefix of its topics
    /// (`<application_id>-internal`, `<application_id>-changelog`). The same on every
    /// instance.
    pub application_id: String,
    /// This instance: stable across its restarts, different from every other instance
    /// (its transactional id is `<application_id>-<instance_id>`).
    pub instance_id: String,
    /// The runtime's partition count: the same on every instance, fixed for the life of
    /// the application's state.
    pub partitions: u32,
    /// Where this instance keeps its RocksDB (a materialized copy of the changelog).
    pub state_dir: PathBuf,
    /// RocksDB options.
    pub rocksdb: RocksDbOptions,
    /// How often state, messages and egress are committed. Default: 100 ms.
    pub commit_interval: Duration,
    /// Writes waiting for a commit (while the broker is away) above which the instance
    /// takes no more input. Default: 256 MiB.
    pub max_pending_bytes: usize,
    /// Ingress topics and their routers. A topic's partition `j` is read by the owner of
    /// runtime partition `j % partitions`; key the topic by function id with as many
    /// partitions as the runtime has, and records need no forwarding.
    pub ingress: Vec<(String, Arc<dyn Router>)>,
    /// Where an ingress topic starts when nothing was accepted from it yet. Default:
    /// earliest.
    pub start: StartPosition,
    /// Egress ids committed in the transaction, and their topics (which must exist).
    pub egress_topics: HashMap<TypeName, String>,
    /// Egress ids whose records are StateFun Kafka records naming their topic (one of
    /// the given topics, which must exist), committed in the transaction (see
    /// `KafkaChangelogConfig::record_egresses`).
    pub record_egresses: HashMap<TypeName, std::collections::BTreeSet<String>>,
    /// Where the dead letters of messages go, in the transaction (see
    /// `KafkaChangelogConfig::dead_letter_topic`). Default: none.
    pub dead_letter_topic: Option<String>,
    /// How long a silent instance keeps its partitions (`session.timeout.ms`). Default:
    /// 10 s.
    pub session_timeout: Duration,
    /// How long a rebalance waits for members to rejoin (`max.poll.interval.ms`; the
    /// member polls continuously, so only a revocation's final commit counts against
    /// it). Default: 60 s.
    pub rebalance_timeout: Duration,
    /// How partitions are assigned. Default: [`Assignment::Eager`] (see
    /// [`Assignment::Cooperative`] for why not cooperative with static membership).
    pub assignment: Assignment,
    /// How long Kafka calls may block. Default: 30 s.
    pub timeout: Duration,
    /// Replication factor of the topics it creates (the changelog and internal topics).
    /// Default (`None`): min(3, the brokers in the cluster's metadata at the start). An
    /// existing topic with fewer replicas is logged as a warning.
    pub replication_factor: Option<i32>,
    /// `min.insync.replicas` of the topics it creates: how many replicas must have a
    /// write before a commit succeeds. Default (`None`): the replication factor - 1, at
    /// least 1 (with 3 replicas, one broker may be lost without losing a commit or
    /// stopping commits).
    pub min_insync_replicas: Option<i32>,
    /// Static group membership: the group member's `group.instance.id` is
    /// `<application_id>-<instance_id>`, so an instance restarted after a crash (a
    /// SIGKILL, an OOM kill, a node restart) with the same `instance_id` gets its
    /// partitions back at once, without a rebalance, instead of waiting out
    /// `session_timeout` for the group to expire the old member.
    ///
    /// The trade-off: a static member never leaves the group by itself (KIP-345;
    /// librdkafka sends no LeaveGroup for it, on unsubscribe or close), so the
    /// partitions of an instance stopped gracefully (the shutdown token) stay with it
    /// until `session_timeout` passes, then move to the others. Without static
    /// membership a graceful stop hands them over at the others' next heartbeat
    /// (`session_timeout` / 4), but an instance restarted after a crash waits out
    /// `session_timeout` and rebalances the whole group. Keep it on for rolling
    /// restarts and crash recovery; turn it off (or shorten `session_timeout`) where
    /// instances are often stopped for good (scaling in). Two running instances must
    /// never share an `instance_id`: the broker fences the older member. Measured on
    /// Apache Kafka 4.1 (`statefun-kafka/tests/production_config.rs`): a graceful stop
    /// handed the partitions over after 10.9 s with a 10 s session, 8.2 s without
    /// static membership and a 30 s session. Default: true.
    pub static_membership: bool,
    /// `transaction.timeout.ms` of the instance's transactional producer. A killed
    /// instance's open transaction holds back the next owner of its partitions (and
    /// read_committed readers of its topics) this long, unless it restarts first. Kafka
    /// Streams uses 10 s as well. Default: 10 s.
    pub transaction_timeout: Duration,
    /// librdkafka properties for every Kafka client the instance creates: the
    /// transactional producer, the restore readers, the group member, the ingress
    /// consumers, the admin client. For a secured cluster: `security.protocol`,
    /// `ssl.ca.location`, `sasl.mechanisms`, `sasl.username`, `sasl.password`, ...; also
    /// `client.id` and tuning. Properties the runtime owns (`transactional.id`,
    /// `isolation.level`, `group.id`, `session.timeout.ms`, ...) are refused at
    /// [`KafkaCluster::run`] with the reason and the field to use instead
    /// ([`reserved_property`](crate::reserved_property)). Give the same properties to the
    /// application's other clients ([`KafkaDeadLetters::with_properties`](crate::KafkaDeadLetters::with_properties),
    /// [`ChangelogSnapshot::read_with`](crate::ChangelogSnapshot::read_with)). Secret
    /// values are redacted in `Debug`. Default: none.
    pub client_properties: Vec<(String, String)>,
    /// Runtime configuration; `partitions` is set from this config.
    pub runtime: RuntimeConfig,
}

impl std::fmt::Debug for KafkaClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaClusterConfig")
            .field("application_id", &self.application_id)
            .field("instance_id", &self.instance_id)
            .field("partitions", &self.partitions)
            .field("state_dir", &self.state_dir)
            .field("replication_factor", &self.replication_factor)
            .field("min_insync_replicas", &self.min_insync_replicas)
            .field("static_membership", &self.static_membership)
            .field("client_properties", &crate::client::Redacted(&self.client_properties))
            .finish_non_exhaustive()
    }
}

impl KafkaClusterConfig {
    /// A configuration with the defaults above.
    pub fn new(
        bootstrap_servers: impl Into<String>,
        application_id: impl Into<String>,
        instance_id: impl Into<String>,
        partitions: u32,
        state_dir: impl Into<PathBuf>,
    ) -> KafkaClusterConfig {
        KafkaClusterConfig {
            bootstrap_servers: bootstrap_servers.into(),
            application_id: application_id.into(),
            instance_id: instance_id.into(),
            partitions,
            state_dir: state_dir.into(),
            rocksdb: RocksDbOptions::default(),
            commit_interval: Duration::from_millis(100),
            max_pending_bytes: statefun_runtime::state::changelog::DEFAULT_MAX_PENDING_BYTES,
            ingress: Vec::new(),
            start: StartPosition::Earliest,
            egress_topics: HashMap::new(),
            record_egresses: HashMap::new(),
            dead_letter_topic: None,
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(60),
            assignment: Assignment::Eager,
            timeout: Duration::from_secs(30),
            replication_factor: None,
            min_insync_replicas: None,
            static_membership: true,
            transaction_timeout: Duration::from_secs(10),
            client_properties: Vec::new(),
            runtime: RuntimeConfig::default(),
        }
    }

    /// Adds the librdkafka property `key` for every client (see `client_properties`).
    pub fn client_property(mut self, key: impl Into<String>, value: impl Into<String>) -> KafkaClusterConfig {
        self.client_properties.push((key.into(), value.into()));
        self
    }

    /// Reads `topic`, routing its records with `router`.
    pub fn ingress(mut self, topic: impl Into<String>, router: impl Router) -> KafkaClusterConfig {
        self.ingress.push((topic.into(), Arc::new(router)));
        self
    }

    /// Commits the records of egress `egress` to `topic`, in the transaction.
    pub fn egress(mut self, egress: TypeName, topic: impl Into<String>) -> KafkaClusterConfig {
        self.egress_topics.insert(egress, topic.into());
        self
    }

    /// Commits the StateFun Kafka records of egress `egress` (what remote functions
    /// write) to the topic each names, one of `topics`, in the transaction.
    pub fn record_egress(
        mut self,
        egress: TypeName,
        topics: impl IntoIterator<Item = impl Into<String>>,
    ) -> KafkaClusterConfig {
        self.record_egresses
            .insert(egress, topics.into_iter().map(Into::into).collect());
        self
    }

    /// This instance's transactional id, and its `group.instance.id` with static
    /// membership: `<application_id>-<instance_id>`.
    fn instance_name(&self) -> String {
        format!("{}-{}", self.application_id, self.instance_id)
    }

    /// Checks what can be checked without a broker (module docs).
    fn check(&self) -> Result<(), ClusterError> {
        crate::client::check_properties("KafkaClusterConfig::client_properties", &self.client_properties)
            .map_err(ClusterError::Config)?;
        self.replication()
            .check("KafkaClusterConfig")
            .map_err(ClusterError::Config)?;
        for (field, value) in [
            ("application_id", &self.application_id),
            ("instance_id", &self.instance_id),
        ] {
            if value.trim().is_empty() {
                return Err(ClusterError::Config(format!("KafkaClusterConfig::{field} is empty")));
            }
        }
        if self.partitions == 0 || i32::try_from(self.partitions).is_err() {
            return Err(ClusterError::Config(format!(
                "KafkaClusterConfig::partitions is {}: it must be between 1 and {}",
                self.partitions,
                i32::MAX
            )));
        }
        if self.static_membership && self.assignment == Assignment::Cooperative {
            return Err(ClusterError::Config(
                "KafkaClusterConfig::assignment is Cooperative with static_membership on: a static \
                 member killed during a cooperative handover and restarted gets its old assignment \
                 back without a rebalance, leaving the partitions it was giving up without an owner. \
                 Use Assignment::Eager (the default) with static membership, or set \
                 static_membership to false for cooperative assignment"
                    .to_owned(),
            ));
        }
        if let Assignment::Fixed(parts) = &self.assignment
            && let Some(p) = parts.iter().find(|p| p.0 >= self.partitions)
        {
            return Err(ClusterError::Config(format!(
                "fixed assignment names partition {p}, but there are {} partitions",
                self.partitions
            )));
        }
        Ok(())
    }

    /// The replication of the topics it creates, as configured.
    fn replication(&self) -> crate::topics::Replication {
        crate::topics::Replication {
            factor: self.replication_factor,
            min_insync: self.min_insync_replicas,
        }
    }

    /// The internal topic.
    pub fn internal_topic(&self) -> String {
        format!("{}-internal", self.application_id)
    }

    /// The changelog topic.
    pub fn changelog_topic(&self) -> String {
        KafkaClusterConfig::changelog_topic_of(&self.application_id)
    }

    /// The changelog topic of application `application_id` (for readers of its state,
    /// such as [`ChangelogSnapshot`](crate::ChangelogSnapshot)).
    pub fn changelog_topic_of(application_id: &str) -> String {
        format!("{application_id}-changelog")
    }
}

/// How an instance gets its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Assignment {
    /// The consumer group, `cooperative-sticky`: a rebalance moves only the partitions
    /// that change owner, in two rounds (give up, then hand over).
    ///
    /// Refused with static membership (`KafkaClusterConfig::static_membership`): an
    /// instance killed between the two rounds and restarted within its session timeout
    /// rejoins as the same static member while the group is stable, so the broker hands
    /// it its stored assignment without a rebalance, and the partitions it was giving up
    /// are left without an owner until the membership changes again (seen on Apache
    /// Kafka 4.1 with the classic group protocol, in the retail application's SIGKILL
    /// test). Use it with dynamic membership.
    Cooperative,
    /// The consumer group, eager `range` assignment: every rebalance revokes and
    /// reassigns all partitions (the default). A rebalance pauses every partition of the
    /// instances it changes, but no assignment is ever half done.
    #[default]
    Eager,
    /// No group: this instance owns exactly these partitions, for deployments that
    /// shard by hand (a fixed set of instances, each configured with its partitions).
    /// Nothing moves when an instance stops; it must be restarted. Two instances
    /// configured with one partition are **not** fenced from each other (only a
    /// restart of the same instance fences its previous process): the configuration
    /// must give every partition to exactly one instance.
    Fixed(Vec<PartitionId>),
}

/// Why an instance stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// A Kafka client could not be set up.
    #[error(transparent)]
    Kafka(#[from] crate::Error),
    /// The runtime failed (a permanent commit error, a state error).
    #[error(transparent)]
    Runtime(#[from] statefun_runtime::Error),
    /// The state could not be opened or restored.
    #[error("cannot open the state of partitions {partitions:?}: {source}")]
    State {
        /// The partitions being opened.
        partitions: Vec<PartitionId>,
        /// The backend's error.
        #[source]
        source: statefun_runtime::state::Error,
    },
    /// The configuration is invalid.
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    /// The group membership ended (the consumer thread stopped).
    #[error("the group membership ended: {0}")]
    Membership(String),
}

impl ClusterError {
    /// Whether restarting the instance's clients and restoring its partitions may cure
    /// it (see [`KafkaCluster::run`]): a failed commit (the changelog's transactional
    /// producer left unusable), the broker away at start. Not a configuration error, a
    /// refused topic or login, nor a local state error (a disk that refuses writes, a
    /// state directory another process holds): those end the instance with the error.
    fn cured_by_restart(&self) -> bool {
        match self {
            ClusterError::Kafka(e) => e.is_retriable(),
            ClusterError::Runtime(statefun_runtime::Error::Commit(_)) => true,
            _ => false,
        }
    }

    /// Whether trying again later may succeed (the broker, or an open transaction of a
    /// previous owner, held it up).
    fn is_transient(&self) -> bool {
        use statefun_runtime::state::Error as StateError;
        match self {
            ClusterError::Kafka(e) => e.is_retriable(),
            ClusterError::State { source, .. } => matches!(source, StateError::Transient(_)),
            ClusterError::Runtime(statefun_runtime::Error::State { source, .. }) => {
                matches!(source, StateError::Transient(_))
            }
            _ => false,
        }
    }
}

/// What a finished instance reports.
#[derive(Debug, Clone, Default)]
pub struct ClusterReport {
    /// How many times the runtime was started (once per change of the partition set).
    pub generations: u64,
    /// The report of each runtime run, in order.
    pub runs: Vec<RunReport>,
    /// For each change of the partition set that kept some of this instance's
    /// partitions, how long they did not run: from the change (an assignment or a
    /// revocation) until the runtime over the new set started, which covers stopping
    /// the runtime, the final commit, reading the group's offsets and restoring the new
    /// partitions. The cost of restarting the runtime at a rebalance (module docs).
    pub pauses: Vec<Duration>,
    /// How many times the instance restarted its Kafka clients and restored its
    /// partitions after a failure a restart cures (a transaction the broker aborted
    /// while the instance was cut off or frozen, a producer fenced by that abort, a
    /// commit whose outcome stayed unknown): see [`KafkaCluster::run`].
    pub restarts: u64,
}

enum Event {
    Assigned(Vec<PartitionId>),
    /// Revoked partitions; the rebalance waits for the reply.
    Revoked(Vec<PartitionId>, std_mpsc::SyncSender<()>),
}

/// The group member's callbacks: they hand assignment changes to the instance and wait
/// for revocations to be committed.
struct Member {
    events: mpsc::UnboundedSender<Event>,
    topic: String,
    /// How long a revocation may take before the rebalance goes on without it.
    revoke_timeout: Duration,
}

impl ClientContext for Member {}

fn partitions_of(tpl: &TopicPartitionList, topic: &str) -> Vec<PartitionId> {
    tpl.elements_for_topic(topic)
        .iter()
        .map(|e| PartitionId(e.partition() as u32))
        .collect()
}

impl ConsumerContext for Member {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts = partitions_of(tpl, &self.topic);
                if parts.is_empty() {
                    return;
                }
                let (tx, rx) = std_mpsc::sync_channel(1);
                if self.events.send(Event::Revoked(parts.clone(), tx)).is_ok() {
                    match rx.recv_timeout(self.revoke_timeout) {
                        Ok(()) => {}
                        Err(std_mpsc::RecvTimeoutError::Timeout) => {
                            tracing::error!(partitions = ?parts, "revoked partitions were not released in time")
                        }
                        // The instance's runtime failed and its clients are restarting
                        // (`KafkaCluster::run`): nothing of the revoked partitions was
                        // committed since, so their next owner restores them as they are.
                        Err(std_mpsc::RecvTimeoutError::Disconnected) => tracing::warn!(
                            partitions = ?parts,
                            "revoked partitions released by a failed runtime, without a final commit"
                        ),
                    }
                }
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "group rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // The member only holds the assignment; the records are read elsewhere.
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error = %e, "cannot pause the membership consumer");
            }
            let parts = partitions_of(tpl, &self.topic);
            if !parts.is_empty() {
                let _ = self.events.send(Event::Assigned(parts));
            }
        }
    }
}

/// One instance of a cluster (module docs).
#[derive(Debug)]
pub struct KafkaCluster;

impl KafkaCluster {
    /// Runs this instance until `shutdown` is cancelled: joins the group, and runs a
    /// runtime over the partitions it is assigned, rebuilt at every change of the
    /// assignment. `configure` adds what every runtime of this instance gets (the module,
    /// dead letters, ...); the state backend and the ingresses come from `config`.
    ///
    /// A failure that a restart of the instance cures does not end it: when the
    /// changelog's transactional producer is left unusable (the broker aborted the open
    /// transaction while the instance was frozen or cut off from it for longer than
    /// `transaction_timeout`, which fences the producer; an abort or a commit whose
    /// outcome stays unknown), the instance drops its runtime, clients and group
    /// membership, and starts them again after a backoff (1 s, doubling to 30 s), as a
    /// process restart would: `init_transactions` settles the open transaction and the
    /// partitions are restored from local RocksDB and the changelog. With static
    /// membership it gets its partitions back at once. [`ClusterReport::restarts`]
    /// counts these. Configuration errors, refused topics and local state errors end it.
    pub async fn run(
        config: KafkaClusterConfig,
        configure: impl Fn(RuntimeBuilder) -> RuntimeBuilder,
        shutdown: CancellationToken,
    ) -> Result<ClusterReport, ClusterError> {
        config.check()?;
        let mut report = ClusterReport::default();
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = std::time::Instant::now();
            match KafkaCluster::run_once(&config, &configure, shutdown.clone(), &mut report).await {
                Ok(()) => return Ok(report),
                Err(e) if e.cured_by_restart() && !shutdown.is_cancelled() => {
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_secs(1);
                    }
                    report.restarts += 1;
                    tracing::warn!(
                        error = %e,
                        retry_in = ?backoff,
                        "the instance failed; restarting its Kafka clients and restoring its partitions"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(report),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One life of the instance's clients: connect, join, and run partitions until
    /// `shutdown` or a failure. Adds to `report`.
    async fn run_once(
        config: &KafkaClusterConfig,
        configure: &impl Fn(RuntimeBuilder) -> RuntimeBuilder,
        shutdown: CancellationToken,
        report: &mut ClusterReport,
    ) -> Result<(), ClusterError> {
        let config = config.clone();
        let cluster = {
            let (bootstrap, properties, timeout) = (
                config.bootstrap_servers.clone(),
                config.client_properties.clone(),
                config.timeout,
            );
            tokio::task::spawn_blocking(move || crate::client::probe(&bootstrap, &properties, timeout))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?
        };
        let internal = config.internal_topic();
        {
            let admin = crate::topics::admin(&config.bootstrap_servers, &config.client_properties)?;
            crate::topics::ensure(
                &admin,
                &crate::topics::OwnTopic {
                    name: &internal,
                    what: "internal topic",
                    partitions: config.partitions as i32,
                    cleanup_policy: "delete",
                    why: "it carries messages without keys, which a compacted topic refuses",
                },
                &crate::topics::Missing::Create {
                    replication: config.replication(),
                    brokers: cluster.brokers,
                    owner: "KafkaClusterConfig",
                },
                config.timeout,
            )
            .await?;
        }
        let mut changelog_config = KafkaChangelogConfig::new(
            &config.bootstrap_servers,
            config.changelog_topic(),
            config.partitions,
            config.instance_name(),
        );
        changelog_config.egress_topics = config.egress_topics.clone();
        changelog_config.record_egresses = config.record_egresses.clone();
        changelog_config.dead_letter_topic = config.dead_letter_topic.clone();
        changelog_config.replication_factor = config.replication_factor;
        changelog_config.min_insync_replicas = config.min_insync_replicas;
        changelog_config.timeout = config.timeout;
        changelog_config.internal_topic = Some(internal.clone());
        changelog_config.transaction_timeout = config.transaction_timeout;
        changelog_config.properties = config.client_properties.clone();
        let changelog = Arc::new(KafkaChangelog::connect_checked(changelog_config, cluster).await?);

        let (events_tx, mut events) = mpsc::unbounded_channel();
        let strategy = match &config.assignment {
            Assignment::Cooperative => "cooperative-sticky",
            Assignment::Eager => "range",
            Assignment::Fixed(parts) => {
                let _ = events_tx.send(Event::Assigned(parts.clone()));
                let result = drive(&config, &changelog, None, &mut events, configure, shutdown, report).await;
                drop(events_tx);
                return result;
            }
        };
        let member: Arc<BaseConsumer<Member>> = Arc::new(
            member_config(&config, strategy)
                .create_with_context(Member {
                    events: events_tx,
                    topic: internal.clone(),
                    revoke_timeout: config.timeout * 2,
                })
                .map_err(crate::kafka("cannot create the group member"))?,
        );
        member
            .subscribe(&[&internal])
            .map_err(crate::kafka("cannot join the group"))?;
        let stop_member = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poller = {
            let member = Arc::clone(&member);
            let stop = Arc::clone(&stop_member);
            std::thread::Builder::new()
                .name("statefun-group".into())
                .spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Some(Err(e)) = member.poll(Duration::from_millis(50)) {
                            tracing::warn!(error = %e, "group member error");
                        }
                    }
                })
                .map_err(|e| ClusterError::Membership(e.to_string()))?
        };

        let result = drive(
            &config,
            &changelog,
            Some(&member),
            &mut events,
            configure,
            shutdown,
            report,
        )
        .await;
        // Leave the group without blocking on our own revocation callback.
        changelog.link_group(None);
        drop(events);
        stop_member.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = tokio::task::spawn_blocking(move || {
            let _ = poller.join();
            member.unsubscribe();
            drop(member);
        })
        .await;
        result
    }
}

/// The group member's configuration: the user's properties, then what the member owns
/// (module docs): the group, the assignment strategy, the timeouts, no offset commits of
/// its own, `read_committed` offsets, and with static membership its
/// `group.instance.id`.
fn member_config(config: &KafkaClusterConfig, strategy: &str) -> ClientConfig {
    let mut cc = crate::client::client_config(&config.bootstrap_servers, &config.client_properties);
    cc.set_default(
        "heartbeat.interval.ms",
        (config.session_timeout.as_millis() / 4).max(100).to_string(),
    )
    .set("group.id", &config.application_id)
    .set("partition.assignment.strategy", strategy)
    .set("session.timeout.ms", config.session_timeout.as_millis().to_string())
    .set("max.poll.interval.ms", config.rebalance_timeout.as_millis().to_string())
    .set("enable.auto.commit", "false")
    // Offsets are read with require_stable: a transaction still holding them must end
    // first (module docs).
    .set("isolation.level", "read_committed");
    if config.static_membership {
        cc.set("group.instance.id", config.instance_name());
    }
    cc
}

/// Rebuilds and runs the runtime at every assignment change (module docs).
async fn drive(
    config: &KafkaClusterConfig,
    changelog: &Arc<KafkaChangelog>,
    member: Option<&Arc<BaseConsumer<Member>>>,
    events: &mut mpsc::UnboundedReceiver<Event>,
    configure: &impl Fn(RuntimeBuilder) -> RuntimeBuilder,
    shutdown: CancellationToken,
    report: &mut ClusterReport,
) -> Result<(), ClusterError> {
    let internal = config.internal_topic();
    let mut owned: BTreeSet<PartitionId> = BTreeSet::new();
    let mut pending_acks: Vec<std_mpsc::SyncSender<()>> = Vec::new();
    // The partitions of the last runtime, those revoked since it started, and when a
    // change stopped it.
    let mut last_run: BTreeSet<PartitionId> = BTreeSet::new();
    let mut revoked: BTreeSet<PartitionId> = BTreeSet::new();
    // The instance's RocksDB, opened once: every runtime of the instance shares it.
    let mut rocks: Option<RocksDbBackend> = None;
    let mut stopped_at: Option<std::time::Instant> = None;
    loop {
        // Apply every change that is already queued, then release revoked partitions
        // (the runtime that held them has stopped and committed).
        while let Ok(e) = events.try_recv() {
            apply(&mut owned, &mut revoked, e, &mut pending_acks);
        }
        for ack in pending_acks.drain(..) {
            let _ = ack.send(());
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if owned.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                e = events.recv() => match e {
                    Some(e) => apply(&mut owned, &mut revoked, e, &mut pending_acks),
                    None => return Err(ClusterError::Membership("the group member stopped".into())),
                },
            }
            continue;
        }
        let parts: Vec<PartitionId> = owned.iter().copied().collect();
        // Partitions this instance kept through the change (never revoked): their
        // offsets are those the last runtime committed, so only the new partitions'
        // offsets are read. That read waits for the rebalance to complete; the kept
        // partitions need not.
        let kept: BTreeSet<PartitionId> = parts
            .iter()
            .copied()
            .filter(|p| last_run.contains(p) && !revoked.contains(p))
            .collect();
        // Reading the group's offsets and restoring state block (Kafka reads, RocksDB):
        // off the async workers.
        let prepared = {
            let (c, log, m, ps, topic, db) = (
                config.clone(),
                Arc::clone(changelog),
                member.cloned(),
                parts.clone(),
                internal.clone(),
                rocks.clone(),
            );
            tokio::task::spawn_blocking(move || {
                if let Some(m) = m {
                    let mut next = log.linked_offsets();
                    next.retain(|p, _| kept.contains(p));
                    let new: Vec<PartitionId> = ps.iter().copied().filter(|p| !next.contains_key(p)).collect();
                    if !new.is_empty() {
                        next.extend(stable_offsets(&m, &topic, &new, c.timeout)?);
                    }
                    log.link_group(Some(GroupLink {
                        metadata: Box::new(move || m.group_metadata()),
                        next,
                    }));
                }
                restore(&c, &log, &ps, db)
            })
            .await
            .map_err(|e| ClusterError::Membership(format!("the restore task panicked: {e}")))
            .and_then(|r| r)
            .and_then(|(db, backend)| {
                rocks = Some(db);
                build(config, backend, configure)
            })
        };
        let runtime = match prepared {
            Ok(r) => r,
            // The previous owner's transaction is still open (its offsets are not
            // stable, or the changelog's end is held back) or the broker is away: try
            // again, with whatever the group has assigned meanwhile.
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, partitions = ?parts, "cannot start the partitions yet; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        report.generations += 1;
        if let Some(at) = stopped_at.take()
            && parts.iter().any(|p| last_run.contains(p))
        {
            report.pauses.push(at.elapsed());
        }
        last_run = owned.clone();
        revoked.clear();
        tracing::info!(instance = %config.instance_id, partitions = ?parts, "running partitions");
        let stop = CancellationToken::new();
        let run = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
        tokio::pin!(run);
        let finished = tokio::select! {
            _ = shutdown.cancelled() => None,
            e = events.recv() => match e {
                Some(e) => {
                    stopped_at = Some(std::time::Instant::now());
                    apply(&mut owned, &mut revoked, e, &mut pending_acks);
                    None
                }
                None => return Err(ClusterError::Membership("the group member stopped".into())),
            },
            r = &mut run => Some(r),
        };
        let result = match finished {
            Some(r) => r,
            None => {
                stop.cancel();
                run.await
            }
        };
        match result {
            Ok(Ok(r)) => report.runs.push(r),
            // A commit refused after the partitions were lost (this member's generation
            // is over) is redone by their next owner: nothing to keep here.
            Ok(Err(statefun_runtime::Error::Commit(e @ statefun_runtime::state::Error::Transient(_)))) => {
                tracing::warn!(error = %e, "the final commit failed; the next owner redoes that interval");
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(ClusterError::Membership(format!("the runtime task panicked: {e}"))),
        }
    }
}

fn apply(
    owned: &mut BTreeSet<PartitionId>,
    revoked: &mut BTreeSet<PartitionId>,
    e: Event,
    acks: &mut Vec<std_mpsc::SyncSender<()>>,
) {
    match e {
        Event::Assigned(parts) => owned.extend(parts),
        Event::Revoked(parts, ack) => {
            for p in parts {
                owned.remove(&p);
                revoked.insert(p);
            }
            acks.push(ack);
        }
    }
}

/// The group's committed internal-topic offsets of `parts`, read with require_stable
/// (waits for an open transaction that holds them to end).
fn stable_offsets(
    member: &BaseConsumer<Member>,
    topic: &str,
    parts: &[PartitionId],
    timeout: Duration,
) -> Result<HashMap<PartitionId, i64>, ClusterError> {
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition(topic, p.0 as i32);
    }
    let committed = member
        .committed_offsets(tpl, timeout)
        .map_err(crate::kafka("cannot read the group's offsets"))?;
    Ok(parts
        .iter()
        .map(|p| {
            let o = committed
                .find_partition(topic, p.0 as i32)
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
                .unwrap_or(0);
            (*p, o)
        })
        .collect())
}

/// The state of `parts`, restored (local RocksDB, then the changelog), and the RocksDB
/// database (`db`, or opened here). Blocking.
fn restore(
    config: &KafkaClusterConfig,
    changelog: &Arc<KafkaChangelog>,
    parts: &[PartitionId],
    db: Option<RocksDbBackend>,
) -> Result<(RocksDbBackend, ChangelogBackend), ClusterError> {
    let state_err = |source| ClusterError::State {
        partitions: parts.to_vec(),
        source,
    };
    let rocks = match db {
        Some(db) => db,
        None => RocksDbBackend::open(&config.state_dir, config.rocksdb.clone()).map_err(state_err)?,
    };
    let (backend, restored) = ChangelogBackend::open_owned(
        rocks.clone(),
        Arc::clone(changelog) as Arc<dyn statefun_runtime::state::Changelog>,
        parts.iter().copied(),
        config.commit_interval,
    )
    .map_err(state_err)?;
    backend.set_max_pending_bytes(config.max_pending_bytes);
    tracing::info!(partitions = ?parts, changes = restored.changes, "restored from the changelog");
    Ok((rocks, backend))
}

/// A runtime over the restored `backend`: the internal topic and the ingress topics'
/// partitions its partitions accept as one ingress.
fn build(
    config: &KafkaClusterConfig,
    backend: ChangelogBackend,
    configure: &impl Fn(RuntimeBuilder) -> RuntimeBuilder,
) -> Result<Runtime, ClusterError> {
    let mut routers: HashMap<String, Arc<dyn Router>> =
        config.ingress.iter().map(|(t, r)| (t.clone(), Arc::clone(r))).collect();
    routers.insert(config.internal_topic(), Arc::new(MessageRouter));
    let ingress = OwnedIngress {
        name: format!("{}-ingress", config.application_id),
        config: config.clone(),
    };
    let mut runtime_config = config.runtime.clone();
    runtime_config.partitions = config.partitions;
    Ok(configure(Runtime::builder())
        .config(runtime_config)
        .state_backend(backend)
        .ingress(ingress, TopicRouter(routers))
        .build()?)
}

/// Routes a record with the router of its topic.
struct TopicRouter(HashMap<String, Arc<dyn Router>>);

impl Router for TopicRouter {
    fn route(&self, record: &IngressRecord) -> Result<Routed, RouteError> {
        let topic = record
            .position
            .as_ref()
            .map(|p| &*p.topic)
            .ok_or_else(|| RouteError("record has no source position".into()))?;
        self.0
            .get(topic)
            .ok_or_else(|| RouteError(format!("no router for topic {topic}")))?
            .route(record)
    }
}

/// Reads the internal topic's owned partitions and the ingress topics' partitions this
/// instance accepts, each from the position after the last record its runtime partition
/// accepted (stored with the state, so the group's offsets are not needed).
struct OwnedIngress {
    name: String,
    config: KafkaClusterConfig,
}

impl OwnedIngress {
    fn assignment(&self, consumer: &StreamConsumer, sink: &IngressSink) -> Result<TopicPartitionList, String> {
        let mut tpl = TopicPartitionList::new();
        let internal = self.config.internal_topic();
        let topics = std::iter::once(internal.clone()).chain(self.config.ingress.iter().map(|(t, _)| t.clone()));
        for topic in topics {
            let md = consumer
                .fetch_metadata(Some(&topic), self.config.timeout)
                .map_err(|e| format!("cannot read the metadata of {topic}: {e}"))?;
            let count = md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map_or(0, |t| t.partitions().len());
            if count == 0 {
                return Err(format!("topic {topic} does not exist"));
            }
            for j in 0..count as i32 {
                if !sink.accepts_source_partition(j) {
                    continue;
                }
                let committed = sink
                    .committed_offset(&topic, j)
                    .map_err(|e| format!("cannot read the progress through {topic}/{j}: {e}"))?;
                let offset = match committed {
                    Some(o) => Offset::Offset(o + 1),
                    None if topic == internal => Offset::Beginning,
                    None => match self.config.start {
                        StartPosition::Earliest => Offset::Beginning,
                        StartPosition::Latest => Offset::End,
                    },
                };
                tpl.add_partition_offset(&topic, j, offset)
                    .map_err(|e| format!("cannot assign {topic}/{j}: {e}"))?;
            }
        }
        Ok(tpl)
    }
}

#[async_trait::async_trait]
impl Ingress for OwnedIngress {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(self: Box<Self>, sink: IngressSink, shutdown: CancellationToken) -> Result<(), IngressError> {
        let failed = |reason: String| IngressError::Source {
            ingress: self.name.clone(),
            reason,
        };
        let consumer: StreamConsumer =
            crate::client::client_config(&self.config.bootstrap_servers, &self.config.client_properties)
                .set("group.id", format!("{}-readers", self.config.application_id))
                .set("enable.auto.commit", "false")
                .set("isolation.level", "read_committed")
                .set("auto.offset.reset", "earliest")
                .create()
                .map_err(|e| failed(format!("cannot create the consumer: {e}")))?;
        let tpl = self.assignment(&consumer, &sink).map_err(failed)?;
        consumer
            .assign(&tpl)
            .map_err(|e| failed(format!("cannot assign partitions: {e}")))?;
        let mut topics: HashMap<String, Arc<str>> = HashMap::new();
        loop {
            let m = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = consumer.recv() => m,
            };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(ingress = %self.name, error = %e, "kafka consumer error");
                    continue;
                }
            };
            tracing::trace!(
                topic = m.topic(),
                partition = m.partition(),
                offset = m.offset(),
                "record delivered"
            );
            let record = crate::record_of(&m, &mut topics);
            drop(m);
            if sink.deliver(record).await.is_err() {
                break;
            }
        }
        // Destroying a librdkafka client takes about 100 ms; at a rebalance that would
        // pause the partitions this instance keeps. The consumer has no group
        // membership and commits nothing, so it can go away in the background.
        tokio::task::spawn_blocking(move || drop(consumer));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> KafkaClusterConfig {
        KafkaClusterConfig::new("b:9092", "app", "one", 4, "/tmp/unused")
            .client_property("security.protocol", "SASL_SSL")
            .client_property("heartbeat.interval.ms", "700")
    }

    #[test]
    fn cooperative_assignment_with_static_membership_is_refused_and_eager_is_the_default() {
        let mut c = config();
        assert_eq!(c.assignment, Assignment::Eager);
        assert!(c.static_membership);
        assert!(c.check().is_ok());
        c.assignment = Assignment::Cooperative;
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("Cooperative") && e.contains("static_membership"), "{e}");
        c.static_membership = false;
        assert!(c.check().is_ok(), "cooperative with dynamic membership is fine");
    }

    #[test]
    fn the_member_is_static_by_default_with_the_users_properties_and_owns_its_group_settings() {
        let mut c = config();
        c.session_timeout = Duration::from_secs(8);
        let cc = member_config(&c, "cooperative-sticky");
        assert_eq!(cc.get("group.instance.id"), Some("app-one"));
        assert_eq!(cc.get("group.id"), Some("app"));
        assert_eq!(cc.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(
            cc.get("heartbeat.interval.ms"),
            Some("700"),
            "a default the user may tune"
        );
        assert_eq!(cc.get("session.timeout.ms"), Some("8000"));
        assert_eq!(cc.get("isolation.level"), Some("read_committed"));
        assert_eq!(cc.get("partition.assignment.strategy"), Some("cooperative-sticky"));

        c.static_membership = false;
        assert_eq!(member_config(&c, "range").get("group.instance.id"), None);
        let plain = member_config(&KafkaClusterConfig::new("b:9092", "app", "one", 4, "/tmp"), "range");
        assert_eq!(
            plain.get("heartbeat.interval.ms"),
            Some("2500"),
            "a quarter of the 10 s session"
        );
    }

    #[test]
    fn a_configuration_that_cannot_run_is_refused_naming_the_field() {
        let cases = [
            (
                config().client_property("group.id", "x"),
                "client_properties: group.id cannot be set",
            ),
            (
                KafkaClusterConfig::new("b:9092", "app", " ", 4, "/tmp"),
                "KafkaClusterConfig::instance_id is empty",
            ),
            (
                KafkaClusterConfig::new("b:9092", "app", "one", 0, "/tmp"),
                "KafkaClusterConfig::partitions is 0",
            ),
            (
                {
                    let mut c = config();
                    c.replication_factor = Some(2);
                    c.min_insync_replicas = Some(3);
                    c
                },
                "KafkaClusterConfig::min_insync_replicas (3) is above replication_factor (2)",
            ),
            (
                {
                    let mut c = config();
                    c.assignment = Assignment::Fixed(vec![PartitionId(4)]);
                    c
                },
                "fixed assignment names partition",
            ),
        ];
        for (c, expected) in cases {
            let e = c.check().unwrap_err();
            assert!(matches!(e, ClusterError::Config(_)), "{e}");
            assert!(e.to_string().contains(expected), "{e} should contain {expected}");
        }
        config().check().unwrap();
    }
}
