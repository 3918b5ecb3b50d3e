//! Leadership follows each shard's preferred region: after the preferred
//! node dies, its shards elect leaders elsewhere and keep taking writes; when
//! it returns and has caught up, leadership moves back on its own.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chatstore::api::pb::node::StatusRequest;
use chatstore::cluster::Placement;
use chatstore::types::{NodeId, ShardId};
use common::procs::start_cluster;
use common::{send_cmd, Client, TestDir};

/// shard → leader node, as the live nodes report it.
async fn leaders(nodes: &Client, live: &[u64]) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for id in live {
        if let Ok(s) = nodes.node(*id).status(StatusRequest {}).await {
            for sh in s.into_inner().shards {
                if sh.is_leader {
                    out.insert(sh.shard_id, *id);
                }
            }
        }
    }
    out
}

/// Waits until every shard is led from its preferred region.
async fn wait_preferred(
    nodes: &Client,
    placement: &Placement,
    shards: u64,
    within: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    let mut last = BTreeMap::new();
    while started.elapsed() < within {
        last = leaders(nodes, &[1, 2, 3]).await;
        let ok = (0..shards).all(|s| {
            last.get(&s)
                .and_then(|n| placement.region_of(NodeId(*n)))
                .is_some_and(|r| r == placement.preferred_region(ShardId(s)))
        });
        if ok {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(format!(
        "leaders not in preferred regions after {within:?}: {last:?}"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leadership_returns_to_the_preferred_region_after_a_restart() {
    let dir = TestDir::new("leadership");
    let shards = 6u64;
    let (mut cluster, nodes) = start_cluster(&dir.path, shards as u32).await;
    let placement = Placement::new(&cluster.config);
    wait_preferred(&nodes, &placement, shards, Duration::from_secs(60))
        .await
        .unwrap();

    eprintln!("killing node 1 (eu)");
    cluster.kill_node(1);
    let eu_shards: Vec<u64> = (0..shards)
        .filter(|s| placement.preferred_region(ShardId(*s)) == "eu")
        .collect();
    assert!(!eu_shards.is_empty());
    // Every chat's shard keeps taking writes, eu ones from a new leader.
    for chat in 1..=30u64 {
        nodes
            .write(
                chat,
                vec![send_cmd(chat, 1, chat, b"during")],
                Duration::from_secs(30),
            )
            .await
            .expect("writes continue without the eu node");
    }
    let now = leaders(&nodes, &[2, 3]).await;
    for s in &eu_shards {
        assert!(
            matches!(now.get(s), Some(2) | Some(3)),
            "shard {s} elected a leader elsewhere: {now:?}"
        );
    }

    eprintln!("restarting node 1; leadership should come back to eu");
    cluster.start_node(1);
    wait_preferred(&nodes, &placement, shards, Duration::from_secs(60))
        .await
        .unwrap();
    nodes
        .wait_converged(&[1, 2, 3], Duration::from_secs(30))
        .await
        .unwrap();
}
