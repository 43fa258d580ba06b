//! Durable mode when the state backend fails: a real RocksDB backend wrapped to refuse
//! chosen reads and writes a given number of times (the failure a full or flaky disk
//! produces). Proves: a failed progress read or inbox write pauses the partition's
//! input and retries without losing or double-counting a record; replayed records that
//! are skipped are counted as finished even when the write after them fails; the
//! runtime becomes idle and every record is processed exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use statefun_runtime::state::{
    Error, LogKey, LogKind, PartitionStore, RocksDbBackend, RocksDbOptions, StateBackend, StoredValue, WriteBatch,
};
use statefun_runtime::testkit::{self, eventually};
use statefun_runtime::{GeneratorIngress, IngressRecord, KeyRouter, PartitionId, RuntimeConfig, RuntimeHandle};
use statefun_sdk::prelude::*;

mod common;
use common::{COUNTER, SEEN, counter_module};

/// Injected failures.
#[derive(Clone, Default)]
struct Faults {
    /// Progress reads so far; the read whose number (from 1) is in `failing_reads` fails.
    progress_reads: Arc<AtomicUsize>,
    failing_reads: Arc<Vec<usize>>,
    /// Counted down: writes that carry progress markers fail while positive.
    writes_with_progress: Arc<AtomicUsize>,
}

fn take(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

struct Flaky {
    inner: RocksDbBackend,
    faults: Faults,
}

struct FlakyStore {
    inner: Box<dyn PartitionStore>,
    faults: Faults,
}

impl PartitionStore for FlakyStore {
    fn get(&self, address: &Address, name: &str) -> Result<Option<StoredValue>, Error> {
        self.inner.get(address, name)
    }
    fn write(&mut self, batch: WriteBatch) -> Result<(), Error> {
        if !batch.progress.is_empty() && take(&self.faults.writes_with_progress) {
            return Err(Error::Transient("injected write failure".into()));
        }
        self.inner.write(batch)
    }
    fn progress(&self, source: &str) -> Result<Option<u64>, Error> {
        let n = self.faults.progress_reads.fetch_add(1, Ordering::SeqCst) + 1;
        if self.faults.failing_reads.contains(&n) {
            return Err(Error::Transient("injected read failure".into()));
        }
        self.inner.progress(source)
    }
    fn log(&self, kind: LogKind) -> Result<Vec<(LogKey, Bytes)>, Error> {
        self.inner.log(kind)
    }
}

impl statefun_runtime::state::Admission for Flaky {}

impl StateBackend for Flaky {
    fn open_partition(&self, partition: PartitionId) -> Result<Box<dyn PartitionStore>, Error> {
        Ok(Box::new(FlakyStore {
            inner: self.inner.open_partition(partition)?,
            faults: self.faults.clone(),
        }))
    }
    fn durable(&self) -> bool {
        true
    }
    fn next_incarnation(&self) -> Result<u64, Error> {
        self.inner.next_incarnation()
    }
    fn check_partitions(&self, partitions: u32) -> Result<(), Error> {
        self.inner.check_partitions(partitions)
    }
}

const RECORD: TypeName = TypeName::from_static("test/record");
const KEYS: u64 = 7;

/// Runs `count` generator records through a runtime on `dir` with `faults`; returns
/// the total counted over all keys once idle.
async fn run(dir: &std::path::Path, count: u64, partitions: u32, faults: Faults) -> i64 {
    let backend = Flaky {
        inner: RocksDbBackend::open(dir, RocksDbOptions::default()).unwrap(),
        faults,
    };
    let generator = GeneratorIngress::new("gen", 3, count, |_, offset| {
        IngressRecord::new(format!("k{}", offset % KEYS), offset.to_string())
    });
    let r = testkit::runtime(counter_module())
        .config(RuntimeConfig {
            partitions,
            retry: statefun_runtime::RetryConfig {
                initial_backoff_ms: 5,
                max_backoff_ms: 20,
                ..Default::default()
            },
            ..Default::default()
        })
        .backend(backend)
        .ingress(generator, KeyRouter::new(COUNTER, RECORD))
        .start();
    eventually(&format!("{count} records counted"), || async {
        total(&r.handle).await >= count as i64
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), r.handle.wait_idle())
        .await
        .expect("the runtime becomes idle: nothing is left counted as outstanding");
    let sum = total(&r.handle).await;
    assert!(r.stop().await.drained);
    sum
}

/// The total counted over all keys.
async fn total(h: &RuntimeHandle) -> i64 {
    let mut sum = 0;
    for k in 0..KEYS {
        let a = Address::new(COUNTER, format!("k{k}")).unwrap();
        sum += h.state(&a, &SEEN).await.unwrap().unwrap_or(0);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_progress_read_loses_no_record() {
    // With one partition, read 1 is the generator's committed-offset lookup and read 2
    // the partition's own, on its first records.
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults {
        failing_reads: Arc::new(vec![2]),
        ..Default::default()
    };
    assert_eq!(run(dir.path(), 100, 1, faults.clone()).await, 100);
    assert!(
        faults.progress_reads.load(Ordering::SeqCst) >= 3,
        "read 2 failed and was retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_retries_a_failed_committed_offset_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults {
        failing_reads: Arc::new(vec![1]),
        ..Default::default()
    };
    assert_eq!(run(dir.path(), 50, 1, faults.clone()).await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_inbox_write_after_skipped_records_leaves_nothing_outstanding() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(run(dir.path(), 60, 2, Faults::default()).await, 60);
    // Replay with more records: the first 60 are skipped by the partitions that stored
    // them, and the write that follows fails a few times.
    let faults = Faults::default();
    faults.writes_with_progress.store(3, Ordering::SeqCst);
    assert_eq!(run(dir.path(), 120, 2, faults.clone()).await, 120);
    assert_eq!(
        faults.writes_with_progress.load(Ordering::SeqCst),
        0,
        "the failures were injected"
    );
}
