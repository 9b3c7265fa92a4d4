//! The sparse index of a segment: offset → byte position, and event time → offset, in one
//! file written when the segment closes (`{base:020}.idx`). Pure encode/decode.
//!
//! An index only speeds reads up: any index that is missing, short, or disagrees with its
//! segment is rebuilt by scanning the segment.
//!
//! ```text
//! entries, N × 24 bytes:
//!   offset u64 | byte position u64 | running max event time i64 (max over the segment so far)
//! trailer, 44 bytes:
//!   magic "BHIX" | N u32 | segment length u64 | end offset u64 | min ts i64 | max ts i64
//!   | CRC-32C u32 of everything before it
//! ```

use crate::ids::Offset;

/// Bytes of one index entry.
pub const ENTRY_LEN: usize = 24;
const TRAILER_LEN: usize = 44;
const MAGIC: [u8; 4] = *b"BHIX";

/// One sampled batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// First offset of the batch.
    pub offset: Offset,
    /// Its frame's byte position in the segment.
    pub pos: u64,
    /// Largest event time of this batch and every batch before it in the segment.
    pub max_ts_ms: i64,
}

/// What an index file says of its segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentIndex {
    /// Sampled batches, offsets and positions increasing.
    pub entries: Vec<IndexEntry>,
    /// Segment length the index was built for.
    pub segment_len: u64,
    /// Offset after the segment's last batch.
    pub end: Offset,
    /// Event-time range of the segment (`None` when it is empty).
    pub ts_range: Option<(i64, i64)>,
}

impl SegmentIndex {
    /// Serialises the index.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * ENTRY_LEN + TRAILER_LEN);
        for e in &self.entries {
            out.extend_from_slice(&e.offset.0.to_le_bytes());
            out.extend_from_slice(&e.pos.to_le_bytes());
            out.extend_from_slice(&e.max_ts_ms.to_le_bytes());
        }
        let (min, max) = self.ts_range.unwrap_or((i64::MAX, i64::MIN));
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.segment_len.to_le_bytes());
        out.extend_from_slice(&self.end.0.to_le_bytes());
        out.extend_from_slice(&min.to_le_bytes());
        out.extend_from_slice(&max.to_le_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses an index file for the segment starting at `base`; `Err` says why it is unusable.
    pub fn decode(buf: &[u8], base: Offset) -> Result<SegmentIndex, String> {
        if buf.len() < TRAILER_LEN || !(buf.len() - TRAILER_LEN).is_multiple_of(ENTRY_LEN) {
            return Err(format!("index length {} is not N × {ENTRY_LEN} + {TRAILER_LEN}", buf.len()));
        }
        let (body, crc) = buf.split_at(buf.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err("index CRC mismatch".into());
        }
        let t = &body[body.len() - (TRAILER_LEN - 4)..];
        let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if t[..4] != MAGIC {
            return Err("bad index magic".into());
        }
        let count = u32::from_le_bytes(t[4..8].try_into().expect("4 bytes")) as usize;
        let segment_len = u64_at(t, 8);
        let end = Offset(u64_at(t, 16));
        let (min, max) = (u64_at(t, 24) as i64, u64_at(t, 32) as i64);
        let entry_bytes = &body[..body.len() - (TRAILER_LEN - 4)];
        if entry_bytes.len() != count * ENTRY_LEN {
            return Err("index entry count disagrees with its length".into());
        }
        let entries: Vec<IndexEntry> = entry_bytes
            .chunks_exact(ENTRY_LEN)
            .map(|c| IndexEntry { offset: Offset(u64_at(c, 0)), pos: u64_at(c, 8), max_ts_ms: u64_at(c, 16) as i64 })
            .collect();
        let monotonic = entries
            .windows(2)
            .all(|w| w[0].offset < w[1].offset && w[0].pos < w[1].pos && w[0].max_ts_ms <= w[1].max_ts_ms);
        let in_bounds = entries.iter().all(|e| e.offset >= base && e.offset < end && e.pos < segment_len);
        if !monotonic || !in_bounds || end < base {
            return Err("index entries out of order or out of bounds".into());
        }
        let ts_range = (min <= max).then_some((min, max));
        Ok(SegmentIndex { entries, segment_len, end, ts_range })
    }

    /// The position to start scanning from for `offset`: the last entry at or below it.
    pub fn pos_for_offset(&self, offset: Offset) -> u64 {
        pos_for_offset(&self.entries, offset)
    }

    /// See [`pos_for_time`].
    pub fn pos_for_time(&self, ts_ms: i64) -> u64 {
        pos_for_time(&self.entries, ts_ms)
    }
}

/// The position to start scanning from for `offset`: the last entry at or below it.
pub fn pos_for_offset(entries: &[IndexEntry], offset: Offset) -> u64 {
    let i = entries.partition_point(|e| e.offset <= offset);
    if i == 0 { 0 } else { entries[i - 1].pos }
}

/// The position to start scanning from for the first batch whose max event time is at or
/// after `ts_ms`: the last entry whose running max is still below it.
pub fn pos_for_time(entries: &[IndexEntry], ts_ms: i64) -> u64 {
    let i = entries.partition_point(|e| e.max_ts_ms < ts_ms);
    if i == 0 { 0 } else { entries[i - 1].pos }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SegmentIndex {
        SegmentIndex {
            entries: vec![
                IndexEntry { offset: Offset(100), pos: 0, max_ts_ms: 5 },
                IndexEntry { offset: Offset(150), pos: 4096, max_ts_ms: 9 },
                IndexEntry { offset: Offset(200), pos: 8200, max_ts_ms: 9 },
            ],
            segment_len: 10_000,
            end: Offset(230),
            ts_range: Some((1, 12)),
        }
    }

    #[test]
    fn index_round_trips_and_answers_lookups() {
        let idx = SegmentIndex::decode(&sample().encode(), Offset(100)).unwrap();
        assert_eq!(idx, sample());
        assert_eq!(idx.pos_for_offset(Offset(149)), 0);
        assert_eq!(idx.pos_for_offset(Offset(150)), 4096);
        assert_eq!(idx.pos_for_offset(Offset(229)), 8200);
        assert_eq!(idx.pos_for_time(5), 0);
        assert_eq!(idx.pos_for_time(7), 0);
        assert_eq!(idx.pos_for_time(10), 8200);
    }

    #[test]
    fn truncated_index_is_refused() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(SegmentIndex::decode(&bytes[..cut], Offset(100)).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn any_flipped_bit_is_refused() {
        let bytes = sample().encode();
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(SegmentIndex::decode(&b, Offset(100)).is_err(), "bit {bit}");
        }
    }
}
