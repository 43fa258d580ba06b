//! Checkpoints of real RocksDB state in temp dirs: a checkpoint restores to the same
//! data and progress; retention keeps the newest N; an interrupted checkpoint (no
//! manifest) is never used; a truncated or missing file makes restore fail with an
//! error naming the file, and start-up refuses rather than starting empty. Also: state
//! written through the runtime survives a runtime restart on the same database, and an
//! on-demand checkpoint through the handle works while running.

use std::sync::Arc;

use bytes::Bytes;
use statefun_runtime::PartitionId;
use statefun_runtime::state::checkpoint;
use statefun_runtime::state::{
    PartitionStore, RocksDbBackend, RocksDbOptions, StateBackend, StoredValue, WriteBatch, WriteOp,
};
use statefun_runtime::testkit;
use statefun_sdk::prelude::*;

const T: TypeName = TypeName::from_static("test/ckpt");
const COUNT: ValueSpec<i64> = ValueSpec::named("count");

fn opts(root: &std::path::Path, retain: usize) -> RocksDbOptions {
    RocksDbOptions {
        checkpoint_dir: Some(root.to_path_buf()),
        checkpoints_retained: retain,
        ..Default::default()
    }
}

fn fill(b: &RocksDbBackend, p: u32, n: usize, tag: &str, position: u64) {
    let mut s = b.open_partition(PartitionId(p)).unwrap();
    let ops = (0..n)
        .map(|i| WriteOp {
            address: Address::new(T, format!("k{i}")).unwrap(),
            name: Arc::from("count"),
            value: Some(StoredValue {
                value: Bytes::from(format!("{tag}{i}")),
                expires_at_ms: None,
            }),
        })
        .collect();
    s.write(WriteBatch {
        ops,
        progress: vec![("gen".into(), position)],
        ..Default::default()
    })
    .unwrap();
}

fn read(s: &dyn PartitionStore, i: usize) -> Option<Bytes> {
    s.get(&Address::new(T, format!("k{i}")).unwrap(), "count")
        .unwrap()
        .map(|v| v.value)
}

#[test]
fn a_checkpoint_restores_the_same_data_and_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ckpt");
    let b = RocksDbBackend::open(tmp.path().join("db"), opts(&root, 3)).unwrap();
    fill(&b, 0, 100, "a", 10);
    fill(&b, 5, 10, "b", 20);
    let m = b.create_checkpoint().unwrap();
    fill(&b, 0, 100, "after", 99); // not in the checkpoint
    assert_eq!(m.partitions, vec![0, 5]);
    assert_eq!(
        m.progress.iter().map(|p| (p.partition, p.position)).collect::<Vec<_>>(),
        vec![(0, 10), (5, 20)]
    );

    let (restored, manifest) = RocksDbBackend::open_or_restore(tmp.path().join("db2"), opts(&root, 3)).unwrap();
    assert_eq!(manifest.unwrap().id, m.id);
    let s0 = restored.open_partition(PartitionId(0)).unwrap();
    assert_eq!(read(&*s0, 7).unwrap(), "a7");
    assert_eq!(s0.progress("gen").unwrap(), Some(10));
    assert_eq!(
        read(&*restored.open_partition(PartitionId(5)).unwrap(), 3).unwrap(),
        "b3"
    );
}

#[test]
fn retention_keeps_the_newest_checkpoints_and_interrupted_ones_are_never_used() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ckpt");
    let b = RocksDbBackend::open(tmp.path().join("db"), opts(&root, 2)).unwrap();
    for i in 0..4 {
        fill(&b, 0, 5, &format!("v{i}-"), i);
        b.create_checkpoint().unwrap();
    }
    let ids: Vec<u64> = checkpoint::list(&root).unwrap().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![3, 4]);
    // A directory without a manifest is an interrupted checkpoint: not listed, not restored.
    std::fs::create_dir_all(root.join(format!("{:020}", 9)).join("db")).unwrap();
    assert_eq!(checkpoint::list(&root).unwrap().last().unwrap().0, 4);
    let (r, m) = RocksDbBackend::open_or_restore(tmp.path().join("db2"), opts(&root, 2)).unwrap();
    assert_eq!(m.unwrap().id, 4);
    assert_eq!(read(&*r.open_partition(PartitionId(0)).unwrap(), 1).unwrap(), "v3-1");
}

#[test]
fn a_truncated_checkpoint_file_is_named_and_start_up_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ckpt");
    let b = RocksDbBackend::open(tmp.path().join("db"), opts(&root, 3)).unwrap();
    fill(&b, 0, 1000, "x", 1);
    let m = b.create_checkpoint().unwrap();
    let dir = checkpoint::list(&root).unwrap().pop().unwrap().1;
    let victim = m.files.iter().find(|f| f.bytes > 0).unwrap();
    let path = dir.join("db").join(&victim.name);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(victim.bytes / 2).unwrap();

    let err = checkpoint::verify(&dir).unwrap_err().to_string();
    assert!(err.contains(&victim.name) && err.contains("truncated"), "{err}");
    let err = RocksDbBackend::open_or_restore(tmp.path().join("db2"), opts(&root, 3))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&victim.name), "{err}");
    assert!(
        !tmp.path().join("db2").join("CURRENT").exists(),
        "no empty database was started"
    );

    std::fs::remove_file(&path).unwrap();
    let err = checkpoint::verify(&dir).unwrap_err().to_string();
    assert!(err.contains("missing") && err.contains(&victim.name), "{err}");
}

#[test]
fn a_corrupt_manifest_is_reported_with_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ckpt");
    let b = RocksDbBackend::open(tmp.path().join("db"), opts(&root, 3)).unwrap();
    fill(&b, 0, 10, "x", 1);
    b.create_checkpoint().unwrap();
    let dir = checkpoint::list(&root).unwrap().pop().unwrap().1;
    std::fs::write(dir.join("MANIFEST.json"), b"{ not json").unwrap();
    let err = checkpoint::verify(&dir).unwrap_err().to_string();
    assert!(err.contains("MANIFEST.json") && err.contains("corrupt"), "{err}");
}

fn counter(ctx: &mut Context, msg: Message) -> FunctionResult {
    let n = ctx.storage().get(&COUNT)?.unwrap_or(0) + msg.decode::<i64>()?;
    ctx.storage().set(&COUNT, &n)?;
    Ok(())
}

async fn run_once(db: &std::path::Path, root: &std::path::Path, sends: i64) -> (i64, Option<u64>) {
    let module = Module::builder()
        .with_fn(FunctionSpec::new(T).with_state(COUNT), counter)
        .build()
        .unwrap();
    let backend = RocksDbBackend::open(db, opts(root, 3)).unwrap();
    let r = testkit::runtime(module).partitions(4).backend(backend).start();
    let h = &r.handle;
    let a = Address::new(T, "a").unwrap();
    for _ in 0..sends {
        h.send_value(a.clone(), &1i64).await.unwrap();
    }
    h.wait_idle().await;
    let ckpt = h.checkpoint().await.unwrap().map(|c| c.id);
    let n = h.state(&a, &COUNT).await.unwrap().unwrap_or(0);
    r.stop().await;
    (n, ckpt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_runtime_restart_and_checkpoints_are_taken_on_demand() {
    let tmp = tempfile::tempdir().unwrap();
    let (db, root) = (tmp.path().join("db"), tmp.path().join("ckpt"));
    assert_eq!(run_once(&db, &root, 5).await, (5, Some(1)));
    assert_eq!(run_once(&db, &root, 3).await, (8, Some(2)));
}
