//! When to reload certificates: on SIGHUP, and when one of the files changes on disk (checked
//! every few seconds by modification time, size and inode, so a Kubernetes Secret volume, whose
//! files are swapped by a symlink rename, is picked up with no signal at all).
//!
//! The reload itself is the caller's: it reads all files again and swaps its TLS config, or
//! keeps the old one if the new set does not load (say, a certificate written before its key).
//! A failed set is not retried until a file changes again or another SIGHUP comes.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::Signal;

/// How often certificate files are checked for a change: often enough that a rotation lands
/// within a minute, rarely enough to cost nothing (three `stat` calls).
pub const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Why a reload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// A watched file changed.
    FileChanged,
}

impl Trigger {
    /// As logs show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::FileChanged => "file_changed",
        }
    }
}

/// What the files look like now: per file, modification time, length and inode (`None` if it
/// cannot be read, e.g. mid-rotation).
pub fn fingerprint(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64, u64)>> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|f| std::fs::metadata(f).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), m.ino())))
        .collect()
}

/// Calls `reload` on every SIGHUP (`hangup`, installed by the caller before it reported ready,
/// so an early signal cannot kill the process) and whenever `files` change, checked every
/// `check_every`. Runs until dropped.
pub async fn drive_reloads(
    mut hangup: Signal,
    files: Vec<PathBuf>,
    check_every: Duration,
    mut reload: impl FnMut(Trigger),
) {
    let mut seen = fingerprint(&files);
    let mut every = tokio::time::interval(check_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        let trigger = tokio::select! {
            got = hangup.recv() => match got {
                Some(()) => Trigger::Signal,
                None => return,
            },
            _ = every.tick() => Trigger::FileChanged,
        };
        let now = fingerprint(&files);
        if trigger == Trigger::FileChanged && now == seen {
            continue;
        }
        seen = now;
        reload(trigger);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_sees_a_rewrite_and_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.pem");
        std::fs::write(&a, "one").unwrap();
        let files = vec![a.clone(), dir.path().join("absent.pem")];
        let before = fingerprint(&files);
        assert!(before[0].is_some());
        assert_eq!(before[1], None);
        assert_eq!(fingerprint(&files), before, "nothing changed");
        // A rotation writes a new file and renames it over the old one: a new inode.
        let tmp = dir.path().join("a.pem.new");
        std::fs::write(&tmp, "two!").unwrap();
        std::fs::rename(&tmp, &a).unwrap();
        assert_ne!(fingerprint(&files), before);
    }
}
