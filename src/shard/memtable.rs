//! Write-behind for a shard's state tree: the effects of apply calls that
//! sled does not hold yet.
//!
//! ```text
//!  apply call ──▶ Memtable (in memory, key order) ── flush ──▶ sled tree
//!                                                               (marker, effects, applied id)
//!  readers ──▶ View: the memtable first, then sled
//! ```
//!
//! Why. A sled insert of a new key costs far more than the work around it
//! (sled 0.34 clones the leaf, rewrites it every tenth insert and splits it
//! past 16 entries), and a send makes three new keys on every replica.
//! Gathering a shard's writes for about [`FLUSH_AGE_MAX`] and writing them in
//! key order, once per key, took batched sends up 14-18% and unary sends at
//! 256 in flight up 8-12% in A/B runs (`BENCHMARKS.md`, seventeenth round).
//! The records a flush writes are still most of a send's cost: throwaway
//! runs that left the message records out went 40% faster again, and
//! without the dedup and change records too, 2.5 times; messages written as
//! blocks rewritten at each flush were no faster (same round).
//!
//! Crash. Every applied entry is in the Raft log, durable before its effects
//! enter the memtable. sled's applied id names the last entry of the last
//! flush, so after a crash openraft applies the log again from there: the
//! memtable is lost, never half written. A flush writes the apply marker,
//! the effects and then the applied id, as one apply call did before (see
//! [`crate::shard::state_machine`]). A snapshot is built after a flush, so
//! the log is never purged past what sled holds.
//!
//! Readers. A flush writes to sled first and empties the memtable after, so a
//! key is always in one of the two with the same value; a [`View`] looks in
//! the memtable first, and a range copies the memtable's part before it
//! walks sled. Self-destructing bodies wait here in the clear and are sealed
//! when flushed: the key ring's hold covers each sealed record from choosing
//! its key to its write, so the eraser never destroys a key that a flush is
//! sealing with; the eraser re-seals sled's copy of a record that has a
//! write waiting here too (replay after a crash reads that copy), and the
//! waiting write still lands over it.

use std::collections::BTreeMap;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use sled::IVec;

use crate::api::codec::{decode, to_json};
use crate::shard::sealing;
use crate::shard::types::LogId;
use crate::storage::seal::Key;
use crate::storage::{keys, KeyRing, MemoryBudget};

/// A replica flushes once its memtable holds this many bytes.
pub const FLUSH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// A replica flushes at its first apply call about this long (see
/// `flush_deadline`) after the write that began its memtable. On the
/// batched-send benchmark 300 ms, 500 ms and 1 s gave the same throughput.
pub const FLUSH_AGE_MAX: Duration = Duration::from_millis(1000);
/// Bytes the memtables of a node's replicas hold together before each
/// replica that applies something flushes.
pub const NODE_BYTES_MAX: usize = 128 * 1024 * 1024;
/// What a key costs the memtable besides its bytes (the map's node and the
/// value's header), for the bounds above.
const ENTRY_OVERHEAD_BYTES: usize = 64;

/// A value waiting to be written: its bytes as readers see them, and whether
/// it is a message record whose body is sealed when it is flushed.
#[derive(Clone, Debug)]
pub struct Pending {
    pub value: IVec,
    pub seal: bool,
}

/// A key's pending write: a value, or None to remove it.
pub type PendingWrite = (Vec<u8>, Option<Pending>);

#[derive(Default)]
struct Inner {
    writes: BTreeMap<Vec<u8>, Option<Pending>>,
    bytes: usize,
    /// The last log id whose effects are here; None while nothing is.
    last: Option<LogId>,
    /// When they are due to be flushed (set by the first of them).
    due: Option<Instant>,
}

/// When a memtable begun now is due: between a half and one and a half of
/// [`FLUSH_AGE_MAX`] from now, at random. Replicas that began together (a
/// node's start, a burst of writes) would otherwise flush together, and
/// the applies of every one of them would wait behind the burst: with a
/// fixed age of 3 s, batched sends saw a p99 of 1.7 s.
fn flush_deadline() -> Instant {
    let age = FLUSH_AGE_MAX.as_millis() as u64;
    Instant::now() + Duration::from_millis(age / 2 + rand::random::<u64>() % age)
}

fn entry_bytes(key: &[u8], value: &Option<Pending>) -> usize {
    key.len() + value.as_ref().map_or(0, |p| p.value.len()) + ENTRY_OVERHEAD_BYTES
}

/// One replica's writes that sled does not hold yet. Only the state
/// machine's task writes it; readers of the replica read it.
pub struct Memtable {
    inner: RwLock<Inner>,
    node: Arc<MemoryBudget>,
}

impl Memtable {
    pub fn new(node: Arc<MemoryBudget>) -> Memtable {
        Memtable {
            inner: RwLock::default(),
            node,
        }
    }

    /// A memtable on a bound of its own (tests, and readers over a bare tree).
    pub fn unshared() -> Memtable {
        Memtable::new(Arc::new(MemoryBudget::unreported(NODE_BYTES_MAX)))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().expect("memtable lock")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().expect("memtable lock")
    }

    /// The key's pending write: Some(None) if it is to be removed, None if
    /// the memtable does not know it.
    pub fn get(&self, key: &[u8]) -> Option<Option<IVec>> {
        self.read()
            .writes
            .get(key)
            .map(|w| w.as_ref().map(|p| p.value.clone()))
    }

    /// The pending writes with keys in `range`, ascending.
    fn copy_range(&self, range: (Bound<&[u8]>, Bound<&[u8]>)) -> Vec<(IVec, Option<IVec>)> {
        let inner = self.read();
        if inner.writes.is_empty() {
            return Vec::new();
        }
        inner
            .writes
            .range::<[u8], _>(range)
            .map(|(k, w)| {
                (
                    IVec::from(k.as_slice()),
                    w.as_ref().map(|p| p.value.clone()),
                )
            })
            .collect()
    }

    /// The last log id whose effects are pending, if any are.
    pub fn last(&self) -> Option<LogId> {
        self.read().last
    }

    pub fn is_empty(&self) -> bool {
        self.read().last.is_none()
    }

    /// Adds the effects of an apply call that ended at `last`.
    pub fn extend(&self, writes: impl IntoIterator<Item = PendingWrite>, last: LogId) {
        let mut inner = self.write();
        let before = inner.bytes;
        for (key, value) in writes {
            let added = entry_bytes(&key, &value);
            if let Some(old) = inner.writes.get(&key) {
                let old = entry_bytes(&key, old);
                inner.bytes -= old;
            }
            inner.writes.insert(key, value);
            inner.bytes += added;
        }
        inner.last = Some(last);
        inner.due.get_or_insert_with(flush_deadline);
        let after = inner.bytes;
        drop(inner);
        match after >= before {
            true => self.node.add(after - before),
            false => self.node.give_back(before - after),
        }
    }

    /// Whether this replica should flush now: its memtable is large or old,
    /// or the node's memtables together are over their bound.
    pub fn flush_due(&self) -> bool {
        let inner = self.read();
        inner.bytes >= FLUSH_BYTES_MAX
            || inner.due.is_some_and(|t| Instant::now() >= t)
            || (inner.bytes > 0 && self.node.used() >= NODE_BYTES_MAX)
    }

    /// Hands the pending writes and their last log id to `write` (which puts
    /// them in sled) while readers still see them here, then forgets them if
    /// it succeeded. Nothing is added meanwhile: only the state machine's
    /// task adds, and it is the caller (others flush through it:
    /// `Shard::flush_state`). Should anything have come meanwhile, nothing
    /// is forgotten, and the next flush writes it all again.
    pub fn flush_with<F>(&self, write: F) -> io::Result<()>
    where
        F: FnOnce(&BTreeMap<Vec<u8>, Option<Pending>>, LogId) -> io::Result<()>,
    {
        let last_written = {
            let inner = self.read();
            let Some(last) = inner.last else {
                return Ok(());
            };
            write(&inner.writes, last)?;
            last
        };
        let mut inner = self.write();
        if inner.last == Some(last_written) {
            let bytes = std::mem::take(&mut *inner).bytes;
            drop(inner);
            self.node.give_back(bytes);
        }
        Ok(())
    }

    /// Writes the pending writes to `tree` and forgets them: the apply
    /// marker, the effects in key order (self-destructing bodies sealed with
    /// `ring`'s current key), then the applied id. sled recovers a prefix of
    /// these, and the state machine's open rebuilds a tree whose marker is
    /// ahead of its applied id. The marker stays: removing it would cost one
    /// more write per flush.
    pub fn flush_into(&self, tree: &sled::Tree, ring: Option<&KeyRing>) -> io::Result<()> {
        self.flush_with(|writes, last| {
            let put = |k: &[u8], v: IVec| tree.insert(k, v).map(drop).map_err(io::Error::other);
            let sealing = writes.values().flatten().any(|p| p.seal);
            let ring = match (sealing, ring) {
                (true, None) => return Err(io::Error::other("a body to seal and no key ring")),
                (true, Some(ring)) => Some(ring),
                (false, _) => None,
            };
            // The key new seals use, looked up again when the epoch moves on.
            let mut sealing_with: Option<(u64, Key)> = None;
            put(keys::SM_META_APPLYING, to_json(&Some(last)).into())?;
            for (k, w) in writes {
                match (w, ring) {
                    (Some(p), Some(ring)) if p.seal => {
                        // Held from choosing the key to the record being in
                        // the tree, so the eraser cannot destroy the key
                        // under it; and only that long: the eraser waits for
                        // every holder, and every flush of every replica on
                        // this node waits behind the eraser.
                        let _hold = ring.hold();
                        let epoch = ring.current_epoch();
                        if sealing_with.as_ref().is_none_or(|(e, _)| *e != epoch) {
                            sealing_with = Some(ring.current_key()?);
                        }
                        let (epoch, key) = sealing_with.as_ref().expect("set above");
                        let m = decode(&p.value, "message")?;
                        put(k, sealing::seal_message(m, *epoch, key).into())?;
                    }
                    (Some(p), _) => put(k, p.value.clone())?,
                    (None, _) => tree.remove(k).map(drop).map_err(io::Error::other)?,
                }
            }
            put(keys::SM_META_APPLIED, to_json(&Some(last)).into())?;
            metrics::counter!(crate::metrics::MEMTABLE_FLUSHES).increment(1);
            Ok(())
        })
    }

    /// Forgets every pending write (a snapshot replaces the state).
    pub fn clear(&self) {
        let bytes = std::mem::take(&mut *self.write()).bytes;
        self.node.give_back(bytes);
    }
}

impl Drop for Memtable {
    fn drop(&mut self) {
        let bytes = self.inner.get_mut().map(|i| i.bytes).unwrap_or(0);
        self.node.give_back(bytes);
    }
}

/// A replica's state as readers see it: its memtable over its sled tree.
/// The calls mirror `sled::Tree`'s.
#[derive(Clone)]
pub struct View {
    tree: sled::Tree,
    mem: Arc<Memtable>,
}

impl From<sled::Tree> for View {
    /// A tree with nothing pending over it.
    fn from(tree: sled::Tree) -> View {
        View::new(tree, Arc::new(Memtable::unshared()))
    }
}

fn as_slice_bound<K: AsRef<[u8]>>(b: Bound<&K>) -> Bound<&[u8]> {
    match b {
        Bound::Included(k) => Bound::Included(k.as_ref()),
        Bound::Excluded(k) => Bound::Excluded(k.as_ref()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl View {
    pub fn new(tree: sled::Tree, mem: Arc<Memtable>) -> View {
        View { tree, mem }
    }

    pub fn get(&self, key: impl AsRef<[u8]>) -> sled::Result<Option<IVec>> {
        match self.mem.get(key.as_ref()) {
            Some(pending) => Ok(pending),
            None => self.tree.get(key),
        }
    }

    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> sled::Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// The pairs with keys in `range`, ascending.
    pub fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Merged {
        self.merged(range, false)
    }

    /// The pairs with keys in `range`, descending.
    pub fn range_rev<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Merged {
        self.merged(range, true)
    }

    /// The pairs whose keys start with `prefix`, ascending.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Merged {
        let prefix = prefix.as_ref();
        // The first key past every key with the prefix: the prefix with its
        // last byte below 0xff raised by one and the rest dropped.
        let end = prefix.iter().rposition(|b| *b != 0xff).map(|i| {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        });
        let upper = match &end {
            Some(end) => Bound::Excluded(end.as_slice()),
            None => Bound::Unbounded,
        };
        let mem = self.mem.copy_range((Bound::Included(prefix), upper));
        Merged::new(mem, self.tree.scan_prefix(prefix), false)
    }

    fn merged<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R, rev: bool) -> Merged {
        let bounds = (
            as_slice_bound(range.start_bound()),
            as_slice_bound(range.end_bound()),
        );
        // A map's range panics where it would be empty; sled's yields nothing.
        let empty = match bounds {
            (Bound::Included(s) | Bound::Excluded(s), Bound::Included(e) | Bound::Excluded(e)) => {
                s > e || (s == e && !matches!(bounds, (Bound::Included(_), Bound::Included(_))))
            }
            _ => false,
        };
        let mem = match empty {
            true => Vec::new(),
            false => self.mem.copy_range(bounds),
        };
        Merged::new(mem, self.tree.range(range), rev)
    }
}

/// The memtable's copied pairs merged with a sled iterator: a key in both
/// takes the memtable's value, and a pending removal hides it.
pub struct Merged {
    mem: std::vec::IntoIter<(IVec, Option<IVec>)>,
    mem_next: Option<(IVec, Option<IVec>)>,
    base: sled::Iter,
    base_next: Option<(IVec, IVec)>,
    rev: bool,
}

impl Merged {
    fn new(mut mem: Vec<(IVec, Option<IVec>)>, base: sled::Iter, rev: bool) -> Merged {
        if rev {
            mem.reverse();
        }
        Merged {
            mem: mem.into_iter(),
            mem_next: None,
            base,
            base_next: None,
            rev,
        }
    }
}

impl Iterator for Merged {
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.base_next.is_none() {
                let step = match self.rev {
                    true => self.base.next_back(),
                    false => self.base.next(),
                };
                match step {
                    Some(Ok(pair)) => self.base_next = Some(pair),
                    Some(Err(e)) => return Some(Err(e)),
                    None => {}
                }
            }
            if self.mem_next.is_none() {
                self.mem_next = self.mem.next();
            }
            let from_mem = match (&self.mem_next, &self.base_next) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((m, _)), Some((b, _))) if m == b => {
                    self.base_next = None;
                    true
                }
                (Some((m, _)), Some((b, _))) => (m < b) != self.rev,
            };
            if !from_mem {
                return self.base_next.take().map(Ok);
            }
            match self.mem_next.take().expect("chosen above") {
                (k, Some(v)) => return Some(Ok((k, v))),
                (_, None) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::{Memtable, Pending, View};
    use crate::shard::types::LogId;

    fn log_id(index: u64) -> LogId {
        crate::shard::types::log_id(1, index)
    }

    fn pending(v: &[u8]) -> Option<Pending> {
        Some(Pending {
            value: v.into(),
            seal: false,
        })
    }

    fn pairs(it: super::Merged) -> Vec<(Vec<u8>, Vec<u8>)> {
        it.map(|p| {
            let (k, v) = p.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
    }

    #[test]
    fn a_view_takes_pending_values_and_removals_over_the_tree() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("t").unwrap();
        for k in [b"a", b"b", b"c", b"d"] {
            tree.insert(k, &b"tree"[..]).unwrap();
        }
        let mem = Arc::new(Memtable::unshared());
        mem.extend(
            [
                (b"b".to_vec(), pending(b"mem")),
                (b"c".to_vec(), None),
                (b"e".to_vec(), pending(b"mem")),
            ],
            log_id(3),
        );
        let view = View::new(tree.clone(), mem.clone());
        assert_eq!(view.get(b"b").unwrap().unwrap().as_ref(), b"mem");
        assert_eq!(view.get(b"c").unwrap(), None);
        assert_eq!(view.get(b"a").unwrap().unwrap().as_ref(), b"tree");
        let want = vec![
            (b"a".to_vec(), b"tree".to_vec()),
            (b"b".to_vec(), b"mem".to_vec()),
            (b"d".to_vec(), b"tree".to_vec()),
            (b"e".to_vec(), b"mem".to_vec()),
        ];
        assert_eq!(pairs(view.range::<&[u8], _>(..)), want);
        let mut rev = want.clone();
        rev.reverse();
        assert_eq!(pairs(view.range_rev::<&[u8], _>(..)), rev);
        assert_eq!(mem.last(), Some(log_id(3)));

        // A flush that fails keeps everything pending; one that succeeds
        // leaves the view reading the same from the tree alone.
        let failed = mem.flush_with(|_, _| Err(std::io::Error::other("disk full")));
        assert!(failed.is_err());
        assert!(!mem.is_empty());
        mem.flush_with(|writes, last| {
            assert_eq!(last, log_id(3));
            for (k, w) in writes {
                match w {
                    Some(p) => tree.insert(k, p.value.clone()).map(drop),
                    None => tree.remove(k).map(drop),
                }
                .unwrap();
            }
            Ok(())
        })
        .unwrap();
        assert!(mem.is_empty());
        assert_eq!(pairs(view.range::<&[u8], _>(..)), want);
    }

    #[test]
    fn node_bytes_follow_what_the_memtables_hold() {
        let node = Arc::new(crate::storage::MemoryBudget::unreported(1 << 20));
        let mem = Memtable::new(node.clone());
        mem.extend([(b"k".to_vec(), pending(&[0; 100]))], log_id(1));
        let one = node.used();
        assert!(one >= 100);
        mem.extend([(b"k".to_vec(), pending(&[0; 10]))], log_id(2));
        assert!(node.used() < one);
        mem.clear();
        assert_eq!(node.used(), 0);
        mem.extend([(b"k".to_vec(), None)], log_id(3));
        drop(mem);
        assert_eq!(node.used(), 0);
    }

    proptest! {
        /// Any tree and memtable, any range or prefix, either direction:
        /// the view reads what the tree would hold after a flush.
        #[test]
        fn a_view_reads_what_a_flush_would_leave(
            tree_keys in proptest::collection::btree_map(0u8..24, any::<u8>(), 0..16),
            mem_writes in proptest::collection::btree_map(0u8..24, proptest::option::of(any::<u8>()), 0..16),
            start in 0u8..26,
            len in 0u8..26,
            rev in any::<bool>(),
            prefix in proptest::option::of(prop_oneof![0u8..3, Just(0xffu8)]),
        ) {
            let db = sled::Config::new().temporary(true).open().unwrap();
            let tree = db.open_tree("t").unwrap();
            // Two-byte keys, so a prefix of one byte picks a third of them
            // (or a few, under 0xff).
            let key = |k: u8| match k {
                20.. => vec![0xff, k],
                _ => vec![k % 3, k],
            };
            let mut model = BTreeMap::new();
            for (k, v) in &tree_keys {
                tree.insert(key(*k), vec![*v]).unwrap();
                model.insert(key(*k), vec![*v]);
            }
            let mem = Arc::new(Memtable::unshared());
            let mut writes = Vec::new();
            for (k, v) in &mem_writes {
                writes.push((key(*k), v.map(|v| Pending { value: vec![v, 0].into(), seal: false })));
                match v {
                    Some(v) => model.insert(key(*k), vec![*v, 0]),
                    None => model.remove(&key(*k)),
                };
            }
            mem.extend(writes, log_id(1));
            let view = View::new(tree, mem);
            let (got, mut want): (Vec<_>, Vec<_>) = match prefix {
                Some(p) => (
                    pairs(view.scan_prefix([p])),
                    model.iter().filter(|(k, _)| k[0] == p).map(|(k, v)| (k.clone(), v.clone())).collect(),
                ),
                None => {
                    let (s, e) = (vec![start % 3, start], vec![(start % 3).saturating_add(len % 2), len]);
                    let got = match rev {
                        true => pairs(view.range_rev(s.clone()..e.clone())),
                        false => pairs(view.range(s.clone()..e.clone())),
                    };
                    let want = match s <= e {
                        true => model.range(s..e).map(|(k, v)| (k.clone(), v.clone())).collect(),
                        false => Vec::new(),
                    };
                    (got, want)
                }
            };
            if rev && prefix.is_none() {
                want.reverse();
            }
            prop_assert_eq!(got, want);
        }
    }
}
