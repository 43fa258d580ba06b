//! State throughput through the runtime's state API (`PartitionStore::get` / `write`,
//! one `WriteBatch` per write as the partition does per completed invocation batch), on
//! RocksDB and in memory, with raw RocksDB measured in the same run as the baseline:
//! same options (`RocksDbOptions::db_options`), same key and value bytes, keys
//! precomputed, `get_pinned` / `put_opt`. Value sizes 64 B and 1 KiB; 100 000 keys
//! preloaded; operations: get, put, read-modify-write.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use statefun_runtime::PartitionId;
use statefun_runtime::state::codec::keys;
use statefun_runtime::state::rocksdb::RocksDbOptions;
use statefun_runtime::state::{
    MemoryBackend, PartitionStore, RocksDbBackend, StateBackend, StoredValue, WriteBatch, WriteOp,
};
use statefun_sdk::bytes::Bytes;
use statefun_sdk::{Address, TypeName};

const KEYS: usize = 100_000;
const OPS: usize = 1_000;
const T: TypeName = TypeName::from_static("bench/state");

fn addresses() -> Vec<Address> {
    (0..KEYS)
        .map(|i| Address::new(T, format!("key-{i:08}")).unwrap())
        .collect()
}

/// A fixed pseudo-random visiting order (a stride coprime to KEYS).
fn order() -> Vec<usize> {
    (0..OPS).map(|i| (i * 7_919 + 13) % KEYS).collect()
}

fn put_op(a: &Address, name: &Arc<str>, v: &Bytes) -> WriteBatch {
    WriteBatch {
        ops: vec![WriteOp {
            address: a.clone(),
            name: Arc::clone(name),
            value: Some(StoredValue {
                value: v.clone(),
                expires_at_ms: None,
            }),
        }],
        ..Default::default()
    }
}

fn ours(c: &mut Criterion, label: &str, store: &mut dyn PartitionStore, size: usize) {
    let addrs = addresses();
    let idx = order();
    let name: Arc<str> = Arc::from("v");
    let value = Bytes::from(vec![7u8; size]);
    for chunk in addrs.chunks(1000) {
        let mut wb = WriteBatch::default();
        for a in chunk {
            wb.ops.extend(put_op(a, &name, &value).ops);
        }
        store.write(wb).unwrap();
    }
    let mut g = c.benchmark_group(format!("state/{label}"));
    g.throughput(Throughput::Elements(OPS as u64));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function(BenchmarkId::new("get", size), |b| {
        b.iter(|| {
            for &i in &idx {
                black_box(store.get(&addrs[i], "v").unwrap());
            }
        })
    });
    g.bench_function(BenchmarkId::new("put", size), |b| {
        b.iter(|| {
            for &i in &idx {
                store.write(put_op(&addrs[i], &name, &value)).unwrap();
            }
        })
    });
    g.bench_function(BenchmarkId::new("read-modify-write", size), |b| {
        b.iter(|| {
            for &i in &idx {
                let mut v = store.get(&addrs[i], "v").unwrap().unwrap().value.to_vec();
                v[0] = v[0].wrapping_add(1);
                store.write(put_op(&addrs[i], &name, &Bytes::from(v))).unwrap();
            }
        })
    });
    g.finish();
}

fn raw(c: &mut Criterion, size: usize) {
    let dir = tempfile::tempdir().unwrap();
    let opts = RocksDbOptions::default();
    let db = rocksdb::DB::open(&opts.db_options(), dir.path()).unwrap();
    let wo = opts.write_options();
    let addrs = addresses();
    let idx = order();
    let keys: Vec<Vec<u8>> = addrs.iter().map(|a| keys::state_key(PartitionId(0), a, "v")).collect();
    // The same bytes our backend stores: 2-byte value header, then the value.
    let mut value = vec![1u8, 0];
    value.extend(std::iter::repeat_n(7u8, size));
    for chunk in keys.chunks(1000) {
        let mut wb = rocksdb::WriteBatch::default();
        for k in chunk {
            wb.put(k, &value);
        }
        db.write_opt(wb, &wo).unwrap();
    }
    let mut g = c.benchmark_group("state/raw-rocksdb");
    g.throughput(Throughput::Elements(OPS as u64));
    g.measurement_time(Duration::from_secs(3));
    g.bench_function(BenchmarkId::new("get", size), |b| {
        b.iter(|| {
            for &i in &idx {
                black_box(db.get_pinned(&keys[i]).unwrap());
            }
        })
    });
    g.bench_function(BenchmarkId::new("put", size), |b| {
        b.iter(|| {
            for &i in &idx {
                db.put_opt(&keys[i], &value, &wo).unwrap();
            }
        })
    });
    g.bench_function(BenchmarkId::new("read-modify-write", size), |b| {
        b.iter(|| {
            for &i in &idx {
                let mut v = db.get_pinned(&keys[i]).unwrap().unwrap().to_vec();
                v[2] = v[2].wrapping_add(1);
                db.put_opt(&keys[i], &v, &wo).unwrap();
            }
        })
    });
    g.finish();
}

fn state(c: &mut Criterion) {
    for size in [64usize, 1024] {
        raw(c, size);
        let dir = tempfile::tempdir().unwrap();
        let backend = RocksDbBackend::open(dir.path(), RocksDbOptions::default()).unwrap();
        let mut store = backend.open_partition(PartitionId(0)).unwrap();
        ours(c, "rocksdb", &mut *store, size);
        let mut mem = MemoryBackend::new().open_partition(PartitionId(0)).unwrap();
        ours(c, "memory", &mut *mem, size);
    }
}

criterion_group!(benches, state);
criterion_main!(benches);
