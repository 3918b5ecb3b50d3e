//! Writes from a router to one node, on one gRPC stream ([`crate::api::mux`]).
//!
//! A router sends the writes of every shard a node leads to that node, one
//! call per shard batch (`router::batcher`). As unary calls, each was an
//! HTTP/2 stream with headers, trailers and a task on both sides; on the
//! stream, the calls that queue up meanwhile leave as one message, and each
//! reply returns as soon as its entry is applied. A failed call's reply
//! carries the status metadata Write would have sent, so the router still
//! follows leader hints.

use crate::api::mux::{stream_messages, stream_methods, Mux, Protocol};
use crate::api::pb::node::{
    WriteCall, WriteCallBatch, WriteCallReply, WriteReply, WriteReplyBatch, WriteRequest,
};

/// Node API writes, as [`Protocol`] of a router's write stream to a node.
pub struct WriteCalls;

/// The write stream to one node.
pub type WriteMux = Mux<WriteCalls>;

impl Protocol for WriteCalls {
    type Client = crate::api::RouterNodeClient;
    type Request = WriteRequest;
    type Reply = WriteReply;
    type Batch = WriteCallBatch;
    type ReplyBatch = WriteReplyBatch;
    const NAME: &'static str = "write stream";
    const BATCH_METRIC: &'static str = crate::metrics::ROUTER_WRITE_STREAM_BATCH;

    stream_messages!(
        WriteRequest,
        WriteReply,
        WriteCall,
        WriteCallBatch,
        WriteCallReply,
        WriteReplyBatch
    );

    stream_methods!(write_stream, write);
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use tonic::{Code, Status};

    use super::WriteCalls;
    use crate::api::mux::Protocol;
    use crate::api::pb::node::{WriteReply, WriteReplyBatch};
    use crate::api::status::{is_behind, leader_hint, LEADER_ADDR_HEADER, LEADER_ID_HEADER};

    /// A follower's NotLeader answer crosses the stream with its leader hint,
    /// as it would in a unary call's trailers, and is not taken for a call
    /// that failed to reach the node.
    #[test]
    fn a_failed_call_keeps_its_leader_hint_across_the_stream() {
        let mut not_leader = Status::unavailable("shard-3: this node is not the leader");
        let md = not_leader.metadata_mut();
        md.insert(LEADER_ID_HEADER, "2".parse().unwrap());
        md.insert(LEADER_ADDR_HEADER, "127.0.0.1:7102".parse().unwrap());
        let answered = WriteReply {
            log_index: 7,
            ..Default::default()
        };
        let batch = WriteCalls::reply_batch(vec![(1, Err(not_leader)), (2, Ok(answered.clone()))]);
        let wire = WriteReplyBatch::decode(batch.encode_to_vec().as_slice()).unwrap();
        let mut replies = WriteCalls::replies(wire);
        assert_eq!(replies.len(), 2);
        let (id, ok) = replies.pop().unwrap();
        assert_eq!((id, ok.unwrap()), (2, answered));
        let (id, failed) = replies.pop().unwrap();
        assert_eq!(id, 1);
        let status = failed.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            leader_hint(&status),
            Some((2, "127.0.0.1:7102".to_string()))
        );
        assert!(!is_behind(&status));
        assert!(std::error::Error::source(&status).is_none());
    }
}
