//! Leader-side chores, run every [`TICK`] over the shards this node leads.
//! All of them are proposals, so every replica applies the same effect at
//! the same log index, and a new leader picks up where an old one stopped
//! (the state they work from is replicated):
//! - a new shard's first leader proposes its bootstrap command (incarnation
//!   and replicated settings);
//! - self-destruct: when the TTL index holds due messages, propose
//!   `Expire { up_to_ms: now, max_items }` (DESIGN section 6);
//! - dedup records older than the replicated dedup window are dropped with
//!   `GcDedup`.

use std::time::Duration;

use tokio::sync::watch;

use crate::api::pb::replicated::{command, BootstrapCmd, Command, ExpireCmd, GcDedupCmd};
use crate::node::Registry;
use crate::shard::apply::default_settings;
use crate::shard::Shard;
use crate::storage::keys;
use crate::types::now_ms;

/// How often chores run. Bounds how late a self-destructing message is
/// deleted after its expiry (reads hide it on time regardless).
pub const TICK: Duration = Duration::from_millis(500);
/// Most messages one Expire command deletes; more go in the next tick.
pub const EXPIRE_BATCH_MAX: u32 = 1_000;
/// Most dedup records one GcDedup command drops.
pub const GC_BATCH_MAX: u32 = 1_000;

pub async fn run(registry: Registry, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        for shard in registry.all() {
            if !shard.is_leader() {
                continue;
            }
            if let Err(e) = chores(&shard).await {
                tracing::debug!(shard = %shard.id, error = %e, "leader chores");
            }
        }
    }
}

async fn chores(shard: &Shard) -> Result<(), String> {
    if !shard.reader.has_key(keys::SM_META_INCARNATION) {
        let cmd = Command {
            kind: Some(command::Kind::Bootstrap(BootstrapCmd {
                incarnation: rand::random::<u64>() | 1,
                settings: Some(default_settings()),
            })),
        };
        shard.propose(vec![cmd]).await.map_err(|e| e.to_string())?;
    }
    let now = now_ms();
    if let Some(due) = shard.reader.earliest_expiry().map_err(|e| e.to_string())? {
        if due <= now {
            let cmd = Command {
                kind: Some(command::Kind::Expire(ExpireCmd {
                    up_to_ms: now,
                    max_items: EXPIRE_BATCH_MAX,
                })),
            };
            shard.propose(vec![cmd]).await.map_err(|e| e.to_string())?;
        }
    }
    let window = shard
        .reader
        .settings()
        .map_err(|e| e.to_string())?
        .dedup_window_ms;
    if let Some(oldest) = shard.reader.oldest_dedup().map_err(|e| e.to_string())? {
        let before = now.saturating_sub(window);
        if oldest < before {
            let cmd = Command {
                kind: Some(command::Kind::GcDedup(GcDedupCmd {
                    before_ms: before,
                    max_items: GC_BATCH_MAX,
                })),
            };
            shard.propose(vec![cmd]).await.map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
