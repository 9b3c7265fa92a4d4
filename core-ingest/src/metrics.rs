//! Every metric of core-ingest, declared once, rendered as Prometheus text. Labels are bounded:
//! refusal reasons are a fixed set; no per-edge series (edges are in the catalog, not here).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

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
    refused: [Counter; 5],
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

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &Counter); 8] = [
            ("backhaul_core_batches_received_total", "Batches received from edges.", &self.batches_received),
            ("backhaul_core_batches_stored_total", "Batches appended to a partition log.", &self.batches_stored),
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
        let text = m.render();
        assert!(text.contains("backhaul_core_batches_stored_total 3\n"));
        assert!(text.contains("backhaul_core_refused_total{reason=\"not_allowed\"} 1\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            value.parse::<u64>().unwrap();
        }
    }
}
