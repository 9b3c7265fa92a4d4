//! The segmented log, shared by edge and core: one directory per stream (core: per partition).
//!
//! Invariants:
//! - Batches are appended whole, at increasing offsets; a batch occupies `record_count`
//!   offsets. Offsets never go back and are never reused, even after retention.
//! - [`Log::durable_offset`]: everything below it was fsynced. [`Log::committed_offset`] is what
//!   may be acknowledged and read: the durable offset, or the end of the log under
//!   [`FsyncPolicy::Never`]. Readers never see data that a power cut could take back.
//! - Segment files are created, then the directory is fsynced, before anything in them counts.
//!   A segment is fsynced before the next one is opened, so only the last segment can have a
//!   torn tail; recovery truncates it and keeps every whole batch.
//! - An fsync error poisons the log: nothing after the last good fsync is acknowledged, the
//!   fsync is never retried, and the owner reopens the log (which runs recovery).
//! - A write error (disk full) cuts the partial frame off again and is retryable; if that cut
//!   fails too, the log is poisoned.
//! - Damage in the middle of a segment is skipped, counted and reported with file and position;
//!   the batches after it stay readable.
//!
//! Files: `{base:020}.log` (frames, see [`segment`]) and `{base:020}.idx` (see [`index`]),
//! written when the segment closes and rebuilt whenever missing or wrong.

pub mod direct;
pub mod index;
pub mod segment;
pub mod sim;
pub mod storage;
pub mod tool;
pub mod verify;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use crate::batch::{Batch, BatchHeader, BatchLimits, BatchParts};
use crate::ids::Offset;
use index::{IndexEntry, SegmentIndex};
use segment::{FRAME_HEADER_LEN, FrameInfo};
use storage::{AppendFile, ReadFile, Storage, read_full_at};

/// When appends are fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every append is fsynced before it returns.
    Always,
    /// Group commit: the owner calls [`Log::sync`] every `interval_ms`; appends are committed
    /// (and may be acked) only once the sync that covers them has returned.
    Interval {
        /// How often the owner syncs.
        interval_ms: u64,
    },
    /// Never fsync on append; appends are committed at once. Refused for streams whose full
    /// policy is `backpressure` (their acks would promise what the disk does not hold).
    Never,
}

/// How much a log keeps. Released segments go regardless; these bounds also remove data that
/// was never released (an explicit loss policy, for logs that are not store-and-forward).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many bytes of segments (the active one always stays).
    pub bytes_max: Option<u64>,
    /// Remove segments whose newest event is older than this.
    pub age_ms: Option<u64>,
}

/// Settings of one log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Roll to a new segment past this size.
    pub segment_bytes_max: u64,
    /// Roll to a new segment when the active one has been open this long (0: never).
    pub segment_age_ms: u64,
    /// Bytes of frames between two sparse index entries.
    pub index_interval_bytes: u64,
    /// When appends are fsynced.
    pub fsync: FsyncPolicy,
    /// What retention removes.
    pub retention: Retention,
    /// Bounds on the batches the log reads back.
    pub batch_limits: BatchLimits,
    /// First offset of a log created empty.
    pub initial_offset: Offset,
    /// Open without changing anything on disk (no truncation, no index writes): for
    /// `log verify` and `log dump` on a directory another process may own.
    pub read_only: bool,
    /// Append to the active segment with direct IO ([`storage::Storage::open_append_direct`]):
    /// on ext4 it costs a third to a fifth of the kernel CPU per byte of buffered writes and
    /// `fdatasync` when syncs cover ~1 MB (`benches/log_direct.rs`). Appends then reach the
    /// file at [`Log::sync`], so it applies only under `Always` and `Interval`; under
    /// [`FsyncPolicy::Never`] appends are readable at once and must be in the file at once, so
    /// the log appends through the page cache.
    pub direct_io: bool,
}

impl Default for LogConfig {
    /// 64 MiB segments bound recovery's scan and retention's granularity; an index entry per
    /// 4 KiB keeps a seek under one page of scanning; group commit every 5 ms amortises the
    /// ~1.7 ms fsync measured on these machines.
    fn default() -> Self {
        Self {
            segment_bytes_max: 64 << 20,
            segment_age_ms: 3_600_000,
            index_interval_bytes: 4096,
            fsync: FsyncPolicy::Interval { interval_ms: 5 },
            retention: Retention::default(),
            batch_limits: BatchLimits::default(),
            initial_offset: Offset(0),
            read_only: false,
            // Off unless the owner asks: the edge's small devices run with `Never` or on file
            // systems where the page cache is the cheaper path.
            direct_io: false,
        }
    }
}

/// Where an appended batch landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The batch's first offset.
    pub offset: Offset,
    /// The offset after it.
    pub end: Offset,
}

/// A batch read back, with its offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogBatch {
    /// First offset of the batch in this log.
    pub offset: Offset,
    /// The batch, bytes as appended.
    pub batch: Batch,
}

impl LogBatch {
    /// The offset after this batch.
    pub fn end(&self) -> Offset {
        Offset(self.offset.0 + u64::from(self.batch.header().record_count))
    }
}

/// What one [`Log::read`] returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadBatches {
    /// Batches in offset order; the first may start below the offset asked for.
    pub batches: Vec<LogBatch>,
    /// Where the next read should start.
    pub next: Offset,
    /// Damage met on the way (skipped; also kept in [`Log::problems`]).
    pub damage: Vec<Problem>,
}

/// Something wrong found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// Byte position in it.
    pub pos: u64,
    /// What kind of problem.
    pub kind: ProblemKind,
    /// Details for a person.
    pub detail: String,
}

/// Kinds of [`Problem`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// A torn tail after the last whole batch (normal after power loss); truncated on open.
    TornTail,
    /// Damaged bytes with good batches after them, which an fsync had covered: skipped.
    /// This is corruption.
    Damage,
    /// Damaged bytes with good batches after them that no fsync is known to have covered: a
    /// group of unacknowledged writes torn by power loss. Skipped; the offsets are a hole
    /// nobody was promised.
    TornWrite,
    /// An index file missing or unusable; rebuilt.
    IndexRebuilt,
    /// Offsets missing between two segments or around damage.
    OffsetHole,
}

impl ProblemKind {
    /// Whether this kind means data was lost to corruption (as opposed to a normal recovery).
    pub fn is_corruption(self) -> bool {
        matches!(self, ProblemKind::Damage | ProblemKind::OffsetHole)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}: {:?}: {}", self.file.display(), self.pos, self.kind, self.detail)
    }
}

/// A segment as reported to owners and tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Segment file.
    pub path: PathBuf,
    /// First offset.
    pub base: Offset,
    /// Offset after the last batch.
    pub end: Offset,
    /// Bytes of the segment file.
    pub bytes: u64,
    /// Event-time range.
    pub ts_range: Option<(i64, i64)>,
}

/// Errors of the log.
#[derive(Debug, Error)]
pub enum LogError {
    /// An I/O operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What the log was doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// An earlier fsync or write failed; reopen the log.
    #[error("log {} is poisoned ({reason}); reopen it to recover", dir.display())]
    Poisoned {
        /// Log directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Asked for an offset the log no longer (or not yet) holds.
    #[error("offset {requested} outside the log's [{start}, {end})")]
    OffsetOutOfRange {
        /// Asked for.
        requested: Offset,
        /// First offset held.
        start: Offset,
        /// Next offset.
        end: Offset,
    },
    /// A batch does not fit this log (size, or it would move offsets backwards).
    #[error("batch refused: {0}")]
    BatchRefused(String),
    /// The log was opened read-only.
    #[error("log {} is open read-only", .0.display())]
    ReadOnly(PathBuf),
}

impl LogError {
    /// Whether the same call may succeed later without reopening (a full disk).
    pub fn is_retryable(&self) -> bool {
        matches!(self, LogError::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull)
    }
}

/// File name of the segment starting at `base`.
pub fn segment_file_name(base: Offset) -> String {
    format!("{:020}.log", base.0)
}

/// File name of the index of the segment starting at `base`.
pub fn index_file_name(base: Offset) -> String {
    format!("{:020}.idx", base.0)
}

/// The first offset of a segment named `name`, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<Offset> {
    let digits = name.strip_suffix(".log")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok().map(Offset))?
}

#[derive(Debug)]
struct Segment {
    base: Offset,
    end: Offset,
    len: u64,
    ts_range: Option<(i64, i64)>,
    entries: Vec<IndexEntry>,
    /// Frame bytes appended since the last index entry.
    since_index: u64,
    /// Bytes of the segment known durable (maintained for the active segment).
    synced_len: u64,
    reader: Option<Box<dyn ReadFile>>,
}

impl Segment {
    fn empty(base: Offset) -> Self {
        Segment {
            base,
            end: base,
            len: 0,
            ts_range: None,
            entries: Vec::new(),
            since_index: 0,
            synced_len: 0,
            reader: None,
        }
    }

    fn from_scan(base: Offset, frames: &[FrameInfo], len: u64, interval: u64) -> Self {
        let mut s = Segment::empty(base);
        for f in frames {
            s.note_frame(f, interval);
        }
        s.len = len;
        s.synced_len = len;
        s
    }

    fn from_index(base: Offset, idx: SegmentIndex) -> Self {
        Segment {
            base,
            end: idx.end,
            len: idx.segment_len,
            ts_range: idx.ts_range,
            entries: idx.entries,
            since_index: 0,
            synced_len: idx.segment_len,
            reader: None,
        }
    }

    fn note_frame(&mut self, f: &FrameInfo, interval: u64) {
        let (lo, hi) = match self.ts_range {
            None => (f.min_ts_ms, f.max_ts_ms),
            Some((lo, hi)) => (lo.min(f.min_ts_ms), hi.max(f.max_ts_ms)),
        };
        self.ts_range = Some((lo, hi));
        if self.entries.is_empty() || self.since_index >= interval {
            self.entries.push(IndexEntry { offset: f.offset, pos: f.pos, max_ts_ms: hi });
            self.since_index = 0;
        }
        self.since_index += f.len;
        self.end = f.end();
        self.len = f.pos + f.len;
    }

    fn index(&self) -> SegmentIndex {
        SegmentIndex { entries: self.entries.clone(), segment_len: self.len, end: self.end, ts_range: self.ts_range }
    }

    fn summary(&self, dir: &Path) -> SegmentSummary {
        SegmentSummary {
            path: dir.join(segment_file_name(self.base)),
            base: self.base,
            end: self.end,
            bytes: self.len,
            ts_range: self.ts_range,
        }
    }

    fn index_bytes(&self) -> u64 {
        self.entries.len() as u64 * 24 + 44
    }
}

/// One log: a directory of segments.
#[derive(Debug)]
pub struct Log {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    config: LogConfig,
    /// Oldest first; the last one is the active segment.
    segments: Vec<Segment>,
    active: Option<Box<dyn AppendFile>>,
    active_opened_ms: i64,
    durable: Offset,
    released: Offset,
    poisoned: Option<String>,
    problems: Vec<Problem>,
}

impl Log {
    /// Opens (or creates) the log in `dir`, running recovery: rebuilds missing or wrong
    /// indexes, truncates a torn tail, and reports damage in [`Log::problems`].
    pub fn open(storage: Arc<dyn Storage>, dir: &Path, config: LogConfig, now_ms: i64) -> Result<Log, LogError> {
        let io_err = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| LogError::Io { op, path, source }
        };
        if !config.read_only {
            storage.create_dir_all(dir).map_err(io_err("create directory", dir))?;
        }
        let names = match storage.list_dir(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && config.read_only => Vec::new(),
            r => r.map_err(io_err("list", dir))?,
        };
        let mut bases: Vec<Offset> = names.iter().filter_map(|n| parse_segment_file_name(n)).collect();
        bases.sort();
        let mut log = Log {
            storage,
            dir: dir.to_path_buf(),
            config,
            segments: Vec::new(),
            active: None,
            active_opened_ms: now_ms,
            durable: config.initial_offset,
            released: Offset(0),
            poisoned: None,
            problems: Vec::new(),
        };
        if !config.read_only {
            log.remove_stray_files(&names, &bases)?;
        }
        let count = bases.len();
        for (i, base) in bases.into_iter().enumerate() {
            let last = i + 1 == count;
            let seg = log.load_segment(base, last)?;
            if let Some(prev) = log.segments.last()
                && seg.base > prev.end
            {
                let detail = format!("offsets [{}, {}) missing before this segment", prev.end, seg.base);
                log.problem(base, 0, ProblemKind::OffsetHole, detail);
            }
            log.segments.push(seg);
        }
        if log.segments.is_empty() {
            log.segments.push(Segment::empty(config.initial_offset));
            if config.read_only {
                log.durable = config.initial_offset;
                return Ok(log);
            }
        }
        if !config.read_only {
            let base = log.active_segment().base;
            let path = log.segment_path(base);
            let mut file = log.open_active(&path).map_err(io_err("open", &path))?;
            // Whatever recovery kept (and the file's own existence) becomes durable now.
            file.sync().map_err(io_err("fsync", &path))?;
            log.storage.sync_dir(&log.dir).map_err(io_err("fsync directory", dir))?;
            log.active = Some(file);
        }
        log.durable = log.next_offset();
        let torn_active = log
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::TornWrite && p.file == log.segment_path(log.active_segment().base));
        if torn_active && !config.read_only {
            // Frames appended after a torn write would vouch (by their synced length) for the
            // torn bytes, turning them into "corruption" at the next open: close the segment.
            log.roll(now_ms)?;
        }
        Ok(log)
    }

    /// Appends `batch`. Under [`FsyncPolicy::Always`] it is durable when this returns;
    /// otherwise it is committed by the next [`Log::sync`] (or at once under `Never`).
    pub fn append(&mut self, batch: &Batch, now_ms: i64) -> Result<Appended, LogError> {
        self.append_pieces(batch.header(), std::slice::from_ref(batch.bytes()), now_ms)
    }

    /// [`Log::append`] of a batch in pieces: they are written as they are, never joined.
    pub fn append_parts(&mut self, batch: &BatchParts, now_ms: i64) -> Result<Appended, LogError> {
        self.append_pieces(batch.header(), batch.pieces(), now_ms)
    }

    fn append_pieces(&mut self, h: &BatchHeader, pieces: &[Bytes], now_ms: i64) -> Result<Appended, LogError> {
        self.check_writable()?;
        let len: usize = pieces.iter().map(Bytes::len).sum();
        let frame_len = (FRAME_HEADER_LEN + len) as u64;
        if len > self.config.batch_limits.body_bytes_max as usize + crate::batch::HEADER_LEN_MAX {
            return Err(LogError::BatchRefused(format!("{len} bytes is above the log's batch bound")));
        }
        let offset = self.next_offset();
        if offset.0.checked_add(u64::from(h.record_count)).is_none() {
            return Err(LogError::BatchRefused("offsets would overflow".into()));
        }
        self.maybe_roll(frame_len, now_ms)?;

        let seg = self.segments.last().expect("a log always has an active segment");
        let synced_len = if self.durable >= seg.end { seg.len } else { seg.synced_len };
        let head = segment::frame_header(offset, synced_len, len);
        let (pos, base) = (seg.len, seg.base);
        let file = self.active.as_mut().expect("writable log has an active file");
        let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + pieces.len());
        parts.push(&head);
        parts.extend(pieces.iter().map(|p| &p[..]));
        if let Err(source) = file.append_parts(&parts) {
            // Cut the partial frame off so no torn bytes sit before later frames.
            if let Err(e) = file.truncate(pos) {
                self.poisoned = Some(format!("write failed ({source}) and truncating it back failed ({e})"));
            }
            return Err(LogError::Io { op: "append to", path: self.segment_path(base), source });
        }
        let info = FrameInfo {
            pos,
            len: frame_len,
            offset,
            count: h.record_count,
            min_ts_ms: h.min_ts_ms,
            max_ts_ms: h.max_ts_ms,
            synced_len,
        };
        let interval = self.config.index_interval_bytes;
        self.segments.last_mut().expect("active segment").note_frame(&info, interval);
        if self.config.fsync == FsyncPolicy::Always {
            self.sync()?;
        }
        Ok(Appended { offset, end: info.end() })
    }

    /// Fsyncs what was appended; returns the new durable offset. A failure poisons the log.
    pub fn sync(&mut self) -> Result<Offset, LogError> {
        self.sync_active(false)
    }

    /// [`Log::sync`]; when `closing`, the file also at its exact length
    /// ([`AppendFile::finish`]: direct IO's padding cut), even if nothing awaits a sync.
    fn sync_active(&mut self, closing: bool) -> Result<Offset, LogError> {
        self.check_writable()?;
        let next = self.next_offset();
        if self.durable == next && !closing {
            return Ok(next);
        }
        let path = self.segment_path(self.active_segment().base);
        let file = self.active.as_mut().expect("writable log has an active file");
        if let Err(source) = if closing { file.finish() } else { file.sync() } {
            self.poisoned = Some(format!("fsync failed: {source}"));
            return Err(LogError::Io { op: "fsync", path, source });
        }
        self.durable = next;
        let seg = self.segments.last_mut().expect("active segment");
        seg.synced_len = seg.len;
        Ok(next)
    }

    /// Whether appended data waits for a [`Log::sync`].
    pub fn needs_sync(&self) -> bool {
        self.durable < self.next_offset()
    }

    /// Reads whole batches from `from` up to about `bytes_max` bytes (at least one batch if
    /// any is committed), below the committed offset. Damage is skipped and reported.
    pub fn read(&mut self, from: Offset, bytes_max: usize) -> Result<ReadBatches, LogError> {
        let (start, committed) = (self.start_offset(), self.committed_offset());
        if from < start || from > self.next_offset() {
            return Err(LogError::OffsetOutOfRange { requested: from, start, end: self.next_offset() });
        }
        let mut out = ReadBatches { next: from, ..ReadBatches::default() };
        let mut taken = 0usize;
        let first = self.segments.partition_point(|s| s.end <= from);
        for si in first..self.segments.len() {
            if out.next >= committed || (taken >= bytes_max && !out.batches.is_empty()) {
                break;
            }
            let exhausted = self.read_segment(si, committed, bytes_max, &mut taken, &mut out)?;
            match self.segments.get(si + 1) {
                Some(next) if exhausted => out.next = out.next.max(next.base),
                _ => break,
            }
        }
        out.next = out.next.min(committed).max(from);
        Ok(out)
    }

    /// The first offset of the first batch whose newest event is at or after `ts_ms`;
    /// `None` if there is none among the committed batches.
    pub fn offset_for_time(&mut self, ts_ms: i64) -> Result<Option<Offset>, LogError> {
        let committed = self.committed_offset();
        let Some(si) = self.segments.iter().position(|s| s.ts_range.is_some_and(|(_, hi)| hi >= ts_ms)) else {
            return Ok(None);
        };
        let mut pos = index::pos_for_time(&self.segments[si].entries, ts_ms);
        let seg_len = self.readable_len(si);
        while pos < seg_len {
            let Some((offset, batch)) = self.read_frame(si, pos)? else { break };
            if offset >= committed {
                return Ok(None);
            }
            if batch.header().max_ts_ms >= ts_ms {
                return Ok(Some(offset));
            }
            pos += (FRAME_HEADER_LEN + batch.bytes().len()) as u64;
        }
        Ok(None)
    }

    /// Store-and-forward: everything below `offset` may go (forwarded and acknowledged).
    /// Segments wholly below it are removed by the next [`Log::apply_retention`].
    pub fn release_below(&mut self, offset: Offset) {
        self.released = self.released.max(offset);
    }

    /// Removes closed segments that are released, or beyond the retention bounds. Returns
    /// what it removed, oldest first.
    pub fn apply_retention(&mut self, now_ms: i64) -> Result<Vec<SegmentSummary>, LogError> {
        self.check_writable()?;
        let mut removed = Vec::new();
        while self.segments.len() > 1 {
            let seg = &self.segments[0];
            let released = seg.end <= self.released;
            let over_bytes = self.config.retention.bytes_max.is_some_and(|max| self.disk_bytes() > max);
            let too_old = match (self.config.retention.age_ms, seg.ts_range) {
                (Some(age), Some((_, newest))) => now_ms.saturating_sub(newest) > age as i64,
                _ => false,
            };
            if !(released || over_bytes || too_old) {
                break;
            }
            removed.push(self.remove_first_segment()?);
        }
        if !removed.is_empty() {
            self.sync_dir()?;
        }
        Ok(removed)
    }

    /// Removes the oldest closed segment whatever its state (the `drop_oldest` full policy;
    /// the owner writes its gap batch first). `None` if only the active segment is left.
    pub fn remove_oldest_segment(&mut self) -> Result<Option<SegmentSummary>, LogError> {
        self.check_writable()?;
        if self.segments.len() < 2 {
            return Ok(None);
        }
        let removed = self.remove_first_segment()?;
        self.sync_dir()?;
        Ok(Some(removed))
    }

    /// The `drop_oldest` full policy without a silent gap: atomically replaces the closed
    /// segment starting at `base` with one holding only `gap`, a gap batch covering exactly
    /// the segment's offsets (on the edge, its seqs). The gap is fsynced before the data goes
    /// (temp file, fsync, rename, directory fsync), so a crash leaves either the data or the
    /// gap, never neither. Returns the segment as it was.
    pub fn replace_segment_with_gap(&mut self, base: Offset, gap: &Batch) -> Result<SegmentSummary, LogError> {
        self.check_writable()?;
        let last = self.segments.len() - 1;
        let si = self.segments[..last]
            .iter()
            .position(|s| s.base == base)
            .ok_or_else(|| LogError::BatchRefused(format!("no closed segment starts at {base}")))?;
        let (seg_base, seg_end) = (self.segments[si].base, self.segments[si].end);
        let h = gap.header();
        if !h.is_gap() || u64::from(h.record_count) != seg_end.0 - seg_base.0 {
            return Err(LogError::BatchRefused(format!(
                "a gap covering [{seg_base}, {seg_end}) is needed, got {} offsets (gap: {})",
                h.record_count,
                h.is_gap()
            )));
        }
        let before = self.segments[si].summary(&self.dir);
        let mut frame = Vec::new();
        segment::encode_frame(seg_base, 0, gap.bytes(), &mut frame);
        let path = self.segment_path(seg_base);
        let tmp = self.dir.join(format!("{}.tmp", segment_file_name(seg_base)));
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| LogError::Io { op, path, source }
        };
        self.storage.write_file_synced(&tmp, &frame).map_err(io("write", &tmp))?;
        self.storage.rename(&tmp, &path).map_err(io("rename", &tmp))?;
        let info = FrameInfo {
            pos: 0,
            len: frame.len() as u64,
            offset: seg_base,
            count: h.record_count,
            min_ts_ms: h.min_ts_ms,
            max_ts_ms: h.max_ts_ms,
            synced_len: 0,
        };
        let mut replaced = Segment::empty(seg_base);
        replaced.note_frame(&info, self.config.index_interval_bytes);
        self.write_index(&replaced);
        self.sync_dir()?;
        self.segments[si] = replaced;
        Ok(before)
    }

    /// First offset still held.
    pub fn start_offset(&self) -> Offset {
        self.segments.first().map_or(self.config.initial_offset, |s| s.base)
    }

    /// The offset the next batch gets.
    pub fn next_offset(&self) -> Offset {
        self.active_segment().end
    }

    /// Everything below this was fsynced.
    pub fn durable_offset(&self) -> Offset {
        self.durable
    }

    /// Everything below this may be acknowledged and read.
    pub fn committed_offset(&self) -> Offset {
        match self.config.fsync {
            FsyncPolicy::Never => self.next_offset(),
            _ => self.durable,
        }
    }

    /// The earliest event time in the log's oldest segment that has any (for "age of the oldest
    /// unforwarded record"); `None` for an empty log.
    pub fn oldest_event_ms(&self) -> Option<i64> {
        self.segments.iter().find_map(|s| s.ts_range.map(|(lo, _)| lo))
    }

    /// First offset of the active segment (where the next append lands unless it rolls).
    pub fn active_base(&self) -> Offset {
        self.active_segment().base
    }

    /// Bytes on disk: segments and their indexes.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len + s.index_bytes()).sum()
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentSummary> {
        self.segments.iter().map(|s| s.summary(&self.dir)).collect()
    }

    /// Problems found since open (recovery, damaged reads).
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the active segment is appended with direct IO (see [`LogConfig::direct_io`]);
    /// false where the file system refused it.
    pub fn is_direct_io(&self) -> bool {
        self.active.as_ref().is_some_and(|f| f.is_direct())
    }

    /// Whether an fsync or write failure poisoned the log.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    // ---- helpers ---------------------------------------------------------------------------

    fn active_segment(&self) -> &Segment {
        self.segments.last().expect("a log always has an active segment")
    }

    fn segment_path(&self, base: Offset) -> PathBuf {
        self.dir.join(segment_file_name(base))
    }

    /// Opens the active segment's file for appending, direct if configured and allowed.
    fn open_active(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        if self.config.direct_io && self.config.fsync != FsyncPolicy::Never {
            self.storage.open_append_direct(path)
        } else {
            self.storage.open_append(path)
        }
    }

    /// Bytes of segment `si` that reads may touch: up to the committed offset. Under direct
    /// IO the active segment's file holds no more than that; reading past it would look like
    /// a segment shorter than its recorded length (damage).
    fn readable_len(&self, si: usize) -> u64 {
        let seg = &self.segments[si];
        let active = si + 1 == self.segments.len();
        if !active || self.committed_offset() >= seg.end { seg.len } else { seg.synced_len }
    }

    fn check_writable(&self) -> Result<(), LogError> {
        if self.config.read_only {
            return Err(LogError::ReadOnly(self.dir.clone()));
        }
        match &self.poisoned {
            Some(reason) => Err(LogError::Poisoned { dir: self.dir.clone(), reason: reason.clone() }),
            None => Ok(()),
        }
    }

    fn problem(&mut self, base: Offset, pos: u64, kind: ProblemKind, detail: String) {
        let p = Problem { file: self.segment_path(base), pos, kind, detail };
        if kind.is_corruption() {
            tracing::error!(file = %p.file.display(), pos, ?kind, detail = %p.detail, "log damage");
        } else {
            tracing::warn!(file = %p.file.display(), pos, ?kind, detail = %p.detail, "log recovery");
        }
        self.problems.push(p);
    }

    fn sync_dir(&mut self) -> Result<(), LogError> {
        if let Err(source) = self.storage.sync_dir(&self.dir) {
            self.poisoned = Some(format!("directory fsync failed: {source}"));
            return Err(LogError::Io { op: "fsync directory", path: self.dir.clone(), source });
        }
        Ok(())
    }

    /// Removes leftovers: temporary index files and indexes without a segment.
    fn remove_stray_files(&self, names: &[String], bases: &[Offset]) -> Result<(), LogError> {
        for name in names {
            let orphan_index = name
                .strip_suffix(".idx")
                .and_then(|d| d.parse::<u64>().ok())
                .is_some_and(|b| !bases.contains(&Offset(b)));
            if name.ends_with(".idx.tmp") || name.ends_with(".log.tmp") || orphan_index {
                let path = self.dir.join(name);
                self.storage.remove_file(&path).map_err(|source| LogError::Io { op: "remove", path, source })?;
            }
        }
        Ok(())
    }

    fn load_segment(&mut self, base: Offset, last: bool) -> Result<Segment, LogError> {
        let path = self.segment_path(base);
        let idx_path = self.dir.join(index_file_name(base));
        let file =
            self.storage.open_read(&path).map_err(|source| LogError::Io { op: "open", path: path.clone(), source })?;
        let file_len = file.len().map_err(|source| LogError::Io { op: "stat", path: path.clone(), source })?;
        if !last {
            let why = match storage::read_all(self.storage.as_ref(), &idx_path) {
                Err(e) => format!("index unreadable: {e}"),
                Ok(bytes) => match SegmentIndex::decode(&bytes, base) {
                    Ok(idx) if idx.segment_len == file_len => return Ok(Segment::from_index(base, idx)),
                    Ok(idx) => format!("index covers {} bytes, segment has {file_len}", idx.segment_len),
                    Err(e) => e,
                },
            };
            self.problem(base, 0, ProblemKind::IndexRebuilt, why);
        }
        let mut buf = vec![0; usize::try_from(file_len).unwrap_or(usize::MAX)];
        let n = read_full_at(file.as_ref(), 0, &mut buf).map_err(|source| LogError::Io {
            op: "read",
            path: path.clone(),
            source,
        })?;
        buf.truncate(n);
        let scan = segment::scan(&buf, base, &self.config.batch_limits);
        for d in &scan.damage {
            let before = scan.frames.iter().take_while(|f| f.pos < d.pos).last().map_or(base, FrameInfo::end);
            let after = scan.frames.iter().find(|f| f.pos > d.pos).map_or(before, |f| f.offset);
            let detail = format!("{} bytes skipped ({}); offsets [{before}, {after}) unreadable", d.len, d.reason);
            let kind = if d.was_synced { ProblemKind::Damage } else { ProblemKind::TornWrite };
            self.problem(base, d.pos, kind, detail);
        }
        let seg = Segment::from_scan(base, &scan.frames, scan.valid_len, self.config.index_interval_bytes);
        if scan.valid_len < n as u64 {
            let torn = n as u64 - scan.valid_len;
            let reason = scan.tail_reason.clone().unwrap_or_default();
            if last {
                self.problem(
                    base,
                    scan.valid_len,
                    ProblemKind::TornTail,
                    format!("{torn} bytes after the last whole batch ({reason})"),
                );
                if !self.config.read_only {
                    let mut f = self.storage.open_append(&path).map_err(|source| LogError::Io {
                        op: "open",
                        path: path.clone(),
                        source,
                    })?;
                    f.truncate(scan.valid_len).map_err(|source| LogError::Io {
                        op: "truncate",
                        path: path.clone(),
                        source,
                    })?;
                    f.sync().map_err(|source| LogError::Io { op: "fsync", path: path.clone(), source })?;
                }
            } else {
                self.problem(
                    base,
                    scan.valid_len,
                    ProblemKind::Damage,
                    format!("{torn} bytes at the end of a closed segment skipped ({reason})"),
                );
            }
        }
        if !last && !self.config.read_only {
            // Only a closed segment's index is written; the active one's lives in memory.
            // A closed segment keeps its full length so later opens agree with the index.
            let mut s = seg;
            s.len = file_len;
            self.write_index(&s);
            return Ok(s);
        }
        Ok(seg)
    }

    /// Writes a closed segment's index (temp file, fsync, rename). Best effort: an index
    /// that did not make it is rebuilt at the next open.
    fn write_index(&self, seg: &Segment) {
        let tmp = self.dir.join(format!("{}.tmp", index_file_name(seg.base)));
        let dst = self.dir.join(index_file_name(seg.base));
        let r =
            self.storage.write_file_synced(&tmp, &seg.index().encode()).and_then(|()| self.storage.rename(&tmp, &dst));
        if let Err(error) = r {
            tracing::warn!(%error, file = %dst.display(), "index not written; it will be rebuilt");
            let _ = self.storage.remove_file(&tmp);
        }
    }

    fn maybe_roll(&mut self, frame_len: u64, now_ms: i64) -> Result<(), LogError> {
        let seg = self.active_segment();
        if seg.len == 0 {
            return Ok(());
        }
        let full = seg.len + frame_len > self.config.segment_bytes_max;
        let aged = self.config.segment_age_ms > 0
            && now_ms.saturating_sub(self.active_opened_ms) >= self.config.segment_age_ms as i64;
        if !(full || aged) {
            return Ok(());
        }
        self.roll(now_ms)
    }

    /// Closes the active segment and opens the next. The closing segment is made durable
    /// before the next exists, so only the last segment can ever have a torn tail.
    fn roll(&mut self, now_ms: i64) -> Result<(), LogError> {
        // Durable, and at its exact length before its index says so.
        self.sync_active(true)?;
        self.write_index(self.active_segment());
        let base = self.next_offset();
        let path = self.segment_path(base);
        let file = self.open_active(&path).map_err(|source| LogError::Io { op: "create", path, source })?;
        self.sync_dir()?;
        self.active = Some(file);
        self.active_opened_ms = now_ms;
        self.segments.push(Segment::empty(base));
        Ok(())
    }

    fn remove_first_segment(&mut self) -> Result<SegmentSummary, LogError> {
        let seg = self.segments.remove(0);
        let summary = seg.summary(&self.dir);
        for path in [summary.path.clone(), self.dir.join(index_file_name(seg.base))] {
            match self.storage.remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(LogError::Io { op: "remove", path, source: e });
                }
                _ => {}
            }
        }
        Ok(summary)
    }

    fn reader(&mut self, si: usize) -> Result<&dyn ReadFile, LogError> {
        let path = self.segment_path(self.segments[si].base);
        let seg = &mut self.segments[si];
        if seg.reader.is_none() {
            let f = self.storage.open_read(&path).map_err(|source| LogError::Io { op: "open", path, source })?;
            seg.reader = Some(f);
        }
        Ok(seg.reader.as_deref().expect("just opened"))
    }

    /// The frame at `pos` of segment `si`, `Ok(None)` at the segment's end, `Err` if damaged.
    fn read_frame(&mut self, si: usize, pos: u64) -> Result<Option<(Offset, Batch)>, LogError> {
        match self.try_read_frame(si, pos)? {
            Ok(r) => Ok(r),
            Err(_) => Ok(None),
        }
    }

    fn try_read_frame(&mut self, si: usize, pos: u64) -> Result<Result<Option<(Offset, Batch)>, String>, LogError> {
        let limits = self.config.batch_limits;
        let seg_len = self.readable_len(si);
        if pos >= seg_len {
            return Ok(Ok(None));
        }
        let path = self.segment_path(self.segments[si].base);
        let io = |source| LogError::Io { op: "read", path: path.clone(), source };
        let file = self.reader(si)?;
        let mut head = [0u8; FRAME_HEADER_LEN];
        if read_full_at(file, pos, &mut head).map_err(io)? < FRAME_HEADER_LEN {
            return Ok(Err("segment shorter than its recorded length".into()));
        }
        let batch_len = segment::frame_batch_len(&head) as u64;
        let frame_len = (FRAME_HEADER_LEN as u64 + batch_len).min(seg_len - pos);
        let mut buf = vec![0u8; frame_len as usize];
        let n = read_full_at(file, pos, &mut buf).map_err(io)?;
        buf.truncate(n);
        match segment::decode_frame(&buf, &limits) {
            Ok(Some((offset, _, len))) => {
                let bytes = Bytes::from(buf).slice(FRAME_HEADER_LEN..len);
                let batch = Batch::from_bytes(bytes, &limits).map_err(|e| e.to_string());
                Ok(batch.map(|b| Some((offset, b))))
            }
            Ok(None) => Ok(Err("frame runs past the segment's end".into())),
            Err(e) => Ok(Err(e)),
        }
    }

    /// Reads batches of segment `si` into `out`; returns whether it reached the segment's end.
    fn read_segment(
        &mut self,
        si: usize,
        committed: Offset,
        bytes_max: usize,
        taken: &mut usize,
        out: &mut ReadBatches,
    ) -> Result<bool, LogError> {
        let mut pos = index::pos_for_offset(&self.segments[si].entries, out.next);
        let mut expected = self.segments[si].base;
        loop {
            if pos >= self.readable_len(si) {
                return Ok(pos >= self.segments[si].len);
            }
            if *taken >= bytes_max && !out.batches.is_empty() {
                return Ok(false);
            }
            match self.try_read_frame(si, pos)? {
                Ok(None) => return Ok(true),
                Ok(Some((offset, batch))) => {
                    let entry = LogBatch { offset, batch };
                    pos += (FRAME_HEADER_LEN + entry.batch.bytes().len()) as u64;
                    expected = entry.end();
                    if entry.offset >= committed {
                        return Ok(false);
                    }
                    if entry.end() <= out.next {
                        continue;
                    }
                    *taken += entry.batch.bytes().len();
                    out.next = entry.end();
                    out.batches.push(entry);
                }
                Err(reason) => {
                    // Damage: find the next good frame in the rest of the segment.
                    let next = self.resync_from(si, pos, expected)?;
                    let (detail, kind) = match next {
                        Some((next, kind)) => (format!("{} bytes skipped ({reason})", next - pos), kind),
                        None => (format!("no readable batch after this point ({reason})"), ProblemKind::Damage),
                    };
                    out.damage.push(self.known_problem(si, pos, kind, detail));
                    match next {
                        Some((next, _)) => pos = next,
                        None => return Ok(true),
                    }
                }
            }
        }
    }

    /// The problem already recorded at `pos` of segment `si`, or a new one.
    fn known_problem(&mut self, si: usize, pos: u64, kind: ProblemKind, detail: String) -> Problem {
        let file = self.segment_path(self.segments[si].base);
        if let Some(p) = self.problems.iter().find(|p| p.file == file && p.pos == pos) {
            return p.clone();
        }
        self.problem(self.segments[si].base, pos, kind, detail);
        self.problems.last().expect("just pushed").clone()
    }

    /// The position of the next good frame after damage at `pos`, and what kind of damage it
    /// is; `None` if no good frame follows.
    fn resync_from(&mut self, si: usize, pos: u64, expected: Offset) -> Result<Option<(u64, ProblemKind)>, LogError> {
        let seg_len = self.readable_len(si);
        let path = self.segment_path(self.segments[si].base);
        let limits = self.config.batch_limits;
        let file = self.reader(si)?;
        let mut rest = vec![0u8; (seg_len - pos) as usize];
        let n = read_full_at(file, pos, &mut rest).map_err(|source| LogError::Io { op: "read", path, source })?;
        rest.truncate(n);
        // Classify as recovery does: scan the rest, with the damage at its start.
        let scan = segment::scan(&rest, expected, &limits);
        Ok(scan.damage.first().filter(|d| d.pos == 0).map(|d| {
            // Synced lengths are positions in the whole segment, not in `rest`.
            let was_synced = scan.frames.iter().any(|f| f.synced_len > pos);
            let kind = if was_synced { ProblemKind::Damage } else { ProblemKind::TornWrite };
            (pos + d.len, kind)
        }))
    }
}
