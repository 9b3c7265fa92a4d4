//! `log verify` and `log dump`: operator tools over a data directory's logs.
//!
//! Both are read-only ([`shared::log::LogConfig::read_only`], [`shared::log::verify`]): they
//! never truncate, rebuild or create anything, so they can run beside an agent that is
//! writing. They see the logs as of the moment they open them.
//!
//! Output: reports and records go to `out`, problems met while dumping to `err`, each problem
//! as `<file>@<byte offset>: <kind>: <detail>`.

use std::io::{self, Write};
use std::sync::Arc;

use shared::batch::BatchLimits;
use shared::ids::{Offset, Seq};
use shared::log::storage::{FsStorage, Storage};
use shared::log::verify::{self, StreamReport, stream_dir};
use shared::ndjson::record_line;

use crate::cli::{DumpArgs, VerifyArgs};

pub use shared::log::tool::{CmdError, Outcome};
use shared::log::tool::{DumpTally, open_read_only, require_stream, selected_streams, verify_streams};

/// `log verify`: a report per stream on `out`.
pub fn verify(args: &VerifyArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<Outcome, CmdError> {
    let storage: Arc<dyn Storage> = Arc::new(FsStorage);
    let streams = selected_streams(storage.as_ref(), &args.data_dir, args.stream.as_deref())?;
    verify_streams(&args.data_dir, &streams, out, err, |stream, out| {
        match verify::verify_stream(storage.clone(), &stream_dir(&args.data_dir, stream), BatchLimits::default()) {
            Ok(report) => {
                write_report(out, stream, &report)?;
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
    let mut log = open_read_only(storage, &stream_dir(&args.data_dir, &args.stream))?;
    let mut d = Dump { args, t: DumpTally::default() };
    d.t.report(err, log.problems())?;
    let limit = args.limit.unwrap_or(u64::MAX);
    let mut next = log.start_offset().max(Offset(args.from_seq));
    while next < log.committed_offset() && d.t.printed < limit {
        let read = log.read(next, READ_BYTES_MAX)?;
        d.t.report(err, &read.damage)?;
        for lb in &read.batches {
            d.print_batch(out, err, lb)?;
        }
        if read.next <= next {
            break;
        }
        next = read.next;
    }
    out.flush()?;
    d.t.summary(err, &args.stream)?;
    Ok(d.t.outcome())
}

// ---- helpers -------------------------------------------------------------------------------

/// Batch bytes per read: small enough to keep memory flat, large enough that a read's fixed
/// cost does not matter.
const READ_BYTES_MAX: usize = 1 << 20;

/// State of one dump.
struct Dump<'a> {
    args: &'a DumpArgs,
    /// Counts and problems reported so far.
    t: DumpTally,
}

impl Dump<'_> {
    fn print_batch(&mut self, out: &mut dyn Write, err: &mut dyn Write, lb: &shared::log::LogBatch) -> io::Result<()> {
        let (from, limit) = (self.args.from_seq, self.args.limit.unwrap_or(u64::MAX));
        if lb.end().0 <= from || self.t.printed >= limit {
            return Ok(());
        }
        if lb.batch.header().is_gap() {
            self.t.gaps += 1;
            self.t.gap_seqs += lb.end().0 - lb.offset.0.max(from);
            return Ok(());
        }
        let records = match lb.batch.records() {
            Ok(records) => records,
            Err(e) => {
                // Its CRCs held, so this is not rot; still, records go unprinted.
                writeln!(err, "{}: batch at seq {}: records undecodable: {e}", self.args.stream, lb.offset)?;
                self.t.skipped += 1;
                self.t.corrupt = true;
                return Ok(());
            }
        };
        for (i, record) in records.iter().enumerate() {
            let seq = lb.offset.0 + i as u64;
            if seq < from {
                continue;
            }
            if self.t.printed >= limit {
                break;
            }
            writeln!(out, "{}", record_line(None, &self.args.stream, Seq(seq), record))?;
            self.t.printed += 1;
        }
        Ok(())
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
