//! The router: chatstore's stateless front tier.
//!
//! ```text
//!  frontend ──gRPC (chatstore.v1)──▶ service ─ validate ─▶ Router
//!                                                           │ chat → slot → shard (placement)
//!        writes ──▶ shard leader (cache fed by status polls and NotLeader hints),
//!                   bounded retries with backoff; a retried send keeps its
//!                   client_msg_id, so it is never stored twice
//!        reads  ──▶ SESSION: a replica in this region that has applied the
//!                   caller's token; else the leader. LINEARIZABLE: leader
//!                   read-index. STALE: nearest replica.
//! ```
//!
//! The router holds no data; its only state is the cluster map it caches:
//! each shard's leader and voters, and each node's address. It starts from
//! the config's placement and follows membership changes made by `chatctl`
//! through node status polls and leader hints.

pub mod batcher;
pub mod service;
pub mod token;
pub mod validate;
pub mod watch;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tonic::{Code, Status};

use crate::api::pb::node::{read_request::Query, EncodedReadReply, ReadRequest, StatusRequest};
use crate::api::pb::replicated::{command_result, Command, CommandResult, ErrorCode};
use crate::api::pb::Consistency;
use crate::api::read_stream::ReadMux;
use crate::api::status::leader_hint;
use crate::api::write_stream::WriteMux;
use crate::api::RouterNodeClient;
use crate::cluster::latency::{Delayed, LinkDelays};
use crate::cluster::{ClusterConfig, Placement};
use crate::router::token::{ShardPosition, TokenKeys};
use crate::security::{node_name, Tls, Tokens};
use crate::types::{ChatId, ShardId};
use anyhow::Context;

/// How long a write may keep retrying across leader changes.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// How long one call to a node may take.
pub const NODE_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a SESSION read waits on a local replica for the caller's token
/// before trying the leader.
pub const SESSION_LOCAL_WAIT_MS: u32 = 1_000;
/// How long the leader may wait for its own apply to reach a token.
pub const SESSION_LEADER_WAIT_MS: u32 = 3_000;
/// How often leaders are refreshed from node status.
const LEADER_REFRESH: Duration = Duration::from_secs(2);

/// A node API client, delayed by the simulated distance to the node's
/// region (no delay unless latency is simulated). Read replies come with
/// their messages encoded ([`crate::api::read_stream`]).
type NodeClient = RouterNodeClient;

/// How a router reaches one node. Cheap to clone.
#[derive(Clone)]
pub(crate) struct NodeEntry {
    region: String,
    client: NodeClient,
    /// SESSION and STALE reads go on one stream per node.
    reads: ReadMux,
    /// Writes (each a shard's batch) go on one stream per node.
    pub(crate) writes: WriteMux,
}

/// A lazily connected client of the node at `addr` in `node_region`, seen
/// from a router in `region`.
fn node_entry(
    delays: &LinkDelays,
    tls: Option<&Tls>,
    region: &str,
    node: u64,
    addr: &str,
    node_region: &str,
) -> anyhow::Result<NodeEntry> {
    let endpoint = crate::api::http2::endpoint(crate::security::endpoint(addr)?)
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    let channel = crate::security::channel(endpoint, tls, &node_name(node))?;
    let one_way = delays.one_way(region, node_region);
    // A node's reply batch is bounded in bytes (pages by the node's page
    // limit, batches by the mux), not by tonic's 4 MiB default.
    let client = NodeClient::new(Delayed::new(channel, one_way))
        .max_decoding_message_size(crate::node::api::NODE_API_MESSAGE_BYTES_MAX);
    Ok(NodeEntry {
        region: node_region.to_string(),
        reads: ReadMux::new(client.clone(), node, one_way),
        writes: WriteMux::new(client.clone(), node, one_way),
        client,
    })
}

/// Routes requests to shards. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    placement: Placement,
    /// Per-shard write queues (`batcher`).
    queues: batcher::Queues,
    region: String,
    keys: TokenKeys,
    /// The router's certificate and the cluster CA, when TLS is on.
    tls: Option<Tls>,
    tokens: Tokens,
    delays: LinkDelays,
    nodes: RwLock<BTreeMap<u64, NodeEntry>>,
    leaders: RwLock<BTreeMap<u64, u64>>,
    /// Each shard's voters, as the last status poll of its leader said.
    replicas: RwLock<BTreeMap<u64, Vec<u64>>>,
    /// Each shard's applied index on its leader, as the last status poll
    /// of the leader said.
    leader_applied: RwLock<BTreeMap<u64, u64>>,
    /// Nodes a call could not reach, until when they are passed over.
    unreachable_until: std::sync::Mutex<BTreeMap<u64, Instant>>,
}

/// The least time a try on a node is given, however little of its call's
/// deadline is left: a shorter one could not be answered.
const TRY_TIME_MIN: Duration = Duration::from_millis(100);

/// How long a node that could not be reached is passed over (its followers'
/// stale leader hints included) before it is tried again.
const UNREACHABLE_FOR: Duration = Duration::from_secs(1);

/// A write's outcome: the command's result and where it sits in the log.
pub struct Written {
    pub result: CommandResult,
    pub position: ShardPosition,
}

/// A read's answer and the position it reflects.
pub struct ReadAnswer {
    pub reply: EncodedReadReply,
    pub position: ShardPosition,
}

impl Router {
    pub fn new(
        config: &ClusterConfig,
        region: &str,
        token_secret: &[u8],
    ) -> anyhow::Result<Router> {
        Router::with_node_addrs(config, region, token_secret, &BTreeMap::new())
    }

    /// Like [`Router::new`], reaching the nodes in `node_addrs` at the given
    /// addresses (a test harness's fault-injecting proxies).
    pub fn with_node_addrs(
        config: &ClusterConfig,
        region: &str,
        token_secret: &[u8],
        node_addrs: &BTreeMap<u64, String>,
    ) -> anyhow::Result<Router> {
        if !config.regions.iter().any(|r| r == region) {
            anyhow::bail!(
                "region {region:?} is not in the cluster config (regions: {:?})",
                config.regions
            );
        }
        let delays = LinkDelays::from_config(config);
        let tls = Tls::for_router(config).context("router TLS files")?;
        if let Some(tls) = &tls {
            tls.watch();
        }
        let tokens = Tokens::load(config).context("token files")?;
        tokens.watch();
        let mut nodes = BTreeMap::new();
        for n in &config.nodes {
            let addr = node_addrs
                .get(&n.id)
                .map(String::as_str)
                .unwrap_or(n.advertised());
            nodes.insert(
                n.id,
                node_entry(&delays, tls.as_ref(), region, n.id, addr, &n.region)?,
            );
        }
        let placement = Placement::new(config);
        let replicas = config
            .shard_ids()
            .map(|s| (s.0, placement.replicas(s).iter().map(|n| n.0).collect()))
            .collect();
        // Until told otherwise, a shard's leader is its preferred replica.
        let leaders = config
            .shard_ids()
            .map(|s| (s.0, placement.replicas(s)[0].0))
            .collect();
        Ok(Router {
            inner: Arc::new(Inner {
                placement,
                region: region.to_string(),
                keys: TokenKeys::new(&config.cluster_name, token_secret),
                queues: Default::default(),
                tls,
                tokens,
                delays,
                nodes: RwLock::new(nodes),
                leaders: RwLock::new(leaders),
                replicas: RwLock::new(replicas),
                leader_applied: Default::default(),
                unreachable_until: Default::default(),
            }),
        })
    }

    pub fn keys(&self) -> &TokenKeys {
        &self.inner.keys
    }

    /// The tokens callers of the public API must present.
    pub fn tokens(&self) -> &Tokens {
        &self.inner.tokens
    }

    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// The shard `chat` lives in.
    pub fn shard_of(&self, chat: u64) -> ShardId {
        self.inner.placement.shard_of_chat(ChatId(chat))
    }

    fn node(&self, node: u64) -> Option<NodeEntry> {
        self.inner
            .nodes
            .read()
            .expect("node map")
            .get(&node)
            .cloned()
    }

    fn knows(&self, node: u64) -> bool {
        self.inner
            .nodes
            .read()
            .expect("node map")
            .contains_key(&node)
    }

    /// Adds a node learned from a membership or a leader hint. Nodes in the
    /// config keep their configured (or overridden) address.
    fn learn_node(&self, node: u64, addr: &str, region: &str) {
        if node == 0 || addr.is_empty() {
            return;
        }
        let known_region = self
            .inner
            .nodes
            .read()
            .expect("node map")
            .get(&node)
            .map(|e| e.region.clone());
        // A node first learned from a hint has no region until a
        // membership names it.
        if known_region.is_some_and(|r| !r.is_empty() || region.is_empty()) {
            return;
        }
        match node_entry(
            &self.inner.delays,
            self.inner.tls.as_ref(),
            &self.inner.region,
            node,
            addr,
            region,
        ) {
            Ok(entry) => {
                tracing::info!(node, addr, region, "learned a new node");
                self.inner
                    .nodes
                    .write()
                    .expect("node map")
                    .insert(node, entry);
            }
            Err(e) => tracing::warn!(node, addr, error = %e, "bad node address"),
        }
    }

    /// The applied index of `shard`'s leader at the last status poll (0
    /// before one).
    pub fn leader_applied(&self, shard: ShardId) -> u64 {
        self.inner
            .leader_applied
            .read()
            .expect("leader applied map")
            .get(&shard.0)
            .copied()
            .unwrap_or(0)
    }

    fn leader_guess(&self, shard: ShardId) -> u64 {
        self.inner
            .leaders
            .read()
            .expect("leader cache")
            .get(&shard.0)
            .copied()
            .unwrap_or(0)
    }

    fn set_leader(&self, shard: ShardId, node: u64) {
        if self.knows(node) {
            self.inner
                .leaders
                .write()
                .expect("leader cache")
                .insert(shard.0, node);
        }
    }

    /// Replicas of `shard`: those in this router's region first.
    fn replicas_near_first(&self, shard: ShardId) -> Vec<u64> {
        let mut all: Vec<u64> = self
            .inner
            .replicas
            .read()
            .expect("replica map")
            .get(&shard.0)
            .cloned()
            .unwrap_or_default();
        let nodes = self.inner.nodes.read().expect("node map");
        all.sort_by_key(|n| {
            let local = nodes
                .get(n)
                .map(|e| e.region == self.inner.region)
                .unwrap_or(false);
            (!local, *n)
        });
        all
    }

    pub fn is_local(&self, node: u64) -> bool {
        self.inner
            .nodes
            .read()
            .expect("node map")
            .get(&node)
            .map(|e| e.region == self.inner.region)
            .unwrap_or(false)
    }

    fn mark_unreachable(&self, node: u64) {
        self.inner
            .unreachable_until
            .lock()
            .expect("unreachable nodes")
            .insert(node, Instant::now() + UNREACHABLE_FOR);
    }

    fn mark_reachable(&self, node: u64) {
        self.inner
            .unreachable_until
            .lock()
            .expect("unreachable nodes")
            .remove(&node);
    }

    fn is_unreachable(&self, node: u64) -> bool {
        self.inner
            .unreachable_until
            .lock()
            .expect("unreachable nodes")
            .get(&node)
            .is_some_and(|until| Instant::now() < *until)
    }

    /// The first of `replicas`, starting at `from` and wrapping, that was not
    /// recently unreachable (or `replicas[from]` if all were).
    fn next_reachable(&self, replicas: &[u64], from: usize) -> u64 {
        (0..replicas.len())
            .map(|i| replicas[(from + i) % replicas.len()])
            .find(|n| !self.is_unreachable(*n))
            .unwrap_or(replicas[from % replicas.len()])
    }

    /// Calls the shard's leader, following NotLeader hints and rotating over
    /// replicas with backoff until `deadline`. A node the call cannot reach
    /// is passed over for a while, hints naming it included: after a leader
    /// dies its followers keep naming it until they elect a new one. The
    /// error at the deadline ends with `retry`, what the caller may do. A
    /// node that answers is remembered as the leader only if `leader_only`
    /// (any replica answers a SESSION read).
    ///
    /// `call` gets the time its try may take: [`NODE_CALL_TIMEOUT`], or what
    /// is left of `deadline` if less, so that the tries together, backoff
    /// included, end by the deadline.
    pub(crate) async fn on_leader<T, F, Fut>(
        &self,
        shard: ShardId,
        deadline: Duration,
        (retry, leader_only): (&str, bool),
        mut call: F,
    ) -> Result<(u64, T), Status>
    where
        F: FnMut(NodeEntry, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let started = tokio::time::Instant::now();
        let replicas = self.replicas_near_first(shard);
        let mut target = self.leader_guess(shard);
        if target == 0 || self.is_unreachable(target) {
            target = self.next_reachable(&replicas, 0);
        }
        let mut attempt: u32 = 0;
        loop {
            let time = deadline
                .saturating_sub(started.elapsed())
                .min(NODE_CALL_TIMEOUT)
                .max(TRY_TIME_MIN);
            let status = match self.node(target) {
                Some(node) => call(node, time).await,
                None => Err(Status::internal(format!("unknown node {target}"))),
            };
            let status = match status {
                Ok(v) => {
                    if leader_only {
                        self.set_leader(shard, target);
                    }
                    self.mark_reachable(target);
                    return Ok((target, v));
                }
                Err(s) => s,
            };
            // A status made on this side (connection refused or reset) has a
            // source; one the node sent does not. A try cut short by the
            // call's deadline that ran out of time here says nothing about
            // the node (the round trip alone may take more than it had).
            let cut_short = time < NODE_CALL_TIMEOUT
                && matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled);
            if std::error::Error::source(&status).is_some() && !cut_short {
                self.mark_unreachable(target);
            }
            let retryable = is_retryable(&status);
            if !retryable || started.elapsed() >= deadline {
                return Err(final_status(
                    status,
                    attempt > 0,
                    (shard, started.elapsed()),
                    retry,
                ));
            }
            attempt += 1;
            let hint = leader_hint(&status);
            if let Some((leader, addr)) = &hint {
                self.learn_node(*leader, addr, "");
            }
            match hint {
                Some((leader, _))
                    if leader != target && self.knows(leader) && !self.is_unreachable(leader) =>
                {
                    self.set_leader(shard, leader);
                    target = leader;
                }
                _ => {
                    target = self.next_reachable(&replicas, attempt as usize);
                    let backoff = Duration::from_millis((25u64 << attempt.min(3)).min(200))
                        .min(deadline.saturating_sub(started.elapsed()));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// Proposes one command for `chat` and waits for its applied result.
    /// Concurrent writes to one shard share node calls and Raft entries
    /// (`batcher`).
    pub async fn write(&self, chat: u64, command: Command) -> Result<Written, Status> {
        let shard = self.shard_of(chat);
        let (result, position) = self.write_queued(shard, command).await?;
        if let Some(command_result::Outcome::Error(e)) = &result.outcome {
            return Err(command_error_status(e.code, &e.message));
        }
        Ok(Written { result, position })
    }

    /// Reads from `shard` at `consistency`; `min` is the caller's position.
    pub async fn read(
        &self,
        shard: ShardId,
        consistency: Consistency,
        min: Option<ShardPosition>,
        query: Query,
    ) -> Result<ReadAnswer, Status> {
        let min_index = min.map(|p| p.index).unwrap_or(0);
        let make = |c: Consistency, wait_ms: u32| ReadRequest {
            shard_id: shard.0,
            consistency: c as i32,
            min_index,
            wait_ms,
            query: Some(query.clone()),
        };
        let reply = match consistency {
            Consistency::Linearizable => {
                self.read_leader(shard, make(Consistency::Linearizable, 0))
                    .await?
            }
            Consistency::Session => {
                let mut answer = None;
                for node in self.replicas_near_first(shard) {
                    if !self.is_local(node) {
                        break;
                    }
                    if self.is_unreachable(node) {
                        continue;
                    }
                    if let Ok(r) = self
                        .read_on(node, make(Consistency::Session, SESSION_LOCAL_WAIT_MS))
                        .await
                    {
                        answer = Some(r);
                        break;
                    }
                }
                match answer {
                    Some(r) => r,
                    None => {
                        self.read_leader(shard, make(Consistency::Session, SESSION_LEADER_WAIT_MS))
                            .await?
                    }
                }
            }
            Consistency::Stale => {
                let mut last = Status::unavailable(format!("{shard}: no replica answered"));
                let mut answer = None;
                // Nearest first, those recently unreachable last.
                let mut replicas = self.replicas_near_first(shard);
                replicas.sort_by_key(|n| self.is_unreachable(*n));
                for node in replicas {
                    match self.read_on(node, make(Consistency::Stale, 0)).await {
                        Ok(r) => {
                            answer = Some(r);
                            break;
                        }
                        Err(s) if is_retryable(&s) => last = s,
                        Err(s) => return Err(s),
                    }
                }
                answer.ok_or(last)?
            }
        };
        if let Some(p) = min {
            if p.incarnation != 0 && reply.incarnation != 0 && p.incarnation != reply.incarnation {
                return Err(Status::invalid_argument(format!(
                    "read token is from an earlier incarnation of {shard}; drop it"
                )));
            }
        }
        let position = ShardPosition {
            shard: shard.0,
            incarnation: reply.incarnation,
            index: reply.applied_index,
            term: reply.applied_term,
        };
        Ok(ReadAnswer { reply, position })
    }

    async fn read_on(&self, node: u64, req: ReadRequest) -> Result<EncodedReadReply, Status> {
        let reads = self
            .inner
            .nodes
            .read()
            .expect("node map")
            .get(&node)
            .map(|n| n.reads.clone())
            .ok_or_else(|| Status::internal(format!("unknown node {node}")))?;
        let answer = reads.call(req, NODE_CALL_TIMEOUT).await;
        // Not reached, or no answer in time (a status made on this side):
        // reads pass the node over for a while, as writes do, rather than
        // each waiting out the timeout on a hung node.
        if let Err(s) = &answer {
            if std::error::Error::source(s).is_some() {
                self.mark_unreachable(node);
            }
        }
        answer
    }

    async fn read_leader(
        &self,
        shard: ShardId,
        req: ReadRequest,
    ) -> Result<EncodedReadReply, Status> {
        let leader_only = req.consistency == Consistency::Linearizable as i32;
        let (_, reply) = self
            .on_leader(
                shard,
                WRITE_DEADLINE,
                ("safe to retry", leader_only),
                |node, time| {
                    let (mut client, req) = (node.client, req.clone());
                    async move {
                        let mut r = tonic::Request::new(req);
                        r.set_timeout(time);
                        client.read(r).await.map(|r| r.into_inner())
                    }
                },
            )
            .await?;
        Ok(reply)
    }

    /// Reads from the replicas of `shard`, nearest first, for a Watch:
    /// returns once a replica has applied past `after_index` (or after its
    /// wait), so a caller can long-poll for changes.
    pub async fn read_for_watch(
        &self,
        shard: ShardId,
        after_index: u64,
        query: Query,
        start_at: usize,
    ) -> (usize, Result<EncodedReadReply, Status>) {
        let replicas = self.replicas_near_first(shard);
        let i = start_at % replicas.len();
        let req = ReadRequest {
            shard_id: shard.0,
            consistency: Consistency::Session as i32,
            min_index: after_index + 1,
            wait_ms: watch::LONG_POLL_MS,
            query: Some(query),
        };
        (i, self.read_on(replicas[i], req).await)
    }

    /// Polls node status to keep the leader cache fresh until `shutdown`.
    pub async fn refresh_leaders_until(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let nodes: Vec<(u64, NodeClient)> = self
                .inner
                .nodes
                .read()
                .expect("node map")
                .iter()
                .map(|(id, e)| (*id, e.client.clone()))
                .collect();
            // Per shard, the replica that says it leads at the highest term:
            // one cut off from the others may still say so at an old term.
            let mut leaders: BTreeMap<u64, (u64, u64, crate::api::pb::node::ShardStatus)> =
                BTreeMap::new();
            for (id, mut c) in nodes {
                let mut req = tonic::Request::new(StatusRequest {});
                req.set_timeout(Duration::from_secs(2));
                if let Ok(s) = c.status(req).await {
                    for sh in s.into_inner().shards {
                        if !sh.is_leader {
                            continue;
                        }
                        for m in &sh.members {
                            self.learn_node(m.node_id, &m.addr, &m.region);
                        }
                        match leaders.get(&sh.shard_id) {
                            Some((term, _, _)) if *term >= sh.term => {}
                            _ => {
                                leaders.insert(sh.shard_id, (sh.term, id, sh));
                            }
                        }
                    }
                }
            }
            for (shard, (_, id, sh)) in leaders {
                self.set_leader(ShardId(shard), id);
                self.inner
                    .leader_applied
                    .write()
                    .expect("leader applied map")
                    .insert(shard, sh.applied_index);
                if !sh.voters.is_empty() {
                    self.inner
                        .replicas
                        .write()
                        .expect("replica map")
                        .insert(shard, sh.voters);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(LEADER_REFRESH) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Largest public API request (a 64 KiB body plus room).
pub const API_MESSAGE_BYTES_MAX: usize = 1024 * 1024;
/// Concurrent requests per client connection.
pub const REQUESTS_PER_CONNECTION_MAX: usize = 1024;
/// Concurrent HTTP/2 streams per client connection (Watch streams included).
pub const STREAMS_PER_CONNECTION_MAX: u32 = 2_048;
/// Longest a public call may take to be answered (a Watch, to start its
/// stream), its request included: a client that sends part of a request and
/// stalls holds its buffer this long at most.
pub const API_CALL_TIME_MAX: Duration = Duration::from_secs(120);

/// Serves the public API, health and reflection on `listener` until
/// `shutdown` turns true.
pub async fn serve(
    router: Router,
    listener: tokio::net::TcpListener,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use crate::api::pb;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::passthrough::chat::chat_store_server::ChatStoreServer<service::ChatStoreService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tokio::spawn(router.clone().refresh_leaders_until(shutdown.clone()));
    let tls = router.inner.tls.clone();
    // Every call needs a service (or admin) token, checked from its headers
    // before its body is read; handlers check again where they need more.
    let tokens = router.inner.tokens.clone();
    let api = tonic::service::interceptor::InterceptedService::new(
        pb::passthrough::chat::chat_store_server::ChatStoreServer::new(
            service::ChatStoreService::new(router, shutdown.clone()),
        )
        .max_decoding_message_size(API_MESSAGE_BYTES_MAX),
        move |request: tonic::Request<()>| {
            tokens.check(request.metadata(), crate::security::Role::Service)?;
            if let Some(connection) = crate::api::http2::connection_of(&request) {
                connection.trust();
            }
            Ok(request)
        },
    );
    let incoming = crate::api::http2::incoming(listener);
    let routes = crate::api::http2::server(tonic::transport::Server::builder())
        .timeout(API_CALL_TIME_MAX)
        .max_concurrent_streams(Some(STREAMS_PER_CONNECTION_MAX))
        .concurrency_limit_per_connection(REQUESTS_PER_CONNECTION_MAX)
        .add_service(health)
        .add_service(reflection)
        .add_service(api);
    let stopped = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    match &tls {
        Some(tls) => {
            let incoming = tls.incoming(crate::security::ClientAuth::None, incoming)?;
            routes
                .serve_with_incoming_shutdown(incoming, stopped)
                .await?
        }
        None => {
            routes
                .serve_with_incoming_shutdown(incoming, stopped)
                .await?
        }
    }
    Ok(())
}

/// What a call that ends on `status` answers. After earlier attempts ended
/// with retryable failures (one may have reached a leader that went on),
/// a refusal that says nothing of them (an overloaded node, a node this
/// router does not know) is reported as the retryable failure it follows,
/// with `retry`: a write must not look refused when an earlier try of it may
/// yet commit. A call's own answer (a non-retryable status the node gave for
/// this call, such as a bad argument) is passed on as it is.
fn final_status(
    status: Status,
    retried: bool,
    (shard, elapsed): (ShardId, Duration),
    retry: &str,
) -> Status {
    let says_nothing_of_earlier = matches!(status.code(), Code::ResourceExhausted | Code::Internal);
    if is_retryable(&status) || (retried && says_nothing_of_earlier) {
        Status::unavailable(format!(
            "{shard}: no leader answered within {elapsed:?} (last: {}); {retry}",
            status.message()
        ))
    } else {
        status
    }
}

pub(crate) fn is_retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// A deterministic apply-time rejection as a gRPC status.
pub fn command_error_status(code: i32, message: &str) -> Status {
    let code = match ErrorCode::try_from(code).unwrap_or(ErrorCode::Unspecified) {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::FailedPrecondition => Code::FailedPrecondition,
        ErrorCode::ResourceExhausted => Code::ResourceExhausted,
        ErrorCode::PermissionDenied => Code::PermissionDenied,
        ErrorCode::Unspecified => Code::Internal,
    };
    Status::new(code, message.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::{Code, Status};

    use super::final_status;
    use crate::types::ShardId;

    const RETRY: &str = "send it again unchanged";

    fn ended(status: Status, retried: bool) -> Status {
        final_status(status, retried, (ShardId(3), Duration::from_secs(2)), RETRY)
    }

    /// A router in region eu of the local three-region config, whose nodes
    /// are never reached (the tests call `on_leader` with calls of their own).
    fn local_router() -> super::Router {
        let config = crate::cluster::config::ClusterConfig::from_toml(include_str!(
            "../../cluster-configs/local-3region.toml"
        ))
        .unwrap();
        super::Router::new(&config, "eu", b"secret").unwrap()
    }

    /// However a node fails (here each try ends after 3 s, or sooner if its
    /// time is up, as on a node that answers too late), the tries together
    /// end by the call's deadline: each gets what is left of it.
    #[tokio::test(start_paused = true)]
    async fn tries_on_a_hung_node_end_by_the_deadline() {
        let router = local_router();
        let started = tokio::time::Instant::now();
        let tries = std::cell::RefCell::new(Vec::new());
        let out: Result<(u64, ()), Status> = router
            .on_leader(
                ShardId(3),
                super::WRITE_DEADLINE,
                (RETRY, true),
                |_node, time| {
                    tries.borrow_mut().push(time);
                    async move {
                        tokio::time::sleep(time.min(Duration::from_secs(3))).await;
                        Err(Status::deadline_exceeded("no reply in time"))
                    }
                },
            )
            .await;
        let status = out.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status}");
        let tries = tries.into_inner();
        assert!((4..10).contains(&tries.len()), "{} tries", tries.len());
        assert_eq!(tries[0], super::NODE_CALL_TIMEOUT);
        assert!(tries.iter().all(|t| *t <= super::NODE_CALL_TIMEOUT));
        let took = started.elapsed();
        assert!(
            took <= super::WRITE_DEADLINE + super::TRY_TIME_MIN,
            "{took:?} for tries of {tries:?}"
        );
    }

    /// A try cut short by its call's deadline that times out on this side
    /// does not make the router pass the node over (for every shard it
    /// leads); a full try that times out does.
    #[tokio::test(start_paused = true)]
    async fn only_full_tries_that_time_out_pass_a_node_over() {
        let router = local_router();
        let shard = ShardId(3);
        let timed_out_here = |time: Duration| async move {
            tokio::time::sleep(time).await;
            let mut s = Status::deadline_exceeded("no reply in time");
            s.set_source(std::sync::Arc::new(std::io::Error::other("timed out")));
            Err::<(), Status>(s)
        };
        let passed_over = |router: &super::Router| {
            router
                .replicas_near_first(shard)
                .into_iter()
                .filter(|n| router.is_unreachable(*n))
                .count()
        };
        let cut_short = Duration::from_secs(1);
        let out = router
            .on_leader(shard, cut_short, (RETRY, true), |_, time| {
                timed_out_here(time)
            })
            .await;
        assert!(out.is_err());
        assert_eq!(passed_over(&router), 0);
        let one_full_try = super::NODE_CALL_TIMEOUT + Duration::from_millis(50);
        let out = router
            .on_leader(shard, one_full_try, (RETRY, true), |_, time| {
                timed_out_here(time)
            })
            .await;
        assert!(out.is_err());
        assert_eq!(passed_over(&router), 1, "the node of the full try");
    }

    #[test]
    fn a_refusal_after_failed_tries_is_reported_as_their_outcome() {
        // First try: an overloaded node refused the write; nothing was sent.
        let first = ended(Status::resource_exhausted("shard-3 is overloaded"), false);
        assert_eq!(first.code(), Code::ResourceExhausted);
        // After a try that timed out (it may commit yet), the same refusal
        // must not look like "not stored".
        let later = ended(Status::resource_exhausted("shard-3 is overloaded"), true);
        assert_eq!(later.code(), Code::Unavailable);
        assert!(later.message().contains(RETRY), "{later}");
        assert!(later.message().contains("overloaded"), "{later}");
        let unknown_node = ended(Status::internal("unknown node 9"), true);
        assert_eq!(unknown_node.code(), Code::Unavailable);
        // The node's own answer to this call is passed on.
        let bad = ended(Status::invalid_argument("too big"), true);
        assert_eq!(bad.code(), Code::InvalidArgument);
        // Retryable failures at the deadline say what to do.
        let timed_out = ended(Status::deadline_exceeded("no reply"), false);
        assert_eq!(timed_out.code(), Code::Unavailable);
        assert!(timed_out.message().contains(RETRY), "{timed_out}");
    }
}
