//! Reads from a router to one node, on one gRPC stream ([`crate::api::mux`]).
//!
//! A router sends SESSION and STALE reads of every shard to the nearest
//! replica; at 64 reads in flight, most of a read's cost on both sides was
//! the HTTP/2 stream of its unary call. On the stream, the reads that queue
//! up meanwhile leave as one message, and each answer returns as soon as it
//! is ready.

use tonic::transport::Channel;

use crate::api::mux::{stream_messages, stream_methods, Mux, Protocol};
use crate::api::pb::node::node_api_client::NodeApiClient;
use crate::api::pb::node::{
    ReadCall, ReadCallBatch, ReadCallReply, ReadReply, ReadReplyBatch, ReadRequest,
};
use crate::cluster::latency::Delayed;

/// Node API reads, as [`Protocol`] of a router's read stream to a node.
pub struct ReadCalls;

/// The read stream to one node.
pub type ReadMux = Mux<ReadCalls>;

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

    use super::ReadCalls;
    use crate::api::mux::Protocol;
    use crate::api::pb::node::ReadReplyBatch;
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
        let batch = ReadCalls::reply_batch(vec![(5, Err(behind))]);
        let wire = ReadReplyBatch::decode(batch.encode_to_vec().as_slice()).unwrap();
        let (id, reply) = ReadCalls::replies(wire).pop().unwrap();
        assert_eq!(id, 5);
        assert!(is_behind(&reply.unwrap_err()));
    }
}
