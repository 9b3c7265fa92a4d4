//! Simulated edges speaking the wire protocol to a core node (DESIGN §4): each one a QUIC
//! connection of its own (own UDP socket, own client certificate, CommonName = its id), HELLO →
//! WELCOME on the control stream, then one data stream (`OPEN cdr live`) carrying BATCH frames
//! within a window of unacknowledged bytes, counting the core's ACKs. Or, as a [`RawEdge`], the
//! same connection and the same BATCH frames on one stream to a bare quinn receiver
//! ([`crate::quic_sink`]), with no session, window or ACK.
//!
//! The batches are real: realistic CDR JSON from `shared::synth`, the attributes the agent adds
//! (MQTT client and packet id), encoded by `shared::batch` with zstd level 1, as the agent
//! writes them. Each edge encodes a small pool up front, so the generator's CPU goes to QUIC,
//! not to zstd, and sends the pool round and round. What must differ per send is the seq range:
//! every batch of an edge carries its producer and epoch, and `base_seq` follows on from the
//! previous batch's end. [`with_base_seq`] rewrites the two header fields that changes, in a
//! copy of the frame:
//!
//! ```text
//! frame  = u32 LE length | u8 type (4, BATCH) | batch
//! batch  = header (base_seq at byte 40, u64 LE; header_crc in its last 4 bytes) | body
//! ```
//!
//! The body and its CRC stay as encoded; the header CRC is computed again over the new header.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shared::batch::{Attr, BatchBuilder, BatchEncoder, BatchHeader, BatchMeta, Compression, PayloadFormat, attr};
use shared::ids::{Epoch, Seq};
use shared::quic::{Congestion, read_frame, write_frame};
use shared::wire::frame::{StreamOffer, marks};
use shared::wire::session::VERSION;
use shared::wire::{ErrorCode, Frame, FrameParts, Lane};
use shared::{synth, tls};
use tokio::sync::{Mutex, Semaphore, watch};

use crate::core_node::{EdgeCert, SERVER_NAME};

/// The stream the edges send.
pub const STREAM: &str = "cdr";
/// Bytes before the batch in a BATCH frame: length and type.
const FRAME_PREFIX_LEN: usize = 5;
/// Offset of `base_seq` in a batch header (`shared::batch` module doc).
const BASE_SEQ_OFFSET: usize = 40;
/// zstd level of the pool: what the agent ships for CDRs (DESIGN §9).
const ZSTD_LEVEL: i32 = 1;
/// Bound on the handshake, the WELCOME and the final drain of one edge.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// An edge that sees no ACK for this long while it waits for one has failed.
pub const ACK_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// One pre-encoded batch: its BATCH frame as sent with `base_seq` 0.
#[derive(Clone, Debug)]
pub struct PooledBatch {
    frame: Bytes,
    header_len: usize,
    /// Records in it.
    pub records: u32,
    /// Body bytes before compression (`raw_len`).
    pub raw_bytes: u64,
    /// CDR payload bytes in it (the JSON the devices sent).
    pub payload_bytes: u64,
}

impl PooledBatch {
    /// Bytes of the batch as stored and sent (header and compressed body).
    pub fn batch_bytes(&self) -> u64 {
        (self.frame.len() - FRAME_PREFIX_LEN) as u64
    }

    /// The batch alone, as it was encoded (`base_seq` 0).
    pub fn batch(&self) -> &[u8] {
        &self.frame[FRAME_PREFIX_LEN..]
    }
}

/// Encodes `count` batches of `edge`'s stream [`STREAM`], each holding CDRs until their raw
/// body would pass `batch_bytes`. Records `first_record..` of the generator (seeded with
/// `seed`), stamped with the wall clock now.
pub fn encode_pool(
    edge: &str,
    epoch: u64,
    count: usize,
    batch_bytes: usize,
    seed: u64,
    first_record: u64,
) -> anyhow::Result<Vec<PooledBatch>> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut encoder = BatchEncoder::new(Compression::Zstd { level: ZSTD_LEVEL })?;
    let meta = BatchMeta {
        producer: edge.to_owned(),
        epoch: Epoch(epoch),
        stream: STREAM.to_owned(),
        base_seq: Seq(0),
        payload_format: PayloadFormat::Json,
    };
    let client = format!("backhaul-{edge}-gateway");
    let now = now_ms();
    let mut i = first_record;
    let mut pool = Vec::with_capacity(count);
    let mut out = BytesMut::new();
    for _ in 0..count {
        let mut builder = BatchBuilder::new();
        let mut payload_bytes = 0u64;
        loop {
            let payload = synth::cdr_json(&mut rng, i);
            if !builder.is_empty() && builder.raw_len() + payload.len() > batch_bytes {
                break;
            }
            let attrs = [
                Attr { key: attr::MQTT_CLIENT.into(), value: client.clone() },
                Attr { key: attr::MQTT_PACKET_ID.into(), value: (i % 65_535 + 1).to_string() },
            ];
            builder.push(now + (i - first_record) as i64 / 64, &synth::cdr_topic(i), &payload, &attrs)?;
            payload_bytes += payload.len() as u64;
            i += 1;
        }
        out.clear();
        let header: BatchHeader = encoder.finish(&mut builder, &meta, &mut out)?;
        let mut frame = BytesMut::with_capacity(out.len() + FRAME_PREFIX_LEN);
        Frame::Batch(out.split().freeze()).encode(&mut frame);
        pool.push(PooledBatch {
            frame: frame.freeze(),
            header_len: usize::from(header.header_len),
            records: header.record_count,
            raw_bytes: u64::from(header.raw_len),
            payload_bytes,
        });
    }
    Ok(pool)
}

/// A copy of `b`'s frame with `base_seq` set and the header CRC computed again.
pub fn with_base_seq(b: &PooledBatch, base_seq: u64) -> Bytes {
    let mut f = BytesMut::from(&b.frame[..]);
    let header = &mut f[FRAME_PREFIX_LEN..FRAME_PREFIX_LEN + b.header_len];
    header[BASE_SEQ_OFFSET..BASE_SEQ_OFFSET + 8].copy_from_slice(&base_seq.to_le_bytes());
    let (covered, crc) = header.split_at_mut(b.header_len - 4);
    crc.copy_from_slice(&crc32c::crc32c(covered).to_le_bytes());
    f.freeze()
}

/// Totals over every edge, updated as frames leave and ACKs arrive.
#[derive(Debug, Default)]
pub struct EdgeCounters {
    /// BATCH frames written.
    pub sent_batches: AtomicU64,
    /// Batch bytes written.
    pub sent_bytes: AtomicU64,
    /// Batches acknowledged durable.
    pub acked_batches: AtomicU64,
    /// Their batch bytes (compressed, as on the wire).
    pub acked_bytes: AtomicU64,
    /// Their raw body bytes.
    pub acked_raw_bytes: AtomicU64,
    /// Their CDR payload bytes.
    pub acked_payload_bytes: AtomicU64,
    /// Their records.
    pub acked_records: AtomicU64,
    /// QUIC packets the edges sent, and of those quinn declared lost (whole run, at close).
    pub quic_packets: AtomicU64,
    /// See `quic_packets`.
    pub quic_lost: AtomicU64,
    /// The path MTU the edges' connections ended with: lowest, highest.
    pub path_mtu: std::sync::Mutex<Option<(u16, u16)>>,
}

/// A snapshot of [`EdgeCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeTotals {
    /// See [`EdgeCounters`].
    pub sent_batches: u64,
    /// See [`EdgeCounters`].
    pub sent_bytes: u64,
    /// See [`EdgeCounters`].
    pub acked_batches: u64,
    /// See [`EdgeCounters`].
    pub acked_bytes: u64,
    /// See [`EdgeCounters`].
    pub acked_raw_bytes: u64,
    /// See [`EdgeCounters`].
    pub acked_payload_bytes: u64,
    /// See [`EdgeCounters`].
    pub acked_records: u64,
}

impl EdgeCounters {
    /// Adds `conn`'s packets sent and lost to the totals, and its path MTU to the range seen.
    fn add_path_stats(&self, conn: &Connection) {
        let stats = conn.stats();
        self.quic_packets.fetch_add(stats.path.sent_packets, Relaxed);
        self.quic_lost.fetch_add(stats.path.lost_packets, Relaxed);
        let mtu = stats.path.current_mtu;
        let mut seen = self.path_mtu.lock().unwrap_or_else(|p| p.into_inner());
        *seen = Some(seen.map_or((mtu, mtu), |(lo, hi)| (lo.min(mtu), hi.max(mtu))));
    }

    /// The values now.
    pub fn totals(&self) -> EdgeTotals {
        EdgeTotals {
            sent_batches: self.sent_batches.load(Relaxed),
            sent_bytes: self.sent_bytes.load(Relaxed),
            acked_batches: self.acked_batches.load(Relaxed),
            acked_bytes: self.acked_bytes.load(Relaxed),
            acked_raw_bytes: self.acked_raw_bytes.load(Relaxed),
            acked_payload_bytes: self.acked_payload_bytes.load(Relaxed),
            acked_records: self.acked_records.load(Relaxed),
        }
    }
}

impl EdgeTotals {
    /// `self - before`, field by field.
    pub fn since(&self, before: &EdgeTotals) -> EdgeTotals {
        EdgeTotals {
            sent_batches: self.sent_batches - before.sent_batches,
            sent_bytes: self.sent_bytes - before.sent_bytes,
            acked_batches: self.acked_batches - before.acked_batches,
            acked_bytes: self.acked_bytes - before.acked_bytes,
            acked_raw_bytes: self.acked_raw_bytes - before.acked_raw_bytes,
            acked_payload_bytes: self.acked_payload_bytes - before.acked_payload_bytes,
            acked_records: self.acked_records - before.acked_records,
        }
    }
}

/// A connected edge whose session has begun (WELCOME received), with its data stream open.
#[derive(Debug)]
pub struct SimEdge {
    id: String,
    _endpoint: Endpoint,
    conn: Connection,
    /// The control stream stays open for the session's life.
    _control: (SendStream, RecvStream),
    data_send: SendStream,
    data_recv: RecvStream,
    pool: Vec<PooledBatch>,
}

impl SimEdge {
    /// Connects to `core` as `cert`, says HELLO for stream [`STREAM`] (nothing held yet, epoch
    /// `epoch`), waits for the WELCOME and opens the live data stream.
    pub async fn connect(
        core: SocketAddr,
        cert: &EdgeCert,
        epoch: u64,
        pool: Vec<PooledBatch>,
        mtu: shared::quic::Mtu,
    ) -> anyhow::Result<SimEdge> {
        let id = cert.id.clone();
        let (config, endpoint) = client(cert, mtu)?;
        let session = async {
            let conn = endpoint.connect_with(config, core, SERVER_NAME)?.await?;
            let (mut ctl_send, mut ctl_recv) = conn.open_bi().await?;
            let streams = vec![StreamOffer { name: STREAM.into(), first_retained: 0, next: 0 }];
            let hello = Frame::Hello { version: VERSION, epoch, edge_id: id.clone(), streams };
            write_frame(&mut ctl_send, &hello).await.map_err(|r| anyhow::anyhow!(r.message))?;
            let mut buf = FrameParts::default();
            match read_frame(&mut ctl_recv, &mut buf).await {
                Ok(Some(Frame::Welcome { streams, .. })) => {
                    if streams.iter().any(|s| s.name == STREAM && !s.held.is_empty()) {
                        bail!("the core already holds seqs of this new epoch: {streams:?}");
                    }
                }
                other => bail!("no WELCOME: {other:?}; connection: {:?}", conn.close_reason()),
            }
            let (mut data_send, data_recv) = conn.open_bi().await?;
            write_frame(&mut data_send, &Frame::Open { stream: STREAM.into(), lane: Lane::Live })
                .await
                .map_err(|r| anyhow::anyhow!(r.message))?;
            Ok::<_, anyhow::Error>((conn, (ctl_send, ctl_recv), data_send, data_recv))
        };
        let (conn, control, data_send, data_recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, session)
            .await
            .with_context(|| format!("{id}: no session within {HANDSHAKE_TIMEOUT:?}"))?
            .with_context(|| format!("{id}: opening the session"))?;
        Ok(SimEdge { id, _endpoint: endpoint, conn, _control: control, data_send, data_recv, pool })
    }

    /// Sends the pool round and round, at most `window_bytes` unacknowledged, from the moment
    /// `go` turns true until `stop` does; then waits for every ACK, finishes the data stream and
    /// closes the connection. Returns each batch's send → ACK time.
    pub async fn run(
        self,
        window_bytes: u64,
        counters: Arc<EdgeCounters>,
        mut go: watch::Receiver<bool>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Vec<Duration>> {
        let SimEdge { id, _endpoint, conn, _control, mut data_send, data_recv, pool } = self;
        let window = Arc::new(Semaphore::new(usize::try_from(window_bytes).unwrap_or(usize::MAX)));
        let inflight: Arc<Mutex<VecDeque<InFlight>>> = Arc::default();
        let reader = read_acks(data_recv, window.clone(), inflight.clone(), counters.clone());
        let closing = window.clone();
        // A reader that fails closes the window, so the sender stops at once.
        let acks = tokio::spawn(async move {
            let r = reader.await;
            closing.close();
            r
        });
        let _ = go.wait_for(|g| *g).await;
        let sent = send_batches(&mut data_send, &pool, window_bytes, &window, &inflight, &counters, stop).await;
        // Whatever happened, finish the stream: the core then answers what it holds and ends
        // its side, which ends the ACK reader.
        let _ = data_send.finish();
        let read = tokio::time::timeout(ACK_STALL_TIMEOUT, acks).await;
        counters.add_path_stats(&conn);
        conn.close(VarInt::from(ErrorCode::NoError as u16), b"loadgen done");
        // The reader's error first: a refusal from the core also stops the sender.
        let latencies = read
            .with_context(|| format!("{id}: ACKs still missing {ACK_STALL_TIMEOUT:?} after the last batch"))?
            .context("the ACK reader")?
            .with_context(|| format!("{id}: reading ACKs"))?;
        sent.with_context(|| format!("{id}: sending"))?;
        let left = inflight.lock().await.len();
        if left > 0 {
            bail!("{id}: the core ended the data stream with {left} batches unacknowledged");
        }
        Ok(latencies)
    }
}

/// An edge connected to a bare QUIC receiver (`loadgen quic-sink`), with one bidirectional
/// stream open and no session: no HELLO, no WELCOME, no ACK. See [`SimEdge::connect_raw`].
#[derive(Debug)]
pub struct RawEdge {
    id: String,
    _endpoint: Endpoint,
    conn: Connection,
    send: SendStream,
    /// Kept open so the receiver's side of the stream is not stopped.
    _recv: RecvStream,
    pool: Vec<PooledBatch>,
}

impl SimEdge {
    /// Connects to `sink` as [`SimEdge::connect`] does (same certificate, TLS, ALPN and
    /// transport settings) and opens one bidirectional stream, with no session on it: for a
    /// receiver that only reads bytes. Returns once the handshake is done.
    pub async fn connect_raw(
        sink: SocketAddr,
        cert: &EdgeCert,
        pool: Vec<PooledBatch>,
        mtu: shared::quic::Mtu,
    ) -> anyhow::Result<RawEdge> {
        let id = cert.id.clone();
        let (config, endpoint) = client(cert, mtu)?;
        let connecting = async {
            let conn = endpoint.connect_with(config, sink, SERVER_NAME)?.await?;
            let (send, recv) = conn.open_bi().await?;
            Ok::<_, anyhow::Error>((conn, send, recv))
        };
        let (conn, send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .with_context(|| format!("{id}: no connection to the QUIC sink {sink} within {HANDSHAKE_TIMEOUT:?}"))?
            .with_context(|| format!("{id}: connecting to the QUIC sink {sink}"))?;
        Ok(RawEdge { id, _endpoint: endpoint, conn, send, _recv: recv, pool })
    }
}

impl RawEdge {
    /// From the moment `go` turns true until `stop` does, writes the pool's BATCH frames round
    /// and round on its stream, each exactly as [`SimEdge::run`] sends it (`base_seq`
    /// following on), with no window: QUIC's flow and congestion control pace it, and
    /// `bytes_per_second`, if given, caps its mean rate (a frame waits until the bytes before
    /// it are due). Counts frames and batch bytes written in `counters` (`sent_batches`,
    /// `sent_bytes`) and the connection's packets and path MTU; then closes the connection
    /// without waiting for the receiver to read what is still in flight.
    pub async fn run_raw(
        self,
        bytes_per_second: Option<f64>,
        counters: Arc<EdgeCounters>,
        mut go: watch::Receiver<bool>,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let RawEdge { id, _endpoint, conn, mut send, _recv, pool } = self;
        let _ = go.wait_for(|g| *g).await;
        let started = tokio::time::Instant::now();
        let sent = async {
            let (mut next_seq, mut written) = (0u64, 0u64);
            for b in pool.iter().cycle() {
                if *stop.borrow() {
                    break;
                }
                if let Some(rate) = bytes_per_second.filter(|r| *r > 0.0) {
                    let due = started + Duration::from_secs_f64(written as f64 / rate);
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = stop.changed() => break,
                    }
                }
                let frame = with_base_seq(b, next_seq);
                tokio::select! {
                    w = send.write_chunk(frame) => w.context("writing a BATCH frame")?,
                    _ = stop.changed() => break,
                }
                counters.sent_batches.fetch_add(1, Relaxed);
                counters.sent_bytes.fetch_add(b.batch_bytes(), Relaxed);
                next_seq += u64::from(b.records);
                written += b.batch_bytes();
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        counters.add_path_stats(&conn);
        let _ = send.finish();
        conn.close(VarInt::from(ErrorCode::NoError as u16), b"loadgen done");
        sent.with_context(|| format!("{id}: sending to the QUIC sink"))
    }
}

/// An edge's client config and a loopback endpoint to connect with, packets up to `mtu.max`.
fn client(cert: &EdgeCert, mtu: shared::quic::Mtu) -> anyhow::Result<(quinn::ClientConfig, Endpoint)> {
    let endpoint =
        shared::quic::client_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), mtu).context("a client UDP socket")?;
    Ok((client_config(cert, mtu)?, endpoint))
}

/// An edge's client config: its certificate, the CA, ALPN v1 and the agent's transport
/// defaults (keep-alive 10 s, idle timeout 60 s, Cubic) with packet sizes `mtu`.
fn client_config(cert: &EdgeCert, mtu: shared::quic::Mtu) -> anyhow::Result<quinn::ClientConfig> {
    let tls =
        tls::client_config(cert.ca_pem.as_bytes(), cert.cert_pem.as_bytes(), cert.key_pem.as_bytes(), &[tls::ALPN_V1])?;
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(shared::quic::transport(
        Duration::from_secs(10),
        Duration::from_secs(60),
        Congestion::Cubic,
        16,
        mtu,
    ));
    Ok(config)
}

/// A batch sent and not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    start: u64,
    end: u64,
    permits: u32,
    at: Instant,
    batch: usize,
    sizes: (u64, u64, u64),
}

async fn send_batches(
    send: &mut SendStream,
    pool: &[PooledBatch],
    window_bytes: u64,
    window: &Semaphore,
    inflight: &Mutex<VecDeque<InFlight>>,
    counters: &EdgeCounters,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut next_seq = 0u64;
    for (k, b) in pool.iter().enumerate().cycle() {
        if *stop.borrow() {
            return Ok(());
        }
        // A batch larger than the whole window goes alone.
        let permits = u32::try_from(b.batch_bytes().min(window_bytes)).unwrap_or(u32::MAX);
        tokio::select! {
            p = window.acquire_many(permits) => p.context("the window closed")?.forget(),
            _ = stop.changed() => return Ok(()),
        }
        let end = next_seq + u64::from(b.records);
        let frame = with_base_seq(b, next_seq);
        // Queued before the write: the ACK may come back before the write returns.
        inflight.lock().await.push_back(InFlight {
            start: next_seq,
            end,
            permits,
            at: Instant::now(),
            batch: k,
            sizes: (b.batch_bytes(), b.raw_bytes, b.payload_bytes),
        });
        send.write_chunk(frame).await.context("writing a BATCH frame")?;
        counters.sent_batches.fetch_add(1, Relaxed);
        counters.sent_bytes.fetch_add(b.batch_bytes(), Relaxed);
        next_seq = end;
    }
    Ok(())
}

/// Reads ACK frames until the core ends the stream; each must name the oldest batch in
/// flight (the core acks in order) and be durable.
async fn read_acks(
    mut recv: RecvStream,
    window: Arc<Semaphore>,
    inflight: Arc<Mutex<VecDeque<InFlight>>>,
    counters: Arc<EdgeCounters>,
) -> anyhow::Result<Vec<Duration>> {
    let mut buf = FrameParts::default();
    let mut latencies = Vec::new();
    loop {
        let frame = match read_frame(&mut recv, &mut buf).await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(latencies),
            Err(r) => bail!("{:?}: {}", r.code, r.message),
        };
        match frame {
            Frame::Ack { start, end, marks: m } => {
                let Some(b) = inflight.lock().await.pop_front() else {
                    bail!("an ACK of {start}..{end} with nothing in flight");
                };
                if (b.start, b.end) != (start, end) || m & marks::DURABLE == 0 {
                    bail!(
                        "ACK {start}..{end} marks {m:#x}; expected {}..{} durable (pool batch {})",
                        b.start,
                        b.end,
                        b.batch
                    );
                }
                latencies.push(b.at.elapsed());
                window.add_permits(b.permits as usize);
                let (bytes, raw, payload) = b.sizes;
                counters.acked_batches.fetch_add(1, Relaxed);
                counters.acked_bytes.fetch_add(bytes, Relaxed);
                counters.acked_raw_bytes.fetch_add(raw, Relaxed);
                counters.acked_payload_bytes.fetch_add(payload, Relaxed);
                counters.acked_records.fetch_add(end - start, Relaxed);
            }
            Frame::Error { code, message } => bail!("the core closed the data stream: {code:?}: {message}"),
            other => bail!("unexpected frame on the data stream: {other:?}"),
        }
    }
}

/// A random epoch per edge, as an edge draws one for a new data directory.
pub fn epoch_for(seed: u64, edge_index: u64) -> u64 {
    SmallRng::seed_from_u64(seed ^ edge_index.wrapping_mul(0x9e37_79b9_7f4a_7c15)).r#gen()
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::batch::{Batch, BatchLimits};

    #[test]
    fn a_rewritten_batch_decodes_with_its_new_range_and_the_same_records() {
        let pool = encode_pool("edge-1", 0xfeed, 2, 16 << 10, 7, 0).unwrap();
        assert_eq!(pool.len(), 2);
        for b in &pool {
            assert!(b.raw_bytes <= 16 << 10 && b.records > 10, "{} records, {} raw", b.records, b.raw_bytes);
            assert!(b.batch_bytes() * 3 < b.raw_bytes, "compressed: {} of {}", b.batch_bytes(), b.raw_bytes);
        }
        let original = Batch::from_bytes(Bytes::copy_from_slice(pool[1].batch()), &BatchLimits::default()).unwrap();
        let frame = with_base_seq(&pool[1], 1234);
        let (decoded, used) = Frame::decode(&frame).unwrap().unwrap();
        assert_eq!(used, frame.len());
        let Frame::Batch(bytes) = decoded else { panic!("{decoded:?}") };
        let batch = Batch::from_bytes(bytes, &BatchLimits::default()).unwrap();
        let h = batch.header();
        assert_eq!((h.base_seq.0, h.record_count, h.epoch.0), (1234, pool[1].records, 0xfeed));
        assert_eq!((h.producer.as_str(), h.stream.as_str()), ("edge-1", STREAM));
        assert_eq!(batch.records().unwrap(), original.records().unwrap());
        let records = batch.records().unwrap();
        assert_eq!(records.iter().map(|r| r.payload.len() as u64).sum::<u64>(), pool[1].payload_bytes);
        assert_eq!(records[0].attr(attr::MQTT_CLIENT), Some("backhaul-edge-1-gateway"));
    }

    #[test]
    fn pools_of_two_edges_differ_and_epochs_are_drawn_per_edge() {
        let a = encode_pool("a", 1, 1, 8 << 10, 1, 0).unwrap();
        let b = encode_pool("a", 1, 1, 8 << 10, 2, 0).unwrap();
        assert_ne!(a[0].batch(), b[0].batch());
        assert_ne!(epoch_for(1, 0), epoch_for(1, 1));
        assert_eq!(epoch_for(1, 5), epoch_for(1, 5));
    }
}
