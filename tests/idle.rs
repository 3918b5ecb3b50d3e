//! `make bench-idle`: what idle shards cost a node. Three node processes
//! host 100 and then 1,000 shards (a replica of each on every node), once
//! with quiescence and once with every shard ticking; after the cluster
//! settles, CPU is read from /proc over a fixed window and RSS from
//! /proc/<pid>/status. Then the cost of waking: writes to quiet shards
//! against writes to the same shards once awake. Prints a table and writes
//! its section of BENCHMARKS.md. A benchmark, not a timed test: ignored in
//! `make test`.

mod common;

use std::time::{Duration, Instant};

use chatstore::api::pb::node::StatusRequest;
use common::procs::ProcessCluster;
use common::{send_cmd, ConfigOptions, TestDir};

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

struct Row {
    shards: u32,
    quiesce: bool,
    cpu_pct: [f64; 3],
    rss_mib: [f64; 3],
    settle: Duration,
    wake_ms: Vec<f64>,
    warm_ms: Vec<f64>,
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        return 0.0;
    }
    s[((s.len() - 1) as f64 * p).round() as usize]
}

async fn measure(shards: u32, quiesce: bool, window: Duration) -> Row {
    let dir = TestDir::new(&format!("idle-{shards}"));
    let mut cluster = ProcessCluster::new(
        &dir.path,
        &ConfigOptions {
            shards,
            // WAN defaults, as a real deployment runs.
            raft_timing: Some((250, 750, 1000)),
            quiesce_after_ms: if quiesce { 3_000 } else { 0 },
            ..Default::default()
        },
    );
    cluster.start_all_nodes();
    let nodes = common::Client::new(&cluster.config);
    let started = Instant::now();
    nodes
        .wait_leaders(&[1, 2, 3], Duration::from_secs(300))
        .await
        .expect("every shard elects");
    // Settle: every replica quiet (with quiescence), or a fixed pause.
    if quiesce {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let mut quiet = 0;
            for id in 1..=3 {
                if let Ok(s) = nodes.node(id).status(StatusRequest {}).await {
                    quiet += s.into_inner().shards.iter().filter(|s| s.quiet).count();
                }
            }
            if quiet == 3 * shards as usize {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {quiet} replicas went quiet"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    } else {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let settle = started.elapsed();
    let pids: Vec<u32> = (1..=3).map(|id| cluster.node_pid(id).unwrap()).collect();
    let before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t0.elapsed().as_secs_f64();
    let mut cpu_pct = [0.0; 3];
    let mut rss = [0.0; 3];
    for i in 0..3 {
        cpu_pct[i] = (cpu_secs(pids[i]) - before[i]) / secs * 100.0;
        rss[i] = rss_mib(pids[i]);
    }
    // Waking: one write to each of 20 quiet shards, then the same again.
    let mut chats = std::collections::BTreeMap::new();
    for chat in 1..100_000u64 {
        chats.entry(nodes.shard_of(chat).0).or_insert(chat);
        if chats.len() >= 20 {
            break;
        }
    }
    let mut wake_ms = Vec::new();
    let mut warm_ms = Vec::new();
    for (round, out) in [(1u64, &mut wake_ms), (2, &mut warm_ms)] {
        for chat in chats.values() {
            let t = Instant::now();
            nodes
                .write(
                    *chat,
                    vec![send_cmd(*chat, 1, round, b"x")],
                    Duration::from_secs(30),
                )
                .await
                .expect("write");
            out.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Row {
        shards,
        quiesce,
        cpu_pct,
        rss_mib: rss,
        settle,
        wake_ms,
        warm_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench-idle"]
async fn bench_idle() {
    let window = Duration::from_secs(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20),
    );
    let mut rows = Vec::new();
    for shards in [100u32, 1_000] {
        for quiesce in [true, false] {
            let row = measure(shards, quiesce, window).await;
            eprintln!(
                "{} shards, quiesce {}: cpu {:?} %, rss {:?} MiB",
                row.shards, row.quiesce, row.cpu_pct, row.rss_mib
            );
            rows.push(row);
        }
    }
    let mut section = format!(
        "Three node processes on one host, a replica of every shard on each (so each node hosts \
         all the shards); WAN timing (heartbeat 250 ms, election 750-1000 ms); idle for {} s \
         after every replica went quiet (quiescence on, `quiesce_after_ms` 3000) or 5 s after \
         the last election (off). CPU is the node's utime + stime over the window, in % of one \
         core; RSS from /proc. Then one write to each of 20 shards (the first wakes a quiet \
         shard), and the same writes again (awake), through the node API.\n\n\
         | shards per node | quiescence | CPU per node (% of a core) | RSS per node (MiB) | \
         RSS per replica (KiB) | first write p50 / max (ms) | awake write p50 / max (ms) |\n\
         |---|---|---|---|---|---|---|\n",
        window.as_secs()
    );
    for r in &rows {
        let cpu = r.cpu_pct.iter().sum::<f64>() / 3.0;
        let cpu_max = r.cpu_pct.iter().cloned().fold(0.0, f64::max);
        let rss = r.rss_mib.iter().sum::<f64>() / 3.0;
        section.push_str(&format!(
            "| {} | {} | {cpu:.1} (max {cpu_max:.1}) | {rss:.0} | {:.0} | {:.1} / {:.1} | {:.1} / {:.1} |\n",
            r.shards,
            if r.quiesce { "on" } else { "off" },
            rss * 1024.0 / r.shards as f64,
            pct(&r.wake_ms, 0.5),
            pct(&r.wake_ms, 1.0),
            pct(&r.warm_ms, 0.5),
            pct(&r.warm_ms, 1.0),
        ));
    }
    section.push_str(&format!(
        "\nStart-up to settled: {}.\n",
        rows.iter()
            .map(|r| format!(
                "{} shards {} {:.0} s",
                r.shards,
                if r.quiesce { "quiet" } else { "ticking" },
                r.settle.as_secs_f64()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    println!("{section}");
    common::write_bench_section(
        "bench-idle",
        "Idle shards and quiescence (`make bench-idle`)",
        &section,
    );
}
