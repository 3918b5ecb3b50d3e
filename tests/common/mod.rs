//! Test fixtures: cluster configs on free loopback ports, node API clients
//! that find shard leaders, and convergence checks. Used by the in-process
//! cluster tests and the multi-process crash tests.
#![allow(dead_code)]

pub mod chaos;
pub mod procs;
pub mod proxy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chatstore::api::pb::node::node_api_client::NodeApiClient;
use chatstore::api::pb::node::{
    read_request, ChatDigestsRequest, ReadRequest, StatusRequest, WriteReply, WriteRequest,
};
use chatstore::api::pb::replicated::{command, Command, SendCmd};
use chatstore::api::pb::{self, Consistency};
use chatstore::api::status::leader_hint;
use chatstore::cluster::{ClusterConfig, Placement};
use chatstore::types::{ChatId, ShardId};
use tonic::transport::Channel;

/// Ports handed out by [`free_port`] in this test process.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// What a chat's change log says of its messages: [`Client::changes_on`].
#[derive(Default)]
pub struct ChangeLog {
    /// The seqs whose message expired.
    pub expired: std::collections::BTreeSet<u64>,
    /// The sender of the message sent at each seq.
    pub sent_by: BTreeMap<u64, u64>,
    /// The pts the log was read from: 0, or past the changes that
    /// collection dropped (those are not in the two maps above).
    pub read_from: u64,
}

/// A free TCP port on 127.0.0.1 for a process to listen on later.
///
/// Drawn from 20000-32767, below Linux's ephemeral range (32768-60999):
/// a port the OS picks for another listener (a proxy binding port 0) or an
/// outgoing connection can then never take a node's port between this call
/// and the node's start. Never the same port twice in one test process.
pub fn free_port() -> u16 {
    let mut handed_out = HANDED_OUT.lock().expect("port set");
    for _ in 0..10_000 {
        let port = rand::random_range(20_000..32_768u16);
        if handed_out.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("no free port in 20000-32767");
}

pub struct ConfigOptions {
    pub shards: u32,
    pub snapshot_every_entries: u64,
    pub logs_kept_behind_snapshot: u64,
    /// `[erasure] seal_epoch_secs`; the node default when None.
    pub seal_epoch_secs: Option<u64>,
    /// Simulated round trips (eu/us, us/ap, eu/ap) in ms; none when None.
    pub rtt_ms: Option<(u64, u64, u64)>,
    /// Raft heartbeat and election timeout range in ms; the test default
    /// (200, 1000-1600) when None.
    pub raft_timing: Option<(u64, u64, u64)>,
    /// Nodes listed with `bootstrap = false` (id, region): they start empty.
    pub extra_nodes: Vec<(u64, &'static str)>,
    /// `[raft] quiesce_after_ms`: short in tests, so that every
    /// multi-process test also runs shards going quiet and waking.
    pub quiesce_after_ms: u64,
    /// `[retention] change_retention_secs`, when not the default.
    pub change_retention_secs: Option<u64>,
    /// Replicas per shard (3: one per region).
    pub replication_factor: u32,
}

impl Default for ConfigOptions {
    fn default() -> Self {
        ConfigOptions {
            shards: 8,
            snapshot_every_entries: 10_000,
            logs_kept_behind_snapshot: 1_000,
            seal_epoch_secs: None,
            rtt_ms: None,
            raft_timing: None,
            extra_nodes: Vec::new(),
            quiesce_after_ms: 1_500,
            replication_factor: 3,
            change_retention_secs: None,
        }
    }
}

/// A three-node, three-region config on free ports with data under `root`.
pub fn three_region_config(root: &Path, opts: &ConfigOptions) -> ClusterConfig {
    let (heartbeat, election_min, election_max) = opts.raft_timing.unwrap_or((200, 1000, 1600));
    let mut text = format!(
        "cluster_name = \"test\"\nshards = {}\nreplication_factor = {}\nregions = [\"eu\", \"us\", \"ap\"]\ndata_root = {:?}\ninsecure = true\n\
         [raft]\nheartbeat_ms = {}\nelection_timeout_ms_min = {}\nelection_timeout_ms_max = {}\n\
         snapshot_every_entries = {}\nlogs_kept_behind_snapshot = {}\nquiesce_after_ms = {}\n",
        opts.shards,
        opts.replication_factor,
        root.display().to_string(),
        heartbeat,
        election_min,
        election_max,
        opts.snapshot_every_entries,
        opts.logs_kept_behind_snapshot,
        opts.quiesce_after_ms,
    );
    if let Some((eu_us, us_ap, eu_ap)) = opts.rtt_ms {
        text.push_str(&format!(
            "[latency]\nsimulate = true\nrtt_ms = {{ \"eu/us\" = {eu_us}, \"us/ap\" = {us_ap}, \"eu/ap\" = {eu_ap} }}\n"
        ));
    }
    if let Some(secs) = opts.change_retention_secs {
        text.push_str(&format!("[retention]\nchange_retention_secs = {secs}\n"));
    }
    if let Some(secs) = opts.seal_epoch_secs {
        text.push_str(&format!("[erasure]\nseal_epoch_secs = {secs}\n"));
    }
    for (id, region) in [(1, "eu"), (2, "us"), (3, "ap")] {
        text.push_str(&format!(
            "[[nodes]]\nid = {id}\nregion = \"{region}\"\nraft_addr = \"127.0.0.1:{}\"\n",
            free_port()
        ));
    }
    for (id, region) in &opts.extra_nodes {
        text.push_str(&format!(
            "[[nodes]]\nid = {id}\nregion = \"{region}\"\nraft_addr = \"127.0.0.1:{}\"\nbootstrap = false\n",
            free_port()
        ));
    }
    ClusterConfig::from_toml(&text).expect("test config is valid")
}

pub fn send_cmd(chat: u64, sender: u64, client_msg_id: u64, body: &[u8]) -> Command {
    Command {
        kind: Some(command::Kind::Send(SendCmd {
            chat_id: chat,
            sender_id: sender,
            client_msg_id,
            body: body.to_vec().into(),
            self_destruct: None,
            sealed_body: None,
        })),
    }
}

/// Talks to nodes through their node API; follows leader hints.
#[derive(Clone)]
pub struct Client {
    pub config: ClusterConfig,
    pub placement: Placement,
    clients: BTreeMap<u64, NodeApiClient<Channel>>,
    leaders: std::sync::Arc<std::sync::Mutex<BTreeMap<u64, u64>>>,
}

/// How long one node API call may take before the client gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A request that gives up after [`CALL_TIMEOUT`]: a node that hangs fails
/// the check instead of holding the test until nextest kills it.
fn timed<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(CALL_TIMEOUT);
    req
}

impl Client {
    pub fn new(config: &ClusterConfig) -> Client {
        let clients = config
            .nodes
            .iter()
            .map(|n| {
                let channel =
                    tonic::transport::Endpoint::from_shared(format!("http://{}", n.raft_addr))
                        .expect("valid address")
                        .connect_timeout(Duration::from_secs(2))
                        .connect_lazy();
                (n.id, NodeApiClient::new(channel))
            })
            .collect();
        Client {
            config: config.clone(),
            placement: Placement::new(config),
            clients,
            leaders: Default::default(),
        }
    }

    pub fn node(&self, id: u64) -> NodeApiClient<Channel> {
        self.clients[&id].clone()
    }

    pub fn shard_of(&self, chat: u64) -> ShardId {
        self.placement.shard_of_chat(ChatId(chat))
    }

    /// Writes `commands` to the leader of `chat`'s shard, retrying (with the
    /// same commands, so sends stay deduplicated) until `deadline` passes.
    pub async fn write(
        &self,
        chat: u64,
        commands: Vec<Command>,
        deadline: Duration,
    ) -> Result<WriteReply, String> {
        let shard = self.shard_of(chat);
        let replicas: Vec<u64> = self.placement.replicas(shard).iter().map(|n| n.0).collect();
        let started = Instant::now();
        let mut target = self
            .leaders
            .lock()
            .unwrap()
            .get(&shard.0)
            .copied()
            .unwrap_or(replicas[0]);
        let mut attempt = 0usize;
        let mut last_err = String::new();
        while started.elapsed() < deadline {
            attempt += 1;
            let mut req = tonic::Request::new(WriteRequest {
                shard_id: shard.0,
                commands: commands.clone(),
            });
            req.set_timeout(CALL_TIMEOUT);
            match self.node(target).write(req).await {
                Ok(r) => {
                    self.leaders.lock().unwrap().insert(shard.0, target);
                    return Ok(r.into_inner());
                }
                Err(status) => {
                    last_err = format!("node {target}: {status}");
                    match leader_hint(&status) {
                        Some((leader, _)) if leader != target => target = leader,
                        _ => {
                            target = replicas[attempt % replicas.len()];
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }
        Err(format!(
            "write to {shard} failed for {deadline:?}: {last_err}"
        ))
    }

    /// All messages of `chat` on `node`'s replica (STALE), oldest first.
    pub async fn history_on(
        &self,
        node: u64,
        chat: u64,
    ) -> Result<Vec<pb::Message>, tonic::Status> {
        let mut out = Vec::new();
        let mut before = 0;
        // Pages of up to 1,000 go back from the newest message: bounded.
        for _ in 0..10_000 {
            let req = ReadRequest {
                shard_id: self.shard_of(chat).0,
                consistency: Consistency::Stale as i32,
                query: Some(read_request::Query::History(pb::GetHistoryRequest {
                    chat_id: chat,
                    before_seq: before,
                    limit: 1000,
                    ..Default::default()
                })),
                ..Default::default()
            };
            // A page cut short by bytes is not the start: only an empty one.
            let mut req = tonic::Request::new(req);
            req.set_timeout(CALL_TIMEOUT);
            let page = self.node(node).read(req).await?.into_inner().messages;
            let Some(last) = page.last() else {
                out.reverse();
                return Ok(out);
            };
            if before != 0 && last.seq >= before {
                return Err(tonic::Status::internal(format!(
                    "a history page below seq {before} ended at seq {}",
                    last.seq
                )));
            }
            before = last.seq;
            out.extend(page);
        }
        Err(tonic::Status::internal("history of more than 10,000 pages"))
    }

    /// What `chat`'s change log on `node`'s replica says of its messages
    /// (STALE): which seqs expired (self-destructed; reads hide a message
    /// once its time comes, and this is what removed it) and who sent each.
    pub async fn changes_on(&self, node: u64, chat: u64) -> Result<ChangeLog, tonic::Status> {
        let mut out = ChangeLog::default();
        let first = self.difference_on(node, chat, 0, 1).await?;
        if first.reset_required {
            // Collection dropped a prefix: the lowest cursor that reads
            // without a reset, by bisection (a cursor below `low` resets,
            // one at `high` does not).
            let (mut low, mut high) = (0, first.pts);
            while low + 1 < high {
                let mid = low + (high - low) / 2;
                match self.difference_on(node, chat, mid, 1).await?.reset_required {
                    true => low = mid,
                    false => high = mid,
                }
            }
            out.read_from = high;
        }
        let mut pts = out.read_from;
        // Pages of up to 1,000 changes: bounded.
        for _ in 0..10_000 {
            let d = self.difference_on(node, chat, pts, 1000).await?;
            if d.reset_required {
                return Err(tonic::Status::internal(format!(
                    "chat {chat}'s changes from pts {pts} were collected while read"
                )));
            }
            for c in &d.changes {
                if c.kind == pb::ChangeKind::ExpireMessage as i32 {
                    out.expired.insert(c.seq);
                } else if c.kind == pb::ChangeKind::NewMessage as i32 {
                    out.sent_by.insert(c.seq, c.user_id);
                }
            }
            if !d.more || d.pts <= pts {
                return Ok(out);
            }
            pts = d.pts;
        }
        Err(tonic::Status::internal(
            "a change log of more than 10,000 pages",
        ))
    }

    /// One page of `chat`'s changes after `pts` on `node`'s replica (STALE).
    async fn difference_on(
        &self,
        node: u64,
        chat: u64,
        pts: u64,
        limit: u32,
    ) -> Result<pb::ChatDifference, tonic::Status> {
        let mut req = tonic::Request::new(ReadRequest {
            shard_id: self.shard_of(chat).0,
            consistency: Consistency::Stale as i32,
            query: Some(read_request::Query::Difference(
                chatstore::api::pb::node::DifferenceQuery {
                    chat_id: chat,
                    pts,
                    limit,
                    ..Default::default()
                },
            )),
            ..Default::default()
        });
        req.set_timeout(CALL_TIMEOUT);
        let reply = self.node(node).read(req).await?.into_inner();
        reply
            .difference
            .ok_or_else(|| tonic::Status::internal("a difference read answered none"))
    }

    /// `chat`'s record as the replica on `node` has it (STALE).
    pub async fn chat_on(
        &self,
        node: u64,
        chat: u64,
    ) -> Result<pb::GetChatResponse, tonic::Status> {
        let mut req = tonic::Request::new(ReadRequest {
            shard_id: self.shard_of(chat).0,
            consistency: Consistency::Stale as i32,
            query: Some(read_request::Query::Chat(pb::GetChatRequest {
                chat_id: chat,
                ..Default::default()
            })),
            ..Default::default()
        });
        req.set_timeout(CALL_TIMEOUT);
        let reply = self.node(node).read(req).await?.into_inner();
        reply
            .chat
            .ok_or_else(|| tonic::Status::internal("a chat read answered no chat"))
    }

    /// Per-shard digests on every node, once every replica of every shard
    /// has the same applied index and digests; fails after `deadline`.
    pub async fn wait_converged(&self, nodes: &[u64], deadline: Duration) -> Result<(), String> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < deadline {
            match self.converged(nodes).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Err(format!("replicas did not converge in {deadline:?}: {last}"))
    }

    /// The nodes among `nodes` that host a replica of each shard.
    pub async fn hosts(&self, nodes: &[u64]) -> Result<BTreeMap<u64, Vec<u64>>, String> {
        let mut hosts: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for node in nodes {
            let mut req = tonic::Request::new(StatusRequest {});
            req.set_timeout(CALL_TIMEOUT);
            let status = self
                .node(*node)
                .status(req)
                .await
                .map_err(|e| format!("node {node}: {e}"))?
                .into_inner();
            for sh in status.shards {
                hosts.entry(sh.shard_id).or_default().push(*node);
            }
        }
        Ok(hosts)
    }

    /// Every shard has a replica on `replication_factor` of `nodes`, and
    /// they all have the same applied index and digests.
    async fn converged(&self, nodes: &[u64]) -> Result<(), String> {
        let hosts = self.hosts(nodes).await?;
        let rf = self.config.replication_factor as usize;
        for shard in 0..self.config.shards as u64 {
            let on = hosts.get(&shard).cloned().unwrap_or_default();
            if on.len() != rf {
                return Err(format!(
                    "shard {shard} has replicas on nodes {on:?}, not {rf} of {nodes:?}"
                ));
            }
            let mut seen: Option<(u64, Vec<_>)> = None;
            for node in &on {
                let reply = self
                    .node(*node)
                    .chat_digests(timed(ChatDigestsRequest {
                        shard_id: shard,
                        ..Default::default()
                    }))
                    .await
                    .map_err(|e| format!("node {node}: {e}"))?
                    .into_inner();
                let state = (reply.applied_index, reply.chats);
                match &seen {
                    None => seen = Some(state),
                    Some(s) if *s == state => {}
                    Some(s) => {
                        return Err(format!(
                            "shard {shard}: node {node} at applied {} differs from applied {}",
                            state.0, s.0
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// The node that leads `shard`, as the live nodes report it.
    pub async fn leader_of(&self, shard: u64) -> Option<u64> {
        for (id, client) in &self.clients {
            if let Ok(s) = client.clone().status(timed(StatusRequest {})).await {
                if s.into_inner()
                    .shards
                    .iter()
                    .any(|sh| sh.shard_id == shard && sh.is_leader)
                {
                    return Some(*id);
                }
            }
        }
        None
    }

    /// The leader of `shard`, once the live nodes report one (polled for at
    /// most `within`).
    pub async fn wait_leader_of(&self, shard: u64, within: Duration) -> Option<u64> {
        let started = Instant::now();
        loop {
            if let Some(leader) = self.leader_of(shard).await {
                return Some(leader);
            }
            if started.elapsed() >= within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every shard has a leader known to `nodes`.
    pub async fn wait_leaders(&self, nodes: &[u64], deadline: Duration) -> Result<(), String> {
        let started = Instant::now();
        while started.elapsed() < deadline {
            let mut led = std::collections::BTreeSet::new();
            for node in nodes {
                if let Ok(s) = self.node(*node).status(timed(StatusRequest {})).await {
                    for sh in s.into_inner().shards {
                        if sh.is_leader {
                            led.insert(sh.shard_id);
                        }
                    }
                }
            }
            if led.len() == self.config.shards as usize {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "not every shard elected a leader within {deadline:?}"
        ))
    }

    /// Waits until every replica on `nodes` applies under `rules`.
    pub async fn wait_apply_rules(
        &self,
        nodes: &[u64],
        rules: u32,
        deadline: Duration,
    ) -> Result<(), String> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < deadline {
            let mut behind = Vec::new();
            for node in nodes {
                match self.node(*node).status(timed(StatusRequest {})).await {
                    Ok(s) => behind.extend(
                        s.into_inner()
                            .shards
                            .iter()
                            .filter(|sh| sh.apply_rules != rules)
                            .map(|sh| (*node, sh.shard_id, sh.apply_rules)),
                    ),
                    // A node that does not answer is not there yet.
                    Err(_) => behind.push((*node, 0, 0)),
                }
            }
            if behind.is_empty() {
                return Ok(());
            }
            last = format!("{behind:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "replicas (node, shard, rules) not under apply rules {rules} after {deadline:?}: {last}"
        ))
    }
}

/// A temporary folder that is removed on drop unless the test failed, in
/// which case it is kept and its path printed for inspection.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let path = std::env::temp_dir().join(format!("chatstore-{name}-{}", rand_suffix()));
        std::fs::create_dir_all(&path).expect("create test dir");
        TestDir { path }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; data kept in {}", self.path.display());
        } else if std::env::var_os("CHATSTORE_TEST_KEEP").is_some() {
            eprintln!(
                "CHATSTORE_TEST_KEEP is set; data kept in {}",
                self.path.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn rand_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

/// Replaces (or appends) the section between `<!-- NAME:begin -->` and
/// `<!-- NAME:end -->` in BENCHMARKS.md, stamped with the machine, commit and
/// date.
pub fn write_bench_section(name: &str, heading: &str, body: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let sh = |cmd: &str| {
        std::process::Command::new("sh")
            .args(["-c", cmd])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let stamp = format!(
        "Measured {} on `{}` ({} cores, {}), commit {}.",
        sh("date -u +%Y-%m-%dT%H:%MZ"),
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'"),
        sh("nproc"),
        sh("free -g | awk '/Mem:/ {print $2 \" GiB\"}'"),
        sh("git rev-parse --short HEAD; git diff --quiet HEAD -- . ':!BENCHMARKS.md' || echo '(with uncommitted changes)'").replace('\n', " ")
    );
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let block = format!("{begin}\n{stamp}\n\n{body}{end}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    let text = match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &text[..b], &text[e + end.len()..]),
        _ => format!("{}\n## {heading}\n\n{block}\n", text.trim_end()),
    };
    std::fs::write(&path, text).expect("write BENCHMARKS.md");
}

/// Opens a Watch of one chat from `pts` through a router.
pub async fn watch_chat(
    api: &mut pb::chat_store_client::ChatStoreClient<Channel>,
    chat: u64,
    pts: u64,
) -> tonic::Streaming<pb::WatchEvent> {
    api.watch(pb::WatchRequest {
        cursors: vec![pb::Cursor { chat_id: chat, pts }],
    })
    .await
    .expect("Watch")
    .into_inner()
}

/// The next event of a Watch, within `within`.
pub async fn next_event(
    stream: &mut tonic::Streaming<pb::WatchEvent>,
    within: Duration,
) -> pb::WatchEvent {
    tokio::time::timeout(within, stream.message())
        .await
        .unwrap_or_else(|_| panic!("no Watch event within {within:?}"))
        .expect("Watch stream")
        .expect("an event")
}

/// Per (node, shard): quiet, leader.
pub async fn quiet_map(nodes: &Client, ids: &[u64]) -> BTreeMap<(u64, u64), (bool, u64)> {
    let mut out = BTreeMap::new();
    for id in ids {
        if let Ok(s) = nodes.node(*id).status(StatusRequest {}).await {
            for sh in s.into_inner().shards {
                out.insert((*id, sh.shard_id), (sh.quiet, sh.leader_node));
            }
        }
    }
    out
}

/// Waits until every replica on the nodes `ids` (each hosting `shards`)
/// has stopped its Raft timers.
pub async fn wait_all_quiet(nodes: &Client, ids: &[u64], shards: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let m = quiet_map(nodes, ids).await;
        let quiet = m.values().filter(|(q, _)| *q).count();
        if quiet == ids.len() * shards as usize {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {quiet} of {} replicas went quiet within {within:?}: {m:?}",
            ids.len() * shards as usize
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The body of an HTTP/1.1 GET of `path` from `addr` (a metrics endpoint).
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to metrics");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
