//! `log verify` and `log dump`: operator tools over a core data directory's partition logs,
//! the core's counterpart of the edge's (same flags, output and exit status where they apply).
//!
//! ```text
//! <data-dir>/streams/<stream>/partitions   the partition count, fixed when the stream was created
//! <data-dir>/streams/<stream>/<p>/         partition p's log (shared::log), p in 0..count
//! ```
//!
//! Both are read-only ([`shared::log::LogConfig::read_only`], [`shared::log::verify`]): they never truncate,
//! rebuild or create anything, so they can run beside a node that is writing, and see the logs
//! as of the moment they open them.
//!
//! At the core a log offset is the partition's own; a record is named by the (edge, epoch,
//! stream, seq) of its batch header, seq = `base_seq` + its index in the batch. `verify` lists,
//! per partition, the seq ranges held per (edge, epoch) — what the node's dedup rebuilds on
//! start — and reports seqs stored twice in a stream, which dedup exists to prevent. `dump`
//! prints records with their edge and epoch.
//!
//! Output: reports and records go to `out`, problems met while dumping to `err`, each problem
//! as `<file>@<byte offset>: <kind>: <detail>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shared::batch::{BatchHeader, BatchLimits};
use shared::ids::{Epoch, Offset, Seq};
use shared::log::segment::{self, FrameInfo};
use shared::log::storage::{self, FsStorage, Storage};
use shared::log::verify::{self, StreamReport, stream_dir};
use shared::log::{LogBatch, LogError, parse_segment_file_name};
use shared::ndjson::record_line;
use shared::ranges::RangeSet;

use crate::cli::{DumpArgs, VerifyArgs};
use crate::store::partition_dir;

/// Name of the file holding a stream's partition count.
pub const PARTITIONS_FILE: &str = "partitions";
/// Most partitions a stream may have (as `partitions` in the config).
pub const PARTITIONS_MAX: u32 = 1024;

pub use shared::log::tool::{CmdError, Outcome};
use shared::log::tool::{DumpTally, open_read_only, require_stream, selected_streams, verify_streams};

/// `log verify`: a report per stream and partition on `out`.
pub fn verify(args: &VerifyArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<Outcome, CmdError> {
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let streams = selected_streams(storage.as_ref(), &args.data_dir, args.stream.as_deref())?;
    verify_streams(&args.data_dir, &streams, out, err, |stream, out| {
        match verify_stream(&storage, &args.data_dir, stream) {
            Ok(report) => {
                report.write(out)?;
                Ok(Ok(report.is_corrupt()))
            }
            Err(e) => Ok(Err(e.to_string())),
        }
    })
}

/// `log dump`: the stream's records as NDJSON on `out`; problems and a summary on `err`.
pub fn dump(args: &DumpArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<Outcome, CmdError> {
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    require_stream(storage.as_ref(), &args.data_dir, &args.stream)?;
    let count = partition_count(&args.data_dir, &args.stream)?;
    let mut d = Dump::new(args);
    for p in 0..count as usize {
        if d.t.printed >= d.limit {
            break;
        }
        let dir = partition_dir(&args.data_dir, &args.stream, p);
        if !dir.is_dir() {
            // Every partition directory is made when the stream is: this one was lost.
            writeln!(err, "{}@0: PartitionMissing: partition {p} of {count} has no directory", dir.display())?;
            d.t.corrupt = true;
            continue;
        }
        let mut log = open_read_only(storage.clone(), &dir)?;
        d.t.report(err, log.problems())?;
        // Reads continue at batch boundaries; `done` guards against a batch returned twice.
        let (mut next, mut done) = (log.start_offset(), log.start_offset());
        while next < log.committed_offset() && d.t.printed < d.limit {
            let read = log.read(next, READ_BYTES_MAX)?;
            d.t.report(err, &read.damage)?;
            for lb in &read.batches {
                if lb.offset >= done {
                    d.print_batch(out, err, p, lb)?;
                    done = lb.end();
                }
            }
            if read.next <= next {
                break;
            }
            next = read.next;
        }
    }
    out.flush()?;
    d.t.summary(err, &args.stream)?;
    Ok(d.t.outcome())
}

/// The NDJSON line of a record: [`record_line`] with the producer epoch after the edge, as
/// (edge, epoch, stream, seq) names a record and a wiped edge reuses seqs under a new epoch.
pub fn ndjson_line(edge: &str, epoch: Epoch, stream: &str, seq: Seq, record: &shared::batch::Record) -> String {
    let line = record_line(Some(edge), stream, seq, record);
    // `record_line` writes `{"edge":<string>,"stream":…`; inside a JSON string every `"` is
    // escaped, so the first `,"stream":` is the field boundary.
    match line.find(",\"stream\":") {
        Some(at) => format!("{},\"epoch\":\"{epoch}\"{}", &line[..at], &line[at..]),
        None => line,
    }
}

/// The partition count of `stream`, from its `partitions` file.
pub fn partition_count(data_dir: &Path, stream: &str) -> Result<u32, CmdError> {
    let path = stream_dir(data_dir, stream).join(PARTITIONS_FILE);
    let text =
        std::fs::read_to_string(&path).map_err(|e| CmdError::Layout { path: path.clone(), reason: e.to_string() })?;
    match text.trim().parse::<u32>() {
        Ok(n) if (1..=PARTITIONS_MAX).contains(&n) => Ok(n),
        _ => Err(CmdError::Layout {
            path,
            reason: format!("{:?} is not a partition count (1 to {PARTITIONS_MAX})", cut(text.trim(), 40)),
        }),
    }
}

// ---- verify --------------------------------------------------------------------------------

/// Batch bytes per read: small enough to keep memory flat, large enough that a read's fixed
/// cost does not matter.
const READ_BYTES_MAX: usize = 1 << 20;

/// Something wrong that is not one of the log's own [`Problem`]s: the stream's layout, or
/// what the batches say about dedup.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Finding {
    file: PathBuf,
    pos: u64,
    kind: &'static str,
    detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}: {}: {}", self.file.display(), self.pos, self.kind, self.detail)
    }
}

/// Seqs of one (edge, epoch) in one partition.
#[derive(Clone, Debug, Default)]
struct Held {
    /// Data and gap batches: what dedup counts as held.
    seqs: RangeSet,
    /// Of which gap batches.
    gaps: RangeSet,
}

/// What one partition holds.
#[derive(Debug)]
struct PartitionReport {
    p: usize,
    log: StreamReport,
    producers: BTreeMap<(String, u64), Held>,
    findings: Vec<Finding>,
}

/// What one stream holds.
#[derive(Debug)]
struct StreamVerify {
    stream: String,
    count: Option<u32>,
    partitions: Vec<PartitionReport>,
    /// Layout findings (count file, missing or stray partitions); all are corruption.
    findings: Vec<Finding>,
}

impl StreamVerify {
    fn is_corrupt(&self) -> bool {
        !self.findings.is_empty() || self.partitions.iter().any(|p| p.log.is_corrupt() || !p.findings.is_empty())
    }

    fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let sum = |f: fn(&StreamReport) -> u64| self.partitions.iter().map(|p| f(&p.log)).sum::<u64>();
        let count = self.count.map_or("unknown number of".into(), |n| n.to_string());
        writeln!(
            out,
            "{}: {count} partition(s), {} segment(s), {} batch(es) ({} gap), {} record(s), {} bytes",
            self.stream,
            sum(|r| r.segments.len() as u64),
            sum(|r| r.batches),
            sum(|r| r.gap_batches),
            sum(|r| r.records),
            sum(|r| r.bytes),
        )?;
        for f in &self.findings {
            writeln!(out, "{f}")?;
        }
        for p in &self.partitions {
            let r = &p.log;
            let range = match r.range() {
                Some((first, next)) => format!("offsets [{first}, {next})"),
                None => "empty".into(),
            };
            writeln!(
                out,
                "{}/{}: {} segment(s), {} batch(es) ({} gap), {} record(s), {range}, {} bytes",
                self.stream,
                p.p,
                r.segments.len(),
                r.batches,
                r.gap_batches,
                r.records,
                r.bytes
            )?;
            for ((edge, epoch), held) in &p.producers {
                let mut line = format!("  edge {edge:?} epoch {}: seqs {}", Epoch(*epoch), ranges_text(&held.seqs));
                if !held.gaps.is_empty() {
                    line += &format!(" (gaps {})", ranges_text(&held.gaps));
                }
                writeln!(out, "{line}")?;
            }
            for problem in &r.problems {
                writeln!(out, "{problem}")?;
            }
            for f in &p.findings {
                writeln!(out, "{f}")?;
            }
        }
        Ok(())
    }
}

/// Verifies every partition of `stream`: the log (with [`verify::verify_stream`]), then the
/// batch headers, for the seq ranges held and seqs stored twice.
fn verify_stream(storage: &Arc<dyn Storage>, data_dir: &Path, stream: &str) -> Result<StreamVerify, CmdError> {
    let dir = stream_dir(data_dir, stream);
    let mut v = StreamVerify { stream: stream.into(), count: None, partitions: Vec::new(), findings: Vec::new() };
    let found =
        partition_dirs(storage.as_ref(), &dir).map_err(|e| CmdError::DataDir { path: dir.clone(), source: e })?;
    match partition_count(data_dir, stream) {
        Ok(n) => v.count = Some(n),
        Err(e) => {
            // Without the count the node would write a new one, which may not match the
            // partitions that hold data.
            let detail = format!("{e}; the node cannot tell how many partitions hold this stream's data");
            v.findings.push(Finding { file: dir.join(PARTITIONS_FILE), pos: 0, kind: "PartitionCount", detail });
        }
    }
    let expected: BTreeSet<usize> = (0..v.count.unwrap_or(0) as usize).collect();
    for p in expected.difference(&found) {
        let detail = format!("partition {p} of {} has no directory", v.count.unwrap_or(0));
        v.findings.push(Finding {
            file: partition_dir(data_dir, stream, *p),
            pos: 0,
            kind: "PartitionMissing",
            detail,
        });
    }
    if let Some(n) = v.count {
        for p in found.iter().filter(|p| !expected.contains(p)) {
            let detail = format!("partition {p} is beyond the stream's count {n}: the node never reads it");
            v.findings.push(Finding {
                file: partition_dir(data_dir, stream, *p),
                pos: 0,
                kind: "PartitionStray",
                detail,
            });
        }
    }
    // Seqs held stream-wide per (edge, epoch): a batch overlapping them is stored twice.
    let mut stream_held: HashMap<(String, u64), RangeSet> = HashMap::new();
    for &p in &found {
        let pdir = partition_dir(data_dir, stream, p);
        let log = verify::verify_stream(storage.clone(), &pdir, BatchLimits::default())?;
        let mut report = PartitionReport { p, log, producers: BTreeMap::new(), findings: Vec::new() };
        scan_producers(storage.as_ref(), &pdir, stream, &mut report, &mut stream_held)?;
        v.partitions.push(report);
    }
    Ok(v)
}

/// Reads every whole batch header of the partition in `dir` (scanning segments, trusting no
/// index) into `report.producers`; overlaps with `stream_held` become findings.
fn scan_producers(
    storage: &dyn Storage,
    dir: &Path,
    stream: &str,
    report: &mut PartitionReport,
    stream_held: &mut HashMap<(String, u64), RangeSet>,
) -> Result<(), CmdError> {
    let limits = BatchLimits::default();
    let names = storage.list_dir(dir).map_err(|source| LogError::Io { op: "list", path: dir.to_path_buf(), source })?;
    let mut bases: Vec<Offset> = names.iter().filter_map(|n| parse_segment_file_name(n)).collect();
    bases.sort();
    for base in bases {
        let path = dir.join(shared::log::segment_file_name(base));
        let bytes = match storage::read_all(storage, &path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(LogError::Io { op: "read", path, source }.into()),
        };
        for f in segment::scan(&bytes, base, &limits).frames {
            let finding = |kind, detail| Finding { file: path.clone(), pos: f.pos, kind, detail };
            let Some(h) = frame_header(&bytes, &f, &limits) else {
                report.findings.push(finding("BadHeader", "a whole frame whose batch header does not decode".into()));
                continue;
            };
            if h.stream != stream {
                let detail = format!("batch of stream {:?} in stream {stream:?}", h.stream);
                report.findings.push(finding("WrongStream", detail));
            }
            let key = (h.producer.clone(), h.epoch.0);
            let range = h.base_seq.0..h.end_seq().0;
            let held = stream_held.entry(key.clone()).or_default();
            if held.overlaps(&range) {
                let twice =
                    RangeSet::from_ranges(held.ranges().iter().map(|r| r.start.max(range.start)..r.end.min(range.end)));
                let detail = format!(
                    "seqs {} of edge {:?} epoch {} are stored twice (batch at offset {}, seqs [{}, {}))",
                    ranges_text(&twice),
                    h.producer,
                    h.epoch,
                    f.offset,
                    range.start,
                    range.end
                );
                report.findings.push(finding("SeqOverlap", detail));
            }
            held.insert(range.clone());
            let entry = report.producers.entry(key).or_default();
            entry.seqs.insert(range.clone());
            if h.is_gap() {
                entry.gaps.insert(range);
            }
        }
    }
    Ok(())
}

fn frame_header(bytes: &[u8], f: &FrameInfo, limits: &BatchLimits) -> Option<BatchHeader> {
    let frame = bytes.get(f.pos as usize..(f.pos + f.len) as usize)?;
    segment::decode_frame(frame, limits).ok().flatten().map(|(_, h, _)| h)
}

/// The numbered directories in a stream directory (a missing directory has none).
fn partition_dirs(storage: &dyn Storage, dir: &Path) -> io::Result<BTreeSet<usize>> {
    let names = storage.list_dir(dir)?;
    Ok(names
        .iter()
        .filter_map(|n| n.parse::<usize>().ok().filter(|p| p.to_string() == *n))
        .filter(|p| dir.join(p.to_string()).is_dir())
        .collect())
}

fn ranges_text(set: &RangeSet) -> String {
    if set.is_empty() {
        return "none".into();
    }
    set.ranges().iter().map(|r| format!("[{}, {})", r.start, r.end)).collect::<Vec<_>>().join(" ")
}

fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---- dump ----------------------------------------------------------------------------------

/// State of one dump.
struct Dump<'a> {
    args: &'a DumpArgs,
    limit: u64,
    /// Counts and problems reported so far.
    t: DumpTally,
}

impl<'a> Dump<'a> {
    fn new(args: &'a DumpArgs) -> Self {
        Dump { args, limit: args.limit.unwrap_or(u64::MAX), t: DumpTally::default() }
    }

    fn print_batch(&mut self, out: &mut dyn Write, err: &mut dyn Write, p: usize, lb: &LogBatch) -> io::Result<()> {
        let h = lb.batch.header();
        let from = self.args.from_seq;
        if self.args.edge.as_ref().is_some_and(|e| *e != h.producer) || h.end_seq().0 <= from {
            return Ok(());
        }
        if h.is_gap() {
            self.t.gaps += 1;
            self.t.gap_seqs += h.end_seq().0 - h.base_seq.0.max(from);
            return Ok(());
        }
        let records = match lb.batch.records() {
            Ok(records) => records,
            Err(e) => {
                // Its CRCs held, so this is not rot; still, records go unprinted.
                writeln!(
                    err,
                    "{}/{p}: batch at offset {} (edge {:?} epoch {} seqs [{}, {})): records undecodable: {e}",
                    self.args.stream,
                    lb.offset,
                    h.producer,
                    h.epoch,
                    h.base_seq,
                    h.end_seq()
                )?;
                self.t.skipped += 1;
                self.t.corrupt = true;
                return Ok(());
            }
        };
        for (i, record) in records.iter().enumerate() {
            let seq = h.base_seq.0 + i as u64;
            if seq < from {
                continue;
            }
            if self.t.printed >= self.limit {
                break;
            }
            writeln!(out, "{}", ndjson_line(&h.producer, h.epoch, &self.args.stream, Seq(seq), record))?;
            self.t.printed += 1;
        }
        Ok(())
    }
}

// ---- helpers -------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::LogCommand;
    use shared::batch::{Attr, Record};

    /// Stdout after `| head` has gone.
    #[derive(Debug)]
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn run(command: LogCommand, out: &mut dyn Write) -> Result<Outcome, CmdError> {
        crate::run_log(&command, out, &mut io::sink())
    }

    #[test]
    fn ndjson_line_names_edge_epoch_stream_and_seq() {
        let record = Record {
            ts_ms: 0,
            topic: "cdr/a".into(),
            payload: bytes::Bytes::from_static(b"{\"x\":1}"),
            attrs: vec![Attr { key: "site".into(), value: "lyon".into() }],
        };
        for edge in ["edge-1", "tricky\",\"stream\":\"x", "site 7 · cell ü"] {
            let line = ndjson_line(edge, Epoch(0xab), "cdr", Seq(42), &record);
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(v["edge"], edge, "{line}");
            assert_eq!(v["epoch"], "00000000000000ab", "{line}");
            assert_eq!((v["stream"].as_str(), v["seq"].as_u64()), (Some("cdr"), Some(42)), "{line}");
            assert_eq!(v["payload"], "{\"x\":1}");
            let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys[..4], ["edge", "epoch", "stream", "seq"]);
        }
    }

    #[test]
    fn closed_stdout_ends_the_command_cleanly() {
        let data = tempfile::tempdir().unwrap();
        let verify = LogCommand::Verify(VerifyArgs { data_dir: data.path().into(), stream: None });
        assert_eq!(run(verify, &mut ClosedPipe).unwrap(), Outcome::Clean);
        let verify = LogCommand::Verify(VerifyArgs { data_dir: data.path().into(), stream: None });
        let mut out = Vec::new();
        assert_eq!(run(verify, &mut out).unwrap(), Outcome::Clean);
        assert!(String::from_utf8(out).unwrap().starts_with("no streams in "));
    }

    #[test]
    fn missing_data_dir_is_an_error_naming_it() {
        let data = tempfile::tempdir().unwrap();
        let missing = data.path().join("nope");
        let verify = LogCommand::Verify(VerifyArgs { data_dir: missing.clone(), stream: None });
        let e = run(verify, &mut io::sink()).unwrap_err();
        assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
    }

    #[test]
    fn partition_count_is_checked() {
        let data = tempfile::tempdir().unwrap();
        let dir = stream_dir(data.path(), "cdr");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(partition_count(data.path(), "cdr"), Err(CmdError::Layout { .. })));
        for (text, ok) in [("4\n", Some(4)), ("0", None), ("1025", None), ("x", None), ("", None)] {
            std::fs::write(dir.join(PARTITIONS_FILE), text).unwrap();
            assert_eq!(partition_count(data.path(), "cdr").ok(), ok, "{text:?}");
        }
    }
}
