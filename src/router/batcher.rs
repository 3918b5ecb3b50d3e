//! Write coalescing: concurrent writes to one shard go to its leader
//! together, as one node call that the leader proposes as one Raft entry.
//!
//! Each shard has a queue and a task. The task keeps at most
//! [`IN_FLIGHT_PER_SHARD`] node calls in flight; writes that arrive
//! meanwhile wait in the queue and leave together in the next call (up to
//! the node's limits on commands and bytes per call). Under light load a
//! write leaves at once, alone; under heavy load calls carry many writes, so
//! the cost per Raft entry and per RPC is shared. Every command keeps its
//! own result; a retried call carries the same commands, so sends stay
//! deduplicated by their client_msg_id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::Status;

use crate::api::pb::node::WriteRequest;
use crate::api::pb::replicated::{Command, CommandResult};
use crate::router::token::ShardPosition;
use crate::router::{Inner, Router, NODE_CALL_TIMEOUT, WRITE_DEADLINE};
use crate::types::ShardId;

/// Node calls one shard's queue keeps in flight.
pub const IN_FLIGHT_PER_SHARD: usize = 2;
/// Writes waiting in one shard's queue before new ones are refused.
const QUEUE_MAX: usize = 16_384;
/// Most commands in one node call (the node's limit).
const COMMANDS_PER_CALL_MAX: usize = crate::node::api::WRITE_COMMANDS_MAX;
/// Most encoded command bytes in one node call (the node's limit).
const BYTES_PER_CALL_MAX: usize = crate::shard::BATCH_BYTES_MAX;

type Reply = oneshot::Sender<Result<(CommandResult, ShardPosition), Status>>;

struct Pending {
    command: Command,
    bytes: usize,
    reply: Reply,
}

/// The write queues of one router, one per shard written to.
#[derive(Default)]
pub struct Queues {
    by_shard: Mutex<HashMap<u64, mpsc::Sender<Pending>>>,
}

impl Router {
    /// Queues `command` for `shard` and waits for its result and the
    /// position of the entry that carried it.
    pub(crate) async fn write_queued(
        &self,
        shard: ShardId,
        command: Command,
    ) -> Result<(CommandResult, ShardPosition), Status> {
        let bytes = command.encoded_len();
        let (tx, rx) = oneshot::channel();
        let queue = self.queue(shard);
        queue
            .try_send(Pending {
                command,
                bytes,
                reply: tx,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Status::resource_exhausted(format!(
                    "{shard}: {QUEUE_MAX} writes are queued at this router; retry later"
                )),
                mpsc::error::TrySendError::Closed(_) => {
                    Status::unavailable("the router is shutting down")
                }
            })?;
        rx.await
            .unwrap_or_else(|_| Err(Status::unavailable("the router is shutting down")))
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
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < COMMANDS_PER_CALL_MAX {
            match rx.try_recv() {
                Ok(next) => {
                    if bytes + next.bytes > BYTES_PER_CALL_MAX {
                        carry = Some(next);
                        break;
                    }
                    bytes += next.bytes;
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
/// result.
async fn call(router: &Router, shard: ShardId, batch: Vec<Pending>) {
    metrics::histogram!(crate::metrics::ROUTER_WRITE_BATCH).record(batch.len() as f64);
    let commands: Vec<Command> = batch.iter().map(|p| p.command.clone()).collect();
    let result = router
        .on_leader(shard, WRITE_DEADLINE, |mut c| {
            let commands = commands.clone();
            async move {
                let mut req = tonic::Request::new(WriteRequest {
                    shard_id: shard.0,
                    commands,
                });
                req.set_timeout(NODE_CALL_TIMEOUT);
                c.write(req).await.map(|r| r.into_inner())
            }
        })
        .await;
    match result {
        Ok((_, reply)) => {
            let position = ShardPosition {
                shard: shard.0,
                incarnation: reply.incarnation,
                index: reply.log_index,
                term: reply.log_term,
            };
            if reply.results.len() != batch.len() {
                let s = Status::internal(format!(
                    "node returned {} results for {} commands",
                    reply.results.len(),
                    batch.len()
                ));
                for p in batch {
                    let _ = p.reply.send(Err(s.clone()));
                }
                return;
            }
            for (p, r) in batch.into_iter().zip(reply.results) {
                let _ = p.reply.send(Ok((r, position)));
            }
        }
        Err(s) => {
            for p in batch {
                let _ = p.reply.send(Err(s.clone()));
            }
        }
    }
}
