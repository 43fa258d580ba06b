//! Kafka mode against a real Kafka-protocol broker: state changes and egress records
//! committed in one Kafka transaction per interval (`KafkaChangelog` under a
//! `ChangelogBackend` on real RocksDB).
//! Proves: every input record comes out on the egress topic exactly once for a
//! read_committed consumer (no id and no payload twice, none missing); the state lives
//! in the changelog: an instance that lost its whole RocksDB directory restores it from
//! the changelog topic and continues the counts where they were; a second producer with the same
//! transactional id fences the first, whose next commit fails permanently; a changelog
//! topic with another partition count and a missing egress topic are refused by name;
//! `ChangelogSnapshot` reads the committed state and the progress back from the topic.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use statefun_kafka::{
    ChangelogSnapshot, EGRESS_ID_HEADER, KafkaChangelog, KafkaChangelogConfig, KafkaIngress, KafkaIngressConfig,
};
use statefun_runtime::state::{ChangelogBackend, RocksDbBackend, StateBackend};
use statefun_runtime::{KeyRouter, Runtime, RuntimeConfig};
use statefun_sdk::prelude::*;
use tokio_util::sync::CancellationToken;

mod common;
use common::{SEEN, bootstrap, consume, counter_module, create_topics, header, unique};

const COUNTER: TypeName = TypeName::from_static("changelog-test/counter");
const OUT: TypeName = TypeName::from_static("changelog-test/out");
const PARTITIONS: u32 = 4;

struct Topics {
    input: String,
    output: String,
    changelog: String,
    transactional_id: String,
    group: String,
}

impl Topics {
    async fn new() -> Topics {
        let t = Topics {
            input: unique("cl-in"),
            output: unique("cl-out"),
            changelog: unique("cl-changelog"),
            transactional_id: unique("cl-instance"),
            group: unique("cl-group"),
        };
        create_topics(&[&t.input, &t.output], 3).await;
        t
    }

    fn changelog_config(&self) -> KafkaChangelogConfig {
        KafkaChangelogConfig::new(bootstrap(), &self.changelog, PARTITIONS, &self.transactional_id)
            .egress(OUT, &self.output)
    }

    async fn backend(&self, dir: &std::path::Path) -> (ChangelogBackend, u64) {
        let changelog = KafkaChangelog::connect(self.changelog_config()).await.unwrap();
        let rocks = RocksDbBackend::open(dir, Default::default()).unwrap();
        let (backend, restored) =
            ChangelogBackend::open(rocks, Arc::new(changelog), PARTITIONS, Duration::from_millis(50)).unwrap();
        (backend, restored.changes)
    }

    async fn produce(&self, from: u32, to: u32) {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .create()
            .unwrap();
        for i in from..to {
            let (key, value) = (format!("k{}", i % 10), format!("v{i}"));
            producer
                .send(
                    FutureRecord::<str, str>::to(&self.input).key(&key).payload(&value),
                    Duration::from_secs(5),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }

    /// Runs one instance on `backend` until the egress topic holds `expect` records
    /// (read_committed), then stops it; returns every egress record.
    async fn run_until(&self, backend: ChangelogBackend, expect: usize) -> Vec<rdkafka::message::OwnedMessage> {
        let ingress = KafkaIngress::new(
            "in",
            KafkaIngressConfig::new(bootstrap(), &self.group, vec![self.input.clone()]),
        )
        .unwrap();
        let runtime = Runtime::builder()
            .config(RuntimeConfig {
                partitions: PARTITIONS,
                ..Default::default()
            })
            .module(counter_module(COUNTER, OUT))
            .state_backend(backend)
            .ingress(ingress, KeyRouter::new(COUNTER, TypeName::from_static("test/str")))
            .build()
            .unwrap();
        let stop = CancellationToken::new();
        let stopper = stop.clone();
        let run = tokio::spawn(async move { runtime.run(stopper.cancelled_owned()).await });
        let records = consume(&self.output, expect).await;
        stop.cancel();
        run.await.unwrap().unwrap();
        records
    }
}

fn payload(m: &rdkafka::message::OwnedMessage) -> String {
    <String as ValueType>::decode(m.payload().unwrap_or_default()).expect("egress records are strings")
}

/// Per egress record "<id>:<value>:<count>": checks no record id and no value twice.
fn check_exactly_once(records: &[rdkafka::message::OwnedMessage]) -> BTreeMap<String, Vec<i64>> {
    let mut ids = HashSet::new();
    let mut values = HashSet::new();
    let mut counts: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for m in records {
        let id = header(m, EGRESS_ID_HEADER).expect("every egress record has an id");
        assert!(ids.insert(id.clone()), "egress id {id} seen twice");
        let p = payload(m);
        let mut parts = p.split(':');
        let (key, value, n) = (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().parse::<i64>().unwrap(),
        );
        assert!(values.insert(value.clone()), "input {value} reported twice");
        counts.entry(key).or_default().push(n);
    }
    for c in counts.values_mut() {
        c.sort_unstable();
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_is_exactly_once_and_state_restores_from_the_changelog_after_losing_the_disk() {
    let t = Topics::new().await;
    t.produce(0, 100).await;
    let disk = tempfile::tempdir().unwrap();
    let (backend, restored) = t.backend(disk.path()).await;
    assert_eq!(restored, 0, "a new changelog has nothing to restore: {}", t.changelog);
    let records = t.run_until(backend, 100).await;
    assert_eq!(records.len(), 100);
    let counts = check_exactly_once(&records);
    assert_eq!(counts.len(), 10, "{counts:?}");
    for (key, c) in &counts {
        assert_eq!(c, &(1..=10).collect::<Vec<_>>(), "counts of {key}");
    }

    // The machine's disk is gone: a new directory, the same changelog.
    drop(disk);
    let disk = tempfile::tempdir().unwrap();
    let (backend, restored) = t.backend(disk.path()).await;
    assert!(
        restored >= 10,
        "the ten counters come back from the changelog (restored {restored} changes)"
    );
    t.produce(100, 150).await;
    let records = t.run_until(backend, 150).await;
    assert_eq!(records.len(), 150, "no duplicates after the restore");
    let counts = check_exactly_once(&records);
    for (key, c) in &counts {
        assert_eq!(
            c,
            &(1..=15).collect::<Vec<_>>(),
            "counts of {key} continue after the restore"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changelog_snapshot_reads_the_committed_state_and_progress_and_a_refresh_reads_only_the_new_commits() {
    let t = Topics::new().await;
    t.produce(0, 100).await;
    let disk = tempfile::tempdir().unwrap();
    let (backend, _) = t.backend(disk.path()).await;
    t.run_until(backend, 100).await;

    let (bootstrap, changelog) = (bootstrap(), t.changelog.clone());
    let snapshot =
        tokio::task::spawn_blocking(move || ChangelogSnapshot::read(&bootstrap, &changelog, Duration::from_secs(30)))
            .await
            .unwrap()
            .unwrap();
    for k in 0..10 {
        let address = Address::new(COUNTER, format!("k{k}")).unwrap();
        assert_eq!(snapshot.state(&address, &SEEN).unwrap(), Some(10), "count of k{k}");
    }
    let never = Address::new(COUNTER, "k10").unwrap();
    assert_eq!(snapshot.state(&never, &SEEN).unwrap(), None);
    assert_eq!(snapshot.addresses(&COUNTER).count(), 10);
    // Every input record was accepted: the progress reaches each partition's last offset.
    let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::bootstrap())
        .create()
        .unwrap();
    let mut accepted = 0;
    for p in 0..3 {
        let (_, high) = consumer.fetch_watermarks(&t.input, p, Duration::from_secs(10)).unwrap();
        let progress = snapshot.progress(&t.input, p).map_or(0, |o| o as i64 + 1);
        assert_eq!(progress, high, "progress through {}/{p}", t.input);
        accepted += progress;
    }
    assert_eq!(accepted, 100);
    assert_eq!((snapshot.pending_messages(), snapshot.pending_timers()), (0, 0));
    assert_eq!(snapshot.ends().len(), PARTITIONS as usize);

    // More traffic; a refresh reads only the new commits and shows the new state.
    t.produce(100, 150).await;
    let (backend, _) = t.backend(disk.path()).await;
    t.run_until(backend, 150).await;
    let before = snapshot.ends().to_vec();
    let mut snapshot = snapshot;
    let bootstrap = common::bootstrap();
    let snapshot =
        tokio::task::spawn_blocking(move || snapshot.refresh(&bootstrap, Duration::from_secs(30)).map(|()| snapshot))
            .await
            .unwrap()
            .unwrap();
    assert!(snapshot.ends().iter().zip(&before).all(|(a, b)| a >= b) && snapshot.ends() != before);
    for k in 0..10 {
        let address = Address::new(COUNTER, format!("k{k}")).unwrap();
        assert_eq!(
            snapshot.state(&address, &SEEN).unwrap(),
            Some(15),
            "count of k{k} after the refresh"
        );
    }
    let accepted: i64 = (0..3)
        .map(|p| snapshot.progress(&t.input, p).map_or(0, |o| o as i64 + 1))
        .sum();
    assert_eq!(accepted, 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_fences_the_old_one_whose_writes_never_commit() {
    let t = Topics::new().await;
    let disk = tempfile::tempdir().unwrap();
    let (old, _) = t.backend(disk.path()).await;
    // The old instance writes state and does not commit yet; then a new instance with
    // the same transactional id starts.
    let mut store = old.open_partition(statefun_runtime::PartitionId(0)).unwrap();
    let a = Address::new(COUNTER, "zombie").unwrap();
    store
        .write(statefun_runtime::state::WriteBatch {
            ops: vec![statefun_runtime::state::WriteOp {
                address: a.clone(),
                name: Arc::from("seen"),
                value: Some(statefun_runtime::state::StoredValue {
                    value: bytes::Bytes::from_static(b"\x01"),
                    expires_at_ms: None,
                }),
            }],
            ..Default::default()
        })
        .unwrap();
    let new_disk = tempfile::tempdir().unwrap();
    let (new, _) = t.backend(new_disk.path()).await;
    let err = old.commit().expect_err("the fenced instance cannot commit");
    assert!(
        matches!(err, statefun_runtime::state::Error::Permanent(_)),
        "fencing is permanent: {err}"
    );
    assert!(
        new.open_partition(statefun_runtime::PartitionId(0))
            .unwrap()
            .get(&a, "seen")
            .unwrap()
            .is_none(),
        "the zombie's write never reached the changelog"
    );
    new.commit().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changelog_topic_with_another_partition_count_and_a_missing_egress_topic_are_refused() {
    let t = Topics::new().await;
    KafkaChangelog::connect(t.changelog_config()).await.unwrap();
    let mut other = t.changelog_config();
    other.partitions = 2;
    other.transactional_id = unique("cl-other");
    let e = KafkaChangelog::connect(other).await.unwrap_err().to_string();
    assert!(e.contains(&t.changelog) && e.contains("has 4 partitions"), "{e}");
    let missing = unique("cl-missing");
    let e = KafkaChangelog::connect(
        KafkaChangelogConfig::new(bootstrap(), unique("cl-changelog"), PARTITIONS, unique("cl-instance"))
            .egress(OUT, &missing),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains(&missing) && e.contains("does not exist"), "{e}");
}

/// A runtime with `module` on a RocksDB + `config` changelog backend, two attempts per
/// message, its dead letters collected; stopped by cancelling the token.
struct Running {
    h: statefun_runtime::RuntimeHandle,
    dead: statefun_runtime::CollectingDeadLetters,
    stop: CancellationToken,
    run: tokio::task::JoinHandle<Result<statefun_runtime::RunReport, statefun_runtime::Error>>,
    _dir: tempfile::TempDir,
}

async fn run_on_changelog(module: Module, config: KafkaChangelogConfig) -> Running {
    let changelog = KafkaChangelog::connect(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rocks = RocksDbBackend::open(dir.path(), Default::default()).unwrap();
    let (backend, _) =
        ChangelogBackend::open(rocks, Arc::new(changelog), PARTITIONS, Duration::from_millis(50)).unwrap();
    let dead = statefun_runtime::CollectingDeadLetters::new();
    let runtime = Runtime::builder()
        .config(RuntimeConfig {
            partitions: PARTITIONS,
            retry: statefun_runtime::RetryConfig {
                max_attempts: 2,
                initial_backoff_ms: 1,
                max_backoff_ms: 1,
            },
            ..Default::default()
        })
        .module(module)
        .state_backend(backend)
        .dead_letters(dead.clone())
        .build()
        .unwrap();
    let h = runtime.handle();
    let stop = CancellationToken::new();
    let run = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    Running {
        h,
        dead,
        stop,
        run,
        _dir: dir,
    }
}

/// `value` for `COUNTER` `id`, as a plain string message.
fn str_message(id: &str, value: &str) -> (Address, TypedValue) {
    let message = TypedValue::from_bytes(TypeName::from_static("test/str"), value.as_bytes().to_vec());
    (Address::new(COUNTER, id).unwrap(), message)
}

/// A record egress: the function writes StateFun Kafka records (as a remote function
/// does), each produced to the topic it names with its key and value, in the
/// transaction; a record naming a topic the egress does not list is dead-lettered with
/// the reason, and so is one too large for Kafka; the others are committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefun_kafka_records_go_to_the_topic_they_name_and_an_unlisted_topic_or_oversized_record_is_dead_lettered() {
    use statefun_sdk::protocol::egress::KafkaProducerRecord;
    let t = Topics::new().await;
    let output = t.output.clone();
    let module = Module::builder()
        .with_fn(FunctionSpec::new(COUNTER), move |ctx, msg| {
            let mut value = msg.bytes().cloned().unwrap_or_default();
            let topic = if &value[..] == b"bad" {
                "not-listed".to_owned()
            } else {
                output.clone()
            };
            if &value[..] == b"big" {
                value = vec![b'x'; 1_100_000].into();
            }
            let record = KafkaProducerRecord {
                key: ctx.self_address().id().to_owned(),
                value_bytes: value,
                topic,
            };
            ctx.send_egress(OUT, &record)?;
            Ok(())
        })
        .build()
        .unwrap();
    let config = KafkaChangelogConfig::new(bootstrap(), &t.changelog, PARTITIONS, &t.transactional_id)
        .record_egress(OUT, [t.output.clone()]);
    let Running {
        h,
        dead,
        stop,
        run,
        _dir,
    } = run_on_changelog(module, config).await;
    for (id, value) in [("a", "one"), ("b", "bad"), ("c", "three"), ("d", "big")] {
        let (to, message) = str_message(id, value);
        h.send(to, message).await.unwrap();
    }
    let records = consume(&t.output, 2).await;
    h.wait_idle().await;
    stop.cancel();
    run.await.unwrap().unwrap();
    let mut got: Vec<(String, String)> = records
        .iter()
        .map(|m| {
            (
                String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
                String::from_utf8(m.payload().unwrap().to_vec()).unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(got, [("a".into(), "one".into()), ("c".into(), "three".into())]);
    let mut dead: Vec<(String, String)> = dead
        .letters()
        .iter()
        .map(|d| (d.caller.as_ref().unwrap().id().to_owned(), d.reason.to_string()))
        .collect();
    dead.sort();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead[0].1.contains(r#"names topic "not-listed""#), "{dead:?}");
    // Larger than Kafka takes: refused before the commit, not a failing commit.
    assert!(
        dead[1].1.contains("more than the producer's message.max.bytes"),
        "{dead:?}"
    );
}

/// What Kafka would refuse is refused before the commit: a state value or a message
/// larger than a changelog record may be fails its invocation (retried, then the address
/// parked, its message dead-lettered), an oversized egress record is dead-lettered; the
/// other addresses commit and the runtime keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_state_value_parks_its_address_and_an_oversized_egress_record_is_dead_lettered() {
    const BLOB: ValueSpec<String> = ValueSpec::named("blob");
    let t = Topics::new().await;
    let module = Module::builder()
        .with_fn(FunctionSpec::new(COUNTER).with_state(BLOB), |ctx, msg| {
            let what = String::from_utf8_lossy(msg.bytes().map(|b| b.as_ref()).unwrap_or_default()).into_owned();
            let big = "x".repeat(1_100_000);
            match what.as_str() {
                "big-state" => ctx.storage().set(&BLOB, &big)?,
                "big-egress" => ctx.send_egress(OUT, &big)?,
                "big-message" => ctx.send(Address::new(COUNTER, "elsewhere")?, &big)?,
                _ => {
                    ctx.storage().set(&BLOB, &what)?;
                    ctx.send_egress(OUT, &what)?;
                }
            }
            Ok(())
        })
        .build()
        .unwrap();
    let Running {
        h,
        dead,
        stop,
        run,
        _dir,
    } = run_on_changelog(module, t.changelog_config()).await;
    for (id, value) in [
        ("a", "one"),
        ("s", "big-state"),
        ("e", "big-egress"),
        ("m", "big-message"),
        ("c", "two"),
    ] {
        let (to, message) = str_message(id, value);
        h.send(to, message).await.unwrap();
    }
    let records = consume(&t.output, 2).await;
    h.wait_idle().await;
    let parked = h.parked().await.unwrap();
    stop.cancel();
    run.await.unwrap().unwrap();
    let mut got: Vec<String> = records.iter().map(payload).collect();
    got.sort();
    assert_eq!(got.len(), 2);
    let mut parked: Vec<(String, String)> = parked.into_iter().map(|(a, e)| (a.id().to_owned(), e)).collect();
    parked.sort();
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert_eq!(parked[0].0, "m");
    assert!(
        parked[0]
            .1
            .contains("message to changelog-test/counter/elsewhere: it is 1100"),
        "{parked:?}"
    );
    assert_eq!(parked[1].0, "s");
    assert!(parked[1].1.contains(r#"state "blob": it is 1100"#), "{parked:?}");
    let mut dead: Vec<(String, String)> = dead
        .letters()
        .iter()
        .map(|d| {
            let who = d.target.as_ref().or(d.caller.as_ref()).unwrap().id().to_owned();
            (who, d.reason.to_string())
        })
        .collect();
    dead.sort();
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(dead[0].1.contains("the record is 1100"), "{dead:?}");
    assert!(dead[1].1.contains("message.max.bytes"), "{dead:?}");
    assert!(dead[2].1.contains("message.max.bytes"), "{dead:?}");
}

/// With a dead-letter topic on the changelog, the dead letters of messages commit in
/// the transaction (with the removal of the message they replace): a function that
/// keeps failing is parked and its message's dead letter, then one for a message to the
/// parked address, one for an egress record too large for Kafka (its payload dropped
/// from the letter) and one for a function writing to the reserved dead-letter egress,
/// are on the topic for a read_committed consumer, each once, with their reason; none
/// goes to the runtime's sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_messages_commit_in_the_transaction() {
    let t = Topics::new().await;
    let dlq = unique("cl-dead");
    create_topics(&[&dlq], 1).await;
    let module = Module::builder()
        .with_fn(FunctionSpec::new(COUNTER), |ctx, msg| {
            match msg.bytes().map(|b| b.as_ref()) {
                Some(b"fail") => return Err("this message always fails".into()),
                // Too large for Kafka: dead-lettered, its payload dropped from the letter.
                Some(b"big-egress") => ctx.send_egress(OUT, &"x".repeat(1_100_000))?,
                // Reserved for the runtime: refused and dead-lettered.
                Some(b"forge") => ctx.send_egress(statefun_runtime::egress::DEAD_LETTERS, &"fake".to_string())?,
                _ => ctx.send_egress(OUT, &"ok".to_string())?,
            }
            Ok(())
        })
        .build()
        .unwrap();
    let mut config = t.changelog_config();
    config.dead_letter_topic = Some(dlq.clone());
    let Running {
        h,
        dead: sink,
        stop,
        run,
        _dir,
    } = run_on_changelog(module, config).await;
    let (a, m) = str_message("x", "fail");
    h.send(a, m).await.unwrap();
    h.wait_idle().await;
    for (id, value) in [("x", "again"), ("y", "fine"), ("z", "big-egress"), ("f", "forge")] {
        let (a, m) = str_message(id, value);
        h.send(a, m).await.unwrap();
    }
    h.wait_idle().await;
    let letters = consume(&dlq, 4).await;
    let ok = consume(&t.output, 1).await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(ok.len(), 1);
    assert_eq!(letters.len(), 4, "each dead letter once");
    let reason = |m: &rdkafka::message::OwnedMessage| header(m, "statefun-dead-letter-reason").unwrap();
    let find = |text: &str| {
        letters
            .iter()
            .find(|m| reason(m).contains(text))
            .unwrap_or_else(|| panic!("no dead letter says {text:?}"))
    };
    let failed = find("function failed 2 time(s)");
    assert!(reason(failed).contains("always fails"));
    assert_eq!((failed.key(), failed.payload()), (Some(&b"x"[..]), Some(&b"fail"[..])));
    // Accepted for a parked address: its letter commits with the progress past it.
    assert_eq!(find("address is parked").key(), Some(&b"x"[..]));
    let big = find("payload of");
    assert!(reason(big).contains("bytes dropped: too large"), "{}", reason(big));
    assert_eq!(big.payload(), None);
    assert!(reason(find("reserved for the runtime")).contains("statefun-rs/dead-letters"));
    assert!(sink.letters().is_empty(), "nothing went to the sink");
}
