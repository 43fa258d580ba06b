//! Ingress acceptance: taking records from the ingress queue, skipping those accepted
//! before a restart (by the stored progress of their source), fanning out records for
//! several receivers, and (durable mode) writing them to the inbox in one batch with
//! the progress past them before they are dispatched.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{Partition, deadline_after};
use crate::envelope::Envelope;
use crate::records::LogKey;
use crate::state::entries;
use crate::state::{self, LogOp, WriteBatch};

impl Partition {
    /// Takes an ingress message: dispatched at once with a volatile backend; in durable
    /// mode collected and written to the inbox by `flush_accepting`.
    pub(super) fn accept(&mut self, mut env: Envelope) {
        if let Some(log) = &mut self.durable {
            // Fanned out by `flush_accepting`, in the write that accepts the record.
            log.accepting.push(env);
        } else {
            for extra in fan_out(&mut env) {
                self.shared.begin(1);
                self.route(extra);
            }
            self.enqueue(env);
        }
    }

    /// Writes the ingress messages taken this turn into the inbox, with the source
    /// positions they advance, in one batch; then dispatches them. Records at or below
    /// a position already stored were accepted before a restart: they are skipped.
    pub(super) fn flush_accepting(&mut self) {
        let Some(log) = &mut self.durable else { return };
        if log.accepting.is_empty() || self.accept_blocked {
            return;
        }
        // Load the stored progress of every source first, so that nothing below can
        // fail half-way through the records.
        for i in 0..log.accepting.len() {
            if let Some((source, _)) = &log.accepting[i].position
                && !log.progress.contains_key(source)
            {
                let source = Arc::clone(source);
                if let Err(e) = log.stored_progress(&*self.store, &source) {
                    return self.accept_failed(Vec::new(), e);
                }
            }
        }
        let taken = std::mem::take(&mut log.accepting);
        let mut wb = WriteBatch::default();
        let mut advanced: Vec<(Arc<str>, u64)> = Vec::new();
        let mut keep = Vec::with_capacity(taken.len());
        // Records whose dead letter is in this write (backends that take dead letters).
        let mut lettered = Vec::new();
        let mut skipped = 0;
        let mut work: VecDeque<Envelope> = taken.into();
        while let Some(mut env) = work.pop_front() {
            let log = self.durable.as_mut().expect("durable mode");
            if let Some((source, offset)) = &env.position {
                let stored = match advanced.iter().rev().find(|(s, _)| s == source) {
                    Some((_, o)) => Some(*o),
                    None => log.progress.get(source).copied().flatten(),
                };
                if stored.is_some_and(|p| *offset <= p) {
                    // Accepted before a restart: in the inbox or processed. Final.
                    tracing::debug!(partition = %self.id, %source, offset, ?stored, "skipping a record accepted before");
                    skipped += 1;
                    continue;
                }
                advanced.push((Arc::clone(source), *offset));
            }
            // A record for several receivers: one message each, in this same write (they
            // carry no position: the record's progress is the one above).
            let extras = fan_out(&mut env);
            self.shared.begin(extras.len());
            for extra in extras.into_iter().rev() {
                work.push_front(extra);
            }
            // In cluster mode the accepting partition may not be the target's: the
            // message then goes into the target partition's inbox (or, if that runs
            // elsewhere, to its owner with the commit), like a message between functions.
            let receiver = self.shared.partition_of(&env.target);
            let dispatchable = (receiver != self.id || !self.parked.contains_key(&env.target))
                && self.functions.resolve(env.target.type_name());
            let letter = (!dispatchable).then(|| self.undeliverable(&env));
            let log = self.durable.as_mut().expect("durable mode");
            if dispatchable {
                let key = LogKey::Inbox {
                    sender: self.id,
                    seq: log.next_seq(),
                };
                wb.log.push(LogOp::put(receiver, key, entries::encode_envelope(&env)));
                env.inbox = Some(key);
            } else if let Some(op) =
                letter.and_then(|l| log.dead_letter_op(&*self.shared.backend, &l, self.shared.run_id))
            {
                // Its dead letter commits with the progress that passes the record.
                wb.log.push(op);
                lettered.push(env);
                continue;
            }
            keep.push(env);
        }
        self.shared.finish(skipped);
        for (source, offset) in &advanced {
            match wb.progress.iter_mut().find(|(s, _)| s.as_str() == &**source) {
                Some(slot) => slot.1 = *offset,
                None => wb.progress.push((source.to_string(), *offset)),
            }
        }
        let log = self.durable.as_mut().expect("durable mode");
        let deferred = std::mem::take(&mut log.deferred);
        wb.log.extend(deferred.iter().cloned());
        if !wb.is_empty()
            && let Err(e) = self.store.write(wb)
        {
            log.deferred = deferred;
            keep.extend(lettered);
            for env in &mut keep {
                env.inbox = None;
            }
            return self.accept_failed(keep, e);
        }
        self.accept_failures = 0;
        self.stats.dead_letters += lettered.len() as u64;
        self.shared.finish(lettered.len());
        for (source, offset) in advanced {
            log.progress.insert(source, Some(offset));
        }
        for env in keep {
            if env.inbox.is_some() {
                self.route(env);
            } else {
                self.enqueue(env);
            }
        }
    }

    pub(super) fn accept_failed(&mut self, mut keep: Vec<Envelope>, e: state::Error) {
        self.accept_failures = self.accept_failures.saturating_add(1);
        tracing::error!(
            partition = %self.id,
            attempt = self.accept_failures,
            error = %e,
            "cannot write the inbox; this partition takes no input until it can, retrying"
        );
        if let Some(log) = &mut self.durable {
            keep.append(&mut log.accepting);
            log.accepting = keep;
        }
        self.accept_blocked = true;
        let due = deadline_after(self.shared.config.retry.backoff(self.accept_failures));
        self.timers.schedule_accept_retry(due);
    }
}

/// The messages for a record's other receivers ([`Envelope::also`]), taken out of
/// `env`: copies addressed to each, without the record's position.
fn fan_out(env: &mut Envelope) -> Vec<Envelope> {
    std::mem::take(&mut env.also)
        .into_iter()
        .map(|target| Envelope {
            target,
            caller: env.caller.clone(),
            message: env.message.clone(),
            inbox: None,
            position: None,
            also: Vec::new(),
        })
        .collect()
}
