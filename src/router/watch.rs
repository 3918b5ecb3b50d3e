//! Watch: a server stream of changes to a set of chats, from given pts
//! cursors.
//!
//! Each watched chat has a task that long-polls a replica (nearest first):
//! "the difference after pts, once you have applied past index i". Every
//! change is sent once, in pts order, and the cursor advances only past what
//! was sent, so a replica restart, a leader change or a switch of replica
//! neither loses nor repeats an event. A client that reconnects (for example
//! after a router restart) passes the last pts it received and resumes
//! exactly there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use prost::Message;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::api::pb::node::{read_request::Query, DifferenceQuery};
use crate::api::pb::{Cursor, WatchEvent};
use crate::router::service::{WATCHED_CHATS_MAX, WATCH_STREAMS_MAX};
use crate::router::Router;
use crate::security::Role;
use crate::types::now_ms;

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
/// while it waits for room in it), past the overshoot of single messages
/// larger than a bound: with every stream and chat slot taken, 1.6 GiB
/// (1 MiB per stream and 256 KiB per chat before, 20 GiB in all). hyper's
/// HTTP/2 send buffer (up to 400 KiB a stream, within the windows the
/// client grants) comes on top; tonic does not let it be set.
pub const HELD_BYTES_MAX: usize = WATCH_STREAMS_MAX * (STREAM_BYTES_MAX + POLL_BYTES_MAX as usize)
    + WATCHED_CHATS_MAX * POLL_BYTES_MIN as usize;
const _: () = assert!(HELD_BYTES_MAX <= 1700 * 1024 * 1024);

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
/// with that error), or `stopping` turns true (the router stops).
pub async fn run(
    router: Router,
    cursors: Vec<Cursor>,
    tx: EventSender,
    auth: tonic::metadata::MetadataMap,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let poll_bytes = poll_bytes(cursors.len());
    for c in cursors {
        tasks.spawn(watch_chat(router.clone(), c, tx.clone(), poll_bytes));
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

/// Polls one chat's changes into `tx` until the client goes; returns the
/// refusal the Watch must end with if polls keep being refused.
async fn watch_chat(
    router: Router,
    cursor: Cursor,
    tx: EventSender,
    poll_bytes: u32,
) -> Option<tonic::Status> {
    let shard = router.shard_of(cursor.chat_id);
    let mut pts = cursor.pts;
    let mut after_index = 0u64;
    let mut replica = 0usize;
    let mut failures = 0u32;
    let mut refusals = 0u32;
    let mut stuck = 0u32;
    // Answers in a row from a replica far behind, and since when the
    // Watch is off the nearest replica.
    let mut placement = (0u32, None);
    loop {
        if tx.is_closed() {
            return None;
        }
        let query = Query::Difference(DifferenceQuery {
            chat_id: cursor.chat_id,
            pts,
            limit: POLL_CHANGES_MAX,
            bytes_max: poll_bytes,
            wait_for_change: true,
        });
        // First poll: answer now (min index 0); later: wait for news.
        let (used, result) = router
            .read_for_watch(shard, after_index, query, replica)
            .await;
        let reply = match result {
            Ok(r) => r,
            Err(status) => {
                // A replica that timed out waiting is fine; one that is down
                // or failing makes us move to the next.
                if !crate::api::status::is_behind(&status) {
                    refusals = match worth_retrying(&status) {
                        true => 0,
                        false => refusals + 1,
                    };
                    if refusals >= REFUSALS_TO_END {
                        // INTERNAL: the cluster's fault, not the caller's
                        // (a node's own code, such as FAILED_PRECONDITION,
                        // means something else on this API).
                        return Some(tonic::Status::internal(format!(
                            "watching chat {}: every replica refused it {REFUSALS_TO_END} times in a row: {:?}: {}",
                            cursor.chat_id,
                            status.code(),
                            status.message()
                        )));
                    }
                    replica = used + 1;
                    failures += 1;
                    let backoff = Duration::from_millis((50u64 << failures.min(4)).min(1000));
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                // The replica waited with no news. Usually the chat is
                // idle; but a replica that is up yet applies nothing (cut
                // off from its leader, or its disk failed) answers the same
                // way forever. If the leader had applied past what we wait
                // for, more than once, try the next replica.
                stuck = if router.leader_applied(shard) > after_index {
                    stuck + 1
                } else {
                    0
                };
                if stuck >= STUCK_POLLS {
                    replica = used + 1;
                    stuck = 0;
                }
                continue;
            }
        };
        failures = 0;
        refusals = 0;
        stuck = 0;
        let received = Instant::now();
        // Every entry up to here is in the answer. Not `applied_index`:
        // that may name an apply call still writing, whose change this
        // answer may lack.
        let complete = match reply.complete_through {
            0 => reply.applied_index,
            complete => complete,
        };
        // Where the replica stands against its leader says whether to stay.
        replica = next_replica(
            used,
            (complete, router.leader_applied(shard)),
            &mut placement,
            received,
        );
        let node_now = match reply.now_ms {
            0 => now_ms(),
            at => at,
        };
        let Some(diff) = reply.difference else {
            continue;
        };
        if diff.reset_required {
            let event = WatchEvent {
                change: None,
                reset_required: true,
                chat_id: cursor.chat_id,
                pts: diff.pts,
                served_by_node: reply.served_by_node,
            };
            if tx.send(event, None).await.is_err() {
                return None;
            }
            pts = diff.pts;
        }
        for change in diff.changes {
            if change.pts <= pts {
                continue;
            }
            pts = change.pts;
            let event = WatchEvent {
                chat_id: cursor.chat_id,
                pts: change.pts,
                change: Some(change),
                reset_required: false,
                served_by_node: reply.served_by_node,
            };
            let hide_at = hide_at(&event, received, node_now);
            if tx.send(event, hide_at).await.is_err() {
                return None;
            }
        }
        // With more changes pending, poll again at once from the same index.
        if !diff.more {
            after_index = complete;
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
