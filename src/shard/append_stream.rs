//! AppendEntries of every shard between two nodes, on one gRPC stream per
//! node pair.
//!
//! ```text
//!  shard 1 PeerLink ─┐                                      peer node
//!  shard 2 PeerLink ─┼─▶ queue ─▶ [mux task] ─ AppendCallBatch ─▶ one task per call
//!  shard 3 PeerLink ─┘    ▲                                           │
//!                         └─ by call id ◀─ AppendReplyBatch ◀─────────┘
//! ```
//!
//! A node leads many shards, and each shard replicates to each peer with its
//! own AppendEntries calls, most of them small (a few commands, or only a
//! commit index). As unary calls each one is an HTTP/2 stream with headers,
//! trailers and a task on both sides. Here the calls that queue up while the
//! previous batch is written leave together as one message on a stream that
//! stays open; the peer handles each call on its own and sends the replies
//! that are ready as one message. A reply never waits for another shard's
//! call, so a slow shard holds back no one else.
//!
//! When the stream fails, every call waiting on it fails as unreachable
//! (openraft retries those) and the next call opens a new stream. A peer that
//! does not know the method (an older node) gets unary AppendEntries from
//! then on. Under simulated latency each batch leaves, and each reply is
//! delivered, one one-way delay late, as a unary call would be.

use std::collections::HashMap;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::{Code, Status, Streaming};

use crate::api::pb::raft::{
    AppendCall, AppendCallBatch, AppendCallReply, AppendReplyBatch, RaftReply, RaftRequest,
};
use crate::shard::network::PeerClient;

/// Most calls in one batch.
const CALLS_PER_BATCH_MAX: usize = 1024;
/// A batch stops growing past this many request bytes (a larger single
/// call still goes, alone).
const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Batches written but not yet taken by HTTP/2. Past this the peer is not
/// reading, and new calls fail at once rather than queue behind the backlog.
const BATCHES_QUEUED_MAX: usize = 64;
/// How long opening a stream may take before its calls fail.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls whose callers gave up are dropped from the waiting map once it
/// holds this many.
const SWEEP_AT: usize = 4096;

type Reply = Result<RaftReply, Status>;

struct Queued {
    request: RaftRequest,
    timeout: Duration,
    reply: oneshot::Sender<Reply>,
}

/// The sending side of one node pair's append stream; cheap to clone.
#[derive(Clone)]
pub struct AppendMux {
    queue: mpsc::UnboundedSender<Queued>,
}

impl AppendMux {
    /// Starts the mux task for the peer behind `client`. It stops when the
    /// last clone of the returned handle is dropped.
    pub fn start(client: PeerClient, node: u64, one_way: Duration) -> AppendMux {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(client, node, one_way, rx));
        AppendMux { queue }
    }

    /// One AppendEntries call: `request` as AppendEntries would take it,
    /// answered within `timeout` or failed with `DeadlineExceeded`.
    pub async fn call(&self, request: RaftRequest, timeout: Duration) -> Reply {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(Queued {
                request,
                timeout,
                reply: tx,
            })
            .map_err(|_| Status::unavailable("the append stream has stopped"))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(Status::unavailable("the append stream dropped the call")),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no reply within {} ms",
                timeout.as_millis()
            ))),
        }
    }
}

/// An open stream: where batches go, and where replies come from.
struct Open {
    out: mpsc::Sender<(Option<Instant>, AppendCallBatch)>,
    replies: Streaming<AppendReplyBatch>,
}

async fn open(client: &mut PeerClient) -> Result<Open, Status> {
    let (out, rx) = mpsc::channel::<(Option<Instant>, AppendCallBatch)>(BATCHES_QUEUED_MAX);
    let outbound =
        tokio_stream::wrappers::ReceiverStream::new(rx).then(|(due, batch)| async move {
            if let Some(due) = due {
                tokio::time::sleep_until(due).await;
            }
            batch
        });
    let response = tokio::time::timeout(OPEN_TIMEOUT, client.append_stream(outbound))
        .await
        .map_err(|_| Status::unavailable("opening the append stream timed out"))??;
    Ok(Open {
        out,
        replies: response.into_inner(),
    })
}

async fn run(
    mut client: PeerClient,
    node: u64,
    one_way: Duration,
    mut queue: mpsc::UnboundedReceiver<Queued>,
) {
    let delay = (!one_way.is_zero()).then_some(one_way);
    let mut waiting: HashMap<u64, oneshot::Sender<Reply>> = HashMap::new();
    let mut next_id: u64 = 0;
    let mut stream: Option<Open> = None;
    let mut unary = false;
    // A call taken from the queue that did not fit in the last batch.
    let mut held: Option<Queued> = None;
    loop {
        let first = match (held.take(), stream.as_mut()) {
            (Some(q), _) => q,
            (None, None) => match queue.recv().await {
                Some(q) => q,
                None => return,
            },
            (None, Some(open)) => tokio::select! {
                q = queue.recv() => match q {
                    Some(q) => q,
                    None => return,
                },
                r = open.replies.message() => {
                    match r {
                        Ok(Some(batch)) => deliver(batch, &mut waiting, delay),
                        Ok(None) => {
                            fail_all(&mut waiting, format!("node {node} closed the append stream"));
                            stream = None;
                        }
                        Err(s) => {
                            fail_all(&mut waiting, format!("append stream to node {node}: {s}"));
                            stream = None;
                        }
                    }
                    continue;
                }
            },
        };
        // Let the shards that are ready to send queue their calls too.
        tokio::task::yield_now().await;
        let mut calls = vec![first];
        let mut bytes = calls[0].request.encoded_len();
        while calls.len() < CALLS_PER_BATCH_MAX {
            match queue.try_recv() {
                Ok(q) => {
                    let len = q.request.encoded_len();
                    if bytes + len > BATCH_BYTES_MAX {
                        held = Some(q);
                        break;
                    }
                    bytes += len;
                    calls.push(q);
                }
                Err(_) => break,
            }
        }
        calls.retain(|q| !q.reply.is_closed());
        if calls.is_empty() {
            continue;
        }
        if unary {
            for q in calls {
                spawn_unary(client.clone(), q);
            }
            continue;
        }
        if stream.is_none() {
            match open(&mut client).await {
                Ok(o) => stream = Some(o),
                Err(s) if s.code() == Code::Unimplemented => {
                    tracing::info!(node, "peer has no append stream; using unary AppendEntries");
                    unary = true;
                    for q in calls {
                        spawn_unary(client.clone(), q);
                    }
                    continue;
                }
                Err(s) => {
                    let s = Status::unavailable(format!("append stream to node {node}: {s}"));
                    for q in calls {
                        let _ = q.reply.send(Err(s.clone()));
                    }
                    continue;
                }
            }
        }
        let Some(open) = stream.as_mut() else {
            continue;
        };
        let mut batch = AppendCallBatch {
            calls: Vec::with_capacity(calls.len()),
        };
        let mut ids = Vec::with_capacity(calls.len());
        for q in calls {
            next_id += 1;
            ids.push(next_id);
            batch.calls.push(AppendCall {
                id: next_id,
                request: Some(q.request),
                timeout_ms: q.timeout.as_millis() as u64,
            });
            waiting.insert(next_id, q.reply);
        }
        metrics::histogram!(crate::metrics::RAFT_APPEND_BATCH).record(ids.len() as f64);
        let due = delay.map(|d| Instant::now() + d);
        if let Err(e) = open.out.try_send((due, batch)) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => {
                    format!("append stream to node {node} is backed up")
                }
                mpsc::error::TrySendError::Closed(_) => {
                    format!("append stream to node {node} has closed")
                }
            };
            for id in ids {
                if let Some(tx) = waiting.remove(&id) {
                    let _ = tx.send(Err(Status::unavailable(why.clone())));
                }
            }
        }
        if waiting.len() >= SWEEP_AT {
            waiting.retain(|_, tx| !tx.is_closed());
        }
    }
}

/// Hands each reply to its caller (after the simulated delay, if any).
fn deliver(
    batch: AppendReplyBatch,
    waiting: &mut HashMap<u64, oneshot::Sender<Reply>>,
    delay: Option<Duration>,
) {
    for r in batch.replies {
        let Some(tx) = waiting.remove(&r.id) else {
            continue;
        };
        let reply = reply_of(r);
        match delay {
            None => {
                let _ = tx.send(reply);
            }
            Some(d) => {
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    let _ = tx.send(reply);
                });
            }
        }
    }
}

/// The result a unary AppendEntries would have given.
fn reply_of(r: AppendCallReply) -> Reply {
    match (r.reply, Code::from_i32(r.status_code)) {
        (Some(reply), Code::Ok) => Ok(reply),
        (None, Code::Ok) => Err(Status::internal("append reply without a result")),
        (_, code) => Err(Status::new(code, r.status_message)),
    }
}

fn fail_all(waiting: &mut HashMap<u64, oneshot::Sender<Reply>>, why: String) {
    for (_, tx) in waiting.drain() {
        let _ = tx.send(Err(Status::unavailable(why.clone())));
    }
}

fn spawn_unary(mut client: PeerClient, q: Queued) {
    tokio::spawn(async move {
        let mut request = tonic::Request::new(q.request);
        request.set_timeout(q.timeout);
        let reply = client
            .append_entries(request)
            .await
            .map(tonic::Response::into_inner);
        let _ = q.reply.send(reply);
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc;
    use tonic::{Code, Request, Response, Status, Streaming};

    use super::AppendMux;
    use crate::api::pb::raft::raft_reply::Result as ReplyResult;
    use crate::api::pb::raft::raft_transport_client::RaftTransportClient;
    use crate::api::pb::raft::raft_transport_server::{RaftTransport, RaftTransportServer};
    use crate::api::pb::raft::{
        AppendCallBatch, AppendCallReply, AppendReplyBatch, PingReply, PingRequest, QuiesceReply,
        QuiesceRequest, RaftReply, RaftRequest, SnapshotChunk,
    };
    use crate::cluster::latency::Delayed;

    /// A peer that answers each call with its own payload, a batch's replies
    /// in reverse order; a call with payload "break" breaks the stream.
    /// Without `stream` it knows only unary AppendEntries.
    #[derive(Clone)]
    struct Echo {
        stream: bool,
        opens: Arc<AtomicUsize>,
    }

    fn echo(req: &RaftRequest) -> RaftReply {
        RaftReply {
            result: Some(ReplyResult::Ok(req.payload.clone())),
        }
    }

    type ReplyStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<AppendReplyBatch, Status>> + Send>,
    >;

    #[tonic::async_trait]
    impl RaftTransport for Echo {
        async fn append_entries(
            &self,
            request: Request<RaftRequest>,
        ) -> Result<Response<RaftReply>, Status> {
            Ok(Response::new(echo(request.get_ref())))
        }

        type AppendStreamStream = ReplyStream;

        async fn append_stream(
            &self,
            request: Request<Streaming<AppendCallBatch>>,
        ) -> Result<Response<ReplyStream>, Status> {
            if !self.stream {
                return Err(Status::unimplemented("no append stream"));
            }
            self.opens.fetch_add(1, Ordering::SeqCst);
            let mut calls = request.into_inner();
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                while let Ok(Some(batch)) = calls.message().await {
                    let mut replies = Vec::new();
                    for call in batch.calls.into_iter().rev() {
                        let req = call.request.unwrap_or_default();
                        if req.payload.as_ref() == b"break" {
                            let _ = tx.send(Err(Status::aborted("broken on purpose"))).await;
                            return;
                        }
                        replies.push(AppendCallReply {
                            id: call.id,
                            reply: Some(echo(&req)),
                            ..Default::default()
                        });
                    }
                    if tx.send(Ok(AppendReplyBatch { replies })).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )))
        }

        async fn vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn pre_vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn transfer_leader(
            &self,
            _: Request<RaftRequest>,
        ) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn install_snapshot(
            &self,
            _: Request<Streaming<SnapshotChunk>>,
        ) -> Result<Response<RaftReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn quiesce(
            &self,
            _: Request<QuiesceRequest>,
        ) -> Result<Response<QuiesceReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    /// Serves `peer` on a free loopback port; returns a mux to it.
    async fn mux_to(peer: Echo) -> AppendMux {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftTransportServer::new(peer))
                .serve_with_incoming(incoming),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        AppendMux::start(
            RaftTransportClient::new(Delayed::new(channel, Duration::ZERO)),
            9,
            Duration::ZERO,
        )
    }

    fn request(payload: &str) -> RaftRequest {
        RaftRequest {
            payload: payload.as_bytes().to_vec().into(),
            ..Default::default()
        }
    }

    fn payload(reply: RaftReply) -> Vec<u8> {
        match reply.result {
            Some(ReplyResult::Ok(b)) => b.to_vec(),
            other => panic!("unexpected reply {other:?}"),
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn each_caller_gets_its_own_reply() {
        let opens = Arc::new(AtomicUsize::new(0));
        let mux = mux_to(Echo {
            stream: true,
            opens: opens.clone(),
        })
        .await;
        let calls = (0..200).map(|i| {
            let mux = mux.clone();
            tokio::spawn(async move { (i, mux.call(request(&format!("call {i}")), TIMEOUT).await) })
        });
        for call in calls {
            let (i, reply) = call.await.unwrap();
            assert_eq!(payload(reply.unwrap()), format!("call {i}").into_bytes());
        }
        assert_eq!(opens.load(Ordering::SeqCst), 1, "one stream for all calls");
    }

    #[tokio::test]
    async fn a_broken_stream_fails_its_calls_and_the_next_call_reopens_it() {
        let opens = Arc::new(AtomicUsize::new(0));
        let mux = mux_to(Echo {
            stream: true,
            opens: opens.clone(),
        })
        .await;
        assert_eq!(
            payload(mux.call(request("a"), TIMEOUT).await.unwrap()),
            b"a"
        );
        let broken = mux.call(request("break"), TIMEOUT).await.unwrap_err();
        assert_eq!(broken.code(), Code::Unavailable, "{broken}");
        assert_eq!(
            payload(mux.call(request("b"), TIMEOUT).await.unwrap()),
            b"b"
        );
        assert_eq!(opens.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_unary_calls() {
        let opens = Arc::new(AtomicUsize::new(0));
        let mux = mux_to(Echo {
            stream: false,
            opens: opens.clone(),
        })
        .await;
        for i in 0..3 {
            let p = format!("unary {i}");
            assert_eq!(
                payload(mux.call(request(&p), TIMEOUT).await.unwrap()),
                p.into_bytes()
            );
        }
    }
}
