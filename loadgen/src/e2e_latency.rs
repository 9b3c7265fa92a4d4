//! `loadgen e2e-latency`: how long from an MQTT publish until the record is durable at the
//! core, at a steady rate?
//!
//! The whole path on loopback: a private Mosquitto (`deploy/mosquitto/backhaul.conf`), a
//! `core-ingest` node and an `edge-agent` subscribed to the broker and forwarding to the core
//! over QUIC with certificates from the scenario's own CA. QoS 1 publishers paced by a token
//! schedule ([`crate::paced`]) send `--rate` realistic CDRs per second for `--seconds`.
//!
//! Latency comes from the two processes' own histograms, read before and after the run:
//! - core `backhaul_core_event_to_durable_seconds`: per batch stored, from its earliest
//!   record's event time to the end of the fsync round that made it durable at the core. The
//!   event time is the agent's wall clock when its MQTT client took the PUBLISH from the broker
//!   (publish + the broker hop), in ms; so per batch, the latency of its oldest record: linger,
//!   the edge's group commit, the forwarder, QUIC and the core's group commit;
//! - agent `backhaul_edge_receive_to_ack_seconds`: per record, from the MQTT receive to the
//!   PUBACK released after the edge's own fsync.
//!
//! At the end every record must be in the core once: the agent appended and acknowledged all
//! of them, the forwarder had every batch acknowledged, the core stored exactly those batches
//! (no duplicate), and `core-ingest log verify` counts every record. Both processes must exit 0
//! on SIGTERM and their logs verify.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::agent::{AgentSettings, STREAM};
use crate::core_ingest::{binary, code};
use crate::core_node::{CoreMetrics, CoreNode, CoreSettings, Pki, verified_counts};
use crate::forwarding_agent::{self, Congestion, ForwardingAgent, Scrape};
use crate::mosquitto::{self, Mosquitto};
use crate::mqtt::{Publisher, STALL_TIMEOUT};
use crate::paced::{PacedOutcome, PacedPublisher};
use crate::payload::{Message, MessageSet};
use crate::process::{self, CpuClock};
use crate::progress::{Goal, Progress};
use crate::prom::{self, Bucket};
use crate::wan::model::Impairment;
use crate::wan::{Proxy, ProxyLimits, WanCounts};

/// The issue's target: p99 from MQTT publish to durable at the core, seconds.
pub const TARGET_P99_SECONDS: f64 = 0.050;
/// Room for the MQTT header and topic above the largest payload.
const PACKET_OVERHEAD_BYTES: usize = 1024;
/// How often the agent and the core are read while the run drains.
const METRICS_POLL: Duration = Duration::from_millis(20);
/// The publishers' first message is due this long after they are told to start.
const START_DELAY: Duration = Duration::from_millis(20);

/// `loadgen e2e-latency` options.
#[derive(Debug, Args)]
pub struct E2eLatencyArgs {
    /// Records (MQTT messages) per second, over all publishers.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// The agent's `[streams.cdr] linger`, ms.
    #[arg(long, default_value_t = 5)]
    pub linger_ms: u64,
    /// The agent's `[streams.cdr] fsync_interval`, ms (group commit at the edge).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub fsync_interval_ms: u64,
    /// Publishing MQTT connections; publisher k sends messages k, k + P, k + 2P, …
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub publishers: u64,
    /// In-flight window: the agent's inflight_max, the broker's max_inflight_messages, and
    /// each publisher's unacknowledged PUBLISHes.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Payload size in bytes: a CDR shorter than this is padded to it.
    #[arg(long, default_value_t = 250)]
    pub payload_bytes: usize,
    /// `partitions` of the core's stream.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub partitions: u32,
    /// The edge-agent binary [default: edge-agent next to this loadgen executable].
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// The core-ingest binary [default: core-ingest next to this loadgen executable].
    #[arg(long, value_name = "PATH")]
    pub core_bin: Option<PathBuf>,
    /// The mosquitto binary [default: on PATH, or in /usr/sbin].
    #[arg(long, value_name = "PATH")]
    pub mosquitto: Option<PathBuf>,
    /// Seed of the CDR generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Put `loadgen wan`'s impairment proxy between the agent and the core, losing this
    /// percentage of datagrams each way.
    #[arg(long, default_value_t = 0.0)]
    pub wan_loss: f64,
    /// The proxy's one-way delay (RTT = 2 ×), e.g. 25ms.
    #[arg(long, default_value = "0ms", value_parser = crate::wan::parse_duration)]
    pub wan_delay: Duration,
    /// The forwarder's congestion control.
    #[arg(long, value_enum, default_value_t = Congestion::Cubic)]
    pub congestion: Congestion,
    /// An outage of the proxy, LENGTH@START from when the agent starts (e.g. 5s@2s); repeatable.
    #[arg(long = "wan-outage", value_parser = crate::wan::model::Outage::parse)]
    pub wan_outages: Vec<crate::wan::model::Outage>,
    /// Keep the temp dir (configs, logs, both data dirs) and print where it is.
    #[arg(long)]
    pub keep: bool,
}

/// Runs the scenario and prints its figures; returns the checks that failed.
pub async fn run(args: E2eLatencyArgs) -> anyhow::Result<Vec<String>> {
    let agent_exe = binary(&args.agent_bin, "edge-agent", "agent-bin")?;
    let core_exe = binary(&args.core_bin, "core-ingest", "core-bin")?;
    let mosquitto_exe = match &args.mosquitto {
        Some(p) => p.clone(),
        None => mosquitto::find_exe()?,
    };
    let clock = CpuClock::new()?;
    let mut tmp = tempfile::Builder::new().prefix("loadgen-e2e-latency-").tempdir().context("creating a temp dir")?;
    tmp.disable_cleanup(args.keep);
    let dir = tmp.path().to_path_buf();

    let n = args.rate * args.seconds;
    let set = MessageSet::cdrs(n, args.payload_bytes, args.seed);
    let payload_bytes = set.payload_bytes;
    let packet_bytes_max = set.messages.iter().map(|m| m.payload.len()).max().unwrap_or(0) + PACKET_OVERHEAD_BYTES;
    let messages: Arc<[Message]> = set.messages.into();

    let pki = Pki::create(&dir.join("pki"))?;
    let cert = pki.issue_edge(&forwarding_agent::edge_id())?;
    let mut core = CoreNode::start(&core_exe, &dir, &pki, &CoreSettings::with_partitions(args.partitions)).await?;
    let broker = Mosquitto::start(&mosquitto_exe, &dir, args.inflight)?;
    let settings = AgentSettings {
        inflight: args.inflight,
        linger_ms: args.linger_ms,
        fsync_interval_ms: args.fsync_interval_ms,
        batch_bytes_max: "256KiB",
        zstd_level: 1,
    };
    let wan = if args.wan_loss > 0.0 || !args.wan_delay.is_zero() || !args.wan_outages.is_empty() {
        let imp = Impairment {
            loss: args.wan_loss / 100.0,
            delay: args.wan_delay,
            outages: args.wan_outages.clone(),
            ..Impairment::default()
        };
        imp.validate().map_err(|e| anyhow::anyhow!("--wan-{e}"))?;
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Some(Proxy::start(loopback, core.listen, imp, args.seed, ProxyLimits::default()).await?)
    } else {
        None
    };
    let core_addr = wan.as_ref().map_or(core.listen, Proxy::local_addr);
    let mut agent = ForwardingAgent::start(
        &agent_exe,
        &dir,
        &settings,
        broker.port,
        core_addr,
        &pki.ca_file(),
        &cert,
        args.congestion,
    )
    .await?;
    tracing::info!(core = core.pid(), broker = broker.pid(), agent = agent.pid(), "core, broker and agent ready");
    let mut probe = Publisher::connect(broker.port, "loadgen-probe", 1, packet_bytes_max).await?;
    agent.wait_subscribed(&mut probe).await?;
    probe.disconnect().await;
    let mut publishers = Vec::new();
    for k in 0..args.publishers {
        let id = format!("loadgen-e2e-pub-{k}");
        publishers.push(PacedPublisher::connect(broker.port, &id, args.inflight, packet_bytes_max).await?);
    }

    let pids = Pids { broker: broker.pid(), agent: agent.pid(), core: core.pid() };
    let before = (agent.scrape().await?, core.metrics().await?);
    let cpu0 = CpuSample::take(clock, pids)?;
    let start = Instant::now() + START_DELAY;
    let stride = publishers.len();
    let live_acked = Arc::new(AtomicU64::new(0));
    let progress = {
        let acked = live_acked.clone();
        Progress::start("e2e-latency", Goal::Time(Duration::from_secs(args.seconds)), "published", move || {
            acked.load(Relaxed)
        })
    };
    let tasks: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(k, p)| tokio::spawn(p.run(messages.clone(), k, stride, start, args.rate as f64, live_acked.clone())))
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.context("a publisher task")??);
    }
    progress.finish();
    tracing::info!("every message published and acknowledged by the broker");
    let (done, after) = wait_durable_at_core(&mut agent, &mut core, &before, n).await?;
    let cpu1 = CpuSample::take(clock, pids)?;

    let agent_config = agent.config.clone();
    let (agent_exit, agent_verify, agent_verify_output) = agent.stop_and_verify().await?;
    let (core_exit, core_verify, core_verify_output) = core.stop_and_verify().await?;
    let broker_conf = broker.conf.clone();
    broker.stop().context("stopping mosquitto")?;

    let report = Report {
        rate: args.rate,
        seconds: args.seconds,
        linger_ms: args.linger_ms,
        records: n,
        payload_bytes,
        publish: Publishing::of(&outcomes, start),
        durable_seconds: (done - start).as_secs_f64(),
        agent: Deltas::between(&before, &after),
        cpu: cpu1.since(&cpu0),
        exits: Exits { agent: agent_exit, agent_verify, core: core_exit, core_verify },
        core_verified: verified_counts(&core_verify_output, STREAM),
        wan: wan.as_ref().map(Proxy::counts),
        verify_output: format!("{agent_verify_output}\n{core_verify_output}"),
    };
    println!("== loadgen e2e-latency");
    println!(
        "{} records at {}/s for {} s, CDR JSON (seed {}), payload mean {:.1} B; {} paced publishers at QoS 1, inflight {}; \
         agent linger {} ms, fsync interval {} ms; core partitions {}",
        n,
        args.rate,
        args.seconds,
        args.seed,
        payload_bytes as f64 / n.max(1) as f64,
        args.publishers,
        args.inflight,
        args.linger_ms,
        args.fsync_interval_ms,
        args.partitions
    );
    println!("agent: {}\ncore: {}", agent_exe.display(), core_exe.display());
    let core_config = std::fs::read_to_string(dir.join("core-ingest.toml")).unwrap_or_default();
    println!(
        "\n-- mosquitto.conf\n{broker_conf}\n-- edge-agent.toml\n{agent_config}\n-- core-ingest.toml\n{core_config}"
    );
    print!("{}", report.render());
    if args.keep {
        println!("kept: {}", dir.display());
    }
    Ok(report.failures())
}

/// Polls the agent and the core until the agent has appended and acknowledged `n` records,
/// its forwarder has had every batch acknowledged and the core has stored them: when that was
/// first seen, and the metrics then.
async fn wait_durable_at_core(
    agent: &mut ForwardingAgent,
    core: &mut CoreNode,
    before: &(Scrape, CoreMetrics),
    n: u64,
) -> anyhow::Result<(Instant, (Scrape, CoreMetrics))> {
    let mut progress = (0, Instant::now());
    loop {
        tokio::time::sleep(METRICS_POLL).await;
        let now = (agent.scrape().await?, core.metrics().await?);
        let d = Deltas::between(before, &now);
        if d.appended >= n && d.acks >= n && d.forward_acked >= d.batches && d.core.batches_stored >= d.batches {
            return Ok((Instant::now(), now));
        }
        agent.check_alive()?;
        core.check_alive()?;
        let moved = d.appended + d.acks + d.forward_acked + d.core.batches_stored;
        if moved != progress.0 {
            progress = (moved, Instant::now());
        } else if progress.1.elapsed() > STALL_TIMEOUT {
            bail!(
                "no progress for {STALL_TIMEOUT:?}: agent appended {} and acked {} of {n}, forwarded {} of {} batches \
                 (acked {}), core stored {}\n{}\n{}",
                d.appended,
                d.acks,
                d.forward_sent,
                d.batches,
                d.forward_acked,
                d.core.batches_stored,
                agent.log_tail(),
                core.log_tail()
            );
        }
    }
}

/// The processes whose CPU seconds are read.
#[derive(Clone, Copy, Debug)]
struct Pids {
    broker: u32,
    agent: u32,
    core: u32,
}

/// CPU seconds of the run's processes (and the machine) at one instant, or between two.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuSample {
    /// Mosquitto.
    pub broker: f64,
    /// edge-agent.
    pub agent: f64,
    /// core-ingest.
    pub core: f64,
    /// loadgen (the publishers).
    pub loadgen: f64,
    /// Busy CPU seconds of the whole machine.
    pub machine: f64,
}

impl CpuSample {
    fn take(clock: CpuClock, p: Pids) -> anyhow::Result<CpuSample> {
        Ok(CpuSample {
            broker: clock.cpu_seconds(Some(p.broker))?,
            agent: clock.cpu_seconds(Some(p.agent))?,
            core: clock.cpu_seconds(Some(p.core))?,
            loadgen: clock.cpu_seconds(None)?,
            machine: process::machine_busy_seconds(clock)?,
        })
    }

    fn since(&self, b: &CpuSample) -> CpuSample {
        CpuSample {
            broker: self.broker - b.broker,
            agent: self.agent - b.agent,
            core: self.core - b.core,
            loadgen: self.loadgen - b.loadgen,
            machine: self.machine - b.machine,
        }
    }

    /// Machine busy less the run's own processes.
    pub fn other(&self) -> f64 {
        (self.machine - self.broker - self.agent - self.core - self.loadgen).max(0.0)
    }
}

/// How the publishers kept their schedule.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Publishing {
    /// Messages the broker acknowledged.
    pub acked: u64,
    /// From the first due time to the last PUBACK, seconds.
    pub seconds: f64,
    /// The latest a message was queued after its due time, seconds.
    pub max_late_seconds: f64,
    /// Messages queued more than [`crate::paced::LATE`] late.
    pub late: u64,
}

impl Publishing {
    fn of(outcomes: &[PacedOutcome], start: Instant) -> Publishing {
        let last = outcomes.iter().map(|o| o.last_ack).max().unwrap_or(start);
        Publishing {
            acked: outcomes.iter().map(|o| o.acked).sum(),
            seconds: last.saturating_duration_since(start).as_secs_f64(),
            max_late_seconds: outcomes.iter().map(|o| o.max_late.as_secs_f64()).fold(0.0, f64::max),
            late: outcomes.iter().map(|o| o.late).sum(),
        }
    }
}

/// What the agent and the core counted during the run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Deltas {
    /// Records routed to `cdr`.
    pub received: u64,
    /// Records appended to `cdr`.
    pub appended: u64,
    /// Records of `cdr` dropped, any reason.
    pub dropped: u64,
    /// Acks (PUBACKs) of CDRs released.
    pub acks: u64,
    /// Receive → ack buckets of those (and of any probe: none arrive during the run).
    pub ack_buckets: Vec<Bucket>,
    /// Their sum, seconds.
    pub ack_seconds_sum: f64,
    /// Batches of `cdr` appended at the edge.
    pub batches: u64,
    /// Their raw bytes.
    pub batch_raw_bytes: u64,
    /// Their bytes as stored and forwarded.
    pub batch_compressed_bytes: u64,
    /// The broker's `$SYS` dropped count as the agent last saw it.
    pub broker_dropped: u64,
    /// Batches the forwarder sent.
    pub forward_sent: u64,
    /// Batches the core acknowledged to the forwarder.
    pub forward_acked: u64,
    /// Connections the forwarder made during the run (0: it kept its one connection).
    pub forward_reconnects: u64,
    /// The core's counters (counts as deltas; `event_to_durable` buckets as a delta).
    pub core: CoreMetrics,
}

impl Deltas {
    fn between(a: &(Scrape, CoreMetrics), b: &(Scrape, CoreMetrics)) -> Deltas {
        let (ea, eb) = (&a.0.agent, &b.0.agent);
        let (fa, fb) = (&a.0.forward, &b.0.forward);
        let (ca, cb) = (&a.1, &b.1);
        Deltas {
            received: eb.received - ea.received,
            appended: eb.appended - ea.appended,
            dropped: eb.dropped - ea.dropped,
            acks: eb.cdr_acks_since(ea),
            ack_buckets: prom::bucket_delta(&eb.ack_buckets, &ea.ack_buckets),
            ack_seconds_sum: eb.ack_seconds_sum - ea.ack_seconds_sum,
            batches: eb.batches - ea.batches,
            batch_raw_bytes: eb.batch_raw_bytes - ea.batch_raw_bytes,
            batch_compressed_bytes: eb.batch_compressed_bytes - ea.batch_compressed_bytes,
            broker_dropped: eb.broker_dropped,
            forward_sent: fb.batches_sent - fa.batches_sent,
            forward_acked: fb.batches_acked - fa.batches_acked,
            forward_reconnects: fb.connects - fa.connects,
            core: CoreMetrics {
                batches_received: cb.batches_received - ca.batches_received,
                batches_stored: cb.batches_stored - ca.batches_stored,
                stored_bytes: cb.stored_bytes - ca.stored_bytes,
                records_stored: cb.records_stored - ca.records_stored,
                duplicates: cb.duplicates - ca.duplicates,
                conflicts: cb.conflicts - ca.conflicts,
                group_commits: cb.group_commits - ca.group_commits,
                connections: cb.connections,
                refused: cb.refused - ca.refused,
                event_to_durable: prom::bucket_delta(&cb.event_to_durable, &ca.event_to_durable),
                event_to_durable_sum: cb.event_to_durable_sum - ca.event_to_durable_sum,
                event_to_durable_count: cb.event_to_durable_count - ca.event_to_durable_count,
            },
        }
    }
}

/// Exit statuses at the end.
#[derive(Clone, Copy, Debug)]
pub struct Exits {
    /// edge-agent after SIGTERM.
    pub agent: ExitStatus,
    /// `edge-agent log verify`.
    pub agent_verify: ExitStatus,
    /// core-ingest after SIGTERM.
    pub core: ExitStatus,
    /// `core-ingest log verify`.
    pub core_verify: ExitStatus,
}

/// Everything `e2e-latency` reports.
#[derive(Clone, Debug)]
pub struct Report {
    /// Target records per second.
    pub rate: u64,
    /// Seconds of publishing.
    pub seconds: u64,
    /// The agent's linger, ms.
    pub linger_ms: u64,
    /// Records published.
    pub records: u64,
    /// Their payload bytes.
    pub payload_bytes: u64,
    /// How the schedule was kept.
    pub publish: Publishing,
    /// From the first due time until every record was durable at the core, seconds.
    pub durable_seconds: f64,
    /// What the agent and the core counted.
    pub agent: Deltas,
    /// CPU seconds of each process over the run.
    pub cpu: CpuSample,
    /// Exit statuses.
    pub exits: Exits,
    /// Batches and records `core-ingest log verify` counted in the stream.
    pub core_verified: Option<(u64, u64)>,
    /// The two verify outputs.
    pub verify_output: String,
    /// What the WAN proxy did, when there was one.
    pub wan: Option<WanCounts>,
}

impl Report {
    /// Event → durable at the core, p50 and p99 (interpolated within the buckets).
    pub fn core_quantiles(&self) -> (Option<f64>, Option<f64>) {
        let b = &self.agent.core.event_to_durable;
        (prom::quantile(b, 0.5), prom::quantile(b, 0.99))
    }

    /// Share of batches durable at the core within `le` seconds of their oldest record's
    /// event time (`le` must be a bucket bound).
    pub fn core_share_within(&self, le: f64) -> Option<f64> {
        let b = &self.agent.core.event_to_durable;
        let total = b.last()?.count;
        let within = b.iter().find(|x| (x.le - le).abs() < 1e-12)?.count;
        (total > 0.0).then(|| within / total)
    }

    /// Whether the target holds: at least 99% of batches within 50 ms (read from the bucket
    /// bound, not interpolated).
    pub fn target_met(&self) -> bool {
        self.core_share_within(TARGET_P99_SECONDS).is_some_and(|s| s >= 0.99)
    }

    /// Checks that failed: a record not stored exactly once at the core, a bad exit.
    pub fn failures(&self) -> Vec<String> {
        let (d, n) = (&self.agent, self.records);
        let mut f = Vec::new();
        if self.publish.acked != n {
            f.push(format!("the broker acknowledged {} of {n} PUBLISHes", self.publish.acked));
        }
        if d.appended != n || d.acks != n || d.dropped != 0 || d.broker_dropped != 0 {
            f.push(format!(
                "agent: appended {}, acked {} of {n}; dropped {}; broker $SYS dropped {}",
                d.appended, d.acks, d.dropped, d.broker_dropped
            ));
        }
        if d.forward_acked != d.batches || d.core.batches_stored != d.batches {
            f.push(format!(
                "batches: agent {}, forwarder acked {} (sent {}), core stored {}",
                d.batches, d.forward_acked, d.forward_sent, d.core.batches_stored
            ));
        }
        if d.core.duplicates != 0 || d.core.conflicts != 0 || d.core.refused != 0 {
            f.push(format!(
                "core: {} duplicates, {} conflicts, {} refused",
                d.core.duplicates, d.core.conflicts, d.core.refused
            ));
        }
        if self.core_verified != Some((d.batches, n)) {
            f.push(format!(
                "core log verify counted (batches, records) {:?}, expected ({}, {n})",
                self.core_verified, d.batches
            ));
        }
        let e = &self.exits;
        for (what, s) in [
            ("edge-agent after SIGTERM", e.agent),
            ("edge-agent log verify", e.agent_verify),
            ("core-ingest after SIGTERM", e.core),
            ("core-ingest log verify", e.core_verify),
        ] {
            if !s.success() {
                f.push(format!("{what} exited with {s}"));
            }
        }
        if f.iter().any(|x| x.contains("log verify")) {
            f.push(format!("verify output:\n{}", self.verify_output.trim()));
        }
        f
    }

    /// The table, the verdict and the `RESULT` line.
    pub fn render(&self) -> String {
        let (d, c, n) = (&self.agent, &self.cpu, self.records);
        let ms = |s: Option<f64>| {
            s.map_or("-".into(), |s| if s.is_finite() { format!("{:.1}", s * 1e3) } else { "> 60000".into() })
        };
        let (p50, p99) = self.core_quantiles();
        let ack = (prom::quantile(&d.ack_buckets, 0.5), prom::quantile(&d.ack_buckets, 0.99));
        let per_million = |s: f64| s * 1e6 / n.max(1) as f64;
        let pct = |x: Option<f64>| x.map_or("-".into(), |x| format!("{:.2}%", x * 100.0));
        let rows: Vec<(&str, String)> = vec![
            ("target rate, records/s (for s)", format!("{} ({})", self.rate, self.seconds)),
            (
                "achieved: records / (first due → last broker PUBACK), records/s",
                format!("{:.0}", n as f64 / self.publish.seconds),
            ),
            (
                "schedule: max lateness, ms; records queued > 5 ms late",
                format!("{:.1}; {}", self.publish.max_late_seconds * 1e3, self.publish.late),
            ),
            ("first due → all durable at the core, s", format!("{:.3}", self.durable_seconds)),
            (
                "core: event → durable p50 / p99 / mean, ms (per batch, oldest record)",
                format!(
                    "{} / {} / {:.1}",
                    ms(p50),
                    ms(p99),
                    d.core.event_to_durable_sum * 1e3 / d.core.event_to_durable_count.max(1) as f64
                ),
            ),
            (
                "core: batches durable within 20 ms / 50 ms of their oldest record",
                format!("{} / {}", pct(self.core_share_within(0.02)), pct(self.core_share_within(0.05))),
            ),
            ("core: slowest batch, at most (bucket bound), ms", ms(slowest(&d.core.event_to_durable))),
            (
                "agent: receive → PUBACK p50 / p99 / mean, ms (per record)",
                format!("{} / {} / {:.2}", ms(ack.0), ms(ack.1), d.ack_seconds_sum * 1e3 / d.acks.max(1) as f64),
            ),
            (
                "records published / appended at the edge / PUBACKed by the agent",
                format!("{} / {} / {}", self.publish.acked, d.appended, d.acks),
            ),
            (
                "edge batches (records per batch)",
                format!("{} ({:.0})", d.batches, d.appended as f64 / d.batches.max(1) as f64),
            ),
            (
                "payload → batch raw → stored bytes",
                format!("{} → {} → {}", self.payload_bytes, d.batch_raw_bytes, d.batch_compressed_bytes),
            ),
            (
                "forwarder: batches sent / acked; reconnects",
                format!("{} / {}; {}", d.forward_sent, d.forward_acked, d.forward_reconnects),
            ),
            (
                "core: batches stored / duplicates / conflicts / refused",
                format!(
                    "{} / {} / {} / {}",
                    d.core.batches_stored, d.core.duplicates, d.core.conflicts, d.core.refused
                ),
            ),
            (
                "core: group commits (batches per round)",
                format!(
                    "{} ({:.2})",
                    d.core.group_commits,
                    d.core.batches_stored as f64 / d.core.group_commits.max(1) as f64
                ),
            ),
            ("core log verify: batches, records", self.core_verified.map_or("-".into(), |(b, r)| format!("{b}, {r}"))),
            (
                "CPU s: mosquitto / edge-agent / core-ingest / loadgen / other",
                format!("{:.2} / {:.2} / {:.2} / {:.2} / {:.2}", c.broker, c.agent, c.core, c.loadgen, c.other()),
            ),
            (
                "CPU s per 1M records: mosquitto / edge-agent / core-ingest",
                format!("{:.2} / {:.2} / {:.2}", per_million(c.broker), per_million(c.agent), per_million(c.core)),
            ),
            (
                "exit after SIGTERM: agent / core; log verify: agent / core",
                format!(
                    "{} / {}; {} / {}",
                    code(self.exits.agent),
                    code(self.exits.core),
                    code(self.exits.agent_verify),
                    code(self.exits.core_verify)
                ),
            ),
        ];
        let mut out = String::new();
        let _ = writeln!(out, "| figure | MQTT → edge-agent → QUIC → core-ingest, linger {} ms |", self.linger_ms);
        let _ = writeln!(out, "|---|---:|");
        for (label, value) in &rows {
            let _ = writeln!(out, "| {label} | {value} |");
        }
        let verdict = if self.target_met() { "met" } else { "NOT met" };
        let _ = writeln!(
            out,
            "\npublish → durable at the core, p99: {} ms; within 50 ms: {} (target p99 ≤ 50 ms: {verdict})",
            ms(p99),
            pct(self.core_share_within(TARGET_P99_SECONDS))
        );
        let _ = writeln!(
            out,
            "RESULT records={n} published={} appended={} acked={} edge_batches={} forwarded_acked={} core_stored={} \
             duplicates={} core_verified_records={} agent_exit={} core_exit={} agent_verify_exit={} core_verify_exit={} \
             rate={:.0} p50_ms={} p99_ms={} within_50ms={:.4}",
            self.publish.acked,
            d.appended,
            d.acks,
            d.batches,
            d.forward_acked,
            d.core.batches_stored,
            d.core.duplicates,
            self.core_verified.map_or(0, |v| v.1),
            code(self.exits.agent),
            code(self.exits.core),
            code(self.exits.agent_verify),
            code(self.exits.core_verify),
            n as f64 / self.publish.seconds,
            ms(p50),
            ms(p99),
            self.core_share_within(TARGET_P99_SECONDS).unwrap_or(0.0),
        );
        if let Some(w) = &self.wan {
            let _ = writeln!(out, "WAN {}", crate::wan::result_line(w).trim_start_matches("RESULT "));
        }
        out
    }
}

/// The smallest bucket bound that holds every observation: the slowest one was at most this.
fn slowest(buckets: &[Bucket]) -> Option<f64> {
    let total = buckets.last()?.count;
    (total > 0.0).then(|| buckets.iter().find(|b| b.count >= total).map_or(f64::INFINITY, |b| b.le))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn buckets(counts: &[(f64, f64)]) -> Vec<Bucket> {
        counts.iter().map(|&(le, count)| Bucket { le, count }).collect()
    }

    fn report() -> Report {
        let ok = ExitStatus::from_raw(0);
        Report {
            rate: 1000,
            seconds: 2,
            linger_ms: 5,
            records: 2000,
            payload_bytes: 500_000,
            publish: Publishing { acked: 2000, seconds: 2.0, max_late_seconds: 0.002, late: 0 },
            durable_seconds: 2.05,
            agent: Deltas {
                received: 2000,
                appended: 2000,
                acks: 2000,
                ack_buckets: buckets(&[(0.005, 1000.0), (0.01, 2000.0), (f64::INFINITY, 2000.0)]),
                ack_seconds_sum: 10.0,
                batches: 100,
                forward_sent: 100,
                forward_acked: 100,
                core: CoreMetrics {
                    batches_stored: 100,
                    event_to_durable: buckets(&[(0.01, 50.0), (0.02, 98.0), (0.05, 100.0), (f64::INFINITY, 100.0)]),
                    event_to_durable_sum: 1.2,
                    event_to_durable_count: 100,
                    ..CoreMetrics::default()
                },
                ..Deltas::default()
            },
            cpu: CpuSample { broker: 1.0, agent: 0.5, core: 0.2, loadgen: 0.3, machine: 2.5 },
            exits: Exits { agent: ok, agent_verify: ok, core: ok, core_verify: ok },
            core_verified: Some((100, 2000)),
            verify_output: String::new(),
            wan: None,
        }
    }

    #[test]
    fn the_verdict_reads_the_50_ms_bucket_and_the_result_line_has_the_counts() {
        let r = report();
        assert!(r.failures().is_empty(), "{:?}", r.failures());
        assert_eq!(r.core_share_within(0.05), Some(1.0));
        assert_eq!(r.core_share_within(0.02), Some(0.98));
        assert!(r.target_met());
        let (p50, p99) = r.core_quantiles();
        assert_eq!(p50, Some(0.01));
        assert!(p99.unwrap() > 0.02 && p99.unwrap() < 0.05);
        let text = r.render();
        assert!(text.contains("(target p99 ≤ 50 ms: met)"), "{text}");
        assert!(text.contains("| 98.00% / 100.00% |"), "{text}");
        assert!(
            text.contains(
                "RESULT records=2000 published=2000 appended=2000 acked=2000 edge_batches=100 \
                           forwarded_acked=100 core_stored=100 duplicates=0 core_verified_records=2000 agent_exit=0"
            ),
            "{text}"
        );
        assert!((r.cpu.other() - 0.5).abs() < 1e-9);
        assert_eq!(slowest(&r.agent.core.event_to_durable), Some(0.05));
        assert_eq!(slowest(&buckets(&[(0.05, 1.0), (f64::INFINITY, 2.0)])), Some(f64::INFINITY));
        assert_eq!(slowest(&[]), None);
    }

    #[test]
    fn a_missing_batch_or_a_bad_exit_is_a_failure() {
        let mut r = report();
        r.agent.core.batches_stored = 99;
        r.exits.core = ExitStatus::from_raw(9);
        r.agent.core.event_to_durable = buckets(&[(0.05, 98.0), (f64::INFINITY, 100.0)]);
        let f = r.failures();
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].contains("core stored 99") && f[1].contains("core-ingest after SIGTERM"), "{f:?}");
        assert!(!r.target_met());
    }
}
