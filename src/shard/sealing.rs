//! Where self-destructing bodies are sealed and opened at rest: message
//! records in the state tree and snapshot files, and commands in stored Raft
//! log entries. The keys and the cipher are in [`crate::storage::seal`].
//!
//! Everything above this layer (apply, reads, replication) sees bodies in the
//! clear; everything below it (sled, snapshot files) sees only ciphertext.

use std::io;

use prost::Message;

use crate::api::codec::decode;
use crate::api::pb::replicated::{command, CommandBatch, MessageRecord};
use crate::storage::seal::{seal_with, Key, KeyRing};

/// Whether a message record's body must be sealed at rest.
pub fn needs_seal(m: &MessageRecord) -> bool {
    m.self_destruct.is_some() && !m.body.is_empty()
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

/// Seals the bodies a log entry must not hold in the clear: self-destructing
/// sends, and every edit (an edit does not say whether its message
/// self-destructs). A sealed body that arrived from elsewhere (it never
/// travels) is dropped: only this node's keys open what it stores. Returns
/// None when the batch needs no change.
pub fn seal_batch(batch: &CommandBatch, epoch: u64, key: &Key) -> Option<CommandBatch> {
    let needs_work = |c: &command::Kind| match c {
        command::Kind::Send(s) => {
            s.sealed_body.is_some() || (s.self_destruct.is_some() && !s.body.is_empty())
        }
        command::Kind::Edit(e) => e.sealed_body.is_some() || !e.body.is_empty(),
        _ => false,
    };
    if !batch
        .commands
        .iter()
        .any(|c| c.kind.as_ref().is_some_and(needs_work))
    {
        return None;
    }
    let mut sealed = batch.clone();
    for c in &mut sealed.commands {
        match &mut c.kind {
            Some(command::Kind::Send(s)) => {
                s.sealed_body = None;
                if s.self_destruct.is_some() && !s.body.is_empty() {
                    s.sealed_body = Some(seal_with(key, epoch, &s.body));
                    s.body = Default::default();
                }
            }
            Some(command::Kind::Edit(e)) => {
                e.sealed_body = None;
                if !e.body.is_empty() {
                    e.sealed_body = Some(seal_with(key, epoch, &e.body));
                    e.body = Default::default();
                }
            }
            _ => {}
        }
    }
    Some(sealed)
}

/// Opens the sealed bodies of a stored batch in place.
pub fn open_batch(ring: &KeyRing, batch: &mut CommandBatch) -> io::Result<()> {
    for c in &mut batch.commands {
        match &mut c.kind {
            Some(command::Kind::Send(s)) => {
                if let Some(sealed) = s.sealed_body.take() {
                    s.body = ring.unseal(&sealed, None)?.into();
                }
            }
            Some(command::Kind::Edit(e)) => {
                if let Some(sealed) = e.sealed_body.take() {
                    e.body = ring.unseal(&sealed, None)?.into();
                }
            }
            _ => {}
        }
    }
    Ok(())
}
