//! The partition's timers: delayed messages and retry backoffs, on processing time.
//!
//! Why it exists: `send_after` messages and retries of failing addresses both wait for
//! a deadline. They use tokio's clock, so tests drive them with paused time. Delayed
//! messages are indexed by `(sender address, token)`: a token is scoped to the address
//! that sent it, cancelling removes the pending message, and sending again with a token
//! that is still pending replaces the earlier message.

use std::collections::{BTreeMap, HashMap};

use statefun_sdk::Address;
use tokio::time::Instant;

use crate::envelope::Envelope;
use crate::state::LogKey;

type Key = (Instant, u64);

#[derive(Debug)]
pub(crate) enum Timer {
    Delayed {
        sender: Address,
        token: Option<String>,
        envelope: Box<Envelope>,
        /// Its key in the partition's durable timer log (durable backends only).
        durable: Option<LogKey>,
    },
    Retry {
        address: Address,
    },
    /// Retry writing the ingress messages the inbox write refused.
    AcceptRetry,
}

#[derive(Debug, Default)]
pub(crate) struct Timers {
    queue: BTreeMap<Key, Timer>,
    tokens: HashMap<(Address, String), Key, ahash::RandomState>,
    seq: u64,
    delayed: usize,
}

impl Timers {
    fn key(&mut self, due: Instant) -> Key {
        self.seq += 1;
        (due, self.seq)
    }

    pub(crate) fn schedule_delayed(
        &mut self,
        due: Instant,
        sender: Address,
        token: Option<String>,
        envelope: Envelope,
        durable: Option<LogKey>,
    ) {
        let key = self.key(due);
        if let Some(t) = &token
            && let Some(old) = self.tokens.insert((sender.clone(), t.clone()), key)
            && self.queue.remove(&old).is_some()
        {
            self.delayed -= 1;
        }
        self.queue.insert(
            key,
            Timer::Delayed {
                sender,
                token,
                envelope: Box::new(envelope),
                durable,
            },
        );
        self.delayed += 1;
    }

    /// The durable key of the message `sender` has pending under `token`, if any.
    pub(crate) fn durable_key(&self, sender: &Address, token: &str) -> Option<LogKey> {
        let key = self.tokens.get(&(sender.clone(), token.to_owned()))?;
        match self.queue.get(key)? {
            Timer::Delayed { durable, .. } => *durable,
            Timer::Retry { .. } | Timer::AcceptRetry => None,
        }
    }

    /// Cancels the pending message `sender` sent with `token`; false if there is none.
    pub(crate) fn cancel(&mut self, sender: &Address, token: &str) -> bool {
        match self.tokens.remove(&(sender.clone(), token.to_owned())) {
            Some(key) => {
                let removed = self.queue.remove(&key).is_some();
                if removed {
                    self.delayed -= 1;
                }
                removed
            }
            None => false,
        }
    }

    pub(crate) fn schedule_retry(&mut self, due: Instant, address: Address) {
        let key = self.key(due);
        self.queue.insert(key, Timer::Retry { address });
    }

    pub(crate) fn schedule_accept_retry(&mut self, due: Instant) {
        let key = self.key(due);
        self.queue.insert(key, Timer::AcceptRetry);
    }

    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.queue.first_key_value().map(|(k, _)| k.0)
    }

    /// Removes and returns the earliest timer due at or before `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        let entry = self.queue.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        let timer = entry.remove();
        if let Timer::Delayed { sender, token, .. } = &timer {
            self.delayed -= 1;
            if let Some(t) = token {
                self.tokens.remove(&(sender.clone(), t.clone()));
            }
        }
        Some(timer)
    }

    /// Delayed messages waiting (retries not counted).
    pub(crate) fn pending_delayed(&self) -> usize {
        self.delayed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use statefun_sdk::{TypeName, TypedValue};
    use std::time::Duration;

    fn addr(id: &str) -> Address {
        Address::new(TypeName::from_static("t/f"), id).unwrap()
    }

    fn env(n: i64) -> Envelope {
        Envelope {
            target: addr("x"),
            caller: None,
            message: TypedValue::of(&n).unwrap(),
            inbox: None,
            position: None,
            also: Vec::new(),
        }
    }

    fn fired(t: Timer) -> i64 {
        match t {
            Timer::Delayed { envelope, .. } => envelope.message.decode().unwrap(),
            Timer::Retry { .. } | Timer::AcceptRetry => -1,
        }
    }

    #[test]
    fn timers_fire_in_deadline_order_and_only_when_due() {
        let now = Instant::now();
        let mut t = Timers::default();
        t.schedule_delayed(now + Duration::from_secs(2), addr("a"), None, env(2), None);
        t.schedule_delayed(now + Duration::from_secs(1), addr("a"), None, env(1), None);
        assert!(t.pop_due(now).is_none());
        assert_eq!(fired(t.pop_due(now + Duration::from_secs(5)).unwrap()), 1);
        assert_eq!(fired(t.pop_due(now + Duration::from_secs(5)).unwrap()), 2);
        assert_eq!(t.pending_delayed(), 0);
    }

    #[test]
    fn tokens_are_scoped_to_the_sender_and_replace_pending_messages() {
        let now = Instant::now();
        let mut t = Timers::default();
        t.schedule_delayed(now, addr("a"), Some("tok".into()), env(1), None);
        t.schedule_delayed(now, addr("b"), Some("tok".into()), env(2), None);
        let k = LogKey::Timer { due_ms: 5, seq: 9 };
        t.schedule_delayed(now, addr("a"), Some("tok".into()), env(3), Some(k));
        assert_eq!(t.durable_key(&addr("a"), "tok"), Some(k));
        assert_eq!(t.durable_key(&addr("b"), "tok"), None, "no durable key given");
        assert_eq!(t.pending_delayed(), 2);
        assert!(t.cancel(&addr("b"), "tok"));
        assert!(!t.cancel(&addr("b"), "tok"), "already cancelled");
        assert_eq!(fired(t.pop_due(now).unwrap()), 3);
        assert!(t.pop_due(now).is_none());
    }
}
