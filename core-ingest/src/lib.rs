//! `core-ingest`: the core side of Backhaul (docs/ARCHITECTURE.md).
//!
//! - [`cli`]: the command line (clap derive).
//! - [`config`]: the TOML config, validated with key and reason.
//! - [`store`]: partition logs, the group-committing writer thread, dedup by seq ranges.
//! - [`server`]: the QUIC acceptor: mTLS, edge id from the certificate, sessions, acks.
//! - [`metrics`]: every metric, declared once.
//! - [`run`]: wires the above into the running node.
//! - [`certs`]: `certs init` and `certs issue`: the deployment's private CA, the core's server
//!   certificate and the edges' client certificates, written as PEM files.
//! - [`logcmd`]: `log verify` and `log dump`, read-only views of a data directory's partition
//!   logs.
//! - [`catalog`]: the SQLite catalog (segments, their producer ranges, edges); all SQL.
//! - [`tier`]: tiering closed segments to object storage (planner, manifest, the async shell).
//! - [`read`]: the read engine over local segments and the bucket, with dedup and cursor.
//! - [`readcmd`]: `read` and `status` on the command line; the status document.
//! - [`readapi`]: the HTTP read API (`/v1/streams`, `/v1/streams/{stream}/records`, `/v1/status`).

use std::io::Write;

pub mod catalog;
pub mod certs;
pub mod cli;
pub mod config;
pub mod logcmd;
pub mod metrics;
pub mod read;
pub mod readapi;
pub mod readcmd;
pub mod run;
pub mod server;
pub mod store;
pub mod tier;

use cli::{CertsCommand, Command, LogCommand};
use logcmd::{CmdError, Outcome};

/// Runs `command`, printing what it did to `out`.
pub fn run_command(command: &Command, out: &mut dyn Write) -> Result<(), certs::CertsError> {
    match command {
        Command::Certs(CertsCommand::Init(args)) => certs::init(args, out),
        Command::Certs(CertsCommand::Issue(args)) => certs::issue(args, out),
        Command::Certs(CertsCommand::Server(args)) => certs::server(args, out),
        Command::Run(_) | Command::Validate(_) | Command::Log(_) | Command::Read(_) | Command::Status(_) => {
            unreachable!("main.rs runs the service and log commands itself")
        }
    }
}

/// Runs a `log` command, writing its output to `out` and problems to `err`. A closed `out`
/// (the reader quit, as `head` does) ends the command with [`Outcome::Clean`].
pub fn run_log(command: &LogCommand, out: &mut dyn Write, err: &mut dyn Write) -> Result<Outcome, CmdError> {
    let result = match command {
        LogCommand::Verify(args) => logcmd::verify(args, out, err),
        LogCommand::Dump(args) => logcmd::dump(args, out, err),
    };
    match result {
        Err(e) if e.is_broken_pipe() => Ok(Outcome::Clean),
        r => r,
    }
}
