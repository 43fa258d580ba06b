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
    let backend = cx.effects.admission;
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

#[cfg(test)]
mod tests {
    use statefun_sdk::{Context, FunctionSpec, Module, TypeName, TypedValue, ValueSpec};

    use super::*;
    use crate::partition::functions::FunctionTable;
    use crate::partitioner::PartitionId;
    use crate::state::{Admission, MemoryBackend};

    const CART: TypeName = TypeName::from_static("test/cart");
    const OUT: TypeName = TypeName::from_static("test/out");
    const ITEMS: ValueSpec<i64> = ValueSpec::named("items");
    const NOTE: ValueSpec<String> = ValueSpec::named("note");

    fn table() -> FunctionTable {
        let module = Module::builder()
            .with_fn(
                FunctionSpec::new(CART).with_state(ITEMS).with_state(NOTE),
                |_, _| Ok(()),
            )
            .build()
            .unwrap();
        FunctionTable::new(&module)
    }

    fn address(id: &str) -> Address {
        Address::new(CART, id).unwrap()
    }

    fn envelope(target: Address, inbox: Option<LogKey>) -> Envelope {
        Envelope {
            target,
            caller: None,
            message: TypedValue::of(&1i64).unwrap(),
            inbox,
            position: None,
            also: Vec::new(),
        }
    }

    /// Runs `f` against a fresh context of `a` and returns what it produced.
    fn done(table: &FunctionTable, a: &Address, f: impl FnOnce(&mut Context)) -> Done {
        let states = Arc::clone(&table.get(&CART).unwrap().states);
        let mut ctx = Context::new(a.clone(), Arc::clone(&states), vec![None; states.len()]);
        f(&mut ctx);
        Done {
            effects: ctx.into_effects(),
            touched: Vec::new(),
            expired: Vec::new(),
            notify: false,
        }
    }

    /// Plans `done` for `a`'s `batch` on partition 0 (every other address on partition
    /// 1), with `log` as the durable log and `old_timer` as the key of a pending timer,
    /// against a backend that admits everything.
    fn plan_of(
        table: &FunctionTable,
        log: Option<&mut DurableLog>,
        old_timer: Option<LogKey>,
        a: &Address,
        batch: &[Envelope],
        done: Done,
    ) -> Result<Plan, Failure> {
        plan_with(&MemoryBackend::new(), table, log, old_timer, a, batch, done)
    }

    /// [`plan_of`] against `admission`.
    fn plan_with(
        admission: &dyn Admission,
        table: &FunctionTable,
        log: Option<&mut DurableLog>,
        old_timer: Option<LogKey>,
        a: &Address,
        batch: &[Envelope],
        done: Done,
    ) -> Result<Plan, Failure> {
        let me = a.clone();
        let partition_of = move |x: &Address| if *x == me { PartitionId(0) } else { PartitionId(1) };
        let timer_key = move |_: &Address, _: &str| old_timer;
        let mut cx = PlanContext {
            function: table.get(&CART).unwrap(),
            effects: EffectsContext {
                now_ms: &|| 1_000,
                partition_of: &partition_of,
                timer_key: &timer_key,
                admission,
                has_sink: &|e| *e == OUT,
                run_id: 7,
            },
            log,
        };
        plan(&mut cx, a, batch, done)
    }

    /// Admits values of at most 4 bytes, and no record of egress `OUT`.
    struct Small;

    impl Admission for Small {
        fn check_value(&self, _name: &str, value: &[u8]) -> Result<(), String> {
            match value.len() {
                0..=4 => Ok(()),
                n => Err(format!("{n} bytes, at most 4")),
            }
        }

        fn takes_egress(&self, _egress: &TypeName) -> bool {
            true
        }

        fn check_egress(&self, egress: &TypeName, _message: &TypedValue) -> Result<(), String> {
            if *egress == OUT {
                Err("no topic for it".into())
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn a_value_the_backend_refuses_fails_the_batch_naming_the_state() {
        let table = table();
        let a = address("a");
        let mut log = DurableLog::new(PartitionId(0), 0);
        let done = done(&table, &a, |ctx| {
            ctx.storage().set(&NOTE, &"far too long".to_string()).unwrap()
        });
        let failure = plan_with(&Small, &table, Some(&mut log), None, &a, &[], done).unwrap_err();
        assert_eq!(failure.index, 0);
        assert!(
            failure.kind.to_string().starts_with("state \"note\": ") && failure.kind.to_string().ends_with("at most 4"),
            "{}",
            failure.kind
        );
    }

    #[test]
    fn a_record_the_backend_refuses_is_dead_lettered_after_the_write_not_committed() {
        let table = table();
        let a = address("a");
        let mut log = DurableLog::new(PartitionId(0), 0);
        let done = done(&table, &a, |ctx| ctx.send_egress(OUT, &1i64).unwrap());
        let plan = plan_with(&Small, &table, Some(&mut log), None, &a, &[], done).unwrap();
        assert!(plan.write.egress.is_empty(), "the refused record is not committed");
        match &plan.actions[..] {
            [
                Action::DeadLetter {
                    letter,
                    committed: false,
                },
            ] => {
                assert_eq!(letter.caller.as_ref(), Some(&a));
                assert!(
                    letter.reason.to_string().contains("no topic for it"),
                    "{}",
                    letter.reason
                );
            }
            other => panic!("unexpected actions {other:?}"),
        }
    }

    #[test]
    fn a_volatile_plan_writes_only_state_and_acts_in_effect_order() {
        let table = table();
        let a = address("a");
        let done = done(&table, &a, |ctx| {
            ctx.storage().set(&ITEMS, &3).unwrap();
            ctx.send(address("b"), &1i64).unwrap();
            ctx.send_after_with_token(Duration::from_secs(1), a.clone(), &2i64, "t")
                .unwrap();
            ctx.send_egress(OUT, &"x".to_string()).unwrap();
        });
        let plan = plan_of(&table, None, None, &a, &[envelope(a.clone(), None)], done).unwrap();
        assert_eq!(plan.write.ops.len(), 1);
        assert_eq!(&*plan.write.ops[0].name, "items");
        assert_eq!(plan.write.ops[0].value.as_ref().unwrap().expires_at_ms, None);
        assert!(plan.write.log.is_empty(), "no log entries without a durable log");
        let kinds: Vec<&str> = plan
            .actions
            .iter()
            .map(|action| match action {
                Action::Route(env) if env.inbox.is_none() && env.caller.as_ref() == Some(&a) => "route",
                Action::Schedule { key: None, token, .. } if token.as_deref() == Some("t") => "schedule",
                Action::HandOver { key: None, record } if record.egress == OUT => "hand over",
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["route", "schedule", "hand over"]);
    }

    #[test]
    fn a_durable_plan_commits_every_effect_in_its_write_and_keys_its_actions() {
        let table = table();
        let a = address("a");
        let processed = LogKey::Inbox {
            sender: PartitionId(3),
            seq: 9,
        };
        let mut log = DurableLog::new(PartitionId(0), 0);
        let done = done(&table, &a, |ctx| {
            ctx.send(address("b"), &1i64).unwrap();
            ctx.send_after_with_token(Duration::from_millis(500), a.clone(), &2i64, "t")
                .unwrap();
            ctx.send_egress(OUT, &"x".to_string()).unwrap();
        });
        let batch = [envelope(a.clone(), Some(processed))];
        let plan = plan_of(&table, Some(&mut log), None, &a, &batch, done).unwrap();
        let log_ops: Vec<(PartitionId, LogKey, bool)> = plan
            .write
            .log
            .iter()
            .map(|op| (op.partition, op.key, op.value.is_some()))
            .collect();
        assert_eq!(
            log_ops,
            [
                // The processed message leaves the inbox; the outgoing one enters its
                // receiver's; the timer and the egress record enter this partition's logs.
                (PartitionId(0), processed, false),
                (
                    PartitionId(1),
                    LogKey::Inbox {
                        sender: PartitionId(0),
                        seq: 0
                    },
                    true
                ),
                (PartitionId(0), LogKey::Timer { due_ms: 1_500, seq: 1 }, true),
                (PartitionId(0), LogKey::Egress { seq: 2 }, true),
            ]
        );
        match &plan.actions[..] {
            [
                Action::Route(env),
                Action::Schedule { key: Some(timer), .. },
                Action::HandOver { key: Some(egress), .. },
            ] => {
                assert_eq!(env.inbox, Some(log_ops[1].1));
                assert_eq!(*timer, log_ops[2].1);
                assert_eq!(*egress, log_ops[3].1);
            }
            other => panic!("unexpected actions {other:?}"),
        }
    }

    #[test]
    fn tokens_replace_and_cancel_their_timer_entries_within_one_batch() {
        let table = table();
        let a = address("a");
        let pending = LogKey::Timer { due_ms: 10, seq: 77 };
        let mut log = DurableLog::new(PartitionId(0), 0);
        let done = done(&table, &a, |ctx| {
            ctx.send_after_with_token(Duration::from_secs(1), a.clone(), &2i64, "t")
                .unwrap();
            ctx.cancel_delayed("t");
        });
        let plan = plan_of(&table, Some(&mut log), Some(pending), &a, &[], done).unwrap();
        let scheduled = LogKey::Timer { due_ms: 2_000, seq: 0 };
        let log_ops: Vec<(LogKey, bool)> = plan.write.log.iter().map(|op| (op.key, op.value.is_some())).collect();
        // The pending timer of the token is replaced, and the replacement cancelled.
        assert_eq!(log_ops, [(pending, false), (scheduled, true), (scheduled, false)]);
        assert!(matches!(
            &plan.actions[..],
            [Action::Schedule { .. }, Action::Cancel { token, .. }] if token == "t"
        ));
    }

    #[test]
    fn an_expired_value_is_deleted_unless_the_batch_writes_it_again() {
        let table = table();
        let a = address("a");
        let mut done = done(&table, &a, |ctx| ctx.storage().set(&NOTE, &"new".to_string()).unwrap());
        done.expired = vec![Arc::from("items"), Arc::from("note")];
        let plan = plan_of(&table, None, None, &a, &[], done).unwrap();
        let ops: Vec<(&str, bool)> = plan
            .write
            .ops
            .iter()
            .map(|op| (&*op.name, op.value.is_some()))
            .collect();
        assert_eq!(ops, [("items", false), ("note", true)]);
    }
}
