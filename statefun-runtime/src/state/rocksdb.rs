//! The RocksDB state backend: durable per-address state, co-located with its partition.
//!
//! Why it exists: state must survive process crashes. One RocksDB database per runtime
//! instance holds every partition's data under the versioned key layout of
//! [`codec::keys`](super::codec::keys); each partition's store is a view bound to its partition
//! prefix, so partitions never see each other's keys and the partition task needs no
//! lock (RocksDB's own write path is thread-safe).
//!
//! Values are encoded as [`codec::values`](super::codec::values) lays them out. A write
//! is one RocksDB `WriteBatch`: all of its state changes
//! and progress markers become durable together (WAL on, no fsync per write: survives a
//! process crash; a machine crash may lose the last writes, see docs/guarantees.md).
//!
//! The database records the key format version it was written with (meta key
//! `0x00 "format"`). Opening a database of another version fails with an error that
//! names the path, instead of misreading its keys.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use statefun_sdk::Address;

use super::backend::{
    Admission, CheckpointInfo, Error, LogKind, PartitionStore, StateBackend, StoredValue, WriteBatch,
};
use super::codec::keys::{
    self, FORMAT_VERSION, META_FORMAT_KEY, META_INCARNATION_KEY, META_PARTITIONS_KEY, changelog_position_key,
    decode_log_key, log_kind_byte,
};
use super::codec::values::{decode_u64, decode_value, expires_at};
use super::codec::{RawOp, encode_batch};
use crate::partitioner::PartitionId;
use crate::records::LogKey;

/// Maps a RocksDB error to ours: whether a retry can help, and where it happened.
fn map_err(path: &Path, what: &str, e: rocksdb::Error) -> Error {
    use rocksdb::ErrorKind::*;
    let mut msg = format!("{what} in RocksDB at {}: {e}", path.display());
    let text = e.to_string();
    if text.contains("No space left") || text.contains("ENOSPC") {
        msg.push_str(
            ". The disk is full: free space or grow the volume, then restart the runtime; \
             nothing acknowledged was lost (see docs/operations.md)",
        );
    }
    match e.kind() {
        Busy | TryAgain | TimedOut | Incomplete => Error::Transient(msg),
        _ => Error::Permanent(msg),
    }
}

fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Compaction filter: drops state values whose expiry deadline has passed, so expired
/// state does not hold disk space (reads never return them either way). Uses the wall
/// clock; every other key kind is kept.
fn drop_expired(_level: u32, key: &[u8], value: &[u8]) -> rocksdb::CompactionDecision {
    if let [FORMAT_VERSION, keys::KIND_STATE, ..] = key
        && let Some(t) = expires_at(value)
        && t <= wall_clock_ms()
    {
        return rocksdb::CompactionDecision::Remove;
    }
    rocksdb::CompactionDecision::Keep
}

/// Options of the RocksDB backend.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RocksDbOptions {
    /// fsync the WAL on every write: survives a machine crash, at a large cost in
    /// throughput. Default: false (survives a process crash).
    pub sync_writes: bool,
    /// Block cache size in MiB. Default: 256.
    pub block_cache_mib: usize,
    /// Where checkpoints go; `None` disables them. Default: none.
    pub checkpoint_dir: Option<PathBuf>,
    /// How many completed checkpoints to keep. Default: 3.
    pub checkpoints_retained: usize,
}

impl Default for RocksDbOptions {
    fn default() -> Self {
        RocksDbOptions {
            sync_writes: false,
            block_cache_mib: 256,
            checkpoint_dir: None,
            checkpoints_retained: 3,
        }
    }
}

impl RocksDbOptions {
    /// The RocksDB options this backend opens its database with (also used by the
    /// benchmarks so that raw RocksDB is measured with the same settings).
    pub fn db_options(&self) -> rocksdb::Options {
        let mut o = rocksdb::Options::default();
        o.create_if_missing(true);
        o.set_compression_type(rocksdb::DBCompressionType::Lz4);
        o.increase_parallelism(2);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&rocksdb::Cache::new_lru_cache(self.block_cache_mib << 20));
        table.set_bloom_filter(10.0, false);
        o.set_block_based_table_factory(&table);
        o.set_compaction_filter("statefun-expired-state", drop_expired);
        o
    }

    /// The write options of every commit.
    pub fn write_options(&self) -> rocksdb::WriteOptions {
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(self.sync_writes);
        w
    }
}

/// Durable state in one RocksDB database per runtime instance.
#[derive(Clone)]
pub struct RocksDbBackend {
    db: Arc<rocksdb::DB>,
    path: Arc<PathBuf>,
    options: RocksDbOptions,
    /// The last incarnation handed out (and stored).
    incarnation: Arc<std::sync::Mutex<u64>>,
}

impl std::fmt::Debug for RocksDbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksDbBackend").field("path", &self.path).finish()
    }
}

impl RocksDbBackend {
    /// Opens (or creates) the database at `path`. Fails, naming the path, if the
    /// database was written with another key format version or cannot be opened.
    pub fn open(path: impl AsRef<Path>, options: RocksDbOptions) -> Result<RocksDbBackend, Error> {
        let path = path.as_ref().to_path_buf();
        let db = rocksdb::DB::open(&options.db_options(), &path).map_err(|e| map_err(&path, "open", e))?;
        match db
            .get(META_FORMAT_KEY)
            .map_err(|e| map_err(&path, "read format marker", e))?
        {
            None => db
                .put(META_FORMAT_KEY, [FORMAT_VERSION])
                .map_err(|e| map_err(&path, "write format marker", e))?,
            Some(v) if v.as_slice() == [FORMAT_VERSION] => {}
            Some(v) => {
                return Err(Error::Permanent(format!(
                    "state at {} uses key format {:?}; this build reads format {FORMAT_VERSION}. \
                     Run the version that wrote it, or restore a checkpoint of a supported format \
                     (see docs/operations.md)",
                    path.display(),
                    v
                )));
            }
        }
        let incarnation = match db
            .get(META_INCARNATION_KEY)
            .map_err(|e| map_err(&path, "read incarnation", e))?
        {
            None => 0,
            Some(v) => decode_u64(&v, || {
                format!(
                    "incarnation marker in RocksDB at {}; restore a checkpoint (see docs/operations.md)",
                    path.display()
                )
            })?,
        };
        Ok(RocksDbBackend {
            db: Arc::new(db),
            path: Arc::new(path),
            options,
            incarnation: Arc::new(std::sync::Mutex::new(incarnation)),
        })
    }

    /// Opens the database at `path`; if there is none yet and `options.checkpoint_dir`
    /// holds a checkpoint, restores the newest one first. Refuses to start (with an
    /// error naming the file) if that checkpoint is corrupt, rather than starting empty.
    /// Returns the backend and the manifest of the restored checkpoint, if any.
    pub fn open_or_restore(
        path: impl AsRef<Path>,
        options: RocksDbOptions,
    ) -> Result<(RocksDbBackend, Option<super::checkpoint::CheckpointManifest>), Error> {
        let path = path.as_ref();
        let mut restored = None;
        if !path.join("CURRENT").exists()
            && let Some(root) = &options.checkpoint_dir
            && let Some((_, newest)) = super::checkpoint::list(root)?.pop()
        {
            tracing::info!(checkpoint = %newest.display(), db = %path.display(), "restoring checkpoint");
            restored = Some(super::checkpoint::restore(&newest, path)?);
        }
        Ok((RocksDbBackend::open(path, options)?, restored))
    }

    /// Takes a checkpoint now into `options.checkpoint_dir` (blocking).
    pub fn create_checkpoint(&self) -> Result<super::checkpoint::CheckpointManifest, Error> {
        let root = self.options.checkpoint_dir.as_ref().ok_or_else(|| {
            Error::Permanent("checkpoints are disabled: set RocksDbOptions::checkpoint_dir".to_owned())
        })?;
        super::checkpoint::create(&self.db, root, self.options.checkpoints_retained)
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes every value and record, and input at any time.
impl Admission for RocksDbBackend {}

impl StateBackend for RocksDbBackend {
    fn durable(&self) -> bool {
        true
    }

    fn next_incarnation(&self) -> Result<u64, Error> {
        let mut last = self.incarnation.lock().expect("incarnation lock");
        let next = *last + 1;
        let mut sync = rocksdb::WriteOptions::default();
        sync.set_sync(true);
        self.db
            .put_opt(META_INCARNATION_KEY, next.to_be_bytes(), &sync)
            .map_err(|e| map_err(&self.path, "write incarnation", e))?;
        *last = next;
        Ok(next)
    }

    fn check_partitions(&self, partitions: u32) -> Result<(), Error> {
        match self
            .db
            .get(META_PARTITIONS_KEY)
            .map_err(|e| map_err(&self.path, "read partition count", e))?
        {
            None => self
                .db
                .put(META_PARTITIONS_KEY, partitions.to_be_bytes())
                .map_err(|e| map_err(&self.path, "write partition count", e)),
            Some(v) if v.as_slice() == partitions.to_be_bytes() => Ok(()),
            Some(v) => {
                let stored = <[u8; 4]>::try_from(v.as_slice()).map(u32::from_be_bytes);
                Err(Error::Permanent(format!(
                    "state at {} was written with {} partitions; this configuration has {partitions}. \
                     The partition count of a database is fixed: set `partitions` back, or start from an \
                     empty database (see docs/operations.md)",
                    self.path.display(),
                    stored.map_or_else(|_| "an unreadable number of".to_owned(), |n| n.to_string()),
                )))
            }
        }
    }

    fn checkpoint(&self) -> Result<Option<CheckpointInfo>, Error> {
        let Some(root) = &self.options.checkpoint_dir else {
            return Ok(None);
        };
        let m = self.create_checkpoint()?;
        Ok(Some(CheckpointInfo {
            id: m.id,
            path: root.join(format!("{:020}", m.id)),
            created_at_ms: m.created_at_ms,
        }))
    }

    fn open_partition(&self, partition: PartitionId) -> Result<Box<dyn PartitionStore>, Error> {
        Ok(Box::new(RocksDbStore {
            db: Arc::clone(&self.db),
            path: Arc::clone(&self.path),
            partition,
            write_options: self.options.write_options(),
        }))
    }
}

/// One partition's view of the database.
struct RocksDbStore {
    db: Arc<rocksdb::DB>,
    path: Arc<PathBuf>,
    partition: PartitionId,
    write_options: rocksdb::WriteOptions,
}

impl PartitionStore for RocksDbStore {
    fn get(&self, address: &Address, name: &str) -> Result<Option<StoredValue>, Error> {
        let key = keys::state_key(self.partition, address, name);
        match self.db.get_pinned(&key).map_err(|e| map_err(&self.path, "read", e))? {
            None => Ok(None),
            Some(v) => decode_value(&v).map(Some).map_err(|e| {
                Error::Permanent(format!(
                    "corrupt value of {address} state {name:?} in RocksDB at {}: {e}",
                    self.path.display()
                ))
            }),
        }
    }

    fn write(&mut self, batch: WriteBatch) -> Result<(), Error> {
        batch.check_egress_taken(|_| false)?;
        let mut wb = rocksdb::WriteBatch::default();
        for op in encode_batch(self.partition, &batch)? {
            match &op.value {
                Some(v) => wb.put(&op.key, v),
                None => wb.delete(&op.key),
            }
        }
        self.db
            .write_opt(wb, &self.write_options)
            .map_err(|e| map_err(&self.path, "write", e))
    }

    fn progress(&self, source: &str) -> Result<Option<u64>, Error> {
        let key = keys::progress_key(self.partition, source).map_err(|e| Error::Permanent(e.to_string()))?;
        match self
            .db
            .get_pinned(&key)
            .map_err(|e| map_err(&self.path, "read progress", e))?
        {
            None => Ok(None),
            Some(v) => decode_u64(&v, || {
                format!("progress marker of {source:?} in RocksDB at {}", self.path.display())
            })
            .map(Some),
        }
    }

    fn log(&self, kind: LogKind) -> Result<Vec<(LogKey, Bytes)>, Error> {
        let prefix = keys::partition_prefix(log_kind_byte(kind), self.partition);
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(&prefix) {
            let (key, value) = item.map_err(|e| map_err(&self.path, "scan log", e))?;
            if !key.starts_with(&prefix) {
                break;
            }
            out.push((
                decode_log_key(&key, self.partition, &self.path)?,
                Bytes::copy_from_slice(&value),
            ));
        }
        Ok(out)
    }
}

/// Raw access for a changelogged backend ([`super::changelog::ChangelogBackend`]): it
/// applies committed changes with the changelog position they reach, in one batch.
impl RocksDbBackend {
    /// Reads one raw key.
    pub fn get_raw(&self, key: &[u8]) -> Result<Option<Bytes>, Error> {
        Ok(self
            .db
            .get_pinned(key)
            .map_err(|e| map_err(&self.path, "read", e))?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    /// Every raw key-value pair whose key starts with `prefix`, in key order.
    pub fn scan_raw(&self, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>, Error> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(prefix) {
            let (key, value) = item.map_err(|e| map_err(&self.path, "scan", e))?;
            if !key.starts_with(prefix) {
                break;
            }
            out.push((Bytes::copy_from_slice(&key), Bytes::copy_from_slice(&value)));
        }
        Ok(out)
    }

    /// Applies `ops` and records, per partition, the changelog position they bring the
    /// data to: one atomic write.
    pub fn apply_raw(&self, ops: &[RawOp], positions: &[(PartitionId, i64)]) -> Result<(), Error> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in ops {
            match &op.value {
                Some(v) => wb.put(&op.key, v),
                None => wb.delete(&op.key),
            }
        }
        for (p, offset) in positions {
            wb.put(changelog_position_key(*p), offset.to_be_bytes());
        }
        self.db
            .write_opt(wb, &self.options.write_options())
            .map_err(|e| map_err(&self.path, "write", e))
    }

    /// The changelog position `partition`'s data is at: the offset of the last
    /// changelog record applied, `None` if none was.
    pub fn changelog_position(&self, partition: PartitionId) -> Result<Option<i64>, Error> {
        match self.get_raw(&changelog_position_key(partition))? {
            None => Ok(None),
            Some(v) => decode_u64(&v, || {
                format!(
                    "changelog position of partition {partition} in RocksDB at {}",
                    self.path.display()
                )
            })
            .map(|p| Some(p as i64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_drops_expired_state_and_keeps_the_rest() {
        use statefun_sdk::TypeName;
        let dir = tempfile::tempdir().unwrap();
        let b = RocksDbBackend::open(dir.path(), RocksDbOptions::default()).unwrap();
        let mut s = b.open_partition(PartitionId(0)).unwrap();
        let a = Address::new(TypeName::from_static("t/f"), "a").unwrap();
        let op = |name: &str, exp| crate::state::WriteOp {
            address: a.clone(),
            name: std::sync::Arc::from(name),
            value: Some(StoredValue {
                value: Bytes::from_static(b"v"),
                expires_at_ms: exp,
            }),
        };
        let future = wall_clock_ms() + 3_600_000;
        s.write(WriteBatch {
            ops: vec![op("expired", Some(1)), op("later", Some(future)), op("forever", None)],
            progress: vec![("src".into(), 1)],
            ..Default::default()
        })
        .unwrap();
        let count = || b.db.iterator(rocksdb::IteratorMode::Start).count();
        assert_eq!(count(), 5, "3 values, 1 progress marker, 1 format marker");
        b.db.flush().unwrap();
        b.db.compact_range::<&[u8], &[u8]>(None, None);
        assert_eq!(count(), 4, "only the expired value is gone");
        assert!(s.get(&a, "expired").unwrap().is_none());
        assert!(s.get(&a, "later").unwrap().is_some());
        assert_eq!(s.progress("src").unwrap(), Some(1));
    }

    #[test]
    fn a_database_of_another_key_format_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = rocksdb::DB::open(&RocksDbOptions::default().db_options(), dir.path()).unwrap();
            db.put(META_FORMAT_KEY, [99u8]).unwrap();
        }
        let err = RocksDbBackend::open(dir.path(), RocksDbOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&dir.path().display().to_string()) && msg.contains("format"),
            "{msg}"
        );
    }
}
