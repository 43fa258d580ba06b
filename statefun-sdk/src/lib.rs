//! # statefun-sdk
//!
//! Write **stateful functions** for the statefun-rs runtime: functions addressed by
//! `(type, id)`, each address with its own declared state, exchanging messages with
//! exactly-once effects. This crate opens no sockets and no files; the runtime
//! (`statefun-runtime`) does the I/O.
//!
//! ## The pieces
//!
//! * [`TypeName`] and [`Address`]: who is who.
//! * [`TypedValue`] (alias [`Message`]) and [`ValueType`]: values with a type name.
//!   StateFun's built-in types (`i32`, `i64`, `bool`, `f32`, `f64`, `String`) are
//!   byte-compatible with StateFun's SDKs; [`json_type!`] and [`protobuf_type!`] declare
//!   your own.
//! * [`ValueSpec`]: a named, typed, optionally expiring piece of per-address state.
//! * [`StatefulFunction`] and [`Context`]: the function and what it sees. Everything the
//!   context does is recorded as [`Effects`] data and applied by the runtime.
//! * [`Module`]: the functions of an application, keyed by type.
//! * [`TestHarness`]: run a function with no runtime at all.
//!
//! ## A function and its test
//!
//! ```
//! use statefun_sdk::prelude::*;
//! use statefun_sdk::TestHarness;
//!
//! const GREETER: TypeName = TypeName::from_static("example/greeter");
//! const SEEN: ValueSpec<i64> = ValueSpec::named("seen");
//! const GREETINGS: TypeName = TypeName::from_static("example/greetings");
//!
//! struct Greeter;
//!
//! #[async_trait]
//! impl StatefulFunction for Greeter {
//!     async fn invoke(&self, ctx: &mut Context, msg: Message) -> FunctionResult {
//!         let name: String = msg.decode()?;
//!         let seen = ctx.storage().get(&SEEN)?.unwrap_or(0) + 1;
//!         ctx.storage().set(&SEEN, &seen)?;
//!         ctx.send_egress(GREETINGS, &format!("Hello {name}, visit #{seen}"))?;
//!         Ok(())
//!     }
//! }
//!
//! let spec = FunctionSpec::new(GREETER).with_state(SEEN);
//! let mut h = TestHarness::new(spec, Greeter).with_id("ada");
//! h.invoke_value_blocking(&"Ada".to_string()).unwrap();
//! let effects = h.invoke_value_blocking(&"Ada".to_string()).unwrap();
//! assert_eq!(effects.egress[0].message.decode::<String>().unwrap(), "Hello Ada, visit #2");
//! assert_eq!(h.state(&SEEN).unwrap(), Some(2));
//! ```

pub mod context;
pub mod expiry;
pub mod function;
pub mod harness;
#[cfg(feature = "protocol")]
pub mod protocol;
#[cfg(feature = "remote")]
pub mod remote;
pub mod spec;
pub mod typename;
pub mod value;

pub use bytes;

pub use context::{
    Context, DelayedEffect, Effects, EgressMessage, OutgoingMessage, StateError, StateMutation, Storage,
};
pub use expiry::{Expired, expiry_token};
pub use function::{
    BatchError, FnFunction, FunctionError, FunctionResult, Invocation, Module, ModuleBuilder, ModuleError,
    RegisteredFunction, StatefulFunction, error_chain, panic_message,
};
pub use harness::{PendingDelayed, TestHarness};
pub use spec::{Expiration, FunctionSpec, InvalidStateName, StateSpec, ValueSpec};
pub use typename::{Address, NameError, TypeName};
pub use value::{CodecError, Message, TypedValue, ValueType};

/// The `async_trait` attribute, re-exported so function crates need no direct dependency.
pub use async_trait::async_trait;

/// Everything a function author needs, in one import.
pub mod prelude {
    pub use crate::{
        Address, Context, Expiration, Expired, FunctionResult, FunctionSpec, Message, Module, StatefulFunction,
        TypeName, TypedValue, ValueSpec, ValueType, async_trait, json_type, protobuf_type,
    };
}
