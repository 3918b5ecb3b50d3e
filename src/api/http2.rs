//! HTTP/2 settings shared by every gRPC server and client here.
//!
//! h2's defaults (64 KiB flow-control windows, 16 KiB frames) make a 50 KiB
//! history page or a 96 KiB Raft entry wait for window updates between
//! frames on a busy connection. Larger windows let a whole message go out at
//! once; they grant the peer permission to send, not memory up front.

use tonic::transport::{Endpoint, Server};

/// Flow-control window of one stream (one call).
pub const STREAM_WINDOW_BYTES: u32 = 2 * 1024 * 1024;
/// Flow-control window of a connection, shared by its streams.
pub const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame accepted.
pub const FRAME_BYTES_MAX: u32 = 256 * 1024;

/// A client endpoint with the shared settings.
pub fn endpoint(e: Endpoint) -> Endpoint {
    e.initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(FRAME_BYTES_MAX)
}

/// A server builder with the shared settings.
pub fn server<L>(s: Server<L>) -> Server<L> {
    s.initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(FRAME_BYTES_MAX)
}
