//! The data directory's identity: the producer epoch, drawn at random when the directory is
//! created and fsynced with it. A wiped or re-imaged edge gets a new epoch and so never reuses
//! the seqs of its earlier life (DESIGN §1).
//!
//! File `identity`, text: `backhaul-edge v1 epoch=<16 hex digits> crc=<8 hex digits>\n`, the CRC
//! being CRC-32C of everything before ` crc=`.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use shared::ids::Epoch;
use shared::log::verify::STREAMS_DIR;

const FILE: &str = "identity";

/// Opens the identity of `data_dir`, creating the directory and a new epoch if it is new.
/// Refuses a directory that holds logs but no identity: starting a new epoch over old data
/// would hide what happened; the operator restores the file or empties the directory.
pub fn open_or_create(data_dir: &Path) -> io::Result<Epoch> {
    let path = data_dir.join(FILE);
    match fs::read_to_string(&path) {
        Ok(text) => parse(&text).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: damaged identity file", path.display()))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let streams = data_dir.join(STREAMS_DIR);
            if fs::read_dir(&streams).is_ok_and(|mut d| d.next().is_some()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} holds logs but no {FILE} file: restore it, or empty the directory to start a new epoch",
                        data_dir.display()
                    ),
                ));
            }
            create(data_dir, Epoch(rand::random::<u64>()))
        }
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

fn create(data_dir: &Path, epoch: Epoch) -> io::Result<Epoch> {
    shared::log::storage::Storage::create_dir_all(&shared::log::storage::FsStorage, data_dir)?;
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(render(epoch).as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, data_dir.join(FILE))?;
    fs::File::open(data_dir)?.sync_all()?;
    Ok(epoch)
}

fn render(epoch: Epoch) -> String {
    let body = format!("backhaul-edge v1 epoch={:016x}", epoch.0);
    format!("{body} crc={:08x}\n", crc32c::crc32c(body.as_bytes()))
}

fn parse(text: &str) -> Option<Epoch> {
    let (body, crc) = text.trim_end().rsplit_once(" crc=")?;
    if u32::from_str_radix(crc, 16).ok()? != crc32c::crc32c(body.as_bytes()) {
        return None;
    }
    let hex = body.strip_prefix("backhaul-edge v1 epoch=")?;
    u64::from_str_radix(hex, 16).ok().map(Epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_is_created_once_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("data");
        let e1 = open_or_create(&dir).unwrap();
        assert_eq!(open_or_create(&dir).unwrap(), e1);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(open_or_create(other.path()).unwrap(), e1, "a new directory draws a new epoch");
    }

    #[test]
    fn damaged_or_missing_identity_over_logs_is_refused() {
        let d = tempfile::tempdir().unwrap();
        open_or_create(d.path()).unwrap();
        let path = d.path().join(FILE);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("epoch=", "epoch=f")).unwrap();
        assert!(open_or_create(d.path()).unwrap_err().to_string().contains("damaged"));
        fs::remove_file(&path).unwrap();
        fs::create_dir_all(d.path().join(STREAMS_DIR).join("cdr")).unwrap();
        assert!(open_or_create(d.path()).unwrap_err().to_string().contains("no identity"));
    }
}
