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
use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use statefun_sdk::{
    Address, BatchError, Context, DelayedEffect, Effects, EgressMessage, Expiration, Invocation, StateSpec,
    StatefulFunction, TypeName, TypedValue,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::envelope::Envelope;
use crate::errors::QueryError;
use crate::metrics;
use crate::partitioner::PartitionId;
use crate::records::{DEAD_LETTERS, DeadLetter, DeadLetterReason, EgressId, EgressRecord};
use crate::shared::{Control, Inbound, Shared};
use crate::state::entries::{self, StoredTimer};
use crate::state::{self, LogKey, LogKind, LogOp, PartitionStore, StoredValue, WriteBatch, WriteOp};
use crate::stats::PartitionStats;
use crate::timers::{Timer, Timers};

/// How many queued items one loop turn takes from a channel before looking elsewhere.
const BUDGET: usize = 256;

/// Longest single sleep of the partition loop while waiting for a timer.
const MAX_SLEEP: std::time::Duration = std::time::Duration::from_secs(3600);

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
    /// Any declared state asks for an expiry notice.
    has_notify: bool,
}

impl LocalFunction {
    fn new(states: Arc<[StateSpec]>, function: Arc<Arc<dyn StatefulFunction>>) -> LocalFunction {
        LocalFunction {
            has_after_call: states.iter().any(|s| matches!(s.expiration, Expiration::AfterCall(_))),
            has_expiry: states.iter().any(|s| s.expiration != Expiration::None),
            has_notify: states.iter().any(|s| s.notify_on_expire),
            states,
            function,
        }
    }
}

/// How often a partition whose backend refused input asks again.
const INPUT_RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

/// Most states one function type may register through the handshake (a bound against a
/// function that keeps asking for new names).
const MAX_STATES_PER_FUNCTION: usize = 1024;

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
    /// Expired values whose notice this batch delivered: deleted in its commit unless
    /// the function wrote them again.
    expired: Vec<Arc<str>>,
    /// The function declares state with expiry notices.
    notify: bool,
    outcome: Outcome,
}

enum Outcome {
    Done(Effects, Touched),
    Failed(Failure),
    /// The function asked for states its type had not registered (the handshake) when
    /// the batch started with the first `carried` registered states.
    MissingStates {
        specs: Vec<StateSpec>,
        carried: usize,
    },
}

pub(crate) struct Partition {
    id: PartitionId,
    shared: Arc<Shared>,
    store: Box<dyn PartitionStore>,
    functions: HashMap<TypeName, LocalFunction, ahash::RandomState>,
    /// Functions serving a whole namespace: a type of it gets its own entry in
    /// `functions` (with its own registered states) on its first message.
    namespace_functions: HashMap<String, LocalFunction, ahash::RandomState>,
    mailboxes: HashMap<Address, Mailbox, ahash::RandomState>,
    parked: HashMap<Address, String, ahash::RandomState>,
    /// Addresses with `max_queued_per_address` or more messages queued behind their
    /// batch in flight: while any exists, the partition takes no ingress.
    backlogged: HashSet<Address, ahash::RandomState>,
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
    /// Durable mode (see `docs/architecture.md`, "Exactly-once across crashes"): every
    /// accepted message, pending timer and produced egress record is in the store's
    /// logs, written in the same batch as the state changes that produced it.
    durable: bool,
    /// Next log sequence number: `incarnation << 40 | counter`, so entries written after
    /// a restart sort after (and never collide with) older ones.
    seq: u64,
    /// Progress stored per ingress source (loaded on first use).
    progress: HashMap<Arc<str>, Option<u64>, ahash::RandomState>,
    /// Ingress messages taken this loop turn, written to the inbox together before they
    /// are dispatched (durable mode).
    accepting: Vec<Envelope>,
    /// The inbox write failed: no more ingress is taken until the retry timer fires.
    accept_blocked: bool,
    /// Consecutive failed inbox writes (for the backoff).
    accept_failures: u32,
    /// Log deletions that may wait for the next write: handed-over egress records,
    /// dead-lettered inbox messages.
    deferred: Vec<LogOp>,
    recovered: Vec<Envelope>,
    recovered_timers: Vec<(LogKey, StoredTimer)>,
    recovered_egress: Vec<(LogKey, EgressRecord)>,
}

/// Invokes the function with one message, turning an error or a panic into its text.
async fn invoke_one(
    function: &Arc<dyn StatefulFunction>,
    ctx: &mut Context,
    message: TypedValue,
) -> Result<(), String> {
    match AssertUnwindSafe(function.invoke(ctx, message)).catch_unwind().await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(statefun_sdk::error_chain(&*e)),
        Err(p) => Err(statefun_sdk::panic_message(&*p)),
    }
}

/// What `Partition::log_effects` put in a commit's batch, for after the write.
#[derive(Default)]
struct Logged {
    /// The deferred deletions it took: put back if the write fails.
    deferred: Vec<LogOp>,
    /// Durable key of each delayed send, in order.
    timer_keys: Vec<Option<LogKey>>,
    /// Durable key of each egress record, in order (`None` for an unknown egress).
    egress_keys: Vec<Option<LogKey>>,
}

/// What a batch needs to know of its function's state declarations.
#[derive(Debug, Clone, Copy)]
struct FunctionFlags {
    /// Some state expires after call: refresh it after the batch.
    after_call: bool,
    /// Some state asks for expiry notices.
    notify: bool,
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

/// True for the timer message that triggers an expiry check (see `Partition::start`).
fn is_expiry_trigger(address: &Address, env: &Envelope) -> bool {
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
                error: statefun_sdk::error_chain(&*error),
            })),
            Ok(Err(BatchError::MissingStates(specs))) => Some(Outcome::MissingStates {
                specs,
                carried: ctx.storage_ref().specs().len(),
            }),
            Ok(Err(e)) => Some(Outcome::Failed(Failure {
                index: 0,
                error: statefun_sdk::error_chain(&e),
            })),
            Err(p) => Some(Outcome::Failed(Failure {
                index: 0,
                error: statefun_sdk::panic_message(&*p),
            })),
        };
    }
    None
}

/// Runs one batch of messages for one address against one context: first the expiry
/// notices `start` found due, one by one, then the batch's messages through the
/// function's batch hook, or one by one for a function that does not take batches
/// (expiry triggers left out; only a function with `notify_on_expire` state has them).
async fn invoke_batch(
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
        if let Err(error) = invoke_one(&function, &mut ctx, notice).await {
            // A failing notice fails the batch from its start; notices are found again
            // when it is retried.
            outcome = Some(Outcome::Failed(Failure { index: 0, error }));
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
            if let Err(error) = invoke_one(&function, &mut ctx, env.message.clone()).await {
                outcome = Some(Outcome::Failed(Failure { index, error }));
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
        // Fresh copies, names included, so refcounts stay partition-local.
        let local = |f: &statefun_sdk::RegisteredFunction| {
            let states: Arc<[StateSpec]> = f
                .states()
                .iter()
                .map(|s| StateSpec {
                    name: Arc::from(&*s.name),
                    ..s.clone()
                })
                .collect();
            LocalFunction::new(states, Arc::new(Arc::clone(f.function())))
        };
        let functions = shared
            .module
            .types()
            .map(|t| {
                (
                    t.clone(),
                    local(shared.module.get(t).expect("listed type is registered")),
                )
            })
            .collect();
        let namespace_functions = shared
            .module
            .namespaces()
            .map(|(n, f)| (n.to_owned(), local(f)))
            .collect();
        let durable = shared.backend.durable();
        let seq = shared.incarnation << 40;
        Partition {
            id,
            shared,
            store,
            functions,
            namespace_functions,
            mailboxes: HashMap::default(),
            parked: HashMap::default(),
            backlogged: HashSet::default(),
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
            durable,
            seq,
            progress: HashMap::default(),
            accepting: Vec::new(),
            accept_blocked: false,
            accept_failures: 0,
            deferred: Vec::new(),
            recovered: Vec::new(),
            recovered_timers: Vec::new(),
            recovered_egress: Vec::new(),
        }
    }

    /// Reads what a durable store holds from before a restart: unprocessed inbox
    /// messages, pending timers, egress records not yet handed over. Returns how many
    /// messages it recovered (the caller counts them as outstanding). A log entry that
    /// does not decode is an error: the runtime refuses to start rather than drop it.
    pub(crate) fn recover(&mut self) -> Result<usize, state::Error> {
        if !self.durable {
            return Ok(0);
        }
        let corrupt = |what: &str, key: &LogKey, e: String| {
            state::Error::Permanent(format!(
                "partition {}: {what} {key:?} does not decode ({e}); restore a checkpoint \
                 (see docs/operations.md)",
                self.id
            ))
        };
        for (key, bytes) in self.store.log(LogKind::Inbox)? {
            let mut env = entries::decode_envelope(&bytes).map_err(|e| corrupt("inbox message", &key, e))?;
            env.inbox = Some(key);
            self.recovered.push(env);
        }
        for (key, bytes) in self.store.log(LogKind::Timers)? {
            let t = entries::decode_timer(&bytes).map_err(|e| corrupt("timer", &key, e))?;
            self.recovered_timers.push((key, t));
        }
        for (key, bytes) in self.store.log(LogKind::Egress)? {
            let (mut r, run) = entries::decode_egress(&bytes).map_err(|e| corrupt("egress record", &key, e))?;
            if let LogKey::Egress { seq } = key {
                r.id = Some(EgressId {
                    run,
                    partition: self.id,
                    seq,
                });
            }
            self.recovered_egress.push((key, r));
        }
        if !self.recovered.is_empty() || !self.recovered_timers.is_empty() || !self.recovered_egress.is_empty() {
            tracing::info!(
                partition = %self.id,
                messages = self.recovered.len(),
                timers = self.recovered_timers.len(),
                egress = self.recovered_egress.len(),
                "recovered from the durable logs"
            );
        }
        Ok(self.recovered.len())
    }

    /// Puts recovered work back in motion (first thing in `run`): timers are scheduled
    /// again (overdue ones fire at once), egress records are handed to their sinks, and
    /// inbox messages are dispatched before any new input, in inbox order (per sender,
    /// in sequence order).
    fn resume(&mut self) {
        let now_ms = self.shared.clock.now_ms();
        for (key, t) in std::mem::take(&mut self.recovered_timers) {
            let due_ms = match key {
                LogKey::Timer { due_ms, .. } => due_ms,
                _ => now_ms,
            };
            let delay = std::time::Duration::from_millis(due_ms.saturating_sub(now_ms));
            self.timers
                .schedule_delayed(deadline_after(delay), t.sender, t.token, t.envelope, Some(key));
        }
        for (key, record) in std::mem::take(&mut self.recovered_egress) {
            self.hand_over(Some(key), record);
        }
        for env in std::mem::take(&mut self.recovered) {
            self.enqueue(env);
        }
    }

    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq += 1;
        s
    }

    /// Takes an ingress message: dispatched at once with a volatile backend; in durable
    /// mode collected and written to the inbox by `flush_accepting`.
    fn accept(&mut self, mut env: Envelope) {
        if self.durable {
            // Fanned out by `flush_accepting`, in the write that accepts the record.
            self.accepting.push(env);
        } else {
            for extra in fan_out(&mut env) {
                self.shared.begin(1);
                self.route(extra);
            }
            self.enqueue(env);
        }
    }

    fn stored_progress(&mut self, source: &Arc<str>) -> Result<Option<u64>, state::Error> {
        if let Some(p) = self.progress.get(source) {
            return Ok(*p);
        }
        let p = self.store.progress(source)?;
        self.progress.insert(Arc::clone(source), p);
        Ok(p)
    }

    /// Writes the ingress messages taken this turn into the inbox, with the source
    /// positions they advance, in one batch; then dispatches them. Records at or below
    /// a position already stored were accepted before a restart: they are skipped.
    fn flush_accepting(&mut self) {
        if self.accepting.is_empty() || self.accept_blocked {
            return;
        }
        // Load the stored progress of every source first, so that nothing below can
        // fail half-way through the records.
        for i in 0..self.accepting.len() {
            if let Some((source, _)) = &self.accepting[i].position
                && !self.progress.contains_key(source)
            {
                let source = Arc::clone(source);
                if let Err(e) = self.stored_progress(&source) {
                    return self.accept_failed(Vec::new(), e);
                }
            }
        }
        let taken = std::mem::take(&mut self.accepting);
        let mut wb = WriteBatch::default();
        let mut advanced: Vec<(Arc<str>, u64)> = Vec::new();
        let mut keep = Vec::with_capacity(taken.len());
        // Records whose dead letter is in this write (backends that take dead letters).
        let mut lettered = Vec::new();
        let mut skipped = 0;
        let mut work: VecDeque<Envelope> = taken.into();
        while let Some(mut env) = work.pop_front() {
            if let Some((source, offset)) = &env.position {
                let stored = match advanced.iter().rev().find(|(s, _)| s == source) {
                    Some((_, o)) => Some(*o),
                    None => self.progress.get(source).copied().flatten(),
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
            let dispatchable =
                (receiver != self.id || !self.parked.contains_key(&env.target)) && self.resolve(env.target.type_name());
            if dispatchable {
                let key = LogKey::Inbox {
                    sender: self.id,
                    seq: self.next_seq(),
                };
                wb.log.push(LogOp::put(receiver, key, entries::encode_envelope(&env)));
                env.inbox = Some(key);
            } else if let Some(op) = self.dead_letter_op(&self.undeliverable(&env)) {
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
        let deferred = std::mem::take(&mut self.deferred);
        wb.log.extend(deferred.iter().cloned());
        if !wb.is_empty()
            && let Err(e) = self.store.write(wb)
        {
            self.deferred = deferred;
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
            self.progress.insert(source, Some(offset));
        }
        for env in keep {
            if env.inbox.is_some() {
                self.route(env);
            } else {
                self.enqueue(env);
            }
        }
    }

    fn accept_failed(&mut self, mut keep: Vec<Envelope>, e: state::Error) {
        self.accept_failures = self.accept_failures.saturating_add(1);
        tracing::error!(
            partition = %self.id,
            attempt = self.accept_failures,
            error = %e,
            "cannot write the inbox; this partition takes no input until it can, retrying"
        );
        keep.append(&mut self.accepting);
        self.accepting = keep;
        self.accept_blocked = true;
        let due = deadline_after(self.shared.config.retry.backoff(self.accept_failures));
        self.timers.schedule_accept_retry(due);
    }

    /// Writes the deferred log deletions now (when the partition is about to wait).
    fn flush_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let wb = WriteBatch {
            log: std::mem::take(&mut self.deferred),
            ..Default::default()
        };
        let log = wb.log.clone();
        if let Err(e) = self.store.write(wb) {
            tracing::warn!(partition = %self.id, error = %e, "cannot write log deletions; will retry");
            self.deferred = log;
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
                    || self.buffered + self.accepting.len() >= max_buffered
                    || !self.backlogged.is_empty()
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
            self.flush_deferred();
            let deadline = self.timers.next_deadline();
            let take_ingress =
                ingress_open && !self.accept_blocked && self.buffered < max_buffered && self.backlogged.is_empty();
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
        self.flush_deferred();
        if self.timers.pending_delayed() > 0 && !self.durable {
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
                // Declared states and those the handshake registered on this partition.
                let declared = self
                    .functions
                    .get(address.type_name())
                    .and_then(|f| f.states.iter().find(|s| *s.name == *name).map(|s| s.name.clone()));
                let Some(name) = declared else {
                    let function = address.type_name().clone();
                    let _ = reply.send(Err(QueryError::Undeclared { function, name }));
                    return;
                };
                let now = self.shared.clock.now_ms();
                let r = self
                    .store
                    .get(&address, &name)
                    .map(|v| v.filter(|v| v.expires_at_ms.is_none_or(|t| t > now)).map(|v| v.value))
                    .map_err(QueryError::from);
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
        if let Some(key) = env.inbox {
            self.deferred.push(LogOp::delete(self.id, key));
        }
        let letter = DeadLetter {
            reason,
            target: Some(env.target),
            caller: env.caller,
            message: Some(env.message),
            record: None,
        };
        // Committed with the deletion above when the backend takes dead letters.
        match self.dead_letter_op(&letter) {
            Some(op) => self.deferred.push(op),
            None => self.shared.dead_letter(letter),
        }
        self.stats.dead_letters += 1;
        self.shared.finish(1);
    }

    /// The log entry that commits `letter` with the partition's next write, when the
    /// backend commits per interval and takes dead letters ([`DEAD_LETTERS`]); `None`
    /// when it goes to the sink.
    fn dead_letter_op(&mut self, letter: &DeadLetter) -> Option<LogOp> {
        if !self.durable || !self.shared.backend.takes_egress(&DEAD_LETTERS) {
            return None;
        }
        let source = letter.target.as_ref().or(letter.caller.as_ref())?.clone();
        let mut record = crate::egress::DeadLetterRecord::of(letter);
        let mut message = TypedValue::of(&record).ok()?;
        let fits = |m: &TypedValue| {
            let bytes = m.bytes().map_or(&[][..], |b| &b[..]);
            self.shared.backend.check_value("dead letter", bytes).is_ok()
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
        let value = entries::encode_egress(&DEAD_LETTERS, &source, &message, self.shared.run_id);
        Some(LogOp::put(self.id, key, value))
    }

    /// The dead letter of an accepted record that cannot be dispatched here: its target
    /// is parked on this partition, or no function serves its type.
    fn undeliverable(&self, env: &Envelope) -> DeadLetter {
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

    /// Accepts a message for an address this partition owns.
    fn enqueue(&mut self, env: Envelope) {
        if let Some(error) = self.parked.get(&env.target) {
            let reason = DeadLetterReason::AddressParked { error: error.clone() };
            return self.dead_letter(env, reason);
        }
        if !self.resolve(env.target.type_name()) {
            let reason = DeadLetterReason::UnknownFunctionType(env.target.type_name().clone());
            return self.dead_letter(env, reason);
        }
        self.buffered += 1;
        match self.mailboxes.entry(env.target.clone()) {
            Entry::Occupied(mut o) => {
                o.get_mut().queue.push_back(env);
                if o.get().queue.len() >= self.shared.config.max_queued_per_address {
                    self.backlogged.insert(o.key().clone());
                }
            }
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
                Err(e) => {
                    let failure = Failure {
                        index: 0,
                        error: format!("cannot read state {:?}: {e}", spec.name),
                    };
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
                self.on_success(c.address, c.batch, effects, touched, c.expired, c.notify)
            }
            Outcome::Failed(failure) => self.on_failure(c.address, c.batch, failure),
            Outcome::MissingStates { specs, carried } => {
                match self.register_states(c.address.type_name(), specs, carried) {
                    // Not a failed attempt: the same batch again, with the new values loaded.
                    Ok(()) => self.start(c.address, c.batch),
                    Err(error) => self.on_failure(c.address, c.batch, Failure { index: 0, error }),
                }
            }
        }
    }

    /// Registers states a function asked for (StateFun's `IncompleteInvocationContext`)
    /// in this partition's copy of its type's declarations. Other partitions learn them
    /// from their own first request. The batch's request carried the first `carried`
    /// registered states: asking for one of those again means the function and the
    /// runtime disagree, which is an error (not a loop). A state registered since the
    /// batch started (by another address's handshake) is already there; so is one asked
    /// for again with another type, which is an error.
    fn register_states(&mut self, function: &TypeName, specs: Vec<StateSpec>, carried: usize) -> Result<(), String> {
        let f = self
            .functions
            .get_mut(function)
            .expect("an in-flight function is registered");
        if specs.is_empty() {
            return Err("the function reported missing states but named none".to_owned());
        }
        if f.states.len() + specs.len() > MAX_STATES_PER_FUNCTION {
            return Err(format!(
                "the function asks for {} more states; at most {MAX_STATES_PER_FUNCTION} are registered per function type",
                specs.len()
            ));
        }
        let mut states = f.states.to_vec();
        for spec in specs {
            if let Some(i) = states.iter().position(|s| s.name == spec.name) {
                let have = &states[i];
                if have.type_name != spec.type_name {
                    return Err(format!(
                        "the function asks for state {:?} as {}, registered as {}",
                        spec.name, spec.type_name, have.type_name
                    ));
                }
                if i < carried {
                    return Err(format!(
                        "the function asks for state {:?}, which the request carried",
                        spec.name
                    ));
                }
                continue;
            }
            tracing::info!(function = %function, state = %spec.name, type_name = %spec.type_name, expiration = ?spec.expiration, "state registered");
            states.push(spec);
        }
        *f = LocalFunction::new(states.into(), Arc::clone(&f.function));
        Ok(())
    }

    /// The one place effects are applied.
    ///
    /// Everything the batch produced is written in one atomic batch first: state
    /// changes and, in durable mode, the deletion of the processed messages from the
    /// inbox, the outgoing messages into their receivers' inboxes, timers and
    /// cancellations, and egress records into the egress log. Only when that write
    /// succeeded are the messages routed, timers scheduled and egress records handed to
    /// their sinks. If it fails, nothing is applied and the batch is retried.
    fn on_success(
        &mut self,
        address: Address,
        batch: Vec<Envelope>,
        effects: Effects,
        touched: Vec<(Arc<str>, Bytes)>,
        expired: Vec<Arc<str>>,
        notify: bool,
    ) {
        let n = batch.len();
        let Effects {
            state: mutations,
            outgoing,
            mut delayed,
            mut egress,
        } = effects;
        if notify {
            self.expiry_notices(&address, &mutations, &touched, &mut delayed);
        }
        // A value or message the backend cannot store (e.g. larger than a Kafka
        // changelog record may be) fails the invocation, not every later commit.
        if self.durable {
            let backend = &self.shared.backend;
            let check = |what: &dyn Fn() -> String, name: &str, bytes: Option<&Bytes>| {
                let bytes = bytes.map_or(&[][..], |b| &b[..]);
                backend
                    .check_value(name, bytes)
                    .err()
                    .map(|e| format!("{}: {e}", what()))
            };
            let too_big = mutations
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
            if let Some(error) = too_big {
                return self.on_failure(address, batch, Failure { index: 0, error });
            }
        }
        // Records a committing backend would refuse (e.g. a Kafka record naming a topic
        // that is not configured) are dead-lettered after the write, not committed.
        let mut refused = Vec::new();
        if self.durable {
            let backend = &self.shared.backend;
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
            let f = &self.functions[address.type_name()];
            let now = if f.has_expiry { self.shared.clock.now_ms() } else { 0 };
            let states = &f.states;
            let spec = |name: &str| states.iter().find(|s| &*s.name == name);
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
        if !refused.is_empty() {
            let ops: Vec<LogOp> = refused.iter().filter_map(|l| self.dead_letter_op(l)).collect();
            letters_committed = ops.len() == refused.len();
            if letters_committed {
                wb.log.extend(ops);
            }
        }
        let Logged {
            deferred,
            timer_keys,
            egress_keys,
        } = if self.durable {
            self.log_effects(&address, &batch, &mut out, &delayed, &egress, &mut wb)
        } else {
            Logged::default()
        };
        if !wb.is_empty()
            && let Err(e) = self.store.write(wb)
        {
            self.deferred.extend(deferred);
            let failure = Failure {
                index: 0,
                error: format!("cannot write state: {e}"),
            };
            return self.on_failure(address, batch, failure);
        }
        for letter in refused {
            self.stats.dead_letters += 1;
            if !letters_committed {
                self.shared.dead_letter(letter);
            }
        }
        // 2. Messages to functions.
        self.shared.begin(out.len());
        for env in out {
            self.route(env);
        }
        // 3. Delayed messages and cancellations, in order.
        let mut timer_keys = timer_keys.into_iter();
        for d in delayed {
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
                        inbox: None,
                        position: None,
                        also: Vec::new(),
                    };
                    let key = timer_keys.next().flatten();
                    self.timers
                        .schedule_delayed(deadline_after(delay), address.clone(), token, env, key);
                }
                DelayedEffect::Cancel { token } => {
                    self.timers.cancel(&address, &token);
                }
            }
        }
        // 4. Egress.
        let mut egress_keys = egress_keys.into_iter();
        for e in egress {
            let key = egress_keys.next().flatten();
            if self.durable && self.shared.backend.takes_egress(&e.egress) {
                continue; // committed by the backend with this batch's write
            }
            let record = EgressRecord {
                egress: e.egress,
                source: address.clone(),
                message: e.message,
                id: None,
            };
            self.hand_over(key, record);
        }
        self.stats.invocations += n as u64;
        self.invocations_counter.increment(n as u64);
        self.buffered -= n;
        self.shared.finish(n);
        self.next(address);
    }

    /// Expiry notices (see `statefun_sdk::expiry`): a delayed message to self per
    /// written or refreshed value whose spec asks for one, due when the value expires,
    /// under the value's reserved token (so it replaces the previous notice); a delete
    /// cancels it. Appended after the function's own delayed effects.
    fn expiry_notices(
        &self,
        address: &Address,
        mutations: &[statefun_sdk::StateMutation],
        touched: &[(Arc<str>, Bytes)],
        delayed: &mut Vec<DelayedEffect>,
    ) {
        let states = &self.functions[address.type_name()].states;
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

    /// Durable mode: adds to `wb` the log entries of a completed batch (inbox deletes of
    /// the processed messages, inbox puts of the outgoing ones, timers, egress records
    /// and the deferred deletions). Returns the keys it gave the timers and egress
    /// records, and the deferred deletions it took (to put back if the write fails).
    fn log_effects(
        &mut self,
        address: &Address,
        batch: &[Envelope],
        out: &mut [Envelope],
        delayed: &[DelayedEffect],
        egress: &[EgressMessage],
        wb: &mut WriteBatch,
    ) -> Logged {
        let mut logged = Logged::default();
        for env in batch {
            if let Some(key) = env.inbox {
                wb.log.push(LogOp::delete(self.id, key));
            }
        }
        for env in out.iter_mut() {
            let receiver = self.shared.partition_of(&env.target);
            let key = LogKey::Inbox {
                sender: self.id,
                seq: self.next_seq(),
            };
            wb.log.push(LogOp::put(receiver, key, entries::encode_envelope(env)));
            env.inbox = Some(key);
        }
        if !delayed.is_empty() {
            let now_ms = self.shared.clock.now_ms();
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
                        None => self.timers.durable_key(address, t),
                    };
                    if let Some(k) = old {
                        wb.log.push(LogOp::delete(self.id, k));
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
                            self.id,
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
                if self.shared.backend.takes_egress(&e.egress) {
                    // Committed by the backend with this write: no log entry to encode.
                    wb.egress.push(EgressRecord {
                        egress: e.egress.clone(),
                        source: address.clone(),
                        message: e.message.clone(),
                        id: Some(EgressId {
                            run: self.shared.run_id,
                            partition: self.id,
                            seq: self.next_seq(),
                        }),
                    });
                    keys.push(None);
                } else if self.shared.egresses.contains_key(&e.egress) {
                    let key = LogKey::Egress { seq: self.next_seq() };
                    wb.log.push(LogOp::put(
                        self.id,
                        key,
                        entries::encode_egress(&e.egress, address, &e.message, self.shared.run_id),
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
            self.deferred.push(LogOp::delete(self.id, key));
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
        self.note_backlog(&address);
        self.start(address, batch);
    }

    /// Whether a function serves type `t`: its own, or its namespace's (which then gets
    /// an entry for `t` on this partition, with `t`'s own registered states).
    fn resolve(&mut self, t: &TypeName) -> bool {
        if self.functions.contains_key(t) {
            return true;
        }
        let Some(f) = self.namespace_functions.get(t.namespace()) else {
            return false;
        };
        let f = f.clone();
        self.functions.insert(t.clone(), f);
        true
    }

    /// Keeps `backlogged` in step with `address`'s queue after messages left it.
    fn note_backlog(&mut self, address: &Address) {
        // The common case, on every batch: nothing is backlogged, no lookups.
        if self.backlogged.is_empty() {
            return;
        }
        let queued = self.mailboxes.get(address).map_or(0, |mb| mb.queue.len());
        if queued < self.shared.config.max_queued_per_address {
            self.backlogged.remove(address);
        }
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
        if mb.queue.len() >= self.shared.config.max_queued_per_address {
            self.backlogged.insert(address.clone());
        }
        if failure.index > 0 {
            // The messages before the failing one succeeded; their effects were discarded
            // with the batch's, so run them again now. The failing one becomes the head,
            // with this failure counted (see `next`).
            let prefix: Vec<Envelope> = mb.queue.drain(..failure.index).collect();
            mb.failed_behind_prefix = Some(failure.error);
            self.note_backlog(&address);
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
        self.backlogged.remove(&address);
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
                    if let Some(key) = durable {
                        // Move it from the timer log into the receiver's inbox, atomically.
                        wb.log.push(LogOp::delete(self.id, key));
                        let inbox = LogKey::Inbox {
                            sender: self.id,
                            seq: self.next_seq(),
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
                    let Some(mb) = self.mailboxes.get_mut(&address) else {
                        continue;
                    };
                    let Some(head) = mb.queue.pop_front() else {
                        continue;
                    };
                    self.note_backlog(&address);
                    self.start(address, vec![head]);
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
