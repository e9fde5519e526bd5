//! Which shard of a region owns a point.
//!
//! The documented hash: `xxh3_64` with seed 0 over [`PointId::key_bytes`] (a tag
//! byte, 1 for u64 ids and 2 for UUIDs, then the value big-endian). Each shard of a
//! region owns an inclusive range of that 64-bit hash. A new region's shards split
//! the hash space evenly (`shard i` owns the hashes `h` with `floor(h * n / 2^64) == i`),
//! and routing looks the hash up among the ranges, never `hash mod n`, so a later
//! split of one shard halves its range and moves no other point.

use crate::ids::PointId;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

pub fn point_hash(id: &PointId) -> u64 {
    xxh3_64_with_seed(&id.key_bytes(), 0)
}

/// An inclusive range of the point hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashRange {
    pub start: u64,
    pub end: u64,
}

impl HashRange {
    pub fn contains(&self, h: u64) -> bool {
        self.start <= h && h <= self.end
    }
    /// Halves the range (for a future shard split); `None` if it holds one hash.
    pub fn split(&self) -> Option<(HashRange, HashRange)> {
        if self.start == self.end {
            return None;
        }
        let mid = self.start + (self.end - self.start) / 2;
        Some((
            HashRange {
                start: self.start,
                end: mid,
            },
            HashRange {
                start: mid + 1,
                end: self.end,
            },
        ))
    }
}

/// The shards of one region of a collection, as hash ranges sorted by start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionShardMap {
    /// `ranges[i]` is owned by shard number `numbers[i]`.
    ranges: Vec<HashRange>,
    numbers: Vec<u32>,
}

impl RegionShardMap {
    /// `n` shards splitting the hash space evenly; `n` must be at least 1.
    pub fn even(n: u32) -> Self {
        assert!(n >= 1, "a region has at least one shard");
        let n128 = n as u128;
        let start_of = |i: u128| -> u128 { (i << 64).div_ceil(n128) };
        let ranges = (0..n128)
            .map(|i| HashRange {
                start: start_of(i) as u64,
                end: (start_of(i + 1) - 1) as u64,
            })
            .collect();
        Self {
            ranges,
            numbers: (0..n).collect(),
        }
    }

    pub fn shard_for_hash(&self, h: u64) -> u32 {
        // Ranges cover the whole space without gaps, so the last range starting
        // at or below `h` owns it.
        let i = self.ranges.partition_point(|r| r.start <= h) - 1;
        self.numbers[i]
    }

    pub fn shard_for(&self, id: &PointId) -> u32 {
        self.shard_for_hash(point_hash(id))
    }

    pub fn shards(&self) -> impl Iterator<Item = (u32, HashRange)> + '_ {
        self.numbers.iter().copied().zip(self.ranges.iter().copied())
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// The hash range shard `number` owns, if the map has it.
    pub fn range_of(&self, number: u32) -> Option<HashRange> {
        self.shards().find(|(n, _)| *n == number).map(|(_, r)| r)
    }

    /// Shard numbers in hash order (the order scrolls walk them in).
    pub fn numbers(&self) -> impl Iterator<Item = u32> + '_ {
        self.numbers.iter().copied()
    }

    /// The shard after `number` in hash order.
    pub fn next_after(&self, number: u32) -> Option<u32> {
        let i = self.numbers.iter().position(|n| *n == number)?;
        self.numbers.get(i + 1).copied()
    }

    /// The map with shard `number`'s range owned by new shard `new` instead
    /// (a group rebuilt after it lost its quorum); `None` if the map has no
    /// `number` or already has `new`.
    pub fn renumber(&self, number: u32, new: u32) -> Option<RegionShardMap> {
        let i = self.numbers.iter().position(|n| *n == number)?;
        if self.numbers.contains(&new) {
            return None;
        }
        let mut out = self.clone();
        out.numbers[i] = new;
        Some(out)
    }

    /// The map with shard `number`'s range halved between new shards `low`
    /// (the lower half) and `high`; `None` if the map has no such shard, it
    /// owns a single hash, or `low` or `high` is taken.
    pub fn split(&self, number: u32, low: u32, high: u32) -> Option<RegionShardMap> {
        let i = self.numbers.iter().position(|n| *n == number)?;
        if low == high || self.numbers.iter().any(|n| *n == low || *n == high) {
            return None;
        }
        let (a, b) = self.ranges[i].split()?;
        let mut out = self.clone();
        out.ranges.splice(i..=i, [a, b]);
        out.numbers.splice(i..=i, [low, high]);
        Some(out)
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Golden values, computed independently with Python's `xxhash.xxh3_64_intdigest`
    /// over the documented key bytes: changing the hash or the key encoding moves
    /// every point of every cluster to another shard, so these must never change.
    #[test]
    fn golden_hashes() {
        let cases: [(PointId, u64); 4] = [
            (PointId::Num(0), 0x_313c_2dd2_ec99_6e80),
            (PointId::Num(1), 0x_9842_17a4_c022_55fc),
            (PointId::Num(42), 0x_46bb_72a9_ed34_27e4),
            (
                PointId::Uuid(uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef)),
                0x_7ba5_509e_105d_359b,
            ),
        ];
        for (id, want) in cases {
            assert_eq!(point_hash(&id), want, "hash of {id} changed");
        }
    }

    #[test]
    fn golden_shards() {
        let map = RegionShardMap::even(4);
        let got: Vec<u32> = (0..8u64).map(|n| map.shard_for(&PointId::Num(n))).collect();
        assert_eq!(got, GOLDEN_SHARDS_OF_0_TO_7_AMONG_4);
    }
    const GOLDEN_SHARDS_OF_0_TO_7_AMONG_4: [u32; 8] = [0, 2, 3, 3, 1, 2, 3, 1];

    #[test]
    fn even_ranges_cover_everything() {
        for n in [1u32, 2, 3, 7, 256] {
            let map = RegionShardMap::even(n);
            let rs: Vec<_> = map.shards().collect();
            assert_eq!(rs.first().unwrap().1.start, 0);
            assert_eq!(rs.last().unwrap().1.end, u64::MAX);
            for w in rs.windows(2) {
                assert_eq!(w[0].1.end + 1, w[1].1.start);
            }
        }
    }

    #[test]
    fn split_halves() {
        let r = HashRange { start: 0, end: u64::MAX };
        let (a, b) = r.split().unwrap();
        assert_eq!((a.end, b.start), (u64::MAX / 2, u64::MAX / 2 + 1));
    }

    #[test]
    fn a_split_moves_only_the_split_shards_points() {
        let map = RegionShardMap::even(3);
        let after = map.split(1, 3, 4).unwrap();
        assert_eq!(after.numbers().collect::<Vec<_>>(), vec![0, 3, 4, 2]);
        let r1 = map.range_of(1).unwrap();
        for n in 0..5000u64 {
            let h = point_hash(&PointId::Num(n));
            let (was, now) = (map.shard_for_hash(h), after.shard_for_hash(h));
            if was == 1 {
                let (lo, _) = r1.split().unwrap();
                assert_eq!(now, if lo.contains(h) { 3 } else { 4 });
            } else {
                assert_eq!(now, was);
            }
        }
        assert!(after.split(0, 3, 5).is_none(), "3 is taken");
        assert!(after.split(1, 5, 6).is_none(), "1 is gone");
        assert_eq!(after.next_after(3), Some(4));
        assert_eq!(after.next_after(2), None);
    }

    proptest! {
        #[test]
        fn routing_matches_the_range_formula(h in any::<u64>(), n in 1u32..300) {
            let map = RegionShardMap::even(n);
            let want = ((h as u128 * n as u128) >> 64) as u32;
            prop_assert_eq!(map.shard_for_hash(h), want);
        }
    }
}
