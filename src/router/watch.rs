//! Watch: a server stream of changes to a set of chats, from given pts
//! cursors.
//!
//! Each watched chat of a stream has a task that sends its changes, from
//! long polls of a replica (nearest first): "the difference after pts, once
//! you have applied past index i". Every change is sent once, in pts order,
//! and the next poll asks for what comes after the last change the poll
//! answered, so a replica restart, a leader change or a switch of replica
//! neither loses nor repeats an event. A client that reconnects (for example
//! after a router restart) passes the last pts it received and resumes
//! exactly there.
//!
//! A chat that two or more of a router's streams watch is polled once for
//! all of them ([`Feeds`]). The chat's shared poll keeps its latest changes
//! for its streams to take at their own pace. A stream follows it from the
//! moment the poll keeps every change after the stream's pts, fetched
//! within the last second (a kept change is not fetched again, so a body
//! deleted since must not go to a stream that joins long after); until then
//! it polls for itself, and a stream whose own poll reaches the chat's head
//! starts the shared poll if the chat has none and another stream here
//! watches it. A stream that falls behind what the shared poll keeps (its
//! client reads slowly) polls for itself again from its own pts; one whose
//! client has no room lets go of the shared poll while it waits, so the
//! poll stops once no stream that keeps up follows it. A popular chat with
//! thousands of watchers on a router costs its replica one poll per
//! change, not one per watcher.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::api::pb::node::{read_request::Query, DifferenceQuery};
use crate::api::pb::{Cursor, WatchEvent};
use crate::router::service::{WATCHED_CHATS_MAX, WATCH_STREAMS_MAX};
use crate::router::Router;
use crate::security::Role;
use crate::types::{now_ms, ShardId};

/// How long a replica holds a watch poll open waiting for a new entry.
pub const LONG_POLL_MS: u32 = 3_000;
/// Changes fetched per poll.
const POLL_CHANGES_MAX: u32 = 500;
/// Most bytes of messages one poll fetches (more come with the next poll,
/// at once): a stream whose client reads slowly holds little. A stream's
/// chats share [`STREAM_BYTES_MAX`] between their polls, each at least
/// [`POLL_BYTES_MIN`] (and a poll's first message may pass its bound).
const POLL_BYTES_MAX: u32 = 64 * 1024;
const POLL_BYTES_MIN: u32 = 8 * 1024;
/// Events buffered per stream before the stream applies backpressure.
const STREAM_BUFFER: usize = 1024;
/// Most bytes of events one stream holds for its client (an event larger
/// than this still goes, alone): a client that reads slowly, or not at all,
/// costs the router this much, not a buffer of full messages. A client that
/// keeps up is not slowed by it: HTTP/2's window holds what is on its way.
const STREAM_BYTES_MAX: usize = 64 * 1024;

/// About the most a router holds for Watch clients that read slowly or not
/// at all (each stream's queue, and the poll answer each chat's task holds
/// while it waits for room in it, the changes each shared poll keeps and
/// the answer it holds), past the overshoot of single messages larger than
/// a bound: with every stream, chat and shared-poll slot taken, 1.8 GiB
/// (1 MiB per stream and 256 KiB per chat before, 20 GiB in all). hyper's
/// HTTP/2 send buffer (up to 400 KiB a stream, within the windows the
/// client grants) comes on top; tonic does not let it be set.
pub const HELD_BYTES_MAX: usize = WATCH_STREAMS_MAX * (STREAM_BYTES_MAX + POLL_BYTES_MAX as usize)
    + WATCHED_CHATS_MAX * POLL_BYTES_MIN as usize
    + FEEDS_MAX * (FEED_KEPT_BYTES + FEED_POLL_BYTES as usize);
const _: () = assert!(HELD_BYTES_MAX <= 1900 * 1024 * 1024);

type Event = Result<WatchEvent, tonic::Status>;

/// The sending side of one Watch stream, bounded in events and in bytes.
#[derive(Clone)]
pub struct EventSender {
    tx: mpsc::Sender<Queued>,
    bytes: Arc<Semaphore>,
    /// The error that ends the stream, delivered after every queued event
    /// however full the queue is.
    end: Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<tonic::Status>>>>,
}

/// A new Watch stream: its sender, and the stream of events its client
/// reads. An event's bytes are freed once the stream hands it on.
pub fn event_stream() -> (
    EventSender,
    impl futures::Stream<Item = Event> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let bytes = Arc::new(Semaphore::new(STREAM_BYTES_MAX));
    let (end, ended) = tokio::sync::oneshot::channel::<tonic::Status>();
    let events = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|(event, _bytes, hide_at): Queued| {
            event.map(|e| as_handed_on(e, hide_at, Instant::now()))
        })
        // Once every sender is gone: the error the stream ended with, if any.
        .chain(futures::stream::once(ended).filter_map(|end| async move { end.ok().map(Err) }));
    let end = Arc::new(std::sync::Mutex::new(Some(end)));
    (EventSender { tx, bytes, end }, events)
}

/// An event as queued for its client: its bytes' permit, and when its body
/// must be left out.
type Queued = (Event, Option<OwnedSemaphorePermit>, Option<Instant>);

/// What [`EventSender::try_send`] did. Held for a moment, on the stack: a
/// box for the event would cost an allocation per event.
#[allow(clippy::large_enum_variant)]
enum TrySend {
    Queued,
    /// No room now: the event, to send when there is.
    Full(WatchEvent),
    /// The client has gone.
    Gone,
}

/// When the self-destructing body `event` carries must no longer be handed
/// on: when a read on the replica that sent it would hide it, by that
/// replica's clock (`node_now` when it answered, at `received` here) and the
/// time passed since, not by this router's clock, which nothing checks. A
/// message to self-destruct after it is read, and not read when the replica
/// answered, may be read at once: it is hidden from its timer's length on.
fn hide_at(event: &WatchEvent, received: Instant, node_now: u64) -> Option<Instant> {
    use crate::api::pb::self_destruct_policy::Policy;
    let message = event.change.as_ref()?.message.as_ref()?;
    let expire_at = match message.expire_at_ms {
        0 => match message.self_destruct.as_ref().and_then(|s| s.policy) {
            Some(Policy::AfterReadSecs(secs)) => node_now.saturating_add(secs as u64 * 1000),
            _ => return None,
        },
        at => at,
    };
    let hidden_from = expire_at.saturating_sub(crate::node::clock::CLOCK_OFFSET_MS_MAX);
    Some(received + Duration::from_millis(hidden_from.saturating_sub(node_now)))
}

/// `event` as its client may see it at `now`: a self-destructing body whose
/// time came while the event waited for the client is left out, as a read
/// would leave it out (the change itself still goes).
fn as_handed_on(mut event: WatchEvent, hide_at: Option<Instant>, now: Instant) -> WatchEvent {
    if hide_at.is_some_and(|at| now >= at) {
        if let Some(change) = event.change.as_mut() {
            change.message = None;
        }
    }
    event
}

impl EventSender {
    /// Waits for room, then queues `event` (its body to be left out from
    /// `hide_at`); Err if the client has gone.
    async fn send(&self, event: WatchEvent, hide_at: Option<Instant>) -> Result<(), ()> {
        let n = event.encoded_len().clamp(1, STREAM_BYTES_MAX) as u32;
        let permit = self
            .bytes
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| ())?;
        self.tx
            .send((Ok(event), Some(permit), hide_at))
            .await
            .map_err(|_| ())
    }

    /// Queues `event` if there is room for it now; gives it back if not.
    fn try_send(&self, event: WatchEvent, hide_at: Option<Instant>) -> TrySend {
        let n = event.encoded_len().clamp(1, STREAM_BYTES_MAX) as u32;
        let permit = match self.bytes.clone().try_acquire_many_owned(n) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::NoPermits) => return TrySend::Full(event),
            Err(tokio::sync::TryAcquireError::Closed) => return TrySend::Gone,
        };
        match self.tx.try_send((Ok(event), Some(permit), hide_at)) {
            Ok(()) => TrySend::Queued,
            Err(mpsc::error::TrySendError::Full((Ok(event), ..))) => TrySend::Full(event),
            Err(_) => TrySend::Gone,
        }
    }

    /// Sets the error that ends the stream, after the events queued; it
    /// needs no room, and the stream ends once every sender is dropped.
    fn end_with(&self, status: tonic::Status) {
        if let Some(end) = self.end.lock().expect("watch end").take() {
            let _ = end.send(status);
        }
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Waits until the client has gone.
    async fn closed(&self) {
        self.tx.closed().await
    }
}
/// Long polls in a row that a replica answers with no news while the
/// shard's leader had applied past what the Watch waits for, before the
/// Watch moves to the next replica.
const STUCK_POLLS: u32 = 2;

/// Answers in a row from a replica this many entries behind where its
/// leader was at the router's last look (a follower catching up after a
/// restart, whose events come late), before the Watch moves on; and how long
/// a Watch moved off the nearest replica stays away before it tries it again.
const LAG_ENTRIES_MAX: u64 = 100;
const LAGGING_POLLS: u32 = 3;
const AWAY_FOR: Duration = Duration::from_secs(30);

/// Where a chat's Watch polls next, after an answer from replica `used`
/// (an index into the shard's replicas, nearest first) that had applied
/// `applied` while its leader had applied `leader_applied` at the router's
/// last look (0: unknown): the same replica, unless it kept lagging far
/// behind (then the next), or the Watch has been off the nearest one for
/// [`AWAY_FOR`] (then the nearest again). `state` is the lagging answers in
/// a row and since when the Watch is away.
fn next_replica(
    used: usize,
    (applied, leader_applied): (u64, u64),
    state: &mut (u32, Option<Instant>),
    now: Instant,
) -> usize {
    let (lagging, away_since) = state;
    *lagging = match leader_applied > applied.saturating_add(LAG_ENTRIES_MAX) {
        true => *lagging + 1,
        false => 0,
    };
    let next = if *lagging >= LAGGING_POLLS {
        *lagging = 0;
        used + 1
    } else if used != 0 && away_since.is_some_and(|at| now.duration_since(at) >= AWAY_FOR) {
        0
    } else {
        used
    };
    *away_since = match next {
        0 => None,
        _ => Some(away_since.unwrap_or(now)),
    };
    next
}

/// True for a failed poll that may succeed if tried again or elsewhere:
/// what the router retries, and an overloaded replica.
fn worth_retrying(status: &tonic::Status) -> bool {
    super::is_retryable(status) || status.code() == tonic::Code::ResourceExhausted
}

/// Polls in a row refused in a way that trying again does not change (a
/// record that does not decode, a cluster this router does not match),
/// after which the Watch ends with that refusal: every replica has had
/// two tries, and a Watch polling on in silence would look idle.
const REFUSALS_TO_END: u32 = 6;

/// Streams the changes of `cursors` into `tx` until the receiver goes away,
/// the token in `auth` no longer lets its holder watch (the stream ends
/// with that error), or `stopping` turns true (the router stops). A chat
/// that other streams of this router watch too is polled once for all of
/// them (`feeds`).
pub async fn run(
    router: Router,
    feeds: Feeds,
    cursors: Vec<Cursor>,
    tx: EventSender,
    auth: tonic::metadata::MetadataMap,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let poll_bytes = poll_bytes(cursors.len());
    for c in cursors {
        tasks.spawn(watch_chat(
            router.clone(),
            feeds.clone(),
            c,
            tx.clone(),
            poll_bytes,
        ));
    }
    let mut recheck = tokio::time::interval(crate::security::FILES_CHECKED_EVERY);
    // A dropped sender means no stop will come.
    let stop = async move {
        if stopping.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            joined = tasks.join_next() => {
                match joined {
                    None => return,
                    Some(Ok(Some(refused))) => {
                        tasks.abort_all();
                        tx.end_with(refused);
                        return;
                    }
                    Some(_) => {}
                }
            }
            _ = recheck.tick() => {
                if let Err(status) = router.tokens().check(&auth, Role::Service) {
                    tasks.abort_all();
                    tx.end_with(status);
                    return;
                }
            }
            _ = &mut stop => {
                tasks.abort_all();
                tx.end_with(tonic::Status::unavailable(
                    "the router is stopping; watch again from the last pts",
                ));
                return;
            }
        }
    }
}

/// Each chat's poll bound in a stream of `chats`: their share of the
/// stream's bytes, within [`POLL_BYTES_MIN`] and [`POLL_BYTES_MAX`].
fn poll_bytes(chats: usize) -> u32 {
    let share = STREAM_BYTES_MAX / chats.max(1);
    (share.min(u32::MAX as usize) as u32).clamp(POLL_BYTES_MIN, POLL_BYTES_MAX)
}

/// Sends one chat's changes into `tx` until the client goes; returns the
/// refusal the Watch must end with if polls keep being refused. The stream
/// follows the chat's shared poll whenever it may join it (see the module
/// doc), polls for itself otherwise, and starts a shared poll when its own
/// poll reaches the chat's head and another stream here watches the chat.
async fn watch_chat(
    router: Router,
    feeds: Feeds,
    cursor: Cursor,
    tx: EventSender,
    poll_bytes: u32,
) -> Option<tonic::Status> {
    let _counted = feeds.count(cursor.chat_id);
    let mut poll = ChatPoll::new(&router, cursor, poll_bytes, POLLS_BY_STREAM);
    let mut feed = feeds.joinable(poll.chat, poll.pts);
    loop {
        if let Some(shared) = feed.take() {
            match follow(shared, &mut poll.pts, &tx).await {
                Followed::Gone => return None,
                Followed::Ended(status) => return Some(status),
                // Behind what the shared poll keeps (or it stopped): polls
                // for itself again, from its own pts.
                Followed::Behind => {
                    metrics::counter!(crate::metrics::ROUTER_WATCH_FELL_BEHIND).increment(1);
                    poll.rejoin_own();
                }
            }
        }
        if tx.is_closed() {
            return None;
        }
        let at_head = match poll.next(&router).await {
            Polled::Refused(status) => return Some(status),
            Polled::Failed | Polled::Waited => false,
            Polled::Events { events, at_head } => {
                for (event, hide_at) in events {
                    if tx.send(event, hide_at).await.is_err() {
                        return None;
                    }
                }
                at_head
            }
        };
        // A shared poll starts only from an answer up to the chat's head:
        // not from a wait with no news, which a replica that applies
        // nothing gives too.
        feed = match at_head && poll.after_index > 0 {
            true => feeds.feed_for(&router, &poll),
            false => feeds.joinable(poll.chat, poll.pts),
        };
    }
}

/// Who sends a Watch poll, as counted in
/// [`crate::metrics::ROUTER_WATCH_POLLS`]: one stream for itself, or a
/// chat's shared poll for every stream here that follows it.
const POLLS_BY_STREAM: &str = "stream";
const POLLS_BY_FEED: &str = "shared";

/// One chat's long polls on its shard's replicas: how far they have come
/// and where the next one goes.
#[derive(Clone, Copy)]
struct ChatPoll {
    chat: u64,
    shard: ShardId,
    /// The last pts handed on.
    pts: u64,
    /// Every entry up to this index is in what was handed on (0: the next
    /// poll answers at once).
    after_index: u64,
    bytes_max: u32,
    replica: usize,
    failures: u32,
    refusals: u32,
    stuck: u32,
    /// Answers in a row from a replica far behind, and since when the
    /// polls are off the nearest replica.
    placement: (u32, Option<Instant>),
    by: &'static str,
}

/// What one poll gave.
enum Polled {
    /// The answer's events in pts order (a reset first), and whether the
    /// chat had nothing after them when the replica answered.
    Events {
        events: Vec<(WatchEvent, Option<Instant>)>,
        at_head: bool,
    },
    /// The replica did not apply past the poll's index within the wait:
    /// usually nothing changed, but a replica that applies nothing answers
    /// the same (the next poll may go elsewhere).
    Waited,
    /// The replica failed; the next poll goes to the next one, after a
    /// pause.
    Failed,
    /// Every replica kept refusing the chat: the Watch ends with this.
    Refused(tonic::Status),
}

impl ChatPoll {
    fn new(router: &Router, cursor: Cursor, bytes_max: u32, by: &'static str) -> ChatPoll {
        ChatPoll {
            chat: cursor.chat_id,
            shard: router.shard_of(cursor.chat_id),
            pts: cursor.pts,
            after_index: 0,
            bytes_max,
            replica: 0,
            failures: 0,
            refusals: 0,
            stuck: 0,
            placement: (0, None),
            by,
        }
    }

    /// A shared poll that goes on from where this one stands (its replica,
    /// index and placement), with none of its failures counted.
    fn shared(&self) -> ChatPoll {
        ChatPoll {
            bytes_max: FEED_POLL_BYTES,
            failures: 0,
            refusals: 0,
            by: POLLS_BY_FEED,
            ..*self
        }
    }

    /// Goes back to polling for itself after following a shared poll: the
    /// next poll answers at once from its pts, with none of its earlier
    /// failures counted.
    fn rejoin_own(&mut self) {
        self.after_index = 0;
        self.failures = 0;
        self.refusals = 0;
        self.stuck = 0;
    }

    /// Sends the next poll: the changes after `pts`, once the replica has
    /// applied past `after_index` (at once when that is 0).
    async fn next(&mut self, router: &Router) -> Polled {
        metrics::counter!(crate::metrics::ROUTER_WATCH_POLLS, "by" => self.by).increment(1);
        let query = Query::Difference(DifferenceQuery {
            chat_id: self.chat,
            pts: self.pts,
            limit: POLL_CHANGES_MAX,
            bytes_max: self.bytes_max,
            wait_for_change: true,
        });
        let (used, result) = router
            .read_for_watch(self.shard, self.after_index, query, self.replica)
            .await;
        let reply = match result {
            Ok(r) => r,
            Err(status) => {
                // A replica that timed out waiting is fine; one that is down
                // or failing makes us move to the next.
                if !crate::api::status::is_behind(&status) {
                    self.refusals = match worth_retrying(&status) {
                        true => 0,
                        false => self.refusals + 1,
                    };
                    if self.refusals >= REFUSALS_TO_END {
                        // INTERNAL: the cluster's fault, not the caller's
                        // (a node's own code, such as FAILED_PRECONDITION,
                        // means something else on this API).
                        return Polled::Refused(tonic::Status::internal(format!(
                            "watching chat {}: every replica refused it {REFUSALS_TO_END} times in a row: {:?}: {}",
                            self.chat,
                            status.code(),
                            status.message()
                        )));
                    }
                    self.replica = used + 1;
                    self.failures += 1;
                    let backoff = Duration::from_millis((50u64 << self.failures.min(4)).min(1000));
                    tokio::time::sleep(backoff).await;
                    return Polled::Failed;
                }
                // The replica waited with no news. Usually the chat is
                // idle; but a replica that is up yet applies nothing (cut
                // off from its leader, or its disk failed) answers the same
                // way forever. If the leader had applied past what we wait
                // for, more than once, try the next replica.
                self.stuck = match router.leader_applied(self.shard) > self.after_index {
                    true => self.stuck + 1,
                    false => 0,
                };
                if self.stuck >= STUCK_POLLS {
                    self.replica = used + 1;
                    self.stuck = 0;
                }
                return Polled::Waited;
            }
        };
        self.failures = 0;
        self.refusals = 0;
        self.stuck = 0;
        let received = Instant::now();
        // Every entry up to here is in the answer. Not `applied_index`:
        // that may name an apply call still writing, whose change this
        // answer may lack.
        let complete = match reply.complete_through {
            0 => reply.applied_index,
            complete => complete,
        };
        // Where the replica stands against its leader says whether to stay.
        self.replica = next_replica(
            used,
            (complete, router.leader_applied(self.shard)),
            &mut self.placement,
            received,
        );
        let node_now = match reply.now_ms {
            0 => now_ms(),
            at => at,
        };
        let Some(diff) = reply.difference else {
            return Polled::Events {
                events: Vec::new(),
                at_head: false,
            };
        };
        let mut events = Vec::with_capacity(diff.changes.len() + 1);
        if diff.reset_required {
            events.push((
                WatchEvent {
                    change: None,
                    reset_required: true,
                    chat_id: self.chat,
                    pts: diff.pts,
                    served_by_node: reply.served_by_node,
                },
                None,
            ));
            self.pts = diff.pts;
        }
        for change in diff.changes {
            if change.pts <= self.pts {
                continue;
            }
            self.pts = change.pts;
            let event = WatchEvent {
                chat_id: self.chat,
                pts: change.pts,
                change: Some(change),
                reset_required: false,
                served_by_node: reply.served_by_node,
            };
            let hide_at = hide_at(&event, received, node_now);
            events.push((event, hide_at));
        }
        // With more changes pending, poll again at once from the same index.
        if !diff.more {
            self.after_index = complete;
        }
        Polled::Events {
            events,
            at_head: !diff.more,
        }
    }
}

/// Most chats one router polls once for all of its streams that watch them
/// (a chat two or more of its streams watch); past it, each stream polls
/// for itself, as a stream alone on its chat does.
const FEEDS_MAX: usize = 5_000;
/// Most bytes of messages one shared poll fetches (its first message may
/// pass it).
const FEED_POLL_BYTES: u32 = 16 * 1024;
/// Most bytes a shared poll keeps for the streams that follow it, each
/// change counted with what holding it costs besides its encoded bytes
/// (its newest change is kept whatever its size). A stream that falls
/// further behind, its client reading slowly, polls for itself until it is
/// back at the chat's head.
const FEED_KEPT_BYTES: usize = 32 * 1024;
/// What a kept change costs besides its encoded bytes: the event as a
/// struct, its reference count and its place in the queue.
const KEPT_OVERHEAD_BYTES: usize = std::mem::size_of::<Shared>() + 32;
/// A stream joins a shared poll only where the changes it would take from
/// it were fetched at most this long ago. Kept changes are not fetched
/// again: a message deleted, or a chat closed, since keeps its body there,
/// which a stream that polled for itself would not get.
const JOIN_AGE_MAX: Duration = Duration::from_secs(1);

/// The chats this router's streams watch: how many streams watch each, and
/// its shared poll while it has one.
#[derive(Clone, Default)]
pub struct Feeds {
    chats: Arc<Mutex<HashMap<u64, Watchers>>>,
    alive: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Watchers {
    streams: usize,
    feed: Weak<Feed>,
}

/// A stream's watch of one chat, counted in [`Feeds`] while it lasts.
struct Counted {
    feeds: Feeds,
    chat: u64,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut chats = self.feeds.chats.lock().expect("watch feeds");
        if let Some(w) = chats.get_mut(&self.chat) {
            w.streams -= 1;
            if w.streams == 0 {
                chats.remove(&self.chat);
            }
        }
    }
}

impl Feeds {
    fn count(&self, chat: u64) -> Counted {
        let mut chats = self.chats.lock().expect("watch feeds");
        chats.entry(chat).or_default().streams += 1;
        Counted {
            feeds: self.clone(),
            chat,
        }
    }

    /// The chat's shared poll, if it has one a stream at `pts` may follow.
    fn joinable(&self, chat: u64, pts: u64) -> Option<Arc<Feed>> {
        let feed = self
            .chats
            .lock()
            .expect("watch feeds")
            .get(&chat)?
            .feed
            .upgrade()?;
        let joinable = feed.lock().joinable(pts, Instant::now());
        joinable.then_some(feed)
    }

    /// For a stream whose `poll` has just been answered up to its chat's
    /// head: the chat's shared poll if the stream may follow it; or a new
    /// one from there, if the chat has none that still polls, another
    /// stream here watches it too and there is room for one.
    fn feed_for(&self, router: &Router, poll: &ChatPoll) -> Option<Arc<Feed>> {
        let mut chats = self.chats.lock().expect("watch feeds");
        let watchers = chats.get_mut(&poll.chat)?;
        if let Some(feed) = watchers.feed.upgrade() {
            let kept = feed.lock();
            if kept.end.is_none() {
                let joinable = kept.joinable(poll.pts, Instant::now());
                drop(kept);
                return joinable.then_some(feed);
            }
        }
        if watchers.streams < 2 || self.alive.load(Ordering::Relaxed) >= FEEDS_MAX {
            return None;
        }
        let feed = Feed::start(router, poll.shared(), self.alive.clone());
        watchers.feed = Arc::downgrade(&feed);
        Some(feed)
    }
}

/// One chat's shared poll: the changes it fetched lately, for the streams
/// that follow it. Its polling stops when the last of them lets go.
struct Feed {
    kept: Mutex<Kept>,
    /// Bumped after each answer that brought changes, and when the polling
    /// ends.
    news: tokio::sync::watch::Sender<()>,
    poller: OnceLock<tokio::task::AbortHandle>,
    alive: Arc<AtomicUsize>,
}

impl Feed {
    fn start(router: &Router, poll: ChatPoll, alive: Arc<AtomicUsize>) -> Arc<Feed> {
        alive.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::ROUTER_WATCH_FEEDS).increment(1);
        let feed = Arc::new(Feed {
            kept: Mutex::new(Kept::after(poll.pts)),
            news: tokio::sync::watch::Sender::new(()),
            poller: OnceLock::new(),
            alive,
        });
        let task = tokio::spawn(poll_for_feed(router.clone(), Arc::downgrade(&feed), poll));
        let _ = feed.poller.set(task.abort_handle());
        feed
    }

    /// What the poll keeps. A panic while it was held left it whole (each
    /// step under the lock leaves it consistent), so a poisoned lock is
    /// taken as it is: a second panic in `StopsFeed` would abort.
    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks the polling ended (if nothing else did) and wakes the streams.
    fn end(&self, end: End) {
        self.lock().end.get_or_insert(end);
        self.news.send_replace(());
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        if let Some(poller) = self.poller.get() {
            poller.abort();
        }
        self.alive.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::ROUTER_WATCH_FEEDS).decrement(1);
    }
}

/// Ends a shared poll however its task stops while streams still follow
/// it (a panic included): they go back to polling for themselves.
struct StopsFeed(Weak<Feed>);

impl Drop for StopsFeed {
    fn drop(&mut self) {
        if let Some(feed) = self.0.upgrade() {
            feed.end(End::Stopped);
        }
    }
}

/// Polls a chat for its [`Feed`] until the feed is gone or every replica
/// keeps refusing the chat.
async fn poll_for_feed(router: Router, feed: Weak<Feed>, mut poll: ChatPoll) {
    let _stops = StopsFeed(feed.clone());
    loop {
        let polled = poll.next(&router).await;
        let Some(feed) = feed.upgrade() else {
            return;
        };
        match polled {
            Polled::Refused(status) => {
                feed.end(End::Refused(status));
                return;
            }
            Polled::Events { events, .. } if !events.is_empty() => {
                let fetched = Instant::now();
                let mut kept = feed.lock();
                for (event, hide_at) in events {
                    kept.push(event, hide_at, fetched);
                }
                drop(kept);
                feed.news.send_replace(());
            }
            _ => {}
        }
    }
}

/// A change as a shared poll keeps it for its streams.
#[derive(Debug)]
struct Shared {
    event: WatchEvent,
    hide_at: Option<Instant>,
    fetched: Instant,
    bytes: usize,
}

/// Why a shared poll stopped polling.
enum End {
    /// Every replica kept refusing the chat: its streams end with this.
    Refused(tonic::Status),
    /// Its task stopped otherwise: its streams poll for themselves.
    Stopped,
}

/// The changes a shared poll keeps: every change after pts `after`, in pts
/// order, and how its polling ended, if it did.
#[derive(Default)]
struct Kept {
    changes: VecDeque<Arc<Shared>>,
    after: u64,
    bytes: usize,
    end: Option<End>,
}

/// What a stream that follows a shared poll from a pts does next.
#[derive(Debug)]
enum Next {
    Send(Arc<Shared>),
    Wait,
    /// The poll no longer keeps the change after that pts, or stopped.
    Behind,
    Ended(tonic::Status),
}

impl Kept {
    fn after(pts: u64) -> Kept {
        Kept {
            after: pts,
            ..Kept::default()
        }
    }

    /// Keeps the next event of the poll, fetched at `fetched` (a reset
    /// drops what it kept: a stream behind it polls for itself, and gets a
    /// reset of its own if it needs one), and lets go of the oldest changes
    /// past [`FEED_KEPT_BYTES`].
    fn push(&mut self, event: WatchEvent, hide_at: Option<Instant>, fetched: Instant) {
        if event.reset_required {
            self.changes.clear();
            self.bytes = 0;
            self.after = event.pts;
            return;
        }
        let bytes = event.encoded_len() + KEPT_OVERHEAD_BYTES;
        self.bytes += bytes;
        self.changes.push_back(Arc::new(Shared {
            event,
            hide_at,
            fetched,
            bytes,
        }));
        while self.bytes > FEED_KEPT_BYTES && self.changes.len() > 1 {
            let oldest = self.changes.pop_front().expect("more than one");
            self.bytes -= oldest.bytes;
            self.after = oldest.event.pts;
        }
    }

    /// Whether a stream at `pts` may start to follow the poll at `now`: it
    /// still polls, keeps every change after `pts`, and fetched them lately
    /// ([`JOIN_AGE_MAX`]).
    fn joinable(&self, pts: u64, now: Instant) -> bool {
        if self.end.is_some() || pts < self.after {
            return false;
        }
        let i = self.changes.partition_point(|c| c.event.pts <= pts);
        self.changes
            .get(i)
            .is_none_or(|c| now.duration_since(c.fetched) <= JOIN_AGE_MAX)
    }

    fn next_after(&self, pts: u64) -> Next {
        if pts < self.after {
            return Next::Behind;
        }
        let i = self.changes.partition_point(|c| c.event.pts <= pts);
        match (self.changes.get(i), &self.end) {
            (Some(change), _) => Next::Send(change.clone()),
            (None, Some(End::Refused(status))) => Next::Ended(status.clone()),
            (None, Some(End::Stopped)) => Next::Behind,
            (None, None) => Next::Wait,
        }
    }
}

/// How following a shared poll ended.
enum Followed {
    /// The client went away.
    Gone,
    /// The stream fell behind what the poll keeps, or the poll stopped.
    Behind,
    /// The poll ended with this refusal.
    Ended(tonic::Status),
}

/// Sends `feed`'s changes after `pts` into `tx` as they come, advancing
/// `pts` past each one sent. A stream whose client has no room for the
/// next change lets go of the feed while it waits: streams that read slowly
/// do not keep a chat's shared poll going, and find it gone (so poll for
/// themselves) if every other stream let go of it meanwhile.
async fn follow(feed: Arc<Feed>, pts: &mut u64, tx: &EventSender) -> Followed {
    let mut news = feed.news.subscribe();
    let weak = Arc::downgrade(&feed);
    let mut held = Some(feed);
    loop {
        let Some(feed) = held.take().or_else(|| weak.upgrade()) else {
            return Followed::Behind;
        };
        let next = feed.lock().next_after(*pts);
        match next {
            Next::Send(change) => {
                let (event, hide_at, at) = (change.event.clone(), change.hide_at, change.event.pts);
                drop(change);
                match tx.try_send(event, hide_at) {
                    TrySend::Queued => held = Some(feed),
                    TrySend::Gone => return Followed::Gone,
                    TrySend::Full(event) => {
                        drop(feed);
                        if tx.send(event, hide_at).await.is_err() {
                            return Followed::Gone;
                        }
                    }
                }
                *pts = at;
            }
            Next::Wait => {
                tokio::select! {
                    changed = news.changed() => {
                        if changed.is_err() {
                            return Followed::Behind;
                        }
                    }
                    _ = tx.closed() => return Followed::Gone,
                }
                held = Some(feed);
            }
            Next::Behind => return Followed::Behind,
            Next::Ended(status) => return Followed::Ended(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pb::{Change, Message as ChatMessage};

    fn event(pts: u64, body_bytes: usize) -> WatchEvent {
        WatchEvent {
            chat_id: 1,
            pts,
            change: Some(Change {
                chat_id: 1,
                pts,
                message: Some(ChatMessage {
                    body: vec![b'x'; body_bytes].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A Watch stays on a replica that keeps up, moves on from one that
    /// keeps answering far behind its leader, and tries the nearest again
    /// once it has been away for a while.
    #[test]
    fn a_watch_moves_off_a_replica_far_behind_and_comes_back() {
        let t0 = Instant::now();
        let mut state = (0, None);
        // Near its leader (or the leader's progress unknown): stays.
        assert_eq!(next_replica(0, (1_000, 1_050), &mut state, t0), 0);
        assert_eq!(next_replica(0, (1_000, 0), &mut state, t0), 0);
        // Far behind, but not for long: stays.
        assert_eq!(next_replica(0, (1_000, 5_000), &mut state, t0), 0);
        assert_eq!(next_replica(0, (1_100, 5_000), &mut state, t0), 0);
        assert_eq!(next_replica(0, (5_000, 5_000), &mut state, t0), 0);
        // Far behind for LAGGING_POLLS answers in a row: the next one.
        for _ in 1..LAGGING_POLLS {
            assert_eq!(next_replica(0, (1_000, 5_000), &mut state, t0), 0);
        }
        assert_eq!(next_replica(0, (1_000, 5_000), &mut state, t0), 1);
        // Away, it stays while the next one keeps up...
        let later = t0 + AWAY_FOR / 2;
        assert_eq!(next_replica(1, (6_000, 6_000), &mut state, later), 1);
        // ...and tries the nearest again once it has been away long enough.
        let much_later = t0 + AWAY_FOR;
        assert_eq!(next_replica(1, (7_000, 7_000), &mut state, much_later), 0);
        assert_eq!(next_replica(0, (7_000, 7_000), &mut state, much_later), 0);
        assert_eq!(state, (0, None));
    }

    /// The error that ends a stream reaches a client whose queue is full,
    /// after every queued event.
    #[tokio::test]
    async fn the_ending_error_comes_after_a_full_queue() {
        let (tx, events) = event_stream();
        for pts in 1..=STREAM_BUFFER as u64 {
            tx.send(event(pts, 10), None).await.unwrap();
        }
        tx.end_with(tonic::Status::unauthenticated("token revoked"));
        drop(tx);
        let all: Vec<Event> = events.collect().await;
        assert_eq!(all.len(), STREAM_BUFFER + 1);
        assert!(all[..STREAM_BUFFER].iter().all(|e| e.is_ok()));
        let last = all.last().unwrap().as_ref().unwrap_err();
        assert_eq!(last.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn a_streams_chats_share_its_bytes_between_their_polls() {
        assert_eq!(poll_bytes(1), POLL_BYTES_MAX);
        assert_eq!(poll_bytes(4), 16 * 1024);
        assert_eq!(poll_bytes(100), POLL_BYTES_MIN);
        assert_eq!(poll_bytes(0), POLL_BYTES_MAX);
    }

    /// A body whose time came while its event waited for the client is left
    /// out when the client takes the event.
    #[test]
    fn an_event_taken_after_its_message_expired_has_no_body() {
        let mut e = event(1, 10);
        let expire_at = 100_000;
        e.change
            .as_mut()
            .unwrap()
            .message
            .as_mut()
            .unwrap()
            .expire_at_ms = expire_at;
        let margin = crate::node::clock::CLOCK_OFFSET_MS_MAX;
        // The replica answered 1 s before the body's hiding time, by its
        // clock; this router's clock plays no part.
        let received = Instant::now();
        let at = hide_at(&e, received, expire_at - margin - 1_000).expect("a timer");
        assert_eq!(at, received + Duration::from_secs(1));
        let early = as_handed_on(e.clone(), Some(at), at - Duration::from_millis(1));
        assert!(early.change.unwrap().message.is_some());
        let late = as_handed_on(e.clone(), Some(at), at);
        let change = late.change.unwrap();
        assert!(change.message.is_none(), "the body is left out");
        assert_eq!(change.pts, 1, "the change still goes");
        // Messages without a timer are left as they are.
        assert_eq!(hide_at(&event(2, 10), received, u64::MAX), None);
        // One to self-destruct 60 s after it is read, not read yet: it may be
        // read the moment the replica answered, so its body goes for 60 s
        // (less the clock margin), whenever it is read.
        use crate::api::pb::self_destruct_policy::Policy;
        let with_policy = |policy: Policy| {
            let mut e = event(3, 10);
            let message = e.change.as_mut().unwrap().message.as_mut().unwrap();
            message.self_destruct = Some(crate::api::pb::SelfDestructPolicy {
                policy: Some(policy),
            });
            e
        };
        let unread = with_policy(Policy::AfterReadSecs(60));
        let at = hide_at(&unread, received, 1_000_000).expect("a timer");
        assert_eq!(at, received + Duration::from_millis(60_000 - margin));
        let handed_on = as_handed_on(unread, Some(at), at);
        assert!(handed_on.change.unwrap().message.is_none());
        // Sent to self-destruct after sending, with no expiry given: none.
        let timed = with_policy(Policy::AfterSendSecs(60));
        assert_eq!(hide_at(&timed, received, 1_000_000), None);
    }

    /// A shared poll hands each change after a stream's pts once, in pts
    /// order; keeps at most its byte bound (the newest change always); sends
    /// a stream behind what it keeps, behind a reset, or on a poll that
    /// stopped, back to polling for itself; and passes its refusal on only
    /// after the changes it kept.
    #[test]
    fn a_shared_poll_keeps_its_latest_changes_for_its_streams() {
        let now = Instant::now();
        let mut kept = Kept::after(10);
        assert!(matches!(kept.next_after(10), Next::Wait));
        assert!(matches!(kept.next_after(12), Next::Wait), "ahead: waits");
        assert!(matches!(kept.next_after(9), Next::Behind));
        for pts in 11..=13 {
            kept.push(event(pts, 10), None, now);
        }
        let sent = |next: Next| match next {
            Next::Send(change) => change.event.pts,
            other => panic!("a change to send, not {other:?}"),
        };
        assert_eq!(sent(kept.next_after(10)), 11);
        assert_eq!(sent(kept.next_after(11)), 12);
        assert_eq!(sent(kept.next_after(12)), 13);
        assert!(matches!(kept.next_after(13), Next::Wait));
        // Past its byte bound it lets go of the oldest: a stream still
        // there is behind.
        let big = FEED_KEPT_BYTES / 2 - KEPT_OVERHEAD_BYTES - 100;
        kept.push(event(14, big), None, now);
        kept.push(event(15, big), None, now);
        assert!(kept.bytes <= FEED_KEPT_BYTES);
        assert_eq!(kept.after, 13, "14 and 15 fit, with nothing else");
        assert!(matches!(kept.next_after(12), Next::Behind));
        assert_eq!(sent(kept.next_after(13)), 14);
        assert_eq!(sent(kept.next_after(14)), 15);
        // Many small changes are bounded by what holding them costs.
        for pts in 16..1_000 {
            kept.push(event(pts, 0), None, now);
        }
        assert!(kept.bytes <= FEED_KEPT_BYTES);
        assert!(kept.changes.len() < FEED_KEPT_BYTES / KEPT_OVERHEAD_BYTES);
        // The newest change stays, however large.
        kept.push(event(1_000, FEED_KEPT_BYTES * 2), None, now);
        assert_eq!(kept.changes.len(), 1);
        assert_eq!(sent(kept.next_after(999)), 1_000);
        // A reset drops everything before it.
        let reset = WatchEvent {
            chat_id: 1,
            pts: 1_040,
            reset_required: true,
            ..Default::default()
        };
        kept.push(reset, None, now);
        assert!(matches!(kept.next_after(1_000), Next::Behind));
        assert!(matches!(kept.next_after(1_040), Next::Wait));
        kept.push(event(1_041, 10), None, now);
        // A refusal comes after the changes kept before it.
        kept.end = Some(End::Refused(tonic::Status::internal("refused")));
        assert_eq!(sent(kept.next_after(1_040)), 1_041);
        assert!(matches!(kept.next_after(1_041), Next::Ended(_)));
        // A poll that stopped otherwise sends its streams back to their own
        // polls, after what it kept.
        kept.end = Some(End::Stopped);
        assert_eq!(sent(kept.next_after(1_040)), 1_041);
        assert!(matches!(kept.next_after(1_041), Next::Behind));
    }

    /// A stream joins a shared poll only where the changes it would take
    /// from it are fresh, at or past what it keeps, and while it polls.
    #[test]
    fn a_stream_joins_a_shared_poll_only_for_changes_fetched_lately() {
        let then = Instant::now();
        let mut kept = Kept::after(10);
        kept.push(event(11, 10), None, then);
        kept.push(event(12, 10), None, then + JOIN_AGE_MAX);
        let soon = then + JOIN_AGE_MAX;
        assert!(kept.joinable(10, soon));
        assert!(!kept.joinable(9, soon), "before what it keeps");
        let later = then + JOIN_AGE_MAX + Duration::from_millis(1);
        assert!(
            !kept.joinable(10, later),
            "change 11 was fetched too long ago"
        );
        assert!(kept.joinable(11, later), "change 12 is fresh");
        assert!(
            kept.joinable(12, later + JOIN_AGE_MAX * 100),
            "nothing to take"
        );
        kept.end = Some(End::Stopped);
        assert!(!kept.joinable(12, later), "no longer polls");
    }

    /// A stream holds at most its byte bound of events its client has not
    /// read: the next send waits until the client reads one.
    #[tokio::test]
    async fn a_stream_its_client_does_not_read_holds_a_bounded_number_of_bytes() {
        let (tx, events) = event_stream();
        let mut events = Box::pin(events);
        let big = STREAM_BYTES_MAX / 2 - 1024;
        tx.send(event(1, big), None).await.unwrap();
        tx.send(event(2, big), None).await.unwrap();
        let third =
            tokio::time::timeout(Duration::from_millis(200), tx.send(event(3, big), None)).await;
        assert!(third.is_err(), "a third half-bound event waits for room");
        let first = events.next().await.unwrap().unwrap();
        assert_eq!(first.pts, 1);
        tokio::time::timeout(Duration::from_secs(5), tx.send(event(3, big), None))
            .await
            .expect("room once the client read one")
            .unwrap();
        // An event over the whole bound still goes, alone.
        assert_eq!(events.next().await.unwrap().unwrap().pts, 2);
        assert_eq!(events.next().await.unwrap().unwrap().pts, 3);
        tx.send(event(4, STREAM_BYTES_MAX * 2), None).await.unwrap();
        assert_eq!(events.next().await.unwrap().unwrap().pts, 4);
        // The error that ends a stream needs no room.
        tx.send(event(5, big), None).await.unwrap();
        tx.send(event(6, big), None).await.unwrap();
        tx.end_with(tonic::Status::unavailable("stopping"));
        drop(tx);
        let rest: Vec<Event> = events.collect().await;
        assert_eq!(rest.len(), 3);
        assert!(rest[2].is_err());
    }
}
