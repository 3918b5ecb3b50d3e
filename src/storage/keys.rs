//! Key encodings. Integers are big-endian so that sled's byte order is numeric
//! order; every key starts with a one-byte kind tag.
//!
//! Log tree:
//! - `0x00 name`              metadata: vote, committed, purged
//! - `0x01 index`             one log entry
//!
//! State tree:
//! - `0x00 name`              metadata: applied log id, apply in progress, membership,
//!   settings, dedup and change collection progress
//! - `c chat`                 chat record (last seq, pts, closed)
//! - `m chat seq`             message
//! - `p chat pts`             change record (under apply rules 3 for every change
//!   but a new message, whose change readers infer); each chat's changes
//!   older than the replicated retention are dropped, oldest first, by a
//!   periodic pass
//! - `d chat sender cmid`     dedup record → seq and creation time; collected by a
//!   periodic pass over these keys, so a send writes no time index
//! - `d chat editor id e`     an edit's dedup record (apply rules 2), the same
//! - `r chat reader`          read cursor
//! - `t expire_at chat seq`   TTL index
//! - `a chat seq`             delete-after-read messages whose timer has not started

pub const LOG_META_VOTE: &[u8] = b"\x00vote";
pub const LOG_META_COMMITTED: &[u8] = b"\x00committed";
pub const LOG_META_PURGED: &[u8] = b"\x00purged";
pub const LOG_ENTRY_TAG: u8 = 0x01;

pub const SM_META_APPLIED: &[u8] = b"\x00applied";
/// Present while an apply call's effects are being written; see
/// `shard::state_machine`.
pub const SM_META_APPLYING: &[u8] = b"\x00applying";
pub const SM_META_MEMBERSHIP: &[u8] = b"\x00membership";
pub const SM_META_SETTINGS: &[u8] = b"\x00settings";
pub const SM_META_INCARNATION: &[u8] = b"\x00incarnation";
/// The last dedup key examined by a dedup collection pass in progress.
pub const SM_META_DEDUP_GC_CURSOR: &[u8] = b"\x00dedup-gc-cursor";
/// When the last complete dedup collection pass ended (big-endian ms).
pub const SM_META_DEDUP_GC_PASS_END: &[u8] = b"\x00dedup-gc-pass-end";
/// Where a change collection pass in progress goes on from.
pub const SM_META_CHANGE_GC_CURSOR: &[u8] = b"\x00change-gc-cursor";
/// When the last complete change collection pass ended (big-endian ms).
pub const SM_META_CHANGE_GC_PASS_END: &[u8] = b"\x00change-gc-pass-end";

pub const TAG_CHAT: u8 = b'c';
pub const TAG_MESSAGE: u8 = b'm';
pub const TAG_CHANGE: u8 = b'p';
pub const TAG_DEDUP: u8 = b'd';
pub const TAG_READ_CURSOR: u8 = b'r';
pub const TAG_TTL: u8 = b't';
pub const TAG_AFTER_READ: u8 = b'a';

fn key(tag: u8, parts: &[u64]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 8 * parts.len());
    k.push(tag);
    for p in parts {
        k.extend_from_slice(&p.to_be_bytes());
    }
    k
}

pub fn log_entry(index: u64) -> Vec<u8> {
    key(LOG_ENTRY_TAG, &[index])
}

pub fn chat(chat: u64) -> Vec<u8> {
    key(TAG_CHAT, &[chat])
}

pub fn message(chat: u64, seq: u64) -> Vec<u8> {
    key(TAG_MESSAGE, &[chat, seq])
}

pub fn change(chat: u64, pts: u64) -> Vec<u8> {
    key(TAG_CHANGE, &[chat, pts])
}

pub fn dedup(chat: u64, sender: u64, client_msg_id: u64) -> Vec<u8> {
    key(TAG_DEDUP, &[chat, sender, client_msg_id])
}

/// An edit's dedup record: among the sends' (collected by the same pass),
/// one byte longer so that the two never meet.
pub fn edit_dedup(chat: u64, editor: u64, edit_id: u64) -> Vec<u8> {
    let mut k = key(TAG_DEDUP, &[chat, editor, edit_id]);
    k.push(b'e');
    k
}

pub fn read_cursor(chat: u64, reader: u64) -> Vec<u8> {
    key(TAG_READ_CURSOR, &[chat, reader])
}

pub fn ttl(expire_at_ms: u64, chat: u64, seq: u64) -> Vec<u8> {
    key(TAG_TTL, &[expire_at_ms, chat, seq])
}

pub fn after_read(chat: u64, seq: u64) -> Vec<u8> {
    key(TAG_AFTER_READ, &[chat, seq])
}

/// The prefix shared by all keys of `tag` for one chat.
pub fn chat_prefix(tag: u8, chat: u64) -> Vec<u8> {
    key(tag, &[chat])
}

/// Reads big-endian u64 number `n` (0-based) after the tag byte.
pub fn part(key: &[u8], n: usize) -> Option<u64> {
    let start = 1 + 8 * n;
    let bytes: [u8; 8] = key.get(start..start + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Byte order of encoded keys is the numeric order of their parts.
        #[test]
        fn message_keys_sort_numerically(a in any::<(u64, u64)>(), b in any::<(u64, u64)>()) {
            let ka = message(a.0, a.1);
            let kb = message(b.0, b.1);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        }

        #[test]
        fn ttl_keys_sort_by_time_first(a in any::<(u64, u64, u64)>(), b in any::<(u64, u64, u64)>()) {
            prop_assert_eq!(ttl(a.0, a.1, a.2).cmp(&ttl(b.0, b.1, b.2)), a.cmp(&b));
        }

        #[test]
        fn parts_round_trip(c in any::<u64>(), s in any::<u64>()) {
            let k = message(c, s);
            prop_assert_eq!(part(&k, 0), Some(c));
            prop_assert_eq!(part(&k, 1), Some(s));
            prop_assert_eq!(part(&k, 2), None);
        }
    }

    #[test]
    fn log_meta_sorts_before_entries() {
        assert!(LOG_META_VOTE < log_entry(0).as_slice());
        assert!(log_entry(1) < log_entry(256));
    }
}
