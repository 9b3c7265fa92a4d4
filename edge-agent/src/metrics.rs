//! Every metric of the edge agent, declared once: name, help, type and labels.
//!
//! Labels are bounded by config. Stream and connection names are fixed when the agent starts
//! ([`Metrics::new`]) and resolved once to a [`StreamId`] / [`ConnectionId`], so the hot path is
//! an array index and a relaxed atomic add, no lock and no map. Drop reasons come from the fixed
//! [`DropReason`]; the series of every stream × reason exist from the start (at 0), so `rate()`
//! sees the first drop.
//!
//! Unrouted records have no stream: they are counted by the unlabelled
//! `backhaul_edge_records_unrouted_total`, not as `records_dropped_total{stream=""}`, whose
//! stream label would name no stream and whose series would sit among the real ones in every
//! `sum by (stream)`.
//!
//! Per stream, `received = appended + dropped{too_large, invalid_payload, duplicate}` once
//! nothing is in flight; `dropped{disk_full_drop_oldest}` counts records evicted after they
//! were appended. On shaped streams (`crate::shape`) one message may decode into several
//! records (CSV lines, a CDR file) and `dropped{filtered}` counts records the rules dropped or
//! folded into a window, so there `received` counts messages and `appended` records; each
//! rule's own counts are `backhaul_edge_shape_rule_records_total{stream,rule,outcome}`.
//!
//! Exposition: Prometheus text format 0.0.4 ([`Snapshot::render`]), and back
//! ([`Snapshot::parse`], used by `edge-agent status`):
//!
//! ```text
//! # HELP backhaul_edge_records_received_total Records routed to the stream.
//! # TYPE backhaul_edge_records_received_total counter
//! backhaul_edge_records_received_total{stream="cdr"} 1200
//! …
//! backhaul_edge_receive_to_ack_seconds_bucket{le="0.0005"} 3
//! …
//! backhaul_edge_receive_to_ack_seconds_bucket{le="+Inf"} 1200
//! backhaul_edge_receive_to_ack_seconds_sum 4.81
//! backhaul_edge_receive_to_ack_seconds_count 1200
//! ```

use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use shared::ids::Offset;
use thiserror::Error;

/// Upper bounds (`le`) of the receive-to-ack histogram's buckets in microseconds, 0.5 ms to
/// 10 s; a `+Inf` bucket follows. Fixed, so every agent's histograms aggregate.
pub const RECEIVE_TO_ACK_BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];

/// One observation adds at most this much to the histogram's `_sum`, so a clock jump cannot wrap
/// it (a counter that wraps breaks `rate()`). An hour is far beyond any healthy ack; the `+Inf`
/// bucket still counts it.
const OBSERVATION_US_MAX: u64 = 3_600 * 1_000_000;

/// A stream's index in [`Metrics`], resolved once from its name by [`Metrics::stream_id`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamId(usize);

/// A broker connection's index in [`Metrics`], resolved once by [`Metrics::connection_id`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionId(usize);

/// Why records of a stream were dropped: the `reason` label of
/// `backhaul_edge_records_dropped_total`. Unrouted records have their own counter (module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Larger than the stream's record size limit.
    TooLarge,
    /// The payload could not be decoded in the stream's format; it went to the dead-letter stream.
    InvalidPayload,
    /// Evicted by the `drop_oldest` disk-full policy after being appended.
    DiskFullDropOldest,
    /// A redelivery already in the log, or a duplicate within the stream's dedup window.
    Duplicate,
    /// Older than the stream's `retention_age` before it was forwarded; replaced by a gap.
    RetentionExpired,
    /// Dropped by a shaping rule (drop, keep, sample, dedup) or folded into a downsampled
    /// aggregate; per rule in `backhaul_edge_shape_rule_records_total`.
    Filtered,
}

impl DropReason {
    /// Every reason, in label order.
    pub const ALL: [DropReason; 6] = [
        DropReason::TooLarge,
        DropReason::InvalidPayload,
        DropReason::DiskFullDropOldest,
        DropReason::Duplicate,
        DropReason::RetentionExpired,
        DropReason::Filtered,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::TooLarge => "too_large",
            DropReason::InvalidPayload => "invalid_payload",
            DropReason::DiskFullDropOldest => "disk_full_drop_oldest",
            DropReason::Duplicate => "duplicate",
            DropReason::RetentionExpired => "retention_expired",
            DropReason::Filtered => "filtered",
        }
    }

    /// The reason whose label is `label`.
    pub fn from_label(label: &str) -> Option<DropReason> {
        DropReason::ALL.into_iter().find(|r| r.label() == label)
    }

    /// Index into [`StreamSnapshot::dropped`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The agent's metrics, shared via `Arc`. Every method takes `&self` and touches only atomics.
///
/// Ids must come from this instance's [`Metrics::stream_id`] / [`Metrics::connection_id`]; an id
/// from another instance may index out of bounds and panic.
#[derive(Debug)]
pub struct Metrics {
    streams: Box<[StreamMetrics]>,
    connections: Box<[ConnectionMetrics]>,
    records_unrouted: AtomicU64,
    broker_dropped_messages: AtomicU64,
    receive_to_ack: Histogram,
    /// Per shaping rule: (stream, rule, counters), registered once at start.
    shape_rules: std::sync::Mutex<Vec<(String, String, std::sync::Arc<crate::shape::rules::RuleCounters>)>>,
}

impl Metrics {
    /// Metrics for these streams and broker connections, all at 0.
    ///
    /// # Panics
    /// If a name repeats within `streams` or within `connections` (config validation refuses
    /// that; a repeated series would make the exposition invalid).
    pub fn new<S: AsRef<str>, C: AsRef<str>>(streams: &[S], connections: &[C]) -> Metrics {
        assert_unique("stream", streams);
        assert_unique("connection", connections);
        Metrics {
            streams: streams.iter().map(|s| StreamMetrics::new(s.as_ref())).collect(),
            connections: connections.iter().map(|c| ConnectionMetrics::new(c.as_ref())).collect(),
            records_unrouted: AtomicU64::new(0),
            broker_dropped_messages: AtomicU64::new(0),
            receive_to_ack: Histogram::default(),
            shape_rules: std::sync::Mutex::default(),
        }
    }

    /// Registers the counters of stream `stream`'s shaping rules (the writer does, at start);
    /// they are rendered as `backhaul_edge_shape_rule_records_total{stream,rule,outcome}`.
    pub fn register_shape_rules(
        &self,
        stream: &str,
        rules: Vec<(String, std::sync::Arc<crate::shape::rules::RuleCounters>)>,
    ) {
        let mut all = self.shape_rules.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|(s, _, _)| s != stream);
        all.extend(rules.into_iter().map(|(rule, c)| (stream.to_owned(), rule, c)));
    }

    /// (stream, rule, kept, dropped, changed) of every shaping rule.
    pub fn shape_rule_counts(&self) -> Vec<(String, String, u64, u64, u64)> {
        let all = self.shape_rules.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.iter()
            .map(|(s, r, c)| {
                let (k, d, ch) = c.load();
                (s.clone(), r.clone(), k, d, ch)
            })
            .collect()
    }

    /// The id of stream `name`, if it was known at start.
    pub fn stream_id(&self, name: &str) -> Option<StreamId> {
        self.streams.iter().position(|s| s.name == name).map(StreamId)
    }

    /// The id of broker connection `name`, if it was known at start.
    pub fn connection_id(&self, name: &str) -> Option<ConnectionId> {
        self.connections.iter().position(|c| c.name == name).map(ConnectionId)
    }

    /// `records` routed to `stream`.
    #[inline]
    pub fn add_received(&self, stream: StreamId, records: u64) {
        self.streams[stream.0].received.fetch_add(records, Relaxed);
    }

    /// `records` appended to `stream`'s log.
    #[inline]
    pub fn add_appended(&self, stream: StreamId, records: u64) {
        self.streams[stream.0].appended.fetch_add(records, Relaxed);
    }

    /// `records` of `stream` dropped for `reason`.
    #[inline]
    pub fn add_dropped(&self, stream: StreamId, reason: DropReason, records: u64) {
        self.streams[stream.0].dropped[reason.index()].fetch_add(records, Relaxed);
    }

    /// `records` that matched no stream's topic filter.
    #[inline]
    pub fn add_unrouted(&self, records: u64) {
        self.records_unrouted.fetch_add(records, Relaxed);
    }

    /// One batch of `stream` appended: `raw_bytes` of records, `compressed_bytes` as written.
    #[inline]
    pub fn add_batch(&self, stream: StreamId, raw_bytes: u64, compressed_bytes: u64) {
        let s = &self.streams[stream.0];
        s.batches.fetch_add(1, Relaxed);
        s.batch_raw_bytes.fetch_add(raw_bytes, Relaxed);
        s.batch_compressed_bytes.fetch_add(compressed_bytes, Relaxed);
    }

    /// An append to `stream`'s log failed.
    #[inline]
    pub fn add_append_error(&self, stream: StreamId) {
        self.streams[stream.0].append_errors.fetch_add(1, Relaxed);
    }

    /// `stream`'s log now holds `bytes` on disk.
    #[inline]
    pub fn set_log_bytes(&self, stream: StreamId, bytes: u64) {
        self.streams[stream.0].log_bytes.store(bytes, Relaxed);
    }

    /// `stream`'s log is committed (may be acked and read) below `offset`.
    #[inline]
    pub fn set_committed_offset(&self, stream: StreamId, offset: Offset) {
        self.streams[stream.0].committed_offset.store(offset.0, Relaxed);
    }

    /// The oldest record of `stream` not yet acknowledged by core is `age` old (zero if none).
    #[inline]
    pub fn set_oldest_unforwarded_age(&self, stream: StreamId, age: Duration) {
        self.streams[stream.0].oldest_unforwarded_age_us.store(micros(age), Relaxed);
    }

    /// Whether `stream`'s log is at its disk budget.
    #[inline]
    pub fn set_disk_full(&self, stream: StreamId, full: bool) {
        self.streams[stream.0].disk_full.store(full, Relaxed);
    }

    /// Whether broker connection `connection` is up.
    #[inline]
    pub fn set_broker_connected(&self, connection: ConnectionId, connected: bool) {
        self.connections[connection.0].connected.store(connected, Relaxed);
    }

    /// Broker connection `connection` connected again after losing its connection.
    #[inline]
    pub fn add_broker_reconnect(&self, connection: ConnectionId) {
        self.connections[connection.0].reconnects.fetch_add(1, Relaxed);
    }

    /// The broker's own count of dropped messages, from its `$SYS` topics.
    #[inline]
    pub fn set_broker_dropped_messages(&self, messages: u64) {
        self.broker_dropped_messages.store(messages, Relaxed);
    }

    /// A record was acked to its sender `latency` after it was received.
    #[inline]
    pub fn observe_receive_to_ack(&self, latency: Duration) {
        self.receive_to_ack.observe(latency);
    }

    /// The current values. Each value is read atomically on its own, not all at one instant.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            streams: self.streams.iter().map(StreamMetrics::snapshot).collect(),
            connections: self.connections.iter().map(ConnectionMetrics::snapshot).collect(),
            records_unrouted: self.records_unrouted.load(Relaxed),
            broker_dropped_messages: self.broker_dropped_messages.load(Relaxed),
            receive_to_ack: self.receive_to_ack.snapshot(),
        }
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = self.snapshot().render();
        let rules = self.shape_rule_counts();
        if !rules.is_empty() {
            header(&mut out, &SHAPE_RULE_RECORDS);
            for (stream, rule, kept, dropped, changed) in rules {
                for (outcome, n) in [("kept", kept), ("dropped", dropped), ("changed", changed)] {
                    let labels = [("stream", stream.as_str()), ("rule", rule.as_str()), ("outcome", outcome)];
                    sample(&mut out, SHAPE_RULE_RECORDS.name, &labels, n.into());
                }
            }
        }
        out
    }
}

/// The agent's metrics as plain numbers: from [`Metrics::snapshot`] or parsed from an
/// exposition by [`Snapshot::parse`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Per stream, in the order given at start.
    pub streams: Vec<StreamSnapshot>,
    /// Per broker connection, in the order given at start.
    pub connections: Vec<ConnectionSnapshot>,
    /// `backhaul_edge_records_unrouted_total`.
    pub records_unrouted: u64,
    /// `backhaul_edge_broker_dropped_messages`.
    pub broker_dropped_messages: u64,
    /// `backhaul_edge_receive_to_ack_seconds`.
    pub receive_to_ack: HistogramSnapshot,
}

/// One stream's metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamSnapshot {
    /// The stream's name (its `stream` label).
    pub name: String,
    /// Records routed to the stream.
    pub received: u64,
    /// Records appended to its log.
    pub appended: u64,
    /// Records dropped, indexed by [`DropReason::index`].
    pub dropped: [u64; DropReason::ALL.len()],
    /// Bytes of records in its batches, before compression.
    pub batch_raw_bytes: u64,
    /// Bytes of its batches as written.
    pub batch_compressed_bytes: u64,
    /// Batches appended.
    pub batches: u64,
    /// Bytes its log holds on disk.
    pub log_bytes: u64,
    /// Its log is committed below this offset.
    pub committed_offset: u64,
    /// Age in seconds of its oldest record not yet acknowledged by core.
    pub oldest_unforwarded_age_seconds: f64,
    /// Whether its log is at its disk budget.
    pub disk_full: bool,
    /// Failed appends.
    pub append_errors: u64,
}

impl StreamSnapshot {
    /// Records dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    /// Records dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().fold(0, |a, &b| a.saturating_add(b))
    }
}

/// One broker connection's metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnectionSnapshot {
    /// The connection's name (its `connection` label).
    pub name: String,
    /// Whether it is up.
    pub connected: bool,
    /// How often it reconnected.
    pub reconnects: u64,
}

/// A histogram's cumulative buckets, sum and count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative buckets by increasing `le`, the last one `+Inf` (`f64::INFINITY`).
    pub buckets: Vec<Bucket>,
    /// Sum of the observations, in seconds.
    pub sum_seconds: f64,
    /// Number of observations (equals the `+Inf` bucket).
    pub count: u64,
}

/// One cumulative histogram bucket: `count` observations were at most `le` seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    /// Upper bound in seconds; `f64::INFINITY` for `+Inf`.
    pub le: f64,
    /// Observations at most `le`.
    pub count: u64,
}

impl HistogramSnapshot {
    /// The `q`-quantile (0 ≤ q ≤ 1) in seconds, interpolated linearly within its bucket as
    /// Prometheus' `histogram_quantile` does. `None` without observations;
    /// `Some(f64::INFINITY)` if it lies beyond the highest finite bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let (mut lower, mut below) = (0.0, 0_u64);
        for b in &self.buckets {
            if b.count as f64 >= rank {
                if b.le.is_infinite() {
                    return Some(f64::INFINITY);
                }
                if b.count == below {
                    return Some(lower);
                }
                return Some(lower + (b.le - lower) * (rank - below as f64) / (b.count - below) as f64);
            }
            (lower, below) = (b.le, b.count);
        }
        // The buckets end below `count`: an exposition without `+Inf`.
        Some(f64::INFINITY)
    }
}

/// An exposition that [`Snapshot::parse`] cannot read.
#[derive(Debug, Error)]
#[error("line {line}: {reason}: {text:?}")]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    /// What is wrong.
    pub reason: &'static str,
    /// The line, cut to 120 characters.
    pub text: String,
}

impl Snapshot {
    /// Prometheus text exposition format 0.0.4: `# HELP` and `# TYPE` per family, then one
    /// `name{labels} value` line per series.
    pub fn render(&self) -> String {
        let series = self.streams.len() * (STREAM_FAMILIES.len() + DropReason::ALL.len()) + 3 * self.connections.len();
        let mut out = String::with_capacity(4096 + 96 * series);
        let o = &mut out;
        // Received, appended, then dropped: the record counts side by side.
        let (records, rest) = STREAM_FAMILIES.split_at(2);
        render_stream_families(o, records, &self.streams);
        header(o, &RECORDS_DROPPED);
        for s in &self.streams {
            for r in DropReason::ALL {
                sample(o, RECORDS_DROPPED.name, &[("stream", &s.name), ("reason", r.label())], s.dropped(r).into());
            }
        }
        render_stream_families(o, rest, &self.streams);
        header(o, &RECORDS_UNROUTED);
        sample(o, RECORDS_UNROUTED.name, &[], self.records_unrouted.into());
        header(o, &BROKER_CONNECTED);
        for c in &self.connections {
            sample(o, BROKER_CONNECTED.name, &[("connection", &c.name)], c.connected.into());
        }
        header(o, &BROKER_RECONNECTS);
        for c in &self.connections {
            sample(o, BROKER_RECONNECTS.name, &[("connection", &c.name)], c.reconnects.into());
        }
        header(o, &BROKER_DROPPED_MESSAGES);
        sample(o, BROKER_DROPPED_MESSAGES.name, &[], self.broker_dropped_messages.into());
        render_histogram(o, &RECEIVE_TO_ACK, &self.receive_to_ack);
        out
    }

    /// Reads an exposition of this agent's metrics (as [`Snapshot::render`] writes it). Series
    /// of unknown names or drop reasons are skipped, so a newer agent can be read; streams and
    /// connections come in the order first seen.
    pub fn parse(text: &str) -> Result<Snapshot, ParseError> {
        let mut snap = Snapshot::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fail = |reason| ParseError { line: i + 1, reason, text: line.chars().take(120).collect() };
            let s = parse_sample(line).map_err(fail)?;
            snap.apply(&s).map_err(fail)?;
        }
        snap.receive_to_ack.buckets.sort_by(|a, b| a.le.total_cmp(&b.le));
        Ok(snap)
    }

    fn apply(&mut self, s: &Sample<'_>) -> Result<(), &'static str> {
        if let Some(f) = STREAM_FAMILIES.iter().find(|f| f.family.name == s.name) {
            (f.set)(self.stream_mut(s.label("stream")?), s.value);
        } else if s.name == RECORDS_DROPPED.name {
            let stream = self.stream_mut(s.label("stream")?);
            if let Some(r) = DropReason::from_label(&s.label("reason")?) {
                stream.dropped[r.index()] = s.value.as_u64();
            }
        } else if s.name == RECORDS_UNROUTED.name {
            self.records_unrouted = s.value.as_u64();
        } else if s.name == BROKER_CONNECTED.name {
            self.connection_mut(s.label("connection")?).connected = s.value.as_bool();
        } else if s.name == BROKER_RECONNECTS.name {
            self.connection_mut(s.label("connection")?).reconnects = s.value.as_u64();
        } else if s.name == BROKER_DROPPED_MESSAGES.name {
            self.broker_dropped_messages = s.value.as_u64();
        } else if let Some(suffix) = s.name.strip_prefix(RECEIVE_TO_ACK.name) {
            let h = &mut self.receive_to_ack;
            match suffix {
                "_bucket" => {
                    let le = s.label("le")?;
                    let le = if le == "+Inf" { f64::INFINITY } else { le.parse().map_err(|_| "bad le")? };
                    h.buckets.push(Bucket { le, count: s.value.as_u64() });
                }
                "_sum" => h.sum_seconds = s.value.as_f64(),
                "_count" => h.count = s.value.as_u64(),
                _ => {}
            }
        }
        Ok(())
    }

    fn stream_mut(&mut self, name: String) -> &mut StreamSnapshot {
        let i = match self.streams.iter().position(|s| s.name == name) {
            Some(i) => i,
            None => {
                self.streams.push(StreamSnapshot { name, ..StreamSnapshot::default() });
                self.streams.len() - 1
            }
        };
        &mut self.streams[i]
    }

    fn connection_mut(&mut self, name: String) -> &mut ConnectionSnapshot {
        let i = match self.connections.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                self.connections.push(ConnectionSnapshot { name, ..ConnectionSnapshot::default() });
                self.connections.len() - 1
            }
        };
        &mut self.connections[i]
    }
}

// ---- The declarations: every family the agent exports. ----

/// A metric family's name, help and type.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
}

/// A family with one series per stream and a scalar value, with its accessors for
/// [`Snapshot::render`] and [`Snapshot::parse`].
struct StreamFamily {
    family: Family,
    value: fn(&StreamSnapshot) -> Value,
    set: fn(&mut StreamSnapshot, Value),
}

const fn family(name: &'static str, kind: &'static str, help: &'static str) -> Family {
    Family { name, help, kind }
}

static STREAM_FAMILIES: [StreamFamily; 10] = [
    StreamFamily {
        family: family("backhaul_edge_records_received_total", "counter", "Records routed to the stream."),
        value: |s| s.received.into(),
        set: |s, v| s.received = v.as_u64(),
    },
    StreamFamily {
        family: family("backhaul_edge_records_appended_total", "counter", "Records appended to the stream's log."),
        value: |s| s.appended.into(),
        set: |s, v| s.appended = v.as_u64(),
    },
    StreamFamily {
        family: family(
            "backhaul_edge_batch_raw_bytes_total",
            "counter",
            "Bytes of records in the stream's appended batches, before compression.",
        ),
        value: |s| s.batch_raw_bytes.into(),
        set: |s, v| s.batch_raw_bytes = v.as_u64(),
    },
    StreamFamily {
        family: family(
            "backhaul_edge_batch_compressed_bytes_total",
            "counter",
            "Bytes of the stream's appended batches as written, after compression.",
        ),
        value: |s| s.batch_compressed_bytes.into(),
        set: |s, v| s.batch_compressed_bytes = v.as_u64(),
    },
    StreamFamily {
        family: family("backhaul_edge_batches_total", "counter", "Batches appended to the stream's log."),
        value: |s| s.batches.into(),
        set: |s, v| s.batches = v.as_u64(),
    },
    StreamFamily {
        family: family(
            "backhaul_edge_log_bytes",
            "gauge",
            "Bytes the stream's log holds on disk, segments and indexes.",
        ),
        value: |s| s.log_bytes.into(),
        set: |s, v| s.log_bytes = v.as_u64(),
    },
    StreamFamily {
        family: family(
            "backhaul_edge_log_committed_offset",
            "gauge",
            "Offset below which the stream's log is committed: durable as its fsync policy says, ackable, readable.",
        ),
        value: |s| s.committed_offset.into(),
        set: |s, v| s.committed_offset = v.as_u64(),
    },
    StreamFamily {
        family: family(
            "backhaul_edge_oldest_unforwarded_age_seconds",
            "gauge",
            "Age of the stream's oldest record not yet acknowledged by core-ingest; 0 when none is waiting.",
        ),
        value: |s| Value::Float(s.oldest_unforwarded_age_seconds),
        set: |s, v| s.oldest_unforwarded_age_seconds = v.as_f64(),
    },
    StreamFamily {
        family: family("backhaul_edge_disk_full", "gauge", "1 while the stream's log is at its disk budget, else 0."),
        value: |s| s.disk_full.into(),
        set: |s, v| s.disk_full = v.as_bool(),
    },
    StreamFamily {
        family: family("backhaul_edge_append_errors_total", "counter", "Appends to the stream's log that failed."),
        value: |s| s.append_errors.into(),
        set: |s, v| s.append_errors = v.as_u64(),
    },
];

const RECORDS_DROPPED: Family = family(
    "backhaul_edge_records_dropped_total",
    "counter",
    "Records of the stream not kept, by reason (invalid_payload: sent to the dead-letter stream; \
     disk_full_drop_oldest: evicted after append).",
);
const SHAPE_RULE_RECORDS: Family = family(
    "backhaul_edge_shape_rule_records_total",
    "counter",
    "Records each shaping rule let through unchanged (kept), dropped (or folded into a downsampled \
     aggregate) or changed.",
);
const RECORDS_UNROUTED: Family =
    family("backhaul_edge_records_unrouted_total", "counter", "Records whose topic matched no stream; dropped.");
const BROKER_CONNECTED: Family =
    family("backhaul_edge_broker_connected", "gauge", "1 while the broker connection is up, else 0.");
const BROKER_RECONNECTS: Family =
    family("backhaul_edge_broker_reconnects_total", "counter", "Times the broker connection was established again.");
const BROKER_DROPPED_MESSAGES: Family = family(
    "backhaul_edge_broker_dropped_messages",
    "gauge",
    "Messages the broker itself dropped, from its $SYS counters; any rise means loss before the agent.",
);
const RECEIVE_TO_ACK: Family = family(
    "backhaul_edge_receive_to_ack_seconds",
    "histogram",
    "Time from receiving a record to acknowledging it to its sender (after the durable append).",
);

// ---- Helpers. ----

#[derive(Debug)]
struct StreamMetrics {
    name: String,
    received: AtomicU64,
    appended: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    batch_raw_bytes: AtomicU64,
    batch_compressed_bytes: AtomicU64,
    batches: AtomicU64,
    log_bytes: AtomicU64,
    committed_offset: AtomicU64,
    oldest_unforwarded_age_us: AtomicU64,
    disk_full: AtomicBool,
    append_errors: AtomicU64,
}

impl StreamMetrics {
    fn new(name: &str) -> StreamMetrics {
        StreamMetrics {
            name: name.to_owned(),
            received: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            dropped: Default::default(),
            batch_raw_bytes: AtomicU64::new(0),
            batch_compressed_bytes: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            log_bytes: AtomicU64::new(0),
            committed_offset: AtomicU64::new(0),
            oldest_unforwarded_age_us: AtomicU64::new(0),
            disk_full: AtomicBool::new(false),
            append_errors: AtomicU64::new(0),
        }
    }

    fn snapshot(&self) -> StreamSnapshot {
        StreamSnapshot {
            name: self.name.clone(),
            received: self.received.load(Relaxed),
            appended: self.appended.load(Relaxed),
            dropped: std::array::from_fn(|i| self.dropped[i].load(Relaxed)),
            batch_raw_bytes: self.batch_raw_bytes.load(Relaxed),
            batch_compressed_bytes: self.batch_compressed_bytes.load(Relaxed),
            batches: self.batches.load(Relaxed),
            log_bytes: self.log_bytes.load(Relaxed),
            committed_offset: self.committed_offset.load(Relaxed),
            oldest_unforwarded_age_seconds: seconds(self.oldest_unforwarded_age_us.load(Relaxed)),
            disk_full: self.disk_full.load(Relaxed),
            append_errors: self.append_errors.load(Relaxed),
        }
    }
}

#[derive(Debug)]
struct ConnectionMetrics {
    name: String,
    connected: AtomicBool,
    reconnects: AtomicU64,
}

impl ConnectionMetrics {
    fn new(name: &str) -> ConnectionMetrics {
        ConnectionMetrics { name: name.to_owned(), connected: AtomicBool::new(false), reconnects: AtomicU64::new(0) }
    }

    fn snapshot(&self) -> ConnectionSnapshot {
        ConnectionSnapshot {
            name: self.name.clone(),
            connected: self.connected.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
        }
    }
}

/// Per-bucket (not cumulative) counts, the last for `+Inf`; the count is their sum, so a
/// rendered `+Inf` bucket always equals `_count`.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; RECEIVE_TO_ACK_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, value: Duration) {
        let us = micros(value).min(OBSERVATION_US_MAX);
        let i = RECEIVE_TO_ACK_BUCKETS_US.partition_point(|&le| le < us);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0_u64;
        let les = RECEIVE_TO_ACK_BUCKETS_US.iter().map(|&us| seconds(us)).chain([f64::INFINITY]);
        let buckets: Vec<Bucket> = les
            .zip(&self.buckets)
            .map(|(le, n)| {
                cumulative = cumulative.saturating_add(n.load(Relaxed));
                Bucket { le, count: cumulative }
            })
            .collect();
        HistogramSnapshot { buckets, sum_seconds: seconds(self.sum_us.load(Relaxed)), count: cumulative }
    }
}

/// A sample's value: counters stay integers (an f64 would round above 2^53).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Value {
    Int(u64),
    Float(f64),
}

impl Value {
    fn parse(s: &str) -> Option<Value> {
        match s.parse::<u64>() {
            Ok(n) => Some(Value::Int(n)),
            Err(_) => match s {
                "+Inf" | "Inf" => Some(Value::Float(f64::INFINITY)),
                "-Inf" => Some(Value::Float(f64::NEG_INFINITY)),
                _ => s.parse::<f64>().ok().map(Value::Float),
            },
        }
    }

    fn as_u64(self) -> u64 {
        match self {
            Value::Int(n) => n,
            // Saturating: negative and NaN give 0.
            Value::Float(f) => f as u64,
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Value::Int(n) => n as f64,
            Value::Float(f) => f,
        }
    }

    fn as_bool(self) -> bool {
        self.as_f64() != 0.0
    }
}

impl From<u64> for Value {
    fn from(n: u64) -> Value {
        Value::Int(n)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Int(u64::from(b))
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::Int(n) => write!(f, "{n}"),
            Value::Float(x) if x.is_nan() => f.write_str("NaN"),
            Value::Float(x) if x.is_infinite() => f.write_str(if x > 0.0 { "+Inf" } else { "-Inf" }),
            // Rust prints the shortest decimal that reads back exactly, never an exponent.
            Value::Float(x) => write!(f, "{x}"),
        }
    }
}

/// One parsed `name{labels} value [timestamp]` line.
#[derive(Debug)]
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: Value,
}

impl Sample<'_> {
    fn label(&self, key: &str) -> Result<String, &'static str> {
        self.labels.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()).ok_or("missing label")
    }
}

fn parse_sample(line: &str) -> Result<Sample<'_>, &'static str> {
    let name_end = line.find(|c: char| c == '{' || c.is_ascii_whitespace()).ok_or("no value")?;
    let (name, mut rest) = line.split_at(name_end);
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        return Err("bad metric name");
    }
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start();
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("bad label")?;
            let key = rest[..eq].trim();
            let (value, r) = parse_label_value(rest[eq + 1..].trim_start())?;
            labels.push((key, value));
            rest = r.trim_start();
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    // A timestamp may follow the value; this agent writes none and it is ignored.
    let value = rest.split_ascii_whitespace().next().ok_or("no value")?;
    let value = Value::parse(value).ok_or("bad value")?;
    Ok(Sample { name, labels, value })
}

/// A quoted label value with `\\`, `\"` and `\n` escapes, and the text after it.
fn parse_label_value(s: &str) -> Result<(String, &str), &'static str> {
    let body = s.strip_prefix('"').ok_or("label value not quoted")?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &body[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, c)) => value.push(c),
                None => break,
            },
            c => value.push(c),
        }
    }
    Err("unterminated label value")
}

fn header(out: &mut String, f: &Family) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
    let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: Value) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape_label_value(out, v);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn render_stream_families(out: &mut String, families: &[StreamFamily], streams: &[StreamSnapshot]) {
    for f in families {
        header(out, &f.family);
        for s in streams {
            sample(out, f.family.name, &[("stream", &s.name)], (f.value)(s));
        }
    }
}

fn render_histogram(out: &mut String, f: &Family, h: &HistogramSnapshot) {
    header(out, f);
    let bucket = format!("{}_bucket", f.name);
    for b in &h.buckets {
        let le = Value::Float(b.le).to_string();
        sample(out, &bucket, &[("le", &le)], b.count.into());
    }
    sample(out, &format!("{}_sum", f.name), &[], Value::Float(h.sum_seconds));
    sample(out, &format!("{}_count", f.name), &[], h.count.into());
}

fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn assert_unique<S: AsRef<str>>(what: &str, names: &[S]) {
    let mut seen = HashSet::new();
    for n in names {
        assert!(seen.insert(n.as_ref()), "{what} name {:?} given twice", n.as_ref());
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn seconds(us: u64) -> f64 {
    // Both exact below 2^53 µs (285 years) and the division rounds once, so 250 µs prints
    // as 0.00025.
    us as f64 / 1e6
}

impl shared::admin::RenderMetrics for Metrics {
    fn render(&self) -> String {
        Metrics::render(self)
    }
}

// ---- listen mode ----------------------------------------------------------------------------

pub use listen::ListenMetrics;

/// Listen mode's counters, kept in their own module so their imports stay beside them.
mod listen {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};

    /// Counters of listen mode (`crate::listen`), rendered beside the agent's metrics. The
    /// `reason` label takes MQTT 5 reason codes: at most 256 values.
    #[derive(Debug, Default)]
    pub struct ListenMetrics {
        connections: AtomicUsize,
        accepted_total: AtomicU64,
        refused: Mutex<HashMap<u8, u64>>,
        closed_by_error_total: AtomicU64,
        wills_total: AtomicU64,
        qos0_dropped_full: Arc<AtomicU64>,
    }

    impl ListenMetrics {
        /// Metrics that also show the writer's count of QoS 0 messages dropped on full streams.
        pub fn new(qos0_dropped_full: Arc<AtomicU64>) -> Self {
            ListenMetrics { qos0_dropped_full, ..Self::default() }
        }

        /// Device connections open now.
        pub fn connections(&self) -> usize {
            self.connections.load(Ordering::Relaxed)
        }

        /// A connection was accepted on a listener (before its CONNECT).
        pub fn connection_opened(&self) {
            self.connections.fetch_add(1, Ordering::Relaxed);
        }

        /// A connection ended.
        pub fn connection_closed(&self) {
            self.connections.fetch_sub(1, Ordering::Relaxed);
        }

        /// A CONNECT was accepted.
        pub fn add_accepted(&self) {
            self.accepted_total.fetch_add(1, Ordering::Relaxed);
        }

        /// A connection closed for bad bytes, a size or a timeout.
        pub fn add_protocol_error(&self) {
            self.closed_by_error_total.fetch_add(1, Ordering::Relaxed);
        }

        /// A device's Will went to the writer (its connection failed).
        pub fn add_will(&self) {
            self.wills_total.fetch_add(1, Ordering::Relaxed);
        }

        /// A refusal with MQTT 5 reason `code` went to a device.
        pub fn refuse(&self, code: u8) {
            *self.refused.lock().unwrap_or_else(PoisonError::into_inner).entry(code).or_default() += 1;
        }

        /// Prometheus text.
        pub fn render(&self) -> String {
            let mut t = String::new();
            t.push_str("# HELP backhaul_edge_listen_connections Device connections open now (listen mode).\n");
            t.push_str("# TYPE backhaul_edge_listen_connections gauge\n");
            t.push_str(&format!("backhaul_edge_listen_connections {}\n", self.connections()));
            t.push_str("# HELP backhaul_edge_listen_accepted_total Device CONNECTs accepted.\n");
            t.push_str("# TYPE backhaul_edge_listen_accepted_total counter\n");
            t.push_str(&format!(
                "backhaul_edge_listen_accepted_total {}\n",
                self.accepted_total.load(Ordering::Relaxed)
            ));
            t.push_str("# HELP backhaul_edge_listen_refused_total Refusals sent to devices, by MQTT 5 reason code.\n");
            t.push_str("# TYPE backhaul_edge_listen_refused_total counter\n");
            let mut refused: Vec<(u8, u64)> =
                self.refused.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(k, v)| (*k, *v)).collect();
            refused.sort_unstable();
            for (code, n) in refused {
                t.push_str(&format!("backhaul_edge_listen_refused_total{{reason=\"0x{code:02x}\"}} {n}\n"));
            }
            t.push_str(
                "# HELP backhaul_edge_listen_protocol_errors_total Connections closed for bad bytes, size or timeouts.\n",
            );
            t.push_str("# TYPE backhaul_edge_listen_protocol_errors_total counter\n");
            t.push_str(&format!(
                "backhaul_edge_listen_protocol_errors_total {}\n",
                self.closed_by_error_total.load(Ordering::Relaxed)
            ));
            t.push_str("# HELP backhaul_edge_listen_wills_total Wills of failed device connections handed to the writer, stored like QoS 0 PUBLISHes.\n");
            t.push_str("# TYPE backhaul_edge_listen_wills_total counter\n");
            t.push_str(&format!("backhaul_edge_listen_wills_total {}\n", self.wills_total.load(Ordering::Relaxed)));
            t.push_str("# HELP backhaul_edge_listen_qos0_dropped_total QoS 0 messages dropped: their stream was full (backpressure).\n");
            t.push_str("# TYPE backhaul_edge_listen_qos0_dropped_total counter\n");
            t.push_str(&format!(
                "backhaul_edge_listen_qos0_dropped_total {}\n",
                self.qos0_dropped_full.load(Ordering::Relaxed)
            ));
            t
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn listen_metrics_render_every_series_with_bounded_labels() {
            let qos0 = Arc::new(AtomicU64::new(4));
            let m = ListenMetrics::new(qos0);
            m.connection_opened();
            m.connection_opened();
            m.connection_closed();
            m.add_accepted();
            m.refuse(0x86);
            m.refuse(0x86);
            m.refuse(0x97);
            m.add_protocol_error();
            m.add_will();
            let text = m.render();
            for line in [
                "backhaul_edge_listen_connections 1",
                "backhaul_edge_listen_accepted_total 1",
                "backhaul_edge_listen_refused_total{reason=\"0x86\"} 2",
                "backhaul_edge_listen_refused_total{reason=\"0x97\"} 1",
                "backhaul_edge_listen_protocol_errors_total 1",
                "backhaul_edge_listen_wills_total 1",
                "backhaul_edge_listen_qos0_dropped_total 4",
            ] {
                assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics::new(&["cdr", "sensors"], &["gw-fast", "gw \"slow\"\\2"])
    }

    /// Every non-comment line, split as `name{labels} value`; panics on anything else.
    fn samples(text: &str) -> Vec<(String, String, f64)> {
        assert!(text.ends_with('\n'));
        let mut out = Vec::new();
        for line in text.lines() {
            if let Some(comment) = line.strip_prefix("# ") {
                let mut words = comment.splitn(3, ' ');
                let kind = words.next().unwrap();
                assert!(kind == "HELP" || kind == "TYPE", "{line}");
                assert!(words.next().unwrap().starts_with("backhaul_edge_"), "{line}");
                let rest = words.next().unwrap();
                if kind == "TYPE" {
                    assert!(["counter", "gauge", "histogram"].contains(&rest), "{line}");
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let value: f64 = value.replace("+Inf", "inf").parse().unwrap_or_else(|_| panic!("value: {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => {
                    assert!(labels.ends_with('}'), "{line}");
                    (name, labels[..labels.len() - 1].to_owned())
                }
                None => (series, String::new()),
            };
            assert!(name.starts_with("backhaul_edge_"), "{line}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{line}");
            out.push((name.to_owned(), labels, value));
        }
        out
    }

    fn value(samples: &[(String, String, f64)], name: &str, labels: &str) -> f64 {
        let found: Vec<f64> = samples.iter().filter(|s| s.0 == name && s.1 == labels).map(|s| s.2).collect();
        assert_eq!(found.len(), 1, "{name}{{{labels}}}: {found:?}");
        found[0]
    }

    #[test]
    fn render_parses_line_by_line_and_has_every_series() {
        let m = metrics();
        let text = m.render();
        let s = samples(&text);
        for stream in ["cdr", "sensors"] {
            let l = format!("stream=\"{stream}\"");
            for f in &STREAM_FAMILIES {
                assert_eq!(value(&s, f.family.name, &l), 0.0);
            }
            for r in DropReason::ALL {
                value(&s, RECORDS_DROPPED.name, &format!("{l},reason=\"{}\"", r.label()));
            }
        }
        value(&s, BROKER_CONNECTED.name, "connection=\"gw-fast\"");
        value(&s, BROKER_CONNECTED.name, r#"connection="gw \"slow\"\\2""#);
        value(&s, RECORDS_UNROUTED.name, "");
        assert_eq!(value(&s, "backhaul_edge_receive_to_ack_seconds_count", ""), 0.0);
        // Each family is announced once, before its series.
        for f in STREAM_FAMILIES.iter().map(|f| &f.family).chain([&RECORDS_DROPPED, &RECEIVE_TO_ACK]) {
            assert_eq!(text.matches(&format!("# TYPE {} ", f.name)).count(), 1, "{}", f.name);
        }
    }

    #[test]
    fn counters_are_per_stream() {
        let m = metrics();
        let (cdr, sensors) = (m.stream_id("cdr").unwrap(), m.stream_id("sensors").unwrap());
        assert_eq!(m.stream_id("nope"), None);
        m.add_received(cdr, 5);
        m.add_received(sensors, 7);
        m.add_appended(cdr, 4);
        m.add_dropped(cdr, DropReason::TooLarge, 1);
        m.add_dropped(sensors, DropReason::DiskFullDropOldest, 3);
        m.add_batch(sensors, 1000, 300);
        m.add_batch(sensors, 500, 100);
        m.set_log_bytes(cdr, 4096);
        m.set_committed_offset(cdr, Offset(4));
        m.set_oldest_unforwarded_age(sensors, Duration::from_millis(2_500));
        m.set_disk_full(sensors, true);
        m.add_append_error(cdr);
        m.add_unrouted(2);
        let gw = m.connection_id("gw-fast").unwrap();
        m.set_broker_connected(gw, true);
        m.add_broker_reconnect(gw);
        m.set_broker_dropped_messages(9);

        let s = samples(&m.render());
        let (c, se) = ("stream=\"cdr\"", "stream=\"sensors\"");
        assert_eq!(value(&s, "backhaul_edge_records_received_total", c), 5.0);
        assert_eq!(value(&s, "backhaul_edge_records_received_total", se), 7.0);
        assert_eq!(value(&s, "backhaul_edge_records_appended_total", c), 4.0);
        assert_eq!(value(&s, "backhaul_edge_records_appended_total", se), 0.0);
        assert_eq!(value(&s, "backhaul_edge_records_dropped_total", &format!("{c},reason=\"too_large\"")), 1.0);
        assert_eq!(value(&s, "backhaul_edge_records_dropped_total", &format!("{se},reason=\"too_large\"")), 0.0);
        let evicted = format!("{se},reason=\"disk_full_drop_oldest\"");
        assert_eq!(value(&s, "backhaul_edge_records_dropped_total", &evicted), 3.0);
        assert_eq!(value(&s, "backhaul_edge_batches_total", se), 2.0);
        assert_eq!(value(&s, "backhaul_edge_batch_raw_bytes_total", se), 1500.0);
        assert_eq!(value(&s, "backhaul_edge_batch_compressed_bytes_total", se), 400.0);
        assert_eq!(value(&s, "backhaul_edge_log_bytes", c), 4096.0);
        assert_eq!(value(&s, "backhaul_edge_log_committed_offset", c), 4.0);
        assert_eq!(value(&s, "backhaul_edge_oldest_unforwarded_age_seconds", se), 2.5);
        assert_eq!(value(&s, "backhaul_edge_disk_full", se), 1.0);
        assert_eq!(value(&s, "backhaul_edge_disk_full", c), 0.0);
        assert_eq!(value(&s, "backhaul_edge_append_errors_total", c), 1.0);
        assert_eq!(value(&s, "backhaul_edge_records_unrouted_total", ""), 2.0);
        assert_eq!(value(&s, "backhaul_edge_broker_connected", "connection=\"gw-fast\""), 1.0);
        assert_eq!(value(&s, "backhaul_edge_broker_reconnects_total", "connection=\"gw-fast\""), 1.0);
        assert_eq!(value(&s, "backhaul_edge_broker_dropped_messages", ""), 9.0);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_equals_count() {
        let m = metrics();
        for ms in [0, 1, 1, 3, 40, 700, 9_000, 10_000, 60_000] {
            m.observe_receive_to_ack(Duration::from_millis(ms));
        }
        m.observe_receive_to_ack(Duration::from_micros(500)); // exactly on a bound: counts in it
        let s = samples(&m.render());
        let buckets: Vec<(String, f64)> = s
            .iter()
            .filter(|s| s.0 == "backhaul_edge_receive_to_ack_seconds_bucket")
            .map(|s| (s.1.clone(), s.2))
            .collect();
        assert_eq!(buckets.len(), RECEIVE_TO_ACK_BUCKETS_US.len() + 1);
        assert_eq!(buckets[0], ("le=\"0.0005\"".to_owned(), 2.0));
        assert_eq!(buckets[1], ("le=\"0.001\"".to_owned(), 4.0));
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
        assert_eq!(buckets[buckets.len() - 2], ("le=\"10\"".to_owned(), 9.0));
        let inf = buckets.last().unwrap();
        assert_eq!(inf.0, "le=\"+Inf\"");
        assert_eq!(inf.1, value(&s, "backhaul_edge_receive_to_ack_seconds_count", ""));
        assert_eq!(inf.1, 10.0);
        let sum = value(&s, "backhaul_edge_receive_to_ack_seconds_sum", "");
        assert!((sum - 79.7455).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn parse_reads_back_what_render_writes() {
        let m = metrics();
        let cdr = m.stream_id("cdr").unwrap();
        m.add_received(cdr, u64::MAX - 1); // beyond f64's exact integers
        m.add_dropped(cdr, DropReason::Duplicate, 3);
        m.set_oldest_unforwarded_age(cdr, Duration::from_micros(1_234_567));
        m.set_broker_connected(m.connection_id("gw \"slow\"\\2").unwrap(), true);
        m.observe_receive_to_ack(Duration::from_micros(700));
        let snap = m.snapshot();
        assert_eq!(Snapshot::parse(&snap.render()).unwrap(), snap);
    }

    #[test]
    fn parse_skips_unknown_series_and_refuses_garbage() {
        let text = "# HELP x y\nsome_other_metric{a=\"b\"} 1\nbackhaul_edge_records_received_total{stream=\"s\"} 3 1700000000\n\
                    backhaul_edge_records_dropped_total{stream=\"s\",reason=\"new_reason\"} 1\n";
        let snap = Snapshot::parse(text).unwrap();
        assert_eq!(snap.streams.len(), 1);
        assert_eq!(snap.streams[0].received, 3);
        assert_eq!(snap.streams[0].dropped_total(), 0);
        for bad in ["backhaul_edge_log_bytes{stream=\"s\" 3", "backhaul_edge_log_bytes{stream=s} 3", "x{} abc", "{} 1"]
        {
            let e = Snapshot::parse(bad).unwrap_err();
            assert_eq!(e.line, 1, "{bad}: {e}");
        }
        assert!(Snapshot::parse("backhaul_edge_log_bytes 3").is_err(), "a stream family needs its label");
    }

    #[test]
    fn quantile_interpolates_within_buckets() {
        let m = metrics();
        assert_eq!(m.snapshot().receive_to_ack.quantile(0.5), None);
        // 100 observations of 2 ms: all in (1 ms, 2.5 ms].
        for _ in 0..100 {
            m.observe_receive_to_ack(Duration::from_millis(2));
        }
        let h = m.snapshot().receive_to_ack;
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - 0.00175).abs() < 1e-12, "{p50}");
        assert!((h.quantile(1.0).unwrap() - 0.0025).abs() < 1e-12);
        m.observe_receive_to_ack(Duration::from_secs(30));
        assert_eq!(m.snapshot().receive_to_ack.quantile(1.0), Some(f64::INFINITY));
    }

    #[test]
    #[should_panic(expected = "given twice")]
    fn repeated_stream_names_are_refused() {
        Metrics::new(&["a", "a"], &[] as &[&str]);
    }
}
