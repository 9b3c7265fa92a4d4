//! The storage seam under the log: the few file operations it needs, a real implementation on
//! `std::fs`, and (in [`super::sim`]) one that simulates power loss and full disks.
//!
//! Every path is absolute or relative to the process; implementations add no prefix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::direct::{DirectFile, is_unsupported};

/// A file opened for appending, the active segment.
pub trait AppendFile: Send + std::fmt::Debug {
    /// Writes all of `data` at the end. On error some prefix of it may have been written.
    fn append(&mut self, data: &[u8]) -> io::Result<()>;
    /// Writes `parts` one after the other at the end, as one `append` of their concatenation
    /// would (a frame's header and its batch, without gathering them in a buffer first).
    fn append_parts(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        parts.iter().try_for_each(|p| self.append(p))
    }
    /// Makes everything written so far durable (fsync / fdatasync). Direct IO may leave zero
    /// padding after the data, to the block boundary.
    fn sync(&mut self) -> io::Result<()>;
    /// [`AppendFile::sync`] at the file's exact length, as its segment closes.
    fn finish(&mut self) -> io::Result<()> {
        self.sync()
    }
    /// Cuts the file to `len` bytes.
    fn truncate(&mut self, len: u64) -> io::Result<()>;

    /// Whether appends bypass the page cache (direct IO).
    fn is_direct(&self) -> bool {
        false
    }
}

/// A file opened for positional reads.
pub trait ReadFile: Send + Sync + std::fmt::Debug {
    /// Reads up to `buf.len()` bytes at `pos`; returns how many (0 at the end).
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// The file system as the log sees it.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Creates `dir` and its parents (durably: new directories are fsynced into their parent).
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) in `dir`.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens `path` for appending, creating it empty if missing.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>>;
    /// Opens `path` for appending with direct IO where the implementation and the file system
    /// have it: appends may wait in memory until [`AppendFile::sync`] (or the file's drop), so
    /// the file holds only what was synced or flushed. Falls back to [`Storage::open_append`].
    fn open_append_direct(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        self.open_append(path)
    }
    /// Opens `path` for reading.
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn ReadFile>>;
    /// Creates or replaces `path` with `data` and fsyncs the file (not the directory).
    fn write_file_synced(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// Reads all of `path` through `storage`.
pub fn read_all(storage: &dyn Storage, path: &Path) -> io::Result<Vec<u8>> {
    let f = storage.open_read(path)?;
    let len = f.len()?;
    let len = usize::try_from(len).map_err(|_| io::Error::other("file larger than memory"))?;
    let mut buf = vec![0; len];
    let n = read_full_at(f.as_ref(), 0, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Reads into `buf` at `pos` until it is full or the file ends; returns the bytes read.
pub fn read_full_at(f: &dyn ReadFile, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(pos + done as u64, &mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct FsStorage;

#[derive(Debug)]
struct FsFile(File);

impl AppendFile for FsFile {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.0.write_all(data)
    }

    fn append_parts(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        // One `writev` in the common case; a short write carries on where it stopped.
        let mut slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        io::IoSlice::advance_slices(&mut rest, 0);
        while !rest.is_empty() {
            match self.0.write_vectored(rest) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "failed to write whole frame")),
                Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl ReadFile for FsFile {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_at(buf, pos)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl Storage for FsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        // Find the first missing ancestor, create the chain, then fsync each new entry's parent.
        let mut missing: Vec<PathBuf> = Vec::new();
        let mut at = Some(dir);
        while let Some(d) = at {
            if d.as_os_str().is_empty() || d.exists() {
                break;
            }
            missing.push(d.to_path_buf());
            at = d.parent();
        }
        fs::create_dir_all(dir)?;
        for d in missing.iter().rev() {
            if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
                self.sync_dir(parent)?;
            }
        }
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Box::new(FsFile(f)))
    }

    /// Opens with `O_DIRECT` ([`DirectFile`]); where the file system refuses it (`EINVAL`:
    /// some FUSE, tmpfs on older kernels), warns once for the file and appends buffered.
    fn open_append_direct(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        match DirectFile::open(path) {
            Ok(f) => Ok(Box::new(f)),
            Err(error) if is_unsupported(&error) => {
                tracing::warn!(file = %path.display(), %error, "direct IO refused; appending through the page cache");
                self.open_append(path)
            }
            Err(e) => Err(e),
        }
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn ReadFile>> {
        Ok(Box::new(FsFile(File::open(path)?)))
    }

    fn write_file_synced(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut f = File::create(path)?;
        f.write_all(data)?;
        f.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appending_parts_writes_their_concatenation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = FsStorage.open_append(&path).unwrap();
        let big = vec![7u8; 300_000];
        f.append_parts(&[b"head", b"", &big, b"tail"]).unwrap();
        f.append(b"!").unwrap();
        f.sync().unwrap();
        let mut want = b"head".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"tail!");
        assert_eq!(read_all(&FsStorage, &path).unwrap(), want);
    }
}
