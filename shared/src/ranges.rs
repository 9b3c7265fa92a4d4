//! Sets of seq ranges: what a core holds durably per (edge, epoch, stream), what an edge has had
//! acknowledged. Live-first delivery makes holes that the backfill fills later, so this is a
//! short sorted list of disjoint half-open ranges, not a high-water mark. Pure.

use std::fmt;
use std::ops::Range;

/// Disjoint, sorted, non-adjacent half-open ranges of u64.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct RangeSet {
    ranges: Vec<Range<u64>>,
}

impl fmt::Debug for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.ranges.iter().map(|r| (r.start, r.end))).finish()
    }
}

impl RangeSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set from ranges in any order (overlaps merge, empty ranges are ignored).
    pub fn from_ranges(ranges: impl IntoIterator<Item = Range<u64>>) -> Self {
        let mut s = Self::new();
        for r in ranges {
            s.insert(r);
        }
        s
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Adds `r`, merging with neighbours it overlaps or touches.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        // The common case, in order: `r` starts at or inside the last range and runs on.
        if let Some(last) = self.ranges.last_mut()
            && last.start <= r.start
            && r.start <= last.end
        {
            last.end = last.end.max(r.end);
            return;
        }
        // First range whose end reaches r.start, last whose start is within r.end.
        let lo = self.ranges.partition_point(|x| x.end < r.start);
        let hi = self.ranges.partition_point(|x| x.start <= r.end);
        if lo == hi {
            self.ranges.insert(lo, r);
            return;
        }
        let start = r.start.min(self.ranges[lo].start);
        let end = r.end.max(self.ranges[hi - 1].end);
        self.ranges.splice(lo..hi, std::iter::once(start..end));
    }

    /// Removes `r`.
    pub fn remove(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for x in self.ranges.drain(..) {
            if x.end <= r.start || x.start >= r.end {
                out.push(x);
                continue;
            }
            if x.start < r.start {
                out.push(x.start..r.start);
            }
            if x.end > r.end {
                out.push(r.end..x.end);
            }
        }
        self.ranges = out;
    }

    /// Whether all of `r` is in the set.
    pub fn contains_range(&self, r: &Range<u64>) -> bool {
        if r.start >= r.end {
            return true;
        }
        let i = self.ranges.partition_point(|x| x.end <= r.start);
        self.ranges.get(i).is_some_and(|x| x.start <= r.start && x.end >= r.end)
    }

    /// Whether any of `r` is in the set.
    pub fn overlaps(&self, r: &Range<u64>) -> bool {
        if r.start >= r.end {
            return false;
        }
        let i = self.ranges.partition_point(|x| x.end <= r.start);
        self.ranges.get(i).is_some_and(|x| x.start < r.end)
    }

    /// The parts of `within` not in the set, in order.
    pub fn missing(&self, within: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut at = within.start;
        for x in &self.ranges {
            if x.end <= at {
                continue;
            }
            if x.start >= within.end {
                break;
            }
            if x.start > at {
                out.push(at..x.start.min(within.end));
            }
            at = at.max(x.end);
            if at >= within.end {
                break;
            }
        }
        if at < within.end {
            out.push(at..within.end);
        }
        out
    }

    /// The end of the range that contains `from`, or `from` if none does: everything in
    /// `[from, end)` is held.
    pub fn contiguous_end(&self, from: u64) -> u64 {
        let i = self.ranges.partition_point(|x| x.end < from);
        match self.ranges.get(i) {
            Some(x) if x.start <= from => x.end.max(from),
            _ => from,
        }
    }

    /// How many values the set holds.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }
}

#[cfg(test)]
// One-range sets are the point of several assertions here, not a mistaken range literal.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn insert_merges_and_missing_finds_holes() {
        let mut s = RangeSet::new();
        s.insert(10..20);
        s.insert(30..40);
        s.insert(20..25);
        assert_eq!(s.ranges(), &[10..25, 30..40]);
        assert_eq!(s.missing(0..50), vec![0..10, 25..30, 40..50]);
        assert!(s.contains_range(&(12..25)));
        assert!(!s.contains_range(&(24..31)));
        assert!(s.overlaps(&(24..31)));
        assert!(!s.overlaps(&(25..30)));
        assert_eq!(s.contiguous_end(10), 25);
        assert_eq!(s.contiguous_end(26), 26);
        s.insert(0..100);
        assert_eq!(s.ranges(), &[0..100]);
        s.remove(40..60);
        assert_eq!(s.ranges(), &[0..40, 60..100]);
    }

    fn model(ops: &[(bool, u64, u64)]) -> (RangeSet, BTreeSet<u64>) {
        let (mut s, mut m) = (RangeSet::new(), BTreeSet::new());
        for &(add, a, len) in ops {
            let r = a..a + len;
            if add {
                s.insert(r.clone());
                m.extend(r);
            } else {
                s.remove(r.clone());
                for v in r {
                    m.remove(&v);
                }
            }
        }
        (s, m)
    }

    proptest! {
        #[test]
        fn agrees_with_a_set_of_values(ops in proptest::collection::vec((any::<bool>(), 0u64..200, 0u64..30), 0..40), q in 0u64..200, ql in 0u64..40) {
            let (s, m) = model(&ops);
            // Canonical form: sorted, disjoint, non-adjacent, non-empty.
            for w in s.ranges().windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            prop_assert!(s.ranges().iter().all(|r| r.start < r.end));
            prop_assert_eq!(s.len(), m.len() as u64);
            let r = q..q + ql;
            prop_assert_eq!(s.contains_range(&r), r.clone().all(|v| m.contains(&v)));
            prop_assert_eq!(s.overlaps(&r), r.clone().any(|v| m.contains(&v)));
            let missing: BTreeSet<u64> = s.missing(r.clone()).into_iter().flatten().collect();
            let expected: BTreeSet<u64> = r.filter(|v| !m.contains(v)).collect();
            prop_assert_eq!(missing, expected);
            let end = s.contiguous_end(q);
            prop_assert!((q..end).all(|v| m.contains(&v)) && !m.contains(&end));
        }
    }
}
