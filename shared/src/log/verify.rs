//! `log verify`: a read-only check of a data directory's logs, for operators.
//!
//! It trusts nothing it can check: every segment is read whole and scanned with
//! [`segment::scan`]; indexes are never used to find batches, only compared with the scan. It
//! never writes, truncates or rebuilds anything, so it can run on a directory another process
//! is appending to (whose active segment may then show a torn tail mid-append).
//!
//! ```text
//! <data-dir>/streams/<stream>/{base:020}.log   segments (see [`segment`])
//! <data-dir>/streams/<stream>/{base:020}.idx   indexes of closed segments (see [`index`])
//! ```
//!
//! Corruption ([`ProblemKind::is_corruption`]): damage an fsync had covered, and offsets
//! missing between or inside segments. Benign: what power loss leaves in the last segment (a
//! torn tail, a torn unacknowledged write) and indexes that are missing, unusable or stale (the
//! log rebuilds them on open; an index of the right length that disagrees with its segment is
//! reported too, since the log would trust it).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::index::SegmentIndex;
use super::segment::{self, FRAME_HEADER_LEN, FrameInfo, Scan};
use super::storage::{self, Storage};
use super::{LogError, Problem, ProblemKind, SegmentSummary, parse_segment_file_name, segment_file_name};
use crate::batch::{BatchHeader, BatchLimits, is_valid_stream_name};
use crate::ids::Offset;

/// The folder of a data directory that holds one log directory per stream.
pub const STREAMS_DIR: &str = "streams";

/// Where the log of `stream` lives: `<data_dir>/streams/<stream>/`.
pub fn stream_dir(data_dir: &Path, stream: &str) -> PathBuf {
    data_dir.join(STREAMS_DIR).join(stream)
}

/// The streams of a data directory, sorted: the entries of `<data_dir>/streams/` that are valid
/// stream names. Fails if `data_dir` cannot be listed; no `streams/` yet means no streams.
pub fn list_streams(storage: &dyn Storage, data_dir: &Path) -> io::Result<Vec<String>> {
    storage.list_dir(data_dir)?;
    let mut names = match storage.list_dir(&data_dir.join(STREAMS_DIR)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r?,
    };
    names.retain(|n| is_valid_stream_name(n));
    names.sort();
    Ok(names)
}

/// What [`verify_stream`] found in one log directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamReport {
    /// The log directory.
    pub dir: PathBuf,
    /// Its segments, oldest first, as scanned (`end` after the last whole batch).
    pub segments: Vec<SegmentSummary>,
    /// Whole batches, gap batches included.
    pub batches: u64,
    /// Gap batches among them.
    pub gap_batches: u64,
    /// Records in the data batches.
    pub records: u64,
    /// Seqs the gap batches cover.
    pub gap_seqs: u64,
    /// Bytes of the segment files.
    pub bytes: u64,
    /// Everything wrong, in segment order, each with its file and byte position.
    pub problems: Vec<Problem>,
}

impl StreamReport {
    /// The offsets the log holds, `[first, next)`: from the first segment's base to the end of
    /// the last whole batch. `None` when the directory has no segment.
    pub fn range(&self) -> Option<(Offset, Offset)> {
        Some((self.segments.first()?.base, self.segments.last()?.end))
    }

    /// Whether any problem is corruption (as opposed to what power loss normally leaves).
    pub fn is_corrupt(&self) -> bool {
        self.problems.iter().any(|p| p.kind.is_corruption())
    }
}

/// Checks the log in `dir` without changing anything: scans every segment whole, checks each
/// closed segment's index against its scan and the offsets across segments. Problems found on
/// disk are in the report; `Err` only when a directory or segment cannot be read. Memory: one
/// segment at a time.
pub fn verify_stream(storage: Arc<dyn Storage>, dir: &Path, limits: BatchLimits) -> Result<StreamReport, LogError> {
    let names = storage.list_dir(dir).map_err(|source| LogError::Io { op: "list", path: dir.to_path_buf(), source })?;
    let mut bases: Vec<Offset> = names.iter().filter_map(|n| parse_segment_file_name(n)).collect();
    bases.sort();
    let mut report = StreamReport { dir: dir.to_path_buf(), ..StreamReport::default() };
    for (i, &base) in bases.iter().enumerate() {
        let last = i + 1 == bases.len();
        let Some(check) = check_segment(storage.as_ref(), dir, base, last, &limits)? else {
            continue;
        };
        if let Some(prev) = report.segments.last() {
            report.problems.extend(between_segments(prev, &check.summary));
        }
        report.batches += check.batches;
        report.gap_batches += check.gap_batches;
        report.records += check.records;
        report.gap_seqs += check.gap_seqs;
        report.bytes += check.summary.bytes;
        report.problems.extend(check.problems);
        report.segments.push(check.summary);
    }
    Ok(report)
}

// ---- helpers -------------------------------------------------------------------------------

const INDEX_ENTRY_LEN: u64 = super::index::ENTRY_LEN as u64;

/// What one segment holds and what is wrong with it.
#[derive(Debug)]
struct SegmentCheck {
    summary: SegmentSummary,
    batches: u64,
    gap_batches: u64,
    records: u64,
    gap_seqs: u64,
    problems: Vec<Problem>,
}

/// Scans the segment at `base`; `None` if it vanished since the listing (retention by the
/// log's owner).
fn check_segment(
    storage: &dyn Storage,
    dir: &Path,
    base: Offset,
    last: bool,
    limits: &BatchLimits,
) -> Result<Option<SegmentCheck>, LogError> {
    let path = dir.join(segment_file_name(base));
    let bytes = match storage::read_all(storage, &path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LogError::Io { op: "read", path, source }),
    };
    let scan = segment::scan(&bytes, base, limits);
    let ts_range = scan.frames.iter().fold(None, |r: Option<(i64, i64)>, f| match r {
        None => Some((f.min_ts_ms, f.max_ts_ms)),
        Some((lo, hi)) => Some((lo.min(f.min_ts_ms), hi.max(f.max_ts_ms))),
    });
    let end = scan.frames.last().map_or(base, FrameInfo::end);
    let summary = SegmentSummary { path: path.clone(), base, end, bytes: bytes.len() as u64, ts_range };
    let mut check = SegmentCheck { summary, batches: 0, gap_batches: 0, records: 0, gap_seqs: 0, problems: Vec::new() };
    for f in &scan.frames {
        check.batches += 1;
        if is_gap(&bytes, f, limits) {
            check.gap_batches += 1;
            check.gap_seqs += u64::from(f.count);
        } else {
            check.records += u64::from(f.count);
        }
    }
    let problem = |pos, kind, detail| Problem { file: path.clone(), pos, kind, detail };
    check.problems.extend(damage_problems(&scan, base, last).into_iter().map(|(pos, k, d)| problem(pos, k, d)));
    if let Some((pos, kind, detail)) = tail_problem(&scan, bytes.len() as u64, last) {
        check.problems.push(problem(pos, kind, detail));
    }
    if !last {
        // The active segment has no index yet; a closed one's must match it.
        check.problems.extend(check_index(storage, dir, base, bytes.len() as u64, &scan));
    }
    Ok(Some(check))
}

fn is_gap(bytes: &[u8], f: &FrameInfo, limits: &BatchLimits) -> bool {
    let batch = bytes.get(f.pos as usize + FRAME_HEADER_LEN..(f.pos + f.len) as usize).unwrap_or_default();
    matches!(BatchHeader::decode(batch, limits), Ok(Some(h)) if h.is_gap())
}

/// Damaged ranges, and offsets missing between frames that no damage explains.
fn damage_problems(scan: &Scan, base: Offset, last: bool) -> Vec<(u64, ProblemKind, String)> {
    let mut out = Vec::new();
    for d in &scan.damage {
        let before = scan.frames.iter().take_while(|f| f.pos < d.pos).last().map_or(base, FrameInfo::end);
        let after = scan.frames.iter().find(|f| f.pos > d.pos).map_or(before, |f| f.offset);
        let lost =
            if after > before { format!("offsets [{before}, {after}) unreadable") } else { "no offsets lost".into() };
        // A closed segment was fsynced whole before the next one opened: any damage in it
        // rotted after the fact. Only the last segment can hold writes a power cut tore.
        let kind = if d.was_synced || !last { ProblemKind::Damage } else { ProblemKind::TornWrite };
        out.push((d.pos, kind, format!("{} bytes skipped ({}); {lost}", d.len, d.reason)));
    }
    let mut expected = base;
    for f in &scan.frames {
        let after_damage = scan.damage.iter().any(|d| d.pos + d.len == f.pos);
        if f.offset > expected && !after_damage {
            out.push((
                f.pos,
                ProblemKind::OffsetHole,
                format!("offsets [{expected}, {}) missing before this batch", f.offset),
            ));
        }
        expected = f.end();
    }
    out
}

/// Bytes after the last whole batch: a torn tail in the last segment, damage in a closed one.
fn tail_problem(scan: &Scan, len: u64, last: bool) -> Option<(u64, ProblemKind, String)> {
    let torn = len.checked_sub(scan.valid_len).filter(|&n| n > 0)?;
    let reason = scan.tail_reason.as_deref().unwrap_or("unreadable");
    Some(if last {
        let detail = format!("{torn} bytes after the last whole batch ({reason}); the log truncates them on open");
        (scan.valid_len, ProblemKind::TornTail, detail)
    } else {
        let detail = format!("{torn} bytes at the end of a closed segment unreadable ({reason})");
        (scan.valid_len, ProblemKind::Damage, detail)
    })
}

/// Offsets missing or repeated between two consecutive segments.
fn between_segments(prev: &SegmentSummary, next: &SegmentSummary) -> Option<Problem> {
    let detail = if next.base > prev.end {
        format!("offsets [{}, {}) missing before this segment", prev.end, next.base)
    } else if next.base < prev.end {
        format!("segment starts at offset {}, inside the previous one's [{}, {})", next.base, prev.base, prev.end)
    } else {
        return None;
    };
    Some(Problem { file: next.path.clone(), pos: 0, kind: ProblemKind::OffsetHole, detail })
}

/// Whether the closed segment at `base` has an index the log can use, and that tells the truth.
fn check_index(storage: &dyn Storage, dir: &Path, base: Offset, seg_len: u64, scan: &Scan) -> Option<Problem> {
    let path = dir.join(super::index_file_name(base));
    let problem = |pos, detail| Some(Problem { file: path.clone(), pos, kind: ProblemKind::IndexRebuilt, detail });
    let bytes = match storage::read_all(storage, &path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return problem(0, "index missing; the log rebuilds it on open".into());
        }
        Err(e) => return problem(0, format!("index unreadable ({e}); the log rebuilds it on open")),
    };
    let idx = match SegmentIndex::decode(&bytes, base) {
        Ok(idx) => idx,
        Err(why) => return problem(0, format!("index unusable ({why}); the log rebuilds it on open")),
    };
    let trailer = idx.entries.len() as u64 * INDEX_ENTRY_LEN;
    if idx.segment_len != seg_len {
        let detail =
            format!("index covers {} bytes, segment has {seg_len}; the log rebuilds it on open", idx.segment_len);
        return problem(trailer, detail);
    }
    let (pos, what) = index_disagreement(&idx, scan, base, trailer)?;
    // The log trusts an index whose length matches, so this one would mislead reads.
    problem(pos, format!("index disagrees with its segment: {what}; remove it to have the log rebuild it"))
}

/// The first thing `idx` says that the scan does not, with its position in the index file.
fn index_disagreement(idx: &SegmentIndex, scan: &Scan, base: Offset, trailer: u64) -> Option<(u64, String)> {
    for (i, e) in idx.entries.iter().enumerate() {
        let frame = scan.frames.binary_search_by_key(&e.pos, |f| f.pos).ok().map(|j| &scan.frames[j]);
        if frame.is_none_or(|f| f.offset != e.offset) {
            let what = format!("entry {i} puts offset {} at byte {}, where no such batch starts", e.offset, e.pos);
            return Some((i as u64 * INDEX_ENTRY_LEN, what));
        }
    }
    let end = scan.frames.last().map_or(base, FrameInfo::end);
    if idx.end != end {
        return Some((trailer, format!("it ends at offset {}, the batches at {end}", idx.end)));
    }
    let ts_range = scan.frames.iter().fold(None, |r: Option<(i64, i64)>, f| match r {
        None => Some((f.min_ts_ms, f.max_ts_ms)),
        Some((lo, hi)) => Some((lo.min(f.min_ts_ms), hi.max(f.max_ts_ms))),
    });
    if idx.ts_range != ts_range {
        return Some((trailer, format!("event times {:?}, the batches' {ts_range:?}", idx.ts_range)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Batch, BatchEncoder, BatchMeta, Compression, GapReason, PayloadFormat, Record, encode_gap};
    use crate::ids::{Epoch, Seq};
    use crate::log::sim::SimStorage;
    use crate::log::{FsyncPolicy, Log, LogConfig};
    use bytes::BytesMut;

    const DIR: &str = "/data/streams/cdr";

    fn meta(seq: u64) -> BatchMeta {
        BatchMeta {
            producer: "edge-1".into(),
            epoch: Epoch(7),
            stream: "cdr".into(),
            base_seq: Seq(seq),
            payload_format: PayloadFormat::Raw,
        }
    }

    fn batch(seq: u64, n: usize) -> Batch {
        let recs: Vec<Record> = (0..n)
            .map(|i| Record {
                ts_ms: 1_000 + (seq + i as u64) as i64,
                topic: "cdr/site-1".into(),
                payload: vec![b'a' + (i % 26) as u8; 300].into(),
                attrs: vec![],
            })
            .collect();
        let mut out = BytesMut::new();
        BatchEncoder::new(Compression::None).unwrap().encode(&meta(seq), &recs, &mut out).unwrap();
        Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap()
    }

    fn gap(seq: u64, n: u32) -> Batch {
        let mut out = BytesMut::new();
        encode_gap(&meta(seq), n, GapReason::DiskFullDropOldest, (1_000, 1_001), &mut out).unwrap();
        Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap()
    }

    fn config() -> LogConfig {
        LogConfig { segment_bytes_max: 4096, fsync: FsyncPolicy::Always, ..LogConfig::default() }
    }

    /// Twelve batches of three records, a gap of five seqs after the sixth: 41 offsets,
    /// several segments.
    fn write_log(sim: &SimStorage) -> Log {
        let mut log = Log::open(Arc::new(sim.clone()), Path::new(DIR), config(), 0).unwrap();
        for i in 0..12 {
            let b = batch(log.next_offset().0, 3);
            log.append(&b, 0).unwrap();
            if i == 5 {
                log.append(&gap(log.next_offset().0, 5), 0).unwrap();
            }
        }
        log
    }

    fn verify(sim: &SimStorage) -> StreamReport {
        verify_stream(Arc::new(sim.clone()), Path::new(DIR), BatchLimits::default()).unwrap()
    }

    fn kinds(r: &StreamReport) -> Vec<ProblemKind> {
        r.problems.iter().map(|p| p.kind).collect()
    }

    fn scan_of(sim: &SimStorage, path: &Path, base: Offset) -> Scan {
        segment::scan(&storage::read_all(sim, path).unwrap(), base, &BatchLimits::default())
    }

    #[test]
    fn clean_log_reports_counts_and_range() {
        let sim = SimStorage::new();
        let log = write_log(&sim);
        let r = verify(&sim);
        assert_eq!(r.problems, vec![]);
        assert!(r.segments.len() >= 3, "{} segments", r.segments.len());
        assert_eq!(r.segments, log.segments());
        assert_eq!((r.batches, r.gap_batches, r.records, r.gap_seqs), (13, 1, 36, 5));
        assert_eq!(r.range(), Some((Offset(0), Offset(41))));
        assert_eq!(r.bytes, log.segments().iter().map(|s| s.bytes).sum::<u64>());
        assert!(!r.is_corrupt());
    }

    #[test]
    fn empty_directory_has_no_range() {
        let sim = SimStorage::new();
        sim.create_dir_all(Path::new(DIR)).unwrap();
        let r = verify(&sim);
        assert_eq!((r.range(), r.problems.len()), (None, 0));
    }

    #[test]
    fn zeroed_block_in_closed_segment_is_corruption_with_position() {
        let sim = SimStorage::new();
        let seg = write_log(&sim).segments()[1].clone();
        let before = scan_of(&sim, &seg.path, seg.base);
        let hit = &before.frames[1];
        let start = hit.pos as usize + 40;
        sim.corrupt(&seg.path, |b| b[start..start + 512].fill(0)).unwrap();

        let r = verify(&sim);
        assert!(r.is_corrupt());
        // The sparse index has no entry inside the damage, so it still agrees.
        assert_eq!(kinds(&r), vec![ProblemKind::Damage]);
        let damage = &r.problems[0];
        assert_eq!((damage.file.as_path(), damage.pos), (seg.path.as_path(), hit.pos));
        assert!(damage.detail.contains(&format!("offsets [{}, ", hit.offset)), "{}", damage.detail);
        assert_eq!(r.batches, 13 - 1);
        assert_eq!(r.range(), Some((Offset(0), Offset(41))));
    }

    #[test]
    fn torn_tail_of_last_segment_is_benign_and_left_alone() {
        let sim = SimStorage::new();
        let seg = write_log(&sim).segments().last().unwrap().clone();
        sim.corrupt(&seg.path, |b| b.truncate(b.len() - 10)).unwrap();
        let len = storage::read_all(&sim, &seg.path).unwrap().len();

        let r = verify(&sim);
        assert_eq!(kinds(&r), vec![ProblemKind::TornTail]);
        assert!(!r.is_corrupt());
        assert!(r.range().unwrap().1 < Offset(41));
        assert_eq!(storage::read_all(&sim, &seg.path).unwrap().len(), len, "verify must not truncate");
    }

    #[test]
    fn damage_at_end_of_closed_segment_is_corruption_and_a_hole() {
        let sim = SimStorage::new();
        let seg = write_log(&sim).segments()[0].clone();
        sim.corrupt(&seg.path, |b| {
            let n = b.len();
            b[n - 8..].fill(0xee);
        })
        .unwrap();
        let r = verify(&sim);
        assert!(r.is_corrupt());
        assert_eq!(kinds(&r), vec![ProblemKind::Damage, ProblemKind::IndexRebuilt, ProblemKind::OffsetHole]);
        assert_eq!(r.problems[2].file, r.segments[1].path);
    }

    #[test]
    fn missing_segment_is_an_offset_hole() {
        let sim = SimStorage::new();
        let segs = write_log(&sim).segments();
        sim.remove_file(&segs[1].path).unwrap();
        let r = verify(&sim);
        assert_eq!(kinds(&r), vec![ProblemKind::OffsetHole]);
        let hole = &r.problems[0];
        assert_eq!((&hole.file, hole.pos), (&segs[2].path, 0));
        assert!(hole.detail.contains(&format!("[{}, {})", segs[1].base, segs[2].base)), "{}", hole.detail);
        assert!(r.is_corrupt());
    }

    #[test]
    fn missing_or_wrong_index_is_benign() {
        let sim = SimStorage::new();
        let segs = write_log(&sim).segments();
        let idx = |s: &SegmentSummary| s.path.with_extension("idx");
        sim.remove_file(&idx(&segs[0])).unwrap();
        sim.corrupt(&idx(&segs[1]), |b| b[0] ^= 1).unwrap();
        let r = verify(&sim);
        assert_eq!(kinds(&r), vec![ProblemKind::IndexRebuilt; 2]);
        assert_eq!(r.problems[0].file, idx(&segs[0]));
        assert!(r.problems[0].detail.contains("missing"));
        assert!(r.problems[1].detail.contains("CRC"), "{}", r.problems[1].detail);
        assert!(!r.is_corrupt());
        assert!(sim.open_read(&idx(&segs[0])).is_err(), "verify must not rebuild indexes");
    }

    #[test]
    fn index_that_disagrees_but_has_the_right_length_is_reported() {
        let sim = SimStorage::new();
        let segs = write_log(&sim).segments();
        let path = segs[0].path.with_extension("idx");
        let mut idx = SegmentIndex::decode(&storage::read_all(&sim, &path).unwrap(), segs[0].base).unwrap();
        idx.end = Offset(idx.end.0 + 1);
        sim.corrupt(&path, |b| *b = idx.encode()).unwrap();
        let r = verify(&sim);
        assert_eq!(kinds(&r), vec![ProblemKind::IndexRebuilt]);
        assert_eq!(r.problems[0].pos, idx.entries.len() as u64 * INDEX_ENTRY_LEN);
        assert!(r.problems[0].detail.contains("ends at offset"), "{}", r.problems[0].detail);
    }

    #[test]
    fn verify_agrees_with_recovery_after_power_loss() {
        let mut torn = 0;
        for seed in 0..40 {
            let sim = SimStorage::new();
            let mut log = Log::open(
                Arc::new(sim.clone()),
                Path::new(DIR),
                LogConfig { fsync: FsyncPolicy::Interval { interval_ms: 5 }, ..config() },
                0,
            )
            .unwrap();
            for i in 0..20 {
                log.append(&batch(log.next_offset().0, 2), 0).unwrap();
                if i % 7 == 0 {
                    log.sync().unwrap();
                }
            }
            drop(log);
            sim.crash(seed);
            let r = verify(&sim);
            assert!(!r.is_corrupt(), "seed {seed}: {:?}", r.problems);
            torn += usize::from(
                r.problems.iter().any(|p| matches!(p.kind, ProblemKind::TornTail | ProblemKind::TornWrite)),
            );
            let reopened = Log::open(Arc::new(sim.clone()), Path::new(DIR), config(), 0).unwrap();
            assert_eq!(r.range().map(|(_, next)| next), Some(reopened.next_offset()), "seed {seed}");
        }
        assert!(torn > 0, "no crash tore anything");
    }

    #[test]
    fn list_streams_finds_stream_directories_only() {
        let sim = SimStorage::new();
        let data = Path::new("/data");
        sim.create_dir_all(data).unwrap();
        assert_eq!(list_streams(&sim, data).unwrap(), Vec::<String>::new());
        for s in ["sensors", "cdr", "Not_A_Stream"] {
            sim.create_dir_all(&stream_dir(data, s)).unwrap();
        }
        assert_eq!(list_streams(&sim, data).unwrap(), vec!["cdr", "sensors"]);
        assert_eq!(stream_dir(data, "cdr"), Path::new(DIR));
        let err = list_streams(&sim, Path::new("/nowhere")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
