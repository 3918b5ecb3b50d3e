//! Group commit: one thread makes writes durable for every shard of a node.
//!
//! ```text
//!  shard 1 append ─┐
//!  shard 2 append ─┼─▶ channel ─▶ [durability thread]  drain all waiting
//!  save_vote     ──┘                 db.flush()          (pwrite + sync_file_range)
//!                                    data_file.sync_data()  (fdatasync: the real fsync)
//!                                    complete every callback
//! ```
//!
//! sled writes pages too large for its log to blob files and never syncs
//! them; storage keeps pages below that size, and the thread fsyncs any blob
//! file that appears anyway, before the fdatasync that makes pointers to it
//! durable. sled syncs no folder either: the thread fsyncs sled's folder
//! (and each file in it once) whenever a name in it is new, such as its
//! page-table snapshots, renamed into place.
//!
//! While one flush runs, new callbacks queue up and share the next one, and
//! flushes start at least `FLUSH_INTERVAL_MIN` apart, so the fsync rate stays
//! bounded however many shards append. A failed fsync poisons
//! the node's durability for good: after a failed fsync the kernel may have
//! dropped dirty pages, so nothing written since can be trusted to be on disk.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

type Callback = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Most callbacks completed by one flush; more wait for the next.
const CALLBACKS_PER_FLUSH_MAX: usize = 65_536;
/// Shortest time from the start of one flush to the start of the next.
/// Under load, flushes ran back to back (about 0.5 ms each here, 1,500 a
/// second) and each covered one or two appends; pacing them lets the writes
/// that arrive meanwhile share the next flush (a fixed 1 ms wait measured
/// about 10% less CPU per message; BENCHMARKS.md). A write to an idle node
/// waits for nothing: its flush starts at once.
const FLUSH_INTERVAL_MIN: std::time::Duration = std::time::Duration::from_millis(1);

#[derive(Clone)]
pub struct Durability {
    thread: Arc<Thread>,
    poisoned: Arc<AtomicBool>,
}

/// The group-commit thread. When the last handle goes, the thread finishes
/// the waiting callbacks and is joined, so what it holds (sled's Db, with
/// the lock on its folder) is released before the drop returns.
struct Thread {
    tx: Option<mpsc::Sender<Callback>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Thread {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(handle) = self.handle.take() {
            // A callback run by the thread itself may hold the last handle.
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

/// What a group commit runs to make every write made before it durable.
pub type SyncAction = Box<dyn FnMut() -> io::Result<()> + Send>;

impl Durability {
    /// Starts the group-commit thread for `db`, whose folder is `sled_dir`
    /// and whose data file (in it) is `data_file`.
    pub fn start(db: sled::Db, data_file: std::fs::File, sled_dir: &Path) -> Durability {
        let mut blobs = NewFiles::new(sled_dir.join("blobs"));
        let mut folder = NewFiles::new(sled_dir.to_path_buf());
        Durability::start_with(
            "chatstore-fsync",
            "sled",
            Box::new(move || {
                db.flush().map_err(io::Error::other)?;
                let fresh = blobs.sync_new()?;
                if fresh > 0 {
                    metrics::counter!(crate::metrics::STORAGE_BLOBS_SYNCED).increment(fresh);
                }
                folder.sync_new()?;
                data_file.sync_data()
            }),
        )
    }

    /// Starts a group-commit thread named `name` that runs `sync` for each
    /// group of waiting callbacks; its metrics carry `store`.
    pub fn start_with(name: &str, store: &'static str, sync: SyncAction) -> Durability {
        let (tx, rx) = mpsc::channel::<Callback>();
        let poisoned = Arc::new(AtomicBool::new(false));
        let flag = poisoned.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(sync, store, rx, flag))
            .expect("spawn the durability thread");
        Durability {
            thread: Arc::new(Thread {
                tx: Some(tx),
                handle: Some(handle),
            }),
            poisoned,
        }
    }

    /// Whether an earlier failure made every later write untrustworthy.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// Marks the writes as untrustworthy for good (a write failed part-way).
    pub fn poison(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    /// Calls `done` once everything written to the Db before this call is on
    /// disk (or with the error that prevented it).
    pub fn after_sync(&self, done: impl FnOnce(io::Result<()>) + Send + 'static) {
        if self.poisoned.load(Ordering::Acquire) {
            done(Err(poisoned_error()));
            return;
        }
        let tx = self
            .thread
            .tx
            .as_ref()
            .expect("sender lives as long as the handle");
        if let Err(mpsc::SendError(done)) = tx.send(Box::new(done)) {
            done(Err(io::Error::other("durability thread has stopped")));
        }
    }

    /// Waits until everything written before this call is on disk.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.after_sync(move |r| {
            let _ = tx.send(r);
        });
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("durability thread dropped a sync")))
    }
}

pub fn poisoned_error() -> io::Error {
    io::Error::other("an earlier fsync failed; this node no longer acknowledges writes")
}

/// The files of one folder that have been fsynced, by name.
struct NewFiles {
    dir: PathBuf,
    synced: HashSet<OsString>,
}

impl NewFiles {
    fn new(dir: PathBuf) -> NewFiles {
        NewFiles {
            dir,
            synced: HashSet::new(),
        }
    }

    /// fsyncs every file not synced yet, then the folder if there was one;
    /// how many there were. One readdir when there is none.
    fn sync_new(&mut self) -> io::Result<u64> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::new();
        let mut fresh = 0u64;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced.contains(&name) {
                match std::fs::File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // Removed by sled since the readdir: nothing to keep.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                fresh += 1;
            }
            present.insert(name);
        }
        if fresh > 0 {
            std::fs::File::open(&self.dir)?.sync_all()?;
        }
        self.synced = present;
        Ok(fresh)
    }
}

fn run(
    mut sync: SyncAction,
    store: &'static str,
    rx: mpsc::Receiver<Callback>,
    poisoned: Arc<AtomicBool>,
) {
    let seconds = metrics::histogram!(crate::metrics::STORAGE_FSYNC_SECONDS, "store" => store);
    let callbacks = metrics::histogram!(crate::metrics::STORAGE_FSYNC_BATCH, "store" => store);
    let mut batch: Vec<Callback> = Vec::new();
    let mut last_start: Option<Instant> = None;
    while let Ok(first) = rx.recv() {
        batch.push(first);
        // Under load, pace flushes so that more writes share each one.
        if let Some(since) = last_start.map(|t: Instant| t.elapsed()) {
            if since < FLUSH_INTERVAL_MIN {
                std::thread::sleep(FLUSH_INTERVAL_MIN - since);
            }
        }
        while batch.len() < CALLBACKS_PER_FLUSH_MAX {
            match rx.try_recv() {
                Ok(cb) => batch.push(cb),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        last_start = Some(started);
        let result = if poisoned.load(Ordering::Acquire) {
            Err(poisoned_error().to_string())
        } else {
            match sync() {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::error!(error = %e, "flush + fdatasync failed; refusing all further writes");
                    poisoned.store(true, Ordering::Release);
                    Err(e.to_string())
                }
            }
        };
        seconds.record(started.elapsed().as_secs_f64());
        callbacks.record(batch.len() as f64);
        for cb in batch.drain(..) {
            cb(result.clone().map_err(io::Error::other));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::{Storage, ENTRY_BYTES_MAX};

    fn blob_files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("sled").join("blobs"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Pages of full-size log entries and of messages at the body limit stay
    /// in sled's log (synced by fdatasync), never in unsynced blob files.
    /// With sled's default 512 KiB segments both cases below made blobs.
    #[tokio::test]
    async fn large_entries_and_bodies_make_no_blob_files() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let log = storage.open_tree("log").unwrap();
        let messages = storage.open_tree("messages").unwrap();
        let entry = vec![7u8; ENTRY_BYTES_MAX];
        let body = vec![9u8; crate::router::validate::BODY_BYTES_MAX + 512];
        for i in 0u64..200 {
            log.insert(i.to_be_bytes(), entry.as_slice()).unwrap();
            messages
                .insert((i * 7919 % 200).to_be_bytes(), body.as_slice())
                .unwrap();
        }
        storage.durability().sync().await.unwrap();
        assert_eq!(blob_files(dir.path()), 0, "sled wrote blob files");
        // Every value reads back whole.
        for i in 0u64..200 {
            assert_eq!(
                log.get(i.to_be_bytes()).unwrap().unwrap().len(),
                entry.len()
            );
        }
    }

    /// A file that appears (a blob, a page-table snapshot) is synced once,
    /// not an error.
    #[test]
    fn new_files_are_synced_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut sync = super::NewFiles::new(dir.path().join("blobs"));
        assert_eq!(sync.sync_new().unwrap(), 0); // no folder yet
        std::fs::create_dir(dir.path().join("blobs")).unwrap();
        std::fs::write(dir.path().join("blobs").join("1"), b"page").unwrap();
        assert_eq!(sync.sync_new().unwrap(), 1);
        assert_eq!(sync.sync_new().unwrap(), 0);
        assert_eq!(sync.synced.len(), 1);
        std::fs::remove_file(dir.path().join("blobs").join("1")).unwrap();
        sync.sync_new().unwrap();
        assert!(sync.synced.is_empty());
    }

    #[tokio::test]
    async fn sync_completes_every_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::Storage::open(dir.path()).unwrap();
        let tree = storage.open_tree("t").unwrap();
        let mut waits = Vec::new();
        for i in 0u64..100 {
            tree.insert(i.to_be_bytes(), &b"x"[..]).unwrap();
            let d = storage.durability().clone();
            waits.push(tokio::spawn(async move { d.sync().await }));
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
    }
}
