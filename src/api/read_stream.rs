//! Reads from a router to one node, on one gRPC stream ([`crate::api::mux`]).
//!
//! A router sends SESSION and STALE reads of every shard to the nearest
//! replica; at 64 reads in flight, most of a read's cost on both sides was
//! the HTTP/2 stream of its unary call. On the stream, the reads that queue
//! up meanwhile leave as one message, and each answer returns as soon as it
//! is ready.
//!
//! The two ends decode the replies differently. The node builds
//! [`ReadReply`]s ([`ReadCalls`]); the router reads them as
//! [`EncodedReadReply`]s ([`RouterReads`]), the same bytes with each message
//! left encoded, and passes a page's messages on to its client as they came.
//! A 50-message history page was decoded and encoded again in the router:
//! about a tenth of the cluster's CPU per page (BENCHMARKS.md, seventh round).

use tonic::transport::Channel;

use crate::api::mux::{stream_messages, stream_methods, Mux, Protocol};
use crate::api::pb::node::node_api_client::NodeApiClient;
use crate::api::pb::node::{
    EncodedReadCallReply, EncodedReadReply, EncodedReadReplyBatch, ReadCall, ReadCallBatch,
    ReadCallReply, ReadReply, ReadReplyBatch, ReadRequest,
};
use crate::cluster::latency::Delayed;

/// Node API reads, as the node serves them on its read stream.
pub struct ReadCalls;

/// Node API reads, as a router calls them: replies with messages encoded.
pub struct RouterReads;

/// The read stream to one node.
pub type ReadMux = Mux<RouterReads>;

impl Protocol for RouterReads {
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

impl Protocol for ReadCalls {
    type Client = NodeApiClient<Delayed<Channel>>;
    type Request = ReadRequest;
    type Reply = ReadReply;
    type Batch = ReadCallBatch;
    type ReplyBatch = ReadReplyBatch;
    const NAME: &'static str = "read stream";
    const BATCH_METRIC: &'static str = crate::metrics::ROUTER_READ_BATCH;

    stream_messages!(
        ReadRequest,
        ReadReply,
        ReadCall,
        ReadCallBatch,
        ReadCallReply,
        ReadReplyBatch
    );

    stream_methods!(read_stream, read);
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::{ReadCalls, RouterReads};
    use crate::api::mux::Protocol;
    use crate::api::pb;
    use crate::api::pb::node::{
        EncodedMessagesResponse, EncodedReadReplyBatch, ReadReply, ReadReplyBatch,
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
        let batch = ReadCalls::reply_batch(vec![(5, Err(behind))]);
        let wire = ReadReplyBatch::decode(batch.encode_to_vec().as_slice()).unwrap();
        let (id, reply) = ReadCalls::replies(wire).pop().unwrap();
        assert_eq!(id, 5);
        assert!(is_behind(&reply.unwrap_err()));
        let wire = EncodedReadReplyBatch::decode(batch.encode_to_vec().as_slice()).unwrap();
        let (id, reply) = RouterReads::replies(wire).pop().unwrap();
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

    /// What the node sends, the router reads with its messages encoded, and
    /// what the router sends on, a client reads as the node built it: every
    /// field of `ReadReply` and `MessagesResponse` survives.
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
        let batch = ReadCalls::reply_batch(vec![(8, Ok(reply.clone()))]);
        let wire = EncodedReadReplyBatch::decode(batch.encode_to_vec().as_slice()).unwrap();
        let (id, encoded) = RouterReads::replies(wire).pop().unwrap();
        assert_eq!(id, 8);
        let encoded = encoded.unwrap();
        assert_eq!(encoded.messages.len(), 3);
        assert_eq!(encoded.difference, reply.difference);
        assert_eq!(encoded.chat, reply.chat);
        assert_eq!(
            (encoded.applied_index, encoded.applied_term),
            (reply.applied_index, reply.applied_term)
        );
        assert_eq!(
            (encoded.served_by_node, encoded.incarnation),
            (reply.served_by_node, reply.incarnation)
        );
        assert_eq!(encoded.complete_through, reply.complete_through);
        assert_eq!(encoded.now_ms, reply.now_ms);
        // Encoded back, the same bytes as the node's reply.
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
