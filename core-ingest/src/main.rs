//! `core-ingest`: parse the command line, start tracing, run the command.
//! Exit status: 0 done, 1 refused or failed (or an invalid config for `validate`), 2 usage error.
//! `log verify` / `log dump` as the edge's: 0 clean, 1 corruption, 2 usage or I/O error.
//! `read`: 0 done, 1 damage met (reported, the rest printed), 2 usage, config or I/O error.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use core_ingest::cli::{Cli, Command, LogCommand};
use core_ingest::config::Config;
use tracing_subscriber::EnvFilter;

/// mimalloc: quinn allocates a buffer per batch of received datagrams and the data streams
/// free them on other threads; glibc's malloc spent ~5% of the core's CPU on that, mimalloc
/// ~2% (median CPU per GB over 6 alternating runs 1.31 against 1.46; BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter(&cli.command)));
    // A log line that cannot be written (stderr on a full disk) is lost, not the node:
    // tracing-subscriber would report the failure with `eprintln!`, which panics.
    let _ =
        tracing_subscriber::fmt().with_writer(io::stderr).with_env_filter(filter).log_internal_errors(false).try_init();
    if let Command::Log(command) = &cli.command {
        return run_log_command(command);
    }
    if let Command::Read(args) = &cli.command {
        let mut out = BufWriter::new(io::stdout().lock());
        return match core_ingest::readcmd::read(args, &mut out, &mut io::stderr()) {
            Ok(code) => ExitCode::from(code),
            Err(error) => {
                let _ = writeln!(io::stderr(), "core-ingest: {error:#}");
                ExitCode::from(2)
            }
        };
    }
    let result = match &cli.command {
        Command::Run(args) => run(&args.config),
        Command::Status(args) => core_ingest::readcmd::status(&args.config, &mut io::stdout().lock()),
        Command::Validate(args) => match Config::load(&args.config) {
            Ok(c) => {
                let _ = writeln!(io::stdout(), "{}: ok (node {}, listen {})", args.config.display(), c.node, c.listen);
                Ok(())
            }
            Err(e) => {
                let _ = writeln!(io::stdout(), "{e}");
                return ExitCode::from(1);
            }
        },
        command => core_ingest::run_command(command, &mut io::stdout().lock()).map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Best effort: if stderr is gone too there is no one left to tell.
            let _ = writeln!(io::stderr(), "core-ingest: {error:#}");
            ExitCode::from(1)
        }
    }
}

/// Tracing directives when `RUST_LOG` is not set.
fn default_filter(command: &Command) -> &'static str {
    match command {
        // The log tools print every problem themselves, in their own format; the log's own
        // recovery messages would say each one twice.
        Command::Log(_) | Command::Read(_) => "warn,shared::log=off",
        _ => "info",
    }
}

fn run_log_command(command: &LogCommand) -> ExitCode {
    let mut out = BufWriter::new(io::stdout().lock());
    match core_ingest::run_log(command, &mut out, &mut io::stderr()) {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(error) => {
            let _ = writeln!(io::stderr(), "core-ingest: {error}");
            ExitCode::from(2)
        }
    }
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(core_ingest::run::run(config, shutdown_signal()))
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
