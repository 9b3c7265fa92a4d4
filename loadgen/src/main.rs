//! `loadgen`: parse the command line, start tracing on stderr, run the scenario. Exit status:
//! 0 the scenario ran and its checks passed, 1 a check failed, 2 usage, 3 it could not run.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use loadgen::bench::{self, BenchArgs};
use loadgen::core_ingest::{self, CoreIngestArgs};
use loadgen::devices::{self, MqttArgs};
use loadgen::e2e_latency::{self, E2eLatencyArgs};
use loadgen::listen_ingest::{self, ListenIngestArgs};
use loadgen::mqtt_ingest::{self, MqttIngestArgs};
use loadgen::outage::{self, OutageArgs};
use loadgen::quic_sink::{self, QuicSinkArgs};
use loadgen::quickstart::{self, QuickstartArgs};
use loadgen::verify::{self, VerifyArgs};
use loadgen::wan::{self, WanArgs};
use tracing_subscriber::EnvFilter;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Backhaul load generator: drives the edge agent and its broker with realistic telemetry and reports \
             capacity figures beside CPU seconds per process."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// edge-agent subscribe mode vs Mosquitto's own publish → subscriber rate, on a private
    /// broker and agent.
    MqttIngest(MqttIngestArgs),
    /// Many simulated edges into one core-ingest node over QUIC: durable MB/s and batches/s
    /// with group commit, the core's CPU per GB, beside the disk's own append + fsync rate.
    /// Also `loadgen edges`.
    #[command(alias = "edges")]
    CoreIngest(CoreIngestArgs),
    /// Paced MQTT publishers → Mosquitto → edge-agent → QUIC → core-ingest: publish-to-durable
    /// latency at a target rate.
    E2eLatency(E2eLatencyArgs),
    /// A UDP impairment proxy between an edge and its core: loss, delay, jitter, reordering,
    /// duplication, a bandwidth cap and scheduled outages, each direction seeded.
    Wan(WanArgs),
    /// Many device connections publishing traceable CDRs or SenML readings to a broker or to
    /// the agent's listener; writes a manifest for `verify`.
    Mqtt(MqttArgs),
    /// Reads records back (a file, stdin, or a command such as `core-ingest read`) and proves
    /// every acknowledged message of a `mqtt` run arrived exactly once.
    Verify(VerifyArgs),
    /// A WAN outage while devices keep publishing, then the backfill: Backhaul beside a
    /// Mosquitto bridge, every acknowledged message verified at the core side.
    Outage(OutageArgs),
    /// The quickstart: core-ingest and edge-agent (listen mode) from deploy/quickstart/, devices
    /// for 30 s, everything read back: published, stored, lost = 0, duplicated = 0.
    Quickstart(QuickstartArgs),
    /// A named scenario of BENCHMARKS.md (quickstart, wan, outage, outage-short) with its
    /// JSON and Markdown report and SVG chart.
    Bench(BenchArgs),
    /// Devices publishing straight to edge-agent (listen mode) vs Mosquitto's own publish →
    /// subscriber rate; PUBACK latency at half the agent's rate; the agent's idle RSS.
    ListenIngest(ListenIngestArgs),
    /// A bare quinn receiver that reads and discards stream data: the peer `core-ingest`
    /// measures beside the core (its CPU per GB carried over QUIC).
    #[command(hide = true)]
    QuicSink(QuicSinkArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
    // Log lines that cannot be written are lost, not the run (as in the binaries it drives).
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).log_internal_errors(false).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: tokio runtime: {e}");
            return ExitCode::from(3);
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            // Ctrl-C drops the scenario: its processes are killed by PID, its temp dir removed.
            Command::MqttIngest(args) => tokio::select! {
                r = mqtt_ingest::run(args) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            },
            Command::CoreIngest(args) => tokio::select! {
                r = core_ingest::run(args) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            },
            Command::E2eLatency(args) => tokio::select! {
                r = e2e_latency::run(args) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            },
            // Ctrl-C ends the proxy's run; it prints its totals.
            Command::Wan(args) => wan::run(args).await,
            Command::Mqtt(args) => tokio::select! {
                r = devices::run(args) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            },
            Command::Verify(args) => verify::run(args),
            Command::Outage(args) => tokio::select! {
                r = outage::run(args) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            },
            Command::Bench(args) => tokio::select! {
                r = bench::run(args) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            },
            Command::Quickstart(args) => tokio::select! {
                r = quickstart::run_quickstart(args) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            },
            Command::ListenIngest(args) => tokio::select! {
                r = listen_ingest::run(args) => r,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            },
            // Ends when its stdin closes; the parent kills it by PID otherwise.
            Command::QuicSink(args) => quic_sink::run(args).await,
        }
    });
    match outcome {
        Ok(failures) if failures.is_empty() => ExitCode::SUCCESS,
        Ok(failures) => {
            for f in failures {
                eprintln!("loadgen: check failed: {f}");
            }
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(3)
        }
    }
}
