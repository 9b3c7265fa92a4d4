//! `core-ingest`: the core side of Backhaul (docs/ARCHITECTURE.md). Tiering and reads are not
//! built yet.
//!
//! - [`cli`]: the command line (clap derive).
//! - [`config`]: the TOML config, validated with key and reason.
//! - [`store`]: partition logs, the group-committing writer thread, dedup by seq ranges.
//! - [`server`]: the QUIC acceptor: mTLS, edge id from the certificate, sessions, acks.
//! - [`metrics`]: every metric, declared once.
//! - [`run`]: wires the above into the running node.
//! - [`certs`]: `certs init` and `certs issue`: the deployment's private CA, the core's server
//!   certificate and the edges' client certificates, written as PEM files.

use std::io::Write;

pub mod certs;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod run;
pub mod server;
pub mod store;

use cli::{CertsCommand, Command};

/// Runs `command`, printing what it did to `out`.
pub fn run_command(command: &Command, out: &mut dyn Write) -> Result<(), certs::CertsError> {
    match command {
        Command::Certs(CertsCommand::Init(args)) => certs::init(args, out),
        Command::Certs(CertsCommand::Issue(args)) => certs::issue(args, out),
        Command::Run(_) | Command::Validate(_) => unreachable!("main.rs runs the service commands itself"),
    }
}
