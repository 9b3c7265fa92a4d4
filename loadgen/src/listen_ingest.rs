//! `loadgen listen-ingest`: devices publish straight to the edge agent (listen mode), beside
//! Mosquitto's own publish → subscriber rate on the same machine in the same run.
//!
//! For each device count (default 100 and 1,000), the same N realistic CDRs (~250 B) are
//! published at QoS 1 by that many rumqttc connections, each with a window of `inflight`
//! unacknowledged PUBLISHes:
//!
//! 1. peer: to a private Mosquitto (`deploy/mosquitto/backhaul.conf`), with one QoS 1
//!    subscriber; timed from the first PUBLISH to the N-th delivery to the subscriber;
//! 2. agent: to `edge-agent run` with `[listen]`; timed from the first PUBLISH to the last
//!    PUBACK, and each PUBACK leaves only after the group commit (fsync) that covers it.
//!
//! Then latency: publishers paced at half the agent's rate with the first device count,
//! publish → PUBACK per message (rumqttc's outgoing PUBLISH event to its PUBACK), p50 / p99 /
//! max, for the agent and, for reference, for Mosquitto (which acks without any fsync). The
//! agent's resident memory (VmRSS) is read once it is ready and before any device connects, and
//! its peak (VmHWM) at the end. CPU seconds per process come from `/proc`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::task::JoinHandle;

use crate::agent::http_get;
use crate::mosquitto::{self, Mosquitto, free_port};
use crate::mqtt::{Publisher, STALL_TIMEOUT, Subscriber};
use crate::payload::{Message, MessageSet};
use crate::process::{CpuClock, Proc};
use crate::progress::{Goal, Progress};
use crate::prom::{self, Bucket, Exposition};

/// The stream, and the filter routed to it.
const STREAM: &str = "cdr";
const CDR_FILTER: &str = "cdr/#";
/// Room for the MQTT header and topic above the largest payload.
const PACKET_OVERHEAD_BYTES: usize = 1024;
/// `[streams.cdr]` as in `deploy/edge-agent.example.toml` for billing CDRs.
const LINGER_MS: u64 = 5;
const FSYNC_INTERVAL_MS: u64 = 5;
/// How long the agent gets to start or stop.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Requests a paced publisher queues ahead of its event loop.
const REQUEST_CHANNEL_LEN: usize = 1024;

/// `loadgen listen-ingest` options.
#[derive(Debug, Args)]
pub struct ListenIngestArgs {
    /// Messages published in each throughput run.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,
    /// Payload size in bytes (CDRs padded to it).
    #[arg(long, default_value_t = 250)]
    pub payload_bytes: usize,
    /// Device connection counts, one throughput run (peer and agent) each.
    #[arg(long, value_delimiter = ',', default_values_t = [100u64, 1000])]
    pub devices: Vec<u64>,
    /// Unacknowledged PUBLISHes per device (the agent's listen.inflight_max, the broker's
    /// max_inflight_messages).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..))]
    pub inflight: u16,
    /// Length of the latency run at half the agent's rate, seconds.
    #[arg(long, default_value_t = 10)]
    pub latency_seconds: u64,
    /// The edge-agent binary [default: edge-agent next to this loadgen executable].
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// The mosquitto binary [default: on PATH, or in /usr/sbin].
    #[arg(long, value_name = "PATH")]
    pub mosquitto: Option<PathBuf>,
    /// Seed of the CDR generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the temp dir and print where it is.
    #[arg(long)]
    pub keep: bool,
}

/// One throughput run.
#[derive(Clone, Copy, Debug)]
struct Throughput {
    devices: u64,
    wall_seconds: f64,
    target_cpu_seconds: f64,
    loadgen_cpu_seconds: f64,
}

/// Latency of a paced run, seconds.
#[derive(Clone, Copy, Debug)]
struct Latency {
    rate: f64,
    acked: u64,
    p50: f64,
    p99: f64,
    max: f64,
}

/// Runs the scenario and prints its figures; returns the checks that failed.
pub async fn run(args: ListenIngestArgs) -> anyhow::Result<Vec<String>> {
    let agent_exe = match &args.agent_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating loadgen")?.with_file_name("edge-agent"),
    };
    if !agent_exe.is_file() {
        bail!("no edge-agent at {} (cargo build --release -p edge-agent, or pass --agent-bin)", agent_exe.display());
    }
    let mosquitto_exe = match &args.mosquitto {
        Some(p) => p.clone(),
        None => mosquitto::find_exe()?,
    };
    if args.devices.is_empty() {
        bail!("--devices: at least one count");
    }
    let clock = CpuClock::new()?;
    let mut tmp = tempfile::Builder::new().prefix("loadgen-listen-ingest-").tempdir().context("creating a temp dir")?;
    tmp.disable_cleanup(args.keep);
    let dir = tmp.path();
    let set = MessageSet::cdrs(args.messages, args.payload_bytes, args.seed);
    let mean_payload = set.mean_payload_bytes();
    let largest = set.messages.iter().map(|m| m.payload.len()).max().unwrap_or(0);
    let messages: Arc<[Message]> = set.messages.into();
    let packet_bytes_max = largest + PACKET_OVERHEAD_BYTES;

    let broker = Mosquitto::start(&mosquitto_exe, dir, args.inflight)?;
    let agent = ListenAgent::start(&agent_exe, dir, args.inflight, packet_bytes_max).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss = rss_kib(agent.proc.pid(), "VmRSS")?;
    tracing::info!(broker = broker.port, agent = %agent.listen, idle_rss_kib = idle_rss, "broker and agent ready");

    let mut failures = Vec::new();
    let mut rows = Vec::new();
    let mut appended_ok = 0u64;
    for &n in &args.devices {
        let peer = peer_throughput(&broker, n, &messages, &args, clock, packet_bytes_max).await.context("peer run")?;
        tracing::info!(devices = n, rate = args.messages as f64 / peer.wall_seconds, "peer run done");
        let before = agent.appended().await?;
        let mine = agent_throughput(&agent, n, &messages, &args, clock, packet_bytes_max).await.context("agent run")?;
        let appended = agent.appended().await? - before;
        appended_ok += u64::from(appended == args.messages);
        if appended != args.messages {
            failures.push(format!("{n} devices: the agent appended {appended} of {}", args.messages));
        }
        tracing::info!(devices = n, rate = args.messages as f64 / mine.wall_seconds, "agent run done");
        rows.push((peer, mine));
    }

    let peak = args.messages as f64 / rows[0].1.wall_seconds;
    let rate = peak / 2.0;
    let n = args.devices[0];
    let latency_messages = ((rate * args.latency_seconds as f64) as usize).clamp(1, messages.len());
    let lat_messages: Arc<[Message]> = messages[..latency_messages].to_vec().into();
    let ack_before = agent.ack_buckets().await?;
    let agent_lat =
        paced_latency(agent.listen.port(), n, &lat_messages, rate, args.inflight, packet_bytes_max, "agent").await?;
    let ack_buckets = prom::bucket_delta(&agent.ack_buckets().await?, &ack_before);
    let inside = (prom::quantile(&ack_buckets, 0.5), prom::quantile(&ack_buckets, 0.99));
    let broker_lat =
        paced_latency(broker.port, n, &lat_messages, rate, args.inflight, packet_bytes_max, "peer").await?;
    let peak_rss = rss_kib(agent.proc.pid(), "VmHWM")?;
    let config = agent.config.clone();
    let (agent_exit, verify_exit, verify_out) = agent.stop_and_verify().await?;
    if agent_exit != 0 || verify_exit != 0 {
        failures.push(format!("edge-agent exit {agent_exit}, log verify exit {verify_exit}:\n{verify_out}"));
    }
    let broker_conf = broker.conf.clone();
    broker.stop().context("stopping mosquitto")?;

    println!("== loadgen listen-ingest");
    println!(
        "messages {} per run, CDR JSON (seed {}), payload mean {mean_payload:.1} B; QoS 1, {} in flight per device",
        args.messages, args.seed, args.inflight
    );
    println!("agent: {}", agent_exe.display());
    println!("\n-- mosquitto.conf\n{broker_conf}\n-- edge-agent.toml\n{config}");
    println!(
        "{:>8} | {:>14} {:>8} {:>8} | {:>14} {:>8} {:>8} | {:>6}",
        "devices", "mosquitto msg/s", "cpu s", "load s", "agent msg/s", "cpu s", "load s", "ratio"
    );
    for (peer, mine) in &rows {
        let (pr, ar) = (args.messages as f64 / peer.wall_seconds, args.messages as f64 / mine.wall_seconds);
        println!(
            "{:>8} | {:>14.0} {:>8.2} {:>8.2} | {:>14.0} {:>8.2} {:>8.2} | {:>5.2}x",
            peer.devices,
            pr,
            peer.target_cpu_seconds,
            peer.loadgen_cpu_seconds,
            ar,
            mine.target_cpu_seconds,
            mine.loadgen_cpu_seconds,
            ar / pr
        );
    }
    println!("(mosquitto: publish -> its subscriber, no fsync; agent: publish -> PUBACK after the covering fsync)");
    for (who, l) in [("agent", agent_lat), ("mosquitto", broker_lat)] {
        println!(
            "latency {who}: {n} devices paced at {:.0} msg/s (half the agent's {peak:.0}), {} PUBACKs: \
             p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            l.rate,
            l.acked,
            l.p50 * 1e3,
            l.p99 * 1e3,
            l.max * 1e3
        );
    }
    let ms = |q: Option<f64>| q.map_or("-".to_string(), |v| format!("{:.1}", v * 1e3));
    println!(
        "inside the agent (receive -> ack released, its histogram, bucket-interpolated): p50 {} ms, p99 {} ms",
        ms(inside.0),
        ms(inside.1)
    );
    println!(
        "agent RSS: idle {:.1} MiB (ready, no device), peak {:.1} MiB",
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    // One line for scripts and tests.
    let mut result = format!(
        "RESULT messages={} appended_ok={appended_ok} agent_exit={agent_exit} log_verify_exit={verify_exit}",
        args.messages
    );
    for (peer, mine) in &rows {
        let (pr, ar) = (args.messages as f64 / peer.wall_seconds, args.messages as f64 / mine.wall_seconds);
        result.push_str(&format!(" peer_msg_per_s_{0}={pr:.0} agent_msg_per_s_{0}={ar:.0}", peer.devices));
    }
    result.push_str(&format!(
        " latency_acked={} latency_p99_ms={:.2} idle_rss_kib={idle_rss} peak_rss_kib={peak_rss}",
        agent_lat.acked,
        agent_lat.p99 * 1e3
    ));
    println!("{result}");
    if args.keep {
        println!("kept: {}", dir.display());
    }
    Ok(failures)
}

async fn peer_throughput(
    broker: &Mosquitto,
    n: u64,
    messages: &Arc<[Message]>,
    args: &ListenIngestArgs,
    clock: CpuClock,
    packet_bytes_max: usize,
) -> anyhow::Result<Throughput> {
    let total = messages.len() as u64;
    let mut sub =
        Subscriber::subscribe(broker.port, &format!("loadgen-peer-sub-{n}"), CDR_FILTER, total, packet_bytes_max)
            .await?;
    let pubs = connect(broker.port, &format!("peer-{n}"), n, args.inflight, packet_bytes_max).await?;
    let (cpu0, me0) = (clock.cpu_seconds(Some(broker.pid()))?, clock.cpu_seconds(None)?);
    let (t0, tasks) = start(pubs, messages);
    let delivered = sub.wait_all().await?;
    join(tasks).await?;
    let (cpu1, me1) = (clock.cpu_seconds(Some(broker.pid()))?, clock.cpu_seconds(None)?);
    sub.unsubscribe_and_disconnect(CDR_FILTER).await?;
    Ok(Throughput {
        devices: n,
        wall_seconds: (delivered - t0).as_secs_f64(),
        target_cpu_seconds: cpu1 - cpu0,
        loadgen_cpu_seconds: me1 - me0,
    })
}

async fn agent_throughput(
    agent: &ListenAgent,
    n: u64,
    messages: &Arc<[Message]>,
    args: &ListenIngestArgs,
    clock: CpuClock,
    packet_bytes_max: usize,
) -> anyhow::Result<Throughput> {
    let pid = agent.proc.pid();
    let pubs = connect(agent.listen.port(), &format!("dev-{n}"), n, args.inflight, packet_bytes_max).await?;
    let (cpu0, me0) = (clock.cpu_seconds(Some(pid))?, clock.cpu_seconds(None)?);
    let (t0, tasks) = start(pubs, messages);
    let last_ack = join(tasks).await?;
    let (cpu1, me1) = (clock.cpu_seconds(Some(pid))?, clock.cpu_seconds(None)?);
    Ok(Throughput {
        devices: n,
        wall_seconds: (last_ack - t0).as_secs_f64(),
        target_cpu_seconds: cpu1 - cpu0,
        loadgen_cpu_seconds: me1 - me0,
    })
}

async fn connect(
    port: u16,
    prefix: &str,
    n: u64,
    inflight: u16,
    packet_bytes_max: usize,
) -> anyhow::Result<Vec<Publisher>> {
    let mut out = Vec::with_capacity(n as usize);
    for k in 0..n {
        out.push(Publisher::connect(port, &format!("{prefix}-{k}"), inflight, packet_bytes_max).await?);
    }
    Ok(out)
}

/// Publishing publishers and the live view of their PUBACKs.
struct Publishing {
    tasks: Vec<JoinHandle<anyhow::Result<Instant>>>,
    progress: Progress,
}

fn start(publishers: Vec<Publisher>, messages: &Arc<[Message]>) -> (Instant, Publishing) {
    let stride = publishers.len();
    let t0 = Instant::now();
    let acked = Arc::new(AtomicU64::new(0));
    let progress = {
        let acked = acked.clone();
        Progress::start("listen-ingest", Goal::Count(messages.len() as u64), "PUBACKs", move || acked.load(Relaxed))
    };
    let tasks = publishers
        .into_iter()
        .enumerate()
        .map(|(k, p)| tokio::spawn(p.publish_share(messages.clone(), k, stride, acked.clone())))
        .collect();
    (t0, Publishing { tasks, progress })
}

async fn join(publishing: Publishing) -> anyhow::Result<Instant> {
    let mut last: Option<Instant> = None;
    for t in publishing.tasks {
        let done = t.await.context("a publisher task")??;
        last = Some(last.map_or(done, |l| l.max(done)));
    }
    publishing.progress.finish();
    last.context("no publishers")
}

/// `n` publishers together holding `rate` msg/s; publish → PUBACK of every message.
async fn paced_latency(
    port: u16,
    n: u64,
    messages: &Arc<[Message]>,
    rate: f64,
    inflight: u16,
    packet_bytes_max: usize,
    prefix: &str,
) -> anyhow::Result<Latency> {
    let mut clients = Vec::new();
    for k in 0..n {
        let mut o = MqttOptions::new(format!("lat-{prefix}-{k}"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(packet_bytes_max, packet_bytes_max)
            .set_clean_session(true)
            .set_inflight(inflight);
        let (client, mut ev) = AsyncClient::new(o, REQUEST_CHANNEL_LEN);
        let mut net = ev.network_options();
        net.set_tcp_nodelay(true);
        ev.set_network_options(net);
        tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Event::Incoming(Packet::ConnAck(_)) = ev.poll().await? {
                    return Ok::<_, rumqttc::ConnectionError>(());
                }
            }
        })
        .await
        .context("no CONNACK")??;
        clients.push((client, ev));
    }
    let t0 = Instant::now() + Duration::from_millis(200);
    let stride = n as usize;
    let mut tasks = Vec::new();
    for (k, (client, mut ev)) in clients.into_iter().enumerate() {
        let messages = messages.clone();
        let expected = messages.len().saturating_sub(k).div_ceil(stride) as u64;
        let feeder = tokio::spawn(async move {
            for m in (k..messages.len()).step_by(stride) {
                tokio::time::sleep_until((t0 + Duration::from_secs_f64(m as f64 / rate)).into()).await;
                let msg = &messages[m];
                client.publish_bytes(msg.topic.clone(), QoS::AtLeastOnce, false, msg.payload.clone()).await?;
            }
            Ok::<_, rumqttc::ClientError>(client)
        });
        tasks.push(tokio::spawn(async move {
            let mut sent: HashMap<u16, Instant> = HashMap::new();
            let mut lat = Vec::with_capacity(expected as usize);
            while (lat.len() as u64) < expected {
                let e = tokio::time::timeout(STALL_TIMEOUT, ev.poll()).await.context("no PUBACK")??;
                match e {
                    Event::Outgoing(Outgoing::Publish(pkid)) => {
                        sent.insert(pkid, Instant::now());
                    }
                    Event::Incoming(Packet::PubAck(a)) => {
                        if let Some(at) = sent.remove(&a.pkid) {
                            lat.push(at.elapsed().as_secs_f64());
                        }
                    }
                    _ => {}
                }
            }
            let client = feeder.await.context("feeder")??;
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                loop {
                    match ev.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        _ => {}
                    }
                }
            })
            .await;
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("a paced publisher")??);
    }
    all.sort_by(f64::total_cmp);
    let q =
        |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0.0);
    Ok(Latency { rate, acked: all.len() as u64, p50: q(0.5), p99: q(0.99), max: all.last().copied().unwrap_or(0.0) })
}

/// `VmRSS` / `VmHWM` of `pid`, KiB.
fn rss_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc/<pid>/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The agent in listen mode, anonymous devices on a loopback port.
struct ListenAgent {
    proc: Proc,
    exe: PathBuf,
    admin: SocketAddr,
    listen: SocketAddr,
    data_dir: PathBuf,
    config: String,
}

impl ListenAgent {
    async fn start(exe: &Path, dir: &Path, inflight: u16, packet_bytes_max: usize) -> anyhow::Result<ListenAgent> {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let data_dir = dir.join("agent-data");
        let config = format!(
            r#"# Written by loadgen listen-ingest.
edge_id = "loadgen-listen"
data_dir = "{data}"

[admin]
listen = "{admin}"

[listen]
tcp = ["{listen}"]
allow_anonymous = true
connections_max = 5000
inflight_max = {inflight}
packet_bytes_max = {packet_bytes_max}

[[route]]
filter = "{CDR_FILTER}"
stream = "{STREAM}"

[streams.{STREAM}]
format = "json"
linger = "{LINGER_MS}ms"
batch_bytes_max = "256KiB"
zstd_level = 1
fsync = "interval"
fsync_interval = "{FSYNC_INTERVAL_MS}ms"
full_policy = "backpressure"
"#,
            data = data_dir.display()
        );
        let path = dir.join("edge-agent-listen.toml");
        std::fs::write(&path, &config).with_context(|| format!("writing {}", path.display()))?;
        let mut command = Command::new(exe);
        command.arg("run").arg("--config").arg(&path).env("RUST_LOG", "warn");
        let mut proc = Proc::spawn("edge-agent", command, &dir.join("edge-agent-listen.log"))?;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok((200, _)) = http_get(admin, "/readyz").await {
                break;
            }
            if let Some(status) = proc.exited() {
                bail!("edge-agent exited with {status}\n{}", proc.log_tail(30));
            }
            if Instant::now() > deadline {
                bail!("edge-agent not ready within {TIMEOUT:?}\n{}", proc.log_tail(30));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(ListenAgent { proc, exe: exe.to_path_buf(), admin, listen, data_dir, config })
    }

    async fn appended(&self) -> anyhow::Result<u64> {
        let (_, body) = http_get(self.admin, "/metrics").await?;
        let e = Exposition::parse(&body)?;
        e.value("backhaul_edge_records_appended_total", &format!("stream=\"{STREAM}\""))
            .map(|v| v as u64)
            .context("no appended count in /metrics")
    }

    /// The agent's receive → ack histogram now.
    async fn ack_buckets(&self) -> anyhow::Result<Vec<Bucket>> {
        let (_, body) = http_get(self.admin, "/metrics").await?;
        Ok(Exposition::parse(&body)?.buckets("backhaul_edge_receive_to_ack_seconds"))
    }

    /// SIGTERM, then `edge-agent log verify`: the two exit codes (-1: by a signal) and
    /// verify's output.
    async fn stop_and_verify(self) -> anyhow::Result<(i32, i32, String)> {
        let (exit, verify, out) = self.proc.stop_and_verify(TIMEOUT, self.exe, self.data_dir).await?;
        Ok((exit.code().unwrap_or(-1), verify.code().unwrap_or(-1), out))
    }
}

impl std::fmt::Debug for ListenAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenAgent").field("listen", &self.listen).finish_non_exhaustive()
    }
}
