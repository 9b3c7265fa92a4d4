//! `edge-agent`: parse the command line, start tracing on stderr, run the command.
//! Exit status: 0 done, 1 corruption found (or an invalid config for `validate`), 2 usage,
//! config or I/O error.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use edge_agent::cli::{Cli, Command, RulesCommand};
use edge_agent::config::Config;
use edge_agent::logcmd::Outcome;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(error) => {
            // Best effort: if stderr is gone too there is no one left to tell.
            let _ = writeln!(io::stderr(), "edge-agent: {}", message(&error));
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<Outcome> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter(&cli.command)));
    // A log line that cannot be written (stderr on a full disk) is lost, not the agent:
    // tracing-subscriber would report the failure with `eprintln!`, which panics.
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(filter)
        .log_internal_errors(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!(e))
        .context("starting tracing")?;
    let mut out = BufWriter::new(io::stdout().lock());
    match &cli.command {
        Command::Run(args) => {
            let config = Config::load(&args.config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
            runtime.block_on(edge_agent::run::run(config, shutdown_signal()))?;
            Ok(Outcome::Clean)
        }
        Command::Validate(args) => match Config::load(&args.config) {
            Ok(c) => {
                let listeners = c.listen.as_ref().map_or(0, |l| l.tcp.len() + l.tls.len());
                writeln!(
                    out,
                    "{}: ok ({} streams, {} broker connections, {listeners} device listeners)",
                    args.config.display(),
                    c.streams.len(),
                    c.brokers.len()
                )?;
                Ok(Outcome::Clean)
            }
            Err(e) => {
                writeln!(out, "{e}")?;
                Ok(Outcome::Corruption)
            }
        },
        Command::Status(args) => {
            let config = Config::load(&args.config)?;
            edge_agent::status::status(config.admin.listen, &mut out)?;
            Ok(Outcome::Clean)
        }
        Command::Passwd(args) => {
            let mut line = String::new();
            io::stdin().read_line(&mut line).context("reading the password from stdin")?;
            let password = line.strip_suffix('\n').unwrap_or(&line);
            let password = password.strip_suffix('\r').unwrap_or(password);
            if password.is_empty() {
                anyhow::bail!("empty password on stdin");
            }
            if args.iterations < edge_agent::listen::auth::ITERATIONS_MIN {
                anyhow::bail!("--iterations: at least {}", edge_agent::listen::auth::ITERATIONS_MIN);
            }
            writeln!(out, "{}", edge_agent::listen::auth::PasswordHash::make(password, args.iterations))?;
            Ok(Outcome::Clean)
        }
        Command::Log(command) => Ok(edge_agent::run_log_command(command, &mut out, &mut io::stderr())?),
        Command::Rules(RulesCommand::Test(args)) => {
            let config = Config::load(&args.config)?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            let mut stdin = io::stdin().lock();
            let t = edge_agent::shape::trial::run(
                &config,
                &args.stream,
                args.input,
                &args.topic,
                now_ms,
                &mut stdin,
                &mut out,
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            writeln!(
                io::stderr(),
                "{} messages: {} records forwarded, {} filtered, {} dead-lettered",
                t.messages,
                t.forwarded,
                t.filtered,
                t.dead
            )?;
            Ok(Outcome::Clean)
        }
    }
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

/// Tracing directives when `RUST_LOG` is not set.
fn default_filter(command: &Command) -> &'static str {
    match command {
        // The log tools print every problem themselves, in their own format; the log's own
        // recovery messages would say each one twice.
        Command::Log(_) => "warn,shared::log=off",
        _ => "info",
    }
}

/// The error and its causes, each cause once: the libraries' errors already print their
/// source, which `{:#}` would repeat.
fn message(error: &anyhow::Error) -> String {
    let mut msg = error.to_string();
    for cause in error.chain().skip(1).map(ToString::to_string) {
        if !msg.contains(&cause) {
            msg = format!("{msg}: {cause}");
        }
    }
    msg
}
