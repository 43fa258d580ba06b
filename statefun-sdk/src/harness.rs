//! A test harness that runs one function without any runtime (StateFun's `TestContext`).
//!
//! Why it exists: a user's function logic deserves fast unit tests with no broker, no
//! disk and no threads. [`TestHarness`] holds one address's state and a virtual clock,
//! invokes the function, applies the returned [`Effects`] the same way the runtime does
//! (state is changed only when the invocation succeeds; TTL is honoured on the virtual
//! clock; delayed messages are held until [`TestHarness::advance`] makes them due, and
//! cancellation tokens are scoped to the address), and hands the effects back so the
//! test can assert on messages, delayed messages and egress.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::context::{Context, DelayedEffect, Effects, OutgoingMessage, StateError};
use crate::function::{FunctionError, Module, RegisteredFunction, StatefulFunction};
use crate::spec::{Expiration, FunctionSpec, ValueSpec};
use crate::typename::{Address, TypeName};
use crate::value::{TypedValue, ValueType};

#[derive(Debug, Clone)]
struct Stored {
    bytes: Bytes,
    expires_at: Option<Duration>,
}

/// A delayed message waiting in the harness.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingDelayed {
    /// When it becomes due, on the harness clock.
    pub due: Duration,
    /// The receiving address.
    pub target: Address,
    /// The message.
    pub message: TypedValue,
    /// Its cancellation token, if any.
    pub token: Option<String>,
}

/// Runs one function at one address with in-memory state and a virtual clock.
///
/// ```
/// use statefun_sdk::prelude::*;
/// use statefun_sdk::TestHarness;
///
/// const COUNT: ValueSpec<i64> = ValueSpec::named("count");
/// let spec = FunctionSpec::new(TypeName::from_static("example/counter")).with_state(COUNT);
/// let mut h = TestHarness::from_fn(spec, |ctx, msg| {
///     let n = ctx.storage().get(&COUNT)?.unwrap_or(0) + msg.decode::<i64>()?;
///     ctx.storage().set(&COUNT, &n)?;
///     Ok(())
/// });
/// h.invoke_value_blocking(&5i64).unwrap();
/// h.invoke_value_blocking(&2i64).unwrap();
/// assert_eq!(h.state(&COUNT).unwrap(), Some(7));
/// ```
pub struct TestHarness {
    function: RegisteredFunction,
    address: Address,
    state: Vec<Option<Stored>>,
    now: Duration,
    pending: Vec<PendingDelayed>,
}

impl std::fmt::Debug for TestHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestHarness")
            .field("address", &self.address)
            .field("now", &self.now)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl TestHarness {
    /// A harness for `function` declared by `spec`, at id `"test"`.
    pub fn new(spec: FunctionSpec, function: impl StatefulFunction) -> TestHarness {
        let module = Module::builder()
            .with_function(spec.clone(), function)
            .build()
            .expect("a single function spec always builds");
        Self::from_module(&module, spec.type_name()).expect("registered above")
    }

    /// A harness for a synchronous closure.
    pub fn from_fn<F>(spec: FunctionSpec, f: F) -> TestHarness
    where
        F: Fn(&mut Context, crate::Message) -> crate::FunctionResult + Send + Sync + 'static,
    {
        Self::new(spec, crate::function::FnFunction(f))
    }

    /// A harness for the function registered under `type_name` in `module`.
    pub fn from_module(module: &Module, type_name: &TypeName) -> Option<TestHarness> {
        let function = module.get(type_name)?.clone();
        let n = function.states().len();
        Some(TestHarness {
            address: Address::new(type_name.clone(), "test").expect("non-empty id"),
            function,
            state: vec![None; n],
            now: Duration::ZERO,
            pending: Vec::new(),
        })
    }

    /// Uses `id` as the address id.
    pub fn with_id(mut self, id: &str) -> TestHarness {
        self.address = Address::new(self.address.type_name().clone(), id).expect("id must not be empty");
        self
    }

    /// The address being tested.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The virtual clock (starts at zero).
    pub fn now(&self) -> Duration {
        self.now
    }

    fn slot(&self, name: &str, type_name: &TypeName) -> Result<usize, StateError> {
        let specs = self.function.states();
        let i = specs
            .iter()
            .position(|s| &*s.name == name)
            .ok_or_else(|| StateError::Undeclared {
                name: name.to_owned(),
                function: self.address.type_name().clone(),
            })?;
        if &specs[i].type_name != type_name {
            return Err(StateError::TypeMismatch {
                name: name.to_owned(),
                declared: specs[i].type_name.clone(),
                used: type_name.clone(),
            });
        }
        Ok(i)
    }

    fn expire(&mut self) {
        let now = self.now;
        for s in &mut self.state {
            if s.as_ref().and_then(|v| v.expires_at).is_some_and(|t| t <= now) {
                *s = None;
            }
        }
    }

    fn expiry_from_now(&self, e: Expiration) -> Option<Duration> {
        match e {
            Expiration::None => None,
            Expiration::AfterWrite(d) | Expiration::AfterCall(d) => Some(self.now + d),
        }
    }

    /// Seeds a state value, as if a previous invocation had written it.
    pub fn set_state<T: ValueType>(&mut self, spec: &ValueSpec<T>, value: &T) -> Result<(), StateError> {
        let i = self.slot(spec.name(), &T::TYPE_NAME)?;
        let bytes = value.encode().map_err(|source| StateError::Codec {
            name: spec.name().to_owned(),
            source,
        })?;
        let expires_at = self.expiry_from_now(spec.expiration());
        self.state[i] = Some(Stored { bytes, expires_at });
        Ok(())
    }

    /// Reads a state value as the runtime would store it now (expired values are gone).
    pub fn state<T: ValueType>(&self, spec: &ValueSpec<T>) -> Result<Option<T>, StateError> {
        let i = self.slot(spec.name(), &T::TYPE_NAME)?;
        match &self.state[i] {
            Some(s) if s.expires_at.is_none_or(|t| t > self.now) => {
                T::decode(&s.bytes).map(Some).map_err(|source| StateError::Codec {
                    name: spec.name().to_owned(),
                    source,
                })
            }
            _ => Ok(None),
        }
    }

    /// Invokes the function with a message from outside (no caller).
    pub async fn invoke(&mut self, message: TypedValue) -> Result<Effects, FunctionError> {
        self.invoke_from(None, message).await
    }

    /// Invokes the function with a message from `caller`. On `Ok`, the effects are
    /// applied to the harness (state, pending delayed messages) and returned; on `Err`
    /// nothing changes.
    pub async fn invoke_from(
        &mut self,
        caller: Option<Address>,
        message: TypedValue,
    ) -> Result<Effects, FunctionError> {
        // As the runtime: an expired value that asks for a notice gets it now, before
        // the message (which might overwrite it); an expiry trigger (the delayed
        // message `advance` hands back) only causes this check.
        let specs = Arc::clone(self.function.states());
        let mut notices = Vec::new();
        for (spec, s) in specs.iter().zip(&self.state) {
            if let Some(s) = s
                && spec.notify_on_expire
                && s.expires_at.is_some_and(|t| t <= self.now)
            {
                notices.push(crate::Expired::message(spec, s.bytes.clone()));
            }
        }
        let trigger = caller.as_ref() == Some(&self.address) && crate::Expired::is_notice(&message);
        let now = self.now;
        let values = self
            .state
            .iter()
            .map(|s| {
                s.as_ref()
                    .filter(|s| s.expires_at.is_none_or(|t| t > now))
                    .map(|s| s.bytes.clone())
            })
            .collect();
        let mut ctx = Context::new(self.address.clone(), specs, values);
        for notice in notices {
            ctx.set_caller(Some(self.address.clone()));
            self.function.function().invoke(&mut ctx, notice).await?;
        }
        if !trigger {
            ctx.set_caller(caller);
            self.function.function().invoke(&mut ctx, message).await?;
        }
        let effects = ctx.into_effects();
        self.expire();
        self.apply(&effects);
        Ok(effects)
    }

    /// Encodes `value` and invokes.
    pub async fn invoke_value<T: ValueType>(&mut self, value: &T) -> Result<Effects, FunctionError> {
        self.invoke(TypedValue::of(value)?).await
    }

    /// [`TestHarness::invoke`] for tests without an async runtime.
    pub fn invoke_blocking(&mut self, message: TypedValue) -> Result<Effects, FunctionError> {
        futures_executor::block_on(self.invoke(message))
    }

    /// [`TestHarness::invoke_from`] for tests without an async runtime.
    pub fn invoke_from_blocking(
        &mut self,
        caller: Option<Address>,
        message: TypedValue,
    ) -> Result<Effects, FunctionError> {
        futures_executor::block_on(self.invoke_from(caller, message))
    }

    /// [`TestHarness::invoke_value`] for tests without an async runtime.
    pub fn invoke_value_blocking<T: ValueType>(&mut self, value: &T) -> Result<Effects, FunctionError> {
        futures_executor::block_on(self.invoke_value(value))
    }

    fn apply(&mut self, effects: &Effects) {
        let specs = Arc::clone(self.function.states());
        for m in &effects.state {
            let i = specs
                .iter()
                .position(|s| s.name == m.name)
                .expect("mutations name declared state");
            self.state[i] = m.value.clone().map(|bytes| Stored {
                bytes,
                expires_at: match specs[i].expiration {
                    Expiration::AfterWrite(d) | Expiration::AfterCall(d) => Some(self.now + d),
                    Expiration::None => None,
                },
            });
        }
        // AFTER_CALL: any invocation refreshes every present value's deadline.
        for (s, spec) in self.state.iter_mut().zip(specs.iter()) {
            if let (Some(s), Expiration::AfterCall(d)) = (s, spec.expiration) {
                s.expires_at = Some(self.now + d);
            }
        }
        // Expiry notices: (re)scheduled for every written or refreshed value, cancelled
        // for a deleted one; after the function's own delayed effects, like the runtime.
        let mut notices = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            if !spec.notify_on_expire {
                continue;
            }
            let written = effects.state.iter().any(|m| m.name == spec.name);
            let refreshed = matches!(spec.expiration, Expiration::AfterCall(_));
            if !written && !refreshed {
                continue;
            }
            let token = crate::expiry::expiry_token(&spec.name);
            self.pending.retain(|p| p.token.as_ref() != Some(&token));
            if let Some(s) = &self.state[i]
                && let Some(due) = s.expires_at
            {
                notices.push(PendingDelayed {
                    due,
                    target: self.address.clone(),
                    message: crate::Expired::message(spec, s.bytes.clone()),
                    token: Some(token),
                });
            }
        }
        for d in &effects.delayed {
            match d {
                DelayedEffect::Send {
                    delay,
                    target,
                    message,
                    token,
                } => {
                    if let Some(t) = token {
                        self.pending.retain(|p| p.token.as_ref() != Some(t));
                    }
                    self.pending.push(PendingDelayed {
                        due: self.now + *delay,
                        target: target.clone(),
                        message: message.clone(),
                        token: token.clone(),
                    });
                }
                DelayedEffect::Cancel { token } => self.pending.retain(|p| p.token.as_ref() != Some(token)),
            }
        }
        self.pending.extend(notices);
    }

    /// Delayed messages not yet due, in the order they were sent.
    pub fn pending_delayed(&self) -> &[PendingDelayed] {
        &self.pending
    }

    /// Moves the virtual clock forward and returns the delayed messages that became due,
    /// in due order (ties in send order). Feed those addressed to this function back
    /// with [`TestHarness::invoke_from`].
    pub fn advance(&mut self, by: Duration) -> Vec<OutgoingMessage> {
        self.now += by;
        let now = self.now;
        let mut due: Vec<(usize, PendingDelayed)> = Vec::new();
        let mut keep = Vec::new();
        for (i, p) in self.pending.drain(..).enumerate() {
            if p.due <= now { due.push((i, p)) } else { keep.push(p) }
        }
        self.pending = keep;
        due.sort_by_key(|(i, p)| (p.due, *i));
        due.into_iter()
            .map(|(_, p)| OutgoingMessage {
                target: p.target,
                message: p.message,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: TypeName = TypeName::from_static("test/f");
    const V: ValueSpec<i64> = ValueSpec::named("v");
    const TTL: ValueSpec<i64> = ValueSpec::named("ttl").expire_after_write(Duration::from_secs(10));
    const CALL: ValueSpec<i64> = ValueSpec::named("call").expire_after_call(Duration::from_secs(10));

    fn harness() -> TestHarness {
        let spec = FunctionSpec::new(T).with_state(V).with_state(TTL).with_state(CALL);
        TestHarness::from_fn(spec, |ctx, msg| {
            let cmd: String = msg.decode()?;
            match cmd.as_str() {
                "write" => {
                    ctx.storage().set(&V, &1)?;
                    ctx.storage().set(&TTL, &1)?;
                    ctx.storage().set(&CALL, &1)?;
                }
                "fail" => {
                    ctx.storage().set(&V, &99)?;
                    return Err("boom".into());
                }
                "later" => {
                    let me = ctx.self_address().clone();
                    ctx.send_after_with_token(Duration::from_secs(5), me, &"tick".to_string(), "t")?;
                }
                "cancel" => ctx.cancel_delayed("t"),
                _ => {}
            }
            Ok(())
        })
    }

    fn s(v: &str) -> TypedValue {
        TypedValue::of(&v.to_string()).unwrap()
    }

    #[test]
    fn a_failed_invocation_changes_no_state() {
        let mut h = harness();
        h.invoke_blocking(s("write")).unwrap();
        assert!(h.invoke_blocking(s("fail")).is_err());
        assert_eq!(h.state(&V).unwrap(), Some(1));
    }

    #[test]
    fn after_write_expires_and_after_call_is_refreshed_by_invocations() {
        let mut h = harness();
        h.invoke_blocking(s("write")).unwrap();
        h.advance(Duration::from_secs(6));
        h.invoke_blocking(s("noop")).unwrap(); // refreshes CALL to t=16, TTL stays at t=10
        h.advance(Duration::from_secs(6)); // t = 12
        assert_eq!(h.state(&TTL).unwrap(), None);
        assert_eq!(h.state(&CALL).unwrap(), Some(1));
        assert_eq!(h.state(&V).unwrap(), Some(1));
        h.advance(Duration::from_secs(5)); // t = 17
        assert_eq!(h.state(&CALL).unwrap(), None);
    }

    #[test]
    fn delayed_messages_fire_on_advance_and_cancellation_removes_them() {
        let mut h = harness();
        h.invoke_blocking(s("later")).unwrap();
        assert!(h.advance(Duration::from_secs(4)).is_empty());
        let fired = h.advance(Duration::from_secs(1));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].message.decode::<String>().unwrap(), "tick");

        h.invoke_blocking(s("later")).unwrap();
        h.invoke_blocking(s("cancel")).unwrap();
        assert!(h.advance(Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn a_token_reused_while_pending_replaces_the_earlier_message() {
        let mut h = harness();
        h.invoke_blocking(s("later")).unwrap();
        h.advance(Duration::from_secs(3));
        h.invoke_blocking(s("later")).unwrap();
        assert_eq!(h.pending_delayed().len(), 1);
        assert!(
            h.advance(Duration::from_secs(3)).is_empty(),
            "the first timer was replaced"
        );
        assert_eq!(h.advance(Duration::from_secs(2)).len(), 1);
    }

    const BASKET: ValueSpec<String> = ValueSpec::named("basket")
        .expire_after_call(Duration::from_secs(10))
        .notify_on_expire();
    const RELEASED: ValueSpec<String> = ValueSpec::named("released");

    fn basket() -> TestHarness {
        let spec = FunctionSpec::new(T).with_state(BASKET).with_state(RELEASED);
        TestHarness::from_fn(spec, |ctx, msg| {
            if msg.is::<crate::Expired>() {
                let e: crate::Expired = msg.decode()?;
                assert_eq!(
                    ctx.storage().get(&BASKET)?,
                    None,
                    "the value is gone when the notice arrives"
                );
                let last: String = e.value_as()?;
                ctx.storage().set(&RELEASED, &last)?;
                return Ok(());
            }
            match msg.decode::<String>()?.as_str() {
                "clear" => ctx.storage().remove(&BASKET)?,
                item => {
                    let b = ctx.storage().get(&BASKET)?.unwrap_or_default() + item;
                    ctx.storage().set(&BASKET, &b)?;
                }
            }
            Ok(())
        })
    }

    #[test]
    fn an_expiring_value_sends_its_last_value_to_the_function() {
        let mut h = basket();
        h.invoke_blocking(s("a")).unwrap();
        h.advance(Duration::from_secs(8));
        h.invoke_blocking(s("b")).unwrap(); // rewrites and refreshes: due at t=18
        assert!(h.advance(Duration::from_secs(9)).is_empty(), "t=17: not yet");
        let due = h.advance(Duration::from_secs(1));
        assert_eq!(due.len(), 1, "one notice, the earlier one was replaced");
        let me = h.address().clone();
        h.invoke_from_blocking(Some(me), due[0].message.clone()).unwrap();
        assert_eq!(h.state(&RELEASED).unwrap().as_deref(), Some("ab"));
    }

    #[test]
    fn deleting_an_expiring_value_cancels_its_notice() {
        let mut h = basket();
        h.invoke_blocking(s("a")).unwrap();
        h.invoke_blocking(s("clear")).unwrap();
        assert!(h.pending_delayed().is_empty());
        assert!(h.advance(Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn a_message_after_the_deadline_gets_the_notice_delivered_first() {
        let mut h = basket();
        h.invoke_blocking(s("a")).unwrap();
        let due = h.advance(Duration::from_secs(11)); // the notice is due; not fed back yet
        h.invoke_blocking(s("b")).unwrap(); // the notice for "a" runs first
        assert_eq!(h.state(&RELEASED).unwrap().as_deref(), Some("a"));
        assert_eq!(h.state(&BASKET).unwrap().as_deref(), Some("b"), "a fresh basket");
        // Feeding the (now stale) timer message back does nothing.
        let me = h.address().clone();
        h.invoke_from_blocking(Some(me), due[0].message.clone()).unwrap();
        assert_eq!(h.state(&RELEASED).unwrap().as_deref(), Some("a"));
        assert_eq!(h.state(&BASKET).unwrap().as_deref(), Some("b"));
    }
}
