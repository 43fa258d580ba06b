//! The function table of one partition, and the state handshake.
//!
//! Why it exists: a partition keeps its own copy of every registered function and its
//! declared states (refcounts stay partition-local), learns a namespace function's
//! types on their first message, and registers the states a remote function asks for
//! (StateFun's `IncompleteInvocationContext`) in its copy.

use std::collections::HashMap;
use std::sync::Arc;

use statefun_sdk::{Expiration, Module, RegisteredFunction, StateSpec, StatefulFunction, TypeName};

/// Most states one function type may register through the handshake (a bound against a
/// function that keeps asking for new names).
const MAX_STATES_PER_FUNCTION: usize = 1024;

/// A registered function as one partition holds it. The `Arc`s are the partition's own
/// (not shared with other partitions), so cloning them per batch touches no cache line
/// another core writes.
#[derive(Clone)]
pub(super) struct LocalFunction {
    pub(super) states: Arc<[StateSpec]>,
    pub(super) function: Arc<Arc<dyn StatefulFunction>>,
    pub(super) has_after_call: bool,
    /// Any declared state expires: only then is the clock read.
    pub(super) has_expiry: bool,
    /// Any declared state asks for an expiry notice.
    pub(super) has_notify: bool,
}

impl LocalFunction {
    fn new(states: Arc<[StateSpec]>, function: Arc<Arc<dyn StatefulFunction>>) -> LocalFunction {
        LocalFunction {
            has_after_call: states.iter().any(|s| matches!(s.expiration, Expiration::AfterCall(_))),
            has_expiry: states.iter().any(|s| s.expiration != Expiration::None),
            has_notify: states.iter().any(|s| s.notify_on_expire),
            states,
            function,
        }
    }

    /// Fresh copies, names included, so refcounts stay partition-local.
    fn local(f: &RegisteredFunction) -> LocalFunction {
        let states: Arc<[StateSpec]> = f
            .states()
            .iter()
            .map(|s| StateSpec {
                name: Arc::from(&*s.name),
                ..s.clone()
            })
            .collect();
        LocalFunction::new(states, Arc::new(Arc::clone(f.function())))
    }
}

/// The functions one partition serves.
pub(super) struct FunctionTable {
    functions: HashMap<TypeName, LocalFunction, ahash::RandomState>,
    /// Functions serving a whole namespace: a type of it gets its own entry in
    /// `functions` (with its own registered states) on its first message.
    namespace_functions: HashMap<String, LocalFunction, ahash::RandomState>,
}

impl FunctionTable {
    pub(super) fn new(module: &Module) -> FunctionTable {
        FunctionTable {
            functions: module
                .types()
                .map(|t| {
                    (
                        t.clone(),
                        LocalFunction::local(module.get(t).expect("listed type is registered")),
                    )
                })
                .collect(),
            namespace_functions: module
                .namespaces()
                .map(|(n, f)| (n.to_owned(), LocalFunction::local(f)))
                .collect(),
        }
    }

    /// The function of a type [`resolve`](Self::resolve) found.
    pub(super) fn get(&self, t: &TypeName) -> Option<&LocalFunction> {
        self.functions.get(t)
    }

    /// Whether a function serves type `t`: its own, or its namespace's (which then gets
    /// an entry for `t` on this partition, with `t`'s own registered states).
    pub(super) fn resolve(&mut self, t: &TypeName) -> bool {
        if self.functions.contains_key(t) {
            return true;
        }
        let Some(f) = self.namespace_functions.get(t.namespace()) else {
            return false;
        };
        let f = f.clone();
        self.functions.insert(t.clone(), f);
        true
    }

    /// Registers states a function asked for (StateFun's `IncompleteInvocationContext`)
    /// in this partition's copy of its type's declarations. Other partitions learn them
    /// from their own first request. The batch's request carried the first `carried`
    /// registered states: asking for one of those again means the function and the
    /// runtime disagree, which is an error (not a loop). A state registered since the
    /// batch started (by another address's handshake) is already there; so is one asked
    /// for again with another type, which is an error.
    pub(super) fn register_states(
        &mut self,
        function: &TypeName,
        specs: Vec<StateSpec>,
        carried: usize,
    ) -> Result<(), String> {
        let f = self
            .functions
            .get_mut(function)
            .expect("an in-flight function is registered");
        if specs.is_empty() {
            return Err("the function reported missing states but named none".to_owned());
        }
        if f.states.len() + specs.len() > MAX_STATES_PER_FUNCTION {
            return Err(format!(
                "the function asks for {} more states; at most {MAX_STATES_PER_FUNCTION} are registered per function type",
                specs.len()
            ));
        }
        let mut states = f.states.to_vec();
        for spec in specs {
            if let Some(i) = states.iter().position(|s| s.name == spec.name) {
                let have = &states[i];
                if have.type_name != spec.type_name {
                    return Err(format!(
                        "the function asks for state {:?} as {}, registered as {}",
                        spec.name, spec.type_name, have.type_name
                    ));
                }
                if i < carried {
                    return Err(format!(
                        "the function asks for state {:?}, which the request carried",
                        spec.name
                    ));
                }
                continue;
            }
            tracing::info!(function = %function, state = %spec.name, type_name = %spec.type_name, expiration = ?spec.expiration, "state registered");
            states.push(spec);
        }
        *f = LocalFunction::new(states.into(), Arc::clone(&f.function));
        Ok(())
    }
}
