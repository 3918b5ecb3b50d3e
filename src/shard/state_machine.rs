//! A shard's state machine in sled: openraft's `RaftStateMachine`.
//!
//! ```text
//!  openraft SM task ── apply(entries) ──▶ Applier over Overlay ──▶ one sled batch
//!                                                                 (effects + applied id)
//!                   ── try_create_snapshot_builder ──▶ copy tree to a file (blocks apply)
//!                   ── install_snapshot ──▶ clear tree, load file, applied id last
//! ```
//!
//! Crash recovery: the applied log id is written last (in the same atomic
//! batch as the effects for apply; after all data for a snapshot install). On
//! open, a tree whose applied id is behind the current snapshot — an
//! interrupted install, or state lost because sled had not flushed it — is
//! reloaded from the snapshot file; openraft then re-applies the log after it.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::EntryPayload as OpenraftPayload;
use serde::{Deserialize, Serialize};

use crate::api::codec::{from_json, to_json};
use crate::api::pb::replicated::ShardSettings;
use crate::shard::apply::{default_settings, Applier, Overlay};
use crate::shard::snapshot::{self, SnapshotFile};
use crate::shard::types::{
    ApplyOutput, LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
};
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
    storage: Storage,
    snapshot_dir: PathBuf,
    settings: ShardSettings,
    current: Current,
}

impl StateMachine {
    pub fn open(storage: &Storage, shard: ShardId) -> io::Result<StateMachine> {
        let tree = storage.open_tree(&trees::state_tree(shard))?;
        let snapshot_dir = storage.snapshot_dir(shard);
        std::fs::create_dir_all(&snapshot_dir)?;
        let current = load_current(&snapshot_dir)?;
        let mut sm = StateMachine {
            shard,
            tree,
            storage: storage.clone(),
            snapshot_dir,
            settings: default_settings(),
            current: Arc::new(Mutex::new(current.clone())),
        };
        if let Some((meta, path)) = current {
            let applied = sm.read_applied()?;
            if applied < meta.last_log_id {
                tracing::warn!(shard = %shard, ?applied, snapshot = ?meta.last_log_id,
                    "state is behind the current snapshot; reloading it");
                sm.load_tree_from(&meta, &path)?;
            }
        }
        sm.settings = sm.read_settings()?;
        Ok(sm)
    }

    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    fn read_applied(&self) -> io::Result<Option<LogId>> {
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
            .tree
            .get(keys::SM_META_MEMBERSHIP)
            .map_err(io::Error::other)?
        {
            Some(v) => Ok(from_json(&v, "stored membership")?),
            None => Ok(StoredMembership::default()),
        }
    }

    fn read_settings(&self) -> io::Result<ShardSettings> {
        match self
            .tree
            .get(keys::SM_META_SETTINGS)
            .map_err(io::Error::other)?
        {
            Some(v) => Ok(crate::api::codec::decode(&v, "shard settings")?),
            None => Ok(default_settings()),
        }
    }

    /// Replaces the tree's content with a snapshot file's. The applied id and
    /// membership are written last, so an interrupted load is detected on open.
    fn load_tree_from(&mut self, meta: &SnapshotMeta, path: &std::path::Path) -> io::Result<()> {
        let pairs = snapshot::read_pairs(path)?;
        self.tree.clear().map_err(io::Error::other)?;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for (k, v) in pairs {
            if k.as_slice() == keys::SM_META_APPLIED || k.as_slice() == keys::SM_META_MEMBERSHIP {
                continue;
            }
            batch.insert(k, v);
            in_batch += 1;
            if in_batch == 10_000 {
                self.tree
                    .apply_batch(std::mem::take(&mut batch))
                    .map_err(io::Error::other)?;
                in_batch = 0;
            }
        }
        self.tree.apply_batch(batch).map_err(io::Error::other)?;
        let mut last = sled::Batch::default();
        last.insert(keys::SM_META_MEMBERSHIP, to_json(&meta.last_membership));
        last.insert(keys::SM_META_APPLIED, to_json(&meta.last_log_id));
        self.tree.apply_batch(last).map_err(io::Error::other)?;
        self.settings = self.read_settings()?;
        Ok(())
    }
}

fn load_current(dir: &std::path::Path) -> io::Result<Option<(SnapshotMeta, PathBuf)>> {
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

/// Makes `file` (already inside `dir`) the current snapshot, durably, and
/// removes older snapshot files.
fn set_current(
    dir: &std::path::Path,
    meta: &SnapshotMeta,
    file: &std::path::Path,
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
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let n = entry.file_name();
        let n = n.to_string_lossy();
        if n.starts_with("snap-") && *n != name {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

fn snapshot_file_name(meta: &SnapshotMeta) -> String {
    match &meta.last_log_id {
        Some(id) => format!("snap-{}-{}.bin", id.leader_id.term, id.index),
        None => "snap-empty.bin".to_string(),
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
            let file = dir.join(snapshot_file_name(&meta));
            std::fs::rename(&tmp, &file)?;
            set_current(&dir, &meta, &file)?;
            *current.lock().expect("snapshot pointer lock") = Some((meta.clone(), file.clone()));
            Ok(Snapshot {
                meta,
                snapshot: SnapshotFile { path: file },
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
        let mut overlay = Overlay::new(&self.tree);
        let mut applier = Applier {
            kv: &mut overlay,
            settings: self.settings,
        };
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
        self.settings = applier.settings;
        overlay.put(keys::SM_META_APPLIED.to_vec(), to_json(&Some(last)));
        if let Some(m) = membership {
            overlay.put(keys::SM_META_MEMBERSHIP.to_vec(), to_json(&m));
        }
        self.tree
            .apply_batch(overlay.into_batch())
            .map_err(io::Error::other)?;
        metrics::counter!(crate::metrics::SHARD_APPLY_ENTRIES).increment(replies.len() as u64);
        for (responder, output) in replies {
            if let Some(r) = responder {
                r.send(output);
            }
        }
        Ok(())
    }

    async fn try_create_snapshot_builder(&mut self, _force: bool) -> Option<SnapshotBuilder> {
        match self.copy_for_snapshot() {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::error!(shard = %self.shard, error = %e, "copy state for snapshot");
                None
            }
        }
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        self.copy_for_snapshot().expect("copy state for snapshot")
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        // Make the received file the current snapshot first: if we crash while
        // loading it, open() finds the tree behind it and loads it again.
        let file = self.snapshot_dir.join(snapshot_file_name(meta));
        if snapshot.path != file {
            if snapshot.path.parent() == Some(self.snapshot_dir.as_path()) {
                std::fs::rename(&snapshot.path, &file)?;
            } else {
                std::fs::copy(&snapshot.path, &file)?;
            }
        }
        std::fs::File::open(&file)?.sync_all()?;
        set_current(&self.snapshot_dir, meta, &file)?;
        *self.current.lock().expect("snapshot pointer lock") = Some((meta.clone(), file.clone()));
        self.load_tree_from(meta, &file)?;
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
    /// Copies the tree to a temporary snapshot file. Runs on the state
    /// machine task, so no apply runs meanwhile: the copy is consistent.
    fn copy_for_snapshot(&mut self) -> io::Result<SnapshotBuilder> {
        let last_log_id = self.read_applied()?;
        let last_membership = self.read_membership()?;
        let tmp = self
            .snapshot_dir
            .join(format!("build-{}.tmp", rand::random::<u64>()));
        snapshot::write_tree(&self.tree, &tmp)?;
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
