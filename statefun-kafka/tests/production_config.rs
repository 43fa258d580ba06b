//! What a cluster instance checks and sets up at its start for a production Kafka, on
//! the test broker: the topics it creates get a cleanup policy, a replication factor
//! and `min.insync.replicas`; an existing topic that does not fit is refused naming it
//! and what to change; properties the runtime owns are refused before any connection;
//! and a gracefully stopped instance hands its partitions over at once without static
//! membership, and only after its session timeout with it (the documented trade-off).

#[allow(dead_code)] // the helpers this file does not use
mod common;

use std::time::{Duration, Instant};

use common::{bootstrap, consume, counter_module, create_topics, unique};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use statefun_kafka::{
    ClusterError, Error, KafkaChangelog, KafkaChangelogConfig, KafkaCluster, KafkaClusterConfig, KafkaEgress,
    KafkaIngress, KafkaIngressConfig,
};
use statefun_runtime::KeyRouter;
use statefun_sdk::TypeName;
use tokio_util::sync::CancellationToken;

const COUNTER: TypeName = TypeName::from_static("production-test/counter");
const VALUE: TypeName = TypeName::from_static("production-test/value");
const OUT: TypeName = TypeName::from_static("production-test/out");

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap()
}

/// `cleanup.policy` and `min.insync.replicas` of `topic`, and its replicas per
/// partition.
async fn topic_settings(topic: &str) -> (String, String, usize) {
    let admin = admin();
    let described = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap();
    let get = |k: &str| described.get(k).and_then(|e| e.value.clone()).unwrap_or_default();
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let replicas = md.topics()[0].partitions()[0].replicas().len();
    (get("cleanup.policy"), get("min.insync.replicas"), replicas)
}

fn instance(app: &str, id: &str, dir: &std::path::Path, input: &str, output: &str) -> KafkaClusterConfig {
    let mut config = KafkaClusterConfig::new(bootstrap(), app, id, 2, dir)
        .ingress(input, KeyRouter::new(COUNTER, VALUE))
        .egress(OUT, output);
    config.timeout = Duration::from_secs(15);
    config
}

async fn run_until_stopped(config: KafkaClusterConfig, stop: CancellationToken) -> Result<(), ClusterError> {
    KafkaCluster::run(config, |b| b.module(counter_module(COUNTER, OUT)), stop)
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtimes_topics_are_created_with_their_cleanup_policy_replication_and_min_insync_replicas() {
    let (app, input, output) = (unique("prod-app"), unique("prod-in"), unique("prod-out"));
    create_topics(&[&input, &output], 2).await;
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(run_until_stopped(
        instance(&app, "a", dir.path(), &input, &output),
        stop.clone(),
    ));
    // The topics exist once the instance has produced an egress record.
    produce(&input, 0..1).await;
    assert_eq!(consume(&output, 1).await.len(), 1);
    stop.cancel();
    run.await.unwrap().unwrap();
    let brokers = admin()
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap()
        .brokers()
        .len();
    let rf = brokers.min(3);
    let isr = (rf - 1).max(1).to_string();
    assert_eq!(
        topic_settings(&format!("{app}-changelog")).await,
        ("compact".to_owned(), isr.clone(), rf),
        "the changelog topic: compacted, min(3, brokers) replicas, min.insync.replicas one less"
    );
    assert_eq!(
        topic_settings(&format!("{app}-internal")).await,
        ("delete".to_owned(), isr, rf),
        "the internal topic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_topic_with_another_partition_count_or_cleanup_policy_is_refused_naming_it() {
    let (input, output) = (unique("prod-in"), unique("prod-out"));
    create_topics(&[&input, &output], 2).await;
    let admin = admin();
    // (application, the topic made beforehand, its partitions and cleanup policy, what
    // the error must say)
    let cases = [
        (
            "internal",
            3,
            "delete",
            "has 3 partitions; it needs one per runtime partition (2)",
        ),
        (
            "internal",
            2,
            "compact",
            "has cleanup.policy=compact; it must be delete",
        ),
        (
            "changelog",
            2,
            "delete",
            "has cleanup.policy=delete; it must be compact",
        ),
        (
            "changelog",
            2,
            "compact,delete",
            "has cleanup.policy=compact,delete; it must be compact",
        ),
        (
            "changelog",
            1,
            "compact",
            "has 1 partition; it needs one per runtime partition (2)",
        ),
    ];
    for (kind, partitions, policy, expected) in cases {
        let app = unique("prod-bad");
        let topic = format!("{app}-{kind}");
        let new = NewTopic::new(&topic, partitions, TopicReplication::Fixed(1)).set("cleanup.policy", policy);
        for r in admin.create_topics([&new], &AdminOptions::new()).await.unwrap() {
            r.unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let e = run_until_stopped(
            instance(&app, "a", dir.path(), &input, &output),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, ClusterError::Kafka(Error::Topic { ref topic, .. }) if *topic == format!("{app}-{kind}")),
            "{text}"
        );
        assert!(
            text.contains(&topic) && text.contains(expected),
            "{text}\nshould say {expected}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "took {:?}",
            started.elapsed()
        );
    }
}

/// With `create_topic = false` (topics provisioned elsewhere), a missing changelog topic
/// is an error naming it and how to create it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_changelog_topic_provisioned_elsewhere_is_refused_naming_it() {
    let topic = unique("prod-missing-changelog");
    let mut config = KafkaChangelogConfig::new(bootstrap(), &topic, 4, unique("prod-t"));
    config.create_topic = false;
    let e = KafkaChangelog::connect(config).await.unwrap_err();
    assert!(matches!(&e, Error::Topic { topic: t, .. } if *t == topic), "{e}");
    assert!(
        e.to_string()
            .contains("the changelog topic does not exist; create it with 4 partitions and cleanup.policy=compact"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_the_runtime_owns_are_refused_by_every_component_before_connecting() {
    // Nothing listens on port 1: a refusal that came after a connection attempt would
    // take the timeout.
    let nowhere = "127.0.0.1:1";
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut config = KafkaClusterConfig::new(nowhere, "app", "a", 2, dir.path())
        .client_property("security.protocol", "SASL_SSL")
        .client_property("transactional.id", "mine")
        .client_property("group.instance.id", "fixed");
    config.timeout = Duration::from_secs(30);
    let e = run_until_stopped(config, CancellationToken::new()).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, ClusterError::Config(_)), "{text}");
    assert!(text.contains("KafkaClusterConfig::client_properties"), "{text}");
    assert!(text.contains("transactional.id cannot be set"), "{text}");
    assert!(
        text.contains("group.instance.id cannot be set: set with the static_membership field"),
        "{text}"
    );

    let e = KafkaChangelog::connect(
        KafkaChangelogConfig::new(nowhere, "changelog", 2, "t").property("isolation.level", "read_uncommitted"),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    assert!(
        e.to_string()
            .contains("KafkaChangelogConfig::properties: isolation.level cannot be set"),
        "{e}"
    );

    let mut ingress = KafkaIngressConfig::new(nowhere, "g", vec!["t".into()]);
    ingress.properties.push(("enable.auto.commit".into(), "true".into()));
    let e = KafkaIngress::new("in", ingress).unwrap_err();
    assert!(e.to_string().contains("enable.auto.commit cannot be set"), "{e}");

    let e = KafkaEgress::new(nowhere, "t", &[("acks".into(), "1".into())]).unwrap_err();
    assert!(e.to_string().contains("acks cannot be set"), "{e}");
    assert!(!e.is_retriable());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// Runs two instances of one application with `static_membership` and `session`
/// timeout until each owns one of the two partitions, stops one through its shutdown
/// token, and returns how long after the stop the other had committed the records of
/// both partitions (or `None` if not within 40 s).
async fn handover_after_a_graceful_stop(static_membership: bool, session: Duration) -> Option<Duration> {
    let (app, input, output) = (unique("prod-leave"), unique("prod-in"), unique("prod-out"));
    create_topics(&[&input, &output], 2).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let mut a = instance(&app, "a", dir_a.path(), &input, &output);
    let mut b = instance(&app, "b", dir_b.path(), &input, &output);
    for config in [&mut a, &mut b] {
        config.session_timeout = session;
        config.static_membership = static_membership;
    }
    let run_a = tokio::spawn(run_until_stopped(a, stop_a.clone()));
    let run_b = tokio::spawn(run_until_stopped(b, stop_b.clone()));
    produce(&input, 0..8).await;
    assert_eq!(consume(&output, 8).await.len(), 8);
    // Each instance owns one of the two partitions once the group is stable with both.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let groups = admin()
            .inner()
            .fetch_group_list(Some(&app), Duration::from_secs(10))
            .unwrap();
        let group = &groups.groups()[0];
        if group.state() == "Stable" && group.members().len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group did not settle with both instances"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_a.cancel();
    run_a.await.unwrap().unwrap();
    let stopped = Instant::now();
    produce(&input, 8..16).await;
    let mut seen = 8;
    let deadline = stopped + Duration::from_secs(40);
    while seen < 16 && Instant::now() < deadline {
        seen = consume(&output, 16).await.len();
    }
    let took = (seen == 16).then(|| stopped.elapsed());
    stop_b.cancel();
    run_b.await.unwrap().unwrap();
    took
}

/// Without static membership, a member stopped through its shutdown token leaves the
/// group: the other instance runs its partition as soon as its next heartbeat learns of
/// the rebalance (every 7.5 s, a quarter of the session timeout), far within the 30 s
/// session timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gracefully_stopped_dynamic_member_hands_its_partitions_over_at_once() {
    const SESSION: Duration = Duration::from_secs(30);
    let took = handover_after_a_graceful_stop(false, SESSION)
        .await
        .expect("the remaining instance never took over the stopped one's partition");
    eprintln!("dynamic membership: the handover after a graceful stop took {took:?}");
    assert!(
        took < SESSION / 2,
        "the handover took {took:?}: the stopped member did not leave"
    );
}

/// With static membership (the default), a stopped member does not leave the group
/// (KIP-345: so that a restart keeps its partitions): the other instance gets its
/// partition only once the session times out (10 s here; the stopped member's last
/// heartbeat was at most 2.5 s before the stop), the trade-off documented on
/// `KafkaClusterConfig::static_membership`. A member that left would be replaced within
/// about one heartbeat (2.5 s) and the time to restart the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_static_member_keeps_its_partitions_until_its_session_times_out() {
    const SESSION: Duration = Duration::from_secs(10);
    let took = handover_after_a_graceful_stop(true, SESSION)
        .await
        .expect("the remaining instance never took over the stopped one's partition");
    eprintln!("static membership: the handover after a graceful stop took {took:?}");
    assert!(
        took >= SESSION - Duration::from_secs(3),
        "the handover took {took:?}, less than the session timeout: is group.instance.id set?"
    );
}

/// Produces records `range`, keyed `k<i>` (spread over the topic's partitions).
async fn produce(topic: &str, range: std::ops::Range<u32>) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    for i in range {
        let (key, value) = (format!("k{i}"), i.to_string());
        producer
            .send(
                FutureRecord::to(topic).key(&key).payload(&value),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
}
