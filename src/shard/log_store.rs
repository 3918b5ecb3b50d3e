//! A shard's Raft log in sled: openraft's `RaftLogStorage`.
//!
//! Entries are written with plain inserts in index order; sled recovers a
//! prefix of its writes, so a crash leaves a prefix of the appended entries.
//! openraft is told an append is durable only from the node's group-commit
//! thread, after a flush and an `fdatasync` that cover it. The vote is synced
//! before `save_vote` returns. Before purging, everything the state machine
//! wrote is synced too, so the purged entries are never needed again.
//!
//! Entries are stored as `LogEntryRecord` (prost, versioned); the membership
//! inside a membership entry is openraft's type, as JSON. Self-destructing
//! bodies inside entries are sealed with the node's current epoch key
//! ([`crate::shard::sealing`]); the record says which epoch, so the eraser
//! knows which entries keep an old key alive.

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
use crate::storage::{keys, trees, Durability, KeyRing, Storage, ENTRY_BYTES_MAX};
use crate::types::ShardId;

/// Shortest time between two writes of the committed pointer.
const COMMITTED_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Clone)]
pub struct LogStore {
    shard: ShardId,
    tree: sled::Tree,
    durability: Durability,
    keys: Arc<KeyRing>,
    /// When the committed pointer was last written.
    committed_saved_at: Option<std::time::Instant>,
}

impl LogStore {
    pub fn open(storage: &Storage, shard: ShardId) -> io::Result<LogStore> {
        Ok(LogStore {
            shard,
            tree: storage.open_tree(&trees::log_tree(shard))?,
            durability: storage.durability().clone(),
            keys: storage.keys().clone(),
            committed_saved_at: None,
        })
    }

    /// The log tree (for the eraser, which only reads it).
    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    fn meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> io::Result<Option<T>> {
        match self.tree.get(key).map_err(io::Error::other)? {
            Some(v) => Ok(Some(from_json(&v, what)?)),
            None => Ok(None),
        }
    }

    fn last_entry_id(&self) -> io::Result<Option<LogId>> {
        let start = keys::log_entry(0);
        match self.tree.range(start..).next_back() {
            Some(pair) => {
                let (_, v) = pair.map_err(io::Error::other)?;
                Ok(Some(decode_entry(&self.keys, &v)?.log_id))
            }
            None => Ok(None),
        }
    }
}

/// The stored form of an entry, with self-destructing bodies sealed.
pub fn encode_entry(keys: &KeyRing, entry: &Entry) -> io::Result<Vec<u8>> {
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
    Ok(bytes)
}

/// The stored record's epoch of sealed bodies (0 = none), without opening it.
pub fn entry_sealed_epoch(bytes: &[u8]) -> io::Result<u64> {
    let rec: LogEntryRecord = decode(bytes, "log entry")?;
    Ok(rec.sealed_epoch)
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

fn bound_key(b: Bound<&u64>) -> Bound<Vec<u8>> {
    match b {
        Bound::Included(i) => Bound::Included(keys::log_entry(*i)),
        Bound::Excluded(i) => Bound::Excluded(keys::log_entry(*i)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Unbounded => Bound::Included(keys::log_entry(0)),
            b => bound_key(b),
        };
        let end = match range.end_bound() {
            Bound::Unbounded => Bound::Excluded(vec![keys::LOG_ENTRY_TAG + 1]),
            b => bound_key(b),
        };
        let mut out = Vec::new();
        for pair in self.tree.range::<Vec<u8>, _>((start, end)) {
            let (_, v) = pair.map_err(io::Error::other)?;
            out.push(decode_entry(&self.keys, &v)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.meta(keys::LOG_META_VOTE, "vote")
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let purged: Option<LogId> = self.meta(keys::LOG_META_PURGED, "purged log id")?;
        let last = self.last_entry_id()?.or(purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.tree
            .insert(keys::LOG_META_VOTE, to_json(vote))
            .map_err(io::Error::other)?;
        self.durability.sync().await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Only lets a restarted replica apply what it knew was committed
        // without waiting for a leader; an older value is as safe (it was
        // committed too) and none at all only means re-learning the commit
        // index from the leader. So it is written at most every
        // COMMITTED_SAVE_INTERVAL, not once per commit: under load that was
        // one sled write of about ten per entry on every replica. Made
        // durable by the next group commit.
        let now = std::time::Instant::now();
        if self
            .committed_saved_at
            .is_some_and(|at| now.duration_since(at) < COMMITTED_SAVE_INTERVAL)
        {
            return Ok(());
        }
        self.committed_saved_at = Some(now);
        self.tree
            .insert(keys::LOG_META_COMMITTED, to_json(&committed))
            .map_err(io::Error::other)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self
            .meta::<Option<LogId>>(keys::LOG_META_COMMITTED, "committed log id")?
            .flatten())
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
        let keys = self.keys.clone();
        let _sealing = keys.hold();
        for entry in entries {
            let bytes = encode_entry(&self.keys, &entry)?;
            // Read-back check: what we store must decode to what we were given.
            debug_assert_eq!(decode_entry(&self.keys, &bytes)?.log_id, entry.log_id);
            self.tree
                .insert(keys::log_entry(entry.log_id.index), bytes)
                .map_err(io::Error::other)?;
        }
        self.durability
            .after_sync(move |r| callback.io_completed(r));
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> Result<(), io::Error> {
        let from = match last {
            Some(id) => id.index + 1,
            None => 0,
        };
        tracing::debug!(shard = %self.shard, from, "truncate log");
        let keys: Vec<_> = self
            .tree
            .range(keys::log_entry(from)..vec![keys::LOG_ENTRY_TAG + 1])
            .keys()
            .collect::<Result<_, _>>()
            .map_err(io::Error::other)?;
        // Remove from the end, so a crash midway leaves a prefix.
        for k in keys.into_iter().rev() {
            self.tree.remove(k).map_err(io::Error::other)?;
        }
        self.durability.sync().await
    }

    async fn purge(&mut self, upto: LogId) -> Result<(), io::Error> {
        // Everything applied up to `upto` (state and snapshot) is durable
        // before the entries go.
        self.durability.sync().await?;
        self.tree
            .insert(keys::LOG_META_PURGED, to_json(&upto))
            .map_err(io::Error::other)?;
        let keys: Vec<_> = self
            .tree
            .range(keys::log_entry(0)..=keys::log_entry(upto.index))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(io::Error::other)?;
        for k in keys {
            self.tree.remove(k).map_err(io::Error::other)?;
        }
        Ok(())
    }
}
