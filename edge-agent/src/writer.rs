//! The writer: routes incoming messages to streams, batches them, appends the batches to each
//! stream's log, syncs by each stream's fsync policy, applies the disk budget, and says which
//! PUBACKs may leave. One thread owns it; inputs arrive on a channel, time comes in as `now`.
//!
//! Per stream, records go: builder (open batch) → closed (waiting for disk room) → appended
//! (waiting for the covering fsync) → committed. Batches are numbered per stream in that order,
//! so "is batch n committed" is one comparison. Seqs are log offsets: a batch's `base_seq` is
//! the log's next offset when it is appended, so a stream's seqs run from 0 without holes.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::{Bytes, BytesMut};
use shared::batch::{
    Attr, Batch, BatchBuilder, BatchEncoder, BatchLimits, BatchMeta, Compression, GapReason, PayloadFormat, attr,
    encode_gap,
};
use shared::ids::{Epoch, Offset, Seq};
use shared::log::storage::Storage;
use shared::log::verify::stream_dir;
use shared::log::{FsyncPolicy, Log, LogConfig, LogError, Retention, SegmentSummary};

use crate::config::{Config, DEADLETTER_STREAM, FsyncConfig, FullPolicy, PayloadFormatConfig, StreamConfig};
use crate::ingest::session::{AckSession, Admit, BatchRef, Outcome};
use crate::metrics::{DropReason, Metrics, StreamId};
use crate::route::Router;
use crate::shape::{Shaped, Shaper};

/// A segment this small holds only a gap batch (a gap frame is ~150 bytes), or so little that
/// replacing it frees nothing: `drop_oldest` passes over it.
const GAP_SEGMENT_BYTES_MAX: u64 = 512;
/// What a batch adds to its records' raw bytes on disk, at most, for budget checks.
const BATCH_ESTIMATE_OVERHEAD_BYTES: u64 = 256;
/// How often retention and the slower gauges are looked at, µs.
const HOUSEKEEPING_INTERVAL_US: u64 = 1_000_000;
/// Attribute naming why a record was dead-lettered.
pub const ATTR_REASON: &str = "deadletter.reason";
/// Attribute naming the stream a dead-lettered record was meant for.
pub const ATTR_STREAM: &str = "deadletter.stream";
/// Attribute of a shaped record: the hash of the MQTT message it came from, so a redelivery
/// after a restart is recognised though the stored payload differs from the received one.
pub const ATTR_SOURCE_HASH: &str = "mqtt.hash";

/// A stream's log, shared by the writer (appends, syncs, budget) and the forwarder (reads,
/// release). Held only for one call at a time; an fsync holds it for the fsync's duration.
pub type SharedLog = Arc<Mutex<Log>>;

/// Locks a shared log. A panic elsewhere while holding it leaves a log whose own invariants
/// still hold (every call either completes or poisons the log), so the guard is taken anyway.
pub fn lock(log: &Mutex<Log>) -> MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A message from a broker connection.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// Connection index.
    pub conn: usize,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// QoS of the delivery.
    pub qos: u8,
    /// DUP flag: a redelivery.
    pub dup: bool,
    /// A listen-mode device's Will, stored because its connection failed (attribute
    /// `mqtt.will`).
    pub will: bool,
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Event time given to the record, ms since the epoch (MQTT carries none: receive time).
    pub ts_ms: i64,
    /// Receive time on the writer's monotonic scale, µs.
    pub received_us: u64,
}

/// What the writer is told.
#[derive(Debug)]
pub enum Input {
    /// A PUBLISH.
    Publish(Incoming),
    /// Connection `conn` dropped; the broker will redeliver what was not acknowledged.
    Reset {
        /// Connection index.
        conn: usize,
        /// The connection's generation from now on; acks carry it, and the connection
        /// drops acks of an older generation (their messages are redelivered).
        generation: u64,
    },
    /// A listen-mode connection `conn` (an index above the broker connections, reused after
    /// its [`Input::Detach`]) took over a device session.
    Attach {
        /// Connection index.
        conn: usize,
        /// How the writer treats it.
        info: ConnInfo,
        /// Clean start: forget the redelivery memory kept for its client id.
        clean: bool,
        /// Where its acks go (taken by the writer thread's loop, not by [`Writer`]).
        acks: Option<AckSender>,
    },
    /// Listen-mode connection `conn` closed: its queued acks are forgotten (the device
    /// resends with DUP), its redelivery memory is kept under its client id.
    Detach {
        /// Connection index.
        conn: usize,
    },
    /// Time passed.
    Tick,
    /// Flush, sync, ack, stop.
    Shutdown,
}

/// Where a connection's acks go.
pub type AckSender = tokio::sync::mpsc::UnboundedSender<Ack>;

/// A PUBACK that may leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Connection index.
    pub conn: usize,
    /// Packet id.
    pub pkid: u16,
    /// The connection generation it belongs to (see [`Input::Reset`]).
    pub generation: u64,
    /// When its PUBLISH came in, µs.
    pub received_us: u64,
    /// What became of the PUBLISH.
    pub outcome: Outcome,
}

/// One connection as the writer sees it.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// MQTT client id (kept on records, to recognise redeliveries after a restart).
    pub client_id: String,
    /// Receive window: at this many unacknowledged messages, batches flush and sync at once.
    pub inflight_max: usize,
    /// Refuse (rather than hold) a PUBLISH to a stream that is full under `backpressure`:
    /// MQTT 5 devices of listen mode, which can be told "quota exceeded" and retry.
    pub refuse_when_full: bool,
}

/// One record for [`Writer::push_record`].
struct NewRecord<'a> {
    ts_ms: i64,
    topic: &'a str,
    payload: &'a [u8],
    attrs: &'a [Attr],
    received_us: u64,
}

struct StreamState {
    name: String,
    cfg: StreamConfig,
    dir: PathBuf,
    log_config: LogConfig,
    log: SharedLog,
    meta: BatchMeta,
    encoder: BatchEncoder,
    builder: BatchBuilder,
    builder_no: u64,
    builder_since_us: Option<u64>,
    closed: VecDeque<(u64, BatchBuilder)>,
    appended: VecDeque<(u64, Offset)>,
    committed_below: u64,
    last_sync_us: u64,
    next_housekeeping_us: u64,
    full: bool,
    /// Decoding and rules, if the stream is shaped.
    shaper: Option<Shaper>,
}

/// See the module doc.
pub struct Writer {
    streams: Vec<StreamState>,
    sessions: Vec<AckSession>,
    generations: Vec<u64>,
    conns: Vec<ConnInfo>,
    /// Redelivery memory of listen-mode devices not connected now, by client id.
    parked: std::collections::HashMap<String, AckSession>,
    /// Bound of `parked`.
    parked_max: usize,
    /// Records read back from each log's tail at start for listen-mode devices.
    listen_window: u64,
    /// Connections below this index are the brokers'; above, listen mode's.
    broker_conns: usize,
    /// QoS 0 messages of devices dropped because their stream was full (`backpressure`):
    /// nothing can hold them back, and memory must stay bounded.
    qos0_dropped_full: Arc<std::sync::atomic::AtomicU64>,
    router: Router,
    deadletter: usize,
    storage: Arc<dyn Storage>,
    total_budget: Option<u64>,
    metrics: Arc<Metrics>,
    /// Told whenever a committed offset moves (the forwarder waits on it).
    committed: Arc<tokio::sync::Notify>,
    /// Metric ids of the streams, by stream index.
    mids: Vec<StreamId>,
    out: BytesMut,
    /// Messages whose shaped outputs went to two streams (records and dead letters): the ack
    /// waits for both batches. Numbered in order; `BatchRef { stream: streams.len(), batch_no:
    /// id }` stands for one. Pruned from the front once both are committed.
    joint: VecDeque<(u64, BatchRef, BatchRef)>,
    /// Every joint id below this is committed (pruned).
    joint_committed_below: u64,
    /// The next joint id.
    joint_next: u64,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("streams", &self.streams.len())
            .field("conns", &self.conns)
            .finish_non_exhaustive()
    }
}

/// Errors that stop the writer from starting.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// A stream's log did not open.
    #[error("stream {stream}: {source}")]
    Log {
        /// The stream.
        stream: String,
        /// Why.
        source: LogError,
    },
    /// A setting the codec refused.
    #[error("stream {stream}: {reason}")]
    Config {
        /// The stream.
        stream: String,
        /// Why.
        reason: String,
    },
}

impl Writer {
    /// Opens every stream's log under `data_dir` (recovery included) and rebuilds the
    /// redelivery memory of each connection from the logs' tails.
    pub fn open(
        config: &Config,
        epoch: Epoch,
        storage: Arc<dyn Storage>,
        conns: Vec<ConnInfo>,
        metrics: Arc<Metrics>,
        now_ms: i64,
    ) -> Result<Writer, WriterError> {
        let names = config.stream_names();
        let mut streams = Vec::with_capacity(names.len());
        for name in &names {
            let cfg = config.streams[name].clone();
            streams.push(open_stream(&config.edge_id, epoch, &config.data_dir, name, cfg, storage.clone(), now_ms)?);
        }
        let id = |n: &str| names.iter().position(|s| s == n).expect("validated stream name");
        let rules: Vec<(String, usize)> = config.routes.iter().map(|r| (r.filter.clone(), id(&r.stream))).collect();
        let router = Router::new(&rules, config.routing.unmatched_stream.as_deref().map(id));
        let broker_conns = conns.len();
        let mut w = Writer {
            sessions: conns.iter().map(|_| AckSession::new()).collect(),
            generations: vec![0; conns.len()],
            deadletter: id(DEADLETTER_STREAM),
            streams,
            conns,
            parked: std::collections::HashMap::new(),
            parked_max: config.listen.as_ref().map_or(0, |l| l.sessions_max),
            listen_window: config.listen.as_ref().map_or(0, |l| l.redelivery_window_records),
            broker_conns,
            qos0_dropped_full: Arc::default(),
            router,
            storage,
            total_budget: config.disk.budget_bytes.map(|b| b.0),
            mids: names.iter().map(|n| metrics.stream_id(n).expect("metrics know every stream")).collect(),
            metrics,
            committed: Arc::new(tokio::sync::Notify::new()),
            out: BytesMut::new(),
            joint: VecDeque::new(),
            joint_committed_below: 0,
            joint_next: 0,
        };
        for (si, s) in w.streams.iter().enumerate() {
            if let Some(shaper) = &s.shaper {
                w.metrics.register_shape_rules(&names[si], shaper.counters());
            }
        }
        w.remember_log_tails();
        for s in 0..w.streams.len() {
            w.update_gauges(s);
        }
        Ok(w)
    }

    /// Takes one input. Returns true for [`Input::Shutdown`]: the caller then calls
    /// [`Writer::drive`] with `shutdown` set, sends the acks and stops.
    pub fn handle_input(&mut self, input: Input) -> bool {
        match input {
            Input::Publish(msg) => self.handle_publish(msg),
            Input::Reset { conn, generation } => {
                self.sessions[conn].handle_reset();
                self.generations[conn] = generation;
            }
            Input::Attach { conn, info, clean, acks: _ } => self.attach(conn, info, clean),
            Input::Detach { conn } => self.detach(conn),
            Input::Tick => {}
            Input::Shutdown => return true,
        }
        false
    }

    /// The shared log of stream `name`, for the forwarder.
    pub fn shared_log(&self, name: &str) -> Option<SharedLog> {
        self.streams.iter().find(|s| s.name == name).map(|s| s.log.clone())
    }

    /// Signalled whenever a committed offset moves.
    pub fn committed_notify(&self) -> Arc<tokio::sync::Notify> {
        self.committed.clone()
    }

    /// Stream names, by index.
    pub fn stream_names(&self) -> Vec<String> {
        self.streams.iter().map(|s| s.name.clone()).collect()
    }

    /// The count of devices' QoS 0 messages dropped on a full `backpressure` stream.
    pub fn qos0_dropped_full(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.qos0_dropped_full.clone()
    }

    /// Client ids of listen-mode devices whose records the logs' tails hold (read at open).
    pub fn parked_clients(&self) -> Vec<String> {
        self.parked.keys().cloned().collect()
    }

    fn attach(&mut self, conn: usize, info: ConnInfo, clean: bool) {
        if conn >= self.sessions.len() {
            self.sessions.resize_with(conn + 1, AckSession::new);
            self.generations.resize(conn + 1, 0);
            self.conns
                .resize(conn + 1, ConnInfo { client_id: String::new(), inflight_max: 1, refuse_when_full: false });
        }
        let parked = self.parked.remove(&info.client_id);
        let mut session = if clean { AckSession::new() } else { parked.unwrap_or_default() };
        session.handle_reset();
        self.sessions[conn] = session;
        self.conns[conn] = info;
    }

    fn detach(&mut self, conn: usize) {
        let Some(session) = self.sessions.get_mut(conn) else { return };
        let mut session = std::mem::take(session);
        session.handle_reset();
        let client_id = std::mem::take(&mut self.conns[conn].client_id);
        if session.remembers_any() && self.parked_max > 0 {
            if self.parked.len() >= self.parked_max
                && let Some(k) = self.parked.keys().next().cloned()
            {
                self.parked.remove(&k);
            }
            self.parked.insert(client_id, session);
        }
    }

    /// Whether any stream is refusing data for lack of disk.
    pub fn any_full(&self) -> bool {
        self.streams.iter().any(|s| s.full)
    }

    fn handle_publish(&mut self, m: Incoming) {
        let hash = content_hash(&m.topic, &m.payload);
        if m.qos > 0 {
            match self.sessions[m.conn].handle_publish(m.pkid, m.dup, hash) {
                Admit::New => {}
                Admit::Duplicate(at) => {
                    let stream = self.router.route(&m.topic).unwrap_or(self.deadletter);
                    self.metrics.add_dropped(self.mids[stream], DropReason::Duplicate, 1);
                    self.sessions[m.conn].handle_taken_as(m.pkid, None, at, m.received_us, Outcome::Duplicate);
                    return;
                }
            }
        }
        let Some(si) = self.router.route(&m.topic) else {
            self.metrics.add_unrouted(1);
            if m.qos > 0 {
                self.sessions[m.conn].handle_taken_as(m.pkid, None, None, m.received_us, Outcome::Unrouted);
            }
            return;
        };
        self.metrics.add_received(self.mids[si], 1);
        let s = &self.streams[si];
        if s.cfg.full_policy == FullPolicy::Backpressure && m.qos > 0 && self.conns[m.conn].refuse_when_full {
            // Refused before it is taken, also when it would not fit the budget with what
            // waits to be appended: once taken, its ack would wait for room, and every later
            // ack of the connection behind it (acks leave in order).
            let waiting = s.builder.raw_len() as u64
                + s.closed.iter().map(|(_, b)| b.raw_len() as u64 + BATCH_ESTIMATE_OVERHEAD_BYTES).sum::<u64>();
            let extra = waiting + m.payload.len() as u64 + BATCH_ESTIMATE_OVERHEAD_BYTES;
            let budgeted = s.cfg.disk_budget_bytes.is_some() || self.total_budget.is_some();
            if s.full || (budgeted && self.over_budget(si, extra).is_some()) {
                // Not taken: the device keeps it and retries.
                self.sessions[m.conn].handle_taken_as(m.pkid, None, None, m.received_us, Outcome::QuotaExceeded);
                return;
            }
        }
        if s.full && s.cfg.full_policy == FullPolicy::Backpressure && m.qos == 0 && m.conn >= self.broker_conns {
            // At most once by its own terms, and no ack to hold back: held, it would grow
            // memory without bound while the disk is full.
            self.qos0_dropped_full.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let too_large = m.payload.len() as u64 > self.streams[si].cfg.record_bytes_max.0;
        let mut attrs = Vec::with_capacity(4);
        attrs.push(Attr { key: attr::MQTT_CLIENT.into(), value: self.conns[m.conn].client_id.clone() });
        if m.qos > 0 {
            attrs.push(Attr { key: attr::MQTT_PACKET_ID.into(), value: m.pkid.to_string() });
        }
        if m.will {
            attrs.push(Attr { key: attr::MQTT_WILL.into(), value: "1".into() });
        }
        if !too_large && let Some(shaper) = self.streams[si].shaper.as_mut() {
            let shaped = shaper.handle(m.ts_ms, &m.topic, &m.payload);
            // Nothing but dead letters: the payload could not be decoded for the stream.
            let outcome = if shaped.records.is_empty() && !shaped.dead.is_empty() {
                Outcome::PayloadInvalid
            } else {
                Outcome::Stored
            };
            // The stored payload is not the received one: keep the received content's hash so
            // a redelivery after a restart is still recognised.
            attrs.push(Attr { key: ATTR_SOURCE_HASH.into(), value: format!("{hash:016x}") });
            let at = self.take_shaped(si, shaped, &attrs, m.received_us);
            if m.qos > 0 {
                self.sessions[m.conn].handle_taken_as(m.pkid, Some(hash), at, m.received_us, outcome);
            }
            return;
        }
        let s = &self.streams[si];
        let rejected = if too_large {
            Some((
                DropReason::TooLarge,
                format!("payload of {} bytes above record_bytes_max {}", m.payload.len(), s.cfg.record_bytes_max),
            ))
        } else if s.cfg.format == PayloadFormatConfig::Json
            && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&m.payload)
        {
            Some((DropReason::InvalidPayload, format!("invalid JSON: {e}")))
        } else {
            None
        };
        let outcome = match &rejected {
            None => Outcome::Stored,
            Some((DropReason::InvalidPayload, _)) => Outcome::PayloadInvalid,
            Some(_) => Outcome::TooLarge,
        };
        let (target, payload): (usize, &[u8]) = match &rejected {
            None => (si, &m.payload),
            Some((reason, text)) => {
                self.metrics.add_dropped(self.mids[si], *reason, 1);
                attrs.push(Attr { key: ATTR_REASON.into(), value: text.clone() });
                attrs.push(Attr { key: ATTR_STREAM.into(), value: self.streams[si].name.clone() });
                let keep = if *reason == DropReason::TooLarge { &[][..] } else { &m.payload[..] };
                (self.deadletter, keep)
            }
        };
        let at = self.push_record(
            si,
            target,
            NewRecord { ts_ms: m.ts_ms, topic: &m.topic, payload, attrs: &attrs, received_us: m.received_us },
        );
        if m.qos > 0 {
            // `None`: the batch codec refused it (counted as too large) and nothing was kept.
            let outcome = if at.is_none() { Outcome::TooLarge } else { outcome };
            self.sessions[m.conn].handle_taken_as(m.pkid, at.map(|_| hash), at, m.received_us, outcome);
        }
    }

    /// Appends one record to stream `target`'s open batch (`si`: the stream it was routed to,
    /// for counting). `None` if the batch codec refused it (counted as too large).
    fn push_record(&mut self, si: usize, target: usize, r: NewRecord<'_>) -> Option<BatchRef> {
        let NewRecord { ts_ms, topic, payload, attrs, received_us } = r;
        let t = &mut self.streams[target];
        // A batch stays within batch_bytes_max however many messages one burst brings: close
        // the open batch before a record that would take it past, and once it reaches it.
        if !t.builder.is_empty() && (t.builder.raw_len() + payload.len()) as u64 > t.cfg.batch_bytes_max.0 {
            t.close_builder();
        }
        if let Err(e) = t.builder.push(ts_ms, topic, payload, attrs) {
            // Only a bound of the codec (topic or attribute size) can refuse it.
            tracing::warn!(error = %e, topic = %topic, "record refused by the batch codec");
            self.metrics.add_dropped(self.mids[si], DropReason::TooLarge, 1);
            return None;
        }
        t.builder_since_us.get_or_insert(received_us);
        let at = BatchRef { stream: target, batch_no: t.builder_no };
        if t.builder.raw_len() as u64 >= t.cfg.batch_bytes_max.0 {
            t.close_builder();
        }
        Some(at)
    }

    /// Takes what the shaper made of one message routed to stream `si`: records into `si`,
    /// dead letters into `_deadletter`. The ack waits for the batch(es) they went into (a joint
    /// ref when both streams got some); `None` if nothing was kept at all.
    fn take_shaped(&mut self, si: usize, shaped: Shaped, base: &[Attr], received_us: u64) -> Option<BatchRef> {
        if shaped.filtered > 0 {
            self.metrics.add_dropped(self.mids[si], DropReason::Filtered, shaped.filtered);
        }
        let mut at = None;
        for d in shaped.dead {
            self.metrics.add_dropped(self.mids[si], DropReason::InvalidPayload, 1);
            let mut attrs = base.to_vec();
            attrs.push(Attr { key: ATTR_REASON.into(), value: d.reason });
            attrs.push(Attr { key: ATTR_STREAM.into(), value: self.streams[si].name.clone() });
            at = self
                .push_record(
                    si,
                    self.deadletter,
                    NewRecord { ts_ms: d.ts_ms, topic: &d.topic, payload: &d.payload, attrs: &attrs, received_us },
                )
                .or(at);
        }
        let mut main = None;
        for r in shaped.records {
            let mut attrs = base.to_vec();
            attrs.extend(r.attrs.into_iter().map(|(key, value)| Attr { key, value }));
            main = self
                .push_record(
                    si,
                    si,
                    NewRecord { ts_ms: r.ts_ms, topic: &r.topic, payload: &r.payload, attrs: &attrs, received_us },
                )
                .or(main);
        }
        match (main, at) {
            (Some(a), Some(b)) => {
                let id = self.joint_next;
                self.joint_next += 1;
                self.joint.push_back((id, a, b));
                Some(BatchRef { stream: self.streams.len(), batch_no: id })
            }
            (a, b) => a.or(b),
        }
    }

    /// Takes the windowed output of every shaped stream due at `now_ms` (all of it at shutdown).
    fn poll_shapers(&mut self, now_us: u64, now_ms: i64, shutdown: bool) {
        for si in 0..self.streams.len() {
            let Some(shaper) = self.streams[si].shaper.as_mut().filter(|s| s.holds_records()) else { continue };
            let shaped = shaper.poll((!shutdown).then_some(now_ms));
            if !shaped.records.is_empty() || !shaped.dead.is_empty() || shaped.filtered > 0 {
                self.take_shaped(si, shaped, &[], now_us);
            }
        }
    }

    /// Flushes due batches (all of them at `shutdown`), appends, syncs, and returns the acks
    /// that may leave now, in order per connection.
    pub fn drive(&mut self, now_us: u64, now_ms: i64, shutdown: bool) -> Vec<Ack> {
        self.poll_shapers(now_us, now_ms, shutdown);
        let urgent = shutdown || self.sessions.iter().zip(&self.conns).any(|(s, c)| s.pending() >= c.inflight_max);
        for si in 0..self.streams.len() {
            let s = &mut self.streams[si];
            let linger_due = s.builder_since_us.is_some_and(|t| now_us.saturating_sub(t) >= s.cfg.linger.0 * 1000);
            if !s.builder.is_empty() && (urgent || linger_due) {
                s.close_builder();
            }
            self.append_closed(si, now_ms);
            self.sync_if_due(si, now_us, now_ms, urgent);
            self.advance_committed(si);
            self.update_gauges(si);
            if now_us >= self.streams[si].next_housekeeping_us {
                self.streams[si].next_housekeeping_us = now_us + HOUSEKEEPING_INTERVAL_US;
                self.expire(si, now_ms);
                let oldest = lock(&self.streams[si].log).oldest_event_ms();
                let age_ms = oldest.map_or(0, |t| now_ms.saturating_sub(t).max(0) as u64);
                self.metrics.set_oldest_unforwarded_age(self.mids[si], std::time::Duration::from_millis(age_ms));
            }
        }
        let committed: Vec<u64> = self.streams.iter().map(|s| s.committed_below).collect();
        let stream_committed = |b: BatchRef| b.batch_no < committed[b.stream];
        while let Some(&(id, a, b)) = self.joint.front() {
            if !(stream_committed(a) && stream_committed(b)) {
                break;
            }
            self.joint_committed_below = id + 1;
            self.joint.pop_front();
        }
        let (joint, joint_below, n) = (&self.joint, self.joint_committed_below, committed.len());
        let is_committed = |b: BatchRef| {
            if b.stream < n {
                return stream_committed(b);
            }
            b.batch_no < joint_below
                || joint.iter().any(|&(id, x, y)| id == b.batch_no && stream_committed(x) && stream_committed(y))
        };
        let mut acks = Vec::new();
        for (conn, session) in self.sessions.iter_mut().enumerate() {
            for (pkid, received_us, outcome) in session.poll_acks(is_committed) {
                self.metrics
                    .observe_receive_to_ack(std::time::Duration::from_micros(now_us.saturating_sub(received_us)));
                acks.push(Ack { conn, pkid, generation: self.generations[conn], received_us, outcome });
            }
        }
        acks
    }

    fn append_closed(&mut self, si: usize, now_ms: i64) {
        while let Some((no, builder)) = self.streams[si].closed.front() {
            let (no, estimate) = (*no, builder.raw_len() as u64 + BATCH_ESTIMATE_OVERHEAD_BYTES);
            if let Some(why) = self.over_budget(si, estimate) {
                let s = &self.streams[si];
                if s.cfg.full_policy == FullPolicy::DropOldest && self.drop_oldest(si) {
                    continue;
                }
                self.set_full(si, true, &why);
                return;
            }
            let s = &mut self.streams[si];
            let (_, mut builder) = s.closed.pop_front().expect("front exists");
            s.meta.base_seq = Seq(lock(&s.log).next_offset().0);
            self.out.clear();
            let raw_len = builder.raw_len() as u64;
            // Encoding cannot fail for records the builder took and batches within the limits
            // the config enforces; if it does, keep the records and stop acking this stream
            // (an error, for an operator) rather than ack what was not stored.
            let encoded = s
                .encoder
                .finish(&mut builder, &s.meta, &mut self.out)
                .and_then(|_| Batch::from_bytes(self.out.split().freeze(), &s.log_config.batch_limits));
            let (header, batch) = match encoded {
                Ok(b) => (b.header().clone(), b),
                Err(e) => {
                    tracing::error!(stream = %s.name, error = %e, "batch encoding failed; acks stop");
                    self.out.clear();
                    s.closed.push_front((no, builder));
                    self.set_full(si, true, "batch encoding failed");
                    return;
                }
            };
            let appended = lock(&s.log).append(&batch, now_ms);
            match appended {
                Ok(a) => {
                    s.appended.push_back((no, a.end));
                    self.metrics.add_appended(self.mids[si], u64::from(header.record_count));
                    self.metrics.add_batch(self.mids[si], raw_len, batch.bytes().len() as u64);
                    if self.streams[si].full {
                        self.set_full(si, false, "");
                    }
                }
                Err(e) => {
                    // Keep the records: back in front, appended when the disk allows.
                    let s = &mut self.streams[si];
                    let records = batch.records().expect("just encoded");
                    let mut again = BatchBuilder::new();
                    for r in &records {
                        again.push_record(r).expect("fitted before");
                    }
                    s.closed.push_front((no, again));
                    self.metrics.add_append_error(self.mids[si]);
                    if e.is_retryable() {
                        self.set_full(si, true, &e.to_string());
                    } else {
                        tracing::error!(stream = %s.name, error = %e, "log write failed; reopening the log");
                        self.reopen(si, now_ms);
                    }
                    return;
                }
            }
        }
    }

    fn sync_if_due(&mut self, si: usize, now_us: u64, now_ms: i64, urgent: bool) {
        let s = &mut self.streams[si];
        if !lock(&s.log).needs_sync() {
            return;
        }
        let due = match s.cfg.fsync {
            FsyncConfig::Interval => urgent || now_us.saturating_sub(s.last_sync_us) >= s.cfg.fsync_interval.0 * 1000,
            FsyncConfig::Always | FsyncConfig::Never => true,
        };
        if !due {
            return;
        }
        s.last_sync_us = now_us;
        let synced = lock(&s.log).sync();
        if let Err(e) = synced {
            tracing::error!(stream = %s.name, error = %e, "fsync failed; reopening the log");
            self.metrics.add_append_error(self.mids[si]);
            self.reopen(si, now_ms);
        }
    }

    fn advance_committed(&mut self, si: usize) {
        let s = &mut self.streams[si];
        let committed = lock(&s.log).committed_offset();
        if s.appended.front().is_some_and(|&(_, end)| end <= committed) {
            self.committed.notify_one();
        }
        while s.appended.front().is_some_and(|&(_, end)| end <= committed) {
            s.appended.pop_front();
        }
        s.committed_below =
            s.appended.front().map(|a| a.0).or_else(|| s.closed.front().map(|c| c.0)).unwrap_or(s.builder_no);
    }

    /// Reopens a poisoned log: recovery makes what it holds durable again.
    fn reopen(&mut self, si: usize, now_ms: i64) {
        let s = &mut self.streams[si];
        match Log::open(self.storage.clone(), &s.dir, s.log_config, now_ms) {
            Ok(log) => *lock(&s.log) = log,
            Err(e) => tracing::error!(stream = %s.name, error = %e, "reopening the log failed; will retry"),
        }
    }

    /// Why appending `extra` bytes to stream `si` would break a disk budget.
    fn over_budget(&self, si: usize, extra: u64) -> Option<String> {
        let s = &self.streams[si];
        if let Some(b) = s.cfg.disk_budget_bytes
            && lock(&s.log).disk_bytes() + extra > b.0
        {
            return Some(format!("stream budget {b} reached"));
        }
        let total: u64 = self.streams.iter().map(|s| lock(&s.log).disk_bytes()).sum();
        match self.total_budget {
            Some(b) if total + extra > b => Some(format!("total disk budget {} reached", shared::units::ByteSize(b))),
            _ => None,
        }
    }

    /// Replaces the stream's oldest data segment with a gap batch. False if none is left.
    fn drop_oldest(&mut self, si: usize) -> bool {
        let segs = lock(&self.streams[si].log).segments();
        match segs[..segs.len() - 1].iter().find(|g| g.bytes > GAP_SEGMENT_BYTES_MAX) {
            Some(victim) => self.gap_out(si, victim, GapReason::DiskFullDropOldest, DropReason::DiskFullDropOldest),
            None => false,
        }
    }

    /// `retention_age`: replaces closed segments whose newest event is older than the age.
    fn expire(&mut self, si: usize, now_ms: i64) {
        let Some(age) = self.streams[si].cfg.retention_age else { return };
        let horizon = now_ms.saturating_sub(age.0 as i64);
        let segs = lock(&self.streams[si].log).segments();
        for victim in &segs[..segs.len() - 1] {
            match victim.ts_range {
                Some((_, newest)) if newest < horizon => {
                    if victim.bytes > GAP_SEGMENT_BYTES_MAX
                        && !self.gap_out(si, victim, GapReason::RetentionExpired, DropReason::RetentionExpired)
                    {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// Swaps `victim` for a gap batch covering its seqs (fsynced before the data goes).
    fn gap_out(&mut self, si: usize, victim: &SegmentSummary, reason: GapReason, drop: DropReason) -> bool {
        let s = &mut self.streams[si];
        let count = (victim.end.0 - victim.base.0) as u32;
        let meta = BatchMeta { base_seq: Seq(victim.base.0), ..s.meta.clone() };
        let mut out = BytesMut::new();
        let ts = victim.ts_range.unwrap_or((0, 0));
        let gap = encode_gap(&meta, count, reason, ts, &mut out)
            .map_err(|e| e.to_string())
            .and_then(|_| Batch::from_bytes(out.freeze(), &BatchLimits::default()).map_err(|e| e.to_string()));
        let result =
            gap.and_then(|g| lock(&s.log).replace_segment_with_gap(victim.base, &g).map_err(|e| e.to_string()));
        match result {
            Ok(_) => {
                tracing::warn!(stream = %s.name, from_seq = victim.base.0, to_seq = victim.end.0, ?reason, "dropped a segment; gap recorded");
                self.metrics.add_dropped(self.mids[si], drop, u64::from(count));
                true
            }
            Err(e) => {
                tracing::error!(stream = %s.name, error = %e, ?reason, "replacing a segment with its gap failed");
                false
            }
        }
    }

    fn set_full(&mut self, si: usize, full: bool, why: &str) {
        let s = &mut self.streams[si];
        if s.full != full {
            if full {
                tracing::warn!(stream = %s.name, reason = why, "stream full: acks stop until there is room");
            } else {
                tracing::info!(stream = %s.name, "stream has room again: acks resume");
            }
        }
        s.full = full;
        self.metrics.set_disk_full(self.mids[si], full);
    }

    fn update_gauges(&self, si: usize) {
        let s = &self.streams[si];
        self.metrics.set_log_bytes(self.mids[si], lock(&s.log).disk_bytes());
        self.metrics.set_committed_offset(self.mids[si], lock(&s.log).committed_offset());
    }

    /// Reads the tail of every log for records taken from our connections, so a redelivery
    /// after a restart is recognised (see `ingest::session`).
    fn remember_log_tails(&mut self) {
        let window: u64 = 4 * self.conns.iter().map(|c| c.inflight_max as u64).sum::<u64>() + self.listen_window;
        for s in &mut self.streams {
            let end = lock(&s.log).committed_offset();
            let mut from = Offset(end.0.saturating_sub(window).max(lock(&s.log).start_offset().0));
            while from < end {
                let Ok(read) = lock(&s.log).read(from, 1 << 20) else { break };
                for lb in &read.batches {
                    let Ok(records) = lb.batch.records() else { continue };
                    for r in records {
                        let (Some(client), Some(pid)) = (r.attr(attr::MQTT_CLIENT), r.attr(attr::MQTT_PACKET_ID))
                        else {
                            continue;
                        };
                        let Ok(pid) = pid.parse() else { continue };
                        let hash = r
                            .attr(ATTR_SOURCE_HASH)
                            .and_then(|h| u64::from_str_radix(h, 16).ok())
                            .unwrap_or_else(|| content_hash(&r.topic, &r.payload));
                        match self.conns.iter().position(|c| c.client_id == client) {
                            Some(conn) => self.sessions[conn].remember_durable(pid, hash),
                            None if self.listen_window > 0
                                && (self.parked.len() < self.parked_max || self.parked.contains_key(client)) =>
                            {
                                self.parked.entry(client.to_owned()).or_default().remember_durable(pid, hash);
                            }
                            None => {}
                        }
                    }
                }
                if read.next <= from {
                    break;
                }
                from = read.next;
            }
        }
    }
}

impl StreamState {
    /// Moves the open batch to the closed queue; the next records start a new one.
    fn close_builder(&mut self) {
        let b = std::mem::take(&mut self.builder);
        self.closed.push_back((self.builder_no, b));
        self.builder_no += 1;
        self.builder_since_us = None;
    }
}

fn open_stream(
    edge_id: &str,
    epoch: Epoch,
    data_dir: &Path,
    name: &str,
    cfg: StreamConfig,
    storage: Arc<dyn Storage>,
    now_ms: i64,
) -> Result<StreamState, WriterError> {
    let fsync = match cfg.fsync {
        FsyncConfig::Always => FsyncPolicy::Always,
        FsyncConfig::Interval => FsyncPolicy::Interval { interval_ms: cfg.fsync_interval.0 },
        FsyncConfig::Never => FsyncPolicy::Never,
    };
    let log_config = LogConfig {
        segment_bytes_max: cfg.segment_bytes_max.0,
        segment_age_ms: cfg.segment_age.0,
        fsync,
        retention: Retention::default(),
        ..LogConfig::default()
    };
    let dir = stream_dir(data_dir, name);
    let log = Log::open(storage, &dir, log_config, now_ms)
        .map_err(|source| WriterError::Log { stream: name.into(), source })?;
    for p in log.problems() {
        tracing::warn!(stream = name, problem = %p, "log recovery");
    }
    let compression = if cfg.zstd_level == 0 { Compression::None } else { Compression::Zstd { level: cfg.zstd_level } };
    let encoder = BatchEncoder::new(compression)
        .map_err(|e| WriterError::Config { stream: name.into(), reason: e.to_string() })?;
    let shaper = crate::shape::config::compile(name, cfg.format, &cfg.shape).map_err(|p| WriterError::Config {
        stream: name.into(),
        reason: p.iter().map(|(k, why)| format!("{k}: {why}")).collect::<Vec<_>>().join("; "),
    })?;
    // Shaped streams store their records re-encoded as JSON; raw stays raw.
    let format = match cfg.format {
        PayloadFormatConfig::Raw => PayloadFormat::Raw,
        _ => PayloadFormat::Json,
    };
    let meta =
        BatchMeta { producer: edge_id.into(), epoch, stream: name.into(), base_seq: Seq(0), payload_format: format };
    Ok(StreamState {
        name: name.into(),
        cfg,
        dir,
        log_config,
        log: Arc::new(Mutex::new(log)),
        meta,
        encoder,
        builder: BatchBuilder::new(),
        builder_no: 0,
        builder_since_us: None,
        closed: VecDeque::new(),
        appended: VecDeque::new(),
        committed_below: 0,
        last_sync_us: 0,
        next_housekeeping_us: 0,
        full: false,
        shaper,
    })
}

/// Hash of a message's content, to tell a redelivery from a new message under a reused pkid.
fn content_hash(topic: &str, payload: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    topic.hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::log::sim::{Faults, SimStorage};
    use std::path::Path;

    const CONFIG: &str = r##"
edge_id = "edge-t"
data_dir = "/data"
[[broker]]
name = "main"
url = "mqtt://127.0.0.1:1883"
inflight_max = 100
subscriptions = ["#"]
[[route]]
filter = "cdr/#"
stream = "cdr"
[[route]]
filter = "sensors/#"
stream = "sensors"
[streams.cdr]
format = "json"
fsync = "interval"
fsync_interval = "10ms"
linger = "5ms"
record_bytes_max = "1KiB"
batch_bytes_max = "8KiB"
[streams.sensors]
segment_bytes_max = "4KiB"
disk_budget_bytes = "16KiB"
full_policy = "drop_oldest"
linger = "0ms"
fsync = "always"
"##;

    fn open(sim: &SimStorage) -> Writer {
        let config = Config::parse(CONFIG, Path::new("t.toml")).unwrap();
        let conns = vec![ConnInfo { client_id: "c1".into(), inflight_max: 100, refuse_when_full: false }];
        let metrics = Arc::new(Metrics::new(&config.stream_names(), &["main"]));
        Writer::open(&config, Epoch(9), Arc::new(sim.clone()), conns, metrics, 0).unwrap()
    }

    fn publish(w: &mut Writer, pkid: u16, dup: bool, topic: &str, payload: &str) {
        let msg = Incoming {
            conn: 0,
            pkid,
            qos: 1,
            dup,
            will: false,
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            ts_ms: 1000,
            received_us: 0,
        };
        assert!(!w.handle_input(Input::Publish(msg)));
    }

    fn pkids(acks: &[Ack]) -> Vec<u16> {
        acks.iter().map(|a| a.pkid).collect()
    }

    fn records(sim: &SimStorage, stream: &str) -> Vec<shared::batch::Record> {
        let cfg = LogConfig { read_only: true, ..LogConfig::default() };
        let mut log = Log::open(Arc::new(sim.clone()), &stream_dir(Path::new("/data"), stream), cfg, 0).unwrap();
        let read = log.read(log.start_offset(), 1 << 30).unwrap();
        read.batches.iter().flat_map(|b| b.batch.records().unwrap()).collect()
    }

    #[test]
    fn acks_wait_for_linger_and_the_group_commit() {
        let sim = SimStorage::new();
        let mut w = open(&sim);
        publish(&mut w, 1, false, "cdr/a", "{\"n\":1}");
        publish(&mut w, 2, false, "cdr/b", "{\"n\":2}");
        assert!(w.drive(1_000, 0, false).is_empty(), "linger not over");
        assert!(w.drive(6_000, 0, false).is_empty(), "appended, but the interval fsync has not run");
        assert_eq!(pkids(&w.drive(10_000, 0, false)), vec![1, 2]);
        let recs = records(&sim, "cdr");
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].attr(attr::MQTT_PACKET_ID), Some("2"));
        assert_eq!(recs[1].attr(attr::MQTT_CLIENT), Some("c1"));
    }

    #[test]
    fn acks_keep_receive_order_across_streams() {
        let sim = SimStorage::new();
        let mut w = open(&sim);
        publish(&mut w, 1, false, "cdr/a", "{}");
        publish(&mut w, 2, false, "sensors/t", "21.5");
        // sensors (fsync always, no linger) is durable at once, but pkid 1 comes first.
        assert!(w.drive(1_000, 0, false).is_empty());
        assert_eq!(pkids(&w.drive(20_000, 0, false)), vec![1, 2]);
    }

    #[test]
    fn redelivery_after_restart_is_acked_not_stored_twice() {
        let sim = SimStorage::new();
        let mut w = open(&sim);
        publish(&mut w, 7, false, "cdr/a", "{\"id\":7}");
        assert_eq!(pkids(&w.drive(20_000, 0, false)), vec![7]);
        drop(w); // a crash after the fsync; the broker never saw the PUBACK
        let mut w = open(&sim);
        publish(&mut w, 7, true, "cdr/a", "{\"id\":7}");
        publish(&mut w, 8, false, "cdr/a", "{\"id\":8}");
        assert_eq!(pkids(&w.drive(20_000, 0, false)), vec![7, 8], "the duplicate is acked, in order");
        let recs = records(&sim, "cdr");
        assert_eq!(
            recs.iter().map(|r| r.payload.as_ref()).collect::<Vec<_>>(),
            vec![&b"{\"id\":7}"[..], b"{\"id\":8}"]
        );
    }

    #[test]
    fn bad_payloads_are_dead_lettered_with_their_reason() {
        let sim = SimStorage::new();
        let mut w = open(&sim);
        publish(&mut w, 1, false, "cdr/a", "not json");
        publish(&mut w, 2, false, "cdr/a", &format!("\"{}\"", "x".repeat(2000)));
        publish(&mut w, 3, false, "nowhere", "x");
        assert_eq!(pkids(&w.drive(50_000, 0, true)), vec![1, 2, 3], "every one is acknowledged");
        let dead = records(&sim, DEADLETTER_STREAM);
        assert_eq!(dead.len(), 2);
        assert!(dead[0].attr(ATTR_REASON).unwrap().starts_with("invalid JSON"));
        assert_eq!(dead[0].payload.as_ref(), b"not json");
        assert!(dead[1].attr(ATTR_REASON).unwrap().contains("above record_bytes_max"));
        assert!(dead[1].payload.is_empty(), "oversize payloads are not kept");
        assert_eq!(dead[1].attr(ATTR_STREAM), Some("cdr"));
        assert!(records(&sim, "cdr").is_empty());
    }

    #[test]
    fn full_disk_stops_acks_and_resumes_without_loss() {
        let sim = SimStorage::new();
        let mut w = open(&sim);
        sim.set_faults(Faults { capacity_bytes: Some(sim.used_bytes() + 64), fail_syncs: 0 });
        publish(&mut w, 1, false, "cdr/a", "{\"n\":1}");
        publish(&mut w, 2, false, "cdr/a", "{\"n\":2}");
        assert!(w.drive(50_000, 0, false).is_empty());
        assert!(w.any_full());
        assert!(w.drive(100_000, 0, false).is_empty(), "still full: still no acks");
        sim.set_faults(Faults::default());
        assert_eq!(pkids(&w.drive(150_000, 0, false)), vec![1, 2]);
        assert!(!w.any_full());
        assert_eq!(records(&sim, "cdr").len(), 2);
    }

    #[test]
    fn drop_oldest_writes_a_gap_where_the_data_was() {
        let sim = SimStorage::new();
        let mut w = open(&sim);
        let payload = "s".repeat(300);
        let mut acked = 0;
        for i in 0..200u16 {
            publish(&mut w, i + 1, false, "sensors/t", &payload);
            acked += w.drive(u64::from(i) * 1000, 0, false).len();
        }
        acked += w.drive(1_000_000, 0, true).len();
        assert_eq!(acked, 200, "drop_oldest never stops acks");
        let cfg = LogConfig { read_only: true, ..LogConfig::default() };
        let mut log = Log::open(Arc::new(sim.clone()), &stream_dir(Path::new("/data"), "sensors"), cfg, 0).unwrap();
        assert!(log.disk_bytes() <= 16 << 10, "{}", log.disk_bytes());
        let read = log.read(log.start_offset(), 1 << 30).unwrap();
        let gaps: Vec<_> = read.batches.iter().filter(|b| b.batch.header().is_gap()).collect();
        assert!(!gaps.is_empty());
        assert_eq!(gaps[0].offset, Offset(0), "the first gap covers the first seqs");
        // Seqs stay contiguous: gaps and data tile [0, 200).
        let mut next = 0;
        for b in &read.batches {
            assert_eq!(b.offset.0, next);
            assert_eq!(b.batch.header().base_seq.0, next);
            next = b.end().0;
        }
        assert_eq!(next, 200);
    }

    #[test]
    fn retention_age_replaces_old_segments_with_gaps() {
        let sim = SimStorage::new();
        let text =
            CONFIG.replace("full_policy = \"drop_oldest\"", "full_policy = \"drop_oldest\"\nretention_age = \"1h\"");
        let config = Config::parse(&text, Path::new("t.toml")).unwrap();
        let conns = vec![ConnInfo { client_id: "c1".into(), inflight_max: 100, refuse_when_full: false }];
        let metrics = Arc::new(Metrics::new(&config.stream_names(), &["main"]));
        let mut w = Writer::open(&config, Epoch(9), Arc::new(sim.clone()), conns, metrics, 0).unwrap();
        for i in 0..100u16 {
            let payload: String = (0..40)
                .map(|j| format!("{:08x}", (u64::from(i) * 7919 + j).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32))
                .collect();
            publish(&mut w, i + 1, false, "sensors/t", &payload); // event time 1000 ms
            w.drive(u64::from(i) * 1000, 2000, false);
        }
        assert_eq!(w.streams[2].name, "sensors");
        let segments_before = lock(&w.streams[2].log).segments().len();
        assert!(segments_before > 2, "{:?}", lock(&w.streams[2].log).segments());
        // Two hours later, everything closed is past retention.
        w.drive(10_000_000, 2 * 3_600_000, false);
        let segs = lock(&w.streams[2].log).segments();
        assert_eq!(segs.len(), segments_before);
        assert!(segs[..segs.len() - 1].iter().all(|s| s.bytes <= GAP_SEGMENT_BYTES_MAX), "{segs:?}");
        let snap = w.metrics.snapshot();
        let sensors = snap.streams.iter().find(|s| s.name == "sensors").unwrap();
        assert!(sensors.dropped(DropReason::RetentionExpired) > 0);
    }

    fn listen_writer(sim: &SimStorage) -> Writer {
        let text = format!("{CONFIG}\n[listen]\ntcp = [\"127.0.0.1:1\"]\nallow_anonymous = true\n");
        let config = Config::parse(&text, Path::new("t.toml")).unwrap();
        let conns = vec![ConnInfo { client_id: "c1".into(), inflight_max: 100, refuse_when_full: false }];
        let metrics = Arc::new(Metrics::new(&config.stream_names(), &["main"]));
        Writer::open(&config, Epoch(9), Arc::new(sim.clone()), conns, metrics, 0).unwrap()
    }

    fn attach(w: &mut Writer, conn: usize, client_id: &str, clean: bool) {
        let info = ConnInfo { client_id: client_id.into(), inflight_max: 10, refuse_when_full: true };
        assert!(!w.handle_input(Input::Attach { conn, info, clean, acks: None }));
    }

    fn publish_on(w: &mut Writer, conn: usize, pkid: u16, dup: bool, payload: &str) {
        let msg = Incoming {
            conn,
            pkid,
            qos: 1,
            dup,
            will: false,
            topic: "cdr/a".into(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            ts_ms: 1000,
            received_us: 0,
        };
        assert!(!w.handle_input(Input::Publish(msg)));
    }

    #[test]
    fn listen_connections_attach_detach_and_keep_their_redelivery_memory() {
        let sim = SimStorage::new();
        let mut w = listen_writer(&sim);
        attach(&mut w, 3, "dev-a", false);
        publish_on(&mut w, 3, 5, false, "{\"id\":5}");
        // Dropped before the ack: the queued ack is forgotten, the memory is kept.
        assert!(!w.handle_input(Input::Detach { conn: 3 }));
        assert!(w.drive(20_000, 0, false).is_empty());
        attach(&mut w, 1, "dev-a", false);
        publish_on(&mut w, 1, 5, true, "{\"id\":5}");
        let acks = w.drive(40_000, 0, false);
        assert_eq!(
            acks.iter().map(|a| (a.conn, a.pkid, a.outcome)).collect::<Vec<_>>(),
            vec![(1, 5, Outcome::Duplicate)]
        );
        // A clean start forgets it: the same resend is new data then.
        assert!(!w.handle_input(Input::Detach { conn: 1 }));
        attach(&mut w, 1, "dev-a", true);
        publish_on(&mut w, 1, 5, true, "{\"id\":5}");
        assert_eq!(w.drive(60_000, 0, false)[0].outcome, Outcome::Stored);
        assert_eq!(records(&sim, "cdr").len(), 2);
        // After a restart the log's tail brings the memory back, under the client id.
        drop(w);
        let mut w = listen_writer(&sim);
        assert_eq!(w.parked_clients(), vec!["dev-a".to_string()]);
        attach(&mut w, 1, "dev-a", false);
        publish_on(&mut w, 1, 5, true, "{\"id\":5}");
        assert_eq!(w.drive(20_000, 0, false)[0].outcome, Outcome::Duplicate);
        assert_eq!(records(&sim, "cdr").len(), 2);
    }

    #[test]
    fn a_full_stream_refuses_listen_v5_publishes_and_holds_the_others() {
        let sim = SimStorage::new();
        let mut w = listen_writer(&sim);
        attach(&mut w, 1, "dev-v5", false);
        sim.set_faults(Faults { capacity_bytes: Some(sim.used_bytes() + 64), fail_syncs: 0 });
        publish(&mut w, 1, false, "cdr/a", "{\"n\":1}");
        assert!(w.drive(50_000, 0, false).is_empty());
        assert!(w.any_full());
        // The device that can be told is told at once; the broker connection waits.
        publish_on(&mut w, 1, 9, false, "{\"n\":2}");
        let acks = w.drive(60_000, 0, false);
        assert_eq!(
            acks.iter().map(|a| (a.conn, a.pkid, a.outcome)).collect::<Vec<_>>(),
            vec![(1, 9, Outcome::QuotaExceeded)]
        );
        sim.set_faults(Faults::default());
        assert_eq!(pkids(&w.drive(150_000, 0, false)), vec![1]);
        assert_eq!(records(&sim, "cdr").len(), 1, "the refused message was not stored");
        publish_on(&mut w, 1, 10, false, "not json");
        assert_eq!(w.drive(200_000, 0, true)[0].outcome, Outcome::PayloadInvalid);
        // QoS 0 of a device on a full stream is dropped and counted, not held in memory.
        sim.set_faults(Faults { capacity_bytes: Some(sim.used_bytes() + 64), fail_syncs: 0 });
        publish(&mut w, 11, false, "cdr/a", "{\"n\":3}");
        w.drive(300_000, 0, false);
        assert!(w.any_full());
        let msg = Incoming {
            conn: 1,
            pkid: 0,
            qos: 0,
            dup: false,
            will: false,
            topic: "cdr/a".into(),
            payload: Bytes::from_static(b"{}"),
            ts_ms: 0,
            received_us: 0,
        };
        w.handle_input(Input::Publish(msg));
        assert_eq!(w.qos0_dropped_full().load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn a_burst_never_makes_a_batch_above_batch_bytes_max() {
        let sim = SimStorage::new();
        let mut w = open(&sim);
        let payload = format!("\"{}\"", "x".repeat(900));
        for i in 0..100u16 {
            publish(&mut w, i + 1, false, "cdr/a", &payload);
        }
        assert_eq!(w.drive(50_000, 0, true).len(), 100);
        let cfg = LogConfig { read_only: true, ..LogConfig::default() };
        let mut log = Log::open(Arc::new(sim.clone()), &stream_dir(Path::new("/data"), "cdr"), cfg, 0).unwrap();
        let read = log.read(log.start_offset(), 1 << 30).unwrap();
        assert!(read.batches.len() >= 12, "{}", read.batches.len());
        for b in &read.batches {
            assert!(b.batch.header().raw_len <= 8 << 10, "batch of {} raw bytes", b.batch.header().raw_len);
        }
        assert_eq!(read.batches.iter().map(|b| b.batch.header().record_count).sum::<u32>(), 100);
    }
}
