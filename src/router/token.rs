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
//!
//! Most reads move nothing in their token (the client already holds the
//! position the reply reflects), so a router remembers the tokens it checked
//! or signed lately, by their exact bytes, and answers a read that changed
//! nothing with the bytes it was sent: such a read neither checks a MAC nor
//! signs one.

use std::sync::Arc;

use bytes::Bytes;
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
/// Bytes of tokens (and their decoded positions) a router remembers as
/// checked. A token of 64 positions weighs about 3.4 KB (1.3 KB of bytes,
/// the rest decoded), so this holds the tokens of about 5,000 recent
/// clients; one not held is checked again.
const VERIFIED_BYTES_MAX: u64 = 16 << 20;

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

/// A client's token as a router works on it: its positions and, while a
/// merge has changed none of them, the bytes the client sent.
#[derive(Clone, Debug)]
pub struct Token {
    body: Arc<TokenBody>,
    sent: Option<Bytes>,
}

impl Token {
    pub fn body(&self) -> &TokenBody {
        &self.body
    }

    pub fn position(&self, shard: u64) -> Option<ShardPosition> {
        self.body.position(shard)
    }

    /// [`TokenBody::merge`].
    pub fn merge(&mut self, pos: ShardPosition) {
        self.merge_as(pos, false);
    }

    /// [`TokenBody::merge_write`].
    pub fn merge_write(&mut self, pos: ShardPosition) {
        self.merge_as(pos, true);
    }

    fn merge_as(&mut self, pos: ShardPosition, write: bool) {
        if self.body.changed_by(pos, write) {
            Arc::make_mut(&mut self.body).merge_as(pos, write);
            self.sent = None;
        }
    }

    /// Merges the positions one response reflects (a GetDifference's, one
    /// per chat). If any changes the token, every one of them counts as
    /// merged just now, unchanged ones included, so none of them is pushed
    /// out by the others: a token holds more positions than one response
    /// names.
    pub fn merge_all(&mut self, positions: &[ShardPosition]) {
        if positions.iter().any(|p| self.body.changed_by(*p, false)) {
            let body = Arc::make_mut(&mut self.body);
            for p in positions {
                body.touch(*p);
            }
            self.sent = None;
        }
    }
}

/// What a remembered token costs: its bytes and its decoded positions.
#[derive(Clone)]
struct TokenWeight;

impl quick_cache::Weighter<Bytes, Arc<TokenBody>> for TokenWeight {
    fn weight(&self, key: &Bytes, body: &Arc<TokenBody>) -> u64 {
        let positions = body.shards.len() * std::mem::size_of::<ShardPosition>();
        (key.len() + positions + body.written.len() * 8 + 64) as u64
    }
}

/// Issues and checks tokens for one cluster.
#[derive(Clone)]
pub struct TokenKeys {
    /// HMAC-SHA256 keyed with the secret, cloned for each MAC.
    keyed: Hmac<Sha256>,
    cluster: u64,
    /// Tokens whose MAC this router checked or made, by their bytes.
    verified: Arc<quick_cache::sync::Cache<Bytes, Arc<TokenBody>, TokenWeight>>,
}

impl TokenKeys {
    pub fn new(cluster_name: &str, secret: &[u8]) -> TokenKeys {
        TokenKeys {
            keyed: <Hmac<Sha256> as Mac>::new_from_slice(secret)
                .expect("HMAC takes any key length"),
            cluster: xxhash_rust::xxh3::xxh3_64(cluster_name.as_bytes()),
            verified: Arc::new(quick_cache::sync::Cache::with_weighter(
                (VERIFIED_BYTES_MAX / 1024) as usize,
                VERIFIED_BYTES_MAX,
                TokenWeight,
            )),
        }
    }

    fn mac(&self, body: &[u8]) -> [u8; MAC_BYTES] {
        let mut m = self.keyed.clone();
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

    /// [`TokenKeys::decode`], taking a token checked lately from memory.
    pub fn token(&self, bytes: &Bytes) -> Result<Token, TokenError> {
        if bytes.is_empty() {
            return Ok(Token {
                body: Arc::new(self.decode(bytes)?),
                sent: Some(Bytes::new()),
            });
        }
        let body = match self.verified.get(bytes) {
            Some(body) => body,
            None => {
                let body = Arc::new(self.decode(bytes)?);
                // A copy: `bytes` may be a slice of the whole request's
                // buffer, which the cache would otherwise keep alive.
                self.verified
                    .insert(Bytes::copy_from_slice(bytes), body.clone());
                body
            }
        };
        Ok(Token {
            body,
            sent: Some(bytes.clone()),
        })
    }

    /// The bytes of `token`: those the client sent if nothing changed,
    /// else newly signed ones, remembered as checked.
    pub fn issue(&self, token: &Token) -> Bytes {
        if let Some(sent) = &token.sent {
            return sent.clone();
        }
        let bytes = Bytes::from(self.encode(&token.body));
        self.verified.insert(bytes.clone(), token.body.clone());
        bytes
    }
}

impl TokenBody {
    pub fn position(&self, shard: u64) -> Option<ShardPosition> {
        self.shards.iter().find(|p| p.shard == shard).copied()
    }

    /// Merges in the position a read reflects: per shard, the later (index)
    /// wins; a new incarnation replaces the old one. Positions are kept in
    /// the order they last changed, and a token past [`TOKEN_SHARDS_MAX`]
    /// drops the one that changed longest ago among those that are not
    /// writes (or, with only writes, the oldest write), never the one just
    /// merged (indexes of different shards say nothing about which matters
    /// more). A merge that changes no position leaves the order too, so
    /// that the token's bytes stay the same. Incarnation 0 is a shard whose
    /// first leader has not yet applied its bootstrap entry (writes may come
    /// before it): the same log as the incarnation that entry gives it, so
    /// such a position and one with an incarnation merge by index (see
    /// [`merged`]), and neither a replica that knows less (a new voter, say)
    /// nor a read from a replica that applied the bootstrap but not yet the
    /// client's earlier write can take the token back.
    pub fn merge(&mut self, pos: ShardPosition) {
        self.merge_as(pos, false);
    }

    /// Merges in the position of a write the client made, as
    /// [`TokenBody::merge`]; reads never push it out.
    pub fn merge_write(&mut self, pos: ShardPosition) {
        self.merge_as(pos, true);
    }

    /// Whether merging `pos` changes anything.
    fn changed_by(&self, pos: ShardPosition, write: bool) -> bool {
        match self.position(pos.shard) {
            None => true,
            Some(held) => {
                merged(pos, held) != held || (write && !self.written.contains(&pos.shard))
            }
        }
    }

    fn merge_as(&mut self, pos: ShardPosition, write: bool) {
        if self.changed_by(pos, write) {
            self.touch_as(pos, write);
        }
    }

    /// Merges `pos` as a read, and counts it as merged just now even if
    /// nothing about it changed.
    fn touch(&mut self, pos: ShardPosition) {
        self.touch_as(pos, false);
    }

    fn touch_as(&mut self, pos: ShardPosition, write: bool) {
        let merged = match self.shards.iter().position(|p| p.shard == pos.shard) {
            Some(i) => {
                let held = self.shards.remove(i);
                let merged = merged(pos, held);
                if held.incarnation != 0 && merged.incarnation != held.incarnation {
                    // A write to an earlier incarnation says nothing now.
                    self.written.retain(|s| *s != pos.shard);
                }
                merged
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

/// What the token holds of a shard after `pos` is merged into `held`: the
/// later index of one incarnation; for a position of incarnation 0 (before
/// the bootstrap entry applied, in the same log) and one with an
/// incarnation, that incarnation at the later of the two indexes; and for
/// two different incarnations, `pos`, the newer (a shard made again starts a
/// new log, whose indexes say nothing of the old one's).
fn merged(pos: ShardPosition, held: ShardPosition) -> ShardPosition {
    let later = |incarnation| ShardPosition {
        incarnation,
        ..if pos.index > held.index { pos } else { held }
    };
    match (held.incarnation, pos.incarnation) {
        (h, p) if h == p => later(h),
        (0, p) => later(p),
        (h, 0) => later(h),
        _ => pos,
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

    /// A read that moves no position answers with the bytes it was sent;
    /// one that does gets new bytes, checked like any other; a tampered
    /// copy of a remembered token is refused.
    #[test]
    fn a_token_that_nothing_changed_keeps_its_bytes() {
        let keys = TokenKeys::new("c", b"secret");
        let mut token = keys.token(&Bytes::new()).unwrap();
        assert_eq!(keys.issue(&token), Bytes::new());
        token.merge_write(pos(3, 10));
        token.merge(pos(1, 2));
        let first = keys.issue(&token);
        assert_eq!(keys.decode(&first).unwrap(), *token.body());

        let mut again = keys.token(&first).unwrap();
        again.merge(pos(3, 9));
        again.merge(pos(1, 2));
        again.merge(pos(3, 10));
        assert_eq!(keys.issue(&again), first, "nothing moved");
        // A write over a held read position is a change.
        let mut written = keys.token(&first).unwrap();
        written.merge_write(pos(1, 2));
        let bytes = keys.issue(&written);
        assert_ne!(bytes, first);
        assert_eq!(keys.decode(&bytes).unwrap().written, vec![3, 1]);

        again.merge(pos(1, 3));
        let moved = keys.issue(&again);
        assert_ne!(moved, first);
        let body = keys.token(&moved).unwrap().body().clone();
        assert_eq!(body.position(1).unwrap().index, 3);
        assert_eq!(body.position(3).unwrap().index, 10);
        assert_eq!(keys.decode(&moved).unwrap(), body);

        let mut bad = moved.to_vec();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert_eq!(
            keys.token(&Bytes::from(bad)).unwrap_err(),
            TokenError::BadMac
        );
        let other = TokenKeys::new("c", b"other secret");
        assert_eq!(other.token(&moved).unwrap_err(), TokenError::BadMac);
    }

    /// A GetDifference that changes its token keeps every position it
    /// reflects, also those it did not move, however full of reads the
    /// token was.
    #[test]
    fn one_response_never_pushes_out_its_own_positions() {
        let keys = TokenKeys::new("c", b"s");
        let mut token = keys.token(&Bytes::new()).unwrap();
        for s in 0..TOKEN_SHARDS_MAX as u64 {
            token.merge(pos(s, 5));
        }
        let cursors = crate::router::validate::CURSORS_MAX as u64;
        // The oldest held shards, unchanged, and new ones.
        let held = cursors * 3 / 5;
        let positions: Vec<ShardPosition> = (0..held)
            .map(|s| pos(s, 5))
            .chain((0..cursors - held).map(|s| pos(10_000 + s, 1)))
            .collect();
        token.merge_all(&positions);
        assert_eq!(token.body().shards.len(), TOKEN_SHARDS_MAX);
        for p in &positions {
            assert_eq!(token.position(p.shard), Some(*p), "shard {}", p.shard);
        }
        // Nothing moved: the same bytes.
        let bytes = keys.issue(&token);
        let mut again = keys.token(&bytes).unwrap();
        again.merge_all(&positions);
        assert_eq!(keys.issue(&again), bytes);
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
        // changes nothing, not even the order; a newer one counts as recent.
        body.merge(pos(11, 1));
        assert_eq!(body.position(11).unwrap().index, 12);
        body.merge(pos(12, 100));
        body.merge(pos(2_000, 1));
        assert!(body.position(11).is_none() && body.position(12).is_some());
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

    /// Positions from before a shard's bootstrap entry applied (incarnation
    /// 0) are of the same log as those after: they merge by index, so a
    /// read from a replica that applied the bootstrap but not the client's
    /// earlier write cannot take the token back, nor can one that knows
    /// less take its incarnation.
    #[test]
    fn positions_before_and_after_a_shards_bootstrap_merge_by_index() {
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
        body.merge(unbootstrapped(3, 1_200));
        assert_eq!(body.position(3), Some(pos(3, 1_200)));
        // Writes before the bootstrap entry are remembered, by index, until
        // the shard's incarnation is known, and stay the client's writes.
        body.merge_write(unbootstrapped(4, 40));
        body.merge(unbootstrapped(4, 1));
        assert_eq!(body.position(4), Some(unbootstrapped(4, 40)));
        body.merge(pos(4, 12));
        assert_eq!(body.position(4), Some(pos(4, 40)));
        assert!(body.written.contains(&4));
        body.merge(pos(4, 50));
        assert_eq!(body.position(4), Some(pos(4, 50)));
        // Another incarnation replaces the position whatever its index.
        let remade = ShardPosition {
            incarnation: 9,
            ..pos(4, 3)
        };
        body.merge(remade);
        assert_eq!(body.position(4), Some(remade));
        assert!(!body.written.contains(&4));
    }
}
