//! The client side of the Raft transport: openraft's `RaftNetworkV2` for one
//! shard, over the node's shared gRPC connections to its peers.
//!
//! Every shard of a node reaches a peer through the same tonic `Channel` (one
//! HTTP/2 connection, multiplexed), and tags each request with its shard id.
//! openraft's messages travel postcard-encoded inside versioned envelopes.
//! AppendEntries of all shards share one stream per peer
//! ([`crate::shard::append_stream`]); the rarer calls are unary. Snapshots
//! stream from their file in chunks.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;
use tonic::Status;

use crate::api::codec::{from_postcard, to_postcard, RAFT_WIRE_VERSION};
use crate::api::pb::raft::raft_reply::Result as ReplyResult;
use crate::api::pb::raft::raft_transport_client::RaftTransportClient;
use crate::api::pb::raft::{RaftReply, RaftRequest, SnapshotChunk};
use crate::cluster::latency::{Delayed, LinkDelays};
use crate::shard::append_stream::AppendMux;
use crate::shard::snapshot::SnapshotFile;
use crate::shard::types::{LogId, NodeAddr, Snapshot, TypeConfig, Vote};
use crate::types::{NodeId, ShardId};

/// Largest gRPC message a node sends or accepts on the Raft transport.
pub const RAFT_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Snapshot chunk size on the wire.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// Longest a snapshot transfer may go without moving data, on either side.
pub const SNAPSHOT_STALL_MAX: Duration = Duration::from_secs(60);
/// How long to wait for a TCP connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// AppendEntries one shard keeps in flight to one peer.
const APPENDS_IN_FLIGHT_MAX: usize = 8;

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
    /// One append stream per peer, shared by every shard.
    appends: Arc<Mutex<HashMap<(u64, String), AppendMux>>>,
    /// Addresses to use instead of the membership's, by node: lets a test
    /// harness put a fault-injecting proxy on every link.
    overrides: Arc<std::collections::BTreeMap<u64, String>>,
    /// This node's certificate and the cluster CA, when TLS is on.
    tls: Option<crate::security::Tls>,
}

impl Peers {
    /// Peers of node `self_id` in `region`; `overrides` replace the
    /// membership's addresses of some nodes.
    pub fn new(
        self_id: NodeId,
        region: &str,
        delays: LinkDelays,
        overrides: std::collections::BTreeMap<u64, String>,
        tls: Option<crate::security::Tls>,
    ) -> Peers {
        Peers {
            self_id,
            region: region.into(),
            delays,
            channels: Arc::default(),
            appends: Arc::default(),
            overrides: Arc::new(overrides),
            tls,
        }
    }

    pub fn self_id(&self) -> NodeId {
        self.self_id
    }

    /// The address to reach `node` at: the override, if any, else `addr`.
    fn address<'a>(&'a self, node: u64, addr: &'a str) -> &'a str {
        self.overrides
            .get(&node)
            .map(String::as_str)
            .unwrap_or(addr)
    }

    /// The append stream to `node` at `addr` in `region`, started on first
    /// use and shared by every shard.
    pub fn append_mux(&self, node: u64, addr: &str, region: &str) -> Result<AppendMux, String> {
        let key = (node, self.address(node, addr).to_string());
        if let Some(mux) = self.appends.lock().expect("append mux lock").get(&key) {
            return Ok(mux.clone());
        }
        let client = self.client(node, addr, region)?;
        let delay = self.delays.one_way(&self.region, region);
        let mut appends = self.appends.lock().expect("append mux lock");
        Ok(appends
            .entry(key)
            .or_insert_with(|| AppendMux::new(client, node, delay))
            .clone())
    }

    /// A client for `node` at `addr` in `region`; connects lazily and reuses
    /// the connection for every shard.
    pub fn client(&self, node: u64, addr: &str, region: &str) -> Result<PeerClient, String> {
        let addr = self.address(node, addr);
        let mut channels = self.channels.lock().expect("peer channel lock");
        let channel = match channels.get(&(node, addr.to_string())) {
            Some(c) => c.clone(),
            None => {
                let endpoint = crate::api::http2::endpoint(
                    crate::security::endpoint(addr).map_err(|e| format!("node {node}: {e:#}"))?,
                )
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20));
                // With TLS, the peer must prove it is the node the membership
                // names.
                let c = crate::security::channel(
                    endpoint,
                    self.tls.as_ref(),
                    &crate::security::node_name(node),
                )
                .map_err(|e| format!("TLS for node {node}: {e:#}"))?;
                channels.insert((node, addr.to_string()), c.clone());
                c
            }
        };
        let delay = self.delays.one_way(&self.region, region);
        Ok(RaftTransportClient::new(Delayed::new(channel, delay))
            .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX))
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
            appends: self.peers.append_mux(target, &node.addr, &node.region),
            rpc_timeout_min: self.rpc_timeout_min,
        }
    }
}

/// One shard's link to one peer.
pub struct PeerLink {
    shard: ShardId,
    target: u64,
    from: u64,
    client: Result<PeerClient, String>,
    appends: Result<AppendMux, String>,
    rpc_timeout_min: Duration,
}

fn unreachable<E: std::fmt::Display>(e: E) -> Unreachable<TypeConfig> {
    Unreachable::from_string(e.to_string())
}

impl PeerLink {
    /// How long one call may take.
    fn timeout(&self, option: &RPCOption) -> Duration {
        option.soft_ttl().max(self.rpc_timeout_min)
    }

    fn request(&self, payload: Vec<u8>, timeout: Duration) -> tonic::Request<RaftRequest> {
        let mut req = tonic::Request::new(envelope((self.shard, self.from), payload));
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
        let req = self.request(to_postcard(body), self.timeout(option));
        let started = Instant::now();
        let result = f(client, req).await;
        metrics::histogram!(crate::metrics::RAFT_RPC_SECONDS, "rpc" => rpc)
            .record(started.elapsed().as_secs_f64());
        let reply = result.map_err(|status| rpc_error(rpc, self.target, status))?;
        decode_reply(reply.into_inner(), rpc, self.target)
    }
}

/// One of `from`'s Raft messages for `shard`, in its versioned envelope.
fn envelope((shard, from): (ShardId, u64), payload: Vec<u8>) -> RaftRequest {
    RaftRequest {
        format_version: RAFT_WIRE_VERSION,
        shard_id: shard.0,
        from_node: from,
        payload: payload.into(),
    }
}

/// The log ids a stream of AppendEntries has had acknowledged: the
/// greatest, once there is one.
type Acked = Option<LogId>;

/// What openraft's stream of replies gets for the reply `resp` to a
/// request over `(prev, last]`, given what the stream had acknowledged
/// before it; and what it has acknowledged after, or None when the stream
/// ends there (at a failure, a conflict or a partial success, as openraft's
/// own sequential stream ends). A conflict at or below an earlier
/// acknowledgement can only come from calls that reached the follower
/// swapped: it ends the stream as an error, and openraft sends again from
/// what was acknowledged (as a conflict it would move its match back).
fn pipelined_result(
    resp: AppendEntriesResponse<TypeConfig>,
    (prev, last): (Option<LogId>, Option<LogId>),
    acked: Acked,
    target: u64,
) -> (
    Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>,
    Option<Acked>,
) {
    if matches!(resp, AppendEntriesResponse::Conflict) && acked.is_some() && prev <= acked {
        let stale = NetworkError::from_string(format!(
            "append_entries to node {target}: a conflict at {prev:?}, at or below {acked:?} acknowledged before it (calls reached the follower out of order)"
        ));
        return (Err(RPCError::Network(stale)), None);
    }
    let whole = match &resp {
        AppendEntriesResponse::PartialSuccess(upto) => *upto == last,
        _ => true,
    };
    let result = resp.into_stream_result(prev, last);
    let next = match &result {
        Ok(upto) if whole => Some(acked.max(*upto)),
        _ => None,
    };
    (Ok(result), next)
}

/// What openraft is told of a call that got no reply: a peer that may be
/// down or slow is unreachable (openraft backs off), anything else a
/// network error.
fn rpc_error(rpc: &'static str, target: u64, status: Status) -> RPCError<TypeConfig> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            RPCError::Unreachable(unreachable(format!("{rpc} to node {target}: {status}")))
        }
        _ => RPCError::Network(NetworkError::from_string(format!(
            "{rpc} to node {target}: {status}"
        ))),
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

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let appends = self.appends.clone();
        let timeout = self.timeout(&option);
        self.call("append_entries", &rpc, &option, move |_, r| async move {
            let mux = appends.map_err(Status::unavailable)?;
            mux.call(r.into_inner(), timeout)
                .await
                .map(tonic::Response::new)
        })
        .await
    }

    /// AppendEntries pipelined: each request goes out as soon as openraft
    /// makes it, without waiting for the replies to those before it (up to
    /// [`APPENDS_IN_FLIGHT_MAX`]), and replies come back in request order.
    /// The append stream keeps a shard's calls in order to the peer, whose
    /// handler hands each to openraft before it reads the next, so the
    /// follower appends them in order; a gap (a call lost with a broken
    /// stream) makes the next one a conflict, and openraft starts again
    /// from what the follower has. Without this a write that arrives while
    /// the previous one's commit notice is in flight waits a round trip for
    /// it, which across regions doubles its latency.
    ///
    /// A peer called unary (an older node without the stream) gets one call
    /// at a time, as its calls may overtake each other. Should two calls
    /// ever reach the follower swapped anyway, the later one's conflict at
    /// or below what this stream already had acknowledged is stale (the
    /// follower lacked the entries the earlier one was bringing): it ends
    /// the stream as an error, and openraft sends again from what was
    /// acknowledged, rather than taking it as a conflict below its own
    /// match.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Send + Unpin + 'static,
    {
        Box::pin(async move {
            let mux = self
                .appends
                .clone()
                .map_err(|e| RPCError::Unreachable(unreachable(e)))?;
            let timeout = self.timeout(&option);
            let target = self.target;
            let link = (self.shard, self.from);
            let in_flight = match mux.keeps_order() {
                true => APPENDS_IN_FLIGHT_MAX,
                false => 1,
            };
            // Queued here, in the order openraft makes them; each waits
            // for its reply on its own.
            let calls = input
                .map(move |rpc| {
                    let prev = rpc.prev_log_id;
                    let last = rpc.entries.last().map(|e| e.log_id).or(prev);
                    let sent = mux.send(envelope(link, to_postcard(&rpc)), timeout);
                    let started = Instant::now();
                    async move {
                        let reply = match sent {
                            Ok(call) => call.reply().await,
                            Err(status) => Err(status),
                        };
                        metrics::histogram!(crate::metrics::RAFT_RPC_SECONDS, "rpc" => "append_entries")
                            .record(started.elapsed().as_secs_f64());
                        (prev, last, reply)
                    }
                })
                .buffered(in_flight);
            // Ends after the first failure, conflict or partial success:
            // openraft starts a new stream from what the follower has.
            // The state: the calls, and the greatest log id this stream had
            // acknowledged.
            let replies = futures::stream::unfold(Some((calls, None)), move |state| async move {
                let (mut calls, acked) = state?;
                let (prev, last, reply) = calls.next().await?;
                let resp = reply
                    .map_err(|status| rpc_error("append_entries", target, status))
                    .and_then(|r| {
                        decode_reply::<AppendEntriesResponse<TypeConfig>>(
                            r,
                            "append_entries",
                            target,
                        )
                    });
                let (item, acked) = match resp {
                    Ok(resp) => pipelined_result(resp, (prev, last), acked, target),
                    Err(e) => (Err(e), None),
                };
                Some((item, acked.map(|acked| (calls, acked))))
            });
            Ok(Box::pin(replies) as BoxStream<'s, _>)
        })
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
        // Keeps the request stream open until the whole file is read: a
        // reader that fails drops its sender, and the stream must not end
        // cleanly then (the call is dropped first, which resets it).
        let mut stream_open = Some(tx.clone());
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
                match tokio::time::timeout(SNAPSHOT_STALL_MAX, tx.send(chunk)).await {
                    Ok(Ok(())) if !done => {}
                    // Sent the last chunk, or the call ended.
                    Ok(_) => return Ok::<(), std::io::Error>(()),
                    Err(_) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("the receiver took no data for {SNAPSHOT_STALL_MAX:?}"),
                        ))
                    }
                }
            }
        });
        // No deadline for the whole transfer, which takes as long as the
        // file and the link make it (a large shard to a distant region takes
        // longer than any fixed one): it fails when no data moves for
        // SNAPSHOT_STALL_MAX, and the receiver's check and install that
        // follow get `install_snapshot_timeout_ms`.
        let req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let target = self.target;
        let send = async move { client.install_snapshot(req).await };
        tokio::pin!(send, cancel);
        let mut reader = reader;
        let mut read_all = false;
        let installing = tokio::time::sleep(Duration::MAX);
        tokio::pin!(installing);
        // A failed read of the file cancels the call (dropping it resets the
        // stream) rather than ending the stream as if the file were whole.
        let result = loop {
            tokio::select! {
                r = &mut send => break r,
                read = &mut reader, if !read_all => {
                    match read {
                        Ok(Ok(())) => {
                            read_all = true;
                            drop(stream_open.take());
                            installing
                                .as_mut()
                                .reset(tokio::time::Instant::now() + option.hard_ttl());
                        }
                        Ok(Err(e)) => {
                            return Err(StreamingError::Network(NetworkError::from_string(
                                format!("read snapshot file: {e}"),
                            )))
                        }
                        Err(e) => {
                            return Err(StreamingError::Network(NetworkError::from_string(
                                format!("snapshot reader: {e}"),
                            )))
                        }
                    }
                }
                closed = &mut cancel => {
                    reader.abort();
                    return Err(StreamingError::Closed(closed));
                }
                _ = &mut installing, if read_all => {
                    return Err(StreamingError::Network(NetworkError::from_string(format!(
                        "install_snapshot to node {target}: no answer within {:?} of the whole \
                         file arriving",
                        option.hard_ttl()
                    ))));
                }
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

#[cfg(test)]
mod tests {
    use openraft::error::RPCError;
    use openraft::raft::{AppendEntriesResponse, StreamAppendError};

    use super::pipelined_result;
    use crate::shard::types::{log_id, LogId, Vote};

    fn range(prev: u64, last: u64) -> (Option<LogId>, Option<LogId>) {
        (Some(log_id(1, prev)), Some(log_id(1, last)))
    }

    #[test]
    fn pipelined_replies_map_as_openraft_maps_them_and_a_stale_conflict_is_an_error() {
        use AppendEntriesResponse::{Conflict, HigherVote, PartialSuccess, Success};
        // Success acknowledges the request's last entry and goes on.
        let (item, next) = pipelined_result(Success, range(4, 6), None, 2);
        assert_eq!(item.unwrap(), Ok(Some(log_id(1, 6))));
        assert_eq!(next, Some(Some(log_id(1, 6))));
        // An entry-less request (a commit notice) acknowledges its prev; the
        // greatest acknowledgement stays.
        let (item, next) = pipelined_result(Success, range(5, 5), Some(log_id(1, 6)), 2);
        assert_eq!(item.unwrap(), Ok(Some(log_id(1, 5))));
        assert_eq!(next, Some(Some(log_id(1, 6))));
        // A whole partial success goes on; a partial one ends the stream.
        let (_, next) = pipelined_result(PartialSuccess(Some(log_id(1, 6))), range(4, 6), None, 2);
        assert_eq!(next, Some(Some(log_id(1, 6))));
        let (item, next) =
            pipelined_result(PartialSuccess(Some(log_id(1, 5))), range(4, 6), None, 2);
        assert_eq!(item.unwrap(), Ok(Some(log_id(1, 5))));
        assert_eq!(next, None);
        // A conflict above everything acknowledged is openraft's to handle.
        let (item, next) = pipelined_result(Conflict, range(6, 8), Some(log_id(1, 5)), 2);
        assert_eq!(
            item.unwrap(),
            Err(StreamAppendError::Conflict(log_id(1, 6)))
        );
        assert_eq!(next, None);
        // One at or below an acknowledgement came from swapped calls.
        for prev in [5, 6] {
            let (item, next) = pipelined_result(Conflict, range(prev, 8), Some(log_id(1, 6)), 2);
            assert!(matches!(item, Err(RPCError::Network(_))), "{item:?}");
            assert_eq!(next, None);
        }
        let higher = Vote::new(2, 3);
        let (item, next) = pipelined_result(HigherVote(higher), range(4, 6), None, 2);
        assert_eq!(item.unwrap(), Err(StreamAppendError::HigherVote(higher)));
        assert_eq!(next, None);
    }
}
