//! Model-based property test: random messages to random addresses (two function types,
//! shared ids, random forwarding across partitions, random partition counts and batch
//! sizes, functions that yield at random points) go through the runtime and are checked
//! against a plain `HashMap` model. Proves: every message is processed exactly once,
//! messages between one sender and one receiver arrive in FIFO order, and the final
//! state equals the model's. Run on the in-memory backend and, in durable mode, on
//! RocksDB (inbox, timers and egress logs written with every commit); there it also
//! proves that a clean run leaves nothing in the durable inboxes: a restart on the same
//! database recovers no message.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use statefun_runtime::testkit;
use statefun_runtime::{Runtime, RuntimeConfig};
use statefun_sdk::prelude::*;

const A: TypeName = TypeName::from_static("model/a");
const B: TypeName = TypeName::from_static("model/b");
const LOG: ValueSpec<Entries> = ValueSpec::named("log");
const COUNT: ValueSpec<i64> = ValueSpec::named("count");

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
struct Cmd {
    origin: String,
    seq: u64,
    forward: Option<(bool, String)>,
    yields: u8,
}
json_type!(Cmd, "model/Cmd");

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Default)]
struct Entries(Vec<(String, u64)>);
json_type!(Entries, "model/Entries");

struct Recorder;

#[async_trait]
impl StatefulFunction for Recorder {
    async fn invoke(&self, ctx: &mut Context, msg: Message) -> FunctionResult {
        let cmd: Cmd = msg.decode()?;
        for _ in 0..cmd.yields {
            tokio::task::yield_now().await;
        }
        let mut log = ctx.storage().get(&LOG)?.unwrap_or_default();
        log.0.push((cmd.origin.clone(), cmd.seq));
        ctx.storage().set(&LOG, &log)?;
        let n = ctx.storage().get(&COUNT)?.unwrap_or(0) + 1;
        ctx.storage().set(&COUNT, &n)?;
        if let Some((is_a, id)) = &cmd.forward {
            let to = Address::new(if *is_a { A } else { B }, id)?;
            let me = ctx.self_address().to_string();
            ctx.send(
                to,
                &Cmd {
                    origin: me,
                    seq: cmd.seq,
                    forward: None,
                    yields: 0,
                },
            )?;
        }
        Ok(())
    }
}

fn addr(is_a: bool, id: u8) -> Address {
    Address::new(if is_a { A } else { B }, format!("id{id}")).unwrap()
}

#[derive(Debug, Clone)]
struct Step {
    target: (bool, u8),
    forward: Option<(bool, u8)>,
    yields: u8,
}

fn step() -> impl Strategy<Value = Step> {
    (
        (any::<bool>(), 0u8..12),
        proptest::option::of((any::<bool>(), 0u8..12)),
        0u8..3,
    )
        .prop_map(|(target, forward, yields)| Step {
            target,
            forward,
            yields,
        })
}

fn run_case(
    steps: Vec<Step>,
    partitions: u32,
    max_batch: usize,
    workers: usize,
    durable: bool,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let module = Module::builder()
            .with_function(FunctionSpec::new(A).with_state(LOG).with_state(COUNT), Recorder)
            .with_function(FunctionSpec::new(B).with_state(LOG).with_state(COUNT), Recorder)
            .build()
            .unwrap();
        let config = RuntimeConfig {
            partitions,
            max_batch_size: max_batch,
            ingress_queue_capacity: 4,
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let mut runtime = testkit::runtime(module.clone()).config(config.clone());
        if durable {
            runtime = runtime.backend(durable_backend(dir.path()));
        }
        let running = runtime.start();
        let handle = &running.handle;

        // The model: expected log entries per address.
        let mut model: HashMap<Address, Vec<(String, u64)>> = HashMap::new();
        for (seq, s) in steps.iter().enumerate() {
            let target = addr(s.target.0, s.target.1);
            let forward = s.forward.map(|(is_a, id)| (is_a, format!("id{id}")));
            let cmd = Cmd {
                origin: "ingress".into(),
                seq: seq as u64,
                forward: forward.clone(),
                yields: s.yields,
            };
            model
                .entry(target.clone())
                .or_default()
                .push(("ingress".into(), seq as u64));
            if let Some((is_a, id)) = s.forward {
                model
                    .entry(addr(is_a, id))
                    .or_default()
                    .push((target.to_string(), seq as u64));
            }
            handle.send_value(target, &cmd).await.unwrap();
        }
        tokio::time::timeout(Duration::from_secs(30), handle.wait_idle())
            .await
            .expect("runtime went idle");

        for is_a in [true, false] {
            for id in 0..12u8 {
                let a = addr(is_a, id);
                let log = handle.state(&a, &LOG).await.unwrap().unwrap_or_default().0;
                let count = handle.state(&a, &COUNT).await.unwrap().unwrap_or(0);
                let expected = model.remove(&a).unwrap_or_default();
                // Exactly once: same multiset of entries.
                let mut got_sorted = log.clone();
                got_sorted.sort();
                let mut exp_sorted = expected.clone();
                exp_sorted.sort();
                prop_assert_eq!(&got_sorted, &exp_sorted, "entries of {}", a);
                prop_assert_eq!(count as usize, expected.len(), "count of {}", a);
                // FIFO per (sender, receiver): sequence numbers of one origin increase.
                let mut last: HashMap<&str, u64> = HashMap::new();
                for (origin, seq) in &log {
                    if let Some(prev) = last.insert(origin, *seq) {
                        prop_assert!(prev < *seq, "{} got {}#{} after #{}", a, origin, seq, prev);
                    }
                }
            }
        }
        prop_assert!(
            running.dead.letters().is_empty(),
            "no dead letters: {:?}",
            running.dead.letters()
        );
        // Also drops the handle, the last owner of the first database.
        let report = running.stop().await;
        prop_assert!(report.drained);
        let forwards = steps.iter().filter(|s| s.forward.is_some()).count();
        prop_assert_eq!(report.invocations() as usize, steps.len() + forwards);
        if durable {
            let again = Runtime::builder()
                .config(config)
                .module(module)
                .state_backend(durable_backend(dir.path()))
                .build()
                .unwrap();
            prop_assert_eq!(again.handle().outstanding(), 0, "a clean run leaves its inboxes empty");
        }
        Ok(())
    })
}

#[cfg(feature = "rocksdb")]
fn durable_backend(path: &std::path::Path) -> statefun_runtime::state::RocksDbBackend {
    statefun_runtime::state::RocksDbBackend::open(path, Default::default()).unwrap()
}

#[cfg(not(feature = "rocksdb"))]
fn durable_backend(_: &std::path::Path) -> statefun_runtime::state::MemoryBackend {
    unreachable!("durable cases run with the rocksdb feature only")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn runtime_matches_hashmap_model(
        steps in proptest::collection::vec(step(), 1..120),
        partitions in 1u32..6,
        max_batch in 1usize..5,
        workers in 1usize..3,
    ) {
        run_case(steps, partitions, max_batch, workers, false)?;
    }
}

#[cfg(feature = "rocksdb")]
proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn durable_runtime_matches_hashmap_model(
        steps in proptest::collection::vec(step(), 1..120),
        partitions in 1u32..6,
        max_batch in 1usize..5,
        workers in 1usize..3,
    ) {
        run_case(steps, partitions, max_batch, workers, true)?;
    }
}
