//! What the `log verify` and `log dump` commands of both binaries share: how they end, their
//! errors, and read-only access to a data directory's logs. Their layouts differ (the core has
//! partitions); their outputs are built on [`super::verify`] and `crate::ndjson`.

use std::collections::HashSet;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

use super::storage::Storage;
use super::verify::{STREAMS_DIR, list_streams};
use super::{Log, LogConfig, LogError, Problem, ProblemKind};

/// Opening a log read-only races the writer's retention, which may delete a segment between
/// the listing and the open: try this many times.
const OPEN_ATTEMPTS_MAX: u32 = 3;

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
    /// A file of the directory layout is missing or wrong (the core's partition count).
    #[error("{}: {reason}", path.display())]
    Layout {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
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

/// The streams of `data_dir`.
pub fn streams_of(storage: &dyn Storage, data_dir: &Path) -> Result<Vec<String>, CmdError> {
    list_streams(storage, data_dir).map_err(|source| CmdError::DataDir { path: data_dir.to_path_buf(), source })
}

/// An error naming the streams there if `stream` is not one of them.
pub fn require_stream(storage: &dyn Storage, data_dir: &Path, stream: &str) -> Result<(), CmdError> {
    let streams = streams_of(storage, data_dir)?;
    if streams.iter().any(|s| s == stream) {
        return Ok(());
    }
    let known = if streams.is_empty() { "none".into() } else { streams.join(", ") };
    Err(CmdError::UnknownStream { stream: stream.into(), dir: data_dir.join(STREAMS_DIR), known })
}

/// The streams a command works on: `stream` if given (an error if it is not there), else all.
pub fn selected_streams(storage: &dyn Storage, data_dir: &Path, stream: Option<&str>) -> Result<Vec<String>, CmdError> {
    match stream {
        Some(s) => {
            require_stream(storage, data_dir, s)?;
            Ok(vec![s.to_owned()])
        }
        None => streams_of(storage, data_dir),
    }
}

/// Opens the log in `dir` read-only (nothing on disk changes), retrying a segment that
/// vanished under a running writer's retention.
pub fn open_read_only(storage: Arc<dyn Storage>, dir: &Path) -> Result<Log, LogError> {
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

/// The body of `log verify` for any layout: `verify_one` prints one stream's report on `out`
/// and says whether it found corruption (`Ok(Err(why))`: the stream could not be read), then a
/// summary line. Streams that could not be read are named on `err` and make the command fail.
pub fn verify_streams(
    data_dir: &Path,
    streams: &[String],
    out: &mut dyn Write,
    err: &mut dyn Write,
    mut verify_one: impl FnMut(&str, &mut dyn Write) -> Result<Result<bool, String>, CmdError>,
) -> Result<Outcome, CmdError> {
    let (mut corrupt, mut failed) = (Vec::new(), Vec::new());
    for stream in streams {
        match verify_one(stream, out)? {
            Ok(true) => corrupt.push(stream.as_str()),
            Ok(false) => {}
            Err(e) => {
                writeln!(err, "{stream}: {e}")?;
                failed.push(stream.clone());
            }
        }
    }
    match (corrupt.is_empty(), streams.len()) {
        (_, 0) => writeln!(out, "no streams in {}", data_dir.join(STREAMS_DIR).display())?,
        (true, n) => writeln!(out, "{n} stream(s) verified: no corruption")?,
        (false, n) => writeln!(out, "{n} stream(s) verified: corruption in {}", corrupt.join(", "))?,
    }
    out.flush()?;
    if !failed.is_empty() {
        return Err(CmdError::Unverified(failed));
    }
    Ok(if corrupt.is_empty() { Outcome::Clean } else { Outcome::Corruption })
}

/// What `log dump` counts while it prints, for its summary on stderr and its outcome.
#[derive(Debug, Default)]
pub struct DumpTally {
    /// Records printed.
    pub printed: u64,
    /// Gap batches met (not printed).
    pub gaps: u64,
    /// Seqs those gaps cover.
    pub gap_seqs: u64,
    /// Damaged ranges and undecodable batches skipped.
    pub skipped: u64,
    /// Whether corruption was met.
    pub corrupt: bool,
    /// Problems already reported, by file and position.
    seen: HashSet<(PathBuf, u64)>,
}

impl DumpTally {
    /// Reports the problems not reported yet. Missing indexes do not change what a dump prints.
    pub fn report(&mut self, err: &mut dyn Write, problems: &[Problem]) -> io::Result<()> {
        for p in problems.iter().filter(|p| p.kind != ProblemKind::IndexRebuilt) {
            if self.seen.insert((p.file.clone(), p.pos)) {
                writeln!(err, "{p}")?;
                self.skipped += u64::from(matches!(p.kind, ProblemKind::Damage | ProblemKind::TornWrite));
                self.corrupt |= p.kind.is_corruption();
            }
        }
        Ok(())
    }

    /// The summary line of `stream`.
    pub fn summary(&self, err: &mut dyn Write, stream: &str) -> io::Result<()> {
        let mut line = format!("{stream}: {} record(s) printed", self.printed);
        if self.gaps > 0 {
            line += &format!("; {} gap batch(es) covering {} seq(s) not printed", self.gaps, self.gap_seqs);
        }
        if self.skipped > 0 {
            line += &format!("; {} damaged range(s) skipped", self.skipped);
        }
        writeln!(err, "{line}")
    }

    /// The command's outcome.
    pub fn outcome(&self) -> Outcome {
        if self.corrupt { Outcome::Corruption } else { Outcome::Clean }
    }
}
