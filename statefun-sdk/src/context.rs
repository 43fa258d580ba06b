//! The [`Context`] a function is invoked with, and the [`Effects`] an invocation yields.
//!
//! Why it exists: functions never perform I/O through the context. `send`, `send_after`,
//! `cancel_delayed`, `send_egress` and `storage().set/remove` only *record* effects; the
//! runtime applies them in one place after the invocation returns (or throws them away
//! if it failed, so a failed invocation has no partial effects). [`Effects`] maps one to
//! one onto StateFun's `FromFunction.InvocationResponse`: state mutations, outgoing
//! messages, delayed invocations (including cancellation requests, in order), and
//! egress messages. That is what lets embedded and remote functions share one runtime.
//!
//! Invariant: [`Storage`] only exposes the values the function declared; an undeclared
//! name or a type that disagrees with the declaration is a [`StateError`], not a panic.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::spec::{StateSpec, ValueSpec};
use crate::typename::{Address, TypeName};
use crate::value::{CodecError, TypedValue, ValueType};

/// Why a state access failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The function's [`FunctionSpec`](crate::FunctionSpec) does not declare this name.
    #[error("state {name:?} is not declared by function type {function}")]
    Undeclared {
        /// The state name used.
        name: String,
        /// The function type.
        function: TypeName,
    },
    /// The declaration has a different value type than the one used.
    #[error("state {name:?} is declared as {declared}, accessed as {used}")]
    TypeMismatch {
        /// The state name.
        name: String,
        /// The declared type name.
        declared: TypeName,
        /// The type name of the spec used to access it.
        used: TypeName,
    },
    /// The stored bytes could not be decoded, or the new value could not be encoded.
    #[error("state {name:?}: {source}")]
    Codec {
        /// The state name.
        name: String,
        /// The codec error.
        #[source]
        source: CodecError,
    },
}

#[derive(Debug, Clone)]
struct Slot {
    value: Option<Bytes>,
    dirty: bool,
}

/// The declared state of one address, as seen during an invocation.
#[derive(Debug)]
pub struct Storage {
    function: TypeName,
    specs: Arc<[StateSpec]>,
    slots: Vec<Slot>,
}

impl Storage {
    fn index(&self, name: &str, type_name: &TypeName) -> Result<usize, StateError> {
        let Some(i) = self.specs.iter().position(|s| &*s.name == name) else {
            return Err(StateError::Undeclared {
                name: name.to_owned(),
                function: self.function.clone(),
            });
        };
        let declared = &self.specs[i].type_name;
        if declared != type_name {
            return Err(StateError::TypeMismatch {
                name: name.to_owned(),
                declared: declared.clone(),
                used: type_name.clone(),
            });
        }
        Ok(i)
    }

    /// Reads a value; `Ok(None)` when it was never set, was removed, or expired.
    pub fn get<T: ValueType>(&self, spec: &ValueSpec<T>) -> Result<Option<T>, StateError> {
        let i = self.index(spec.name(), &T::TYPE_NAME)?;
        match &self.slots[i].value {
            None => Ok(None),
            Some(b) => T::decode(b).map(Some).map_err(|source| StateError::Codec {
                name: spec.name().to_owned(),
                source,
            }),
        }
    }

    /// Writes a value.
    pub fn set<T: ValueType>(&mut self, spec: &ValueSpec<T>, value: &T) -> Result<(), StateError> {
        let i = self.index(spec.name(), &T::TYPE_NAME)?;
        let bytes = value.encode().map_err(|source| StateError::Codec {
            name: spec.name().to_owned(),
            source,
        })?;
        self.slots[i] = Slot {
            value: Some(bytes),
            dirty: true,
        };
        Ok(())
    }

    /// Removes a value.
    pub fn remove<T: ValueType>(&mut self, spec: &ValueSpec<T>) -> Result<(), StateError> {
        let i = self.index(spec.name(), &T::TYPE_NAME)?;
        self.slots[i] = Slot {
            value: None,
            dirty: true,
        };
        Ok(())
    }

    /// Reads the raw bytes of a declared value by name (for remote transports).
    pub fn get_raw(&self, name: &str) -> Option<&Bytes> {
        let i = self.specs.iter().position(|s| &*s.name == name)?;
        self.slots[i].value.as_ref()
    }

    /// Writes a declared value from its encoded bytes, checking `type_name` against the
    /// declaration (for remote transports applying a function's response).
    pub fn set_raw(&mut self, name: &str, type_name: &TypeName, value: Bytes) -> Result<(), StateError> {
        let i = self.index(name, type_name)?;
        self.slots[i] = Slot {
            value: Some(value),
            dirty: true,
        };
        Ok(())
    }

    /// Removes a declared value by name (for remote transports).
    pub fn remove_raw(&mut self, name: &str) -> Result<(), StateError> {
        let Some(i) = self.specs.iter().position(|s| &*s.name == name) else {
            return Err(StateError::Undeclared {
                name: name.to_owned(),
                function: self.function.clone(),
            });
        };
        self.slots[i] = Slot {
            value: None,
            dirty: true,
        };
        Ok(())
    }

    /// The declarations this storage exposes.
    pub fn specs(&self) -> &[StateSpec] {
        &self.specs
    }
}

/// A message to another function, recorded by [`Context::send`].
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    /// The receiving address.
    pub target: Address,
    /// The message.
    pub message: TypedValue,
}

/// A delayed message or a cancellation, recorded in the order the function made them.
#[derive(Debug, Clone, PartialEq)]
pub enum DelayedEffect {
    /// Deliver `message` to `target` after `delay`.
    Send {
        /// How long to wait.
        delay: Duration,
        /// The receiving address.
        target: Address,
        /// The message.
        message: TypedValue,
        /// Token to cancel it with, scoped to the sending address.
        token: Option<String>,
    },
    /// Cancel the pending delayed message this address sent with `token`.
    Cancel {
        /// The token.
        token: String,
    },
}

/// A record for an egress, recorded by [`Context::send_egress`].
#[derive(Debug, Clone, PartialEq)]
pub struct EgressMessage {
    /// The egress id.
    pub egress: TypeName,
    /// The record.
    pub message: TypedValue,
}

/// A state change: `Some` bytes to store, `None` to delete.
#[derive(Debug, Clone, PartialEq)]
pub struct StateMutation {
    /// The declared state name.
    pub name: Arc<str>,
    /// The new value, or `None` for deletion.
    pub value: Option<Bytes>,
}

/// Everything one invocation (or one batch of invocations of one address) produced.
/// Shaped like StateFun's `InvocationResponse`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    /// Final value of every state the function changed (last write wins).
    pub state: Vec<StateMutation>,
    /// Messages to other functions, in send order.
    pub outgoing: Vec<OutgoingMessage>,
    /// Delayed messages and cancellations, in order.
    pub delayed: Vec<DelayedEffect>,
    /// Egress records, in order.
    pub egress: Vec<EgressMessage>,
}

impl Effects {
    /// True when the invocation produced nothing.
    pub fn is_empty(&self) -> bool {
        self.state.is_empty() && self.outgoing.is_empty() && self.delayed.is_empty() && self.egress.is_empty()
    }
}

/// What a function sees during an invocation: its address, the caller, its state, and
/// methods that record effects.
#[derive(Debug)]
pub struct Context {
    address: Address,
    caller: Option<Address>,
    storage: Storage,
    outgoing: Vec<OutgoingMessage>,
    delayed: Vec<DelayedEffect>,
    egress: Vec<EgressMessage>,
}

impl Context {
    /// Builds a context (for runtimes and test tools). `values[i]` is the current value of
    /// `specs[i]`; missing trailing values are treated as absent.
    pub fn new(address: Address, specs: Arc<[StateSpec]>, mut values: Vec<Option<Bytes>>) -> Context {
        values.resize(specs.len(), None);
        let slots = values.into_iter().map(|value| Slot { value, dirty: false }).collect();
        Context {
            storage: Storage {
                function: address.type_name().clone(),
                specs,
                slots,
            },
            address,
            caller: None,
            outgoing: Vec::new(),
            delayed: Vec::new(),
            egress: Vec::new(),
        }
    }

    /// Sets the caller for the next message of a batch (for runtimes and test tools).
    pub fn set_caller(&mut self, caller: Option<Address>) {
        self.caller = caller;
    }

    /// Ends the invocation and returns its effects (for runtimes and test tools).
    pub fn into_effects(self) -> Effects {
        let specs = self.storage.specs;
        let state = self
            .storage
            .slots
            .into_iter()
            .zip(specs.iter())
            .filter(|(slot, _)| slot.dirty)
            .map(|(slot, spec)| StateMutation {
                name: spec.name.clone(),
                value: slot.value,
            })
            .collect();
        Effects {
            state,
            outgoing: self.outgoing,
            delayed: self.delayed,
            egress: self.egress,
        }
    }

    /// The address being invoked.
    pub fn self_address(&self) -> &Address {
        &self.address
    }

    /// The function that sent the current message; `None` for ingress records and
    /// messages sent from outside any function.
    pub fn caller(&self) -> Option<&Address> {
        self.caller.as_ref()
    }

    /// The declared state of this address.
    pub fn storage(&mut self) -> &mut Storage {
        &mut self.storage
    }

    /// Read-only view of the state.
    pub fn storage_ref(&self) -> &Storage {
        &self.storage
    }

    /// Sends a message to another function (or to this one).
    pub fn send<T: ValueType>(&mut self, target: Address, value: &T) -> Result<(), CodecError> {
        let message = TypedValue::of(value)?;
        self.send_message(target, message);
        Ok(())
    }

    /// Sends an already-encoded message.
    pub fn send_message(&mut self, target: Address, message: TypedValue) {
        self.outgoing.push(OutgoingMessage { target, message });
    }

    /// Sends a message after `delay` (processing time). Delayed messages are kept by the
    /// runtime in the sender's partition and survive restarts with a durable backend.
    pub fn send_after<T: ValueType>(&mut self, delay: Duration, target: Address, value: &T) -> Result<(), CodecError> {
        let message = TypedValue::of(value)?;
        self.send_message_after(delay, target, message, None);
        Ok(())
    }

    /// Like [`Context::send_after`], cancellable with `token` through
    /// [`Context::cancel_delayed`]. Tokens are scoped to the sending address; sending a
    /// new delayed message with a token that is still pending replaces the pending one
    /// (handy for "reset the timeout" patterns).
    pub fn send_after_with_token<T: ValueType>(
        &mut self,
        delay: Duration,
        target: Address,
        value: &T,
        token: impl Into<String>,
    ) -> Result<(), CodecError> {
        let message = TypedValue::of(value)?;
        self.send_message_after(delay, target, message, Some(token.into()));
        Ok(())
    }

    /// Sends an already-encoded message after `delay`, with an optional token.
    pub fn send_message_after(&mut self, delay: Duration, target: Address, message: TypedValue, token: Option<String>) {
        self.delayed.push(DelayedEffect::Send {
            delay,
            target,
            message,
            token: token.filter(|t| !t.is_empty()),
        });
    }

    /// Cancels the pending delayed message this address sent with `token`. Cancelling a
    /// token that already fired or never existed does nothing.
    pub fn cancel_delayed(&mut self, token: impl Into<String>) {
        self.delayed.push(DelayedEffect::Cancel { token: token.into() });
    }

    /// Writes a record to an egress.
    pub fn send_egress<T: ValueType>(&mut self, egress: TypeName, value: &T) -> Result<(), CodecError> {
        let message = TypedValue::of(value)?;
        self.send_egress_message(egress, message);
        Ok(())
    }

    /// Writes an already-encoded record to an egress.
    pub fn send_egress_message(&mut self, egress: TypeName, message: TypedValue) {
        self.egress.push(EgressMessage { egress, message });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FunctionSpec;

    const A: ValueSpec<i64> = ValueSpec::named("a");
    const B: ValueSpec<String> = ValueSpec::named("b");
    const UNDECLARED: ValueSpec<i64> = ValueSpec::named("zzz");
    const WRONG_TYPE: ValueSpec<i32> = ValueSpec::named("a");

    fn ctx() -> Context {
        let spec = FunctionSpec::new(TypeName::from_static("t/f"))
            .with_state(A)
            .with_state(B);
        let addr = Address::new(spec.type_name().clone(), "1").unwrap();
        Context::new(addr, spec.states().to_vec().into(), vec![Some(7i64.encode().unwrap())])
    }

    #[test]
    fn undeclared_and_mistyped_access_are_errors_not_panics() {
        let mut c = ctx();
        assert!(matches!(
            c.storage().get(&UNDECLARED),
            Err(StateError::Undeclared { .. })
        ));
        assert!(matches!(
            c.storage().set(&UNDECLARED, &1),
            Err(StateError::Undeclared { .. })
        ));
        assert!(matches!(
            c.storage().get(&WRONG_TYPE),
            Err(StateError::TypeMismatch { .. })
        ));
    }

    #[test]
    fn only_changed_state_becomes_mutations_with_last_write_winning() {
        let mut c = ctx();
        assert_eq!(c.storage().get(&A).unwrap(), Some(7));
        assert_eq!(c.storage().get(&B).unwrap(), None);
        c.storage().set(&B, &"x".to_string()).unwrap();
        c.storage().set(&B, &"y".to_string()).unwrap();
        let e = c.into_effects();
        assert_eq!(e.state.len(), 1);
        assert_eq!(&*e.state[0].name, "b");
        assert_eq!(
            e.state[0].value.as_deref(),
            Some(&"y".to_string().encode().unwrap()[..])
        );
    }

    #[test]
    fn raw_writes_check_the_declaration_and_become_mutations() {
        let mut c = ctx();
        let int = crate::value::builtin::INT;
        assert!(matches!(
            c.storage().set_raw("a", &int, Bytes::from_static(b"x")),
            Err(StateError::TypeMismatch { .. })
        ));
        assert!(matches!(
            c.storage().remove_raw("zzz"),
            Err(StateError::Undeclared { .. })
        ));
        c.storage()
            .set_raw("b", &crate::value::builtin::STRING, Bytes::from_static(b"\x0a\x01y"))
            .unwrap();
        c.storage().remove_raw("a").unwrap();
        let e = c.into_effects();
        assert_eq!(e.state.len(), 2);
        assert_eq!((&*e.state[0].name, e.state[0].value.is_none()), ("a", true));
        assert_eq!(e.state[1].value.as_deref(), Some(&b"\x0a\x01y"[..]));
    }

    #[test]
    fn delayed_sends_and_cancellations_keep_their_order() {
        let mut c = ctx();
        let to = c.self_address().clone();
        c.send_after_with_token(Duration::from_secs(1), to.clone(), &1i64, "t")
            .unwrap();
        c.cancel_delayed("t");
        c.send_after(Duration::from_secs(2), to, &2i64).unwrap();
        let e = c.into_effects();
        assert!(matches!(&e.delayed[0], DelayedEffect::Send { token: Some(t), .. } if t == "t"));
        assert!(matches!(&e.delayed[1], DelayedEffect::Cancel { token } if token == "t"));
        assert!(matches!(&e.delayed[2], DelayedEffect::Send { token: None, .. }));
    }
}
