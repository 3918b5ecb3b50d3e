//! Quiet shards on a real multi-process cluster: idle shards stop their Raft
//! timers on every replica; a write to a quiet shard wakes it and is
//! acknowledged; when the node leading quiet shards dies, node-pair pings
//! wake its followers, they elect, and writes go on; nothing acknowledged is
//! lost.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chatstore::api::pb::node::{StatusRequest, WriteRequest};
use chatstore::api::pb::replicated::{command, self_destruct, SelfDestruct};
use common::procs::start_cluster_with;
use common::{quiet_map, send_cmd, wait_all_quiet, ConfigOptions, TestDir};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_shards_go_quiet_wake_on_writes_and_fail_over_when_their_leader_dies() {
    let dir = TestDir::new("quiet");
    let shards = 4u64;
    let (mut cluster, nodes) = quiet_cluster(&dir, shards).await;
    // A write in every shard, then silence: every replica goes quiet.
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let chat_of_shard = chat_of_each_shard(&nodes);
    assert_eq!(chat_of_shard.len(), shards as usize);
    let mut n = 0;
    for chat in chat_of_shard.values() {
        n += 1;
        nodes
            .write(
                *chat,
                vec![send_cmd(*chat, 1, n, b"before")],
                Duration::from_secs(20),
            )
            .await
            .expect("write");
        acked.push((*chat, n));
    }
    wait_all_quiet(&nodes, &[1, 2, 3], shards, Duration::from_secs(30)).await;
    // Operators see it.
    let endpoints = cluster.endpoints();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatctl"))
        .args(["--endpoints", &endpoints, "--json", "shards"])
        .output()
        .expect("run chatctl");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("shards --json");
    assert!(
        v.as_array().unwrap().iter().all(|s| s["quiet"] == true),
        "chatctl shards: {v}"
    );

    // Writes to a quiet shard wake it and are acknowledged: ten at once,
    // each sent once to the leader, all wait for the one lease renewal
    // (none is refused for the lapsed lease of a leader that was quiet).
    let chat = chat_of_shard[&0];
    // Long enough quiet for the leader's lease (its election timeout, under
    // 2 s with these timings) to lapse: the wait is the point, not a race.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let leader = quiet_map(&nodes, &[1, 2, 3]).await[&(1, 0)].1;
    assert_ne!(leader, 0, "shard 0 has a leader");
    // A write sent to a quiet follower is refused and leaves it quiet:
    // awake under a quiet leader, it would time out and start an election.
    let other_chat = chat_of_shard[&1];
    let leader_1 = quiet_map(&nodes, &[1, 2, 3]).await[&(1, 1)].1;
    let follower = (1..=3).find(|n| *n != leader_1).unwrap();
    let refused = nodes
        .node(follower)
        .write(WriteRequest {
            shard_id: 1,
            commands: vec![send_cmd(other_chat, 1, 1_000, b"to a follower")],
        })
        .await;
    assert!(refused.is_err(), "a follower takes no write: {refused:?}");
    let m = quiet_map(&nodes, &[follower]).await;
    assert!(m[&(follower, 1)].0, "the follower stays quiet: {m:?}");
    let started = Instant::now();
    let writes = (0..10).map(|i| {
        let cmid = n + 1 + i;
        let mut client = nodes.node(leader);
        async move {
            let reply = client
                .write(WriteRequest {
                    shard_id: 0,
                    commands: vec![send_cmd(chat, 1, cmid, b"wakes")],
                })
                .await;
            (cmid, reply)
        }
    });
    for (cmid, reply) in futures::future::join_all(writes).await {
        reply.unwrap_or_else(|e| panic!("write {cmid} to the quiet leader: {e}"));
        acked.push((chat, cmid));
    }
    n += 10;
    eprintln!(
        "ten writes to a quiet shard acknowledged in {:?}",
        started.elapsed()
    );
    // It goes quiet again.
    wait_all_quiet(&nodes, &[1, 2, 3], shards, Duration::from_secs(30)).await;

    // The node leading quiet shards dies: their followers wake and elect.
    let m = quiet_map(&nodes, &[1]).await;
    let led_by_1: Vec<u64> = m
        .iter()
        .filter(|((_, _), (_, leader))| *leader == 1)
        .map(|((_, s), _)| *s)
        .collect();
    assert!(!led_by_1.is_empty(), "node 1 leads some shard: {m:?}");
    cluster.kill_node(1);
    let killed = Instant::now();
    for shard in &led_by_1 {
        let chat = chat_of_shard[shard];
        n += 1;
        nodes
            .write(
                chat,
                vec![send_cmd(chat, 1, n, b"after")],
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|e| panic!("shard {shard} after its quiet leader died: {e}"));
        acked.push((chat, n));
    }
    eprintln!(
        "writes to every shard node 1 led acknowledged {:?} after it died",
        killed.elapsed()
    );

    // Back with node 1: every acknowledged write on every replica.
    cluster.start_node(1);
    nodes
        .wait_converged(&[1, 2, 3], Duration::from_secs(60))
        .await
        .expect("replicas converge");
    for (chat, cmid) in acked {
        for node in 1..=3 {
            let h = nodes.history_on(node, chat).await.expect("history");
            assert!(
                h.iter().any(|m| m.client_msg_id == cmid),
                "write {chat}/{cmid} missing on node {node}"
            );
        }
    }
}

/// Three nodes with `shards` shards that go quiet after 1 s without writes.
async fn quiet_cluster(
    dir: &TestDir,
    shards: u64,
) -> (common::procs::ProcessCluster, common::Client) {
    start_cluster_with(
        &dir.path,
        &ConfigOptions {
            shards: shards as u32,
            quiesce_after_ms: 1_000,
            ..Default::default()
        },
    )
    .await
}

/// A chat of each shard (the first of chats 1 to 199 that it holds).
fn chat_of_each_shard(nodes: &common::Client) -> BTreeMap<u64, u64> {
    let mut chat_of_shard = BTreeMap::new();
    for chat in 1..200u64 {
        chat_of_shard.entry(nodes.shard_of(chat).0).or_insert(chat);
    }
    chat_of_shard
}

/// One acknowledged write into a chat of each shard.
async fn write_once_to_each_shard(nodes: &common::Client) {
    write_each_shard(nodes, None).await
}

/// One acknowledged send into a chat of each shard, self-destructing by
/// `policy`.
async fn write_each_shard(nodes: &common::Client, policy: Option<self_destruct::Policy>) {
    for (n, chat) in chat_of_each_shard(nodes).values().enumerate() {
        let mut send = send_cmd(*chat, 1, n as u64 + 1, b"once");
        if let Some(command::Kind::Send(s)) = send.kind.as_mut() {
            s.self_destruct = policy.map(|p| SelfDestruct { policy: Some(p) });
        }
        nodes
            .write(*chat, vec![send], Duration::from_secs(20))
            .await
            .expect("write");
    }
}

/// Per shard: the last log index on its leader.
async fn leader_log_index(nodes: &common::Client, ids: &[u64]) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for id in ids {
        if let Ok(s) = nodes.node(*id).status(StatusRequest {}).await {
            for sh in s.into_inner().shards.into_iter().filter(|s| s.is_leader) {
                out.insert(sh.shard_id, sh.last_log_index);
            }
        }
    }
    out
}

/// Collection does not wait for traffic: when a pass falls due on a quiet
/// shard, its leader wakes it, runs the pass (a log entry that no client
/// wrote), and the shard goes quiet again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quiet_shards_wake_for_collection_and_go_quiet_again() {
    let dir = TestDir::new("quiet-collection");
    let shards = 2u64;
    // Change collection passes every retention / 4 = 10 s.
    let (_cluster, nodes) = start_cluster_with(
        &dir.path,
        &ConfigOptions {
            shards: shards as u32,
            quiesce_after_ms: 1_000,
            change_retention_secs: Some(40),
            ..Default::default()
        },
    )
    .await;
    // A send that self-destructs after it is read keeps its change record
    // under every apply rule, so collection has something to pass over
    // (under rules 3 a plain send writes none, and a shard that reached
    // them before its send would have nothing to collect).
    write_each_shard(&nodes, Some(self_destruct::Policy::AfterReadSecs(86_400))).await;
    wait_all_quiet(&nodes, &[1, 2, 3], shards, Duration::from_secs(30)).await;
    let quiet_at = leader_log_index(&nodes, &[1, 2, 3]).await;
    assert_eq!(quiet_at.len(), shards as usize, "{quiet_at:?}");
    // No client writes from here on; every shard's log still grows.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = leader_log_index(&nodes, &[1, 2, 3]).await;
        let grown = quiet_at
            .iter()
            .filter(|(shard, index)| now.get(shard).is_some_and(|i| i > index))
            .count();
        if grown == quiet_at.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "quiet shards ran no collection pass: {quiet_at:?} then {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_all_quiet(&nodes, &[1, 2, 3], shards, Duration::from_secs(30)).await;
}

/// A follower that restarts under quiet shards does not take them over:
/// the quiet replicas it asks for pre-votes know their leader is alive (it
/// answers their pings) and grant none, and the leader, woken by the same
/// requests, brings it back as a follower. Without that, every quiet shard
/// it follows would elect it, as a quiet replica holds no lease to refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_follower_does_not_take_over_quiet_shards() {
    let dir = TestDir::new("quiet-restart");
    let shards = 4u64;
    let (mut cluster, nodes) = quiet_cluster(&dir, shards).await;
    write_once_to_each_shard(&nodes).await;
    wait_all_quiet(&nodes, &[1, 2, 3], shards, Duration::from_secs(30)).await;
    // The node that leads the fewest shards restarts.
    let m = quiet_map(&nodes, &[1, 2, 3]).await;
    let leader_of = |shard: u64| m[&(1, shard)].1;
    let restarted = (1..=3u64)
        .min_by_key(|n| (0..shards).filter(|s| leader_of(*s) == *n).count())
        .unwrap();
    let followed: Vec<(u64, u64)> = (0..shards)
        .map(|s| (s, leader_of(s)))
        .filter(|(_, l)| *l != restarted)
        .collect();
    assert!(
        !followed.is_empty(),
        "node {restarted} follows some shard: {m:?}"
    );
    cluster.kill_node(restarted);
    cluster.start_node(restarted);
    let others: Vec<u64> = (1..=3).filter(|n| *n != restarted).collect();
    // Up again, with each followed shard's leader known to it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = quiet_map(&nodes, &[restarted]).await;
        if followed
            .iter()
            .all(|(s, l)| m.get(&(restarted, *s)).is_some_and(|(_, seen)| seen == l))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {restarted} did not rejoin its shards' leaders: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Several election timeouts later the leaders are the same, and the
    // other follower of each shard is still quiet: it refused the restarted
    // node's pre-votes without waking (woken, it would campaign at once).
    let watch = Duration::from_millis(cluster.config.raft.election_timeout_ms_max * 4);
    let started = Instant::now();
    while started.elapsed() < watch {
        let m = quiet_map(&nodes, &others).await;
        for (shard, leader) in &followed {
            for node in &others {
                if let Some((quiet, seen)) = m.get(&(*node, *shard)) {
                    assert_eq!(
                        seen, leader,
                        "shard {shard} changed leader after node {restarted} restarted: {m:?}"
                    );
                    assert!(
                        *quiet || node == leader,
                        "node {node}, a follower of quiet shard {shard}, woke when node \
                         {restarted} restarted: {m:?}"
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A leadership hand-over on a quiet shard that no voter hears (the
/// leader's links to them are cut just then) does not strand the shard.
/// openraft's leader sends no heartbeat while it hands over and the quiet
/// followers run no timers, so nobody would elect; the leader asks again
/// after an election timeout, the voters that hear it wake, one takes over,
/// and writes go on. (If the cut lasts past an election timeout the
/// followers, no longer pinged by the leader, wake and elect one of them on
/// their own: that is not stranded either.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_hand_over_on_a_quiet_shard_is_asked_again() {
    use chatstore::api::pb::node::admin_client::AdminClient;
    use chatstore::api::pb::node::read_request::Query;
    use chatstore::api::pb::node::{ReadRequest, TransferLeaderRequest};
    use chatstore::api::pb::{Consistency, GetChatRequest};

    let dir = TestDir::new("quiet-hand-over");
    let shards = 2u64;
    let (mut cluster, nodes, links) = proxied_cluster(&dir, shards).await;
    write_once_to_each_shard(&nodes).await;
    let (shard, chat) = chat_of_each_shard(&nodes).into_iter().next().unwrap();
    let election_max = Duration::from_millis(cluster.config.raft.election_timeout_ms_max);

    // The leader asks another voter to take over just as its links to both
    // followers are cut (it still counts them live: they answered its
    // pings a moment ago). Tried again if the check saw them gone already.
    let mut handed = None;
    for _ in 0..5 {
        wait_all_quiet(&nodes, &[1, 2, 3], shards, Duration::from_secs(30)).await;
        let leader = nodes.leader_of(shard).await.expect("a leader");
        let to = (1..=3u64).find(|n| *n != leader).unwrap();
        let cut = |on: bool| {
            for ((from, _), link) in &links {
                if *from == leader {
                    link.ctl.set_cut(on);
                }
            }
        };
        // A LINEARIZABLE read wakes the leader and renews its lease (its
        // followers stay quiet): a leader whose lease lapsed while quiet
        // would first wait out a renewal over the cut links.
        nodes
            .node(leader)
            .read(ReadRequest {
                shard_id: shard,
                consistency: Consistency::Linearizable as i32,
                query: Some(Query::Chat(GetChatRequest {
                    chat_id: chat,
                    ..Default::default()
                })),
                ..Default::default()
            })
            .await
            .expect("a LINEARIZABLE read on the leader");
        cut(true);
        let url = format!(
            "http://{}",
            cluster
                .config
                .node(chatstore::types::NodeId(leader))
                .unwrap()
                .raft_addr
        );
        let call = tokio::spawn(async move {
            AdminClient::connect(url)
                .await
                .expect("admin client")
                .transfer_leader(TransferLeaderRequest {
                    shard_id: shard,
                    to_node: to,
                })
                .await
        });
        // A refusal comes within a lease renewal's wait; an accepted
        // hand-over waits (15 s) for the new leader.
        let mut call = call;
        let refusal_wait = election_max * 2 + Duration::from_secs(1);
        if let Ok(answer) = tokio::time::timeout(refusal_wait, &mut call).await {
            cut(false);
            match answer.unwrap() {
                // The followers stopped hearing the leader and elected.
                Ok(_) => {
                    handed = Some((leader, None));
                    break;
                }
                Err(refused) => {
                    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
                    continue;
                }
            }
        }
        // Every request of the hand-over, and of any retry within the
        // refusal wait (over two election timeouts), was lost.
        cut(false);
        handed = Some((leader, Some(call)));
        break;
    }
    let (leader, call) = handed.expect("a hand-over started within five tries");

    // Another voter takes over and takes writes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now_leads = nodes.leader_of(shard).await;
        if now_leads.is_some_and(|l| l != leader) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shard {shard} is still led by node {leader}, which asked another voter to take over 30 s ago"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    nodes
        .write(
            chat,
            vec![send_cmd(chat, 1, 1_000, b"after the hand-over")],
            Duration::from_secs(20),
        )
        .await
        .expect("a write after the hand-over");
    if let Some(call) = call {
        let _ = call.await;
    }
    cluster.assert_still_running(1);
    cluster.assert_still_running(2);
    cluster.assert_still_running(3);
}

/// A three-node cluster of `shards` shards, quiet after 1 s, where every
/// node reaches each other node through a proxy, by (from, to).
async fn proxied_cluster(
    dir: &TestDir,
    shards: u64,
) -> (
    common::procs::ProcessCluster,
    common::Client,
    BTreeMap<(u64, u64), common::proxy::Proxy>,
) {
    let mut cluster = common::procs::ProcessCluster::new(
        &dir.path,
        &ConfigOptions {
            shards: shards as u32,
            quiesce_after_ms: 1_000,
            ..Default::default()
        },
    );
    let mut links = BTreeMap::new();
    for a in 1..=3u64 {
        let mut args = Vec::new();
        for b in (1..=3u64).filter(|b| *b != a) {
            let target = cluster.config.node(chatstore::types::NodeId(b)).unwrap();
            let proxy = common::proxy::Proxy::start(target.raft_addr.clone()).await;
            args.push("--peer-addr".to_string());
            args.push(format!("{b}={}", proxy.addr));
            links.insert((a, b), proxy);
        }
        cluster.node_args.insert(a, args);
    }
    cluster.start_all_nodes();
    let nodes = common::Client::new(&cluster.config);
    nodes
        .wait_leaders(&[1, 2, 3], Duration::from_secs(60))
        .await
        .expect("every shard elects a leader");
    (cluster, nodes, links)
}

/// A quiet shard whose leader can no longer send to the other nodes,
/// though they still reach it (its own connections stall; its answers on
/// theirs still flow, so their pings to it are answered), gets another
/// leader and takes writes while that lasts: a follower goes by the
/// leader's pings reaching it, not by its own pings being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quiet_shard_whose_leader_cannot_send_elects_another() {
    use std::sync::atomic::Ordering::SeqCst;

    let dir = TestDir::new("quiet-egress");
    let shards = 2u64;
    let (mut cluster, nodes, links) = proxied_cluster(&dir, shards).await;
    write_once_to_each_shard(&nodes).await;
    let (shard, chat) = chat_of_each_shard(&nodes).into_iter().next().unwrap();
    wait_all_quiet(&nodes, &[1, 2, 3], shards, Duration::from_secs(30)).await;
    let leader = nodes.leader_of(shard).await.expect("a leader");
    for ((from, _), link) in &links {
        if *from == leader {
            link.ctl.stall_up.store(true, SeqCst);
        }
    }
    let others: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = quiet_map(&nodes, &others).await;
        let seen: Vec<u64> = others
            .iter()
            .filter_map(|n| m.get(&(*n, shard)))
            .map(|(_, l)| *l)
            .collect();
        if seen.len() == others.len() && seen.iter().all(|l| *l != leader && *l == seen[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shard {shard}'s followers still follow node {leader}, which cannot send to them, 30 s on: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    nodes
        .write(
            chat,
            vec![send_cmd(
                chat,
                1,
                2_000,
                b"while the old leader cannot send",
            )],
            Duration::from_secs(20),
        )
        .await
        .expect("a write under the new leader");
    for link in links.values() {
        link.ctl.heal();
    }
    for node in 1..=3 {
        cluster.assert_still_running(node);
    }
}
