//! Mailboxes and batching: per-address FIFO queues behind the batch in flight.
//!
//! Why it exists: dispatch follows StateFun: at most one invocation batch in flight per
//! address; while it runs, later messages for the address queue in its mailbox and go
//! together in the next batch (up to `max_batch_size`). A failed batch goes back to the
//! front of its mailbox; the mailbox counts the attempts of its head. This module keeps
//! the queues and their counts; the partition decides what to do with what it returns.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};

use statefun_sdk::Address;

use crate::envelope::Envelope;

struct Mailbox {
    queue: VecDeque<Envelope>,
    /// Failed attempts of the message at the head of the queue.
    attempts: u32,
    /// Set when a message failed inside a batch, behind messages that are being re-run
    /// first: the error of that first attempt, so it counts and gets its backoff.
    failed_behind_prefix: Option<String>,
}

/// What comes after a batch of an address finished ([`Mailboxes::next`]).
pub(super) enum Next {
    /// The address has no mailbox (it was parked).
    Gone,
    /// Nothing is queued: the mailbox is forgotten.
    Idle,
    /// Start this batch.
    Start(Vec<Envelope>),
    /// The re-run prefix of a failed batch finished; the message that failed behind it
    /// is the head now and has used one attempt, with this error.
    FailedBehindPrefix(String),
}

/// What a failed batch left ([`Mailboxes::requeue`]).
pub(super) enum Requeued {
    /// The messages before the failing one succeeded, but their effects were discarded
    /// with the batch's: run them again now (the failure is counted after them).
    RunPrefix(Vec<Envelope>),
    /// The head failed; its attempts so far.
    Counted(u32),
}

/// The mailboxes of one partition.
pub(super) struct Mailboxes {
    map: HashMap<Address, Mailbox, ahash::RandomState>,
    /// Addresses with `max_queued` or more messages queued behind their batch in
    /// flight: while any exists, the partition takes no ingress.
    backlogged: HashSet<Address, ahash::RandomState>,
    /// Messages queued or in flight.
    buffered: usize,
    max_queued: usize,
    max_batch: usize,
}

impl Mailboxes {
    pub(super) fn new(max_queued: usize, max_batch: usize) -> Mailboxes {
        Mailboxes {
            map: HashMap::default(),
            backlogged: HashSet::default(),
            buffered: 0,
            max_queued,
            max_batch,
        }
    }

    /// Queues a message. Returns the batch to start when the address had nothing in
    /// flight (it gets a mailbox now).
    pub(super) fn push(&mut self, env: Envelope) -> Option<(Address, Vec<Envelope>)> {
        self.buffered += 1;
        match self.map.entry(env.target.clone()) {
            Entry::Occupied(mut o) => {
                o.get_mut().queue.push_back(env);
                if o.get().queue.len() >= self.max_queued {
                    self.backlogged.insert(o.key().clone());
                }
                None
            }
            Entry::Vacant(v) => {
                let address = v.key().clone();
                v.insert(Mailbox {
                    queue: VecDeque::new(),
                    attempts: 0,
                    failed_behind_prefix: None,
                });
                Some((address, vec![env]))
            }
        }
    }

    /// `n` messages finished (processed).
    pub(super) fn finished(&mut self, n: usize) {
        self.buffered -= n;
    }

    /// What comes after a batch of `address` succeeded.
    pub(super) fn next(&mut self, address: &Address) -> Next {
        let Some(mb) = self.map.get_mut(address) else {
            return Next::Gone;
        };
        if let Some(error) = mb.failed_behind_prefix.take() {
            mb.attempts = 1;
            return Next::FailedBehindPrefix(error);
        }
        mb.attempts = 0;
        if mb.queue.is_empty() {
            self.map.remove(address);
            return Next::Idle;
        }
        let take = mb.queue.len().min(self.max_batch);
        let batch: Vec<Envelope> = mb.queue.drain(..take).collect();
        self.note_backlog(address);
        Next::Start(batch)
    }

    /// Puts a failed batch back at the front of its mailbox; `index` is the message that
    /// failed, with `error`.
    pub(super) fn requeue(&mut self, address: &Address, batch: Vec<Envelope>, index: usize, error: String) -> Requeued {
        let mb = self.map.get_mut(address).expect("an in-flight address has a mailbox");
        for env in batch.into_iter().rev() {
            mb.queue.push_front(env);
        }
        if mb.queue.len() >= self.max_queued {
            self.backlogged.insert(address.clone());
        }
        if index > 0 {
            let prefix: Vec<Envelope> = mb.queue.drain(..index).collect();
            mb.failed_behind_prefix = Some(error);
            self.note_backlog(address);
            return Requeued::RunPrefix(prefix);
        }
        mb.attempts += 1;
        Requeued::Counted(mb.attempts)
    }

    /// The head of `address`'s mailbox, for a retry.
    pub(super) fn take_head(&mut self, address: &Address) -> Option<Envelope> {
        let head = self.map.get_mut(address)?.queue.pop_front()?;
        self.note_backlog(address);
        Some(head)
    }

    /// Forgets `address`'s mailbox (it is parked) and returns its messages.
    pub(super) fn remove(&mut self, address: &Address) -> VecDeque<Envelope> {
        let mb = self.map.remove(address).expect("parking an active address");
        self.backlogged.remove(address);
        self.buffered -= mb.queue.len();
        mb.queue
    }

    /// Some address has too many messages queued: take no ingress.
    pub(super) fn backlogged(&self) -> bool {
        !self.backlogged.is_empty()
    }

    /// Messages queued or in flight.
    pub(super) fn buffered(&self) -> usize {
        self.buffered
    }

    /// Addresses with queued or in-flight messages.
    pub(super) fn active(&self) -> usize {
        self.map.len()
    }

    /// Keeps `backlogged` in step with `address`'s queue after messages left it.
    fn note_backlog(&mut self, address: &Address) {
        // The common case, on every batch: nothing is backlogged, no lookups.
        if self.backlogged.is_empty() {
            return;
        }
        let queued = self.map.get(address).map_or(0, |mb| mb.queue.len());
        if queued < self.max_queued {
            self.backlogged.remove(address);
        }
    }
}
