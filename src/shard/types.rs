//! The openraft type configuration of a shard, and the application data that
//! travels in its log.

use std::fmt;

use prost::Message;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::api::codec::REPLICATED_FORMAT_VERSION;
use crate::api::pb::replicated::{CommandBatch, CommandResult};

/// Where a node can be reached and which region it is in. Carried in every
/// shard's membership so that replicas find each other after moves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    pub addr: String,
    pub region: String,
}

/// A log entry's application payload: a batch of commands proposed together.
#[derive(Debug, Clone, PartialEq)]
pub struct Proposal {
    pub batch: CommandBatch,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "batch({} commands, now_ms={})",
            self.batch.commands.len(),
            self.batch.now_ms
        )
    }
}

impl Proposal {
    pub fn new(now_ms: u64, commands: Vec<crate::api::pb::replicated::Command>) -> Proposal {
        Proposal {
            batch: CommandBatch {
                format_version: REPLICATED_FORMAT_VERSION,
                now_ms,
                commands,
            },
        }
    }
}

/// Proposals cross the wire inside openraft's serde types as prost bytes, so
/// their format is ours and versioned.
impl Serialize for Proposal {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.batch.encode_to_vec())
    }
}

impl<'de> Deserialize<'de> for Proposal {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Proposal, D::Error> {
        let bytes: Vec<u8> = serde_bytes_vec(d)?;
        let batch = CommandBatch::decode(bytes.as_slice()).map_err(serde::de::Error::custom)?;
        if batch.format_version != REPLICATED_FORMAT_VERSION {
            return Err(serde::de::Error::custom(format!(
                "command batch format version {} is not supported",
                batch.format_version
            )));
        }
        Ok(Proposal { batch })
    }
}

/// The result of applying one log entry: one result per command of the batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyOutput {
    pub results: Vec<CommandResult>,
}

impl Serialize for ApplyOutput {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let encoded: Vec<serde_bytes_wrapper::Bytes> = self
            .results
            .iter()
            .map(|r| serde_bytes_wrapper::Bytes(r.encode_to_vec()))
            .collect();
        encoded.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ApplyOutput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ApplyOutput, D::Error> {
        let encoded: Vec<serde_bytes_wrapper::Bytes> = Vec::deserialize(d)?;
        let results = encoded
            .iter()
            .map(|b| CommandResult::decode(b.0.as_slice()).map_err(serde::de::Error::custom))
            .collect::<Result<_, _>>()?;
        Ok(ApplyOutput { results })
    }
}

fn serde_bytes_vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    serde_bytes_wrapper::Bytes::deserialize(d).map(|b| b.0)
}

mod serde_bytes_wrapper {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// A byte string that serializes as bytes (not as a sequence of numbers).
    pub struct Bytes(pub Vec<u8>);

    impl Serialize for Bytes {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Bytes, E> {
                    Ok(Bytes(v.to_vec()))
                }
                fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                    Ok(Bytes(v))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                    let mut out = Vec::new();
                    while let Some(b) = seq.next_element::<u8>()? {
                        out.push(b);
                    }
                    Ok(Bytes(out))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}

openraft::declare_raft_types!(
    /// One shard's Raft types: standard Raft leader ids (one leader per
    /// term), u64 node ids, our command batches as application data.
    pub TypeConfig:
        D = Proposal,
        R = ApplyOutput,
        NodeId = u64,
        Node = NodeAddr,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

pub type Raft = openraft::Raft<TypeConfig, crate::shard::state_machine::StateMachine>;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type EntryPayload = openraft::alias::EntryPayloadOf<TypeConfig>;
pub type Membership = openraft::Membership<u64, NodeAddr>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, crate::shard::snapshot::SnapshotFile>;
pub type CommittedLeaderId = openraft::alias::CommittedLeaderIdOf<TypeConfig>;

pub fn log_id(term: u64, index: u64) -> LogId {
    openraft::LogId::new(CommittedLeaderId::new(term), index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::pb::replicated::{command, Command, SendCmd};

    #[test]
    fn proposal_round_trips_through_postcard_and_json() {
        let p = Proposal::new(
            7,
            vec![Command {
                kind: Some(command::Kind::Send(SendCmd {
                    chat_id: 1,
                    sender_id: 2,
                    client_msg_id: 3,
                    body: bytes::Bytes::from_static(b"hello"),
                    self_destruct: None,
                    sealed_body: None,
                })),
            }],
        );
        let bytes = postcard::to_stdvec(&p).unwrap();
        let back: Proposal = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, p);
        let json = serde_json::to_vec(&p).unwrap();
        let back: Proposal = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, p);
    }
}
