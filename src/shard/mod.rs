//! One shard: an openraft group whose log and state machine live in the
//! node's sled Db.
//!
//! ```text
//!  node API ── propose(cmds) ──▶ Proposer task ── one entry per batch ──▶ Raft (openraft)
//!                                  (queues while ≤ N entries are in flight)   │
//!                                                                    LogStore │ StateMachine
//!  node API ── read ──▶ barrier (read-index / applied ≥ token) ──▶ reads (sled tree)
//! ```

pub mod append_stream;
pub mod apply;
pub mod chat_cache;
pub mod log_store;
pub mod memtable;
pub mod network;
pub mod reads;
pub mod sealing;
pub mod snapshot;
pub mod state_machine;
pub mod types;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::Instant as _;
use openraft::{Config, ReadPolicy, ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::api::pb::replicated::{Command, CommandResult};
use crate::cluster::RaftTiming;
use crate::shard::log_store::LogStore;
use crate::shard::memtable::Memtable;
use crate::shard::network::{NetworkFactory, Peers};
use crate::shard::reads::StateReader;
use crate::shard::state_machine::StateMachine;
use crate::shard::types::{NodeAddr, Proposal, Raft, TypeConfig};
use crate::storage::Storage;
use crate::types::{now_ms, NodeId, ShardId};

/// Commands waiting for a proposal slot, per shard.
const PROPOSAL_QUEUE_MAX: usize = 16_384;
/// Entries one shard leader keeps in flight; further commands queue and are
/// batched into the next entry.
const PROPOSALS_IN_FLIGHT_MAX: usize = 4;
/// Most commands in one log entry.
pub const BATCH_COMMANDS_MAX: usize = 2_048;
/// Most encoded command bytes in one log entry; below
/// [`crate::storage::ENTRY_BYTES_MAX`] with room for the envelope.
pub const BATCH_BYTES_MAX: usize = 96 * 1024;
/// How close to its end a leader lease counts as lapsed: a write then
/// waits for a renewal rather than racing openraft's own check.
const LEASE_MARGIN: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{shard} is led by another node")]
    NotLeader {
        shard: ShardId,
        leader: Option<(NodeId, NodeAddr)>,
    },
    #[error("{shard} is unavailable: {reason}")]
    Unavailable { shard: ShardId, reason: String },
    #[error("{shard} is overloaded: {reason}")]
    Overloaded { shard: ShardId, reason: String },
    #[error("{0}")]
    InvalidArgument(String),
    /// A replica waited for an index it has not applied yet.
    #[error("{shard}: replica has applied {applied} < {wanted} after waiting {waited_ms} ms")]
    Behind {
        shard: ShardId,
        applied: u64,
        wanted: u64,
        waited_ms: u64,
    },
}

/// The outcome of a committed and applied write.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub results: Vec<CommandResult>,
    pub log_index: u64,
    pub log_term: u64,
}

type ProposalReply = oneshot::Sender<Result<WriteOutcome, Error>>;

/// One caller's commands waiting for a proposal, with their encoded size
/// (computed once, when the caller's limit is checked).
struct PendingWrite {
    commands: Vec<Command>,
    bytes: usize,
    reply: ProposalReply,
}

pub struct Shard {
    pub id: ShardId,
    pub raft: Raft,
    pub reader: StateReader,
    /// Where the shard's data lives, for the node's eraser.
    pub files: ShardFiles,
    proposals: mpsc::Sender<PendingWrite>,
    quiet: Quiet,
    /// How long a woken leader waits to renew its lease before proposing.
    wake_wait: Duration,
    /// openraft's leader lease: its `election_timeout_max`.
    lease: Duration,
    /// Set by the chores while this node's clock is off and another voter
    /// could lead: client writes are refused.
    writes_refused: std::sync::atomic::AtomicBool,
    /// The last leadership hand-over this replica started as leader.
    transfer: std::sync::Mutex<Option<Transfer>>,
    /// A flush started by the chores is on its way.
    flush_queued: std::sync::atomic::AtomicBool,
    /// Closed once the state machine is dropped.
    state_machine_alive: tokio::sync::watch::Receiver<()>,
}

/// Longest a replica's shutdown waits for its memtable's flush.
const SHUTDOWN_FLUSH_WAIT: Duration = Duration::from_secs(5);

/// A leadership hand-over started by a leader: its term, the voter asked to
/// take over, and when.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub term: u64,
    pub to: u64,
    pub at: Instant,
}

/// Whether a replica's Raft timers are stopped (see `src/node/quiesce.rs`),
/// and when it last saw a write.
///
/// A proposal stores `last_write_ms` and then loads `quiet`; a leader going
/// quiet stores `quiet` and then loads `last_write_ms`; all four SeqCst. So
/// either the proposal sees the shard quiet and wakes it, or the leader
/// sees the write and stays awake: a write never lands on a leader whose
/// ticker stops under it.
#[derive(Default)]
struct Quiet {
    /// Read without a lock on every proposal and Raft message.
    quiet: std::sync::atomic::AtomicBool,
    /// Held across a change of state so that the flag and openraft's
    /// ticker never disagree.
    changing: std::sync::Mutex<()>,
    last_write_ms: std::sync::atomic::AtomicU64,
    /// When the timers last restarted: proposals soon after that check
    /// the lease, which a quiet leader lets lapse.
    woke_ms: std::sync::atomic::AtomicU64,
    /// Held by the one caller renewing a woken leader's lease; the others
    /// wait for that renewal instead of proposing on a lapsed lease.
    renewing: tokio::sync::Mutex<()>,
    /// Renewals finished so far: a caller that waited out someone else's
    /// renewal goes on with its result rather than trying its own.
    renewals: std::sync::atomic::AtomicU64,
}

/// A shard's Raft log, state-machine tree (and the writes its memtable
/// holds for it) and snapshot folder.
#[derive(Clone)]
pub struct ShardFiles {
    pub log: LogStore,
    pub state: sled::Tree,
    pub pending: Arc<Memtable>,
    pub snapshot_dir: std::path::PathBuf,
}

/// The election timeout band of the replica at `rank` (0-based) in its
/// shard's failover order. With `q = (max - min) / 4`, rank 0 draws from
/// `[min, min + q)` and rank 1 from `[min + q, min + 2q)`; rank 2 and later
/// wait longer, from `[max + 2q(r - 2), max + 2q(r - 1))`.
///
/// A vote takes a round trip between regions, so randomised timeouts that
/// overlap split votes often across a WAN. openraft also starts an election
/// only after its leader lease (its own `election_timeout_max`) plus its
/// timeout, and a voter refuses until its own lease has passed. With these
/// bands the next replica in line campaigns once every other voter's lease
/// has passed, and the one after it only once that campaign (two round
/// trips) has had time to finish: no split vote, and the nearest region
/// takes over.
pub fn election_band(t: &RaftTiming, rank: usize) -> (u64, u64) {
    let (min, max) = (t.election_timeout_ms_min, t.election_timeout_ms_max);
    let q = ((max - min) / 4).max(1);
    let (lo, hi) = match rank as u64 {
        0 => (min, min + q),
        1 => (min + q, min + 2 * q),
        r => (max + 2 * q * (r - 2), max + 2 * q * (r - 1)),
    };
    (lo, hi.max(lo + 1))
}

/// openraft configuration from the cluster's Raft timing, for a replica
/// whose election timeout is drawn from `election` (see [`election_band`]).
pub fn raft_config(
    cluster_name: &str,
    t: &RaftTiming,
    election: (u64, u64),
) -> anyhow::Result<Arc<Config>> {
    let config = Config {
        cluster_name: cluster_name.to_string(),
        heartbeat_interval: t.heartbeat_ms,
        election_timeout_min: election.0,
        election_timeout_max: election.1,
        install_snapshot_timeout: t.install_snapshot_timeout_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_every_entries),
        max_in_snapshot_log_to_keep: t.logs_kept_behind_snapshot,
        replication_lag_threshold: t.snapshot_every_entries * 2,
        max_payload_entries: 512,
        enable_pre_vote: Some(true),
        // Restoring leadership without an election needs both a synced state
        // machine and a synced committed pointer; ours syncs neither on
        // apply, so a restarted leader must win an election.
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    Ok(Arc::new(config.validate()?))
}

impl Shard {
    pub async fn open(
        storage: &Storage,
        peers: Peers,
        id: ShardId,
        config: Arc<Config>,
    ) -> anyhow::Result<Shard> {
        let log = LogStore::open(storage, id).await?;
        let sm = StateMachine::open(storage, id)?;
        let state_machine_alive = sm.alive();
        let reader = StateReader::new(sm.view(), storage.keys().clone(), sm.chat_cache())
            .watching(sm.loads());
        let files = ShardFiles {
            log: log.clone(),
            state: sm.tree().clone(),
            pending: sm.memtable(),
            snapshot_dir: storage.snapshot_dir(id),
        };
        let network = NetworkFactory {
            shard: id,
            peers: peers.clone(),
            rpc_timeout_min: Duration::from_millis(config.election_timeout_min),
        };
        let wake_wait = Duration::from_millis(config.election_timeout_max * 2);
        let lease = Duration::from_millis(config.election_timeout_max);
        let raft = Raft::new(peers.self_id().0, config, network, log, sm).await?;
        let (tx, rx) = mpsc::channel(PROPOSAL_QUEUE_MAX);
        tokio::spawn(run_proposer(id, raft.clone(), rx));
        let quiet = Quiet::default();
        quiet
            .last_write_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        Ok(Shard {
            id,
            raft,
            reader,
            files,
            proposals: tx,
            quiet,
            wake_wait,
            lease,
            writes_refused: Default::default(),
            transfer: Default::default(),
            flush_queued: Default::default(),
            state_machine_alive,
        })
    }

    /// Waits (at most `wait`) until openraft's state-machine worker has let
    /// go of this replica's state machine after [`Shard::shutdown`]: a
    /// command it had begun (a snapshot load) may still be writing to the
    /// tree. False if it still holds it.
    pub async fn state_machine_stopped(&self, wait: Duration) -> bool {
        let mut alive = self.state_machine_alive.clone();
        let gone = async move { while alive.changed().await.is_ok() {} };
        tokio::time::timeout(wait, gone).await.is_ok()
    }

    /// Refuses client writes (true) or takes them again.
    pub fn refuse_writes(&self, refuse: bool) {
        self.writes_refused.store(refuse, SeqCst);
    }

    pub fn refuses_writes(&self) -> bool {
        self.writes_refused
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True while this replica's Raft timers are stopped.
    pub fn is_quiet(&self) -> bool {
        self.quiet.quiet.load(SeqCst)
    }

    /// How long since this replica last proposed or was asked to.
    pub fn idle_for(&self) -> Duration {
        let last = self.quiet.last_write_ms.load(SeqCst);
        Duration::from_millis(now_ms().saturating_sub(last))
    }

    /// Notes a write now; returns the time it noted.
    fn touch(&self) -> u64 {
        let now = now_ms();
        self.quiet.last_write_ms.store(now, SeqCst);
        now
    }

    /// Stops this replica's Raft timers.
    pub fn quiesce(&self) {
        let _changing = self.quiet.changing.lock().expect("quiet state");
        if !self.is_quiet() {
            self.quiet.quiet.store(true, SeqCst);
            self.stop_ticking();
        }
    }

    /// On a leader: stops its Raft timers unless it saw a write within
    /// `after`, checked after the quiet flag is set (see [`Quiet`]); true if
    /// it is quiet now.
    pub fn quiesce_if_idle(&self, after: Duration) -> bool {
        let _changing = self.quiet.changing.lock().expect("quiet state");
        if self.is_quiet() {
            return true;
        }
        self.quiet.quiet.store(true, SeqCst);
        if self.idle_for() < after {
            self.quiet.quiet.store(false, SeqCst);
            return false;
        }
        self.stop_ticking();
        true
    }

    /// The rest of going quiet, once the flag is set, under `changing`.
    fn stop_ticking(&self) {
        self.raft.runtime_config().tick(false);
        metrics::gauge!(crate::metrics::SHARD_QUIET).increment(1.0);
        self.reader.forget_cached_messages();
    }

    /// Restarts this replica's Raft timers; true if they were stopped.
    pub fn wake(&self) -> bool {
        let _changing = self.quiet.changing.lock().expect("quiet state");
        if self.is_quiet() {
            self.quiet.woke_ms.store(now_ms(), SeqCst);
            self.quiet.quiet.store(false, SeqCst);
            self.raft.runtime_config().tick(true);
            metrics::gauge!(crate::metrics::SHARD_QUIET).decrement(1.0);
            true
        } else {
            false
        }
    }

    /// True if this replica's timers restarted within the longest a lease
    /// renewal may take.
    fn recently_woken(&self, now: u64) -> bool {
        let woke = self.quiet.woke_ms.load(SeqCst);
        now.saturating_sub(woke) < self.wake_wait.as_millis() as u64
    }

    /// True if this replica leads and openraft would refuse a write for a
    /// lapsed lease, or soon would (within [`LEASE_MARGIN`]). A sole voter's
    /// lease never lapses (no follower ever acknowledges it).
    fn lease_lapsed(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let sole_voter = m.membership_config.membership().voter_ids().count() == 1;
        m.state == ServerState::Leader
            && !sole_voter
            && m.last_quorum_acked
                .as_ref()
                .is_none_or(|acked| acked.elapsed() + LEASE_MARGIN >= self.lease)
    }

    /// On a leader: wakes it if quiet, counts as activity, and waits (boundedly) until
    /// a quorum has answered a heartbeat if the lease lapsed while it was
    /// quiet: openraft refuses writes until the lease is renewed. This is
    /// the round trip a write to a quiet shard pays. Concurrent callers
    /// share one renewal.
    pub async fn wake_leader(&self) {
        // A quiet follower stays quiet: with its timers running and its
        // leader quiet it would time out and start an election. The caller
        // is then told where the leader is.
        if !self.is_leader() {
            return;
        }
        self.touch();
        self.wake();
        if !self.lease_lapsed() {
            return;
        }
        let tried = self.quiet.renewals.load(SeqCst);
        let _renewing = self.quiet.renewing.lock().await;
        if self.quiet.renewals.load(SeqCst) != tried || !self.lease_lapsed() {
            return;
        }
        let before = self.raft.metrics().borrow_watched().last_quorum_acked;
        if self.raft.trigger().heartbeat().await.is_ok() {
            let _ = self
                .raft
                .wait(Some(self.wake_wait))
                .metrics(
                    |m| m.state != ServerState::Leader || m.last_quorum_acked > before,
                    "lease renewed",
                )
                .await;
        }
        // Whoever waited meanwhile goes on with this renewal's result.
        self.quiet.renewals.fetch_add(1, SeqCst);
    }

    /// On a follower asked by `leader` to quiesce: agrees, and stops its
    /// timers, only if it follows `leader` at `term` and holds exactly the
    /// leader's log, all applied.
    pub fn quiesce_follower(&self, leader: u64, term: u64, last_index: u64) -> bool {
        let m = self.raft.metrics().borrow_watched().clone();
        let agrees = m.state == ServerState::Follower
            && m.current_leader == Some(leader)
            && m.current_term == term
            && m.last_log_index == Some(last_index)
            && m.last_applied.map(|l| l.index) == Some(last_index);
        if agrees {
            self.quiesce();
        }
        agrees
    }

    /// Proposes `commands` as part of one log entry and waits until the entry
    /// is committed and applied.
    pub async fn propose(&self, commands: Vec<Command>) -> Result<WriteOutcome, Error> {
        let now = self.touch();
        if self.is_quiet() || self.recently_woken(now) {
            self.wake_leader().await;
        }
        let bytes: usize = commands.iter().map(sealing::stored_len).sum();
        if bytes > BATCH_BYTES_MAX {
            return Err(Error::InvalidArgument(format!(
                "one write is {bytes} bytes of commands; the limit is {BATCH_BYTES_MAX}"
            )));
        }
        let (tx, rx) = oneshot::channel();
        self.proposals
            .try_send(PendingWrite {
                commands,
                bytes,
                reply: tx,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => Error::Overloaded {
                    shard: self.id,
                    reason: format!("{PROPOSAL_QUEUE_MAX} writes are queued"),
                },
                mpsc::error::TrySendError::Closed(_) => Error::Unavailable {
                    shard: self.id,
                    reason: "shard is shutting down".into(),
                },
            })?;
        rx.await.unwrap_or_else(|_| {
            Err(Error::Unavailable {
                shard: self.id,
                reason: "proposal dropped".into(),
            })
        })
    }

    /// The leader as this replica knows it.
    pub fn leader(&self) -> Option<(NodeId, NodeAddr)> {
        let m = self.raft.metrics().borrow_watched().clone();
        let leader = m.current_leader?;
        let node = m
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned()?;
        Some((NodeId(leader), node))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// Asks `to` to take over as leader (openraft tells every voter, and
    /// takes no writes meanwhile), and notes the hand-over.
    pub async fn transfer_leader(&self, to: u64) -> Result<(), openraft::error::Fatal<TypeConfig>> {
        let term = self.raft.metrics().borrow_watched().current_term;
        *self.transfer.lock().expect("transfer note") = Some(Transfer {
            term,
            to,
            at: Instant::now(),
        });
        self.raft.trigger().transfer_leader(to).await
    }

    /// A hand-over this replica started that has not happened: it still
    /// leads in the term it asked in. openraft's leader sends no heartbeat
    /// while it hands over, and followers of a quiet shard run no timers,
    /// so if every voter missed the request nobody would ever elect.
    pub fn transfer_pending(&self) -> Option<Transfer> {
        let (state, term) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (m.state, m.current_term)
        };
        let noted = *self.transfer.lock().expect("transfer note");
        noted.filter(|t| state == ServerState::Leader && t.term == term)
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader {
            shard: self.id,
            leader: self.leader(),
        }
    }

    /// Waits until this replica may serve a LINEARIZABLE read (read-index
    /// through the leader's quorum, then applied up to it).
    pub async fn linearizable_barrier(&self) -> Result<u64, Error> {
        if self.is_quiet() || self.recently_woken(now_ms()) {
            self.wake_leader().await;
        }
        match self.raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
            Ok(read_log_id) => Ok(read_log_id.log_id().index),
            Err(e) => {
                if e.forward_to_leader().is_some() {
                    Err(self.not_leader())
                } else {
                    Err(Error::Unavailable {
                        shard: self.id,
                        reason: e.to_string(),
                    })
                }
            }
        }
    }

    /// Waits up to `wait` until this replica has applied `index`.
    pub async fn wait_applied(&self, index: u64, wait: Duration) -> Result<u64, Error> {
        let applied = self.applied_index();
        if applied >= index {
            return Ok(applied);
        }
        match self
            .raft
            .wait(Some(wait))
            .applied_index_at_least(Some(index), "session read")
            .await
        {
            Ok(m) => Ok(m.last_applied.map(|l| l.index).unwrap_or(0)),
            // Not behind: stopped. Said at once, so it must not read as
            // "behind after waiting" (a Watch would poll it in a tight loop).
            Err(openraft::metrics::WaitError::ShuttingDown) => Err(Error::Unavailable {
                shard: self.id,
                reason: "this replica's Raft has stopped".into(),
            }),
            Err(openraft::metrics::WaitError::Timeout(..)) => Err(Error::Behind {
                shard: self.id,
                applied: self.applied_index(),
                wanted: index,
                waited_ms: wait.as_millis() as u64,
            }),
        }
    }

    pub fn last_log_index(&self) -> u64 {
        self.raft
            .metrics()
            .borrow_watched()
            .last_log_index
            .unwrap_or(0)
    }

    pub fn applied_index(&self) -> u64 {
        self.raft
            .metrics()
            .borrow_watched()
            .last_applied
            .as_ref()
            .map(|l| l.index)
            .unwrap_or(0)
    }

    /// From the node's chores: flushes the replica's memtable if it is due
    /// (only an apply call checks otherwise, so a replica that took writes
    /// and then stopped applying would keep them), on the state machine's
    /// task, in a task of its own. Not while one started here is still on
    /// its way (a state machine busy with a snapshot would gather a request
    /// per tick), nor once the replica's Raft has stopped.
    pub fn flush_state_if_due(self: &Arc<Shard>) {
        if !self.files.pending.flush_due()
            || self.raft.metrics().borrow_watched().running_state.is_err()
            || self.flush_queued.swap(true, SeqCst)
        {
            return;
        }
        let shard = self.clone();
        tokio::spawn(async move {
            shard.flush_state(false).await;
            shard.flush_queued.store(false, SeqCst);
        });
    }

    /// Flushes the replica's memtable to sled, on the state machine's task
    /// (the memtable's only writer), if it is due or `always`.
    pub async fn flush_state(&self, always: bool) {
        let flushed = self
            .raft
            .with_state_machine(move |sm: &mut StateMachine| {
                Box::pin(async move {
                    match always || sm.memtable().flush_due() {
                        true => crate::storage::blocking(|| sm.flush()),
                        false => Ok(()),
                    }
                })
            })
            .await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(shard = %self.id, error = %e, "flush the memtable"),
            Err(e) => tracing::debug!(shard = %self.id, error = %e, "flush the memtable: stopped"),
        }
    }

    pub async fn shutdown(&self) {
        // Long polls answer now, not when their wait runs out.
        self.reader.stop_waiters();
        if self.is_quiet() {
            metrics::gauge!(crate::metrics::SHARD_QUIET).decrement(1.0);
        }
        // Best effort, not needed for safety (the log applies it again): a
        // restart then replays less. Bounded, since it waits behind whatever
        // the state machine is doing (a snapshot install), and entries
        // queued behind it may still be applied after it.
        if tokio::time::timeout(SHUTDOWN_FLUSH_WAIT, self.flush_state(true))
            .await
            .is_err()
        {
            tracing::warn!(shard = %self.id, "memtable flush at shutdown: gave up waiting");
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(shard = %self.id, error = %e, "raft shutdown");
        }
    }
}

/// Batches queued writes into log entries: waits for a free in-flight slot,
/// then takes everything queued (up to the entry limits) as one proposal.
/// A write whose caller has gone (its call timed out: the caller reported
/// the outcome as unknown and may have sent it again) is not proposed, so
/// an overloaded leader does not spend its log on writes nobody waits for.
async fn run_proposer(shard: ShardId, raft: Raft, mut rx: mpsc::Receiver<PendingWrite>) {
    let slots = Arc::new(Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
    let mut carry: Option<PendingWrite> = None;
    loop {
        let first = match carry.take() {
            Some(f) => f,
            None => match rx.recv().await {
                Some(f) => f,
                None => return,
            },
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        if first.reply.is_closed() {
            continue;
        }
        let mut bytes = first.bytes;
        let mut count = first.commands.len();
        let mut waiters = vec![first];
        while count < BATCH_COMMANDS_MAX {
            match rx.try_recv() {
                Ok(next) if next.reply.is_closed() => continue,
                Ok(next) => {
                    if bytes + next.bytes > BATCH_BYTES_MAX
                        || count + next.commands.len() > BATCH_COMMANDS_MAX
                    {
                        carry = Some(next);
                        break;
                    }
                    bytes += next.bytes;
                    count += next.commands.len();
                    waiters.push(next);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut commands = Vec::with_capacity(count);
            let mut spans = Vec::with_capacity(waiters.len());
            let mut replies = Vec::with_capacity(waiters.len());
            for w in waiters {
                spans.push(w.commands.len());
                commands.extend(w.commands);
                let reply = w.reply;
                replies.push(reply);
            }
            metrics::histogram!(crate::metrics::SHARD_PROPOSAL_COMMANDS)
                .record(commands.len() as f64);
            let started = Instant::now();
            let result = raft.client_write(Proposal::new(now_ms(), commands)).await;
            metrics::histogram!(crate::metrics::SHARD_PROPOSAL_SECONDS)
                .record(started.elapsed().as_secs_f64());
            match result {
                Ok(resp) => {
                    let mut results = resp.data.results.into_iter();
                    for (n, reply) in spans.into_iter().zip(replies) {
                        let mine: Vec<CommandResult> = results.by_ref().take(n).collect();
                        let _ = reply.send(Ok(WriteOutcome {
                            results: mine,
                            log_index: resp.log_id.index,
                            log_term: resp.log_id.leader_id.term,
                        }));
                    }
                }
                Err(e) => {
                    let err = match e.forward_to_leader() {
                        Some(f) => Error::NotLeader {
                            shard,
                            leader: match (f.leader_id, f.leader_node.clone()) {
                                (Some(id), Some(node)) => Some((NodeId(id), node)),
                                _ => None,
                            },
                        },
                        None => Error::Unavailable {
                            shard,
                            reason: e.to_string(),
                        },
                    };
                    for reply in replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        });
    }
}
