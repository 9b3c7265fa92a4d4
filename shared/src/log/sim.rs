//! An in-memory [`Storage`] that does to the log what power loss and full disks do.
//!
//! Each file keeps what was written and what was last fsynced; each directory keeps its entries
//! and the entries as of its last fsync. [`SimStorage::crash`] then plays power loss: every
//! write since the file's last fsync may vanish, survive, or be torn (512-byte sectors chosen
//! independently from the old bytes, the new bytes or zeros), and every directory entry not yet
//! fsynced may revert. Bytes that were fsynced and not changed since always survive. Handles
//! opened before a crash fail afterwards, as a process's would after a reboot.
//!
//! Simplification: directories themselves are created durably (the log fsyncs their parents).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::storage::{AppendFile, ReadFile, Storage};

const SECTOR: usize = 512;

/// Faults the simulated disk injects; change them between calls with [`SimStorage::set_faults`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Total bytes the disk holds; an append past it writes what fits and fails with
    /// `StorageFull`. `None`: unbounded.
    pub capacity_bytes: Option<u64>,
    /// The next this many fsyncs (of files or directories) fail with an I/O error.
    pub fail_syncs: u32,
}

/// The simulated disk. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct SimStorage {
    state: Arc<Mutex<SimState>>,
}

#[derive(Debug, Default)]
struct SimState {
    inodes: HashMap<u64, Inode>,
    next_inode: u64,
    dirs: BTreeMap<PathBuf, Dir>,
    generation: u64,
    faults: Faults,
}

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    synced: Vec<u8>,
    linked: bool,
}

#[derive(Debug, Default)]
struct Dir {
    entries: BTreeMap<String, u64>,
    synced: BTreeMap<String, u64>,
}

impl SimStorage {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Power loss, decided by `seed`. Afterwards the disk holds what a reboot would find.
    pub fn crash(&self, seed: u64) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut st = self.lock();
        for dir in st.dirs.values_mut() {
            let names: BTreeSet<String> = dir.entries.keys().chain(dir.synced.keys()).cloned().collect();
            let mut after = BTreeMap::new();
            for name in names {
                let (now, then) = (dir.entries.get(&name).copied(), dir.synced.get(&name).copied());
                let pick = if now == then || rng.gen_bool(0.5) { now } else { then };
                if let Some(ino) = pick {
                    after.insert(name, ino);
                }
            }
            dir.entries = after.clone();
            dir.synced = after;
        }
        for inode in st.inodes.values_mut() {
            if inode.data != inode.synced {
                let torn = tear(&inode.synced, &inode.data, &mut rng);
                inode.data = torn.clone();
                inode.synced = torn;
            }
        }
        let linked: BTreeSet<u64> = st.dirs.values().flat_map(|d| d.entries.values().copied()).collect();
        for (ino, inode) in st.inodes.iter_mut() {
            inode.linked = linked.contains(ino);
        }
        st.generation += 1;
    }

    /// Changes a file's bytes in place, durably, as media corruption would.
    pub fn corrupt(&self, path: &Path, f: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
        let mut st = self.lock();
        let ino = st.lookup(path)?;
        let inode = st.inodes.get_mut(&ino).expect("linked inode exists");
        f(&mut inode.data);
        inode.synced = inode.data.clone();
        Ok(())
    }

    /// Bytes held by linked files.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used()
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic in a test thread holding the lock leaves the state usable for inspection.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SimState {
    fn used(&self) -> u64 {
        self.inodes.values().filter(|i| i.linked).map(|i| i.data.len() as u64).sum()
    }

    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let (dir, name) = split(path)?;
        self.dirs
            .get(dir)
            .and_then(|d| d.entries.get(name).copied())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file", path.display())))
    }

    fn dir_mut(&mut self, dir: &Path) -> io::Result<&mut Dir> {
        self.dirs
            .get_mut(dir)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{}: no such directory", dir.display())))
    }

    fn take_sync_fault(&mut self) -> io::Result<()> {
        if self.faults.fail_syncs > 0 {
            self.faults.fail_syncs -= 1;
            return Err(io::Error::other("simulated fsync failure"));
        }
        Ok(())
    }

    fn create(&mut self, path: &Path) -> io::Result<u64> {
        let (dir, name) = split(path)?;
        let ino = self.next_inode;
        self.next_inode += 1;
        self.inodes.insert(ino, Inode { linked: true, ..Inode::default() });
        if let Some(old) = self.dir_mut(dir)?.entries.insert(name.to_owned(), ino) {
            self.unlink_if_orphan(old);
        }
        Ok(ino)
    }

    fn unlink_if_orphan(&mut self, ino: u64) {
        let still = self.dirs.values().any(|d| d.entries.values().any(|&i| i == ino));
        if let Some(inode) = self.inodes.get_mut(&ino) {
            inode.linked = still;
        }
    }
}

fn split(path: &Path) -> io::Result<(&Path, &str)> {
    let dir = path.parent().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok((dir, name))
}

/// What a disk holds after power loss, sector by sector, where `old` was fsynced and `new`
/// was written since.
fn tear(old: &[u8], new: &[u8], rng: &mut SmallRng) -> Vec<u8> {
    let (lo, hi) = (old.len().min(new.len()), old.len().max(new.len()));
    let len = rng.gen_range(lo..=hi);
    let mut out = vec![0u8; len];
    for start in (0..len).step_by(SECTOR) {
        let end = (start + SECTOR).min(len);
        let (o, n) = (old.get(start..end), new.get(start..end));
        let src = match (o, n) {
            (Some(o), Some(n)) if o == n => Some(o),
            _ => match rng.gen_range(0..10) {
                0..=3 => o,
                4..=7 => n,
                _ => None,
            },
        };
        if let Some(src) = src {
            out[start..end].copy_from_slice(src);
        } else {
            // Partially present sources (a sector straddling an old length) or zeros.
            let fill = o.or(n).filter(|_| rng.gen_bool(0.5));
            if let Some(fill) = fill {
                out[start..start + fill.len()].copy_from_slice(fill);
            }
        }
    }
    // Bytes that were fsynced and not rewritten since always survive, whatever the sector.
    let stable = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    out[..stable].copy_from_slice(&old[..stable]);
    out
}

#[derive(Debug)]
struct SimFile {
    state: Arc<Mutex<SimState>>,
    inode: u64,
    generation: u64,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut SimState, u64) -> io::Result<T>) -> io::Result<T> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.generation != self.generation {
            return Err(io::Error::other("stale handle: opened before a simulated power loss"));
        }
        f(&mut st, self.inode)
    }
}

impl AppendFile for SimFile {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.with(|st, ino| {
            let room = st.faults.capacity_bytes.map(|cap| cap.saturating_sub(st.used()));
            let inode = st.inodes.get_mut(&ino).expect("open inode exists");
            match room {
                Some(room) if (room as usize) < data.len() => {
                    inode.data.extend_from_slice(&data[..room as usize]);
                    Err(io::Error::new(io::ErrorKind::StorageFull, "simulated disk full"))
                }
                _ => {
                    inode.data.extend_from_slice(data);
                    Ok(())
                }
            }
        })
    }

    fn sync(&mut self) -> io::Result<()> {
        self.with(|st, ino| {
            st.take_sync_fault()?;
            let inode = st.inodes.get_mut(&ino).expect("open inode exists");
            inode.synced = inode.data.clone();
            Ok(())
        })
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.with(|st, ino| {
            let inode = st.inodes.get_mut(&ino).expect("open inode exists");
            inode.data.truncate(len as usize);
            Ok(())
        })
    }
}

impl ReadFile for SimFile {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.with(|st, ino| {
            let data = &st.inodes[&ino].data;
            let start = (pos as usize).min(data.len());
            let n = buf.len().min(data.len() - start);
            buf[..n].copy_from_slice(&data[start..start + n]);
            Ok(n)
        })
    }

    fn len(&self) -> io::Result<u64> {
        self.with(|st, ino| Ok(st.inodes[&ino].data.len() as u64))
    }
}

impl Storage for SimStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        for d in dir.ancestors() {
            st.dirs.entry(d.to_path_buf()).or_default();
        }
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut st = self.lock();
        let mut names: Vec<String> = st.dir_mut(dir)?.entries.keys().cloned().collect();
        let prefix_len = dir.components().count();
        let subdirs = st.dirs.keys().filter(|d| d.starts_with(dir) && d.components().count() == prefix_len + 1);
        names.extend(subdirs.filter_map(|d| d.file_name()?.to_str().map(str::to_owned)));
        names.sort();
        Ok(names)
    }

    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        let mut st = self.lock();
        let ino = match st.lookup(path) {
            Ok(ino) => ino,
            Err(_) => st.create(path)?,
        };
        Ok(Box::new(SimFile { state: self.state.clone(), inode: ino, generation: st.generation }))
    }

    fn open_read(&self, path: &Path) -> io::Result<Box<dyn ReadFile>> {
        let st = self.lock();
        let ino = st.lookup(path)?;
        Ok(Box::new(SimFile { state: self.state.clone(), inode: ino, generation: st.generation }))
    }

    fn write_file_synced(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut st = self.lock();
        if let Some(cap) = st.faults.capacity_bytes
            && st.used() + data.len() as u64 > cap
        {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "simulated disk full"));
        }
        st.take_sync_fault()?;
        let ino = st.create(path)?;
        let inode = st.inodes.get_mut(&ino).expect("just created");
        inode.data = data.to_vec();
        inode.synced = data.to_vec();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let ino = st.lookup(from)?;
        let (fdir, fname) = split(from)?;
        let (tdir, tname) = split(to)?;
        st.dir_mut(fdir)?.entries.remove(fname);
        let old = st.dir_mut(tdir)?.entries.insert(tname.to_owned(), ino);
        if let Some(old) = old.filter(|&o| o != ino) {
            st.unlink_if_orphan(old);
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut st = self.lock();
        let ino = st.lookup(path)?;
        let (dir, name) = split(path)?;
        st.dir_mut(dir)?.entries.remove(name);
        st.unlink_if_orphan(ino);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.lock();
        st.take_sync_fault()?;
        let d = st.dir_mut(dir)?;
        d.synced = d.entries.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_bytes_survive_every_crash() {
        for seed in 0..200 {
            let sim = SimStorage::new();
            let dir = Path::new("/d");
            sim.create_dir_all(dir).unwrap();
            let mut f = sim.open_append(&dir.join("f")).unwrap();
            f.append(&[1; 1000]).unwrap();
            f.sync().unwrap();
            sim.sync_dir(dir).unwrap();
            f.append(&[2; 3000]).unwrap();
            sim.crash(seed);
            let r = sim.open_read(&dir.join("f")).unwrap();
            let mut buf = vec![0; 4000];
            let n = crate::log::storage::read_full_at(r.as_ref(), 0, &mut buf).unwrap();
            assert!((1000..=4000).contains(&n), "seed {seed}: {n}");
            assert!(buf[..1000].iter().all(|&b| b == 1), "seed {seed}");
        }
    }

    #[test]
    fn unsynced_directory_entries_may_vanish() {
        let mut vanished = 0;
        for seed in 0..50 {
            let sim = SimStorage::new();
            let dir = Path::new("/d");
            sim.create_dir_all(dir).unwrap();
            let mut f = sim.open_append(&dir.join("f")).unwrap();
            f.append(b"x").unwrap();
            f.sync().unwrap();
            sim.crash(seed);
            if sim.open_read(&dir.join("f")).is_err() {
                vanished += 1;
            }
        }
        assert!(vanished > 0 && vanished < 50, "{vanished}");
    }

    #[test]
    fn full_disk_writes_a_prefix_and_fails() {
        let sim = SimStorage::new();
        sim.create_dir_all(Path::new("/d")).unwrap();
        sim.set_faults(Faults { capacity_bytes: Some(10), fail_syncs: 0 });
        let mut f = sim.open_append(Path::new("/d/f")).unwrap();
        let err = f.append(&[0; 25]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert_eq!(sim.used_bytes(), 10);
    }
}
