//! Deterministic application of commands to a shard's state tree.
//!
//! Every replica applies the same entries in the same order and must end with
//! byte-identical state, up to the sealing of self-destructing bodies, which
//! each node does with its own keys below apply (DESIGN section 2). So apply:
//! - reads time only from the batch (`now_ms`, stamped by the leader);
//! - decides every rejection here, from replicated state and replicated
//!   settings only, and moves `pts` once per effect, never on a rejection or a
//!   dedup hit;
//! - iterates only ordered maps.
//!
//! Effects of a whole `apply` call go to an [`Overlay`], then to the
//! replica's memtable, and from there into sled between an "applying" marker
//! and the applied log id (see `shard::memtable` and `shard::state_machine`):
//! a crash part-way leaves the marker ahead of the applied id, and the next
//! open rebuilds the tree, so it is never left between two effects of one
//! entry.
//!
//! What apply does is versioned ([`APPLY_RULES`]): replicas of a shard must
//! apply each entry under the same rules, and during a rolling upgrade some
//! of them run an older binary. A shard changes rules at one log index, by a
//! `RaiseApplyRules` command that its leader proposes once every member's
//! node says (in its pings) that it knows the new rules.

use std::collections::BTreeMap;
use std::io;

use prost::Message;

use crate::api::codec::decode;
use crate::api::pb::replicated::{
    self as rp, command, command_result, self_destruct, ChangeKind, ChangeRecord, ChatRecord,
    CommandBatch, CommandError, CommandResult, DedupRecord, ErrorCode, MessageRecord,
    ShardSettings,
};
use crate::shard::chat_cache::MessageWrite;
use crate::shard::memtable::{Pending, PendingWrite, View};
use crate::shard::sealing;
use crate::storage::{keys, KeyRing};

/// The newest apply rules this binary knows:
/// - 0: the rules of shards created before rule versions;
/// - 1: an edit to the body a message already has and a delete of a message
///   its sender deleted change nothing and succeed (so a retry makes no
///   second change), and old change records are collected (`GcChanges`).
/// - 2: a MarkRead starts at most [`MARK_READ_SCAN_MAX`] pending
///   delete-after-read timers, within the entry's
///   [`MARK_READ_ENTRY_BYTES_MAX`], and moves the reader's cursor only as far
///   as it got, saying `more` (under rules 0 and 1 the cursor moved to
///   `up_to_seq` and the timers past the cap never started); a
///   delete-after-send timer runs from the entry's time, not from the
///   chat's creation time, which a leader whose clock ran ahead left ahead;
///   an edit with an id is applied once (see `EditCmd.edit_id`).
/// - 3: a new message that will not self-destruct writes no change record
///   (its pts is implied: see `ChangeRecord.last_seq`, which every change
///   record then carries), and
///   change collection moves the chat's `changes_from_pts` past what it
///   drops. A send then writes one sled key fewer.
pub const APPLY_RULES: u32 = 3;

/// Settings a shard uses until its bootstrap command sets them. Entries
/// before the bootstrap apply under rules 0, as they did on binaries from
/// before rule versions; the bootstrap names the rules a new shard starts
/// with.
pub fn default_settings() -> ShardSettings {
    ShardSettings {
        body_bytes_max: crate::router::validate::BODY_BYTES_MAX as u32,
        dedup_window_ms: 24 * 3600 * 1000,
        change_retention_ms: 7 * 24 * 3600 * 1000,
        apply_rules: 0,
    }
}

/// Limit on self-destruct timers: 1 s to 365 days.
pub const SELF_DESTRUCT_SECS_MAX: u32 = 365 * 24 * 3600;
/// Under rules 0 and 1: most messages one MarkRead starts delete-after-read
/// timers for (the cursor moved past the rest).
pub const MARK_READ_TIMERS_MAX: usize = 10_000;
/// Under rules 2: most pending delete-after-read keys one MarkRead looks at.
pub const MARK_READ_SCAN_MAX: usize = 1_000;
/// Under rules 2: most bytes of message bodies the MarkReads of one log
/// entry rewrite to start their timers (at least one message each entry),
/// so that an apply call holds a bounded amount of them.
pub const MARK_READ_ENTRY_BYTES_MAX: usize = 256 * 1024;
/// Most items one Expire or GC command may touch.
pub const EXPIRE_ITEMS_MAX: u32 = 10_000;
/// Changes a collection step reads at a time: it goes on to the next chat
/// at the first change it keeps, so reading far ahead would be wasted.
const GC_CHANGES_CHUNK: usize = 16;
/// Longest close reason kept.
pub const CLOSE_REASON_BYTES_MAX: usize = 1024;

/// Writes buffered over the replica's state (its memtable and sled), so
/// commands see the effects of earlier commands in the same apply call.
///
/// With a key ring, message records are opened when read from sled and
/// self-destructing bodies marked to be sealed when flushed, so apply only
/// ever sees bodies in the clear. [`Overlay::scan`] is used on index keys
/// only and returns stored bytes as they are.
pub struct Overlay<'a> {
    base: &'a View,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    keys: Option<&'a KeyRing>,
}

impl<'a> Overlay<'a> {
    /// An overlay that stores bodies as they are (tests of apply logic).
    pub fn new(base: &'a View) -> Overlay<'a> {
        Overlay {
            base,
            writes: BTreeMap::new(),
            keys: None,
        }
    }

    /// An overlay that opens sealed bodies with `keys` and has
    /// self-destructing bodies sealed when they are flushed.
    pub fn sealed(base: &'a View, keys: &'a KeyRing) -> Overlay<'a> {
        Overlay {
            base,
            writes: BTreeMap::new(),
            keys: Some(keys),
        }
    }

    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        if let Some(v) = self.writes.get(key) {
            return Ok(v.clone());
        }
        // The eraser re-seals a record with the current key before it
        // destroys the key it had: a record read just before the re-seal
        // and opened just after the destruction is read once more.
        let mut reread = false;
        loop {
            let Some(v) = self.base.get(key).map_err(io::Error::other)? else {
                return Ok(None);
            };
            let (Some(ring), Some(&keys::TAG_MESSAGE)) = (self.keys, key.first()) else {
                return Ok(Some(v.to_vec()));
            };
            match sealing::plain_message_bytes(ring, &v, None) {
                Ok(Some(plain)) => return Ok(Some(plain)),
                Ok(None) => return Ok(Some(v.to_vec())),
                Err(e) if e.kind() == io::ErrorKind::NotFound && !reread => reread = true,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    /// Up to `limit` live pairs with `start <= key < end`, ascending: sled's
    /// pairs merged with the buffered writes, which win.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut base = self.base.range(start.to_vec()..end.to_vec()).peekable();
        let mut over = self.writes.range(start.to_vec()..end.to_vec()).peekable();
        while out.len() < limit {
            let next_base = match base.peek() {
                Some(Ok((k, _))) => Some(k.to_vec()),
                Some(Err(_)) => {
                    let err = base.next().expect("peeked").expect_err("peeked an error");
                    return Err(io::Error::other(err));
                }
                None => None,
            };
            let next_over = over.peek().map(|(k, _)| (*k).clone());
            match (next_base, next_over) {
                (None, None) => break,
                (Some(b), Some(o)) if o <= b => {
                    if o == b {
                        base.next();
                    }
                    let (k, v) = over.next().expect("peeked");
                    if let Some(v) = v {
                        out.push((k.clone(), v.clone()));
                    }
                }
                (Some(_), _) => {
                    let (k, v) = base.next().expect("peeked").map_err(io::Error::other)?;
                    out.push((k.to_vec(), v.to_vec()));
                }
                (None, Some(_)) => {
                    let (k, v) = over.next().expect("peeked");
                    if let Some(v) = v {
                        out.push((k.clone(), v.clone()));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The buffered writes in key order (None = remove), self-destructing
    /// bodies marked to be sealed; and each message record written or
    /// removed, body in the clear (for the chat cache).
    pub fn into_writes(self) -> io::Result<(Vec<PendingWrite>, Vec<MessageWrite>)> {
        let mut out = Vec::with_capacity(self.writes.len());
        let mut messages = Vec::new();
        let plain = |v: Vec<u8>| Pending {
            value: v.into(),
            seal: false,
        };
        for (k, v) in self.writes {
            if k.first() != Some(&keys::TAG_MESSAGE) {
                out.push((k, v.map(plain)));
                continue;
            }
            let (Some(chat), Some(seq)) = (keys::part(&k, 0), keys::part(&k, 1)) else {
                return Err(io::Error::other("bad message key"));
            };
            let Some(v) = v else {
                messages.push((chat, seq, None));
                out.push((k, None));
                continue;
            };
            let m: MessageRecord = decode(&v, "message")?;
            let seal = self.keys.is_some() && sealing::needs_seal(&m);
            messages.push((chat, seq, Some(m)));
            out.push((
                k,
                Some(Pending {
                    value: v.into(),
                    seal,
                }),
            ));
        }
        Ok((out, messages))
    }
}

/// Refuses apply rules newer than this binary's. Going on under older rules
/// would let this replica drift from the others; stopping the apply call
/// keeps it as it was until it is upgraded.
fn known_rules(rules: u32) -> io::Result<()> {
    if rules > APPLY_RULES {
        return Err(io::Error::other(format!(
            "the shard moved to apply rules {rules}; this binary knows up to {APPLY_RULES}"
        )));
    }
    Ok(())
}

fn reject(code: ErrorCode, message: impl Into<String>) -> CommandResult {
    CommandResult {
        outcome: Some(command_result::Outcome::Error(CommandError {
            code: code as i32,
            message: message.into(),
        })),
    }
}

fn changed(pts: u64) -> CommandResult {
    CommandResult {
        outcome: Some(command_result::Outcome::Change(rp::ChangeResult {
            pts,
            more: false,
        })),
    }
}

/// Applies commands for one shard. Holds the replicated settings.
pub struct Applier<'o, 'a> {
    pub kv: &'o mut Overlay<'a>,
    pub settings: ShardSettings,
    /// The chat records written, last value of each (for the chat cache).
    pub chats: BTreeMap<u64, ChatRecord>,
    /// Bytes of messages the current entry's MarkReads may still rewrite.
    mark_read_bytes_left: usize,
}

impl<'o, 'a> Applier<'o, 'a> {
    pub fn new(kv: &'o mut Overlay<'a>, settings: ShardSettings) -> Applier<'o, 'a> {
        Applier {
            kv,
            settings,
            chats: BTreeMap::new(),
            mark_read_bytes_left: MARK_READ_ENTRY_BYTES_MAX,
        }
    }

    fn get_rec<T: Message + Default>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> io::Result<Option<T>> {
        match self.kv.get(key)? {
            Some(v) => Ok(Some(decode::<T>(&v, what)?)),
            None => Ok(None),
        }
    }

    fn chat(&self, chat: u64) -> io::Result<ChatRecord> {
        Ok(self
            .get_rec(&keys::chat(chat), "chat record")?
            .unwrap_or_default())
    }

    fn put_chat(&mut self, chat: u64, rec: &ChatRecord) {
        let mut rec = rec.clone();
        if self.settings.apply_rules >= 3 {
            // Says to readers that the pts after the chat's last change
            // record may be new messages without records of their own.
            rec.changes_from_pts = rec.changes_from_pts.max(1);
        }
        self.kv.put(keys::chat(chat), rec.encode_to_vec());
        self.chats.insert(chat, rec);
    }

    /// Bumps the chat's pts and records what changed.
    fn record_change(
        &mut self,
        chat_id: u64,
        chat: &mut ChatRecord,
        kind: ChangeKind,
        seq: u64,
        user: u64,
        now: u64,
    ) -> u64 {
        let rec = ChangeRecord {
            kind: kind as i32,
            seq,
            user_id: user,
            at_ms: now,
            ..Default::default()
        };
        self.put_change(chat_id, chat, rec, false)
    }

    /// Bumps the chat's pts and writes `rec` at it, except under rules 3
    /// for a new message whose change readers infer (`implied`): from the
    /// next record's `last_seq` (or the chat record), and its sender from
    /// the message. A message that expiry will remove has its record.
    fn put_change(
        &mut self,
        chat_id: u64,
        chat: &mut ChatRecord,
        mut rec: ChangeRecord,
        implied: bool,
    ) -> u64 {
        chat.last_pts += 1;
        rec.pts = chat.last_pts;
        if self.settings.apply_rules >= 3 {
            if implied {
                return chat.last_pts;
            }
            // The seq of the last message sent before this change (a new
            // message is the chat's last seq by now).
            let new = rec.kind == ChangeKind::New as i32;
            rec.last_seq = Some(chat.last_seq - u64::from(new));
        }
        self.kv
            .put(keys::change(chat_id, chat.last_pts), rec.encode_to_vec());
        chat.last_pts
    }

    pub fn apply_batch(&mut self, batch: &CommandBatch) -> io::Result<Vec<CommandResult>> {
        let mut results = Vec::with_capacity(batch.commands.len());
        self.mark_read_bytes_left = MARK_READ_ENTRY_BYTES_MAX;
        for cmd in &batch.commands {
            results.push(self.apply_one(cmd, batch.now_ms)?);
        }
        Ok(results)
    }

    fn apply_one(&mut self, cmd: &rp::Command, now: u64) -> io::Result<CommandResult> {
        let Some(kind) = &cmd.kind else {
            return Ok(reject(ErrorCode::InvalidArgument, "empty command"));
        };
        match kind {
            command::Kind::Send(c) => self.send(c, now),
            command::Kind::Edit(c) => self.edit(c, now),
            command::Kind::Delete(c) => self.delete(c, now),
            command::Kind::MarkRead(c) => self.mark_read(c, now),
            command::Kind::Expire(c) => self.expire(c, now),
            command::Kind::CloseChat(c) => self.close(c, now),
            command::Kind::ReopenChat(c) => self.reopen(c, now),
            command::Kind::GcDedup(c) => self.gc_dedup(c, now),
            command::Kind::GcChanges(c) => self.gc_changes(c, now),
            command::Kind::RaiseApplyRules(c) => self.raise_apply_rules(c),
            command::Kind::Bootstrap(c) => self.bootstrap(c),
        }
    }

    fn send(&mut self, c: &rp::SendCmd, now: u64) -> io::Result<CommandResult> {
        if c.chat_id == 0 || c.sender_id == 0 || c.client_msg_id == 0 {
            return Ok(reject(
                ErrorCode::InvalidArgument,
                "chat_id, sender_id and client_msg_id must be non-zero",
            ));
        }
        if c.body.len() > self.settings.body_bytes_max as usize {
            return Ok(reject(
                ErrorCode::ResourceExhausted,
                format!(
                    "body is {} bytes; the limit is {}",
                    c.body.len(),
                    self.settings.body_bytes_max
                ),
            ));
        }
        if let Some(sd) = &c.self_destruct {
            match sd.policy {
                Some(self_destruct::Policy::AfterSendSecs(s))
                | Some(self_destruct::Policy::AfterReadSecs(s))
                    if !(1..=SELF_DESTRUCT_SECS_MAX).contains(&s) =>
                {
                    return Ok(reject(
                        ErrorCode::InvalidArgument,
                        format!("self-destruct after {s} s is out of range (1 s to 365 days)"),
                    ));
                }
                _ => {}
            }
        }
        let dedup_key = keys::dedup(c.chat_id, c.sender_id, c.client_msg_id);
        if let Some(d) = self.get_rec::<DedupRecord>(&dedup_key, "dedup record")? {
            metrics::counter!(crate::metrics::DEDUP_HITS).increment(1);
            return Ok(CommandResult {
                outcome: Some(command_result::Outcome::Send(rp::SendResult {
                    seq: d.seq,
                    pts: d.pts,
                    created_at_ms: d.created_at_ms,
                    duplicate: true,
                })),
            });
        }
        let mut chat = self.chat(c.chat_id)?;
        if chat.closed {
            return Ok(reject(
                ErrorCode::FailedPrecondition,
                format!("chat {} is closed: {}", c.chat_id, chat.close_reason),
            ));
        }
        let seq = chat.last_seq + 1;
        let created = now.max(chat.last_created_at_ms);
        chat.last_seq = seq;
        chat.last_created_at_ms = created;
        let rec = ChangeRecord {
            kind: ChangeKind::New as i32,
            seq,
            user_id: c.sender_id,
            at_ms: created,
            ..Default::default()
        };
        // Expiry removes a self-destructing message, and its sender with it.
        let implied = c.self_destruct.and_then(|s| s.policy).is_none();
        let pts = self.put_change(c.chat_id, &mut chat, rec, implied);
        let mut expire_at = 0;
        // A chat's creation times never go back, so after a leader whose
        // clock ran ahead they stay ahead until real time catches up; under
        // rules 2 a timer runs from the entry's own time instead.
        let timer_start = match self.settings.apply_rules >= 2 {
            true => now,
            false => created,
        };
        match c.self_destruct.as_ref().and_then(|s| s.policy) {
            Some(self_destruct::Policy::AfterSendSecs(s)) => {
                expire_at = timer_start + s as u64 * 1000;
                self.kv
                    .put(keys::ttl(expire_at, c.chat_id, seq), Vec::new());
            }
            Some(self_destruct::Policy::AfterReadSecs(_)) => {
                self.kv.put(keys::after_read(c.chat_id, seq), Vec::new());
            }
            None => {}
        }
        let msg = MessageRecord {
            chat_id: c.chat_id,
            seq,
            sender_id: c.sender_id,
            client_msg_id: c.client_msg_id,
            body: c.body.clone(),
            created_at_ms: created,
            edited_at_ms: 0,
            deleted: false,
            self_destruct: c.self_destruct,
            expire_at_ms: expire_at,
            pts,
            sealed_body: None,
        };
        self.kv
            .put(keys::message(c.chat_id, seq), msg.encode_to_vec());
        let dedup = DedupRecord {
            seq,
            created_at_ms: created,
            pts,
        };
        self.kv.put(dedup_key, dedup.encode_to_vec());
        self.put_chat(c.chat_id, &chat);
        Ok(CommandResult {
            outcome: Some(command_result::Outcome::Send(rp::SendResult {
                seq,
                pts,
                created_at_ms: created,
                duplicate: false,
            })),
        })
    }

    /// Loads a live message for a change by `user`, or the rejection.
    fn live_message(
        &self,
        chat: &ChatRecord,
        chat_id: u64,
        seq: u64,
        now: u64,
    ) -> io::Result<Result<MessageRecord, CommandResult>> {
        if chat.closed {
            return Ok(Err(reject(
                ErrorCode::FailedPrecondition,
                format!("chat {chat_id} is closed: {}", chat.close_reason),
            )));
        }
        let Some(msg) = self.get_rec::<MessageRecord>(&keys::message(chat_id, seq), "message")?
        else {
            return Ok(Err(reject(
                ErrorCode::NotFound,
                format!("chat {chat_id} has no message {seq}"),
            )));
        };
        if msg.deleted || (msg.expire_at_ms != 0 && msg.expire_at_ms <= now) {
            return Ok(Err(reject(
                ErrorCode::NotFound,
                format!("message {seq} of chat {chat_id} is deleted"),
            )));
        }
        Ok(Ok(msg))
    }

    fn edit(&mut self, c: &rp::EditCmd, now: u64) -> io::Result<CommandResult> {
        if c.chat_id == 0 || c.seq == 0 || c.editor_id == 0 {
            return Ok(reject(
                ErrorCode::InvalidArgument,
                "chat_id, seq and editor_id must be non-zero",
            ));
        }
        if c.body.len() > self.settings.body_bytes_max as usize {
            return Ok(reject(
                ErrorCode::ResourceExhausted,
                format!(
                    "body is {} bytes; the limit is {}",
                    c.body.len(),
                    self.settings.body_bytes_max
                ),
            ));
        }
        // Under rules 2 an edit with an id is applied once: sent again
        // after its answer was lost, it succeeds with the pts it made, also
        // after later edits (whose bodies it would otherwise undo).
        let edit_key = (self.settings.apply_rules >= 2 && c.edit_id != 0)
            .then(|| keys::edit_dedup(c.chat_id, c.editor_id, c.edit_id));
        if let Some(key) = &edit_key {
            if let Some(d) = self.get_rec::<DedupRecord>(key, "edit dedup record")? {
                if d.seq != c.seq {
                    return Ok(reject(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "edit id {} of user {} was used for message {}; an edit id names one edit",
                            c.edit_id, c.editor_id, d.seq
                        ),
                    ));
                }
                metrics::counter!(crate::metrics::DEDUP_HITS).increment(1);
                return Ok(changed(d.pts));
            }
        }
        let mut chat = self.chat(c.chat_id)?;
        let mut msg = match self.live_message(&chat, c.chat_id, c.seq, now)? {
            Ok(m) => m,
            Err(rejection) => return Ok(rejection),
        };
        if msg.sender_id != c.editor_id {
            return Ok(reject(
                ErrorCode::FailedPrecondition,
                format!(
                    "user {} did not send message {} and cannot edit it",
                    c.editor_id, c.seq
                ),
            ));
        }
        // The body is already this one: a retried edit (its first try may
        // have applied before its reply was lost) or an edit that changes
        // nothing. Either way it succeeds with the current version's pts
        // and changes nothing, so a retry never makes a second change.
        if self.settings.apply_rules >= 1 && msg.body == c.body {
            // Its id is remembered all the same: sent again after a later
            // edit, it must not undo that one.
            if let Some(key) = edit_key {
                self.put_edit_record(key, c.seq, msg.pts, now);
            }
            return Ok(changed(msg.pts));
        }
        let at = now.max(msg.created_at_ms);
        let pts = self.record_change(
            c.chat_id,
            &mut chat,
            ChangeKind::Edit,
            c.seq,
            c.editor_id,
            at,
        );
        msg.body = c.body.clone();
        msg.edited_at_ms = at;
        msg.pts = pts;
        self.kv
            .put(keys::message(c.chat_id, c.seq), msg.encode_to_vec());
        self.put_chat(c.chat_id, &chat);
        if let Some(key) = edit_key {
            self.put_edit_record(key, c.seq, pts, now);
        }
        Ok(changed(pts))
    }

    /// Remembers that the edit with dedup key `key` was applied to message
    /// `seq` at `pts` (see `EditCmd.edit_id`).
    fn put_edit_record(&mut self, key: Vec<u8>, seq: u64, pts: u64, now: u64) {
        let record = DedupRecord {
            seq,
            created_at_ms: now,
            pts,
        };
        self.kv.put(key, record.encode_to_vec());
    }

    fn delete(&mut self, c: &rp::DeleteCmd, now: u64) -> io::Result<CommandResult> {
        if c.chat_id == 0 || c.seq == 0 || c.requester_id == 0 {
            return Ok(reject(
                ErrorCode::InvalidArgument,
                "chat_id, seq and requester_id must be non-zero",
            ));
        }
        let mut chat = self.chat(c.chat_id)?;
        let mut msg = match self.live_message(&chat, c.chat_id, c.seq, now)? {
            Ok(m) => m,
            Err(rejection) => {
                // Deleted already by its sender: a retried delete (its first
                // try may have applied before its reply was lost) succeeds
                // with the deletion's pts and changes nothing, also once the
                // chat is closed (only the answer differs from a refusal).
                if self.settings.apply_rules >= 1 {
                    let key = keys::message(c.chat_id, c.seq);
                    if let Some(m) = self.get_rec::<MessageRecord>(&key, "message")? {
                        if m.deleted && m.sender_id == c.requester_id {
                            return Ok(changed(m.pts));
                        }
                    }
                }
                return Ok(rejection);
            }
        };
        if msg.sender_id != c.requester_id {
            return Ok(reject(
                ErrorCode::FailedPrecondition,
                format!(
                    "user {} did not send message {} and cannot delete it",
                    c.requester_id, c.seq
                ),
            ));
        }
        let pts = self.record_change(
            c.chat_id,
            &mut chat,
            ChangeKind::Delete,
            c.seq,
            c.requester_id,
            now,
        );
        if msg.expire_at_ms != 0 {
            self.kv
                .delete(keys::ttl(msg.expire_at_ms, c.chat_id, c.seq));
        }
        self.kv.delete(keys::after_read(c.chat_id, c.seq));
        // Delete for everyone: the body is gone, a tombstone keeps the seq.
        msg.deleted = true;
        msg.body = Default::default();
        msg.expire_at_ms = 0;
        msg.pts = pts;
        self.kv
            .put(keys::message(c.chat_id, c.seq), msg.encode_to_vec());
        self.put_chat(c.chat_id, &chat);
        Ok(changed(pts))
    }

    fn mark_read(&mut self, c: &rp::MarkReadCmd, now: u64) -> io::Result<CommandResult> {
        if c.chat_id == 0 || c.reader_id == 0 || c.up_to_seq == 0 {
            return Ok(reject(
                ErrorCode::InvalidArgument,
                "chat_id, reader_id and up_to_seq must be non-zero",
            ));
        }
        let mut chat = self.chat(c.chat_id)?;
        let cursor_key = keys::read_cursor(c.chat_id, c.reader_id);
        let old = match self.kv.get(&cursor_key)? {
            Some(v) => u64::from_be_bytes(v.as_slice().try_into().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "read cursor is not 8 bytes")
            })?),
            None => 0,
        };
        // Read that far already (a retry whose first try applied): nothing
        // to do, also once the chat is closed; it changes nothing either way.
        if c.up_to_seq <= old {
            return Ok(changed(chat.last_pts));
        }
        if chat.closed {
            return Ok(reject(
                ErrorCode::FailedPrecondition,
                format!("chat {} is closed: {}", c.chat_id, chat.close_reason),
            ));
        }
        if c.up_to_seq > chat.last_seq {
            return Ok(reject(
                ErrorCode::InvalidArgument,
                format!(
                    "up_to_seq {} is beyond the chat's last seq {}",
                    c.up_to_seq, chat.last_seq
                ),
            ));
        }
        let bounded = self.settings.apply_rules >= 2;
        // Start delete-after-read timers of messages others sent.
        let pending = self.kv.scan(
            &keys::after_read(c.chat_id, old + 1),
            &keys::after_read(c.chat_id, c.up_to_seq + 1),
            match bounded {
                true => MARK_READ_SCAN_MAX,
                false => MARK_READ_TIMERS_MAX,
            },
        )?;
        // How far the cursor may move: past every key looked at, and under
        // rules 2 no further (more may wait beyond the last one).
        let mut through = c.up_to_seq;
        if bounded && pending.len() == MARK_READ_SCAN_MAX {
            if let Some(seq) = pending.last().and_then(|(k, _)| keys::part(k, 1)) {
                through = seq;
            }
        }
        for (key, _) in pending {
            let seq = keys::part(&key, 1)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad after-read key"))?;
            if bounded && self.mark_read_bytes_left == 0 {
                // The entry's budget is spent: this message and the rest
                // wait for the next MarkRead.
                through = seq - 1;
                break;
            }
            let Some(mut msg) =
                self.get_rec::<MessageRecord>(&keys::message(c.chat_id, seq), "message")?
            else {
                self.kv.delete(key);
                continue;
            };
            if msg.sender_id == c.reader_id {
                continue;
            }
            let secs = match msg.self_destruct.and_then(|s| s.policy) {
                Some(self_destruct::Policy::AfterReadSecs(s)) => s as u64,
                _ => {
                    self.kv.delete(key);
                    continue;
                }
            };
            msg.expire_at_ms = now + secs * 1000;
            self.kv
                .put(keys::ttl(msg.expire_at_ms, c.chat_id, seq), Vec::new());
            // Counted by body, which every binary reads alike (an encoded
            // record's length would change with its schema).
            self.mark_read_bytes_left = self.mark_read_bytes_left.saturating_sub(msg.body.len());
            self.kv
                .put(keys::message(c.chat_id, seq), msg.encode_to_vec());
            self.kv.delete(key);
        }
        let more = through < c.up_to_seq;
        if through <= old {
            // Nothing read yet: the cursor stays, and so does the chat.
            return Ok(CommandResult {
                outcome: Some(command_result::Outcome::Change(rp::ChangeResult {
                    pts: chat.last_pts,
                    more,
                })),
            });
        }
        self.kv.put(cursor_key, through.to_be_bytes().to_vec());
        let pts = self.record_change(
            c.chat_id,
            &mut chat,
            ChangeKind::Read,
            through,
            c.reader_id,
            now,
        );
        self.put_chat(c.chat_id, &chat);
        Ok(CommandResult {
            outcome: Some(command_result::Outcome::Change(rp::ChangeResult {
                pts,
                more,
            })),
        })
    }

    fn expire(&mut self, c: &rp::ExpireCmd, now: u64) -> io::Result<CommandResult> {
        let max = c.max_items.min(EXPIRE_ITEMS_MAX) as usize;
        let due = self.kv.scan(
            &keys::ttl(0, 0, 0),
            &keys::ttl(c.up_to_ms.saturating_add(1), 0, 0),
            max,
        )?;
        let mut expired = 0u32;
        for (key, _) in due {
            let (Some(chat_id), Some(seq)) = (keys::part(&key, 1), keys::part(&key, 2)) else {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "bad TTL key"));
            };
            self.kv.delete(key);
            if self.kv.get(&keys::message(chat_id, seq))?.is_none() {
                continue;
            }
            // Gone: the record itself is removed, not tombstoned.
            self.kv.delete(keys::message(chat_id, seq));
            let mut chat = self.chat(chat_id)?;
            self.record_change(chat_id, &mut chat, ChangeKind::Expire, seq, 0, now);
            self.put_chat(chat_id, &chat);
            expired += 1;
        }
        metrics::counter!(crate::metrics::TTL_EXPIRED).increment(expired as u64);
        Ok(CommandResult {
            outcome: Some(command_result::Outcome::Expire(rp::ExpireResult {
                expired,
            })),
        })
    }

    fn close(&mut self, c: &rp::CloseChatCmd, now: u64) -> io::Result<CommandResult> {
        if c.chat_id == 0 {
            return Ok(reject(
                ErrorCode::InvalidArgument,
                "chat_id must be non-zero",
            ));
        }
        if c.reason.len() > CLOSE_REASON_BYTES_MAX {
            return Ok(reject(
                ErrorCode::InvalidArgument,
                format!(
                    "close reason is {} bytes; the limit is {CLOSE_REASON_BYTES_MAX}",
                    c.reason.len()
                ),
            ));
        }
        let mut chat = self.chat(c.chat_id)?;
        if chat.closed && chat.close_reason == c.reason {
            return Ok(changed(chat.last_pts));
        }
        chat.closed = true;
        chat.close_reason = c.reason.clone();
        // The reason goes into the chat's change log too, so every device
        // learns why.
        let rec = ChangeRecord {
            kind: ChangeKind::Close as i32,
            at_ms: now,
            reason: c.reason.clone(),
            ..Default::default()
        };
        let pts = self.put_change(c.chat_id, &mut chat, rec, false);
        self.put_chat(c.chat_id, &chat);
        Ok(changed(pts))
    }

    fn reopen(&mut self, c: &rp::ReopenChatCmd, now: u64) -> io::Result<CommandResult> {
        if c.chat_id == 0 {
            return Ok(reject(
                ErrorCode::InvalidArgument,
                "chat_id must be non-zero",
            ));
        }
        let mut chat = self.chat(c.chat_id)?;
        if !chat.closed {
            return Ok(changed(chat.last_pts));
        }
        chat.closed = false;
        chat.close_reason.clear();
        let pts = self.record_change(c.chat_id, &mut chat, ChangeKind::Reopen, 0, 0, now);
        self.put_chat(c.chat_id, &chat);
        Ok(changed(pts))
    }

    /// One step of a dedup collection pass (see `GcDedupCmd`). A pass reads
    /// every dedup record once; passes run once per dedup window, so a record
    /// lives between one and about two windows.
    fn gc_dedup(&mut self, c: &rp::GcDedupCmd, now: u64) -> io::Result<CommandResult> {
        let max = (c.max_items.min(EXPIRE_ITEMS_MAX) as usize).max(1);
        let start = match self.kv.get(keys::SM_META_DEDUP_GC_CURSOR)? {
            // The smallest key after the cursor.
            Some(mut last) => {
                last.push(0);
                last
            }
            None => vec![keys::TAG_DEDUP],
        };
        let examined = self.kv.scan(&start, &[keys::TAG_DEDUP + 1], max)?;
        let mut dropped = 0u32;
        for (key, value) in &examined {
            let rec: DedupRecord = decode(value, "dedup record")?;
            if rec.created_at_ms < c.before_ms {
                self.kv.delete(key.clone());
                dropped += 1;
            }
        }
        match examined.last() {
            Some((last, _)) if examined.len() == max => {
                self.kv
                    .put(keys::SM_META_DEDUP_GC_CURSOR.to_vec(), last.clone());
            }
            _ => {
                self.kv.delete(keys::SM_META_DEDUP_GC_CURSOR.to_vec());
                self.kv.put(
                    keys::SM_META_DEDUP_GC_PASS_END.to_vec(),
                    now.to_be_bytes().to_vec(),
                );
            }
        }
        Ok(CommandResult {
            outcome: Some(command_result::Outcome::Expire(rp::ExpireResult {
                expired: dropped,
            })),
        })
    }

    /// One step of a change collection pass (see `GcChangesCmd`). Each chat
    /// loses a prefix of its change records. Under older rules it keeps at
    /// least its newest, so a cursor older than what a chat keeps shows as a
    /// gap at the start of its difference (which asks the device to reset),
    /// never as a hole in the middle. Under rules 3, where a gap may be new
    /// messages and the newest change may have no record, the chat record's
    /// `changes_from_pts` moves past every record dropped, and readers reset
    /// a cursor before it. Every change read counts against the step's
    /// budget.
    fn gc_changes(&mut self, c: &rp::GcChangesCmd, now: u64) -> io::Result<CommandResult> {
        if self.settings.apply_rules < 1 {
            // As a binary without the command rejects it.
            return Ok(reject(ErrorCode::InvalidArgument, "empty command"));
        }
        let max = (c.max_items.min(EXPIRE_ITEMS_MAX) as usize).max(1);
        let end = [keys::TAG_CHANGE + 1];
        let mut start = match self.kv.get(keys::SM_META_CHANGE_GC_CURSOR)? {
            Some(cursor) => cursor,
            None => vec![keys::TAG_CHANGE],
        };
        let mut examined = 0;
        let mut dropped = 0u32;
        let mut finished = false;
        // The chat being walked and its newest pts.
        let mut newest: Option<(u64, u64)> = None;
        'chunks: while examined < max {
            let wanted = (max - examined).min(GC_CHANGES_CHUNK);
            let changes = self.kv.scan(&start, &end, wanted)?;
            examined += changes.len();
            let reached_end = changes.len() < wanted;
            for (key, value) in changes {
                let (Some(chat), Some(pts)) = (keys::part(&key, 0), keys::part(&key, 1)) else {
                    return Err(io::Error::other(format!("change key {key:?} is short")));
                };
                let last_pts = match newest {
                    Some((walked, last)) if walked == chat => last,
                    _ => {
                        let last = self.chat(chat)?.last_pts;
                        newest = Some((chat, last));
                        last
                    }
                };
                let rec: ChangeRecord = decode(&value, "change record")?;
                // The chat keeps this change and every later one: it is
                // new, or the chat's newest, which stays so that a cursor
                // behind what was dropped finds a gap before it (under rules
                // 3 the newest change may have no record, and
                // `changes_from_pts` tells instead).
                if rec.at_ms >= c.before_ms || pts >= last_pts {
                    // Go on after the chat's last possible change key.
                    start = keys::change(chat, u64::MAX);
                    start.push(0);
                    continue 'chunks;
                }
                self.kv.delete(key.clone());
                if self.settings.apply_rules >= 3 {
                    // Readers take a gap before a record for new messages,
                    // so the chat says where its changes now begin.
                    let mut chat_rec = self.chat(chat)?;
                    chat_rec.changes_from_pts = chat_rec.changes_from_pts.max(pts + 1);
                    self.put_chat(chat, &chat_rec);
                }
                dropped += 1;
                start = key;
                start.push(0);
            }
            if reached_end {
                finished = true;
                break;
            }
        }
        if finished {
            self.kv.delete(keys::SM_META_CHANGE_GC_CURSOR.to_vec());
            self.kv.put(
                keys::SM_META_CHANGE_GC_PASS_END.to_vec(),
                now.to_be_bytes().to_vec(),
            );
        } else {
            self.kv.put(keys::SM_META_CHANGE_GC_CURSOR.to_vec(), start);
        }
        Ok(CommandResult {
            outcome: Some(command_result::Outcome::Expire(rp::ExpireResult {
                expired: dropped,
            })),
        })
    }

    fn raise_apply_rules(&mut self, c: &rp::RaiseApplyRulesCmd) -> io::Result<CommandResult> {
        known_rules(c.apply_rules)?;
        if c.apply_rules > self.settings.apply_rules {
            self.settings.apply_rules = c.apply_rules;
            self.kv.put(
                keys::SM_META_SETTINGS.to_vec(),
                self.settings.encode_to_vec(),
            );
        }
        Ok(changed(0))
    }

    fn bootstrap(&mut self, c: &rp::BootstrapCmd) -> io::Result<CommandResult> {
        if self.kv.get(keys::SM_META_INCARNATION)?.is_none() {
            self.kv.put(
                keys::SM_META_INCARNATION.to_vec(),
                c.incarnation.to_be_bytes().to_vec(),
            );
            if let Some(s) = &c.settings {
                known_rules(s.apply_rules)?;
                self.kv
                    .put(keys::SM_META_SETTINGS.to_vec(), s.encode_to_vec());
                self.settings = *s;
            }
        }
        Ok(changed(0))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Commands and an apply call for tests of apply and of reads.
    use super::*;

    /// Applies `commands` at `now_ms` to `tree`, as one apply call would,
    /// under the settings stored in the tree (the defaults if none).
    pub fn apply(tree: &sled::Tree, now_ms: u64, commands: Vec<rp::Command>) -> Vec<CommandResult> {
        try_apply(tree, now_ms, commands).unwrap()
    }

    /// [`apply`], or the error that stops the apply call.
    pub fn try_apply(
        tree: &sled::Tree,
        now_ms: u64,
        commands: Vec<rp::Command>,
    ) -> io::Result<Vec<CommandResult>> {
        let settings = match tree.get(keys::SM_META_SETTINGS).unwrap() {
            Some(v) => decode(&v, "shard settings").unwrap(),
            None => default_settings(),
        };
        let view = View::from(tree.clone());
        let mut overlay = Overlay::new(&view);
        let mut applier = Applier::new(&mut overlay, settings);
        let results = applier.apply_batch(&CommandBatch {
            format_version: 1,
            now_ms,
            commands,
        })?;
        for (k, v) in overlay.into_writes().unwrap().0 {
            match v {
                Some(p) => tree.insert(k, p.value).map(drop),
                None => tree.remove(k).map(drop),
            }
            .unwrap();
        }
        Ok(results)
    }

    /// Stores `settings` as a bootstrap would.
    pub fn set_settings(tree: &sled::Tree, settings: ShardSettings) {
        tree.insert(keys::SM_META_SETTINGS, settings.encode_to_vec())
            .unwrap();
    }

    /// Stores settings with the newest apply rules, as the bootstrap of a
    /// shard created by this binary does.
    pub fn newest_rules(tree: &sled::Tree) {
        under_rules(tree, APPLY_RULES);
    }

    /// Stores the default settings under `apply_rules`.
    pub fn under_rules(tree: &sled::Tree, apply_rules: u32) {
        set_settings(
            tree,
            ShardSettings {
                apply_rules,
                ..default_settings()
            },
        );
    }

    pub fn raise_rules(apply_rules: u32) -> rp::Command {
        rp::Command {
            kind: Some(command::Kind::RaiseApplyRules(rp::RaiseApplyRulesCmd {
                apply_rules,
            })),
        }
    }

    pub fn send(chat: u64, client_msg_id: u64) -> rp::Command {
        rp::Command {
            kind: Some(command::Kind::Send(rp::SendCmd {
                chat_id: chat,
                sender_id: 1,
                client_msg_id,
                body: b"hi".to_vec().into(),
                ..Default::default()
            })),
        }
    }

    pub fn gc(before_ms: u64, max_items: u32) -> rp::Command {
        rp::Command {
            kind: Some(command::Kind::GcDedup(rp::GcDedupCmd {
                before_ms,
                max_items,
            })),
        }
    }

    pub fn edit(chat: u64, seq: u64, editor: u64, body: &[u8]) -> rp::Command {
        rp::Command {
            kind: Some(command::Kind::Edit(rp::EditCmd {
                chat_id: chat,
                seq,
                editor_id: editor,
                body: body.to_vec().into(),
                ..Default::default()
            })),
        }
    }

    pub fn delete(chat: u64, seq: u64, requester: u64) -> rp::Command {
        rp::Command {
            kind: Some(command::Kind::Delete(rp::DeleteCmd {
                chat_id: chat,
                seq,
                requester_id: requester,
            })),
        }
    }

    pub fn gc_changes(before_ms: u64, max_items: u32) -> rp::Command {
        rp::Command {
            kind: Some(command::Kind::GcChanges(rp::GcChangesCmd {
                before_ms,
                max_items,
            })),
        }
    }

    pub fn mark_read(chat: u64, reader: u64, up_to_seq: u64) -> rp::Command {
        rp::Command {
            kind: Some(command::Kind::MarkRead(rp::MarkReadCmd {
                chat_id: chat,
                reader_id: reader,
                up_to_seq,
            })),
        }
    }

    pub fn close(chat: u64) -> rp::Command {
        rp::Command {
            kind: Some(command::Kind::CloseChat(rp::CloseChatCmd {
                chat_id: chat,
                reason: "spam".into(),
            })),
        }
    }

    pub fn reopen(chat: u64) -> rp::Command {
        rp::Command {
            kind: Some(command::Kind::ReopenChat(rp::ReopenChatCmd {
                chat_id: chat,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    /// The pts of a change result, or the error code of a rejection.
    fn outcome(r: &CommandResult) -> Result<u64, ErrorCode> {
        match &r.outcome {
            Some(command_result::Outcome::Change(c)) => Ok(c.pts),
            Some(command_result::Outcome::Error(e)) => {
                Err(ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified))
            }
            other => panic!("not a change result: {other:?}"),
        }
    }

    fn duplicate(r: &CommandResult) -> bool {
        match &r.outcome {
            Some(command_result::Outcome::Send(s)) => s.duplicate,
            other => panic!("not a send result: {other:?}"),
        }
    }

    /// Under rules 2 an edit with an id is applied once: sent again after a
    /// later edit, it changes nothing and answers with its first pts. Under
    /// rules 1 the repeat put the older body back as a new change.
    #[test]
    fn an_edit_sent_again_after_a_later_one_changes_nothing() {
        let edit_with = |body: &[u8], edit_id: u64| rp::Command {
            kind: Some(command::Kind::Edit(rp::EditCmd {
                chat_id: 4,
                seq: 1,
                editor_id: 1,
                body: body.to_vec().into(),
                sealed_body: None,
                edit_id,
            })),
        };
        let body = |tree: &sled::Tree| {
            let v = tree.get(keys::message(4, 1)).unwrap().unwrap();
            let m: MessageRecord = decode(&v, "message").unwrap();
            m.body.to_vec()
        };
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        for (rules, last) in [(2, &b"second"[..]), (1, &b"first"[..])] {
            let tree = db.open_tree(format!("rules-{rules}")).unwrap();
            under_rules(&tree, rules);
            apply(&tree, 1_000, vec![send(4, 1)]);
            // An edit to the body the message has is remembered too.
            apply(&tree, 1_500, vec![edit_with(b"hi", 5)]);
            let first = outcome(&apply(&tree, 2_000, vec![edit_with(b"first", 7)])[0]);
            apply(&tree, 3_000, vec![edit_with(b"second", 8)]);
            let again = outcome(&apply(&tree, 4_000, vec![edit_with(b"first", 7)])[0]);
            assert_eq!(body(&tree), last, "rules {rules}");
            apply(&tree, 4_500, vec![edit_with(b"hi", 5)]);
            if rules >= 2 {
                assert_eq!(again, first, "the repeat answers with the first pts");
                assert_eq!(body(&tree), last, "a repeated no-op edit changes nothing");
                // An id names one edit: used for another message, refused.
                apply(&tree, 5_000, vec![send(4, 2)]);
                let other = rp::Command {
                    kind: Some(command::Kind::Edit(rp::EditCmd {
                        chat_id: 4,
                        seq: 2,
                        editor_id: 1,
                        body: b"other"[..].into(),
                        sealed_body: None,
                        edit_id: 7,
                    })),
                };
                let r = apply(&tree, 6_000, vec![other]);
                assert_eq!(outcome(&r[0]), Err(ErrorCode::FailedPrecondition));
            }
        }
    }

    /// After a leader whose clock ran ahead, a chat's creation times stay
    /// ahead (they never go back); under rules 2 a delete-after-send timer
    /// runs from the entry's own time, under rules 1 from the creation time.
    #[test]
    fn after_send_timers_run_from_the_entry_time_under_rules_2() {
        let send_for = |chat: u64, cmid: u64| rp::Command {
            kind: Some(command::Kind::Send(rp::SendCmd {
                chat_id: chat,
                sender_id: 1,
                client_msg_id: cmid,
                body: b"soon gone".to_vec().into(),
                self_destruct: Some(rp::SelfDestruct {
                    policy: Some(self_destruct::Policy::AfterSendSecs(5)),
                }),
                ..Default::default()
            })),
        };
        let expire_at = |tree: &sled::Tree, chat: u64, seq: u64| {
            let v = tree.get(keys::message(chat, seq)).unwrap().unwrap();
            let m: MessageRecord = decode(&v, "message").unwrap();
            (m.created_at_ms, m.expire_at_ms)
        };
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        for (rules, want) in [(2, 6_000), (1, 15_000)] {
            let tree = db.open_tree(format!("rules-{rules}")).unwrap();
            under_rules(&tree, rules);
            // A leader 9 s ahead, then one with the right time.
            apply(&tree, 10_000, vec![send(3, 1)]);
            apply(&tree, 1_000, vec![send_for(3, 2)]);
            assert_eq!(expire_at(&tree, 3, 2), (10_000, want), "rules {rules}");
        }
    }

    /// Under rules 2 a MarkRead over more pending delete-after-read
    /// messages than one step takes moves the cursor only as far as it got
    /// and says `more`; repeating it starts every timer, the reader's own
    /// messages included in the walk but never started. Under rules 1 the
    /// cursor jumped and the messages past the cap kept no timer.
    #[test]
    fn mark_read_over_many_after_read_messages_starts_every_timer() {
        let after_read = |chat: u64, sender: u64, cmid: u64, body: usize| rp::Command {
            kind: Some(command::Kind::Send(rp::SendCmd {
                chat_id: chat,
                sender_id: sender,
                client_msg_id: cmid,
                body: vec![b'x'; body].into(),
                self_destruct: Some(rp::SelfDestruct {
                    policy: Some(self_destruct::Policy::AfterReadSecs(60)),
                }),
                ..Default::default()
            })),
        };
        let mark_read = |chat: u64, reader: u64, up_to_seq: u64| rp::Command {
            kind: Some(command::Kind::MarkRead(rp::MarkReadCmd {
                chat_id: chat,
                reader_id: reader,
                up_to_seq,
            })),
        };
        let more = |r: &CommandResult| match &r.outcome {
            Some(command_result::Outcome::Change(c)) => c.more,
            other => panic!("not a change result: {other:?}"),
        };
        let pending = |tree: &sled::Tree, chat: u64| {
            tree.scan_prefix(&keys::after_read(chat, 0)[..9]).count()
        };
        let cursor = |tree: &sled::Tree, chat: u64, reader: u64| {
            let v = tree.get(keys::read_cursor(chat, reader)).unwrap().unwrap();
            u64::from_be_bytes(v.as_ref().try_into().unwrap())
        };
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();

        // Rules 2: 1,200 small messages, every third one the reader's own.
        let tree = db.open_tree("rules-2").unwrap();
        newest_rules(&tree);
        let n = MARK_READ_SCAN_MAX as u64 + 200;
        let sends = (1..=n).map(|seq| after_read(5, if seq % 3 == 0 { 2 } else { 1 }, seq, 10));
        apply(&tree, 1_000, sends.collect());
        let first = apply(&tree, 2_000, vec![mark_read(5, 2, n)]);
        assert!(more(&first[0]));
        assert_eq!(cursor(&tree, 5, 2), MARK_READ_SCAN_MAX as u64);
        let second = apply(&tree, 2_000, vec![mark_read(5, 2, n)]);
        assert!(!more(&second[0]));
        assert_eq!(cursor(&tree, 5, 2), n);
        assert_eq!(
            pending(&tree, 5),
            (n / 3) as usize,
            "only the reader's own are left"
        );

        // Large messages: the entry's byte budget stops the walk, and a
        // second MarkRead in the same entry, with no budget left, moves only
        // past the timers already started and is told there is more.
        let big = 60 * 1024;
        apply(
            &tree,
            1_000,
            (1..=8).map(|seq| after_read(6, 1, seq, big)).collect(),
        );
        let r = apply(&tree, 2_000, vec![mark_read(6, 2, 8), mark_read(6, 3, 8)]);
        assert!(more(&r[0]) && more(&r[1]));
        assert_eq!(cursor(&tree, 6, 2), 5, "five bodies pass 256 KiB");
        assert_eq!(
            cursor(&tree, 6, 3),
            5,
            "past the timers already started, no further"
        );
        let r = apply(&tree, 2_000, vec![mark_read(6, 3, 8)]);
        assert!(!more(&r[0]));
        assert_eq!(pending(&tree, 6), 0);
        assert_eq!(cursor(&tree, 6, 3), 8);

        // Rules 1: the cursor jumps to up_to_seq and the rest never start.
        let old = db.open_tree("rules-1").unwrap();
        under_rules(&old, 1);
        let n = MARK_READ_TIMERS_MAX as u64 + 1;
        apply(
            &old,
            1_000,
            (1..=n).map(|seq| after_read(5, 1, seq, 1)).collect(),
        );
        let r = apply(&old, 2_000, vec![mark_read(5, 2, n)]);
        assert!(!more(&r[0]));
        assert_eq!(cursor(&old, 5, 2), n);
        assert_eq!(pending(&old, 5), 1);
    }

    /// A collection pass walks every dedup record in steps, drops only those
    /// created before the cutoff, and records when it ended; a resend after
    /// its record is dropped is a new message, one before is a duplicate.
    #[test]
    fn dedup_collection_pass_drops_only_old_records() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("sm").unwrap();
        // 25 old sends in 5 chats at t = 1000, 5 new ones at t = 5000.
        apply(
            &tree,
            1_000,
            (0..25).map(|i| send(1 + i % 5, 100 + i)).collect(),
        );
        apply(&tree, 5_000, (0..5).map(|i| send(1 + i, 900 + i)).collect());
        let records = || tree.scan_prefix([keys::TAG_DEDUP]).count();
        assert_eq!(records(), 30);

        // Steps of 7: the cursor advances until a step reaches the end.
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps <= 10, "the pass does not end");
            apply(&tree, 6_000, vec![gc(2_000, 7)]);
            if !tree.contains_key(keys::SM_META_DEDUP_GC_CURSOR).unwrap() {
                break;
            }
        }
        assert_eq!(steps, 5, "30 records in steps of 7");
        assert_eq!(records(), 5, "only the new records are left");
        let end = tree.get(keys::SM_META_DEDUP_GC_PASS_END).unwrap().unwrap();
        assert_eq!(u64::from_be_bytes(end.as_ref().try_into().unwrap()), 6_000);

        let r = apply(&tree, 7_000, vec![send(1, 900), send(1, 100)]);
        assert!(
            duplicate(&r[0]),
            "a record inside the window still deduplicates"
        );
        assert!(!duplicate(&r[1]), "a dropped record no longer does");
    }

    /// An edit or delete applied a second time (a retry after its reply was
    /// lost) succeeds with the pts of the first and writes nothing; another
    /// user's delete of the deleted message, or an edit of it, still fails.
    #[test]
    fn retried_edits_and_deletes_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("sm").unwrap();
        newest_rules(&tree);
        apply(&tree, 1_000, vec![send(1, 100)]);
        let changes = || tree.scan_prefix([keys::TAG_CHANGE]).count();

        let r = apply(
            &tree,
            2_000,
            vec![edit(1, 1, 1, b"v2"), edit(1, 1, 1, b"v2")],
        );
        assert_eq!(outcome(&r[0]), Ok(2));
        assert_eq!(outcome(&r[1]), Ok(2), "the same edit again");
        let r = apply(&tree, 3_000, vec![edit(1, 1, 1, b"v2")]);
        assert_eq!(outcome(&r[0]), Ok(2), "the same edit in a later entry");
        // A send has no change record of its own under rules 3.
        assert_eq!(changes(), 1);
        let r = apply(&tree, 4_000, vec![edit(1, 1, 1, b"v3")]);
        assert_eq!(outcome(&r[0]), Ok(3), "another body is a new change");

        let r = apply(&tree, 5_000, vec![delete(1, 1, 1), delete(1, 1, 1)]);
        assert_eq!(outcome(&r[0]), Ok(4));
        assert_eq!(outcome(&r[1]), Ok(4), "the same delete again");
        let r = apply(
            &tree,
            6_000,
            vec![delete(1, 1, 1), delete(1, 1, 2), edit(1, 1, 1, b"v4")],
        );
        assert_eq!(outcome(&r[0]), Ok(4), "the same delete in a later entry");
        assert_eq!(outcome(&r[1]), Err(ErrorCode::NotFound), "not the sender");
        assert_eq!(
            outcome(&r[2]),
            Err(ErrorCode::NotFound),
            "edit after delete"
        );
        assert_eq!(changes(), 3);
        let chat: ChatRecord = decode(&tree.get(keys::chat(1)).unwrap().unwrap(), "chat").unwrap();
        assert_eq!(chat.last_pts, 4);

        // Once the chat is closed, the same retries still succeed and
        // change nothing; new ones are refused.
        apply(&tree, 7_000, vec![send(1, 101), mark_read(1, 2, 2)]);
        apply(&tree, 7_500, vec![close(1)]);
        let pts = || {
            decode::<ChatRecord>(&tree.get(keys::chat(1)).unwrap().unwrap(), "chat")
                .unwrap()
                .last_pts
        };
        let closed_at = pts();
        let r = apply(
            &tree,
            8_000,
            vec![
                delete(1, 1, 1),
                mark_read(1, 2, 2),
                delete(1, 2, 1),
                mark_read(1, 3, 2),
            ],
        );
        assert_eq!(outcome(&r[0]), Ok(4), "a retried delete, chat closed");
        assert!(outcome(&r[1]).is_ok(), "a retried mark read, chat closed");
        assert_eq!(outcome(&r[2]), Err(ErrorCode::FailedPrecondition));
        assert_eq!(outcome(&r[3]), Err(ErrorCode::FailedPrecondition));
        assert_eq!(pts(), closed_at, "nothing changed");
    }

    /// A change collection pass walks every chat in steps and drops each
    /// chat's changes made before the cutoff up to its first newer one or
    /// its newest: a later change stamped earlier (the leader's clock went
    /// back) is kept, so what a chat keeps is always its newest changes.
    /// (Under rules 2, where every send has a change record.)
    #[test]
    fn change_collection_drops_each_chats_oldest_changes() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("sm").unwrap();
        under_rules(&tree, 2);
        // Chats 1-5: five old sends each; chats 1 and 2: one new send more.
        apply(
            &tree,
            1_000,
            (0..25).map(|i| send(1 + i % 5, 100 + i)).collect(),
        );
        apply(&tree, 5_000, vec![send(1, 900), send(2, 901)]);
        // Chat 6: an old send, a new close, then a reopen stamped old.
        apply(&tree, 1_000, vec![send(6, 1)]);
        apply(&tree, 5_000, vec![close(6)]);
        apply(&tree, 1_500, vec![reopen(6)]);
        let kept = |chat: u64| -> Vec<u64> {
            tree.scan_prefix(keys::chat_prefix(keys::TAG_CHANGE, chat))
                .map(|kv| keys::part(&kv.unwrap().0, 1).unwrap())
                .collect()
        };
        assert_eq!(kept(1).len(), 6);

        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps <= 20, "the pass does not end");
            apply(&tree, 6_000, vec![gc_changes(2_000, 4)]);
            if !tree.contains_key(keys::SM_META_CHANGE_GC_CURSOR).unwrap() {
                break;
            }
        }
        assert!(steps > 1, "steps of 4 cannot cover 30 changes at once");
        assert_eq!(kept(1), vec![6]);
        assert_eq!(kept(2), vec![6]);
        for chat in 3..=5 {
            assert_eq!(kept(chat), vec![5], "chat {chat} keeps its newest change");
        }
        assert_eq!(kept(6), vec![2, 3], "the reopen after the kept close");
        let end = tree.get(keys::SM_META_CHANGE_GC_PASS_END).unwrap().unwrap();
        assert_eq!(u64::from_be_bytes(end.as_ref().try_into().unwrap()), 6_000);

        // Nothing else moved: the next send continues each chat's pts.
        let r = apply(&tree, 7_000, vec![send(3, 999)]);
        match &r[0].outcome {
            Some(command_result::Outcome::Send(s)) => assert_eq!((s.seq, s.pts), (6, 6)),
            other => panic!("not a send result: {other:?}"),
        }
    }

    /// Under rules 3 a send writes no change record unless its message will
    /// self-destruct, and every change record names the seq of the last
    /// message sent before it; collection moves the chat's
    /// `changes_from_pts` past each record it drops.
    #[test]
    fn under_rules_3_only_what_is_not_a_send_has_a_change_record() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("sm").unwrap();
        newest_rules(&tree);
        apply(&tree, 1_000, vec![send(1, 100), send(1, 101)]);
        apply(&tree, 2_000, vec![edit(1, 1, 1, b"v2"), send(1, 102)]);
        apply(&tree, 5_000, vec![edit(1, 2, 1, b"v2")]);
        let self_destructing = rp::Command {
            kind: Some(command::Kind::Send(rp::SendCmd {
                chat_id: 1,
                sender_id: 2,
                client_msg_id: 103,
                body: b"soon gone".to_vec().into(),
                self_destruct: Some(rp::SelfDestruct {
                    policy: Some(self_destruct::Policy::AfterReadSecs(5)),
                }),
                ..Default::default()
            })),
        };
        apply(&tree, 5_000, vec![self_destructing, send(1, 104)]);
        let records = || -> Vec<ChangeRecord> {
            tree.scan_prefix(keys::chat_prefix(keys::TAG_CHANGE, 1))
                .map(|kv| decode(&kv.unwrap().1, "change").unwrap())
                .collect()
        };
        let named: Vec<_> = records()
            .iter()
            .map(|c| (c.pts, c.seq, c.last_seq, c.user_id))
            .collect();
        assert_eq!(
            named,
            vec![(3, 1, Some(2), 1), (5, 2, Some(3), 1), (6, 4, Some(3), 2)]
        );
        let chat = || -> ChatRecord {
            decode(&tree.get(keys::chat(1)).unwrap().unwrap(), "chat").unwrap()
        };
        assert_eq!(
            (chat().last_seq, chat().last_pts, chat().changes_from_pts),
            (5, 7, 1)
        );

        apply(&tree, 6_000, vec![gc_changes(3_000, 100)]);
        assert_eq!(
            records().iter().map(|c| c.pts).collect::<Vec<_>>(),
            vec![5, 6]
        );
        assert_eq!(chat().changes_from_pts, 4, "past the dropped edit");
    }

    /// A shard created before rule versions (rules 0) keeps the old rules
    /// until raised: the same edit twice makes two changes, a second delete
    /// is refused and change collection is refused as an unknown command.
    /// From the raise on, the new rules hold; a raise past what this binary
    /// knows stops the apply call and changes nothing.
    #[test]
    fn apply_rules_change_at_the_raise_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("sm").unwrap();
        assert_eq!(default_settings().apply_rules, 0, "before a bootstrap");
        apply(&tree, 1_000, vec![send(1, 100), send(1, 101)]);
        let r = apply(
            &tree,
            2_000,
            vec![
                edit(1, 1, 1, b"v2"),
                edit(1, 1, 1, b"v2"),
                delete(1, 2, 1),
                delete(1, 2, 1),
                gc_changes(u64::MAX, 100),
            ],
        );
        assert_eq!(outcome(&r[0]), Ok(3));
        assert_eq!(
            outcome(&r[1]),
            Ok(4),
            "rules 0: the same edit changes again"
        );
        assert_eq!(outcome(&r[2]), Ok(5));
        assert_eq!(outcome(&r[3]), Err(ErrorCode::NotFound), "rules 0");
        assert_eq!(outcome(&r[4]), Err(ErrorCode::InvalidArgument), "rules 0");
        assert_eq!(tree.scan_prefix([keys::TAG_CHANGE]).count(), 5);

        let r = apply(
            &tree,
            3_000,
            vec![
                raise_rules(APPLY_RULES),
                edit(1, 1, 1, b"v2"),
                delete(1, 2, 1),
            ],
        );
        assert_eq!(outcome(&r[1]), Ok(4), "raised in the same entry");
        assert_eq!(outcome(&r[2]), Ok(5));
        let stored: ShardSettings = decode(
            &tree.get(keys::SM_META_SETTINGS).unwrap().unwrap(),
            "settings",
        )
        .unwrap();
        assert_eq!(stored.apply_rules, APPLY_RULES);
        let r = apply(&tree, 4_000, vec![raise_rules(0), gc_changes(0, 100)]);
        assert!(
            matches!(r[1].outcome, Some(command_result::Outcome::Expire(_))),
            "never lowered: collection runs"
        );

        let before: Vec<_> = tree.iter().map(Result::unwrap).collect();
        let err = try_apply(
            &tree,
            5_000,
            vec![send(1, 102), raise_rules(APPLY_RULES + 1)],
        );
        assert!(err.is_err(), "unknown rules stop the apply call");
        let after: Vec<_> = tree.iter().map(Result::unwrap).collect();
        assert_eq!(before, after, "nothing of the stopped call is written");
    }
}
