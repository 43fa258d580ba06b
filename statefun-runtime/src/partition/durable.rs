//! The durable log of one partition (durable mode only): recovery, the progress of
//! accepted ingress, deferred log deletions, and the log entries of a batch's effects.
//!
//! Why it exists: in durable mode (see `docs/architecture.md`, "Exactly-once across
//! crashes") every accepted message, pending timer and produced egress record is in the
//! store's logs, written in the same batch as the state changes that produced it. The
//! partition holds one `DurableLog` when its backend is durable and none otherwise, so
//! the volatile path never tests a flag for it.

use std::collections::HashMap;
use std::sync::Arc;

use statefun_sdk::{Address, DelayedEffect, EgressMessage, TypeName, TypedValue};

use crate::envelope::Envelope;
use crate::partitioner::PartitionId;
use crate::records::{DEAD_LETTERS, DeadLetter, DeadLetterRecord, EgressId, EgressRecord, LogKey};
use crate::state::entries::{self, StoredTimer};
use crate::state::{self, Admission, LogKind, LogOp, PartitionStore, WriteBatch};

/// What [`DurableLog::recover`] read back.
#[derive(Default)]
pub(super) struct Recovered {
    pub(super) messages: Vec<Envelope>,
    pub(super) timers: Vec<(LogKey, StoredTimer)>,
    pub(super) egress: Vec<(LogKey, EgressRecord)>,
}

/// What [`DurableLog::log_effects`] put in a commit's batch, for after the write.
#[derive(Default)]
pub(super) struct Logged {
    /// The deferred deletions it took: put back if the write fails.
    pub(super) deferred: Vec<LogOp>,
    /// Durable key of each delayed send, in order.
    pub(super) timer_keys: Vec<Option<LogKey>>,
    /// Durable key of each egress record, in order (`None` for an unknown egress).
    pub(super) egress_keys: Vec<Option<LogKey>>,
}

/// What a batch's effect logging needs to know of the partition.
pub(super) struct EffectsContext<'a> {
    pub(super) now_ms: &'a dyn Fn() -> u64,
    pub(super) partition_of: &'a dyn Fn(&Address) -> PartitionId,
    /// The durable key of the pending timer of a sender's token.
    pub(super) timer_key: &'a dyn Fn(&Address, &str) -> Option<LogKey>,
    /// What the backend admits.
    pub(super) admission: &'a dyn Admission,
    /// Whether an egress has a sink.
    pub(super) has_sink: &'a dyn Fn(&TypeName) -> bool,
    pub(super) run_id: u64,
}

/// The durable log of one partition.
pub(super) struct DurableLog {
    partition: PartitionId,
    /// Next log sequence number: `incarnation << 40 | counter`, so entries written after
    /// a restart sort after (and never collide with) older ones.
    seq: u64,
    /// Progress stored per ingress source (loaded on first use).
    pub(super) progress: HashMap<Arc<str>, Option<u64>, ahash::RandomState>,
    /// Ingress messages taken this loop turn, written to the inbox together before they
    /// are dispatched.
    pub(super) accepting: Vec<Envelope>,
    /// Log deletions that may wait for the next write: handed-over egress records,
    /// dead-lettered inbox messages.
    pub(super) deferred: Vec<LogOp>,
}

impl DurableLog {
    pub(super) fn new(partition: PartitionId, incarnation: u64) -> DurableLog {
        DurableLog {
            partition,
            seq: incarnation << 40,
            progress: HashMap::default(),
            accepting: Vec::new(),
            deferred: Vec::new(),
        }
    }

    pub(super) fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq += 1;
        s
    }

    /// Reads what the store holds from before a restart: unprocessed inbox messages,
    /// pending timers, egress records not yet handed over. A log entry that does not
    /// decode is an error: the runtime refuses to start rather than drop it.
    pub(super) fn recover(&self, store: &dyn PartitionStore) -> Result<Recovered, state::Error> {
        let id = self.partition;
        let corrupt = |what: &str, key: &LogKey, e: String| {
            state::Error::Permanent(format!(
                "partition {id}: {what} {key:?} does not decode ({e}); restore a checkpoint \
                 (see docs/operations.md)"
            ))
        };
        let mut r = Recovered::default();
        for (key, bytes) in store.log(LogKind::Inbox)? {
            let mut env = entries::decode_envelope(&bytes).map_err(|e| corrupt("inbox message", &key, e))?;
            env.inbox = Some(key);
            r.messages.push(env);
        }
        for (key, bytes) in store.log(LogKind::Timers)? {
            let t = entries::decode_timer(&bytes).map_err(|e| corrupt("timer", &key, e))?;
            r.timers.push((key, t));
        }
        for (key, bytes) in store.log(LogKind::Egress)? {
            let (mut rec, run) = entries::decode_egress(&bytes).map_err(|e| corrupt("egress record", &key, e))?;
            if let LogKey::Egress { seq } = key {
                rec.id = Some(EgressId {
                    run,
                    partition: id,
                    seq,
                });
            }
            r.egress.push((key, rec));
        }
        if !r.messages.is_empty() || !r.timers.is_empty() || !r.egress.is_empty() {
            tracing::info!(
                partition = %id,
                messages = r.messages.len(),
                timers = r.timers.len(),
                egress = r.egress.len(),
                "recovered from the durable logs"
            );
        }
        Ok(r)
    }

    /// The stored progress through `source`, read from the store on first use.
    pub(super) fn stored_progress(
        &mut self,
        store: &dyn PartitionStore,
        source: &Arc<str>,
    ) -> Result<Option<u64>, state::Error> {
        if let Some(p) = self.progress.get(source) {
            return Ok(*p);
        }
        let p = store.progress(source)?;
        self.progress.insert(Arc::clone(source), p);
        Ok(p)
    }

    /// Writes the deferred log deletions now (when the partition is about to wait).
    pub(super) fn flush_deferred(&mut self, store: &mut dyn PartitionStore) {
        if self.deferred.is_empty() {
            return;
        }
        let wb = WriteBatch {
            log: std::mem::take(&mut self.deferred),
            ..Default::default()
        };
        let log = wb.log.clone();
        if let Err(e) = store.write(wb) {
            tracing::warn!(partition = %self.partition, error = %e, "cannot write log deletions; will retry");
            self.deferred = log;
        }
    }

    /// The log entry that commits `letter` with the partition's next write, when the
    /// backend takes dead letters ([`DEAD_LETTERS`]); `None` when it goes to the sink.
    pub(super) fn dead_letter_op(
        &mut self,
        backend: &dyn Admission,
        letter: &DeadLetter,
        run_id: u64,
    ) -> Option<LogOp> {
        if !backend.takes_egress(&DEAD_LETTERS) {
            return None;
        }
        let source = letter.target.as_ref().or(letter.caller.as_ref())?.clone();
        let mut record = DeadLetterRecord::of(letter);
        let mut message = TypedValue::of(&record).ok()?;
        let fits = |m: &TypedValue| {
            let bytes = m.bytes().map_or(&[][..], |b| &b[..]);
            backend.check_value("dead letter", bytes).is_ok()
        };
        if !fits(&message) {
            // Too large to commit (the message that made it a dead letter may be the
            // reason): keep the reason and the type, drop the payload.
            let dropped = record.message.take().map_or(0, |m| m.len());
            record.reason = format!("{} (payload of {dropped} bytes dropped: too large)", record.reason);
            message = TypedValue::of(&record).ok()?;
            if !fits(&message) {
                return None;
            }
        }
        let key = LogKey::Egress { seq: self.next_seq() };
        let value = entries::encode_egress(&DEAD_LETTERS, &source, &message, run_id);
        Some(LogOp::put(self.partition, key, value))
    }

    /// Adds to `wb` the log entries of a completed batch (inbox deletes of the processed
    /// messages, inbox puts of the outgoing ones, timers, egress records and the
    /// deferred deletions). Returns the keys it gave the timers and egress records, and
    /// the deferred deletions it took (to put back if the write fails).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn log_effects(
        &mut self,
        cx: &EffectsContext<'_>,
        address: &Address,
        batch: &[Envelope],
        out: &mut [Envelope],
        delayed: &[DelayedEffect],
        egress: &[EgressMessage],
        wb: &mut WriteBatch,
    ) -> Logged {
        let id = self.partition;
        let mut logged = Logged::default();
        for env in batch {
            if let Some(key) = env.inbox {
                wb.log.push(LogOp::delete(id, key));
            }
        }
        for env in out.iter_mut() {
            let receiver = (cx.partition_of)(&env.target);
            let key = LogKey::Inbox {
                sender: id,
                seq: self.next_seq(),
            };
            wb.log.push(LogOp::put(receiver, key, entries::encode_envelope(env)));
            env.inbox = Some(key);
        }
        if !delayed.is_empty() {
            let now_ms = (cx.now_ms)();
            // Tokens scheduled or cancelled earlier in this same batch.
            let mut overlay: Vec<(&str, Option<LogKey>)> = Vec::new();
            let mut keys = Vec::with_capacity(delayed.len());
            for d in delayed {
                let token = match d {
                    DelayedEffect::Send { token, .. } => token.as_deref(),
                    DelayedEffect::Cancel { token } => Some(token.as_str()),
                };
                if let Some(t) = token {
                    let old = match overlay.iter().rev().find(|(o, _)| *o == t) {
                        Some((_, k)) => *k,
                        None => (cx.timer_key)(address, t),
                    };
                    if let Some(k) = old {
                        wb.log.push(LogOp::delete(id, k));
                    }
                }
                match d {
                    DelayedEffect::Send {
                        delay,
                        target,
                        message,
                        token,
                    } => {
                        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                        let key = LogKey::Timer {
                            due_ms: now_ms.saturating_add(delay_ms),
                            seq: self.next_seq(),
                        };
                        let env = Envelope {
                            target: target.clone(),
                            caller: Some(address.clone()),
                            message: message.clone(),
                            inbox: None,
                            position: None,
                            also: Vec::new(),
                        };
                        wb.log.push(LogOp::put(
                            id,
                            key,
                            entries::encode_timer(address, token.as_deref(), &env),
                        ));
                        keys.push(Some(key));
                        if let Some(t) = token {
                            overlay.push((t.as_str(), Some(key)));
                        }
                    }
                    DelayedEffect::Cancel { token } => overlay.push((token.as_str(), None)),
                }
            }
            logged.timer_keys = keys;
        }
        if !egress.is_empty() {
            let mut keys = Vec::with_capacity(egress.len());
            for e in egress {
                if cx.admission.takes_egress(&e.egress) {
                    // Committed by the backend with this write: no log entry to encode.
                    wb.egress.push(EgressRecord {
                        egress: e.egress.clone(),
                        source: address.clone(),
                        message: e.message.clone(),
                        id: Some(EgressId {
                            run: cx.run_id,
                            partition: id,
                            seq: self.next_seq(),
                        }),
                    });
                    keys.push(None);
                } else if (cx.has_sink)(&e.egress) {
                    let key = LogKey::Egress { seq: self.next_seq() };
                    wb.log.push(LogOp::put(
                        id,
                        key,
                        entries::encode_egress(&e.egress, address, &e.message, cx.run_id),
                    ));
                    keys.push(Some(key));
                } else {
                    keys.push(None);
                }
            }
            logged.egress_keys = keys;
        }
        logged.deferred = std::mem::take(&mut self.deferred);
        wb.log.extend(logged.deferred.iter().cloned());
        logged
    }
}
