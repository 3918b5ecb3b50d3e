//! Every metric name, in one place, and the Prometheus exporter.

/// Time of one group commit, labelled `store="raft_log"` (every ack waits
/// for one) or `store="sled"` (before purges, snapshot installs, shutdown).
pub const STORAGE_FSYNC_SECONDS: &str = "chatstore_storage_fsync_seconds";
/// Callbacks completed by one group commit, labelled like the time.
pub const STORAGE_FSYNC_BATCH: &str = "chatstore_storage_fsync_batch_callbacks";
/// Segment files of the Raft logs of the process's nodes.
pub const RAFT_LOG_SEGMENTS: &str = "chatstore_raft_log_segments";
/// Bytes in those files.
pub const RAFT_LOG_BYTES: &str = "chatstore_raft_log_bytes";
/// Bytes of live entries copied out of mostly dead segments.
pub const RAFT_LOG_COPIED_BYTES: &str = "chatstore_raft_log_copied_forward_bytes_total";
/// sled blob files fsynced by the group commit (expected to stay 0: pages are
/// kept below sled's blob threshold, see `storage::SEGMENT_BYTES`).
pub const STORAGE_BLOBS_SYNCED: &str = "chatstore_storage_blobs_synced_total";
pub const SHARD_APPLY_ENTRIES: &str = "chatstore_shard_apply_entries_total";
/// Log entries per state-machine apply call (each call writes two markers).
pub const SHARD_APPLY_CALL_ENTRIES: &str = "chatstore_shard_apply_call_entries";
pub const SHARD_PROPOSAL_COMMANDS: &str = "chatstore_shard_proposal_commands";
pub const SHARD_PROPOSAL_SECONDS: &str = "chatstore_shard_proposal_seconds";
/// Writes per router-to-node call (router write coalescing).
pub const ROUTER_WRITE_BATCH: &str = "chatstore_router_write_batch";
/// Reads per message on a router's read stream to a node.
pub const ROUTER_READ_BATCH: &str = "chatstore_router_read_batch_calls";
/// Node calls (each a shard's batch of writes) per message on a router's
/// write stream to a node.
pub const ROUTER_WRITE_STREAM_BATCH: &str = "chatstore_router_write_stream_batch_calls";
/// Replicas on this node whose Raft timers are stopped (quiet shards).
pub const SHARD_QUIET: &str = "chatstore_shard_quiet";
/// Quiet replicas woken, by cause.
pub const SHARD_WAKES: &str = "chatstore_shard_wakes_total";
/// How far this node's clock is off from its peers' (ms, positive: ahead),
/// as the liveness pings measure it; beyond `CLOCK_OFFSET_MS_MAX` the node
/// gives up leadership.
pub const CLOCK_OFFSET_MS: &str = "chatstore_clock_offset_ms";
/// History pages served, by where they were found: `memory` (a chat's tail
/// in the chat cache) or `sled`.
pub const READ_CACHE_PAGES: &str = "chatstore_read_cache_pages_total";
/// Bytes of messages the replicas of the process keep in memory for reads.
pub const MESSAGE_CACHE_BYTES: &str = "chatstore_message_cache_bytes";
/// Bytes of applied writes the replicas of the process hold for sled
/// (`shard::memtable`).
pub const MEMTABLE_BYTES: &str = "chatstore_memtable_bytes";
/// Memtable flushes into sled.
pub const MEMTABLE_FLUSHES: &str = "chatstore_memtable_flushes_total";
pub const DEDUP_HITS: &str = "chatstore_dedup_hits_total";
pub const TTL_EXPIRED: &str = "chatstore_ttl_expired_total";
pub const ERASURE_KEYS_DESTROYED: &str = "chatstore_erasure_keys_destroyed_total";
pub const ERASURE_RECORDS_RESEALED: &str = "chatstore_erasure_records_resealed_total";
pub const ERASURE_SNAPSHOTS_FORCED: &str = "chatstore_erasure_snapshots_forced_total";
pub const ERASURE_PURGES_FORCED: &str = "chatstore_erasure_purges_forced_total";
/// Epoch keys alive on this node; more than two means erasure is behind.
pub const ERASURE_KEYS_ALIVE: &str = "chatstore_erasure_keys_alive";
pub const RAFT_RPC_SECONDS: &str = "chatstore_raft_rpc_seconds";
/// AppendEntries calls per message on a node pair's append stream.
pub const RAFT_APPEND_BATCH: &str = "chatstore_raft_append_batch_calls";
pub const ROUTER_REQUESTS: &str = "chatstore_router_requests_total";
/// Watch long polls a router sent, by who sent them: a stream for itself
/// (`by="stream"`) or a chat's shared poll for every stream that follows it
/// (`by="shared"`).
pub const ROUTER_WATCH_POLLS: &str = "chatstore_router_watch_polls_total";
/// A router's shared Watch polls alive: each polls one chat for all of
/// the router's streams that follow it (for a moment two of one chat, when
/// one that ended is replaced).
pub const ROUTER_WATCH_FEEDS: &str = "chatstore_router_watch_feeds";
/// Watch streams that stopped following a chat's shared poll, behind what
/// it keeps (a client reading slowly) or after it stopped, and went back to
/// polling for themselves.
pub const ROUTER_WATCH_FELL_BEHIND: &str = "chatstore_router_watch_fell_behind_total";
pub const NODE_API_REQUESTS: &str = "chatstore_node_api_requests_total";

/// Installs the Prometheus exporter listening on `addr`.
pub fn install_exporter(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()?;
    Ok(())
}
