//! `loadgen wan`: a UDP impairment proxy to put between an edge and its core (this machine has
//! no netem). Datagrams from a client to `--listen` go out to `--upstream` from a socket of that
//! client's own, and the upstream's answers come back the same way; each direction passes
//! through a [`model::Link`] that decides, from a seeded RNG, what is lost, delayed, reordered,
//! duplicated, held back by the bandwidth cap or dropped in an outage.
//!
//! The IO is thin: one task reads the listen socket, one per client session reads its upstream
//! socket, and one scheduler per direction sends each datagram at the time its link decided.
//! Bounds: [`ProxyLimits`] (sessions, idle timeout, datagrams waiting to be delivered).

pub mod model;
pub mod tcp;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use model::{Counts, Fate, Impairment, Link, Outage};

/// Largest UDP datagram the proxy carries.
const DATAGRAM_MAX: usize = 65_535;

/// `loadgen wan` options. Percentages are of datagrams; the delay is one way (RTT = 2 × delay
/// when both directions have it, which they do: the settings apply to each direction).
#[derive(Clone, Debug, Args)]
pub struct WanArgs {
    /// Address clients send to (the edge's `core` endpoint points here).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Where datagrams go (the core's QUIC listen address).
    #[arg(long)]
    pub upstream: SocketAddr,
    /// Datagrams lost at random, percent.
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// One-way delay, e.g. 25ms.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub delay: Duration,
    /// Uniform jitter around the delay.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub jitter: Duration,
    /// Datagrams held back so later ones overtake them, percent.
    #[arg(long, default_value_t = 0.0)]
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub reorder_hold: Duration,
    /// Datagrams delivered twice, percent.
    #[arg(long, default_value_t = 0.0)]
    pub duplicate: f64,
    /// Bandwidth cap per direction in bytes per second (e.g. 1MB, 512KiB); none by default.
    #[arg(long, value_parser = parse_bytes)]
    pub rate: Option<u64>,
    /// Bytes that may wait behind the bandwidth cap before datagrams are tail-dropped.
    #[arg(long, default_value = "1MiB", value_parser = parse_bytes)]
    pub queue_bytes: u64,
    /// An outage, LENGTH@START from the proxy's start (e.g. 600s@30s); repeat for more.
    #[arg(long = "outage", value_parser = Outage::parse)]
    pub outages: Vec<Outage>,
    /// Stop after this many seconds; 0 runs until Ctrl-C.
    #[arg(long, default_value_t = 0)]
    pub seconds: u64,
    /// Seed of the random choices (each direction derives its own).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Most client sessions at once; datagrams from further clients are dropped.
    #[arg(long, default_value_t = 4096)]
    pub sessions_max: usize,
    /// A session with no datagram either way for this long is closed.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Relay TCP instead of UDP (for TCP peers such as a Mosquitto bridge or a NATS leaf node):
    /// delay, rate and outages apply (open connections' bytes are held, new connections closed);
    /// loss, jitter, reorder and duplicate do not (TCP would retransmit).
    #[arg(long)]
    pub tcp: bool,
}

/// A duration as config files write it (`25ms`, `10s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    shared::units::Millis::parse(s).map(|m| m.duration())
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    shared::units::ByteSize::parse(s).map(|b| b.0)
}

impl WanArgs {
    /// The impairment of each direction.
    pub fn impairment(&self) -> anyhow::Result<Impairment> {
        let imp = Impairment {
            loss: self.loss / 100.0,
            delay: self.delay,
            jitter: self.jitter,
            reorder: self.reorder / 100.0,
            reorder_hold: self.reorder_hold,
            duplicate: self.duplicate / 100.0,
            duplicate_gap: Duration::from_micros(100),
            rate: self.rate,
            queue_bytes_max: self.queue_bytes,
            outages: self.outages.clone(),
        };
        imp.validate().map_err(|e| anyhow::anyhow!("--{}", e.replacen('_', "-", 1)))?;
        Ok(imp)
    }

    /// The proxy's bounds.
    pub fn limits(&self) -> ProxyLimits {
        ProxyLimits { sessions_max: self.sessions_max, idle_timeout: self.idle_timeout, ..ProxyLimits::default() }
    }
}

/// Bounds of the proxy.
#[derive(Clone, Copy, Debug)]
pub struct ProxyLimits {
    /// Most client sessions at once.
    pub sessions_max: usize,
    /// Idle sessions are closed after this.
    pub idle_timeout: Duration,
    /// Most datagrams waiting for their delivery time, per direction; more are dropped.
    pub pending_max: usize,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits { sessions_max: 4096, idle_timeout: Duration::from_secs(120), pending_max: 200_000 }
    }
}

/// Counters of both directions.
#[derive(Clone, Copy, Debug, Default)]
pub struct WanCounts {
    /// Client → upstream.
    pub up: Counts,
    /// Upstream → client.
    pub down: Counts,
    /// Datagrams dropped because too many were waiting (both directions).
    pub overflow: u64,
    /// Datagrams dropped because the session table was full.
    pub refused_sessions: u64,
    /// Sessions opened.
    pub sessions: u64,
}

struct Shared {
    up: Mutex<Link>,
    down: Mutex<Link>,
    extra: Mutex<WanCounts>,
}

impl Shared {
    fn counts(&self) -> WanCounts {
        let mut c = *self.extra.lock().unwrap_or_else(PoisonError::into_inner);
        c.up = self.up.lock().unwrap_or_else(PoisonError::into_inner).counts();
        c.down = self.down.lock().unwrap_or_else(PoisonError::into_inner).counts();
        c
    }

    fn count(&self, f: impl FnOnce(&mut WanCounts)) {
        f(&mut self.extra.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// A running proxy; dropping it stops it.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    started: Instant,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

impl Proxy {
    /// Binds `listen` and starts forwarding to `upstream`; both directions get `imp`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        imp: Impairment,
        seed: u64,
        limits: ProxyLimits,
    ) -> anyhow::Result<Proxy> {
        imp.validate().map_err(|e| anyhow::anyhow!(e))?;
        let sock = Arc::new(UdpSocket::bind(listen).await.with_context(|| format!("binding {listen}"))?);
        let addr = sock.local_addr()?;
        let shared = Arc::new(Shared {
            up: Mutex::new(Link::new(imp.clone(), seed)),
            down: Mutex::new(Link::new(imp, seed ^ 0x9e37_79b9_7f4a_7c15)),
            extra: Mutex::new(WanCounts::default()),
        });
        let start = Instant::now();
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(schedule(up_rx, shared.clone(), limits.pending_max)),
            tokio::spawn(schedule(down_rx, shared.clone(), limits.pending_max)),
            tokio::spawn(accept(sock, upstream, shared.clone(), start, limits, up_tx, down_tx)),
        ];
        Ok(Proxy { addr, started: start, shared, tasks })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// What happened so far.
    pub fn counts(&self) -> WanCounts {
        self.shared.counts()
    }

    /// Schedules an outage of both directions from `at` for `length`.
    pub fn add_outage(&self, at: std::time::Instant, length: Duration) {
        let o = Outage { start: at.saturating_duration_since(self.started.into_std()), length };
        self.shared.up.lock().unwrap_or_else(PoisonError::into_inner).add_outage(o);
        self.shared.down.lock().unwrap_or_else(PoisonError::into_inner).add_outage(o);
    }
}

/// A datagram waiting for its delivery time.
struct Pending {
    at: Instant,
    data: Bytes,
    via: Arc<UdpSocket>,
    /// `None`: the socket is connected (upstream side).
    to: Option<SocketAddr>,
}

/// Decides a datagram's fate on `link` and queues its copies.
fn offer(
    link: &Mutex<Link>,
    start: Instant,
    data: Bytes,
    via: &Arc<UdpSocket>,
    to: Option<SocketAddr>,
    tx: &mpsc::UnboundedSender<Pending>,
) {
    let fate = link.lock().unwrap_or_else(PoisonError::into_inner).offer(start.elapsed(), data.len());
    if let Fate::Deliver { at, again, .. } = fate {
        for at in std::iter::once(at).chain(again) {
            // A closed scheduler means the proxy is stopping.
            let _ = tx.send(Pending { at: start + at, data: data.clone(), via: via.clone(), to });
        }
    }
}

/// Sends each datagram at its time, earliest first (ties in arrival order).
async fn schedule(mut rx: mpsc::UnboundedReceiver<Pending>, shared: Arc<Shared>, pending_max: usize) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut waiting: HashMap<u64, Pending> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        let due = heap.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            p = rx.recv() => {
                let Some(p) = p else { return };
                if waiting.len() >= pending_max {
                    shared.count(|c| c.overflow += 1);
                    continue;
                }
                heap.push(Reverse((p.at, next_id)));
                waiting.insert(next_id, p);
                next_id += 1;
            }
            () = sleep_until(due) => {
                let now = Instant::now();
                while let Some(&Reverse((at, id))) = heap.peek() {
                    if at > now {
                        break;
                    }
                    heap.pop();
                    let Some(p) = waiting.remove(&id) else { continue };
                    let sent = match p.to {
                        Some(to) => p.via.try_send_to(&p.data, to),
                        None => p.via.try_send(&p.data),
                    };
                    // A full socket buffer drops the datagram, as a congested router would.
                    if let Err(e) = sent {
                        debug!(error = %e, "wan: send failed; datagram dropped");
                    }
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct Session {
    sock: Arc<UdpSocket>,
    reader: JoinHandle<()>,
    last: Arc<Mutex<Instant>>,
}

/// Reads the listen socket: opens a session per client, passes datagrams upstream.
async fn accept(
    sock: Arc<UdpSocket>,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    start: Instant,
    limits: ProxyLimits,
    up_tx: mpsc::UnboundedSender<Pending>,
    down_tx: mpsc::UnboundedSender<Pending>,
) {
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let mut buf = vec![0u8; DATAGRAM_MAX];
    let mut sweep = tokio::time::interval(limits.idle_timeout.max(Duration::from_secs(1)) / 4);
    loop {
        let (n, from) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors surface here on Linux; they end nothing.
                    debug!(error = %e, "wan: receive error on the listen socket");
                    continue;
                }
            },
            _ = sweep.tick() => {
                sessions.retain(|addr, s| {
                    let idle = s.last.lock().unwrap_or_else(PoisonError::into_inner).elapsed() >= limits.idle_timeout;
                    if idle {
                        debug!(client = %addr, "wan: idle session closed");
                        s.reader.abort();
                    }
                    !idle
                });
                continue;
            }
        };
        let data = Bytes::copy_from_slice(&buf[..n]);
        if !sessions.contains_key(&from) {
            if sessions.len() >= limits.sessions_max {
                shared.count(|c| c.refused_sessions += 1);
                continue;
            }
            match open_session(&sock, from, upstream, &shared, start, &down_tx).await {
                Ok(s) => {
                    shared.count(|c| c.sessions += 1);
                    sessions.insert(from, s);
                }
                Err(e) => {
                    warn!(client = %from, error = %e, "wan: cannot open an upstream socket");
                    continue;
                }
            }
        }
        let s = &sessions[&from];
        *s.last.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        offer(&shared.up, start, data, &s.sock, None, &up_tx);
    }
}

async fn open_session(
    listen: &Arc<UdpSocket>,
    client: SocketAddr,
    upstream: SocketAddr,
    shared: &Arc<Shared>,
    start: Instant,
    down_tx: &mpsc::UnboundedSender<Pending>,
) -> anyhow::Result<Session> {
    let bind: SocketAddr = if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
    let up = Arc::new(UdpSocket::bind(bind).await?);
    up.connect(upstream).await?;
    let last = Arc::new(Mutex::new(Instant::now()));
    let reader = tokio::spawn({
        let (up, listen, shared, down_tx, last) =
            (up.clone(), listen.clone(), shared.clone(), down_tx.clone(), last.clone());
        async move {
            let mut buf = vec![0u8; DATAGRAM_MAX];
            loop {
                let n = match up.recv(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        debug!(error = %e, "wan: receive error from upstream");
                        continue;
                    }
                };
                *last.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
                offer(&shared.down, start, Bytes::copy_from_slice(&buf[..n]), &listen, Some(client), &down_tx);
            }
        }
    });
    Ok(Session { sock: up, reader, last })
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The counters as one `RESULT key=value …` line.
pub fn result_line(c: &WanCounts) -> String {
    let dir = |name: &str, d: &Counts| {
        format!(
            "{name}_offered={} {name}_delivered={} {name}_lost={} {name}_outage={} {name}_queue={} {name}_reordered={} \
             {name}_duplicated={}",
            d.offered, d.delivered, d.lost, d.outage, d.queue, d.reordered, d.duplicated
        )
    };
    format!(
        "RESULT {} {} overflow={} sessions={} refused_sessions={}",
        dir("up", &c.up),
        dir("down", &c.down),
        c.overflow,
        c.sessions,
        c.refused_sessions
    )
}

/// `loadgen wan`: runs the proxy, prints a line a second while datagrams flow and the totals at
/// the end.
pub async fn run(args: WanArgs) -> anyhow::Result<Vec<String>> {
    if args.tcp {
        return run_tcp(args).await;
    }
    let imp = args.impairment()?;
    let proxy = Proxy::start(args.listen, args.upstream, imp, args.seed, args.limits()).await?;
    println!("wan: listening on {} → upstream {}", proxy.local_addr(), args.upstream);
    watch(args.seconds, || proxy.counts(), |t, c, last| {
        let in_outage = args.outages.iter().any(|o| o.covers(Duration::from_secs(t)));
        (c.up.offered != last.up.offered || c.down.offered != last.down.offered || in_outage).then(|| {
            format!(
                "wan {t:>5}s  up {:>7} dgram/s ({:>6.2} MB/s) lost {} outage {}  down {:>7} dgram/s lost {} outage {}{}",
                c.up.offered - last.up.offered,
                (c.up.offered_bytes - last.up.offered_bytes) as f64 / 1e6,
                c.up.lost - last.up.lost,
                c.up.outage - last.up.outage,
                c.down.offered - last.down.offered,
                c.down.lost - last.down.lost,
                c.down.outage - last.down.outage,
                if in_outage { "  [outage]" } else { "" },
            )
        })
    })
    .await;
    println!("{}", result_line(&proxy.counts()));
    Ok(Vec::new())
}

async fn run_tcp(args: WanArgs) -> anyhow::Result<Vec<String>> {
    for (name, set) in [
        ("loss", args.loss != 0.0),
        ("jitter", !args.jitter.is_zero()),
        ("reorder", args.reorder != 0.0),
        ("duplicate", args.duplicate != 0.0),
    ] {
        anyhow::ensure!(
            !set,
            "--{name} applies to UDP datagrams, not to --tcp (TCP retransmits): use --delay, --rate, --outage"
        );
    }
    let imp = tcp::TcpImpairment { delay: args.delay, rate: args.rate, outages: args.outages.clone() };
    let proxy = tcp::TcpProxy::start(args.listen, args.upstream, imp).await?;
    println!("wan: listening on {} → upstream {} (tcp)", proxy.local_addr(), args.upstream);
    watch(
        args.seconds,
        || proxy.counts(),
        |t, c, last| {
            (c.up_bytes != last.up_bytes || c.down_bytes != last.down_bytes).then(|| {
                format!(
                    "wan {t:>5}s  up {:>8.3} MB/s  down {:>8.3} MB/s  connections {}  chunks held {}",
                    (c.up_bytes - last.up_bytes) as f64 / 1e6,
                    (c.down_bytes - last.down_bytes) as f64 / 1e6,
                    c.connections,
                    c.held
                )
            })
        },
    )
    .await;
    let c = proxy.counts();
    println!(
        "RESULT connections={} up_bytes={} down_bytes={} held={}",
        c.connections, c.up_bytes, c.down_bytes, c.held
    );
    Ok(Vec::new())
}

/// Once a second until `seconds` have passed (0: until Ctrl-C), prints what `line` makes of the
/// counts now and a second ago (nothing when it returns `None`).
async fn watch<C>(seconds: u64, counts: impl Fn() -> C, line: impl Fn(u64, &C, &C) -> Option<String>) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = counts();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return,
        }
        let c = counts();
        let t = started.elapsed().as_secs();
        if let Some(l) = line(t, &c, &last) {
            eprintln!("{l}");
        }
        last = c;
        if seconds > 0 && t >= seconds {
            return;
        }
    }
}
