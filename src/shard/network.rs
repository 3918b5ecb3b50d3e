//! The client side of the Raft transport: openraft's `RaftNetworkV2` for one
//! shard, over the node's shared gRPC connections to its peers.
//!
//! Every shard of a node reaches a peer through the same tonic `Channel` (one
//! HTTP/2 connection, multiplexed), and tags each request with its shard id.
//! openraft's messages travel postcard-encoded inside versioned envelopes.
//! Snapshots stream from their file in chunks.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{BoxStream, Stream, StreamExt};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use tokio::io::AsyncReadExt;
use tonic::transport::{Channel, Endpoint};

use crate::api::codec::{from_postcard, to_postcard, RAFT_WIRE_VERSION};
use crate::api::pb::raft::raft_reply::Result as ReplyResult;
use crate::api::pb::raft::raft_transport_client::RaftTransportClient;
use crate::api::pb::raft::{RaftReply, RaftRequest, SnapshotChunk};
use crate::cluster::latency::{Delayed, LinkDelays};
use crate::shard::snapshot::SnapshotFile;
use crate::shard::types::{NodeAddr, Snapshot, TypeConfig, Vote};
use crate::types::{NodeId, ShardId};

/// Largest gRPC message a node sends or accepts on the Raft transport.
pub const RAFT_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Snapshot chunk size on the wire.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// How long to wait for a TCP connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A client of a peer's Raft transport, delayed by the simulated distance
/// to its region (no delay unless latency is simulated).
pub type PeerClient = RaftTransportClient<Delayed<Channel>>;

/// The node's connections to its peers, shared by all its shards.
#[derive(Clone)]
pub struct Peers {
    self_id: NodeId,
    region: Arc<str>,
    delays: LinkDelays,
    channels: Arc<Mutex<HashMap<(u64, String), Channel>>>,
    /// Addresses to use instead of the membership's, by node: lets a test
    /// harness put a fault-injecting proxy on every link.
    overrides: Arc<std::collections::BTreeMap<u64, String>>,
}

impl Peers {
    /// Peers of node `self_id` in `region`; `overrides` replace the
    /// membership's addresses of some nodes.
    pub fn new(
        self_id: NodeId,
        region: &str,
        delays: LinkDelays,
        overrides: std::collections::BTreeMap<u64, String>,
    ) -> Peers {
        Peers {
            self_id,
            region: region.into(),
            delays,
            channels: Arc::default(),
            overrides: Arc::new(overrides),
        }
    }

    pub fn self_id(&self) -> NodeId {
        self.self_id
    }

    /// The simulated one-way delay to `region` (zero unless simulated).
    pub fn one_way(&self, region: &str) -> Duration {
        self.delays.one_way(&self.region, region)
    }

    /// A client for `node` at `addr` in `region`; connects lazily and reuses
    /// the connection for every shard.
    pub fn client(&self, node: u64, addr: &str, region: &str) -> Result<PeerClient, String> {
        let channel = self.channel(node, addr)?;
        let delay = self.delays.one_way(&self.region, region);
        Ok(RaftTransportClient::new(Delayed::new(channel, delay))
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX))
    }

    /// A client for `node` with no simulated delay, for streams that delay
    /// each message themselves.
    pub fn stream_client(
        &self,
        node: u64,
        addr: &str,
    ) -> Result<RaftTransportClient<Channel>, String> {
        Ok(RaftTransportClient::new(self.channel(node, addr)?)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX))
    }

    fn channel(&self, node: u64, addr: &str) -> Result<Channel, String> {
        let addr = self
            .overrides
            .get(&node)
            .map(String::as_str)
            .unwrap_or(addr);
        let mut channels = self.channels.lock().expect("peer channel lock");
        let channel = match channels.get(&(node, addr.to_string())) {
            Some(c) => c.clone(),
            None => {
                let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|e| format!("bad address {addr:?} for node {node}: {e}"))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(20));
                let c = endpoint.connect_lazy();
                channels.insert((node, addr.to_string()), c.clone());
                c
            }
        };
        Ok(channel)
    }
}

/// Creates per-peer clients for one shard.
pub struct NetworkFactory {
    pub shard: ShardId,
    pub peers: Peers,
    /// Shortest timeout for one RPC. openraft sizes RPC timeouts by the
    /// heartbeat interval, which is too short for a WAN round trip plus a
    /// busy peer (DESIGN section 3a); a late answer is better than a resend.
    pub rpc_timeout_min: Duration,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerLink;

    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> PeerLink {
        PeerLink {
            shard: self.shard,
            target,
            from: self.peers.self_id().0,
            client: self.peers.client(target, &node.addr, &node.region),
            stream_client: self.peers.stream_client(target, &node.addr),
            rpc_timeout_min: self.rpc_timeout_min,
            one_way: self.peers.one_way(&node.region),
        }
    }
}

/// One shard's link to one peer.
pub struct PeerLink {
    shard: ShardId,
    target: u64,
    from: u64,
    client: Result<PeerClient, String>,
    stream_client: Result<RaftTransportClient<Channel>, String>,
    rpc_timeout_min: Duration,
    /// Simulated one-way delay to the peer, applied per message on append
    /// streams (unary calls get it from [`Delayed`]).
    one_way: Duration,
}

fn unreachable<E: std::fmt::Display>(e: E) -> Unreachable<TypeConfig> {
    Unreachable::from_string(e.to_string())
}

impl PeerLink {
    fn request(&self, payload: Vec<u8>, timeout: Duration) -> tonic::Request<RaftRequest> {
        let mut req = tonic::Request::new(RaftRequest {
            format_version: RAFT_WIRE_VERSION,
            shard_id: self.shard.0,
            from_node: self.from,
            payload: payload.into(),
        });
        req.set_timeout(timeout);
        req
    }

    async fn call<Req, Resp, F, Fut>(
        &mut self,
        rpc: &'static str,
        body: &Req,
        option: &RPCOption,
        f: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        F: FnOnce(PeerClient, tonic::Request<RaftRequest>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftReply>, tonic::Status>>,
    {
        let client = self
            .client
            .clone()
            .map_err(|e| RPCError::Unreachable(unreachable(e)))?;
        let req = self.request(
            to_postcard(body),
            option.soft_ttl().max(self.rpc_timeout_min),
        );
        let started = Instant::now();
        let result = f(client, req).await;
        metrics::histogram!(crate::metrics::RAFT_RPC_SECONDS, "rpc" => rpc)
            .record(started.elapsed().as_secs_f64());
        let reply = match result {
            Ok(r) => r.into_inner(),
            Err(status) => {
                return Err(match status.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled => RPCError::Unreachable(unreachable(format!(
                        "{rpc} to node {}: {status}",
                        self.target
                    ))),
                    _ => RPCError::Network(NetworkError::from_string(format!(
                        "{rpc} to node {}: {status}",
                        self.target
                    ))),
                })
            }
        };
        decode_reply(reply, rpc, self.target)
    }
}

fn decode_reply<Resp: serde::de::DeserializeOwned>(
    reply: RaftReply,
    rpc: &'static str,
    target: u64,
) -> Result<Resp, RPCError<TypeConfig>> {
    match reply.result {
        Some(ReplyResult::Ok(bytes)) => from_postcard(&bytes, "raft reply")
            .map_err(|e| RPCError::Network(NetworkError::from_string(e.to_string()))),
        Some(ReplyResult::RaftError(_)) | Some(ReplyResult::Error(_)) | None => {
            let msg = match reply.result {
                Some(ReplyResult::Error(s)) => s,
                _ => "remote raft is shutting down".to_string(),
            };
            Err(RPCError::Unreachable(unreachable(format!(
                "{rpc} to node {target}: {msg}"
            ))))
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerLink {
    type SnapshotData = SnapshotFile;

    /// Pipelined replication over one gRPC stream per shard and peer: the
    /// leader sends entries as they come instead of one request per round
    /// trip; the follower answers each in order. With a request outstanding
    /// and no answer for the RPC timeout, the stream fails and openraft
    /// reopens it.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, AppendStreamResult<'s>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        let client = self.stream_client.clone();
        let requests = AppendStreamParams {
            shard: self.shard.0,
            from: self.from,
            target: self.target,
            one_way: self.one_way,
            timeout: option.soft_ttl().max(self.rpc_timeout_min),
        };
        let opened = client
            .map_err(|e| RPCError::Unreachable(unreachable(e)))
            .map(|client| open_append_stream(client, input.boxed(), requests));
        Box::pin(futures::future::ready(opened))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("append_entries", &rpc, &option, |mut c, r| async move {
            c.append_entries(r).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(
            "vote",
            &rpc,
            &option,
            |mut c, r| async move { c.vote(r).await },
        )
        .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("pre_vote", &rpc, &option, |mut c, r| async move {
            c.pre_vote(r).await
        })
        .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call("transfer_leader", &req, &option, |mut c, r| async move {
            c.transfer_leader(r).await
        })
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self
            .client
            .clone()
            .map_err(|e| StreamingError::Unreachable(unreachable(e)))?;
        let header = to_postcard(&(vote, snapshot.meta.clone()));
        // The key is read before the file is opened: a file replaced
        // meanwhile fails to open rather than pairing with the wrong key.
        let seal_key = match crate::storage::seal::read_key_file(&snapshot_key_path(&snapshot)) {
            Ok((_, key)) => key.to_vec(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(StreamingError::Network(NetworkError::from_string(format!(
                    "read snapshot key: {e}"
                ))))
            }
        };
        let mut file = tokio::fs::File::open(&snapshot.snapshot.path)
            .await
            .map_err(|e| {
                StreamingError::Network(NetworkError::from_string(format!(
                    "open snapshot file: {e}"
                )))
            })?;
        let (shard, from) = (self.shard.0, self.from);
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(4);
        let reader = tokio::spawn(async move {
            let mut seal_key = seal_key;
            let mut first = true;
            loop {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
                let mut filled = 0;
                while filled < buf.len() {
                    let n = file.read(&mut buf[filled..]).await?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                let done = filled < SNAPSHOT_CHUNK_BYTES;
                let chunk = SnapshotChunk {
                    format_version: RAFT_WIRE_VERSION,
                    shard_id: shard,
                    from_node: from,
                    header: if first {
                        header.clone().into()
                    } else {
                        Default::default()
                    },
                    data: buf.into(),
                    seal_key: if first {
                        std::mem::take(&mut seal_key).into()
                    } else {
                        Default::default()
                    },
                };
                first = false;
                if tx.send(chunk).await.is_err() || done {
                    return Ok::<(), std::io::Error>(());
                }
            }
        });
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.set_timeout(option.hard_ttl());
        let target = self.target;
        let send = async move { client.install_snapshot(req).await };
        let result = tokio::select! {
            r = send => r,
            closed = cancel => {
                reader.abort();
                return Err(StreamingError::Closed(closed));
            }
        };
        reader.abort();
        let reply = result
            .map_err(|s| {
                StreamingError::Unreachable(unreachable(format!(
                    "install_snapshot to node {target}: {s}"
                )))
            })?
            .into_inner();
        decode_reply(reply, "install_snapshot", target).map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            RPCError::Network(n) => StreamingError::Network(n),
            other => StreamingError::Network(NetworkError::from_string(other.to_string())),
        })
    }
}

fn snapshot_key_path(snapshot: &Snapshot) -> std::path::PathBuf {
    crate::shard::snapshot::key_path(&snapshot.snapshot.path)
}

/// Delivers each item of `items` `delay` after it was produced, in order,
/// without holding later items back by more than that: the simulated
/// distance of a stream's messages. Items flow through channels, so the
/// result is a concrete stream type (tonic's streaming calls need one that
/// the compiler can prove `Send` inside spawned tasks).
fn delay_line<T: Send + 'static>(
    items: impl Stream<Item = T> + Send + 'static,
    delay: Duration,
) -> tokio_stream::wrappers::UnboundedReceiverStream<T> {
    let (out_tx, out_rx) = tokio::sync::mpsc::unbounded_channel();
    if delay.is_zero() {
        tokio::spawn(async move {
            futures::pin_mut!(items);
            while let Some(item) = items.next().await {
                if out_tx.send(item).is_err() {
                    return;
                }
            }
        });
        return tokio_stream::wrappers::UnboundedReceiverStream::new(out_rx);
    }
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        futures::pin_mut!(items);
        while let Some(item) = items.next().await {
            if line_tx
                .send((tokio::time::Instant::now() + delay, item))
                .is_err()
            {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some((due, item)) = line_rx.recv().await {
            tokio::time::sleep_until(due).await;
            if out_tx.send(item).is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::UnboundedReceiverStream::new(out_rx)
}

/// The result of opening a pipelined append stream.
type AppendStreamResult<'s> = Result<
    BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
    RPCError<TypeConfig>,
>;

struct AppendStreamParams {
    shard: u64,
    from: u64,
    target: u64,
    one_way: Duration,
    timeout: Duration,
}

/// Opens the stream on a task of its own, which feeds replies (decoded, in
/// order) to the returned stream; a failure to open arrives as the first
/// item.
fn open_append_stream(
    mut client: RaftTransportClient<Channel>,
    input: BoxStream<'static, AppendEntriesRequest<TypeConfig>>,
    p: AppendStreamParams,
) -> BoxStream<'static, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>> {
    let AppendStreamParams {
        shard,
        from,
        target,
        one_way,
        timeout,
    } = p;
    // The task moves only wire types: openraft's generic types across an
    // await in a spawned task trip the compiler's Send check.
    // Unbounded: replies are bounded by the requests openraft has sent.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<RaftReply, String>>();
    let outstanding = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sent = outstanding.clone();
    let requests: BoxStream<'static, RaftRequest> = input
        .map(move |rpc| {
            sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            RaftRequest {
                format_version: RAFT_WIRE_VERSION,
                shard_id: shard,
                from_node: from,
                payload: to_postcard(&rpc).into(),
            }
        })
        .boxed();
    let requests = delay_line(requests, one_way);
    tokio::spawn(async move {
        let response = match client.stream_append(requests).await {
            Ok(r) => r,
            Err(s) => {
                let _ = tx.send(Err(s.to_string()));
                return;
            }
        };
        let mut replies = delay_line(response.into_inner(), one_way);
        loop {
            let next = if outstanding.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                match tokio::time::timeout(timeout, replies.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        let _ = tx.send(Err(format!("no answer within {timeout:?}")));
                        return;
                    }
                }
            } else {
                replies.next().await
            };
            let Some(next) = next else { return };
            let item = match next {
                Ok(reply) => {
                    outstanding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    Ok(reply)
                }
                Err(s) => Err(s.to_string()),
            };
            let stop = item.is_err();
            if tx.send(item).is_err() || stop {
                return;
            }
        }
    });
    tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
        .map(move |item| match item {
            Ok(reply) => {
                decode_reply::<StreamAppendResult<TypeConfig>>(reply, "stream_append", target)
            }
            Err(what) => Err(RPCError::Unreachable(unreachable(format!(
                "stream_append to node {target}: {what}"
            )))),
        })
        .boxed()
}
