//! Ingress: how records from the outside world become messages to functions.
//!
//! Why it exists: every source (an in-memory channel, a fixed list, later Kafka) yields
//! the same [`IngressRecord`] (key, value, headers, timestamp, source position), and a
//! [`Router`] turns a record into a target [`Address`] and a [`TypedValue`], as
//! StateFun's routers do. The source hands records to its [`IngressSink`], which routes
//! them and waits for room in the owning partition's bounded queue: a slow partition
//! slows its sources down instead of growing memory. A record no router accepts, or one
//! for an unknown function type, goes to the dead-letter sink; the source keeps going.

use std::sync::Arc;

use statefun_sdk::{Address, TypeName, TypedValue};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::envelope::Envelope;
pub use crate::records::{Closed, IngressRecord, RouteError, Routed, SourcePosition};
use crate::records::{DeadLetter, DeadLetterReason};
use crate::shared::{Shared, SubmitError};

/// Decodes a message the runtime sent to a partition that runs on another instance
/// ([`CommitUnit::messages`](crate::state::CommitUnit::messages), cluster mode): its
/// target, caller and message.
pub fn decode_message(bytes: &[u8]) -> Result<Routed, RouteError> {
    let env = crate::state::codec::entries::decode_envelope(bytes)
        .map_err(|e| RouteError(format!("not a runtime message: {e}")))?;
    Ok(Routed {
        target: env.target,
        message: env.message,
        caller: env.caller,
        also: Vec::new(),
    })
}

/// Routes the records of a runtime's internal topic (cluster mode): each value is a
/// message one function sent to another ([`decode_message`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageRouter;

impl Router for MessageRouter {
    fn route(&self, record: &IngressRecord) -> Result<Routed, RouteError> {
        let value = record
            .value
            .as_ref()
            .ok_or_else(|| RouteError("record has no value".into()))?;
        decode_message(value)
    }
}

/// Turns a record into a target address and a message.
pub trait Router: Send + Sync + 'static {
    /// Routes one record.
    fn route(&self, record: &IngressRecord) -> Result<Routed, RouteError>;
}

impl<F> Router for F
where
    F: Fn(&IngressRecord) -> Result<Routed, RouteError> + Send + Sync + 'static,
{
    fn route(&self, record: &IngressRecord) -> Result<Routed, RouteError> {
        self(record)
    }
}

/// StateFun's default routing: the record key (UTF-8) is the function id, the value is
/// the message bytes under a fixed type name.
#[derive(Debug, Clone)]
pub struct KeyRouter {
    target: TypeName,
    /// More function types that get every record too.
    also: Vec<TypeName>,
    value_type: TypeName,
}

impl KeyRouter {
    /// Routes to functions of type `target`; values are typed `value_type`.
    pub fn new(target: TypeName, value_type: TypeName) -> KeyRouter {
        KeyRouter {
            target,
            also: Vec::new(),
            value_type,
        }
    }

    /// Routes each record to the function of every type in `targets` with the same id
    /// (StateFun's ingress topic with several targets); `None` when `targets` is empty.
    pub fn to_all(targets: Vec<TypeName>, value_type: TypeName) -> Option<KeyRouter> {
        let mut targets = targets.into_iter();
        Some(KeyRouter {
            target: targets.next()?,
            also: targets.collect(),
            value_type,
        })
    }
}

impl Router for KeyRouter {
    fn route(&self, record: &IngressRecord) -> Result<Routed, RouteError> {
        let key = record
            .key
            .as_ref()
            .ok_or_else(|| RouteError("record has no key".into()))?;
        let id = std::str::from_utf8(key).map_err(|_| RouteError("record key is not UTF-8".into()))?;
        let target = Address::new(self.target.clone(), id).map_err(|e| RouteError(e.to_string()))?;
        let value = record
            .value
            .clone()
            .ok_or_else(|| RouteError("record has no value".into()))?;
        let mut routed = Routed::new(target, TypedValue::from_bytes(self.value_type.clone(), value));
        for t in &self.also {
            routed
                .also
                .push(Address::new(t.clone(), id).map_err(|e| RouteError(e.to_string()))?);
        }
        Ok(routed)
    }
}

/// Why an ingress stopped with an error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The external source failed (broker gone, file unreadable, ...).
    #[error("ingress {ingress} source failed: {reason}")]
    Source {
        /// The ingress name.
        ingress: String,
        /// What happened.
        reason: String,
    },
}

/// Hands routed records to the partitions. Cheap to clone.
#[derive(Clone)]
pub struct IngressSink {
    name: Arc<str>,
    router: Arc<dyn Router>,
    shared: Arc<Shared>,
    delivered: Arc<std::sync::Mutex<std::collections::HashMap<Arc<str>, Delivered>>>,
    /// The progress name of each source partition seen ([`source_name`]), made once.
    names: Arc<std::sync::Mutex<SourceNames>>,
}

/// The progress name of each (topic, source partition).
type SourceNames = std::collections::HashMap<(Arc<str>, i32), Arc<str>>;

/// What this run delivered from one source partition.
#[derive(Debug, Default)]
struct Delivered {
    /// Highest offset delivered (routed or dead-lettered).
    max: Option<u64>,
    /// Per runtime partition: (first, last) offset sent to it in this run.
    sent: std::collections::HashMap<crate::partitioner::PartitionId, (u64, u64)>,
}

impl std::fmt::Debug for IngressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressSink").field("name", &self.name).finish()
    }
}

impl IngressSink {
    pub(crate) fn new(name: Arc<str>, router: Arc<dyn Router>, shared: Arc<Shared>) -> IngressSink {
        IngressSink {
            name,
            router,
            shared,
            delivered: Default::default(),
            names: Default::default(),
        }
    }

    /// The progress name of `topic`/`partition`, from the cache.
    fn name_of(&self, topic: &Arc<str>, partition: i32) -> Arc<str> {
        let mut names = self.names.lock().expect("names lock");
        if let Some(name) = names.get(&(Arc::clone(topic), partition)) {
            return Arc::clone(name);
        }
        let name: Arc<str> = Arc::from(source_name(topic, partition));
        names.insert((Arc::clone(topic), partition), Arc::clone(&name));
        name
    }

    /// Routes `record` and waits until its partition has room for it. Records that
    /// cannot be routed are dead-lettered (and `Ok` is returned: the source goes on).
    /// `Err(Closed)` means the runtime is stopping; the source should stop too.
    pub async fn deliver(&self, record: IngressRecord) -> Result<(), Closed> {
        let source = record.position.as_ref().and_then(|p| {
            let offset = u64::try_from(p.offset).ok()?;
            Some((self.name_of(&p.topic, p.partition), offset))
        });
        let result = self.route_and_submit(record, source.clone()).await;
        if let (Ok(sent_to), Some((name, offset))) = (&result, source) {
            let mut d = self.delivered.lock().expect("delivered lock");
            let e = d.entry(name).or_default();
            e.max = Some(e.max.map_or(offset, |m| m.max(offset)));
            if let Some(q) = sent_to {
                let slot = e.sent.entry(*q).or_insert((offset, offset));
                slot.1 = offset;
            }
        }
        result.map(|_| ())
    }

    /// The offset of `topic`/`partition` up to which every record this sink delivered
    /// **in this run** is durably accepted by the runtime: what a source with its own
    /// offset store (a Kafka consumer group) may commit. `None` when nothing can be
    /// committed yet. With a volatile backend: the highest offset delivered.
    ///
    /// A runtime partition that was sent records and has not stored progress up to the
    /// last of them may still hold the rest in its queue: the offset stops below the
    /// first of those. Records that were dead-lettered do not hold it back.
    pub fn acknowledged_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, crate::state::Error> {
        let name = source_name(topic, partition);
        let (max, sent) = {
            let d = self.delivered.lock().expect("delivered lock");
            match d.get(name.as_str()) {
                None => return Ok(None),
                Some(e) => (e.max, e.sent.clone()),
            }
        };
        let Some(max) = max else { return Ok(None) };
        if !self.durable() {
            return Ok(i64::try_from(max).ok());
        }
        let mut upto = max;
        for (q, (first, last)) in sent {
            let stored = self.shared.backend.committed_progress(q, &name)?;
            let bound = match stored {
                Some(p) if p >= last => continue,
                Some(p) => p,
                None if first == 0 => return Ok(None),
                None => first - 1,
            };
            upto = upto.min(bound);
        }
        Ok(i64::try_from(upto).ok())
    }

    /// `position`: the record's progress name and offset, if it has a position.
    async fn route_and_submit(
        &self,
        record: IngressRecord,
        position: Option<(Arc<str>, u64)>,
    ) -> Result<Option<crate::partitioner::PartitionId>, Closed> {
        let routed = match self.router.route(&record) {
            Ok(r) => r,
            Err(e) => {
                self.shared.dead_letter(DeadLetter {
                    reason: DeadLetterReason::Unroutable {
                        ingress: self.name.to_string(),
                        error: e.0,
                    },
                    target: None,
                    caller: None,
                    message: None,
                    record: Some(record),
                });
                return Ok(None);
            }
        };
        let acceptor = record
            .position
            .as_ref()
            .map(|p| self.shared.source_acceptor(p.partition));
        let mut env = Envelope {
            target: routed.target,
            caller: routed.caller,
            message: routed.message,
            inbox: None,
            position,
            also: routed.also,
        };
        // A receiver of an unknown type is dead-lettered; the record goes on to the
        // others (the next one takes the record's place).
        while let Some(i) = env
            .also
            .iter()
            .position(|t| self.shared.module.get(t.type_name()).is_none())
        {
            let unknown = env.also.remove(i);
            self.shared.dead_letter(DeadLetter {
                reason: DeadLetterReason::UnknownFunctionType(unknown.type_name().clone()),
                target: Some(unknown),
                caller: None,
                message: Some(env.message.clone()),
                record: Some(record.clone()),
            });
        }
        if self.shared.module.get(env.target.type_name()).is_none() && !env.also.is_empty() {
            self.shared.dead_letter(DeadLetter {
                reason: DeadLetterReason::UnknownFunctionType(env.target.type_name().clone()),
                target: Some(env.target.clone()),
                caller: None,
                message: Some(env.message.clone()),
                record: Some(record.clone()),
            });
            env.target = env.also.remove(0);
        }
        match self.shared.submit(env, acceptor).await {
            Ok(q) => Ok(Some(q)),
            Err(SubmitError::UnknownFunctionType(env)) => {
                self.shared.dead_letter(DeadLetter {
                    reason: DeadLetterReason::UnknownFunctionType(env.target.type_name().clone()),
                    target: Some(env.target),
                    caller: None,
                    message: Some(env.message),
                    record: Some(record),
                });
                Ok(None)
            }
            Err(SubmitError::ShuttingDown) => Err(Closed),
            Err(SubmitError::NotOwned(p)) => {
                self.shared.dead_letter(DeadLetter {
                    reason: DeadLetterReason::Unroutable {
                        ingress: self.name.to_string(),
                        error: format!(
                            "the record's source partition belongs to runtime partition {p}, which does not run on \
                             this instance: a cluster-mode ingress must read only the source partitions of the \
                             runtime partitions it owns"
                        ),
                    },
                    target: None,
                    caller: None,
                    message: None,
                    record: Some(record),
                });
                Ok(None)
            }
        }
    }

    /// Whether the runtime runs in cluster mode
    /// ([`StateBackend::owned_partitions`](crate::state::StateBackend::owned_partitions))
    /// and, if so, whether it owns the runtime partition that accepts the records of
    /// source partition `partition`: only then may a source read that partition.
    pub fn accepts_source_partition(&self, partition: i32) -> bool {
        !self.shared.cluster() || self.shared.owns(self.shared.source_acceptor(partition))
    }
}

/// The name under which a partition stores its progress through one source partition.
pub fn source_name(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

impl IngressSink {
    /// Whether the runtime's state backend is durable (see
    /// [`StateBackend::durable`](crate::state::StateBackend::durable)): only then does
    /// [`IngressSink::committed_offset`] know anything.
    pub fn durable(&self) -> bool {
        self.shared.profile.durable
    }

    /// The offset of `topic`/`partition` up to which every record is durably accepted
    /// by the runtime (in the inbox of its partition, or processed): a replayable source
    /// resumes after it. `None` when nothing is known to be accepted (start from the
    /// beginning), and always `None` for a volatile state backend.
    ///
    /// It is the smallest offset any runtime partition has stored for the source. A
    /// partition that has stored none yet makes it `None`; records at or below a
    /// partition's own stored offset are skipped when replayed, so resuming early never
    /// duplicates. In cluster mode one runtime partition accepts all records of a
    /// source partition, and it is the offset that partition stored.
    pub fn committed_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, crate::state::Error> {
        if !self.shared.profile.durable {
            return Ok(None);
        }
        let source = source_name(topic, partition);
        let acceptors: Vec<crate::partitioner::PartitionId> = if self.shared.cluster() {
            vec![self.shared.source_acceptor(partition)]
        } else {
            (0..self.shared.config.partitions)
                .map(crate::partitioner::PartitionId)
                .collect()
        };
        let mut min: Option<u64> = None;
        for p in acceptors {
            match self.shared.backend.committed_progress(p, &source)? {
                None => return Ok(None),
                Some(v) => min = Some(min.map_or(v, |m| m.min(v))),
            }
        }
        Ok(min.and_then(|v| i64::try_from(v).ok()))
    }
}

/// A source of ingress records.
#[async_trait::async_trait]
pub trait Ingress: Send + 'static {
    /// A name for logs and dead-letter reports.
    fn name(&self) -> &str;

    /// Delivers records to `sink` until the source ends or `shutdown` is cancelled.
    async fn run(self: Box<Self>, sink: IngressSink, shutdown: CancellationToken) -> Result<(), Error>;
}

/// An ingress fed through a channel: keep the [`MemoryIngressSender`] and push records.
/// The ingress ends when every sender is dropped.
#[derive(Debug)]
pub struct MemoryIngress {
    name: String,
    rx: mpsc::Receiver<IngressRecord>,
}

/// Pushes records into a [`MemoryIngress`].
#[derive(Debug, Clone)]
pub struct MemoryIngressSender {
    tx: mpsc::Sender<IngressRecord>,
}

impl MemoryIngressSender {
    /// Sends a record, waiting for room. `Err(Closed)` once the ingress has stopped.
    pub async fn send(&self, record: IngressRecord) -> Result<(), Closed> {
        self.tx.send(record).await.map_err(|_| Closed)
    }
}

impl MemoryIngress {
    /// A channel ingress with room for `capacity` records in its queue.
    pub fn channel(name: impl Into<String>, capacity: usize) -> (MemoryIngress, MemoryIngressSender) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (MemoryIngress { name: name.into(), rx }, MemoryIngressSender { tx })
    }
}

#[async_trait::async_trait]
impl Ingress for MemoryIngress {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(mut self: Box<Self>, sink: IngressSink, shutdown: CancellationToken) -> Result<(), Error> {
        loop {
            let record = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.rx.recv() => r,
            };
            let Some(record) = record else { return Ok(()) };
            if sink.deliver(record).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// An ingress that delivers a fixed list of records, then ends.
#[derive(Debug)]
pub struct VecIngress {
    name: String,
    records: Vec<IngressRecord>,
}

impl VecIngress {
    /// An ingress over `records`.
    pub fn new(name: impl Into<String>, records: Vec<IngressRecord>) -> VecIngress {
        VecIngress {
            name: name.into(),
            records,
        }
    }
}

#[async_trait::async_trait]
impl Ingress for VecIngress {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(self: Box<Self>, sink: IngressSink, shutdown: CancellationToken) -> Result<(), Error> {
        for record in self.records {
            if shutdown.is_cancelled() || sink.deliver(record).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// Makes record `offset` of a [`GeneratorIngress`] from `(seed, offset)`.
pub type Generate = dyn Fn(u64, u64) -> IngressRecord + Send + Sync;

/// A deterministic, replayable source: record number `offset` is `generate(seed,
/// offset)`, a pure function, for `offset` in `0..count`.
///
/// Why it exists: it is the embedded stand-in for a Kafka partition. Because any record
/// can be produced again, a runtime on a durable backend resumes after a crash from the
/// offset it committed ([`IngressSink::committed_offset`]), and the outcome can be
/// compared with a crash-free run of the same seed. Records carry the source position
/// `(name, 0, offset)`.
pub struct GeneratorIngress {
    name: String,
    seed: u64,
    count: u64,
    per_second: Option<u64>,
    generate: Arc<Generate>,
}

impl std::fmt::Debug for GeneratorIngress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratorIngress")
            .field("name", &self.name)
            .field("seed", &self.seed)
            .field("count", &self.count)
            .field("per_second", &self.per_second)
            .finish()
    }
}

impl GeneratorIngress {
    /// A source of `count` records made by `generate(seed, offset)`, as fast as the
    /// runtime takes them.
    pub fn new(
        name: impl Into<String>,
        seed: u64,
        count: u64,
        generate: impl Fn(u64, u64) -> IngressRecord + Send + Sync + 'static,
    ) -> GeneratorIngress {
        GeneratorIngress {
            name: name.into(),
            seed,
            count,
            per_second: None,
            generate: Arc::new(generate),
        }
    }

    /// Paces the source at about `records_per_second` (0 = unpaced).
    pub fn with_rate(mut self, records_per_second: u64) -> GeneratorIngress {
        self.per_second = (records_per_second > 0).then_some(records_per_second);
        self
    }
}

#[async_trait::async_trait]
impl Ingress for GeneratorIngress {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(self: Box<Self>, sink: IngressSink, shutdown: CancellationToken) -> Result<(), Error> {
        // A transient failure to read the committed offset is retried (with backoff,
        // until shutdown); a permanent one stops the source.
        let mut attempt = 0u32;
        let committed = loop {
            match sink.committed_offset(&self.name, 0) {
                Ok(c) => break c,
                Err(crate::state::Error::Transient(e)) => {
                    attempt += 1;
                    tracing::warn!(ingress = %self.name, attempt, error = %e, "cannot read the committed offset; retrying");
                    let wait = std::time::Duration::from_millis(10u64 << attempt.min(10));
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => {
                    return Err(Error::Source {
                        ingress: self.name.clone(),
                        reason: format!("cannot read the committed offset: {e}"),
                    });
                }
            }
        };
        let start = committed.map_or(0, |o| o as u64 + 1);
        if start > 0 {
            tracing::info!(ingress = %self.name, offset = start, "generator resumes after the committed offset");
        }
        let topic: Arc<str> = Arc::from(self.name.as_str());
        let began = tokio::time::Instant::now();
        for offset in start..self.count {
            if shutdown.is_cancelled() {
                break;
            }
            if let Some(rate) = self.per_second {
                let due = began + std::time::Duration::from_secs_f64((offset - start) as f64 / rate as f64);
                if due > tokio::time::Instant::now() + std::time::Duration::from_millis(1) {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep_until(due) => {}
                    }
                }
            }
            let mut record = (self.generate)(self.seed, offset);
            record.position = Some(SourcePosition {
                topic: Arc::clone(&topic),
                partition: 0,
                offset: offset as i64,
            });
            if sink.deliver(record).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const T: TypeName = TypeName::from_static("t/f");
    const V: TypeName = TypeName::from_static("t/v");

    #[test]
    fn key_router_uses_the_key_as_id_and_types_the_value() {
        let r = KeyRouter::new(T, V)
            .route(&IngressRecord::new("abc", "payload"))
            .unwrap();
        assert_eq!(r.target.id(), "abc");
        assert_eq!(r.message.type_name(), &V);
        assert_eq!(r.message.bytes().unwrap(), &Bytes::from_static(b"payload"));
    }

    #[test]
    fn key_router_rejects_missing_empty_and_non_utf8_keys() {
        let r = KeyRouter::new(T, V);
        let mut rec = IngressRecord::new("", "v");
        assert!(r.route(&rec).is_err());
        rec.key = None;
        assert!(r.route(&rec).is_err());
        rec.key = Some(Bytes::from_static(&[0xff, 0xfe]));
        assert!(r.route(&rec).unwrap_err().0.contains("UTF-8"));
        let no_value = IngressRecord {
            key: Some(Bytes::from_static(b"k")),
            ..Default::default()
        };
        assert!(r.route(&no_value).is_err());
    }
}
