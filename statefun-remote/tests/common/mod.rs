//! A runtime whose function under test is remote, and helpers shared by the tests.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use statefun_runtime::{CollectingDeadLetters, CollectingEgress, RetryConfig, Runtime, RuntimeConfig, RuntimeHandle};
use statefun_sdk::{FunctionSpec, Module, StatefulFunction, TypeName};
use tokio_util::sync::CancellationToken;

pub struct Running {
    pub handle: RuntimeHandle,
    pub egress: CollectingEgress,
    pub dead: CollectingDeadLetters,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<statefun_runtime::RunReport, statefun_runtime::Error>>,
}

impl Running {
    pub async fn finish(self) -> statefun_runtime::RunReport {
        self.stop.cancel();
        self.task.await.unwrap().unwrap()
    }
}

/// Starts a runtime with `functions` registered without any state (the handshake
/// registers it), an egress collecting `egress`, and `attempts` tries per message.
pub fn start(functions: Vec<(TypeName, Arc<dyn StatefulFunction>)>, egress: TypeName, attempts: u32) -> Running {
    start_with(functions, egress, attempts, |m| m)
}

pub fn start_with(
    functions: Vec<(TypeName, Arc<dyn StatefulFunction>)>,
    egress: TypeName,
    attempts: u32,
    extra: impl FnOnce(statefun_sdk::ModuleBuilder) -> statefun_sdk::ModuleBuilder,
) -> Running {
    let mut module = Module::builder();
    for (t, f) in functions {
        module = module.with_shared_function(FunctionSpec::new(t), f);
    }
    let module = extra(module).build().unwrap();
    let collected = CollectingEgress::new();
    let dead = CollectingDeadLetters::new();
    let config = RuntimeConfig {
        partitions: 2,
        retry: RetryConfig {
            max_attempts: attempts,
            initial_backoff_ms: 5,
            max_backoff_ms: 5,
        },
        ..Default::default()
    };
    let runtime = Runtime::builder()
        .config(config)
        .module(module)
        .egress(egress, collected.clone())
        .dead_letters(dead.clone())
        .build()
        .unwrap();
    let handle = runtime.handle();
    let stop = CancellationToken::new();
    let task = tokio::spawn(runtime.run(stop.clone().cancelled_owned()));
    Running {
        handle,
        egress: collected,
        dead,
        stop,
        task,
    }
}

/// Polls `cond` until it holds; bounded (10 s).
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1000 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held: {what}");
}
