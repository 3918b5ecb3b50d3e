//! A shard's Raft log: openraft's `RaftLogStorage`, over the node's
//! [`RaftLog`] (one set of append-only files for every shard).
//!
//! openraft is told an append is durable only from the Raft log's
//! group-commit thread, after an `fdatasync` that covers it. The vote is
//! synced before `save_vote` returns, a truncation before `truncate_after`
//! does. Before purging, everything the state machine wrote to sled is
//! synced, so the purged entries are never needed again.
//!
//! Entries are stored as `LogEntryRecord` (prost, versioned); the membership
//! inside a membership entry is openraft's type, as JSON. Self-destructing
//! bodies inside entries are sealed with the node's current epoch key
//! ([`crate::shard::sealing`]); the log keeps each entry's epoch, so the
//! eraser knows which entries keep an old key alive.
//!
//! A data folder written before the Raft log left sled holds each shard's
//! log in a sled tree; opening the shard moves it into the Raft log (synced)
//! and then drops the tree. A crash part-way repeats the move.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::EntryPayload as OpenraftPayload;
use prost::Message;

use crate::api::codec::{decode, from_json, to_json, REPLICATED_FORMAT_VERSION};
use crate::api::pb::replicated::{log_entry_record, LogEntryRecord};
use crate::shard::sealing;
use crate::shard::types::{log_id, Entry, LogId, Proposal, TypeConfig, Vote};
use crate::storage::raft_log::EntryBytes;
use crate::storage::{keys, trees, Durability, KeyRing, RaftLog, Storage, ENTRY_BYTES_MAX};
use crate::types::ShardId;

/// Shortest time between two writes of the committed pointer.
const COMMITTED_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Most bytes of entries in one AppendEntries (one entry if it is larger):
/// well within the HTTP/2 stream window (which every shard's appends to one
/// peer share, `api::http2`), so a call to a distant follower is not held
/// up by flow control past its timeout and repeated for ever.
const APPEND_BYTES_MAX: usize = 1024 * 1024;

/// Entries moved from a sled log tree per append.
const IMPORT_CHUNK_ENTRIES: usize = 256;

#[derive(Clone)]
pub struct LogStore {
    shard: ShardId,
    log: RaftLog,
    /// sled's group commit: the state machines' writes are synced before a
    /// purge.
    sled_durability: Durability,
    keys: Arc<KeyRing>,
    /// When the committed pointer was last written.
    committed_saved_at: Option<std::time::Instant>,
}

impl LogStore {
    pub async fn open(storage: &Storage, shard: ShardId) -> io::Result<LogStore> {
        let store = LogStore {
            shard,
            log: storage.raft_log().clone(),
            sled_durability: storage.durability().clone(),
            keys: storage.keys().clone(),
            committed_saved_at: None,
        };
        store.import_sled_tree(storage).await?;
        Ok(store)
    }

    /// The last entry whose bodies were sealed with an epoch key older than
    /// `epoch` (for the eraser).
    pub fn last_sealed_before(&self, epoch: u64) -> io::Result<Option<u64>> {
        self.log.last_sealed_before(self.shard.0, epoch)
    }

    /// Moves a log kept in sled by an older version into the Raft log.
    async fn import_sled_tree(&self, storage: &Storage) -> io::Result<()> {
        let name = trees::log_tree(self.shard);
        let db = storage.db();
        let exists = db
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == name.as_bytes());
        if !exists {
            return Ok(());
        }
        let tree = storage.open_tree(&name)?;
        let shard = self.shard.0;
        // Whatever an interrupted move left goes first.
        self.log.drop_shard(shard)?;
        if let Some(v) = tree.get(keys::LOG_META_VOTE).map_err(io::Error::other)? {
            self.log.save_vote(shard, &v)?;
        }
        if let Some(v) = tree
            .get(keys::LOG_META_COMMITTED)
            .map_err(io::Error::other)?
        {
            self.log.save_committed(shard, &v)?;
        }
        let mut start = 0;
        if let Some(v) = tree.get(keys::LOG_META_PURGED).map_err(io::Error::other)? {
            let purged: LogId = from_json(&v, "purged log id")?;
            self.log.purge(shard, purged.index, &v)?;
            // sled's purge wrote the id before removing the entries.
            start = purged.index + 1;
        }
        let mut moved = 0usize;
        let mut iter = tree.range(keys::log_entry(start)..vec![keys::LOG_ENTRY_TAG + 1]);
        loop {
            let mut chunk: Vec<(LogEntryRecord, sled::IVec)> = Vec::new();
            for pair in iter.by_ref().take(IMPORT_CHUNK_ENTRIES) {
                let (_, v) = pair.map_err(io::Error::other)?;
                chunk.push((decode(&v, "log entry")?, v));
            }
            if chunk.is_empty() {
                break;
            }
            let entries: Vec<EntryBytes<'_>> = chunk
                .iter()
                .map(|(rec, bytes)| EntryBytes {
                    index: rec.index,
                    term: rec.term,
                    sealed_epoch: rec.sealed_epoch,
                    bytes,
                })
                .collect();
            self.log.append(shard, &entries)?;
            moved += chunk.len();
        }
        self.log.sync().await?;
        db.drop_tree(name.as_bytes()).map_err(io::Error::other)?;
        // Else a crash could bring the tree back after this log moved on,
        // and the move would run again over newer votes and entries.
        storage.durability().sync().await?;
        tracing::info!(shard = %self.shard, entries = moved, "moved the shard's Raft log out of sled");
        Ok(())
    }
}

/// The stored form of an entry, with self-destructing bodies sealed, and the
/// epoch that sealed them (0: none).
pub fn encode_entry(keys: &KeyRing, entry: &Entry) -> io::Result<(Vec<u8>, u64)> {
    let mut sealed_epoch = 0;
    let payload = match &entry.payload {
        OpenraftPayload::Blank => log_entry_record::Payload::Blank(true),
        OpenraftPayload::Normal(p) => {
            let (epoch, key) = keys.current_key()?;
            let bytes = match sealing::seal_batch(&p.batch, epoch, &key) {
                Some(sealed) => {
                    sealed_epoch = epoch;
                    sealed.encode_to_vec()
                }
                None => p.batch.encode_to_vec(),
            };
            log_entry_record::Payload::Normal(bytes.into())
        }
        OpenraftPayload::Membership(m) => {
            log_entry_record::Payload::MembershipJson(to_json(&m).into())
        }
    };
    let rec = LogEntryRecord {
        format_version: REPLICATED_FORMAT_VERSION,
        term: entry.log_id.leader_id.term,
        index: entry.log_id.index,
        payload: Some(payload),
        sealed_epoch,
    };
    let bytes = rec.encode_to_vec();
    if bytes.len() > ENTRY_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "log entry {} is {} bytes; the limit is {ENTRY_BYTES_MAX}",
                entry.log_id.index,
                bytes.len()
            ),
        ));
    }
    Ok((bytes, sealed_epoch))
}

/// An entry from its stored form, with sealed bodies opened.
pub fn decode_entry(keys: &KeyRing, bytes: &[u8]) -> io::Result<Entry> {
    let rec: LogEntryRecord = decode(bytes, "log entry")?;
    if rec.format_version != REPLICATED_FORMAT_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "log entry format version {} is not supported",
                rec.format_version
            ),
        ));
    }
    let payload = match rec.payload {
        Some(log_entry_record::Payload::Blank(_)) => OpenraftPayload::Blank,
        Some(log_entry_record::Payload::Normal(b)) => {
            let mut batch = decode(&b, "command batch")?;
            if rec.sealed_epoch != 0 {
                sealing::open_batch(keys, &mut batch)?;
            }
            OpenraftPayload::Normal(Proposal { batch })
        }
        Some(log_entry_record::Payload::MembershipJson(b)) => {
            OpenraftPayload::Membership(from_json(&b, "membership")?)
        }
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "log entry without payload",
            ))
        }
    };
    Ok(Entry {
        log_id: log_id(rec.term, rec.index),
        payload,
    })
}

impl LogStore {
    /// The index of the first membership entry in this log past `index`,
    /// if any (the log of a stopped replica: read in bounded chunks).
    pub fn membership_after(&self, index: u64) -> io::Result<Option<u64>> {
        self.membership_after_in_chunks(index, APPEND_BYTES_MAX)
    }

    fn membership_after_in_chunks(
        &self,
        index: u64,
        chunk_bytes: usize,
    ) -> io::Result<Option<u64>> {
        let Some((_, last)) = self.log.last(self.shard.0)? else {
            return Ok(None);
        };
        let mut from = index.saturating_add(1);
        while from <= last {
            let chunk = self
                .log
                .read_up_to(self.shard.0, from, last + 1, chunk_bytes)?;
            if chunk.is_empty() {
                break;
            }
            for bytes in &chunk {
                let entry = decode_entry(&self.keys, bytes)?;
                if matches!(entry.payload, OpenraftPayload::Membership(_)) {
                    return Ok(Some(entry.log_id.index));
                }
                from = entry.log_id.index + 1;
            }
        }
        Ok(None)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let from = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        self.log
            .read(self.shard.0, from, to)?
            .iter()
            .map(|bytes| decode_entry(&self.keys, bytes))
            .collect()
    }

    /// What replication sends in one AppendEntries: entries up to
    /// [`APPEND_BYTES_MAX`], so that a follower far behind gets calls that
    /// fit its stream's window and the call timeout, not 512 full entries.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, io::Error> {
        self.log
            .read_up_to(self.shard.0, start, end, APPEND_BYTES_MAX)?
            .iter()
            .map(|bytes| decode_entry(&self.keys, bytes))
            .collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        match self.log.vote(self.shard.0)? {
            Some(v) => Ok(Some(from_json(&v, "vote")?)),
            None => Ok(None),
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged: Option<LogId> = match self.log.purged(self.shard.0)? {
            Some(v) => Some(from_json(&v, "purged log id")?),
            None => None,
        };
        let last = self
            .log
            .last(self.shard.0)?
            .map(|(term, index)| log_id(term, index))
            .or(purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.log.save_vote(self.shard.0, &to_json(vote))?;
        self.log.sync().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Only lets a restarted replica apply what it knew was committed
        // without waiting for a leader; an older value is as safe (it was
        // committed too) and none at all only means re-learning the commit
        // index from the leader. So it is written at most every
        // COMMITTED_SAVE_INTERVAL, not once per commit, and made durable by
        // the next group commit.
        let now = std::time::Instant::now();
        if self
            .committed_saved_at
            .is_some_and(|at| now.duration_since(at) < COMMITTED_SAVE_INTERVAL)
        {
            return Ok(());
        }
        self.committed_saved_at = Some(now);
        self.log.save_committed(self.shard.0, &to_json(&committed))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        match self.log.committed(self.shard.0)? {
            Some(v) => Ok(from_json::<Option<LogId>>(&v, "committed log id")?),
            None => Ok(None),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        // The key that seals bodies stays alive until they are written.
        let keys = self.keys.clone();
        let _sealing = keys.hold();
        let mut encoded = Vec::new();
        for entry in entries {
            let (bytes, sealed_epoch) = encode_entry(&self.keys, &entry)?;
            // Read-back check: what we store must decode to what we were given.
            debug_assert_eq!(decode_entry(&self.keys, &bytes)?.log_id, entry.log_id);
            encoded.push((entry.log_id, sealed_epoch, bytes));
        }
        let entries: Vec<EntryBytes<'_>> = encoded
            .iter()
            .map(|(id, sealed_epoch, bytes)| EntryBytes {
                index: id.index,
                term: id.leader_id.term,
                sealed_epoch: *sealed_epoch,
                bytes,
            })
            .collect();
        self.log.append(self.shard.0, &entries)?;
        self.log.after_sync(move |r| callback.io_completed(r));
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> Result<(), io::Error> {
        let from = match last {
            Some(id) => id.index + 1,
            None => 0,
        };
        tracing::debug!(shard = %self.shard, from, "truncate log");
        self.log.truncate(self.shard.0, from)?;
        self.log.sync().await
    }

    async fn purge(&mut self, upto: LogId) -> Result<(), io::Error> {
        // Everything applied up to `upto` (state and snapshot) is durable
        // before the entries go.
        self.sled_durability.sync().await?;
        self.log.purge(self.shard.0, upto.index, &to_json(&upto))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::types::EntryPayload;

    fn blank(term: u64, index: u64) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Blank,
        }
    }

    /// A stopped replica's log says whether it holds a membership past a
    /// given index (closing a replica checks it: see `Registry::close_replica`).
    #[tokio::test]
    async fn finds_the_first_membership_past_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let shard = ShardId(2);
        let log = LogStore::open(&storage, shard).await.unwrap();
        assert_eq!(log.membership_after(0).unwrap(), None, "an empty log");
        let members = crate::shard::types::Membership::new_with_defaults(
            vec![std::collections::BTreeSet::from([1, 2, 3])],
            [],
        );
        let entries: Vec<Entry> = (1..=2_000)
            .map(|index| match index {
                7 | 1_900 => Entry {
                    log_id: log_id(2, index),
                    payload: EntryPayload::Membership(members.clone()),
                },
                _ => blank(2, index),
            })
            .collect();
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .iter()
            .map(|e| (e.log_id.index, encode_entry(storage.keys(), e).unwrap().0))
            .collect();
        let bytes: Vec<EntryBytes<'_>> = encoded
            .iter()
            .map(|(index, bytes)| EntryBytes {
                index: *index,
                term: 2,
                sealed_epoch: 0,
                bytes,
            })
            .collect();
        storage.raft_log().append(shard.0, &bytes).unwrap();
        assert_eq!(log.membership_after(0).unwrap(), Some(7));
        assert_eq!(log.membership_after(6).unwrap(), Some(7));
        assert_eq!(log.membership_after(7).unwrap(), Some(1_900));
        assert_eq!(log.membership_after(1_900).unwrap(), None);
        assert_eq!(log.membership_after(5_000).unwrap(), None);
        // In chunks of a few entries, as a long log is read.
        assert_eq!(log.membership_after_in_chunks(8, 100).unwrap(), Some(1_900));
        assert_eq!(log.membership_after_in_chunks(1_900, 100).unwrap(), None);
    }

    /// A data folder from before the Raft log left sled: opening the shard
    /// moves its log, vote, committed and purged ids, and drops the tree.
    #[tokio::test]
    async fn a_log_kept_in_sled_is_moved_into_the_raft_log() {
        let dir = tempfile::tempdir().unwrap();
        let shard = ShardId(4);
        let vote = Vote::new(3, 2);
        {
            let storage = Storage::open(dir.path()).unwrap();
            let tree = storage.open_tree(&trees::log_tree(shard)).unwrap();
            tree.insert(keys::LOG_META_VOTE, to_json(&vote)).unwrap();
            tree.insert(keys::LOG_META_COMMITTED, to_json(&Some(log_id(2, 6))))
                .unwrap();
            tree.insert(keys::LOG_META_PURGED, to_json(&log_id(1, 4)))
                .unwrap();
            // An entry at or below the purged id (sled's purge wrote the id
            // before removing entries), and more than one chunk of the move.
            for index in [3].into_iter().chain(5..=600) {
                let (bytes, _) = encode_entry(storage.keys(), &blank(2, index)).unwrap();
                tree.insert(keys::log_entry(index), bytes).unwrap();
            }
            storage.durability().sync().await.unwrap();
        }
        let storage = Storage::open_once_unlocked(dir.path());
        let mut log = LogStore::open(&storage, shard).await.unwrap();
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 4)));
        assert_eq!(state.last_log_id, Some(log_id(2, 600)));
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 6)));
        let entries = log.try_get_log_entries(0..1000).await.unwrap();
        let ids: Vec<_> = entries.iter().map(|e| e.log_id).collect();
        assert_eq!(ids, (5..=600).map(|i| log_id(2, i)).collect::<Vec<_>>());
        let name = trees::log_tree(shard);
        assert!(!storage
            .db()
            .tree_names()
            .iter()
            .any(|n| n.as_ref() == name.as_bytes()));
        // Opening again finds nothing to move and the same log.
        drop(log);
        let mut log = LogStore::open(&storage, shard).await.unwrap();
        assert_eq!(
            log.get_log_state().await.unwrap().last_log_id,
            Some(log_id(2, 600))
        );
    }
}
