//! The public `chatstore.v1.ChatStore` service on a router.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message as _;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::api::pb::node::{read_request::Query, DifferenceQuery, EncodedMessagesResponse};
use crate::api::pb::passthrough::chat::chat_store_server::ChatStore;
use crate::api::pb::replicated::{self as rp, command, command_result, Command};
use crate::api::pb::{self, self_destruct_policy};
use crate::router::token::{ShardPosition, Token};
use crate::router::{validate, watch, Router};
use crate::security::Role;
use crate::shard::reads::PAGE_BYTES_MAX;

/// Most writes one MarkRead makes: each starts up to a thousand
/// delete-after-read timers (at least one).
const MARK_READ_STEPS_MAX: usize = 10_000;

/// Longest a MarkRead or a SendBatch goes on starting writes; then it
/// answers with what is done and says to send the rest again. Well inside
/// the server's [`crate::router::API_CALL_TIME_MAX`], whose expiry ends a
/// call as CANCELLED, which clients do not retry, with part of it written.
const WRITES_TIME_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// Most Watch streams one router serves at once.
pub const WATCH_STREAMS_MAX: usize = 10_000;
/// Most Watch streams on one client connection.
pub const WATCH_STREAMS_PER_CONNECTION_MAX: usize = 1_000;
/// Most chats one router watches at once, over all its streams. Each
/// watched chat keeps a long poll waiting on a replica, most of them on the
/// router's own region's node, whose stream from this router takes
/// [`crate::api::mux::CALLS_WAITING_MAX`] waiting calls: this leaves room there for
/// writes and other reads.
pub const WATCHED_CHATS_MAX: usize = 50_000;

pub struct ChatStoreService {
    pub router: Router,
    pub watch_slots: Arc<Semaphore>,
    /// One permit per chat watched (all streams).
    watched_chats: Arc<Semaphore>,
    /// The watched chats, and their shared polls.
    watch_feeds: watch::Feeds,
    /// Turns true when the router stops: Watch streams end then, so that
    /// the server's graceful shutdown is not held up by them.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Open Watch streams by client connection (its remote address).
    watches_by_connection: Arc<std::sync::Mutex<HashMap<SocketAddr, usize>>>,
}

/// One Watch stream counted against its connection until dropped.
struct ConnectionWatch {
    counts: Arc<std::sync::Mutex<HashMap<SocketAddr, usize>>>,
    peer: SocketAddr,
}

impl Drop for ConnectionWatch {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("watch counts");
        if let Some(n) = counts.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

impl ChatStoreService {
    pub fn new(router: Router, stopping: tokio::sync::watch::Receiver<bool>) -> ChatStoreService {
        ChatStoreService {
            router,
            stopping,
            watch_slots: Arc::new(Semaphore::new(WATCH_STREAMS_MAX)),
            watched_chats: Arc::new(Semaphore::new(WATCHED_CHATS_MAX)),
            watch_feeds: watch::Feeds::default(),
            watches_by_connection: Arc::default(),
        }
    }

    /// Counts a new Watch against its connection, refusing one too many.
    fn count_watch(&self, peer: Option<SocketAddr>) -> Result<Option<ConnectionWatch>, Status> {
        let Some(peer) = peer else {
            return Ok(None);
        };
        let mut counts = self.watches_by_connection.lock().expect("watch counts");
        let n = counts.entry(peer).or_default();
        if *n >= WATCH_STREAMS_PER_CONNECTION_MAX {
            return Err(Status::resource_exhausted(format!(
                "this connection has {WATCH_STREAMS_PER_CONNECTION_MAX} watches open already; \
                 watch more chats per stream or open another connection"
            )));
        }
        *n += 1;
        Ok(Some(ConnectionWatch {
            counts: self.watches_by_connection.clone(),
            peer,
        }))
    }

    fn token(&self, bytes: &bytes::Bytes) -> Result<Token, Status> {
        self.router
            .keys()
            .token(bytes)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    /// Validates and stores one send (of `Send` or of a `SendBatch`).
    /// Validates a send and builds its command; decodes its token first, so
    /// a malformed one changes nothing.
    fn prepare_send(&self, r: pb::SendRequest) -> Result<(Command, Token), Status> {
        validate::send(&r)?;
        let self_destruct = r
            .self_destruct
            .and_then(|s| s.policy)
            .map(|p| rp::SelfDestruct {
                policy: Some(match p {
                    self_destruct_policy::Policy::AfterSendSecs(s) => {
                        rp::self_destruct::Policy::AfterSendSecs(s)
                    }
                    self_destruct_policy::Policy::AfterReadSecs(s) => {
                        rp::self_destruct::Policy::AfterReadSecs(s)
                    }
                }),
            });
        let token = self.token(&r.min_token)?;
        let cmd = Command {
            kind: Some(command::Kind::Send(rp::SendCmd {
                chat_id: r.chat_id,
                sender_id: r.sender_id,
                client_msg_id: r.client_msg_id,
                body: r.body,
                self_destruct,
                sealed_body: None,
            })),
        };
        Ok((cmd, token))
    }

    /// A send's response from its result and position.
    fn sent(
        &self,
        result: rp::CommandResult,
        position: crate::router::token::ShardPosition,
        mut token: Token,
    ) -> Result<pb::SendResponse, Status> {
        match result.outcome {
            Some(command_result::Outcome::Send(s)) => {
                token.merge_write(position);
                Ok(pb::SendResponse {
                    seq: s.seq,
                    pts: s.pts,
                    created_at_ms: s.created_at_ms,
                    read_token: self.router.keys().issue(&token),
                    duplicate: s.duplicate,
                })
            }
            Some(command_result::Outcome::Error(e)) => {
                Err(crate::router::command_error_status(e.code, &e.message))
            }
            _ => Err(Status::internal("send returned no send result")),
        }
    }

    async fn send_one(&self, r: pb::SendRequest) -> Result<pb::SendResponse, Status> {
        let chat = r.chat_id;
        let (cmd, token) = self.prepare_send(r)?;
        let shard = self.router.shard_of(chat);
        let (result, position) = self.router.write_queued(shard, cmd).await?;
        self.sent(result, position, token)
    }

    /// The sends of a batch to one shard (indexes into the batch, in
    /// request order), through [`write_in_groups`].
    async fn send_to_shard(
        &self,
        shard: crate::types::ShardId,
        items: Vec<(usize, Command, Token)>,
    ) -> Vec<(usize, Result<(pb::SendResponse, ShardPosition), Status>)> {
        write_in_groups(shard, items, |commands| {
            self.router.write_group(shard, commands)
        })
        .await
        .into_iter()
        .map(|(i, written)| {
            let sent = written.and_then(|(result, position, token)| {
                Ok((self.sent(result, position, token)?, position))
            });
            (i, sent)
        })
        .collect()
    }

    async fn write_change(
        &self,
        chat: u64,
        token: Token,
        kind: command::Kind,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let mut token = token;
        let w = self
            .router
            .write(chat, Command { kind: Some(kind) })
            .await?;
        token.merge_write(w.position);
        let pts = match w.result.outcome {
            Some(command_result::Outcome::Change(c)) => c.pts,
            _ => 0,
        };
        Ok(Response::new(pb::WriteResponse {
            pts,
            read_token: self.router.keys().issue(&token),
        }))
    }

    async fn read(
        &self,
        chat: u64,
        consistency: i32,
        token: &bytes::Bytes,
        query: Query,
    ) -> Result<(crate::api::pb::node::EncodedReadReply, bytes::Bytes), Status> {
        let consistency = validate::consistency(consistency)?;
        let mut token = self.token(token)?;
        let shard = self.router.shard_of(chat);
        let answer = self
            .router
            .read(shard, consistency, token.position(shard.0), query)
            .await?;
        token.merge(answer.position);
        Ok((answer.reply, self.router.keys().issue(&token)))
    }
}

fn record(metric_rpc: &'static str) {
    metrics::counter!(crate::metrics::ROUTER_REQUESTS, "rpc" => metric_rpc).increment(1);
}

/// One send of a batch as [`write_in_groups`] returns it: its command's
/// result, the position of the entry that carried it, and its token.
type Written = Result<(rp::CommandResult, ShardPosition, Token), Status>;

/// Writes the sends of a batch to one shard (indexes into the batch, in
/// request order) with `write`: one group per node call, as many as fit,
/// calls one after another, so each chat's sends are stored in request
/// order. Once a group fails, the later ones are not written: they may be
/// to the same chats, and stored now they would come before the failed
/// sends once the client retries those. Past [`WRITES_TIME_MAX`] the
/// groups not yet started are not written either.
async fn write_in_groups<W, F>(
    shard: crate::types::ShardId,
    items: Vec<(usize, Command, Token)>,
    mut write: W,
) -> Vec<(usize, Written)>
where
    W: FnMut(Vec<Command>) -> F,
    F: std::future::Future<Output = crate::router::batcher::GroupResult>,
{
    let mut out = Vec::with_capacity(items.len());
    let mut items = items.into_iter().peekable();
    let started = tokio::time::Instant::now();
    while items.peek().is_some() {
        if started.elapsed() >= WRITES_TIME_MAX {
            let not_sent = Status::unavailable(format!(
                "not sent: this batch's writes to {shard} took {:?}; send the rest again",
                started.elapsed()
            ));
            for (i, _, _) in items.by_ref() {
                out.push((i, Err(not_sent.clone())));
            }
            break;
        }
        let mut group = Vec::new();
        let mut bytes = 0;
        while let Some((_, cmd, _)) = items.peek() {
            let b = crate::shard::sealing::stored_len(cmd);
            if !group.is_empty() && !crate::router::batcher::group_fits(group.len() + 1, bytes + b)
            {
                break;
            }
            bytes += b;
            group.push(items.next().expect("peeked"));
        }
        let commands: Vec<Command> = group.iter().map(|(_, c, _)| c.clone()).collect();
        match write(commands).await {
            Ok((results, position)) => {
                for ((i, _, token), result) in group.into_iter().zip(results) {
                    out.push((i, Ok((result, position, token))));
                }
            }
            Err(s) => {
                for (i, _, _) in group {
                    out.push((i, Err(s.clone())));
                }
                // Never tried, so always worth retrying, whatever the
                // failed group's error was.
                let not_sent = Status::unavailable(format!(
                    "not sent, after an earlier part of this batch to {shard} failed: {}",
                    s.message()
                ));
                for (i, _, _) in items.by_ref() {
                    out.push((i, Err(not_sent.clone())));
                }
            }
        }
    }
    out
}

#[tonic::async_trait]
impl ChatStore for ChatStoreService {
    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        record("send");
        self.router
            .tokens()
            .check(request.metadata(), Role::Service)?;
        Ok(Response::new(self.send_one(request.into_inner()).await?))
    }

    async fn send_batch(
        &self,
        request: Request<pb::SendBatchRequest>,
    ) -> Result<Response<pb::SendBatchResponse>, Status> {
        record("send_batch");
        self.router
            .tokens()
            .check(request.metadata(), Role::Service)?;
        let r = request.into_inner();
        if r.sends.is_empty() || r.sends.len() > validate::SEND_BATCH_MAX {
            return Err(Status::invalid_argument(format!(
                "a batch carries 1 to {} sends, not {}",
                validate::SEND_BATCH_MAX,
                r.sends.len()
            )));
        }
        let total = r.sends.len();
        let mut results: Vec<Option<Result<pb::SendResponse, Status>>> = vec![None; total];
        let mut by_shard: std::collections::BTreeMap<u64, Vec<(usize, Command, Token)>> =
            Default::default();
        let min_tokens: Vec<bytes::Bytes> = r.sends.iter().map(|s| s.min_token.clone()).collect();
        for (i, send) in r.sends.into_iter().enumerate() {
            let shard = self.router.shard_of(send.chat_id);
            match self.prepare_send(send) {
                Ok((cmd, token)) => by_shard.entry(shard.0).or_default().push((i, cmd, token)),
                Err(s) => results[i] = Some(Err(s)),
            }
        }
        let per_shard = futures::future::join_all(
            by_shard
                .into_iter()
                .map(|(shard, items)| self.send_to_shard(crate::types::ShardId(shard), items)),
        )
        .await;
        // When every stored send came with one token (one user's sends), the
        // batch also returns one token covering all of them: a client keeps
        // only its newest token, and each send's own covers only its write.
        // None if the bound on a token's positions dropped any of them.
        let stored: Vec<_> = per_shard
            .iter()
            .flatten()
            .filter_map(|(i, r)| {
                r.as_ref()
                    .ok()
                    .map(|(_, position)| (&min_tokens[*i], *position))
            })
            .collect();
        let mut batch_token = bytes::Bytes::new();
        if let Some((first, _)) = stored.first() {
            let mut covering = self.token(first)?;
            for (_, position) in &stored {
                covering.merge_write(*position);
            }
            let one_token = stored.iter().all(|(t, _)| t == first);
            // Merging keeps the later position of each shard it holds.
            let covers_all = stored
                .iter()
                .all(|(_, p)| covering.position(p.shard).is_some());
            if one_token && covers_all {
                batch_token = self.router.keys().issue(&covering);
            }
        }
        for (i, result) in per_shard.into_iter().flatten() {
            results[i] = Some(result.map(|(sent, _)| sent));
        }
        let outcomes = results
            .into_iter()
            .map(
                |o| match o.unwrap_or_else(|| Err(Status::internal("send lost"))) {
                    Ok(sent) => pb::SendOutcome {
                        sent: Some(sent),
                        ..Default::default()
                    },
                    Err(s) => pb::SendOutcome {
                        sent: None,
                        error_code: s.code() as i32,
                        error_message: s.message().to_string(),
                    },
                },
            )
            .collect();
        Ok(Response::new(pb::SendBatchResponse {
            outcomes,
            read_token: batch_token,
        }))
    }

    async fn edit(
        &self,
        request: Request<pb::EditRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        record("edit");
        self.router
            .tokens()
            .check(request.metadata(), Role::Service)?;
        let r = request.into_inner();
        validate::edit(&r)?;
        let token = self.token(&r.min_token)?;
        self.write_change(
            r.chat_id,
            token,
            command::Kind::Edit(rp::EditCmd {
                chat_id: r.chat_id,
                seq: r.seq,
                editor_id: r.editor_id,
                body: r.body,
                sealed_body: None,
                // With an id of its own, the router's retries of this call
                // change nothing twice.
                edit_id: match r.client_edit_id {
                    0 => rand::random::<u64>().max(1),
                    id => id,
                },
            }),
        )
        .await
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        record("delete");
        self.router
            .tokens()
            .check(request.metadata(), Role::Service)?;
        let r = request.into_inner();
        validate::delete(&r)?;
        let token = self.token(&r.min_token)?;
        self.write_change(
            r.chat_id,
            token,
            command::Kind::Delete(rp::DeleteCmd {
                chat_id: r.chat_id,
                seq: r.seq,
                requester_id: r.requester_id,
            }),
        )
        .await
    }

    async fn mark_read(
        &self,
        request: Request<pb::MarkReadRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        record("mark_read");
        self.router
            .tokens()
            .check(request.metadata(), Role::Service)?;
        let r = request.into_inner();
        validate::mark_read(&r)?;
        let mut token = self.token(&r.min_token)?;
        let command = Command {
            kind: Some(command::Kind::MarkRead(rp::MarkReadCmd {
                chat_id: r.chat_id,
                reader_id: r.reader_id,
                up_to_seq: r.up_to_seq,
            })),
        };
        // A MarkRead over many delete-after-read messages starts their
        // timers a bounded number at a time: the same command again goes on
        // from where the last one stopped.
        let started = tokio::time::Instant::now();
        for step in 0..MARK_READ_STEPS_MAX {
            if started.elapsed() >= WRITES_TIME_MAX {
                break;
            }
            let w = match self.router.write(r.chat_id, command.clone()).await {
                Ok(w) => w,
                // Earlier steps took effect: whatever stopped this one, the
                // caller must not read it as "nothing was done". The same
                // MarkRead again goes on, or is refused with nothing done.
                Err(s) if step > 0 => {
                    return Err(Status::unavailable(format!(
                        "the read cursor moved part of the way, then: {}; send the same \
                         MarkRead again to go on",
                        s.message()
                    )))
                }
                Err(s) => return Err(s),
            };
            token.merge_write(w.position);
            let (pts, more) = match w.result.outcome {
                Some(command_result::Outcome::Change(c)) => (c.pts, c.more),
                _ => (0, false),
            };
            if !more {
                return Ok(Response::new(pb::WriteResponse {
                    pts,
                    read_token: self.router.keys().issue(&token),
                }));
            }
        }
        Err(Status::unavailable(format!(
            "the read cursor moved part of the way in {:?} (at most {MARK_READ_STEPS_MAX} steps, \
             {WRITES_TIME_MAX:?}); send the same MarkRead again to go on",
            started.elapsed()
        )))
    }

    async fn close_chat(
        &self,
        request: Request<pb::CloseChatRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        record("close_chat");
        self.router
            .tokens()
            .check(request.metadata(), Role::Admin)?;
        let r = request.into_inner();
        validate::close(&r)?;
        let token = self.token(&r.min_token)?;
        self.write_change(
            r.chat_id,
            token,
            command::Kind::CloseChat(rp::CloseChatCmd {
                chat_id: r.chat_id,
                reason: r.reason,
            }),
        )
        .await
    }

    async fn reopen_chat(
        &self,
        request: Request<pb::ReopenChatRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        record("reopen_chat");
        self.router
            .tokens()
            .check(request.metadata(), Role::Admin)?;
        let r = request.into_inner();
        if r.chat_id == 0 {
            return Err(Status::invalid_argument("chat_id must be non-zero"));
        }
        let token = self.token(&r.min_token)?;
        self.write_change(
            r.chat_id,
            token,
            command::Kind::ReopenChat(rp::ReopenChatCmd { chat_id: r.chat_id }),
        )
        .await
    }

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<EncodedMessagesResponse>, Status> {
        record("get_history");
        self.router
            .tokens()
            .check(request.metadata(), Role::Service)?;
        let mut r = request.into_inner();
        if r.chat_id == 0 {
            return Err(Status::invalid_argument("chat_id must be non-zero"));
        }
        r.limit = validate::page_limit(r.limit)?;
        let (chat, consistency, token) = (r.chat_id, r.consistency, r.min_token.clone());
        let (reply, token) = self
            .read(chat, consistency, &token, Query::History(r))
            .await?;
        Ok(Response::new(EncodedMessagesResponse {
            messages: reply.messages,
            read_token: token,
            served_by_node: reply.served_by_node,
        }))
    }

    async fn get_messages(
        &self,
        request: Request<pb::GetMessagesRequest>,
    ) -> Result<Response<EncodedMessagesResponse>, Status> {
        record("get_messages");
        self.router
            .tokens()
            .check(request.metadata(), Role::Service)?;
        let r = request.into_inner();
        validate::messages(&r)?;
        let (chat, consistency, token) = (r.chat_id, r.consistency, r.min_token.clone());
        let (reply, token) = self
            .read(chat, consistency, &token, Query::Messages(r))
            .await?;
        Ok(Response::new(EncodedMessagesResponse {
            messages: reply.messages,
            read_token: token,
            served_by_node: reply.served_by_node,
        }))
    }

    async fn get_difference(
        &self,
        request: Request<pb::GetDifferenceRequest>,
    ) -> Result<Response<pb::GetDifferenceResponse>, Status> {
        record("get_difference");
        self.router
            .tokens()
            .check(request.metadata(), Role::Service)?;
        let r = request.into_inner();
        validate::cursors(&r.cursors)?;
        let limit = validate::page_limit(if r.limit == 0 { 100 } else { r.limit })?;
        let consistency = validate::consistency(r.consistency)?;
        let mut token = self.token(&r.min_token)?;
        // The chats share one page's bytes. Each still gets its first
        // change, so a call makes progress in every chat.
        let bytes_max = (PAGE_BYTES_MAX / r.cursors.len()) as u32;
        let reads = r.cursors.iter().map(|c| {
            let shard = self.router.shard_of(c.chat_id);
            let min = token.position(shard.0);
            let query = Query::Difference(DifferenceQuery {
                chat_id: c.chat_id,
                pts: c.pts,
                limit,
                bytes_max,
                wait_for_change: false,
            });
            let read = self.router.read(shard, consistency, min, query);
            async move {
                tokio::time::timeout(DIFFERENCE_CHAT_WAIT, read)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Status::unavailable(format!(
                            "not read within {} s",
                            DIFFERENCE_CHAT_WAIT.as_secs()
                        )))
                    })
            }
        });
        let answers = futures::future::join_all(reads).await;
        let (mut chats, mut positions) = gather_differences(&r.cursors, answers)?;
        // The positions of chats not read stay as fresh in the token as
        // those read: a token past its shard bound drops the stalest.
        for d in chats.iter().filter(|d| !d.unavailable.is_empty()) {
            let shard = self.router.shard_of(d.chat_id);
            positions.extend(token.position(shard.0));
        }
        token.merge_all(&positions);
        // From a chat picked at random: a client that asks again for the
        // same chats, whose first ones keep filling the page, still gets
        // every chat's changes in turn.
        let first = rand::random_range(0..chats.len().max(1));
        cap_difference_bytes(&mut chats, &r.cursors, first);
        Ok(Response::new(pb::GetDifferenceResponse {
            chats,
            read_token: self.router.keys().issue(&token),
        }))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        record("watch");
        self.router
            .tokens()
            .check(request.metadata(), Role::Service)?;
        let peer = crate::api::http2::connection_of(&request).and_then(|c| c.remote_addr());
        // Checked again while the stream lasts: a revoked token ends it.
        let auth = request.metadata().clone();
        let r = request.into_inner();
        validate::cursors(&r.cursors)?;
        let permit = self.watch_slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this router serves {WATCH_STREAMS_MAX} watches already"
            ))
        })?;
        let chats = u32::try_from(r.cursors.len()).unwrap_or(u32::MAX);
        let chats = self
            .watched_chats
            .clone()
            .try_acquire_many_owned(chats)
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "this router watches {WATCHED_CHATS_MAX} chats already"
                ))
            })?;
        let counted = self.count_watch(peer)?;
        let (tx, events) = watch::event_stream();
        let (router, stopping) = (self.router.clone(), self.stopping.clone());
        let feeds = self.watch_feeds.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _chats = chats;
            let _counted = counted;
            watch::run(router, feeds, r.cursors, tx, auth, stopping).await;
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn get_chat(
        &self,
        request: Request<pb::GetChatRequest>,
    ) -> Result<Response<pb::GetChatResponse>, Status> {
        record("get_chat");
        self.router
            .tokens()
            .check(request.metadata(), Role::Service)?;
        let r = request.into_inner();
        if r.chat_id == 0 {
            return Err(Status::invalid_argument("chat_id must be non-zero"));
        }
        let (chat, consistency, token) = (r.chat_id, r.consistency, r.min_token.clone());
        let (reply, token) = self.read(chat, consistency, &token, Query::Chat(r)).await?;
        let mut out = reply
            .chat
            .ok_or_else(|| Status::internal("node returned no chat"))?;
        out.read_token = token;
        Ok(Response::new(out))
    }
}

/// Longest a GetDifference waits for one chat's shard; a chat not read by
/// then is answered `unavailable` (see [`gather_differences`]). Room for a
/// SESSION read's whole way: a local replica that does not answer in its
/// call's time, then the leader's wait for the token, then a round trip (a
/// shorter bound would answer such a chat `unavailable` every time).
const DIFFERENCE_CHAT_WAIT: std::time::Duration = std::time::Duration::from_millis(
    crate::router::NODE_CALL_TIMEOUT.as_millis() as u64
        + crate::router::SESSION_LEADER_WAIT_MS as u64
        + 1_000,
);

/// Each chat's difference, in the order of `cursors`, and the positions
/// they were read at. A chat whose shard could not be read in time (a
/// failure that trying again may cure: no leader yet, no replica caught up
/// with the token) is answered `unavailable`, with no changes, its cursor
/// as asked and `more`, so that one shard's trouble does not hold back the
/// other chats' sync. If no chat could be read, or a failure that trying
/// again does not cure, the call fails with it.
fn gather_differences(
    cursors: &[pb::Cursor],
    answers: Vec<Result<crate::router::ReadAnswer, Status>>,
) -> Result<(Vec<pb::ChatDifference>, Vec<ShardPosition>), Status> {
    let mut chats = Vec::with_capacity(answers.len());
    let mut positions = Vec::with_capacity(answers.len());
    let mut failed = None;
    for (cursor, answer) in cursors.iter().zip(answers) {
        match answer {
            Ok(a) => {
                positions.push(a.position);
                if let Some(mut d) = a.reply.difference {
                    d.served_by_node = a.reply.served_by_node;
                    chats.push(d);
                }
            }
            // Not an overloaded shard (RESOURCE_EXHAUSTED): the call fails,
            // so that its client backs off rather than asks again at once.
            Err(s) if crate::router::is_retryable(&s) => {
                chats.push(pb::ChatDifference {
                    chat_id: cursor.chat_id,
                    pts: cursor.pts,
                    more: true,
                    unavailable: format!("{:?}: {}", s.code(), s.message()),
                    ..Default::default()
                });
                failed.get_or_insert(s);
            }
            Err(s) => return Err(s),
        }
    }
    match failed {
        Some(s) if positions.is_empty() => Err(s),
        _ => Ok((chats, positions)),
    }
}

/// Keeps a GetDifference answer within [`PAGE_BYTES_MAX`] past the changes
/// of chat `first` (a 4 MiB gRPC client takes it): taking the chats from
/// `first` on and around, those that do not fit are answered with no
/// changes, their cursor as it was, and `more`, so a later call picks them
/// up.
fn cap_difference_bytes(chats: &mut [pb::ChatDifference], cursors: &[pb::Cursor], first: usize) {
    let mut bytes = 0;
    let n = chats.len();
    for i in 0..n {
        let d = &mut chats[(first + i) % n];
        if i > 0 && bytes + d.encoded_len() > PAGE_BYTES_MAX && !d.changes.is_empty() {
            let asked = cursors.iter().find(|c| c.chat_id == d.chat_id);
            d.pts = asked.map_or(d.pts, |c| c.pts);
            d.changes.clear();
            d.more = true;
        }
        bytes += d.encoded_len();
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A reply's chats past the page bound are left out whole, with their
    /// cursors as asked and `more` set; the first always stays, and a chat
    /// with no changes costs nothing to keep.
    #[test]
    fn differences_past_the_page_bound_are_left_out_whole() {
        let chat = |id: u64, body_bytes: usize| pb::ChatDifference {
            chat_id: id,
            pts: 9,
            changes: vec![pb::Change {
                chat_id: id,
                pts: 9,
                message: Some(pb::Message {
                    body: vec![b'x'; body_bytes].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let big = PAGE_BYTES_MAX / 2;
        let mut chats = vec![
            chat(1, big + 1024),
            chat(2, big / 2),
            chat(3, big),
            pb::ChatDifference {
                chat_id: 4,
                pts: 5,
                ..Default::default()
            },
        ];
        let cursors: Vec<pb::Cursor> = (1..=4).map(|c| pb::Cursor { chat_id: c, pts: c }).collect();
        let all = chats.clone();
        cap_difference_bytes(&mut chats, &cursors, 0);
        assert_eq!(chats[0].changes.len(), 1, "the first always stays");
        assert_eq!(chats[1].changes.len(), 1, "within the bound");
        assert!(chats[2].changes.is_empty() && chats[2].more && chats[2].pts == 3);
        assert_eq!(
            (chats[3].pts, chats[3].more),
            (5, false),
            "no changes: as it was"
        );
        let total: usize = chats.iter().map(|c| c.encoded_len()).sum();
        assert!(total <= PAGE_BYTES_MAX + 1024, "{total}");
        // Taken from chat 3 on: 3 stays, 4 costs nothing, 1 does not fit
        // after 3, and 2 does.
        let mut chats = all;
        cap_difference_bytes(&mut chats, &cursors, 2);
        assert_eq!(chats[2].changes.len(), 1, "the first taken always stays");
        assert!(chats[0].changes.is_empty() && chats[0].more && chats[0].pts == 1);
        assert_eq!(chats[1].changes.len(), 1);
        let total: usize = chats.iter().map(|c| c.encoded_len()).sum();
        assert!(total <= PAGE_BYTES_MAX + 1024, "{total}");
    }

    /// A chat whose shard could not be read is answered `unavailable`, its
    /// cursor as asked, and the others are answered; the call fails only if
    /// no chat could be read, or on a failure that trying again does not cure.
    #[test]
    fn a_difference_answers_the_chats_whose_shards_could_be_read() {
        let cursors: Vec<pb::Cursor> = (1..=3)
            .map(|c| pb::Cursor {
                chat_id: c,
                pts: 10 * c,
            })
            .collect();
        let read = |chat: u64, index: u64| {
            Ok(crate::router::ReadAnswer {
                reply: crate::api::pb::node::EncodedReadReply {
                    difference: Some(pb::ChatDifference {
                        chat_id: chat,
                        pts: 10 * chat + 1,
                        changes: vec![pb::Change {
                            chat_id: chat,
                            pts: 10 * chat + 1,
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    served_by_node: 2,
                    ..Default::default()
                },
                position: ShardPosition {
                    shard: chat,
                    index,
                    ..Default::default()
                },
            })
        };
        let no_leader = || Err(Status::unavailable("shard-2 has no leader"));
        let (chats, positions) =
            gather_differences(&cursors, vec![read(1, 5), no_leader(), read(3, 7)]).unwrap();
        assert_eq!(chats.len(), 3);
        assert_eq!((chats[0].pts, chats[0].changes.len()), (11, 1));
        assert_eq!(chats[0].served_by_node, 2);
        assert!(chats[0].unavailable.is_empty());
        let skipped = &chats[1];
        assert_eq!(
            (skipped.chat_id, skipped.pts),
            (2, 20),
            "the cursor as asked"
        );
        assert!(skipped.changes.is_empty() && skipped.more);
        assert!(
            skipped.unavailable.contains("no leader"),
            "{}",
            skipped.unavailable
        );
        assert_eq!(chats[2].pts, 31);
        let indexes: Vec<u64> = positions.iter().map(|p| p.index).collect();
        assert_eq!(indexes, [5, 7], "no position for the chat not read");
        // Nothing read: the call fails.
        let none = gather_differences(&cursors, vec![no_leader(), no_leader(), no_leader()]);
        assert_eq!(none.unwrap_err().code(), tonic::Code::Unavailable);
        // A refusal that trying again does not change fails the call.
        let bad = Err(Status::failed_precondition(
            "the token is from another cluster",
        ));
        let refused = gather_differences(&cursors, vec![read(1, 5), bad, read(3, 7)]);
        assert_eq!(refused.unwrap_err().code(), tonic::Code::FailedPrecondition);
        // So does an overloaded shard: its client is to back off.
        let busy = Err(Status::resource_exhausted("shard-2 is overloaded"));
        let busy = gather_differences(&cursors, vec![read(1, 5), busy, read(3, 7)]);
        assert_eq!(busy.unwrap_err().code(), tonic::Code::ResourceExhausted);
    }

    /// `n` sends of `bytes` each into chat 1, as a batch carries them.
    fn sends(n: usize, bytes: usize) -> Vec<(usize, Command, Token)> {
        let keys = crate::router::token::TokenKeys::new("c", b"s");
        (0..n)
            .map(|i| {
                let send = rp::SendCmd {
                    chat_id: 1,
                    sender_id: 1,
                    client_msg_id: i as u64 + 1,
                    body: vec![0; bytes].into(),
                    ..Default::default()
                };
                let command = Command {
                    kind: Some(command::Kind::Send(send)),
                };
                (i, command, keys.token(&bytes::Bytes::new()).unwrap())
            })
            .collect()
    }

    /// Groups that would start after the batch has run for
    /// [`WRITES_TIME_MAX`] are not written, and say to send them again.
    #[tokio::test(start_paused = true)]
    async fn a_batch_starts_no_group_past_its_time() {
        // Two sends fit one call, so six make three groups; each takes 40 s.
        let items = sends(6, crate::shard::BATCH_BYTES_MAX * 2 / 5);
        let calls = Cell::new(0);
        let out = write_in_groups(crate::types::ShardId(3), items, |commands| {
            calls.set(calls.get() + 1);
            async move {
                tokio::time::sleep(std::time::Duration::from_secs(40)).await;
                Ok((
                    vec![rp::CommandResult::default(); commands.len()],
                    ShardPosition::default(),
                ))
            }
        })
        .await;
        assert_eq!(calls.get(), 2, "the third group would start at 80 s");
        let not_sent: Vec<usize> = out
            .iter()
            .filter(|(_, w)| {
                w.as_ref().is_err_and(|s| {
                    s.code() == tonic::Code::Unavailable
                        && s.message().contains("send the rest again")
                })
            })
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(not_sent, vec![4, 5]);
    }

    #[tokio::test]
    async fn after_a_failed_group_the_shards_later_sends_are_not_written() {
        // Two sends fit one call, so six make three groups.
        let items = sends(6, crate::shard::BATCH_BYTES_MAX * 2 / 5);
        let calls = Cell::new(0);
        let out = write_in_groups(crate::types::ShardId(3), items, |commands| {
            calls.set(calls.get() + 1);
            let call = calls.get();
            async move {
                match call {
                    1 => Ok((
                        vec![rp::CommandResult::default(); commands.len()],
                        ShardPosition::default(),
                    )),
                    _ => Err(Status::deadline_exceeded("the leader went away")),
                }
            }
        })
        .await;
        assert_eq!(calls.get(), 2, "the third group is not written");
        let outcome: Vec<(usize, Option<(tonic::Code, bool)>)> = out
            .iter()
            .map(|(i, w)| {
                let e = w.as_ref().err();
                (*i, e.map(|s| (s.code(), s.message().contains("not sent"))))
            })
            .collect();
        use tonic::Code::{DeadlineExceeded, Unavailable};
        assert_eq!(
            outcome,
            vec![
                (0, None),
                (1, None),
                (2, Some((DeadlineExceeded, false))),
                (3, Some((DeadlineExceeded, false))),
                (4, Some((Unavailable, true))),
                (5, Some((Unavailable, true))),
            ]
        );
    }
}
