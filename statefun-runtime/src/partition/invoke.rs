//! Invocation: one batch of messages for one address, run against a context loaded
//! with the address's state, to a [`Completion`] (the effects, or why it failed, or the
//! states a remote function asked for).
//!
//! Why it exists: the invocation is the only await on the per-message path; it owns
//! nothing of the partition, so the partition applies what it returns in one place.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use statefun_sdk::{
    Address, BatchError, Context, Effects, Expiration, Invocation, StateSpec, StatefulFunction, TypedValue,
};

use super::failure::{Failure, FailureKind};
use crate::envelope::Envelope;

/// Values of `AFTER_CALL` specs the batch left in place; their expiry is refreshed.
pub(super) type Touched = Vec<(Arc<str>, Bytes)>;

pub(super) struct Completion {
    pub(super) address: Address,
    pub(super) batch: Vec<Envelope>,
    /// Expired values whose notice this batch delivered: deleted in its commit unless
    /// the function wrote them again.
    pub(super) expired: Vec<Arc<str>>,
    /// The function declares state with expiry notices.
    pub(super) notify: bool,
    pub(super) outcome: Outcome,
}

pub(super) enum Outcome {
    Done(Effects, Touched),
    Failed(Failure),
    /// The function asked for states its type had not registered (the handshake) when
    /// the batch started with the first `carried` registered states.
    MissingStates {
        specs: Vec<StateSpec>,
        carried: usize,
    },
}

/// Invokes the function with one message, turning an error or a panic into a failure.
async fn invoke_one(
    function: &Arc<dyn StatefulFunction>,
    ctx: &mut Context,
    message: TypedValue,
) -> Result<(), FailureKind> {
    match AssertUnwindSafe(function.invoke(ctx, message)).catch_unwind().await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(FailureKind::Function(statefun_sdk::error_chain(&*e))),
        Err(p) => Err(FailureKind::Panic(statefun_sdk::panic_message(&*p))),
    }
}

/// What a batch needs to know of its function's state declarations.
#[derive(Debug, Clone, Copy)]
pub(super) struct FunctionFlags {
    /// Some state expires after call: refresh it after the batch.
    pub(super) after_call: bool,
    /// Some state asks for expiry notices.
    pub(super) notify: bool,
}

/// True for the timer message that triggers an expiry check (see `Partition::start`).
pub(super) fn is_expiry_trigger(address: &Address, env: &Envelope) -> bool {
    statefun_sdk::Expired::is_notice(&env.message) && env.caller.as_ref() == Some(address)
}

/// The batch's messages through the function's batch hook (see `invoke_batch`).
async fn through_hook(
    function: &Arc<dyn StatefulFunction>,
    ctx: &mut Context,
    address: &Address,
    batch: &[Envelope],
    flags: FunctionFlags,
) -> Option<Outcome> {
    // Batch index of each invocation, kept only when triggers are left out.
    let mut indices = Vec::new();
    let mut invocations = Vec::with_capacity(batch.len());
    for (index, env) in batch.iter().enumerate() {
        if flags.notify && is_expiry_trigger(address, env) {
            continue;
        }
        if flags.notify {
            indices.push(index);
        }
        invocations.push(Invocation {
            caller: env.caller.clone(),
            message: env.message.clone(),
        });
    }
    if !invocations.is_empty() {
        let batch_index = |i: usize| if flags.notify { indices[i] } else { i };
        return match AssertUnwindSafe(function.invoke_batch(ctx, &invocations))
            .catch_unwind()
            .await
        {
            Ok(Ok(())) => None,
            Ok(Err(BatchError::Failed { index, error })) => Some(Outcome::Failed(Failure {
                index: batch_index(index.min(invocations.len() - 1)),
                kind: FailureKind::Function(statefun_sdk::error_chain(&*error)),
            })),
            Ok(Err(BatchError::MissingStates(specs))) => Some(Outcome::MissingStates {
                specs,
                carried: ctx.storage_ref().specs().len(),
            }),
            Ok(Err(e)) => Some(Outcome::Failed(Failure::of_batch(FailureKind::Function(
                statefun_sdk::error_chain(&e),
            )))),
            Err(p) => Some(Outcome::Failed(Failure::of_batch(FailureKind::Panic(
                statefun_sdk::panic_message(&*p),
            )))),
        };
    }
    None
}

/// Runs one batch of messages for one address against one context: first the expiry
/// notices `start` found due, one by one, then the batch's messages through the
/// function's batch hook, or one by one for a function that does not take batches
/// (expiry triggers left out; only a function with `notify_on_expire` state has them).
pub(super) async fn invoke_batch(
    function: Arc<Arc<dyn StatefulFunction>>,
    mut ctx: Context,
    address: Address,
    batch: Vec<Envelope>,
    notices: Vec<(Arc<str>, TypedValue)>,
    flags: FunctionFlags,
) -> Completion {
    let mut expired = Vec::with_capacity(notices.len());
    let mut outcome = None;
    for (name, notice) in notices {
        expired.push(name);
        ctx.set_caller(Some(address.clone()));
        if let Err(kind) = invoke_one(&function, &mut ctx, notice).await {
            // A failing notice fails the batch from its start; notices are found again
            // when it is retried.
            outcome = Some(Outcome::Failed(Failure::of_batch(kind)));
            break;
        }
    }
    if outcome.is_none() && !function.takes_batches() {
        // The function keeps the default batch hook: the same, one message at a time,
        // without building the batch (`StatefulFunction::takes_batches`).
        for (index, env) in batch.iter().enumerate() {
            if flags.notify && is_expiry_trigger(&address, env) {
                continue;
            }
            ctx.set_caller(env.caller.clone());
            if let Err(kind) = invoke_one(&function, &mut ctx, env.message.clone()).await {
                outcome = Some(Outcome::Failed(Failure { index, kind }));
                break;
            }
        }
    } else if outcome.is_none() {
        // In its own boxed future: this path's state (the batch, the hook's future)
        // would otherwise enlarge every invocation's future, the one-by-one path's too.
        outcome = through_hook(&function, &mut ctx, &address, &batch, flags).boxed().await;
    }
    if let Some(outcome) = outcome {
        return Completion {
            address,
            batch,
            expired: Vec::new(),
            notify: flags.notify,
            outcome,
        };
    }
    // AFTER_CALL values are refreshed by every invocation, written or not.
    let touched = if flags.after_call {
        let storage = ctx.storage_ref();
        storage
            .specs()
            .iter()
            .filter(|s| matches!(s.expiration, Expiration::AfterCall(_)))
            .filter_map(|s| storage.get_raw(&s.name).map(|b| (s.name.clone(), b.clone())))
            .collect()
    } else {
        Vec::new()
    };
    Completion {
        address,
        batch,
        expired,
        notify: flags.notify,
        outcome: Outcome::Done(ctx.into_effects(), touched),
    }
}
