//! Geo behaviour on a simulated three-region deployment: nodes and routers
//! delay every call between regions by the config's round trips (eu/us
//! 20 ms, us/ap 40 ms, eu/ap 60 ms; shorter than a real WAN so CI stays fast).
//! - every shard is led from its preferred region;
//! - a router answers SESSION reads, GetDifference and Watch from the
//!   replica in its own region (the responses name the serving node);
//! - killing a region (node 1 is all of eu) moves its shards' leadership
//!   elsewhere while writes continue; when it returns it catches up and
//!   leadership moves back on its own.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chatstore::api::pb::node::StatusRequest;
use chatstore::api::pb::{self, chat_store_client::ChatStoreClient};
use chatstore::cluster::Placement;
use chatstore::types::{NodeId, ShardId};
use common::procs::{router_client, start_cluster_with};
use common::{send_cmd, Client, ConfigOptions, TestDir};
use tonic::transport::Channel;

/// Node of each region in the test cluster.
const REGION_NODES: [(&str, u64); 3] = [("eu", 1), ("us", 2), ("ap", 3)];

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

/// A chat whose shard prefers a region other than `region`.
fn chat_homed_away_from(placement: &Placement, region: &str) -> u64 {
    (1..10_000u64)
        .find(|c| {
            placement.preferred_region(placement.shard_of_chat(chatstore::types::ChatId(*c)))
                != region
        })
        .expect("some chat is homed elsewhere")
}

fn chat_homed_in(placement: &Placement, region: &str) -> u64 {
    (1..10_000u64)
        .find(|c| {
            placement.preferred_region(placement.shard_of_chat(chatstore::types::ChatId(*c)))
                == region
        })
        .expect("some chat is homed here")
}

async fn send(api: &mut ChatStoreClient<Channel>, chat: u64, cmid: u64) -> pb::SendResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match api
            .send(pb::SendRequest {
                chat_id: chat,
                sender_id: 7,
                client_msg_id: cmid,
                body: format!("geo {cmid}").into_bytes().into(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => return r.into_inner(),
            Err(s) if Instant::now() < deadline => {
                eprintln!("send: {s}; retrying with the same id");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("send: {s}"),
        }
    }
}

/// Waits (at most 30 s) until `node`'s replica of `chat` holds `seq`.
async fn wait_applied_on(nodes: &Client, node: u64, chat: u64, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(h) = nodes.history_on(node, chat).await {
            if h.iter().any(|m| m.seq == seq) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {node} did not apply seq {seq} of chat {chat} in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaders_and_reads_stay_in_their_regions_and_a_region_fails_over_and_returns() {
    let dir = TestDir::new("geo");
    let shards = 6u64;
    let (mut cluster, nodes) = start_cluster_with(
        &dir.path,
        &ConfigOptions {
            shards: shards as u32,
            rtt_ms: Some((20, 40, 60)),
            ..Default::default()
        },
    )
    .await;
    let placement = Placement::new(&cluster.config);
    wait_preferred(&nodes, &placement, shards, Duration::from_secs(60))
        .await
        .unwrap();

    for (region, node) in REGION_NODES {
        let addr = cluster.start_router(region);
        let mut api = router_client(&addr).await;
        let chat = chat_homed_away_from(&placement, region);
        eprintln!(
            "router {region}: chat {chat} is homed in {}",
            placement.preferred_region(placement.shard_of_chat(chatstore::types::ChatId(chat)))
        );
        let w = send(&mut api, chat, 1).await;
        // A SESSION read waits 1 s for the local replica before going to
        // the leader: that the local one serves it should not depend on
        // how fast a loaded machine applies the write there.
        wait_applied_on(&nodes, node, chat, w.seq).await;
        let h = api
            .get_history(pb::GetHistoryRequest {
                chat_id: chat,
                limit: 10,
                min_token: w.read_token.clone(),
                ..Default::default()
            })
            .await
            .expect("SESSION history")
            .into_inner();
        assert!(h.messages.iter().any(|m| m.seq == w.seq), "read your write");
        assert_eq!(h.served_by_node, node, "SESSION read served in {region}");
        let d = api
            .get_difference(pb::GetDifferenceRequest {
                cursors: vec![pb::Cursor {
                    chat_id: chat,
                    pts: 0,
                }],
                min_token: w.read_token.clone(),
                ..Default::default()
            })
            .await
            .expect("GetDifference")
            .into_inner();
        assert!(!d.chats[0].changes.is_empty());
        assert_eq!(
            d.chats[0].served_by_node, node,
            "GetDifference served in {region}"
        );
        let mut stream = common::watch_chat(&mut api, chat, 0).await;
        let event = common::next_event(&mut stream, Duration::from_secs(20)).await;
        assert_eq!(event.served_by_node, node, "Watch served in {region}");

        // A chat homed here: its leader is the local node, and a Watch
        // long-polls it too once the chat is idle (it used to refuse the
        // poll for the entry after its log's end, which sent the Watch to
        // a replica in another region).
        let home = chat_homed_in(&placement, region);
        send(&mut api, home, 1).await;
        let mut stream = common::watch_chat(&mut api, home, 0).await;
        common::next_event(&mut stream, Duration::from_secs(20)).await;
        // Long enough for the Watch to be polling for news, not the time
        // the test needs.
        tokio::time::sleep(Duration::from_millis(500)).await;
        send(&mut api, home, 2).await;
        let event = common::next_event(&mut stream, Duration::from_secs(20)).await;
        assert_eq!(
            event.served_by_node, node,
            "Watch of a chat homed in {region} served by its leader"
        );
    }

    eprintln!("killing the eu region (node 1)");
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

/// Latency percentiles in ms of a sample of durations.
struct Percentiles {
    count: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    Percentiles {
        count: samples.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: at(1.0),
    }
}

/// Sum of every shard's term as the live nodes report it: it moves only on
/// elections.
async fn term_sum(nodes: &Client, live: &[u64]) -> u64 {
    let mut best: BTreeMap<u64, u64> = BTreeMap::new();
    for id in live {
        if let Ok(s) = nodes.node(*id).status(StatusRequest {}).await {
            for sh in s.into_inner().shards {
                let t = best.entry(sh.shard_id).or_default();
                *t = (*t).max(sh.term);
            }
        }
    }
    best.values().sum()
}

/// `make bench-geo`: the geo numbers on a simulated deployment with the
/// round trips of `cluster-configs/local-3region.toml` (eu/us 80 ms, us/ap
/// 150 ms, eu/ap 200 ms). Per region, through that region's router, one
/// request at a time: writes to chats homed in the region, SESSION reads and
/// GetDifference (with the write's token), next to the physical floor (the
/// round trip to the nearest other region, which a commit needs). Then the
/// eu region is killed under a writer sending through the us router to eu
/// chats, and the time to its first acknowledged write is measured, and the
/// time until leadership is back in eu after the region returns. At the end
/// every acknowledged message must be on every replica. Writes a section of
/// BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark: run with `make bench-geo` (release build)"]
async fn bench_geo() {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let rtt = (80u64, 150u64, 200u64);
    // The WAN defaults a deployment runs with.
    let timing = {
        let t = chatstore::cluster::RaftTiming::default();
        (
            t.heartbeat_ms,
            t.election_timeout_ms_min,
            t.election_timeout_ms_max,
        )
    };
    let dir = TestDir::new("bench-geo");
    let shards = 12u64;
    let (mut cluster, nodes) = start_cluster_with(
        &dir.path,
        &ConfigOptions {
            shards: shards as u32,
            rtt_ms: Some(rtt),
            // The WAN defaults a deployment runs with.
            raft_timing: Some(timing),
            ..Default::default()
        },
    )
    .await;
    let placement = Placement::new(&cluster.config);
    wait_preferred(&nodes, &placement, shards, Duration::from_secs(60))
        .await
        .unwrap();
    let mut routers = BTreeMap::new();
    for (region, _) in REGION_NODES {
        let addr = cluster.start_router(region);
        routers.insert(region, router_client(&addr).await);
    }
    let floor = |region: &str| -> u64 {
        match region {
            "eu" => rtt.0.min(rtt.2),
            "us" => rtt.0.min(rtt.1),
            _ => rtt.1.min(rtt.2),
        }
    };
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let mut rows = Vec::new();
    let terms_before = term_sum(&nodes, &[1, 2, 3]).await;
    let mut cmid = 1u64;
    for (region, node) in REGION_NODES {
        let api = routers.get_mut(region).unwrap();
        let home: Vec<u64> = (1..100_000u64)
            .filter(|c| {
                placement.preferred_region(placement.shard_of_chat(chatstore::types::ChatId(*c)))
                    == region
            })
            .take(20)
            .collect();
        let (mut writes, mut reads, mut diffs) = (Vec::new(), Vec::new(), Vec::new());
        let mut served_elsewhere = 0;
        let started = Instant::now();
        let mut i = 0;
        while started.elapsed() < Duration::from_secs(secs) {
            let chat = home[i % home.len()];
            i += 1;
            let t = Instant::now();
            let w = send(api, chat, cmid).await;
            writes.push(t.elapsed());
            acked.push((chat, w.seq));
            cmid += 1;
            let t = Instant::now();
            let h = api
                .get_history(pb::GetHistoryRequest {
                    chat_id: chat,
                    limit: 20,
                    min_token: w.read_token.clone(),
                    ..Default::default()
                })
                .await
                .expect("SESSION read")
                .into_inner();
            reads.push(t.elapsed());
            if h.served_by_node != node {
                served_elsewhere += 1;
            }
            let t = Instant::now();
            api.get_difference(pb::GetDifferenceRequest {
                cursors: vec![pb::Cursor {
                    chat_id: chat,
                    pts: w.pts.saturating_sub(5),
                }],
                min_token: w.read_token.clone(),
                ..Default::default()
            })
            .await
            .expect("GetDifference");
            diffs.push(t.elapsed());
        }
        let (w, r, d) = (percentiles(writes), percentiles(reads), percentiles(diffs));
        eprintln!(
            "{region}: writes p50 {:.1} p99 {:.1} (floor {} ms); SESSION reads p50 {:.1} p99 {:.1}; GetDifference p50 {:.1} p99 {:.1}; reads served outside the region: {served_elsewhere}",
            w.p50, w.p99, floor(region), r.p50, r.p99, d.p50, d.p99
        );
        rows.push(format!(
            "| {region} | {} | {} | {:.1} | {:.1} | {:.1} | +{:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {served_elsewhere} |",
            w.count,
            floor(region),
            w.p50,
            w.p99,
            w.max,
            w.p50 - floor(region) as f64,
            r.p50,
            r.p99,
            d.p50,
            d.p99
        ));
    }
    let elections = term_sum(&nodes, &[1, 2, 3]).await - terms_before;

    // Waking quiet shards: once every replica has gone quiet, through each
    // region's router two writes in a row to a chat of each shard homed
    // there. The first wakes the shard, the second finds it awake.
    common::wait_all_quiet(&nodes, &[1, 2, 3], shards, Duration::from_secs(60)).await;
    let mut wake_rows = Vec::new();
    for (region, _) in REGION_NODES {
        let api = routers.get_mut(region).unwrap();
        let (mut first, mut awake) = (Vec::new(), Vec::new());
        for shard in (0..shards).filter(|s| placement.preferred_region(ShardId(*s)) == region) {
            let chat = (1..100_000u64)
                .find(|c| placement.shard_of_chat(chatstore::types::ChatId(*c)) == ShardId(shard))
                .expect("a chat of every shard");
            for times in [&mut first, &mut awake] {
                let t = Instant::now();
                let w = send(api, chat, cmid).await;
                times.push(t.elapsed());
                acked.push((chat, w.seq));
                cmid += 1;
            }
        }
        let (f, a) = (percentiles(first), percentiles(awake));
        let trips = |ms: f64| ms / floor(region) as f64;
        eprintln!(
            "{region}: first write to a quiet shard p50 {:.1} max {:.1} ms, awake p50 {:.1} ms (floor {} ms)",
            f.p50, f.max, a.p50, floor(region)
        );
        wake_rows.push(format!(
            "| {region} | {} | {} | {:.1} / {:.1} | {:.2} / {:.2} | {:.1} / {:.1} |",
            f.count,
            floor(region),
            f.p50,
            f.max,
            trips(f.p50),
            trips(f.max),
            a.p50,
            a.max
        ));
    }

    // Region failure: a writer sends to eu-homed chats through the us router
    // (eu's router would die with its region in a real outage).
    let eu_chats: Vec<u64> = (1..100_000u64)
        .filter(|c| {
            placement.preferred_region(placement.shard_of_chat(chatstore::types::ChatId(*c)))
                == "eu"
        })
        .take(5)
        .collect();
    let mut us = routers.get("us").unwrap().clone();
    for chat in &eu_chats {
        let w = send(&mut us, *chat, cmid).await;
        acked.push((*chat, w.seq));
        cmid += 1;
    }
    eprintln!("killing the eu region (node 1)");
    let eu_shards: Vec<u64> = (0..shards)
        .filter(|s| placement.preferred_region(ShardId(*s)) == "eu")
        .collect();
    let killed = Instant::now();
    cluster.kill_node(1);
    // When the surviving nodes report a leader for every eu shard.
    let elected = {
        let nodes = nodes.clone();
        let eu_shards = eu_shards.clone();
        tokio::spawn(async move {
            loop {
                let now = leaders(&nodes, &[2, 3]).await;
                if eu_shards.iter().all(|s| now.contains_key(s)) {
                    return killed.elapsed();
                }
                if killed.elapsed() > Duration::from_secs(60) {
                    return killed.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut first_ack = None;
    let mut i = 0;
    while killed.elapsed() < Duration::from_secs(60) {
        let chat = eu_chats[i % eu_chats.len()];
        i += 1;
        let r = us
            .send(pb::SendRequest {
                chat_id: chat,
                sender_id: 7,
                client_msg_id: cmid,
                body: b"during failover"[..].into(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(w) => {
                acked.push((chat, w.into_inner().seq));
                cmid += 1;
                if first_ack.is_none() {
                    first_ack = Some(killed.elapsed());
                }
                if killed.elapsed() > Duration::from_secs(5) {
                    break;
                }
            }
            Err(s) => {
                // Retried with the same id: a send that did commit is
                // reported as a duplicate, not stored twice.
                eprintln!("during failover: {s}");
            }
        }
    }
    let first_ack = first_ack.expect("writes resumed within 60 s of losing eu");
    let elected = elected.await.unwrap();
    eprintln!(
        "first acknowledged write {:.2} s after killing eu",
        first_ack.as_secs_f64()
    );
    cluster.start_node(1);
    let restarted = Instant::now();
    wait_preferred(&nodes, &placement, shards, Duration::from_secs(120))
        .await
        .unwrap();
    let returned = restarted.elapsed();
    nodes
        .wait_converged(&[1, 2, 3], Duration::from_secs(60))
        .await
        .expect("replicas converge");
    let mut by_chat: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (chat, seq) in &acked {
        by_chat.entry(*chat).or_default().push(*seq);
    }
    for node in 1..=3 {
        for (chat, seqs) in &by_chat {
            let h = nodes.history_on(node, *chat).await.expect("history");
            for seq in seqs {
                assert!(
                    h.iter().any(|m| m.seq == *seq),
                    "acknowledged message {chat}/{seq} is missing on node {node}"
                );
            }
        }
    }

    let section = format!(
        "Round trips eu/us {} ms, us/ap {} ms, eu/ap {} ms (simulated by nodes and routers), \
         {shards} shards, 3 nodes (one per region) and a router per region on one host, \
         Raft timing defaults (heartbeat {} ms, election timeout {}-{} ms), \
         one request at a time per region for {secs} s each; release build; \
         `make bench-geo` (`BENCH_SECS` sets the seconds per region).\n\n\
         | region | writes | floor (ms) | write p50 | write p99 | write max | p50 over floor | SESSION read p50 | SESSION read p99 | GetDifference p50 | GetDifference p99 | reads served outside the region |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n{}\n\n\
         - Elections during the steady runs: {elections} (sum of term changes over all shards).\n\n\
         Waking a quiet shard: once every replica of every shard was quiet (`quiesce_after_ms` \
         1500), two writes in a row through each region's router to a chat of each shard homed \
         there; the first wakes the shard (its leader renews its lease with one heartbeat \
         round before it commits), the second finds it awake. Round trips are the write's time \
         over the floor.\n\n\
         | region | shards woken | floor (ms) | first write p50 / max (ms) | first write in round trips p50 / max | awake write p50 / max (ms) |\n\
         |---|---|---|---|---|---|\n{}\n\n\
         - Killing the eu region under a writer (us router, eu-homed chats): every eu shard had a \
         new leader after {:.2} s; the first acknowledged write came **{:.2} s** after the kill.\n\
         - eu restarted: every shard led from its preferred region again after {:.1} s.\n\
         - Every one of the {} acknowledged writes was found on every replica afterwards.\n",
        rtt.0,
        rtt.1,
        rtt.2,
        timing.0,
        timing.1,
        timing.2,
        rows.join("\n"),
        wake_rows.join("\n"),
        elected.as_secs_f64(),
        first_ack.as_secs_f64(),
        returned.as_secs_f64(),
        acked.len()
    );
    println!("{section}");
    common::write_bench_section("bench-geo", "Geo-distribution (`make bench-geo`)", &section);
}
