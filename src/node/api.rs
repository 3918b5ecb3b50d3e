//! The node API: writes to shards this node leads, reads from its replicas at
//! the requested consistency, status and verification for routers and
//! `chatctl`.

use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use tonic::{Request, Response, Status};

use crate::api::pb::node::{
    read_request::Query, ChatDigestsReply, ChatDigestsRequest, EncodedReadReply,
    EncodedReadReplyBatch, Member, MemberProgress, NodeStatus, ReadCallBatch, ReadRequest,
    ShardRequest, ShardStatus, StatusRequest, WriteCallBatch, WriteReply, WriteReplyBatch,
    WriteRequest,
};
// Served with read replies' messages encoded (`crate::api::read_stream`).
use crate::api::pb::passthrough::node::node_api_server::NodeApi;
use crate::api::pb::replicated::{command, Command};
use crate::api::pb::Consistency;
use crate::api::read_stream::Reads;
use crate::api::status::{from_read_error, from_shard_error};
use crate::api::write_stream::WriteCalls;
use crate::cluster::Placement;
use crate::node::Registry;
use crate::shard::reads::SnapshotLoads;
use crate::shard::sealing;
use crate::shard::{Error as ShardError, Shard};
use crate::types::{ChatId, NodeId, ShardId};

/// How long a leader that a read token is ahead of may take to have a
/// quorum confirm that it still leads.
const DEPOSED_CHECK_WAIT: Duration = Duration::from_secs(2);

/// Most chats in one page of digests (`chatctl verify` pages by it).
pub const DIGESTS_PAGE_MAX: u32 = 50_000;

/// The chats a page of digests holds: as asked, at most
/// [`DIGESTS_PAGE_MAX`] (0, from a caller that does not page, too).
fn page_limit(asked: u32) -> u32 {
    match asked {
        0 => DIGESTS_PAGE_MAX,
        n => n.min(DIGESTS_PAGE_MAX),
    }
}

/// Largest node API request.
pub const NODE_API_MESSAGE_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Longest a SESSION read may wait for the replica to catch up.
pub const SESSION_WAIT_MS_MAX: u32 = 5_000;
/// Most commands in one write request.
pub const WRITE_COMMANDS_MAX: usize = 1_024;

#[derive(Clone)]
pub struct NodeApiService {
    pub registry: Registry,
    pub node_id: NodeId,
    /// Snapshots and digests are for operators: an admin token, and with
    /// TLS the operator's certificate.
    pub operator: crate::security::Operator,
    /// Set when the node stops: read streams end then, or the server's
    /// graceful shutdown would wait on them for ever.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl NodeApiService {
    fn shard(&self, id: u64) -> Result<std::sync::Arc<Shard>, Status> {
        hosted(&self.registry, id)
    }

    /// One write, from Write or a write stream.
    async fn write_one(&self, req: WriteRequest) -> Result<WriteReply, Status> {
        if req.commands.is_empty() || req.commands.len() > WRITE_COMMANDS_MAX {
            return Err(Status::invalid_argument(format!(
                "a write carries 1 to {WRITE_COMMANDS_MAX} commands, not {}",
                req.commands.len()
            )));
        }
        for command in &req.commands {
            let chat = client_command_chat(command).ok_or_else(|| {
                Status::invalid_argument(
                    "only a node proposes bootstrap, expiry, collection and apply-rules commands",
                )
            })?;
            chat_in_shard(self.registry.placement(), chat, req.shard_id)?;
            if let Some(command::Kind::Send(send)) = &command.kind {
                if send.self_destruct.is_some() && !sealing::self_destructs(&send.self_destruct) {
                    return Err(Status::invalid_argument(
                        "self_destruct is set but names no policy this node knows",
                    ));
                }
            }
        }
        let shard = self.shard(req.shard_id)?;
        metrics::counter!(crate::metrics::NODE_API_REQUESTS, "rpc" => "write").increment(1);
        // A leader whose clock is off would stamp the writes with it (see
        // `node::duties`).
        if shard.refuses_writes() && shard.is_leader() {
            return Err(from_shard_error(ShardError::Unavailable {
                shard: shard.id,
                reason: "this node's clock is off from its peers'; it takes no writes until \
                         its shards are handed over or the clock is fixed"
                    .into(),
            }));
        }
        #[cfg(feature = "broken-early-ack")]
        if shard.is_leader() {
            return Ok(broken_early_ack(&shard, req.commands, self.node_id));
        }
        let outcome = shard
            .propose(req.commands)
            .await
            .map_err(from_shard_error)?;
        Ok(WriteReply {
            results: outcome.results,
            log_index: outcome.log_index,
            log_term: outcome.log_term,
            leader_node: self.node_id.0,
            incarnation: shard.reader.incarnation(),
        })
    }

    /// One read, from Read or a read stream.
    async fn read_one(&self, req: ReadRequest) -> Result<EncodedReadReply, Status> {
        let chat = match &req.query {
            Some(Query::History(q)) => q.chat_id,
            Some(Query::Messages(q)) => q.chat_id,
            Some(Query::Difference(q)) => q.chat_id,
            Some(Query::Chat(q)) => q.chat_id,
            None => return Err(Status::invalid_argument("read request without a query")),
        };
        chat_in_shard(self.registry.placement(), chat, req.shard_id)?;
        let shard = self.shard(req.shard_id)?;
        metrics::counter!(crate::metrics::NODE_API_REQUESTS, "rpc" => "read").increment(1);
        let consistency = Consistency::try_from(req.consistency).map_err(|_| {
            Status::invalid_argument(format!("unknown consistency {}", req.consistency))
        })?;
        // Reads hide self-destructed messages by this node's clock. A
        // follower whose clock is off (or may be) sends the reader to
        // another replica; a leader hands its shards over within two ticks.
        // Checked again after the waits below, which may last seconds.
        let clock_check = || {
            if consistency != Consistency::Linearizable
                && self.registry.clock_suspect()
                && !shard.is_leader()
            {
                return Err(Status::unavailable(format!(
                    "node {}'s clock is off from its peers'; read shard {} from another replica",
                    self.node_id.0, req.shard_id
                )));
            }
            Ok(())
        };
        clock_check()?;
        match consistency {
            Consistency::Linearizable => {
                shard
                    .linearizable_barrier()
                    .await
                    .map_err(from_shard_error)?;
            }
            Consistency::Session => {
                if shard.is_leader() {
                    // The leader's log holds every committed entry, so a
                    // token beyond its log's end was not issued for a
                    // committed write. (Its commit index can briefly lag
                    // right after an election, so that is not the bound.)
                    // A long poll (a Watch) may wait for the entry after
                    // the end.
                    let polls_next = u64::from(req.wait_ms > 0);
                    if req.min_index > shard.last_log_index() + polls_next {
                        // Unless this node was deposed without knowing it
                        // (cut off from the others, which elected and
                        // committed more). A quorum that confirms it as
                        // leader after the request came proves the token
                        // names no committed entry; without that the
                        // client is sent elsewhere, not told its token is
                        // bad.
                        let confirmed =
                            tokio::time::timeout(DEPOSED_CHECK_WAIT, shard.linearizable_barrier())
                                .await;
                        let last = shard.last_log_index();
                        if req.min_index > last + polls_next {
                            return Err(match confirmed {
                                Ok(Ok(_)) => Status::invalid_argument(format!(
                                    "read token names index {} of shard {}, beyond its log end {last}",
                                    req.min_index, req.shard_id
                                )),
                                _ => from_shard_error(ShardError::Behind {
                                    shard: shard.id,
                                    applied: shard.applied_index(),
                                    wanted: req.min_index,
                                    waited_ms: 0,
                                }),
                            });
                        }
                    }
                }
                let wait = Duration::from_millis(req.wait_ms.min(SESSION_WAIT_MS_MAX) as u64);
                let until = tokio::time::Instant::now() + wait;
                shard
                    .wait_applied(req.min_index, wait)
                    .await
                    .map_err(from_shard_error)?;
                if let Some(Query::Difference(q)) = &req.query {
                    if q.wait_for_change && req.wait_ms > 0 {
                        wait_for_change(&shard, q.chat_id, q.pts, until).await?;
                    }
                }
            }
            Consistency::Stale => {}
        }
        clock_check()?;
        // A snapshot load empties the tree and fills it again; a read that
        // overlaps one is refused, and the router asks another replica.
        let loads = shard.reader.loads().count();
        if SnapshotLoads::under_way(loads) {
            return Err(loading_snapshot(req.shard_id));
        }
        // Only the applied log id is needed; no copy of the whole metrics.
        // The position is completed after the query (see below).
        let applied = shard.raft.metrics().borrow_watched().last_applied;
        let mut reply = EncodedReadReply {
            applied_index: applied.map(|l| l.index).unwrap_or(0),
            complete_through: applied.map(|l| l.index).unwrap_or(0),
            applied_term: applied.map(|l| l.leader_id.term).unwrap_or(0),
            served_by_node: self.node_id.0,
            incarnation: shard.reader.incarnation(),
            now_ms: crate::types::now_ms(),
            ..Default::default()
        };
        let reader = &shard.reader;
        let answered = match req.query {
            Some(Query::History(q)) => reader
                .history(q.chat_id, q.before_seq, q.limit)
                .map(|m| reply.messages = m)
                .map_err(from_read_error),
            Some(Query::Messages(q)) => reader
                .messages(q.chat_id, &q.seqs)
                .map(|m| reply.messages = m)
                .map_err(from_read_error),
            Some(Query::Difference(q)) => reader
                .difference(q.chat_id, q.pts, q.limit, q.bytes_max)
                .map(|d| reply.difference = Some(d))
                .map_err(from_read_error),
            Some(Query::Chat(q)) => reader
                .chat(q.chat_id)
                .map(|c| reply.chat = Some(c))
                .map_err(|e| Status::internal(e.to_string())),
            None => Err(Status::invalid_argument("read request without a query")),
        };
        // An error read from a half-loaded tree (a chat closed in the
        // snapshot, a record not there yet) is refused like an answer.
        if !shard.reader.loads().unchanged(loads) {
            return Err(loading_snapshot(req.shard_id));
        }
        // An apply call's effects are in the tree before openraft's applied
        // index moves: the position covers every entry the answer may show.
        reply.applied_index = reply
            .applied_index
            .max(shard.reader.loads().written_through());
        answered.map(|()| reply)
    }
}

/// Waits until `chat` has a change after `pts`, `until` passes or the
/// replica is shut down ([`Shard::shutdown`]), looking again each time the
/// state machine puts the chat's record (it is in memory) or loads a
/// snapshot; the caller answers either way.
async fn wait_for_change(
    shard: &Shard,
    chat: u64,
    pts: u64,
    until: tokio::time::Instant,
) -> Result<(), Status> {
    let waiter = shard.reader.chat_waiter(chat);
    // Bounded by `until`: each round waits for one more put of the record.
    loop {
        // Taken before the record is read: a put after the read wakes it.
        let changed = waiter.changed();
        let rec = shard
            .reader
            .chat_record(chat)
            .map_err(|e| Status::internal(e.to_string()))?;
        if rec.last_pts > pts || waiter.stopped() {
            return Ok(());
        }
        if tokio::time::timeout_at(until, changed).await.is_err() {
            return Ok(());
        }
    }
}

/// The chat a client command writes to; None for the commands only a node
/// proposes to its own shards (`node::duties`): through this API one would
/// let a caller expire messages early, drop dedup records, or raise the apply
/// rules past what any binary knows and stop the shard.
fn client_command_chat(command: &Command) -> Option<u64> {
    match command.kind.as_ref()? {
        command::Kind::Send(c) => Some(c.chat_id),
        command::Kind::Edit(c) => Some(c.chat_id),
        command::Kind::Delete(c) => Some(c.chat_id),
        command::Kind::MarkRead(c) => Some(c.chat_id),
        command::Kind::CloseChat(c) => Some(c.chat_id),
        command::Kind::ReopenChat(c) => Some(c.chat_id),
        command::Kind::Expire(_)
        | command::Kind::GcDedup(_)
        | command::Kind::Bootstrap(_)
        | command::Kind::GcChanges(_)
        | command::Kind::RaiseApplyRules(_) => None,
    }
}

/// Refuses a request for `chat` sent to a shard that does not hold it under
/// this node's placement: a router whose config names another shard count
/// would otherwise split the chat's history over two shards.
fn chat_in_shard(placement: &Placement, chat: u64, shard: u64) -> Result<(), Status> {
    let owner = placement.shard_of_chat(ChatId(chat));
    if owner.0 == shard {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "chat {chat} is in shard {} of {} here, not shard {shard}: the caller's cluster config \
         does not match this node's",
        owner.0,
        placement.shard_count()
    )))
}

fn loading_snapshot(shard: u64) -> Status {
    Status::unavailable(format!(
        "shard {shard}: this replica is loading a snapshot; read from another"
    ))
}

/// This node's replica of shard `id`. A replica that is not here (moved away,
/// or not yet opened) is UNAVAILABLE, so a router tries another one.
pub fn hosted(registry: &Registry, id: u64) -> Result<std::sync::Arc<Shard>, Status> {
    registry.get(ShardId(id)).ok_or_else(|| {
        Status::unavailable(format!(
            "shard {id} has no replica on node {}; try another replica",
            registry.node_id().0
        ))
    })
}

pub fn shard_status(shard: &Shard, registry: &Registry) -> ShardStatus {
    let m = shard.raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let learners: Vec<u64> = membership.learner_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, n)| Member {
            node_id: *id,
            addr: n.addr.clone(),
            region: n.region.clone(),
        })
        .collect();
    let progress = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .map(|(id, at)| MemberProgress {
                    node_id: *id,
                    matched_index: at.as_ref().map(|l| l.index).unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default();
    ShardStatus {
        shard_id: shard.id.0,
        leader_node: m.current_leader.unwrap_or(0),
        is_leader: m.state == openraft::ServerState::Leader,
        term: m.current_term,
        last_log_index: m.last_log_index.unwrap_or(0),
        committed_index: m.local_committed.as_ref().map(|l| l.index).unwrap_or(0),
        applied_index: m.last_applied.as_ref().map(|l| l.index).unwrap_or(0),
        snapshot_index: m.snapshot.as_ref().map(|l| l.index).unwrap_or(0),
        purged_index: m.purged.as_ref().map(|l| l.index).unwrap_or(0),
        voters,
        learners,
        state: format!("{:?}", m.state),
        members,
        progress,
        preferred_region: registry.placement().preferred_region(shard.id).to_string(),
        quiet: shard.is_quiet(),
        apply_rules: shard
            .reader
            .settings()
            .map(|s| s.apply_rules)
            .unwrap_or_default(),
        joint: membership.get_joint_config().len() > 1,
        membership_index: m.membership_config.log_id().as_ref().map_or(0, |l| l.index),
    }
}

/// This node's status: identity, draining flag and every replica it hosts.
pub fn node_status(registry: &Registry) -> NodeStatus {
    let clocks = registry.clock_report();
    NodeStatus {
        node_id: registry.node_id().0,
        region: registry.region().to_string(),
        shards: registry
            .all()
            .iter()
            .map(|s| shard_status(s, registry))
            .collect(),
        addr: registry.addr().to_string(),
        draining: registry.is_draining(),
        shard_count: registry.placement().shard_count(),
        cluster_name: registry.config().cluster_name.clone(),
        clock_offset_ms: clocks.own_offset_ms,
        clock_off: clocks.own_is_off(),
        replication_factor: registry.config().replication_factor,
    }
}

#[tonic::async_trait]
impl NodeApi for NodeApiService {
    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteReply>, Status> {
        self.write_one(request.into_inner())
            .await
            .map(Response::new)
    }

    type WriteStreamStream = futures::stream::BoxStream<'static, Result<WriteReplyBatch, Status>>;

    /// Each write of each batch runs on its own task; replies leave as their
    /// entries are applied, as many in one message as are waiting.
    async fn write_stream(
        &self,
        request: Request<tonic::Streaming<WriteCallBatch>>,
    ) -> Result<Response<Self::WriteStreamStream>, Status> {
        let service = self.clone();
        Ok(Response::new(crate::api::mux::serve::<WriteCalls, _, _>(
            request.into_inner(),
            move |req| {
                let service = service.clone();
                async move { service.write_one(req).await }
            },
            self.shutdown.clone(),
        )))
    }

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<EncodedReadReply>, Status> {
        self.read_one(request.into_inner()).await.map(Response::new)
    }

    type ReadStreamStream =
        futures::stream::BoxStream<'static, Result<EncodedReadReplyBatch, Status>>;

    /// Each read of each batch runs on its own task; replies leave as they
    /// are ready, as many in one message as are waiting.
    async fn read_stream(
        &self,
        request: Request<tonic::Streaming<ReadCallBatch>>,
    ) -> Result<Response<Self::ReadStreamStream>, Status> {
        let service = self.clone();
        Ok(Response::new(crate::api::mux::serve::<Reads, _, _>(
            request.into_inner(),
            move |req| {
                let service = service.clone();
                async move { service.read_one(req).await }
            },
            self.shutdown.clone(),
        )))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<NodeStatus>, Status> {
        Ok(Response::new(node_status(&self.registry)))
    }

    async fn chat_digests(
        &self,
        request: Request<ChatDigestsRequest>,
    ) -> Result<Response<ChatDigestsReply>, Status> {
        self.operator.check(&request)?;
        let req = request.into_inner();
        let id = req.shard_id;
        let shard = self.shard(id)?;
        let loads = shard.reader.loads().count();
        // Settled: no apply call was writing when the scan began or ended,
        // and none ran in between, so the digests are of exactly `applied`.
        let position = || {
            (
                shard.applied_index(),
                shard.reader.loads().written_through(),
            )
        };
        let before = position();
        let chats = crate::storage::blocking(|| {
            shard
                .reader
                .digests(req.after_chat, page_limit(req.limit) as usize)
        });
        if !shard.reader.loads().unchanged(loads) {
            return Err(loading_snapshot(id));
        }
        let (applied, written) = position();
        if (applied, written) != before || written > applied {
            return Err(Status::unavailable(format!(
                "shard {id} applied entries while its chats were read; ask again"
            )));
        }
        let (chats, more) = chats.map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ChatDigestsReply {
            format: crate::shard::reads::DIGEST_FORMAT,
            applied_index: applied,
            chats,
            more,
        }))
    }

    async fn trigger_snapshot(
        &self,
        request: Request<ShardRequest>,
    ) -> Result<Response<ShardStatus>, Status> {
        self.operator.check(&request)?;
        let shard = self.shard(request.into_inner().shard_id)?;
        build_snapshot(&shard).await?;
        Ok(Response::new(shard_status(&shard, &self.registry)))
    }
}

/// Builds a snapshot of everything `shard` has applied and waits for it.
pub async fn build_snapshot(shard: &Shard) -> Result<u64, Status> {
    let applied = shard.applied_index();
    shard
        .raft
        .trigger()
        .snapshot()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let m = shard
        .raft
        .wait(Some(Duration::from_secs(30)))
        .metrics(
            |m| m.snapshot.as_ref().map(|s| s.index).unwrap_or(0) >= applied,
            "snapshot built",
        )
        .await
        .map_err(|e| Status::deadline_exceeded(e.to_string()))?;
    Ok(m.snapshot.map(|s| s.index).unwrap_or(0))
}

/// DELIBERATELY BROKEN (feature `broken-early-ack`, tests only): acknowledges
/// a write as soon as it is handed to Raft, before a majority has it, so the
/// chaos checker can prove it catches lost writes.
#[cfg(feature = "broken-early-ack")]
fn broken_early_ack(
    shard: &std::sync::Arc<Shard>,
    commands: Vec<crate::api::pb::replicated::Command>,
    node: NodeId,
) -> WriteReply {
    use crate::api::pb::replicated::{
        command, command_result, ChangeResult, CommandResult, SendResult,
    };
    let results = commands
        .iter()
        .map(|c| CommandResult {
            outcome: Some(match c.kind {
                Some(command::Kind::Send(_)) => command_result::Outcome::Send(SendResult {
                    seq: 0,
                    pts: 0,
                    created_at_ms: crate::types::now_ms(),
                    duplicate: false,
                }),
                _ => command_result::Outcome::Change(ChangeResult {
                    pts: 0,
                    more: false,
                }),
            }),
        })
        .collect();
    let shard = shard.clone();
    tokio::spawn(async move {
        let _ = shard.propose(commands).await;
    });
    WriteReply {
        results,
        log_index: 0,
        log_term: 0,
        leader_node: node.0,
        incarnation: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pb::replicated::{
        BootstrapCmd, CloseChatCmd, DeleteCmd, EditCmd, ExpireCmd, GcChangesCmd, GcDedupCmd,
        MarkReadCmd, RaiseApplyRulesCmd, ReopenChatCmd, SendCmd,
    };
    use crate::cluster::ClusterConfig;

    fn cmd(kind: command::Kind) -> Command {
        Command { kind: Some(kind) }
    }

    /// Client commands name their chat; the ones only a node proposes to
    /// itself are refused through the API.
    #[test]
    fn only_client_commands_come_through_the_api() {
        use command::Kind as K;
        let client = [
            K::Send(SendCmd {
                chat_id: 7,
                ..Default::default()
            }),
            K::Edit(EditCmd {
                chat_id: 7,
                ..Default::default()
            }),
            K::Delete(DeleteCmd {
                chat_id: 7,
                ..Default::default()
            }),
            K::MarkRead(MarkReadCmd {
                chat_id: 7,
                ..Default::default()
            }),
            K::CloseChat(CloseChatCmd {
                chat_id: 7,
                ..Default::default()
            }),
            K::ReopenChat(ReopenChatCmd { chat_id: 7 }),
        ];
        for k in client {
            assert_eq!(client_command_chat(&cmd(k.clone())), Some(7), "{k:?}");
        }
        let internal = [
            K::Expire(ExpireCmd::default()),
            K::GcDedup(GcDedupCmd::default()),
            K::Bootstrap(BootstrapCmd::default()),
            K::GcChanges(GcChangesCmd::default()),
            K::RaiseApplyRules(RaiseApplyRulesCmd {
                apply_rules: u32::MAX,
            }),
        ];
        for k in internal {
            assert_eq!(client_command_chat(&cmd(k.clone())), None, "{k:?}");
        }
        assert_eq!(client_command_chat(&Command { kind: None }), None);
    }

    /// A chat is served only by the shard the node's placement gives it.
    #[test]
    fn a_chat_sent_to_another_shard_is_refused() {
        let config = ClusterConfig::from_toml(
            "cluster_name = \"t\"\nshards = 8\nreplication_factor = 1\nregions = [\"eu\"]\n\
             [[nodes]]\nid = 1\nregion = \"eu\"\nraft_addr = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let placement = Placement::new(&config);
        let chat = 42;
        let owner = placement.shard_of_chat(ChatId(chat)).0;
        assert!(chat_in_shard(&placement, chat, owner).is_ok());
        let other = (owner + 1) % 8;
        let refused = chat_in_shard(&placement, chat, other).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("does not match"), "{refused}");
    }
}
