//! Cluster operations with `chatctl` on real multi-process clusters, under a
//! continuous write load whose history the chaos checker checks at the end:
//! nodes join and take replicas and leaders through `rebalance`, a replica
//! moves to one after its shard's log was purged (so it needs a snapshot), an
//! original node is drained and removed, a dead one is drained (its voters
//! replaced from the live replicas); leadership moves by hand and comes
//! back on its own after a restart; and the CLI fails clearly against nodes
//! that are down.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatstore::api::pb::node::admin_client::AdminClient;
use chatstore::api::pb::node::{
    AddLearnerRequest, ChangeVotersRequest, CloseReplicaRequest, ShardRequest, ShardStatus,
    StatusRequest,
};
use common::chaos::{check_on, run_session, History};
use common::procs::{router_client, start_cluster_with, ProcessCluster};
use common::{ConfigOptions, TestDir};

fn chatctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chatctl"))
        .args(args)
        .output()
        .expect("run chatctl");
    let r = (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    eprintln!(
        "$ chatctl {}\n{}{}-> exit {}",
        args.join(" "),
        r.1,
        r.2,
        r.0
    );
    r
}

fn addr(cluster: &ProcessCluster, id: u64) -> String {
    cluster
        .config
        .node(chatstore::types::NodeId(id))
        .expect("node in config")
        .raft_addr
        .clone()
}

fn endpoints(cluster: &ProcessCluster, ids: &[u64]) -> String {
    ids.iter()
        .map(|id| addr(cluster, *id))
        .collect::<Vec<_>>()
        .join(",")
}

/// Per shard on `node`: (voter, leader, snapshot index) as it reports it.
async fn replicas_on(nodes: &common::Client, node: u64) -> BTreeMap<u64, (bool, bool, u64)> {
    let s = nodes
        .node(node)
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    s.shards
        .iter()
        .map(|sh| {
            (
                sh.shard_id,
                (sh.voters.contains(&node), sh.is_leader, sh.snapshot_index),
            )
        })
        .collect()
}

/// A write load through every router: the chaos workload's sessions.
struct Load {
    history: Arc<History>,
    stop: Arc<AtomicBool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    fn start(routers: Vec<String>, sessions: usize) -> Load {
        let history = Arc::new(History::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for s in 0..sessions {
            tasks.spawn(run_session(
                s,
                0x0b5,
                routers.clone(),
                history.clone(),
                stop.clone(),
            ));
        }
        Load {
            history,
            stop,
            tasks,
        }
    }

    fn acked(&self) -> usize {
        self.history
            .ops
            .lock()
            .unwrap()
            .iter()
            .filter(|o| {
                matches!(
                    o.kind,
                    common::chaos::OpKind::Send {
                        outcome: common::chaos::Outcome::Ok(_),
                        ..
                    }
                )
            })
            .count()
    }

    /// Waits until `more` sends beyond now are acknowledged: the cluster
    /// is still serving.
    async fn wait_progress(&self, more: usize, what: &str) {
        let start = self.acked();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked() < start + more {
            assert!(
                Instant::now() < deadline,
                "writes stalled {what}: {} acknowledged in 60 s",
                self.acked() - start
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) -> Arc<History> {
        self.stop.store(true, Ordering::Relaxed);
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        tokio::time::timeout(Duration::from_secs(60), drain)
            .await
            .expect("workload stops within 60 s");
        self.history
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_join_and_rebalance_then_original_nodes_are_drained_live_and_dead() {
    let dir = TestDir::new("ops-membership");
    let (mut cluster, nodes) = start_cluster_with(
        &dir.path,
        &ConfigOptions {
            shards: 4,
            // Logs are purged soon after snapshots, so a new replica has
            // to be sent a snapshot.
            snapshot_every_entries: 40,
            logs_kept_behind_snapshot: 5,
            extra_nodes: vec![(4, "eu"), (5, "us")],
            ..Default::default()
        },
    )
    .await;
    let mut routers = Vec::new();
    for r in ["eu", "us"] {
        let a = cluster.start_router(r);
        router_client(&a).await;
        routers.push(a);
    }
    let load = Load::start(routers, 4);
    load.wait_progress(20, "before any change").await;

    // The new nodes: up, empty, checked by add-node.
    let eps = endpoints(&cluster, &[1, 2, 3]);
    for (id, region) in [(4u64, "eu"), (5, "us")] {
        cluster.start_node(id);
        let a = addr(&cluster, id);
        let id_arg = id.to_string();
        let mut added = false;
        for _ in 0..50 {
            let (code, out, _) = chatctl(&[
                "--endpoints",
                &eps,
                "add-node",
                "--id",
                &id_arg,
                "--addr",
                &a,
            ]);
            if code == 0 {
                assert!(out.contains(&format!("node {id} ({region}")), "{out}");
                added = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(added, "add-node never saw node {id} up");
    }
    let all = endpoints(&cluster, &[1, 2, 3, 4, 5]);

    // A shard whose eu replica is node 1 moves to node 4 after its log was
    // purged: node 4 must catch up from a snapshot.
    let on1 = replicas_on(&nodes, 1).await;
    let shard = *on1.keys().next().expect("node 1 hosts shards");
    load.wait_progress(60, "before compaction").await;
    let (code, _, err) = chatctl(&[
        "--endpoints",
        &all,
        "compact",
        "--shard",
        &shard.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    let leader = nodes.leader_of(shard).await.expect("shard has a leader");
    let purged = nodes
        .node(leader)
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .shards
        .into_iter()
        .find(|s| s.shard_id == shard)
        .unwrap()
        .purged_index;
    assert!(
        purged > 0,
        "the leader's log of shard {shard} was not purged"
    );
    let shard_arg = shard.to_string();
    let move_1_to_4 = || chatctl(&["--endpoints", &all, "move-replica", &shard_arg, "1", "4"]);
    let (code, out, _) = chatctl(&[
        "--endpoints",
        &all,
        "move-replica",
        &shard_arg,
        "1",
        "4",
        "--dry-run",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("node 1 -> node 4"), "{out}");
    assert!(
        replicas_on(&nodes, 4).await.is_empty(),
        "a dry run changed nothing"
    );
    let (code, out, err) = move_1_to_4();
    assert_eq!(code, 0, "{out}{err}");
    let on4 = replicas_on(&nodes, 4).await;
    let (voter, _, snapshot_index) = on4[&shard];
    assert!(voter, "node 4 is a voter of shard {shard}");
    assert!(
        snapshot_index >= purged,
        "node 4 caught up from a snapshot (snapshot index {snapshot_index}, purged {purged})"
    );
    assert!(
        !replicas_on(&nodes, 1).await.contains_key(&shard),
        "node 1's copy of shard {shard} is deleted"
    );
    load.wait_progress(20, "after move-replica").await;
    // Running a finished move again changes nothing and succeeds.
    let (code, out, err) = move_1_to_4();
    assert_eq!(code, 0, "{out}{err}");

    // Rebalance evens eu out between nodes 1 and 4 and gives node 4 the
    // leadership of the shards it holds (eu is their preferred region).
    let (code, out, _) = chatctl(&["--endpoints", &all, "rebalance", "--dry-run"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, err) = chatctl(&["--endpoints", &all, "rebalance"]);
    assert_eq!(code, 0, "{out}{err}");
    load.wait_progress(20, "after rebalance").await;
    let on1 = replicas_on(&nodes, 1).await;
    let on4 = replicas_on(&nodes, 4).await;
    let eu_shards = on1.len() + on4.len();
    assert!(
        on1.len().abs_diff(on4.len()) <= 1,
        "eu replicas even: node 1 has {}, node 4 has {}",
        on1.len(),
        on4.len()
    );
    assert_eq!(eu_shards, 4, "every shard keeps one eu replica");
    let (on2, on5) = (replicas_on(&nodes, 2).await, replicas_on(&nodes, 5).await);
    assert_eq!((on2.len(), on5.len()), (2, 2), "us replicas even");
    let (code, out, _) = chatctl(&["--endpoints", &all, "--json", "status"]);
    assert!(code == 0 || code == 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json");
    let n4 = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == 4)
        .expect("status lists node 4")
        .clone();
    assert_eq!(n4["replicas"].as_u64(), Some(on4.len() as u64), "{n4}");

    // A move onto node 1 cut short after it joined as a learner: drain takes
    // the learner out too, or remove-node would refuse node 1.
    let on1 = replicas_on(&nodes, 1).await;
    if let Some(shard) = (0..4u64).find(|s| !on1.contains_key(s)) {
        let admin = |node: u64| {
            let url = format!("http://{}", addr(&cluster, node));
            async move { AdminClient::connect(url).await.expect("admin client") }
        };
        admin(1)
            .await
            .open_replica(ShardRequest { shard_id: shard })
            .await
            .expect("open a replica on node 1");
        let leader = nodes.leader_of(shard).await.expect("a leader");
        admin(leader)
            .await
            .add_learner(AddLearnerRequest {
                shard_id: shard,
                node_id: 1,
                addr: addr(&cluster, 1),
                region: "eu".into(),
            })
            .await
            .expect("node 1 joins as a learner");
        eprintln!("node 1 is a learner of shard {shard}");
    }

    // Drain node 1: everything it holds moves to node 4, writes go on.
    let (code, out, err) = chatctl(&["--endpoints", &all, "drain", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(replicas_on(&nodes, 1).await.is_empty(), "node 1 is empty");
    assert_eq!(replicas_on(&nodes, 4).await.len(), 4);
    load.wait_progress(20, "after drain").await;
    // A drained node stays out of rebalancing.
    let (code, out, _) = chatctl(&["--endpoints", &all, "rebalance", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(!out.contains("-> node 1"), "{out}");
    let (code, out, err) = chatctl(&["--endpoints", &all, "remove-node", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    // Brought back only on purpose.
    let (code, _, err) = chatctl(&["--endpoints", &all, "add-node", "--id", "1"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("--undrain"), "{err}");
    cluster.kill_node(1);
    load.wait_progress(20, "after node 1 stopped").await;

    // A node that died: drain replaces its voters from the live replicas.
    cluster.kill_node(2);
    load.wait_progress(10, "with node 2 dead").await;
    let (code, out, err) = chatctl(&["--endpoints", &all, "drain", "2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        replicas_on(&nodes, 5).await.len(),
        4,
        "node 5 took node 2's replicas"
    );
    load.wait_progress(20, "after draining the dead node").await;

    let history = load.stop().await;
    let findings = check_on(&nodes, &[3, 4, 5], &history).await;
    assert!(
        findings.is_empty(),
        "checker findings:\n{}",
        findings.join("\n")
    );
    let rest = endpoints(&cluster, &[3, 4, 5]);
    let (code, out, err) = chatctl(&["--endpoints", &rest, "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = chatctl(&["--endpoints", &rest, "status"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leadership_moves_by_hand_and_returns_after_restart_and_the_cli_fails_clearly() {
    let dir = TestDir::new("ops-leadership");
    let (mut cluster, nodes) = start_cluster_with(
        &dir.path,
        &ConfigOptions {
            shards: 3,
            ..Default::default()
        },
    )
    .await;
    let router = cluster.start_router("eu");
    router_client(&router).await;
    let load = Load::start(vec![router], 2);
    load.wait_progress(10, "at the start").await;
    let all = endpoints(&cluster, &[1, 2, 3]);

    // Shard 0's preferred region is eu (node 1).
    let preferred = nodes.placement.replicas(chatstore::types::ShardId(0))[0].0;
    let other = if preferred == 2 { 3 } else { 2 };
    let (code, out, err) = chatctl(&[
        "--endpoints",
        &all,
        "transfer-leader",
        "0",
        &other.to_string(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("now node {other}")), "{out}");
    let moved = Instant::now();
    // status names the shard led outside its preferred region: at once,
    // since leadership goes back by itself 5 election timeouts (8 s here)
    // after the move. A machine too slow to run status in 6 s says nothing.
    let (code, out, _) = chatctl(&["--endpoints", &all, "status"]);
    if moved.elapsed() < Duration::from_secs(6) {
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("preferred"), "{out}");
    } else {
        eprintln!(
            "status took {:?}; its answer is not checked",
            moved.elapsed()
        );
    }
    load.wait_progress(10, "after transfer-leader").await;
    // Leadership comes back on its own after the damping time.
    wait_leader(&nodes, 0, preferred, Duration::from_secs(60)).await;

    // A restart of the preferred node: another node leads meanwhile, and
    // leadership returns once it is back.
    cluster.kill_node(preferred);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match nodes.leader_of(0).await {
            Some(l) if l != preferred => break,
            _ => assert!(Instant::now() < deadline, "no new leader for shard 0"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    load.wait_progress(10, "with the preferred node down").await;

    // The CLI against a node that is down: clear errors, non-zero exits.
    let down = addr(&cluster, preferred);
    let (code, _, err) = chatctl(&["--endpoints", &down, "status"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no node answered") && err.contains(&down),
        "{err}"
    );
    let (code, _, err) = chatctl(&["--endpoints", &all, "status"]);
    assert_eq!(code, 2);
    assert!(err.contains(&format!("node {preferred}")), "{err}");
    let (code, _, err) = chatctl(&["--endpoints", &all, "rebalance"]);
    assert_eq!(code, 2);
    assert!(err.contains("is down"), "{err}");
    let (code, _, err) = chatctl(&["--endpoints", &all, "move-replica", "0", "2", "9"]);
    assert_eq!(code, 2);
    assert!(err.contains("node 9 is not known"), "{err}");
    let (code, _, err) = chatctl(&[
        "--endpoints",
        &all,
        "drain",
        &other.to_string(),
        "--dry-run",
    ]);
    assert_eq!(code, 2, "three nodes in three regions: nowhere to drain to");
    assert!(err.contains("add a node"), "{err}");

    cluster.start_node(preferred);
    wait_leader(&nodes, 0, preferred, Duration::from_secs(90)).await;
    load.wait_progress(10, "after the restart").await;

    // Moves that would leave a copy fewer are refused and change nothing.
    let (code, _, err) = chatctl(&["--endpoints", &all, "move-replica", "0", "1", "1"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("same node"), "{err}");
    let (code, _, err) = chatctl(&["--endpoints", &all, "move-replica", "0", "1", "2"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("already a voter"), "{err}");
    // A dry run refuses what the real run would.
    let (code, _, err) = chatctl(&[
        "--endpoints",
        &all,
        "move-replica",
        "0",
        "1",
        "2",
        "--dry-run",
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("already a voter"), "{err}");
    let (code, _, err) = chatctl(&[
        "--endpoints",
        &all,
        "transfer-leader",
        "0",
        "9",
        "--dry-run",
    ]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("not a voter of shard 0"), "{err}");
    let (code, _, err) = chatctl(&["--endpoints", &all, "transfer-leader", "999", "--dry-run"]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("no shard 999"), "{err}");
    let (code, _, err) = chatctl(&["--endpoints", &all, "remove-node", "9"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("node 9 is unknown"), "{err}");
    // A node takes no shard below its replication factor (two moves of one
    // shard at once would each remove a voter).
    let (_, refused) = remove_a_follower_of_shard_0(&cluster, &nodes, false).await;
    let refused = refused.expect_err("a voter of three removed");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(
        refused.message().contains("replication factor"),
        "{refused}"
    );
    // Dropping a learner never takes a voter (a move may have promoted it
    // since the caller looked).
    let (follower, kept) = remove_a_follower_of_shard_0(&cluster, &nodes, true).await;
    let kept = kept.expect("a learner-only removal of a voter changes nothing");
    assert!(kept.voters.contains(&follower), "{kept:?}");
    for node in 1..=3 {
        let replicas = replicas_on(&nodes, node).await;
        assert!(
            replicas.get(&0).is_some_and(|r| r.0),
            "node {node} is still a voter of shard 0: {replicas:?}"
        );
    }

    let history = load.stop().await;
    let findings = check_on(&nodes, &[1, 2, 3], &history).await;
    assert!(
        findings.is_empty(),
        "checker findings:\n{}",
        findings.join("\n")
    );
}

/// Asks shard 0's leader to remove one of its followers (as a learner
/// only, or as a voter), retrying while no leader answers; the follower and
/// the answer.
async fn remove_a_follower_of_shard_0(
    cluster: &ProcessCluster,
    nodes: &common::Client,
    learners_only: bool,
) -> (u64, Result<ShardStatus, tonic::Status>) {
    for _ in 0..50 {
        let leader = nodes.leader_of(0).await.expect("a leader of shard 0");
        let follower = (1..=3).find(|n| *n != leader).unwrap();
        let answer = AdminClient::connect(format!("http://{}", addr(cluster, leader)))
            .await
            .expect("admin client")
            .change_voters(ChangeVotersRequest {
                shard_id: 0,
                add: vec![],
                remove: vec![follower],
                learners_only,
            })
            .await;
        match answer {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => return (follower, other.map(|r| r.into_inner())),
        }
    }
    panic!("shard 0's leader did not answer");
}

async fn wait_leader(nodes: &common::Client, shard: u64, want: u64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if nodes.leader_of(shard).await == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "leadership of shard {shard} did not return to node {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A node whose clock runs 5 s ahead of its peers' (fault injection): its
/// pings show it, it hands every shard it leads to a node with a good clock
/// and is handed none back, not even after the hold time after which
/// leadership returns to a shard's preferred region (node 1's region is the
/// preferred one of a third of the shards). Writes go on, and `chatctl
/// status` names the clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_clock_is_off_gives_up_leadership_and_gets_none() {
    let dir = TestDir::new("clock-off");
    let opts = ConfigOptions {
        shards: 6,
        ..Default::default()
    };
    let mut procs = ProcessCluster::new(&dir.path, &opts);
    procs
        .node_args
        .insert(1, vec!["--clock-skew-ms".into(), "5000".into()]);
    procs.start_all_nodes();
    let nodes = common::Client::new(&procs.config);
    nodes
        .wait_leaders(&[1, 2, 3], Duration::from_secs(60))
        .await
        .unwrap();
    let status = |id: u64| {
        let mut client = nodes.node(id);
        async move {
            client
                .status(StatusRequest {})
                .await
                .map(|s| s.into_inner())
                .ok()
        }
    };

    let started = Instant::now();
    loop {
        let off_and_leads_nothing = status(1)
            .await
            .is_some_and(|s| s.clock_off && s.shards.iter().all(|sh| !sh.is_leader));
        if off_and_leads_nothing {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "node 1 still leads shards 60 s after start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s1 = status(1).await.unwrap();
    // 5 s off, measured to within half a ping's round trip (which a
    // loaded machine may stretch to seconds).
    assert!(
        (3_000..=5_500).contains(&s1.clock_offset_ms),
        "node 1 measures itself {} ms off",
        s1.clock_offset_ms
    );
    for id in [2, 3] {
        let s = status(id).await.unwrap();
        assert!(
            !s.clock_off,
            "node {id}'s clock is fine ({} ms)",
            s.clock_offset_ms
        );
    }
    nodes
        .wait_leaders(&[2, 3], Duration::from_secs(30))
        .await
        .unwrap();

    // Past the hold time after which leadership would return to node 1's
    // region, node 1 still leads nothing, and has had nothing to hand over
    // again (it would hand a shard back within a tick, between two polls,
    // so its log tells).
    let handovers = || {
        std::fs::read_to_string(procs.log_dir.join("node1.log"))
            .unwrap_or_default()
            .matches("handing leadership over")
            .count()
    };
    let handed_at_start = handovers();
    let hold = Duration::from_millis(procs.config.raft.election_timeout_ms_max * 5);
    let watched = Instant::now();
    while watched.elapsed() < hold + Duration::from_secs(2) {
        let leads = status(1)
            .await
            .map(|s| s.shards.iter().filter(|sh| sh.is_leader).count())
            .unwrap_or(0);
        assert_eq!(leads, 0, "node 1 was handed leadership back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        handovers(),
        handed_at_start,
        "node 1 was handed leadership back"
    );

    let addr = procs.start_router("eu");
    let mut api = router_client(&addr).await;
    for chat in 1..=6u64 {
        api.send(chatstore::api::pb::SendRequest {
            chat_id: chat,
            sender_id: 1,
            client_msg_id: chat,
            body: b"on time"[..].into(),
            ..Default::default()
        })
        .await
        .expect("send with node 1 leading nothing");
    }
    // Its replicas would judge what has expired by its clock: node 1 sends
    // readers elsewhere, and the router reads from a replica that answers.
    let refused = nodes
        .history_on(1, 1)
        .await
        .expect_err("node 1 serves no reads while its clock is off");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    assert!(refused.message().contains("clock"), "{refused}");
    let page = api
        .get_history(chatstore::api::pb::GetHistoryRequest {
            chat_id: 1,
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("a SESSION read through the router")
        .into_inner();
    assert_eq!(page.messages.len(), 1);
    let endpoints = procs.endpoints();
    let (code, out, _) = chatctl(&["--endpoints", &endpoints, "status"]);
    assert_eq!(
        code, 1,
        "a node with a bad clock makes the cluster unhealthy"
    );
    assert!(out.contains("CLOCK OFF"), "{out}");
    assert!(out.contains("node 1's clock is +"), "{out}");
}

/// With one replica, a shard's only voter leads: a move makes the target a
/// voter first, hands it leadership, then removes the source (a swap in one
/// change could never run there). The message written before is on the
/// new node, and the old node holds the shard no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_replica_shard_moves_to_another_node() {
    let dir = TestDir::new("ops-single");
    let (mut cluster, nodes) = start_cluster_with(
        &dir.path,
        &ConfigOptions {
            shards: 3,
            replication_factor: 1,
            extra_nodes: vec![(4, "eu")],
            ..Default::default()
        },
    )
    .await;
    let on1 = replicas_on(&nodes, 1).await;
    let shard = *on1.keys().next().expect("node 1 holds a shard");
    let chat = (1..1_000u64)
        .find(|c| nodes.shard_of(*c).0 == shard)
        .expect("a chat of the shard");
    nodes
        .write(
            chat,
            vec![common::send_cmd(chat, 1, 1, b"before the move")],
            Duration::from_secs(20),
        )
        .await
        .expect("write");
    cluster.start_node(4);
    let all = endpoints(&cluster, &[1, 2, 3, 4]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, _, _) = chatctl(&["--endpoints", &all, "add-node", "--id", "4"]);
        if code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, out, err) = chatctl(&[
        "--endpoints",
        &all,
        "move-replica",
        &shard.to_string(),
        "1",
        "4",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let on4 = replicas_on(&nodes, 4).await;
    assert!(
        on4.get(&shard).is_some_and(|r| r.0),
        "node 4 is the voter of shard {shard}: {on4:?}"
    );
    assert!(
        !replicas_on(&nodes, 1).await.contains_key(&shard),
        "node 1's copy is gone"
    );
    // Its data too, once its state machine let go of it.
    let snapshots = dir.path.join(format!("data/node1/snapshots/shard-{shard}"));
    assert!(!snapshots.exists(), "{} is left", snapshots.display());
    assert!(
        snapshots.parent().is_some_and(|d| d.exists()),
        "node 1 keeps its other shards' snapshots there"
    );
    // A forced close checked against a membership older than the one the
    // replica knows (another move may have added it again) is refused.
    let on4 = replicas_on(&nodes, 4).await;
    let refused = AdminClient::connect(format!("http://{}", addr(&cluster, 4)))
        .await
        .expect("admin client")
        .close_replica(CloseReplicaRequest {
            shard_id: shard,
            force: true,
            membership_index: Some(1),
        })
        .await
        .expect_err("a close checked against an older membership");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(refused.message().contains("newer"), "{refused}");
    assert_eq!(
        replicas_on(&nodes, 4).await.keys().collect::<Vec<_>>(),
        on4.keys().collect::<Vec<_>>()
    );
    let history = nodes.history_on(4, chat).await.expect("history on node 4");
    assert!(
        history.iter().any(|m| m.client_msg_id == 1),
        "the message moved with the shard: {history:?}"
    );
}
