//! The command line. `main.rs` parses it; [`crate::run_command`] runs it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::certs::{CA_DAYS_DEFAULT, EDGE_DAYS_DEFAULT, SERVER_DAYS_DEFAULT};

/// The core's command line.
#[derive(Debug, Parser)]
#[command(
    name = "core-ingest",
    version,
    about = "Backhaul core ingest node: accepts batches from edge agents over QUIC (mTLS), stores them \
             durably in per-partition logs with dedup, acknowledges after the fsync, tiers closed segments \
             to object storage and reads records back from disk and bucket alike.",
    arg_required_else_help = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node: accept edges over QUIC, store their batches, ack after the fsync.
    Run(ConfigArgs),
    /// Check a config file and print every problem with its key; exit 1 if there is any.
    Validate(ConfigArgs),
    /// The deployment's private CA and its certificates: edges and cores trust only it.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Inspect the partition logs of a data directory; read-only, safe while the node runs.
    #[command(subcommand)]
    Log(LogCommand),
    /// Print a stream's records as NDJSON (edge, epoch, stream, seq, ts, topic, payload or
    /// payload_b64, attrs), from local segments and the bucket alike, each record once.
    #[command(after_help = "With --limit, the cursor to continue from is printed on stderr as `next_cursor=C` \
                            when more may follow. Damage is reported on stderr with its object key (or file) \
                            and byte offset; the records around it are still printed. Exit status: 0 done, \
                            1 damage met, 2 usage, config or I/O error.")]
    Read(ReadArgs),
    /// Print the node's status as JSON from its catalog: edges (last seen, lag, records, bytes,
    /// gaps), per stream bytes local and tiered, the tiering backlog.
    Status(ConfigArgs),
}

/// Arguments of `read`.
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// The node's config file (data directory and object store).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Stream to read.
    #[arg(long)]
    pub stream: String,
    /// Records with event time at or after T (RFC 3339 or ms since the epoch).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Records with event time before T (RFC 3339 or ms since the epoch).
    #[arg(long, value_name = "T")]
    pub until: Option<String>,
    /// Only this edge's records.
    #[arg(long, value_name = "ID")]
    pub edge: Option<String>,
    /// At most N records.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Continue after a previous read (its `next_cursor`).
    #[arg(long, value_name = "C")]
    pub cursor: Option<String>,
}

/// `core-ingest log …`
#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Scan every segment of every partition and report what each holds (per edge and epoch,
    /// the seq ranges) and what is wrong, with file and byte offset.
    #[command(after_help = "Exit status: 0 no corruption (torn tails and missing indexes are normal after a \
                            power cut), 1 corruption found, 2 usage or I/O error.")]
    Verify(VerifyArgs),
    /// Print a stream's records as NDJSON: edge, epoch, stream, seq, ts, topic, payload or
    /// payload_b64, attrs; partition by partition, in the order they were stored.
    #[command(after_help = "Seqs are the producer's (from each batch's header), not log offsets. Gap \
                            batches and damaged ranges print no records; they are reported on stderr. \
                            Exit status: 0 done (also when stdout closes early), 1 corruption met, 2 usage \
                            or I/O error.")]
    Dump(DumpArgs),
}

/// Arguments of `log verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The node's data directory (partitions live in DIR/streams/STREAM/PARTITION/).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Verify only this stream.
    #[arg(long, value_name = "STREAM", value_parser = stream_name)]
    pub stream: Option<String>,
}

/// Arguments of `log dump`.
#[derive(Debug, Args)]
pub struct DumpArgs {
    /// The node's data directory (partitions live in DIR/streams/STREAM/PARTITION/).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The stream to print.
    #[arg(long, value_name = "STREAM", value_parser = stream_name)]
    pub stream: String,
    /// Print only the records of this edge (every epoch of it).
    #[arg(long = "edge", value_name = "ID", value_parser = edge_filter)]
    pub edge: Option<String>,
    /// Print only records whose seq is at least N (seqs count per edge, epoch and stream).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub from_seq: u64,
    /// Print at most N records.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
}

/// Arguments of the commands that read the config.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The TOML config (see deploy/core-ingest.example.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// `core-ingest certs …`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a CA and this core's server certificate: DIR/ca.pem, ca.key, server.pem, server.key.
    #[command(after_help = "Refuses to overwrite any of the four files. Keys are written with mode 0600, \
                            DIR is created with mode 0700. Exit status: 0 done, 1 refused or failed, 2 usage \
                            error.")]
    Init(InitArgs),
    /// Issue an edge's client certificate, signed by the CA of DIR: DIR/edges/ID.pem and ID.key.
    #[command(after_help = "Refuses to overwrite an existing certificate or key. Prints the lines for the \
                            edge's config. Exit status: 0 done, 1 refused or failed, 2 usage error.")]
    Issue(IssueArgs),
    /// Issue a new server certificate from the CA of DIR, for renewal or another core:
    /// OUT/server.pem and OUT/server.key.
    #[command(after_help = "Refuses to overwrite an existing certificate or key. To rotate a core's \
                            certificate: move both files over the node's (key first) and reload it \
                            (SIGHUP). Exit status: 0 done, 1 refused or failed, 2 usage error.")]
    Server(ServerArgs),
}

/// Arguments of `certs server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The directory `certs init` wrote; the CA is read from it.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Directory to write server.pem and server.key to; created (mode 0700) if missing.
    #[arg(long, value_name = "OUT")]
    pub out: PathBuf,
    /// A DNS name or IP address edges use to reach the core; repeat for several. The first is
    /// also the certificate's CommonName.
    #[arg(long = "name", value_name = "HOST", required = true)]
    pub names: Vec<String>,
    /// Days the server certificate is valid.
    #[arg(long, value_name = "N", default_value_t = SERVER_DAYS_DEFAULT, value_parser = clap::value_parser!(u32).range(1..))]
    pub days: u32,
}

/// Arguments of `certs init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to write to; created (mode 0700) if missing.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// A DNS name or IP address edges use to reach this core; repeat for several. The first is
    /// also the certificate's CommonName.
    #[arg(long = "name", value_name = "HOST", required = true)]
    pub names: Vec<String>,
    /// Days the server certificate is valid.
    #[arg(long, value_name = "N", default_value_t = SERVER_DAYS_DEFAULT, value_parser = clap::value_parser!(u32).range(1..))]
    pub days: u32,
    /// Days the CA is valid; no certificate it issues may outlive it.
    #[arg(long, value_name = "N", default_value_t = CA_DAYS_DEFAULT, value_parser = clap::value_parser!(u32).range(1..))]
    pub ca_days: u32,
}

/// Arguments of `certs issue`.
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The directory `certs init` wrote; the CA is read from it.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The edge's id: its `edge_id` setting, the producer of its batches, the certificate's
    /// CommonName.
    #[arg(long, value_name = "ID", value_parser = edge_id)]
    pub edge_id: String,
    /// Days the certificate is valid.
    #[arg(long, value_name = "N", default_value_t = EDGE_DAYS_DEFAULT, value_parser = clap::value_parser!(u32).range(1..))]
    pub days: u32,
    /// Directory to write ID.pem and ID.key to instead of DIR/edges (to renew a certificate
    /// whose files are there already); created (mode 0700) if missing.
    #[arg(long, value_name = "OUT")]
    pub out: Option<PathBuf>,
}

/// A valid producer id that can also name the certificate's files.
fn edge_id(s: &str) -> Result<String, String> {
    shared::tls::check_edge_id(s).map_err(|e| e.to_string())?;
    if s.contains('/') {
        return Err("an edge id with '/' cannot name its certificate file".into());
    }
    Ok(s.to_owned())
}

fn stream_name(s: &str) -> Result<String, String> {
    if shared::batch::is_valid_stream_name(s) {
        Ok(s.to_owned())
    } else {
        Err("a stream name is 1 to 64 of a-z 0-9 _ . -".into())
    }
}

/// Any valid producer id (unlike [`edge_id`], '/' is fine: no file is named after it).
fn edge_filter(s: &str) -> Result<String, String> {
    shared::tls::check_edge_id(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn edge_ids_are_checked() {
        assert!(edge_id("edge-lyon-01").is_ok());
        assert!(edge_id("site 7 · cell ü").is_ok());
        for bad in ["", "a/b", "edge\u{7}", &"e".repeat(65)] {
            assert!(edge_id(bad).is_err(), "{bad:?}");
        }
    }
}
