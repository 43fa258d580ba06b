//! The partition task: per-address mailboxes, dispatch, and the one place effects are
//! applied.
//!
//! Why it exists: a partition owns the addresses whose id hashes to it, their state
//! store, their mailboxes and their timers, and is a single task, so nothing on the
//! per-message path takes a lock. Others reach it through channels: a bounded ingress
//! queue (backpressure for sources) and an unbounded inbound queue for messages from
//! other partitions and control requests (unbounded so two partitions sending to each
//! other can never deadlock; it grows only by what functions send).
//!
//! Dispatch follows StateFun: at most one invocation batch in flight per address; while
//! it runs, later messages for the address queue in its FIFO mailbox and go together in
//! the next batch (up to `max_batch_size`); many addresses are in flight at once.
//!
//! Effects are applied in [`Partition::on_success`] only: state first (one atomic
//! write), then outgoing messages, delayed messages and cancellations, egress records.
//! A failed invocation's effects are discarded; the batch goes back to the front of the
//! mailbox and is retried with backoff (the failing message alone); after
//! `retry.max_attempts` the address is parked and its messages are dead-lettered, while
//! every other address keeps flowing.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use statefun_sdk::{
    Address, Context, DelayedEffect, Effects, EgressMessage, Expiration, StateSpec, StatefulFunction, TypeName,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::egress::{DeadLetter, DeadLetterReason, EgressRecord};
use crate::metrics;
use crate::partitioner::PartitionId;
use crate::runtime::{Envelope, Shared};
use crate::state::{self, PartitionStore, StoredValue, WriteBatch, WriteOp};
use crate::timers::{Timer, Timers};

/// How many queued items one loop turn takes from a channel before looking elsewhere.
const BUDGET: usize = 256;

/// Longest single sleep of the partition loop while waiting for a timer.
const MAX_SLEEP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Requests answered by the partition between invocations.
pub(crate) enum Control {
    GetState {
        address: Address,
        name: Arc<str>,
        reply: oneshot::Sender<Result<Option<Bytes>, state::Error>>,
    },
    Unpark {
        address: Address,
        reply: oneshot::Sender<bool>,
    },
    Parked {
        reply: oneshot::Sender<Vec<(Address, String)>>,
    },
    Stats {
        reply: oneshot::Sender<PartitionStats>,
    },
}

pub(crate) enum Inbound {
    Message(Envelope),
    Control(Control),
}

/// Counters of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStats {
    /// The partition.
    pub partition: PartitionId,
    /// Messages processed successfully.
    pub invocations: u64,
    /// Invocation batches started (a batch holds one or more messages of one address).
    pub batches: u64,
    /// Failed invocation attempts.
    pub failures: u64,
    /// Messages dead-lettered by this partition.
    pub dead_letters: u64,
    /// Addresses parked now.
    pub parked: usize,
    /// Addresses with queued or in-flight messages now.
    pub active_addresses: usize,
    /// Messages queued or in flight now.
    pub buffered: usize,
    /// Delayed messages waiting now.
    pub pending_delayed: usize,
}

/// A registered function as one partition holds it. The `Arc`s are the partition's own
/// (not shared with other partitions), so cloning them per batch touches no cache line
/// another core writes.
#[derive(Clone)]
struct LocalFunction {
    states: Arc<[StateSpec]>,
    function: Arc<Arc<dyn StatefulFunction>>,
    has_after_call: bool,
    /// Any declared state expires: only then is the clock read.
    has_expiry: bool,
}

struct Mailbox {
    queue: VecDeque<Envelope>,
    /// Failed attempts of the message at the head of the queue.
    attempts: u32,
    /// Set when a message failed inside a batch, behind messages that are being re-run
    /// first: the error of that first attempt, so it counts and gets its backoff.
    failed_behind_prefix: Option<String>,
}

struct Failure {
    /// Index in the batch of the message that failed.
    index: usize,
    error: String,
}

/// Values of `AFTER_CALL` specs the batch left in place; their expiry is refreshed.
type Touched = Vec<(Arc<str>, Bytes)>;

struct Completion {
    address: Address,
    batch: Vec<Envelope>,
    outcome: Result<(Effects, Touched), Failure>,
}

pub(crate) struct Partition {
    id: PartitionId,
    shared: Arc<Shared>,
    store: Box<dyn PartitionStore>,
    functions: HashMap<TypeName, LocalFunction, ahash::RandomState>,
    mailboxes: HashMap<Address, Mailbox, ahash::RandomState>,
    parked: HashMap<Address, String, ahash::RandomState>,
    in_flight: FuturesUnordered<BoxFuture<'static, Completion>>,
    /// Invocations that completed on their first poll, waiting to be applied.
    ready: VecDeque<Completion>,
    timers: Timers,
    buffered: usize,
    ingress_rx: mpsc::Receiver<Envelope>,
    inbound_rx: mpsc::UnboundedReceiver<Inbound>,
    stats: PartitionStats,
    invocations_counter: ::metrics::Counter,
    failures_counter: ::metrics::Counter,
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        format!("function panicked: {s}")
    } else if let Some(s) = p.downcast_ref::<String>() {
        format!("function panicked: {s}")
    } else {
        "function panicked".to_owned()
    }
}

/// Runs one batch of messages for one address against one context.
async fn invoke_batch(
    function: Arc<Arc<dyn StatefulFunction>>,
    mut ctx: Context,
    address: Address,
    batch: Vec<Envelope>,
    has_after_call: bool,
) -> Completion {
    for i in 0..batch.len() {
        ctx.set_caller(batch[i].caller.clone());
        let message = batch[i].message.clone();
        let result = AssertUnwindSafe(function.invoke(&mut ctx, message))
            .catch_unwind()
            .await;
        let error = match result {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => error_chain(&*e),
            Err(p) => panic_message(&*p),
        };
        return Completion {
            address,
            batch,
            outcome: Err(Failure { index: i, error }),
        };
    }
    // AFTER_CALL values are refreshed by every invocation, written or not.
    let touched = if has_after_call {
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
        outcome: Ok((ctx.into_effects(), touched)),
    }
}

fn expiry(spec: Option<&StateSpec>, now_ms: u64) -> Option<u64> {
    match spec.map(|s| s.expiration) {
        Some(Expiration::AfterWrite(d)) | Some(Expiration::AfterCall(d)) => {
            Some(now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
        }
        _ => None,
    }
}

/// `now + delay`, clamped to ~30 years so that no delay a function asks for can
/// overflow the clock (and panic the partition).
fn deadline_after(delay: std::time::Duration) -> Instant {
    const FAR: std::time::Duration = std::time::Duration::from_secs(86_400 * 365 * 30);
    let now = Instant::now();
    now.checked_add(delay.min(FAR)).unwrap_or(now)
}

impl Partition {
    pub(crate) fn new(
        id: PartitionId,
        shared: Arc<Shared>,
        store: Box<dyn PartitionStore>,
        ingress_rx: mpsc::Receiver<Envelope>,
        inbound_rx: mpsc::UnboundedReceiver<Inbound>,
    ) -> Partition {
        let functions = shared
            .module
            .types()
            .map(|t| {
                let f = shared.module.get(t).expect("listed type is registered");
                // Fresh copies, names included, so refcounts stay partition-local.
                let states: Arc<[StateSpec]> = f
                    .states()
                    .iter()
                    .map(|s| StateSpec {
                        name: Arc::from(&*s.name),
                        ..s.clone()
                    })
                    .collect();
                let has_after_call = states.iter().any(|s| matches!(s.expiration, Expiration::AfterCall(_)));
                let has_expiry = states.iter().any(|s| s.expiration != Expiration::None);
                (
                    t.clone(),
                    LocalFunction {
                        states,
                        function: Arc::new(Arc::clone(f.function())),
                        has_after_call,
                        has_expiry,
                    },
                )
            })
            .collect();
        Partition {
            id,
            shared,
            store,
            functions,
            mailboxes: HashMap::default(),
            parked: HashMap::default(),
            in_flight: FuturesUnordered::new(),
            ready: VecDeque::new(),
            timers: Timers::default(),
            buffered: 0,
            ingress_rx,
            inbound_rx,
            stats: PartitionStats {
                partition: id,
                ..Default::default()
            },
            invocations_counter: ::metrics::counter!(metrics::INVOCATIONS),
            failures_counter: ::metrics::counter!(metrics::INVOCATION_FAILURES),
        }
    }

    pub(crate) async fn run(mut self, stop: CancellationToken) -> PartitionStats {
        let max_buffered = self.shared.config.max_buffered_per_partition;
        let mut ingress_open = true;
        loop {
            // Take everything that is ready without waiting.
            let mut progressed = false;
            for _ in 0..BUDGET {
                match self.inbound_rx.try_recv() {
                    Ok(m) => {
                        self.on_inbound(m);
                        progressed = true;
                    }
                    Err(_) => break,
                }
            }
            for _ in 0..BUDGET {
                if !ingress_open || self.buffered >= max_buffered {
                    break;
                }
                match self.ingress_rx.try_recv() {
                    Ok(env) => {
                        self.enqueue(env);
                        progressed = true;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => ingress_open = false,
                }
            }
            // Bounded like the channels: functions that message each other (or
            // themselves) must not keep this loop from yielding and seeing `stop`.
            for _ in 0..BUDGET {
                let Some(c) = self.ready.pop_front() else { break };
                self.on_complete(c);
                progressed = true;
            }
            while let Some(Some(c)) = self.in_flight.next().now_or_never() {
                self.on_complete(c);
                progressed = true;
            }
            if self.timers.next_deadline().is_some_and(|d| d <= Instant::now()) {
                self.fire_timers();
                progressed = true;
            }
            if stop.is_cancelled() {
                break;
            }
            if progressed {
                tokio::task::consume_budget().await;
                continue;
            }
            // Nothing ready: wait for the first thing that is.
            let deadline = self.timers.next_deadline();
            let take_ingress = ingress_open && self.buffered < max_buffered;
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(c) = self.in_flight.next(), if !self.in_flight.is_empty() => self.on_complete(c),
                Some(m) = self.inbound_rx.recv() => self.on_inbound(m),
                env = self.ingress_rx.recv(), if take_ingress => match env {
                    Some(env) => self.enqueue(env),
                    None => ingress_open = false,
                },
                // Sleep at most an hour at a time: far-future deadlines (a delay of
                // years) are re-checked instead of registered with tokio's timer.
                _ = tokio::time::sleep_until(deadline.map_or_else(Instant::now, |d| d.min(Instant::now() + MAX_SLEEP))),
                    if deadline.is_some() => self.fire_timers(),
            }
        }
        if self.timers.pending_delayed() > 0 {
            tracing::info!(
                partition = %self.id,
                pending = self.timers.pending_delayed(),
                "stopping with delayed messages pending (kept only by durable backends)"
            );
        }
        self.snapshot_stats()
    }

    fn snapshot_stats(&self) -> PartitionStats {
        PartitionStats {
            parked: self.parked.len(),
            active_addresses: self.mailboxes.len(),
            buffered: self.buffered,
            pending_delayed: self.timers.pending_delayed(),
            ..self.stats.clone()
        }
    }

    fn on_inbound(&mut self, m: Inbound) {
        match m {
            Inbound::Message(env) => self.enqueue(env),
            Inbound::Control(c) => self.on_control(c),
        }
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::GetState { address, name, reply } => {
                let now = self.shared.clock.now_ms();
                let r = self
                    .store
                    .get(&address, &name)
                    .map(|v| v.filter(|v| v.expires_at_ms.is_none_or(|t| t > now)).map(|v| v.value));
                let _ = reply.send(r);
            }
            Control::Unpark { address, reply } => {
                let was = self.parked.remove(&address).is_some();
                if was {
                    tracing::info!(address = %address, "address unparked");
                }
                let _ = reply.send(was);
            }
            Control::Parked { reply } => {
                let _ = reply.send(self.parked.iter().map(|(a, e)| (a.clone(), e.clone())).collect());
            }
            Control::Stats { reply } => {
                let _ = reply.send(self.snapshot_stats());
            }
        }
    }

    fn dead_letter(&mut self, env: Envelope, reason: DeadLetterReason) {
        self.stats.dead_letters += 1;
        self.shared.dead_letter(DeadLetter {
            reason,
            target: Some(env.target),
            caller: env.caller,
            message: Some(env.message),
            record: None,
        });
        self.shared.finish(1);
    }

    /// Accepts a message for an address this partition owns.
    fn enqueue(&mut self, env: Envelope) {
        if let Some(error) = self.parked.get(&env.target) {
            let reason = DeadLetterReason::AddressParked { error: error.clone() };
            return self.dead_letter(env, reason);
        }
        if !self.functions.contains_key(env.target.type_name()) {
            let reason = DeadLetterReason::UnknownFunctionType(env.target.type_name().clone());
            return self.dead_letter(env, reason);
        }
        self.buffered += 1;
        match self.mailboxes.entry(env.target.clone()) {
            Entry::Occupied(mut o) => o.get_mut().queue.push_back(env),
            Entry::Vacant(v) => {
                let address = v.key().clone();
                v.insert(Mailbox {
                    queue: VecDeque::new(),
                    attempts: 0,
                    failed_behind_prefix: None,
                });
                self.start(address, vec![env]);
            }
        }
    }

    /// Loads the address's state and puts the batch in flight.
    fn start(&mut self, address: Address, batch: Vec<Envelope>) {
        let f = self
            .functions
            .get(address.type_name())
            .expect("checked on enqueue")
            .clone();
        self.stats.batches += 1;
        let now = if f.has_expiry { self.shared.clock.now_ms() } else { 0 };
        let mut values = Vec::with_capacity(f.states.len());
        for spec in f.states.iter() {
            match self.store.get(&address, &spec.name) {
                Ok(v) => values.push(v.filter(|v| v.expires_at_ms.is_none_or(|t| t > now)).map(|v| v.value)),
                Err(e) => {
                    let failure = Failure {
                        index: 0,
                        error: format!("cannot read state {:?}: {e}", spec.name),
                    };
                    self.ready.push_back(Completion {
                        address,
                        batch,
                        outcome: Err(failure),
                    });
                    return;
                }
            }
        }
        let ctx = Context::new(address.clone(), Arc::clone(&f.states), values);
        // Most invocations finish on their first poll: apply those from the ready queue
        // (not recursively, so a function sending to itself cannot grow the stack) and
        // hand only the pending ones to FuturesUnordered, which polls them again with a
        // real waker.
        let mut fut = invoke_batch(f.function, ctx, address, batch, f.has_after_call).boxed();
        match fut.as_mut().now_or_never() {
            Some(c) => self.ready.push_back(c),
            None => self.in_flight.push(fut),
        }
    }

    fn on_complete(&mut self, c: Completion) {
        match c.outcome {
            Ok((effects, touched)) => self.on_success(c.address, c.batch, effects, touched),
            Err(failure) => self.on_failure(c.address, c.batch, failure),
        }
    }

    /// The one place effects are applied.
    fn on_success(
        &mut self,
        address: Address,
        batch: Vec<Envelope>,
        effects: Effects,
        touched: Vec<(Arc<str>, Bytes)>,
    ) {
        let n = batch.len();
        // 1. State, atomically. If it cannot be written, nothing else is applied.
        if !effects.state.is_empty() || !touched.is_empty() {
            let f = &self.functions[address.type_name()];
            let now = if f.has_expiry { self.shared.clock.now_ms() } else { 0 };
            let states = &f.states;
            let spec = |name: &str| states.iter().find(|s| &*s.name == name);
            let mut wb = WriteBatch {
                ops: Vec::with_capacity(effects.state.len() + touched.len()),
                progress: Vec::new(),
            };
            for (name, value) in touched {
                if !effects.state.iter().any(|m| m.name == name) {
                    let expires_at_ms = expiry(spec(&name), now);
                    wb.ops.push(WriteOp {
                        address: address.clone(),
                        name,
                        value: Some(StoredValue { value, expires_at_ms }),
                    });
                }
            }
            for m in effects.state {
                let expires_at_ms = expiry(spec(&m.name), now);
                wb.ops.push(WriteOp {
                    address: address.clone(),
                    name: m.name,
                    value: m.value.map(|value| StoredValue { value, expires_at_ms }),
                });
            }
            if let Err(e) = self.store.write(wb) {
                let failure = Failure {
                    index: 0,
                    error: format!("cannot write state: {e}"),
                };
                return self.on_failure(address, batch, failure);
            }
        }
        // 2. Messages to functions.
        self.shared.begin(effects.outgoing.len());
        for o in effects.outgoing {
            self.route(Envelope {
                target: o.target,
                caller: Some(address.clone()),
                message: o.message,
            });
        }
        // 3. Delayed messages and cancellations, in order.
        for d in effects.delayed {
            match d {
                DelayedEffect::Send {
                    delay,
                    target,
                    message,
                    token,
                } => {
                    let env = Envelope {
                        target,
                        caller: Some(address.clone()),
                        message,
                    };
                    self.timers
                        .schedule_delayed(deadline_after(delay), address.clone(), token, env);
                }
                DelayedEffect::Cancel { token } => {
                    self.timers.cancel(&address, &token);
                }
            }
        }
        // 4. Egress.
        for e in effects.egress {
            self.emit_egress(&address, e);
        }
        self.stats.invocations += n as u64;
        self.invocations_counter.increment(n as u64);
        self.buffered -= n;
        self.shared.finish(n);
        self.next(address);
    }

    fn emit_egress(&mut self, source: &Address, e: EgressMessage) {
        let reason = match self.shared.egresses.get(&e.egress) {
            None => DeadLetterReason::UnknownEgress(e.egress.clone()),
            Some(sink) => {
                let record = EgressRecord {
                    egress: e.egress.clone(),
                    source: source.clone(),
                    message: e.message.clone(),
                };
                match sink.send(record) {
                    Ok(()) => return,
                    Err(err) => DeadLetterReason::EgressFailed {
                        egress: e.egress.clone(),
                        error: err.to_string(),
                    },
                }
            }
        };
        self.stats.dead_letters += 1;
        self.shared.dead_letter(DeadLetter {
            reason,
            target: None,
            caller: Some(source.clone()),
            message: Some(e.message),
            record: None,
        });
    }

    /// Sends an already-counted message to its owning partition.
    fn route(&mut self, env: Envelope) {
        let p = self.shared.partition_of(&env.target);
        if p == self.id {
            self.enqueue(env);
        } else {
            self.shared.send_internal(p, env);
        }
    }

    /// Starts the next batch of `address`, or forgets the mailbox when it is empty.
    fn next(&mut self, address: Address) {
        let max = self.shared.config.max_batch_size;
        let max_attempts = self.shared.config.retry.max_attempts;
        let Some(mb) = self.mailboxes.get_mut(&address) else {
            return;
        };
        if let Some(error) = mb.failed_behind_prefix.take() {
            // The prefix re-ran; the message that failed behind it is the head now and
            // has used one attempt.
            mb.attempts = 1;
            if max_attempts <= 1 {
                return self.park(address, error, 1);
            }
            let due = deadline_after(self.shared.config.retry.backoff(1));
            self.timers.schedule_retry(due, address);
            return;
        }
        mb.attempts = 0;
        if mb.queue.is_empty() {
            self.mailboxes.remove(&address);
            return;
        }
        let take = mb.queue.len().min(max);
        let batch: Vec<Envelope> = mb.queue.drain(..take).collect();
        self.start(address, batch);
    }

    fn on_failure(&mut self, address: Address, batch: Vec<Envelope>, failure: Failure) {
        self.stats.failures += 1;
        self.failures_counter.increment(1);
        let max_attempts = self.shared.config.retry.max_attempts;
        let mb = self
            .mailboxes
            .get_mut(&address)
            .expect("an in-flight address has a mailbox");
        for env in batch.into_iter().rev() {
            mb.queue.push_front(env);
        }
        if failure.index > 0 {
            // The messages before the failing one succeeded; their effects were discarded
            // with the batch's, so run them again now. The failing one becomes the head,
            // with this failure counted (see `next`).
            let prefix: Vec<Envelope> = mb.queue.drain(..failure.index).collect();
            mb.failed_behind_prefix = Some(failure.error);
            return self.start(address, prefix);
        }
        mb.attempts += 1;
        let attempts = mb.attempts;
        tracing::warn!(
            address = %address,
            attempt = attempts,
            max_attempts,
            error = %failure.error,
            "invocation failed"
        );
        if attempts >= max_attempts {
            return self.park(address, failure.error, attempts);
        }
        let due = deadline_after(self.shared.config.retry.backoff(attempts));
        self.timers.schedule_retry(due, address);
    }

    fn park(&mut self, address: Address, error: String, attempts: u32) {
        let mb = self.mailboxes.remove(&address).expect("parking an active address");
        tracing::error!(address = %address, attempts, error = %error, "address parked");
        ::metrics::counter!(metrics::ADDRESSES_PARKED).increment(1);
        self.buffered -= mb.queue.len();
        let mut queue = mb.queue.into_iter();
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

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(t) = self.timers.pop_due(now) {
            match t {
                Timer::Delayed { envelope, .. } => {
                    self.shared.begin(1);
                    self.route(envelope);
                }
                Timer::Retry { address } => {
                    let Some(mb) = self.mailboxes.get_mut(&address) else {
                        continue;
                    };
                    let Some(head) = mb.queue.pop_front() else {
                        continue;
                    };
                    self.start(address, vec![head]);
                }
            }
        }
    }
}
