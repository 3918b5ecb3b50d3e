//! Cluster operations: status, shards, moving replicas, draining and
//! removing nodes, leadership, rebalancing, snapshots and compaction.
//!
//! chatctl learns the cluster from the nodes it is given (`--endpoints`) and
//! from the shard memberships they report, so a node that joined later is
//! found once any shard lists it. Every operation is a sequence of idempotent
//! admin calls (see `proto/chatstore/v1/node.proto`, service `Admin`): an
//! operation cut short (a leader change, a crash, Ctrl-C) is finished by
//! running the same command again.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::api::pb::node::admin_client::AdminClient;
use crate::api::pb::node::node_api_client::NodeApiClient;
use crate::api::pb::node::{
    AddLearnerRequest, ChangeVotersRequest, CloseReplicaRequest, NodeStatus, SetDrainingRequest,
    ShardRequest, ShardStatus, StatusRequest, TransferLeaderRequest,
};
use crate::api::status::leader_hint;
use crate::cluster::placement;
use crate::security::AuthChannel;

/// How long one move may take, catch-up by snapshot included.
const MOVE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a step waits for a shard to have a leader that answers.
const LEADER_WAIT: Duration = Duration::from_secs(60);
/// How often progress is polled.
const POLL: Duration = Duration::from_millis(250);
/// A replica this far behind its leader's log counts as lagging.
pub const LAG_MAX: u64 = 100;

/// One node as chatctl sees it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub id: u64,
    pub addr: String,
    pub region: String,
    pub up: bool,
    pub draining: bool,
    /// How far the node's clock is off from its peers' (ms, positive: ahead).
    pub clock_offset_ms: i64,
    /// Beyond the bound: the node gives up leadership.
    pub clock_off: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    pub shards: BTreeMap<u64, ShardStatus>,
}

impl NodeView {
    /// A node that did not answer.
    fn down(id: u64, addr: String, region: String, error: String) -> NodeView {
        NodeView {
            id,
            addr,
            region,
            up: false,
            draining: false,
            clock_offset_ms: 0,
            clock_off: false,
            error: Some(error),
            shards: BTreeMap::new(),
        }
    }
}

/// The cluster as the reachable nodes report it.
pub struct View {
    pub nodes: BTreeMap<u64, NodeView>,
    /// Endpoints that did not answer and that no membership names.
    pub unknown_down: Vec<(String, String)>,
    pub shard_count: u64,
    pub cluster_name: String,
    /// Voters per shard in the cluster's config (0 if no node said).
    pub replication_factor: u32,
}

impl View {
    /// The status of `shard` from its leader: the replica that says it
    /// leads, at the highest term.
    pub fn leader_status(&self, shard: u64) -> Option<(u64, &ShardStatus)> {
        self.nodes
            .values()
            .filter_map(|n| n.shards.get(&shard).map(|s| (n.id, s)))
            .filter(|(_, s)| s.is_leader)
            .max_by_key(|(_, s)| s.term)
    }

    /// The best-known membership of `shard`: the leader's, else that of
    /// the replica at the highest term.
    pub fn membership(&self, shard: u64) -> Option<&ShardStatus> {
        if let Some((_, s)) = self.leader_status(shard) {
            return Some(s);
        }
        self.nodes
            .values()
            .filter_map(|n| n.shards.get(&shard))
            .max_by_key(|s| (s.term, s.last_log_index))
    }

    /// Every node or endpoint that did not answer, as "who: why".
    pub fn down(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| !n.up)
            .map(|n| {
                format!(
                    "node {} at {}: {}",
                    n.id,
                    n.addr,
                    n.error.clone().unwrap_or_default()
                )
            })
            .chain(self.unknown_down.iter().map(|(a, e)| format!("{a}: {e}")))
            .collect()
    }

    /// Shards numbered 0..shard_count that any node reported.
    pub fn shard_ids(&self) -> BTreeSet<u64> {
        self.nodes
            .values()
            .flat_map(|n| n.shards.keys().copied())
            .collect()
    }

    pub fn node(&self, id: u64) -> anyhow::Result<&NodeView> {
        self.nodes.get(&id).with_context(|| {
            format!(
                "node {id} is not known: it is in no shard's membership and not among --endpoints \
                 (known: {:?})",
                self.nodes.keys().collect::<Vec<_>>()
            )
        })
    }

    fn region_of(&self, id: u64) -> &str {
        self.nodes.get(&id).map(|n| n.region.as_str()).unwrap_or("")
    }

    /// Voters per node, over every shard's best-known membership.
    fn voter_load(&self) -> BTreeMap<u64, usize> {
        let mut load: BTreeMap<u64, usize> = self.nodes.keys().map(|id| (*id, 0)).collect();
        for shard in self.shard_ids() {
            if let Some(m) = self.membership(shard) {
                for v in &m.voters {
                    *load.entry(*v).or_default() += 1;
                }
            }
        }
        load
    }
}

/// Connections to nodes, by address, reused across calls.
pub struct Ops {
    channels: Mutex<BTreeMap<String, Channel>>,
    endpoints: Vec<String>,
    quiet: bool,
}

impl Ops {
    pub fn new(endpoints: &[String], quiet: bool) -> Ops {
        Ops {
            channels: Mutex::default(),
            endpoints: endpoints.to_vec(),
            quiet,
        }
    }

    fn channel(&self, addr: &str) -> anyhow::Result<Channel> {
        let mut channels = self.channels.lock().expect("channel cache");
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let access = super::access();
        let endpoint = crate::security::endpoint(addr)
            .context("node address")?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(60));
        let c = crate::security::channel(
            endpoint,
            access.tls.as_ref(),
            crate::security::ANY_NODE_NAME,
        )?;
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    pub fn node_api(&self, addr: &str) -> anyhow::Result<NodeApiClient<AuthChannel>> {
        let token = super::access().token.clone();
        Ok(NodeApiClient::with_interceptor(self.channel(addr)?, token)
            .max_decoding_message_size(64 << 20))
    }

    fn admin(&self, addr: &str) -> anyhow::Result<AdminClient<AuthChannel>> {
        let token = super::access().token.clone();
        Ok(AdminClient::with_interceptor(self.channel(addr)?, token)
            .max_decoding_message_size(64 << 20))
    }

    /// The status node at `addr` reports, or why it did not answer.
    pub async fn node_status(&self, addr: &str) -> Result<NodeStatus, String> {
        let mut c = self.node_api(addr).map_err(|e| format!("{e:#}"))?;
        let mut req = tonic::Request::new(StatusRequest {});
        req.set_timeout(Duration::from_secs(5));
        match c.status(req).await {
            Ok(s) => Ok(s.into_inner()),
            Err(s) => Err(describe(addr, &s)),
        }
    }

    /// Asks every endpoint, then every node the memberships name, for its
    /// status.
    pub async fn gather(&self) -> anyhow::Result<View> {
        let mut view = View {
            nodes: BTreeMap::new(),
            unknown_down: Vec::new(),
            shard_count: 0,
            cluster_name: String::new(),
            replication_factor: 0,
        };
        let mut asked: BTreeSet<String> = BTreeSet::new();
        let mut to_ask: Vec<(Option<u64>, String, String)> = self
            .endpoints
            .iter()
            .map(|a| (None, a.clone(), String::new()))
            .collect();
        for _round in 0..4 {
            if to_ask.is_empty() {
                break;
            }
            let batch = std::mem::take(&mut to_ask);
            let answers =
                futures::future::join_all(batch.into_iter().map(|(id, addr, region)| async move {
                    let answer = self.node_status(&addr).await;
                    (id, addr, region, answer)
                }))
                .await;
            for (id, addr, region, answer) in answers {
                asked.insert(addr.clone());
                match answer {
                    Ok(s) => {
                        if !view.cluster_name.is_empty() && view.cluster_name != s.cluster_name {
                            bail!(
                                "{addr} belongs to cluster {:?}, not {:?}; check --endpoints",
                                s.cluster_name,
                                view.cluster_name
                            );
                        }
                        view.cluster_name = s.cluster_name.clone();
                        view.shard_count = view.shard_count.max(s.shard_count);
                        view.replication_factor = view.replication_factor.max(s.replication_factor);
                        view.nodes.insert(
                            s.node_id,
                            NodeView {
                                id: s.node_id,
                                addr: if s.addr.is_empty() {
                                    addr
                                } else {
                                    s.addr.clone()
                                },
                                region: s.region.clone(),
                                up: true,
                                draining: s.draining,
                                clock_offset_ms: s.clock_offset_ms,
                                clock_off: s.clock_off,
                                error: None,
                                shards: s.shards.into_iter().map(|x| (x.shard_id, x)).collect(),
                            },
                        );
                    }
                    Err(e) => match id {
                        Some(id) => {
                            view.nodes
                                .entry(id)
                                .or_insert_with(|| NodeView::down(id, addr, region, e));
                        }
                        None => view.unknown_down.push((addr, e)),
                    },
                }
            }
            // Members nobody asked yet.
            let mut seen: BTreeSet<u64> = view.nodes.keys().copied().collect();
            for n in view.nodes.values() {
                for s in n.shards.values() {
                    for m in &s.members {
                        if seen.insert(m.node_id) && !asked.contains(&m.addr) {
                            to_ask.push((Some(m.node_id), m.addr.clone(), m.region.clone()));
                        }
                    }
                }
            }
        }
        // An endpoint that did not answer but that a membership names is
        // that node, down.
        let down = std::mem::take(&mut view.unknown_down);
        for (addr, e) in down {
            let named = view
                .nodes
                .values()
                .flat_map(|n| n.shards.values())
                .find_map(|s| {
                    s.members
                        .iter()
                        .find(|m| m.addr == addr)
                        .map(|m| (m.node_id, m.region.clone()))
                });
            match named {
                Some((id, region)) if !view.nodes.contains_key(&id) => {
                    view.nodes.insert(id, NodeView::down(id, addr, region, e));
                }
                Some(_) => {}
                None => view.unknown_down.push((addr, e)),
            }
        }
        if !view.nodes.values().any(|n| n.up) {
            let why: Vec<String> = view.unknown_down.iter().map(|(_, e)| e.clone()).collect();
            bail!(
                "no node answered ({}); is the cluster running? check --endpoints or \
                 CHATSTORE_ENDPOINTS",
                why.join("; ")
            );
        }
        Ok(view)
    }

    /// The current leader of `shard` and its status, asking the shard's
    /// members; waits up to [`LEADER_WAIT`] for one.
    async fn leader(&self, shard: u64) -> anyhow::Result<(u64, String, ShardStatus)> {
        let started = Instant::now();
        let mut last = String::from("no replica answered");
        while started.elapsed() < LEADER_WAIT {
            let view = self.gather().await?;
            if let Some((id, s)) = view.leader_status(shard) {
                let addr = view.nodes[&id].addr.clone();
                return Ok((id, addr, s.clone()));
            }
            if view.membership(shard).is_none() {
                bail!("no node reports a replica of shard {shard}");
            }
            last = format!("shard {shard} has no leader yet");
            tokio::time::sleep(POLL * 2).await;
        }
        bail!("{last} after {LEADER_WAIT:?}; check `chatctl status`")
    }

    /// Finishes every membership change that was cut short between its two
    /// steps (a joint config), through each shard's leader, so that plans
    /// start from the configs those changes were moving to; the shards.
    pub async fn finish_joint_changes(&self, view: &View) -> anyhow::Result<Vec<u64>> {
        self.change_voters_where(view, |s| s.joint, vec![]).await
    }

    /// Takes `node` out of every shard (or only `shard`) whose membership
    /// lists it as a learner (a move onto it that was cut short), through
    /// each shard's leader; the shards it left. The membership is read just
    /// before; a move that promotes the node in between keeps its voter
    /// (the leader removes only learners).
    pub async fn drop_learner(&self, node: u64, shard: Option<u64>) -> anyhow::Result<Vec<u64>> {
        let view = self.gather().await?;
        self.change_voters_where(
            &view,
            |s| s.learners.contains(&node) && shard.is_none_or(|shard| s.shard_id == shard),
            vec![node],
        )
        .await
    }

    /// Sends every shard whose leader's status passes `pick` a voter change
    /// that removes `remove` (none: it only finishes a change under way);
    /// the shards.
    async fn change_voters_where(
        &self,
        view: &View,
        pick: impl Fn(&ShardStatus) -> bool,
        remove: Vec<u64>,
    ) -> anyhow::Result<Vec<u64>> {
        let shards: BTreeSet<u64> = view
            .nodes
            .values()
            .flat_map(|n| n.shards.values())
            .filter(|s| s.is_leader && pick(s))
            .map(|s| s.shard_id)
            .collect();
        for shard in &shards {
            self.on_leader(*shard, |mut c| {
                // Only learners go: a move may have made one a voter since
                // the view was read.
                let req = ChangeVotersRequest {
                    shard_id: *shard,
                    add: vec![],
                    remove: remove.clone(),
                    learners_only: true,
                };
                async move { c.change_voters(req).await }
            })
            .await?;
        }
        Ok(shards.into_iter().collect())
    }

    /// Runs an admin call on the leader of `shard`, following leader hints
    /// and retrying what is safe to retry until [`LEADER_WAIT`].
    async fn on_leader<T, F, Fut>(&self, shard: u64, mut call: F) -> anyhow::Result<T>
    where
        F: FnMut(AdminClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let (_, mut addr, _) = self.leader(shard).await?;
        loop {
            let status = match call(self.admin(&addr)?).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => s,
            };
            if !may_retry(&status) || started.elapsed() > LEADER_WAIT {
                bail!("{}", describe(&addr, &status));
            }
            match leader_hint(&status) {
                Some((_, hinted)) if !hinted.is_empty() && hinted != addr => addr = hinted,
                _ => {
                    tokio::time::sleep(POLL * 2).await;
                    addr = self.leader(shard).await?.1;
                }
            }
        }
    }

    fn say(&self, bar: &indicatif::ProgressBar, line: String) {
        if self.quiet {
            return;
        }
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    }

    /// Moves `shard`'s replica from node `from` to node `to`: opens a
    /// replica on `to`, adds it as a learner, waits for it to catch up (by
    /// snapshot if the log was purged), swaps `from`'s vote to it in one
    /// change (when `from` leads: promotes it, moves leadership off `from`,
    /// then removes `from`) and deletes `from`'s data.
    pub async fn move_replica(
        &self,
        shard: u64,
        from: u64,
        to: u64,
        bar: &indicatif::ProgressBar,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let view = self.gather().await?;
        let target = view.node(to)?.clone();
        let (_, _, st) = self.leader(shard).await?;
        check_move(&view, &st, shard, from, to)?;
        let members: BTreeSet<u64> = st.members.iter().map(|m| m.node_id).collect();
        if !members.contains(&from) && st.voters.contains(&to) {
            // Done before; make sure the old replica's data is gone.
            self.close_old_copy(&view, shard, from, bar).await;
            return Ok(());
        }
        if !members.contains(&from) {
            bail!(
                "node {from} holds no replica of shard {shard} (voters {:?})",
                st.voters
            );
        }
        bar.set_message(format!("shard {shard}: opening a replica on node {to}"));
        self.admin(&target.addr)?
            .open_replica(ShardRequest { shard_id: shard })
            .await
            .map_err(|s| anyhow::anyhow!(describe(&target.addr, &s)))?;
        if !members.contains(&to) {
            bar.set_message(format!("shard {shard}: adding node {to} as a learner"));
            let (addr, region) = (target.addr.clone(), target.region.clone());
            self.on_leader(shard, |mut c| {
                let req = AddLearnerRequest {
                    shard_id: shard,
                    node_id: to,
                    addr: addr.clone(),
                    region: region.clone(),
                };
                async move { c.add_learner(req).await }
            })
            .await?;
        }
        // Catch up to the leader's log end as it was when the learner joined.
        let (_, _, st) = self.leader(shard).await?;
        let goal = st.last_log_index;
        loop {
            let (leader, _, st) = self.leader(shard).await?;
            let at = match leader == to {
                true => st.last_log_index,
                false => st
                    .progress
                    .iter()
                    .find(|p| p.node_id == to)
                    .map(|p| p.matched_index)
                    .unwrap_or(0),
            };
            // A voter too (a move run again after its promotion): the old
            // replica goes only once the new one holds the log.
            if at >= goal {
                break;
            }
            if started.elapsed() > MOVE_TIMEOUT {
                bail!(
                    "node {to} reached index {at} of {goal} in shard {shard} within \
                     {MOVE_TIMEOUT:?}; run the move again to continue"
                );
            }
            bar.set_message(format!("shard {shard}: node {to} catching up, {at}/{goal}"));
            tokio::time::sleep(POLL).await;
        }
        let change = |add: Vec<u64>, remove: Vec<u64>| {
            self.on_leader(shard, move |mut c| {
                let req = ChangeVotersRequest {
                    shard_id: shard,
                    add: add.clone(),
                    remove: remove.clone(),
                    learners_only: false,
                };
                async move { c.change_voters(req).await }
            })
        };
        let (leader, _, st) = self.leader(shard).await?;
        let from_led = leader == from;
        // A leader cannot vote itself out. Leadership moves off `from`
        // first, so that one change swaps the two below: `to` added first
        // would make four voters, two of them in one region when `to` is
        // in `from`'s, and losing that region would stop the shard.
        let mut swap = !from_led;
        if from_led && st.voters.len() > 1 {
            bar.set_message(format!("shard {shard}: moving leadership off node {from}"));
            let mut why = String::from("it kept coming back");
            for _ in 0..3 {
                match self.transfer_off(shard, from).await {
                    Ok(leader) if leader != from => {
                        swap = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => why = format!("{e:#}"),
                }
            }
            if !swap {
                bail!(
                    "shard {shard}: leadership did not move off node {from} ({why}); node {to} \
                     is a learner with the log: run the move again"
                );
            }
        }
        if !swap {
            // With one replica there is no other voter to hand leadership
            // to: `to` becomes a voter first, leadership moves (to it, in the
            // same region, when it can), then `from` goes. (Nodes refuse a
            // change that would leave the shard short, or give one region
            // half its voters, so another move at once cannot.)
            bar.set_message(format!("shard {shard}: promoting node {to} to voter"));
            change(vec![to], vec![]).await?;
            bar.set_message(format!("shard {shard}: moving leadership off node {from}"));
            self.transfer_off(shard, from).await?;
            bar.set_message(format!("shard {shard}: removing node {from}"));
            change(vec![], vec![from]).await?;
        } else {
            // One change swaps the two (through a joint config): the shard
            // never has more voters in `from`'s region than before, nor
            // fewer than before.
            bar.set_message(format!("shard {shard}: node {to} takes node {from}'s vote"));
            change(vec![to], vec![from]).await?;
        }
        // Leadership left `from` for a voter elsewhere; its replacement in
        // the same region takes it back.
        let same_region = view.node(from).is_ok_and(|n| n.region == target.region);
        if from_led && same_region {
            bar.set_message(format!("shard {shard}: handing leadership to node {to}"));
            if let Err(e) = self.transfer_leader(shard, Some(to)).await {
                self.say(
                    bar,
                    format!("note: leadership of shard {shard} did not move to node {to}: {e}"),
                );
            }
        }
        let view = self.gather().await?;
        self.close_old_copy(&view, shard, from, bar).await;
        Ok(())
    }

    /// Deletes node `node`'s replica of `shard` once the leader no longer
    /// lists it; a node that is down keeps its copy until `rebalance` runs
    /// again with it up.
    async fn close_replica(&self, view: &View, shard: u64, node: u64) -> anyhow::Result<()> {
        let Some(n) = view.nodes.get(&node) else {
            return Ok(());
        };
        if !n.up {
            bail!(
                "node {node} is down; its old copy of shard {shard} is deleted when \
                 `chatctl rebalance` runs with it up"
            );
        }
        // `force` closes a copy its node still thinks is a member, so ask
        // the leader now: a plan made earlier may have moved a replica back
        // onto this node since, and closing a voter's copy would leave the
        // shard a replica short (and an empty voter if it were reopened).
        let checked = match self.leader(shard).await {
            Ok((_, _, st)) if st.members.iter().any(|m| m.node_id == node) => {
                bail!("node {node} is a member of shard {shard} as its leader sees it; its copy stays");
            }
            Ok((_, _, st)) => {
                // A leader cut off from the others may not know a newer
                // membership that lists this node again: some replica at a
                // newer term, and the copy stays.
                let newer = match self.gather().await {
                    Ok(fresh) => fresh
                        .nodes
                        .values()
                        .filter_map(|n| n.shards.get(&shard))
                        .any(|s| s.term > st.term),
                    Err(_) => true,
                };
                if newer {
                    bail!(
                        "a replica of shard {shard} is at a newer term than the leader that \
                         answered; node {node}'s copy stays"
                    );
                }
                st.membership_index
            }
            Err(e) => {
                bail!(
                    "node {node}'s old copy of shard {shard} stays for now: {e:#}; \
                     `chatctl rebalance` deletes it later"
                );
            }
        };
        // The node keeps its copy if it knows a membership newer than the
        // one checked here: another move may have added it again since. (A
        // leader of a version that does not say reports 0: not checked.)
        let req = CloseReplicaRequest {
            shard_id: shard,
            force: true,
            membership_index: (checked > 0).then_some(checked),
        };
        self.admin(&n.addr)?.close_replica(req).await.map_err(|s| {
            anyhow::anyhow!(
                "{}; run `chatctl rebalance` to retry",
                describe(&n.addr, &s)
            )
        })?;
        Ok(())
    }

    /// [`Ops::close_replica`] after a move, which stands whatever became of
    /// the old copy: what kept it is said as a note.
    async fn close_old_copy(
        &self,
        view: &View,
        shard: u64,
        node: u64,
        bar: &indicatif::ProgressBar,
    ) {
        if let Err(e) = self.close_replica(view, shard, node).await {
            self.say(bar, format!("note: {e:#}"));
        }
    }
}

/// Whether moving `shard`'s replica from `from` to `to` may start, given
/// the shard's membership `st`: two different nodes, the target up, and
/// afterwards a majority of voters in no one region and no voter too many.
/// A move already done (or done up to the removal of `from`) passes.
pub fn check_move(
    view: &View,
    st: &ShardStatus,
    shard: u64,
    from: u64,
    to: u64,
) -> anyhow::Result<()> {
    if from == to {
        bail!("a replica moves from one node to another; {from} and {to} are the same node");
    }
    let target = view.node(to)?;
    if !target.up {
        bail!(
            "node {to} at {} is down ({}); start it first",
            target.addr,
            target.error.clone().unwrap_or_default()
        );
    }
    // Both voters: only a move cut short after the promotion, which left
    // the shard a voter more than it should have.
    if st.voters.contains(&from)
        && st.voters.contains(&to)
        && (view.replication_factor == 0 || st.voters.len() <= view.replication_factor as usize)
    {
        bail!(
            "node {to} is already a voter of shard {shard} (voters {:?}); moving node {from}'s \
             replica there would leave {} copies",
            st.voters,
            st.voters.len() - 1
        );
    }
    let members: BTreeSet<u64> = st.members.iter().map(|m| m.node_id).collect();
    if !st.voters.contains(&to) || members.contains(&from) {
        check_regions(view, &st.voters, from, to)?;
    }
    Ok(())
}

/// Refuses a move that would give one region a majority of a shard's voters
/// (losing that region would then stop the shard), or half of them where no
/// region had as many before: the rule each node applies to the change
/// (`placement::crowded_region`), checked before any step runs.
fn check_regions(view: &View, voters: &[u64], from: u64, to: u64) -> anyhow::Result<()> {
    let before: BTreeSet<u64> = voters.iter().copied().collect();
    let mut after = before.clone();
    after.remove(&from);
    after.insert(to);
    if after.len() < 2 {
        return Ok(());
    }
    let region_of = |v: u64| view.region_of(v);
    let Some((region, n)) = placement::crowded_region(&after, region_of) else {
        return Ok(());
    };
    let was_crowded = placement::crowded_region(&before, region_of).is_some();
    if n * 2 > after.len() || !was_crowded {
        let share = match n * 2 > after.len() {
            true => "a majority",
            false => "half",
        };
        bail!(
            "the move would put {n} of {} voters in region {region}, {share}: losing \
             {region} would stop the shard; pick a node in another region",
            after.len()
        );
    }
    Ok(())
}

/// Whether an admin call that failed with `status` may be sent again: it
/// did not reach the node, or its outcome is unknown (every admin call is
/// safe to repeat).
fn may_retry(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

/// A status error as a sentence that names the node.
pub fn describe(addr: &str, s: &Status) -> String {
    match s.code() {
        Code::Unavailable if std::error::Error::source(s).is_some() => format!(
            "cannot reach node at {addr} ({}); is it running? check --endpoints",
            s.message()
        ),
        Code::DeadlineExceeded => format!("node at {addr} did not answer in time: {}", s.message()),
        _ => format!("node at {addr}: {}", s.message()),
    }
}

/// A step of a plan.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    MoveReplica {
        shard: u64,
        from: u64,
        to: u64,
        why: String,
    },
    TransferLeader {
        shard: u64,
        from: u64,
        why: String,
    },
    CloseReplica {
        shard: u64,
        node: u64,
        why: String,
    },
    /// Takes `node` out of `shard`'s membership if it is still a learner
    /// there (never a voter).
    DropLearner {
        shard: u64,
        node: u64,
        why: String,
    },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::MoveReplica {
                shard,
                from,
                to,
                why,
            } => write!(
                f,
                "move shard {shard:>4} replica  node {from} -> node {to}  ({why})"
            ),
            Step::TransferLeader { shard, from, why } => {
                write!(
                    f,
                    "move shard {shard:>4} leadership off node {from}  ({why})"
                )
            }
            Step::CloseReplica { shard, node, why } => {
                write!(f, "delete shard {shard:>4} copy on node {node}  ({why})")
            }
            Step::DropLearner { shard, node, why } => {
                write!(f, "drop   shard {shard:>4} learner node {node}  ({why})")
            }
        }
    }
}

/// The replica moves that empty `drained` (every node in it) and keep each
/// shard spread over regions. Errors when a replica has nowhere to go.
pub fn plan_drain(view: &View, drained: &BTreeSet<u64>) -> anyhow::Result<Vec<Step>> {
    let mut load = view.voter_load();
    let mut steps = Vec::new();
    let mut stuck = Vec::new();
    for shard in view.shard_ids() {
        let Some(m) = view.membership(shard) else {
            continue;
        };
        let mut voters = m.voters.clone();
        for from in m.voters.iter().filter(|v| drained.contains(v)) {
            // A move cut short after its promotion left a voter to spare:
            // `from` only goes (a move "to" a voter there already).
            let from_region = view.region_of(*from);
            let spare = surplus(view, &voters).then(|| {
                voters
                    .iter()
                    .copied()
                    .filter(|v| {
                        v != from
                            && !drained.contains(v)
                            && check_regions(view, &voters, *from, *v).is_ok()
                    })
                    .min_by_key(|v| (view.region_of(*v) != from_region, *v))
            });
            match spare
                .flatten()
                .or_else(|| pick_target(view, &load, &voters, *from, drained))
            {
                Some(to) => {
                    if !voters.contains(&to) {
                        *load.entry(to).or_default() += 1;
                        voters.push(to);
                    }
                    *load.entry(*from).or_default() -= 1;
                    voters.retain(|v| v != from);
                    steps.push(Step::MoveReplica {
                        shard,
                        from: *from,
                        to,
                        why: format!("node {from} is draining"),
                    });
                }
                None => stuck.push(shard),
            }
        }
    }
    if !stuck.is_empty() {
        bail!(
            "no node can take the replicas of shards {stuck:?} without giving one region a \
             majority or hosting two replicas of a shard; add a node (in the drained node's \
             region) first"
        );
    }
    Ok(steps)
}

/// Whether a shard with `voters` has more than the cluster's replication
/// factor (unknown, 0, from older nodes: never).
fn surplus(view: &View, voters: &[u64]) -> bool {
    view.replication_factor > 0 && voters.len() > view.replication_factor as usize
}

/// The least-loaded node that can take `from`'s replica of a shard with
/// `voters`: up, not draining, not already a voter, in `from`'s region if
/// possible, and never giving a region a majority.
fn pick_target(
    view: &View,
    load: &BTreeMap<u64, usize>,
    voters: &[u64],
    from: u64,
    excluded: &BTreeSet<u64>,
) -> Option<u64> {
    let from_region = view.region_of(from);
    view.nodes
        .values()
        .filter(|n| n.up && !n.draining && !excluded.contains(&n.id) && !voters.contains(&n.id))
        .filter(|n| check_regions(view, voters, from, n.id).is_ok())
        .min_by_key(|n| {
            (
                n.region != from_region,
                load.get(&n.id).copied().unwrap_or(0),
                n.id,
            )
        })
        .map(|n| n.id)
}

/// Rebalancing: replicas off draining nodes, voters spread evenly over the
/// nodes of each region, copies the memberships no longer list deleted,
/// leaders to their shard's preferred region.
pub fn plan_rebalance(view: &View) -> anyhow::Result<Vec<Step>> {
    let draining: BTreeSet<u64> = view
        .nodes
        .values()
        .filter(|n| n.draining)
        .map(|n| n.id)
        .collect();
    let mut steps = plan_drain(view, &draining)?;
    // Learners a move cut short left behind (rebalance runs no move of its
    // own meanwhile): they leave, and their copies go.
    for shard in view.shard_ids() {
        let Some((_, st)) = view.leader_status(shard) else {
            continue;
        };
        for &node in &st.learners {
            let why = "learner of a move cut short".to_string();
            steps.push(Step::DropLearner {
                shard,
                node,
                why: why.clone(),
            });
            steps.push(Step::CloseReplica { shard, node, why });
        }
    }
    // Voters per shard after the drain moves.
    let mut voters: BTreeMap<u64, Vec<u64>> = view
        .shard_ids()
        .into_iter()
        .filter_map(|s| view.membership(s).map(|m| (s, m.voters.clone())))
        .collect();
    for step in &steps {
        if let Step::MoveReplica {
            shard, from, to, ..
        } = step
        {
            let v = voters.get_mut(shard).expect("planned from these shards");
            v.retain(|x| x != from);
            v.push(*to);
        }
    }
    // Voters beyond the replication factor (a move cut short after its
    // promotion): each goes, from the region with most voters, as a move
    // "to" a voter that stays, which only removes it.
    for (shard, vs) in voters.iter_mut() {
        while surplus(view, vs) {
            let count_in = |v: &u64| voters_in_region_of(view, vs, *v);
            let Some(from) = vs
                .iter()
                .copied()
                .filter(|v| {
                    vs.iter()
                        .any(|to| to != v && check_regions(view, vs, *v, *to).is_ok())
                })
                .max_by_key(|v| (count_in(v), *v))
            else {
                break;
            };
            let to = *vs
                .iter()
                .find(|to| **to != from)
                .expect("more voters than one");
            steps.push(Step::MoveReplica {
                shard: *shard,
                from,
                to,
                why: format!(
                    "shard {shard} has {} voters; the cluster keeps {}",
                    vs.len(),
                    view.replication_factor
                ),
            });
            vs.retain(|x| *x != from);
        }
    }
    let mut load: BTreeMap<u64, usize> = view
        .nodes
        .values()
        .filter(|n| n.up && !n.draining)
        .map(|n| (n.id, 0))
        .collect();
    for vs in voters.values() {
        for v in vs {
            if let Some(l) = load.get_mut(v) {
                *l += 1;
            }
        }
    }
    // Even out each region: move from its most to its least loaded node
    // while they differ by more than one. Bounded by the replica count.
    let regions: BTreeSet<String> = view.nodes.values().map(|n| n.region.clone()).collect();
    for region in &regions {
        let in_region: Vec<u64> = load
            .keys()
            .copied()
            .filter(|id| view.region_of(*id) == region)
            .collect();
        if in_region.len() < 2 {
            continue;
        }
        for _ in 0..voters.len() {
            let max = *in_region
                .iter()
                .max_by_key(|id| (load[id], **id))
                .expect("two nodes");
            let min = *in_region
                .iter()
                .min_by_key(|id| (load[id], **id))
                .expect("two nodes");
            if load[&max] <= load[&min] + 1 {
                break;
            }
            let Some((&shard, _)) = voters
                .iter()
                .find(|(_, vs)| vs.contains(&max) && !vs.contains(&min))
            else {
                break;
            };
            let vs = voters.get_mut(&shard).expect("found above");
            vs.retain(|x| *x != max);
            vs.push(min);
            *load.get_mut(&max).expect("in load") -= 1;
            *load.get_mut(&min).expect("in load") += 1;
            steps.push(Step::MoveReplica {
                shard,
                from: max,
                to: min,
                why: format!("evening out region {region}"),
            });
        }
    }
    // A region holding a majority of a shard's voters (left by hand-made
    // moves): one of its replicas goes to the least loaded node of a region
    // the shard lacks.
    for (shard, vs) in voters.iter_mut() {
        let mut per_region: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for v in vs.iter() {
            per_region
                .entry(view.region_of(*v).to_string())
                .or_default()
                .push(*v);
        }
        let Some((region, crowded)) = per_region
            .iter()
            .find(|(_, on)| vs.len() > 1 && on.len() * 2 > vs.len())
        else {
            continue;
        };
        let from = *crowded
            .iter()
            .max_by_key(|v| (load.get(v).copied().unwrap_or(0), **v))
            .expect("a crowded region has voters");
        let to = load
            .iter()
            .filter(|(id, _)| !per_region.contains_key(view.region_of(**id)))
            .min_by_key(|(id, l)| (**l, **id))
            .map(|(id, _)| *id);
        if let Some(to) = to {
            let why = format!("region {region} holds a majority");
            steps.push(planned_move(*shard, (vs, &mut load), from, to, why));
        }
    }
    // A shard with no voter in its preferred region (a drain or a move by
    // hand took it elsewhere): one comes back from the region with most of
    // its voters to the least loaded node there, so leadership can follow.
    for (shard, vs) in voters.iter_mut() {
        let Some(preferred) = view
            .membership(*shard)
            .map(|s| s.preferred_region.clone())
            .filter(|r| !r.is_empty())
        else {
            continue;
        };
        if vs.iter().any(|v| view.region_of(*v) == preferred) {
            continue;
        }
        let Some(to) = load
            .iter()
            .filter(|(id, _)| view.region_of(**id) == preferred)
            .min_by_key(|(id, l)| (**l, **id))
            .map(|(id, _)| *id)
        else {
            continue;
        };
        let count_in = |v: &u64| voters_in_region_of(view, vs, *v);
        let Some(from) = vs
            .iter()
            .copied()
            .filter(|v| check_regions(view, vs, *v, to).is_ok())
            .max_by_key(|v| (count_in(v), load.get(v).copied().unwrap_or(0), *v))
        else {
            continue;
        };
        let why = format!("no voter in its preferred region {preferred}");
        steps.push(planned_move(*shard, (vs, &mut load), from, to, why));
    }
    // Copies of shards whose membership no longer lists the node.
    for n in view.nodes.values().filter(|n| n.up) {
        for shard in n.shards.keys() {
            if let Some((_, leader)) = view.leader_status(*shard) {
                if !leader.members.iter().any(|m| m.node_id == n.id) {
                    steps.push(Step::CloseReplica {
                        shard: *shard,
                        node: n.id,
                        why: "no longer a member".into(),
                    });
                }
            }
        }
    }
    // Leaders outside their preferred region, where a voter there exists
    // (after the moves above).
    for (shard, vs) in &voters {
        let Some((leader, st)) = view.leader_status(*shard) else {
            continue;
        };
        let moved_off = steps.iter().any(
            |s| matches!(s, Step::MoveReplica { shard: sh, from, .. } if sh == shard && *from == leader),
        );
        if moved_off || st.preferred_region.is_empty() {
            continue;
        }
        if view.region_of(leader) != st.preferred_region
            && vs.iter().any(|v| view.region_of(*v) == st.preferred_region)
        {
            steps.push(Step::TransferLeader {
                shard: *shard,
                from: leader,
                why: format!("preferred region is {}", st.preferred_region),
            });
        }
    }
    Ok(steps)
}

/// How many of `voters` are in `voter`'s region.
fn voters_in_region_of(view: &View, voters: &[u64], voter: u64) -> usize {
    voters
        .iter()
        .filter(|x| view.region_of(**x) == view.region_of(voter))
        .count()
}

/// A move of `shard`'s voter from `from` to `to`, counted in the plan's
/// voters `vs` and per-node `load`.
fn planned_move(
    shard: u64,
    (vs, load): (&mut Vec<u64>, &mut BTreeMap<u64, usize>),
    from: u64,
    to: u64,
    why: String,
) -> Step {
    vs.retain(|x| *x != from);
    vs.push(to);
    if let Some(l) = load.get_mut(&from) {
        *l = l.saturating_sub(1);
    }
    *load.entry(to).or_default() += 1;
    Step::MoveReplica {
        shard,
        from,
        to,
        why,
    }
}

/// How a run of steps went.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub done: Vec<Step>,
    pub failed: Vec<(Step, String)>,
}

impl Ops {
    /// Carries out `steps` one at a time with a progress bar; a failed step
    /// is reported and the rest still run.
    pub async fn execute(&self, steps: &[Step], label: &str) -> Outcome {
        let bar = progress_bar(self.quiet, steps.len() as u64, label);
        let mut outcome = Outcome::default();
        for step in steps {
            let result = match step {
                Step::MoveReplica {
                    shard, from, to, ..
                } => self.move_replica(*shard, *from, *to, &bar).await,
                Step::TransferLeader { shard, from, .. } => {
                    self.transfer_off(*shard, *from).await.map(|_| ())
                }
                Step::CloseReplica { shard, node, .. } => match self.gather().await {
                    Ok(view) => self.close_replica(&view, *shard, *node).await,
                    Err(e) => Err(e),
                },
                Step::DropLearner { shard, node, .. } => {
                    self.drop_learner(*node, Some(*shard)).await.map(|_| ())
                }
            };
            match result {
                Ok(()) => {
                    self.say(&bar, format!("done: {step}"));
                    outcome.done.push(step.clone());
                }
                Err(e) => {
                    self.say(&bar, format!("FAILED: {step}: {e:#}"));
                    outcome.failed.push((step.clone(), format!("{e:#}")));
                }
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        outcome
    }

    /// Moves leadership of `shard` off node `from` (to the preferred region
    /// if it can), unless it already moved, asking only `from`: a retry sent
    /// to whichever node leads by then could hand leadership straight back
    /// to it, or on again. The leader after it.
    async fn transfer_off(&self, shard: u64, from: u64) -> anyhow::Result<u64> {
        let started = Instant::now();
        loop {
            let (leader, addr, _) = self.leader(shard).await?;
            if leader != from {
                return Ok(leader);
            }
            let req = TransferLeaderRequest {
                shard_id: shard,
                to_node: 0,
            };
            let status = match self.admin(&addr)?.transfer_leader(req).await {
                Ok(st) => return Ok(st.into_inner().leader_node),
                Err(s) => s,
            };
            if !may_retry(&status) || started.elapsed() > LEADER_WAIT {
                bail!("{}", describe(&addr, &status));
            }
            tokio::time::sleep(POLL * 2).await;
        }
    }

    /// Moves `shard`'s leadership to `to`, or (None) off its leader now to
    /// one the leader picks; the leader after it.
    pub async fn transfer_leader(&self, shard: u64, to: Option<u64>) -> anyhow::Result<u64> {
        if to.is_none() {
            let (leader, _, _) = self.leader(shard).await?;
            return self.transfer_off(shard, leader).await;
        }
        let st = self
            .on_leader(shard, |mut c| {
                let req = TransferLeaderRequest {
                    shard_id: shard,
                    to_node: to.unwrap_or(0),
                };
                async move { c.transfer_leader(req).await }
            })
            .await?;
        Ok(st.leader_node)
    }

    pub async fn set_draining(&self, addr: &str, draining: bool) -> anyhow::Result<()> {
        self.admin(addr)?
            .set_draining(SetDrainingRequest { draining })
            .await
            .map_err(|s| anyhow::anyhow!(describe(addr, &s)))?;
        Ok(())
    }

    /// Snapshots (or compacts) every replica of `shards` on every node
    /// that is up.
    pub async fn snapshot_all(
        &self,
        view: &View,
        shards: &BTreeSet<u64>,
        compact: bool,
    ) -> (usize, Vec<String>) {
        let jobs: Vec<(u64, String, u64)> = view
            .nodes
            .values()
            .filter(|n| n.up)
            .flat_map(|n| {
                n.shards
                    .keys()
                    .filter(|s| shards.contains(s))
                    .map(|s| (n.id, n.addr.clone(), *s))
                    .collect::<Vec<_>>()
            })
            .collect();
        let what = if compact {
            "compacting"
        } else {
            "snapshotting"
        };
        let total = jobs.len();
        let bar = progress_bar(self.quiet, total as u64, what);
        let mut failed = Vec::new();
        for (node, addr, shard) in jobs {
            let req = ShardRequest { shard_id: shard };
            let result = if compact {
                match self.admin(&addr) {
                    Ok(mut c) => c.compact(req).await.map(|_| ()),
                    Err(e) => Err(Status::unavailable(format!("{e:#}"))),
                }
            } else {
                match self.node_api(&addr) {
                    Ok(mut c) => c.trigger_snapshot(req).await.map(|_| ()),
                    Err(e) => Err(Status::unavailable(format!("{e:#}"))),
                }
            };
            if let Err(s) = result {
                failed.push(format!(
                    "shard {shard} on node {node}: {}",
                    describe(&addr, &s)
                ));
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        (total, failed)
    }
}

fn progress_bar(quiet: bool, len: u64, message: &str) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(message.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pb::node::Member;

    /// A view of `nodes` (id, region, draining) and shards (voters,
    /// leader), everyone up.
    fn view(nodes: &[(u64, &str, bool)], shards: &[(&[u64], u64)]) -> View {
        let region = |id: u64| nodes.iter().find(|n| n.0 == id).unwrap().1.to_string();
        let mut v = View {
            nodes: BTreeMap::new(),
            unknown_down: Vec::new(),
            shard_count: shards.len() as u64,
            cluster_name: "t".into(),
            replication_factor: 3,
        };
        for (id, r, draining) in nodes {
            v.nodes.insert(
                *id,
                NodeView {
                    id: *id,
                    addr: format!("n{id}"),
                    region: r.to_string(),
                    up: true,
                    draining: *draining,
                    clock_offset_ms: 0,
                    clock_off: false,
                    error: None,
                    shards: BTreeMap::new(),
                },
            );
        }
        for (shard, (voters, leader)) in shards.iter().enumerate() {
            for voter in voters.iter() {
                let st = ShardStatus {
                    shard_id: shard as u64,
                    is_leader: voter == leader,
                    leader_node: *leader,
                    term: 1,
                    voters: voters.to_vec(),
                    members: voters
                        .iter()
                        .map(|m| Member {
                            node_id: *m,
                            addr: format!("n{m}"),
                            region: region(*m),
                        })
                        .collect(),
                    preferred_region: region(voters[0]),
                    ..Default::default()
                };
                v.nodes
                    .get_mut(voter)
                    .unwrap()
                    .shards
                    .insert(shard as u64, st);
            }
        }
        v
    }

    /// The (shard, from, to) of each move in `steps`.
    fn moves_of(steps: &[Step]) -> Vec<(u64, u64, u64)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::MoveReplica {
                    shard, from, to, ..
                } => Some((*shard, *from, *to)),
                _ => None,
            })
            .collect()
    }

    const NODES: [(u64, &str, bool); 4] = [
        (1, "eu", false),
        (2, "us", false),
        (3, "ap", false),
        (4, "eu", false),
    ];

    /// chatctl refuses what the nodes would refuse: a region with a
    /// majority of the voters, or half of an even count where none had it.
    #[test]
    fn a_move_is_refused_as_the_nodes_refuse_it() {
        let nodes = [
            (1, "eu", false),
            (2, "us", false),
            (3, "ap", false),
            (4, "eu", false),
            (5, "us", false),
            (6, "ap", false),
        ];
        let v = view(&nodes, &[(&[1, 2, 3], 1), (&[1, 2, 3, 5], 1)]);
        // Three voters, one per region: within a region, fine; into one
        // that has a voter, a majority.
        assert!(check_regions(&v, &[1, 2, 3], 1, 4).is_ok());
        let e = check_regions(&v, &[1, 2, 3], 3, 4).unwrap_err();
        assert!(format!("{e}").contains("a majority"), "{e}");
        // Four voters, two in us: moving one of them on stays as crowded.
        assert!(check_regions(&v, &[1, 2, 3, 5], 5, 6).is_ok());
        assert!(check_regions(&v, &[1, 2, 3, 5], 1, 4).is_ok());
        // Four voters, two in ap: moving one to eu leaves eu with half,
        // but ap had half already.
        assert!(check_regions(&v, &[1, 2, 3, 6], 6, 4).is_ok());
        // Four voters in four regions: a move giving eu half is refused
        // (a strict majority rule would let it through).
        let nodes = [
            (1, "eu", false),
            (2, "us", false),
            (3, "ap", false),
            (4, "sa", false),
            (5, "eu", false),
        ];
        let v = view(&nodes, &[(&[1, 2, 3, 4], 1)]);
        let e = check_regions(&v, &[1, 2, 3, 4], 4, 5).unwrap_err();
        assert!(
            format!("{e}").contains("2 of 4 voters in region eu, half"),
            "{e}"
        );
        // One or two voters are always crowded; a move among them is not
        // refused for it.
        assert!(check_regions(&v, &[1, 2], 2, 3).is_ok());
        assert!(check_regions(&v, &[1], 1, 2).is_ok());
    }

    #[test]
    fn drain_moves_within_the_region_and_refuses_when_it_cannot() {
        let v = view(&NODES, &[(&[1, 2, 3], 1), (&[1, 2, 3], 2)]);
        let steps = plan_drain(&v, &BTreeSet::from([1])).unwrap();
        assert_eq!(steps.len(), 2);
        assert!(steps
            .iter()
            .all(|s| matches!(s, Step::MoveReplica { from: 1, to: 4, .. })));
        // us has one node: draining it would put two replicas in a region.
        let err = plan_drain(&v, &BTreeSet::from([2])).unwrap_err();
        assert!(format!("{err}").contains("add a node"), "{err}");
    }

    /// A move cut short after its promotion left shard 0 with four voters,
    /// two in eu. Draining node 1 only removes it (the replica on node 4 is
    /// there already); a rebalance removes one of the two eu voters.
    #[test]
    fn a_voter_to_spare_is_removed_not_replaced() {
        let v = view(&NODES, &[(&[1, 2, 3, 4], 2)]);
        let steps = plan_drain(&v, &BTreeSet::from([1])).unwrap();
        assert!(
            matches!(
                steps[..],
                [Step::MoveReplica {
                    shard: 0,
                    from: 1,
                    to: 4,
                    ..
                }]
            ),
            "{steps:?}"
        );
        let steps = plan_rebalance(&v).unwrap();
        let removed: Vec<u64> = steps
            .iter()
            .filter_map(|s| match s {
                Step::MoveReplica { from, to, .. } => {
                    assert!([1, 2, 3, 4].contains(to), "{steps:?}");
                    Some(*from)
                }
                _ => None,
            })
            .collect();
        assert_eq!(removed.len(), 1, "{steps:?}");
        assert!([1, 4].contains(&removed[0]), "an eu voter goes: {steps:?}");
    }

    /// A learner a move cut short left behind leaves its shard, and its
    /// copy goes; a balanced shard with no learner plans nothing.
    #[test]
    fn rebalance_drops_a_learner_left_by_a_move_cut_short() {
        let mut v = view(&NODES, &[(&[1, 2, 3], 1), (&[4, 2, 3], 4)]);
        for n in v.nodes.values_mut() {
            if let Some(st) = n.shards.get_mut(&0) {
                st.learners = vec![4];
            }
        }
        let steps = plan_rebalance(&v).unwrap();
        assert!(
            matches!(
                steps[..],
                [
                    Step::DropLearner {
                        shard: 0,
                        node: 4,
                        ..
                    },
                    Step::CloseReplica {
                        shard: 0,
                        node: 4,
                        ..
                    }
                ]
            ),
            "{steps:?}"
        );
    }

    /// A shard left with no voter in its preferred region gets one back.
    #[test]
    fn a_shard_without_a_voter_at_home_gets_one_back() {
        let nodes = [
            (1, "eu", false),
            (2, "us", false),
            (3, "ap", false),
            (4, "eu", false),
            (5, "sa", false),
        ];
        let mut v = view(&nodes, &[(&[1, 2, 3], 1), (&[2, 3, 5], 2)]);
        for n in v.nodes.values_mut() {
            if let Some(st) = n.shards.get_mut(&1) {
                st.preferred_region = "eu".into();
            }
        }
        let steps = plan_rebalance(&v).unwrap();
        let moves = moves_of(&steps);
        // Node 4 holds nothing; eu gets shard 1 back there, from the most
        // loaded of its voters (node 3, which also holds shard 0).
        assert_eq!(moves, vec![(1, 3, 4)], "{steps:?}");
        // Then its leadership goes home.
        assert!(
            steps
                .iter()
                .any(|s| matches!(s, Step::TransferLeader { shard: 1, .. })),
            "{steps:?}"
        );
    }

    #[test]
    fn rebalance_evens_regions_fixes_majorities_and_moves_leaders_home() {
        // Four shards on node 1 and none on node 4 (both eu); shard 3 has two
        // eu voters; shard 0 is led from us though eu is preferred.
        let v = view(
            &NODES,
            &[
                (&[1, 2, 3], 2),
                (&[1, 2, 3], 1),
                (&[1, 2, 3], 1),
                (&[1, 4, 3], 1),
            ],
        );
        let steps = plan_rebalance(&v).unwrap();
        let moves = moves_of(&steps);
        // The majority in eu (shard 3) goes to us, the region it lacks.
        assert!(moves.iter().any(|m| m.0 == 3 && m.2 == 2), "{moves:?}");
        // eu ends even: node 1 and node 4 hold two eu voters each.
        let mut eu = BTreeMap::from([(1u64, 0i64), (4, 0)]);
        for (shard, voters) in [
            (0, [1, 2, 3]),
            (1, [1, 2, 3]),
            (2, [1, 2, 3]),
            (3, [1, 4, 3]),
        ] {
            let mut vs: Vec<u64> = voters.to_vec();
            for (s, from, to) in &moves {
                if *s == shard {
                    vs.retain(|x| x != from);
                    vs.push(*to);
                }
            }
            for n in vs {
                if let Some(c) = eu.get_mut(&n) {
                    *c += 1;
                }
            }
        }
        assert!((eu[&1] - eu[&4]).abs() <= 1, "{eu:?} {moves:?}");
        assert!(steps.iter().any(|s| matches!(
            s,
            Step::TransferLeader {
                shard: 0,
                from: 2,
                ..
            }
        )));
        // Running the plan's result again would plan nothing for a view
        // that is already balanced.
        let balanced = view(&NODES, &[(&[1, 2, 3], 1), (&[4, 2, 3], 4)]);
        assert_eq!(plan_rebalance(&balanced).unwrap(), Vec::new());
    }
}
