//! Cluster mode under churn: instances of one application share the runtime's
//! partitions through a consumer group while instances join, leave and are SIGKILLed.
//!
//! The workload: records `0..n` on an ingress topic keyed `k<i % keys>`. `counter`
//! (id = key) counts its messages, reports each on the egress topic as
//! `c:<id>:<value>:<count>` and forwards the value to `echo` at `<id>-echo` (another
//! partition, often another instance: the internal topic), which reports `e:...`. The
//! check ([`check_exactly_once`]): every value reached both functions exactly once, and
//! every address's counts are exactly `1..=n` (its state was neither lost nor counted
//! twice).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use statefun_kafka::{Assignment, ClusterReport, KafkaCluster, KafkaClusterConfig};
use statefun_runtime::KeyRouter;
use statefun_sdk::prelude::*;
use tokio_util::sync::CancellationToken;

/// The counting function (id = record key).
pub const COUNTER: TypeName = TypeName::from_static("cluster/counter");
/// The function each counter forwards to (id = `<key>-echo`).
pub const ECHO: TypeName = TypeName::from_static("cluster/echo");
const VALUE: TypeName = TypeName::from_static("cluster/value");
/// The egress id, committed to the egress topic.
pub const OUT: TypeName = TypeName::from_static("cluster/out");
const SEEN: ValueSpec<i64> = ValueSpec::named("seen");
/// Runtime partitions of the cluster workload.
pub const PARTITIONS: u32 = 4;

/// The workload's functions (module docs).
pub fn module() -> Module {
    let count = |kind: &'static str| {
        move |ctx: &mut Context, msg: TypedValue| -> FunctionResult {
            let n = ctx.storage().get(&SEEN)?.unwrap_or(0) + 1;
            ctx.storage().set(&SEEN, &n)?;
            let value = String::from_utf8_lossy(msg.bytes().map(|b| b.as_ref()).unwrap_or_default()).into_owned();
            let id = ctx.self_address().id().to_owned();
            ctx.send_egress_message(OUT, TypedValue::from_bytes(VALUE, format!("{kind}:{id}:{value}:{n}")));
            if kind == "c" {
                let echo = Address::new(ECHO, format!("{id}-echo"))?;
                ctx.send_message(echo, TypedValue::from_bytes(VALUE, value.into_bytes()));
            }
            Ok(())
        }
    };
    Module::builder()
        .with_fn(FunctionSpec::new(COUNTER).with_state(SEEN), count("c"))
        .with_fn(FunctionSpec::new(ECHO).with_state(SEEN), count("e"))
        .build()
        .expect("valid module")
}

/// Names of one cluster run.
#[derive(Debug, Clone)]
pub struct ClusterNames {
    /// The broker.
    pub bootstrap: String,
    /// Application id (group, topic prefix).
    pub app: String,
    /// The ingress topic.
    pub ingress: String,
    /// The egress topic.
    pub egress: String,
}

impl ClusterNames {
    /// Unique names under `prefix`.
    pub fn unique(bootstrap: &str, prefix: &str) -> ClusterNames {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let base = format!("{prefix}-{}-{nanos}", std::process::id());
        ClusterNames {
            bootstrap: bootstrap.to_owned(),
            app: base.clone(),
            ingress: format!("{base}-in"),
            egress: format!("{base}-out"),
        }
    }

    /// Creates the ingress topic (`PARTITIONS` partitions) and the egress topic, with
    /// replication factor min(3, brokers), so that they survive a broker's loss.
    pub async fn create_topics(&self) -> anyhow::Result<()> {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create()?;
        let brokers = admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))?
            .brokers()
            .len();
        let rf = brokers.clamp(1, 3) as i32;
        let topics = [
            NewTopic::new(&self.ingress, PARTITIONS as i32, TopicReplication::Fixed(rf)),
            NewTopic::new(&self.egress, 1, TopicReplication::Fixed(rf)),
        ];
        for r in admin.create_topics(&topics, &AdminOptions::new()).await? {
            r.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
        }
        Ok(())
    }

    /// Produces records `range` (keys `k<i % keys>`, value `i`) with a plain producer.
    pub async fn produce(&self, range: std::ops::Range<u64>, keys: u64) -> anyhow::Result<()> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("linger.ms", "5")
            // A record that cannot be delivered within 2 minutes (the fault tests keep a
            // broker away for at most 20 s) fails the test instead of waiting 5.
            .set("message.timeout.ms", "120000")
            .create()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        // Queue every record first, then wait for the acknowledgements.
        let mut pending = Vec::with_capacity(range.end.saturating_sub(range.start) as usize);
        for i in range {
            let (key, value) = (format!("k{}", i % keys), i.to_string());
            let record = FutureRecord::to(&self.ingress).key(&key).payload(&value).timestamp(now);
            let delivery = producer
                .send_result(record)
                .map_err(|(e, _)| anyhow::anyhow!("cannot queue record {i}: {e}"))?;
            pending.push((i, delivery));
        }
        for (i, delivery) in pending {
            delivery
                .await
                .map_err(|_| anyhow::anyhow!("record {i}: the producer was dropped"))?
                .map_err(|(e, _)| anyhow::anyhow!("cannot produce record {i}: {e}"))?;
        }
        Ok(())
    }

    /// Runs one instance until `shutdown` is cancelled.
    pub async fn run_instance(
        &self,
        instance: &str,
        state_dir: &Path,
        assignment: Assignment,
        shutdown: CancellationToken,
    ) -> anyhow::Result<ClusterReport> {
        let mut config = KafkaClusterConfig::new(&self.bootstrap, &self.app, instance, PARTITIONS, state_dir)
            .ingress(&self.ingress, KeyRouter::new(COUNTER, VALUE))
            .egress(OUT, &self.egress);
        // A killed or frozen member's partitions move after this long.
        config.session_timeout = Duration::from_secs(6);
        // Cooperative assignment needs dynamic membership (`Assignment::Cooperative`).
        config.static_membership = assignment != Assignment::Cooperative;
        config.assignment = assignment;
        KafkaCluster::run(config, |b| b.module(module()), shutdown)
            .await
            .with_context(|| format!("instance {instance}"))
    }

    /// Partitions whose last stable offset is below their high watermark (an open
    /// transaction holds read_committed readers back there), as `topic/partition: lso <
    /// high` lines: what to look at when the workload stalls.
    pub fn open_transactions(&self) -> anyhow::Result<Vec<String>> {
        let client = |isolation: &str| -> anyhow::Result<rdkafka::consumer::BaseConsumer> {
            Ok(ClientConfig::new()
                .set("bootstrap.servers", &self.bootstrap)
                .set("isolation.level", isolation)
                .create()?)
        };
        let (uncommitted, committed) = (client("read_uncommitted")?, client("read_committed")?);
        let mut out = Vec::new();
        let internal = format!("{}-internal", self.app);
        let changelog = format!("{}-changelog", self.app);
        for topic in [&internal, &changelog, &self.egress] {
            let partitions = if *topic == self.egress { 1 } else { PARTITIONS as i32 };
            for p in 0..partitions {
                let (_, high) = uncommitted.fetch_watermarks(topic, p, Duration::from_secs(5))?;
                let (_, lso) = committed.fetch_watermarks(topic, p, Duration::from_secs(5))?;
                if lso < high {
                    out.push(format!("{topic}/{p}: {lso} < {high}"));
                }
            }
        }
        Ok(out)
    }

    /// A reader of the run's topics at `isolation`: its own group (it commits nothing).
    fn reader_config(&self, isolation: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", ClusterNames::unique(&self.bootstrap, &self.app).app)
            .set("enable.auto.commit", "false")
            .set("isolation.level", isolation);
        config
    }

    /// The broker leading each partition of the changelog topic (node ids).
    pub fn changelog_leaders(&self) -> anyhow::Result<Vec<i32>> {
        let client: rdkafka::consumer::BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &self.bootstrap).create()?;
        let changelog = format!("{}-changelog", self.app);
        let metadata = client.fetch_metadata(Some(&changelog), Duration::from_secs(10))?;
        let topic = metadata
            .topics()
            .first()
            .with_context(|| format!("no metadata for {changelog}"))?;
        let mut leaders: Vec<(i32, i32)> = topic.partitions().iter().map(|p| (p.id(), p.leader())).collect();
        leaders.sort_unstable();
        Ok(leaders.into_iter().map(|(_, leader)| leader).collect())
    }

    /// The changelog's committed end (last stable offset) of every runtime partition:
    /// what a read_committed reader can see now.
    pub fn changelog_ends(&self) -> anyhow::Result<Vec<i64>> {
        let committed: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("isolation.level", "read_committed")
            .create()?;
        let changelog = format!("{}-changelog", self.app);
        (0..PARTITIONS as i32)
            .map(|p| Ok(committed.fetch_watermarks(&changelog, p, Duration::from_secs(10))?.1))
            .collect()
    }

    /// Waits until a record committed after `from` (offsets as [`Self::changelog_ends`]
    /// gave them) appears in the changelog of one of `partitions`, and returns when it
    /// became visible to a read_committed reader, or `None` after `timeout`. With
    /// `from` read right after an owner was killed, that is the first commit of a new
    /// owner: the killed owner's open transaction is aborted and never shows. Blocking.
    pub fn first_commit_after(
        &self,
        partitions: &[u32],
        from: &[i64],
        timeout: Duration,
    ) -> anyhow::Result<Option<std::time::Instant>> {
        use rdkafka::consumer::BaseConsumer;
        let consumer: BaseConsumer = self
            .reader_config("read_committed")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        let changelog = format!("{}-changelog", self.app);
        let mut tpl = rdkafka::TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition_offset(&changelog, p as i32, rdkafka::Offset::Offset(from[p as usize]))?;
        }
        consumer.assign(&tpl)?;
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(20)) {
                m?;
                return Ok(Some(std::time::Instant::now()));
            }
        }
        Ok(None)
    }

    /// The values carried by messages to `echo` in the internal topic, with the
    /// partition and offset of each copy, for an isolation level: what a fresh reader
    /// sees there (diagnostics for a failed run).
    pub fn internal_echo_values(&self, isolation: &str) -> anyhow::Result<BTreeMap<u64, Vec<(i32, i64)>>> {
        use rdkafka::consumer::BaseConsumer;
        let consumer: BaseConsumer = self.reader_config(isolation).create()?;
        let topic = format!("{}-internal", self.app);
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..PARTITIONS as i32 {
            tpl.add_partition_offset(&topic, p, rdkafka::Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut out: BTreeMap<u64, Vec<(i32, i64)>> = BTreeMap::new();
        let mut idle = 0;
        while idle < 20 {
            match consumer.poll(Duration::from_millis(100)) {
                Some(m) => {
                    idle = 0;
                    let m = m?;
                    let Ok(routed) = statefun_runtime::decode_message(m.payload().unwrap_or_default()) else {
                        continue;
                    };
                    if routed.target.type_name() == &ECHO {
                        let v = String::from_utf8_lossy(routed.message.bytes().map(|b| b.as_ref()).unwrap_or_default())
                            .parse::<u64>()?;
                        out.entry(v).or_default().push((m.partition(), m.offset()));
                    }
                }
                None => idle += 1,
            }
        }
        Ok(out)
    }

    /// Reads the egress topic with read_committed until at least `n` records arrived
    /// and nothing more came for 3 s (so late duplicates are seen), or `timeout`.
    /// Returns the payloads and how many records carried an egress id seen before.
    pub async fn read_egress(&self, n: usize, timeout: Duration) -> anyhow::Result<(Vec<String>, usize)> {
        let consumer: StreamConsumer = self
            .reader_config("read_committed")
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[&self.egress])?;
        let mut out = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let mut repeated = 0;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let wait = if out.len() >= n {
                Duration::from_secs(3)
            } else {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            };
            let m = match tokio::time::timeout(wait, consumer.recv()).await {
                Ok(Ok(m)) => m,
                // A broker away (the broker-fault tests): the client reconnects.
                Ok(Err(e)) => {
                    eprintln!("egress reader: {e}");
                    if tokio::time::Instant::now() >= deadline {
                        return Ok((out, repeated));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(_) => return Ok((out, repeated)),
            };
            let id = m.headers().and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == statefun_kafka::EGRESS_ID_HEADER)
                    .and_then(|h| h.value.map(<[u8]>::to_vec))
            });
            if let Some(id) = id
                && !ids.insert(id)
            {
                repeated += 1;
            }
            out.push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
        }
    }
}

/// Every value `0..values` reached the counter and the echo exactly once, and every
/// address's counts are exactly `1..=n` (module docs).
pub fn check_exactly_once(records: &[String], values: u64, keys: u64) -> anyhow::Result<()> {
    let mut seen: BTreeMap<(String, u64), u32> = BTreeMap::new();
    let mut texts: BTreeMap<(String, u64), Vec<&str>> = BTreeMap::new();
    let mut counts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in records {
        let parts: Vec<&str> = r.split(':').collect();
        ensure!(parts.len() == 4, "malformed egress record {r:?}");
        let value: u64 = parts[2].parse().with_context(|| format!("record {r:?}"))?;
        *seen.entry((parts[0].to_owned(), value)).or_default() += 1;
        texts.entry((parts[0].to_owned(), value)).or_default().push(r);
        counts
            .entry(format!("{}:{}", parts[0], parts[1]))
            .or_default()
            .push(parts[3].parse().with_context(|| format!("record {r:?}"))?);
    }
    let mut missing: BTreeMap<(&str, u32), u64> = BTreeMap::new();
    for kind in ["c", "e"] {
        for v in 0..values {
            let n = seen.get(&(kind.to_owned(), v)).copied().unwrap_or(0);
            ensure!(
                n <= 1,
                "value {v} reached the {kind} function {n} times: {:?}",
                texts.get(&(kind.to_owned(), v))
            );
            if n == 0 {
                let id = if kind == "c" {
                    format!("k{}", v % keys)
                } else {
                    format!("k{}-echo", v % keys)
                };
                *missing
                    .entry((kind, statefun_runtime::partition_for(&id, PARTITIONS).0))
                    .or_default() += 1;
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "values that never reached a function, per (function, partition): {missing:?}"
    );
    ensure!(
        seen.len() as u64 == 2 * values,
        "{} unexpected values in the egress",
        seen.len() as u64 - 2 * values
    );
    ensure!(
        counts.len() as u64 == 2 * keys,
        "{} addresses reported, expected {}",
        counts.len(),
        2 * keys
    );
    for (address, mut c) in counts {
        c.sort_unstable();
        if c.iter().enumerate().any(|(i, n)| *n != i as u64 + 1) {
            bail!("counts of {address} are not 1..=n: {c:?}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_check_detects_lost_duplicated_and_double_counted_work() {
        let good = records(&["c:k0:0:1", "e:k0-echo:0:1", "c:k0:1:2", "e:k0-echo:1:2"]);
        assert!(check_exactly_once(&good, 2, 1).is_ok());
        let lost = records(&["c:k0:0:1", "e:k0-echo:0:1", "c:k0:1:2"]);
        assert!(check_exactly_once(&lost, 2, 1).is_err());
        let duplicated = records(&[
            "c:k0:0:1",
            "e:k0-echo:0:1",
            "c:k0:1:2",
            "e:k0-echo:1:2",
            "e:k0-echo:1:2",
        ]);
        assert!(check_exactly_once(&duplicated, 2, 1).is_err());
        // State counted twice: the second value counted as the third message.
        let double_counted = records(&["c:k0:0:1", "e:k0-echo:0:1", "c:k0:1:3", "e:k0-echo:1:2"]);
        assert!(check_exactly_once(&double_counted, 2, 1).is_err());
    }
}
