//! Broker outages, injected with librdkafka's mock cluster. The mock accepts
//! transactional calls without enforcing them, so these tests prove nothing about
//! exactly-once (the real-broker tests do); they prove how a commit behaves while the
//! broker is away: a short outage delays the commit and loses nothing; one longer
//! than the configured timeout fails the commit with a transient error (its
//! transaction aborted), the pending writes stay readable and uncommitted, and the
//! next commit after the broker's return takes them.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::mocking::MockCluster;
use statefun_kafka::{KafkaChangelog, KafkaChangelogConfig};
use statefun_runtime::PartitionId;
use statefun_runtime::state::{
    ChangelogBackend, Error, RocksDbBackend, StateBackend, StoredValue, WriteBatch, WriteOp,
};
use statefun_sdk::{Address, TypeName};

const OUT: TypeName = TypeName::from_static("down-test/out");

async fn backend(
    mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    timeout: Duration,
) -> (ChangelogBackend, tempfile::TempDir) {
    mock.create_topic("changelog", 2, 1).unwrap();
    mock.create_topic("out", 2, 1).unwrap();
    let mut config =
        KafkaChangelogConfig::new(mock.bootstrap_servers(), "changelog", 2, "down-test").egress(OUT, "out");
    config.timeout = timeout;
    config.create_topic = false; // the mock cluster has no admin API
    let changelog = KafkaChangelog::connect(config).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rocks = RocksDbBackend::open(dir.path(), Default::default()).unwrap();
    let (b, _) = ChangelogBackend::open(rocks, Arc::new(changelog), 2, Duration::from_millis(100)).unwrap();
    (b, dir)
}

fn stage(b: &ChangelogBackend) -> Address {
    let a = Address::new(TypeName::from_static("down-test/f"), "a").unwrap();
    b.open_partition(PartitionId(0))
        .unwrap()
        .write(WriteBatch {
            ops: vec![WriteOp {
                address: a.clone(),
                name: Arc::from("x"),
                value: Some(StoredValue {
                    value: Bytes::from_static(b"1"),
                    expires_at_ms: None,
                }),
            }],
            progress: vec![("src".into(), 5)],
            ..Default::default()
        })
        .unwrap();
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_shorter_than_the_timeout_delays_the_commit_and_loses_nothing() {
    let mock = MockCluster::new(1).unwrap();
    let (b, _dir) = backend(&mock, Duration::from_secs(20)).await;
    stage(&b);
    mock.broker_down(1).unwrap();
    let committing = tokio::task::spawn_blocking({
        let b = b.clone();
        move || b.commit()
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!committing.is_finished(), "the commit waits for the broker");
    assert_eq!(b.committed_progress(PartitionId(0), "src").unwrap(), None);
    mock.broker_up(1).unwrap();
    committing.await.unwrap().unwrap();
    assert_eq!(b.committed_progress(PartitionId(0), "src").unwrap(), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_longer_than_the_timeout_fails_the_commit_transiently_and_keeps_the_writes() {
    let mock = MockCluster::new(1).unwrap();
    let (b, _dir) = backend(&mock, Duration::from_secs(2)).await;
    let a = stage(&b);
    mock.broker_down(1).unwrap();
    let e = tokio::task::spawn_blocking({
        let b = b.clone();
        move || b.commit()
    })
    .await
    .unwrap()
    .unwrap_err();
    // The transaction never reached the broker, so its abort (purging the records it
    // queued) completes locally: the commit can be retried, nothing was committed.
    assert!(matches!(e, Error::Transient(_)), "{e}");
    assert_eq!(
        b.committed_progress(PartitionId(0), "src").unwrap(),
        None,
        "nothing was committed"
    );
    let value = b.open_partition(PartitionId(0)).unwrap().get(&a, "x").unwrap();
    assert_eq!(
        value.map(|v| v.value),
        Some(Bytes::from_static(b"1")),
        "the write is still pending"
    );
    // Once the broker is back, a later commit (the runtime tries at every interval)
    // takes the pending write.
    mock.broker_up(1).unwrap();
    let mut attempts = Vec::new();
    while attempts.len() < 10 {
        let b = b.clone();
        match tokio::task::spawn_blocking(move || b.commit()).await.unwrap() {
            Ok(_) => break,
            Err(e) => attempts.push(e.to_string()),
        }
    }
    assert!(
        attempts.len() < 10,
        "no commit succeeded after the broker came back: {attempts:?}"
    );
    assert_eq!(b.committed_progress(PartitionId(0), "src").unwrap(), Some(5));
}
