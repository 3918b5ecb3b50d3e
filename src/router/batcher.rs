//! Write coalescing: concurrent writes to one shard go to its leader
//! together, as one node call that the leader proposes as one Raft entry.
//!
//! Each shard has a queue and a task. The task keeps at most
//! [`IN_FLIGHT_PER_SHARD`] node calls in flight; writes that arrive
//! meanwhile wait in the queue and leave together in the next call (up to
//! the node's limits on commands and bytes per call). Under light load a
//! write leaves at once, alone; under heavy load calls carry many writes, so
//! the cost per Raft entry and per RPC is shared. Every command keeps its
//! own result; a retried call carries the same commands (less those of
//! callers that have gone), so sends stay deduplicated by their
//! client_msg_id. A group of commands (the sends of one `SendBatch` to one
//! shard) stays together and in order in one call.
//!
//! A write whose caller has gone (it timed out or hung up) is not sent: not
//! when the node call that carries it is retried, nor by a try still queued
//! in the router's stream to the node (waiting for a connection, or behind
//! earlier batches). One already handed to HTTP/2 may still go: it may wait
//! there for flow-control room, and it is not taken back. A write
//! that waited in the queue for [`WRITE_DEADLINE`] is answered UNAVAILABLE,
//! not sent: while a shard cannot commit, its queue does not fill with
//! writes that nobody waits for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::api::mux::{was_not_wanted, Wanted};
use crate::api::pb::node::{WriteReply, WriteRequest};
use crate::api::pb::replicated::{Command, CommandResult};
use crate::router::token::ShardPosition;
use crate::router::{Inner, Router, WRITE_DEADLINE};
use crate::types::ShardId;

/// Node calls one shard's queue keeps in flight.
pub const IN_FLIGHT_PER_SHARD: usize = 2;
/// Writes waiting in one shard's queue before new ones are refused.
const QUEUE_MAX: usize = 16_384;
/// Encoded command bytes of the writes one router holds (queued or in a
/// node call) before new ones are refused: while shards cannot commit,
/// their queues hold at most this much, whatever the bodies' sizes.
const QUEUED_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Most commands in one node call (the node's limit).
const COMMANDS_PER_CALL_MAX: usize = crate::node::api::WRITE_COMMANDS_MAX;
/// Most encoded command bytes in one node call (the node's limit).
const BYTES_PER_CALL_MAX: usize = crate::shard::BATCH_BYTES_MAX;

/// What a write that no leader answered in time may have done: a call may
/// have reached a leader that committed it before the answer was lost.
const WRITE_OUTCOME_UNKNOWN: &str = "the write may or may not have been applied: send it again unchanged (a repeated send, delete or MarkRead changes nothing more, and so does an edit with the same client_edit_id)";

/// A group's results (one per command, in order) and the entry's position.
pub type GroupResult = Result<(Vec<CommandResult>, ShardPosition), Status>;

struct Pending {
    commands: Vec<Command>,
    bytes: usize,
    reply: oneshot::Sender<GroupResult>,
    /// Alive while its caller waits: unlike `reply`, it can be looked at
    /// from the node call's stream as the call leaves.
    caller: Weak<()>,
    queued_at: Instant,
    /// Its share of [`QUEUED_BYTES_MAX`], given back when it is answered.
    held: OwnedSemaphorePermit,
}

/// `p` if it is still to be sent: None if its caller has gone, or if it
/// waited longer than `wait_max` (answered here: not sent, safe to retry).
fn still_wanted(p: Pending, wait_max: Duration) -> Option<Pending> {
    if p.reply.is_closed() {
        return None;
    }
    if p.queued_at.elapsed() >= wait_max {
        let _ = p.reply.send(Err(Status::unavailable(format!(
            "waited {wait_max:?} at this router behind earlier writes to the shard; not sent, safe to retry"
        ))));
        return None;
    }
    Some(p)
}

/// Most commands and encoded bytes one group may hold: what fits in one
/// node call.
pub fn group_fits(commands: usize, bytes: usize) -> bool {
    commands <= COMMANDS_PER_CALL_MAX && bytes <= BYTES_PER_CALL_MAX
}

/// The write queues of one router, one per shard written to, and the bytes
/// they may hold.
pub struct Queues {
    by_shard: Mutex<HashMap<u64, mpsc::Sender<Pending>>>,
    bytes: Arc<Semaphore>,
}

impl Default for Queues {
    fn default() -> Queues {
        Queues {
            by_shard: Default::default(),
            bytes: Arc::new(Semaphore::new(QUEUED_BYTES_MAX)),
        }
    }
}

/// Takes `bytes` of `budget` for a write, or refuses it (not sent).
fn reserve(budget: &Arc<Semaphore>, bytes: usize) -> Result<OwnedSemaphorePermit, Status> {
    let n = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
    budget.clone().try_acquire_many_owned(n).map_err(|_| {
        Status::resource_exhausted(format!(
            "{} MiB of writes are waiting at this router; not sent, retry later",
            QUEUED_BYTES_MAX >> 20
        ))
    })
}

impl Router {
    /// Queues `command` for `shard` and waits for its result and the
    /// position of the entry that carried it.
    pub(crate) async fn write_queued(
        &self,
        shard: ShardId,
        command: Command,
    ) -> Result<(CommandResult, ShardPosition), Status> {
        let (mut results, position) = self.write_group(shard, vec![command]).await?;
        let result = results
            .pop()
            .ok_or_else(|| Status::internal("node returned no result"))?;
        Ok((result, position))
    }

    /// Queues `commands` for `shard` as one group: they travel in one node
    /// call, in order, so they land in one Raft entry in this order. The
    /// group must fit one call ([`group_fits`]).
    pub async fn write_group(&self, shard: ShardId, commands: Vec<Command>) -> GroupResult {
        let bytes = commands.iter().map(crate::shard::sealing::stored_len).sum();
        if !group_fits(commands.len(), bytes) {
            return Err(Status::invalid_argument(format!(
                "{} commands of {bytes} bytes do not fit one call to a shard",
                commands.len()
            )));
        }
        let held = reserve(&self.inner.queues.bytes, bytes)?;
        let (tx, rx) = oneshot::channel();
        let caller = Arc::new(());
        let queue = self.queue(shard);
        queue
            .try_send(Pending {
                commands,
                bytes,
                reply: tx,
                caller: Arc::downgrade(&caller),
                queued_at: Instant::now(),
                held,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Status::resource_exhausted(format!(
                    "{shard}: {QUEUE_MAX} writes are queued at this router; retry later"
                )),
                mpsc::error::TrySendError::Closed(_) => {
                    Status::unavailable("the router is shutting down")
                }
            })?;
        let result = rx
            .await
            .unwrap_or_else(|_| Err(Status::unavailable("the router is shutting down")));
        drop(caller);
        result
    }

    fn queue(&self, shard: ShardId) -> mpsc::Sender<Pending> {
        let mut queues = self.inner.queues.by_shard.lock().expect("write queues");
        queues
            .entry(shard.0)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE_MAX);
                tokio::spawn(run(Arc::downgrade(&self.inner), shard, rx));
                tx
            })
            .clone()
    }
}

/// One shard's queue: takes everything waiting (within the call limits)
/// whenever a call slot is free.
async fn run(inner: Weak<Inner>, shard: ShardId, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT_PER_SHARD));
    let mut carry: Option<Pending> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = still_wanted(first, WRITE_DEADLINE) else {
            continue;
        };
        let mut bytes = first.bytes;
        let mut count = first.commands.len();
        let mut batch = vec![first];
        while count < COMMANDS_PER_CALL_MAX {
            match rx.try_recv() {
                Ok(next) => {
                    let Some(next) = still_wanted(next, WRITE_DEADLINE) else {
                        continue;
                    };
                    if !group_fits(count + next.commands.len(), bytes + next.bytes) {
                        carry = Some(next);
                        break;
                    }
                    bytes += next.bytes;
                    count += next.commands.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let router = Router { inner };
        tokio::spawn(async move {
            let _permit = permit;
            call(&router, shard, batch).await;
        });
    }
}

/// One node call with every command of `batch`; each waiter gets its own
/// result. A try carries only the groups whose callers still wait, and is
/// not sent if one of them goes while it is queued in the router's stream
/// to the node (waiting for a connection, or behind earlier batches): a
/// write its caller gave up on (told its outcome is unknown) is not sent,
/// to land after writes the client made since. (A try already at the node
/// runs on until the node's own timeout and may still commit.)
async fn call(router: &Router, shard: ShardId, batch: Vec<Pending>) {
    let mut groups = Vec::with_capacity(batch.len());
    let mut waiters = Vec::with_capacity(batch.len());
    let mut callers = Vec::with_capacity(batch.len());
    // Held until the call ends, when each waiter is answered.
    let mut _held = Vec::with_capacity(batch.len());
    for p in batch {
        groups.push(p.commands);
        waiters.push(p.reply);
        callers.push(p.caller);
        _held.push(p.held);
    }
    metrics::histogram!(crate::metrics::ROUTER_WRITE_BATCH)
        .record(groups.iter().map(Vec::len).sum::<usize>() as f64);
    let groups = Arc::new(Groups {
        commands: groups,
        callers,
    });
    let result = router
        .on_leader(
            shard,
            WRITE_DEADLINE,
            (WRITE_OUTCOME_UNKNOWN, true),
            |node, time| try_call(node, shard, groups.clone(), time),
        )
        .await;
    let groups = &groups.commands;
    let (reply, live) = match result {
        Ok((_, answer)) => answer,
        Err(s) => {
            for reply in waiters {
                let _ = reply.send(Err(s.clone()));
            }
            return;
        }
    };
    let position = ShardPosition {
        shard: shard.0,
        incarnation: reply.incarnation,
        index: reply.log_index,
        term: reply.log_term,
    };
    let sent: usize = groups
        .iter()
        .zip(&live)
        .filter(|(_, live)| **live)
        .map(|(g, _)| g.len())
        .sum();
    if reply.results.len() != sent {
        // The entry committed, whatever its results say.
        let s = Status::unavailable(format!(
            "node returned {} results for {sent} commands; {WRITE_OUTCOME_UNKNOWN}",
            reply.results.len()
        ));
        for reply in waiters {
            let _ = reply.send(Err(s.clone()));
        }
        return;
    }
    let mut results = reply.results.into_iter();
    for ((group, reply), live) in groups.iter().zip(waiters).zip(live) {
        // A caller left out of the call that succeeded had gone.
        if live {
            let mine: Vec<CommandResult> = results.by_ref().take(group.len()).collect();
            let _ = reply.send(Ok((mine, position)));
        }
    }
}

/// The groups of commands one write call carries, and their callers.
struct Groups {
    commands: Vec<Vec<Command>>,
    callers: Vec<Weak<()>>,
}

/// One try of a write call at `node`, within `time`: the commands of the
/// groups whose callers still wait, and which those were. Built again, at
/// once, each time a caller goes before the call leaves, so at most once
/// per group.
async fn try_call(
    node: crate::router::NodeEntry,
    shard: ShardId,
    groups: Arc<Groups>,
    time: Duration,
) -> Result<(WriteReply, Vec<bool>), Status> {
    let started = tokio::time::Instant::now();
    loop {
        let live: Vec<bool> = groups
            .callers
            .iter()
            .map(|c| c.strong_count() > 0)
            .collect();
        let request = WriteRequest {
            shard_id: shard.0,
            commands: carried(&groups.commands, &live),
        };
        if request.commands.is_empty() {
            return Err(Status::aborted("every caller of this write has gone"));
        }
        // The callers it carries; not the commands, which the request
        // holds already.
        let carried_for: Vec<Weak<()>> = groups
            .callers
            .iter()
            .zip(&live)
            .filter(|(_, live)| **live)
            .map(|(c, _)| c.clone())
            .collect();
        let wanted: Wanted = Arc::new(move || carried_for.iter().all(|c| c.strong_count() > 0));
        let left = time.saturating_sub(started.elapsed());
        match node.writes.call_while(request, left, wanted).await {
            Ok(reply) => return Ok((reply, live)),
            Err(s) if was_not_wanted(&s) => continue,
            Err(s) => return Err(s),
        }
    }
}

/// The commands of the groups whose callers still wait, in order.
fn carried(groups: &[Vec<Command>], live: &[bool]) -> Vec<Command> {
    groups
        .iter()
        .zip(live)
        .filter(|(_, live)| **live)
        .flat_map(|(g, _)| g.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(queued_at: Instant) -> (Pending, oneshot::Receiver<GroupResult>) {
        let (reply, rx) = oneshot::channel();
        let p = Pending {
            commands: Vec::new(),
            bytes: 0,
            reply,
            caller: Weak::new(),
            queued_at,
            held: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
        };
        (p, rx)
    }

    #[test]
    fn writes_nobody_waits_for_are_not_sent() {
        let wait_max = Duration::from_secs(10);
        let (fresh, _rx) = pending(Instant::now());
        assert!(still_wanted(fresh, wait_max).is_some());
        let (gone, rx) = pending(Instant::now());
        drop(rx);
        assert!(still_wanted(gone, wait_max).is_none());
        let (stale, mut rx) = pending(Instant::now() - wait_max);
        assert!(still_wanted(stale, wait_max).is_none());
        let answer = rx.try_recv().expect("a stale write is answered");
        let status = answer.expect_err("as an error");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("not sent"), "{status}");
    }

    #[test]
    fn writes_past_the_byte_budget_are_refused_until_others_are_answered() {
        let budget = Arc::new(Semaphore::new(100));
        let first = reserve(&budget, 60).expect("fits");
        let refused = reserve(&budget, 60).expect_err("over the budget");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("not sent"), "{refused}");
        let small = reserve(&budget, 40).expect("what is left fits");
        drop(first);
        assert!(reserve(&budget, 60).is_ok(), "freed when answered");
        // A write counts at least one byte, and one larger than the budget
        // is refused rather than waited for.
        drop(small);
        assert!(reserve(&budget, 0).is_ok());
        assert!(reserve(&budget, 101).is_err());
    }
}
