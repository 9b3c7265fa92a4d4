//! `loadgen outage`: a WAN outage between edge and core while devices keep publishing, and then
//! the backfill, for Backhaul and for the peer an operator would otherwise deploy, fed the same
//! traffic and judged the same way: every message the edge acknowledged must reach the core
//! side exactly once (`verify`), and the rates over time show how the backlog drains.
//!
//! - **backhaul**: devices → Mosquitto (edge broker, the shipped settings) → `edge-agent`
//!   (subscribe mode, PUBACK after its fsync) → `loadgen wan` (UDP) → `core-ingest`; read back
//!   with `core-ingest log dump`.
//! - **mosquitto-bridge**: devices → an edge Mosquitto (same settings, persistence on) bridged
//!   at QoS 1 with a persistent session → `loadgen wan --tcp` → a core Mosquitto → a QoS 1
//!   subscriber with a persistent session that records every message it is given.
//!
//! - **nats-leaf**: devices → a NATS leaf node's MQTT listener (JetStream stream `CDR`) →
//!   `loadgen wan --tcp` → a hub whose stream sources `CDR` (NATS's store-and-forward); read
//!   back with a pull consumer.
//!
//! The outage is a window of the schedule (`LENGTH@START`, from when message 0 is due). For the
//! UDP link it drops every datagram; for TCP it is a black hole that holds bytes until it ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::agent::AgentSettings;
use crate::bench_report::{BenchReport, Sample, write_report};
use crate::core_ingest::binary;
use crate::core_node::{CoreNode, CoreSettings, Pki};
use crate::devices::{self, MqttArgs};
use crate::forwarding_agent::{self, Congestion, ForwardingAgent};
use crate::mosquitto::{self, Mosquitto};
use crate::trace::Kind;
use crate::verify::{Verdict, Verifier};
use crate::wan::model::{Impairment, Outage};
use crate::wan::tcp::{TcpImpairment, TcpProxy};
use crate::wan::{Proxy, ProxyLimits};

/// A system the scenario can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    /// Backhaul: edge-agent over QUIC to core-ingest.
    Backhaul,
    /// A Mosquitto bridge from an edge broker to a core broker, both with Backhaul's shipped
    /// broker settings (unbounded queues).
    MosquittoBridge,
    /// The same bridge with Mosquitto's stock limits (`max_queued_messages 1000`,
    /// `max_inflight_messages 20`), as a broker is usually found.
    MosquittoBridgeStock,
    /// A NATS leaf node (JetStream, MQTT listener) whose stream a hub's stream sources.
    NatsLeaf,
}

/// `loadgen outage` options.
#[derive(Clone, Debug, Args)]
pub struct OutageArgs {
    /// Messages per second from all devices.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub rate: u64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub seconds: u64,
    /// Device connections.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub devices: u32,
    /// The outage, LENGTH@START from when message 0 is due (`0s@0s`: none).
    #[arg(long, default_value = "20s@15s", value_parser = Outage::parse)]
    pub outage: Outage,
    /// Datagrams lost each way on Backhaul's UDP link, percent (TCP peers: not applicable, TCP
    /// retransmits; their link gets the delay only).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Backhaul's congestion control.
    #[arg(long, value_enum, default_value_t = Congestion::Cubic)]
    pub congestion: Congestion,
    /// One-way delay of every link (RTT = 2 ×).
    #[arg(long, default_value = "0ms", value_parser = crate::wan::parse_duration)]
    pub delay: Duration,
    /// Systems to run, one after the other.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [System::Backhaul, System::MosquittoBridge, System::MosquittoBridgeStock, System::NatsLeaf])]
    pub systems: Vec<System>,
    /// After the last message, how long the core side may take to catch up.
    #[arg(long, default_value = "300s", value_parser = crate::wan::parse_duration)]
    pub drain_timeout: Duration,
    /// Write `outage-<system>.{json,md,svg}` here.
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    /// edge-agent binary (default: beside loadgen).
    #[arg(long, value_name = "PATH")]
    pub agent_bin: Option<PathBuf>,
    /// core-ingest binary (default: beside loadgen).
    #[arg(long, value_name = "PATH")]
    pub core_bin: Option<PathBuf>,
    /// Mosquitto binary (default: on PATH or in /usr/sbin).
    #[arg(long, value_name = "PATH")]
    pub mosquitto: Option<PathBuf>,
    /// Seed of the payloads.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the temp dir.
    #[arg(long)]
    pub keep: bool,
}

/// How one system did.
#[derive(Debug)]
pub struct SystemOutcome {
    /// Which.
    pub system: System,
    /// Messages the edge acknowledged to the devices.
    pub acked: u64,
    /// The verification against what the core side holds.
    pub verdict: Verdict,
    /// From the outage's end until the core side held everything acknowledged before it ended
    /// (the backlog drained), seconds, to the sampling second; `None`: never, within the run
    /// and the drain timeout.
    pub backlog_drained_s: Option<f64>,
    /// From the last message's due time until the core side held every acknowledged message.
    pub all_stored_after_end_s: Option<f64>,
    /// The report.
    pub report: BenchReport,
}

/// Counts what reached the core side, sampled once a second.
struct Sampler {
    t0: Instant,
    last: (u64, u64),
    series: Vec<Sample>,
    /// (seconds, acked so far, stored so far) at every sample.
    totals: Vec<(f64, u64, u64)>,
}

impl Sampler {
    fn new(t0: Instant) -> Sampler {
        Sampler { t0, last: (0, 0), series: Vec::new(), totals: Vec::new() }
    }

    fn take(&mut self, published: u64, stored: u64) {
        let dt = 1.0;
        self.series.push(Sample {
            t: self.t0.elapsed().as_secs_f64(),
            rates: vec![
                ("acked at the edge".into(), (published.saturating_sub(self.last.0)) as f64 / dt),
                ("at the core".into(), (stored.saturating_sub(self.last.1)) as f64 / dt),
            ],
        });
        self.last = (published, stored);
        self.totals.push((self.t0.elapsed().as_secs_f64(), published, stored));
    }

    /// Seconds from `end` (since t0) until the core side held what the edge had acknowledged
    /// by then: how long the outage's backlog took to drain.
    fn drained_after(&self, end: f64) -> Option<f64> {
        let &(_, backlog_acked, _) = self.totals.iter().find(|(t, ..)| *t >= end)?;
        self.totals.iter().find(|(t, _, s)| *t >= end && *s >= backlog_acked).map(|(t, ..)| t - end)
    }
}

/// `loadgen outage`.
pub async fn run(args: OutageArgs) -> anyhow::Result<Vec<String>> {
    let mut tmp = tempfile::Builder::new().prefix("loadgen-outage-").tempdir().context("creating a temp dir")?;
    tmp.disable_cleanup(args.keep);
    let mosquitto_exe = match &args.mosquitto {
        Some(p) => p.clone(),
        None => mosquitto::find_exe()?,
    };
    let mut outcomes = Vec::new();
    for system in args.systems.clone() {
        let dir = tmp.path().join(format!("{system:?}").to_lowercase());
        std::fs::create_dir_all(&dir)?;
        let o = match system {
            System::Backhaul => run_backhaul(&args, &dir, &mosquitto_exe).await?,
            System::MosquittoBridge | System::MosquittoBridgeStock => {
                run_bridge(&args, &dir, &mosquitto_exe, system).await?
            }
            System::NatsLeaf => run_nats(&args, &dir).await?,
        };
        if let Some(rd) = &args.report_dir {
            write_report(rd, &format!("outage-{}", format!("{system:?}").to_lowercase()), &o.report)?;
        }
        outcomes.push(o);
    }
    println!(
        "\n== loadgen outage: {} msg/s for {} s, outage {:?} from {:?}",
        args.rate, args.seconds, args.outage.length, args.outage.start
    );
    println!(
        "| system | acked at the edge | found at the core once | lost | duplicated | backlog drained after the outage, s \
         | all stored after the last message, s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut failures = Vec::new();
    for o in &outcomes {
        let v = &o.verdict;
        let secs = |s: Option<f64>| s.map_or("never".into(), |s| format!("{s:.0}"));
        println!(
            "| {:?} | {} | {} | {} | {} | {} | {} |",
            o.system,
            o.acked,
            v.found,
            v.lost,
            v.duplicated,
            secs(o.backlog_drained_s),
            secs(o.all_stored_after_end_s)
        );
        let name = format!("{:?}", o.system).to_lowercase();
        println!(
            "RESULT system={name} acked={} found={} lost={} duplicated={} drained_s={} all_stored_s={}",
            o.acked,
            v.found,
            v.lost,
            v.duplicated,
            o.backlog_drained_s.unwrap_or(-1.0),
            o.all_stored_after_end_s.unwrap_or(-1.0)
        );
        // Backhaul is held to its promise; a peer's loss is a finding, not a failed run.
        if o.system == System::Backhaul && !v.ok() {
            failures.push(format!("backhaul: {} lost, {} duplicated", v.lost, v.duplicated));
        }
    }
    if args.keep {
        println!("kept: {}", tmp.path().display());
    }
    Ok(failures)
}

fn device_args(args: &OutageArgs, port: u16) -> MqttArgs {
    MqttArgs {
        host: "127.0.0.1".into(),
        port,
        devices: args.devices,
        rate: args.rate,
        seconds: args.seconds,
        kind: Kind::Cdr,
        payload_bytes: 0,
        topic: "cdr/site-{site}/dev-{device}".into(),
        qos: 1,
        burst: None,
        inflight: 100,
        connect_rate: 500,
        username: None,
        password: None,
        seed: args.seed,
        client_prefix: "loadgen".into(),
        manifest: None,
    }
}

/// Runs the devices while sampling `stored()`; then waits until `stored()` reaches what was
/// acknowledged (or the drain timeout). Returns the devices' outcome, the series and when the
/// core side caught up (from the outage's end).
async fn drive<F, Fut>(
    args: &OutageArgs,
    running: devices::Running,
    schedule_outage: impl FnOnce(Instant),
    mut stored: F,
) -> anyhow::Result<(devices::Finished, Vec<Sample>, Option<f64>, Option<f64>)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>>,
{
    let t0 = running.schedule_start();
    schedule_outage(t0 + args.outage.start);
    let outage_end = (args.outage.start + args.outage.length).as_secs_f64();
    let last_due = t0 + devices::due(args.rate * args.seconds, args.rate, None);
    let live = running.live();
    let mut sampler = Sampler::new(t0);
    let mut finishing = tokio::spawn(running.finish());
    let mut tick = tokio::time::interval_at((t0 + Duration::from_secs(1)).into(), Duration::from_secs(1));
    let finished = loop {
        tokio::select! {
            r = &mut finishing => break r.context("the device run")??,
            _ = tick.tick() => sampler.take(live.acked(), stored().await?),
        }
    };
    let deadline = Instant::now() + args.drain_timeout;
    let mut caught_up = None;
    loop {
        tick.tick().await;
        let s = stored().await?;
        sampler.take(live.acked(), s);
        if s >= finished.acked {
            caught_up = Some(Instant::now().saturating_duration_since(last_due).as_secs_f64());
            break;
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let drained = sampler.drained_after(outage_end);
    Ok((finished, sampler.series, drained, caught_up))
}

fn report(
    args: &OutageArgs,
    system: System,
    series: Vec<Sample>,
    finished: &devices::Finished,
    v: &Verdict,
    (drained, all): (Option<f64>, Option<f64>),
) -> BenchReport {
    let acked = finished.acked;
    let mut r = BenchReport {
        scenario: format!("outage ({system:?})"),
        command: format!(
            "loadgen outage --rate {} --seconds {} --devices {} --outage {}s@{}s --loss {} --delay {}ms --systems {}",
            args.rate,
            args.seconds,
            args.devices,
            args.outage.length.as_secs(),
            args.outage.start.as_secs(),
            args.loss,
            args.delay.as_millis(),
            format!("{system:?}").to_lowercase()
        ),
        series,
        latency_ms: finished.ack_latency_ms.clone(),
        ..BenchReport::default()
    };
    r.param("rate, msg/s", args.rate);
    r.param("seconds", args.seconds);
    r.param("devices", args.devices);
    r.param("outage", format!("{:?} from {:?}", args.outage.length, args.outage.start));
    r.param("loss each way (UDP link only)", format!("{}%", args.loss));
    r.param("one-way delay", format!("{:?}", args.delay));
    r.result("acked at the edge", acked);
    r.result("found at the core once", v.found);
    r.result("lost", v.lost);
    r.result("duplicated", v.duplicated);
    let secs = |s: Option<f64>| s.map_or("never".into(), |s| format!("{s:.0}"));
    r.result("backlog drained after the outage, s", secs(drained));
    r.result("all stored after the last message, s", secs(all));
    if !v.ok() {
        r.failures.push(format!("{} lost, {} duplicated", v.lost, v.duplicated));
    }
    r
}

async fn run_backhaul(args: &OutageArgs, dir: &Path, mosquitto_exe: &Path) -> anyhow::Result<SystemOutcome> {
    let agent_exe = binary(&args.agent_bin, "edge-agent", "agent-bin")?;
    let core_exe = binary(&args.core_bin, "core-ingest", "core-bin")?;
    let pki = Pki::create(&dir.join("pki"))?;
    let cert = pki.issue_edge(&forwarding_agent::edge_id())?;
    let mut core = CoreNode::start(&core_exe, dir, &pki, &CoreSettings::with_partitions(4)).await?;
    let broker = Mosquitto::start(mosquitto_exe, dir, 1000)?;
    let imp = Impairment { loss: args.loss / 100.0, delay: args.delay, ..Impairment::default() };
    imp.validate().map_err(|e| anyhow::anyhow!("--{e}"))?;
    let proxy =
        Proxy::start(SocketAddr::from(([127, 0, 0, 1], 0)), core.listen, imp, args.seed, ProxyLimits::default())
            .await?;
    let settings =
        AgentSettings { inflight: 1000, linger_ms: 5, fsync_interval_ms: 5, batch_bytes_max: "256KiB", zstd_level: 1 };
    let mut agent = ForwardingAgent::start(
        &agent_exe,
        dir,
        &settings,
        broker.port,
        proxy.local_addr(),
        &pki.ca_file(),
        &cert,
        args.congestion,
    )
    .await?;
    let mut probe = crate::mqtt::Publisher::connect(broker.port, "loadgen-probe", 1, 1 << 16).await?;
    agent.wait_subscribed(&mut probe).await?;
    probe.disconnect().await;
    let base = core.metrics().await?.records_stored;
    let running = devices::start(device_args(args, broker.port));
    let (finished, series, drained, all) = drive(
        args,
        running,
        |at| proxy.add_outage(at, args.outage.length),
        || async { Ok(core.metrics().await?.records_stored - base) },
    )
    .await?;
    core.check_alive()?;
    let (agent_exit, ..) = agent.stop_and_verify().await?;
    let data_dir = core.data_dir.clone();
    let (core_exit, ..) = core.stop_and_verify().await?;
    broker.stop()?;
    anyhow::ensure!(agent_exit.success() && core_exit.success(), "agent exit {agent_exit}, core exit {core_exit}");
    // Everything the core holds, every partition, as NDJSON.
    let mut verifier = Verifier::new(&finished.manifest)?;
    let out = Command::new(&core_exe)
        .args(["log", "dump", "--data-dir"])
        .arg(&data_dir)
        .args(["--stream", "cdr"])
        .output()
        .context("running core-ingest log dump")?;
    anyhow::ensure!(out.status.success(), "core-ingest log dump: {}", String::from_utf8_lossy(&out.stderr));
    verifier.read(&out.stdout[..])?;
    let verdict = verifier.finish();
    let report = report(args, System::Backhaul, series, &finished, &verdict, (drained, all));
    Ok(SystemOutcome {
        system: System::Backhaul,
        acked: finished.acked,
        verdict,
        backlog_drained_s: drained,
        all_stored_after_end_s: all,
        report,
    })
}

/// A QoS 1 subscriber (persistent session) that keeps every payload it is given.
struct Collector {
    got: Arc<Mutex<Vec<(Bytes, i64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start(port: u16) -> anyhow::Result<Collector> {
        let mut o = MqttOptions::new("loadgen-core-collector", "127.0.0.1", port);
        o.set_clean_session(false).set_keep_alive(Duration::from_secs(30)).set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(o, 64);
        client.subscribe("cdr/#", QoS::AtLeastOnce).await?;
        let got = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let got = got.clone();
            async move {
                let mut ready = Some(ready_tx);
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let now = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_millis() as i64);
                            got.lock().unwrap_or_else(PoisonError::into_inner).push((p.payload, now));
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx).await.context("no SUBACK from the core broker")??;
        let _ = client;
        Ok(Collector { got, task })
    }

    fn count(&self) -> u64 {
        self.got.lock().unwrap_or_else(PoisonError::into_inner).len() as u64
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_bridge(
    args: &OutageArgs,
    dir: &Path,
    mosquitto_exe: &Path,
    system: System,
) -> anyhow::Result<SystemOutcome> {
    let (core_dir, edge_dir) = (dir.join("core"), dir.join("edge"));
    std::fs::create_dir_all(&core_dir)?;
    std::fs::create_dir_all(&edge_dir)?;
    let core_broker = Mosquitto::start(mosquitto_exe, &core_dir, 1000)?;
    let proxy = TcpProxy::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SocketAddr::from(([127, 0, 0, 1], core_broker.port)),
        TcpImpairment { delay: args.delay, ..TcpImpairment::default() },
    )
    .await?;
    let collector = Collector::start(core_broker.port).await?;
    // The bridge as an operator would configure it for no loss: QoS 1 both ways, a persistent
    // session at the core, the edge broker persisting its queue (the shipped settings keep
    // queues unbounded: max_queued_messages 0).
    let bridge = format!(
        "\n# (loadgen outage) the bridge to the core broker, through the WAN proxy\n\
         persistence true\npersistence_location {}/\nautosave_interval 1\n\
         connection core\naddress 127.0.0.1:{}\ntopic cdr/# out 1\ncleansession false\n\
         bridge_protocol_version mqttv311\nkeepalive_interval 10\nrestart_timeout 1 5\n\
         try_private true\nbridge_max_packet_size 1048576\n",
        edge_dir.display(),
        proxy.local_addr().port()
    ) + if system == System::MosquittoBridgeStock {
        "# (loadgen outage) Mosquitto's stock limits\nmax_queued_messages 1000\nmax_inflight_messages 20\n"
    } else {
        ""
    };
    let edge_broker = Mosquitto::start_with(mosquitto_exe, &edge_dir, 1000, &bridge)?;
    // Wait for the bridge to connect: a probe message must cross.
    let mut probe = crate::mqtt::Publisher::connect(edge_broker.port, "loadgen-probe", 1, 1 << 16).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while collector.count() == 0 {
        probe.publish_one("cdr/probe", Bytes::from_static(b"{\"probe\":1}")).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        anyhow::ensure!(Instant::now() < deadline, "the Mosquitto bridge did not connect within 30 s");
    }
    probe.disconnect().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = collector.count();
    let running = devices::start(device_args(args, edge_broker.port));
    let (finished, series, drained, all) =
        drive(args, running, |at| proxy.add_outage(at, args.outage.length), || async { Ok(collector.count() - base) })
            .await?;
    let mut verifier = Verifier::new(&finished.manifest)?;
    for (payload, at) in collector.got.lock().unwrap_or_else(PoisonError::into_inner).iter() {
        verifier.record(payload, Some(*at));
    }
    edge_broker.stop()?;
    core_broker.stop()?;
    let verdict = verifier.finish();
    let report = report(args, system, series, &finished, &verdict, (drained, all));
    Ok(SystemOutcome {
        system,
        acked: finished.acked,
        verdict,
        backlog_drained_s: drained,
        all_stored_after_end_s: all,
        report,
    })
}

async fn run_nats(args: &OutageArgs, dir: &Path) -> anyhow::Result<SystemOutcome> {
    use crate::nats_peer::{Hub, Leaf, find_exe};
    let exe = find_exe()?;
    // The proxy first: the hub advertises it as its leafnode address.
    let leaf_port = crate::mosquitto::free_port()?;
    let proxy = TcpProxy::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SocketAddr::from(([127, 0, 0, 1], leaf_port)),
        TcpImpairment { delay: args.delay, ..TcpImpairment::default() },
    )
    .await?;
    let hub = Hub::start(&exe, dir, leaf_port, proxy.local_addr()).await?;
    let leaf = Leaf::start(&exe, dir, proxy.local_addr()).await?;
    hub.create_sourcing_stream().await?;
    // The link is up once a probe published at the leaf is in the hub's stream.
    let mut probe = crate::mqtt::Publisher::connect(leaf.mqtt_port, "loadgen-probe", 1, 1 << 16).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while hub.messages().await? == 0 {
        probe.publish_one("cdr/probe", Bytes::from_static(b"{\"probe\":1}")).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        anyhow::ensure!(Instant::now() < deadline, "the hub's stream did not source the leaf's within 60 s");
    }
    probe.disconnect().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = hub.messages().await?;
    let running = devices::start(device_args(args, leaf.mqtt_port));
    let (finished, series, drained, all) = drive(
        args,
        running,
        |at| proxy.add_outage(at, args.outage.length),
        || async { Ok(hub.messages().await?.saturating_sub(base)) },
    )
    .await?;
    let mut verifier = Verifier::new(&finished.manifest)?;
    hub.read_all(&mut verifier, base).await?;
    let verdict = verifier.finish();
    leaf.server.stop()?;
    hub.server.stop()?;
    let report = report(args, System::NatsLeaf, series, &finished, &verdict, (drained, all));
    Ok(SystemOutcome {
        system: System::NatsLeaf,
        acked: finished.acked,
        verdict,
        backlog_drained_s: drained,
        all_stored_after_end_s: all,
        report,
    })
}
