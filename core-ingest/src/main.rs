//! `core-ingest`: the core side of Backhaul. This build only answers `--help` and `--version`.

use clap::Parser;

/// The command line; commands arrive with the service.
#[derive(Debug, Parser)]
#[command(
    name = "core-ingest",
    version,
    about = "Backhaul core ingest node: accepts batches from edge agents over QUIC (mTLS), stores them \
             durably in per-partition logs, answers reads and tiers old segments to S3-compatible storage. \
             Not implemented yet: this build only answers --help and --version."
)]
struct Cli {}

fn main() {
    Cli::parse();
}
