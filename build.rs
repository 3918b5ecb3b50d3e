//! Generates the gRPC and protobuf code from `proto/` with protox, a pure-Rust
//! protobuf compiler, so a build needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/chatstore/v1/replicated.proto",
        "proto/chatstore/v1/raft.proto",
        "proto/chatstore/v1/chat.proto",
        "proto/chatstore/v1/node.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Descriptors for gRPC server reflection.
    std::fs::write(
        out_dir.join("chatstore_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Reserves each message's length before encoding it (src/api/grpc_codec.rs).
        .codec_path("crate::api::grpc_codec::SizedProstCodec")
        .btree_map(".")
        .bytes(".")
        .compile_fds(fds.clone())?;
    // Both ends of history and message reads
    // (`crate::api::pb::passthrough`): the NodeApi server and client and the
    // ChatStore server again, with read replies and MessagesResponse
    // carrying their messages encoded. Every type is mapped to the one generated
    // above, so this pass writes service code only (the other services'
    // too, unused).
    let passthrough = out_dir.join("passthrough");
    std::fs::create_dir_all(&passthrough)?;
    tonic_prost_build::configure()
        .codec_path("crate::api::grpc_codec::SizedProstCodec")
        .btree_map(".")
        .bytes(".")
        .out_dir(&passthrough)
        .extern_path(
            ".chatstore.v1.MessagesResponse",
            "crate::api::pb::node::EncodedMessagesResponse",
        )
        .extern_path(
            ".chatstore.v1.node.ReadReply",
            "crate::api::pb::node::EncodedReadReply",
        )
        .extern_path(
            ".chatstore.v1.node.ReadReplyBatch",
            "crate::api::pb::node::EncodedReadReplyBatch",
        )
        .extern_path(".chatstore.v1.node", "crate::api::pb::node")
        .extern_path(".chatstore.v1.replicated", "crate::api::pb::replicated")
        .extern_path(".chatstore.v1.raft", "crate::api::pb::raft")
        .extern_path(".chatstore.v1", "crate::api::pb")
        .compile_fds(fds)?;
    Ok(())
}
