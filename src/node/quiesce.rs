//! Quiet shards (DESIGN section 3a): an idle shard stops its Raft timers, and
//! one ping per node pair stands in for the heartbeats of all of them.
//!
//! Every openraft group ticks on its own (heartbeats, election and lease
//! timers); at a thousand replicas per node that alone fills the CPU. So:
//! - **Quiesce.** A leader whose shard has had no write for
//!   `[raft] quiesce_after_ms`, whose log is committed and applied, and whose
//!   voters all hold its whole log (no learner, no joint membership) asks each
//!   follower to quiesce. A follower agrees only if it follows that leader at
//!   that term and holds exactly its log; it then stops its ticker. Once all
//!   agreed, and nothing was written meanwhile, the leader stops its own.
//! - **Wake.** A write or a LINEARIZABLE read on a quiet leader restarts its
//!   ticker and renews its lease with one heartbeat round before proposing
//!   (openraft refuses writes on a lapsed lease): the write pays one extra
//!   round trip. A quiet follower wakes on entries from the leader, on a vote
//!   request, on a pre-vote request unless it refuses it (its leader is
//!   alive; the leader wakes on one), on a snapshot and on a leadership
//!   transfer; an empty heartbeat leaves it quiet (the leader may send one or
//!   two while it quiesces). A leader whose leadership transfer no voter heard (it sends
//!   no heartbeats while it hands over) asks again after an election timeout
//!   and does not go quiet meanwhile (`duties::lead`).
//! - **Liveness.** Each node pings every peer that its replicas' memberships
//!   name once per heartbeat interval (each peer on its own, so one that does
//!   not answer holds back no other), and only while it is fit to lead. When
//!   the leader of a quiet replica here has not pinged this node for the
//!   longest election timeout, the replica wakes and elects as usual: a
//!   leader that cannot send to its followers cannot lead them, even if
//!   their pings to it are answered (then it is not gone by their pings
//!   alone), and a follower that cannot send to its leader is still led by
//!   it. A leader that has not pinged this node yet (since either started)
//!   counts as gone when it has not answered this node's pings for as long.
//!   A replica that knows no leader wakes too.
//!
//! Safety does not depend on any of this: it only decides when timers run.
//! A quiet leader that lost its followers to a partition still thinks it
//! leads, but a write there cannot renew the lease and is refused; the
//! partition's other side elects once pings fail.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use tokio::sync::watch;

use crate::api::pb::raft::{PingReply, PingRequest, QuiesceRequest};
use crate::node::clock::ClockSample;
use crate::node::{PeerAnswer, Registry};
use crate::shard::network::Peers;
use crate::shard::types::NodeAddr;
use crate::shard::Shard;
use crate::types::now_ms;

/// How long a peer may take to answer a quiesce request or a ping.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Quiesces `shard` if this node leads it, it has been idle for `after` and
/// every voter holds the whole log. Returns true if it is now quiet.
///
/// A follower that `answers` says has not answered pings lately is not
/// asked: the shard stays awake without waiting out a call to it, which
/// the node's chores would otherwise pay for every idle shard it leads.
pub async fn maybe_quiesce(
    shard: &Shard,
    peers: &Peers,
    after: Duration,
    answers: impl Fn(u64) -> bool,
) -> bool {
    if after.is_zero() || shard.is_quiet() || !shard.is_leader() || shard.idle_for() < after {
        return false;
    }
    let me = peers.self_id().0;
    let m = shard.raft.metrics().borrow_watched().clone();
    let last = m.last_log_index.unwrap_or(0);
    let membership = m.membership_config.membership();
    if membership.get_joint_config().len() > 1 || membership.learner_ids().next().is_some() {
        return false;
    }
    if m.cluster_committed.as_ref().map(|l| l.index) != Some(last)
        || m.last_applied.as_ref().map(|l| l.index) != Some(last)
    {
        return false;
    }
    let Some(replication) = m.replication.as_ref() else {
        return false;
    };
    let followers: Vec<(u64, NodeAddr)> = membership
        .voter_ids()
        .filter(|id| *id != me)
        .filter_map(|id| membership.get_node(&id).map(|n| (id, n.clone())))
        .collect();
    let caught_up = followers.iter().all(|(id, _)| {
        replication
            .get(id)
            .cloned()
            .flatten()
            .is_some_and(|l| l.index == last)
    });
    if !caught_up || !followers.iter().all(|(id, _)| answers(*id)) {
        return false;
    }
    let term = m.current_term;
    let asks = followers.iter().map(|(id, node)| {
        let client = peers.client(*id, &node.addr, &node.region);
        let shard_id = shard.id.0;
        async move {
            let mut client = client.ok()?;
            let mut req = tonic::Request::new(QuiesceRequest {
                shard_id,
                from_node: me,
                term,
                last_log_index: last,
            });
            req.set_timeout(CALL_TIMEOUT);
            client.quiesce(req).await.ok().map(|r| r.into_inner().quiet)
        }
    });
    let answers = futures::future::join_all(asks).await;
    if !answers.iter().all(|a| *a == Some(true)) {
        // Followers that agreed wake with the next entry.
        return false;
    }
    // Nothing may have been written while the followers were asked.
    let now = shard.raft.metrics().borrow_watched().clone();
    if !shard.is_leader() || now.last_log_index != Some(last) || !shard.quiesce_if_idle(after) {
        return false;
    }
    tracing::debug!(shard = %shard.id, index = last, "shard quiet");
    true
}

/// Pings every peer the hosted shards' memberships name, and wakes the quiet
/// replicas whose leader stopped pinging this node, until `shutdown`.
///
/// Each peer's ping runs on its own, and a peer is pinged again once its
/// last ping ended: a peer that does not answer (each ping waits up to a
/// second) does not hold back the pings of the others, so a live leader's
/// pings keep coming every `every` while another peer is cut off. A node
/// that cannot lead (`Registry::unfit_to_lead`) pings no one, so the quiet
/// shards it leads wake elsewhere.
pub async fn run_liveness(
    registry: Registry,
    every: Duration,
    dead_after: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let me = registry.node_id().0;
    let mut last_answer: HashMap<u64, Instant> = HashMap::new();
    let mut peers: BTreeMap<u64, NodeAddr> = BTreeMap::new();
    // Each ping's peer, answer (with when it was sent and its round trip)
    // and arrival.
    let (answers, mut answered) =
        tokio::sync::mpsc::unbounded_channel::<(u64, Option<(PingReply, u64, Duration)>, Instant)>(
        );
    let mut pinging: HashSet<u64> = HashSet::new();
    let mut round: u64 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let shards = registry.all();
        // The peer list changes only with membership: refreshed every so
        // often, not every round.
        if round.is_multiple_of(20) {
            peers = known_peers(&shards, me);
        }
        round += 1;
        while let Ok((id, answer, at)) = answered.try_recv() {
            pinging.remove(&id);
            let Some((answer, sent_ms, round_trip)) = answer else {
                continue;
            };
            last_answer.insert(id, at);
            registry.note_peer_answer(
                id,
                PeerAnswer {
                    at,
                    rules: answer.apply_rules,
                    // A binary from before the clock check answers without
                    // its clock: no sample.
                    clock: (answer.now_ms != 0)
                        .then(|| ClockSample::from_ping(sent_ms, round_trip, answer.now_ms)),
                },
            );
        }
        let fit = registry.unfit_to_lead().is_none();
        for (id, node) in peers.iter().filter(|_| fit) {
            if pinging.contains(id) {
                continue;
            }
            // A peer's first ping starts its time to answer.
            last_answer.entry(*id).or_insert_with(Instant::now);
            let Ok(mut client) = registry.peers().client(*id, &node.addr, &node.region) else {
                continue;
            };
            pinging.insert(*id);
            let (id, answers) = (*id, answers.clone());
            tokio::spawn(async move {
                let mut req = tonic::Request::new(PingRequest { from_node: me });
                req.set_timeout(CALL_TIMEOUT.min(dead_after));
                let (sent_ms, sent) = (now_ms(), Instant::now());
                let answer = client.ping(req).await.ok().map(|a| a.into_inner());
                let answer = answer.map(|a| (a, sent_ms, sent.elapsed()));
                let _ = answers.send((id, answer, Instant::now()));
            });
        }
        let mut unknown_leader = false;
        for shard in shards.iter().filter(|s| s.is_quiet()) {
            let leader = shard.raft.metrics().borrow_watched().current_leader;
            let gone = match leader {
                None => true,
                Some(l) if l == me => false,
                // A leader this node has not pinged yet (it joined since the
                // peer list was made) gets the same time to answer as any
                // peer, from now: it is pinged from the next round on.
                Some(l) => {
                    let answered = last_answer
                        .entry(l)
                        .or_insert_with(|| {
                            unknown_leader = true;
                            Instant::now()
                        })
                        .elapsed()
                        < dead_after;
                    !registry.leader_alive(l, dead_after, answered)
                }
            };
            if gone && shard.wake() {
                tracing::info!(shard = %shard.id, ?leader, "waking a quiet replica: its leader is gone");
                metrics::counter!(crate::metrics::SHARD_WAKES, "cause" => "leader gone")
                    .increment(1);
            }
        }
        if unknown_leader {
            peers = known_peers(&shards, me);
        }
    }
}

/// Every other node in the memberships of `shards`.
fn known_peers(shards: &[Arc<Shard>], me: u64) -> BTreeMap<u64, NodeAddr> {
    let mut out = BTreeMap::new();
    for s in shards {
        let m = s.raft.metrics().borrow_watched().membership_config.clone();
        for (id, node) in m.membership().nodes() {
            if *id != me {
                out.entry(*id).or_insert_with(|| node.clone());
            }
        }
    }
    out
}
