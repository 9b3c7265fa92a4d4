//! `loadgen quic-sink` (hidden): a bare quinn receiver, the peer of `loadgen core-ingest` for
//! the CPU one GB over QUIC costs. It listens as the core does — the same endpoint
//! ([`shared::quic::endpoint`]), the same transport ([`shared::quic::transport`]
//! with core-ingest's defaults: keep-alive 10 s, idle timeout 60 s, Cubic, 256 bidirectional
//! streams per connection), the same mTLS ([`shared::tls::CertFiles::server_config`] with
//! [`shared::tls::ALPN_ACCEPTED`], a client certificate required) and the same UDP buffer
//! size — and then does nothing but read every bidirectional stream of every connection with
//! `read_chunk` and discard the data, counting its bytes.
//!
//! It runs in its own process so its CPU seconds can be read from `/proc/<pid>/stat`. The
//! parent talks to it through stdin and stdout:
//!
//! ```text
//! stdout, once bound:        listening <addr>
//! each line read on stdin:   bytes <stream bytes received so far> connections <accepted so far>
//! stdin closed:              exit 0
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::udp::{UdpSockRef, UdpSocketState};
use quinn::{Incoming, VarInt};
use shared::tls;

use crate::process::Proc;

/// core-ingest's `keep_alive` default.
const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// core-ingest's `idle_timeout` default.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// core-ingest's bidirectional streams per connection.
const STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// core-ingest's `udp_buffer_bytes` default.
pub const UDP_BUFFER_BYTES: u64 = 4 << 20;
/// How long the endpoint gets to tell its peers it is closing, once stdin has closed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// `loadgen quic-sink` options.
#[derive(Debug, Args)]
pub struct QuicSinkArgs {
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// CA certificate (PEM) the clients' certificates must chain to.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Server certificate (PEM).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// QUIC packets start at this UDP payload size (`mtu_min`).
    #[arg(long, default_value_t = shared::quic::Mtu::DEFAULT.min)]
    pub mtu_min: u16,
    /// Path MTU discovery probes up to this UDP payload size (`mtu_max`).
    #[arg(long, default_value_t = shared::quic::Mtu::DEFAULT.max)]
    pub mtu_max: u16,
    /// Send and receive buffer of the UDP socket, as core-ingest's `udp_buffer_bytes`.
    #[arg(long, default_value_t = UDP_BUFFER_BYTES)]
    pub udp_buffer_bytes: u64,
}

/// What the sink has received so far.
#[derive(Debug, Default)]
struct Counts {
    bytes: AtomicU64,
    connections: AtomicU64,
}

/// Listens, prints `listening <addr>`, answers each line of stdin with the counts, and returns
/// when stdin closes.
pub async fn run(args: QuicSinkArgs) -> anyhow::Result<Vec<String>> {
    let mtu = shared::quic::Mtu { min: args.mtu_min, max: args.mtu_max };
    mtu.check().map_err(|why| anyhow::anyhow!("quic-sink --mtu-min / --mtu-max: {why}"))?;
    let files = tls::CertFiles { ca_file: args.ca.clone(), cert_file: args.cert.clone(), key_file: args.key.clone() };
    let (server_tls, _) = files.server_config(tls::ALPN_ACCEPTED).with_context(|| {
        format!(
            "quic-sink TLS from --ca {} --cert {} --key {}",
            args.ca.display(),
            args.cert.display(),
            args.key.display()
        )
    })?;
    let quic = QuicServerConfig::try_from(server_tls).context("quic-sink: TLS config for QUIC")?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server_config.transport_config(shared::quic::transport(
        KEEP_ALIVE,
        IDLE_TIMEOUT,
        shared::quic::Congestion::Cubic,
        STREAMS_PER_CONNECTION_MAX,
        mtu,
    ));
    let socket = udp_socket(args.listen, usize::try_from(args.udp_buffer_bytes).unwrap_or(usize::MAX))
        .with_context(|| format!("quic-sink --listen {}", args.listen))?;
    let endpoint = shared::quic::endpoint(socket, mtu, Some(server_config))
        .with_context(|| format!("quic-sink --listen {}", args.listen))?;
    let local = endpoint.local_addr().context("quic-sink: the bound address")?;

    let counts = Arc::new(Counts::default());
    let accepting = {
        let (endpoint, counts) = (endpoint.clone(), counts.clone());
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(serve(incoming, counts.clone()));
            }
        })
    };
    say(&format!("listening {local}"))?;
    let answering = {
        let counts = counts.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for line in std::io::stdin().lock().lines() {
                line.context("quic-sink: reading stdin")?;
                let (bytes, connections) = (counts.bytes.load(Relaxed), counts.connections.load(Relaxed));
                say(&format!("bytes {bytes} connections {connections}"))?;
            }
            Ok(())
        })
    };
    let answered = answering.await.context("quic-sink: the stdin task");
    endpoint.close(VarInt::from_u32(0), b"quic-sink done");
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
    accepting.abort();
    answered??;
    tracing::info!(
        bytes = counts.bytes.load(Relaxed),
        connections = counts.connections.load(Relaxed),
        "quic-sink done"
    );
    Ok(Vec::new())
}

/// One line on stdout, flushed: the parent waits for it.
fn say(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).context("quic-sink: writing stdout")
}

/// Accepts one connection and drains each bidirectional stream it opens.
async fn serve(incoming: Incoming, counts: Arc<Counts>) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(error) => {
            tracing::warn!(%error, "quic-sink: a handshake failed");
            return;
        }
    };
    counts.connections.fetch_add(1, Relaxed);
    // Ends when the peer closes the connection: that is how every edge leaves.
    while let Ok((_send, mut recv)) = conn.accept_bi().await {
        let counts = counts.clone();
        tokio::spawn(async move {
            while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
                counts.bytes.fetch_add(chunk.bytes.len() as u64, Relaxed);
            }
        });
    }
}

/// A UDP socket bound to `addr` with send and receive buffers of `buffer_bytes`, as the core
/// sets its own (the kernel caps them at `net.core.rmem_max` / `wmem_max`: warned).
fn udp_socket(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
    state.set_recv_buffer_size(UdpSockRef::from(&socket), buffer_bytes)?;
    state.set_send_buffer_size(UdpSockRef::from(&socket), buffer_bytes)?;
    // Linux reports twice what was granted (it counts its own bookkeeping).
    let recv = state.recv_buffer_size(UdpSockRef::from(&socket))? / 2;
    let send = state.send_buffer_size(UdpSockRef::from(&socket))? / 2;
    if recv < buffer_bytes || send < buffer_bytes {
        tracing::warn!(requested = buffer_bytes, recv, send, "quic-sink: UDP buffers capped by the kernel");
    }
    Ok(socket)
}

/// The command line of `exe quic-sink` with `pki`'s CA and server certificate and `mtu`.
pub fn command(exe: &Path, pki: &crate::core_node::Pki, mtu: shared::quic::Mtu) -> Command {
    let mut command = Command::new(exe);
    command
        .arg("quic-sink")
        .arg("--ca")
        .arg(pki.ca_file())
        .arg("--cert")
        .arg(pki.server_cert_file())
        .arg("--key")
        .arg(pki.server_key_file())
        .args(["--mtu-min", &mtu.min.to_string(), "--mtu-max", &mtu.max.to_string()]);
    command
}

/// What the sink has counted: its answer to a line on stdin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkCounts {
    /// Stream bytes read, every connection.
    pub bytes: u64,
    /// Connections whose handshake completed.
    pub connections: u64,
}

impl SinkCounts {
    /// Reads `bytes <n> connections <m>`.
    pub fn parse(line: &str) -> Option<SinkCounts> {
        let mut f = line.split_ascii_whitespace();
        let mut field = |name: &str| -> Option<u64> { if f.next()? == name { f.next()?.parse().ok() } else { None } };
        let counts = SinkCounts { bytes: field("bytes")?, connections: field("connections")? };
        f.next().is_none().then_some(counts)
    }
}

/// A running `loadgen quic-sink`, as its parent drives it. Its calls block (pipes): on a
/// runtime, call them through `tokio::task::block_in_place` or a blocking thread.
#[derive(Debug)]
pub struct SinkProc {
    proc: Proc,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// The address it listens on (QUIC, UDP).
    pub listen: SocketAddr,
}

impl SinkProc {
    /// Starts `command` (a `loadgen quic-sink …` command line) with its stderr appended to
    /// `log_path`, and waits for its `listening` line.
    pub fn start(command: Command, log_path: &Path) -> anyhow::Result<SinkProc> {
        let (proc, stdin, stdout) = Proc::spawn_piped("quic-sink", command, log_path)?;
        let mut sink = SinkProc {
            proc,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let line = sink.line()?;
        sink.listen = match line.strip_prefix("listening ").map(str::parse) {
            Some(Ok(addr)) => addr,
            _ => bail!("quic-sink printed {line:?}, not `listening <addr>`\n{}", sink.proc.log_tail(30)),
        };
        Ok(sink)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Asks for its counts (a line on its stdin) and reads the answer.
    pub fn counts(&mut self) -> anyhow::Result<SinkCounts> {
        let stdin = self.stdin.as_mut().context("quic-sink: its stdin is already closed")?;
        let asked = stdin.write_all(b"\n").and_then(|()| stdin.flush());
        if let Err(e) = asked {
            bail!("quic-sink: writing its stdin: {e}\n{}", self.proc.log_tail(30));
        }
        let line = self.line()?;
        SinkCounts::parse(&line)
            .with_context(|| format!("quic-sink answered {line:?}, not `bytes <n> connections <m>`"))
    }

    /// An error with its log if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.proc.exited() {
            Some(status) => bail!("quic-sink exited with {status}\n{}", self.proc.log_tail(30)),
            None => Ok(()),
        }
    }

    /// Closes its stdin and waits up to `timeout` for it to exit.
    pub fn stop(mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        drop(self.stdin.take());
        self.proc.wait(timeout)
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let read = self.stdout.read_line(&mut line);
        match read {
            Ok(0) => bail!("quic-sink closed its stdout\n{}", self.proc.log_tail(30)),
            Ok(_) => Ok(line.trim_end().to_owned()),
            Err(e) => bail!("quic-sink: reading its stdout: {e}\n{}", self.proc.log_tail(30)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_read_from_the_answer_line() {
        assert_eq!(SinkCounts::parse("bytes 12345 connections 3"), Some(SinkCounts { bytes: 12345, connections: 3 }));
        for bad in ["", "bytes 1", "bytes x connections 3", "connections 3 bytes 1", "bytes 1 connections 2 more"] {
            assert_eq!(SinkCounts::parse(bad), None, "{bad:?}");
        }
    }
}
