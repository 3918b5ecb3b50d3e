//! A shard's state machine in sled: openraft's `RaftStateMachine`.
//!
//! ```text
//!  openraft SM task ── apply(entries) ──▶ Applier over Overlay ──▶ memtable
//!                                         (when due) flush ──▶ sled: marker, effects, applied id
//!                   ── try_create_snapshot_builder ──▶ flush, copy tree to a file (blocks apply)
//!                   ── install_snapshot ──▶ drop memtable, clear tree, load file, applied id last
//! ```
//!
//! Crash recovery. Applied effects wait in the replica's memtable
//! ([`crate::shard::memtable`]) and are flushed to sled together: a crash
//! loses the memtable, and openraft applies the log again from sled's applied
//! id. sled recovers a prefix of its writes. A flush
//! writes an "applying" marker with its last log id, then its effects
//! (plain inserts and removes: sled's atomic batches switch the whole Db to
//! a global lock that halved write throughput), then the applied log id. A
//! snapshot install writes its data and then the applied id. On open, a tree
//! whose marker differs from its applied id (an apply cut short, its effects
//! partly written) or whose applied id is behind the current snapshot (an
//! interrupted install, or state lost because sled had not flushed it) is
//! reloaded from the snapshot file, or cleared when there is none (then no
//! log entry was ever purged); openraft then re-applies the log after it.
//!
//! An apply call's effects enter the memtable together, under its lock, and
//! readers read through it ([`View`]); a read of several keys can still see
//! a later call's effects on its later lookups. Reads that need a position
//! wait for the applied id, which openraft publishes after the call
//! returns. Readers take chat records and recent messages from memory
//! ([`crate::shard::chat_cache`]): each call puts the ones it wrote or
//! removed there after its writes and before it returns; loading a snapshot
//! empties it.
//!
//! Self-destructing bodies are sealed in the tree with the node's epoch keys
//! and, in a snapshot file, with that file's own key: building a snapshot
//! re-seals them for the file, loading one re-seals them for the tree.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::EntryPayload as OpenraftPayload;
use serde::{Deserialize, Serialize};

use crate::api::codec::{from_json, to_json};
use crate::api::pb::replicated::ShardSettings;
use crate::shard::apply::{default_settings, Applier, Overlay, APPLY_RULES};
use crate::shard::chat_cache::ChatCache;
use crate::shard::memtable::{Memtable, Pending, View};
use crate::shard::reads::SnapshotLoads;
use crate::shard::sealing;
use crate::shard::snapshot::{self, SnapshotFile};
use crate::shard::types::{
    ApplyOutput, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
};
use crate::storage::seal::{self, Key, KeyRing};
use crate::storage::{keys, trees, Storage};
use crate::types::ShardId;

/// The current snapshot's meta and file, shared by the state machine and its
/// builders.
type Current = Arc<Mutex<Option<(SnapshotMeta, PathBuf)>>>;

#[derive(Serialize, Deserialize)]
struct CurrentSnapshotFile {
    format_version: u32,
    meta: SnapshotMeta,
    file: String,
}

pub struct StateMachine {
    shard: ShardId,
    tree: sled::Tree,
    /// Applied effects sled does not hold yet.
    mem: Arc<Memtable>,
    /// The memtable over the tree, as readers see the state.
    view: View,
    storage: Storage,
    snapshot_dir: PathBuf,
    settings: ShardSettings,
    current: Current,
    keys: Arc<KeyRing>,
    /// Chat records and recent messages for readers, put after each apply
    /// call.
    chats: Arc<ChatCache>,
    /// Snapshot loads into `tree`, for readers to see that one overlapped.
    loads: Arc<SnapshotLoads>,
    /// Dropped with the state machine: its receivers learn that nothing
    /// writes to `tree` any more (see [`StateMachine::alive`]).
    alive: tokio::sync::watch::Sender<()>,
}

impl StateMachine {
    /// The chat records and messages this state machine keeps current for
    /// its readers.
    pub fn chat_cache(&self) -> Arc<ChatCache> {
        self.chats.clone()
    }

    /// The count of snapshot loads into the tree, for its readers.
    pub fn loads(&self) -> Arc<SnapshotLoads> {
        self.loads.clone()
    }

    /// A receiver whose sender goes with this state machine: once it is
    /// closed, openraft's worker that owned the state machine has finished
    /// its last command (a replica's shutdown does not wait for that), so
    /// its tree and snapshot folder may be deleted.
    pub fn alive(&self) -> tokio::sync::watch::Receiver<()> {
        self.alive.subscribe()
    }

    pub fn open(storage: &Storage, shard: ShardId) -> io::Result<StateMachine> {
        let tree = storage.open_tree(&trees::state_tree(shard))?;
        let snapshot_dir = storage.snapshot_dir(shard);
        snapshot::create_dir_synced(&snapshot_dir)?;
        let current = load_current(&snapshot_dir)?;
        remove_unfinished(
            &snapshot_dir,
            current.as_ref().map(|(_, path)| path.as_path()),
        )?;
        let mem = Arc::new(Memtable::new(storage.memtable_budget().clone()));
        let view = View::new(tree.clone(), mem.clone());
        let mut sm = StateMachine {
            shard,
            tree,
            mem,
            view,
            storage: storage.clone(),
            snapshot_dir,
            settings: default_settings(),
            current: Arc::new(Mutex::new(current.clone())),
            keys: storage.keys().clone(),
            chats: Arc::new(ChatCache::new(storage.message_cache_budget().clone())),
            loads: Default::default(),
            alive: tokio::sync::watch::Sender::new(()),
        };
        // The marker names the last apply call begun, the applied id the
        // last one finished: they differ only if an apply was cut short.
        let interrupted = match sm
            .tree
            .get(keys::SM_META_APPLYING)
            .map_err(io::Error::other)?
        {
            Some(v) => from_json::<Option<LogId>>(&v, "apply marker")? != sm.read_applied()?,
            None => false,
        };
        match current {
            Some((meta, path)) => {
                let applied = sm.read_applied()?;
                if interrupted || applied < meta.last_log_id {
                    tracing::warn!(shard = %shard, ?applied, snapshot = ?meta.last_log_id, interrupted,
                        "state is behind the current snapshot or was left mid-apply; reloading the snapshot");
                    sm.load_tree_from(&meta, &path)?;
                }
            }
            None if interrupted => {
                // No snapshot yet, so no log entry was ever purged: start
                // over and let openraft apply the whole log again.
                tracing::warn!(shard = %shard, "state was left mid-apply; rebuilding it from the log");
                // The marker goes last, so a crash meanwhile repeats this.
                for key in sm.tree.iter().keys() {
                    let key = key.map_err(io::Error::other)?;
                    if key.as_ref() != keys::SM_META_APPLYING {
                        sm.tree.remove(key).map_err(io::Error::other)?;
                    }
                }
                sm.tree
                    .remove(keys::SM_META_APPLYING)
                    .map_err(io::Error::other)?;
            }
            None => {}
        }
        sm.settings = sm.read_settings()?;
        Ok(sm)
    }

    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The applied writes that sled does not hold yet.
    pub fn memtable(&self) -> Arc<Memtable> {
        self.mem.clone()
    }

    /// The state as readers see it: the memtable over the tree.
    pub fn view(&self) -> View {
        self.view.clone()
    }

    /// The last log id applied: the memtable's, or sled's when it is empty.
    fn read_applied(&self) -> io::Result<Option<LogId>> {
        if let Some(last) = self.mem.last() {
            return Ok(Some(last));
        }
        match self
            .tree
            .get(keys::SM_META_APPLIED)
            .map_err(io::Error::other)?
        {
            Some(v) => Ok(from_json(&v, "applied log id")?),
            None => Ok(None),
        }
    }

    fn read_membership(&self) -> io::Result<StoredMembership> {
        match self
            .view
            .get(keys::SM_META_MEMBERSHIP)
            .map_err(io::Error::other)?
        {
            Some(v) => Ok(from_json(&v, "stored membership")?),
            None => Ok(StoredMembership::default()),
        }
    }

    /// The shard's replicated settings; refuses a state under apply rules
    /// this binary does not know (a newer binary moved the shard to them).
    fn read_settings(&self) -> io::Result<ShardSettings> {
        let settings: ShardSettings = match self
            .view
            .get(keys::SM_META_SETTINGS)
            .map_err(io::Error::other)?
        {
            Some(v) => crate::api::codec::decode(&v, "shard settings")?,
            None => default_settings(),
        };
        if settings.apply_rules > APPLY_RULES {
            return Err(io::Error::other(format!(
                "{} is under apply rules {}; this binary knows up to {APPLY_RULES}: run the newer binary",
                self.shard, settings.apply_rules
            )));
        }
        Ok(settings)
    }

    /// Replaces the tree's content with a snapshot file's. The applied id and
    /// membership are written last, so an interrupted load is detected on open.
    /// The file is checked whole first, then read a second time straight into
    /// the tree, so a shard of any size loads in the memory of one record.
    fn load_tree_from(&mut self, meta: &SnapshotMeta, path: &std::path::Path) -> io::Result<()> {
        snapshot::verify(path)?;
        let snapshot_key = read_snapshot_key(path)?;
        let ring = self.keys.clone();
        // The key new seals use, looked up again when the epoch moves on.
        let mut sealing_with: Option<(u64, Key)> = None;
        // Readers refuse what they read from here to the end. On an error
        // the count stays odd: the tree is half loaded, and the shard stops.
        self.loads.step();
        if let Some(last) = meta.last_log_id {
            self.loads.note_writing(last.index);
        }
        self.mem.clear();
        self.chats.clear();
        self.tree.clear().map_err(io::Error::other)?;
        snapshot::for_each_pair(path, |k, v| {
            if k.as_slice() == keys::SM_META_APPLIED
                || k.as_slice() == keys::SM_META_MEMBERSHIP
                || k.as_slice() == keys::SM_META_APPLYING
            {
                return Ok(());
            }
            if k.first() != Some(&keys::TAG_MESSAGE) || sealing::sealed_epoch(&v)?.is_none() {
                self.tree.insert(k, v).map_err(io::Error::other)?;
                return Ok(());
            }
            // Held from choosing the key to the record being in the tree,
            // so the eraser cannot destroy the key under it; and only that
            // long: the eraser waits for every holder, and every write of
            // every shard on this node waits behind the eraser.
            let _sealing = ring.hold();
            let epoch = ring.current_epoch();
            if sealing_with.as_ref().is_none_or(|(e, _)| *e != epoch) {
                sealing_with = Some(ring.current_key()?);
            }
            let (epoch, key) = sealing_with.as_ref().expect("set above");
            let m = sealing::open_message(&self.keys, &v, snapshot_key.as_ref())?;
            let v = sealing::seal_message(m, *epoch, key);
            self.tree.insert(k, v).map_err(io::Error::other)?;
            Ok(())
        })?;
        self.tree
            .insert(keys::SM_META_MEMBERSHIP, to_json(&meta.last_membership))
            .map_err(io::Error::other)?;
        self.tree
            .insert(keys::SM_META_APPLIED, to_json(&meta.last_log_id))
            .map_err(io::Error::other)?;
        self.settings = self.read_settings()?;
        self.chats.clear();
        self.loads.step();
        // Watches' long polls look again, at the loaded state.
        self.chats.wake_all();
        Ok(())
    }
}

/// Removes snapshot files a crash left half-built, half-received or not yet
/// made current, and destroys their keys: every one but `current`'s.
fn remove_unfinished(dir: &std::path::Path, current: Option<&std::path::Path>) -> io::Result<()> {
    let current_name = current
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned());
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let n = entry.file_name();
        let n = n.to_string_lossy();
        let is_current = current_name
            .as_deref()
            .is_some_and(|c| n == c || n.strip_suffix(".key") == Some(c));
        if (n.starts_with("build-") || n.starts_with("recv-") || n.starts_with("snap-"))
            && !is_current
        {
            // A key a crash left under its temporary name is a key too.
            if n.ends_with(".key") || n.ends_with(".key.tmp") {
                seal::destroy_key_file(&entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
    }
    Ok(())
}

/// The key of a snapshot file's sealed bodies, if it has any.
fn read_snapshot_key(file: &std::path::Path) -> io::Result<Option<Key>> {
    match seal::read_key_file(&snapshot::key_path(file)) {
        Ok((_, key)) => Ok(Some(key)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The current snapshot's meta and file, from the pointer in `dir`.
pub fn load_current(dir: &std::path::Path) -> io::Result<Option<(SnapshotMeta, PathBuf)>> {
    let path = dir.join("current.json");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let cur: CurrentSnapshotFile = from_json(&bytes, "current snapshot pointer")?;
            if cur.format_version != 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unknown snapshot pointer version",
                ));
            }
            Ok(Some((cur.meta, dir.join(cur.file))))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Makes the whole, synced file `staged` (a `build-` or `recv-` file inside
/// `dir`, with its key beside it if it has one) the current snapshot under a
/// `snap-` name, unless the current one is newer; the file's path if it
/// did. A file not made current is removed, and its key destroyed (the
/// eraser counts on no other snapshot file outliving a past key). openraft
/// builds snapshots in a task of their own, so a build can finish while a
/// snapshot from the leader is installed: each file takes its final name
/// and replaces the current one under the pointer's lock, and only the file
/// it replaced is removed, so neither can leave the pointer on the older
/// one or on a file the other removed.
fn publish(
    dir: &std::path::Path,
    current: &Current,
    meta: &SnapshotMeta,
    staged: &std::path::Path,
) -> io::Result<Option<PathBuf>> {
    let mut cur = current.lock().expect("snapshot pointer lock");
    let staged_key = snapshot::key_path(staged);
    if cur
        .as_ref()
        .is_some_and(|(m, _)| m.last_log_id > meta.last_log_id)
    {
        if staged_key.exists() {
            seal::destroy_key_file(&staged_key)?;
        }
        std::fs::remove_file(staged)?;
        return Ok(None);
    }
    let file = dir.join(snapshot_file_name(meta));
    if staged_key.exists() {
        std::fs::rename(&staged_key, snapshot::key_path(&file))?;
    }
    std::fs::rename(staged, &file)?;
    // The new names are durable before the pointer names them: otherwise a
    // power cut could keep the pointer and lose the renames, and opening
    // removes the staged file as unfinished.
    snapshot::sync_dir(dir)?;
    set_current(dir, meta, &file, cur.as_ref().map(|(_, p)| p.as_path()))?;
    *cur = Some((meta.clone(), file.clone()));
    Ok(Some(file))
}

/// Makes `file` (already inside `dir`) the current snapshot, durably, and
/// removes `replaced` (the one current before), destroying its key.
fn set_current(
    dir: &std::path::Path,
    meta: &SnapshotMeta,
    file: &std::path::Path,
    replaced: Option<&std::path::Path>,
) -> io::Result<()> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("snapshot file has no name"))?
        .to_string();
    let pointer = CurrentSnapshotFile {
        format_version: 1,
        meta: meta.clone(),
        file: name.clone(),
    };
    let tmp = dir.join("current.json.tmp");
    std::fs::write(&tmp, to_json(&pointer))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join("current.json"))?;
    snapshot::sync_dir(dir)?;
    // The file first, then its key: a snapshot being sent to a follower
    // reads its key and then opens its file, so it either gets an intact key
    // and its file or fails to open the file; never the file with a key half
    // destroyed (zeroed) or gone.
    if let Some(old) = replaced.filter(|old| *old != file) {
        let _ = std::fs::remove_file(old);
        let key = snapshot::key_path(old);
        if key.exists() {
            seal::destroy_key_file(&key)?;
        }
    }
    Ok(())
}

fn snapshot_file_name(meta: &SnapshotMeta) -> String {
    match &meta.last_log_id {
        // Unique, so a file being streamed to a peer is never replaced under
        // its key.
        Some(id) => format!(
            "snap-{}-{}-{:016x}.bin",
            id.leader_id.term,
            id.index,
            rand::random::<u64>()
        ),
        None => format!("snap-empty-{:016x}.bin", rand::random::<u64>()),
    }
}

pub struct SnapshotBuilder {
    dir: PathBuf,
    tmp: PathBuf,
    meta: SnapshotMeta,
    current: Current,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let dir = self.dir.clone();
        let tmp = self.tmp.clone();
        let meta = self.meta.clone();
        let current = self.current.clone();
        tokio::task::spawn_blocking(move || {
            // Not published if a newer snapshot was installed meanwhile:
            // openraft ignores this one then (its file is gone).
            let path = publish(&dir, &current, &meta, &tmp)?.unwrap_or(tmp);
            Ok(Snapshot {
                meta,
                snapshot: SnapshotFile { path },
            })
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.read_applied()?, self.read_membership()?))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        let mut overlay = Overlay::sealed(&self.view, &self.keys);
        let mut applier = Applier::new(&mut overlay, self.settings);
        let mut replies = Vec::new();
        let mut last = None;
        let mut membership = None;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let output = match &entry.payload {
                OpenraftPayload::Blank => ApplyOutput::default(),
                OpenraftPayload::Normal(p) => ApplyOutput {
                    results: applier.apply_batch(&p.batch)?,
                },
                OpenraftPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m.clone()));
                    ApplyOutput::default()
                }
            };
            last = Some(entry.log_id);
            replies.push((responder, output));
        }
        let Some(last) = last else {
            return Ok(());
        };
        // A flush may write these effects to sled at any time; the entries
        // must be on disk first (see `RaftLog::wait_durable`).
        self.storage
            .raft_log()
            .wait_durable(self.shard.0, last.index)
            .await?;
        self.settings = applier.settings;
        let chats = std::mem::take(&mut applier.chats);
        let (mut writes, messages) = overlay.into_writes()?;
        if let Some(m) = membership {
            writes.push((
                keys::SM_META_MEMBERSHIP.to_vec(),
                Some(Pending {
                    value: to_json(&m).into(),
                    seal: false,
                }),
            ));
        }
        self.loads.note_writing(last.index);
        self.mem.extend(writes, last);
        // Readers see them in the memtable now; they may take them from
        // memory.
        self.chats.put(chats, messages);
        metrics::counter!(crate::metrics::SHARD_APPLY_ENTRIES).increment(replies.len() as u64);
        metrics::histogram!(crate::metrics::SHARD_APPLY_CALL_ENTRIES).record(replies.len() as f64);
        for (responder, output) in replies {
            if let Some(r) = responder {
                r.send(output);
            }
        }
        // After the replies: they wait for the log, not for sled. In place,
        // like the sled writes of every apply call before the memtable: a
        // flush takes a few ms, and handing the worker's other tasks to
        // another thread for it (`block_in_place`) measured slower.
        if self.mem.flush_due() {
            self.flush()?;
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<SnapshotBuilder> {
        match crate::storage::blocking(|| self.copy_for_snapshot()) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::error!(shard = %self.shard, error = %e, "copy state for snapshot");
                None
            }
        }
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        crate::storage::blocking(|| self.copy_for_snapshot()).expect("copy state for snapshot")
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        crate::storage::blocking(|| self.install_file(meta, &snapshot.path))?;
        self.storage.durability().sync().await?;
        tracing::info!(shard = %self.shard, last = ?meta.last_log_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let cur = self.current.lock().expect("snapshot pointer lock").clone();
        Ok(cur.map(|(meta, path)| Snapshot {
            meta,
            snapshot: SnapshotFile { path },
        }))
    }
}

impl StateMachine {
    /// Checks a received snapshot file, makes it the current snapshot and
    /// loads the tree from it.
    fn install_file(&mut self, meta: &SnapshotMeta, received: &std::path::Path) -> io::Result<()> {
        // Make the received file the current snapshot first: if we crash while
        // loading it, open() finds the tree behind it and loads it again. So
        // it must be whole before it is published.
        snapshot::verify(received)?;
        let staged = if received.parent() == Some(self.snapshot_dir.as_path()) {
            received.to_path_buf()
        } else {
            let staged = self
                .snapshot_dir
                .join(format!("recv-{:016x}.tmp", rand::random::<u64>()));
            if let Some(key) = read_snapshot_key(received)? {
                let epoch = self.keys.current_epoch();
                seal::write_key_file(&snapshot::key_path(&staged), epoch, &key)?;
            }
            std::fs::copy(received, &staged)?;
            staged
        };
        std::fs::File::open(&staged)?.sync_all()?;
        let Some(file) = publish(&self.snapshot_dir, &self.current, meta, &staged)? else {
            return Err(io::Error::other(format!(
                "snapshot {:?} to install is older than this replica's current one",
                meta.last_log_id
            )));
        };
        self.load_tree_from(meta, &file)
    }

    /// Writes the memtable to sled ([`Memtable::flush_into`]).
    pub fn flush(&mut self) -> io::Result<()> {
        self.mem.flush_into(&self.tree, Some(&self.keys))
    }

    /// Copies the tree to a temporary snapshot file. Runs on the state
    /// machine task, so no apply runs meanwhile: the copy is consistent.
    fn copy_for_snapshot(&mut self) -> io::Result<SnapshotBuilder> {
        self.flush()?;
        let last_log_id = self.read_applied()?;
        let last_membership = self.read_membership()?;
        let tmp = self
            .snapshot_dir
            .join(format!("build-{}.tmp", rand::random::<u64>()));
        // Sealed bodies go into the file sealed with a key of its own.
        let mut file_key: Option<Key> = None;
        let ring = self.keys.clone();
        let written = snapshot::write_tree(&self.tree, &tmp, |k, v| {
            if k.first() != Some(&keys::TAG_MESSAGE) || sealing::sealed_epoch(v)?.is_none() {
                return Ok(None);
            }
            let m = sealing::open_message(&ring, v, None)?;
            let key = file_key.get_or_insert_with(seal::new_key);
            Ok(Some(sealing::seal_message(m, seal::SNAPSHOT_EPOCH, key)))
        })
        .and_then(|_| match file_key {
            Some(key) => {
                let epoch = self.keys.current_epoch();
                seal::write_key_file(&snapshot::key_path(&tmp), epoch, &key)
            }
            None => Ok(()),
        });
        if let Err(e) = written {
            // A build that failed (a full disk) leaves nothing behind: the
            // next attempt would otherwise add another partial copy.
            let _ = std::fs::remove_file(&tmp);
            let _ = seal::destroy_key_file(&snapshot::key_path(&tmp));
            return Err(e);
        }
        Ok(SnapshotBuilder {
            dir: self.snapshot_dir.clone(),
            tmp,
            meta: SnapshotMeta {
                last_log_id,
                last_membership,
            },
            current: self.current.clone(),
        })
    }

    /// Settings currently in force (replicated).
    pub fn settings(&self) -> &ShardSettings {
        &self.settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An apply cut short by a crash leaves its marker; the next open drops
    /// the part-written state so that openraft applies the log again.
    #[test]
    fn a_tree_left_mid_apply_is_rebuilt_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let shard = ShardId(0);
        {
            let sm = StateMachine::open(&storage, shard).unwrap();
            sm.tree
                .insert(
                    keys::SM_META_APPLYING,
                    to_json(&Some(crate::shard::types::log_id(1, 7))),
                )
                .unwrap();
            sm.tree
                .insert(keys::chat(5), b"half-written".to_vec())
                .unwrap();
        }
        let sm = StateMachine::open(&storage, shard).unwrap();
        assert!(sm.tree.is_empty(), "part-written state is gone");
        assert_eq!(sm.read_applied().unwrap(), None);

        // A clean tree is left alone, also when the marker of its last
        // (finished) apply call is still there.
        sm.tree.insert(keys::chat(6), b"whole".to_vec()).unwrap();
        let last = to_json(&Some(crate::shard::types::log_id(1, 9)));
        sm.tree
            .insert(keys::SM_META_APPLYING, last.clone())
            .unwrap();
        sm.tree.insert(keys::SM_META_APPLIED, last).unwrap();
        drop(sm);
        let sm = StateMachine::open(&storage, shard).unwrap();
        assert_eq!(sm.tree.len(), 3);
        assert!(sm.tree.get(keys::chat(6)).unwrap().is_some());
    }

    /// Effects that wait in the memtable are lost with the process, and
    /// sled's applied id says where openraft applies the log again from:
    /// applied again, the same entries give the same state.
    #[tokio::test]
    async fn a_crash_loses_only_the_memtable_and_the_log_applies_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let one = |e| futures::stream::iter(vec![Ok((e, None))]);
        let mut sm = StateMachine::open(&storage, ShardId(0)).unwrap();
        sm.apply(one(send_entry(1, 1))).await.unwrap();
        sm.flush().unwrap();
        sm.apply(one(send_entry(2, 2))).await.unwrap();
        // Without the chat cache, so the memtable answers.
        let reader = crate::shard::reads::StateReader::new(
            sm.view(),
            storage.keys().clone(),
            Default::default(),
        );
        assert_eq!(reader.chat_record(5).unwrap().last_seq, 2);
        assert_eq!(
            reader.messages(5, &[2]).unwrap().len(),
            1,
            "read from the memtable"
        );
        assert_eq!(sm.read_applied().unwrap().unwrap().index, 2);
        assert!(
            sm.tree.get(keys::message(5, 2)).unwrap().is_none(),
            "not in sled yet"
        );
        drop((sm, reader));

        let mut sm = StateMachine::open(&storage, ShardId(0)).unwrap();
        assert_eq!(sm.read_applied().unwrap().unwrap().index, 1);
        let reader = reader_of(&sm, &storage);
        assert_eq!(reader.chat_record(5).unwrap().last_seq, 1);
        sm.apply(one(send_entry(2, 2))).await.unwrap();
        let reader = reader_of(&sm, &storage);
        assert_eq!(reader.chat_record(5).unwrap().last_seq, 2);
        sm.flush().unwrap();
        let fresh = crate::shard::reads::StateReader::new(
            sm.view(),
            storage.keys().clone(),
            Default::default(),
        );
        assert_eq!(
            fresh.messages(5, &[2]).unwrap().len(),
            1,
            "applied again, then flushed"
        );
        assert!(sm.mem.is_empty());
        assert_eq!(sm.read_applied().unwrap().unwrap().index, 2);
    }

    fn entry(
        index: u64,
        commands: Vec<crate::api::pb::replicated::Command>,
    ) -> crate::shard::types::Entry {
        crate::shard::types::Entry {
            log_id: crate::shard::types::log_id(1, index),
            payload: OpenraftPayload::Normal(crate::shard::types::Proposal {
                batch: crate::api::pb::replicated::CommandBatch {
                    format_version: 1,
                    now_ms: 1_000,
                    commands,
                },
            }),
        }
    }

    fn reader_of(sm: &StateMachine, storage: &Storage) -> crate::shard::reads::StateReader {
        crate::shard::reads::StateReader::new(sm.view(), storage.keys().clone(), sm.chat_cache())
            .watching(sm.loads())
    }

    /// A send of body "hi" to chat 5.
    fn send_entry(index: u64, client_msg_id: u64) -> crate::shard::types::Entry {
        entry(
            index,
            vec![crate::shard::apply::testing::send(5, client_msg_id)],
        )
    }

    /// Applies one entry at `index` with one send into chat 5.
    async fn apply_send(sm: &mut StateMachine, index: u64, client_msg_id: u64) {
        let entries = vec![Ok((send_entry(index, client_msg_id), None))];
        sm.apply(futures::stream::iter(entries)).await.unwrap();
    }

    /// A raise of the apply rules holds for the state machine's next apply
    /// calls and after it reopens; a tree under rules this binary does not
    /// know is refused on open.
    #[tokio::test]
    async fn apply_rules_hold_across_apply_calls_and_unknown_ones_refuse_open() {
        use crate::shard::apply::testing::{edit, raise_rules};
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let mut sm = StateMachine::open(&storage, ShardId(0)).unwrap();
        let reader = reader_of(&sm, &storage);
        let one = |e| futures::stream::iter(vec![Ok((e, None))]);
        let pts = || reader.chat_record(5).unwrap().last_pts;
        sm.apply(one(send_entry(1, 1))).await.unwrap();
        sm.apply(one(entry(2, vec![edit(5, 1, 1, b"hi")])))
            .await
            .unwrap();
        assert_eq!(pts(), 2, "rules 0: an edit to the same body is a change");
        sm.apply(one(entry(3, vec![raise_rules(APPLY_RULES)])))
            .await
            .unwrap();
        sm.apply(one(entry(4, vec![edit(5, 1, 1, b"hi")])))
            .await
            .unwrap();
        assert_eq!(pts(), 2, "raised in an earlier apply call");
        sm.flush().unwrap();
        drop(sm);
        let mut sm = StateMachine::open(&storage, ShardId(0)).unwrap();
        assert_eq!(sm.settings().apply_rules, APPLY_RULES);
        sm.apply(one(entry(5, vec![edit(5, 1, 1, b"hi")])))
            .await
            .unwrap();
        let reader = reader_of(&sm, &storage);
        assert_eq!(
            reader.chat_record(5).unwrap().last_pts,
            2,
            "and after reopening"
        );

        let newer = ShardSettings {
            apply_rules: APPLY_RULES + 1,
            ..default_settings()
        };
        sm.tree
            .insert(
                keys::SM_META_SETTINGS,
                prost::Message::encode_to_vec(&newer),
            )
            .unwrap();
        drop(sm);
        let err = StateMachine::open(&storage, ShardId(0))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("apply rules"), "{err}");
    }

    /// A build copied before a newer snapshot was made current finishes
    /// without replacing it, and leaves neither its file nor its key.
    #[tokio::test]
    async fn a_snapshot_built_late_does_not_replace_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let mut sm = StateMachine::open(&storage, ShardId(0)).unwrap();
        apply_send(&mut sm, 1, 1).await;
        // Copied at index 1, finished only after a snapshot at index 2.
        let mut late = sm.get_snapshot_builder().await;
        apply_send(&mut sm, 2, 2).await;
        let newer = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        let older = late.build_snapshot().await.unwrap();
        assert_eq!(older.meta.last_log_id.unwrap().index, 1);
        let snapshots = storage.snapshot_dir(ShardId(0));
        let (meta, path) = load_current(&snapshots).unwrap().unwrap();
        assert_eq!(meta.last_log_id, newer.meta.last_log_id);
        assert!(path.exists());
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, newer.meta.last_log_id);
        assert!(!older.snapshot.path.exists(), "the late file is removed");
        assert!(!snapshot::key_path(&older.snapshot.path).exists());
    }

    /// Readers take chat records from memory: each apply call's record is
    /// there once the call returns, and a loaded snapshot replaces them.
    #[tokio::test]
    async fn readers_see_each_apply_call_and_then_a_loaded_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let mut sm = StateMachine::open(&storage, ShardId(0)).unwrap();
        let reader = reader_of(&sm, &storage);
        assert_eq!(reader.chat_record(5).unwrap().last_seq, 0);
        apply_send(&mut sm, 1, 1).await;
        assert_eq!(reader.chat_record(5).unwrap().last_seq, 1);
        let snapshot = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        apply_send(&mut sm, 2, 2).await;
        assert_eq!(reader.chat_record(5).unwrap().last_seq, 2);
        // A read that started before the load overlapped it; one after
        // did not.
        let before = reader.loads().count();
        assert!(reader.loads().unchanged(before), "no load yet");
        sm.install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .unwrap();
        assert!(!reader.loads().unchanged(before));
        let after = reader.loads().count();
        assert_eq!(after, before + 2, "one load, begun and finished");
        assert!(reader.loads().unchanged(after));
        assert_eq!(reader.chat_record(5).unwrap().last_seq, 1);
    }

    /// A snapshot file cut short (a sender that failed mid-file) is refused
    /// before it becomes the current snapshot: the replica keeps its state
    /// and its snapshot, and opens again afterwards.
    #[tokio::test]
    async fn a_cut_short_snapshot_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let mut sm = StateMachine::open(&storage, ShardId(0)).unwrap();
        apply_send(&mut sm, 1, 1).await;
        let kept = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        apply_send(&mut sm, 2, 2).await;
        let sent = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        // What a receiver holds when the stream ended early.
        let whole = std::fs::read(&sent.snapshot.path).unwrap();
        let received = dir.path().join("received.tmp");
        std::fs::write(&received, &whole[..whole.len() / 2]).unwrap();
        assert!(snapshot::verify(&received).is_err());
        let mut meta = sent.meta.clone();
        meta.last_log_id = Some(crate::shard::types::log_id(1, 3));
        let refused = sm
            .install_snapshot(&meta, SnapshotFile { path: received })
            .await;
        assert!(refused.is_err(), "a cut-short snapshot is refused");
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, sent.meta.last_log_id);
        assert_ne!(current.meta.last_log_id, kept.meta.last_log_id);
        assert_eq!(sm.read_applied().unwrap().unwrap().index, 2);
        drop(sm);
        let sm = StateMachine::open(&storage, ShardId(0)).unwrap();
        assert_eq!(sm.read_applied().unwrap().unwrap().index, 2);
    }

    /// A build and an install that overlap each publish their own file
    /// under the pointer's lock: the newest is current and on disk with its
    /// key, an older one is refused and removed, and only the file a publish
    /// replaced goes. A `snap-` file a crash left behind goes at open.
    #[test]
    fn publishing_keeps_the_current_file_and_removes_only_what_it_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let current: Current = Default::default();
        let meta = |index| SnapshotMeta {
            last_log_id: Some(crate::shard::types::log_id(1, index)),
            ..Default::default()
        };
        let staged = |name: &str, key: bool| {
            let path = dir.join(name);
            std::fs::write(&path, name).unwrap();
            if key {
                seal::write_key_file(&snapshot::key_path(&path), 1, &[7u8; 32]).unwrap();
            }
            path
        };
        let first = publish(dir, &current, &meta(5), &staged("build-1.tmp", true))
            .unwrap()
            .expect("the first is current");
        let newer = publish(dir, &current, &meta(9), &staged("recv-2.tmp", true))
            .unwrap()
            .expect("a newer one replaces it");
        assert!(!first.exists() && !snapshot::key_path(&first).exists());
        let late = staged("build-3.tmp", true);
        assert!(publish(dir, &current, &meta(7), &late).unwrap().is_none());
        assert!(!late.exists() && !snapshot::key_path(&late).exists());
        let (m, path) = load_current(dir).unwrap().unwrap();
        assert_eq!((m.last_log_id, &path), (meta(9).last_log_id, &newer));
        assert!(path.exists());
        assert!(read_snapshot_key(&path).unwrap().is_some());
        // A crash after a file took its name but before it was made current.
        let orphan = staged("snap-1-8-00.bin", true);
        // A crash while a key file was written, before its rename.
        let half_keyed = staged("build-4.tmp", false);
        let tmp_key = dir.join("build-4.tmp.key.tmp");
        std::fs::write(&tmp_key, [7u8; 40]).unwrap();
        let hard_link = dir.join("kept-link");
        std::fs::hard_link(&tmp_key, &hard_link).unwrap();
        remove_unfinished(dir, Some(&path)).unwrap();
        assert!(!orphan.exists() && !snapshot::key_path(&orphan).exists());
        assert!(!half_keyed.exists() && !tmp_key.exists());
        // Its bytes were overwritten, not only unlinked.
        assert!(std::fs::read(&hard_link).unwrap().iter().all(|b| *b == 0));
        assert!(path.exists() && snapshot::key_path(&path).exists());
    }
}
