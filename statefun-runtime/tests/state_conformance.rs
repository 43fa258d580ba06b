//! Conformance suite every state backend passes: the same checks run against the
//! in-memory backend and against RocksDB in a temp dir (real RocksDB, no mock).
//! Proves: get/put/overwrite/delete per (address, name); batches apply in order;
//! expiry metadata round-trips; ids that are prefixes of each other, equal ids of
//! different types, and different partitions never collide; progress markers are
//! stored with the batch; a random sequence of batches leaves the store equal to a
//! `HashMap` model; durable logs (inbox, timers, egress) read back per partition and
//! kind in key order. For durable backends also: everything survives a reopen, and
//! each opening has a new incarnation. The changelogged backend (RocksDB behind a
//! changelog; here an in-memory changelog, the Kafka one is tested against a broker in
//! `statefun-kafka`) passes too, and its "reopen" is onto an empty directory: the state
//! comes back from the changelog alone.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;
use statefun_runtime::PartitionId;
use statefun_runtime::state::{
    Changelog, ChangelogBackend, CommitUnit, LogKey, LogKind, LogOp, MemoryBackend, PartitionStore, RawOp,
    StateBackend, StoredValue, WriteBatch, WriteOp,
};
use statefun_sdk::{Address, TypeName};

/// A backend under test: how to make one, and how to reopen it (durable backends).
trait Subject {
    fn backend(&self) -> Arc<dyn StateBackend>;
    /// Drops and reopens the backend; `None` for backends that do not persist.
    fn reopen(&mut self) -> Option<Arc<dyn StateBackend>>;
}

struct Memory;
impl Subject for Memory {
    fn backend(&self) -> Arc<dyn StateBackend> {
        Arc::new(MemoryBackend::new())
    }
    fn reopen(&mut self) -> Option<Arc<dyn StateBackend>> {
        None
    }
}

struct Rocks {
    dir: tempfile::TempDir,
    current: Option<Arc<dyn StateBackend>>,
}
impl Rocks {
    fn new() -> Rocks {
        Rocks {
            dir: tempfile::tempdir().unwrap(),
            current: None,
        }
    }
    fn open(&self) -> Arc<dyn StateBackend> {
        Arc::new(statefun_runtime::state::RocksDbBackend::open(self.dir.path(), Default::default()).unwrap())
    }
}
impl Subject for Rocks {
    fn backend(&self) -> Arc<dyn StateBackend> {
        self.open()
    }
    fn reopen(&mut self) -> Option<Arc<dyn StateBackend>> {
        self.current = None;
        let b = self.open();
        self.current = Some(b.clone());
        Some(b)
    }
}

/// An in-memory changelog: committed changes per partition, in order.
#[derive(Default)]
struct MemoryChangelog {
    log: std::sync::Mutex<HashMap<PartitionId, Vec<RawOp>>>,
    /// Fail every commit (a broker that is away).
    fail: std::sync::atomic::AtomicBool,
    /// Messages committed for partitions owned elsewhere (cluster mode), in order.
    messages: std::sync::Mutex<Vec<(PartitionId, Bytes)>>,
}

impl Changelog for MemoryChangelog {
    fn takes_egress(&self, _egress: &TypeName) -> bool {
        false
    }
    fn commit(&self, unit: &CommitUnit) -> Result<Vec<(PartitionId, i64)>, statefun_runtime::state::Error> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(statefun_runtime::state::Error::Transient("broker away".into()));
        }
        let mut log = self.log.lock().unwrap();
        let mut positions = Vec::new();
        for (p, changes) in &unit.changes {
            let l = log.entry(*p).or_default();
            l.extend(changes.iter().map(|(k, v)| RawOp {
                key: k.clone(),
                value: v.clone(),
            }));
            positions.push((*p, l.len() as i64 - 1));
        }
        self.messages.lock().unwrap().extend(unit.messages.iter().cloned());
        Ok(positions)
    }
    fn restore(
        &self,
        partition: PartitionId,
        after: Option<i64>,
        apply: &mut dyn FnMut(Vec<RawOp>, i64) -> Result<(), statefun_runtime::state::Error>,
    ) -> Result<(), statefun_runtime::state::Error> {
        let log = self.log.lock().unwrap();
        let l = log.get(&partition).cloned().unwrap_or_default();
        let from = after.map_or(0, |a| a as usize + 1);
        if from < l.len() {
            apply(l[from..].to_vec(), l.len() as i64 - 1)?;
        }
        Ok(())
    }
}

struct Changelogged {
    changelog: Arc<MemoryChangelog>,
    dirs: std::sync::Mutex<Vec<tempfile::TempDir>>,
}
impl Changelogged {
    fn new() -> Changelogged {
        Changelogged {
            changelog: Arc::default(),
            dirs: Default::default(),
        }
    }
    /// A backend on a new, empty directory, restored from the changelog.
    fn open(&self) -> Arc<dyn StateBackend> {
        let dir = tempfile::tempdir().unwrap();
        let rocks = statefun_runtime::state::RocksDbBackend::open(dir.path(), Default::default()).unwrap();
        self.dirs.lock().unwrap().push(dir);
        let changelog: Arc<dyn Changelog> = self.changelog.clone();
        let (b, _) = ChangelogBackend::open(rocks, changelog, 16, std::time::Duration::from_millis(10)).unwrap();
        Arc::new(b)
    }
}
impl Subject for Changelogged {
    fn backend(&self) -> Arc<dyn StateBackend> {
        self.open()
    }
    fn reopen(&mut self) -> Option<Arc<dyn StateBackend>> {
        Some(self.open())
    }
}

fn addr(t: &str, id: &str) -> Address {
    Address::new(TypeName::parse(t).unwrap(), id).unwrap()
}

fn put(a: &Address, name: &str, v: &[u8], exp: Option<u64>) -> WriteOp {
    WriteOp {
        address: a.clone(),
        name: Arc::from(name),
        value: Some(StoredValue {
            value: Bytes::copy_from_slice(v),
            expires_at_ms: exp,
        }),
    }
}

fn del(a: &Address, name: &str) -> WriteOp {
    WriteOp {
        address: a.clone(),
        name: Arc::from(name),
        value: None,
    }
}

fn batch(ops: Vec<WriteOp>) -> WriteBatch {
    WriteBatch {
        ops,
        ..Default::default()
    }
}

fn value(s: &dyn PartitionStore, a: &Address, name: &str) -> Option<Vec<u8>> {
    s.get(a, name).unwrap().map(|v| v.value.to_vec())
}

fn basic_operations(subject: &mut dyn Subject) {
    let b = subject.backend();
    let mut s = b.open_partition(PartitionId(0)).unwrap();
    let a = addr("t/f", "a");
    assert_eq!(s.get(&a, "x").unwrap(), None, "missing reads as None");
    s.write(batch(vec![put(&a, "x", b"1", None), put(&a, "y", b"2", Some(77))]))
        .unwrap();
    assert_eq!(value(&*s, &a, "x"), Some(b"1".to_vec()));
    assert_eq!(s.get(&a, "y").unwrap().unwrap().expires_at_ms, Some(77));
    s.write(batch(vec![put(&a, "x", b"3", None)])).unwrap();
    assert_eq!(value(&*s, &a, "x"), Some(b"3".to_vec()), "overwrite");
    s.write(batch(vec![del(&a, "x"), del(&a, "never-written")])).unwrap();
    assert_eq!(value(&*s, &a, "x"), None, "delete");
    assert_eq!(value(&*s, &a, "y"), Some(b"2".to_vec()), "delete touches one name only");
    s.write(batch(vec![
        put(&a, "z", b"1", None),
        del(&a, "z"),
        put(&a, "w", b"", None),
        del(&a, "w"),
        put(&a, "w", b"", None),
    ]))
    .unwrap();
    assert_eq!(value(&*s, &a, "z"), None, "ops of a batch apply in order");
    assert_eq!(
        value(&*s, &a, "w"),
        Some(vec![]),
        "an empty value is a value, not an absence"
    );
}

fn keys_never_collide(subject: &mut dyn Subject) {
    let b = subject.backend();
    let mut p0 = b.open_partition(PartitionId(0)).unwrap();
    let mut p1 = b.open_partition(PartitionId(1)).unwrap();
    let (a, ab, other_type) = (addr("t/f", "a"), addr("t/f", "ab"), addr("t/g", "a"));
    p0.write(batch(vec![
        put(&a, "bc", b"a/bc", None),
        put(&ab, "c", b"ab/c", None),
        put(&other_type, "bc", b"g", None),
    ]))
    .unwrap();
    p1.write(batch(vec![put(&a, "bc", b"p1", None)])).unwrap();
    assert_eq!(value(&*p0, &a, "bc"), Some(b"a/bc".to_vec()));
    assert_eq!(value(&*p0, &ab, "c"), Some(b"ab/c".to_vec()));
    assert_eq!(value(&*p0, &a, "b"), None);
    assert_eq!(value(&*p0, &other_type, "bc"), Some(b"g".to_vec()));
    assert_eq!(value(&*p1, &a, "bc"), Some(b"p1".to_vec()), "partitions are isolated");
    assert_eq!(value(&*p1, &ab, "c"), None);
}

fn progress_is_stored_with_the_batch(subject: &mut dyn Subject) {
    let b = subject.backend();
    let mut s = b.open_partition(PartitionId(3)).unwrap();
    assert_eq!(s.progress("src").unwrap(), None);
    let a = addr("t/f", "a");
    s.write(WriteBatch {
        ops: vec![put(&a, "x", b"1", None)],
        progress: vec![("src".into(), 41), ("other".into(), 7)],
        ..Default::default()
    })
    .unwrap();
    s.write(WriteBatch {
        progress: vec![("src".into(), 42)],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.progress("src").unwrap(), Some(42));
    assert_eq!(s.progress("other").unwrap(), Some(7));
    assert_eq!(b.open_partition(PartitionId(4)).unwrap().progress("src").unwrap(), None);
}

fn survives_reopen(subject: &mut dyn Subject) {
    let b = subject.backend();
    let a = addr("t/f", "a");
    {
        let mut s = b.open_partition(PartitionId(2)).unwrap();
        s.write(WriteBatch {
            ops: vec![
                put(&a, "x", b"kept", Some(5)),
                put(&a, "gone", b"1", None),
                del(&a, "gone"),
            ],
            progress: vec![("src".into(), 9)],
            log: vec![log_put(2, LogKey::Timer { due_ms: 7, seq: 1 }, b"timer")],
            egress: vec![],
        })
        .unwrap();
    }
    let first = b.next_incarnation().unwrap();
    let second = b.next_incarnation().unwrap();
    drop(b);
    let Some(b) = subject.reopen() else { return };
    assert!(b.durable(), "a backend that reopens its data is durable");
    assert!(second > first, "every call gives a new incarnation");
    assert!(b.next_incarnation().unwrap() > second, "also after a reopen");
    b.check_partitions(4).unwrap();
    b.check_partitions(4).unwrap();
    let e = b.check_partitions(8).unwrap_err().to_string();
    assert!(e.contains("4 partitions") && e.contains("8"), "{e}");
    let s = b.open_partition(PartitionId(2)).unwrap();
    assert_eq!(
        s.log(LogKind::Timers).unwrap(),
        vec![(LogKey::Timer { due_ms: 7, seq: 1 }, Bytes::from_static(b"timer"))]
    );
    let v = s.get(&a, "x").unwrap().unwrap();
    assert_eq!((v.value.as_ref(), v.expires_at_ms), (&b"kept"[..], Some(5)));
    assert_eq!(value(&*s, &a, "gone"), None);
    assert_eq!(s.progress("src").unwrap(), Some(9));
}

/// A write carrying egress records for an egress id the backend does not take (none of
/// the subjects here takes any) is refused as a whole: the state change in the same
/// batch is not applied.
fn egress_records_are_refused_unless_the_backend_takes_them(subject: &mut dyn Subject) {
    let b = subject.backend();
    let out = TypeName::parse("t/out").unwrap();
    assert!(!b.takes_egress(&out));
    let a = addr("t/f", "a");
    let mut s = b.open_partition(PartitionId(0)).unwrap();
    let err = s
        .write(WriteBatch {
            ops: vec![put(&a, "x", b"must not be applied", None)],
            egress: vec![statefun_runtime::EgressRecord {
                egress: out,
                source: a.clone(),
                message: statefun_sdk::TypedValue::from_bytes(TypeName::parse("t/bytes").unwrap(), &b"r"[..]),
                id: None,
            }],
            ..Default::default()
        })
        .unwrap_err();
    assert!(err.to_string().contains("egress t/out"), "{err}");
    assert_eq!(value(&*s, &a, "x"), None);
}

fn log_put(p: u32, key: LogKey, v: &'static [u8]) -> LogOp {
    LogOp {
        partition: PartitionId(p),
        key,
        value: Some(Bytes::from_static(v)),
    }
}

fn log_del(p: u32, key: LogKey) -> LogOp {
    LogOp {
        partition: PartitionId(p),
        key,
        value: None,
    }
}

/// Logs: a partition may put into another partition's inbox; each log reads back in
/// key order, separated by kind and partition; deletes remove exactly their entry;
/// state, progress and log changes of one batch are applied together.
fn logs_are_per_partition_and_kind_in_key_order(subject: &mut dyn Subject) {
    let b = subject.backend();
    let mut p0 = b.open_partition(PartitionId(0)).unwrap();
    let p1 = b.open_partition(PartitionId(1)).unwrap();
    let inbox = |sender, seq| LogKey::Inbox {
        sender: PartitionId(sender),
        seq,
    };
    let a = addr("t/f", "a");
    p0.write(WriteBatch {
        ops: vec![put(&a, "x", b"1", None)],
        progress: vec![("src".into(), 3)],
        log: vec![
            log_put(1, inbox(0, 300), b"to p1, later"),
            log_put(1, inbox(0, 2), b"to p1, earlier"),
            log_put(0, inbox(0, 1), b"to self"),
            log_put(0, LogKey::Timer { due_ms: 50, seq: 4 }, b"t50"),
            log_put(0, LogKey::Timer { due_ms: 10, seq: 5 }, b"t10"),
            log_put(0, LogKey::Egress { seq: 6 }, b"e6"),
        ],
        egress: vec![],
    })
    .unwrap();
    let keys = |s: &dyn PartitionStore, k| s.log(k).unwrap().into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(
        keys(&*p1, LogKind::Inbox),
        vec![inbox(0, 2), inbox(0, 300)],
        "sequence order"
    );
    assert_eq!(keys(&*p0, LogKind::Inbox), vec![inbox(0, 1)]);
    assert_eq!(
        keys(&*p0, LogKind::Timers),
        vec![
            LogKey::Timer { due_ms: 10, seq: 5 },
            LogKey::Timer { due_ms: 50, seq: 4 }
        ],
        "due order"
    );
    assert_eq!(
        p0.log(LogKind::Egress).unwrap(),
        vec![(LogKey::Egress { seq: 6 }, Bytes::from_static(b"e6"))]
    );
    assert!(keys(&*p1, LogKind::Timers).is_empty() && keys(&*p1, LogKind::Egress).is_empty());
    assert_eq!(value(&*p0, &a, "x"), Some(b"1".to_vec()));
    assert_eq!(p0.progress("src").unwrap(), Some(3));
    p0.write(WriteBatch {
        log: vec![
            log_del(1, inbox(0, 2)),
            log_del(0, LogKey::Timer { due_ms: 10, seq: 5 }),
        ],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(keys(&*p1, LogKind::Inbox), vec![inbox(0, 300)]);
    assert_eq!(keys(&*p0, LogKind::Timers), vec![LogKey::Timer { due_ms: 50, seq: 4 }]);
}

type Op = (u8, u8, u8, Option<u8>); // (address, name, value, None = delete)

fn matches_model(subject: &mut dyn Subject, batches: Vec<Vec<Op>>) -> Result<(), TestCaseError> {
    let b = subject.backend();
    let mut s = b.open_partition(PartitionId(0)).unwrap();
    let mut model: HashMap<(u8, u8), u8> = HashMap::new();
    let a = |i: u8| addr("m/f", &format!("id{i}"));
    for ops in batches {
        let mut wb = batch(vec![]);
        for (ai, ni, _, v) in &ops {
            let name = format!("s{ni}");
            match v {
                Some(v) => {
                    wb.ops.push(put(&a(*ai), &name, &[*v], None));
                    model.insert((*ai, *ni), *v);
                }
                None => {
                    wb.ops.push(del(&a(*ai), &name));
                    model.remove(&(*ai, *ni));
                }
            }
        }
        s.write(wb).unwrap();
    }
    for ai in 0..6u8 {
        for ni in 0..3u8 {
            let got = value(&*s, &a(ai), &format!("s{ni}"));
            prop_assert_eq!(got, model.get(&(ai, ni)).map(|v| vec![*v]));
        }
    }
    Ok(())
}

fn ops() -> impl Strategy<Value = Vec<Vec<Op>>> {
    proptest::collection::vec(
        proptest::collection::vec((0u8..6, 0u8..3, any::<u8>(), proptest::option::of(any::<u8>())), 0..6),
        1..20,
    )
}

macro_rules! conformance {
    ($module:ident, $make:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn basic_operations() {
                super::basic_operations(&mut $make);
            }
            #[test]
            fn keys_never_collide() {
                super::keys_never_collide(&mut $make);
            }
            #[test]
            fn progress_is_stored_with_the_batch() {
                super::progress_is_stored_with_the_batch(&mut $make);
            }
            #[test]
            fn logs_are_per_partition_and_kind_in_key_order() {
                super::logs_are_per_partition_and_kind_in_key_order(&mut $make);
            }
            #[test]
            fn egress_records_are_refused_unless_the_backend_takes_them() {
                super::egress_records_are_refused_unless_the_backend_takes_them(&mut $make);
            }
            #[test]
            fn survives_reopen_if_durable() {
                super::survives_reopen(&mut $make);
            }
            proptest! {
                #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
                #[test]
                fn random_batches_match_a_hashmap_model(batches in ops()) {
                    super::matches_model(&mut $make, batches)?;
                }
            }
        }
    };
}

conformance!(memory, Memory);
conformance!(rocksdb, Rocks::new());
conformance!(changelogged, Changelogged::new());

/// The changelogged backend acknowledges only what it committed: progress is
/// committed only after a successful commit; a failed commit loses nothing and the
/// next one carries the older writes merged with the newer (latest value wins).
#[test]
fn changelogged_progress_is_committed_only_by_a_successful_commit() {
    let subject = Changelogged::new();
    let b = subject.open();
    let a = addr("t/f", "a");
    let p = PartitionId(1);
    let mut s = b.open_partition(p).unwrap();
    s.write(WriteBatch {
        ops: vec![put(&a, "x", b"1", None)],
        progress: vec![("src".into(), 5)],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        s.get(&a, "x").unwrap().unwrap().value,
        Bytes::from_static(b"1"),
        "reads see the overlay"
    );
    assert_eq!(s.progress("src").unwrap(), Some(5));
    assert_eq!(b.committed_progress(p, "src").unwrap(), None, "nothing committed yet");

    subject.changelog.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(b.commit(), Err(statefun_runtime::state::Error::Transient(_))));
    assert_eq!(
        b.committed_progress(p, "src").unwrap(),
        None,
        "a failed commit commits nothing"
    );
    s.write(WriteBatch {
        ops: vec![put(&a, "x", b"2", None)],
        progress: vec![("src".into(), 7)],
        ..Default::default()
    })
    .unwrap();
    subject.changelog.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    b.commit().unwrap();
    assert_eq!(b.committed_progress(p, "src").unwrap(), Some(7));
    b.commit().unwrap(); // nothing pending: a no-op

    let restored = subject.open();
    let s = restored.open_partition(p).unwrap();
    assert_eq!(s.get(&a, "x").unwrap().unwrap().value, Bytes::from_static(b"2"));
    assert_eq!(restored.committed_progress(p, "src").unwrap(), Some(7));
}

/// A log entry put and deleted within one commit interval never reaches the
/// changelog; one put before a commit and deleted after it is deleted there too.
#[test]
fn changelogged_log_entries_done_within_an_interval_are_never_committed() {
    let subject = Changelogged::new();
    let b = subject.open();
    let p = PartitionId(0);
    let mut s = b.open_partition(p).unwrap();
    let (short, long) = (LogKey::Inbox { sender: p, seq: 1 }, LogKey::Inbox { sender: p, seq: 2 });
    let write = |s: &mut Box<dyn PartitionStore>, log: Vec<LogOp>| {
        s.write(WriteBatch {
            log,
            ..Default::default()
        })
        .unwrap()
    };
    write(&mut s, vec![log_put(0, short, b"m1"), log_put(0, long, b"m2")]);
    write(&mut s, vec![LogOp::delete(p, short)]);
    assert_eq!(
        s.log(LogKind::Inbox).unwrap().len(),
        1,
        "the overlay reflects the delete"
    );
    b.commit().unwrap();
    let committed = |subject: &Changelogged| {
        subject
            .changelog
            .log
            .lock()
            .unwrap()
            .get(&p)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(
        committed(&subject).len(),
        1,
        "only the entry still pending was committed"
    );
    write(&mut s, vec![LogOp::delete(p, long)]);
    b.commit().unwrap();
    let log = committed(&subject);
    assert_eq!(log.len(), 2);
    assert_eq!(log[1].value, None, "a committed entry is deleted by a tombstone");
    assert!(
        subject
            .open()
            .open_partition(p)
            .unwrap()
            .log(LogKind::Inbox)
            .unwrap()
            .is_empty()
    );
}

/// With a changelog backend, an egress sink the backend does not commit would see
/// records before their state is committed: the runtime refuses to build.
#[test]
fn a_runtime_with_a_changelog_backend_refuses_an_egress_sink_outside_the_commit() {
    let subject = Changelogged::new();
    let dir = tempfile::tempdir().unwrap();
    let rocks = statefun_runtime::state::RocksDbBackend::open(dir.path(), Default::default()).unwrap();
    let changelog: Arc<dyn Changelog> = subject.changelog.clone();
    let (backend, _) = ChangelogBackend::open(rocks, changelog, 2, std::time::Duration::from_millis(10)).unwrap();
    let module = statefun_sdk::Module::builder()
        .with_fn(
            statefun_sdk::FunctionSpec::new(TypeName::from_static("t/f")),
            |_ctx, _msg| Ok(()),
        )
        .build()
        .unwrap();
    let out = TypeName::from_static("t/out");
    let e = statefun_runtime::Runtime::builder()
        .config(statefun_runtime::RuntimeConfig {
            partitions: 2,
            ..Default::default()
        })
        .module(module)
        .state_backend(backend)
        .egress(out.clone(), statefun_runtime::CollectingEgress::new())
        .build()
        .unwrap_err();
    assert!(
        matches!(&e, statefun_runtime::Error::EgressOutsideCommit(id) if *id == out),
        "{e}"
    );
}

/// An id whose address lives in `partition` of 2.
fn id_in(partition: u32) -> String {
    (0..)
        .map(|i| format!("id{i}"))
        .find(|id| statefun_runtime::partition_for(id, 2).0 == partition)
        .unwrap()
}

/// Cluster mode with two partitions, one per "instance": a message to the partition
/// owned elsewhere leaves in the commit (never in this instance's changelog or
/// RocksDB); the other instance accepts it from the internal topic once, even when the
/// record is delivered twice, and the caller arrives with it.
#[tokio::test]
async fn cluster_mode_commits_messages_for_other_instances_and_accepts_them_once() {
    use statefun_runtime::{
        IngressRecord, MessageRouter, QueryError, Runtime, RuntimeConfig, SourcePosition, VecIngress,
    };
    use statefun_sdk::{FunctionSpec, Module, TypedValue, ValueSpec};
    const F: TypeName = TypeName::from_static("t/f");
    const V: TypeName = TypeName::from_static("t/v");
    const SEEN: ValueSpec<i64> = ValueSpec::named("seen");
    let (here, there) = (id_in(0), id_in(1));
    let module = || {
        let there = there.clone();
        Module::builder()
            .with_fn(FunctionSpec::new(F).with_state(SEEN), move |ctx, msg| {
                let n = ctx.storage().get(&SEEN)?.unwrap_or(0) + 1;
                ctx.storage().set(&SEEN, &n)?;
                if ctx.self_address().id() != there {
                    ctx.send_message(Address::new(F, there.clone())?, msg);
                }
                Ok(())
            })
            .build()
            .unwrap()
    };
    let changelog = Arc::new(MemoryChangelog::default());
    let config = RuntimeConfig {
        partitions: 2,
        ..Default::default()
    };
    let open = |owned: u32, dir: &tempfile::TempDir| {
        let rocks = statefun_runtime::state::RocksDbBackend::open(dir.path(), Default::default()).unwrap();
        let c: Arc<dyn Changelog> = changelog.clone();
        ChangelogBackend::open_owned(rocks, c, [PartitionId(owned)], std::time::Duration::from_millis(10))
            .unwrap()
            .0
    };

    // Instance 0 owns partition 0.
    let dir0 = tempfile::tempdir().unwrap();
    let rt = Runtime::builder()
        .config(config.clone())
        .module(module())
        .state_backend(open(0, &dir0))
        .build()
        .unwrap();
    let h = rt.handle();
    let run = tokio::spawn(rt.run(std::future::pending::<()>()));
    h.send(Address::new(F, here.clone()).unwrap(), TypedValue::from_bytes(V, "m"))
        .await
        .unwrap();
    h.wait_idle().await;
    assert_eq!(
        h.state(&Address::new(F, here.clone()).unwrap(), &SEEN).await.unwrap(),
        Some(1)
    );
    assert!(matches!(
        h.state(&Address::new(F, there.clone()).unwrap(), &SEEN).await,
        Err(QueryError::NotOwned(PartitionId(1)))
    ));
    // The commit task runs every 10 ms: wait for the message to be committed.
    let committed = async {
        loop {
            if let Some(m) = changelog.messages.lock().unwrap().first().cloned() {
                return m;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    let message = tokio::time::timeout(std::time::Duration::from_secs(10), committed)
        .await
        .expect("the message to partition 1 was never committed");
    run.abort();
    assert_eq!(message.0, PartitionId(1));
    let routed = statefun_runtime::decode_message(&message.1).unwrap();
    assert_eq!(routed.target, Address::new(F, there.clone()).unwrap());
    assert_eq!(routed.caller, Some(Address::new(F, here.clone()).unwrap()));
    assert!(
        changelog
            .log
            .lock()
            .unwrap()
            .get(&PartitionId(1))
            .is_none_or(|l| l.iter().all(|op| op.key.starts_with(b"\x00"))),
        "instance 0 wrote state or logs of partition 1"
    );

    // Instance 1 owns partition 1 and reads the message from the internal topic; the
    // record arrives twice (a re-read after a restart) and is accepted once.
    let dir1 = tempfile::tempdir().unwrap();
    let record = IngressRecord {
        value: Some(message.1.clone()),
        position: Some(SourcePosition {
            topic: Arc::from("app-internal"),
            partition: 1,
            offset: 0,
        }),
        ..Default::default()
    };
    let rt = Runtime::builder()
        .config(config)
        .module(module())
        .state_backend(open(1, &dir1))
        .ingress(VecIngress::new("internal", vec![record.clone(), record]), MessageRouter)
        .build()
        .unwrap();
    let h = rt.handle();
    let run = tokio::spawn(rt.run(std::future::pending::<()>()));
    let there_address = Address::new(F, there).unwrap();
    let processed = async {
        while h.state(&there_address, &SEEN).await.unwrap().is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), processed)
        .await
        .expect("instance 1 never processed the message");
    h.wait_idle().await;
    assert_eq!(h.state(&there_address, &SEEN).await.unwrap(), Some(1));
    run.abort();
}

/// While a changelog cannot commit (a broker that is away), pending writes are bounded:
/// past `max_pending_bytes` the partition takes no more ingress, instead of growing in
/// memory; when commits succeed again, everything is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelogged_input_pauses_while_too_much_is_pending_and_resumes_after_a_commit() {
    use statefun_runtime::RuntimeConfig;
    use statefun_runtime::testkit;
    use statefun_sdk::prelude::*;
    use std::sync::atomic::Ordering;
    const F: TypeName = TypeName::from_static("t/blob");
    const BLOB: ValueSpec<String> = ValueSpec::named("blob");
    const MESSAGES: u64 = 1000;

    let changelog = Arc::new(MemoryChangelog::default());
    let dir = tempfile::tempdir().unwrap();
    let rocks = statefun_runtime::state::RocksDbBackend::open(dir.path(), Default::default()).unwrap();
    let (backend, _) =
        ChangelogBackend::open(rocks, changelog.clone(), 1, std::time::Duration::from_millis(10)).unwrap();
    backend.set_max_pending_bytes(50_000);
    let module = Module::builder()
        .with_fn(FunctionSpec::new(F).with_state(BLOB), |ctx, msg| {
            let n: i64 = msg.decode()?;
            // About 1 KB of state per message, each at its own address.
            ctx.storage().set(&BLOB, &format!("{n:01000}"))?;
            Ok(())
        })
        .build()
        .unwrap();
    let r = testkit::runtime(module)
        .config(RuntimeConfig {
            partitions: 1,
            ingress_queue_capacity: 8,
            ..Default::default()
        })
        .backend(backend.clone())
        .start();
    let h = &r.handle;
    // The broker goes away.
    changelog.fail.store(true, Ordering::SeqCst);
    let sender = {
        let h = h.clone();
        tokio::spawn(async move {
            for i in 0..MESSAGES {
                h.send_value(Address::new(F, format!("k{i}")).unwrap(), &(i as i64))
                    .await
                    .unwrap();
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let invoked = |stats: Vec<statefun_runtime::PartitionStats>| stats.iter().map(|s| s.invocations).sum::<u64>();
    let while_away = invoked(h.stats().await.unwrap());
    // 50 KB at about 1 KB a message, plus at most one loop turn of input (256) taken
    // before the bound is seen.
    assert!(while_away < 400, "{while_away} messages taken in while nothing commits");
    assert!(!sender.is_finished(), "the sender waits for room");
    let pending = backend.pending_bytes();
    assert!(pending < 400_000, "{pending} bytes pending");
    // The broker is back: the pending writes commit and the rest flows.
    changelog.fail.store(false, Ordering::SeqCst);
    sender.await.unwrap();
    h.wait_idle().await;
    assert_eq!(invoked(h.stats().await.unwrap()), MESSAGES);
    assert_eq!(
        h.state(&Address::new(F, "k999").unwrap(), &BLOB).await.unwrap(),
        Some(format!("{:01000}", 999))
    );
    r.stop().await;
}

/// The pending-writes count goes back to zero after each commit, also when everything
/// staged cancelled out (a log entry put and deleted within the interval), so it can
/// never drift up to the bound and pause input for good.
#[test]
fn changelogged_pending_bytes_return_to_zero_even_when_the_writes_cancel_out() {
    let changelog = Arc::new(MemoryChangelog::default());
    let dir = tempfile::tempdir().unwrap();
    let rocks = statefun_runtime::state::RocksDbBackend::open(dir.path(), Default::default()).unwrap();
    let (b, _) = ChangelogBackend::open(rocks, changelog, 1, std::time::Duration::from_millis(10)).unwrap();
    let p = PartitionId(0);
    let mut s = b.open_partition(p).unwrap();
    let key = LogKey::Inbox { sender: p, seq: 1 };
    for log in [vec![log_put(0, key, b"a message")], vec![log_del(0, key)]] {
        s.write(WriteBatch {
            log,
            ..Default::default()
        })
        .unwrap();
    }
    assert!(b.pending_bytes() > 0, "staged writes count");
    b.commit().unwrap();
    assert_eq!(
        b.pending_bytes(),
        0,
        "nothing reached the changelog, nothing is pending"
    );
    s.write(WriteBatch {
        ops: vec![put(&addr("t/f", "a"), "x", b"1", None)],
        ..Default::default()
    })
    .unwrap();
    b.commit().unwrap();
    assert_eq!(b.pending_bytes(), 0);
}
