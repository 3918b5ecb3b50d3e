//! The leader clock-offset check (DESIGN section 2): a leader stamps every
//! entry with its wall clock, and reads hide a message from
//! [`CLOCK_OFFSET_MS_MAX`] before it expires, so a node whose clock is
//! further off than that from its peers' gives up leadership and is not
//! handed any.
//!
//! Each liveness ping (see [`crate::node::quiesce`]) is a clock sample: the
//! peer answers with its wall clock, and the peer's offset from ours is its
//! answer minus the midpoint of our send and receive times, give or take
//! half the round trip. Shrinking each offset toward zero by that error
//! keeps only what is certain. The cluster's time is the median of our own
//! (offset 0) and every fresh sample, so one node with a bad clock is
//! outvoted by the others, whichever it is; with fewer than three clocks
//! nothing is decided.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

pub use crate::shard::reads::CLOCK_OFFSET_MS_MAX;

/// A sample older than this no longer counts.
pub const SAMPLE_FRESH_FOR: Duration = Duration::from_secs(5);
/// A peer whose clock is this far from the cluster's time is handed no
/// leadership: half the bound, so a clock near the bound does not take
/// leadership only to give it up again.
pub const TARGET_OFFSET_MS_MAX: u64 = CLOCK_OFFSET_MS_MAX / 2;
/// Offsets are kept within this (ms; about 146 years), so no arithmetic on
/// them overflows, whatever a peer answers.
const OFFSET_MS_LIMIT: i64 = 1 << 52;

/// One peer's clock as one ping saw it.
#[derive(Debug, Clone, Copy)]
pub struct ClockSample {
    /// The peer's clock minus ours, in ms.
    pub offset_ms: i64,
    /// How far off that may be: half the ping's round trip, in ms (at
    /// least 1).
    pub error_ms: i64,
}

impl ClockSample {
    /// A sample from a ping sent at `sent_ms` by our wall clock, answered
    /// after `round_trip` (timed with the monotonic clock, so a step of our
    /// wall clock meanwhile does not matter) with the peer's `peer_ms`.
    pub fn from_ping(sent_ms: u64, round_trip: Duration, peer_ms: u64) -> ClockSample {
        let half = (round_trip.as_millis() / 2).min(OFFSET_MS_LIMIT as u128) as i64;
        let midpoint = i128::from(sent_ms) + i128::from(half);
        let offset = (i128::from(peer_ms) - midpoint)
            .clamp(-i128::from(OFFSET_MS_LIMIT), i128::from(OFFSET_MS_LIMIT));
        ClockSample {
            offset_ms: offset as i64,
            error_ms: half + 1,
        }
    }

    /// The part of the offset that is certain: shrunk toward zero by the
    /// error.
    fn certain_ms(&self) -> i64 {
        self.offset_ms.signum() * (self.offset_ms.abs() - self.error_ms).max(0)
    }
}

/// What the samples say about the clocks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClockReport {
    /// How far this node's clock is off from the cluster's time, in ms
    /// (positive: ahead).
    pub own_offset_ms: i64,
    /// Peers with a fresh sample whose clocks are further than
    /// [`TARGET_OFFSET_MS_MAX`] from the cluster's time.
    pub off_peers: BTreeSet<u64>,
}

impl ClockReport {
    /// This node's clock is further off than the bound.
    pub fn own_is_off(&self) -> bool {
        self.own_offset_ms.unsigned_abs() > CLOCK_OFFSET_MS_MAX
    }
}

/// The report from the samples of peers: (peer, when it was taken, sample),
/// each taken with our clock, so our own offset to ourselves is 0.
pub fn report(samples: impl IntoIterator<Item = (u64, Instant, ClockSample)>) -> ClockReport {
    let fresh: Vec<(u64, i64)> = samples
        .into_iter()
        .filter(|(_, taken, _)| taken.elapsed() < SAMPLE_FRESH_FOR)
        .map(|(id, _, s)| (id, s.certain_ms()))
        .collect();
    let mut offsets: Vec<i64> = fresh.iter().map(|(_, o)| *o).collect();
    offsets.push(0);
    if offsets.len() < 3 {
        // Two clocks that disagree cannot tell which one is off.
        return ClockReport::default();
    }
    offsets.sort_unstable();
    // The cluster's time: the median, or with an even count anywhere
    // between the two middle clocks. Taking either middle would side with
    // one half of an even split (good clocks would hand their shards to bad
    // ones); a clock is off only as far as it is from that whole range.
    let mid = (offsets.len() - 1) / 2;
    let (lo, hi) = match offsets.len().is_multiple_of(2) {
        true => (offsets[mid], offsets[mid + 1]),
        false => (offsets[mid], offsets[mid]),
    };
    let from_range = |o: i64| (o - o.clamp(lo, hi)).unsigned_abs();
    ClockReport {
        own_offset_ms: -0i64.clamp(lo, hi),
        off_peers: fresh
            .into_iter()
            .filter(|(_, o)| from_range(*o) > TARGET_OFFSET_MS_MAX)
            .map(|(id, _)| id)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(offset_ms: i64, error_ms: i64) -> ClockSample {
        ClockSample {
            offset_ms,
            error_ms,
        }
    }

    /// The report from samples taken just now.
    fn fresh(samples: &[(u64, ClockSample)]) -> ClockReport {
        report(samples.iter().map(|(id, s)| (*id, Instant::now(), *s)))
    }

    /// The odd clock out is the one that is off, whichever node looks; a
    /// round trip's worth of doubt never makes a clock look off.
    #[test]
    fn the_majority_decides_whose_clock_is_off() {
        // Node 1 runs 5 s ahead: it sees both peers 5 s behind.
        let from_1 = [(2, sample(-5_000, 2)), (3, sample(-5_001, 3))];
        let r = fresh(&from_1);
        assert!(r.own_is_off());
        assert!((4_990..=5_001).contains(&r.own_offset_ms), "{r:?}");
        assert!(r.off_peers.is_empty(), "{r:?}");

        // Node 2 sees node 1 ahead and node 3 in step.
        let from_2 = [(1, sample(5_000, 2)), (3, sample(-1, 2))];
        let r = fresh(&from_2);
        assert!(!r.own_is_off(), "{r:?}");
        assert_eq!(r.off_peers, BTreeSet::from([1]));

        // Within the bound but past half of it: not off, not a target.
        let near = [(1, sample(400, 1)), (3, sample(0, 1))];
        let r = fresh(&near);
        assert!(!r.own_is_off());
        assert_eq!(r.off_peers, BTreeSet::from([1]));

        // A slow ping: a large offset within its error is no evidence.
        let slow = [(2, sample(900, 800)), (3, sample(700, 600))];
        let r = fresh(&slow);
        assert_eq!(r.own_offset_ms, -100, "only the certain 100 ms count");
        assert!(!r.own_is_off() && r.off_peers.is_empty(), "{r:?}");

        // One peer against us: no majority either way.
        let pair = [(2, sample(-5_000, 2))];
        assert_eq!(fresh(&pair), ClockReport::default());

        // No samples, or stale ones: nothing is known to be off.
        assert_eq!(fresh(&[]), ClockReport::default());
        let stale = sample(-5_000, 1);
        let then = Instant::now() - SAMPLE_FRESH_FOR;
        let old = [(2, then, stale), (3, then, stale)];
        assert_eq!(report(old), ClockReport::default());
    }

    #[test]
    fn a_ping_sample_is_the_offset_from_the_midpoint() {
        let s = ClockSample::from_ping(1_000, Duration::from_millis(10), 6_005);
        assert_eq!(s.offset_ms, 5_000);
        assert_eq!(s.error_ms, 6);
        // Whatever a peer answers, the arithmetic stays in range.
        for (sent_ms, peer_ms) in [(u64::MAX, 0), (0, u64::MAX), (u64::MAX, u64::MAX)] {
            let s = ClockSample::from_ping(sent_ms, Duration::from_millis(10), peer_ms);
            let r = fresh(&[(2, s), (3, s)]);
            assert_eq!(r.own_is_off(), sent_ms != peer_ms, "{r:?}");
        }
        // An endless round trip is endless doubt.
        let s = ClockSample::from_ping(0, Duration::MAX, u64::MAX);
        assert_eq!(fresh(&[(2, s), (3, s)]), ClockReport::default());
    }

    /// Two clocks against two: no majority, so no clock is called off (the
    /// lower middle would make the good half hand over to the bad).
    #[test]
    fn an_even_split_decides_nothing() {
        // A good node sees one good peer and two peers 5 s behind.
        let r = fresh(&[
            (2, sample(0, 1)),
            (3, sample(-5_000, 1)),
            (4, sample(-5_000, 1)),
        ]);
        assert!(!r.own_is_off(), "{r:?}");
        assert!(r.off_peers.is_empty(), "{r:?}");
        // One of the slow ones sees the same split from its side.
        let r = fresh(&[
            (1, sample(5_000, 1)),
            (2, sample(5_000, 1)),
            (4, sample(0, 1)),
        ]);
        assert!(!r.own_is_off() && r.off_peers.is_empty(), "{r:?}");
        // Four clocks whose middle two agree still decide.
        let r = fresh(&[
            (2, sample(0, 1)),
            (3, sample(10, 1)),
            (4, sample(-5_000, 1)),
        ]);
        assert!(!r.own_is_off());
        assert_eq!(r.off_peers, BTreeSet::from([4]));
        // Middles a little apart still find a clock far from both, from
        // either side.
        let r = fresh(&[
            (2, sample(0, 1)),
            (3, sample(300, 1)),
            (4, sample(20_000, 1)),
        ]);
        assert!(!r.own_is_off());
        assert_eq!(r.off_peers, BTreeSet::from([4]));
        let r = fresh(&[
            (1, sample(-20_000, 1)),
            (2, sample(-20_000, 1)),
            (3, sample(-19_700, 1)),
        ]);
        assert!(r.own_is_off(), "{r:?}");
    }
}
