//! The chaos harness: a real three-region cluster of `chatstore` processes
//! with a fault-injecting proxy on every link between regions (node to node,
//! router to node), a recorded
//! workload, a seeded fault schedule, and a checker over the history and a
//! final read of every replica.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatstore::api::pb::{self, chat_store_client::ChatStoreClient, Consistency};
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tonic::Code;

use super::procs::{router_client, ProcessCluster};
use super::proxy::Proxy;
use super::{Client, ConfigOptions, TestDir};

pub const REGIONS: [&str; 3] = ["eu", "us", "ap"];
/// Chats the workload writes to.
const CHATS: u64 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    KillNode,
    KillLeaderOfBusyShard,
    PauseNode,
    PartitionRegion,
    OneWayPartition,
    RestartRouter,
}

pub const ALL_FAULTS: [Fault; 6] = [
    Fault::KillNode,
    Fault::KillLeaderOfBusyShard,
    Fault::PauseNode,
    Fault::PartitionRegion,
    Fault::OneWayPartition,
    Fault::RestartRouter,
];

#[derive(Debug, Clone)]
pub enum Outcome<T> {
    Ok(T),
    Failed,
    Unknown,
}

#[derive(Debug, Clone)]
pub enum OpKind {
    Send {
        chat: u64,
        cmid: u64,
        sender: u64,
        body: String,
        outcome: Outcome<u64>,
    },
    Edit {
        chat: u64,
        seq: u64,
        body: String,
        outcome: Outcome<()>,
    },
    Delete {
        chat: u64,
        seq: u64,
        outcome: Outcome<()>,
    },
    LinRead {
        chat: u64,
        last_seq: Option<u64>,
    },
    MarkRead {
        chat: u64,
        reader: u64,
        up_to: u64,
        outcome: Outcome<()>,
    },
    Close {
        chat: u64,
        outcome: Outcome<()>,
    },
    Reopen {
        chat: u64,
        outcome: Outcome<()>,
    },
}

#[derive(Debug, Clone)]
pub struct Op {
    pub session: usize,
    pub invoke: Instant,
    pub complete: Instant,
    pub kind: OpKind,
}

/// What happened, shared by workload tasks.
#[derive(Default)]
pub struct History {
    pub ops: Mutex<Vec<Op>>,
    /// Violations seen while running (session monotonicity, Watch gaps).
    pub online_violations: Mutex<Vec<String>>,
    pub watch_events: Mutex<u64>,
    /// Watch events and chat differences that told a reader to reset.
    pub resets: Mutex<u64>,
    /// GetDifference calls answered to the device readers.
    pub differences: Mutex<u64>,
    /// Every change a watcher was sent.
    pub watched: Mutex<Vec<Watched>>,
    /// The last pts each watcher got, per (watcher, chat).
    pub watcher_pts: Mutex<BTreeMap<(usize, u64), u64>>,
    /// Requests refused in a way retrying would not change. Every request
    /// of the workload is valid, so each one is a finding.
    pub refusals: Mutex<Vec<String>>,
    pub self_destructing: Mutex<SelfDestructing>,
}

/// The sends that asked to self-destruct.
#[derive(Default, Clone)]
pub struct SelfDestructing {
    /// By (chat, client_msg_id).
    pub asked: BTreeSet<(u64, u64)>,
    /// When the last of their timers runs out at the latest (from the end
    /// of its call).
    pub due: Option<Instant>,
}

impl History {
    fn refused(&self, session: usize, what: &str, status: &tonic::Status) {
        // A write into a closed chat: the op is recorded as failed, and the
        // checker holds it to the closes and reopens in the history.
        if status.code() == Code::FailedPrecondition && status.message().contains("is closed") {
            return;
        }
        self.refusals.lock().unwrap().push(format!(
            "session {session}: {what} refused: {:?}: {}",
            status.code(),
            status.message()
        ));
    }
}

/// One change as a watcher got it.
#[derive(Debug, Clone)]
pub struct Watched {
    pub watcher: usize,
    pub chat: u64,
    pub pts: u64,
    pub kind: i32,
    pub seq: u64,
    /// The user the change names (a new message's sender).
    pub user: u64,
    /// The message's (sender, client_msg_id), if the change carried it.
    pub message: Option<(u64, u64)>,
}

pub struct Chaos {
    pub seed: u64,
    // Fields drop in order: the processes stop before their folder goes.
    pub procs: ProcessCluster,
    pub dir: TestDir,
    pub nodes: Client,
    /// The link from node `a` to node `b`, per `(a, b)`.
    pub proxies: BTreeMap<(u64, u64), Proxy>,
    /// The link from the router in node `a`'s region to node `b`.
    pub router_proxies: BTreeMap<(u64, u64), Proxy>,
    pub routers: BTreeMap<String, String>,
}

impl Chaos {
    pub async fn start(seed: u64, name: &str) -> Chaos {
        Chaos::start_with(seed, name, None).await
    }

    /// [`Chaos::start`] with `[retention] change_retention_secs`: a short
    /// one keeps change collection dropping records under the faults.
    pub async fn start_with(seed: u64, name: &str, change_retention_secs: Option<u64>) -> Chaos {
        let dir = TestDir::new(name);
        let mut procs = ProcessCluster::new(
            &dir.path,
            &ConfigOptions {
                shards: 6,
                snapshot_every_entries: 300,
                logs_kept_behind_snapshot: 50,
                // Short seal epochs keep the eraser re-sealing, snapshotting
                // and purging (edits are sealed in the log) under faults.
                seal_epoch_secs: Some(4),
                // A small copy of a real matrix (eu-us < us-ap < eu-ap),
                // short so CI stays fast; applied by nodes and routers.
                rtt_ms: Some(RTT_MS),
                // Shards quiesce in every lull (a stalled link, a killed
                // leader), so faults hit quiet shards and wakes too.
                quiesce_after_ms: 400,
                change_retention_secs,
                ..Default::default()
            },
        );
        let mut proxies = BTreeMap::new();
        let mut router_proxies = BTreeMap::new();
        for (a, region) in (1..=3u64).zip(REGIONS) {
            let args = links_from(&procs.config, a, "--peer-addr", &mut proxies).await;
            procs.node_args.insert(a, args);
            // A router reaches the other regions' nodes through proxies
            // too, so a region cut off is cut off with its router.
            let args = links_from(&procs.config, a, "--node-addr", &mut router_proxies).await;
            procs.router_args.insert(region.to_string(), args);
        }
        procs.start_all_nodes();
        let nodes = Client::new(&procs.config);
        nodes
            .wait_leaders(&[1, 2, 3], Duration::from_secs(60))
            .await
            .expect("leaders elected");
        let mut routers = BTreeMap::new();
        for r in REGIONS {
            routers.insert(r.to_string(), procs.start_router(r));
        }
        for addr in routers.values() {
            router_client(addr).await;
        }
        Chaos {
            seed,
            dir,
            procs,
            nodes,
            proxies,
            router_proxies,
            routers,
        }
    }

    /// Every link between regions, `(a, b)`: from node `a` or the router in
    /// its region, to node `b`.
    fn links(&self) -> impl Iterator<Item = (&(u64, u64), &Proxy)> {
        self.proxies.iter().chain(&self.router_proxies)
    }

    pub fn heal_network(&self) {
        for (_, p) in self.links() {
            p.ctl.heal();
        }
    }

    /// Cuts (both ways) every link between `node`'s region and the others.
    pub fn partition(&self, node: u64, cut: bool) {
        for ((a, b), p) in self.links() {
            if *a == node || *b == node {
                p.ctl.set_cut(cut);
            }
        }
    }

    /// Cuts (both ways) `node`'s links to the other nodes only: routers in
    /// other regions still reach it, and its region's router the others.
    pub fn cut_node_links(&self, node: u64, cut: bool) {
        for ((a, b), p) in &self.proxies {
            if *a == node || *b == node {
                p.ctl.set_cut(cut);
            }
        }
    }

    /// `node`'s region can no longer reach the others; they still reach it.
    fn one_way(&self, node: u64, on: bool) {
        for ((a, b), p) in self.links() {
            if *a == node {
                p.ctl.stall_up.store(on, Ordering::SeqCst);
            }
            if *b == node {
                p.ctl.stall_down.store(on, Ordering::SeqCst);
            }
        }
    }

    async fn leader_of_busy_shard(&self) -> Option<u64> {
        self.nodes.leader_of(self.nodes.shard_of(1).0).await
    }

    /// Runs one fault for `hold`, then repairs it.
    pub async fn inject(
        &mut self,
        fault: Fault,
        rng: &mut rand::rngs::StdRng,
        hold: Duration,
        log: &mut Vec<String>,
    ) {
        let node = rng.random_range(1..=3u64);
        match fault {
            Fault::KillNode => {
                log.push(format!(
                    "SIGKILL node {node} (its whole region) for {hold:?}"
                ));
                self.procs.kill_node(node);
                tokio::time::sleep(hold).await;
                self.procs.start_node(node);
            }
            Fault::KillLeaderOfBusyShard => {
                let leader = self.leader_of_busy_shard().await.unwrap_or(node);
                log.push(format!(
                    "SIGKILL node {leader}, leader of the busiest shard, for {hold:?}"
                ));
                self.procs.kill_node(leader);
                tokio::time::sleep(hold).await;
                self.procs.start_node(leader);
            }
            Fault::PauseNode => {
                log.push(format!("SIGSTOP node {node} for {hold:?}"));
                self.procs.pause_node(node, true);
                tokio::time::sleep(hold).await;
                self.procs.pause_node(node, false);
            }
            Fault::PartitionRegion => {
                log.push(format!(
                    "partition node {node} from the other regions for {hold:?}"
                ));
                self.partition(node, true);
                tokio::time::sleep(hold).await;
                self.partition(node, false);
            }
            Fault::OneWayPartition => {
                log.push(format!(
                    "one-way partition: node {node} cannot reach the others for {hold:?}"
                ));
                self.one_way(node, true);
                tokio::time::sleep(hold).await;
                self.one_way(node, false);
            }
            Fault::RestartRouter => {
                let region = REGIONS[rng.random_range(0..3)];
                log.push(format!("restart router {region}"));
                self.procs.kill_router(region);
                tokio::time::sleep(hold / 4).await;
                self.procs.start_router(region);
            }
        }
    }
}

/// A proxy from node `a`'s region to each other node, into `proxies` by
/// `(a, b)`; the arguments (`flag ID=ADDR`) that send a process through them.
async fn links_from(
    config: &chatstore::cluster::ClusterConfig,
    a: u64,
    flag: &str,
    proxies: &mut BTreeMap<(u64, u64), Proxy>,
) -> Vec<String> {
    let mut args = Vec::new();
    for b in (1..=3u64).filter(|b| *b != a) {
        let target = config
            .node(chatstore::types::NodeId(b))
            .unwrap()
            .raft_addr
            .clone();
        let p = Proxy::start(target).await;
        args.push(flag.to_string());
        args.push(format!("{b}={}", p.addr));
        proxies.insert((a, b), p);
    }
    args
}

/// Simulated round trips of the chaos cluster: eu/us, us/ap, eu/ap.
pub const RTT_MS: (u64, u64, u64) = (10, 16, 20);

fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

async fn connect(routers: &[String], i: usize) -> Option<ChatStoreClient<Channel>> {
    let addr = &routers[i % routers.len()];
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1));
    ep.connect().await.ok().map(ChatStoreClient::new)
}

/// One client session: sends, alone and in batches (retrying with the same
/// client_msg_id), edits and deletes its own messages, marks chats read,
/// closes a chat for a moment, SESSION reads with its token (checked for
/// read-your-writes and monotonicity as it goes), LINEARIZABLE reads.
pub async fn run_session(
    session: usize,
    seed: u64,
    routers: Vec<String>,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (0x5e55 + session as u64));
    let sender = 1000 + session as u64;
    let mut token = bytes::Bytes::new();
    let mut my_msgs: Vec<(u64, u64)> = Vec::new();
    // How far this session has marked each chat read, acknowledged.
    let mut marked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut seen_pts: BTreeMap<u64, u64> = BTreeMap::new();
    let mut n = 0u64;
    let mut api = None;
    while !stop.load(Ordering::Relaxed) {
        if api.is_none() {
            api = connect(&routers, rng.random_range(0..routers.len())).await;
            if api.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let chat = rng.random_range(1..=CHATS);
        let roll = rng.random_range(0..100);
        let invoke = Instant::now();
        if roll == 88 {
            close_for_a_moment(
                chat,
                &mut api,
                (&routers, &mut rng),
                &mut token,
                (&history, session),
            )
            .await;
            continue;
        }
        if (50..60).contains(&roll) {
            let Some(c) = api.as_mut() else { continue };
            let first = n + 1;
            n += rng.random_range(2..=4);
            let sends: Vec<(u64, u64, String)> = (first..=n)
                .map(|i| {
                    let chat = rng.random_range(1..=CHATS);
                    (
                        chat,
                        (session as u64 + 1) * 1_000_000 + i,
                        format!("s{session}-{i}"),
                    )
                })
                .collect();
            let outcomes = send_batch(
                c,
                sender,
                &sends,
                (&mut token, &mut seen_pts),
                (&history, session),
            )
            .await;
            if outcomes.iter().any(|o| matches!(o, Outcome::Unknown)) {
                api = None;
            }
            for ((chat, cmid, body), outcome) in sends.into_iter().zip(outcomes) {
                if let Outcome::Ok(seq) = outcome {
                    my_msgs.push((chat, seq));
                }
                let kind = OpKind::Send {
                    chat,
                    cmid,
                    sender,
                    body,
                    outcome,
                };
                record(&history, session, invoke, kind);
            }
            continue;
        }
        let kind = if roll < 60 {
            n += 1;
            let cmid = (session as u64 + 1) * 1_000_000 + n;
            let body = format!("s{session}-{n}");
            // Some messages self-destruct a second or two after they are
            // sent: every replica must remove them, and no other.
            let destruct_secs = match roll < 6 {
                true => rng.random_range(1..=2),
                false => 0,
            };
            if destruct_secs > 0 {
                history
                    .self_destructing
                    .lock()
                    .unwrap()
                    .asked
                    .insert((chat, cmid));
            }
            let req = pb::SendRequest {
                chat_id: chat,
                sender_id: sender,
                client_msg_id: cmid,
                body: body.clone().into_bytes().into(),
                min_token: token.clone(),
                self_destruct: (destruct_secs > 0).then_some(pb::SelfDestructPolicy {
                    policy: Some(pb::self_destruct_policy::Policy::AfterSendSecs(
                        destruct_secs,
                    )),
                }),
            };
            // A frontend retries an ambiguous failure once, with the same id.
            let mut outcome = Outcome::Unknown;
            for _ in 0..2 {
                let Some(c) = api.as_mut() else { break };
                match tokio::time::timeout(Duration::from_secs(15), c.send(req.clone())).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        token = r.read_token.clone();
                        // Edits, deletes and read marks go to messages
                        // that stay.
                        if destruct_secs == 0 {
                            my_msgs.push((chat, r.seq));
                        }
                        let e = seen_pts.entry(chat).or_default();
                        *e = (*e).max(r.pts);
                        outcome = Outcome::Ok(r.seq);
                        break;
                    }
                    Ok(Err(s)) if !transient(s.code()) => {
                        history.refused(session, &format!("send {chat}/{cmid}"), &s);
                        outcome = Outcome::Failed;
                        break;
                    }
                    _ => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        api = connect(&routers, rng.random_range(0..routers.len())).await;
                    }
                }
            }
            if destruct_secs > 0 {
                let due = Instant::now() + Duration::from_secs(destruct_secs.into());
                let mut sd = history.self_destructing.lock().unwrap();
                sd.due = sd.due.max(Some(due));
            }
            OpKind::Send {
                chat,
                cmid,
                sender,
                body,
                outcome,
            }
        } else if roll < 68 && !my_msgs.is_empty() {
            let (chat, seq) = my_msgs[rng.random_range(0..my_msgs.len())];
            let body = format!("edit-{session}-{}", rng.random::<u32>());
            let r = tokio::time::timeout(
                Duration::from_secs(15),
                api.as_mut().unwrap().edit(pb::EditRequest {
                    chat_id: chat,
                    seq,
                    editor_id: sender,
                    body: body.clone().into_bytes().into(),
                    min_token: token.clone(),
                    // The router picks one, which covers its own retries.
                    client_edit_id: 0,
                }),
            )
            .await;
            let what = format!("edit {chat}/{seq}");
            let outcome = write_outcome(r, &mut token, &mut api, (&history, session, &what));
            OpKind::Edit {
                chat,
                seq,
                body,
                outcome,
            }
        } else if roll < 72 && !my_msgs.is_empty() {
            let (chat, seq) = my_msgs.swap_remove(rng.random_range(0..my_msgs.len()));
            let r = tokio::time::timeout(
                Duration::from_secs(15),
                api.as_mut().unwrap().delete(pb::DeleteRequest {
                    chat_id: chat,
                    seq,
                    requester_id: sender,
                    min_token: token.clone(),
                }),
            )
            .await;
            let what = format!("delete {chat}/{seq}");
            let outcome = write_outcome(r, &mut token, &mut api, (&history, session, &what));
            OpKind::Delete { chat, seq, outcome }
        } else if roll < 76 && !my_msgs.is_empty() {
            // Up to one of its own messages: a seq the chat has.
            let (chat, up_to) = my_msgs[rng.random_range(0..my_msgs.len())];
            let r = tokio::time::timeout(
                Duration::from_secs(15),
                api.as_mut().unwrap().mark_read(pb::MarkReadRequest {
                    chat_id: chat,
                    reader_id: sender,
                    up_to_seq: up_to,
                    min_token: token.clone(),
                }),
            )
            .await;
            let what = format!("mark read {chat} up to {up_to}");
            let outcome = write_outcome(r, &mut token, &mut api, (&history, session, &what));
            if let Outcome::Ok(()) = outcome {
                let e = marked.entry(chat).or_default();
                *e = (*e).max(up_to);
            }
            OpKind::MarkRead {
                chat,
                reader: sender,
                up_to,
                outcome,
            }
        } else if roll < 88 {
            // SESSION read: sees this session's writes, never goes back.
            let r = tokio::time::timeout(
                Duration::from_secs(15),
                api.as_mut().unwrap().get_chat(pb::GetChatRequest {
                    chat_id: chat,
                    consistency: Consistency::Session as i32,
                    min_token: token.clone(),
                }),
            )
            .await;
            match r {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    let prev = seen_pts.get(&chat).copied().unwrap_or(0);
                    if r.pts < prev {
                        history.online_violations.lock().unwrap().push(format!(
                            "session {session}: SESSION read of chat {chat} returned pts {} after it had seen pts {prev}",
                            r.pts
                        ));
                    }
                    seen_pts.insert(chat, prev.max(r.pts));
                    let mine = marked.get(&chat).copied().unwrap_or(0);
                    let cursor = r
                        .read_cursors
                        .iter()
                        .find(|c| c.reader_id == sender)
                        .map_or(0, |c| c.seq);
                    if cursor < mine {
                        history.online_violations.lock().unwrap().push(format!(
                            "session {session}: SESSION read of chat {chat} shows it read up to \
                             {cursor} after it marked it read up to {mine}"
                        ));
                    }
                    token = r.read_token;
                }
                Ok(Err(s)) if transient(s.code()) => api = None,
                Ok(Err(s)) => history.refused(session, &format!("SESSION read of {chat}"), &s),
                Err(_) => api = None,
            }
            continue;
        } else {
            let r = tokio::time::timeout(
                Duration::from_secs(15),
                api.as_mut().unwrap().get_chat(pb::GetChatRequest {
                    chat_id: chat,
                    consistency: Consistency::Linearizable as i32,
                    min_token: Default::default(),
                }),
            )
            .await;
            let last_seq = match r {
                Ok(Ok(r)) => Some(r.into_inner().last_seq),
                Ok(Err(s)) if transient(s.code()) => {
                    api = None;
                    None
                }
                Ok(Err(s)) => {
                    history.refused(session, &format!("LINEARIZABLE read of {chat}"), &s);
                    None
                }
                Err(_) => None,
            };
            OpKind::LinRead { chat, last_seq }
        };
        record(&history, session, invoke, kind);
    }
}

/// Sends `sends` (chat, client_msg_id, body) in one `SendBatch`, and once
/// more (the same ids) those whose outcome the first call left unknown, as a
/// frontend does. The outcome of each send, in order. The session's token
/// and the pts it must see move on when a response carries the batch's
/// token.
async fn send_batch(
    api: &mut ChatStoreClient<Channel>,
    sender: u64,
    sends: &[(u64, u64, String)],
    (token, seen_pts): (&mut bytes::Bytes, &mut BTreeMap<u64, u64>),
    (history, session): (&History, usize),
) -> Vec<Outcome<u64>> {
    let mut outcomes = vec![Outcome::Unknown; sends.len()];
    for _ in 0..2 {
        let pending: Vec<usize> = (0..sends.len())
            .filter(|i| matches!(outcomes[*i], Outcome::Unknown))
            .collect();
        if pending.is_empty() {
            break;
        }
        let req = pb::SendBatchRequest {
            sends: pending
                .iter()
                .map(|&i| pb::SendRequest {
                    chat_id: sends[i].0,
                    sender_id: sender,
                    client_msg_id: sends[i].1,
                    body: sends[i].2.clone().into_bytes().into(),
                    min_token: token.clone(),
                    ..Default::default()
                })
                .collect(),
        };
        let r = match tokio::time::timeout(Duration::from_secs(15), api.send_batch(req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) if !transient(s.code()) => {
                history.refused(session, "send batch", &s);
                for &i in &pending {
                    outcomes[i] = Outcome::Failed;
                }
                break;
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if r.outcomes.len() != pending.len() {
            history.online_violations.lock().unwrap().push(format!(
                "session {session}: a batch of {} sends got {} outcomes",
                pending.len(),
                r.outcomes.len()
            ));
            break;
        }
        let covered = !r.read_token.is_empty();
        if covered {
            *token = r.read_token;
        }
        for (&i, o) in pending.iter().zip(r.outcomes) {
            let (chat, cmid, _) = &sends[i];
            match (o.sent, Code::from_i32(o.error_code)) {
                (Some(sent), _) => {
                    if covered {
                        let e = seen_pts.entry(*chat).or_default();
                        *e = (*e).max(sent.pts);
                    }
                    outcomes[i] = Outcome::Ok(sent.seq);
                }
                (None, code) if transient(code) => {}
                (None, code) => {
                    history.refused(
                        session,
                        &format!("batched send {chat}/{cmid}"),
                        &tonic::Status::new(code, o.error_message),
                    );
                    outcomes[i] = Outcome::Failed;
                }
            }
        }
    }
    outcomes
}

/// Closes `chat`, and after a moment reopens it (trying until a reopen is
/// acknowledged, within bounds, so the chat takes writes again). The
/// session's other writes into it meanwhile are refused.
async fn close_for_a_moment(
    chat: u64,
    api: &mut Option<ChatStoreClient<Channel>>,
    (routers, rng): (&[String], &mut rand::rngs::StdRng),
    token: &mut bytes::Bytes,
    (history, session): (&History, usize),
) {
    let Some(c) = api.as_mut() else { return };
    let invoke = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        c.close_chat(pb::CloseChatRequest {
            chat_id: chat,
            reason: "chaos".into(),
            min_token: token.clone(),
        }),
    )
    .await;
    let what = format!("close {chat}");
    let outcome = write_outcome(r, token, api, (history, session, &what));
    record(history, session, invoke, OpKind::Close { chat, outcome });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..20 {
        if api.is_none() {
            *api = connect(routers, rng.random_range(0..routers.len())).await;
        }
        let Some(c) = api.as_mut() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let invoke = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(15),
            c.reopen_chat(pb::ReopenChatRequest {
                chat_id: chat,
                min_token: token.clone(),
            }),
        )
        .await;
        let what = format!("reopen {chat}");
        let outcome = write_outcome(r, token, api, (history, session, &what));
        let done = !matches!(outcome, Outcome::Unknown);
        record(history, session, invoke, OpKind::Reopen { chat, outcome });
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The outcome of an edit or delete: a transient failure is unknown (it
/// may have been applied) and drops the connection for a fresh one.
fn write_outcome(
    r: Result<
        Result<tonic::Response<pb::WriteResponse>, tonic::Status>,
        tokio::time::error::Elapsed,
    >,
    token: &mut bytes::Bytes,
    api: &mut Option<ChatStoreClient<Channel>>,
    (history, session, what): (&History, usize, &str),
) -> Outcome<()> {
    match r {
        Ok(Ok(r)) => {
            *token = r.into_inner().read_token;
            Outcome::Ok(())
        }
        Ok(Err(s)) if !transient(s.code()) => {
            history.refused(session, what, &s);
            Outcome::Failed
        }
        _ => {
            *api = None;
            Outcome::Unknown
        }
    }
}

fn record(history: &History, session: usize, invoke: Instant, kind: OpKind) {
    history.ops.lock().unwrap().push(Op {
        session,
        invoke,
        complete: Instant::now(),
        kind,
    });
}

/// Watchers a chaos run keeps, each on chats 1-3. Watchers 0 and 1 start
/// on the same router, so its streams share their chats' polls.
const WATCHERS: usize = 3;

/// Waits until every watcher has each watched chat's pts as a LINEARIZABLE
/// read gives it now; the chats some watcher is still behind on after
/// `within`, as findings.
async fn watchers_catch_up(routers: &[String], history: &History, within: Duration) -> Vec<String> {
    let started = Instant::now();
    let mut want: BTreeMap<u64, u64> = BTreeMap::new();
    let mut attempt = 0;
    while want.len() < 3 && started.elapsed() < within {
        attempt += 1;
        let Some(mut api) = connect(routers, attempt).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        for chat in 1..=3u64 {
            if want.contains_key(&chat) {
                continue;
            }
            let r = api
                .get_chat(pb::GetChatRequest {
                    chat_id: chat,
                    consistency: Consistency::Linearizable as i32,
                    min_token: Default::default(),
                })
                .await;
            if let Ok(r) = r {
                want.insert(chat, r.into_inner().pts);
            }
        }
    }
    loop {
        let behind: Vec<String> = {
            let got = history.watcher_pts.lock().unwrap();
            (0..WATCHERS)
                .flat_map(|w| want.iter().map(move |(c, p)| (w, *c, *p)))
                .filter(|(w, c, p)| got.get(&(*w, *c)).copied().unwrap_or(0) < *p)
                .map(|(w, c, p)| {
                    format!(
                        "watcher {w} is behind on chat {c}: pts {} of {p} after {within:?}",
                        got.get(&(w, c)).copied().unwrap_or(0)
                    )
                })
                .collect()
        };
        if behind.is_empty() {
            if want.len() < 3 {
                return vec![format!(
                    "no LINEARIZABLE read of chats 1-3 within {within:?}"
                )];
            }
            return behind;
        }
        if started.elapsed() >= within {
            return behind;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Watches a few chats, reconnecting from the last pts it got; checks that
/// pts arrive in order with no gap and no repeat.
pub async fn run_watcher(
    id: usize,
    routers: Vec<String>,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    let chats: Vec<u64> = (1..=3).collect();
    let mut last: BTreeMap<u64, u64> = chats.iter().map(|c| (*c, 0)).collect();
    let mut attempt = id / 2 * 2;
    while !stop.load(Ordering::Relaxed) {
        attempt += 1;
        let Some(mut api) = connect(&routers, attempt).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let cursors = cursors_at(&last);
        let Ok(stream) = api.watch(pb::WatchRequest { cursors }).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        while !stop.load(Ordering::Relaxed) {
            let ev = match tokio::time::timeout(Duration::from_secs(2), stream.message()).await {
                Ok(Ok(Some(ev))) => ev,
                Err(_) => continue,
                _ => break,
            };
            let prev = last.get(&ev.chat_id).copied().unwrap_or(0);
            // After a reset (collection dropped changes after this cursor),
            // a watcher goes on from the chat's pts, as a device does after
            // re-reading history.
            let violation = match ev.reset_required {
                true if ev.pts < prev => Some("reset back to"),
                true => None,
                false if ev.pts != prev + 1 => Some("went (gap or repeat) to"),
                false => None,
            };
            if let Some(what) = violation {
                history.online_violations.lock().unwrap().push(format!(
                    "watcher {id}: chat {} from pts {prev} {what} pts {}",
                    ev.chat_id, ev.pts
                ));
            }
            last.insert(ev.chat_id, ev.pts);
            history
                .watcher_pts
                .lock()
                .unwrap()
                .insert((id, ev.chat_id), ev.pts);
            if ev.reset_required {
                *history.resets.lock().unwrap() += 1;
                continue;
            }
            *history.watch_events.lock().unwrap() += 1;
            if let Some(change) = ev.change {
                history.watched.lock().unwrap().push(Watched {
                    watcher: id,
                    chat: ev.chat_id,
                    pts: ev.pts,
                    kind: change.kind,
                    seq: change.seq,
                    user: change.user_id,
                    message: change.message.map(|m| (m.sender_id, m.client_msg_id)),
                });
            }
        }
    }
}

/// A reader's cursors, from its pts per chat.
fn cursors_at(pts: &BTreeMap<u64, u64>) -> Vec<pb::Cursor> {
    pts.iter()
        .map(|(chat, pts)| pb::Cursor {
            chat_id: *chat,
            pts: *pts,
        })
        .collect()
}

/// Device readers a chaos run keeps, each on chats 1-4.
const DEVICES: usize = 2;

/// A device that catches up with GetDifference, as a phone does after being
/// offline: small pages, its read token carried from answer to request
/// (SESSION), and now and then a cursor moved back to an older pts (a device
/// restored from a backup), which under a short change retention lands
/// among the changes that collection is dropping. Checks that an answer
/// goes on from its cursor without a gap, and records every change for the
/// checker's comparison with what the other readers were told.
pub async fn run_device(
    id: usize,
    seed: u64,
    routers: Vec<String>,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    let reader = 100 + id;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (0xde71ce + id as u64));
    let mut cursors: BTreeMap<u64, u64> = (1..=4).map(|c| (c, 0)).collect();
    let mut token = bytes::Bytes::new();
    let mut api = None;
    let mut attempt = id;
    while !stop.load(Ordering::Relaxed) {
        if api.is_none() {
            attempt += 1;
            api = connect(&routers, attempt).await;
            if api.is_none() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        if rng.random_range(0..10) == 0 {
            let chat = rng.random_range(1..=4);
            let at = cursors[&chat];
            cursors.insert(chat, rng.random_range(0..=at));
        }
        let request = pb::GetDifferenceRequest {
            cursors: cursors_at(&cursors),
            limit: rng.random_range(1..=30),
            consistency: Consistency::Session as i32,
            min_token: token.clone(),
        };
        let call = api.as_mut().unwrap().get_difference(request);
        let answer = match tokio::time::timeout(Duration::from_secs(15), call).await {
            Ok(Ok(a)) => a.into_inner(),
            Ok(Err(s)) if transient(s.code()) => {
                api = None;
                continue;
            }
            Ok(Err(s)) => {
                history.refusals.lock().unwrap().push(format!(
                    "device {id}: GetDifference refused: {:?}: {}",
                    s.code(),
                    s.message()
                ));
                continue;
            }
            Err(_) => {
                api = None;
                continue;
            }
        };
        *history.differences.lock().unwrap() += 1;
        token = answer.read_token;
        for d in answer.chats {
            let Some(from) = cursors.get(&d.chat_id).copied() else {
                history.online_violations.lock().unwrap().push(format!(
                    "device {id}: GetDifference answered chat {}, which it did not ask for",
                    d.chat_id
                ));
                continue;
            };
            if d.reset_required {
                *history.resets.lock().unwrap() += 1;
                if !d.changes.is_empty() || d.pts < from {
                    history.online_violations.lock().unwrap().push(format!(
                        "device {id}: chat {} reset from pts {from} to {} with {} changes",
                        d.chat_id,
                        d.pts,
                        d.changes.len()
                    ));
                }
                cursors.insert(d.chat_id, d.pts);
                continue;
            }
            let mut at = from;
            for c in &d.changes {
                if c.pts != at + 1 || c.chat_id != d.chat_id {
                    history.online_violations.lock().unwrap().push(format!(
                        "device {id}: chat {} from pts {from} went from pts {at} to {} (chat {})",
                        d.chat_id, c.pts, c.chat_id
                    ));
                }
                at = c.pts;
                history.watched.lock().unwrap().push(Watched {
                    watcher: reader,
                    chat: d.chat_id,
                    pts: c.pts,
                    kind: c.kind,
                    seq: c.seq,
                    user: c.user_id,
                    message: c.message.as_ref().map(|m| (m.sender_id, m.client_msg_id)),
                });
            }
            if d.pts != at {
                history.online_violations.lock().unwrap().push(format!(
                    "device {id}: chat {} from pts {from} answered pts {} after its last change at {at}",
                    d.chat_id, d.pts
                ));
            }
            cursors.insert(d.chat_id, d.pts);
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..80))).await;
    }
}

/// Runs the workload under a seeded fault schedule for `secs`, heals, and
/// returns the checker's findings (empty = all promises kept).
pub async fn run(seed: u64, secs: u64, name: &str) -> (Vec<String>, Chaos) {
    run_with(seed, secs, name, None).await
}

/// [`run`] with a change retention (see [`Chaos::start_with`]).
pub async fn run_with(
    seed: u64,
    secs: u64,
    name: &str,
    change_retention_secs: Option<u64>,
) -> (Vec<String>, Chaos) {
    eprintln!(
        "chaos seed = {seed}, change retention {change_retention_secs:?} s (replay: make chaos \
         SEED={seed} DURATION={secs}{})",
        change_retention_secs.map_or(String::new(), |r| format!(" RETENTION={r}"))
    );
    let mut chaos = Chaos::start_with(seed, name, change_retention_secs).await;
    let history = Arc::new(History::default());
    let stop = Arc::new(AtomicBool::new(false));
    let routers: Vec<String> = chaos.routers.values().cloned().collect();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..6 {
        tasks.spawn(run_session(
            s,
            seed,
            routers.clone(),
            history.clone(),
            stop.clone(),
        ));
    }
    for d in 0..DEVICES {
        tasks.spawn(run_device(
            d,
            seed,
            routers.clone(),
            history.clone(),
            stop.clone(),
        ));
    }
    // Watchers stop after the sessions, once they caught up (below).
    let watchers_stop = Arc::new(AtomicBool::new(false));
    let mut watchers = tokio::task::JoinSet::new();
    for w in 0..WATCHERS {
        watchers.spawn(run_watcher(
            w,
            routers.clone(),
            history.clone(),
            watchers_stop.clone(),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut faults = ALL_FAULTS.to_vec();
    // Every run covers every fault kind, in a seeded order, then repeats.
    for i in (1..faults.len()).rev() {
        faults.swap(i, rng.random_range(0..=i));
    }
    let started = Instant::now();
    let mut log = Vec::new();
    let mut k = 0;
    while started.elapsed() < Duration::from_secs(secs) || k < faults.len() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
        let fault = faults[k % faults.len()];
        k += 1;
        // Long enough for the next replica in line to campaign and win
        // (its lease, then its election timeout, then a vote: about 2.5-3 s
        // with the test timings): a shorter fault is only a stall.
        let hold = Duration::from_millis(rng.random_range(3000..5000));
        let t = started.elapsed();
        chaos.inject(fault, &mut rng, hold, &mut log).await;
        eprintln!("t={t:.1?}: {}", log.last().unwrap());
    }
    chaos.heal_network();
    // Let the workload run a little on the healed cluster, then stop it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(60), drain)
        .await
        .is_err()
    {
        panic!("workload did not stop within 60 s");
    }
    // Every chat takes a write again once the network is whole: a shard
    // left without a writable leader agrees with itself on every replica,
    // so the final comparison would not see it.
    let stuck = writes_resume(&routers, &history, Duration::from_secs(30)).await;
    // Every watcher reaches each watched chat's final pts: one starved on
    // a replica that applies nothing, or dropped by a fault for good,
    // would otherwise go unnoticed.
    let behind = watchers_catch_up(&routers, &history, Duration::from_secs(30)).await;
    watchers_stop.store(true, Ordering::Relaxed);
    while watchers.join_next().await.is_some() {}
    let mut findings = check(&chaos, &history).await;
    // A run three retentions long has collected many times over, and the
    // devices moved their cursors back into what it dropped.
    let collected_for_sure = change_retention_secs.is_some_and(|r| r.saturating_mul(3) <= secs);
    if collected_for_sure && *history.resets.lock().unwrap() == 0 {
        findings.push(
            "no reader was told to reset: change collection dropped nothing it read".to_string(),
        );
    }
    findings.extend(stuck);
    findings.extend(behind);
    findings.extend(panics_logged(&chaos.procs.log_dir));
    // Keep the history next to the data folders.
    if let Ok(mut f) = std::fs::File::create(chaos.dir.path.join("history.txt")) {
        let _ = writeln!(f, "seed {seed}\nfaults:\n{}", log.join("\n"));
        for op in history.ops.lock().unwrap().iter() {
            let _ = writeln!(
                f,
                "{:?} +{:?} session {} {:?}",
                op.invoke.duration_since(started),
                op.complete.duration_since(op.invoke),
                op.session,
                op.kind
            );
        }
    }
    (findings, chaos)
}

/// Waits until every self-destructing message whose send was acknowledged
/// has an EXPIRE change in the change log of every replica in `hosts`, for
/// at most `within` after the last timer ran out; a finding for each one
/// still not removed then. (Reads hide such a message once its time comes;
/// the leaders' chores remove it, every 500 ms, by a Raft command.)
async fn self_destructed(
    nodes: &Client,
    hosts: &BTreeMap<u64, Vec<u64>>,
    history: &History,
    within: Duration,
) -> Vec<String> {
    let SelfDestructing { asked, due } = history.self_destructing.lock().unwrap().clone();
    let Some(due) = due else {
        return Vec::new();
    };
    // (chat, client_msg_id, seq, sender) of each acknowledged one.
    let acked: Vec<(u64, u64, u64, u64)> = history
        .ops
        .lock()
        .unwrap()
        .iter()
        .filter_map(|op| match op.kind {
            OpKind::Send {
                chat,
                cmid,
                sender,
                outcome: Outcome::Ok(seq),
                ..
            } if asked.contains(&(chat, cmid)) => Some((chat, cmid, seq, sender)),
            _ => None,
        })
        .collect();
    eprintln!(
        "self-destructing sends: {} asked, {} acknowledged",
        asked.len(),
        acked.len()
    );
    tokio::time::sleep_until(due.into()).await;
    let deadline = Instant::now() + within;
    loop {
        // Findings that waiting cannot change, and those it may.
        let (mut lost, mut left) = (Vec::new(), Vec::new());
        let chats: BTreeSet<u64> = acked.iter().map(|(chat, ..)| *chat).collect();
        for chat in chats {
            let shard = nodes.shard_of(chat).0;
            let on = hosts.get(&shard).map(Vec::as_slice).unwrap_or_default();
            if on.is_empty() {
                left.push(format!("no node hosts chat {chat}"));
            }
            for &node in on {
                let read = async {
                    let last_seq = nodes.chat_on(node, chat).await?.last_seq;
                    let log = nodes.changes_on(node, chat).await?;
                    let held: BTreeMap<u64, u64> = nodes
                        .history_on(node, chat)
                        .await?
                        .iter()
                        .map(|m| (m.seq, m.client_msg_id))
                        .collect();
                    Ok::<_, tonic::Status>((last_seq, log, held))
                };
                let (last_seq, log, held) = match read.await {
                    Ok(r) => r,
                    Err(e) => {
                        left.push(format!("chat {chat} on node {node}: {e}"));
                        continue;
                    }
                };
                for (c, cmid, seq, sender) in acked.iter().filter(|(c, ..)| *c == chat) {
                    // Expiry does not say which message it removed: the
                    // seq's sender tells most others apart (each session
                    // sends as its own user), the history's seqs the rest.
                    let sent_by = log.sent_by.get(seq);
                    if *seq == 0 || *seq > last_seq {
                        lost.push(format!(
                            "LOST: acknowledged self-destructing send {c}/{cmid} (seq {seq}) \
                             was never stored on node {node} (its last seq is {last_seq})"
                        ));
                    } else if let Some(other) = held.get(seq).filter(|other| *other != cmid) {
                        lost.push(format!(
                            "LOST: acknowledged self-destructing send {c}/{cmid} (seq {seq}): \
                             node {node} holds {other} at that seq"
                        ));
                    } else if sent_by.is_none() && log.read_from > 0 {
                        // Its send's change, and so its expiry's, may be
                        // among those collection dropped: the message no
                        // longer shows, and no change says more.
                    } else if sent_by != Some(sender) {
                        lost.push(format!(
                            "LOST: acknowledged self-destructing send {c}/{cmid} (seq {seq}) from \
                             {sender}: node {node}'s change log has that seq sent by {sent_by:?}"
                        ));
                    } else if !log.expired.contains(seq) {
                        left.push(format!(
                            "self-destructing message {c}/{cmid} (seq {seq}) was not removed \
                             from node {node} within {within:?} after its timer ran out"
                        ));
                    }
                }
            }
        }
        if left.is_empty() || Instant::now() >= deadline {
            lost.extend(left);
            return lost;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One acknowledged send into each chat through the routers, each within
/// `within` (retrying refusals that say to retry); the chats that took none.
/// The sends join the history, for the checker.
async fn writes_resume(routers: &[String], history: &History, within: Duration) -> Vec<String> {
    const SENDER: u64 = 999;
    let mut stuck = Vec::new();
    for chat in 1..=CHATS {
        let cmid = 900_000_000 + chat;
        let body = format!("after-heal-{chat}");
        let req = pb::SendRequest {
            chat_id: chat,
            sender_id: SENDER,
            client_msg_id: cmid,
            body: body.clone().into_bytes().into(),
            ..Default::default()
        };
        let invoke = Instant::now();
        let mut outcome = Outcome::Unknown;
        let mut last = String::new();
        for attempt in 0..1_000usize {
            if invoke.elapsed() >= within {
                break;
            }
            let Some(mut api) = connect(routers, attempt).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(10), api.send(req.clone())).await {
                Ok(Ok(r)) => {
                    outcome = Outcome::Ok(r.into_inner().seq);
                    break;
                }
                Ok(Err(s)) if !transient(s.code()) => {
                    last = s.to_string();
                    outcome = Outcome::Failed;
                    break;
                }
                Ok(Err(s)) => last = s.to_string(),
                Err(_) => last = "no answer in 10 s".to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !matches!(outcome, Outcome::Ok(_)) {
            stuck.push(format!(
                "chat {chat} took no write within {within:?} after the network healed: {last}"
            ));
        }
        history.ops.lock().unwrap().push(Op {
            session: usize::MAX,
            invoke,
            complete: Instant::now(),
            kind: OpKind::Send {
                chat,
                cmid,
                sender: SENDER,
                body,
                outcome,
            },
        });
    }
    stuck
}

/// Every panic a process wrote to its log under `dir`: a panic in a task
/// (a chore, a handler) does not stop the process, and its callers see only
/// failed calls.
pub fn panics_logged(dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![format!("no process logs under {}", dir.display())];
    };
    for entry in entries.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("panicked at")) {
            found.push(format!("{}: {line}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// Whether a chat is closed, and its readers' cursors.
type ChatState = (bool, BTreeMap<u64, u64>);

/// Chat records: every replica of a chat has the same read cursors and is
/// open or closed alike. Each reader's cursor is the furthest `MarkRead`
/// that took effect: at least its furthest acknowledged one, and one it
/// sent (acknowledged or unknown). (A `MarkRead` over delete-after-read
/// messages may stop part-way; the workload sends none.) A chat whose last
/// close or reopen is an acknowledged reopen, begun after every close had
/// returned, is open.
async fn check_chat_records(
    nodes: &Client,
    hosts: &BTreeMap<u64, Vec<u64>>,
    ops: &[Op],
) -> Vec<String> {
    let mut bad = Vec::new();
    let mut sent: BTreeMap<(u64, u64), (u64, BTreeSet<u64>)> = BTreeMap::new();
    for op in ops {
        if let OpKind::MarkRead {
            chat,
            reader,
            up_to,
            outcome,
        } = &op.kind
        {
            let (acked, possible) = sent.entry((*chat, *reader)).or_default();
            match outcome {
                Outcome::Ok(()) => {
                    *acked = (*acked).max(*up_to);
                    possible.insert(*up_to);
                }
                Outcome::Unknown => {
                    possible.insert(*up_to);
                }
                Outcome::Failed => {}
            }
        }
    }
    let mut marks = 0;
    for chat in 1..=CHATS {
        let shard = nodes.shard_of(chat).0;
        // The first replica read: (node, (closed, reader -> cursor)).
        let mut first: Option<(u64, ChatState)> = None;
        for &node in hosts.get(&shard).map(Vec::as_slice).unwrap_or_default() {
            let record = match nodes.chat_on(node, chat).await {
                Ok(c) => (
                    c.closed,
                    c.read_cursors
                        .iter()
                        .map(|c| (c.reader_id, c.seq))
                        .collect(),
                ),
                Err(e) => {
                    bad.push(format!("read chat {chat}'s record on node {node}: {e}"));
                    continue;
                }
            };
            match &first {
                Some((n, r)) if *r != record => bad.push(format!(
                    "chat {chat}: node {node} has (closed, read cursors) {record:?}, node {n} {r:?}"
                )),
                Some(_) => {}
                None => first = Some((node, record)),
            }
        }
        let (closed, cursors) = first.map(|(_, r)| r).unwrap_or_default();
        // A close whose outcome is unknown may take effect at any time
        // after it began (held in a stalled link, say): it bounds nothing.
        let closes: Vec<&Op> = ops
            .iter()
            .filter(|o| {
                matches!(o.kind, OpKind::Close { chat: c, ref outcome }
                    if c == chat && !matches!(outcome, Outcome::Failed))
            })
            .collect();
        let unknown_close = closes.iter().any(|o| {
            matches!(
                o.kind,
                OpKind::Close {
                    outcome: Outcome::Unknown,
                    ..
                }
            )
        });
        let last_close = closes.iter().map(|o| o.complete).max();
        let last = ops
            .iter()
            .filter(|o| {
                matches!(o.kind, OpKind::Close { chat: c, .. } | OpKind::Reopen { chat: c, .. }
                    if c == chat)
            })
            .max_by_key(|o| o.invoke);
        if let Some(op) = last {
            let reopened = matches!(
                op.kind,
                OpKind::Reopen {
                    outcome: Outcome::Ok(()),
                    ..
                }
            ) && !unknown_close
                && last_close.is_none_or(|t| t < op.invoke);
            if reopened && closed {
                bad.push(format!(
                    "chat {chat} is closed, but its last reopen was acknowledged after every close"
                ));
            }
        }
        for ((c, reader), (acked, possible)) in sent.range((chat, 0)..=(chat, u64::MAX)) {
            let at = cursors.get(reader).copied().unwrap_or(0);
            marks += 1;
            if at < *acked || (at > 0 && !possible.contains(&at)) {
                bad.push(format!(
                    "chat {c}: reader {reader} read up to {at}; acknowledged up to {acked}, \
                     sent {possible:?}"
                ));
            }
        }
    }
    eprintln!("read cursors: {marks} (chat, reader) pairs checked");
    bad
}

/// Closes: a write refused because its chat was closed came while some
/// close may have been in force (one begun before the refusal returned, and
/// no acknowledged reopen sure to be after that close and before the write
/// began); an acknowledged send did not begin while a close was surely in
/// force (acknowledged before it began, with no reopen that may come
/// between). A close or reopen whose outcome is unknown may take effect any
/// time after it began (a stalled link delivers it late). Any other
/// refusal is already a finding.
fn check_closes(ops: &[Op]) -> Vec<String> {
    let mut bad = Vec::new();
    let of = |chat: u64, close: bool| -> Vec<&Op> {
        ops.iter()
            .filter(|o| match o.kind {
                OpKind::Close { chat: c, .. } => close && c == chat,
                OpKind::Reopen { chat: c, .. } => !close && c == chat,
                _ => false,
            })
            .collect()
    };
    let acked = |o: &Op| {
        matches!(
            o.kind,
            OpKind::Close {
                outcome: Outcome::Ok(()),
                ..
            } | OpKind::Reopen {
                outcome: Outcome::Ok(()),
                ..
            }
        )
    };
    let failed = |o: &Op| {
        matches!(
            o.kind,
            OpKind::Close {
                outcome: Outcome::Failed,
                ..
            } | OpKind::Reopen {
                outcome: Outcome::Failed,
                ..
            }
        )
    };
    for op in ops {
        let (chat, refused, sent) = match &op.kind {
            OpKind::Send { chat, outcome, .. } => (
                *chat,
                matches!(outcome, Outcome::Failed),
                matches!(outcome, Outcome::Ok(_)),
            ),
            OpKind::Edit { chat, outcome, .. }
            | OpKind::Delete { chat, outcome, .. }
            | OpKind::MarkRead { chat, outcome, .. } => {
                (*chat, matches!(outcome, Outcome::Failed), false)
            }
            _ => continue,
        };
        let (closes, reopens) = (of(chat, true), of(chat, false));
        if refused {
            let may_be_closed = closes.iter().any(|c| {
                !failed(c)
                    && c.invoke < op.complete
                    // A close of unknown outcome may take effect any time
                    // after it began: no reopen is sure to come after it.
                    && !(acked(c)
                        && reopens
                            .iter()
                            .any(|r| acked(r) && r.invoke > c.complete && r.complete < op.invoke))
            });
            if !may_be_closed {
                bad.push(format!(
                    "a write into chat {chat} was refused, with no close of the chat that could \
                     be in force: {:?}",
                    op.kind
                ));
            }
        }
        if sent {
            let surely_closed = closes.iter().any(|c| {
                acked(c)
                    && c.complete < op.invoke
                    // A reopen of unknown outcome may take effect any time
                    // after it began.
                    && !reopens.iter().any(|r| {
                        !failed(r)
                            && (!acked(r) || r.complete > c.invoke)
                            && r.invoke < op.complete
                    })
            });
            if surely_closed {
                bad.push(format!(
                    "a send into chat {chat} was acknowledged while a close was in force: {:?}",
                    op.kind
                ));
            }
        }
    }
    bad
}

/// The checker: history plus a final full read of every replica.
pub async fn check(chaos: &Chaos, history: &History) -> Vec<String> {
    check_on(&chaos.nodes, &[1, 2, 3], history).await
}

/// The checker over the replicas on `node_ids` (after membership changes,
/// the nodes that host each shard now).
pub async fn check_on(nodes: &Client, node_ids: &[u64], history: &History) -> Vec<String> {
    let mut bad: Vec<String> = history.online_violations.lock().unwrap().clone();
    bad.extend(history.refusals.lock().unwrap().iter().cloned());
    let ops = history.ops.lock().unwrap().clone();
    let acked_sends = ops
        .iter()
        .filter(|o| {
            matches!(
                o.kind,
                OpKind::Send {
                    outcome: Outcome::Ok(_),
                    ..
                }
            )
        })
        .count();
    let lin_reads = ops
        .iter()
        .filter(|o| {
            matches!(
                o.kind,
                OpKind::LinRead {
                    last_seq: Some(_),
                    ..
                }
            )
        })
        .count();
    eprintln!(
        "history: {} ops, {acked_sends} acknowledged sends, {lin_reads} linearizable reads, {} watch events, {} differences, {} resets",
        ops.len(),
        history.watch_events.lock().unwrap(),
        history.differences.lock().unwrap(),
        history.resets.lock().unwrap()
    );
    if acked_sends < 20 {
        bad.push(format!(
            "the workload made too little progress ({acked_sends} acknowledged sends)"
        ));
    }
    if let Err(e) = nodes
        .wait_converged(node_ids, Duration::from_secs(120))
        .await
    {
        bad.push(e);
        return bad;
    }
    let hosts = match nodes.hosts(node_ids).await {
        Ok(h) => h,
        Err(e) => {
            bad.push(e);
            return bad;
        }
    };
    bad.extend(self_destructed(nodes, &hosts, history, Duration::from_secs(30)).await);
    // The removals are Raft entries of their own.
    if let Err(e) = nodes
        .wait_converged(node_ids, Duration::from_secs(120))
        .await
    {
        bad.push(e);
        return bad;
    }
    let self_destructing = history.self_destructing.lock().unwrap().asked.clone();
    // Final state of every chat on every replica. Self-destructing messages
    // are left out: a read hides one by the replica's clock once its time
    // comes, so two reads a moment apart may differ (their removal is
    // checked above, and the replicas' digests cover it).
    let mut finals: BTreeMap<u64, Vec<Vec<pb::Message>>> = BTreeMap::new();
    // Each chat's last seq, as its first replica's record has it.
    let mut last_seqs: BTreeMap<u64, u64> = BTreeMap::new();
    for chat in 1..=CHATS {
        let shard = nodes.shard_of(chat).0;
        if let Some(&node) = hosts.get(&shard).and_then(|on| on.first()) {
            match nodes.chat_on(node, chat).await {
                Ok(c) => drop(last_seqs.insert(chat, c.last_seq)),
                Err(e) => bad.push(format!("read chat {chat}'s record on node {node}: {e}")),
            }
        }
        for &node in hosts.get(&shard).map(Vec::as_slice).unwrap_or_default() {
            match nodes.history_on(node, chat).await {
                Ok(mut h) => {
                    h.retain(|m| !self_destructing.contains(&(chat, m.client_msg_id)));
                    finals.entry(chat).or_default().push(h);
                }
                Err(e) => bad.push(format!("read chat {chat} on node {node}: {e}")),
            }
        }
    }
    // Per chat: the seqs of acknowledged self-destructing sends, and how
    // many such sends have no known seq (their outcome unknown).
    let mut destructed: BTreeMap<u64, (BTreeSet<u64>, usize)> = BTreeMap::new();
    // The seq each acknowledged self-destructing send was given.
    let mut destructed_seq: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for op in &ops {
        if let OpKind::Send {
            chat,
            cmid,
            ref outcome,
            ..
        } = op.kind
        {
            if self_destructing.contains(&(chat, cmid)) {
                let (seqs, unknown) = destructed.entry(chat).or_default();
                match outcome {
                    Outcome::Ok(seq) => {
                        seqs.insert(*seq);
                        destructed_seq.insert((chat, cmid), *seq);
                    }
                    Outcome::Unknown => *unknown += 1,
                    Outcome::Failed => {}
                }
            }
        }
    }
    for (chat, replicas) in &finals {
        let shard = nodes.shard_of(*chat).0;
        let on = hosts.get(&shard).cloned().unwrap_or_default();
        let (gone, unknown) = destructed.get(chat).cloned().unwrap_or_default();
        for (h, node) in replicas.iter().zip(on) {
            // Seqs go up from 1; a seq is missing only where a message
            // self-destructed.
            let seqs: Vec<u64> = h.iter().map(|m| m.seq).collect();
            let held: BTreeSet<u64> = seqs.iter().copied().collect();
            let newest = seqs.last().copied().unwrap_or(0);
            let missing: Vec<u64> = (1..=newest)
                .filter(|s| !held.contains(s) && !gone.contains(s))
                .collect();
            if !seqs.windows(2).all(|w| w[0] < w[1]) || missing.len() > unknown {
                bad.push(format!(
                    "node {node} chat {chat}: seqs {seqs:?} miss {missing:?}, but only {unknown} \
                     self-destructing sends of unknown outcome could have left a gap"
                ));
            }
            let mut ids = BTreeSet::new();
            for m in h {
                if !ids.insert((m.sender_id, m.client_msg_id)) {
                    bad.push(format!(
                        "node {node} chat {chat}: ({}, {}) stored twice",
                        m.sender_id, m.client_msg_id
                    ));
                }
            }
            if *h != replicas[0] {
                bad.push(format!(
                    "chat {chat}: node {node} differs from the first replica"
                ));
            }
        }
    }
    bad.extend(check_chat_records(nodes, &hosts, &ops).await);
    bad.extend(check_closes(&ops));
    // Watch and GetDifference: every reader was told the same change (and
    // user) at a chat's pts (its body may differ, read before or after a
    // later edit, and a change read while the chat was closed or after the
    // message went carries none), and a new message it was told of is the
    // message that holds that seq in the end.
    let watched = history.watched.lock().unwrap().clone();
    let mut told: BTreeMap<(u64, u64), &Watched> = BTreeMap::new();
    for w in &watched {
        let first = *told.entry((w.chat, w.pts)).or_insert(w);
        let same_message = match (first.message, w.message) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        if (first.kind, first.seq, first.user) != (w.kind, w.seq, w.user) || !same_message {
            bad.push(format!(
                "chat {} pts {}: reader {} was told {:?}, reader {} {:?}",
                w.chat, w.pts, first.watcher, first, w.watcher, w
            ));
        }
        if w.kind == pb::ChangeKind::NewMessage as i32 {
            let stored = finals
                .get(&w.chat)
                .and_then(|r| r[0].iter().find(|m| m.seq == w.seq))
                .map(|m| (m.sender_id, m.client_msg_id));
            // A new message names its sender, even where it carries no
            // message (a closed chat).
            if let Some((sender, _)) = stored.filter(|(sender, _)| *sender != w.user) {
                bad.push(format!(
                    "reader {} was told new message {}/{} was sent by {}, but {sender} sent it",
                    w.watcher, w.chat, w.seq, w.user
                ));
            }
            match (w.message, stored) {
                (Some(told), Some(stored)) if told == stored => {}
                (None, Some(_)) => {}
                // A self-destructing message (left out of the final
                // reads), at the seq its send was given if that is known.
                (Some((_, cmid)), None)
                    if self_destructing.contains(&(w.chat, cmid))
                        && destructed_seq
                            .get(&(w.chat, cmid))
                            .is_none_or(|seq| *seq == w.seq) => {}
                // Gone before the watcher read the change: one of those
                // messages, or a send of unknown outcome within the chat.
                (None, None)
                    if destructed.get(&w.chat).is_some_and(|(gone, unknown)| {
                        gone.contains(&w.seq)
                            || (*unknown > 0
                                && w.seq <= last_seqs.get(&w.chat).copied().unwrap_or(0))
                    }) => {}
                (told, stored) => bad.push(format!(
                    "reader {} was told of new message {}/{} from {told:?}, but it holds {stored:?}",
                    w.watcher, w.chat, w.seq
                )),
            }
        }
    }
    let by_id = |chat: u64| -> BTreeMap<u64, pb::Message> {
        finals
            .get(&chat)
            .map(|r| r[0].iter().map(|m| (m.client_msg_id, m.clone())).collect())
            .unwrap_or_default()
    };
    // Messages some edit or delete was sent for, whatever its outcome.
    let changed: BTreeSet<(u64, u64)> = ops
        .iter()
        .filter_map(|op| match &op.kind {
            OpKind::Edit { chat, seq, .. } | OpKind::Delete { chat, seq, .. } => {
                Some((*chat, *seq))
            }
            _ => None,
        })
        .collect();
    // Sends refused with an error a client does not retry changed nothing.
    for op in &ops {
        if let OpKind::Send {
            chat,
            cmid,
            outcome: Outcome::Failed,
            ..
        } = &op.kind
        {
            if let Some(m) = by_id(*chat).get(cmid) {
                bad.push(format!(
                    "send {chat}/{cmid} was refused with an error not to retry, but is stored at \
                     seq {}",
                    m.seq
                ));
            }
        }
    }
    // No two acknowledged sends were given one seq (a send resent with its
    // id gets its first seq back).
    let mut given: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for op in &ops {
        if let OpKind::Send {
            chat,
            cmid,
            outcome: Outcome::Ok(seq),
            ..
        } = op.kind
        {
            match given.insert((chat, seq), cmid) {
                Some(other) if other != cmid => bad.push(format!(
                    "LOST: acknowledged sends {chat}/{other} and {chat}/{cmid} were both given \
                     seq {seq}"
                )),
                _ => {}
            }
        }
    }
    // Sends: every acknowledged one is there at its seq, from its sender,
    // and (if nothing was sent to change it) with the body it was sent with.
    for op in &ops {
        if let OpKind::Send {
            chat,
            cmid,
            sender,
            body,
            outcome: Outcome::Ok(seq),
        } = &op.kind
        {
            if self_destructing.contains(&(*chat, *cmid)) {
                // Gone by now (checked before the final reads).
                continue;
            }
            match by_id(*chat).get(cmid) {
                Some(m) if m.seq == *seq => {
                    if m.sender_id != *sender {
                        bad.push(format!(
                            "send {chat}/{cmid} (seq {seq}) is stored from sender {} not {sender}",
                            m.sender_id
                        ));
                    }
                    if !changed.contains(&(*chat, *seq))
                        && (m.deleted || m.body[..] != *body.as_bytes())
                    {
                        bad.push(format!(
                            "send {chat}/{cmid} (seq {seq}) was never edited but reads {:?} \
                             (deleted: {}), not {body:?}",
                            String::from_utf8_lossy(&m.body),
                            m.deleted
                        ));
                    }
                }
                Some(m) => bad.push(format!(
                    "acknowledged send {chat}/{cmid} was seq {seq} but is stored at {}",
                    m.seq
                )),
                None => bad.push(format!(
                    "LOST: acknowledged send {chat}/{cmid} (seq {seq}) is on no replica"
                )),
            }
        }
    }
    // Edits and deletes: each message ends as its last acknowledged change
    // left it (as sent, if none was), or as a change whose outcome is
    // unknown left it (one may commit after later ones were answered).
    // `None` is deleted, `Some(body)` shown with that body.
    let sent_body: BTreeMap<(u64, u64), &str> = ops
        .iter()
        .filter_map(|op| match &op.kind {
            OpKind::Send {
                chat,
                body,
                outcome: Outcome::Ok(seq),
                ..
            } => Some(((*chat, *seq), body.as_str())),
            _ => None,
        })
        .collect();
    let mut changes_of: BTreeMap<(u64, u64), Vec<&OpKind>> = BTreeMap::new();
    for op in &ops {
        match &op.kind {
            OpKind::Edit { chat, seq, .. } | OpKind::Delete { chat, seq, .. } => {
                changes_of.entry((*chat, *seq)).or_default().push(&op.kind);
            }
            _ => {}
        }
    }
    let left_as = |kind: &OpKind| -> Option<Option<String>> {
        match kind {
            OpKind::Edit { body, .. } => Some(Some(body.clone())),
            OpKind::Delete { .. } => Some(None),
            _ => None,
        }
    };
    for ((chat, seq), kinds) in changes_of {
        let acked = |k: &&OpKind| {
            matches!(
                k,
                OpKind::Edit {
                    outcome: Outcome::Ok(()),
                    ..
                } | OpKind::Delete {
                    outcome: Outcome::Ok(()),
                    ..
                }
            )
        };
        let unknown = |k: &&OpKind| {
            matches!(
                k,
                OpKind::Edit {
                    outcome: Outcome::Unknown,
                    ..
                } | OpKind::Delete {
                    outcome: Outcome::Unknown,
                    ..
                }
            )
        };
        let mut allowed: Vec<Option<String>> = Vec::new();
        match kinds.iter().copied().rev().find(acked) {
            Some(k) => allowed.extend(left_as(k)),
            None => match sent_body.get(&(chat, seq)) {
                Some(body) => allowed.push(Some(body.to_string())),
                None => continue,
            },
        }
        allowed.extend(kinds.iter().copied().filter(unknown).filter_map(left_as));
        let msg = finals
            .get(&chat)
            .and_then(|r| r[0].iter().find(|m| m.seq == seq).cloned());
        let Some(m) = msg else {
            bad.push(format!("changed message {chat}/{seq} is missing"));
            continue;
        };
        let state = (!m.deleted).then(|| String::from_utf8_lossy(&m.body).into_owned());
        if !allowed.contains(&state) {
            bad.push(format!(
                "message {chat}/{seq} ends as {state:?}, which no acknowledged or unknown \
                 change left it as ({allowed:?})"
            ));
        }
    }
    // LINEARIZABLE reads: each sees every send acknowledged before it began,
    // nothing sent after it returned, and never less than a read that
    // finished before it began.
    let mut lin: Vec<&Op> = ops
        .iter()
        .filter(|o| {
            matches!(
                o.kind,
                OpKind::LinRead {
                    last_seq: Some(_),
                    ..
                }
            )
        })
        .collect();
    lin.sort_by_key(|o| o.invoke);
    for r in &lin {
        let OpKind::LinRead {
            chat,
            last_seq: Some(got),
        } = r.kind
        else {
            continue;
        };
        let must = ops
            .iter()
            .filter(|o| o.complete < r.invoke)
            .filter_map(|o| match o.kind {
                OpKind::Send {
                    chat: c,
                    outcome: Outcome::Ok(seq),
                    ..
                } if c == chat => Some(seq),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        if got < must {
            bad.push(format!("LINEARIZABLE read of chat {chat} saw last seq {got}, but seq {must} was acknowledged before it began"));
        }
        // Seqs are 1..n, so no read sees more messages than sends (not
        // refused) had started into the chat by the time it returned.
        let started = ops
            .iter()
            .filter(|o| o.invoke < r.complete)
            .filter(|o| {
                matches!(o.kind, OpKind::Send { chat: c, ref outcome, .. }
                    if c == chat && !matches!(outcome, Outcome::Failed))
            })
            .count() as u64;
        if got > started {
            bad.push(format!(
                "LINEARIZABLE read of chat {chat} saw last seq {got}, but only {started} sends \
                 into it had started when it returned"
            ));
        }
        for earlier in &lin {
            if let OpKind::LinRead {
                chat: c,
                last_seq: Some(prev),
            } = earlier.kind
            {
                if c == chat && earlier.complete < r.invoke && prev > got {
                    bad.push(format!(
                        "LINEARIZABLE reads of chat {chat} went backwards: {prev} then {got}"
                    ));
                }
            }
        }
    }
    bad
}
