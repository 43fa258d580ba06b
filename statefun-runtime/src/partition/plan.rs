//! The commit planner: turns one completed batch into a [`Plan`], the write batch that
//! commits everything the batch produced plus the list of what to do once that write
//! is durable (route, schedule, cancel, hand over, dead-letter), the way Restate's state
//! machine returns actions.
//!
//! Why it exists: the planner decides and the partition does. Planning reads nothing
//! of the partition but what [`PlanContext`] names, so it is tested here without a
//! runtime, and the partition applies a plan in one place: write, then act.

use std::sync::Arc;
use std::time::Duration;

use statefun_sdk::{Address, DelayedEffect, Effects, Expiration, StateSpec};

use super::durable::{DurableLog, EffectsContext, Logged};
use super::failure::{Failure, FailureKind};
use super::functions::LocalFunction;
use super::invoke::Touched;
use crate::envelope::Envelope;
use crate::records::{DeadLetter, DeadLetterReason, EgressRecord, LogKey};
use crate::state::{LogOp, StoredValue, WriteBatch, WriteOp};

/// A batch that completed: what the function produced.
pub(super) struct Done {
    pub(super) effects: Effects,
    /// `AFTER_CALL` values the batch left in place (their expiry is refreshed).
    pub(super) touched: Touched,
    /// Expired values whose notice the batch delivered: deleted unless rewritten.
    pub(super) expired: Vec<Arc<str>>,
    /// The function declares state with expiry notices.
    pub(super) notify: bool,
}

/// What planning reads.
pub(super) struct PlanContext<'a> {
    /// The batch's function (its declared and registered states).
    pub(super) function: &'a LocalFunction,
    pub(super) effects: EffectsContext<'a>,
    /// The partition's durable log, in durable mode.
    pub(super) log: Option<&'a mut DurableLog>,
}

/// What to do once the plan's write is durable, in order.
#[derive(Debug)]
pub(super) enum Action {
    /// Count a dead letter; send it to the sink unless it was `committed` in the write.
    DeadLetter { letter: DeadLetter, committed: bool },
    /// Deliver a message to a function (counted as outstanding first).
    Route(Envelope),
    /// Schedule a delayed message from `sender` (`key`: its timer-log entry).
    Schedule {
        delay: Duration,
        sender: Address,
        token: Option<String>,
        envelope: Envelope,
        key: Option<LogKey>,
    },
    /// Cancel `sender`'s delayed message under `token`.
    Cancel { sender: Address, token: String },
    /// Hand an egress record to its sink (`key`: its egress-log entry).
    HandOver { key: Option<LogKey>, record: EgressRecord },
}

/// One completed batch, planned.
#[derive(Debug)]
pub(super) struct Plan {
    /// Everything the batch changes, in one atomic write.
    pub(super) write: WriteBatch,
    /// The deferred log deletions the write took: put back if it fails.
    pub(super) deferred: Vec<LogOp>,
    /// What to do after the write, in order.
    pub(super) actions: Vec<Action>,
}

/// Plans the commit of `batch` of `address`, which completed with `done`. A value or
/// message the backend cannot store (e.g. larger than a Kafka changelog record may be)
/// fails the batch instead of every later commit; a record the backend refuses is
/// dead-lettered after the write instead of committed.
pub(super) fn plan(
    cx: &mut PlanContext<'_>,
    address: &Address,
    batch: &[Envelope],
    done: Done,
) -> Result<Plan, Failure> {
    let Done {
        effects,
        touched,
        expired,
        notify,
    } = done;
    let Effects {
        state: mutations,
        outgoing,
        mut delayed,
        mut egress,
    } = effects;
    if notify {
        expiry_notices(&cx.function.states, address, &mutations, &touched, &mut delayed);
    }
    let backend = cx.effects.backend;
    let durable = cx.log.is_some();
    if durable {
        let check = |what: &dyn Fn() -> String, name: &str, bytes: Option<&bytes::Bytes>| {
            let bytes = bytes.map_or(&[][..], |b| &b[..]);
            backend
                .check_value(name, bytes)
                .err()
                .map(|error| FailureKind::Refused { what: what(), error })
        };
        let refused = mutations
            .iter()
            .find_map(|m| check(&|| format!("state {:?}", m.name), &m.name, m.value.as_ref()))
            .or_else(|| {
                outgoing
                    .iter()
                    .find_map(|o| check(&|| format!("message to {}", o.target), "", o.message.bytes()))
            })
            .or_else(|| {
                delayed.iter().find_map(|d| match d {
                    DelayedEffect::Send { target, message, .. } => {
                        check(&|| format!("delayed message to {target}"), "", message.bytes())
                    }
                    DelayedEffect::Cancel { .. } => None,
                })
            });
        if let Some(kind) = refused {
            return Err(Failure::of_batch(kind));
        }
    }
    // Records a committing backend would refuse (e.g. a Kafka record naming a topic
    // that is not configured) are dead-lettered after the write, not committed.
    let mut refused = Vec::new();
    if durable {
        egress.retain(|e| match backend.check_egress(&e.egress, &e.message) {
            Ok(()) => true,
            Err(error) => {
                refused.push(DeadLetter {
                    reason: DeadLetterReason::EgressFailed {
                        egress: e.egress.clone(),
                        error,
                    },
                    target: None,
                    caller: Some(address.clone()),
                    message: Some(e.message.clone()),
                    record: None,
                });
                false
            }
        });
    }
    let mut wb = WriteBatch::default();
    // 1. State. Values whose expiry notice was delivered are deleted now.
    for name in expired {
        if !mutations.iter().any(|m| m.name == name) {
            wb.ops.push(WriteOp {
                address: address.clone(),
                name,
                value: None,
            });
        }
    }
    if !mutations.is_empty() || !touched.is_empty() {
        let f = cx.function;
        let now = if f.has_expiry { (cx.effects.now_ms)() } else { 0 };
        let spec = |name: &str| f.states.iter().find(|s| &*s.name == name);
        wb.ops.reserve(mutations.len() + touched.len());
        for (name, value) in touched {
            if !mutations.iter().any(|m| m.name == name) {
                let expires_at_ms = expiry(spec(&name), now);
                wb.ops.push(WriteOp {
                    address: address.clone(),
                    name,
                    value: Some(StoredValue { value, expires_at_ms }),
                });
            }
        }
        for m in mutations {
            let expires_at_ms = expiry(spec(&m.name), now);
            wb.ops.push(WriteOp {
                address: address.clone(),
                name: m.name,
                value: m.value.map(|value| StoredValue { value, expires_at_ms }),
            });
        }
    }
    let mut out: Vec<Envelope> = outgoing
        .into_iter()
        .map(|o| Envelope {
            target: o.target,
            caller: Some(address.clone()),
            message: o.message,
            inbox: None,
            position: None,
            also: Vec::new(),
        })
        .collect();
    // Refused records' dead letters commit with this write when the backend takes
    // dead letters (a failed write retries the batch, which refuses them again).
    let mut letters_committed = false;
    let Logged {
        deferred,
        timer_keys,
        egress_keys,
    } = match cx.log.as_deref_mut() {
        Some(log) => {
            if !refused.is_empty() {
                let ops: Vec<LogOp> = refused
                    .iter()
                    .filter_map(|l| log.dead_letter_op(backend, l, cx.effects.run_id))
                    .collect();
                letters_committed = ops.len() == refused.len();
                if letters_committed {
                    wb.log.extend(ops);
                }
            }
            log.log_effects(&cx.effects, address, batch, &mut out, &delayed, &egress, &mut wb)
        }
        None => Logged::default(),
    };
    let mut actions = Vec::with_capacity(refused.len() + out.len() + delayed.len() + egress.len());
    actions.extend(refused.into_iter().map(|letter| Action::DeadLetter {
        letter,
        committed: letters_committed,
    }));
    // 2. Messages to functions.
    actions.extend(out.into_iter().map(Action::Route));
    // 3. Delayed messages and cancellations, in order.
    let mut timer_keys = timer_keys.into_iter();
    for d in delayed {
        actions.push(match d {
            DelayedEffect::Send {
                delay,
                target,
                message,
                token,
            } => Action::Schedule {
                delay,
                sender: address.clone(),
                token,
                envelope: Envelope {
                    target,
                    caller: Some(address.clone()),
                    message,
                    inbox: None,
                    position: None,
                    also: Vec::new(),
                },
                key: timer_keys.next().flatten(),
            },
            DelayedEffect::Cancel { token } => Action::Cancel {
                sender: address.clone(),
                token,
            },
        });
    }
    // 4. Egress.
    let mut egress_keys = egress_keys.into_iter();
    for e in egress {
        let key = egress_keys.next().flatten();
        if durable && backend.takes_egress(&e.egress) {
            continue; // committed by the backend with this batch's write
        }
        actions.push(Action::HandOver {
            key,
            record: EgressRecord {
                egress: e.egress,
                source: address.clone(),
                message: e.message,
                id: None,
            },
        });
    }
    Ok(Plan {
        write: wb,
        deferred,
        actions,
    })
}

/// When a value written now expires under `spec`.
fn expiry(spec: Option<&StateSpec>, now_ms: u64) -> Option<u64> {
    match spec.map(|s| s.expiration) {
        Some(Expiration::AfterWrite(d)) | Some(Expiration::AfterCall(d)) => {
            Some(now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
        }
        _ => None,
    }
}

/// Expiry notices (see `statefun_sdk::expiry`): a delayed message to self per written or
/// refreshed value whose spec asks for one, due when the value expires, under the
/// value's reserved token (so it replaces the previous notice); a delete cancels it.
/// Appended after the function's own delayed effects.
fn expiry_notices(
    states: &[StateSpec],
    address: &Address,
    mutations: &[statefun_sdk::StateMutation],
    touched: &[(Arc<str>, bytes::Bytes)],
    delayed: &mut Vec<DelayedEffect>,
) {
    for spec in states.iter().filter(|s| s.notify_on_expire) {
        let ttl = match spec.expiration {
            Expiration::AfterWrite(d) | Expiration::AfterCall(d) => d,
            Expiration::None => continue,
        };
        let value = match mutations.iter().find(|m| m.name == spec.name) {
            Some(m) => m.value.as_ref(),
            None => match touched.iter().find(|(name, _)| *name == spec.name) {
                Some((_, v)) => Some(v),
                None => continue,
            },
        };
        let token = statefun_sdk::expiry_token(&spec.name);
        match value {
            None => delayed.push(DelayedEffect::Cancel { token }),
            Some(v) => delayed.push(DelayedEffect::Send {
                delay: ttl,
                target: address.clone(),
                message: statefun_sdk::Expired::message(spec, v.clone()),
                token: Some(token),
            }),
        }
    }
}
