//! Every metric name, in one place, and the Prometheus exporter.

pub const STORAGE_FSYNC_SECONDS: &str = "chatstore_storage_fsync_seconds";
pub const STORAGE_FSYNC_BATCH: &str = "chatstore_storage_fsync_batch_callbacks";
pub const SHARD_APPLY_ENTRIES: &str = "chatstore_shard_apply_entries_total";
pub const SHARD_PROPOSAL_COMMANDS: &str = "chatstore_shard_proposal_commands";
pub const SHARD_PROPOSAL_SECONDS: &str = "chatstore_shard_proposal_seconds";
pub const DEDUP_HITS: &str = "chatstore_dedup_hits_total";
pub const TTL_EXPIRED: &str = "chatstore_ttl_expired_total";
pub const RAFT_RPC_SECONDS: &str = "chatstore_raft_rpc_seconds";
pub const ROUTER_REQUESTS: &str = "chatstore_router_requests_total";
pub const NODE_API_REQUESTS: &str = "chatstore_node_api_requests_total";

/// Installs the Prometheus exporter listening on `addr`.
pub fn install_exporter(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()?;
    Ok(())
}
