//! Identifiers used across the crate. Newtypes keep a chat id from being passed
//! where a shard id is expected.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// A chat, group or channel. Never zero.
    ChatId,
    "chat-"
);
id_type!(
    /// A shard: one Raft group.
    ShardId,
    "shard-"
);
id_type!(
    /// A node: one chatstore process on one host.
    NodeId,
    "node-"
);

/// Shift of this process's wall clock, in ms (fault injection only).
static CLOCK_SKEW_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Shifts [`now_ms`] of this whole process by `ms`: the node's
/// `--clock-skew-ms`, which tests use to give one node a wrong clock.
pub fn set_clock_skew_ms(ms: i64) {
    CLOCK_SKEW_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    now.saturating_add_signed(CLOCK_SKEW_MS.load(std::sync::atomic::Ordering::Relaxed))
}
