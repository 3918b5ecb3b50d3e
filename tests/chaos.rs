//! Chaos tests: real processes, injected faults (SIGKILL of a node, of a busy
//! shard's leader and of a whole region, SIGSTOP/SIGCONT, full and one-way
//! partitions, router restarts), a recorded workload, and a checker over the
//! history and every replica. Each seed runs every fault kind in a seeded
//! order. `make chaos SEED=<n> DURATION=<s>` replays or runs longer.

mod common;

use common::chaos;

async fn run_seed(seed: u64, secs: u64) {
    let (findings, chaos) = chaos::run(seed, secs, &format!("chaos-{seed}")).await;
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

/// `make chaos SEED=... DURATION=...`: one seed from the environment.
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
    run_seed(seed, secs).await;
}
