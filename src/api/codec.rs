//! Our own wire and disk formats. Every format carries a version; a reader
//! refuses versions it does not know instead of guessing.
//!
//! - prost messages for our data (commands, records, log entries);
//! - postcard for openraft's own types (votes, append-entries, memberships),
//!   wrapped in versioned prost envelopes: openraft's serde derives are not
//!   a stable format across its versions, so the envelope version is bumped
//!   whenever the pinned openraft changes.

use prost::Message;

/// Version of the command, record and log-entry formats (`replicated.proto`).
pub const REPLICATED_FORMAT_VERSION: u32 = 1;
/// Version of the Raft transport envelope and the openraft types inside it.
/// Bump with every openraft upgrade.
pub const RAFT_WIRE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
#[error("cannot decode {what}: {detail}")]
pub struct DecodeError {
    pub what: &'static str,
    pub detail: String,
}

pub fn decode<T: Message + Default>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
    T::decode(bytes).map_err(|e| DecodeError {
        what,
        detail: e.to_string(),
    })
}

pub fn to_postcard<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("postcard encodes every openraft message")
}

pub fn from_postcard<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, DecodeError> {
    postcard::from_bytes(bytes).map_err(|e| DecodeError {
        what,
        detail: e.to_string(),
    })
}

pub fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("serde_json encodes every openraft type we store")
}

pub fn from_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &'static str,
) -> Result<T, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| DecodeError {
        what,
        detail: e.to_string(),
    })
}

impl From<DecodeError> for std::io::Error {
    fn from(e: DecodeError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
    }
}
