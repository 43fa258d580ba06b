//! StateFun's request-reply protocol in terms of the SDK's types (feature `protocol`).
//!
//! Why it exists: a remote invocation has two halves that must agree byte for byte with
//! StateFun's SDKs. The caller's half, used by the runtime's remote transports
//! (`statefun-remote`), turns a batch on a [`Context`] into a `ToFunction` request
//! ([`batch_request`]) and applies the `FromFunction` answer to the context
//! ([`apply_response`]), so the runtime applies a remote function's effects exactly as
//! an embedded one's. The function's half, used by the SDK's remote server, answers a
//! request with any [`StatefulFunction`] of a [`Module`] ([`serve_request`]).
//!
//! A malformed answer (a missing field, an invalid type name, a state the function did
//! not register, a value whose type disagrees with the registered spec) is an error
//! value naming what is wrong, never a panic.

use std::sync::Arc;
use std::time::Duration;

pub use statefun_protocol::{CONTENT_TYPE, KAFKA_PRODUCER_RECORD_TYPE, egress, reqreply};

use crate::context::{Context, DelayedEffect, Effects};
use crate::function::{BatchError, Invocation, Module};
use crate::spec::{Expiration, StateSpec};
use crate::typename::{Address, TypeName};
use crate::value::TypedValue;
use reqreply::from_function::{self, expiration_spec::ExpireMode, persisted_value_mutation::MutationType};
use reqreply::{FromFunction, ToFunction, to_function};

crate::protobuf_type!(
    egress::KafkaProducerRecord,
    "type.googleapis.com/io.statefun.sdk.egress.KafkaProducerRecord"
);

/// A protocol value that does not make an SDK value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConversionError {
    /// A type name is not `namespace/name`.
    #[error("invalid type name {0:?}: expected <namespace>/<name>")]
    TypeName(String),
    /// An address has an empty id or an invalid type.
    #[error("invalid address {namespace}/{kind} id {id:?}")]
    Address {
        /// Namespace.
        namespace: String,
        /// Type.
        kind: String,
        /// Id.
        id: String,
    },
    /// A required field is missing.
    #[error("{0} is missing")]
    Missing(&'static str),
    /// A field has a value the protocol does not allow.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl From<&Address> for reqreply::Address {
    fn from(a: &Address) -> Self {
        reqreply::Address {
            namespace: a.type_name().namespace().to_owned(),
            r#type: a.type_name().name().to_owned(),
            id: a.id().to_owned(),
        }
    }
}

impl TryFrom<&reqreply::Address> for Address {
    type Error = ConversionError;

    fn try_from(a: &reqreply::Address) -> Result<Address, ConversionError> {
        let invalid = || ConversionError::Address {
            namespace: a.namespace.clone(),
            kind: a.r#type.clone(),
            id: a.id.clone(),
        };
        let t = TypeName::from_parts(&a.namespace, &a.r#type).map_err(|_| invalid())?;
        Address::new(t, &a.id).map_err(|_| invalid())
    }
}

impl From<&TypedValue> for reqreply::TypedValue {
    fn from(v: &TypedValue) -> Self {
        reqreply::TypedValue {
            typename: v.type_name().as_str().to_owned(),
            has_value: v.bytes().is_some(),
            value: v.bytes().cloned().unwrap_or_default(),
        }
    }
}

impl TryFrom<reqreply::TypedValue> for TypedValue {
    type Error = ConversionError;

    fn try_from(v: reqreply::TypedValue) -> Result<TypedValue, ConversionError> {
        let t = type_name(&v.typename)?;
        Ok(if v.has_value {
            TypedValue::from_bytes(t, v.value)
        } else {
            TypedValue::absent(t)
        })
    }
}

fn type_name(s: &str) -> Result<TypeName, ConversionError> {
    TypeName::parse(s).map_err(|_| ConversionError::TypeName(s.to_owned()))
}

fn address(a: Option<&reqreply::Address>, field: &'static str) -> Result<Address, ConversionError> {
    Address::try_from(a.ok_or(ConversionError::Missing(field))?)
}

fn value(v: Option<reqreply::TypedValue>, field: &'static str) -> Result<TypedValue, ConversionError> {
    TypedValue::try_from(v.ok_or(ConversionError::Missing(field))?)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A state declaration as the protocol's `PersistedValueSpec` (what a function names
/// in an `IncompleteInvocationContext`).
pub fn value_spec(spec: &StateSpec) -> from_function::PersistedValueSpec {
    let (mode, ms) = match spec.expiration {
        Expiration::None => (ExpireMode::None, 0),
        Expiration::AfterWrite(d) => (ExpireMode::AfterWrite, millis(d)),
        Expiration::AfterCall(d) => (ExpireMode::AfterInvoke, millis(d)),
    };
    from_function::PersistedValueSpec {
        state_name: spec.name.to_string(),
        expiration_spec: Some(from_function::ExpirationSpec {
            mode: mode as i32,
            expire_after_millis: ms,
        }),
        type_typename: spec.type_name.as_str().to_owned(),
    }
}

/// The declaration a function asks for in an `IncompleteInvocationContext`.
pub fn state_spec(spec: &from_function::PersistedValueSpec) -> Result<StateSpec, ConversionError> {
    let ttl = |ms: i64| {
        u64::try_from(ms)
            .map(Duration::from_millis)
            .map_err(|_| ConversionError::Invalid {
                field: "expire_after_millis",
                reason: format!("{ms} is negative"),
            })
    };
    let expiration = match spec.expiration_spec.as_ref() {
        None => Expiration::None,
        Some(e) => match ExpireMode::try_from(e.mode) {
            Ok(ExpireMode::None) => Expiration::None,
            Ok(ExpireMode::AfterWrite) => Expiration::AfterWrite(ttl(e.expire_after_millis)?),
            Ok(ExpireMode::AfterInvoke) => Expiration::AfterCall(ttl(e.expire_after_millis)?),
            Err(_) => {
                return Err(ConversionError::Invalid {
                    field: "expiration_spec.mode",
                    reason: format!("unknown mode {}", e.mode),
                });
            }
        },
    };
    StateSpec::new(&spec.state_name, type_name(&spec.type_typename)?, expiration).map_err(|e| {
        ConversionError::Invalid {
            field: "state_name",
            reason: e.to_string(),
        }
    })
}

/// The caller's half: the request for `batch` on `ctx`, carrying every registered state
/// of the address (absent values as a name without a value).
pub fn batch_request(ctx: &Context, batch: &[Invocation]) -> ToFunction {
    let storage = ctx.storage_ref();
    let state = storage
        .specs()
        .iter()
        .map(|s| to_function::PersistedValue {
            state_name: s.name.to_string(),
            state_value: storage
                .get_raw(&s.name)
                .map(|v| statefun_protocol::typed_value(s.type_name.as_str(), v.clone())),
        })
        .collect();
    let invocations = batch
        .iter()
        .map(|i| to_function::Invocation {
            caller: i.caller.as_ref().map(Into::into),
            argument: Some((&i.message).into()),
        })
        .collect();
    ToFunction {
        request: Some(to_function::Request::Invocation(to_function::InvocationBatchRequest {
            target: Some(ctx.self_address().into()),
            state,
            invocations,
        })),
    }
}

/// Why a response could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("malformed response from the function: {0}")]
pub struct MalformedResponse(pub String);

/// The caller's half: records the effects of a `FromFunction` answer in `ctx` (as if
/// the function had run embedded), or returns [`BatchError::MissingStates`] for an
/// `IncompleteInvocationContext`. An empty answer means no effects. A malformed answer
/// is a [`BatchError::Failed`] of the whole batch carrying a [`MalformedResponse`].
pub fn apply_response(ctx: &mut Context, response: FromFunction) -> Result<(), BatchError> {
    let malformed = |e: String| BatchError::failed(0, MalformedResponse(e));
    match response.response {
        None => Ok(()),
        Some(from_function::Response::IncompleteInvocationContext(c)) => {
            let specs = c
                .missing_values
                .iter()
                .map(state_spec)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| malformed(format!("incomplete_invocation_context: {e}")))?;
            if specs.is_empty() {
                return Err(malformed("incomplete_invocation_context names no state".to_owned()));
            }
            Err(BatchError::MissingStates(specs))
        }
        Some(from_function::Response::InvocationResult(r)) => apply_effects(ctx, r).map_err(malformed),
    }
}

fn apply_effects(ctx: &mut Context, r: from_function::InvocationResponse) -> Result<(), String> {
    for (i, m) in r.outgoing_messages.into_iter().enumerate() {
        let at = |e: ConversionError| format!("outgoing_messages[{i}]: {e}");
        let target = address(m.target.as_ref(), "target").map_err(at)?;
        ctx.send_message(target, value(m.argument, "argument").map_err(at)?);
    }
    for (i, d) in r.delayed_invocations.into_iter().enumerate() {
        let at = |e: ConversionError| format!("delayed_invocations[{i}]: {e}");
        if d.is_cancellation_request {
            ctx.cancel_delayed(d.cancellation_token);
            continue;
        }
        let delay = u64::try_from(d.delay_in_ms).map_err(|_| format!("delayed_invocations[{i}]: negative delay"))?;
        let target = address(d.target.as_ref(), "target").map_err(at)?;
        let message = value(d.argument, "argument").map_err(at)?;
        let token = Some(d.cancellation_token).filter(|t| !t.is_empty());
        ctx.send_message_after(Duration::from_millis(delay), target, message, token);
    }
    for (i, e) in r.outgoing_egresses.into_iter().enumerate() {
        let at = |e: ConversionError| format!("outgoing_egresses[{i}]: {e}");
        let egress = TypeName::from_parts(&e.egress_namespace, &e.egress_type).map_err(|_| {
            at(ConversionError::TypeName(format!(
                "{}/{}",
                e.egress_namespace, e.egress_type
            )))
        })?;
        ctx.send_egress_message(egress, value(e.argument, "argument").map_err(at)?);
    }
    for (i, m) in r.state_mutations.into_iter().enumerate() {
        let at = |e: String| format!("state_mutations[{i}]: {e}");
        let applied = match MutationType::try_from(m.mutation_type) {
            Ok(MutationType::Delete) => ctx.storage().remove_raw(&m.state_name),
            Ok(MutationType::Modify) => {
                let v = m.state_value.ok_or_else(|| at("state_value is missing".to_owned()))?;
                let t = type_name(&v.typename).map_err(|e| at(e.to_string()))?;
                if v.has_value {
                    ctx.storage().set_raw(&m.state_name, &t, v.value)
                } else {
                    ctx.storage().remove_raw(&m.state_name)
                }
            }
            Err(_) => return Err(at(format!("unknown mutation type {}", m.mutation_type))),
        };
        applied.map_err(|e| at(e.to_string()))?;
    }
    Ok(())
}

/// The function's half: the answer of an [`Effects`] value to a `ToFunction` request.
/// `specs` are the function's declarations (for the type names of changed values).
pub fn invocation_response(specs: &[StateSpec], effects: Effects) -> FromFunction {
    let state_mutations = effects
        .state
        .into_iter()
        .map(|m| match m.value {
            Some(v) => {
                let t = specs
                    .iter()
                    .find(|s| s.name == m.name)
                    .map(|s| s.type_name.as_str())
                    .unwrap_or_default();
                from_function::PersistedValueMutation {
                    mutation_type: MutationType::Modify as i32,
                    state_name: m.name.to_string(),
                    state_value: Some(statefun_protocol::typed_value(t, v)),
                }
            }
            None => from_function::PersistedValueMutation {
                mutation_type: MutationType::Delete as i32,
                state_name: m.name.to_string(),
                state_value: None,
            },
        })
        .collect();
    let outgoing_messages = effects
        .outgoing
        .iter()
        .map(|o| from_function::Invocation {
            target: Some((&o.target).into()),
            argument: Some((&o.message).into()),
        })
        .collect();
    let delayed_invocations = effects
        .delayed
        .iter()
        .map(|d| match d {
            DelayedEffect::Send {
                delay,
                target,
                message,
                token,
            } => from_function::DelayedInvocation {
                is_cancellation_request: false,
                cancellation_token: token.clone().unwrap_or_default(),
                delay_in_ms: millis(*delay),
                target: Some(target.into()),
                argument: Some(message.into()),
            },
            DelayedEffect::Cancel { token } => from_function::DelayedInvocation {
                is_cancellation_request: true,
                cancellation_token: token.clone(),
                ..Default::default()
            },
        })
        .collect();
    let outgoing_egresses = effects
        .egress
        .iter()
        .map(|e| from_function::EgressMessage {
            egress_namespace: e.egress.namespace().to_owned(),
            egress_type: e.egress.name().to_owned(),
            argument: Some((&e.message).into()),
        })
        .collect();
    FromFunction {
        response: Some(from_function::Response::InvocationResult(
            from_function::InvocationResponse {
                state_mutations,
                outgoing_messages,
                delayed_invocations,
                outgoing_egresses,
            },
        )),
    }
}

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The request is not a valid invocation batch.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The module has no function of the target's type.
    #[error("no function of type {0} is served here")]
    UnknownFunction(TypeName),
    /// The function failed (the caller retries the batch).
    #[error("{0}")]
    Function(BatchError),
}

/// The function's half: answers one `ToFunction` request with the module's function of
/// the target type, as StateFun's SDKs do. A request without every declared state gets
/// an `IncompleteInvocationContext` naming the missing ones; otherwise the batch runs on
/// one [`Context`] through [`StatefulFunction::invoke_batch`](crate::StatefulFunction::invoke_batch)
/// and its effects are the answer.
pub async fn serve_request(module: &Module, request: ToFunction) -> Result<FromFunction, ServeError> {
    let bad = |e: String| ServeError::BadRequest(e);
    let Some(to_function::Request::Invocation(batch)) = request.request else {
        return Err(bad("no invocation batch".to_owned()));
    };
    let target = address(batch.target.as_ref(), "target").map_err(|e| bad(e.to_string()))?;
    let function = module
        .get(target.type_name())
        .ok_or_else(|| ServeError::UnknownFunction(target.type_name().clone()))?;
    let specs: &Arc<[StateSpec]> = function.states();
    let missing: Vec<_> = specs
        .iter()
        .filter(|s| !batch.state.iter().any(|v| *v.state_name == *s.name))
        .map(value_spec)
        .collect();
    if !missing.is_empty() {
        return Ok(FromFunction {
            response: Some(from_function::Response::IncompleteInvocationContext(
                from_function::IncompleteInvocationContext {
                    missing_values: missing,
                },
            )),
        });
    }
    let mut values = Vec::with_capacity(specs.len());
    for s in specs.iter() {
        let v = batch
            .state
            .iter()
            .find(|v| *v.state_name == *s.name)
            .and_then(|v| v.state_value.clone());
        values.push(match v {
            Some(v) if v.has_value => {
                if v.typename != s.type_name.as_str() {
                    return Err(bad(format!(
                        "state {:?} arrives as {}, declared as {}",
                        s.name, v.typename, s.type_name
                    )));
                }
                Some(v.value)
            }
            _ => None,
        });
    }
    let invocations = batch
        .invocations
        .into_iter()
        .enumerate()
        .map(|(i, inv)| {
            let at = |e: ConversionError| bad(format!("invocations[{i}]: {e}"));
            Ok(Invocation {
                caller: inv.caller.as_ref().map(Address::try_from).transpose().map_err(at)?,
                message: value(inv.argument, "argument").map_err(at)?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut ctx = Context::new(target, Arc::clone(specs), values);
    function
        .function()
        .invoke_batch(&mut ctx, &invocations)
        .await
        .map_err(ServeError::Function)?;
    Ok(invocation_response(specs, ctx.into_effects()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FunctionSpec, ValueSpec};
    use crate::value::ValueType;
    use bytes::Bytes;

    #[test]
    fn addresses_and_values_round_trip_through_the_protocol_types() {
        let a = Address::new(TypeName::parse("example/greeter").unwrap(), "alice").unwrap();
        let p = reqreply::Address::from(&a);
        assert_eq!(
            (p.namespace.as_str(), p.r#type.as_str(), p.id.as_str()),
            ("example", "greeter", "alice")
        );
        assert_eq!(Address::try_from(&p).unwrap(), a);
        let empty_id = reqreply::Address { id: String::new(), ..p };
        assert!(matches!(
            Address::try_from(&empty_id),
            Err(ConversionError::Address { .. })
        ));

        let v = TypedValue::from_bytes(
            TypeName::parse("io.statefun.types/int").unwrap(),
            vec![0x0d, 1, 0, 0, 0],
        );
        assert_eq!(TypedValue::try_from(reqreply::TypedValue::from(&v)).unwrap(), v);
        // has_value tells an empty value from none.
        let empty = TypedValue::from_bytes(TypeName::parse("example/empty").unwrap(), Vec::new());
        let wire = reqreply::TypedValue::from(&empty);
        assert!(wire.has_value);
        assert_eq!(TypedValue::try_from(wire).unwrap().bytes().map(|b| b.len()), Some(0));
        let none = TypedValue::absent(TypeName::parse("example/empty").unwrap());
        assert_eq!(
            TypedValue::try_from(reqreply::TypedValue::from(&none)).unwrap().bytes(),
            None
        );
        let bad = reqreply::TypedValue {
            typename: "no-slash".into(),
            ..Default::default()
        };
        assert_eq!(
            TypedValue::try_from(bad),
            Err(ConversionError::TypeName("no-slash".into()))
        );
    }

    const F: TypeName = TypeName::from_static("example/f");
    const N: ValueSpec<i64> = ValueSpec::named("n").expire_after_call(Duration::from_secs(60));

    fn ctx() -> Context {
        let specs: Arc<[StateSpec]> = vec![N.to_state_spec()].into();
        Context::new(Address::new(F, "a").unwrap(), specs, vec![])
    }

    fn result(r: from_function::InvocationResponse) -> FromFunction {
        FromFunction {
            response: Some(from_function::Response::InvocationResult(r)),
        }
    }

    #[test]
    fn specs_round_trip_with_their_expiry_and_bad_specs_are_errors() {
        for spec in [
            N.to_state_spec(),
            StateSpec::new(
                "w",
                crate::value::builtin::STRING,
                Expiration::AfterWrite(Duration::from_millis(5)),
            )
            .unwrap(),
            StateSpec::new("x", crate::value::builtin::BOOL, Expiration::None).unwrap(),
        ] {
            assert_eq!(state_spec(&value_spec(&spec)).unwrap(), spec);
        }
        let mut bad = value_spec(&N.to_state_spec());
        bad.expiration_spec.as_mut().unwrap().expire_after_millis = -1;
        assert!(matches!(state_spec(&bad), Err(ConversionError::Invalid { .. })));
        bad.type_typename = "nope".into();
        bad.expiration_spec = None;
        assert_eq!(state_spec(&bad), Err(ConversionError::TypeName("nope".into())));
    }

    #[test]
    fn malformed_answers_are_errors_naming_the_field_and_leave_no_effects() {
        let cases = [
            (
                from_function::InvocationResponse {
                    outgoing_messages: vec![from_function::Invocation {
                        target: None,
                        argument: None,
                    }],
                    ..Default::default()
                },
                "outgoing_messages[0]: target is missing",
            ),
            (
                from_function::InvocationResponse {
                    state_mutations: vec![from_function::PersistedValueMutation {
                        mutation_type: MutationType::Modify as i32,
                        state_name: "unknown".into(),
                        state_value: Some(statefun_protocol::typed_value("io.statefun.types/long", Bytes::new())),
                    }],
                    ..Default::default()
                },
                "state_mutations[0]: state \"unknown\" is not declared",
            ),
            (
                from_function::InvocationResponse {
                    state_mutations: vec![from_function::PersistedValueMutation {
                        mutation_type: MutationType::Modify as i32,
                        state_name: "n".into(),
                        state_value: Some(statefun_protocol::typed_value("io.statefun.types/string", Bytes::new())),
                    }],
                    ..Default::default()
                },
                "state_mutations[0]: state \"n\" is declared as io.statefun.types/long, accessed as io.statefun.types/string",
            ),
            (
                from_function::InvocationResponse {
                    state_mutations: vec![from_function::PersistedValueMutation {
                        mutation_type: 7,
                        state_name: "n".into(),
                        state_value: None,
                    }],
                    ..Default::default()
                },
                "state_mutations[0]: unknown mutation type 7",
            ),
        ];
        for (response, expected) in cases {
            let mut c = ctx();
            let e = apply_response(&mut c, result(response)).unwrap_err();
            assert!(e.to_string().contains(expected), "{e} should contain {expected}");
        }
    }

    #[test]
    fn an_answer_applied_to_a_context_gives_the_effects_the_function_produced() {
        // The function side: effects to an answer; the caller side: the answer back to
        // effects. Both halves agree.
        let mut produced = ctx();
        produced.storage().set(&N, &41).unwrap();
        let me = produced.self_address().clone();
        produced.send(me.clone(), &"hi".to_string()).unwrap();
        produced
            .send_after_with_token(Duration::from_millis(1500), me.clone(), &1i32, "t")
            .unwrap();
        produced.cancel_delayed("t");
        produced
            .send_egress(TypeName::from_static("example/out"), &true)
            .unwrap();
        let effects = produced.into_effects();
        let answer = invocation_response(&[N.to_state_spec()], effects.clone());
        let mut applied = ctx();
        apply_response(&mut applied, answer).unwrap();
        assert_eq!(applied.into_effects(), effects);
    }

    #[test]
    fn a_request_without_the_declared_state_gets_the_missing_specs_then_runs_the_batch() {
        let module = Module::builder()
            .with_fn(FunctionSpec::new(F).with_state(N), |ctx, msg| {
                let n = ctx.storage().get(&N)?.unwrap_or(0) + msg.decode::<i64>()?;
                ctx.storage().set(&N, &n)?;
                Ok(())
            })
            .build()
            .unwrap();
        let invocation = [Invocation {
            caller: None,
            message: TypedValue::of(&2i64).unwrap(),
        }];
        let block = |r| futures_executor::block_on(serve_request(&module, r));
        let missing = block(batch_request(
            &Context::new(Address::new(F, "a").unwrap(), Arc::from(vec![]), vec![]),
            &invocation,
        ))
        .unwrap();
        let mut c = Context::new(Address::new(F, "a").unwrap(), Arc::from(vec![]), vec![]);
        let Err(BatchError::MissingStates(specs)) = apply_response(&mut c, missing) else {
            panic!("expected the missing states");
        };
        assert_eq!(specs, vec![N.to_state_spec()]);
        // Registered, with a value: the batch runs on it.
        let specs: Arc<[StateSpec]> = specs.into();
        let mut c = Context::new(
            Address::new(F, "a").unwrap(),
            specs,
            vec![Some(40i64.encode().unwrap())],
        );
        let answer = block(batch_request(&c, &[invocation[0].clone(), invocation[0].clone()])).unwrap();
        apply_response(&mut c, answer).unwrap();
        assert_eq!(c.storage().get(&N).unwrap(), Some(44));
        // Unknown function types and bad requests are errors.
        let other = Context::new(
            Address::new(TypeName::from_static("example/other"), "a").unwrap(),
            Arc::from(vec![]),
            vec![],
        );
        assert!(matches!(
            block(batch_request(&other, &invocation)),
            Err(ServeError::UnknownFunction(_))
        ));
        assert!(matches!(
            block(ToFunction { request: None }),
            Err(ServeError::BadRequest(_))
        ));
    }
}
