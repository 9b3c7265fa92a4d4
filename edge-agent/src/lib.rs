//! Backhaul's edge agent: MQTT in, a crash-safe local log per stream, PUBACK only once a
//! message is durable, forwarded over QUIC to core-ingest (docs/ARCHITECTURE.md).
//!
//! - [`cli`]: the command line (clap derive); `main.rs` parses it and runs the command.
//! - [`config`]: the TOML config, parsed strictly and validated with key and reason.
//! - [`route`]: MQTT topic filters to streams (pure).
//! - [`ingest`]: the broker connections: [`ingest::session`] (pure ack bookkeeping) and
//!   [`ingest::driver`] (rumqttc).
//! - [`listen`]: listen mode, the agent as the devices' MQTT endpoint: [`listen::session`]
//!   (pure per-connection state machine), [`listen::driver`] (TCP/TLS listeners), config, auth.
//! - [`forward`]: forwarding to core-ingest over QUIC: session driver, cursors, node choice.
//! - [`shape`]: payload formats and per-stream rules (pure): decode, filter, pseudonymise,
//!   downsample, re-encode; what fails goes to `_deadletter`.
//! - [`writer`]: batches, logs, fsyncs, disk budget, and which PUBACKs may leave.
//! - [`run`]: wires the above into the running agent.
//! - [`metrics`]: every metric, declared once; Prometheus text exposition.
//! - [`status`]: `edge-agent status`, a summary from a running agent's admin endpoint.
//! - [`logcmd`]: `log verify` and `log dump`, read-only views of a data directory's logs.

pub mod cli;
pub mod config;
pub mod forward;
pub mod ingest;
pub mod listen;
pub mod logcmd;
pub mod metrics;
pub mod route;
pub mod run;
pub mod shape;
pub mod status;
pub mod writer;

use std::io::Write;

use cli::LogCommand;
use logcmd::{CmdError, Outcome};

/// Runs `command`, writing its output to `out` and problems to `err`. A closed `out` (the
/// reader quit, as `head` does) ends the command with [`Outcome::Clean`].
pub fn run_log_command(command: &LogCommand, out: &mut dyn Write, err: &mut dyn Write) -> Result<Outcome, CmdError> {
    let result = match command {
        LogCommand::Verify(args) => logcmd::verify(args, out, err),
        LogCommand::Dump(args) => logcmd::dump(args, out, err),
    };
    match result {
        Err(e) if e.is_broken_pipe() => Ok(Outcome::Clean),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::VerifyArgs;
    use std::io;

    /// Stdout after `| head` has gone.
    #[derive(Debug)]
    struct ClosedPipe;

    impl Write for ClosedPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn closed_stdout_ends_the_command_cleanly() {
        let data = tempfile::tempdir().unwrap();
        let verify = LogCommand::Verify(VerifyArgs { data_dir: data.path().into(), stream: None });
        assert_eq!(run_log_command(&verify, &mut ClosedPipe, &mut io::sink()).unwrap(), Outcome::Clean);
        let mut out = Vec::new();
        assert_eq!(run_log_command(&verify, &mut out, &mut io::sink()).unwrap(), Outcome::Clean);
        assert!(String::from_utf8(out).unwrap().starts_with("no streams in "));
    }

    #[test]
    fn missing_data_dir_is_an_error_naming_it() {
        let data = tempfile::tempdir().unwrap();
        let missing = data.path().join("nope");
        let verify = LogCommand::Verify(VerifyArgs { data_dir: missing.clone(), stream: None });
        let e = run_log_command(&verify, &mut io::sink(), &mut io::sink()).unwrap_err();
        assert!(e.to_string().contains(&missing.display().to_string()), "{e}");
    }
}
