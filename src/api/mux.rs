//! Many small unary calls to one peer, carried on one long-lived gRPC stream.
//!
//! ```text
//!  caller ─┐                                                   peer
//!  caller ─┼─▶ queue ─▶ [mux task] ── batch of calls ──▶ one task per call
//!  caller ─┘    ▲                                                 │
//!               └── by call id ◀── batch of replies ◀─────────────┘
//! ```
//!
//! As unary calls, each one is an HTTP/2 stream with headers, trailers and a
//! task on both sides. Here the calls that queue up while the previous batch
//! is written leave together as one message on a stream that stays open; the
//! peer handles each call on its own and sends the replies that are ready as
//! one message. A reply never waits for another call's, so a slow call holds
//! back no one else. What the peer holds per stream is bounded: it reads no
//! more calls while replies not yet taken pass [`REPLY_BYTES_QUEUED_MAX`], and
//! refuses calls while [`CALLS_WAITING_MAX`] wait in tasks.
//!
//! When the stream fails, every call waiting on it fails as `Unavailable`
//! and the next call opens a new stream. A peer that does not know the
//! stream method (an older node) gets unary calls for a minute, then the
//! stream is tried again. A failed call's reply carries the status code,
//! message and ASCII metadata (a leader hint) a unary call would have
//! failed with. Under simulated latency each batch leaves, and each reply is
//! delivered, one one-way delay late, as a unary call would be.
//!
//! Used for AppendEntries between nodes ([`crate::shard::append_stream`]),
//! and for reads and writes from routers to nodes
//! ([`crate::api::read_stream`], [`crate::api::write_stream`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::codec::Streaming;
use tonic::{Code, Status};

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
/// holds this many, and again each time it has doubled since.
const SWEEP_AT: usize = 4096;
/// How long calls to a peer without the stream stay unary before the stream
/// is tried again (the peer may have been upgraded meanwhile).
const UNARY_FOR: Duration = Duration::from_secs(60);

/// The batches a stream sends, each passed through `keep` as HTTP/2 takes
/// it (see [`fresh`]).
pub struct Batches<B> {
    rx: mpsc::Receiver<B>,
    keep: Box<dyn FnMut(B) -> Option<B> + Send + Sync>,
}

impl<B> futures::Stream for Batches<B> {
    type Item = B;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<B>> {
        loop {
            match std::task::ready!(self.rx.poll_recv(cx)) {
                None => return std::task::Poll::Ready(None),
                Some(batch) => {
                    if let Some(batch) = (self.keep)(batch) {
                        return std::task::Poll::Ready(Some(batch));
                    }
                }
            }
        }
    }
}

/// One call as it goes into a batch.
pub struct Call<R> {
    pub id: u64,
    pub request: R,
    /// The peer gives up on the call after this long.
    pub timeout_ms: u64,
}

/// What a kind of multiplexed call is on the wire.
pub trait Protocol: Send + 'static {
    /// The gRPC client of the peer.
    type Client: Clone + Send + 'static;
    type Request: Message + Send + 'static;
    type Reply: Message + Send + 'static;
    type Batch: Send + 'static;
    type ReplyBatch: Send + 'static;
    /// Names the stream in errors and logs.
    const NAME: &'static str;
    /// The metric recording calls per batch.
    const BATCH_METRIC: &'static str;

    fn batch(calls: Vec<Call<Self::Request>>) -> Self::Batch;
    /// The calls of a batch (the peer's side of [`Protocol::batch`]).
    fn calls(batch: Self::Batch) -> Vec<Call<Self::Request>>;
    /// Replies as one message (the peer's side of [`Protocol::replies`]).
    fn reply_batch(replies: Vec<(u64, Result<Self::Reply, Status>)>) -> Self::ReplyBatch;
    /// Each reply's call id and the result a unary call would have given.
    fn replies(batch: Self::ReplyBatch) -> Vec<(u64, Result<Self::Reply, Status>)>;
    /// Opens the stream with the batches to send.
    fn open(
        client: Self::Client,
        batches: Batches<Self::Batch>,
    ) -> BoxFuture<'static, Result<Streaming<Self::ReplyBatch>, Status>>;
    /// The same call, unary, for a peer without the stream.
    fn unary(
        client: Self::Client,
        request: Self::Request,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Self::Reply, Status>>;
}

/// Most replies in one message.
const REPLIES_PER_BATCH_MAX: usize = 1024;
/// A reply batch stops growing past this many bytes (a larger single reply
/// still goes, alone), well below tonic's default 4 MiB message limit.
const REPLY_BATCH_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Bytes of replies ready but not yet taken by the reply stream. Past this
/// the peer's side reads no more calls until they drain: a caller that sends
/// calls faster than it reads their replies is slowed by HTTP/2 flow
/// control instead of growing this process's memory.
const REPLY_BYTES_QUEUED_MAX: usize = 32 * 1024 * 1024;
/// Calls of one stream waiting in tasks of their own (writes, reads waiting
/// for an index, Watch long polls). While this many wait, every new call is
/// refused unhandled as `Unavailable` (a caller tries another replica or
/// again later), so a flood of calls costs a bounded number of tasks; a
/// refusal holds back no other call.
pub const CALLS_WAITING_MAX: usize = 65_536;

/// What the peer's side of one stream may hold.
#[derive(Clone, Copy)]
struct Bounds {
    reply_bytes: usize,
    waiting: usize,
}

const BOUNDS: Bounds = Bounds {
    reply_bytes: REPLY_BYTES_QUEUED_MAX,
    waiting: CALLS_WAITING_MAX,
};

/// What the peer's side of one stream holds: reply bytes queued for the
/// reply stream, and calls waiting in tasks.
struct Held {
    bounds: Bounds,
    reply_bytes: AtomicUsize,
    waiting: AtomicUsize,
    drained: tokio::sync::Notify,
}

impl Held {
    fn new(bounds: Bounds) -> Held {
        Held {
            bounds,
            reply_bytes: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            drained: tokio::sync::Notify::new(),
        }
    }

    fn queued(&self, bytes: usize) {
        self.reply_bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    fn taken(&self, bytes: usize) {
        let max = self.bounds.reply_bytes;
        let before = self.reply_bytes.fetch_sub(bytes, Ordering::AcqRel);
        if before > max && before - bytes <= max {
            self.drained.notify_one();
        }
    }

    fn has_room(&self) -> bool {
        self.reply_bytes.load(Ordering::Acquire) <= self.bounds.reply_bytes
    }

    /// Returns once the queued reply bytes are within their bound.
    async fn room(&self) {
        while self.reply_bytes.load(Ordering::Acquire) > self.bounds.reply_bytes {
            // notify_one keeps a wake-up given before this wait starts.
            self.drained.notified().await;
        }
    }
}

/// The peer's side: runs `handle` on each call of each batch (within the
/// call's timeout, counted from when its batch was read: a batch left unread
/// in the stream's window while replies back up is timed from then, as no
/// clock here says when its caller sent it; in a task of its own unless it
/// is ready at once) and
/// returns the stream of reply batches, each with the replies ready when it
/// is sent. The stream ends when `stopping` turns true, so a server's
/// graceful shutdown does not wait on it. Calls are read only while the
/// replies not yet taken stay within [`REPLY_BYTES_QUEUED_MAX`], and at most
/// [`CALLS_WAITING_MAX`] wait at a time.
pub fn serve<P, H, F>(
    calls: impl futures::Stream<Item = Result<P::Batch, Status>> + Send + Unpin + 'static,
    handle: H,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> BoxStream<'static, Result<P::ReplyBatch, Status>>
where
    P: Protocol,
    H: Fn(P::Request) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Result<P::Reply, Status>> + Send + 'static,
{
    serve_within::<P, H, F>(calls, handle, stopping, BOUNDS)
}

fn serve_within<P, H, F>(
    mut calls: impl futures::Stream<Item = Result<P::Batch, Status>> + Send + Unpin + 'static,
    handle: H,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    bounds: Bounds,
) -> BoxStream<'static, Result<P::ReplyBatch, Status>>
where
    P: Protocol,
    H: Fn(P::Request) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Result<P::Reply, Status>> + Send + 'static,
{
    type Ready<R> = (u64, Result<R, Status>, usize);
    let (tx, rx) = mpsc::unbounded_channel::<Ready<P::Reply>>();
    let held = Arc::new(Held::new(bounds));
    let send = {
        let held = held.clone();
        move |tx: &mpsc::UnboundedSender<Ready<P::Reply>>, id, result: Result<P::Reply, Status>| {
            let bytes = match &result {
                Ok(reply) => reply.encoded_len(),
                Err(s) => s.message().len(),
            };
            held.queued(bytes);
            if tx.send((id, result, bytes)).is_err() {
                held.taken(bytes);
            }
        }
    };
    let mut reader_stopping = stopping.clone();
    let reader_held = held.clone();
    tokio::spawn(async move {
        'batches: loop {
            let batch = tokio::select! {
                m = async {
                    reader_held.room().await;
                    futures::StreamExt::next(&mut calls).await
                } => match m {
                    Some(Ok(batch)) => (batch, Instant::now()),
                    _ => break,
                },
                _ = reader_stopping.wait_for(|s| *s) => break,
                // The reply stream is gone (the caller hung up): nothing
                // queued will be taken.
                _ = tx.closed() => break,
            };
            let (batch, arrived) = batch;
            for call in P::calls(batch) {
                // Each call of a batch waits for room too: one batch of
                // a thousand reads of 3 MiB pages would pass the bound a
                // hundred times over.
                if !reader_held.has_room() {
                    tokio::select! {
                        _ = reader_held.room() => {}
                        _ = reader_stopping.wait_for(|s| *s) => break 'batches,
                        _ = tx.closed() => break 'batches,
                    }
                }
                if reader_held.waiting.load(Ordering::Acquire) >= bounds.waiting {
                    let refused = Status::unavailable(format!(
                        "{} has {} calls waiting; try again",
                        P::NAME,
                        bounds.waiting
                    ));
                    send(&tx, call.id, Err(refused));
                    continue;
                }
                // A call's time counts from when its batch was read: one that
                // waited here for room until its caller gave up is not run
                // (a write is not proposed).
                let timeout_ms = call.timeout_ms;
                let left = Duration::from_millis(timeout_ms).saturating_sub(arrived.elapsed());
                if timeout_ms != 0 && left.is_zero() {
                    let late = Status::deadline_exceeded(format!(
                        "{} call timed out before it ran",
                        P::NAME
                    ));
                    send(&tx, call.id, Err(late));
                    continue;
                }
                let handled = handle(call.request);
                let timed = async move {
                    if timeout_ms == 0 {
                        handled.await
                    } else {
                        tokio::time::timeout(left, handled)
                            .await
                            .unwrap_or_else(|_| {
                                Err(Status::deadline_exceeded(format!(
                                    "{} call timed out",
                                    P::NAME
                                )))
                            })
                    }
                };
                // A handler that panics fails its call, as a unary call's
                // task would, and gives back its place among the waiting.
                let mut result = Box::pin(async move {
                    futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(timed))
                        .await
                        .unwrap_or_else(|_| {
                            Err(Status::internal(format!(
                                "{} call failed (a panic)",
                                P::NAME
                            )))
                        })
                });
                // Most reads are answered at once, from memory or sled: a
                // call that is ready on its first poll is answered here, and
                // only one that has to wait (a write, a read waiting for an
                // index) gets a task of its own. The first poll runs outside
                // Tokio's budget: a call that got as far as the queue of its
                // shard's Raft then stays in arrival order even in a batch of
                // hundreds (AppendEntries of one shard must reach openraft in
                // the order they were sent).
                let mut first = tokio::task::coop::unconstrained(result.as_mut());
                match futures::poll!(&mut first) {
                    std::task::Poll::Ready(result) => send(&tx, call.id, result),
                    std::task::Poll::Pending => {
                        let (tx, send, held) = (tx.clone(), send.clone(), reader_held.clone());
                        held.waiting.fetch_add(1, Ordering::AcqRel);
                        tokio::spawn(async move {
                            let result = result.await;
                            held.waiting.fetch_sub(1, Ordering::AcqRel);
                            send(&tx, call.id, result);
                        });
                    }
                }
            }
        }
    });
    // The state: the receiver, and a reply that did not fit the last batch.
    let replies = futures::stream::unfold((rx, None), move |(mut rx, over)| {
        let held = held.clone();
        async move {
            let first = match over {
                Some(r) => r,
                None => rx.recv().await?,
            };
            let mut bytes = first.2;
            let mut replies = vec![first];
            let mut over = None;
            while replies.len() < REPLIES_PER_BATCH_MAX {
                match rx.try_recv() {
                    Ok(r) => {
                        if bytes + r.2 > REPLY_BATCH_BYTES_MAX {
                            over = Some(r);
                            break;
                        }
                        bytes += r.2;
                        replies.push(r);
                    }
                    Err(_) => break,
                }
            }
            held.taken(bytes);
            let replies = replies.into_iter().map(|(id, r, _)| (id, r)).collect();
            Some((Ok(P::reply_batch(replies)), (rx, over)))
        }
    });
    Box::pin(futures::StreamExt::take_until(replies, async move {
        let _ = stopping.wait_for(|s| *s).await;
    }))
}

/// The four message conversions of a [`Protocol`], for wire messages laid
/// out alike: a call (`id`, `request`, `timeout_ms`) in a batch (`calls`),
/// a call reply (`id`, `reply`, `status_code`, `status_message`,
/// `status_metadata`) in a reply batch (`replies`). Used inside the
/// `impl Protocol` block.
macro_rules! stream_messages {
    ($request:ty, $reply:ty, $call:ident, $batch:ident, $call_reply:ident, $reply_batch:ident) => {
        fn batch(calls: Vec<$crate::api::mux::Call<$request>>) -> $batch {
            $batch {
                calls: calls
                    .into_iter()
                    .map(|c| $call {
                        id: c.id,
                        request: Some(c.request),
                        timeout_ms: c.timeout_ms,
                    })
                    .collect(),
            }
        }

        fn calls(batch: $batch) -> Vec<$crate::api::mux::Call<$request>> {
            batch
                .calls
                .into_iter()
                .map(|c| $crate::api::mux::Call {
                    id: c.id,
                    request: c.request.unwrap_or_default(),
                    timeout_ms: c.timeout_ms,
                })
                .collect()
        }

        fn reply_batch(replies: Vec<(u64, Result<$reply, tonic::Status>)>) -> $reply_batch {
            $reply_batch {
                replies: replies
                    .into_iter()
                    .map(|(id, r)| match r {
                        Ok(reply) => $call_reply {
                            id,
                            reply: Some(reply),
                            ..Default::default()
                        },
                        Err(s) => $call_reply {
                            id,
                            reply: None,
                            status_code: s.code() as i32,
                            status_message: s.message().to_string(),
                            status_metadata: $crate::api::mux::ascii_metadata(&s),
                        },
                    })
                    .collect(),
            }
        }

        fn replies(batch: $reply_batch) -> Vec<(u64, Result<$reply, tonic::Status>)> {
            batch
                .replies
                .into_iter()
                .map(|r| {
                    (
                        r.id,
                        $crate::api::mux::reply_of(
                            r.reply,
                            r.status_code,
                            r.status_message,
                            r.status_metadata,
                        ),
                    )
                })
                .collect()
        }
    };
}
pub(crate) use stream_messages;

/// `open` and `unary` of a [`Protocol`] whose client has the stream method
/// `$stream` and the unary method `$unary`. Used inside the `impl Protocol`
/// block.
macro_rules! stream_methods {
    ($stream:ident, $unary:ident) => {
        fn open(
            mut client: Self::Client,
            batches: $crate::api::mux::Batches<Self::Batch>,
        ) -> futures::future::BoxFuture<
            'static,
            Result<tonic::codec::Streaming<Self::ReplyBatch>, tonic::Status>,
        > {
            Box::pin(async move {
                client
                    .$stream(tonic::Request::new(batches))
                    .await
                    .map(tonic::Response::into_inner)
            })
        }

        fn unary(
            mut client: Self::Client,
            request: Self::Request,
            timeout: std::time::Duration,
        ) -> futures::future::BoxFuture<'static, Result<Self::Reply, tonic::Status>> {
            Box::pin(async move {
                let mut request = tonic::Request::new(request);
                request.set_timeout(timeout);
                client
                    .$unary(request)
                    .await
                    .map(tonic::Response::into_inner)
            })
        }
    };
}
pub(crate) use stream_methods;

/// The ASCII metadata of a failed call's status (such as a leader hint), as
/// a reply carries it.
pub fn ascii_metadata(status: &Status) -> BTreeMap<String, String> {
    status
        .metadata()
        .iter()
        .filter_map(|entry| match entry {
            tonic::metadata::KeyAndValueRef::Ascii(key, value) => {
                Some((key.as_str().to_string(), value.to_str().ok()?.to_string()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect()
}

/// The result of a call from the peer's reply fields: a reply, or the gRPC
/// status (with its metadata) the unary call would have failed with.
pub fn reply_of<T>(
    reply: Option<T>,
    status_code: i32,
    status_message: String,
    status_metadata: BTreeMap<String, String>,
) -> Result<T, Status> {
    match (reply, Code::from_i32(status_code)) {
        (Some(reply), Code::Ok) => Ok(reply),
        (None, Code::Ok) => Err(Status::internal("stream reply without a result")),
        (_, code) => {
            let mut status = Status::new(code, status_message);
            let metadata = status.metadata_mut();
            for (key, value) in status_metadata {
                if let (Ok(key), Ok(value)) = (
                    key.parse::<tonic::metadata::AsciiMetadataKey>(),
                    value.parse::<tonic::metadata::AsciiMetadataValue>(),
                ) {
                    metadata.insert(key, value);
                }
            }
            Err(status)
        }
    }
}

/// A call failed on this side: the stream to the peer broke, could not be
/// opened or is backed up (`Unavailable`), or the peer did not answer in
/// time (`DeadlineExceeded`). Like the status of a unary call that could not
/// reach its peer, it has an error source, which the peer's statuses never
/// have, so callers can tell "not reached" from "the peer said no" (the
/// router passes over a node it could not reach).
fn not_reached(code: Code, why: String) -> Status {
    let mut status = Status::new(code, why.clone());
    status.set_source(Arc::new(std::io::Error::other(why)));
    status
}

/// Whether a call is still worth sending, asked until it leaves: a call
/// carrying the work of several callers (a router's write call) is not
/// worth sending once one of them has gone, as the caller then builds a
/// call without that work.
pub type Wanted = Arc<dyn Fn() -> bool + Send + Sync>;

/// The source of the status a call gets when its [`Wanted`] said no before
/// it left: nothing of it reached the peer.
#[derive(Debug)]
struct NotWanted;

impl std::fmt::Display for NotWanted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the call is no longer wanted; not sent")
    }
}

impl std::error::Error for NotWanted {}

fn not_wanted() -> Status {
    let mut status = Status::cancelled(NotWanted.to_string());
    status.set_source(Arc::new(NotWanted));
    status
}

/// True if `status` says the call was not sent because its [`Wanted`] said
/// no (see [`Mux::call_while`]). Such a call says nothing of the peer
/// (though it has an error source, as [`not_reached`] statuses do): its
/// caller handles it, retrying at once with the call rebuilt.
pub fn was_not_wanted(status: &Status) -> bool {
    std::error::Error::source(status).is_some_and(|e| e.is::<NotWanted>())
}

struct Queued<P: Protocol> {
    request: P::Request,
    timeout: Duration,
    /// When its caller gives up.
    deadline: Instant,
    reply: oneshot::Sender<Result<P::Reply, Status>>,
    wanted: Option<Wanted>,
}

/// The task's side, kept until the first call starts it (a mux may be made
/// outside a Tokio runtime).
struct Parked<P: Protocol> {
    client: P::Client,
    peer: u64,
    one_way: Duration,
    queue: mpsc::UnboundedReceiver<Queued<P>>,
    unary: Arc<AtomicBool>,
}

/// The sending side of one peer's stream; cheap to clone.
pub struct Mux<P: Protocol> {
    queue: mpsc::UnboundedSender<Queued<P>>,
    started: Arc<AtomicBool>,
    parked: Arc<Mutex<Option<Parked<P>>>>,
    /// Set while the peer, having no stream, gets unary calls: each in a
    /// task of its own, so they may reach it in any order.
    unary: Arc<AtomicBool>,
}

impl<P: Protocol> Clone for Mux<P> {
    fn clone(&self) -> Self {
        Mux {
            queue: self.queue.clone(),
            started: self.started.clone(),
            parked: self.parked.clone(),
            unary: self.unary.clone(),
        }
    }
}

impl<P: Protocol> Mux<P> {
    /// A mux to `peer` behind `client`, whose calls take `one_way` each way
    /// (simulated latency; zero otherwise). Its task starts with the first
    /// call and stops when the last clone is dropped.
    pub fn new(client: P::Client, peer: u64, one_way: Duration) -> Mux<P> {
        let (queue, rx) = mpsc::unbounded_channel();
        let unary = Arc::new(AtomicBool::new(false));
        Mux {
            queue,
            started: Arc::new(AtomicBool::new(false)),
            parked: Arc::new(Mutex::new(Some(Parked {
                client,
                peer,
                one_way,
                queue: rx,
                unary: unary.clone(),
            }))),
            unary,
        }
    }

    /// False while calls go to the peer unary (it has no stream), when
    /// calls queued one after another may reach it in another order.
    pub fn keeps_order(&self) -> bool {
        !self.unary.load(Ordering::Acquire)
    }

    /// One call, answered within `timeout` or failed with `DeadlineExceeded`.
    pub async fn call(&self, request: P::Request, timeout: Duration) -> Result<P::Reply, Status> {
        self.send(request, timeout)?.reply().await
    }

    /// As [`Mux::call`], but the call is not sent if `wanted` says no at
    /// any time before HTTP/2 takes it: it is then answered with a status
    /// that [`was_not_wanted`] recognises, and nothing of it reaches the
    /// peer.
    pub async fn call_while(
        &self,
        request: P::Request,
        timeout: Duration,
        wanted: Wanted,
    ) -> Result<P::Reply, Status> {
        self.queue(request, timeout, Some(wanted))?.reply().await
    }

    /// Queues one call at once, behind every call queued before it: calls
    /// leave on the stream, and reach the peer's handler, in the order they
    /// were queued. Its reply comes within `timeout`, or `DeadlineExceeded`.
    pub fn send(&self, request: P::Request, timeout: Duration) -> Result<SentCall<P>, Status> {
        self.queue(request, timeout, None)
    }

    fn queue(
        &self,
        request: P::Request,
        timeout: Duration,
        wanted: Option<Wanted>,
    ) -> Result<SentCall<P>, Status> {
        if !self.started.load(Ordering::Acquire) {
            if let Some(p) = self.parked.lock().expect("mux start lock").take() {
                tokio::spawn(run::<P>(p));
            }
            self.started.store(true, Ordering::Release);
        }
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(Queued {
                request,
                timeout,
                deadline: Instant::now() + timeout,
                reply: tx,
                wanted,
            })
            .map_err(|_| Status::unavailable(format!("the {} has stopped", P::NAME)))?;
        Ok(SentCall { reply: rx, timeout })
    }
}

/// A call queued on a mux, until its reply comes.
pub struct SentCall<P: Protocol> {
    reply: oneshot::Receiver<Result<P::Reply, Status>>,
    timeout: Duration,
}

impl<P: Protocol> SentCall<P> {
    /// The peer's reply, or why there is none.
    pub async fn reply(self) -> Result<P::Reply, Status> {
        match tokio::time::timeout(self.timeout, self.reply).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(Status::unavailable(format!(
                "the {} dropped the call",
                P::NAME
            ))),
            // No answer from the peer: a router passes over a hung node.
            Err(_) => Err(not_reached(
                Code::DeadlineExceeded,
                format!("no reply within {} ms", self.timeout.as_millis()),
            )),
        }
    }
}

/// Where a stream's batches go: straight to it, or through a task that
/// holds each one for the simulated one-way delay.
enum Outbound<B> {
    Direct(mpsc::Sender<B>),
    Delayed(mpsc::Sender<(Instant, B)>, Duration),
}

impl<B> Outbound<B> {
    /// Queues `batch`; on failure says whether the queue was full (rather
    /// than closed).
    fn try_send(&self, batch: B) -> Result<(), bool> {
        use mpsc::error::TrySendError::Full;
        match self {
            Outbound::Direct(tx) => tx.try_send(batch).map_err(|e| matches!(e, Full(_))),
            Outbound::Delayed(tx, d) => tx
                .try_send((Instant::now() + *d, batch))
                .map_err(|e| matches!(e, Full(_))),
        }
    }
}

/// An open stream: where batches go, and where replies come from.
struct Open<P: Protocol> {
    out: Outbound<P::Batch>,
    replies: Streaming<P::ReplyBatch>,
}

async fn open<P: Protocol>(
    client: P::Client,
    delay: Option<Duration>,
    waiting: &Waiting<P>,
) -> Result<Open<P>, Status> {
    let (tx, rx) = mpsc::channel::<P::Batch>(BATCHES_QUEUED_MAX);
    let out = match delay {
        None => Outbound::Direct(tx),
        Some(d) => {
            let (delayed, mut held) = mpsc::channel::<(Instant, P::Batch)>(BATCHES_QUEUED_MAX);
            tokio::spawn(async move {
                while let Some((due, batch)) = held.recv().await {
                    tokio::time::sleep_until(due).await;
                    if tx.send(batch).await.is_err() {
                        return;
                    }
                }
            });
            Outbound::Delayed(delayed, d)
        }
    };
    let batches = fresh::<P>(rx, waiting.clone());
    let replies = tokio::time::timeout(OPEN_TIMEOUT, P::open(client, batches))
        .await
        .map_err(|_| Status::unavailable(format!("opening the {} timed out", P::NAME)))??;
    Ok(Open { out, replies })
}

/// A call sent, until its reply comes.
struct Waiter<R> {
    reply: oneshot::Sender<Result<R, Status>>,
    deadline: Instant,
    /// Asked as the call leaves; dropped once it has.
    wanted: Option<Wanted>,
}

/// The calls sent on a stream and not yet answered, by id. Shared by the
/// mux task and the stream's batches (see [`fresh`]).
type Waiting<P> = Arc<Mutex<HashMap<u64, Waiter<<P as Protocol>::Reply>>>>;

fn lock<P: Protocol>(
    waiting: &Waiting<P>,
) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter<P::Reply>>> {
    waiting.lock().unwrap_or_else(|e| e.into_inner())
}

/// The batches as HTTP/2 takes them: a batch may wait behind earlier ones,
/// a stream being opened or a simulated delay, so each call is looked at
/// again as HTTP/2 takes it (after which it may still wait for flow-control
/// room, and is not taken back). One
/// whose caller has gone is not sent (a write given up on must not land
/// after writes its client made since), nor one its [`Wanted`] says no to
/// (answered so, see [`was_not_wanted`]), one with no time left is answered
/// `DeadlineExceeded`, not sent, and the rest tell the peer the time their
/// callers have left (less an eighth), not the whole timeout again.
fn fresh<P: Protocol>(rx: mpsc::Receiver<P::Batch>, waiting: Waiting<P>) -> Batches<P::Batch> {
    Batches {
        rx,
        keep: Box::new(move |batch| still_wanted::<P>(batch, &waiting, Instant::now())),
    }
}

/// The calls of `batch` still waited for at `now`, with the time left (see
/// [`fresh`]); None if none is.
fn still_wanted<P: Protocol>(
    batch: P::Batch,
    waiting: &Waiting<P>,
    now: Instant,
) -> Option<P::Batch> {
    let mut waiting = lock::<P>(waiting);
    let calls: Vec<Call<P::Request>> = P::calls(batch)
        .into_iter()
        .filter_map(|mut call| {
            // None if answered already (the stream failed meanwhile).
            let w = waiting.get_mut(&call.id)?;
            let left = if w.reply.is_closed() {
                None
            } else if w.wanted.take().is_some_and(|wanted| !wanted()) {
                if let Some(w) = waiting.remove(&call.id) {
                    let _ = w.reply.send(Err(not_wanted()));
                }
                return None;
            } else {
                w.deadline
                    .checked_duration_since(now)
                    .filter(|left| left.as_millis() >= 1)
            };
            match left {
                Some(left) => {
                    // An eighth less than is left here: a call that runs
                    // out of time on the peer is answered so (a status
                    // without a source) before this side gives up on the
                    // peer, which a caller takes for an unreachable node.
                    call.timeout_ms = (left - left / 8).as_millis().max(1) as u64;
                    Some(call)
                }
                None => {
                    if let Some(w) = waiting.remove(&call.id) {
                        // As a call the peer never answered: the caller passes
                        // over a peer that does not take what is sent to it.
                        let _ = w.reply.send(Err(not_reached(
                            Code::DeadlineExceeded,
                            format!(
                                "{} call waited out its time on this side; not sent",
                                P::NAME
                            ),
                        )));
                    }
                    None
                }
            }
        })
        .collect();
    (!calls.is_empty()).then(|| P::batch(calls))
}

async fn run<P: Protocol>(parked: Parked<P>) {
    let Parked {
        client,
        peer,
        one_way,
        mut queue,
        unary,
    } = parked;
    let delay = (!one_way.is_zero()).then_some(one_way);
    let waiting: Waiting<P> = Arc::default();
    let mut sweep_at = SWEEP_AT;
    let mut next_id: u64 = 0;
    let mut stream: Option<Open<P>> = None;
    // Since when the peer has been called unary, having no stream.
    let mut unary_since: Option<Instant> = None;
    // A call taken from the queue that did not fit in the last batch.
    let mut held: Option<Queued<P>> = None;
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
                        Ok(Some(batch)) => deliver::<P>(batch, &waiting, delay),
                        Ok(None) => {
                            fail_all::<P>(&waiting, format!("node {peer} closed the {}", P::NAME));
                            stream = None;
                        }
                        Err(s) => {
                            fail_all::<P>(&waiting, format!("{} to node {peer}: {s}", P::NAME));
                            stream = None;
                        }
                    }
                    continue;
                }
            },
        };
        // Let the callers that are ready to send queue their calls too.
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
        let calls: Vec<Queued<P>> = calls
            .into_iter()
            .filter(|q| !q.reply.is_closed())
            .filter_map(|q| match &q.wanted {
                Some(wanted) if !wanted() => {
                    let _ = q.reply.send(Err(not_wanted()));
                    None
                }
                _ => Some(q),
            })
            .collect();
        if calls.is_empty() {
            continue;
        }
        if unary_since.is_some_and(|since| since.elapsed() >= UNARY_FOR) {
            unary_since = None;
            unary.store(false, Ordering::Release);
        }
        if unary_since.is_some() {
            for q in calls {
                spawn_unary::<P>(client.clone(), q);
            }
            continue;
        }
        if stream.is_none() {
            match open::<P>(client.clone(), delay, &waiting).await {
                Ok(o) => stream = Some(o),
                Err(s) if s.code() == Code::Unimplemented => {
                    tracing::info!(
                        node = peer,
                        stream = P::NAME,
                        "peer has no such stream; using unary calls"
                    );
                    unary_since = Some(Instant::now());
                    unary.store(true, Ordering::Release);
                    for q in calls {
                        spawn_unary::<P>(client.clone(), q);
                    }
                    continue;
                }
                Err(s) => {
                    let s = not_reached(
                        Code::Unavailable,
                        format!("{} to node {peer}: {s}", P::NAME),
                    );
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
        let mut batch = Vec::with_capacity(calls.len());
        let mut ids = Vec::with_capacity(calls.len());
        {
            let mut waiting = lock::<P>(&waiting);
            for q in calls {
                next_id += 1;
                ids.push(next_id);
                batch.push(Call {
                    id: next_id,
                    request: q.request,
                    // Set to the time left as the batch leaves.
                    timeout_ms: q.timeout.as_millis() as u64,
                });
                waiting.insert(
                    next_id,
                    Waiter {
                        reply: q.reply,
                        deadline: q.deadline,
                        wanted: q.wanted,
                    },
                );
            }
        }
        metrics::histogram!(P::BATCH_METRIC).record(ids.len() as f64);
        if let Err(full) = open.out.try_send(P::batch(batch)) {
            // Backed up is this side's queue, not the peer: the node is
            // reachable and a caller should not pass it over (a status with
            // no source), only try again. Neither was sent.
            let status = |why: &str| {
                if full {
                    Status::unavailable(why)
                } else {
                    not_reached(Code::Unavailable, why.to_string())
                }
            };
            let why = if full {
                format!("{} to node {peer} is backed up; not sent", P::NAME)
            } else {
                format!("{} to node {peer} has closed", P::NAME)
            };
            let mut waiting = lock::<P>(&waiting);
            for id in ids {
                if let Some(w) = waiting.remove(&id) {
                    let _ = w.reply.send(Err(status(&why)));
                }
            }
        }
        let mut waiting = lock::<P>(&waiting);
        if waiting.len() >= sweep_at {
            waiting.retain(|_, w| !w.reply.is_closed());
            // Long polls wait for seconds: under many of them a sweep per
            // batch would scan them all each time.
            sweep_at = SWEEP_AT.max(2 * waiting.len());
        }
    }
}

/// Hands each reply to its caller (after the simulated delay, if any).
fn deliver<P: Protocol>(batch: P::ReplyBatch, waiting: &Waiting<P>, delay: Option<Duration>) {
    let replies = P::replies(batch);
    let mut waiting = lock::<P>(waiting);
    for (id, reply) in replies {
        let Some(Waiter { reply: tx, .. }) = waiting.remove(&id) else {
            continue;
        };
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

fn fail_all<P: Protocol>(waiting: &Waiting<P>, why: String) {
    for (_, w) in lock::<P>(waiting).drain() {
        let _ = w
            .reply
            .send(Err(not_reached(Code::Unavailable, why.clone())));
    }
}

fn spawn_unary<P: Protocol>(client: P::Client, q: Queued<P>) {
    if q.wanted.as_ref().is_some_and(|wanted| !wanted()) {
        let _ = q.reply.send(Err(not_wanted()));
        return;
    }
    tokio::spawn(async move {
        // The time its caller has left.
        let left = q.deadline.saturating_duration_since(Instant::now());
        let reply = P::unary(client, q.request, left.max(Duration::from_millis(1))).await;
        let _ = q.reply.send(reply);
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use futures::StreamExt;
    use tonic::{Code, Status};

    use super::{serve_within, Bounds};
    use crate::api::pb::node::{
        EncodedReadReply, EncodedReadReplyBatch, ReadCall, ReadCallBatch, ReadRequest,
    };
    use crate::api::pb::Message as ChatMessage;
    use crate::api::read_stream::Reads;
    use prost::Message as _;

    /// As a batch leaves, a call whose caller has gone is dropped, one with
    /// no time left is answered DeadlineExceeded unsent, and the rest carry
    /// the time their callers have left, less an eighth.
    #[tokio::test]
    async fn a_batch_leaves_with_only_the_calls_still_waited_for() {
        use super::{still_wanted, Call, Protocol, Waiter, Waiting};
        use tokio::time::Instant;
        let now = Instant::now();
        let waiting: Waiting<Reads> = Default::default();
        let mut replies = Vec::new();
        for (id, left_ms) in [(1u64, 5_000u64), (2, 5_000), (3, 0)] {
            let (tx, rx) = tokio::sync::oneshot::channel();
            waiting.lock().unwrap().insert(
                id,
                Waiter {
                    reply: tx,
                    deadline: now + Duration::from_millis(left_ms),
                    wanted: None,
                },
            );
            replies.push(rx);
        }
        // Call 2's caller gave up; call 4 was answered already.
        drop(replies.remove(1));
        let calls = (1..=4)
            .map(|id| Call {
                id,
                request: ReadRequest::default(),
                timeout_ms: 10_000,
            })
            .collect();
        let later = now + Duration::from_millis(1_000);
        let batch =
            still_wanted::<Reads>(Reads::batch(calls), &waiting, later).expect("call 1 still goes");
        let left: Vec<(u64, u64)> = Reads::calls(batch)
            .iter()
            .map(|c| (c.id, c.timeout_ms))
            .collect();
        // 4 s left here; the peer is told 3.5 s, so that its own timeout
        // answers before this side's.
        assert_eq!(left, [(1, 3_500)]);
        let expired = replies.pop().unwrap().await.unwrap().unwrap_err();
        assert_eq!(expired.code(), Code::DeadlineExceeded);
        assert!(expired.message().contains("not sent"), "{expired}");
        assert_eq!(waiting.lock().unwrap().len(), 1, "only call 1 waits");
        // A batch of nothing still waited for does not leave.
        let gone = vec![Call {
            id: 2,
            request: ReadRequest::default(),
            timeout_ms: 10_000,
        }];
        assert!(still_wanted::<Reads>(Reads::batch(gone), &waiting, later).is_none());
    }

    /// A call whose `wanted` says no as its batch leaves is answered with
    /// a status `was_not_wanted` knows, and not sent; one it says yes to
    /// goes, and is not asked again.
    #[tokio::test]
    async fn a_call_no_longer_wanted_is_not_sent() {
        use super::{still_wanted, was_not_wanted, Call, Protocol, Waiter, Waiting, Wanted};
        use tokio::time::Instant;
        let now = Instant::now();
        let waiting: Waiting<Reads> = Default::default();
        let asked = Arc::new(AtomicUsize::new(0));
        let mut replies = Vec::new();
        for (id, yes) in [(1u64, false), (2, true)] {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let asked = asked.clone();
            let wanted: Wanted = Arc::new(move || {
                asked.fetch_add(1, Ordering::SeqCst);
                yes
            });
            waiting.lock().unwrap().insert(
                id,
                Waiter {
                    reply: tx,
                    deadline: now + Duration::from_millis(5_000),
                    wanted: Some(wanted),
                },
            );
            replies.push(rx);
        }
        let calls = (1..=2)
            .map(|id| Call {
                id,
                request: ReadRequest::default(),
                timeout_ms: 10_000,
            })
            .collect();
        let batch = still_wanted::<Reads>(Reads::batch(calls), &waiting, now).expect("call 2 goes");
        let ids: Vec<u64> = Reads::calls(batch).iter().map(|c| c.id).collect();
        assert_eq!(ids, [2]);
        let unwanted = replies.remove(0).await.unwrap().unwrap_err();
        assert!(was_not_wanted(&unwanted), "{unwanted}");
        assert!(!was_not_wanted(&Status::cancelled("other")));
        assert_eq!(asked.load(Ordering::SeqCst), 2, "each asked once");
        let waiting = waiting.lock().unwrap();
        assert!(waiting[&2].wanted.is_none(), "not kept once sent");
        assert!(!waiting.contains_key(&1));
    }

    fn batch(first_id: u64, calls: u64) -> Result<ReadCallBatch, Status> {
        Ok(ReadCallBatch {
            calls: (first_id..first_id + calls)
                .map(|id| ReadCall {
                    id,
                    request: Some(ReadRequest::default()),
                    timeout_ms: 0,
                })
                .collect(),
        })
    }

    /// Waits (at most 10 s) until `f` holds.
    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_are_not_read_while_their_replies_are_not_taken() {
        const BODY: usize = 64 * 1024;
        let body = bytes::Bytes::from(vec![7u8; BODY]);
        let handled = Arc::new(AtomicUsize::new(0));
        let handle = {
            let (body, handled) = (body.clone(), handled.clone());
            move |_req: ReadRequest| {
                handled.fetch_add(1, Ordering::SeqCst);
                let message = ChatMessage {
                    body: body.clone(),
                    ..Default::default()
                };
                futures::future::ready(Ok(EncodedReadReply {
                    messages: vec![message.encode_to_vec().into()],
                    ..Default::default()
                }))
            }
        };
        // 4 batches of 100 calls, every reply 64 KiB; the bound is 1 MiB,
        // so the reader stops 17 calls into the first batch.
        let calls = futures::stream::iter((0..4).map(|b| batch(b * 100, 100)));
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let bounds = Bounds {
            reply_bytes: 1024 * 1024,
            waiting: 1000,
        };
        let mut replies = serve_within::<Reads, _, _>(calls, handle, stopping, bounds);
        until("the first calls are handled", || {
            handled.load(Ordering::SeqCst) >= 16
        })
        .await;
        // The reader has stopped; give it time to show it would not.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stopped_at = handled.load(Ordering::SeqCst);
        assert!(
            stopped_at <= 20,
            "{stopped_at} calls read with nobody taking their replies"
        );
        // Taking the replies lets the reader go on, to the end.
        let mut ids = Vec::new();
        while ids.len() < 400 {
            let batch = tokio::time::timeout(Duration::from_secs(10), replies.next())
                .await
                .expect("a reply batch in time")
                .expect("the stream goes on")
                .expect("a batch");
            ids.extend(batch.replies.iter().map(|r| r.id));
        }
        ids.sort_unstable();
        assert_eq!(ids, (0..400).collect::<Vec<u64>>());
        assert_eq!(handled.load(Ordering::SeqCst), 400);
    }

    /// A call that waited for room past its timeout is answered
    /// DeadlineExceeded and not run.
    #[tokio::test]
    async fn a_call_out_of_time_before_it_runs_is_not_run() {
        let handled = Arc::new(AtomicUsize::new(0));
        let handle = {
            let handled = handled.clone();
            move |_req: ReadRequest| {
                handled.fetch_add(1, Ordering::SeqCst);
                let message = ChatMessage {
                    body: vec![7u8; 4096].into(),
                    ..Default::default()
                };
                futures::future::ready(Ok(EncodedReadReply {
                    messages: vec![message.encode_to_vec().into()],
                    ..Default::default()
                }))
            }
        };
        let call = |id| ReadCall {
            id,
            request: Some(ReadRequest::default()),
            timeout_ms: 100,
        };
        // The first reply fills the room, so the second call waits for its
        // reply to be taken.
        let calls = futures::stream::iter(vec![Ok(ReadCallBatch {
            calls: vec![call(0), call(1)],
        })])
        .chain(futures::stream::pending());
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let bounds = Bounds {
            reply_bytes: 1024,
            waiting: 10,
        };
        let mut replies = serve_within::<Reads, _, _>(calls, handle, stopping, bounds);
        until("the first call is handled", || {
            handled.load(Ordering::SeqCst) == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = std::collections::BTreeMap::new();
        take_replies(&mut replies, &mut got, 2).await;
        assert_eq!(got.get(&0), Some(&0), "{got:?}");
        assert_eq!(got.get(&1), Some(&(Code::DeadlineExceeded as i32)));
        assert_eq!(handled.load(Ordering::SeqCst), 1, "the late call ran");
    }

    /// Takes reply batches until `got` holds `n` calls' status codes.
    async fn take_replies(
        replies: &mut futures::stream::BoxStream<'static, Result<EncodedReadReplyBatch, Status>>,
        got: &mut std::collections::BTreeMap<u64, i32>,
        n: usize,
    ) {
        while got.len() < n {
            let batch = tokio::time::timeout(Duration::from_secs(10), replies.next())
                .await
                .expect("replies in time")
                .expect("the stream goes on")
                .expect("a batch");
            for r in batch.replies {
                got.insert(r.id, r.status_code);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_past_the_waiting_bound_are_refused_at_once() {
        let (release, released) = tokio::sync::watch::channel(false);
        let handle = move |req: ReadRequest| {
            let mut released = released.clone();
            async move {
                // A call with wait_ms waits for the release; others answer at once.
                if req.wait_ms > 0 {
                    let _ = released.wait_for(|r| *r).await;
                }
                Ok(EncodedReadReply::default())
            }
        };
        let waiting_call = |id| ReadCall {
            id,
            request: Some(ReadRequest {
                wait_ms: 1,
                ..Default::default()
            }),
            timeout_ms: 0,
        };
        let batches = vec![
            Ok(ReadCallBatch {
                calls: (0..5).map(waiting_call).collect(),
            }),
            // Past the bound of 3 waiting, every call is refused unread
            // (a write is not proposed).
            batch(5, 1),
        ];
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let bounds = Bounds {
            reply_bytes: 1024 * 1024,
            waiting: 3,
        };
        let calls = futures::stream::iter(batches).chain(futures::stream::pending());
        let mut replies = serve_within::<Reads, _, _>(calls, handle, stopping, bounds);
        let mut got = std::collections::BTreeMap::new();
        take_replies(&mut replies, &mut got, 3).await;
        let unavailable = Code::Unavailable as i32;
        assert_eq!(got.get(&3), Some(&unavailable));
        assert_eq!(got.get(&4), Some(&unavailable));
        assert_eq!(got.get(&5), Some(&unavailable));
        // The waiting calls are answered once released.
        release.send(true).unwrap();
        take_replies(&mut replies, &mut got, 6).await;
        assert!((0..3).all(|id| got.get(&id) == Some(&0)), "{got:?}");
    }

    /// A handler that panics (at once or after waiting) fails its call as
    /// INTERNAL and gives back its place among the waiting calls.
    #[tokio::test]
    async fn a_panicking_call_is_answered_and_frees_its_place() {
        let handle = |req: ReadRequest| async move {
            if req.wait_ms > 0 {
                tokio::task::yield_now().await;
            }
            if req.shard_id == 7 {
                panic!("a handler bug");
            }
            Ok(EncodedReadReply::default())
        };
        let call = |id, wait_ms, shard_id| ReadCall {
            id,
            request: Some(ReadRequest {
                wait_ms,
                shard_id,
                ..Default::default()
            }),
            timeout_ms: 0,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let bounds = Bounds {
            reply_bytes: 1024 * 1024,
            waiting: 1,
        };
        let calls = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let mut replies = serve_within::<Reads, _, _>(calls, handle, stopping, bounds);
        let mut got = std::collections::BTreeMap::new();
        let internal = Code::Internal as i32;
        // One that panics after waiting, then one that panics at once.
        for (n, (wait_ms, id)) in [(1, 0), (0, 1)].into_iter().enumerate() {
            tx.send(Ok(ReadCallBatch {
                calls: vec![call(id, wait_ms, 7)],
            }))
            .unwrap();
            take_replies(&mut replies, &mut got, n + 1).await;
            assert_eq!(got.get(&id), Some(&internal), "{got:?}");
        }
        // With one place to wait in, this one waits (and is answered) only
        // if the panic gave its place back.
        tx.send(Ok(ReadCallBatch {
            calls: vec![call(2, 1, 0)],
        }))
        .unwrap();
        take_replies(&mut replies, &mut got, 3).await;
        assert_eq!(got.get(&2), Some(&0), "{got:?}");
    }
}
