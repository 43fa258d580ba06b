//! Retries, parking and dead letters: a failed batch goes back to its mailbox and is
//! retried with backoff (the failing message alone); after `retry.max_attempts` the
//! address is parked and its messages are dead-lettered (committed with the partition's
//! next write when the backend takes dead letters), while every other address keeps
//! flowing.

use statefun_sdk::Address;

use super::failure::Failure;
use super::mailboxes::Requeued;
use super::{Partition, deadline_after};
use crate::envelope::Envelope;
use crate::metrics;
use crate::records::{DeadLetter, DeadLetterReason};
use crate::state::LogOp;

impl Partition {
    pub(super) fn dead_letter(&mut self, env: Envelope, reason: DeadLetterReason) {
        if let Some(key) = env.inbox {
            self.defer(LogOp::delete(self.id, key));
        }
        let letter = DeadLetter {
            reason,
            target: Some(env.target),
            caller: env.caller,
            message: Some(env.message),
            record: None,
        };
        // Committed with the deletion above when the backend takes dead letters.
        let op = match &mut self.durable {
            Some(log) => log.dead_letter_op(&*self.shared.backend, &letter, self.shared.run_id),
            None => None,
        };
        match op {
            Some(op) => self.defer(op),
            None => self.shared.dead_letter(letter),
        }
        self.stats.dead_letters += 1;
        self.shared.finish(1);
    }

    /// The dead letter of an accepted record that cannot be dispatched here: its target
    /// is parked on this partition, or no function serves its type.
    pub(super) fn undeliverable(&self, env: &Envelope) -> DeadLetter {
        let reason = match self.parked.get(&env.target) {
            Some(error) => DeadLetterReason::AddressParked { error: error.clone() },
            None => DeadLetterReason::UnknownFunctionType(env.target.type_name().clone()),
        };
        DeadLetter {
            reason,
            target: Some(env.target.clone()),
            caller: env.caller.clone(),
            message: Some(env.message.clone()),
            record: None,
        }
    }

    pub(super) fn on_failure(&mut self, address: Address, batch: Vec<Envelope>, failure: Failure) {
        self.stats.failures += 1;
        self.failures_counter.increment(1);
        let max_attempts = self.shared.config.retry.max_attempts;
        let error = failure.kind.to_string();
        let attempts = match self.mailboxes.requeue(&address, batch, failure.index, error.clone()) {
            // The messages before the failing one succeeded; their effects were discarded
            // with the batch's, so run them again now. The failing one becomes the head,
            // with this failure counted (see `next`).
            Requeued::RunPrefix(prefix) => return self.start(address, prefix),
            Requeued::Counted(attempts) => attempts,
        };
        tracing::warn!(
            address = %address,
            attempt = attempts,
            max_attempts,
            error = %error,
            "invocation failed"
        );
        if attempts >= max_attempts {
            return self.park(address, error, attempts);
        }
        let due = deadline_after(self.shared.config.retry.backoff(attempts));
        self.timers.schedule_retry(due, address);
    }

    pub(super) fn park(&mut self, address: Address, error: String, attempts: u32) {
        let queue = self.mailboxes.remove(&address);
        tracing::error!(address = %address, attempts, error = %error, "address parked");
        ::metrics::counter!(metrics::ADDRESSES_PARKED).increment(1);
        let mut queue = queue.into_iter();
        if let Some(head) = queue.next() {
            let reason = DeadLetterReason::FunctionFailed {
                error: error.clone(),
                attempts,
            };
            self.dead_letter(head, reason);
        }
        for env in queue {
            let reason = DeadLetterReason::AddressParked { error: error.clone() };
            self.dead_letter(env, reason);
        }
        self.parked.insert(address, error);
    }
}
