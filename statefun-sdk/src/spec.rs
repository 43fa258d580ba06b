//! Declarations: [`ValueSpec`] (one named, typed piece of per-address state, with an
//! optional expiration) and [`FunctionSpec`] (a function type and the state it declares).
//!
//! Why it exists: as in StateFun, a function declares its state up front. The runtime
//! loads exactly the declared values before an invocation, and a remote function learns
//! from the declarations which values to expect. Touching a value that was not declared
//! is an error value ([`StateError::Undeclared`](crate::StateError::Undeclared)).

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use crate::typename::TypeName;
use crate::value::ValueType;

/// When a state value expires.
///
/// Expired values are never returned to a function. `AfterWrite`: the value expires the
/// given duration after it was last written. `AfterCall`: after the address was last
/// invoked (any message to the address refreshes it), StateFun's `AFTER_INVOKE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Expiration {
    /// Never expires.
    #[default]
    None,
    /// Expires this long after the last write.
    AfterWrite(Duration),
    /// Expires this long after the address was last invoked.
    AfterCall(Duration),
}

/// Why a state name is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid state name {0:?}: use 1 to 255 ASCII letters, digits or '_', not starting with a digit")]
pub struct InvalidStateName(pub String);

const fn valid_state_name(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 255 || b[0].is_ascii_digit() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if !(b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            return false;
        }
        i += 1;
    }
    true
}

/// One named, typed piece of per-address state. Declare it as a `const`:
///
/// ```
/// use std::time::Duration;
/// use statefun_sdk::ValueSpec;
/// const SEEN: ValueSpec<i64> = ValueSpec::named("seen");
/// const BASKET: ValueSpec<String> =
///     ValueSpec::named("basket").expire_after_write(Duration::from_secs(900));
/// assert_eq!(SEEN.name(), "seen");
/// ```
pub struct ValueSpec<T> {
    name: &'static str,
    expiration: Expiration,
    notify_on_expire: bool,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for ValueSpec<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for ValueSpec<T> {}

impl<T: ValueType> ValueSpec<T> {
    /// A spec with the given name and no expiration.
    ///
    /// # Panics
    /// If the name is not 1-255 ASCII letters, digits or `_` starting with a non-digit
    /// (at compile time in a `const`).
    pub const fn named(name: &'static str) -> ValueSpec<T> {
        if !valid_state_name(name) {
            panic!("invalid ValueSpec name: use ASCII letters, digits or '_', not starting with a digit");
        }
        ValueSpec {
            name,
            expiration: Expiration::None,
            notify_on_expire: false,
            _type: PhantomData,
        }
    }

    /// Deliver an [`Expired`](crate::Expired) message with the last value to the
    /// function when the value expires (see [`crate::expiry`] for the semantics).
    /// Has no effect on a value that never expires.
    ///
    /// ```
    /// use std::time::Duration;
    /// use statefun_sdk::ValueSpec;
    /// const BASKET: ValueSpec<String> = ValueSpec::named("basket")
    ///     .expire_after_call(Duration::from_secs(900))
    ///     .notify_on_expire();
    /// assert!(BASKET.to_state_spec().notify_on_expire);
    /// ```
    pub const fn notify_on_expire(mut self) -> Self {
        self.notify_on_expire = true;
        self
    }

    /// Expire the value `ttl` after it was last written.
    pub const fn expire_after_write(mut self, ttl: Duration) -> Self {
        self.expiration = Expiration::AfterWrite(ttl);
        self
    }

    /// Expire the value `ttl` after the address was last invoked.
    pub const fn expire_after_call(mut self, ttl: Duration) -> Self {
        self.expiration = Expiration::AfterCall(ttl);
        self
    }

    /// The state name.
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The expiration.
    pub const fn expiration(&self) -> Expiration {
        self.expiration
    }

    /// The type name of the stored values.
    pub fn type_name(&self) -> TypeName {
        T::TYPE_NAME
    }

    /// The untyped declaration the runtime works with.
    pub fn to_state_spec(&self) -> StateSpec {
        StateSpec {
            name: Arc::from(self.name),
            type_name: T::TYPE_NAME,
            expiration: self.expiration,
            notify_on_expire: self.notify_on_expire && !matches!(self.expiration, Expiration::None),
        }
    }
}

impl<T> std::fmt::Debug for ValueSpec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValueSpec")
            .field("name", &self.name)
            .field("expiration", &self.expiration)
            .field("notify_on_expire", &self.notify_on_expire)
            .finish()
    }
}

/// An untyped state declaration: name, value type name, expiration. What the runtime
/// stores and what StateFun's protocol calls a `PersistedValueSpec`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StateSpec {
    /// The state name, unique within the function type.
    pub name: Arc<str>,
    /// The type name of the values.
    pub type_name: TypeName,
    /// The expiration.
    pub expiration: Expiration,
    /// Deliver an [`Expired`](crate::Expired) message when the value expires (only
    /// meaningful with an expiration).
    pub notify_on_expire: bool,
}

impl StateSpec {
    /// Builds a declaration from parts (e.g. from a remote function's
    /// `IncompleteInvocationContext`), validating the name.
    pub fn new(name: &str, type_name: TypeName, expiration: Expiration) -> Result<StateSpec, InvalidStateName> {
        if !valid_state_name(name) {
            return Err(InvalidStateName(name.to_owned()));
        }
        Ok(StateSpec {
            name: Arc::from(name),
            type_name,
            expiration,
            notify_on_expire: false,
        })
    }
}

/// A function type and the state it declares.
///
/// ```
/// use statefun_sdk::{FunctionSpec, TypeName, ValueSpec};
/// const COUNT: ValueSpec<i64> = ValueSpec::named("count");
/// let spec = FunctionSpec::new(TypeName::from_static("example/counter")).with_state(COUNT);
/// assert_eq!(spec.states().len(), 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSpec {
    type_name: TypeName,
    states: Vec<StateSpec>,
}

impl FunctionSpec {
    /// A spec with no state (a stateless function).
    pub fn new(type_name: TypeName) -> FunctionSpec {
        FunctionSpec {
            type_name,
            states: Vec::new(),
        }
    }

    /// Declares a state value. Declaring the same name twice is reported by
    /// [`ModuleBuilder::build`](crate::ModuleBuilder::build).
    pub fn with_state<T: ValueType>(mut self, spec: ValueSpec<T>) -> FunctionSpec {
        self.states.push(spec.to_state_spec());
        self
    }

    /// Declares an untyped state value.
    pub fn with_state_spec(mut self, spec: StateSpec) -> FunctionSpec {
        self.states.push(spec);
        self
    }

    /// The function type.
    pub fn type_name(&self) -> &TypeName {
        &self.type_name
    }

    /// The declared state, in declaration order.
    pub fn states(&self) -> &[StateSpec] {
        &self.states
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_follow_identifier_rules() {
        assert!(StateSpec::new("ok_name1", crate::value::builtin::INT, Expiration::None).is_ok());
        for bad in ["", "1abc", "has-dash", "has space", &"x".repeat(256)] {
            assert!(
                StateSpec::new(bad, crate::value::builtin::INT, Expiration::None).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn value_spec_carries_type_and_expiration_into_the_untyped_spec() {
        const S: ValueSpec<String> = ValueSpec::named("s").expire_after_call(Duration::from_millis(5));
        let u = S.to_state_spec();
        assert_eq!(&*u.name, "s");
        assert_eq!(u.type_name, crate::value::builtin::STRING);
        assert_eq!(u.expiration, Expiration::AfterCall(Duration::from_millis(5)));
    }
}
