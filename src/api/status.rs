//! Errors to gRPC status, in one place.

use tonic::{Code, Status};

use crate::shard;

/// Metadata keys that carry a leader hint with `UNAVAILABLE` answers.
pub const LEADER_ID_HEADER: &str = "x-chatstore-leader-id";
pub const LEADER_ADDR_HEADER: &str = "x-chatstore-leader-addr";
/// Set on the `UNAVAILABLE` answer of a replica that waited for an index it
/// has not applied yet (it is alive, only behind).
pub const BEHIND_HEADER: &str = "x-chatstore-behind";

pub fn from_shard_error(e: shard::Error) -> Status {
    match e {
        shard::Error::NotLeader { shard, leader } => {
            let mut status = Status::new(
                Code::Unavailable,
                format!("{shard}: this node is not the leader; retry at the leader"),
            );
            if let Some((id, node)) = leader {
                let md = status.metadata_mut();
                if let Ok(v) = id.0.to_string().parse() {
                    md.insert(LEADER_ID_HEADER, v);
                }
                if let Ok(v) = node.addr.parse() {
                    md.insert(LEADER_ADDR_HEADER, v);
                }
            }
            status
        }
        shard::Error::Unavailable { shard, reason } => Status::new(
            Code::Unavailable,
            format!("{shard} is unavailable ({reason}); safe to retry"),
        ),
        shard::Error::Overloaded { shard, reason } => Status::new(
            Code::ResourceExhausted,
            format!("{shard} is overloaded ({reason}); retry later"),
        ),
        shard::Error::InvalidArgument(m) => Status::new(Code::InvalidArgument, m),
        e @ shard::Error::Behind { .. } => {
            let mut status = Status::new(
                Code::Unavailable,
                format!("{e}; try another replica or the leader"),
            );
            status.metadata_mut().insert(
                BEHIND_HEADER,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            status
        }
    }
}

pub fn from_read_error(e: shard::reads::ReadError) -> Status {
    match e {
        shard::reads::ReadError::ChatClosed { chat, reason } => Status::new(
            Code::FailedPrecondition,
            format!("chat {chat} is closed: {reason}"),
        ),
        e @ shard::reads::ReadError::TooLarge { .. } => {
            Status::new(Code::OutOfRange, e.to_string())
        }
        shard::reads::ReadError::Io(e) => Status::new(Code::Internal, format!("read failed: {e}")),
    }
}

/// True if the status says "alive but behind" rather than failing.
pub fn is_behind(status: &Status) -> bool {
    status.metadata().get(BEHIND_HEADER).is_some()
}

/// The leader hint of an `UNAVAILABLE` status, if it carries one.
pub fn leader_hint(status: &Status) -> Option<(u64, String)> {
    let md = status.metadata();
    let id = md.get(LEADER_ID_HEADER)?.to_str().ok()?.parse().ok()?;
    let addr = md.get(LEADER_ADDR_HEADER)?.to_str().ok()?.to_string();
    Some((id, addr))
}
