//! The [`StatefulFunction`] trait and the [`Module`] that registers functions by type.
//!
//! Why it exists: the runtime and the test harness look functions up by [`TypeName`] in
//! a [`Module`]; each entry pairs the function with its [`FunctionSpec`]. A function's
//! failure is a value (`Err`), never a reason to take the runtime down.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use crate::context::Context;
use crate::spec::{FunctionSpec, StateSpec};
use crate::typename::{Address, TypeName};
use crate::value::Message;

/// The error a function returns: any error type, boxed (`?` works on every
/// `std::error::Error`, and `"text".into()` makes one from a string).
pub type FunctionError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result of one invocation.
pub type FunctionResult = Result<(), FunctionError>;

/// One message of a batch handed to [`StatefulFunction::invoke_batch`].
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    /// The sending function; `None` for ingress records.
    pub caller: Option<Address>,
    /// The message.
    pub message: Message,
}

/// Why [`StatefulFunction::invoke_batch`] did not complete.
#[derive(Debug)]
#[non_exhaustive]
pub enum BatchError {
    /// The message at `index` failed. The effects of the whole batch are discarded; the
    /// runtime applies nothing and retries (the messages before `index` first).
    Failed {
        /// Index in the batch of the failing message.
        index: usize,
        /// Why it failed.
        error: FunctionError,
    },
    /// The function needs state that its type has not registered yet (StateFun's
    /// `IncompleteInvocationContext`). The runtime registers the specs for the function
    /// type and runs the same batch again at once, with the new values loaded; this is
    /// not a failed attempt. Asking again for a registered name is a failure.
    MissingStates(Vec<StateSpec>),
}

impl BatchError {
    /// A failure of the message at `index`.
    pub fn failed(index: usize, error: impl Into<FunctionError>) -> BatchError {
        BatchError::Failed {
            index,
            error: error.into(),
        }
    }
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Failed { index, error } => write!(f, "message {index} of the batch failed: {error}"),
            BatchError::MissingStates(specs) => {
                f.write_str("the function needs unregistered states:")?;
                for s in specs {
                    write!(f, " {} ({})", s.name, s.type_name)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for BatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BatchError::Failed { error, .. } => Some(&**error),
            BatchError::MissingStates(_) => None,
        }
    }
}

/// A stateful function: invoked once per message, one message at a time per address,
/// with that address's declared state in the [`Context`].
///
/// ```
/// use statefun_sdk::prelude::*;
///
/// const COUNT: ValueSpec<i64> = ValueSpec::named("count");
/// struct Counter;
///
/// #[async_trait]
/// impl StatefulFunction for Counter {
///     async fn invoke(&self, ctx: &mut Context, msg: Message) -> FunctionResult {
///         let add: i64 = msg.decode()?;
///         let n = ctx.storage().get(&COUNT)?.unwrap_or(0) + add;
///         ctx.storage().set(&COUNT, &n)?;
///         Ok(())
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait StatefulFunction: Send + Sync + 'static {
    /// Handles one message. Effects recorded in `ctx` are applied only if this returns
    /// `Ok`; on `Err` (or a panic) they are discarded and the runtime retries.
    async fn invoke(&self, ctx: &mut Context, message: Message) -> FunctionResult;

    /// Handles a batch of messages for one address, in order, on one [`Context`]: the
    /// runtime hands over every message that queued up for the address while its
    /// previous batch ran (at most one batch per address is in flight). The default
    /// calls [`invoke`](StatefulFunction::invoke) once per message, setting the caller
    /// before each; a remote function overrides it to ship the whole batch in one
    /// request, as StateFun's `InvocationBatchRequest` does.
    ///
    /// A panic in `invoke` is caught here and reported as the failure of its message,
    /// so the runtime knows which message to retry alone.
    async fn invoke_batch(&self, ctx: &mut Context, batch: &[Invocation]) -> Result<(), BatchError> {
        use futures_util::FutureExt as _;
        for (index, inv) in batch.iter().enumerate() {
            ctx.set_caller(inv.caller.clone());
            let outcome = std::panic::AssertUnwindSafe(self.invoke(ctx, inv.message.clone()))
                .catch_unwind()
                .await;
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(BatchError::Failed { index, error }),
                Err(panic) => {
                    let error = panic_message(&*panic).into();
                    return Err(BatchError::Failed { index, error });
                }
            }
        }
        Ok(())
    }

    /// Whether the runtime hands this function its batches through
    /// [`invoke_batch`](StatefulFunction::invoke_batch). Default: `true`, so that an
    /// override of `invoke_batch` is always called.
    ///
    /// A function that keeps the default `invoke_batch` may return `false`: the runtime
    /// then calls [`invoke`](StatefulFunction::invoke) once per message itself, with the
    /// same semantics (caller set per message, a panic or error fails that message
    /// alone), without building the batch and boxing its future (part of a 17 to 19%
    /// difference in the invocations bench). Functions made from closures
    /// (`ModuleBuilder::with_fn`) return `false`.
    fn takes_batches(&self) -> bool {
        true
    }
}

/// An error and its chain of sources, as one line: "outer: cause: root cause".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The text of a caught panic: "function panicked: <message>".
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("function panicked: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("function panicked: {s}")
    } else {
        "function panicked".to_owned()
    }
}

/// A [`StatefulFunction`] made from a synchronous closure; see [`ModuleBuilder::with_fn`].
pub struct FnFunction<F>(pub F);

#[async_trait::async_trait]
impl<F> StatefulFunction for FnFunction<F>
where
    F: Fn(&mut Context, Message) -> FunctionResult + Send + Sync + 'static,
{
    async fn invoke(&self, ctx: &mut Context, message: Message) -> FunctionResult {
        (self.0)(ctx, message)
    }

    fn takes_batches(&self) -> bool {
        false
    }
}

impl<F> std::fmt::Debug for FnFunction<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnFunction")
    }
}

/// A function with its declaration, as stored in a [`Module`].
#[derive(Clone)]
pub struct RegisteredFunction {
    spec: Arc<FunctionSpec>,
    states: Arc<[StateSpec]>,
    function: Arc<dyn StatefulFunction>,
}

impl RegisteredFunction {
    /// The declaration.
    pub fn spec(&self) -> &FunctionSpec {
        &self.spec
    }

    /// The declared state, shared (cheap to clone into every [`Context`]).
    pub fn states(&self) -> &Arc<[StateSpec]> {
        &self.states
    }

    /// The function.
    pub fn function(&self) -> &Arc<dyn StatefulFunction> {
        &self.function
    }
}

impl std::fmt::Debug for RegisteredFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredFunction").field("spec", &self.spec).finish()
    }
}

/// Why a module could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ModuleError {
    /// Two functions registered under the same type.
    #[error("function type {0} is registered twice")]
    DuplicateFunction(TypeName),
    /// A function declares the same state name twice.
    #[error("function type {function} declares state {name:?} twice")]
    DuplicateState {
        /// The function type.
        function: TypeName,
        /// The state name.
        name: String,
    },
}

/// The functions of an application, keyed by type; a function may also serve every type
/// of a namespace (StateFun's `functions: namespace/*`, see
/// [`ModuleBuilder::with_namespace_function`]).
#[derive(Debug, Clone, Default)]
pub struct Module {
    functions: HashMap<TypeName, RegisteredFunction>,
    namespaces: HashMap<String, RegisteredFunction>,
}

/// The type name under which a namespace function is registered: `namespace/*`.
fn is_namespace_entry(t: &TypeName) -> bool {
    t.name() == "*"
}

impl Module {
    /// Starts building a module.
    pub fn builder() -> ModuleBuilder {
        ModuleBuilder::default()
    }

    /// Looks a function up by type: the function registered for the type, else the one
    /// registered for its namespace (whose spec's type name is `namespace/*`).
    pub fn get(&self, type_name: &TypeName) -> Option<&RegisteredFunction> {
        self.functions
            .get(type_name)
            .or_else(|| self.namespaces.get(type_name.namespace()))
    }

    /// All function types registered one by one (not the namespace functions).
    pub fn types(&self) -> impl Iterator<Item = &TypeName> {
        self.functions.keys()
    }

    /// The namespaces served by a namespace function, with it.
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &RegisteredFunction)> {
        self.namespaces.iter().map(|(n, f)| (n.as_str(), f))
    }

    /// Number of registered functions (namespace functions included).
    pub fn len(&self) -> usize {
        self.functions.len() + self.namespaces.len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds every function of `other`; fails on a type (or namespace) registered in both.
    pub fn merge(mut self, other: Module) -> Result<Module, ModuleError> {
        for (t, f) in other.functions {
            match self.functions.entry(t) {
                Entry::Occupied(e) => return Err(ModuleError::DuplicateFunction(e.key().clone())),
                Entry::Vacant(v) => {
                    v.insert(f);
                }
            }
        }
        for (n, f) in other.namespaces {
            match self.namespaces.entry(n) {
                Entry::Occupied(_) => return Err(ModuleError::DuplicateFunction(f.spec.type_name().clone())),
                Entry::Vacant(v) => {
                    v.insert(f);
                }
            }
        }
        Ok(self)
    }
}

/// Builds a [`Module`]; errors are reported once, by [`ModuleBuilder::build`].
#[derive(Default)]
pub struct ModuleBuilder {
    entries: Vec<(FunctionSpec, Arc<dyn StatefulFunction>)>,
}

impl std::fmt::Debug for ModuleBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(s, _)| s.type_name()))
            .finish()
    }
}

impl ModuleBuilder {
    /// Registers a function under its spec's type.
    pub fn with_function(mut self, spec: FunctionSpec, function: impl StatefulFunction) -> Self {
        self.entries.push((spec, Arc::new(function)));
        self
    }

    /// Registers a shared function object.
    pub fn with_shared_function(mut self, spec: FunctionSpec, function: Arc<dyn StatefulFunction>) -> Self {
        self.entries.push((spec, function));
        self
    }

    /// Registers a function for every type of `namespace` that has no function of its own
    /// (StateFun's `functions: namespace/*`): a remote endpoint serving a namespace. The
    /// runtime keeps the states each type registers (through the handshake) apart.
    ///
    /// # Panics
    /// If `namespace` is empty or contains `/` or whitespace.
    pub fn with_namespace_function(self, namespace: &str, function: Arc<dyn StatefulFunction>) -> Self {
        let t = TypeName::from_parts(namespace, "*")
            .ok()
            .filter(|t| t.namespace() == namespace)
            .unwrap_or_else(|| panic!("invalid namespace {namespace:?}"));
        self.with_shared_function(FunctionSpec::new(t), function)
    }

    /// Registers a synchronous closure as a function.
    pub fn with_fn<F>(self, spec: FunctionSpec, f: F) -> Self
    where
        F: Fn(&mut Context, Message) -> FunctionResult + Send + Sync + 'static,
    {
        self.with_function(spec, FnFunction(f))
    }

    /// Validates and builds the module.
    pub fn build(self) -> Result<Module, ModuleError> {
        let mut functions = HashMap::new();
        let mut namespaces = HashMap::new();
        for (spec, function) in self.entries {
            let mut seen = std::collections::HashSet::new();
            for s in spec.states() {
                if !seen.insert(s.name.clone()) {
                    return Err(ModuleError::DuplicateState {
                        function: spec.type_name().clone(),
                        name: s.name.to_string(),
                    });
                }
            }
            let t = spec.type_name().clone();
            let registered = RegisteredFunction {
                states: spec.states().to_vec().into(),
                spec: Arc::new(spec),
                function,
            };
            if is_namespace_entry(&t) {
                match namespaces.entry(t.namespace().to_owned()) {
                    Entry::Occupied(_) => return Err(ModuleError::DuplicateFunction(t)),
                    Entry::Vacant(v) => {
                        v.insert(registered);
                    }
                }
                continue;
            }
            match functions.entry(t) {
                Entry::Occupied(e) => return Err(ModuleError::DuplicateFunction(e.key().clone())),
                Entry::Vacant(v) => {
                    v.insert(registered);
                }
            }
        }
        Ok(Module { functions, namespaces })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ValueSpec;

    const T: TypeName = TypeName::from_static("t/f");
    const S: ValueSpec<i64> = ValueSpec::named("s");

    #[test]
    fn duplicate_registrations_and_duplicate_state_names_are_rejected() {
        let dup = Module::builder()
            .with_fn(FunctionSpec::new(T), |_, _| Ok(()))
            .with_fn(FunctionSpec::new(T), |_, _| Ok(()))
            .build();
        assert_eq!(dup.unwrap_err(), ModuleError::DuplicateFunction(T));
        let dup_state = Module::builder()
            .with_fn(FunctionSpec::new(T).with_state(S).with_state(S), |_, _| Ok(()))
            .build();
        assert!(matches!(dup_state, Err(ModuleError::DuplicateState { .. })));
    }

    #[test]
    fn a_namespace_function_serves_the_types_without_their_own() {
        let own = TypeName::from_static("shop/cart");
        let m = Module::builder()
            .with_fn(FunctionSpec::new(own.clone()).with_state(S), |_, _| Ok(()))
            .with_namespace_function("shop", Arc::new(FnFunction(|_: &mut Context, _: Message| Ok(()))))
            .build()
            .unwrap();
        assert_eq!(m.get(&own).unwrap().states().len(), 1);
        let other = m.get(&TypeName::from_static("shop/loyalty")).unwrap();
        assert_eq!(other.spec().type_name().as_str(), "shop/*");
        assert!(m.get(&TypeName::from_static("elsewhere/cart")).is_none());
        assert_eq!((m.len(), m.types().count(), m.namespaces().count()), (2, 1, 1));
        assert!(m.clone().merge(m).is_err(), "a namespace registered twice");
    }

    #[test]
    fn the_default_batch_reports_the_index_of_the_message_that_failed_or_panicked() {
        let f = FnFunction(|_: &mut Context, msg: Message| -> FunctionResult {
            match msg.decode::<String>()?.as_str() {
                "fail" => Err("failed".into()),
                "panic" => panic!("boom"),
                _ => Ok(()),
            }
        });
        let batch = |texts: &[&str]| -> Vec<Invocation> {
            texts
                .iter()
                .map(|t| Invocation {
                    caller: None,
                    message: crate::TypedValue::of(&t.to_string()).unwrap(),
                })
                .collect()
        };
        let run = |b: Vec<Invocation>| {
            let mut ctx = Context::new(crate::Address::new(T, "a").unwrap(), Arc::from(vec![]), vec![]);
            futures_executor::block_on(f.invoke_batch(&mut ctx, &b))
        };
        assert!(run(batch(&["ok", "ok"])).is_ok());
        let Err(BatchError::Failed { index, error }) = run(batch(&["ok", "ok", "fail"])) else {
            panic!("expected a failure");
        };
        assert_eq!((index, error.to_string()), (2, "failed".to_string()));
        let Err(BatchError::Failed { index, error }) = run(batch(&["ok", "panic", "ok"])) else {
            panic!("expected a failure");
        };
        assert_eq!((index, error.to_string()), (1, "function panicked: boom".to_string()));
    }

    #[test]
    fn merge_rejects_overlapping_modules() {
        let a = Module::builder()
            .with_fn(FunctionSpec::new(T), |_, _| Ok(()))
            .build()
            .unwrap();
        let b = a.clone();
        assert!(a.merge(b).is_err());
    }
}
