//! `RangeSet`: a set of half-open byte ranges, kept merged. The overlay uses two of them
//! per file: which bytes live in the local overlay file, and which changed since the last
//! commit (so commit re-chunks only the chunks those ranges touch).

use std::collections::BTreeMap;

/// Merged, non-overlapping half-open ranges `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end; no two ranges overlap or touch.
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when no byte is in the set.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Adds `[start, end)`, merging with neighbours.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // The range that begins at or before `start` may overlap or touch it.
        if let Some((&ps, &pe)) = self.map.range(..=s).next_back()
            && pe >= s
        {
            s = ps;
            e = e.max(pe);
            self.map.remove(&ps);
        }
        let overlapping: Vec<(u64, u64)> = self.map.range(s..=e).map(|(&a, &b)| (a, b)).collect();
        for (a, b) in overlapping {
            e = e.max(b);
            self.map.remove(&a);
        }
        self.map.insert(s, e);
    }

    /// Removes every byte at or after `at`.
    pub fn truncate(&mut self, at: u64) {
        let tail: Vec<u64> = self.map.range(at..).map(|(&a, _)| a).collect();
        for a in tail {
            self.map.remove(&a);
        }
        if let Some((&ps, pe)) = self.map.range_mut(..at).next_back()
            && *pe > at
        {
            *pe = at;
            if ps == at {
                self.map.remove(&ps);
            }
        }
    }

    /// True when some byte of `[start, end)` is in the set.
    pub fn intersects(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        if let Some((_, &pe)) = self.map.range(..=start).next_back()
            && pe > start
        {
            return true;
        }
        self.map.range(start..end).next().is_some()
    }

    /// The range containing `offset`, if any.
    pub fn containing(&self, offset: u64) -> Option<(u64, u64)> {
        self.map.range(..=offset).next_back().filter(|(_, e)| **e > offset).map(|(&s, &e)| (s, e))
    }

    /// The first range starting after `offset`, if any.
    pub fn next_after(&self, offset: u64) -> Option<(u64, u64)> {
        self.map.range(offset + 1..).next().map(|(&s, &e)| (s, e))
    }

    /// The ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }

    /// Number of (merged) ranges.
    pub fn count(&self) -> usize {
        self.map.len()
    }

    /// Total bytes in the set, counting ranges clipped to `limit`.
    pub fn len_below(&self, limit: u64) -> u64 {
        self.map.iter().map(|(&s, &e)| e.min(limit).saturating_sub(s)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_and_queries() {
        let mut r = RangeSet::new();
        r.insert(10, 20);
        r.insert(30, 40);
        assert!(r.intersects(15, 16) && !r.intersects(20, 30) && r.intersects(25, 31));
        r.insert(20, 30);
        assert_eq!(r.containing(25), Some((10, 40)));
        r.insert(5, 12);
        assert_eq!(r.containing(5), Some((5, 40)));
        assert_eq!(r.len_below(u64::MAX), 35);
        r.truncate(22);
        assert_eq!(r.containing(21), Some((5, 22)));
        assert!(!r.intersects(22, 100));
        r.truncate(5);
        assert!(r.is_empty());
        r.insert(0, 4);
        r.insert(8, 9);
        assert_eq!(r.next_after(0), Some((8, 9)));
        assert_eq!(r.containing(4), None);
    }
}
