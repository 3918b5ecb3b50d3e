//! Chaos tests: real processes, injected faults (SIGKILL of a node, of a busy
//! shard's leader and of a whole region, SIGSTOP/SIGCONT, full and one-way
//! partitions, router restarts), a recorded workload, and a checker over the
//! history and every replica. Each seed runs every fault kind in a seeded
//! order. `make chaos SEED=<n> DURATION=<s>` replays or runs longer.

mod common;

use common::chaos;

async fn run_seed(seed: u64, secs: u64) {
    run_seed_with(seed, secs, None).await
}

/// A seed with `[retention] change_retention_secs` (None: the default).
async fn run_seed_with(seed: u64, secs: u64, change_retention_secs: Option<u64>) {
    let name = format!("chaos-{seed}");
    let (findings, chaos) = chaos::run_with(seed, secs, &name, change_retention_secs).await;
    if !findings.is_empty() {
        for f in &findings {
            eprintln!("VIOLATION: {f}");
        }
        panic!(
            "seed {seed}: {} violations; history and data kept in {}",
            findings.len(),
            chaos.dir.path.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_seed_1() {
    run_seed(1, 25).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_seed_2() {
    run_seed(2, 25).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_seed_3() {
    run_seed(3, 25).await;
}

/// Change collection under the faults: a 3 s change retention, so
/// collection keeps dropping records that watchers and devices are reading
/// (devices move their cursors back now and then), and every reader must
/// still agree on every change it was told, or be told to reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_seed_4_with_change_collection() {
    run_seed_with(4, 25, Some(3)).await;
}

/// `make chaos SEED=... DURATION=... [RETENTION=s]`: one seed from the
/// environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "run by `make chaos`"]
async fn chaos_from_env() {
    let seed = std::env::var("CHATSTORE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let secs = std::env::var("CHATSTORE_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let retention = std::env::var("CHATSTORE_CHAOS_RETENTION_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    run_seed_with(seed, secs, retention).await;
}

/// A Watch served by a replica that is up but cut off from its leader
/// (so it applies nothing and answers every long poll with no news) moves
/// to another replica once the leader is known to be ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_leaves_a_replica_that_applies_nothing() {
    use chatstore::api::pb;
    use std::time::{Duration, Instant};

    let chaos = chaos::Chaos::start(0, "watch-stuck").await;
    // Node 2 is the us region's node: the us router's nearest replica. A
    // chat whose shard node 2 does not lead.
    let deadline = Instant::now() + Duration::from_secs(60);
    let chat = loop {
        let mut found = None;
        for chat in 1..200u64 {
            let shard = chaos.nodes.shard_of(chat).0;
            if matches!(chaos.nodes.leader_of(shard).await, Some(l) if l != 2) {
                found = Some(chat);
                break;
            }
        }
        if let Some(chat) = found {
            break chat;
        }
        assert!(Instant::now() < deadline, "no shard led by another node");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut api = common::procs::router_client(&chaos.routers["us"]).await;
    let send = |n: u64| pb::SendRequest {
        chat_id: chat,
        sender_id: 1,
        client_msg_id: n,
        body: format!("m{n}").into_bytes().into(),
        ..Default::default()
    };
    api.send(send(1)).await.expect("send");
    // A Watch served by node 2 (the router's nearest replica serves it
    // once it has applied the send): otherwise the test shows nothing.
    let mut opened = None;
    for _ in 0..20 {
        let mut stream = common::watch_chat(&mut api, chat, 0).await;
        let first = common::next_event(&mut stream, Duration::from_secs(20)).await;
        if first.served_by_node == 2 {
            opened = Some((stream, first));
            break;
        }
        eprintln!("first event served by node {}; again", first.served_by_node);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (mut stream, first) = opened.expect("the us router serves a Watch from node 2");

    // Node 2 loses its links to the other nodes; the router still reaches
    // it, and it still answers polls, with no news.
    chaos.cut_node_links(2, true);
    let cut = Instant::now();
    api.send(send(2)).await.expect("send through the leader");
    // Within 40 s of node 2 being cut off.
    let event = common::next_event(&mut stream, Duration::from_secs(40)).await;
    eprintln!(
        "event served by node {} {:?} after the cut",
        event.served_by_node,
        cut.elapsed()
    );
    assert_ne!(event.served_by_node, 2);
    assert!(event.pts > first.pts);
    chaos.heal_network();
}
