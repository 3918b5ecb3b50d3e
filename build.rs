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
        .compile_fds(fds)?;
    Ok(())
}
