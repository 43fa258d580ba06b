//! Checkpoint and restore of the RocksDB state backend with 1 000 000 keys: 64-byte
//! pseudo-random (incompressible) values, keys spread over 8 partitions, loaded once
//! (not timed) through `PartitionStore::write` in batches of 1000 ops, each batch with a
//! progress marker as the partition writes it.
//!
//! Measured:
//! * `create/flushed`: `RocksDbBackend::create_checkpoint` with an empty memtable (the
//!   previous checkpoint flushed it): hard-link checkpoint, manifest, retention.
//! * `create/dirty-100k`, `create/dirty-400k`: the same after rewriting 100 000 or
//!   400 000 keys (not timed), so the checkpoint includes RocksDB's memtable flush
//!   (`Checkpoint::create_checkpoint` passes `log_size_for_flush = 0`: always flush).
//! * `restore/hard-link`: `RocksDbBackend::open_or_restore` into a fresh empty directory
//!   on the same filesystem (files are hard-linked), plus reading one key.
//! * `restore/copy-tmpfs`: the same with the target on `/dev/shm`, another filesystem,
//!   so every file is copied.
//! * Raw RocksDB baselines on the same data and options: `Checkpoint::create_checkpoint`
//!   alone, and hard-linking the files plus `DB::open` plus one read; and the step of our
//!   `create` that reads the checkpoint back (read-only open, per-partition seeks,
//!   progress-marker scan).
//!
//! Also prints the load time and the checkpoint's size on disk.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use statefun_runtime::PartitionId;
use statefun_runtime::state::checkpoint::CheckpointManifest;
use statefun_runtime::state::codec::keys::{self, Key};
use statefun_runtime::state::rocksdb::RocksDbOptions;
use statefun_runtime::state::{PartitionStore, RocksDbBackend, StateBackend, StoredValue, WriteBatch, WriteOp};
use statefun_sdk::bytes::Bytes;
use statefun_sdk::{Address, TypeName};

const KEYS: usize = 1_000_000;
const PARTITIONS: u32 = 8;
const BATCH: usize = 1_000;
const VALUE: usize = 64;
/// Keys rewritten before each `create/dirty-*` iteration: 10% of the keys, and 40%, about
/// 50 MiB of memtable, close to the 64 MiB `write_buffer_size` at which RocksDB would
/// flush by itself (so the most a checkpoint ever has to flush, with one memtable).
const DIRTY: [usize; 2] = [100_000, 400_000];
const T: TypeName = TypeName::from_static("bench/checkpoint");
const SOURCE: &str = "bench-source";

fn address(i: usize) -> Address {
    Address::new(T, format!("key-{i:08}")).unwrap()
}

fn partition(i: usize) -> PartitionId {
    PartitionId((i % PARTITIONS as usize) as u32)
}

/// 64 pseudo-random bytes (splitmix64), different per key and per round.
fn value(i: usize, round: u64) -> Bytes {
    let mut s = (i as u64) ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(VALUE);
    while out.len() < VALUE {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    Bytes::from(out)
}

/// Writes `value(i, round)` for every `i` through the partition stores, one
/// `WriteBatch` of up to `BATCH` ops (plus a progress marker) per partition at a time.
fn write_keys(stores: &mut [Box<dyn PartitionStore>], indices: impl Iterator<Item = usize>, round: u64) {
    let name: std::sync::Arc<str> = std::sync::Arc::from("v");
    let mut pending: Vec<WriteBatch> = (0..PARTITIONS).map(|_| WriteBatch::default()).collect();
    let mut position = 0u64;
    let mut flush = |p: usize, wb: &mut WriteBatch, stores: &mut [Box<dyn PartitionStore>]| {
        position += 1;
        wb.progress.push((SOURCE.to_owned(), position));
        stores[p].write(std::mem::take(wb)).unwrap();
    };
    for i in indices {
        let p = partition(i).0 as usize;
        pending[p].ops.push(WriteOp {
            address: address(i),
            name: std::sync::Arc::clone(&name),
            value: Some(StoredValue {
                value: value(i, round),
                expires_at_ms: None,
            }),
        });
        if pending[p].ops.len() == BATCH {
            flush(p, &mut pending[p], stores);
        }
    }
    for (p, wb) in pending.iter_mut().enumerate() {
        if !wb.ops.is_empty() {
            flush(p, wb, stores);
        }
    }
}

/// `n` distinct keys spread over all partitions (a stride coprime to KEYS).
fn dirty_keys(n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(|j| (j * 7_919 + 13) % KEYS)
}

fn options(checkpoints: &Path) -> RocksDbOptions {
    RocksDbOptions {
        checkpoint_dir: Some(checkpoints.to_path_buf()),
        ..Default::default()
    }
}

/// Reads one key of partition 3 from a restored backend, proving it is usable.
fn probe(backend: &RocksDbBackend) {
    const PROBE: usize = 123_459;
    let v = backend
        .open_partition(partition(PROBE))
        .unwrap()
        .get(&address(PROBE), "v")
        .unwrap()
        .expect("restored state holds the probe key");
    assert_eq!(v.value.len(), VALUE);
}

fn checkpoint_dir(root: &Path, m: &CheckpointManifest) -> PathBuf {
    root.join(format!("{:020}", m.id))
}

fn hard_link_all(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::hard_link(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// What our `create` does after RocksDB's checkpoint: open it read-only, find the
/// partitions by seeking, read the progress markers. Returns (partitions, markers).
fn read_back(db_dir: &Path) -> (usize, usize) {
    let db = rocksdb::DB::open_for_read_only(&rocksdb::Options::default(), db_dir, false).unwrap();
    let mut partitions = 0;
    let mut p = 0u32;
    loop {
        let prefix = keys::partition_prefix(keys::KIND_STATE, PartitionId(p));
        let mut it = db.iterator(rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward));
        let Some(Ok((k, _))) = it.next() else { break };
        match keys::decode(&k) {
            Ok(Key::State { partition, .. }) => {
                partitions += 1;
                p = partition.0 + 1;
            }
            _ => break,
        }
    }
    let start = [keys::FORMAT_VERSION, keys::KIND_PROGRESS];
    let markers = db
        .iterator(rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward))
        .take_while(|r| matches!(keys::decode(&r.as_ref().unwrap().0), Ok(Key::Progress { .. })))
        .count();
    (partitions, markers)
}

fn checkpoint(c: &mut Criterion) {
    let base = tempfile::tempdir().unwrap();
    let db_path = base.path().join("db");
    let root = base.path().join("checkpoints");

    // Load once, then let RocksDB finish its background compactions so that they do not
    // run inside the measurements: close, reopen raw, wait, close.
    let started = Instant::now();
    {
        let backend = RocksDbBackend::open(&db_path, options(&root)).unwrap();
        let mut stores: Vec<_> = (0..PARTITIONS)
            .map(|p| backend.open_partition(PartitionId(p)).unwrap())
            .collect();
        write_keys(&mut stores, 0..KEYS, 0);
    }
    let loaded = started.elapsed();
    {
        let db = rocksdb::DB::open(&RocksDbOptions::default().db_options(), &db_path).unwrap();
        let mut w = rocksdb::WaitForCompactOptions::default();
        w.set_flush(true);
        db.wait_for_compact(&w).unwrap();
    }
    println!(
        "load: {KEYS} keys through PartitionStore::write in {:.2} s ({:.0} k keys/s); settled after {:.2} s",
        loaded.as_secs_f64(),
        KEYS as f64 / loaded.as_secs_f64() / 1e3,
        started.elapsed().as_secs_f64()
    );

    let backend = RocksDbBackend::open(&db_path, options(&root)).unwrap();
    let mut stores: Vec<_> = (0..PARTITIONS)
        .map(|p| backend.open_partition(PartitionId(p)).unwrap())
        .collect();
    let m = backend.create_checkpoint().unwrap();
    assert_eq!(m.partitions, (0..PARTITIONS).collect::<Vec<_>>());
    assert_eq!(m.progress.len(), PARTITIONS as usize);
    let sst: u64 = m
        .files
        .iter()
        .filter(|f| f.name.ends_with(".sst"))
        .map(|f| f.bytes)
        .sum();
    let all: u64 = m.files.iter().map(|f| f.bytes).sum();
    println!(
        "checkpoint of {KEYS} keys: {} files, {:.1} MiB ({:.1} MiB in {} SST files); files: {:?}",
        m.files.len(),
        all as f64 / 1048576.0,
        sst as f64 / 1048576.0,
        m.files.iter().filter(|f| f.name.ends_with(".sst")).count(),
        m.files.iter().map(|f| (&f.name, f.bytes)).collect::<Vec<_>>()
    );

    let mut g = c.benchmark_group("checkpoint");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(2));

    g.bench_function("create/flushed", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                backend.create_checkpoint().unwrap();
                total += t.elapsed();
            }
            total
        })
    });

    let mut round = 0;
    for dirty in DIRTY {
        g.bench_function(format!("create/dirty-{}k", dirty / 1000), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    round += 1;
                    write_keys(&mut stores, dirty_keys(dirty), round);
                    let t = Instant::now();
                    backend.create_checkpoint().unwrap();
                    total += t.elapsed();
                }
                total
            })
        });
    }

    // Restore from one fixed, flushed checkpoint.
    let m = backend.create_checkpoint().unwrap();
    let newest = checkpoint_dir(&root, &m);
    // Retention must not delete the checkpoint restored from: no checkpoints from here on.
    let restore_options = options(&root);
    let mut n = 0;
    let mut restore = |b: &mut criterion::Bencher, parent: &Path| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let target = parent.join(format!("restore-{n}"));
                let t = Instant::now();
                let (restored, manifest) = RocksDbBackend::open_or_restore(&target, restore_options.clone()).unwrap();
                probe(&restored);
                total += t.elapsed();
                assert_eq!(manifest.map(|m| m.id), Some(m.id));
                drop(restored);
                std::fs::remove_dir_all(&target).unwrap();
            }
            total
        })
    };
    g.bench_function("restore/hard-link", |b| restore(b, base.path()));
    if Path::new("/dev/shm").is_dir() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        g.bench_function("restore/copy-tmpfs", |b| restore(b, shm.path()));
    }

    // Raw RocksDB on the same data and options.
    let raw_path = base.path().join("raw");
    hard_link_all(&newest.join("db"), &raw_path);
    let raw = rocksdb::DB::open(&RocksDbOptions::default().db_options(), &raw_path).unwrap();
    let mut k = 0;
    g.bench_function("raw-rocksdb/checkpoint", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                k += 1;
                let target = base.path().join(format!("raw-checkpoint-{k}"));
                let t = Instant::now();
                rocksdb::checkpoint::Checkpoint::new(&raw)
                    .unwrap()
                    .create_checkpoint(&target)
                    .unwrap();
                total += t.elapsed();
                std::fs::remove_dir_all(&target).unwrap();
            }
            total
        })
    });
    let probe_key = keys::state_key(partition(123_459), &address(123_459), "v");
    g.bench_function("raw-rocksdb/link-open-get", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                k += 1;
                let target = base.path().join(format!("raw-restore-{k}"));
                let t = Instant::now();
                hard_link_all(&newest.join("db"), &target);
                let db = rocksdb::DB::open(&RocksDbOptions::default().db_options(), &target).unwrap();
                assert!(db.get_pinned(&probe_key).unwrap().is_some());
                total += t.elapsed();
                drop(db);
                std::fs::remove_dir_all(&target).unwrap();
            }
            total
        })
    });
    g.bench_function("step/read-back-checkpoint", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let found = read_back(&newest.join("db"));
                total += t.elapsed();
                assert_eq!(found, (PARTITIONS as usize, PARTITIONS as usize));
            }
            total
        })
    });
    g.finish();

    // How much memtable the dirty rewrites leave for a checkpoint to flush: the same
    // writes on the raw database (same key and value bytes, one batch per partition).
    for dirty in DIRTY {
        raw.flush().unwrap();
        let indices: Vec<usize> = dirty_keys(dirty).collect();
        for p in 0..PARTITIONS as usize {
            for chunk in indices
                .iter()
                .filter(|&&i| partition(i).0 as usize == p)
                .collect::<Vec<_>>()
                .chunks(BATCH)
            {
                let mut wb = rocksdb::WriteBatch::default();
                for &&i in chunk {
                    let mut v = vec![1u8, 0];
                    v.extend_from_slice(&value(i, 1_000_000));
                    wb.put(keys::state_key(partition(i), &address(i), "v"), v);
                }
                raw.write(wb).unwrap();
            }
        }
        let prop = |name: &str| raw.property_int_value(name).unwrap().unwrap_or(0);
        println!(
            "after rewriting {dirty} keys: memtables {:.1} MiB, {} immutable, {} flushes pending",
            prop("rocksdb.cur-size-all-mem-tables") as f64 / 1048576.0,
            prop("rocksdb.num-immutable-mem-table"),
            prop("rocksdb.mem-table-flush-pending"),
        );
    }
}

criterion_group!(benches, checkpoint);
criterion_main!(benches);
