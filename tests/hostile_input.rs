//! Hostile input, as property tests: every request decoder and validator of
//! the public API, the read-token decoder, the Raft wire envelopes, log
//! entries and stored records, fed arbitrary bytes and arbitrary well-formed
//! requests. Nothing may panic; whatever is accepted must be within limits.
//!
//! Bounded in `make test` (PROPTEST_CASES, default 512 per property);
//! `make fuzz` runs them for much longer in a release build.

use proptest::prelude::*;
use prost::Message;

use chatstore::api::codec::from_postcard;
use chatstore::api::pb;
use chatstore::api::pb::replicated::{CommandBatch, MessageRecord};
use chatstore::router::token::TokenKeys;
use chatstore::router::validate;
use chatstore::shard::types::{Proposal, TypeConfig};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Bytes that are often close to valid protobuf: random, or a valid
/// message with bytes flipped, cut or appended.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    let valid = pb::SendRequest {
        chat_id: 5,
        sender_id: 9,
        client_msg_id: 77,
        body: b"hello".to_vec().into(),
        min_token: vec![1, 2, 3].into(),
        ..Default::default()
    }
    .encode_to_vec();
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        (
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            0..valid.len() + 1,
            proptest::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(move |(flips, cut, tail)| {
                let mut b = valid.clone();
                for (at, v) in flips {
                    let i = at % b.len();
                    b[i] ^= v;
                }
                b.truncate(cut);
                b.extend(tail);
                b
            }),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Every public request decoded from arbitrary bytes and validated:
    /// errors, never a panic.
    #[test]
    fn public_requests_from_arbitrary_bytes(bytes in wire_bytes()) {
        if let Ok(r) = pb::SendRequest::decode(bytes.as_slice()) {
            if validate::send(&r).is_ok() {
                prop_assert!(r.chat_id != 0 && r.sender_id != 0 && r.client_msg_id != 0);
                prop_assert!(r.body.len() <= 64 * 1024);
            }
        }
        if let Ok(r) = pb::EditRequest::decode(bytes.as_slice()) {
            let _ = validate::edit(&r);
        }
        if let Ok(r) = pb::DeleteRequest::decode(bytes.as_slice()) {
            let _ = validate::delete(&r);
        }
        if let Ok(r) = pb::MarkReadRequest::decode(bytes.as_slice()) {
            let _ = validate::mark_read(&r);
        }
        if let Ok(r) = pb::CloseChatRequest::decode(bytes.as_slice()) {
            let _ = validate::close(&r);
        }
        if let Ok(r) = pb::GetMessagesRequest::decode(bytes.as_slice()) {
            let _ = validate::messages(&r);
        }
        if let Ok(r) = pb::GetHistoryRequest::decode(bytes.as_slice()) {
            let _ = validate::page_limit(r.limit);
            let _ = validate::consistency(r.consistency);
        }
        if let Ok(r) = pb::WatchRequest::decode(bytes.as_slice()) {
            let _ = validate::cursors(&r.cursors);
        }
        if let Ok(r) = pb::GetDifferenceRequest::decode(bytes.as_slice()) {
            let _ = validate::page_limit(r.limit);
        }
    }

    /// Well-formed sends with arbitrary field values: exactly those with
    /// non-zero ids, a body within the limit and a self-destruct time in
    /// range are accepted.
    #[test]
    fn sends_with_arbitrary_fields(
        chat in any::<u64>(),
        sender in any::<u64>(),
        body_len in prop_oneof![0usize..64, 60_000usize..70_000],
        ttl in any::<u32>(),
    ) {
        let r = pb::SendRequest {
            chat_id: chat,
            sender_id: sender,
            client_msg_id: 1,
            body: vec![b'x'; body_len].into(),
            self_destruct: Some(pb::SelfDestructPolicy {
                policy: Some(pb::self_destruct_policy::Policy::AfterSendSecs(ttl)),
            }),
            ..Default::default()
        };
        let ok = validate::send(&r).is_ok();
        let in_range = (1..=365 * 24 * 3600).contains(&ttl);
        if chat == 0 || sender == 0 || body_len > 64 * 1024 || !in_range {
            prop_assert!(!ok, "accepted chat {chat} sender {sender} body {body_len} ttl {ttl}");
        } else {
            prop_assert!(ok, "refused chat {chat} sender {sender} body {body_len} ttl {ttl}");
        }
    }

    /// Read tokens are MACed: arbitrary bytes never decode to a token, and a
    /// real token with any byte changed does not either.
    #[test]
    fn read_tokens_from_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..128),
        flip in any::<(usize, u8)>(),
    ) {
        let keys = TokenKeys::new("c", b"secret");
        prop_assert!(bytes.is_empty() || keys.decode(&bytes).is_err());
        let real = keys.encode(&chatstore::router::token::TokenBody::default());
        let mut forged = real.to_vec();
        if !forged.is_empty() && flip.1 != 0 {
            let i = flip.0 % forged.len();
            forged[i] ^= flip.1;
            prop_assert!(keys.decode(&forged).is_err());
        }
    }

    /// The Raft wire: openraft messages in postcard, log payloads in
    /// protobuf with a format version. Arbitrary bytes are errors.
    #[test]
    fn raft_envelopes_from_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = from_postcard::<openraft::raft::VoteRequest<TypeConfig>>(&bytes, "vote");
        let _ = from_postcard::<openraft::raft::AppendEntriesRequest<TypeConfig>>(&bytes, "append");
        let _ = from_postcard::<openraft::raft::TransferLeaderRequest<TypeConfig>>(&bytes, "transfer");
        let _ = from_postcard::<Proposal>(&bytes, "proposal");
        if let Ok(b) = CommandBatch::decode(bytes.as_slice()) {
            let _ = b.commands.len();
        }
        let _ = MessageRecord::decode(bytes.as_slice());
        let _ = chatstore::shard::sealing::sealed_epoch(&bytes);
    }
}

/// Log entries read back from disk with arbitrary bytes: errors, no panic.
#[test]
fn log_entries_from_arbitrary_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let storage = chatstore::storage::Storage::open(dir.path()).unwrap();
    let keys = storage.keys().clone();
    let mut runner = proptest::test_runner::TestRunner::new(config());
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
            let _ = chatstore::shard::log_store::decode_entry(&keys, &bytes);
            Ok(())
        })
        .unwrap();
}
