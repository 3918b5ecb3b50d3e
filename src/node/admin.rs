//! The admin API: one idempotent membership step per call. `chatctl` strings
//! the steps into operations (move a replica, drain a node, rebalance) and
//! re-running an operation that was cut short finishes it.
//!
//! Calls that change a shard's membership go to its leader; a follower
//! answers UNAVAILABLE with a leader hint, like a write.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::ChangeMembers;
use tonic::{Request, Response, Status};

use crate::api::pb::node::admin_server::Admin;
use crate::api::pb::node::{
    AddLearnerRequest, ChangeVotersRequest, CloseReplicaReply, CloseReplicaRequest, NodeStatus,
    SetDrainingRequest, ShardRequest, ShardStatus, TransferLeaderRequest,
};
use crate::api::status::from_shard_error;
use crate::cluster::placement;
use crate::node::api::{build_snapshot, hosted, node_status, shard_status};
use crate::node::duties;
use crate::node::Registry;
use crate::shard::types::NodeAddr;
use crate::shard::Shard;
use crate::types::ShardId;

/// How long a leadership transfer may take before the call gives up.
const TRANSFER_WAIT: Duration = Duration::from_secs(15);
/// How long a membership change may take to commit.
const CHANGE_WAIT: Duration = Duration::from_secs(30);

pub struct AdminService {
    pub registry: Registry,
}

impl AdminService {
    fn shard(&self, id: u64) -> Result<Arc<Shard>, Status> {
        hosted(&self.registry, id)
    }

    /// This node's replica of `id`, which must be the leader; woken if it
    /// was quiet, since membership changes need its timers.
    async fn leader(&self, id: u64) -> Result<Arc<Shard>, Status> {
        let shard = self.shard(id)?;
        shard.wake_leader().await;
        if !shard.is_leader() {
            return Err(from_shard_error(crate::shard::Error::NotLeader {
                shard: shard.id,
                leader: shard.leader(),
            }));
        }
        Ok(shard)
    }

    fn status(&self, shard: &Shard) -> Response<ShardStatus> {
        Response::new(shard_status(shard, &self.registry))
    }
}

fn raft_error<E: std::fmt::Display>(what: &str, e: E) -> Status {
    Status::unavailable(format!("{what}: {e}; safe to retry"))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn open_replica(
        &self,
        request: Request<ShardRequest>,
    ) -> Result<Response<ShardStatus>, Status> {
        let id = request.into_inner().shard_id;
        let shard = self
            .registry
            .open_replica(ShardId(id))
            .await
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        Ok(self.status(&shard))
    }

    async fn close_replica(
        &self,
        request: Request<CloseReplicaRequest>,
    ) -> Result<Response<CloseReplicaReply>, Status> {
        let req = request.into_inner();
        let Some(shard) = self.registry.get(ShardId(req.shard_id)) else {
            return Ok(Response::new(CloseReplicaReply { closed: false }));
        };
        let me = self.registry.node_id().0;
        let m = shard.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        let member = membership.nodes().any(|(id, _)| *id == me);
        if member && !req.force {
            return Err(Status::failed_precondition(format!(
                "node {me} is still a member of shard {} as far as it knows; move the replica \
                 away first (chatctl move-replica), or pass force if the leader no longer lists it",
                req.shard_id
            )));
        }
        let known = m.membership_config.log_id().as_ref().map_or(0, |l| l.index);
        // Without force, the membership this node knows now (which lists it
        // not) is the one checked again once the replica has stopped.
        let checked = match req.force {
            true => req.membership_index,
            false => Some(known),
        };
        if let Some(checked) = checked.filter(|c| known > *c) {
            return Err(Status::failed_precondition(format!(
                "node {me} knows shard {}'s membership at log index {known}, newer than the one \
                 checked at {checked}: it may have been added again; its copy stays",
                req.shard_id
            )));
        }
        if m.state == openraft::ServerState::Leader {
            return Err(Status::failed_precondition(format!(
                "node {me} leads shard {}; transfer leadership first",
                req.shard_id
            )));
        }
        drop(shard);
        let closed = self
            .registry
            .close_replica(ShardId(req.shard_id), checked)
            .await
            .map_err(|e| match e.downcast_ref::<crate::node::KeptCopy>() {
                Some(kept) => Status::failed_precondition(kept.to_string()),
                None => Status::internal(format!("close replica: {e:#}")),
            })?;
        Ok(Response::new(CloseReplicaReply { closed }))
    }

    async fn add_learner(
        &self,
        request: Request<AddLearnerRequest>,
    ) -> Result<Response<ShardStatus>, Status> {
        let req = request.into_inner();
        if req.node_id == 0 || req.addr.is_empty() || req.region.is_empty() {
            return Err(Status::invalid_argument(
                "add_learner needs a node id, its address and its region",
            ));
        }
        if !self.registry.config().regions.contains(&req.region) {
            return Err(Status::invalid_argument(format!(
                "region {:?} is not one of the cluster's regions {:?}",
                req.region,
                self.registry.config().regions
            )));
        }
        let shard = self.leader(req.shard_id).await?;
        let known = {
            let m = shard.raft.metrics().borrow_watched().clone();
            let known = m
                .membership_config
                .membership()
                .nodes()
                .any(|(id, _)| *id == req.node_id);
            known
        };
        if !known {
            let node = NodeAddr {
                addr: req.addr,
                region: req.region,
            };
            shard
                .raft
                .add_learner(req.node_id, node, false)
                .await
                .map_err(|e| raft_error("add learner", e))?;
        }
        Ok(self.status(&shard))
    }

    async fn change_voters(
        &self,
        request: Request<ChangeVotersRequest>,
    ) -> Result<Response<ShardStatus>, Status> {
        let req = request.into_inner();
        let shard = self.leader(req.shard_id).await?;
        let me = self.registry.node_id().0;
        let m = shard.raft.metrics().borrow_watched().clone();
        let membership = m.membership_config.membership();
        // In a joint config (a change cut short between its two steps) the
        // base is the config it was moving to: `voter_ids` is the union of
        // both, and would bring back the voters being removed.
        let voters: BTreeSet<u64> = membership
            .get_joint_config()
            .last()
            .cloned()
            .unwrap_or_default();
        let members: BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
        if let Some(missing) = req.add.iter().find(|n| !members.contains(n)) {
            return Err(Status::failed_precondition(format!(
                "node {missing} is not a learner of shard {}; add it as a learner first",
                req.shard_id
            )));
        }
        let remove: Vec<u64> = match req.learners_only {
            true => req
                .remove
                .iter()
                .copied()
                .filter(|n| !voters.contains(n))
                .collect(),
            false => req.remove.clone(),
        };
        if remove.contains(&me) {
            return Err(Status::failed_precondition(format!(
                "node {me} leads shard {} and cannot remove itself; transfer leadership first",
                req.shard_id
            )));
        }
        let mut wanted = voters.clone();
        wanted.extend(req.add.iter().copied());
        for n in &remove {
            wanted.remove(n);
        }
        if wanted.is_empty() {
            return Err(Status::invalid_argument("a shard needs at least one voter"));
        }
        // Two operations that each remove a voter (two moves of one shard
        // at once) would together leave it short; a shard already short
        // may still gain voters.
        let factor = self.registry.config().replication_factor as usize;
        if wanted.len() < voters.len() && wanted.len() < factor {
            return Err(Status::failed_precondition(format!(
                "shard {} would have {} voters, fewer than the replication factor {factor}; \
                 add a voter in the same change",
                req.shard_id,
                wanted.len()
            )));
        }
        // Two moves checked on stale views (two operators at once) must not
        // together give one region half the voters or more, where losing
        // that region stops the shard; a shard already so may still change.
        let region_of = |n: u64| {
            membership
                .nodes()
                .find(|(id, _)| **id == n)
                .map_or("", |(_, addr)| addr.region.as_str())
        };
        if let Some((region, n)) = placement::crowded_region(&wanted, region_of) {
            if placement::crowded_region(&voters, region_of).is_none() {
                return Err(Status::failed_precondition(format!(
                    "shard {} would have {n} of its {} voters in region {region}: losing it \
                     would stop the shard; pick a node in another region",
                    req.shard_id,
                    wanted.len()
                )));
            }
        }
        let joint = membership.get_joint_config().len() > 1;
        // Removed voters leave the membership altogether; a stale learner (a
        // node a move gave up on) goes when it is named in `remove`.
        let stale_learners: BTreeSet<u64> = remove
            .iter()
            .copied()
            .filter(|n| members.contains(n) && !voters.contains(n))
            .collect();
        if wanted != voters || joint {
            tokio::time::timeout(
                CHANGE_WAIT,
                shard
                    .raft
                    .change_membership(ChangeMembers::ReplaceAllVoters(wanted), false),
            )
            .await
            .map_err(|_| Status::deadline_exceeded("membership change did not commit in time"))?
            .map_err(|e| raft_error("change voters", e))?;
        }
        if !stale_learners.is_empty() {
            tokio::time::timeout(
                CHANGE_WAIT,
                shard
                    .raft
                    .change_membership(ChangeMembers::RemoveNodes(stale_learners), false),
            )
            .await
            .map_err(|_| Status::deadline_exceeded("membership change did not commit in time"))?
            .map_err(|e| raft_error("remove learners", e))?;
        }
        Ok(self.status(&shard))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<ShardStatus>, Status> {
        let req = request.into_inner();
        let shard = self.leader(req.shard_id).await?;
        let me = self.registry.node_id().0;
        let is_voter = shard
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == req.to_node);
        // Caught up, answering pings (a voter that stopped may still look
        // caught up on a quiet shard) and with a good clock, as the node's
        // own hand-overs pick them.
        let candidates =
            duties::caught_up_voters(&self.registry, &shard, &self.registry.clock_report());
        let to = if req.to_node != 0 {
            if req.to_node == me {
                return Ok(self.status(&shard));
            }
            if !is_voter {
                return Err(Status::failed_precondition(format!(
                    "node {} is not a voter of shard {}",
                    req.to_node, req.shard_id
                )));
            }
            if !candidates.iter().any(|(id, _)| *id == req.to_node) {
                return Err(Status::unavailable(format!(
                    "node {} is behind the leader of shard {}, does not answer this node's \
                     pings, or its clock is off; retry once it catches up",
                    req.to_node, req.shard_id
                )));
            }
            req.to_node
        } else {
            let preferred = self.registry.placement().preferred_region(shard.id);
            candidates
                .iter()
                .min_by_key(|(id, region)| (region != preferred, *id))
                .map(|(id, _)| *id)
                .ok_or_else(|| {
                    Status::unavailable(format!(
                        "shard {} has no caught-up voter to hand leadership to",
                        req.shard_id
                    ))
                })?
        };
        shard
            .transfer_leader(to)
            .await
            .map_err(|e| raft_error("transfer leadership", e))?;
        shard
            .raft
            .wait(Some(TRANSFER_WAIT))
            .metrics(|m| m.current_leader == Some(to), "leadership transferred")
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "node {to} did not take over shard {} within {TRANSFER_WAIT:?}; safe to retry",
                    req.shard_id
                ))
            })?;
        Ok(self.status(&shard))
    }

    async fn compact(
        &self,
        request: Request<ShardRequest>,
    ) -> Result<Response<ShardStatus>, Status> {
        let shard = self.shard(request.into_inner().shard_id)?;
        let upto = build_snapshot(&shard).await?;
        shard
            .raft
            .trigger()
            .purge_log(upto)
            .await
            .map_err(|e| raft_error("purge log", e))?;
        // Purging waits for replication to no longer need the entries; the
        // status shows how far it got.
        let _ = shard
            .raft
            .wait(Some(Duration::from_secs(5)))
            .metrics(
                |m| m.purged.as_ref().map(|l| l.index).unwrap_or(0) >= upto,
                "log purged",
            )
            .await;
        Ok(self.status(&shard))
    }

    async fn set_draining(
        &self,
        request: Request<SetDrainingRequest>,
    ) -> Result<Response<NodeStatus>, Status> {
        let req = request.into_inner();
        self.registry
            .set_draining(req.draining)
            .await
            .map_err(|e| Status::internal(format!("set draining: {e:#}")))?;
        Ok(Response::new(node_status(&self.registry)))
    }
}
