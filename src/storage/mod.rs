//! A node's storage. Every shard's Raft log is in [`raft_log`] (one set of
//! append-only files per node, with its own group commit); one sled `Db` per
//! node holds, per shard, a state-machine tree (names in [`trees`], key
//! encodings in [`keys`]).
//!
//! What sled 0.34.7 really guarantees, and what this module does about it
//! (DESIGN section 3):
//! - `Db::flush` writes and `sync_file_range`s but does not fsync on Linux, so
//!   [`Durability`] follows every flush with an `fdatasync` of the Db's data
//!   file before anything is reported durable.
//! - Nothing waits for sled on the write path: a state machine lost with an
//!   unflushed sled is applied again from the Raft log, whose entries are
//!   purged only after a sled flush and fsync.
//! - sled writes a page (a whole tree node, up to 17 entries) larger than a
//!   quarter of its segment size to a separate blob file that it never syncs.
//!   With the default 512 KiB segments, a node of large values became such a
//!   blob. Segments are now [`SEGMENT_BYTES`], so no node of entries up to
//!   [`ENTRY_BYTES_MAX`] (a data folder from before the Raft log left sled
//!   still holds them, until opened) or messages up to the body limit reaches
//!   the threshold (checked at compile time), and the group commit fsyncs any
//!   blob file that appears anyway.

pub mod durability;
pub mod keys;
pub mod raft_log;
pub mod seal;
pub mod trees;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use durability::Durability;
pub use raft_log::RaftLog;
pub use seal::KeyRing;

/// Upper bound on one encoded Raft log entry.
pub const ENTRY_BYTES_MAX: usize = 100 * 1024;

/// sled's segment size. sled writes a page larger than a quarter of this to
/// an unsynced blob file instead of its log.
pub const SEGMENT_BYTES: usize = 8 * 1024 * 1024;

/// Most items in a sled leaf: sled splits a leaf once it holds more than 16.
const LEAF_ITEMS_MAX: usize = 17;
/// Allowance per item for its key and sled's framing.
const ITEM_OVERHEAD_BYTES: usize = 1024;
/// Largest stored message record: a body at the limit plus its fields.
const MESSAGE_RECORD_BYTES_MAX: usize = crate::router::validate::BODY_BYTES_MAX + 1024;

const _: () = {
    let blob_threshold = SEGMENT_BYTES / 4;
    assert!(LEAF_ITEMS_MAX * (ENTRY_BYTES_MAX + ITEM_OVERHEAD_BYTES) < blob_threshold);
    assert!(LEAF_ITEMS_MAX * (MESSAGE_RECORD_BYTES_MAX + ITEM_OVERHEAD_BYTES) < blob_threshold);
};

/// Runs work that blocks for as long as a whole tree takes (a snapshot's copy
/// or load, a replica's deletion, a digest of every chat) without stalling
/// the tasks queued behind it: on a multi-thread runtime the worker first
/// hands its queue to another thread. Elsewhere (single-thread tests) it
/// just runs.
pub fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt record in {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> std::io::Error {
        match e {
            Error::Io(e) => e,
            other => std::io::Error::other(other.to_string()),
        }
    }
}

/// Most bytes of messages a node's replicas keep in memory for reads
/// ([`crate::shard::chat_cache`]).
pub const MESSAGE_CACHE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Bytes that many owners hold together out of one bound (the message
/// caches of a node's replicas), reported on a gauge.
pub struct MemoryBudget {
    used: AtomicUsize,
    max: usize,
    gauge: metrics::Gauge,
}

impl MemoryBudget {
    pub fn new(max: usize, gauge: metrics::Gauge) -> MemoryBudget {
        MemoryBudget {
            used: AtomicUsize::new(0),
            max,
            gauge,
        }
    }

    /// A bound reported nowhere (tests).
    pub fn unreported(max: usize) -> MemoryBudget {
        MemoryBudget::new(max, metrics::Gauge::noop())
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes if they fit.
    pub fn take(&self, n: usize) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + n <= self.max).then_some(used + n)
            })
            .is_ok();
        if taken {
            self.gauge.increment(n as f64);
        }
        taken
    }

    /// Takes `n` bytes whether or not they fit (an owner that frees them
    /// when it sees the bound passed).
    pub fn add(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
        self.gauge.increment(n as f64);
    }

    pub fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
        self.gauge.decrement(n as f64);
    }
}

/// How long an epoch key seals new bodies when the config does not say.
pub const DEFAULT_SEAL_EPOCH: Duration = Duration::from_secs(300);

/// A node's storage: the sled `Db`, its durability thread, the folder for
/// snapshot files, and the key ring that seals self-destructing bodies (in
/// `keys/`, outside sled).
#[derive(Clone)]
pub struct Storage {
    db: sled::Db,
    durability: Durability,
    raft_log: RaftLog,
    dir: Arc<PathBuf>,
    keys: Arc<KeyRing>,
    message_cache_budget: Arc<MemoryBudget>,
    memtable_budget: Arc<MemoryBudget>,
}

impl Storage {
    /// Opens (or creates) the node's storage under `dir`, with the default
    /// seal epoch.
    pub fn open(dir: &Path) -> Result<Storage, Error> {
        Storage::open_with(dir, DEFAULT_SEAL_EPOCH, MESSAGE_CACHE_BYTES_MAX)
    }

    /// Opens (or creates) the node's storage under `dir`; epoch keys seal new
    /// bodies for `seal_epoch` each, and the replicas' message caches hold at
    /// most `message_cache_bytes` together.
    pub fn open_with(
        dir: &Path,
        seal_epoch: Duration,
        message_cache_bytes: usize,
    ) -> Result<Storage, Error> {
        crate::shard::snapshot::open_dir_synced(dir)?;
        let sled_dir = dir.join("sled");
        crate::shard::snapshot::open_dir_synced(&sled_dir)?;
        let segment_bytes = match persisted_segment_bytes(&sled_dir)? {
            Some(n) if n != SEGMENT_BYTES => {
                // sled refuses to open a Db with another segment size. Such a
                // folder may make blob files, which the group commit syncs.
                tracing::warn!(
                    dir = %sled_dir.display(),
                    segment_bytes = n,
                    "data folder made with another sled segment size; keeping it"
                );
                n
            }
            _ => SEGMENT_BYTES,
        };
        let db = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(256 * 1024 * 1024)
            .segment_size(segment_bytes)
            // Measured under sends: 8-11% more throughput and about 15% fewer
            // bytes written per message than the default LowSpace mode, for
            // about the same space (BENCHMARKS.md).
            .mode(sled::Mode::HighThroughput)
            .open()?;
        // sled keeps its data in `<path>/db`; fdatasync on any fd of it
        // syncs the file.
        let data_file = std::fs::File::open(sled_dir.join("db"))?;
        // sled syncs no folder: the names of its files (`conf`, `db`, the
        // page-table snapshots it renames into place) are made durable by
        // the group commit, which fsyncs the folder whenever a name is new.
        let durability = Durability::start(db.clone(), data_file, &sled_dir);
        crate::shard::snapshot::open_dir_synced(&dir.join("snapshots"))?;
        let raft_log = RaftLog::open(&dir.join("raft-log"))?;
        let keys = KeyRing::open(&dir.join("keys"), seal_epoch)?;
        Ok(Storage {
            db,
            durability,
            raft_log,
            dir: Arc::new(dir.to_path_buf()),
            keys: Arc::new(keys),
            message_cache_budget: Arc::new(MemoryBudget::new(
                message_cache_bytes,
                metrics::gauge!(crate::metrics::MESSAGE_CACHE_BYTES),
            )),
            memtable_budget: Arc::new(MemoryBudget::new(
                crate::shard::memtable::NODE_BYTES_MAX,
                metrics::gauge!(crate::metrics::MEMTABLE_BYTES),
            )),
        })
    }

    /// The bound on the messages this node's replicas cache for reads.
    pub fn message_cache_budget(&self) -> &Arc<MemoryBudget> {
        &self.message_cache_budget
    }

    /// The bytes the replicas' memtables hold together.
    pub fn memtable_budget(&self) -> &Arc<MemoryBudget> {
        &self.memtable_budget
    }

    /// The key ring that seals self-destructing bodies.
    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.keys
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The sled Db's group commit (the Raft log has its own).
    pub fn durability(&self) -> &Durability {
        &self.durability
    }

    /// Every shard's Raft log.
    pub fn raft_log(&self) -> &RaftLog {
        &self.raft_log
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Folder for one shard's snapshot files.
    pub fn snapshot_dir(&self, shard: crate::types::ShardId) -> PathBuf {
        self.dir
            .join("snapshots")
            .join(format!("shard-{}", shard.0))
    }

    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, Error> {
        Ok(self.db.open_tree(name)?)
    }
}

/// The segment size recorded in an existing sled folder's `conf` file.
fn persisted_segment_bytes(sled_dir: &Path) -> Result<Option<usize>, Error> {
    // Text lines followed by a binary checksum.
    let text = match std::fs::read(sled_dir.join("conf")) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("segment_size: ") {
            return v.trim().parse().map(Some).map_err(|_| Error::Corrupt {
                what: "sled conf",
                detail: format!("segment_size {v:?}"),
            });
        }
    }
    Ok(None)
}

/// Opens `path` once the sled `Db` dropped before it lets go of the
/// folder's lock: sled's background threads hold the lock for a moment after
/// the last handle drops (waits at most 10 s). For tests that reopen a
/// folder in one process.
#[cfg(test)]
impl Storage {
    pub(crate) fn open_once_unlocked(path: &Path) -> Storage {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Storage::open(path) {
                Ok(storage) => return storage,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("opening {}: {e}", path.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder made with sled's default segments still opens, and keeps them.
    #[test]
    fn opens_a_folder_with_another_segment_size() {
        let dir = tempfile::tempdir().unwrap();
        let sled_dir = dir.path().join("sled");
        {
            let db = sled::Config::new().path(&sled_dir).open().unwrap();
            db.insert(b"k", b"v").unwrap();
            db.flush().unwrap();
        }
        assert_eq!(
            persisted_segment_bytes(&sled_dir).unwrap(),
            Some(512 * 1024)
        );
        let storage = Storage::open_once_unlocked(dir.path());
        assert_eq!(storage.db().get(b"k").unwrap().unwrap(), &b"v"[..]);
        drop(storage);
        let fresh = tempfile::tempdir().unwrap();
        Storage::open(fresh.path()).unwrap();
        assert_eq!(
            persisted_segment_bytes(&fresh.path().join("sled")).unwrap(),
            Some(SEGMENT_BYTES)
        );
    }
}
