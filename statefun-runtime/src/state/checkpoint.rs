//! Checkpoints of the RocksDB state: hard-link snapshots with a manifest, retention of
//! the last N, verification, and restore at start-up.
//!
//! Why it exists: a checkpoint bounds recovery time and is what a new owner of the
//! state restores from. Layout under the checkpoint root:
//!
//! ```text
//! <root>/<id, 20 digits>/db/...         RocksDB checkpoint (hard links where possible)
//! <root>/<id, 20 digits>/MANIFEST.json  written last, by atomic rename
//! ```
//!
//! A directory without `MANIFEST.json` is a checkpoint whose creation was interrupted;
//! it is never used, and is deleted by the next checkpoint. A checkpoint whose manifest
//! names a missing file, or a file whose size differs, is **corrupt**: restoring it
//! fails with an error naming the file and saying what to do (`docs/operations.md`),
//! and the runtime refuses to start rather than silently drop state.
//!
//! Creating and restoring are blocking: call them from `spawn_blocking`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::backend::Error;
use super::codec::keys::{self, FORMAT_VERSION, Key};

const MANIFEST: &str = "MANIFEST.json";
const DB_DIR: &str = "db";

/// A file of a checkpoint and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointFile {
    /// Path relative to the checkpoint's `db/` directory.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// A progress marker recorded in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointProgress {
    /// Partition.
    pub partition: u32,
    /// Source name.
    pub source: String,
    /// Position consumed up to.
    pub position: u64,
}

/// What a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointManifest {
    /// Key format version of the data.
    pub format_version: u8,
    /// Increasing id (also the directory name).
    pub id: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Partitions that have data in the checkpoint.
    pub partitions: Vec<u32>,
    /// Source positions stored in the checkpoint, per partition.
    pub progress: Vec<CheckpointProgress>,
    /// Every file of the RocksDB checkpoint with its size.
    pub files: Vec<CheckpointFile>,
}

fn io(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Permanent(format!("{what} {}: {e}", path.display()))
}

fn list_files(dir: &Path) -> Result<Vec<CheckpointFile>, Error> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, "cannot list", e))? {
        let entry = entry.map_err(|e| io(dir, "cannot list", e))?;
        let meta = entry.metadata().map_err(|e| io(&entry.path(), "cannot stat", e))?;
        if meta.is_file() {
            files.push(CheckpointFile {
                name: entry.file_name().to_string_lossy().into_owned(),
                bytes: meta.len(),
            });
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Completed checkpoints under `root` (those with a manifest), oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(root, "cannot list checkpoints in", e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io(root, "cannot list checkpoints in", e))?;
        let Some(id) = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        if entry.path().join(MANIFEST).is_file() {
            out.push((id, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads a checkpoint's manifest and checks that every file it names is present with
/// its recorded size. The error names the offending file.
pub fn verify(dir: &Path) -> Result<CheckpointManifest, Error> {
    let mpath = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&mpath).map_err(|e| io(&mpath, "cannot read checkpoint manifest", e))?;
    let manifest: CheckpointManifest = serde_json::from_str(&text).map_err(|e| {
        Error::Permanent(format!(
            "checkpoint manifest {} is corrupt ({e}); delete this checkpoint directory to fall back \
             to an older one (see docs/operations.md)",
            mpath.display()
        ))
    })?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(Error::Permanent(format!(
            "checkpoint {} has key format {}; this build reads format {FORMAT_VERSION}",
            dir.display(),
            manifest.format_version
        )));
    }
    for f in &manifest.files {
        let p = dir.join(DB_DIR).join(&f.name);
        match std::fs::metadata(&p) {
            Ok(m) if m.len() == f.bytes => {}
            Ok(m) => {
                return Err(Error::Permanent(format!(
                    "checkpoint file {} is truncated or corrupt: {} bytes, manifest says {}; delete the \
                     checkpoint directory {} to fall back to an older one (see docs/operations.md)",
                    p.display(),
                    m.len(),
                    f.bytes,
                    dir.display()
                )));
            }
            Err(e) => {
                return Err(Error::Permanent(format!(
                    "checkpoint file {} is missing ({e}); delete the checkpoint directory {} to fall back \
                     to an older one (see docs/operations.md)",
                    p.display(),
                    dir.display()
                )));
            }
        }
    }
    Ok(manifest)
}

/// Creates a checkpoint of `db` under `root`, keeps the newest `retain`, and removes
/// interrupted ones. Blocking.
pub(crate) fn create(db: &rocksdb::DB, root: &Path, retain: usize) -> Result<CheckpointManifest, Error> {
    std::fs::create_dir_all(root).map_err(|e| io(root, "cannot create checkpoint root", e))?;
    let existing = list(root)?;
    let id = existing.last().map(|(id, _)| id + 1).unwrap_or(1);
    let dir = root.join(format!("{id:020}"));
    if dir.exists() {
        // An interrupted attempt with this id.
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, "cannot remove interrupted checkpoint", e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, "cannot create", e))?;
    let db_dir = dir.join(DB_DIR);
    rocksdb::checkpoint::Checkpoint::new(db)
        .and_then(|c| c.create_checkpoint(&db_dir))
        .map_err(|e| Error::Permanent(format!("cannot create checkpoint {}: {e}", db_dir.display())))?;

    // Read what the checkpoint holds from the checkpoint itself (a consistent snapshot).
    let mut partitions = std::collections::BTreeSet::new();
    let mut progress = Vec::new();
    {
        let snapshot = rocksdb::DB::open_for_read_only(&rocksdb::Options::default(), &db_dir, false)
            .map_err(|e| Error::Permanent(format!("cannot open checkpoint {}: {e}", db_dir.display())))?;
        // Progress markers sort after state keys; partitions are found by seeking.
        let mut p: u32 = 0;
        loop {
            let prefix = keys::partition_prefix(keys::KIND_STATE, crate::partitioner::PartitionId(p));
            let mut it = snapshot.iterator(rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward));
            let Some(Ok((k, _))) = it.next() else { break };
            match keys::decode(&k) {
                Ok(Key::State { partition, .. }) => {
                    partitions.insert(partition.0);
                    match partition.0.checked_add(1) {
                        Some(n) => p = n,
                        None => break,
                    }
                }
                _ => break,
            }
        }
        let start = [FORMAT_VERSION, keys::KIND_PROGRESS];
        for item in snapshot.iterator(rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward)) {
            let (k, v) = item.map_err(|e| Error::Permanent(format!("cannot read checkpoint: {e}")))?;
            match keys::decode(&k) {
                Ok(Key::Progress { partition, source }) => {
                    let position =
                        v.as_ref().try_into().map(u64::from_be_bytes).map_err(|_| {
                            Error::Permanent(format!("corrupt progress marker in {}", db_dir.display()))
                        })?;
                    partitions.insert(partition.0);
                    progress.push(CheckpointProgress {
                        partition: partition.0,
                        source,
                        position,
                    });
                }
                _ => break,
            }
        }
    }
    let manifest = CheckpointManifest {
        format_version: FORMAT_VERSION,
        id,
        created_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        partitions: partitions.into_iter().collect(),
        progress,
        files: list_files(&db_dir)?,
    };
    let tmp = dir.join("MANIFEST.json.tmp");
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
    std::fs::write(&tmp, json).map_err(|e| io(&tmp, "cannot write", e))?;
    std::fs::rename(&tmp, dir.join(MANIFEST)).map_err(|e| io(&tmp, "cannot rename", e))?;

    // Retention, and clean-up of interrupted attempts.
    let done = list(root)?;
    let keep = retain.max(1);
    for (_, old) in done.iter().take(done.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(old).map_err(|e| io(old, "cannot remove old checkpoint", e))?;
    }
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() && !p.join(MANIFEST).exists() && p != dir {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
    Ok(manifest)
}

/// Restores the checkpoint at `dir` into `db_path`, which must not hold a database.
/// Verifies it first; files are hard-linked when possible, copied otherwise. Blocking.
pub fn restore(dir: &Path, db_path: &Path) -> Result<CheckpointManifest, Error> {
    let manifest = verify(dir)?;
    if db_path.join("CURRENT").exists() {
        return Err(Error::Permanent(format!(
            "refusing to restore checkpoint {} over the existing database at {}",
            dir.display(),
            db_path.display()
        )));
    }
    std::fs::create_dir_all(db_path).map_err(|e| io(db_path, "cannot create", e))?;
    for f in &manifest.files {
        let from = dir.join(DB_DIR).join(&f.name);
        let to = db_path.join(&f.name);
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(|e| io(&from, "cannot copy checkpoint file", e))?;
        }
    }
    Ok(manifest)
}
