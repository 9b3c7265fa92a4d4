//! The tiering planner: pure. Given the closed segments on disk with their catalog state, the
//! clock and the settings, it says which segments to upload (oldest first) and how far each
//! partition's local copies may go. It never plans the deletion of a segment that is not in
//! the bucket, and deletes per partition only a prefix of tiered segments (the log removes
//! segments oldest first).

use crate::catalog::{SegmentId, SegmentState};

/// A closed segment as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentView {
    /// Which.
    pub id: SegmentId,
    /// Offset after its last batch.
    pub end_offset: u64,
    /// Bytes on disk (segment and index).
    pub disk_bytes: u64,
    /// When its file was last written (ms since the epoch).
    pub modified_ms: i64,
    /// Its catalog state.
    pub state: SegmentState,
}

/// Settings the planner needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanLimits {
    /// Upload segments last written at least this long ago.
    pub tier_after_ms: u64,
    /// Local copies of tiered segments last written at least this long ago go.
    pub local_retention_ms: u64,
    /// Local disk budget.
    pub disk_budget_bytes: u64,
}

/// What to do now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Segments to upload, oldest first.
    pub upload: Vec<SegmentId>,
    /// Per (stream, partition): remove the local segments below this offset (all tiered), and
    /// which segments those are.
    pub delete_local: Vec<LocalRelease>,
    /// Bytes on disk once the planned deletions are done.
    pub disk_bytes_after: u64,
}

/// Local copies of one partition to remove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalRelease {
    /// Stream.
    pub stream: String,
    /// Partition.
    pub partition: u32,
    /// Everything below this offset goes.
    pub below: u64,
    /// The segments that go.
    pub segments: Vec<SegmentId>,
}

/// Plans one round. `segments` holds every closed segment on disk; `disk_bytes` is what all
/// logs use now (the active segments included).
pub fn plan(segments: &[SegmentView], disk_bytes: u64, now_ms: i64, limits: &PlanLimits) -> Plan {
    let age = |s: &SegmentView| now_ms.saturating_sub(s.modified_ms).max(0) as u64;
    let over_budget = disk_bytes > limits.disk_budget_bytes;

    let mut upload: Vec<&SegmentView> =
        segments.iter().filter(|s| !s.state.is_tiered() && (over_budget || age(s) >= limits.tier_after_ms)).collect();
    upload.sort_by_key(|s| (s.modified_ms, s.id.clone()));

    // Per partition, segments in offset order; a tiered prefix may go.
    let mut sorted: Vec<&SegmentView> = segments.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut disk_after = disk_bytes;
    let mut delete_local: Vec<LocalRelease> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let (stream, partition) = (&sorted[i].id.stream, sorted[i].id.partition);
        let mut release: Option<LocalRelease> = None;
        while i < sorted.len() && sorted[i].id.stream == *stream && sorted[i].id.partition == partition {
            let s = sorted[i];
            i += 1;
            let due = age(s) >= limits.local_retention_ms || disk_after > limits.disk_budget_bytes;
            let prefix_intact = release.as_ref().is_none_or(|r| r.below == s.id.base_offset);
            if s.state == SegmentState::Tiered && due && prefix_intact && (release.is_some() || is_first(&sorted, s)) {
                let r = release.get_or_insert_with(|| LocalRelease {
                    stream: stream.clone(),
                    partition,
                    below: 0,
                    segments: Vec::new(),
                });
                r.below = s.end_offset;
                r.segments.push(s.id.clone());
                disk_after = disk_after.saturating_sub(s.disk_bytes);
            } else {
                // Skip the rest of this partition: only a prefix can go.
                while i < sorted.len() && sorted[i].id.stream == *stream && sorted[i].id.partition == partition {
                    i += 1;
                }
            }
        }
        delete_local.extend(release);
    }
    Plan { upload: upload.into_iter().map(|s| s.id.clone()).collect(), delete_local, disk_bytes_after: disk_after }
}

/// Whether `s` is the oldest segment of its partition in `sorted`.
fn is_first(sorted: &[&SegmentView], s: &SegmentView) -> bool {
    sorted.iter().find(|o| o.id.stream == s.id.stream && o.id.partition == s.id.partition).is_some_and(|o| o.id == s.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: PlanLimits = PlanLimits { tier_after_ms: 1_000, local_retention_ms: 5_000, disk_budget_bytes: 1_000 };

    fn seg(partition: u32, base: u64, modified_ms: i64, state: SegmentState) -> SegmentView {
        SegmentView {
            id: SegmentId { stream: "cdr".into(), partition, base_offset: base },
            end_offset: base + 10,
            disk_bytes: 100,
            modified_ms,
            state,
        }
    }

    #[test]
    fn uploads_segments_past_tier_after_oldest_first() {
        let s = [
            seg(0, 10, 500, SegmentState::Local),
            seg(0, 0, 100, SegmentState::Uploading),
            seg(1, 0, 9_500, SegmentState::Local),
            seg(1, 10, 200, SegmentState::Tiered),
        ];
        let p = plan(&s, 500, 10_000, &LIMITS);
        let ids: Vec<_> = p.upload.iter().map(|i| (i.partition, i.base_offset)).collect();
        assert_eq!(ids, vec![(0, 0), (0, 10)], "young and tiered segments wait; an interrupted upload resumes");
    }

    #[test]
    fn deletes_only_a_tiered_prefix_past_local_retention() {
        let s = [
            seg(0, 0, 100, SegmentState::Tiered),
            seg(0, 10, 100, SegmentState::Tiered),
            seg(0, 20, 100, SegmentState::Local),
            seg(0, 30, 100, SegmentState::Tiered),
            seg(1, 0, 100, SegmentState::Local),
            seg(1, 10, 100, SegmentState::Tiered),
            seg(2, 0, 9_000, SegmentState::Tiered),
        ];
        let p = plan(&s, 700, 10_000, &LIMITS);
        assert_eq!(p.delete_local.len(), 1, "{:?}", p.delete_local);
        let r = &p.delete_local[0];
        assert_eq!((r.partition, r.below, r.segments.len()), (0, 20, 2));
        assert_eq!(p.disk_bytes_after, 500);
    }

    #[test]
    fn over_budget_uploads_young_segments_and_frees_tiered_ones_only_as_needed() {
        let s = [
            seg(0, 0, 9_900, SegmentState::Tiered),
            seg(0, 10, 9_900, SegmentState::Tiered),
            seg(0, 20, 9_900, SegmentState::Tiered),
            seg(0, 30, 9_900, SegmentState::Local),
        ];
        let p = plan(&s, 1_150, 10_000, &LIMITS);
        assert_eq!(p.upload.len(), 1, "over budget, young segments go up too");
        assert_eq!(p.delete_local[0].below, 20, "two segments bring the disk under budget");
        assert_eq!(p.disk_bytes_after, 950);
    }

    #[test]
    fn nothing_untiered_is_ever_planned_for_deletion() {
        let s = [seg(0, 0, 0, SegmentState::Local), seg(0, 10, 0, SegmentState::Uploading)];
        let p = plan(&s, 1_000_000, 10_000_000, &LIMITS);
        assert!(p.delete_local.is_empty());
        assert_eq!(p.disk_bytes_after, 1_000_000, "still over budget: the store applies backpressure");
    }
}
