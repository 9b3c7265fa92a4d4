//! The disk's own rate for what the core does: append the same batch bytes to one file with
//! plain `std::fs` writes and `sync_data` once per group of batches, the group as large as the
//! core's group commits turned out. The core's rate over this one says how close it gets to
//! the disk.
//!
//! Like the log, the file is new and its directory is fsynced after it is created. Unlike the
//! core, it is one file: the core fsyncs each partition a round touched (up to `partitions`
//! fsyncs per round), rolls segments (a new file and a directory fsync every
//! `segment_bytes_max`) and writes an index beside each segment.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

/// What one peer run did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DiskPeerFigures {
    /// Batches written.
    pub batches: u64,
    /// Their bytes.
    pub bytes: u64,
    /// `sync_data` calls.
    pub syncs: u64,
    /// Batches per `sync_data`.
    pub batches_per_sync: u64,
    /// From the first write to the last sync, seconds.
    pub seconds: f64,
    /// CPU seconds spent meanwhile (filled in by the caller, who knows what else ran).
    pub cpu_seconds: f64,
}

impl DiskPeerFigures {
    /// Megabytes (10^6) per second.
    pub fn mb_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }

    /// Batches per second.
    pub fn batches_per_second(&self) -> f64 {
        self.batches as f64 / self.seconds.max(1e-9)
    }
}

/// Appends `count` batches, taken from `batches` round and round, to a new file in `dir`,
/// with `sync_data` after every `per_sync` of them and after the last; stops early (after a
/// sync) once `time_cap` has passed. The file is removed afterwards.
pub fn append_and_sync(
    dir: &Path,
    batches: &[&[u8]],
    count: u64,
    per_sync: u64,
    time_cap: Duration,
) -> anyhow::Result<DiskPeerFigures> {
    anyhow::ensure!(!batches.is_empty(), "no batches to write");
    let per_sync = per_sync.max(1);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("peer.dat");
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync of {}", dir.display()))?;
    let mut f = DiskPeerFigures { batches_per_sync: per_sync, ..DiskPeerFigures::default() };
    let started = Instant::now();
    for (i, b) in (0..count).zip(batches.iter().cycle()) {
        file.write_all(b).with_context(|| format!("writing {}", path.display()))?;
        f.batches += 1;
        f.bytes += b.len() as u64;
        if (i + 1) % per_sync == 0 {
            file.sync_data().with_context(|| format!("sync_data of {}", path.display()))?;
            f.syncs += 1;
            if started.elapsed() >= time_cap {
                break;
            }
        }
    }
    if !f.batches.is_multiple_of(per_sync) {
        file.sync_data().with_context(|| format!("sync_data of {}", path.display()))?;
        f.syncs += 1;
    }
    f.seconds = started.elapsed().as_secs_f64();
    drop(file);
    fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_batches_round_and_round_with_a_sync_per_group() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (vec![1u8; 100], vec![2u8; 50]);
        let f = append_and_sync(tmp.path(), &[&a, &b], 7, 3, Duration::from_secs(60)).unwrap();
        assert_eq!((f.batches, f.bytes, f.syncs, f.batches_per_sync), (7, 4 * 100 + 3 * 50, 3, 3));
        assert!(f.seconds > 0.0 && f.mb_per_second() > 0.0);
        assert!(!tmp.path().join("peer.dat").exists(), "removed afterwards");
        let capped = append_and_sync(tmp.path(), &[&a], 1000, 2, Duration::ZERO).unwrap();
        assert_eq!((capped.batches, capped.syncs), (2, 1), "stops after the first sync past the cap");
    }
}
