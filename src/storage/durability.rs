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
//! While one flush runs, new callbacks queue up and share the next one, so the
//! fsync rate stays bounded however many shards append. A failed fsync poisons
//! the node's durability for good: after a failed fsync the kernel may have
//! dropped dirty pages, so nothing written since can be trusted to be on disk.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

type Callback = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Most callbacks completed by one flush; more wait for the next.
const CALLBACKS_PER_FLUSH_MAX: usize = 65_536;

#[derive(Clone)]
pub struct Durability {
    tx: mpsc::Sender<Callback>,
    poisoned: Arc<AtomicBool>,
}

impl Durability {
    pub fn start(db: sled::Db, data_file: std::fs::File) -> Durability {
        let (tx, rx) = mpsc::channel::<Callback>();
        let poisoned = Arc::new(AtomicBool::new(false));
        let flag = poisoned.clone();
        std::thread::Builder::new()
            .name("chatstore-fsync".into())
            .spawn(move || run(db, data_file, rx, flag))
            .expect("spawn the durability thread");
        Durability { tx, poisoned }
    }

    /// Calls `done` once everything written to the Db before this call is on
    /// disk (or with the error that prevented it).
    pub fn after_sync(&self, done: impl FnOnce(io::Result<()>) + Send + 'static) {
        if self.poisoned.load(Ordering::Acquire) {
            done(Err(poisoned_error()));
            return;
        }
        if let Err(mpsc::SendError(done)) = self.tx.send(Box::new(done)) {
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

fn poisoned_error() -> io::Error {
    io::Error::other("an earlier fsync failed; this node no longer acknowledges writes")
}

fn run(
    db: sled::Db,
    data_file: std::fs::File,
    rx: mpsc::Receiver<Callback>,
    poisoned: Arc<AtomicBool>,
) {
    let mut batch: Vec<Callback> = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < CALLBACKS_PER_FLUSH_MAX {
            match rx.try_recv() {
                Ok(cb) => batch.push(cb),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = if poisoned.load(Ordering::Acquire) {
            Err(poisoned_error().to_string())
        } else {
            match db
                .flush()
                .map_err(|e| e.to_string())
                .and_then(|_| data_file.sync_data().map_err(|e| e.to_string()))
            {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::error!(error = %e, "flush + fdatasync failed; refusing all further writes");
                    poisoned.store(true, Ordering::Release);
                    Err(e)
                }
            }
        };
        metrics::histogram!(crate::metrics::STORAGE_FSYNC_SECONDS)
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::metrics::STORAGE_FSYNC_BATCH).record(batch.len() as f64);
        for cb in batch.drain(..) {
            cb(result.clone().map_err(io::Error::other));
        }
    }
}

#[cfg(test)]
mod tests {
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
