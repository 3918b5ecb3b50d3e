//! Read tokens: what a client holds so that its reads never go backwards.
//!
//! A token is a small vector clock over shards: for each shard the client has
//! touched, an applied log position (index, term) and the shard's
//! incarnation. Every response returns the caller's token merged with the
//! position the response reflects, so a client just keeps the newest token
//! and passes it back. Positions come only from entries that were committed
//! and applied when the response was sent.
//!
//! Wire form (opaque to clients): `version(1) | body | mac(16)`, where body is
//! a prost `TokenBody` and mac is the first 16 bytes of HMAC-SHA256 over
//! version and body, keyed by the cluster's token secret.

use hmac::{Hmac, Mac};
use prost::Message;
use sha2::Sha256;

/// Token format version.
pub const TOKEN_VERSION: u8 = 1;
/// Most shards one token remembers. Past it, the position merged longest
/// ago among those that came from reads is dropped first, so reads never
/// push out the client's own writes; only a token full of writes drops one.
/// More than one GetDifference names; a full token of the largest positions,
/// every one a write, still fits [`TOKEN_BYTES_MAX`] (a test checks).
pub const TOKEN_SHARDS_MAX: usize = 140;
const _: () = assert!(TOKEN_SHARDS_MAX > crate::router::validate::CURSORS_MAX + 32);
/// Largest token accepted.
pub const TOKEN_BYTES_MAX: usize = 8192;
const MAC_BYTES: usize = 16;

#[derive(Clone, PartialEq, Message)]
pub struct TokenBody {
    #[prost(uint64, tag = "1")]
    pub cluster: u64,
    #[prost(message, repeated, tag = "2")]
    pub shards: Vec<ShardPosition>,
    /// The shards whose position covers a write this token's client made
    /// (tokens from before this field have none: their positions count as
    /// reads).
    #[prost(uint64, repeated, tag = "3")]
    pub written: Vec<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, Message)]
pub struct ShardPosition {
    #[prost(uint64, tag = "1")]
    pub shard: u64,
    #[prost(uint64, tag = "2")]
    pub incarnation: u64,
    #[prost(uint64, tag = "3")]
    pub index: u64,
    #[prost(uint64, tag = "4")]
    pub term: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("read token is malformed: {0}")]
    Malformed(&'static str),
    #[error("read token was not issued by this cluster (bad MAC)")]
    BadMac,
}

/// Issues and checks tokens for one cluster.
#[derive(Clone)]
pub struct TokenKeys {
    secret: Vec<u8>,
    cluster: u64,
}

impl TokenKeys {
    pub fn new(cluster_name: &str, secret: &[u8]) -> TokenKeys {
        TokenKeys {
            secret: secret.to_vec(),
            cluster: xxhash_rust::xxh3::xxh3_64(cluster_name.as_bytes()),
        }
    }

    fn mac(&self, body: &[u8]) -> [u8; MAC_BYTES] {
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        m.update(&[TOKEN_VERSION]);
        m.update(body);
        let full = m.finalize().into_bytes();
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&full[..MAC_BYTES]);
        out
    }

    /// Decodes a client's token; empty bytes are an empty token.
    pub fn decode(&self, bytes: &[u8]) -> Result<TokenBody, TokenError> {
        if bytes.is_empty() {
            return Ok(TokenBody {
                cluster: self.cluster,
                shards: Vec::new(),
                written: Vec::new(),
            });
        }
        if bytes.len() > TOKEN_BYTES_MAX {
            return Err(TokenError::Malformed("too long"));
        }
        if bytes.len() < 1 + MAC_BYTES {
            return Err(TokenError::Malformed("too short"));
        }
        if bytes[0] != TOKEN_VERSION {
            return Err(TokenError::Malformed("unknown version"));
        }
        let (body, mac) = bytes[1..].split_at(bytes.len() - 1 - MAC_BYTES);
        // Constant-time comparison.
        let want = self.mac(body);
        let diff = want.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(TokenError::BadMac);
        }
        let body = TokenBody::decode(body).map_err(|_| TokenError::Malformed("bad body"))?;
        if body.cluster != self.cluster {
            return Err(TokenError::Malformed("token of another cluster"));
        }
        Ok(body)
    }

    pub fn encode(&self, body: &TokenBody) -> Vec<u8> {
        let b = body.encode_to_vec();
        let mut out = Vec::with_capacity(1 + b.len() + MAC_BYTES);
        out.push(TOKEN_VERSION);
        out.extend_from_slice(&b);
        out.extend_from_slice(&self.mac(&b));
        out
    }
}

impl TokenBody {
    pub fn position(&self, shard: u64) -> Option<ShardPosition> {
        self.shards.iter().find(|p| p.shard == shard).copied()
    }

    /// Merges in the position a read reflects: per shard, the later (index)
    /// wins; a new incarnation replaces the old one. Positions are kept in
    /// the order they were last merged, and a token past
    /// [`TOKEN_SHARDS_MAX`] drops the one merged longest ago among those
    /// that are not writes (or, with only writes, the oldest write), never
    /// the one just merged (indexes of different shards say nothing about
    /// which matters more). Incarnation 0 is a shard whose first leader has
    /// not yet applied its bootstrap entry (writes may come before it): such
    /// a position never replaces one with an incarnation, so that a replica
    /// that knows less (a new voter, say) cannot wipe what the token holds.
    pub fn merge(&mut self, pos: ShardPosition) {
        self.merge_as(pos, false);
    }

    /// Merges in the position of a write the client made, as
    /// [`TokenBody::merge`]; reads never push it out.
    pub fn merge_write(&mut self, pos: ShardPosition) {
        self.merge_as(pos, true);
    }

    fn merge_as(&mut self, pos: ShardPosition, write: bool) {
        let merged = match self.shards.iter().position(|p| p.shard == pos.shard) {
            Some(i) => {
                let held = self.shards.remove(i);
                let newer = if pos.incarnation == held.incarnation {
                    pos.index > held.index
                } else {
                    pos.incarnation != 0
                };
                if newer {
                    if pos.incarnation != held.incarnation {
                        // A write to an earlier incarnation says nothing now.
                        self.written.retain(|s| *s != pos.shard);
                    }
                    pos
                } else {
                    held
                }
            }
            None => pos,
        };
        self.shards.push(merged);
        if write && !self.written.contains(&pos.shard) {
            self.written.push(pos.shard);
        }
        if self.shards.len() > TOKEN_SHARDS_MAX {
            let last = self.shards.len() - 1;
            let drop = self.shards[..last]
                .iter()
                .position(|p| !self.written.contains(&p.shard))
                .unwrap_or(0);
            let gone = self.shards.remove(drop).shard;
            self.written.retain(|s| *s != gone);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(shard: u64, index: u64) -> ShardPosition {
        ShardPosition {
            shard,
            incarnation: 7,
            index,
            term: 1,
        }
    }

    #[test]
    fn round_trip_merge_and_tamper() {
        let keys = TokenKeys::new("c", b"secret");
        let mut body = keys.decode(&[]).unwrap();
        body.merge(pos(3, 10));
        body.merge(pos(3, 5));
        body.merge(pos(1, 2));
        assert_eq!(body.position(3).unwrap().index, 10);
        let bytes = keys.encode(&body);
        assert_eq!(keys.decode(&bytes).unwrap(), body);
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n / 2] ^= 1;
        assert!(keys.decode(&bad).is_err());
        let other = TokenKeys::new("c", b"other secret");
        assert_eq!(other.decode(&bytes), Err(TokenError::BadMac));
        assert!(keys.decode(b"garbage").is_err());
    }

    #[test]
    fn keeps_at_most_the_limit() {
        let keys = TokenKeys::new("c", b"s");
        let mut body = keys.decode(&[]).unwrap();
        for s in 0..(TOKEN_SHARDS_MAX as u64 + 10) {
            body.merge(pos(s, s + 1));
        }
        assert_eq!(body.shards.len(), TOKEN_SHARDS_MAX);
        assert!(
            body.position(0).is_none(),
            "the oldest merged dropped first"
        );
        // A full token of busy shards keeps a low position just merged (a
        // write to a quiet shard), and drops the one merged longest ago.
        let quiet = 1_000;
        body.merge(pos(quiet, 3));
        assert_eq!(body.position(quiet).unwrap().index, 3);
        assert_eq!(body.shards.len(), TOKEN_SHARDS_MAX);
        assert!(body.position(10).is_none());
        // Merging an older position of a held shard keeps the newer one and
        // counts as recent.
        body.merge(pos(11, 1));
        assert_eq!(body.position(11).unwrap().index, 12);
        body.merge(pos(2_000, 1));
        assert!(body.position(11).is_some() && body.position(12).is_none());
    }

    /// A write's position outlives a GetDifference over the most cursors,
    /// and a full token of the largest positions fits the size limit.
    #[test]
    fn one_difference_keeps_the_write_before_it_and_a_full_token_fits() {
        let keys = TokenKeys::new("c", b"s");
        let mut body = keys.decode(&[]).unwrap();
        body.merge(pos(7, 100));
        for s in 0..crate::router::validate::CURSORS_MAX as u64 {
            body.merge(pos(1_000 + s, 5));
        }
        assert_eq!(body.position(7).unwrap().index, 100);
        let mut full = keys.decode(&[]).unwrap();
        for s in 0..TOKEN_SHARDS_MAX as u64 {
            full.merge_write(ShardPosition {
                shard: (1 << 20) + s,
                incarnation: u64::MAX,
                index: 1 << 40,
                term: 1 << 20,
            });
        }
        let bytes = keys.encode(&full);
        assert!(bytes.len() <= TOKEN_BYTES_MAX, "{} bytes", bytes.len());
        assert_eq!(keys.decode(&bytes).unwrap(), full);
    }

    /// However many shards a client reads from after writing, its writes
    /// stay in its token; with only writes held, the oldest write goes.
    #[test]
    fn reads_never_push_out_the_clients_writes() {
        let keys = TokenKeys::new("c", b"s");
        let mut body = keys.decode(&[]).unwrap();
        body.merge_write(pos(7, 100));
        body.merge(pos(8, 50));
        body.merge_write(pos(9, 10));
        // A read of a written shard keeps it a write.
        body.merge(pos(9, 20));
        for s in 0..3 * TOKEN_SHARDS_MAX as u64 {
            body.merge(pos(1_000 + s, 5));
        }
        assert_eq!(body.shards.len(), TOKEN_SHARDS_MAX);
        assert_eq!(body.position(7).unwrap().index, 100);
        assert_eq!(body.position(9).unwrap().index, 20);
        assert!(body.position(8).is_none(), "a read goes first");
        let bytes = keys.encode(&body);
        assert_eq!(keys.decode(&bytes).unwrap(), body);
        for s in 0..TOKEN_SHARDS_MAX as u64 {
            body.merge_write(pos(5_000 + s, 1));
        }
        assert!(body.position(7).is_none() && body.position(9).is_none());
        assert_eq!(body.written.len(), TOKEN_SHARDS_MAX);
        // A new incarnation of a written shard is no longer a write.
        body.merge(ShardPosition {
            incarnation: 8,
            ..pos(5_000, 1)
        });
        assert!(!body.written.contains(&5_000));
    }

    #[test]
    fn a_position_of_incarnation_zero_never_replaces_one_with_an_incarnation() {
        let keys = TokenKeys::new("c", b"s");
        let mut body = keys.decode(&[]).unwrap();
        let unbootstrapped = |shard, index| ShardPosition {
            shard,
            incarnation: 0,
            index,
            term: 1,
        };
        body.merge(pos(3, 1_000));
        body.merge(unbootstrapped(3, 1));
        assert_eq!(body.position(3), Some(pos(3, 1_000)));
        // Writes before the bootstrap entry are remembered, by index, until
        // the shard's incarnation is known.
        body.merge(unbootstrapped(4, 2));
        body.merge(unbootstrapped(4, 1));
        assert_eq!(body.position(4), Some(unbootstrapped(4, 2)));
        body.merge(pos(4, 1));
        assert_eq!(body.position(4), Some(pos(4, 1)));
    }
}
