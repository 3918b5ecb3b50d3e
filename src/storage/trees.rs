//! Every sled tree name, in one place.

use crate::types::ShardId;

/// A shard's Raft log, vote, committed and purged pointers.
pub fn log_tree(shard: ShardId) -> String {
    format!("log/{}", shard.0)
}

/// A shard's state machine.
pub fn state_tree(shard: ShardId) -> String {
    format!("state/{}", shard.0)
}

/// Node-level facts (node id, cluster name) checked on open.
pub const NODE_TREE: &str = "node";
