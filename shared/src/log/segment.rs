//! Segment files: frames around batches, and the scan that recovery, index rebuilds and
//! `log verify` share. Pure: works on byte slices.
//!
//! A segment is named by its first offset (`{base:020}.log`) and holds frames back to back.
//! The frame adds the log's offset to the batch; the batch bytes inside are untouched.
//!
//! ```text
//! off  len  field
//!   0    4  magic "BHLF"
//!   4    8  base offset of the batch in this log (u64 LE)
//!  12    8  synced length: bytes of this segment known durable when the frame was written
//!  20    4  batch length N (u32 LE)
//!  24    4  CRC-32C of bytes 0..24
//!  28    N  the batch, exactly as encoded (it has its own header and body CRCs)
//! ```
//!
//! A batch occupies offsets `[base, base + record_count)`; a gap batch occupies the seqs it
//! covers, so on the edge offsets and seqs stay equal.
//!
//! Scanning keeps every frame whose three CRCs hold and whose offsets follow the previous
//! frame's. After a bad frame it resynchronises on the next frame magic whose frame and batch
//! check out: damage followed by good frames is skipped and reported; damage with no good frame
//! after it is a torn tail (recovery truncates it). The synced length tells the two kinds of
//! skipped damage apart: if no good frame after the damage was written once the damaged bytes
//! were known durable, a power cut may have torn them before any fsync covered them (a torn
//! write, normal under group commit); otherwise an fsync had covered them and they rotted
//! afterwards (corruption).

use bytes::BufMut;

use crate::batch::{Batch, BatchHeader, BatchLimits};
use crate::ids::Offset;

/// First four bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"BHLF";
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 28;

/// A frame found by a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// Byte position of the frame in the segment.
    pub pos: u64,
    /// Frame length, header included.
    pub len: u64,
    /// First offset of the batch.
    pub offset: Offset,
    /// Offsets the batch covers.
    pub count: u32,
    /// Event-time range of the batch.
    pub min_ts_ms: i64,
    /// Event-time range of the batch.
    pub max_ts_ms: i64,
    /// Bytes of the segment known durable when this frame was written.
    pub synced_len: u64,
}

impl FrameInfo {
    /// The offset after the batch.
    pub fn end(&self) -> Offset {
        Offset(self.offset.0 + u64::from(self.count))
    }
}

/// A damaged byte range inside a segment, with good frames after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Where the damage starts.
    pub pos: u64,
    /// How many bytes were skipped.
    pub len: u64,
    /// What was wrong with the first bad frame.
    pub reason: String,
    /// Whether an fsync is known to have covered the damaged bytes (see the module doc):
    /// `true` is corruption, `false` a write torn by power loss before its fsync.
    pub was_synced: bool,
}

/// What a scan of a segment's bytes found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Good frames, in file order, offsets increasing.
    pub frames: Vec<FrameInfo>,
    /// Damaged ranges followed by good frames.
    pub damage: Vec<Damage>,
    /// End of the last good frame; bytes after it are a torn tail.
    pub valid_len: u64,
    /// Why the torn tail (if any) did not parse.
    pub tail_reason: Option<String>,
}

/// Appends the frame of `batch` at `offset` to `out`.
pub fn encode_frame(offset: Offset, synced_len: u64, batch: &[u8], out: &mut impl BufMut) {
    out.put_slice(&frame_header(offset, synced_len, batch.len()));
    out.put_slice(batch);
}

/// The header of the frame of a `batch_len`-byte batch at `offset`; the batch's bytes follow it.
pub fn frame_header(offset: Offset, synced_len: u64, batch_len: usize) -> [u8; FRAME_HEADER_LEN] {
    let mut head = [0u8; FRAME_HEADER_LEN];
    head[..4].copy_from_slice(&FRAME_MAGIC);
    head[4..12].copy_from_slice(&offset.0.to_le_bytes());
    head[12..20].copy_from_slice(&synced_len.to_le_bytes());
    head[20..24].copy_from_slice(&(batch_len as u32).to_le_bytes());
    let crc = crc32c::crc32c(&head[..24]);
    head[24..28].copy_from_slice(&crc.to_le_bytes());
    head
}

/// Decodes the frame at the start of `buf`. `Ok(None)` if `buf` ends inside it.
pub fn decode_frame(buf: &[u8], limits: &BatchLimits) -> Result<Option<(Offset, BatchHeader, usize)>, String> {
    let magic_len = buf.len().min(4);
    if buf[..magic_len] != FRAME_MAGIC[..magic_len] {
        return Err("bad frame magic".into());
    }
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let stored = u32::from_le_bytes(buf[24..28].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[..24]) != stored {
        return Err("frame header CRC mismatch".into());
    }
    let offset = Offset(u64::from_le_bytes(buf[4..12].try_into().expect("8 bytes")));
    let batch_len = frame_batch_len(buf);
    let max = limits.body_bytes_max as usize + crate::batch::HEADER_LEN_MAX;
    if batch_len > max {
        return Err(format!("frame batch length {batch_len} above {max}"));
    }
    let Some(body) = buf.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + batch_len) else {
        return Ok(None);
    };
    match Batch::decode(body, limits) {
        Ok(Some((header, len))) if len == batch_len => {
            if offset.0.checked_add(u64::from(header.record_count)).is_none() {
                return Err("offset range overflows".into());
            }
            Ok(Some((offset, header, FRAME_HEADER_LEN + batch_len)))
        }
        Ok(Some((_, len))) => Err(format!("batch is {len} bytes, frame says {batch_len}")),
        Ok(None) => Err("batch shorter than its frame".into()),
        Err(e) => Err(format!("batch: {e}")),
    }
}

/// The batch length field of a frame header (`head` holds at least [`FRAME_HEADER_LEN`] bytes).
pub fn frame_batch_len(head: &[u8]) -> usize {
    u32::from_le_bytes(head[20..24].try_into().expect("4 bytes")) as usize
}

/// Scans a whole segment whose first offset is `base`.
pub fn scan(buf: &[u8], base: Offset, limits: &BatchLimits) -> Scan {
    let mut out = Scan::default();
    let mut pos = 0usize;
    let mut expected = base;
    while pos < buf.len() {
        match frame_at(buf, pos, expected, limits) {
            Ok(f) => {
                pos += f.len as usize;
                expected = f.end();
                out.valid_len = pos as u64;
                out.frames.push(f);
            }
            Err(reason) => match resync(buf, pos + 1, expected, limits) {
                Some(next) => {
                    out.damage.push(Damage { pos: pos as u64, len: (next - pos) as u64, reason, was_synced: false });
                    pos = next;
                }
                None => {
                    out.tail_reason = Some(reason);
                    break;
                }
            },
        }
    }
    for d in &mut out.damage {
        d.was_synced = out.frames.iter().any(|f| f.pos > d.pos && f.synced_len > d.pos);
    }
    out
}

/// The frame at `pos`, if whole, valid and at or after `expected`.
pub fn frame_at(buf: &[u8], pos: usize, expected: Offset, limits: &BatchLimits) -> Result<FrameInfo, String> {
    match decode_frame(&buf[pos..], limits)? {
        None => Err("frame runs past the end of the file".into()),
        Some((offset, _, _)) if offset < expected => {
            Err(format!("frame offset {offset} below the expected {expected}"))
        }
        Some((offset, header, len)) => Ok(FrameInfo {
            pos: pos as u64,
            len: len as u64,
            offset,
            count: header.record_count,
            min_ts_ms: header.min_ts_ms,
            max_ts_ms: header.max_ts_ms,
            synced_len: u64::from_le_bytes(buf[pos + 12..pos + 20].try_into().expect("8 bytes")),
        }),
    }
}

/// The position of the next good frame at or after `from`.
pub fn resync(buf: &[u8], from: usize, expected: Offset, limits: &BatchLimits) -> Option<usize> {
    let mut at = from;
    while at + 4 <= buf.len() {
        let found = buf[at..].windows(4).position(|w| w == FRAME_MAGIC)?;
        at += found;
        if frame_at(buf, at, expected, limits).is_ok() {
            return Some(at);
        }
        at += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchEncoder, BatchMeta, Compression, PayloadFormat, Record};
    use crate::ids::{Epoch, Seq};
    use bytes::{Bytes, BytesMut};

    fn batch(seq: u64, n: usize) -> Bytes {
        let meta = BatchMeta {
            producer: "e".into(),
            epoch: Epoch(1),
            stream: "s".into(),
            base_seq: Seq(seq),
            payload_format: PayloadFormat::Raw,
        };
        let recs: Vec<Record> = (0..n)
            .map(|i| Record { ts_ms: i as i64, topic: "t".into(), payload: vec![i as u8; 700].into(), attrs: vec![] })
            .collect();
        let mut out = BytesMut::new();
        BatchEncoder::new(Compression::None).unwrap().encode(&meta, &recs, &mut out).unwrap();
        out.freeze()
    }

    fn segment(batches: &[(u64, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(off, n) in batches {
            encode_frame(Offset(off), out.len() as u64, &batch(off, n), &mut out);
        }
        out
    }

    #[test]
    fn scan_finds_every_frame() {
        let seg = segment(&[(10, 2), (12, 3), (15, 1)]);
        let s = scan(&seg, Offset(10), &BatchLimits::default());
        assert_eq!(s.frames.iter().map(|f| (f.offset.0, f.count)).collect::<Vec<_>>(), vec![(10, 2), (12, 3), (15, 1)]);
        assert_eq!(s.valid_len, seg.len() as u64);
        assert!(s.damage.is_empty() && s.tail_reason.is_none());
    }

    #[test]
    fn recovery_truncates_torn_tail() {
        let seg = segment(&[(0, 2), (2, 3)]);
        let first_len = scan(&seg, Offset(0), &BatchLimits::default()).frames[0].len as usize;
        for cut in first_len + 1..seg.len() {
            let s = scan(&seg[..cut], Offset(0), &BatchLimits::default());
            assert_eq!(s.frames.len(), 1, "cut {cut}");
            assert_eq!(s.valid_len, first_len as u64);
            assert!(s.tail_reason.is_some() && s.damage.is_empty());
        }
    }

    #[test]
    fn zeroed_block_mid_segment_is_skipped_and_reported() {
        let mut seg = segment(&[(0, 2), (2, 3), (5, 1)]);
        let s0 = scan(&seg, Offset(0), &BatchLimits::default());
        let mid = &s0.frames[1];
        let start = mid.pos as usize + 100;
        seg[start..start + 512].fill(0);
        let s = scan(&seg, Offset(0), &BatchLimits::default());
        assert_eq!(s.frames.iter().map(|f| f.offset.0).collect::<Vec<_>>(), vec![0, 5]);
        assert_eq!(s.damage.len(), 1);
        assert_eq!(s.damage[0].pos, mid.pos);
        assert_eq!(s.valid_len, seg.len() as u64);
    }

    #[test]
    fn frames_going_backwards_are_damage() {
        let seg = segment(&[(0, 2), (1, 1), (2, 1)]);
        let s = scan(&seg, Offset(0), &BatchLimits::default());
        assert_eq!(s.frames.iter().map(|f| f.offset.0).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(s.damage.len(), 1);
    }
}
