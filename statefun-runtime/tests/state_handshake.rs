//! The state handshake (StateFun's `IncompleteInvocationContext`) inside the runtime: a
//! function that declares no state asks for it from its batch hook; the runtime
//! registers the specs (name, type, expiry) for the function type and runs the same
//! batch again at once, not as a failed attempt. A spec asked for again with another
//! type is a failure of that address only.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use statefun_runtime::RuntimeConfig;
use statefun_runtime::testkit::{self, Running, advance, eventually};
use statefun_sdk::prelude::*;
use statefun_sdk::value::builtin;
use statefun_sdk::{BatchError, Invocation, StateSpec};

const F: TypeName = TypeName::from_static("test/discovers");
const COUNT: ValueSpec<i64> = ValueSpec::named("count");
const LAST: ValueSpec<String> = ValueSpec::named("last").expire_after_write(Duration::from_secs(10));

/// Declares nothing up front. Needs `count` (long) and `last` (string, expiring 10 s
/// after write) and asks for whichever the context lacks, like a remote function; the
/// message "retype" asks for `count` as a string. Records each batch's size and the
/// state names it saw.
#[derive(Clone, Default)]
struct Discovers {
    batches: Arc<Mutex<Vec<SeenBatch>>>,
    /// When set, asking for states waits for a permit (to hold handshakes in flight).
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

/// A batch's size and the state names its context carried.
type SeenBatch = (usize, Vec<String>);

#[async_trait]
impl StatefulFunction for Discovers {
    async fn invoke(&self, ctx: &mut Context, message: Message) -> FunctionResult {
        self.invoke_batch(ctx, &[Invocation { caller: None, message }])
            .await
            .map_err(|e| e.to_string().into())
    }

    async fn invoke_batch(&self, ctx: &mut Context, batch: &[Invocation]) -> Result<(), BatchError> {
        let names: Vec<String> = ctx.storage_ref().specs().iter().map(|s| s.name.to_string()).collect();
        self.batches.lock().unwrap().push((batch.len(), names.clone()));
        if batch
            .iter()
            .any(|i| i.message.decode::<String>().ok().as_deref() == Some("retype"))
        {
            let spec = StateSpec::new("count", builtin::STRING, Expiration::None).unwrap();
            return Err(BatchError::MissingStates(vec![spec]));
        }
        let wanted = [COUNT.to_state_spec(), LAST.to_state_spec()];
        let missing: Vec<StateSpec> = wanted
            .into_iter()
            .filter(|s| !names.contains(&s.name.to_string()))
            .collect();
        if !missing.is_empty() {
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            return Err(BatchError::MissingStates(missing));
        }
        for (index, inv) in batch.iter().enumerate() {
            let text: String = inv.message.decode().map_err(|e| BatchError::failed(index, e))?;
            let n = ctx
                .storage()
                .get(&COUNT)
                .map_err(|e| BatchError::failed(index, e))?
                .unwrap_or(0)
                + 1;
            ctx.storage()
                .set(&COUNT, &n)
                .map_err(|e| BatchError::failed(index, e))?;
            ctx.storage()
                .set(&LAST, &text)
                .map_err(|e| BatchError::failed(index, e))?;
        }
        Ok(())
    }
}

fn start() -> (Running, Discovers) {
    let function = Discovers::default();
    (start_with(function.clone(), 2), function)
}

/// Starts `function` (a clone of it: clones share what it records) on `partitions`,
/// with 2 attempts per message.
fn start_with(function: Discovers, partitions: u32) -> Running {
    let module = Module::builder()
        .with_function(FunctionSpec::new(F), function)
        .build()
        .unwrap();
    testkit::runtime(module)
        .config(RuntimeConfig {
            partitions,
            retry: statefun_runtime::RetryConfig {
                max_attempts: 2,
                initial_backoff_ms: 1,
                max_backoff_ms: 1,
            },
            ..Default::default()
        })
        .start()
}

fn at(id: &str) -> Address {
    Address::new(F, id).unwrap()
}

#[tokio::test(start_paused = true)]
async fn missing_states_are_registered_and_the_same_batch_runs_again_without_counting_a_failure() {
    let (f, function) = start();
    f.handle.send_value(at("a"), &"one".to_string()).await.unwrap();
    f.handle.wait_idle().await;
    // The first request found no state and asked for both; the second carried both.
    let first: Vec<_> = function.batches.lock().unwrap().clone();
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(first[0].1.is_empty());
    assert_eq!(first[1].1, ["count", "last"]);
    assert_eq!(f.handle.state(&at("a"), &COUNT).await.unwrap(), Some(1));
    assert_eq!(f.handle.state(&at("a"), &LAST).await.unwrap().as_deref(), Some("one"));

    // Registered for the type: the next message (same partition or not) needs no handshake
    // on a partition that did it; the value persists across batches.
    f.handle.send_value(at("a"), &"two".to_string()).await.unwrap();
    f.handle.wait_idle().await;
    assert_eq!(f.handle.state(&at("a"), &COUNT).await.unwrap(), Some(2));
    assert_eq!(function.batches.lock().unwrap().len(), 3);

    // The registered expiry applies: 10 s after the write, `last` is gone, `count` is not.
    advance(Duration::from_secs(11)).await;
    assert_eq!(f.handle.state(&at("a"), &LAST).await.unwrap(), None);
    assert_eq!(f.handle.state(&at("a"), &COUNT).await.unwrap(), Some(2));

    let dead = f.dead.clone();
    let report = f.stop().await;
    assert_eq!(report.partitions.iter().map(|p| p.failures).sum::<u64>(), 0);
    assert!(dead.letters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_state_asked_for_again_with_another_type_parks_only_that_address() {
    let (f, _) = start();
    f.handle.send_value(at("a"), &"one".to_string()).await.unwrap();
    f.handle.wait_idle().await;
    f.handle.send_value(at("a"), &"retype".to_string()).await.unwrap();
    f.handle.wait_idle().await;
    let parked = f.handle.parked().await.unwrap();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].0, at("a"));
    assert!(
        parked[0]
            .1
            .contains(r#"state "count" as io.statefun.types/string, registered as io.statefun.types/long"#),
        "{}",
        parked[0].1
    );
    let dead = f.dead.letters();
    assert_eq!(dead.len(), 1);
    // Other addresses keep working, with the registered states.
    f.handle.send_value(at("b"), &"x".to_string()).await.unwrap();
    f.handle.wait_idle().await;
    assert_eq!(f.handle.state(&at("b"), &COUNT).await.unwrap(), Some(1));
    f.stop().await;
}

#[tokio::test(start_paused = true)]
async fn two_addresses_in_their_first_handshake_at_once_both_run_without_a_failure() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let function = Discovers {
        gate: Some(gate.clone()),
        ..Default::default()
    };
    let f = start_with(function.clone(), 1);
    f.handle.send_value(at("a"), &"x".to_string()).await.unwrap();
    f.handle.send_value(at("b"), &"y".to_string()).await.unwrap();
    // Both first requests are in flight, neither knows the states.
    eventually("both first requests are in flight", || async {
        function.batches.lock().unwrap().len() >= 2
    })
    .await;
    gate.add_permits(2);
    f.handle.wait_idle().await;
    // The second answer asks for states the first one registered meanwhile: they are
    // there now, so its batch simply runs again.
    assert_eq!(f.handle.state(&at("a"), &COUNT).await.unwrap(), Some(1));
    assert_eq!(f.handle.state(&at("b"), &COUNT).await.unwrap(), Some(1));
    let dead = f.dead.clone();
    let report = f.stop().await;
    assert_eq!(report.partitions.iter().map(|p| p.failures).sum::<u64>(), 0);
    assert!(dead.letters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_namespace_function_serves_every_type_of_its_namespace_each_with_its_own_handshake() {
    let function = Discovers::default();
    let module = Module::builder()
        .with_namespace_function("shop", Arc::new(function.clone()))
        .build()
        .unwrap();
    let r = testkit::runtime(module).partitions(1).start();
    let h = &r.handle;
    let cart = Address::new(TypeName::from_static("shop/cart"), "1").unwrap();
    let loyalty = Address::new(TypeName::from_static("shop/loyalty"), "1").unwrap();
    for a in [&cart, &cart, &loyalty] {
        h.send_value(a.clone(), &"x".to_string()).await.unwrap();
        h.wait_idle().await;
    }
    assert_eq!(h.state(&cart, &COUNT).await.unwrap(), Some(2));
    assert_eq!(h.state(&loyalty, &COUNT).await.unwrap(), Some(1));
    // Each type did its own handshake: 2 requests for the first cart message, 1 for the
    // second, 2 for loyalty's first.
    assert_eq!(function.batches.lock().unwrap().len(), 5);
    // Another namespace has no function.
    let stray = Address::new(TypeName::from_static("other/cart"), "1").unwrap();
    assert!(h.send_value(stray, &"x".to_string()).await.is_err());
    let dead = r.dead.clone();
    let report = r.stop().await;
    assert_eq!(report.partitions.iter().map(|p| p.failures).sum::<u64>(), 0);
    assert!(dead.letters().is_empty());
}
