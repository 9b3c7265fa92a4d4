//! When to reload certificates: on SIGHUP, and when one of the files changes on disk (checked
//! every few seconds by modification time, size and inode, so a Kubernetes Secret volume, whose
//! files are swapped by a symlink rename, is picked up with no signal at all).
//!
//! The reload itself is the caller's: it reads all files again and swaps its TLS config, or
//! keeps the old one if the new set does not load (say, a certificate written before its key).
//! A failed set is not retried until a file changes again or another SIGHUP comes. A change
//! is acted on once the files have stayed the same for one more check ([`Settle`]), so a
//! rotation that renames the key and then the certificate is not caught half-way.

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

/// Decides when changed files have settled: a reload is due when a check sees the files as
/// the previous check saw them and that differs from what was last loaded. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settle<F> {
    loaded: F,
    last: F,
}

impl<F: Clone + PartialEq> Settle<F> {
    /// Starting from what was loaded.
    pub fn new(loaded: F) -> Self {
        Settle { last: loaded.clone(), loaded }
    }

    /// A check saw `now`; whether to reload.
    pub fn handle_check(&mut self, now: F) -> bool {
        let due = now == self.last && now != self.loaded;
        self.last = now;
        if due {
            self.loaded = self.last.clone();
        }
        due
    }

    /// A reload happened for another reason (SIGHUP) with the files as `now`.
    pub fn handle_loaded(&mut self, now: F) {
        self.last = now.clone();
        self.loaded = now;
    }
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
    let mut settle = Settle::new(fingerprint(&files));
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
        match trigger {
            Trigger::Signal => settle.handle_loaded(now),
            Trigger::FileChanged if settle.handle_check(now) => {}
            Trigger::FileChanged => continue,
        }
        reload(trigger);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_reloads_once_it_has_settled() {
        let mut s = Settle::new(1);
        assert!(!s.handle_check(1), "nothing changed");
        assert!(!s.handle_check(2), "the key was renamed; the certificate may follow");
        assert!(!s.handle_check(3), "the certificate followed");
        assert!(s.handle_check(3), "settled: reload");
        assert!(!s.handle_check(3), "once");
        s.handle_loaded(4);
        assert!(!s.handle_check(4), "a SIGHUP loaded it already");
        assert!(!s.handle_check(5));
        assert!(!s.handle_check(4), "back to what is loaded: nothing to do");
        assert!(!s.handle_check(4));
    }

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
