//! Every metric of core-ingest, declared once, rendered as Prometheus text. Labels are bounded:
//! refusal reasons are a fixed set; no per-edge series (edges are in the catalog, not here).

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonic counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one away.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the value.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

/// Bucket bounds of [`Histogram`], seconds: 1 ms to 60 s.
const BUCKETS_S: [f64; 16] =
    [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0];

/// A Prometheus histogram over fixed buckets, atomics only.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 16],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one value, in microseconds (negative ones, from clock skew, count as 0).
    pub fn observe_us(&self, us: i64) {
        let us = us.max(0) as u64;
        let s = us as f64 / 1e6;
        if let Some(i) = BUCKETS_S.iter().position(|&b| s <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS_S.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Why a connection or stream was refused: the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The TLS handshake failed (unknown CA, expired certificate, …).
    Tls,
    /// The certificate names no valid edge id.
    Identity,
    /// Not on the allow-list.
    NotAllowed,
    /// At `connections_max`.
    Overloaded,
    /// A frame or batch that did not decode or check out.
    BadInput,
}

const REFUSED: [(Refused, &str); 5] = [
    (Refused::Tls, "tls"),
    (Refused::Identity, "identity"),
    (Refused::NotAllowed, "not_allowed"),
    (Refused::Overloaded, "overloaded"),
    (Refused::BadInput, "bad_input"),
];

/// The metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Batches received from edges.
    pub batches_received: Counter,
    /// Batches appended.
    pub batches_stored: Counter,
    /// Records in the data batches stored (gap batches not counted).
    pub records_stored: Counter,
    /// Bytes of batches appended.
    pub bytes_stored: Counter,
    /// Batches already held: acknowledged, not stored.
    pub duplicates: Counter,
    /// Batches refused for partly overlapping what is held.
    pub conflicts: Counter,
    /// Gap batches stored.
    pub gaps: Counter,
    /// First batches of a producer stream on this node above seq 0.
    pub handovers: Counter,
    /// Group commits (fsync rounds).
    pub group_commits: Counter,
    /// Edge connections open.
    pub connections: Gauge,
    /// From a batch's earliest event time (at the edge: when MQTT delivered the record) to
    /// the fsync that made it durable here. Across machines it includes their clock offset.
    pub event_to_durable: Histogram,
    /// Certificate reloads that took effect.
    pub tls_reloads: Counter,
    /// Certificate reloads refused (the old certificates stay in use).
    pub tls_reload_failures: Counter,
    refused: [Counter; 5],
    /// notAfter (Unix seconds) of the server certificate and of the CA; 0 until loaded.
    cert_expiry: [AtomicI64; 2],
    /// Tiering and backpressure (DESIGN §5).
    pub tier: TierMetrics,
}

/// Metrics of the tierer and of the disk budget.
#[derive(Debug, Default)]
pub struct TierMetrics {
    /// Segments whose object and manifest are now in the bucket.
    pub segments: Counter,
    /// Bytes of those segments.
    pub bytes: Counter,
    /// Failed tiering attempts (object store errors, verify mismatches); retried with backoff.
    pub errors: Counter,
    /// Closed segments not yet in the bucket.
    pub backlog_segments: Gauge,
    /// Their bytes on disk (segment and index files).
    pub backlog_bytes: Gauge,
    /// Local copies of tiered segments removed.
    pub local_deleted: Counter,
    /// Appends held unanswered because the disk budget was full of untiered data.
    pub backpressure_waits: Counter,
}

impl TierMetrics {
    fn render(&self, out: &mut String) {
        let counters: [(&str, &str, &Counter); 5] = [
            ("backhaul_core_tiered_segments_total", "Segments uploaded with their manifest.", &self.segments),
            ("backhaul_core_tiered_bytes_total", "Bytes of segments uploaded.", &self.bytes),
            (
                "backhaul_core_tier_errors_total",
                "Failed tiering attempts (object store errors); retried with capped backoff.",
                &self.errors,
            ),
            (
                "backhaul_core_local_segments_deleted_total",
                "Local copies of tiered segments removed.",
                &self.local_deleted,
            ),
            (
                "backhaul_core_backpressure_waits_total",
                "Appends held unanswered because the disk budget was full of untiered data.",
                &self.backpressure_waits,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", c.get());
        }
        let name = "backhaul_core_tier_backlog_segments";
        let _ = writeln!(
            out,
            "# HELP {name} Closed segments not yet in the bucket.\n# TYPE {name} gauge\n{name} {}",
            self.backlog_segments.get()
        );
        let name = "backhaul_core_tier_backlog_bytes";
        let _ = writeln!(
            out,
            "# HELP {name} Bytes on disk of closed segments not yet in the bucket.\n# TYPE {name} gauge\n{name} {}",
            self.backlog_bytes.get()
        );
    }
}

impl Metrics {
    /// Counts a refusal.
    pub fn refused(&self, why: Refused) {
        let i = REFUSED.iter().position(|(r, _)| *r == why).expect("every reason is listed");
        self.refused[i].inc();
    }

    /// Refusals for `why` so far.
    pub fn refused_count(&self, why: Refused) -> u64 {
        let i = REFUSED.iter().position(|(r, _)| *r == why).expect("every reason is listed");
        self.refused[i].get()
    }

    /// When the certificates in use expire.
    pub fn set_cert_expiry(&self, expiry: shared::tls::CertExpiry) {
        self.cert_expiry[0].store(expiry.cert_not_after, Ordering::Relaxed);
        self.cert_expiry[1].store(expiry.ca_not_after, Ordering::Relaxed);
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &Counter); 9] = [
            ("backhaul_core_batches_received_total", "Batches received from edges.", &self.batches_received),
            ("backhaul_core_batches_stored_total", "Batches appended to a partition log.", &self.batches_stored),
            ("backhaul_core_records_stored_total", "Records in the data batches appended.", &self.records_stored),
            ("backhaul_core_stored_bytes_total", "Bytes of batches appended.", &self.bytes_stored),
            (
                "backhaul_core_duplicate_batches_total",
                "Batches already held: acknowledged, not stored.",
                &self.duplicates,
            ),
            (
                "backhaul_core_conflicting_batches_total",
                "Batches refused for partly overlapping held seqs.",
                &self.conflicts,
            ),
            ("backhaul_core_gap_batches_total", "Gap batches stored (seqs an edge dropped on purpose).", &self.gaps),
            (
                "backhaul_core_handovers_total",
                "Producer streams first seen here above seq 0 (failover, rebalance).",
                &self.handovers,
            ),
            ("backhaul_core_group_commits_total", "Fsync rounds of the store.", &self.group_commits),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", c.get());
        }
        self.event_to_durable.render(
            &mut out,
            "backhaul_core_event_to_durable_seconds",
            "From a batch's earliest event time (edge receive time) to its fsync at the core.",
        );
        let name = "backhaul_core_connections";
        let _ = writeln!(
            out,
            "# HELP {name} Edge connections open.\n# TYPE {name} gauge\n{name} {}",
            self.connections.get()
        );
        let name = "backhaul_core_refused_total";
        let _ = writeln!(out, "# HELP {name} Connections or streams refused, by reason.\n# TYPE {name} counter");
        for (i, (_, label)) in REFUSED.iter().enumerate() {
            let _ = writeln!(out, "{name}{{reason=\"{label}\"}} {}", self.refused[i].get());
        }
        let name = "backhaul_core_tls_cert_expiry_timestamp_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} When the certificate in use expires (Unix time; earliest of its file), by certificate.\n\
             # TYPE {name} gauge"
        );
        for (i, label) in ["server", "ca"].iter().enumerate() {
            let t = self.cert_expiry[i].load(Ordering::Relaxed);
            if t != 0 {
                let _ = writeln!(out, "{name}{{cert=\"{label}\"}} {t}");
            }
        }
        let name = "backhaul_core_tls_reloads_total";
        let _ = writeln!(
            out,
            "# HELP {name} Certificate reloads (SIGHUP or file change), by result; failed ones keep the old certificates.\n\
             # TYPE {name} counter\n{name}{{result=\"ok\"}} {}\n{name}{{result=\"failed\"}} {}",
            self.tls_reloads.get(),
            self.tls_reload_failures.get()
        );
        self.tier.render(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_every_family() {
        let m = Metrics::default();
        m.batches_stored.add(3);
        m.refused(Refused::NotAllowed);
        m.event_to_durable.observe_us(1_500);
        m.event_to_durable.observe_us(-5);
        let text = m.render();
        assert!(text.contains("backhaul_core_batches_stored_total 3\n"));
        assert!(text.contains("backhaul_core_event_to_durable_seconds_bucket{le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("backhaul_core_event_to_durable_seconds_bucket{le=\"0.002\"} 2\n"), "{text}");
        assert!(text.contains("backhaul_core_event_to_durable_seconds_count 2\n"), "{text}");
        assert!(text.contains("backhaul_core_refused_total{reason=\"not_allowed\"} 1\n"));
        assert!(!text.contains("backhaul_core_tls_cert_expiry_timestamp_seconds{"), "no series before a load");
        m.set_cert_expiry(shared::tls::CertExpiry { cert_not_after: 1_900_000_000, ca_not_after: 2_000_000_000 });
        m.tls_reload_failures.inc();
        let text = m.render();
        assert!(text.contains("backhaul_core_tls_cert_expiry_timestamp_seconds{cert=\"server\"} 1900000000\n"));
        assert!(text.contains("backhaul_core_tls_cert_expiry_timestamp_seconds{cert=\"ca\"} 2000000000\n"));
        assert!(text.contains("backhaul_core_tls_reloads_total{result=\"failed\"} 1\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
        }
    }
}
