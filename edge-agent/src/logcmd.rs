//! `log verify` and `log dump`: operator tools over a data directory's logs.
//!
//! Both are read-only ([`LogConfig::read_only`], [`shared::log::verify`]): they
//! never truncate, rebuild or create anything, so they can run beside an agent that is
//! writing. They see the logs as of the moment they open them.
//!
//! Output: reports and records go to `out`, problems met while dumping to `err`, each problem
//! as `<file>@<byte offset>: <kind>: <detail>`.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use shared::batch::BatchLimits;
use shared::ids::{Offset, Seq};
use shared::log::storage::{FsStorage, Storage};
use shared::log::verify::{self, StreamReport, list_streams, stream_dir};
use shared::log::{Log, LogConfig, LogError, Problem, ProblemKind};
use shared::ndjson::record_line;
use thiserror::Error;

use crate::cli::{DumpArgs, VerifyArgs};

/// How a command ended, beyond errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing wrong beyond what power loss normally leaves.
    Clean,
    /// Corruption found (or, for a dump, data that could not be printed).
    Corruption,
}

impl Outcome {
    /// The process exit status: 0 or 1 (errors exit 2).
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Clean => 0,
            Outcome::Corruption => 1,
        }
    }
}

/// Why a command could not do its job.
#[derive(Debug, Error)]
pub enum CmdError {
    /// The data directory cannot be read.
    #[error("data directory {}: {source}", path.display())]
    DataDir {
        /// As given.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The stream has no log in the data directory.
    #[error("no stream {stream:?} in {} (streams: {known})", dir.display())]
    UnknownStream {
        /// Asked for.
        stream: String,
        /// Where streams live.
        dir: PathBuf,
        /// The streams there, comma-separated.
        known: String,
    },
    /// A log could not be read.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Some streams could not be verified (each was reported).
    #[error("could not verify {}", .0.join(", "))]
    Unverified(Vec<String>),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

impl CmdError {
    /// Whether the output's reader went away (`| head`): that ends a command early, not in
    /// failure.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CmdError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// `log verify`: a report per stream on `out`.
pub fn verify(args: &VerifyArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<Outcome, CmdError> {
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let streams = match &args.stream {
        Some(s) => {
            require_stream(storage.as_ref(), &args.data_dir, s)?;
            vec![s.clone()]
        }
        None => streams_of(storage.as_ref(), &args.data_dir)?,
    };
    let (mut corrupt, mut failed) = (Vec::new(), Vec::new());
    for stream in &streams {
        match verify::verify_stream(storage.clone(), &stream_dir(&args.data_dir, stream), BatchLimits::default()) {
            Ok(report) => {
                write_report(out, stream, &report)?;
                if report.is_corrupt() {
                    corrupt.push(stream.as_str());
                }
            }
            Err(e) => {
                writeln!(err, "{stream}: {e}")?;
                failed.push(stream.clone());
            }
        }
    }
    match (corrupt.is_empty(), streams.len()) {
        (_, 0) => writeln!(out, "no streams in {}", args.data_dir.join(verify::STREAMS_DIR).display())?,
        (true, n) => writeln!(out, "{n} stream(s) verified: no corruption")?,
        (false, n) => writeln!(out, "{n} stream(s) verified: corruption in {}", corrupt.join(", "))?,
    }
    out.flush()?;
    if !failed.is_empty() {
        return Err(CmdError::Unverified(failed));
    }
    Ok(if corrupt.is_empty() { Outcome::Clean } else { Outcome::Corruption })
}

/// `log dump`: the stream's records as NDJSON on `out`; problems and a summary on `err`.
pub fn dump(args: &DumpArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<Outcome, CmdError> {
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    require_stream(storage.as_ref(), &args.data_dir, &args.stream)?;
    let mut log = open_read_only(storage, &stream_dir(&args.data_dir, &args.stream))?;
    let mut d = Dump { args, seen: HashSet::new(), printed: 0, gaps: 0, gap_seqs: 0, skipped: 0, corrupt: false };
    d.report(err, log.problems())?;
    let limit = args.limit.unwrap_or(u64::MAX);
    let mut next = log.start_offset().max(Offset(args.from_seq));
    while next < log.committed_offset() && d.printed < limit {
        let read = log.read(next, READ_BYTES_MAX)?;
        d.report(err, &read.damage)?;
        for lb in &read.batches {
            d.print_batch(out, err, lb)?;
        }
        if read.next <= next {
            break;
        }
        next = read.next;
    }
    out.flush()?;
    d.summary(err)?;
    Ok(if d.corrupt { Outcome::Corruption } else { Outcome::Clean })
}

// ---- helpers -------------------------------------------------------------------------------

/// Batch bytes per read: small enough to keep memory flat, large enough that a read's fixed
/// cost does not matter.
const READ_BYTES_MAX: usize = 1 << 20;

/// How often a read-only open is retried when a segment vanishes under it (the writer's
/// retention removed it between listing and opening).
const OPEN_ATTEMPTS_MAX: u32 = 3;

/// State of one dump.
struct Dump<'a> {
    args: &'a DumpArgs,
    /// Problems already reported, by file and position.
    seen: HashSet<(PathBuf, u64)>,
    printed: u64,
    gaps: u64,
    gap_seqs: u64,
    /// Damaged ranges and undecodable batches skipped.
    skipped: u64,
    corrupt: bool,
}

impl Dump<'_> {
    fn print_batch(&mut self, out: &mut dyn Write, err: &mut dyn Write, lb: &shared::log::LogBatch) -> io::Result<()> {
        let (from, limit) = (self.args.from_seq, self.args.limit.unwrap_or(u64::MAX));
        if lb.end().0 <= from || self.printed >= limit {
            return Ok(());
        }
        if lb.batch.header().is_gap() {
            self.gaps += 1;
            self.gap_seqs += lb.end().0 - lb.offset.0.max(from);
            return Ok(());
        }
        let records = match lb.batch.records() {
            Ok(records) => records,
            Err(e) => {
                // Its CRCs held, so this is not rot; still, records go unprinted.
                writeln!(err, "{}: batch at seq {}: records undecodable: {e}", self.args.stream, lb.offset)?;
                self.skipped += 1;
                self.corrupt = true;
                return Ok(());
            }
        };
        for (i, record) in records.iter().enumerate() {
            let seq = lb.offset.0 + i as u64;
            if seq < from {
                continue;
            }
            if self.printed >= limit {
                break;
            }
            writeln!(out, "{}", record_line(None, &self.args.stream, Seq(seq), record))?;
            self.printed += 1;
        }
        Ok(())
    }

    /// Reports problems not reported yet. Missing indexes do not change what a dump prints.
    fn report(&mut self, err: &mut dyn Write, problems: &[Problem]) -> io::Result<()> {
        for p in problems.iter().filter(|p| p.kind != ProblemKind::IndexRebuilt) {
            if self.seen.insert((p.file.clone(), p.pos)) {
                writeln!(err, "{p}")?;
                self.skipped += u64::from(matches!(p.kind, ProblemKind::Damage | ProblemKind::TornWrite));
                self.corrupt |= p.kind.is_corruption();
            }
        }
        Ok(())
    }

    fn summary(&self, err: &mut dyn Write) -> io::Result<()> {
        let mut line = format!("{}: {} record(s) printed", self.args.stream, self.printed);
        if self.gaps > 0 {
            line += &format!("; {} gap batch(es) covering {} seq(s) not printed", self.gaps, self.gap_seqs);
        }
        if self.skipped > 0 {
            line += &format!("; {} damaged range(s) skipped", self.skipped);
        }
        writeln!(err, "{line}")
    }
}

fn write_report(out: &mut dyn Write, stream: &str, r: &StreamReport) -> io::Result<()> {
    let range = match r.range() {
        Some((first, next)) => format!("seq [{first}, {next})"),
        None => "empty".into(),
    };
    writeln!(
        out,
        "{stream}: {} segment(s), {} batch(es) ({} gap), {} record(s), {range}, {} bytes",
        r.segments.len(),
        r.batches,
        r.gap_batches,
        r.records,
        r.bytes
    )?;
    for p in &r.problems {
        writeln!(out, "{p}")?;
    }
    Ok(())
}

fn streams_of(storage: &dyn Storage, data_dir: &Path) -> Result<Vec<String>, CmdError> {
    list_streams(storage, data_dir).map_err(|source| CmdError::DataDir { path: data_dir.to_path_buf(), source })
}

fn require_stream(storage: &dyn Storage, data_dir: &Path, stream: &str) -> Result<(), CmdError> {
    let streams = streams_of(storage, data_dir)?;
    if streams.iter().any(|s| s == stream) {
        return Ok(());
    }
    let known = if streams.is_empty() { "none".into() } else { streams.join(", ") };
    Err(CmdError::UnknownStream { stream: stream.into(), dir: data_dir.join(verify::STREAMS_DIR), known })
}

fn open_read_only(storage: Arc<dyn Storage>, dir: &Path) -> Result<Log, LogError> {
    let config = LogConfig { read_only: true, ..LogConfig::default() };
    // Only used to age the active segment, which a read-only log never rolls.
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let mut attempt = 1;
    loop {
        match Log::open(storage.clone(), dir, config, now_ms) {
            Err(LogError::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound && attempt < OPEN_ATTEMPTS_MAX =>
            {
                attempt += 1;
            }
            r => return r,
        }
    }
}
