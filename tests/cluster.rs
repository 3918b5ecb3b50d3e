//! In-process clusters: three nodes in this test process over real loopback
//! gRPC, real sled on disk.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chatstore::api::pb::node::{ShardRequest, StatusRequest};
use chatstore::api::pb::replicated::command_result::Outcome;
use chatstore::api::pb::replicated::{command, self_destruct, SelfDestruct};
use chatstore::cluster::ClusterConfig;
use chatstore::node::Node;
use chatstore::types::NodeId;
use common::{send_cmd, three_region_config, Client, ConfigOptions, TestDir};

async fn start(config: &ClusterConfig, id: u64) -> Node {
    // A stopped node's sled lock is released once its last handle drops;
    // allow a moment for that.
    let mut last = None;
    for _ in 0..50 {
        match Node::start(config, NodeId(id)).await {
            Ok(n) => return n,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("start node {id}: {:?}", last);
}

/// Starts nodes 1 to 3 and waits until every shard has a leader.
async fn start_three(config: &ClusterConfig) -> (BTreeMap<u64, Node>, Client) {
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        nodes.insert(id, start(config, id).await);
    }
    let client = Client::new(config);
    client
        .wait_leaders(&[1, 2, 3], Duration::from_secs(30))
        .await
        .unwrap();
    (nodes, client)
}

/// Sends `count` messages spread over `chats` chats starting at `first_chat`,
/// 16 at a time; returns (chat, client_msg_id) → seq.
async fn send_many(
    client: &Client,
    first_chat: u64,
    chats: u64,
    count: u64,
    tag: u64,
) -> BTreeMap<(u64, u64), u64> {
    let mut tasks = tokio::task::JoinSet::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    for i in 0..count {
        let chat = first_chat + i % chats;
        let cmid = tag * 1_000_000 + i;
        let client = client.clone();
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.spawn(async move {
            let _permit = permit;
            let reply = client
                .write(
                    chat,
                    vec![send_cmd(chat, 7, cmid, format!("m{cmid}").as_bytes())],
                    Duration::from_secs(30),
                )
                .await
                .expect("send acknowledged");
            match reply.results[0].outcome.clone() {
                Some(Outcome::Send(r)) => ((chat, cmid), r.seq),
                other => panic!("unexpected outcome {other:?}"),
            }
        });
    }
    let mut acked = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let (k, seq) = r.expect("send task");
        acked.insert(k, seq);
    }
    acked
}

async fn check_acked_everywhere(client: &Client, nodes: &[u64], acked: &BTreeMap<(u64, u64), u64>) {
    // A follower applies an entry a round after the leader acknowledged it:
    // what is missing may still come, for a while; gaps and duplicates
    // never may.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match acked_everywhere(client, nodes, acked).await {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

async fn acked_everywhere(
    client: &Client,
    nodes: &[u64],
    acked: &BTreeMap<(u64, u64), u64>,
) -> Result<(), String> {
    let chats: std::collections::BTreeSet<u64> = acked.keys().map(|(c, _)| *c).collect();
    for node in nodes {
        for chat in &chats {
            let history = client.history_on(*node, *chat).await.expect("read history");
            let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
            let expect: Vec<u64> = (1..=history.len() as u64).collect();
            assert_eq!(
                seqs, expect,
                "node {node} chat {chat}: seqs are 1..n without gaps"
            );
            let by_cmid: BTreeMap<u64, u64> =
                history.iter().map(|m| (m.client_msg_id, m.seq)).collect();
            assert_eq!(
                by_cmid.len(),
                history.len(),
                "node {node} chat {chat}: no duplicate client_msg_id"
            );
            for ((c, cmid), seq) in acked.iter().filter(|((c, _), _)| c == chat) {
                match by_cmid.get(cmid) {
                    Some(at) if at == seq => {}
                    None => {
                        return Err(format!(
                            "node {node}: acknowledged message {c}/{cmid} (seq {seq}) missing"
                        ))
                    }
                    Some(at) => panic!(
                        "node {node}: acknowledged message {c}/{cmid} at seq {at}, not {seq}"
                    ),
                }
            }
        }
    }
    Ok(())
}

/// Writes to many chats land on every replica; with one node stopped writes
/// keep going; the restarted node catches up from its own data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_replicate_survive_a_stopped_node_and_catch_up() {
    let dir = TestDir::new("cluster");
    let config = three_region_config(
        &dir.path,
        &ConfigOptions {
            shards: 16,
            ..Default::default()
        },
    );
    let (mut nodes, client) = start_three(&config).await;

    eprintln!("phase 1: 300 sends to 40 chats");
    let mut acked = send_many(&client, 1, 40, 300, 1).await;
    client
        .wait_converged(&[1, 2, 3], Duration::from_secs(30))
        .await
        .unwrap();
    check_acked_everywhere(&client, &[1, 2, 3], &acked).await;

    eprintln!("phase 2: stop node 3, keep writing");
    nodes.remove(&3).unwrap().shutdown().await;
    acked.extend(send_many(&client, 1, 40, 200, 2).await);
    check_acked_everywhere(&client, &[1, 2], &acked).await;

    eprintln!("phase 3: restart node 3; it catches up");
    nodes.insert(3, start(&config, 3).await);
    client
        .wait_converged(&[1, 2, 3], Duration::from_secs(60))
        .await
        .unwrap();
    check_acked_everywhere(&client, &[1, 2, 3], &acked).await;

    eprintln!("phase 4: a retried send returns the original seq");
    let (&(chat, cmid), &seq) = acked.iter().next().unwrap();
    let again = client
        .write(
            chat,
            vec![send_cmd(chat, 7, cmid, b"retry")],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    match again.results[0].outcome.clone() {
        Some(Outcome::Send(r)) => {
            assert!(r.duplicate);
            assert_eq!(r.seq, seq);
        }
        other => panic!("unexpected {other:?}"),
    }
    for (_, n) in nodes {
        n.shutdown().await;
    }
}

/// A replica asked to close that knows a newer membership than the one the
/// close was checked against (another move may have added it again) keeps
/// its data, is opened again at once and goes on replicating.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_closed_against_an_older_membership_is_kept_and_reopened() {
    let dir = TestDir::new("cluster-kept");
    let config = three_region_config(
        &dir.path,
        &ConfigOptions {
            shards: 2,
            ..Default::default()
        },
    );
    let (nodes, client) = start_three(&config).await;
    let chat = 1u64;
    let shard = client.shard_of(chat);
    let written = Duration::from_secs(20);
    client
        .write(chat, vec![send_cmd(chat, 7, 1, b"before")], written)
        .await
        .expect("write before");
    // A membership change: a learner that never answers, added and taken
    // out again.
    let leader = client.leader_of(shard.0).await.expect("a leader");
    let raft = nodes[&leader]
        .registry
        .get(shard)
        .expect("leader's replica")
        .raft
        .clone();
    let nowhere = chatstore::shard::types::NodeAddr {
        addr: "127.0.0.1:9".into(),
        region: "eu".into(),
    };
    raft.add_learner(9, nowhere, false)
        .await
        .expect("add a learner");
    raft.change_membership(openraft::ChangeMembers::RemoveNodes([9].into()), false)
        .await
        .expect("take it out");
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let registry = &nodes[&follower].registry;
    use openraft::async_runtime::WatchReceiver;
    let membership_index = || {
        registry.get(shard).map_or(0, |r| {
            r.raft
                .metrics()
                .borrow_watched()
                .membership_config
                .log_id()
                .as_ref()
                .map_or(0, |l| l.index)
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while membership_index() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower learned no membership"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kept = registry
        .close_replica(shard, Some(0))
        .await
        .expect_err("a close checked against an older membership");
    assert!(
        kept.downcast_ref::<chatstore::node::KeptCopy>().is_some(),
        "{kept:#}"
    );
    assert!(format!("{kept}").contains("open again"), "{kept}");
    assert!(registry.get(shard).is_some(), "the replica is open again");
    // It goes on replicating, its earlier data kept.
    client
        .write(chat, vec![send_cmd(chat, 7, 2, b"after")], written)
        .await
        .expect("write after");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let history = client.history_on(follower, chat).await.unwrap_or_default();
        if history.len() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reopened replica holds {history:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A replica that fell behind past the purged log catches up by snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_replica_catches_up_by_snapshot() {
    let dir = TestDir::new("snapshot");
    let opts = ConfigOptions {
        shards: 2,
        snapshot_every_entries: 50,
        logs_kept_behind_snapshot: 5,
        ..Default::default()
    };
    let config = three_region_config(&dir.path, &opts);
    let (mut nodes, client) = start_three(&config).await;
    let mut acked = send_many(&client, 1, 10, 20, 1).await;
    client
        .wait_converged(&[1, 2, 3], Duration::from_secs(30))
        .await
        .unwrap();

    // Stop a node that leads nothing, so the survivors keep every leader.
    let victim = {
        let mut pick = 3;
        for id in [3, 2, 1] {
            let s = client
                .node(id)
                .status(StatusRequest {})
                .await
                .unwrap()
                .into_inner();
            if s.shards.iter().all(|sh| !sh.is_leader) {
                pick = id;
                break;
            }
        }
        pick
    };
    let before: Vec<_> = client
        .node(victim)
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .shards;
    eprintln!("stopping node {victim}");
    nodes.remove(&victim).unwrap().shutdown().await;
    let alive: Vec<u64> = (1..=3).filter(|n| *n != victim).collect();

    // Sends one at a time so that each is its own log entry.
    for i in 0..150u64 {
        let chat = 1 + i % 10;
        let r = client
            .write(
                chat,
                vec![send_cmd(chat, 9, 500_000 + i, b"x")],
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        let Some(Outcome::Send(s)) = &r.results[0].outcome else {
            panic!("send {i} refused: {:?}", r.results[0]);
        };
        acked.insert((chat, 500_000 + i), s.seq);
    }
    // Self-destructing messages (no one reads them) are sealed at rest; the
    // snapshot carries them sealed with its own key, which travels with it.
    let mut sealed = Vec::new();
    for chat in 1..=10u64 {
        let mut cmd = send_cmd(chat, 9, 900_000 + chat, format!("sealed-{chat}").as_bytes());
        if let Some(command::Kind::Send(s)) = &mut cmd.kind {
            s.self_destruct = Some(SelfDestruct {
                policy: Some(self_destruct::Policy::AfterReadSecs(86_400)),
            });
        }
        let r = client
            .write(chat, vec![cmd], Duration::from_secs(30))
            .await
            .unwrap();
        let Some(Outcome::Send(s)) = &r.results[0].outcome else {
            panic!("send refused: {:?}", r.results[0]);
        };
        acked.insert((chat, 900_000 + chat), s.seq);
        sealed.push((chat, s.seq));
    }
    for shard in 0..2 {
        for node in &alive {
            client
                .node(*node)
                .trigger_snapshot(ShardRequest { shard_id: shard })
                .await
                .unwrap();
        }
    }
    // Wait until the log the victim needs is purged on the survivors.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut purged_past = true;
        for node in &alive {
            let s = client
                .node(*node)
                .status(StatusRequest {})
                .await
                .unwrap()
                .into_inner();
            for sh in s.shards {
                let old = before.iter().find(|b| b.shard_id == sh.shard_id).unwrap();
                if sh.purged_index <= old.last_log_index + 1 {
                    purged_past = false;
                }
            }
        }
        if purged_past {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "logs were not purged");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    eprintln!("restarting node {victim}; it needs snapshots");
    nodes.insert(victim, start(&config, victim).await);
    client
        .wait_converged(&[1, 2, 3], Duration::from_secs(60))
        .await
        .unwrap();
    let after = client
        .node(victim)
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .shards;
    for sh in &after {
        let old = before.iter().find(|b| b.shard_id == sh.shard_id).unwrap();
        assert!(
            sh.snapshot_index > old.last_log_index,
            "shard {} on node {victim}: snapshot {} should be past its old log end {}",
            sh.shard_id,
            sh.snapshot_index,
            old.last_log_index
        );
    }
    check_acked_everywhere(&client, &[1, 2, 3], &acked).await;
    for (chat, seq) in sealed {
        let h = client.history_on(victim, chat).await.unwrap();
        let m = h.iter().find(|m| m.seq == seq).expect("sealed message");
        assert_eq!(m.body.as_ref(), format!("sealed-{chat}").as_bytes());
    }
    for (_, n) in nodes {
        n.shutdown().await;
    }
}

/// Replicas write their applied effects to sled from a memtable when they
/// apply something after about a second; one that takes writes and then
/// none (so applies nothing more) is flushed by the node's chores: without a
/// restart, every node's trees come to hold every acknowledged message and
/// its memtables nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_that_stop_applying_flush_their_memtables() {
    use chatstore::storage::keys;

    let dir = TestDir::new("idle-flush");
    let opts = ConfigOptions {
        shards: 2,
        ..Default::default()
    };
    let config = three_region_config(&dir.path, &opts);
    let (nodes, client) = start_three(&config).await;
    let acked = send_many(&client, 1, 4, 8, 1).await;
    let in_trees = |node: &Node, chat: u64, seq: u64| {
        node.registry
            .all()
            .iter()
            .filter(|s| {
                s.files
                    .state
                    .contains_key(keys::message(chat, seq))
                    .unwrap()
            })
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let pending: usize = nodes
            .values()
            .map(|n| n.registry.storage().memtable_budget().used())
            .sum();
        let missing = nodes
            .values()
            .flat_map(|n| acked.iter().map(move |((chat, _), seq)| (n, *chat, *seq)))
            .filter(|(n, chat, seq)| in_trees(n, *chat, *seq) != 1)
            .count();
        if pending == 0 && missing == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 30 s the memtables still hold {pending} bytes and {missing} acknowledged messages are not in a tree"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (_, node) in nodes {
        node.shutdown().await;
    }
}

/// The upgrade path of apply rules: a cluster whose shards are under rules
/// 0 (as if made by a binary from before rule versions) is moved to the
/// newest rules by its leaders once every node answers pings with them. Only
/// a replicated raise can do it: the shards' bootstraps are long applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_under_old_apply_rules_move_to_the_newest_ones() {
    use chatstore::api::pb::replicated::ShardSettings;
    use chatstore::shard::apply::APPLY_RULES;
    use chatstore::storage::{keys, trees, Storage};
    use prost::Message;

    let dir = TestDir::new("apply-rules");
    let opts = ConfigOptions {
        shards: 2,
        ..Default::default()
    };
    let config = three_region_config(&dir.path, &opts);
    let (mut nodes, client) = start_three(&config).await;
    let acked = send_many(&client, 1, 4, 8, 1).await;
    client
        .wait_apply_rules(&[1, 2, 3], APPLY_RULES, Duration::from_secs(30))
        .await
        .unwrap();
    for (_, node) in std::mem::take(&mut nodes) {
        node.shutdown().await;
    }

    // Every replica's stored settings back to rules 0.
    for id in 1..=3u64 {
        let data = config.data_dir(NodeId(id));
        let mut storage = None;
        for _ in 0..50 {
            match Storage::open(&data) {
                Ok(s) => {
                    storage = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let storage = storage.expect("open a stopped node's data folder");
        for shard in 0..opts.shards as u64 {
            let tree = storage
                .open_tree(&trees::state_tree(chatstore::types::ShardId(shard)))
                .unwrap();
            let stored = tree
                .get(keys::SM_META_SETTINGS)
                .unwrap()
                .expect("bootstrapped");
            let mut settings = ShardSettings::decode(stored.as_ref()).unwrap();
            assert_eq!(settings.apply_rules, APPLY_RULES);
            settings.apply_rules = 0;
            tree.insert(keys::SM_META_SETTINGS, settings.encode_to_vec())
                .unwrap();
        }
        storage.db().flush().unwrap();
    }

    for id in 1..=3 {
        nodes.insert(id, start(&config, id).await);
    }
    client
        .wait_apply_rules(&[1, 2, 3], APPLY_RULES, Duration::from_secs(60))
        .await
        .unwrap();
    check_acked_everywhere(&client, &[1, 2, 3], &acked).await;
    for (_, node) in nodes {
        node.shutdown().await;
    }
}

/// A Watch's long poll (`wait_for_change`) waits through entries of other
/// chats of its shard and answers when its own chat changes, or at the end
/// of its wait with no changes; a plain SESSION read with a wait answers as
/// soon as its index is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_poll_waits_for_its_own_chat() {
    use chatstore::api::pb::node::read_request::Query;
    use chatstore::api::pb::node::{DifferenceQuery, ReadRequest};
    use chatstore::api::pb::Consistency;
    use std::time::Instant;

    let dir = TestDir::new("long-poll");
    let config = three_region_config(
        &dir.path,
        &ConfigOptions {
            shards: 1,
            ..Default::default()
        },
    );
    let (_nodes, client) = start_three(&config).await;
    let (watched, busy) = (1u64, 2u64);
    let w = |chat: u64, cmid: u64| send_cmd(chat, 1, cmid, b"x");
    let deadline = Duration::from_secs(20);
    let first = client
        .write(watched, vec![w(watched, 1)], deadline)
        .await
        .unwrap();
    let leader = client.leader_of(0).await.expect("a leader");
    let poll = |wait_for_change: bool, min_index: u64| {
        let mut node = client.node(leader);
        async move {
            let started = Instant::now();
            let reply = node
                .read(ReadRequest {
                    shard_id: 0,
                    consistency: Consistency::Session as i32,
                    min_index,
                    wait_ms: 5_000,
                    query: Some(Query::Difference(DifferenceQuery {
                        chat_id: watched,
                        pts: 1,
                        limit: 10,
                        bytes_max: 0,
                        wait_for_change,
                    })),
                })
                .await
                .expect("read")
                .into_inner();
            (
                started.elapsed(),
                reply.difference.expect("a difference").changes.len(),
            )
        }
    };
    // Writes to another chat of the shard while each poll waits.
    let writes = |from: u64| {
        let client = &client;
        async move {
            for i in 0..5 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                client
                    .write(busy, vec![w(busy, from + i)], deadline)
                    .await
                    .unwrap();
            }
        }
    };
    let next = first.log_index + 1;
    let ((plain, plain_changes), ()) = tokio::join!(poll(false, next), writes(100));
    assert!(
        plain < Duration::from_millis(3_500),
        "answered after the next entry: {plain:?}"
    );
    assert_eq!(plain_changes, 0);
    let next = client
        .write(busy, vec![w(busy, 200)], deadline)
        .await
        .unwrap()
        .log_index
        + 1;
    let ((waited, changes), ()) = tokio::join!(poll(true, next), writes(300));
    assert!(
        waited >= Duration::from_millis(4_500),
        "waited out other chats' entries: {waited:?}"
    );
    assert_eq!(changes, 0);
    // A change to the watched chat ends the wait with it.
    let next = client
        .write(busy, vec![w(busy, 400)], deadline)
        .await
        .unwrap()
        .log_index
        + 1;
    let send = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        client
            .write(watched, vec![w(watched, 2)], deadline)
            .await
            .unwrap();
    };
    let ((answered, changes), ()) = tokio::join!(poll(true, next), send);
    assert!(
        answered < Duration::from_millis(3_500),
        "answered with the change: {answered:?}"
    );
    assert_eq!(changes, 1);
}
