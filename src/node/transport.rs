//! The server side of the Raft transport: routes each request to its shard's
//! openraft instance.

use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tonic::transport::CertificateDer;
use tonic::{Request, Response, Status, Streaming};

use crate::api::codec::{from_postcard, to_postcard, RAFT_WIRE_VERSION};
use crate::api::pb::raft::raft_reply::Result as ReplyResult;
use crate::api::pb::raft::raft_transport_server::RaftTransport;
use crate::api::pb::raft::{
    AppendCallBatch, AppendReplyBatch, PingReply, PingRequest, QuiesceReply, QuiesceRequest,
    RaftReply, RaftRequest, SnapshotChunk,
};
use crate::node::Registry;
use crate::shard::append_stream::AppendCalls;
use crate::shard::snapshot::SnapshotFile;
use crate::shard::types::{Snapshot, SnapshotMeta, Vote};
use crate::shard::Shard;
use crate::types::ShardId;

/// The peer certificates of a connection, when TLS is on.
type PeerCerts = Option<Arc<Vec<CertificateDer<'static>>>>;

/// Largest snapshot a node accepts.
const SNAPSHOT_BYTES_MAX: u64 = 64 * 1024 * 1024 * 1024;

#[derive(Clone)]
pub struct TransportService {
    pub registry: Registry,
    /// With TLS on, a request must carry the certificate of the node it
    /// says it comes from, and that node must be a member of the shard.
    pub tls: bool,
    /// Set when the node stops: append streams end then, or the server's
    /// graceful shutdown would wait on them for ever.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

fn ok<T: serde::Serialize>(v: &T) -> Response<RaftReply> {
    Response::new(RaftReply {
        result: Some(ReplyResult::Ok(to_postcard(v).into())),
    })
}

fn err(msg: String) -> Response<RaftReply> {
    Response::new(RaftReply {
        result: Some(ReplyResult::Error(msg)),
    })
}

impl TransportService {
    /// Refuses a request that claims to come from this node, one whose TLS
    /// identity is not node `from`, or whose sender is not a member of
    /// `shard` (an empty replica, not yet told its membership, accepts any
    /// node of the cluster CA).
    fn check_sender(
        &self,
        certs: Option<&Vec<tonic::transport::CertificateDer<'static>>>,
        shard: &Shard,
        from: u64,
    ) -> Result<(), Status> {
        self.check_node(certs, from)?;
        if !self.tls {
            return Ok(());
        }
        let m = openraft::async_runtime::WatchReceiver::borrow_watched(&shard.raft.metrics())
            .membership_config
            .clone();
        let membership = m.membership();
        if membership.nodes().next().is_some() && membership.get_node(&from).is_none() {
            return Err(Status::permission_denied(format!(
                "node {from} is not a member of {}",
                shard.id
            )));
        }
        Ok(())
    }

    /// Refuses entries, a snapshot or a vote request from node `from`
    /// unless they come in its own name (`vote`: as leader, or as the
    /// candidate). Membership is not asked: a replica
    /// that missed the entry adding a new leader learns it only from that
    /// leader, and refusing it would keep the replica behind for good.
    /// openraft's own vote checks refuse a stale leader.
    fn check_leader(
        &self,
        certs: Option<&Vec<tonic::transport::CertificateDer<'static>>>,
        from: u64,
        vote: &Vote,
    ) -> Result<(), Status> {
        self.check_node(certs, from)?;
        let leader = *openraft::vote::RaftLeaderId::node_id(vote.leader_id());
        if leader != from {
            return Err(Status::permission_denied(format!(
                "node {from} sent a request in the name of node {leader}"
            )));
        }
        Ok(())
    }

    /// Refuses a request that claims to come from this node, or (with TLS)
    /// one whose certificate is not node `from`'s.
    fn check_node(
        &self,
        certs: Option<&Vec<tonic::transport::CertificateDer<'static>>>,
        from: u64,
    ) -> Result<(), Status> {
        if from == self.registry.node_id().0 {
            // A peer address that leads back here (a wrong config, a port
            // taken by something else): openraft must never see its own
            // messages.
            return Err(Status::failed_precondition(format!(
                "a Raft request from node {from} reached node {from} itself; check the \
                 addresses in the cluster config"
            )));
        }
        if !self.tls {
            return Ok(());
        }
        let certs = certs.map(Vec::as_slice).unwrap_or_default();
        if !crate::security::peer_is(certs, &crate::security::node_name(from)) {
            return Err(Status::permission_denied(format!(
                "the caller's certificate is not node {from}'s"
            )));
        }
        Ok(())
    }

    /// One AppendEntries call, unary or from an append stream. A heartbeat
    /// (no entries) leaves a quiet follower quiet: the leader may still send
    /// one or two while it quiesces. Entries wake it.
    async fn append(&self, certs: PeerCerts, req: RaftRequest) -> Result<RaftReply, Status> {
        let shard = self.shard(&req)?;
        let rpc: openraft::raft::AppendEntriesRequest<crate::shard::types::TypeConfig> =
            from_postcard(&req.payload, "append-entries request")
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.check_leader(certs.as_deref(), req.from_node, &rpc.vote)?;
        if shard.is_quiet() && !rpc.entries.is_empty() && shard.wake() {
            metrics::counter!(crate::metrics::SHARD_WAKES, "cause" => "append-entries request")
                .increment(1);
        }
        Ok(match shard.raft.append_entries(rpc).await {
            Ok(resp) => ok(&resp).into_inner(),
            Err(e) => err(e.to_string()).into_inner(),
        })
    }

    /// A vote or pre-vote request: taken from any cluster node asking in its
    /// own name, member or not, as entries are. A replica that missed a
    /// membership change learns of new members only from them; refusing
    /// one, a shard whose other voters are that candidate and this replica
    /// could elect no one. openraft grants a vote only to a log at least as
    /// up to date (by term, then index) and not while a leader's lease
    /// holds, so a removed node's requests change nothing.
    fn candidate(
        &self,
        request: Request<RaftRequest>,
        what: &'static str,
    ) -> Result<
        (
            Arc<Shard>,
            openraft::raft::VoteRequest<crate::shard::types::TypeConfig>,
        ),
        Status,
    > {
        let shard = self.shard(request.get_ref())?;
        let certs = request.peer_certs();
        let req = request.into_inner();
        let rpc: openraft::raft::VoteRequest<crate::shard::types::TypeConfig> =
            from_postcard(&req.payload, what)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.check_leader(certs.as_deref(), req.from_node, &rpc.vote)?;
        Ok((shard, rpc))
    }

    /// Wakes `shard` if it is quiet, for a candidate's `what`.
    fn wake_for(shard: &Shard, what: &'static str) {
        if shard.is_quiet() && shard.wake() {
            metrics::counter!(crate::metrics::SHARD_WAKES, "cause" => what).increment(1);
        }
    }

    fn shard(&self, req: &RaftRequest) -> Result<Arc<Shard>, Status> {
        if req.format_version != RAFT_WIRE_VERSION {
            return Err(Status::invalid_argument(format!(
                "raft wire version {} is not supported (this node speaks {RAFT_WIRE_VERSION})",
                req.format_version
            )));
        }
        self.registry
            .get(ShardId(req.shard_id))
            .ok_or_else(|| Status::not_found(format!("shard {} is not hosted here", req.shard_id)))
    }
}

/// A unary call other than AppendEntries; each one wakes a quiet replica.
macro_rules! forward {
    ($self:ident, $request:ident, $method:ident, $what:literal) => {{
        let shard = $self.shard($request.get_ref())?;
        $self.check_sender(
            $request.peer_certs().as_deref(),
            &shard,
            $request.get_ref().from_node,
        )?;
        let req = $request.into_inner();
        let rpc = from_postcard(&req.payload, $what)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if shard.is_quiet() && shard.wake() {
            metrics::counter!(crate::metrics::SHARD_WAKES, "cause" => $what).increment(1);
        }
        match shard.raft.$method(rpc).await {
            Ok(resp) => Ok(ok(&resp)),
            Err(e) => Ok(err(e.to_string())),
        }
    }};
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    async fn quiesce(
        &self,
        request: Request<QuiesceRequest>,
    ) -> Result<Response<QuiesceReply>, Status> {
        let certs = request.peer_certs();
        let req = request.into_inner();
        let shard = self.registry.get(ShardId(req.shard_id)).ok_or_else(|| {
            Status::not_found(format!("shard {} is not hosted here", req.shard_id))
        })?;
        self.check_sender(certs.as_deref(), &shard, req.from_node)?;
        let quiet = shard.quiesce_follower(req.from_node, req.term, req.last_log_index);
        Ok(Response::new(QuiesceReply { quiet }))
    }

    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        if self.tls {
            let from = request.get_ref().from_node;
            let certs = request.peer_certs();
            let certs = certs.as_deref().map(Vec::as_slice).unwrap_or_default();
            if !crate::security::peer_is(certs, &crate::security::node_name(from)) {
                return Err(Status::permission_denied(format!(
                    "the caller's certificate is not node {from}'s"
                )));
            }
        }
        self.registry.note_pinged_by(request.get_ref().from_node);
        if let Some(why) = self.registry.unfit_to_lead() {
            return Err(Status::unavailable(format!(
                "node {} cannot lead: {why}",
                self.registry.node_id().0
            )));
        }
        Ok(Response::new(PingReply {
            node_id: self.registry.node_id().0,
            apply_rules: crate::shard::apply::APPLY_RULES,
            now_ms: crate::types::now_ms(),
        }))
    }

    async fn append_entries(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let certs = request.peer_certs();
        self.append(certs, request.into_inner())
            .await
            .map(Response::new)
    }

    type AppendStreamStream = futures::stream::BoxStream<'static, Result<AppendReplyBatch, Status>>;

    /// Each call of each batch runs on its own task; replies leave as they
    /// are ready, as many in one message as are waiting.
    async fn append_stream(
        &self,
        request: Request<Streaming<AppendCallBatch>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let certs = request.peer_certs();
        let service = self.clone();
        Ok(Response::new(crate::api::mux::serve::<AppendCalls, _, _>(
            request.into_inner(),
            move |call| {
                let (service, certs) = (service.clone(), certs.clone());
                async move { service.append(certs, call).await }
            },
            self.shutdown.clone(),
        )))
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let (shard, rpc) = self.candidate(request, "vote request")?;
        Self::wake_for(&shard, "vote request");
        match shard.raft.vote(rpc).await {
            Ok(resp) => Ok(ok(&resp)),
            Err(e) => Ok(err(e.to_string())),
        }
    }

    /// A pre-vote on a quiet replica is not granted while the shard's
    /// leader is alive (this node, or one that pinged it within an election
    /// timeout: see `Registry::leader_alive`): a quiet shard has no lease to
    /// refuse it with, and a follower that restarted would win every quiet
    /// shard it follows. Refused so, only the leader wakes, and its
    /// heartbeats bring the candidate back; a follower stays quiet, since a
    /// woken follower, whose vote lease ran out long ago, would campaign at
    /// once and could win. Otherwise the replica wakes and answers as
    /// openraft does.
    async fn pre_vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let candidate = request.get_ref().from_node;
        let (shard, rpc) = self.candidate(request, "pre-vote request")?;
        if shard.is_quiet() {
            let me = self.registry.node_id().0;
            let leader = shard.raft.metrics().borrow_watched().current_leader;
            if let Some(leader) = leader.filter(|l| *l != candidate) {
                let within = self.registry.election_timeout();
                let answered = self.registry.answered_lately(leader);
                if leader == me || self.registry.leader_alive(leader, within, answered) {
                    if leader == me {
                        Self::wake_for(&shard, "pre-vote request");
                    }
                    return Ok(err(format!(
                        "shard {} was quiet under live leader {leader}; pre-vote not granted",
                        shard.id
                    )));
                }
            }
        }
        Self::wake_for(&shard, "pre-vote request");
        match shard.raft.pre_vote(rpc).await {
            Ok(resp) => Ok(ok(&resp)),
            Err(e) => Ok(err(e.to_string())),
        }
    }

    /// Taken only from the leader it names: it resets every receiver's
    /// leader lease, so a member sending it in the leader's name could
    /// take leadership from a live leader.
    async fn transfer_leader(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let rpc: openraft::raft::TransferLeaderRequest<crate::shard::types::TypeConfig> =
            from_postcard(&request.get_ref().payload, "transfer-leader request")
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let certs = request.peer_certs();
        self.check_leader(
            certs.as_deref(),
            request.get_ref().from_node,
            rpc.from_leader(),
        )?;
        forward!(
            self,
            request,
            handle_transfer_leader,
            "transfer-leader request"
        )
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftReply>, Status> {
        let certs = request.peer_certs();
        let mut stream = request.into_inner();
        let stall = crate::shard::network::SNAPSHOT_STALL_MAX;
        let first = tokio::time::timeout(stall, stream.next())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no snapshot data for {stall:?}")))?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        if first.format_version != RAFT_WIRE_VERSION {
            return Err(Status::invalid_argument("unsupported raft wire version"));
        }
        let shard = self.registry.get(ShardId(first.shard_id)).ok_or_else(|| {
            Status::not_found(format!("shard {} is not hosted here", first.shard_id))
        })?;
        let (vote, meta): (Vote, SnapshotMeta) = from_postcard(&first.header, "snapshot header")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.check_leader(certs.as_deref(), first.from_node, &vote)?;
        shard.wake();
        let dir = self.registry.storage().snapshot_dir(shard.id);
        tokio::fs::create_dir_all(&dir).await?;
        let path = dir.join(format!("recv-{}.tmp", rand::random::<u64>()));
        let key_path = crate::shard::snapshot::key_path(&path);
        // A sender that resets the stream, or a deadline that runs out,
        // drops this call mid-receive: the partial file and its key go too.
        let mut partial = PartialSnapshot {
            path: Some(path.clone()),
        };
        let keys = self.registry.storage().keys().clone();
        let result = async {
            if !first.seal_key.is_empty() {
                let key: crate::storage::seal::Key = first
                    .seal_key
                    .as_ref()
                    .try_into()
                    .map_err(|_| std::io::Error::other("snapshot seal key is not 32 bytes"))?;
                // In place, not on a blocking task: a dropped call must not
                // leave a write landing after its guard cleaned up.
                crate::storage::blocking(|| {
                    crate::storage::seal::write_key_file(&key_path, keys.current_epoch(), &key)
                })?;
            }
            // Created in place too; later writes go to the open file, which
            // the guard's removal unlinks whatever is in flight.
            let mut file = tokio::fs::File::from_std(crate::storage::blocking(|| {
                std::fs::File::create(&path)
            })?);
            let mut total = first.data.len() as u64;
            file.write_all(&first.data).await?;
            let mut stopping = self.shutdown.clone();
            loop {
                let stall = crate::shard::network::SNAPSHOT_STALL_MAX;
                let chunk = tokio::select! {
                    chunk = tokio::time::timeout(stall, stream.next()) => chunk.map_err(|_| {
                        std::io::Error::other(format!("no snapshot data for {stall:?}"))
                    })?,
                    _ = stopping.wait_for(|s| *s) => {
                        return Err(std::io::Error::other("this node is stopping"));
                    }
                };
                let Some(chunk) = chunk else { break };
                let chunk = chunk.map_err(std::io::Error::other)?;
                total += chunk.data.len() as u64;
                if total > SNAPSHOT_BYTES_MAX {
                    return Err(std::io::Error::other("snapshot exceeds the size limit"));
                }
                file.write_all(&chunk.data).await?;
            }
            file.sync_all().await?;
            // A stream that ended early (the sender failed to read its
            // file, say) must not reach openraft, which would make it the
            // current snapshot before loading it.
            let whole = path.clone();
            tokio::task::spawn_blocking(move || crate::shard::snapshot::verify(&whole))
                .await
                .map_err(std::io::Error::other)??;
            Ok::<(), std::io::Error>(())
        }
        .await;
        if let Err(e) = result {
            discard_received(&path, &key_path).await;
            partial.path = None;
            return Ok(err(format!("receive snapshot: {e}")));
        }
        // From here openraft owns the file: its state machine task may be
        // installing it even if this call is dropped.
        partial.path = None;
        let snapshot = Snapshot {
            meta,
            snapshot: SnapshotFile { path: path.clone() },
        };
        // In a task of its own, so that the unused file and its key go even
        // if this call is dropped while openraft decides (the sender gave
        // up: a leader that stepped down, whose snapshot is then refused).
        let raft = shard.raft.clone();
        let installing = tokio::spawn(async move {
            let reply = match raft.install_full_snapshot(vote, snapshot).await {
                Ok(resp) => ok(&resp),
                Err(e) => err(e.to_string()),
            };
            // Installed snapshots are renamed away; anything left is unused.
            discard_received(&path, &key_path).await;
            reply
        });
        installing
            .await
            .map_err(|e| Status::internal(format!("install snapshot: {e}")))
    }
}

/// A snapshot file still being received: removed, with its key destroyed,
/// if the receiving call is dropped before it ends.
struct PartialSnapshot {
    path: Option<std::path::PathBuf>,
}

impl Drop for PartialSnapshot {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(&path);
            let _ =
                crate::storage::seal::destroy_key_file(&crate::shard::snapshot::key_path(&path));
        }
    }
}

/// Removes a received snapshot file that was not installed, destroying its
/// key.
async fn discard_received(path: &std::path::Path, key_path: &std::path::Path) {
    let _ = tokio::fs::remove_file(path).await;
    let key_path = key_path.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || crate::storage::seal::destroy_key_file(&key_path))
        .await;
}
