//! Generated protobuf and gRPC code, and conversions between wire and domain.
//!
//! - `pb`: the public API (`chatstore.v1`), served by routers;
//! - `pb::replicated`: commands and records replicated through Raft and stored;
//! - `pb::raft`: the node-to-node Raft transport;
//! - `pb::node`: the node API used by routers and `chatctl`.

pub mod codec;
pub mod grpc_codec;
pub mod http2;
pub mod mux;
pub mod read_stream;
pub mod status;
pub mod write_stream;

/// A router's client of a node, for writes, reads and status alike: the
/// NodeApi client generated with read replies as
/// [`pb::node::EncodedReadReply`] (build.rs, [`read_stream`]).
pub type RouterNodeClient = pb::passthrough::node::node_api_client::NodeApiClient<
    crate::cluster::latency::Delayed<tonic::transport::Channel>,
>;

#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("chatstore.v1");

    pub mod replicated {
        tonic::include_proto!("chatstore.v1.replicated");
    }
    pub mod raft {
        tonic::include_proto!("chatstore.v1.raft");
    }
    pub mod node {
        tonic::include_proto!("chatstore.v1.node");
    }

    /// The router's NodeApi client and ChatStore server, and the node's
    /// NodeApi server, generated again with read replies and
    /// `MessagesResponse` mapped to the `Encoded*` messages of `node.proto`,
    /// whose messages stay encoded (see
    /// [`crate::api::read_stream::Reads`]).
    pub mod passthrough {
        pub mod chat {
            include!(concat!(env!("OUT_DIR"), "/passthrough/chatstore.v1.rs"));
        }
        pub mod node {
            include!(concat!(
                env!("OUT_DIR"),
                "/passthrough/chatstore.v1.node.rs"
            ));
        }
    }

    /// Encoded descriptors of every service, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("chatstore_descriptor");
}
