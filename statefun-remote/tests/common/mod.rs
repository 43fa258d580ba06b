//! A runtime whose function under test is remote, started with the runtime's test kit
//! (`statefun_runtime::testkit`).

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use statefun_runtime::testkit::{self, Running};
use statefun_runtime::{RetryConfig, RuntimeConfig};
use statefun_sdk::{FunctionSpec, Module, StatefulFunction, TypeName};

/// Starts a runtime with `functions` registered without any state (the handshake
/// registers it), an egress collecting `egress`, and `attempts` tries per message.
pub fn start(functions: Vec<(TypeName, Arc<dyn StatefulFunction>)>, egress: TypeName, attempts: u32) -> Running {
    start_with(functions, egress, attempts, |m| m)
}

/// [`start`], with `extra` adding more to the module.
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
    testkit::runtime(module)
        .config(RuntimeConfig {
            partitions: 2,
            retry: RetryConfig {
                max_attempts: attempts,
                initial_backoff_ms: 5,
                max_backoff_ms: 5,
            },
            ..Default::default()
        })
        .egress(egress)
        .start()
}
