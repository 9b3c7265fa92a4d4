//! The forwarder: one QUIC connection to the core node rendezvous hashing picks, failing over
//! to the next on loss and back to the primary after a hold-down. On each connection: HELLO with
//! what each log holds, WELCOME with what the core holds, then the session decides what to
//! send. Each (stream, lane) has its own QUIC stream and its own writer task, so a slow stream
//! never blocks another; the live lane of a stream has its priority, the backlog lane one less.
//! Acks arrive on each data stream; released data goes under `release_on = "durable"`. TIERED
//! frames arrive on the control stream; under `release_on = "tiered"` data goes once the core
//! says it is in the bucket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use quinn::{Connection, Endpoint};
use rand::Rng;
use shared::batch::{Batch, BatchLimits, BatchMeta, GapReason, encode_gap};
use shared::ids::{Epoch, Offset, Seq};
use shared::log::LogError;
use shared::quic::{Congestion, read_frame, write_frame};
use shared::wire::frame::marks;
use shared::wire::session::{Delivery, ForwardSession, StreamSend, VERSION};
use shared::wire::{ErrorCode, Frame, FrameParts, Lane};
use tokio::sync::{Mutex as AsyncMutex, Notify, mpsc, watch};

use super::bucket::TokenBucket;
use super::cursors::{Cursor, Cursors};
use super::pick;
use crate::config::{CongestionConfig, DeliveryConfig, ForwardConfig, ReleaseOn, split_host_port};
use crate::writer::{SharedLog, lock};

/// Frames a data stream's writer task may have queued.
const STREAM_QUEUE_LEN: usize = 64;
/// How often log ends are looked at when no commit was signalled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How often cursors are written to SQLite.
const CURSOR_INTERVAL: Duration = Duration::from_secs(1);
/// How long shutdown waits for the acks of batches in flight.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);
/// Most QUIC streams towards a core: a control stream and two lanes per log stream.
const STREAMS_MAX: u32 = 256;

/// One forwarded stream.
#[derive(Debug, Clone)]
pub struct ForwardStream {
    /// Name.
    pub name: String,
    /// Its log, shared with the writer.
    pub log: SharedLog,
    /// Live-first or oldest-first.
    pub delivery: DeliveryConfig,
    /// Priority (higher first).
    pub priority: i32,
    /// When data may go.
    pub release_on: ReleaseOn,
}

/// Counters of the forwarder, rendered beside the agent's.
#[derive(Debug, Default)]
pub struct ForwardMetrics {
    connected: AtomicU64,
    connects: AtomicU64,
    failovers: AtomicU64,
    batches_sent: AtomicU64,
    bytes_sent: AtomicU64,
    batches_acked: AtomicU64,
    gaps_synthesized: AtomicU64,
    tls_reloads: AtomicU64,
    tls_reload_failures: AtomicU64,
    /// notAfter (Unix seconds) of the client certificate and of the CA; 0 until loaded.
    cert_expiry: [AtomicI64; 2],
    /// Per forwarded stream, the seq below which a core acknowledged everything (this epoch).
    acked_offset: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl ForwardMetrics {
    /// Records that a core acknowledged `stream` below `offset`.
    pub fn set_acked_offset(&self, stream: &str, offset: u64) {
        let mut acked = self.acked_offset.lock().unwrap_or_else(|e| e.into_inner());
        match acked.get_mut(stream) {
            Some(v) => *v = offset,
            None => {
                acked.insert(stream.to_owned(), offset);
            }
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let families = [
            ("backhaul_edge_forward_connected", "gauge", "1 while connected to a core node.", &self.connected),
            (
                "backhaul_edge_forward_connects_total",
                "counter",
                "Connections established to core nodes.",
                &self.connects,
            ),
            ("backhaul_edge_forward_failovers_total", "counter", "Moves to another core node.", &self.failovers),
            (
                "backhaul_edge_forward_batches_sent_total",
                "counter",
                "Batches sent (again after a reconnect too).",
                &self.batches_sent,
            ),
            ("backhaul_edge_forward_sent_bytes_total", "counter", "Bytes of batches sent.", &self.bytes_sent),
            (
                "backhaul_edge_forward_batches_acked_total",
                "counter",
                "Batches the core acknowledged as durable.",
                &self.batches_acked,
            ),
            (
                "backhaul_edge_forward_gaps_synthesized_total",
                "counter",
                "Gap batches made for seqs missing from the log (torn writes).",
                &self.gaps_synthesized,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in families {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n", v.load(Relaxed)));
        }
        let name = "backhaul_edge_forward_acked_offset";
        out.push_str(&format!(
            "# HELP {name} Seq below which a core acknowledged the stream durable; \
             backhaul_edge_log_committed_offset minus this is the backlog in records.\n# TYPE {name} gauge\n"
        ));
        for (stream, offset) in self.acked_offset.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            out.push_str(&format!("{name}{{stream=\"{stream}\"}} {offset}\n"));
        }
        let name = "backhaul_edge_tls_cert_expiry_timestamp_seconds";
        out.push_str(&format!(
            "# HELP {name} When the certificate in use expires (Unix time; earliest of its file), by certificate.\n\
             # TYPE {name} gauge\n"
        ));
        for (i, label) in ["client", "ca"].iter().enumerate() {
            let t = self.cert_expiry[i].load(Relaxed);
            if t != 0 {
                out.push_str(&format!("{name}{{cert=\"{label}\"}} {t}\n"));
            }
        }
        let name = "backhaul_edge_tls_reloads_total";
        out.push_str(&format!(
            "# HELP {name} Certificate reloads (SIGHUP or file change), by result; failed ones keep the old certificates.\n\
             # TYPE {name} counter\n{name}{{result=\"ok\"}} {}\n{name}{{result=\"failed\"}} {}\n",
            self.tls_reloads.load(Relaxed),
            self.tls_reload_failures.load(Relaxed)
        ));
        out
    }
}

/// What the forwarder task needs.
#[derive(Debug)]
pub struct ForwardParams {
    /// The `[forward]` config.
    pub config: ForwardConfig,
    /// This edge.
    pub edge_id: String,
    /// Its producer epoch.
    pub epoch: Epoch,
    /// Forwarded streams.
    pub streams: Vec<ForwardStream>,
    /// Signalled by the writer when a log's committed offset moves.
    pub committed: Arc<Notify>,
    /// Counters.
    pub metrics: Arc<ForwardMetrics>,
    /// The cursor database.
    pub cursors: Cursors,
    /// Becomes true at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Changes when the certificates are to be reloaded (SIGHUP, or their files changed).
    pub reload: watch::Receiver<u64>,
}

/// Why a connection ended.
enum Ended {
    Shutdown,
    Lost(String),
    HoldDownOver,
}

/// Runs the forwarder until shutdown.
pub async fn drive_forwarder(mut p: ForwardParams) -> anyhow::Result<()> {
    let endpoint = shared::quic::client_endpoint(SocketAddr::from(([0, 0, 0, 0], 0)), p.config.mtu())?;
    // The config each new connection uses; a certificate reload swaps it.
    let client = Arc::new(std::sync::Mutex::new(quic_client_config(&p.config, &p.edge_id, &p.metrics)?));
    let reloader = tokio::spawn(drive_cert_reloads(
        client.clone(),
        p.config.clone(),
        p.edge_id.clone(),
        p.metrics.clone(),
        p.reload.clone(),
    ));
    let order = pick::preference(&p.edge_id, &p.config.cores);
    release_from_cursors(&p);
    let mut at = 0usize; // index into `order`
    let mut attempt = 0u32;
    loop {
        if *p.shutdown.borrow() {
            break;
        }
        let node = p.config.cores[order[at]].clone();
        let hold_down = (at != 0).then(|| p.config.failover_hold_down.duration());
        let current = client.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match connect(&endpoint, current, &node, &p.config).await {
            Ok(conn) => {
                attempt = 0;
                p.metrics.connects.fetch_add(1, Relaxed);
                p.metrics.connected.store(1, Relaxed);
                tracing::info!(core = %node, "connected to core");
                let ended = run_connection(&conn, &mut p, hold_down).await;
                p.metrics.connected.store(0, Relaxed);
                match ended {
                    Ended::Shutdown => {
                        conn.close(quinn::VarInt::from(ErrorCode::NoError as u16), b"edge shutting down");
                        break;
                    }
                    Ended::HoldDownOver => {
                        tracing::info!(core = %node, "hold-down over: back to the primary core");
                        conn.close(quinn::VarInt::from(ErrorCode::NoError as u16), b"returning to primary");
                        at = 0;
                        continue;
                    }
                    // A lost connection: try the same node again first.
                    Ended::Lost(why) => tracing::warn!(core = %node, reason = %why, "connection to core lost"),
                }
            }
            Err(e) => {
                tracing::warn!(core = %node, error = %e, "cannot connect to core");
                if order.len() > 1 {
                    at = (at + 1) % order.len();
                    p.metrics.failovers.fetch_add(1, Relaxed);
                    tracing::warn!(next = %p.config.cores[order[at]], "failing over to the next core");
                }
            }
        }
        let delay = backoff(attempt, &p.config);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = p.shutdown.changed() => break,
        }
    }
    reloader.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}

/// Certificate rotation: on each change of `reload`, reads the files again and makes them the
/// config of the next connection, which then presents the new certificate; the open one keeps
/// its session (no reconnect). A set that does not load is refused and the old one kept.
async fn drive_cert_reloads(
    client: Arc<std::sync::Mutex<quinn::ClientConfig>>,
    config: ForwardConfig,
    edge_id: String,
    metrics: Arc<ForwardMetrics>,
    mut reload: watch::Receiver<u64>,
) {
    while reload.changed().await.is_ok() {
        match quic_client_config(&config, &edge_id, &metrics) {
            Ok(config) => {
                *client.lock().unwrap_or_else(|e| e.into_inner()) = config;
                metrics.tls_reloads.fetch_add(1, Relaxed);
                tracing::info!("certificates reloaded: the next connection to a core uses them");
            }
            Err(error) => {
                metrics.tls_reload_failures.fetch_add(1, Relaxed);
                tracing::error!(error = %format!("{error:#}"), "certificate reload failed: still using the previous certificates");
            }
        }
    }
}

/// The QUIC client config from the certificate files (read now); refuses a certificate that
/// names another edge; records when the certificates expire.
fn quic_client_config(
    c: &ForwardConfig,
    edge_id: &str,
    metrics: &ForwardMetrics,
) -> anyhow::Result<quinn::ClientConfig> {
    let files = shared::tls::CertFiles {
        ca_file: c.ca_file.clone(),
        cert_file: c.cert_file.clone(),
        key_file: c.key_file.clone(),
    };
    let named = shared::tls::cert_pem_edge_id(&files.cert_pem()?)?;
    if named != edge_id {
        anyhow::bail!("{}: the certificate is for edge {named:?}, not {edge_id:?}", c.cert_file.display());
    }
    let (tls, expiry) = files.client_config(&[shared::tls::ALPN_V1])?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    let congestion = match c.congestion {
        CongestionConfig::Cubic => Congestion::Cubic,
        CongestionConfig::Bbr => Congestion::Bbr,
    };
    client.transport_config(shared::quic::transport(
        c.keep_alive.duration(),
        c.idle_timeout.duration(),
        congestion,
        STREAMS_MAX,
        c.mtu(),
    ));
    metrics.cert_expiry[0].store(expiry.cert_not_after, Relaxed);
    metrics.cert_expiry[1].store(expiry.ca_not_after, Relaxed);
    Ok(client)
}

async fn connect(
    endpoint: &Endpoint,
    client: quinn::ClientConfig,
    node: &str,
    c: &ForwardConfig,
) -> anyhow::Result<Connection> {
    let (host, port) = split_host_port(node).map_err(anyhow::Error::msg)?;
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{node}: no address"))?;
    let name = c.server_name.clone().unwrap_or(host);
    let connecting = endpoint.connect_with(client, addr, &name)?;
    Ok(tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| anyhow::anyhow!("handshake timed out"))??)
}

fn backoff(attempt: u32, c: &ForwardConfig) -> Duration {
    let base = c.reconnect_min.0.saturating_mul(1u64 << attempt.min(20)).min(c.reconnect_max.0);
    Duration::from_millis((base as f64 * rand::thread_rng().gen_range(0.5..1.5)) as u64)
}

/// At start, release what the cursors say a core acknowledged (same epoch only).
fn release_from_cursors(p: &ForwardParams) {
    for s in &p.streams {
        let acked = match p.cursors.get(&s.name) {
            Ok(Some(c)) if c.epoch == p.epoch.0 => c.acked_through,
            _ => 0,
        };
        p.metrics.set_acked_offset(&s.name, acked);
    }
    for s in p.streams.iter().filter(|s| s.release_on == ReleaseOn::Durable) {
        if let Ok(Some(c)) = p.cursors.get(&s.name)
            && c.epoch == p.epoch.0
        {
            let mut log = lock(&s.log);
            log.release_below(Offset(c.acked_through));
            if let Err(e) = log.apply_retention(now_ms()) {
                tracing::warn!(stream = %s.name, error = %e, "releasing forwarded data failed");
            }
        }
    }
}

fn save_cursors(p: &ForwardParams, through: &HashMap<usize, u64>) {
    for (&i, &t) in through {
        let c = Cursor { epoch: p.epoch.0, acked_through: t, updated_ms: now_ms() };
        if let Err(e) = p.cursors.set(&p.streams[i].name, &c) {
            tracing::warn!(stream = %p.streams[i].name, error = %e, "saving the forwarding cursor failed");
        }
    }
}

enum Event {
    Ack(usize, Range<u64>),
    StreamFailed(usize, String),
    /// The core's TIERED frame: these seqs of stream `.0` are in the bucket.
    Tiered(usize, shared::ranges::RangeSet),
}

/// Aborts a task when dropped (the connection's control-stream reader ends with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads the control stream after the WELCOME: TIERED frames become [`Event::Tiered`].
async fn read_control(
    mut recv: quinn::RecvStream,
    mut buf: FrameParts,
    names: Vec<String>,
    tx: mpsc::UnboundedSender<Event>,
) {
    while let Ok(Some(frame)) = read_frame(&mut recv, &mut buf).await {
        if let Frame::Tiered { stream, ranges } = frame
            && let Some(i) = names.iter().position(|n| *n == stream)
            && tx.send(Event::Tiered(i, ranges)).is_err()
        {
            return;
        }
    }
}

async fn run_connection(conn: &Connection, p: &mut ForwardParams, hold_down: Option<Duration>) -> Ended {
    let started = Instant::now();
    let mut session = {
        let sends = p
            .streams
            .iter()
            .map(|s| {
                let log = lock(&s.log);
                let delivery = match s.delivery {
                    DeliveryConfig::LiveFirst => Delivery::LiveFirst,
                    DeliveryConfig::OldestFirst => Delivery::OldestFirst,
                };
                StreamSend::new(&s.name, delivery, log.start_offset().0, log.committed_offset().0)
            })
            .collect();
        ForwardSession::new(sends, p.config.window_bytes.0)
    };
    let (mut ctl_send, mut ctl_recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return Ended::Lost(e.to_string()),
    };
    let hello =
        Frame::Hello { version: VERSION, epoch: p.epoch.0, edge_id: p.edge_id.clone(), streams: session.offers() };
    if let Err(r) = write_frame(&mut ctl_send, &hello).await {
        return Ended::Lost(r.message);
    }
    let mut buf = FrameParts::default();
    match read_frame(&mut ctl_recv, &mut buf).await {
        Ok(Some(Frame::Welcome { node, streams, .. })) => {
            tracing::info!(%node, "welcomed");
            session.handle_welcome(&streams);
        }
        Ok(Some(Frame::Error { code, message })) => return Ended::Lost(format!("core refused: {code:?}: {message}")),
        Ok(other) => return Ended::Lost(format!("expected a welcome, got {other:?}")),
        Err(r) => return Ended::Lost(r.message),
    }
    let bucket = p.config.bandwidth_bytes_per_s.map(|b| Arc::new(AsyncMutex::new(TokenBucket::new(b.0, 0))));
    let clock = Instant::now();
    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<Event>();
    let names = p.streams.iter().map(|s| s.name.clone()).collect();
    let _control = AbortOnDrop(tokio::spawn(read_control(ctl_recv, buf, names, event_tx.clone())));
    let mut lanes: HashMap<(usize, Lane), mpsc::Sender<Bytes>> = HashMap::new();
    let mut through: HashMap<usize, u64> = HashMap::new();
    let mut last_cursor_save = Instant::now();
    let mut shutdown = p.shutdown.clone();
    // At shutdown: stop sending, wait a moment for the acks of what is in flight (so the next
    // start need not resend it), then close.
    let mut drain_until: Option<Instant> = None;
    loop {
        // What the logs hold now.
        for (i, s) in p.streams.iter().enumerate() {
            let log = lock(&s.log);
            let st = session.stream_mut(i);
            st.handle_log_end(log.committed_offset().0);
            st.handle_released(log.start_offset().0);
        }
        // Send what the session asks for, as long as each lane's queue has room.
        while drain_until.is_none()
            && let Some(t) = session.poll_transmit()
        {
            let full = lanes.get(&(t.stream, t.lane)).is_some_and(|tx| tx.capacity() == 0);
            if full {
                break;
            }
            let (frame, range) = match next_batch(
                &p.streams[t.stream],
                t.seq..t.missing_end,
                &p.edge_id,
                p.epoch,
                &p.metrics,
            ) {
                Ok(Some(fr)) => fr,
                Ok(None) => break,
                Err(NextBatch::Released(start)) => {
                    session.stream_mut(t.stream).handle_released(start);
                    continue;
                }
                Err(NextBatch::Failed(e)) => {
                    tracing::error!(stream = %p.streams[t.stream].name, error = %e, "reading the log for forwarding failed");
                    break;
                }
            };
            let tx = match lanes.get(&(t.stream, t.lane)) {
                Some(tx) => tx.clone(),
                None => match open_lane(
                    conn,
                    &p.streams[t.stream],
                    t.stream,
                    t.lane,
                    event_tx.clone(),
                    bucket.clone(),
                    clock,
                )
                .await
                {
                    Ok(tx) => {
                        lanes.insert((t.stream, t.lane), tx.clone());
                        tx
                    }
                    Err(e) => return Ended::Lost(e),
                },
            };
            let len = frame.len() as u64;
            if tx.try_send(frame).is_err() {
                break;
            }
            p.metrics.batches_sent.fetch_add(1, Relaxed);
            p.metrics.bytes_sent.fetch_add(len, Relaxed);
            session.handle_sent(t.stream, range, len);
        }
        if last_cursor_save.elapsed() >= CURSOR_INTERVAL && !through.is_empty() {
            save_cursors(p, &through);
            through.clear();
            last_cursor_save = Instant::now();
        }
        if hold_down.is_some_and(|h| started.elapsed() >= h) {
            save_cursors(p, &through);
            return Ended::HoldDownOver;
        }
        if drain_until.is_some_and(|until| session.inflight_bytes() == 0 || Instant::now() >= until) {
            save_cursors(p, &through);
            return Ended::Shutdown;
        }
        let event = tokio::select! {
            e = event_rx.recv() => e,
            _ = p.committed.notified() => None,
            _ = tokio::time::sleep(POLL_INTERVAL) => None,
            e = conn.closed() => {
                save_cursors(p, &through);
                return Ended::Lost(e.to_string());
            }
            _ = shutdown.changed(), if drain_until.is_none() => {
                drain_until = Some(Instant::now() + SHUTDOWN_DRAIN);
                None
            }
        };
        let mut next = event;
        while let Some(e) = next.take() {
            match e {
                Event::Ack(i, range) => {
                    session.handle_ack(i, range);
                    p.metrics.batches_acked.fetch_add(1, Relaxed);
                    let t = session.stream(i).acked_through();
                    through.insert(i, t);
                    p.metrics.set_acked_offset(&p.streams[i].name, t);
                    if p.streams[i].release_on == ReleaseOn::Durable {
                        let mut log = lock(&p.streams[i].log);
                        log.release_below(Offset(t));
                        if let Err(e) = log.apply_retention(now_ms()) {
                            tracing::warn!(stream = %p.streams[i].name, error = %e, "releasing forwarded data failed");
                        }
                    }
                }
                Event::Tiered(i, ranges) => {
                    // `release_on = "tiered"`: two copies until the bucket holds the data.
                    if p.streams[i].release_on == ReleaseOn::Tiered {
                        let mut log = lock(&p.streams[i].log);
                        let through = ranges.contiguous_end(log.start_offset().0);
                        log.release_below(Offset(through));
                        if let Err(e) = log.apply_retention(now_ms()) {
                            tracing::warn!(stream = %p.streams[i].name, error = %e, "releasing tiered data failed");
                        }
                    }
                }
                Event::StreamFailed(i, why) => {
                    save_cursors(p, &through);
                    return Ended::Lost(format!("stream {}: {why}", p.streams[i].name));
                }
            }
            next = event_rx.try_recv().ok();
        }
    }
}

enum NextBatch {
    Released(u64),
    Failed(String),
}

/// The frame to send for the missing range `want` and the seqs it covers: the log's batch at
/// `want.start`, or a gap batch where the log has none there — a hole left by a torn write, or
/// the part of a gap batch (from `drop_oldest`) the core does not hold yet. A gap never covers
/// more than `want`, so it never overlaps what the core holds.
fn next_batch(
    s: &ForwardStream,
    want: Range<u64>,
    edge_id: &str,
    epoch: Epoch,
    metrics: &ForwardMetrics,
) -> Result<Option<(Bytes, Range<u64>)>, NextBatch> {
    let seq = want.start;
    let read = {
        let mut log = lock(&s.log);
        match log.read(Offset(seq), 1) {
            Ok(r) => r,
            Err(LogError::OffsetOutOfRange { start, .. }) if Offset(seq) < start => {
                return Err(NextBatch::Released(start.0));
            }
            Err(e) => return Err(NextBatch::Failed(e.to_string())),
        }
    };
    let Some(b) = read.batches.into_iter().next() else { return Ok(None) };
    let h = b.batch.header();
    let gap_end = if b.offset.0 > seq {
        metrics.gaps_synthesized.fetch_add(1, Relaxed);
        tracing::warn!(stream = %s.name, from_seq = seq, to_seq = b.offset.0, "seqs missing from the log: sending a gap");
        Some((b.offset.0.min(want.end), GapReason::Corruption))
    } else if h.is_gap() && (b.offset.0 < seq || b.end().0 > want.end) {
        Some((b.end().0.min(want.end), h.gap_reason().unwrap_or(GapReason::Other(0))))
    } else {
        None
    };
    let (batch, range) = match gap_end {
        Some((end, reason)) => {
            let meta = BatchMeta {
                producer: edge_id.into(),
                epoch,
                stream: s.name.clone(),
                base_seq: Seq(seq),
                payload_format: h.payload_format,
            };
            let mut out = BytesMut::new();
            let count = u32::try_from(end - seq).map_err(|_| NextBatch::Failed("gap too large".into()))?;
            encode_gap(&meta, count, reason, (h.min_ts_ms, h.max_ts_ms), &mut out)
                .map_err(|e| NextBatch::Failed(e.to_string()))?;
            let gap = Batch::from_bytes(out.freeze(), &BatchLimits::default())
                .map_err(|e| NextBatch::Failed(e.to_string()))?;
            (gap, seq..end)
        }
        None => {
            let range = b.offset.0..b.end().0;
            (b.batch, range)
        }
    };
    let mut out = BytesMut::new();
    Frame::Batch(batch.bytes().clone()).encode(&mut out);
    Ok(Some((out.freeze(), range)))
}

/// Opens the QUIC stream of (stream, lane): OPEN, then a writer task for its frames and a
/// reader task for its acks.
async fn open_lane(
    conn: &Connection,
    s: &ForwardStream,
    i: usize,
    lane: Lane,
    events: mpsc::UnboundedSender<Event>,
    bucket: Option<Arc<AsyncMutex<TokenBucket>>>,
    clock: Instant,
) -> Result<mpsc::Sender<Bytes>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let priority = match lane {
        Lane::Live => s.priority.saturating_mul(2),
        Lane::Backlog => s.priority.saturating_mul(2).saturating_sub(1),
    };
    let _ = send.set_priority(priority);
    write_frame(&mut send, &Frame::Open { stream: s.name.clone(), lane }).await.map_err(|r| r.message)?;
    let (tx, mut rx) = mpsc::channel::<Bytes>(STREAM_QUEUE_LEN);
    let failed = events.clone();
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if let Some(b) = &bucket {
                let wait = b.lock().await.take(frame.len() as u64, clock.elapsed().as_micros() as u64);
                if wait > 0 {
                    tokio::time::sleep(Duration::from_micros(wait)).await;
                }
            }
            if let Err(e) = send.write_all(&frame).await {
                let _ = failed.send(Event::StreamFailed(i, e.to_string()));
                break;
            }
        }
        let _ = send.finish();
    });
    tokio::spawn(async move {
        let mut buf = FrameParts::default();
        loop {
            match read_frame(&mut recv, &mut buf).await {
                Ok(Some(Frame::Ack { start, end, marks: m })) if m & marks::DURABLE != 0 => {
                    if events.send(Event::Ack(i, start..end)).is_err() {
                        break;
                    }
                }
                Ok(Some(Frame::Ack { .. })) => {}
                Ok(Some(Frame::Error { code, message })) => {
                    let _ = events.send(Event::StreamFailed(i, format!("core closed the stream: {code:?}: {message}")));
                    break;
                }
                Ok(Some(other)) => {
                    let _ = events.send(Event::StreamFailed(i, format!("unexpected frame {other:?}")));
                    break;
                }
                Ok(None) => break,
                Err(r) => {
                    let _ = events.send(Event::StreamFailed(i, r.message));
                    break;
                }
            }
        }
    });
    Ok(tx)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::batch::{BatchEncoder, Compression, PayloadFormat, Record};
    use shared::log::sim::SimStorage;
    use shared::log::{Log, LogConfig};
    use std::path::Path;
    use std::sync::Mutex;

    fn meta(seq: u64) -> BatchMeta {
        BatchMeta {
            producer: "e".into(),
            epoch: Epoch(1),
            stream: "s".into(),
            base_seq: Seq(seq),
            payload_format: PayloadFormat::Raw,
        }
    }

    fn data(seq: u64, n: u32) -> Batch {
        let recs: Vec<Record> = (0..n)
            .map(|i| Record { ts_ms: i64::from(i), topic: "t".into(), payload: vec![7; 3000].into(), attrs: vec![] })
            .collect();
        let mut out = BytesMut::new();
        BatchEncoder::new(Compression::None).unwrap().encode(&meta(seq), &recs, &mut out).unwrap();
        Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap()
    }

    fn stream(log: Log) -> ForwardStream {
        ForwardStream {
            name: "s".into(),
            log: Arc::new(Mutex::new(log)),
            delivery: DeliveryConfig::LiveFirst,
            priority: 0,
            release_on: ReleaseOn::Durable,
        }
    }

    fn decode(frame: &Bytes) -> Batch {
        match Frame::decode(frame).unwrap().unwrap().0 {
            Frame::Batch(b) => Batch::from_bytes(b, &BatchLimits::default()).unwrap(),
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn a_gap_is_cut_to_what_the_core_lacks() {
        let cfg = LogConfig { segment_bytes_max: 16 << 10, ..LogConfig::default() };
        let mut log = Log::open(Arc::new(SimStorage::new()), Path::new("/d/s"), cfg, 0).unwrap();
        for seq in [0, 2, 4, 6] {
            log.append(&data(seq, 2), 0).unwrap();
        }
        log.sync().unwrap();
        let first = log.segments()[0].clone();
        assert_eq!((first.base.0, first.end.0), (0, 4));
        let mut out = BytesMut::new();
        encode_gap(&meta(0), 4, GapReason::DiskFullDropOldest, (0, 1), &mut out).unwrap();
        log.replace_segment_with_gap(first.base, &Batch::from_bytes(out.freeze(), &BatchLimits::default()).unwrap())
            .unwrap();
        let s = stream(log);
        let m = ForwardMetrics::default();
        // The core holds 0..2 (sent before the drop): only 2..4 of the gap may go.
        let (frame, range) = next_batch(&s, 2..8, "e", Epoch(1), &m).ok().unwrap().unwrap();
        assert_eq!(range, 2..4);
        let gap = decode(&frame);
        assert!(gap.header().is_gap());
        assert_eq!((gap.header().base_seq.0, gap.header().end_seq().0), (2, 4));
        assert_eq!(gap.header().gap_reason(), Some(GapReason::DiskFullDropOldest));
        // The whole gap when the core lacks all of it; data batches as they are.
        assert_eq!(next_batch(&s, 0..8, "e", Epoch(1), &m).ok().unwrap().unwrap().1, 0..4);
        let (frame, range) = next_batch(&s, 4..8, "e", Epoch(1), &m).ok().unwrap().unwrap();
        assert_eq!(range, 4..6);
        assert!(!decode(&frame).header().is_gap());
        assert!(next_batch(&s, 8..9, "e", Epoch(1), &m).ok().unwrap().is_none(), "nothing past the end");
    }
}
