//! `chatctl bench-raft`: what openraft alone costs on this machine, the
//! floor under any write path built on it.
//!
//! The same openraft version, Raft settings and log entries as a shard, in
//! this one process, with every part around openraft as cheap as it can be:
//!
//! ```text
//!  G groups × 3 replicas (openraft::Raft, the shard's Config, snapshots off)
//!    log: entries in a BTreeMap, "durable" as soon as appended (no fsync);
//!         with --durable-log, chatstore's own Raft log per node, fsynced
//!    state machine: counts entries and answers each command with nothing
//!    network: a direct call of the target replica's Raft (no encoding)
//!  N workers: client_write(a Proposal of K 1 KiB sends) to a random group's leader
//! ```
//!
//! A chatstore send does all of that plus the gRPC hops (client to router,
//! router to leader, leader to followers), the Raft log's writes and
//! `fdatasync`, and the state machine's work. So a write rate this command
//! does not reach at K commands per entry, chatstore cannot reach with K
//! commands per entry either.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::io;
use std::ops::RangeBounds;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use openraft::async_runtime::WatchReceiver;
use openraft::error::{RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::{
    EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder,
    RaftStateMachine,
};
use openraft::{EntryPayload, SnapshotPolicy};
use tonic::Code;

use super::bench::{CpuSample, OpStats, Report};
use crate::api::pb::replicated::{command, Command, CommandResult, SendCmd};
use crate::cluster::config::RaftTiming;
use crate::shard::log_store::LogStore;
use crate::shard::types::{
    ApplyOutput, Entry, LogId, NodeAddr, Proposal, SnapshotMeta, StoredMembership, TypeConfig, Vote,
};
use crate::storage::Storage;
use crate::types::ShardId;

/// Replicas of each group, as in the dev cluster.
const REPLICAS: u64 = 3;
/// How long the groups may take to elect their first leaders.
const ELECTION_WAIT: Duration = Duration::from_secs(60);
/// How long one write may take before it counts as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A worker's pause after a failed write.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Longest measured or warmup time: the log is kept whole in memory, about
/// 1 KiB per write on each of three replicas.
const SECS_MAX: f64 = 600.0;

#[derive(clap::Args, Clone, Debug)]
pub struct RaftFloorArgs {
    /// Raft groups, each with three replicas in this process.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub groups: u32,
    /// Writes in flight (one worker each).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub in_flight: u64,
    /// Send commands per log entry (what a router's batching of unary sends
    /// reaches: about 1.1 to 1.3 with 64 shards at 256 in flight).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub commands_per_entry: u64,
    /// Message body bytes.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    pub size: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before the measured window.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Keep the logs in chatstore's own Raft log (segment files, group
    /// commit, `fdatasync` before an append counts as durable), one per
    /// node in a temporary folder removed afterwards, instead of in memory.
    #[arg(long)]
    pub durable_log: bool,
}

/// `chatctl bench-raft`.
pub async fn command(args: RaftFloorArgs, json: bool) -> anyhow::Result<i32> {
    let (report, rounds) = run_counting(&args).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", super::bench::text(&report));
        let messages: f64 = report.ops.iter().map(|o| o.ops_per_sec).sum();
        if let (Some(cpu), true) = (report.client_cpu_percent, messages > 0.0) {
            println!(
                "CPU per message: {:.0} µs ({} groups × {REPLICAS} replicas, {} commands per entry)",
                cpu / 100.0 * 1e6 / messages,
                args.groups,
                args.commands_per_entry
            );
        }
        let entries = (report.ops[0].count / args.commands_per_entry).max(1) as f64;
        println!(
            "per entry: {:.2} AppendEntries calls; {:.2} entries per apply call",
            rounds.appends as f64 / entries,
            rounds.applied as f64 / (rounds.apply_calls as f64).max(1.0)
        );
    }
    Ok(0)
}

/// What the groups did over the measured window.
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundCounts {
    /// AppendEntries calls, heartbeats included.
    pub appends: u64,
    /// Apply calls of every replica.
    pub apply_calls: u64,
    /// Entries applied by every replica.
    pub applied: u64,
}

/// Counters the groups' network and state machines share.
#[derive(Default)]
struct Rounds {
    appends: AtomicU64,
    apply_calls: AtomicU64,
    applied: AtomicU64,
}

impl Rounds {
    fn now(&self) -> RoundCounts {
        RoundCounts {
            appends: self.appends.load(Ordering::Relaxed),
            apply_calls: self.apply_calls.load(Ordering::Relaxed),
            applied: self.applied.load(Ordering::Relaxed),
        }
    }
}

impl RoundCounts {
    fn since(self, earlier: RoundCounts) -> RoundCounts {
        RoundCounts {
            appends: self.appends - earlier.appends,
            apply_calls: self.apply_calls - earlier.apply_calls,
            applied: self.applied - earlier.applied,
        }
    }
}

/// Starts the groups, loads them, stops them, and reports sends per second
/// (each command of an entry counts, timed by its entry).
pub async fn run(args: &RaftFloorArgs) -> anyhow::Result<Report> {
    Ok(run_counting(args).await?.0)
}

/// [`run`], with what the groups did.
async fn run_counting(args: &RaftFloorArgs) -> anyhow::Result<(Report, RoundCounts)> {
    anyhow::ensure!(
        args.duration > 0.0 && args.duration <= SECS_MAX,
        "--duration must be more than 0 and at most {SECS_MAX} seconds"
    );
    anyhow::ensure!(
        (0.0..=SECS_MAX).contains(&args.warmup),
        "--warmup must be 0 to {SECS_MAX} seconds"
    );
    let groups = Groups::start(args.groups, args.durable_log).await?;
    let measured = groups.load(args).await;
    groups.stop().await;
    let (stats, cpu, window, rounds) = measured?;
    let mut op = stats.report("send", window);
    op.per_request = args.commands_per_entry;
    let report = Report {
        workload: "raft-floor",
        routers: Vec::new(),
        in_flight: args.in_flight as usize,
        connections: 0,
        chats: 0,
        senders: None,
        size_bytes: args.size as usize,
        warmup_secs: args.warmup,
        measured_secs: window.as_secs_f64(),
        watch: None,
        client_cpu_percent: cpu,
        server_cpu_percent: None,
        open_rate: None,
        raft_groups: Some(args.groups),
        ops: vec![op],
    };
    Ok((report, rounds))
}

type FloorRaft = openraft::Raft<TypeConfig, FloorStateMachine>;

/// Every replica of every group, by (group, node).
type Replicas = Arc<RwLock<HashMap<(u32, u64), FloorRaft>>>;

fn replica(replicas: &Replicas, group: u32, node: u64) -> Option<FloorRaft> {
    replicas
        .read()
        .expect("replica map lock")
        .get(&(group, node))
        .cloned()
}

struct Groups {
    replicas: Replicas,
    /// The node each group's leader was last seen on.
    leaders: Arc<Vec<AtomicU64>>,
    rounds: Arc<Rounds>,
    /// With --durable-log: the folder of the nodes' storage, and the
    /// storage of nodes 1 to 3.
    durable: Option<(PathBuf, Vec<Storage>)>,
}

impl Groups {
    /// Starts `count` groups of three replicas and waits until each has a
    /// leader. Group g is initialized on node g % 3 + 1, so leaders spread
    /// over the nodes as the dev cluster's do. On failure every replica
    /// already started is shut down.
    async fn start(count: u32, durable_log: bool) -> anyhow::Result<Groups> {
        let mut groups = Groups {
            replicas: Arc::default(),
            leaders: Arc::new((0..count).map(|_| AtomicU64::new(0)).collect()),
            rounds: Arc::default(),
            durable: None,
        };
        if durable_log {
            let dir = std::env::temp_dir().join(format!(
                "chatstore-raft-floor-{:016x}",
                rand::random::<u64>()
            ));
            let storages = (1..=REPLICAS)
                .map(|node| Storage::open(&dir.join(format!("node{node}"))))
                .collect::<Result<Vec<_>, _>>();
            match storages {
                Ok(storages) => groups.durable = Some((dir, storages)),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(anyhow::Error::new(e).context("opening the nodes' storage"));
                }
            }
        }
        match groups.open_and_elect(count).await {
            Ok(()) => Ok(groups),
            Err(e) => {
                groups.stop().await;
                Err(e)
            }
        }
    }

    async fn open_and_elect(&self, count: u32) -> anyhow::Result<()> {
        // The Raft timing of `cluster-configs/local-3region.toml`, which
        // `make bench` runs the cluster with.
        let timing = RaftTiming {
            heartbeat_ms: 250,
            election_timeout_ms_min: 1000,
            election_timeout_ms_max: 1500,
            ..RaftTiming::default()
        };
        let mut config = (*crate::shard::raft_config(
            "raft-floor",
            &timing,
            (
                timing.election_timeout_ms_min,
                timing.election_timeout_ms_max,
            ),
        )?)
        .clone();
        // The log is never purged, so no snapshot is ever needed.
        config.snapshot_policy = SnapshotPolicy::Never;
        let config = Arc::new(config.validate()?);
        for group in 0..count {
            for node in 1..=REPLICAS {
                let network = FloorNetwork {
                    group,
                    replicas: self.replicas.clone(),
                    rounds: self.rounds.clone(),
                };
                let sm = FloorStateMachine::new(self.rounds.clone());
                let raft = match &self.durable {
                    Some((_, storages)) => {
                        let storage = &storages[node as usize - 1];
                        let log = LogStore::open(storage, ShardId(u64::from(group))).await?;
                        FloorRaft::new(node, config.clone(), network, log, sm).await?
                    }
                    None => {
                        FloorRaft::new(node, config.clone(), network, MemLog::default(), sm).await?
                    }
                };
                self.replicas
                    .write()
                    .expect("replica map lock")
                    .insert((group, node), raft);
            }
        }
        let members: BTreeMap<u64, NodeAddr> =
            (1..=REPLICAS).map(|n| (n, NodeAddr::default())).collect();
        for group in 0..count {
            let first = u64::from(group) % REPLICAS + 1;
            self.raft(group, first).initialize(members.clone()).await?;
        }
        let deadline = Instant::now() + ELECTION_WAIT;
        for group in 0..count {
            loop {
                let leader = self
                    .raft(group, 1)
                    .metrics()
                    .borrow_watched()
                    .current_leader;
                if let Some(leader) = leader {
                    self.leaders[group as usize].store(leader, Ordering::Relaxed);
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "group {group} had no leader after {ELECTION_WAIT:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    fn raft(&self, group: u32, node: u64) -> FloorRaft {
        replica(&self.replicas, group, node).expect("every replica is started before use")
    }

    /// Runs the closed loop; returns the measured writes, this process's
    /// CPU over the window, the window's length and the groups' rounds in it.
    async fn load(
        &self,
        args: &RaftFloorArgs,
    ) -> anyhow::Result<(OpStats, Option<f64>, Duration, RoundCounts)> {
        let start = Instant::now();
        let measure_from = start + Duration::from_secs_f64(args.warmup);
        let end = measure_from + Duration::from_secs_f64(args.duration);
        let body = Bytes::from(vec![b'x'; args.size as usize]);
        let next_id = Arc::new(AtomicU64::new(1));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..args.in_flight {
            let replicas = self.replicas.clone();
            let leaders = self.leaders.clone();
            let body = body.clone();
            let next_id = next_id.clone();
            let per_entry = args.commands_per_entry;
            workers.spawn(async move {
                let mut stats = OpStats::new();
                loop {
                    let now = Instant::now();
                    if now >= end {
                        return stats;
                    }
                    let group = rand::random_range(0..leaders.len()) as u32;
                    let leader = leaders[group as usize].load(Ordering::Relaxed);
                    let outcome = match replica(&replicas, group, leader) {
                        Some(raft) => {
                            let commands = (0..per_entry)
                                .map(|_| {
                                    send_command(next_id.fetch_add(1, Ordering::Relaxed), &body)
                                })
                                .collect();
                            let proposal = Proposal::new(crate::types::now_ms(), commands);
                            let write = raft.client_write(proposal);
                            match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                                Ok(Ok(_)) => Ok(()),
                                Ok(Err(e)) => {
                                    if let Some(id) =
                                        e.forward_to_leader().and_then(|f| f.leader_id)
                                    {
                                        leaders[group as usize].store(id, Ordering::Relaxed);
                                    }
                                    match e {
                                        RaftError::Fatal(_) => Err(Code::Internal),
                                        RaftError::APIError(_) => Err(Code::Unavailable),
                                    }
                                }
                                Err(_) => Err(Code::DeadlineExceeded),
                            }
                        }
                        // A leader id outside the group: the write had nowhere to go.
                        None => Err(Code::Internal),
                    };
                    if now >= measure_from {
                        let latency = now.elapsed();
                        for _ in 0..per_entry {
                            stats.record(latency, outcome);
                        }
                    }
                    if outcome.is_err() {
                        // An election or a stopped group: not a busy loop.
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            });
        }
        tokio::time::sleep_until(measure_from.into()).await;
        let before = CpuSample::take(None);
        let rounds_before = self.rounds.now();
        tokio::time::sleep_until(end.into()).await;
        let (cpu, _) = CpuSample::take(None).percent_since(&before);
        let rounds = self.rounds.now().since(rounds_before);
        let mut stats = OpStats::new();
        while let Some(done) = workers.join_next().await {
            stats.merge(done?);
        }
        Ok((stats, cpu, end - measure_from, rounds))
    }

    async fn stop(&self) {
        let all: Vec<FloorRaft> = self
            .replicas
            .read()
            .expect("replica map lock")
            .values()
            .cloned()
            .collect();
        for raft in all {
            let _ = raft.shutdown().await;
        }
        if let Some((dir, _)) = &self.durable {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                eprintln!("bench-raft: could not remove {}: {e}", dir.display());
            }
        }
    }
}

fn send_command(id: u64, body: &Bytes) -> Command {
    Command {
        kind: Some(command::Kind::Send(SendCmd {
            chat_id: id % 1000 + 1,
            sender_id: 1,
            client_msg_id: id,
            body: body.clone(),
            self_destruct: None,
            sealed_body: None,
        })),
    }
}

fn unreachable(e: impl std::fmt::Display) -> Unreachable<TypeConfig> {
    Unreachable::from_string(e.to_string())
}

fn rpc_failed(e: impl std::fmt::Display) -> RPCError<TypeConfig> {
    RPCError::Unreachable(unreachable(e))
}

/// Calls the target replica's Raft directly.
struct FloorNetwork {
    group: u32,
    replicas: Replicas,
    rounds: Arc<Rounds>,
}

impl RaftNetworkFactory<TypeConfig> for FloorNetwork {
    type Network = FloorLink;

    async fn new_client(&mut self, target: u64, _node: &NodeAddr) -> FloorLink {
        FloorLink {
            group: self.group,
            target,
            replicas: self.replicas.clone(),
            rounds: self.rounds.clone(),
        }
    }
}

struct FloorLink {
    group: u32,
    target: u64,
    replicas: Replicas,
    rounds: Arc<Rounds>,
}

impl FloorLink {
    fn raft(&self) -> Result<FloorRaft, Unreachable<TypeConfig>> {
        replica(&self.replicas, self.group, self.target)
            .ok_or_else(|| unreachable("replica not started"))
    }
}

impl RaftNetworkV2<TypeConfig> for FloorLink {
    type SnapshotData = ();

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let raft = self.raft().map_err(RPCError::Unreachable)?;
        self.rounds.appends.fetch_add(1, Ordering::Relaxed);
        raft.append_entries(rpc).await.map_err(rpc_failed)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let raft = self.raft().map_err(RPCError::Unreachable)?;
        raft.vote(rpc).await.map_err(rpc_failed)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let raft = self.raft().map_err(RPCError::Unreachable)?;
        raft.pre_vote(rpc).await.map_err(rpc_failed)
    }

    async fn full_snapshot(
        &mut self,
        _vote: Vote,
        _snapshot: openraft::alias::SnapshotOf<TypeConfig, ()>,
        _cancel: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        Err(StreamingError::Unreachable(unreachable(
            "the floor's groups never snapshot",
        )))
    }
}

/// A log in memory; an append is durable when it returns.
#[derive(Clone, Default)]
struct MemLog {
    inner: Arc<Mutex<MemLogInner>>,
}

#[derive(Default)]
struct MemLogInner {
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
    entries: BTreeMap<u64, Entry>,
}

impl MemLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemLogInner> {
        self.inner.lock().expect("log lock")
    }
}

impl RaftLogReader<TypeConfig> for MemLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        Ok(self
            .lock()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.lock().vote)
    }
}

impl RaftLogStorage<TypeConfig> for MemLog {
    type LogReader = MemLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let inner = self.lock();
        let last = inner
            .entries
            .last_key_value()
            .map(|(_, e)| e.log_id)
            .or(inner.purged);
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> MemLog {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.lock().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        {
            let mut inner = self.lock();
            for entry in entries {
                inner.entries.insert(entry.log_id.index, entry);
            }
        }
        callback.io_completed(Ok(()));
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> Result<(), io::Error> {
        let from = last.map_or(0, |id| id.index + 1);
        self.lock().entries.split_off(&from);
        Ok(())
    }

    async fn purge(&mut self, upto: LogId) -> Result<(), io::Error> {
        let mut inner = self.lock();
        inner.entries = inner.entries.split_off(&(upto.index + 1));
        inner.purged = Some(upto);
        Ok(())
    }
}

/// Applies nothing: one empty result per command.
struct FloorStateMachine {
    applied: Option<LogId>,
    membership: StoredMembership,
    rounds: Arc<Rounds>,
}

impl FloorStateMachine {
    fn new(rounds: Arc<Rounds>) -> FloorStateMachine {
        FloorStateMachine {
            applied: None,
            membership: StoredMembership::default(),
            rounds,
        }
    }
}

impl RaftStateMachine<TypeConfig> for FloorStateMachine {
    type SnapshotData = ();
    type SnapshotBuilder = NoSnapshots;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        self.rounds.apply_calls.fetch_add(1, Ordering::Relaxed);
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            self.rounds.applied.fetch_add(1, Ordering::Relaxed);
            let output = match &entry.payload {
                EntryPayload::Normal(p) => ApplyOutput {
                    results: vec![CommandResult::default(); p.batch.commands.len()],
                },
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    ApplyOutput::default()
                }
                EntryPayload::Blank => ApplyOutput::default(),
            };
            self.applied = Some(entry.log_id);
            if let Some(r) = responder {
                r.send(output);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> NoSnapshots {
        NoSnapshots
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta,
        _snapshot: (),
    ) -> Result<(), io::Error> {
        Err(io::Error::other("the floor's groups never snapshot"))
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<TypeConfig, ()>>, io::Error> {
        Ok(None)
    }
}

struct NoSnapshots;

impl RaftSnapshotBuilder<TypeConfig> for NoSnapshots {
    type SnapshotData = ();

    async fn build_snapshot(
        &mut self,
    ) -> Result<openraft::alias::SnapshotOf<TypeConfig, ()>, io::Error> {
        Err(io::Error::other("the floor's groups never snapshot"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short run commits writes through three replicas of two groups, with
    /// each command of an entry counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_commits_writes_and_counts_each_command() {
        let args = RaftFloorArgs {
            groups: 2,
            in_flight: 4,
            commands_per_entry: 3,
            size: 16,
            duration: 0.5,
            warmup: 0.1,
            durable_log: false,
        };
        let (report, rounds) = run_counting(&args).await.unwrap();
        let op = &report.ops[0];
        assert!(op.count > 0, "no write committed");
        // Entries reach the followers and are applied on every replica
        // (followers may trail by the last few at the window's end).
        let entries = op.count / 3;
        assert!(rounds.appends > 0 && rounds.apply_calls > 0, "{rounds:?}");
        assert!(
            rounds.applied * 2 >= entries * 3,
            "{rounds:?} for {entries} entries"
        );
        assert_eq!(op.count % 3, 0, "each entry counts its three commands");
        assert!(op.errors.is_empty(), "{:?}", op.errors);
    }

    /// With the nodes' own Raft log the writes commit too, and the
    /// temporary folder is gone afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_on_the_durable_log_commits_and_removes_its_folder() {
        let before = floor_folders();
        let args = RaftFloorArgs {
            groups: 2,
            in_flight: 4,
            commands_per_entry: 1,
            size: 16,
            duration: 0.5,
            warmup: 0.1,
            durable_log: true,
        };
        let report = run(&args).await.unwrap();
        assert!(report.ops[0].count > 0, "no write committed");
        assert!(
            report.ops[0].errors.is_empty(),
            "{:?}",
            report.ops[0].errors
        );
        assert_eq!(floor_folders(), before, "the run left its folder behind");
    }

    fn floor_folders() -> std::collections::BTreeSet<std::ffi::OsString> {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .filter(|n| n.to_string_lossy().starts_with("chatstore-raft-floor-"))
            .collect()
    }
}
