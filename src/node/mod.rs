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

pub mod api;
pub mod duties;
pub mod erasure;
pub mod transport;

use std::collections::{BTreeMap, BTreeSet};
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

/// The shards a node hosts.
#[derive(Clone)]
pub struct Registry {
    shards: Arc<RwLock<BTreeMap<ShardId, Arc<Shard>>>>,
    storage: Storage,
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
        let storage = Storage::open_with_epoch(&dir, seal_epoch)
            .with_context(|| format!("open data folder {}", dir.display()))?;
        check_identity(&storage, config, id)?;

        let listener = TcpListener::bind(&me.raft_addr)
            .await
            .with_context(|| format!("listen on {}", me.raft_addr))?;
        let addr = listener.local_addr()?;

        let placement = Placement::new(config);
        let peers = Peers::new(id, &me.region, LinkDelays::from_config(config), peer_addrs);
        let mut shards = BTreeMap::new();
        for shard_id in placement.shards_on(id) {
            let order = placement.failover_order(shard_id, &config.latency);
            let rank = order.iter().position(|n| *n == id).unwrap_or(order.len());
            let band = election_band(&config.raft, rank);
            let raft = raft_config(&config.cluster_name, &config.raft, band)?;
            let shard = Shard::open(&storage, peers.clone(), shard_id, raft)
                .await
                .with_context(|| format!("open {shard_id}"))?;
            shards.insert(shard_id, Arc::new(shard));
        }
        let registry = Registry {
            shards: Arc::new(RwLock::new(shards)),
            storage: storage.clone(),
        };

        let (shutdown, shutdown_rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            registry.clone(),
            id,
            me.region.clone(),
            shutdown_rx.clone(),
        ));

        // Bootstrap: the preferred-region replica creates each new shard.
        for shard_id in placement.shards_on(id) {
            let replicas = placement.replicas(shard_id);
            if replicas.first() != Some(&id) {
                continue;
            }
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
        };
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
        })
    }

    /// Stops serving, shuts every shard down and syncs the Db.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
        if let Some(d) = self.duties.take() {
            let _ = d.await;
        }
        if let Some(e) = self.eraser.take() {
            let _ = e.await;
        }
        for shard in self.registry.all() {
            shard.shutdown().await;
        }
        if let Err(e) = self.registry.storage().durability().sync().await {
            tracing::error!(error = %e, "final sync");
        }
        tracing::info!(node = self.id.0, "node stopped");
    }
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

async fn serve(
    listener: TcpListener,
    registry: Registry,
    id: NodeId,
    region: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::node::node_api_server::NodeApiServer<api::NodeApiService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor set is valid");
    let transport =
        pb::raft::raft_transport_server::RaftTransportServer::new(transport::TransportService {
            registry: registry.clone(),
        })
        .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
    let node_api = pb::node::node_api_server::NodeApiServer::new(api::NodeApiService {
        registry,
        node_id: id,
        region,
    })
    .max_decoding_message_size(api::NODE_API_MESSAGE_BYTES_MAX);
    // The builder's tcp_nodelay only reaches listeners tonic binds itself;
    // accepted sockets get it here, or Nagle holds back small replies.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let result = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(transport)
        .add_service(node_api)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "node server stopped");
    }
}
