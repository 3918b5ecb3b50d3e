//! A node: one process hosting replicas of many shards.
//!
//! ```text
//!              ┌───────────────── tonic server (raft_addr) ─────────────────┐
//!  peers ────▶ │ RaftTransport ─┐                      NodeApi ◀── routers, │
//!              │                ▼                         │        chatctl  │
//!              │   Registry: shard id → Shard (openraft + proposer + reader) │
//!              └────────────────┬─────────────────────────┬─────────────────┘
//!                               ▼                         ▼
//!                     one sled Db (log + state trees per shard), group commit
//! ```
//!
//! On start a node opens every shard the placement gives it. The replica in a
//! shard's preferred region initializes a new shard with the full replica set,
//! so starting all nodes of a config forms every shard with no manual step;
//! restarting reuses the data. [`duties`] runs leader-side chores.

pub mod admin;
pub mod api;
pub mod clock;
pub mod duties;
pub mod erasure;
pub mod quiesce;
pub mod transport;

use openraft::async_runtime::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::pb;
use crate::cluster::latency::LinkDelays;
use crate::cluster::{ClusterConfig, Placement};
use crate::shard::network::{Peers, RAFT_MESSAGE_BYTES_MAX};
use crate::shard::types::NodeAddr;
use crate::shard::{election_band, raft_config, Shard};
use crate::storage::{trees, Storage};
use crate::types::{NodeId, ShardId};

/// The shards a node hosts, and what it needs to open or close one while it
/// runs (membership changes made by `chatctl`).
#[derive(Clone)]
pub struct Registry {
    shards: Arc<RwLock<BTreeMap<ShardId, Arc<Shard>>>>,
    storage: Storage,
    host: Arc<Host>,
}

/// What opening a replica needs, shared by the registry's clones.
struct Host {
    config: ClusterConfig,
    id: NodeId,
    addr: String,
    region: String,
    placement: Placement,
    peers: Peers,
    /// Node-level facts: identity, draining, the replica records.
    node_tree: sled::Tree,
    /// One replica opened or closed at a time.
    changes: tokio::sync::Mutex<()>,
    /// Replicas a close stopped but could not finish (their state machine
    /// had not let go, or they were kept for a newer membership and could
    /// not be opened again): neither opened nor deleted until the node
    /// restarts, which opens or deletes them by their record.
    closes_unfinished: std::sync::Mutex<BTreeSet<ShardId>>,
    /// Each peer's last ping answer.
    peer_answers: std::sync::Mutex<BTreeMap<u64, PeerAnswer>>,
    /// When each peer's last ping reached this node.
    pinged_by: std::sync::Mutex<HashMap<u64, std::time::Instant>>,
    /// This node's clock is off from its peers' or may be (set each chore
    /// tick): its replicas would judge what has expired by a wrong time.
    clock_suspect: std::sync::atomic::AtomicBool,
    /// When the replicas were last checked for a Raft stopped on an error,
    /// and what was found (every peer's ping asks; a node may host
    /// thousands of replicas).
    stopped_replica: std::sync::Mutex<Option<(std::time::Instant, Option<String>)>>,
}

/// What a peer's last ping answer said.
#[derive(Debug, Clone, Copy)]
pub struct PeerAnswer {
    /// When it came.
    pub at: std::time::Instant,
    /// The newest apply rules the peer knows.
    pub rules: u32,
    /// Its clock (none from a binary without the clock check).
    pub clock: Option<clock::ClockSample>,
}

/// What a node remembers about a shard beyond the placement: a replica
/// opened by `chatctl` (never bootstrapped by this node) or one removed
/// (never reopened, even if the placement names this node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplicaRecord {
    Joined,
    Removed,
}

fn replica_key(shard: ShardId) -> String {
    format!("replica/{}", shard.0)
}

const DRAINING_KEY: &str = "draining";

/// Longest removing a replica waits for its state machine's last command
/// (a snapshot load) before it gives up deleting the data now (within the
/// 60 s chatctl gives an admin call).
const STATE_MACHINE_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A replica asked to close learned, while it stopped, a membership newer
/// than the one its closing was checked against: it may have been added
/// again, so its data stays and it was opened again (or is at the node's
/// next start).
#[derive(Debug, thiserror::Error)]
#[error("{shard} learned its membership at log index {known} while stopping, newer than the one checked at {checked}: it may have been added again; its copy stays{}", if *reopened { " and is open again" } else { " and opens again when the node restarts" })]
pub struct KeptCopy {
    shard: ShardId,
    known: u64,
    checked: u64,
    reopened: bool,
}

/// The newest apply rules all of `nodes` know: this binary's for `me`, what
/// each peer last said in `known`, 0 for a peer not heard from.
fn rules_known_by(
    me: u64,
    known: &BTreeMap<u64, u32>,
    nodes: impl IntoIterator<Item = u64>,
) -> u32 {
    nodes
        .into_iter()
        .map(|id| match id == me {
            true => crate::shard::apply::APPLY_RULES,
            false => known.get(&id).copied().unwrap_or(0),
        })
        .min()
        .unwrap_or(crate::shard::apply::APPLY_RULES)
}

impl Registry {
    pub fn get(&self, id: ShardId) -> Option<Arc<Shard>> {
        self.shards.read().expect("registry lock").get(&id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Shard>> {
        self.shards
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.host.config
    }

    pub fn node_id(&self) -> NodeId {
        self.host.id
    }

    /// The address peers and routers reach this node at.
    pub fn addr(&self) -> &str {
        &self.host.addr
    }

    pub fn region(&self) -> &str {
        &self.host.region
    }

    pub fn placement(&self) -> &Placement {
        &self.host.placement
    }

    /// This node's connections to its peers.
    pub fn peers(&self) -> &Peers {
        &self.host.peers
    }

    /// Records the last ping answer of `peer`.
    pub fn note_peer_answer(&self, peer: u64, answer: PeerAnswer) {
        self.host
            .peer_answers
            .lock()
            .expect("peer answers lock")
            .insert(peer, answer);
    }

    /// Records that a ping from `peer` reached this node.
    pub fn note_pinged_by(&self, peer: u64) {
        self.host
            .pinged_by
            .lock()
            .expect("pinged-by lock")
            .insert(peer, std::time::Instant::now());
    }

    /// Whether `leader`, the leader of a quiet shard here, is alive: it
    /// pinged this node within `within`, so it can still reach this node
    /// (a node pings only while it is fit to lead). Whether this node can
    /// reach it does not matter: a leader that cannot send to its followers
    /// cannot lead them, one they cannot send to still can. A leader that
    /// never pinged this node (since this node started, or since it joined)
    /// counts as alive while it answers this node's pings (`answered`).
    pub fn leader_alive(&self, leader: u64, within: std::time::Duration, answered: bool) -> bool {
        match self
            .host
            .pinged_by
            .lock()
            .expect("pinged-by lock")
            .get(&leader)
        {
            Some(at) => at.elapsed() < within,
            None => answered,
        }
    }

    /// The longest election timeout.
    pub fn election_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.host.config.raft.election_timeout_ms_max)
    }

    /// `peer` answered a ping within an election timeout (the longest):
    /// alive, as far as this node can tell.
    pub fn answered_lately(&self, peer: u64) -> bool {
        let within = self.election_timeout();
        self.host
            .peer_answers
            .lock()
            .expect("peer answers lock")
            .get(&peer)
            .is_some_and(|a| a.at.elapsed() < within)
    }

    /// Why this node cannot lead, if it cannot: its storage refuses writes
    /// (a write or fsync failed), or a replica's Raft stopped on an error.
    /// Peers then treat it as down (its pings fail), so the quiet shards it
    /// leads wake and elect another leader, and none is handed to it.
    pub fn unfit_to_lead(&self) -> Option<String> {
        if let Some(why) = storage_unfit(&self.storage) {
            return Some(why);
        }
        let mut checked = self.host.stopped_replica.lock().expect("stopped replica");
        if let Some((at, found)) = checked.as_ref() {
            if at.elapsed() < STOPPED_REPLICA_CHECK_EVERY {
                return found.clone();
            }
        }
        let found = self.all().iter().find_map(|shard| {
            match &shard.raft.metrics().borrow_watched().running_state {
                Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
                Err(e) => Some(format!("shard {}'s Raft stopped: {e}", shard.id)),
            }
        });
        *checked = Some((std::time::Instant::now(), found.clone()));
        found
    }

    /// Whether this node's clock is off from its peers' or may be (as the
    /// last chore tick saw it).
    pub fn clock_suspect(&self) -> bool {
        self.host
            .clock_suspect
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_clock_suspect(&self, suspect: bool) {
        self.host
            .clock_suspect
            .store(suspect, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whose clocks are off, this node's included, as the pings show.
    pub fn clock_report(&self) -> clock::ClockReport {
        let answers = self.host.peer_answers.lock().expect("peer answers lock");
        clock::report(
            answers
                .iter()
                .filter_map(|(id, a)| Some((*id, a.at, a.clock?))),
        )
    }

    /// The newest apply rules every node in `nodes` knows: this binary's
    /// for this node, 0 for a peer that has not answered a ping.
    pub fn rules_known_by(&self, nodes: impl IntoIterator<Item = u64>) -> u32 {
        let answers = self.host.peer_answers.lock().expect("peer answers lock");
        let known = answers.iter().map(|(id, a)| (*id, a.rules)).collect();
        rules_known_by(self.host.id.0, &known, nodes)
    }

    pub fn is_draining(&self) -> bool {
        matches!(self.host.node_tree.get(DRAINING_KEY), Ok(Some(_)))
    }

    pub async fn set_draining(&self, draining: bool) -> anyhow::Result<()> {
        if draining {
            self.host.node_tree.insert(DRAINING_KEY, &[1u8])?;
        } else {
            self.host.node_tree.remove(DRAINING_KEY)?;
        }
        self.sync_node_tree().await
    }

    fn record(&self, shard: ShardId) -> anyhow::Result<Option<ReplicaRecord>> {
        Ok(
            match self.host.node_tree.get(replica_key(shard))?.as_deref() {
                Some(b"joined") => Some(ReplicaRecord::Joined),
                Some(b"removed") => Some(ReplicaRecord::Removed),
                Some(other) => anyhow::bail!(
                    "unknown replica record {:?} for {shard}",
                    String::from_utf8_lossy(other)
                ),
                None => None,
            },
        )
    }

    async fn set_record(&self, shard: ShardId, record: ReplicaRecord) -> anyhow::Result<()> {
        let value: &[u8] = match record {
            ReplicaRecord::Joined => b"joined",
            ReplicaRecord::Removed => b"removed",
        };
        self.host.node_tree.insert(replica_key(shard), value)?;
        self.sync_node_tree().await
    }

    /// Puts the node tree on disk. sled's own flush only writes (no fsync on
    /// Linux), and a replica record must outlive a power cut: a "removed"
    /// lost after the replica's log was dropped would reopen it empty.
    async fn sync_node_tree(&self) -> anyhow::Result<()> {
        self.host.node_tree.flush_async().await?;
        self.storage.durability().sync().await?;
        Ok(())
    }

    /// Opens this node's replica of `shard` (its data, if any, and its Raft
    /// group) and adds it to the registry.
    async fn open_shard(&self, shard: ShardId) -> anyhow::Result<Arc<Shard>> {
        let host = &self.host;
        let rank = host
            .placement
            .failover_rank(shard, host.id, &host.config.latency);
        let band = election_band(&host.config.raft, rank);
        let raft = raft_config(&host.config.cluster_name, &host.config.raft, band)?;
        let opened = Shard::open(&self.storage, host.peers.clone(), shard, raft)
            .await
            .with_context(|| format!("open {shard}"))?;
        let opened = Arc::new(opened);
        self.shards
            .write()
            .expect("registry lock")
            .insert(shard, opened.clone());
        Ok(opened)
    }

    /// Hosts an empty replica of `shard` that the shard's leader can add as
    /// a learner. Returns the existing replica if there is one.
    pub async fn open_replica(&self, shard: ShardId) -> anyhow::Result<Arc<Shard>> {
        let _one = self.host.changes.lock().await;
        if shard.0 >= self.host.placement.shard_count() {
            anyhow::bail!(
                "the cluster has {} shards; there is no {shard}",
                self.host.placement.shard_count()
            );
        }
        if let Some(existing) = self.get(shard) {
            return Ok(existing);
        }
        if self
            .host
            .closes_unfinished
            .lock()
            .expect("unfinished closes")
            .contains(&shard)
        {
            anyhow::bail!(
                "{shard}'s replica on this node was stopped with its data kept (its state machine \
                 was still busy, or it had been added again); restart the node, which opens or \
                 deletes it by its record"
            );
        }
        // Leftovers of an earlier replica that was removed.
        crate::storage::blocking(|| self.delete_data(shard))?;
        self.set_record(shard, ReplicaRecord::Joined).await?;
        tracing::info!(shard = %shard, "opening a new replica");
        self.open_shard(shard).await
    }

    /// Stops this node's replica of `shard` and deletes its data. Returns
    /// false if there was none. With `checked`, the log index of a
    /// membership (the leader's) that lists no replica here: if the replica
    /// has learned a newer one by the time it has stopped (it was being
    /// added again), its data stays and it is opened again (at the node's
    /// next start if its state machine does not let go in time); the error
    /// is a [`KeptCopy`].
    pub async fn close_replica(
        &self,
        shard: ShardId,
        checked: Option<u64>,
    ) -> anyhow::Result<bool> {
        let _one = self.host.changes.lock().await;
        let Some(replica) = self.get(shard) else {
            return Ok(false);
        };
        self.shards.write().expect("registry lock").remove(&shard);
        replica.shutdown().await;
        let unfinished = || {
            self.host
                .closes_unfinished
                .lock()
                .expect("unfinished closes")
                .insert(shard);
        };
        // Stopped, it learns nothing more: what it knows now decides, its
        // log included (an entry appended just before it stopped may not
        // be in its last metrics yet).
        let mut known = replica
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .log_id()
            .as_ref()
            .map_or(0, |l| l.index);
        if let Some(checked) = checked {
            match crate::storage::blocking(|| replica.files.log.membership_after(checked)) {
                Ok(logged) => known = known.max(logged.unwrap_or(0)),
                Err(e) => {
                    unfinished();
                    return Err(e.into());
                }
            }
        }
        if let Some(checked) = checked.filter(|c| known > *c) {
            let reopened = replica.state_machine_stopped(STATE_MACHINE_STOP_WAIT).await;
            drop(replica);
            if !reopened {
                unfinished();
            } else if let Err(e) = self.open_shard(shard).await {
                unfinished();
                return Err(e);
            }
            return Err(KeptCopy {
                shard,
                known,
                checked,
                reopened,
            }
            .into());
        }
        // The record before any data goes: a crash part-way leaves a
        // replica that is never reopened and whose data is deleted on the
        // next start.
        if let Err(e) = self.set_record(shard, ReplicaRecord::Removed).await {
            unfinished();
            return Err(e);
        }
        // The state machine's worker may still be finishing a command (a
        // snapshot load) that writes to the tree about to be dropped.
        if !replica.state_machine_stopped(STATE_MACHINE_STOP_WAIT).await {
            unfinished();
            anyhow::bail!(
                "{shard}: its state machine is still busy {}s after the replica stopped; its data is deleted on the node's next start",
                STATE_MACHINE_STOP_WAIT.as_secs()
            );
        }
        drop(replica);
        crate::storage::blocking(|| self.delete_data(shard))?;
        tracing::info!(shard = %shard, "replica closed and its data deleted");
        Ok(true)
    }

    /// Deletes a replica's trees and snapshot files (with their keys).
    fn delete_data(&self, shard: ShardId) -> anyhow::Result<()> {
        self.storage.raft_log().drop_shard(shard.0)?;
        let db = self.storage.db();
        // A log tree is left only by a version that kept logs in sled.
        db.drop_tree(trees::log_tree(shard))?;
        db.drop_tree(trees::state_tree(shard))?;
        let dir = self.storage.snapshot_dir(shard);
        // Snapshot keys are destroyed (overwritten, then removed), not only
        // unlinked: unlinked bytes stay readable on the disk.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "key") {
                    crate::storage::seal::destroy_key_file(&path)
                        .with_context(|| format!("destroy {}", path.display()))?;
                }
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            // Removed by an earlier try, whose sync below may not have run.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", dir.display())),
        }
        // Made durable before the replica's record moves on: after a power
        // cut, an old snapshot (its key destroyed) must not come back.
        if let Some(parent) = dir.parent() {
            crate::shard::snapshot::sync_dir(parent)
                .with_context(|| format!("sync {}", parent.display()))?;
        }
        Ok(())
    }
}

/// A running node.
pub struct Node {
    pub id: NodeId,
    pub region: String,
    pub addr: SocketAddr,
    pub registry: Registry,
    shutdown: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
    duties: Option<JoinHandle<()>>,
    eraser: Option<JoinHandle<()>>,
    liveness: Option<JoinHandle<()>>,
}

impl Node {
    /// Opens the node's data, opens its shards, and starts serving.
    pub async fn start(config: &ClusterConfig, id: NodeId) -> anyhow::Result<Node> {
        Node::start_with(config, id, BTreeMap::new()).await
    }

    /// Like [`Node::start`], reaching the peers in `peer_addrs` at the given
    /// addresses instead of their configured ones.
    pub async fn start_with(
        config: &ClusterConfig,
        id: NodeId,
        peer_addrs: BTreeMap<u64, String>,
    ) -> anyhow::Result<Node> {
        let me = config
            .node(id)
            .with_context(|| format!("node {} is not in the cluster config", id.0))?
            .clone();
        let dir = config.data_dir(id);
        let seal_epoch = std::time::Duration::from_secs(config.erasure.seal_epoch_secs);
        let message_cache = (config.cache.message_mib as usize).saturating_mul(1 << 20);
        // What can fail on its own is checked before the data folder is
        // made or stamped: a start that fails changes nothing on disk.
        let tls = crate::security::Tls::for_node(config, id.0)
            .with_context(|| format!("TLS files of node {}", id.0))?;
        let tokens = crate::security::Tokens::load(config).context("token files")?;
        let listener = TcpListener::bind(&me.raft_addr)
            .await
            .with_context(|| format!("listen on {}", me.raft_addr))?;
        let addr = listener.local_addr()?;
        // A folder that is missing, or empty (a volume mounted anew), is new.
        let new = std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none());
        if new {
            check_not_forgotten(config, id, &peer_addrs, tls.as_ref()).await?;
        }
        let storage = Storage::open_with(&dir, seal_epoch, message_cache)
            .with_context(|| format!("open data folder {}", dir.display()))?;
        check_identity(&storage, config, id)?;

        let placement = Placement::new(config);
        let majorities = placement.regional_majorities();
        if let Some((shard, region, count)) = majorities.first() {
            tracing::warn!(
                shards = majorities.len(),
                "{} shard(s) place most of their replicas in one region (shard {shard}: {count} \
                 in {region}); losing that region stops them. Add bootstrap nodes in other \
                 regions",
                majorities.len()
            );
        }
        if let Some(tls) = &tls {
            tls.watch();
        }
        tokens.watch();
        let peers = Peers::new(
            id,
            &me.region,
            LinkDelays::from_config(config),
            peer_addrs,
            tls.clone(),
        );
        let registry = Registry {
            shards: Arc::default(),
            storage: storage.clone(),
            host: Arc::new(Host {
                config: config.clone(),
                id,
                addr: me.advertised().to_string(),
                region: me.region.clone(),
                placement: placement.clone(),
                peers,
                node_tree: storage.open_tree(trees::NODE_TREE)?,
                changes: tokio::sync::Mutex::new(()),
                closes_unfinished: Default::default(),
                peer_answers: Default::default(),
                pinged_by: Default::default(),
                clock_suspect: Default::default(),
                stopped_replica: Default::default(),
            }),
        };
        // The shards this node hosts: its initial replicas, plus those moved
        // here, minus those moved away.
        let initial: Vec<ShardId> = if me.bootstrap {
            placement.shards_on(id)
        } else {
            Vec::new()
        };
        // What the other placement scheme gives this node, to say so when
        // the config names the wrong one for its data folder.
        let other_version = if config.placement_version == 1 { 2 } else { 1 };
        let other_scheme: Vec<ShardId> = if me.bootstrap {
            let mut other = config.clone();
            other.placement_version = other_version;
            Placement::new(&other).shards_on(id)
        } else {
            initial.clone()
        };
        check_initial_shards(&storage, &initial, (other_version, &other_scheme))?;
        // The stamps on disk before any vote or entry is: a folder with
        // votes but no identity would take any id next time.
        storage.open_tree(trees::NODE_TREE)?.flush_async().await?;
        storage.durability().sync().await?;
        let mut to_bootstrap = Vec::new();
        for shard_id in config.shard_ids() {
            let record = registry.record(shard_id)?;
            match record {
                Some(ReplicaRecord::Removed) => {
                    // Finishes a close cut short by a crash.
                    registry.delete_data(shard_id)?;
                    continue;
                }
                Some(ReplicaRecord::Joined) => {}
                None if initial.contains(&shard_id) => {
                    if placement.replicas(shard_id).first() == Some(&id) {
                        to_bootstrap.push(shard_id);
                    }
                }
                None => continue,
            }
            registry.open_shard(shard_id).await?;
        }

        let (shutdown, shutdown_rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            registry.clone(),
            Security { tls, tokens },
            shutdown_rx.clone(),
        ));

        // Bootstrap: the preferred-region replica creates each new shard. A
        // replica opened by chatctl or removed is never bootstrapped here.
        for shard_id in to_bootstrap {
            let replicas = placement.replicas(shard_id);
            let shard = registry.get(shard_id).expect("opened above");
            if shard.raft.is_initialized().await? {
                continue;
            }
            let members: BTreeMap<u64, NodeAddr> = replicas
                .iter()
                .map(|n| {
                    let nc = config.node(*n).expect("placement uses configured nodes");
                    (
                        n.0,
                        NodeAddr {
                            addr: nc.advertised().to_string(),
                            region: nc.region.clone(),
                        },
                    )
                })
                .collect();
            tracing::info!(shard = %shard_id, members = ?members.keys().collect::<BTreeSet<_>>(), "initializing shard");
            if let Err(e) = shard.raft.initialize(members).await {
                tracing::warn!(shard = %shard_id, error = %e, "initialize shard");
            }
        }

        let ctx = duties::Context {
            region: me.region.clone(),
            preferred: config
                .shard_ids()
                .map(|s| (s, placement.preferred_region(s).to_string()))
                .collect(),
            // Long enough that a restarting node is caught up and stable.
            return_after: std::time::Duration::from_millis(config.raft.election_timeout_ms_max * 5),
            quiesce_after: std::time::Duration::from_millis(config.raft.quiesce_after_ms),
            election_timeout: std::time::Duration::from_millis(config.raft.election_timeout_ms_max),
            bootstrap_settings: config.retention.shard_settings(),
        };
        let liveness = tokio::spawn(quiesce::run_liveness(
            registry.clone(),
            std::time::Duration::from_millis(config.raft.heartbeat_ms),
            std::time::Duration::from_millis(config.raft.election_timeout_ms_max),
            shutdown_rx.clone(),
        ));
        let duties = tokio::spawn(duties::run(registry.clone(), ctx, shutdown_rx.clone()));
        let eraser = tokio::spawn(erasure::run(registry.clone(), shutdown_rx));
        tracing::info!(node = id.0, %addr, shards = registry.all().len(), "node started");
        Ok(Node {
            id,
            region: me.region,
            addr,
            registry,
            shutdown,
            server: Some(server),
            duties: Some(duties),
            eraser: Some(eraser),
            liveness: Some(liveness),
        })
    }

    /// Stops serving, shuts every shard down and syncs the Db.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(mut s) = self.server.take() {
            // Streams end on the flag; a call that does not (a snapshot
            // still arriving) must not keep the shards this node leads
            // unreachable while it lasts.
            if tokio::time::timeout(SERVER_STOP_WAIT, &mut s)
                .await
                .is_err()
            {
                tracing::warn!(
                    "calls still open {SERVER_STOP_WAIT:?} after the stop began; stopping the \
                     shards under them (the process exits after)"
                );
                s.abort();
            }
        }
        if let Some(d) = self.duties.take() {
            let _ = d.await;
        }
        if let Some(e) = self.eraser.take() {
            let _ = e.await;
        }
        if let Some(l) = self.liveness.take() {
            let _ = l.await;
        }
        let shards = self.registry.all();
        futures::future::join_all(shards.iter().map(|shard| shard.shutdown())).await;
        if let Err(e) = self.registry.storage().durability().sync().await {
            tracing::error!(error = %e, "final sync");
        }
        tracing::info!(node = self.id.0, "node stopped");
    }
}

/// Longest a stopping node waits for the calls it is serving to end.
const SERVER_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a node starting on a new data folder waits for each peer's
/// status (peers that do not answer are passed over).
const FRESH_START_ASK: std::time::Duration = std::time::Duration::from_secs(2);

/// Refuses to start node `id` on a new data folder when a running peer
/// leads a shard and counts this node as holding part of its log: the node
/// lost what it acknowledged (a wiped disk, a volume made anew), and rejoining
/// under its old id could lose acknowledged writes or let it vote twice in
/// a term. Peers that do not answer, and leaders that have not heard from
/// this node since they were elected, cannot tell, so this catches the
/// common case, not every one.
async fn check_not_forgotten(
    config: &ClusterConfig,
    id: NodeId,
    peer_addrs: &BTreeMap<u64, String>,
    tls: Option<&crate::security::Tls>,
) -> anyhow::Result<()> {
    use crate::api::pb::node::node_api_client::NodeApiClient;
    let asks = config.nodes.iter().filter(|n| n.id != id.0).map(|n| {
        let addr = peer_addrs.get(&n.id).unwrap_or(&n.raft_addr).clone();
        async move {
            let endpoint = crate::security::endpoint(&addr)
                .ok()?
                .connect_timeout(FRESH_START_ASK)
                .timeout(FRESH_START_ASK);
            let channel = crate::security::connect(endpoint, tls, crate::security::ANY_NODE_NAME)
                .await
                .ok()?;
            let status = tokio::time::timeout(
                FRESH_START_ASK,
                NodeApiClient::new(channel).status(pb::node::StatusRequest {}),
            )
            .await
            .ok()?
            .ok()?;
            Some(status.into_inner())
        }
    });
    for peer in futures::future::join_all(asks).await.into_iter().flatten() {
        for shard in peer.shards.iter().filter(|s| s.is_leader) {
            if let Some(p) = shard
                .progress
                .iter()
                .find(|p| p.node_id == id.0 && p.matched_index > 0)
            {
                anyhow::bail!(
                    "this node's data folder {} is new, but node {} (leader of shard {}) counts \
                     node {} as holding that shard's log up to index {}: the node lost what it \
                     acknowledged, and rejoining under its old id could lose acknowledged writes. \
                     Start it under a new id instead (docs/deploy.md, \"Replacing a dead node\")",
                    config.data_dir(id).display(),
                    peer.node_id,
                    shard.shard_id,
                    id.0,
                    p.matched_index
                );
            }
        }
    }
    Ok(())
}

/// Refuses to open a data folder that belongs to another node or cluster.
fn check_identity(storage: &Storage, config: &ClusterConfig, id: NodeId) -> anyhow::Result<()> {
    let tree = storage.open_tree(trees::NODE_TREE)?;
    let want = format!("{}/{}", config.cluster_name, id.0);
    match tree.get("identity")? {
        Some(v) if v.as_ref() == want.as_bytes() => Ok(()),
        Some(v) => anyhow::bail!(
            "data folder {} belongs to {:?}, not {want:?}; refusing to start",
            storage.dir().display(),
            String::from_utf8_lossy(&v)
        ),
        None => {
            tree.insert("identity", want.as_bytes())?;
            Ok(())
        }
    }
}

/// Refuses to start if this node's initial replicas, as the config places
/// them, differ from those it started with. They are worked out from the
/// config's bootstrap nodes, regions, preferred regions, shard count and
/// replication factor on every start, and replicas without a record are
/// opened only if they are among them: with another list the node would
/// leave replicas it holds closed and open empty ones it does not.
fn check_initial_shards(
    storage: &Storage,
    initial: &[ShardId],
    (other_version, other_scheme): (u32, &[ShardId]),
) -> anyhow::Result<()> {
    let tree = storage.open_tree(trees::NODE_TREE)?;
    let joined = |shards: &[ShardId]| {
        shards
            .iter()
            .map(|s| s.0.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let want = joined(initial);
    match tree.get("initial-shards")? {
        Some(v) if v.as_ref() == want.as_bytes() => Ok(()),
        Some(v) if v.as_ref() == joined(other_scheme).as_bytes() => anyhow::bail!(
            "this node's data folder {} was created with placement_version = {other_version}: \
             set that in the cluster config (on every node and router) and start again",
            storage.dir().display()
        ),
        Some(v) => anyhow::bail!(
            "the config places this node's initial replicas on shards [{want}], but its data \
             folder {} started with [{}]: the bootstrap nodes, regions, preferred regions, \
             shard count or replication factor changed. They must stay as the cluster was \
             created (a removed node keeps its [[nodes]] entry); restore them and start again",
            storage.dir().display(),
            String::from_utf8_lossy(&v)
        ),
        None => {
            tree.insert("initial-shards", want.as_bytes())?;
            Ok(())
        }
    }
}

/// Concurrent HTTP/2 streams (and requests) per connection to a node: its
/// peers multiplex every shard's Raft traffic over one connection.
const NODE_STREAMS_PER_CONNECTION_MAX: u32 = 4_096;

/// A node's TLS and the tokens it accepts.
struct Security {
    tls: Option<crate::security::Tls>,
    tokens: crate::security::Tokens,
}

async fn serve(
    listener: TcpListener,
    registry: Registry,
    security: Security,
    mut shutdown: watch::Receiver<bool>,
) {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::passthrough::node::node_api_server::NodeApiServer<api::NodeApiService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor set is valid");
    let transport =
        pb::raft::raft_transport_server::RaftTransportServer::new(transport::TransportService {
            registry: registry.clone(),
            tls: security.tls.is_some(),
            shutdown: shutdown.clone(),
        })
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
    let node_api =
        pb::passthrough::node::node_api_server::NodeApiServer::new(api::NodeApiService {
            registry: registry.clone(),
            node_id: registry.node_id(),
            operator: crate::security::Operator {
                tokens: security.tokens.clone(),
                tls: security.tls.is_some(),
            },
            shutdown: shutdown.clone(),
        })
        .max_decoding_message_size(api::NODE_API_MESSAGE_BYTES_MAX);
    let operator = crate::security::Operator {
        tokens: security.tokens.clone(),
        tls: security.tls.is_some(),
    };
    let admin_api = pb::node::admin_server::AdminServer::with_interceptor(
        admin::AdminService {
            registry: registry.clone(),
        },
        move |request: tonic::Request<()>| {
            operator.check(&request)?;
            Ok(request)
        },
    );
    // The builder's tcp_nodelay only reaches listeners tonic binds itself;
    // accepted sockets get it here, or Nagle holds back small replies.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let routes = crate::api::http2::server(tonic::transport::Server::builder())
        // Limits per connection: concurrent streams and in-flight requests.
        .max_concurrent_streams(Some(NODE_STREAMS_PER_CONNECTION_MAX))
        .concurrency_limit_per_connection(NODE_STREAMS_PER_CONNECTION_MAX as usize)
        .add_service(health)
        .add_service(reflection)
        .add_service(transport)
        .add_service(node_api)
        .add_service(admin_api);
    let stopped = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    let result = match &security.tls {
        Some(tls) => match tls.incoming(crate::security::ClientAuth::Required, incoming) {
            Ok(incoming) => routes.serve_with_incoming_shutdown(incoming, stopped).await,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "node TLS configuration");
                return;
            }
        },
        None => routes.serve_with_incoming_shutdown(incoming, stopped).await,
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "node server stopped");
    }
}

/// How often [`Registry::unfit_to_lead`] looks over the replicas again.
const STOPPED_REPLICA_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Why `storage` takes no more writes, if it does not.
fn storage_unfit(storage: &Storage) -> Option<String> {
    if storage.raft_log().is_poisoned() || storage.durability().is_poisoned() {
        return Some("its storage refuses writes after a failed write or fsync".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::rules_known_by;
    use crate::shard::apply::APPLY_RULES;

    /// A shard's members know the newest rules only once every peer among
    /// them has said so; a peer not heard from, or on an older binary
    /// (which answers pings without the field), holds them back.
    #[test]
    fn the_rules_all_members_know_are_the_oldest_any_of_them_knows() {
        let mut known = BTreeMap::new();
        assert_eq!(rules_known_by(1, &known, [1]), APPLY_RULES);
        assert_eq!(rules_known_by(1, &known, [1, 2, 3]), 0, "not heard from");
        known.insert(2, APPLY_RULES);
        assert_eq!(rules_known_by(1, &known, [1, 2, 3]), 0);
        known.insert(3, 0);
        assert_eq!(rules_known_by(1, &known, [1, 2, 3]), 0, "an older binary");
        known.insert(3, APPLY_RULES);
        assert_eq!(rules_known_by(1, &known, [1, 2, 3]), APPLY_RULES);
        assert_eq!(rules_known_by(1, &known, [1, 2, 4]), 0, "a new member");
    }

    /// A node whose Raft log refuses writes says it cannot lead.
    #[test]
    fn storage_that_refuses_writes_is_unfit_to_lead() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::Storage::open(dir.path()).unwrap();
        assert_eq!(super::storage_unfit(&storage), None);
        storage.raft_log().poison();
        let why = super::storage_unfit(&storage).expect("unfit");
        assert!(why.contains("refuses writes"), "{why}");
    }

    /// A data folder remembers the initial replicas it started with; a
    /// config that places others is refused, the same one accepted.
    #[test]
    fn a_changed_initial_placement_is_refused() {
        use crate::types::ShardId;
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::Storage::open(dir.path()).unwrap();
        let first = [ShardId(0), ShardId(3)];
        super::check_initial_shards(&storage, &first, (2, &first)).unwrap();
        super::check_initial_shards(&storage, &first, (2, &first)).unwrap();
        let err =
            super::check_initial_shards(&storage, &[ShardId(0), ShardId(2)], (2, &[])).unwrap_err();
        assert!(err.to_string().contains("started with [0,3]"), "{err}");
        // A folder from the other placement scheme is told how to start.
        let err = super::check_initial_shards(&storage, &[ShardId(1)], (1, &first)).unwrap_err();
        assert!(err.to_string().contains("placement_version = 1"), "{err}");
    }
}
