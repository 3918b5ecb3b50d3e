//! Leader-side chores, run once a second over the shards this node leads:
//! - a new shard's first leader proposes its bootstrap command (incarnation
//!   and replicated settings).

use std::time::Duration;

use tokio::sync::watch;

use crate::api::pb::replicated::{command, BootstrapCmd, Command};
use crate::node::Registry;
use crate::shard::apply::default_settings;
use crate::storage::keys;

const TICK: Duration = Duration::from_secs(1);

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
            if shard.reader.has_key(keys::SM_META_INCARNATION) {
                continue;
            }
            let cmd = Command {
                kind: Some(command::Kind::Bootstrap(BootstrapCmd {
                    incarnation: rand::random::<u64>() | 1,
                    settings: Some(default_settings()),
                })),
            };
            if let Err(e) = shard.propose(vec![cmd]).await {
                tracing::debug!(shard = %shard.id, error = %e, "propose bootstrap");
            }
        }
    }
}
