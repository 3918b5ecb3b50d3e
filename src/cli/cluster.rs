//! The cluster commands of chatctl: what they print and their exit codes
//! (0 done / healthy, 1 a problem found or a step failed, 2 the cluster or
//! a node could not be reached or refused the request).

use std::collections::BTreeSet;

use anyhow::Context;
use serde::Serialize;

use crate::api::pb::node::ChatDigestsRequest;
use crate::cli::ops::{self, Ops, Step, View, LAG_MAX};

/// Health of one shard, as `status` and `shards` judge it.
#[derive(Debug, Serialize)]
struct ShardHealth {
    shard: u64,
    leader: u64,
    term: u64,
    preferred_region: String,
    leader_region: String,
    voters: Vec<u64>,
    learners: Vec<u64>,
    commit_index: u64,
    /// Per voter: its applied index (0 if its node is down).
    applied: Vec<(u64, u64)>,
    /// How far the slowest voter's apply is behind the leader's log.
    lag: u64,
    /// Every replica's Raft timers are stopped (an idle shard).
    quiet: bool,
    /// The apply rules the leader's replica applies under.
    apply_rules: u32,
    problems: Vec<String>,
}

fn shard_health(view: &View, shard: u64) -> ShardHealth {
    let leader = view.leader_status(shard);
    let m = view.membership(shard);
    let mut h = ShardHealth {
        shard,
        leader: leader.map(|(id, _)| id).unwrap_or(0),
        term: m.map(|s| s.term).unwrap_or(0),
        preferred_region: m.map(|s| s.preferred_region.clone()).unwrap_or_default(),
        leader_region: String::new(),
        voters: m.map(|s| s.voters.clone()).unwrap_or_default(),
        learners: m.map(|s| s.learners.clone()).unwrap_or_default(),
        commit_index: leader.map(|(_, s)| s.committed_index).unwrap_or(0),
        applied: Vec::new(),
        lag: 0,
        quiet: false,
        apply_rules: leader.map(|(_, s)| s.apply_rules).unwrap_or(0),
        problems: Vec::new(),
    };
    let end = leader.map(|(_, s)| s.last_log_index).unwrap_or(0);
    for v in &h.voters {
        let node = view.nodes.get(v);
        let applied = node
            .and_then(|n| n.shards.get(&shard))
            .map(|s| s.applied_index);
        match (node, applied) {
            (Some(n), Some(a)) if n.up => {
                h.applied.push((*v, a));
                h.lag = h.lag.max(end.saturating_sub(a));
            }
            (Some(n), _) if !n.up => {
                h.applied.push((*v, 0));
                h.problems.push(format!("voter {v} is down"));
            }
            _ => {
                h.applied.push((*v, 0));
                h.problems.push(format!("voter {v} has no replica"));
            }
        }
    }
    match leader {
        None => h.problems.push("no leader".into()),
        Some((id, _)) => {
            h.leader_region = view
                .nodes
                .get(&id)
                .map(|n| n.region.clone())
                .unwrap_or_default();
            if !h.preferred_region.is_empty() && h.leader_region != h.preferred_region {
                h.problems.push(format!(
                    "leader in {} (preferred {})",
                    h.leader_region, h.preferred_region
                ));
            }
        }
    }
    let replicas: Vec<&crate::api::pb::node::ShardStatus> = view
        .nodes
        .values()
        .filter_map(|n| n.shards.get(&shard))
        .collect();
    h.quiet = !replicas.is_empty() && replicas.iter().all(|s| s.quiet);
    if h.lag > LAG_MAX {
        h.problems
            .push(format!("a voter is {} entries behind", h.lag));
    }
    if !h.learners.is_empty() {
        h.problems.push(format!(
            "learners {:?} (a move in progress? `chatctl rebalance` drops those of a move \
                 cut short)",
            h.learners
        ));
    }
    let rf = view.replication_factor as usize;
    if rf > 0 && m.is_some() && h.voters.len() != rf {
        h.problems.push(format!(
            "{} voters, not {rf} (a move cut short? `chatctl rebalance` finishes it)",
            h.voters.len()
        ));
    }
    h
}

/// The cluster as `endpoints` report it, or None after printing why it
/// could not be reached.
async fn gathered(endpoints: &[String], json: bool) -> Option<(Ops, View)> {
    let ops = Ops::new(endpoints, json);
    match ops.gather().await {
        Ok(view) => Some((ops, view)),
        Err(e) => {
            eprintln!("error: {e:#}");
            None
        }
    }
}

pub async fn status(endpoints: &[String], json: bool) -> anyhow::Result<i32> {
    let Some((_, view)) = gathered(endpoints, json).await else {
        return Ok(2);
    };
    let shards: Vec<ShardHealth> = view
        .shard_ids()
        .into_iter()
        .map(|s| shard_health(&view, s))
        .collect();
    let leaders = |id: u64| shards.iter().filter(|h| h.leader == id).count();
    let replicas = |id: u64| shards.iter().filter(|h| h.voters.contains(&id)).count();
    let unhealthy: Vec<&ShardHealth> = shards.iter().filter(|h| !h.problems.is_empty()).collect();
    let down = view.down();
    let missing = (0..view.shard_count)
        .filter(|s| !view.shard_ids().contains(s))
        .count();
    if json {
        let nodes: Vec<_> = view
            .nodes
            .values()
            .map(|n| {
                serde_json::json!({
                    "id": n.id, "addr": n.addr, "region": n.region, "up": n.up,
                    "draining": n.draining, "replicas": replicas(n.id), "leaders": leaders(n.id),
                    "clock_offset_ms": n.clock_offset_ms, "clock_off": n.clock_off,
                    "error": n.error,
                })
            })
            .collect();
        let out = serde_json::json!({
            "cluster": view.cluster_name,
            "nodes": nodes,
            "unreachable": down,
            "shards": view.shard_count,
            "shards_seen": shards.len(),
            "healthy_shards": shards.len() - unhealthy.len(),
            "unhealthy": unhealthy,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("cluster {:?}", view.cluster_name);
        println!(
            "{:>4}  {:<8} {:<24} {:<9} {:>8} {:>8}",
            "NODE", "REGION", "ADDR", "STATE", "REPLICAS", "LEADERS"
        );
        for n in view.nodes.values() {
            let state = match (n.up, n.draining, n.clock_off) {
                (false, _, _) => "DOWN",
                (true, _, true) => "CLOCK OFF",
                (true, true, false) => "draining",
                (true, false, false) => "up",
            };
            println!(
                "{:>4}  {:<8} {:<24} {:<9} {:>8} {:>8}",
                n.id,
                n.region,
                n.addr,
                state,
                replicas(n.id),
                leaders(n.id)
            );
        }
        for n in view.nodes.values().filter(|n| n.clock_off) {
            println!(
                "      node {}'s clock is {:+} ms off from its peers' (the bound is {} ms): it \
                 leads nothing until the clock is fixed",
                n.id,
                n.clock_offset_ms,
                crate::node::clock::CLOCK_OFFSET_MS_MAX
            );
        }
        for (addr, e) in &view.unknown_down {
            println!(
                "{:>4}  {:<8} {:<24} {:<9}  {e}",
                "?", "?", addr, "UNREACHABLE"
            );
        }
        println!();
        println!(
            "shards: {} of {} reporting, {} healthy (leader in the preferred region, every voter \
             up and within {LAG_MAX} entries)",
            shards.len(),
            view.shard_count,
            shards.len() - unhealthy.len()
        );
        if !unhealthy.is_empty() {
            println!("{:>6} {:>7}  PROBLEMS", "SHARD", "LEADER");
            for h in &unhealthy {
                println!(
                    "{:>6} {:>7}  {}",
                    h.shard,
                    if h.leader == 0 {
                        "-".into()
                    } else {
                        h.leader.to_string()
                    },
                    h.problems.join("; ")
                );
            }
        }
    }
    for d in &down {
        eprintln!("error: {d}");
    }
    let clock_off = view.nodes.values().any(|n| n.clock_off);
    Ok(if !down.is_empty() {
        2
    } else if !unhealthy.is_empty() || missing > 0 || clock_off {
        1
    } else {
        0
    })
}

pub async fn shards(endpoints: &[String], json: bool) -> anyhow::Result<i32> {
    let Some((_, view)) = gathered(endpoints, json).await else {
        return Ok(2);
    };
    let shards: Vec<ShardHealth> = view
        .shard_ids()
        .into_iter()
        .map(|s| shard_health(&view, s))
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&shards)?);
    } else {
        println!(
            "{:>6} {:<6} {:>7} {:<6} {:>6} {:>9} {:>6} {:<5} {:>5}  VOTERS (node:applied)  LEARNERS",
            "SHARD", "PREF", "LEADER", "REGION", "TERM", "COMMIT", "LAG", "QUIET", "RULES"
        );
        for h in &shards {
            let voters: Vec<String> = h.applied.iter().map(|(n, a)| format!("{n}:{a}")).collect();
            let learners: Vec<String> = h.learners.iter().map(|n| n.to_string()).collect();
            println!(
                "{:>6} {:<6} {:>7} {:<6} {:>6} {:>9} {:>6} {:<5} {:>5}  {:<22} {}",
                h.shard,
                h.preferred_region,
                if h.leader == 0 {
                    "-".into()
                } else {
                    h.leader.to_string()
                },
                h.leader_region,
                h.term,
                h.commit_index,
                h.lag,
                if h.quiet { "yes" } else { "" },
                h.apply_rules,
                voters.join(" "),
                learners.join(" ")
            );
        }
    }
    let unhealthy = shards.iter().any(|h| !h.problems.is_empty());
    Ok(if unhealthy { 1 } else { 0 })
}

/// How many times `verify` asks a shard's replicas for digests before it
/// reports them as lagging, and how long it waits between asks.
const VERIFY_ATTEMPTS: u32 = 20;
const VERIFY_RETRY: std::time::Duration = std::time::Duration::from_millis(250);
/// Most pages of digests `verify` reads of one shard (50,000 chats each).
const VERIFY_PAGES_MAX: usize = 100_000;

pub async fn verify(endpoints: &[String], json: bool) -> anyhow::Result<i32> {
    let Some((ops, view)) = gathered(endpoints, json).await else {
        return Ok(2);
    };
    let down = view.down();
    if !down.is_empty() {
        for d in &down {
            eprintln!("error: {d}");
        }
        return Ok(2);
    }
    let mut problems = Vec::new();
    let mut checked = 0;
    let shard_ids = view.shard_ids();
    // Every shard of the cluster, and a copy on each of its voters: a copy
    // that is not there is not compared, so it is a problem of its own.
    for shard in 0..view.shard_count {
        let Some(status) = view.membership(shard) else {
            problems.push(format!("MISSING shard {shard}: no node reports a replica"));
            continue;
        };
        for voter in &status.voters {
            if !view
                .nodes
                .get(voter)
                .is_some_and(|n| n.shards.contains_key(&shard))
            {
                problems.push(format!(
                    "MISSING shard {shard}: voter node {voter} reports no replica"
                ));
            }
        }
    }
    for shard in &shard_ids {
        // The voters' copies are compared. A copy no membership lists (left
        // on a node that was down during a move; `rebalance` deletes it) or
        // a learner still catching up never settles with them.
        let voters: BTreeSet<u64> = view
            .membership(*shard)
            .map(|s| s.voters.iter().copied().collect())
            .unwrap_or_default();
        for n in view.nodes.values() {
            if n.shards.contains_key(shard) && !voters.contains(&n.id) {
                eprintln!(
                    "note: node {}'s copy of shard {shard} is not a voter's; not compared",
                    n.id
                );
            }
        }
        // Page by page of chats, each compared at one applied index.
        let mut after_chat = 0;
        for _ in 0..VERIFY_PAGES_MAX {
            // Replicas still applying the last writes (or a leader's own
            // entries) report different applied indexes, or none while an
            // apply overlaps their scan; ask again, a bounded number of times,
            // until they report one.
            let mut attempt = 1;
            let replies = loop {
                let mut replies = Vec::new();
                let mut settled = true;
                for n in view
                    .nodes
                    .values()
                    .filter(|n| n.shards.contains_key(shard) && voters.contains(&n.id))
                {
                    let mut c = ops
                        .node_api(&n.addr)
                        .with_context(|| format!("connect to node {} at {}", n.id, n.addr))?;
                    let request = ChatDigestsRequest {
                        shard_id: *shard,
                        after_chat,
                        limit: crate::node::api::DIGESTS_PAGE_MAX,
                    };
                    match c.chat_digests(request).await {
                        Ok(reply) => replies.push((n.id, reply.into_inner())),
                        Err(s)
                            if s.code() == tonic::Code::Unavailable
                                && attempt < VERIFY_ATTEMPTS =>
                        {
                            settled = false;
                            break;
                        }
                        Err(s) => anyhow::bail!(ops::describe(&n.addr, &s)),
                    }
                }
                let level = settled
                    && replies
                        .windows(2)
                        .all(|w| w[0].1.applied_index == w[1].1.applied_index);
                if level || (settled && attempt >= VERIFY_ATTEMPTS) {
                    break replies;
                }
                attempt += 1;
                tokio::time::sleep(VERIFY_RETRY).await;
            };
            let Some(((first, first_reply), rest)) = replies.split_first() else {
                break;
            };
            checked += first_reply.chats.len();
            let mut page_ok = true;
            for (node, reply) in rest {
                checked += reply.chats.len();
                if reply.applied_index != first_reply.applied_index {
                    problems.push(format!(
                    "LAGGING shard {shard}: node {node} at applied {} and node {first} at {} \
                     after {VERIFY_ATTEMPTS} tries (writes still arriving; run again once they stop)",
                    reply.applied_index, first_reply.applied_index
                ));
                    page_ok = false;
                } else if reply.format != first_reply.format {
                    problems.push(format!(
                        "SKIPPED shard {shard}: nodes {node} and {first} compute digests of \
                         different formats ({} and {}: two versions during an upgrade); run \
                         again once every node runs the same version",
                        reply.format, first_reply.format
                    ));
                    page_ok = false;
                } else if reply.chats != first_reply.chats || reply.more != first_reply.more {
                    problems.push(format!(
                    "DIVERGED shard {shard}: nodes {node} and {first} differ at applied index {} \
                     (chats after {after_chat})",
                    reply.applied_index
                ));
                    page_ok = false;
                }
            }
            // The next page starts after this one's last chat; a shard found
            // lagging or diverged is reported once.
            match first_reply.chats.last() {
                Some(last) if page_ok && first_reply.more => after_chat = last.chat_id,
                _ => break,
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"shards": shard_ids.len(), "chat_digests_checked": checked, "problems": problems})
        );
    } else if problems.is_empty() {
        println!(
            "ok: {} shards, {checked} chat digests compared, all replicas identical",
            shard_ids.len()
        );
    } else {
        for p in &problems {
            println!("{p}");
        }
    }
    Ok(if problems.is_empty() { 0 } else { 1 })
}

/// Prints a plan, or runs it; the exit code says whether every step worked.
async fn run_plan(
    ops: &Ops,
    steps: Vec<Step>,
    label: &str,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<i32> {
    if dry_run {
        if json {
            println!("{}", serde_json::json!({"dry_run": true, "steps": steps}));
        } else if steps.is_empty() {
            println!("nothing to do");
        } else {
            println!("would run {} step(s):", steps.len());
            for s in &steps {
                println!("  {s}");
            }
        }
        return Ok(0);
    }
    let outcome = ops.execute(&steps, label).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else if steps.is_empty() {
        println!("nothing to do");
    } else {
        println!(
            "{label}: {} of {} step(s) done",
            outcome.done.len(),
            steps.len()
        );
        for (s, e) in &outcome.failed {
            println!("FAILED {s}: {e}");
        }
        if !outcome.failed.is_empty() {
            println!(
                "every step is safe to repeat: run the same command again (once what a refusal \
                 above names is fixed) to finish"
            );
        }
    }
    Ok(if outcome.failed.is_empty() { 0 } else { 1 })
}

fn fail(e: anyhow::Error) -> anyhow::Result<i32> {
    eprintln!("error: {e:#}");
    Ok(2)
}

pub async fn add_node(
    endpoints: &[String],
    id: u64,
    addr: Option<String>,
    undrain: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let mut all = endpoints.to_vec();
    if let Some(a) = &addr {
        all.push(a.clone());
    }
    let ops = Ops::new(&all, json);
    let view = match ops.gather().await {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    let Some(node) = view.nodes.get(&id) else {
        return fail(anyhow::anyhow!(
            "node {id} did not answer; start it (`chatstore node --config F --id {id}`, listed \
             in F with bootstrap = false) and pass its address with --addr"
        ));
    };
    if !node.up {
        return fail(anyhow::anyhow!(
            "node {id} at {} is down: {}",
            node.addr,
            node.error.clone().unwrap_or_default()
        ));
    }
    if node.draining {
        // A drained or removed node coming back by a mistyped id would take
        // replicas at the next rebalance, on a machine thought retired.
        if !undrain {
            return fail(anyhow::anyhow!(
                "node {id} is marked draining (drained, or taken out with remove-node); pass \
                 --undrain to let rebalancing place replicas on it again"
            ));
        }
        if let Err(e) = ops.set_draining(&node.addr, false).await {
            return fail(e);
        }
        if !json {
            println!("node {id} is no longer marked draining");
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"node": id, "addr": node.addr, "region": node.region, "replicas": node.shards.len()})
        );
    } else {
        println!(
            "node {id} ({}, {}) is up in cluster {:?} with {} replica(s)",
            node.region,
            node.addr,
            view.cluster_name,
            node.shards.len()
        );
        println!(
            "next: chatctl --endpoints {} rebalance --dry-run, then without --dry-run",
            all.join(",")
        );
    }
    Ok(0)
}

pub async fn drain(
    endpoints: &[String],
    node: u64,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let Some((ops, mut view)) = gathered(endpoints, json).await else {
        return Ok(2);
    };
    if !dry_run {
        match finished_joint_changes(&ops, &view, json).await {
            Ok(Some(v)) => view = v,
            Ok(None) => {}
            Err(e) => return fail(e),
        }
    }
    let target = match view.node(node) {
        Ok(n) => n.clone(),
        Err(e) => return fail(e),
    };
    let steps = match ops::plan_drain(&view, &BTreeSet::from([node])) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if dry_run {
        return run_plan(&ops, steps, &format!("draining node {node}"), true, json).await;
    }
    if target.up {
        if let Err(e) = ops.set_draining(&target.addr, true).await {
            return fail(e);
        }
    } else if !json {
        eprintln!(
            "note: node {node} is down; its replicas are rebuilt on other nodes from the live ones. \
             It is not marked draining (only a running node can be): do not start it again; if it \
             does start, run `chatctl remove-node {node}` at once, before any `chatctl rebalance` \
             gives it replicas back"
        );
    }
    let code = run_plan(&ops, steps, &format!("draining node {node}"), false, json).await?;
    if code != 0 {
        return Ok(code);
    }
    // Learners a cut-short move left there leave their shards, or
    // remove-node would refuse the node.
    match ops.drop_learner(node, None).await {
        Ok(left) if !left.is_empty() && !json => {
            println!("node {node} is no longer a learner of shard(s) {left:?}")
        }
        Ok(_) => {}
        Err(e) => return fail(e),
    }
    // Anything left there (copies it still holds) goes now.
    let view = ops.gather().await?;
    let left: Vec<u64> = view
        .nodes
        .get(&node)
        .map(|n| n.shards.keys().copied().collect())
        .unwrap_or_default();
    if !left.is_empty() {
        let steps: Vec<Step> = left
            .iter()
            .map(|s| Step::CloseReplica {
                shard: *s,
                node,
                why: "node drained".into(),
            })
            .collect();
        let outcome = ops.execute(&steps, "cleaning up").await;
        if !outcome.failed.is_empty() {
            return copies_left(node, &outcome.failed, "drain");
        }
    }
    // Another operation may have placed a replica there meanwhile.
    let view = ops.gather().await?;
    let member_of: Vec<u64> = view
        .nodes
        .values()
        .flat_map(|n| n.shards.iter())
        .filter(|(_, s)| s.is_leader && s.members.iter().any(|m| m.node_id == node))
        .map(|(shard, _)| *shard)
        .collect::<BTreeSet<u64>>()
        .into_iter()
        .collect();
    if !member_of.is_empty() {
        eprintln!(
            "node {node} is still a member of shard(s) {member_of:?} (another operation placed \
             replicas there?); run `chatctl drain {node}` again"
        );
        return Ok(1);
    }
    if !json {
        println!("node {node} is drained; `chatctl remove-node {node}` takes it out");
    }
    Ok(0)
}

pub async fn remove_node(
    endpoints: &[String],
    node: u64,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let Some((ops, view)) = gathered(endpoints, json).await else {
        return Ok(2);
    };
    let still: Vec<u64> = view
        .shard_ids()
        .into_iter()
        .filter(|s| {
            view.membership(*s)
                .is_some_and(|m| m.members.iter().any(|x| x.node_id == node))
        })
        .collect();
    if !still.is_empty() {
        eprintln!(
            "error: node {node} is still a member of {} shard(s) ({:?}...); run `chatctl drain \
             {node}` first",
            still.len(),
            &still[..still.len().min(8)]
        );
        return Ok(1);
    }
    let n = view.nodes.get(&node).cloned();
    if n.is_none() {
        // A drained node that is down answers nothing and no membership
        // names it: it may be among the endpoints that did not answer.
        if view.unknown_down.is_empty() {
            eprintln!(
                "error: node {node} is unknown: no node at --endpoints or in a shard's \
                 membership is {node} (a wrong id, or one taken out already)"
            );
            return Ok(1);
        }
        println!(
            "node {node} did not answer and no shard's membership names it: nothing is left to \
             take out (if it is one of the endpoints that did not answer). It could not be marked \
             draining: do not start it again; if it does start, run `chatctl remove-node {node}` \
             at once, before any `chatctl rebalance`"
        );
        return Ok(0);
    }
    if dry_run {
        println!("would take node {node} out: it is in no shard's membership");
        return Ok(0);
    }
    let up = n.as_ref().is_some_and(|n| n.up);
    if let Some(n) = n.filter(|n| n.up) {
        // Keep it out of rebalancing for as long as it runs.
        if let Err(e) = ops.set_draining(&n.addr, true).await {
            return fail(e);
        }
        let steps: Vec<Step> = n
            .shards
            .keys()
            .map(|s| Step::CloseReplica {
                shard: *s,
                node,
                why: "node removed".into(),
            })
            .collect();
        let outcome = ops.execute(&steps, "deleting leftover copies").await;
        if !outcome.failed.is_empty() {
            return copies_left(node, &outcome.failed, "remove-node");
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"removed": node, "marked_draining": up})
        );
    } else if !up {
        println!(
            "node {node} is down and in no shard's membership. It could not be marked draining: \
             do not start it again; if it does start, run `chatctl remove-node {node}` at once, \
             before any `chatctl rebalance`. Drop it from --endpoints; keep its [[nodes]] entry \
             in the config and never reuse its id"
        );
    } else {
        println!(
            "node {node} holds no replica and is marked draining; stop its process and drop it \
             from --endpoints. Keep its [[nodes]] entry in the config (the bootstrap nodes of a \
             running cluster never change) and never reuse its id; delete its data folder once \
             `chatctl verify` is clean"
        );
    }
    Ok(0)
}

/// Reports the copies on `node` that could not be deleted: the command
/// (`again`) did not finish.
fn copies_left(node: u64, failed: &[(Step, String)], again: &str) -> anyhow::Result<i32> {
    for (step, why) in failed {
        eprintln!("error: {step}: {why}");
    }
    eprintln!(
        "node {node} still holds {} cop(ies) it no longer serves; run `chatctl {again} {node}` \
         again",
        failed.len()
    );
    Ok(1)
}

pub async fn move_replica(
    endpoints: &[String],
    shard: u64,
    from: u64,
    to: u64,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let Some((ops, view)) = gathered(endpoints, json).await else {
        return Ok(2);
    };
    if let Err(e) = view.node(to).and_then(|_| view.node(from)) {
        return fail(e);
    }
    let Some(m) = view.membership(shard) else {
        return fail(anyhow::anyhow!(
            "no node reports shard {shard} (the cluster has {})",
            view.shard_count
        ));
    };
    if !m.voters.contains(&from) && !(m.voters.contains(&to)) {
        return fail(anyhow::anyhow!(
            "node {from} is not a voter of shard {shard} (voters {:?})",
            m.voters
        ));
    }
    // What the move itself checks first, so that a dry run says the same.
    if let Err(e) = ops::check_move(&view, m, shard, from, to) {
        return fail(e);
    }
    if !m.members.iter().any(|x| x.node_id == from) && !json {
        eprintln!(
            "note: node {from} is not a member of shard {shard} and node {to} is a voter (moved \
             already, or a wrong FROM?): only a copy left on node {from} is deleted"
        );
    }
    let steps = vec![Step::MoveReplica {
        shard,
        from,
        to,
        why: "requested".into(),
    }];
    let code = run_plan(&ops, steps, "moving", dry_run, json).await?;
    if code != 0 || dry_run {
        return Ok(code);
    }
    // The move is done; a copy left on the old node (down, or its close
    // refused) is disk a script must hear about, as drain reports it. The
    // node is asked at its address: no membership names it any more.
    let addr = &view.node(from)?.addr;
    let kept = match ops.node_status(addr).await {
        Err(e) => Some(format!("did not answer ({e})")),
        Ok(st) if st.shards.iter().any(|s| s.shard_id == shard) => {
            Some("still holds it".to_string())
        }
        Ok(_) => None,
    };
    if let Some(why) = kept {
        eprintln!(
            "node {from} {why}: its old copy of shard {shard} is not deleted yet; run this \
             command again, or `chatctl rebalance`, with node {from} up to delete it"
        );
        return Ok(1);
    }
    Ok(0)
}

pub async fn transfer_leader(
    endpoints: &[String],
    shard: u64,
    to: Option<u64>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<i32> {
    if to == Some(0) {
        return fail(anyhow::anyhow!(
            "node ids start at 1; leave the node out to let the leader pick one"
        ));
    }
    let Some((ops, view)) = gathered(endpoints, json).await else {
        return Ok(2);
    };
    if view.shard_count > 0 && shard >= view.shard_count {
        return fail(anyhow::anyhow!(
            "no shard {shard}: the cluster has shards 0 to {}",
            view.shard_count.saturating_sub(1)
        ));
    }
    let Some((leader, st)) = view.leader_status(shard) else {
        return fail(anyhow::anyhow!("shard {shard} has no leader right now"));
    };
    if let Some(to) = to.filter(|to| !st.voters.contains(to)) {
        return fail(anyhow::anyhow!(
            "node {to} is not a voter of shard {shard} (voters {:?}); only a voter can lead",
            st.voters
        ));
    }
    if dry_run {
        println!(
            "would move shard {shard}'s leadership from node {leader} to {}",
            to.map(|t| format!("node {t}"))
                .unwrap_or_else(|| "a caught-up voter the leader picks".into())
        );
        return Ok(0);
    }
    match ops.transfer_leader(shard, to).await {
        Ok(now) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"shard": shard, "from": leader, "leader": now})
                );
            } else {
                println!("shard {shard}: leader was node {leader}, now node {now}");
            }
            Ok(0)
        }
        Err(e) => fail(e),
    }
}

/// Finishes membership changes cut short between their two steps; the
/// view after them, if there were any.
async fn finished_joint_changes(
    ops: &ops::Ops,
    view: &ops::View,
    json: bool,
) -> anyhow::Result<Option<ops::View>> {
    let finished = ops.finish_joint_changes(view).await?;
    if finished.is_empty() {
        return Ok(None);
    }
    if !json {
        println!("finished the membership change cut short in shard(s) {finished:?}");
    }
    Ok(Some(ops.gather().await?))
}

pub async fn rebalance(endpoints: &[String], dry_run: bool, json: bool) -> anyhow::Result<i32> {
    let Some((ops, mut view)) = gathered(endpoints, json).await else {
        return Ok(2);
    };
    if !dry_run {
        match finished_joint_changes(&ops, &view, json).await {
            Ok(Some(v)) => view = v,
            Ok(None) => {}
            Err(e) => return fail(e),
        }
    }
    if let Some(n) = view.nodes.values().find(|n| !n.up) {
        return fail(anyhow::anyhow!(
            "node {} at {} is down; rebalancing needs every node up (drain it if it is gone \
             for good)",
            n.id,
            n.addr
        ));
    }
    let steps = match ops::plan_rebalance(&view) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    run_plan(&ops, steps, "rebalancing", dry_run, json).await
}

pub async fn snapshot(
    endpoints: &[String],
    shard: Option<u64>,
    compact: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let Some((ops, view)) = gathered(endpoints, json).await else {
        return Ok(2);
    };
    let shards: BTreeSet<u64> = match shard {
        Some(s) if s >= view.shard_count => {
            return fail(anyhow::anyhow!(
                "the cluster has shards 0 to {}; there is no shard {s}",
                view.shard_count.saturating_sub(1)
            ))
        }
        Some(s) => BTreeSet::from([s]),
        None => view.shard_ids(),
    };
    let (replicas, failed) = ops.snapshot_all(&view, &shards, compact).await;
    if replicas == 0 {
        return fail(anyhow::anyhow!(
            "no node that is up holds a replica of shard(s) {shards:?}"
        ));
    }
    let what = if compact { "compacted" } else { "snapshotted" };
    if json {
        println!(
            "{}",
            serde_json::json!({"shards": shards.len(), "replicas": replicas, "failed": failed})
        );
    } else {
        println!(
            "{what} {} of {replicas} replica(s) of {} shard(s) on the nodes that are up",
            replicas - failed.len(),
            shards.len()
        );
        for f in &failed {
            println!("FAILED {f}");
        }
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}

/// The shard a chat lives in and that shard's replicas.
pub async fn chat_placement(endpoints: &[String], chat: u64) -> anyhow::Result<serde_json::Value> {
    let ops = Ops::new(endpoints, true);
    let view = ops.gather().await?;
    let slot = crate::cluster::placement::slot_of_chat(crate::types::ChatId(chat));
    let shard = crate::cluster::placement::shard_of_slot(slot, view.shard_count).0;
    let h = shard_health(&view, shard);
    Ok(serde_json::json!({
        "slot": slot, "shard": shard, "leader": h.leader, "voters": h.voters,
        "learners": h.learners, "preferred_region": h.preferred_region,
    }))
}
