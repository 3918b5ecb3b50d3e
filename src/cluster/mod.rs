//! The cluster as configured: regions, nodes and their addresses, the shard
//! count and the Raft timing (`config`), and the deterministic mapping of chats
//! to slots to shards to replicas that every node and router computes alike
//! (`placement`).

pub mod config;
pub mod latency;
pub mod placement;

pub use config::{ClusterConfig, ConfigError, NodeConfig, RaftTiming, RouterConfig};
pub use placement::{slot_of_chat, Placement, SLOT_COUNT};
