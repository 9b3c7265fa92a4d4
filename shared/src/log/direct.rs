//! The active segment written with direct IO (`O_DIRECT`): appends gather in an aligned
//! buffer and reach the file as whole aligned blocks, bypassing the page cache. On the core's
//! VMs (ext4 on virtio) it cuts the kernel CPU per GB stored to a third (64 KiB batches) or a
//! fifth (10 KB batches) of buffered `write` + `fdatasync` when a sync covers ~1 MB; at one
//! batch per sync the fsync's own cost dominates and both cost the same (`benches/log_direct.rs`).
//!
//! Invariants:
//! - The buffer starts at a block boundary of the file (`buf_start`) and holds the file's last
//!   partial block followed by the appended bytes not yet written. Every byte below
//!   `buf_start` is in the file.
//! - After [`AppendFile::sync`] the file holds every appended byte and may run on with zero
//!   padding to the block boundary: cutting it at every sync (`ftruncate`) cost as much CPU as
//!   the write itself. The log reads its active segment only up to the synced length, and
//!   recovery takes zeros after the last frame for a torn tail. [`AppendFile::finish`] (a
//!   segment closing) and drop cut the padding and fsync, so closed segments are exact.
//! - Memory stays bounded: past `pending_bytes_max` appended bytes the whole blocks are written
//!   out without waiting for a sync (as page-cache writeback would).
//!
//! ```text
//! file:   | ... whole blocks, in the file ... | tail block | appended, pending ...  |
//!                                             ^ buf_start  ^ file_len             ^ logical end
//! buffer:                                     [.......... len ....................][zero padding]
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::storage::AppendFile;

/// Alignment and granularity of direct writes: the page size, and a multiple of the logical
/// block size of every device the core runs on (512 B or 4 KiB).
pub const DIRECT_BLOCK_BYTES: usize = 4096;
/// Appended bytes held in memory before whole blocks are written out ahead of a sync: bounds
/// the buffer (one per active segment) while staying far above a group commit's bytes.
pub const DIRECT_PENDING_BYTES_MAX: usize = 8 << 20;
/// The buffer's first size; it doubles as appends need, up to the bound above.
const INITIAL_BUFFER_BYTES: usize = 64 << 10;

/// A file opened with `O_DIRECT` for appending (see the module doc).
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    path: PathBuf,
    /// Whether `file` is open with `O_DIRECT` (false after the fallback on `EINVAL`).
    direct: bool,
    /// Whether a write has succeeded, after which `EINVAL` is a real error, not "no O_DIRECT".
    written: bool,
    buf: AlignedBuf,
    /// File position of the buffer's first byte; a multiple of [`DIRECT_BLOCK_BYTES`].
    buf_start: u64,
    /// Valid bytes in the buffer.
    len: usize,
    /// The file's length as written by us (padding included).
    file_len: u64,
    /// Bytes of the logical length known to be in the file (at most the logical length).
    written_to: u64,
    pending_bytes_max: usize,
    /// A write, cut or sync failed: drop writes nothing more. The log may have been reopened
    /// on the same file meanwhile (it reopens after a failed fsync), and the stale pending
    /// bytes must not land after what the new owner recovered.
    failed: bool,
    /// Tests: the next direct write fails with `EINVAL`, as on a file system that accepts
    /// `O_DIRECT` at open but not at write.
    #[cfg(test)]
    refuse_direct_write: bool,
}

impl DirectFile {
    /// Opens `path` (creating it empty if missing) with `O_DIRECT` and reads its partial last
    /// block. Fails with `EINVAL` ([`is_unsupported`]) where the file system has no direct IO.
    pub fn open(path: &Path) -> io::Result<DirectFile> {
        DirectFile::open_bounded(path, DIRECT_PENDING_BYTES_MAX)
    }

    /// [`DirectFile::open`] with another bound on pending bytes (a multiple of the block size;
    /// tests make it tiny).
    pub fn open_bounded(path: &Path, pending_bytes_max: usize) -> io::Result<DirectFile> {
        assert!(
            pending_bytes_max >= DIRECT_BLOCK_BYTES && pending_bytes_max.is_multiple_of(DIRECT_BLOCK_BYTES),
            "pending_bytes_max {pending_bytes_max} is not a positive multiple of the block size"
        );
        let file = OpenOptions::new().read(true).write(true).create(true).custom_flags(o_direct()?).open(path)?;
        let size = file.metadata()?.len();
        let mut f = DirectFile {
            file,
            path: path.to_path_buf(),
            direct: true,
            written: false,
            buf: AlignedBuf::new(INITIAL_BUFFER_BYTES.min(pending_bytes_max)),
            buf_start: 0,
            len: 0,
            file_len: size,
            written_to: size,
            pending_bytes_max,
            failed: false,
            #[cfg(test)]
            refuse_direct_write: false,
        };
        f.load_tail(size)?;
        Ok(f)
    }

    fn logical_len(&self) -> u64 {
        self.buf_start + self.len as u64
    }

    /// Makes the buffer hold the file's partial block below `len` (the file has those bytes).
    fn load_tail(&mut self, len: u64) -> io::Result<()> {
        let block = DIRECT_BLOCK_BYTES as u64;
        self.buf_start = len / block * block;
        self.len = (len - self.buf_start) as usize;
        if self.len == 0 {
            return Ok(());
        }
        // Direct reads want an aligned position, buffer and length: read the whole block.
        self.buf.reserve(DIRECT_BLOCK_BYTES, self.pending_bytes_max);
        let want = self.len;
        let got = loop {
            match self.file.read_at(&mut self.buf.as_mut()[..DIRECT_BLOCK_BYTES], self.buf_start) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        if got < want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: {got} of the last block's {want} bytes read", self.path.display()),
            ));
        }
        Ok(())
    }

    /// Writes `self.buf[..n]` at `buf_start`; on the first write, `EINVAL` means the file
    /// system refuses direct IO after all: reopen buffered and write again.
    fn write_buf(&mut self, n: usize) -> io::Result<()> {
        #[cfg(test)]
        let r = if std::mem::take(&mut self.refuse_direct_write) {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        } else {
            self.file.write_all_at(&self.buf.as_ref()[..n], self.buf_start)
        };
        #[cfg(not(test))]
        let r = self.file.write_all_at(&self.buf.as_ref()[..n], self.buf_start);
        match r {
            Err(e) if is_unsupported(&e) && self.direct && !self.written => {
                tracing::warn!(file = %self.path.display(), error = %e, "direct IO refused; appending through the page cache");
                self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
                self.direct = false;
                self.file.write_all_at(&self.buf.as_ref()[..n], self.buf_start)?;
            }
            r => r?,
        }
        self.written = true;
        Ok(())
    }

    /// Writes the buffer's whole blocks and keeps only the partial one.
    fn write_whole_blocks(&mut self) -> io::Result<()> {
        let whole = self.len / DIRECT_BLOCK_BYTES * DIRECT_BLOCK_BYTES;
        if whole == 0 {
            return Ok(());
        }
        self.write_buf(whole)?;
        self.file_len = self.file_len.max(self.buf_start + whole as u64);
        self.written_to = self.written_to.max(self.buf_start + whole as u64);
        self.drop_whole_blocks();
        Ok(())
    }

    fn drop_whole_blocks(&mut self) {
        let whole = self.len / DIRECT_BLOCK_BYTES * DIRECT_BLOCK_BYTES;
        self.buf.as_mut().copy_within(whole..self.len, 0);
        self.buf_start += whole as u64;
        self.len -= whole;
    }

    /// Puts every appended byte in the file, zero padding after them to the block boundary;
    /// no fsync.
    fn flush(&mut self) -> io::Result<()> {
        let logical = self.logical_len();
        if self.written_to == logical {
            return Ok(());
        }
        let padded = self.len.next_multiple_of(DIRECT_BLOCK_BYTES);
        self.buf.reserve(padded, self.pending_bytes_max);
        self.buf.as_mut()[self.len..padded].fill(0);
        self.write_buf(padded)?;
        self.file_len = self.file_len.max(self.buf_start + padded as u64);
        self.written_to = logical;
        self.drop_whole_blocks();
        Ok(())
    }

    /// [`DirectFile::flush`], then the padding cut off: the file at its exact length.
    fn flush_exact(&mut self) -> io::Result<bool> {
        self.flush()?;
        let logical = self.logical_len();
        if self.file_len <= logical {
            return Ok(false);
        }
        self.file.set_len(logical)?;
        self.file_len = logical;
        Ok(true)
    }
}

impl AppendFile for DirectFile {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        let r = self.append_inner(data);
        self.failed |= r.is_err();
        r
    }

    fn sync(&mut self) -> io::Result<()> {
        let r = self.flush().and_then(|()| self.file.sync_data());
        self.failed |= r.is_err();
        r
    }

    fn finish(&mut self) -> io::Result<()> {
        let r = self.flush_exact().and_then(|_| self.file.sync_data());
        self.failed |= r.is_err();
        r
    }

    /// Cuts the file to `len`, which must not exceed what was appended.
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        let r = self.truncate_inner(len);
        self.failed |= r.is_err();
        r
    }

    /// False after the fallback to buffered writes.
    fn is_direct(&self) -> bool {
        self.direct
    }
}

impl DirectFile {
    fn append_inner(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room = self.pending_bytes_max.saturating_sub(self.len);
            if room == 0 {
                self.write_whole_blocks()?;
                continue;
            }
            let n = room.min(data.len());
            self.buf.reserve(self.len + n, self.pending_bytes_max);
            self.buf.as_mut()[self.len..self.len + n].copy_from_slice(&data[..n]);
            self.len += n;
            data = &data[n..];
        }
        Ok(())
    }

    fn truncate_inner(&mut self, len: u64) -> io::Result<()> {
        let logical = self.logical_len();
        if len > logical {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: cannot truncate to {len}, above the length {logical}", self.path.display()),
            ));
        }
        // The file's real length, not `file_len`: a failed write may have extended it.
        let on_disk = self.file.metadata()?.len();
        if on_disk > len {
            self.file.set_len(len)?;
        }
        self.file_len = on_disk.min(len);
        self.written_to = self.written_to.min(len);
        if len >= self.buf_start {
            self.len = (len - self.buf_start) as usize;
            Ok(())
        } else {
            // Everything below `buf_start` is in the file, so the new tail block is too.
            self.load_tail(len)
        }
    }
}

impl Drop for DirectFile {
    /// Buffered writes would sit in the page cache by now: put pending bytes in the file too,
    /// and cut the padding a sync left (fsynced, so a clean close never looks torn). Not after
    /// a failure, whose owner reopens the file through recovery.
    fn drop(&mut self) {
        if self.failed {
            return;
        }
        let cut = self.flush_exact().and_then(|cut| if cut { self.file.sync_data() } else { Ok(()) });
        if let Err(error) = cut {
            tracing::warn!(file = %self.path.display(), %error, "unsynced appends not written at close");
        }
    }
}

/// The open flag for direct IO; `EINVAL` (so: the buffered fallback) where there is none.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
fn o_direct() -> io::Result<i32> {
    Ok(libc::O_DIRECT)
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
fn o_direct() -> io::Result<i32> {
    Err(io::Error::from_raw_os_error(libc::EINVAL))
}

/// Whether `e` says the file system does not do direct IO (`EINVAL` from open or write).
pub fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// A byte buffer whose start is aligned to [`DIRECT_BLOCK_BYTES`], as `O_DIRECT` wants. The
/// workspace forbids `unsafe`, so instead of an aligned allocation it over-allocates a `Vec`
/// by one block and starts at the first aligned address inside it; the `Vec` never reallocates
/// in place (growth builds a new one), so the start stays aligned.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    cap: usize,
}

impl AlignedBuf {
    fn new(cap: usize) -> AlignedBuf {
        let cap = cap.next_multiple_of(DIRECT_BLOCK_BYTES);
        let raw = vec![0u8; cap + DIRECT_BLOCK_BYTES];
        let start = (DIRECT_BLOCK_BYTES - raw.as_ptr().addr() % DIRECT_BLOCK_BYTES) % DIRECT_BLOCK_BYTES;
        debug_assert_eq!(raw[start..].as_ptr().addr() % DIRECT_BLOCK_BYTES, 0);
        AlignedBuf { raw, start, cap }
    }

    /// Makes room for at least `n` bytes, keeping the contents; doubles, but not past `max`.
    fn reserve(&mut self, n: usize, max: usize) {
        if n <= self.cap {
            return;
        }
        let mut grown = AlignedBuf::new(n.max((self.cap * 2).min(max)));
        grown.as_mut()[..self.cap].copy_from_slice(self.as_ref());
        *self = grown;
    }

    fn as_ref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.cap]
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.cap]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("cap", &self.cap).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::log::storage::{FsStorage, Storage, read_all};

    const B: usize = DIRECT_BLOCK_BYTES;

    fn bytes(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
    }

    fn on_disk(path: &Path) -> Vec<u8> {
        read_all(&FsStorage, path).unwrap()
    }

    /// Whether the file holds `model` and then at most the zero padding of its last block.
    fn holds(path: &Path, model: &[u8]) -> bool {
        let d = on_disk(path);
        d.len() >= model.len()
            && d.len() <= model.len().next_multiple_of(B)
            && d[..model.len()] == *model
            && d[model.len()..].iter().all(|&b| b == 0)
    }

    #[test]
    fn tmp_dir_file_system_does_direct_io() {
        // /tmp is ext4 here: the direct path must really run, not hide behind the fallback.
        let tmp = tempfile::tempdir().unwrap();
        let mut f = DirectFile::open(&tmp.path().join("a.log")).unwrap();
        f.append(&bytes(10, 1)).unwrap();
        f.sync().unwrap();
        assert!(f.is_direct(), "O_DIRECT refused on {}", tmp.path().display());
    }

    #[test]
    fn sync_pads_to_the_block_and_finish_and_drop_leave_the_exact_length() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.log");
        let mut f = DirectFile::open(&path).unwrap();
        let mut model = Vec::new();
        for (i, n) in [1, B - 2, 1, 1, B, 3 * B + 5, 7, B - 7, 0, 2 * B].into_iter().enumerate() {
            let data = bytes(n, i as u8);
            f.append(&data).unwrap();
            model.extend_from_slice(&data);
            f.sync().unwrap();
            let len = std::fs::metadata(&path).unwrap().len();
            assert_eq!(len, model.len().next_multiple_of(B) as u64, "after sync {i}: padded, not cut");
            assert!(holds(&path, &model), "after sync {i}");
            if i == 5 {
                f.finish().unwrap();
                assert_eq!(on_disk(&path), model, "after finish");
            }
        }
        assert!(!model.len().is_multiple_of(B));
        drop(f);
        assert_eq!(on_disk(&path), model, "after drop");
        let mut f = DirectFile::open(&path).unwrap();
        f.append(b"tail").unwrap();
        model.extend_from_slice(b"tail");
        f.sync().unwrap();
        assert!(holds(&path, &model));
        f.finish().unwrap();
        assert_eq!(on_disk(&path), model);
    }

    #[test]
    fn many_small_syncs_rewrite_the_tail_block() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.log");
        let mut f = DirectFile::open(&path).unwrap();
        let reader = FsStorage.open_read(&path).unwrap();
        let mut model = Vec::new();
        for i in 0..600u32 {
            let data = bytes(17 + (i as usize % 50), i as u8);
            f.append(&data).unwrap();
            model.extend_from_slice(&data);
            f.sync().unwrap();
            // A reader through the page cache sees the synced bytes (then the padding).
            assert_eq!(reader.len().unwrap(), model.len().next_multiple_of(B) as u64);
            let mut got = vec![0; model.len()];
            assert_eq!(crate::log::storage::read_full_at(reader.as_ref(), 0, &mut got).unwrap(), model.len());
            assert!(got == model, "reader differs after sync {i}");
        }
        assert!(model.len() > 4 * B);
    }

    #[test]
    fn unsynced_appends_stay_out_of_the_file_until_sync_or_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.log");
        let mut f = DirectFile::open(&path).unwrap();
        f.append(&bytes(100, 1)).unwrap();
        f.sync().unwrap();
        f.append(&bytes(50, 2)).unwrap();
        assert!(holds(&path, &bytes(100, 1)));
        drop(f);
        let mut want = bytes(100, 1);
        want.extend(bytes(50, 2));
        assert_eq!(on_disk(&path), want, "drop writes what a buffered file would hold");
    }

    #[test]
    fn pending_bound_writes_whole_blocks_early() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.log");
        let mut f = DirectFile::open_bounded(&path, 2 * B).unwrap();
        let data = bytes(5 * B + 100, 3);
        f.append(&data).unwrap();
        // Whole blocks went out to keep the buffer within its bound; never a partial block.
        let len = std::fs::metadata(&path).unwrap().len() as usize;
        assert!(len >= 3 * B && len.is_multiple_of(B), "{len}");
        assert_eq!(on_disk(&path), data[..len]);
        assert!(f.buf.cap <= 2 * B, "buffer grew to {}", f.buf.cap);
        f.sync().unwrap();
        assert!(holds(&path, &data));
    }

    #[test]
    fn truncate_inside_the_buffer_and_below_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.log");
        let mut f = DirectFile::open(&path).unwrap();
        let mut model = bytes(3 * B + 10, 4);
        f.append(&model).unwrap();
        f.sync().unwrap();
        f.append(&bytes(30, 5)).unwrap();
        // Inside the pending bytes: nothing of them reaches the file.
        f.truncate(model.len() as u64 + 5).unwrap();
        model.extend(&bytes(30, 5)[..5]);
        f.sync().unwrap();
        assert!(holds(&path, &model));
        // Below the buffer's start: the tail block comes back from the file.
        f.truncate(B as u64 + 7).unwrap();
        model.truncate(B + 7);
        assert_eq!(on_disk(&path), model);
        f.append(b"more").unwrap();
        model.extend_from_slice(b"more");
        f.sync().unwrap();
        assert!(holds(&path, &model));
        assert!(f.truncate(model.len() as u64 + 1).is_err(), "cannot extend");
    }

    #[test]
    fn einval_at_the_first_write_falls_back_to_buffered() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.log");
        let mut f = DirectFile::open(&path).unwrap();
        f.refuse_direct_write = true;
        f.append(&bytes(5000, 1)).unwrap();
        f.sync().unwrap();
        assert!(!f.is_direct());
        f.append(&bytes(10, 2)).unwrap();
        f.sync().unwrap();
        let mut want = bytes(5000, 1);
        want.extend(bytes(10, 2));
        assert!(holds(&path, &want));
        // After a write went through, EINVAL is an error like any other.
        let mut f = DirectFile::open(&path).unwrap();
        f.append(b"x").unwrap();
        f.sync().unwrap();
        f.refuse_direct_write = true;
        f.append(b"y").unwrap();
        assert!(f.sync().is_err());
        assert!(f.is_direct());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Append(usize),
        Sync,
        Finish,
        Truncate(u16),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0usize..3 * B).prop_map(Op::Append),
            2 => Just(Op::Sync),
            1 => Just(Op::Finish),
            1 => any::<u16>().prop_map(Op::Truncate),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Any sequence of operations leaves the direct file byte for byte like a buffered one
        /// after each finish and reopen, and but for zero padding after a sync.
        #[test]
        fn direct_file_matches_buffered_file(ops in proptest::collection::vec(op(), 1..40)) {
            let tmp = tempfile::tempdir().unwrap();
            let (dpath, bpath) = (tmp.path().join("direct.log"), tmp.path().join("buffered.log"));
            let mut direct = DirectFile::open_bounded(&dpath, 2 * B).unwrap();
            let mut buffered = FsStorage.open_append(&bpath).unwrap();
            let mut len = 0u64;
            for (i, op) in ops.iter().enumerate() {
                match op {
                    Op::Append(n) => {
                        let data = bytes(*n, i as u8);
                        direct.append(&data).unwrap();
                        buffered.append(&data).unwrap();
                        len += *n as u64;
                    }
                    Op::Sync => {
                        direct.sync().unwrap();
                        buffered.sync().unwrap();
                    }
                    Op::Finish => {
                        direct.finish().unwrap();
                        buffered.finish().unwrap();
                    }
                    Op::Truncate(at) => {
                        len = if len == 0 { 0 } else { u64::from(*at) % (len + 1) };
                        direct.truncate(len).unwrap();
                        buffered.truncate(len).unwrap();
                        direct.sync().unwrap();
                    }
                    Op::Reopen => {
                        drop(direct);
                        direct = DirectFile::open_bounded(&dpath, 2 * B).unwrap();
                    }
                }
                if matches!(op, Op::Finish | Op::Reopen) {
                    let (d, b) = (on_disk(&dpath), on_disk(&bpath));
                    prop_assert_eq!(d.len() as u64, len, "after op {} {:?}", i, op);
                    prop_assert!(d == b, "contents differ after op {} {:?}", i, op);
                }
                if matches!(op, Op::Sync | Op::Truncate(_)) {
                    prop_assert!(holds(&dpath, &on_disk(&bpath)), "after op {} {:?}", i, op);
                }
            }
            drop(direct);
            prop_assert!(on_disk(&dpath) == on_disk(&bpath));
        }
    }
}
