//! A data directory's identity: a random 64-bit number drawn when the directory is created and
//! fsynced with it — the edge's producer epoch, the core node's incarnation. A wiped or
//! re-imaged machine gets a new one and so never collides with its earlier life (DESIGN §1, §5).
//!
//! File `identity`, text: `<kind> v1 id=<16 hex digits> crc=<8 hex digits>\n`, the CRC being
//! CRC-32C of everything before ` crc=`.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use crate::log::storage::{FsStorage, Storage};
use crate::log::verify::STREAMS_DIR;

const FILE: &str = "identity";

/// Opens the identity of `data_dir` for `kind` (e.g. `backhaul-edge`), creating the directory
/// and a new id if it is new. Refuses a directory that holds logs but no identity: a new id over
/// old data would hide what happened; the operator restores the file or empties the directory.
pub fn open_or_create(data_dir: &Path, kind: &str) -> io::Result<u64> {
    let path = data_dir.join(FILE);
    match fs::read_to_string(&path) {
        Ok(text) => parse(&text, kind).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: damaged identity file (or not a {kind} directory)", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let streams = data_dir.join(STREAMS_DIR);
            if fs::read_dir(&streams).is_ok_and(|mut d| d.next().is_some()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} holds logs but no {FILE} file: restore it, or empty the directory to start anew",
                        data_dir.display()
                    ),
                ));
            }
            create(data_dir, kind, rand::random::<u64>())
        }
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// The identity of an existing `data_dir` for `kind`, without creating anything: `None` if the
/// directory has no identity file (tools reading a directory a node may not have created yet).
pub fn read_existing(data_dir: &Path, kind: &str) -> io::Result<Option<u64>> {
    let path = data_dir.join(FILE);
    match fs::read_to_string(&path) {
        Ok(text) => parse(&text, kind).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: damaged identity file (or not a {kind} directory)", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

fn create(data_dir: &Path, kind: &str, id: u64) -> io::Result<u64> {
    FsStorage.create_dir_all(data_dir)?;
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(render(kind, id).as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, data_dir.join(FILE))?;
    FsStorage.sync_dir(data_dir)?;
    Ok(id)
}

fn render(kind: &str, id: u64) -> String {
    let body = format!("{kind} v1 id={id:016x}");
    format!("{body} crc={:08x}\n", crc32c::crc32c(body.as_bytes()))
}

fn parse(text: &str, kind: &str) -> Option<u64> {
    let (body, crc) = text.trim_end().rsplit_once(" crc=")?;
    if u32::from_str_radix(crc, 16).ok()? != crc32c::crc32c(body.as_bytes()) {
        return None;
    }
    let hex = body.strip_prefix(kind)?.strip_prefix(" v1 id=")?;
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_created_once_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("data");
        let e1 = open_or_create(&dir, "backhaul-edge").unwrap();
        assert_eq!(open_or_create(&dir, "backhaul-edge").unwrap(), e1);
        assert!(open_or_create(&dir, "backhaul-core").is_err(), "another kind's directory is refused");
        let other = tempfile::tempdir().unwrap();
        assert_ne!(open_or_create(other.path(), "backhaul-edge").unwrap(), e1, "a new directory draws a new id");
    }

    #[test]
    fn damaged_or_missing_identity_over_logs_is_refused() {
        let d = tempfile::tempdir().unwrap();
        open_or_create(d.path(), "k").unwrap();
        let path = d.path().join(FILE);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("id=", "id=f")).unwrap();
        assert!(open_or_create(d.path(), "k").unwrap_err().to_string().contains("damaged"));
        fs::remove_file(&path).unwrap();
        fs::create_dir_all(d.path().join(STREAMS_DIR).join("cdr")).unwrap();
        assert!(open_or_create(d.path(), "k").unwrap_err().to_string().contains("no identity"));
    }
}
