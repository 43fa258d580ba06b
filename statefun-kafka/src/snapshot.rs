//! A read-only view of an application's committed state, read from its changelog topic.
//!
//! Why it exists: in Kafka and cluster mode the changelog topic holds the latest
//! committed value of every key of every partition, whichever instance owns it. Reading
//! it with `isolation.level=read_committed` gives the state exactly as the last commits
//! left it, without asking the running instances (which may be several, or none).
//! Operators inspect state with it, and the reference application's invariant checker
//! reads a region's final state this way.
//!
//! What it promises: the snapshot holds every committed transaction that ended before
//! the read reached the end of each partition (the high watermark when the read
//! started). It also reports what the application has not finished yet: per source
//! partition the offset of the last record accepted, messages accepted but not processed
//! (inboxes), and pending delayed messages (timers), so a caller can tell a settled
//! application from a busy one.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bytes::Bytes;
use statefun_runtime::ingress::source_name;
use statefun_runtime::state::codec::keys::{self, Key};
use statefun_runtime::state::codec::values::decode_value;
use statefun_runtime::state::{Error as StateError, LogKey, StoredValue};
use statefun_sdk::{Address, CodecError, TypeName, ValueSpec, ValueType};

use crate::changelog::PartitionReader;

/// The committed state in a changelog topic (module docs).
#[derive(Debug, Clone, Default)]
pub struct ChangelogSnapshot {
    topic: String,
    /// The latest committed value of every key (what a refresh continues from).
    raw: BTreeMap<Bytes, Bytes>,
    values: HashMap<Address, HashMap<String, StoredValue>>,
    progress: BTreeMap<String, u64>,
    inbox: usize,
    timers: usize,
    ends: Vec<i64>,
}

impl ChangelogSnapshot {
    /// Reads every partition of `topic` up to its current end. Blocking (run it on a
    /// blocking thread in async code); each partition read fails after `timeout`
    /// without progress (an open transaction of a stopped producer holds it back until
    /// the broker aborts it). For a secured cluster, see [`ChangelogSnapshot::read_with`].
    pub fn read(bootstrap_servers: &str, topic: &str, timeout: Duration) -> Result<ChangelogSnapshot, StateError> {
        ChangelogSnapshot::read_with(bootstrap_servers, &[], topic, timeout)
    }

    /// [`ChangelogSnapshot::read`] with further librdkafka properties for its reader:
    /// those of the application's clients (`KafkaClusterConfig::client_properties`),
    /// such as `security.protocol`, `ssl.*` and `sasl.*`. A property the runtime owns
    /// ([`reserved_property`](crate::reserved_property)) is a permanent error.
    pub fn read_with(
        bootstrap_servers: &str,
        properties: &[(String, String)],
        topic: &str,
        timeout: Duration,
    ) -> Result<ChangelogSnapshot, StateError> {
        let mut snapshot = ChangelogSnapshot {
            topic: topic.to_owned(),
            ..Default::default()
        };
        snapshot.refresh_with(bootstrap_servers, properties, timeout)?;
        Ok(snapshot)
    }

    /// Reads what was committed since the snapshot was taken (or last refreshed), up to
    /// each partition's current end: the snapshot then shows the state at that point.
    /// Only the new records are read. Blocking, like [`ChangelogSnapshot::read`].
    pub fn refresh(&mut self, bootstrap_servers: &str, timeout: Duration) -> Result<(), StateError> {
        self.refresh_with(bootstrap_servers, &[], timeout)
    }

    /// [`ChangelogSnapshot::refresh`] with further librdkafka properties (as
    /// [`ChangelogSnapshot::read_with`] takes them).
    pub fn refresh_with(
        &mut self,
        bootstrap_servers: &str,
        properties: &[(String, String)],
        timeout: Duration,
    ) -> Result<(), StateError> {
        crate::client::check_properties("ChangelogSnapshot properties", properties).map_err(StateError::Permanent)?;
        let topic = self.topic.clone();
        let mut reader = PartitionReader::new(
            bootstrap_servers,
            properties,
            format!("{topic}-snapshot"),
            &topic,
            timeout,
        )?;
        let partitions = reader.partitions()?;
        if !self.ends.is_empty() && self.ends.len() != partitions {
            return Err(StateError::Permanent(format!(
                "changelog topic {topic} has {partitions} partitions, it had {}",
                self.ends.len()
            )));
        }
        let raw = &mut self.raw;
        let mut ends = Vec::with_capacity(partitions);
        for p in 0..partitions as i32 {
            let high = reader.end(p)?;
            let after = self.ends.get(p as usize).map(|end| end - 1).filter(|a| *a >= 0);
            reader.read(p, after, high, &mut |key, value, _| {
                let key = Bytes::copy_from_slice(key);
                match value {
                    Some(v) => raw.insert(key, Bytes::copy_from_slice(v)),
                    None => raw.remove(&key),
                };
                Ok(())
            })?;
            ends.push(high);
        }
        self.ends = ends;
        self.decode()
    }

    /// Rebuilds the decoded view from the raw keys and values.
    fn decode(&mut self) -> Result<(), StateError> {
        let topic = &self.topic;
        let corrupt = |what: String| StateError::Permanent(format!("changelog topic {topic}: {what}"));
        self.values.clear();
        self.progress.clear();
        (self.inbox, self.timers) = (0, 0);
        for (key, value) in &self.raw {
            if key.first() == Some(&0) {
                continue; // the backend's own bookkeeping (a partition's incarnation)
            }
            match keys::decode(key).map_err(|e| corrupt(format!("undecodable key: {e}")))? {
                Key::State { address, name, .. } => {
                    let value = decode_value(value).map_err(|e| corrupt(format!("value of {address}/{name}: {e}")))?;
                    self.values.entry(address).or_default().insert(name, value);
                }
                Key::Progress { source, .. } => {
                    let offset = value
                        .as_ref()
                        .try_into()
                        .map(u64::from_be_bytes)
                        .map_err(|_| corrupt(format!("progress through {source} is not a u64")))?;
                    let slot = self.progress.entry(source).or_insert(offset);
                    *slot = (*slot).max(offset);
                }
                Key::Log {
                    key: LogKey::Inbox { .. },
                    ..
                } => self.inbox += 1,
                Key::Log {
                    key: LogKey::Timer { .. },
                    ..
                } => self.timers += 1,
                Key::Log {
                    key: LogKey::Egress { .. },
                    ..
                } => {}
            }
        }
        Ok(())
    }

    /// The value of `spec` at `address`, decoded; `None` when absent or expired.
    pub fn state<T: ValueType>(&self, address: &Address, spec: &ValueSpec<T>) -> Result<Option<T>, CodecError> {
        self.state_raw(address, spec.name()).map(|b| T::decode(b)).transpose()
    }

    /// The bytes of state `name` at `address`; `None` when absent or expired.
    pub fn state_raw(&self, address: &Address, name: &str) -> Option<&Bytes> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let v = self.values.get(address)?.get(name)?;
        v.expires_at_ms.is_none_or(|t| t > now).then_some(&v.value)
    }

    /// Every address of functions of type `function` that has state.
    pub fn addresses<'a>(&'a self, function: &'a TypeName) -> impl Iterator<Item = &'a Address> + 'a {
        self.values.keys().filter(move |a| a.type_name() == function)
    }

    /// The offset of the last record of `topic`/`partition` the application accepted
    /// (into an inbox or processed), if it accepted any: the highest offset any runtime
    /// partition stored for it. In cluster mode one runtime partition accepts all of a
    /// source partition; with one instance, each runtime partition stores the last
    /// offset it accepted itself, and a commit holds every partition's changes, so the
    /// highest one is where the whole application stands.
    pub fn progress(&self, topic: &str, partition: i32) -> Option<u64> {
        self.progress.get(&source_name(topic, partition)).copied()
    }

    /// Messages accepted by a partition and not processed yet.
    pub fn pending_messages(&self) -> usize {
        self.inbox
    }

    /// Delayed messages not delivered (or cancelled) yet.
    pub fn pending_timers(&self) -> usize {
        self.timers
    }

    /// The end offset (high watermark) of each changelog partition when it was read: two
    /// snapshots with the same ends saw no commit in between.
    pub fn ends(&self) -> &[i64] {
        &self.ends
    }
}
