//! `loadgen`: Backhaul's capacity-test driver. This build only answers `--help` and `--version`.

use clap::Parser;

/// The command line; scenarios arrive with the simulators.
#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Backhaul load generator: simulates MQTT devices and edge agents, impairs the WAN, verifies \
             end to end and reports capacity figures. Not implemented yet: this build only answers --help \
             and --version."
)]
struct Cli {}

fn main() {
    Cli::parse();
}
