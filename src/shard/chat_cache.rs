//! The chat records a replica wrote or read last, in memory, so that a read
//! skips a sled lookup and a decode of the record.
//!
//! The state machine is the only writer of chat records. After each apply
//! call has written its effects to sled (and before openraft publishes the
//! applied index) it puts every chat record it wrote here; loading a
//! snapshot empties the cache. A reader that misses reads sled and fills the
//! entry only if nothing was put or emptied since it began: otherwise it may
//! hold a value older than one the state machine has put meanwhile. So an
//! entry is never older than what sled held when the applied index a reader
//! waited for was published.
//!
//! At most [`CHATS_MAX`] records per replica; when full, the cache starts
//! over empty. An idle replica's cache holds nothing until it is used.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::api::pb::replicated::ChatRecord;

/// Most chat records cached per replica (about 100 bytes each).
pub const CHATS_MAX: usize = 512;

#[derive(Default)]
pub struct ChatCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    records: HashMap<u64, ChatRecord>,
    /// Bumped by every put and every clear.
    generation: u64,
}

/// What a reader saw before reading sled on a miss.
#[derive(Debug)]
pub struct Miss {
    generation: u64,
}

impl ChatCache {
    /// The cached record, or a [`Miss`] to fill once sled is read.
    pub fn get(&self, chat: u64) -> Result<ChatRecord, Miss> {
        let inner = self.inner.lock().expect("chat cache lock");
        match inner.records.get(&chat) {
            Some(rec) => Ok(rec.clone()),
            None => Err(Miss {
                generation: inner.generation,
            }),
        }
    }

    /// Keeps `rec`, read from sled after `miss`, unless the state machine
    /// put or cleared anything since.
    pub fn fill(&self, chat: u64, rec: &ChatRecord, miss: Miss) {
        let mut inner = self.inner.lock().expect("chat cache lock");
        if inner.generation == miss.generation {
            inner.insert(chat, rec.clone());
        }
    }

    /// The records an apply call wrote (after they are in sled).
    pub fn put(&self, records: impl IntoIterator<Item = (u64, ChatRecord)>) {
        let mut inner = self.inner.lock().expect("chat cache lock");
        inner.generation += 1;
        for (chat, rec) in records {
            inner.insert(chat, rec);
        }
    }

    /// Forgets everything (the state was replaced).
    pub fn clear(&self) {
        let mut inner = self.inner.lock().expect("chat cache lock");
        inner.generation += 1;
        inner.records = HashMap::new();
    }
}

impl Inner {
    fn insert(&mut self, chat: u64, rec: ChatRecord) {
        if self.records.len() >= CHATS_MAX && !self.records.contains_key(&chat) {
            self.records = HashMap::new();
        }
        self.records.insert(chat, rec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        cache.put([(1, rec(2))]);
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
        cache.put((0..(CHATS_MAX as u64 * 3)).map(|c| (c, rec(c))));
        let inner = cache.inner.lock().unwrap();
        assert!(inner.records.len() <= CHATS_MAX);
        assert!(inner.records.contains_key(&(CHATS_MAX as u64 * 3 - 1)));
    }
}
