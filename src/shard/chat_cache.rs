//! What a replica wrote or read last, in memory, so that a read skips sled:
//! chat records, and the newest messages of the chats read lately.
//!
//! The state machine is the only writer of chat and message records. After
//! each apply call has written its effects to sled (and before openraft
//! publishes the applied index) it puts every chat record and every message
//! record it wrote or removed here; loading a snapshot empties the cache. A
//! reader that misses reads sled and fills the entry only if nothing was put
//! or emptied since it began: otherwise it may hold a value older than one the
//! state machine has put meanwhile. So an entry is never older than what sled
//! held when the applied index a reader waited for was published.
//!
//! A chat's newest messages are kept as a *tail*: a range of seqs `from..to`
//! in which every message sled holds is in memory, bodies in the clear. A
//! read of the newest page of a chat fills it, as does a GetDifference that
//! names messages among the chat's newest seqs; the sends, edits and removals
//! the state machine puts keep it current, and a send extends it. A page the
//! tail covers is served from it; any other page reads sled.
//!
//! Bounds: at most [`CHATS_MAX`] chat records and [`CHATS_MAX`] tails per
//! replica, [`TAIL_MESSAGES_MAX`] messages per tail, [`TAIL_BYTES_MAX`] of
//! messages per replica, and the node's budget across its replicas
//! (`[cache] message_mib`, default [`crate::storage::MESSAGE_CACHE_BYTES_MAX`]).
//! Past a replica's bound its records or tails start over empty; past the
//! node's, a new tail is not kept. A replica that quiesces forgets its
//! messages, so an idle replica's cache holds no messages until it is read.
//!
//! Each cached message is kept with the public message it reads as, encoded
//! once when it enters the tail ([`CachedMessage`]; the record's body is a
//! slice of that encoding, so the body is in memory once). A page served
//! from memory is those encodings as they are: the node's reply carries them
//! with no decoding or encoding per message.
//!
//! Bodies of self-destructing messages are held here in the clear until they
//! expire or are removed; the eraser's bound (`crate::node::erasure`) is about
//! the data folder, not memory.
//!
//! Waiters. A Watch's long poll waits here for its chat to change
//! ([`ChatCache::waiter`]): the state machine's put of the chat's record wakes
//! it, and so do the end of a snapshot load ([`ChatCache::wake_all`]) and
//! the replica stopping ([`ChatCache::stop_waiters`]). A put of other chats'
//! records does not, so a replica applying thousands of entries a second wakes
//! each poll only for its own chat.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::api::pb;
use crate::api::pb::replicated::{ChatRecord, MessageRecord};
use crate::shard::reads::encode_public;
use crate::storage::MemoryBudget;

/// Most chat records, and most tails, cached per replica.
pub const CHATS_MAX: usize = 512;
/// Most messages in one chat's tail: a 50-message page and the sends since.
pub const TAIL_MESSAGES_MAX: usize = 128;
/// Most bytes of cached messages per replica.
pub const TAIL_BYTES_MAX: usize = 4 * 1024 * 1024;

pub struct ChatCache {
    inner: Mutex<Inner>,
    budget: Arc<MemoryBudget>,
    waiters: Arc<Waiters>,
}

/// The chats that long polls wait on, each with its waiters' wake-up and
/// their number.
#[derive(Default)]
struct Waiters {
    /// Waiters registered over all chats: a put looks at the map only when
    /// there are some.
    count: AtomicUsize,
    /// Set when the replica stops: every waiter returns.
    stopped: AtomicBool,
    chats: Mutex<HashMap<u64, (Arc<Notify>, usize)>>,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Arc<Notify>, usize)>> {
        self.chats.lock().expect("chat waiters lock")
    }

    /// Wakes the waiters of `chats`, or of every chat.
    fn wake(&self, chats: Option<&[u64]>) {
        if self.count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let map = self.lock();
        match chats {
            Some(chats) => {
                for chat in chats {
                    if let Some((notify, _)) = map.get(chat) {
                        notify.notify_waiters();
                    }
                }
            }
            None => map.values().for_each(|(notify, _)| notify.notify_waiters()),
        }
    }
}

/// Interest in one chat's changes, from [`ChatCache::waiter`] until dropped.
pub struct ChatWaiter {
    waiters: Arc<Waiters>,
    chat: u64,
    notify: Arc<Notify>,
}

impl ChatWaiter {
    /// Ends at the first put of the chat's record, end of a snapshot load,
    /// or stop of the replica after this call, whether it is polled by then
    /// or not. So: take it, then read the record, then await it.
    pub fn changed(&self) -> Notified<'_> {
        // Tokio's `Notified` counts for `notify_waiters` from its creation,
        // not from its first poll.
        self.notify.notified()
    }

    /// Whether the replica has stopped: no change will come.
    pub fn stopped(&self) -> bool {
        self.waiters.stopped.load(Ordering::SeqCst)
    }
}

impl Drop for ChatWaiter {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        if let Some((_, n)) = map.get_mut(&self.chat) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.chat);
            }
        }
        self.waiters.count.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for ChatCache {
    fn default() -> ChatCache {
        ChatCache::new(Arc::new(MemoryBudget::unreported(
            crate::storage::MESSAGE_CACHE_BYTES_MAX,
        )))
    }
}

impl Drop for ChatCache {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        let bytes = inner.tail_bytes;
        self.budget.give_back(bytes);
    }
}

#[derive(Default)]
struct Inner {
    records: HashMap<u64, ChatRecord>,
    tails: HashMap<u64, Tail>,
    /// Bytes of the messages in `tails` (taken from the node's budget).
    tail_bytes: usize,
    /// Bumped by every put and every clear.
    generation: u64,
}

/// A chat's newest messages: every message sled holds with a seq in
/// `from..to` is in `messages`.
#[derive(Debug)]
struct Tail {
    from: u64,
    to: u64,
    messages: BTreeMap<u64, CachedMessage>,
}

/// A message record, body in the clear, and the public message it reads as
/// (a `chatstore.v1.Message`), encoded.
#[derive(Debug, Clone)]
pub struct CachedMessage {
    record: MessageRecord,
    public: Bytes,
}

impl CachedMessage {
    pub fn record(&self) -> &MessageRecord {
        &self.record
    }

    /// The encoded public message.
    pub fn public(&self) -> &Bytes {
        &self.public
    }
}

impl From<MessageRecord> for CachedMessage {
    /// Encodes the public message; the record's body becomes a slice of the
    /// encoding, so the two share one copy of it.
    fn from(mut record: MessageRecord) -> CachedMessage {
        let public = encode_public(record.clone());
        // Decoding from `Bytes` slices the body out of it, without a copy.
        // (It cannot fail on what was just encoded; if it did, the record
        // would keep a body of its own.)
        if let Ok(m) = pb::Message::decode(public.clone()) {
            record.body = m.body;
        }
        CachedMessage { record, public }
    }
}

/// What a reader saw before reading sled on a miss.
#[derive(Debug)]
pub struct Miss {
    generation: u64,
}

/// A message record written (`Some`) or removed (`None`) by an apply call.
pub type MessageWrite = (u64, u64, Option<MessageRecord>);

/// A message write on its way into a tail: encoded already, or not (its
/// chat had no tail when the put began).
enum Pending {
    Encoded(CachedMessage),
    Record(MessageRecord),
}

/// The memory one cached message is counted for.
fn message_bytes(m: &CachedMessage) -> usize {
    m.public.len() + 128
}

impl ChatCache {
    pub fn new(budget: Arc<MemoryBudget>) -> ChatCache {
        ChatCache {
            inner: Mutex::new(Inner::default()),
            budget,
            waiters: Arc::default(),
        }
    }

    /// Registers interest in `chat`'s changes (see [`ChatWaiter::changed`]).
    pub fn waiter(&self, chat: u64) -> ChatWaiter {
        let mut map = self.waiters.lock();
        let (notify, n) = map
            .entry(chat)
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        *n += 1;
        let notify = notify.clone();
        // Before the caller reads the record: a put that comes after the
        // read then finds this waiter counted (see `put`).
        self.waiters.count.fetch_add(1, Ordering::SeqCst);
        ChatWaiter {
            waiters: self.waiters.clone(),
            chat,
            notify,
        }
    }

    /// Wakes every waiter for good: the replica stops.
    pub fn stop_waiters(&self) {
        self.waiters.stopped.store(true, Ordering::SeqCst);
        self.waiters.wake(None);
    }

    /// Wakes every waiter: the state was replaced (a snapshot loaded), and
    /// readers may read it.
    pub fn wake_all(&self) {
        self.waiters.wake(None);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("chat cache lock")
    }

    /// The cached record, or a [`Miss`] to fill once sled is read.
    pub fn get(&self, chat: u64) -> Result<ChatRecord, Miss> {
        let inner = self.lock();
        match inner.records.get(&chat) {
            Some(rec) => Ok(rec.clone()),
            None => Err(inner.miss()),
        }
    }

    /// Keeps `rec`, read from sled after `miss`, unless the state machine
    /// put or cleared anything since.
    pub fn fill(&self, chat: u64, rec: &ChatRecord, miss: Miss) {
        let mut inner = self.lock();
        if inner.generation == miss.generation {
            inner.insert_record(chat, rec.clone());
        }
    }

    /// The newest `limit` messages below `end` that `keep` accepts, newest
    /// first and encoded as public messages, if the chat's tail holds every
    /// one of them (or holds all down to the chat's first message).
    pub fn page(
        &self,
        chat: u64,
        end: u64,
        limit: usize,
        keep: impl Fn(&MessageRecord) -> bool,
    ) -> Result<Vec<Bytes>, Miss> {
        let inner = self.lock();
        let Some(tail) = inner.tails.get(&chat).filter(|t| end <= t.to) else {
            return Err(inner.miss());
        };
        let mut out = Vec::with_capacity(limit);
        for m in tail.messages.range(..end).rev().map(|(_, m)| m) {
            if out.len() >= limit {
                break;
            }
            if keep(&m.record) {
                out.push(m.public.clone());
            }
        }
        if out.len() < limit && tail.from > 1 {
            return Err(inner.miss());
        }
        Ok(out)
    }

    /// The message `seq` of `chat` if its tail covers the seq (`None`: sled
    /// holds no such message).
    pub fn message(&self, chat: u64, seq: u64) -> Result<Option<MessageRecord>, Miss> {
        let inner = self.lock();
        match inner.tails.get(&chat) {
            Some(tail) if (tail.from..tail.to).contains(&seq) => {
                Ok(tail.messages.get(&seq).map(|m| m.record.clone()))
            }
            _ => Err(inner.miss()),
        }
    }

    /// Keeps `messages`, every record sled held with a seq in `from..to`
    /// when read after `miss`, as the chat's tail, unless the state machine
    /// put or cleared anything since. `to` is one past the chat's last seq
    /// as the reader knew it (an older record only makes the tail end
    /// sooner: the next send then drops it). Only the newest messages that
    /// fit in [`TAIL_BYTES_MAX`] are kept.
    pub fn fill_tail(
        &self,
        chat: u64,
        from: u64,
        to: u64,
        messages: impl IntoIterator<Item = impl Into<CachedMessage>>,
        miss: Miss,
    ) {
        if from >= to {
            return;
        }
        // Encoded before the lock is taken.
        let messages: BTreeMap<u64, CachedMessage> = messages
            .into_iter()
            .map(Into::into)
            .filter(|m| (from..to).contains(&m.record.seq))
            .map(|m| (m.record.seq, m))
            .collect();
        let mut inner = self.lock();
        if inner.generation != miss.generation {
            return;
        }
        let mut tail = Tail { from, to, messages };
        let mut bytes: usize = tail.messages.values().map(message_bytes).sum();
        while tail.messages.len() > TAIL_MESSAGES_MAX || bytes > TAIL_BYTES_MAX {
            let (seq, m) = tail.messages.pop_first().expect("over the limit");
            bytes -= message_bytes(&m);
            tail.from = seq + 1;
        }
        inner.set_tail(chat, tail, bytes, &self.budget);
    }

    /// The chat records and the message writes of an apply call, in key
    /// order (after they are in the memtable); wakes the waiters of those
    /// chats.
    pub fn put(
        &self,
        records: impl IntoIterator<Item = (u64, ChatRecord)>,
        messages: impl IntoIterator<Item = MessageWrite>,
    ) {
        // Chats are noted only while someone waits (the usual case is no
        // one); a waiter that comes meanwhile is woken with all the others.
        let noting = self.waiters.count.load(Ordering::SeqCst) > 0;
        let mut changed = Vec::new();
        // The messages of chats with a tail are encoded before the lock is
        // taken for the writes, so readers do not wait on the encoding. A
        // tail a reader fills meanwhile takes them below too, encoded then.
        let mut messages: Vec<(u64, u64, Option<Pending>)> = messages
            .into_iter()
            .map(|(chat, seq, m)| (chat, seq, m.map(Pending::Record)))
            .collect();
        if !messages.is_empty() {
            let tails: HashSet<u64> = {
                let inner = self.lock();
                messages
                    .iter()
                    .map(|(chat, ..)| *chat)
                    .filter(|chat| inner.tails.contains_key(chat))
                    .collect()
            };
            for (chat, _, m) in messages.iter_mut() {
                if let Some(Pending::Record(r)) = m.take_if(|_| tails.contains(chat)) {
                    *m = Some(Pending::Encoded(CachedMessage::from(r)));
                }
            }
        }
        {
            let mut inner = self.lock();
            inner.generation += 1;
            for (chat, rec) in records {
                if noting {
                    changed.push(chat);
                }
                inner.insert_record(chat, rec);
            }
            for (chat, seq, m) in messages {
                inner.write_message(chat, seq, m, &self.budget);
            }
        }
        // After the records are in (the waiters' count is read after them):
        // a waiter counted later reads the new record itself.
        self.waiters.wake(noting.then_some(&changed[..]));
    }

    /// Forgets the messages, keeping the chat records.
    pub fn forget_messages(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.clear_tails(&self.budget);
    }

    /// Forgets everything (the state is being replaced; waiters are woken
    /// once it is, by [`ChatCache::wake_all`]).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.records = HashMap::new();
        inner.clear_tails(&self.budget);
    }
}

impl Inner {
    fn miss(&self) -> Miss {
        Miss {
            generation: self.generation,
        }
    }

    fn insert_record(&mut self, chat: u64, rec: ChatRecord) {
        if self.records.len() >= CHATS_MAX && !self.records.contains_key(&chat) {
            self.records = HashMap::new();
        }
        self.records.insert(chat, rec);
    }

    fn drop_tail(&mut self, chat: u64, budget: &MemoryBudget) {
        if let Some(tail) = self.tails.remove(&chat) {
            let bytes = tail.messages.values().map(message_bytes).sum();
            give_back(&mut self.tail_bytes, bytes, budget);
        }
    }

    fn clear_tails(&mut self, budget: &MemoryBudget) {
        self.tails = HashMap::new();
        let bytes = self.tail_bytes;
        give_back(&mut self.tail_bytes, bytes, budget);
    }

    /// Keeps `tail` (of `bytes`, at most [`TAIL_BYTES_MAX`]) as the chat's.
    /// When this replica's bound is reached its tails start over; when the
    /// node's is, the tail is not kept (the replicas holding the budget are
    /// being read, or will give it back when they quiesce).
    fn set_tail(&mut self, chat: u64, tail: Tail, bytes: usize, budget: &MemoryBudget) {
        self.drop_tail(chat, budget);
        if self.tails.len() >= CHATS_MAX || self.tail_bytes + bytes > TAIL_BYTES_MAX {
            self.clear_tails(budget);
        }
        if take(&mut self.tail_bytes, bytes, budget) {
            self.tails.insert(chat, tail);
        }
    }

    /// Brings a chat's tail up to date with one message write; a write the
    /// tail cannot take in (a gap, no room) drops the tail.
    fn write_message(&mut self, chat: u64, seq: u64, m: Option<Pending>, budget: &MemoryBudget) {
        let Inner {
            tails, tail_bytes, ..
        } = self;
        let Some(tail) = tails.get_mut(&chat) else {
            return;
        };
        if seq < tail.from {
            return;
        }
        if seq > tail.to {
            self.drop_tail(chat, budget);
            return;
        }
        if seq == tail.to {
            tail.to += 1;
        }
        if let Some(old) = tail.messages.remove(&seq) {
            give_back(tail_bytes, message_bytes(&old), budget);
        }
        if let Some(m) = m {
            let m = match m {
                Pending::Encoded(m) => m,
                Pending::Record(r) => CachedMessage::from(r),
            };
            if !take(tail_bytes, message_bytes(&m), budget) {
                self.drop_tail(chat, budget);
                return;
            }
            tail.messages.insert(seq, m);
        }
        while tail.messages.len() > TAIL_MESSAGES_MAX {
            let (oldest, old) = tail.messages.pop_first().expect("over the limit");
            give_back(tail_bytes, message_bytes(&old), budget);
            tail.from = oldest + 1;
        }
    }
}

/// Counts `n` more bytes of cached messages against a replica's `used`, if
/// its bound and the node's budget allow.
fn take(used: &mut usize, n: usize, budget: &MemoryBudget) -> bool {
    if *used + n > TAIL_BYTES_MAX || !budget.take(n) {
        return false;
    }
    *used += n;
    true
}

fn give_back(used: &mut usize, n: usize, budget: &MemoryBudget) {
    *used -= n;
    budget.give_back(n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::reads::{decoded, to_public};
    use futures::FutureExt;

    /// A long poll's waiter wakes for a put of its own chat's record (even
    /// one between taking the wake-up and awaiting it), a clear and a stop,
    /// and not for other chats; dropped, it leaves nothing behind.
    #[test]
    fn a_waiter_wakes_for_its_own_chat_only() {
        let cache = ChatCache::default();
        let waiter = cache.waiter(7);
        let other = cache.waiter(7);
        let changed = waiter.changed();
        cache.put([(8, rec(1))], []);
        assert!(changed.now_or_never().is_none(), "another chat's put");
        let changed = waiter.changed();
        cache.put([(7, rec(1))], []);
        assert!(changed.now_or_never().is_some(), "its chat's put");
        let (first, second) = (waiter.changed(), other.changed());
        cache.clear();
        cache.wake_all();
        assert!(first.now_or_never().is_some() && second.now_or_never().is_some());
        // With a waiter counted, a put notes its chats and wakes only
        // theirs.
        let changed = waiter.changed();
        cache.put([(8, rec(2))], []);
        assert!(
            changed.now_or_never().is_none(),
            "counted: only chat 8's waiters"
        );
        drop(other);
        assert_eq!(cache.waiters.lock().get(&7).map(|(_, n)| *n), Some(1));
        drop(waiter);
        assert!(cache.waiters.lock().is_empty());
        assert_eq!(cache.waiters.count.load(Ordering::SeqCst), 0);
        let waiter = cache.waiter(9);
        let changed = waiter.changed();
        assert!(!waiter.stopped());
        cache.stop_waiters();
        assert!(changed.now_or_never().is_some() && waiter.stopped());
    }

    fn rec(last_seq: u64) -> ChatRecord {
        ChatRecord {
            last_seq,
            ..Default::default()
        }
    }

    #[test]
    fn a_fill_after_a_put_is_dropped() {
        let cache = ChatCache::default();
        let miss = cache.get(1).unwrap_err();
        // The state machine writes a newer record while the reader reads the
        // older one from sled.
        cache.put([(1, rec(2))], []);
        cache.fill(1, &rec(1), miss);
        assert_eq!(cache.get(1).unwrap().last_seq, 2);
        let miss = cache.get(3).unwrap_err();
        cache.clear();
        cache.fill(3, &rec(1), miss);
        assert!(cache.get(3).is_err());
        let miss = cache.get(3).unwrap_err();
        cache.fill(3, &rec(5), miss);
        assert_eq!(cache.get(3).unwrap().last_seq, 5);
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = ChatCache::default();
        cache.put((0..(CHATS_MAX as u64 * 3)).map(|c| (c, rec(c))), []);
        let inner = cache.inner.lock().unwrap();
        assert!(inner.records.len() <= CHATS_MAX);
        assert!(inner.records.contains_key(&(CHATS_MAX as u64 * 3 - 1)));
    }
    fn msg(chat: u64, seq: u64, body: &str) -> MessageRecord {
        MessageRecord {
            chat_id: chat,
            seq,
            body: body.as_bytes().to_vec().into(),
            ..Default::default()
        }
    }

    fn seqs(page: &[Bytes]) -> Vec<u64> {
        decoded(page.to_vec()).iter().map(|m| m.seq).collect()
    }

    /// `from`, `to` and the records of a window read from sled.
    type Window = (u64, u64, Vec<MessageRecord>);

    /// What sled holds for one chat, and what the cache must agree with.
    #[derive(Default)]
    struct Model {
        messages: BTreeMap<u64, MessageRecord>,
        last_seq: u64,
    }

    impl Model {
        fn page(&self, end: u64, limit: usize, keep: impl Fn(&MessageRecord) -> bool) -> Vec<u64> {
            self.messages
                .range(..end)
                .rev()
                .map(|(_, m)| m)
                .filter(|m| keep(m))
                .take(limit)
                .map(|m| m.seq)
                .collect()
        }

        /// The newest window as a reader reads it from sled on a miss:
        /// `from`, `to` and the records.
        fn window(&self, limit: u64) -> Window {
            let end = self.last_seq + 1;
            let start = end.saturating_sub(limit).max(1);
            let records = self.messages.range(start..end).map(|(_, m)| m.clone());
            (start, end, records.collect())
        }

        fn fill(&self, cache: &ChatCache, chat: u64, limit: u64, miss: Miss) {
            let (from, to, records) = self.window(limit);
            cache.fill_tail(chat, from, to, records, miss);
        }
    }

    #[test]
    fn a_tail_follows_sends_edits_and_removals() {
        let cache = ChatCache::default();
        let mut model = Model::default();
        let chat = 9;
        for seq in 1..=10 {
            model.messages.insert(seq, msg(chat, seq, "a"));
        }
        model.last_seq = 10;
        let miss = cache.page(chat, 11, 5, |_| true).unwrap_err();
        model.fill(&cache, chat, 5, miss);
        assert_eq!(
            seqs(&cache.page(chat, 11, 5, |_| true).unwrap()),
            vec![10, 9, 8, 7, 6]
        );
        // A page that needs messages older than the tail reads sled.
        assert!(cache.page(chat, 11, 6, |_| true).is_err());
        assert!(cache.page(chat, 6, 1, |_| true).is_err());
        // A send extends the tail; an edit replaces; a removal is known.
        cache.put([], [(chat, 11, Some(msg(chat, 11, "b")))]);
        cache.put([], [(chat, 8, Some(msg(chat, 8, "edited")))]);
        cache.put([], [(chat, 9, None)]);
        // An edit older than the tail changes nothing in it.
        cache.put([], [(chat, 2, Some(msg(chat, 2, "edited")))]);
        let page = cache.page(chat, 12, 4, |_| true).unwrap();
        assert_eq!(seqs(&page), vec![11, 10, 8, 7]);
        assert_eq!(&decoded(page.clone())[2].body[..], b"edited");
        assert_eq!(cache.message(chat, 9).unwrap(), None);
        assert_eq!(
            cache.message(chat, 11).unwrap().unwrap().body,
            "b".as_bytes()
        );
        assert!(cache.message(chat, 5).is_err());
        assert!(cache.message(chat, 12).is_err());
        // A write past the tail's end (a gap) drops the tail.
        cache.put([], [(chat, 13, Some(msg(chat, 13, "c")))]);
        assert!(cache.page(chat, 12, 1, |_| true).is_err());
        assert_eq!(cache.budget.used(), 0);
    }

    /// A cached message's encoding is the public message its record reads
    /// as, and its record's body is that encoding's bytes, not a copy.
    #[test]
    fn a_cached_message_holds_its_body_once() {
        let record = MessageRecord {
            pts: 4,
            expire_at_ms: 9,
            self_destruct: Some(crate::api::pb::replicated::SelfDestruct {
                policy: Some(crate::api::pb::replicated::self_destruct::Policy::AfterSendSecs(5)),
            }),
            ..msg(2, 3, "hello")
        };
        let cached = CachedMessage::from(record.clone());
        assert_eq!(
            pb::Message::decode(cached.public().clone()).unwrap(),
            to_public(record.clone())
        );
        assert_eq!(cached.record(), &record);
        let public = cached.public().as_ptr_range();
        assert!(public.contains(&cached.record().body.as_ptr()));
    }

    #[test]
    fn a_tail_fill_after_a_put_or_clear_is_dropped() {
        let cache = ChatCache::default();
        let miss = cache.page(1, 3, 2, |_| true).unwrap_err();
        cache.put([], [(1, 3, Some(msg(1, 3, "new")))]);
        cache.fill_tail(1, 1, 3, [msg(1, 1, "a"), msg(1, 2, "b")], miss);
        assert!(cache.page(1, 3, 2, |_| true).is_err());
        let miss = cache.page(1, 4, 2, |_| true).unwrap_err();
        cache.clear();
        cache.fill_tail(1, 2, 4, [msg(1, 2, "b"), msg(1, 3, "new")], miss);
        assert!(cache.page(1, 4, 2, |_| true).is_err());
        assert_eq!(cache.budget.used(), 0);
    }

    #[test]
    fn tails_stay_within_their_bounds() {
        let budget = Arc::new(MemoryBudget::unreported(TAIL_BYTES_MAX * 2));
        let cache = ChatCache::new(budget.clone());
        let body = "x".repeat(1000);
        // One tail keeps only its newest messages.
        let miss = cache.page(1, 1, 1, |_| true).unwrap_err();
        cache.fill_tail(1, 1, 2, [msg(1, 1, &body)], miss);
        let sends: Vec<MessageWrite> = (2..=1000).map(|s| (1, s, Some(msg(1, s, &body)))).collect();
        cache.put([], sends);
        let page = cache.page(1, 1001, TAIL_MESSAGES_MAX, |_| true).unwrap();
        assert_eq!(page.len(), TAIL_MESSAGES_MAX);
        assert_eq!(seqs(&page)[0], 1000);
        assert!(cache
            .page(1, 1001, TAIL_MESSAGES_MAX + 1, |_| true)
            .is_err());
        // Many chats: the replica's bytes stay under its bound.
        for chat in 2..200 {
            let miss = cache.page(chat, 101, 100, |_| true).unwrap_err();
            cache.fill_tail(chat, 1, 101, (1..=100).map(|s| msg(chat, s, &body)), miss);
            assert!(cache.lock().tail_bytes <= TAIL_BYTES_MAX);
            assert_eq!(cache.lock().tail_bytes, budget.used());
        }
        // A second replica shares the node's budget, and gives it back.
        let other = ChatCache::new(budget.clone());
        let miss = other.page(1, 101, 100, |_| true).unwrap_err();
        other.fill_tail(1, 1, 101, (1..=100).map(|s| msg(1, s, &body)), miss);
        assert!(budget.used() <= TAIL_BYTES_MAX * 2);
        drop(other);
        cache.clear();
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_large_page_keeps_its_newest_messages_and_spares_other_chats() {
        let budget = Arc::new(MemoryBudget::unreported(
            TAIL_BYTES_MAX + TAIL_BYTES_MAX / 2,
        ));
        let cache = ChatCache::new(budget.clone());
        let miss = cache.page(1, 3, 2, |_| true).unwrap_err();
        cache.fill_tail(1, 1, 3, [msg(1, 1, "a"), msg(1, 2, "b")], miss);
        // 100 messages of 64 KiB do not fit in one replica's bound: the
        // tail keeps the newest that do, and chat 1 keeps its tail.
        let big = "x".repeat(64 * 1024);
        let miss = cache.page(2, 101, 100, |_| true).unwrap_err();
        cache.fill_tail(2, 1, 101, (1..=100).map(|s| msg(2, s, &big)), miss);
        let kept = cache.page(2, 101, 10, |_| true).unwrap();
        assert_eq!(seqs(&kept)[0], 100);
        assert!(cache.page(2, 101, 100, |_| true).is_err());
        assert!(cache.lock().tail_bytes <= TAIL_BYTES_MAX);
        assert_eq!(seqs(&cache.page(1, 3, 2, |_| true).unwrap()), vec![2, 1]);
        // Another replica finds the node's budget mostly taken: its tail is
        // not kept, and the first replica's tails stay.
        let other = ChatCache::new(budget.clone());
        let miss = other.page(3, 101, 100, |_| true).unwrap_err();
        other.fill_tail(3, 1, 101, (1..=100).map(|s| msg(3, s, &big)), miss);
        assert!(other.page(3, 101, 1, |_| true).is_err());
        assert_eq!(seqs(&cache.page(1, 3, 2, |_| true).unwrap()), vec![2, 1]);
        // A quiet replica gives its share back.
        cache.forget_messages();
        assert!(cache.page(1, 3, 2, |_| true).is_err());
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_cache_without_budget_keeps_no_messages() {
        let cache = ChatCache::new(Arc::new(MemoryBudget::unreported(0)));
        let miss = cache.page(1, 3, 2, |_| true).unwrap_err();
        cache.fill_tail(1, 1, 3, [msg(1, 1, "a"), msg(1, 2, "b")], miss);
        assert!(cache.page(1, 3, 2, |_| true).is_err());
        // A tail of removals only holds no bytes and still answers.
        let miss = cache.page(2, 2, 1, |_| true).unwrap_err();
        cache.fill_tail(2, 1, 2, Vec::<MessageRecord>::new(), miss);
        assert!(cache.page(2, 2, 1, |_| true).unwrap().is_empty());
        cache.put([], [(2, 2, Some(msg(2, 2, "new")))]);
        assert!(cache.page(2, 3, 1, |_| true).is_err());
        assert_eq!(cache.budget.used(), 0);
    }

    proptest::proptest! {
        /// Whatever the order of applies, reads and fills, every page the
        /// cache answers is the page sled would give.
        #[test]
        fn pages_from_memory_match_sled(ops in proptest::collection::vec((0u8..8, 0u64..40, 1usize..12), 1..200)) {
            let cache = ChatCache::new(Arc::new(MemoryBudget::unreported(64 * 1024)));
            let chat = 3;
            let mut model = Model::default();
            let mut pending: Option<(Miss, Window)> = None;
            let visible = |m: &MessageRecord| !m.body.starts_with(b"hidden");
            for (op, n, limit) in ops {
                match op {
                    0 | 1 => {
                        model.last_seq += 1;
                        let body = if n % 5 == 0 { "hidden" } else { "m" };
                        let m = msg(chat, model.last_seq, body);
                        model.messages.insert(m.seq, m.clone());
                        cache.put([], [(chat, m.seq, Some(m))]);
                    }
                    2 => {
                        if let Some(m) = model.messages.values().nth(n as usize).cloned() {
                            let edited = msg(chat, m.seq, if n % 2 == 0 { "hidden edit" } else { "edit" });
                            model.messages.insert(m.seq, edited.clone());
                            cache.put([], [(chat, m.seq, Some(edited))]);
                        }
                    }
                    3 => {
                        if let Some(seq) = model.messages.keys().nth(n as usize).copied() {
                            model.messages.remove(&seq);
                            cache.put([], [(chat, seq, None)]);
                        }
                    }
                    4 => {
                        // A reader misses now and fills later, maybe after
                        // applies that make its view stale.
                        if let Some((miss, (from, to, records))) = pending.take() {
                            cache.fill_tail(chat, from, to, records, miss);
                        } else if let Err(miss) = cache.page(chat, model.last_seq + 1, limit, visible) {
                            pending = Some((miss, model.window(limit as u64)));
                        }
                    }
                    5 => {
                        if let Err(miss) = cache.page(chat, model.last_seq + 1, limit, visible) {
                            model.fill(&cache, chat, limit as u64, miss);
                        }
                    }
                    6 => cache.clear(),
                    _ => {}
                }
                let end = (model.last_seq + 1).saturating_sub(n % 4);
                if let Ok(page) = cache.page(chat, end, limit, visible) {
                    proptest::prop_assert_eq!(seqs(&page), model.page(end, limit, visible));
                }
                for seq in [end.saturating_sub(1), end.saturating_sub(n % 7)] {
                    if let Ok(m) = cache.message(chat, seq) {
                        proptest::prop_assert_eq!(m, model.messages.get(&seq).cloned());
                    }
                }
                proptest::prop_assert_eq!(cache.lock().tail_bytes, cache.budget.used());
            }
        }
    }
}
