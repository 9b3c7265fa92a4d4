//! `loadgen bench SCENARIO`: the named scenarios of BENCHMARKS.md with their settings, each
//! writing a JSON and a Markdown report with throughput over time and latency percentiles, and
//! an SVG chart, into `--report-dir` (default `target/bench/`).
//!
//! | scenario | what runs |
//! |---|---|
//! | `quickstart` | `loadgen quickstart`: core + agent (listen mode), CDR and SenML devices |
//! | `wan` | Backhaul, a Mosquitto bridge and a NATS leaf node over a link with 1% loss (Backhaul's UDP link) and 50 ms RTT |
//! | `outage` | the same three across a 10-minute outage, live data continuing, then the backfill |
//! | `outage-short` | the same with a 60 s outage (a quicker look) |

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::outage::{self, OutageArgs, System};
use crate::quickstart::{self, QuickstartArgs};
use crate::wan::model::Outage;

/// The named scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The quickstart, with its report.
    Quickstart,
    /// 1% loss and 50 ms RTT, three systems.
    Wan,
    /// A 10-minute outage and the backfill, three systems.
    Outage,
    /// A 60 s outage and the backfill, three systems.
    OutageShort,
}

/// `loadgen bench` options.
#[derive(Clone, Debug, Args)]
pub struct BenchArgs {
    /// Which scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Where the reports go.
    #[arg(long, default_value = "target/bench")]
    pub report_dir: PathBuf,
    /// Override the scenario's seconds of publishing.
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Override the scenario's messages per second.
    #[arg(long)]
    pub rate: Option<u64>,
    /// edge-agent binary (default: beside loadgen).
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// core-ingest binary (default: beside loadgen).
    #[arg(long, value_name = "PATH")]
    pub core_bin: Option<PathBuf>,
}

fn three_systems(args: &BenchArgs, seconds: u64, rate: u64, outage: Outage, loss: f64, delay_ms: u64) -> OutageArgs {
    OutageArgs {
        rate: args.rate.unwrap_or(rate),
        seconds: args.seconds.unwrap_or(seconds),
        devices: 20,
        outage,
        loss,
        delay: Duration::from_millis(delay_ms),
        congestion: Default::default(),
        systems: vec![System::Backhaul, System::MosquittoBridge, System::NatsLeaf],
        drain_timeout: Duration::from_secs(600),
        report_dir: Some(args.report_dir.clone()),
        agent_bin: args.agent_bin.clone(),
        core_bin: args.core_bin.clone(),
        mosquitto: None,
        seed: 1,
        keep: false,
    }
}

/// Runs the scenario; its reports are in `report_dir`.
pub async fn run(args: BenchArgs) -> anyhow::Result<Vec<String>> {
    let none = Outage { start: Duration::ZERO, length: Duration::ZERO };
    let secs = Duration::from_secs;
    let failures = match args.scenario {
        Scenario::Quickstart => {
            quickstart::run_quickstart(QuickstartArgs {
                seconds: args.seconds.unwrap_or(30),
                devices: 40,
                rate: args.rate.unwrap_or(1000),
                core_config: "deploy/quickstart/core-ingest.toml".into(),
                agent_config: "deploy/quickstart/edge-agent.toml".into(),
                agent_bin: args.agent_bin.clone(),
                core_bin: args.core_bin.clone(),
                report_dir: Some(args.report_dir.clone()),
            })
            .await?
        }
        Scenario::Wan => outage::run(three_systems(&args, 120, 1000, none, 1.0, 25)).await?,
        Scenario::Outage => {
            outage::run(three_systems(&args, 780, 500, Outage { start: secs(60), length: secs(600) }, 0.0, 0)).await?
        }
        Scenario::OutageShort => {
            outage::run(three_systems(&args, 150, 500, Outage { start: secs(30), length: secs(60) }, 0.0, 0)).await?
        }
    };
    println!("reports: {}", args.report_dir.display());
    Ok(failures)
}
