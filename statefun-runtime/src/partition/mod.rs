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
//! Effects are applied in [`Partition::on_success`] only, from the [`plan`] of the
//! completed batch: state first (one atomic
//! write), then outgoing messages, delayed messages and cancellations, egress records.
//! A failed invocation's effects are discarded; the batch goes back to the front of the
//! mailbox and is retried with backoff (the failing message alone); after
//! `retry.max_attempts` the address is parked and its messages are dead-lettered, while
//! every other address keeps flowing.

mod accept;
mod control;
mod dead_letters;
mod durable;
mod failure;
mod functions;
mod invoke;
mod mailboxes;
mod plan;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use futures::FutureExt;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use statefun_sdk::{Address, Context};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::durable::{DurableLog, EffectsContext};
use self::failure::{Failure, FailureKind};
use self::functions::FunctionTable;
use self::invoke::{Completion, FunctionFlags, Outcome, invoke_batch};
use self::mailboxes::{Mailboxes, Next};
use self::plan::{Action, Done, PlanContext, plan};
use crate::envelope::Envelope;
use crate::metrics;
use crate::partitioner::PartitionId;
use crate::records::{DeadLetter, DeadLetterReason, EgressId, EgressRecord, LogKey};
use crate::shared::{Inbound, Shared};
use crate::state::entries::{self, StoredTimer};
use crate::state::{self, LogOp, PartitionStore, WriteBatch};
use crate::stats::PartitionStats;
use crate::timers::{Timer, Timers};

/// How many queued items one loop turn takes from a channel before looking elsewhere.
const BUDGET: usize = 256;

/// Longest single sleep of the partition loop while waiting for a timer.
const MAX_SLEEP: std::time::Duration = std::time::Duration::from_secs(3600);

/// How often a partition whose backend refused input asks again.
const INPUT_RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

pub(crate) struct Partition {
    id: PartitionId,
    shared: Arc<Shared>,
    store: Box<dyn PartitionStore>,
    functions: FunctionTable,
    mailboxes: Mailboxes,
    parked: HashMap<Address, String, ahash::RandomState>,
    in_flight: FuturesUnordered<BoxFuture<'static, Completion>>,
    /// Invocations that completed on their first poll, waiting to be applied.
    ready: VecDeque<Completion>,
    timers: Timers,
    ingress_rx: mpsc::Receiver<Envelope>,
    inbound_rx: mpsc::UnboundedReceiver<Inbound>,
    stats: PartitionStats,
    invocations_counter: ::metrics::Counter,
    failures_counter: ::metrics::Counter,
    /// Durable mode only (see [`DurableLog`]).
    durable: Option<DurableLog>,
    /// The input gate is closed (the inbox write failed, or the backend takes no input
    /// now): no ingress is taken until the retry timer fires.
    accept_blocked: bool,
    /// Consecutive failed inbox writes (for the backoff).
    accept_failures: u32,
    /// What recovery read, put back in motion when the partition runs.
    recovered: durable::Recovered,
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
        let durable = shared.profile.durable.then(|| DurableLog::new(id, shared.incarnation));
        Partition {
            id,
            functions: FunctionTable::new(&shared.module),
            mailboxes: Mailboxes::new(shared.config.max_queued_per_address, shared.config.max_batch_size),
            shared,
            store,
            parked: HashMap::default(),
            in_flight: FuturesUnordered::new(),
            ready: VecDeque::new(),
            timers: Timers::default(),
            ingress_rx,
            inbound_rx,
            stats: PartitionStats {
                partition: id,
                ..Default::default()
            },
            invocations_counter: ::metrics::counter!(metrics::INVOCATIONS),
            failures_counter: ::metrics::counter!(metrics::INVOCATION_FAILURES),
            durable,
            accept_blocked: false,
            accept_failures: 0,
            recovered: durable::Recovered::default(),
        }
    }

    /// Reads what a durable store holds from before a restart (see
    /// [`DurableLog::recover`]). Returns how many messages it recovered (the caller
    /// counts them as outstanding).
    pub(crate) fn recover(&mut self) -> Result<usize, state::Error> {
        let Some(log) = &self.durable else {
            return Ok(0);
        };
        self.recovered = log.recover(&*self.store)?;
        Ok(self.recovered.messages.len())
    }

    /// Puts recovered work back in motion (first thing in `run`): timers are scheduled
    /// again (overdue ones fire at once), egress records are handed to their sinks, and
    /// inbox messages are dispatched before any new input, in inbox order (per sender,
    /// in sequence order).
    fn resume(&mut self) {
        let now_ms = self.shared.clock.now_ms();
        let recovered = std::mem::take(&mut self.recovered);
        for (key, t) in recovered.timers {
            let StoredTimer {
                sender,
                token,
                envelope,
            } = t;
            let due_ms = match key {
                LogKey::Timer { due_ms, .. } => due_ms,
                _ => now_ms,
            };
            let delay = std::time::Duration::from_millis(due_ms.saturating_sub(now_ms));
            self.timers
                .schedule_delayed(deadline_after(delay), sender, token, envelope, Some(key));
        }
        for (key, record) in recovered.egress {
            self.hand_over(Some(key), record);
        }
        for env in recovered.messages {
            self.enqueue(env);
        }
    }

    /// Ingress messages taken this turn and not yet written (durable mode).
    fn accepting(&self) -> usize {
        self.durable.as_ref().map_or(0, |l| l.accepting.len())
    }

    /// A log deletion that may wait for the next write (durable mode).
    fn defer(&mut self, op: LogOp) {
        if let Some(log) = &mut self.durable {
            log.deferred.push(op);
        }
    }

    pub(crate) async fn run(mut self, stop: CancellationToken) -> PartitionStats {
        let max_buffered = self.shared.config.max_buffered_per_partition;
        let mut ingress_open = true;
        self.resume();
        loop {
            // A backend with too much pending (a commit waiting for its broker) takes no
            // more input until it has committed; checked again every 20 ms.
            if !self.accept_blocked && !self.shared.backend.accepts_input() {
                self.accept_blocked = true;
                self.timers.schedule_accept_retry(deadline_after(INPUT_RECHECK));
            }
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
                if !ingress_open
                    || self.accept_blocked
                    || self.mailboxes.buffered() + self.accepting() >= max_buffered
                    || self.mailboxes.backlogged()
                {
                    break;
                }
                match self.ingress_rx.try_recv() {
                    Ok(env) => {
                        self.accept(env);
                        progressed = true;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => ingress_open = false,
                }
            }
            self.flush_accepting();
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
            if let Some(log) = &mut self.durable {
                log.flush_deferred(&mut *self.store);
            }
            let deadline = self.timers.next_deadline();
            let take_ingress = ingress_open
                && !self.accept_blocked
                && self.mailboxes.buffered() < max_buffered
                && !self.mailboxes.backlogged();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                Some(c) = self.in_flight.next(), if !self.in_flight.is_empty() => self.on_complete(c),
                Some(m) = self.inbound_rx.recv() => self.on_inbound(m),
                env = self.ingress_rx.recv(), if take_ingress => match env {
                    Some(env) => self.accept(env),
                    None => ingress_open = false,
                },
                // Sleep at most an hour at a time: far-future deadlines (a delay of
                // years) are re-checked instead of registered with tokio's timer.
                _ = tokio::time::sleep_until(deadline.map_or_else(Instant::now, |d| d.min(Instant::now() + MAX_SLEEP))),
                    if deadline.is_some() => self.fire_timers(),
            }
        }
        if let Some(log) = &mut self.durable {
            log.flush_deferred(&mut *self.store);
        }
        if self.timers.pending_delayed() > 0 && self.durable.is_none() {
            tracing::info!(
                partition = %self.id,
                pending = self.timers.pending_delayed(),
                "stopping with delayed messages pending (kept only by durable backends)"
            );
        }
        self.snapshot_stats()
    }

    fn on_inbound(&mut self, m: Inbound) {
        match m {
            Inbound::Message(env) => self.enqueue(env),
            Inbound::Control(c) => self.on_control(c),
        }
    }

    /// Accepts a message for an address this partition owns.
    fn enqueue(&mut self, env: Envelope) {
        if let Some(error) = self.parked.get(&env.target) {
            let reason = DeadLetterReason::AddressParked { error: error.clone() };
            return self.dead_letter(env, reason);
        }
        if !self.functions.resolve(env.target.type_name()) {
            let reason = DeadLetterReason::UnknownFunctionType(env.target.type_name().clone());
            return self.dead_letter(env, reason);
        }
        if let Some((address, batch)) = self.mailboxes.push(env) {
            self.start(address, batch);
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
        // Values that expired and want a notice: it is delivered now, before any other
        // message can overwrite the value (the timer that fires at the deadline only
        // triggers this check; a trigger for a live or absent value does nothing).
        let mut notices = Vec::new();
        for spec in f.states.iter() {
            match self.store.get(&address, &spec.name) {
                Ok(v) => {
                    let (live, expired) = match v {
                        Some(v) if v.expires_at_ms.is_none_or(|t| t > now) => (Some(v.value), None),
                        Some(v) => (None, Some(v.value)),
                        None => (None, None),
                    };
                    if spec.notify_on_expire
                        && let Some(last) = expired
                    {
                        notices.push((Arc::clone(&spec.name), statefun_sdk::Expired::message(spec, last)));
                    }
                    values.push(live);
                }
                Err(error) => {
                    let failure = Failure::of_batch(FailureKind::StateRead {
                        name: Arc::clone(&spec.name),
                        error,
                    });
                    self.ready.push_back(Completion {
                        address,
                        batch,
                        expired: Vec::new(),
                        notify: f.has_notify,
                        outcome: Outcome::Failed(failure),
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
        let flags = FunctionFlags {
            after_call: f.has_after_call,
            notify: f.has_notify,
        };
        let mut fut = invoke_batch(f.function, ctx, address, batch, notices, flags).boxed();
        match fut.as_mut().now_or_never() {
            Some(c) => self.ready.push_back(c),
            None => self.in_flight.push(fut),
        }
    }

    fn on_complete(&mut self, c: Completion) {
        match c.outcome {
            Outcome::Done(effects, touched) => {
                let done = Done {
                    effects,
                    touched,
                    expired: c.expired,
                    notify: c.notify,
                };
                self.on_success(c.address, c.batch, done)
            }
            Outcome::Failed(failure) => self.on_failure(c.address, c.batch, failure),
            Outcome::MissingStates { specs, carried } => {
                match self.functions.register_states(c.address.type_name(), specs, carried) {
                    // Not a failed attempt: the same batch again, with the new values loaded.
                    Ok(()) => self.start(c.address, c.batch),
                    Err(error) => self.on_failure(c.address, c.batch, Failure::of_batch(FailureKind::Handshake(error))),
                }
            }
        }
    }

    /// The one place effects are applied: the batch's [`plan`] is written in one atomic
    /// batch first (state changes and, in durable mode, the deletion of the processed
    /// messages from the inbox, the outgoing messages into their receivers' inboxes,
    /// timers and cancellations, and egress records into the egress log). Only when
    /// that write succeeded are its actions taken: messages routed, timers scheduled,
    /// egress records handed to their sinks. If it fails, nothing is applied and the
    /// batch is retried.
    fn on_success(&mut self, address: Address, batch: Vec<Envelope>, done: Done) {
        let n = batch.len();
        // Borrowed, not cloned: `Shared` is one `Arc` for every partition, and a clone
        // per batch would bounce its count between the cores.
        let shared = &*self.shared;
        let timers = &self.timers;
        let now_ms = || shared.clock.now_ms();
        let partition_of = |a: &Address| shared.partition_of(a);
        let timer_key = |a: &Address, t: &str| timers.durable_key(a, t);
        let has_sink = |e: &statefun_sdk::TypeName| shared.egresses.contains_key(e);
        let mut cx = PlanContext {
            function: self
                .functions
                .get(address.type_name())
                .expect("an in-flight function is registered"),
            effects: EffectsContext {
                now_ms: &now_ms,
                partition_of: &partition_of,
                timer_key: &timer_key,
                admission: &*shared.backend,
                has_sink: &has_sink,
                run_id: shared.run_id,
            },
            log: self.durable.as_mut(),
        };
        let planned = plan(&mut cx, &address, &batch, done);
        let plan = match planned {
            Ok(plan) => plan,
            Err(failure) => return self.on_failure(address, batch, failure),
        };
        if !plan.write.is_empty()
            && let Err(e) = self.store.write(plan.write)
        {
            if let Some(log) = &mut self.durable {
                log.deferred.extend(plan.deferred);
            }
            return self.on_failure(address, batch, Failure::of_batch(FailureKind::StateWrite(e)));
        }
        let routes = plan.actions.iter().filter(|a| matches!(a, Action::Route(_))).count();
        let mut counted = false;
        for action in plan.actions {
            match action {
                Action::DeadLetter { letter, committed } => {
                    self.stats.dead_letters += 1;
                    if !committed {
                        self.shared.dead_letter(letter);
                    }
                }
                Action::Route(env) => {
                    if !counted {
                        self.shared.begin(routes);
                        counted = true;
                    }
                    self.route(env);
                }
                Action::Schedule {
                    delay,
                    sender,
                    token,
                    envelope,
                    key,
                } => self
                    .timers
                    .schedule_delayed(deadline_after(delay), sender, token, envelope, key),
                Action::Cancel { sender, token } => {
                    self.timers.cancel(&sender, &token);
                }
                Action::HandOver { key, record } => self.hand_over(key, record),
            }
        }
        self.stats.invocations += n as u64;
        self.invocations_counter.increment(n as u64);
        self.mailboxes.finished(n);
        self.shared.finish(n);
        self.next(address);
    }

    /// Hands an egress record to its sink. In durable mode `key` is its entry in the
    /// egress log, deleted once the sink took it (or once it is dead-lettered).
    fn hand_over(&mut self, key: Option<LogKey>, mut record: EgressRecord) {
        if let Some(key @ LogKey::Egress { seq }) = key {
            // Recovered records keep the id of the run that produced them.
            record.id.get_or_insert(EgressId {
                run: self.shared.run_id,
                partition: self.id,
                seq,
            });
            self.defer(LogOp::delete(self.id, key));
        }
        let reason = match self.shared.egresses.get(&record.egress) {
            None => DeadLetterReason::UnknownEgress(record.egress.clone()),
            Some(sink) => {
                let (egress, source, message) = (record.egress.clone(), record.source.clone(), record.message.clone());
                match sink.send(record) {
                    Ok(()) => return,
                    Err(err) => {
                        record = EgressRecord {
                            egress: egress.clone(),
                            source,
                            message,
                            id: None,
                        };
                        DeadLetterReason::EgressFailed {
                            egress,
                            error: err.to_string(),
                        }
                    }
                }
            }
        };
        self.stats.dead_letters += 1;
        self.shared.dead_letter(DeadLetter {
            reason,
            target: None,
            caller: Some(record.source),
            message: Some(record.message),
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
        match self.mailboxes.next(&address) {
            Next::Gone | Next::Idle => {}
            Next::Start(batch) => self.start(address, batch),
            Next::FailedBehindPrefix(error) => {
                // The prefix re-ran; the message that failed behind it is the head now
                // and has used one attempt.
                if self.shared.config.retry.max_attempts <= 1 {
                    return self.park(address, error, 1);
                }
                let due = deadline_after(self.shared.config.retry.backoff(1));
                self.timers.schedule_retry(due, address);
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        let mut fired = Vec::new();
        let mut wb = WriteBatch::default();
        while let Some(t) = self.timers.pop_due(now) {
            match t {
                Timer::Delayed {
                    sender,
                    token,
                    mut envelope,
                    durable,
                } => {
                    if let (Some(key), Some(log)) = (durable, &mut self.durable) {
                        // Move it from the timer log into the receiver's inbox, atomically.
                        wb.log.push(LogOp::delete(self.id, key));
                        let inbox = LogKey::Inbox {
                            sender: self.id,
                            seq: log.next_seq(),
                        };
                        wb.log.push(LogOp::put(
                            self.shared.partition_of(&envelope.target),
                            inbox,
                            entries::encode_envelope(&envelope),
                        ));
                        envelope.inbox = Some(inbox);
                    }
                    fired.push((sender, token, envelope, durable));
                }
                Timer::Retry { address } => {
                    if let Some(head) = self.mailboxes.take_head(&address) {
                        self.start(address, vec![head]);
                    }
                }
                Timer::AcceptRetry => {
                    self.accept_blocked = false;
                    self.flush_accepting();
                }
            }
        }
        if !wb.is_empty()
            && let Err(e) = self.store.write(wb)
        {
            tracing::error!(partition = %self.id, error = %e, "cannot fire delayed messages; retrying");
            let due = deadline_after(self.shared.config.retry.backoff(1));
            for (sender, token, mut envelope, durable) in fired {
                envelope.inbox = None;
                self.timers.schedule_delayed(due, sender, token, *envelope, durable);
            }
            return;
        }
        self.shared.begin(fired.len());
        for (_, _, envelope, _) in fired {
            self.route(*envelope);
        }
    }
}
