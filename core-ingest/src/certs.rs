//! `certs init` and `certs issue`: the deployment's private CA and the certificates it signs,
//! as PEM files (the crypto lives in [`shared::tls`]).
//!
//! ```text
//! DIR/                 0700
//!   ca.pem             CA certificate: every edge and core trusts it (ca_file)
//!   ca.key             0600  CA private key: only `certs issue` needs it
//!   server.pem         this core's certificate, for the names given to `init`
//!   server.key         0600
//!   edges/             0700
//!     <edge id>.pem    an edge's client certificate (CommonName = edge id)
//!     <edge id>.key    0600
//! ```
//!
//! Nothing is ever overwritten: files are opened with `create_new`, keys with mode 0600 from
//! the start, so no other user can open them between creation and a chmod. Every check and all
//! key generation happen before the first file is written.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use shared::tls::{self, TlsError};
use thiserror::Error;

use crate::cli::{InitArgs, IssueArgs, ServerArgs};

/// Default CA validity: ten years, as replacing a CA means touching every edge.
pub const CA_DAYS_DEFAULT: u32 = 3650;
/// Default server certificate validity: 825 days, the longest the CA/Browser Forum allowed for
/// years; renewing it touches only the core.
pub const SERVER_DAYS_DEFAULT: u32 = 825;
/// Default edge certificate validity: as for servers. There is no revocation yet, so a lost
/// edge's certificate stays valid until it expires.
pub const EDGE_DAYS_DEFAULT: u32 = 825;
/// CommonName of the CAs `init` makes, before a random suffix: CAs of different deployments
/// (or a CA and its successor) then differ by name, so a certificate from the wrong one is
/// reported as from an unknown issuer rather than as a bad signature.
const CA_COMMON_NAME: &str = "Backhaul CA";
const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o700;
/// Subdirectory of DIR holding the edges' certificates.
const EDGES_DIR: &str = "edges";

/// Why a `certs` command failed.
#[derive(Debug, Error)]
pub enum CertsError {
    /// A file the command would write is already there.
    #[error("{}: already exists; refusing to overwrite it", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Reading or writing failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Building, reading or signing a certificate failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Printing the report failed.
    #[error("writing to stdout: {0}")]
    Output(#[source] io::Error),
}

/// `certs init`: a new CA and server certificate in `args.dir`.
pub fn init(args: &InitArgs, out: &mut dyn Write) -> Result<(), CertsError> {
    let dir = absolute(&args.dir)?;
    let [ca_pem, ca_key, server_pem, server_key] =
        ["ca.pem", "ca.key", "server.pem", "server.key"].map(|name| dir.join(name));
    for path in [&ca_pem, &ca_key, &server_pem, &server_key] {
        refuse_existing(path)?;
    }
    let ca = tls::generate_ca(&format!("{CA_COMMON_NAME} {:08x}", rand::random::<u32>()), args.ca_days)?;
    let server = tls::issue_server_cert(&ca.0, &ca.1, &args.names, args.days)?;

    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(io_at(parent))?;
    }
    create_private_dir(&dir)?;
    write_new(&ca_key, &ca.1, KEY_MODE)?;
    write_new(&ca_pem, &ca.0, CERT_MODE)?;
    write_new(&server_key, &server.1, KEY_MODE)?;
    write_new(&server_pem, &server.0, CERT_MODE)?;
    sync_dir(&dir)?;

    let names = args.names.join(", ");
    report(out, |out| {
        writeln!(
            out,
            "wrote {} (CA certificate, valid {} days): every edge and core trusts it",
            ca_pem.display(),
            args.ca_days
        )?;
        writeln!(out, "wrote {} (CA private key, mode 0600): `certs issue` needs it; keep it safe", ca_key.display())?;
        writeln!(out, "wrote {} (server certificate for {names}, valid {} days)", server_pem.display(), args.days)?;
        writeln!(out, "wrote {} (server private key, mode 0600)", server_key.display())
    })
}

/// `certs issue`: a client certificate for `args.edge_id`, signed by the CA of `args.dir`.
pub fn issue(args: &IssueArgs, out: &mut dyn Write) -> Result<(), CertsError> {
    let dir = absolute(&args.dir)?;
    let ca_pem_path = dir.join("ca.pem");
    let ca_pem = read_text(&ca_pem_path)?;
    let ca_key = read_text(&dir.join("ca.key"))?;
    let edges = match &args.out {
        Some(out) => absolute(out)?,
        None => dir.join(EDGES_DIR),
    };
    let cert_path = edges.join(format!("{}.pem", args.edge_id));
    let key_path = edges.join(format!("{}.key", args.edge_id));
    refuse_existing(&cert_path)?;
    refuse_existing(&key_path)?;
    let (cert, key) = tls::issue_edge_cert(&ca_pem, &ca_key, &args.edge_id, args.days)?;

    create_private_dir(&edges)?;
    write_new(&key_path, &key, KEY_MODE)?;
    write_new(&cert_path, &cert, CERT_MODE)?;
    sync_dir(&edges)?;

    report(out, |out| {
        writeln!(
            out,
            "wrote {} (certificate of edge {:?}, valid {} days)",
            cert_path.display(),
            args.edge_id,
            args.days
        )?;
        writeln!(out, "wrote {} (its private key, mode 0600)", key_path.display())?;
        writeln!(out, "Copy both and {} to the edge; in its config (paths as on the edge):", ca_pem_path.display())?;
        writeln!(out, "[forward]")?;
        writeln!(out, "cert_file = {}", toml_string(&cert_path))?;
        writeln!(out, "key_file = {}", toml_string(&key_path))?;
        writeln!(out, "ca_file = {}", toml_string(&ca_pem_path))
    })
}

/// `certs server`: a server certificate signed by the CA of `args.dir`, in `args.out`.
pub fn server(args: &ServerArgs, out: &mut dyn Write) -> Result<(), CertsError> {
    let dir = absolute(&args.dir)?;
    let ca_pem = read_text(&dir.join("ca.pem"))?;
    let ca_key = read_text(&dir.join("ca.key"))?;
    let target = absolute(&args.out)?;
    let (cert_path, key_path) = (target.join("server.pem"), target.join("server.key"));
    refuse_existing(&cert_path)?;
    refuse_existing(&key_path)?;
    let (cert, key) = tls::issue_server_cert(&ca_pem, &ca_key, &args.names, args.days)?;

    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_at(parent))?;
    }
    create_private_dir(&target)?;
    write_new(&key_path, &key, KEY_MODE)?;
    write_new(&cert_path, &cert, CERT_MODE)?;
    sync_dir(&target)?;

    let names = args.names.join(", ");
    report(out, |out| {
        writeln!(out, "wrote {} (server certificate for {names}, valid {} days)", cert_path.display(), args.days)?;
        writeln!(out, "wrote {} (server private key, mode 0600)", key_path.display())?;
        writeln!(out, "To rotate: move the key, then the certificate, over the node's files and reload it (SIGHUP)")
    })
}

fn report(out: &mut dyn Write, f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<(), CertsError> {
    f(out).and_then(|()| out.flush()).map_err(CertsError::Output)
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CertsError + '_ {
    move |source| CertsError::Io { path: path.to_owned(), source }
}

/// Printed paths are absolute, so the config lines are usable as printed.
fn absolute(dir: &Path) -> Result<PathBuf, CertsError> {
    std::path::absolute(dir).map_err(io_at(dir))
}

fn refuse_existing(path: &Path) -> Result<(), CertsError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Err(CertsError::Exists { path: path.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(path)(e)),
    }
}

/// Creates `dir` with mode 0700; an existing directory is kept as it is.
fn create_private_dir(dir: &Path) -> Result<(), CertsError> {
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io_at(dir)(e)),
    }
}

/// Writes a new file with `mode` from its creation, and fsyncs it.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), CertsError> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            CertsError::Exists { path: path.to_owned() }
        } else {
            io_at(path)(e)
        }
    })?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(io_at(path))
}

fn sync_dir(dir: &Path) -> Result<(), CertsError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

fn read_text(path: &Path) -> Result<String, CertsError> {
    let bytes = tls::load_pem_file(path)?;
    String::from_utf8(bytes).map_err(|_| io_at(path)(io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text")))
}

/// `path` as a TOML basic string, quoted and escaped.
fn toml_string(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_string_round_trips() {
        for path in ["/etc/backhaul/edge-1.pem", r#"/a"b\c'd"#, "/é/x y"] {
            let line = format!("k = {}", toml_string(Path::new(path)));
            let table: toml::Table = toml::from_str(&line).unwrap();
            assert_eq!(table["k"].as_str(), Some(path), "{line}");
        }
    }
}
