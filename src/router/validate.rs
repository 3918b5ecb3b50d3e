//! Input checks at the front door: every public request is checked here
//! before it reaches a shard, with a message that says what was wrong. The
//! shard's apply checks again (deterministically), so a request that slips
//! past still changes nothing.

use tonic::Status;

use crate::api::pb::{self, self_destruct_policy};
use crate::shard::apply::SELF_DESTRUCT_SECS_MAX;

/// Largest message body (the default of the replicated shard setting).
pub const BODY_BYTES_MAX: usize = 64 * 1024;
/// Largest page a read may ask for.
pub const PAGE_MAX: u32 = 1000;
/// Page size when the request says 0.
pub const PAGE_DEFAULT: u32 = 50;
/// Most seqs one GetMessages may name.
pub const SEQS_MAX: usize = 1000;
/// Most cursors one GetDifference or Watch may carry.
pub const CURSORS_MAX: usize = 100;
/// Most sends in one `SendBatch`.
pub const SEND_BATCH_MAX: usize = 1_000;
/// Longest close reason.
pub const CLOSE_REASON_BYTES_MAX: usize = 1024;

fn nonzero(v: u64, name: &str) -> Result<(), Status> {
    if v == 0 {
        return Err(Status::invalid_argument(format!("{name} must be non-zero")));
    }
    Ok(())
}

fn body(b: &[u8]) -> Result<(), Status> {
    if b.len() > BODY_BYTES_MAX {
        return Err(Status::resource_exhausted(format!(
            "body is {} bytes; the limit is {BODY_BYTES_MAX}",
            b.len()
        )));
    }
    Ok(())
}

pub fn page_limit(limit: u32) -> Result<u32, Status> {
    match limit {
        0 => Ok(PAGE_DEFAULT),
        l if l > PAGE_MAX => Err(Status::invalid_argument(format!(
            "limit {l} is above the maximum {PAGE_MAX}"
        ))),
        l => Ok(l),
    }
}

pub fn send(r: &pb::SendRequest) -> Result<(), Status> {
    nonzero(r.chat_id, "chat_id")?;
    nonzero(r.sender_id, "sender_id")?;
    nonzero(r.client_msg_id, "client_msg_id")?;
    body(&r.body)?;
    if let Some(sd) = &r.self_destruct {
        let secs = match sd.policy {
            Some(self_destruct_policy::Policy::AfterSendSecs(s))
            | Some(self_destruct_policy::Policy::AfterReadSecs(s)) => s,
            None => {
                return Err(Status::invalid_argument(
                    "self_destruct is set but names no policy",
                ))
            }
        };
        if !(1..=SELF_DESTRUCT_SECS_MAX).contains(&secs) {
            return Err(Status::invalid_argument(format!(
                "self-destruct after {secs} s is out of range (1 s to 365 days)"
            )));
        }
    }
    Ok(())
}

pub fn edit(r: &pb::EditRequest) -> Result<(), Status> {
    nonzero(r.chat_id, "chat_id")?;
    nonzero(r.seq, "seq")?;
    nonzero(r.editor_id, "editor_id")?;
    body(&r.body)
}

pub fn delete(r: &pb::DeleteRequest) -> Result<(), Status> {
    nonzero(r.chat_id, "chat_id")?;
    nonzero(r.seq, "seq")?;
    nonzero(r.requester_id, "requester_id")
}

pub fn mark_read(r: &pb::MarkReadRequest) -> Result<(), Status> {
    nonzero(r.chat_id, "chat_id")?;
    nonzero(r.reader_id, "reader_id")?;
    nonzero(r.up_to_seq, "up_to_seq")
}

pub fn close(r: &pb::CloseChatRequest) -> Result<(), Status> {
    nonzero(r.chat_id, "chat_id")?;
    if r.reason.trim().is_empty() {
        return Err(Status::invalid_argument("a close reason is required"));
    }
    if r.reason.len() > CLOSE_REASON_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "close reason is {} bytes; the limit is {CLOSE_REASON_BYTES_MAX}",
            r.reason.len()
        )));
    }
    Ok(())
}

pub fn messages(r: &pb::GetMessagesRequest) -> Result<(), Status> {
    nonzero(r.chat_id, "chat_id")?;
    if r.seqs.is_empty() || r.seqs.len() > SEQS_MAX {
        return Err(Status::invalid_argument(format!(
            "seqs must name 1 to {SEQS_MAX} messages, not {}",
            r.seqs.len()
        )));
    }
    if r.seqs.contains(&0) {
        return Err(Status::invalid_argument(
            "seq 0 does not exist; seqs start at 1",
        ));
    }
    Ok(())
}

pub fn cursors(c: &[pb::Cursor]) -> Result<(), Status> {
    if c.is_empty() || c.len() > CURSORS_MAX {
        return Err(Status::invalid_argument(format!(
            "1 to {CURSORS_MAX} cursors are allowed, not {}",
            c.len()
        )));
    }
    for cur in c {
        nonzero(cur.chat_id, "cursor chat_id")?;
    }
    let mut chats: Vec<u64> = c.iter().map(|x| x.chat_id).collect();
    chats.sort_unstable();
    chats.dedup();
    if chats.len() != c.len() {
        return Err(Status::invalid_argument("a chat appears in two cursors"));
    }
    Ok(())
}

pub fn consistency(v: i32) -> Result<pb::Consistency, Status> {
    pb::Consistency::try_from(v)
        .map_err(|_| Status::invalid_argument(format!("unknown consistency {v}")))
}
