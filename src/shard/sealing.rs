//! Where self-destructing bodies are sealed and opened at rest: message
//! records in the state tree and snapshot files, and commands in stored Raft
//! log entries. The keys and the cipher are in [`crate::storage::seal`].
//!
//! Everything above this layer (apply, reads, replication) sees bodies in the
//! clear; everything below it (sled, snapshot files) sees only ciphertext.

use std::io;

use prost::Message;

use crate::api::codec::decode;
use crate::api::pb::replicated::{
    command, Command, CommandBatch, MessageRecord, SealedBody, SelfDestruct,
};
use crate::storage::seal::{seal_with, Key, KeyRing};

/// Whether a message record's body must be sealed at rest.
pub fn needs_seal(m: &MessageRecord) -> bool {
    self_destructs(&m.self_destruct) && !m.body.is_empty()
}

/// Whether a message self-destructs: it names a policy. One set with none
/// (from a caller that is not this version's router, or a policy this binary
/// does not know) gets no timer and no index, so it is not sealed either:
/// the eraser finds sealed bodies through those indexes, and would destroy
/// the key of one it cannot find.
pub fn self_destructs(sd: &Option<SelfDestruct>) -> bool {
    sd.as_ref().is_some_and(|s| s.policy.is_some())
}

/// Decodes a stored message record and opens its body.
pub fn open_message(
    ring: &KeyRing,
    raw: &[u8],
    snapshot_key: Option<&Key>,
) -> io::Result<MessageRecord> {
    let mut m: MessageRecord = decode(raw, "message")?;
    if let Some(sealed) = m.sealed_body.take() {
        m.body = ring.unseal(&sealed, snapshot_key)?.into();
    }
    Ok(m)
}

/// [`open_message`] for a reader: the eraser re-seals a record with the
/// current key before it destroys the key it had, so a record read just
/// before the re-seal and opened just after the destruction is read once
/// more (`read_again`: the record now, None if it is gone since).
pub fn open_read(
    ring: &KeyRing,
    raw: &[u8],
    read_again: impl FnOnce() -> io::Result<Option<Vec<u8>>>,
) -> io::Result<Option<MessageRecord>> {
    match open_message(ring, raw, None) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => match read_again()? {
            Some(now) => open_message(ring, &now, None).map(Some),
            None => Ok(None),
        },
        opened => opened.map(Some),
    }
}

/// The stored form of a record whose body is in the clear: sealed with
/// `key` of `epoch` when it self-destructs.
pub fn seal_message(mut m: MessageRecord, epoch: u64, key: &Key) -> Vec<u8> {
    if needs_seal(&m) {
        m.sealed_body = Some(seal_with(key, epoch, &m.body));
        m.body = Default::default();
    }
    m.encode_to_vec()
}

/// A stored record's bytes with the body in the clear; bytes without a
/// sealed body are returned as they are.
pub fn plain_message_bytes(
    ring: &KeyRing,
    raw: &[u8],
    snapshot_key: Option<&Key>,
) -> io::Result<Option<Vec<u8>>> {
    let mut m: MessageRecord = decode(raw, "message")?;
    let Some(sealed) = m.sealed_body.take() else {
        return Ok(None);
    };
    m.body = ring.unseal(&sealed, snapshot_key)?.into();
    Ok(Some(m.encode_to_vec()))
}

/// The epoch a stored record's body is sealed with, if it is sealed.
pub fn sealed_epoch(raw: &[u8]) -> io::Result<Option<u64>> {
    let m: MessageRecord = decode(raw, "message")?;
    Ok(m.sealed_body.map(|s| s.epoch))
}

/// Bytes one command's place in a batch takes beyond the command: its field
/// tag and length.
const COMMAND_FRAMING_MAX: usize = 4;
/// Most bytes sealing adds to a command: the sealed body's epoch, nonce,
/// tag and framing, less the plain body's framing.
const SEAL_GROWTH_MAX: usize = 64;

/// Whether a log entry stores `c`'s body sealed (see [`seal_batch`]).
fn will_seal(c: &command::Kind) -> bool {
    match c {
        command::Kind::Send(s) => self_destructs(&s.self_destruct) && !s.body.is_empty(),
        command::Kind::Edit(e) => !e.body.is_empty(),
        _ => false,
    }
}

/// The most bytes `cmd` takes in a stored log entry: encoded, framed in its
/// batch, and with its body sealed if it will be. Write budgets count this,
/// so that a full batch still fits [`crate::storage::ENTRY_BYTES_MAX`] once
/// stored.
pub fn stored_len(cmd: &Command) -> usize {
    let sealed = cmd.kind.as_ref().is_some_and(will_seal);
    cmd.encoded_len() + COMMAND_FRAMING_MAX + if sealed { SEAL_GROWTH_MAX } else { 0 }
}

/// Seals the bodies a log entry must not hold in the clear: self-destructing
/// sends, and every edit (an edit does not say whether its message
/// self-destructs). A sealed body that arrived from elsewhere (it never
/// travels) is dropped: only this node's keys open what it stores. Returns
/// None when the batch needs no change.
pub fn seal_batch(batch: &CommandBatch, epoch: u64, key: &Key) -> Option<CommandBatch> {
    let arrived_sealed = |c: &command::Kind| match c {
        command::Kind::Send(s) => s.sealed_body.is_some(),
        command::Kind::Edit(e) => e.sealed_body.is_some(),
        _ => false,
    };
    if !batch.commands.iter().any(|c| {
        c.kind
            .as_ref()
            .is_some_and(|k| will_seal(k) || arrived_sealed(k))
    }) {
        return None;
    }
    let mut sealed = batch.clone();
    for c in &mut sealed.commands {
        let seal = c.kind.as_ref().is_some_and(will_seal);
        let Some((body, sealed_body)) = body_of(c) else {
            continue;
        };
        *sealed_body = None;
        if seal {
            *sealed_body = Some(seal_with(key, epoch, body));
            *body = Default::default();
        }
    }
    Some(sealed)
}

/// Opens the sealed bodies of a stored batch in place.
pub fn open_batch(ring: &KeyRing, batch: &mut CommandBatch) -> io::Result<()> {
    for c in &mut batch.commands {
        if let Some((body, sealed_body)) = body_of(c) {
            if let Some(sealed) = sealed_body.take() {
                *body = ring.unseal(&sealed, None)?.into();
            }
        }
    }
    Ok(())
}

/// The body of a command that carries one (a send or an edit), plain and
/// sealed.
fn body_of(c: &mut Command) -> Option<(&mut bytes::Bytes, &mut Option<SealedBody>)> {
    match &mut c.kind {
        Some(command::Kind::Send(s)) => Some((&mut s.body, &mut s.sealed_body)),
        Some(command::Kind::Edit(e)) => Some((&mut e.body, &mut e.sealed_body)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pb::replicated::{self_destruct, EditCmd, SelfDestruct, SendCmd};
    use crate::shard::{BATCH_BYTES_MAX, BATCH_COMMANDS_MAX};

    /// A send whose self_destruct names no policy gets no timer, so its
    /// body is not sealed: nothing would find it to seal it again before
    /// its key is destroyed.
    #[test]
    fn only_a_named_policy_seals_a_body() {
        let send = |policy: Option<self_destruct::Policy>| Command {
            kind: Some(command::Kind::Send(SendCmd {
                chat_id: 1,
                sender_id: 1,
                client_msg_id: 1,
                body: b"body"[..].into(),
                self_destruct: Some(SelfDestruct { policy }),
                ..Default::default()
            })),
        };
        let key = crate::storage::seal::new_key();
        let batch = |c: Command| CommandBatch {
            commands: vec![c],
            ..Default::default()
        };
        assert!(seal_batch(&batch(send(None)), 1, &key).is_none());
        let sealed = seal_batch(
            &batch(send(Some(self_destruct::Policy::AfterSendSecs(5)))),
            1,
            &key,
        )
        .expect("a self-destructing body is sealed");
        let Some(command::Kind::Send(s)) = &sealed.commands[0].kind else {
            unreachable!()
        };
        assert!(s.sealed_body.is_some() && s.body.is_empty());
        let record = |policy| MessageRecord {
            body: b"body"[..].into(),
            self_destruct: Some(SelfDestruct { policy }),
            ..Default::default()
        };
        assert!(!needs_seal(&record(None)));
        assert!(needs_seal(&record(Some(
            self_destruct::Policy::AfterReadSecs(5)
        ))));
    }

    /// As many commands as a write budget lets into one batch, of the kinds
    /// sealing grows most (tiny self-destructing sends and edits): sealed,
    /// the batch still fits the budget, and so a stored entry.
    #[test]
    fn a_full_batch_still_fits_once_sealed() {
        let send = |i: u64, body: usize| Command {
            kind: Some(command::Kind::Send(SendCmd {
                chat_id: u64::MAX - i,
                sender_id: u64::MAX,
                client_msg_id: u64::MAX - i,
                body: vec![b'x'; body].into(),
                self_destruct: Some(SelfDestruct {
                    policy: Some(self_destruct::Policy::AfterSendSecs(31_536_000)),
                }),
                ..Default::default()
            })),
        };
        let edit = |i: u64| Command {
            kind: Some(command::Kind::Edit(EditCmd {
                chat_id: u64::MAX - i,
                seq: u64::MAX,
                editor_id: u64::MAX,
                body: b"e"[..].into(),
                sealed_body: None,
                edit_id: u64::MAX,
            })),
        };
        for body in [1, 100, 1_000, 60_000] {
            let mut commands = Vec::new();
            let mut bytes = 0;
            for i in 0..BATCH_COMMANDS_MAX as u64 {
                let c = if i % 2 == 0 { send(i, body) } else { edit(i) };
                if bytes + stored_len(&c) > BATCH_BYTES_MAX {
                    break;
                }
                bytes += stored_len(&c);
                commands.push(c);
            }
            let batch = CommandBatch {
                format_version: u32::MAX,
                now_ms: u64::MAX,
                commands,
            };
            let sealed = seal_batch(&batch, u64::MAX, &[9u8; 32]).expect("bodies to seal");
            let len = sealed.encoded_len();
            assert!(
                len <= BATCH_BYTES_MAX + 64,
                "{} commands with {body}-byte bodies: {len} bytes sealed",
                batch.commands.len()
            );
        }
    }
}
