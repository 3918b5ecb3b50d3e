//! Crash safety with real processes: SIGKILL nodes at random points during a
//! write load, restart them, and find every acknowledged message on every
//! replica, at the same seq, with gapless seqs and no duplicates.
//!
//! The seed is printed; `CHATSTORE_SEED=<n>` replays a schedule and
//! `CHATSTORE_CRASH_SECS` runs longer.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chatstore::api::pb::replicated::command_result::Outcome;
use rand::{Rng, SeedableRng};

use common::procs::ProcessCluster;
use common::{send_cmd, Client, ConfigOptions, TestDir};

fn seed() -> u64 {
    std::env::var("CHATSTORE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_writes_loses_nothing_acknowledged() {
    let seed = seed();
    let run_secs: u64 = std::env::var("CHATSTORE_CRASH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    eprintln!("crash test seed = {seed} (replay with CHATSTORE_SEED={seed}), {run_secs} s");
    let dir = TestDir::new("crash");
    let mut procs = ProcessCluster::new(
        &dir.path,
        &ConfigOptions {
            shards: 8,
            snapshot_every_entries: 200,
            logs_kept_behind_snapshot: 50,
            ..Default::default()
        },
    );
    procs.start_all_nodes();
    let client = Client::new(&procs.config);
    client
        .wait_leaders(&[1, 2, 3], Duration::from_secs(60))
        .await
        .expect("leaders elected");

    // (chat, client_msg_id) -> seq for acknowledged sends; unknown outcomes
    // are kept too, to check they appear at most once.
    let acked: Arc<Mutex<BTreeMap<(u64, u64), u64>>> = Arc::default();
    let unknown: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8u64 {
        let (client, acked, unknown, stop) =
            (client.clone(), acked.clone(), unknown.clone(), stop.clone());
        writers.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (w + 1));
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let chat = rng.random_range(1..=24u64);
                let cmid = (w + 1) * 10_000_000 + i;
                i += 1;
                let body = format!("w{w}-{i}");
                match client
                    .write(
                        chat,
                        vec![send_cmd(chat, 100 + w, cmid, body.as_bytes())],
                        Duration::from_secs(10),
                    )
                    .await
                {
                    Ok(r) => match r.results[0].outcome.clone() {
                        Some(Outcome::Send(s)) => {
                            acked.lock().unwrap().insert((chat, cmid), s.seq);
                        }
                        other => panic!("unexpected outcome {other:?}"),
                    },
                    Err(_) => unknown.lock().unwrap().push((chat, cmid)),
                }
            }
        });
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(run_secs) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
        kills += 1;
        // Every fourth kill takes the whole cluster down at once: what was
        // acknowledged must then come back from each node's own disk.
        if kills % 4 == 0 {
            eprintln!("t={:?}: SIGKILL every node", started.elapsed());
            for id in 1..=3u64 {
                procs.kill_node(id);
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1000))).await;
            procs.start_all_nodes();
            continue;
        }
        let victim = rng.random_range(1..=3u64);
        eprintln!("t={:?}: SIGKILL node {victim}", started.elapsed());
        procs.kill_node(victim);
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..2000))).await;
        procs.start_node(victim);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(r) = writers.join_next().await {
        r.expect("writer task");
    }
    let acked = acked.lock().unwrap().clone();
    let unknown = unknown.lock().unwrap().clone();
    eprintln!(
        "{kills} kills, {} acknowledged, {} unknown",
        acked.len(),
        unknown.len()
    );
    assert!(
        acked.len() > 100,
        "the workload made progress ({} acks)",
        acked.len()
    );

    client
        .wait_converged(&[1, 2, 3], Duration::from_secs(90))
        .await
        .expect("replicas converge after the faults");
    let chats: std::collections::BTreeSet<u64> = acked.keys().map(|(c, _)| *c).collect();
    for node in 1..=3u64 {
        for chat in &chats {
            let history = client.history_on(node, *chat).await.expect("read history");
            let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
            let expect: Vec<u64> = (1..=history.len() as u64).collect();
            assert_eq!(
                seqs, expect,
                "seed {seed}: node {node} chat {chat}: gapless seqs"
            );
            let mut by_cmid = BTreeMap::new();
            for m in &history {
                assert!(
                    by_cmid.insert(m.client_msg_id, m).is_none(),
                    "seed {seed}: node {node} chat {chat}: client_msg_id {} stored twice",
                    m.client_msg_id
                );
            }
            for ((c, cmid), seq) in acked.iter().filter(|((c, _), _)| c == chat) {
                let m = by_cmid.get(cmid).unwrap_or_else(|| {
                    panic!("seed {seed}: node {node}: acknowledged {c}/{cmid} is lost")
                });
                assert_eq!(
                    m.seq, *seq,
                    "seed {seed}: node {node}: acknowledged {c}/{cmid} must be at seq {seq}"
                );
                // Writer w sent its i-th message (cmid (w + 1) * 10^7 + i)
                // as sender 100 + w with body "w{w}-{i + 1}".
                let (w, i) = (cmid / 10_000_000 - 1, cmid % 10_000_000);
                assert_eq!(
                    (m.sender_id, &m.body[..]),
                    (100 + w, format!("w{w}-{}", i + 1).as_bytes()),
                    "seed {seed}: node {node}: {c}/{cmid} is stored as it was sent"
                );
            }
        }
    }
    let panics = common::chaos::panics_logged(&procs.log_dir);
    assert!(panics.is_empty(), "seed {seed}: panics: {panics:#?}");
}

/// A node whose data folder is gone (a wiped disk, a volume made anew) does
/// not rejoin under its old id while a leader counts it as holding part of a
/// shard's log: it would have forgotten what it acknowledged. It starts
/// nothing and says why; its data folder is not made.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_lost_its_data_does_not_rejoin_under_its_old_id() {
    let dir = TestDir::new("crash-forgotten");
    let (mut procs, client) = common::procs::start_cluster(&dir.path, 6).await;
    for chat in 1..=12u64 {
        client
            .write(
                chat,
                vec![send_cmd(chat, 1, chat, b"acknowledged")],
                Duration::from_secs(10),
            )
            .await
            .expect("write");
    }
    // Every replica of node 3 caught up, so each leader counts it.
    client
        .wait_converged(&[1, 2, 3], Duration::from_secs(60))
        .await
        .expect("converged");
    procs.kill_node(3);
    let data = procs.config.data_dir(chatstore::types::NodeId(3));
    std::fs::remove_dir_all(&data).expect("wipe node 3's data");
    procs.start_node(3);
    let status = procs
        .wait_exit(3, Duration::from_secs(60))
        .expect("node 3 refuses to start");
    assert!(!status.success());
    let log = std::fs::read_to_string(procs.log_dir.join("node3.log")).unwrap();
    assert!(log.contains("lost what it acknowledged"), "{log}");
    assert!(!data.exists(), "{} was made", data.display());
}
