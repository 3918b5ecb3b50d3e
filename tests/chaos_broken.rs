//! The chaos checker is not vacuous: against a deliberately broken node (a
//! leader that acknowledges writes before a majority has them, feature
//! `broken-early-ack`), cutting off a busy leader makes the checker report
//! lost writes. `make test` runs this with the feature enabled.
#![cfg(feature = "broken-early-ack")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::chaos::{self, Chaos, Fault, History};
use rand::SeedableRng;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checker_reports_writes_lost_by_an_early_acking_leader() {
    let seed = 7;
    let mut c = Chaos::start(seed, "chaos-broken").await;
    let history = Arc::new(History::default());
    let stop = Arc::new(AtomicBool::new(false));
    let routers: Vec<String> = c.routers.values().cloned().collect();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..6 {
        tasks.spawn(chaos::run_session(
            s,
            seed,
            routers.clone(),
            history.clone(),
            stop.clone(),
        ));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut log = Vec::new();
    // Cut the busiest shard's leader off, twice, and kill one outright.
    c.inject(
        Fault::PartitionRegion,
        &mut rng,
        // Well past a new leader's election (about 2.5-3 s with the test
        // timings, longer on a loaded machine), so the broken leader's
        // early acks are lost for sure.
        Duration::from_secs(8),
        &mut log,
    )
    .await;
    c.inject(
        Fault::KillLeaderOfBusyShard,
        &mut rng,
        Duration::from_secs(2),
        &mut log,
    )
    .await;
    c.inject(
        Fault::PartitionRegion,
        &mut rng,
        // Well past a new leader's election (about 2.5-3 s with the test
        // timings, longer on a loaded machine), so the broken leader's
        // early acks are lost for sure.
        Duration::from_secs(8),
        &mut log,
    )
    .await;
    eprintln!("{}", log.join("\n"));
    c.heal_network();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    while tasks.join_next().await.is_some() {}
    let findings = chaos::check(&c, &history).await;
    let lost = findings.iter().filter(|f| f.starts_with("LOST")).count();
    eprintln!(
        "{} findings, {lost} lost writes; first: {:?}",
        findings.len(),
        findings.first()
    );
    assert!(
        lost > 0,
        "the checker must report the writes the broken leader lost"
    );
}
