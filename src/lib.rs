pub mod api;
pub mod cli;
pub mod cluster;
pub mod metrics;
pub mod node;
pub mod shard;
pub mod storage;
pub mod types;
