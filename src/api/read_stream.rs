//! Reads from a router to one node, on one gRPC stream ([`crate::api::mux`]).
//!
//! A router sends SESSION and STALE reads of every shard to the nearest
//! replica; at 64 reads in flight, most of a read's cost on both sides was
//! the HTTP/2 stream of its unary call. On the stream, the reads that queue
//! up meanwhile leave as one message, and each answer returns as soon as it
//! is ready.
//!
//! The messages of a reply stay encoded on both ends ([`Reads`]: each an
//! [`EncodedReadReply`], the wire form of a `ReadReply` with each message
//! left as its bytes). The node encodes each cached message once, when it
//! enters the chat's tail in memory (`crate::shard::chat_cache`), and a page
//! carries those encodings; the router passes them on to its client as they
//! came. A 50-message history page was decoded and encoded again in the
//! router: about a tenth of the cluster's CPU per page (BENCHMARKS.md,
//! seventh round). Built message by message on the node, a page cost about
//! 5% more than it does from the encodings (twenty-seventh round).

use crate::api::mux::{stream_messages, stream_methods, Mux, Protocol};
use crate::api::pb::node::{
    EncodedReadCallReply, EncodedReadReply, EncodedReadReplyBatch, ReadCall, ReadCallBatch,
    ReadRequest,
};

/// Node API reads on the read stream, replies with their messages encoded:
/// as the node serves them and as a router calls them.
pub struct Reads;

/// The read stream to one node.
pub type ReadMux = Mux<Reads>;

impl Protocol for Reads {
    type Client = crate::api::RouterNodeClient;
    type Request = ReadRequest;
    type Reply = EncodedReadReply;
    type Batch = ReadCallBatch;
    type ReplyBatch = EncodedReadReplyBatch;
    const NAME: &'static str = "read stream";
    const BATCH_METRIC: &'static str = crate::metrics::ROUTER_READ_BATCH;

    stream_messages!(
        ReadRequest,
        EncodedReadReply,
        ReadCall,
        ReadCallBatch,
        EncodedReadCallReply,
        EncodedReadReplyBatch
    );

    stream_methods!(read_stream, read);
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::Reads;
    use crate::api::mux::Protocol;
    use crate::api::pb;
    use crate::api::pb::node::{
        EncodedMessagesResponse, EncodedReadReply, EncodedReadReplyBatch, ReadReply, ReadReplyBatch,
    };
    use crate::api::status::{from_shard_error, is_behind};
    use crate::shard;
    use crate::types::ShardId;

    /// A replica that waited for an index it has not applied says so across
    /// the stream: a Watch's long poll then asks it again instead of moving
    /// to another replica as if this one were down.
    #[test]
    fn a_behind_answer_stays_behind_across_the_stream() {
        let behind = from_shard_error(shard::Error::Behind {
            shard: ShardId(4),
            applied: 10,
            wanted: 12,
            waited_ms: 1_000,
        });
        assert!(is_behind(&behind));
        let sent = (behind.code(), behind.message().to_string());
        let batch = Reads::reply_batch(vec![(5, Err(behind))]);
        // As a client with the plain types reads it: the same call reply.
        let wire = ReadReplyBatch::decode(batch.encode_to_vec().as_slice()).unwrap();
        let reply = &wire.replies[0];
        assert_eq!(reply.id, 5);
        assert_eq!(reply.status_code, sent.0 as i32);
        assert_eq!(reply.status_message, sent.1);
        assert!(!reply.status_metadata.is_empty());
        assert_eq!(reply.status_metadata, batch.replies[0].status_metadata);
        // As a router reads it.
        let wire = EncodedReadReplyBatch::decode(batch.encode_to_vec().as_slice()).unwrap();
        let (id, reply) = Reads::replies(wire).pop().unwrap();
        assert_eq!(id, 5);
        let status = reply.unwrap_err();
        assert!(is_behind(&status));
        assert_eq!((status.code(), status.message().to_string()), sent);
    }

    fn message(seq: u64) -> pb::Message {
        pb::Message {
            chat_id: 7,
            seq,
            sender_id: 3,
            client_msg_id: 100 + seq,
            body: vec![seq as u8; 40].into(),
            created_at_ms: 1_000 + seq,
            edited_at_ms: 0,
            expire_at_ms: 0,
            deleted: false,
            pts: seq * 2,
            self_destruct: Some(pb::SelfDestructPolicy {
                policy: Some(pb::self_destruct_policy::Policy::AfterReadSecs(30)),
            }),
        }
    }

    /// What the node sends, with each message encoded once, a client with
    /// the plain types reads as a `ReadReply`; the router reads it with the
    /// messages left encoded, and what it sends on, a client reads as the
    /// same messages: every field of `ReadReply` and `MessagesResponse`
    /// survives.
    #[test]
    fn replies_read_encoded_are_the_replies_sent() {
        let reply = ReadReply {
            messages: vec![message(1), message(2), message(3)],
            difference: Some(pb::ChatDifference {
                chat_id: 7,
                pts: 9,
                more: true,
                ..Default::default()
            }),
            chat: Some(pb::GetChatResponse {
                chat_id: 7,
                last_seq: 3,
                ..Default::default()
            }),
            applied_index: 11,
            applied_term: 2,
            served_by_node: 4,
            incarnation: 99,
            complete_through: 10,
            now_ms: 1_700_000_000_000,
        };
        let sent_by_node = EncodedReadReply {
            messages: reply
                .messages
                .iter()
                .map(|m| m.encode_to_vec().into())
                .collect(),
            difference: reply.difference.clone(),
            chat: reply.chat.clone(),
            applied_index: reply.applied_index,
            applied_term: reply.applied_term,
            served_by_node: reply.served_by_node,
            incarnation: reply.incarnation,
            complete_through: reply.complete_through,
            now_ms: reply.now_ms,
        };
        let batch = Reads::reply_batch(vec![(8, Ok(sent_by_node.clone()))]);
        let plain = ReadReplyBatch::decode(batch.encode_to_vec().as_slice()).unwrap();
        assert_eq!(plain.replies[0].reply.as_ref(), Some(&reply));
        let wire = EncodedReadReplyBatch::decode(batch.encode_to_vec().as_slice()).unwrap();
        let (id, encoded) = Reads::replies(wire).pop().unwrap();
        assert_eq!(id, 8);
        let encoded = encoded.unwrap();
        assert_eq!(encoded, sent_by_node);
        // Encoded back, the same bytes as the plain reply.
        assert_eq!(encoded.encode_to_vec(), reply.encode_to_vec());

        let sent = EncodedMessagesResponse {
            messages: encoded.messages,
            read_token: vec![1, 2, 3].into(),
            served_by_node: 4,
        };
        let got = pb::MessagesResponse::decode(sent.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            got,
            pb::MessagesResponse {
                messages: reply.messages,
                read_token: vec![1, 2, 3].into(),
                served_by_node: 4,
            }
        );
    }
}
