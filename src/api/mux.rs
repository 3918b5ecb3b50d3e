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
//! back no one else.
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
use std::sync::atomic::{AtomicBool, Ordering};
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
/// holds this many.
const SWEEP_AT: usize = 4096;
/// How long calls to a peer without the stream stay unary before the stream
/// is tried again (the peer may have been upgraded meanwhile).
const UNARY_FOR: Duration = Duration::from_secs(60);

/// The batches a stream sends.
pub type Batches<B> = tokio_stream::wrappers::ReceiverStream<B>;

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

/// The peer's side: runs `handle` on each call of each batch (within the
/// call's timeout; in a task of its own unless it is ready at once) and
/// returns the stream of reply batches, each with the replies ready when it
/// is sent. The stream ends when `stopping` turns true, so a server's
/// graceful shutdown does not wait on it.
pub fn serve<P, H, F>(
    mut calls: Streaming<P::Batch>,
    handle: H,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> BoxStream<'static, Result<P::ReplyBatch, Status>>
where
    P: Protocol,
    H: Fn(P::Request) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Result<P::Reply, Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<(u64, Result<P::Reply, Status>)>();
    let mut reader_stopping = stopping.clone();
    tokio::spawn(async move {
        loop {
            let batch = tokio::select! {
                m = calls.message() => match m {
                    Ok(Some(batch)) => batch,
                    _ => break,
                },
                _ = reader_stopping.wait_for(|s| *s) => break,
            };
            for call in P::calls(batch) {
                let handled = handle(call.request);
                let timeout_ms = call.timeout_ms;
                let mut result = Box::pin(async move {
                    if timeout_ms == 0 {
                        handled.await
                    } else {
                        tokio::time::timeout(Duration::from_millis(timeout_ms), handled)
                            .await
                            .unwrap_or_else(|_| {
                                Err(Status::deadline_exceeded(format!(
                                    "{} call timed out",
                                    P::NAME
                                )))
                            })
                    }
                });
                // Most reads are answered at once, from memory or sled: a
                // call that is ready on its first poll is answered here, and
                // only one that has to wait (a write, a read waiting for an
                // index) gets a task of its own.
                match futures::poll!(result.as_mut()) {
                    std::task::Poll::Ready(result) => {
                        let _ = tx.send((call.id, result));
                    }
                    std::task::Poll::Pending => {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let _ = tx.send((call.id, result.await));
                        });
                    }
                }
            }
        }
    });
    let size = |r: &(u64, Result<P::Reply, Status>)| match &r.1 {
        Ok(reply) => reply.encoded_len(),
        Err(s) => s.message().len(),
    };
    // The state: the receiver, and a reply that did not fit the last batch.
    let replies = futures::stream::unfold((rx, None), move |(mut rx, held)| async move {
        let first = match held {
            Some(r) => r,
            None => rx.recv().await?,
        };
        let mut bytes = size(&first);
        let mut replies = vec![first];
        let mut held = None;
        while replies.len() < REPLIES_PER_BATCH_MAX {
            match rx.try_recv() {
                Ok(r) => {
                    let len = size(&r);
                    if bytes + len > REPLY_BATCH_BYTES_MAX {
                        held = Some(r);
                        break;
                    }
                    bytes += len;
                    replies.push(r);
                }
                Err(_) => break,
            }
        }
        Some((Ok(P::reply_batch(replies)), (rx, held)))
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

struct Queued<P: Protocol> {
    request: P::Request,
    timeout: Duration,
    reply: oneshot::Sender<Result<P::Reply, Status>>,
}

/// The task's side, kept until the first call starts it (a mux may be made
/// outside a Tokio runtime).
struct Parked<P: Protocol> {
    client: P::Client,
    peer: u64,
    one_way: Duration,
    queue: mpsc::UnboundedReceiver<Queued<P>>,
}

/// The sending side of one peer's stream; cheap to clone.
pub struct Mux<P: Protocol> {
    queue: mpsc::UnboundedSender<Queued<P>>,
    started: Arc<AtomicBool>,
    parked: Arc<Mutex<Option<Parked<P>>>>,
}

impl<P: Protocol> Clone for Mux<P> {
    fn clone(&self) -> Self {
        Mux {
            queue: self.queue.clone(),
            started: self.started.clone(),
            parked: self.parked.clone(),
        }
    }
}

impl<P: Protocol> Mux<P> {
    /// A mux to `peer` behind `client`, whose calls take `one_way` each way
    /// (simulated latency; zero otherwise). Its task starts with the first
    /// call and stops when the last clone is dropped.
    pub fn new(client: P::Client, peer: u64, one_way: Duration) -> Mux<P> {
        let (queue, rx) = mpsc::unbounded_channel();
        Mux {
            queue,
            started: Arc::new(AtomicBool::new(false)),
            parked: Arc::new(Mutex::new(Some(Parked {
                client,
                peer,
                one_way,
                queue: rx,
            }))),
        }
    }

    /// One call, answered within `timeout` or failed with `DeadlineExceeded`.
    pub async fn call(&self, request: P::Request, timeout: Duration) -> Result<P::Reply, Status> {
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
                reply: tx,
            })
            .map_err(|_| Status::unavailable(format!("the {} has stopped", P::NAME)))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(Status::unavailable(format!(
                "the {} dropped the call",
                P::NAME
            ))),
            // No answer from the peer: a router passes over a hung node.
            Err(_) => Err(not_reached(
                Code::DeadlineExceeded,
                format!("no reply within {} ms", timeout.as_millis()),
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

async fn open<P: Protocol>(client: P::Client, delay: Option<Duration>) -> Result<Open<P>, Status> {
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
    let batches = tokio_stream::wrappers::ReceiverStream::new(rx);
    let replies = tokio::time::timeout(OPEN_TIMEOUT, P::open(client, batches))
        .await
        .map_err(|_| Status::unavailable(format!("opening the {} timed out", P::NAME)))??;
    Ok(Open { out, replies })
}

type Waiting<P> = HashMap<u64, oneshot::Sender<Result<<P as Protocol>::Reply, Status>>>;

async fn run<P: Protocol>(parked: Parked<P>) {
    let Parked {
        client,
        peer,
        one_way,
        mut queue,
    } = parked;
    let delay = (!one_way.is_zero()).then_some(one_way);
    let mut waiting: Waiting<P> = HashMap::new();
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
                        Ok(Some(batch)) => deliver::<P>(batch, &mut waiting, delay),
                        Ok(None) => {
                            fail_all::<P>(&mut waiting, format!("node {peer} closed the {}", P::NAME));
                            stream = None;
                        }
                        Err(s) => {
                            fail_all::<P>(&mut waiting, format!("{} to node {peer}: {s}", P::NAME));
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
        calls.retain(|q| !q.reply.is_closed());
        if calls.is_empty() {
            continue;
        }
        if unary_since.is_some_and(|since| since.elapsed() >= UNARY_FOR) {
            unary_since = None;
        }
        if unary_since.is_some() {
            for q in calls {
                spawn_unary::<P>(client.clone(), q);
            }
            continue;
        }
        if stream.is_none() {
            match open::<P>(client.clone(), delay).await {
                Ok(o) => stream = Some(o),
                Err(s) if s.code() == Code::Unimplemented => {
                    tracing::info!(
                        node = peer,
                        stream = P::NAME,
                        "peer has no such stream; using unary calls"
                    );
                    unary_since = Some(Instant::now());
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
        for q in calls {
            next_id += 1;
            ids.push(next_id);
            batch.push(Call {
                id: next_id,
                request: q.request,
                timeout_ms: q.timeout.as_millis() as u64,
            });
            waiting.insert(next_id, q.reply);
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
            for id in ids {
                if let Some(tx) = waiting.remove(&id) {
                    let _ = tx.send(Err(status(&why)));
                }
            }
        }
        if waiting.len() >= SWEEP_AT {
            waiting.retain(|_, tx| !tx.is_closed());
        }
    }
}

/// Hands each reply to its caller (after the simulated delay, if any).
fn deliver<P: Protocol>(batch: P::ReplyBatch, waiting: &mut Waiting<P>, delay: Option<Duration>) {
    for (id, reply) in P::replies(batch) {
        let Some(tx) = waiting.remove(&id) else {
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

fn fail_all<P: Protocol>(waiting: &mut Waiting<P>, why: String) {
    for (_, tx) in waiting.drain() {
        let _ = tx.send(Err(not_reached(Code::Unavailable, why.clone())));
    }
}

fn spawn_unary<P: Protocol>(client: P::Client, q: Queued<P>) {
    tokio::spawn(async move {
        let reply = P::unary(client, q.request, q.timeout).await;
        let _ = q.reply.send(reply);
    });
}
