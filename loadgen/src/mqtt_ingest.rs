//! `loadgen mqtt-ingest`: is the edge agent (subscribe mode) the bottleneck behind its broker?
//!
//! One private Mosquitto (`deploy/mosquitto/backhaul.conf`), the same N realistic CDRs
//! published twice by the same QoS 1 publishers, timed from the first PUBLISH:
//!
//! 1. peer: a rumqttc subscriber (persistent session, subscribed before the clock starts,
//!    automatic acks) — Mosquitto's own publish → subscriber rate;
//! 2. agent: `edge-agent run` subscribed to the same broker, done when its
//!    `records_appended_total{stream="cdr"}` and its released acks (the receive-to-ack
//!    histogram's count, less the readiness probes) both reach N. Its acks wait for the fsync
//!    that covers each record, so this rate is a durable rate; the peer's is not.
//!
//! CPU seconds of each process (utime + stime from `/proc/<pid>/stat`) are read before and
//! after each run: broker, agent and load share the machine, and a rate means little without
//! them (DESIGN §9). Then the agent gets SIGTERM (exit 0 expected) and `edge-agent log verify`
//! checks what it wrote.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use tokio::task::JoinHandle;

use crate::agent::{Agent, AgentMetrics, AgentSettings, CDR_FILTER};
use crate::mosquitto::{self, Mosquitto};
use crate::mqtt::{Publisher, STALL_TIMEOUT, Subscriber};
use crate::payload::{Message, MessageSet};
use crate::process::{self, CpuClock};
use crate::progress::{Goal, Progress};
use crate::prom;
use crate::report::{AgentFigures, Report, RunFigures};

/// How often the agent's `/metrics` is read during its run: the end of the run is known to
/// this resolution.
const METRICS_POLL: Duration = Duration::from_millis(20);
/// Room for the MQTT header and topic above the largest payload.
const PACKET_OVERHEAD_BYTES: usize = 1024;
/// The agent's `[streams.cdr]` settings: those of `deploy/edge-agent.example.toml` for
/// billing CDRs (zstd 1 compressed these CDRs as well as 3, and faster: DESIGN §9).
const LINGER_MS: u64 = 5;
const FSYNC_INTERVAL_MS: u64 = 5;
const BATCH_BYTES_MAX: &str = "256KiB";
const ZSTD_LEVEL: i32 = 1;

/// `loadgen mqtt-ingest` options.
#[derive(Debug, Args)]
pub struct MqttIngestArgs {
    /// Messages published in each run.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,
    /// Payload size in bytes: a CDR shorter than this is padded to it (the generator writes
    /// 245–275 bytes); the measured mean is reported.
    #[arg(long, default_value_t = 250)]
    pub payload_bytes: usize,
    /// Publishing MQTT connections; publisher k sends messages k, k + P, k + 2P, …
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub publishers: u64,
    /// In-flight window: the agent's inflight_max, the broker's max_inflight_messages, and
    /// each publisher's unacknowledged PUBLISHes.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// The edge-agent binary [default: edge-agent next to this loadgen executable].
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// The mosquitto binary [default: on PATH, or in /usr/sbin].
    #[arg(long, value_name = "PATH")]
    pub mosquitto: Option<PathBuf>,
    /// Seed of the CDR generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the temp dir (configs, logs, the agent's data) and print where it is.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the scenario and prints its figures; returns the checks that failed.
pub async fn run(args: MqttIngestArgs) -> anyhow::Result<Vec<String>> {
    let agent_exe = match &args.agent_bin {
        Some(p) => p.clone(),
        None => default_agent_bin()?,
    };
    if !agent_exe.is_file() {
        bail!("no edge-agent at {} (cargo build --release -p edge-agent, or pass --agent-bin)", agent_exe.display());
    }
    let mosquitto_exe = match &args.mosquitto {
        Some(p) => p.clone(),
        None => mosquitto::find_exe()?,
    };
    let clock = CpuClock::new()?;
    let mut tmp = tempfile::Builder::new().prefix("loadgen-mqtt-ingest-").tempdir().context("creating a temp dir")?;
    tmp.disable_cleanup(args.keep);
    let dir = tmp.path();

    let generated = Instant::now();
    let set = MessageSet::cdrs(args.messages, args.payload_bytes, args.seed);
    let payload_bytes = set.payload_bytes;
    let largest = set.messages.iter().map(|m| m.payload.len()).max().unwrap_or(0);
    tracing::info!(
        messages = args.messages,
        mean_payload_bytes = format!("{:.1}", set.mean_payload_bytes()),
        elapsed_ms = generated.elapsed().as_millis() as u64,
        "messages generated"
    );
    let messages: Arc<[Message]> = set.messages.into();
    let packet_bytes_max = largest + PACKET_OVERHEAD_BYTES;

    let broker = Mosquitto::start(&mosquitto_exe, dir, args.inflight)?;
    tracing::info!(port = broker.port, pid = broker.pid(), "mosquitto started");
    let peer = peer_run(&broker, &messages, &args, clock, packet_bytes_max).await.context("peer run")?;
    tracing::info!(wall_s = peer.wall_seconds, "peer run done");

    let settings = AgentSettings {
        inflight: args.inflight,
        linger_ms: LINGER_MS,
        fsync_interval_ms: FSYNC_INTERVAL_MS,
        batch_bytes_max: BATCH_BYTES_MAX,
        zstd_level: ZSTD_LEVEL,
    };
    let agent = Agent::start(&agent_exe, dir, &settings, broker.port).await.context("starting edge-agent")?;
    tracing::info!(pid = agent.pid(), admin = %agent.admin, "edge-agent ready");
    let agent_config = agent.config.clone();
    let (agent_run, detail) =
        agent_run(&broker, agent, &messages, &args, clock, packet_bytes_max).await.context("agent run")?;
    let broker_conf = broker.conf.clone();
    broker.stop().context("stopping mosquitto")?;

    let report = Report { messages: args.messages, payload_bytes, peer, agent: agent_run, agent_detail: detail };
    println!("== loadgen mqtt-ingest");
    println!(
        "messages {} per run, CDR JSON (seed {}), payload mean {:.1} B, {} B in all; {} publishers at QoS 1, \
         inflight {}",
        args.messages,
        args.seed,
        payload_bytes as f64 / args.messages as f64,
        payload_bytes,
        args.publishers,
        args.inflight
    );
    println!("agent: {}", agent_exe.display());
    println!("\n-- mosquitto.conf\n{broker_conf}\n-- edge-agent.toml\n{agent_config}");
    print!("{}", report.render());
    if args.keep {
        println!("kept: {}", dir.display());
    }
    Ok(report.failures())
}

/// `edge-agent` beside this executable (`target/<profile>/`).
fn default_agent_bin() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating the loadgen executable")?;
    Ok(me.parent().unwrap_or(Path::new(".")).join("edge-agent"))
}

/// CPU seconds of the processes of a run at one instant.
#[derive(Clone, Copy, Debug)]
struct CpuSample {
    broker: f64,
    agent: Option<f64>,
    loadgen: f64,
    machine: f64,
}

impl CpuSample {
    fn take(clock: CpuClock, broker: u32, agent: Option<u32>) -> anyhow::Result<CpuSample> {
        Ok(CpuSample {
            broker: clock.cpu_seconds(Some(broker))?,
            agent: agent.map(|pid| clock.cpu_seconds(Some(pid))).transpose()?,
            loadgen: clock.cpu_seconds(None)?,
            machine: process::machine_busy_seconds(clock)?,
        })
    }
}

async fn peer_run(
    broker: &Mosquitto,
    messages: &Arc<[Message]>,
    args: &MqttIngestArgs,
    clock: CpuClock,
    packet_bytes_max: usize,
) -> anyhow::Result<RunFigures> {
    let n = messages.len() as u64;
    let mut sub =
        Subscriber::subscribe(broker.port, "loadgen-peer-subscriber", CDR_FILTER, n, packet_bytes_max).await?;
    let publishers = connect_publishers(broker.port, "loadgen-peer-pub", args, packet_bytes_max).await?;
    let cpu0 = CpuSample::take(clock, broker.pid(), None)?;
    let (t0, publishing, progress) = start_publishing(publishers, messages);
    let delivered = sub.wait_all().await?;
    let published = join_publishers(publishing).await?;
    progress.finish();
    let cpu1 = CpuSample::take(clock, broker.pid(), None)?;
    sub.unsubscribe_and_disconnect(CDR_FILTER).await?;
    Ok(RunFigures {
        wall_seconds: (delivered - t0).as_secs_f64(),
        published_seconds: (published - t0).as_secs_f64(),
        broker_cpu_seconds: cpu1.broker - cpu0.broker,
        loadgen_cpu_seconds: cpu1.loadgen - cpu0.loadgen,
        agent_cpu_seconds: None,
        machine_cpu_seconds: cpu1.machine - cpu0.machine,
    })
}

async fn agent_run(
    broker: &Mosquitto,
    mut agent: Agent,
    messages: &Arc<[Message]>,
    args: &MqttIngestArgs,
    clock: CpuClock,
    packet_bytes_max: usize,
) -> anyhow::Result<(RunFigures, AgentFigures)> {
    let n = messages.len() as u64;
    let mut probe = Publisher::connect(broker.port, "loadgen-probe", 1, packet_bytes_max).await?;
    let before = agent.wait_subscribed(&mut probe).await?;
    probe.disconnect().await;
    let publishers = connect_publishers(broker.port, "loadgen-agent-pub", args, packet_bytes_max).await?;
    let cpu0 = CpuSample::take(clock, broker.pid(), Some(agent.pid()))?;
    let (t0, publishing, progress) = start_publishing(publishers, messages);
    let (done, after) = wait_agent_done(&mut agent, &before, n).await?;
    let published = join_publishers(publishing).await?;
    progress.finish();
    let cpu1 = CpuSample::take(clock, broker.pid(), Some(agent.pid()))?;

    let buckets = prom::bucket_delta(&after.ack_buckets, &before.ack_buckets);
    let acks = after.cdr_acks_since(&before);
    let probe_acks = (after.acks - before.acks) - acks;
    // The probes' acks are in the histogram too; at most a stray one or two, and immediate.
    let ack_sum = after.ack_seconds_sum - before.ack_seconds_sum;
    let figures = RunFigures {
        wall_seconds: (done - t0).as_secs_f64(),
        published_seconds: (published - t0).as_secs_f64(),
        broker_cpu_seconds: cpu1.broker - cpu0.broker,
        loadgen_cpu_seconds: cpu1.loadgen - cpu0.loadgen,
        agent_cpu_seconds: Some(cpu1.agent.unwrap_or(0.0) - cpu0.agent.unwrap_or(0.0)),
        machine_cpu_seconds: cpu1.machine - cpu0.machine,
    };
    let (exit, verify, verify_output) = agent.stop_and_verify().await?;
    let detail = AgentFigures {
        appended: after.appended - before.appended,
        received: after.received - before.received,
        dropped: after.dropped - before.dropped,
        acks,
        ack_p50_seconds: prom::quantile(&buckets, 0.5),
        ack_p99_seconds: prom::quantile(&buckets, 0.99),
        ack_mean_seconds: ack_sum / (acks + probe_acks).max(1) as f64,
        batches: after.batches - before.batches,
        batch_raw_bytes: after.batch_raw_bytes - before.batch_raw_bytes,
        batch_compressed_bytes: after.batch_compressed_bytes - before.batch_compressed_bytes,
        log_bytes: after.log_bytes,
        append_errors: after.append_errors - before.append_errors,
        broker_dropped: after.broker_dropped,
        exit,
        verify,
        verify_output,
    };
    Ok((figures, detail))
}

/// Polls the agent's metrics until `n` CDRs are appended and their acks released. Returns when
/// that was first seen, and the metrics then.
async fn wait_agent_done(agent: &mut Agent, before: &AgentMetrics, n: u64) -> anyhow::Result<(Instant, AgentMetrics)> {
    let mut progress = (0, Instant::now());
    loop {
        tokio::time::sleep(METRICS_POLL).await;
        let m = agent.metrics().await?;
        let (appended, acks) = (m.appended - before.appended, m.cdr_acks_since(before));
        if appended >= n && acks >= n {
            return Ok((Instant::now(), m));
        }
        if let Some(status) = agent.exited() {
            bail!("edge-agent exited with {status} after appending {appended} of {n}\n{}", agent.log_tail());
        }
        if appended + acks != progress.0 {
            progress = (appended + acks, Instant::now());
        } else if progress.1.elapsed() > STALL_TIMEOUT {
            bail!(
                "the agent made no progress for {STALL_TIMEOUT:?}: received {}, appended {appended}, acked {acks}, \
                 dropped {} of {n}\n{}",
                m.received - before.received,
                m.dropped - before.dropped,
                agent.log_tail()
            );
        }
    }
}

async fn connect_publishers(
    port: u16,
    prefix: &str,
    args: &MqttIngestArgs,
    packet_bytes_max: usize,
) -> anyhow::Result<Vec<Publisher>> {
    let mut out = Vec::new();
    for k in 0..args.publishers {
        out.push(Publisher::connect(port, &format!("{prefix}-{k}"), args.inflight, packet_bytes_max).await?);
    }
    Ok(out)
}

/// Starts every publisher on its share; returns the start instant and their tasks.
fn start_publishing(
    publishers: Vec<Publisher>,
    messages: &Arc<[Message]>,
) -> (Instant, Vec<JoinHandle<anyhow::Result<Instant>>>, Progress) {
    let stride = publishers.len();
    let t0 = Instant::now();
    let acked = Arc::new(AtomicU64::new(0));
    let progress = {
        let acked = acked.clone();
        Progress::start("mqtt-ingest", Goal::Count(messages.len() as u64), "PUBACKs", move || acked.load(Relaxed))
    };
    let tasks = publishers
        .into_iter()
        .enumerate()
        .map(|(k, p)| tokio::spawn(p.publish_share(messages.clone(), k, stride, acked.clone())))
        .collect();
    (t0, tasks, progress)
}

/// Waits for every publisher; returns when the last PUBACK came.
async fn join_publishers(tasks: Vec<JoinHandle<anyhow::Result<Instant>>>) -> anyhow::Result<Instant> {
    let mut last = None;
    for t in tasks {
        let done = t.await.context("a publisher task")??;
        last = Some(last.map_or(done, |l: Instant| l.max(done)));
    }
    last.context("no publishers")
}
