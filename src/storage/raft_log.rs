//! Every shard's Raft log on a node, in one set of append-only files.
//!
//! ```text
//!  raft-log/00000000000000000007.log
//!  ┌────────┬────────────────────────────┬───────────────────┬──────────┬─────
//!  │ header │ checkpoint: every shard's  │ entries (shard 3, │ vote     │ ...
//!  │        │ vote, committed, purged id │ 101..=102)        │ (shard 9)│
//!  │        │ and the bounds of its log  │                   │          │
//!  └────────┴────────────────────────────┴───────────────────┴──────────┴─────
//! ```
//!
//! Why not sled: each appended entry was a B-tree insert that copied its
//! tree node and, at the next flush, rewrote that node whole, and every ack
//! waited for a flush of all of sled (state machines included). Here an
//! append is one `pwrite` of the encoded entries to the end of the current
//! file, and one group-commit `fdatasync` of that file makes the appends of
//! every shard durable. The state machines' sled writes no longer wait for
//! anything: after a crash, what sled lost is applied again from this log,
//! and a shard's entries are purged only after sled is synced.
//!
//! The files:
//! - A *segment* is a header (magic, format version) and then records; each
//!   record is `[body length u32][crc32 of length and body u32][body]`, all
//!   little-endian, and its body starts with a kind byte and the shard id.
//! - Records: `ENTRIES` (encoded entries with their index, term and sealing
//!   epoch; an entry at or below the shard's last index first truncates the
//!   log there), `VOTE`, `COMMITTED`, `TRUNCATE`, `PURGE`, `DROP` (the replica
//!   is gone), `REWRITE` (live entries copied out of an old segment) and a
//!   checkpoint (`CHECKPOINT_SHARD` per shard, then `CHECKPOINT_END`).
//! - When the current segment passes [`SEGMENT_BYTES`], it is fsynced and a
//!   new one starts with a checkpoint: every shard's vote, committed and
//!   purged ids and the bounds of its log. So metadata never needs an older
//!   segment, and an older segment is deleted once none of its entries is
//!   live. A mostly dead segment that a quiet shard's few entries keep alive
//!   has those entries copied forward (`REWRITE`) and goes too.
//! - Each record's checksum covers its segment's id (format 2), so a record
//!   does not pass in a file under another segment's name.
//!
//! Crash safety:
//! - Every segment but the last was fsynced whole before the next one was
//!   written, so only the last can end in a torn record; opening cuts it
//!   there. A bad record anywhere else is corruption, and opening refuses.
//! - The last segment's records are in write order, and nothing was
//!   reported durable past the first record a crash tore; so cutting there
//!   keeps everything acknowledged.
//! - After each group commit the segment's header records how far that
//!   fsync reached (the *durable mark*, a u32 at byte 12, written after the
//!   fsync and durable with the next). A bad record below the mark is not a
//!   torn write but damage to what was fsynced (a bad sector): opening
//!   refuses, as for a closed segment, instead of cutting off acknowledged
//!   entries and votes with it. (0: no mark yet, or a segment written
//!   before the mark existed; older binaries ignore it.)
//! - Segments are deleted only after the current one (its checkpoint and any
//!   copied entries) is fsynced, and the folder is fsynced after a deletion,
//!   so a deleted segment never comes back.
//! - A failed write or fsync poisons the log: nothing more is written or
//!   acknowledged by this process.
//!
//! The in-memory index holds each entry's place (segment, offset, length,
//! term, sealing epoch): 40 bytes per entry. Reads `pread` the entry.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::durability::{poisoned_error, Durability};

/// A segment is closed and a new one started once it is this large.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Largest record body written (an append is split into records of at
/// most this much, plus one entry); larger ones are corruption.
const RECORD_BODY_TARGET: usize = 4 * 1024 * 1024;
const RECORD_BODY_MAX: usize = 64 * 1024 * 1024;

/// Longest wait between two looks at whether entries became durable.
const DURABLE_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

const MAGIC: &[u8; 8] = b"CSRAFTLG";
/// Version 2 seeds each record's checksum with its segment's id (version 1,
/// written by a5292ce only, did not).
const FORMAT_VERSION: u32 = 2;
const FORMAT_VERSION_UNSEEDED: u32 = 1;
/// Dead segment files that 0c40eff kept for reuse; deleted on open.
const SPARE_SUFFIX: &str = ".spare";
const HEADER_BYTES: u64 = 16;
/// Where a segment's header keeps its durable mark (u32, little-endian).
const DURABLE_MARK_AT: u64 = 12;
const RECORD_HEADER_BYTES: usize = 8;
const FILE_SUFFIX: &str = ".log";

const ENTRIES: u8 = 1;
const VOTE: u8 = 2;
const COMMITTED: u8 = 3;
const TRUNCATE: u8 = 4;
const PURGE: u8 = 5;
const DROP: u8 = 6;
const CHECKPOINT_SHARD: u8 = 7;
const CHECKPOINT_END: u8 = 8;
const REWRITE: u8 = 9;

/// One entry to append: its encoded bytes, and what the index keeps of it.
pub struct EntryBytes<'a> {
    pub index: u64,
    pub term: u64,
    /// The key epoch that sealed bodies in it (0: none).
    pub sealed_epoch: u64,
    pub bytes: &'a [u8],
}

/// Where an entry's bytes are, and what the log needs to know of it
/// without reading them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    term: u64,
    sealed_epoch: u64,
    segment: u64,
    offset: u64,
    len: u32,
}

/// A value no shard log had before in this process (see
/// `ShardLog::generation`).
fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One shard's log: its entries from `first` on, and its metadata (stored
/// as the bytes the caller gave).
struct ShardLog {
    first: u64,
    places: VecDeque<Place>,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    /// The last purged index, and the caller's record of it.
    purged: Option<(u64, Vec<u8>)>,
    /// Every entry below this is on disk.
    durable_end: u64,
    /// Replaced when entries are removed from the end (and unique to this
    /// log), so that a group commit that saw the log before does not report
    /// the replaced entries, or a dropped log's, durable.
    generation: u64,
}

impl ShardLog {
    fn new() -> ShardLog {
        ShardLog {
            first: 0,
            places: VecDeque::new(),
            vote: None,
            committed: None,
            purged: None,
            durable_end: 0,
            generation: next_generation(),
        }
    }

    /// The lowest index an entry may have when the log holds none.
    fn floor(&self) -> u64 {
        self.purged.as_ref().map_or(0, |(p, _)| p.saturating_add(1))
    }

    /// One past the last entry (`first` when there is none).
    fn end(&self) -> u64 {
        self.first + self.places.len() as u64
    }

    fn place(&self, index: u64) -> Option<&Place> {
        let i = index.checked_sub(self.first)?;
        self.places.get(usize::try_from(i).ok()?)
    }

    /// Removes the entries from `from` on.
    fn truncate(&mut self, from: u64, removed: &mut Vec<Place>) {
        let keep = from
            .saturating_sub(self.first)
            .min(self.places.len() as u64) as usize;
        removed.extend(self.places.drain(keep..));
        self.durable_end = self.durable_end.min(from);
        self.generation = next_generation();
    }

    /// Removes the entries up to `upto` inclusive.
    fn purge(&mut self, upto: u64, removed: &mut Vec<Place>) {
        if upto < self.first {
            return;
        }
        let n = (upto - self.first)
            .saturating_add(1)
            .min(self.places.len() as u64) as usize;
        removed.extend(self.places.drain(..n));
        self.first = upto.saturating_add(1);
    }

    /// Whether an entry at `index` may be appended: past the purged id if
    /// the log is empty, else within it or right after it.
    fn accepts(&self, index: u64) -> bool {
        if self.places.is_empty() {
            index >= self.floor()
        } else {
            index >= self.first && index <= self.end()
        }
    }

    /// Appends an entry at `index` (one it [accepts](Self::accepts)),
    /// truncating there first if it is not past the last one.
    fn push(&mut self, index: u64, place: Place, removed: &mut Vec<Place>) {
        debug_assert!(self.accepts(index));
        if self.places.is_empty() {
            self.first = index;
        } else if index < self.end() {
            self.truncate(index, removed);
        }
        self.places.push_back(place);
    }
}

/// A segment file and how much of it is still needed.
struct Segment {
    file: Arc<File>,
    len: u64,
    live_entries: u64,
    live_bytes: u64,
}

struct Inner {
    dir: PathBuf,
    segment_bytes: u64,
    current: u64,
    segments: BTreeMap<u64, Segment>,
    shards: HashMap<u64, ShardLog>,
    /// Shards appended to since the last group commit began: the end of
    /// each one's log then, and its generation.
    unsynced: HashMap<u64, (u64, u64)>,
    /// Reused buffer for encoding records.
    scratch: Vec<u8>,
    /// Every fsync of a segment goes through it.
    fsyncs: Arc<SegmentSyncs>,
}

/// The fsyncs of the log's segments, one at a time. Linux reports a failed
/// writeback once per open file, to whichever fsync comes next, and may
/// drop the pages that failed: after that, an fsync of the same file
/// succeeds without those bytes on disk. Segments are fsynced by the group
/// commit and by rotation, collection and dropped shards; so that a failure
/// one of them takes cannot pass as success for the other, they run in
/// turn, and the first failure fails every fsync after it.
#[derive(Default)]
struct SegmentSyncs {
    turn: Mutex<()>,
    failed: std::sync::atomic::AtomicBool,
}

impl SegmentSyncs {
    fn sync(&self, file: &File) -> io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let _turn = self
            .turn
            .lock()
            .map_err(|_| io::Error::other("segment fsync lock poisoned"))?;
        if self.failed.load(SeqCst) {
            return Err(io::Error::other(
                "an earlier fsync of the raft log failed; nothing since is known to be on disk",
            ));
        }
        file.sync_data()
            .inspect_err(|_| self.failed.store(true, SeqCst))
    }
}

/// The node's Raft log for all its shards. Cheap to clone.
#[derive(Clone)]
pub struct RaftLog {
    inner: Arc<Mutex<Inner>>,
    durability: Durability,
    /// Woken after each group commit that made entries durable.
    synced: Arc<tokio::sync::Notify>,
}

impl RaftLog {
    /// Opens (or creates) the log in `dir`: replays its segments, cuts a
    /// torn tail, and starts a fresh segment.
    pub fn open(dir: &Path) -> io::Result<RaftLog> {
        RaftLog::open_with(dir, SEGMENT_BYTES)
    }

    /// As [`RaftLog::open`], with segments closed at `segment_bytes`.
    pub fn open_with(dir: &Path, segment_bytes: u64) -> io::Result<RaftLog> {
        crate::shard::snapshot::open_dir_synced(dir)?;
        let mut inner = replay(dir)?;
        // Counted from here on; `Inner`'s drop takes them off again.
        metrics::gauge!(crate::metrics::RAFT_LOG_SEGMENTS).increment(inner.segments.len() as f64);
        metrics::gauge!(crate::metrics::RAFT_LOG_BYTES).increment(inner.total_len() as f64);
        inner.segment_bytes = segment_bytes.max(HEADER_BYTES + 1);
        inner.start_segment()?;
        inner.collect_garbage()?;
        for log in inner.shards.values_mut() {
            // Replayed, and synced by the replay.
            log.durable_end = log.end();
        }
        let inner = Arc::new(Mutex::new(inner));
        let synced = Arc::new(tokio::sync::Notify::new());
        let for_sync = inner.clone();
        let wake = synced.clone();
        let fsyncs = inner.lock().expect("fresh lock").fsyncs.clone();
        // The segment and durable mark last written.
        let mut marked = (0u64, 0u64);
        let durability = Durability::start_with(
            "chatstore-raft-log-fsync",
            "raft_log",
            Box::new(move || {
                let lock = || {
                    for_sync
                        .lock()
                        .map_err(|_| io::Error::other("raft log lock poisoned"))
                };
                // The file to sync is taken after the callbacks were: a
                // write they wait for is in it, or in a segment that was
                // fsynced when the next one started.
                // `current` names the synced file to test builds only.
                let (file, appended, current, written) = {
                    let mut inner = lock()?;
                    let appended = std::mem::take(&mut inner.unsynced);
                    let segment = &inner.segments[&inner.current];
                    let (file, written) = (segment.file.clone(), segment.len);
                    (file, appended, inner.current, written)
                };
                fsyncs.sync(&file)?;
                #[cfg(test)]
                power_cut::synced_file(&segment_path(&lock()?.dir, current));
                // Every write below `written` was done when the file was
                // taken (writes happen under the lock), so this fsync made
                // it durable. (A mark written meanwhile by a sync under the
                // lock may be higher; going back to this one only weakens
                // the check.)
                if marked != (current, written) {
                    write_durable_mark(&file, written)?;
                    marked = (current, written);
                }
                if !appended.is_empty() {
                    let mut inner = lock()?;
                    for (shard, (end, generation)) in appended {
                        if let Some(log) = inner.shards.get_mut(&shard) {
                            if log.generation == generation {
                                log.durable_end = log.durable_end.max(end);
                            }
                        }
                    }
                    drop(inner);
                    wake.notify_waiters();
                }
                Ok(())
            }),
        );
        Ok(RaftLog {
            inner,
            durability,
            synced,
        })
    }

    /// Whether a failed write or fsync made the log refuse every later write.
    pub fn is_poisoned(&self) -> bool {
        self.durability.is_poisoned()
    }

    #[cfg(test)]
    pub(crate) fn poison(&self) {
        self.durability.poison();
    }

    fn lock(&self) -> io::Result<MutexGuard<'_, Inner>> {
        if self.durability.is_poisoned() {
            return Err(poisoned_error());
        }
        self.inner
            .lock()
            .map_err(|_| io::Error::other("raft log lock poisoned"))
    }

    /// Runs a change that writes to the files; a failure part-way poisons
    /// the log, since the files may now hold a partial record.
    fn write<T>(&self, change: impl FnOnce(&mut Inner) -> io::Result<T>) -> io::Result<T> {
        let mut inner = self.lock()?;
        let result = change(&mut inner).and_then(|t| {
            if inner.segments[&inner.current].len >= inner.segment_bytes {
                inner.rotate()?;
            }
            Ok(t)
        });
        if let Err(e) = &result {
            if !is_rejection(e) {
                tracing::error!(error = %e, "raft log write failed; refusing all further writes");
                self.durability.poison();
            }
        }
        result
    }

    /// Calls `done` once everything written before this call is on disk.
    pub fn after_sync(&self, done: impl FnOnce(io::Result<()>) + Send + 'static) {
        self.durability.after_sync(done)
    }

    /// Waits until everything written before this call is on disk.
    pub async fn sync(&self) -> io::Result<()> {
        self.durability.sync().await
    }

    /// Waits until `shard`'s entries up to `index` inclusive are on disk
    /// (or no longer in the log). The state machine applies an entry only
    /// then: openraft may apply an entry the replica has accepted but not yet
    /// synced, and sled must never keep the effect of an entry that a crash
    /// could take out of this log.
    pub async fn wait_durable(&self, shard: u64, index: u64) -> io::Result<()> {
        loop {
            let notified = self.synced.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let inner = self.lock()?;
                match inner.shards.get(&shard) {
                    Some(log) if log.durable_end <= index && index < log.end() => {}
                    _ => return Ok(()),
                }
            }
            // Bounded, so a log poisoned meanwhile (no more wake-ups) is
            // seen on the next look.
            let _ = tokio::time::timeout(DURABLE_RECHECK, notified).await;
        }
    }

    /// Appends entries to `shard`'s log, in index order. An entry at or
    /// below the last index replaces the log from there. Durable once a
    /// later [`RaftLog::after_sync`] completes.
    pub fn append(&self, shard: u64, entries: &[EntryBytes<'_>]) -> io::Result<()> {
        self.write(|inner| inner.append(ENTRIES, shard, entries))
    }

    /// Removes `shard`'s entries from `from` on.
    pub fn truncate(&self, shard: u64, from: u64) -> io::Result<()> {
        self.write(|inner| {
            let mut body = record_body(TRUNCATE, shard);
            body.extend_from_slice(&from.to_le_bytes());
            inner.write_records(&[body])?;
            let mut removed = Vec::new();
            if let Some(log) = inner.shards.get_mut(&shard) {
                log.truncate(from, &mut removed);
                let pending = (log.end(), log.generation);
                inner.unsynced.insert(shard, pending);
            }
            inner.forget(&removed);
            Ok(())
        })
    }

    /// Removes `shard`'s entries up to `upto` inclusive, and keeps `record`
    /// as its purged id. A purge not past the purged id changes nothing: the
    /// purged id never moves back.
    pub fn purge(&self, shard: u64, upto: u64, record: &[u8]) -> io::Result<()> {
        self.write(|inner| {
            let behind = inner
                .shards
                .get(&shard)
                .and_then(|l| l.purged.as_ref())
                .is_some_and(|(p, _)| upto <= *p);
            if behind {
                return Ok(());
            }
            let mut body = record_body(PURGE, shard);
            body.extend_from_slice(&upto.to_le_bytes());
            body.extend_from_slice(record);
            inner.write_records(&[body])?;
            let mut removed = Vec::new();
            let log = inner.shards.entry(shard).or_insert_with(ShardLog::new);
            log.purge(upto, &mut removed);
            log.purged = Some((upto, record.to_vec()));
            inner.forget(&removed);
            Ok(())
        })
    }

    pub fn save_vote(&self, shard: u64, vote: &[u8]) -> io::Result<()> {
        self.write(|inner| {
            let mut body = record_body(VOTE, shard);
            body.extend_from_slice(vote);
            inner.write_records(&[body])?;
            inner.shards.entry(shard).or_insert_with(ShardLog::new).vote = Some(vote.to_vec());
            Ok(())
        })
    }

    pub fn save_committed(&self, shard: u64, committed: &[u8]) -> io::Result<()> {
        self.write(|inner| {
            let mut body = record_body(COMMITTED, shard);
            body.extend_from_slice(committed);
            inner.write_records(&[body])?;
            inner
                .shards
                .entry(shard)
                .or_insert_with(ShardLog::new)
                .committed = Some(committed.to_vec());
            Ok(())
        })
    }

    /// Forgets `shard` entirely (its replica is gone). On disk when this
    /// returns, so that the caller may delete the replica's other data.
    pub fn drop_shard(&self, shard: u64) -> io::Result<()> {
        self.write(|inner| {
            if !inner.shards.contains_key(&shard) {
                return Ok(());
            }
            inner.write_records(&[record_body(DROP, shard)])?;
            inner.sync_current()?;
            inner.unsynced.remove(&shard);
            if let Some(log) = inner.shards.remove(&shard) {
                let removed: Vec<Place> = log.places.into_iter().collect();
                inner.forget(&removed);
            }
            Ok(())
        })
    }

    /// One of `shard`'s stored values, picked by `field`.
    fn stored(
        &self,
        shard: u64,
        field: impl FnOnce(&ShardLog) -> Option<&Vec<u8>>,
    ) -> io::Result<Option<Vec<u8>>> {
        Ok(self.lock()?.shards.get(&shard).and_then(field).cloned())
    }

    pub fn vote(&self, shard: u64) -> io::Result<Option<Vec<u8>>> {
        self.stored(shard, |l| l.vote.as_ref())
    }

    pub fn committed(&self, shard: u64) -> io::Result<Option<Vec<u8>>> {
        self.stored(shard, |l| l.committed.as_ref())
    }

    /// The caller's record of the last purged id.
    pub fn purged(&self, shard: u64) -> io::Result<Option<Vec<u8>>> {
        self.stored(shard, |l| l.purged.as_ref().map(|(_, r)| r))
    }

    /// The term and index of `shard`'s last entry.
    pub fn last(&self, shard: u64) -> io::Result<Option<(u64, u64)>> {
        Ok(self.lock()?.shards.get(&shard).and_then(|l| {
            let place = l.places.back()?;
            Some((place.term, l.end() - 1))
        }))
    }

    /// The last entry of `shard` whose bodies were sealed with an epoch key
    /// older than `epoch`.
    pub fn last_sealed_before(&self, shard: u64, epoch: u64) -> io::Result<Option<u64>> {
        Ok(self.lock()?.shards.get(&shard).and_then(|l| {
            let i = l
                .places
                .iter()
                .rposition(|p| p.sealed_epoch != 0 && p.sealed_epoch < epoch)?;
            Some(l.first + i as u64)
        }))
    }

    /// The encoded entries of `shard` with indexes in `from..to` that the
    /// log holds, in order.
    pub fn read(&self, shard: u64, from: u64, to: u64) -> io::Result<Vec<Vec<u8>>> {
        self.read_up_to(shard, from, to, usize::MAX)
    }

    /// The first of `shard`'s entries in `from..to` that come to at most
    /// `bytes_max` bytes, and at least one if there is one.
    pub fn read_up_to(
        &self,
        shard: u64,
        from: u64,
        to: u64,
        bytes_max: usize,
    ) -> io::Result<Vec<Vec<u8>>> {
        let wanted: Vec<(Arc<File>, Place)> = {
            let inner = self.lock()?;
            let Some(log) = inner.shards.get(&shard) else {
                return Ok(Vec::new());
            };
            let from = from.max(log.first);
            let to = to.min(log.end());
            let mut bytes = 0usize;
            (from..to)
                .filter_map(|i| log.place(i))
                .take_while(|p| {
                    let first = bytes == 0;
                    bytes = bytes.saturating_add(p.len as usize);
                    first || bytes <= bytes_max
                })
                .map(|p| (inner.segments[&p.segment].file.clone(), *p))
                .collect()
        };
        wanted
            .into_iter()
            .map(|(file, place)| {
                let mut buf = vec![0u8; place.len as usize];
                file.read_exact_at(&mut buf, place.offset)?;
                Ok(buf)
            })
            .collect()
    }

    /// Number of segment files.
    #[cfg(test)]
    fn segment_count(&self) -> usize {
        self.inner.lock().map(|i| i.segments.len()).unwrap_or(0)
    }
}

impl Drop for Inner {
    /// The process's gauges cover only the logs that are open.
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::RAFT_LOG_SEGMENTS).decrement(self.segments.len() as f64);
        metrics::gauge!(crate::metrics::RAFT_LOG_BYTES).decrement(self.total_len() as f64);
    }
}

impl Inner {
    fn total_len(&self) -> u64 {
        self.segments.values().map(|s| s.len).sum()
    }

    /// Encodes and writes `entries` of `shard` as records of `kind`
    /// (`ENTRIES` or `REWRITE`), then updates the index.
    fn append(&mut self, kind: u8, shard: u64, entries: &[EntryBytes<'_>]) -> io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        for pair in entries.windows(2) {
            if pair[1].index != pair[0].index + 1 {
                return Err(invalid(format!(
                    "entries {} and {} are not consecutive",
                    pair[0].index, pair[1].index
                )));
            }
        }
        if kind == ENTRIES {
            // Check before writing: a rejected append changes nothing.
            let first = entries[0].index;
            if !self.shards.get(&shard).is_none_or(|log| log.accepts(first)) {
                let (from, end) = self
                    .shards
                    .get(&shard)
                    .map_or((0, 0), |l| (l.first, l.end()));
                return Err(invalid(format!(
                    "entry {first} does not follow shard {shard}'s log ({from}..{end})"
                )));
            }
        }
        let segment = self.current;
        let base = self.segments[&segment].len;
        // Records of at most RECORD_BODY_TARGET (plus one entry) each.
        let mut places = Vec::with_capacity(entries.len());
        let mut bodies: Vec<Vec<u8>> = Vec::new();
        let mut offset = base;
        let mut chunk_start = 0;
        while chunk_start < entries.len() {
            let mut body = record_body(kind, shard);
            let count_at = body.len();
            body.extend_from_slice(&0u32.to_le_bytes());
            let mut n = 0u32;
            let mut i = chunk_start;
            while i < entries.len() && (n == 0 || body.len() < RECORD_BODY_TARGET) {
                let e = &entries[i];
                let len = u32::try_from(e.bytes.len())
                    .map_err(|_| invalid(format!("entry {} is too large", e.index)))?;
                body.extend_from_slice(&e.index.to_le_bytes());
                body.extend_from_slice(&e.term.to_le_bytes());
                body.extend_from_slice(&e.sealed_epoch.to_le_bytes());
                body.extend_from_slice(&len.to_le_bytes());
                places.push(Place {
                    term: e.term,
                    sealed_epoch: e.sealed_epoch,
                    segment,
                    offset: offset + (RECORD_HEADER_BYTES + body.len()) as u64,
                    len,
                });
                body.extend_from_slice(e.bytes);
                n += 1;
                i += 1;
            }
            body[count_at..count_at + 4].copy_from_slice(&n.to_le_bytes());
            offset += (RECORD_HEADER_BYTES + body.len()) as u64;
            bodies.push(body);
            chunk_start = i;
        }
        self.write_records(&bodies)?;
        let mut removed = Vec::new();
        let mut kept = Vec::with_capacity(places.len());
        let log = self.shards.entry(shard).or_insert_with(ShardLog::new);
        for (e, place) in entries.iter().zip(places) {
            if kind == REWRITE {
                if log.rewrite(e.index, place, &mut removed) {
                    kept.push(place);
                }
            } else {
                log.push(e.index, place, &mut removed);
                kept.push(place);
            }
        }
        if kind == ENTRIES {
            self.unsynced.insert(shard, (log.end(), log.generation));
        }
        let seg = self.segments.get_mut(&segment).expect("current segment");
        for p in &kept {
            seg.live_entries += 1;
            seg.live_bytes += u64::from(p.len);
        }
        self.forget(&removed);
        Ok(())
    }

    /// Writes records with the given bodies at the end of the current
    /// segment, in one `pwrite`.
    fn write_records(&mut self, bodies: &[Vec<u8>]) -> io::Result<()> {
        self.scratch.clear();
        for body in bodies {
            let len = u32::try_from(body.len()).map_err(|_| invalid("record too large".into()))?;
            self.scratch.extend_from_slice(&len.to_le_bytes());
            self.scratch
                .extend_from_slice(&record_checksum(Some(self.current), len, body).to_le_bytes());
            self.scratch.extend_from_slice(body);
        }
        let seg = self
            .segments
            .get_mut(&self.current)
            .expect("current segment");
        seg.file.write_all_at(&self.scratch, seg.len)?;
        seg.len += self.scratch.len() as u64;
        metrics::gauge!(crate::metrics::RAFT_LOG_BYTES).increment(self.scratch.len() as f64);
        Ok(())
    }

    /// Takes removed entries off their segments' live counts.
    fn forget(&mut self, removed: &[Place]) {
        for p in removed {
            if let Some(seg) = self.segments.get_mut(&p.segment) {
                seg.live_entries -= 1;
                seg.live_bytes -= u64::from(p.len);
            }
        }
    }

    /// Fsyncs the current segment's data ([`SegmentSyncs`]).
    fn sync_current(&self) -> io::Result<()> {
        let segment = &self.segments[&self.current];
        self.fsyncs.sync(&segment.file)?;
        #[cfg(test)]
        power_cut::synced_file(&segment_path(&self.dir, self.current));
        // Writes happen under the lock this runs under: all of `len` is in.
        write_durable_mark(&segment.file, segment.len)
    }

    /// Closes the current segment (fsynced whole) and starts the next.
    fn rotate(&mut self) -> io::Result<()> {
        self.sync_current()?;
        self.start_segment()?;
        self.collect_garbage()
    }

    /// Creates the next segment and writes its checkpoint.
    fn start_segment(&mut self) -> io::Result<()> {
        let id = self.segments.keys().next_back().map_or(1, |last| last + 1);
        let path = segment_path(&self.dir, id);
        let mut header = Vec::with_capacity(HEADER_BYTES as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all_at(&header, 0)?;
        File::open(&self.dir)?.sync_all()?;
        #[cfg(test)]
        power_cut::synced_dir(&self.dir);
        self.segments.insert(
            id,
            Segment {
                file: Arc::new(file),
                len: HEADER_BYTES,
                live_entries: 0,
                live_bytes: 0,
            },
        );
        metrics::gauge!(crate::metrics::RAFT_LOG_SEGMENTS).increment(1.0);
        metrics::gauge!(crate::metrics::RAFT_LOG_BYTES).increment(HEADER_BYTES as f64);
        self.current = id;
        let mut bodies = Vec::with_capacity(self.shards.len() + 1);
        let mut ids: Vec<u64> = self.shards.keys().copied().collect();
        ids.sort_unstable();
        for shard in ids {
            let log = &self.shards[&shard];
            let mut body = record_body(CHECKPOINT_SHARD, shard);
            body.extend_from_slice(&log.first.to_le_bytes());
            body.extend_from_slice(&log.end().to_le_bytes());
            put_optional(&mut body, log.vote.as_deref());
            put_optional(&mut body, log.committed.as_deref());
            match &log.purged {
                Some((index, record)) => {
                    body.push(1);
                    body.extend_from_slice(&index.to_le_bytes());
                    body.extend_from_slice(record);
                }
                None => body.push(0),
            }
            bodies.push(body);
        }
        bodies.push(record_body(CHECKPOINT_END, 0));
        self.write_records(&bodies)
    }

    /// Copies the live entries of mostly dead old segments forward, then
    /// deletes every old segment with no live entry.
    fn collect_garbage(&mut self) -> io::Result<()> {
        let mut budget = self.segment_bytes / 2;
        let sparse: Vec<u64> = self
            .segments
            .iter()
            .filter(|(id, s)| {
                **id != self.current && s.live_entries > 0 && s.live_bytes * 4 <= s.len
            })
            .map(|(id, _)| *id)
            .collect();
        for id in sparse {
            let live = self.segments[&id].live_bytes;
            if live > budget {
                break;
            }
            budget -= live;
            self.copy_forward(id)?;
            metrics::counter!(crate::metrics::RAFT_LOG_COPIED_BYTES).increment(live);
        }
        let dead: Vec<u64> = self
            .segments
            .iter()
            .filter(|(id, s)| **id != self.current && s.live_entries == 0)
            .map(|(id, _)| *id)
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        // The checkpoint (and the copies) that replace them are on disk
        // before they go.
        self.sync_current()?;
        for id in dead {
            if let Some(seg) = self.segments.remove(&id) {
                metrics::gauge!(crate::metrics::RAFT_LOG_SEGMENTS).decrement(1.0);
                metrics::gauge!(crate::metrics::RAFT_LOG_BYTES).decrement(seg.len as f64);
            }
            std::fs::remove_file(segment_path(&self.dir, id))?;
        }
        File::open(&self.dir)?.sync_all()?;
        #[cfg(test)]
        power_cut::synced_dir(&self.dir);
        Ok(())
    }

    /// Rewrites the live entries held in segment `id` into the current one.
    fn copy_forward(&mut self, id: u64) -> io::Result<()> {
        let file = self.segments[&id].file.clone();
        let mut runs: Vec<(u64, Vec<(u64, Place)>)> = Vec::new();
        for (shard, log) in &self.shards {
            let held: Vec<(u64, Place)> = log
                .places
                .iter()
                .enumerate()
                .filter(|(_, p)| p.segment == id)
                .map(|(i, p)| (log.first + i as u64, *p))
                .collect();
            if !held.is_empty() {
                runs.push((*shard, held));
            }
        }
        for (shard, held) in runs {
            // Consecutive runs, each one rewrite.
            let mut start = 0;
            while start < held.len() {
                let mut end = start + 1;
                while end < held.len() && held[end].0 == held[end - 1].0 + 1 {
                    end += 1;
                }
                let mut bufs = Vec::with_capacity(end - start);
                for (_, p) in &held[start..end] {
                    let mut buf = vec![0u8; p.len as usize];
                    file.read_exact_at(&mut buf, p.offset)?;
                    bufs.push(buf);
                }
                let entries: Vec<EntryBytes<'_>> = held[start..end]
                    .iter()
                    .zip(&bufs)
                    .map(|((index, p), bytes)| EntryBytes {
                        index: *index,
                        term: p.term,
                        sealed_epoch: p.sealed_epoch,
                        bytes,
                    })
                    .collect();
                self.append(REWRITE, shard, &entries)?;
                start = end;
            }
        }
        Ok(())
    }
}

impl ShardLog {
    /// Points a live entry at a new copy of it (a `REWRITE`), and says
    /// whether the copy was kept (it always is for a live entry).
    fn rewrite(&mut self, index: u64, place: Place, removed: &mut Vec<Place>) -> bool {
        if let Some(i) = index
            .checked_sub(self.first)
            .filter(|i| *i < self.places.len() as u64)
        {
            removed.push(std::mem::replace(&mut self.places[i as usize], place));
            true
        } else {
            false
        }
    }
}

/// The start of a record body: its kind and shard.
fn record_body(kind: u8, shard: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(64);
    body.push(kind);
    body.extend_from_slice(&shard.to_le_bytes());
    body
}

fn put_optional(body: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(v) => {
            body.extend_from_slice(&(v.len() as u32).to_le_bytes());
            body.extend_from_slice(v);
        }
        None => body.extend_from_slice(&u32::MAX.to_le_bytes()),
    }
}

/// The checksum of a record: over its segment's id (format 2), length and
/// body, so that zeros (a block that never reached the disk) do not read as
/// an empty record, nor a record as one of another segment.
fn record_checksum(segment: Option<u64>, len: u32, body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    if let Some(id) = segment {
        h.update(&id.to_le_bytes());
    }
    h.update(&len.to_le_bytes());
    h.update(body);
    h.finalize()
}

/// A request the log refused before writing anything.
#[derive(Debug)]
struct Rejected(String);

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejected {}

fn invalid(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, Rejected(detail))
}

fn is_rejection(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Rejected>())
}

fn corrupt(path: &Path, offset: u64, detail: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("raft log {} at byte {offset}: {detail}", path.display()),
    )
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{FILE_SUFFIX}"))
}

/// Reads a record body field by field.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    }
    fn optional(&mut self) -> Option<Option<Vec<u8>>> {
        match self.u32()? {
            u32::MAX => Some(None),
            n => Some(Some(self.take(n as usize)?.to_vec())),
        }
    }
}

/// A power cut, simulated in tests: what a watched folder would hold if the
/// machine lost power now and the disk kept only what was synced (each file
/// as of its own last `fsync`, the folder's entries as of the folder's).
/// Test builds of the log report every sync here.
#[cfg(test)]
pub(crate) mod power_cut {
    use std::collections::{BTreeMap, BTreeSet};
    use std::ffi::OsString;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Durable {
        /// Each file's bytes as of its last sync.
        files: BTreeMap<OsString, Vec<u8>>,
        /// The folder's entries as of its last sync.
        names: BTreeSet<OsString>,
    }

    static WATCHED: Mutex<BTreeMap<PathBuf, Durable>> = Mutex::new(BTreeMap::new());

    /// Starts recording what is durable in `dir` (empty: nothing synced).
    pub fn watch(dir: &Path) {
        WATCHED
            .lock()
            .unwrap()
            .insert(dir.to_path_buf(), Durable::default());
    }

    pub fn forget(dir: &Path) {
        WATCHED.lock().unwrap().remove(dir);
    }

    pub fn synced_file(path: &Path) {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        if let Some(durable) = WATCHED.lock().unwrap().get_mut(dir) {
            let bytes = std::fs::read(path).expect("read a file just synced");
            durable.files.insert(name.to_owned(), bytes);
        }
    }

    pub fn synced_dir(dir: &Path) {
        if let Some(durable) = WATCHED.lock().unwrap().get_mut(dir) {
            durable.names = std::fs::read_dir(dir)
                .expect("list a folder just synced")
                .map(|e| e.expect("a folder entry").file_name())
                .collect();
        }
    }

    /// Writes into the empty folder `to` what `dir` holds after a power
    /// cut now, and stops watching `dir`: the entries of its last sync,
    /// each with the bytes of its own last sync (none if it had none).
    pub fn cut(dir: &Path, to: &Path) {
        let durable = WATCHED
            .lock()
            .unwrap()
            .remove(dir)
            .expect("a watched folder");
        for name in &durable.names {
            let bytes = durable.files.get(name).map_or(&[][..], Vec::as_slice);
            std::fs::write(to.join(name), bytes).expect("write the folder after the cut");
        }
    }
}

/// The state a replay builds: entries may have holes until a checkpoint
/// and the copies after it fill them.
#[derive(Default)]
struct ReplayShard {
    entries: BTreeMap<u64, Place>,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    purged: Option<(u64, Vec<u8>)>,
}

/// Records in `file`'s header that an fsync made its first `len` bytes
/// durable (past 4 GiB the mark stays where it was: a weaker check).
fn write_durable_mark(file: &File, len: u64) -> io::Result<()> {
    match u32::try_from(len) {
        Ok(mark) => file.write_all_at(&mark.to_le_bytes(), DURABLE_MARK_AT),
        Err(_) => Ok(()),
    }
}

/// A segment's bytes as the disk holds them. What a killed process wrote
/// may be only in the page cache: it is synced first. Then the cached pages
/// are dropped before the read, since after an fsync that failed (the
/// process that saw it stopped) Linux keeps the unwritten pages in the
/// cache as if clean; read from there, they would be taken as durable (a
/// vote, or entries a leader is told this replica has) and a power cut
/// later could lose them.
fn read_from_disk(file: &File) -> io::Result<Vec<u8>> {
    file.sync_all()?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor `file` owns.
        let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &*file, &mut bytes)?;
    Ok(bytes)
}

/// Replays every segment in `dir` into an index (no current segment yet).
fn replay(dir: &Path) -> io::Result<Inner> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(SPARE_SUFFIX) {
            std::fs::remove_file(dir.join(name.as_ref()))?;
            continue;
        }
        if let Some(id) = name
            .strip_suffix(FILE_SUFFIX)
            .and_then(|s| s.parse::<u64>().ok())
            .filter(|id| segment_path(dir, *id).file_name() == Some(name.as_ref().as_ref()))
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    // The folder was synced when each of its segments was made or deleted.
    #[cfg(test)]
    power_cut::synced_dir(dir);
    let mut shards: HashMap<u64, ReplayShard> = HashMap::new();
    let mut segments = BTreeMap::new();
    for (n, &id) in ids.iter().enumerate() {
        let last = n + 1 == ids.len();
        let path = segment_path(dir, id);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let bytes = read_from_disk(&file)?;
        let valid = replay_segment(&path, id, &bytes, last, &mut shards)?;
        if valid < bytes.len() as u64 {
            // A torn write.
            tracing::info!(file = %path.display(), kept = valid, dropped = bytes.len() as u64 - valid,
                "cutting the last raft log segment after its last valid record");
            file.set_len(valid)?;
            file.sync_all()?;
        }
        #[cfg(test)]
        power_cut::synced_file(&path);
        segments.insert(
            id,
            Segment {
                file: Arc::new(file),
                len: valid,
                live_entries: 0,
                live_bytes: 0,
            },
        );
    }
    let mut out = HashMap::new();
    for (shard, r) in shards {
        let mut log = ShardLog {
            first: r.entries.keys().next().copied().unwrap_or(0),
            places: VecDeque::with_capacity(r.entries.len()),
            vote: r.vote,
            committed: r.committed,
            purged: r.purged,
            durable_end: 0,
            generation: next_generation(),
        };
        for (index, place) in r.entries {
            if index != log.end() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "raft log of shard {shard} has a hole before entry {index} (after {})",
                        log.end()
                    ),
                ));
            }
            let seg = segments.get_mut(&place.segment).expect("replayed segment");
            seg.live_entries += 1;
            seg.live_bytes += u64::from(place.len);
            log.places.push_back(place);
        }
        out.insert(shard, log);
    }
    Ok(Inner {
        dir: dir.to_path_buf(),
        segment_bytes: SEGMENT_BYTES,
        current: 0,
        segments,
        shards: out,
        unsynced: HashMap::new(),
        scratch: Vec::new(),
        fsyncs: Default::default(),
    })
}

/// Applies one segment's records; returns the length of its valid prefix.
/// A bad record in a segment that is not the last is an error.
fn replay_segment(
    path: &Path,
    id: u64,
    bytes: &[u8],
    last: bool,
    shards: &mut HashMap<u64, ReplayShard>,
) -> io::Result<u64> {
    // How far a completed group commit reached (see the module's notes).
    let durable = match bytes.get(DURABLE_MARK_AT as usize..HEADER_BYTES as usize) {
        Some(mark) => u32::from_le_bytes(mark.try_into().unwrap()) as u64,
        None => 0,
    };
    let torn = |offset: u64, detail: &str| -> io::Result<u64> {
        if last && offset >= durable {
            Ok(offset)
        } else if last {
            Err(corrupt(
                path,
                offset,
                &format!("{detail}, below the {durable} bytes an fsync had made durable"),
            ))
        } else {
            Err(corrupt(path, offset, detail))
        }
    };
    if bytes.is_empty() {
        // Cut to nothing by an earlier open, and not yet deleted.
        return Ok(0);
    }
    let header_lost = bytes.len() < HEADER_BYTES as usize
        || bytes[..HEADER_BYTES as usize].iter().all(|b| *b == 0);
    if header_lost && last {
        // Created, but its header never reached the disk; unless a whole
        // record follows it (the header is rewritten with each durable
        // mark): then it was lost after, and cutting would drop the log.
        if first_record_is_whole(id, bytes) {
            return Err(corrupt(path, 0, "header lost, but records follow it"));
        }
        return Ok(0);
    }
    if header_lost || &bytes[..8] != MAGIC {
        return Err(corrupt(path, 0, "not a raft log segment"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    let seed = match version {
        FORMAT_VERSION => Some(id),
        FORMAT_VERSION_UNSEEDED => None,
        _ => {
            return Err(corrupt(
                path,
                8,
                &format!("format version {version} is not supported"),
            ))
        }
    };
    let mut pos = HEADER_BYTES as usize;
    let mut checkpointed: HashSet<u64> = HashSet::new();
    while pos < bytes.len() {
        let offset = pos as u64;
        let body = match whole_record(bytes, pos, seed) {
            Ok(body) => body,
            Err(why) => return torn(offset, why),
        };
        let (start, len) = (pos + RECORD_HEADER_BYTES, body.len());
        // A record whose checksum matches was written whole: one that
        // does not parse is not a torn write but a fault, in any segment.
        match apply_record(id, start as u64, body, shards, &mut checkpointed) {
            Some(applied) => applied.map_err(|e| corrupt(path, offset, &e.to_string()))?,
            None => return Err(corrupt(path, offset, "malformed record")),
        }
        pos = start + len;
    }
    Ok(pos as u64)
}

/// The body of the record at `pos` of a segment's `bytes`, if it is there
/// whole and its checksum (seeded with `seed`) matches; else what is wrong.
fn whole_record(bytes: &[u8], pos: usize, seed: Option<u64>) -> Result<&[u8], &'static str> {
    let head = bytes
        .get(pos..pos + RECORD_HEADER_BYTES)
        .ok_or("record header cut short")?;
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().unwrap());
    let start = pos + RECORD_HEADER_BYTES;
    if len > RECORD_BODY_MAX || start + len > bytes.len() {
        return Err("record cut short");
    }
    let body = &bytes[start..start + len];
    if len == 0 || record_checksum(seed, len as u32, body) != crc {
        return Err("record checksum does not match");
    }
    Ok(body)
}

/// Whether `bytes` (a segment) holds a record right after its header whose
/// checksum matches under the current format.
fn first_record_is_whole(id: u64, bytes: &[u8]) -> bool {
    whole_record(bytes, HEADER_BYTES as usize, Some(id)).is_ok()
}

/// Applies one record to the replay state; `None` if it is malformed.
fn apply_record(
    segment: u64,
    body_offset: u64,
    body: &[u8],
    shards: &mut HashMap<u64, ReplayShard>,
    checkpointed: &mut HashSet<u64>,
) -> Option<io::Result<()>> {
    let mut f = Fields { rest: body };
    let kind = f.u8()?;
    let shard = f.u64()?;
    match kind {
        ENTRIES | REWRITE => {
            // Read whole before anything changes: a record that does not
            // parse leaves the replay state as it was.
            let n = f.u32()?;
            let mut places = Vec::with_capacity((n as usize).min(f.rest.len() / 28));
            for _ in 0..n {
                let index = f.u64()?;
                let term = f.u64()?;
                let sealed_epoch = f.u64()?;
                let len = f.u32()?;
                let offset = body_offset + (body.len() - f.rest.len()) as u64;
                f.take(len as usize)?;
                let place = Place {
                    term,
                    sealed_epoch,
                    segment,
                    offset,
                    len,
                };
                places.push((index, place));
            }
            let log = shards.entry(shard).or_default();
            if let (ENTRIES, Some((first, _))) = (kind, places.first()) {
                log.entries.split_off(first);
            }
            log.entries.extend(places);
        }
        VOTE => shards.entry(shard).or_default().vote = Some(f.rest.to_vec()),
        COMMITTED => shards.entry(shard).or_default().committed = Some(f.rest.to_vec()),
        TRUNCATE => {
            let from = f.u64()?;
            shards.entry(shard).or_default().entries.split_off(&from);
        }
        PURGE => {
            let upto = f.u64()?;
            let log = shards.entry(shard).or_default();
            log.entries = log.entries.split_off(&(upto.saturating_add(1)));
            log.purged = Some((upto, f.rest.to_vec()));
        }
        DROP => {
            shards.remove(&shard);
        }
        CHECKPOINT_SHARD => {
            let first = f.u64()?;
            let end = f.u64()?;
            let vote = f.optional()?;
            let committed = f.optional()?;
            let purged = match f.u8()? {
                0 => None,
                _ => Some((f.u64()?, f.rest.to_vec())),
            };
            let log = shards.entry(shard).or_default();
            log.entries.split_off(&end);
            log.entries = log.entries.split_off(&first);
            if let Some((upto, _)) = &purged {
                log.entries = log.entries.split_off(&(upto.saturating_add(1)));
            }
            log.vote = vote;
            log.committed = committed;
            log.purged = purged;
            checkpointed.insert(shard);
        }
        CHECKPOINT_END => {
            shards.retain(|id, _| checkpointed.contains(id));
        }
        other => {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown raft log record kind {other}"),
            )))
        }
    }
    Some(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux reports a failed writeback to one fsync of the file only, so
    /// after one fails, no later fsync of the log may pass as success
    /// (fsync of /dev/null fails with EINVAL, standing in for EIO).
    #[test]
    fn after_a_failed_fsync_every_fsync_fails() {
        let dir = tempfile::tempdir().unwrap();
        let segment = File::create(dir.path().join("segment")).unwrap();
        let syncs = SegmentSyncs::default();
        syncs.sync(&segment).unwrap();
        let failing = OpenOptions::new().write(true).open("/dev/null").unwrap();
        assert!(syncs.sync(&failing).is_err());
        assert!(syncs.sync(&segment).is_err());
    }
    use proptest::prelude::*;

    fn entry_bytes(index: u64, term: u64, len: usize) -> Vec<u8> {
        let mut b = format!("{index}/{term}/").into_bytes();
        b.resize(b.len() + len, (index % 251) as u8);
        b
    }

    fn append(log: &RaftLog, shard: u64, from: u64, to: u64, term: u64, len: usize) {
        let bufs: Vec<Vec<u8>> = (from..to).map(|i| entry_bytes(i, term, len)).collect();
        let entries: Vec<EntryBytes<'_>> = (from..to)
            .zip(&bufs)
            .map(|(index, bytes)| EntryBytes {
                index,
                term,
                sealed_epoch: 0,
                bytes,
            })
            .collect();
        log.append(shard, &entries).unwrap();
    }

    /// The id in a segment file's name.
    fn segment_id(path: &Path) -> u64 {
        path.file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(FILE_SUFFIX)
            .parse()
            .unwrap()
    }

    fn last_segment(dir: &Path) -> PathBuf {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files.pop().unwrap()
    }

    /// A read bounded by bytes returns the first entries that fit, and
    /// always the first one, however large.
    #[test]
    fn reads_stop_at_their_byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        append(&log, 1, 0, 10, 1, 1000);
        let len = entry_bytes(0, 1, 1000).len();
        let indexes = |got: Vec<Vec<u8>>| -> Vec<u64> {
            got.iter()
                .map(|b| {
                    let text = String::from_utf8_lossy(&b[..4]).into_owned();
                    text.split('/').next().unwrap().parse().unwrap()
                })
                .collect()
        };
        assert_eq!(
            indexes(log.read_up_to(1, 2, 10, 3 * len).unwrap()),
            vec![2, 3, 4]
        );
        assert_eq!(
            indexes(log.read_up_to(1, 2, 10, 3 * len - 1).unwrap()),
            vec![2, 3]
        );
        assert_eq!(indexes(log.read_up_to(1, 2, 10, 1).unwrap()), vec![2]);
        assert_eq!(log.read_up_to(1, 2, 10, usize::MAX).unwrap().len(), 8);
        assert!(log.read_up_to(1, 10, 20, 1).unwrap().is_empty());
    }

    #[test]
    fn entries_and_metadata_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RaftLog::open(dir.path()).unwrap();
            append(&log, 1, 0, 10, 1, 100);
            append(&log, 2, 0, 3, 1, 10);
            append(&log, 1, 7, 9, 2, 50); // replaces 7..10
            log.save_vote(1, b"vote-1").unwrap();
            log.save_committed(2, b"c-2").unwrap();
            log.purge(1, 2, b"p-2").unwrap();
            log.truncate(2, 2).unwrap();
        }
        let log = RaftLog::open(dir.path()).unwrap();
        let got = log.read(1, 0, 100).unwrap();
        let want: Vec<Vec<u8>> = (3..7)
            .map(|i| entry_bytes(i, 1, 100))
            .chain((7..9).map(|i| entry_bytes(i, 2, 50)))
            .collect();
        assert_eq!(got, want);
        assert_eq!(log.last(1).unwrap(), Some((2, 8)));
        assert_eq!(log.read(2, 0, 100).unwrap().len(), 2);
        assert_eq!(log.vote(1).unwrap().as_deref(), Some(&b"vote-1"[..]));
        assert_eq!(log.committed(2).unwrap().as_deref(), Some(&b"c-2"[..]));
        assert_eq!(log.purged(1).unwrap().as_deref(), Some(&b"p-2"[..]));
        assert_eq!(log.vote(3).unwrap(), None);
    }

    #[test]
    fn bad_appends_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        append(&log, 1, 5, 8, 1, 10);
        let gap = entry_bytes(10, 1, 10);
        let err = log
            .append(
                1,
                &[EntryBytes {
                    index: 10,
                    term: 1,
                    sealed_epoch: 0,
                    bytes: &gap,
                }],
            )
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        log.purge(1, 6, b"p").unwrap();
        let below = entry_bytes(4, 1, 10);
        assert!(log
            .append(
                1,
                &[EntryBytes {
                    index: 4,
                    term: 1,
                    sealed_epoch: 0,
                    bytes: &below,
                }],
            )
            .is_err());
        // Still writable, and unchanged; a purge behind the last one too.
        log.purge(1, 5, b"older").unwrap();
        assert_eq!(log.purged(1).unwrap().as_deref(), Some(&b"p"[..]));
        assert_eq!(log.last(1).unwrap(), Some((1, 7)));
        append(&log, 1, 8, 9, 1, 10);
        drop(log);
        let log = RaftLog::open(dir.path()).unwrap();
        assert_eq!(log.read(1, 0, 100).unwrap().len(), 2);
    }

    /// A crash can tear the last record of the last segment: opening cuts
    /// it off and keeps every record before it.
    #[test]
    fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RaftLog::open(dir.path()).unwrap();
            append(&log, 1, 0, 5, 1, 100);
            append(&log, 1, 5, 6, 1, 100);
        }
        let path = last_segment(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        // As if no group commit had covered the last append (a crash tears
        // only what no fsync reached).
        set_durable_mark(&path, 0);
        for cut in [1u64, 50, 100] {
            let copy = tempfile::tempdir().unwrap();
            std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
            let f = OpenOptions::new()
                .write(true)
                .open(copy.path().join(path.file_name().unwrap()))
                .unwrap();
            f.set_len(len - cut).unwrap();
            let log = RaftLog::open(copy.path()).unwrap();
            assert_eq!(log.last(1).unwrap(), Some((1, 4)), "cut {cut}");
            append(&log, 1, 5, 7, 2, 10);
            drop(log);
            let log = RaftLog::open(copy.path()).unwrap();
            assert_eq!(log.last(1).unwrap(), Some((2, 6)), "cut {cut}");
        }
        // Garbage or zeros after the last record (a write that never
        // completed, or blocks allocated but never written).
        for tail in [vec![0xABu8; 37], vec![0u8; 4096]] {
            let copy = tempfile::tempdir().unwrap();
            let to = copy.path().join(path.file_name().unwrap());
            std::fs::copy(&path, &to).unwrap();
            let f = OpenOptions::new().write(true).open(&to).unwrap();
            f.write_all_at(&tail, len).unwrap();
            let log = RaftLog::open(copy.path()).unwrap();
            assert_eq!(log.last(1).unwrap(), Some((1, 5)));
        }
    }

    fn set_durable_mark(path: &Path, mark: u32) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&mark.to_le_bytes(), DURABLE_MARK_AT)
            .unwrap();
    }

    /// Each group commit marks how far it reached in the segment's header;
    /// a bad record below that mark is damage to fsynced data, not a torn
    /// write: opening refuses instead of cutting acknowledged entries off.
    #[test]
    fn damage_below_the_durable_mark_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let log = RaftLog::open(dir.path()).unwrap();
            append(&log, 1, 0, 5, 1, 100);
            // `sync` returns once a group commit that covered the appends
            // has written its mark.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(log.sync()).unwrap();
            append(&log, 1, 5, 6, 1, 100);
            rt.block_on(log.sync()).unwrap();
            last_segment(dir.path())
        };
        let len = std::fs::metadata(&path).unwrap().len();
        let bytes = std::fs::read(&path).unwrap();
        let mark = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as u64;
        assert!(
            mark > HEADER_BYTES && mark <= len,
            "mark {mark}, length {len}"
        );
        let damaged = |mark: u32| {
            let copy = tempfile::tempdir().unwrap();
            let to = copy.path().join(path.file_name().unwrap());
            std::fs::copy(&path, &to).unwrap();
            set_durable_mark(&to, mark);
            let f = OpenOptions::new().write(true).open(&to).unwrap();
            f.write_all_at(&[0xFF; 4], len - 60).unwrap();
            let opened = RaftLog::open(copy.path());
            (copy, opened)
        };
        // A header zeroed after its records were written (the mark
        // rewrites it): refused, not taken for a segment never written.
        {
            let copy = tempfile::tempdir().unwrap();
            let to = copy.path().join(path.file_name().unwrap());
            std::fs::copy(&path, &to).unwrap();
            let f = OpenOptions::new().write(true).open(&to).unwrap();
            f.write_all_at(&[0u8; HEADER_BYTES as usize], 0).unwrap();
            let err = RaftLog::open(copy.path()).err().expect("open must fail");
            assert!(err.to_string().contains("header lost"), "{err}");
            assert_eq!(
                std::fs::metadata(&to).unwrap().len(),
                len,
                "nothing was cut"
            );
        }
        // Damage inside what an fsync covered: refused, nothing cut.
        let (_copy, opened) = damaged(len as u32);
        let err = opened.err().expect("open must fail");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("fsync had made durable"), "{err}");
        // The same bytes past the mark: a torn tail, cut off.
        let (_copy, opened) = damaged((len - 200) as u32);
        assert_eq!(opened.unwrap().last(1).unwrap(), Some((1, 4)));
    }

    /// A crash right after a new segment was created leaves it empty, or
    /// with a zeroed header; a later open may find it before another one.
    #[test]
    fn empty_and_headerless_segments_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RaftLog::open(dir.path()).unwrap();
            append(&log, 1, 0, 3, 1, 100);
        }
        drop(RaftLog::open(dir.path()).unwrap());
        // An empty segment that is not the last (a crash after an open cut
        // it to nothing and created the next one), then a last one whose
        // header never reached the disk.
        let last = segment_id(&last_segment(dir.path()));
        std::fs::write(segment_path(dir.path(), last + 1), b"").unwrap();
        std::fs::write(segment_path(dir.path(), last + 2), [0u8; 16]).unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        assert_eq!(log.last(1).unwrap(), Some((1, 2)));
        assert!(!segment_path(dir.path(), last + 1).exists());
        assert!(!segment_path(dir.path(), last + 2).exists());
    }

    #[test]
    fn a_bad_record_in_a_closed_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RaftLog::open_with(dir.path(), 4096).unwrap();
            for i in 0..10 {
                append(&log, 1, i, i + 1, 1, 1000);
            }
            assert!(log.segment_count() > 2);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let first = &files[0];
        let f = OpenOptions::new().write(true).open(first).unwrap();
        f.write_all_at(&[0xFF; 4], HEADER_BYTES + 200).unwrap();
        let err = RaftLog::open(dir.path()).err().expect("open must fail");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    /// A record whose checksum matches but whose fields do not parse is a
    /// fault, not a torn write: opening fails rather than cutting it off
    /// with every record after it, and changes nothing on disk.
    #[test]
    fn a_whole_record_that_does_not_parse_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RaftLog::open(dir.path()).unwrap();
            append(&log, 1, 0, 3, 1, 100);
        }
        let path = last_segment(dir.path());
        let id = segment_id(&path);
        // Entries of shard 1: five announced, one there.
        let mut body = vec![ENTRIES];
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&5u32.to_le_bytes());
        for field in [3u64, 1, 0] {
            body.extend_from_slice(&field.to_le_bytes());
        }
        body.extend_from_slice(&0u32.to_le_bytes());
        let len = body.len() as u32;
        let mut record = len.to_le_bytes().to_vec();
        record.extend_from_slice(&record_checksum(Some(id), len, &body).to_le_bytes());
        record.extend_from_slice(&body);
        let end = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&record, end).unwrap();
        let err = RaftLog::open(dir.path()).err().expect("open must fail");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("malformed"), "{err}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            end + record.len() as u64,
            "nothing was cut"
        );
    }

    /// Segments whose entries were purged are deleted; a quiet shard's few
    /// entries are copied forward instead of keeping old segments alive.
    #[test]
    fn old_segments_are_deleted_and_quiet_entries_copied_forward() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open_with(dir.path(), 8192).unwrap();
        append(&log, 7, 0, 3, 1, 20); // the quiet shard
        log.save_vote(7, b"quiet-vote").unwrap();
        for round in 0..200u64 {
            append(&log, 1, round * 4, round * 4 + 4, 1, 500);
            if round >= 2 {
                log.purge(1, round * 4 - 5, b"p").unwrap();
            }
        }
        assert!(
            log.segment_count() <= 4,
            "{} segments left",
            log.segment_count()
        );
        // The first segment held the quiet shard's entries.
        assert!(!segment_path(dir.path(), 1).exists());
        drop(log);
        let log = RaftLog::open_with(dir.path(), 8192).unwrap();
        assert_eq!(
            log.read(7, 0, 10).unwrap(),
            (0..3).map(|i| entry_bytes(i, 1, 20)).collect::<Vec<_>>()
        );
        assert_eq!(log.vote(7).unwrap().as_deref(), Some(&b"quiet-vote"[..]));
        assert_eq!(log.last(1).unwrap(), Some((1, 799)));
        assert_eq!(log.read(1, 0, 1000).unwrap().len(), 8); // 792..=799
    }

    /// A segment written by format 1 (checksums without the segment id)
    /// still opens, and a `.spare` file another version left is deleted.
    #[test]
    fn a_format_1_segment_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = entry_bytes(0, 1, 20);
        let mut body = record_body(ENTRIES, 3);
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes()); // index
        body.extend_from_slice(&1u64.to_le_bytes()); // term
        body.extend_from_slice(&0u64.to_le_bytes()); // sealing epoch
        body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        body.extend_from_slice(&bytes);
        let mut file = Vec::new();
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&FORMAT_VERSION_UNSEEDED.to_le_bytes());
        file.extend_from_slice(&0u32.to_le_bytes());
        file.extend_from_slice(&(body.len() as u32).to_le_bytes());
        file.extend_from_slice(&record_checksum(None, body.len() as u32, &body).to_le_bytes());
        file.extend_from_slice(&body);
        std::fs::write(segment_path(dir.path(), 1), &file).unwrap();
        let spare = dir.path().join(format!("{:020}{SPARE_SUFFIX}", 9));
        std::fs::write(&spare, b"old").unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        assert_eq!(log.read(3, 0, 10).unwrap(), vec![bytes]);
        assert!(!spare.exists());
        // The same bytes under format 2 fail their checksum: cut as torn.
        drop(log);
        let dir2 = tempfile::tempdir().unwrap();
        file[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        std::fs::write(segment_path(dir2.path(), 1), &file).unwrap();
        let log = RaftLog::open(dir2.path()).unwrap();
        assert_eq!(log.last(3).unwrap(), None);
    }

    #[test]
    fn a_dropped_shard_stays_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = RaftLog::open_with(dir.path(), 4096).unwrap();
            append(&log, 5, 0, 4, 1, 100);
            log.save_vote(5, b"v").unwrap();
            append(&log, 6, 0, 1, 1, 10);
            log.drop_shard(5).unwrap();
            // Segments go by, so the drop record itself may be gone.
            for i in 1..60 {
                append(&log, 6, i, i + 1, 1, 500);
                log.purge(6, i - 1, b"p").unwrap();
            }
        }
        let log = RaftLog::open_with(dir.path(), 4096).unwrap();
        assert_eq!(log.read(5, 0, 100).unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(log.vote(5).unwrap(), None);
        assert_eq!(log.last(6).unwrap(), Some((1, 59)));
    }

    #[test]
    fn sealed_entries_are_found_by_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        let b = vec![1u8; 8];
        let entries: Vec<EntryBytes<'_>> = [(0u64, 0u64), (1, 3), (2, 5), (3, 0)]
            .iter()
            .map(|&(index, sealed_epoch)| EntryBytes {
                index,
                term: 1,
                sealed_epoch,
                bytes: &b,
            })
            .collect();
        log.append(1, &entries).unwrap();
        assert_eq!(log.last_sealed_before(1, 3).unwrap(), None);
        assert_eq!(log.last_sealed_before(1, 4).unwrap(), Some(1));
        assert_eq!(log.last_sealed_before(1, 6).unwrap(), Some(2));
    }

    #[tokio::test]
    async fn sync_completes_every_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        let mut waits = Vec::new();
        for i in 0..50u64 {
            append(&log, i % 3, i / 3, i / 3 + 1, 1, 10);
            let l = log.clone();
            waits.push(tokio::spawn(async move { l.sync().await }));
        }
        for w in waits {
            w.await.unwrap().unwrap();
        }
    }

    /// An entry counts as durable only after a group commit that began
    /// after it was written, and a truncation takes that back.
    #[tokio::test]
    async fn wait_durable_waits_for_the_group_commit() {
        let dir = tempfile::tempdir().unwrap();
        let log = RaftLog::open(dir.path()).unwrap();
        let durable_end = |log: &RaftLog| log.inner.lock().unwrap().shards[&1].durable_end;
        append(&log, 1, 0, 5, 1, 10);
        assert_eq!(durable_end(&log), 0);
        let waiter = {
            let log = log.clone();
            tokio::spawn(async move { log.wait_durable(1, 4).await })
        };
        log.sync().await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("waiter woke")
            .unwrap()
            .unwrap();
        assert_eq!(durable_end(&log), 5);
        log.truncate(1, 3).unwrap();
        assert_eq!(durable_end(&log), 3);
        append(&log, 1, 3, 6, 2, 10);
        assert_eq!(durable_end(&log), 3);
        // Not in the log (any more, or yet): nothing to wait for.
        log.wait_durable(1, 100).await.unwrap();
        log.wait_durable(9, 0).await.unwrap();
        log.sync().await.unwrap();
        assert_eq!(durable_end(&log), 6);
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Append `n` entries to `shard`, starting `back` entries before its end.
        Append {
            shard: u64,
            back: u64,
            n: u64,
            len: usize,
        },
        Truncate {
            shard: u64,
            back: u64,
        },
        Purge {
            shard: u64,
            ahead: u64,
        },
        Vote {
            shard: u64,
        },
        Drop {
            shard: u64,
        },
        Reopen,
        /// A group commit: all written so far is durable once it returns.
        Sync,
        /// The machine loses power: the log opens from what was synced.
        PowerCut,
    }

    fn op() -> impl Strategy<Value = Op> {
        let shard = 0u64..3;
        prop_oneof![
            6 => (shard.clone(), 0u64..3, 1u64..5, 0usize..700)
                .prop_map(|(shard, back, n, len)| Op::Append { shard, back, n, len }),
            1 => (shard.clone(), 0u64..4).prop_map(|(shard, back)| Op::Truncate { shard, back }),
            2 => (shard.clone(), 0u64..6).prop_map(|(shard, ahead)| Op::Purge { shard, ahead }),
            1 => shard.clone().prop_map(|shard| Op::Vote { shard }),
            1 => shard.prop_map(|shard| Op::Drop { shard }),
            1 => Just(Op::Reopen),
            2 => Just(Op::Sync),
            1 => Just(Op::PowerCut),
        ]
    }

    #[derive(Default, Clone, PartialEq, Debug)]
    struct Model {
        entries: BTreeMap<u64, (u64, Vec<u8>)>,
        vote: Option<Vec<u8>>,
        purged: Option<u64>,
    }

    impl Model {
        fn end(&self) -> u64 {
            match self.entries.keys().next_back() {
                Some(last) => last + 1,
                None => self.purged.map_or(0, |p| p + 1),
            }
        }
        fn floor(&self) -> u64 {
            let purged = self.purged.map_or(0, |p| p + 1);
            self.entries
                .keys()
                .next()
                .copied()
                .unwrap_or(purged)
                .max(purged)
        }
    }

    /// What the log holds of each shard the model tests use, in the model's
    /// terms (a shard the log does not know reads as an empty model).
    fn read_model(log: &RaftLog) -> BTreeMap<u64, Model> {
        (0..3u64)
            .map(|shard| {
                let entries = log.read(shard, 0, u64::MAX).unwrap();
                let last = log.last(shard).unwrap();
                let end = last.map_or(0, |(_, index)| index + 1);
                let first = end - entries.len() as u64;
                let entries = (first..end)
                    .zip(entries)
                    .map(|(index, bytes)| {
                        let text = String::from_utf8_lossy(&bytes).into_owned();
                        let term = text.split('/').nth(1).unwrap().parse().unwrap();
                        (index, (term, bytes))
                    })
                    .collect();
                let purged = log
                    .purged(shard)
                    .unwrap()
                    .map(|p| u64::from_le_bytes(p.try_into().unwrap()));
                let model = Model {
                    entries,
                    vote: log.vote(shard).unwrap(),
                    purged,
                };
                (shard, model)
            })
            .collect()
    }

    /// The model's shards 0-2, each as [`read_model`] gives it.
    fn shards_of(model: &HashMap<u64, Model>) -> BTreeMap<u64, Model> {
        (0..3u64)
            .map(|shard| (shard, model.get(&shard).cloned().unwrap_or_default()))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Any sequence of appends, truncations, purges, votes, drops,
        /// reopenings, group commits and power cuts, with segments small
        /// enough that they rotate, are copied forward and deleted all the
        /// time, leaves the log equal to a plain model of it. After a power
        /// cut (only what was synced survives, files and folder entries
        /// alike) the log is the model as it was at some point since the last
        /// group commit or drop, which are durable when they return.
        #[test]
        fn the_log_matches_a_model(ops in proptest::collection::vec(op(), 1..80)) {
            let mut dir = tempfile::tempdir().unwrap();
            let segment_bytes = 3000;
            power_cut::watch(dir.path());
            let mut log = RaftLog::open_with(dir.path(), segment_bytes).unwrap();
            let mut model: HashMap<u64, Model> = HashMap::new();
            // The model after each op since the last durable point.
            let mut since_sync = vec![shards_of(&model)];
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut term = 0u64;
            for op in ops {
                term += 1;
                match op {
                    Op::Append { shard, back, n, len } => {
                        let m = model.entry(shard).or_default();
                        let start = m.end().saturating_sub(back).max(m.floor());
                        append(&log, shard, start, start + n, term, len);
                        m.entries.split_off(&start);
                        for i in start..start + n {
                            m.entries.insert(i, (term, entry_bytes(i, term, len)));
                        }
                    }
                    Op::Truncate { shard, back } => {
                        let m = model.entry(shard).or_default();
                        let from = m.end().saturating_sub(back).max(m.floor());
                        log.truncate(shard, from).unwrap();
                        m.entries.split_off(&from);
                    }
                    Op::Purge { shard, ahead } => {
                        let m = model.entry(shard).or_default();
                        let upto = m.floor() + ahead;
                        log.purge(shard, upto, &upto.to_le_bytes()).unwrap();
                        m.entries = m.entries.split_off(&(upto + 1));
                        m.purged = Some(upto);
                    }
                    Op::Vote { shard } => {
                        let v = term.to_le_bytes().to_vec();
                        log.save_vote(shard, &v).unwrap();
                        model.entry(shard).or_default().vote = Some(v);
                    }
                    Op::Drop { shard } => {
                        // Durable when it returns, if the log knew the shard.
                        if log.inner.lock().unwrap().shards.contains_key(&shard) {
                            since_sync.clear();
                        }
                        log.drop_shard(shard).unwrap();
                        model.remove(&shard);
                    }
                    Op::Reopen => {
                        drop(log);
                        log = RaftLog::open_with(dir.path(), segment_bytes).unwrap();
                    }
                    Op::Sync => {
                        runtime.block_on(log.sync()).unwrap();
                        since_sync.clear();
                    }
                    Op::PowerCut => {
                        let image = tempfile::tempdir().unwrap();
                        power_cut::cut(dir.path(), image.path());
                        drop(log);
                        dir = image;
                        power_cut::watch(dir.path());
                        log = RaftLog::open_with(dir.path(), segment_bytes).unwrap();
                        let recovered = read_model(&log);
                        prop_assert!(
                            since_sync.contains(&recovered),
                            "after a power cut the log holds {:?}, none of the {} states since \
                             the last group commit",
                            recovered,
                            since_sync.len()
                        );
                        model = recovered
                            .into_iter()
                            .filter(|(_, m)| *m != Model::default())
                            .collect();
                        since_sync.clear();
                    }
                }
                since_sync.push(shards_of(&model));
                for shard in 0..3u64 {
                    let m = model.get(&shard).cloned().unwrap_or_default();
                    let want: Vec<Vec<u8>> = m.entries.values().map(|(_, b)| b.clone()).collect();
                    prop_assert_eq!(log.read(shard, 0, u64::MAX).unwrap(), want);
                    let last = m.entries.iter().next_back().map(|(i, (t, _))| (*t, *i));
                    prop_assert_eq!(log.last(shard).unwrap(), last);
                    prop_assert_eq!(log.vote(shard).unwrap(), m.vote.clone());
                    prop_assert_eq!(
                        log.purged(shard).unwrap(),
                        m.purged.map(|p| p.to_le_bytes().to_vec())
                    );
                }
            }
            // Everything rotated away is gone from disk.
            prop_assert!(log.segment_count() <= 12, "{} segments", log.segment_count());
            power_cut::forget(dir.path());
        }
    }
}
