//! Reads from a replica's applied state. Callers decide beforehand whether the
//! replica may serve (read-index barrier, applied ≥ token, or stale).
//!
//! A read never returns a message whose `expire_at` has passed by this node's
//! clock plus [`CLOCK_OFFSET_MS_MAX`], even if the expiry command has not been
//! applied yet.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;

use xxhash_rust::xxh3::Xxh3;

use crate::api::codec::decode;
use crate::api::pb::node::ChatDigest;
use crate::api::pb::replicated::{ChangeRecord, ChatRecord, MessageRecord};
use crate::api::pb::{self, ChangeKind};
use crate::shard::chat_cache::{CachedMessage, ChatCache, TAIL_MESSAGES_MAX};
use crate::shard::memtable::View;
use crate::shard::sealing;
use crate::storage::{keys, KeyRing};
use crate::types::now_ms;

/// The most a node's clock may be off from its peers'. Reads hide messages
/// this long before they expire so that no replica shows one after expiry.
pub const CLOCK_OFFSET_MS_MAX: u64 = 500;
/// Largest page of messages or changes one read returns.
pub const PAGE_MAX: u32 = 1000;
/// Most bytes of messages one history page or one chat's difference holds
/// past its first message, and one GetMessages answer at all: with one more
/// 64 KiB body over it, a reply stays under the 4 MiB a gRPC client takes
/// by default. A page cut short by bytes goes on from its oldest message.
pub const PAGE_BYTES_MAX: usize = 3 * 1024 * 1024;

/// What [`StateReader::digests`] covers: 1 = the chat record, its messages,
/// and its change, dedup, read-cursor and delete-after-read records (0, of
/// older nodes: the chat record and its messages).
pub const DIGEST_FORMAT: u32 = 1;
/// Most read cursors `chat` returns.
pub const READ_CURSORS_MAX: usize = 1000;

#[derive(Clone)]
pub struct StateReader {
    /// The replica's memtable over its sled tree.
    tree: View,
    keys: Arc<KeyRing>,
    /// The incarnation once known (0 before). The bootstrap command sets it
    /// once for the whole Raft group, so it never changes after that, and
    /// every read reports it: caching saves a sled lookup per read.
    incarnation: Arc<std::sync::atomic::AtomicU64>,
    /// Chat records and the newest messages of recently read chats, kept
    /// current by the state machine.
    chats: Arc<ChatCache>,
    /// The state machine's snapshot loads into `tree`.
    loads: Arc<SnapshotLoads>,
}

/// Counts the snapshot loads into a state tree, begun and finished: odd
/// while one is under way. A load empties the tree and fills it key by key
/// while readers may read it, so a read that overlaps one can see a mix of
/// the old state, the new one and neither (a chat without its record, a
/// change without its message). A reader takes [`SnapshotLoads::count`]
/// before reading and throws the result away unless
/// [`SnapshotLoads::unchanged`] says no load began meanwhile.
///
/// It also keeps the newest log index whose effects may be in the tree
/// ([`SnapshotLoads::written_through`]), set before an apply call writes
/// them and before a snapshot loads: openraft's applied index moves only
/// after, so a read's position, which must cover what it returned, takes
/// this too.
#[derive(Debug, Default)]
pub struct SnapshotLoads(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64);

impl SnapshotLoads {
    pub fn count(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The newest log index whose effects may be in the tree (0: none noted
    /// since the shard opened).
    pub fn written_through(&self) -> u64 {
        self.1.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Notes that effects up to `index` (committed) are about to be written.
    pub fn note_writing(&self, index: u64) {
        self.1.fetch_max(index, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a load is under way at `count`.
    pub fn under_way(count: u64) -> bool {
        count % 2 == 1
    }

    /// Whether a read that started at `count` overlapped no load.
    pub fn unchanged(&self, count: u64) -> bool {
        !SnapshotLoads::under_way(count) && self.count() == count
    }

    /// Marks a load begun (the count goes odd) or finished (even again).
    pub fn step(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("chat {chat} is closed: {reason}")]
    ChatClosed { chat: u64, reason: String },
    #[error("the {count} messages asked for come to more than {PAGE_BYTES_MAX} bytes; ask for fewer at a time")]
    TooLarge { count: usize },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<crate::api::codec::DecodeError> for ReadError {
    fn from(e: crate::api::codec::DecodeError) -> ReadError {
        ReadError::Io(e.into())
    }
}

fn io_err(e: sled::Error) -> io::Error {
    io::Error::other(e)
}

/// The first messages of `page` (encoded) up to [`PAGE_BYTES_MAX`] bytes,
/// and always the first.
fn cap_bytes(mut page: Vec<Bytes>) -> Vec<Bytes> {
    let mut bytes = 0;
    if let Some(over) = page.iter().position(|m| {
        bytes += m.len();
        bytes > PAGE_BYTES_MAX
    }) {
        page.truncate(over.max(1));
    }
    page
}

/// The public message `m` reads as, encoded (as a page carries it).
pub fn encode_public(m: MessageRecord) -> Bytes {
    Bytes::from(to_public(m).encode_to_vec())
}

/// A page as the public messages it encodes (for tests).
#[cfg(test)]
pub(crate) fn decoded(page: Vec<Bytes>) -> Vec<pb::Message> {
    page.into_iter()
        .map(|m| pb::Message::decode(m).expect("an encoded message"))
        .collect()
}

/// Messages keyed by the (seq, pts) of the change that names them.
type MessagesByChange = HashMap<(u64, u64), MessageRecord>;

pub fn visible(m: &MessageRecord, now: u64) -> bool {
    m.expire_at_ms == 0 || m.expire_at_ms > now + CLOCK_OFFSET_MS_MAX
}

pub fn to_public(m: MessageRecord) -> pb::Message {
    use crate::api::pb::replicated::self_destruct::Policy as Stored;
    use pb::self_destruct_policy::Policy;
    let self_destruct = m
        .self_destruct
        .and_then(|s| s.policy)
        .map(|p| pb::SelfDestructPolicy {
            policy: Some(match p {
                Stored::AfterSendSecs(s) => Policy::AfterSendSecs(s),
                Stored::AfterReadSecs(s) => Policy::AfterReadSecs(s),
            }),
        });
    pb::Message {
        chat_id: m.chat_id,
        seq: m.seq,
        sender_id: m.sender_id,
        client_msg_id: m.client_msg_id,
        body: m.body,
        created_at_ms: m.created_at_ms,
        edited_at_ms: m.edited_at_ms,
        expire_at_ms: m.expire_at_ms,
        deleted: m.deleted,
        pts: m.pts,
        self_destruct,
    }
}

/// A new message's change kind as the state tree stores it.
const NEW: i32 = crate::api::pb::replicated::ChangeKind::New as i32;

/// Whether `c` is a new message's change inferred by a read (rules 3), not
/// a stored record: it names no sender.
fn implied(c: &ChangeRecord) -> bool {
    c.kind == NEW && c.user_id == 0
}

fn change_kind(k: i32) -> ChangeKind {
    use crate::api::pb::replicated::ChangeKind as R;
    match R::try_from(k).unwrap_or(R::Unspecified) {
        R::New => ChangeKind::NewMessage,
        R::Edit => ChangeKind::EditMessage,
        R::Delete => ChangeKind::DeleteMessage,
        R::Expire => ChangeKind::ExpireMessage,
        R::Read => ChangeKind::Read,
        R::Close => ChangeKind::Close,
        R::Reopen => ChangeKind::Reopen,
        R::Unspecified => ChangeKind::Unspecified,
    }
}

impl StateReader {
    pub fn new(tree: impl Into<View>, keys: Arc<KeyRing>, chats: Arc<ChatCache>) -> StateReader {
        StateReader {
            tree: tree.into(),
            keys,
            incarnation: Default::default(),
            chats,
            loads: Default::default(),
        }
    }

    /// This reader with the snapshot loads of the state machine that
    /// writes its tree.
    pub fn watching(mut self, loads: Arc<SnapshotLoads>) -> StateReader {
        self.loads = loads;
        self
    }

    /// The snapshot loads into this reader's tree.
    pub fn loads(&self) -> &SnapshotLoads {
        &self.loads
    }

    pub fn has_key(&self, key: &[u8]) -> bool {
        matches!(self.tree.contains_key(key), Ok(true))
    }

    /// The shard's incarnation; 0 until its bootstrap command is applied.
    pub fn incarnation(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let known = self.incarnation.load(Relaxed);
        if known != 0 {
            return known;
        }
        let stored = match self.tree.get(keys::SM_META_INCARNATION) {
            Ok(Some(v)) => v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0),
            _ => 0,
        };
        self.incarnation.store(stored, Relaxed);
        stored
    }

    /// The earliest expire_at in the TTL index, if any message has one.
    pub fn earliest_expiry(&self) -> io::Result<Option<u64>> {
        match self.tree.scan_prefix([keys::TAG_TTL]).next() {
            Some(pair) => {
                let (k, _) = pair.map_err(io_err)?;
                Ok(keys::part(&k, 0))
            }
            None => Ok(None),
        }
    }

    /// Whether the leader should propose the next dedup collection step:
    /// a pass is under way, or there are dedup records and the last pass
    /// ended at least `window_ms` before `now`. When due, for how long (see
    /// [`StateReader::pass_due`]).
    pub fn dedup_gc_due(&self, window_ms: u64, now: u64) -> io::Result<Option<u64>> {
        self.pass_due(
            keys::SM_META_DEDUP_GC_CURSOR,
            keys::SM_META_DEDUP_GC_PASS_END,
            keys::TAG_DEDUP,
            window_ms,
            now,
        )
    }

    /// Whether the leader should propose a change collection step: a pass
    /// is in progress, or the last one ended a quarter of the retention
    /// ago (so a change lives between one and 1.25 retention windows).
    pub fn change_gc_due(&self, retention_ms: u64, now: u64) -> io::Result<Option<u64>> {
        self.pass_due(
            keys::SM_META_CHANGE_GC_CURSOR,
            keys::SM_META_CHANGE_GC_PASS_END,
            keys::TAG_CHANGE,
            retention_ms / 4,
            now,
        )
    }

    /// A collection pass over the records under `tag` is in progress (its
    /// cursor is set), or there are records and the last pass ended at
    /// least `interval_ms` ago. When due, for how long: since the last pass
    /// ended `interval_ms` ago, so a pass in progress tells how long it has
    /// run (0 until a first pass has ended).
    fn pass_due(
        &self,
        cursor: &[u8],
        pass_end: &[u8],
        tag: u8,
        interval_ms: u64,
        now: u64,
    ) -> io::Result<Option<u64>> {
        let last_end = match self.tree.get(pass_end).map_err(io_err)? {
            Some(v) => v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0),
            None => 0,
        };
        let due_for = match last_end {
            0 => 0,
            end => now.saturating_sub(end.saturating_add(interval_ms)),
        };
        if self.has_key(cursor) {
            return Ok(Some(due_for));
        }
        if self.tree.scan_prefix([tag]).next().is_none() {
            return Ok(None);
        }
        Ok((last_end.saturating_add(interval_ms) <= now).then_some(due_for))
    }

    /// The shard's replicated settings.
    pub fn settings(&self) -> io::Result<crate::api::pb::replicated::ShardSettings> {
        match self.tree.get(keys::SM_META_SETTINGS).map_err(io_err)? {
            Some(v) => Ok(decode(&v, "shard settings")?),
            None => Ok(crate::shard::apply::default_settings()),
        }
    }

    /// Registers interest in `chat`'s changes, for a long poll.
    pub fn chat_waiter(&self, chat: u64) -> crate::shard::chat_cache::ChatWaiter {
        self.chats.waiter(chat)
    }

    /// Ends every long poll on this replica: it stops.
    pub fn stop_waiters(&self) {
        self.chats.stop_waiters();
    }

    pub fn chat_record(&self, chat: u64) -> io::Result<ChatRecord> {
        let miss = match self.chats.get(chat) {
            Ok(rec) => return Ok(rec),
            Err(miss) => miss,
        };
        let rec = self.chat_record_in_tree(chat)?;
        self.chats.fill(chat, &rec, miss);
        Ok(rec)
    }

    /// `chat`'s record as the tree holds it (memtable over sled), past the
    /// chat cache.
    fn chat_record_in_tree(&self, chat: u64) -> io::Result<ChatRecord> {
        Ok(match self.tree.get(keys::chat(chat)).map_err(io_err)? {
            Some(v) => decode(&v, "chat record")?,
            None => ChatRecord::default(),
        })
    }

    fn open_chat(&self, chat: u64) -> Result<ChatRecord, ReadError> {
        let rec = self.chat_record(chat)?;
        if rec.closed {
            return Err(ReadError::ChatClosed {
                chat,
                reason: rec.close_reason,
            });
        }
        Ok(rec)
    }

    fn message(&self, chat: u64, seq: u64) -> io::Result<Option<MessageRecord>> {
        match self.chats.message(chat, seq) {
            Ok(m) => Ok(m),
            Err(_) => self.stored_message(chat, seq),
        }
    }

    /// Forgets the messages kept in memory (a quiet replica's tails hold
    /// memory that busy replicas can use).
    pub fn forget_cached_messages(&self) {
        self.chats.forget_messages();
    }

    /// The message as sled holds it, body opened.
    fn stored_message(&self, chat: u64, seq: u64) -> io::Result<Option<MessageRecord>> {
        let key = keys::message(chat, seq);
        match self.tree.get(&key).map_err(io_err)? {
            Some(v) => self.open_read(&key, &v),
            None => Ok(None),
        }
    }

    /// A message record read at `key`, body opened ([`sealing::open_read`]).
    fn open_read(&self, key: &[u8], raw: &[u8]) -> io::Result<Option<MessageRecord>> {
        sealing::open_read(&self.keys, raw, || {
            Ok(self.tree.get(key).map_err(io_err)?.map(|v| v.to_vec()))
        })
    }

    /// Newest first, strictly below `before_seq` (0 = from the newest);
    /// each an encoded public message (`chatstore.v1.Message`).
    pub fn history(&self, chat: u64, before_seq: u64, limit: u32) -> Result<Vec<Bytes>, ReadError> {
        let rec = self.open_chat(chat)?;
        let now = now_ms();
        let limit = limit.min(PAGE_MAX) as usize;
        // No message has a seq above the chat's last one.
        let newest_end = rec.last_seq.saturating_add(1);
        let end = if before_seq == 0 {
            newest_end
        } else {
            before_seq.min(newest_end)
        };
        // The chat's tail in memory answers most pages near the newest.
        let miss = match self.chats.page(chat, end, limit, |m| visible(m, now)) {
            Ok(page) => {
                metrics::counter!(crate::metrics::READ_CACHE_PAGES, "found" => "memory")
                    .increment(1);
                return Ok(cap_bytes(page));
            }
            Err(miss) => miss,
        };
        metrics::counter!(crate::metrics::READ_CACHE_PAGES, "found" => "sled").increment(1);
        // A page from the newest fills the tail: every record sled holds
        // in the window read, visible or not.
        let newest = end == newest_end;
        // The newest message alone (a client's "last message" read): one
        // point lookup, far cheaper in sled than setting up a range.
        if limit == 1 && end > 1 {
            if let Some(m) = self.stored_message(chat, end - 1)? {
                if visible(&m, now) {
                    if !newest {
                        return Ok(vec![encode_public(m)]);
                    }
                    let m = CachedMessage::from(m);
                    let public = m.public().clone();
                    self.chats.fill_tail(chat, end - 1, end, [m], miss);
                    return Ok(vec![public]);
                }
            }
        }
        // Seqs are dense but for removed (expired) messages, so the page is
        // usually the `limit` seqs below `end`. sled reads a range forwards
        // far more cheaply than backwards (each step back is a new lookup
        // from the root), so that window is read forwards, and only a page
        // it leaves short goes on backwards from the window's start.
        // The window holds at most a page's bytes: its oldest records go
        // as newer ones come past that.
        let start = end.saturating_sub(limit as u64);
        let mut from = start.max(1);
        let mut window = std::collections::VecDeque::with_capacity(limit);
        let mut window_bytes = 0;
        for pair in self
            .tree
            .range(keys::message(chat, start)..keys::message(chat, end))
        {
            let (k, v) = pair.map_err(io_err)?;
            let Some(m) = self.open_read(&k, &v)? else {
                continue;
            };
            window_bytes += m.encoded_len();
            window.push_back(m);
            while window_bytes > PAGE_BYTES_MAX && window.len() > 1 {
                let oldest = window.pop_front().expect("more than one");
                window_bytes -= oldest.encoded_len();
                from = oldest.seq + 1;
            }
        }
        // The newest page fills the tail: each record encoded once, for
        // both. Another page encodes only what it shows.
        let mut out: Vec<Bytes> = if newest {
            let window: Vec<CachedMessage> = window.into_iter().map(CachedMessage::from).collect();
            let out = window
                .iter()
                .filter(|m| visible(m.record(), now))
                .map(|m| m.public().clone())
                .collect();
            self.chats.fill_tail(chat, from, end, window, miss);
            out
        } else {
            window
                .into_iter()
                .filter(|m| visible(m, now))
                .map(encode_public)
                .collect()
        };
        out.reverse();
        // Short of `limit` (removed or hidden messages), the page goes on
        // backwards from the oldest record the window kept; a window cut
        // short by bytes may have kept only hidden ones.
        let mut bytes: usize = out.iter().map(Bytes::len).sum();
        if out.len() < limit {
            for pair in self
                .tree
                .range_rev(keys::message(chat, 0)..keys::message(chat, from))
            {
                if out.len() >= limit || bytes > PAGE_BYTES_MAX {
                    break;
                }
                let (k, v) = pair.map_err(io_err)?;
                let Some(m) = self.open_read(&k, &v)? else {
                    continue;
                };
                if visible(&m, now) {
                    let m = encode_public(m);
                    bytes += m.len();
                    out.push(m);
                }
            }
        }
        Ok(cap_bytes(out))
    }

    /// The messages at `seqs` that are there, each an encoded public
    /// message; an error if they come to more than [`PAGE_BYTES_MAX`].
    pub fn messages(&self, chat: u64, seqs: &[u64]) -> Result<Vec<Bytes>, ReadError> {
        self.open_chat(chat)?;
        let now = now_ms();
        let mut out = Vec::new();
        let mut bytes = 0;
        for seq in seqs {
            if let Some(m) = self.message(chat, *seq)? {
                if visible(&m, now) {
                    let m = encode_public(m);
                    bytes += m.len();
                    if bytes > PAGE_BYTES_MAX {
                        return Err(ReadError::TooLarge { count: seqs.len() });
                    }
                    out.push(m);
                }
            }
        }
        Ok(out)
    }

    /// Changes after `pts`, oldest first.
    /// Changes after `pts`, oldest first: at most `limit`, and no more than
    /// `bytes_max` bytes of messages (0: [`PAGE_BYTES_MAX`]) past the first.
    pub fn difference(
        &self,
        chat: u64,
        pts: u64,
        limit: u32,
        bytes_max: u32,
    ) -> Result<pb::ChatDifference, ReadError> {
        let bytes_max = match bytes_max as usize {
            0 => PAGE_BYTES_MAX,
            b => b.min(PAGE_BYTES_MAX),
        };
        let rec = self.chat_record(chat)?;
        let now = now_ms();
        let limit = limit.clamp(1, PAGE_MAX) as usize;
        let (mut records, mut more, mut reset_required) =
            self.changes_after(chat, &rec, pts, limit)?;
        // Collection drops a prefix of a chat's records and, under rules 3,
        // moves `changes_from_pts` past them in the same apply call, which
        // reaches the memtable before any of it reaches sled. So a record
        // this scan missed because collection ran under it, and whose pts
        // was then read as a new message, shows here, read after the scan
        // and past the chat cache. An answer without inferred changes has
        // no such pts to misread.
        let mut last_pts = rec.last_pts;
        let chat_now = match records.iter().any(implied) {
            true => self.tree.get(keys::chat(chat)).map_err(io_err)?,
            false => None,
        };
        if let Some(v) = chat_now {
            let now_rec: ChatRecord = decode(&v, "chat record")?;
            reset_required |= now_rec.changes_from_pts > pts.saturating_add(1);
            // A reset goes on from the newest pts, which the cache may lag.
            last_pts = last_pts.max(now_rec.last_pts);
        }
        // A closed chat's content stays hidden; its changes still flow, and
        // a new message without a record of its own (rules 3) still names
        // its sender, read from the message.
        let names_message = |c: &ChangeRecord| match change_kind(c.kind) {
            ChangeKind::NewMessage if implied(c) => true,
            ChangeKind::NewMessage | ChangeKind::EditMessage => !rec.closed,
            _ => false,
        };
        if reset_required {
            records.clear();
            more = false;
        }
        let named: Vec<(u64, u64)> = records
            .iter()
            .filter(|c| names_message(c))
            .map(|c| (c.seq, c.pts))
            .collect();
        let (mut messages, unread) = self.messages_as_of(chat, &rec, &named, bytes_max)?;
        let mut last = pts;
        let mut changes = Vec::with_capacity(records.len());
        let mut bytes = 0;
        for c in records {
            if unread.is_some_and(|unread| c.pts >= unread) {
                more = true;
                break;
            }
            let found = match names_message(&c) {
                true => messages.remove(&(c.seq, c.pts)),
                false => None,
            };
            // A new message without a record of its own (rules 3) is
            // named by its sender through the message.
            let user_id = match &found {
                Some(m) if implied(&c) => m.sender_id,
                _ => c.user_id,
            };
            let message = found
                .filter(|m| !rec.closed && visible(m, now))
                .map(to_public);
            bytes += message.as_ref().map_or(0, |m| m.encoded_len());
            if bytes > bytes_max && !changes.is_empty() {
                more = true;
                break;
            }
            last = c.pts;
            changes.push(pb::Change {
                chat_id: chat,
                pts: c.pts,
                kind: change_kind(c.kind) as i32,
                seq: c.seq,
                message,
                user_id,
                reason: c.reason,
            });
        }
        Ok(pb::ChatDifference {
            chat_id: chat,
            changes,
            pts: if reset_required { last_pts } else { last },
            reset_required,
            more,
            // Set by the router from the node's reply.
            served_by_node: 0,
            unavailable: String::new(),
        })
    }

    /// The chat's changes after `pts` up to `rec.last_pts`, oldest first,
    /// at most `limit`, with whether more follow and whether the cursor must
    /// reset. Under apply rules 3 a new message has no change record: each
    /// run of pts without records ends at a record that carries the seq of
    /// the last message sent before it (or, after the last record, at the
    /// chat record, if written under rules 3), so the run is that many new
    /// messages up to that seq. A gap before a record without `last_seq`
    /// (older rules, a record for every pts) is collected changes: at the
    /// start the cursor must reset; later, collection ran under this scan
    /// (sled reads a range a leaf at a time), so the answer stops before it
    /// and the next call starts at the gap.
    ///
    /// The scan stops at `rec.last_pts`. Every record up to there was in the
    /// memtable or in sled before the scan began (the chat cache learns of
    /// an apply call after the memtable does), so only collection can take
    /// one out from under it, which the caller checks for afterwards. A
    /// newer record may be seen without an older one that a flush wrote into
    /// a leaf the scan had already copied: the run before it would be read
    /// as new messages.
    fn changes_after(
        &self,
        chat: u64,
        rec: &ChatRecord,
        pts: u64,
        limit: usize,
    ) -> io::Result<(Vec<ChangeRecord>, bool, bool)> {
        let first = pts.saturating_add(1);
        let mut out = Vec::new();
        if first < rec.changes_from_pts {
            return Ok((out, false, true));
        }
        let end = rec.last_pts.saturating_add(1);
        let mut records = self
            .tree
            .range(keys::change(chat, first)..keys::change(chat, end));
        // Under older rules every pts up to the last has a record.
        let tail_seq = (rec.changes_from_pts >= 1).then_some(rec.last_seq);
        // The next pts the answer has to account for.
        let mut next = first;
        loop {
            if out.len() >= limit {
                return Ok((out, next < end, false));
            }
            let record = match records.next() {
                Some(pair) => Some(decode::<ChangeRecord>(
                    &pair.map_err(io_err)?.1,
                    "change record",
                )?),
                None => None,
            };
            let (until, seq_before) = match &record {
                Some(c) => (c.pts, c.last_seq),
                None => (end, tail_seq),
            };
            if until > next {
                let run = until - next;
                let Some(seq_before) = seq_before.filter(|&s| s >= run) else {
                    let reset = out.is_empty();
                    return Ok((out, !reset, reset));
                };
                for p in next..until {
                    if out.len() >= limit {
                        return Ok((out, true, false));
                    }
                    out.push(ChangeRecord {
                        pts: p,
                        kind: NEW,
                        seq: seq_before - (until - 1 - p),
                        ..Default::default()
                    });
                }
            }
            match record {
                Some(_) if out.len() >= limit => return Ok((out, true, false)),
                Some(c) => {
                    next = c.pts + 1;
                    out.push(c);
                }
                None => return Ok((out, false, false)),
            }
        }
    }

    /// The messages that changes name, each at least as new as its change
    /// (keyed by the change's (seq, pts)); a message sled no longer holds is
    /// left out. The chat's tail in memory answers first. What it misses
    /// among the chat's newest [`TAIL_MESSAGES_MAX`] seqs is read from sled
    /// as one window up to the newest seq, and that window becomes the tail
    /// (as a history page from the newest does), so a device catching up on
    /// a busy chat costs one range read, and the next one none. Older
    /// misses (edits of old messages, devices far behind) are read one by
    /// one.
    ///
    /// An apply call writes to sled before it puts to the cache, so a change
    /// record read from sled may be newer than the cached message; sled
    /// writes a message before its change record (key order), so sled has it
    /// by the time the change record is read.
    ///
    /// Older misses stop once the messages found for earlier changes come to
    /// more than `bytes_max`: the pts of the first change left unread is
    /// returned, and the answer ends before it.
    fn messages_as_of(
        &self,
        chat: u64,
        rec: &ChatRecord,
        named: &[(u64, u64)],
        bytes_max: usize,
    ) -> io::Result<(MessagesByChange, Option<u64>)> {
        let mut found = HashMap::with_capacity(named.len());
        let mut missed = Vec::new();
        let mut first_miss = None;
        for &(seq, pts) in named {
            match self.chats.message(chat, seq) {
                Ok(Some(m)) if m.pts >= pts => {
                    found.insert((seq, pts), m);
                }
                Ok(_) => missed.push((seq, pts)),
                Err(miss) => {
                    first_miss.get_or_insert(miss);
                    missed.push((seq, pts));
                }
            }
        }
        if missed.is_empty() {
            return Ok((found, None));
        }
        // Every seq the window covers is read after the change records were,
        // so each message in it is at least as new as its change.
        let end = rec.last_seq.saturating_add(1);
        let newest = end.saturating_sub(TAIL_MESSAGES_MAX as u64);
        let from = missed
            .iter()
            .map(|&(seq, _)| seq)
            .filter(|seq| (newest..end).contains(seq))
            .min()
            .unwrap_or(end);
        let mut window = BTreeMap::new();
        let mut window_read = false;
        if let Some(miss) = first_miss.filter(|_| from < end) {
            window_read = true;
            for pair in self
                .tree
                .range(keys::message(chat, from)..keys::message(chat, end))
            {
                let (k, v) = pair.map_err(io_err)?;
                if let Some(m) = self.open_read(&k, &v)? {
                    window.insert(m.seq, m);
                }
            }
            self.chats
                .fill_tail(chat, from, end, window.values().cloned(), miss);
        }
        // In the changes' order, counting what earlier changes carry (none
        // of a closed chat's messages is carried: they name senders only).
        let weight = |m: &MessageRecord| if rec.closed { 0 } else { m.encoded_len() };
        let mut bytes = 0;
        for &(seq, pts) in named {
            if let Some(m) = found.get(&(seq, pts)) {
                bytes += weight(m);
                continue;
            }
            let m = if window_read && (from..end).contains(&seq) {
                window.get(&seq).cloned()
            } else {
                if bytes > bytes_max {
                    return Ok((found, Some(pts)));
                }
                self.stored_message(chat, seq)?
            };
            if let Some(m) = m {
                bytes += weight(&m);
                found.insert((seq, pts), m);
            }
        }
        Ok((found, None))
    }

    pub fn chat(&self, chat: u64) -> io::Result<pb::GetChatResponse> {
        let mut cursors = Vec::new();
        for pair in self
            .tree
            .scan_prefix(keys::chat_prefix(keys::TAG_READ_CURSOR, chat))
            .take(READ_CURSORS_MAX)
        {
            let (k, v) = pair.map_err(io_err)?;
            let reader =
                keys::part(&k, 1).ok_or_else(|| io::Error::other("bad read cursor key"))?;
            let seq = u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| io::Error::other("bad read cursor"))?,
            );
            cursors.push(pb::ReadCursor {
                reader_id: reader,
                seq,
            });
        }
        // The record after the cursors, and from the tree (an apply call
        // writes there before the chat cache): at least as new as any
        // cursor read, so no cursor is past the chat's last seq.
        let rec = self.chat_record_in_tree(chat)?;
        Ok(pb::GetChatResponse {
            chat_id: chat,
            last_seq: rec.last_seq,
            pts: rec.last_pts,
            closed: rec.closed,
            close_reason: rec.close_reason,
            read_cursors: cursors,
            read_token: Default::default(),
        })
    }

    /// Per-chat digests ([`DIGEST_FORMAT`]) over the chat record, the message records in seq
    /// order (bodies in the clear: ciphertexts of self-destructing bodies
    /// differ between nodes by design), and the chat's change log, dedup
    /// records, read cursors and delete-after-read marks: equal digests mean
    /// identical chats, down to what GetDifference serves and what a retried
    /// send or edit is matched against.
    /// Digests of the chats after `after_chat`, at most `limit` of them (0:
    /// all), and whether more follow.
    pub fn digests(&self, after_chat: u64, limit: usize) -> io::Result<(Vec<ChatDigest>, bool)> {
        let mut out = Vec::new();
        let start = match after_chat.checked_add(1) {
            Some(next) => keys::chat(next),
            None => return Ok((out, false)),
        };
        for pair in self.tree.range(start..vec![keys::TAG_CHAT + 1]) {
            if limit != 0 && out.len() >= limit {
                return Ok((out, true));
            }
            let (k, v) = pair.map_err(io_err)?;
            let chat = keys::part(&k, 0).ok_or_else(|| io::Error::other("bad chat key"))?;
            let rec: ChatRecord = decode(&v, "chat record")?;
            let mut hash = Xxh3::new();
            hash.update(&v);
            let mut count = 0;
            for m in self
                .tree
                .scan_prefix(keys::chat_prefix(keys::TAG_MESSAGE, chat))
            {
                let (mk, mv) = m.map_err(io_err)?;
                hash.update(&mk);
                match sealing::plain_message_bytes(&self.keys, &mv, None)? {
                    Some(plain) => hash.update(&plain),
                    None => hash.update(&mv),
                }
                count += 1;
            }
            for tag in [
                keys::TAG_CHANGE,
                keys::TAG_DEDUP,
                keys::TAG_READ_CURSOR,
                keys::TAG_AFTER_READ,
            ] {
                for pair in self.tree.scan_prefix(keys::chat_prefix(tag, chat)) {
                    let (k, v) = pair.map_err(io_err)?;
                    hash.update(&k);
                    hash.update(&v);
                }
            }
            out.push(ChatDigest {
                chat_id: chat,
                last_seq: rec.last_seq,
                last_pts: rec.last_pts,
                digest: hash.digest(),
                message_count: count,
            });
        }
        Ok((out, false))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::{decoded, StateReader};
    use crate::api::pb::replicated::{ChangeKind, ChangeRecord, ChatRecord, MessageRecord};
    use crate::storage::{keys, Storage};

    /// A shard's state tree in a fresh data folder (kept while the folder is).
    fn state_tree() -> (tempfile::TempDir, Storage, sled::Tree) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let tree = storage.open_tree("state/test").unwrap();
        (dir, storage, tree)
    }

    fn message(chat: u64, seq: u64, pts: u64, body: &str) -> MessageRecord {
        MessageRecord {
            chat_id: chat,
            seq,
            sender_id: 1,
            body: body.as_bytes().to_vec().into(),
            pts,
            ..Default::default()
        }
    }

    fn change(pts: u64, seq: u64, kind: ChangeKind) -> ChangeRecord {
        ChangeRecord {
            pts,
            kind: kind as i32,
            seq,
            user_id: 1,
            ..Default::default()
        }
    }

    /// A change can name a message newer than the one the chat cache holds
    /// (here the cache's chat record is ahead of its messages): the
    /// difference shows the newer message.
    #[test]
    fn a_change_is_paired_with_its_message_while_an_apply_is_under_way() {
        let (_dir, storage, tree) = state_tree();
        let chat = 7;
        let put = |seq: u64, pts: u64, body: &str, kind: ChangeKind| {
            let m = message(chat, seq, pts, body);
            tree.insert(keys::message(chat, seq), m.encode_to_vec())
                .unwrap();
            let c = change(pts, seq, kind);
            tree.insert(keys::change(chat, pts), c.encode_to_vec())
                .unwrap();
        };
        put(1, 1, "first", ChangeKind::New);
        let rec = |last_pts: u64| ChatRecord {
            last_seq: 1,
            last_pts,
            ..Default::default()
        };
        tree.insert(keys::chat(chat), rec(1).encode_to_vec())
            .unwrap();
        let reader = StateReader::new(tree.clone(), storage.keys().clone(), Default::default());
        // The history read puts message 1 (pts 1) in memory.
        assert_eq!(
            &decoded(reader.history(chat, 0, 10).unwrap())[0].body[..],
            b"first"
        );
        // An edit in sled; the cache learns of the chat record only.
        put(1, 2, "edited", ChangeKind::Edit);
        tree.insert(keys::chat(chat), rec(2).encode_to_vec())
            .unwrap();
        reader.chats.put([(chat, rec(2))], Vec::new());
        let diff = reader.difference(chat, 1, 10, 0).unwrap();
        assert_eq!(diff.changes.len(), 1);
        let edited = diff.changes[0]
            .message
            .as_ref()
            .expect("the edited message");
        assert_eq!(&edited.body[..], b"edited");
    }

    /// A difference stops before the change whose message would pass its
    /// byte budget (the first change always comes) and says there is more.
    #[test]
    fn a_difference_stops_at_its_byte_budget() {
        let (_dir, storage, tree) = state_tree();
        let chat = 9;
        sends_only(&tree, chat, 5, &"b".repeat(1000));
        let reader = StateReader::new(tree.clone(), storage.keys().clone(), Default::default());
        let seqs = |d: &crate::api::pb::ChatDifference| {
            d.changes.iter().map(|c| c.seq).collect::<Vec<_>>()
        };
        let two = reader.difference(chat, 0, 10, 2500).unwrap();
        assert_eq!((seqs(&two), two.pts, two.more), (vec![1, 2], 2, true));
        let one = reader.difference(chat, 2, 10, 1).unwrap();
        assert_eq!((seqs(&one), one.pts, one.more), (vec![3], 3, true));
        let rest = reader.difference(chat, 3, 10, 0).unwrap();
        assert_eq!((seqs(&rest), rest.pts, rest.more), (vec![4, 5], 5, false));
    }

    /// Writes a chat of `last_seq` messages of `body`, each sent (seq and pts
    /// alike) and nothing else.
    fn sends_only(tree: &sled::Tree, chat: u64, last_seq: u64, body: &str) {
        for seq in 1..=last_seq {
            let m = message(chat, seq, seq, body);
            tree.insert(keys::message(chat, seq), m.encode_to_vec())
                .unwrap();
            tree.insert(
                keys::change(chat, seq),
                change(seq, seq, ChangeKind::New).encode_to_vec(),
            )
            .unwrap();
        }
        let rec = ChatRecord {
            last_seq,
            last_pts: last_seq,
            ..Default::default()
        };
        tree.insert(keys::chat(chat), rec.encode_to_vec()).unwrap();
    }

    /// Replicas whose messages agree but whose change logs, dedup records
    /// or read cursors differ have different digests.
    #[test]
    fn digests_cover_changes_dedup_records_and_cursors() {
        let digest = |extra: &dyn Fn(&sled::Tree)| {
            let (_dir, storage, tree) = state_tree();
            sends_only(&tree, 7, 3, "x");
            extra(&tree);
            let reader = StateReader::new(tree, storage.keys().clone(), Default::default());
            reader.digests(0, 0).unwrap().0[0].digest
        };
        let base = digest(&|_| {});
        assert_eq!(base, digest(&|_| {}), "the same state, the same digest");
        let changed = digest(&|t| {
            t.insert(
                keys::change(7, 2),
                change(2, 2, ChangeKind::Edit).encode_to_vec(),
            )
            .unwrap();
        });
        let deduped = digest(&|t| {
            t.insert(keys::dedup(7, 1, 99), b"seq 3".to_vec()).unwrap();
        });
        let cursor = digest(&|t| {
            t.insert(keys::read_cursor(7, 1), b"up to 2".to_vec())
                .unwrap();
        });
        for (what, d) in [("change", changed), ("dedup", deduped), ("cursor", cursor)] {
            assert_ne!(base, d, "a different {what} record changes the digest");
        }
    }

    /// Digests page by chat: each page starts after the last one's last
    /// chat, says whether more follow, and together they are all of them.
    #[test]
    fn digests_page_through_every_chat_once() {
        let (_dir, storage, tree) = state_tree();
        for chat in [3u64, 5, 8, 13, 21] {
            sends_only(&tree, chat, 2, "x");
        }
        let reader = StateReader::new(tree, storage.keys().clone(), Default::default());
        let (all, more) = reader.digests(0, 0).unwrap();
        assert!(!more);
        assert_eq!(all.len(), 5);
        let mut paged = Vec::new();
        let mut after = 0;
        for _ in 0..10 {
            let (page, more) = reader.digests(after, 2).unwrap();
            assert!(page.len() <= 2);
            paged.extend(page.iter().cloned());
            match page.last() {
                Some(last) if more => after = last.chat_id,
                _ => break,
            }
        }
        assert_eq!(paged, all);
        assert_eq!(reader.digests(21, 2).unwrap(), (Vec::new(), false));
        assert_eq!(reader.digests(u64::MAX, 2).unwrap(), (Vec::new(), false));
    }

    /// A page of large messages read from sled stops at the byte bound with
    /// the newest, in order, and the next page goes on below it; so does a
    /// difference far behind (messages read one by one), which ends before
    /// the change whose message it did not read.
    #[test]
    fn pages_of_large_messages_stop_at_the_byte_bound() {
        let (_dir, storage, tree) = state_tree();
        let chat = 3;
        let last_seq = 400u64;
        sends_only(&tree, chat, last_seq, &"x".repeat(60 * 1024));
        let reader = StateReader::new(tree, storage.keys().clone(), Default::default());
        let fits = super::PAGE_BYTES_MAX / (60 * 1024);
        let mut before = 0;
        let mut seen = Vec::new();
        for _ in 0..20 {
            let page: Vec<u64> = reader
                .history(chat, before, 1000)
                .map(decoded)
                .unwrap()
                .iter()
                .map(|m| m.seq)
                .collect();
            let Some(&oldest) = page.last() else { break };
            // Full pages but the oldest.
            assert!(page.len() <= fits, "{}", page.len());
            assert!(oldest == 1 || page.len() + 2 >= fits, "{}", page.len());
            seen.extend(page);
            before = oldest;
        }
        let all: Vec<u64> = (1..=last_seq).rev().collect();
        assert_eq!(seen, all, "pages cover every message once, newest first");
        // The newest 60 hidden (their timers ran out, not yet removed): the
        // window of the newest 50 holds only hidden ones, and the page goes
        // on below them.
        let (_dir2, storage2, tree2) = state_tree();
        sends_only(&tree2, chat, last_seq, &"x".repeat(60 * 1024));
        for seq in last_seq - 59..=last_seq {
            let mut m = message(chat, seq, seq, &"x".repeat(60 * 1024));
            m.expire_at_ms = 1;
            tree2
                .insert(keys::message(chat, seq), m.encode_to_vec())
                .unwrap();
        }
        let reader2 = StateReader::new(tree2, storage2.keys().clone(), Default::default());
        let page: Vec<u64> = reader2
            .history(chat, 0, 50)
            .map(decoded)
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        let below: Vec<u64> = (1..=last_seq - 60).rev().take(page.len()).collect();
        assert!(!page.is_empty() && page.len() <= fits, "{}", page.len());
        assert_eq!(page, below, "the newest visible messages, newest first");

        let seqs = |d: &crate::api::pb::ChatDifference| {
            d.changes.iter().map(|c| c.seq).collect::<Vec<_>>()
        };
        let first = reader.difference(chat, 0, 1000, 0).unwrap();
        assert!(first.more);
        assert!(first.changes.len() <= fits + 1, "{}", first.changes.len());
        assert!(first.changes.iter().all(|c| c.message.is_some()));
        assert_eq!(seqs(&first), (1..=first.pts).collect::<Vec<_>>());
    }

    /// Pages come newest first, strictly below `before_seq`, `limit` long,
    /// with removed messages skipped: the same as walking every message
    /// backwards, for pages inside, across and below gaps.
    #[test]
    fn history_pages_match_a_walk_over_every_message() {
        let (_dir, storage, tree) = state_tree();
        let chat = 7;
        let last_seq = 30;
        let removed = |seq: u64| (12..=20).contains(&seq) || seq == 28 || seq == 29;
        tree.insert(
            keys::chat(chat),
            ChatRecord {
                last_seq,
                ..Default::default()
            }
            .encode_to_vec(),
        )
        .unwrap();
        for seq in (1..=last_seq).filter(|s| !removed(*s)) {
            let m = message(chat, seq, 0, &format!("message {seq}"));
            tree.insert(keys::message(chat, seq), m.encode_to_vec())
                .unwrap();
        }
        let reader = StateReader::new(tree, storage.keys().clone(), Default::default());
        for before in [0, 1, 2, 10, 12, 21, 22, 25, 29, 30, 31, 100] {
            for limit in [0, 1, 3, 5, 9, 10, 50] {
                let page: Vec<u64> = reader
                    .history(chat, before, limit)
                    .map(decoded)
                    .unwrap()
                    .iter()
                    .map(|m| m.seq)
                    .collect();
                let end = if before == 0 { u64::MAX } else { before };
                let expected: Vec<u64> = (1..=last_seq)
                    .rev()
                    .filter(|s| !removed(*s) && *s < end)
                    .take(limit as usize)
                    .collect();
                assert_eq!(page, expected, "before_seq {before}, limit {limit}");
            }
        }
    }

    /// A difference names each change with the message as sled holds it
    /// now (a tombstone too), the same from a cold cache as from the tail
    /// the first difference kept: for cursors near the newest seq (one
    /// window read) and far behind it (one read per message), across edits,
    /// a tombstone and a removed message.
    #[test]
    fn differences_match_a_walk_over_every_change_cold_and_warm() {
        let (_dir, storage, tree) = state_tree();
        let chat = 7;
        let last_seq = 300u64;
        let message = |seq: u64, pts: u64, body: &str| message(chat, seq, pts, body);
        let mut changes = Vec::new();
        for seq in 1..=last_seq {
            let m = message(seq, seq, &format!("message {seq}"));
            tree.insert(keys::message(chat, seq), m.encode_to_vec())
                .unwrap();
            changes.push(change(seq, seq, ChangeKind::New));
        }
        let mut pts = last_seq;
        for seq in [5, 250, 290] {
            pts += 1;
            let m = message(seq, pts, &format!("edited {seq}"));
            tree.insert(keys::message(chat, seq), m.encode_to_vec())
                .unwrap();
            changes.push(change(pts, seq, ChangeKind::Edit));
        }
        pts += 1;
        let tombstone = MessageRecord {
            deleted: true,
            ..message(260, pts, "")
        };
        tree.insert(keys::message(chat, 260), tombstone.encode_to_vec())
            .unwrap();
        changes.push(change(pts, 260, ChangeKind::Delete));
        // Removed (as an expired message is); its New change stays.
        tree.remove(keys::message(chat, 270)).unwrap();
        for c in &changes {
            tree.insert(keys::change(chat, c.pts), c.encode_to_vec())
                .unwrap();
        }
        let rec = ChatRecord {
            last_seq,
            last_pts: pts,
            ..Default::default()
        };
        tree.insert(keys::chat(chat), rec.encode_to_vec()).unwrap();

        let expected = |cursor: u64, limit: usize| -> Vec<(u64, u64, Option<String>)> {
            changes
                .iter()
                .filter(|c| c.pts > cursor)
                .take(limit)
                .map(|c| {
                    let kind = ChangeKind::try_from(c.kind).unwrap();
                    let body = match kind {
                        ChangeKind::New | ChangeKind::Edit => tree
                            .get(keys::message(chat, c.seq))
                            .unwrap()
                            .map(|v| MessageRecord::decode(&v[..]).unwrap())
                            .map(|m| String::from_utf8(m.body.to_vec()).unwrap()),
                        _ => None,
                    };
                    (c.pts, c.seq, body)
                })
                .collect()
        };
        let got =
            |reader: &StateReader, cursor: u64, limit: u32| -> Vec<(u64, u64, Option<String>)> {
                reader
                    .difference(chat, cursor, limit, 0)
                    .unwrap()
                    .changes
                    .into_iter()
                    .map(|c| {
                        let body = c
                            .message
                            .map(|m| String::from_utf8(m.body.to_vec()).unwrap());
                        (c.pts, c.seq, body)
                    })
                    .collect()
            };
        for cursor in [0, 100, 170, 173, 200, 249, 280, 299, 300, 303, 304] {
            for limit in [1, 10, 50, 1000] {
                let reader =
                    StateReader::new(tree.clone(), storage.keys().clone(), Default::default());
                let want = expected(cursor, limit as usize);
                let newest_page = |limit: usize| -> Vec<(u64, String)> {
                    (1..=last_seq)
                        .rev()
                        .filter_map(|seq| tree.get(keys::message(chat, seq)).unwrap())
                        .map(|v| MessageRecord::decode(&v[..]).unwrap())
                        .map(|m| (m.seq, String::from_utf8(m.body.to_vec()).unwrap()))
                        .take(limit)
                        .collect()
                };
                let history = |reader: &StateReader, limit: u32| -> Vec<(u64, String)> {
                    reader
                        .history(chat, 0, limit)
                        .map(decoded)
                        .unwrap()
                        .into_iter()
                        .map(|m| (m.seq, String::from_utf8(m.body.to_vec()).unwrap()))
                        .collect()
                };
                assert_eq!(
                    got(&reader, cursor, limit),
                    want,
                    "cold, cursor {cursor}, limit {limit}"
                );
                // The tail the cold difference kept holds every message
                // sled holds in its range: pages from it read the same.
                for page in [10, 50] {
                    assert_eq!(
                        history(&reader, page),
                        newest_page(page as usize),
                        "page of {page} after cursor {cursor}, limit {limit}"
                    );
                }
                let seqs: Vec<u64> = (150..=last_seq).collect();
                let by_seq: Vec<u64> = reader
                    .messages(chat, &seqs)
                    .map(decoded)
                    .unwrap()
                    .iter()
                    .map(|m| m.seq)
                    .collect();
                let stored: Vec<u64> = seqs
                    .iter()
                    .copied()
                    .filter(|seq| tree.contains_key(keys::message(chat, *seq)).unwrap())
                    .collect();
                assert_eq!(
                    by_seq, stored,
                    "messages after cursor {cursor}, limit {limit}"
                );
                assert_eq!(
                    got(&reader, cursor, limit),
                    want,
                    "warm, cursor {cursor}, limit {limit}"
                );
            }
        }
        // A device near the newest seq leaves the newest messages in memory.
        let reader = StateReader::new(tree.clone(), storage.keys().clone(), Default::default());
        assert!(reader.chats.message(chat, 299).is_err());
        got(&reader, 280, 50);
        assert_eq!(
            reader.chats.message(chat, 299).unwrap().map(|m| m.seq),
            Some(299)
        );
    }

    /// A scan that meets a gap after its first change (collection ran under
    /// it) stops before the gap, so the next call is told to reset rather
    /// than skip what lay in the gap.
    /// (Under rules 2: a gap under rules 3 may be new messages, and
    /// collection says where it dropped in the chat record.)
    #[test]
    fn a_gap_inside_a_difference_ends_it_and_the_next_call_resets() {
        use crate::shard::apply::testing::{apply, send, under_rules};
        let (_dir, storage, tree) = state_tree();
        under_rules(&tree, 2);
        apply(&tree, 1_000, (1..=5).map(|id| send(1, id)).collect());
        tree.remove(keys::change(1, 3)).unwrap();
        let reader = StateReader::new(tree.clone(), storage.keys().clone(), Default::default());
        let first = reader.difference(1, 0, 10, 0).unwrap();
        let pts: Vec<u64> = first.changes.iter().map(|c| c.pts).collect();
        assert_eq!(pts, vec![1, 2]);
        assert!(first.more && !first.reset_required);
        assert_eq!(first.pts, 2);
        let next = reader.difference(1, 2, 10, 0).unwrap();
        assert!(next.reset_required);
        assert_eq!(next.pts, 5);
    }

    /// A difference reads no change record past the chat record it started
    /// from. sled reads a range a leaf at a time, so a scan can see a newer
    /// record without an older one that a flush wrote into a leaf the scan
    /// had already copied; under rules 3 the run before the newer record
    /// would read as new messages. Here the tree is in that state (pts 3, an
    /// edit, missing; pts 4 a send; pts 5 a delete) behind a cached chat
    /// record at pts 2.
    #[test]
    fn a_difference_reads_no_change_record_past_its_chat_record() {
        use crate::shard::apply::testing::{apply, delete, edit, newest_rules, send};
        let (_dir, storage, tree) = state_tree();
        newest_rules(&tree);
        apply(&tree, 1_000, vec![send(1, 1), send(1, 2)]);
        let reader = StateReader::new(tree.clone(), storage.keys().clone(), Default::default());
        assert_eq!(reader.difference(1, 0, 10, 0).unwrap().changes.len(), 2);
        apply(
            &tree,
            2_000,
            vec![edit(1, 1, 1, b"v2"), send(1, 3), delete(1, 2, 1)],
        );
        tree.remove(keys::change(1, 3)).unwrap();
        let diff = reader.difference(1, 2, 10, 0).unwrap();
        assert!(diff.changes.is_empty(), "{:?}", diff.changes);
        assert!(!diff.more && !diff.reset_required);
        assert_eq!(diff.pts, 2);
    }

    /// Under rules 2 every pts up to a chat's last has a record, so a gap
    /// after the last record a scan finds (collection ran under it, and the
    /// chat record it started from is older than the record that
    /// collection kept) is not read as new messages.
    #[test]
    fn under_rules_2_no_run_of_new_messages_is_read_after_the_last_record() {
        use crate::shard::apply::testing::{apply, edit, send, under_rules};
        let (_dir, storage, tree) = state_tree();
        under_rules(&tree, 2);
        apply(&tree, 1_000, vec![send(1, 1), edit(1, 1, 1, b"v2")]);
        let reader = StateReader::new(tree.clone(), storage.keys().clone(), Default::default());
        assert_eq!(reader.difference(1, 0, 10, 0).unwrap().changes.len(), 2);
        tree.remove(keys::change(1, 2)).unwrap();
        let diff = reader.difference(1, 1, 10, 0).unwrap();
        assert!(diff.changes.is_empty(), "{:?}", diff.changes);
        assert!(diff.reset_required);
    }

    /// Collection that a reader's cached chat record does not know of yet
    /// (it ran after the record was cached, or under the scan) still resets
    /// a cursor it passed, to the tree's newest pts: the chat record is read
    /// again, from the tree, after the scan.
    #[test]
    fn collection_behind_a_cached_chat_record_resets_the_cursor() {
        use crate::shard::apply::testing::{apply, edit, gc_changes, newest_rules, send};
        let (_dir, storage, tree) = state_tree();
        newest_rules(&tree);
        apply(&tree, 1_000, vec![send(1, 1), edit(1, 1, 1, b"v2")]);
        apply(&tree, 1_000, vec![send(1, 2)]);
        let reader = StateReader::new(tree.clone(), storage.keys().clone(), Default::default());
        assert_eq!(reader.difference(1, 0, 10, 0).unwrap().changes.len(), 3);
        apply(&tree, 5_000, vec![send(1, 3), gc_changes(2_000, 100)]);
        let diff = reader.difference(1, 1, 10, 0).unwrap();
        assert!(diff.reset_required);
        assert!(diff.changes.is_empty());
        assert_eq!(diff.pts, 4, "the tree's newest pts, not the cached 3");
        let after = reader.difference(1, 2, 10, 0).unwrap();
        assert!(!after.reset_required, "past what collection dropped");
    }

    /// A cursor older than what collection left of a chat's changes gets a
    /// reset with the chat's pts, whether the chat kept newer changes or
    /// only its newest; a cursor inside what is kept does not.
    /// (Under rules 2, where sends have change records to collect.)
    #[test]
    fn a_cursor_behind_collected_changes_is_told_to_reset() {
        use crate::shard::apply::testing::{apply, gc_changes, send, under_rules};
        let (_dir, storage, tree) = state_tree();
        under_rules(&tree, 2);
        apply(
            &tree,
            1_000,
            vec![send(1, 1), send(1, 2), send(2, 3), send(2, 4)],
        );
        apply(&tree, 5_000, vec![send(2, 5)]);
        apply(&tree, 6_000, vec![gc_changes(2_000, 100)]);
        let reader = StateReader::new(tree.clone(), storage.keys().clone(), Default::default());

        let only_newest = reader.difference(1, 0, 10, 0).unwrap();
        assert!(only_newest.reset_required);
        assert!(only_newest.changes.is_empty());
        assert!(!only_newest.more);
        assert_eq!(only_newest.pts, 2);
        let current = reader.difference(1, 2, 10, 0).unwrap();
        assert!(!current.reset_required, "a cursor at the chat's pts");
        assert!(current.changes.is_empty());

        let gap = reader.difference(2, 1, 10, 0).unwrap();
        assert!(gap.reset_required);
        assert!(gap.changes.is_empty());
        assert_eq!(gap.pts, 3);
        let kept = reader.difference(2, 2, 10, 0).unwrap();
        assert!(!kept.reset_required, "the next change is kept");
        assert_eq!(kept.changes.len(), 1);
        assert_eq!(kept.changes[0].pts, 3);
        assert_eq!(kept.changes[0].message.as_ref().unwrap().seq, 3);
    }

    /// Change collection is due with changes and no pass yet, while a pass
    /// is under way, and again a quarter retention after one ended.
    /// (Under rules 2, where sends have change records.)
    #[test]
    fn change_collection_is_due_four_times_per_retention() {
        use crate::shard::apply::testing::{apply, gc_changes, send, under_rules};
        let (_dir, storage, tree) = state_tree();
        under_rules(&tree, 2);
        let reader = StateReader::new(tree.clone(), storage.keys().clone(), Default::default());
        let retention = 4_000;
        assert_eq!(
            reader.change_gc_due(retention, 1_000).unwrap(),
            None,
            "no changes"
        );
        apply(&tree, 1_000, vec![send(1, 1), send(2, 2)]);
        // No pass has ended yet: due, and not counted as late.
        assert_eq!(reader.change_gc_due(retention, 1_000).unwrap(), Some(0));
        apply(&tree, 1_000, vec![gc_changes(0, 1)]);
        assert_eq!(
            reader.change_gc_due(retention, 1_000).unwrap(),
            Some(0),
            "mid-pass"
        );
        // One change per step: a step for each chat, then one that finds
        // the end.
        apply(&tree, 1_000, vec![gc_changes(0, 1)]);
        assert!(
            reader.change_gc_due(retention, 1_000).unwrap().is_some(),
            "mid-pass"
        );
        apply(&tree, 1_000, vec![gc_changes(0, 1)]);
        assert_eq!(
            reader.change_gc_due(retention, 1_999).unwrap(),
            None,
            "just ended"
        );
        assert_eq!(reader.change_gc_due(retention, 2_000).unwrap(), Some(0));
        // The next pass, under way: due since a quarter retention after
        // the last one ended (at 1,000).
        apply(&tree, 2_500, vec![gc_changes(0, 1)]);
        assert_eq!(reader.change_gc_due(retention, 2_700).unwrap(), Some(700));
    }
}
