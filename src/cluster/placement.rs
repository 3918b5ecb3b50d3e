//! Placement: chat → slot → shard → replicas.
//!
//! `slot = xxh3_64(chat_id as 8 big-endian bytes, seed 0) mod 4096`. Slots map
//! to shards in contiguous ranges (shard `s` owns slots
//! `[s * 4096 / shards, (s + 1) * 4096 / shards)`), so a later split moves a
//! range. Every router and node computes the same answer from the cluster
//! config alone; the hash is named exactly and pinned by test vectors, never
//! `DefaultHasher`, whose output may change between Rust releases.
//!
//! Initial replicas: a shard's preferred region comes first, then the other
//! regions in config order, one replica per region while regions last.
//! Within a region (placement version 2) the k-th shard to prefer a region
//! takes node `k` of it (round robin), so leaders spread over every node of
//! the region; the region at place `j` of the shard's order takes node
//! `k + j * (k / nodes)`, which turns the others by one more for each round
//! of the preferred region's nodes, so replica sets mix instead of forming
//! fixed groups. Version 1 chose node `shard id` in every region: with as
//! many nodes per region as regions, every shard led from a region was led
//! by the same node of it.

use std::collections::{BTreeMap, BTreeSet};

use crate::cluster::ClusterConfig;
use crate::types::{ChatId, NodeId, ShardId};

/// The newest placement scheme (`placement_version`; the shipped configs
/// name it).
pub const PLACEMENT_VERSION: u32 = 2;

/// Number of slots. Fixed forever: changing it moves every chat.
pub const SLOT_COUNT: u64 = 4096;

pub fn slot_of_chat(chat: ChatId) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&chat.0.to_be_bytes(), 0) % SLOT_COUNT
}

/// The shard that owns `slot` in a cluster of `shards` shards.
pub fn shard_of_slot(slot: u64, shards: u64) -> ShardId {
    debug_assert!(slot < SLOT_COUNT);
    // Inverse of the contiguous ranges in the module doc.
    ShardId(((slot + 1) * shards - 1) / SLOT_COUNT)
}

#[derive(Debug, Clone)]
pub struct Placement {
    shards: u64,
    /// Per shard: replicas (preferred-region replica first) and preferred region.
    replicas: Vec<Vec<NodeId>>,
    preferred_region: Vec<String>,
    node_region: BTreeMap<NodeId, String>,
}

impl Placement {
    pub fn new(config: &ClusterConfig) -> Placement {
        let shards = config.shards as u64;
        let mut by_region: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
        for n in config.nodes.iter().filter(|n| n.bootstrap) {
            by_region.entry(&n.region).or_default().push(NodeId(n.id));
        }
        for nodes in by_region.values_mut() {
            nodes.sort();
        }
        let rf = config.replication_factor as usize;
        let mut replicas = Vec::with_capacity(shards as usize);
        let mut preferred_region = Vec::with_capacity(shards as usize);
        // Per region, how many shards so far prefer it.
        let mut preferring: BTreeMap<String, usize> = BTreeMap::new();
        for s in 0..shards {
            let preferred = config
                .preferred_regions
                .get(&(s as u32))
                .cloned()
                .unwrap_or_else(|| config.regions[(s as usize) % config.regions.len()].clone());
            // Regions in order, starting at the preferred one.
            let start = config
                .regions
                .iter()
                .position(|r| *r == preferred)
                .expect("validated: preferred region exists");
            let order: Vec<&str> = (0..config.regions.len())
                .map(|i| config.regions[(start + i) % config.regions.len()].as_str())
                .collect();
            let k = {
                let count = preferring.entry(preferred.clone()).or_default();
                *count += 1;
                *count - 1
            };
            // The node of a region at place `j` of the order, before rounds.
            let base = |j: usize, nodes: usize| match config.placement_version {
                1 => s as usize,
                _ => k + j * (k / nodes),
            };
            let mut chosen: Vec<NodeId> = Vec::with_capacity(rf);
            let mut round = 0usize;
            while chosen.len() < rf {
                let mut progressed = false;
                for (j, region) in order.iter().enumerate() {
                    if chosen.len() == rf {
                        break;
                    }
                    let Some(nodes) = by_region.get(region) else {
                        continue;
                    };
                    if round < nodes.len() {
                        let pick = nodes[(base(j, nodes.len()) + round) % nodes.len()];
                        if !chosen.contains(&pick) {
                            chosen.push(pick);
                            progressed = true;
                        }
                    }
                }
                round += 1;
                assert!(
                    progressed || round <= config.nodes.len(),
                    "validated: replication_factor <= node count"
                );
            }
            replicas.push(chosen);
            preferred_region.push(preferred);
        }
        let node_region = config
            .nodes
            .iter()
            .map(|n| (NodeId(n.id), n.region.clone()))
            .collect();
        Placement {
            shards,
            replicas,
            preferred_region,
            node_region,
        }
    }

    pub fn shard_count(&self) -> u64 {
        self.shards
    }

    pub fn shard_of_slot(&self, slot: u64) -> ShardId {
        shard_of_slot(slot, self.shards)
    }

    pub fn shard_of_chat(&self, chat: ChatId) -> ShardId {
        self.shard_of_slot(slot_of_chat(chat))
    }

    /// Initial replicas of `shard`; the first is in the preferred region.
    pub fn replicas(&self, shard: ShardId) -> &[NodeId] {
        &self.replicas[shard.0 as usize]
    }

    pub fn preferred_region(&self, shard: ShardId) -> &str {
        &self.preferred_region[shard.0 as usize]
    }

    /// The order in which `shard`'s replicas should take over its leadership:
    /// the preferred replica, then the others by round trip from the
    /// preferred region (nearest first, so writes stay fast after a
    /// failover), placement order breaking ties.
    pub fn failover_order(
        &self,
        shard: ShardId,
        latency: &crate::cluster::config::LatencyConfig,
    ) -> Vec<NodeId> {
        let replicas = self.replicas(shard);
        let home = self.preferred_region(shard);
        let mut rest: Vec<(usize, NodeId)> = replicas.iter().copied().enumerate().skip(1).collect();
        rest.sort_by_key(|(i, n)| {
            let region = self.region_of(*n).unwrap_or_default();
            (latency.rtt(home, region), *i)
        });
        replicas
            .iter()
            .take(1)
            .copied()
            .chain(rest.into_iter().map(|(_, n)| n))
            .collect()
    }

    /// The rank of `node`'s replica of `shard` in [`Placement::failover_order`].
    /// A replica moved onto a node after bootstrap takes the rank of the
    /// initial replica in its region (the one it most likely replaced).
    pub fn failover_rank(
        &self,
        shard: ShardId,
        node: NodeId,
        latency: &crate::cluster::config::LatencyConfig,
    ) -> usize {
        let order = self.failover_order(shard, latency);
        let region = self.region_of(node);
        order
            .iter()
            .position(|n| *n == node)
            .or_else(|| order.iter().position(|n| self.region_of(*n) == region))
            .unwrap_or(order.len())
    }

    pub fn region_of(&self, node: NodeId) -> Option<&str> {
        self.node_region.get(&node).map(String::as_str)
    }

    /// Shards whose initial replicas put more than half in one region (so
    /// losing that region stops them), with that region and its count.
    pub fn regional_majorities(&self) -> Vec<(ShardId, String, usize)> {
        let mut out = Vec::new();
        for s in (0..self.shards).map(ShardId) {
            let replicas = self.replicas(s);
            let mut per_region: BTreeMap<&str, usize> = BTreeMap::new();
            for n in replicas {
                *per_region
                    .entry(self.region_of(*n).unwrap_or(""))
                    .or_default() += 1;
            }
            if let Some((region, count)) = per_region.into_iter().max_by_key(|(_, c)| *c) {
                if replicas.len() > 1 && count * 2 > replicas.len() {
                    out.push((s, region.to_string(), count));
                }
            }
        }
        out
    }

    /// Shards that have an initial replica on `node`.
    pub fn shards_on(&self, node: NodeId) -> Vec<ShardId> {
        (0..self.shards)
            .map(ShardId)
            .filter(|s| self.replicas(*s).contains(&node))
            .collect()
    }
}

/// A region holding half of `voters` or more, and how many it holds: losing
/// it would leave the others no majority.
pub fn crowded_region<'a>(
    voters: &BTreeSet<u64>,
    region_of: impl Fn(u64) -> &'a str,
) -> Option<(&'a str, usize)> {
    let mut per_region: BTreeMap<&str, usize> = BTreeMap::new();
    for v in voters {
        *per_region.entry(region_of(*v)).or_default() += 1;
    }
    per_region.into_iter().find(|(_, n)| n * 2 >= voters.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_with_half_the_voters_or_more_is_crowded() {
        let region = |n: u64| match n {
            1 | 4 => "eu",
            2 | 5 => "us",
            _ => "ap",
        };
        let set = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
        // One voter per region: fine.
        assert_eq!(crowded_region(&set(&[1, 2, 3]), region), None);
        // A majority, or half of an even count: losing it stops the shard.
        assert_eq!(crowded_region(&set(&[1, 4, 3]), region), Some(("eu", 2)));
        assert_eq!(crowded_region(&set(&[1, 2, 3, 4]), region), Some(("eu", 2)));
        // One voter, or two, always are: a change from such a shard is not
        // refused for it (see the node's `change_voters`).
        assert_eq!(crowded_region(&set(&[1]), region), Some(("eu", 1)));
        assert!(crowded_region(&set(&[1, 2]), region).is_some());
    }

    /// Pinned values: if these change, every chat in every cluster moves.
    #[test]
    fn slot_test_vectors() {
        assert_eq!(
            xxhash_rust::xxh3::xxh3_64_with_seed(b"", 0),
            0x2D06_8005_38D3_94C2,
            "xxh3 reference value for empty input"
        );
        let vectors = [
            (1u64, SLOT_PINNED_1),
            (42, SLOT_PINNED_42),
            (u64::MAX, SLOT_PINNED_MAX),
        ];
        for (chat, slot) in vectors {
            assert_eq!(slot_of_chat(ChatId(chat)), slot, "chat {chat}");
        }
    }
    // Computed independently with the Python `xxhash` package (xxh3_64_intdigest, seed 0).
    const SLOT_PINNED_1: u64 = 3059;
    const SLOT_PINNED_42: u64 = 172;
    const SLOT_PINNED_MAX: u64 = 1043;

    /// A config of `nodes`, listing the regions they are in (eu, us, ap
    /// order).
    fn config(nodes: &[(u64, &str)], shards: u32) -> ClusterConfig {
        let regions: Vec<String> = ["eu", "us", "ap"]
            .iter()
            .filter(|r| nodes.iter().any(|(_, n)| n == *r))
            .map(|r| format!("{r:?}"))
            .collect();
        let mut text = format!(
            "cluster_name = \"t\"\nshards = {shards}\nregions = [{}]\n",
            regions.join(", ")
        );
        for (id, region) in nodes {
            text.push_str(&format!(
                "[[nodes]]\nid = {id}\nregion = \"{region}\"\nraft_addr = \"127.0.0.1:{id}\"\n"
            ));
        }
        ClusterConfig::from_toml(&text).unwrap()
    }

    /// Nodes in every region spread each shard; three nodes in two regions,
    /// two in one, give that region a majority, which is reported.
    #[test]
    fn regional_majorities_are_reported() {
        let even = Placement::new(&config(&[(1, "eu"), (2, "us"), (3, "ap")], 8));
        assert!(even.regional_majorities().is_empty());
        let lopsided = Placement::new(&config(&[(1, "eu"), (2, "us"), (4, "eu")], 8));
        let found = lopsided.regional_majorities();
        assert_eq!(found.len(), 8, "{found:?}");
        assert!(found
            .iter()
            .all(|(_, region, count)| region == "eu" && *count == 2));
    }

    #[test]
    fn slots_cover_shards_in_contiguous_ranges() {
        let p = Placement::new(&config(&[(1, "eu"), (2, "us"), (3, "ap")], 64));
        let mut last = 0;
        let mut counts = [0u32; 64];
        for slot in 0..SLOT_COUNT {
            let s = p.shard_of_slot(slot).0;
            assert!(s >= last, "ranges are contiguous");
            last = s;
            counts[s as usize] += 1;
        }
        assert!(counts.iter().all(|c| *c == 64), "{counts:?}");
        assert_eq!(p.shard_of_slot(0), ShardId(0));
        assert_eq!(p.shard_of_slot(SLOT_COUNT - 1), ShardId(63));
    }

    #[test]
    fn one_replica_per_region_preferred_first() {
        let p = Placement::new(&config(&[(1, "eu"), (2, "us"), (3, "ap")], 6));
        for s in 0..6 {
            let r = p.replicas(ShardId(s));
            assert_eq!(r.len(), 3);
            assert_eq!(p.region_of(r[0]).unwrap(), p.preferred_region(ShardId(s)));
            let mut regions: Vec<_> = r.iter().map(|n| p.region_of(*n).unwrap()).collect();
            regions.sort();
            assert_eq!(regions, ["ap", "eu", "us"]);
        }
        assert_eq!(p.preferred_region(ShardId(0)), "eu");
        assert_eq!(p.preferred_region(ShardId(1)), "us");
    }

    #[test]
    fn nine_nodes_spread_evenly() {
        let nodes: Vec<(u64, &str)> = (1..=9)
            .map(|i| (i, ["eu", "us", "ap"][((i - 1) / 3) as usize]))
            .collect();
        let mut spread = config(&nodes, 90);
        spread.placement_version = 2;
        let p = Placement::new(&spread);
        for n in 1..=9 {
            assert_eq!(p.shards_on(NodeId(n)).len(), 30, "node {n}");
        }
        // Leaders (preferred replicas) spread over all nine nodes, and the
        // replica sets are not three fixed groups of nodes.
        let mut leaders = BTreeMap::new();
        let mut sets = std::collections::BTreeSet::new();
        for s in 0..90 {
            let r = p.replicas(ShardId(s));
            *leaders.entry(r[0]).or_insert(0) += 1;
            let mut set = r.to_vec();
            set.sort();
            sets.insert(set);
        }
        assert_eq!(leaders.len(), 9, "{leaders:?}");
        assert!(leaders.values().all(|n| *n == 10), "{leaders:?}");
        assert!(sets.len() >= 9, "{} replica sets", sets.len());
        // The first scheme led every shard from nodes 1, 5 and 9; it stays
        // for clusters created with it.
        let v1 = Placement::new(&config(&nodes, 90));
        assert_eq!(config(&nodes, 90).placement_version, 1, "absent means 1");
        let v1_leaders: std::collections::BTreeSet<NodeId> =
            (0..90).map(|s| v1.replicas(ShardId(s))[0]).collect();
        assert_eq!(v1_leaders.len(), 3, "{v1_leaders:?}");
    }

    /// After the preferred replica, the nearest region takes over first.
    #[test]
    fn failover_order_prefers_the_nearest_region() {
        let mut c = config(&[(1, "eu"), (2, "us"), (3, "ap")], 3);
        c.latency.rtt_ms = [("eu/us", 80), ("us/ap", 150), ("eu/ap", 200)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let p = Placement::new(&c);
        for shard in 0..3 {
            let s = ShardId(shard);
            let order: Vec<&str> = p
                .failover_order(s, &c.latency)
                .iter()
                .map(|n| p.region_of(*n).unwrap())
                .collect();
            let expect = match p.preferred_region(s) {
                "eu" => ["eu", "us", "ap"],
                "us" => ["us", "eu", "ap"],
                _ => ["ap", "us", "eu"],
            };
            assert_eq!(order, expect, "shard {shard}");
        }
    }

    /// Bands are ordered and disjoint, and the next replica in line
    /// campaigns (after its own lease plus its timeout) only once the lease
    /// of every later voter has passed.
    #[test]
    fn election_bands_are_ordered_and_leases_pass_in_time() {
        let t = crate::cluster::RaftTiming::default();
        let bands: Vec<(u64, u64)> = (0..4).map(|r| crate::shard::election_band(&t, r)).collect();
        assert_eq!(bands[0].0, t.election_timeout_ms_min);
        for w in bands.windows(2) {
            assert!(w[0].0 < w[0].1 && w[0].1 <= w[1].0, "{bands:?}");
        }
        for r in 1..3 {
            let earliest_campaign = bands[r].1 + bands[r].0;
            for later in &bands[r + 1..] {
                assert!(earliest_campaign >= later.1, "{bands:?}");
            }
        }
    }
}
