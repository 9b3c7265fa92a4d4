//! The command line. `main.rs` parses it and runs the command (log commands through [`crate::run_log_command`]).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The edge agent's command line.
#[derive(Debug, Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Backhaul edge agent: takes telemetry from MQTT (as a broker's subscriber, or as the devices' \
             own endpoint) into a crash-safe local log, acknowledging each message only once it is durable, \
             shapes it by per-stream rules, and forwards it to core-ingest over QUIC.",
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
    /// Run the agent: take MQTT from brokers (subscribe) and devices (listen), log every message
    /// durably, then acknowledge it.
    Run(ConfigArgs),
    /// Check a config file and print every problem with its key; exit 1 if there is any.
    Validate(ConfigArgs),
    /// Ask a running agent (at its admin.listen) how it is doing.
    Status(ConfigArgs),
    /// Make a password hash for a `[[listen.user]]` (reads the password from stdin, one line).
    #[command(after_help = "Prints pbkdf2-sha256$<iterations>$<salt>$<hash>; put it in password_hash. \
                            Example: echo -n 's3cret' | edge-agent passwd")]
    Passwd(PasswdArgs),
    /// Inspect the logs of a data directory; read-only, safe while an agent writes to it.
    #[command(subcommand)]
    Log(LogCommand),
    /// Try a stream's payload decoding and rules on sample messages.
    #[command(subcommand)]
    Rules(RulesCommand),
}

/// `edge-agent rules …`
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Run a stream's decoding and rules on messages from stdin and print, as NDJSON, the
    /// records that would be appended (and dead letters, with their reason).
    #[command(after_help = "Exit status: 0 done, 2 usage, config or I/O error. Nothing is written; \
                            windows still open at the end of the input are flushed, as at shutdown.")]
    Test(RulesTestArgs),
}

/// Arguments of `rules test`.
#[derive(Debug, Args)]
pub struct RulesTestArgs {
    /// The TOML config.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The stream whose rules run.
    #[arg(long, value_name = "STREAM", value_parser = stream_name)]
    pub stream: String,
    /// How stdin is cut into messages.
    #[arg(long, value_enum, default_value = "lines")]
    pub input: crate::shape::trial::InputMode,
    /// The topic of messages that do not carry their own (lines, whole).
    #[arg(long, value_name = "TOPIC", default_value = "test")]
    pub topic: String,
}

/// `edge-agent log …`
#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Scan every segment of every stream and report what is wrong, with file and byte offset.
    #[command(after_help = "Exit status: 0 no corruption (torn tails and missing indexes are normal after a \
                            power cut), 1 corruption found, 2 usage or I/O error.")]
    Verify(VerifyArgs),
    /// Print a stream's records as NDJSON: stream, seq, ts, topic, payload or payload_b64, attrs.
    #[command(after_help = "Gap batches and damaged ranges print no records; they are reported on stderr. \
                            Exit status: 0 done (also when stdout closes early), 1 corruption met, 2 usage \
                            or I/O error.")]
    Dump(DumpArgs),
}

/// Arguments of the commands that read the config.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The TOML config (see deploy/edge-agent.example.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Arguments of `passwd`.
#[derive(Debug, Args)]
pub struct PasswdArgs {
    /// PBKDF2 iterations (at least 10000; each device login costs this much once).
    #[arg(long, default_value_t = crate::listen::auth::ITERATIONS_DEFAULT)]
    pub iterations: u32,
}

/// Arguments of `log verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The agent's data directory (streams live in DIR/streams/STREAM/).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Verify only this stream.
    #[arg(long, value_name = "STREAM", value_parser = stream_name)]
    pub stream: Option<String>,
}

/// Arguments of `log dump`.
#[derive(Debug, Args)]
pub struct DumpArgs {
    /// The agent's data directory (streams live in DIR/streams/STREAM/).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The stream to print.
    #[arg(long, value_name = "STREAM", value_parser = stream_name)]
    pub stream: String,
    /// Start at the first record whose seq is at least N.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub from_seq: u64,
    /// Print at most N records.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
}

fn stream_name(s: &str) -> Result<String, String> {
    if shared::batch::is_valid_stream_name(s) {
        Ok(s.to_owned())
    } else {
        Err("a stream name is 1 to 64 of a-z 0-9 _ . -".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
