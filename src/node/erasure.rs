//! The eraser: makes self-destructed bodies unrecoverable from this node's
//! data folder within a bound, although sled keeps stale bytes in its files.
//!
//! Bodies are sealed with the key of the epoch in which they were written
//! ([`crate::storage::seal`]). A few times per epoch the eraser walks every
//! shard this node hosts:
//! 1. live self-destructing records sealed in a past epoch are re-sealed with
//!    the current key (found through the TTL and delete-after-read indexes,
//!    which list every record with a body to seal);
//! 2. a log that still holds entries sealed in a past epoch gets a snapshot,
//!    then is purged up to it;
//! 3. a current snapshot file whose key is from a past epoch is replaced by
//!    a new snapshot (the old file and its key are destroyed).
//!
//! When no shard holds anything from a past epoch, the eraser syncs sled and
//! destroys the past epoch keys; every stale copy sealed with them, wherever
//! sled left it, is then noise.
//!
//! The bound: a body that expires in epoch `n` is deleted by the Expire
//! command within about a second; key `n` and anything older go at the first
//! clean round of epoch `n + 1`, and a snapshot built in epoch `n + 1` that
//! still held the body (expiry right at the boundary) is rebuilt in epoch
//! `n + 2`. So a running node erases a body within 2 epochs plus two rounds
//! of its expiry (about 2.5 epochs). A node that is down erases nothing until
//! it runs again.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use tokio::sync::watch;

use crate::node::Registry;
use crate::shard::state_machine::load_current;
use crate::shard::{sealing, snapshot, Shard, ShardFiles};
use crate::storage::keys;
use crate::storage::seal::{self, KeyRing};

/// Rounds per epoch.
const ROUNDS_PER_EPOCH: u32 = 4;
const ROUND_MIN: Duration = Duration::from_millis(250);
const ROUND_MAX: Duration = Duration::from_secs(30);

pub async fn run(registry: Registry, mut shutdown: watch::Receiver<bool>) {
    let ring = registry.storage().keys().clone();
    let period = (ring.epoch_length() / ROUNDS_PER_EPOCH).clamp(ROUND_MIN, ROUND_MAX);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        match round(&registry, &ring).await {
            Ok(destroyed) if destroyed > 0 => {
                tracing::debug!(destroyed, "destroyed past epoch keys");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "erasure round"),
        }
    }
}

/// One pass over every shard; returns how many epoch keys it destroyed.
async fn round(registry: &Registry, ring: &Arc<KeyRing>) -> io::Result<usize> {
    let epoch = ring.current_epoch();
    let past_keys = ring.epochs().iter().any(|e| *e < epoch);
    let r = ring.clone();
    tokio::task::spawn_blocking(move || r.wait_for_sealers())
        .await
        .map_err(io::Error::other)?;
    let mut clean = true;
    for shard in registry.all() {
        let files = shard.files.clone();
        let r = ring.clone();
        let found = tokio::task::spawn_blocking(move || inspect(&files, &r, epoch, past_keys))
            .await
            .map_err(io::Error::other)??;
        if !found.is_clean() {
            clean = false;
            act(&shard, &found).await;
        }
    }
    metrics::gauge!(crate::metrics::ERASURE_KEYS_ALIVE).set(ring.epochs().len() as f64);
    if !clean || !past_keys {
        return Ok(0);
    }
    // The purges that dropped log entries sealed with the old keys must be
    // on disk first: a log that came back with them after a crash could
    // not decode them, and the node would not start.
    registry.storage().raft_log().sync().await?;
    registry.storage().durability().sync().await?;
    let r = ring.clone();
    let destroyed = tokio::task::spawn_blocking(move || r.destroy_before(epoch))
        .await
        .map_err(io::Error::other)??;
    metrics::counter!(crate::metrics::ERASURE_KEYS_DESTROYED).increment(destroyed as u64);
    metrics::gauge!(crate::metrics::ERASURE_KEYS_ALIVE).set(ring.epochs().len() as f64);
    Ok(destroyed)
}

/// What one shard still holds from past epochs.
#[derive(Debug, Default)]
struct Findings {
    /// Records that could not be re-sealed this round (changed meanwhile).
    records_left: usize,
    /// The last log entry sealed with a past epoch key.
    log_sealed_upto: Option<u64>,
    /// The current snapshot's key is from a past epoch.
    old_snapshot_key: bool,
}

impl Findings {
    fn is_clean(&self) -> bool {
        self.records_left == 0 && self.log_sealed_upto.is_none() && !self.old_snapshot_key
    }
}

fn inspect(
    files: &ShardFiles,
    ring: &KeyRing,
    epoch: u64,
    past_keys: bool,
) -> io::Result<Findings> {
    let mut found = Findings::default();
    if past_keys {
        found.records_left = reseal_records(&files.state, ring, epoch)?;
        found.log_sealed_upto = files.log.last_sealed_before(epoch)?;
    }
    if let Some((_, file)) = load_current(&files.snapshot_dir)? {
        match seal::read_key_file(&snapshot::key_path(&file)) {
            Ok((stamp, _)) => found.old_snapshot_key = stamp < epoch,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

/// Re-seals live self-destructing records sealed before `epoch`; returns how
/// many were left because they changed meanwhile (the next round looks
/// again).
///
/// A record with a newer value or a removal waiting in the memtable is
/// re-sealed too: after a crash the log applies that write again and reads
/// the record in sled first, so sled's copy must not need a key destroyed
/// meanwhile. (Leaving such records for a later round left past keys alive
/// for as long as expiries kept coming, since every round found some.) The
/// waiting write still wins: readers see the memtable first, and its flush
/// overwrites the copy re-sealed here.
fn reseal_records(state: &sled::Tree, ring: &KeyRing, epoch: u64) -> io::Result<usize> {
    let (current, key) = ring.current_key()?;
    let mut left = 0;
    let mut count = 0u64;
    let indexed = state
        .scan_prefix([keys::TAG_TTL])
        .map(|r| r.map(|(k, _)| (keys::part(&k, 1), keys::part(&k, 2))))
        .chain(
            state
                .scan_prefix([keys::TAG_AFTER_READ])
                .map(|r| r.map(|(k, _)| (keys::part(&k, 0), keys::part(&k, 1)))),
        );
    for item in indexed {
        let (Some(chat), Some(seq)) = item.map_err(io::Error::other)? else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad self-destruct index key",
            ));
        };
        let mkey = keys::message(chat, seq);
        let Some(raw) = state.get(&mkey).map_err(io::Error::other)? else {
            continue;
        };
        match sealing::sealed_epoch(&raw)? {
            Some(e) if e < epoch => {}
            _ => continue,
        }
        let m = sealing::open_message(ring, &raw, None)?;
        let resealed = sealing::seal_message(m, current, &key);
        if state
            .compare_and_swap(&mkey, Some(raw), Some(resealed))
            .map_err(io::Error::other)?
            .is_err()
        {
            left += 1;
        } else {
            count += 1;
        }
    }
    metrics::counter!(crate::metrics::ERASURE_RECORDS_RESEALED).increment(count);
    Ok(left)
}

/// Asks openraft for the snapshot or purge that clears a shard's past epochs.
async fn act(shard: &Shard, found: &Findings) {
    let (snapshot_upto, applied) = {
        let m = shard.raft.metrics();
        let m = m.borrow_watched();
        (
            m.snapshot.as_ref().map(|id| id.index),
            m.last_applied.as_ref().map(|id| id.index),
        )
    };
    let purge = match found.log_sealed_upto {
        Some(upto) if snapshot_upto >= Some(upto) => Some(upto),
        // Entries sealed with a past key are not applied yet (a replica cut
        // off from its leader): a snapshot now would cover nothing new, and
        // one every round would copy the whole tree for nothing.
        Some(_) if applied <= snapshot_upto => return,
        Some(_) => None,
        None if found.old_snapshot_key => None,
        None => return,
    };
    let result = match purge {
        Some(upto) => {
            metrics::counter!(crate::metrics::ERASURE_PURGES_FORCED).increment(1);
            shard.raft.trigger().purge_log(upto).await
        }
        None => {
            metrics::counter!(crate::metrics::ERASURE_SNAPSHOTS_FORCED).increment(1);
            shard.raft.trigger().snapshot().await
        }
    };
    if let Err(e) = result {
        tracing::warn!(shard = %shard.id, error = %e, "erasure: snapshot or purge");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::api::pb::replicated::{self_destruct, MessageRecord, SelfDestruct};
    use crate::shard::memtable::{Memtable, Pending};

    /// A key ring with short epochs and a state tree holding one
    /// self-destructing record (chat 1, seq 1, `body`) sealed with the key
    /// of the epoch current now: the ring's folder, the ring, the tree, the
    /// record's key and its epoch.
    fn one_sealed_record(
        body: &'static [u8],
    ) -> (tempfile::TempDir, KeyRing, sled::Tree, Vec<u8>, u64) {
        let dir = tempfile::tempdir().unwrap();
        let ring = KeyRing::open(&dir.path().join("keys"), Duration::from_millis(50)).unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("state").unwrap();
        let (past, key) = ring.current_key().unwrap();
        let message = MessageRecord {
            chat_id: 1,
            seq: 1,
            body: body.into(),
            self_destruct: Some(SelfDestruct {
                policy: Some(self_destruct::Policy::AfterSendSecs(5)),
            }),
            expire_at_ms: 5_000,
            ..Default::default()
        };
        let mkey = keys::message(1, 1);
        tree.insert(&mkey, sealing::seal_message(message, past, &key))
            .unwrap();
        tree.insert(keys::ttl(5_000, 1, 1), Vec::new()).unwrap();
        (dir, ring, tree, mkey, past)
    }

    /// Waits (at most 10 s) until `ring`'s epoch is past `past`; the epoch.
    fn next_epoch(ring: &KeyRing, past: u64) -> u64 {
        let started = Instant::now();
        while ring.current_epoch() <= past {
            assert!(started.elapsed() < Duration::from_secs(10), "epoch moves");
            std::thread::sleep(Duration::from_millis(10));
        }
        ring.current_epoch()
    }

    /// A self-destructing record sealed in a past epoch is re-sealed with
    /// the current key even while a write to it waits in the memtable (an
    /// expiry about to remove it), so the round is clean and the past key
    /// can go; the waiting write still reads first and lands over it.
    #[test]
    fn a_record_with_a_write_waiting_is_resealed_too() {
        let (_dir, ring, tree, mkey, past) = one_sealed_record(b"gone soon");
        // The expiry's removal of the record, applied but not flushed.
        let pending = Memtable::unshared();
        pending.extend(
            [(mkey.clone(), None::<Pending>)],
            crate::shard::types::log_id(1, 7),
        );
        let epoch = next_epoch(&ring, past);
        assert_eq!(reseal_records(&tree, &ring, epoch).unwrap(), 0);
        let stored = tree.get(&mkey).unwrap().unwrap();
        assert!(sealing::sealed_epoch(&stored).unwrap() >= Some(epoch));
        let opened = sealing::open_message(&ring, &stored, None).unwrap();
        assert_eq!(&opened.body[..], b"gone soon");
        assert_eq!(pending.get(&mkey), Some(None), "the removal still waits");
        // Nothing from a past epoch is left, so a second round does nothing.
        assert_eq!(reseal_records(&tree, &ring, epoch).unwrap(), 0);
        assert_eq!(tree.get(&mkey).unwrap().unwrap(), stored);
    }

    /// A reader that read a record before the eraser re-sealed it, and opens
    /// it after the record's old key was destroyed, reads it once more.
    #[test]
    fn a_reader_whose_key_was_destroyed_under_it_reads_the_record_again() {
        let (_dir, ring, tree, mkey, past) = one_sealed_record(b"read late");
        let read_before = tree.get(&mkey).unwrap().unwrap().to_vec();
        let epoch = next_epoch(&ring, past);
        assert_eq!(reseal_records(&tree, &ring, epoch).unwrap(), 0);
        ring.destroy_before(epoch).unwrap();
        let gone = sealing::open_message(&ring, &read_before, None).unwrap_err();
        assert_eq!(gone.kind(), std::io::ErrorKind::NotFound, "{gone}");
        let read_again = || Ok(tree.get(&mkey).unwrap().map(|v| v.to_vec()));
        let opened = sealing::open_read(&ring, &read_before, read_again)
            .unwrap()
            .expect("the record, read again");
        assert_eq!(&opened.body[..], b"read late");
        // A record gone since (expired and removed) is not there.
        assert!(sealing::open_read(&ring, &read_before, || Ok(None))
            .unwrap()
            .is_none());
    }
}
