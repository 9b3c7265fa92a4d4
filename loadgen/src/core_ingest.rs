//! `loadgen core-ingest`: how much can one core node take from many edges at once, with group
//! commit, and what does a GB carried over QUIC cost it in CPU?
//!
//! A private CA (one client certificate per simulated edge, CommonName = its id), then
//! `core-ingest run` on ephemeral loopback ports with its data dir in the temp dir, then N
//! simulated edges in this process ([`crate::quic_edge`]), each its own QUIC connection sending
//! realistic zstd-1 CDR batches of ~`--batch-bytes` raw within a window of unacknowledged bytes.
//! Once every edge is welcomed, the clock runs `--seconds`: batches and bytes acknowledged as
//! durable, the core's CPU seconds (`/proc/<pid>/stat`) and its group commits
//! (`backhaul_core_group_commits_total`) are read at both ends of that window. Then the edges
//! stop, wait for their last ACKs and close; the core's counters must match what was sent,
//! with no duplicate; SIGTERM (exit 0) and `core-ingest log verify` (exit 0, every batch there).
//!
//! Two peers, in the same run once the core has stopped:
//!
//! - the disk's own rate for appending the same batch bytes with `std::fs` and `sync_data`
//!   once per as many batches as the core's rounds averaged ([`crate::disk_peer`]);
//! - the quinn peer: a bare quinn receiver in its own process (`loadgen quic-sink`,
//!   [`crate::quic_sink`]) with the core's endpoint, transport, mTLS and UDP buffer settings,
//!   that reads every stream and discards the data. The same number of edges connect to it
//!   with the same certificates and packet sizes ([`SimEdge::connect_raw`]) and write the same
//!   BATCH frames round and round, with no session, window or ACK (QUIC's flow control paces
//!   them), for the same `--seconds`. Its CPU seconds per GB of stream bytes read is what quinn
//!   alone costs a receiver; the core's figure over it says how much the core adds on top.
//!   `--no-quinn-peer` skips it. Unpaced, it runs as fast as QUIC and the two processes allow,
//!   often faster than the core; `--quinn-peer-paced` caps it at the core's MB/s, so both
//!   figures are at one rate.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::core_node::{self, CoreMetrics, CoreNode, CoreSettings, Pki, verified_counts};
use crate::disk_peer::{self, DiskPeerFigures};
use crate::process::{self, CpuClock};
use crate::progress::{Goal, Progress};
use crate::quic_edge::{self, EdgeCounters, EdgeTotals, PooledBatch, STREAM, SimEdge};
use crate::quic_sink::{self, SinkProc};

/// The issue's target: CPU core-seconds of the core per GB (10^9 bytes) carried over QUIC.
pub const TARGET_CPU_SECONDS_PER_GB: f64 = 1.3;
/// How often the core is checked to be alive while the clock runs.
const ALIVE_POLL: Duration = Duration::from_millis(500);
/// Bound on the quinn peer's start, on every edge's connection to it, and on its exit.
const QUINN_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// `loadgen core-ingest` options.
#[derive(Debug, Args)]
pub struct CoreIngestArgs {
    /// Simulated edges, each its own QUIC connection and client certificate.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub edges: u64,
    /// Seconds the clock runs once every edge is connected.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Raw (uncompressed) body bytes per batch: CDRs are added while they fit.
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1024..=(8 << 20)))]
    pub batch_bytes: u64,
    /// Most batch bytes each edge has sent and not yet had acknowledged.
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub window_bytes: u64,
    /// Distinct batches each edge encodes up front and sends round and round.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub pool_batches: u64,
    /// `partitions` of the core's stream (the shipped default is 4).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub partitions: u32,
    /// QUIC packets start at this UDP payload size (the core's and edges' `mtu_min`).
    #[arg(long, default_value_t = shared::quic::Mtu::DEFAULT.min)]
    pub mtu_min: u16,
    /// Path MTU discovery probes up to this UDP payload size (`mtu_max`, at most 8972).
    #[arg(long, default_value_t = shared::quic::Mtu::DEFAULT.max)]
    pub mtu_max: u16,
    /// The core's `udp_buffer_bytes` [default: the shipped 4 MiB]; the kernel caps it at
    /// `net.core.rmem_max` / `wmem_max` (the core warns).
    #[arg(long)]
    pub udp_buffer_bytes: Option<u64>,
    /// The core-ingest binary [default: core-ingest next to this loadgen executable].
    #[arg(long, value_name = "PATH")]
    pub core_bin: Option<PathBuf>,
    /// Seed of the CDR generator and the edges' epochs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep the temp dir (certificates, config, the core's log and data) and print where it is.
    #[arg(long)]
    pub keep: bool,
    /// Skip the quinn peer (a bare quinn receiver fed by the same edges, for CPU per GB).
    #[arg(long)]
    pub no_quinn_peer: bool,
    /// Pace the quinn peer's edges to the MB/s the core acknowledged, so both receivers are
    /// measured at one rate [default: unpaced, QUIC's flow control alone].
    #[arg(long, conflicts_with = "no_quinn_peer")]
    pub quinn_peer_paced: bool,
}

/// Runs the scenario and prints its figures; returns the checks that failed.
pub async fn run(args: CoreIngestArgs) -> anyhow::Result<Vec<String>> {
    let core_exe = binary(&args.core_bin, "core-ingest", "core-bin")?;
    let clock = CpuClock::new()?;
    let mut tmp = tempfile::Builder::new().prefix("loadgen-core-ingest-").tempdir().context("creating a temp dir")?;
    tmp.disable_cleanup(args.keep);
    let dir = tmp.path().to_path_buf();

    let prepared = Instant::now();
    let pki = Pki::create(&dir.join("pki"))?;
    let ids: Vec<String> = (0..args.edges).map(|i| format!("loadgen-edge-{i:04}")).collect();
    let certs = ids.iter().map(|id| pki.issue_edge(id)).collect::<anyhow::Result<Vec<_>>>()?;
    let pools = encode_pools(&args, &ids).await?;
    let pool_bytes: u64 = pools.iter().flatten().map(PooledBatch::batch_bytes).sum();
    let pool_raw: u64 = pools.iter().flatten().map(|b| b.raw_bytes).sum();
    tracing::info!(
        edges = args.edges,
        pool_batches = pools.iter().map(Vec::len).sum::<usize>(),
        ratio = format!("{:.2}", pool_raw as f64 / pool_bytes.max(1) as f64),
        elapsed_ms = prepared.elapsed().as_millis() as u64,
        "certificates issued, batches encoded"
    );

    let mtu = shared::quic::Mtu { min: args.mtu_min, max: args.mtu_max };
    mtu.check().map_err(|why| anyhow::anyhow!("--mtu-min / --mtu-max: {why}"))?;
    let mut core = CoreNode::start(
        &core_exe,
        &dir,
        &pki,
        &CoreSettings { partitions: args.partitions, mtu, udp_buffer_bytes: args.udp_buffer_bytes },
    )
    .await?;
    tracing::info!(pid = core.pid(), listen = %core.listen, "core-ingest ready");
    let mut connecting = JoinSet::new();
    for (k, (cert, pool)) in certs.iter().zip(&pools).enumerate() {
        let (listen, cert, pool) = (core.listen, cert.clone(), pool.clone());
        let epoch = quic_edge::epoch_for(args.seed, k as u64);
        connecting.spawn(async move { SimEdge::connect(listen, &cert, epoch, pool, mtu).await });
    }
    let mut edges = Vec::new();
    while let Some(r) = connecting.join_next().await {
        edges.push(r.context("an edge's connect task")??);
    }
    let welcomed = core.metrics().await?;
    if welcomed.connections != args.edges {
        bail!("the core counts {} connections, not {}", welcomed.connections, args.edges);
    }
    tracing::info!(edges = edges.len(), "every edge welcomed");

    let counters = Arc::new(EdgeCounters::default());
    let (go_tx, go) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let mut running = JoinSet::new();
    for edge in edges {
        running.spawn(edge.run(args.window_bytes, counters.clone(), go.clone(), stop.clone()));
    }
    let (core_pid, core_port) = (core.pid(), core.listen.port());
    let sample = |m: CoreMetrics| -> anyhow::Result<Sample> {
        Ok(Sample {
            at: Instant::now(),
            core_udp_drops: core_node::udp_socket_drops(core_port).unwrap_or(0),
            core_ticks: core_node::cpu_ticks(Some(core_pid)).unwrap_or_default(),
            loadgen_ticks: core_node::cpu_ticks(None).unwrap_or_default(),
            udp: core_node::udp_counters().unwrap_or_default(),
            core_cpu: clock.cpu_seconds(Some(core_pid))?,
            loadgen_cpu: clock.cpu_seconds(None)?,
            machine_cpu: process::machine_busy_seconds(clock)?,
            steal: process::machine_steal_seconds(clock)?,
            core: m,
            edges: counters.totals(),
        })
    };
    let start = sample(core.metrics().await?)?;
    go_tx.send_replace(true);
    let deadline = start.at + Duration::from_secs(args.seconds);
    let progress = {
        let counters = counters.clone();
        Progress::start("core-ingest", Goal::Time(Duration::from_secs(args.seconds)), "batches acked", move || {
            counters.totals().acked_batches
        })
    };
    let mut ended = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(ALIVE_POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
        core.check_alive()?;
        if let Some(r) = running.try_join_next() {
            // An edge ended before the clock did: it failed.
            ended.push(r);
            break;
        }
    }
    progress.finish();
    let metrics_at_end = core.metrics().await?;
    let end = sample(metrics_at_end)?;
    stop_tx.send_replace(true);
    while let Some(r) = running.join_next().await {
        ended.push(r);
    }
    let mut latencies = Vec::new();
    let mut edge_errors = Vec::new();
    let mut per_edge = (u64::MAX, 0);
    for r in ended {
        match r.context("an edge's task")? {
            Ok(l) => {
                per_edge = (per_edge.0.min(l.len() as u64), per_edge.1.max(l.len() as u64));
                latencies.extend(l);
            }
            Err(e) => edge_errors.push(format!("{e:#}")),
        }
    }
    let total = counters.totals();
    let after = core.metrics().await?;
    let (exit, verify, verify_output) = core.stop_and_verify().await?;
    tracing::info!(%exit, %verify, "core-ingest stopped and verified");

    let window = Window::between(&start, &end);
    let batches_per_round = window.batches_stored as f64 / window.group_commits.max(1) as f64;
    let peer =
        run_disk_peer(&dir, &pools, window.batches_stored.max(1), batches_per_round, args.seconds, clock).await?;
    let quinn_peer = if args.no_quinn_peer {
        None
    } else {
        // The core's rate, edge by edge (batch bytes; the peer's frames add 5 bytes each).
        let pace = args.quinn_peer_paced.then(|| window.wire_mb_per_second() * 1e6 / args.edges as f64);
        Some(run_quinn_peer(&args, &dir, &pki, &certs, &pools, mtu, pace, clock).await?)
    };

    let report = Report {
        edges: args.edges,
        batch_bytes: args.batch_bytes,
        window_bytes: args.window_bytes,
        partitions: args.partitions,
        mtu,
        pool_ratio: pool_raw as f64 / pool_bytes.max(1) as f64,
        window,
        latency: Latency::of(&mut latencies),
        per_edge_batches: if per_edge.0 == u64::MAX { (0, 0) } else { per_edge },
        total,
        quic_packets: (counters.quic_packets.load(Relaxed), counters.quic_lost.load(Relaxed)),
        path_mtu: *counters.path_mtu.lock().unwrap_or_else(|p| p.into_inner()),
        core_after: after,
        exit,
        verify,
        verify_counts: verified_counts(&verify_output, STREAM),
        verify_output,
        peer,
        quinn_peer,
        edge_errors,
    };
    println!("== loadgen core-ingest");
    println!(
        "{} edges × 1 QUIC connection (mTLS, Cubic), stream {STREAM}, CDR JSON batches of ≤ {} B raw, zstd 1 \
         (pool ×{:.2}), window {} B per edge, {} s; seed {}",
        args.edges, args.batch_bytes, report.pool_ratio, args.window_bytes, args.seconds, args.seed
    );
    println!("core: {}", core_exe.display());
    println!("\n-- core-ingest.toml\n{}", std::fs::read_to_string(dir.join("core-ingest.toml")).unwrap_or_default());
    print!("{}", report.render());
    if args.keep {
        println!("kept: {}", dir.display());
    }
    Ok(report.failures())
}

/// `name` beside this executable (`target/<profile>/`).
pub fn sibling_bin(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating the loadgen executable")?;
    Ok(me.parent().unwrap_or(Path::new(".")).join(name))
}

/// The binary `name`: `given` (from the option `--{flag}`), else the one beside loadgen; an
/// error naming both ways to get it when there is no file there.
pub fn binary(given: &Option<PathBuf>, name: &str, flag: &str) -> anyhow::Result<PathBuf> {
    let p = match given {
        Some(p) => p.clone(),
        None => sibling_bin(name)?,
    };
    if !p.is_file() {
        bail!("no {name} at {} (cargo build --release -p {name}, or pass --{flag})", p.display());
    }
    Ok(p)
}

async fn encode_pools(args: &CoreIngestArgs, ids: &[String]) -> anyhow::Result<Vec<Vec<PooledBatch>>> {
    let (count, batch_bytes, seed) = (args.pool_batches as usize, args.batch_bytes as usize, args.seed);
    let ids = ids.to_vec();
    tokio::task::spawn_blocking(move || {
        ids.iter()
            .enumerate()
            .map(|(k, id)| {
                let epoch = quic_edge::epoch_for(seed, k as u64);
                quic_edge::encode_pool(id, epoch, count, batch_bytes, seed.wrapping_add(k as u64), 0)
            })
            .collect()
    })
    .await
    .context("the encoding task")?
}

/// The same batches, edge after edge and round after round, as the core received them.
async fn run_disk_peer(
    dir: &Path,
    pools: &[Vec<PooledBatch>],
    count: u64,
    batches_per_round: f64,
    seconds: u64,
    clock: CpuClock,
) -> anyhow::Result<DiskPeerFigures> {
    let depth = pools.iter().map(Vec::len).max().unwrap_or(0);
    let order: Vec<PooledBatch> =
        (0..depth).flat_map(|k| pools.iter().filter_map(move |p| p.get(k).cloned())).collect();
    let per_sync = batches_per_round.round().max(1.0) as u64;
    let peer_dir = dir.join("disk-peer");
    // The edges are gone and the core has stopped: loadgen's CPU is the peer's.
    let cpu0 = clock.cpu_seconds(None)?;
    let mut f = tokio::task::spawn_blocking(move || {
        let batches: Vec<&[u8]> = order.iter().map(PooledBatch::batch).collect();
        disk_peer::append_and_sync(&peer_dir, &batches, count, per_sync, Duration::from_secs(seconds))
    })
    .await
    .context("the disk peer task")??;
    f.cpu_seconds = clock.cpu_seconds(None)? - cpu0;
    Ok(f)
}

/// The quinn peer: `loadgen quic-sink` in its own process, `args.edges` edges writing the same
/// batches to it for `args.seconds` once all are connected (each at most `pace` bytes/s, if
/// given); its CPU and the bytes it read are sampled at both ends of that clock.
#[allow(clippy::too_many_arguments)] // the run's own pieces, each named
async fn run_quinn_peer(
    args: &CoreIngestArgs,
    dir: &Path,
    pki: &Pki,
    certs: &[core_node::EdgeCert],
    pools: &[Vec<PooledBatch>],
    mtu: shared::quic::Mtu,
    pace: Option<f64>,
    clock: CpuClock,
) -> anyhow::Result<QuinnPeerFigures> {
    let exe = std::env::current_exe().context("locating the loadgen executable for the quinn peer")?;
    let mut command = quic_sink::command(&exe, pki, mtu);
    command
        .args(["--udp-buffer-bytes", &args.udp_buffer_bytes.unwrap_or(quic_sink::UDP_BUFFER_BYTES).to_string()])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    let log = dir.join("quic-sink.log");
    let mut sink = tokio::task::block_in_place(|| SinkProc::start(command, &log))?;
    tracing::info!(pid = sink.pid(), listen = %sink.listen, "quinn peer (quic-sink) ready");

    let mut connecting = JoinSet::new();
    for (cert, pool) in certs.iter().zip(pools) {
        let (listen, cert, pool) = (sink.listen, cert.clone(), pool.clone());
        connecting.spawn(async move { SimEdge::connect_raw(listen, &cert, pool, mtu).await });
    }
    let mut edges = Vec::new();
    while let Some(r) = connecting.join_next().await {
        edges.push(r.context("an edge's connect task (quinn peer)")??);
    }
    // The sink counts a connection once the client's last handshake flight reaches it.
    let deadline = Instant::now() + QUINN_PEER_TIMEOUT;
    loop {
        let seen = tokio::task::block_in_place(|| sink.counts())?.connections;
        if seen == args.edges {
            break;
        }
        if Instant::now() >= deadline {
            bail!("the quinn peer counts {seen} connections, not {}, after {QUINN_PEER_TIMEOUT:?}", args.edges);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(edges = edges.len(), "every edge connected to the quinn peer");

    let counters = Arc::new(EdgeCounters::default());
    let (go_tx, go) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let mut running = JoinSet::new();
    for edge in edges {
        running.spawn(edge.run_raw(pace, counters.clone(), go.clone(), stop.clone()));
    }
    let (sink_pid, sink_port) = (sink.pid(), sink.listen.port());
    let sample = |sink: &mut SinkProc| -> anyhow::Result<PeerSample> {
        let counts = tokio::task::block_in_place(|| sink.counts())?;
        Ok(PeerSample {
            at: Instant::now(),
            sink_cpu: clock.cpu_seconds(Some(sink_pid))?,
            loadgen_cpu: clock.cpu_seconds(None)?,
            machine_cpu: process::machine_busy_seconds(clock)?,
            udp_drops: core_node::udp_socket_drops(sink_port).unwrap_or(0),
            bytes: counts.bytes,
        })
    };
    let start = sample(&mut sink)?;
    go_tx.send_replace(true);
    let deadline = start.at + Duration::from_secs(args.seconds);
    let progress = {
        let counters = counters.clone();
        Progress::start("quinn peer", Goal::Time(Duration::from_secs(args.seconds)), "batches sent", move || {
            counters.sent_batches.load(Relaxed)
        })
    };
    let mut ended = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(ALIVE_POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
        sink.check_alive()?;
        if let Some(r) = running.try_join_next() {
            // An edge ended before the clock did: it failed.
            ended.push(r);
            break;
        }
    }
    progress.finish();
    let end = sample(&mut sink)?;
    stop_tx.send_replace(true);
    while let Some(r) = running.join_next().await {
        ended.push(r);
    }
    let mut errors = Vec::new();
    for r in ended {
        if let Err(e) = r.context("an edge's task (quinn peer)")? {
            errors.push(format!("{e:#}"));
        }
    }
    let exit = tokio::task::spawn_blocking(move || sink.stop(QUINN_PEER_TIMEOUT))
        .await
        .context("the quinn peer's stop task")??;
    let figures = QuinnPeerFigures {
        seconds: (end.at - start.at).as_secs_f64(),
        bytes: end.bytes - start.bytes,
        cpu_seconds: end.sink_cpu - start.sink_cpu,
        loadgen_cpu_seconds: end.loadgen_cpu - start.loadgen_cpu,
        machine_cpu_seconds: end.machine_cpu - start.machine_cpu,
        udp_drops: end.udp_drops.saturating_sub(start.udp_drops),
        path_mtu: *counters.path_mtu.lock().unwrap_or_else(|p| p.into_inner()),
        quic_packets: (counters.quic_packets.load(Relaxed), counters.quic_lost.load(Relaxed)),
        paced_mb_per_second: pace.map(|p| p * args.edges as f64 / 1e6),
        exit: Some(exit),
        errors,
    };
    tracing::info!(
        mb_per_s = format!("{:.1}", figures.mb_per_second()),
        cpu_s_per_gb = format!("{:.3}", figures.cpu_seconds_per_gb()),
        %exit,
        "quinn peer done"
    );
    Ok(figures)
}

/// What the quinn peer did while its clock ran.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuinnPeerFigures {
    /// The clocked window, seconds.
    pub seconds: f64,
    /// Stream bytes the sink read in it (the BATCH frames, 5 bytes of frame header more per
    /// batch than the batch bytes the core's figures count).
    pub bytes: u64,
    /// The sink's CPU seconds in it.
    pub cpu_seconds: f64,
    /// loadgen's CPU seconds in it: the edges.
    pub loadgen_cpu_seconds: f64,
    /// The whole machine's busy CPU seconds in it (other load shows as the rest).
    pub machine_cpu_seconds: f64,
    /// Datagrams the kernel dropped at the sink's socket in it (receive buffer full).
    pub udp_drops: u64,
    /// Path MTU the edges' connections ended with: lowest, highest.
    pub path_mtu: Option<(u16, u16)>,
    /// QUIC packets the edges sent, and of those quinn declared lost (whole peer run).
    pub quic_packets: (u64, u64),
    /// The rate the edges were paced to, all together (`--quinn-peer-paced`), MB/s.
    pub paced_mb_per_second: Option<f64>,
    /// The sink's exit status once its stdin closed.
    pub exit: Option<ExitStatus>,
    /// Edges that failed, and why.
    pub errors: Vec<String>,
}

impl QuinnPeerFigures {
    /// Stream bytes read per second, MB (10^6).
    pub fn mb_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }

    /// The sink's CPU core-seconds per GB (10^9) of stream bytes read.
    pub fn cpu_seconds_per_gb(&self) -> f64 {
        self.cpu_seconds / (self.bytes as f64 / 1e9).max(1e-12)
    }
}

/// One end of the quinn peer's clock.
#[derive(Clone, Copy, Debug)]
struct PeerSample {
    at: Instant,
    sink_cpu: f64,
    loadgen_cpu: f64,
    machine_cpu: f64,
    udp_drops: u64,
    bytes: u64,
}

/// Everything read at one end of the clock.
#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    core_udp_drops: u64,
    core_ticks: (u64, u64),
    loadgen_ticks: (u64, u64),
    udp: (u64, u64),
    core_cpu: f64,
    loadgen_cpu: f64,
    machine_cpu: f64,
    steal: f64,
    core: CoreMetrics,
    edges: EdgeTotals,
}

/// What happened while the clock ran.
#[derive(Clone, Debug, Default)]
pub struct Window {
    /// Its length.
    pub seconds: f64,
    /// What the edges sent and had acknowledged in it.
    pub edges: EdgeTotals,
    /// Batches the core appended in it.
    pub batches_stored: u64,
    /// Bytes it appended.
    pub stored_bytes: u64,
    /// Its group commits (rounds) in it.
    pub group_commits: u64,
    /// The core's CPU seconds in it.
    pub core_cpu_seconds: f64,
    /// loadgen's (the edges') CPU seconds in it.
    pub loadgen_cpu_seconds: f64,
    /// Busy CPU seconds of the whole machine in it.
    pub machine_cpu_seconds: f64,
    /// CPU seconds the hypervisor gave other guests in it (steal; counted in the machine's).
    pub steal_seconds: f64,
    /// Datagrams the kernel dropped at the core's UDP socket (receive buffer full) in it.
    pub core_udp_drops: u64,
    /// UDP datagrams received on the whole machine in it (both directions are loopback).
    pub udp_in: u64,
    /// UDP receive-buffer errors on the whole machine in it.
    pub udp_rcvbuf_errors: u64,
    /// Share of the core's CPU time spent in the kernel (stime / (utime + stime)).
    pub core_system_share: f64,
    /// The same for loadgen.
    pub loadgen_system_share: f64,
}

impl Window {
    fn between(a: &Sample, b: &Sample) -> Window {
        Window {
            seconds: (b.at - a.at).as_secs_f64(),
            edges: b.edges.since(&a.edges),
            batches_stored: b.core.batches_stored - a.core.batches_stored,
            stored_bytes: b.core.stored_bytes - a.core.stored_bytes,
            group_commits: b.core.group_commits - a.core.group_commits,
            core_cpu_seconds: b.core_cpu - a.core_cpu,
            loadgen_cpu_seconds: b.loadgen_cpu - a.loadgen_cpu,
            machine_cpu_seconds: b.machine_cpu - a.machine_cpu,
            steal_seconds: b.steal - a.steal,
            core_udp_drops: b.core_udp_drops.saturating_sub(a.core_udp_drops),
            udp_in: b.udp.0.saturating_sub(a.udp.0),
            udp_rcvbuf_errors: b.udp.1.saturating_sub(a.udp.1),
            core_system_share: system_share(a.core_ticks, b.core_ticks),
            loadgen_system_share: system_share(a.loadgen_ticks, b.loadgen_ticks),
        }
    }

    /// Batch bytes acknowledged durable per second, MB (10^6) — what QUIC carried.
    pub fn wire_mb_per_second(&self) -> f64 {
        self.edges.acked_bytes as f64 / 1e6 / self.seconds
    }

    /// The core's CPU core-seconds per GB (10^9) of batch bytes acknowledged.
    pub fn core_cpu_seconds_per_gb(&self) -> f64 {
        self.core_cpu_seconds / (self.edges.acked_bytes as f64 / 1e9).max(1e-12)
    }
}

/// Send → ACK quantiles over every batch, seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Latency {
    /// Batches measured.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// Sorts `d` and reads its quantiles (nearest rank).
    pub fn of(d: &mut [Duration]) -> Latency {
        if d.is_empty() {
            return Latency::default();
        }
        d.sort_unstable();
        let at = |q: f64| d[((q * d.len() as f64).ceil() as usize).clamp(1, d.len()) - 1].as_secs_f64();
        Latency { count: d.len() as u64, p50: at(0.5), p99: at(0.99), max: at(1.0) }
    }
}

/// Everything `core-ingest` reports.
#[derive(Clone, Debug)]
pub struct Report {
    /// Edges.
    pub edges: u64,
    /// `--batch-bytes`.
    pub batch_bytes: u64,
    /// `--window-bytes`.
    pub window_bytes: u64,
    /// `--partitions`.
    pub partitions: u32,
    /// `--mtu-min` / `--mtu-max`.
    pub mtu: shared::quic::Mtu,
    /// Raw / compressed bytes of the edges' pools.
    pub pool_ratio: f64,
    /// The clocked window.
    pub window: Window,
    /// Send → ACK of every batch.
    pub latency: Latency,
    /// Batches acknowledged per edge over the whole run: fewest, most.
    pub per_edge_batches: (u64, u64),
    /// Edge totals at the end (after the drain).
    pub total: EdgeTotals,
    /// QUIC packets the edges sent and quinn declared lost, whole run.
    pub quic_packets: (u64, u64),
    /// Path MTU the edges' connections ended with: lowest, highest.
    pub path_mtu: Option<(u16, u16)>,
    /// The core's counters at the end.
    pub core_after: CoreMetrics,
    /// The core's exit status after SIGTERM.
    pub exit: ExitStatus,
    /// Exit status of `core-ingest log verify`.
    pub verify: ExitStatus,
    /// Batches and records `log verify` counted in the stream.
    pub verify_counts: Option<(u64, u64)>,
    /// Its output.
    pub verify_output: String,
    /// The disk peer.
    pub peer: DiskPeerFigures,
    /// The quinn peer, unless `--no-quinn-peer`.
    pub quinn_peer: Option<QuinnPeerFigures>,
    /// Edges that failed, and why.
    pub edge_errors: Vec<String>,
}

impl Report {
    /// Core MB/s (batch bytes stored) / the disk peer's MB/s.
    pub fn disk_ratio(&self) -> f64 {
        let core = self.window.stored_bytes as f64 / 1e6 / self.window.seconds;
        core / self.peer.mb_per_second().max(1e-9)
    }

    /// The core's CPU per GB over the quinn peer's, if it ran.
    pub fn core_to_quinn_cpu_ratio(&self) -> Option<f64> {
        let q = self.quinn_peer.as_ref()?;
        Some(self.window.core_cpu_seconds_per_gb() / q.cpu_seconds_per_gb().max(1e-12))
    }

    /// Checks that failed: an edge error, a batch not stored exactly once, a bad exit, a quinn
    /// peer that failed or read nothing.
    pub fn failures(&self) -> Vec<String> {
        let (t, c) = (&self.total, &self.core_after);
        let mut f: Vec<String> = self.edge_errors.iter().map(|e| format!("edge: {e}")).collect();
        if t.acked_batches != t.sent_batches || c.batches_stored != t.sent_batches {
            f.push(format!(
                "batches: sent {}, acknowledged {}, stored by the core {}",
                t.sent_batches, t.acked_batches, c.batches_stored
            ));
        }
        if c.duplicates != 0 || c.conflicts != 0 || c.refused != 0 {
            f.push(format!("core: {} duplicates, {} conflicts, {} refused", c.duplicates, c.conflicts, c.refused));
        }
        if self.verify_counts != Some((t.sent_batches, t.acked_records)) {
            f.push(format!(
                "log verify counted (batches, records) {:?}, expected ({}, {})",
                self.verify_counts, t.sent_batches, t.acked_records
            ));
        }
        if !self.exit.success() {
            f.push(format!("core-ingest exited with {} after SIGTERM", self.exit));
        }
        if !self.verify.success() {
            f.push(format!("core-ingest log verify exited with {}: {}", self.verify, self.verify_output.trim()));
        }
        if t.sent_batches == 0 {
            f.push("no batch was sent".into());
        }
        if let Some(q) = &self.quinn_peer {
            f.extend(q.errors.iter().map(|e| format!("quinn peer edge: {e}")));
            if let Some(exit) = q.exit.filter(|e| !e.success()) {
                f.push(format!("the quinn peer (loadgen quic-sink) exited with {exit}"));
            }
            if q.bytes == 0 {
                f.push("the quinn peer read no byte in its window".into());
            }
        }
        f
    }

    /// The table, the verdict and the `RESULT` line.
    pub fn render(&self) -> String {
        let (w, e, p) = (&self.window, &self.window.edges, &self.peer);
        let per_s = |x: u64| x as f64 / w.seconds;
        let mb_s = |x: u64| x as f64 / 1e6 / w.seconds;
        let gb = e.acked_bytes as f64 / 1e9;
        let ms = |s: f64| format!("{:.1}", s * 1e3);
        let other = (w.machine_cpu_seconds - w.core_cpu_seconds - w.loadgen_cpu_seconds).max(0.0);
        let mut rows: Vec<(&str, String)> = vec![
            ("clocked window, s", format!("{:.3}", w.seconds)),
            ("batches acked durable (sent)", format!("{} ({})", e.acked_batches, e.sent_batches)),
            ("batches/s acked durable", format!("{:.0}", per_s(e.acked_batches))),
            ("MB/s over QUIC (batch bytes, zstd 1)", format!("{:.1}", mb_s(e.acked_bytes))),
            ("MB/s raw (batch bodies before zstd)", format!("{:.1}", mb_s(e.acked_raw_bytes))),
            ("MB/s CDR payload (JSON)", format!("{:.1}", mb_s(e.acked_payload_bytes))),
            ("records/s", format!("{:.0}", per_s(e.acked_records))),
            (
                "mean batch on the wire, B (records)",
                format!("{:.0} ({:.0})", div(e.acked_bytes, e.acked_batches), div(e.acked_records, e.acked_batches)),
            ),
            (
                "send → ACK p50 / p99 / max, ms (every batch)",
                format!("{} / {} / {}", ms(self.latency.p50), ms(self.latency.p99), ms(self.latency.max)),
            ),
            (
                "batches acked per edge, whole run: fewest / most",
                format!("{} / {}", self.per_edge_batches.0, self.per_edge_batches.1),
            ),
            ("UDP datagrams dropped at the core's socket (receive buffer full)", w.core_udp_drops.to_string()),
            (
                "QUIC packet size: mtu_min / mtu_max; path MTU at the end, lowest / highest edge",
                format!(
                    "{} / {}; {}",
                    self.mtu.min,
                    self.mtu.max,
                    self.path_mtu.map_or("–".into(), |(lo, hi)| format!("{lo} / {hi}"))
                ),
            ),
            (
                "QUIC packets sent by the edges, declared lost (whole run)",
                format!(
                    "{}, {} ({:.2}%)",
                    self.quic_packets.0,
                    self.quic_packets.1,
                    100.0 * self.quic_packets.1 as f64 / self.quic_packets.0.max(1) as f64
                ),
            ),
            (
                "UDP datagrams received / receive-buffer errors, whole machine",
                format!("{} / {}", w.udp_in, w.udp_rcvbuf_errors),
            ),
            ("group commits (fsync rounds) in the window", w.group_commits.to_string()),
            (
                "rounds/s; batches per round",
                format!("{:.0}; {:.1}", per_s(w.group_commits), div(w.batches_stored, w.group_commits)),
            ),
            (
                "CPU s, core-ingest (cores busy)",
                format!("{:.2} ({:.2})", w.core_cpu_seconds, w.core_cpu_seconds / w.seconds),
            ),
            (
                "CPU s, loadgen: the edges (cores busy)",
                format!("{:.2} ({:.2})", w.loadgen_cpu_seconds, w.loadgen_cpu_seconds / w.seconds),
            ),
            ("CPU s, other processes (machine busy − the above)", format!("{other:.2}")),
            ("CPU s stolen by the hypervisor (steal; within the above)", format!("{:.2}", w.steal_seconds)),
            (
                "kernel share of CPU time: core-ingest / loadgen",
                format!("{:.0}% / {:.0}%", w.core_system_share * 100.0, w.loadgen_system_share * 100.0),
            ),
            ("core CPU core-seconds per GB over QUIC", format!("{:.3}", w.core_cpu_seconds_per_gb())),
            ("loadgen CPU core-seconds per GB over QUIC", format!("{:.3}", w.loadgen_cpu_seconds / gb.max(1e-12))),
            (
                "core: duplicates / conflicts / refused (whole run)",
                format!("{} / {} / {}", self.core_after.duplicates, self.core_after.conflicts, self.core_after.refused),
            ),
            (
                "whole run: batches sent / acked / stored by the core",
                format!(
                    "{} / {} / {}",
                    self.total.sent_batches, self.total.acked_batches, self.core_after.batches_stored
                ),
            ),
            ("log verify: batches, records", self.verify_counts.map_or("-".into(), |(b, r)| format!("{b}, {r}"))),
            ("SIGTERM exit / log verify exit", format!("{} / {}", code(self.exit), code(self.verify))),
            ("disk peer: batches per sync_data", p.batches_per_sync.to_string()),
            ("disk peer: batches, MB in s", format!("{}, {:.1} in {:.3}", p.batches, p.bytes as f64 / 1e6, p.seconds)),
            ("disk peer: MB/s (batches/s)", format!("{:.1} ({:.0})", p.mb_per_second(), p.batches_per_second())),
            (
                "disk peer: CPU s (core-seconds per GB)",
                format!("{:.2} ({:.3})", p.cpu_seconds, p.cpu_seconds / (p.bytes as f64 / 1e9).max(1e-12)),
            ),
            ("core MB/s stored / disk peer MB/s", format!("{:.3}", self.disk_ratio())),
        ];
        if let Some(q) = &self.quinn_peer {
            let ratio = self.core_to_quinn_cpu_ratio().unwrap_or(0.0);
            rows.extend([
                (
                    "quinn peer (bare quinn receiver, same edges and packets): MB/s over QUIC",
                    format!(
                        "{:.1} in {:.3} s ({})",
                        q.mb_per_second(),
                        q.seconds,
                        q.paced_mb_per_second.map_or("unpaced".into(), |r| format!("paced to {r:.1}"))
                    ),
                ),
                (
                    "quinn peer: CPU s (core-seconds per GB)",
                    format!("{:.2} ({:.3})", q.cpu_seconds, q.cpu_seconds_per_gb()),
                ),
                (
                    "quinn peer: CPU s, loadgen: the edges (core-seconds per GB)",
                    format!(
                        "{:.2} ({:.3})",
                        q.loadgen_cpu_seconds,
                        q.loadgen_cpu_seconds / (q.bytes as f64 / 1e9).max(1e-12)
                    ),
                ),
                (
                    "quinn peer: CPU s, other processes (machine busy − the above)",
                    format!("{:.2}", (q.machine_cpu_seconds - q.cpu_seconds - q.loadgen_cpu_seconds).max(0.0)),
                ),
                (
                    "quinn peer: path MTU at the end, lowest / highest edge; packets sent, lost",
                    format!(
                        "{}; {}, {} ({:.2}%)",
                        q.path_mtu.map_or("–".into(), |(lo, hi)| format!("{lo} / {hi}")),
                        q.quic_packets.0,
                        q.quic_packets.1,
                        100.0 * q.quic_packets.1 as f64 / q.quic_packets.0.max(1) as f64
                    ),
                ),
                ("quinn peer: UDP datagrams dropped at its socket (receive buffer full)", q.udp_drops.to_string()),
                ("core CPU per GB / quinn peer CPU per GB", format!("{ratio:.3}")),
            ]);
        }
        let mut out = String::new();
        let _ = writeln!(out, "| figure | core-ingest, {} edges, {} partitions |", self.edges, self.partitions);
        let _ = writeln!(out, "|---|---:|");
        for (label, value) in &rows {
            let _ = writeln!(out, "| {label} | {value} |");
        }
        let cpu = w.core_cpu_seconds_per_gb();
        let verdict = if cpu <= TARGET_CPU_SECONDS_PER_GB { "met" } else { "NOT met" };
        let _ = writeln!(
            out,
            "\ncore CPU per GB over QUIC: {cpu:.3} core-s (target ≤ {TARGET_CPU_SECONDS_PER_GB}: {verdict})"
        );
        let mut quinn_fields = String::new();
        if let (Some(q), Some(ratio)) = (&self.quinn_peer, self.core_to_quinn_cpu_ratio()) {
            let q_cpu = q.cpu_seconds_per_gb();
            let within = if q_cpu <= TARGET_CPU_SECONDS_PER_GB { "within" } else { "above" };
            let _ = writeln!(
                out,
                "bare quinn receiver, same edges and packets: {q_cpu:.3} core-s per GB ({within} the target); \
                 the core spends {ratio:.2}× that"
            );
            quinn_fields = format!(
                " quinn_peer_mb_per_s={:.2} quinn_peer_cpu_s_per_gb={q_cpu:.4} core_to_quinn_cpu_ratio={ratio:.4}",
                q.mb_per_second()
            );
        }
        let _ = writeln!(
            out,
            "RESULT edges={} sent={} acked={} stored={} duplicates={} conflicts={} refused={} verified_batches={} \
             verified_records={} acked_records={} core_exit={} log_verify_exit={} batches_per_s={:.0} wire_mb_per_s={:.2} \
             core_cpu_s_per_gb={cpu:.4} batches_per_round={:.2} disk_ratio={:.4} steal_s={:.2}{quinn_fields}",
            self.edges,
            self.total.sent_batches,
            self.total.acked_batches,
            self.core_after.batches_stored,
            self.core_after.duplicates,
            self.core_after.conflicts,
            self.core_after.refused,
            self.verify_counts.map_or(0, |c| c.0),
            self.verify_counts.map_or(0, |c| c.1),
            self.total.acked_records,
            code(self.exit),
            code(self.verify),
            per_s(e.acked_batches),
            mb_s(e.acked_bytes),
            div(w.batches_stored, w.group_commits),
            self.disk_ratio(),
            w.steal_seconds,
        );
        out
    }
}

/// stime / (utime + stime) between two `(utime, stime)` readings.
fn system_share(a: (u64, u64), b: (u64, u64)) -> f64 {
    let (user, system) = (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1));
    system as f64 / (user + system).max(1) as f64
}

fn div(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

/// An exit status as its code, or as the signal that ended it.
pub fn code(s: ExitStatus) -> String {
    s.code().map_or_else(|| s.to_string(), |c| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn report() -> Report {
        let edges = EdgeTotals {
            sent_batches: 1000,
            sent_bytes: 16_000_000,
            acked_batches: 1000,
            acked_bytes: 16_000_000,
            acked_raw_bytes: 64_000_000,
            acked_payload_bytes: 52_000_000,
            acked_records: 200_000,
        };
        Report {
            edges: 10,
            batch_bytes: 65_536,
            window_bytes: 1 << 20,
            partitions: 4,
            mtu: shared::quic::Mtu::DEFAULT,
            quic_packets: (1000, 3),
            path_mtu: Some((1452, 1452)),
            pool_ratio: 4.0,
            window: Window {
                seconds: 2.0,
                edges,
                batches_stored: 1000,
                stored_bytes: 16_000_000,
                group_commits: 100,
                core_cpu_seconds: 0.016,
                loadgen_cpu_seconds: 0.5,
                machine_cpu_seconds: 0.6,
                steal_seconds: 0.05,
                core_udp_drops: 0,
                udp_in: 5000,
                udp_rcvbuf_errors: 0,
                core_system_share: 0.5,
                loadgen_system_share: 0.6,
            },
            latency: Latency { count: 1000, p50: 0.010, p99: 0.020, max: 0.030 },
            per_edge_batches: (90, 110),
            total: edges,
            core_after: CoreMetrics { batches_stored: 1000, ..CoreMetrics::default() },
            exit: ExitStatus::from_raw(0),
            verify: ExitStatus::from_raw(0),
            verify_counts: Some((1000, 200_000)),
            verify_output: String::new(),
            peer: DiskPeerFigures {
                batches: 1000,
                bytes: 16_000_000,
                syncs: 100,
                batches_per_sync: 10,
                seconds: 1.0,
                cpu_seconds: 0.1,
            },
            quinn_peer: Some(QuinnPeerFigures {
                seconds: 2.0,
                bytes: 40_000_000,
                cpu_seconds: 0.02,
                loadgen_cpu_seconds: 1.0,
                machine_cpu_seconds: 1.5,
                udp_drops: 0,
                path_mtu: Some((1452, 1452)),
                quic_packets: (30_000, 0),
                paced_mb_per_second: None,
                exit: Some(ExitStatus::from_raw(0)),
                errors: Vec::new(),
            }),
            edge_errors: Vec::new(),
        }
    }

    #[test]
    fn rates_cpu_per_gb_and_the_result_line() {
        let r = report();
        assert!(r.failures().is_empty(), "{:?}", r.failures());
        assert_eq!(r.window.wire_mb_per_second(), 8.0);
        assert!((r.window.core_cpu_seconds_per_gb() - 1.0).abs() < 1e-9);
        assert!((r.disk_ratio() - 0.5).abs() < 1e-9);
        let text = r.render();
        assert!(text.contains("target ≤ 1.3: met"), "{text}");
        assert!(text.contains("| batches/s acked durable | 500 |"), "{text}");
        assert!(text.contains("| rounds/s; batches per round | 50; 10.0 |"), "{text}");
        assert!(text.contains("| CPU s stolen by the hypervisor (steal; within the above) | 0.05 |"), "{text}");
        assert!(text.contains(" steal_s=0.05 "), "{text}");
        assert!(
            text.contains("RESULT edges=10 sent=1000 acked=1000 stored=1000 duplicates=0 conflicts=0 refused=0"),
            "{text}"
        );
        // The quinn peer: 0.02 CPU s for 0.04 GB is 0.5 per GB; the core's 1.0 is twice that.
        assert!(text.contains("| quinn peer: CPU s (core-seconds per GB) | 0.02 (0.500) |"), "{text}");
        assert!(text.contains("| core CPU per GB / quinn peer CPU per GB | 2.000 |"), "{text}");
        assert!(text.contains("MB/s over QUIC | 20.0 in 2.000 s (unpaced) |"), "{text}");
        assert!(text.contains("| quinn peer: CPU s, other processes (machine busy − the above) | 0.48 |"), "{text}");
        assert!(
            text.contains(" quinn_peer_mb_per_s=20.00 quinn_peer_cpu_s_per_gb=0.5000 core_to_quinn_cpu_ratio=2.0000\n"),
            "{text}"
        );
    }

    #[test]
    fn without_the_quinn_peer_its_rows_and_fields_are_left_out() {
        let mut r = report();
        r.quinn_peer = None;
        assert!(r.failures().is_empty(), "{:?}", r.failures());
        assert_eq!(r.core_to_quinn_cpu_ratio(), None);
        let text = r.render();
        assert!(!text.contains("quinn"), "{text}");
        assert!(text.contains("disk_ratio=0.5000 steal_s=0.05\n"), "{text}");
    }

    #[test]
    fn a_quinn_peer_that_failed_or_read_nothing_is_a_failure() {
        let mut r = report();
        let q = r.quinn_peer.as_mut().unwrap();
        q.bytes = 0;
        q.exit = Some(ExitStatus::from_raw(1 << 8));
        q.errors.push("loadgen-edge-0001: sending to the QUIC sink: boom".into());
        let f = r.failures();
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(f[0].starts_with("quinn peer edge: loadgen-edge-0001"), "{f:?}");
        assert!(f[1].contains("quic-sink) exited with exit status: 1"), "{f:?}");
        assert!(f[2].contains("read no byte"), "{f:?}");
    }

    #[test]
    fn failures_name_what_went_wrong() {
        let mut r = report();
        r.core_after.duplicates = 2;
        r.core_after.batches_stored = 999;
        r.exit = ExitStatus::from_raw(9);
        let f = r.failures();
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(f[0].contains("stored by the core 999") && f[1].contains("2 duplicates") && f[2].contains("SIGTERM"));
    }

    #[test]
    fn latency_quantiles_by_nearest_rank() {
        let mut d: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        let l = Latency::of(&mut d);
        assert_eq!((l.count, l.p50, l.p99, l.max), (100, 0.050, 0.099, 0.100));
        assert_eq!(Latency::of(&mut []), Latency::default());
    }
}
